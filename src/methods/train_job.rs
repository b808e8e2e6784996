//! Training as a job, what the training methods share: grid-cell parameters → [`TrainConfig`],
//! and running the loop of [`super::train`] inside a job (epochs recorded in the store, checkpoints in the job's artifact
//! directory so a killed job resumes, the selected weights recorded as an artifact).

use candle_core::Device;
use candle_core::Var;
use candle_nn::{ModuleT, VarMap};

use super::common;
use super::results::Results;
use super::source::WEIGHTS;
use super::train::{
    self, OptimizerConfig, Schedule, TrainConfig, TrainEnd, TrainError, TrainHooks,
};
use crate::data::Images;
use crate::plan::PlanContext;
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};
use crate::store::Artifact;

/// Cell parameters that configure training (each optionally prefixed, e.g. `rs_epochs`).
pub const TRAIN_KEYS: &[&str] = &[
    "epochs",
    "lr",
    "train_batch",
    "optimizer",
    "momentum",
    "nesterov",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "augment",
    "val_size",
    "max_train",
    "early_stop",
    "checkpoint_every",
    "train_seed",
];

/// `TRAIN_KEYS` with `prefix` in front.
pub fn train_keys(prefix: &str) -> Vec<String> {
    TRAIN_KEYS.iter().map(|k| format!("{prefix}{k}")).collect()
}

/// Builds a training configuration from `defaults`, overridden by the cell's `prefix`-ed keys.
pub fn train_config(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    prefix: &str,
    defaults: TrainConfig,
) -> Result<TrainConfig, SpecError> {
    let key = |k: &str| format!("{prefix}{k}");
    let mut c = defaults;
    c.seed = ctx.spec.seed;
    let uint = |k: &str| common::integer(cell, ctx, &key(k));
    if let Some((v, _)) = uint("epochs")? {
        c.epochs = v as usize;
    }
    if let Some((v, _)) = uint("train_batch")? {
        c.batch = v as usize;
    }
    if let Some((v, _)) = uint("warmup_epochs")? {
        c.warmup_epochs = v as usize;
    }
    if let Some((v, _)) = uint("val_size")? {
        c.val_size = v as usize;
    }
    if let Some((v, _)) = uint("max_train")? {
        c.max_train = Some(v as usize);
    }
    if let Some((v, _)) = uint("early_stop")? {
        c.early_stop_patience = Some(v as usize);
    }
    if let Some((v, _)) = uint("checkpoint_every")? {
        c.checkpoint_every_steps = Some(v);
    }
    if let Some((v, _)) = uint("train_seed")? {
        c.seed = v;
    }
    if let Some(v) = common::boolean(cell, ctx, &key("augment"))? {
        c.augment = v;
    }
    if let Some((name, p)) = common::string(cell, ctx, &key("optimizer"))? {
        let lr = c.optimizer.lr();
        c.optimizer = match name.as_str() {
            "sgd" => OptimizerConfig::Sgd {
                lr,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 1e-4,
            },
            "adam" => OptimizerConfig::adam(lr),
            "adamw" => OptimizerConfig::AdamW {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
            },
            other => {
                return Err(ctx.error_at(
                    p.span,
                    format!("unknown optimizer `{other}` (expected sgd, adam or adamw)"),
                ))
            }
        };
    }
    if let Some((lr, p)) = common::number(cell, ctx, &key("lr"))? {
        if lr <= 0.0 {
            return Err(ctx.error_at(p.span, format!("expected lr > 0, found {lr}")));
        }
        match &mut c.optimizer {
            OptimizerConfig::Sgd { lr: l, .. }
            | OptimizerConfig::Adam { lr: l, .. }
            | OptimizerConfig::AdamW { lr: l, .. } => *l = lr,
        }
    }
    if let Some((m, p)) = common::number(cell, ctx, &key("momentum"))? {
        match &mut c.optimizer {
            OptimizerConfig::Sgd { momentum, .. } => *momentum = m,
            _ => return Err(ctx.error_at(p.span, "momentum applies to optimizer sgd only")),
        }
    }
    if let Some(n) = common::boolean(cell, ctx, &key("nesterov"))? {
        match &mut c.optimizer {
            OptimizerConfig::Sgd { nesterov, .. } => *nesterov = n,
            _ => {
                let span = cell
                    .params
                    .get(&key("nesterov"))
                    .map(|p| p.span)
                    .unwrap_or_default();
                return Err(ctx.error_at(span, "nesterov applies to optimizer sgd only"));
            }
        }
    }
    if let Some((wd, _)) = common::number(cell, ctx, &key("weight_decay"))? {
        match &mut c.optimizer {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. }
            | OptimizerConfig::AdamW { weight_decay, .. } => *weight_decay = wd,
        }
    }
    if let Some((name, p)) = common::string(cell, ctx, &key("schedule"))? {
        c.schedule = match name.as_str() {
            "constant" => Schedule::Constant,
            "cosine" => Schedule::Cosine { min_lr: 0.0 },
            "step" => {
                // ×0.1 at one third and two thirds of the run, Cohen's 90-epoch recipe scaled.
                let e = c.epochs.max(3);
                Schedule::Step {
                    milestones: vec![e / 3, 2 * e / 3],
                    gamma: 0.1,
                }
            }
            other => {
                return Err(ctx.error_at(
                    p.span,
                    format!("unknown schedule `{other}` (expected constant, step or cosine)"),
                ))
            }
        };
    }
    let span = cell.params.get("sigma").map(|p| p.span).unwrap_or_default();
    // The data size is checked when the job runs; here only what the config says on its own.
    c.validate(usize::MAX / 2)
        .map_err(|e| ctx.error_at(span, e.to_string()))?;
    Ok(c)
}

/// One training job's loop: resumable from `ctx.artifacts_dir`, epochs recorded to `results`,
/// the selected weights recorded as the job's `weights` artifact.
pub struct TrainRun<'a> {
    pub ctx: &'a JobContext,
    pub results: &'a dyn Results,
    pub varmap: &'a VarMap,
    pub trainable: Vec<Var>,
    pub data: &'a dyn Images,
    pub cfg: &'a TrainConfig,
    pub device: &'a Device,
}

impl TrainRun<'_> {
    /// Trains `model` with cross-entropy under noise.
    pub fn classification(self, model: &dyn ModuleT) -> Result<JobOutput, JobError> {
        self.objective(&train::Classification { model })
    }

    /// Trains with any objective.
    pub fn objective(self, objective: &dyn train::Objective) -> Result<JobOutput, JobError> {
        let ctx = self.ctx;
        let dir = ctx.artifacts_dir.join("train");
        if dir.join(train::CHECKPOINT_JSON).exists() {
            let msg = format!("resuming training from the checkpoint in {}", dir.display());
            tracing::info!("{msg}");
            ctx.sink.event("info", &msg)?;
        }
        let mut hooks = ResultHooks {
            ctx,
            results: self.results,
            epochs: self.cfg.epochs as u64,
        };
        let end = train::train_objective(
            objective,
            self.varmap,
            self.trainable,
            self.data,
            self.cfg,
            &dir,
            self.device,
            &mut hooks,
        )
        .map_err(train_error)?;
        match end {
            TrainEnd::Interrupted { .. } => Ok(JobOutput::Interrupted),
            TrainEnd::Finished {
                weights,
                best_epoch,
                metrics,
            } => {
                let sha256 = crate::util::sha256_file(&weights)
                    .map_err(|e| JobError::retryable(format!("{}: {e}", weights.display())))?;
                let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
                let path = std::fs::canonicalize(&weights).unwrap_or(weights);
                ctx.sink.artifact(&Artifact {
                    name: WEIGHTS.into(),
                    path: path.display().to_string(),
                    sha256: sha256.clone(),
                    bytes,
                })?;
                let best = best_epoch.and_then(|e| metrics.get(e));
                Ok(JobOutput::Done(serde_json::json!({
                    "weights_sha256": sha256,
                    "epochs": metrics.len(),
                    "best_epoch": best_epoch,
                    "best_val_acc": best.and_then(|m| m.val_acc),
                    "final_train_loss": metrics.last().map(|m| m.train_loss),
                })))
            }
        }
    }
}

fn train_error(e: TrainError) -> JobError {
    match e {
        TrainError::Config(_) | TrainError::Checkpoint { .. } => JobError::fatal(e),
        other => JobError::retryable(other),
    }
}

/// A store hiccup is transient: surfaced as I/O so the job is retried, not failed.
fn store_error(what: &str, e: JobError) -> TrainError {
    TrainError::Io {
        path: "the store".into(),
        source: std::io::Error::other(format!("{what}: {e}")),
    }
}

struct ResultHooks<'a> {
    ctx: &'a JobContext,
    results: &'a dyn Results,
    epochs: u64,
}

impl TrainHooks for ResultHooks<'_> {
    fn cancelled(&self) -> bool {
        self.ctx.cancelled()
    }
    fn on_start(&mut self, epochs_done: usize) -> Result<(), TrainError> {
        // `caf status` shows the job's epochs from its first step, not only after an epoch.
        self.ctx
            .sink
            .progress(epochs_done as u64, self.epochs)
            .map_err(|e| store_error("recording progress", e))
    }

    fn on_epoch(&mut self, m: &train::EpochMetrics) -> Result<(), TrainError> {
        let v = serde_json::to_value(m).unwrap_or_default();
        let store_err = |e: JobError| store_error("recording epoch metrics", e);
        self.results
            .record_epoch(&self.ctx.lease, &self.ctx.id, m.epoch as u64, &v)
            .map_err(store_err)?;
        self.ctx
            .sink
            .progress(m.epoch as u64 + 1, self.epochs)
            .map_err(store_err)?;
        tracing::info!(
            epoch = m.epoch,
            loss = m.train_loss,
            train_acc = m.train_acc,
            val_acc = m.val_acc,
            images_per_sec = m.images_per_sec,
            "epoch done"
        );
        Ok(())
    }
}
