//! Records the git revision the binary was built from, for the reproducibility block of
//! reports (builds outside a git checkout, a crate tarball, report "unknown"), and rebuilds when
//! a migration is added.

use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(rev) = rev {
        println!("cargo:rustc-env=CAF_GIT_REVISION={rev}");
    }
    // Rebuild the stamp when HEAD or the index moves (commits, checkouts, staging).
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    // `sqlx::migrate!` embeds migrations/sqlite and migrations/postgres at compile time, but
    // naming any file above turns off cargo's default of rebuilding on every change in the
    // package: without this line a new .sql file would not be embedded until something else
    // changed. (Cargo scans a named directory recursively, so this covers both backends.)
    println!("cargo:rerun-if-changed=migrations");
}
