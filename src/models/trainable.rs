//! Whole networks to train (RS, SmoothAdv, clean training), as opposed to CAF's frozen backbone
//! with a trained adapter and head ([`super::caf`]): every parameter lives in a VarMap under the
//! name the architecture's checkpoints use, so the saved VarMap loads like any checkpoint.
//!
//! From scratch the weights are drawn from a seeded stream ([`super::init`]), so a training job
//! starts from the same weights in every run; from `init` (a state dict of the same architecture
//! and classes) every tensor is copied in, after its names and shapes are checked.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::caf::{to_f32, trainable_vars};
use super::vit::VitConfig;
use super::{
    compare_names, expected_tensors, is_ignored, Arch, Backbone, CifarResNet, ModelError,
    Normalize, VisionTransformer,
};

/// `arch` as a network to train: a CIFAR ResNet ([`build_trainable_resnet`]) or a ViT (timm's
/// initialisation from scratch: linear weights and the position embedding N(0, 0.02²), zero
/// biases, the class token N(0, 10⁻¹²)). Returns the network and its trainable variables.
pub fn build_trainable(
    arch: Arch,
    num_classes: usize,
    normalize: Normalize,
    varmap: &VarMap,
    device: &Device,
    init: Option<&HashMap<String, Tensor>>,
) -> Result<(Backbone, Vec<Var>), ModelError> {
    match arch {
        Arch::CifarResNet { depth } => {
            let (net, vars) =
                build_trainable_resnet(depth, num_classes, normalize, varmap, device, init)?;
            Ok((net.into(), vars))
        }
        Arch::Vit(name) => {
            let cfg = VitConfig::named(name);
            let (net, vars) = build_whole(arch, num_classes, varmap, device, init, |vb| {
                VisionTransformer::new(cfg, num_classes, normalize, vb)
            })?;
            Ok((net.into(), vars))
        }
        Arch::Linear | Arch::ResNet50 | Arch::Onnx => Err(ModelError::Invalid {
            context: format!("trainable {arch}"),
            message: "caf trains whole CIFAR ResNets (resnet20/32/44/56/110) and ViTs; \
                      use this network as a frozen backbone (CAF) or smooth it as it is"
                .into(),
        }),
    }
}

/// The classes of a state dict of `arch` to train from: the rows of its classifier's weight
/// (`linear.weight` in akamaster's CIFAR ResNets, `head.weight` in timm's ViTs).
pub fn init_classes(arch: Arch, init: &HashMap<String, Tensor>) -> Option<usize> {
    let name = match arch {
        Arch::CifarResNet { .. } => "linear.weight",
        Arch::Vit(_) => "head.weight",
        Arch::Linear | Arch::ResNet50 | Arch::Onnx => return None,
    };
    match init.get(name).map(Tensor::dims) {
        Some(&[classes, _]) => Some(classes),
        _ => None,
    }
}

/// A CIFAR ResNet of `depth` whose parameters live in `varmap` (names at the root, as in
/// akamaster's checkpoints, so the saved VarMap loads with
/// [`load_cifar_resnet`](super::load_cifar_resnet)), for RS / SmoothAdv training.
///
/// From scratch (`init = None`) the initialisation is akamaster's: conv and linear weights
/// kaiming-normal (fan-in, gain √2), linear bias U(±1/√64), BN γ = 1, β = 0. With `init` (a
/// pretrained state dict of the same arch and classes) every tensor, running statistics
/// included, is copied into the vars; the names must match exactly (apart from
/// `num_batches_tracked`), otherwise the error lists what differs.
///
/// Returns the network and its trainable variables (weights and biases, BN γ/β; not the
/// running statistics) in construction order. In train mode the network runs candle's ops
/// and BatchNorm updates the running statistics in `varmap`; in eval mode with tracked
/// parameters it also runs candle's ops. For certification after training, take
/// [`CifarResNet::detached`], which runs the fused CPU path.
pub fn build_trainable_resnet(
    depth: usize,
    num_classes: usize,
    normalize: Normalize,
    varmap: &VarMap,
    device: &Device,
    init: Option<&HashMap<String, Tensor>>,
) -> Result<(CifarResNet, Vec<Var>), ModelError> {
    let arch = Arch::CifarResNet { depth };
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        return Err(ModelError::Invalid {
            context: format!("trainable {arch}"),
            message: "CIFAR ResNet depth must be 6n + 2 with n >= 1".into(),
        });
    }
    build_whole(arch, num_classes, varmap, device, init, |vb| {
        CifarResNet::new(depth, num_classes, normalize, vb)
    })
}

/// What every whole-network builder shares: `init` checked against the architecture's
/// tensors, the network built over seeded vars in `varmap`, `init` copied into them.
fn build_whole<M>(
    arch: Arch,
    num_classes: usize,
    varmap: &VarMap,
    device: &Device,
    init: Option<&HashMap<String, Tensor>>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<M>,
) -> Result<(M, Vec<Var>), ModelError> {
    if num_classes == 0 {
        return Err(ModelError::Invalid {
            context: format!("trainable {arch}"),
            message: "a classifier needs at least one class".into(),
        });
    }
    let expected = expected_tensors(arch, num_classes)?;
    let context = || format!("initial weights for {arch} with {num_classes} classes");
    let init = match init {
        None => None,
        Some(tensors) => {
            let tensors: HashMap<String, Tensor> = tensors
                .iter()
                .filter(|(name, _)| !is_ignored(name))
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect();
            let shapes = tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            if let Some(problems) = compare_names(&expected, &shapes) {
                return Err(ModelError::Invalid {
                    context: context(),
                    message: problems,
                });
            }
            Some(to_f32(tensors, |name, dtype| ModelError::Invalid {
                context: context(),
                message: format!("tensor `{name}` has dtype {dtype:?}; expected floating point"),
            })?)
        }
    };
    // Seeded so that training from scratch starts from the same weights in every run.
    let model = build(super::init::seeded_var_builder(varmap, 0, device))?;
    if let Some(init) = init {
        let data = varmap.data().lock().map_err(|_| ModelError::Invalid {
            context: context(),
            message: "the VarMap's lock is poisoned (a thread panicked while holding it)".into(),
        })?;
        for (name, _) in &expected {
            let (Some(var), Some(t)) = (data.get(name), init.get(name)) else {
                return Err(ModelError::Invalid {
                    context: context(),
                    message: format!("`{name}` is missing from the VarMap or the state dict"),
                });
            };
            // The network's layers share these vars' storage, so setting them in place is
            // enough (BatchNorm's running statistics, a ViT's reshaped patch projection).
            var.set(&t.to_device(device)?.contiguous()?)?;
        }
    }
    let vars = trainable_vars(varmap, &expected)?;
    Ok((model, vars))
}

#[cfg(test)]
#[path = "trainable_tests.rs"]
mod tests;
