//! Where a job's results go: certificates, clean predictions and training epochs, keyed by the
//! job they belong to.
//!
//! Why here and not in the scheduler: result rows are what methods produce, so the scheduler
//! hands a running job only progress, events and files, and each handler is built with a
//! [`Results`] for its rows. [`StoreResults`] writes them to any [`Store`] from the handler's
//! blocking thread.

use crate::plan::JobId;
use crate::sched::JobError;
use crate::store::{CertRow, EvalRow, Store};

/// The results a handler records and, on resume, reads back. A fused certification writes
/// rows for its member jobs, so every call names the job.
pub trait Results: Send + Sync {
    fn record_cert(&self, job: &JobId, row: &CertRow) -> Result<(), JobError>;
    /// The image indices `job` has certified.
    fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, JobError>;
    /// Forward passes (n0 + n) of the rows `job` has recorded.
    fn cert_draws(&self, job: &JobId) -> Result<u64, JobError>;
    fn record_eval(&self, job: &JobId, rows: &[EvalRow]) -> Result<(), JobError>;
    /// The image indices `job` has predicted.
    fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, JobError>;
    /// Records (or replaces, on a resumed run) one epoch's metrics of a training job.
    fn record_epoch(
        &self,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<(), JobError>;
}

/// [`Results`] over a [`Store`], bridging the handler's blocking thread to the async store.
pub struct StoreResults<S: Store> {
    store: S,
    handle: tokio::runtime::Handle,
}

impl<S: Store> StoreResults<S> {
    /// `handle` is the runtime the store's pool lives on (the one the scheduler runs on).
    pub fn new(store: S, handle: tokio::runtime::Handle) -> Self {
        Self { store, handle }
    }
}

impl<S: Store> Results for StoreResults<S> {
    fn record_cert(&self, job: &JobId, row: &CertRow) -> Result<(), JobError> {
        self.handle
            .block_on(self.store.record_cert(job, row))
            .map_err(JobError::store)
    }
    fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, JobError> {
        self.handle
            .block_on(self.store.cert_done(job))
            .map_err(JobError::store)
    }
    fn cert_draws(&self, job: &JobId) -> Result<u64, JobError> {
        self.handle
            .block_on(self.store.cert_draws(job))
            .map_err(JobError::store)
    }
    fn record_eval(&self, job: &JobId, rows: &[EvalRow]) -> Result<(), JobError> {
        self.handle
            .block_on(self.store.record_eval(job, rows))
            .map_err(JobError::store)
    }
    fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, JobError> {
        self.handle
            .block_on(self.store.eval_done(job))
            .map_err(JobError::store)
    }
    fn record_epoch(
        &self,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<(), JobError> {
        self.handle
            .block_on(self.store.record_epoch(job, epoch, metrics))
            .map_err(JobError::store)
    }
}
