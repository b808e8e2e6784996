//! A bias-free square convolution followed by BatchNorm: the building block of both the CIFAR
//! ResNets and the adapters. Train mode runs caf's convolution kernel and the fused train-mode
//! BatchNorm; eval mode folds BatchNorm into the convolution; the fused CPU paths take the folded
//! weights as a GEMM operand.

use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder};

use super::gemm::GemmWeight;
use super::im2col::{self, shifted_rows, BLOCK_VALUES};
use super::precision::Precision;

/// PyTorch's BatchNorm2d defaults, which akamaster's checkpoints were trained with.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

#[derive(Clone, Debug)]
pub(crate) struct ConvBn {
    /// [c_out, c_in, k, k]; padding is k/2.
    weight: Tensor,
    bn: BatchNorm,
    k: usize,
    stride: usize,
}

/// Output size of a k×k convolution with padding k/2.
pub(crate) fn conv_out(size: usize, k: usize, stride: usize) -> usize {
    (size + 2 * (k / 2) - k) / stride + 1
}

/// The eval-mode layer as the fused CPU paths run it: y = W·im2col(x) + bias, BatchNorm folded
/// into W and bias. One type for the ResNets' 3×3 layers and the adapters' any-k layers, so both
/// paths share one im2col.
#[derive(Clone, Debug)]
pub(crate) struct FoldedConv {
    /// [c_out, c_in·k·k], row-major, PyTorch's (c, ky, kx) order within a row.
    pub weight: GemmWeight,
    pub bias: Vec<f32>,
    pub c_in: usize,
    pub c_out: usize,
    /// Square kernel size; padding is k/2.
    pub k: usize,
    pub stride: usize,
}

impl FoldedConv {
    pub(crate) fn out_size(&self, (h, w): (usize, usize)) -> (usize, usize) {
        (
            conv_out(h, self.k, self.stride),
            conv_out(w, self.k, self.stride),
        )
    }

    /// Sets `out` to the bias broadcast over `plane` values per output channel ([c_out, plane]),
    /// ready for [`accumulate`](Self::accumulate) to add the convolution.
    pub(crate) fn bias_into(&self, out: &mut Vec<f32>, plane: usize) {
        out.clear();
        for &b in &self.bias {
            out.extend(std::iter::repeat_n(b, plane));
        }
    }

    /// Adds the bias to `out` ([c_out, plane]) that already holds something else (a shortcut).
    pub(crate) fn add_bias(&self, out: &mut [f32], plane: usize) {
        for (o, &b) in out.chunks_exact_mut(plane).zip(&self.bias) {
            for v in o {
                *v += b;
            }
        }
    }

    /// `out += conv(x)` for a group of `g` images stored channel-major: `x` is [c_in, g, h, w],
    /// `out` is [c_out, g, ho, wo], so one GEMM covers the whole group.
    pub(crate) fn accumulate(&self, x: &[f32], g: usize, (h, w): (usize, usize), out: &mut [f32]) {
        if let Some(q) = self.weight.int8() {
            return q.conv(x, (self.c_in, self.k, self.stride), g, (h, w), out);
        }
        let (ho, wo) = self.out_size((h, w));
        let n = g * ho * wo;
        if self.k == 1 && self.stride == 1 {
            // A 1×1 convolution at stride 1 reads the activations as they are.
            return self.weight.accumulate(n, x, out);
        }
        if let Some(kernel) = self.weight.plane_kernel() {
            // Every shape, without an im2col.
            let taps = self.weight.conv_taps(self.c_in, self.k);
            let shape = (self.c_in, self.c_out, self.k, self.stride);
            return super::plane_conv::bf16(kernel, taps, shape, g, (h, w), x, out);
        }
        let direct = (self.stride == 1 && self.weight.is_f32())
            .then(|| super::direct::shape(self.c_in, self.c_out, self.k, (h, w)))
            .flatten();
        if let Some(s) = direct {
            let taps = self.weight.direct_taps(self.c_in);
            return super::direct::accumulate_group(s, x, g, taps, out);
        }
        if self.stride == 1 && self.k % 2 == 1 {
            if self.weight.is_f32() {
                return self.accumulate_blocked(x, g, (h, w), out, BLOCK_VALUES);
            }
            let shape = (self.c_in, self.k);
            return self.weight.accumulate_pair_rows(
                n,
                |p, dst| im2col::same_pair_row(x, shape, g, (h, w), p, dst),
                out,
            );
        }
        self.weight
            .accumulate_rows(n, |r, dst| self.im2col_row(x, g, (h, w), r, dst), out);
    }

    /// [`accumulate`](Self::accumulate) of a same-size (stride 1, odd k) f32 convolution, the
    /// im2col made a few output rows at a time (about `block_values` values), so each block of
    /// the operand is still in L2 when the GEMM packs it (a whole im2col of a CIFAR ResNet's
    /// first stage, 144 × 1024 values, is larger than a 512 KiB L2).
    fn accumulate_blocked(
        &self,
        x: &[f32],
        g: usize,
        (h, w): (usize, usize),
        out: &mut [f32],
        block_values: usize,
    ) {
        let n = g * h * w;
        let rows = im2col::band(self.c_in * self.k * self.k, (h, w), block_values);
        let blocks = (0..g).flat_map(|gi| {
            (0..h)
                .step_by(rows)
                .map(move |y0| (gi * h * w + y0 * w, gi * h * w + (y0 + rows).min(h) * w))
        });
        let fill = |j0: usize, j1: usize, dst: &mut [f32]| {
            let (gi, y0, y1) = (j0 / (h * w), (j0 % (h * w)) / w, (j1 - 1) % (h * w) / w + 1);
            self.im2col_block(x, g, (h, w), gi, (y0, y1), dst)
        };
        self.weight.accumulate_blocks(n, blocks, fill, out);
    }

    /// Output rows [y0, y1) of image `gi` of the im2col matrix (see [`im2col::same_block`]).
    fn im2col_block(
        &self,
        x: &[f32],
        g: usize,
        (h, w): (usize, usize),
        gi: usize,
        rows: (usize, usize),
        dst: &mut [f32],
    ) {
        im2col::same_block(x, (self.c_in, self.k), (g, gi), (h, w), rows, dst)
    }

    /// Row `r` = (c, ky, kx) of the im2col matrix: input channel c shifted by (ky − p, kx − p)
    /// and subsampled by the stride, for every image and output position (zero outside).
    fn im2col_row(&self, x: &[f32], g: usize, (h, w): (usize, usize), r: usize, dst: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        let (c, ky, kx) = (r / (k * k), (r % (k * k)) / k, r % k);
        if s == 1 && k % 2 == 1 {
            // Same-size output: the row is the plane shifted by (ky − p, kx − p), so one copy
            // per image does it and only the borders are patched (copies of one output row,
            // 8–32 values, spent a third of the forward pass in im2col and memmove).
            for (gi, seg) in dst.chunks_exact_mut(h * w).enumerate() {
                let src_plane = &x[(c * g + gi) * h * w..][..h * w];
                let shift = (ky as isize - p as isize, kx as isize - p as isize);
                shifted_rows(src_plane, (h, w), shift, (0, h), seg);
            }
            return;
        }
        self.im2col_row_strided(x, g, (h, w), r, dst);
    }

    /// [`im2col_row`](Self::im2col_row) output row by output row: any stride and kernel size.
    fn im2col_row_strided(
        &self,
        x: &[f32],
        g: usize,
        (h, w): (usize, usize),
        r: usize,
        dst: &mut [f32],
    ) {
        let (ho, wo) = self.out_size((h, w));
        let (k, s, p) = (self.k, self.stride, self.k / 2);
        let (c, ky, kx) = (r / (k * k), (r % (k * k)) / k, r % k);
        for (gi, seg) in dst.chunks_exact_mut(ho * wo).enumerate() {
            let src_plane = &x[(c * g + gi) * h * w..][..h * w];
            for (oy, d) in seg.chunks_exact_mut(wo).enumerate() {
                // Input row oy·s + ky − p; rows outside the image are padding.
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    d.fill(0.0);
                    continue;
                };
                let src = &src_plane[iy * w..][..w];
                if s == 1 {
                    // Output column ox reads input column ox + kx − p, inside the image for ox
                    // in [p − kx, w + p − kx).
                    let lo = p.saturating_sub(kx).min(wo);
                    let hi = (w + p).saturating_sub(kx).clamp(lo, wo);
                    d[..lo].fill(0.0);
                    if lo < hi {
                        d[lo..hi].copy_from_slice(&src[lo + kx - p..hi + kx - p]);
                    }
                    d[hi..].fill(0.0);
                } else {
                    for (ox, v) in d.iter_mut().enumerate() {
                        *v = (ox * s + kx)
                            .checked_sub(p)
                            .filter(|&ix| ix < w)
                            .map_or(0.0, |ix| src[ix]);
                    }
                }
            }
        }
    }
}

impl ConvBn {
    /// `weight` is [c_out, c_in, k, k] with a square kernel; the BatchNorm's parameters and
    /// running statistics come from `bn_vb` (`weight`, `bias`, `running_mean`, `running_var`).
    pub(crate) fn new(weight: Tensor, stride: usize, bn_vb: VarBuilder) -> Result<Self> {
        let (c_out, _, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            candle_core::bail!(
                "ConvBn needs a square kernel and a positive stride, got {:?} and stride {stride}",
                weight.dims()
            );
        }
        let cfg = BatchNormConfig {
            eps: BN_EPS,
            remove_mean: true,
            affine: true,
            momentum: BN_MOMENTUM,
        };
        Ok(Self {
            weight,
            bn: candle_nn::batch_norm(c_out, cfg, bn_vb)?,
            k,
            stride,
        })
    }

    /// BatchNorm uses batch statistics and updates its running statistics when `train`.
    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, false)
    }

    /// `relu(self.forward_t(x, train))`; on the fused CPU path the ReLU runs inside the
    /// BatchNorm op (see [`super::bn::forward_train_relu`]) or the folded shift.
    pub(crate) fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_then(x, train, true)
    }

    /// conv + BatchNorm, then ReLU if `relu`. Eval mode folds BatchNorm: conv(x, w·s) + shift,
    /// the shift (and ReLU) one op on the fused CPU path (see [`super::channel::shift`]).
    fn forward_then(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if train {
            let y = super::conv::conv2d(x, &self.weight, self.k / 2, self.stride)?;
            return if relu {
                super::bn::forward_train_relu(&self.bn, &y)
            } else {
                super::bn::forward_train(&self.bn, &y)
            };
        }
        // In the input's dtype: the generic path runs bf16 models as candle bf16 tensors.
        let (w, shift) = self.folded()?;
        let (w, shift) = (w.to_dtype(x.dtype())?, shift.to_dtype(x.dtype())?);
        let y = super::conv::conv2d(x, &w, self.k / 2, self.stride)?;
        super::channel::shift(&y, &shift, relu)
    }

    /// Eval mode folds BatchNorm into the convolution: weight w·s and bias β − μ·s with
    /// s = γ/√(σ²+ε), saving three passes over the activations. It is recomputed on each call
    /// (a few thousand weights), so it always reflects the current parameters, and gradients
    /// still reach γ, β and w through it.
    pub(crate) fn folded(&self) -> Result<(Tensor, Tensor)> {
        let (gamma, beta) = self.affine()?;
        let mean = self.bn.running_mean().detach();
        let var = self.bn.running_var().detach();
        let scale = (gamma / (var + self.bn.eps())?.sqrt()?)?;
        let shift = (beta - (mean * &scale)?)?;
        let c = scale.dim(0)?;
        let w = self.weight.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        Ok((w, shift))
    }

    /// The folded layer for the fused paths, its weight a GEMM operand in `precision`,
    /// detached from autograd.
    pub(crate) fn fused(&self, precision: Precision) -> Result<FoldedConv> {
        let (w, shift) = self.folded()?;
        let (c_out, c_in, kh, kw) = w.dims4()?;
        Ok(FoldedConv {
            weight: GemmWeight::new(
                w.detach().flatten_all()?.to_vec1()?,
                c_out,
                c_in * kh * kw,
                precision,
            ),
            bias: shift.detach().to_vec1()?,
            c_in,
            c_out,
            k: self.k,
            stride: self.stride,
        })
    }

    /// The weight, BatchNorm and stride, as the fused residual block ([`super::block`]) reads
    /// them.
    pub(crate) fn parts(&self) -> (&Tensor, &BatchNorm, usize) {
        (&self.weight, &self.bn, self.stride)
    }

    fn affine(&self) -> Result<(&Tensor, &Tensor)> {
        match self.bn.weight_and_bias() {
            Some(gb) => Ok(gb),
            None => candle_core::bail!("ConvBn is built with an affine BatchNorm"),
        }
    }

    /// Whether autograd tracks any trained parameter (running statistics never are).
    pub(crate) fn tracks_grad(&self) -> bool {
        let affine = self.bn.weight_and_bias();
        self.weight.track_op() || affine.is_some_and(|(g, b)| g.track_op() || b.track_op())
    }

    pub(crate) fn detached(&self) -> Result<Self> {
        let (gamma, beta) = self.affine()?;
        let bn = BatchNorm::new(
            gamma.dim(0)?,
            self.bn.running_mean().detach(),
            self.bn.running_var().detach(),
            gamma.detach(),
            beta.detach(),
            self.bn.eps(),
        )?;
        Ok(Self {
            weight: self.weight.detach(),
            bn,
            k: self.k,
            stride: self.stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-copy im2col of same-size convolutions equals the row-by-row one for every row,
    /// and so do its blocks of output rows, including kernels larger than the image and
    /// planes of one row or column.
    #[test]
    fn shifted_im2col_rows_equal_the_row_by_row_ones() {
        for (k, h, w, c_in, g) in [
            (3, 32, 32, 2, 2),
            (3, 8, 8, 3, 1),
            (5, 6, 7, 2, 3),
            (7, 2, 3, 1, 2),
            (3, 1, 1, 1, 1),
            (9, 3, 1, 2, 1),
            (3, 1, 5, 1, 2),
        ] {
            let conv = FoldedConv {
                weight: GemmWeight::new(vec![0.0; c_in * k * k], 1, c_in * k * k, Precision::F32),
                bias: vec![0.0],
                c_in,
                c_out: 1,
                k,
                stride: 1,
            };
            let x: Vec<f32> = (0..c_in * g * h * w).map(|i| i as f32 + 1.0).collect();
            let kk = c_in * k * k;
            let n = g * h * w;
            let mut slow = vec![f32::NAN; kk * n];
            for (r, row) in slow.chunks_exact_mut(n).enumerate() {
                let mut fast = vec![f32::NAN; n];
                conv.im2col_row(&x, g, (h, w), r, &mut fast);
                conv.im2col_row_strided(&x, g, (h, w), r, row);
                assert_eq!(fast, row, "k {k}, {h}×{w}, row {r}");
            }
            for gi in 0..g {
                for y0 in 0..h {
                    for y1 in y0 + 1..=h {
                        let nb = (y1 - y0) * w;
                        let mut block = vec![f32::NAN; kk * nb];
                        conv.im2col_block(&x, g, (h, w), gi, (y0, y1), &mut block);
                        let j0 = gi * h * w + y0 * w;
                        for (r, got) in block.chunks_exact(nb).enumerate() {
                            assert_eq!(got, &slow[r * n + j0..][..nb], "k {k}, rows {y0}..{y1}");
                        }
                    }
                }
            }
        }
    }

    /// The blocked f32 convolution equals a direct sum over the kernel, for blocks from one
    /// output row to the whole plane.
    #[test]
    fn blocked_convolution_matches_the_direct_sum() {
        let (c_in, c_out, k, h, w, g) = (3, 4, 3, 9, 7, 2);
        let weights: Vec<f32> = (0..c_out * c_in * k * k)
            .map(|i| ((i * 7919) % 23) as f32 / 23.0 - 0.5)
            .collect();
        let conv = FoldedConv {
            weight: GemmWeight::new(weights.clone(), c_out, c_in * k * k, Precision::F32),
            bias: vec![0.0; c_out],
            c_in,
            c_out,
            k,
            stride: 1,
        };
        let x: Vec<f32> = (0..c_in * g * h * w)
            .map(|i| ((i * 104729) % 31) as f32 / 31.0)
            .collect();
        let mut want = vec![0.0f32; c_out * g * h * w];
        for co in 0..c_out {
            for gi in 0..g {
                for y in 0..h {
                    for xx in 0..w {
                        let mut acc = 0.0f64;
                        for ci in 0..c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = y as isize + ky as isize - 1;
                                    let ix = xx as isize + kx as isize - 1;
                                    if (0..h as isize).contains(&iy)
                                        && (0..w as isize).contains(&ix)
                                    {
                                        let v = x
                                            [(ci * g + gi) * h * w + iy as usize * w + ix as usize];
                                        let wt = weights[((co * c_in + ci) * k + ky) * k + kx];
                                        acc += f64::from(wt) * f64::from(v);
                                    }
                                }
                            }
                        }
                        want[(co * g + gi) * h * w + y * w + xx] = acc as f32;
                    }
                }
            }
        }
        // Blocks of 1, 2, 4 and 9 (all) output rows, the default size, and `accumulate`.
        for block_values in [1, 2 * 27 * 7, 4 * 27 * 7, 1 << 20, BLOCK_VALUES] {
            let mut got = vec![0.0f32; want.len()];
            conv.accumulate_blocked(&x, g, (h, w), &mut got, block_values);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}, block {block_values}");
            }
        }
        let mut got = vec![0.0f32; want.len()];
        conv.accumulate(&x, g, (h, w), &mut got);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
