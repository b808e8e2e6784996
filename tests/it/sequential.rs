//! A tiny sequential study end to end with the real binary: the same ResNet-20 certified with
//! Cohen's CERTIFY and sequentially in one grid, then status, export and report read it.

use super::util::*;

#[test]
fn a_sequential_study_runs_exports_recomputable_rows_and_reports_its_radii() {
    let dir = Dir::new();
    // Study-level sequential settings; one cell switches back to Cohen's mode.
    let spec = resnet_spec("seq", "0.25", 20, 400, 25).replace(
        "  skip: 25\n",
        "  skip: 25\n  mode: sequential\n  radii: [0.1, 0.25]\n  n_max: 2000\n",
    );
    let spec = spec.replace(
        "  axes:\n",
        "  axes:\n    certify.mode: [cohen, sequential]\n",
    );
    dir.write("s.yaml", &spec);
    ok(&dir.run(&["run", "s.yaml", "--db", "s.db"]));

    let status: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "s.db"]))).unwrap();
    let jobs = status[0]["jobs"].as_array().unwrap().clone();
    let seq_job = jobs
        .iter()
        .find(|j| j["unit"] == "draws")
        .expect("a job counted in draws");
    assert_eq!(seq_job["kind"], "certify");
    assert_eq!(seq_job["state"], "done");
    // Done: the projection met the draws actually spent.
    assert_eq!(seq_job["progress_done"], seq_job["progress_total"]);
    assert!(seq_job["draws_per_sec"].as_f64().unwrap() > 0.0);

    let json: serde_json::Value = serde_json::from_str(&ok(
        &dir.run(&["export", "--db", "s.db", "--format", "json"])
    ))
    .unwrap();
    let mut sequential_rows = 0;
    let mut cohen_rows = 0;
    for job in json["jobs"].as_array().unwrap() {
        for r in job["results"].as_array().unwrap() {
            let Some(q) = r.get("sequential") else {
                cohen_rows += 1;
                assert_eq!(r["n"], 400);
                continue;
            };
            sequential_rows += 1;
            let (n, n_a) = (r["n"].as_u64().unwrap(), r["n_a"].as_u64().unwrap());
            assert!(n > 0 && n <= 2000, "{r}");
            let radii: Vec<f64> = serde_json::from_value(q["radii"].clone()).unwrap();
            assert_eq!(radii, [0.1, 0.25]);
            // The stored row recomputes to the stored certificate.
            let cert = caf::certify::sequential_certificate_from_counts(
                r["c_hat"].as_u64().unwrap() as u32,
                n_a,
                n,
                r["alpha"].as_f64().unwrap(),
                caf::certify::BetaPrior {
                    a: q["prior_a"].as_f64().unwrap(),
                    b: q["prior_b"].as_f64().unwrap(),
                },
                r["sigma"].as_f64().unwrap(),
                &radii,
            );
            assert_eq!(cert.radius, r["radius"].as_f64().unwrap(), "{r}");
            assert_eq!(cert.lower, q["lower"].as_f64().unwrap(), "{r}");
            let decisions: Vec<&str> = cert.decisions.iter().map(|d| d.decision.as_str()).collect();
            assert_eq!(serde_json::json!(decisions), q["decisions"], "{r}");
        }
    }
    assert_eq!((cohen_rows, sequential_rows), (4, 4));

    let csv = ok(&dir.run(&["export", "--db", "s.db", "--format", "csv"]));
    let header = csv.lines().next().unwrap();
    assert!(
        header.ends_with("radii,decisions,stopped_wrong"),
        "{header}"
    );
    assert_eq!(
        csv.lines().filter(|l| l.contains(",sequential,")).count(),
        4
    );
    assert_eq!(csv.lines().filter(|l| l.contains(",cohen,")).count(), 4);

    ok(&dir.run(&["report", "--db", "s.db", "--out", "rep"]));
    let md = std::fs::read_to_string(dir.join("rep/report.md")).unwrap();
    assert!(
        md.contains("Sequential certification (markers without a line)"),
        "{md}"
    );
    let acc = std::fs::read_to_string(dir.join("rep/tables/certified_accuracy.csv")).unwrap();
    let acr = std::fs::read_to_string(dir.join("rep/tables/acr.csv")).unwrap();
    let seq_id = seq_job["id"].as_str().unwrap();
    // The sequential job: accuracy at its two radii only, and no ACR.
    assert_eq!(
        acc.lines().filter(|l| l.starts_with(seq_id)).count(),
        2,
        "{acc}"
    );
    assert!(!acr.contains(seq_id), "{acr}");
}

/// The staged Clopper–Pearson comparison of `caf bench certify`: each image stops at a stage,
/// and its radius recomputes from (n_A, n, α, number of stages); `caf certify` refuses it.
#[test]
fn bench_certify_staged_stops_at_a_stage_with_a_recomputable_radius() {
    let dir = Dir::new();
    let weights = resnet20_weights().display().to_string();
    let data = shared_data().join("cifar10-jpeg").display().to_string();
    let common = [
        "--weights",
        &weights,
        "--data-root",
        &data,
        "--sigma",
        "0.25",
        "--n0",
        "20",
    ];
    let mut args = vec!["bench", "certify", "--images", "3", "--skip", "700"];
    args.extend(common);
    args.extend([
        "--n", "2000", "--batch", "200", "--mode", "staged", "--stages", "200,2000", "--radii",
        "0.1,0.25", "--json",
    ]);
    let out = ok(&dir.run(&args));
    assert!(out.contains("certified at r = 0.25: "), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&out[out.find('{').expect("JSON after the summary")..]).unwrap();
    assert_eq!(json["stages"], serde_json::json!([200, 2000]));
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    for r in rows {
        let (n_a, n) = (r["n_a"].as_u64().unwrap(), r["n"].as_u64().unwrap());
        assert!(n == 200 || n == 2000, "{r}");
        let (lower, _) = caf::certify::sequential::staged_lower_upper(n_a, n, 0.001, 2);
        let want = if lower > 0.5 {
            caf::certify::stats::radius(0.25, lower)
        } else {
            0.0
        };
        assert!((r["radius"].as_f64().unwrap() - want).abs() < 1e-12, "{r}");
    }

    // A certification run takes cohen or sequential; --stages belongs to staged.
    let mut args = vec!["certify", "--arch", "resnet20", "--out", "o.tsv"];
    args.extend(common);
    let mut staged = args.clone();
    staged.extend(["--mode", "staged"]);
    let out = dir.run(&staged);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("caf bench certify --mode staged"),
        "{}",
        text(&out.stderr)
    );
    args.extend(["--mode", "sequential", "--radii", "0.25", "--stages", "100"]);
    let out = dir.run(&args);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--stages applies to --mode staged only"));
}
