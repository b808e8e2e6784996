//! Certifying adapters a(·) (CAF, arXiv 2405.16036): a second network that reads the same
//! noisy image as the frozen backbone φ and outputs a vector of φ's feature width d, added to
//! φ(x) before a new linear head (see [`super::caf`]).
//!
//! Two families, both normalising their `[0,1]` input like the backbone does:
//! - [`AdapterArch::ResNet18`]: the CIFAR ResNet-18 of the authors' released `resnet.py`
//!   (kuangliu's form): 3×3 stem conv + BN + ReLU, four stages of BasicBlocks with strides
//!   1, 2, 2, 2 and widths 64/128/256/512 times `width`, 1×1 conv + BN projection shortcuts
//!   where the shape changes, global average pooling, linear to d.
//! - [`AdapterArch::SmallCnn`]: `depth` conv3×3 + BN + ReLU layers, the first at stride 1 with
//!   `width` channels, each of the next three at stride 2 doubling the channels, later ones at
//!   stride 1; global average pooling, linear to d. A cheap ablation.
//!
//! - [`AdapterArch::Vit`]: a few transformer blocks on patches (the sensitivity study's other
//!   adapter *type*): a `patch`×`patch` patch embedding of width `dim`, MAE's fixed 2-D
//!   sine-cosine position embedding (no parameter tied to an image size), `depth` pre-norm
//!   blocks exactly as the ViT backbones' (`heads` heads, MLP ratio 4, erf GELU), a final
//!   LayerNorm, the mean over tokens, linear to d. Names as timm's (`patch_embed.proj.*`,
//!   `blocks.{i}.attn.qkv.*`, …, `norm.*`) and `linear.*`.
//!
//! Parameter names follow the PyTorch module tree of `resnet.py` (`conv1.weight`,
//! `layer2.0.shortcut.0.weight`, `layer2.0.shortcut.1.running_mean`, `linear.bias`, …) so the
//! released code's adapters could be loaded; the small CNN uses `layers.{i}.conv.weight`,
//! `layers.{i}.bn.*`, `linear.*`.
//!
//! # Initialisation
//! Convolutions and BatchNorm use PyTorch's defaults, as the released code did (it never
//! re-initialises): conv weights U(±1/√fan_in) (kaiming_uniform with a = √5), BN γ = 1, β = 0.
//! The final linear layer starts at **zero** (weight and bias), so a(x) = 0 at step 0 and
//! training starts from exactly "new head on frozen φ": the adapter's contribution grows from
//! nothing instead of adding a random vector of the same size as φ's features on the first
//! steps. Every adapter parameter still learns from step 1: the last layer's gradient is
//! g·pooledᵀ ≠ 0, and once it is non-zero the gradient reaches the layers below.
//!
//! # Cost
//! [`cost`] gives parameters and FLOPs per 32×32 image analytically (FLOPs = 2 × multiply-adds
//! of the convolutions and linear layers; BatchNorm is folded at inference, ReLU, additions and
//! pooling are not counted). For comparison, [`cifar_resnet_cost`] gives the same for the
//! backbones. With d = 64 and 10 classes:
//!
//! | model                                       | params     | MFLOPs / image |
//! |---------------------------------------------|-----------:|---------------:|
//! | ResNet-20 backbone                          | 269,722    | 81.1    |
//! | ResNet-110 backbone                         | 1,727,962  | 505.8   |
//! | adapter ResNet-18 ×1 (paper)                | 11,201,664 | 1,110.9 |
//! | adapter ResNet-18 ×0.25                     | 708,432    | 70.1    |
//! | **adapter ResNet-18 ×0.125 (CPU default)**  | 179,912    | 17.8    |
//! | adapter SmallCnn 32×3                       | 101,728    | 20.7    |
//!
//! (params count trained parameters, BatchNorm's γ/β included, running statistics not.)
//! The CPU default ([`AdapterArch::CPU_DEFAULT`]) keeps the paper's topology at 1/8 width:
//! 0.67× ResNet-20's parameters and 0.22× its FLOPs, so a CAF model over ResNet-20 costs about
//! 1.2× the backbone alone at certification time.
//!
//! # Inference
//! Eval mode on the CPU, when autograd tracks nothing, runs a fused path like the backbone's
//! (`resnet_eval.rs`): BatchNorm folded into the convolutions, each convolution as im2col + one GEMM,
//! rayon over images with each image's activations kept in one thread's cache. Training and
//! other devices use candle's differentiable ops.

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use rayon::prelude::*;

use super::convbn::{conv_out, ConvBn, FoldedConv};
use super::precision::Precision;
use super::relu::{add_relu, relu_in_place};
use super::resnet::{check_input, InputNorm};
use super::vit::VitEncoder;
use super::{ModelError, Normalize};

/// Bounds that keep a typo in a spec from allocating gigabytes.
const MAX_RESNET_WIDTH: f64 = 8.0;
const MAX_STAGE_DEPTH: usize = 64;
const MAX_CNN_WIDTH: usize = 1024;
const MAX_CNN_DEPTH: usize = 64;

/// Downsampling layers of the small CNN (32 → 16 → 8 → 4); deeper layers keep the size.
const CNN_STRIDED_LAYERS: usize = 3;

fn paper_depths() -> [usize; 4] {
    [2, 2, 2, 2]
}

/// An adapter architecture. Spec strings ([`FromStr`] / [`fmt::Display`]):
/// `resnet18` (the paper's), `resnet18:<width>`, `resnet18:<width>:<d1>,<d2>,<d3>,<d4>`,
/// `cnn:<width>:<depth>`, and `default` for [`AdapterArch::CPU_DEFAULT`]. As serde, a tagged
/// object: `{"kind": "resnet18", "width": 0.125}` (depths default to 2,2,2,2) or
/// `{"kind": "small_cnn", "width": 32, "depth": 3}`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum AdapterArch {
    /// CIFAR ResNet-18; `width` multiplies the channel counts 64/64/128/256/512 (stem, stages),
    /// each rounded and at least 1; `depths` are the BasicBlocks per stage (paper: 2,2,2,2).
    #[serde(rename = "resnet18")]
    ResNet18 {
        width: f64,
        #[serde(default = "paper_depths")]
        depths: [usize; 4],
    },
    /// `depth` conv-BN-ReLU layers starting at `width` channels (see the module docs).
    #[serde(rename = "small_cnn")]
    SmallCnn { width: usize, depth: usize },
    /// `depth` transformer blocks of width `dim` on `patch`×`patch` patches (module docs).
    #[serde(rename = "vit")]
    Vit {
        dim: usize,
        depth: usize,
        patch: usize,
        heads: usize,
    },
}

/// Heads of a ViT adapter when the spec names none: one per 32 channels (timm's ViTs have 64
/// per head; narrower adapters keep more heads), at least one, dividing `dim`.
pub fn default_vit_heads(dim: usize) -> usize {
    (1..=(dim / 32).max(1))
        .rev()
        .find(|h| dim.is_multiple_of(*h))
        .unwrap_or(1)
}

impl AdapterArch {
    /// The released code's adapter: full-width ResNet-18 (11.2 M parameters, 1.1 GFLOPs per
    /// image).
    pub const PAPER: AdapterArch = AdapterArch::ResNet18 {
        width: 1.0,
        depths: [2, 2, 2, 2],
    };

    /// The default for CPU runs: the paper's topology at 1/8 width (stem and stages
    /// 8/8/16/32/64 channels), 179,912 parameters and 17.8 MFLOPs per image, against
    /// ResNet-20's 269,722 and 81.1 (see the module docs' table).
    pub const CPU_DEFAULT: AdapterArch = AdapterArch::ResNet18 {
        width: 0.125,
        depths: [2, 2, 2, 2],
    };

    /// Checks the numbers are usable; the constructors and [`cost`] call it.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let bad = |message: String| {
            Err(ModelError::Invalid {
                context: format!("adapter {self}"),
                message,
            })
        };
        match *self {
            AdapterArch::ResNet18 { width, depths } => {
                if !(width.is_finite() && width > 0.0 && width <= MAX_RESNET_WIDTH) {
                    return bad(format!(
                        "width must be in (0, {MAX_RESNET_WIDTH}], got {width}"
                    ));
                }
                if depths.iter().any(|&d| d == 0 || d > MAX_STAGE_DEPTH) {
                    return bad(format!(
                        "blocks per stage must be in 1..={MAX_STAGE_DEPTH}, got {depths:?}"
                    ));
                }
            }
            AdapterArch::SmallCnn { width, depth } => {
                if width == 0 || width > MAX_CNN_WIDTH {
                    return bad(format!("width must be in 1..={MAX_CNN_WIDTH}, got {width}"));
                }
                if depth == 0 || depth > MAX_CNN_DEPTH {
                    return bad(format!("depth must be in 1..={MAX_CNN_DEPTH}, got {depth}"));
                }
            }
            AdapterArch::Vit {
                dim,
                depth,
                patch,
                heads,
            } => {
                if dim == 0 || dim > MAX_CNN_WIDTH || !dim.is_multiple_of(4) {
                    return bad(format!(
                        "width must be a multiple of 4 in 4..={MAX_CNN_WIDTH}, got {dim}"
                    ));
                }
                if depth == 0 || depth > MAX_STAGE_DEPTH {
                    return bad(format!(
                        "depth must be in 1..={MAX_STAGE_DEPTH}, got {depth}"
                    ));
                }
                if patch == 0 || patch > 32 || !32usize.is_multiple_of(patch) {
                    return bad(format!(
                        "patch must divide 32 (1, 2, 4, 8, 16, 32), got {patch}"
                    ));
                }
                if heads == 0 || !dim.is_multiple_of(heads) {
                    return bad(format!("{heads} heads do not divide the width {dim}"));
                }
            }
        }
        Ok(())
    }

    /// The layers, in order, with channel counts and strides: what both [`Adapter::new`] and
    /// [`cost`] walk (cost is checked against the built model's tensors in the tests).
    fn plan(&self) -> Vec<PlanUnit> {
        match *self {
            AdapterArch::ResNet18 { width, depths } => {
                let ch = |base: usize| ((base as f64 * width).round() as usize).max(1);
                let stem = ch(64);
                let mut units = vec![PlanUnit::Plain(PlanConv::k3(3, stem, 1))];
                let mut in_planes = stem;
                for (stage, (&base, &n)) in [64usize, 128, 256, 512].iter().zip(&depths).enumerate()
                {
                    let planes = ch(base);
                    for i in 0..n {
                        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                        let shortcut = (stride != 1 || in_planes != planes).then_some(PlanConv {
                            c_in: in_planes,
                            c_out: planes,
                            k: 1,
                            stride,
                        });
                        units.push(PlanUnit::Basic {
                            a: PlanConv::k3(in_planes, planes, stride),
                            b: PlanConv::k3(planes, planes, 1),
                            shortcut,
                        });
                        in_planes = planes;
                    }
                }
                units
            }
            AdapterArch::SmallCnn { width, depth } => {
                let mut units = Vec::with_capacity(depth);
                let mut c_in = 3;
                for i in 0..depth {
                    let doublings = i.min(CNN_STRIDED_LAYERS);
                    let c_out = width << doublings;
                    let stride = if (1..=CNN_STRIDED_LAYERS).contains(&i) {
                        2
                    } else {
                        1
                    };
                    units.push(PlanUnit::Plain(PlanConv::k3(c_in, c_out, stride)));
                    c_in = c_out;
                }
                units
            }
            // No convolutions: see `VitEncoder`.
            AdapterArch::Vit { .. } => Vec::new(),
        }
    }

    /// Channels entering the final linear layer.
    fn pooled_channels(&self) -> usize {
        if let AdapterArch::Vit { dim, .. } = self {
            return *dim;
        }
        match self.plan().last() {
            Some(PlanUnit::Plain(c)) | Some(PlanUnit::Basic { b: c, .. }) => c.c_out,
            None => 3,
        }
    }
}

impl fmt::Display for AdapterArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterArch::ResNet18 { width, depths } => {
                if *width == 1.0 && *depths == paper_depths() {
                    return write!(f, "resnet18");
                }
                write!(f, "resnet18:{width}")?;
                if *depths != paper_depths() {
                    let [a, b, c, d] = depths;
                    write!(f, ":{a},{b},{c},{d}")?;
                }
                Ok(())
            }
            AdapterArch::SmallCnn { width, depth } => write!(f, "cnn:{width}:{depth}"),
            AdapterArch::Vit {
                dim,
                depth,
                patch,
                heads,
            } => {
                write!(f, "vit:{dim}:{depth}:{patch}")?;
                if *heads != default_vit_heads(*dim) {
                    write!(f, ":{heads}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for AdapterArch {
    type Err = ModelError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = |message: String| ModelError::Invalid {
            context: format!("adapter spec `{s}`"),
            message,
        };
        let parts: Vec<&str> = s.trim().split(':').map(str::trim).collect();
        let arch = match parts.as_slice() {
            ["default"] => AdapterArch::CPU_DEFAULT,
            ["resnet18"] => AdapterArch::PAPER,
            ["resnet18", width, rest @ ..] if rest.len() <= 1 => {
                let width: f64 = width
                    .parse()
                    .map_err(|_| bad(format!("width `{width}` is not a number")))?;
                let depths = match rest.first() {
                    None => paper_depths(),
                    Some(list) => {
                        let ds = list
                            .split(',')
                            .map(|d| d.trim().parse::<usize>())
                            .collect::<std::result::Result<Vec<_>, _>>()
                            .map_err(|_| bad(format!("depths `{list}` are not integers")))?;
                        <[usize; 4]>::try_from(ds)
                            .map_err(|ds| bad(format!("need 4 stage depths, got {}", ds.len())))?
                    }
                };
                AdapterArch::ResNet18 { width, depths }
            }
            ["cnn", width, depth] => AdapterArch::SmallCnn {
                width: width
                    .parse()
                    .map_err(|_| bad(format!("width `{width}` is not an integer")))?,
                depth: depth
                    .parse()
                    .map_err(|_| bad(format!("depth `{depth}` is not an integer")))?,
            },
            ["vit", dim, depth, patch, rest @ ..] if rest.len() <= 1 => {
                let int = |what: &str, v: &str| {
                    v.parse::<usize>()
                        .map_err(|_| bad(format!("{what} `{v}` is not an integer")))
                };
                let dim = int("width", dim)?;
                AdapterArch::Vit {
                    dim,
                    depth: int("depth", depth)?,
                    patch: int("patch", patch)?,
                    heads: match rest.first() {
                        Some(h) => int("heads", h)?,
                        None => default_vit_heads(dim),
                    },
                }
            }
            _ => {
                return Err(bad("expected default, resnet18, resnet18:<width>, \
                     resnet18:<width>:<d1>,<d2>,<d3>,<d4>, cnn:<width>:<depth> or \
                     vit:<width>:<depth>:<patch>[:<heads>]"
                    .into()))
            }
        };
        arch.validate()?;
        Ok(arch)
    }
}

/// One convolution of the plan; padding is k / 2 ("same" for odd k at stride 1).
#[derive(Clone, Copy, Debug)]
struct PlanConv {
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
}

impl PlanConv {
    fn k3(c_in: usize, c_out: usize, stride: usize) -> Self {
        Self {
            c_in,
            c_out,
            k: 3,
            stride,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum PlanUnit {
    /// conv + BN + ReLU.
    Plain(PlanConv),
    /// relu(bn(conv_b(relu(bn(conv_a(x))))) + shortcut(x)); identity shortcut when `None`.
    Basic {
        a: PlanConv,
        b: PlanConv,
        shortcut: Option<PlanConv>,
    },
}

/// Size and compute of a network on one 32×32 image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AdapterCost {
    /// Trained parameters: conv and linear weights and biases, BatchNorm γ and β.
    pub params: u64,
    /// BatchNorm running means and variances (saved with the weights, never trained).
    pub buffers: u64,
    /// 2 × multiply-adds of the convolutions and linear layers for one 32×32 image (BatchNorm
    /// folded away; ReLU, residual additions and pooling not counted).
    pub flops_per_image: u64,
}

/// [`AdapterCost`] of `arch` with output width `d`, on a 32×32 image.
pub fn cost(arch: &AdapterArch, d: usize) -> std::result::Result<AdapterCost, ModelError> {
    cost_at(arch, d, 32)
}

/// [`cost`] on a `size`×`size` image (224 for ImageNet): the adapter reads the image itself.
pub fn cost_at(
    arch: &AdapterArch,
    d: usize,
    size: usize,
) -> std::result::Result<AdapterCost, ModelError> {
    arch.validate()?;
    if let AdapterArch::Vit {
        dim, depth, patch, ..
    } = *arch
    {
        let n = ((size / patch) * (size / patch)) as u64;
        let (params, flops) = super::vit::encoder_cost(dim, depth, 4, patch, n, n);
        let mut c = CostSum(AdapterCost {
            params,
            buffers: 0,
            flops_per_image: flops,
        });
        c.linear(dim, d);
        return Ok(c.0);
    }
    let mut c = CostSum::default();
    let mut size = size;
    for unit in arch.plan() {
        match unit {
            PlanUnit::Plain(conv) => size = c.conv_bn(conv, size),
            PlanUnit::Basic { a, b, shortcut } => {
                let out = c.conv_bn(a, size);
                c.conv_bn(b, out);
                if let Some(s) = shortcut {
                    c.conv_bn(s, size);
                }
                size = out;
            }
        }
    }
    c.linear(arch.pooled_channels(), d);
    Ok(c.0)
}

/// [`AdapterCost`] of the CIFAR ResNet of `depth` (6n + 2) with `num_classes` outputs, on a
/// 32×32 image; its option-A shortcuts have no parameters and are not counted as compute.
pub fn cifar_resnet_cost(
    depth: usize,
    num_classes: usize,
) -> std::result::Result<AdapterCost, ModelError> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        return Err(ModelError::Invalid {
            context: format!("resnet{depth}"),
            message: "CIFAR ResNet depth must be 6n + 2 with n >= 1".into(),
        });
    }
    let n = (depth - 2) / 6;
    let mut c = CostSum::default();
    let mut size = c.conv_bn(PlanConv::k3(3, 16, 1), 32);
    let mut in_planes = 16;
    for (stage, planes) in [16usize, 32, 64].into_iter().enumerate() {
        for i in 0..n {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            size = c.conv_bn(PlanConv::k3(in_planes, planes, stride), size);
            c.conv_bn(PlanConv::k3(planes, planes, 1), size);
            in_planes = planes;
        }
    }
    c.linear(64, num_classes);
    Ok(c.0)
}

/// [`AdapterCost`] of torchvision's ResNet-50 (Bottleneck v1.5) with `num_classes` outputs on a
/// `size`×`size` image: convolutions (with their BatchNorms' parameters) and the classifier;
/// pooling, additions and activations are not counted as compute.
pub fn resnet50_cost(num_classes: usize, size: usize) -> AdapterCost {
    let conv = |c_in, c_out, k, stride| PlanConv {
        c_in,
        c_out,
        k,
        stride,
    };
    let mut c = CostSum::default();
    let stem = c.conv_bn(conv(3, 64, 7, 2), size);
    // The 3×3, stride-2 max pool (padding 1) has a 3×3 conv's output size.
    let mut size = super::convbn::conv_out(stem, 3, 2);
    let mut in_planes = 64;
    for (stage, (planes, blocks)) in [(64, 3), (128, 4), (256, 6), (512, 3)]
        .into_iter()
        .enumerate()
    {
        for i in 0..blocks {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            c.conv_bn(conv(in_planes, planes, 1, 1), size);
            let out = c.conv_bn(conv(planes, planes, 3, stride), size);
            c.conv_bn(conv(planes, 4 * planes, 1, 1), out);
            if i == 0 {
                c.conv_bn(conv(in_planes, 4 * planes, 1, stride), size);
            }
            in_planes = 4 * planes;
            size = out;
        }
    }
    c.linear(2048, num_classes);
    c.0
}

#[derive(Default)]
struct CostSum(AdapterCost);

impl CostSum {
    /// Adds a bias-free conv + BN on a `size`×`size` input; returns the output size.
    fn conv_bn(&mut self, conv: PlanConv, size: usize) -> usize {
        let out = conv_out(size, conv.k, conv.stride);
        let weights = (conv.c_out * conv.c_in * conv.k * conv.k) as u64;
        self.0.params += weights + 2 * conv.c_out as u64;
        self.0.buffers += 2 * conv.c_out as u64;
        self.0.flops_per_image += 2 * weights * (out * out) as u64;
        out
    }

    fn linear(&mut self, c_in: usize, c_out: usize) {
        self.0.params += (c_out * c_in + c_out) as u64;
        self.0.flops_per_image += 2 * (c_out * c_in) as u64;
    }
}

/// A convolution with PyTorch's default Conv2d init (kaiming_uniform, a = √5, i.e.
/// U(±1/√fan_in)) followed by BatchNorm.
fn conv_bn(p: PlanConv, conv_vb: VarBuilder, bn_vb: VarBuilder) -> Result<ConvBn> {
    let bound = 1.0 / ((p.c_in * p.k * p.k) as f64).sqrt();
    let weight = conv_vb.get_with_hints(
        (p.c_out, p.c_in, p.k, p.k),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    ConvBn::new(weight, p.stride, bn_vb)
}

/// A BasicBlock: relu(b(relu(a(x))) + shortcut(x)), identity shortcut when `None`.
#[derive(Clone, Debug)]
struct Block {
    a: ConvBn,
    b: ConvBn,
    shortcut: Option<ConvBn>,
}

#[derive(Clone, Debug)]
enum Unit {
    /// conv + BN + ReLU.
    Plain(ConvBn),
    /// Boxed: a block is three times a plain unit's size.
    Basic(Box<Block>),
}

impl Unit {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Unit::Plain(c) => c.forward_relu_t(x, train),
            Unit::Basic(blk) => {
                let out = blk.b.forward_t(&blk.a.forward_relu_t(x, train)?, train)?;
                let short = match &blk.shortcut {
                    Some(s) => s.forward_t(x, train)?,
                    None => x.clone(),
                };
                add_relu(&out, &short)
            }
        }
    }

    fn convs(&self) -> Vec<&ConvBn> {
        match self {
            Unit::Plain(c) => vec![c],
            Unit::Basic(blk) => {
                let mut v = vec![&blk.a, &blk.b];
                v.extend(blk.shortcut.as_ref());
                v
            }
        }
    }

    fn detached(&self) -> Result<Self> {
        Ok(match self {
            Unit::Plain(c) => Unit::Plain(c.detached()?),
            Unit::Basic(blk) => Unit::Basic(Box::new(Block {
                a: blk.a.detached()?,
                b: blk.b.detached()?,
                shortcut: blk.shortcut.as_ref().map(ConvBn::detached).transpose()?,
            })),
        })
    }

    fn to_fast(&self, precision: Precision) -> Result<FastUnit> {
        Ok(match self {
            Unit::Plain(c) => FastUnit::Plain(c.fused(precision)?),
            Unit::Basic(blk) => FastUnit::Basic(Box::new(FastBlock {
                a: blk.a.fused(precision)?,
                b: blk.b.fused(precision)?,
                shortcut: blk
                    .shortcut
                    .as_ref()
                    .map(|c| c.fused(precision))
                    .transpose()?,
            })),
        })
    }
}

/// An adapter network: `[B, 3, H, W]` in `[0,1]` → `[B, d]`.
#[derive(Clone, Debug)]
pub struct Adapter {
    arch: AdapterArch,
    normalize: Normalize,
    norm: InputNorm,
    units: Vec<Unit>,
    /// The transformer body of a [`AdapterArch::Vit`] adapter (then `units` is empty).
    vit: Option<VitEncoder>,
    linear: Linear,
    out_dim: usize,
    /// The arithmetic of the fused CPU inference path (training is always f32).
    precision: Precision,
}

impl Adapter {
    /// Builds `arch` with output width `out_dim`, normalising inputs with `normalize`, with
    /// parameters from `vb` (names in the module docs; over a VarMap they are created with the
    /// initialisation described there, over a tensor map they are loaded).
    pub fn new(
        arch: &AdapterArch,
        out_dim: usize,
        normalize: Normalize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if let Err(e) = arch.validate() {
            candle_core::bail!("{e}");
        }
        if out_dim == 0 {
            candle_core::bail!("adapter output width must be at least 1");
        }
        let norm = InputNorm::new(normalize, vb.device())?;
        let units = match arch {
            AdapterArch::ResNet18 { depths, .. } => {
                let mut plan = arch.plan().into_iter();
                let stem = match plan.next() {
                    Some(PlanUnit::Plain(c)) => c,
                    _ => candle_core::bail!("ResNet-18 plan starts with its stem"),
                };
                let mut units = vec![Unit::Plain(conv_bn(stem, vb.pp("conv1"), vb.pp("bn1"))?)];
                // Blocks come in stage order; number them within their stage, as PyTorch's
                // nn.Sequential does.
                let names = depths
                    .iter()
                    .enumerate()
                    .flat_map(|(stage, &n)| (0..n).map(move |i| format!("layer{}.{i}", stage + 1)));
                for (unit, name) in plan.zip(names) {
                    let PlanUnit::Basic { a, b, shortcut } = unit else {
                        candle_core::bail!("ResNet-18 plan has only blocks after its stem");
                    };
                    let bvb = vb.pp(name);
                    units.push(Unit::Basic(Box::new(Block {
                        a: conv_bn(a, bvb.pp("conv1"), bvb.pp("bn1"))?,
                        b: conv_bn(b, bvb.pp("conv2"), bvb.pp("bn2"))?,
                        shortcut: shortcut
                            .map(|s| {
                                let svb = bvb.pp("shortcut");
                                conv_bn(s, svb.pp("0"), svb.pp("1"))
                            })
                            .transpose()?,
                    })));
                }
                units
            }
            AdapterArch::SmallCnn { .. } => arch
                .plan()
                .into_iter()
                .enumerate()
                .map(|(i, unit)| match unit {
                    PlanUnit::Plain(c) => {
                        let lvb = vb.pp("layers").pp(i);
                        Ok(Unit::Plain(conv_bn(c, lvb.pp("conv"), lvb.pp("bn"))?))
                    }
                    PlanUnit::Basic { .. } => {
                        candle_core::bail!("the small CNN has no residual blocks")
                    }
                })
                .collect::<Result<_>>()?,
            AdapterArch::Vit { .. } => Vec::new(),
        };
        let vit = match *arch {
            AdapterArch::Vit {
                dim,
                depth,
                patch,
                heads,
            } => Some(VitEncoder::new(dim, depth, heads, patch, vb.clone())?),
            _ => None,
        };
        // Zero-initialised so that a(x) = 0 at step 0 (see the module docs).
        let c = arch.pooled_channels();
        let lvb = vb.pp("linear");
        let weight = lvb.get_with_hints((out_dim, c), "weight", Init::Const(0.0))?;
        let bias = lvb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            arch: *arch,
            normalize,
            norm,
            units,
            vit,
            linear: Linear::new(weight, Some(bias)),
            out_dim,
            precision: Precision::F32,
        })
    }

    pub fn arch(&self) -> &AdapterArch {
        &self.arch
    }

    /// The input normalisation applied first (the backbone's).
    pub fn normalize(&self) -> Normalize {
        self.normalize
    }

    /// Runs the fused CPU inference path in `precision` from now on (a ViT adapter: f32 or
    /// bf16).
    pub fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        if let Some(vit) = &mut self.vit {
            super::vit::check_precision(precision, "a ViT adapter")?;
            vit.set_precision(precision);
        }
        self.precision = precision;
        Ok(())
    }

    /// Width d of a(x).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether autograd tracks any trained parameter (running statistics never are).
    pub fn tracks_grad(&self) -> bool {
        self.units
            .iter()
            .flat_map(Unit::convs)
            .any(ConvBn::tracks_grad)
            || self.vit.as_ref().is_some_and(VitEncoder::tracks_grad)
            || self.linear.weight().track_op()
            || self.linear.bias().is_some_and(Tensor::track_op)
    }

    /// A copy with parameters detached from autograd (sharing storage; running statistics
    /// copied), which eval mode runs through the fused CPU path.
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            arch: self.arch,
            normalize: self.normalize,
            norm: self.norm.clone(),
            units: self
                .units
                .iter()
                .map(Unit::detached)
                .collect::<Result<_>>()?,
            vit: self.vit.as_ref().map(VitEncoder::detached),
            linear: Linear::new(
                self.linear.weight().detach(),
                self.linear.bias().map(Tensor::detach),
            ),
            out_dim: self.out_dim,
            precision: self.precision,
        })
    }

    /// Eval-mode a(x) for callers that want no gradients (certification), detached from
    /// autograd: the fused CPU path whenever the input is on the CPU and untracked, even if
    /// the parameters are tracked (folding copies them out of the graph).
    pub fn forward_no_grad(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x)?;
        if let Some(vit) = &self.vit {
            // candle's fused LayerNorm / softmax kernels (any device); nothing is recorded.
            let pooled = vit.pooled(&self.norm.forward(&x.detach())?, false)?;
            return Ok(self.linear.forward(&pooled.detach())?.detach());
        }
        if super::path::fused(x.device()) && !x.track_op() {
            return Ok(self.forward_fast(x)?.detach());
        }
        super::resnet::check_generic_precision(self.precision)?;
        let bf16 = !x.track_op() && self.precision == Precision::Bf16;
        Ok(self.forward_candle_in(x, false, bf16)?.detach())
    }

    /// candle's ops, in bf16 tensors when `bf16` (the generic path's bf16, e.g. on CUDA: input
    /// rounded once after normalising, pooled features back in f32 for the f32 linear layer).
    /// A ViT adapter always runs in f32.
    fn forward_candle_in(&self, x: &Tensor, train: bool, bf16: bool) -> Result<Tensor> {
        if let Some(vit) = &self.vit {
            let grad = x.track_op() || self.tracks_grad();
            return self
                .linear
                .forward(&vit.pooled(&self.norm.forward(x)?, grad)?);
        }
        let mut h = self.norm.forward(x)?;
        if bf16 {
            h = h.to_dtype(candle_core::DType::BF16)?;
        }
        for unit in &self.units {
            h = unit.forward_t(&h, train)?;
        }
        self.linear.forward(
            &h.to_dtype(candle_core::DType::F32)?
                .flatten_from(2)?
                .mean(2)?,
        )
    }

    fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let fast = FastAdapter {
            normalize: self.normalize,
            units: self
                .units
                .iter()
                .map(|u| u.to_fast(self.precision))
                .collect::<Result<_>>()?,
            pooled: self.arch.pooled_channels(),
        };
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let pooled = fast.pooled(&input, b, (h, w));
        let pooled = Tensor::from_vec(pooled, (b, fast.pooled), x.device())?;
        self.linear.forward(&pooled)
    }
}

impl ModuleT for Adapter {
    /// a(x); BatchNorm uses batch statistics and updates its running statistics when `train`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        check_input(x)?;
        let no_grad = !train && !x.track_op() && !self.tracks_grad();
        if self.vit.is_none() && no_grad && super::path::fused(x.device()) {
            return self.forward_fast(x);
        }
        if no_grad {
            super::resnet::check_generic_precision(self.precision)?;
        }
        self.forward_candle_in(x, train, no_grad && self.precision == Precision::Bf16)
    }
}

struct FastBlock {
    a: FoldedConv,
    b: FoldedConv,
    shortcut: Option<FoldedConv>,
}

enum FastUnit {
    Plain(FoldedConv),
    Basic(Box<FastBlock>),
}

struct FastAdapter {
    normalize: Normalize,
    units: Vec<FastUnit>,
    pooled: usize,
}

#[derive(Default)]
struct Scratch {
    cur: Vec<f32>,
    tmp: Vec<f32>,
    next: Vec<f32>,
}

impl FastAdapter {
    /// Pooled features [B·pooled] of B images of [3, h, w].
    fn pooled(&self, input: &[f32], batch: usize, (h, w): (usize, usize)) -> Vec<f32> {
        let mut out = vec![0f32; batch * self.pooled];
        out.par_chunks_mut(self.pooled)
            .zip(input.par_chunks(3 * h * w))
            .for_each_init(Scratch::default, |s, (o, x)| {
                self.forward_image(x, (h, w), o, s)
            });
        out
    }

    fn forward_image(
        &self,
        x: &[f32],
        (h, w): (usize, usize),
        pooled: &mut [f32],
        s: &mut Scratch,
    ) {
        let plane = h * w;
        s.cur.clear();
        s.cur.reserve(3 * plane);
        for (c, xs) in x.chunks_exact(plane).enumerate() {
            let (m, sd) = (self.normalize.mean[c], self.normalize.std[c]);
            // (x − mean) / std as InputNorm computes it, so both paths see the same input.
            s.cur.extend(xs.iter().map(|&v| (v - m) / sd));
        }
        let mut size = (h, w);
        for unit in &self.units {
            match unit {
                FastUnit::Plain(conv) => {
                    let out = conv.out_size(size);
                    conv.bias_into(&mut s.next, out.0 * out.1);
                    conv.accumulate(&s.cur, 1, size, &mut s.next);
                    relu_in_place(&mut s.next);
                    size = out;
                }
                FastUnit::Basic(blk) => {
                    let FastBlock { a, b, shortcut } = &**blk;
                    let out = a.out_size(size);
                    let out_plane = out.0 * out.1;
                    // tmp = relu(bn1(conv1(x)))
                    a.bias_into(&mut s.tmp, out_plane);
                    a.accumulate(&s.cur, 1, size, &mut s.tmp);
                    relu_in_place(&mut s.tmp);
                    // next = relu(shortcut(x) + bn2(conv2(tmp)))
                    match shortcut {
                        Some(sc) => {
                            sc.bias_into(&mut s.next, out_plane);
                            sc.accumulate(&s.cur, 1, size, &mut s.next);
                        }
                        None => {
                            s.next.clear();
                            s.next.extend_from_slice(&s.cur);
                        }
                    }
                    b.add_bias(&mut s.next, out_plane);
                    b.accumulate(&s.tmp, 1, out, &mut s.next);
                    relu_in_place(&mut s.next);
                    size = out;
                }
            }
            std::mem::swap(&mut s.cur, &mut s.next);
        }
        let plane = size.0 * size.1;
        for (p, xs) in pooled.iter_mut().zip(s.cur.chunks_exact(plane)) {
            *p = xs.iter().sum::<f32>() / plane as f32;
        }
    }
}
