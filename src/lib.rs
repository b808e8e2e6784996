//! caf: an experiment runner for certified adversarial robustness.
//!
//! The library holds every concern as a module; the `caf` binary (`src/main.rs` + `src/cli`) is a
//! thin layer that parses flags and calls into it.
//!
//! Data flow: `spec` (YAML → typed, validated study) → `plan` (study → DAG of content-addressed
//! jobs) → `store` (SQLite: studies, jobs, leases, per-image results) → `sched` (claims ready jobs,
//! runs them through the `methods` registry with heartbeats) → `certify` (Cohen et al.'s
//! PREDICT/CERTIFY over `models` on `data`).

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
