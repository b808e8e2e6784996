//! `caf status`: each job's state, progress, throughput, time left and interruptions, and the
//! workers serving each study (host, pid, Slurm ids, device, last heartbeat, jobs held).

use std::io::Write;

use anyhow::Result;

use caf::store::{JobState, JobStatus, Queue, Store, StudyInfo, WorkerRow};

use super::args::StatusArgs;
use super::db::open_existing_store;

/// Units per second and seconds left. Certification jobs count images, or draws (forward
/// passes) when sequential, whose progress total is a projection from the draws per image so
/// far: both come from the recorded per-image compute time. Training jobs count epochs: the rate is the last recorded
/// epoch's training throughput and the time left is the epochs left times the mean recorded
/// epoch duration.
fn rate_eta(j: &JobStatus, epochs: &[serde_json::Value]) -> (Option<f64>, Option<f64>) {
    let left = j.progress_total.saturating_sub(j.progress_done) as f64;
    let running = j.state != JobState::Done;
    if !epochs.is_empty() {
        let field = |m: &serde_json::Value, k: &str| m.get(k).and_then(|v| v.as_f64());
        let rate = epochs.last().and_then(|m| field(m, "images_per_sec"));
        let secs: Vec<f64> = epochs
            .iter()
            .filter_map(|m| field(m, "seconds"))
            .filter(|s| s.is_finite() && *s > 0.0)
            .collect();
        let mean = (!secs.is_empty()).then(|| secs.iter().sum::<f64>() / secs.len() as f64);
        return (rate, mean.filter(|_| running).map(|m| left * m));
    }
    if j.progress_done == 0 || j.work_seconds <= 0.0 {
        return (None, None);
    }
    let rate = j.progress_done as f64 / j.work_seconds;
    (Some(rate), running.then(|| left / rate))
}

/// Two decimals, three below 1/s (a ViT certification runs at 0.09 images/s).
fn fmt_rate(r: f64) -> String {
    if r < 1.0 {
        format!("{r:.3}")
    } else {
        format!("{r:.2}")
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub async fn status(a: StatusArgs) -> Result<i32> {
    let store = open_existing_store(&a.db.db).await?;
    let studies: Vec<StudyInfo> = match &a.study {
        Some(name) => vec![store.study_by_name(name).await?],
        None => store.studies().await?,
    };
    let mut all = Vec::new();
    let mut weights = std::collections::HashMap::new();
    let mut epochs = std::collections::HashMap::new();
    let mut slurm = std::collections::HashMap::new();
    for s in &studies {
        slurm.insert(s.name.clone(), store.slurm_jobs(s.id).await?);
        let jobs = store.study_jobs(s.id).await?;
        for j in &jobs {
            if let Some(a) = store.artifact(&j.id, caf::methods::source::WEIGHTS).await? {
                weights.insert(j.id.clone(), a);
            }
            if j.is_training() && j.progress_done > 0 {
                epochs.insert(j.id.clone(), store.epochs(&j.id).await?);
            }
        }
        all.push((s.clone(), jobs));
    }
    let rate_eta = |j: &JobStatus| rate_eta(j, epochs.get(&j.id).map_or(&[], Vec::as_slice));
    let workers = store.workers().await?;
    // A study's workers: those started for it (or for every study), and any holding its jobs.
    let serving = |s: &StudyInfo, jobs: &[JobStatus]| -> Vec<&WorkerRow> {
        workers
            .iter()
            .filter(|w| {
                w.info.studies.contains(&s.id)
                    || w.jobs.iter().any(|id| jobs.iter().any(|j| &j.id == id))
            })
            .collect()
    };
    let now = caf::util::now_unix();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v: Vec<_> = all
            .iter()
            .map(|(s, jobs)| {
                let ws = serving(s, jobs);
                let jobs: Vec<_> = jobs
                    .iter()
                    .map(|j| {
                        let (rate, eta) = rate_eta(j);
                        let mut v = serde_json::to_value(j).unwrap_or_default();
                        if let Some(o) = v.as_object_mut() {
                            let key = match j.unit {
                                caf::plan::ProgressUnit::Draws => "draws_per_sec",
                                _ => "images_per_sec",
                            };
                            o.insert(key.into(), serde_json::json!(rate));
                            o.insert("eta_seconds".into(), serde_json::json!(eta));
                            if let Some(a) = weights.get(&j.id) {
                                o.insert("weights".into(), serde_json::json!(a));
                            }
                        }
                        v
                    })
                    .collect();
                serde_json::json!({
                    "study": s.name, "seed": s.seed, "spec_sha256": s.spec_sha256, "jobs": jobs,
                    "workers": ws, "slurm_jobs": slurm.get(&s.name),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(0);
    }
    if all.is_empty() {
        writeln!(out, "no studies in {}", super::db::shown(&a.db.db))?;
    }
    for (s, jobs) in &all {
        let done = jobs.iter().filter(|j| j.state == JobState::Done).count();
        writeln!(
            out,
            "study {} — {done}/{} jobs done (spec sha256 {})",
            s.name,
            jobs.len(),
            &s.spec_sha256[..12.min(s.spec_sha256.len())]
        )?;
        if let Some(sj) = slurm.get(&s.name).filter(|v| !v.is_empty()) {
            let shown: Vec<String> = sj
                .iter()
                .map(|j| format!("{} ({} workers)", j.job_id, j.array_tasks))
                .collect();
            writeln!(out, "  slurm jobs: {}", shown.join(", "))?;
        }
        writeln!(
            out,
            "  {:<16}  {:<13}  {:<30}  {:<8}  {:>11}  {:>7}  {:>7}  {:>3}  {:>3}  {:<7}  NOTE",
            "JOB", "KIND", "LABEL", "STATE", "PROGRESS", "RATE/S", "ETA", "TRY", "INT", "DEVICE"
        )?;
        // Where a job ran (finished) or runs (its lease holder's device: exact for a worker on
        // one device, the worker's list otherwise).
        let device = |j: &JobStatus| -> String {
            if j.state == JobState::Running {
                let holder = j.lease_owner.as_deref();
                workers
                    .iter()
                    .find(|w| Some(w.id.as_str()) == holder)
                    .map_or_else(|| "-".to_string(), |w| w.info.device.clone())
            } else {
                j.ran_device.clone().unwrap_or_else(|| "-".into())
            }
        };
        for j in jobs {
            let (rate, eta) = rate_eta(j);
            let state = if j.blocked {
                "blocked"
            } else {
                j.state.as_str()
            };
            let note = match (&j.error, j.state) {
                (Some(e), JobState::Failed | JobState::Pending) => {
                    e.lines().next().unwrap_or("").to_string()
                }
                _ if j.state == JobState::Running => {
                    format!("lease: {}", j.lease_owner.as_deref().unwrap_or("?"))
                }
                // Rate and progress of these count forward passes, not images.
                _ if j.unit == caf::plan::ProgressUnit::Draws => "counting draws".to_string(),
                _ => String::new(),
            };
            writeln!(
                out,
                "  {:<16}  {:<13}  {:<30}  {:<8}  {:>11}  {:>7}  {:>7}  {:>3}  {:>3}  {:<7}  {}",
                j.id,
                j.kind,
                j.label.chars().take(30).collect::<String>(),
                state,
                format!("{}/{}", j.progress_done, j.progress_total),
                rate.map_or("-".into(), fmt_rate),
                eta.map_or("-".into(), fmt_secs),
                j.attempts,
                j.interruptions,
                device(j),
                note
            )?;
        }
        let ws = serving(s, jobs);
        let live: Vec<&&WorkerRow> = ws.iter().filter(|w| w.stopped_at.is_none()).collect();
        // A worker of this host whose process is gone was killed without a word; the next
        // `caf run` or `caf worker` here ends its leases.
        let host = caf::sched::hostname();
        let gone = |w: &WorkerRow| w.info.host == host && caf::sched::process_gone(w.info.pid);
        let n_gone = live.iter().filter(|w| gone(w)).count();
        if !ws.is_empty() {
            let gone_note = if n_gone > 0 {
                format!(" ({n_gone} of them gone: killed without stopping)")
            } else {
                String::new()
            };
            writeln!(
                out,
                "  workers: {} not stopped{gone_note}, {} stopped",
                live.len(),
                ws.len() - live.len()
            )?;
        }
        if !live.is_empty() {
            writeln!(
                out,
                "    {:<20}  {:>8}  {:<14}  {:<8}  {:>15}  {:<30}  JOBS",
                "HOST", "PID", "SLURM", "DEVICE", "HEARTBEAT", "CPU"
            )?;
            for w in live {
                writeln!(
                    out,
                    "    {:<20}  {:>8}  {:<14}  {:<8}  {:>15}  {:<30}  {}",
                    w.info.host,
                    w.info.pid,
                    slurm_id(w),
                    w.info.device,
                    format!(
                        "{}{} ago",
                        if gone(w) { "gone " } else { "" },
                        fmt_secs((now - w.last_seen).max(0.0))
                    ),
                    w.info.cpu.chars().take(30).collect::<String>(),
                    if w.jobs.is_empty() {
                        "-".to_string()
                    } else {
                        w.jobs
                            .iter()
                            .map(|j| j.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    }
                )?;
            }
        }
    }
    Ok(0)
}

/// A worker's Slurm identity: `ARRAYJOB_TASK` for an array task, else the job id, else `-`.
fn slurm_id(w: &WorkerRow) -> String {
    match (
        &w.info.slurm_array_job_id,
        &w.info.slurm_array_task_id,
        &w.info.slurm_job_id,
    ) {
        (Some(a), Some(t), _) => format!("{a}_{t}"),
        (_, _, Some(j)) => j.clone(),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caf::plan::JobId;

    fn job(kind: &str, state: JobState, done: u64, total: u64, work: f64) -> JobStatus {
        JobStatus {
            id: JobId::new("0123456789abcdef"),
            kind: kind.into(),
            label: String::new(),
            state,
            blocked: false,
            attempts: 1,
            max_attempts: 3,
            progress_done: done,
            progress_total: total,
            run_seconds: work,
            work_seconds: work,
            started_at: None,
            finished_at: None,
            lease_owner: None,
            interruptions: 0,
            max_interruptions: 20,
            ran_host: None,
            ran_cpu: None,
            ran_device: None,
            error: None,
            result: None,
            precision: "f32".into(),
            unit: if kind.starts_with("train-") {
                caf::plan::ProgressUnit::Epochs
            } else {
                caf::plan::ProgressUnit::Images
            },
        }
    }

    #[test]
    fn certification_eta_comes_from_per_image_time() {
        let (rate, eta) = rate_eta(&job("certify", JobState::Running, 20, 100, 10.0), &[]);
        assert_eq!(rate, Some(2.0));
        assert_eq!(eta, Some(40.0));
        let (_, eta) = rate_eta(&job("certify", JobState::Done, 100, 100, 50.0), &[]);
        assert_eq!(eta, None);
        assert_eq!(
            rate_eta(&job("certify", JobState::Pending, 0, 0, 0.0), &[]),
            (None, None)
        );
    }

    #[test]
    fn sequential_eta_counts_draws_at_the_measured_draws_per_second() {
        let mut j = job("certify", JobState::Running, 30_000, 120_000, 15.0);
        j.unit = caf::plan::ProgressUnit::Draws;
        let (rate, eta) = rate_eta(&j, &[]);
        assert_eq!(rate, Some(2_000.0));
        assert_eq!(eta, Some(45.0));
    }

    #[test]
    fn training_eta_is_epochs_left_times_the_mean_epoch() {
        let epochs = [
            serde_json::json!({"epoch": 0, "images_per_sec": 40.0, "seconds": 1000.0}),
            serde_json::json!({"epoch": 1, "images_per_sec": 50.0, "seconds": 800.0}),
        ];
        let (rate, eta) = rate_eta(&job("train-rs", JobState::Running, 2, 5, 0.0), &epochs);
        assert_eq!(rate, Some(50.0));
        assert_eq!(eta, Some(3.0 * 900.0));
        let (_, eta) = rate_eta(&job("train-rs", JobState::Done, 5, 5, 0.0), &epochs);
        assert_eq!(eta, None);
    }
}
