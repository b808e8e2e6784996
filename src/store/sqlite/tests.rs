//! The SQLite store's lease protocol on real database files.

use std::time::Duration;

use super::*;
use crate::plan::{Job, JobBuilder};

use crate::plan::testing::plan;

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("test", name, deps)
}

fn w(name: &str) -> WorkerId {
    WorkerId(name.into())
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn claims_follow_dependencies_and_plan_order() {
    let s = SqliteStore::in_memory().await.unwrap();
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
        .complete(&a.id, &w("w1"), &serde_json::json!({}), 1.0)
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

#[tokio::test]
async fn only_registered_kinds_are_claimed() {
    let s = SqliteStore::in_memory().await.unwrap();
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

#[tokio::test]
async fn registering_the_same_plan_twice_keeps_results_and_state() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let p = plan("p", vec![a.clone()]);
    let study = s.register_plan(&p).await.unwrap();
    let _ = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    s.complete(&a.id, &w("w"), &serde_json::json!({"x": 1}), 2.0)
        .await
        .unwrap();
    let again = s.register_plan(&p).await.unwrap();
    assert_eq!(study, again);
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Done);
    assert_eq!(jobs[0].result, Some(serde_json::json!({"x": 1})));
}

#[tokio::test]
async fn only_the_lease_owner_can_complete_or_heartbeat() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.claim(study, &w("owner"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert!(!s.heartbeat(&a.id, &w("intruder"), LEASE).await.unwrap());
    assert!(!s
        .complete(&a.id, &w("intruder"), &serde_json::json!({}), 0.0)
        .await
        .unwrap());
    assert!(s.heartbeat(&a.id, &w("owner"), LEASE).await.unwrap());
    assert!(s
        .complete(&a.id, &w("owner"), &serde_json::json!({}), 0.0)
        .await
        .unwrap());
}

#[tokio::test]
async fn expired_leases_are_reaped_and_rerun_until_attempts_run_out() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let b = job("b", &[&a]);
    let study = s
        .register_plan(&plan("p", vec![a.clone(), b.clone()]))
        .await
        .unwrap();
    for attempt in 1..=3u32 {
        let c = s
            .claim(study, &w("dead"), &["test"], Duration::from_millis(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.attempt, attempt);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reaped = s.reap_expired().await.unwrap();
        assert_eq!(reaped.len(), 1);
        assert!(reaped[0].reason.contains("dead"));
        let want = if attempt < 3 {
            FailOutcome::WillRetry
        } else {
            FailOutcome::Failed
        };
        assert_eq!(reaped[0].outcome, want);
    }
    let jobs = s.study_jobs(study).await.unwrap();
    assert_eq!(jobs[0].state, JobState::Failed);
    assert!(jobs[1].blocked, "a dependent of a failed job is blocked");
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 0));
    // --retry-failed gives the job fresh attempts, which unblocks its dependent.
    assert_eq!(s.retry_failed(study).await.unwrap(), 1);
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 2));
}

#[tokio::test]
async fn failures_back_off_then_fail_for_good() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
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
    let s2 = s.clone();
    sqlx::query("UPDATE jobs SET not_before = 0")
        .execute(&s2.pool_for_tests())
        .await
        .unwrap();
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
}

#[tokio::test]
async fn release_returns_the_job_without_counting_the_attempt() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    s.claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    s.release(&a.id, &w("w"), 1.0).await.unwrap();
    let c = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.attempt, 1);
}

#[tokio::test]
async fn results_are_written_once_per_image() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    let row = |idx: u64, radius: f64| CertRow {
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
    };
    s.record_cert(&a.id, &row(5, 0.7)).await.unwrap();
    s.record_cert(&a.id, &row(0, 0.2)).await.unwrap();
    s.record_cert(&a.id, &row(5, 9.9)).await.unwrap();
    assert_eq!(s.cert_done(&a.id).await.unwrap(), vec![0, 5]);
    let rows = s.study_cert_results(study).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].1, row(5, 0.7));
}

#[tokio::test]
async fn two_stores_on_one_file_never_claim_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("caf.db");
    let s1 = SqliteStore::open(&path).await.unwrap();
    let s2 = SqliteStore::open(&path).await.unwrap();
    let jobs: Vec<Job> = (0..40).map(|i| job(&format!("j{i}"), &[])).collect();
    let study = s1.register_plan(&plan("p", jobs)).await.unwrap();
    let grab = |s: SqliteStore, name: &'static str| async move {
        let mut got = Vec::new();
        while let Some(c) = s.claim(study, &w(name), &["test"], LEASE).await.unwrap() {
            got.push(c.id);
        }
        got
    };
    let (a, b) = tokio::join!(tokio::spawn(grab(s1, "one")), tokio::spawn(grab(s2, "two")));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut all: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
    all.sort();
    all.dedup();
    assert_eq!(a.len() + b.len(), 40);
    assert_eq!(all.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_can_create_the_same_database_at_once() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.db");
        let opens: Vec<_> = (0..6)
            .map(|_| {
                let p = path.clone();
                tokio::spawn(async move { SqliteStore::open(&p).await.map(|_| ()) })
            })
            .collect();
        for o in opens {
            o.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let s = SqliteStore::open(&path).await.unwrap();
        let study = s
            .register_plan(&plan("p", vec![job("a", &[])]))
            .await
            .unwrap();
        assert!(s
            .claim(study, &w("w"), &["test"], LEASE)
            .await
            .unwrap()
            .is_some());
    }
}

#[tokio::test]
async fn a_database_from_a_newer_caf_is_refused_by_name_and_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer.db");
    let s = SqliteStore::open(&path).await.unwrap();
    s.register_plan(&plan("p", vec![job("a", &[])]))
        .await
        .unwrap();
    // What a later caf leaves behind: a migration this build has never seen.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'from the future', TRUE, X'00', 0)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    drop(s);
    let err = match SqliteStore::open(&path).await {
        Ok(_) => panic!("a newer schema was opened"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            StoreError::NewerSchema {
                version: 29991231000001,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer caf"), "{err}");
    // Nothing was touched: the study is still there for the caf that can read it.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM studies")
        .fetch_one(
            &SqlitePool::connect(&format!("sqlite:{}", path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rows, 1);
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
    }
}

fn cell(index: usize, method: &str, job: &Job, sigma: f64, kind: &str) -> crate::plan::CellRecord {
    crate::plan::CellRecord {
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

#[tokio::test]
async fn cells_are_recorded_and_imports_survive_a_new_spec_revision() {
    let s = SqliteStore::in_memory().await.unwrap();
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
}

/// Several processes registering one plan at the same moment (every `caf run` of a shared
/// study does): each registration reads the previous revision before writing, which a
/// deferred SQLite transaction cannot always upgrade to a write (SQLITE_BUSY_SNAPSHOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_one_plan_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    SqliteStore::open(&path).await.unwrap();
    let jobs: Vec<Job> = (0..20).map(|i| job(&format!("j{i}"), &[])).collect();
    for round in 0..10 {
        let tasks: Vec<_> = (0..6)
            .map(|k| {
                let p = path.clone();
                let mut pl = plan("shared", jobs.clone());
                // Alternate revisions so the carry-over path runs too.
                pl.study.spec_sha256 = format!("rev{}", (round + k) % 2);
                tokio::spawn(async move {
                    let s = SqliteStore::open(&p).await?;
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
}

#[tokio::test]
async fn a_shared_job_keeps_each_studys_label() {
    let s = SqliteStore::in_memory().await.unwrap();
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

#[tokio::test]
async fn migration_6_marks_training_and_imported_jobs_of_older_databases() {
    let s = SqliteStore::in_memory().await.unwrap();
    let pool = s.pool_for_tests();
    // Rows as a caf before migration 6 left them: the new columns at their defaults.
    for (id, kind) in [("t", "train-caf"), ("i", "import"), ("c", "certify")] {
        sqlx::query(
            "INSERT INTO jobs (id, kind, label, params, created_at) VALUES (?, ?, ?, '{}', 0)",
        )
        .bind(id)
        .bind(kind)
        .bind(kind)
        .execute(&pool)
        .await
        .unwrap();
    }
    let migration = include_str!("../../../migrations/20261128000006_job_unit_external.sql");
    for stmt in migration.split(';').filter(|s| s.contains("UPDATE")) {
        sqlx::query(AssertSqlSafe(stmt.to_string()))
            .execute(&pool)
            .await
            .unwrap();
    }
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, unit, external FROM jobs ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            ("c".to_string(), "images".to_string(), 0),
            ("i".to_string(), "images".to_string(), 1),
            ("t".to_string(), "epochs".to_string(), 0),
        ]
    );
}

#[tokio::test]
async fn a_plans_progress_unit_is_what_status_reads() {
    use crate::plan::ProgressUnit;
    let s = SqliteStore::in_memory().await.unwrap();
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
