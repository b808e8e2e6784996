//! The classifier and data set that `--arch`, `--weights`, `--mean`/`--std` and `--data` name,
//! for the commands that work on one model outside any study.

use anyhow::{bail, Result};

use caf::data::{self, Split};
use caf::models::{self, Arch, Normalize};

use super::args::{DatasetArg, ModelArgs};
use super::exit::usage;

/// Mean/std from flags, defaulting to what the arch's reference weights use (ImageNet's for
/// the ResNets, timm's 0.5/0.5 for the ViTs).
fn normalize_of(m: &ModelArgs, arch: Arch) -> Result<Normalize> {
    let mut n = arch.default_normalize();
    if let Some(v) = &m.mean {
        n.mean = [v[0], v[1], v[2]];
    }
    if let Some(v) = &m.std {
        if v.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(usage("--std values must be > 0"));
        }
        n.std = [v[0], v[1], v[2]];
    }
    Ok(n)
}

pub fn parse_arch(arch: &str) -> Result<Arch> {
    arch.parse()
        .map_err(|e: caf::arch::UnknownArch| usage(e.to_string()))
}

pub fn load_classifier(
    m: &ModelArgs,
) -> Result<(Box<dyn models::Classifier>, candle_core::Device)> {
    let arch = parse_arch(&m.arch)?;
    let normalize = normalize_of(m, arch)?;
    if !m.weights.is_file() {
        bail!(usage(format!(
            "weights file not found: {}",
            m.weights.display()
        )));
    }
    if m.onnx_logits.is_some() && arch != Arch::Onnx {
        bail!(usage(
            "--onnx-logits names an output of an ONNX graph: it needs --arch onnx"
        ));
    }
    let device = m.device.open()?;
    let model: Box<dyn models::Classifier> = if arch == Arch::Onnx {
        let outputs = models::OnnxOutputs {
            feature: None,
            logits: m.onnx_logits.clone(),
        };
        Box::new(models::load_onnx(&m.weights, &outputs, normalize)?)
    } else {
        models::load_classifier(arch, &m.weights, normalize, &device)?
    };
    Ok((model, device))
}

pub fn load_data(m: &ModelArgs, split: Split) -> Result<data::ImageSet> {
    match m.data {
        DatasetArg::Cifar10 => Ok(data::load_cifar10(&m.data_root, split)?),
        DatasetArg::Cifar100 => Ok(data::load_cifar100(&m.data_root, split)?),
    }
}
