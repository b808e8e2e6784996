//! Persistent state of studies, jobs, leases and results, behind one [`Store`] interface.
//!
//! Two backends: [`SqliteStore`] (one file, several processes on one host) and [`PgStore`]
//! (a PostgreSQL server many hosts share). [`open`] picks one from a `--db` value and returns
//! an [`AnyStore`] that delegates to it.
//!
//! A store is a [`Queue`] (the scheduler's narrow view: leases, progress, events, files) plus
//! what planning, methods' results and reports need. All SQL lives in the backend modules;
//! rows are mapped to the plain types below so no sqlx type leaks out. The store knows no job
//! kinds: what a job's progress counts comes with the plan ([`ProgressUnit`]), and imported
//! results are marked as such when they are imported.

pub mod any;
pub mod copy;
#[cfg(test)]
mod copy_tests;
mod liveness;
mod migrations;
pub mod postgres;
mod rows;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::future::Future;

use serde::Serialize;

use crate::plan::{JobId, Plan, ProgressUnit};
pub use crate::queue::{
    Abandoned, Artifact, Claimed, FailOutcome, JobState, Lease, Queue, StudyId, WorkerId,
    WorkerInfo,
};
pub use any::{open, open_with, AnyStore, DbLocation};

/// Pooled connections per process unless the caller asks otherwise (see [`open_with`]): a
/// process claims, heartbeats and records results, a handful of statements at a time, and a
/// cluster's workers share one server's connection limit.
pub const DEFAULT_CONNECTIONS: u32 = 4;
pub use copy::{CopyOutcome, StudyDump};
pub use postgres::PgStore;
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
    /// A copy that would overwrite different content (see [`copy`]).
    #[error("{0}")]
    Conflict(String),
    /// A `--db` value that names no database (see [`DbLocation::parse`]).
    #[error("database location: {0}")]
    BadLocation(String),
}

impl StoreError {
    /// Whether the error may go away by itself: the server unreachable or restarting, a
    /// connection dropped, the pool out of connections for a while, a busy or locked SQLite
    /// file, a serialization failure. Anything about the data or the schema is not.
    pub fn is_transient(&self) -> bool {
        let source = match self {
            StoreError::Query { source, .. } | StoreError::Open { source, .. } => source,
            _ => return false,
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => {
                let code = d.code().map(|c| c.to_string()).unwrap_or_default();
                // PostgreSQL: 08 connection exceptions, 57P0x shutdown/starting up, 53300 too
                // many connections, 40001/40P01 serialization failure/deadlock.
                let pg = code.starts_with("08")
                    || code.starts_with("57P0")
                    || matches!(code.as_str(), "53300" | "40001" | "40P01");
                let msg = d.message().to_lowercase();
                pg || msg.contains("database is locked") || msg.contains("database is busy")
            }
            _ => false,
        }
    }
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
    /// What a sequential certification adds; `None` for Cohen's fixed-n rows, whose `n` is
    /// the fixed sample size (a sequential row's `n` is the draws it used, τ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<SequentialRow>,
}

/// The columns of a sequential certificate beyond Cohen's: with (c_hat, n_a, n, alpha, sigma)
/// of its [`CertRow`] they recompute it (`crate::certify::sequential_certificate_from_counts`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SequentialRow {
    pub n_max: u64,
    /// L_τ and U_τ of the mixture confidence sequence.
    pub lower: f64,
    pub upper: f64,
    /// The Beta(a, b) mixing prior.
    pub prior_a: f64,
    pub prior_b: f64,
    pub radii: Vec<f64>,
    /// One per radius.
    pub decisions: Vec<crate::certify::sequential::Decision>,
    /// `stop_if_wrong` stopped the run after selection (ĉ ≠ label, no estimation draws).
    pub stopped_wrong: bool,
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
    /// Times a worker was stopped (signal, lost lease) while running the job; not attempts.
    pub interruptions: u32,
    pub max_interruptions: u32,
    /// The machine that produced a finished job's results.
    pub ran_host: Option<String>,
    pub ran_cpu: Option<String>,
    pub ran_device: Option<String>,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    /// The arithmetic the job's model runs in: `f32`, or `bf16` where the job asked for it.
    pub precision: String,
    /// What `progress_done`/`progress_total` count.
    pub unit: ProgressUnit,
}

impl JobStatus {
    /// A training job: its progress counts epochs, recorded with their metrics.
    pub fn is_training(&self) -> bool {
        self.unit == ProgressUnit::Epochs
    }
}

/// A worker process as `caf status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerRow {
    pub id: String,
    #[serde(flatten)]
    pub info: WorkerInfo,
    pub started_at: f64,
    /// Its last heartbeat (or claim).
    pub last_seen: f64,
    /// When it said it stopped; `None` while it runs, or if it was killed without a word.
    pub stopped_at: Option<f64>,
    /// The jobs whose leases it holds now.
    pub jobs: Vec<JobId>,
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

/// One `sbatch` that `caf submit --slurm` ran for a study: an array of workers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlurmJob {
    /// As `sbatch --parsable` printed it: `ID`, or `ID;CLUSTER` on a federation.
    pub job_id: String,
    pub array_tasks: u64,
    /// The sbatch script it ran.
    pub script: String,
    /// Unix seconds.
    pub submitted_at: f64,
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

/// Everything the CLI, methods' results and reports need from a backend, beyond its queue.
pub trait Store: Queue<Error = StoreError> {
    /// Records the study's current spec revision and upserts its jobs (existing results are kept).
    fn register_plan(
        &self,
        plan: &Plan,
    ) -> impl Future<Output = Result<StudyId, StoreError>> + Send;
    /// Resets failed jobs of the study to pending with fresh attempts.
    fn retry_failed(&self, study: StudyId) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Records a certified image of `job` under `lease` (the running job: `job` itself, or the
    /// fused certification writing for it); `false` when the lease was lost (nothing
    /// recorded). An image already recorded is kept as it is.
    fn record_cert(
        &self,
        lease: &Lease,
        job: &JobId,
        row: &CertRow,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn cert_done(&self, job: &JobId) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    /// Forward passes (n0 + n) the recorded certification rows of `job` spent: what a resumed
    /// sequential job has done, its progress counting draws.
    fn cert_draws(&self, job: &JobId) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// As [`Store::record_cert`], for clean predictions.
    fn record_eval(
        &self,
        lease: &Lease,
        job: &JobId,
        rows: &[EvalRow],
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    fn eval_done(&self, job: &JobId) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    /// Records (or replaces, on a resumed run) one epoch's metrics of a training job; `false`
    /// when the lease was lost (nothing recorded).
    fn record_epoch(
        &self,
        lease: &Lease,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// A training job's per-epoch metrics in epoch order.
    fn epochs(
        &self,
        job: &JobId,
    ) -> impl Future<Output = Result<Vec<serde_json::Value>, StoreError>> + Send;
    /// Every worker that registered, newest first, with the jobs each holds now.
    fn workers(&self) -> impl Future<Output = Result<Vec<WorkerRow>, StoreError>> + Send;
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
    /// Records a Slurm job submitted for the study (recording the same id again changes nothing).
    fn record_slurm_job(
        &self,
        study: StudyId,
        job: &SlurmJob,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The study's Slurm jobs in submission order.
    fn slurm_jobs(
        &self,
        study: StudyId,
    ) -> impl Future<Output = Result<Vec<SlurmJob>, StoreError>> + Send;
    /// Every row of the study `name` (see [`copy`]), read as one consistent state; `None`
    /// when there is no such study.
    fn dump_study(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<StudyDump>, StoreError>> + Send;
    /// Writes a study read from another database in one transaction: refused
    /// ([`StoreError::Conflict`]) when this one holds the study, or one of its jobs, with
    /// different content; nothing written when it holds the same.
    fn load_study(
        &self,
        dump: &StudyDump,
    ) -> impl Future<Output = Result<CopyOutcome, StoreError>> + Send;
}
