//! Fused certification: certify jobs that share a frozen backbone, σ, seed and certification
//! settings (a sensitivity sweep of adapters, or smoothing the backbone next to its adapters) are
//! run by one `certify-fused` job: one backbone pass per noise batch, the same noise draws for
//! every member (a paired comparison). Each member's rows are stored under the member's own job
//! id, and equal what a separate run gives, because the noise is keyed by (seed, σ, image) and
//! the logits of every member are computed by the same ops as when it runs alone.
//!
//! The member jobs keep their ids (fusion is a way of running them, not a different result);
//! they depend on the fused job only for ordering, and find their images already certified.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::certify_job::{
    self, counted, procedure_of, set_precision, CertifyParams, SequentialParams,
};
use super::common::{self, DataRef, Slice};
use super::handler::TypedHandler;
use super::results::Results;
use super::slice::{certify_slice, SliceEnd, SliceProgress, SliceRun};
use super::source::ModelSource;
use crate::arch::Arch;
use crate::certify::{ClassifierSet, Settings, Smooth};
use crate::models::{Backbone, CafModel, Precision};
use crate::plan::{Job, JobBuilder, JobId, ProgressUnit};
use crate::sched::{JobContext, JobError, JobOutput};

pub const KIND: &str = "certify-fused";
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedMember {
    /// The `certify` job whose results this member writes.
    pub job: JobId,
    pub model: ModelSource,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusedParams {
    pub backbone: ModelSource,
    pub members: Vec<FusedMember>,
    pub data: DataRef,
    pub sigma: f64,
    pub seed: u64,
    pub n0: u64,
    pub n: u64,
    pub alpha: f64,
    pub batch: usize,
    pub slice: Slice,
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// The members' sequential certification (`n` then being n_max); absent for Cohen's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential: Option<SequentialParams>,
}

/// The frozen backbone a certify job's model is built on, if it can share one.
fn shared_backbone(model: &ModelSource) -> Option<ModelSource> {
    match model {
        // Any architecture with features: a CIFAR ResNet, a ViT, ResNet-50, an ONNX graph (whose
        // logits come from the same run of the graph as its features).
        ModelSource::Pretrained { model: m }
            if m.arch.parse::<Arch>().is_ok_and(|a| a.has_features()) =>
        {
            Some(model.clone())
        }
        ModelSource::Rs { .. } => Some(model.clone()),
        ModelSource::Caf { backbone, .. } => Some((**backbone).clone()),
        // The denoiser runs before the classifier, so there is no backbone pass to share.
        ModelSource::Pretrained { .. } | ModelSource::Denoised { .. } => None,
    }
}

/// Adds a `certify-fused` job for every group of ≥ 2 certify jobs that can share a backbone,
/// and makes the members wait for it. A group's members are moved next to its first one, so the
/// plan's order (deps first, otherwise as planned) runs them right after the fused job: they
/// only mark done what it recorded, and a member left behind a long training job would show
/// as pending, its results reported partial, for the length of that job.
pub fn fuse(jobs: &mut Vec<Job>) {
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        if j.kind != certify_job::KIND {
            continue;
        }
        let Ok(p) = serde_json::from_value::<CertifyParams>(j.params.clone()) else {
            continue;
        };
        let Some(backbone) = shared_backbone(&p.model) else {
            continue;
        };
        let key = serde_json::json!({
            "backbone": backbone, "data": p.data.sha256, "sigma": p.sigma, "seed": p.seed,
            "n0": p.n0, "n": p.n, "alpha": p.alpha, "batch": p.batch, "slice": p.slice,
            "precision": p.precision, "sequential": p.sequential,
        });
        groups
            .entry(crate::util::canonical_json(&key))
            .or_default()
            .push(i);
    }
    let mut grouped: Vec<Vec<usize>> = Vec::new();
    for members in groups.into_values().filter(|m| m.len() >= 2) {
        let params: Vec<CertifyParams> = members
            .iter()
            .filter_map(|&i| serde_json::from_value(jobs[i].params.clone()).ok())
            .collect();
        let Some(first) = params.first() else {
            continue;
        };
        let Some(backbone) = shared_backbone(&first.model) else {
            continue;
        };
        let fused = FusedParams {
            backbone,
            members: members
                .iter()
                .zip(&params)
                .map(|(&i, p)| FusedMember {
                    job: jobs[i].id.clone(),
                    model: p.model.clone(),
                })
                .collect(),
            data: first.data.clone(),
            sigma: first.sigma,
            seed: first.seed,
            n0: first.n0,
            n: first.n,
            alpha: first.alpha,
            batch: first.batch,
            slice: first.slice,
            precision: first.precision,
            sequential: first.sequential.clone(),
        };
        let deps: Vec<JobId> = params
            .iter()
            .flat_map(|p| p.model.deps())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let value = serde_json::to_value(&fused).unwrap_or_default();
        let job = JobBuilder {
            kind: KIND,
            version: VERSION,
            label: format!("certify-fused {} models σ={}", members.len(), fused.sigma),
            identity: common::identity_of(&value, &["weights", "root"]),
            params: value,
            deps,
        }
        .build()
        .counted_in(if fused.sequential.is_some() {
            ProgressUnit::Draws
        } else {
            ProgressUnit::Images
        });
        for &i in &members {
            // Ordering only: the member's id (its content) is unchanged.
            jobs[i].deps.push(job.id.clone());
        }
        jobs.push(job);
        grouped.push(members);
    }
    // Each group's later members move up behind its first. A group's indices ascend (collected
    // in job order), a job is in one group at most, and the fused jobs were appended after
    // every member, so the indices still name the same jobs.
    let first: BTreeMap<usize, &[usize]> = grouped.iter().map(|m| (m[0], &m[..])).collect();
    let later: BTreeSet<usize> = grouped.iter().flat_map(|m| m[1..].to_vec()).collect();
    let order: Vec<usize> = (0..jobs.len())
        .filter(|i| !later.contains(i))
        .flat_map(|i| first.get(&i).map_or(vec![i], |m| m.to_vec()))
        .collect();
    let mut slots: Vec<Option<Job>> = std::mem::take(jobs).into_iter().map(Some).collect();
    jobs.extend(order.into_iter().filter_map(|i| slots[i].take()));
}

/// The members as one [`ClassifierSet`] over a single backbone pass.
struct Members {
    backbone: Backbone,
    members: Vec<Member>,
}

enum Member {
    /// The backbone's own head: smoothing the backbone as it is.
    Plain,
    // Boxed: a CafModel is large and most sets hold several.
    Caf(Box<CafModel>),
}

impl Members {
    /// One backbone pass over `x` for the members `active` marks: φ(x) (always, but for an ONNX
    /// graph only when an active CAF member needs it) and, for an ONNX graph, whose head is
    /// inside it, its own logits from the same run of the graph.
    fn pass(
        &self,
        x: &Tensor,
        active: &[bool],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let any = |caf: bool| {
            self.members
                .iter()
                .zip(active)
                .any(|(m, &a)| a && matches!(m, Member::Caf(_)) == caf)
        };
        match &self.backbone {
            Backbone::Onnx(m) => m.outputs(x, any(true), any(false)),
            b => Ok((Some(b.features_t(x, false)?.detach()), None)),
        }
    }

    /// What `member` says about `x`, from the pass's φ(x) and the graph's own logits.
    fn member_logits(
        &self,
        member: &Member,
        x: &Tensor,
        phi: Option<&Tensor>,
        own: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let no_phi = || candle_core::Error::Msg("the backbone pass gave no features".into());
        match (member, own) {
            (Member::Plain, Some(logits)) => Ok(logits.clone()),
            (Member::Plain, None) => self.backbone.head(phi.ok_or_else(no_phi)?),
            (Member::Caf(c), _) => c.logits_from_features(phi.ok_or_else(no_phi)?, x),
        }
    }
}

impl ClassifierSet for Members {
    fn members(&self) -> usize {
        self.members.len()
    }
    fn num_classes(&self) -> usize {
        crate::models::Classifier::num_classes(&self.backbone)
    }
    fn logits_all(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (phi, own) = self.pass(x, &vec![true; self.members.len()])?;
        self.members
            .iter()
            .map(|m| self.member_logits(m, x, phi.as_ref(), own.as_ref()))
            .collect()
    }
    /// A member that has stopped (sequential certification) costs nothing more: its head or
    /// adapter is not run, and the backbone pass only while some member still samples.
    fn logits_active(
        &self,
        x: &Tensor,
        active: &[bool],
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        if !active.iter().any(|&a| a) {
            return Ok(vec![None; self.members.len()]);
        }
        let (phi, own) = self.pass(x, active)?;
        self.members
            .iter()
            .zip(active.iter().chain(std::iter::repeat(&false)))
            .map(|(m, &a)| {
                if !a {
                    return Ok(None);
                }
                self.member_logits(m, x, phi.as_ref(), own.as_ref())
                    .map(Some)
            })
            .collect()
    }
}

/// Runs `certify-fused` jobs: each member's rows go to `results` under the member's job id.
pub struct FusedHandler {
    pub results: Arc<dyn Results>,
}

impl TypedHandler for FusedHandler {
    const KIND: &'static str = KIND;
    type Params = FusedParams;

    fn run(
        &self,
        ctx: &JobContext,
        p: FusedParams,
        device: &Device,
    ) -> Result<JobOutput, JobError> {
        let sink = ctx.sink.as_ref();
        let mut backbone = p
            .backbone
            .load_backbone(sink, device)?
            .detached()
            .map_err(JobError::fatal)?;
        set_precision(&mut backbone, p.precision, device)?;
        let mut members = Vec::new();
        for m in &p.members {
            members.push(match &m.model {
                ModelSource::Caf { .. } => {
                    let mut caf = m.model.load_caf(sink, device)?;
                    set_precision(&mut caf, p.precision, device)?;
                    Member::Caf(Box::new(caf))
                }
                _ => Member::Plain,
            });
        }
        let set = Members { backbone, members };
        let data = p.data.open()?;
        let indices = p.slice.indices(data.len());
        let done: Vec<BTreeSet<u64>> = p
            .members
            .iter()
            .map(|m| {
                self.results
                    .cert_done(&m.job)
                    .map(|v| v.into_iter().collect())
            })
            .collect::<Result<_, _>>()?;
        let procedure = procedure_of(
            Settings {
                n0: p.n0,
                n: p.n,
                alpha: p.alpha,
                batch: p.batch,
            },
            p.sequential.as_ref(),
        );
        // Draws of every member's recorded rows: the unit the fused job counts in.
        let counted = counted(&procedure, p.members.len(), || {
            p.members
                .iter()
                .map(|m| self.results.cert_draws(&m.job))
                .sum()
        })?;
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
        let smooth = Smooth::fused(&set, p.sigma, device.clone()).with_input(data.shape().tuple());
        let end = certify_slice(&smooth, &run, &|| ctx.cancelled(), &mut |rows| {
            for (m, row) in &rows {
                self.results
                    .record_cert(&ctx.lease, &p.members[*m].job, row)?;
            }
            progress.image_done(ctx, &rows)
        })?;
        match end {
            SliceEnd::Interrupted => Ok(JobOutput::Interrupted),
            SliceEnd::Finished => Ok(JobOutput::Done(serde_json::json!({
                "images": progress.total(),
                "members": p.members.len(),
            }))),
        }
    }
}
