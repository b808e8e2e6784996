//! DnCNN (Zhang et al. 2017), the denoiser of denoised smoothing (Salman et al. 2020): a
//! 3×3 conv + ReLU, `depth − 2` blocks of 3×3 conv (no bias) + BatchNorm + ReLU, and a final
//! 3×3 conv back to 3 channels that predicts the noise; the output is the input minus that
//! prediction (residual learning, as in the paper's code). It works on images in [0, 1] pixel
//! space, before the classifier's own normalisation, so σ means the same as everywhere in caf.
//!
//! Sizes: the paper's 17 × 64 preset has 558,403 parameters and 1.14 GFLOPs per 32×32 image
//! (as much as 14 ResNet-20s); the CPU default 5 × 16 has 7,891 parameters and 15.9 MFLOPs,
//! close to the CPU default CAF adapter (179,912 parameters, 17.8 MFLOPs), so the two methods
//! get similar compute per image.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{conv::conv2d, relu::relu, Classifier, ModelError};

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
const MAX_DEPTH: usize = 64;
const MAX_WIDTH: usize = 512;

/// A DnCNN's shape: `dncnn:DEPTH:WIDTH` in specs (`dncnn` = the CPU default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnCnnArch {
    /// Convolution layers in all (≥ 3).
    pub depth: usize,
    /// Channels of the hidden layers.
    pub width: usize,
}

impl DnCnnArch {
    /// Similar compute to the CPU default CAF adapter (see the module docs).
    pub const CPU_DEFAULT: DnCnnArch = DnCnnArch {
        depth: 5,
        width: 16,
    };
    /// Salman et al.'s CIFAR-10 denoiser.
    pub const PAPER: DnCnnArch = DnCnnArch {
        depth: 17,
        width: 64,
    };

    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        if !(3..=MAX_DEPTH).contains(&self.depth) || !(1..=MAX_WIDTH).contains(&self.width) {
            return Err(ModelError::Invalid {
                context: self.to_string(),
                message: format!(
                    "a DnCNN needs 3 ≤ depth ≤ {MAX_DEPTH} and 1 ≤ width ≤ {MAX_WIDTH}"
                ),
            });
        }
        Ok(())
    }

    /// Trained parameters and FLOPs (2 × multiply-adds of the convolutions) per 32×32 image.
    pub fn cost(&self) -> (u64, u64) {
        let (d, w) = (self.depth as u64, self.width as u64);
        let pixels = 32 * 32;
        let first = 3 * w * 9;
        let mid = (d - 2) * (w * w * 9);
        let last = w * 3 * 9;
        let params = first + w + mid + (d - 2) * 2 * w + last + 3;
        (params, 2 * pixels * (first + mid + last))
    }
}

impl fmt::Display for DnCnnArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dncnn:{}:{}", self.depth, self.width)
    }
}

impl FromStr for DnCnnArch {
    type Err = ModelError;

    fn from_str(s: &str) -> std::result::Result<Self, ModelError> {
        let bad = || ModelError::Invalid {
            context: s.to_string(),
            message: "expected `dncnn` (the CPU default 5 × 16), `dncnn-paper` (17 × 64) or \
                      `dncnn:DEPTH:WIDTH`"
                .into(),
        };
        let arch = match s {
            "dncnn" | "default" => Self::CPU_DEFAULT,
            "dncnn-paper" | "paper" => Self::PAPER,
            _ => {
                let mut parts = s.split(':');
                if parts.next() != Some("dncnn") {
                    return Err(bad());
                }
                let mut num = || parts.next().and_then(|p| p.parse::<usize>().ok());
                let (Some(depth), Some(width)) = (num(), num()) else {
                    return Err(bad());
                };
                if parts.next().is_some() {
                    return Err(bad());
                }
                DnCnnArch { depth, width }
            }
        };
        arch.validate()?;
        Ok(arch)
    }
}

#[derive(Clone, Debug)]
struct Layer {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNorm>,
}

/// The denoiser.
#[derive(Clone, Debug)]
pub struct DnCnn {
    layers: Vec<Layer>,
}

fn conv_weight(vb: &VarBuilder, c_out: usize, c_in: usize) -> Result<Tensor> {
    // PyTorch's default Conv2d init, as the paper's code used.
    let bound = 1.0 / ((c_in * 9) as f64).sqrt();
    vb.get_with_hints(
        (c_out, c_in, 3, 3),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )
}

impl DnCnn {
    /// Parameter names: `layers.{i}.conv.weight`, `layers.{i}.conv.bias` (first and last),
    /// `layers.{i}.bn.*` (hidden layers).
    pub fn new(arch: DnCnnArch, vb: VarBuilder) -> Result<Self> {
        arch.validate().map_err(candle_core::Error::wrap)?;
        let w = arch.width;
        let mut layers = Vec::with_capacity(arch.depth);
        for i in 0..arch.depth {
            let (c_in, c_out) = match i {
                0 => (3, w),
                i if i == arch.depth - 1 => (w, 3),
                _ => (w, w),
            };
            let lvb = vb.pp(format!("layers.{i}"));
            let weight = conv_weight(&lvb.pp("conv"), c_out, c_in)?;
            let hidden = i != 0 && i != arch.depth - 1;
            let bias = if hidden {
                None
            } else {
                let bound = 1.0 / ((c_in * 9) as f64).sqrt();
                Some(lvb.pp("conv").get_with_hints(
                    c_out,
                    "bias",
                    Init::Uniform {
                        lo: -bound,
                        up: bound,
                    },
                )?)
            };
            let bn = if hidden {
                let cfg = BatchNormConfig {
                    eps: BN_EPS,
                    remove_mean: true,
                    affine: true,
                    momentum: BN_MOMENTUM,
                };
                Some(candle_nn::batch_norm(c_out, cfg, lvb.pp("bn"))?)
            } else {
                None
            };
            layers.push(Layer { weight, bias, bn });
        }
        Ok(DnCnn { layers })
    }
}

impl ModuleT for DnCnn {
    /// x − noise(x) for x in [0, 1] pixel space (plus noise).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = conv2d(&h, &l.weight, 1, 1)?;
            let relu_after = i != last;
            h = match (&l.bias, &l.bn, train) {
                // The first and last layers: bias (then ReLU in the first) as one op (see
                // `channel::shift`), whose backward sums the bias gradient per channel in
                // parallel, where candle's broadcast add summed it on the calling thread.
                (Some(b), _, _) => super::channel::shift(&h, b, relu_after)?,
                (None, Some(bn), true) if relu_after => super::bn::forward_train_relu(bn, &h)?,
                (None, Some(bn), true) => super::bn::forward_train(bn, &h)?,
                (None, Some(bn), false) => {
                    let h = bn.forward_t(&h, false)?;
                    if relu_after {
                        relu(&h)?
                    } else {
                        h
                    }
                }
                (None, None, _) if relu_after => relu(&h)?,
                (None, None, _) => h,
            };
        }
        x - h
    }
}

/// A new denoiser whose variables live in `varmap`, initialised from `seed`; returns it with
/// its trainable variables (every variable of the VarMap: running statistics are not Vars).
pub fn build_seeded(
    arch: DnCnnArch,
    varmap: &VarMap,
    device: &Device,
    seed: u64,
) -> std::result::Result<(DnCnn, Vec<Var>), ModelError> {
    arch.validate()?;
    let vb = super::init::seeded_var_builder(varmap, seed, device);
    let model = DnCnn::new(arch, vb)?;
    let data = varmap.data().lock().map_err(|_| ModelError::Invalid {
        context: "denoiser".into(),
        message: "variable map lock poisoned".into(),
    })?;
    let mut named: Vec<(&String, &Var)> = data
        .iter()
        .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let vars = named.into_iter().map(|(_, v)| v.clone()).collect();
    drop(data);
    Ok((model, vars))
}

/// A trained denoiser from a weights file (the training job's selected weights).
pub fn load(
    arch: DnCnnArch,
    weights: &Path,
    device: &Device,
) -> std::result::Result<DnCnn, ModelError> {
    let tensors = super::load_state_dict(weights, device)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    DnCnn::new(arch, vb).map_err(|e| {
        ModelError::weights(
            weights,
            format!("weights do not fit a {arch} denoiser: {e}"),
        )
    })
}

/// Denoised smoothing's base classifier: a frozen classifier behind a denoiser.
pub struct Denoised {
    pub denoiser: DnCnn,
    pub classifier: Box<dyn Classifier>,
}

impl Classifier for Denoised {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let clean = self.denoiser.forward_t(x, false)?.detach();
        self.classifier.logits(&clean)
    }

    fn num_classes(&self) -> usize {
        self.classifier.num_classes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_strings_parse_and_bad_ones_are_errors() {
        assert_eq!(
            "dncnn".parse::<DnCnnArch>().ok(),
            Some(DnCnnArch::CPU_DEFAULT)
        );
        assert_eq!(
            "dncnn-paper".parse::<DnCnnArch>().ok(),
            Some(DnCnnArch::PAPER)
        );
        assert_eq!(
            "dncnn:7:24".parse::<DnCnnArch>().ok(),
            Some(DnCnnArch {
                depth: 7,
                width: 24
            })
        );
        for bad in [
            "",
            "dncnn:2:16",
            "dncnn:5",
            "dncnn:5:0",
            "dncnn:5:16:1",
            "cnn:5:16",
            "dncnn:x:y",
        ] {
            assert!(bad.parse::<DnCnnArch>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cost_counts_match_the_built_network() {
        let varmap = VarMap::new();
        let arch = DnCnnArch::PAPER;
        let (_, vars) = build_seeded(arch, &varmap, &Device::Cpu, 0).expect("build");
        let params: usize = vars.iter().map(|v| v.elem_count()).sum();
        assert_eq!(params as u64, arch.cost().0);
        assert_eq!(arch.cost().0, 558_403);
        assert_eq!(DnCnnArch::CPU_DEFAULT.cost().0, 7_891);
        assert_eq!(DnCnnArch::CPU_DEFAULT.cost().1, 15_925_248);
    }

    #[test]
    fn output_has_the_input_shape_and_is_seeded() {
        let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).expect("x");
        let run = || {
            let varmap = VarMap::new();
            let (d, _) =
                build_seeded(DnCnnArch::CPU_DEFAULT, &varmap, &Device::Cpu, 9).expect("build");
            d.forward_t(&x, false)
                .and_then(|y| y.flatten_all())
                .and_then(|y| y.to_vec1::<f32>())
                .expect("forward")
        };
        let a = run();
        assert_eq!(a.len(), 2 * 3 * 32 * 32);
        assert_eq!(a, run());
    }
}
