//! Smoothing methods: how each grid cell becomes jobs (planning) and what each job kind does
//! (handlers).
//!
//! **Adding a method** is one module here plus one line in [`METHODS`] (and one line in
//! [`registry`] if it brings a job kind of its own); the planner, the scheduler and the store
//! stay untouched, since they reach methods only through [`planner`] and [`registry`].
//!
//! A cell's backbone is a checkpoint file or a network the study trains clean first
//! ([`backbone`]). Methods: `smooth` (certify the backbone as it is), `clean` (only its clean accuracy), `rs`
//! (Gaussian-augmentation training), `smoothadv` (SmoothAdv adversarial training), `caf`
//! (certifying adapters on a frozen backbone, clean or rs- or smoothadv-trained),
//! `caf-ensemble` (one adapter per σ, certified across all σ) and `denoised` (denoised
//! smoothing: a DnCNN trained in front of the frozen classifier).
//!
//! Job kinds: `certify` (Cohen's CERTIFY of a model at σ over a slice of the test set,
//! [`certify_job`]), `certify-fused` (several certify jobs over one backbone pass, [`fused`]),
//! `eval` (clean accuracy, [`eval`]), `train-rs` (also SmoothAdv), `train-caf` and
//! `train-denoised` (training under noise, resumable from checkpoints; [`train_job`] runs the
//! loop of [`train`] inside a job).

pub mod backbone;
pub mod budget;
pub mod caf;
pub mod certify_job;
pub mod common;
pub mod denoised;
pub mod eval;
pub mod fused;
pub mod handler;
pub mod loaded;
pub mod results;
pub mod rs;
pub mod slice;
pub mod smooth;
pub mod smoothadv;
pub mod source;
pub mod train;
pub mod train_job;

use std::collections::HashMap;
use std::sync::Arc;

use crate::plan::{CellOutput, CellPlanner, Job, JobId, PlanContext, PlannedCell};
use crate::sched::Registry;
use crate::spec::{Cell, SpecError};
use handler::Typed;
pub use results::{Results, StoreResults};

/// A method a grid cell may name, and how it expands a cell into jobs.
pub struct Method {
    pub name: &'static str,
    pub plan: fn(&Cell, &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError>,
}

/// Every method, one line each.
pub const METHODS: &[Method] = &[
    Method {
        name: "smooth",
        plan: smooth::plan,
    },
    Method {
        name: "clean",
        plan: eval::plan,
    },
    Method {
        name: "rs",
        plan: rs::plan,
    },
    Method {
        name: "smoothadv",
        plan: rs::plan_smoothadv,
    },
    Method {
        name: "caf",
        plan: caf::plan,
    },
    Method {
        name: "caf-ensemble",
        plan: caf::plan_ensemble,
    },
    Method {
        name: "denoised",
        plan: denoised::plan,
    },
];

/// Models a worker keeps loaded between jobs (a few backbones and their variants), and data
/// splits (a CIFAR-10 split is 30 MB).
const CACHED_MODELS: usize = 8;
const CACHED_DATA: usize = 2;

/// Every job kind this build of caf can run; result rows go to `results`.
pub fn registry(results: Arc<dyn Results>) -> Registry {
    let loaded = Arc::new(loaded::Loaded::new(CACHED_MODELS, CACHED_DATA));
    let mut r = Registry::new();
    r.register(Arc::new(Typed(certify_job::CertifyHandler {
        results: results.clone(),
        loaded: loaded.clone(),
    })));
    r.register(Arc::new(Typed(fused::FusedHandler {
        results: results.clone(),
    })));
    r.register(Arc::new(Typed(eval::EvalHandler {
        results: results.clone(),
        loaded,
    })));
    r.register(Arc::new(Typed(rs::TrainRsHandler {
        results: results.clone(),
    })));
    r.register(Arc::new(Typed(caf::TrainCafHandler {
        results: results.clone(),
    })));
    r.register(Arc::new(Typed(denoised::TrainDenoisedHandler { results })));
    r
}

/// The planner over [`METHODS`], for [`crate::plan::Plan::from_spec`].
pub fn planner() -> Planner {
    Planner
}

/// Expands cells through [`METHODS`] and fuses certifications that can share a backbone.
pub struct Planner;

impl CellPlanner for Planner {
    fn plan_cell(&self, cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<PlannedCell, SpecError> {
        let method = common::method_of(cell, ctx)?;
        let Some(m) = METHODS.iter().find(|m| m.name == method) else {
            let span = cell
                .params
                .get("method")
                .map(|p| p.span)
                .unwrap_or_default();
            let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
            return Err(ctx.error_at(
                span,
                format!(
                    "unknown method `{method}` (expected one of: {})",
                    names.join(", ")
                ),
            ));
        };
        let mut jobs = (m.plan)(cell, ctx)?;
        // A backbone the study trains is trained before anything uses it: its job belongs to
        // every cell that names it (the plan keeps one).
        if let Some(training) = backbone::training_of_cell(cell, ctx)? {
            jobs.insert(0, training);
        }
        let outputs = cell_outputs(&jobs);
        Ok(PlannedCell {
            method,
            jobs,
            outputs,
        })
    }

    fn finalize(&self, jobs: &mut Vec<Job>) {
        fused::fuse(jobs);
    }
}

/// The cell's results: its certification and clean-accuracy jobs, each with the σ it
/// certifies at and the σ its model was trained at.
fn cell_outputs(jobs: &[Job]) -> Vec<CellOutput> {
    let by_id: HashMap<&JobId, &Job> = jobs.iter().map(|j| (&j.id, j)).collect();
    jobs.iter()
        .filter(|j| j.kind == certify_job::KIND || j.kind == eval::KIND)
        .map(|j| {
            // The trained model is the certify job's `model.job` dependency, whose own params
            // say the σ it was trained at; σ = 0 is a clean training (a backbone the study
            // trains itself), not a noise level.
            let trained_sigma = j
                .params
                .pointer("/model/job")
                .and_then(|v| v.as_str())
                .and_then(|id| by_id.get(&JobId::new(id)))
                .and_then(|t| t.params.pointer("/train/sigma"))
                .and_then(|v| v.as_f64())
                .filter(|&s| s > 0.0);
            CellOutput {
                job: j.id.clone(),
                kind: j.kind.clone(),
                sigma: j.params.get("sigma").and_then(|v| v.as_f64()),
                trained_sigma,
            }
        })
        .collect()
}
