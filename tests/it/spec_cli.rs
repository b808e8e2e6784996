//! Spec errors at the command line, and planning.

use super::util::*;

#[test]
fn an_invalid_spec_exits_2_with_a_location_and_writes_nothing() {
    let dir = Dir::new();
    let spec = resnet_spec("bad", "0.25, -0.5", 10, 100, 50);
    let path = dir.write("bad.yaml", &spec);
    let out = dir.run(&["run", "bad.yaml", "--db", "x.db"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let line = spec.lines().position(|l| l.contains("-0.5")).unwrap() + 1;
    assert!(
        err.contains(&format!("{}:{line}:", path.display())),
        "{err}"
    );
    assert!(err.contains("sigma"), "{err}");
    assert!(!dir.join("x.db").exists(), "the store was touched");
}

#[test]
fn an_invalid_spec_leaves_an_existing_store_unchanged() {
    let dir = Dir::new();
    dir.write("good.yaml", &resnet_spec("good", "0.25", 10, 100, 50));
    ok(&dir.run(&["run", "good.yaml", "--db", "x.db"]));
    let before = ok(&dir.run(&["export", "--db", "x.db"]));
    dir.write("bad.yaml", &resnet_spec("good", "0.25", 100, 100, 50));
    let out = dir.run(&["run", "bad.yaml", "--db", "x.db"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("n0"), "{}", text(&out.stderr));
    assert_eq!(ok(&dir.run(&["export", "--db", "x.db"])), before);
    let st = ok(&dir.run(&["status", "--db", "x.db"]));
    assert!(st.contains("2/2 jobs done"), "{st}");
}

#[test]
fn missing_and_hostile_spec_files_are_usage_errors() {
    let dir = Dir::new();
    let out = dir.run(&["plan", "nope.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope.yaml"));
    dir.write("garbage.yaml", "\u{1}\u{2}[[[[{{{{");
    let out = dir.run(&["plan", "garbage.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

fn plan_ids(dir: &Dir, spec: &str) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["plan", spec, "--json"]))).unwrap();
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_string(),
                j["kind"].as_str().unwrap().to_string(),
                j["label"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn plan_shares_upstream_jobs_and_reuses_unchanged_ones_after_an_edit() {
    let dir = Dir::new();
    dir.write("a.yaml", &resnet_spec("s", "0.25, 0.5", 10, 100, 50));
    dir.write("b.yaml", &resnet_spec("s", "0.25, 1.0", 10, 100, 50));
    let a = plan_ids(&dir, "a.yaml");
    let b = plan_ids(&dir, "b.yaml");
    // One clean-accuracy job shared by both σ cells, one certify job per σ.
    assert_eq!(a.iter().filter(|j| j.1 == "eval").count(), 1);
    assert_eq!(a.iter().filter(|j| j.1 == "certify").count(), 2);
    let shared: Vec<_> = a.iter().filter(|j| b.contains(j)).collect();
    assert_eq!(shared.len(), 2, "eval and σ=0.25 are reused: {a:?} {b:?}");
    assert!(shared.iter().any(|j| j.2.contains("0.25")));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["plan", "a.yaml", "--json"]))).unwrap();
    for j in v["jobs"].as_array().unwrap() {
        for key in ["id", "kind", "params", "deps"] {
            assert!(j.get(key).is_some(), "job lacks {key}: {j}");
        }
    }
    let table = ok(&dir.run(&["plan", "a.yaml"]));
    assert!(table.contains("3 jobs"), "{table}");
}

#[test]
fn the_readme_grid_example_loads_and_plans() {
    // Relative paths in the example resolve against the project root, like every example.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_caf"))
        .args(["plan", "experiments/grid-example.yaml", "--json"])
        .current_dir(root)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let labels: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["label"].as_str().unwrap())
        .collect();
    // σ ∈ {0.12, 0.25, 0.5} × (n0, n) ∈ {(50, 500), (100, 1000)}, minus (0.12, 1000), plus σ = 1.0;
    // one clean-accuracy job shared by every cell.
    assert_eq!(labels.len(), 7, "{labels:?}");
    assert_eq!(labels.iter().filter(|l| l.starts_with("clean")).count(), 1);
    assert!(
        labels.contains(&"smooth resnet20 σ=0.25 n0=100 n=1000"),
        "{labels:?}"
    );
    assert!(labels.contains(&"smooth resnet20 σ=1"), "{labels:?}");
}

#[test]
fn every_shipped_experiment_plans() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("experiments")).unwrap() {
        let path = entry.unwrap().path();
        // The ImageNet study reads the user's data and weights from the working directory:
        // the_imagenet_study_plans_from_a_users_folder_and_weight_files plans it.
        if path.extension().is_some_and(|e| e == "yaml")
            && !path.ends_with("paper-imagenet-full.yaml")
        {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_caf"))
                .args(["plan", "--json"])
                .arg(&path)
                .current_dir(root)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                text(&out.stderr)
            );
            let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(
                !plan["jobs"].as_array().unwrap().is_empty(),
                "{}",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 7, "found {n} experiments");
}

/// `budget_tflops` gives each method the epochs that spend the same compute, and `caf plan`
/// shows the compute of every training job.
#[test]
fn a_compute_budget_sets_epochs_per_method() {
    let dir = Dir::new();
    let base =
        resnet_spec("budget", "0.25", 10, 100, 100).replace("cifar10-exact100", "cifar10-jpeg");
    let grid_at = base.find("grid:").unwrap();
    let spec = format!(
        "{}grid:
  params: {{backbone: r20, sigma: 0.25, budget_tflops: 24.2}}
  axes:
    method: [caf, denoised]
  methods:
    denoised:
      axes: {{objective: [mse, stability]}}
",
        &base[..grid_at]
    );
    dir.write("b.yaml", &spec);
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["plan", "b.yaml", "--json"]))).unwrap();
    let epochs = |kind: &str, objective: Option<&str>| -> u64 {
        plan["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == kind && objective.is_none_or(|o| j["params"]["objective"] == o))
            .unwrap()["params"]["train"]["epochs"]
            .as_u64()
            .unwrap()
    };
    // 24.2 TFLOPs: the CAF adapter step costs 134.4 MFLOPs per image (4 epochs of 45,000
    // images), the mse denoiser 128.9 (4 epochs), the stability denoiser 291.1 (2 epochs).
    assert_eq!(epochs("train-caf", None), 4);
    assert_eq!(epochs("train-denoised", Some("mse")), 4);
    assert_eq!(epochs("train-denoised", Some("stability")), 2);
    let table = ok(&dir.run(&["plan", "b.yaml"]));
    assert!(table.contains("training compute"), "{table}");
    assert!(table.contains("134.4"), "{table}");

    dir.write(
        "both.yaml",
        &spec.replace("budget_tflops: 24.2", "budget_tflops: 24.2, epochs: 3"),
    );
    let out = dir.run(&["plan", "both.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not both"),
        "{}",
        text(&out.stderr)
    );
}

/// `precision: bf16` is a per-job flag: it is part of the certify job's params and id (f32 jobs
/// keep the ids they had before the flag existed), it is recorded in the store and named in the
/// report, a misspelt value is a located error, and denoised smoothing refuses it.
#[test]
fn precision_is_a_per_job_flag() {
    let dir = Dir::new();
    let base = resnet_spec("prec", "0.25", 10, 100, 50);
    let with = |value: &str| {
        base.replace(
            "    backbone: r20\n",
            &format!("    backbone: r20\n    precision: {value}\n"),
        )
    };
    dir.write("f.yaml", &base);
    dir.write("b.yaml", &with("bf16"));
    let certify_job = |file: &str| -> serde_json::Value {
        let plan: serde_json::Value =
            serde_json::from_str(&ok(&dir.run(&["plan", file, "--json"]))).unwrap();
        plan["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "certify")
            .unwrap()
            .clone()
    };
    let (f, b) = (certify_job("f.yaml"), certify_job("b.yaml"));
    assert!(f["params"].get("precision").is_none(), "{f}");
    assert_eq!(b["params"]["precision"], "bf16");
    assert_ne!(f["id"], b["id"]);
    assert!(
        b["label"].as_str().unwrap().ends_with("precision=bf16"),
        "{b}"
    );

    ok(&dir.run(&["run", "b.yaml", "-q", "--db", "p.db"]));
    let status: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "p.db"]))).unwrap();
    let jobs = status[0]["jobs"].as_array().unwrap();
    assert!(jobs.iter().all(|j| j["precision"] == "bf16"), "{status}");
    ok(&dir.run(&["report", "--db", "p.db", "--out", "r"]));
    let md = std::fs::read_to_string(dir.join("r/report.md")).unwrap();
    assert!(md.contains("ran the classifier in bf16"), "{md}");

    // int8: its own jobs, recorded and named the same way.
    dir.write("q.yaml", &with("int8"));
    let q = certify_job("q.yaml");
    assert_eq!(q["params"]["precision"], "int8");
    assert!(q["id"] != f["id"] && q["id"] != b["id"]);
    ok(&dir.run(&["run", "q.yaml", "-q", "--db", "q.db"]));
    ok(&dir.run(&["report", "--db", "q.db", "--out", "rq"]));
    let md = std::fs::read_to_string(dir.join("rq/report.md")).unwrap();
    assert!(md.contains("ran the classifier in int8"), "{md}");

    dir.write("bad.yaml", &with("fp16"));
    let out = dir.run(&["plan", "bad.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml:23:16") && err.contains("expected precision f32, bf16 or int8"),
        "{err}"
    );

    let denoised = with("bf16")
        .replace("method: smooth", "method: denoised")
        .replace("cifar10-exact100", "cifar10-jpeg");
    dir.write("d.yaml", &denoised);
    let out = dir.run(&["plan", "d.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("d.yaml:23:16") && err.contains("f32 only"),
        "{err}"
    );
}

#[test]
fn a_mistyped_kernel_level_is_a_usage_error_before_anything_runs() {
    let dir = Dir::new();
    dir.write("good.yaml", &resnet_spec("good", "0.25", 10, 100, 50));
    let out = dir
        .cmd(&["run", "good.yaml", "--db", "x.db"])
        .env("CAF_KERNELS", "avx9000")
        .output()
        .expect("caf runs");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("CAF_KERNELS=\"avx9000\"") && err.contains("portable"),
        "{err}"
    );
    assert!(!dir.join("x.db").exists(), "the store was touched");
    // The portable level is accepted.
    let out = dir
        .cmd(&["plan", "good.yaml"])
        .env("CAF_KERNELS", "portable")
        .output()
        .expect("caf runs");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn the_imagenet_study_plans_from_a_users_folder_and_weight_files() {
    // experiments/paper-imagenet-full.yaml reads `imagenet/` and `weights/` from the working
    // directory: here two classes of ImageNet-named files and stand-in weight files (planning
    // hashes them; nothing is decoded or loaded).
    let dir = Dir::new();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    for split in ["train", "val"] {
        for class in ["n01440764", "n01443537"] {
            for i in 0..3 {
                write(
                    &format!("imagenet/{split}/{class}/{split}_{class}_{i}.JPEG"),
                    &format!("{split}{class}{i}"),
                );
            }
        }
    }
    for w in [
        "resnet50-0676ba61.pth",
        "vit_base_patch16_224.safetensors",
        "cohen/noise_0.25/checkpoint.pth.tar",
        "cohen/noise_0.50/checkpoint.pth.tar",
        "cohen/noise_1.00/checkpoint.pth.tar",
    ] {
        write(&format!("weights/{w}"), w);
    }
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments/paper-imagenet-full.yaml")
        .display()
        .to_string();
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["plan", &spec, "--json"]))).expect("plan JSON");
    let jobs = plan["jobs"].as_array().expect("a job list");
    let count = |kind: &str| jobs.iter().filter(|j| j["kind"] == kind).count();
    // Smoothing: ResNet-50 and ViT-B at 3 σ, Cohen's 3 models at their own; CAF on the same
    // two at 3 σ and on Cohen's 3; denoised at 3 σ. Smoothing a backbone and CAF on it at one
    // σ share their noisy forward passes (a fused job per pair: ResNet-50, ViT-B/16 and Cohen's
    // ResNet-50s, at 3 σ each), and each backbone has a clean-accuracy job.
    assert_eq!(count("certify"), 6 + 3 + 6 + 3 + 3, "{jobs:#?}");
    assert_eq!(count("certify-fused"), 3 + 3 + 3);
    assert_eq!(count("train-caf"), 9);
    assert_eq!(count("train-denoised"), 3);
    assert_eq!(count("eval"), 5);
    assert_eq!(jobs.len(), 47);
    let certify = jobs
        .iter()
        .find(|j| j["kind"] == "certify")
        .expect("a certify job");
    let params = &certify["params"];
    assert_eq!(params["n"], 100000, "{params:#}");
    assert_eq!(params["slice"]["skip"], 100, "{params:#}");
    assert!(
        jobs.iter()
            .filter(|j| j["kind"] == "certify")
            .all(|j| j["params"]["data"]["split"] == "test"),
        "certification reads the val/ folder"
    );

    // Without the data, planning names what is missing.
    std::fs::remove_dir_all(dir.join("imagenet/val")).expect("rm");
    let out = dir.run(&["plan", &spec]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("val"), "{}", text(&out.stderr));
}
