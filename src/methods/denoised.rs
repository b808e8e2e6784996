//! Method `denoised` (denoised smoothing, Salman et al. 2020): a DnCNN denoiser D is trained in
//! front of the frozen classifier f, and the smoothed classifier certifies f(D(x + δ)). Gradients
//! reach only the denoiser: f's weights are constants, so backward through f computes input
//! gradients only (see `models::conv`).
//!
//! Objectives (`objective`):
//! - `mse`: ‖D(x + δ) − x‖² (mean over pixels): reconstruct the clean image;
//! - `stability`: cross-entropy between f(D(x + δ)) and f's own prediction on the clean x;
//! - `mse-then-stability`: an `mse` job, then a `stability` job starting from its weights (the
//!   paper's best CIFAR-10 recipe); the planner chains and shares the `mse` job.
//!
//! Job kinds `train-denoised` and `certify`.

use std::sync::Arc;

use candle_core::{Tensor, D};
use candle_nn::ModuleT;
use serde::{Deserialize, Serialize};

use super::certify_job;
use super::common::{self, DataRef};
use super::handler::TypedHandler;
use super::results::Results;
use super::source::{trained_weights, ModelSource};
use super::train::batches::Batch;
use super::train::{Objective, OptimizerConfig, Schedule, StepKey, TrainConfig};
use super::train_job::{self, TrainRun};
use crate::models::dncnn::{self, DnCnnArch};
use crate::models::{Arch, Backbone};
use crate::plan::{Job, JobBuilder, JobId, PlanContext, ProgressUnit};
use crate::sched::{JobContext, JobError, JobOutput};
use crate::spec::{Cell, SpecError};

pub const KIND: &str = "train-denoised";
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenoiserObjective {
    Mse,
    Stability,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainDenoisedParams {
    pub backbone_name: String,
    /// The frozen classifier behind the denoiser.
    pub classifier: ModelSource,
    pub denoiser: DnCnnArch,
    pub objective: DenoiserObjective,
    /// Start from this `train-denoised` job's weights (`mse-then-stability`).
    pub init: Option<JobId>,
    pub data: DataRef,
    pub train: TrainConfig,
}

/// Salman et al.'s optimizer (Adam, lr 1e-3) with a CPU-sized budget like CAF's.
pub fn default_config() -> TrainConfig {
    TrainConfig {
        epochs: 10,
        batch: 128,
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::Cosine { min_lr: 0.0 },
        ..TrainConfig::default()
    }
}

fn allowed_keys() -> Vec<String> {
    let mut k: Vec<String> = [
        "backbone",
        "sigma",
        "denoiser",
        "objective",
        "budget_tflops",
    ]
    .map(String::from)
    .to_vec();
    k.extend(train_job::train_keys(""));
    k.extend(certify_job::CERTIFY_KEYS.iter().map(|s| s.to_string()));
    k
}

fn train_job(params: &TrainDenoisedParams, sigma: f64) -> Job {
    let value = serde_json::to_value(params).unwrap_or_default();
    let objective = match params.objective {
        DenoiserObjective::Mse => "mse",
        DenoiserObjective::Stability if params.init.is_some() => "mse-then-stability",
        DenoiserObjective::Stability => "stability",
    };
    let mut deps = params.classifier.deps();
    deps.extend(params.init.clone());
    JobBuilder {
        kind: KIND,
        version: VERSION,
        label: format!(
            "train-denoised {} {} {objective} σ={sigma} epochs={}",
            params.backbone_name, params.denoiser, params.train.epochs
        ),
        identity: common::identity_of(
            &value,
            &["weights", "root", "backbone_name", "checkpoint_every_steps"],
        ),
        params: value,
        deps,
    }
    .build()
    .counted_in(ProgressUnit::Epochs)
}

pub fn plan(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Vec<Job>, SpecError> {
    let allowed = allowed_keys();
    common::check_known(
        cell,
        ctx,
        "denoised",
        &allowed.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let sigma = certify_job::cell_sigma(cell, ctx, "denoised")?;
    let (backbone_name, classifier) = super::backbone::of_cell(cell, ctx)?;
    let denoiser = match common::string(cell, ctx, "denoiser")? {
        None => DnCnnArch::CPU_DEFAULT,
        Some((s, p)) => s
            .parse::<DnCnnArch>()
            .map_err(|e| ctx.error_at(p.span, e.to_string()))?,
    };
    let objective_param = common::string(cell, ctx, "objective")?;
    let objectives: &[DenoiserObjective] = match &objective_param {
        None => &[DenoiserObjective::Stability],
        Some((o, p)) => match o.as_str() {
            "mse" => &[DenoiserObjective::Mse],
            "stability" => &[DenoiserObjective::Stability],
            "mse-then-stability" => &[DenoiserObjective::Mse, DenoiserObjective::Stability],
            other => {
                return Err(ctx.error_at(
                    p.span,
                    format!(
                        "unknown objective `{other}` (expected mse, stability or \
                         mse-then-stability)"
                    ),
                ))
            }
        },
    };
    // An ONNX graph runs outside autograd: only `mse` (no gradient through the classifier).
    if let ModelSource::Pretrained { model } = &classifier {
        if matches!(model.arch.parse::<Arch>(), Ok(Arch::Onnx))
            && objectives.contains(&DenoiserObjective::Stability)
        {
            let message = "an ONNX backbone is frozen outside autograd, so the stability \
                           objective (which backpropagates through the classifier) cannot train \
                           on it; use `objective: mse`";
            return Err(match &objective_param {
                Some((_, p)) => ctx.error_at(p.span, message),
                None => match cell.params.get("backbone") {
                    Some(p) => ctx.error_at(p.span, message),
                    None => SpecError::whole_file(&ctx.spec.path, message),
                },
            });
        }
    }
    let mut train = train_job::train_config(cell, ctx, "", default_config())?;
    train.sigma = sigma;
    let data = common::train_data_ref(ctx)?;
    let mut jobs: Vec<Job> = Vec::new();
    for &objective in objectives {
        let mut params = TrainDenoisedParams {
            backbone_name: backbone_name.clone(),
            classifier: classifier.clone(),
            denoiser,
            objective,
            init: jobs.last().map(|j| j.id.clone()),
            data: data.clone(),
            train: train.clone(),
        };
        let value = serde_json::to_value(&params).unwrap_or_default();
        if let Some(e) = super::budget::budget_epochs(cell, ctx, "", KIND, &value, &params.train)? {
            params.train.epochs = e;
        }
        jobs.push(train_job(&params, sigma));
    }
    let Some(last) = jobs.last() else {
        return Err(SpecError::whole_file(
            &ctx.spec.path,
            "no denoiser objective",
        ));
    };
    let source = ModelSource::Denoised {
        classifier: Box::new(classifier),
        job: last.id.clone(),
        denoiser,
    };
    if certify_job::cell_precision(cell, ctx)? != crate::models::Precision::F32 {
        let span = cell
            .params
            .get("precision")
            .map(|p| p.span)
            .unwrap_or_default();
        return Err(ctx.error_at(
            span,
            "method `denoised` certifies in f32 only: the denoiser has no bf16 path",
        ));
    }
    let label = last.label.replacen("train-denoised", "denoised", 1);
    jobs.push(certify_job::certify_job(cell, ctx, source, label, sigma)?);
    Ok(jobs)
}

/// The training objectives over a frozen classifier (its weights detached).
pub struct DenoiserLoss<'a> {
    pub denoiser: &'a dncnn::DnCnn,
    /// Weights detached; an ONNX graph (outside autograd) trains with `mse` only.
    pub classifier: &'a Backbone,
    pub objective: DenoiserObjective,
}

impl Objective for DenoiserLoss<'_> {
    fn loss(
        &self,
        batch: &Batch,
        train: bool,
        _: StepKey,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let out = self.denoiser.forward_t(&batch.x, train)?;
        match self.objective {
            DenoiserObjective::Mse => {
                let loss = (&out - &batch.clean)?.sqr()?.mean_all()?;
                // Accuracy of f on the denoised images, for the epoch log; no gradient.
                let logits = self.classifier.forward_t(&out.detach(), false)?;
                Ok((loss, logits))
            }
            DenoiserObjective::Stability => {
                let classifier = self.classifier;
                if matches!(classifier, Backbone::Onnx(_)) {
                    return Err(candle_core::Error::Msg(
                        "the stability objective needs gradients through the classifier, and \
                         an ONNX graph runs outside autograd: use objective mse"
                            .into(),
                    ));
                }
                let target = classifier
                    .forward_t(&batch.clean, false)?
                    .argmax(D::Minus1)?;
                let logits = classifier.forward_t(&out, false)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
                Ok((loss, logits))
            }
        }
    }
}

/// A DnCNN to train in front of a frozen classifier, initialised from `seed`. Shared by the
/// handler and `caf bench train-step`.
pub fn trainable_denoiser(
    arch: DnCnnArch,
    varmap: &candle_nn::VarMap,
    device: &candle_core::Device,
    seed: u64,
) -> Result<(dncnn::DnCnn, Vec<candle_core::Var>), JobError> {
    dncnn::build_seeded(arch, varmap, device, seed).map_err(JobError::fatal)
}

/// Runs `train-denoised` jobs.
pub struct TrainDenoisedHandler {
    pub results: Arc<dyn Results>,
}

impl TypedHandler for TrainDenoisedHandler {
    const KIND: &'static str = KIND;
    type Params = TrainDenoisedParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: TrainDenoisedParams,
        device: &candle_core::Device,
    ) -> Result<JobOutput, JobError> {
        // Any backbone architecture; an ONNX graph `plan` allowed with `mse` only.
        let classifier = p
            .classifier
            .load_backbone(ctx.sink.as_ref(), device)?
            .detached()
            .map_err(JobError::fatal)?;
        let varmap = candle_nn::VarMap::new();
        let (denoiser, trainable) = trainable_denoiser(p.denoiser, &varmap, device, p.train.seed)?;
        if let Some(init) = &p.init {
            let path = trained_weights(ctx.sink.as_ref(), init)?;
            let mut vm = varmap.clone();
            vm.load(&path)
                .map_err(|e| JobError::fatal(format!("{}: {e}", path.display())))?;
        }
        let data = p.data.open()?;
        TrainRun {
            ctx,
            results: self.results.as_ref(),
            varmap: &varmap,
            trainable,
            data: data.as_ref(),
            cfg: &p.train,
            device,
        }
        .objective(&DenoiserLoss {
            denoiser: &denoiser,
            classifier: &classifier,
            objective: p.objective,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::methods::train::{Optimizer, OptimizerConfig};

    fn classifier() -> Backbone {
        crate::models::test_resnet20().into()
    }

    fn batch() -> Batch {
        let clean = Tensor::rand(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu).expect("clean");
        let noise = (Tensor::randn(0f32, 1f32, (4, 3, 32, 32), &Device::Cpu).expect("noise")
            * 0.25)
            .expect("scale");
        Batch {
            x: (&clean + noise).expect("noisy"),
            y: Tensor::new(&[1u32, 2, 3, 4], &Device::Cpu).expect("labels"),
            labels: vec![1, 2, 3, 4],
            clean,
        }
    }

    /// The classifier's features of a fixed input: a fingerprint of its weights.
    fn weights_of(c: &Backbone) -> Vec<f32> {
        let t = c
            .features(&Tensor::ones((1, 3, 32, 32), DType::F32, &Device::Cpu).expect("ones"))
            .expect("features");
        t.flatten_all().and_then(|t| t.to_vec1()).expect("vec")
    }

    /// Both objectives: every denoiser variable gets a gradient, the classifier's tensors none,
    /// and after an optimizer step the classifier computes exactly what it did before.
    #[test]
    fn gradients_reach_only_the_denoiser() {
        let classifier = classifier();
        let before = weights_of(&classifier);
        for objective in [DenoiserObjective::Mse, DenoiserObjective::Stability] {
            let varmap = VarMap::new();
            let (denoiser, vars) =
                dncnn::build_seeded(DnCnnArch::CPU_DEFAULT, &varmap, &Device::Cpu, 1)
                    .expect("denoiser");
            let loss = DenoiserLoss {
                denoiser: &denoiser,
                classifier: &classifier,
                objective,
            };
            let at = StepKey {
                seed: 0,
                epoch: 0,
                step: 0,
            };
            let (l, _) = loss.loss(&batch(), true, at).expect("loss");
            let grads = l.backward().expect("backward");
            for v in &vars {
                let g = grads
                    .get(v.as_tensor())
                    .expect("every denoiser variable has a gradient");
                let norm = g
                    .sqr()
                    .and_then(|t| t.sum_all())
                    .and_then(|t| t.to_scalar::<f32>());
                assert!(norm.expect("norm").is_finite());
            }
            let mut opt = Optimizer::new(OptimizerConfig::adam(1e-2), vars).expect("optimizer");
            opt.step(&grads, 1e-2).expect("step");
            assert_eq!(weights_of(&classifier), before, "{objective:?}");
        }
    }
}
