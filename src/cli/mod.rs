//! Command-line interface. `main` parses the flags (`args`) and hands each command to its own
//! module. What commands share lives in modules that use no command: `exit` (exit codes, usage
//! errors), `db` (opening `--db`, picking a study), `study` (a spec's plan, loaded and
//! recorded, for `run`, `plan --record` and `submit`), `signals`, `cohen_tsv` and `model`. No
//! command uses another or this file, so each can change without touching the rest.

/// `println!` that returns the write error instead of panicking: `caf … | head` closes the pipe
/// on purpose, and `main` treats a broken pipe as success.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

mod args;
mod cohen_tsv;
mod db;
mod exit;
mod model;
mod signals;
mod study;

mod bench;
mod certify;
mod copy;
mod eval;
mod export;
mod import;
mod report;
mod run;
mod status;
mod submit;

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::Parser;

use args::{Cli, Command};

pub fn main() -> i32 {
    let cli = Cli::parse();
    let quiet = match &cli.command {
        Command::Run(r) => r.quiet,
        Command::Worker(w) => w.quiet,
        _ => false,
    };
    init_tracing(quiet);
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => exit::report(&err),
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    // A mistyped kernel level must not silently run other kernels than the user asked for.
    caf::models::gemm::kernel_level_from_env().map_err(exit::usage)?;
    match cli.command {
        Command::Run(a) => runtime()?.block_on(run::run(a)),
        Command::Submit(a) => runtime()?.block_on(submit::submit(a)),
        Command::Plan(a) if a.record => runtime()?.block_on(run::plan_record(a)),
        Command::Plan(a) => run::plan(a),
        Command::Worker(a) => runtime()?.block_on(run::worker(a)),
        Command::Status(a) => runtime()?.block_on(status::status(a)),
        Command::Retry(a) => runtime()?.block_on(run::retry(a)),
        Command::Export(a) => runtime()?.block_on(export::export(a)),
        Command::Report(a) => runtime()?.block_on(report::report(a)),
        Command::Import(a) => runtime()?.block_on(import::import(a)),
        Command::Certify(a) => certify::certify(a),
        Command::Eval(a) => eval::eval(a),
        Command::Bench(args::BenchArgs {
            what: args::BenchWhat::Queue(q),
        }) => runtime()?.block_on(bench::bench_queue(q)),
        Command::Bench(a) => bench::bench(a),
        Command::Db(a) => match a.what {
            args::DbWhat::Copy(c) => runtime()?.block_on(copy::copy(c)),
        },
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
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
