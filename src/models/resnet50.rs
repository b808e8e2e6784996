//! torchvision's ResNet with Bottleneck blocks (ResNet-50: [3, 4, 6, 3]) under its parameter
//! names, so torchvision checkpoints (and Cohen's / SmoothAdv's released ImageNet models, which
//! are torchvision ResNet-50s) load as they are.
//!
//! 7×7/2 stem conv + BN + ReLU, 3×3/2 max-pool (padding 1), four stages of Bottlenecks
//! (1×1 → 3×3 → 1×1 ×4 expansion, widths 64/128/256/512, the stride on the 3×3 conv as in
//! torchvision ≥ 0.2, "v1.5"), a 1×1 conv + BN projection (`downsample.0/1`) where the shape
//! changes, global average pooling, `fc` (2048 → classes). Input normalisation (ImageNet's by
//! default) is the model's first op, so noise and radii stay in [0,1] pixel units.
//!
//! Names: `conv1.weight`, `bn1.*`, `layer{s}.{i}.conv{1,2,3}.weight`, `layer{s}.{i}.bn{1,2,3}.*`,
//! `layer{s}.{i}.downsample.{0.weight,1.*}`, `fc.{weight,bias}`.
//!
//! Convolutions run caf's im2col + GEMM kernel on the CPU (BatchNorm folded in eval mode) and
//! candle's own `conv2d` elsewhere; the max-pool is candle's.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::convbn::ConvBn;
use super::relu::add_relu;
use super::resnet::{check_input, InputNorm};
use super::{Classifier, Normalize};

/// Bottleneck output = `planes` × this.
const EXPANSION: usize = 4;

/// Bottlenecks per stage of ResNet-50.
pub const RESNET50_LAYERS: [usize; 4] = [3, 4, 6, 3];

fn conv_bn(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
) -> Result<ConvBn> {
    let w = vb.pp(conv).get((c_out, c_in, k, k), "weight")?;
    ConvBn::new(w, stride, vb.pp(bn))
}

#[derive(Clone, Debug)]
struct Bottleneck {
    a: ConvBn,
    b: ConvBn,
    c: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn new(in_planes: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = planes * EXPANSION;
        let downsample = (stride != 1 || in_planes != out)
            .then(|| {
                conv_bn(
                    in_planes,
                    out,
                    1,
                    stride,
                    &vb,
                    "downsample.0",
                    "downsample.1",
                )
            })
            .transpose()?;
        Ok(Self {
            a: conv_bn(in_planes, planes, 1, 1, &vb, "conv1", "bn1")?,
            b: conv_bn(planes, planes, 3, stride, &vb, "conv2", "bn2")?,
            c: conv_bn(planes, out, 1, 1, &vb, "conv3", "bn3")?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.a.forward_relu_t(x, train)?;
        let h = self.b.forward_relu_t(&h, train)?;
        let h = self.c.forward_t(&h, train)?;
        let short = match &self.downsample {
            Some(d) => d.forward_t(x, train)?,
            None => x.clone(),
        };
        add_relu(&h, &short)
    }

    fn detached(&self) -> Result<Self> {
        Ok(Self {
            a: self.a.detached()?,
            b: self.b.detached()?,
            c: self.c.detached()?,
            downsample: self.downsample.as_ref().map(ConvBn::detached).transpose()?,
        })
    }
}

/// torchvision's Bottleneck ResNet with its input normalisation; input [B, 3, H, W] in [0,1].
#[derive(Clone, Debug)]
pub struct TvResNet {
    norm: InputNorm,
    stem: ConvBn,
    blocks: Vec<Bottleneck>,
    fc: Linear,
    layers: [usize; 4],
    num_classes: usize,
}

impl TvResNet {
    /// `layers`: Bottlenecks per stage ([`RESNET50_LAYERS`] for ResNet-50).
    pub fn new(
        layers: [usize; 4],
        num_classes: usize,
        normalize: Normalize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if layers.contains(&0) || layers.iter().any(|&n| n > 64) {
            candle_core::bail!("Bottlenecks per stage must be in 1..=64, got {layers:?}");
        }
        if num_classes == 0 {
            candle_core::bail!("a classifier needs at least one class");
        }
        let norm = InputNorm::new(normalize, vb.device())?;
        let stem = conv_bn(3, 64, 7, 2, &vb, "conv1", "bn1")?;
        let mut blocks = Vec::new();
        let mut in_planes = 64;
        for (stage, (&planes, &n)) in [64usize, 128, 256, 512].iter().zip(&layers).enumerate() {
            let lvb = vb.pp(format!("layer{}", stage + 1));
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(in_planes, planes, stride, lvb.pp(i))?);
                in_planes = planes * EXPANSION;
            }
        }
        let fc = candle_nn::linear(in_planes, num_classes, vb.pp("fc"))?;
        Ok(Self {
            norm,
            stem,
            blocks,
            fc,
            layers,
            num_classes,
        })
    }

    pub fn layers(&self) -> [usize; 4] {
        self.layers
    }

    pub fn normalize(&self) -> Normalize {
        self.norm.normalize
    }

    /// Width of φ(x): 2048.
    pub fn feature_dim(&self) -> usize {
        512 * EXPANSION
    }

    /// φ(x): [B, 2048] after global average pooling; BatchNorm in eval mode unless `train`.
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(x)?;
        let h = self.stem.forward_relu_t(&self.norm.forward(x)?, train)?;
        // Max-pool 3×3/2 with padding 1: after the ReLU every value is ≥ 0, so zero padding
        // selects exactly what PyTorch's −∞ padding does.
        let mut h = h.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        h = h.max_pool2d_with_stride(3, 2)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        h.flatten_from(2)?.mean(2)
    }

    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.features_t(x, false)
    }

    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.fc.forward(features)
    }

    pub fn tracks_grad(&self) -> bool {
        self.stem.tracks_grad()
            || self.blocks.iter().any(|b| {
                b.a.tracks_grad()
                    || b.b.tracks_grad()
                    || b.c.tracks_grad()
                    || b.downsample.as_ref().is_some_and(ConvBn::tracks_grad)
            })
            || self.fc.weight().track_op()
    }

    /// A copy with every parameter detached from autograd (sharing storage).
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            norm: self.norm.clone(),
            stem: self.stem.detached()?,
            blocks: self
                .blocks
                .iter()
                .map(Bottleneck::detached)
                .collect::<Result<_>>()?,
            fc: Linear::new(
                self.fc.weight().detach(),
                self.fc.bias().map(Tensor::detach),
            ),
            layers: self.layers,
            num_classes: self.num_classes,
        })
    }
}

impl ModuleT for TvResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.head(&self.features_t(x, train)?)
    }
}

impl Classifier for TvResNet {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
}
