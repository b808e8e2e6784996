//! `caf eval`: clean accuracy of one model.

use anyhow::{bail, Result};

use caf::data::Split;
use caf::methods::common::Slice;
use caf::methods::eval::predict_indices;

use super::args::{EvalArgs, SplitArg};
use super::exit::usage;
use super::model::{load_classifier, load_data};

pub fn eval(a: EvalArgs) -> Result<i32> {
    if a.skip == 0 || a.batch == 0 {
        bail!(usage("--skip and --batch must be at least 1"));
    }
    let (mut model, device) = load_classifier(&a.model)?;
    model
        .set_precision(a.precision)
        .map_err(|e| usage(e.to_string()))?;
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::Test => Split::Test,
    };
    let set = load_data(&a.model, split, model.as_ref())?;
    let indices = Slice {
        skip: a.skip,
        max: a.max,
    }
    .indices(set.len());
    let mut correct = 0usize;
    for chunk in indices.chunks(a.batch) {
        let rows = predict_indices(model.as_ref(), &device, set.as_ref(), chunk)?;
        correct += rows.iter().filter(|r| r.label == r.predict).count();
    }
    let total = indices.len();
    let acc = if total == 0 {
        0.0
    } else {
        correct as f64 / total as f64
    };
    outln!("accuracy: {acc:.4} ({correct}/{total})");
    Ok(0)
}
