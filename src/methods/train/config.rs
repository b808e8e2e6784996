//! What a training run is: [`TrainConfig`] and its parts, with validation and the hash that ties
//! a checkpoint to the configuration that wrote it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::TrainError;

/// Everything that decides a training run's result (apart from the model, its initial weights
/// and the data, which the caller supplies).
///
/// The defaults are Cohen et al. (2019)'s CIFAR-10 recipe for training a base classifier from
/// scratch: 90 epochs, batch 256, SGD (lr 0.1, momentum 0.9, weight decay 1e-4), lr × 0.1 at
/// epochs 30 and 60, crop + flip augmentation; plus a 5,000-image validation split for model
/// selection. CAF adapters use Adam (lr 1e-3) instead, see [`OptimizerConfig::adam`].
///
/// In serialized form every field but `sigma` may be omitted (then it takes its default):
/// σ defines what the trained model is, so forgetting it must not silently mean clean training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training images. Default 90.
    #[serde(default = "defaults::epochs")]
    pub epochs: usize,
    /// Images per optimizer step. Default 256. A final batch of a single image is dropped
    /// (BatchNorm cannot estimate a variance from one sample); any larger remainder is kept.
    #[serde(default = "defaults::batch")]
    pub batch: usize,
    /// Default: SGD, lr 0.1, momentum 0.9, no Nesterov, weight decay 1e-4.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule after warm-up. Default: ×0.1 at epochs 30 and 60.
    #[serde(default)]
    pub schedule: Schedule,
    /// Epochs of linear warm-up from lr/warm-up-steps to lr, before `schedule` takes over.
    /// Default 0.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Standard deviation of the Gaussian noise added to every training image after
    /// augmentation, in [0, 1] pixel units (randomized-smoothing training). 0 = clean training.
    /// Required when deserializing; [`Default`] gives 0.
    pub sigma: f64,
    /// Random crop of the 4-pixel zero-padded image + horizontal flip. Default on.
    #[serde(default = "defaults::yes")]
    pub augment: bool,
    /// Root of every random draw of the run (shuffles, augmentation, noise). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// The last `val_size` images of the training split are held out for validation (model
    /// selection, early stopping); the test split is never used. Default 5,000.
    #[serde(default = "defaults::val_size")]
    pub val_size: usize,
    /// Train on only the first `max_train` non-validation images (smoke tests). Default: all.
    #[serde(default)]
    pub max_train: Option<usize>,
    /// Also checkpoint every this many optimizer steps (a checkpoint is always written at the
    /// end of each epoch). Not part of the configuration hash: changing it when resuming is fine.
    #[serde(default)]
    pub checkpoint_every_steps: Option<u64>,
    /// Which weights `final.safetensors` holds. Default: the best noisy validation accuracy.
    #[serde(default)]
    pub select: Select,
    /// Stop after this many epochs without a new best validation accuracy. Default: never.
    #[serde(default)]
    pub early_stop_patience: Option<usize>,
}

mod defaults {
    pub fn epochs() -> usize {
        90
    }
    pub fn batch() -> usize {
        256
    }
    pub fn yes() -> bool {
        true
    }
    pub fn val_size() -> usize {
        5000
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: defaults::epochs(),
            batch: defaults::batch(),
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            warmup_epochs: 0,
            sigma: 0.0,
            augment: true,
            seed: 0,
            val_size: defaults::val_size(),
            max_train: None,
            checkpoint_every_steps: None,
            select: Select::default(),
            early_stop_patience: None,
        }
    }
}

/// The optimizer and its hyper-parameters; update rules are PyTorch's (`torch.optim`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// `torch.optim.SGD` without dampening: g ← ∇ + wd·θ; b ← μ·b + g (b = g on the first
    /// step); g ← g + μ·b (Nesterov) or b; θ ← θ − lr·g.
    Sgd {
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f64,
    },
    /// `torch.optim.Adam`: weight decay is an L2 term added to the gradient.
    Adam {
        lr: f64,
        #[serde(default = "adam_defaults::beta1")]
        beta1: f64,
        #[serde(default = "adam_defaults::beta2")]
        beta2: f64,
        #[serde(default = "adam_defaults::eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    /// `torch.optim.AdamW`: weight decay is decoupled, θ ← θ·(1 − lr·wd) before the Adam step.
    AdamW {
        lr: f64,
        #[serde(default = "adam_defaults::beta1")]
        beta1: f64,
        #[serde(default = "adam_defaults::beta2")]
        beta2: f64,
        #[serde(default = "adam_defaults::eps")]
        eps: f64,
        #[serde(default = "adam_defaults::adamw_weight_decay")]
        weight_decay: f64,
    },
}

mod adam_defaults {
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn eps() -> f64 {
        1e-8
    }
    /// PyTorch's AdamW default.
    pub fn adamw_weight_decay() -> f64 {
        1e-2
    }
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
        }
    }
}

impl OptimizerConfig {
    /// Adam with PyTorch's defaults (β = (0.9, 0.999), ε = 1e-8, no weight decay).
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: adam_defaults::beta1(),
            beta2: adam_defaults::beta2(),
            eps: adam_defaults::eps(),
            weight_decay: 0.0,
        }
    }

    /// The base learning rate the schedule scales.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { lr, .. }
            | OptimizerConfig::Adam { lr, .. }
            | OptimizerConfig::AdamW { lr, .. } => lr,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let lr = self.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!(
                "optimizer lr must be positive and finite, got {lr}"
            ));
        }
        match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => {
                if !(0.0..1.0).contains(&momentum) {
                    return Err(format!("SGD momentum must be in [0, 1), got {momentum}"));
                }
                if nesterov && momentum == 0.0 {
                    // PyTorch refuses this too: Nesterov without momentum is plain SGD in disguise.
                    return Err("Nesterov momentum needs momentum > 0".into());
                }
                check_decay(weight_decay)
            }
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            }
            | OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(format!("Adam {name} must be in [0, 1), got {b}"));
                    }
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(format!("Adam eps must be positive and finite, got {eps}"));
                }
                check_decay(weight_decay)
            }
        }
    }
}

fn check_decay(wd: f64) -> Result<(), String> {
    if wd.is_finite() && wd >= 0.0 {
        Ok(())
    } else {
        Err(format!("weight decay must be >= 0 and finite, got {wd}"))
    }
}

/// How the learning rate evolves after warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    Constant,
    /// lr × gamma^k during epoch e, where k = the number of milestones ≤ e (PyTorch's
    /// `MultiStepLR` stepped once per epoch).
    Step {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine annealing from lr towards `min_lr` over the optimizer steps after warm-up: PyTorch's
    /// `CosineAnnealingLR` with `T_max` = those steps, stepped once per batch, so the lr would
    /// reach `min_lr` just after the last step.
    Cosine {
        #[serde(default)]
        min_lr: f64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Step {
            milestones: vec![30, 60],
            gamma: 0.1,
        }
    }
}

/// Which epoch's weights a finished run returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Select {
    /// The epoch with the highest noisy validation accuracy (the earliest on ties).
    #[default]
    BestVal,
    /// The weights after the last epoch.
    Last,
}

impl TrainConfig {
    /// Checks the configuration on its own and against the `images` of the training split.
    pub fn validate(&self, images: usize) -> Result<(), TrainError> {
        self.check(images).map_err(TrainError::Config)
    }

    fn check(&self, images: usize) -> Result<(), String> {
        if self.epochs == 0 {
            return Err("epochs must be at least 1".into());
        }
        if self.batch < 2 {
            // BatchNorm in train mode needs two samples for a variance.
            return Err(format!("batch must be at least 2, got {}", self.batch));
        }
        self.optimizer.validate()?;
        if let Schedule::Step { gamma, .. } = &self.schedule {
            if !(gamma.is_finite() && *gamma > 0.0) {
                return Err(format!("step schedule gamma must be positive, got {gamma}"));
            }
        }
        if let Schedule::Cosine { min_lr } = self.schedule {
            if !(min_lr.is_finite() && min_lr >= 0.0 && min_lr <= self.optimizer.lr()) {
                return Err(format!(
                    "cosine min_lr must be in [0, lr = {}], got {min_lr}",
                    self.optimizer.lr()
                ));
            }
        }
        if self.warmup_epochs >= self.epochs {
            return Err(format!(
                "warmup_epochs ({}) must be fewer than epochs ({})",
                self.warmup_epochs, self.epochs
            ));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return Err(format!("sigma must be >= 0 and finite, got {}", self.sigma));
        }
        if self.checkpoint_every_steps == Some(0) {
            return Err("checkpoint_every_steps must be at least 1".into());
        }
        if self.val_size == 0 {
            if self.select == Select::BestVal {
                return Err("select = best_val needs a validation split (val_size > 0)".into());
            }
            if self.early_stop_patience.is_some() {
                return Err("early stopping needs a validation split (val_size > 0)".into());
            }
        }
        if self.early_stop_patience == Some(0) {
            return Err("early_stop_patience must be at least 1".into());
        }
        if self.val_size >= images {
            return Err(format!(
                "val_size ({}) leaves no training images out of {images}",
                self.val_size
            ));
        }
        if self.max_train == Some(0) {
            return Err("max_train must be at least 1".into());
        }
        let train = self.train_images(images);
        if train < 2 {
            return Err(format!(
                "{train} training image(s): a batch needs at least 2"
            ));
        }
        Ok(())
    }

    /// Training images used out of a split of `images` (validation held out, `max_train` applied).
    pub fn train_images(&self, images: usize) -> usize {
        let available = images.saturating_sub(self.val_size);
        self.max_train.map_or(available, |m| m.min(available))
    }

    /// Hex SHA-256 of everything that decides the run's result, which a checkpoint must match to
    /// be resumed. `checkpoint_every_steps` is left out: it changes when state is saved, not what
    /// is computed.
    pub fn hash(&self) -> String {
        let hashed = TrainConfig {
            checkpoint_every_steps: None,
            ..self.clone()
        };
        // Serializing our own plain struct cannot fail; fall back to Debug rather than panic.
        let text = serde_json::to_string(&hashed).unwrap_or_else(|_| format!("{hashed:?}"));
        let mut h = Sha256::new();
        h.update(b"caf-train-config-v1\n");
        h.update(text.as_bytes());
        hex::encode(h.finalize())
    }
}
