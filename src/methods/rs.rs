//! Method `rs` (Cohen et al. 2019): train a whole CIFAR ResNet or ViT under Gaussian noise at σ, from
//! scratch or fine-tuning the backbone's pretrained weights, then certify it at σ. Method
//! `smoothadv` (Salman et al. 2019) is the same job kind with adversarial training
//! ([`super::smoothadv`]).
//! Job kinds `train-rs` and `certify`.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backbone;
use super::certify_job;
use super::common::{self, DataRef};
use super::handler::TypedHandler;
use super::results::Results;
use super::smoothadv::{SmoothAdvConfig, SmoothAdvLoss};
use super::source::ModelSource;
use super::train::{OptimizerConfig, Schedule, TrainConfig};
use super::train_job::{self, TrainRun};
use crate::models::{self, Arch, Backbone, Normalize};
use crate::plan::{Job, JobBuilder, PlanContext, ProgressUnit};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};

pub const KIND: &str = "train-rs";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRsParams {
    pub backbone: String,
    pub arch: String,
    pub normalize: Normalize,
    /// Start from these weights (fine-tuning): a file, or a backbone the study trained;
    /// `None` = from scratch. A file is stored as the bare [`ModelRef`] it always was.
    #[serde(with = "super::source::bare_option")]
    pub init: Option<ModelSource>,
    pub data: DataRef,
    pub train: TrainConfig,
    /// SmoothAdv's adversarial training instead of plain Gaussian augmentation. Absent from
    /// plain `rs` jobs' parameters, so their ids are what they were before SmoothAdv existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothadv: Option<SmoothAdvConfig>,
}

/// Cell keys of SmoothAdv's attack (with the same prefix as the training keys).
pub const SMOOTHADV_KEYS: &[&str] = &["epsilon", "pgd_steps", "noise_draws", "eps_warmup_epochs"];

/// The attack a cell configures under `prefix`, defaults from [`SmoothAdvConfig::default`].
pub fn smoothadv_config(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    prefix: &str,
) -> Result<SmoothAdvConfig, SpecError> {
    let key = |k: &str| format!("{prefix}{k}");
    let mut c = SmoothAdvConfig::default();
    if let Some((v, _)) = common::number(cell, ctx, &key("epsilon"))? {
        c.epsilon = v;
    }
    if let Some((v, _)) = common::integer(cell, ctx, &key("pgd_steps"))? {
        c.steps = v as usize;
    }
    if let Some((v, _)) = common::integer(cell, ctx, &key("noise_draws"))? {
        c.noise_draws = v as usize;
    }
    if let Some((v, _)) = common::integer(cell, ctx, &key("eps_warmup_epochs"))? {
        c.warmup_epochs = v as usize;
    }
    c.validate().map_err(|m| {
        let span = SMOOTHADV_KEYS
            .iter()
            .find_map(|k| cell.params.get(&key(k)))
            .map(|p| p.span)
            .unwrap_or_default();
        ctx.error_at(span, m)
    })?;
    Ok(c)
}

/// CPU-sized default: fine-tune for 10 epochs with SGD and a cosine schedule.
pub fn default_config() -> TrainConfig {
    TrainConfig {
        epochs: 10,
        batch: 128,
        optimizer: OptimizerConfig::Sgd {
            lr: 0.01,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
        },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        ..TrainConfig::default()
    }
}

/// Cell keys of an `rs` training under `prefix` (`""` for method rs, `rs_` for a CAF base).
pub fn keys(prefix: &str) -> Vec<String> {
    let mut k = train_job::train_keys(prefix);
    k.push(format!("{prefix}init"));
    k.push(format!("{prefix}budget_tflops"));
    k
}

/// The `train-rs` job of a cell and the model it produces.
pub fn plan_training(
    cell: &Cell,
    ctx: &mut PlanContext<'_>,
    prefix: &str,
    sigma: f64,
    smoothadv: Option<SmoothAdvConfig>,
) -> Result<(Job, ModelSource), SpecError> {
    let (backbone, model) = backbone::of_cell(cell, ctx)?;
    let (arch, normalize) = match (model.arch().map(str::parse::<Arch>), model.normalize()) {
        (Some(Ok(a)), Some(n)) if a.is_trainable() => (a, n),
        _ => {
            let span = cell
                .params
                .get("backbone")
                .map(|p| p.span)
                .unwrap_or_default();
            return Err(ctx.error_at(
                span,
                format!(
                    "rs and smoothadv train the whole network: a CIFAR ResNet or a ViT, \
                     `{backbone}` is {} (use it frozen with method caf, or smooth it as it is)",
                    model.arch().unwrap_or("not a single network")
                ),
            ));
        }
    };
    let init = match common::string(cell, ctx, &format!("{prefix}init"))? {
        None => Some(model.clone()),
        Some((v, _)) if v == "pretrained" => Some(model.clone()),
        Some((v, _)) if v == "scratch" => None,
        Some((v, p)) => {
            return Err(ctx.error_at(
                p.span,
                format!("expected pretrained or scratch, found `{v}`"),
            ))
        }
    };
    let mut train = train_job::train_config(cell, ctx, prefix, default_config())?;
    train.sigma = sigma;
    let data = common::train_data_ref(ctx)?;
    let mut params = TrainRsParams {
        backbone: backbone.clone(),
        arch: arch.to_string(),
        normalize,
        init,
        data,
        train,
        smoothadv,
    };
    let value = serde_json::to_value(&params).unwrap_or_default();
    if let Some(e) = super::budget::budget_epochs(cell, ctx, prefix, KIND, &value, &params.train)? {
        params.train.epochs = e;
    }
    let label = match &params.smoothadv {
        None => format!("train-rs {backbone} σ={sigma}"),
        Some(a) => format!(
            "train-smoothadv {backbone} σ={sigma} ε={} T={} m={}",
            a.epsilon, a.steps, a.noise_draws
        ),
    };
    let arch = params.arch.clone();
    let job = training_job(params, label);
    let source = ModelSource::Rs {
        job: job.id.clone(),
        arch,
        normalize,
    };
    Ok((job, source))
}

/// The `train-rs` job of `params`: it depends on the job that trained its initial weights,
/// if any.
pub fn training_job(params: TrainRsParams, label: String) -> Job {
    let value = serde_json::to_value(&params).unwrap_or_default();
    JobBuilder {
        kind: KIND,
        version: VERSION,
        label,
        identity: common::identity_of(
            &value,
            &["weights", "root", "backbone", "checkpoint_every_steps"],
        ),
        params: value,
        deps: params
            .init
            .as_ref()
            .map(ModelSource::deps)
            .unwrap_or_default(),
    }
    .build()
    .counted_in(ProgressUnit::Epochs)
}

pub fn plan(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let mut allowed: Vec<String> = keys("");
    allowed.extend(["backbone", "sigma"].map(String::from));
    allowed.extend(certify_job::CERTIFY_KEYS.iter().map(|s| s.to_string()));
    let allowed_ref: Vec<&str> = allowed.iter().map(String::as_str).collect();
    common::check_known(cell, ctx, "rs", &allowed_ref)?;
    let sigma = certify_job::cell_sigma(cell, ctx, "rs")?;
    let (train_job, source) = plan_training(cell, ctx, "", sigma, None)?;
    let backbone = backbone::name_of(cell, ctx)?;
    let cert =
        certify_job::certify_job(cell, ctx, source, format!("rs {backbone} σ={sigma}"), sigma)?;
    Ok(vec![train_job, cert])
}

/// Method `smoothadv` (Salman et al. 2019): like `rs`, with SmoothAdv's adversarial training.
pub fn plan_smoothadv(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let mut allowed: Vec<String> = keys("");
    allowed.extend(["backbone", "sigma"].map(String::from));
    allowed.extend(SMOOTHADV_KEYS.iter().map(|s| s.to_string()));
    allowed.extend(certify_job::CERTIFY_KEYS.iter().map(|s| s.to_string()));
    let allowed_ref: Vec<&str> = allowed.iter().map(String::as_str).collect();
    common::check_known(cell, ctx, "smoothadv", &allowed_ref)?;
    let sigma = certify_job::cell_sigma(cell, ctx, "smoothadv")?;
    let attack = smoothadv_config(cell, ctx, "")?;
    let (train_job, source) = plan_training(cell, ctx, "", sigma, Some(attack))?;
    let label = train_job.label.replacen("train-smoothadv", "smoothadv", 1);
    let cert = certify_job::certify_job(cell, ctx, source, label, sigma)?;
    Ok(vec![train_job, cert])
}

/// The whole network to train (a CIFAR ResNet or a ViT), from `init`'s weights or from scratch;
/// its parameters are all trainable. Shared by the handler and `caf bench train-step`.
pub fn trainable_network(
    arch: &str,
    normalize: Normalize,
    init: Option<&HashMap<String, candle_core::Tensor>>,
    num_classes: usize,
    varmap: &candle_nn::VarMap,
    device: &candle_core::Device,
) -> Result<(Backbone, Vec<candle_core::Var>), JobError> {
    let arch: Arch = arch.parse().map_err(JobError::fatal)?;
    models::build_trainable(arch, num_classes, normalize, varmap, device, init)
        .map_err(JobError::fatal)
}

/// Runs `train-rs` jobs (Gaussian augmentation, or SmoothAdv's attack when configured).
pub struct TrainRsHandler {
    pub results: Arc<dyn Results>,
}

impl TypedHandler for TrainRsHandler {
    const KIND: &'static str = KIND;
    type Params = TrainRsParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: TrainRsParams,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError> {
        let init = match &p.init {
            Some(m) => Some(m.state_dict(ctx.sink.as_ref(), device)?),
            None => None,
        };
        let data = p.data.open()?;
        // Fine-tuning keeps the initial network's outputs; from scratch there is one per class
        // of the training data (10 for CIFAR-10, 1,000 for ImageNet). The labels must fit.
        let arch: Arch = p.arch.parse().map_err(JobError::fatal)?;
        let classes = init
            .as_ref()
            .and_then(|sd| models::init_classes(arch, sd))
            .unwrap_or(data.classes().len());
        common::check_classes(classes, data.as_ref())?;
        let varmap = candle_nn::VarMap::new();
        let (model, trainable) = trainable_network(
            &p.arch,
            p.normalize,
            init.as_ref(),
            classes,
            &varmap,
            device,
        )?;
        let run = TrainRun {
            ctx,
            results: self.results.as_ref(),
            varmap: &varmap,
            trainable,
            data: data.as_ref(),
            cfg: &p.train,
            device,
        };
        match &p.smoothadv {
            None => run.classification(&model),
            Some(cfg) => run.objective(&SmoothAdvLoss {
                model: &model,
                cfg,
                sigma: p.train.sigma as f32,
            }),
        }
    }
}
