//! Per-feature shift and scale over the last dimension (a linear layer's bias, LayerNorm's γ and
//! β) for training, with backward passes that sum over rows directly.
//!
//! Why: candle 0.11 differentiates `broadcast_add(b)` / `broadcast_mul(γ)` by reducing the
//! output gradient over every leading dimension with its generic strided reduction, which runs
//! one output element at a time: in the ViT's `rs` training step those reductions were 12 % of
//! the time (`perf`, `Map1::map` under `reduce_op` in `backward`). Here a row sum of a
//! contiguous [rows, d] gradient is a vectorised pass, summed in fixed chunks of rows in a fixed
//! order, so the result does not depend on the thread count (training stays bitwise
//! reproducible with the same threads, as the resume tests require).
//!
//! Other devices and dtypes fall back to candle's own broadcast ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::f32_slice;
use super::pointwise;

/// Rows per partial sum. Fixed (not derived from the thread count) so the summation order,
/// hence the rounding, is the same on every run.
const ROWS_PER_PART: usize = 64;

fn fused(x: &Tensor, per_feature: &[&Tensor]) -> bool {
    super::path::fused(x.device())
        && x.dtype() == DType::F32
        && per_feature.iter().all(|t| t.dtype() == DType::F32)
}

/// The feature width: the last dimension of `x`, which every per-feature tensor must have as its
/// only dimension.
fn width(x: &Tensor, per_feature: &[&Tensor]) -> Result<usize> {
    let d = x.dims().last().copied().unwrap_or(1);
    for t in per_feature {
        if t.dims() != [d] {
            candle_core::bail!(
                "per-feature tensor {:?} does not match the last dimension of {:?}",
                t.dims(),
                x.dims()
            );
        }
    }
    Ok(d)
}

/// x + b, b broadcast over every leading dimension of x (a linear layer's bias).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused(x, &[b]) {
        return x.broadcast_add(b);
    }
    width(x, &[b])?;
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasOp)
}

/// x·γ + β over the last dimension (LayerNorm's affine step on the normalised x).
pub fn scale_shift(x: &Tensor, gamma: &Tensor, beta: Option<&Tensor>) -> Result<Tensor> {
    let Some(beta) = beta else {
        return x.broadcast_mul(gamma);
    };
    if !fused(x, &[gamma, beta]) {
        return x.broadcast_mul(gamma)?.broadcast_add(beta);
    }
    width(x, &[gamma, beta])?;
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, ScaleShiftOp)
}

/// Σ over rows of a contiguous [rows, d] matrix, in fixed chunks of rows added in order; with
/// `times`, of the element-wise product with it.
fn sum_rows(g: &[f32], times: Option<&[f32]>, d: usize) -> Vec<f32> {
    let part = ROWS_PER_PART * d;
    let partials: Vec<Vec<f32>> = g
        .par_chunks(part)
        .enumerate()
        .map(|(i, gc)| {
            let mut acc = vec![0f32; d];
            match times {
                None => {
                    for row in gc.chunks_exact(d) {
                        for (a, v) in acc.iter_mut().zip(row) {
                            *a += v;
                        }
                    }
                }
                Some(t) => {
                    let tc = &t[i * part..][..gc.len()];
                    for (row, trow) in gc.chunks_exact(d).zip(tc.chunks_exact(d)) {
                        for ((a, v), w) in acc.iter_mut().zip(row).zip(trow) {
                            *a += v * w;
                        }
                    }
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in &partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// y = x + b.
struct BiasOp;

impl CustomOp2 for BiasOp {
    fn name(&self) -> &'static str {
        "caf-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "bias input")?;
        let b = f32_slice(s2, l2, "bias")?;
        let y = pointwise::map_rows(x, b, |x, b| x + b);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gx = x.track_op().then(|| grad.clone());
        let gb = if b.track_op() {
            let g = grad.contiguous()?;
            Some(g.apply_op2_no_bwd(&g, &RowSumOp { product: false })?)
        } else {
            None
        };
        Ok((gx, gb))
    }
}

/// y = x·γ + β.
struct ScaleShiftOp;

impl CustomOp3 for ScaleShiftOp {
    fn name(&self) -> &'static str {
        "caf-scale-shift"
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
        let x = f32_slice(s1, l1, "scale-shift input")?;
        let gamma = f32_slice(s2, l2, "scale")?;
        let beta = f32_slice(s3, l3, "shift")?;
        let d = gamma.len().max(1);
        let mut y = super::pointwise::unfilled(x.len());
        y.par_chunks_mut(ROWS_PER_PART * d)
            .zip(x.par_chunks(ROWS_PER_PART * d))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                    for (((y, x), g), b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                        *y = x * g + b;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let gx = if x.track_op() {
            Some(g.apply_op2_no_bwd(&gamma.contiguous()?, &RowScaleOp)?)
        } else {
            None
        };
        let ggamma = if gamma.track_op() {
            Some(g.apply_op2_no_bwd(&x.contiguous()?, &RowSumOp { product: true })?)
        } else {
            None
        };
        let gbeta = if beta.track_op() {
            Some(g.apply_op2_no_bwd(&g, &RowSumOp { product: false })?)
        } else {
            None
        };
        Ok((gx, ggamma, gbeta))
    }
}

/// (g, γ) ↦ g·γ, γ broadcast over rows.
struct RowScaleOp;

impl CustomOp2 for RowScaleOp {
    fn name(&self) -> &'static str {
        "caf-row-scale"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gradient")?;
        let gamma = f32_slice(s2, l2, "scale")?;
        let y = pointwise::map_rows(g, gamma, |g, s| g * s);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// (g, t) ↦ Σ_rows g (`product: false`; t is ignored) or Σ_rows g·t, as a [d] vector.
struct RowSumOp {
    product: bool,
}

impl CustomOp2 for RowSumOp {
    fn name(&self) -> &'static str {
        "caf-row-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gradient")?;
        let t = f32_slice(s2, l2, "factor")?;
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        let sum = sum_rows(g, self.product.then_some(t), d);
        Ok((CpuStorage::F32(sum), Shape::from(d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::tests::{max_abs_diff, randn};
    use candle_core::Var;

    /// Values and every gradient of L = Σ r ⊙ f(x, …) against candle's broadcast ops and their
    /// autograd, for shapes with fewer rows than a chunk, several chunks and a ragged last one.
    #[test]
    fn bias_and_scale_shift_match_candles_broadcast_ops() {
        for (i, shape) in [vec![3, 5], vec![2, 70, 12], vec![4, 65, 7], vec![1, 1]]
            .into_iter()
            .enumerate()
        {
            let seed = 10 * i as u64;
            let d = *shape.last().expect("a last dimension");
            let x = Var::from_tensor(&randn(seed, &shape)).expect("var");
            let g = Var::from_tensor(&randn(seed + 1, &[d])).expect("var");
            let b = Var::from_tensor(&randn(seed + 2, &[d])).expect("var");
            let r = randn(seed + 3, &shape);
            let cases: [(&str, Tensor, Tensor); 2] = [
                (
                    "bias",
                    add_bias(x.as_tensor(), b.as_tensor()).expect("ours"),
                    x.as_tensor().broadcast_add(b.as_tensor()).expect("candle"),
                ),
                (
                    "scale-shift",
                    scale_shift(x.as_tensor(), g.as_tensor(), Some(b.as_tensor())).expect("ours"),
                    x.as_tensor()
                        .broadcast_mul(g.as_tensor())
                        .and_then(|t| t.broadcast_add(b.as_tensor()))
                        .expect("candle"),
                ),
            ];
            for (name, ours, theirs) in cases {
                assert!(max_abs_diff(&ours, &theirs) < 1e-6, "{name} {shape:?}");
                let loss = |t: &Tensor| (t * &r).and_then(|t| t.sum_all());
                let go = loss(&ours).and_then(|l| l.backward()).expect("backward");
                let gt = loss(&theirs).and_then(|l| l.backward()).expect("backward");
                for (what, v) in [("x", &x), ("γ", &g), ("β", &b)] {
                    match (go.get(v.as_tensor()), gt.get(v.as_tensor())) {
                        (Some(a), Some(c)) => {
                            let diff = max_abs_diff(a, c);
                            assert!(diff < 1e-4, "{name} {shape:?} ∂{what}: {diff}");
                        }
                        (None, None) => {}
                        (a, c) => panic!(
                            "{name} {shape:?} ∂{what}: ours {:?}, candle's {:?}",
                            a.is_some(),
                            c.is_some()
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn row_sums_are_the_same_whatever_the_thread_count() {
        let x = randn(5, &[300, 33]);
        let b = Var::from_tensor(&randn(6, &[33])).expect("var");
        let grad = |threads: usize| -> Vec<f32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            pool.install(|| {
                let y = add_bias(&x, b.as_tensor()).expect("bias");
                let g = y.sqr().and_then(|t| t.sum_all()).and_then(|l| l.backward());
                let g = g.expect("backward");
                let gb = g.get(b.as_tensor()).expect("gradient");
                gb.to_vec1().expect("vec")
            })
        };
        let one = grad(1);
        assert_eq!(one, grad(3));
        assert_eq!(one, grad(8));
    }

    #[test]
    fn mismatched_widths_are_errors() {
        let x = randn(1, &[4, 5]);
        assert!(add_bias(&x, &randn(2, &[4])).is_err());
        assert!(scale_shift(&x, &randn(2, &[5]), Some(&randn(3, &[6]))).is_err());
    }
}
