//! Job kind `certify`: Cohen et al.'s CERTIFY of one model at σ over a slice of the test set.
//! Every certifying method plans its certifications through [`certify_job`], with the spec's
//! `certify` block overridden per cell.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::common::{self, DataRef, Slice};
use super::handler::TypedHandler;
use super::loaded::Loaded;
use super::results::Results;
use super::slice::{certify_slice, SliceEnd, SliceProgress, SliceRun};
use super::source::ModelSource;
use crate::certify::{Settings, Smooth};
use crate::models::{Classifier, Precision};
use crate::plan::{Job, JobBuilder, PlanContext};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};

pub const KIND: &str = "certify";
/// Bump when a change to the certification code changes its results.
pub const VERSION: u32 = 2;

/// Parameters of a `certify` job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CertifyParams {
    pub backbone: String,
    pub model: ModelSource,
    pub data: DataRef,
    pub sigma: f64,
    pub seed: u64,
    pub n0: u64,
    pub n: u64,
    pub alpha: f64,
    pub batch: usize,
    pub slice: Slice,
    /// Arithmetic of the model's fused CPU path; absent (f32) in the ids of f32 jobs, so
    /// adding the option changed no existing job id.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl CertifyParams {
    pub fn settings(&self) -> Settings {
        Settings {
            n0: self.n0,
            n: self.n,
            alpha: self.alpha,
            batch: self.batch,
        }
    }
}

/// Per-cell overrides of the spec's `certify` block, accepted by every certifying method.
pub const CERTIFY_KEYS: &[&str] = &["n0", "n", "alpha", "batch", "skip", "max", "precision"];

/// The cell's `precision` (f32 unless the spec says bf16).
pub fn cell_precision(cell: &Cell, ctx: &PlanContext<'_>) -> Result<Precision, SpecError> {
    match common::string(cell, ctx, "precision")? {
        None => Ok(Precision::F32),
        Some((v, p)) => v.parse().map_err(|e: String| ctx.error_at(p.span, e)),
    }
}

/// The certification settings of a cell: the spec's `certify` block, overridden per cell.
pub fn cell_settings(cell: &Cell, ctx: &PlanContext<'_>) -> Result<(Settings, Slice), SpecError> {
    let c = &ctx.spec.certify;
    let mut s = Settings {
        n0: c.n0,
        n: c.n,
        alpha: c.alpha,
        batch: c.batch,
    };
    let mut slice = Slice {
        skip: c.skip,
        max: c.max,
    };
    if let Some((v, _)) = common::integer(cell, ctx, "n0")? {
        s.n0 = v;
    }
    if let Some((v, _)) = common::integer(cell, ctx, "n")? {
        s.n = v;
    }
    if let Some((v, p)) = common::number(cell, ctx, "alpha")? {
        if !(v > 0.0 && v < 1.0) {
            return Err(ctx.error_at(p.span, format!("expected alpha in (0, 1), found {v}")));
        }
        s.alpha = v;
    }
    if let Some((v, p)) = common::integer(cell, ctx, "batch")? {
        if v == 0 {
            return Err(ctx.error_at(p.span, "expected batch ≥ 1"));
        }
        s.batch = v as usize;
    }
    if let Some((v, p)) = common::integer(cell, ctx, "skip")? {
        if v == 0 {
            return Err(ctx.error_at(p.span, "expected skip ≥ 1"));
        }
        slice.skip = v as usize;
    }
    if let Some((v, _)) = common::integer(cell, ctx, "max")? {
        slice.max = Some(v as usize);
    }
    if s.n0 == 0 || s.n0 >= s.n {
        let span = cell
            .params
            .get("n0")
            .or(cell.params.get("n"))
            .map(|p| p.span)
            .unwrap_or_default();
        return Err(ctx.error_at(
            span,
            format!("expected 1 ≤ n0 < n, found n0 = {} and n = {}", s.n0, s.n),
        ));
    }
    Ok((s, slice))
}

/// The cell's σ (required by every certifying method).
pub fn cell_sigma(cell: &Cell, ctx: &PlanContext<'_>, method: &str) -> Result<f64, SpecError> {
    match common::number(cell, ctx, "sigma")? {
        Some((v, _)) => Ok(v),
        None => Err(SpecError::whole_file(
            &ctx.spec.path,
            format!("method `{method}` needs a `sigma` parameter"),
        )),
    }
}

/// A `certify` job of `model` at `sigma` with the cell's certification settings.
pub fn certify_job(
    cell: &Cell,
    ctx: &mut PlanContext<'_>,
    model: ModelSource,
    label: String,
    sigma: f64,
) -> Result<Job, SpecError> {
    let (backbone, _) = common::backbone_ref(cell, ctx)?;
    let data = common::test_data_ref(ctx)?;
    let (s, slice) = cell_settings(cell, ctx)?;
    let precision = cell_precision(cell, ctx)?;
    let params = CertifyParams {
        backbone,
        model,
        data,
        sigma,
        seed: ctx.spec.seed,
        n0: s.n0,
        n: s.n,
        alpha: s.alpha,
        batch: s.batch,
        slice,
        precision,
    };
    let mut cert = job(params, label);
    // Name per-cell overrides so jobs that differ only in them can be told apart.
    for key in CERTIFY_KEYS {
        if let Some(p) = cell.params.get(*key) {
            let value = match p.value.as_str() {
                Some(text) => text.to_string(),
                None => p.value.to_string(),
            };
            cert.label.push_str(&format!(" {key}={value}"));
        }
    }
    Ok(cert)
}

/// A `certify` job for the given parameters.
pub fn job(params: CertifyParams, label: String) -> Job {
    let deps = params.model.deps();
    let value = serde_json::to_value(&params).unwrap_or_default();
    JobBuilder {
        kind: KIND,
        version: VERSION,
        label,
        identity: common::identity_of(&value, &["weights", "root", "backbone"]),
        params: value,
        deps,
    }
    .build()
}

/// Puts `model` in `precision`: the fused CPU path's bf16 GEMM on the CPU, candle's bf16
/// tensors on the generic path (CUDA).
pub fn set_precision(
    model: &mut dyn Classifier,
    precision: Precision,
    device: &candle_core::Device,
) -> Result<(), JobError> {
    if precision.is_f32() {
        return Ok(());
    }
    model.set_precision(precision).map_err(JobError::fatal)?;
    if crate::models::path::fused(device) && !crate::models::gemm::bf16_kernel_available() {
        tracing::warn!("this CPU has no AVX-512 BF16: bf16 runs the emulated (f32) GEMM");
    }
    Ok(())
}

/// Runs `certify` jobs.
pub struct CertifyHandler {
    pub results: Arc<dyn Results>,
    /// Models and data kept from earlier jobs of this process.
    pub loaded: Arc<Loaded>,
}

impl TypedHandler for CertifyHandler {
    const KIND: &'static str = KIND;
    type Params = CertifyParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: CertifyParams,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError> {
        let model = self
            .loaded
            .model(&p.model, p.precision, ctx.device, device, || {
                p.model.load(ctx.sink.as_ref(), device)
            })?;
        let data = self.loaded.data(&p.data)?;
        let indices = p.slice.indices(data.len());
        let done: BTreeSet<u64> = self.results.cert_done(&ctx.id)?.into_iter().collect();
        let done = [done];
        let mut progress = SliceProgress::resume(ctx, &indices, &done, "certified")?;
        let run = SliceRun {
            data: &data,
            indices: &indices,
            done: &done,
            seed: p.seed,
            sigma: p.sigma,
            settings: p.settings(),
        };
        let smooth = Smooth::new(model.as_ref(), p.sigma, device.clone());
        let end = certify_slice(&smooth, &run, &|| ctx.cancelled(), &mut |rows| {
            for (_, row) in rows {
                self.results.record_cert(&ctx.id, &row)?;
            }
            progress.advance(ctx, 1)
        })?;
        match end {
            SliceEnd::Interrupted => Ok(JobOutput::Interrupted),
            SliceEnd::Finished => Ok(JobOutput::Done(
                serde_json::json!({ "images": progress.total() }),
            )),
        }
    }
}
