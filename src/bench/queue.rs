//! `caf bench queue`: how many trivial jobs a store's real [`Queue`] hands out and takes back
//! per second, so the cost of scheduling is known apart from the cost of the work.
//!
//! Two phases, each on a fresh study of `jobs` jobs that do nothing: `queue`, where `workers`
//! in-process loops call `claim` then `complete` as fast as they can (the store alone), and
//! `sched`, the same jobs run by [`crate::sched::run_study`] with `workers` slots and a handler
//! that returns at once (the store plus what the scheduler does around each job: events,
//! lease keeping, the blocking thread a handler runs on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::plan::{Job, JobBuilder, Plan, StudyMeta};
use crate::queue::{StudyId, WorkerId};
use crate::sched::{
    self, CancelFlag, JobContext, JobError, JobHandler, JobOutput, Registry, SchedConfig,
};
use crate::store::{Store, StoreError};

/// The job kind the bench plans (no method claims it).
pub const KIND: &str = "bench-noop";

#[derive(Debug, thiserror::Error)]
pub enum QueueBenchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sched(#[from] sched::SchedError),
    #[error("{0}")]
    Invalid(String),
}

/// One phase's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    pub jobs: usize,
    pub seconds: f64,
    pub jobs_per_sec: f64,
    /// Wall time per job: what one more job adds to a sweep (1000 / jobs_per_sec).
    pub wall_ms_per_job: f64,
    /// Mean time one worker spends on a job's claim and complete (the `queue` phase only).
    pub latency_ms_per_job: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueBench {
    pub workers: usize,
    /// Seconds to record each phase's study (one `register_plan` of `jobs` jobs).
    pub register_seconds: f64,
    pub queue: Phase,
    pub sched: Option<Phase>,
}

/// A study of `jobs` no-op jobs whose name and job ids are new on every call.
fn plan(jobs: usize, phase: &str) -> Plan {
    let nonce = format!("{:08x}{:08x}", std::process::id(), rand::random::<u32>());
    let name = format!("bench-queue-{phase}-{nonce}");
    let jobs: Vec<Job> = (0..jobs)
        .map(|i| {
            JobBuilder {
                kind: KIND,
                version: 1,
                label: format!("noop {i}"),
                params: serde_json::json!({}),
                identity: serde_json::json!({ "bench": nonce, "i": i }),
                deps: Vec::new(),
            }
            .build()
        })
        .collect();
    Plan {
        study: StudyMeta {
            name: name.clone(),
            seed: 0,
            spec_path: "(caf bench queue)".into(),
            spec_text: format!("# caf bench queue: {} no-op jobs\n", jobs.len()),
            spec_sha256: crate::util::sha256_bytes(name.as_bytes()),
            retries: Default::default(),
        },
        jobs,
        cells: Vec::new(),
    }
}

fn phase(jobs: usize, seconds: f64, latency: Option<f64>) -> Phase {
    Phase {
        jobs,
        seconds,
        jobs_per_sec: jobs as f64 / seconds,
        wall_ms_per_job: 1000.0 * seconds / jobs as f64,
        latency_ms_per_job: latency,
    }
}

/// `workers` loops of claim → complete until nothing is left; returns (jobs, summed seconds
/// inside claim+complete).
async fn drain<S: Store>(
    store: &S,
    study: StudyId,
    workers: usize,
) -> Result<(usize, f64), QueueBenchError> {
    let lease = Duration::from_secs(60);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let store = store.clone();
        let me = WorkerId(format!("{}-bench-{w}", sched::worker_id()));
        tasks.spawn(async move {
            let (mut n, mut busy) = (0usize, 0f64);
            let result = serde_json::json!({});
            loop {
                let t = Instant::now();
                let Some(job) = store.claim(study, &me, &[KIND], lease).await? else {
                    break;
                };
                if !store.complete(&job.id, &me, "cpu", &result, 0.0).await? {
                    return Err(QueueBenchError::Invalid(format!(
                        "job {} was claimed twice: its lease was lost",
                        job.id
                    )));
                }
                busy += t.elapsed().as_secs_f64();
                n += 1;
            }
            Ok::<_, QueueBenchError>((n, busy))
        });
    }
    let (mut jobs, mut busy) = (0, 0.0);
    while let Some(r) = tasks.join_next().await {
        let (n, b) = r.map_err(|e| QueueBenchError::Invalid(format!("a worker died: {e}")))??;
        jobs += n;
        busy += b;
    }
    Ok((jobs, busy))
}

struct Noop;

impl JobHandler for Noop {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn run(&self, _: &JobContext) -> Result<JobOutput, JobError> {
        Ok(JobOutput::Done(serde_json::json!({})))
    }
}

/// Runs the bench on `store` (see the module doc); `sched` adds the scheduler phase.
pub async fn bench_queue<S: Store>(
    store: S,
    workers: usize,
    jobs: usize,
    with_sched: bool,
) -> Result<QueueBench, QueueBenchError> {
    if workers == 0 || jobs == 0 {
        return Err(QueueBenchError::Invalid(
            "--workers and --jobs must be at least 1".into(),
        ));
    }
    let t = Instant::now();
    let study = store.register_plan(&plan(jobs, "queue")).await?;
    let register_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (done, busy) = drain(&store, study, workers).await?;
    let seconds = t.elapsed().as_secs_f64();
    if done != jobs {
        return Err(QueueBenchError::Invalid(format!(
            "{done} of {jobs} jobs ran: the queue lost or repeated jobs"
        )));
    }
    let queue = phase(jobs, seconds, Some(1000.0 * busy / jobs as f64));
    let sched = if with_sched {
        let study = store.register_plan(&plan(jobs, "sched")).await?;
        let mut registry = Registry::new();
        registry.register(Arc::new(Noop));
        let cfg = SchedConfig {
            workers,
            artifacts_dir: std::env::temp_dir().join("caf-bench-queue"),
            ..SchedConfig::default()
        };
        let t = Instant::now();
        let summary = sched::run_study(
            store.clone(),
            study,
            Arc::new(registry),
            cfg,
            CancelFlag::new(),
            Arc::new(sched::progress::NoProgress),
        )
        .await?;
        let seconds = t.elapsed().as_secs_f64();
        if summary.completed != jobs {
            return Err(QueueBenchError::Invalid(format!(
                "the scheduler completed {} of {jobs} jobs",
                summary.completed
            )));
        }
        Some(phase(jobs, seconds, None))
    } else {
        None
    };
    Ok(QueueBench {
        workers,
        register_seconds,
        queue,
        sched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    /// Every job is claimed and completed exactly once by each phase, on a real SQLite file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_job_runs_once_in_both_phases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("b.db"))
            .await
            .expect("open");
        let r = bench_queue(store.clone(), 3, 40, true)
            .await
            .expect("bench");
        assert_eq!(r.queue.jobs, 40);
        assert!(r.queue.jobs_per_sec > 0.0 && r.queue.latency_ms_per_job.unwrap() > 0.0);
        assert_eq!(r.sched.as_ref().map(|p| p.jobs), Some(40));
        let studies = store.studies().await.expect("studies");
        assert_eq!(studies.len(), 2);
        for s in studies {
            let jobs = store.study_jobs(s.id).await.expect("jobs");
            assert_eq!(jobs.len(), 40);
            assert!(jobs
                .iter()
                .all(|j| j.state == crate::store::JobState::Done && j.attempts == 1));
        }
        assert!(bench_queue(store, 0, 1, false).await.is_err());
    }
}
