//! The scheduler: claims runnable jobs of one study under leases, runs them on worker slots,
//! renews leases while they run, and records every outcome.
//!
//! It knows jobs only as `(kind, params JSON, attempt, lease)` and a backend only as a
//! [`Queue`]; what a kind does lives in a [`JobHandler`] registered in a [`Registry`], so new
//! job kinds and new backends never touch this module. Handlers are synchronous (candle work
//! is CPU-bound) and run on tokio's blocking pool; they report progress, events and files
//! through a blocking [`JobSink`] (their result rows go wherever the handler was built to send
//! them) and poll [`JobContext::cancelled`] between units of work to stop cleanly.

pub mod progress;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::plan::JobId;
use crate::queue::{Artifact, Claimed, FailOutcome, Queue, StudyId, WorkerId};
pub use progress::{LogProgress, Progress, TerminalProgress};

/// Where jobs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        let ordinal = s
            .strip_prefix("cuda:")
            .or(if s == "cuda" { Some("0") } else { None });
        match ordinal.map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => Err(format!("unknown device `{s}` (expected cpu or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The candle device; fails with a clear message when caf was built without `--features cuda`.
    pub fn open(self) -> Result<candle_core::Device, candle_core::Error> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n),
        }
    }
}

/// The devices a worker runs jobs on: `cpu`, `cuda` (every GPU this process can see, which
/// respects `CUDA_VISIBLE_DEVICES`), `cuda:N`, or a list such as `cuda:0,cuda:2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList(pub Vec<DeviceSpec>);

impl std::str::FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "cuda" {
            return visible_cuda_devices().map(DeviceList);
        }
        let mut list = Vec::new();
        for part in s.split(',') {
            let d: DeviceSpec = part.trim().parse()?;
            if list.contains(&d) {
                return Err(format!("device `{d}` is listed twice in `{s}`"));
            }
            list.push(d);
        }
        if list.len() > 1 && list.contains(&DeviceSpec::Cpu) {
            return Err(format!(
                "`{s}`: list GPUs only (cuda:0,cuda:2); the CPU runs alone"
            ));
        }
        Ok(DeviceList(list))
    }
}

impl std::fmt::Display for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&names.join(","))
    }
}

/// `cuda:0 … cuda:N−1` for the GPUs this process can see: the entries of `CUDA_VISIBLE_DEVICES`
/// where it is set (the driver renumbers them from 0), else as many as the driver opens.
pub fn visible_cuda_devices() -> Result<Vec<DeviceSpec>, String> {
    let count = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => parse_visible_devices(&v),
        Err(_) => (0..)
            .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
            .count(),
    };
    if count == 0 {
        return Err(
            "`--device cuda` found no GPU (CUDA_VISIBLE_DEVICES is empty, no driver, or caf \
             was built without `--features cuda`)"
                .to_string(),
        );
    }
    Ok((0..count).map(DeviceSpec::Cuda).collect())
}

/// How many GPUs a `CUDA_VISIBLE_DEVICES` value shows: its entries up to the first invalid
/// one (`-1`, an empty entry), as the driver reads it.
pub fn parse_visible_devices(v: &str) -> usize {
    v.split(',')
        .map(str::trim)
        .take_while(|e| !e.is_empty() && !e.starts_with('-'))
        .count()
}

/// Whether a job's error is the GPU running out of memory (cuBLAS, the driver and candle's
/// allocator each word it their own way).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("out_of_memory") || m.contains("alloc_failed")
}

/// An out-of-memory failure: said plainly, with what to change, and retried with the same
/// settings only once (a second failure is the batch, not a neighbour's transient use).
fn out_of_memory_failure(message: &str, attempt: u32) -> (String, bool) {
    (
        format!(
            "{message} (the GPU ran out of memory: use a smaller `batch`, or fewer \
             --slots-per-device)"
        ),
        attempt <= 1,
    )
}

/// A cooperative stop signal shared by the scheduler and a running job.
#[derive(Clone, Default, Debug)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A handler's failure. `retryable` failures go back to the queue with backoff (until the job
/// runs out of attempts); others fail the job at once (bad parameters, missing files).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub retryable: bool,
}

impl JobError {
    pub fn fatal(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
        }
    }
    pub fn retryable(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
        }
    }
    /// The store failed under a running job: worth another attempt, since the job resumes from
    /// what it recorded.
    pub fn store(e: impl std::fmt::Display) -> Self {
        Self::retryable(format!("store: {e}"))
    }
}

/// How a handler ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutput {
    /// Finished; the JSON summary is stored with the job.
    Done(serde_json::Value),
    /// Stopped at a clean point because [`JobContext::cancelled`] turned true; the work so far
    /// is recorded and the next run continues from it.
    Interrupted,
}

/// What a running job reports about itself, from its blocking thread. A failing backend is a
/// retryable [`JobError`]: the job resumes from what it recorded.
pub trait JobSink: Send + Sync {
    fn progress(&self, done: u64, total: u64) -> Result<(), JobError>;
    fn event(&self, level: &str, message: &str) -> Result<(), JobError>;
    /// Records a file this job produced.
    fn artifact(&self, artifact: &Artifact) -> Result<(), JobError>;
    /// An artifact of a job this one depends on (e.g. trained weights).
    fn dep_artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, JobError>;
}

/// Everything a handler may use while it runs one job.
pub struct JobContext {
    pub id: JobId,
    pub kind: String,
    pub label: String,
    pub params: serde_json::Value,
    pub attempt: u32,
    pub device: DeviceSpec,
    /// A directory for this job's files (created on demand by the handler).
    pub artifacts_dir: PathBuf,
    pub sink: Arc<dyn JobSink>,
    cancel: CancelFlag,
}

impl JobContext {
    /// True once the run is shutting down or the lease was lost: stop at the next clean point.
    pub fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// What one job kind does.
pub trait JobHandler: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    fn run(&self, ctx: &JobContext) -> Result<JobOutput, JobError>;
}

/// Job kind → handler.
#[derive(Default, Clone)]
pub struct Registry {
    handlers: BTreeMap<&'static str, Arc<dyn JobHandler>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, handler: Arc<dyn JobHandler>) {
        self.handlers.insert(handler.kind(), handler);
    }
    pub fn kinds(&self) -> Vec<&'static str> {
        self.handlers.keys().copied().collect()
    }
    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(kind).cloned()
    }
}

/// How long a failed attempt waits before the job may run again: `first`, doubling with each
/// attempt, never more than `max`. Scheduler policy, so every backend retries alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// The wait after attempt `attempt` (1 for the first) failed.
    pub fn after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.first.saturating_mul(1u32 << doublings).min(self.max)
    }
}

#[derive(Clone, Debug)]
pub struct SchedConfig {
    /// Concurrent job slots per device (on the CPU: in this process).
    pub workers: usize,
    /// Every device gets `workers` slots; each job runs on the device of the slot it took.
    pub devices: Vec<DeviceSpec>,
    /// A lease not renewed for this long is taken back and the job re-run.
    pub lease: Duration,
    /// How often a running job renews its lease.
    pub heartbeat: Duration,
    /// How long to wait before looking for work again when nothing is claimable.
    pub poll: Duration,
    pub backoff: Backoff,
    pub artifacts_dir: PathBuf,
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            devices: vec![DeviceSpec::Cpu],
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_secs(10),
            poll: Duration::from_millis(500),
            backoff: Backoff::default(),
            artifacts_dir: PathBuf::from("runs/artifacts"),
        }
    }
}

/// What a `run` did, for the exit status and the closing message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub completed: usize,
    pub failed: usize,
    pub retried: usize,
    /// Jobs handed back because of a shutdown request.
    pub interrupted: usize,
    pub shutdown_requested: bool,
}

/// The backend failed while the scheduler itself (not a job) talked to it.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error("job queue: {0}")]
    Queue(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SchedError {
    fn queue(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SchedError::Queue(Box::new(e))
    }
}

/// A unique name for this process's leases.
pub fn worker_id() -> WorkerId {
    let host = hostname();
    let nonce: u32 = rand::random();
    WorkerId(format!("{host}:{}:{nonce:08x}", std::process::id()))
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs the study's jobs until none is left to run here, or until `shutdown` is set.
pub async fn run_study<Q: Queue>(
    store: Q,
    study: StudyId,
    registry: Arc<Registry>,
    cfg: SchedConfig,
    shutdown: CancelFlag,
    progress: Arc<dyn Progress>,
) -> Result<RunSummary, SchedError> {
    let worker = worker_id();
    store
        .register_worker(&worker, &hostname(), std::process::id())
        .await
        .map_err(SchedError::queue)?;
    store
        .log_event(None, Some(&worker), "info", "worker started")
        .await
        .map_err(SchedError::queue)?;
    let kinds = registry.kinds();
    let mut summary = RunSummary::default();
    let devices = if cfg.devices.is_empty() {
        vec![DeviceSpec::Cpu]
    } else {
        cfg.devices.clone()
    };
    // Jobs running on each device, by index into `devices`.
    let mut busy = vec![0usize; devices.len()];
    let mut running: JoinSet<(usize, JobId, String, Result<Outcome, SchedError>)> = JoinSet::new();
    loop {
        for a in store.reap_expired().await.map_err(SchedError::queue)? {
            let what = match a.outcome {
                FailOutcome::WillRetry => "will re-run",
                FailOutcome::Failed => "out of attempts, failed",
            };
            warn!(job = %a.id, "{}; {what}", a.reason);
            store
                .log_event(
                    Some(&a.id),
                    Some(&worker),
                    "warn",
                    &format!("{}; {what}", a.reason),
                )
                .await
                .map_err(SchedError::queue)?;
        }
        while !shutdown.is_cancelled() {
            // The least busy device with a free slot (the first on ties).
            let Some(slot) = (0..devices.len())
                .filter(|&i| busy[i] < cfg.workers.max(1))
                .min_by_key(|&i| busy[i])
            else {
                break;
            };
            let Some(job) = store
                .claim(study, &worker, &kinds, cfg.lease)
                .await
                .map_err(SchedError::queue)?
            else {
                break;
            };
            let Some(handler) = registry.get(&job.kind) else {
                // claim() only returns registered kinds; this guards against a racing registry change.
                store
                    .fail(
                        &job.id,
                        &worker,
                        &format!("no handler for job kind `{}`", job.kind),
                        None,
                        0.0,
                    )
                    .await
                    .map_err(SchedError::queue)?;
                continue;
            };
            progress.job_started(&job.id, &job.label);
            let (id, label) = (job.id.clone(), job.label.clone());
            let fut = run_one(
                store.clone(),
                worker.clone(),
                job,
                handler,
                cfg.clone(),
                devices[slot],
                shutdown.clone(),
                progress.clone(),
            );
            busy[slot] += 1;
            running.spawn(async move { (slot, id, label, fut.await) });
        }
        if running.is_empty() {
            if shutdown.is_cancelled() {
                break;
            }
            let (others_running, pending) =
                store.outstanding(study).await.map_err(SchedError::queue)?;
            if others_running == 0 && pending == 0 {
                break;
            }
            // Work remains but none is claimable now: other processes hold it, a dependency is
            // still running elsewhere, or a retry is backing off.
            tokio::time::sleep(cfg.poll).await;
            continue;
        }
        tokio::select! {
            joined = running.join_next() => {
                if let Some(joined) = joined {
                    let (slot, id, label, outcome) = match joined {
                        Ok(v) => v,
                        Err(e) => {
                            // The slot's device is unknown here; free the busiest one so the
                            // worker keeps its capacity.
                            warn!("a job task ended abnormally: {e}");
                            if let Some(i) = (0..busy.len()).max_by_key(|&i| busy[i]) {
                                busy[i] = busy[i].saturating_sub(1);
                            }
                            continue;
                        }
                    };
                    busy[slot] = busy[slot].saturating_sub(1);
                    let outcome = outcome?;
                    progress.job_finished(&id, &label, &outcome.describe());
                    match outcome {
                        Outcome::Completed => summary.completed += 1,
                        Outcome::Failed(_) => summary.failed += 1,
                        Outcome::Retrying(_) => summary.retried += 1,
                        Outcome::Released | Outcome::LeaseLost => summary.interrupted += 1,
                    }
                }
            }
            _ = tokio::time::sleep(cfg.poll) => {}
        }
    }
    summary.shutdown_requested = shutdown.is_cancelled();
    store
        .log_event(None, Some(&worker), "info", "worker stopped")
        .await
        .map_err(SchedError::queue)?;
    Ok(summary)
}

/// The end of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Retrying(String),
    Failed(String),
    /// Handed back on shutdown without counting the attempt.
    Released,
    /// Another worker took the job over; nothing recorded by us.
    LeaseLost,
}

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Outcome::Completed => "done".into(),
            Outcome::Retrying(e) => format!("failed, will retry: {e}"),
            Outcome::Failed(e) => format!("FAILED: {e}"),
            Outcome::Released => "interrupted (progress saved)".into(),
            Outcome::LeaseLost => "lease lost to another worker".into(),
        }
    }
}

async fn run_one<Q: Queue>(
    store: Q,
    worker: WorkerId,
    job: Claimed,
    handler: Arc<dyn JobHandler>,
    cfg: SchedConfig,
    device: DeviceSpec,
    shutdown: CancelFlag,
    progress: Arc<dyn Progress>,
) -> Result<Outcome, SchedError> {
    let span =
        tracing::info_span!("job", id = %job.id, kind = %job.kind, attempt = job.attempt, %device);
    async move {
        info!(label = %job.label, "started");
        store
            .log_event(
                Some(&job.id),
                Some(&worker),
                "info",
                &format!("attempt {} started on {device}", job.attempt),
            )
            .await
            .map_err(SchedError::queue)?;
        let started = Instant::now();
        let cancel = CancelFlag::new();
        let lease_lost = CancelFlag::new();
        let sink = Arc::new(QueueSink {
            store: store.clone(),
            job: job.id.clone(),
            worker: worker.clone(),
            handle: tokio::runtime::Handle::current(),
            progress: progress.clone(),
        });
        let ctx = JobContext {
            id: job.id.clone(),
            kind: job.kind.clone(),
            label: job.label.clone(),
            params: job.params.clone(),
            attempt: job.attempt,
            device,
            artifacts_dir: cfg.artifacts_dir.join(job.id.as_str()),
            sink,
            cancel: cancel.clone(),
        };
        let keeper = tokio::spawn(keep_lease(
            store.clone(),
            job.id.clone(),
            worker.clone(),
            cfg.clone(),
            shutdown.clone(),
            cancel.clone(),
            lease_lost.clone(),
        ));
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            handler.run(&ctx)
        })
        .await;
        keeper.abort();
        let seconds = started.elapsed().as_secs_f64();
        if lease_lost.is_cancelled() {
            warn!("lease lost; another worker owns this job now");
            return Ok(Outcome::LeaseLost);
        }
        let outcome = match result {
            Ok(Ok(JobOutput::Done(summary))) => {
                if store
                    .complete(&job.id, &worker, &summary, seconds)
                    .await
                    .map_err(SchedError::queue)?
                {
                    info!(seconds, "done");
                    Outcome::Completed
                } else {
                    Outcome::LeaseLost
                }
            }
            Ok(Ok(JobOutput::Interrupted)) => {
                store
                    .release(&job.id, &worker, seconds)
                    .await
                    .map_err(SchedError::queue)?;
                info!("interrupted; progress is saved");
                Outcome::Released
            }
            Ok(Err(e)) => {
                let (message, retryable) = if is_out_of_memory(&e.message) {
                    out_of_memory_failure(&e.message, job.attempt)
                } else {
                    (e.message.clone(), e.retryable)
                };
                record_failure(&store, &job, &worker, &cfg, &message, retryable, seconds).await?
            }
            Err(join) => {
                let msg = if join.is_panic() {
                    format!("the job panicked: {}", panic_message(join))
                } else {
                    "the job was aborted".into()
                };
                record_failure(&store, &job, &worker, &cfg, &msg, true, seconds).await?
            }
        };
        store
            .log_event(Some(&job.id), Some(&worker), "info", &outcome.describe())
            .await
            .map_err(SchedError::queue)?;
        Ok(outcome)
    }
    .instrument(span)
    .await
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into()),
        Err(_) => "unknown".into(),
    }
}

async fn record_failure<Q: Queue>(
    store: &Q,
    job: &Claimed,
    worker: &WorkerId,
    cfg: &SchedConfig,
    msg: &str,
    retryable: bool,
    seconds: f64,
) -> Result<Outcome, SchedError> {
    let retry_after = retryable.then(|| cfg.backoff.after(job.attempt));
    let msg = format!("attempt {}/{}: {msg}", job.attempt, job.max_attempts);
    Ok(
        match store
            .fail(&job.id, worker, &msg, retry_after, seconds)
            .await
            .map_err(SchedError::queue)?
        {
            FailOutcome::WillRetry => {
                warn!("{msg}; will retry");
                Outcome::Retrying(msg)
            }
            FailOutcome::Failed => {
                warn!("{msg}; giving up");
                Outcome::Failed(msg)
            }
        },
    )
}

/// Renews the lease until the job ends; forwards a shutdown request to the job; stops the job
/// if the lease is lost (another worker will, or already did, take it over).
async fn keep_lease<Q: Queue>(
    store: Q,
    job: JobId,
    worker: WorkerId,
    cfg: SchedConfig,
    shutdown: CancelFlag,
    cancel: CancelFlag,
    lease_lost: CancelFlag,
) {
    let tick = Duration::from_millis(100);
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if shutdown.is_cancelled() {
            cancel.cancel();
        }
        if last.elapsed() >= cfg.heartbeat {
            last = Instant::now();
            match store.heartbeat(&job, &worker, cfg.lease).await {
                Ok(true) => {}
                Ok(false) => {
                    lease_lost.cancel();
                    cancel.cancel();
                    return;
                }
                // A busy database is transient: keep trying until the lease would run out.
                Err(e) => warn!("heartbeat failed: {e}"),
            }
        }
    }
}

/// [`JobSink`] over a [`Queue`], bridging the handler's blocking thread to the async backend.
struct QueueSink<Q: Queue> {
    store: Q,
    job: JobId,
    worker: WorkerId,
    handle: tokio::runtime::Handle,
    progress: Arc<dyn Progress>,
}

impl<Q: Queue> JobSink for QueueSink<Q> {
    fn progress(&self, done: u64, total: u64) -> Result<(), JobError> {
        self.progress.job_progress(&self.job, done, total);
        self.handle
            .block_on(self.store.set_progress(&self.job, done, total))
            .map_err(JobError::store)
    }
    fn event(&self, level: &str, message: &str) -> Result<(), JobError> {
        self.handle
            .block_on(
                self.store
                    .log_event(Some(&self.job), Some(&self.worker), level, message),
            )
            .map_err(JobError::store)
    }
    fn artifact(&self, artifact: &Artifact) -> Result<(), JobError> {
        self.handle
            .block_on(self.store.record_artifact(&self.job, artifact))
            .map_err(JobError::store)
    }
    fn dep_artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, JobError> {
        self.handle
            .block_on(self.store.artifact(job, name))
            .map_err(JobError::store)
    }
}

#[cfg(test)]
mod tests;
