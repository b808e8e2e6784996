//! GELU in its erf form (timm's `nn.GELU`): one vectorised pass forward, one backward.
//!
//! Why: candle 0.11 differentiates `gelu_erf` with thirteen tensor ops (square, negate, divide,
//! exp, two scalings, erf, three additions, the product with the gradient, the accumulation),
//! each a full pass over the ViT's widest activation (4 × its width per token) with its own
//! allocation; and its forward calls a scalar `erff` per element, which was 16–24 % of a CIFAR
//! ViT's noisy forward pass on an Intel Xeon (`perf`). Here erf is a rational function and the
//! density's exp a polynomial after range reduction, both in plain IEEE arithmetic without
//! fused multiply-adds, so the compiler vectorises them (AVX-512 or AVX2 builds of one body,
//! picked at run time) and every build gives the same bits. The forward value is within
//! 2.2e-7·(1 + |x|) of the exact GELU (tested against an f64 erf); the derivative
//! 0.5 + x·φ(x) + 0.5·erf(x/√2) (φ the standard normal density) within 1e-6.
//!
//! Other devices and dtypes fall back to candle's own `gelu_erf`.

use super::conv::f32_slice;
use super::pointwise;
use super::simd::{simd_level as level, SimdLevel as Level};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// x·Φ(x) = 0.5·x·(1 + erf(x/√2)), differentiable, with the fused kernels on CPU f32.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !super::path::fused(x.device()) || x.dtype() != DType::F32 {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluOp)
}

/// erf(z): odd rational function of z on [−4, 4] (erf(±4) rounds to ±1 in f32), degree 13 over
/// degree 8; the coefficients are Eigen's (`generic_fast_erf_float`). Measured error at most
/// 4.5e-7 over [−6, 6] (test `erf_and_exp_are_accurate`).
#[inline(always)]
fn erf(z: f32) -> f32 {
    let x = z.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_473_9e-2;
    x * p / q
}

/// e^y for y ≤ 0 (0 below −87, where e^y is under f32's smallest normal): y = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r by its degree-7 Taylor polynomial (relative error under 1e-8), 2^n
/// written into the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(y: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer (to nearest, ties to even) in plain arithmetic.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let y = y.clamp(-87.0, 0.0);
    let n = (y * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (y - n * LN2_HI) - n * LN2_LO;
    let mut p = r * (1.0 / 5040.0) + 1.0 / 720.0;
    p = r * p + 1.0 / 120.0;
    p = r * p + 1.0 / 24.0;
    p = r * p + 1.0 / 6.0;
    p = r * p + 0.5;
    p = r * p + 1.0;
    p = r * p + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn gelu_value(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu(x) / dx.
#[inline(always)]
fn gelu_slope(x: f32) -> f32 {
    let density = INV_SQRT_2PI * exp_nonpositive(-0.5 * (x * x)) * x;
    0.5 + density + 0.5 * erf(x * std::f32::consts::FRAC_1_SQRT_2)
}

/// y[i] = f(x[i], g[i]) (g: the output gradient, or x again for the forward value), in
/// parallel over fixed chunks, each chunk compiled for the widest vectors the CPU has unless
/// `CAF_KERNELS=portable`. Same bits on every path: the body has no fused multiply-adds.
fn map_vectorised(x: &[f32], g: &[f32], f: Body) -> Vec<f32> {
    let level = level();
    pointwise::map2_chunks(x, g, |x, g, y| f(level, x, g, y))
}

/// An element-wise body over (x, g) into y, in the build `Level` names.
type Body = fn(Level, &[f32], &[f32], &mut [f32]);

/// Defines `$name(level, x, g, y)`: y[i] = `$f`(x[i], g[i]) in `level`'s build (one the CPU
/// has: [`level`] or below).
macro_rules! vectorised {
    ($name:ident, $f:expr) => {
        fn $name(level: Level, x: &[f32], g: &[f32], y: &mut [f32]) {
            #[inline(always)]
            fn body(x: &[f32], g: &[f32], y: &mut [f32]) {
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                    *y = $f(x, g);
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512(x: &[f32], g: &[f32], y: &mut [f32]) {
                    body(x, g, y)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2(x: &[f32], g: &[f32], y: &mut [f32]) {
                    body(x, g, y)
                }
                match level {
                    // SAFETY: the caller's level is one the CPU has.
                    Level::Avx512 => return unsafe { avx512(x, g, y) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2(x, g, y) },
                    Level::Portable => {}
                }
            }
            body(x, g, y)
        }
    };
}

vectorised!(gelu_values, |x: f32, _g: f32| gelu_value(x));
vectorised!(gelu_grads, |x: f32, g: f32| g * gelu_slope(x));

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "caf-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu input")?;
        Ok((
            CpuStorage::F32(map_vectorised(x, x, gelu_values)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(arg, &GeluGradOp)?))
    }
}

/// (∂L/∂y, x) ↦ ∂L/∂x = ∂L/∂y · gelu'(x).
struct GeluGradOp;

impl CustomOp2 for GeluGradOp {
    fn name(&self) -> &'static str {
        "caf-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gelu output gradient")?;
        let x = f32_slice(s2, l2, "gelu input")?;
        if g.len() != x.len() {
            candle_core::bail!(
                "gelu gradient {:?} does not match input {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let gx = map_vectorised(x, g, gelu_grads);
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use statrs::function::erf::erf as erf64;

    fn gelu64(x: f64) -> f64 {
        0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
    }

    fn slope64(x: f64) -> f64 {
        let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        0.5 + x * density + 0.5 * erf64(x / std::f64::consts::SQRT_2)
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
            .collect()
    }

    #[test]
    fn erf_and_exp_are_accurate() {
        let mut worst = 0f64;
        for z in grid(-6.0, 6.0, 600_001) {
            worst = worst.max((f64::from(erf(z)) - erf64(f64::from(z))).abs());
        }
        assert!(worst <= 4.6e-7, "erf error {worst}");
        for y in grid(-87.0, 0.0, 400_001) {
            let want = f64::from(y).exp();
            let got = f64::from(exp_nonpositive(y));
            assert!(
                (got - want).abs() <= 2e-7 * want,
                "exp({y}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_nonpositive(-200.0), exp_nonpositive(-87.0));
        // Past the clamp, erf stays at its value at ±4, 1.2e-7 from ±1 (one f32 step below 1).
        assert!((erf(9.0) - 1.0).abs() <= 1.2e-7 && erf(-9.0) == -erf(9.0));
    }

    /// Values within 2.2e-7·(1 + |x|) of the exact GELU and slopes within 1e-6 of the exact
    /// derivative over [−10, 10]; NaN stays NaN.
    #[test]
    fn values_and_slopes_match_the_exact_gelu() {
        let xs = grid(-10.0, 10.0, 400_001);
        let g = vec![1f32; xs.len()];
        let values = map_vectorised(&xs, &xs, gelu_values);
        let slopes = map_vectorised(&xs, &g, gelu_grads);
        for ((&x, &v), &s) in xs.iter().zip(&values).zip(&slopes) {
            let x64 = f64::from(x);
            let err = (f64::from(v) - gelu64(x64)).abs();
            assert!(
                err <= 2.2e-7 * (1.0 + x64.abs()),
                "gelu({x}) = {v}: error {err}"
            );
            let err = (f64::from(s) - slope64(x64)).abs();
            assert!(err <= 1e-6, "gelu'({x}) = {s}: error {err}");
        }
        let nan = map_vectorised(&[f32::NAN], &[f32::NAN], gelu_values);
        assert!(nan[0].is_nan());
    }

    /// Every build this CPU runs (AVX-512, AVX2, portable) gives the same bits, over lengths
    /// that leave every kind of vector remainder.
    #[test]
    fn every_build_gives_the_same_bits() {
        let levels = crate::models::simd::simd_levels_here();
        for n in [1, 7, 15, 16, 17, 33, 1000] {
            let x = grid(-7.0, 7.0, n);
            let g = grid(-2.0, 3.0, n);
            for body in [gelu_values as Body, gelu_grads] {
                let mut want = vec![0f32; n];
                body(Level::Portable, &x, &g, &mut want);
                for &level in &levels {
                    let mut got = vec![0f32; n];
                    body(level, &x, &g, &mut got);
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{level:?}, n = {n}");
                }
            }
        }
    }

    /// The op's values and gradients against candle's `gelu_erf` and its autograd, for a
    /// contiguous and a transposed input.
    #[test]
    fn matches_candles_gelu_erf_and_its_gradient() {
        let n = 70_000;
        let xs = grid(-8.0, 8.0, n);
        let r: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let r = Tensor::from_vec(r, n, &Device::Cpu).expect("r");
        for transposed in [false, true] {
            let x = Var::from_vec(xs.clone(), n, &Device::Cpu).expect("var");
            let input = |x: &Var| -> Tensor {
                if transposed {
                    x.as_tensor()
                        .reshape((2, n / 2))
                        .and_then(|t| t.t())
                        .expect("transpose")
                } else {
                    x.as_tensor().clone()
                }
            };
            let ours = gelu(&input(&x))
                .and_then(|t| t.flatten_all())
                .expect("ours");
            let theirs = input(&x)
                .gelu_erf()
                .and_then(|t| t.flatten_all())
                .expect("candle");
            let (a, b) = (
                ours.to_vec1::<f32>().expect("vec"),
                theirs.to_vec1::<f32>().expect("vec"),
            );
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                // Both are within a few f32 steps of the exact value, whose own size can be far
                // below x's (gelu(−8) ≈ −5e-15): the tolerance scales with x.
                let x = xs[if transposed {
                    (i % 2) * (n / 2) + i / 2
                } else {
                    i
                }];
                assert!(
                    (a - b).abs() <= 3e-7 * (1.0 + x.abs()),
                    "x[{i}]: {a} vs {b}"
                );
            }
            let grad = |y: &Tensor| {
                let g = (y * &r)
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward());
                let g = g.expect("backward");
                g.get(x.as_tensor())
                    .expect("gradient")
                    .to_vec1::<f32>()
                    .expect("vec")
            };
            let (a, b) = (grad(&ours), grad(&theirs));
            for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "x[{i}]: {a} vs {b}"
                );
            }
        }
    }
}
