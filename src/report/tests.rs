//! Reports from hand-built results with known answers.

use std::collections::BTreeMap;

use super::data::{CertJob, StudyData, TrainJob};
use super::*;
use crate::plan::JobId;
use crate::store::{CertRow, JobState, JobStatus, StudyId, StudyInfo};

fn row(idx: u64, label: u32, predict: i64, radius: f64) -> CertRow {
    CertRow {
        idx,
        label,
        predict,
        radius,
        correct: predict == i64::from(label),
        c_hat: predict.max(0) as u32,
        n_a: 90,
        n: 100,
        n0: 10,
        alpha: 0.001,
        sigma: 0.5,
        seconds: 0.1,
        sequential: None,
    }
}

fn status(id: &str, kind: &str, state: JobState) -> JobStatus {
    JobStatus {
        id: JobId::new(id),
        kind: kind.into(),
        label: format!("{kind} <{id}>"),
        state,
        blocked: false,
        attempts: 1,
        max_attempts: 3,
        progress_done: 4,
        progress_total: 4,
        run_seconds: 2.0,
        work_seconds: 1.0,
        started_at: None,
        finished_at: None,
        lease_owner: None,
        interruptions: 0,
        max_interruptions: 20,
        ran_host: (state == JobState::Done).then(|| "node-a".into()),
        ran_cpu: (state == JobState::Done).then(|| "AMD EPYC 7B13".into()),
        ran_device: (state == JobState::Done).then(|| "cpu".into()),
        error: None,
        result: None,
        precision: "f32".into(),
        unit: if kind.starts_with("train-") {
            crate::plan::ProgressUnit::Epochs
        } else {
            crate::plan::ProgressUnit::Images
        },
    }
}

fn cert(id: &str, method: &str, sigma: f64, values: &[(&str, f64)], rows: Vec<CertRow>) -> CertJob {
    let mut v: BTreeMap<String, serde_json::Value> = values
        .iter()
        .map(|(k, x)| (k.to_string(), serde_json::json!(x)))
        .collect();
    v.insert("method".into(), serde_json::json!(method));
    CertJob {
        job: JobId::new(id),
        cell: 0,
        method: method.into(),
        sigma,
        trained_sigma: None,
        values: v,
        state: JobState::Done,
        planned: rows.len() as u64,
        rows,
        precision: "f32".into(),
    }
}

/// Study "known <&>": at σ = 0.5, `smooth` certifies images 0 and 1 (radii 0.3, 0.1) of four,
/// image 2 is wrong with a large radius and image 3 abstains; `caf` certifies 0, 1, 2 (radii
/// 0.6, 0.2, 1.1) and abstains on 3.
fn known() -> StudyData {
    let smooth = vec![
        row(0, 1, 1, 0.3),
        row(1, 2, 2, 0.1),
        row(2, 3, 5, 2.0),
        row(3, 4, -1, 0.0),
    ];
    let caf = vec![
        row(0, 1, 1, 0.6),
        row(1, 2, 2, 0.2),
        row(2, 3, 3, 1.1),
        row(3, 4, -1, 0.0),
    ];
    StudyData {
        study: StudyInfo {
            id: StudyId(1),
            name: "known <&>".into(),
            seed: 0,
            spec_path: "known.yaml".into(),
            spec_sha256: "ab".repeat(32),
            spec_text: "name: known\n# <script>alert(1)</script>\n".into(),
        },
        jobs: vec![
            status("aaaa", "certify", JobState::Done),
            status("bbbb", "certify", JobState::Done),
            status("tttt", "train-caf", JobState::Done),
        ],
        cert: vec![
            cert("aaaa", "smooth", 0.5, &[], smooth),
            cert("bbbb", "caf", 0.5, &[], caf),
        ],
        train: vec![TrainJob {
            job: JobId::new("tttt"),
            label: "train-caf σ=0.5".into(),
            state: JobState::Done,
            // As the trainer records them.
            epochs: [(0, 2.0, 0.3), (1, 1.5, 0.4)]
                .map(|(epoch, train_loss, val_acc)| {
                    serde_json::to_value(crate::methods::train::EpochMetrics {
                        epoch,
                        steps: 10,
                        lr: 1e-3,
                        train_loss,
                        train_acc: 0.2,
                        val_loss: Some(2.0),
                        val_acc: Some(val_acc),
                        images_per_sec: 100.0,
                        seconds: 12.8,
                    })
                    .expect("json")
                })
                .to_vec(),
            run_seconds: 60.0,
        }],
        swept: Vec::new(),
    }
}

fn opts() -> Options {
    Options {
        radii: vec![0.0, 0.25, 0.5, 1.0],
        baseline: None,
        provenance: vec![("git revision".into(), "test".into())],
    }
}

#[test]
fn machine_readable_tables_hold_the_exact_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&known(), &opts(), dir.path()).expect("report");
    let acc = std::fs::read_to_string(dir.path().join("tables/certified_accuracy.csv"))
        .expect("certified_accuracy.csv");
    let lines: Vec<&str> = acc.lines().collect();
    assert_eq!(
        lines[0],
        "job,method,sigma,radius,certified_accuracy,n_images"
    );
    // smooth: the wrong prediction with radius 2.0 and the abstention never count.
    assert!(lines.contains(&"aaaa,smooth,0.5,0,0.5,4"), "{acc}");
    assert!(lines.contains(&"aaaa,smooth,0.5,0.25,0.25,4"), "{acc}");
    assert!(lines.contains(&"aaaa,smooth,0.5,0.5,0,4"), "{acc}");
    assert!(lines.contains(&"aaaa,smooth,0.5,1,0,4"), "{acc}");
    assert!(lines.contains(&"bbbb,caf,0.5,0,0.75,4"), "{acc}");
    assert!(lines.contains(&"bbbb,caf,0.5,0.5,0.5,4"), "{acc}");
    assert!(lines.contains(&"bbbb,caf,0.5,1,0.25,4"), "{acc}");
    assert_eq!(lines.len(), 1 + 2 * 4);
    let acr = std::fs::read_to_string(dir.path().join("tables/acr.csv")).expect("acr.csv");
    let rows: Vec<Vec<&str>> = acr
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let get = |job: &str| -> f64 {
        let r = rows.iter().find(|r| r[0] == job).expect("job row");
        r[3].parse().expect("number")
    };
    assert!((get("aaaa") - 0.4 / 4.0).abs() < 1e-12, "{acr}");
    assert!((get("bbbb") - 1.9 / 4.0).abs() < 1e-12, "{acr}");

    let md = std::fs::read_to_string(&w.markdown).expect("report.md");
    // The summary table marks caf best at every radius and in ACR.
    assert!(
        md.contains(
            "| caf | 4 | 100 | **0.750** | **0.500** | **0.500** | **0.250** | **0.475** |"
        ),
        "{md}"
    );
    assert!(md.contains("| smooth | 4 | 100 | 0.500 | 0.250 | 0.000 | 0.000 | 0.100 |"));
    // The training table reads the trainer's own metric names.
    assert!(
        md.contains("| tttt | train-caf σ=0.5 | 2 | 1.500 | 0.400 | 100 | 1.0 |"),
        "{md}"
    );
}

#[test]
fn certification_seconds_are_the_images_own_time() {
    // A certify job whose rows a fused certification wrote has no run time of its own (the
    // jobs table says 2.0 s for every job here); the table shows the four images' 0.1 s each.
    let dir = tempfile::tempdir().expect("tempdir");
    write(&known(), &opts(), dir.path()).expect("report");
    let csv = std::fs::read_to_string(dir.path().join("tables/reproducibility-2.csv"))
        .expect("reproducibility-2.csv");
    let header: Vec<&str> = csv.lines().next().expect("header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "seconds")
        .expect("seconds");
    for job in ["aaaa", "bbbb"] {
        let line = csv.lines().find(|l| l.starts_with(job)).expect("job row");
        assert_eq!(line.split(',').nth(col), Some("0.4"), "{csv}");
    }
}

#[test]
fn the_paired_comparison_table_has_the_known_differences() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&known(), &opts(), dir.path()).expect("report");
    let csv = std::fs::read_to_string(dir.path().join("tables/compare-1.csv")).expect("csv");
    // caf − smooth at r = 0: 0.75 − 0.5 over the same four images; one image only caf certifies.
    let line = csv
        .lines()
        .find(|l| l.starts_with("smooth,caf,0.5,0,4,"))
        .unwrap_or_else(|| panic!("{csv}"));
    let f: Vec<&str> = line.split(',').skip(1).collect();
    assert_eq!(&f[3..7], &["4", "0.75", "0.5", "0.25"], "{line}");
    assert_eq!((f[9], f[10]), ("1", "0"), "{line}");
    // McNemar with one discordant pair: p = 1.
    assert_eq!(f[11], "1.0000", "{line}");
}

#[test]
fn html_is_self_contained_and_escapes_study_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&known(), &opts(), dir.path()).expect("report");
    let html = std::fs::read_to_string(&w.index).expect("index.html");
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("caf report: known &lt;&amp;&gt;"));
    assert!(!html.contains("<script"), "study text must be escaped");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    for id in ["curves", "tables", "compare", "training", "reproducibility"] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "{id}");
        assert!(html.contains(&format!("href=\"#{id}\"")), "{id}");
    }
    assert!(html.matches("<svg").count() >= 4, "figures are inlined");
    // Nothing is fetched: no external URLs in src/href attributes.
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    for f in ["curves-sigma-0.5", "compare-sigma-0.5", "training-loss"] {
        let png = std::fs::read(dir.path().join(format!("figures/{f}.png"))).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f}");
        assert!(dir.path().join(format!("figures/{f}.svg")).exists());
    }
}

#[test]
fn partial_results_are_marked() {
    let mut s = known();
    s.jobs[1].state = JobState::Running;
    s.cert[1].state = JobState::Running;
    s.cert[1].planned = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    let html = std::fs::read_to_string(&w.index).expect("index.html");
    assert!(html.contains("class=\"status partial\""));
    assert!(html.contains("PARTIAL"));
    assert!(html.contains("caf (partial)"));
}

#[test]
fn partial_labels_count_images_and_never_invent_a_total() {
    let mut s = known();
    let rows = s.cert[1].rows.len();
    s.cert[1].state = JobState::Running;
    s.cert[1].planned = 10;
    assert!(super::job_name(&s.cert[1], &[]).ends_with(&format!(" [partial {rows}/10]")));
    // Rows written by a fused certification before the member job itself has started.
    s.cert[1].state = JobState::Pending;
    s.cert[1].planned = 0;
    assert!(super::job_name(&s.cert[1], &[])
        .ends_with(&format!(" [partial {rows} images, job pending]")));
    s.cert[1].state = JobState::Done;
    assert!(!super::job_name(&s.cert[1], &[]).contains("partial"));
}

#[test]
fn sensitivity_spread_is_max_minus_min() {
    let mk = |id: &str, w: f64, lr: f64, radii: [f64; 2]| {
        cert(
            id,
            "caf",
            0.5,
            &[("width", w), ("lr", lr)],
            vec![row(0, 1, 1, radii[0]), row(1, 1, 1, radii[1])],
        )
    };
    let mut s = known();
    s.cert = vec![
        mk("c1", 0.5, 0.1, [0.6, 0.1]),
        mk("c2", 0.5, 0.01, [0.6, 0.6]),
        mk("c3", 1.0, 0.1, [0.1, 0.1]),
        mk("c4", 1.0, 0.01, [0.3, 0.0]),
    ];
    s.swept = vec!["lr".into(), "width".into()];
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    let md = std::fs::read_to_string(&w.markdown).expect("md");
    // At r = 0.25: c1 0.5, c2 1.0, c3 0, c4 0.5 → spread 1.0.
    assert!(md.contains("| 0.25 | 0.000 | 1.000 | 1.000 |"), "{md}");
    // ACR: c1 0.35, c2 0.6, c3 0.1, c4 0.15 → spread 0.5.
    assert!(md.contains("| ACR | 0.100 | 0.600 | 0.500 |"), "{md}");
    assert!(dir
        .path()
        .join("figures/sensitivity-lr-sigma-0.5.svg")
        .exists());
    assert!(dir
        .path()
        .join("figures/heatmap-lr-width-sigma-0.5.png")
        .exists());
}

#[test]
fn ensemble_matrix_uses_trained_and_certified_sigma() {
    let mut s = known();
    let mut jobs = Vec::new();
    for (i, t) in [0.25, 0.5].iter().enumerate() {
        for (k, at) in [0.25, 0.5].iter().enumerate() {
            let r = if t == at { 0.4 } else { 0.1 };
            let mut c = cert(
                &format!("e{i}{k}"),
                "caf-ensemble",
                *at,
                &[],
                vec![row(0, 1, 1, r)],
            );
            c.trained_sigma = Some(*t);
            jobs.push(c);
        }
    }
    s.cert = jobs;
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    let md = std::fs::read_to_string(&w.markdown).expect("md");
    assert!(
        md.contains("| 0.25 | 0.5 | 1.000 | 0.000 | 0.000 | 0.000 | 0.100 |"),
        "{md}"
    );
    assert!(
        md.contains("| 0.5 | 0.5 | 1.000 | **1.000** | 0.000 | 0.000 | **0.400** |"),
        "{md}"
    );
    assert!(dir.path().join("figures/ensemble-matrix.svg").exists());
}

#[test]
fn envelope_is_the_pointwise_maximum() {
    let a = vec![(0.0, 0.8), (0.5, 0.2), (1.0, 0.0)];
    let b = vec![(0.0, 0.5), (0.9, 0.1), (2.0, 0.0)];
    assert_eq!(
        upper_envelope(&[a, b]),
        vec![(0.0, 0.8), (0.5, 0.5), (0.9, 0.2), (1.0, 0.1), (2.0, 0.0)]
    );
}

/// A certify job whose cell has string parameters, as the head-to-head's `base` and `objective`.
fn cert_with(
    id: &str,
    method: &str,
    sigma: f64,
    params: &[(&str, &str)],
    radii: [f64; 2],
) -> CertJob {
    let mut c = cert(
        id,
        method,
        sigma,
        &[],
        vec![row(0, 1, 1, radii[0]), row(1, 1, 1, radii[1])],
    );
    for (k, v) in params {
        c.values.insert(k.to_string(), serde_json::json!(v));
    }
    c
}

/// A study of `cert` as `StudyData::load` would build it: one done job per result, `swept` from
/// the cells.
fn study_of(cert: Vec<CertJob>) -> StudyData {
    let mut s = known();
    s.jobs = cert
        .iter()
        .map(|c| status(c.job.as_str(), "certify", JobState::Done))
        .collect();
    s.train = Vec::new();
    s.swept = super::data::swept_keys(&cert);
    s.cert = cert;
    s
}

/// Figure stems written under `figures/` (each has an .svg and a .png).
fn figure_stems(dir: &std::path::Path) -> Vec<String> {
    let mut stems: Vec<String> = std::fs::read_dir(dir.join("figures"))
        .expect("figures/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "svg"))
        .map(|p| {
            let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
            assert!(p.with_extension("png").exists(), "{stem}.png");
            stem
        })
        .collect();
    stems.sort();
    stems
}

fn svg(dir: &std::path::Path, stem: &str) -> String {
    std::fs::read_to_string(dir.join(format!("figures/{stem}.svg"))).expect("svg")
}

/// Neither the no-data text of an empty plot nor the dash of an empty heatmap cell.
fn assert_all_figures_have_data(dir: &std::path::Path) {
    for stem in figure_stems(dir) {
        let svg = svg(dir, &stem);
        assert!(!svg.contains(">\nno data\n<"), "{stem} says no data");
        assert!(!svg.contains(">\n–\n<"), "{stem} has an empty heatmap cell");
    }
}

#[test]
fn a_parameter_of_one_method_is_never_crossed_with_another_methods() {
    // The head-to-head's shape: `base` varies among caf cells only, `objective` among denoised
    // cells only, next to methods without parameters.
    let mut cert = Vec::new();
    for (k, sigma) in [0.25, 0.5].into_iter().enumerate() {
        let id = |name: &str| format!("{name}{k}");
        cert.push(cert_with(&id("sm"), "smooth", sigma, &[], [0.2, 0.0]));
        cert.push(cert_with(&id("rs"), "rs", sigma, &[], [0.3, 0.1]));
        cert.push(cert_with(&id("sa"), "smoothadv", sigma, &[], [0.3, 0.2]));
        for (b, base) in ["clean", "rs", "smoothadv"].into_iter().enumerate() {
            let r = 0.2 * (b + 1) as f64;
            cert.push(cert_with(
                &id(&format!("c{b}")),
                "caf",
                sigma,
                &[("base", base)],
                [r, 0.1],
            ));
        }
        for (o, objective) in ["mse", "stability"].into_iter().enumerate() {
            let r = 0.1 * (o + 1) as f64;
            cert.push(cert_with(
                &id(&format!("d{o}")),
                "denoised",
                sigma,
                &[("objective", objective)],
                [r, 0.0],
            ));
        }
    }
    let s = study_of(cert);
    assert_eq!(
        s.swept,
        ["base", "objective"],
        "the union that caused the bug"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    let stems = figure_stems(dir.path());
    assert!(!stems.iter().any(|f| f.starts_with("heatmap")), "{stems:?}");
    let sensitivity: Vec<&String> = stems
        .iter()
        .filter(|f| f.starts_with("sensitivity"))
        .collect();
    assert_eq!(
        sensitivity,
        [
            "sensitivity-caf-base-sigma-0.25",
            "sensitivity-caf-base-sigma-0.5",
            "sensitivity-denoised-objective-sigma-0.25",
            "sensitivity-denoised-objective-sigma-0.5",
        ]
    );
    assert_all_figures_have_data(dir.path());
    // Each line plot has its own method's values as categories, and says whose they are.
    let base = svg(dir.path(), "sensitivity-caf-base-sigma-0.5");
    assert!(base.contains("caf: certified accuracy vs base (σ = 0.5)"));
    for v in ["clean", "rs", "smoothadv"] {
        assert!(base.contains(&format!(">\n{v}\n<")), "base = {v}");
    }
    assert!(!base.contains(">\nmse\n<"));
    // The spread is over one method's configurations, never the eight of both pooled.
    let md = std::fs::read_to_string(&w.markdown).expect("md");
    assert!(
        md.contains("**caf: spread over 3 configurations, σ = 0.25**"),
        "{md}"
    );
    assert!(md.contains("**denoised: spread over 2 configurations, σ = 0.5**"));
    assert!(!md.contains("spread over 5") && !md.contains("spread over 8"));
    // caf's ACR: (0.2, 0.1) → 0.15 … (0.6, 0.1) → 0.35.
    assert!(md.contains("| ACR | 0.150 | 0.350 | 0.200 |"), "{md}");
}

#[test]
fn a_single_method_sweep_keeps_its_heatmap_and_lines() {
    let mk = |id: &str, w: f64, lr: f64, radii: [f64; 2]| {
        cert(
            id,
            "caf",
            0.5,
            &[("width", w), ("lr", lr)],
            vec![row(0, 1, 1, radii[0]), row(1, 1, 1, radii[1])],
        )
    };
    let s = study_of(vec![
        mk("c1", 0.5, 0.1, [0.6, 0.1]),
        mk("c2", 0.5, 0.01, [0.6, 0.6]),
        mk("c3", 1.0, 0.1, [0.1, 0.1]),
        mk("c4", 1.0, 0.01, [0.3, 0.0]),
    ]);
    assert_eq!(s.swept, ["lr", "width"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    // The names a single-method study has always had: no method in them.
    assert_eq!(
        figure_stems(dir.path()),
        [
            "curves-sigma-0.5",
            "heatmap-lr-width-sigma-0.5",
            "sensitivity-lr-sigma-0.5",
            "sensitivity-width-sigma-0.5",
        ]
    );
    assert_all_figures_have_data(dir.path());
    let map = svg(dir.path(), "heatmap-lr-width-sigma-0.5");
    assert!(map.contains(">\nACR by lr × width (σ = 0.5)\n<"), "{map}");
    // One cell per job, its ACR: c1 0.35, c2 0.6, c3 0.1, c4 0.15.
    for acr in ["0.350", "0.600", "0.100", "0.150"] {
        assert!(map.contains(&format!(">\n{acr}\n<")), "cell {acr}");
    }
    let lines = svg(dir.path(), "sensitivity-width-sigma-0.5");
    assert!(lines.contains(">\ncertified accuracy vs width (σ = 0.5)\n<"));
    let md = std::fs::read_to_string(&w.markdown).expect("md");
    assert!(
        md.contains("**spread over 4 configurations, σ = 0.5**"),
        "{md}"
    );
    assert!(
        !md.contains("Each view covers one method"),
        "single method: no such note"
    );
}

#[test]
fn figures_without_data_are_not_written() {
    // Two caf parameters that never meet in one job: their lines have points, their heatmap
    // would be all empty cells.
    let mk = |id: &str, key: &str, v: f64, r: f64| {
        cert(
            id,
            "caf",
            0.5,
            &[(key, v)],
            vec![row(0, 1, 1, r), row(1, 1, 1, 0.1)],
        )
    };
    let mut s = study_of(vec![
        mk("a1", "a", 1.0, 0.2),
        mk("a2", "a", 2.0, 0.4),
        mk("b1", "b", 1.0, 0.3),
        mk("b2", "b", 2.0, 0.5),
    ]);
    // A σ whose only job has no results yet: its panel would be empty.
    let mut pending = cert("p1", "caf", 1.0, &[("a", 1.0)], Vec::new());
    pending.state = JobState::Pending;
    s.jobs.push(status("p1", "certify", JobState::Pending));
    s.cert.push(pending);
    // A training job that records no validation accuracy: its loss curve has points, its
    // accuracy curve none.
    let mut train = known().train;
    for e in &mut train[0].epochs {
        e.as_object_mut().expect("epoch").remove("val_acc");
    }
    s.train = train;
    let dir = tempfile::tempdir().expect("tempdir");
    let w = write(&s, &opts(), dir.path()).expect("report");
    assert_eq!(
        figure_stems(dir.path()),
        [
            "curves-envelope",
            "curves-sigma-0.5",
            "sensitivity-a-sigma-0.5",
            "sensitivity-b-sigma-0.5",
            "training-loss",
        ]
    );
    assert_all_figures_have_data(dir.path());
    // The pages only show what was written.
    let md = std::fs::read_to_string(&w.markdown).expect("md");
    let html = std::fs::read_to_string(&w.index).expect("html");
    for missing in [
        "heatmap-a-b-sigma-0.5",
        "curves-sigma-1",
        "training-val-acc",
    ] {
        assert!(!md.contains(missing), "{missing} in report.md");
        assert!(!html.contains(missing), "{missing} in index.html");
    }
}

#[test]
fn a_plot_knows_whether_it_has_data() {
    let series = |points: Vec<(f64, f64)>| Series {
        name: "caf".into(),
        color: plot::method_color("caf"),
        points,
        dashed: false,
        error_bars: None,
        points_only: false,
    };
    let line = |series: Vec<Series>| LinePlot {
        series,
        ..sections::accuracy_plot(String::new(), Vec::new())
    };
    assert!(!line(vec![]).has_data());
    assert!(!line(vec![
        series(vec![]),
        series(vec![(f64::NAN, 0.5), (0.1, f64::INFINITY)])
    ])
    .has_data());
    assert!(line(vec![
        series(vec![]),
        series(vec![(f64::NAN, 0.5), (0.1, 0.5)])
    ])
    .has_data());
    let map = |values: Vec<Vec<Option<f64>>>| Heatmap {
        title: String::new(),
        x_label: String::new(),
        y_label: String::new(),
        x_ticks: vec!["x".into(); values.first().map_or(0, Vec::len)],
        y_ticks: vec!["y".into(); values.len()],
        values,
        decimals: 3,
    };
    assert!(!map(vec![]).has_data());
    assert!(!map(vec![vec![None, Some(f64::NAN)], vec![None, None]]).has_data());
    assert!(map(vec![vec![None, Some(0.0)], vec![None, None]]).has_data());
}

#[test]
fn the_machine_behind_every_finished_job_is_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut study = known();
    // Two CPU models: the section says so, since training results differ between them.
    if let Some(j) = study.jobs.iter_mut().find(|j| j.ran_cpu.is_some()) {
        j.ran_host = Some("node-b".into());
        j.ran_cpu = Some("Intel Xeon 8480".into());
        j.interruptions = 2;
    }
    write(&study, &opts(), dir.path()).expect("report");
    let csv = std::fs::read_to_string(dir.path().join("tables/reproducibility-3.csv"))
        .expect("reproducibility-3.csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("job,kind,label,host,CPU,device,interruptions")
    );
    let rows: Vec<&str> = lines.collect();
    let done = study
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Done)
        .count();
    assert_eq!(rows.len(), done, "{csv}");
    assert!(
        rows.iter()
            .any(|r| r.contains(",node-a,AMD EPYC 7B13,cpu,0")),
        "{csv}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains(",node-b,Intel Xeon 8480,cpu,2")),
        "{csv}"
    );
    let md = std::fs::read_to_string(dir.path().join("report.md")).expect("report.md");
    assert!(md.contains("the jobs ran on 2 CPU models"), "{md}");
}
