//! The model a cell's `backbone` names: a checkpoint file used as it is, or a network the
//! study trains itself (`backbones.NAME.train:`), clean — cross-entropy without noise, the
//! `train-rs` loop at σ = 0 — from the backbone's `weights:` or from scratch. Every method
//! reaches its backbone through [`of_cell`], so a trained backbone serves every method a file
//! does: smoothed as it is, RS-fine-tuned, frozen under adapters, behind a denoiser.

use super::common::{self, ModelRef};
use super::rs;
use super::source::ModelSource;
use super::train_job;
use crate::plan::{Job, PlanContext};
use crate::spec::{self, Cell, SpecError};

/// The backbone a cell names, by name, as the model jobs run (a trained backbone's model is
/// its training job's output, so jobs that use it depend on that job).
pub fn of_cell(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<(String, ModelSource), SpecError> {
    let (name, b) = named(cell, ctx)?;
    let source = match training(&name, b, ctx)? {
        Some(job) => ModelSource::Rs {
            job: job.id,
            arch: b.arch.to_string(),
            normalize: b.normalize,
        },
        None => ModelSource::Pretrained {
            model: file(b, ctx)?.ok_or_else(|| {
                SpecError::at(&ctx.spec.path, b.span, "this backbone has no weights file")
            })?,
        },
    };
    Ok((name, source))
}

/// The name of the backbone a cell names (checked to be defined), for labels and params.
pub fn name_of(cell: &Cell, ctx: &PlanContext<'_>) -> Result<String, SpecError> {
    named(cell, ctx).map(|(name, _)| name)
}

/// The architecture of the cell's backbone.
pub fn arch_of(cell: &Cell, ctx: &PlanContext<'_>) -> Result<crate::arch::Arch, SpecError> {
    named(cell, ctx).map(|(_, b)| b.arch)
}

/// The job that trains the cell's backbone, if the study trains it. The planner adds it to
/// every cell that names such a backbone (planning it twice gives the same job, kept once).
pub fn training_of_cell(cell: &Cell, ctx: &mut PlanContext<'_>) -> Result<Option<Job>, SpecError> {
    if !cell.params.contains_key("backbone") {
        return Ok(None);
    }
    let (name, b) = named(cell, ctx)?;
    training(&name, b, ctx)
}

/// The cell's backbone name and spec entry. The entry borrows the spec, not `ctx`, so the
/// caller can still hash files through `ctx`.
fn named<'s>(
    cell: &Cell,
    ctx: &PlanContext<'s>,
) -> Result<(String, &'s spec::Backbone), SpecError> {
    let spec = ctx.spec;
    let p = cell.params.get("backbone").ok_or_else(|| {
        SpecError::whole_file(&ctx.spec.path, "a grid cell has no `backbone` parameter")
    })?;
    let name = p
        .value
        .as_str()
        .ok_or_else(|| ctx.error_at(p.span, "expected a backbone name (string)"))?;
    let Some(b) = spec.backbones.get(name) else {
        let names: Vec<&str> = spec.backbones.keys().map(String::as_str).collect();
        return Err(ctx.error_at(
            p.span,
            format!("unknown backbone `{name}` (defined: {})", names.join(", ")),
        ));
    };
    Ok((name.to_string(), b))
}

/// The backbone's weights file as a [`ModelRef`] (hashed once per plan), if it has one.
fn file(b: &spec::Backbone, ctx: &mut PlanContext<'_>) -> Result<Option<ModelRef>, SpecError> {
    let Some(weights) = &b.weights else {
        return Ok(None);
    };
    let weights_sha256 = ctx.file_sha256(weights)?;
    Ok(Some(ModelRef {
        arch: b.arch.to_string(),
        weights: weights.clone(),
        weights_sha256,
        normalize: b.normalize,
        onnx: b.onnx.clone(),
    }))
}

/// The clean training job of backbone `name`, if its spec entry has `train:`.
fn training(
    name: &str,
    b: &spec::Backbone,
    ctx: &mut PlanContext<'_>,
) -> Result<Option<Job>, SpecError> {
    // The spec refuses `train:` on an arch caf cannot train (Arch::is_trainable).
    let Some(settings) = &b.train else {
        return Ok(None);
    };
    // The training keys of a grid cell, unprefixed.
    let allowed = train_job::TRAIN_KEYS;
    for (k, p) in &settings.params {
        if !allowed.contains(&k.as_str()) {
            return Err(ctx.error_at(
                p.span,
                format!(
                    "`{k}` is not a training setting of backbones.{name}.train (expected one \
                     of: {})",
                    allowed.join(", ")
                ),
            ));
        }
    }
    let mut train = train_job::train_config(settings, ctx, "", rs::default_config())?;
    train.sigma = 0.0;
    let init = file(b, ctx)?.map(|model| ModelSource::Pretrained { model });
    let data = common::train_data_ref(ctx)?;
    let params = rs::TrainRsParams {
        backbone: name.to_string(),
        arch: b.arch.to_string(),
        normalize: b.normalize,
        init,
        data,
        train,
        smoothadv: None,
    };
    let from = if b.weights.is_some() {
        "from weights"
    } else {
        "from scratch"
    };
    Ok(Some(rs::training_job(
        params,
        format!("train-clean {name} {from}"),
    )))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::plan::{JobId, Plan};
    use crate::spec::Spec;

    const WEIGHTS: &str = "../shared/data/pretrained/akamaster/resnet20-12fca82f.th";
    const DATA: &str = "../shared/data/cifar10-jpeg";

    fn plan(backbone: &str, grid: &str) -> Result<Plan, SpecError> {
        let text = format!(
            "name: t\nseed: 3\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n{backbone}\
             certify: {{n0: 10, n: 100, max: 4}}\ngrid:\n{grid}"
        );
        let base = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let spec = Spec::parse(Path::new("t.yaml"), text.as_bytes(), &base)?;
        Plan::from_spec(&spec, &super::super::planner())
    }

    const TRAINED: &str = "  vit:\n    arch: vit_cifar_tiny_patch4_32\n    train: {epochs: 2, \
                           lr: 0.001, optimizer: adamw, max_train: 64}\n";
    const EVERY_METHOD: &str = "  params: {backbone: vit, sigma: 0.25}\n  axes:\n    method: \
                                [smooth, rs, caf, denoised]\n";

    #[test]
    fn a_trained_backbone_is_one_clean_job_every_method_depends_on() {
        let p = plan(TRAINED, EVERY_METHOD).expect("plans");
        let clean: Vec<&Job> = p
            .jobs
            .iter()
            .filter(|j| j.label.starts_with("train-clean"))
            .collect();
        assert_eq!(clean.len(), 1, "one training job for the four cells");
        let clean = clean[0];
        assert_eq!(clean.kind, rs::KIND);
        assert_eq!(clean.label, "train-clean vit from scratch");
        assert_eq!(clean.params["train"]["sigma"], 0.0);
        assert_eq!(clean.params["train"]["epochs"], 2);
        assert!(clean.params["init"].is_null(), "from scratch");
        assert!(clean.deps.is_empty());
        // The training job runs before everything that uses the backbone, which all name it.
        assert_eq!(p.jobs[0].id, clean.id);
        let users: Vec<&Job> = p.jobs.iter().filter(|j| j.id != clean.id).collect();
        for kind in ["eval", "train-rs", "train-caf", "train-denoised"] {
            let job = users
                .iter()
                .find(|j| j.kind == kind)
                .unwrap_or_else(|| panic!("a {kind} job"));
            assert!(job.deps.contains(&clean.id), "{kind} does not depend on it");
        }
        // The rs cell fine-tunes the trained network under noise: its init is the clean job.
        let rs_job = users.iter().find(|j| j.kind == "train-rs").expect("rs");
        assert_eq!(rs_job.params["init"]["kind"], "rs");
        assert_eq!(rs_job.params["init"]["job"], clean.id.as_str());
        assert_eq!(rs_job.params["train"]["sigma"], 0.25);
        // Every certification of the smoothed backbone reads the trained weights.
        assert!(users
            .iter()
            .filter(|j| j.kind == "certify" || j.kind == "certify-fused")
            .all(|j| !j.deps.is_empty()));
    }

    /// A fused certification's members follow it in the plan's order, before any job planned
    /// between them (a member left behind a long training would show as pending with all its
    /// rows recorded); and the clean training is no noise level for the report (no trained σ).
    #[test]
    fn fused_members_follow_their_fused_job_and_clean_training_has_no_trained_sigma() {
        let grid =
            "  params: {backbone: vit, sigma: 0.25}\n  axes:\n    method: [smooth, rs, caf]\n";
        let p = plan(TRAINED, grid).expect("plans");
        let at = |id: &JobId| p.jobs.iter().position(|j| &j.id == id).expect("planned");
        let fused: Vec<usize> = (0..p.jobs.len())
            .filter(|&i| p.jobs[i].kind == "certify-fused")
            .collect();
        assert!(!fused.is_empty(), "smooth and caf share the backbone pass");
        for f in fused {
            let members: Vec<usize> = p.jobs[f]
                .params
                .get("members")
                .and_then(|m| m.as_array())
                .expect("members")
                .iter()
                .map(|m| at(&JobId::new(m["job"].as_str().expect("member id"))))
                .collect();
            let want: Vec<usize> = (f + 1..=f + members.len()).collect();
            assert_eq!(members, want, "members right after the fused job");
        }
        let smooth = p
            .cells
            .iter()
            .find(|c| c.method == "smooth")
            .expect("smooth cell");
        assert!(smooth.outputs.iter().all(|o| o.trained_sigma.is_none()));
        let rs = p.cells.iter().find(|c| c.method == "rs").expect("rs cell");
        assert!(rs
            .outputs
            .iter()
            .filter(|o| o.kind == "certify")
            .all(|o| o.trained_sigma == Some(0.25)));
    }

    #[test]
    fn training_settings_name_the_job_and_weights_make_it_a_fine_tuning() {
        let a = plan(TRAINED, EVERY_METHOD).expect("plans");
        let longer = TRAINED.replace("epochs: 2", "epochs: 3");
        let b = plan(&longer, EVERY_METHOD).expect("plans");
        assert_ne!(a.jobs[0].id, b.jobs[0].id);
        // Every job downstream changes with it.
        let ids = |p: &Plan| -> Vec<_> { p.jobs.iter().map(|j| j.id.clone()).collect() };
        assert!(ids(&a).iter().all(|id| !ids(&b).contains(id)));

        let resnet =
            format!("  r:\n    arch: resnet20\n    weights: {WEIGHTS}\n    train: {{epochs: 1}}\n");
        let p = plan(
            &resnet,
            "  params: {backbone: r, sigma: 0.25, method: smooth}\n",
        )
        .expect("plans");
        let clean = &p.jobs[0];
        assert_eq!(clean.label, "train-clean r from weights");
        // The file is stored as the bare reference it always was.
        assert!(
            clean.params["init"]["weights_sha256"].is_string(),
            "{clean:?}"
        );
        assert!(clean.params["init"].get("kind").is_none());
    }

    #[test]
    fn a_file_backbone_plans_the_jobs_it_always_did() {
        // Ids recorded before trained backbones existed: the eval job's model is still the
        // bare file reference, and there is no training job.
        let file = format!("  r:\n    arch: resnet20\n    weights: {WEIGHTS}\n");
        let p = plan(
            &file,
            "  params: {backbone: r, sigma: 0.25, method: smooth}\n",
        )
        .expect("plans");
        assert_eq!(p.jobs.len(), 2);
        let eval = p.jobs.iter().find(|j| j.kind == "eval").expect("eval");
        assert!(eval.params["model"]["weights_sha256"].is_string());
        assert!(eval.params["model"].get("kind").is_none());
        assert!(eval.deps.is_empty());
    }

    #[test]
    fn an_unknown_training_setting_is_located() {
        let typo = "  vit:\n    arch: vit_cifar_tiny_patch4_32\n    train: {epoch: 2}\n";
        let e = plan(typo, EVERY_METHOD).unwrap_err();
        assert_eq!(e.span.map(|s| (s.line, s.col)), Some((7, 20)), "{e}");
        assert!(
            e.message.contains("`epoch` is not a training setting"),
            "{e}"
        );
        assert!(e.message.contains("epochs"), "{e}");
        let bad = "  vit:\n    arch: vit_cifar_tiny_patch4_32\n    train: {epochs: many}\n";
        let e = plan(bad, EVERY_METHOD).unwrap_err();
        assert_eq!(e.span.map(|s| s.line), Some(7), "{e}");
    }
}
