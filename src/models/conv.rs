//! A differentiable CPU convolution for training: im2col + GEMM forward, and a backward pass
//! that is two more GEMMs (weight and input gradients), registered with candle's autograd as a
//! [`CustomOp2`].
//!
//! Why: candle 0.11's CPU `conv2d` backward computes the input gradient with a naive
//! `conv_transpose2d` and the weight gradient with a convolution over the batch dimension;
//! profiling the CAF training step showed those two loops taking over half of the step. Here
//! each image's convolution is one GEMM over its im2col matrix, images run in parallel (rayon),
//! and the weight gradient is summed over fixed chunks of the batch in a fixed order, so the
//! result does not depend on how rayon schedules the work (bitwise-reproducible training with
//! the same thread count, which the resume test relies on).
//!
//! Same-size convolutions (stride 1, odd k, padding k/2: all but the downsampling layers) build
//! their im2col a band of output rows at a time from shifted copies of the input planes, as the
//! fused eval path does (`models::im2col`), and compute the input gradient as the same
//! convolution of the output gradient with the flipped kernel, so no col2im runs for them.
//!
//! Frozen operands cost nothing in the backward pass: the weight gradient is computed only when
//! the weight is tracked by autograd, the input gradient only when the input is (a network's
//! first layer reads data, so it never needs one; a frozen classifier behind a denoiser needs
//! only input gradients).
//!
//! Other devices and dtypes fall back to candle's own `conv2d`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::pointwise::unfilled;
use super::{direct, im2col};

/// Images per partial weight gradient. Fixed (not derived from the thread count) so the
/// summation order, hence the rounding, is the same on every run.
const WGRAD_CHUNK: usize = 8;

/// `conv2d(x, w)` with square kernel, zero padding `pad` and stride `stride`, no bias;
/// x is [N, C_in, H, W], w is [C_out, C_in, K, K].
pub fn conv2d(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> Result<Tensor> {
    conv2d_blocked(x, w, pad, stride, im2col::BLOCK_VALUES)
}

/// [`conv2d`] whose same-size convolutions build their im2col `block_values` values at a time.
fn conv2d_blocked(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    block_values: usize,
) -> Result<Tensor> {
    let cpu_f32 = super::path::fused(x.device()) && x.dtype() == DType::F32;
    if !cpu_f32 || w.dtype() != DType::F32 {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    let (_, c_in, h, wd) = x.dims4()?;
    let (_, wc_in, k, k2) = w.dims4()?;
    if wc_in != c_in || k != k2 || stride == 0 {
        candle_core::bail!(
            "conv2d: input {:?} and weight {:?} (stride {stride}) do not match",
            x.dims(),
            w.dims()
        );
    }
    let geom = Geom {
        c_in,
        h,
        w: wd,
        k,
        pad,
        stride,
        block_values,
    };
    if h + 2 * pad < k || wd + 2 * pad < k {
        candle_core::bail!("conv2d: kernel {k} larger than the padded input {h}×{wd}");
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { geom })
}

/// The shape of one convolution, enough to map between an image and its im2col matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    c_in: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    stride: usize,
    /// Values per band of a same-size convolution's im2col (see [`im2col::BLOCK_VALUES`]).
    block_values: usize,
}

impl Geom {
    /// A k×k convolution of c_in × h × w images with padding k/2 (the ResNets' layers).
    pub(crate) fn same_padding(
        c_in: usize,
        (h, w): (usize, usize),
        k: usize,
        stride: usize,
    ) -> Self {
        Geom {
            c_in,
            h,
            w,
            k,
            pad: k / 2,
            stride,
            block_values: im2col::BLOCK_VALUES,
        }
    }

    /// Stride 1, odd k, padding k/2: the output plane is the input's, each im2col row a shifted
    /// copy of an input plane, and the input gradient the same convolution with the kernel
    /// flipped, channels swapped (every layer of the CIFAR ResNets but the two downsampling
    /// ones, DnCNN, the adapters).
    fn same_size(&self) -> bool {
        self.stride == 1 && self.k % 2 == 1 && self.pad == self.k / 2
    }

    /// Whether the direct 3×3 kernels take this convolution to `c_out` channels, so its input
    /// may be given padded ([`forward_padded`], [`weight_grad_padded`]).
    pub(crate) fn takes_padded(&self, c_out: usize) -> bool {
        self.direct(c_out).is_some()
    }

    /// This convolution's shape for the direct 3×3 kernels, if they take it.
    fn direct(&self, c_out: usize) -> Option<direct::Shape3> {
        let hw = (self.h, self.w);
        self.same_size()
            .then(|| direct::shape(self.c_in, c_out, self.k, hw))
            .flatten()
    }

    /// Calls `f(first value of the band in the plane, band values, im2col band)` for the bands
    /// of output rows of one image x[c_in × h × w] of a same-size convolution, each band of the
    /// operand built just before `f`'s GEMM reads it, so it is still in L2; `col` is scratch.
    fn for_each_band(
        &self,
        x: &[f32],
        col: &mut Vec<f32>,
        mut f: impl FnMut(usize, usize, &[f32]),
    ) {
        let rows = self.rows();
        let band = im2col::band(rows, (self.h, self.w), self.block_values);
        for y0 in (0..self.h).step_by(band) {
            let y1 = (y0 + band).min(self.h);
            let nb = (y1 - y0) * self.w;
            col.resize(col.len().max(rows * nb), 0.0);
            let cb = &mut col[..rows * nb];
            let at = (self.h, self.w);
            im2col::same_block(x, (self.c_in, self.k), (1, 0), at, (y0, y1), cb);
            f(y0 * self.w, nb, cb);
        }
    }

    /// y[c_out × plane] = w[c_out × rows] · im2col(x) for one image of a same-size convolution.
    fn same_conv(&self, x: &[f32], w: &[f32], c_out: usize, col: &mut Vec<f32>, y: &mut [f32]) {
        let (rows, plane) = (self.rows(), self.h * self.w);
        self.for_each_band(x, col, |j0, nb, cb| {
            let out = (&mut y[j0..], plane);
            gemm_into(c_out, nb, rows, (w, rows, 1), (cb, nb, 1), out, false);
        });
    }

    /// gwᵀ[rows × c_out] += im2col(x) · gyᵀ for one image of a same-size convolution.
    fn same_weight_grad(
        &self,
        x: &[f32],
        gy: &[f32],
        c_out: usize,
        col: &mut Vec<f32>,
        gw_t: &mut [f32],
    ) {
        let (rows, plane) = (self.rows(), self.h * self.w);
        self.for_each_band(x, col, |j0, nb, cb| {
            // gyᵀ's band is [nb × c_out]: element (p, o) at gy[o·plane + j0 + p].
            let gy_t = (&gy[j0..], 1, plane);
            gemm(rows, c_out, nb, (cb, nb, 1), gy_t, gw_t, true);
        });
    }

    /// The input gradient's geometry of a same-size convolution and its weight: the same
    /// convolution over the output gradient (c_out channels) with w'[c][o][ky][kx] =
    /// w[o][c][k−1−ky][k−1−kx], since padding k/2 = k − 1 − k/2 for odd k.
    fn transposed(&self, w: &[f32], c_out: usize) -> (Geom, Vec<f32>) {
        let (c_in, k) = (self.c_in, self.k);
        let mut flipped = vec![0f32; w.len()];
        for o in 0..c_out {
            for c in 0..c_in {
                for ky in 0..k {
                    for kx in 0..k {
                        flipped[((c * c_out + o) * k + (k - 1 - ky)) * k + (k - 1 - kx)] =
                            w[((o * c_in + c) * k + ky) * k + kx];
                    }
                }
            }
        }
        (
            Geom {
                c_in: c_out,
                ..*self
            },
            flipped,
        )
    }

    pub(crate) fn c_in(&self) -> usize {
        self.c_in
    }

    /// The input plane's size.
    pub(crate) fn hw(&self) -> (usize, usize) {
        (self.h, self.w)
    }

    pub(crate) fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }

    fn plane_out(&self) -> usize {
        let (ho, wo) = self.out_hw();
        ho * wo
    }

    /// Rows of the im2col matrix (its columns are the output pixels).
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    fn image_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// Visits, for every im2col row r (channel c, kernel offset) and output row oy whose input
    /// row iy lies inside the image, the output columns ox0..ox1 that read inside the image:
    /// `f(r, oy, c, ox0..ox1, iy, ix0)` means col[r][oy][ox] = x[c][iy][ix0 + (ox−ox0)·s];
    /// every other im2col entry is padding (zero).
    fn for_each_span(
        &self,
        mut f: impl FnMut(usize, usize, usize, std::ops::Range<usize>, usize, usize),
    ) {
        let (ho, wo) = self.out_hw();
        let (s, p) = (self.stride, self.pad);
        for c in 0..self.c_in {
            for ky in 0..self.k {
                for kx in 0..self.k {
                    let r = (c * self.k + ky) * self.k + kx;
                    // Output columns ox with 0 ≤ ox·s + kx − p < w.
                    let ox0 = p.saturating_sub(kx).div_ceil(s);
                    let ox1 = ((self.w + p).saturating_sub(kx)).div_ceil(s).min(wo);
                    if ox0 >= ox1 {
                        continue;
                    }
                    let ix0 = ox0 * s + kx - p;
                    for oy in 0..ho {
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < self.h)
                        else {
                            continue;
                        };
                        f(r, oy, c, ox0..ox1, iy, ix0);
                    }
                }
            }
        }
    }

    /// col[rows × plane_out] ← the patches of one image x[c_in × h × w].
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (_, wo) = self.out_hw();
        let plane = self.plane_out();
        let s = self.stride;
        col.fill(0.0);
        self.for_each_span(|r, oy, c, ox, iy, ix0| {
            let src = &x[(c * self.h + iy) * self.w..][..self.w];
            let dst = &mut col[r * plane + oy * wo..][..wo];
            if s == 1 {
                dst[ox.clone()].copy_from_slice(&src[ix0..ix0 + ox.len()]);
            } else {
                for (j, d) in dst[ox].iter_mut().enumerate() {
                    *d = src[ix0 + j * s];
                }
            }
        });
    }

    /// x[c_in × h × w] += the patches col[rows × plane_out] scattered back (im2col's adjoint).
    fn col2im(&self, col: &[f32], x: &mut [f32]) {
        let (_, wo) = self.out_hw();
        let plane = self.plane_out();
        let s = self.stride;
        self.for_each_span(|r, oy, c, ox, iy, ix0| {
            let dst = &mut x[(c * self.h + iy) * self.w..][..self.w];
            let src = &col[r * plane + oy * wo..][..wo];
            if s == 1 {
                for (d, v) in dst[ix0..ix0 + ox.len()].iter_mut().zip(&src[ox]) {
                    *d += v;
                }
            } else {
                for (j, v) in src[ox].iter().enumerate() {
                    dst[ix0 + j * s] += v;
                }
            }
        });
    }
}

/// A row-major or transposed view of a dense matrix for [`gemm`]: `(data, row stride, col
/// stride)`.
pub(crate) type View<'a> = (&'a [f32], usize, usize);

/// `c[m×n] (+)= a[m×k] · b[k×n]` with arbitrary strides on a and b (so transposes are free);
/// c is dense row-major. `accumulate` keeps c's contents. Single-threaded: callers parallelise
/// across images.
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: &mut [f32],
    accumulate: bool,
) {
    gemm_into(m, n, k, a, b, (c, n), accumulate)
}

/// [`gemm`] into m rows of n values spaced `c.1` apart (a block of columns of a wider c).
pub(crate) fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    (c, c_rs): (&mut [f32], usize),
    accumulate: bool,
) {
    let fits = |(data, rs, cs): View, rows: usize, cols: usize| {
        rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len()
    };
    assert!(
        fits(a, m, k) && fits(b, k, n) && c_rs >= n && fits((c, c_rs, 1), m, n),
        "gemm operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(c_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the assert bounds every element read: a's (i, l) at i·rs + l·cs for i < m,
    // l < k, b's likewise, and c's (i, j) at i·c_rs + j. c is a distinct &mut borrow, so it
    // aliases neither a nor b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            // Parallelism is across images.
            gemm::Parallelism::None,
        )
    }
}

/// The f32 elements of a contiguous CPU operand of a custom op; `what` names it in errors.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// y = conv(x, w) for `n_img` images, contiguous NCHW slices; the body of the autograd op,
/// shared with the fused residual block (`models::block`).
pub(crate) fn forward(g: Geom, x: &[f32], w: &[f32], n_img: usize, c_out: usize) -> Vec<f32> {
    let plane = g.plane_out();
    // Every branch writes each output value (no accumulation).
    let mut y = unfilled(n_img * c_out * plane);
    if let Some(s) = g.direct(c_out) {
        let wt = direct::pack_weight(w, g.c_in, c_out);
        y.par_chunks_mut(c_out * plane)
            .zip(x.par_chunks(g.image_len()))
            .for_each_init(Vec::new, |xp, (yi, xi)| direct::conv(s, xi, &wt, xp, yi));
        return y;
    }
    if g.same_size() {
        y.par_chunks_mut(c_out * plane)
            .zip(x.par_chunks(g.image_len()))
            .for_each_init(Vec::new, |col, (yi, xi)| g.same_conv(xi, w, c_out, col, yi));
        return y;
    }
    y.par_chunks_mut(c_out * plane)
        .zip(x.par_chunks(g.image_len()))
        .for_each_init(
            || vec![0f32; g.rows() * plane],
            |col, (yi, xi)| {
                g.im2col(xi, col);
                gemm(
                    c_out,
                    plane,
                    g.rows(),
                    (w, g.rows(), 1),
                    (col, plane, 1),
                    yi,
                    false,
                );
            },
        );
    y
}

/// ∂L/∂x [n_img, c_in, h, w] from ∂L/∂y and w: per image, colᵍ = wᵀ·gy then col2im, or for a
/// same-size convolution the convolution of gy with the flipped kernel.
pub(crate) fn input_grad(g: Geom, gy: &[f32], w: &[f32], n_img: usize, c_out: usize) -> Vec<f32> {
    let plane = g.plane_out();
    let rows = g.rows();
    if g.same_size() {
        // Written value by value (the strided case below adds into it).
        let mut gx = unfilled(n_img * g.image_len());
        let (t, flipped) = g.transposed(w, c_out);
        if let Some(s) = t.direct(g.c_in) {
            let wt = direct::pack_weight(&flipped, c_out, g.c_in);
            gx.par_chunks_mut(g.image_len())
                .zip(gy.par_chunks(c_out * plane))
                .for_each_init(Vec::new, |xp, (gxi, gyi)| {
                    direct::conv(s, gyi, &wt, xp, gxi)
                });
            return gx;
        }
        gx.par_chunks_mut(g.image_len())
            .zip(gy.par_chunks(c_out * plane))
            .for_each_init(Vec::new, |col, (gxi, gyi)| {
                t.same_conv(gyi, &flipped, g.c_in, col, gxi)
            });
        return gx;
    }
    let mut gx = vec![0f32; n_img * g.image_len()];
    gx.par_chunks_mut(g.image_len())
        .zip(gy.par_chunks(c_out * plane))
        .for_each_init(
            || vec![0f32; rows * plane],
            |col, (gxi, gyi)| {
                // wᵀ is [rows × c_out]: element (r, o) at w[o·rows + r].
                gemm(
                    rows,
                    plane,
                    c_out,
                    (w, 1, rows),
                    (gyi, plane, 1),
                    col,
                    false,
                );
                g.col2im(col, gxi);
            },
        );
    gx
}

/// ∂L/∂w [c_out, c_in, k, k] from x and ∂L/∂y: Σ over images of gy·colᵀ, summed in fixed
/// chunks of [`WGRAD_CHUNK`] images.
pub(crate) fn weight_grad(g: Geom, x: &[f32], gy: &[f32], c_out: usize) -> Vec<f32> {
    let plane = g.plane_out();
    let rows = g.rows();
    let img = g.image_len();
    let partials: Vec<Vec<f32>> = x
        .par_chunks(img * WGRAD_CHUNK)
        .zip(gy.par_chunks(c_out * plane * WGRAD_CHUNK))
        .map(|(xc, gyc)| {
            // Accumulated transposed, gwᵀ = col·gyᵀ ([rows × c_out]): the long side
            // (rows) then runs along the GEMM kernel's wide register dimension; with the
            // few output channels there (8–64), the kernel idled most of its lanes.
            let mut gw_t = vec![0f32; rows * c_out];
            if let Some(s) = g.direct(c_out) {
                let (mut xp, mut lanes) = (Vec::new(), vec![0f32; direct::lanes_len(s)]);
                direct::weight_grad(s, xc, gyc, &mut xp, &mut lanes);
                direct::finish_weight_grad(&lanes, &mut gw_t);
                return gw_t;
            }
            if g.same_size() {
                let mut col = Vec::new();
                for (xi, gyi) in xc.chunks(img).zip(gyc.chunks(c_out * plane)) {
                    g.same_weight_grad(xi, gyi, c_out, &mut col, &mut gw_t);
                }
                return gw_t;
            }
            let mut col = vec![0f32; rows * plane];
            for (xi, gyi) in xc.chunks(img).zip(gyc.chunks(c_out * plane)) {
                g.im2col(xi, &mut col);
                // gyᵀ is [plane × c_out]: element (p, o) at gy[o·plane + p].
                gemm(
                    rows,
                    c_out,
                    plane,
                    (&col, plane, 1),
                    (gyi, 1, plane),
                    &mut gw_t,
                    true,
                );
            }
            gw_t
        })
        .collect();
    sum_partials(&partials, c_out, rows)
}

/// ∂L/∂w [c_out, c_in, k, k] as the sum, in order, of each chunk's transposed partial gwᵀ.
fn sum_partials(partials: &[Vec<f32>], c_out: usize, rows: usize) -> Vec<f32> {
    let mut gw = vec![0f32; c_out * rows];
    for part in partials {
        for (r, row) in part.chunks_exact(c_out).enumerate() {
            for (o, v) in row.iter().enumerate() {
                gw[o * rows + r] += v;
            }
        }
    }
    gw
}

/// [`forward`] on input given already padded for the direct kernels (each image
/// [`direct::padded_len`] values), when they take the convolution (else `None`): the same
/// values, without padding a copy of each image first.
pub(crate) fn forward_padded(
    g: Geom,
    xp: &[f32],
    w: &[f32],
    n_img: usize,
    c_out: usize,
) -> Option<Vec<f32>> {
    let s = g.direct(c_out)?;
    let (plane, image) = (g.plane_out(), direct::padded_len(g.c_in, (g.h, g.w)));
    let wt = direct::pack_weight(w, g.c_in, c_out);
    let mut y = unfilled(n_img * c_out * plane);
    y.par_chunks_mut(c_out * plane)
        .zip(xp.par_chunks(image))
        .for_each(|(yi, xi)| direct::conv_prepadded(s, xi, &wt, yi));
    Some(y)
}

/// [`weight_grad`] from input given already padded, as [`forward_padded`]: the same chunks in
/// the same order, so the same bits.
pub(crate) fn weight_grad_padded(
    g: Geom,
    xp: &[f32],
    gy: &[f32],
    c_out: usize,
) -> Option<Vec<f32>> {
    let s = g.direct(c_out)?;
    let (plane, rows) = (g.plane_out(), g.rows());
    let image = direct::padded_len(g.c_in, (g.h, g.w));
    let partials: Vec<Vec<f32>> = xp
        .par_chunks(image * WGRAD_CHUNK)
        .zip(gy.par_chunks(c_out * plane * WGRAD_CHUNK))
        .map(|(xc, gyc)| {
            let mut gw_t = vec![0f32; rows * c_out];
            let mut lanes = vec![0f32; direct::lanes_len(s)];
            direct::weight_grad_prepadded(s, xc, gyc, &mut lanes);
            direct::finish_weight_grad(&lanes, &mut gw_t);
            gw_t
        })
        .collect();
    Some(sum_partials(&partials, c_out, rows))
}

/// y = conv(x, w).
struct Conv2dOp {
    geom: Geom,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "caf-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv2d input")?;
        let w = f32_slice(s2, l2, "conv2d weight")?;
        let (n_img, c_out) = (l1.dims()[0], l2.dims()[0]);
        let (ho, wo) = self.geom.out_hw();
        let y = forward(self.geom, x, w, n_img, c_out);
        Ok((CpuStorage::F32(y), Shape::from((n_img, c_out, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = grad_y.contiguous()?;
        let gx = if x.track_op() {
            Some(gy.apply_op2_no_bwd(w, &InputGradOp { geom: self.geom })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&gy, &WeightGradOp { geom: self.geom })?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// ∂L/∂x from (∂L/∂y, w): per image, colᵍ = wᵀ·gy then col2im.
struct InputGradOp {
    geom: Geom,
}

impl CustomOp2 for InputGradOp {
    fn name(&self) -> &'static str {
        "caf-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom;
        let gy = f32_slice(s1, l1, "conv2d output gradient")?;
        let w = f32_slice(s2, l2, "conv2d weight")?;
        let (n_img, c_out) = (l1.dims()[0], l2.dims()[0]);
        let gx = input_grad(g, gy, w, n_img, c_out);
        Ok((CpuStorage::F32(gx), Shape::from((n_img, g.c_in, g.h, g.w))))
    }
}

/// ∂L/∂w from (x, ∂L/∂y): Σ over images of gy·colᵀ, summed in fixed chunks.
struct WeightGradOp {
    geom: Geom,
}

impl CustomOp2 for WeightGradOp {
    fn name(&self) -> &'static str {
        "caf-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "conv2d input")?;
        let gy = f32_slice(s2, l2, "conv2d output gradient")?;
        let (g, c_out) = (self.geom, l2.dims()[1]);
        let gw = weight_grad(g, x, gy, c_out);
        Ok((CpuStorage::F32(gw), Shape::from((c_out, g.c_in, g.k, g.k))))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Uniform(−1, 1) values of `shape`, seeded.
    pub(in crate::models) fn randn(seed: u64, shape: &[usize]) -> Tensor {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches the data")
    }

    pub(in crate::models) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("same shapes")
    }

    /// Forward values and both gradients of L = Σ r ⊙ conv(x, w) against candle's conv2d and
    /// its autograd, for every kernel/stride/padding combination caf's networks use and a few
    /// they do not (odd sizes, padding wider than needed, kernel without padding), with
    /// same-size convolutions banded as in use, one output row per band, and a few rows.
    #[test]
    fn forward_and_gradients_match_candles_conv2d() {
        for block_values in [im2col::BLOCK_VALUES, 1, 200] {
            matches_candle(block_values);
        }
    }

    fn matches_candle(block_values: usize) {
        let cases = [
            // (n, c_in, h, w, c_out, k, pad, stride)
            (3, 3, 8, 8, 4, 3, 1, 1),
            (2, 4, 9, 7, 5, 3, 1, 2),
            (2, 4, 8, 8, 6, 1, 0, 2),
            (1, 2, 5, 6, 3, 1, 0, 1),
            (2, 3, 7, 7, 2, 3, 0, 1),
            // Sizes where candle's own backward (the reference) has no output padding to lose.
            (2, 2, 5, 8, 3, 3, 2, 3),
            (17, 5, 6, 6, 7, 3, 1, 1),
            (12, 32, 16, 16, 32, 3, 1, 1),
            (12, 16, 32, 32, 32, 3, 1, 2),
            // Direct 3×3 kernels (`direct.rs`): all three passes, the forward only, the input
            // gradient only.
            (4, 8, 32, 32, 8, 3, 1, 1),
            (3, 3, 6, 32, 8, 3, 1, 1),
            (2, 8, 4, 16, 3, 3, 1, 1),
            (2, 4, 5, 48, 8, 3, 1, 1),
            // Same-size convolutions: 5×5, 1×1, planes of one row or column, a kernel wider
            // than the plane.
            (2, 3, 9, 11, 4, 5, 2, 1),
            (2, 3, 1, 6, 2, 3, 1, 1),
            (2, 2, 5, 1, 3, 3, 1, 1),
            (1, 2, 2, 3, 2, 7, 3, 1),
        ];
        for (i, &(n, c_in, h, wd, c_out, k, pad, stride)) in cases.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&randn(seed, &[n, c_in, h, wd])).expect("var");
            let w = Var::from_tensor(&randn(seed + 1, &[c_out, c_in, k, k])).expect("var");
            let ours = conv2d_blocked(x.as_tensor(), w.as_tensor(), pad, stride, block_values)
                .expect("ours");
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), pad, stride, 1, 1)
                .expect("candle");
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            let d = max_abs_diff(&ours, &theirs);
            assert!(d < 1e-4, "forward, case {i}, block {block_values}: {d}");

            let r = randn(seed + 2, ours.dims());
            let g_ours = (&ours * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward());
            let g_theirs = (&theirs * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward());
            let (g_ours, g_theirs) = (g_ours.expect("backward"), g_theirs.expect("backward"));
            for (name, v) in [("input", &x), ("weight", &w)] {
                let a = g_ours.get(v.as_tensor()).expect("gradient");
                let b = g_theirs.get(v.as_tensor()).expect("gradient");
                let d = max_abs_diff(a, b);
                assert!(
                    d < 1e-4,
                    "{name} gradient, case {i}, block {block_values}: max |Δ| = {d}"
                );
            }
        }
    }

    #[test]
    fn frozen_operands_get_no_gradient() {
        // A constant weight (a frozen network) and a data input: only the tracked side gets a
        // gradient, and the frozen weight is never written.
        let x = Var::from_tensor(&randn(1, &[2, 3, 6, 6])).expect("var");
        let w = randn(2, &[4, 3, 3, 3]);
        let before = w
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        let y = conv2d(x.as_tensor(), &w, 1, 1).expect("conv");
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
        let after = w
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec");
        assert_eq!(before, after);

        let xd = randn(3, &[2, 3, 6, 6]);
        let wv = Var::from_tensor(&randn(4, &[4, 3, 3, 3])).expect("var");
        let y = conv2d(&xd, wv.as_tensor(), 1, 2).expect("conv");
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(wv.as_tensor()).is_some());
        assert!(grads.get(&xd).is_none());
    }

    #[test]
    fn weight_gradient_is_the_same_whatever_the_thread_count() {
        let x = randn(5, &[37, 4, 8, 8]);
        let w = Var::from_tensor(&randn(6, &[6, 4, 3, 3])).expect("var");
        let grad = |threads: usize| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let y = conv2d(&x, w.as_tensor(), 1, 1).expect("conv");
                let g = y.sqr().and_then(|t| t.sum_all()).and_then(|l| l.backward());
                let g = g.expect("backward");
                let gw = g.get(w.as_tensor()).expect("gradient");
                gw.flatten_all().and_then(|t| t.to_vec1()).expect("vec")
            })
        };
        let one = grad(1);
        assert_eq!(one, grad(3));
        assert_eq!(one, grad(8));
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let x = randn(1, &[1, 3, 4, 4]);
        assert!(conv2d(&x, &randn(2, &[2, 4, 3, 3]), 1, 1).is_err());
        assert!(conv2d(&x, &randn(2, &[2, 3, 7, 7]), 0, 1).is_err());
        assert!(conv2d(&x, &randn(2, &[2, 3, 3, 3]), 1, 0).is_err());
    }
}
