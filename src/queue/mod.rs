//! The job queue the scheduler works from: leases on runnable jobs and the little a running
//! job reports about itself (progress, events, its files).
//!
//! Why a trait of its own: the scheduler needs a dozen operations of a store that has thirty,
//! and must not learn SQL or result rows. Every backend (`store::SqliteStore`, and
//! [`MemoryQueue`] for the scheduler's tests) implements [`Queue`]; leases are the one
//! coordination mechanism, so a backend only has to make `claim` atomic.

pub mod memory;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::plan::JobId;
pub use memory::MemoryQueue;

/// How many interruptions a job survives before it fails, unless its row says otherwise.
pub const DEFAULT_MAX_INTERRUPTIONS: u32 = crate::spec::DEFAULT_INTERRUPTIONS;

/// The error a job that reached its interruption cap fails with.
pub fn interruption_cap_error(reason: &str, cap: u32) -> String {
    format!(
        "interrupted {cap} times (the cap), the last time: {reason}; the job never finished \
         within one allocation: give workers a longer walltime or make the job smaller, then \
         `caf retry`"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StudyId(pub i64);

/// A worker process (or one of its slots) holding leases.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct WorkerId(pub String);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a worker process is: what `caf status` shows of it and what a finished job records of
/// the machine that produced it (floating-point training results differ between CPU models).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WorkerInfo {
    pub host: String,
    pub pid: u32,
    /// The CPU model (`/proc/cpuinfo`'s `model name`).
    pub cpu: String,
    /// Where its jobs run: `cpu` or `cuda:N`.
    pub device: String,
    /// `SLURM_JOB_ID`, `SLURM_ARRAY_JOB_ID` and `SLURM_ARRAY_TASK_ID` when Slurm started it.
    pub slurm_job_id: Option<String>,
    pub slurm_array_job_id: Option<String>,
    pub slurm_array_task_id: Option<String>,
    /// The studies it works on.
    pub studies: Vec<StudyId>,
}

/// A job's lease as its holder names it: every write a running job makes (results, progress,
/// files) carries it, and a backend records nothing unless `worker` still holds `job`. A fused
/// certification writes rows for its member jobs under its own lease.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job: JobId,
    pub worker: WorkerId,
}

/// A job's lifecycle. Retries go back to `Pending` with a backoff; `Failed` is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    /// `None` for a string no caf writes (a corrupt row); the backend names the problem.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(JobState::Pending),
            "running" => Some(JobState::Running),
            "done" => Some(JobState::Done),
            "failed" => Some(JobState::Failed),
            _ => None,
        }
    }
}

/// A job handed to a worker under a lease.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: JobId,
    pub kind: String,
    pub label: String,
    pub params: serde_json::Value,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub max_attempts: u32,
}

/// What happened to a failed or interrupted attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to pending; runnable again after the backoff.
    WillRetry,
    /// Out of attempts or interruptions (or not retryable): final.
    Failed,
}

/// A lease that expired because its runner stopped heartbeating: an interruption, like a
/// release, not a failed attempt.
#[derive(Clone, Debug)]
pub struct Abandoned {
    pub id: JobId,
    /// Why the lease was taken back (names the runner).
    pub reason: String,
    pub outcome: FailOutcome,
}

/// A stored artifact (a file a job produced), by content hash.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Artifact {
    pub name: String,
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What the scheduler needs from a backend. Every method that changes a running job names the
/// worker, and does nothing (returns `false` where it can say so) unless that worker still
/// holds the job's lease: a worker that lost its lease can never overwrite its successor.
pub trait Queue: Clone + Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Whether `e` may go away by itself (the server restarting, a network blip, a busy
    /// database): the scheduler and the job's writes then retry with backoff instead of giving
    /// up. The default suits backends that cannot fail.
    fn is_transient(e: &Self::Error) -> bool {
        let _ = e;
        false
    }

    fn register_worker(
        &self,
        worker: &WorkerId,
        info: &WorkerInfo,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Marks the worker stopped (a worker killed outright never says so; its last heartbeat
    /// ages instead).
    fn worker_stopped(
        &self,
        worker: &WorkerId,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The workers registered on `host` that never said they stopped, with their process ids:
    /// the scheduler asks at start-up which of them are gone (see [`Queue::worker_gone`]).
    fn unstopped_workers_on(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Vec<(WorkerId, u32)>, Self::Error>> + Send;
    /// A worker known to have died without a word (its process no longer exists): marks it
    /// stopped at its last sign of life and ends its leases now, so the next
    /// [`Queue::reap_expired`] returns its jobs as interruptions instead of after the lease ran
    /// out (up to `--lease-secs`). Returns how many leases it held.
    fn worker_gone(
        &self,
        worker: &WorkerId,
    ) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// Atomically leases one runnable job of `kinds` (pending, backoff over, every dep done).
    fn claim(
        &self,
        study: StudyId,
        worker: &WorkerId,
        kinds: &[&str],
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Claimed>, Self::Error>> + Send;
    /// Extends a lease; `false` means the lease is lost and the worker must stop the job.
    fn heartbeat(
        &self,
        job: &JobId,
        worker: &WorkerId,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Marks the job done and records the worker's host and CPU and the `device` the job ran
    /// on with it; `false` when the lease was lost meanwhile (nothing recorded).
    fn complete(
        &self,
        job: &JobId,
        worker: &WorkerId,
        device: &str,
        result: &serde_json::Value,
        seconds: f64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Ends an attempt with `error`: back to pending after `retry_after` while attempts remain,
    /// failed for good when `retry_after` is `None` or none remain.
    fn fail(
        &self,
        job: &JobId,
        worker: &WorkerId,
        error: &str,
        retry_after: Option<Duration>,
        seconds: f64,
    ) -> impl Future<Output = Result<FailOutcome, Self::Error>> + Send;
    /// Gives a lease back as an interruption (the worker was told to stop): the attempt is not
    /// counted, the job's interruptions are; `Failed` (with `reason` and the cap in its error)
    /// once they reach the job's cap, so a job that never fits in one allocation ends.
    fn release(
        &self,
        job: &JobId,
        worker: &WorkerId,
        reason: &str,
        seconds: f64,
    ) -> impl Future<Output = Result<FailOutcome, Self::Error>> + Send;
    /// Returns expired leases to pending as interruptions (failing those at their cap).
    fn reap_expired(&self) -> impl Future<Output = Result<Vec<Abandoned>, Self::Error>> + Send;
    /// Counts of the study's jobs that are running, or pending and still able to run.
    fn outstanding(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<(u64, u64), Self::Error>> + Send;
    /// `false` when the lease was lost (nothing recorded).
    fn set_progress(
        &self,
        lease: &Lease,
        done: u64,
        total: u64,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    fn log_event(
        &self,
        job: Option<&JobId>,
        worker: Option<&WorkerId>,
        level: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Records a file of the leased job; `false` when the lease was lost (nothing recorded).
    fn record_artifact(
        &self,
        lease: &Lease,
        artifact: &Artifact,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// The artifact `name` of `job`, if recorded.
    fn artifact(
        &self,
        job: &JobId,
        name: &str,
    ) -> impl Future<Output = Result<Option<Artifact>, Self::Error>> + Send;
}
