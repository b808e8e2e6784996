//! What only the SQLite backend has to get right: many processes creating and migrating one
//! file, schema versions, and its private in-memory databases. The lease protocol and the
//! rest of the store's behaviour are tested on every backend in `store/tests.rs`.

use std::time::Duration;

use super::*;
use crate::plan::Job;

use crate::plan::testing::plan;

fn job(name: &str, deps: &[&Job]) -> Job {
    crate::plan::testing::job("test", name, deps)
}

fn w(name: &str) -> WorkerId {
    WorkerId(name.into())
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_in_memory_store_is_a_whole_store() {
    let s = SqliteStore::in_memory().await.unwrap();
    let a = job("a", &[]);
    let study = s.register_plan(&plan("p", vec![a.clone()])).await.unwrap();
    let c = s
        .claim(study, &w("w"), &["test"], LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.id, a.id);
    assert!(s
        .complete(&a.id, &w("w"), "cpu", &serde_json::json!({}), 1.0)
        .await
        .unwrap());
    assert_eq!(s.outstanding(study).await.unwrap(), (0, 0));
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
    let migration = include_str!("../../../migrations/sqlite/20261128000006_job_unit_external.sql");
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

/// The plan SQLite picks for `sql`, one line per step.
async fn query_plan(s: &SqliteStore, sql: &str) -> String {
    let rows = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
        .fetch_all(&s.pool)
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_finished_job_finds_its_study_rows_by_index_not_by_scanning_them() {
    // The statement of the jobs_status_keeps_open trigger, which runs once per finished job:
    // a scan here made a short-job sweep's per-job overhead grow with the study's size.
    let s = SqliteStore::in_memory().await.unwrap();
    let plan = query_plan(
        &s,
        "UPDATE study_jobs SET open = ('done' NOT IN ('done', 'failed')) WHERE job_id = 'x'",
    )
    .await;
    assert!(
        plan.contains("USING INDEX study_jobs_job") && !plan.contains("SCAN"),
        "{plan}"
    );
    // What the blocked-job walk joins on, from a failed job to its dependents.
    let plan = query_plan(&s, "SELECT job_id FROM job_deps WHERE dep_id = 'x'").await;
    assert!(
        plan.contains("job_deps_dep") && !plan.contains("SCAN"),
        "{plan}"
    );
}
