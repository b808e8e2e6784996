//! `caf import`: per-image results certified elsewhere (a published certify.py log), recorded as
//! a job of a study so that `caf report` sets them beside caf's own.

use std::path::Path;

use anyhow::{bail, Context, Result};

use caf::plan::{CellOutput, CellRecord, JobBuilder};
use caf::store::{CertRow, Store};

use super::args::{ImportArgs, ImportFormat};
use super::db::open_store;
use super::exit::usage;

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
    let store = open_store(&a.db.db).await?;
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
