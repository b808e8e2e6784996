//! `caf export`: a study's per-image results as CSV, Cohen's TSV or JSON.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use caf::plan::JobId;
use caf::store::{CertRow, Store};

use super::args::{ExportArgs, ExportFormat};
use super::cohen_tsv;
use super::db::{open_existing_store, pick_study};
use super::exit::usage;

pub async fn export(a: ExportArgs) -> Result<i32> {
    let store = open_existing_store(&a.db.db).await?;
    let study = pick_study(&store, a.study.as_deref(), &a.db.db).await?;
    let jobs = store.study_jobs(study.id).await?;
    let mut rows = store.study_cert_results(study.id).await?;
    if let Some(prefix) = &a.job {
        let matching: Vec<&JobId> = jobs
            .iter()
            .map(|j| &j.id)
            .filter(|id| id.as_str().starts_with(prefix.as_str()))
            .collect();
        match matching.len() {
            1 => {
                let id = matching[0].clone();
                rows.retain(|(j, _)| *j == id);
            }
            0 => bail!(usage(format!(
                "no job of study {} starts with `{prefix}`",
                study.name
            ))),
            _ => bail!(usage(format!("job prefix `{prefix}` is ambiguous"))),
        }
    }
    let mut by_job: BTreeMap<JobId, Vec<CertRow>> = BTreeMap::new();
    for (j, r) in rows {
        by_job.entry(j).or_default().push(r);
    }
    match a.format {
        ExportFormat::Csv => {
            let mut buf = Vec::new();
            // Sequential rows add the bound's inputs and decisions; a study without any keeps
            // the columns it always had.
            let sequential = by_job.values().flatten().any(|r| r.sequential.is_some());
            write!(buf, "job,idx,label,predict,radius,correct,nA,n")?;
            if sequential {
                write!(buf, ",{SEQUENTIAL_HEADER}")?;
            }
            writeln!(buf)?;
            for (job, rs) in &by_job {
                for r in rs {
                    // Full precision radius: the file is for comparing runs, not for reading.
                    write!(
                        buf,
                        "{job},{},{},{},{},{},{},{}",
                        r.idx, r.label, r.predict, r.radius, r.correct as u8, r.n_a, r.n
                    )?;
                    if sequential {
                        write!(buf, ",{}", sequential_fields(r))?;
                    }
                    writeln!(buf)?;
                }
            }
            write_out(a.out.as_deref(), &buf)?;
        }
        ExportFormat::CohenTsv => {
            let tsv = |rs: &[CertRow]| -> std::io::Result<Vec<u8>> {
                let mut b = Vec::new();
                cohen_tsv::write_header(&mut b)?;
                for r in rs {
                    cohen_tsv::write_row(&mut b, r)?;
                }
                Ok(b)
            };
            match (by_job.len(), a.out.as_deref()) {
                (1, out) => {
                    let rs = by_job.values().next().map(Vec::as_slice).unwrap_or(&[]);
                    write_out(out, &tsv(rs)?)?;
                }
                (0, _) => bail!(usage(format!(
                    "study {} has no certification results yet",
                    study.name
                ))),
                (_, Some(dir)) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    for (job, rs) in &by_job {
                        let path = dir.join(format!("{job}.tsv"));
                        std::fs::write(&path, tsv(rs)?)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    eprintln!("wrote {} files to {}", by_job.len(), dir.display());
                }
                (_, None) => bail!(usage(
                    "cohen-tsv holds one job: pass --job ID, or --out DIR for one file per job"
                )),
            }
        }
        ExportFormat::Json => {
            let v: Vec<_> = jobs
                .iter()
                .filter(|j| a.job.is_none() || by_job.contains_key(&j.id))
                .map(|j| {
                    serde_json::json!({
                        "job": j.id, "kind": j.kind, "label": j.label, "state": j.state,
                        "results": by_job.get(&j.id).cloned().unwrap_or_default(),
                    })
                })
                .collect();
            let doc = serde_json::json!({ "study": study.name, "seed": study.seed, "spec_sha256": study.spec_sha256, "jobs": v });
            let mut buf = serde_json::to_vec_pretty(&doc)?;
            buf.push(b'\n');
            write_out(a.out.as_deref(), &buf)?;
        }
    }
    Ok(0)
}

/// The sequential columns of the CSV: mode, n0, alpha, sigma and the mixture's inputs, with
/// radii and decisions as `;`-separated lists (CSV-safe without quoting).
const SEQUENTIAL_HEADER: &str =
    "mode,n0,alpha,sigma,n_max,lower,upper,prior_a,prior_b,radii,decisions,stopped_wrong";

fn sequential_fields(r: &CertRow) -> String {
    let common = format!("{},{},{}", r.n0, r.alpha, r.sigma);
    match &r.sequential {
        None => format!("cohen,{common},,,,,,,,"),
        Some(q) => {
            let radii: Vec<String> = q.radii.iter().map(f64::to_string).collect();
            let decisions: Vec<&str> = q.decisions.iter().map(|d| d.as_str()).collect();
            format!(
                "sequential,{common},{},{},{},{},{},{},{},{}",
                q.n_max,
                q.lower,
                q.upper,
                q.prior_a,
                q.prior_b,
                radii.join(";"),
                decisions.join(";"),
                q.stopped_wrong as u8
            )
        }
    }
}

fn write_out(out: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match out {
        Some(p) => std::fs::write(p, bytes).with_context(|| format!("writing {}", p.display())),
        None => {
            let mut o = std::io::stdout().lock();
            o.write_all(bytes)?;
            o.flush()?;
            Ok(())
        }
    }
}
