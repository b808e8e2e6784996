//! The im2col operand of same-size convolutions (stride 1, odd k, padding k/2), built a band of
//! output rows at a time: shared by the fused eval path (`convbn`) and the training convolution
//! (`conv`).
//!
//! Why bands: a whole im2col of a CIFAR ResNet's first stage (144 × 1,024 values, 576 KiB) is
//! larger than a 512 KiB L2, so the GEMM packed it back from memory; a band is still in L2 when
//! the GEMM reads it. Why shifted copies: for a same-size convolution each im2col row is the
//! input plane shifted by the kernel offset, so one copy per row (borders patched) replaces a
//! copy per output row (8–32 values), which spent a third of the forward pass in im2col,
//! memmove and memset.

/// Values of an im2col operand block: 64K f32 (256 KiB) leave room in a 512 KiB L2 (Zen 3; 1
/// MiB on Zen 4, 2 MiB on Sapphire Rapids) for the GEMM's packed copy of it. ResNet-20 forward
/// on the Zen 3, alternated runs, images/s: 8K values 445–494, 16K 706–731, 32K 693–784, 64K
/// 773–881, 128K 711–847, unblocked 581–656.
pub(crate) const BLOCK_VALUES: usize = 64 * 1024;

/// Output rows per band of an im2col with `rows` rows over an h×w plane: about `block_values`
/// values, at least one output row, at most the plane.
pub(crate) fn band(rows: usize, (h, w): (usize, usize), block_values: usize) -> usize {
    (block_values / (rows * w).max(1)).clamp(1, h.max(1))
}

/// Output rows [y0, y1) of image `gi` of the im2col matrix of a same-size convolution with
/// `c_in` input channels and a k×k kernel. `x` is [c_in, g, h, w] (g = 1: one image's
/// [c_in, h, w]); `dst` gets c_in·k·k rows of (y1 − y0)·w values, every one written.
pub(crate) fn same_block(
    x: &[f32],
    (c_in, k): (usize, usize),
    (g, gi): (usize, usize),
    (h, w): (usize, usize),
    (y0, y1): (usize, usize),
    dst: &mut [f32],
) {
    let p = (k / 2) as isize;
    let nb = (y1 - y0) * w;
    for (r, d) in dst.chunks_exact_mut(nb).take(c_in * k * k).enumerate() {
        let (c, ky, kx) = (r / (k * k), (r % (k * k)) / k, r % k);
        let src_plane = &x[(c * g + gi) * h * w..][..h * w];
        shifted_rows(
            src_plane,
            (h, w),
            (ky as isize - p, kx as isize - p),
            (y0, y1),
            d,
        );
    }
}

/// `dst[y − y0][x] = src[y + dy][x + dx]` for rows y in [y0, y1) of an h×w plane, zero where
/// that falls outside it.
pub(crate) fn shifted_rows(
    src: &[f32],
    (h, w): (usize, usize),
    shift: (isize, isize),
    rows: (usize, usize),
    dst: &mut [f32],
) {
    // Every in-image position reads inside the plane: copy the whole overlapping run at once (it
    // also carries values wrapped from the neighbouring row, zeroed by `outside`).
    let (a, b, s0) = overlap((h, w), shift, rows);
    dst[..a].fill(0.0);
    dst[a..b].copy_from_slice(&src[s0..s0 + (b - a)]);
    dst[b..].fill(0.0);
    outside((h, w), shift, rows, dst, |v| *v = 0.0);
}

/// Pair row `p` of a same-size convolution's im2col, rounded to bf16 and interleaved for the
/// bf16 GEMM kernels: `dst[j] = bf16(row 2p)[j] | bf16(row 2p + 1)[j] << 16` for every image
/// and output position j (row 2p + 1 is zero past the last row). `x` is [c_in, g, h, w];
/// `dst` has g·h·w values, every one written. One pass per source row instead of an f32 im2col
/// row written, read back and rounded: for the emulated bf16 path, ResNet-20's bf16 forward on
/// the Intel Xeon of README's Performance section went from 1,181–1,263 to 1,462–1,559
/// images/s (`CAF_KERNELS=portable`, alternated; this copy then ran its AVX-512 build at every
/// level, and now keeps to the plain build under `portable` like every other kernel); the
/// AVX-512 BF16 GEMM kernel ran as fast either way. (The AMX and AVX-512 BF16 kernels now take
/// convolutions without an im2col: `plane_conv::bf16`.)
pub(crate) fn same_pair_row(
    x: &[f32],
    (c_in, k): (usize, usize),
    g: usize,
    (h, w): (usize, usize),
    p: usize,
    dst: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::kernel_level() >= super::gemm::KernelLevel::Avx512
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { same_pair_row_avx512(x, (c_in, k), g, (h, w), p, dst) };
    }
    same_pair_row_body(x, (c_in, k), g, (h, w), p, dst)
}

/// [`same_pair_row`] compiled for AVX-512 (16 values per instruction instead of SSE2's 4).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn same_pair_row_avx512(
    x: &[f32],
    (c_in, k): (usize, usize),
    g: usize,
    (h, w): (usize, usize),
    p: usize,
    dst: &mut [u32],
) {
    same_pair_row_body(x, (c_in, k), g, (h, w), p, dst)
}

#[inline(always)]
fn same_pair_row_body(
    x: &[f32],
    (c_in, k): (usize, usize),
    g: usize,
    (h, w): (usize, usize),
    p: usize,
    dst: &mut [u32],
) {
    use super::gemm::bf16_bits;
    let plane = h * w;
    let pad = (k / 2) as isize;
    let source = |r: usize, gi: usize| {
        let (c, ky, kx) = (r / (k * k), (r % (k * k)) / k, r % k);
        let shift = (ky as isize - pad, kx as isize - pad);
        (&x[(c * g + gi) * plane..][..plane], shift)
    };
    for (gi, d) in dst.chunks_exact_mut(plane).enumerate() {
        let (src, shift) = source(2 * p, gi);
        let (a, b, s0) = overlap((h, w), shift, (0, h));
        d[..a].fill(0);
        for (v, &s) in d[a..b].iter_mut().zip(&src[s0..]) {
            *v = bf16_bits(s);
        }
        d[b..].fill(0);
        outside((h, w), shift, (0, h), d, |v| *v = 0);
        if 2 * p + 1 < c_in * k * k {
            let (src, shift) = source(2 * p + 1, gi);
            let (a, b, s0) = overlap((h, w), shift, (0, h));
            for (v, &s) in d[a..b].iter_mut().zip(&src[s0..]) {
                *v |= bf16_bits(s) << 16;
            }
            outside((h, w), shift, (0, h), d, |v| *v &= 0xFFFF);
        }
    }
}

/// Of output rows [y0, y1) of an h×w plane shifted by (dy, dx): the run [a, b) of positions
/// (counted from row y0) whose source, dy·w + dx further, lies inside the plane, and the
/// source of position a. Positions of the run may still read a neighbouring row's value (see
/// [`outside`]).
#[inline(always)]
fn overlap(
    (h, w): (usize, usize),
    (dy, dx): (isize, isize),
    (y0, y1): (usize, usize),
) -> (usize, usize, usize) {
    let hw = (h * w) as isize;
    let (i0, i1) = ((y0 * w) as isize, (y1 * w) as isize);
    let off = dy * w as isize + dx;
    let a = (-off).clamp(i0, i1);
    let b = (hw - off).clamp(a, i1);
    // (clamped: an empty run may start past a tiny plane)
    (
        (a - i0) as usize,
        (b - i0) as usize,
        (a + off).clamp(0, hw) as usize,
    )
}

/// Applies `f` to every position of output rows [y0, y1) (`d`, counted from row y0) whose
/// source, shifted by (dy, dx), is outside the h×w image: whole rows above or below it, and up
/// to k/2 wrapped columns per row.
#[inline(always)]
fn outside<T>(
    (h, w): (usize, usize),
    (dy, dx): (isize, isize),
    (y0, y1): (usize, usize),
    d: &mut [T],
    mut f: impl FnMut(&mut T),
) {
    let inside_lo = ((-dy).clamp(0, h as isize) as usize).clamp(y0, y1);
    let inside_hi = ((h as isize - dy).clamp(0, h as isize) as usize).clamp(inside_lo, y1);
    d[..(inside_lo - y0) * w].iter_mut().for_each(&mut f);
    d[(inside_hi - y0) * w..].iter_mut().for_each(&mut f);
    // At most k/2 columns per row, so strided stores (a memset call per row cost more than the
    // copy), column by column with a stride of one row: no bounds check or iterator chain per
    // value (per-row loops over `(0..lo).chain(hi..w)` were 5–9 % of a training step).
    let cols_lo = (-dx).clamp(0, w as isize) as usize;
    let cols_hi = ((w as isize - dx).clamp(0, w as isize) as usize).max(cols_lo);
    for x in (0..cols_lo).chain(cols_hi..w) {
        d.iter_mut().skip(x).step_by(w).for_each(&mut f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gemm::pair_bits;

    #[test]
    fn pair_rows_are_the_rounded_interleaved_im2col() {
        // 3×3 and 5×5 kernels, 1×1 kernels, planes down to 1×1 (every source outside), an odd
        // number of im2col rows (the last pair's second row is zero), several images.
        for &(c_in, k, g, h, w) in &[
            (3, 3, 2, 8, 8),
            (16, 3, 3, 4, 5),
            (2, 5, 1, 3, 7),
            (3, 1, 2, 2, 2),
            (1, 3, 2, 1, 1),
            (5, 3, 1, 32, 32),
        ] {
            let x: Vec<f32> = (0..c_in * g * h * w)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
                .collect();
            let (rows, n) = (c_in * k * k, g * h * w);
            let mut cols = vec![f32::NAN; rows * n];
            for gi in 0..g {
                let mut block = vec![f32::NAN; rows * h * w];
                same_block(&x, (c_in, k), (g, gi), (h, w), (0, h), &mut block);
                for r in 0..rows {
                    cols[r * n + gi * h * w..][..h * w]
                        .copy_from_slice(&block[r * h * w..][..h * w]);
                }
            }
            let zeros = vec![0f32; n];
            for p in 0..rows.div_ceil(2) {
                let lo = &cols[2 * p * n..][..n];
                let hi = if 2 * p + 1 < rows {
                    &cols[(2 * p + 1) * n..][..n]
                } else {
                    &zeros[..]
                };
                let mut want = vec![0u32; n];
                pair_bits(lo, hi, &mut want);
                let mut got = vec![u32::MAX; n];
                same_pair_row(&x, (c_in, k), g, (h, w), p, &mut got);
                assert_eq!(got, want, "({c_in}, {k}, {g}, {h}, {w}) pair {p}");
                let mut portable = vec![u32::MAX; n];
                same_pair_row_body(&x, (c_in, k), g, (h, w), p, &mut portable);
                assert_eq!(
                    portable, want,
                    "portable ({c_in}, {k}, {g}, {h}, {w}) pair {p}"
                );
            }
        }
    }
}
