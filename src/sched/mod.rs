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
use crate::queue::{Artifact, Claimed, FailOutcome, Lease, Queue, StudyId, WorkerId, WorkerInfo};
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
            // The driver's own error (no GPU, no driver, a build without CUDA) says what failed
            // but not on which device or what to check.
            DeviceSpec::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot open cuda:{n}: {e} (is the GPU visible to this process: \
                     nvidia-smi, CUDA_VISIBLE_DEVICES? was caf built with `--features cuda`?)"
                ))
            }),
        }
    }
}

/// The devices a worker runs jobs on: `cpu`, `cuda` (every GPU the process sees when it
/// starts, which respects `CUDA_VISIBLE_DEVICES`: under Slurm, the GPUs `--gres gpu:N` gave the
/// task), `cuda:N`, or a list such as `cuda:0,cuda:2`. Parsing checks the syntax only, so
/// `caf submit` can pass `cuda` on to workers on nodes it cannot see; [`DeviceList::resolve`]
/// turns it into devices where the worker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceList {
    /// Every visible GPU (`cuda`).
    Visible,
    Listed(Vec<DeviceSpec>),
}

impl DeviceList {
    /// The devices, one entry per device (each gets the worker's slots).
    pub fn resolve(&self) -> Result<Vec<DeviceSpec>, String> {
        match self {
            DeviceList::Visible => visible_cuda_devices(),
            DeviceList::Listed(l) => Ok(l.clone()),
        }
    }
}

impl std::str::FromStr for DeviceList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s == "cuda" {
            return Ok(DeviceList::Visible);
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
        Ok(DeviceList::Listed(list))
    }
}

impl std::fmt::Display for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceList::Visible => f.write_str("cuda"),
            DeviceList::Listed(l) => {
                let names: Vec<String> = l.iter().map(ToString::to_string).collect();
                f.write_str(&names.join(","))
            }
        }
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
    /// A write found the job's lease gone: another worker owns the job now, so this one stops
    /// and records nothing (not a failure of the job).
    pub lease_lost: bool,
}

impl JobError {
    pub fn fatal(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
            lease_lost: false,
        }
    }
    pub fn retryable(message: impl std::fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
            lease_lost: false,
        }
    }
    /// A write was refused because the lease is no longer held.
    pub fn lease_lost(lease: &Lease) -> Self {
        Self {
            message: format!(
                "lease on job {} lost by worker {}: nothing recorded",
                lease.job, lease.worker
            ),
            retryable: false,
            lease_lost: true,
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
    /// The lease the job runs under; every result it writes names it.
    pub lease: Lease,
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

/// How long and how often to retry a store that fails transiently (a PostgreSQL server
/// restarting, a network blip, a busy SQLite file) before giving up. Workers keep their jobs
/// running meanwhile; a lease lost during the outage is detected when the store is back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreRetry {
    pub backoff: Backoff,
    /// Give up (the error reaches the caller) once an operation has failed for this long.
    pub patience: Duration,
}

impl Default for StoreRetry {
    fn default() -> Self {
        Self {
            backoff: Backoff {
                first: Duration::from_millis(250),
                max: Duration::from_secs(10),
            },
            patience: Duration::from_secs(600),
        }
    }
}

impl StoreRetry {
    /// Runs `op` until it succeeds, fails for good (an error `Q::is_transient` rejects), or
    /// has kept failing for `patience`.
    pub async fn run<Q, T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, Q::Error>
    where
        Q: Queue,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Q::Error>>,
    {
        let started = Instant::now();
        let mut failures = 0u32;
        loop {
            match op().await {
                Ok(v) => {
                    if failures > 0 {
                        info!("{what}: the store answers again after {failures} failed tries");
                    }
                    return Ok(v);
                }
                Err(e) if Q::is_transient(&e) && started.elapsed() < self.patience => {
                    failures += 1;
                    let wait = self.backoff.after(failures);
                    warn!("{what}: {e}; retrying in {:.1} s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
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
    pub store_retry: StoreRetry,
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
            store_retry: StoreRetry::default(),
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

/// The CPU model of this machine (`model name` in `/proc/cpuinfo`), or `unknown`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// This process as a worker of `studies` on `devices`, with its Slurm ids when Slurm started it.
pub fn worker_info(devices: &[DeviceSpec], studies: &[StudyId]) -> WorkerInfo {
    let slurm = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    WorkerInfo {
        host: hostname(),
        pid: std::process::id(),
        cpu: cpu_model(),
        device: DeviceList::Listed(devices.to_vec()).to_string(),
        slurm_job_id: slurm("SLURM_JOB_ID"),
        slurm_array_job_id: slurm("SLURM_ARRAY_JOB_ID"),
        slurm_array_task_id: slurm("SLURM_ARRAY_TASK_ID"),
        studies: studies.to_vec(),
    }
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
    run_studies(store, &[study], registry, cfg, shutdown, progress).await
}

/// The worker loop of `caf run` and `caf worker`: claims runnable jobs of `studies` (in that
/// order of preference) on `cfg.workers` slots until nothing is runnable and nothing it could
/// wait on is running, or until `shutdown` is set. Store outages are waited out (see
/// [`StoreRetry`]).
pub async fn run_studies<Q: Queue>(
    store: Q,
    studies: &[StudyId],
    registry: Arc<Registry>,
    cfg: SchedConfig,
    shutdown: CancelFlag,
    progress: Arc<dyn Progress>,
) -> Result<RunSummary, SchedError> {
    let worker = worker_id();
    let retry = cfg.store_retry;
    let devices = if cfg.devices.is_empty() {
        vec![DeviceSpec::Cpu]
    } else {
        cfg.devices.clone()
    };
    let info = worker_info(&devices, studies);
    let span = tracing::info_span!("worker", id = %worker);
    async move {
        let store = &store;
        let worker = &worker;
        retry
            .run::<Q, _, _, _>("registering the worker", || {
                store.register_worker(worker, &info)
            })
            .await
            .map_err(SchedError::queue)?;
        log(store, &retry, None, worker, "info", "worker started").await?;
        take_back_gone_workers(store, &retry, worker, &info.host).await?;
        let kinds = registry.kinds();
        let mut summary = RunSummary::default();
        // Jobs running on each device, by index into `devices`.
        let mut busy = vec![0usize; devices.len()];
        let mut running: JoinSet<(usize, JobId, String, Result<Outcome, SchedError>)> =
            JoinSet::new();
        let mut reaped_at: Option<Instant> = None;
        loop {
            // A lease expires only after `cfg.lease` without a heartbeat, so looking once per
            // poll interval finds it as soon as an idle loop would; before every claim, it was a
            // write per job (a sweep of short jobs spent a tenth of its overhead on it).
            let reap_now = reaped_at.is_none_or(|t| t.elapsed() >= cfg.poll);
            let reaped = if reap_now {
                reaped_at = Some(Instant::now());
                retry
                    .run::<Q, _, _, _>("reaping expired leases", || store.reap_expired())
                    .await
                    .map_err(SchedError::queue)?
            } else {
                Vec::new()
            };
            for a in reaped {
                let what = match a.outcome {
                    FailOutcome::WillRetry => "will re-run",
                    FailOutcome::Failed => "at its interruption cap, failed",
                };
                let message = format!("{}; {what}", a.reason);
                warn!(job = %a.id, "{message}");
                log(store, &retry, Some(&a.id), worker, "warn", &message).await?;
            }
            'slots: while !shutdown.is_cancelled() {
                // The least busy device with a free slot (the first on ties).
                let Some(slot) = (0..devices.len())
                    .filter(|&i| busy[i] < cfg.workers.max(1))
                    .min_by_key(|&i| busy[i])
                else {
                    break 'slots;
                };
                let mut claimed = None;
                for &study in studies {
                    claimed = retry
                        .run::<Q, _, _, _>("claiming a job", || {
                            store.claim(study, worker, &kinds, cfg.lease)
                        })
                        .await
                        .map_err(SchedError::queue)?;
                    if claimed.is_some() {
                        break;
                    }
                }
                let Some(job) = claimed else {
                    break 'slots;
                };
                let Some(handler) = registry.get(&job.kind) else {
                    // claim() only returns registered kinds; this guards against a racing registry change.
                    let error = format!("no handler for job kind `{}`", job.kind);
                    retry
                        .run::<Q, _, _, _>("failing a job", || {
                            store.fail(&job.id, worker, &error, None, 0.0)
                        })
                        .await
                        .map_err(SchedError::queue)?;
                    continue;
                };
                progress.job_started(&job.id, &job.label);
                let (id, label) = (job.id.clone(), job.label.clone());
                let fut = run_one(
                    store.clone(),
                    worker.clone(),
                    Placed {
                        job,
                        device: devices[slot],
                    },
                    handler,
                    cfg.clone(),
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
                let (mut others_running, mut pending) = (0, 0);
                for &study in studies {
                    let (r, p) = retry
                        .run::<Q, _, _, _>("counting outstanding jobs", || store.outstanding(study))
                        .await
                        .map_err(SchedError::queue)?;
                    others_running += r;
                    pending += p;
                }
                if others_running == 0 && pending == 0 {
                    break;
                }
                // Work remains but none is claimable now: other processes hold it, a dependency
                // is still running elsewhere, or a retry is backing off.
                tokio::time::sleep(cfg.poll).await;
                continue;
            }
            tokio::select! {
                joined = running.join_next() => {
                    if let Some(joined) = joined {
                        let (slot, id, label, outcome) = match joined {
                            Ok(v) => v,
                            Err(e) => {
                                // The slot's device is unknown here; free the busiest one so
                                // the worker keeps its capacity.
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
        log(store, &retry, None, worker, "info", "worker stopped").await?;
        retry
            .run::<Q, _, _, _>("recording that the worker stopped", || {
                store.worker_stopped(worker)
            })
            .await
            .map_err(SchedError::queue)?;
        Ok(summary)
    }
    .instrument(span)
    .await
}

/// Ends the leases of workers of this host whose processes no longer exist (killed with
/// SIGKILL, out of memory, the machine restarted), so their jobs run again now rather than
/// after their leases run out: `caf run` after a crash does not wait `--lease-secs`. Only a
/// process missing from this host's process table counts as gone; a worker elsewhere, or one
/// whose pid is taken by another process, keeps its lease until it expires.
async fn take_back_gone_workers<Q: Queue>(
    store: &Q,
    retry: &StoreRetry,
    me: &WorkerId,
    host: &str,
) -> Result<(), SchedError> {
    let here = retry
        .run::<Q, _, _, _>("listing this host's workers", || {
            store.unstopped_workers_on(host)
        })
        .await
        .map_err(SchedError::queue)?;
    for (w, pid) in here {
        if &w == me || !process_gone(pid) {
            continue;
        }
        let ended = retry
            .run::<Q, _, _, _>("ending a gone worker's leases", || store.worker_gone(&w))
            .await
            .map_err(SchedError::queue)?;
        if ended > 0 {
            let message = format!(
                "worker {w} (pid {pid} on this host) is gone without stopping: its {ended} \
                 lease(s) end now"
            );
            warn!("{message}");
            log(store, retry, None, me, "warn", &message).await?;
        }
    }
    Ok(())
}

/// Whether no process `pid` exists on this machine. `false` where that cannot be known (no
/// `/proc`): a lease then ends only when it expires.
pub fn process_gone(pid: u32) -> bool {
    let proc = std::path::Path::new("/proc");
    proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

/// Logs an event of the worker (and job), retrying a store outage.
async fn log<Q: Queue>(
    store: &Q,
    retry: &StoreRetry,
    job: Option<&JobId>,
    worker: &WorkerId,
    level: &str,
    message: &str,
) -> Result<(), SchedError> {
    retry
        .run::<Q, _, _, _>("logging an event", || {
            store.log_event(job, Some(worker), level, message)
        })
        .await
        .map_err(SchedError::queue)
}

/// The end of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    Retrying(String),
    Failed(String),
    /// Handed back on a stop request as an interruption (the attempt is not counted).
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

/// A claimed job and where it runs: the device of the slot it took.
struct Placed {
    job: Claimed,
    device: DeviceSpec,
}

async fn run_one<Q: Queue>(
    store: Q,
    worker: WorkerId,
    Placed { job, device }: Placed,
    handler: Arc<dyn JobHandler>,
    cfg: SchedConfig,
    shutdown: CancelFlag,
    progress: Arc<dyn Progress>,
) -> Result<Outcome, SchedError> {
    let span =
        tracing::info_span!("job", id = %job.id, kind = %job.kind, attempt = job.attempt, %device);
    async move {
        info!(label = %job.label, "started");
        let retry = cfg.store_retry;
        // Routine events cost a store write each, a third of a short job's overhead: the job
        // row already says when its first attempt started and that it finished. Events keep
        // what the row cannot: later attempts, and every end other than success.
        if job.attempt > 1 {
            log(
                &store,
                &retry,
                Some(&job.id),
                &worker,
                "info",
                &format!("attempt {} started on {device}", job.attempt),
            )
            .await?;
        }
        let started = Instant::now();
        let cancel = CancelFlag::new();
        let lease_lost = CancelFlag::new();
        let lease = Lease {
            job: job.id.clone(),
            worker: worker.clone(),
        };
        let sink = Arc::new(QueueSink {
            store: store.clone(),
            lease: lease.clone(),
            retry,
            handle: tokio::runtime::Handle::current(),
            progress: progress.clone(),
        });
        let ctx = JobContext {
            id: job.id.clone(),
            kind: job.kind.clone(),
            label: job.label.clone(),
            params: job.params.clone(),
            attempt: job.attempt,
            lease,
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
        let refused = matches!(&result, Ok(Err(e)) if e.lease_lost);
        if lease_lost.is_cancelled() || refused {
            warn!("lease lost; another worker owns this job now");
            let outcome = Outcome::LeaseLost;
            log(
                &store,
                &retry,
                Some(&job.id),
                &worker,
                "warn",
                &format!("{}; nothing recorded", outcome.describe()),
            )
            .await?;
            return Ok(outcome);
        }
        let outcome = match result {
            Ok(Ok(JobOutput::Done(summary))) => {
                let device = device.to_string();
                if retry
                    .run::<Q, _, _, _>("completing a job", || {
                        store.complete(&job.id, &worker, &device, &summary, seconds)
                    })
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
                let reason = format!("interrupted: worker {worker} was told to stop");
                match retry
                    .run::<Q, _, _, _>("releasing a lease", || {
                        store.release(&job.id, &worker, &reason, seconds)
                    })
                    .await
                    .map_err(SchedError::queue)?
                {
                    FailOutcome::WillRetry => {
                        info!("interrupted; progress is saved");
                        Outcome::Released
                    }
                    FailOutcome::Failed => {
                        warn!("interrupted once too often; the job failed");
                        Outcome::Failed(reason)
                    }
                }
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
        if outcome != Outcome::Completed || job.attempt > 1 {
            log(
                &store,
                &retry,
                Some(&job.id),
                &worker,
                "info",
                &outcome.describe(),
            )
            .await?;
        }
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
        match cfg
            .store_retry
            .run::<Q, _, _, _>("recording a job failure", || {
                store.fail(&job.id, worker, &msg, retry_after, seconds)
            })
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
                // An unreachable or busy database: keep the job running and keep trying; if
                // the lease runs out meanwhile and another worker takes the job, the first
                // heartbeat (or write) after the outage finds out.
                Err(e) => warn!("heartbeat failed: {e}"),
            }
        }
    }
}

/// [`JobSink`] over a [`Queue`], bridging the handler's blocking thread to the async backend.
/// Writes wait out store outages and are refused once the lease is lost.
struct QueueSink<Q: Queue> {
    store: Q,
    lease: Lease,
    retry: StoreRetry,
    handle: tokio::runtime::Handle,
    progress: Arc<dyn Progress>,
}

impl<Q: Queue> QueueSink<Q> {
    fn held(&self, written: Result<bool, Q::Error>) -> Result<(), JobError> {
        match written {
            Ok(true) => Ok(()),
            Ok(false) => Err(JobError::lease_lost(&self.lease)),
            Err(e) => Err(JobError::store(e)),
        }
    }
}

impl<Q: Queue> JobSink for QueueSink<Q> {
    fn progress(&self, done: u64, total: u64) -> Result<(), JobError> {
        self.progress.job_progress(&self.lease.job, done, total);
        self.held(
            self.handle
                .block_on(self.retry.run::<Q, _, _, _>("recording progress", || {
                    self.store.set_progress(&self.lease, done, total)
                })),
        )
    }
    fn event(&self, level: &str, message: &str) -> Result<(), JobError> {
        self.handle
            .block_on(self.retry.run::<Q, _, _, _>("logging an event", || {
                self.store.log_event(
                    Some(&self.lease.job),
                    Some(&self.lease.worker),
                    level,
                    message,
                )
            }))
            .map_err(JobError::store)
    }
    fn artifact(&self, artifact: &Artifact) -> Result<(), JobError> {
        self.held(self.handle.block_on(
            self.retry.run::<Q, _, _, _>("recording an artifact", || {
                self.store.record_artifact(&self.lease, artifact)
            }),
        ))
    }
    fn dep_artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, JobError> {
        self.handle
            .block_on(
                self.retry
                    .run::<Q, _, _, _>("looking up an artifact", || self.store.artifact(job, name)),
            )
            .map_err(JobError::store)
    }
}

#[cfg(test)]
mod tests;
