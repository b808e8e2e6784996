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
fn caf_on_a_cifar_vit_runs_end_to_end_and_plan_counts_its_cost() {
    let dir = Dir::new();
    let weights = vit_weights(&dir);
    let spec = format!(
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
  params: {{backbone: vit, sigma: 0.25}}
  axes:
    method: [smooth, caf]
  methods:
    caf:
      params: {{epochs: 1, max_train: 256, val_size: 128, train_batch: 64}}
      axes: {{adapter: [\"cnn:8:2\", \"vit:48:1:4\"]}}
",
        data = shared_data().join("cifar10-jpeg").display(),
        weights = weights.display(),
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
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
    let rows = ok(&dir.run(&["export", "--db", "v.db"]));
    // Header + 3 certify jobs × 5 images (skip 2000 over the 10,000 test images).
    assert_eq!(rows.lines().count(), 1 + 3 * 5, "{rows}");
}
