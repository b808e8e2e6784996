//! The real binary on a real PostgreSQL server (`CAF_TEST_POSTGRES`, set by `.ci/run`): a study
//! run with `--db postgres://…` exports exactly what the same study run on SQLite exports.

use sqlx::Connection;

use super::util::*;

/// A fresh database on the test server, or `None` (with a note) when no server is configured.
pub(super) fn fresh_database() -> Option<String> {
    let Ok(server) = std::env::var("CAF_TEST_POSTGRES") else {
        eprintln!("postgres: skipped (CAF_TEST_POSTGRES is unset)");
        return None;
    };
    let name = format!("caf_it_{}_{:08x}", std::process::id(), rand_suffix());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(&server)
            .await
            .expect("connect to CAF_TEST_POSTGRES");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .expect("create database");
    });
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    Some(format!("{base}/{name}"))
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[test]
fn a_study_on_postgres_exports_what_it_exports_on_sqlite() {
    let Some(url) = fresh_database() else {
        return;
    };
    let dir = Dir::new();
    dir.write(
        "s.yaml",
        &resnet_spec("pg-vs-sqlite", "0.25, 0.5", 20, 200, 20),
    );
    ok(&dir.run(&[
        "run",
        "s.yaml",
        "--db",
        "local.db",
        "--artifacts",
        "a1",
        "-q",
    ]));
    ok(&dir.run(&["run", "s.yaml", "--db", &url, "--artifacts", "a2", "-q"]));
    let sqlite = ok(&dir.run(&["export", "--db", "local.db", "--format", "csv"]));
    // CAF_DB is the default for --db.
    let postgres = ok(&dir
        .cmd(&["export", "--format", "csv"])
        .env("CAF_DB", &url)
        .output()
        .expect("run caf"));
    assert!(sqlite.lines().count() > 5, "{sqlite}");
    assert_eq!(sqlite, postgres);
    // A second run finds everything done on the server and runs nothing.
    let again = dir.run(&["run", "s.yaml", "--db", &url, "--artifacts", "a2", "-q"]);
    assert!(text(&ok_status(&again)).contains("jobs done"));
}

/// Asserts success and returns stderr (where `caf run` writes its summary).
#[track_caller]
fn ok_status(out: &std::process::Output) -> Vec<u8> {
    ok(out);
    out.stderr.clone()
}

#[test]
fn a_password_never_appears_in_an_error() {
    let dir = Dir::new();
    let out = dir.run(&["status", "--db", "postgres://caf:hunter2@127.0.0.1:1/none"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("postgres://caf:***@127.0.0.1:1/none"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
