//! A bias-free square convolution followed by BatchNorm: the building block of both the CIFAR
//! ResNets and the adapters. Train mode runs caf's convolution kernel and the fused train-mode
//! BatchNorm; eval mode folds BatchNorm into the convolution; the fused CPU paths take the folded
//! weights as a GEMM operand.

use candle_core::{Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, VarBuilder};

use super::gemm::{GemmWeight, Precision};

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

/// The eval-mode layer as the fused paths use it: y = W·im2col(x) + bias.
pub(crate) struct FoldedParts {
    /// [c_out × c_in·k·k].
    pub weight: GemmWeight,
    pub bias: Vec<f32>,
    pub c_in: usize,
    pub c_out: usize,
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

    pub(crate) fn k(&self) -> usize {
        self.k
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// BatchNorm uses batch statistics and updates its running statistics when `train`.
    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            let y = super::conv::conv2d(x, &self.weight, self.k / 2, self.stride)?;
            return super::bn::forward_train(&self.bn, &y);
        }
        let (w, shift) = self.folded()?;
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

    /// The folded layer as a GEMM operand in `precision`, detached from autograd.
    pub(crate) fn folded_parts(&self, precision: Precision) -> Result<FoldedParts> {
        let (w, shift) = self.folded()?;
        let (c_out, c_in, kh, kw) = w.dims4()?;
        Ok(FoldedParts {
            weight: GemmWeight::new(
                w.detach().flatten_all()?.to_vec1()?,
                c_out,
                c_in * kh * kw,
                precision,
            ),
            bias: shift.detach().to_vec1()?,
            c_in,
            c_out,
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
