//! `caf submit --slurm` on a real single-node Slurm and a real PostgreSQL: the ones
//! `scripts/services.sh start` runs (`.ci/run` starts both and exports `CAF_TEST_SLURM` and
//! `CAF_TEST_POSTGRES`, so nothing here is skipped in CI). Workers are real `caf worker`
//! processes that Slurm starts from the sbatch script `caf submit` writes.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use super::postgres_cli::fresh_database;
use super::util::*;

/// The slurm.conf of the test cluster, or `None` (with a note) when none is configured.
fn slurm() -> Option<String> {
    match std::env::var("CAF_TEST_SLURM") {
        Ok(conf) => Some(conf),
        Err(_) => {
            eprintln!("slurm: skipped (CAF_TEST_SLURM is unset; scripts/services.sh start)");
            None
        }
    }
}

/// A Slurm client command against the test cluster.
fn slurm_cmd(conf: &str, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// `caf ARGS` in `dir` with the test cluster's configuration.
fn caf(dir: &Dir, conf: &str, args: &[&str]) -> Output {
    dir.cmd(args)
        .env("SLURM_CONF", conf)
        .output()
        .expect("run caf")
}

/// The Slurm job ids `caf submit` recorded for the only study in `db`.
fn slurm_job_ids(dir: &Dir, db: &str) -> Vec<String> {
    let v = status_json(dir, db);
    v[0]["slurm_jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| j["job_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn status_json(dir: &Dir, db: &str) -> serde_json::Value {
    let out = ok(&dir.run(&["status", "--json", "--db", db]));
    serde_json::from_str(&out).expect("status --json")
}

/// The script's word for this test binary: as is, or single-quoted where the shell needs it.
fn this_caf() -> String {
    let p = env!("CARGO_BIN_EXE_caf");
    if p.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b))
    {
        p.to_string()
    } else {
        format!("'{}'", p.replace('\'', r"'\''"))
    }
}

/// Polls `f` once a second (each poll starts a `caf status`) until it holds or `timeout` passes.
fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
}

/// Waits until Slurm has no task of job `id` left (pending, running or completing).
fn wait_for_slurm_job(conf: &str, id: &str, timeout: Duration) -> bool {
    poll(timeout, || {
        let out = slurm_cmd(conf, "squeue", &["-h", "-j", id, "-o", "%i %T"]);
        // Once slurmctld has purged the job, squeue says it is invalid: gone as well.
        out.stdout.iter().all(u8::is_ascii_whitespace)
    })
}

/// A running task's id (`JOB_TASK`) of job `id`, once one runs.
fn running_task(conf: &str, id: &str) -> Option<String> {
    let out = slurm_cmd(conf, "squeue", &["-h", "-j", id, "-t", "R", "-o", "%i"]);
    text(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn job_field(v: &serde_json::Value, field: &str) -> Vec<u64> {
    v[0]["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| j[field].as_u64().unwrap_or(u64::MAX))
        .collect()
}

/// Slurm's log of each worker, for assertion messages.
fn worker_logs(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir.join("runs/slurm"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "out") {
            s += &format!("--- {}\n", e.path().display());
            s += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    s
}

/// Test 2 of issue 13: a study submitted as a 3-task array finishes every job once, and its
/// export is byte for byte what a local SQLite `caf run` of the same spec exports. (A smaller
/// spec than the quickstart, whose n = 500 certifications take minutes on the test machine;
/// the quickstart itself was checked by hand, see README.)
#[test]
fn a_submitted_array_finishes_the_study_as_a_local_run_does() {
    let (Some(conf), Some(url)) = (slurm(), fresh_database()) else {
        return;
    };
    let dir = Dir::new();
    dir.write(
        "s.yaml",
        &resnet_spec("slurm-array", "0.25, 0.5", 10, 100, 10),
    );
    ok(&dir.run(&["run", "s.yaml", "--db", "local.db", "-q"]));
    let submitted = caf(
        &dir,
        &conf,
        &["submit", "s.yaml", "--slurm", "--array", "3", "--db", &url],
    );
    ok(&submitted);
    let ids = slurm_job_ids(&dir, &url);
    assert_eq!(ids.len(), 1, "{}", text(&submitted.stderr));
    assert!(
        wait_for_slurm_job(&conf, &ids[0], Duration::from_secs(900)),
        "the array did not finish\n{}",
        worker_logs(dir.path())
    );
    let v = status_json(&dir, &url);
    assert!(
        v[0]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "done"),
        "{v:#}\n{}",
        worker_logs(dir.path())
    );
    // Each job ran once: one attempt, nothing interrupted.
    assert!(job_field(&v, "attempts").iter().all(|&a| a == 1), "{v:#}");
    assert!(job_field(&v, "interruptions").iter().all(|&i| i == 0));
    assert_eq!(v[0]["slurm_jobs"][0]["array_tasks"], 3);
    let local = ok(&dir.run(&["export", "--db", "local.db", "--format", "csv"]));
    let cluster = ok(&dir.run(&["export", "--db", &url, "--format", "csv"]));
    assert!(local.lines().count() > 10, "{local}");
    assert_eq!(local, cluster);
    // The script is the fixed one, naming this binary.
    let script = std::fs::read_to_string(v[0]["slurm_jobs"][0]["script"].as_str().unwrap())
        .expect("the sbatch script");
    let golden = include_str!("../fixtures/slurm/worker.sbatch");
    assert_eq!(script, golden.replace("/opt/caf/bin/caf", &this_caf()));
    assert!(ok(&dir.run(&["status", "--db", &url]))
        .contains(&format!("slurm jobs: {} (3 workers)", ids[0])));
    // Everything is done: a second submit records the plan again and submits nothing.
    let again = caf(&dir, &conf, &["submit", "s.yaml", "--slurm", "--db", &url]);
    ok(&again);
    assert!(text(&again.stderr).contains("nothing to run"));
    assert_eq!(slurm_job_ids(&dir, &url).len(), 1);
}

/// Test 6 of issue 13: a study directory, binary path, partition and extra option full of
/// spaces, quotes and `$(…)` run nothing they should not, and the study still completes.
#[test]
fn hostile_paths_and_values_run_nothing() {
    let (Some(conf), Some(url)) = (slurm(), fresh_database()) else {
        return;
    };
    let root = Dir::new();
    let marker = root.join("pwned");
    let payload = format!("$(touch {})", marker.display());
    // A directory name cannot hold '/': its payloads touch files in the working directory.
    let weird = root.join("study dir 'q' \"d\" $(touch pwned-dir) `touch pwned-tick` ; x");
    std::fs::create_dir_all(&weird).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_caf"),
        weird.join("caf $(touch pwned-bin)"),
    )
    .unwrap();
    let spec = resnet_spec("slurm-hostile", "0.5", 10, 100, 25);
    std::fs::write(weird.join("s 'q' $(x).yaml"), spec).unwrap();
    let dir = root;
    let run_in_weird = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_caf"));
        c.args(args)
            .current_dir(&weird)
            .env("SLURM_CONF", &conf)
            .env_remove("CAF_DB");
        c.output().expect("run caf")
    };
    let caf_path = weird.join("caf $(touch pwned-bin)");
    let caf_arg = caf_path.to_str().unwrap();
    // A partition carrying a payload: sbatch gets it as one argument and refuses the name.
    let bad = run_in_weird(&[
        "submit",
        "s 'q' $(x).yaml",
        "--slurm",
        "--db",
        &url,
        "--caf",
        caf_arg,
        "--partition",
        &format!("debug {payload}"),
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad.stderr));
    assert!(
        text(&bad.stderr).contains("sbatch refused"),
        "{}",
        text(&bad.stderr)
    );
    // The real partition, with payloads in an extra option, the binary's path and the
    // working directory: the job runs, the payloads do not.
    let good = run_in_weird(&[
        "submit",
        "s 'q' $(x).yaml",
        "--slurm",
        "--db",
        &url,
        "--caf",
        caf_arg,
        "--partition",
        "debug",
        "--sbatch-arg",
        &format!("--comment={payload} 'q' \"d\""),
    ]);
    ok(&good);
    let ids = slurm_job_ids(&dir, &url);
    assert_eq!(ids.len(), 1, "{}", text(&good.stderr));
    assert!(
        wait_for_slurm_job(&conf, &ids[0], Duration::from_secs(600)),
        "{}",
        worker_logs(&weird)
    );
    let v = status_json(&dir, &url);
    assert!(
        v[0]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "done"),
        "{v:#}\n{}",
        worker_logs(&weird)
    );
    // The script names the binary as one single-quoted word.
    let script =
        std::fs::read_to_string(v[0]["slurm_jobs"][0]["script"].as_str().unwrap()).unwrap();
    assert!(
        script.contains(&format!(
            "exec '{}' worker \"$@\"\n",
            caf_arg.replace('\'', r"'\''")
        )),
        "{script}"
    );
    // No payload ran anywhere: not the absolute marker, not a relative one in either directory.
    let mut found = Vec::new();
    for d in [dir.path(), weird.as_path()] {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("pwned") {
                found.push(e.path());
            }
        }
    }
    assert!(!marker.exists());
    assert!(found.is_empty(), "payloads ran: {found:?}");
}

/// Test 3 of issue 13: a running array task warned with SIGUSR2 (`scancel --signal=USR2
/// --batch`, what Slurm sends ahead of the walltime) hands its job back; requeued, it finishes
/// the job; `scontrol requeue` of the running task (SIGTERM) hands it back again, and the
/// requeued task finishes it. Results are byte for byte a local run's, no attempt is spent,
/// and each stop is one interruption.
#[test]
fn usr2_and_requeue_mid_job_lose_nothing() {
    let (Some(conf), Some(url)) = (slurm(), fresh_database()) else {
        return;
    };
    let dir = Dir::new();
    // One certification of 34 images: long enough to be stopped twice mid-job.
    dir.write("s.yaml", &resnet_spec("slurm-requeue", "0.25", 10, 100, 3));
    let submitted = caf(
        &dir,
        &conf,
        &["submit", "s.yaml", "--slurm", "--array", "1", "--db", &url],
    );
    ok(&submitted);
    let id = slurm_job_ids(&dir, &url).remove(0);
    let certify = |v: &serde_json::Value| -> serde_json::Value {
        v[0]["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "certify")
            .cloned()
            .unwrap()
    };
    let mid_job = |min: u64| {
        poll(Duration::from_secs(600), || {
            let j = certify(&status_json(&dir, &url));
            let done = j["progress_done"].as_u64().unwrap_or(0);
            j["state"] == "running" && done >= min && done + 5 < 34
        })
    };
    // 1. SIGUSR2 to the batch shell, i.e. the worker (the script execs it).
    assert!(mid_job(2), "{}", worker_logs(dir.path()));
    let task = running_task(&conf, &id).expect("a running task");
    let out = slurm_cmd(&conf, "scancel", &["--signal=USR2", "--batch", &task]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        poll(Duration::from_secs(120), || {
            certify(&status_json(&dir, &url))["state"] == "pending"
        }),
        "the worker did not hand the job back\n{}",
        worker_logs(dir.path())
    );
    let j = certify(&status_json(&dir, &url));
    assert_eq!(j["interruptions"], 1, "{j:#}");
    let before = j["progress_done"].as_u64().unwrap();
    // The worker exited; requeue its task so the job resumes.
    assert!(wait_for_slurm_job(&conf, &id, Duration::from_secs(120)));
    let out = slurm_cmd(&conf, "scontrol", &["requeue", &task]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // 2. `scontrol requeue` of the running task: SIGTERM, then Slurm starts it again.
    assert!(mid_job(before + 2), "{}", worker_logs(dir.path()));
    let task = running_task(&conf, &id).expect("a running task");
    let out = slurm_cmd(&conf, "scontrol", &["requeue", &task]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        poll(Duration::from_secs(600), || {
            certify(&status_json(&dir, &url))["state"] == "done"
        }),
        "{}",
        worker_logs(dir.path())
    );
    assert!(wait_for_slurm_job(&conf, &id, Duration::from_secs(120)));
    let j = certify(&status_json(&dir, &url));
    assert_eq!(j["interruptions"], 2, "{j:#}");
    assert_eq!(j["attempts"], 1, "{j:#}");
    ok(&dir.run(&["run", "s.yaml", "--db", "local.db", "-q"]));
    let local = ok(&dir.run(&["export", "--db", "local.db", "--format", "csv"]));
    let cluster = ok(&dir.run(&["export", "--db", &url, "--format", "csv"]));
    assert_eq!(local.lines().count(), 35, "{local}");
    assert_eq!(local, cluster);
}

/// The script's `#SBATCH --signal=B:USR2@LEAD` for real: with a one-minute walltime and a
/// 50-second lead, Slurm warns the worker long before the limit, the worker hands its job back
/// (one interruption, its finished images kept) and ends on its own rather than being killed
/// at the walltime.
#[test]
fn the_walltime_warning_hands_the_job_back_before_the_limit() {
    let (Some(conf), Some(url)) = (slurm(), fresh_database()) else {
        return;
    };
    let dir = Dir::new();
    // One certification of 100 images, minutes long even on a fast CPU (201,000 forward
    // passes; with n = 400 a Zen 5 finished it before the warning): Slurm checks time limits
    // only every ~30 s, so the warning due 10 s in may come up to 40 s in.
    dir.write("s.yaml", &resnet_spec("slurm-walltime", "0.5", 10, 2000, 1));
    let submitted = caf(
        &dir,
        &conf,
        &[
            "submit",
            "s.yaml",
            "--slurm",
            "--db",
            &url,
            "--time",
            "1",
            "--signal-lead",
            "50",
        ],
    );
    ok(&submitted);
    let id = slurm_job_ids(&dir, &url).remove(0);
    // Gone before the one-minute limit (plus Slurm's kill grace) could have ended it.
    let started = std::time::Instant::now();
    assert!(
        wait_for_slurm_job(&conf, &id, Duration::from_secs(300)),
        "{}",
        worker_logs(dir.path())
    );
    let logs = worker_logs(dir.path());
    assert!(logs.contains("stopped by a signal"), "{logs}");
    assert!(!logs.contains("DUE TO TIME LIMIT"), "{logs}");
    let v = status_json(&dir, &url);
    let j = v[0]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "certify")
        .unwrap();
    assert_eq!(j["interruptions"], 1, "{j:#} after {:?}", started.elapsed());
    assert_eq!(j["state"], "pending", "{j:#}");
    // Its finished images are kept for the next worker.
    let done = j["progress_done"].as_u64().unwrap_or(0);
    assert!((1..100).contains(&done), "{j:#}");
}

/// `--dry-run` needs no cluster and no database: it prints the script and the command, caps
/// the array at the plan's jobs, never shows the database password and writes nothing.
#[test]
fn a_dry_run_prints_script_and_command_and_writes_nothing() {
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("dry", "0.25, 0.5", 10, 100, 10));
    let out = dir.run(&[
        "submit",
        "s.yaml",
        "--slurm",
        "--dry-run",
        "--array",
        "50",
        "--db",
        "postgres://caf:s3cr3t@db.invalid/caf",
        "--caf",
        env!("CARGO_BIN_EXE_caf"),
        "--partition",
        "gpu a",
        "--time",
        "2:00:00",
    ]);
    let printed = ok(&out);
    let golden = include_str!("../fixtures/slurm/worker.sbatch");
    assert!(
        printed.contains(&golden.replace("/opt/caf/bin/caf", &this_caf())),
        "{printed}"
    );
    // Three jobs (one eval, two certify): three workers at most.
    assert!(printed.contains(" --array=0-2 "), "{printed}");
    assert!(printed.contains(" '--partition=gpu a' --time=2:00:00 "));
    assert!(printed.contains("CAF_DB='postgres://caf:***@db.invalid/caf' sbatch --parsable "));
    assert!(!printed.contains("s3cr3t"));
    assert!(!dir.join("runs").exists(), "a dry run wrote files");
}

/// Bad requests are usage errors (exit 2) before anything is recorded or submitted.
#[test]
fn submit_refuses_what_it_cannot_do_safely() {
    let dir = Dir::new();
    dir.write("s.yaml", &resnet_spec("refused", "0.25", 10, 100, 10));
    let pg = "postgres://caf@db.invalid/caf";
    for (args, says) in [
        (vec!["submit", "s.yaml", "--db", pg], "needs --slurm"),
        (
            vec!["submit", "s.yaml", "--slurm", "--db", "local.db"],
            "needs a PostgreSQL --db",
        ),
        (
            vec![
                "submit",
                "s.yaml",
                "--slurm",
                "--db",
                pg,
                "--sbatch-arg=--array=0-99",
            ],
            "caf sets --array itself",
        ),
        (
            vec![
                "submit",
                "s.yaml",
                "--slurm",
                "--db",
                pg,
                "--sbatch-arg",
                "--signal=USR1@5",
            ],
            "caf sets --signal itself",
        ),
        (
            vec![
                "submit",
                "s.yaml",
                "--slurm",
                "--db",
                pg,
                "--sbatch-arg=--no-requeue",
            ],
            "caf sets --no-requeue itself",
        ),
        (
            vec!["submit", "s.yaml", "--slurm", "--db", pg, "--array", "0"],
            "--array must be at least 1",
        ),
        (
            vec![
                "submit",
                "s.yaml",
                "--slurm",
                "--db",
                pg,
                "--caf",
                "no/such/caf",
            ],
            "no such file",
        ),
    ] {
        let out = dir.run(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert!(!dir.join("runs").exists());
    assert!(!dir.join("local.db").exists());
}
