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
        n.mean = three("--mean", v)?;
    }
    if let Some(v) = &m.std {
        if v.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(usage("--std values must be > 0"));
        }
        n.std = three("--std", v)?;
    }
    Ok(n)
}

/// One value per RGB channel, e.g. `--mean 0.485,0.456,0.406`.
fn three(flag: &str, v: &[f32]) -> Result<[f32; 3]> {
    match v {
        [r, g, b] => Ok([*r, *g, *b]),
        _ => bail!(usage(format!(
            "{flag} takes three comma-separated values, one per channel (e.g. {flag} \
             0.5,0.5,0.5); found {}",
            v.len()
        ))),
    }
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
        Box::new(models::load_onnx(&m.weights, &outputs, normalize, &device)?)
    } else {
        models::load_classifier(arch, &m.weights, normalize, &device)?
    };
    Ok((model, device))
}

/// The split `--data` names, checked against the model it will be scored with: images of the
/// arch's input size (an ONNX graph's, read from the graph) and labels within the model's
/// outputs.
pub fn load_data(
    m: &ModelArgs,
    split: Split,
    model: &dyn models::Classifier,
) -> Result<Box<dyn data::Images>> {
    let arch = parse_arch(&m.arch)?;
    let input_size = arch.input_size().or(model.input_size());
    if m.data != DatasetArg::Imagefolder && (m.image_size.is_some() || m.resize.is_some()) {
        bail!(usage(
            "--image-size and --resize apply to --data imagefolder only"
        ));
    }
    let set: Box<dyn data::Images> = match m.data {
        DatasetArg::Cifar10 => Box::new(data::load_cifar10(&m.data_root, split)?),
        DatasetArg::Cifar100 => Box::new(data::load_cifar100(&m.data_root, split)?),
        DatasetArg::Imagefolder => {
            let image_size = m.image_size.or(input_size).unwrap_or(224);
            let resize = m
                .resize
                .unwrap_or_else(|| data::imagefolder::Preprocess::default_resize(image_size));
            if image_size == 0 || resize < image_size {
                bail!(usage(format!(
                    "--resize {resize} must be at least --image-size {image_size} (> 0)"
                )));
            }
            let pre = data::imagefolder::Preprocess { resize, image_size };
            // Only the images of the slice are decoded, when they are read.
            Box::new(data::imagefolder::Streamed::open(&m.data_root, split, pre)?)
        }
    };
    let side = set.shape().h;
    if let Some(want) = input_size {
        if set.shape().h != want || set.shape().w != want {
            bail!(usage(format!(
                "{arch} takes {want}×{want} images but the data set's are {side}×{}",
                set.shape().w
            )));
        }
    }
    // A study refuses this (its reports would score predictions against labels they cannot
    // match); a one-model command may mean it (a two-class model certified for its radii), so it
    // warns that the `correct` column and the accuracy are meaningless.
    if let Err(e) = caf::methods::common::check_classes(model.num_classes(), set.as_ref()) {
        eprintln!("warning: {e}; `correct` and accuracy below are meaningless");
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::args::{Cli, Command};

    fn normalize(flags: &[&str]) -> Result<Normalize> {
        let mut argv = vec!["caf", "certify", "--arch", "resnet20", "--weights", "w"];
        argv.extend_from_slice(flags);
        argv.extend_from_slice(&["--sigma", "0.25", "--out", "o.tsv"]);
        let cli = Cli::try_parse_from(argv)?;
        let Command::Certify(c) = cli.command else {
            bail!("not certify");
        };
        normalize_of(&c.model, Arch::CifarResNet { depth: 20 })
    }

    #[test]
    fn mean_and_std_take_three_comma_separated_values() {
        let n = normalize(&["--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.25"]).expect("parsed");
        assert_eq!((n.mean, n.std), ([0.5, 0.4, 0.3], [0.2, 0.2, 0.25]));
        assert_eq!(normalize(&[]).expect("default"), Normalize::IMAGENET);
        let err = normalize(&["--mean", "0.5,0.5"])
            .expect_err("two values")
            .to_string();
        assert!(
            err.contains("--mean takes three comma-separated values"),
            "{err}"
        );
        assert!(normalize(&["--std", "0.5,0,0.5"]).is_err());
    }
}
