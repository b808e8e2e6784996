//! What only the PostgreSQL backend has to get right: concurrent opens of a fresh database,
//! schema versions, and claims under real concurrency. Run against the server named by
//! `CAF_TEST_POSTGRES` (skipped, saying so, when it is unset); the store's behaviour on every
//! backend is in `store/tests.rs`.

use std::time::Duration;

use super::*;
use crate::plan::testing::plan;
use crate::plan::Job;
use crate::store::testing::{Fixture, PgFixture, PG_ENV};
use sqlx::ConnectOptions;

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("test", name, deps)
}

fn w(name: &str) -> WorkerId {
    WorkerId(name.into())
}

const LEASE: Duration = Duration::from_secs(30);

/// The fixture, or `None` after saying the test is skipped.
async fn fixture(test: &str) -> Option<PgFixture> {
    let f = PgFixture::new().await;
    match &f {
        Some(f) => eprintln!("postgres: running {test} in {}", f.name()),
        None => eprintln!("postgres: skipped {test} ({PG_ENV} is unset)"),
    }
    f
}

#[test]
fn both_backends_have_the_same_schema_versions() {
    let versions = |m: &sqlx::migrate::Migrator| m.iter().map(|m| m.version).collect::<Vec<_>>();
    assert_eq!(
        versions(&MIGRATOR),
        versions(&crate::store::sqlite::MIGRATOR)
    );
    let names = |m: &sqlx::migrate::Migrator| {
        m.iter()
            .map(|m| m.description.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&MIGRATOR), names(&crate::store::sqlite::MIGRATOR));
}

#[test]
fn an_unparsable_url_is_an_open_error_without_its_password() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(PgStore::open("postgres://caf:s3cr3t@db:notaport/caf"))
        .unwrap_err();
    assert!(matches!(err, StoreError::Open { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("postgres://caf:***@db:notaport/caf"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
}

/// Every `caf run` of a study opens (and so migrates) the database: a fresh one opened by
/// many processes at once must come up once, whole. sqlx's PostgreSQL migrator serializes
/// them on an advisory lock; without it the losers' `CREATE TABLE` would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_processes_can_open_a_fresh_database_at_once() {
    for round in 0..3 {
        let Some(f) = fixture("many_processes_can_open_a_fresh_database_at_once").await else {
            return;
        };
        let f = std::sync::Arc::new(f);
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move {
                    PgStore::connect(f.options(), f.name(), 2)
                        .await
                        .map(|s| s.pool.clone())
                })
            })
            .collect();
        for o in opens {
            let pool = o
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            pool.close().await;
        }
        let s = f.open().await;
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(applied as usize, MIGRATOR.iter().count());
        let study = s
            .register_plan(&plan("p", vec![job("a", &[])]))
            .await
            .unwrap();
        assert!(s
            .claim(study, &w("w"), &["test"], LEASE)
            .await
            .unwrap()
            .is_some());
        s.close().await;
    }
}

#[tokio::test]
async fn a_database_from_a_newer_caf_is_refused_by_name_and_left_intact() {
    let Some(f) = fixture("a_database_from_a_newer_caf_is_refused_by_name_and_left_intact").await
    else {
        return;
    };
    let s = f.open().await;
    s.register_plan(&plan("p", vec![job("a", &[])]))
        .await
        .unwrap();
    // What a later caf leaves behind: a migration this build has never seen.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000001, 'from the future', TRUE, '\\x00'::bytea, 0)",
    )
    .execute(&s.pool)
    .await
    .unwrap();
    s.close().await;
    let err = PgStore::connect(f.options(), "the test database", 1)
        .await
        .unwrap_err();
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
    assert!(err.to_string().contains("the test database"), "{err}");
    // Nothing was touched, and the refused open left no migration lock behind: a raw
    // connection still reads the study, and a second refusal comes as quickly as the first.
    let mut conn = f.options().connect().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM studies")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    let again = tokio::time::timeout(
        Duration::from_secs(10),
        PgStore::connect(f.options(), "the test database", 1),
    )
    .await
    .expect("a second open waited on a lock the first left");
    assert!(matches!(again, Err(StoreError::NewerSchema { .. })));
}

#[tokio::test]
async fn migration_6_marks_training_and_imported_jobs_of_older_databases() {
    let Some(f) = fixture("migration_6_marks_training_and_imported_jobs_of_older_databases").await
    else {
        return;
    };
    let s = f.open().await;
    let pool = s.pool_for_tests();
    // Rows as a caf before migration 6 left them: the new columns at their defaults.
    for (id, kind) in [("t", "train-caf"), ("i", "import"), ("c", "certify")] {
        sqlx::query(
            "INSERT INTO jobs (id, kind, label, params, created_at) VALUES ($1, $2, $3, '{}', 0)",
        )
        .bind(id)
        .bind(kind)
        .bind(kind)
        .execute(&pool)
        .await
        .unwrap();
    }
    let migration =
        include_str!("../../../migrations/postgres/20261128000006_job_unit_external.sql");
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

/// Many workers on separate pools claiming, completing and unblocking dependents at once:
/// every job runs exactly once, a dependent only after its dependency is done, and no
/// claimer errors (no deadlocks, no serialization failures).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_workers_run_every_job_exactly_once() {
    let Some(f) = fixture("concurrent_workers_run_every_job_exactly_once").await else {
        return;
    };
    // 50 chains of three: a dependent becomes claimable only when its predecessor is done.
    let mut jobs = Vec::new();
    for c in 0..50 {
        let a = job(&format!("c{c}a"), &[]);
        let b = job(&format!("c{c}b"), &[&a]);
        let d = job(&format!("c{c}c"), &[&b]);
        jobs.extend([a, b, d]);
    }
    let n = jobs.len();
    let deps: std::collections::HashMap<JobId, Vec<JobId>> = jobs
        .iter()
        .map(|j| (j.id.clone(), j.deps.clone()))
        .collect();
    let first = f.open().await;
    let study = first.register_plan(&plan("stress", jobs)).await.unwrap();
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::<JobId>::new()));
    let mut tasks = Vec::new();
    for k in 0..8 {
        let s = f.open().await;
        let done = done.clone();
        let deps = deps.clone();
        tasks.push(tokio::spawn(async move {
            let me = w(&format!("worker{k}"));
            loop {
                match s.claim(study, &me, &["test"], LEASE).await.unwrap() {
                    Some(c) => {
                        {
                            let finished = done.lock().unwrap();
                            for d in &deps[&c.id] {
                                assert!(finished.contains(d), "{} ran before {d}", c.id);
                            }
                        }
                        assert!(s.heartbeat(&c.id, &me, LEASE).await.unwrap());
                        done.lock().unwrap().push(c.id.clone());
                        assert!(s
                            .complete(&c.id, &me, "cpu", &serde_json::json!({}), 0.0)
                            .await
                            .unwrap());
                    }
                    None => {
                        let (running, pending) = s.outstanding(study).await.unwrap();
                        if running == 0 && pending == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        }));
        // The reaper runs alongside, as every worker's does.
        let s = f.open().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                assert!(s.reap_expired().await.unwrap().is_empty());
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = done.lock().unwrap().clone();
    let ran = all.len();
    all.sort();
    all.dedup();
    assert_eq!((ran, all.len()), (n, n));
    let jobs = first.study_jobs(study).await.unwrap();
    assert!(jobs
        .iter()
        .all(|j| j.state == JobState::Done && j.attempts == 1));
}
