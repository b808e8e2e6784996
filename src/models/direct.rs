//! Direct 3×3 convolutions (stride 1, padding 1) for wide, thin layers, in training and in the
//! fused f32 eval path.
//!
//! Why: a training convolution of few channels on a large plane (an adapter's 8 channels at
//! 32×32, ResNet-20's first stage) does little arithmetic per value it moves, and the im2col
//! route writes nine shifted copies of its input before each GEMM (forward, input gradient and
//! weight gradient alike). Here each image's input is copied once into a zero-bordered plane per
//! channel, and the products are summed straight from it: output channels in blocks of eight,
//! each block's accumulators over one output row held in registers while the input channels and
//! the nine taps stream past. The input gradient of such a layer is the same convolution of the
//! output gradient with the kernel flipped and the channels swapped (`conv::Geom::transposed`),
//! so two kernels cover the three passes; the eval path (`convbn::FoldedConv`) runs the first on
//! a group of images stored channel-major, adding onto the bias or the shortcut.
//!
//! One body per kernel, compiled for AVX-512 (with FMA), AVX2 (with FMA) and plain code, picked
//! at run time; `CAF_KERNELS=portable` keeps the plain build, which rounds each product before
//! adding it. The builds differ in rounding only, and each is tested against the f64 sums. The
//! AVX2 build takes a block's channels a few at a time (its sixteen registers hold half the
//! lanes of AVX-512's thirty-two), which changes which products are computed together, not the
//! order in which any one output sums them.

use super::simd::{simd_level as level, SimdLevel as Level};

/// Lanes of one vector of output pixels (an AVX-512 register; two AVX2 ones).
const L: usize = 16;
/// Output channels per block: the accumulators of one row of a block fit the registers.
const CO: usize = 8;

/// Whether the direct kernels take a same-size convolution (stride 1, padding k/2) of kernel
/// `k` from `c_in` to `c_out` channels on planes w wide: a 3×3 kernel, output channels in whole
/// blocks and rows in whole vectors.
fn applies(c_in: usize, c_out: usize, k: usize, w: usize) -> bool {
    k == 3 && c_in > 0 && c_out > 0 && c_out.is_multiple_of(CO) && w > 0 && w.is_multiple_of(L)
}

/// The shape the kernels take for a same-size convolution (stride 1, padding k/2) on h×w
/// planes, if [`applies`]; the one check every caller makes.
pub(crate) fn shape(c_in: usize, c_out: usize, k: usize, (h, w): (usize, usize)) -> Option<Shape3> {
    applies(c_in, c_out, k, w).then_some(Shape3 { c_in, c_out, h, w })
}

/// The weight [c_out, c_in, 3, 3] laid out as the convolution kernel reads it: blocks of
/// [`CO`] output channels, each [c_in][tap][CO], so every index inside a block's input channel
/// is a constant.
pub(crate) fn pack_weight(w: &[f32], c_in: usize, c_out: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for o in 0..c_out {
        let (b, oi) = (o / CO, o % CO);
        for c in 0..c_in {
            for tap in 0..9 {
                t[((b * c_in + c) * 9 + tap) * CO + oi] = w[(o * c_in + c) * 9 + tap];
            }
        }
    }
    t
}

/// Writes one image into `xp` (resized) as [c][h + 2][w + 2] with a zero border; its channel
/// c's plane is `x[c·chan_stride..][..h·w]` (`chan_stride` = h·w for one image [c][h][w], and
/// g·h·w for an image of a group stored [c][g][h][w], `x` starting at that image).
fn pad(x: &[f32], c_in: usize, (h, w): (usize, usize), chan_stride: usize, xp: &mut Vec<f32>) {
    // Every value is written below, so a buffer of the right length is not zeroed first.
    xp.resize(c_in * (h + 2) * (w + 2), 0.0);
    pad_into(x, c_in, (h, w), chan_stride, xp)
}

/// [`pad`] into `xp`, border included.
fn pad_into(x: &[f32], c_in: usize, (h, w): (usize, usize), chan_stride: usize, xp: &mut [f32]) {
    for (c, plane) in xp
        .chunks_exact_mut((h + 2) * (w + 2))
        .take(c_in)
        .enumerate()
    {
        let src = &x[c * chan_stride..][..h * w];
        pad_plane(plane, (h, w), |row, r| {
            row.copy_from_slice(&src[r * w..][..w])
        });
    }
}

/// Writes one plane [h + 2][w + 2] as the kernels read it: a zero border, and inside it row r
/// of the h×w plane as `fill(row, r)` writes it (a copy, or a producer writing its output
/// straight into this layout).
#[inline(always)]
pub(crate) fn pad_plane(
    plane: &mut [f32],
    (h, w): (usize, usize),
    mut fill: impl FnMut(&mut [f32], usize),
) {
    let wp = w + 2;
    let (top, rest) = plane[..(h + 2) * wp].split_at_mut(wp);
    let (body, bottom) = rest.split_at_mut(h * wp);
    top.fill(0.0);
    bottom.fill(0.0);
    for (r, row) in body.chunks_exact_mut(wp).enumerate() {
        row[0] = 0.0;
        fill(&mut row[1..=w], r);
        row[w + 1] = 0.0;
    }
}

/// Sixteen f32 lanes: one AVX-512 register, two AVX2 ones, or a plain array. The kernels are
/// written once over this (the compiler did not vectorise plain loops over accumulator arrays
/// the right way round: it gathered across output channels).
trait V16: Copy {
    /// Whether a block's accumulators overflow this build's registers: AVX2 has sixteen
    /// registers of 8 lanes, so eight output channels × one 16-lane vector alone would fill
    /// them (and the convolution's two vectors or the weight gradient's three would spill to
    /// the stack on every product); its kernels take a block's channels a few at a time.
    const FEW_REGISTERS: bool = false;
    fn zero() -> Self;
    fn splat(v: f32) -> Self;
    /// Sixteen values from `s[..16]`.
    fn load(s: &[f32]) -> Self;
    /// Sixteen values from `p`.
    ///
    /// # Safety
    /// `p..p + 16` must be readable.
    unsafe fn load_ptr(p: *const f32) -> Self;
    fn store(self, d: &mut [f32]);
    /// self + a·b.
    fn madd(self, a: Self, b: Self) -> Self;
    fn add(self, o: Self) -> Self;
}

/// The plain build: each product rounded before it is added.
#[derive(Clone, Copy)]
struct Plain([f32; L]);

impl V16 for Plain {
    #[inline(always)]
    fn zero() -> Self {
        Plain([0.0; L])
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Plain([v; L])
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        let mut v = [0.0; L];
        v.copy_from_slice(&s[..L]);
        Plain(v)
    }
    #[inline(always)]
    unsafe fn load_ptr(p: *const f32) -> Self {
        // SAFETY: the caller's.
        Plain(unsafe { std::ptr::read_unaligned(p.cast::<[f32; L]>()) })
    }
    #[inline(always)]
    fn store(self, d: &mut [f32]) {
        d[..L].copy_from_slice(&self.0)
    }
    #[inline(always)]
    fn madd(self, a: Self, b: Self) -> Self {
        let mut r = self.0;
        for ((r, a), b) in r.iter_mut().zip(a.0).zip(b.0) {
            *r += a * b;
        }
        Plain(r)
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        let mut r = self.0;
        for (r, o) in r.iter_mut().zip(o.0) {
            *r += o;
        }
        Plain(r)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{L, V16};
    use std::arch::x86_64::*;

    /// One AVX-512 register. Only built into functions compiled with AVX-512 F and FMA.
    #[derive(Clone, Copy)]
    pub(super) struct Z(__m512);

    impl V16 for Z {
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (every method): only called from code compiled for AVX-512 F, which runs
            // only on CPUs that have it; loads and stores check their slice's length first.
            Z(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            Z(unsafe { _mm512_set1_ps(v) })
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Self {
            let s = &s[..L];
            Z(unsafe { _mm512_loadu_ps(s.as_ptr()) })
        }
        #[inline(always)]
        unsafe fn load_ptr(p: *const f32) -> Self {
            Z(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        fn store(self, d: &mut [f32]) {
            let d = &mut d[..L];
            unsafe { _mm512_storeu_ps(d.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn madd(self, a: Self, b: Self) -> Self {
            Z(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            Z(unsafe { _mm512_add_ps(self.0, o.0) })
        }
    }

    /// Two AVX2 registers. Only built into functions compiled with AVX2 and FMA.
    #[derive(Clone, Copy)]
    pub(super) struct Y(__m256, __m256);

    impl V16 for Y {
        const FEW_REGISTERS: bool = true;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (every method): as for `Z`, with AVX2 and FMA.
            unsafe { Y(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Y(_mm256_set1_ps(v), _mm256_set1_ps(v)) }
        }
        #[inline(always)]
        fn load(s: &[f32]) -> Self {
            let s = &s[..L];
            unsafe {
                Y(
                    _mm256_loadu_ps(s.as_ptr()),
                    _mm256_loadu_ps(s[8..].as_ptr()),
                )
            }
        }
        #[inline(always)]
        unsafe fn load_ptr(p: *const f32) -> Self {
            unsafe { Y(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
        }
        #[inline(always)]
        fn store(self, d: &mut [f32]) {
            let d = &mut d[..L];
            unsafe {
                _mm256_storeu_ps(d.as_mut_ptr(), self.0);
                _mm256_storeu_ps(d[8..].as_mut_ptr(), self.1);
            }
        }
        #[inline(always)]
        fn madd(self, a: Self, b: Self) -> Self {
            unsafe {
                Y(
                    _mm256_fmadd_ps(a.0, b.0, self.0),
                    _mm256_fmadd_ps(a.1, b.1, self.1),
                )
            }
        }
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Y(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1)) }
        }
    }
}

/// The shape of one image's convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape3 {
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

/// y [c_out][h][w] = conv(x [c_in][h][w], the packed weight) for one image; `xp` is scratch.
/// The caller has its shape from [`shape`].
pub(crate) fn conv(s: Shape3, x: &[f32], wt: &[f32], xp: &mut Vec<f32>, y: &mut [f32]) {
    let plane = s.h * s.w;
    pad(x, s.c_in, (s.h, s.w), plane, xp);
    let dst = Dst {
        chan_stride: plane,
        accumulate: false,
    };
    conv_padded(level(), s, xp, wt, y, dst)
}

/// out [c_out][g][h][w] += conv(x [c_in][g][h][w], the packed weight) for each of a group of
/// g images stored channel-major (the fused eval path's layout). The caller has checked
/// [`shape`].
pub(crate) fn accumulate_group(s: Shape3, x: &[f32], g: usize, wt: &[f32], out: &mut [f32]) {
    let plane = s.h * s.w;
    let (level, mut xp) = (level(), Vec::new());
    let dst = Dst {
        chan_stride: g * plane,
        accumulate: true,
    };
    for gi in 0..g {
        pad(&x[gi * plane..], s.c_in, (s.h, s.w), g * plane, &mut xp);
        conv_padded(level, s, &xp, wt, &mut out[gi * plane..], dst);
    }
}

/// The values of one image of c channels padded as the kernels read it: [c][h + 2][w + 2],
/// the input's planes inside a zero border.
pub(crate) fn padded_len(c: usize, (h, w): (usize, usize)) -> usize {
    c * (h + 2) * (w + 2)
}

/// [`conv`] of an image given already padded ([`padded_len`] values).
pub(crate) fn conv_prepadded(s: Shape3, xp: &[f32], wt: &[f32], y: &mut [f32]) {
    let dst = Dst {
        chan_stride: s.h * s.w,
        accumulate: false,
    };
    conv_padded(level(), s, xp, wt, y, dst)
}

/// [`weight_grad`] of images given already padded ([`padded_len`] values each).
pub(crate) fn weight_grad_prepadded(s: Shape3, xp: &[f32], gy: &[f32], lanes: &mut [f32]) {
    let n = xp.len() / padded_len(s.c_in, (s.h, s.w));
    weight_grad_padded(level(), s, xp, gy, lanes, n)
}

/// Where the convolution kernel puts output channel o's plane: at `o·chan_stride` of its
/// output slice, stored or added.
#[derive(Clone, Copy, Debug)]
struct Dst {
    chan_stride: usize,
    accumulate: bool,
}

/// Adds the weight gradient of a few images (x [n][c_in][h][w], gy [n][c_out][h][w]) to
/// `lanes`, the gradient [c_in][tap][c_out] kept as sixteen partial sums per weight
/// ([`lanes_len`] values); [`finish_weight_grad`] sums them. Summing lanes once per batch
/// instead of once per image keeps horizontal additions out of the loop (on a 16×16 plane they
/// cost more than the products), and running the images inside the loop over weights keeps
/// each weight's accumulators in registers across them, so the partial sums are read and
/// written once per call, not once per image. `xp` is scratch. The caller has its shape from
/// [`shape`].
pub(crate) fn weight_grad(s: Shape3, x: &[f32], gy: &[f32], xp: &mut Vec<f32>, lanes: &mut [f32]) {
    let (image, padded) = (s.c_in * s.h * s.w, s.c_in * (s.h + 2) * (s.w + 2));
    let n = x.len() / image;
    xp.resize(n * padded, 0.0);
    for (xi, dst) in x.chunks_exact(image).zip(xp.chunks_exact_mut(padded)) {
        pad_into(xi, s.c_in, (s.h, s.w), s.h * s.w, dst);
    }
    weight_grad_padded(level(), s, xp, gy, lanes, n)
}

/// The length of [`weight_grad`]'s partial sums.
pub(crate) fn lanes_len(s: Shape3) -> usize {
    s.c_in * 9 * s.c_out * L
}

/// gwᵀ [c_in][tap][c_out] += the sum of each weight's sixteen partial sums, in a fixed order.
pub(crate) fn finish_weight_grad(lanes: &[f32], gw_t: &mut [f32]) {
    for (g, v) in gw_t.iter_mut().zip(lanes.chunks_exact(L)) {
        let mut h = [0f32; L];
        h.copy_from_slice(v);
        let mut n = L;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                h[i] += h[i + n];
            }
        }
        *g += h[0];
    }
}

/// Defines `$name(level, shape, a, b, out, extra)` running `$body::<V>` in `level`'s build.
macro_rules! builds {
    ($name:ident, $body:ident, $extra:ty) => {
        fn $name(level: Level, s: Shape3, a: &[f32], b: &[f32], out: &mut [f32], e: $extra) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512(s: Shape3, a: &[f32], b: &[f32], out: &mut [f32], e: $extra) {
                    $body::<x86::Z>(s, a, b, out, e)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2(s: Shape3, a: &[f32], b: &[f32], out: &mut [f32], e: $extra) {
                    $body::<x86::Y>(s, a, b, out, e)
                }
                match level {
                    // SAFETY: the caller's level is one the CPU has.
                    Level::Avx512 => return unsafe { avx512(s, a, b, out, e) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2(s, a, b, out, e) },
                    Level::Portable => {}
                }
            }
            $body::<Plain>(s, a, b, out, e)
        }
    };
}

builds!(conv_padded, conv_body, Dst);
builds!(weight_grad_padded, weight_grad_body, usize);

#[inline(always)]
fn conv_body<V: V16>(s: Shape3, xp: &[f32], wt: &[f32], y: &mut [f32], d: Dst) {
    assert!(
        s.c_out.is_multiple_of(CO) && s.w.is_multiple_of(L),
        "direct convolution shape"
    );
    if V::FEW_REGISTERS {
        // Half a block's channels over one vector: 8 of the 16 AVX2 registers accumulate.
        for x0 in (0..s.w).step_by(L) {
            for c0 in (0..CO).step_by(CO / 2) {
                conv_segment::<V, 1, { CO / 2 }>(s, xp, wt, (x0, c0), y, d)
            }
        }
        return;
    }
    // Each row in segments of two vectors (sixteen accumulators of a block), then one.
    let pairs = s.w / (2 * L);
    for x0 in (0..pairs).map(|i| 2 * L * i) {
        conv_segment::<V, 2, CO>(s, xp, wt, (x0, 0), y, d)
    }
    if !s.w.is_multiple_of(2 * L) {
        conv_segment::<V, 1, CO>(s, xp, wt, (2 * L * pairs, 0), y, d)
    }
}

/// [`conv_body`] for the `NC` vectors of every output row from column x0, and the `CB` output
/// channels of each block from its channel c0.
#[inline(always)]
fn conv_segment<V: V16, const NC: usize, const CB: usize>(
    s: Shape3,
    xp: &[f32],
    wt: &[f32],
    (x0, c0): (usize, usize),
    y: &mut [f32],
    d: Dst,
) {
    let Shape3 { c_in, c_out, h, w } = s;
    let (wp, plane_p) = (w + 2, (h + 2) * (w + 2));
    let xp = &xp[..c_in * plane_p];
    let wt = &wt[..c_in * 9 * c_out];
    for (b, o0) in (0..c_out).step_by(CO).map(|o| o + c0).enumerate() {
        let block = &wt[b * c_in * 9 * CO..][..c_in * 9 * CO];
        for oy in 0..h {
            let mut acc = [[V::zero(); NC]; CB];
            for (plane, taps) in xp.chunks_exact(plane_p).zip(block.chunks_exact(9 * CO)) {
                for ky in 0..3 {
                    let row = &plane[(oy + ky) * wp + x0..][..NC * L + 2];
                    for kx in 0..3 {
                        let wv = &taps[(ky * 3 + kx) * CO + c0..][..CB];
                        let v: [V; NC] = std::array::from_fn(|n| V::load(&row[n * L + kx..]));
                        for (acc, &wo) in acc.iter_mut().zip(wv) {
                            let wo = V::splat(wo);
                            for (a, &v) in acc.iter_mut().zip(&v) {
                                *a = a.madd(wo, v);
                            }
                        }
                    }
                }
            }
            for (o, acc) in acc.iter().enumerate() {
                let out = &mut y[(o0 + o) * d.chan_stride + oy * w + x0..][..NC * L];
                for (dst, &a) in out.chunks_exact_mut(L).zip(acc) {
                    if d.accumulate {
                        V::load(dst).add(a).store(dst)
                    } else {
                        a.store(dst)
                    }
                }
            }
        }
    }
}

/// [`weight_grad`] for `n` images, each padded into `xp` one after the other.
#[inline(always)]
fn weight_grad_body<V: V16>(s: Shape3, xp: &[f32], gy: &[f32], lanes: &mut [f32], n: usize) {
    if V::FEW_REGISTERS {
        // A quarter of a block: 12 AVX2 registers accumulate.
        weight_grad_channels::<V, { CO / 4 }>(s, xp, gy, lanes, n)
    } else {
        weight_grad_channels::<V, CO>(s, xp, gy, lanes, n)
    }
}

/// [`weight_grad_body`] taking each block's output channels `CB` at a time.
#[inline(always)]
fn weight_grad_channels<V: V16, const CB: usize>(
    s: Shape3,
    xp: &[f32],
    gy: &[f32],
    lanes: &mut [f32],
    n: usize,
) {
    let Shape3 { c_in, c_out, h, w } = s;
    let (wp, plane_p, plane) = (w + 2, (h + 2) * (w + 2), h * w);
    let xp = &xp[..n * c_in * plane_p];
    let gy = &gy[..n * c_out * plane];
    let lanes = &mut lanes[..c_in * 9 * c_out * L];
    assert!(
        c_out % CO == 0 && w % L == 0,
        "direct weight gradient shape"
    );
    for c in 0..c_in {
        for o0 in (0..c_out).step_by(CB) {
            for ky in 0..3 {
                let mut acc = [[V::zero(); 3]; CB];
                let images = xp
                    .chunks_exact(c_in * plane_p)
                    .zip(gy.chunks_exact(c_out * plane));
                for (xi, gyi) in images {
                    let xplane = &xi[c * plane_p..][..plane_p];
                    for oy in 0..h {
                        let row = &xplane[(oy + ky) * wp..][..w + 2];
                        let g_rows: [&[f32]; CB] =
                            std::array::from_fn(|o| &gyi[(o0 + o) * plane + oy * w..][..w]);
                        for x0 in (0..w).step_by(L) {
                            // SAFETY: x0 + L ≤ w (w is a multiple of L, asserted above), so
                            // x0 + kx + L ≤ w + 2 = row.len() for kx ≤ 2, and x0 + L ≤ w, the
                            // length of every g row.
                            let xs: [V; 3] = std::array::from_fn(|kx| unsafe {
                                V::load_ptr(row.as_ptr().add(x0 + kx))
                            });
                            for (acc, g_row) in acc.iter_mut().zip(&g_rows) {
                                // SAFETY: as above.
                                let g = unsafe { V::load_ptr(g_row.as_ptr().add(x0)) };
                                for (a, &xv) in acc.iter_mut().zip(&xs) {
                                    *a = a.madd(g, xv);
                                }
                            }
                        }
                    }
                }
                for (o, acc) in acc.iter().enumerate() {
                    for (kx, a) in acc.iter().enumerate() {
                        let at = ((c * 9 + ky * 3 + kx) * c_out + o0 + o) * L;
                        let dst = &mut lanes[at..][..L];
                        V::load(dst).add(*a).store(dst);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The f64 convolution (pad 1) of one image.
    fn conv_f64(s: Shape3, x: &[f32], w: &[f32]) -> Vec<f64> {
        let Shape3 {
            c_in,
            c_out,
            h,
            w: wd,
        } = s;
        let mut y = vec![0f64; c_out * h * wd];
        for o in 0..c_out {
            for oy in 0..h {
                for ox in 0..wd {
                    let mut acc = 0f64;
                    for c in 0..c_in {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy < 1 || ix < 1 || iy > h || ix > wd {
                                    continue;
                                }
                                acc += f64::from(w[((o * c_in + c) * 3 + ky) * 3 + kx])
                                    * f64::from(x[(c * h + iy - 1) * wd + ix - 1]);
                            }
                        }
                    }
                    y[(o * h + oy) * wd + ox] = acc;
                }
            }
        }
        y
    }

    /// (c_in, c_out, h, w): rows of one vector, two, and five.
    const SHAPES: [(usize, usize, usize, usize); 6] = [
        (3, 8, 5, 32),
        (8, 8, 32, 32),
        (16, 16, 16, 16),
        (5, 24, 3, 16),
        (1, 8, 1, 32),
        (2, 16, 4, 80),
    ];

    #[test]
    fn which_layers_apply() {
        assert!(applies(8, 8, 3, 32) && applies(16, 32, 3, 16) && applies(3, 8, 3, 32));
        assert!(!applies(8, 8, 5, 32), "only 3×3 kernels");
        assert!(!applies(8, 12, 3, 32), "output channels in blocks of 8");
        assert!(!applies(8, 8, 3, 8) && !applies(8, 8, 3, 24) && applies(8, 8, 3, 224));
        assert!(!applies(0, 8, 3, 16) && !applies(8, 0, 3, 16));
    }

    #[test]
    fn every_build_matches_the_f64_convolution() {
        for (c_in, c_out, h, w) in SHAPES {
            let s = Shape3 { c_in, c_out, h, w };
            assert!(applies(c_in, c_out, 3, w));
            let x = seeded(c_in * h * w, 1);
            let wt = seeded(c_out * c_in * 9, 2);
            let want = conv_f64(s, &x, &wt);
            let packed = pack_weight(&wt, c_in, c_out);
            for level in crate::models::simd::simd_levels_here() {
                // A scratch buffer left dirty by an earlier use: the border must still be zero.
                let mut xp = vec![f32::NAN; c_in * (h + 2) * (w + 2)];
                pad(&x, c_in, (h, w), h * w, &mut xp);
                let mut y = vec![f32::NAN; c_out * h * w];
                let dst = Dst {
                    chan_stride: h * w,
                    accumulate: false,
                };
                conv_padded(level, s, &xp, &packed, &mut y, dst);
                let tol = 1e-6 * (c_in * 9) as f64;
                for (i, (&g, &e)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(g) - e).abs() <= tol,
                        "{level:?} {s:?} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_group_stored_channel_major_accumulates_each_image() {
        let (c_in, c_out, h, w, g) = (3, 16, 4, 48, 3);
        let s = Shape3 { c_in, c_out, h, w };
        let plane = h * w;
        let x = seeded(c_in * g * plane, 5);
        let wt = seeded(c_out * c_in * 9, 6);
        let before = seeded(c_out * g * plane, 7);
        let mut out = before.clone();
        accumulate_group(s, &x, g, &pack_weight(&wt, c_in, c_out), &mut out);
        for gi in 0..g {
            // Image gi alone, [c][h][w].
            let xi: Vec<f32> = (0..c_in)
                .flat_map(|c| x[(c * g + gi) * plane..][..plane].to_vec())
                .collect();
            let want = conv_f64(s, &xi, &wt);
            for o in 0..c_out {
                for p in 0..plane {
                    let at = (o * g + gi) * plane + p;
                    let e = f64::from(before[at]) + want[o * plane + p];
                    assert!(
                        (f64::from(out[at]) - e).abs() <= 1e-5,
                        "image {gi}, {o}, {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_build_matches_the_f64_weight_gradient() {
        for (c_in, c_out, h, w) in SHAPES {
            let s = Shape3 { c_in, c_out, h, w };
            let x = seeded(c_in * h * w, 3);
            let gy = seeded(c_out * h * w, 4);
            // ∂/∂w[o][c][ky][kx] of Σ gy·conv(x, w): the convolution with a one-hot weight.
            let mut want = vec![0f64; c_in * 9 * c_out];
            for o in 0..c_out {
                for c in 0..c_in {
                    for tap in 0..9 {
                        let (ky, kx) = (tap / 3, tap % 3);
                        let mut acc = 0f64;
                        for oy in 0..h {
                            for ox in 0..w {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy < 1 || ix < 1 || iy > h || ix > w {
                                    continue;
                                }
                                acc += f64::from(gy[(o * h + oy) * w + ox])
                                    * f64::from(x[(c * h + iy - 1) * w + ix - 1]);
                            }
                        }
                        want[(c * 9 + tap) * c_out + o] = acc;
                    }
                }
            }
            for level in crate::models::simd::simd_levels_here() {
                let mut xp = Vec::new();
                pad(&x, c_in, (h, w), h * w, &mut xp);
                // Two images (the same one twice) into the partial sums, then one more, then
                // onto what is there.
                let mut lanes = vec![0f32; lanes_len(s)];
                let (xp2, gy2) = ([&xp[..], &xp[..]].concat(), [&gy[..], &gy[..]].concat());
                weight_grad_padded(level, s, &xp2, &gy2, &mut lanes, 2);
                weight_grad_padded(level, s, &xp, &gy, &mut lanes, 1);
                let mut gw_t = vec![1f32; want.len()];
                finish_weight_grad(&lanes, &mut gw_t);
                let tol = 1e-6 * (h * w) as f64;
                for (i, (&g, &e)) in gw_t.iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(g) - 1.0 - 3.0 * e).abs() <= tol,
                        "{level:?} {s:?} at {i}: {g} vs 1 + 3·{e}"
                    );
                }
            }
        }
    }
}
