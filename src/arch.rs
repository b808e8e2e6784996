//! The names of the networks caf builds and of their input normalisation, as plain values.
//!
//! Why apart from `models`: a spec names an architecture long before anything is built, and
//! `spec` (the bottom layer) must not pull in candle to do so. `models` builds what these name.

/// The architectures caf can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// logits = W·x + b on raw [0,1] pixels flattened in (C, H, W) order.
    Linear,
    /// He et al. 2016 CIFAR ResNet with `depth` = 6n + 2 (20, 32, 44, 56, 110).
    CifarResNet { depth: usize },
    /// A timm VisionTransformer under timm's parameter names (see [`VitName`]).
    Vit(VitName),
    /// torchvision's ResNet-50 (Bottleneck v1.5, 224×224 ImageNet input) under its names.
    ResNet50,
    /// Any network exported with `torch.onnx.export`, run as it is by tract; which of its
    /// outputs are the features and the logits is an [`OnnxOutputs`].
    Onnx,
}

/// The outputs of an ONNX graph caf reads, by their graph names. Absent names fall back to an
/// output called `feature` / `logits` (the logits also to a graph's only output), so a graph
/// exported as README's "Bring your own backbone" shows needs neither.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct OnnxOutputs {
    /// The features φ(x) [B, D] a CAF adapter is added to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// The logits [B, classes] smoothed as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits: Option<String>,
}

impl OnnxOutputs {
    pub fn is_default(&self) -> bool {
        self.feature.is_none() && self.logits.is_none()
    }
}

/// The ViT configurations caf knows by name; `models::vit::VitConfig` holds their numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VitName {
    /// timm `vit_tiny_patch16_224`: width 192, 12 blocks, 3 heads, 224×224.
    Tiny16,
    /// timm `vit_small_patch16_224`: width 384, 12 blocks, 6 heads.
    Small16,
    /// timm `vit_base_patch16_224`: width 768, 12 blocks, 12 heads.
    Base16,
    /// timm `VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=6,
    /// num_heads=3)`: a CIFAR-sized ViT for CPU-scale studies.
    CifarTiny4,
}

impl VitName {
    pub const ALL: [VitName; 4] = [
        VitName::Tiny16,
        VitName::Small16,
        VitName::Base16,
        VitName::CifarTiny4,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VitName::Tiny16 => "vit_tiny_patch16_224",
            VitName::Small16 => "vit_small_patch16_224",
            VitName::Base16 => "vit_base_patch16_224",
            VitName::CifarTiny4 => "vit_cifar_tiny_patch4_32",
        }
    }
}

impl Arch {
    /// Every architecture name a spec or `--arch` accepts.
    pub const NAMES: &'static [&'static str] = &[
        "linear",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet50",
        "vit_tiny_patch16_224",
        "vit_small_patch16_224",
        "vit_base_patch16_224",
        "vit_cifar_tiny_patch4_32",
        "onnx",
    ];

    /// The square input size the network is built for, where it has one (the ViTs' position
    /// embeddings fix it; ResNet-50 takes any size but was designed for 224).
    pub fn input_size(&self) -> Option<usize> {
        match self {
            Arch::Linear | Arch::CifarResNet { .. } => Some(32),
            Arch::Vit(VitName::CifarTiny4) => Some(32),
            Arch::Vit(_) | Arch::ResNet50 => Some(224),
            // The graph fixes it, and it is only known once the graph is read.
            Arch::Onnx => None,
        }
    }

    /// Whether the network has features φ(x) apart from its head, so that it can serve as a
    /// frozen backbone (CAF's, and one pass shared by fused certification): all but `linear`.
    pub fn has_features(&self) -> bool {
        !matches!(self, Arch::Linear)
    }

    /// Whether caf can train the whole network (rs, SmoothAdv, a backbone's clean training):
    /// the CIFAR ResNets and the ViTs. The others serve frozen only.
    pub fn is_trainable(&self) -> bool {
        matches!(self, Arch::CifarResNet { .. } | Arch::Vit(_))
    }

    /// The input normalisation the architecture's reference weights use: timm's ViTs 0.5/0.5
    /// (their `default_cfg`), torchvision's ResNet-50 and the CIFAR ResNets ImageNet's; an
    /// ONNX graph none, as an exported model normalises inside its graph.
    pub fn default_normalize(&self) -> Normalize {
        match self {
            Arch::Linear | Arch::Onnx => Normalize::IDENTITY,
            Arch::Vit(_) => Normalize::HALF,
            Arch::CifarResNet { .. } | Arch::ResNet50 => Normalize::IMAGENET,
        }
    }
}

/// An architecture name caf does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown architecture `{0}` (expected linear, resnet20/32/44/56/110, resnet50, \
     vit_tiny_patch16_224, vit_small_patch16_224, vit_base_patch16_224 or \
     vit_cifar_tiny_patch4_32, or onnx for an exported graph)"
)]
pub struct UnknownArch(pub String);

impl std::str::FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(Arch::Linear),
            "resnet20" => Ok(Arch::CifarResNet { depth: 20 }),
            "resnet32" => Ok(Arch::CifarResNet { depth: 32 }),
            "resnet44" => Ok(Arch::CifarResNet { depth: 44 }),
            "resnet56" => Ok(Arch::CifarResNet { depth: 56 }),
            "resnet110" => Ok(Arch::CifarResNet { depth: 110 }),
            "resnet50" => Ok(Arch::ResNet50),
            "onnx" => Ok(Arch::Onnx),
            other => VitName::ALL
                .into_iter()
                .find(|v| v.as_str() == other)
                .map(Arch::Vit)
                .ok_or_else(|| UnknownArch(other.to_string())),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arch::Linear => write!(f, "linear"),
            Arch::CifarResNet { depth } => write!(f, "resnet{depth}"),
            Arch::Vit(v) => f.write_str(v.as_str()),
            Arch::ResNet50 => write!(f, "resnet50"),
            Arch::Onnx => write!(f, "onnx"),
        }
    }
}

/// Per-channel input normalisation applied inside the model, so noise is added in [0,1] pixel
/// space.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    pub const IDENTITY: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    /// The ImageNet statistics the akamaster CIFAR ResNets were trained with.
    pub const IMAGENET: Normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// timm's ViT default (`IMAGENET_INCEPTION_MEAN/STD`): [0,1] mapped to [-1,1].
    pub const HALF: Normalize = Normalize {
        mean: [0.5; 3],
        std: [0.5; 3],
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_parses_and_prints_back() {
        for name in Arch::NAMES {
            let arch: Arch = name.parse().expect(name);
            assert_eq!(arch.to_string(), *name);
        }
        let e = "vit_huge".parse::<Arch>().unwrap_err();
        assert!(e.to_string().contains("vit_cifar_tiny_patch4_32"), "{e}");
    }
}
