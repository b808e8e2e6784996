//! `caf submit SPEC --slurm`: records the study as `caf run` does, then starts its workers as
//! Slurm job arrays of `caf worker` sharing the PostgreSQL store.
//!
//! Nothing a user typed is ever shell text. The sbatch script is fixed (its only command is
//! `exec CAF worker "$@"`, CAF the single-quoted absolute path of the binary); partition,
//! walltime, extra options, the study name and the artifacts directory are elements of the
//! argument vector `sbatch` is started with (no shell), and the database URL, which may hold
//! a password, reaches the workers in their environment as `CAF_DB` instead of a command line
//! every cluster user can read with `scontrol show job`.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use caf::store::{DbLocation, JobState, SlurmJob, Store};

use super::args::SubmitArgs;
use super::exit::{usage, FAILED};
use super::study::{load_plan, record};

/// Slurm's own default MaxArraySize, assumed by `--dry-run` when no cluster answers.
const DEFAULT_MAX_ARRAY_SIZE: u64 = 1001;

/// The most seconds `--signal=…@LEAD` accepts (Slurm keeps it in 16 bits).
const MAX_SIGNAL_LEAD: u32 = 0xffff;

/// sbatch options caf sets itself, which extras may not change: the array (caf sizes it), the
/// warning signal and requeueing (what makes preemption lose nothing).
const REFUSED_LONG: [&str; 4] = ["array", "signal", "requeue", "no-requeue"];

/// sbatch's short options that take a value: in a cluster like `-Qa5`, `-a` is the array
/// option, while in `-J-a` the `-a` is the job name.
const SHORT_WITH_VALUE: &str = "aAbcdDeiJLMmnNopqStCFwxG";

/// The sbatch script: fixed text but for the binary's path (single-quoted) and the lead time.
pub fn script(caf: &Path, signal_lead: u32) -> String {
    format!(
        "#!/bin/sh
# Written by `caf submit --slurm`: one caf worker per array task. It claims the study's
# runnable jobs from the shared store until none is left. Every setting (study, slots,
# device, artifacts) is an argument of sbatch's command line; the store's URL is CAF_DB
# in the environment. SIGUSR2 (the walltime warning) and SIGTERM (preemption, requeue) make
# the worker hand its jobs back as interruptions; --requeue lets Slurm run it again.
#SBATCH --requeue
#SBATCH --signal=B:USR2@{signal_lead}
exec {} worker \"$@\"
",
        sh_quote(&caf.to_string_lossy())
    )
}

/// `s` as one POSIX shell word: single quotes, each `'` written as `'\''`. Inside single
/// quotes the shell expands nothing (`$`, backquotes, `\`, newlines are literal).
fn sh_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if safe {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Why an extra sbatch option is refused, or `None`. Long options may be abbreviated
/// (sbatch accepts any unambiguous prefix, `--arr=0-9`), so a prefix of a refused name counts.
fn refused_extra(arg: &str) -> Option<&'static str> {
    if let Some(long) = arg.strip_prefix("--") {
        let name = long.split('=').next().unwrap_or("");
        if name.is_empty() {
            return None;
        }
        return REFUSED_LONG.iter().copied().find(|r| r.starts_with(name));
    }
    let short = arg.strip_prefix('-')?;
    for c in short.chars() {
        if c == 'a' {
            return Some("array");
        }
        if SHORT_WITH_VALUE.contains(c) {
            // The rest of the cluster is this option's value.
            return None;
        }
    }
    None
}

/// Array sizes for `tasks` workers when one array holds at most `max` tasks (indices below
/// MaxArraySize).
fn array_chunks(tasks: u64, max: u64) -> Vec<u64> {
    let max = max.max(1);
    let mut left = tasks;
    let mut out = Vec::new();
    while left > 0 {
        let n = left.min(max);
        out.push(n);
        left -= n;
    }
    out
}

/// MaxArraySize from `scontrol show config` output.
fn parse_max_array_size(config: &str) -> Option<u64> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "MaxArraySize")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// The cluster's MaxArraySize, asked of `scontrol show config`.
fn max_array_size() -> Result<u64> {
    let out = Command::new("scontrol")
        .args(["show", "config"])
        .output()
        .context("running `scontrol show config` (is Slurm installed and SLURM_CONF set?)")?;
    if !out.status.success() {
        bail!(
            "`scontrol show config` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_max_array_size(&text).context("`scontrol show config` printed no MaxArraySize")
}

/// `YYYYMMDDTHHMMSSZ` of Unix time `secs` (UTC), for script names that sort by time.
fn utc_stamp(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// `p` made absolute against the working directory (workers start in it too, but a path
/// that names the shared filesystem outright cannot be misread on a compute node).
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

/// Writes `text` to `path`, or to `STEM-2.sbatch`, `STEM-3.sbatch`, … when it exists (two
/// submits in one second), never replacing the script of an earlier submit; returns the path.
fn write_new(path: &Path, text: &str) -> Result<PathBuf> {
    let stem = path.with_extension("");
    for n in 1..=1000u32 {
        let p = if n == 1 {
            path.to_path_buf()
        } else {
            let mut name = stem.clone().into_os_string();
            name.push(format!("-{n}.sbatch"));
            PathBuf::from(name)
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(mut f) => {
                f.write_all(text.as_bytes())
                    .with_context(|| format!("writing {}", p.display()))?;
                return Ok(p);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("writing {}", p.display())),
        }
    }
    bail!(
        "{}: a thousand scripts of this second exist already",
        path.display()
    )
}

/// What sbatch is told besides the script: everything but the array size.
struct Options {
    study: String,
    workdir: PathBuf,
    logs: PathBuf,
    sbatch: Vec<OsString>,
    worker: Vec<OsString>,
}

impl Options {
    fn from_args(a: &SubmitArgs, study: &str, workdir: PathBuf, logs: PathBuf) -> Result<Self> {
        let mut sbatch: Vec<OsString> = Vec::new();
        let mut opt = |name: &str, value: &Option<String>| {
            if let Some(v) = value {
                sbatch.push(format!("--{name}={v}").into());
            }
        };
        opt("partition", &a.partition);
        opt("time", &a.time);
        opt("gres", &a.gres);
        opt("mem", &a.mem);
        opt("account", &a.account);
        opt("qos", &a.qos);
        if let Some(c) = a.cpus_per_task {
            sbatch.push(format!("--cpus-per-task={c}").into());
        }
        sbatch.extend(a.sbatch_args.iter().map(OsString::from));
        let mut worker: Vec<OsString> = vec![
            format!("--study={study}").into(),
            format!("--slots={}", a.slots).into(),
            format!("--device={}", a.device).into(),
        ];
        let mut artifacts = OsString::from("--artifacts=");
        artifacts.push(absolute(&a.artifacts)?);
        worker.push(artifacts);
        if let Some(l) = a.lease_secs {
            worker.push(format!("--lease-secs={l}").into());
        }
        Ok(Self {
            study: study.to_string(),
            workdir,
            logs,
            sbatch,
            worker,
        })
    }

    /// sbatch's arguments for one array of `tasks` workers running `script`.
    fn argv(&self, script: &Path, tasks: u64) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--parsable".into(),
            format!("--job-name=caf-{}", self.study).into(),
            format!("--array=0-{}", tasks - 1).into(),
            // CAF_DB must reach the worker; an explicit --sbatch-arg=--export=… still wins.
            "--export=ALL".into(),
        ];
        let mut chdir = OsString::from("--chdir=");
        chdir.push(&self.workdir);
        v.push(chdir);
        // sbatch expands %-patterns in --output: a '%' of the directory must stay literal.
        let mut output = OsString::from("--output=");
        output.push(self.logs.to_string_lossy().replace('%', "%%"));
        output.push(format!("/{}-%A_%a.out", self.study));
        v.push(output);
        v.extend(self.sbatch.iter().cloned());
        v.push(script.into());
        v.extend(self.worker.iter().cloned());
        v
    }
}

/// How the command is shown: the environment assignment, then each argument as a shell word.
fn shown_command(db: &str, argv: &[OsString]) -> String {
    let mut s = format!("CAF_DB={} sbatch", sh_quote(db));
    for a in argv {
        s.push(' ');
        s.push_str(&sh_quote(&a.to_string_lossy()));
    }
    s
}

pub async fn submit(a: SubmitArgs) -> Result<i32> {
    if !a.slurm {
        bail!(usage(
            "caf submit needs --slurm (Slurm is the cluster scheduler caf submits to)"
        ));
    }
    let url = match DbLocation::parse(&a.db.db.to_string_lossy()) {
        Ok(DbLocation::Postgres(url)) => url,
        Ok(DbLocation::Sqlite(path)) => bail!(usage(format!(
            "--slurm needs a PostgreSQL --db (postgres://user@host/db) that every node reaches; \
             {} is an SQLite file, which locks or corrupts on a cluster's shared filesystem",
            path.display()
        ))),
        Err(e) => bail!(usage(e.to_string())),
    };
    if a.array == 0 {
        bail!(usage("--array must be at least 1"));
    }
    if a.slots == 0 {
        bail!(usage("--slots must be at least 1"));
    }
    if a.signal_lead == 0 || a.signal_lead > MAX_SIGNAL_LEAD {
        bail!(usage(format!(
            "--signal-lead must be between 1 and {MAX_SIGNAL_LEAD} seconds"
        )));
    }
    if a.cpus_per_task == Some(0) {
        bail!(usage("--cpus-per-task must be at least 1"));
    }
    if let Some(l) = a.lease_secs {
        if !(l.is_finite() && l >= 1.0) {
            bail!(usage("--lease-secs must be at least 1"));
        }
    }
    for extra in &a.sbatch_args {
        if let Some(what) = refused_extra(extra) {
            bail!(usage(format!(
                "--sbatch-arg {extra}: caf sets --{what} itself (--array from --array, \
                 --signal from --signal-lead, --requeue always)"
            )));
        }
    }
    let caf = match &a.caf {
        Some(p) => absolute(p)?,
        None => std::env::current_exe().context("finding this caf binary's path")?,
    };
    if !caf.is_file() {
        bail!(usage(format!(
            "--caf {}: no such file (it must be a caf binary every node can run)",
            caf.display()
        )));
    }
    let plan = load_plan(&a.spec)?;
    let study = plan.study.name.clone();
    let workdir = std::env::current_dir().context("reading the working directory")?;
    let logs = workdir.join("runs/slurm");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let script_path = logs.join(format!("{study}-{}.sbatch", utc_stamp(now)));
    let opts = Options::from_args(&a, &study, workdir, logs.clone())?;
    let text = script(&caf, a.signal_lead);

    if a.dry_run {
        // Nothing recorded, so the plan's size stands in for its runnable jobs.
        let runnable = plan.jobs.len() as u64;
        let max = max_array_size().unwrap_or(DEFAULT_MAX_ARRAY_SIZE);
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "# {} (not written: --dry-run)\n{text}",
            script_path.display()
        )?;
        writeln!(out, "# command (not run: --dry-run)")?;
        for tasks in array_chunks(a.array.min(runnable), max) {
            let argv = opts.argv(&script_path, tasks);
            writeln!(
                out,
                "{}",
                shown_command(&DbLocation::Postgres(url.clone()).shown(), &argv)
            )?;
        }
        return Ok(0);
    }

    let (store, study_id) = record(
        &plan,
        &a.db.db,
        a.retry_failed,
        caf::store::DEFAULT_CONNECTIONS,
    )
    .await?;
    let jobs = store.study_jobs(study_id).await?;
    let runnable = jobs
        .iter()
        .filter(|j| j.state == JobState::Pending && !j.blocked)
        .count() as u64;
    if runnable == 0 {
        let done = jobs.iter().filter(|j| j.state == JobState::Done).count();
        eprintln!(
            "study {study}: nothing to run ({done}/{} jobs done; see caf status {study} --db {})",
            jobs.len(),
            super::db::shown(&a.db.db)
        );
        return Ok(0);
    }
    let max = max_array_size()?;
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let script_path = write_new(&script_path, &text)?;
    let mut submitted = Vec::new();
    for tasks in array_chunks(a.array.min(runnable), max) {
        let argv = opts.argv(&script_path, tasks);
        let out = Command::new("sbatch")
            .args(&argv)
            .env("CAF_DB", &url)
            .output()
            .context("running sbatch (is Slurm installed and SLURM_CONF set?)")?;
        if !out.status.success() {
            eprintln!(
                "error: sbatch refused the job: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if !submitted.is_empty() {
                eprintln!("already submitted: {}", submitted.join(", "));
            }
            return Ok(FAILED);
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if id.is_empty() || id.contains(char::is_whitespace) {
            bail!("sbatch printed no job id: {id:?}");
        }
        store
            .record_slurm_job(
                study_id,
                &SlurmJob {
                    job_id: id.clone(),
                    array_tasks: tasks,
                    script: script_path.to_string_lossy().into_owned(),
                    submitted_at: caf::util::now_unix(),
                },
            )
            .await?;
        eprintln!("submitted Slurm job {id}: {tasks} worker(s) of study {study}");
        submitted.push(id);
    }
    let ids: Vec<&str> = submitted
        .iter()
        .map(|s| s.split(';').next().unwrap_or(s))
        .collect();
    eprintln!(
        "watch it with: caf status {study} --db {}   (Slurm: squeue -j {}; logs in {})",
        super::db::shown(&a.db.db),
        ids.join(","),
        logs.display()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script compared byte for byte with the checked-in golden file: a change to it is a
    /// change every cluster user sees, so it must be made on purpose.
    #[test]
    fn the_script_matches_its_golden_file() {
        let golden = include_str!("../../tests/fixtures/slurm/worker.sbatch");
        assert_eq!(script(Path::new("/opt/caf/bin/caf"), 120), golden);
    }

    #[test]
    fn the_binary_path_is_one_quoted_word_whatever_it_holds() {
        let s = script(Path::new("/a b/it's $(touch pwned) `x`/caf"), 300);
        assert!(
            s.contains("exec '/a b/it'\\''s $(touch pwned) `x`/caf' worker \"$@\"\n"),
            "{s}"
        );
        assert!(s.contains("#SBATCH --signal=B:USR2@300\n"));
        // The shell reads it back as the same single word, expanding nothing.
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '%s' {}",
                sh_quote("/a b/it's $(touch pwned) `x`/caf\nnext")
            ))
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "/a b/it's $(touch pwned) `x`/caf\nnext"
        );
        assert!(!std::env::temp_dir().join("pwned").exists());
    }

    #[test]
    fn extras_that_set_array_signal_or_requeue_are_refused() {
        for arg in [
            "--array=0-9",
            "--array",
            "--arr=1",
            "--signal=USR1@60",
            "--sig=B:USR2@1",
            "--requeue",
            "--no-requeue",
            "--no-req",
            "-a",
            "-a0-3",
            "-Qa5",
        ] {
            assert!(refused_extra(arg).is_some(), "{arg}");
        }
        for arg in [
            "--constraint=a100",
            "--exclusive",
            "--export=ALL,FOO=1",
            "--comment=--array",
            "-J-a",
            "-pa100",
            "-Q",
            "0-9",
            "--",
        ] {
            assert_eq!(refused_extra(arg), None, "{arg}");
        }
    }

    #[test]
    fn arrays_are_capped_and_split_at_max_array_size() {
        assert_eq!(array_chunks(3, 1001), [3]);
        assert_eq!(array_chunks(1001, 1001), [1001]);
        assert_eq!(array_chunks(2500, 1001), [1001, 1001, 498]);
        assert_eq!(array_chunks(5, 2), [2, 2, 1]);
        assert!(array_chunks(0, 10).is_empty());
        let config = "Configuration data as of 2026-11-28T16:22:00\nMaxArraySize            = 1001\nMaxJobCount             = 10000\n";
        assert_eq!(parse_max_array_size(config), Some(1001));
        assert_eq!(parse_max_array_size("MaxJobCount = 3\n"), None);
    }

    #[test]
    fn a_second_script_in_the_same_second_gets_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s-20261128T170341Z.sbatch");
        assert_eq!(write_new(&p, "one").unwrap(), p);
        let second = write_new(&p, "two").unwrap();
        assert_eq!(second, dir.path().join("s-20261128T170341Z-2.sbatch"));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "two");
    }

    #[test]
    fn stamps_are_utc_and_sort_by_time() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        // 2026-11-28 16:25:07 UTC.
        assert_eq!(utc_stamp(1_795_883_107), "20261128T162507Z");
    }

    #[test]
    fn every_user_value_is_one_argument() {
        let a = SubmitArgs {
            spec: "s.yaml".into(),
            db: super::super::args::DbArg {
                db: "postgres://u:pw@h/db".into(),
            },
            slurm: true,
            array: 3,
            partition: Some("gpu $(touch /tmp/pwned) 'q'".into()),
            time: Some("1:00:00".into()),
            gres: Some("gpu:1".into()),
            cpus_per_task: Some(4),
            mem: None,
            account: None,
            qos: Some("high".into()),
            sbatch_args: vec!["--constraint=a100".into(), "--comment=a;b".into()],
            caf: None,
            signal_lead: 120,
            dry_run: false,
            slots: 2,
            device: "cuda:0".parse().unwrap(),
            artifacts: "/shared/art dir".into(),
            lease_secs: Some(90.0),
            retry_failed: false,
        };
        let o = Options::from_args(&a, "s1", "/w d".into(), "/w d/runs/slurm %x".into()).unwrap();
        let argv: Vec<String> = o
            .argv(Path::new("/w d/runs/slurm/s1.sbatch"), 3)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "--parsable",
                "--job-name=caf-s1",
                "--array=0-2",
                "--export=ALL",
                "--chdir=/w d",
                "--output=/w d/runs/slurm %%x/s1-%A_%a.out",
                "--partition=gpu $(touch /tmp/pwned) 'q'",
                "--time=1:00:00",
                "--gres=gpu:1",
                "--qos=high",
                "--cpus-per-task=4",
                "--constraint=a100",
                "--comment=a;b",
                "/w d/runs/slurm/s1.sbatch",
                "--study=s1",
                "--slots=2",
                "--device=cuda:0",
                "--artifacts=/shared/art dir",
                "--lease-secs=90",
            ]
        );
    }
}
