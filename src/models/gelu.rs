//! GELU in its erf form (timm's `nn.GELU`) for training: one pass forward, one pass backward.
//!
//! Why: candle 0.11 differentiates `gelu_erf` with thirteen tensor ops (square, negate, divide,
//! exp, two scalings, erf, three additions, the product with the gradient, the accumulation),
//! each a full pass over the ViT's widest activation (4 × its width per token) with its own
//! allocation. Here the derivative 0.5 + x·φ(x) + 0.5·erf(x/√2) (φ the standard normal density)
//! is computed per element in one pass. The forward value is candle's own expression with
//! candle's erf, so outputs are bitwise candle's; gradients agree to rounding.
//!
//! Other devices and dtypes fall back to candle's own `gelu_erf`.

use super::conv::f32_slice;
use super::pointwise;
use candle_core::cpu::erf::erf_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// 1/√(2π), as candle's backward writes it.
const INV_SQRT_2PI: f32 = 0.398942;

/// x·Φ(x) = 0.5·x·(1 + erf(x/√2)), differentiable, with the fused kernels on CPU f32.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !super::path::fused(x.device()) || x.dtype() != DType::F32 {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(GeluOp)
}

/// candle's `gelu_erf` for one f32 (`candle_core::op::GeluErf::f32`).
fn gelu_value(v: f32) -> f32 {
    (erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
}

/// d gelu(x) / dx.
fn gelu_slope(x: f32) -> f32 {
    let density = INV_SQRT_2PI * (-(x * x) / 2.0).exp() * x;
    0.5 + density + 0.5 * erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "caf-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu input")?;
        Ok((
            CpuStorage::F32(pointwise::map(x, gelu_value)),
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
        let gx = pointwise::map2(g, x, |g, x| g * gelu_slope(x));
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values bitwise equal to candle's `gelu_erf` and gradients equal to its autograd's up to
    /// rounding, over [-8, 8] (both tails, zero) and for a non-contiguous input; the gradient
    /// also against a central difference in f64.
    #[test]
    fn matches_candles_gelu_erf_and_its_gradient() {
        let n = 70_000;
        let xs: Vec<f32> = (0..n)
            .map(|i| -8.0 + 16.0 * i as f32 / (n - 1) as f32)
            .collect();
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
            assert_eq!(
                ours.to_vec1::<f32>().expect("vec"),
                theirs.to_vec1::<f32>().expect("vec")
            );
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
        for &x in &[-3.0f64, -0.7, 0.0, 0.4, 1.3, 5.0] {
            let f =
                |v: f64| 0.5 * v * (1.0 + statrs::function::erf::erf(v / std::f64::consts::SQRT_2));
            let h = 1e-5;
            let want = (f(x + h) - f(x - h)) / (2.0 * h);
            let got = f64::from(gelu_slope(x as f32));
            assert!((got - want).abs() < 1e-5, "gelu'({x}) = {got}, want {want}");
        }
    }
}
