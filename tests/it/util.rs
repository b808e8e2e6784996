//! Helpers to run the real binary in a scratch directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The shared, read-only data folder (`../shared/data` beside the repository).
pub fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

pub fn resnet20_weights() -> PathBuf {
    shared_data().join("pretrained/akamaster/resnet20-12fca82f.th")
}

/// A temporary working directory for one test.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).expect("write fixture");
        p
    }
    /// `caf ARGS` with this directory as the working directory.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_caf"));
        c.args(args)
            .current_dir(self.path())
            .env("RUST_LOG", "info")
            .env_remove("CAF_DB");
        c
    }
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run caf")
    }
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn caf")
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "caf failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A study spec over the exact first 100 test images with the pretrained ResNet-20.
pub fn resnet_spec(name: &str, sigmas: &str, n0: u64, n: u64, skip: u64) -> String {
    format!(
        "name: {name}
seed: 3
data:
  dataset: cifar10
  root: {data}
backbones:
  r20:
    arch: resnet20
    weights: {weights}
    normalize:
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
certify:
  n0: {n0}
  n: {n}
  alpha: 0.001
  batch: {batch}
  skip: {skip}
grid:
  params:
    method: smooth
    backbone: r20
  axes:
    sigma: [{sigmas}]
",
        data = shared_data().join("cifar10-exact100").display(),
        weights = resnet20_weights().display(),
        batch = n0 + n,
    )
}

/// Polls until `f` returns true or the timeout passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Total per-image progress of a study, read through `caf status --json`.
pub fn images_done(dir: &Dir, db: &str) -> u64 {
    let out = dir.run(&["status", "--json", "--db", db]);
    if !out.status.success() {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["jobs"].as_array().cloned().unwrap_or_default())
        .filter(|j| j["kind"] == "certify")
        .map(|j| j["progress_done"].as_u64().unwrap_or(0))
        .sum()
}

/// Waits for a child with a deadline (a hung worker fails the test instead of hanging it),
/// reading its output meanwhile so that a full pipe never blocks it.
pub fn finish(child: Child, within: Duration) -> Output {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("wait for caf"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status();
            panic!("caf {pid} still running after {within:?}");
        }
    }
}
