//! A bias-free square convolution followed by BatchNorm: the building block of both the CIFAR
//! ResNets and the adapters. Train mode runs caf's convolution kernel and the fused train-mode
//! BatchNorm; eval mode folds BatchNorm into the convolution; the fused CPU paths take the folded
//! weights as a GEMM operand.

use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder};

use super::gemm::GemmWeight;
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
        out.resize(self.c_out * plane, 0.0);
        for (o, &b) in out.chunks_exact_mut(plane).zip(&self.bias) {
            o.fill(b);
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
        let (ho, wo) = self.out_size((h, w));
        let n = g * ho * wo;
        if self.k == 1 && self.stride == 1 {
            // A 1×1 convolution at stride 1 reads the activations as they are.
            return self.weight.accumulate(n, x, out);
        }
        self.weight
            .accumulate_rows(n, |r, dst| self.im2col_row(x, g, (h, w), r, dst), out);
    }

    /// Row `r` = (c, ky, kx) of the im2col matrix: input channel c shifted by (ky − p, kx − p)
    /// and subsampled by the stride, for every image and output position (zero outside).
    fn im2col_row(&self, x: &[f32], g: usize, (h, w): (usize, usize), r: usize, dst: &mut [f32]) {
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
        if train {
            let y = super::conv::conv2d(x, &self.weight, self.k / 2, self.stride)?;
            return super::bn::forward_train(&self.bn, &y);
        }
        // In the input's dtype: the generic path runs bf16 models as candle bf16 tensors.
        let (w, shift) = self.folded()?;
        let (w, shift) = (w.to_dtype(x.dtype())?, shift.to_dtype(x.dtype())?);
        let y = super::conv::conv2d(x, &w, self.k / 2, self.stride)?;
        y.broadcast_add(&shift.reshape((1, shift.dim(0)?, 1, 1))?)
    }

    /// Eval mode folds BatchNorm into the convolution: weight w·s and bias β − μ·s with
    /// s = γ/√(σ²+ε), saving three passes over the activations. It is recomputed on each call
    /// (a few thousand weights), so it always reflects the current parameters, and gradients
    /// still reach γ, β and w through it.
    fn folded(&self) -> Result<(Tensor, Tensor)> {
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
