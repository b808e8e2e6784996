//! A frozen feature extractor φ of any architecture caf builds, for the roles that need φ and
//! the head apart (CAF): a CIFAR ResNet, a timm ViT, torchvision's ResNet-50 or an ONNX graph.

use candle_core::{Result, Tensor};

use super::onnx::OnnxNet;
use super::precision::Precision;
use super::resnet50::TvResNet;
use super::vit::VisionTransformer;
use super::{CifarResNet, Classifier, ModelError, Normalize};

#[derive(Clone, Debug)]
pub enum Backbone {
    CifarResNet(CifarResNet),
    Vit(VisionTransformer),
    ResNet50(TvResNet),
    /// An exported graph: its features are constants (autograd never enters it) and its head
    /// is inside the graph, so [`Backbone::head`] refuses and its logits come from the graph.
    Onnx(OnnxNet),
}

impl From<OnnxNet> for Backbone {
    fn from(m: OnnxNet) -> Self {
        Backbone::Onnx(m)
    }
}

impl From<CifarResNet> for Backbone {
    fn from(m: CifarResNet) -> Self {
        Backbone::CifarResNet(m)
    }
}

impl From<VisionTransformer> for Backbone {
    fn from(m: VisionTransformer) -> Self {
        Backbone::Vit(m)
    }
}

impl From<TvResNet> for Backbone {
    fn from(m: TvResNet) -> Self {
        Backbone::ResNet50(m)
    }
}

impl Backbone {
    /// φ(x) [B, feature_dim]; `train` only matters for BatchNorm (the ViT has none).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Backbone::CifarResNet(m) => m.features_t(x, train),
            Backbone::Vit(m) => m.features(x),
            Backbone::ResNet50(m) => m.features_t(x, train),
            // Frozen in every mode: the graph is run as exported (BatchNorm in eval).
            Backbone::Onnx(m) => m.features(x),
        }
    }

    /// φ(x) in eval mode.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.features_t(x, false)
    }

    /// The backbone's own head on φ(x).
    pub fn head(&self, features: &Tensor) -> Result<Tensor> {
        match self {
            Backbone::CifarResNet(m) => m.head(features),
            Backbone::Vit(m) => m.head(features),
            Backbone::ResNet50(m) => m.head(features),
            Backbone::Onnx(m) => Err(candle_core::Error::Msg(format!(
                "{}: the head of an ONNX backbone is inside its graph; caf reads its logits \
                 output instead of applying the head to other features",
                m.path().display()
            ))),
        }
    }

    /// Width of φ(x): what a CAF adapter's output and head input must be.
    pub fn feature_dim(&self) -> usize {
        match self {
            Backbone::CifarResNet(_) => super::FEATURE_DIM,
            Backbone::Vit(m) => m.feature_dim(),
            Backbone::ResNet50(m) => m.feature_dim(),
            Backbone::Onnx(m) => m.feature_dim(),
        }
    }

    pub fn normalize(&self) -> Normalize {
        match self {
            Backbone::CifarResNet(m) => m.normalize(),
            Backbone::Vit(m) => m.normalize(),
            Backbone::ResNet50(m) => m.normalize(),
            Backbone::Onnx(m) => m.normalize(),
        }
    }

    /// A copy detached from autograd (sharing storage).
    pub fn detached(&self) -> Result<Self> {
        Ok(match self {
            Backbone::CifarResNet(m) => Backbone::CifarResNet(m.detached()?),
            Backbone::Vit(m) => Backbone::Vit(m.detached()),
            Backbone::ResNet50(m) => Backbone::ResNet50(m.detached()?),
            // Its outputs are constants already.
            Backbone::Onnx(m) => Backbone::Onnx(m.clone()),
        })
    }

    /// The CIFAR ResNet inside, for the roles only it can fill (RS training of the network).
    pub fn as_cifar_resnet(&self) -> Option<&CifarResNet> {
        match self {
            Backbone::CifarResNet(m) => Some(m),
            _ => None,
        }
    }
}

/// The whole network's logits, as a network to train (`train` sets BatchNorm's mode) or a
/// frozen classifier gradients pass through (SmoothAdv's attack, a denoiser's stability
/// objective). An ONNX graph's logits are constants: autograd never enters it.
impl candle_core::ModuleT for Backbone {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Backbone::Onnx(m) => m.logits(x),
            _ => self.head(&self.features_t(x, train)?),
        }
    }
}

impl Classifier for Backbone {
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Backbone::Onnx(m) => m.logits(x),
            _ => self.head(&self.features(x)?),
        }
    }

    fn num_classes(&self) -> usize {
        match self {
            Backbone::CifarResNet(m) => m.num_classes(),
            Backbone::Vit(m) => m.num_classes(),
            Backbone::ResNet50(m) => m.num_classes(),
            Backbone::Onnx(m) => m.num_classes(),
        }
    }

    fn input_size(&self) -> Option<usize> {
        match self {
            Backbone::Onnx(m) => m.input_size(),
            _ => None,
        }
    }

    fn set_precision(&mut self, precision: Precision) -> std::result::Result<(), ModelError> {
        match self {
            Backbone::CifarResNet(m) => {
                m.set_precision(precision);
                Ok(())
            }
            Backbone::Vit(m) => m.set_precision(precision),
            Backbone::ResNet50(m) => m.set_precision(precision),
            Backbone::Onnx(m) => m.set_precision(precision),
        }
    }
}
