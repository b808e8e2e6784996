//! `caf import`: per-image results certified elsewhere (a published certify.py log), recorded as
//! a job of a study so that `caf report` sets them beside caf's own.

use anyhow::{bail, Context, Result};

use caf::plan::{CellOutput, CellRecord, JobBuilder};
use caf::store::Store;

use super::args::{ImportArgs, ImportFormat};
use super::cohen_tsv;
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
        ImportFormat::CohenTsv => cohen_tsv::parse(&a.file, &bytes, a.sigma)?,
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
