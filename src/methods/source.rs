//! Where a job's model comes from: a file as it is, a network trained by a `train-rs` job (`rs`,
//! `smoothadv`), a frozen backbone plus an adapter and head trained by a `train-caf` job, or a
//! frozen classifier behind a DnCNN trained by a `train-denoised` job. Trained weights are found
//! through the artifacts their jobs recorded and checked against their recorded SHA-256.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::common::ModelRef;
use crate::models::adapter::AdapterArch;
use crate::models::caf::{load_caf, CafModel};
use crate::models::dncnn::{self, Denoised, DnCnnArch};
use crate::models::{self, Arch, Backbone, CifarResNet, Classifier, Normalize};
use crate::plan::JobId;
use crate::sched::{JobError, JobSink};

/// Name of the artifact every training job records for its selected weights.
pub const WEIGHTS: &str = "weights";

/// CIFAR-10's ten classes: the class count of the FLOP counts in plans and of the benchmarks.
/// Training jobs give their heads one output per class of their training data.
pub const NUM_CLASSES: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A weights file, used as it is.
    Pretrained { model: ModelRef },
    /// A whole network (CIFAR ResNet or ViT) trained by a `train-rs` job.
    Rs {
        job: JobId,
        arch: String,
        normalize: Normalize,
    },
    /// A frozen backbone with an adapter + head trained by a `train-caf` job.
    Caf {
        backbone: Box<ModelSource>,
        job: JobId,
        adapter: AdapterArch,
    },
    /// A frozen classifier behind a denoiser trained by a `train-denoised` job.
    Denoised {
        classifier: Box<ModelSource>,
        job: JobId,
        denoiser: DnCnnArch,
    },
}

impl ModelSource {
    /// Training jobs this model needs first.
    pub fn deps(&self) -> Vec<JobId> {
        match self {
            ModelSource::Pretrained { .. } => vec![],
            ModelSource::Rs { job, .. } => vec![job.clone()],
            ModelSource::Caf { backbone, job, .. }
            | ModelSource::Denoised {
                classifier: backbone,
                job,
                ..
            } => {
                let mut d = backbone.deps();
                d.push(job.clone());
                d
            }
        }
    }

    /// The architecture of a single network (a file or an rs-trained one); `None` for a
    /// composite model (backbone + adapter, denoiser + classifier).
    pub fn arch(&self) -> Option<&str> {
        match self {
            ModelSource::Pretrained { model } => Some(&model.arch),
            ModelSource::Rs { arch, .. } => Some(arch),
            ModelSource::Caf { .. } | ModelSource::Denoised { .. } => None,
        }
    }

    /// The input normalisation of a single network; `None` for a composite model.
    pub fn normalize(&self) -> Option<Normalize> {
        match self {
            ModelSource::Pretrained { model } => Some(model.normalize),
            ModelSource::Rs { normalize, .. } => Some(*normalize),
            ModelSource::Caf { .. } | ModelSource::Denoised { .. } => None,
        }
    }

    /// The weights of a single network as a state dict (to start training from): a file,
    /// checked against its planned hash, or a training job's recorded weights.
    pub fn state_dict(
        &self,
        sink: &dyn JobSink,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, JobError> {
        let path = match self {
            ModelSource::Pretrained { model } => {
                model.check()?;
                model.weights.clone()
            }
            ModelSource::Rs { job, .. } => trained_weights(sink, job)?,
            ModelSource::Caf { .. } | ModelSource::Denoised { .. } => {
                return Err(JobError::fatal(
                    "a CAF or denoised model cannot initialise a whole network",
                ))
            }
        };
        models::load_state_dict(&path, device).map_err(JobError::fatal)
    }

    /// The model as a classifier (frozen, eval mode).
    pub fn load(
        &self,
        sink: &dyn JobSink,
        device: &Device,
    ) -> Result<Box<dyn Classifier>, JobError> {
        match self {
            ModelSource::Pretrained { model } => model.load(device),
            ModelSource::Rs { .. } => Ok(Box::new(self.load_backbone(sink, device)?)),
            ModelSource::Caf { .. } => Ok(Box::new(self.load_caf(sink, device)?)),
            ModelSource::Denoised {
                classifier,
                job,
                denoiser,
            } => {
                let path = trained_weights(sink, job)?;
                Ok(Box::new(Denoised {
                    denoiser: dncnn::load(*denoiser, &path, device).map_err(JobError::fatal)?,
                    classifier: classifier.load(sink, device)?,
                }))
            }
        }
    }

    /// The model as a CIFAR ResNet (a backbone role).
    pub fn load_resnet(
        &self,
        sink: &dyn JobSink,
        device: &Device,
    ) -> Result<CifarResNet, JobError> {
        match self {
            ModelSource::Pretrained { model } => {
                let depth = resnet_depth(&model.arch)?;
                model.check()?;
                models::load_cifar_resnet(depth, &model.weights, model.normalize, device)
                    .map_err(JobError::fatal)
            }
            ModelSource::Rs {
                job,
                arch,
                normalize,
            } => {
                let depth = resnet_depth(arch)?;
                let path = trained_weights(sink, job)?;
                models::load_cifar_resnet(depth, &path, *normalize, device).map_err(JobError::fatal)
            }
            ModelSource::Caf { .. } | ModelSource::Denoised { .. } => Err(JobError::fatal(
                "only a CIFAR ResNet (pretrained or rs-trained) can serve as a backbone",
            )),
        }
    }

    /// The model as a frozen feature extractor of any architecture (a CAF backbone): a
    /// pretrained file of any backbone arch, or an rs-trained CIFAR ResNet or ViT.
    pub fn load_backbone(&self, sink: &dyn JobSink, device: &Device) -> Result<Backbone, JobError> {
        match self {
            ModelSource::Pretrained { model } => {
                let arch: Arch = model.arch.parse().map_err(JobError::fatal)?;
                if matches!(arch, Arch::CifarResNet { .. }) {
                    return Ok(self.load_resnet(sink, device)?.into());
                }
                model.check()?;
                if arch == Arch::Onnx {
                    return Ok(model.load_onnx(device)?.into());
                }
                models::load_backbone(arch, &model.weights, model.normalize, device)
                    .map_err(JobError::fatal)
            }
            ModelSource::Rs {
                job,
                arch,
                normalize,
            } => match arch.parse::<Arch>().map_err(JobError::fatal)? {
                Arch::CifarResNet { .. } => Ok(self.load_resnet(sink, device)?.into()),
                other => {
                    let path = trained_weights(sink, job)?;
                    models::load_backbone(other, &path, *normalize, device).map_err(JobError::fatal)
                }
            },
            ModelSource::Caf { .. } | ModelSource::Denoised { .. } => Err(JobError::fatal(
                "a CAF or denoised model cannot serve as a frozen backbone",
            )),
        }
    }

    /// The model as a CAF model (backbone + adapter + head).
    pub fn load_caf(&self, sink: &dyn JobSink, device: &Device) -> Result<CafModel, JobError> {
        match self {
            ModelSource::Caf {
                backbone,
                job,
                adapter,
            } => {
                let phi = backbone
                    .load_backbone(sink, device)?
                    .detached()
                    .map_err(JobError::fatal)?;
                let path = trained_weights(sink, job)?;
                // The head was trained with one output per class of its training data.
                let classes = models::caf::head_classes(&path).map_err(JobError::fatal)?;
                load_caf(phi, adapter, classes, &path, device).map_err(JobError::fatal)
            }
            _ => Err(JobError::fatal("not a CAF model")),
        }
    }
}

fn resnet_depth(arch: &str) -> Result<usize, JobError> {
    match arch.parse::<Arch>() {
        Ok(Arch::CifarResNet { depth }) => Ok(depth),
        Ok(other) => Err(JobError::fatal(format!(
            "{other} cannot be used here: a CIFAR ResNet is needed"
        ))),
        Err(e) => Err(JobError::fatal(e)),
    }
}

/// Serde of a [`ModelSource`] in params that held a bare [`ModelRef`] before backbones could
/// be trained by a study (`eval`'s model, `train-rs`'s init): a file is written as that
/// `ModelRef`, so the ids of every job planned before stay, and a trained model as the tagged
/// `ModelSource`. Reading accepts both.
pub mod bare {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Either {
        Tagged(ModelSource),
        File(ModelRef),
    }

    impl From<Either> for ModelSource {
        fn from(e: Either) -> Self {
            match e {
                Either::Tagged(m) => m,
                Either::File(model) => ModelSource::Pretrained { model },
            }
        }
    }

    pub fn serialize<S: Serializer>(m: &ModelSource, s: S) -> Result<S::Ok, S::Error> {
        match m {
            ModelSource::Pretrained { model } => model.serialize(s),
            other => other.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ModelSource, D::Error> {
        Either::deserialize(d).map(Into::into)
    }
}

/// [`bare`] for an optional model (`None` is `null`).
pub mod bare_option {
    use super::*;

    struct Bare<'a>(&'a ModelSource);

    impl Serialize for Bare<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            bare::serialize(self.0, s)
        }
    }

    pub fn serialize<S: Serializer>(m: &Option<ModelSource>, s: S) -> Result<S::Ok, S::Error> {
        m.as_ref().map(Bare).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ModelSource>, D::Error> {
        Ok(Option::<bare::Either>::deserialize(d)?.map(Into::into))
    }
}

/// The recorded weights of a finished training job, checked against their SHA-256.
///
/// The store's artifact row is the truth; the file is only trusted if its bytes hash to what
/// the row recorded. A file this worker cannot read or that differs is fatal, not retryable:
/// on a cluster it means `--artifacts` is not on a filesystem this host shares (or the file
/// was changed), which no retry on this host cures, so the error names the host and the path.
pub fn trained_weights(sink: &dyn JobSink, job: &JobId) -> Result<PathBuf, JobError> {
    let a = sink
        .dep_artifact(job, WEIGHTS)?
        .ok_or_else(|| JobError::fatal(format!("training job {job} recorded no weights")))?;
    let path = PathBuf::from(&a.path);
    let host = crate::sched::hostname();
    let got = crate::util::sha256_file(&path).map_err(|e| {
        JobError::fatal(format!(
            "host {host} cannot read {}, the weights training job {job} recorded ({e}): \
             --artifacts must be a directory every worker sees at the same path",
            path.display()
        ))
    })?;
    if got != a.sha256 {
        return Err(JobError::fatal(format!(
            "on host {host}, {} does not match the weights training job {job} recorded \
             (sha256 {got}, recorded {})",
            path.display(),
            a.sha256
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::queue::Artifact;

    /// A sink that knows one recorded artifact.
    struct Recorded(Mutex<Option<Artifact>>);

    impl JobSink for Recorded {
        fn progress(&self, _: u64, _: u64) -> Result<(), JobError> {
            Ok(())
        }
        fn event(&self, _: &str, _: &str) -> Result<(), JobError> {
            Ok(())
        }
        fn artifact(&self, a: &Artifact) -> Result<(), JobError> {
            *self.0.lock().expect("lock") = Some(a.clone());
            Ok(())
        }
        fn dep_artifact(&self, _: &JobId, name: &str) -> Result<Option<Artifact>, JobError> {
            Ok(self
                .0
                .lock()
                .expect("lock")
                .clone()
                .filter(|a| a.name == name))
        }
    }

    #[test]
    fn recorded_weights_are_used_only_when_this_host_reads_the_recorded_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("final.safetensors");
        crate::util::write_atomic(&path, b"weights").expect("write");
        let job = JobId::new("0123456789abcdef".to_string());
        let sink = Recorded(Mutex::new(None));
        let none = trained_weights(&sink, &job).unwrap_err();
        assert!(!none.retryable && none.message.contains("recorded no weights"));
        sink.artifact(&Artifact {
            name: WEIGHTS.into(),
            path: path.display().to_string(),
            sha256: crate::util::sha256_bytes(b"weights"),
            bytes: 7,
        })
        .expect("record");
        assert_eq!(
            trained_weights(&sink, &job).expect("the recorded file"),
            path
        );

        // Changed bytes: refused at once, naming this host and the file.
        std::fs::write(&path, b"tampered").expect("overwrite");
        let e = trained_weights(&sink, &job).unwrap_err();
        assert!(!e.retryable, "{e}");
        let host = crate::sched::hostname();
        assert!(e.message.contains(&format!("on host {host}")), "{e}");
        assert!(e.message.contains(&path.display().to_string()), "{e}");

        // A file this host cannot see (artifacts not on shared storage): fatal, no retries.
        std::fs::remove_file(&path).expect("remove");
        let e = trained_weights(&sink, &job).unwrap_err();
        assert!(!e.retryable, "{e}");
        assert!(
            e.message
                .contains(&format!("host {host} cannot read {}", path.display())),
            "{e}"
        );
        assert!(e.message.contains("every worker sees"), "{e}");
    }

    #[test]
    fn a_file_keeps_its_bare_form_and_a_trained_model_is_tagged() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct P {
            #[serde(with = "bare")]
            model: ModelSource,
            #[serde(with = "bare_option")]
            init: Option<ModelSource>,
        }
        let file = ModelRef {
            arch: "resnet20".into(),
            weights: "/w.th".into(),
            weights_sha256: "ab".into(),
            normalize: Normalize::IDENTITY,
            onnx: Default::default(),
        };
        let trained = ModelSource::Rs {
            job: JobId::new("0123456789abcdef".to_string()),
            arch: "resnet20".into(),
            normalize: Normalize::IDENTITY,
        };
        let p = P {
            model: ModelSource::Pretrained {
                model: file.clone(),
            },
            init: Some(trained.clone()),
        };
        let v = serde_json::to_value(&p).expect("serialize");
        // Exactly the ModelRef's own form, as params held before.
        assert_eq!(v["model"], serde_json::to_value(&file).expect("ref"));
        assert_eq!(v["init"]["kind"], "rs");
        assert_eq!(serde_json::from_value::<P>(v).expect("read back"), p);
        let none = P {
            model: trained,
            init: None,
        };
        let v = serde_json::to_value(&none).expect("serialize");
        assert!(v["init"].is_null());
        assert_eq!(serde_json::from_value::<P>(v).expect("read back"), none);
    }
}
