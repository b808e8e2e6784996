//! caf: an experiment runner for certified adversarial robustness.
//!
//! The library holds every concern as a module; the `caf` binary (`src/main.rs` + `src/cli`) is a
//! thin layer that parses flags and calls into it.
//!
//! Modules depend one way (a test reads the `crate::` paths and fails on any cycle):
//! `spec` (YAML → typed, validated study; names architectures through the candle-free `arch`)
//! → `plan` (study → DAG of content-addressed jobs, through a `CellPlanner` it is handed)
//! → `queue` (the scheduler's narrow view of a backend: leases, progress, events, files)
//! → `store` (SQLite: studies, jobs, leases, results; implements `queue::Queue`)
//! → `sched` (claims ready jobs and runs them through a `Registry` of handlers; knows no method
//! and no SQL) → `methods` (plans cells, implements the handlers, writes result rows to a
//! `methods::Results`) → `certify`, `models`, `data` (Cohen et al.'s PREDICT/CERTIFY over candle
//! models on images). `report` reads the store; `bench` drives models and methods.

pub mod arch;
pub mod bench;
pub mod certify;
pub mod data;
pub mod methods;
pub mod models;
pub mod plan;
pub mod queue;
pub mod report;
pub mod sched;
pub mod spec;
pub mod store;
pub mod util;
