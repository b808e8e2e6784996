//! Persistent state of studies, jobs, leases and results, behind one [`Store`] interface.
//!
//! The scheduler only sees claim / heartbeat / complete / fail / release: leases are the one
//! coordination mechanism, so the same interface can be implemented over PostgreSQL with
//! `SELECT … FOR UPDATE SKIP LOCKED`. All SQL lives in the backend modules; rows are mapped to
//! the plain types below so no sqlx type leaks out.

pub mod sqlite;

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::plan::{JobId, Plan};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "database {path} was written by a newer caf: its schema has migration {version}, which \
         this build does not know (its newest is {known}); open it with that caf or a later one"
    )]
    NewerSchema {
        path: String,
        version: i64,
        known: i64,
    },
    #[error("migrating the database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error while {context}: {source}")]
    Query {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("corrupt value in the store: {0}")]
    Corrupt(String),
}

/// Extension to attach what the store was doing to a sqlx error.
pub(crate) trait QueryContext<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> QueryContext<T> for Result<T, sqlx::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| match source {
            sqlx::Error::RowNotFound => StoreError::NotFound(context.to_string()),
            source => StoreError::Query { context, source },
        })
    }
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
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(JobState::Pending),
            "running" => Ok(JobState::Running),
            "done" => Ok(JobState::Done),
            "failed" => Ok(JobState::Failed),
            other => Err(StoreError::Corrupt(format!("unknown job status `{other}`"))),
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

/// What happened to a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back to pending; runnable again after the backoff.
    WillRetry,
    /// Out of attempts (or not retryable): final.
    Failed,
}

/// A lease that expired because its runner stopped heartbeating.
#[derive(Clone, Debug)]
pub struct Abandoned {
    pub id: JobId,
    /// Why the lease was taken back (names the runner).
    pub reason: String,
    pub outcome: FailOutcome,
}

/// One certified image, as stored (Cohen's columns plus the counts behind the bound).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CertRow {
    pub idx: u64,
    pub label: u32,
    /// -1 = abstain.
    pub predict: i64,
    pub radius: f64,
    pub correct: bool,
    pub c_hat: u32,
    pub n_a: u64,
    pub n: u64,
    pub n0: u64,
    pub alpha: f64,
    pub sigma: f64,
    pub seconds: f64,
}

/// One clean-accuracy prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalRow {
    pub idx: u64,
    pub label: u32,
    pub predict: u32,
}

/// A job as `caf status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    pub id: JobId,
    pub kind: String,
    pub label: String,
    pub state: JobState,
    /// True for a pending job that can never run because a dependency failed.
    pub blocked: bool,
    pub attempts: u32,
    pub max_attempts: u32,
    pub progress_done: u64,
    pub progress_total: u64,
    pub run_seconds: f64,
    /// Compute seconds spent on the recorded per-image results (for throughput and ETA).
    pub work_seconds: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    pub lease_owner: Option<String>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    /// The arithmetic the job's model runs in: `f32`, or `bf16` where the job asked for it.
    pub precision: String,
}

impl JobStatus {
    /// A training job (kinds `train-*`): its progress counts epochs, recorded with their metrics.
    pub fn is_training(&self) -> bool {
        self.kind.starts_with("train-")
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct StudyInfo {
    pub id: StudyId,
    pub name: String,
    pub seed: u64,
    pub spec_path: String,
    pub spec_sha256: String,
    pub spec_text: String,
}

/// One result job of one grid cell (see [`crate::plan::CellRecord`]).
#[derive(Clone, Debug, Serialize)]
pub struct CellRow {
    pub cell: usize,
    pub job: JobId,
    pub method: String,
    pub kind: String,
    pub sigma: Option<f64>,
    pub trained_sigma: Option<f64>,
    pub values: std::collections::BTreeMap<String, serde_json::Value>,
    pub state: JobState,
}

/// A stored artifact (a file a job produced), by content hash.
#[derive(Clone, Debug, Serialize)]
pub struct Artifact {
    pub name: String,
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// Everything the scheduler, the CLI and reports need from a backend.
pub trait Store: Clone + Send + Sync + 'static {
    /// Records the study's current spec revision and upserts its jobs (existing results are kept).
    fn register_plan(
        &self,
        plan: &Plan,
    ) -> impl Future<Output = Result<StudyId, StoreError>> + Send;
    /// Resets failed jobs of the study to pending with fresh attempts.
    fn retry_failed(&self, study: StudyId) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn register_worker(
        &self,
        worker: &WorkerId,
        host: &str,
        pid: u32,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Atomically leases one runnable job of `kinds` (pending, backoff over, every dep done).
    fn claim(
        &self,
        study: StudyId,
        worker: &WorkerId,
        kinds: &[&str],
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Claimed>, StoreError>> + Send;
    /// Extends a lease; `false` means the lease is lost and the worker must stop the job.
    fn heartbeat(
        &self,
        job: &JobId,
        worker: &WorkerId,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn complete(
        &self,
        job: &JobId,
        worker: &WorkerId,
        result: &serde_json::Value,
        seconds: f64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn fail(
        &self,
        job: &JobId,
        worker: &WorkerId,
        error: &str,
        retry_after: Option<Duration>,
        seconds: f64,
    ) -> impl Future<Output = Result<FailOutcome, StoreError>> + Send;
    /// Gives a lease back without counting the attempt (clean shutdown).
    fn release(
        &self,
        job: &JobId,
        worker: &WorkerId,
        seconds: f64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Returns expired leases to pending (or fails them when out of attempts).
    fn reap_expired(&self) -> impl Future<Output = Result<Vec<Abandoned>, StoreError>> + Send;
    /// Counts of the study's jobs that are running, or pending and still able to run.
    fn outstanding(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<(u64, u64), StoreError>> + Send;
    fn set_progress(
        &self,
        job: &JobId,
        done: u64,
        total: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn record_cert(
        &self,
        job: &JobId,
        row: &CertRow,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn cert_done(&self, job: &JobId) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    fn record_eval(
        &self,
        job: &JobId,
        rows: &[EvalRow],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn eval_done(&self, job: &JobId) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    fn record_artifact(
        &self,
        job: &JobId,
        artifact: &Artifact,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The artifact `name` of `job`, if recorded.
    fn artifact(
        &self,
        job: &JobId,
        name: &str,
    ) -> impl Future<Output = Result<Option<Artifact>, StoreError>> + Send;
    /// Records (or replaces, on a resumed run) one epoch's metrics of a training job.
    fn record_epoch(
        &self,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A training job's per-epoch metrics in epoch order.
    fn epochs(
        &self,
        job: &JobId,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, StoreError>> + Send;
    fn log_event(
        &self,
        job: Option<&JobId>,
        worker: Option<&WorkerId>,
        level: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    fn studies(&self) -> impl Future<Output = Result<Vec<StudyInfo>, StoreError>> + Send;
    fn study_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<StudyInfo, StoreError>> + Send;
    fn study_jobs(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<Vec<JobStatus>, StoreError>> + Send;
    /// Adds externally produced per-image results (a published certification log) to study
    /// `study` (created if missing) as one finished job with its own cell, in a new revision
    /// of the study that keeps everything else. Importing the same job again changes nothing.
    fn import_results(
        &self,
        study: &str,
        job: &crate::plan::Job,
        cell: &crate::plan::CellRecord,
        rows: &[CertRow],
    ) -> impl Future<Output = Result<StudyId, StoreError>> + Send;
    /// The grid cells of the study's current revision with their result jobs (empty for a
    /// study last planned by a caf older than this table).
    fn study_cells(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<Vec<CellRow>, StoreError>> + Send;
    /// Per-image certification results of the study's jobs, sorted by job id then idx.
    fn study_cert_results(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<Vec<(JobId, CertRow)>, StoreError>> + Send;
}
