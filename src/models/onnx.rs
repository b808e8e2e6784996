//! `arch: onnx`: any network exported with `torch.onnx.export`, as a frozen backbone.
//!
//! The graph runs in tract (pure Rust, CPU), not candle: tract runs the fixtures' opset-18
//! exports (3-input `Pad`, `LayerNormalization`, `ReduceMean` with its axes as an input), which
//! candle-onnx 0.11 does not; README's "Bring your own backbone" has the comparison.
//! Inputs are copied out of candle and the outputs back in, so what the graph returns is a
//! constant to autograd: gradients never enter the frozen graph, as CAF wants. tract runs on the
//! CPU only, so an ONNX model is refused on any other device rather than silently copying every
//! batch across.
//!
//! The graph takes one input [B, 3, H, W] and may return several outputs; [`OnnxOutputs`] says
//! which are the features and the logits. The model's [`Normalize`] is applied before the graph
//! (identity by default: an exported model usually normalises inside its graph).
//!
//! Speed: images run through the graph one at a time, in parallel on rayon's pool (the one
//! caf's own kernels use), through a plan tract optimised for a batch of one. Why not one
//! batched run: tract lowers a convolution over one image to "lazy im2col" (patches gathered
//! while multiplying) but materialises and repacks the whole im2col matrix for a batch of
//! several, and inside a batched run its matrix products are split across threads layer by
//! layer. `perf` put over half of a batched ResNet-20 run in that packing; one image per thread
//! measured 1.4–2× the batched throughput on ResNet-20 and 1.2–1.6× on the small ViT (README,
//! "Bring your own backbone"). Leaving the batch dimension symbolic or fixing it made
//! no difference of its own. A graph exported with a fixed batch size b runs in chunks of b
//! (the last padded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoTValue, OutletId, Symbol, TDim, TVec, TractError,
    TypedModel, TypedRunnableModel,
};

use super::{Classifier, ModelError, Normalize};
use crate::arch::OnnxOutputs;

/// Plans kept per graph: one per image shape, so more than one only for a graph whose image
/// side is symbolic; every plan holds its own packed copy of the weights.
const MAX_PLANS: usize = 4;

/// One of the graph outputs caf reads: its index among the kept outputs and its width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Output {
    index: usize,
    width: usize,
}

/// Values by key, at most `cap` of them, the oldest dropped first.
#[derive(Debug)]
struct Cache<K, V> {
    entries: Vec<(K, V)>,
    cap: usize,
}

impl<K: PartialEq, V: Clone> Cache<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            entries: Vec::new(),
            cap,
        }
    }

    fn get_or_try_insert<E>(
        &mut self,
        key: K,
        make: impl FnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        if let Some((_, v)) = self.entries.iter().find(|(k, _)| *k == key) {
            return Ok(v.clone());
        }
        let v = make()?;
        if self.entries.len() >= self.cap {
            self.entries.remove(0);
        }
        self.entries.push((key, v.clone()));
        Ok(v)
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }
}

type Plans = Cache<Vec<usize>, Arc<TypedRunnableModel>>;

/// An ONNX graph, with plans optimised per input shape as they are needed.
#[derive(Clone)]
pub struct OnnxNet {
    /// The typed, decluttered graph with only the outputs caf reads; its input dimensions still
    /// symbolic where the export left them so.
    model: Arc<TypedModel>,
    /// The input's dimensions: fixed ones as numbers, symbolic ones as their symbol.
    input: Vec<Dim>,
    /// Plans by the input shape of one run (a chunk of images), shared by clones.
    plans: Arc<Mutex<Plans>>,
    feature: Option<Output>,
    logits: Option<Output>,
    normalize: Normalize,
    path: PathBuf,
}

/// One dimension of the graph input.
#[derive(Clone, Debug)]
enum Dim {
    Fixed(usize),
    Symbol(Symbol),
    /// An expression of symbols (rare in exports): left to tract to check at run time.
    Other,
}

impl std::fmt::Debug for OnnxNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxNet")
            .field("path", &self.path)
            .field("input", &self.input)
            .field("feature", &self.feature)
            .field("logits", &self.logits)
            .field("normalize", &self.normalize)
            .finish()
    }
}

/// The name tract gives a node: its ONNX name, or (names being optional in ONNX) its first
/// output's.
fn node_name(n: &tract_onnx::pb::NodeProto) -> String {
    if n.name.is_empty() {
        n.output.first().cloned().unwrap_or_default()
    } else {
        n.name.clone()
    }
}

/// The first operator of `graph` (or of a subgraph, an `If`/`Loop` body) tract has no
/// implementation for, as (operator, node). tract itself would only fail later, at type
/// analysis, with a message that names neither clearly.
fn unsupported_op(
    onnx: &tract_onnx::Onnx,
    graph: &tract_onnx::pb::GraphProto,
) -> Option<(String, String)> {
    graph.node.iter().find_map(|n| {
        if !onnx.op_register.0.contains_key(&n.op_type) {
            return Some((n.op_type.clone(), node_name(n)));
        }
        n.attribute
            .iter()
            .flat_map(|a| a.g.iter().chain(a.graphs.iter()))
            .find_map(|g| unsupported_op(onnx, g))
    })
}

/// Reads `path`, checks every operator is supported, and prepares the graph for the outputs
/// `outputs` names (see [`OnnxOutputs`] for the defaults). `device` must be the CPU.
pub fn load_onnx(
    path: &Path,
    outputs: &OnnxOutputs,
    normalize: Normalize,
    device: &Device,
) -> Result<OnnxNet, ModelError> {
    if !device.is_cpu() {
        return Err(ModelError::OnnxNeedsCpu {
            path: path.to_path_buf(),
            device: format!("{:?}", device.location()),
        });
    }
    let fail = |message: String| ModelError::weights(path, message);
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_path(path)
        .map_err(|e| fail(format!("not a readable ONNX model: {e:#}")))?;
    if let Some((op, node)) = proto.graph.as_ref().and_then(|g| unsupported_op(&onnx, g)) {
        return Err(ModelError::UnsupportedOnnxOp {
            path: path.to_path_buf(),
            op,
            node,
        });
    }
    // The model's folder resolves tensors exported as external data (models over 2 GB).
    let dir = path.parent().and_then(Path::to_str);
    let parsed = onnx
        .parse(&proto, dir)
        .map_err(|e| fail(format!("{e:#}")))?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(fail(format!(
            "the graph uses values it never defines: {}",
            parsed.unresolved_inputs.join(", ")
        )));
    }
    let model = parsed.model;
    let input_count = model
        .input_outlets()
        .map_err(|e| fail(format!("{e:#}")))?
        .len();
    if input_count != 1 {
        return Err(fail(format!(
            "the graph has {input_count} inputs; caf feeds one, the images [B, 3, H, W]"
        )));
    }

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
        .and_then(|m| m.into_typed())
        .and_then(|m| m.into_decluttered())
        .map_err(|e| fail(format!("{e:#}")))?;

    let input_fact = typed.input_fact(0).map_err(|e| fail(format!("{e:#}")))?;
    if input_fact.datum_type != DatumType::F32 || input_fact.rank() != 4 {
        return Err(fail(format!(
            "the graph's input is {input_fact:?}; caf feeds f32 images [B, 3, H, W]"
        )));
    }
    let input = input_fact
        .shape
        .dims()
        .iter()
        .map(|d| match (d.to_i64(), &d) {
            (Ok(v), _) => Dim::Fixed(v as usize),
            (Err(_), TDim::Sym(s)) => Dim::Symbol(s.clone()),
            _ => Dim::Other,
        })
        .collect::<Vec<_>>();
    if matches!(input[1], Dim::Fixed(c) if c != 3) {
        return Err(fail(format!(
            "the graph's input is {input_fact:?}; caf feeds RGB images [B, 3, H, W]"
        )));
    }

    let width = |index: usize| -> Result<Output, ModelError> {
        let fact = typed
            .output_fact(index)
            .map_err(|e| fail(format!("{e:#}")))?;
        let label = typed
            .output_outlets()
            .ok()
            .and_then(|o| o.get(index).copied())
            .and_then(|o| typed.outlet_label(o))
            .unwrap_or("?");
        let width = match fact.shape.dims() {
            [_, w] => w.to_i64().ok().map(|w| w as usize),
            _ => None,
        };
        if fact.datum_type != DatumType::F32 {
            return Err(fail(format!(
                "output `{label}` is {:?}; caf reads f32 outputs",
                fact.datum_type
            )));
        }
        width.map(|width| Output { index, width }).ok_or_else(|| {
            fail(format!(
                "output `{label}` has shape {:?}; caf reads [batch, width] outputs",
                fact.shape
            ))
        })
    };
    let feature_out = feature.map(|_| width(0)).transpose()?;
    let logits_out = logits
        .map(|_| width(usize::from(feature.is_some())))
        .transpose()?;
    Ok(OnnxNet {
        model: Arc::new(typed),
        input,
        plans: Arc::new(Mutex::new(Cache::new(MAX_PLANS))),
        feature: feature_out,
        logits: logits_out,
        normalize,
        path: path.to_path_buf(),
    })
}

impl OnnxNet {
    /// How many images one run of the graph takes: the batch size it was exported with, or one
    /// where the batch is symbolic.
    fn chunk(&self) -> usize {
        match self.input[0] {
            Dim::Fixed(b) => b.max(1),
            _ => 1,
        }
    }

    /// The plan for one run on inputs of `shape`, optimised with every symbolic dimension set to
    /// its value in `shape` (made on first use, then cached).
    fn plan(&self, shape: &[usize]) -> Result<Arc<TypedRunnableModel>, String> {
        let expected = || {
            let dims: Vec<String> = self
                .input
                .iter()
                .map(|d| match d {
                    Dim::Fixed(v) => v.to_string(),
                    Dim::Symbol(s) => s.to_string(),
                    Dim::Other => "?".into(),
                })
                .collect();
            format!(
                "the graph takes inputs [{}], not {shape:?}",
                dims.join(", ")
            )
        };
        if shape.len() != self.input.len() {
            return Err(expected());
        }
        let mut values: HashMap<Symbol, TDim> = HashMap::new();
        for (dim, &got) in self.input.iter().zip(shape) {
            match dim {
                Dim::Fixed(want) if *want != got => return Err(expected()),
                Dim::Symbol(s) => {
                    // One symbol may name two dimensions (a square image's side).
                    let value = TDim::Val(got as i64);
                    if values
                        .insert(s.clone(), value.clone())
                        .is_some_and(|v| v != value)
                    {
                        return Err(expected());
                    }
                }
                _ => {}
            }
        }
        // A poisoned lock only means another thread panicked while optimising: the cache
        // itself still holds finished plans only.
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.get_or_try_insert(shape.to_vec(), || {
            // Single-threaded inside: the images of a batch are what runs in parallel.
            let options = tract_onnx::tract_core::runtime::RunOptions {
                executor: Some(
                    tract_onnx::tract_core::tract_linalg::multithread::Executor::SingleThread,
                ),
                ..Default::default()
            };
            self.model
                .set_symbols(&values)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable_with_options(&options))
                .map_err(|e| format!("optimising the graph for inputs {shape:?}: {e:#}"))
        })
    }

    /// The outputs caf reads, in the order (features, logits).
    fn kept(&self) -> Vec<Output> {
        self.feature
            .iter()
            .chain(self.logits.iter())
            .copied()
            .collect()
    }

    /// Runs the graph on `x` [B, 3, H, W] in [0,1]: the outputs caf reads, in the order
    /// (features, logits), as constants [B, width] on the CPU.
    fn run(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        use rayon::prelude::*;
        use tract_onnx::prelude::TValue;

        let err = |e: String| candle_core::Error::Msg(format!("{}: {e}", self.path.display()));
        let tract_err = |e: TractError| err(format!("{e:#}"));
        if !x.device().is_cpu() {
            // `load_onnx` refuses other devices; this is a tensor moved there afterwards.
            return Err(err(
                "an ONNX graph runs on the CPU only (tract); its input is elsewhere".into(),
            ));
        }
        let x = self.normalize_input(&x.to_dtype(DType::F32)?)?;
        let (batch, image) = (x.dim(0)?, x.dims()[1..].to_vec());
        let chunk = self.chunk();
        let shape: Vec<usize> = std::iter::once(chunk)
            .chain(image.iter().copied())
            .collect();
        let plan = self.plan(&shape).map_err(err)?;
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        let per_run: usize = shape.iter().product();
        // A fixed batch size: the last chunk padded with zeros, their outputs dropped.
        data.resize(batch.div_ceil(chunk) * per_run, 0.0);
        let runs: Vec<TVec<TValue>> = data
            .par_chunks(per_run)
            .map_init(
                || plan.spawn(),
                |state, images| {
                    let state = state
                        .as_mut()
                        .map_err(|e| TractError::msg(format!("{e:#}")))?;
                    let input = tract_onnx::prelude::Tensor::from_shape(&shape, images)?;
                    state.run(std::iter::once(input.into_tvalue()).collect())
                },
            )
            .collect::<Result<_, TractError>>()
            .map_err(tract_err)?;
        self.kept()
            .into_iter()
            .map(|out| {
                let mut values = Vec::with_capacity(runs.len() * chunk * out.width);
                for run in &runs {
                    let t = run
                        .get(out.index)
                        .ok_or_else(|| err("the graph returned too few outputs".into()))?;
                    let view = t.to_plain_array_view::<f32>().map_err(tract_err)?;
                    values.extend(view.iter().copied());
                }
                if values.len() != runs.len() * chunk * out.width {
                    return Err(err(format!(
                        "an output was not [{chunk}, {}] for a run of {chunk} images",
                        out.width
                    )));
                }
                values.truncate(batch * out.width);
                Tensor::from_vec(values, (batch, out.width), &Device::Cpu)
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

    fn missing(&self, what: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: caf was given no {what} output of this graph (`{what}:` in the spec)",
            self.path.display()
        ))
    }

    fn take(outs: &[Tensor], which: Option<Output>) -> Option<Tensor> {
        which.and_then(|o| outs.get(o.index).cloned())
    }

    /// φ(x) [B, feature_dim], a constant (never part of an autograd graph).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.feature.is_none() {
            return Err(self.missing("feature"));
        }
        Self::take(&self.run(x)?, self.feature).ok_or_else(|| self.missing("feature"))
    }

    /// φ(x) and the graph's own logits, the ones asked for, from one run of the graph; asking
    /// for an output the graph was loaded without is an error.
    pub fn outputs(
        &self,
        x: &Tensor,
        features: bool,
        logits: bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if features && self.feature.is_none() {
            return Err(self.missing("feature"));
        }
        if logits && self.logits.is_none() {
            return Err(self.missing("logits"));
        }
        if !features && !logits {
            return Ok((None, None));
        }
        let outs = self.run(x)?;
        let pick = |wanted: bool, which| wanted.then(|| Self::take(&outs, which)).flatten();
        Ok((pick(features, self.feature), pick(logits, self.logits)))
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

    /// The input shapes optimised plans are cached for, oldest first.
    pub fn planned_shapes(&self) -> Vec<Vec<usize>> {
        let plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.keys().cloned().collect()
    }
}

impl Classifier for OnnxNet {
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.logits.is_none() {
            return Err(self.missing("logits"));
        }
        Self::take(&self.run(x)?, self.logits).ok_or_else(|| self.missing("logits"))
    }

    fn num_classes(&self) -> usize {
        self.logits.map_or(0, |o| o.width)
    }

    fn input_size(&self) -> Option<usize> {
        match self.input[2..] {
            [Dim::Fixed(h), Dim::Fixed(w)] if h == w => Some(h),
            _ => None,
        }
    }
}

#[cfg(test)]
#[path = "onnx_tests.rs"]
mod tests;
