//! The "group planes" layout of a convolution's input that the tile and VNNI convolutions
//! read in place (no im2col): [`PlaneLayout`], and the packing of f32 activations into it as
//! bf16 pairs ([`pack_planes`], for `amx::conv`) and as int8 quads ([`pack_planes_i8`], for
//! `int8`).

use super::amx::{padded, TILE_COLS, TILE_PAIRS};
use super::int8::InputScale;

/// How a k×k convolution's input (padding k/2, stride s) is laid out for `amx::conv`,
/// `amx::conv_i8` and the VNNI int8 convolution ("group planes"). The zero-padded image is split into s² phase planes (phase
/// (a, b) holds padded rows s·i + a and columns s·j + b; one phase at stride 1), each `wpp`
/// columns wide; per image and phase, `groups` planes of u32s (a group of `lanes` input channels
/// per u32: channels 2q and 2q + 1 as interleaved bf16 pairs, or channels 4q … 4q + 3 as int8
/// bytes; c_in/lanes rounded up, zeros past the channels) `stride` values apart. Outputs are
/// computed at every position of rows `wpp` wide (`tiles` tiles of 16; the columns past the
/// output width are discarded), so the input of output position o under tap (ky, kx) is in
/// phase (ky mod s, kx mod s) at o + ⌊ky/s⌋·wpp + ⌊kx/s⌋: a tile of B is 16 group planes at one
/// offset, read in place, without an im2col.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlaneLayout {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) s: usize,
    /// Output size.
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    /// Columns of a phase plane.
    pub(crate) wpp: usize,
    /// Group planes per image and phase, a multiple of `step`.
    pub(crate) groups: usize,
    /// Groups per tile multiply (see [`group_tiles`]).
    pub(crate) step: usize,
    pub(crate) stride: usize,
    pub(crate) tiles: usize,
}

/// Groups per tile multiply and group planes for `c_in` input channels, `lanes` to a group:
/// whole tiles of 16 groups, or one narrower tile when there are fewer (a 16-channel layer's 8
/// pairs would otherwise multiply as many zeros as values).
pub(crate) fn group_tiles(c_in: usize, lanes: usize) -> (usize, usize) {
    let q = c_in.div_ceil(lanes);
    let step = q.min(TILE_PAIRS);
    (step, padded(q, step))
}

impl PlaneLayout {
    pub(crate) fn new(
        c_in: usize,
        lanes: usize,
        (h, w): (usize, usize),
        k: usize,
        s: usize,
    ) -> Self {
        let pad = k / 2;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let (ho, wo) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let (hpp, wpp) = (hp.div_ceil(s), wp.div_ceil(s));
        let tiles = (ho * wpp).div_ceil(TILE_COLS);
        // The last tile's last output reads ⌊(k − 1)/s⌋·(wpp + 1) past its own position; the
        // plane must also hold the phase's hpp·wpp values.
        let reach = tiles * TILE_COLS + ((k - 1) / s) * (wpp + 1);
        let stride = padded(reach.max(hpp * wpp), TILE_COLS);
        let (step, groups) = group_tiles(c_in, lanes);
        Self {
            h,
            w,
            k,
            s,
            ho,
            wo,
            wpp,
            groups,
            step,
            stride,
            tiles,
        }
    }

    /// Output values per channel and image, padded rows included.
    pub(crate) fn out_values(&self) -> usize {
        self.tiles * TILE_COLS
    }

    /// Where padded row y + pad of image gi, group q starts in phase column b's plane: padded
    /// row y + pad is row ⌊(y + pad)/s⌋ of phase row (y + pad) mod s.
    #[inline(always)]
    fn row_at(&self, (gi, q, y): (usize, usize, usize), b: usize) -> usize {
        let (s, pad) = (self.s, self.k / 2);
        let (a, i) = ((y + pad) % s, (y + pad) / s);
        ((gi * s * s + a * s + b) * self.groups + q) * self.stride + i * self.wpp
    }

    /// Writes input row y (w values) of image gi, group q into its phase planes: padded column
    /// x + pad goes to phase column (x + pad) mod s, position ⌊(x + pad)/s⌋.
    #[inline(always)]
    fn place_row(&self, at: (usize, usize, usize), row: &[u32], dst: &mut [u32]) {
        let (s, pad) = (self.s, self.k / 2);
        if s == 1 {
            return dst[self.row_at(at, 0) + pad..][..row.len()].copy_from_slice(row);
        }
        for b in 0..s {
            let first = (s + b - pad % s) % s;
            let out = &mut dst[self.row_at(at, b) + (first + pad) / s..];
            for (d, &v) in out.iter_mut().zip(row.iter().skip(first).step_by(s)) {
                *d = v;
            }
        }
    }

    /// Tap t = (ky, kx): its phase plane's offset among an image's planes and its shift.
    pub(crate) fn tap(&self, t: usize) -> usize {
        let (ky, kx, s) = (t / self.k, t % self.k, self.s);
        let phase = (ky % s) * s + kx % s;
        phase * self.groups * self.stride + (ky / s) * self.wpp + kx / s
    }
}

/// Writes `x` ([c_in, g, h, w] f32) as `layout`'s pair planes into `dst` (resized; zero borders,
/// zero planes past the channels).
pub(crate) fn pack_planes(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    dst: &mut Vec<u32>,
) {
    let PlaneLayout {
        s, groups, stride, ..
    } = *layout;
    dst.clear();
    dst.resize(g * s * s * groups * stride, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { pack_planes_avx512(x, c_in, g, layout, dst) };
    }
    pack_planes_body(x, c_in, g, layout, dst)
}

/// [`pack_planes`]'s conversion compiled for AVX-512 (every CPU with AMX has it).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_planes_avx512(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    dst: &mut [u32],
) {
    pack_planes_body(x, c_in, g, layout, dst)
}

#[inline(always)]
fn pack_planes_body(x: &[f32], c_in: usize, g: usize, layout: &PlaneLayout, dst: &mut [u32]) {
    use super::gemm::pair_bits;
    let PlaneLayout { h, w, k, s, .. } = *layout;
    let (hw, pad) = (h * w, k / 2);
    let zeros = vec![0f32; w];
    let mut row = vec![0u32; w];
    for gi in 0..g {
        for q in 0..c_in.div_ceil(2) {
            let lo = &x[(2 * q * g + gi) * hw..][..hw];
            let hi = (2 * q + 1 < c_in).then(|| &x[((2 * q + 1) * g + gi) * hw..][..hw]);
            for y in 0..h {
                let hi_row = hi.map_or(&zeros[..], |hi| &hi[y * w..][..w]);
                if s == 1 {
                    // Straight into the plane, without the row copy.
                    let at = layout.row_at((gi, q, y), 0) + pad;
                    pair_bits(&lo[y * w..][..w], hi_row, &mut dst[at..][..w]);
                    continue;
                }
                pair_bits(&lo[y * w..][..w], hi_row, &mut row);
                layout.place_row((gi, q, y), &row, dst);
            }
        }
    }
}

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
    let PlaneLayout {
        s, groups, stride, ..
    } = *layout;
    assert!(scales.len() >= g);
    let image = s * s * groups * stride;
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
