//! `arch: onnx`: any network exported with `torch.onnx.export`, as a frozen backbone.
//!
//! The graph runs in tract (pure Rust, CPU), not candle: tract runs the fixtures' opset-18
//! exports (3-input `Pad`, `LayerNormalization`, `ReduceMean` with its axes as an input), which
//! candle-onnx 0.11 does not; README's "Bring your own backbone" has the measured comparison. Inputs are copied out of candle and the outputs back in, so what the graph
//! returns is a constant to autograd: gradients never enter the frozen graph, as CAF wants.
//!
//! The graph takes one input [B, 3, H, W] (batch dimension symbolic or fixed) and may return
//! several outputs; [`OnnxOutputs`] says which are the features and the logits. The model's
//! [`Normalize`] is applied before the graph (identity by default: an exported model usually
//! normalises inside its graph).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use tract_onnx::prelude::{
    Framework, InferenceModelExt, IntoTValue, OutletId, TVec, TypedRunnableModel,
};

use super::{Classifier, ModelError, Normalize};
use crate::arch::OnnxOutputs;

/// One of the graph outputs caf reads: its index among the plan's outputs and its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Output {
    index: usize,
    width: usize,
}

/// An ONNX graph, optimised by tract for any batch size.
#[derive(Clone)]
pub struct OnnxNet {
    plan: Arc<TypedRunnableModel>,
    feature: Option<Output>,
    logits: Option<Output>,
    normalize: Normalize,
    path: PathBuf,
}

impl std::fmt::Debug for OnnxNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxNet")
            .field("path", &self.path)
            .field("feature", &self.feature)
            .field("logits", &self.logits)
            .field("normalize", &self.normalize)
            .finish()
    }
}

/// The ONNX operators of `proto` that tract has no implementation for, as (operator, node).
fn unsupported_ops(
    onnx: &tract_onnx::Onnx,
    proto: &tract_onnx::pb::ModelProto,
) -> Vec<(String, String)> {
    let Some(graph) = &proto.graph else {
        return vec![];
    };
    graph
        .node
        .iter()
        .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
        .map(|n| {
            let name = if n.name.is_empty() {
                // Nodes need no name in ONNX; their first output names them then.
                n.output.first().cloned().unwrap_or_default()
            } else {
                n.name.clone()
            };
            (n.op_type.clone(), name)
        })
        .collect()
}

/// Reads `path`, checks every operator is supported, and optimises the graph for the outputs
/// `outputs` names (see [`OnnxOutputs`] for the defaults).
pub fn load_onnx(
    path: &Path,
    outputs: &OnnxOutputs,
    normalize: Normalize,
) -> Result<OnnxNet, ModelError> {
    let fail = |message: String| ModelError::weights(path, message);
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_path(path)
        .map_err(|e| fail(format!("not a readable ONNX model: {e:#}")))?;
    if let Some((op, node)) = unsupported_ops(&onnx, &proto).into_iter().next() {
        return Err(ModelError::UnsupportedOnnxOp {
            path: path.to_path_buf(),
            op,
            node,
        });
    }
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| fail(format!("{e:#}")))?;

    let names: Vec<String> = model
        .output_outlets()
        .map_err(|e| fail(format!("{e:#}")))?
        .iter()
        .map(|o| model.outlet_label(*o).unwrap_or_default().to_string())
        .collect();
    let find = |name: &str| model.find_outlet_label(name);
    let pick = |explicit: &Option<String>, fallback: &str, what: &str| match explicit {
        Some(name) => find(name).map(Some).ok_or_else(|| {
            fail(format!(
                "the graph has no output `{name}` for {what} (its outputs: {})",
                names.join(", ")
            ))
        }),
        None => Ok(find(fallback)),
    };
    let feature = pick(&outputs.feature, "feature", "the features")?;
    let mut logits = pick(&outputs.logits, "logits", "the logits")?;
    if logits.is_none() && feature.is_none() && names.len() == 1 {
        logits = model.output_outlets().ok().map(|o| o[0]);
    }
    if feature.is_none() && logits.is_none() {
        return Err(fail(format!(
            "name the graph output holding the features (`feature:`) or the logits \
             (`logits:`); its outputs: {}",
            names.join(", ")
        )));
    }
    // Only the outputs caf reads stay outputs, so tract prunes whatever only feeds the others.
    let kept: Vec<OutletId> = feature.iter().chain(logits.iter()).copied().collect();
    let typed = model
        .with_output_outlets(&kept)
        .and_then(|m| m.into_optimized())
        .map_err(|e| fail(format!("{e:#}")))?;
    let width = |index: usize| -> Result<Output, ModelError> {
        let fact = typed
            .output_fact(index)
            .map_err(|e| fail(format!("{e:#}")))?;
        let dims = fact.shape.to_tvec();
        let width = match dims.len() {
            2 => dims[1].to_usize().ok(),
            _ => None,
        };
        width.map(|width| Output { index, width }).ok_or_else(|| {
            fail(format!(
                "output `{}` has shape {:?}; caf reads [batch, width] outputs",
                names_of(&typed, index),
                fact.shape
            ))
        })
    };
    let feature_out = feature.map(|_| width(0)).transpose()?;
    let logits_out = logits
        .map(|_| width(usize::from(feature.is_some())))
        .transpose()?;
    // tract's matrix products share rayon's global pool with candle's (caf's `--threads`).
    let options = tract_onnx::tract_core::runtime::RunOptions {
        executor: Some(tract_linalg::multithread::Executor::RayonGlobal),
        ..Default::default()
    };
    let plan = typed
        .into_runnable_with_options(&options)
        .map_err(|e| fail(format!("{e:#}")))?;
    Ok(OnnxNet {
        plan,
        feature: feature_out,
        logits: logits_out,
        normalize,
        path: path.to_path_buf(),
    })
}

fn names_of(model: &tract_onnx::prelude::TypedModel, index: usize) -> String {
    model
        .output_outlets()
        .ok()
        .and_then(|o| o.get(index).copied())
        .and_then(|o| model.outlet_label(o))
        .unwrap_or("?")
        .to_string()
}

impl OnnxNet {
    /// Runs the graph on `x` [B, 3, H, W] in [0,1]; the outputs as constants on `x`'s device.
    fn run(&self, x: &Tensor) -> candle_core::Result<TVec<Tensor>> {
        let err = |e: tract_onnx::prelude::TractError| {
            candle_core::Error::Msg(format!("{}: {e:#}", self.path.display()))
        };
        let device = x.device().clone();
        let x = self.normalize_input(&x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
        let shape = x.dims().to_vec();
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let input = tract_onnx::prelude::Tensor::from_shape(&shape, &data).map_err(err)?;
        let mut inputs = TVec::new();
        inputs.push(input.into_tvalue());
        let outs = self.plan.run(inputs).map_err(err)?;
        outs.iter()
            .map(|t| {
                let view = t.to_plain_array_view::<f32>().map_err(err)?;
                let values: Vec<f32> = view.iter().copied().collect();
                Tensor::from_vec(values, t.shape(), &device)
            })
            .collect()
    }

    fn normalize_input(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.normalize == Normalize::IDENTITY {
            return Ok(x.clone());
        }
        let mean = Tensor::from_slice(&self.normalize.mean, (1, 3, 1, 1), x.device())?;
        let std = Tensor::from_slice(&self.normalize.std, (1, 3, 1, 1), x.device())?;
        x.broadcast_sub(&mean)?.broadcast_div(&std)
    }

    fn output(&self, x: &Tensor, which: Option<Output>, what: &str) -> candle_core::Result<Tensor> {
        let Some(out) = which else {
            return Err(candle_core::Error::Msg(format!(
                "{}: caf was given no {what} output of this graph (`{what}:` in the spec)",
                self.path.display()
            )));
        };
        self.run(x)?
            .into_iter()
            .nth(out.index)
            .ok_or_else(|| candle_core::Error::Msg("the graph returned too few outputs".into()))
    }

    /// φ(x) [B, feature_dim], a constant (never part of an autograd graph).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.output(x, self.feature, "feature")
    }

    /// Width of the feature output (0 when the graph was loaded for its logits only).
    pub fn feature_dim(&self) -> usize {
        self.feature.map_or(0, |o| o.width)
    }

    pub fn has_features(&self) -> bool {
        self.feature.is_some()
    }

    pub fn normalize(&self) -> Normalize {
        self.normalize
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Classifier for OnnxNet {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.output(x, self.logits, "logits")
    }

    fn num_classes(&self) -> usize {
        self.logits.map_or(0, |o| o.width)
    }
}

#[cfg(test)]
#[path = "onnx_tests.rs"]
mod tests;
