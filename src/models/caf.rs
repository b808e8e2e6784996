//! Certifying-adapter models (CAF, arXiv 2405.16036): logits = h(φ(x) + a(x)) with φ a frozen
//! backbone's penultimate features, a an [`Adapter`] reading the same (noisy) image, and h a
//! new linear head. Only a and h are trained; one backbone can serve several adapters
//! ([`FusedCaf`], one per σ).
//!
//! Tensor names, as [`build_caf`] creates them in a VarMap and [`load_caf`] expects them in a
//! weights file: the adapter's under `adapter.` (see [`super::adapter`]), the head's as
//! `head.weight` `[classes, d]` and `head.bias` `[classes]`. The backbone is never saved with
//! them; it comes from its own checkpoint.
//!
//! The head starts as PyTorch's default `nn.Linear` (the released code's `fc`): weight and
//! bias U(±1/√d), i.e. kaiming_uniform with a = √5. With the adapter's zero-initialised last
//! layer, step 0 is a fresh linear probe on φ.
//!
//! [`super::trainable`] holds the full-network counterpart for RS / SmoothAdv / clean training.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder, VarMap};

use super::adapter::{Adapter, AdapterArch};
use super::precision::Precision;
use super::{
    compare_names, is_ignored, load_state_dict, record_tensors, Backbone, Classifier, ModelError,
    Normalize, FEATURE_DIM,
};

/// The new linear head d → classes with PyTorch's default initialisation.
fn new_head(d: usize, num_classes: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (d as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((num_classes, d), "weight", init)?;
    let bias = vb.get_with_hints(num_classes, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// Builds adapter and head over `vb` with the names of the module docs.
/// `d` is the backbone's feature width: the adapter's output is projected to it and added to
/// φ(x), whatever the backbone (a CIFAR ResNet's 64, a ViT's embedding width, ResNet-50's 2048).
fn adapter_and_head(
    arch: &AdapterArch,
    normalize: Normalize,
    d: usize,
    num_classes: usize,
    vb: &VarBuilder,
) -> Result<(Adapter, Linear)> {
    if num_classes == 0 {
        candle_core::bail!("a classifier needs at least one class");
    }
    let adapter = Adapter::new(arch, d, normalize, vb.pp("adapter"))?;
    let head = new_head(d, num_classes, vb.pp("head"))?;
    Ok((adapter, head))
}

/// Names and shapes of every tensor a CAF model's adapter and head hold (running statistics
/// included), in construction order, on a CIFAR ResNet backbone (feature width 64).
pub fn caf_expected_tensors(
    arch: &AdapterArch,
    num_classes: usize,
) -> std::result::Result<Vec<(String, Vec<usize>)>, ModelError> {
    caf_expected_tensors_for(arch, FEATURE_DIM, num_classes)
}

/// [`caf_expected_tensors`] on a backbone of feature width `d`: what [`build_caf`] creates and
/// [`load_caf`] expects.
pub fn caf_expected_tensors_for(
    arch: &AdapterArch,
    d: usize,
    num_classes: usize,
) -> std::result::Result<Vec<(String, Vec<usize>)>, ModelError> {
    arch.validate()?;
    record_tensors(|vb| {
        adapter_and_head(arch, Normalize::IDENTITY, d, num_classes, &vb).map(|_| ())
    })
}

pub(crate) fn is_running_stat(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The VarMap's vars named in `expected`, minus BatchNorm running statistics, in that order.
pub(crate) fn trainable_vars(
    varmap: &VarMap,
    expected: &[(String, Vec<usize>)],
) -> std::result::Result<Vec<Var>, ModelError> {
    let data = varmap.data().lock().map_err(|_| ModelError::Invalid {
        context: "collecting trainable variables".into(),
        message: "the VarMap's lock is poisoned (a thread panicked while holding it)".into(),
    })?;
    expected
        .iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(name, _)| {
            data.get(name).cloned().ok_or_else(|| ModelError::Invalid {
                context: "collecting trainable variables".into(),
                message: format!("`{name}` was not created in the VarMap"),
            })
        })
        .collect()
}

/// φ + a → h, shared by [`CafModel`] and [`FusedCaf`] so both compute the same bits.
fn head_on(head: &Linear, phi: &Tensor, a: &Tensor) -> Result<Tensor> {
    head.forward(&(phi + a)?)
}

fn check_members(backbone: &Backbone, adapter: &Adapter, head: &Linear) -> Result<usize> {
    let (classes, d) = head.weight().dims2()?;
    let want = backbone.feature_dim();
    if adapter.out_dim() != want || d != want {
        candle_core::bail!(
            "CAF needs adapter and head of the backbone's feature width {want}, got \
             adapter {} and head input {d}",
            adapter.out_dim()
        );
    }
    if adapter.normalize() != backbone.normalize() {
        candle_core::bail!(
            "adapter normalises inputs as {:?}, the backbone as {:?}",
            adapter.normalize(),
            backbone.normalize()
        );
    }
    Ok(classes)
}

/// logits = head(φ(x) + a(x)) with φ frozen.
#[derive(Clone, Debug)]
pub struct CafModel {
    /// Detached: plain tensors, always run in eval mode (the fused CPU path where it has one).
    backbone: Backbone,
    adapter: Adapter,
    head: Linear,
    num_classes: usize,
}

impl CafModel {
    /// Puts the parts together. The backbone is detached here, so nothing the caller does
    /// with its own copy can make gradients reach it.
    pub fn new(backbone: impl Into<Backbone>, adapter: Adapter, head: Linear) -> Result<Self> {
        let backbone = backbone.into();
        let num_classes = check_members(&backbone, &adapter, &head)?;
        Ok(Self {
            backbone: backbone.detached()?,
            adapter,
            head,
            num_classes,
        })
    }

    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    pub fn head(&self) -> &Linear {
        &self.head
    }

    /// A copy with adapter and head detached from autograd (sharing storage), e.g. to keep
    /// certifying a model while its VarMap goes on training.
    pub fn detached(&self) -> Result<Self> {
        Ok(Self {
            backbone: self.backbone.clone(),
            adapter: self.adapter.detached()?,
            head: Linear::new(
                self.head.weight().detach(),
                self.head.bias().map(Tensor::detach),
            ),
            num_classes: self.num_classes,
        })
    }

    /// Eval-mode logits from φ(x) computed elsewhere (one backbone pass shared by several
    /// models): `phi` must be `backbone().features(x)`; bitwise equal to
    /// [`Classifier::logits`], which calls this. Detached, like it.
    pub fn logits_from_features(&self, phi: &Tensor, x: &Tensor) -> Result<Tensor> {
        let a = self.adapter.forward_no_grad(x)?;
        Ok(head_on(&self.head, &phi.detach(), &a)?.detach())
    }

    /// φ(x): eval mode, and detached so no gradient flows into the backbone, even if the
    /// input is tracked (a gradient-based attack through φ needs its own entry point).
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.backbone.features_t(x, false)?.detach())
    }
}

impl ModuleT for CafModel {
    /// Training path: φ frozen in eval mode, the adapter in `train` mode (BatchNorm batch
    /// statistics, running statistics updated).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let phi = self.features(x)?;
        let a = self.adapter.forward_t(x, train)?;
        head_on(&self.head, &phi, &a)
    }
}

impl Classifier for CafModel {
    /// Eval mode through the fused CPU paths of both networks, whether or not the adapter's
    /// parameters are tracked by autograd; the logits are detached (no graph is kept).
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_from_features(&self.features(x)?, x)
    }

    fn num_classes(&self) -> usize {
        self.num_classes
    }

    fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        Classifier::set_precision(&mut self.backbone, precision)?;
        self.adapter.set_precision(precision)
    }
}

/// Builds adapter (`arch`, under `adapter.`) and head (under `head.`) in `varmap` for
/// training on top of `backbone`, which is detached (frozen).
///
/// Returns the model and its trainable variables in construction order: every weight and
/// bias of adapter and head, BatchNorm γ/β included, running statistics not. Names already in
/// `varmap` (e.g. loaded to resume) are reused, not re-initialised.
pub fn build_caf(
    backbone: impl Into<Backbone>,
    arch: &AdapterArch,
    num_classes: usize,
    varmap: &VarMap,
    device: &Device,
) -> std::result::Result<(CafModel, Vec<Var>), ModelError> {
    build_caf_seeded(backbone, arch, num_classes, varmap, device, 0)
}

/// [`build_caf`] with new variables drawn reproducibly from `seed` (see [`super::init`]), so a
/// training job's starting point is a function of its parameters.
pub fn build_caf_seeded(
    backbone: impl Into<Backbone>,
    arch: &AdapterArch,
    num_classes: usize,
    varmap: &VarMap,
    device: &Device,
    seed: u64,
) -> std::result::Result<(CafModel, Vec<Var>), ModelError> {
    arch.validate()?;
    let backbone = backbone.into();
    let d = backbone.feature_dim();
    let vb = super::init::seeded_var_builder(varmap, seed, device);
    let (adapter, head) = adapter_and_head(arch, backbone.normalize(), d, num_classes, &vb)?;
    let model = CafModel::new(backbone, adapter, head)?;
    let vars = trainable_vars(varmap, &caf_expected_tensors_for(arch, d, num_classes)?)?;
    Ok((model, vars))
}

/// Reads a weights file (safetensors, e.g. a [`build_caf`] VarMap saved after training, or a
/// PyTorch checkpoint with the same names) into f32 tensors checked against `expected`.
fn read_checked(
    weights: &Path,
    expected: &[(String, Vec<usize>)],
    what: &str,
    device: &Device,
) -> std::result::Result<HashMap<String, Tensor>, ModelError> {
    let mut tensors = load_state_dict(weights, device)?;
    tensors.retain(|name, _| !is_ignored(name));
    let shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    if let Some(problems) = compare_names(expected, &shapes) {
        return Err(ModelError::weights(
            weights,
            format!("weights do not fit {what}: {problems}"),
        ));
    }
    to_f32(tensors, |name, dtype| {
        ModelError::weights(
            weights,
            format!("tensor `{name}` has dtype {dtype:?}; expected floating point"),
        )
    })
}

pub(crate) fn to_f32(
    tensors: HashMap<String, Tensor>,
    not_float: impl Fn(&str, DType) -> ModelError,
) -> std::result::Result<HashMap<String, Tensor>, ModelError> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = match t.dtype() {
                DType::F32 => t,
                DType::F64 | DType::F16 | DType::BF16 => t.to_dtype(DType::F32)?,
                other => return Err(not_float(&name, other)),
            };
            Ok((name, t))
        })
        .collect()
}

/// The number of classes of a saved CAF model: the rows of its `head.weight`.
pub fn head_classes(weights: &Path) -> std::result::Result<usize, ModelError> {
    let tensors = load_state_dict(weights, &Device::Cpu)?;
    match tensors.get("head.weight").map(|t| t.dims()) {
        Some([classes, _]) => Ok(*classes),
        _ => Err(ModelError::Weights {
            path: weights.to_path_buf(),
            message: "no two-dimensional head.weight: not a CAF adapter + head file".into(),
        }),
    }
}

/// Loads a trained adapter + head (names as [`build_caf`] writes them) for certification on
/// top of `backbone`. Names and shapes must match `arch` with `num_classes` exactly (apart
/// from `num_batches_tracked`); otherwise the error lists the missing, unexpected and
/// mis-shaped tensors.
pub fn load_caf(
    backbone: impl Into<Backbone>,
    arch: &AdapterArch,
    num_classes: usize,
    weights: &Path,
    device: &Device,
) -> std::result::Result<CafModel, ModelError> {
    let backbone = backbone.into();
    let (adapter, head) = load_member(&backbone, arch, num_classes, weights, device)?;
    Ok(CafModel::new(backbone, adapter, head)?)
}

fn load_member(
    backbone: &Backbone,
    arch: &AdapterArch,
    num_classes: usize,
    weights: &Path,
    device: &Device,
) -> std::result::Result<(Adapter, Linear), ModelError> {
    let d = backbone.feature_dim();
    let expected = caf_expected_tensors_for(arch, d, num_classes)?;
    let what = format!("CAF adapter {arch} with a {num_classes}-class head on width {d}");
    let tensors = read_checked(weights, &expected, &what, device)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(adapter_and_head(
        arch,
        backbone.normalize(),
        d,
        num_classes,
        &vb,
    )?)
}

/// Several CAF models on one backbone (e.g. one adapter + head per σ): φ(x) is computed once
/// per batch and shared.
#[derive(Clone, Debug)]
pub struct FusedCaf {
    backbone: Backbone,
    members: Vec<(Adapter, Linear)>,
    num_classes: usize,
}

impl FusedCaf {
    /// All members must share the backbone's feature width and normalisation and have the
    /// same number of classes.
    pub fn new(
        backbone: impl Into<Backbone>,
        members: Vec<(Adapter, Linear)>,
    ) -> std::result::Result<Self, ModelError> {
        let backbone = backbone.into();
        let mut num_classes = None;
        for (i, (adapter, head)) in members.iter().enumerate() {
            let classes =
                check_members(&backbone, adapter, head).map_err(|e| ModelError::Invalid {
                    context: format!("fused CAF member {i}"),
                    message: e.to_string(),
                })?;
            if *num_classes.get_or_insert(classes) != classes {
                return Err(ModelError::Invalid {
                    context: format!("fused CAF member {i}"),
                    message: format!(
                        "has {classes} classes, member 0 has {}",
                        num_classes.unwrap_or(0)
                    ),
                });
            }
        }
        Ok(Self {
            backbone: backbone.detached()?,
            members,
            num_classes: num_classes.unwrap_or(0),
        })
    }

    /// Loads one adapter + head per `(arch, weights)` pair, as [`load_caf`] does.
    pub fn load(
        backbone: impl Into<Backbone>,
        members: &[(AdapterArch, &Path)],
        num_classes: usize,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let backbone = backbone.into();
        let loaded = members
            .iter()
            .map(|(arch, path)| load_member(&backbone, arch, num_classes, path, device))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::new(backbone, loaded)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Runs the backbone and every adapter in `precision` from now on (bf16 needs a
    /// backbone with a fused CPU path: a CIFAR ResNet).
    pub fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        Classifier::set_precision(&mut self.backbone, precision)?;
        for (adapter, _) in &mut self.members {
            adapter.set_precision(precision)?;
        }
        Ok(())
    }

    /// Member `i` as a stand-alone model (sharing tensors), e.g. to certify one σ alone.
    pub fn member(&self, i: usize) -> Option<CafModel> {
        let (adapter, head) = self.members.get(i)?;
        Some(CafModel {
            backbone: self.backbone.clone(),
            adapter: adapter.clone(),
            head: head.clone(),
            num_classes: self.num_classes,
        })
    }

    /// Each member's eval-mode logits [B, classes] for the batch `x`, in member order; the
    /// backbone runs once. Bitwise equal to each member's [`CafModel`] `logits`.
    pub fn logits_all(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let phi = self.backbone.features_t(x, false)?.detach();
        self.members
            .iter()
            .map(|(adapter, head)| Ok(head_on(head, &phi, &adapter.forward_no_grad(x)?)?.detach()))
            .collect()
    }
}

#[cfg(test)]
#[path = "caf_tests.rs"]
mod tests;
