//! Method `caf` (certifying adapters, arXiv 2405.16036): the backbone's feature extractor φ stays
//! frozen; an adapter a(·) reading the same noisy image and a new linear head h are trained with
//! cross-entropy on logits h(φ(x+δ) + a(x+δ)) under Gaussian noise at σ, then the result is
//! certified at σ. φ comes from the pretrained backbone ("enable", `base: clean`) or from an `rs`
//! training of it ("enhance", `base: rs`), which the planner chains and shares between cells.
//!
//! Method `caf-ensemble`: one adapter + head per σ of `sigmas` on one frozen backbone; member k
//! is certified at every σ (the cross-σ matrix; its diagonal is the ensemble's own result).
//! Job kinds `train-caf` (and `train-rs`, `certify`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::budget;
use super::certify_job;
use super::common::{self, DataRef};
use super::handler::TypedHandler;
use super::results::Results;
use super::rs;
use super::source::ModelSource;
use super::train::{OptimizerConfig, Schedule, TrainConfig};
use super::train_job::{self, TrainRun};
use crate::models::adapter::AdapterArch;
use crate::models::caf::build_caf_seeded;
use crate::models::{Backbone, CafModel};
use crate::plan::{Job, JobBuilder, PlanContext, ProgressUnit};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};

pub const KIND: &str = "train-caf";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainCafParams {
    pub backbone_name: String,
    /// The frozen feature extractor: a pretrained file or an `rs` job's network.
    pub backbone: ModelSource,
    pub adapter: AdapterArch,
    pub data: DataRef,
    pub train: TrainConfig,
}

/// The released code's optimizer (Adam, lr 1e-3) with a CPU-sized budget: 10 epochs, batch 128,
/// cosine decay, model selection on the noisy validation split.
pub fn default_config() -> TrainConfig {
    TrainConfig {
        epochs: 10,
        batch: 128,
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::Cosine { min_lr: 0.0 },
        ..TrainConfig::default()
    }
}

const ADAPTER_KEYS: &[&str] = &["base", "adapter", "adapter_width", "adapter_depth"];

fn allowed_keys(extra: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    k.push("backbone".into());
    k.push("budget_tflops".into());
    k.extend(ADAPTER_KEYS.iter().map(|s| s.to_string()));
    k.extend(train_job::train_keys(""));
    k.extend(rs::keys("rs_"));
    k.extend(rs::SMOOTHADV_KEYS.iter().map(|s| format!("rs_{s}")));
    k.extend(certify_job::CERTIFY_KEYS.iter().map(|s| s.to_string()));
    k
}

/// The adapter a cell asks for: `adapter` (e.g. `default`, `resnet18:0.25`, `cnn:16:3`), then
/// `adapter_width` and `adapter_depth` (blocks per stage, or CNN layers) on top.
fn adapter_arch(cell: &Cell, ctx: &PlanContext<'_>) -> Result<AdapterArch, SpecError> {
    let mut arch = match common::string(cell, ctx, "adapter")? {
        None => AdapterArch::CPU_DEFAULT,
        Some((s, p)) => s
            .parse::<AdapterArch>()
            .map_err(|e| ctx.error_at(p.span, e.to_string()))?,
    };
    if let Some((w, p)) = common::number(cell, ctx, "adapter_width")? {
        arch = match arch {
            AdapterArch::ResNet18 { depths, .. } => AdapterArch::ResNet18 { width: w, depths },
            AdapterArch::SmallCnn { depth, .. } => {
                if w.fract() != 0.0 || w < 1.0 {
                    return Err(ctx.error_at(
                        p.span,
                        format!("a cnn adapter's width is a channel count ≥ 1, found {w}"),
                    ));
                }
                AdapterArch::SmallCnn {
                    width: w as usize,
                    depth,
                }
            }
            AdapterArch::Vit {
                depth,
                patch,
                heads,
                ..
            } => {
                if w.fract() != 0.0 || w < 1.0 {
                    return Err(ctx.error_at(
                        p.span,
                        format!("a vit adapter's width is a channel count ≥ 1, found {w}"),
                    ));
                }
                AdapterArch::Vit {
                    dim: w as usize,
                    depth,
                    patch,
                    heads,
                }
            }
        };
    }
    if let Some((d, _)) = common::integer(cell, ctx, "adapter_depth")? {
        arch = match arch {
            AdapterArch::ResNet18 { width, .. } => AdapterArch::ResNet18 {
                width,
                depths: [d as usize; 4],
            },
            AdapterArch::SmallCnn { width, .. } => AdapterArch::SmallCnn {
                width,
                depth: d as usize,
            },
            AdapterArch::Vit {
                dim, patch, heads, ..
            } => AdapterArch::Vit {
                dim,
                depth: d as usize,
                patch,
                heads,
            },
        };
    }
    let span = cell
        .params
        .get("adapter")
        .or(cell.params.get("adapter_width"))
        .map(|p| p.span)
        .unwrap_or_default();
    arch.validate()
        .map_err(|e| ctx.error_at(span, e.to_string()))?;
    Ok(arch)
}

/// The training jobs of one adapter at `sigma` (the `rs` base first, if any) and the model they
/// produce.
fn plan_training(
    cell: &Cell,
    ctx: &mut PlanContext<'_>,
    sigma: f64,
) -> Result<(Vec<Job>, ModelSource), SpecError> {
    let (backbone_name, model) = super::backbone::of_cell(cell, ctx)?;
    let mut jobs = Vec::new();
    let backbone = match common::string(cell, ctx, "base")? {
        None => model,
        Some((b, _)) if b == "clean" => model,
        Some((b, _)) if b == "rs" => {
            let (job, source) = rs::plan_training(cell, ctx, "rs_", sigma, None)?;
            jobs.push(job);
            source
        }
        Some((b, _)) if b == "smoothadv" => {
            let attack = rs::smoothadv_config(cell, ctx, "rs_")?;
            let (job, source) = rs::plan_training(cell, ctx, "rs_", sigma, Some(attack))?;
            jobs.push(job);
            source
        }
        Some((b, p)) => {
            return Err(ctx.error_at(
                p.span,
                format!("unknown base `{b}` (expected clean, rs or smoothadv)"),
            ))
        }
    };
    let adapter = adapter_arch(cell, ctx)?;
    let mut train = train_job::train_config(cell, ctx, "", default_config())?;
    train.sigma = sigma;
    let data = common::train_data_ref(ctx)?;
    let base = match common::string(cell, ctx, "base")? {
        Some((b, _)) if b != "clean" => format!("{b} "),
        _ => String::new(),
    };
    let mut params = TrainCafParams {
        backbone_name: backbone_name.clone(),
        backbone,
        adapter,
        data,
        train,
    };
    let mut value = serde_json::to_value(&params).unwrap_or_default();
    if let Some(e) = budget::budget_epochs(cell, ctx, "", KIND, &value, &params.train)? {
        params.train.epochs = e;
        value = serde_json::to_value(&params).unwrap_or_default();
    }
    let mut label = format!("train-caf {base}{backbone_name} {adapter} σ={sigma}");
    // Name the training settings the cell sets, so sweeps over them can be told apart.
    for key in [
        "lr",
        "epochs",
        "optimizer",
        "train_batch",
        "schedule",
        "weight_decay",
    ] {
        if let Some(p) = cell.params.get(key) {
            label.push_str(&format!(
                " {key}={}",
                p.value
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| p.value.to_string())
            ));
        }
    }
    let job = JobBuilder {
        kind: KIND,
        version: VERSION,
        label,
        identity: common::identity_of(
            &value,
            &["weights", "root", "backbone_name", "checkpoint_every_steps"],
        ),
        deps: params.backbone.deps(),
        params: value,
    }
    .build()
    .counted_in(ProgressUnit::Epochs);
    let source = ModelSource::Caf {
        backbone: Box::new(params.backbone.clone()),
        job: job.id.clone(),
        adapter,
    };
    jobs.push(job);
    Ok((jobs, source))
}

pub fn plan(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let allowed = allowed_keys(&["sigma"]);
    common::check_known(
        cell,
        ctx,
        "caf",
        &allowed.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let sigma = certify_job::cell_sigma(cell, ctx, "caf")?;
    let (mut jobs, source) = plan_training(cell, ctx, sigma)?;
    let label = jobs
        .last()
        .map(|j| j.label.replacen("train-caf", "caf", 1))
        .unwrap_or_default();
    jobs.push(certify_job::certify_job(cell, ctx, source, label, sigma)?);
    Ok(jobs)
}

pub fn plan_ensemble(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let allowed = allowed_keys(&["sigmas"]);
    common::check_known(
        cell,
        ctx,
        "caf-ensemble",
        &allowed.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let Some(p) = cell.params.get("sigmas") else {
        return Err(SpecError::whole_file(
            &ctx.spec.path,
            "method `caf-ensemble` needs a `sigmas` list",
        ));
    };
    let sigmas: Vec<f64> = match p.value.as_array() {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_f64().filter(|s| s.is_finite() && *s > 0.0))
            .collect::<Option<Vec<f64>>>()
            .ok_or_else(|| ctx.error_at(p.span, "expected a list of numbers > 0 for sigmas"))?,
        _ => {
            return Err(ctx.error_at(
                p.span,
                format!(
                    "expected a non-empty list of numbers for sigmas, found {}",
                    p.value
                ),
            ))
        }
    };
    let backbone = super::backbone::name_of(cell, ctx)?;
    let mut jobs = Vec::new();
    let mut members = Vec::new();
    for &s in &sigmas {
        let (train, source) = plan_training(cell, ctx, s)?;
        jobs.extend(train);
        members.push((s, source));
    }
    // Every member at every σ: the diagonal is the ensemble; the rest shows why one adapter
    // per σ is needed.
    for (trained, source) in &members {
        for &at in &sigmas {
            let label = format!("caf-ensemble {backbone} trained σ={trained} certified σ={at}");
            jobs.push(certify_job::certify_job(
                cell,
                ctx,
                source.clone(),
                label,
                at,
            )?);
        }
    }
    Ok(jobs)
}

/// Adapters and head on the frozen backbone `phi`, initialised from `seed`; only they are
/// trainable. Shared by the handler and `caf bench train-step`.
pub fn trainable_model(
    phi: impl Into<Backbone>,
    adapter: &AdapterArch,
    num_classes: usize,
    varmap: &candle_nn::VarMap,
    device: &candle_core::Device,
    seed: u64,
) -> Result<(CafModel, Vec<candle_core::Var>), JobError> {
    let phi = phi.into().detached().map_err(JobError::fatal)?;
    build_caf_seeded(phi, adapter, num_classes, varmap, device, seed).map_err(JobError::fatal)
}

/// Runs `train-caf` jobs.
pub struct TrainCafHandler {
    pub results: Arc<dyn Results>,
}

impl TypedHandler for TrainCafHandler {
    const KIND: &'static str = KIND;
    type Params = TrainCafParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: TrainCafParams,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError> {
        let phi = p.backbone.load_backbone(ctx.sink.as_ref(), device)?;
        let data = p.data.open()?;
        // The head is new: one output per class of the training data.
        let classes = data.classes().len();
        common::check_classes(classes, data.as_ref())?;
        let varmap = candle_nn::VarMap::new();
        let (model, trainable) =
            trainable_model(phi, &p.adapter, classes, &varmap, device, p.train.seed)?;
        TrainRun {
            ctx,
            results: self.results.as_ref(),
            varmap: &varmap,
            trainable,
            data: data.as_ref(),
            cfg: &p.train,
            device,
        }
        .classification(&model)
    }
}
