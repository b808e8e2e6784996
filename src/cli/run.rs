//! `caf run`, and the commands around it: `caf plan` (what a run would do; `--record` writes
//! it for workers), `caf worker` (runs recorded studies: the loop `caf run` uses) and `caf
//! retry` (what the next run will do again).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use caf::methods;
use caf::plan::Plan;
use caf::sched::{
    self, CancelFlag, LogProgress, Progress, RunSummary, SchedConfig, TerminalProgress,
};
use caf::store::{AnyStore, JobState, Store, StudyId};

use super::args::{PlanArgs, RetryArgs, RunArgs, WorkerArgs};
use super::db::{open_existing_store, open_existing_store_with};
use super::exit::{self, usage};
use super::signals::{self, Notices};
use super::study::{load_plan, record};

/// The scheduler settings `run` and `worker` share; bad values are usage errors.
fn sched_config(
    slots: usize,
    device: &sched::DeviceList,
    lease_secs: f64,
    artifacts: &Path,
    slots_flag: &str,
) -> Result<SchedConfig> {
    if slots == 0 {
        bail!(usage(format!("{slots_flag} must be at least 1")));
    }
    if !(lease_secs.is_finite() && lease_secs >= 1.0) {
        bail!(usage("--lease-secs must be at least 1"));
    }
    let devices = device.resolve().map_err(usage)?;
    let lease = Duration::from_secs_f64(lease_secs);
    Ok(SchedConfig {
        workers: slots,
        devices,
        lease,
        heartbeat: lease / 4,
        poll: Duration::from_millis(500),
        artifacts_dir: artifacts.to_path_buf(),
        ..SchedConfig::default()
    })
}

/// Pooled store connections for a process running `cfg`'s slots: one per job slot, whose
/// results and progress it writes, and one for claims and heartbeats.
fn connections(cfg: &SchedConfig) -> u32 {
    u32::try_from(cfg.workers * cfg.devices.len().max(1) + 1).unwrap_or(u32::MAX)
}

/// Runs jobs of `studies` in this process until none is left to run here or a signal asks it
/// to stop: the one worker loop behind `caf run` and `caf worker`. SIGINT, SIGTERM and SIGUSR2
/// (Slurm's warning before walltime or preemption) stop it at the jobs' next clean point (a
/// certification after the image in flight, a training job after writing a checkpoint); the
/// leases are handed back as interruptions.
async fn work(
    store: &AnyStore,
    studies: &[StudyId],
    cfg: SchedConfig,
    quiet: bool,
) -> Result<RunSummary> {
    let progress: Arc<dyn Progress> = if quiet {
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
            stopping: "\nstopping: certifications after the image in flight, training after a \
                       checkpoint (signal again to abort now)…",
            aborted: Some("aborted; finished images are saved"),
        },
    );
    let results = methods::StoreResults::new(store.clone(), tokio::runtime::Handle::current())
        .with_retry(cfg.store_retry);
    let registry = Arc::new(methods::registry(Arc::new(results)));
    Ok(sched::run_studies(store.clone(), studies, registry, cfg, shutdown, progress).await?)
}

pub async fn run(a: RunArgs) -> Result<i32> {
    let plan = load_plan(&a.spec)?;
    let cfg = sched_config(
        a.workers,
        &a.device,
        a.lease_secs,
        &a.artifacts,
        "--workers",
    )?;
    let (store, study) = record(&plan, &a.db.db, a.retry_failed, connections(&cfg)).await?;
    let summary = work(&store, &[study], cfg, a.quiet).await?;
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

/// `caf worker`: runs jobs of the named studies (all by default) that are already recorded,
/// until nothing is runnable and nothing it waits on is running. Exit 0 then (failed jobs are
/// in the store, for `caf status`), 130 when a signal stopped it.
pub async fn worker(a: WorkerArgs) -> Result<i32> {
    let cfg = sched_config(a.slots, &a.device, a.lease_secs, &a.artifacts, "--slots")?;
    let store = open_existing_store_with(&a.db.db, connections(&cfg)).await?;
    let studies = if a.studies.is_empty() {
        store.studies().await?
    } else {
        let mut picked = Vec::with_capacity(a.studies.len());
        for name in &a.studies {
            picked.push(super::db::pick_study(&store, Some(name), &a.db.db).await?);
        }
        picked
    };
    if studies.is_empty() {
        eprintln!(
            "no studies in {}: nothing to do (record one with `caf plan SPEC --record`)",
            super::db::shown(&a.db.db)
        );
        return Ok(0);
    }
    let ids: Vec<StudyId> = studies.iter().map(|s| s.id).collect();
    let summary = work(&store, &ids, cfg, a.quiet).await?;
    let names: Vec<&str> = studies.iter().map(|s| s.name.as_str()).collect();
    eprintln!(
        "worker: {} done, {} failed, {} retried, {} interrupted (studies: {})",
        summary.completed,
        summary.failed,
        summary.retried,
        summary.interrupted,
        names.join(", ")
    );
    if summary.shutdown_requested {
        eprintln!("stopped by a signal; its jobs are handed back for other workers");
        return Ok(exit::INTERRUPTED);
    }
    Ok(0)
}

/// `caf plan --record`: prints the plan and records it in --db without running anything.
pub async fn plan_record(a: PlanArgs) -> Result<i32> {
    let plan = load_plan(&a.spec)?;
    record(&plan, &a.db.db, false, caf::store::DEFAULT_CONNECTIONS).await?;
    print_plan(&plan, a.json)?;
    eprintln!(
        "recorded study {} ({} jobs) in {}; run it with: caf worker --db {} --study {}",
        plan.study.name,
        plan.jobs.len(),
        super::db::shown(&a.db.db),
        super::db::shown(&a.db.db),
        plan.study.name
    );
    Ok(0)
}

pub fn plan(a: PlanArgs) -> Result<i32> {
    let plan = load_plan(&a.spec)?;
    print_plan(&plan, a.json)
}

fn print_plan(plan: &Plan, json: bool) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    if json {
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
