//! Command-line interface. Exit codes: 0 success, 1 some jobs failed, 2 bad input (spec, flags,
//! files), 130 interrupted (resume with the same command).

/// `println!` that returns the write error instead of panicking: `caf … | head` closes the pipe
/// on purpose, and `main` treats a broken pipe as success.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod args;
mod commands;
mod export;
mod report;
mod status;

use std::io::IsTerminal;

use clap::Parser;

pub use args::Cli;

/// An error that decides its own exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: Option<String>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or(""))
    }
}

impl std::error::Error for Exit {}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let quiet = matches!(&cli.command, args::Command::Run(r) if r.quiet);
    init_tracing(quiet);
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // A closed pipe (`caf plan --json | head`) is the reader's choice, not an error.
            if err.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return 0;
            }
            if let Some(exit) = err.downcast_ref::<Exit>() {
                if let Some(m) = &exit.message {
                    eprintln!("error: {m}");
                }
                return exit.code;
            }
            // Bad input files (spec, weights, dataset) are usage errors, like bad flags.
            if err.downcast_ref::<caf::spec::SpecError>().is_some()
                || err.downcast_ref::<caf::data::DataError>().is_some()
                || err.downcast_ref::<caf::models::ModelError>().is_some()
            {
                eprintln!("error: {err:#}");
                return 2;
            }
            eprintln!("error: {err:#}");
            1
        }
    }
}

fn init_tracing(quiet: bool) {
    use tracing_subscriber::EnvFilter;
    // On a terminal the progress bars carry progress, so only warnings are logged by default.
    let default = if quiet || std::io::stderr().is_terminal() {
        "warn"
    } else {
        "info"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}
