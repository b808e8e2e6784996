//! ReLU for training as one pass forward and one pass backward.
//!
//! Why: candle 0.11 differentiates `relu` as `grad · (x ≥ 0)` built from four tensor ops
//! (zeros, compare into u8, cast back to f32, multiply), each a full pass over the activation
//! with its own allocation; in the `rs` training step they showed up as ~6 % of the time. Here
//! the backward is a single masked copy with the same convention at 0 (gradient passes where
//! x ≥ 0), so gradients are bitwise the same as candle's.
//!
//! Other devices and dtypes fall back to candle's own `relu`.

use super::conv::f32_slice;
use super::pointwise;
use super::simd;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

/// max(x, 0), differentiable, with the fused kernels on CPU f32.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !super::path::fused(x.device()) || x.dtype() != DType::F32 {
        return x.relu();
    }
    x.contiguous()?.apply_op1(ReluOp)
}

/// relu(a + b) as one op on CPU f32 (a residual block's output): one pass forward, and one
/// backward that masks the gradient by a + b ≥ 0 (recomputed from a and b, the same float sum)
/// and hands it to both summands, so the sum is never stored and candle accumulates no gradient
/// for it. Values and gradients are those of `relu(&(a + b)?)`.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fused = super::path::fused(a.device()) && a.dtype() == DType::F32;
    if !fused || b.dtype() != DType::F32 || a.shape() != b.shape() {
        return relu(&(a + b)?);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddReluOp)
}

/// max(x, 0) in place, for the fused eval paths (no autograd). In the widest vectors: in the
/// baseline build it was 1–2 % of a `caf` training step's samples (the frozen backbone's ReLUs).
pub(crate) fn relu_in_place(xs: &mut [f32]) {
    simd::widest(
        #[inline(always)]
        move || {
            for v in xs {
                *v = v.max(0.0);
            }
        },
    )
}

struct ReluOp;

impl CustomOp1 for ReluOp {
    fn name(&self) -> &'static str {
        "caf-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "relu input")?;
        Ok((
            CpuStorage::F32(pointwise::map(x, |x| x.max(0.0))),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(arg, &ReluGradOp)?))
    }
}

/// (∂L/∂y, x) ↦ ∂L/∂x = ∂L/∂y where x ≥ 0, else 0.
struct ReluGradOp;

impl CustomOp2 for ReluGradOp {
    fn name(&self) -> &'static str {
        "caf-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "relu output gradient")?;
        let x = f32_slice(s2, l2, "relu input")?;
        if g.len() != x.len() {
            candle_core::bail!(
                "relu gradient {:?} does not match input {:?}",
                l1.dims(),
                l2.dims()
            );
        }
        let gx = pointwise::map2(g, x, |g, x| if x >= 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

/// (a, b) ↦ max(a + b, 0).
struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "caf-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "add-relu summand")?;
        let b = f32_slice(s2, l2, "add-relu summand")?;
        if a.len() != b.len() {
            candle_core::bail!("add-relu: {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let y = pointwise::map2(a, b, |a, b| (a + b).max(0.0));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad_res
            .contiguous()?
            .apply_op3_no_bwd(a, b, &AddReluGradOp)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// (∂L/∂y, a, b) ↦ ∂L/∂y where a + b ≥ 0, else 0.
struct AddReluGradOp;

impl CustomOp3 for AddReluGradOp {
    fn name(&self) -> &'static str {
        "caf-add-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "add-relu output gradient")?;
        let a = f32_slice(s2, l2, "add-relu summand")?;
        let b = f32_slice(s3, l3, "add-relu summand")?;
        if g.len() != a.len() || a.len() != b.len() {
            candle_core::bail!("add-relu gradient {:?} does not match its input", l1.dims());
        }
        let gx = pointwise::map3(g, a, b, |g, a, b| if a + b >= 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// add_relu(a, b) is relu(a + b) exactly, values and both gradients, with sums that are
    /// exactly 0 (the gradient passes) and a non-contiguous summand.
    #[test]
    fn add_relu_is_relu_of_the_sum_exactly() {
        let n = 2 * (1 << 15) + 10;
        let av: Vec<f32> = (0..n)
            .map(|i| ((i * 13) % 17) as f32 * 0.25 - 2.0)
            .collect();
        let bv: Vec<f32> = (0..n)
            .map(|i| match i % 5 {
                0 => -av[i],
                k => (k as f32 - 2.5) * 0.7,
            })
            .collect();
        let r: Vec<f32> = (0..n).map(|i| ((i * 7) % 9) as f32 - 4.0).collect();
        let r = Tensor::from_vec(r, n, &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let a = Var::from_vec(av.clone(), (n / 2, 2), &Device::Cpu).unwrap();
            // b is stored [2, n/2] and used transposed (a non-contiguous operand) as the values
            // bv laid out [n/2, 2].
            let b_stored: Vec<f32> = (0..n)
                .map(|k| bv[(k % (n / 2)) * 2 + k / (n / 2)])
                .collect();
            let b = Var::from_vec(b_stored, (2, n / 2), &Device::Cpu).unwrap();
            let bt = b.as_tensor().t().unwrap();
            assert!(!bt.is_contiguous());
            let y = if fused {
                add_relu(a.as_tensor(), &bt).unwrap()
            } else {
                relu(&(a.as_tensor() + &bt).unwrap()).unwrap()
            };
            let y = y.flatten_all().unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                v(&y),
                v(g.get(a.as_tensor()).unwrap()),
                v(g.get(b.as_tensor()).unwrap()),
            )
        };
        let (fused, unfused) = (run(true), run(false));
        assert_eq!(fused, unfused);
        assert!(fused.1.contains(&0.0) && fused.1.iter().any(|&g| g != 0.0));
        let gb_t: Vec<f32> = (0..n).map(|i| fused.2[(i % 2) * (n / 2) + i / 2]).collect();
        assert_eq!(fused.1, gb_t, "both summands get the same gradient");
        assert!(fused
            .0
            .iter()
            .zip(&av)
            .zip(&bv)
            .all(|((&y, &a), &b)| y == (a + b).max(0.0)));
    }

    /// Values and gradients bitwise equal to candle's relu, including exact zeros (where both
    /// let the gradient through) and a non-contiguous input.
    #[test]
    fn matches_candles_relu_and_its_gradient_exactly() {
        let n = 3 * (1 << 15) + 18;
        let xs: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                k => (k as f32 - 3.5) * (1.0 + i as f32 * 1e-4),
            })
            .collect();
        let r: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let r = Tensor::from_vec(r, n, &Device::Cpu).unwrap();
        for transposed in [false, true] {
            let x = Var::from_vec(xs.clone(), n, &Device::Cpu).unwrap();
            let input = |x: &Var| -> Tensor {
                if transposed {
                    x.as_tensor().reshape((2, n / 2)).unwrap().t().unwrap()
                } else {
                    x.as_tensor().clone()
                }
            };
            let ours = relu(&input(&x)).unwrap().flatten_all().unwrap();
            let theirs = input(&x).relu().unwrap().flatten_all().unwrap();
            assert_eq!(
                ours.to_vec1::<f32>().unwrap(),
                theirs.to_vec1::<f32>().unwrap()
            );
            let g_ours = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let get = |g: &candle_core::backprop::GradStore| {
                g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
            };
            assert_eq!(get(&g_ours), get(&g_theirs));
        }
    }
}
