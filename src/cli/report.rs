//! `caf report`: a study's figures and tables, or two studies overlaid.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use caf::report::{self, data::StudyData};

use super::args::ReportArgs;
use super::db::{open_existing_store, pick_study};
use super::exit::usage;

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
