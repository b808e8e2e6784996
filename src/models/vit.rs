//! Vision transformers in timm's `VisionTransformer` form and under its parameter names, so timm
//! checkpoints (safetensors or PyTorch) load as they are.
//!
//! Patch embedding (a `patch`×`patch` convolution at stride `patch`, run as one matmul over the
//! flattened patches), a class token, a learned position embedding over class token + patches,
//! `depth` pre-norm blocks — x + attn(LN(x)), then x + mlp(LN(x)) with multi-head
//! self-attention (qkv with bias, scale 1/√head_dim) and an MLP of ratio 4 with erf GELU;
//! LayerNorm ε = 1e-6 — a final LayerNorm and a linear head on the class token (timm's
//! `global_pool='token'`). That class token after the final norm is the feature φ(x) CAF reads,
//! the same one timm's head reads.
//!
//! Names: `cls_token` [1, 1, D], `pos_embed` [1, N + 1, D], `patch_embed.proj.{weight,bias}`
//! ([D, 3, P, P], [D]), `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*` ([3D, D]),
//! `blocks.{i}.attn.proj.*`, `blocks.{i}.norm2.*`, `blocks.{i}.mlp.fc1.*` ([4D, D]),
//! `blocks.{i}.mlp.fc2.*`, `norm.*`, `head.*` ([classes, D]).
//!
//! Every op is candle's (device-generic); the CPU-heavy ones are already fused kernels in candle
//! (LayerNorm, softmax over the last dimension, erf GELU, GEMM). Linear layers run as one 2-D
//! matmul over batch × tokens, and attention as two batched matmuls over batch × heads.
//!
//! `precision: bf16` runs the encoder's linear layers (patch embedding, qkv, projection, MLP)
//! and attention's two products (q·kᵀ, softmax·v) with both operands rounded to bf16 and f32
//! sums ([`Bf16Linear`]: AMX tiles where the CPU has them; on the CPU attention is one fused
//! pass per image, [`super::attention`]); softmax, LayerNorm, GELU, residual adds and the head
//! stay f32. A certificate in bf16 is one of that rounded classifier.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::bf16_linear::Bf16Linear;
use super::conv::{f32_slice, gemm};
use super::precision::Precision;
use candle_nn::{LayerNorm, LayerNormConfig, Linear, VarBuilder};

use super::resnet::{check_input, InputNorm};
use super::{Classifier, ModelError, Normalize, VitName};

/// timm's LayerNorm epsilon for ViTs.
const LN_EPS: f64 = 1e-6;

/// Bounds that keep a typo from allocating gigabytes.
const MAX_DIM: usize = 4096;
const MAX_DEPTH: usize = 64;

/// The numbers of a ViT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Square input size; the position embedding is built for it.
    pub img_size: usize,
    pub patch: usize,
    /// Embedding width D.
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio` × D.
    pub mlp_ratio: usize,
}

impl VitConfig {
    pub fn named(name: VitName) -> Self {
        let (img_size, patch, dim, depth, heads) = match name {
            VitName::Tiny16 => (224, 16, 192, 12, 3),
            VitName::Small16 => (224, 16, 384, 12, 6),
            VitName::Base16 => (224, 16, 768, 12, 12),
            VitName::CifarTiny4 => (32, 4, 192, 6, 3),
        };
        Self {
            img_size,
            patch,
            dim,
            depth,
            heads,
            mlp_ratio: 4,
        }
    }

    /// Patches per image (tokens without the class token).
    pub fn patches(&self) -> usize {
        (self.img_size / self.patch).pow(2)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.patch == 0 || self.img_size == 0 || !self.img_size.is_multiple_of(self.patch) {
            return Err(format!(
                "image size {} must be a positive multiple of the patch size {}",
                self.img_size, self.patch
            ));
        }
        if self.dim == 0 || self.dim > MAX_DIM || self.depth > MAX_DEPTH || self.mlp_ratio == 0 {
            return Err(format!(
                "width must be in 1..={MAX_DIM}, depth in 0..={MAX_DEPTH}, mlp ratio ≥ 1; got \
                 {} / {} / {}",
                self.dim, self.depth, self.mlp_ratio
            ));
        }
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err(format!(
                "width {} must be a multiple of the {} heads",
                self.dim, self.heads
            ));
        }
        Ok(())
    }

    /// Parameters and FLOPs per image (2 × multiply-adds of the matmuls, attention's two
    /// included; LayerNorm, softmax and GELU not counted), with a `classes`-way head.
    pub fn cost(&self, classes: usize) -> (u64, u64) {
        let n = self.patches() as u64;
        let d = self.dim as u64;
        let (params, flops) =
            encoder_cost(self.dim, self.depth, self.mlp_ratio, self.patch, n, n + 1);
        // Class token and position embedding; the head.
        let params = params + d + (n + 1) * d + classes as u64 * (d + 1);
        (params, flops + 2 * classes as u64 * d)
    }
}

/// Parameters and FLOPs of patch embedding (on `patches` patches), `depth` blocks over `tokens`
/// tokens and the final LayerNorm: what a ViT backbone and a ViT adapter share.
pub(crate) fn encoder_cost(
    dim: usize,
    depth: usize,
    mlp_ratio: usize,
    patch: usize,
    patches: u64,
    tokens: u64,
) -> (u64, u64) {
    let (d, p, t) = (dim as u64, patch as u64, tokens);
    let h = d * mlp_ratio as u64;
    let block_params = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (h * d + h) + (d * h + d);
    let block_macs = t * (3 * d * d + d * d + 2 * h * d) + 2 * t * t * d;
    let params = 3 * p * p * d + d + depth as u64 * block_params + 2 * d;
    let macs = patches * 3 * p * p * d + depth as u64 * block_macs;
    (params, 2 * macs)
}

/// A linear layer of a ViT, with its weight packed for bf16 when the model runs in bf16.
#[derive(Clone, Debug)]
pub(crate) struct Dense {
    linear: Linear,
    /// `Some` in bf16: the packing, made on the first bf16 pass from the weights then (a model
    /// is put in bf16 to be evaluated, not trained; [`Dense::set_precision`] packs anew).
    bf16: Option<Arc<OnceLock<Bf16Linear>>>,
}

impl From<Linear> for Dense {
    fn from(linear: Linear) -> Self {
        Self { linear, bf16: None }
    }
}

impl Dense {
    pub(crate) fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    fn tracks_grad(&self) -> bool {
        self.linear.weight().track_op() || self.linear.bias().is_some_and(Tensor::track_op)
    }

    fn detached(&self) -> Self {
        Self {
            linear: detach_linear(&self.linear),
            bf16: self.bf16.clone(),
        }
    }

    fn set_precision(&mut self, precision: Precision) {
        // int8 never gets here: `check_precision` refuses it first.
        self.bf16 = (precision == Precision::Bf16).then(|| Arc::new(OnceLock::new()));
    }

    /// The bf16 packing of the weight (made on first use).
    fn packed<'a>(&self, cell: &'a OnceLock<Bf16Linear>) -> Result<&'a Bf16Linear> {
        if let Some(p) = cell.get() {
            return Ok(p);
        }
        let w = self.linear.weight();
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(cell.get_or_init(|| Bf16Linear::new(&values, n, k)))
    }
}

/// y = x·Wᵀ + b over the last dimension, as one 2-D matmul whatever the leading dimensions.
pub(crate) fn linear_nd(l: &Dense, x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = match dims.split_last() {
        Some((last, lead)) => (*last, lead),
        None => candle_core::bail!("linear layer on a scalar"),
    };
    let rows: usize = lead.iter().product();
    let x2 = x.reshape((rows, last))?;
    let packed = match &l.bf16 {
        Some(cell) if super::path::fused(x.device()) => Some(l.packed(cell)?),
        _ => None,
    };
    let y = match linear_untracked(&l.linear, packed, &x2)? {
        Some(y) => y,
        None => {
            let generic_bf16 = l.bf16.is_some() && !x2.track_op() && !l.tracks_grad();
            let y = if generic_bf16 {
                // The generic path's bf16 (e.g. on CUDA): candle's bf16 matmul.
                x2.to_dtype(DType::BF16)?
                    .matmul(&l.weight().to_dtype(DType::BF16)?.t()?)?
                    .to_dtype(DType::F32)?
            } else {
                x2.matmul(&l.weight().t()?)?
            };
            match l.linear.bias() {
                Some(b) => super::rowwise::add_bias(&y, b)?,
                None => y,
            }
        }
    };
    let mut out = lead.to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// At most this many rows of x per GEMM of [`linear_untracked`] (a rayon task each).
const LINEAR_ROWS: usize = 1024;

/// Rows of x per task of [`linear_untracked`]: `rows` split evenly into a multiple of the thread
/// count of tasks of at most [`LINEAR_ROWS`] rows, rounded up to the AMX kernel's blocks of 32
/// rows. Why: blocks of [`LINEAR_ROWS`] left a ViT-B/16 chunk of 8 images (1,576 rows) as 1,024
/// and 552 rows on two threads, one idle a third of the time. A row's sums do not depend on
/// the split (the bf16 kernels sum each output in an order fixed by k; the `gemm` crate did
/// too on every ViT shape tried, and the test below checks both), so results keep their bits.
fn linear_task_rows(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = rows.div_ceil(LINEAR_ROWS).div_ceil(threads).max(1) * threads;
    rows.div_ceil(tasks)
        .next_multiple_of(32)
        .clamp(32, LINEAR_ROWS)
}

/// x·Wᵀ + b for a 2-D x when nothing needs a gradient (a frozen backbone under certification)
/// on the fused CPU path, in f32 or (`bf16`: W packed) bf16: each block of rows starts as the
/// bias and the GEMM adds into it, where candle's matmul zeroes its output and a bias pass
/// follows (together 15 % of a CIFAR ViT's forward pass). `None` when the generic path must
/// run.
fn linear_untracked(l: &Linear, bf16: Option<&Bf16Linear>, x: &Tensor) -> Result<Option<Tensor>> {
    let w = l.weight();
    let tracked = x.track_op() || w.track_op() || l.bias().is_some_and(Tensor::track_op);
    let f32s = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && l.bias().is_none_or(|b| b.dtype() == DType::F32);
    if tracked || !f32s || !super::path::fused(x.device()) {
        return Ok(None);
    }
    let (_, k) = x.dims2()?;
    let (n, wk) = w.dims2()?;
    let b = match l.bias() {
        Some(b) => b.clone(),
        None => Tensor::zeros(n, DType::F32, x.device())?,
    };
    let packed_ok = bf16.is_none_or(|p| (p.out_dim(), p.in_dim()) == (n, k));
    if wk != k || b.dims() != [n] || !packed_ok {
        candle_core::bail!(
            "linear layer: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    let op = UntrackedLinear { bf16 };
    let y = x
        .contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op)?;
    Ok(Some(y))
}

/// (x [rows, k], W [n, k], b [n]) ↦ x·Wᵀ + b, without autograd; in bf16 with W's packing when
/// there is one.
struct UntrackedLinear<'a> {
    bf16: Option<&'a Bf16Linear>,
}

impl CustomOp3 for UntrackedLinear<'_> {
    fn name(&self) -> &'static str {
        "caf-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "linear input")?;
        let w = f32_slice(s2, l2, "linear weight")?;
        let bias = f32_slice(s3, l3, "linear bias")?;
        let (rows, k) = l1.shape().dims2()?;
        let n = l2.dims()[0];
        let mut y = super::pointwise::unfilled(rows * n);
        let task = linear_task_rows(rows);
        // Blocks of y index their rows of x (which is empty when k = 0: y is then the bias).
        y.par_chunks_mut(task * n.max(1))
            .enumerate()
            .for_each(|(i, yc)| {
                let m = yc.len() / n;
                for row in yc.chunks_exact_mut(n) {
                    row.copy_from_slice(bias);
                }
                let xc = &x[i * task * k..][..m * k];
                match self.bf16 {
                    Some(packed) => packed.accumulate(m, xc, yc),
                    // Wᵀ's (i, o) is w[o·k + i].
                    None => gemm(m, n, k, (xc, k, 1), (w, 1, k), yc, true),
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

/// How a new (not loaded) linear layer starts; loading a checkpoint ignores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinearInit {
    /// candle's `linear`: Kaiming-normal weights, U(±1/√fan_in) biases (the ViT adapter's).
    Candle,
    /// timm's `init_weights_vit_timm`: weights N(0, 0.02²) (timm truncates at ±2σ; untruncated
    /// here), zero biases; for training a whole ViT from scratch.
    Timm,
}

fn linear(c_in: usize, c_out: usize, vb: VarBuilder, init: LinearInit) -> Result<Linear> {
    match init {
        LinearInit::Candle => candle_nn::linear(c_in, c_out, vb),
        LinearInit::Timm => {
            let w = vb.get_with_hints((c_out, c_in), "weight", TIMM_NORMAL)?;
            let b = vb.get_with_hints(c_out, "bias", candle_nn::Init::Const(0.0))?;
            Ok(Linear::new(w, Some(b)))
        }
    }
}

/// timm's N(0, 0.02²) for linear weights and the position embedding.
const TIMM_NORMAL: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

fn layer_norm(d: usize, vb: VarBuilder) -> Result<LayerNorm> {
    candle_nn::layer_norm(
        d,
        LayerNormConfig {
            eps: LN_EPS,
            ..Default::default()
        },
        vb,
    )
}

fn detach_linear(l: &Linear) -> Linear {
    Linear::new(l.weight().detach(), l.bias().map(Tensor::detach))
}

fn detach_norm(n: &LayerNorm) -> LayerNorm {
    match n.bias() {
        Some(b) => LayerNorm::new(n.weight().detach(), b.detach(), n.eps()),
        None => LayerNorm::new_no_bias(n.weight().detach(), n.eps()),
    }
}

/// LayerNorm over the last dimension. candle's fused kernel has no backward pass, so when
/// autograd needs the graph (`grad`) the same formula runs as differentiable ops.
pub(crate) fn norm_fwd(n: &LayerNorm, x: &Tensor, grad: bool) -> Result<Tensor> {
    if !grad {
        return n.forward(&x.contiguous()?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xhat = xc.broadcast_div(&(var + n.eps())?.sqrt()?)?;
    super::rowwise::scale_shift(&xhat, n.weight(), n.bias())
}

/// Softmax over the last dimension: candle's fused kernel (no backward) unless `grad`.
fn softmax_fwd(x: &Tensor, grad: bool) -> Result<Tensor> {
    if grad {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// a·b, in bf16 (on the generic path, e.g. CUDA: candle's bf16 matmul) when `bf16`.
fn product(a: &Tensor, b: &Tensor, bf16: bool) -> Result<Tensor> {
    if !bf16 {
        return a.matmul(b);
    }
    a.to_dtype(DType::BF16)?
        .matmul(&b.to_dtype(DType::BF16)?)?
        .to_dtype(DType::F32)
}

/// One pre-norm transformer block (timm's `Block`).
#[derive(Clone, Debug)]
pub(crate) struct Block {
    norm1: LayerNorm,
    qkv: Dense,
    proj: Dense,
    norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    heads: usize,
}

impl Block {
    pub(crate) fn new(
        dim: usize,
        heads: usize,
        mlp_ratio: usize,
        vb: VarBuilder,
        init: LinearInit,
    ) -> Result<Self> {
        let hidden = dim * mlp_ratio;
        Ok(Self {
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            qkv: linear(dim, 3 * dim, vb.pp("attn").pp("qkv"), init)?.into(),
            proj: linear(dim, dim, vb.pp("attn").pp("proj"), init)?.into(),
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            fc1: linear(dim, hidden, vb.pp("mlp").pp("fc1"), init)?.into(),
            fc2: linear(hidden, dim, vb.pp("mlp").pp("fc2"), init)?.into(),
            heads,
        })
    }

    fn attention(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let bf16 = !grad && self.qkv.bf16.is_some();
        let qkv = linear_nd(&self.qkv, x)?;
        if bf16 && super::attention::fused_bf16(&qkv) {
            let out = super::attention::attention_bf16(&qkv, self.heads)?;
            return linear_nd(&self.proj, &out);
        }
        // [B, N, 3, H, hd] → [3, B·H, N, hd]: q, k, v as contiguous batches of matrices.
        let qkv = qkv
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?
            .reshape((3, b * self.heads, n, hd))?;
        let q = (qkv.get(0)? * (1.0 / (hd as f64).sqrt()))?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let attn = product(&q, &k.t()?, bf16)?;
        let attn = softmax_fwd(&attn, grad)?;
        let out = product(&attn, &v, bf16)?
            .reshape((b, self.heads, n, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, d))?;
        linear_nd(&self.proj, &out)
    }

    /// x + attn(LN(x)), then + mlp(LN(·)); `grad`: autograd needs the graph.
    pub(crate) fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let x = (x + self.attention(&norm_fwd(&self.norm1, x, grad)?, grad)?)?;
        let h = super::gelu::gelu(&linear_nd(&self.fc1, &norm_fwd(&self.norm2, &x, grad)?)?)?;
        x + linear_nd(&self.fc2, &h)?
    }

    pub(crate) fn detached(&self) -> Self {
        Self {
            norm1: detach_norm(&self.norm1),
            qkv: self.qkv.detached(),
            proj: self.proj.detached(),
            norm2: detach_norm(&self.norm2),
            fc1: self.fc1.detached(),
            fc2: self.fc2.detached(),
            heads: self.heads,
        }
    }

    pub(crate) fn tracks_grad(&self) -> bool {
        [&self.qkv, &self.proj, &self.fc1, &self.fc2]
            .iter()
            .any(|l| l.weight().track_op())
            || self.norm1.weight().track_op()
            || self.norm2.weight().track_op()
    }

    fn set_precision(&mut self, precision: Precision) {
        for l in [&mut self.qkv, &mut self.proj, &mut self.fc1, &mut self.fc2] {
            l.set_precision(precision);
        }
    }
}

/// Whether a ViT (`what`: a backbone or an adapter) can run in `precision`: f32 and bf16.
pub(crate) fn check_precision(
    precision: Precision,
    what: &str,
) -> std::result::Result<(), ModelError> {
    if precision == Precision::Int8 {
        return Err(ModelError::Invalid {
            context: "precision int8".to_string(),
            message: format!(
                "{what} runs in f32 or bf16; int8 is for CIFAR ResNets and convolutional \
                 adapters on them"
            ),
        });
    }
    Ok(())
}

/// Puts the linear layers of a ViT encoder (a backbone's or an adapter's) in `precision`.
fn set_encoder_precision(patch_embed: &mut PatchEmbed, blocks: &mut [Block], precision: Precision) {
    patch_embed.proj.set_precision(precision);
    for block in blocks {
        block.set_precision(precision);
    }
}

/// Patch embedding: a `patch`×`patch` convolution at stride `patch` as one matmul.
#[derive(Clone, Debug)]
pub(crate) struct PatchEmbed {
    /// [D, 3·P·P] (the convolution's weight, flattened in its (c, ky, kx) order).
    proj: Dense,
    patch: usize,
}

impl PatchEmbed {
    pub(crate) fn new(patch: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        // PyTorch's Conv2d default init, for a new (adapter) patch embedding; loading ignores it.
        let bound = 1.0 / ((3 * patch * patch) as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let w = vb.get_with_hints((dim, 3, patch, patch), "weight", init)?;
        let b = vb.get_with_hints(dim, "bias", init)?;
        Ok(Self {
            proj: Linear::new(w.reshape((dim, 3 * patch * patch))?, Some(b)).into(),
            patch,
        })
    }

    /// [B, 3, H, W] → [B, (H/P)·(W/P), D], patches in row-major order as timm flattens them.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            candle_core::bail!("image {h}×{w} is not a whole number of {p}×{p} patches");
        }
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        linear_nd(&self.proj, &patches)
    }

    fn detached(&self) -> Self {
        Self {
            proj: self.proj.detached(),
            patch: self.patch,
        }
    }
}

/// A timm VisionTransformer with its input normalisation; input [B, 3, S, S] in [0,1] with S
/// the config's image size.
#[derive(Clone, Debug)]
pub struct VisionTransformer {
    cfg: VitConfig,
    norm_in: InputNorm,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
    num_classes: usize,
}

impl VisionTransformer {
    /// Builds the network with parameters from `vb` under timm's names (module docs).
    pub fn new(
        cfg: VitConfig,
        num_classes: usize,
        normalize: Normalize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            candle_core::bail!("ViT config {cfg:?}: {e}");
        }
        if num_classes == 0 {
            candle_core::bail!("a classifier needs at least one class");
        }
        let d = cfg.dim;
        let norm_in = InputNorm::new(normalize, vb.device())?;
        // The initialisation (timm's) only matters when the network is trained from scratch
        // (`super::trainable`); loading a checkpoint ignores it.
        let cls_token = vb.get_with_hints(
            (1, 1, d),
            "cls_token",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1e-6,
            },
        )?;
        let pos_embed = vb.get_with_hints((1, cfg.patches() + 1, d), "pos_embed", TIMM_NORMAL)?;
        let patch_embed = PatchEmbed::new(cfg.patch, d, vb.pp("patch_embed").pp("proj"))?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp("blocks").pp(i);
                Block::new(d, cfg.heads, cfg.mlp_ratio, vb, LinearInit::Timm)
            })
            .collect::<Result<_>>()?;
        let norm = layer_norm(d, vb.pp("norm"))?;
        let head = linear(d, num_classes, vb.pp("head"), LinearInit::Timm)?;
        Ok(Self {
            cfg,
            norm_in,
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            head,
            num_classes,
        })
    }

    pub fn config(&self) -> VitConfig {
        self.cfg
    }

    pub fn normalize(&self) -> Normalize {
        self.norm_in.normalize
    }

    /// Width D of φ(x).
    pub fn feature_dim(&self) -> usize {
        self.cfg.dim
    }

    /// φ(x): the class token after the final LayerNorm, [B, D].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x)?;
        let (b, _, h, w) = x.dims4()?;
        let s = self.cfg.img_size;
        if (h, w) != (s, s) {
            candle_core::bail!(
                "this ViT takes {s}×{s} images (its position embedding), got {h}×{w}"
            );
        }
        let grad = x.track_op() || self.tracks_grad();
        let cfg = self.cfg;
        let per_image =
            image_activation_bytes(cfg.patches() + 1, cfg.dim * cfg.mlp_ratio, cfg.heads);
        if let Some(images) = chunk_images(x, grad, per_image) {
            return in_chunks(x, images, |x| self.features(x));
        }
        let tokens = self.patch_embed.forward(&self.norm_in.forward(x)?)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.cfg.dim))?;
        let mut t = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            t = block.forward(&t, grad)?;
        }
        // Only the class token is read: normalise it alone (LayerNorm is per token).
        norm_fwd(&self.norm, &t.narrow(1, 0, 1)?.squeeze(1)?, grad)
    }

    /// The linear head: logits [B, classes] from features [B, D].
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        self.head.forward(features)
    }

    /// Whether autograd tracks any parameter.
    pub fn tracks_grad(&self) -> bool {
        self.cls_token.track_op()
            || self.pos_embed.track_op()
            || self.patch_embed.proj.weight().track_op()
            || self.blocks.iter().any(Block::tracks_grad)
            || self.head.weight().track_op()
    }

    /// Runs the encoder's linear layers in `precision` from now on (module docs); int8 is an
    /// error (it is defined for convolutions only).
    pub fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        check_precision(precision, "a ViT")?;
        set_encoder_precision(&mut self.patch_embed, &mut self.blocks, precision);
        Ok(())
    }

    /// The arithmetic of the encoder's linear layers.
    pub fn precision(&self) -> Precision {
        match self.patch_embed.proj.bf16 {
            Some(_) => Precision::Bf16,
            None => Precision::F32,
        }
    }

    /// A copy with every parameter detached from autograd (sharing storage).
    pub fn detached(&self) -> Self {
        Self {
            cfg: self.cfg,
            norm_in: self.norm_in.clone(),
            patch_embed: self.patch_embed.detached(),
            cls_token: self.cls_token.detach(),
            pos_embed: self.pos_embed.detach(),
            blocks: self.blocks.iter().map(Block::detached).collect(),
            norm: detach_norm(&self.norm),
            head: detach_linear(&self.head),
            num_classes: self.num_classes,
        }
    }
}

/// Logits; a ViT has no BatchNorm or dropout, so `train` changes nothing.
impl candle_core::ModuleT for VisionTransformer {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.head(&self.features(x)?)
    }
}

impl Classifier for VisionTransformer {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.head(&self.features(x)?)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn set_precision(
        &mut self,
        precision: Precision,
    ) -> std::result::Result<(), super::ModelError> {
        VisionTransformer::set_precision(self, precision)
    }
}

/// The largest activation a ViT forward pass holds, per image, in bytes: its MLP's hidden
/// tokens or its attention matrices, whichever is larger (f32).
fn image_activation_bytes(tokens: usize, hidden: usize, heads: usize) -> usize {
    4 * (tokens * hidden).max(heads * tokens * tokens)
}

/// A ViT backbone's CPU forward pass without gradients runs its batch in chunks whose largest
/// activation is at most this many bytes. One pass over a whole certification batch (a CIFAR
/// ViT's MLP is 80 MB at 400 images) allocates every activation afresh from the kernel, which
/// maps and zeroes its pages (17 % of the pass in `perf`), and streams it through memory;
/// chunks stay under glibc's mmap threshold, so the allocator reuses their memory. Measured on the AMX Xeon
/// (`caf bench forward --arch vit_cifar_tiny_patch4_32 --batch 400`): 239–255 images/s in one
/// pass, 320–383 in chunks of 96 images (19 MB), 276–319 in chunks of 48.
const CHUNK_BYTES: usize = 20 << 20;

/// Images per chunk for a forward pass over `x` ([B, …]) whose largest activation takes
/// `per_image` bytes an image; `None` when the pass runs whole (autograd needs the graph, a
/// GPU wants large batches, or the batch is already small enough).
fn chunk_images(x: &Tensor, grad: bool, per_image: usize) -> Option<usize> {
    let b = x.dims().first().copied().unwrap_or(0);
    let images = (CHUNK_BYTES / per_image.max(1)).max(1);
    (!grad && super::path::fused(x.device()) && b > images).then_some(images)
}

/// `f` over chunks of `images` images of `x`, its outputs concatenated along the batch. Every
/// op of a ViT works on one image at a time or on one token row at a time, so the chunks give
/// the same values as one pass, bit for bit (tested).
fn in_chunks(x: &Tensor, images: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let b = x.dim(0)?;
    let parts = (0..b)
        .step_by(images)
        .map(|i| f(&x.narrow(0, i, images.min(b - i))?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// MAE's fixed 2-D sine-cosine position embedding [1, gh·gw, dim] (dim a multiple of 4): half
/// the channels encode the row, half the column, so an adapter needs no parameter tied to one
/// image size.
fn sincos_2d(gh: usize, gw: usize, dim: usize, device: &candle_core::Device) -> Result<Tensor> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut v = Vec::with_capacity(gh * gw * dim);
    for y in 0..gh {
        for x in 0..gw {
            for pos in [y as f64, x as f64] {
                v.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                v.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_vec(v, (1, gh * gw, dim), device)
}

/// The body of a ViT-style CAF adapter: patch embedding, fixed sine-cosine positions, `depth`
/// pre-norm blocks (the backbone's [`Block`]), a final LayerNorm and the mean over tokens.
/// Names: `patch_embed.proj.*`, `blocks.{i}.*` as timm's, `norm.*`.
#[derive(Clone, Debug)]
pub(crate) struct VitEncoder {
    patch_embed: PatchEmbed,
    blocks: Vec<Block>,
    norm: LayerNorm,
    dim: usize,
    patch: usize,
}

impl VitEncoder {
    pub(crate) fn new(
        dim: usize,
        depth: usize,
        heads: usize,
        patch: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if dim == 0 || !dim.is_multiple_of(4) || heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!(
                "ViT adapter width {dim} must be a multiple of 4 and of {heads} heads"
            );
        }
        Ok(Self {
            patch_embed: PatchEmbed::new(patch, dim, vb.pp("patch_embed").pp("proj"))?,
            blocks: (0..depth)
                .map(|i| Block::new(dim, heads, 4, vb.pp("blocks").pp(i), LinearInit::Candle))
                .collect::<Result<_>>()?,
            norm: layer_norm(dim, vb.pp("norm"))?,
            dim,
            patch,
        })
    }

    /// Mean of the normalised tokens [B, dim] of already-normalised images [B, 3, H, W].
    pub(crate) fn pooled(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        // Not chunked (unlike the backbone): the adapter's pooled features were not bitwise the
        // same over a chunk and over the whole batch (2e-7 apart on a small encoder), and
        // results stored before must be reproduced exactly.
        let (_, _, h, w) = x.dims4()?;
        let pos = sincos_2d(h / self.patch, w / self.patch, self.dim, x.device())?;
        let mut t = self.patch_embed.forward(x)?.broadcast_add(&pos)?;
        for block in &self.blocks {
            t = block.forward(&t, grad)?;
        }
        norm_fwd(&self.norm, &t, grad)?.mean(1)
    }

    pub(crate) fn tracks_grad(&self) -> bool {
        self.patch_embed.proj.weight().track_op()
            || self.norm.weight().track_op()
            || self.blocks.iter().any(Block::tracks_grad)
    }

    pub(crate) fn detached(&self) -> Self {
        Self {
            patch_embed: self.patch_embed.detached(),
            blocks: self.blocks.iter().map(Block::detached).collect(),
            norm: detach_norm(&self.norm),
            dim: self.dim,
            patch: self.patch,
        }
    }

    /// Runs the encoder's linear layers in `precision` from now on.
    pub(crate) fn set_precision(&mut self, precision: Precision) {
        set_encoder_precision(&mut self.patch_embed, &mut self.blocks, precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::tests::{max_abs_diff, randn};
    use crate::models::{formula, record_tensors, Normalize};

    /// A 16 × 16 ViT of width `dim` (2 blocks, patches of 4) with formula weights, 10 classes.
    fn small_vit(dim: usize, heads: usize) -> VisionTransformer {
        let cfg = VitConfig {
            img_size: 16,
            patch: 4,
            dim,
            depth: 2,
            heads,
            mlp_ratio: 4,
        };
        let build = |vb| VisionTransformer::new(cfg, 10, Normalize::HALF, vb);
        let named = record_tensors(|vb| build(vb).map(|_| ())).expect("names");
        let vb = formula::var_builder(&named, &candle_core::Device::Cpu).expect("weights");
        build(vb).expect("vit")
    }

    /// A small ViT with formula weights, run over 7 images in one pass and in chunks of 3
    /// (3 + 3 + 1): the same features, bit for bit.
    #[test]
    fn a_vit_forward_in_chunks_equals_one_pass() {
        let vit = small_vit(24, 3);
        let x = formula::images(16, 7, &candle_core::Device::Cpu).expect("images");
        let whole = vit.features(&x).expect("one pass");
        let chunked = in_chunks(&x, 3, |x| vit.features(x)).expect("chunks");
        assert_eq!(chunked.dims(), [7, 24]);
        assert_eq!(max_abs_diff(&whole, &chunked), 0.0);

        // A batch larger than a chunk is chunked; a small one, or one under autograd, is not.
        assert_eq!(chunk_images(&x, false, CHUNK_BYTES / 3), Some(3));
        assert_eq!(chunk_images(&x, true, CHUNK_BYTES / 3), None);
        assert_eq!(chunk_images(&x, false, CHUNK_BYTES / 7), None);
    }

    /// In bf16 the encoder's linear layers round both operands (the kernel this process uses:
    /// `.ci/run` runs the tests again under CAF_KERNELS=avx512 and portable): the logits move
    /// from f32's by about bf16's rounding (a near-tie may flip), f32 comes back exactly, a
    /// detached copy keeps the precision, and the generic path (CUDA's) runs its bf16 too.
    #[test]
    fn a_vit_in_bf16_rounds_its_linear_layers() {
        let mut vit = small_vit(32, 2);
        let x = formula::images(16, 5, &candle_core::Device::Cpu).expect("images");
        let f32_logits = vit.logits(&x).expect("f32");
        let scale = f32_logits.abs().expect("abs").max_all().expect("max");
        let scale: f32 = scale.to_scalar().expect("scalar");
        Classifier::set_precision(&mut vit, Precision::Bf16).expect("bf16");
        assert_eq!(vit.precision(), Precision::Bf16);
        let bf16 = vit.logits(&x).expect("bf16");
        let d = max_abs_diff(&bf16, &f32_logits);
        assert!(
            d > 0.0 && d < 0.05 * scale,
            "bf16 vs f32: {d} (logits up to {scale})"
        );
        assert_eq!(
            max_abs_diff(&vit.detached().logits(&x).expect("detached"), &bf16),
            0.0
        );
        let generic = super::super::path::with_generic_path(|| vit.logits(&x)).expect("generic");
        let d = max_abs_diff(&generic, &f32_logits);
        assert!(d > 0.0 && d < 0.05 * scale, "generic bf16 vs f32: {d}");
        Classifier::set_precision(&mut vit, Precision::F32).expect("f32");
        assert_eq!(
            max_abs_diff(&vit.logits(&x).expect("f32 again"), &f32_logits),
            0.0
        );
    }

    /// The rows of an untracked linear layer's output do not depend on how the rows are split
    /// into tasks (`linear_task_rows`), in f32 and in bf16: each half of x alone gives the same
    /// bits as its rows of the whole.
    #[test]
    fn untracked_linear_rows_do_not_depend_on_the_split() {
        for rows in [1, 31, 33, 1000, 1576, 6825, 100_000] {
            let task = linear_task_rows(rows);
            assert!(
                task.is_multiple_of(32) && (32..=LINEAR_ROWS).contains(&task),
                "{rows}: {task}"
            );
            let tasks = rows.div_ceil(task);
            assert!(tasks >= rows.div_ceil(LINEAR_ROWS), "{rows}: {tasks} tasks");
        }
        let (rows, k, n) = (1576, 192, 100);
        let x = randn(1, &[rows, k]);
        let w = randn(2, &[n, k]);
        let l = Linear::new(w.clone(), Some(randn(3, &[n])));
        let values = w.flatten_all().and_then(|w| w.to_vec1::<f32>()).expect("w");
        let packed = Bf16Linear::new(&values, n, k);
        for bf16 in [None, Some(&packed)] {
            let whole = linear_untracked(&l, bf16, &x)
                .expect("linear")
                .expect("untracked");
            for (start, len) in [(0, 97), (97, rows - 97)] {
                let part = x.narrow(0, start, len).expect("narrow");
                let part = linear_untracked(&l, bf16, &part)
                    .expect("part")
                    .expect("untracked");
                let want = whole.narrow(0, start, len).expect("narrow");
                assert_eq!(max_abs_diff(&part, &want), 0.0, "bf16 {}", bf16.is_some());
            }
        }
    }

    /// Without gradients, a linear layer takes the bias-first GEMM; it must agree with candle's
    /// matmul plus bias (and with a tracked input, which keeps the generic path), for row counts
    /// below, at and past a block, without a bias, and with inputs of width 0 (y = the bias).
    #[test]
    fn untracked_linear_matches_matmul_plus_bias() {
        for (rows, k, n, with_bias) in [
            (1, 3, 2, true),
            (LINEAR_ROWS, 8, 5, true),
            (2 * LINEAR_ROWS + 7, 33, 17, true),
            (300, 192, 576, false),
            (5, 0, 3, true),
        ] {
            let x = randn(1, &[rows, k]);
            let w = randn(2, &[n, k]);
            let b = with_bias.then(|| randn(3, &[n]));
            let l = Linear::new(w.clone(), b.clone());
            let fast = linear_untracked(&l, None, &x)
                .expect("linear")
                .expect("the untracked path runs");
            let mut want = x.matmul(&w.t().expect("t")).expect("matmul");
            if let Some(b) = &b {
                want = want.broadcast_add(b).expect("bias");
            }
            assert_eq!(fast.dims(), [rows, n]);
            assert!(max_abs_diff(&fast, &want) < 1e-4, "{rows}×{k}·{k}×{n}");
            let tracked = candle_core::Var::from_tensor(&x).expect("var");
            assert!(linear_untracked(&l, None, tracked.as_tensor())
                .expect("linear")
                .is_none());
            let nd = linear_nd(
                &Dense::from(l.clone()),
                &x.reshape((1, rows, k)).expect("3-D"),
            )
            .expect("nd");
            assert_eq!(nd.dims(), [1, rows, n]);
            let nd = nd.reshape((rows, n)).expect("2-D");
            assert_eq!(max_abs_diff(&nd, &fast), 0.0);
        }
    }
}
