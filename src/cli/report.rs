//! `caf report` and `caf import`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use caf::plan::{CellOutput, CellRecord, JobBuilder};
use caf::report::{self, data::StudyData};
use caf::store::{CertRow, SqliteStore, Store};

use super::args::{ImportArgs, ImportFormat, ReportArgs};
use super::commands::open_existing_store;
use super::export::pick_study;
use super::Exit;

fn usage(msg: impl Into<String>) -> anyhow::Error {
    Exit {
        code: 2,
        message: Some(msg.into()),
    }
    .into()
}

pub async fn report(a: ReportArgs) -> Result<i32> {
    if let Some(r) = a
        .radii
        .iter()
        .flatten()
        .find(|r| !r.is_finite() || **r < 0.0)
    {
        bail!(usage(format!("--radii: {r} is not a radius ≥ 0")));
    }
    let written = match &a.compare {
        Some(pair) => {
            let first = load_source(&pair[0], &a.db.db).await?;
            let second = load_source(&pair[1], &a.db.db).await?;
            let opts = options(&a, &first.study.spec_text);
            report::write_compare(&first, &second, &opts, &a.out)?
        }
        None => {
            let store = open_existing_store(&a.db.db).await?;
            let study = pick_study(&store, a.study.as_deref(), &a.db.db).await?;
            let data = StudyData::load(&store, study).await?;
            if data.cert.is_empty() && data.train.is_empty() {
                bail!(usage(format!(
                    "study {} has no results a report can show yet; if it was run by a caf \
                     older than this one, run its spec once more with `caf run` to record its \
                     grid cells (finished jobs are not re-run)",
                    data.study.name
                )));
            }
            let opts = options(&a, &data.study.spec_text);
            report::write(&data, &opts, &a.out)?
        }
    };
    outln!("report: {}", written.index.display());
    outln!("markdown: {}", written.markdown.display());
    outln!("{} files under {}", written.files, a.out.display());
    Ok(0)
}

/// `STUDY`, `PATH.db` or `PATH.db:STUDY`.
async fn load_source(src: &str, default_db: &Path) -> Result<StudyData> {
    let (db, name): (PathBuf, Option<&str>) = match src.rsplit_once(':') {
        Some((path, study)) if path.ends_with(".db") => (PathBuf::from(path), Some(study)),
        _ if src.ends_with(".db") => (PathBuf::from(src), None),
        _ => (default_db.to_path_buf(), Some(src)),
    };
    let store = open_existing_store(&db).await?;
    let study = pick_study(&store, name, &db).await?;
    Ok(StudyData::load(&store, study).await?)
}

fn options(a: &ReportArgs, spec_text: &str) -> report::Options {
    let radii = a.radii.clone().unwrap_or_else(|| spec_radii(spec_text));
    report::Options {
        radii,
        baseline: a.baseline.clone(),
        provenance: provenance(),
    }
}

/// The spec's `report.radii`, or the defaults when the stored spec no longer parses here.
fn spec_radii(text: &str) -> Vec<f64> {
    caf::spec::Spec::parse(Path::new("spec.yaml"), text.as_bytes(), Path::new("."))
        .map(|s| s.report.radii)
        .unwrap_or_else(|_| caf::spec::ReportSettings::default().radii)
}

fn provenance() -> Vec<(String, String)> {
    let mut v = vec![
        (
            "caf version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "git revision".to_string(),
            option_env!("CAF_GIT_REVISION")
                .unwrap_or("unknown")
                .to_string(),
        ),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        v.push(("host".into(), h.trim().to_string()));
    }
    if let Ok(cpu) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(model) = cpu
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
        {
            v.push(("cpu".into(), model.1.trim().to_string()));
        }
    }
    v.push((
        "threads".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into()),
    ));
    v.push((
        "report written".into(),
        format!("{:.0} (Unix seconds)", caf::util::now_unix()),
    ));
    v
}

pub async fn import(a: ImportArgs) -> Result<i32> {
    if !(a.sigma.is_finite() && a.sigma > 0.0) {
        bail!(usage(format!(
            "--sigma: expected a number > 0, got {}",
            a.sigma
        )));
    }
    if a.method.trim().is_empty() {
        bail!(usage("--method must not be empty"));
    }
    let bytes = std::fs::read(&a.file)
        .map_err(|e| usage(format!("cannot read {}: {e}", a.file.display())))?;
    let rows = match a.format {
        ImportFormat::CohenTsv => parse_cohen_tsv(&a.file, &bytes, a.sigma)?,
    };
    let recomputable = rows.iter().all(|r| r.n > 0);
    let sha = caf::util::sha256_bytes(&bytes);
    let label = match &a.label {
        Some(l) => format!("{} σ={} ({l})", a.method, a.sigma),
        None => format!("{} σ={} (imported)", a.method, a.sigma),
    };
    let job = JobBuilder {
        kind: "import",
        version: 1,
        label,
        params: serde_json::json!({
            "file": a.file.display().to_string(),
            "sha256": sha,
            "method": a.method,
            "sigma": a.sigma,
            "label": a.label,
            "recomputable": recomputable,
        }),
        identity: serde_json::json!({ "sha256": sha, "method": a.method, "sigma": a.sigma }),
        deps: Vec::new(),
    }
    .build();
    let cell = CellRecord {
        cell: 0,
        method: a.method.clone(),
        values: [
            ("method".to_string(), serde_json::json!(a.method)),
            ("sigma".to_string(), serde_json::json!(a.sigma)),
        ]
        .into_iter()
        .collect(),
        outputs: vec![CellOutput {
            job: job.id.clone(),
            kind: "certify".into(),
            sigma: Some(a.sigma),
            trained_sigma: None,
        }],
    };
    let store: SqliteStore = super::commands::open_store(&a.db.db).await?;
    store
        .import_results(&a.study, &job, &cell, &rows)
        .await
        .context("recording the import")?;
    outln!(
        "imported {} rows of {} as job {} ({}) into study {}{}",
        rows.len(),
        a.file.display(),
        job.id,
        job.label,
        a.study,
        if recomputable {
            ""
        } else {
            "; the file has no nA/n columns, so these certificates are marked not recomputable"
        }
    );
    Ok(0)
}

/// Reads a certify.py log: a header naming at least `idx label predict radius correct`, then
/// one tab-separated row per image. `time`, `nA`, `n` (caf's export adds the counts) are used
/// when present.
fn parse_cohen_tsv(path: &Path, bytes: &[u8], sigma: f64) -> Result<Vec<CertRow>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| usage(format!("{}: not UTF-8 text: {e}", path.display())))?;
    let mut lines = text.lines().enumerate();
    let Some((_, header)) = lines.next() else {
        bail!(usage(format!(
            "{}:1:1: empty file; expected a header line",
            path.display()
        )));
    };
    let cols: Vec<&str> = header.split('\t').map(str::trim).collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let need = |name: &str| {
        col(name).ok_or_else(|| {
            usage(format!(
                "{}:1:1: the header has no `{name}` column (expected tab-separated \
                 `idx label predict radius correct [time] [nA n]`, found `{header}`)",
                path.display()
            ))
        })
    };
    let (ci, cl, cp, cr, cc) = (
        need("idx")?,
        need("label")?,
        need("predict")?,
        need("radius")?,
        need("correct")?,
    );
    let (ct, cna, cn) = (col("time"), col("nA"), col("n"));
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let lineno = i + 1;
        let field = |c: usize, what: &str| -> Result<&str> {
            fields.get(c).map(|s| s.trim()).ok_or_else(|| {
                usage(format!(
                    "{}:{lineno}: missing column {} (`{what}`); the header has {} columns",
                    path.display(),
                    c + 1,
                    cols.len()
                ))
            })
        };
        fn parse<T: std::str::FromStr>(
            path: &Path,
            lineno: usize,
            col: usize,
            what: &str,
            s: &str,
        ) -> Result<T> {
            s.parse().map_err(|_| {
                usage(format!(
                    "{}:{lineno}: column {} (`{what}`): `{s}` is not a valid value",
                    path.display(),
                    col + 1
                ))
            })
        }
        let idx: u64 = parse(path, lineno, ci, "idx", field(ci, "idx")?)?;
        let label: u32 = parse(path, lineno, cl, "label", field(cl, "label")?)?;
        let predict: i64 = parse(path, lineno, cp, "predict", field(cp, "predict")?)?;
        let radius: f64 = parse(path, lineno, cr, "radius", field(cr, "radius")?)?;
        let correct: u8 = parse(path, lineno, cc, "correct", field(cc, "correct")?)?;
        if !radius.is_finite() || radius < 0.0 || correct > 1 || predict < -1 {
            bail!(usage(format!(
                "{}:{lineno}: radius must be ≥ 0, correct 0 or 1 and predict ≥ -1",
                path.display()
            )));
        }
        if (correct == 1) != (predict == i64::from(label)) {
            bail!(usage(format!(
                "{}:{lineno}: `correct` = {correct} contradicts label {label} and prediction {predict}",
                path.display()
            )));
        }
        if !seen.insert(idx) {
            bail!(usage(format!(
                "{}:{lineno}: image {idx} appears twice",
                path.display()
            )));
        }
        let seconds: f64 = match ct {
            Some(c) => parse(path, lineno, c, "time", field(c, "time")?)?,
            None => 0.0,
        };
        let (n_a, n): (u64, u64) = match (cna, cn) {
            (Some(a), Some(b)) => (
                parse(path, lineno, a, "nA", field(a, "nA")?)?,
                parse(path, lineno, b, "n", field(b, "n")?)?,
            ),
            _ => (0, 0),
        };
        rows.push(CertRow {
            idx,
            label,
            predict,
            radius,
            correct: correct == 1,
            c_hat: predict.max(0) as u32,
            n_a,
            n,
            n0: 0,
            alpha: 0.0,
            sigma,
            seconds,
        });
    }
    if rows.is_empty() {
        bail!(usage(format!(
            "{}: no result rows after the header",
            path.display()
        )));
    }
    Ok(rows)
}
