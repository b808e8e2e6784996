//! Checkpoints: what a run must keep to continue bit-for-bit after a kill, and how it is written
//! so that a kill during the write never destroys the last good one.
//!
//! Layout of the checkpoint directory:
//! - `checkpoint.safetensors`: `model.<name>` for every VarMap entry (trainable parameters and
//!   BatchNorm running statistics alike), `optim.<i>.m` / `optim.<i>.v` (momentum buffer, Adam
//!   moments of the i-th trainable variable) and, once there is one, `best.<name>`: the VarMap
//!   at the best validation epoch so far. Its safetensors metadata `caf.train.state` holds the
//!   [`CheckpointState`] as JSON, so tensors and counters are always committed together.
//! - `checkpoint.json`: the same state, pretty-printed for people and tools, written after the
//!   tensors. Where a kill between the two renames left it one checkpoint behind, the state
//!   embedded in the tensors wins.
//! - `final.safetensors`: the selected weights (plain VarMap names), written when a run ends.
//!
//! Every file is written to a temporary name beside it (unique per process, see
//! [`crate::util::write_atomic`]), fsynced, renamed over the old one, and the directory
//! fsynced, so each name always holds either the old or the new complete file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{EpochMetrics, TrainConfig, TrainError};
use crate::data::Images;

pub const CHECKPOINT_JSON: &str = "checkpoint.json";
pub const CHECKPOINT_TENSORS: &str = "checkpoint.safetensors";
pub const FINAL_WEIGHTS: &str = "final.safetensors";
/// Metadata key of the embedded state in `checkpoint.safetensors`.
const STATE_KEY: &str = "caf.train.state";
/// Bumped whenever the meaning of a checkpoint changes; older ones are refused, not misread.
pub const FORMAT: u32 = 1;

/// Identifies the training split a run was started on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub images: usize,
    /// SHA-256 of the labels in order: cheap, and any reordering or a different split changes it.
    pub labels_sha256: String,
}

impl DataFingerprint {
    pub fn of(data: &dyn Images) -> Self {
        Self {
            images: data.len(),
            labels_sha256: hex::encode(Sha256::digest(data.labels_digest_bytes())),
        }
    }
}

/// The best validation result so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub epoch: usize,
    /// Correct noisy validation predictions: compared as an integer so selection never hinges
    /// on floating-point rounding (or on a float's trip through JSON).
    pub val_correct: u64,
    pub val_acc: f64,
}

/// Running sums of the epoch in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    /// Σ batch-mean loss × batch size, as `f64::to_bits`: JSON numbers need not round-trip
    /// exactly, and a resumed epoch must report what an uninterrupted one would.
    pub loss_sum_bits: u64,
    pub correct: u64,
    pub seen: u64,
    /// Wall time of the training steps, summed over the processes that ran them.
    pub train_seconds: f64,
}

impl EpochProgress {
    pub fn loss_sum(&self) -> f64 {
        f64::from_bits(self.loss_sum_bits)
    }
    pub fn add(&mut self, batch_loss: f64, correct: u64, images: u64, seconds: f64) {
        self.loss_sum_bits = (self.loss_sum() + batch_loss * images as f64).to_bits();
        self.correct += correct;
        self.seen += images;
        self.train_seconds += seconds;
    }
}

/// Counters and bookkeeping of a run at a step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    /// [`TrainConfig::hash`] of the run; a checkpoint resumes only under the same hash.
    pub cfg_hash: String,
    /// The configuration itself, for people reading the file.
    pub cfg: TrainConfig,
    pub data: DataFingerprint,
    /// VarMap names of the trainable variables, in optimizer order (`optim.<i>` = the i-th).
    pub trainable: Vec<String>,
    /// Epoch in progress (0-based); equals `cfg.epochs` once training is complete.
    pub epoch: usize,
    /// Optimizer steps of `epoch` already taken.
    pub step_in_epoch: usize,
    /// Optimizer steps taken since the start of the run.
    pub global_step: u64,
    pub best: Option<Best>,
    /// Completed epochs since the best one (early stopping).
    pub epochs_since_best: usize,
    pub progress: EpochProgress,
    /// Per-variable update counts of the optimizer (Adam's bias correction).
    pub optimizer_steps: Vec<u64>,
    /// Metrics of the completed epochs.
    pub metrics: Vec<EpochMetrics>,
}

/// A checkpoint read back: its state and every tensor it holds (on the run's device).
pub struct Loaded {
    pub state: CheckpointState,
    pub tensors: HashMap<String, Tensor>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// [`crate::util::write_atomic`] with the training error type.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::util::write_atomic(path, bytes).map_err(io_err(path))
}

/// Serializes named tensors (moved to the host) with string metadata.
pub fn to_safetensors(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, TrainError> {
    let host: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t
                .detach()
                .to_device(&Device::Cpu)
                .and_then(|t| t.contiguous())
                .map_err(|source| TrainError::Candle {
                    context: format!("copying `{name}` to the host"),
                    source,
                })?;
            Ok((name.clone(), t))
        })
        .collect::<Result<_, TrainError>>()?;
    safetensors::serialize(host, Some(metadata)).map_err(|e| TrainError::Checkpoint {
        path: PathBuf::new(),
        message: format!("serializing tensors: {e}"),
    })
}

/// Writes the checkpoint: tensors (with the embedded state) first, then the JSON.
pub fn write(
    dir: &Path,
    state: &CheckpointState,
    tensors: &[(String, Tensor)],
) -> Result<PathBuf, TrainError> {
    let json = serde_json::to_string_pretty(state).map_err(|e| {
        corrupt(
            &dir.join(CHECKPOINT_JSON),
            format!("serializing state: {e}"),
        )
    })?;
    let meta = HashMap::from([(STATE_KEY.to_string(), json.clone())]);
    let tensors_path = dir.join(CHECKPOINT_TENSORS);
    let bytes = to_safetensors(tensors, meta).map_err(|e| match e {
        TrainError::Checkpoint { message, .. } => corrupt(&tensors_path, message),
        other => other,
    })?;
    write_atomic(&tensors_path, &bytes)?;
    write_atomic(&dir.join(CHECKPOINT_JSON), json.as_bytes())?;
    Ok(tensors_path)
}

fn parse_state(path: &Path, text: &str) -> Result<CheckpointState, TrainError> {
    let state: CheckpointState = serde_json::from_str(text).map_err(|e| {
        corrupt(
            path,
            format!(
                "unreadable training state ({e}); the file is damaged or not a caf checkpoint. \
                 Delete the checkpoint directory to start the run over"
            ),
        )
    })?;
    if state.format != FORMAT {
        return Err(corrupt(
            path,
            format!(
                "checkpoint format {} (this build reads format {FORMAT})",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// Reads the checkpoint in `dir`, or `None` when there is none.
pub fn read(dir: &Path, device: &Device) -> Result<Option<Loaded>, TrainError> {
    let json_path = dir.join(CHECKPOINT_JSON);
    let tensors_path = dir.join(CHECKPOINT_TENSORS);
    let json_state = match std::fs::read_to_string(&json_path) {
        Ok(text) => Some(parse_state(&json_path, &text)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&json_path)(e)),
    };
    let bytes = match std::fs::read(&tensors_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match json_state {
                None => Ok(None),
                Some(_) => Err(corrupt(
                    &tensors_path,
                    format!("missing, though {CHECKPOINT_JSON} exists beside it"),
                )),
            };
        }
        Err(e) => return Err(io_err(&tensors_path)(e)),
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        corrupt(
            &tensors_path,
            format!("not a readable safetensors file: {e}"),
        )
    })?;
    let embedded = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| corrupt(&tensors_path, format!("no `{STATE_KEY}` metadata")))?;
    let state = parse_state(&tensors_path, embedded)?;
    if let Some(js) = &json_state {
        if js.global_step != state.global_step
            || js.epoch != state.epoch
            || js.step_in_epoch != state.step_in_epoch
        {
            // The process died between the two renames: the tensors and their embedded state
            // are the newer, consistent pair.
            tracing::warn!(
                dir = %dir.display(),
                json_step = js.global_step,
                tensors_step = state.global_step,
                "checkpoint.json lags checkpoint.safetensors; resuming from the latter"
            );
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| corrupt(&tensors_path, format!("reading tensors: {e}")))?;
    Ok(Some(Loaded { state, tensors }))
}
