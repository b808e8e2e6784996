//! A [`Queue`] in one process's memory, with the semantics of the SQLite backend's claims and
//! leases. Why: the scheduler's tests exercise retries, lost leases and shutdowns against it
//! without a database, so they test the scheduler and nothing below it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    interruption_cap_error, Abandoned, Artifact, Claimed, FailOutcome, JobState, Lease, Queue,
    StudyId, WorkerId, WorkerInfo, DEFAULT_MAX_INTERRUPTIONS,
};
use crate::plan::{Job, JobId};

/// One job as the memory queue holds it (also what tests read back).
#[derive(Clone, Debug)]
pub struct QueuedJob {
    pub id: JobId,
    pub kind: String,
    pub label: String,
    pub params: serde_json::Value,
    pub deps: Vec<JobId>,
    pub state: JobState,
    pub attempts: u32,
    pub max_attempts: u32,
    /// Times a worker was stopped (or lost) while running it; not counted as attempts.
    pub interruptions: u32,
    pub max_interruptions: u32,
    pub error: Option<String>,
    pub result: Option<serde_json::Value>,
    pub progress: (u64, u64),
    pub run_seconds: f64,
    /// The device the finished attempt ran on.
    pub ran_device: Option<String>,
    lease: Option<(WorkerId, Instant)>,
    not_before: Instant,
}

impl QueuedJob {
    /// The worker holding the job's lease, if it is running.
    pub fn lease_owner(&self) -> Option<&WorkerId> {
        self.lease.as_ref().map(|(w, _)| w)
    }

    /// Ends the running attempt as an interruption: back to pending without the attempt, or
    /// failed at the interruption cap.
    fn interrupt(&mut self, reason: &str) -> FailOutcome {
        self.lease = None;
        self.attempts = self.attempts.saturating_sub(1);
        self.interruptions += 1;
        if self.interruptions >= self.max_interruptions {
            self.state = JobState::Failed;
            self.error = Some(interruption_cap_error(reason, self.max_interruptions));
            FailOutcome::Failed
        } else {
            self.state = JobState::Pending;
            self.error = Some(reason.to_string());
            FailOutcome::WillRetry
        }
    }
}

/// An event a job or worker logged.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    pub job: Option<JobId>,
    pub level: String,
    pub message: String,
}

#[derive(Default)]
struct State {
    jobs: Vec<QueuedJob>,
    index: HashMap<JobId, usize>,
    /// Each study's jobs in plan order (a claim takes the first runnable one).
    studies: Vec<Vec<usize>>,
    workers: HashMap<WorkerId, (WorkerInfo, bool)>,
    events: Vec<LoggedEvent>,
    artifacts: HashMap<(JobId, String), Artifact>,
}

impl State {
    fn owned(&mut self, job: &JobId, worker: &WorkerId) -> Option<&mut QueuedJob> {
        let i = *self.index.get(job)?;
        let j = &mut self.jobs[i];
        let held = j.state == JobState::Running && j.lease_owner() == Some(worker);
        held.then_some(j)
    }

    /// A pending job that can never run: some dependency, directly or through others, failed.
    fn dead(&self, i: usize) -> bool {
        let mut stack = vec![i];
        let mut seen = vec![false; self.jobs.len()];
        while let Some(k) = stack.pop() {
            for d in &self.jobs[k].deps {
                let Some(&di) = self.index.get(d) else {
                    continue;
                };
                if self.jobs[di].state == JobState::Failed {
                    return true;
                }
                if !std::mem::replace(&mut seen[di], true) {
                    stack.push(di);
                }
            }
        }
        false
    }
}

/// A [`Queue`] held in memory; clones share it (as several processes share one database).
#[derive(Clone, Default)]
pub struct MemoryQueue {
    state: Arc<Mutex<State>>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, still consistent per field.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `jobs` (in dependency order, as a plan lists them) as a new study; a job already
    /// queued by another study is shared, not duplicated.
    pub fn add_study(&self, jobs: &[Job], max_attempts: u32) -> StudyId {
        let mut s = self.lock();
        let now = Instant::now();
        let mut order = Vec::with_capacity(jobs.len());
        for job in jobs {
            let i = match s.index.get(&job.id) {
                Some(&i) => i,
                None => {
                    let i = s.jobs.len();
                    s.jobs.push(QueuedJob {
                        id: job.id.clone(),
                        kind: job.kind.clone(),
                        label: job.label.clone(),
                        params: job.params.clone(),
                        deps: job.deps.clone(),
                        state: JobState::Pending,
                        attempts: 0,
                        max_attempts,
                        interruptions: 0,
                        max_interruptions: DEFAULT_MAX_INTERRUPTIONS,
                        error: None,
                        result: None,
                        progress: (0, 0),
                        run_seconds: 0.0,
                        ran_device: None,
                        lease: None,
                        not_before: now,
                    });
                    s.index.insert(job.id.clone(), i);
                    i
                }
            };
            order.push(i);
        }
        s.studies.push(order);
        StudyId(s.studies.len() as i64 - 1)
    }

    /// A snapshot of the study's jobs in plan order.
    pub fn jobs(&self, study: StudyId) -> Vec<QueuedJob> {
        let s = self.lock();
        s.studies
            .get(study.0 as usize)
            .map(|order| order.iter().map(|&i| s.jobs[i].clone()).collect())
            .unwrap_or_default()
    }

    /// True for a pending job whose dependency failed (it can never run).
    pub fn blocked(&self, job: &JobId) -> bool {
        let s = self.lock();
        s.index
            .get(job)
            .is_some_and(|&i| s.jobs[i].state == JobState::Pending && s.dead(i))
    }

    pub fn events(&self) -> Vec<LoggedEvent> {
        self.lock().events.clone()
    }

    /// Registered workers and whether each said it stopped.
    pub fn workers(&self) -> Vec<(WorkerId, WorkerInfo, bool)> {
        self.lock()
            .workers
            .iter()
            .map(|(w, (info, stopped))| (w.clone(), info.clone(), *stopped))
            .collect()
    }

    /// Hands a running job's lease to `worker` for `lease`, as if its runner had been reaped and
    /// another worker had claimed it (tests of a runner that lost its lease).
    pub fn take_over(&self, job: &JobId, worker: &WorkerId, lease: Duration) {
        let mut s = self.lock();
        if let Some(&i) = s.index.get(job) {
            let j = &mut s.jobs[i];
            if j.state == JobState::Running {
                j.lease = Some((worker.clone(), Instant::now() + lease));
            }
        }
    }

    /// Sets every job's interruption cap (tests of the cap).
    pub fn set_max_interruptions(&self, cap: u32) {
        for j in self.lock().jobs.iter_mut() {
            j.max_interruptions = cap;
        }
    }
}

impl Queue for MemoryQueue {
    type Error = Infallible;

    async fn register_worker(
        &self,
        worker: &WorkerId,
        info: &WorkerInfo,
    ) -> Result<(), Infallible> {
        self.lock()
            .workers
            .insert(worker.clone(), (info.clone(), false));
        Ok(())
    }

    async fn worker_stopped(&self, worker: &WorkerId) -> Result<(), Infallible> {
        if let Some(w) = self.lock().workers.get_mut(worker) {
            w.1 = true;
        }
        Ok(())
    }

    async fn unstopped_workers_on(&self, host: &str) -> Result<Vec<(WorkerId, u32)>, Infallible> {
        let mut found: Vec<(WorkerId, u32)> = self
            .lock()
            .workers
            .iter()
            .filter(|(_, (info, stopped))| !stopped && info.host == host)
            .map(|(w, (info, _))| (w.clone(), info.pid))
            .collect();
        found.sort_by(|a, b| a.0 .0.cmp(&b.0 .0));
        Ok(found)
    }

    async fn worker_gone(&self, worker: &WorkerId) -> Result<u64, Infallible> {
        let mut s = self.lock();
        if let Some(w) = s.workers.get_mut(worker) {
            w.1 = true;
        }
        let now = Instant::now();
        let past = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let mut ended = 0;
        for j in s.jobs.iter_mut() {
            if let (JobState::Running, Some((owner, expires))) = (j.state, j.lease.as_mut()) {
                if owner == worker {
                    // Expired: `reap_expired` takes leases whose end is before its own now.
                    *expires = past;
                    ended += 1;
                }
            }
        }
        Ok(ended)
    }

    async fn claim(
        &self,
        study: StudyId,
        worker: &WorkerId,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Claimed>, Infallible> {
        let mut s = self.lock();
        let now = Instant::now();
        let Some(order) = s.studies.get(study.0 as usize) else {
            return Ok(None);
        };
        let runnable = order.iter().copied().find(|&i| {
            let j = &s.jobs[i];
            j.state == JobState::Pending
                && j.attempts < j.max_attempts
                && j.not_before <= now
                && kinds.contains(&j.kind.as_str())
                && j.deps.iter().all(|d| {
                    s.index
                        .get(d)
                        .is_some_and(|&di| s.jobs[di].state == JobState::Done)
                })
        });
        let Some(i) = runnable else {
            return Ok(None);
        };
        let j = &mut s.jobs[i];
        j.state = JobState::Running;
        j.attempts += 1;
        j.lease = Some((worker.clone(), now + lease));
        Ok(Some(Claimed {
            id: j.id.clone(),
            kind: j.kind.clone(),
            label: j.label.clone(),
            params: j.params.clone(),
            attempt: j.attempts,
            max_attempts: j.max_attempts,
        }))
    }

    async fn heartbeat(
        &self,
        job: &JobId,
        worker: &WorkerId,
        lease: Duration,
    ) -> Result<bool, Infallible> {
        let mut s = self.lock();
        Ok(match s.owned(job, worker) {
            Some(j) => {
                j.lease = Some((worker.clone(), Instant::now() + lease));
                true
            }
            None => false,
        })
    }

    async fn complete(
        &self,
        job: &JobId,
        worker: &WorkerId,
        device: &str,
        result: &serde_json::Value,
        seconds: f64,
    ) -> Result<bool, Infallible> {
        let mut s = self.lock();
        Ok(match s.owned(job, worker) {
            Some(j) => {
                j.state = JobState::Done;
                j.result = Some(result.clone());
                j.error = None;
                j.lease = None;
                j.run_seconds += seconds;
                j.ran_device = Some(device.to_string());
                true
            }
            None => false,
        })
    }

    async fn fail(
        &self,
        job: &JobId,
        worker: &WorkerId,
        error: &str,
        retry_after: Option<Duration>,
        seconds: f64,
    ) -> Result<FailOutcome, Infallible> {
        let mut s = self.lock();
        let Some(j) = s.owned(job, worker) else {
            return Ok(FailOutcome::Failed);
        };
        j.error = Some(error.to_string());
        j.lease = None;
        j.run_seconds += seconds;
        Ok(match retry_after {
            Some(wait) if j.attempts < j.max_attempts => {
                j.state = JobState::Pending;
                j.not_before = Instant::now() + wait;
                FailOutcome::WillRetry
            }
            _ => {
                j.state = JobState::Failed;
                FailOutcome::Failed
            }
        })
    }

    async fn release(
        &self,
        job: &JobId,
        worker: &WorkerId,
        reason: &str,
        seconds: f64,
    ) -> Result<FailOutcome, Infallible> {
        let mut s = self.lock();
        Ok(match s.owned(job, worker) {
            Some(j) => {
                j.run_seconds += seconds;
                j.interrupt(reason)
            }
            // Someone else holds it now: nothing of ours to give back.
            None => FailOutcome::WillRetry,
        })
    }

    async fn reap_expired(&self) -> Result<Vec<Abandoned>, Infallible> {
        let mut s = self.lock();
        let now = Instant::now();
        let mut out = Vec::new();
        for j in s.jobs.iter_mut() {
            let Some((owner, expires)) = j.lease.clone() else {
                continue;
            };
            if j.state != JobState::Running || expires >= now {
                continue;
            }
            let reason = format!("interrupted: runner {owner} stopped renewing its lease");
            let outcome = j.interrupt(&reason);
            out.push(Abandoned {
                id: j.id.clone(),
                reason,
                outcome,
            });
        }
        Ok(out)
    }

    async fn outstanding(&self, study: StudyId) -> Result<(u64, u64), Infallible> {
        let s = self.lock();
        let Some(order) = s.studies.get(study.0 as usize) else {
            return Ok((0, 0));
        };
        let running = order
            .iter()
            .filter(|&&i| s.jobs[i].state == JobState::Running)
            .count();
        let pending = order
            .iter()
            .filter(|&&i| {
                let j = &s.jobs[i];
                j.state == JobState::Pending && j.attempts < j.max_attempts && !s.dead(i)
            })
            .count();
        Ok((running as u64, pending as u64))
    }

    async fn set_progress(&self, lease: &Lease, done: u64, total: u64) -> Result<bool, Infallible> {
        let mut s = self.lock();
        Ok(match s.owned(&lease.job, &lease.worker) {
            Some(j) => {
                j.progress = (done, total);
                true
            }
            None => false,
        })
    }

    async fn log_event(
        &self,
        job: Option<&JobId>,
        _worker: Option<&WorkerId>,
        level: &str,
        message: &str,
    ) -> Result<(), Infallible> {
        self.lock().events.push(LoggedEvent {
            job: job.cloned(),
            level: level.to_string(),
            message: message.to_string(),
        });
        Ok(())
    }

    async fn record_artifact(
        &self,
        lease: &Lease,
        artifact: &Artifact,
    ) -> Result<bool, Infallible> {
        let mut s = self.lock();
        if s.owned(&lease.job, &lease.worker).is_none() {
            return Ok(false);
        }
        s.artifacts
            .insert((lease.job.clone(), artifact.name.clone()), artifact.clone());
        Ok(true)
    }

    async fn artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, Infallible> {
        Ok(self
            .lock()
            .artifacts
            .get(&(job.clone(), name.to_string()))
            .cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, deps: &[&Job]) -> Job {
        crate::plan::testing::job("probe", name, deps)
    }

    #[tokio::test]
    async fn claims_follow_dependencies_and_leases() {
        let q = MemoryQueue::new();
        let a = job("a", &[]);
        let b = job("b", &[&a]);
        let study = q.add_study(&[a.clone(), b.clone()], 3);
        let w = WorkerId("w".into());
        let lease = Duration::from_secs(60);
        let first = q.claim(study, &w, &["probe"], lease).await.unwrap();
        assert_eq!(first.map(|c| c.id), Some(a.id.clone()));
        assert!(
            q.claim(study, &w, &["probe"], lease)
                .await
                .unwrap()
                .is_none(),
            "b waits for a"
        );
        assert!(!q
            .complete(
                &a.id,
                &WorkerId("other".into()),
                "cpu",
                &serde_json::json!({}),
                0.0
            )
            .await
            .unwrap());
        assert!(q
            .complete(&a.id, &w, "cpu", &serde_json::json!({}), 0.0)
            .await
            .unwrap());
        let second = q.claim(study, &w, &["probe"], lease).await.unwrap();
        assert_eq!(second.map(|c| c.id), Some(b.id.clone()));
        assert_eq!(q.outstanding(study).await.unwrap(), (1, 0));
    }

    #[tokio::test]
    async fn failures_block_dependents_and_expired_leases_come_back() {
        let q = MemoryQueue::new();
        let a = job("a", &[]);
        let b = job("b", &[&a]);
        let c = job("c", &[]);
        let study = q.add_study(&[a.clone(), b.clone(), c.clone()], 2);
        let w = WorkerId("w".into());
        q.claim(study, &w, &["probe"], Duration::from_secs(60))
            .await
            .unwrap();
        let outcome = q.fail(&a.id, &w, "boom", None, 0.0).await.unwrap();
        assert_eq!(outcome, FailOutcome::Failed);
        assert!(q.blocked(&b.id));
        assert_eq!(q.outstanding(study).await.unwrap(), (0, 1), "only c");
        let claimed = q
            .claim(study, &w, &["probe"], Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(claimed.map(|c| c.id), Some(c.id.clone()));
        std::thread::sleep(Duration::from_millis(5));
        let reaped = q.reap_expired().await.unwrap();
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].outcome, FailOutcome::WillRetry);
        assert!(
            reaped[0].reason.contains("runner w"),
            "{}",
            reaped[0].reason
        );
        let jobs = q.jobs(study);
        assert_eq!(jobs[2].state, JobState::Pending);
        assert_eq!(jobs[2].attempts, 0, "an abandoned attempt is not counted");
        assert_eq!(jobs[2].interruptions, 1, "it is an interruption");
    }
}
