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
