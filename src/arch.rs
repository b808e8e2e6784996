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
}

/// An architecture name caf does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture `{0}` (expected linear or resnet20/32/44/56/110)")]
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
            other => Err(UnknownArch(other.to_string())),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arch::Linear => write!(f, "linear"),
            Arch::CifarResNet { depth } => write!(f, "resnet{depth}"),
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
}
