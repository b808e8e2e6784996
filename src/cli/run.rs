//! `caf run`, and the two commands around it: `caf plan` (what a run would do) and `caf retry`
//! (what the next run will do again).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use caf::methods;
use caf::plan::Plan;
use caf::sched::{self, CancelFlag, LogProgress, Progress, SchedConfig, TerminalProgress};
use caf::spec::Spec;
use caf::store::{JobState, Store};

use super::args::{PlanArgs, RetryArgs, RunArgs};
use super::db::{open_existing_store, open_store};
use super::exit::{self, usage};
use super::signals::{self, Notices};

/// Loads and plans a spec; any problem with it is a usage error (exit 2, nothing written).
fn load_plan(path: &Path) -> Result<Plan> {
    let spec = Spec::load(path).map_err(|e| usage(e.to_string()))?;
    Plan::from_spec(&spec, &methods::planner()).map_err(|e| usage(e.to_string()))
}

pub async fn run(a: RunArgs) -> Result<i32> {
    let plan = load_plan(&a.spec)?;
    if a.workers == 0 {
        bail!(usage("--workers must be at least 1"));
    }
    if !(a.lease_secs.is_finite() && a.lease_secs >= 1.0) {
        bail!(usage("--lease-secs must be at least 1"));
    }
    let store = open_store(&a.db.db).await?;
    let study = store.register_plan(&plan).await?;
    if a.retry_failed {
        let n = store.retry_failed(study).await?;
        if n > 0 {
            eprintln!("retrying {n} failed job(s)");
        }
    }
    let lease = Duration::from_secs_f64(a.lease_secs);
    let cfg = SchedConfig {
        workers: a.workers,
        devices: a.device.0.clone(),
        lease,
        heartbeat: lease / 4,
        poll: Duration::from_millis(500),
        artifacts_dir: a.artifacts.clone(),
        ..SchedConfig::default()
    };
    let progress: Arc<dyn Progress> = if a.quiet {
        Arc::new(sched::progress::NoProgress)
    } else if std::io::stderr().is_terminal() {
        Arc::new(TerminalProgress::new())
    } else {
        Arc::new(LogProgress::new(Duration::from_secs(10)))
    };
    let shutdown = CancelFlag::new();
    signals::stop_on_signal(
        shutdown.clone(),
        Notices {
            stopping: "\nstopping after the image in flight (press Ctrl-C again to abort now)…",
            aborted: Some("aborted; finished images are saved"),
        },
    );
    let results = methods::StoreResults::new(store.clone(), tokio::runtime::Handle::current());
    let registry = Arc::new(methods::registry(Arc::new(results)));
    let summary = sched::run_study(store.clone(), study, registry, cfg, shutdown, progress).await?;
    let jobs = store.study_jobs(study).await?;
    let done = jobs.iter().filter(|j| j.state == JobState::Done).count();
    let failed: Vec<_> = jobs
        .iter()
        .filter(|j| j.state == JobState::Failed)
        .collect();
    let blocked = jobs.iter().filter(|j| j.blocked).count();
    let resume = format!(
        "caf run {} --db {}",
        a.spec.display(),
        super::db::shown(&a.db.db)
    );
    if summary.shutdown_requested {
        eprintln!(
            "interrupted: {done}/{} jobs done, finished work is saved. Resume with:\n  {resume}",
            jobs.len()
        );
        return Ok(exit::INTERRUPTED);
    }
    eprintln!(
        "study {}: {done}/{} jobs done, {} failed, {blocked} blocked",
        plan.study.name,
        jobs.len(),
        failed.len()
    );
    for f in &failed {
        eprintln!(
            "  FAILED {} [{}]: {}",
            f.label,
            f.id,
            f.error.as_deref().unwrap_or("?")
        );
    }
    if !failed.is_empty() || blocked > 0 {
        eprintln!("fix the cause, then: {resume} --retry-failed");
        return Ok(exit::FAILED);
    }
    Ok(0)
}

pub fn plan(a: PlanArgs) -> Result<i32> {
    let plan = load_plan(&a.spec)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&plan.to_json())?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "study {} (seed {}, spec sha256 {})",
        plan.study.name,
        plan.study.seed,
        &plan.study.spec_sha256[..12]
    )?;
    writeln!(out, "{:<16}  {:<8}  {:<34}  DEPS", "JOB", "KIND", "LABEL")?;
    for j in &plan.jobs {
        let deps: Vec<&str> = j.deps.iter().map(|d| d.as_str()).collect();
        writeln!(
            out,
            "{:<16}  {:<8}  {:<34}  {}",
            j.id,
            j.kind,
            j.label,
            if deps.is_empty() {
                "-".into()
            } else {
                deps.join(",")
            }
        )?;
    }
    writeln!(out, "{} jobs", plan.jobs.len())?;
    let budgets: Vec<(&caf::plan::Job, methods::budget::Budget)> = plan
        .jobs
        .iter()
        .filter_map(|j| methods::budget::of(j).map(|b| (j, b)))
        .collect();
    if !budgets.is_empty() {
        writeln!(
            out,
            "\ntraining compute (FLOPs = 2 × multiply-adds; see `caf::methods::budget`)"
        )?;
        writeln!(
            out,
            "{:<16}  {:>12}  {:>14}  {:>16}  {:>12}  {:>8}  LABEL",
            "JOB", "TRAINED PAR.", "MFLOP/IMG FWD", "MFLOP/TRAIN IMG", "IMAGES", "TFLOP"
        )?;
        for (j, b) in budgets {
            writeln!(
                out,
                "{:<16}  {:>12}  {:>14.1}  {:>16.1}  {:>12}  {:>8.1}  {}",
                j.id,
                b.trained_params,
                b.trained_flops as f64 / 1e6,
                b.flops_per_train_image / 1e6,
                b.images,
                b.tflops,
                j.label
            )?;
        }
    }
    Ok(0)
}

pub async fn retry(a: RetryArgs) -> Result<i32> {
    let store = open_existing_store(&a.db.db).await?;
    let study = store.study_by_name(&a.study).await?;
    let n = store.retry_failed(study.id).await?;
    println!(
        "{n} failed job(s) of {} returned to pending with fresh attempts",
        study.name
    );
    if n > 0 {
        // Their checkpoints and finished images are kept: the rerun resumes from them.
        println!(
            "a running `caf run` on this study picks them up; otherwise: caf run {} --db {}",
            study.spec_path,
            super::db::shown(&a.db.db)
        );
    }
    Ok(0)
}
