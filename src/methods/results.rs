//! Where a job's results go: certificates, clean predictions and training epochs, keyed by the
//! job they belong to.
//!
//! Why here and not in the scheduler: result rows are what methods produce, so the scheduler
//! hands a running job only progress, events and files, and each handler is built with a
//! [`Results`] for its rows. [`StoreResults`] writes them to any [`Store`] from the handler's
//! blocking thread.

use crate::plan::JobId;
use crate::queue::Lease;
use crate::sched::{JobError, StoreRetry};
use crate::store::{CertRow, EvalRow, Store, StoreError};

/// The results a handler records and, on resume, reads back. A fused certification writes
/// rows for its member jobs, so every call names the job, and every write names the lease it
/// runs under (the store records nothing once that lease is lost).
pub trait Results: Send + Sync {
    fn record_cert(&self, lease: &Lease, job: &JobId, row: &CertRow) -> Result<(), JobError>;
    /// The image indices `job` has certified.
    fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, JobError>;
    /// Forward passes (n0 + n) of the rows `job` has recorded.
    fn cert_draws(&self, job: &JobId) -> Result<u64, JobError>;
    fn record_eval(&self, lease: &Lease, job: &JobId, rows: &[EvalRow]) -> Result<(), JobError>;
    /// The image indices `job` has predicted.
    fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, JobError>;
    /// Records (or replaces, on a resumed run) one epoch's metrics of a training job.
    fn record_epoch(
        &self,
        lease: &Lease,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<(), JobError>;
}

/// [`Results`] over a [`Store`], bridging the handler's blocking thread to the async store.
/// Store outages are waited out ([`StoreRetry`]) while the job keeps its place.
pub struct StoreResults<S: Store> {
    store: S,
    handle: tokio::runtime::Handle,
    retry: StoreRetry,
}

impl<S: Store> StoreResults<S> {
    /// `handle` is the runtime the store's pool lives on (the one the scheduler runs on).
    pub fn new(store: S, handle: tokio::runtime::Handle) -> Self {
        Self {
            store,
            handle,
            retry: StoreRetry::default(),
        }
    }

    /// How store outages are retried (the scheduler's setting, so both give up together).
    pub fn with_retry(mut self, retry: StoreRetry) -> Self {
        self.retry = retry;
        self
    }

    fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T, JobError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.handle
            .block_on(self.retry.run::<S, _, _, _>(what, op))
            .map_err(JobError::store)
    }
}

/// A write's answer: `false` means the lease is gone.
fn held(lease: &Lease, written: bool) -> Result<(), JobError> {
    if written {
        Ok(())
    } else {
        Err(JobError::lease_lost(lease))
    }
}

impl<S: Store> Results for StoreResults<S> {
    fn record_cert(&self, lease: &Lease, job: &JobId, row: &CertRow) -> Result<(), JobError> {
        let written = self.run("recording a certification result", || {
            self.store.record_cert(lease, job, row)
        })?;
        held(lease, written)
    }
    fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, JobError> {
        self.run("reading finished images", || self.store.cert_done(job))
    }
    fn cert_draws(&self, job: &JobId) -> Result<u64, JobError> {
        self.run("reading draws spent", || self.store.cert_draws(job))
    }
    fn record_eval(&self, lease: &Lease, job: &JobId, rows: &[EvalRow]) -> Result<(), JobError> {
        let written = self.run("recording evaluation results", || {
            self.store.record_eval(lease, job, rows)
        })?;
        held(lease, written)
    }
    fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, JobError> {
        self.run("reading evaluated images", || self.store.eval_done(job))
    }
    fn record_epoch(
        &self,
        lease: &Lease,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<(), JobError> {
        let written = self.run("recording epoch metrics", || {
            self.store.record_epoch(lease, job, epoch, metrics)
        })?;
        held(lease, written)
    }
}
