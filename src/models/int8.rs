//! `precision: int8`: the fused convolutions with 8-bit weights and activations, sums exact in
//! 32-bit integers.
//!
//! The classifier an int8 certificate is exact for: each convolution (BatchNorm folded) keeps
//! its bias, shortcut, ReLU and pooling in f32, and computes its product from
//! - its weight quantised per output channel c: `w_q = round(w · 127 / m_c)`, `m_c = max |w[c]|`;
//! - its input quantised per image, from the image's own input to this layer: when no value is
//!   negative (a ReLU's output, every layer but a network's first), `x_q = round(x · 255 / m_x)`
//!   in 0 … 255, `m_x` the largest value; otherwise `x_q = round(x · 127 / m_x)` clamped to ±127,
//!   `m_x` the largest |value| (zero padding stays 0);
//!
//! as `y[c, j] += (Σ_t w_q[c, t] · x_q[t, j]) · (m_c / 127 · m_x / L)`, L = 255 or 127
//! (rounding to nearest even; the sum converted to f32, then multiplied by the product of the
//! two steps). The scales are the image's own, so the classifier is a fixed function of one
//! input, as randomized smoothing needs (a scale over a batch would make an image's class
//! depend on its batch-mates), and needs no calibration set. A k-tap sum is at most
//! k · 255 · 127 in magnitude, exact in i32 for any convolution here, so every kernel ([`Int8Kernel`]) gives the same integers, and every kernel the same
//! output bits: the quantisation and the scaling are one shared code path.
//!
//! AMX and AVX-512 VNNI read the input in place from `planes`' group planes (no im2col): four
//! channels' bytes per u32, unsigned (`tdpbsud` and `vpdpbusd` multiply signed by unsigned
//! bytes): a signed input goes in as `x_q + 128`, and `128 · Σ_t w_q[c, t]` is subtracted from
//! row c's sums. The emulated kernel multiplies the integers as f32 (exact, see
//! [`EXACT_TAPS`]).

use std::cell::RefCell;
use std::sync::OnceLock;

use super::amx::{self, padded};
use super::gemm::{kernel_level, KernelLevel};
use super::plane_conv::{self, cpu_has_vnni};
use super::planes::PlaneLayout;

/// The largest quantised magnitude: symmetric, so −128 is never used.
const QMAX: f32 = 127.0;

/// The offset that turns a quantised input into the unsigned byte the kernels multiply.
const OFFSET: i32 = 128;

/// Rows the kernels compute at once (an AMX tile's; the VNNI kernel takes 4 of them at a time).
const ROWS: usize = 16;

/// Which kernel computes the int8 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Int8Kernel {
    /// The f32 GEMM over the integer-valued operands, in slices of K short enough that every
    /// partial sum is an integer below 2²⁴, so exact (any CPU).
    Emulated,
    /// `vpdpbusd` (AVX-512 VNNI).
    Avx512Vnni,
    /// `tdpbsud` on AMX tiles.
    Amx,
}

impl std::fmt::Display for Int8Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Emulated => "emulated in f32",
            Self::Avx512Vnni => "AVX-512 VNNI",
            Self::Amx => "AMX-INT8",
        })
    }
}

/// The best int8 kernel this CPU has at `level` (`CAF_KERNELS`, see
/// [`KERNELS_ENV`](super::gemm::KERNELS_ENV)).
pub fn best_int8_kernel(level: KernelLevel) -> Int8Kernel {
    if level >= KernelLevel::Native && amx::int8_available() {
        Int8Kernel::Amx
    } else if level >= KernelLevel::Avx512 && cpu_has_vnni() {
        Int8Kernel::Avx512Vnni
    } else {
        Int8Kernel::Emulated
    }
}

/// The int8 kernel this process uses: the best the CPU has, capped by `CAF_KERNELS`.
pub fn int8_kernel() -> Int8Kernel {
    best_int8_kernel(kernel_level())
}

/// The kernel the int8 products run now: [`int8_kernel`], under a test's cap.
fn kernel_in_use() -> Int8Kernel {
    #[cfg(test)]
    {
        use std::sync::atomic::Ordering;
        let capped = match FORCE_KERNEL.load(Ordering::Relaxed) {
            0 => Int8Kernel::Emulated,
            1 => Int8Kernel::Avx512Vnni,
            _ => Int8Kernel::Amx,
        };
        int8_kernel().min(capped)
    }
    #[cfg(not(test))]
    {
        int8_kernel()
    }
}

/// Tests compare the kernels inside whole networks: the int8 products use at most the kernel
/// whose discriminant this holds (`u8::MAX`: no cap). The kernels give the same bits, so a test
/// running meanwhile under the cap computes the same results.
#[cfg(test)]
static FORCE_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the int8 kernel of this test process at `cap` (`None` lifts the cap).
#[cfg(test)]
pub(crate) fn cap_kernel(cap: Option<Int8Kernel>) {
    let v = cap.map_or(u8::MAX, |k| k as u8);
    FORCE_KERNEL.store(v, std::sync::atomic::Ordering::Relaxed)
}

/// `v · inv` clamped to [lo, hi] and rounded to the nearest integer, ties to even (a NaN gives
/// `lo`). Adding and subtracting 1.5 · 2²³ rounds in f32's own rounding mode, so this
/// vectorises on every CPU (`round_ties_even` is a libm call without SSE4.1), and gives what
/// `vcvtps2dq` gives after the same clamp.
#[inline(always)]
pub(crate) fn quantise_to(v: f32, inv: f32, (lo, hi): (f32, f32)) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    // Not `clamp`: it keeps a NaN, where max/min give `lo` as the vector code's `vmaxps` does.
    #[allow(clippy::manual_clamp)]
    let c = (v * inv).max(lo).min(hi);
    ((c + ROUND) - ROUND) as i32
}

/// A weight: `v · inv` to the nearest of −127 … 127.
#[inline(always)]
pub(crate) fn quantise(v: f32, inv: f32) -> i8 {
    quantise_to(v, inv, (-QMAX, QMAX)) as i8
}

/// The scale of values whose largest magnitude is `max` in `levels` steps: (multiplier into the
/// quantised range, the value one step stands for). All zeros quantise to zeros with step 0.
fn scales(max: f32, levels: f32) -> (f32, f32) {
    if max > 0.0 && max.is_finite() {
        (levels / max, max / levels)
    } else {
        (0.0, 0.0)
    }
}

/// How one image's input to a layer is quantised, from the image's own values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct InputScale {
    /// Multiplier into the quantised range.
    pub inv: f32,
    /// The value of one quantised step.
    pub step: f32,
    /// No value below zero (a ReLU's output): 0 … 255 steps of max/255, the kernels' unsigned
    /// bytes as they are. Otherwise −127 … 127 steps of max|·|/127, offset by 128 for the
    /// kernels.
    pub unsigned: bool,
}

impl InputScale {
    /// The scale of an image whose values are `planes`.
    pub(crate) fn of<'a>(planes: impl Iterator<Item = &'a [f32]>) -> Self {
        let (max, min) = planes.fold((0f32, 0f32), |(m, n), p| {
            let (pm, pn) = range(p);
            (m.max(pm), n.min(pn))
        });
        let unsigned = min >= 0.0;
        let (inv, step) = scales(max, if unsigned { 255.0 } else { QMAX });
        Self {
            inv,
            step,
            unsigned,
        }
    }

    /// The quantised range, [lo, hi].
    #[inline(always)]
    pub(crate) fn bounds(&self) -> (f32, f32) {
        if self.unsigned {
            (0.0, 255.0)
        } else {
            (-QMAX, QMAX)
        }
    }

    /// The quantised value of `v`.
    #[inline(always)]
    pub(crate) fn level(&self, v: f32) -> i32 {
        quantise_to(v, self.inv, self.bounds())
    }

    /// What the kernels' unsigned bytes add to a value: 128 for signed inputs, else 0.
    #[inline(always)]
    pub(crate) fn offset(&self) -> i32 {
        if self.unsigned {
            0
        } else {
            OFFSET
        }
    }

    /// `v` as the kernels' unsigned byte: its level plus [`offset`](Self::offset).
    #[inline(always)]
    pub(crate) fn byte(&self, v: f32) -> u8 {
        (self.level(v) + self.offset()) as u8
    }
}

/// (largest |value|, smallest value, at most 0), NaNs ignored. Maxima and minima are exact, so
/// the AVX-512 path gives the same values as the scalar one.
fn range(values: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::simd_level() == super::simd::SimdLevel::Avx512 {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { range_avx512(values) };
    }
    range_scalar(values)
}

fn range_scalar(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((0f32, 0f32), |(m, n), &v| (m.max(v.abs()), n.min(v)))
}

/// The largest |value| (NaNs ignored; 0 for none).
fn max_abs(values: &[f32]) -> f32 {
    range(values).0
}

/// [`range`] 16 lanes at a time (`vmaxps` and `vminps` return their second operand, the
/// running value, for a NaN, as `f32::max` and `f32::min` do).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn range_avx512(values: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let (mut m, mut n) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let chunks = values.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        let v = _mm512_loadu_ps(c.as_ptr());
        m = _mm512_max_ps(_mm512_abs_ps(v), m);
        n = _mm512_min_ps(v, n);
    }
    let (rm, rn) = range_scalar(rest);
    (
        _mm512_reduce_max_ps(m).max(rm),
        _mm512_reduce_min_ps(n).min(rn),
    )
}

/// A convolution's folded weight [m, k] quantised per row, as the kernels read it.
#[derive(Clone, Debug)]
pub(crate) struct Int8Weight {
    m: usize,
    k: usize,
    /// [m, k] row-major, PyTorch's (c, ky, kx) order within a row.
    q: Vec<i8>,
    /// The step of each row.
    step: Vec<f32>,
    /// Σ_t q[c, t] per row: what the unsigned offset adds to row c's sums.
    row_sum: Vec<i32>,
    /// Built on first use: the weights as the plane kernels read them (`plane_conv::conv_taps_i8`).
    taps: OnceLock<Vec<u32>>,
}

impl Int8Weight {
    pub(crate) fn new(values: &[f32], m: usize, k: usize) -> Self {
        debug_assert_eq!(values.len(), m * k);
        let mut q = vec![0i8; m * k];
        let mut step = Vec::with_capacity(m);
        let mut row_sum = Vec::with_capacity(m);
        for (row, dst) in values.chunks_exact(k).zip(q.chunks_exact_mut(k)) {
            let (inv, s) = scales(max_abs(row), QMAX);
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = quantise(v, inv);
            }
            step.push(s);
            row_sum.push(dst.iter().map(|&v| i32::from(v)).sum());
        }
        Self {
            m,
            k,
            q,
            step,
            row_sum,
            taps: OnceLock::new(),
        }
    }

    /// The quantised weight of row c, tap t (for tests and the reference).
    #[cfg(test)]
    fn at(&self, c: usize, t: usize) -> i8 {
        self.q[c * self.k + t]
    }

    /// `out[c_out, g, ho, wo] += conv(x)` for `g` images stored channel-major (`x` is
    /// [c_in, g, h, w]): a k×k convolution with padding k/2 at `stride` (module docs).
    pub(crate) fn conv(
        &self,
        x: &[f32],
        shape: (usize, usize, usize),
        g: usize,
        hw: (usize, usize),
        out: &mut [f32],
    ) {
        self.conv_with(kernel_in_use(), x, shape, g, hw, out)
    }

    fn conv_with(
        &self,
        kernel: Int8Kernel,
        x: &[f32],
        (c_in, k, stride): (usize, usize, usize),
        g: usize,
        (h, w): (usize, usize),
        out: &mut [f32],
    ) {
        assert_eq!(c_in * k * k, self.k, "int8 convolution shape");
        assert!(
            kernel <= best_int8_kernel(KernelLevel::Native),
            "{kernel} kernel requested on a CPU without it"
        );
        let plane = h * w;
        assert!(x.len() >= c_in * g * plane, "int8 convolution input");
        let layout = PlaneLayout::new(c_in, 4, (h, w), k, stride);
        let (ho, wo) = (layout.ho, layout.wo);
        assert!(out.len() >= self.m * g * ho * wo, "int8 convolution output");
        SCRATCH.with_borrow_mut(|s| {
            // Each image's scale, from its own input to this layer.
            s.scales.clear();
            s.scales.extend(
                (0..g).map(|gi| {
                    InputScale::of((0..c_in).map(|c| &x[(c * g + gi) * plane..][..plane]))
                }),
            );
            let mp = padded(self.m, ROWS);
            let sums = match kernel {
                Int8Kernel::Emulated => {
                    let n = g * ho * wo;
                    self.emulated(x, (c_in, k, stride), g, (h, w), &s.scales, &mut s.acc);
                    Sums {
                        ld: n,
                        image: ho * wo,
                        pitch: wo,
                        offset: false,
                    }
                }
                _ => {
                    let taps = self
                        .taps
                        .get_or_init(|| plane_conv::conv_taps_i8(&self.q, self.m, c_in, k));
                    pack_planes_i8(x, c_in, g, &layout, &s.scales, &mut s.planes);
                    let ld = g * layout.out_values();
                    s.acc.clear();
                    s.acc.resize(mp * ld, 0);
                    let done = match kernel {
                        Int8Kernel::Amx => {
                            amx::conv_i8(taps, mp, g, &layout, &s.planes, &mut s.acc)
                        }
                        _ => plane_conv::vnni_i8(taps, mp, g, &layout, &s.planes, &mut s.acc),
                    };
                    assert!(done, "{kernel} kernel unavailable");
                    Sums {
                        ld,
                        image: layout.out_values(),
                        pitch: layout.wpp,
                        offset: true,
                    }
                }
            };
            self.dequantise(&s.acc, &sums, &s.scales, (ho, wo), out);
        })
    }

    /// `out[c, gi, y, x] += (sum − offset_gi · Σ_t w_q[c, t]) · step_c · step_gi` for the
    /// sums laid out as `sums` says.
    fn dequantise(
        &self,
        acc: &[i32],
        sums: &Sums,
        scales: &[InputScale],
        (ho, wo): (usize, usize),
        out: &mut [f32],
    ) {
        let g = scales.len();
        for (c, o) in out.chunks_exact_mut(g * ho * wo).take(self.m).enumerate() {
            for (gi, (img, sx)) in o.chunks_exact_mut(ho * wo).zip(scales).enumerate() {
                let offset = if sums.offset {
                    sx.offset() * self.row_sum[c]
                } else {
                    0
                };
                let scale = self.step[c] * sx.step;
                let src = &acc[c * sums.ld + gi * sums.image..];
                // Element-wise, so the same bits in any vector width.
                super::simd::widest(
                    #[inline(always)]
                    || {
                        for (y, row) in img.chunks_exact_mut(wo).enumerate() {
                            let src = &src[y * sums.pitch..][..wo];
                            for x in 0..wo {
                                row[x] += (src[x] - offset) as f32 * scale;
                            }
                        }
                    },
                );
            }
        }
    }

    /// The emulated kernel: `acc` ([m, n], n = g·ho·wo) = the exact signed sums, from an f32
    /// im2col of the quantised input and the f32 GEMM in slices of [`EXACT_TAPS`] taps.
    #[allow(clippy::too_many_arguments)]
    fn emulated(
        &self,
        x: &[f32],
        (c_in, k, stride): (usize, usize, usize),
        g: usize,
        (h, w): (usize, usize),
        scales: &[InputScale],
        acc: &mut Vec<i32>,
    ) {
        let (ho, wo) = (
            super::convbn::conv_out(h, k, stride),
            super::convbn::conv_out(w, k, stride),
        );
        let (m, kk, n, pad) = (self.m, self.k, g * ho * wo, k / 2);
        let mut cols = vec![0f32; kk * n];
        for c in 0..c_in {
            for gi in 0..g {
                let src = &x[(c * g + gi) * h * w..][..h * w];
                for ky in 0..k {
                    for kx in 0..k {
                        let t = (c * k + ky) * k + kx;
                        let dst = &mut cols[t * n + gi * ho * wo..][..ho * wo];
                        for oy in 0..ho {
                            let Some(iy) = (oy * stride + ky).checked_sub(pad).filter(|&y| y < h)
                            else {
                                continue;
                            };
                            for ox in 0..wo {
                                if let Some(ix) =
                                    (ox * stride + kx).checked_sub(pad).filter(|&v| v < w)
                                {
                                    dst[oy * wo + ox] = scales[gi].level(src[iy * w + ix]) as f32;
                                }
                            }
                        }
                    }
                }
            }
        }
        let a: Vec<f32> = self.q.iter().map(|&v| f32::from(v)).collect();
        let mut c = vec![0f32; m * n];
        acc.clear();
        acc.resize(m * n, 0);
        for t0 in (0..kk).step_by(EXACT_TAPS) {
            let taps = (kk - t0).min(EXACT_TAPS);
            super::conv::gemm(
                m,
                n,
                taps,
                (&a[t0..], kk, 1),
                (&cols[t0 * n..], n, 1),
                &mut c,
                false,
            );
            for (s, &v) in acc.iter_mut().zip(&c) {
                *s += v as i32;
            }
        }
    }
}

/// Where a kernel left its sums: row c, image gi, output row y at `c·ld + gi·image + y·pitch`;
/// with `offset`, image gi's sums are its [`InputScale::offset`] times Σ_t w_q[c, t] too large.
struct Sums {
    ld: usize,
    image: usize,
    pitch: usize,
    offset: bool,
}

/// Taps per f32 slice of the emulated kernel: every partial sum is an integer of magnitude at
/// most 512 · 255 · 127 < 2²⁴, so exact in f32 in any summation order.
const EXACT_TAPS: usize = 512;

/// Writes `x` ([c_in, g, h, w] f32) as `layout`'s int8 group planes into `dst` (resized): image
/// gi's values as `scales[gi]`'s unsigned bytes ([`InputScale::byte`]), channels 4q … 4q + 3 in
/// the bytes of one u32; borders hold the image's quantised zero, channels past c_in too.
pub(crate) fn pack_planes_i8(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    scales: &[InputScale],
    dst: &mut Vec<u32>,
) {
    assert!(scales.len() >= g);
    let image = layout.image_values();
    dst.clear();
    dst.resize(g * image, 0);
    for (d, sc) in dst.chunks_exact_mut(image).zip(scales) {
        d.fill(sc.offset() as u32 * 0x0101_0101);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { pack_planes_i8_avx512(x, c_in, g, layout, scales, dst) };
    }
    pack_planes_i8_body(x, c_in, g, layout, scales, dst, quad_row)
}

/// [`pack_planes_i8`]'s quantisation compiled for AVX-512 (every CPU with AMX or AVX-512 VNNI
/// has it).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_planes_i8_avx512(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    scales: &[InputScale],
    dst: &mut [u32],
) {
    pack_planes_i8_body(x, c_in, g, layout, scales, dst, |r, sc, row| {
        // SAFETY: this function runs only where the CPU has AVX-512 F.
        unsafe { quad_row_avx512(r, sc, row) }
    })
}

/// Channels `r[0..4]` of one image plane (or row) as `sc`'s bytes into `row`, byte l of each u32 from
/// `r[l]`: 16 values at a time, rounding as [`InputScale::level`] does (`vcvtps2dq` rounds to
/// nearest even, like its addition of 1.5 · 2²³; `vmaxps` returns its second operand for a NaN,
/// like `f32::max`).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quad_row_avx512(r: [&[f32]; 4], sc: &InputScale, row: &mut [u32]) {
    use std::arch::x86_64::*;
    let w = row.len();
    let (lo, hi) = sc.bounds();
    let (vinv, lo, hi) = (
        _mm512_set1_ps(sc.inv),
        _mm512_set1_ps(lo),
        _mm512_set1_ps(hi),
    );
    let (mask, offset) = (
        _mm512_set1_epi32(0xFF),
        _mm512_set1_epi32((sc.offset() as u32 * 0x0101_0101) as i32),
    );
    let mut i = 0;
    while i + 16 <= w {
        let mut v = _mm512_setzero_si512();
        for (l, ch) in r.iter().enumerate() {
            let f = _mm512_mul_ps(_mm512_loadu_ps(ch.as_ptr().add(i)), vinv);
            let q = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(f, lo), hi));
            let byte = _mm512_and_si512(q, mask);
            v = _mm512_or_si512(v, _mm512_sllv_epi32(byte, _mm512_set1_epi32(8 * l as i32)));
        }
        // Adding 128 to each byte of a signed level is flipping its top bit.
        _mm512_storeu_si512(
            row.as_mut_ptr().add(i) as *mut _,
            _mm512_xor_si512(v, offset),
        );
        i += 16;
    }
    quad_row(r.map(|c| &c[i..]), sc, &mut row[i..]);
}

/// [`quad_row_avx512`] one value at a time.
#[inline(always)]
fn quad_row(r: [&[f32]; 4], sc: &InputScale, row: &mut [u32]) {
    for (i, d) in row.iter_mut().enumerate() {
        let b = |v: f32| u32::from(sc.byte(v));
        *d = b(r[0][i]) | b(r[1][i]) << 8 | b(r[2][i]) << 16 | b(r[3][i]) << 24;
    }
}

#[inline(always)]
fn pack_planes_i8_body(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    scales: &[InputScale],
    dst: &mut [u32],
    quad_row: impl Fn([&[f32]; 4], &InputScale, &mut [u32]),
) {
    let PlaneLayout { h, w, .. } = *layout;
    let hw = h * w;
    // A missing channel reads zeros, which quantise to zero.
    let zeros = vec![0f32; hw];
    // A whole plane at once: the deepest CIFAR stage's rows are 8 values, half a vector.
    let mut quads = vec![0u32; hw];
    for (gi, sc) in scales.iter().enumerate().take(g) {
        for q in 0..c_in.div_ceil(4) {
            let ch: [&[f32]; 4] = std::array::from_fn(|l| {
                let c = 4 * q + l;
                if c < c_in {
                    &x[(c * g + gi) * hw..][..hw]
                } else {
                    &zeros[..]
                }
            });
            quad_row(ch, sc, &mut quads);
            for (y, row) in quads.chunks_exact(w).enumerate() {
                layout.place_row((gi, q, y), row, dst);
            }
        }
    }
}

#[derive(Default)]
struct Scratch {
    scales: Vec<InputScale>,
    planes: Vec<u32>,
    acc: Vec<i32>,
}

thread_local! {
    /// Per-thread operands, reused across layers (no allocation per layer once grown).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [−r, r) from a seed (xorshift), some exact zeros.
    fn values(seed: u64, len: usize, r: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % 11 == 3 {
                    0.0
                } else {
                    ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * r
                }
            })
            .collect()
    }

    fn kernels() -> Vec<Int8Kernel> {
        let best = best_int8_kernel(KernelLevel::Native);
        [
            Int8Kernel::Emulated,
            Int8Kernel::Avx512Vnni,
            Int8Kernel::Amx,
        ]
        .into_iter()
        .filter(|&k| k <= best)
        .collect()
    }

    /// The module's definition written out in f64 and i64, one output at a time: quantise the
    /// image's input with its own scale, sum the integer products, scale, add to `out`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        w: &Int8Weight,
        x: &[f32],
        (c_in, k, stride): (usize, usize, usize),
        g: usize,
        (h, wd): (usize, usize),
        out: &mut [f32],
    ) {
        let (ho, wo) = (
            super::super::convbn::conv_out(h, k, stride),
            super::super::convbn::conv_out(wd, k, stride),
        );
        let pad = k / 2;
        let n = g * ho * wo;
        for gi in 0..g {
            let sc = InputScale::of((0..c_in).map(|c| &x[(c * g + gi) * h * wd..][..h * wd]));
            // The image's scale from the definition, value by value.
            let plain = x
                .iter()
                .enumerate()
                .filter(|(i, _)| (i / (h * wd)) % g == gi)
                .map(|(_, &v)| v);
            let (max, neg) = plain.fold((0f32, false), |(m, n), v| (m.max(v.abs()), n || v < 0.0));
            assert_eq!(sc.unsigned, !neg);
            assert_eq!(sc.step, scales(max, if neg { QMAX } else { 255.0 }).1);
            for co in 0..w.m {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut sum = 0i64;
                        for c in 0..c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                                    if iy < pad || ix < pad || iy - pad >= h || ix - pad >= wd {
                                        continue;
                                    }
                                    let v = x[(c * g + gi) * h * wd + (iy - pad) * wd + ix - pad];
                                    let t = (c * k + ky) * k + kx;
                                    sum += i64::from(w.at(co, t)) * i64::from(sc.level(v));
                                }
                            }
                        }
                        let j = gi * ho * wo + oy * wo + ox;
                        out[co * n + j] += sum as f32 * (w.step[co] * sc.step);
                    }
                }
            }
        }
    }

    /// Every kernel this CPU has gives the reference's bits, for shapes that leave every kind
    /// of partial block: fewer than 16 or 4 output channels, k past a 64-byte row, positions
    /// not a multiple of 16, strides 1–3, 1×1 to 5×5, several images with different scales.
    #[test]
    fn every_kernel_is_the_exact_integer_convolution() {
        let shapes = [
            // (c_in, c_out, k, stride, g, h, w)
            (3, 16, 3, 1, 1, 32, 32),
            (16, 32, 3, 2, 2, 9, 7),
            (5, 3, 5, 1, 3, 6, 5),
            (64, 64, 3, 1, 1, 8, 8),
            (7, 33, 1, 1, 2, 5, 3),
            (4, 17, 3, 3, 1, 10, 11),
            (6, 20, 3, 1, 2, 2, 17),
            (1, 1, 1, 1, 1, 1, 1),
        ];
        for (i, &(c_in, c_out, k, stride, g, h, wd)) in shapes.iter().enumerate() {
            let kk = c_in * k * k;
            let w = Int8Weight::new(&values(i as u64, c_out * kk, 0.7), c_out, kk);
            let mut x = values(100 + i as u64, c_in * g * h * wd, 3.0);
            // A second image at another scale, so per-image steps differ.
            if g > 1 {
                for v in &mut x[..] {
                    *v *= 0.25;
                }
                for c in 0..c_in {
                    for v in &mut x[(c * g) * h * wd..][..h * wd] {
                        *v *= 8.0;
                    }
                }
            }
            let (ho, wo) = (
                super::super::convbn::conv_out(h, k, stride),
                super::super::convbn::conv_out(wd, k, stride),
            );
            let start = values(200 + i as u64, c_out * g * ho * wo, 1.0);
            // Signed inputs; non-negative ones (255 steps); and, with several images, image 0
            // non-negative and the others signed.
            let plane = h * wd;
            let inputs = [
                x.clone(),
                x.iter().map(|v| v.abs()).collect(),
                x.iter()
                    .enumerate()
                    .map(|(j, v)| if (j / plane) % g == 0 { v.abs() } else { *v })
                    .collect::<Vec<f32>>(),
            ];
            for (kind, x) in inputs.iter().enumerate() {
                let mut want = start.clone();
                reference(&w, x, (c_in, k, stride), g, (h, wd), &mut want);
                for kernel in kernels() {
                    let mut got = start.clone();
                    w.conv_with(kernel, x, (c_in, k, stride), g, (h, wd), &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{kernel} on shape {i}, input {kind} differs from the exact sum"
                    );
                }
            }
        }
    }

    /// The quantised convolution is close to the f32 one: within a few steps of each operand
    /// for values of one sign or both (what makes it a usable classifier), and not equal.
    #[test]
    fn int8_convolution_is_close_to_f32() {
        let (c_in, c_out, k, h) = (16, 16, 3, 8);
        let kk = c_in * k * k;
        let weights = values(7, c_out * kk, 0.5);
        let w = Int8Weight::new(&weights, c_out, kk);
        let x: Vec<f32> = values(8, c_in * h * h, 1.0)
            .iter()
            .map(|v| v.abs())
            .collect();
        let mut got = vec![0f32; c_out * h * h];
        w.conv(&x, (c_in, k, 1), 1, (h, h), &mut got);
        let mut exact = vec![0f32; c_out * h * h];
        let f32w = super::super::gemm::GemmWeight::new(
            weights,
            c_out,
            kk,
            super::super::precision::Precision::F32,
        );
        let conv = super::super::convbn::FoldedConv {
            weight: f32w,
            bias: vec![0.0; c_out],
            c_in,
            c_out,
            k,
            stride: 1,
        };
        conv.accumulate(&x, 1, (h, h), &mut exact);
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got
            .iter()
            .zip(&exact)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst > 0.0, "int8 should round");
        assert!(worst < 0.02 * scale, "worst {worst} of {scale}");
    }

    /// The vector range is the scalar one, NaNs ignored.
    #[test]
    fn range_ignores_nans_at_every_width() {
        for len in [0, 1, 15, 16, 17, 40] {
            let mut v = values(len as u64, len, 2.0);
            if len > 3 {
                v[3] = f32::NAN;
                v[len - 1] = -5.0;
            }
            let want = v
                .iter()
                .fold((0f32, 0f32), |(m, n), x| (m.max(x.abs()), n.min(*x)));
            assert_eq!(range(&v), want, "{len}");
        }
    }

    /// Zero and non-finite scales quantise to zero rather than to NaN.
    #[test]
    fn all_zero_inputs_have_a_zero_step() {
        assert_eq!(scales(0.0, QMAX), (0.0, 0.0));
        assert_eq!(scales(f32::INFINITY, 255.0), (0.0, 0.0));
        assert_eq!(quantise(f32::NAN, 1.0), -127);
        // Ties go to even, as round_ties_even does.
        for (v, q) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (126.5, 126),
        ] {
            assert_eq!(quantise(v, 1.0), q, "{v}");
        }
        for i in -2000..2000 {
            let v = i as f32 * 0.0731;
            assert_eq!(
                f32::from(quantise(v, 1.0)),
                v.round_ties_even().clamp(-127.0, 127.0)
            );
        }
        assert_eq!(quantise(1e9, 1.0), 127);
        assert_eq!(quantise(-1e9, 1.0), -127);
        let w = Int8Weight::new(&[0.0; 9], 1, 9);
        let mut out = vec![1.5f32; 4];
        w.conv(&[0.0; 4], (1, 3, 1), 1, (2, 2), &mut out);
        assert_eq!(out, [1.5; 4]);
    }
}
