//! Exact resume after kill -9, clean Ctrl-C, and two processes sharing one database.

use std::time::Duration;

use super::util::*;

fn export_csv(dir: &Dir, db: &str) -> String {
    ok(&dir.run(&["export", "--db", db, "--format", "csv"]))
}

#[test]
fn kill_9_then_resume_gives_bitwise_identical_results() {
    let dir = Dir::new();
    // 20 images × 2 σ, 220 forward passes each.
    dir.write("s.yaml", &resnet_spec("resume", "0.25, 0.5", 20, 200, 5));

    let reference = dir.run(&["run", "s.yaml", "--db", "ref.db"]);
    ok(&reference);
    let want = export_csv(&dir, "ref.db");
    assert_eq!(want.lines().count(), 1 + 40, "{want}");

    // An hour's lease: the resumed run must take back the killed worker's lease at once (its
    // process is gone from this host), not wait it out.
    let mut child = dir.spawn(&["run", "s.yaml", "--db", "killed.db", "--lease-secs", "3600"]);
    let mut before_kill = 0;
    let reached = wait_until(Duration::from_secs(300), || {
        before_kill = images_done(&dir, "killed.db");
        before_kill >= 7
    });
    assert!(reached, "the run made no progress");
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    assert!(before_kill < 40, "killed too late to test anything");

    let resumed = finish(
        dir.spawn(&["run", "s.yaml", "--db", "killed.db"]),
        Duration::from_secs(600),
    );
    ok(&resumed);
    let log = text(&resumed.stderr);
    assert!(
        log.contains(&format!("(pid {} on this host) is gone", child.id())),
        "{log}"
    );
    // The resumed run starts from the recorded images, not from scratch.
    let resumed_from: u64 = log
        .lines()
        .filter_map(|l| l.split("resuming: ").nth(1))
        .filter_map(|s| s.split('/').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        resumed_from + 1 >= before_kill,
        "resumed from {resumed_from} but {before_kill} were done:\n{log}"
    );
    assert_eq!(
        export_csv(&dir, "killed.db"),
        want,
        "resumed results differ from an uninterrupted run"
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_finishes() {
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("ctrlc", "0.25", 20, 200, 4));
    let child = dir.spawn(&["run", "s.yaml", "--db", "c.db"]);
    let pid = child.id().to_string();
    assert!(wait_until(Duration::from_secs(300), || images_done(
        &dir, "c.db"
    ) >= 2));
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("Resume with:") && err.contains("caf run s.yaml --db c.db"),
        "{err}"
    );
    // Nothing was left leased: the job is pending again and its attempt was not counted.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "c.db"]))).unwrap();
    let certify = st[0]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "certify")
        .unwrap()
        .clone();
    assert_eq!(certify["state"], "pending", "{certify}");
    assert_eq!(certify["attempts"], 0);
    let done = certify["progress_done"].as_u64().unwrap();
    assert!((2..25).contains(&done), "{done}");
    ok(&dir.run(&["run", "s.yaml", "--db", "c.db"]));
    assert_eq!(images_done(&dir, "c.db"), 25);
}

#[test]
fn two_processes_on_one_database_run_every_job_exactly_once() {
    let dir = Dir::new();
    dir.write(
        "s.yaml",
        &resnet_spec("pair", "0.12, 0.25, 0.5, 1.0", 10, 100, 25),
    );
    let a = dir.spawn(&["run", "s.yaml", "--db", "p.db"]);
    let b = dir.spawn(&["run", "s.yaml", "--db", "p.db"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    ok(&a);
    ok(&b);
    let st: serde_json::Value =
        serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "p.db"]))).unwrap();
    let jobs = st[0]["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5);
    for j in jobs {
        assert_eq!(j["state"], "done", "{j}");
        assert_eq!(j["attempts"], 1, "ran more than once: {j}");
    }
    assert_eq!(export_csv(&dir, "p.db").lines().count(), 1 + 4 * 4);
}

#[test]
fn caf_retry_gives_failed_jobs_fresh_attempts_without_running_them() {
    let dir = Dir::new();
    // Weights that cannot be read: both jobs fail for good on their first attempt.
    dir.write("bad.pt", "not a checkpoint");
    let spec = resnet_spec("retry", "0.25", 10, 20, 50).replace(
        &resnet20_weights().display().to_string(),
        &dir.join("bad.pt").display().to_string(),
    );
    dir.write("s.yaml", &spec);
    let first = dir.run(&["run", "s.yaml", "--db", "r.db"]);
    assert_eq!(first.status.code(), Some(1), "{}", text(&first.stderr));
    let jobs = |dir: &Dir| -> Vec<(String, u64)> {
        let st: serde_json::Value =
            serde_json::from_str(&ok(&dir.run(&["status", "--json", "--db", "r.db"])))
                .expect("status JSON");
        st[0]["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| {
                (
                    j["state"].as_str().unwrap_or_default().to_string(),
                    j["attempts"].as_u64().unwrap_or(u64::MAX),
                )
            })
            .collect()
    };
    assert_eq!(jobs(&dir), [("failed".into(), 1), ("failed".into(), 1)]);

    let out = ok(&dir.run(&["retry", "retry", "--db", "r.db"]));
    assert!(
        out.starts_with("2 failed job(s) of retry returned to pending"),
        "{out}"
    );
    // Nothing ran: both are pending with no attempt counted.
    assert_eq!(jobs(&dir), [("pending".into(), 0), ("pending".into(), 0)]);
    // The next run tries them again (and they fail again: the file is still bad).
    let again = dir.run(&["run", "s.yaml", "--db", "r.db"]);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(jobs(&dir), [("failed".into(), 1), ("failed".into(), 1)]);

    let none = dir.run(&["retry", "no-such-study", "--db", "r.db"]);
    assert!(!none.status.success());
    assert!(
        text(&none.stderr).contains("no-such-study"),
        "{}",
        text(&none.stderr)
    );
}
