//! Exit codes: 0 success, 1 some jobs failed, 2 bad input (spec, flags, files; nothing is
//! written), 130 interrupted (resume with the same command).

/// Some jobs failed; the others still ran.
pub const FAILED: i32 = 1;
/// Stopped by Ctrl-C or SIGTERM, the code a shell gives a process killed by SIGINT.
pub const INTERRUPTED: i32 = 130;
const USAGE: i32 = 2;

/// An error that decides its own exit code.
#[derive(Debug)]
pub struct Exit {
    code: i32,
    message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Bad flags or input files: exit 2 with `error: {msg}`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Exit {
        code: USAGE,
        message: msg.into(),
    }
    .into()
}

/// Prints `err` and returns the process's exit code for it.
pub fn report(err: &anyhow::Error) -> i32 {
    // A closed pipe (`caf plan --json | head`) is the reader's choice, not an error.
    if err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return 0;
    }
    if let Some(exit) = err.downcast_ref::<Exit>() {
        eprintln!("error: {}", exit.message);
        return exit.code;
    }
    eprintln!("error: {err:#}");
    // Bad input files (spec, weights, dataset) are usage errors, like bad flags.
    if err.downcast_ref::<caf::spec::SpecError>().is_some()
        || err.downcast_ref::<caf::data::DataError>().is_some()
        || err.downcast_ref::<caf::models::ModelError>().is_some()
    {
        return USAGE;
    }
    FAILED
}
