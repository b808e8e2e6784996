//! Smoothing methods: how each grid cell becomes jobs (planning) and what each job kind does
//! (handlers). Adding a method means adding a module here and a line to [`plan_cell`] and
//! [`registry`]; the scheduler and the store stay untouched.
//!
//! Job kinds so far: `certify` (Cohen's CERTIFY of a given model at σ over a slice of the test
//! set) and `eval` (clean accuracy of the base model on the same slice).
//! Methods so far: `smooth` (certify the backbone as it is) and `clean` (only its clean accuracy).

pub mod common;
pub mod eval;
pub mod smooth;

use std::sync::Arc;

use crate::plan::{Job, PlanContext};
use crate::sched::Registry;
use crate::spec::{Cell, SpecError};

/// Method names a grid cell may use.
pub const METHODS: &[&str] = &["smooth", "clean"];

/// Expands one grid cell into its jobs (shared upstream jobs are deduplicated by the planner).
pub fn plan_cell(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let method = common::method_of(cell, ctx)?;
    match method.as_str() {
        "smooth" => smooth::plan(cell, ctx),
        "clean" => eval::plan(cell, ctx),
        other => {
            let span = cell
                .params
                .get("method")
                .map(|p| p.span)
                .unwrap_or_default();
            Err(ctx.error_at(
                span,
                format!(
                    "unknown method `{other}` (expected one of: {})",
                    METHODS.join(", ")
                ),
            ))
        }
    }
}

/// Every job kind this build of caf can run.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(smooth::CertifyHandler));
    r.register(Arc::new(eval::EvalHandler));
    r
}
