//! The scheduler over the in-memory queue with a test job kind: what is tested is the
//! scheduler's own logic (retries, isolation, shutdown, lost runners), not a backend's SQL,
//! which the store's tests cover on real database files.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use super::*;
use crate::plan::Job;
use crate::queue::{JobState, MemoryQueue};

/// Counts executions per job; fails jobs named `fail*`, panics on `panic*`, sleeps on `slow*`.
#[derive(Default)]
struct Probe {
    runs: Mutex<HashMap<String, usize>>,
    active: AtomicUsize,
    /// The device each job last ran on, and each device's (running now, most at once).
    devices: Mutex<HashMap<String, DeviceSpec>>,
    per_device: Mutex<HashMap<DeviceSpec, (usize, usize)>>,
}

impl JobHandler for Arc<Probe> {
    fn kind(&self) -> &'static str {
        "probe"
    }
    fn run(&self, ctx: &JobContext) -> Result<JobOutput, JobError> {
        let name = ctx.params["name"].as_str().unwrap_or_default().to_string();
        *self.runs.lock().unwrap().entry(name.clone()).or_default() += 1;
        self.active.fetch_add(1, Ordering::SeqCst);
        let _guard = Decrement(&self.active);
        self.devices
            .lock()
            .unwrap()
            .insert(name.clone(), ctx.device);
        {
            let mut per = self.per_device.lock().unwrap();
            let e = per.entry(ctx.device).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        let _device = LeaveDevice(self, ctx.device);
        if name.starts_with("oom") {
            return Err(JobError::retryable(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            ));
        }
        if name.starts_with("fail") {
            return Err(JobError::retryable(format!("{name} always fails")));
        }
        if name.starts_with("fatal") {
            return Err(JobError::fatal("bad parameters"));
        }
        if name.starts_with("panic") {
            panic!("deliberate panic in {name}");
        }
        if name.starts_with("write") {
            // Reports progress often: the first write after the lease is lost is refused.
            for i in 0..100 {
                if ctx.cancelled() {
                    return Ok(JobOutput::Interrupted);
                }
                ctx.sink.progress(i, 100)?;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if name.starts_with("slow") {
            for _ in 0..50 {
                if ctx.cancelled() {
                    return Ok(JobOutput::Interrupted);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        ctx.sink.event("info", "ran")?;
        Ok(JobOutput::Done(serde_json::json!({ "name": name })))
    }
}

struct LeaveDevice<'a>(&'a Probe, DeviceSpec);
impl Drop for LeaveDevice<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.0.per_device.lock().unwrap().get_mut(&self.1) {
            e.0 -= 1;
        }
    }
}

struct Decrement<'a>(&'a AtomicUsize);
impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("probe", name, deps)
}

fn cfg(workers: usize) -> SchedConfig {
    SchedConfig {
        workers,
        lease: Duration::from_secs(5),
        heartbeat: Duration::from_millis(200),
        poll: Duration::from_millis(20),
        artifacts_dir: std::env::temp_dir(),
        ..SchedConfig::default()
    }
}

fn registry(probe: &Arc<Probe>) -> Arc<Registry> {
    let mut r = Registry::new();
    r.register(Arc::new(probe.clone()));
    Arc::new(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_does_not_stop_unrelated_jobs() {
    let store = MemoryQueue::new();
    let bad = job("fatal", &[]);
    let after_bad = job("after-bad", &[&bad]);
    let panicky = job("panic", &[]);
    let good: Vec<Job> = (0..5).map(|i| job(&format!("ok{i}"), &[])).collect();
    let mut jobs = vec![bad.clone(), after_bad.clone(), panicky.clone()];
    jobs.extend(good.iter().cloned());
    let study = store.add_study(&jobs, 2);
    let probe = Arc::new(Probe::default());
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        cfg(2),
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(summary.completed, 5);
    let runs = probe.runs.lock().unwrap().clone();
    assert_eq!(runs["fatal"], 1, "a fatal error is not retried");
    assert_eq!(
        runs["panic"], 2,
        "a panic is retried until attempts run out"
    );
    assert!(
        !runs.contains_key("after-bad"),
        "a job whose dependency failed never runs"
    );
    let states: HashMap<String, (JobState, bool)> = store
        .jobs(study)
        .into_iter()
        .map(|j| (j.label.clone(), (j.state, store.blocked(&j.id))))
        .collect();
    assert_eq!(states["fatal"], (JobState::Failed, false));
    assert_eq!(states["panic"].0, JobState::Failed);
    assert_eq!(states["after-bad"], (JobState::Pending, true));
    for i in 0..5 {
        assert_eq!(states[&format!("ok{i}")].0, JobState::Done);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_queue_run_every_job_exactly_once() {
    let s1 = MemoryQueue::new();
    let s2 = s1.clone();
    let roots: Vec<Job> = (0..12)
        .map(|i| job(&format!("slow-root{i}"), &[]))
        .collect();
    let mut jobs = roots.clone();
    jobs.extend((0..12).map(|i| job(&format!("child{i}"), &[&roots[i]])));
    let study = s1.add_study(&jobs, 3);
    let probe = Arc::new(Probe::default());
    let reg = registry(&probe);
    let (a, b) = tokio::join!(
        run_study(
            s1.clone(),
            study,
            reg.clone(),
            cfg(2),
            CancelFlag::new(),
            Arc::new(progress::NoProgress)
        ),
        run_study(
            s2.clone(),
            study,
            reg.clone(),
            cfg(2),
            CancelFlag::new(),
            Arc::new(progress::NoProgress)
        ),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.completed + b.completed, 24);
    assert!(
        a.completed > 0 && b.completed > 0,
        "both processes did work: {a:?} {b:?}"
    );
    let runs = probe.runs.lock().unwrap();
    assert_eq!(runs.len(), 24);
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_running_jobs_back_without_losing_an_attempt() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("slow-a", &[]), job("slow-b", &[])], 3);
    let probe = Arc::new(Probe::default());
    let shutdown = CancelFlag::new();
    let stopper = {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.cancel();
        })
    };
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        cfg(2),
        shutdown,
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    stopper.await.unwrap();
    assert!(summary.shutdown_requested);
    assert_eq!(summary.interrupted, 2);
    for j in store.jobs(study) {
        assert_eq!(j.state, JobState::Pending);
        assert_eq!(j.attempts, 0);
        assert_eq!(j.interruptions, 1, "a stop request is an interruption");
    }
    // A second run finishes them.
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        cfg(2),
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(summary.completed, 2);
}

/// A runner whose lease went to another worker has its next write refused: it stops, records
/// nothing (no failure, no attempt), and the job is finished once the other lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_lease_was_lost_is_refused_and_nothing_is_recorded() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("write-a", &[])], 3);
    let probe = Arc::new(Probe::default());
    let cfg = SchedConfig {
        // Heartbeats too rare to notice first: the refused write must.
        heartbeat: Duration::from_secs(30),
        ..cfg(1)
    };
    let run = tokio::spawn(run_study(
        store.clone(),
        study,
        registry(&probe),
        cfg,
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    ));
    let id = store.jobs(study)[0].id.clone();
    let running = async {
        while store.jobs(study)[0].progress.0 < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the job reports progress");
    store.take_over(&id, &WorkerId("thief".into()), Duration::from_millis(100));
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.completed, 1);
    assert_eq!(summary.failed + summary.retried, 0, "{summary:?}");
    assert!(summary.interrupted >= 1, "{summary:?}");
    let j = &store.jobs(study)[0];
    assert_eq!(j.state, JobState::Done);
    assert_eq!((j.attempts, j.interruptions), (1, 1));
    assert_eq!(probe.runs.lock().unwrap()["write-a"], 2);
    assert!(
        store
            .events()
            .iter()
            .any(|e| e.message.contains("lease lost")),
        "{:?}",
        store.events()
    );
}

/// A job that never finishes within one allocation stops being handed out at its interruption
/// cap, failing with a message that says so, instead of looping forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_interrupted_at_its_cap_fails_with_a_clear_message() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("slow-a", &[])], 3);
    store.set_max_interruptions(2);
    let probe = Arc::new(Probe::default());
    for round in 1..=2 {
        let shutdown = CancelFlag::new();
        let stopper = {
            let s = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                s.cancel();
            })
        };
        let summary = run_study(
            store.clone(),
            study,
            registry(&probe),
            cfg(1),
            shutdown,
            Arc::new(progress::NoProgress),
        )
        .await
        .unwrap();
        stopper.await.unwrap();
        let j = &store.jobs(study)[0];
        assert_eq!((j.attempts, j.interruptions), (0, round));
        if round == 1 {
            assert_eq!((summary.interrupted, j.state), (1, JobState::Pending));
        } else {
            assert_eq!((summary.failed, j.state), (1, JobState::Failed));
            let error = j.error.as_deref().unwrap_or("");
            assert!(error.contains("interrupted 2 times (the cap)"), "{error}");
            assert!(error.contains("was told to stop"), "{error}");
        }
    }
    // The worker registered itself and said it stopped.
    let workers = store.workers();
    assert!(!workers.is_empty());
    assert!(workers
        .iter()
        .all(|(_, info, stopped)| *stopped && info.pid == std::process::id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_runner_is_detected_and_its_job_rerun() {
    let store = MemoryQueue::new();
    let a = job("a", &[]);
    let study = store.add_study(std::slice::from_ref(&a), 3);
    // A runner claims the job and dies without a heartbeat.
    let claimed = store
        .claim(
            study,
            &WorkerId("ghost".into()),
            &["probe"],
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert!(claimed.is_some());
    let probe = Arc::new(Probe::default());
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        cfg(1),
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(summary.completed, 1);
    let j = &store.jobs(study)[0];
    assert_eq!(j.state, JobState::Done);
    assert_eq!(j.attempts, 1, "the lost runner's attempt is not counted");
    assert_eq!(j.interruptions, 1, "it is an interruption");
    assert!(
        store
            .events()
            .iter()
            .any(|e| e.level == "warn" && e.message.contains("runner ghost")),
        "the reaped lease is logged with its runner"
    );
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let b = Backoff::default();
    let secs: Vec<u64> = (1..=8).map(|a| b.after(a).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(b.after(u32::MAX), Duration::from_secs(60), "no overflow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_waits_for_its_backoff_and_is_logged() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("fail-always", &[])], 2);
    let probe = Arc::new(Probe::default());
    let mut c = cfg(1);
    c.backoff = Backoff {
        first: Duration::from_millis(300),
        max: Duration::from_secs(1),
    };
    let started = Instant::now();
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        c,
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!((summary.retried, summary.failed), (1, 1));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the second attempt waited for the backoff"
    );
    let j = &store.jobs(study)[0];
    assert_eq!(j.state, JobState::Failed);
    assert!(j
        .error
        .as_deref()
        .is_some_and(|e| e.starts_with("attempt 2/2")));
}

#[test]
fn device_specs_parse() {
    assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert!("gpu".parse::<DeviceSpec>().is_err());
    assert!("cuda:x".parse::<DeviceSpec>().is_err());
}

/// Without the `cuda` feature (so on every CI machine), asking for a GPU names the device and
/// what to check instead of candle's bare error.
#[cfg(not(feature = "cuda"))]
#[test]
fn opening_a_gpu_in_a_cpu_build_says_which_and_why() {
    let err = DeviceSpec::Cuda(1)
        .open()
        .expect_err("no CUDA in this build")
        .to_string();
    assert!(err.starts_with("cannot open cuda:1: "), "{err}");
    assert!(err.contains("`--features cuda`"), "{err}");
}

#[test]
fn device_lists_parse_and_cuda_visible_devices_is_read_as_the_driver_reads_it() {
    let parse = |s: &str| {
        s.parse::<DeviceList>().map(|d| match d {
            DeviceList::Listed(l) => l,
            DeviceList::Visible => panic!("`{s}` is not `cuda`"),
        })
    };
    assert_eq!("cuda".parse::<DeviceList>(), Ok(DeviceList::Visible));
    assert_eq!(DeviceList::Visible.to_string(), "cuda");
    assert_eq!(parse("cpu"), Ok(vec![DeviceSpec::Cpu]));
    assert_eq!(parse("cuda:1"), Ok(vec![DeviceSpec::Cuda(1)]));
    assert_eq!(
        parse("cuda:0, cuda:2"),
        Ok(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(2)])
    );
    assert!(parse("cuda:0,cuda:0").unwrap_err().contains("twice"));
    assert!(parse("cpu,cuda:0").is_err());
    assert!(parse("gpu:0").unwrap_err().contains("unknown device"));
    assert_eq!(
        DeviceList::Listed(vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(2)]).to_string(),
        "cuda:0,cuda:2"
    );
    assert_eq!(parse_visible_devices("0,2,3"), 3);
    assert_eq!(parse_visible_devices("GPU-5a1c,GPU-77e0"), 2);
    assert_eq!(parse_visible_devices(""), 0);
    assert_eq!(parse_visible_devices("1,-1,2"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gpu_gets_its_slots_and_each_job_the_device_of_its_slot() {
    let store = MemoryQueue::new();
    let jobs: Vec<Job> = (0..12).map(|i| job(&format!("slow{i}"), &[])).collect();
    let study = store.add_study(&jobs, 1);
    let probe = Arc::new(Probe::default());
    let gpus = vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(2)];
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        SchedConfig {
            devices: gpus.clone(),
            ..cfg(2)
        },
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(summary.completed, 12);
    let per = probe.per_device.lock().unwrap().clone();
    // Two slots per GPU, both GPUs used, never more than two jobs on one.
    assert_eq!(
        per.keys()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2
    );
    for g in &gpus {
        let (now, peak) = per[g];
        assert_eq!(now, 0);
        assert!(peak <= 2, "{g}: {peak} jobs at once");
    }
    assert!(
        per.values().any(|&(_, peak)| peak == 2),
        "slots per device unused: {per:?}"
    );
    let on: Vec<DeviceSpec> = probe.devices.lock().unwrap().values().copied().collect();
    assert!(on.iter().all(|d| gpus.contains(d)));
    // Each finished job records the device it ran on (what `caf status` and the report show).
    let seen = probe.devices.lock().unwrap().clone();
    for j in store.jobs(study) {
        let ran = seen[j.params["name"].as_str().unwrap()].to_string();
        assert_eq!(j.ran_device.as_deref(), Some(ran.as_str()), "{}", j.label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_says_so_with_a_hint_and_is_retried_once() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("oom", &[])], 5);
    let probe = Arc::new(Probe::default());
    let summary = run_study(
        store.clone(),
        study,
        registry(&probe),
        SchedConfig {
            backoff: Backoff {
                first: Duration::from_millis(1),
                max: Duration::from_millis(1),
            },
            ..cfg(1)
        },
        CancelFlag::new(),
        Arc::new(progress::NoProgress),
    )
    .await
    .unwrap();
    assert_eq!(summary.failed, 1);
    assert_eq!(
        probe.runs.lock().unwrap()["oom"],
        2,
        "one retry of five attempts"
    );
    let j = store.jobs(study).into_iter().next().unwrap();
    assert_eq!(j.state, JobState::Failed);
    let err = j.error.unwrap_or_default();
    assert!(
        err.contains("out of memory") && err.contains("smaller `batch`"),
        "{err}"
    );
}

/// `caf run` after a crash: a worker of this host whose process is gone holds a job's lease
/// with an hour left; the next worker ends that lease at start-up and runs the job now, and a
/// worker whose process exists (this one's pid) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_local_workers_job_runs_at_once() {
    let store = MemoryQueue::new();
    let study = store.add_study(&[job("a", &[])], 3);
    let host = hostname();
    // Above any pid_max Linux allows (2^22), so never a live process.
    let gone = WorkerId("crashed".into());
    let gone_info = WorkerInfo {
        host: host.clone(),
        pid: 4_000_000_000,
        ..WorkerInfo::default()
    };
    assert!(process_gone(gone_info.pid) && !process_gone(std::process::id()));
    store.register_worker(&gone, &gone_info).await.unwrap();
    let alive = WorkerId("alive".into());
    let alive_info = WorkerInfo {
        host,
        pid: std::process::id(),
        ..WorkerInfo::default()
    };
    store.register_worker(&alive, &alive_info).await.unwrap();
    let hour = Duration::from_secs(3600);
    store
        .claim(study, &gone, &["probe"], hour)
        .await
        .unwrap()
        .expect("the crashed worker held the job");
    let probe = Arc::new(Probe::default());
    let summary = tokio::time::timeout(
        Duration::from_secs(30),
        run_study(
            store.clone(),
            study,
            registry(&probe),
            cfg(1),
            CancelFlag::new(),
            Arc::new(progress::NoProgress),
        ),
    )
    .await
    .expect("the job ran without waiting for the lease")
    .unwrap();
    assert_eq!(summary.completed, 1);
    let j = &store.jobs(study)[0];
    assert_eq!(
        (j.state, j.attempts, j.interruptions),
        (JobState::Done, 1, 1)
    );
    let stopped: HashMap<String, bool> = store
        .workers()
        .into_iter()
        .map(|(w, _, stopped)| (w.0, stopped))
        .collect();
    assert!(stopped["crashed"] && !stopped["alive"], "{stopped:?}");
    assert!(
        store.events().iter().any(|e| e
            .message
            .contains("worker crashed (pid 4000000000 on this host) is gone")),
        "{:?}",
        store.events()
    );
}
