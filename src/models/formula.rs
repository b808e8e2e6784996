//! "Formula weights": deterministic pseudo-random tensors that caf and a Python script compute
//! bit for bit alike, so a network's logits can be checked against timm/torchvision without
//! committing (or downloading) its weights. `bench/make_backbone_fixtures.py` holds the same
//! definition; change both together.
//!
//! Element `i` of the tensor `name` is `offset + scale · u`, with u in [-1, 1) taken from the
//! top 24 bits of splitmix64(FNV-1a(name) + i) (exact in f32), computed in f64 and rounded to
//! f32 once. `offset` and `scale` follow the name: running variances in [0.5, 1.5), running
//! means ±0.1, `cls_token` / `pos_embed` ±0.5, 1-D weights (norm scales) 1 ± 0.1, other 1-D
//! tensors ±0.1, and ≥ 2-D weights U(±√(3 / fan_in)) (unit-variance outputs).
//!
//! Also a seeded weight source for benchmarks and tests that need some network of an
//! architecture with no checkpoint on the machine.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values in [-1, 1) for `name`.
fn uniform(name: &str, n: usize) -> impl Iterator<Item = f64> {
    let seed = fnv1a(name);
    (0..n as u64).map(move |i| {
        let h = splitmix(seed.wrapping_add(i));
        (h >> 40) as f64 / f64::from(1u32 << 24) * 2.0 - 1.0
    })
}

fn rule(name: &str, shape: &[usize]) -> (f64, f64) {
    if name.ends_with("running_var") {
        (1.0, 0.5)
    } else if name.ends_with("running_mean") {
        (0.0, 0.1)
    } else if name == "cls_token" || name == "pos_embed" {
        (0.0, 0.5)
    } else if shape.len() == 1 {
        if name.ends_with("weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.1)
        }
    } else {
        let fan_in: usize = shape.iter().skip(1).product();
        (0.0, (3.0 / fan_in.max(1) as f64).sqrt())
    }
}

/// The formula values of tensor `name` with `shape`, row-major.
pub fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let (a, b) = rule(name, shape);
    uniform(name, shape.iter().product())
        .map(|u| (a + b * u) as f32)
        .collect()
}

/// `count` images of `size`×`size` in [0,1): the fixture script's inputs.
pub fn images(size: usize, count: usize, device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = uniform("input", count * 3 * size * size)
        .map(|u| ((u + 1.0) / 2.0) as f32)
        .collect();
    Tensor::from_vec(v, (count, 3, size, size), device)
}

/// Formula tensors for every `(name, shape)`.
pub fn tensors(
    named: &[(String, Vec<usize>)],
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    named
        .iter()
        .map(|(name, shape)| {
            Ok((
                name.clone(),
                Tensor::from_vec(values(name, shape), shape.as_slice(), device)?,
            ))
        })
        .collect()
}

/// A VarBuilder over formula tensors for every `(name, shape)`.
pub fn var_builder(
    named: &[(String, Vec<usize>)],
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    Ok(VarBuilder::from_tensors(
        tensors(named, device)?,
        DType::F32,
        device,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_fixed() {
        // Pinned so a change here cannot silently drift from the Python side.
        assert_eq!(fnv1a(""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a("a"), 0xAF63_DC4C_8601_EC8C);
        let v = values("head.bias", &[3]);
        assert!(v.iter().all(|x| x.abs() <= 0.1));
        assert_ne!(v[0], v[1]);
        let w = values("blocks.0.norm1.weight", &[4]);
        assert!(w.iter().all(|x| (0.9..=1.1).contains(x)));
    }
}
