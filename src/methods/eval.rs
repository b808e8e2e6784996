//! Method `clean` and job kind `eval`: the base model's clean accuracy on the certified slice.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backbone;
use super::certify_job::cell_precision;
use super::common::{self, DataRef, Slice};
use super::handler::TypedHandler;
use super::loaded::Loaded;
use super::results::Results;
use super::slice::SliceProgress;
use super::source::ModelSource;
use crate::certify::predict_classes;
use crate::data::Images;
use crate::models::{Classifier, Precision};
use crate::plan::{Job, JobBuilder, PlanContext};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};
use crate::store::EvalRow;

pub const KIND: &str = "eval";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalParams {
    pub backbone: String,
    #[serde(with = "super::source::bare")]
    pub model: ModelSource,
    pub data: DataRef,
    pub slice: Slice,
    pub batch: usize,
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

pub fn plan(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    common::check_known(
        cell,
        ctx,
        "clean",
        &["backbone", "batch", "skip", "max", "precision"],
    )?;
    let (backbone, model) = backbone::of_cell(cell, ctx)?;
    let data = common::test_data_ref(ctx)?;
    let c = &ctx.spec.certify;
    let mut slice = Slice {
        skip: c.skip,
        max: c.max,
    };
    let mut batch = c.batch;
    if let Some((v, p)) = common::integer(cell, ctx, "skip")? {
        if v == 0 {
            return Err(ctx.error_at(p.span, "expected skip ≥ 1"));
        }
        slice.skip = v as usize;
    }
    if let Some((v, _)) = common::integer(cell, ctx, "max")? {
        slice.max = Some(v as usize);
    }
    if let Some((v, p)) = common::integer(cell, ctx, "batch")? {
        if v == 0 {
            return Err(ctx.error_at(p.span, "expected batch ≥ 1"));
        }
        batch = v as usize;
    }
    let precision = cell_precision(cell, ctx)?;
    Ok(vec![job(&backbone, model, data, slice, batch, precision)])
}

pub fn job(
    backbone: &str,
    model: ModelSource,
    data: DataRef,
    slice: Slice,
    batch: usize,
    precision: Precision,
) -> Job {
    let deps = model.deps();
    let params = EvalParams {
        backbone: backbone.to_string(),
        model,
        data,
        slice,
        batch,
        precision,
    };
    let value = serde_json::to_value(&params).unwrap_or_default();
    JobBuilder {
        kind: KIND,
        version: VERSION,
        label: match precision {
            Precision::F32 => format!("clean {backbone}"),
            p => format!("clean {backbone} precision={p}"),
        },
        // Batch size cannot change an argmax beyond float noise; leave it out so eval jobs are
        // shared between cells that certify with different batches.
        identity: common::identity_of(&value, &["weights", "root", "backbone", "batch"]),
        params: value,
        deps,
    }
    .build()
}

/// Predicts `indices` in batches; returns rows in index order.
pub fn predict_indices(
    model: &dyn Classifier,
    device: &candle_core::Device,
    data: &dyn Images,
    indices: &[usize],
) -> Result<Vec<EvalRow>, JobError> {
    let pixels = data.floats(indices).map_err(JobError::fatal)?;
    let x = candle_core::Tensor::from_vec(pixels, data.shape().batch_dims(indices.len()), device)
        .map_err(JobError::fatal)?;
    let preds = predict_classes(model, &x).map_err(JobError::retryable)?;
    Ok(indices
        .iter()
        .zip(preds)
        .map(|(&i, p)| EvalRow {
            idx: i as u64,
            label: data.label(i) as u32,
            predict: p,
        })
        .collect())
}

/// Runs `eval` jobs.
pub struct EvalHandler {
    pub results: Arc<dyn Results>,
    /// Models and data kept from earlier jobs of this process (shared with `certify`).
    pub loaded: Arc<Loaded>,
}

impl TypedHandler for EvalHandler {
    const KIND: &'static str = KIND;
    type Params = EvalParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: EvalParams,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError> {
        // Keyed like a certify job's model, so the two share one load.
        let model = self
            .loaded
            .model(&p.model, p.precision, ctx.device, device, || {
                p.model.load(ctx.sink.as_ref(), device)
            })?;
        let data = self.loaded.data(&p.data)?;
        super::common::check_classes(model.num_classes(), data.as_ref())?;
        let indices = p.slice.indices(data.len());
        let done: BTreeSet<u64> = self.results.eval_done(&ctx.id)?.into_iter().collect();
        let todo: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|i| !done.contains(&(*i as u64)))
            .collect();
        let mut progress = SliceProgress::resume(ctx, &indices, &[done], "predicted")?;
        for chunk in todo.chunks(p.batch.max(1)) {
            if ctx.cancelled() {
                return Ok(JobOutput::Interrupted);
            }
            let rows = predict_indices(model.as_ref(), device, data.as_ref(), chunk)?;
            self.results.record_eval(&ctx.lease, &ctx.id, &rows)?;
            progress.advance(ctx, rows.len() as u64)?;
        }
        Ok(JobOutput::Done(
            serde_json::json!({ "images": progress.total() }),
        ))
    }
}
