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
    (dy, dx): (isize, isize),
    (y0, y1): (usize, usize),
    dst: &mut [f32],
) {
    let hw = (h * w) as isize;
    let (i0, i1) = ((y0 * w) as isize, (y1 * w) as isize);
    let off = dy * w as isize + dx;
    // Every in-image position reads inside [0, hw): copy the whole overlapping run at once (it
    // also carries values wrapped from the neighbouring row, zeroed below).
    let a = (-off).clamp(i0, i1);
    let b = (hw - off).clamp(a, i1);
    let (a, b) = ((a - i0) as usize, (b - i0) as usize);
    dst[..a].fill(0.0);
    if a < b {
        let start = (a as isize + i0 + off) as usize;
        dst[a..b].copy_from_slice(&src[start..start + (b - a)]);
    }
    dst[b..].fill(0.0);
    // Rows whose source row is outside the image.
    let inside_lo = ((-dy).clamp(0, h as isize) as usize).clamp(y0, y1);
    let inside_hi = ((h as isize - dy).clamp(0, h as isize) as usize).clamp(inside_lo, y1);
    dst[..(inside_lo - y0) * w].fill(0.0);
    dst[(inside_hi - y0) * w..].fill(0.0);
    // Columns whose source column is outside the image (the wrapped values): at most k/2 per
    // row, so plain stores (a memset call per row cost more than the copy).
    let cols_lo = (-dx).clamp(0, w as isize) as usize;
    let cols_hi = ((w as isize - dx).clamp(0, w as isize) as usize).max(cols_lo);
    // Column by column with a stride of one row: no bounds check or iterator chain per value
    // (per-row loops over `(0..lo).chain(hi..w)` were 5–9 % of a training step).
    for x in (0..cols_lo).chain(cols_hi..w) {
        for v in dst.iter_mut().skip(x).step_by(w) {
            *v = 0.0;
        }
    }
}
