//! The store's behaviour through its traits, on every backend (see `testing.rs`): leases,
//! dependencies, retries, results, plans and imports. Backend-specific tests (file creation
//! races, schema versions) stay beside each backend.

use std::sync::Arc;
use std::time::Duration;

use super::testing::{on_every_backend, Fixture};
use super::*;
use crate::plan::testing::plan;
use crate::plan::{CellRecord, Job, JobBuilder};

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("test", name, deps)
}

fn w(name: &str) -> WorkerId {
    WorkerId(name.into())
}

const LEASE: Duration = Duration::from_secs(30);

on_every_backend!(
    claims_follow_dependencies_and_plan_order,
    only_registered_kinds_are_claimed,
    registering_the_same_plan_twice_keeps_results_and_state,
    only_the_lease_owner_can_complete_or_heartbeat,
    expired_leases_are_interruptions_until_their_cap,
    the_specs_attempt_cap_applies_and_never_strands_a_pending_job,
    failures_back_off_then_fail_for_good,
    release_is_an_interruption_not_an_attempt,
    workers_are_listed_with_their_jobs_and_finished_jobs_name_their_machine,
    writes_of_a_worker_that_lost_its_lease_are_refused,
    results_are_written_once_per_image,
    eval_results_epochs_artifacts_and_events_round_trip,
    two_stores_on_one_database_never_claim_the_same_job,
    cells_are_recorded_and_imports_survive_a_new_spec_revision,
    concurrent_registrations_of_one_plan_all_succeed,
    a_shared_job_keeps_each_studys_label,
    a_plans_progress_unit_is_what_status_reads,
    a_jobs_precision_comes_from_its_params,
    slurm_jobs_are_recorded_once_per_study_in_order,
    sequential_rows_keep_what_recomputes_them,
    claims_pass_over_finished_jobs_and_retried_ones_come_back,
    a_gone_workers_leases_end_at_once,
    a_fused_jobs_work_is_its_members_rows,
);

/// `caf status` rates a fused certification by the rows it wrote for its members, whose seconds
/// are each image's shared pass split among them; the members keep their own rows' sum.
async fn a_fused_jobs_work_is_its_members_rows(f: impl Fixture) {
    let s = f.open().await;
    let fused = job("fused", &[]);
    let (a, b) = (job("a", &[&fused]), job("b", &[&fused]));
    let study = s
        .register_plan(&plan("p", vec![fused.clone(), a.clone(), b.clone()]))
        .await
        .unwrap();
    let l = leased(&s, study).await;
    assert_eq!(l.job, fused.id);
    for (member, idx, seconds) in [(&a, 0, 2.0), (&b, 0, 2.0), (&a, 1, 3.0), (&b, 1, 1.0)] {
        let row = CertRow {
            seconds,
            ..cert(idx, 0.5)
        };
        assert!(s.record_cert(&l, &member.id, &row).await.unwrap());
    }
    let work: std::collections::HashMap<JobId, f64> = s
        .study_jobs(study)
        .await
        .unwrap()
        .into_iter()
        .map(|j| (j.id, j.work_seconds))
        .collect();
    assert!((work[&fused.id] - 8.0).abs() < 1e-9, "{work:?}");
    assert!((work[&a.id] - 5.0).abs() < 1e-9, "{work:?}");
    assert!((work[&b.id] - 3.0).abs() < 1e-9, "{work:?}");
}

/// A worker whose process is gone: `worker_gone` marks it stopped at its last sign of life and
/// ends its leases, so the very next reap returns its job as an interruption though the lease
/// had an hour left; workers of other hosts and stopped ones are not listed for the check.
async fn a_gone_workers_leases_end_at_once(f: impl Fixture) {
    let s = f.open().await;
    let (a, b) = (job("a", &[]), job("b", &[]));
    let study = s
        .register_plan(&plan("p", vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    let hour = Duration::from_secs(3600);
    s.register_worker(&w("dead"), &info("h1")).await.unwrap();
    s.register_worker(
        &w("alive"),
        &WorkerInfo {
            pid: 7,
            ..info("h1")
        },
    )
    .await
    .unwrap();
    s.register_worker(&w("elsewhere"), &info("h2"))
        .await
        .unwrap();
    s.register_worker(&w("done"), &info("h1")).await.unwrap();
    s.worker_stopped(&w("done")).await.unwrap();
    assert_eq!(
        s.claim(study, &w("dead"), &["test"], hour)
            .await
            .unwrap()
            .unwrap()
            .id,
        a.id
    );
    assert_eq!(
        s.claim(study, &w("alive"), &["test"], hour)
            .await
            .unwrap()
            .unwrap()
            .id,
        b.id
    );
    assert_eq!(
        s.unstopped_workers_on("h1").await.unwrap(),
        vec![(w("alive"), 7), (w("dead"), 42)]
    );
    assert!(s.reap_expired().await.unwrap().is_empty(), "an hour left");
    assert_eq!(s.worker_gone(&w("dead")).await.unwrap(), 1);
    let reaped = s.reap_expired().await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].id, a.id);
    assert_eq!(reaped[0].outcome, FailOutcome::WillRetry);
    let dead = s
        .workers()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == "dead")
        .unwrap();
    assert_eq!(
        dead.stopped_at,
        Some(dead.last_seen),
        "stopped at its last sign of life"
    );
    assert!(
        !s.heartbeat(&a.id, &w("dead"), hour).await.unwrap(),
        "its lease is over"
    );
    assert!(
        s.heartbeat(&b.id, &w("alive"), hour).await.unwrap(),
        "others keep theirs"
    );
    assert_eq!(
        s.unstopped_workers_on("h1").await.unwrap(),
        vec![(w("alive"), 7)]
    );
    let j = s.study_jobs(study).await.unwrap();
    assert_eq!(
        (j[0].state, j[0].attempts, j[0].interruptions),
        (JobState::Pending, 0, 1)
    );
    assert_eq!(
        s.claim(study, &w("new"), &["test"], hour)
            .await
            .unwrap()
            .unwrap()
            .id,
        a.id
    );
    assert_eq!(
        s.worker_gone(&w("dead")).await.unwrap(),
        0,
        "nothing left to end"
    );
}

/// Claims walk only a study's open jobs (migration 10's triggers keep `study_jobs.open` in
/// step with the job's status): done and failed jobs are passed over, a failed job given fresh
/// attempts is claimable again, and a job another study finished is not claimed by a new one.
async fn claims_pass_over_finished_jobs_and_retried_ones_come_back(f: impl Fixture) {
    let s = f.open().await;
    let (a, b, c) = (job("a", &[]), job("b", &[]), job("c", &[]));
    let study = s
        .register_plan(&plan("p", vec![a.clone(), b.clone(), c.clone()]))
        .await
        .unwrap();
    let claim = || async { s.claim(study, &w("w"), &["test"], LEASE).await.unwrap() };
    assert_eq!(claim().await.unwrap().id, a.id);
    assert!(s
        .complete(&a.id, &w("w"), "cpu", &serde_json::json!({}), 0.0)
        .await
        .unwrap());
    assert_eq!(claim().await.unwrap().id, b.id);
    let o = s.fail(&b.id, &w("w"), "boom", None, 0.0).await.unwrap();
    assert_eq!(o, FailOutcome::Failed);
    assert_eq!(claim().await.unwrap().id, c.id);
    assert!(claim().await.is_none());
    assert_eq!(s.retry_failed(study).await.unwrap(), 1);
    assert_eq!(claim().await.unwrap().id, b.id);
    // A second study sharing the finished job `a` runs only its own new job.
    let d = job("d", &[]);
    let other = s
        .register_plan(&plan("q", vec![a.clone(), d.clone()]))
        .await
        .unwrap();
    let got = s.claim(other, &w("w2"), &["test"], LEASE).await.unwrap();
    assert_eq!(got.unwrap().id, d.id);
    assert!(s
        .claim(other, &w("w2"), &["test"], LEASE)
        .await
        .unwrap()
        .is_none());
}

async fn slurm_jobs_are_recorded_once_per_study_in_order(f: impl Fixture) {
    let s = f.open().await;
    let one = s
        .register_plan(&plan("one", vec![job("a", &[])]))
        .await
        .unwrap();
    let two = s
        .register_plan(&plan("two", vec![job("b", &[])]))
        .await
        .unwrap();
    assert!(s.slurm_jobs(one).await.unwrap().is_empty());
    let first = SlurmJob {
        job_id: "1041".into(),
        array_tasks: 1001,
        script: "/runs/slurm/one-20261128T120000Z.sbatch".into(),
        submitted_at: 100.0,
    };
    let second = SlurmJob {
        job_id: "1042;east".into(),
        array_tasks: 7,
        submitted_at: 100.5,
        ..first.clone()
    };
    // Recorded out of order, and the first twice (a retried recording).
    s.record_slurm_job(one, &second).await.unwrap();
    s.record_slurm_job(one, &first).await.unwrap();
    s.record_slurm_job(one, &first).await.unwrap();
    assert_eq!(s.slurm_jobs(one).await.unwrap(), [first, second]);
    assert!(s.slurm_jobs(two).await.unwrap().is_empty());
}

async fn claims_follow_dependencies_and_plan_order(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let b = job("b", &[&a]);
    let c = job("c", &[]);
    let study = s
        .register_plan(&plan("p", vec![a.clone(), b.clone(), c.clone()]))
        .await
        .unwrap();
    let first = s
        .claim(study, &w("w1"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, a.id);
    // b waits for a, so c is next.
    let second = s
        .claim(study, &w("w1"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.id, c.id);
    assert!(s
        .claim(study, &w("w1"), &["test"], LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(s
        .complete(&a.id, &w("w1"), "cpu", &serde_json::json!({}), 1.0)
        .await
        .unwrap());
    let third = s
        .claim(study, &w("w1"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.id, b.id);
    assert_eq!(third.attempt, 1);
}

async fn only_registered_kinds_are_claimed(f: impl Fixture) {
    let s = f.open().await;
    let study = s
        .register_plan(&plan("p", vec![job("a", &[])]))
        .await
        .unwrap();
    assert!(s
        .claim(study, &w("w"), &["other"], LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(s.claim(study, &w("w"), &[], LEASE).await.unwrap().is_none());
}

async fn registering_the_same_plan_twice_keeps_results_and_state(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let p = plan("p", vec![a.clone()]);
    let study = s.register_plan(&p).await.unwrap();
    let _ = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    s.complete(&a.id, &w("w"), "cpu", &serde_json::json!({"x": 1}), 2.0)
        .await
        .unwrap();
    let again = s.register_plan(&p).await.unwrap();
    assert_eq!(study, again);
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Done);
    assert_eq!(jobs[0].result, Some(serde_json::json!({"x": 1})));
    assert!((jobs[0].run_seconds - 2.0).abs() < 1e-9);
    assert!(jobs[0].started_at.is_some() && jobs[0].finished_at.is_some());
    assert_eq!(s.study_by_name("p").await.unwrap().id, study);
    assert_eq!(s.studies().await.unwrap().len(), 1);
    assert!(matches!(
        s.study_by_name("nope").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn only_the_lease_owner_can_complete_or_heartbeat(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.register_worker(&w("owner"), &info("host")).await.unwrap();
    s.claim(study, &w("owner"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert!(!s.heartbeat(&a.id, &w("intruder"), LEASE).await.unwrap());
    assert!(!s
        .complete(&a.id, &w("intruder"), "cpu", &serde_json::json!({}), 0.0)
        .await
        .unwrap());
    assert!(s.heartbeat(&a.id, &w("owner"), LEASE).await.unwrap());
    assert!(s
        .complete(&a.id, &w("owner"), "cpu", &serde_json::json!({}), 0.0)
        .await
        .unwrap());
}

async fn expired_leases_are_interruptions_until_their_cap(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let b = job("b", &[&a]);
    // The cap comes from the spec's `retries.interruptions`.
    let mut p = plan("p", vec![a.clone(), b.clone()]);
    p.study.retries.interruptions = 3;
    let study = s.register_plan(&p).await.unwrap();
    for round in 1..=3u32 {
        let c = s
            .claim(study, &w("dead"), &["test"], Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        // A lost worker is not the job's fault: every claim is still attempt 1.
        assert_eq!(c.attempt, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reaped = s.reap_expired().await.unwrap();
        assert_eq!(reaped.len(), 1);
        assert!(reaped[0].reason.contains("dead"), "{}", reaped[0].reason);
        let want = if round < 3 {
            FailOutcome::WillRetry
        } else {
            FailOutcome::Failed
        };
        assert_eq!(reaped[0].outcome, want);
        let j = &s.study_jobs(study).await.unwrap()[0];
        assert_eq!((j.attempts, j.interruptions), (0, round));
    }
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs[0].state, JobState::Failed);
    let error = jobs[0].error.as_deref().unwrap_or("");
    assert!(error.contains("interrupted 3 times (the cap)"), "{error}");
    assert!(jobs[1].blocked, "a dependent of a failed job is blocked");
    assert!(!jobs[0].blocked, "a failed job is not itself blocked");
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 0));
    // --retry-failed gives the job fresh attempts and interruptions, which unblocks its
    // dependent.
    assert_eq!(s.retry_failed(study).await.unwrap(), 1);
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 2));
    assert_eq!(s.study_jobs(study).await.unwrap()[0].interruptions, 0);
}

async fn the_specs_attempt_cap_applies_and_never_strands_a_pending_job(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let mut p = plan("p", vec![a.clone()]);
    p.study.retries.attempts = 2;
    let study = s.register_plan(&p).await.unwrap();
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    let o = s
        .fail(&a.id, &w("w"), "boom", Some(Duration::ZERO), 0.0)
        .await
        .unwrap();
    assert_eq!(o, FailOutcome::WillRetry);
    // Lowered to 1 below the attempt already spent: the pending job keeps one more run
    // instead of becoming unclaimable.
    p.study.retries.attempts = 1;
    s.register_plan(&p).await.unwrap();
    let c = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .expect("still claimable");
    assert_eq!(c.attempt, 2);
    let o = s
        .fail(&a.id, &w("w"), "boom", Some(Duration::ZERO), 0.0)
        .await
        .unwrap();
    assert_eq!(o, FailOutcome::Failed);
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 0));
}

async fn failures_back_off_then_fail_for_good(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.outstanding(study).await.unwrap(), (1, 0));
    let o = s
        .fail(&a.id, &w("w"), "boom", Some(Duration::from_secs(3600)), 0.5)
        .await
        .unwrap();
    assert_eq!(o, FailOutcome::WillRetry);
    // Backing off: not claimable, but still outstanding.
    assert!(s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 1));
    f.execute("UPDATE jobs SET not_before = 0").await;
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    let o = s
        .fail(&a.id, &w("w"), "not retryable", None, 0.5)
        .await
        .unwrap();
    assert_eq!(o, FailOutcome::Failed);
    let j = &s.study_jobs(study).await.unwrap()[0];
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.as_deref(), Some("not retryable"));
    assert!((j.run_seconds - 1.0).abs() < 1e-9);
    // A worker that no longer holds the job cannot fail it again.
    assert_eq!(
        s.fail(&a.id, &w("w"), "late", Some(LEASE), 0.0)
            .await
            .unwrap(),
        FailOutcome::Failed
    );
    let j = &s.study_jobs(study).await.unwrap()[0];
    assert_eq!(j.error.as_deref(), Some("not retryable"));
}

async fn release_is_an_interruption_not_an_attempt(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    f.execute("UPDATE jobs SET max_interruptions = 2").await;
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    // Not the holder: nothing happens.
    assert_eq!(
        s.release(&a.id, &w("other"), "stop", 1.0).await.unwrap(),
        FailOutcome::WillRetry
    );
    assert_eq!(
        s.study_jobs(study).await.unwrap()[0].state,
        JobState::Running
    );
    assert_eq!(
        s.release(&a.id, &w("w"), "told to stop", 1.0)
            .await
            .unwrap(),
        FailOutcome::WillRetry
    );
    let j = &s.study_jobs(study).await.unwrap()[0];
    assert_eq!(
        (j.state, j.attempts, j.interruptions),
        (JobState::Pending, 0, 1)
    );
    let c = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.attempt, 1);
    // The second interruption reaches the cap of 2: the job fails, saying why.
    assert_eq!(
        s.release(&a.id, &w("w"), "told to stop", 1.0)
            .await
            .unwrap(),
        FailOutcome::Failed
    );
    let j = &s.study_jobs(study).await.unwrap()[0];
    assert_eq!(
        (j.state, j.attempts, j.interruptions),
        (JobState::Failed, 0, 2)
    );
    let error = j.error.as_deref().unwrap_or("");
    assert!(error.contains("interrupted 2 times (the cap)"), "{error}");
    assert!(error.contains("told to stop"), "{error}");
    assert!((j.run_seconds - 2.0).abs() < 1e-9);
}

fn info(host: &str) -> WorkerInfo {
    WorkerInfo {
        host: host.into(),
        pid: 42,
        cpu: "AMD EPYC test".into(),
        device: "cpu".into(),
        slurm_job_id: Some("1001".into()),
        slurm_array_job_id: Some("1000".into()),
        slurm_array_task_id: Some("1".into()),
        studies: vec![StudyId(1)],
    }
}

async fn workers_are_listed_with_their_jobs_and_finished_jobs_name_their_machine(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let b = job("b", &[]);
    let study = s
        .register_plan(&plan("p", vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    s.register_worker(&w("w1"), &info("node-1")).await.unwrap();
    let idle = WorkerInfo {
        slurm_job_id: None,
        slurm_array_job_id: None,
        slurm_array_task_id: None,
        ..info("node-2")
    };
    s.register_worker(&w("w2"), &idle).await.unwrap();
    s.claim(study, &w("w1"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    let workers = s.workers().await.unwrap();
    assert_eq!(workers.len(), 2);
    let w1 = workers.iter().find(|x| x.id == "w1").unwrap();
    assert_eq!(w1.info, info("node-1"));
    assert_eq!(w1.jobs, vec![a.id.clone()]);
    assert_eq!(w1.stopped_at, None);
    let w2 = workers.iter().find(|x| x.id == "w2").unwrap();
    assert_eq!(w2.info, idle);
    assert!(w2.jobs.is_empty());
    assert!(s
        .complete(&a.id, &w("w1"), "cpu", &serde_json::json!({}), 1.0)
        .await
        .unwrap());
    s.worker_stopped(&w("w2")).await.unwrap();
    let workers = s.workers().await.unwrap();
    assert!(workers.iter().all(|x| x.jobs.is_empty()));
    assert!(workers
        .iter()
        .find(|x| x.id == "w2")
        .unwrap()
        .stopped_at
        .is_some());
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs[0].ran_host.as_deref(), Some("node-1"));
    assert_eq!(jobs[0].ran_cpu.as_deref(), Some("AMD EPYC test"));
    assert_eq!(jobs[0].ran_device.as_deref(), Some("cpu"));
    assert_eq!(jobs[1].ran_host, None);
}

/// Every write of a running job names its lease; once the lease is gone (reaped, taken over)
/// nothing is recorded and the writer is told so.
async fn writes_of_a_worker_that_lost_its_lease_are_refused(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.claim(study, &w("old"), &["test"], Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();
    let old = Lease {
        job: a.id.clone(),
        worker: w("old"),
    };
    assert!(s.record_cert(&old, &a.id, &cert(0, 0.5)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(s.reap_expired().await.unwrap().len(), 1);
    s.claim(study, &w("new"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    let art = Artifact {
        name: "model".into(),
        path: "p".into(),
        sha256: "aa".into(),
        bytes: 1,
    };
    assert!(!s.record_cert(&old, &a.id, &cert(1, 9.9)).await.unwrap());
    assert!(!s
        .record_eval(
            &old,
            &a.id,
            &[EvalRow {
                idx: 0,
                label: 1,
                predict: 1
            }]
        )
        .await
        .unwrap());
    assert!(!s
        .record_epoch(&old, &a.id, 0, &serde_json::json!({"loss": 1.0}))
        .await
        .unwrap());
    assert!(!s.record_artifact(&old, &art).await.unwrap());
    assert!(!s.set_progress(&old, 5, 10).await.unwrap());
    assert_eq!(s.cert_done(&a.id).await.unwrap(), vec![0]);
    assert_eq!(s.eval_done(&a.id).await.unwrap(), Vec::<u64>::new());
    assert!(s.epochs(&a.id).await.unwrap().is_empty());
    assert_eq!(s.artifact(&a.id, "model").await.unwrap(), None);
    assert_eq!(s.study_jobs(study).await.unwrap()[0].progress_done, 0);
    // The new holder writes; an image already recorded is accepted without a second row.
    let new = Lease {
        job: a.id.clone(),
        worker: w("new"),
    };
    assert!(s.record_cert(&new, &a.id, &cert(0, 0.5)).await.unwrap());
    assert!(s.record_cert(&new, &a.id, &cert(1, 0.4)).await.unwrap());
    assert!(s.set_progress(&new, 2, 10).await.unwrap());
    assert_eq!(s.study_cert_results(study).await.unwrap().len(), 2);
}

fn cert(idx: u64, radius: f64) -> CertRow {
    CertRow {
        idx,
        label: 3,
        predict: 3,
        radius,
        correct: true,
        c_hat: 3,
        n_a: 990,
        n: 1000,
        n0: 100,
        alpha: 0.001,
        sigma: 0.5,
        seconds: 0.1,
        sequential: None,
    }
}

/// Claims the study's first job for worker `w` and returns its lease.
async fn leased(s: &impl Store, study: StudyId) -> Lease {
    let c = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    Lease {
        job: c.id,
        worker: w("w"),
    }
}

async fn results_are_written_once_per_image(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    let l = leased(&s, study).await;
    assert!(s.record_cert(&l, &a.id, &cert(5, 0.7)).await.unwrap());
    assert!(s.record_cert(&l, &a.id, &cert(0, 0.2)).await.unwrap());
    assert!(s.record_cert(&l, &a.id, &cert(5, 9.9)).await.unwrap());
    let abstain = CertRow {
        predict: -1,
        correct: false,
        ..cert(7, 0.0)
    };
    s.record_cert(&l, &a.id, &abstain).await.unwrap();
    assert_eq!(s.cert_done(&a.id).await.unwrap(), vec![0, 5, 7]);
    let rows = s.study_cert_results(study).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].1, cert(5, 0.7));
    assert_eq!(rows[2].1, abstain);
    let work = s.study_jobs(study).await.unwrap()[0].work_seconds;
    assert!((work - 0.3).abs() < 1e-9, "{work}");
}

async fn eval_results_epochs_artifacts_and_events_round_trip(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    let l = leased(&s, study).await;
    let ev = |idx, label, predict| EvalRow {
        idx,
        label,
        predict,
    };
    s.record_eval(&l, &a.id, &[ev(2, 1, 1), ev(0, 4, 3)])
        .await
        .unwrap();
    s.record_eval(&l, &a.id, &[ev(2, 9, 9), ev(1, 0, 0)])
        .await
        .unwrap();
    s.record_eval(&l, &a.id, &[]).await.unwrap();
    assert_eq!(s.eval_done(&a.id).await.unwrap(), vec![0, 1, 2]);

    s.record_epoch(&l, &a.id, 1, &serde_json::json!({"loss": 2.0}))
        .await
        .unwrap();
    s.record_epoch(&l, &a.id, 0, &serde_json::json!({"loss": 3.0}))
        .await
        .unwrap();
    // A resumed run replaces the epoch's metrics.
    s.record_epoch(&l, &a.id, 1, &serde_json::json!({"loss": 1.5}))
        .await
        .unwrap();
    assert_eq!(
        s.epochs(&a.id).await.unwrap(),
        [
            serde_json::json!({"loss": 3.0}),
            serde_json::json!({"loss": 1.5})
        ]
    );

    assert_eq!(s.artifact(&a.id, "model").await.unwrap(), None);
    let art = |sha: &str| Artifact {
        name: "model".into(),
        path: "artifacts/ab/model.safetensors".into(),
        sha256: sha.into(),
        bytes: 5_000_000_000,
    };
    s.record_artifact(&l, &art("aa")).await.unwrap();
    s.record_artifact(&l, &art("bb")).await.unwrap();
    assert_eq!(s.artifact(&a.id, "model").await.unwrap(), Some(art("bb")));

    s.set_progress(&l, 3, 10).await.unwrap();
    let j = &s.study_jobs(study).await.unwrap()[0];
    assert_eq!((j.progress_done, j.progress_total), (3, 10));
    s.log_event(Some(&a.id), Some(&w("w")), "info", "started")
        .await
        .unwrap();
    s.log_event(None, None, "warn", "no job").await.unwrap();
}

/// Separate stores (separate pools, as separate processes have), each with two claim loops:
/// every job is claimed exactly once.
async fn two_stores_on_one_database_never_claim_the_same_job(f: impl Fixture) {
    let s1 = f.open().await;
    let s2 = f.open().await;
    let n = 60;
    let jobs: Vec<Job> = (0..n).map(|i| job(&format!("j{i}"), &[])).collect();
    let study = s1.register_plan(&plan("p", jobs)).await.unwrap();
    let mut tasks = Vec::new();
    for (k, s) in [s1.clone(), s2.clone(), s1, s2].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let me = w(&format!("claimer{k}"));
            let mut got = Vec::new();
            while let Some(c) = s.claim(study, &me, &["test"], LEASE).await.unwrap() {
                got.push(c.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(claimed, n);
    assert_eq!(all.len(), n);
}

fn cert_row(idx: u64) -> CertRow {
    CertRow {
        idx,
        label: 1,
        predict: 1,
        radius: 0.5,
        correct: true,
        c_hat: 1,
        n_a: 0,
        n: 0,
        n0: 0,
        alpha: 0.0,
        sigma: 0.5,
        seconds: 0.0,
        sequential: None,
    }
}

fn cell(index: usize, method: &str, job: &Job, sigma: f64, kind: &str) -> CellRecord {
    CellRecord {
        cell: index,
        method: method.into(),
        values: [("method".to_string(), serde_json::json!(method))]
            .into_iter()
            .collect(),
        outputs: vec![crate::plan::CellOutput {
            job: job.id.clone(),
            kind: kind.into(),
            sigma: Some(sigma),
            trained_sigma: Some(sigma),
        }],
    }
}

async fn cells_are_recorded_and_imports_survive_a_new_spec_revision(f: impl Fixture) {
    let s = f.open().await;
    let a = job("a", &[]);
    let mut p = plan("p", vec![a.clone()]);
    p.cells = vec![cell(0, "caf", &a, 0.25, "certify")];
    let study = s.register_plan(&p).await.unwrap();
    let cells = s.study_cells(study).await.unwrap();
    assert_eq!(cells.len(), 1);
    assert_eq!(
        (
            cells[0].method.as_str(),
            cells[0].sigma,
            cells[0].job.clone()
        ),
        ("caf", Some(0.25), a.id.clone())
    );

    // An imported log joins the study as its own finished job and cell.
    let imp = JobBuilder {
        kind: "import",
        version: 1,
        label: "published".into(),
        params: serde_json::json!({}),
        identity: serde_json::json!({ "sha256": "x" }),
        deps: Vec::new(),
    }
    .build();
    let rows = [cert_row(0), cert_row(20)];
    let imp_cell = cell(0, "published", &imp, 0.5, "certify");
    s.import_results("p", &imp, &imp_cell, &rows).await.unwrap();
    // Importing it again changes nothing.
    s.import_results("p", &imp, &imp_cell, &rows).await.unwrap();
    let methods =
        |cells: &[CellRow]| -> Vec<String> { cells.iter().map(|c| c.method.clone()).collect() };
    assert_eq!(
        methods(&s.study_cells(study).await.unwrap()),
        ["caf", "published"]
    );
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[1].state, JobState::Done);
    assert_eq!(s.study_cert_results(study).await.unwrap().len(), 2);

    // Re-planning from an edited spec keeps the import in the study.
    let mut p2 = plan("p", vec![a.clone()]);
    p2.study.spec_sha256 = "rev2".into();
    p2.cells = vec![cell(0, "caf", &a, 0.25, "certify")];
    s.register_plan(&p2).await.unwrap();
    assert_eq!(
        methods(&s.study_cells(study).await.unwrap()),
        ["caf", "published"]
    );
    assert_eq!(s.study_jobs(study).await.unwrap().len(), 2);

    // Importing into a study that does not exist yet creates it.
    let other = s
        .import_results("elsewhere", &imp, &imp_cell, &rows)
        .await
        .unwrap();
    assert_ne!(other, study);
    assert_eq!(s.study_jobs(other).await.unwrap().len(), 1);
}

/// Several processes registering one plan at the same moment (every `caf run` of a shared
/// study does): each registration reads the previous revision before writing.
async fn concurrent_registrations_of_one_plan_all_succeed(f: impl Fixture) {
    let f = Arc::new(f);
    f.open().await;
    let jobs: Vec<Job> = (0..20).map(|i| job(&format!("j{i}"), &[])).collect();
    for round in 0..6 {
        let tasks: Vec<_> = (0..6)
            .map(|k| {
                let f = f.clone();
                let mut pl = plan("shared", jobs.clone());
                // Alternate revisions so the carry-over path runs too.
                pl.study.spec_sha256 = format!("rev{}", (round + k) % 2);
                tokio::spawn(async move {
                    let s = f.open().await;
                    s.register_plan(&pl).await.map(|_| ())
                })
            })
            .collect();
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    let s = f.open().await;
    let study = s.study_by_name("shared").await.unwrap();
    assert_eq!(s.study_jobs(study.id).await.unwrap().len(), 20);
}

async fn a_shared_job_keeps_each_studys_label(f: impl Fixture) {
    let s = f.open().await;
    let named = |label: &str| {
        let mut j = job("shared", &[]);
        j.label = label.into();
        j
    };
    let (in_p, in_q) = (named("lr=0.01 schedule=cosine"), named("caf σ=0.5"));
    assert_eq!(
        in_p.id, in_q.id,
        "the label is not part of a job's identity"
    );
    let p = s.register_plan(&plan("p", vec![in_p])).await.unwrap();
    let q = s.register_plan(&plan("q", vec![in_q])).await.unwrap();
    let label_in = |rows: Vec<JobStatus>| rows.into_iter().map(|j| j.label).collect::<Vec<_>>();
    assert_eq!(
        label_in(s.study_jobs(p).await.unwrap()),
        ["lr=0.01 schedule=cosine"]
    );
    assert_eq!(label_in(s.study_jobs(q).await.unwrap()), ["caf σ=0.5"]);
    // The worker of study p logs the job under p's name although q registered it last.
    let claimed = s
        .claim(p, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.label, "lr=0.01 schedule=cosine");
}

async fn a_plans_progress_unit_is_what_status_reads(f: impl Fixture) {
    use crate::plan::ProgressUnit;
    let s = f.open().await;
    let train = job("train", &[]).counted_in(ProgressUnit::Epochs);
    let cert = job("cert", &[&train]);
    let study = s
        .register_plan(&plan("units", vec![train, cert]))
        .await
        .unwrap();
    let jobs = s.study_jobs(study).await.unwrap();
    let training: Vec<bool> = jobs.iter().map(|j| j.is_training()).collect();
    assert_eq!(training, [true, false]);
}

/// `precision` is a column computed from the params JSON (json_extract in SQLite, a stored
/// generated column in PostgreSQL): both must read the same.
async fn a_jobs_precision_comes_from_its_params(f: impl Fixture) {
    let s = f.open().await;
    let mut bf16 = job("bf16", &[]);
    bf16.params = serde_json::json!({ "precision": "bf16", "n": 10 });
    let f32_job = job("f32", &[]);
    let study = s
        .register_plan(&plan("prec", vec![bf16, f32_job]))
        .await
        .unwrap();
    let precisions: Vec<String> = s
        .study_jobs(study)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.precision)
        .collect();
    assert_eq!(precisions, ["bf16", "f32"]);
    let claimed = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.params["n"], 10);
}

/// A sequential row round-trips with the bound's inputs and decisions, next to a Cohen row
/// whose sequential columns stay empty; `cert_draws` counts n0 + n of both, and the draws unit
/// is what status reads.
async fn sequential_rows_keep_what_recomputes_them(f: impl Fixture) {
    use crate::certify::sequential::Decision;
    use crate::plan::ProgressUnit;
    let s = f.open().await;
    let a = job("a", &[]).counted_in(ProgressUnit::Draws);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    let seq = CertRow {
        n_a: 2_396,
        n: 2_400,
        sequential: Some(SequentialRow {
            n_max: 100_000,
            lower: 0.9921,
            upper: 0.99995,
            prior_a: 1.0,
            prior_b: 0.25,
            radii: vec![0.25, 0.5, 1.5],
            decisions: vec![
                Decision::Certified,
                Decision::Certified,
                Decision::Impossible,
            ],
            stopped_wrong: false,
        }),
        ..cert(1, 0.6)
    };
    let wrong = CertRow {
        predict: -1,
        correct: false,
        n_a: 0,
        n: 0,
        radius: 0.0,
        sequential: Some(SequentialRow {
            n_max: 100_000,
            lower: 0.0,
            upper: 1.0,
            prior_a: 1.0,
            prior_b: 0.25,
            radii: vec![0.25],
            decisions: vec![Decision::Undecided],
            stopped_wrong: true,
        }),
        ..cert(2, 0.0)
    };
    let lease = leased(&s, study).await;
    assert_eq!(lease.job, a.id);
    for row in [cert(0, 0.3), seq.clone(), wrong.clone()] {
        assert!(s.record_cert(&lease, &a.id, &row).await.unwrap());
    }
    let rows = s.study_cert_results(study).await.unwrap();
    let rows: Vec<CertRow> = rows.into_iter().map(|(_, r)| r).collect();
    assert_eq!(rows, vec![cert(0, 0.3), seq, wrong]);
    assert_eq!(s.cert_draws(&a.id).await.unwrap(), 1_100 + 2_500 + 100);
    let j = job("b", &[]);
    assert_eq!(s.cert_draws(&j.id).await.unwrap(), 0);
    assert_eq!(
        s.study_jobs(study).await.unwrap()[0].unit,
        ProgressUnit::Draws
    );
}
