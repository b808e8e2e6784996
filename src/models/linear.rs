//! The linear classifier: logits = W·x + b on pixels flattened in (C, H, W) order.
//!
//! Parameters are `weight` [classes, 3072] and `bias` [classes], at the root of the VarBuilder.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::resnet::{check_input, InputNorm};
use super::{Classifier, Normalize};
use crate::data::IMAGE_BYTES;

#[derive(Clone, Debug)]
pub struct LinearClassifier {
    norm: InputNorm,
    linear: Linear,
    num_classes: usize,
}

impl LinearClassifier {
    /// With `Normalize::IDENTITY` the model sees raw [0,1] pixels, the usual setting for this
    /// arch; any other normalisation is applied first, as for the ResNets.
    pub fn new(num_classes: usize, normalize: Normalize, vb: VarBuilder) -> Result<Self> {
        if num_classes == 0 {
            candle_core::bail!("a classifier needs at least one class");
        }
        let norm = InputNorm::new(normalize, vb.device())?;
        let linear = candle_nn::linear(IMAGE_BYTES, num_classes, vb)?;
        Ok(Self {
            norm,
            linear,
            num_classes,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.linear.bias()
    }
}

impl ModuleT for LinearClassifier {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        check_input(x)?;
        if x.dims()[2..] != [32, 32] {
            candle_core::bail!(
                "the linear classifier takes 32×32 images, got {:?}",
                x.dims()
            );
        }
        self.linear.forward(&self.norm.forward(x)?.flatten_from(1)?)
    }
}

impl Classifier for LinearClassifier {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
}
