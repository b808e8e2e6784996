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
use super::slice::{certify_slice, Counted, Procedure, SliceEnd, SliceProgress, SliceRun};
use super::source::ModelSource;
use crate::certify::{BetaPrior, SequentialSettings, Settings, Smooth};
use crate::models::{Classifier, Precision};
use crate::plan::{Job, JobBuilder, PlanContext, ProgressUnit};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, CertifyMode, SpecError};

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
    /// Sequential certification (`n` is then its budget n_max); absent for Cohen's CERTIFY,
    /// so the mode changed no existing job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<SequentialParams>,
}

/// What a sequential certification adds to a job's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequentialParams {
    /// Radii to decide, ascending.
    pub radii: Vec<f64>,
    pub stop_if_wrong: bool,
    /// The Beta(a, b) mixing prior of the confidence sequence (part of the id: it changes the
    /// bound).
    pub prior_a: f64,
    pub prior_b: f64,
}

impl SequentialParams {
    pub fn new(radii: Vec<f64>, stop_if_wrong: bool) -> Self {
        let prior = BetaPrior::DEFAULT_PRIOR;
        Self {
            radii,
            stop_if_wrong,
            prior_a: prior.a,
            prior_b: prior.b,
        }
    }

    /// The procedure with Cohen-style settings `s` (`s.n` being the budget n_max).
    pub fn procedure(&self, s: &Settings) -> Procedure {
        Procedure::Sequential {
            settings: SequentialSettings {
                n0: s.n0,
                n_max: s.n,
                batch: s.batch,
                alpha: s.alpha,
                radii: self.radii.clone(),
                prior: BetaPrior {
                    a: self.prior_a,
                    b: self.prior_b,
                },
            },
            stop_if_wrong: self.stop_if_wrong,
        }
    }
}

/// How to certify with `s` (Cohen's `n`, or a sequential budget) and optional sequential
/// parameters.
pub fn procedure_of(s: Settings, sequential: Option<&SequentialParams>) -> Procedure {
    match sequential {
        None => Procedure::Cohen(s),
        Some(q) => q.procedure(&s),
    }
}

/// How a resumed certification job counts its progress: images for Cohen's, draws (with what
/// the rows already recorded spent) for sequential ones.
pub fn counted(
    procedure: &Procedure,
    members: usize,
    spent: impl FnOnce() -> Result<u64, JobError>,
) -> Result<Counted, JobError> {
    Ok(if procedure.is_sequential() {
        Counted::Draws {
            spent: spent()?,
            budget: procedure.budget_per_image().saturating_mul(members as u64),
        }
    } else {
        Counted::Images
    })
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

    pub fn procedure(&self) -> Procedure {
        procedure_of(self.settings(), self.sequential.as_ref())
    }
}

/// Per-cell overrides of the spec's `certify` block, accepted by every certifying method. The
/// sequential ones are namespaced: a bare `radii` or `mode` in a grid would read as anything.
pub const CERTIFY_KEYS: &[&str] = &[
    "n0",
    "n",
    "alpha",
    "batch",
    "skip",
    "max",
    "precision",
    "certify.mode",
    "certify.radii",
    "certify.n_max",
    "certify.stop_if_wrong",
];

/// The cell's `precision` (f32 unless the spec says bf16 or int8). int8 is defined for the
/// CIFAR ResNets' convolutions only, so another backbone with it is an error here, at plan time.
pub fn cell_precision(cell: &Cell, ctx: &PlanContext<'_>) -> Result<Precision, SpecError> {
    let Some((v, p)) = common::string(cell, ctx, "precision")? else {
        return Ok(Precision::F32);
    };
    let precision: Precision = v.parse().map_err(|e: String| ctx.error_at(p.span, e))?;
    if precision == Precision::Int8 && cell.params.contains_key("backbone") {
        let arch = super::backbone::arch_of(cell, ctx)?;
        if !matches!(arch, crate::arch::Arch::CifarResNet { .. }) {
            return Err(ctx.error_at(
                p.span,
                format!(
                    "precision int8 runs on CIFAR ResNet backbones only, not on {arch}; use f32 \
                     or bf16"
                ),
            ));
        }
    }
    Ok(precision)
}

/// The certification settings of a cell: the spec's `certify` block, overridden per cell.
pub fn cell_settings(cell: &Cell, ctx: &PlanContext<'_>) -> Result<(Settings, Slice), SpecError> {
    let (s, slice, _) = cell_certify(cell, ctx)?;
    Ok((s, slice))
}

/// A cell's `certify.radii`: a non-empty ascending list of finite numbers ≥ 0.
fn cell_radii(cell: &Cell, ctx: &PlanContext<'_>) -> Result<Option<Vec<f64>>, SpecError> {
    let Some(p) = cell.params.get("certify.radii") else {
        return Ok(None);
    };
    let bad = |why: &str| ctx.error_at(p.span, format!("certify.radii: {why}, found {}", p.value));
    let items = p
        .value
        .as_array()
        .ok_or_else(|| bad("expected a list of radii"))?;
    if items.is_empty() {
        return Err(bad("expected at least one radius"));
    }
    let mut radii: Vec<f64> = Vec::with_capacity(items.len());
    for v in items {
        let r = v
            .as_f64()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| bad("expected numbers ≥ 0"))?;
        if radii.last().is_some_and(|&prev| r <= prev) {
            return Err(bad("expected radii in strictly ascending order"));
        }
        radii.push(r);
    }
    Ok(Some(radii))
}

/// The certification of a cell: Cohen-style settings (`n` is the budget n_max when
/// sequential), the slice, and the sequential parameters when the cell's mode is sequential.
pub fn cell_certify(
    cell: &Cell,
    ctx: &PlanContext<'_>,
) -> Result<(Settings, Slice, Option<SequentialParams>), SpecError> {
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
    let mode = match common::string(cell, ctx, "certify.mode")? {
        None => c.mode,
        Some((v, p)) => CertifyMode::parse(&v).ok_or_else(|| {
            ctx.error_at(
                p.span,
                format!(
                    "unknown certify.mode `{v}`; expected one of: {}",
                    CertifyMode::NAMES.join(", ")
                ),
            )
        })?,
    };
    let radii = cell_radii(cell, ctx)?;
    let n_max = common::integer(cell, ctx, "certify.n_max")?;
    let stop_if_wrong = common::boolean(cell, ctx, "certify.stop_if_wrong")?;
    if mode == CertifyMode::Cohen {
        if let Some((key, p)) = ["certify.radii", "certify.n_max", "certify.stop_if_wrong"]
            .iter()
            .find_map(|k| cell.params.get(*k).map(|p| (k, p)))
        {
            return Err(ctx.error_at(
                p.span,
                format!(
                    "{key} applies to sequential certification only; set certify.mode: sequential"
                ),
            ));
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
        return Ok((s, slice, None));
    }
    let radii = radii.unwrap_or_else(|| c.radii.clone());
    if radii.is_empty() {
        let span = cell
            .params
            .get("certify.mode")
            .map(|p| p.span)
            .unwrap_or_default();
        return Err(ctx.error_at(
            span,
            "sequential certification needs radii: set certify.radii in the spec's certify block or the cell",
        ));
    }
    // The budget: the cell's n_max, else the study's, else the cell's (or study's) n.
    s.n = match n_max {
        Some((0, p)) => return Err(ctx.error_at(p.span, "expected certify.n_max ≥ 1")),
        Some((v, _)) => v,
        None => c.n_max.unwrap_or(s.n),
    };
    if s.n0 == 0 {
        let span = cell.params.get("n0").map(|p| p.span).unwrap_or_default();
        return Err(ctx.error_at(span, "expected n0 ≥ 1"));
    }
    let stop_if_wrong = stop_if_wrong.unwrap_or(c.stop_if_wrong);
    Ok((s, slice, Some(SequentialParams::new(radii, stop_if_wrong))))
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
    let backbone = super::backbone::name_of(cell, ctx)?;
    let data = common::test_data_ref(ctx)?;
    let (s, slice, sequential) = cell_certify(cell, ctx)?;
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
        sequential,
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
    let unit = if params.sequential.is_some() {
        ProgressUnit::Draws
    } else {
        ProgressUnit::Images
    };
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
    .counted_in(unit)
}

/// Puts `model` in `precision`: the fused CPU path's bf16 or int8 GEMM on the CPU, candle's bf16
/// tensors on the generic path (CUDA; int8 is an error there).
pub fn set_precision(
    model: &mut dyn Classifier,
    precision: Precision,
    device: &candle_core::Device,
) -> Result<(), JobError> {
    if precision.is_f32() {
        return Ok(());
    }
    model.set_precision(precision).map_err(JobError::fatal)?;
    let fused = crate::models::path::fused(device);
    if precision == Precision::Int8 && !fused {
        return Err(JobError::fatal(
            "precision int8 runs on the fused CPU path only: run the job with `--device cpu` \
             (and without CAF_GENERIC_PATH), or use f32 or bf16",
        ));
    }
    if let Some(note) = fused
        .then(|| crate::models::emulated_precision_note(precision))
        .flatten()
    {
        tracing::warn!("{note}");
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
        super::common::check_classes(model.num_classes(), data.as_ref())?;
        let indices = p.slice.indices(data.len());
        let done: BTreeSet<u64> = self.results.cert_done(&ctx.id)?.into_iter().collect();
        let done = [done];
        let procedure = p.procedure();
        let counted = counted(&procedure, 1, || self.results.cert_draws(&ctx.id))?;
        let mut progress =
            SliceProgress::resume_counting(ctx, &indices, &done, "certified", counted)?;
        let run = SliceRun {
            data: data.as_ref(),
            indices: &indices,
            done: &done,
            seed: p.seed,
            sigma: p.sigma,
            procedure,
        };
        let smooth =
            Smooth::new(model.as_ref(), p.sigma, device.clone()).with_input(data.shape().tuple());
        let end = certify_slice(&smooth, &run, &|| ctx.cancelled(), &mut |rows| {
            for (_, row) in &rows {
                self.results.record_cert(&ctx.lease, &ctx.id, row)?;
            }
            progress.image_done(ctx, &rows)
        })?;
        match end {
            SliceEnd::Interrupted => Ok(JobOutput::Interrupted),
            SliceEnd::Finished => Ok(JobOutput::Done(
                serde_json::json!({ "images": progress.total() }),
            )),
        }
    }
}
