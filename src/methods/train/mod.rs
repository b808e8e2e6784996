//! Training: the loop that fits a model (a base classifier for randomized smoothing, or a
//! certifying adapter on a frozen backbone) on Gaussian-noised CIFAR-10 training images.
//!
//! [`train`] is generic over the model: it sees a [`candle_nn::ModuleT`] producing logits for
//! [0, 1]-pixel inputs, the [`candle_nn::VarMap`] to checkpoint, and the [`candle_core::Var`]s the optimizer may
//! change. Freezing is therefore the caller's choice of `trainable` (and of running frozen parts
//! with `train = false`, so their BatchNorm statistics stay put).
//!
//! Properties the job handlers rely on:
//! - **Noise in pixel space, loss on logits.** Every training image is augmented (crop + flip),
//!   then gets N(0, σ²) noise in [0, 1] units; the loss is cross-entropy on the logits.
//! - **No test data.** Model selection and early stopping use the last `val_size` images of the
//!   training split, with fixed noise per image; the caller passes only the training split.
//! - **Exact resume.** All randomness is keyed by (seed, epoch, image index) (see
//!   [`batches`]), the learning rate is a function of the step, and checkpoints hold the VarMap,
//!   optimizer state and best-so-far weights (see [`checkpoint`]); a run killed at any step and
//!   resumed ends with bitwise the weights of an uninterrupted run on the same device and
//!   thread count.

pub mod batches;
pub mod checkpoint;
mod config;
mod optim;
mod run;
mod schedule;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use checkpoint::{CHECKPOINT_JSON, CHECKPOINT_TENSORS, FINAL_WEIGHTS};
pub use config::{OptimizerConfig, Schedule, Select, TrainConfig};
pub use optim::Optimizer;
pub use run::{train, train_objective, Classification, Objective, StepKey};
pub use schedule::LrSchedule;

/// What one completed epoch looked like. Epochs are counted from 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Optimizer steps in this epoch.
    pub steps: u64,
    /// Learning rate of the epoch's first step.
    pub lr: f64,
    /// Mean cross-entropy over the epoch's (augmented, noisy) training images, under the weights
    /// of the moment each batch was seen.
    pub train_loss: f64,
    /// Accuracy on those same noisy batches.
    pub train_acc: f64,
    /// Mean cross-entropy on the noisy validation images in eval mode; `None` without a
    /// validation split.
    pub val_loss: Option<f64>,
    /// Accuracy on the noisy validation images (a proxy for the smoothed classifier's accuracy).
    pub val_acc: Option<f64>,
    /// Training images per second over the epoch's optimizer steps (batch building included,
    /// validation excluded).
    pub images_per_sec: f64,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
}

/// How [`train`] ended.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainEnd {
    Finished {
        /// `dir/final.safetensors`: the selected VarMap contents under their VarMap names.
        weights: PathBuf,
        /// Epoch (0-based) with the best noisy validation accuracy; `None` without validation.
        best_epoch: Option<usize>,
        /// Metrics of every epoch, including those run before a resume.
        metrics: Vec<EpochMetrics>,
    },
    /// [`TrainHooks::cancelled`] returned true; the checkpoint lets a later call resume.
    Interrupted {
        checkpoint: PathBuf,
        /// Epoch in progress and steps of it already taken when the run stopped.
        epoch: usize,
        step_in_epoch: usize,
        global_step: u64,
    },
}

/// The caller's view into a running [`train`]: cancellation and progress reports.
pub trait TrainHooks {
    /// Polled before every optimizer step and between validation batches; returning true makes
    /// the run checkpoint and return [`TrainEnd::Interrupted`].
    fn cancelled(&self) -> bool;
    /// Called once before the first step, with the epochs already completed (a resumed run's
    /// checkpoint; 0 for a fresh one).
    fn on_start(&mut self, _epochs_done: usize) -> Result<(), TrainError> {
        Ok(())
    }
    /// Called once per completed epoch, before that epoch's checkpoint is written, so a crash in
    /// between repeats the epoch and reports it again (at least once, never lost).
    fn on_epoch(&mut self, metrics: &EpochMetrics) -> Result<(), TrainError>;
    /// Called after each checkpoint is durably written.
    fn on_checkpoint(&mut self, _path: &Path) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Hooks that never cancel and ignore progress.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl TrainHooks for NoHooks {
    fn cancelled(&self) -> bool {
        false
    }
    fn on_epoch(&mut self, _metrics: &EpochMetrics) -> Result<(), TrainError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint that cannot be resumed: damaged, from another model, or from other data.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error(
        "checkpoint {path} was written under another training configuration \
         (hash {found}, this run's is {expected}); use a fresh directory, or delete this one to \
         start over"
    )]
    ConfigMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "training diverged: loss {loss} at epoch {epoch}, step {step} (lower the learning rate)"
    )]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
    },
    /// An error raised by the caller's [`TrainHooks`].
    #[error(transparent)]
    Hook(Box<dyn std::error::Error + Send + Sync>),
}

impl TrainError {
    /// Wraps a hook's own error.
    pub fn hook(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        TrainError::Hook(e.into())
    }
}

/// Adds what was being done to a candle error.
pub(crate) trait CandleContext<T> {
    fn ctx(self, what: &str) -> Result<T, TrainError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, what: &str) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Candle {
            context: what.to_string(),
            source,
        })
    }
}
