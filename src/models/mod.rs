//! Models: the classifiers caf certifies, and reading their weights.
//!
//! Every classifier takes [B, 3, 32, 32] f32 inputs in [0,1] pixel space and normalises them
//! itself, so Gaussian noise is always added in pixel space, as randomized smoothing assumes.
//!
//! - [`CifarResNet`]: He et al.'s CIFAR ResNet-20/32/44/56/110 (akamaster's form), with
//!   [`CifarResNet::features`] / [`CifarResNet::head`] to split off the final linear layer.
//!   Eval mode on the CPU runs a fused inference path (BatchNorm folded, im2col + GEMM per
//!   image) unless autograd needs the graph; see [`CifarResNet::features_t`].
//! - [`VisionTransformer`] (timm's ViTs, [`vit`]) and [`TvResNet`] (torchvision's ResNet-50,
//!   [`resnet50`]) under their libraries' parameter names; [`Backbone`] is any of the three
//!   networks as a frozen feature extractor for CAF.
//! - [`formula`]: deterministic weights that Python reproduces, for tests without checkpoints.
//! - [`LinearClassifier`]: logits = W·x + b (raw pixels with [`Normalize::IDENTITY`]).
//! - [`adapter`] / [`caf`]: certifying adapters a(·) and CAF models h(φ(x) + a(x)) on a frozen
//!   ResNet backbone, with fused multi-adapter inference ([`FusedCaf`]).
//! - [`trainable`]: whole networks (CIFAR ResNets, ViTs) to train: [`build_trainable`].
//! - [`load_state_dict`]: safetensors, PyTorch zip or legacy PyTorch pickle checkpoints.
//! - [`load_classifier`]: both together, with names and shapes checked against the arch.

pub mod adapter;
mod amx;
mod attention;
pub mod backbone;
mod bf16_linear;
mod block;
pub mod bn;
pub mod caf;
mod channel;
pub mod conv;
mod convbn;
mod direct;
pub mod dncnn;
pub mod formula;
mod gelu;
pub mod gemm;
mod im2col;
pub mod init;
pub mod int8;
mod lanes;
mod linear;
pub mod onnx;
pub mod path;
mod pickle;
mod plane_conv;
mod planes;
mod pointwise;
mod precision;
pub mod relu;
mod resnet;
pub mod resnet50;
mod resnet_eval;
mod rowwise;
mod shortcut;
mod simd;
pub mod trainable;
mod trunk;
pub mod vit;
mod weights;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

pub use crate::arch::{Arch, Normalize, OnnxOutputs, VitName};
pub use adapter::{Adapter, AdapterArch, AdapterCost};
pub use backbone::Backbone;
pub use caf::{build_caf, load_caf, CafModel, FusedCaf};
pub use linear::LinearClassifier;
pub use onnx::{load_onnx, OnnxNet};
pub use precision::Precision;
pub use resnet::{BasicBlock, CifarResNet, FEATURE_DIM};
pub use resnet50::TvResNet;
pub use trainable::{build_trainable, build_trainable_resnet, init_classes};
pub use vit::{VisionTransformer, VitConfig};
pub use weights::{detect_format, load_state_dict, WeightFormat};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error(transparent)]
    UnknownArch(#[from] crate::arch::UnknownArch),
    /// A model description or tensor set that does not fit (no file involved): an adapter
    /// spec, an initial state dict; `context` says what was being built.
    #[error("{context}: {message}")]
    Invalid { context: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An ONNX graph with an operator tract cannot run; found before anything runs.
    #[error(
        "{path}: ONNX operator `{op}` (node `{node}`) is not supported by tract, caf's ONNX \
         runtime; re-export the model without it, or replace it by supported operators"
    )]
    UnsupportedOnnxOp {
        path: PathBuf,
        op: String,
        node: String,
    },
    /// An ONNX model asked for on a device other than the CPU: tract runs on the CPU only.
    #[error(
        "{path}: an ONNX graph runs on the CPU only (tract, caf's ONNX runtime), not on \
         {device}; run it with `--device cpu`"
    )]
    OnnxNeedsCpu { path: PathBuf, device: String },
}

impl ModelError {
    pub(crate) fn weights(path: &Path, message: impl Into<String>) -> Self {
        ModelError::Weights {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// A classifier on [B, 3, 32, 32] f32 inputs in [0,1] pixel space.
pub trait Classifier: Send + Sync {
    /// Logits [B, classes].
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    fn num_classes(&self) -> usize;

    /// The square image side the model takes where only the loaded model knows it (an ONNX
    /// graph's fixed input); the built architectures' is `Arch::input_size`.
    fn input_size(&self) -> Option<usize> {
        None
    }

    /// Runs [`logits`](Classifier::logits) in `precision` from now on. Only CIFAR ResNets, ViTs
    /// and CAF models on them have a bf16 mode, and only CIFAR ResNets and convolutional
    /// adapters an int8 mode; the others accept f32 only.
    fn set_precision(&mut self, precision: Precision) -> Result<(), ModelError> {
        match precision {
            Precision::F32 => Ok(()),
            other => Err(ModelError::Invalid {
                context: format!("precision {other}"),
                message: "only CIFAR ResNets (bf16, int8), ViTs (bf16) and CAF models on them \
                          run in another precision than f32"
                    .to_string(),
            }),
        }
    }
}

/// A warning, when the fused CPU path would run `precision`'s products on its emulated (f32)
/// GEMM: this CPU (or `CAF_KERNELS`) offers no kernel for it. `None` for f32, or when one runs.
pub fn emulated_precision_note(precision: Precision) -> Option<&'static str> {
    match precision {
        Precision::F32 => None,
        Precision::Bf16 => (!gemm::bf16_kernel_available())
            .then_some("this CPU has no AMX or AVX-512 BF16: bf16 runs the emulated (f32) GEMM"),
        Precision::Int8 => (int8::int8_kernel() == int8::Int8Kernel::Emulated).then_some(
            "this CPU has no AMX-INT8 or AVX-512 VNNI: int8 runs the emulated (f32) GEMM",
        ),
    }
}

/// Builds `arch` and loads `weights` (safetensors, PyTorch zip, or legacy PyTorch pickle).
///
/// The number of classes is read from the weights. Names must match the architecture exactly
/// (apart from BatchNorm's `num_batches_tracked`, which is ignored); otherwise the error lists
/// the missing, unexpected and mis-shaped tensors.
pub fn load_classifier(
    arch: Arch,
    weights: &Path,
    normalize: Normalize,
    device: &Device,
) -> Result<Box<dyn Classifier>, ModelError> {
    Ok(match arch {
        Arch::Linear => Box::new(load_linear(weights, normalize, device)?),
        Arch::CifarResNet { depth } => {
            Box::new(load_cifar_resnet(depth, weights, normalize, device)?)
        }
        Arch::Vit(_) | Arch::ResNet50 => Box::new(load_backbone(arch, weights, normalize, device)?),
        Arch::Onnx => Box::new(load_onnx(
            weights,
            &OnnxOutputs::default(),
            normalize,
            device,
        )?),
    })
}

/// Loads any architecture that can serve as a frozen backbone (not `linear`).
pub fn load_backbone(
    arch: Arch,
    weights: &Path,
    normalize: Normalize,
    device: &Device,
) -> Result<Backbone, ModelError> {
    Ok(match arch {
        Arch::Linear => {
            return Err(ModelError::Invalid {
                context: format!("backbone {arch}"),
                message: "a linear classifier has no features to serve as a backbone".into(),
            })
        }
        Arch::CifarResNet { depth } => load_cifar_resnet(depth, weights, normalize, device)?.into(),
        Arch::Vit(name) => load_vit(VitConfig::named(name), weights, normalize, device)?.into(),
        Arch::ResNet50 => {
            let vb = checked_var_builder(arch, weights, device)?;
            let classes = classes_in(arch, &vb.1).unwrap_or(0);
            TvResNet::new(resnet50::RESNET50_LAYERS, classes, normalize, vb.0)?.into()
        }
        // The outputs under their default names; `load_onnx` takes others.
        Arch::Onnx => load_onnx(weights, &OnnxOutputs::default(), normalize, device)?.into(),
    })
}

/// `arch` with [`formula`] weights (deterministic, not trained): for benchmarks and tests of
/// architectures with no checkpoint on the machine.
pub fn formula_backbone(
    arch: Arch,
    num_classes: usize,
    normalize: Normalize,
    device: &Device,
) -> Result<Backbone, ModelError> {
    let vb = formula::var_builder(&expected_tensors(arch, num_classes)?, device)?;
    Ok(match arch {
        Arch::Linear => {
            return Err(ModelError::Invalid {
                context: format!("backbone {arch}"),
                message: "a linear classifier has no features to serve as a backbone".into(),
            })
        }
        Arch::CifarResNet { depth } => CifarResNet::new(depth, num_classes, normalize, vb)?.into(),
        Arch::Vit(name) => {
            VisionTransformer::new(VitConfig::named(name), num_classes, normalize, vb)?.into()
        }
        Arch::ResNet50 => {
            TvResNet::new(resnet50::RESNET50_LAYERS, num_classes, normalize, vb)?.into()
        }
        Arch::Onnx => {
            return Err(ModelError::Invalid {
                context: format!("backbone {arch}"),
                message: "an ONNX graph has no formula weights".into(),
            })
        }
    })
}

/// A timm ViT of any configuration `cfg` from a checkpoint under timm's names (the named
/// architectures are [`VitConfig::named`]).
pub fn load_vit(
    cfg: VitConfig,
    weights: &Path,
    normalize: Normalize,
    device: &Device,
) -> Result<VisionTransformer, ModelError> {
    let what = format!("ViT {cfg:?}");
    let vb = checked_var_builder_with(&what, "head.weight", weights, device, |classes| {
        record_tensors(|vb| {
            VisionTransformer::new(cfg, classes, Normalize::IDENTITY, vb).map(|_| ())
        })
    })?;
    let classes =
        vb.1.get("head.weight")
            .and_then(|d| d.first().copied())
            .unwrap_or(0);
    Ok(VisionTransformer::new(cfg, classes, normalize, vb.0)?)
}

/// [`load_classifier`] for a ResNet, keeping the concrete type (for `features` / `head`).
pub fn load_cifar_resnet(
    depth: usize,
    weights: &Path,
    normalize: Normalize,
    device: &Device,
) -> Result<CifarResNet, ModelError> {
    let arch = Arch::CifarResNet { depth };
    let vb = checked_var_builder(arch, weights, device)?;
    let classes = classes_in(arch, &vb.1).unwrap_or(0);
    Ok(CifarResNet::new(depth, classes, normalize, vb.0)?)
}

/// [`load_classifier`] for the linear arch, keeping the concrete type.
pub fn load_linear(
    weights: &Path,
    normalize: Normalize,
    device: &Device,
) -> Result<LinearClassifier, ModelError> {
    let vb = checked_var_builder(Arch::Linear, weights, device)?;
    let classes = classes_in(Arch::Linear, &vb.1).unwrap_or(0);
    Ok(LinearClassifier::new(classes, normalize, vb.0)?)
}

/// The tensor whose first dimension is the number of classes.
fn class_tensor(arch: Arch) -> &'static str {
    match arch {
        Arch::Linear => "weight",
        Arch::CifarResNet { .. } => "linear.weight",
        Arch::Vit(_) => "head.weight",
        Arch::ResNet50 => "fc.weight",
        // Never asked: an ONNX graph is not read as a state dict.
        Arch::Onnx => "",
    }
}

fn classes_in(arch: Arch, shapes: &HashMap<String, Vec<usize>>) -> Option<usize> {
    shapes
        .get(class_tensor(arch))
        .and_then(|d| d.first().copied())
        .filter(|&c| c > 0)
}

pub(crate) fn is_ignored(name: &str) -> bool {
    name == "num_batches_tracked" || name.ends_with(".num_batches_tracked")
}

/// Reads `weights`, checks them against `arch`, and returns a VarBuilder over them (as f32)
/// together with the shapes that were read.
fn checked_var_builder(
    arch: Arch,
    weights: &Path,
    device: &Device,
) -> Result<(VarBuilder<'static>, HashMap<String, Vec<usize>>), ModelError> {
    checked_var_builder_with(
        &arch.to_string(),
        class_tensor(arch),
        weights,
        device,
        |c| expected_tensors(arch, c),
    )
}

/// [`checked_var_builder`] for the network `what` whose class count is the first dimension
/// of `class_tensor` and whose tensors with `classes` classes are `expected(classes)`.
fn checked_var_builder_with(
    what: &str,
    class_tensor: &str,
    weights: &Path,
    device: &Device,
    expected: impl FnOnce(usize) -> Result<NamedShapes, ModelError>,
) -> Result<(VarBuilder<'static>, HashMap<String, Vec<usize>>), ModelError> {
    let arch = what;
    let mut tensors = load_state_dict(weights, device)?;
    tensors.retain(|name, _| !is_ignored(name));
    let shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let classes = match shapes
        .get(class_tensor)
        .and_then(|d| d.first().copied())
        .filter(|&c| c > 0)
    {
        Some(c) => c,
        None => {
            let found = match shapes.get(class_tensor) {
                Some(dims) => format!("has shape {dims:?}"),
                None => "is missing".to_string(),
            };
            return Err(ModelError::weights(
                weights,
                format!(
                    "cannot read the number of classes for {arch}: `{}` {found}{}",
                    class_tensor,
                    describe_names(&shapes)
                ),
            ));
        }
    };
    let expected = expected(classes)?;
    if let Some(problems) = compare_names(&expected, &shapes) {
        return Err(ModelError::weights(
            weights,
            format!("weights do not fit {arch} with {classes} classes: {problems}"),
        ));
    }
    let mut f32_tensors = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F64 | DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
            other => {
                return Err(ModelError::weights(
                    weights,
                    format!("tensor `{name}` has dtype {other:?}; expected floating point"),
                ))
            }
        };
        f32_tensors.insert(name, t);
    }
    Ok((
        VarBuilder::from_tensors(f32_tensors, DType::F32, device),
        shapes,
    ))
}

/// A hint at what the file holds, for the error when the class tensor is absent.
fn describe_names(shapes: &HashMap<String, Vec<usize>>) -> String {
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    let shown: Vec<&str> = names.iter().take(8).map(|s| s.as_str()).collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        " (the file holds {} tensors: {}{})",
        names.len(),
        shown.join(", "),
        if more > 0 {
            format!(", … and {more} more")
        } else {
            String::new()
        }
    )
}

/// The names and shapes of every tensor `arch` reads, in construction order.
///
/// Found by building the model over a recording VarBuilder, so it cannot drift from the
/// constructors.
pub fn expected_tensors(
    arch: Arch,
    num_classes: usize,
) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    if arch == Arch::Onnx {
        return Err(ModelError::Invalid {
            context: format!("backbone {arch}"),
            message: "an ONNX graph holds its own weights; there are no tensors to name".into(),
        });
    }
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    match arch {
        Arch::Linear => {
            LinearClassifier::new(num_classes, Normalize::IDENTITY, vb)?;
        }
        Arch::CifarResNet { depth } => {
            CifarResNet::new(depth, num_classes, Normalize::IDENTITY, vb)?;
        }
        Arch::Vit(name) => {
            VisionTransformer::new(VitConfig::named(name), num_classes, Normalize::IDENTITY, vb)?;
        }
        Arch::ResNet50 => {
            TvResNet::new(
                resnet50::RESNET50_LAYERS,
                num_classes,
                Normalize::IDENTITY,
                vb,
            )?;
        }
        Arch::Onnx => {}
    }
    let seen = recorder
        .0
        .lock()
        .map(|v| v.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    Ok(seen)
}

type NamedShapes = Vec<(String, Vec<usize>)>;

/// The names and shapes of every tensor `build` reads from the VarBuilder it is given, in the
/// order it reads them (the same recording trick as [`expected_tensors`], for other models).
pub(crate) fn record_tensors(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<NamedShapes, ModelError> {
    let recorder = Recorder::default();
    build(VarBuilder::from_backend(
        Box::new(recorder.clone()),
        DType::F32,
        Device::Cpu,
    ))?;
    let seen = recorder
        .0
        .lock()
        .map(|v| v.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    Ok(seen)
}

/// Hands out zeros and remembers what was asked for.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<NamedShapes>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.0.lock() {
            Ok(mut seen) => seen.push((name.to_string(), s.dims().to_vec())),
            Err(_) => candle_core::bail!("shape recorder poisoned"),
        }
        Tensor::zeros(s, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder needs a shape for `{name}`")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Lists missing, unexpected and mis-shaped tensors; `None` when names and shapes all match.
pub fn compare_names(
    expected: &[(String, Vec<usize>)],
    actual: &HashMap<String, Vec<usize>>,
) -> Option<String> {
    let expected_map: BTreeMap<&str, &Vec<usize>> =
        expected.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    for (name, want) in &expected_map {
        match actual.get(*name) {
            None => missing.push(format!("{name} {want:?}")),
            Some(got) if got != *want => {
                misshaped.push(format!("{name} expected {want:?}, found {got:?}"))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = actual
        .iter()
        .filter(|(k, _)| !expected_map.contains_key(k.as_str()) && !is_ignored(k))
        .map(|(k, v)| format!("{k} {v:?}"))
        .collect();
    unexpected.sort();
    let mut parts = Vec::new();
    for (label, list) in [
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ] {
        if list.is_empty() {
            continue;
        }
        const SHOW: usize = 12;
        let more = list.len().saturating_sub(SHOW);
        let mut shown = list
            .iter()
            .take(SHOW)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if more > 0 {
            shown.push_str(&format!(", … and {more} more"));
        }
        parts.push(format!("{} {label}: {shown}", list.len()));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod backbone_tests;

/// `rel` under the shared data: `../shared/data` beside the checkout the tests were built in, or
/// `CAF_TEST_SHARED_DATA` where set, so a test binary built on one machine finds the data on
/// another (scripts/gpu-check.sh --prebuilt runs the CUDA tests so).
#[cfg(test)]
pub(crate) fn shared_data(rel: &str) -> std::path::PathBuf {
    match std::env::var_os("CAF_TEST_SHARED_DATA") {
        Some(root) => std::path::PathBuf::from(root).join(rel),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel),
    }
}

/// The pretrained akamaster ResNet-20 from `../shared/data`, detached (tests of frozen use).
#[cfg(test)]
pub(crate) fn test_resnet20() -> CifarResNet {
    let path = shared_data("pretrained/akamaster/resnet20-12fca82f.th");
    let norm = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    load_cifar_resnet(20, &path, norm, &Device::Cpu)
        .and_then(|m| m.detached().map_err(ModelError::from))
        .expect("pretrained ResNet-20 from ../shared/data")
}

#[cfg(test)]
mod generic_tests;

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
