//! `arch: onnx` end to end: akamaster's ResNet-20 exported with `torch.onnx.export`
//! (`tests/fixtures/onnx/resnet20.onnx`, from `bench/make_onnx_fixtures.py`) certified by
//! `caf certify` like the same network from its checkpoint, and a study smoothing it, training a
//! CAF adapter on its `feature` output and a denoiser with the `mse` objective in front of it.

use super::util::*;

fn onnx_resnet20() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/resnet20.onnx")
}

/// (predict, radius) per image of `caf certify` with `model` flags.
fn certify(dir: &Dir, model: &[&str], out: &str) -> Vec<(i64, f64)> {
    let root = shared_data().join("cifar10-exact100");
    let mut args = vec!["certify"];
    args.extend_from_slice(model);
    args.extend_from_slice(&[
        "--data-root",
        root.to_str().unwrap(),
        "--sigma",
        "0.25",
        "--n0",
        "20",
        "--n",
        "200",
        "--batch",
        "220",
        "--max",
        "6",
        "--out",
        out,
    ]);
    ok(&dir.run(&args));
    let tsv = std::fs::read_to_string(dir.join(out)).unwrap();
    tsv.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[2].parse().unwrap(), f[3].parse().unwrap())
        })
        .collect()
}

#[test]
fn certify_an_onnx_export_as_its_checkpoint() {
    let dir = Dir::new();
    let onnx = onnx_resnet20();
    let from_onnx = certify(
        &dir,
        &["--arch", "onnx", "--weights", onnx.to_str().unwrap()],
        "onnx.tsv",
    );
    let weights = resnet20_weights();
    let from_th = certify(
        &dir,
        &["--arch", "resnet20", "--weights", weights.to_str().unwrap()],
        "th.tsv",
    );
    assert_eq!(from_onnx.len(), 6);
    // Same seeds and noise, logits equal to ~1e-5: the same votes, so the same certificates
    // (up to printing).
    for (i, (a, b)) in from_onnx.iter().zip(&from_th).enumerate() {
        assert_eq!(a.0, b.0, "image {i}: {from_onnx:?} vs {from_th:?}");
        assert!(
            (a.1 - b.1).abs() < 1e-3,
            "image {i}: {from_onnx:?} vs {from_th:?}"
        );
    }
    assert!(
        from_onnx.iter().filter(|r| r.0 >= 0).count() >= 4,
        "{from_onnx:?}"
    );

    // --onnx-logits names the output; a wrong name is refused with the graph's outputs listed.
    let out = dir.run(&[
        "certify",
        "--arch",
        "onnx",
        "--weights",
        onnx.to_str().unwrap(),
        "--onnx-logits",
        "scores",
        "--sigma",
        "0.25",
        "--out",
        "scores.tsv",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("no output `scores`") && err.contains("feature, logits"),
        "{err}"
    );

    // A graph with an operator tract lacks is refused before anything runs, naming both.
    let bad = onnx.with_file_name("unsupported.onnx");
    let out = dir.run(&[
        "certify",
        "--arch",
        "onnx",
        "--weights",
        bad.to_str().unwrap(),
        "--sigma",
        "0.25",
        "--out",
        "bad.tsv",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("operator `Det`") && err.contains("node `det0`"),
        "{err}"
    );
    assert!(!dir.join("bad.tsv").exists());

    // --onnx-logits on another arch is a usage error.
    let out = dir.run(&[
        "certify",
        "--arch",
        "resnet20",
        "--weights",
        weights.to_str().unwrap(),
        "--onnx-logits",
        "logits",
        "--sigma",
        "0.25",
        "--out",
        "r.tsv",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--arch onnx"));
}

#[test]
fn a_study_on_an_onnx_backbone_smooths_adapts_and_denoises() {
    let dir = Dir::new();
    let spec = format!(
        "name: onnx-smoke
seed: 5
data:
  dataset: cifar10
  root: {data}
backbones:
  r20:
    arch: onnx
    weights: {weights}
    feature: feature
    logits: logits
certify: {{n0: 10, n: 100, batch: 110, skip: 2500}}
grid:
  params: {{backbone: r20, sigma: 0.25}}
  axes:
    method: [smooth, caf, denoised]
  methods:
    caf:
      params: {{epochs: 1, max_train: 128, val_size: 64, train_batch: 64, adapter: \"cnn:8:2\"}}
    denoised:
      params: {{epochs: 1, max_train: 128, val_size: 64, train_batch: 64, objective: mse}}
",
        data = shared_data().join("cifar10-jpeg").display(),
        weights = onnx_resnet20().display(),
    );
    dir.write("onnx.yaml", &spec);
    ok(&dir.run(&["run", "onnx.yaml", "--db", "o.db", "--artifacts", "art"]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "o.db"]))).unwrap();
    let jobs = v[0]["jobs"].as_array().unwrap();
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    assert_eq!(
        (kinds("train-caf"), kinds("train-denoised")),
        (1, 1),
        "{jobs:#?}"
    );
    // The graph smoothed as it is and its adapter share each run of the graph.
    assert_eq!(kinds("certify-fused"), 1, "{jobs:#?}");
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
    }
    let rows = ok(&dir.run(&["export", "--db", "o.db"]));
    // Header + 3 certified models × 4 images (skip 2500 over the 10,000 test images).
    assert_eq!(rows.lines().count(), 1 + 3 * 4, "{rows}");
    // The graph's logits from the fused run (read with its features) equal smoothing it alone.
    let smooth_only = spec.split("  methods:\n").next().unwrap_or_default();
    dir.write(
        "smooth.yaml",
        &smooth_only.replace("[smooth, caf, denoised]", "[smooth]"),
    );
    ok(&dir.run(&["run", "smooth.yaml", "--db", "s.db", "--artifacts", "art-s"]));
    let alone = ok(&dir.run(&["export", "--db", "s.db"]));
    assert_eq!(alone.lines().count(), 1 + 4, "{alone}");
    for r in alone.lines().skip(1) {
        assert!(rows.lines().any(|l| l == r), "the fused run lacks {r}");
    }

    // The stability objective would backpropagate through the graph: refused at plan time.
    dir.write(
        "stab.yaml",
        &spec.replace("objective: mse", "objective: stability"),
    );
    let out = dir.run(&["plan", "stab.yaml"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("use `objective: mse`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_image_folder_is_read_at_the_graphs_input_size() {
    // The graph fixes 32×32 inputs: without --image-size the folder is cropped to that, as for
    // the built archs, and the export scores the same 94/100 as its checkpoint.
    let dir = Dir::new();
    super::imagefolder::exact100_val_folder(&dir.join("folder"));
    let onnx = onnx_resnet20();
    let model = ["--arch", "onnx", "--weights", onnx.to_str().unwrap()];
    let folder = ["--data", "imagefolder", "--data-root", "folder"];
    let out = ok(&dir.run(&[&["eval"][..], &model, &folder, &["--resize", "32"]].concat()));
    assert!(out.contains("(94/100)"), "{out}");
    let out = dir.run(
        &[
            &["eval"][..],
            &model,
            &folder,
            &["--image-size", "40", "--resize", "40"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("32×32"), "{}", text(&out.stderr));
}
