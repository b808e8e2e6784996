//! The training loop itself: steps, validation, selection, checkpoints and resume.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor, Var, D};
use candle_nn::VarMap;

use super::batches::{self, Batch, SampleSpec, SplitPlan};
use super::checkpoint::{
    self, Best, CheckpointState, DataFingerprint, EpochProgress, Loaded, FINAL_WEIGHTS,
};
use super::optim::Optimizer;
use super::schedule::LrSchedule;
use super::{CandleContext, EpochMetrics, Select, TrainConfig, TrainEnd, TrainError, TrainHooks};
use crate::data::Images;

/// Trains `model` on `data` (the whole CIFAR-10 training split) as `cfg` says, checkpointing to
/// `dir`, and resuming from the checkpoint there if one exists.
///
/// - `model` maps [B, 3, 32, 32] inputs in [0, 1] pixel space to logits; `forward_t(x, true)`
///   is used for training steps (BatchNorm batch statistics, running statistics updated) and
///   `forward_t(x, false)` for validation.
/// - `varmap` holds everything to checkpoint: the trainable variables and every other state
///   the forward pass changes (BatchNorm running statistics), under stable names.
/// - `trainable` are the only variables the optimizer updates; each must be an entry of
///   `varmap`. The loop never writes any other variable or tensor (the model's own train-mode
///   forward may update BatchNorm statistics of the parts it runs in train mode).
///
/// On [`TrainEnd::Finished`], `dir/final.safetensors` holds the selected weights (see
/// [`Select`]) and the VarMap is set to them, so the caller can use the model in-process. The
/// checkpoint stays, so calling again with the same configuration returns at once.
///
/// A checkpoint written under a different configuration ([`TrainConfig::hash`]), for other
/// training data, or for a VarMap with other names or shapes is refused with an error.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &dyn ModuleT,
    varmap: &VarMap,
    trainable: Vec<Var>,
    data: &dyn Images,
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainEnd, TrainError> {
    let objective = Classification { model };
    train_objective(&objective, varmap, trainable, data, cfg, dir, device, hooks)
}

/// What a training run minimises: a loss for a batch, and the logits whose argmax against
/// the labels gives the reported (noisy) accuracy.
pub trait Objective {
    /// `train` selects train-mode BatchNorm in the trained parts (and, for adversarial
    /// objectives, the attack: validation measures plain noisy accuracy). `at` keys any extra
    /// randomness the objective draws, so training stays reproducible and resumable.
    fn loss(
        &self,
        batch: &Batch,
        train: bool,
        at: StepKey,
    ) -> candle_core::Result<(Tensor, Tensor)>;
}

/// Where in the run a loss is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepKey {
    pub seed: u64,
    pub epoch: usize,
    /// Optimizer step since the start of the run.
    pub step: u64,
}

/// Cross-entropy of the model's logits on the noisy images (RS, CAF).
pub struct Classification<'a> {
    pub model: &'a dyn ModuleT,
}

impl Objective for Classification<'_> {
    fn loss(
        &self,
        batch: &Batch,
        train: bool,
        _: StepKey,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let logits = self.model.forward_t(&batch.x, train)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &batch.y)?;
        Ok((loss, logits))
    }
}

/// [`train`] with any [`Objective`] (a denoiser's reconstruction or stability loss).
#[allow(clippy::too_many_arguments)]
pub fn train_objective(
    model: &dyn Objective,
    varmap: &VarMap,
    trainable: Vec<Var>,
    data: &dyn Images,
    cfg: &TrainConfig,
    dir: &Path,
    device: &Device,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainEnd, TrainError> {
    cfg.validate(data.len())?;
    let plan = SplitPlan::new(data.len(), cfg.val_size, cfg.max_train, data.record_order());
    let n_train = plan.train.len();
    let steps_per_epoch = batches::steps_per_epoch(n_train, cfg.batch);
    let schedule = LrSchedule::new(
        cfg.optimizer.lr(),
        cfg.schedule.clone(),
        cfg.warmup_epochs,
        cfg.epochs,
        steps_per_epoch as u64,
    );
    let vars = named_vars(varmap)?;
    let trainable_names = name_trainable(&vars, &trainable)?;
    let mut opt =
        Optimizer::new(cfg.optimizer.clone(), trainable).ctx("initialising optimizer state")?;
    std::fs::create_dir_all(dir).map_err(|source| TrainError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let mut run = Run {
        cfg,
        dir,
        vars,
        best_weights: None,
        state: CheckpointState {
            format: checkpoint::FORMAT,
            cfg_hash: cfg.hash(),
            cfg: cfg.clone(),
            data: DataFingerprint::of(data),
            trainable: trainable_names,
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            best: None,
            epochs_since_best: 0,
            progress: EpochProgress::default(),
            optimizer_steps: opt.steps(),
            metrics: Vec::new(),
        },
    };
    if let Some(loaded) = checkpoint::read(dir, device)? {
        run.resume(loaded, &mut opt)?;
    }
    hooks.on_start(run.state.epoch)?;

    while run.state.epoch < cfg.epochs && !run.stopped_early() {
        let epoch = run.state.epoch;
        let order = batches::epoch_order(cfg.seed, epoch, &plan.train);
        let spec = SampleSpec {
            seed: cfg.seed,
            epoch,
            sigma: cfg.sigma as f32,
            augment: cfg.augment,
        };
        while run.state.step_in_epoch < steps_per_epoch {
            if hooks.cancelled() {
                return run.interrupt(&opt, hooks);
            }
            let started = Instant::now();
            let step = run.state.step_in_epoch;
            let lr = schedule.lr(run.state.global_step);
            let idx = &order[batches::step_range(n_train, cfg.batch, step)];
            let batch = batches::train_batch(data, idx, spec, device).ctx("building a batch")?;
            // Image files of the next step are decoded while this one computes.
            if step + 1 < steps_per_epoch {
                data.read_ahead(&order[batches::step_range(n_train, cfg.batch, step + 1)]);
            }
            let at = StepKey {
                seed: cfg.seed,
                epoch,
                step: run.state.global_step,
            };
            let (loss, logits) = model.loss(&batch, true, at).ctx("training loss")?;
            let loss_value = scalar_f32(&loss).ctx("reading the loss")?;
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step,
                    loss: loss_value,
                });
            }
            let grads = loss.backward().ctx("backward pass")?;
            opt.step(&grads, lr).ctx("optimizer step")?;
            let correct = count_correct(&logits, &batch.y).ctx("training accuracy")?;
            run.state.progress.add(
                f64::from(loss_value),
                correct,
                idx.len() as u64,
                started.elapsed().as_secs_f64(),
            );
            run.state.step_in_epoch += 1;
            run.state.global_step += 1;
            let periodic = cfg
                .checkpoint_every_steps
                .is_some_and(|k| run.state.global_step.is_multiple_of(k));
            // The epoch's last step is followed by the end-of-epoch checkpoint anyway.
            if periodic && run.state.step_in_epoch < steps_per_epoch {
                run.save(&opt, hooks)?;
            }
        }

        if hooks.cancelled() {
            // Training steps done, validation not: the checkpoint resumes straight into it.
            return run.interrupt(&opt, hooks);
        }
        let val_started = Instant::now();
        let val = match validate(model, data, &plan, cfg, device, hooks)? {
            Validation::Cancelled => return run.interrupt(&opt, hooks),
            Validation::NoSplit => None,
            Validation::Done(v) => Some(v),
        };
        let progress = &run.state.progress;
        let seen = progress.seen.max(1) as f64;
        let metrics = EpochMetrics {
            epoch,
            steps: steps_per_epoch as u64,
            lr: schedule.lr(epoch as u64 * steps_per_epoch as u64),
            train_loss: progress.loss_sum() / seen,
            train_acc: progress.correct as f64 / seen,
            val_loss: val.map(|v| v.loss),
            val_acc: val.map(|v| v.acc()),
            images_per_sec: progress.seen as f64 / progress.train_seconds.max(1e-9),
            seconds: progress.train_seconds + val_started.elapsed().as_secs_f64(),
        };
        if let Some(v) = val {
            run.record_validation(epoch, v)?;
        }
        run.state.metrics.push(metrics.clone());
        hooks.on_epoch(&metrics)?;
        run.state.epoch += 1;
        run.state.step_in_epoch = 0;
        run.state.progress = EpochProgress::default();
        run.save(&opt, hooks)?;
    }
    run.finish()
}

/// The mutable side of a run: its state, the VarMap's variables and the best weights so far.
struct Run<'a> {
    cfg: &'a TrainConfig,
    dir: &'a Path,
    /// Every VarMap entry, sorted by name.
    vars: Vec<(String, Var)>,
    /// Deep copies of `vars` at the best validation epoch (only kept for `Select::BestVal`).
    best_weights: Option<Vec<(String, Tensor)>>,
    state: CheckpointState,
}

impl Run<'_> {
    fn stopped_early(&self) -> bool {
        self.cfg
            .early_stop_patience
            .is_some_and(|p| self.state.best.is_some() && self.state.epochs_since_best >= p)
    }

    fn record_validation(&mut self, epoch: usize, v: ValResult) -> Result<(), TrainError> {
        let improved = self
            .state
            .best
            .as_ref()
            .is_none_or(|b| v.correct > b.val_correct);
        if improved {
            self.state.best = Some(Best {
                epoch,
                val_correct: v.correct,
                val_acc: v.acc(),
            });
            self.state.epochs_since_best = 0;
            if self.cfg.select == Select::BestVal {
                self.best_weights = Some(snapshot(&self.vars)?);
            }
        } else {
            self.state.epochs_since_best += 1;
        }
        Ok(())
    }

    /// Writes the checkpoint of the current state and tells the hooks.
    fn save(&mut self, opt: &Optimizer, hooks: &mut dyn TrainHooks) -> Result<PathBuf, TrainError> {
        self.state.optimizer_steps = opt.steps();
        let mut tensors: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(name, var)| (format!("model.{name}"), var.as_tensor().clone()))
            .collect();
        tensors.extend(opt.state_tensors());
        if let Some(best) = &self.best_weights {
            tensors.extend(
                best.iter()
                    .map(|(name, t)| (format!("best.{name}"), t.clone())),
            );
        }
        let path = checkpoint::write(self.dir, &self.state, &tensors)?;
        hooks.on_checkpoint(&path)?;
        Ok(path)
    }

    fn interrupt(
        &mut self,
        opt: &Optimizer,
        hooks: &mut dyn TrainHooks,
    ) -> Result<TrainEnd, TrainError> {
        let checkpoint = self.save(opt, hooks)?;
        Ok(TrainEnd::Interrupted {
            checkpoint,
            epoch: self.state.epoch,
            step_in_epoch: self.state.step_in_epoch,
            global_step: self.state.global_step,
        })
    }

    /// Restores the VarMap, optimizer and best weights from `loaded` after checking it belongs to
    /// this run.
    fn resume(&mut self, loaded: Loaded, opt: &mut Optimizer) -> Result<(), TrainError> {
        let path = self.dir.join(checkpoint::CHECKPOINT_TENSORS);
        let bad = |message: String| TrainError::Checkpoint {
            path: path.clone(),
            message,
        };
        let Loaded { state, tensors } = loaded;
        if state.cfg_hash != self.state.cfg_hash {
            return Err(TrainError::ConfigMismatch {
                path: path.clone(),
                expected: self.state.cfg_hash.clone(),
                found: state.cfg_hash,
            });
        }
        if state.data != self.state.data {
            return Err(bad(format!(
                "written for a training set of {} images (labels {}), this one has {} (labels {})",
                state.data.images,
                short(&state.data.labels_sha256),
                self.state.data.images,
                short(&self.state.data.labels_sha256)
            )));
        }
        if state.trainable != self.state.trainable {
            return Err(bad(format!(
                "trainable variables differ: checkpoint {:?}, this run {:?}",
                state.trainable, self.state.trainable
            )));
        }
        let expected = self.cfg.epochs;
        if state.epoch > expected {
            return Err(bad(format!(
                "at epoch {} of a {expected}-epoch run",
                state.epoch
            )));
        }
        check_names(&tensors, "model.", &self.vars).map_err(&bad)?;
        for (name, var) in &self.vars {
            let t = &tensors[&format!("model.{name}")];
            var.set(t).ctx(&format!("restoring `{name}`"))?;
        }
        if state.best.is_some() && self.cfg.select == Select::BestVal {
            check_names(&tensors, "best.", &self.vars).map_err(&bad)?;
            self.best_weights = Some(
                self.vars
                    .iter()
                    .map(|(name, _)| (name.clone(), tensors[&format!("best.{name}")].clone()))
                    .collect(),
            );
        }
        opt.load_state(&tensors, &state.optimizer_steps)
            .map_err(&bad)?;
        tracing::info!(
            dir = %self.dir.display(),
            epoch = state.epoch,
            step = state.step_in_epoch,
            global_step = state.global_step,
            "resuming training from checkpoint"
        );
        self.state = state;
        // Same hash, but possibly another checkpoint cadence: record the one now in force.
        self.state.cfg = self.cfg.clone();
        Ok(())
    }

    /// Writes `final.safetensors` with the selected weights and loads them into the VarMap.
    fn finish(self) -> Result<TrainEnd, TrainError> {
        let selected = match (&self.best_weights, self.cfg.select) {
            (Some(best), Select::BestVal) => best.clone(),
            (None, Select::BestVal) => {
                // Unreachable after a validated config and at least one epoch; refuse rather than
                // silently return the last weights as "best".
                return Err(TrainError::Config(
                    "no validated epoch to select weights from".into(),
                ));
            }
            (_, Select::Last) => snapshot(&self.vars)?,
        };
        let best_epoch = self.state.best.as_ref().map(|b| b.epoch);
        let mut meta = HashMap::from([
            (
                "caf.train.cfg_sha256".to_string(),
                self.state.cfg_hash.clone(),
            ),
            (
                "caf.train.epochs_run".to_string(),
                self.state.metrics.len().to_string(),
            ),
        ]);
        if let Some(e) = best_epoch {
            meta.insert("caf.train.best_epoch".into(), e.to_string());
        }
        // safetensors writes metadata in HashMap order, which differs between processes; one
        // key holding sorted JSON keeps the file's bytes (and so its SHA-256, which the store
        // records and later jobs check) a function of the weights alone.
        let sorted: std::collections::BTreeMap<String, String> = meta.into_iter().collect();
        let meta = HashMap::from([(
            "caf.train".to_string(),
            serde_json::to_string(&sorted).unwrap_or_default(),
        )]);
        let bytes = checkpoint::to_safetensors(&selected, meta)?;
        let weights = self.dir.join(FINAL_WEIGHTS);
        checkpoint::write_atomic(&weights, &bytes)?;
        if self.cfg.select == Select::BestVal {
            for ((name, var), (_, t)) in self.vars.iter().zip(&selected) {
                var.set(t).ctx(&format!("loading the selected `{name}`"))?;
            }
        }
        Ok(TrainEnd::Finished {
            weights,
            best_epoch,
            metrics: self.state.metrics,
        })
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Every VarMap entry, sorted by name so checkpoints list them in a stable order.
fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>, TrainError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Config("the VarMap's lock is poisoned".into()))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// VarMap names of the trainable variables, which must be distinct VarMap entries.
fn name_trainable(vars: &[(String, Var)], trainable: &[Var]) -> Result<Vec<String>, TrainError> {
    if trainable.is_empty() {
        return Err(TrainError::Config("no trainable variables".into()));
    }
    let by_id: HashMap<_, &str> = vars
        .iter()
        .map(|(name, var)| (var.as_tensor().id(), name.as_str()))
        .collect();
    let mut seen = HashSet::new();
    trainable
        .iter()
        .enumerate()
        .map(|(i, var)| {
            let name = by_id.get(&var.as_tensor().id()).ok_or_else(|| {
                TrainError::Config(format!(
                    "trainable variable #{i} ({:?}) is not in the VarMap, so it could not be \
                     checkpointed",
                    var.as_tensor().dims()
                ))
            })?;
            if !seen.insert(*name) {
                return Err(TrainError::Config(format!(
                    "`{name}` is listed twice among the trainable variables"
                )));
            }
            Ok(name.to_string())
        })
        .collect()
}

/// Checks that `tensors` holds exactly `prefix<name>` for every variable, with its shape and dtype.
fn check_names(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    vars: &[(String, Var)],
) -> Result<(), String> {
    let mut problems = Vec::new();
    for (name, var) in vars {
        match tensors.get(&format!("{prefix}{name}")) {
            None => problems.push(format!("missing `{prefix}{name}`")),
            Some(t) if t.dims() != var.dims() || t.dtype() != var.dtype() => {
                problems.push(format!(
                    "`{prefix}{name}` is {:?} {:?}, the model's is {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    var.dtype(),
                    var.dims()
                ))
            }
            Some(_) => {}
        }
    }
    let known: HashSet<String> = vars.iter().map(|(n, _)| format!("{prefix}{n}")).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| k.starts_with(prefix) && !known.contains(*k))
        .collect();
    extra.sort();
    if !extra.is_empty() {
        problems.push(format!("not in the model: {extra:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "does not match the model ({}); was it written for another architecture?",
            problems.join("; ")
        ))
    }
}

/// Deep copies of every variable (a `Var` is updated in place, so clones would follow it).
fn snapshot(vars: &[(String, Var)]) -> Result<Vec<(String, Tensor)>, TrainError> {
    vars.iter()
        .map(|(name, var)| {
            let t = var
                .as_tensor()
                .detach()
                .copy()
                .ctx(&format!("copying `{name}`"))?;
            Ok((name.clone(), t))
        })
        .collect()
}

fn scalar_f32(t: &Tensor) -> candle_core::Result<f32> {
    t.to_dtype(DType::F32)?.to_scalar::<f32>()
}

fn count_correct(logits: &Tensor, y: &Tensor) -> candle_core::Result<u64> {
    let hits = logits
        .argmax(D::Minus1)?
        .eq(y)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(u64::from(hits))
}

#[derive(Clone, Copy, Debug)]
struct ValResult {
    loss: f64,
    correct: u64,
    images: u64,
}

impl ValResult {
    fn acc(&self) -> f64 {
        self.correct as f64 / self.images.max(1) as f64
    }
}

enum Validation {
    /// The hooks cancelled the run part-way; the partial result is discarded.
    Cancelled,
    /// `val_size` = 0.
    NoSplit,
    Done(ValResult),
}

/// Noisy validation in eval mode, with the same noise for each image in every epoch.
fn validate(
    model: &dyn Objective,
    data: &dyn Images,
    plan: &SplitPlan,
    cfg: &TrainConfig,
    device: &Device,
    hooks: &dyn TrainHooks,
) -> Result<Validation, TrainError> {
    if plan.val.is_empty() {
        return Ok(Validation::NoSplit);
    }
    let idx = &plan.val;
    let mut loss_sum = 0f64;
    let mut correct = 0u64;
    for chunk in idx.chunks(cfg.batch) {
        if hooks.cancelled() {
            return Ok(Validation::Cancelled);
        }
        let batch = batches::val_batch(data, chunk, cfg.seed, cfg.sigma as f32, device)
            .ctx("building a validation batch")?;
        let at = StepKey {
            seed: cfg.seed,
            epoch: 0,
            step: 0,
        };
        let (loss, logits) = model.loss(&batch, false, at).ctx("validation loss")?;
        let (loss, logits) = (loss.detach(), logits.detach());
        loss_sum += f64::from(scalar_f32(&loss).ctx("reading the loss")?) * chunk.len() as f64;
        correct += count_correct(&logits, &batch.y).ctx("validation accuracy")?;
    }
    let images = idx.len() as u64;
    Ok(Validation::Done(ValResult {
        loss: loss_sum / images as f64,
        correct,
        images,
    }))
}
