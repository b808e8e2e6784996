//! He et al. (2016)'s CIFAR ResNet, in akamaster/pytorch_resnet_cifar10's exact form.
//!
//! conv3x3(3→16)+BN+ReLU; three stages of n BasicBlocks (widths 16/32/64; the first block of
//! stages 2 and 3 has stride 2); global average pooling; linear(64→classes). depth = 6n + 2.
//! Shortcuts are "option A": where the shape changes, `x[:, :, ::2, ::2]` zero-padded with
//! planes/4 channels on each side, so the network has no projection parameters.
//!
//! Parameter names follow the PyTorch module tree (`conv1.weight`, `bn1.running_mean`,
//! `layer2.0.conv1.weight`, `linear.bias`, …), so one constructor serves loading a checkpoint
//! (VarBuilder over a tensor map) and training (VarBuilder over a VarMap).

use candle_core::{DType, Module, ModuleT, Result, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder};

use super::convbn::ConvBn;
use super::precision::Precision;
use super::relu::{add_relu, relu};
use super::resnet_eval::{FoldedBlock, FoldedResNet};
use super::{Classifier, ModelError, Normalize};

/// Width of the penultimate features φ(x).
pub const FEATURE_DIM: usize = 64;

/// Input normalisation as the model's first op, so callers work in [0,1] pixel space.
#[derive(Clone, Debug)]
pub(crate) struct InputNorm {
    pub(crate) normalize: Normalize,
    /// `None` for the identity, which then costs nothing.
    mean_std: Option<(Tensor, Tensor)>,
}

impl InputNorm {
    pub(crate) fn new(n: Normalize, device: &candle_core::Device) -> Result<Self> {
        if n.std.iter().any(|&s| !(s.is_finite() && s > 0.0))
            || n.mean.iter().any(|m| !m.is_finite())
        {
            candle_core::bail!("normalisation needs finite means and positive stds, got {n:?}");
        }
        if n == Normalize::IDENTITY {
            return Ok(Self {
                normalize: n,
                mean_std: None,
            });
        }
        let mean = Tensor::new(&n.mean, device)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&n.std, device)?.reshape((1, 3, 1, 1))?;
        Ok(Self {
            normalize: n,
            mean_std: Some((mean, std)),
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.mean_std {
            // Subtract-then-divide, as torchvision does, to agree with PyTorch to the last bit.
            Some((mean, std)) => x.broadcast_sub(mean)?.broadcast_div(std),
            None => Ok(x.clone()),
        }
    }
}

/// Checks the input is [B, 3, H, W] f32 before anything else sees it.
pub(crate) fn check_input(x: &Tensor) -> Result<()> {
    match x.dims() {
        [_, 3, h, w] if *h > 0 && *w > 0 && x.dtype() == DType::F32 => Ok(()),
        dims => candle_core::bail!(
            "classifier input must be an f32 [B, 3, H, W] tensor, got {:?} {dims:?}",
            x.dtype()
        ),
    }
}

/// A bias-free 3×3 convolution (PyTorch's default init) followed by BatchNorm, under the
/// PyTorch names `{conv}.weight` and `{bn}.*`.
fn conv_bn(
    c_in: usize,
    c_out: usize,
    stride: usize,
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
) -> Result<ConvBn> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    let conv = candle_nn::conv2d_no_bias(c_in, c_out, 3, cfg, vb.pp(conv))?;
    ConvBn::new(conv.weight().clone(), stride, vb.pp(bn))
}

#[derive(Clone, Debug)]
pub struct BasicBlock {
    pub(crate) a: ConvBn,
    pub(crate) b: ConvBn,
    /// Channels to zero-pad on each side where the shortcut changes shape (option A).
    pub(crate) shortcut_pad: Option<usize>,
}

impl BasicBlock {
    pub fn new(in_planes: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let a = conv_bn(in_planes, planes, stride, &vb, "conv1", "bn1")?;
        let b = conv_bn(planes, planes, 1, &vb, "conv2", "bn2")?;
        let shortcut_pad = (stride != 1 || in_planes != planes).then_some(planes / 4);
        Ok(Self { a, b, shortcut_pad })
    }

    /// The block as a chain of separate ops (convolution, BatchNorm, shortcut, add + ReLU).
    pub(crate) fn forward_ops(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.a.forward_relu_t(x, train)?;
        let out = self.b.forward_t(&out, train)?;
        let short = match self.shortcut_pad {
            Some(pad) => super::shortcut::option_a(x, pad)?,
            None => x.clone(),
        };
        add_relu(&out, &short)
    }
}

impl ModuleT for BasicBlock {
    /// On the CPU the block is one op (see [`super::block`]), the same values and gradients as
    /// [`forward_ops`](Self::forward_ops) without five of its six graph nodes.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let layers = (&self.a, &self.b);
        if let Some(y) = super::block::forward(x, layers, self.shortcut_pad, train)? {
            return Ok(y);
        }
        self.forward_ops(x, train)
    }
}

/// The CIFAR ResNet with its input normalisation; input [B, 3, 32, 32] in [0,1].
#[derive(Clone, Debug)]
pub struct CifarResNet {
    norm: InputNorm,
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    linear: Linear,
    depth: usize,
    num_classes: usize,
    /// The arithmetic of the fused CPU inference path (training and autograd are always f32).
    precision: Precision,
}

impl CifarResNet {
    /// Builds the network with parameters from `vb` (PyTorch names, see the module docs).
    pub fn new(
        depth: usize,
        num_classes: usize,
        normalize: Normalize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            candle_core::bail!("CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}");
        }
        if num_classes == 0 {
            candle_core::bail!("a classifier needs at least one class");
        }
        let n = (depth - 2) / 6;
        let norm = InputNorm::new(normalize, vb.device())?;
        let stem = conv_bn(3, 16, 1, &vb, "conv1", "bn1")?;
        let mut blocks = Vec::with_capacity(3 * n);
        let mut in_planes = 16;
        for (stage, planes) in [16usize, 32, 64].into_iter().enumerate() {
            let layer = vb.pp(format!("layer{}", stage + 1));
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(
                    in_planes,
                    planes,
                    stride,
                    layer.pp(i.to_string()),
                )?);
                in_planes = planes;
            }
        }
        let linear = candle_nn::linear(FEATURE_DIM, num_classes, vb.pp("linear"))?;
        Ok(Self {
            norm,
            stem,
            blocks,
            linear,
            depth,
            num_classes,
            precision: Precision::F32,
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The input normalisation the network applies first (an adapter reading the same
    /// pixels normalises them the same way).
    pub fn normalize(&self) -> Normalize {
        self.norm.normalize
    }

    /// Penultimate features φ(x): [B, 64] after global average pooling.
    ///
    /// Eval mode on the CPU runs the fused inference path (see `resnet_eval.rs`) when nothing needs
    /// gradients: neither the input nor the parameters are tracked by autograd (weights loaded
    /// from a file are not; a VarMap's are, see [`CifarResNet::detached`]). Everything else
    /// runs candle's differentiable ops.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(x)?;
        let no_grad = !train && !x.track_op() && !self.tracks_grad();
        if no_grad && super::path::fused(x.device()) {
            return self.features_fast(x);
        }
        if no_grad {
            check_generic_precision(self.precision)?;
        }
        if no_grad && self.precision == Precision::Bf16 {
            return self.features_candle_bf16(x);
        }
        self.features_candle(x, train)
    }

    /// Eval-mode φ(x) with candle's ops in bf16 (the generic path's bf16, e.g. on CUDA): the
    /// input is normalised in f32 and rounded once, every convolution, BatchNorm shift and ReLU
    /// runs on bf16 tensors, and the pooled features come back as f32 for the f32 head.
    fn features_candle_bf16(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?.to_dtype(DType::BF16)?;
        let mut h = relu(&self.stem.forward_t(&x, false)?)?;
        for block in &self.blocks {
            h = block.forward_t(&h, false)?;
        }
        h.to_dtype(DType::F32)?.flatten_from(2)?.mean(2)
    }

    /// The arithmetic of the fused CPU inference path (eval mode, untracked CPU inputs).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Runs eval-mode inference in `precision` from now on: the fused CPU path, or candle's bf16
    /// tensors on the generic path (other devices); training and autograd stay f32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// Whether autograd tracks any trained parameter of the network.
    pub fn tracks_grad(&self) -> bool {
        self.stem.tracks_grad()
            || self
                .blocks
                .iter()
                .any(|b| b.a.tracks_grad() || b.b.tracks_grad())
            || self.linear.weight().track_op()
            || self.linear.bias().is_some_and(Tensor::track_op)
    }

    /// A copy whose parameters are detached from autograd (sharing their storage), e.g. to
    /// certify a network trained in this process through the fused CPU path.
    pub fn detached(&self) -> Result<Self> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(BasicBlock {
                    a: b.a.detached()?,
                    b: b.b.detached()?,
                    shortcut_pad: b.shortcut_pad,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: self.norm.clone(),
            stem: self.stem.detached()?,
            blocks,
            linear: Linear::new(
                self.linear.weight().detach(),
                self.linear.bias().map(Tensor::detach),
            ),
            depth: self.depth,
            num_classes: self.num_classes,
            precision: self.precision,
        })
    }

    fn features_fast(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let feats = self.folded()?.features(&input, b, h, w);
        Tensor::from_vec(feats, (b, FEATURE_DIM), x.device())
    }

    /// The network with BatchNorm folded, for the fused CPU path.
    pub(crate) fn folded(&self) -> Result<FoldedResNet> {
        Ok(FoldedResNet {
            normalize: self.norm.normalize,
            stem: self.stem.fused(self.precision)?,
            blocks: self
                .blocks
                .iter()
                .map(|blk| {
                    Ok(FoldedBlock {
                        a: blk.a.fused(self.precision)?,
                        b: blk.b.fused(self.precision)?,
                        shortcut_pad: blk.shortcut_pad,
                    })
                })
                .collect::<Result<_>>()?,
            feature_dim: FEATURE_DIM,
        })
    }

    /// φ(x) through candle's ops only: the path for training and non-CPU devices, and the
    /// reference the fused path is tested against.
    pub(crate) fn features_candle(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(x)?;
        let h = self.stem.forward_relu_t(&self.norm.forward(x)?, train)?;
        self.trunk(&h, train)?.flatten_from(2)?.mean(2)
    }

    /// The residual blocks on the stem's output: on the CPU one op (see [`super::trunk`]), else
    /// block by block.
    fn trunk(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        if let Some(y) = super::trunk::forward(h, &self.blocks, train)? {
            return Ok(y);
        }
        self.blocks_one_by_one(h, train)
    }

    /// The residual blocks, in order.
    #[cfg(test)]
    pub(crate) fn blocks(&self) -> &[BasicBlock] {
        &self.blocks
    }

    /// The residual blocks as separate ops (each one op on the CPU, see [`super::block`]).
    pub(crate) fn blocks_one_by_one(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = h.clone();
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        Ok(h)
    }

    /// φ(x) in eval mode.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.features_t(x, false)
    }

    /// The final linear layer: logits [B, classes] from features [B, 64].
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.linear.forward(features)
    }
}

impl ModuleT for CifarResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head(&self.features_t(x, train)?)
    }
}

impl Classifier for CifarResNet {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        CifarResNet::set_precision(self, precision);
        Ok(())
    }
}

/// Whether eval mode can run `precision` on candle's generic ops (another device than the CPU,
/// or `CAF_GENERIC_PATH`): int8 exists on the fused CPU path only, and silently running f32
/// instead would certify another classifier than the job names.
pub(crate) fn check_generic_precision(precision: Precision) -> Result<()> {
    if precision == Precision::Int8 {
        candle_core::bail!(
            "precision int8 runs on the fused CPU path only (not on a GPU, nor under \
             CAF_GENERIC_PATH); use f32 or bf16 there"
        )
    }
    Ok(())
}
