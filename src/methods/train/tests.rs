//! Tests of the training loop on tiny models: freezing, exact resume, checkpoint damage, data
//! hygiene, early stopping, and a smoke run on the real CIFAR-10 training split.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};

use super::*;
use crate::data::{load_cifar10, ImageSet, Split, IMAGE_BYTES};
use crate::models::{CifarResNet, Normalize, FEATURE_DIM};

/// conv(3→4, 3×3, stride 4) → BatchNorm → ReLU → global mean → linear(4→10): BatchNorm makes
/// running statistics part of the state, and it is small enough for many steps per test.
struct Tiny {
    conv: Conv2d,
    bn: BatchNorm,
    head: Linear,
}

impl Tiny {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            stride: 4,
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: candle_nn::conv2d(3, 4, 3, cfg, vb.pp("conv"))?,
            bn: candle_nn::batch_norm(4, BatchNormConfig::default(), vb.pp("bn"))?,
            head: candle_nn::linear(4, 10, vb.pp("head"))?,
        })
    }
}

impl ModuleT for Tiny {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.bn.forward_t(&self.conv.forward(x)?, train)?.relu()?;
        self.head.forward(&h.mean(3)?.mean(2)?)
    }
}

/// A fresh Tiny with a seeded random initialisation, or with `init` loaded over it.
fn tiny(init: Option<&HashMap<String, Tensor>>) -> (Tiny, VarMap) {
    let varmap = VarMap::new();
    // Seeded: every test run starts from the same weights, so outcomes are reproducible.
    let vb = crate::models::init::seeded_var_builder(&varmap, 11, &Device::Cpu);
    let model = Tiny::new(vb).expect("tiny model");
    if let Some(init) = init {
        set_all(&varmap, init);
    }
    (model, varmap)
}

fn set_all(varmap: &VarMap, values: &HashMap<String, Tensor>) {
    let data = varmap.data().lock().expect("varmap");
    for (name, var) in data.iter() {
        var.set(&values[name]).expect("set var");
    }
}

fn all_vars(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().expect("varmap");
    let mut named: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, v)| v).collect()
}

/// Trainable = every VarMap entry except BatchNorm's running statistics (which have no gradient
/// and are updated by the forward pass).
fn trainable_of(varmap: &VarMap) -> Vec<Var> {
    let data = varmap.data().lock().expect("varmap");
    let mut named: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named.into_iter().map(|(_, v)| v).collect()
}

/// Deep copies of the VarMap's contents, by name.
fn contents(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().expect("varmap");
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().expect("copy")))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to vec")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn assert_bitwise_equal(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for (k, t) in a {
        assert_eq!(bits(t), bits(&b[k]), "`{k}` differs");
    }
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("load safetensors")
}

/// `n` synthetic images whose mean brightness encodes the label, so a tiny model can learn.
fn synthetic(n: usize) -> ImageSet {
    let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i * 7 % 10) as u8;
        labels.push(label);
        for p in 0..IMAGE_BYTES {
            let wiggle = ((i * 131 + p * 17) % 41) as u8;
            pixels.push(label * 20 + wiggle);
        }
    }
    ImageSet::new(pixels, labels, Vec::new())
}

fn small_cfg() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch: 8,
        optimizer: OptimizerConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
        schedule: Schedule::Cosine { min_lr: 0.001 },
        warmup_epochs: 1,
        sigma: 0.25,
        val_size: 8,
        ..TrainConfig::default()
    }
}

/// Hooks driven by a script: cancel at the n-th poll and/or right after an epoch completes.
#[derive(Default)]
struct Script {
    polls: Cell<usize>,
    cancel_at_poll: Option<usize>,
    cancel_after_epoch: bool,
    saw_epoch: bool,
    epochs: Vec<EpochMetrics>,
    checkpoints: Vec<PathBuf>,
    /// The completed epochs `on_start` reported.
    starts: Vec<usize>,
}

impl TrainHooks for Script {
    fn on_start(&mut self, epochs_done: usize) -> Result<(), TrainError> {
        self.starts.push(epochs_done);
        Ok(())
    }
    fn cancelled(&self) -> bool {
        let n = self.polls.get() + 1;
        self.polls.set(n);
        self.cancel_at_poll == Some(n) || (self.cancel_after_epoch && self.saw_epoch)
    }
    fn on_epoch(&mut self, m: &EpochMetrics) -> Result<(), TrainError> {
        self.epochs.push(m.clone());
        self.saw_epoch = true;
        Ok(())
    }
    fn on_checkpoint(&mut self, path: &Path) -> Result<(), TrainError> {
        self.checkpoints.push(path.to_path_buf());
        Ok(())
    }
}

fn run_tiny(
    init: &HashMap<String, Tensor>,
    fresh_init: bool,
    data: &dyn crate::data::Images,
    cfg: &TrainConfig,
    dir: &Path,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainEnd, TrainError> {
    // A resumed process starts from a freshly (randomly) built model: the checkpoint must
    // overwrite all of it.
    let (model, varmap) = if fresh_init {
        tiny(None)
    } else {
        tiny(Some(init))
    };
    let trainable = trainable_of(&varmap);
    train(
        &model,
        &varmap,
        trainable,
        data,
        cfg,
        dir,
        &Device::Cpu,
        hooks,
    )
}

fn finished(end: TrainEnd) -> (PathBuf, Option<usize>, Vec<EpochMetrics>) {
    match end {
        TrainEnd::Finished {
            weights,
            best_epoch,
            metrics,
        } => (weights, best_epoch, metrics),
        other => panic!("expected a finished run, got {other:?}"),
    }
}

fn interrupted_at(end: TrainEnd) -> (usize, usize) {
    match end {
        TrainEnd::Interrupted {
            epoch,
            step_in_epoch,
            ..
        } => (epoch, step_in_epoch),
        other => panic!("expected an interrupted run, got {other:?}"),
    }
}

fn same_metrics(a: &[EpochMetrics], b: &[EpochMetrics]) {
    assert_eq!(a.len(), b.len());
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(1.0);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.epoch, x.steps), (y.epoch, y.steps));
        assert!(close(x.lr, y.lr), "{x:?} vs {y:?}");
        assert!(close(x.train_loss, y.train_loss), "{x:?} vs {y:?}");
        assert_eq!(x.train_acc, y.train_acc);
        assert!(close(
            x.val_loss.expect("val loss"),
            y.val_loss.expect("val loss")
        ));
        assert_eq!(x.val_acc, y.val_acc);
    }
}

#[test]
fn resume_at_any_point_equals_an_uninterrupted_run() {
    let data = synthetic(48); // 40 training images = 5 steps of 8, 8 validation images
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    for cfg in [
        small_cfg(),
        TrainConfig {
            optimizer: OptimizerConfig::AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
            },
            schedule: Schedule::Step {
                milestones: vec![1],
                gamma: 0.5,
            },
            warmup_epochs: 0,
            select: Select::BestVal,
            ..small_cfg()
        },
    ] {
        let straight_dir = tempfile::tempdir().expect("tempdir");
        let straight_cfg = TrainConfig {
            checkpoint_every_steps: Some(2),
            ..cfg.clone()
        };
        let mut hooks = Script::default();
        let end = run_tiny(
            &init,
            false,
            &data,
            &straight_cfg,
            straight_dir.path(),
            &mut hooks,
        )
        .expect("straight run");
        let (straight_weights, straight_best, straight_metrics) = finished(end);
        assert_eq!(straight_metrics.len(), 2);
        assert_eq!(hooks.epochs, straight_metrics);
        // Periodic checkpoints at global steps 2, 4, 6, 8 (not 10: the epoch end writes one).
        assert_eq!(hooks.checkpoints.len(), 4 + 2);

        // The same run, killed three times: mid-epoch, at an epoch boundary, during validation.
        let dir = tempfile::tempdir().expect("tempdir");
        let resumed_cfg = TrainConfig {
            checkpoint_every_steps: Some(3),
            ..cfg.clone()
        };
        let mut h = Script {
            cancel_at_poll: Some(3),
            ..Script::default()
        };
        let end = run_tiny(&init, false, &data, &resumed_cfg, dir.path(), &mut h).expect("part 1");
        assert_eq!(interrupted_at(end), (0, 2));
        let mut h = Script {
            cancel_after_epoch: true,
            ..Script::default()
        };
        let end = run_tiny(&init, true, &data, &resumed_cfg, dir.path(), &mut h).expect("part 2");
        assert_eq!(interrupted_at(end), (1, 0));
        assert_eq!(h.starts, [0], "resumed mid-epoch 0");
        // Polls 1–5 precede the 5 steps, 6 precedes validation, 7 its first batch.
        let mut h = Script {
            cancel_at_poll: Some(7),
            ..Script::default()
        };
        let end = run_tiny(&init, true, &data, &resumed_cfg, dir.path(), &mut h).expect("part 3");
        assert_eq!(interrupted_at(end), (1, 5));
        assert_eq!(h.starts, [1], "one epoch done before this part");
        let end =
            run_tiny(&init, true, &data, &resumed_cfg, dir.path(), &mut NoHooks).expect("part 4");
        let (weights, best, metrics) = finished(end);

        assert_bitwise_equal(&load(&straight_weights), &load(&weights));
        assert_eq!(straight_best, best);
        same_metrics(&straight_metrics, &metrics);
        // BatchNorm statistics were trained and are part of what was compared.
        let stats = load(&weights);
        assert!(bits(&stats["bn.running_mean"])
            .iter()
            .any(|&b| f32::from_bits(b) != 0.0));

        // A finished run called again returns at once with the same result.
        let end =
            run_tiny(&init, true, &data, &resumed_cfg, dir.path(), &mut NoHooks).expect("again");
        let (again, _, again_metrics) = finished(end);
        assert_bitwise_equal(&load(&weights), &load(&again));
        assert_eq!(again_metrics.len(), 2);
    }
}

#[test]
fn the_optimizer_and_a_runs_randomness_are_independent_of_checkpoint_cadence() {
    // Same config apart from checkpointing: identical weights (checkpointing only observes).
    let data = synthetic(48);
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let cfg = TrainConfig {
        epochs: 1,
        warmup_epochs: 0,
        ..small_cfg()
    };
    let wa = finished(run_tiny(&init, false, &data, &cfg, a.path(), &mut NoHooks).expect("a")).0;
    let cfg_b = TrainConfig {
        checkpoint_every_steps: Some(1),
        ..cfg.clone()
    };
    let wb = finished(run_tiny(&init, false, &data, &cfg_b, b.path(), &mut NoHooks).expect("b")).0;
    assert_bitwise_equal(&load(&wa), &load(&wb));
    // A different seed gives different weights.
    let c = tempfile::tempdir().expect("tempdir");
    let cfg_c = TrainConfig { seed: 1, ..cfg };
    let wc = finished(run_tiny(&init, false, &data, &cfg_c, c.path(), &mut NoHooks).expect("c")).0;
    assert_ne!(
        bits(&load(&wa)["head.weight"]),
        bits(&load(&wc)["head.weight"])
    );
}

/// A frozen ResNet-20 φ (VarMap entries outside `trainable`, run in eval mode) plus a trainable
/// linear head: the CAF setting without the adapter.
struct FrozenBackbone {
    backbone: CifarResNet,
    head: Linear,
}

impl ModuleT for FrozenBackbone {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.head.forward(&self.backbone.features_t(x, false)?)
    }
}

#[test]
fn frozen_backbone_stays_bitwise_unchanged_while_the_head_trains() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = FrozenBackbone {
        backbone: CifarResNet::new(20, 10, Normalize::IMAGENET, vb.pp("backbone")).expect("resnet"),
        head: candle_nn::linear(FEATURE_DIM, 10, vb.pp("head")).expect("head"),
    };
    let trainable: Vec<Var> = {
        let data = varmap.data().lock().expect("varmap");
        data.iter()
            .filter(|(k, _)| k.starts_with("head."))
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(trainable.len(), 2);
    let before = contents(&varmap);
    let cfg = TrainConfig {
        epochs: 1,
        batch: 8,
        optimizer: OptimizerConfig::adam(1e-2),
        schedule: Schedule::Constant,
        sigma: 0.25,
        val_size: 8,
        select: Select::Last,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let end = train(
        &model,
        &varmap,
        trainable,
        &synthetic(32), // 24 training images: 3 steps
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut NoHooks,
    )
    .expect("train");
    let (weights, _, metrics) = finished(end);
    assert_eq!(metrics[0].steps, 3);
    let after = contents(&varmap);
    let saved = load(&weights);
    let mut backbone = 0;
    for (name, t) in &before {
        if name.starts_with("backbone.") {
            assert_eq!(bits(t), bits(&after[name]), "`{name}` changed");
            assert_eq!(bits(t), bits(&saved[name]), "`{name}` saved changed");
            backbone += 1;
        } else {
            assert_ne!(bits(t), bits(&after[name]), "`{name}` did not train");
        }
    }
    // conv + BN (weight, bias, running mean/var) per layer: 19 convs, 19 BNs, the linear.
    assert_eq!(backbone, 19 + 19 * 4 + 2);
}

#[test]
fn a_changed_configuration_is_refused() {
    let data = synthetic(48);
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = small_cfg();
    let mut h = Script {
        cancel_at_poll: Some(2),
        ..Script::default()
    };
    let end = run_tiny(&init, false, &data, &cfg, dir.path(), &mut h).expect("part 1");
    assert_eq!(interrupted_at(end), (0, 1));
    let other = TrainConfig {
        sigma: 0.5,
        ..cfg.clone()
    };
    let err = run_tiny(&init, true, &data, &other, dir.path(), &mut NoHooks).unwrap_err();
    assert!(matches!(err, TrainError::ConfigMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("another training configuration"),
        "{err}"
    );
    // Other training data is refused too.
    let err = run_tiny(&init, true, &synthetic(56), &cfg, dir.path(), &mut NoHooks).unwrap_err();
    assert!(
        err.to_string().contains("training set of 48 images"),
        "{err}"
    );
    // So is a model with different variables.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let linear = candle_nn::linear(IMAGE_BYTES, 10, vb.pp("lin")).expect("linear");
    let model = move |x: &Tensor| linear.forward(&x.flatten_from(1)?);
    let err = train(
        &model,
        &varmap,
        all_vars(&varmap),
        &data,
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("trainable variables differ"),
        "{err}"
    );
}

#[test]
fn damaged_checkpoints_give_clear_errors() {
    let data = synthetic(48);
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = small_cfg();
    let mut h = Script {
        cancel_at_poll: Some(3),
        ..Script::default()
    };
    run_tiny(&init, false, &data, &cfg, dir.path(), &mut h).expect("part 1");
    let json = dir.path().join(CHECKPOINT_JSON);
    let tensors = dir.path().join(CHECKPOINT_TENSORS);
    let good_json = std::fs::read(&json).expect("json");
    let good_tensors = std::fs::read(&tensors).expect("tensors");

    // Truncated JSON.
    std::fs::write(&json, &good_json[..good_json.len() / 2]).expect("truncate");
    let err = run_tiny(&init, true, &data, &cfg, dir.path(), &mut NoHooks).unwrap_err();
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("checkpoint.json") && msg.contains("unreadable"),
        "{msg}"
    );
    // JSON that parses but is not a checkpoint.
    std::fs::write(&json, b"{\"hello\": 1}").expect("write");
    let err = run_tiny(&init, true, &data, &cfg, dir.path(), &mut NoHooks).unwrap_err();
    assert!(err.to_string().contains("unreadable"), "{err}");
    std::fs::write(&json, &good_json).expect("restore");

    // Truncated tensors.
    std::fs::write(&tensors, &good_tensors[..good_tensors.len() / 2]).expect("truncate");
    let err = run_tiny(&init, true, &data, &cfg, dir.path(), &mut NoHooks).unwrap_err();
    assert!(matches!(err, TrainError::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("checkpoint.safetensors"), "{err}");
    // Missing tensors beside a JSON.
    std::fs::remove_file(&tensors).expect("remove");
    let err = run_tiny(&init, true, &data, &cfg, dir.path(), &mut NoHooks).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");

    // A stale JSON (a kill between the two renames) defers to the tensors' embedded state.
    std::fs::write(&tensors, &good_tensors).expect("restore");
    let mut state: serde_json::Value = serde_json::from_slice(&good_json).expect("state");
    state["global_step"] = serde_json::json!(0);
    state["step_in_epoch"] = serde_json::json!(0);
    std::fs::write(&json, serde_json::to_vec(&state).expect("json")).expect("write");
    let mut h = Script {
        cancel_at_poll: Some(1),
        ..Script::default()
    };
    let end = run_tiny(&init, true, &data, &cfg, dir.path(), &mut h).expect("resume");
    assert_eq!(interrupted_at(end), (0, 2));
}

/// Records what the training loop feeds it, to check which images each phase uses.
struct Recorder {
    head: Linear,
    seen: Mutex<Vec<(bool, usize, f32, f32)>>,
}

impl ModuleT for Recorder {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let flat = x.flatten_all()?;
        let lo = flat.min(0)?.to_scalar::<f32>()?;
        let hi = flat.max(0)?.to_scalar::<f32>()?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((train, b, lo, hi));
        }
        self.head.forward(&x.mean(3)?.mean(2)?)
    }
}

#[test]
fn training_never_sees_validation_images_and_validation_sees_all_of_them() {
    // Training images are dark (≤ 100/255), validation images white; σ = 0 keeps them apart.
    let n = 40;
    let val = 6;
    let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
    for i in 0..n {
        let v = if i >= n - val {
            255u8
        } else {
            (i * 3 % 100) as u8
        };
        pixels.extend(std::iter::repeat_n(v, IMAGE_BYTES));
    }
    let data = ImageSet::new(pixels, (0..n).map(|i| (i % 10) as u8).collect(), Vec::new());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Recorder {
        head: candle_nn::linear(3, 10, vb.pp("head")).expect("head"),
        seen: Mutex::new(Vec::new()),
    };
    let cfg = TrainConfig {
        epochs: 3,
        batch: 4,
        sigma: 0.0,
        val_size: val,
        max_train: Some(22),
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::Constant,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    train(
        &model,
        &varmap,
        all_vars(&varmap),
        &data,
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut NoHooks,
    )
    .expect("train");
    let seen = model.seen.lock().expect("seen");
    let trained: usize = seen.iter().filter(|s| s.0).map(|s| s.1).sum();
    let validated: usize = seen.iter().filter(|s| !s.0).map(|s| s.1).sum();
    // 22 images = 5 batches of 4 + one of 2, per epoch.
    assert_eq!(trained, 3 * 22);
    assert_eq!(validated, 3 * val);
    for &(train, _, lo, hi) in seen.iter() {
        if train {
            assert!(
                hi <= 100.0 / 255.0 + 1e-6,
                "a training batch held a validation image"
            );
        } else {
            assert_eq!((lo, hi), (1.0, 1.0), "validation saw a training image");
        }
    }
}

#[test]
fn early_stopping_and_best_epoch_selection() {
    // A learning rate so small that the weights do not change. BatchNorm's running statistics
    // still move in train mode, so validation accuracy may still improve for a few epochs
    // (how often depends on the random init): the run must stop exactly 2 epochs after the
    // last improvement, and select that epoch.
    let data = synthetic(48);
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = TrainConfig {
        epochs: 10,
        optimizer: OptimizerConfig::Sgd {
            lr: 1e-30,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        },
        schedule: Schedule::Constant,
        warmup_epochs: 0,
        early_stop_patience: Some(2),
        ..small_cfg()
    };
    let (weights, best, metrics) =
        finished(run_tiny(&init, false, &data, &cfg, dir.path(), &mut NoHooks).expect("train"));
    let best = best.expect("a validation split");
    let accs: Vec<f64> = metrics
        .iter()
        .map(|m| m.val_acc.expect("val acc"))
        .collect();
    let top = accs.iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(accs.iter().position(|&a| a == top), Some(best), "{accs:?}");
    assert!(
        metrics.len() < 10,
        "early stopping never triggered: {accs:?}"
    );
    assert_eq!(
        metrics.len(),
        best + 1 + 2,
        "patience 2 after the best epoch: {accs:?}"
    );
    assert!(weights.ends_with(FINAL_WEIGHTS));

    // With learning, the selected epoch is the first with the highest validation accuracy, and
    // the VarMap ends up holding exactly the weights written to final.safetensors.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = TrainConfig {
        epochs: 4,
        optimizer: OptimizerConfig::adam(3e-2),
        schedule: Schedule::Constant,
        warmup_epochs: 0,
        ..small_cfg()
    };
    let (model, varmap) = tiny(Some(&init));
    let end = train(
        &model,
        &varmap,
        trainable_of(&varmap),
        &data,
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut NoHooks,
    )
    .expect("train");
    let (weights, best, metrics) = finished(end);
    let accs: Vec<f64> = metrics.iter().map(|m| m.val_acc.expect("val")).collect();
    let top = accs.iter().cloned().fold(f64::MIN, f64::max);
    assert_eq!(best, accs.iter().position(|&a| a == top));
    assert_bitwise_equal(&load(&weights), &contents(&varmap));
}

#[test]
fn invalid_configurations_are_refused_before_training() {
    let data = synthetic(48);
    let (_, init_map) = tiny(None);
    let init = contents(&init_map);
    let dir = tempfile::tempdir().expect("tempdir");
    for (cfg, needle) in [
        (
            TrainConfig {
                val_size: 48,
                ..small_cfg()
            },
            "val_size",
        ),
        (
            TrainConfig {
                val_size: 0,
                ..small_cfg()
            },
            "best_val",
        ),
        (
            TrainConfig {
                sigma: -1.0,
                ..small_cfg()
            },
            "sigma",
        ),
        (
            TrainConfig {
                batch: 1,
                ..small_cfg()
            },
            "batch",
        ),
        (
            TrainConfig {
                warmup_epochs: 2,
                ..small_cfg()
            },
            "warmup",
        ),
    ] {
        let err = run_tiny(&init, false, &data, &cfg, dir.path(), &mut NoHooks).unwrap_err();
        assert!(matches!(err, TrainError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(!dir.path().join(CHECKPOINT_JSON).exists());
}

#[test]
fn config_serde_defaults_and_required_sigma() {
    let cfg: TrainConfig = serde_json::from_str(r#"{"sigma": 0.5}"#).expect("parse");
    assert_eq!(
        cfg,
        TrainConfig {
            sigma: 0.5,
            ..TrainConfig::default()
        }
    );
    assert!(serde_json::from_str::<TrainConfig>("{}").is_err());
    let cfg: TrainConfig = serde_json::from_str(
        r#"{"sigma": 0.25, "optimizer": {"adam": {"lr": 0.001}}, "schedule": {"cosine": {}},
            "select": "last", "max_train": 256}"#,
    )
    .expect("parse");
    assert_eq!(cfg.optimizer, OptimizerConfig::adam(1e-3));
    assert_eq!(cfg.schedule, Schedule::Cosine { min_lr: 0.0 });
    assert_eq!(cfg.select, Select::Last);
    let back: TrainConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).expect("ser")).expect("de");
    assert_eq!(back, cfg);
    // The hash ignores the checkpoint cadence and nothing else.
    let with_cadence = TrainConfig {
        checkpoint_every_steps: Some(10),
        ..cfg.clone()
    };
    assert_eq!(cfg.hash(), with_cadence.hash());
    assert_ne!(cfg.hash(), TrainConfig { seed: 1, ..cfg }.hash());
}

#[test]
fn smoke_run_on_real_cifar10() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-jpeg");
    let data = load_cifar10(&root, Split::Train).expect("CIFAR-10 training split");
    assert_eq!(data.len(), 50_000);
    let (model, varmap) = tiny(None);
    let cfg = TrainConfig {
        epochs: 1,
        batch: 64,
        sigma: 0.25,
        max_train: Some(256),
        val_size: 500,
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::Constant,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hooks = Script::default();
    let end = train(
        &model,
        &varmap,
        trainable_of(&varmap),
        &data,
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut hooks,
    )
    .expect("train");
    let (weights, best, metrics) = finished(end);
    assert_eq!(best, Some(0));
    let m = &metrics[0];
    assert_eq!(m.steps, 4);
    assert!(m.train_loss.is_finite() && m.train_loss > 0.0, "{m:?}");
    assert!((0.0..=1.0).contains(&m.train_acc));
    let val_loss = m.val_loss.expect("val loss");
    assert!(val_loss.is_finite() && val_loss > 0.0, "{m:?}");
    assert!(m.images_per_sec > 0.0 && m.seconds > 0.0);
    assert_eq!(hooks.epochs.len(), 1);
    // The weights load back into a fresh model of the same shape.
    let (_, mut fresh) = tiny(None);
    fresh.load(&weights).expect("load final weights");
    // The metrics serialize for the job store.
    let json = serde_json::to_value(m).expect("json");
    assert!(json["val_acc"].is_number());
}

/// Training-step throughput of a CifarResNet-20 from scratch at batch 128 on real CIFAR-10
/// (σ = 0.25, crop + flip, SGD with momentum). Run with
/// `cargo test --release --lib -- --ignored --nocapture methods::train::tests::throughput_resnet20`;
/// `CAF_BENCH_STEPS` sets the number of steps (default 10).
#[test]
#[ignore = "benchmark: minutes on a laptop CPU"]
fn throughput_resnet20_batch128() {
    let steps: usize = std::env::var("CAF_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let device = Device::cuda_if_available(0).expect("device");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-jpeg");
    let data = load_cifar10(&root, Split::Train).expect("CIFAR-10 training split");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let model = CifarResNet::new(20, 10, Normalize::IMAGENET, vb).expect("resnet20");
    let cfg = TrainConfig {
        epochs: 1,
        batch: 128,
        sigma: 0.25,
        max_train: Some(128 * steps),
        val_size: 0,
        select: Select::Last,
        ..TrainConfig::default()
    };
    let started = std::time::Instant::now();
    let batch = batches::train_batch(
        &data,
        &(0..128).collect::<Vec<_>>(),
        batches::SampleSpec {
            seed: 0,
            epoch: 0,
            sigma: 0.25,
            augment: true,
        },
        &device,
    )
    .expect("batch");
    drop(batch);
    let batch_ms = started.elapsed().as_secs_f64() * 1e3;
    let dir = tempfile::tempdir().expect("tempdir");
    let end = train(
        &model,
        &varmap,
        trainable_of(&varmap),
        &data,
        &cfg,
        dir.path(),
        &device,
        &mut NoHooks,
    )
    .expect("train");
    let (_, _, metrics) = finished(end);
    let m = &metrics[0];
    println!(
        "resnet20 batch 128 on {device:?}, {} threads: {} steps, {:.1} images/s \
         ({:.1} ms/step; building one batch on the host: {batch_ms:.1} ms), train loss {:.3}",
        rayon::current_num_threads(),
        m.steps,
        m.images_per_sec,
        128e3 / m.images_per_sec,
        m.train_loss
    );
}

#[test]
fn the_loop_learns_a_learnable_task() {
    // Two classes told apart by brightness (dark vs bright), with σ = 0.1 noise: the loss must
    // fall and the noisy validation accuracy must leave chance behind.
    let n = 120;
    let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as u8;
        labels.push(label);
        for p in 0..IMAGE_BYTES {
            let wiggle = ((i * 131 + p * 17) % 61) as u8;
            pixels.push(if label == 0 { 40 } else { 150 } + wiggle);
        }
    }
    let data = ImageSet::new(pixels, labels, Vec::new());
    let (model, varmap) = tiny(None);
    let cfg = TrainConfig {
        epochs: 8,
        batch: 16,
        optimizer: OptimizerConfig::adam(5e-2),
        schedule: Schedule::Constant,
        sigma: 0.1,
        val_size: 40,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let end = train(
        &model,
        &varmap,
        trainable_of(&varmap),
        &data,
        &cfg,
        dir.path(),
        &Device::Cpu,
        &mut NoHooks,
    )
    .expect("train");
    let (_, best, metrics) = finished(end);
    let first = &metrics[0];
    let last = &metrics[metrics.len() - 1];
    assert!(last.train_loss < first.train_loss, "{metrics:#?}");
    let best_acc = metrics[best.expect("best")].val_acc.expect("val");
    assert!(best_acc >= 0.9, "{metrics:#?}");
}

/// An image folder read batch by batch trains to the same bits as the folder held in memory:
/// same batches, same augmentation draws, same checkpoint fingerprint.
#[test]
fn a_streamed_image_folder_trains_exactly_as_the_folder_in_memory() {
    use crate::data::imagefolder::{self, Preprocess, Streamed};
    let tmp = tempfile::tempdir().expect("tempdir");
    imagefolder::tests::exact100_folder(tmp.path());
    let pre = Preprocess {
        resize: 32,
        image_size: 32,
    };
    let memory = imagefolder::load(tmp.path(), Split::Train, pre).expect("load");
    let streamed = Streamed::open(tmp.path(), Split::Train, pre).expect("open");
    let (_, vm) = tiny(None);
    let init = contents(&vm);
    let cfg = small_cfg();
    let run = |data: &dyn crate::data::Images, dir: &str| {
        let mut hooks = Script::default();
        let end =
            run_tiny(&init, false, data, &cfg, &tmp.path().join(dir), &mut hooks).expect("train");
        finished(end)
    };
    let (a, _, ma) = run(&memory, "memory");
    let (b, _, mb) = run(&streamed, "streamed");
    assert_bitwise_equal(&load(&a), &load(&b));
    same_metrics(&ma, &mb);
}
