//! The arithmetic a model's fused CPU path runs in: a per-job choice that is part of the job's
//! identity, so it lives apart from the kernels that implement it.

use serde::{Deserialize, Serialize};

/// The arithmetic of a job's fused CPU inference path (an explicit per-job choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    /// 8-bit weights and activations with exact integer sums (CIFAR ResNets and their
    /// convolutional adapters on the CPU; see `int8.rs`).
    Int8,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            other => Err(format!(
                "expected precision f32, bf16 or int8, found `{other}`"
            )),
        }
    }
}
