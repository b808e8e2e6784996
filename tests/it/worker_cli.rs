//! `caf worker` as a cluster runs it: several processes on one store, stopped by signals,
//! killed outright, and cut off from PostgreSQL for a while. Each test compares the results
//! with a plain local `caf run` of the same spec, byte for byte.
//!
//! The PostgreSQL tests need `CAF_TEST_POSTGRES` (`scripts/services.sh start`); without it they
//! say so and return, except where a local SQLite file tests the same thing.

use std::process::{Child, Output};
use std::time::Duration;

use sqlx::Connection;

use super::util::*;

/// A fresh database on the server `server` (a `postgres://…/db` URL), as a URL.
fn fresh_database_on(server: &str) -> String {
    let name = format!(
        "caf_worker_{}_{:08x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(server)
            .await
            .expect("connect to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut c)
            .await
            .expect("create database");
    });
    let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
    format!("{base}/{name}")
}

/// A fresh PostgreSQL database on `CAF_TEST_POSTGRES`, or `None` (with a note).
fn postgres() -> Option<String> {
    match std::env::var("CAF_TEST_POSTGRES") {
        Ok(server) => Some(fresh_database_on(&server)),
        Err(_) => {
            eprintln!("postgres: skipped (CAF_TEST_POSTGRES is unset)");
            None
        }
    }
}

fn export_csv(dir: &Dir, db: &str) -> String {
    ok(&dir.run(&["export", "--db", db, "--format", "csv"]))
}

/// The reference: the same spec run by one local `caf run` on SQLite.
fn reference(dir: &Dir, spec: &str) -> String {
    ok(&dir.run(&[
        "run",
        spec,
        "--db",
        "ref.db",
        "--artifacts",
        "ref-art",
        "-q",
    ]));
    export_csv(dir, "ref.db")
}

fn status(dir: &Dir, db: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", db]))).expect("status JSON")
}

fn jobs(st: &serde_json::Value) -> Vec<serde_json::Value> {
    st[0]["jobs"].as_array().cloned().unwrap_or_default()
}

/// The study's one certification job (the spec also plans a clean-accuracy `eval` job).
fn certify_job(dir: &Dir, db: &str) -> serde_json::Value {
    let all = jobs(&status(dir, db));
    let mut certify: Vec<_> = all.into_iter().filter(|j| j["kind"] == "certify").collect();
    assert_eq!(certify.len(), 1, "{certify:?}");
    certify.remove(0)
}

fn worker(dir: &Dir, db: &str, extra: &[&str]) -> Child {
    let mut args = vec!["worker", "--db", db, "--artifacts", "art", "-q"];
    args.extend_from_slice(extra);
    dir.spawn(&args)
}

fn signal(child: &Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// SIGUSR2 (Slurm's walltime/preemption warning) stops a worker after the image in flight:
/// the lease is handed back as an interruption (the attempt is not counted), the worker's
/// Slurm ids are in `caf status`, and another worker finishes with identical results.
#[test]
fn sigusr2_hands_the_job_back_as_an_interruption() {
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("usr2", "0.25", 20, 200, 4));
    let want = reference(&dir, "s.yaml");
    let plan = ok(&dir.run(&["plan", "s.yaml", "--record", "--db", "w.db"]));
    assert!(plan.contains("2 jobs"), "{plan}");
    let child = dir
        .cmd(&["worker", "--db", "w.db", "--artifacts", "art", "-q"])
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_ARRAY_JOB_ID", "4240")
        .env("SLURM_ARRAY_TASK_ID", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn caf worker");
    assert!(
        wait_until(Duration::from_secs(300), || images_done(&dir, "w.db") >= 2),
        "the worker made no progress"
    );
    // While it runs, status shows it holding the job.
    let st = status(&dir, "w.db");
    let w = &st[0]["workers"][0];
    assert_eq!(w["slurm_job_id"], "4242", "{st}");
    assert_eq!(w["slurm_array_job_id"], "4240");
    assert_eq!(w["slurm_array_task_id"], "2");
    assert_eq!(w["device"], "cpu");
    assert!(w["cpu"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(w["jobs"].as_array().map(Vec::len), Some(1), "{st}");
    signal(&child, "-USR2");
    let out = finish(child, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let j = &certify_job(&dir, "w.db");
    assert_eq!(j["state"], "pending", "{j}");
    assert_eq!(j["attempts"], 0);
    assert_eq!(j["interruptions"], 1);
    let st = status(&dir, "w.db");
    assert!(st[0]["workers"][0]["stopped_at"].is_number(), "{st}");
    let text_status = ok(&dir.run(&["status", "--db", "w.db"]));
    assert!(text_status.contains("INT"), "{text_status}");

    let out = finish(worker(&dir, "w.db", &[]), Duration::from_secs(300));
    ok(&out);
    let j = &certify_job(&dir, "w.db");
    assert_eq!(j["state"], "done");
    assert_eq!(
        (j["attempts"].as_u64(), j["interruptions"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(j["ran_device"], "cpu");
    assert!(j["ran_host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(export_csv(&dir, "w.db"), want);
}

/// Four workers on one PostgreSQL study: each job is claimed once (one attempt, no
/// interruption), and the export is byte-identical to a local SQLite `caf run`.
#[test]
fn four_workers_on_postgres_run_every_job_once() {
    let Some(url) = postgres() else {
        return;
    };
    let dir = Dir::new();
    dir.write(
        "s.yaml",
        &resnet_spec("four", "0.12, 0.25, 0.37, 0.5, 0.75, 1.0", 20, 100, 25),
    );
    let want = reference(&dir, "s.yaml");
    ok(&dir.run(&["plan", "s.yaml", "--record", "--db", &url]));
    let workers: Vec<Child> = (0..4).map(|_| worker(&dir, &url, &[])).collect();
    for w in workers {
        ok(&finish(w, Duration::from_secs(600)));
    }
    let js = jobs(&status(&dir, &url));
    assert_eq!(js.len(), 7, "six certifications and a clean-accuracy job");
    for j in &js {
        assert_eq!(j["state"], "done", "{j}");
        assert_eq!(j["attempts"], 1, "claimed more than once: {j}");
        assert_eq!(j["interruptions"], 0, "{j}");
    }
    assert_eq!(export_csv(&dir, &url), want);
}

/// A worker killed with SIGKILL mid-job: its lease expires, another worker takes the job
/// over and finishes it; the kill is an interruption, not an attempt, and no image is
/// recorded twice. On PostgreSQL when configured, else on SQLite.
#[test]
fn a_killed_workers_job_is_finished_by_another() {
    let dir = Dir::new();
    let db = postgres().unwrap_or_else(|| "k.db".into());
    dir.write("s.yaml", &resnet_spec("kill", "0.25", 20, 200, 4));
    let want = reference(&dir, "s.yaml");
    ok(&dir.run(&["plan", "s.yaml", "--record", "--db", &db]));
    let mut first = worker(&dir, &db, &["--lease-secs", "2"]);
    assert!(
        wait_until(Duration::from_secs(300), || images_done(&dir, &db) >= 3),
        "the first worker made no progress"
    );
    first.kill().expect("kill -9");
    first.wait().expect("reap");
    let second = finish(
        worker(&dir, &db, &["--lease-secs", "2"]),
        Duration::from_secs(300),
    );
    let log = text(&second.stderr);
    ok(&second);
    assert!(log.contains("worker: 1 done"), "{log}");
    let j = &certify_job(&dir, &db);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["attempts"], 1, "the kill cost no attempt: {j}");
    assert_eq!(j["interruptions"], 1, "{j}");
    let got = export_csv(&dir, &db);
    assert_eq!(got.lines().count(), 1 + 25, "{got}");
    assert_eq!(got, want);
}

/// A PostgreSQL server of its own (so stopping it disturbs no other test), through
/// `scripts/services.sh` with its own directory and port; stopped and deleted on drop.
struct OwnServer {
    dir: tempfile::TempDir,
    port: String,
}

impl OwnServer {
    fn services(&self, what: &str) -> Output {
        std::process::Command::new(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/services.sh"),
        )
        // PostgreSQL only: the shared Slurm of the other tests keeps its ports.
        .args([what, "postgres"])
        .env("CAF_SERVICES_DIR", self.dir.path().join("svc"))
        .env("CAF_PG_PORT", &self.port)
        .output()
        .expect("run scripts/services.sh")
    }

    fn start() -> (Self, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        // World-readable, since the server may run as the `postgres` user.
        let _ = std::process::Command::new("chmod")
            .args(["755", &dir.path().display().to_string()])
            .status();
        let port = (55000 + std::process::id() % 5000).to_string();
        let server = Self { dir, port };
        let out = server.services("start");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let line = text(&out.stdout);
        let url = line
            .trim()
            .strip_prefix("export CAF_TEST_POSTGRES=")
            .expect("services.sh prints the URL")
            .to_string();
        (server, url)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.services("stop");
    }
}

/// PostgreSQL stopped for 20 s mid-sweep and started again: the workers keep their jobs,
/// retry the store with backoff, carry on when it is back, and the sweep completes with the
/// results of an uninterrupted local run.
#[test]
fn a_postgres_outage_mid_sweep_loses_nothing() {
    if std::env::var("CAF_TEST_POSTGRES").is_err() {
        eprintln!("postgres outage: skipped (CAF_TEST_POSTGRES is unset)");
        return;
    }
    let (server, base) = OwnServer::start();
    let url = fresh_database_on(&base);
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("outage", "0.25, 0.5", 20, 200, 4));
    let want = reference(&dir, "s.yaml");
    ok(&dir.run(&["plan", "s.yaml", "--record", "--db", &url]));
    let workers: Vec<Child> = (0..2).map(|_| worker(&dir, &url, &[])).collect();
    assert!(
        wait_until(Duration::from_secs(300), || images_done(&dir, &url) >= 2),
        "the workers made no progress"
    );
    let out = server.services("pause");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The outage is real: nothing reaches the server now.
    assert!(!dir.run(&["status", "--db", &url]).status.success());
    std::thread::sleep(Duration::from_secs(20));
    let out = server.services("start");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for w in workers {
        // A statement caught by the outage either fails and is retried with backoff
        // ("retrying in" in the log) or waits inside the pool until the server is back.
        ok(&finish(w, Duration::from_secs(600)));
    }
    let js = jobs(&status(&dir, &url));
    assert!(js.iter().all(|j| j["state"] == "done"), "{js:?}");
    assert_eq!(export_csv(&dir, &url), want);
}
