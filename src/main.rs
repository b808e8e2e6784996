//! The `caf` binary: flag parsing and glue only; everything else lives in the library.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
