//! Training job kinds end to end on real data: smoke versions of the CAF studies, and a training
//! job killed with kill -9 that resumes from its checkpoint to the same weights.

use std::time::Duration;

use super::util::*;

const SMOKE_TRAIN: &str =
    "epochs: 1, max_train: 256, val_size: 128, train_batch: 64, adapter: \"cnn:8:2\"";

fn spec(name: &str, grid: &str) -> String {
    format!(
        "name: {name}
seed: 5
data:
  dataset: cifar10
  root: {data}
backbones:
  r20:
    arch: resnet20
    weights: {weights}
    normalize: {{mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
certify: {{n0: 10, n: 100, batch: 110, skip: 2000}}
grid:
{grid}",
        data = shared_data().join("cifar10-jpeg").display(),
        weights = resnet20_weights().display(),
    )
}

fn status(dir: &Dir, db: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", db]))).unwrap();
    v[0]["jobs"].as_array().unwrap().clone()
}

#[test]
fn caf_smoke_studies_run_end_to_end_and_fused_equals_separate() {
    let dir = Dir::new();
    let before = caf::util::sha256_file(&resnet20_weights()).unwrap();
    dir.write(
        "all.yaml",
        &spec(
            "smoke-all",
            &format!(
                "  params: {{backbone: r20}}
  axes:
    method: [smooth, caf, caf-ensemble]
  methods:
    smooth: {{params: {{sigma: 0.25}}}}
    caf:
      params: {{sigma: 0.25, {SMOKE_TRAIN}, rs_epochs: 1, rs_max_train: 64, rs_val_size: 64, rs_train_batch: 32}}
      axes: {{base: [clean, rs]}}
    caf-ensemble:
      params: {{sigmas: [0.25, 0.5], {SMOKE_TRAIN}}}
"
            ),
        ),
    );
    ok(&dir.run(&["run", "all.yaml", "--db", "a.db", "--artifacts", "art"]));
    let jobs = status(&dir, "a.db");
    let kinds = |k: &str| jobs.iter().filter(|j| j["kind"] == k).count();
    // train-caf: clean σ=0.25 (shared by caf and the ensemble), rs-based σ=0.25, clean σ=0.5.
    assert_eq!(kinds("train-caf"), 3, "{jobs:#?}");
    assert_eq!(kinds("train-rs"), 1);
    // smooth, caf clean, caf rs, and the 2×2 ensemble matrix whose (0.25, 0.25) cell is the caf job.
    assert_eq!(kinds("certify"), 6);
    assert!(
        kinds("certify-fused") >= 1,
        "adapters sharing a backbone and σ are certified together"
    );
    for j in &jobs {
        assert_eq!(j["state"], "done", "{j}");
        if j["kind"].as_str().unwrap().starts_with("train") {
            let w = &j["weights"];
            let path = std::path::Path::new(w["path"].as_str().unwrap());
            assert_eq!(
                caf::util::sha256_file(path).unwrap(),
                w["sha256"].as_str().unwrap(),
                "artifact hash of {j}"
            );
        }
        if j["kind"] == "certify" {
            assert_eq!(j["progress_done"], 5, "{j}");
        }
    }
    assert_eq!(
        caf::util::sha256_file(&resnet20_weights()).unwrap(),
        before,
        "the backbone file changed"
    );
    let all = ok(&dir.run(&["export", "--db", "a.db"]));
    assert_eq!(all.lines().count(), 1 + 6 * 5);

    // The report of the real study: every section, and tables that agree with the export.
    ok(&dir.run(&["report", "--db", "a.db", "--out", "rep"]));
    let html = std::fs::read_to_string(dir.join("rep/index.html")).unwrap();
    for id in [
        "curves",
        "tables",
        "compare",
        "ensemble",
        "training",
        "reproducibility",
    ] {
        assert!(
            html.contains(&format!("<section id=\"{id}\">")),
            "section {id}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&ok(
        &dir.run(&["export", "--db", "a.db", "--format", "json"])
    ))
    .unwrap();
    let acr_csv = std::fs::read_to_string(dir.join("rep/tables/acr.csv")).unwrap();
    let exported = json["jobs"].as_array().expect("jobs");
    let mut checked = 0;
    for line in acr_csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let job = exported
            .iter()
            .find(|j| j["job"] == f[0])
            .expect("job exported");
        let rows: Vec<&serde_json::Value> =
            job["results"].as_array().expect("results").iter().collect();
        assert_eq!(rows.len().to_string(), f[4], "{line}");
        let acr = rows
            .iter()
            .filter(|r| r["correct"] == true)
            .map(|r| r["radius"].as_f64().unwrap())
            .sum::<f64>()
            / rows.len() as f64;
        assert!((acr - f[3].parse::<f64>().unwrap()).abs() < 1e-12, "{line}");
        checked += 1;
    }
    // smooth, caf clean, caf rs, and the ensemble's 2 × 2 matrix.
    assert_eq!(checked, 7, "{acr_csv}");

    // The caf cell alone, unfused, in a fresh database: same job id, same rows.
    dir.write(
        "one.yaml",
        &spec(
            "smoke-one",
            &format!("  params: {{backbone: r20, method: caf, sigma: 0.25, {SMOKE_TRAIN}}}\n"),
        ),
    );
    ok(&dir.run(&["run", "one.yaml", "--db", "b.db", "--artifacts", "art-b"]));
    let alone = ok(&dir.run(&["export", "--db", "b.db"]));
    let mut lines = alone.lines();
    lines.next();
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 5);
    for r in rows {
        assert!(all.lines().any(|l| l == r), "fused run lacks {r}");
    }
}

#[test]
fn a_training_job_killed_with_kill_9_resumes_to_the_same_weights() {
    let dir = Dir::new();
    let grid = "  params: {backbone: r20, method: caf, sigma: 0.5, epochs: 2, max_train: 1024, val_size: 128, train_batch: 64, checkpoint_every: 3, adapter: \"cnn:8:2\"}\n";
    dir.write("t.yaml", &spec("smoke-kill", grid));
    ok(&dir.run(&["run", "t.yaml", "--db", "ref.db", "--artifacts", "ref"]));
    let weights = |db: &str| {
        status(&dir, db)
            .into_iter()
            .find(|j| j["kind"] == "train-caf")
            .map(|j| {
                j["weights"]["sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let want = weights("ref.db");
    assert_eq!(want.len(), 64);

    let mut child = dir.spawn(&["run", "t.yaml", "--db", "k.db", "--artifacts", "k"]);
    let checkpointed = wait_until(Duration::from_secs(300), || {
        std::fs::read_dir(dir.join("k"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("train/checkpoint.json").exists())
    });
    assert!(checkpointed, "no checkpoint was written");
    child.kill().expect("kill -9");
    child.wait().unwrap();
    let resumed = dir.run(&["run", "t.yaml", "--db", "k.db", "--artifacts", "k"]);
    ok(&resumed);
    assert!(
        text(&resumed.stderr).contains("resuming training from the checkpoint"),
        "{}",
        text(&resumed.stderr)
    );
    assert_eq!(
        weights("k.db"),
        want,
        "resumed training ended with other weights"
    );
}

#[test]
fn denoised_smoke_study_chains_mse_then_stability_and_reports_caf_vs_denoised() {
    let dir = Dir::new();
    let before = caf::util::sha256_file(&resnet20_weights()).unwrap();
    dir.write(
        "d.yaml",
        &spec(
            "smoke-denoised",
            "  params: {backbone: r20, sigma: 0.25, epochs: 1, max_train: 256, val_size: 128, train_batch: 64}
  axes:
    method: [denoised, caf]
  methods:
    denoised:
      axes: {objective: [mse, stability, mse-then-stability]}
    caf:
      params: {adapter: \"cnn:8:2\"}
",
        ),
    );
    let plan = ok(&dir.run(&["plan", "d.yaml", "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let jobs = plan["jobs"].as_array().unwrap();
    let denoiser_jobs: Vec<&serde_json::Value> = jobs
        .iter()
        .filter(|j| j["kind"] == "train-denoised")
        .collect();
    // mse, stability, and stability started from the (shared) mse job.
    assert_eq!(denoiser_jobs.len(), 3, "{plan}");
    let mse = denoiser_jobs
        .iter()
        .find(|j| j["params"]["objective"] == "mse")
        .unwrap();
    assert!(denoiser_jobs
        .iter()
        .any(|j| j["params"]["init"] == mse["id"]
            && j["deps"].as_array().unwrap().contains(&mse["id"])));

    ok(&dir.run(&["run", "d.yaml", "--db", "d.db", "--artifacts", "art"]));
    for j in status(&dir, "d.db") {
        assert_eq!(j["state"], "done", "{j}");
    }
    assert_eq!(
        caf::util::sha256_file(&resnet20_weights()).unwrap(),
        before,
        "the frozen classifier's file changed"
    );
    ok(&dir.run(&["report", "--db", "d.db", "--out", "rep"]));
    let html = std::fs::read_to_string(dir.join("rep/index.html")).unwrap();
    assert!(
        html.contains("Paired comparison against denoised"),
        "baseline is denoised"
    );
    let csv = std::fs::read_to_string(dir.join("rep/tables/compare-1.csv")).unwrap();
    // caf against each of the three denoisers.
    for objective in ["mse", "stability", "mse-then-stability"] {
        let base = format!("denoised objective={objective},caf,");
        assert!(csv.lines().any(|l| l.starts_with(&base)), "{base} in {csv}");
    }
}

#[test]
fn smoothadv_smoke_study_shares_its_network_with_caf_enhance() {
    let dir = Dir::new();
    dir.write(
        "s.yaml",
        &spec(
            "smoke-smoothadv",
            &format!(
                "  params: {{backbone: r20, sigma: 0.5}}
  axes:
    method: [smoothadv, caf]
  methods:
    smoothadv:
      params: {{epochs: 1, max_train: 64, val_size: 64, train_batch: 32, pgd_steps: 2, epsilon: 0.25, noise_draws: 2}}
    caf:
      params: {{base: smoothadv, rs_epochs: 1, rs_max_train: 64, rs_val_size: 64, rs_train_batch: 32, rs_pgd_steps: 2, rs_epsilon: 0.25, rs_noise_draws: 2, {SMOKE_TRAIN}}}
"
            ),
        ),
    );
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["plan", "s.yaml", "--json"]))).unwrap();
    let jobs = plan["jobs"].as_array().unwrap();
    let sa: Vec<&serde_json::Value> = jobs.iter().filter(|j| j["kind"] == "train-rs").collect();
    assert_eq!(
        sa.len(),
        1,
        "the caf cell reuses the smoothadv network: {plan}"
    );
    assert_eq!(sa[0]["params"]["smoothadv"]["steps"], 2);
    let caf_train = jobs.iter().find(|j| j["kind"] == "train-caf").unwrap();
    assert!(caf_train["deps"].as_array().unwrap().contains(&sa[0]["id"]));

    ok(&dir.run(&["run", "s.yaml", "--db", "s.db", "--artifacts", "art"]));
    let st = status(&dir, "s.db");
    assert!(st.iter().all(|j| j["state"] == "done"), "{st:?}");
    let sa_job = st.iter().find(|j| j["kind"] == "train-rs").unwrap();
    assert!(sa_job["label"]
        .as_str()
        .unwrap()
        .starts_with("train-smoothadv"));
}
