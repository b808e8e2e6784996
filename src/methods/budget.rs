//! Training compute, so a comparison between methods is fair by construction: `caf plan` shows
//! every training job's trained parameters, FLOPs per training image and total compute, and a
//! cell may state `budget_tflops` instead of `epochs` to get the epoch count that spends it.
//!
//! FLOPs count 2 × multiply-adds of convolutions and linear layers for one image of the data's
//! size, 32×32 for CIFAR ([`crate::models::adapter::cost_at`]); a training step is counted as
//! forward + 2 × forward for the backward of the trained part, and forward (+ forward for input
//! gradients where they are needed) for frozen parts. The figures compare methods; they are not a profiler's.

use serde::Serialize;

use super::caf::TrainCafParams;
use super::denoised::{DenoiserObjective, TrainDenoisedParams};
use super::rs::TrainRsParams;
use super::smoothadv::SmoothAdvConfig;
use super::source::{ModelSource, NUM_CLASSES};
use super::train::TrainConfig;
use crate::models::adapter::{cifar_resnet_cost, cost_at, resnet50_cost, AdapterArch};
use crate::models::dncnn::DnCnnArch;
use crate::models::Arch;
use crate::models::{VitConfig, FEATURE_DIM};
use crate::plan::{Job, PlanContext};
use crate::spec::{Cell, SpecError};

/// Images in the CIFAR-10 training split (validation is carved from it).
pub const CIFAR10_TRAIN: usize = 50_000;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Budget {
    /// Parameters the job trains.
    pub trained_params: u64,
    /// Forward FLOPs of the trained part per image.
    pub trained_flops: u64,
    /// FLOPs of one training image (forward, backward, frozen parts, attacks).
    pub flops_per_train_image: f64,
    /// Training images seen: epochs × training-split size.
    pub images: u64,
    pub tflops: f64,
}

/// Training images per epoch under `cfg`.
pub fn train_images(cfg: &TrainConfig) -> usize {
    let n = CIFAR10_TRAIN.saturating_sub(cfg.val_size);
    cfg.max_train.map_or(n, |m| m.min(n))
}

/// The epoch count that spends `tflops` at `flops_per_image` (at least 1).
pub fn epochs_for(tflops: f64, flops_per_image: f64, cfg: &TrainConfig) -> usize {
    let per_epoch = flops_per_image * train_images(cfg) as f64;
    if per_epoch <= 0.0 {
        return 1;
    }
    ((tflops * 1e12 / per_epoch).round() as usize).max(1)
}

/// (params, forward FLOPs per image) of the whole network `arch` on `size`×`size` images (the
/// CIFAR ResNets and ViTs have their one input size); `None` where caf has no count (an ONNX
/// graph, the linear model).
pub fn network_cost(arch: Arch, size: usize) -> Option<(u64, u64)> {
    match arch {
        Arch::CifarResNet { depth } => cifar_resnet_cost(depth, NUM_CLASSES)
            .ok()
            .map(|c| (c.params, c.flops_per_image)),
        Arch::Vit(name) => Some(VitConfig::named(name).cost(NUM_CLASSES)),
        Arch::ResNet50 => {
            let c = resnet50_cost(NUM_CLASSES, size);
            Some((c.params, c.flops_per_image))
        }
        Arch::Linear | Arch::Onnx => None,
    }
}

/// The architecture of a single network (a file or an rs-trained one); `None` for composite
/// models (trained models other than `rs`).
fn arch_of(source: &ModelSource) -> Option<Arch> {
    source.arch()?.parse().ok()
}

/// (params, forward FLOPs per image, feature width) of a backbone on `size`×`size` images.
fn backbone_cost(source: &ModelSource, size: usize) -> Option<(u64, u64, usize)> {
    let arch = arch_of(source)?;
    let width = match arch {
        Arch::Vit(name) => VitConfig::named(name).dim,
        Arch::ResNet50 => 2048,
        _ => FEATURE_DIM,
    };
    let (params, flops) = network_cost(arch, size)?;
    Some((params, flops, width))
}

/// (params, forward FLOPs) of a CIFAR ResNet classifier (denoised smoothing's counted case).
fn resnet_flops(source: &ModelSource) -> Option<(u64, u64)> {
    match arch_of(source)? {
        arch @ Arch::CifarResNet { .. } => network_cost(arch, 32),
        _ => None,
    }
}

/// Training FLOPs per image of CAF: the frozen backbone forward, the adapter and head forward
/// and backward, on a backbone of feature width `d` (64 for every CIFAR ResNet), on
/// `size`×`size` images (the adapter reads the image).
pub fn caf_train_flops(
    backbone_flops: u64,
    adapter: &AdapterArch,
    d: usize,
    size: usize,
) -> Option<(f64, u64, u64)> {
    let a = cost_at(adapter, d, size).ok()?;
    let d = d as u64;
    let head = 2 * d * NUM_CLASSES as u64;
    let trained = a.flops_per_image + head;
    let params = a.params + d * NUM_CLASSES as u64 + NUM_CLASSES as u64;
    Some((
        backbone_flops as f64 + 3.0 * trained as f64,
        params,
        trained,
    ))
}

/// Training FLOPs per image of a denoiser in front of a frozen classifier.
pub fn denoised_train_flops(
    classifier_flops: u64,
    denoiser: DnCnnArch,
    objective: DenoiserObjective,
) -> (f64, u64, u64) {
    let (dparams, dflops) = denoiser.cost();
    let frozen = match objective {
        // f on the denoised batch for the accuracy log only.
        DenoiserObjective::Mse => classifier_flops as f64,
        // f on the clean batch (target), f forward + input backward on the denoised one.
        DenoiserObjective::Stability => 3.0 * classifier_flops as f64,
    };
    (frozen + 3.0 * dflops as f64, dparams, dflops)
}

/// Training FLOPs per image and (params, forward FLOPs) of a whole CIFAR ResNet or ViT, with or
/// without SmoothAdv's attack (backward ≈ twice the forward).
pub fn rs_train_flops(arch: Arch, smoothadv: Option<&SmoothAdvConfig>) -> Option<(f64, u64, u64)> {
    if !arch.is_trainable() {
        return None;
    }
    let (params, forward) = network_cost(arch, 32)?;
    let f = forward as f64;
    let per = match smoothadv {
        None => 3.0 * f,
        // m noisy copies trained, and T attack steps of forward + input backward on them.
        Some(a) => {
            let m = a.noise_draws as f64;
            3.0 * f * m + 2.0 * f * m * a.steps as f64
        }
    };
    Some((per, params, forward))
}

/// Training FLOPs per image and trained (params, forward FLOPs) of a training job's params.
pub fn per_image(kind: &str, params: &serde_json::Value) -> Option<(f64, u64, u64)> {
    match kind {
        super::caf::KIND => {
            let p: TrainCafParams = serde_json::from_value(params.clone()).ok()?;
            // CIFAR's 32×32 unless an image folder says otherwise.
            let size = p.data.image_size.unwrap_or(32);
            let (_, backbone, d) = backbone_cost(&p.backbone, size)?;
            caf_train_flops(backbone, &p.adapter, d, size)
        }
        super::denoised::KIND => {
            let p: TrainDenoisedParams = serde_json::from_value(params.clone()).ok()?;
            let (_, classifier) = resnet_flops(&p.classifier)?;
            Some(denoised_train_flops(classifier, p.denoiser, p.objective))
        }
        super::rs::KIND => {
            let p: TrainRsParams = serde_json::from_value(params.clone()).ok()?;
            rs_train_flops(p.arch.parse().ok()?, p.smoothadv.as_ref())
        }
        _ => None,
    }
}

/// `{prefix}budget_tflops` of a cell, turned into the epoch count that spends it on the training
/// job `kind` with `params` (serialized with any epoch count). `None` when the cell sets no
/// budget; an error when it sets both a budget and `{prefix}epochs`.
pub fn budget_epochs(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    prefix: &str,
    kind: &str,
    params: &serde_json::Value,
    cfg: &TrainConfig,
) -> Result<Option<usize>, SpecError> {
    let key = format!("{prefix}budget_tflops");
    let Some((tflops, p)) = super::common::number(cell, ctx, &key)? else {
        return Ok(None);
    };
    if !(tflops.is_finite() && tflops > 0.0) {
        return Err(ctx.error_at(p.span, format!("expected {key} > 0, found {tflops}")));
    }
    if cell.params.contains_key(&format!("{prefix}epochs")) {
        return Err(ctx.error_at(
            p.span,
            format!("set either {key} or {prefix}epochs, not both"),
        ));
    }
    let Some((per, _, _)) = per_image(kind, params) else {
        return Err(ctx.error_at(p.span, format!("{key}: no FLOP count for this model")));
    };
    Ok(Some(epochs_for(tflops, per, cfg)))
}

/// The budget of a training job; `None` for other kinds.
pub fn of(job: &Job) -> Option<Budget> {
    let (per, trained_params, trained_flops) = per_image(&job.kind, &job.params)?;
    let cfg: TrainConfig = serde_json::from_value(job.params.get("train")?.clone()).ok()?;
    let images = (cfg.epochs * train_images(&cfg)) as u64;
    Some(Budget {
        trained_params,
        trained_flops,
        flops_per_train_image: per,
        images,
        tflops: per * images as f64 / 1e12,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_spend_the_budget() {
        let cfg = TrainConfig::default();
        assert_eq!(train_images(&cfg), 45_000);
        // 100 MFLOPs per image × 45,000 images = 4.5 TFLOPs per epoch.
        assert_eq!(epochs_for(9.0, 1e8, &cfg), 2);
        assert_eq!(epochs_for(0.1, 1e8, &cfg), 1);
        let small = TrainConfig {
            max_train: Some(1000),
            ..TrainConfig::default()
        };
        assert_eq!(epochs_for(1.0, 1e8, &small), 10);
    }
}
