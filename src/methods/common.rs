//! Pieces shared by the methods: references to models and data inside job params, the test-set
//! slice, and typed access to grid-cell parameters with located errors.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::{self, ImageSet, Split};
use crate::models::{self, Arch, Classifier, Normalize, OnnxOutputs};
use crate::plan::PlanContext;
use crate::sched::JobError;
use crate::spec::{Cell, Dataset, Param, SpecError};

/// A base model inside job params: the path to run with, the content hash that identifies it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub arch: String,
    pub weights: PathBuf,
    pub weights_sha256: String,
    pub normalize: Normalize,
    /// `arch: onnx` only (absent otherwise, so other models' job ids did not change): the
    /// graph outputs the spec named as features and logits.
    #[serde(default, flatten)]
    pub onnx: OnnxOutputs,
}

impl ModelRef {
    /// Loads the model, refusing weights whose contents changed since the job was planned (the
    /// job id would then no longer describe what ran).
    pub fn load(&self, device: &candle_core::Device) -> Result<Box<dyn Classifier>, JobError> {
        let arch: Arch = self.arch.parse().map_err(JobError::fatal)?;
        self.check()?;
        if arch == Arch::Onnx {
            return Ok(Box::new(self.load_onnx(device)?));
        }
        models::load_classifier(arch, &self.weights, self.normalize, device)
            .map_err(JobError::fatal)
    }

    /// The ONNX graph with the outputs the spec named (hash checked by the caller).
    pub fn load_onnx(&self, device: &candle_core::Device) -> Result<models::OnnxNet, JobError> {
        models::load_onnx(&self.weights, &self.onnx, self.normalize, device)
            .map_err(JobError::fatal)
    }

    /// Refuses a weights file whose contents changed since planning.
    pub fn check(&self) -> Result<(), JobError> {
        check_hash(&self.weights, &self.weights_sha256)
    }
}

/// A dataset split inside job params.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataRef {
    pub dataset: String,
    pub root: PathBuf,
    pub split: Split,
    /// SHA-256 of the split's file(s), so a changed dataset gives new job ids; for an image
    /// folder its fingerprint (see `data::imagefolder::FolderIndex::fingerprint`).
    pub sha256: String,
    /// Image folders only (absent for CIFAR, whose job ids therefore did not change): the
    /// centre crop's side and the resize before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// An image folder's training split only: how the trainer holds images out of a split
    /// grouped by class (`shuffled-v1`, see `methods::train::batches::SplitPlan`). Part of the
    /// job id, so training jobs planned when the held-out images were the split's tail (all of
    /// its last classes) are not taken for these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<String>,
}

impl DataRef {
    pub fn load(&self) -> Result<ImageSet, JobError> {
        let set = match self.dataset.as_str() {
            "cifar10" => data::load_cifar10(&self.root, self.split),
            "cifar100" => data::load_cifar100(&self.root, self.split),
            "imagefolder" => {
                let (Some(image_size), Some(resize)) = (self.image_size, self.resize) else {
                    return Err(JobError::fatal(
                        "an imagefolder data reference without image_size and resize",
                    ));
                };
                let pre = data::imagefolder::Preprocess { resize, image_size };
                data::imagefolder::load(&self.root, self.split, pre)
            }
            other => return Err(JobError::fatal(format!("unknown dataset `{other}`"))),
        };
        set.map_err(JobError::fatal)
    }

    /// The split as its jobs read it: an image folder from its files batch by batch (see
    /// [`data::imagefolder::Streamed`]; training reads each epoch's batches, certification and
    /// evaluation only their slice), anything else loaded into memory as by [`Self::load`].
    pub fn open(&self) -> Result<Box<dyn data::Images>, JobError> {
        match (self.dataset.as_str(), self.image_size, self.resize) {
            ("imagefolder", Some(image_size), Some(resize)) => {
                let pre = data::imagefolder::Preprocess { resize, image_size };
                let set = data::imagefolder::Streamed::open(&self.root, self.split, pre)
                    .map_err(JobError::fatal)?;
                Ok(Box::new(set))
            }
            _ => Ok(Box::new(self.load()?)),
        }
    }
}

/// Refuses to score `model_classes` logits against a data set whose labels reach past them: such
/// an image could never be predicted correctly, and certified accuracy would be silently wrong
/// (a CIFAR-10 model on CIFAR-100, or an ImageNet model on a folder of other classes). Fewer
/// classes in the data than outputs is allowed (a subset of the model's classes, as an ImageNet
/// validation folder of some classes) when the labels still fit; the job's log says so.
pub fn check_classes(model_classes: usize, set: &dyn data::Images) -> Result<(), JobError> {
    let data_classes = set.classes().len();
    let top = set.labels().iter().copied().max().map_or(0, usize::from);
    if data_classes > model_classes || (!set.is_empty() && top >= model_classes) {
        return Err(JobError::fatal(format!(
            "the model has {model_classes} outputs but the data set has {data_classes} classes \
             (labels up to {top}): its predictions cannot be scored against these labels; \
             use a model trained on this data set"
        )));
    }
    if data_classes < model_classes {
        tracing::warn!(
            model_classes,
            data_classes,
            "the data set has fewer classes than the model has outputs: labels are read as the \
             model's first class indices"
        );
    }
    Ok(())
}

/// Cohen's `--skip`/`--max`: images 0, skip, 2·skip, … below `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub skip: usize,
    pub max: Option<usize>,
}

impl Slice {
    pub fn indices(&self, len: usize) -> Vec<usize> {
        let end = self.max.map_or(len, |m| m.min(len));
        (0..end).step_by(self.skip.max(1)).collect()
    }
}

fn check_hash(path: &std::path::Path, want: &str) -> Result<(), JobError> {
    let got = crate::util::sha256_file(path)
        .map_err(|e| JobError::fatal(format!("{}: {e}", path.display())))?;
    if got != want {
        return Err(JobError::fatal(format!(
            "{} changed since this job was planned (sha256 {got}, planned {want}); run `caf run` again to re-plan",
            path.display()
        )));
    }
    Ok(())
}

/// The `method` of a cell (the spec guarantees it is present and a string).
pub fn method_of(cell: &Cell, ctx: &PlanContext<'_>) -> Result<String, SpecError> {
    match cell.params.get("method") {
        Some(Param {
            value: serde_json::Value::String(s),
            ..
        }) => Ok(s.clone()),
        Some(p) => Err(ctx.error_at(p.span, "expected a string for method")),
        None => Err(SpecError::whole_file(
            &ctx.spec.path,
            "a grid cell has no `method`",
        )),
    }
}

/// Rejects cell parameters a method does not use, pointing at the first one.
pub fn check_known(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    method: &str,
    allowed: &[&str],
) -> Result<(), SpecError> {
    let allowed: BTreeSet<&str> = allowed.iter().copied().chain(["method"]).collect();
    for (k, p) in &cell.params {
        if !allowed.contains(k.as_str()) {
            let list: Vec<&str> = allowed.iter().copied().collect();
            return Err(ctx.error_at(
                p.span,
                format!(
                    "parameter `{k}` is not used by method `{method}` (expected one of: {})",
                    list.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// The spec's test split as a [`DataRef`].
pub fn test_data_ref(ctx: &mut PlanContext<'_>) -> Result<DataRef, SpecError> {
    data_ref(ctx, Split::Test)
}

/// The spec's training split as a [`DataRef`] (every training file is hashed).
pub fn train_data_ref(ctx: &mut PlanContext<'_>) -> Result<DataRef, SpecError> {
    data_ref(ctx, Split::Train)
}

fn data_ref(ctx: &mut PlanContext<'_>, split: Split) -> Result<DataRef, SpecError> {
    let spec = &ctx.spec.data;
    let at = |e: &dyn std::fmt::Display| SpecError::at(&ctx.spec.path, spec.span, e.to_string());
    match spec.dataset {
        Dataset::Cifar10 | Dataset::Cifar100 => {
            let cifar100 = spec.dataset == Dataset::Cifar100;
            let root = if cifar100 {
                data::resolve_cifar100_root(&spec.root)
            } else {
                data::resolve_cifar10_root(&spec.root)
            }
            .map_err(|e| at(&e))?;
            let files = data::cifar_split_files(&root, split, cifar100);
            let mut hashes = Vec::new();
            for file in &files {
                if !file.is_file() {
                    return Err(at(&format!(
                        "{} needs {}, which does not exist",
                        if split == Split::Train {
                            "training"
                        } else {
                            "certification"
                        },
                        file.display()
                    )));
                }
                hashes.push(ctx.file_sha256(file)?);
            }
            // The test split's hash is its one file's; the training split's (CIFAR-10: five
            // files) hashes their hashes, as since the first plans, so job ids stay put.
            let sha256 = if split == Split::Test {
                hashes.swap_remove(0)
            } else {
                crate::util::sha256_bytes(hashes.join(",").as_bytes())
            };
            Ok(DataRef {
                dataset: spec.dataset.as_str().into(),
                root,
                split,
                sha256,
                image_size: None,
                resize: None,
                holdout: None,
            })
        }
        Dataset::ImageFolder => {
            let (root, kind) = (spec.root.clone(), spec.fingerprint);
            // Not a real path: the cache key of this split's fingerprint (one scan per plan).
            let key = root.join(format!("\0imagefolder-{split}-{kind:?}"));
            let sha256 = ctx.cached_digest(&key, || {
                let index = data::imagefolder::scan(&root, split).map_err(|e| at(&e))?;
                index.fingerprint(kind).map_err(|e| at(&e))
            })?;
            let spec = &ctx.spec.data;
            Ok(DataRef {
                dataset: spec.dataset.as_str().into(),
                root,
                split,
                sha256,
                image_size: Some(spec.image_size),
                resize: spec.resize,
                holdout: (split == Split::Train).then(|| "shuffled-v1".to_string()),
            })
        }
    }
}

/// A string parameter, with a located error.
pub fn string(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    key: &str,
) -> Result<Option<(String, Param)>, SpecError> {
    match cell.params.get(key) {
        None => Ok(None),
        Some(p) => match p.value.as_str() {
            Some(v) => Ok(Some((v.to_string(), p.clone()))),
            None => Err(ctx.error_at(
                p.span,
                format!("expected a string for {key}, found {}", p.value),
            )),
        },
    }
}

/// A boolean parameter, with a located error.
pub fn boolean(cell: &Cell, ctx: &PlanContext<'_>, key: &str) -> Result<Option<bool>, SpecError> {
    match cell.params.get(key) {
        None => Ok(None),
        Some(p) => match p.value.as_bool() {
            Some(v) => Ok(Some(v)),
            None => Err(ctx.error_at(
                p.span,
                format!("expected true or false for {key}, found {}", p.value),
            )),
        },
    }
}

/// A finite number parameter, with a located error.
pub fn number(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    key: &str,
) -> Result<Option<(f64, Param)>, SpecError> {
    match cell.params.get(key) {
        None => Ok(None),
        Some(p) => match p.value.as_f64() {
            Some(v) if v.is_finite() => Ok(Some((v, p.clone()))),
            _ => Err(ctx.error_at(
                p.span,
                format!("expected a number for {key}, found {}", p.value),
            )),
        },
    }
}

/// A non-negative integer parameter, with a located error.
pub fn integer(
    cell: &Cell,
    ctx: &PlanContext<'_>,
    key: &str,
) -> Result<Option<(u64, Param)>, SpecError> {
    match cell.params.get(key) {
        None => Ok(None),
        Some(p) => match p.value.as_u64() {
            Some(v) => Ok(Some((v, p.clone()))),
            None => Err(ctx.error_at(
                p.span,
                format!(
                    "expected a non-negative integer for {key}, found {}",
                    p.value
                ),
            )),
        },
    }
}

/// Removes the keys that do not determine a job's result (paths, display names) from params.
pub fn identity_of(params: &serde_json::Value, drop: &[&str]) -> serde_json::Value {
    fn strip(v: &serde_json::Value, drop: &[&str]) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => serde_json::Value::Object(
                m.iter()
                    .filter(|(k, _)| !drop.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), strip(v, drop)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    strip(params, drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_past_the_models_outputs_are_refused() {
        let names = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        let set = |labels: Vec<u8>, classes: usize| {
            let pixels = vec![0u8; labels.len() * crate::data::Chw::CIFAR.len()];
            ImageSet::new(pixels, labels, names(classes))
        };
        assert!(check_classes(10, &set(vec![0, 9, 3], 10)).is_ok());
        // A 10-class model on a 100-class set, even on images whose labels happen to fit.
        let e = check_classes(10, &set(vec![0, 1], 100))
            .unwrap_err()
            .to_string();
        assert!(e.contains("10 outputs") && e.contains("100 classes"), "{e}");
        assert!(check_classes(10, &set(vec![0, 12], 10)).is_err());
        // A subset of the model's classes is fine.
        assert!(check_classes(1000, &set(vec![0, 4], 5)).is_ok());
    }

    #[test]
    fn cifar_data_refs_serialise_as_before_image_folders_existed() {
        // Job ids hash these params: a CIFAR reference must keep exactly its four keys.
        let r = DataRef {
            dataset: "cifar10".into(),
            root: PathBuf::from("/d"),
            split: Split::Test,
            sha256: "ab".into(),
            image_size: None,
            resize: None,
            holdout: None,
        };
        assert_eq!(
            crate::util::canonical_json(&serde_json::to_value(&r).expect("json")),
            r#"{"dataset":"cifar10","root":"/d","sha256":"ab","split":"test"}"#
        );
        let folder = DataRef {
            dataset: "imagefolder".into(),
            image_size: Some(224),
            resize: Some(256),
            ..r
        };
        let v = serde_json::to_value(&folder).expect("json");
        assert_eq!(
            (v["image_size"].as_u64(), v["resize"].as_u64()),
            (Some(224), Some(256))
        );
        let back: DataRef = serde_json::from_value(v).expect("back");
        assert_eq!(back, folder);
    }

    #[test]
    fn model_refs_serialise_as_before_onnx_existed() {
        // Job ids hash these params: a non-ONNX reference keeps exactly its four keys.
        let r = ModelRef {
            arch: "resnet20".into(),
            weights: PathBuf::from("/w"),
            weights_sha256: "ab".into(),
            normalize: Normalize::IDENTITY,
            onnx: OnnxOutputs::default(),
        };
        let v = serde_json::to_value(&r).expect("json");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["arch", "weights", "weights_sha256", "normalize"]);
        let back: ModelRef =
            serde_json::from_value(serde_json::to_value(&r).expect("json")).expect("back");
        assert_eq!(back, r);
        let onnx = ModelRef {
            arch: "onnx".into(),
            onnx: OnnxOutputs {
                feature: Some("penultimate".into()),
                logits: None,
            },
            ..r
        };
        let v = serde_json::to_value(&onnx).expect("json");
        assert_eq!(v["feature"], "penultimate");
        assert!(v.get("logits").is_none(), "{v}");
        let back: ModelRef = serde_json::from_value(v).expect("back");
        assert_eq!(back, onnx);
    }

    #[test]
    fn slice_follows_cohen_skip_and_max() {
        assert_eq!(Slice { skip: 1, max: None }.indices(4), vec![0, 1, 2, 3]);
        assert_eq!(
            Slice {
                skip: 20,
                max: None
            }
            .indices(100),
            vec![0, 20, 40, 60, 80]
        );
        assert_eq!(
            Slice {
                skip: 3,
                max: Some(7)
            }
            .indices(100),
            vec![0, 3, 6]
        );
        assert_eq!(
            Slice {
                skip: 3,
                max: Some(1000)
            }
            .indices(7),
            vec![0, 3, 6]
        );
        assert!(Slice {
            skip: 2,
            max: Some(0)
        }
        .indices(10)
        .is_empty());
    }

    #[test]
    fn identity_drops_paths_recursively() {
        let p = serde_json::json!({"model": {"weights": "/a", "weights_sha256": "x"}, "backbone": "r", "sigma": 0.5});
        assert_eq!(
            identity_of(&p, &["weights", "backbone"]),
            serde_json::json!({"model": {"weights_sha256": "x"}, "sigma": 0.5})
        );
    }
}
