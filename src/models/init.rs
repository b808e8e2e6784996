//! Reproducible parameter initialisation. candle draws `Init`s from an unseeded thread RNG, so
//! two runs of the same training job would start from different weights; this VarBuilder backend
//! draws every new variable from a ChaCha12 stream keyed by SHA-256 of (seed, variable name),
//! with exactly the distributions `candle_nn::Init` describes. A job's trained weights are then
//! a pure function of its parameters (for a fixed thread count).

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use sha2::{Digest, Sha256};

/// A [`VarMap`] whose missing variables are created with seeded draws.
#[derive(Clone)]
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A VarBuilder over `varmap` that initialises new variables reproducibly from `seed`.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        DType::F32,
        device.clone(),
    )
}

fn rng_for(seed: u64, name: &str) -> ChaCha12Rng {
    let mut h = Sha256::new();
    h.update(b"caf-init-v1");
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(&h.finalize()[..32]);
    ChaCha12Rng::from_seed(key)
}

/// Draws `init` over `shape` from the stream of (seed, name).
pub fn seeded_tensor(
    init: Init,
    shape: &Shape,
    seed: u64,
    name: &str,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = shape.elem_count();
    let mut rng = rng_for(seed, name);
    let uniform = |rng: &mut ChaCha12Rng, lo: f64, up: f64| -> Vec<f64> {
        (0..n)
            .map(|_| lo + (up - lo) * rng.random::<f64>())
            .collect()
    };
    let normal = |rng: &mut ChaCha12Rng, mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                mean + std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)
            })
            .collect()
    };
    let values = match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    };
    Tensor::from_vec(values, shape.clone(), device)?.to_dtype(dtype)
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(existing) = data.get(name) {
            if existing.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", existing.shape());
            }
            return Ok(existing.as_tensor().clone());
        }
        let var = Var::from_tensor(&seeded_tensor(h, &s, self.seed, name, dtype, dev)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}`: a VarMap creates variables with `get`, not `get_unchecked`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_name_give_the_same_weights_and_others_differ() {
        let dev = Device::Cpu;
        let init = candle_nn::init::DEFAULT_KAIMING_UNIFORM;
        let shape = Shape::from((16, 8, 3, 3));
        let a = seeded_tensor(init, &shape, 7, "conv.weight", DType::F32, &dev).unwrap();
        let b = seeded_tensor(init, &shape, 7, "conv.weight", DType::F32, &dev).unwrap();
        let c = seeded_tensor(init, &shape, 8, "conv.weight", DType::F32, &dev).unwrap();
        let d = seeded_tensor(init, &shape, 7, "other.weight", DType::F32, &dev).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&c));
        assert_ne!(v(&a), v(&d));
        // Kaiming uniform, fan-in 72, ReLU gain √2: bound √3·√2/√72 = 0.2887.
        let bound = (3.0f64).sqrt() * 2f64.sqrt() / 72f64.sqrt();
        assert!(v(&a).iter().all(|x| (x.abs() as f64) <= bound + 1e-6));
        assert!(v(&a).iter().any(|x| (x.abs() as f64) > 0.8 * bound));
    }

    #[test]
    fn builder_creates_each_variable_once() {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 3, &Device::Cpu);
        let l1 = candle_nn::linear(4, 2, vb.pp("fc")).unwrap();
        let l2 = candle_nn::linear(4, 2, vb.pp("fc")).unwrap();
        assert_eq!(
            l1.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            l2.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(varmap.all_vars().len(), 2);
        let again = VarMap::new();
        let l3 =
            candle_nn::linear(4, 2, seeded_var_builder(&again, 3, &Device::Cpu).pp("fc")).unwrap();
        assert_eq!(
            l1.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            l3.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
