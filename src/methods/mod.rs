//! Smoothing methods: how each grid cell becomes jobs (planning) and what each job kind does
//! (handlers). Adding a method means adding a module here and a line to [`plan_cell`] and
//! [`registry`]; the scheduler and the store stay untouched.
//!
//! Job kinds: `certify` (Cohen's CERTIFY of a model at σ over a slice of the test set), `eval`
//! (clean accuracy of a base model on the same slice), `train-rs` and `train-caf` (training under
//! noise, resumable from checkpoints).
//! Methods: `smooth` (certify the backbone as it is), `clean` (only its clean accuracy), `rs`
//! (Gaussian-augmentation training), `caf` (certifying adapters on a frozen backbone, clean or
//! rs- or smoothadv-trained), `smoothadv` (SmoothAdv adversarial training), `caf-ensemble` (one adapter per σ, certified across all σ) and `denoised`
//! (denoised smoothing: a DnCNN trained in front of the frozen classifier).

pub mod budget;
pub mod caf;
pub mod common;
pub mod denoised;
pub mod eval;
pub mod fused;
pub mod rs;
pub mod smooth;
pub mod smoothadv;
pub mod source;
pub mod train;
pub mod training;

use std::sync::Arc;

use crate::plan::{Job, PlanContext};
use crate::sched::Registry;
use crate::spec::{Cell, SpecError};

/// Method names a grid cell may use.
pub const METHODS: &[&str] = &[
    "smooth",
    "clean",
    "rs",
    "smoothadv",
    "caf",
    "caf-ensemble",
    "denoised",
];

/// Expands one grid cell into its jobs (shared upstream jobs are deduplicated by the planner).
pub fn plan_cell(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let method = common::method_of(cell, ctx)?;
    match method.as_str() {
        "smooth" => smooth::plan(cell, ctx),
        "clean" => eval::plan(cell, ctx),
        "rs" => rs::plan(cell, ctx),
        "smoothadv" => rs::plan_smoothadv(cell, ctx),
        "caf" => caf::plan(cell, ctx),
        "caf-ensemble" => caf::plan_ensemble(cell, ctx),
        "denoised" => denoised::plan(cell, ctx),
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

/// Plan-wide rewrites after every cell is expanded: fuse certifications that share a backbone.
pub fn finalize(jobs: &mut Vec<Job>) {
    fused::fuse(jobs);
}

/// Every job kind this build of caf can run.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(smooth::CertifyHandler));
    r.register(Arc::new(eval::EvalHandler));
    r.register(Arc::new(rs::TrainRsHandler));
    r.register(Arc::new(caf::TrainCafHandler));
    r.register(Arc::new(denoised::TrainDenoisedHandler));
    r.register(Arc::new(fused::FusedHandler));
    r
}
