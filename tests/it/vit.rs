//! CAF on a vision-transformer backbone end to end: a CIFAR ViT with seeded weights (the formula
//! weights of `caf::models::formula`, saved under timm's names as a timm checkpoint would be),
//! smoothed as it is and with a CAF adapter trained on it, through `caf run` on real CIFAR-10.

use caf::models::{self, Arch, VitName};

use super::util::*;

/// A CIFAR ViT (`vit_cifar_tiny_patch4_32`, 10 classes) with formula weights, as safetensors.
fn vit_weights(dir: &Dir) -> std::path::PathBuf {
    let dev = candle_core::Device::Cpu;
    let named = models::expected_tensors(Arch::Vit(VitName::CifarTiny4), 10).expect("timm names");
    let tensors = models::formula::tensors(&named, &dev).expect("weights");
    let path = dir.join("vit_cifar.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("save");
    path
}

#[test]
fn caf_on_a_cifar_vit_runs_end_to_end_fused_as_alone_and_plan_counts_its_cost() {
    let dir = Dir::new();
    let weights = vit_weights(&dir);
    let spec = vit_spec(
        &weights,
        "  params: {backbone: vit, sigma: 0.25}
  axes:
    method: [smooth, caf]
  methods:
    caf:
      params: {epochs: 1, max_train: 256, val_size: 128, train_batch: 64}
      axes: {adapter: [\"cnn:8:2\", \"vit:48:1:4\"]}
",
    );
    dir.write("vit.yaml", &spec);

    // The plan counts both adapter types' trained parameters (adapter + head on the ViT's
    // width 192) and their FLOPs with the frozen ViT's forward.
    let plan = ok(&dir.run(&["plan", "vit.yaml"]));
    assert!(plan.contains("training compute"), "{plan}");
    for spec in ["cnn:8:2", "vit:48:1:4"] {
        let arch: models::AdapterArch = spec.parse().expect(spec);
        let c = models::adapter::cost(&arch, 192).expect("cost");
        let trained = c.params + 192 * 10 + 10;
        let row = plan.lines().find(|l| {
            l.contains(&format!("train-caf vit {spec} "))
                && l.split_whitespace().nth(1) == Some(trained.to_string().as_str())
        });
        assert!(
            row.is_some(),
            "no row with {trained} trained parameters for {spec}:\n{plan}"
        );
    }

    ok(&dir.run(&["run", "vit.yaml", "--db", "v.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "v.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().unwrap();
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    assert_eq!(kinds("train-caf"), 2, "{jobs:#?}");
    assert_eq!(kinds("certify"), 3, "{jobs:#?}");
    // The plain ViT and its two adapters share one backbone pass per noise batch.
    assert_eq!(kinds("certify-fused"), 1, "{jobs:#?}");
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
    let rows = ok(&dir.run(&["export", "--db", "v.db"]));
    // Header + 3 certify jobs × 5 images (skip 2000 over the 10,000 test images).
    assert_eq!(rows.lines().count(), 1 + 3 * 5, "{rows}");

    // Fusion is a way of running the jobs, not another result: the smoothed ViT and the CNN
    // adapter each alone (no group to fuse), in fresh databases, give the same jobs' same rows.
    for (name, grid) in [
        (
            "smooth",
            "  params: {backbone: vit, sigma: 0.25, method: smooth}\n",
        ),
        (
            "caf",
            "  params: {backbone: vit, sigma: 0.25, method: caf, epochs: 1, max_train: 256, \
             val_size: 128, train_batch: 64, adapter: \"cnn:8:2\"}\n",
        ),
    ] {
        dir.write(&format!("{name}.yaml"), &vit_spec(&weights, grid));
        let db = format!("{name}.db");
        ok(&dir.run(&[
            "run",
            &format!("{name}.yaml"),
            "--db",
            &db,
            "--artifacts",
            &format!("art-{name}"),
        ]));
        let alone = ok(&dir.run(&["export", "--db", &db]));
        let alone: Vec<&str> = alone.lines().skip(1).collect();
        assert_eq!(alone.len(), 5, "{name}");
        for r in alone {
            assert!(
                rows.lines().any(|l| l == r),
                "the fused run lacks {name}'s {r}"
            );
        }
    }
}

fn vit_spec(weights: &std::path::Path, grid: &str) -> String {
    format!(
        "name: vit-smoke
seed: 5
data:
  dataset: cifar10
  root: {data}
backbones:
  vit:
    arch: vit_cifar_tiny_patch4_32
    weights: {weights}
    normalize: {{mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
certify: {{n0: 10, n: 100, batch: 110, skip: 2000}}
grid:
{grid}",
        data = shared_data().join("cifar10-jpeg").display(),
        weights = weights.display(),
    )
}

/// The paper's baselines on a transformer: Gaussian augmentation (`rs`) and SmoothAdv fine-tune
/// the whole ViT, denoised smoothing trains a DnCNN in front of it (both objectives), each
/// certified; the trained ViT loads as a timm checkpoint.
#[test]
fn rs_smoothadv_and_denoised_smoothing_train_and_certify_a_vit() {
    let dir = Dir::new();
    let weights = vit_weights(&dir);
    let small = "epochs: 1, max_train: 64, val_size: 32, train_batch: 32";
    let spec = vit_spec(
        &weights,
        &format!(
            "  params: {{backbone: vit, sigma: 0.25, {small}}}
  axes:
    method: [rs, smoothadv, denoised]
  methods:
    smoothadv: {{params: {{pgd_steps: 1, eps_warmup_epochs: 0}}}}
    denoised: {{params: {{objective: mse-then-stability, denoiser: \"dncnn:3:8\"}}}}
"
        ),
    );
    dir.write("base.yaml", &spec);
    ok(&dir.run(&["run", "base.yaml", "--db", "b.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "b.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().unwrap();
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    assert_eq!(
        (kinds("train-rs"), kinds("train-denoised"), kinds("certify")),
        (2, 2, 3),
        "{jobs:#?}"
    );
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
    let rows = ok(&dir.run(&["export", "--db", "b.db"]));
    assert_eq!(rows.lines().count(), 1 + 3 * 5, "{rows}");

    // The rs-trained ViT is a timm checkpoint: `caf certify --arch` takes it as it is.
    let trained = jobs
        .iter()
        .find(|j| j["kind"] == "train-rs" && !j["label"].as_str().unwrap().contains("smoothadv"))
        .and_then(|j| j["weights"]["path"].as_str())
        .expect("the rs job's weights")
        .to_string();
    let out = dir.run(&[
        "certify",
        "--arch",
        "vit_cifar_tiny_patch4_32",
        "--weights",
        &trained,
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.5,0.5,0.5",
        "--data",
        "cifar10",
        "--data-root",
        shared_data().join("cifar10-jpeg").to_str().unwrap(),
        "--sigma",
        "0.25",
        "--n0",
        "10",
        "--n",
        "100",
        "--batch",
        "110",
        "--skip",
        "2000",
        "--out",
        "one.tsv",
    ]);
    ok(&out);
    assert_eq!(
        std::fs::read_to_string(dir.join("one.tsv"))
            .unwrap()
            .lines()
            .count(),
        1 + 5
    );
}

/// A backbone the study trains itself (the ViT CPU demonstration's first step): `train:` in
/// place of `weights:` trains it clean from scratch, once, and then it is smoothed, RS-fine-tuned
/// and frozen under an adapter like any checkpoint; its weights load as a timm checkpoint.
#[test]
fn a_backbone_trained_clean_by_the_study_serves_smooth_rs_and_caf() {
    let dir = Dir::new();
    let small = "epochs: 1, max_train: 64, val_size: 32, train_batch: 32";
    let spec = format!(
        "name: vit-trained
seed: 5
data:
  dataset: cifar10
  root: {data}
backbones:
  vit:
    arch: vit_cifar_tiny_patch4_32
    train: {{{small}, optimizer: adamw, lr: 0.001}}
certify: {{n0: 10, n: 100, batch: 110, skip: 2000}}
grid:
  params: {{backbone: vit, sigma: 0.25}}
  axes:
    method: [smooth, rs, caf]
  methods:
    rs: {{params: {{{small}}}}}
    caf: {{params: {{adapter: \"cnn:8:2\", {small}}}}}
",
        data = shared_data().join("cifar10-jpeg").display(),
    );
    dir.write("trained.yaml", &spec);
    let plan = ok(&dir.run(&["plan", "trained.yaml"]));
    assert!(plan.contains("train-clean vit from scratch"), "{plan}");
    ok(&dir.run(&["run", "trained.yaml", "--db", "t.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "t.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().unwrap();
    let clean: Vec<&serde_json::Value> = jobs
        .iter()
        .filter(|j| j["label"] == "train-clean vit from scratch")
        .collect();
    assert_eq!(clean.len(), 1, "{jobs:#?}");
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    // The clean training, rs's noisy fine-tuning of it, the adapter.
    assert_eq!(
        (kinds("train-rs"), kinds("train-caf"), kinds("eval")),
        (2, 1, 1),
        "{jobs:#?}"
    );
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
    let rows = ok(&dir.run(&["export", "--db", "t.db"]));
    // smooth, rs and caf: 5 certified images each.
    assert_eq!(rows.lines().count(), 1 + 3 * 5, "{rows}");
    // The clean training is not a noise level: the report's main table lists the smoothed clean
    // ViT, which the paired comparison uses as its baseline, and draws no cross-σ matrix.
    ok(&dir.run(&["report", "--db", "t.db", "--out", "rep"]));
    let md = std::fs::read_to_string(dir.path().join("rep/report.md")).expect("report.md");
    let table = md
        .split("## Certified accuracy at chosen radii")
        .nth(1)
        .and_then(|t| t.split("\n## ").next())
        .expect("the main table");
    assert!(table.contains("| smooth |"), "{table}");
    assert!(md.contains("## Paired comparison against smooth"), "{md}");
    assert!(!md.contains("across noise levels"), "{md}");

    // The clean network is an ordinary timm checkpoint.
    let weights = clean[0]["weights"]["path"].as_str().expect("weights");
    let net = models::load_backbone(
        Arch::Vit(VitName::CifarTiny4),
        std::path::Path::new(weights),
        models::Normalize {
            mean: [0.5; 3],
            std: [0.5; 3],
        },
        &candle_core::Device::Cpu,
    );
    assert!(net.is_ok(), "{:?}", net.err());

    // Run again: everything is recorded, nothing retrains (same weights, same attempt).
    let before = clean[0].clone();
    ok(&dir.run(&["run", "trained.yaml", "--db", "t.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "t.db"]))).unwrap();
    let after = v[0]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == before["id"])
        .expect("the clean job")
        .clone();
    assert_eq!(after["weights"], before["weights"]);
    assert_eq!(after["attempts"], before["attempts"]);
}

/// `caf bench train-step` measures a ViT's training step: the whole network from scratch
/// (`rs`) and adapters on it frozen (`caf`), with formula weights when none are given, and
/// refuses an architecture caf cannot train.
#[test]
fn bench_train_step_runs_on_a_cifar_vit() {
    let dir = Dir::new();
    for method in ["rs", "caf"] {
        let out = dir.run(&[
            "bench",
            "train-step",
            "--method",
            method,
            "--arch",
            "vit_cifar_tiny_patch4_32",
            "--adapter",
            "cnn:8:1",
            "--batch",
            "4",
            "--seconds",
            "0.5",
            "--json",
        ]);
        let stdout = ok(&out);
        assert!(
            text(&out.stderr).contains("note: no --weights: vit_cifar_tiny_patch4_32"),
            "{}",
            text(&out.stderr)
        );
        let json = &stdout[stdout.find('{').expect("json")..];
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        let rate = v["throughput"]["images_per_sec_median"]
            .as_f64()
            .expect("rate");
        assert!(rate > 0.0, "{method}: {v}");
        // FLOPs per image are counted for the ViT (forward + backward of what trains).
        assert!(v["peak"]["gflops"].as_f64().is_some_and(|g| g > 0.0), "{v}");
    }
    let out = dir.run(&[
        "bench",
        "train-step",
        "--method",
        "rs",
        "--arch",
        "resnet50",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("CIFAR ResNet or a ViT"));
}

/// int8 is defined for the CIFAR ResNets' convolutions: a ViT cell asking for it is a located
/// plan error, before anything runs.
#[test]
fn int8_on_a_vit_is_a_plan_error() {
    let dir = Dir::new();
    let weights = vit_weights(&dir);
    let spec = vit_spec(
        &weights,
        "  params: {backbone: vit, method: smooth, sigma: 0.25, precision: int8}\n",
    );
    dir.write("q.yaml", &spec);
    let out = dir.run(&["plan", "q.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("q.yaml:13:") && err.contains("int8 runs on CIFAR ResNet backbones only"),
        "{err}"
    );
}
