//! Train-mode BatchNorm as one CPU pass for the statistics, one for the output and two for the
//! backward pass, registered with candle's autograd as a [`CustomOp3`] over (x, γ, β).
//!
//! Why: candle_nn's `BatchNorm::forward_train` builds the result from about nine tensor ops
//! (transpose, contiguous copy, mean, subtract, square, mean, divide, multiply, add) and its
//! backward from more, each a full pass over the activations; in a CAF training step the
//! adapters' twenty BatchNorms made that a large share of the time. Semantics are candle_nn's
//! (and PyTorch's): normalise with the batch mean and biased variance, update the running mean
//! with the batch mean and the running variance with the unbiased batch variance, both with
//! `momentum`. Statistics are summed per channel in a fixed order (image, then pixel) in f64, so
//! results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, Var};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::conv::f32_slice;
use super::lanes::{channel_totals, lane_sums, lanes_total, LANES};
use super::simd;

/// `bn.forward_t(x, true)` with the fused kernels on the CPU (f32, affine BatchNorm); candle_nn's
/// own implementation elsewhere.
pub fn forward_train(bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    train(bn, x, false)
}

/// `relu(bn.forward_t(x, true))` as one op on the CPU fused path: the ReLU is applied as the
/// normalised value is written, and its mask (pre-activation ≥ 0, candle's convention) is
/// recomputed from x inside the BatchNorm backward, so neither the pre-activation tensor, a ReLU
/// pass each way, nor candle's gradient accumulation for it exists. Values and gradients are
/// those of `relu(forward_train(bn, x))`.
pub fn forward_train_relu(bn: &BatchNorm, x: &Tensor) -> Result<Tensor> {
    train(bn, x, true)
}

fn train(bn: &BatchNorm, x: &Tensor, relu: bool) -> Result<Tensor> {
    let unfused = |x: &Tensor| {
        let y = candle_nn::ModuleT::forward_t(bn, x, true)?;
        if relu {
            super::relu::relu(&y)
        } else {
            Ok(y)
        }
    };
    let Some((gamma, beta)) = bn.weight_and_bias() else {
        return unfused(x);
    };
    if !super::path::fused(x.device()) || x.dtype() != DType::F32 || x.rank() != 4 {
        return unfused(x);
    }
    let (n, c, h, w) = x.dims4()?;
    let m = n * h * w;
    if c != gamma.dim(0)? || m < 2 {
        candle_core::bail!(
            "batch norm: input {:?} does not fit {} channels",
            x.dims(),
            gamma.dim(0)?
        );
    }
    let x = x.contiguous()?;
    let stats = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            candle_core::bail!("batch norm: expected f32 CPU storage");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("batch norm: expected a contiguous input");
        };
        BatchStats::of(&data[a..b], n, c, h * w, bn.eps())
    };
    stats.update_running(bn)?;
    let op = BnTrain {
        stats,
        n,
        c,
        hw: h * w,
        relu,
    };
    x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

/// A batch's per-channel statistics as train-mode BatchNorm normalises with them.
pub(crate) struct BatchStats {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// The biased variance in f64 and the values per channel, for the running statistics.
    var: Vec<f64>,
    mean_f64: Vec<f64>,
    m: usize,
}

impl BatchStats {
    /// The statistics of an NCHW buffer of `n` images of `c` planes of `hw` values.
    pub(crate) fn of(x: &[f32], n: usize, c: usize, hw: usize, eps: f64) -> Self {
        let (mean_f64, var) = stats(x, n, c, hw);
        BatchStats {
            mean: mean_f64.iter().map(|&v| v as f32).collect(),
            invstd: var
                .iter()
                .map(|&v| (1.0 / (v + eps).sqrt()) as f32)
                .collect(),
            var,
            mean_f64,
            m: n * hw,
        }
    }

    /// Moves `bn`'s running statistics towards these, exactly as candle_nn does.
    pub(crate) fn update_running(&self, bn: &BatchNorm) -> Result<()> {
        let mom = bn.momentum();
        let m = self.m as f64;
        let unbias = m / (m - 1.0);
        let rm = Var::from_tensor(bn.running_mean())?;
        let rv = Var::from_tensor(bn.running_var())?;
        let old_m: Vec<f32> = rm.as_tensor().to_vec1()?;
        let old_v: Vec<f32> = rv.as_tensor().to_vec1()?;
        let new_m: Vec<f32> = old_m
            .iter()
            .zip(&self.mean_f64)
            .map(|(&r, &b)| (f64::from(r) * (1.0 - mom) + b * mom) as f32)
            .collect();
        let new_v: Vec<f32> = old_v
            .iter()
            .zip(&self.var)
            .map(|(&r, &b)| (f64::from(r) * (1.0 - mom) + b * mom * unbias) as f32)
            .collect();
        let (c, dev) = (new_m.len(), bn.running_mean().device());
        rm.set(&Tensor::from_vec(new_m, c, dev)?)?;
        rv.set(&Tensor::from_vec(new_v, c, dev)?)
    }

    /// The per-channel affine map y = x·a + b the forward pass applies (f32, as it computes
    /// it, so a backward's ReLU mask sees the forward's exact pre-activations).
    pub(crate) fn affine(&self, gamma: &[f32], beta: &[f32]) -> (Vec<f32>, Vec<f32>) {
        (0..self.mean.len())
            .map(|ch| {
                let a = self.invstd[ch] * gamma[ch];
                (a, beta[ch] - self.mean[ch] * a)
            })
            .unzip()
    }

    /// The backward pass of y = BN(x) (then ReLU where `relu` holds the forward's affine map):
    /// writes ∂L/∂x into `dx` and returns (∂L/∂γ, ∂L/∂β), from x, γ and ∂L/∂y.
    pub(crate) fn backward(
        &self,
        (x, gamma, dy): (&[f32], &[f32], &[f32]),
        (n, hw): (usize, usize),
        relu: Option<&(Vec<f32>, Vec<f32>)>,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let c = self.mean.len();
        let planes: Vec<PlaneSums> = dy
            .par_chunks(hw.max(1))
            .zip(x.par_chunks(hw.max(1)))
            .enumerate()
            .map(|(i, (dy, x))| {
                let relu = relu.map(|(a, b)| (a[i % c], b[i % c]));
                simd::widest(
                    #[inline(always)]
                    || self.plane_grad_sums(i % c, (dy, x), relu),
                )
            })
            .collect();
        self.backward_from_sums(&planes, (x, gamma, dy), (n, hw), relu, dx)
    }

    /// One plane's share (channel `ch` of one image) of Σ dy and Σ dy·x̂, as partial sums in
    /// [`LANES`] lanes; with `relu` = (a, b), dy is first let through where x·a + b ≥ 0 only.
    /// Exposed so a caller producing dy can add it up in the same pass (the residual block).
    #[inline(always)]
    pub(crate) fn plane_grad_sums(
        &self,
        ch: usize,
        (dy, x): (&[f32], &[f32]),
        relu: Option<(f32, f32)>,
    ) -> PlaneSums {
        let (mu, is) = (self.mean[ch], self.invstd[ch]);
        let out_grad = output_grad(relu);
        // The partial sums are locals here: captured by reference from a caller's frame they
        // stayed in memory, and the loop was not vectorised.
        let (mut sb, mut sg) = ([0f64; LANES], [0f64; LANES]);
        lane_sums(
            dy,
            x,
            |g, v| {
                let g = out_grad(g, v);
                (f64::from(g), f64::from(g) * f64::from((v - mu) * is))
            },
            (&mut sb, &mut sg),
        );
        [sb, sg]
    }

    /// [`backward`](Self::backward) from every plane's [`plane_grad_sums`](Self::plane_grad_sums)
    /// (NCHW order), which are added per channel image by image, a fixed order.
    pub(crate) fn backward_from_sums(
        &self,
        planes: &[PlaneSums],
        (x, gamma, dy): (&[f32], &[f32], &[f32]),
        (n, hw): (usize, usize),
        relu: Option<&(Vec<f32>, Vec<f32>)>,
        dx: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let c = self.mean.len();
        let (dbeta, dgamma): (Vec<f64>, Vec<f64>) = channel_totals(planes, c)
            .into_iter()
            .map(|[b, g]| (b, g))
            .unzip();
        let m = (n * hw) as f32;
        dx.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(i, dxo)| {
                let ch = i % c;
                let off = i * hw;
                let (mu, is) = (self.mean[ch], self.invstd[ch]);
                let k = gamma[ch] * is / m;
                let (db, dg) = (dbeta[ch] as f32, dgamma[ch] as f32);
                let out_grad = output_grad(relu.map(|(a, b)| (a[ch], b[ch])));
                // `move` (see `simd::widest`): by reference, this loop's AVX2 build was scalar,
                // 8 % of a `caf` training step under CAF_KERNELS=avx2.
                simd::widest(
                    #[inline(always)]
                    move || {
                        for ((o, &g), &v) in dxo
                            .iter_mut()
                            .zip(&dy[off..off + hw])
                            .zip(&x[off..off + hw])
                        {
                            *o = k * (m * out_grad(g, v) - db - (v - mu) * is * dg);
                        }
                    },
                )
            });
        let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (f(dgamma), f(dbeta))
    }
}

/// One plane's partial sums of Σ dy and Σ dy·x̂ (see [`BatchStats::plane_grad_sums`]).
pub(crate) type PlaneSums = [[f64; LANES]; 2];

/// The BatchNorm output's gradient as a function of (dy, x) for one channel: dy itself, or with
/// a fused ReLU of affine map (a, b), dy where the pre-activation x·a + b is ≥ 0 and 0 elsewhere
/// (NaN included), as the ReLU's own backward does.
#[inline(always)]
fn output_grad(relu: Option<(f32, f32)>) -> impl Fn(f32, f32) -> f32 {
    let (relu, a, b) = match relu {
        Some((a, b)) => (true, a, b),
        None => (false, 1.0, 0.0),
    };
    move |g: f32, v: f32| {
        if !relu || v * a + b >= 0.0 {
            g
        } else {
            0.0
        }
    }
}

/// Per-channel mean and biased variance of an NCHW buffer, in f64.
fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (s, s2) = simd::widest(
                #[inline(always)]
                || {
                    let (mut s, mut s2) = ([0f64; LANES], [0f64; LANES]);
                    for img in 0..n {
                        let plane = &x[(img * c + ch) * hw..][..hw];
                        lane_sums(
                            plane,
                            plane,
                            |v, _| {
                                let v = f64::from(v);
                                (v, v * v)
                            },
                            (&mut s, &mut s2),
                        );
                    }
                    (s, s2)
                },
            );
            let mean = lanes_total(s) / m;
            (mean, (lanes_total(s2) / m - mean * mean).max(0.0))
        })
        .unzip()
}

/// y = (x − μ)·invstd·γ + β with the batch statistics fixed in the op; then max(y, 0) if
/// `relu`.
struct BnTrain {
    stats: BatchStats,
    n: usize,
    c: usize,
    hw: usize,
    relu: bool,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "caf-batch-norm-train"
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
        let x = f32_slice(s1, l1, "batch norm input")?;
        let gamma = f32_slice(s2, l2, "batch norm γ")?;
        let beta = f32_slice(s3, l3, "batch norm β")?;
        let (a, b) = self.stats.affine(gamma, beta);
        let y = super::pointwise::channel_affine(x, self.hw, &a, &b, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let relu = if self.relu {
            Some(self.stats.affine(&gamma.to_vec1()?, &beta.to_vec1()?))
        } else {
            None
        };
        let grads = x.apply_op3_no_bwd(gamma, &dy, &BnBackward { op: self, relu })?;
        let len = self.n * self.c * self.hw;
        let dx = grads.narrow(0, 0, len)?.reshape(x.shape())?;
        let dgamma = grads.narrow(0, len, self.c)?;
        let dbeta = grads.narrow(0, len + self.c, self.c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// (x, γ, dy) → [dx (flattened) | dγ | dβ] in one buffer (a custom op has one output).
struct BnBackward<'a> {
    /// The forward op, with the batch statistics and the shape.
    op: &'a BnTrain,
    /// For a BatchNorm fused with a ReLU, the forward's per-channel affine map (a, b): dy is
    /// the ReLU's output gradient, let through where x·a + b ≥ 0.
    relu: Option<(Vec<f32>, Vec<f32>)>,
}

impl CustomOp3 for BnBackward<'_> {
    fn name(&self) -> &'static str {
        "caf-batch-norm-train-backward"
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
        let x = f32_slice(s1, l1, "batch norm input")?;
        let gamma = f32_slice(s2, l2, "batch norm γ")?;
        let dy = f32_slice(s3, l3, "batch norm output gradient")?;
        let BnTrain { n, c, hw, .. } = *self.op;
        let mut out = super::pointwise::unfilled(n * c * hw + 2 * c);
        let (dx, tail) = out.split_at_mut(n * c * hw);
        let (dgamma, dbeta) =
            self.op
                .stats
                .backward((x, gamma, dy), (n, hw), self.relu.as_ref(), dx);
        tail[..c].copy_from_slice(&dgamma);
        tail[c..].copy_from_slice(&dbeta);
        Ok((CpuStorage::F32(out), Shape::from(n * c * hw + 2 * c)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, ModuleT};
    use candle_nn::{BatchNormConfig, VarBuilder, VarMap};

    use super::*;

    fn bn(varmap: &VarMap, c: usize) -> BatchNorm {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let cfg = BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        candle_nn::batch_norm(c, cfg, vb).expect("batch norm")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("same shapes")
    }

    #[test]
    fn matches_candle_nn_in_values_running_statistics_and_gradients() {
        let (n, c, h, w) = (5, 3, 4, 6);
        let x0 = (Tensor::randn(0f32, 1f32, (n, c, h, w), &Device::Cpu).expect("x") * 3.0)
            .and_then(|t| t + 1.5)
            .expect("x");
        let r = Tensor::randn(0f32, 1f32, (n, c, h, w), &Device::Cpu).expect("r");
        let run = |fused: bool| {
            let varmap = VarMap::new();
            let layer = bn(&varmap, c);
            // Non-trivial γ, β and running statistics.
            let (g, b) = layer.weight_and_bias().expect("affine");
            Var::from_tensor(g)
                .and_then(|v| v.set(&Tensor::new(&[0.5f32, 2.0, -1.0], &Device::Cpu)?))
                .expect("γ");
            Var::from_tensor(b)
                .and_then(|v| v.set(&Tensor::new(&[0.1f32, -0.3, 0.7], &Device::Cpu)?))
                .expect("β");
            let x = Var::from_tensor(&x0).expect("x var");
            let y = if fused {
                forward_train(&layer, x.as_tensor()).expect("fused")
            } else {
                layer.forward_t(x.as_tensor(), true).expect("candle")
            };
            let grads = (&y * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let gx = grads.get(x.as_tensor()).expect("dx").clone();
            let gg = grads.get(g).expect("dγ").clone();
            let gb = grads.get(b).expect("dβ").clone();
            (
                y,
                gx,
                gg,
                gb,
                layer.running_mean().clone(),
                layer.running_var().clone(),
            )
        };
        let a = run(true);
        let b = run(false);
        assert!(max_diff(&a.0, &b.0) < 1e-4, "output");
        assert!(max_diff(&a.1, &b.1) < 1e-4, "dx {}", max_diff(&a.1, &b.1));
        assert!(max_diff(&a.2, &b.2) < 1e-3, "dγ {}", max_diff(&a.2, &b.2));
        assert!(max_diff(&a.3, &b.3) < 1e-3, "dβ");
        assert!(max_diff(&a.4, &b.4) < 1e-5, "running mean");
        assert!(max_diff(&a.5, &b.5) < 1e-4, "running var");
    }

    /// The fused BatchNorm + ReLU gives relu(forward_train) exactly, values and the gradients of
    /// x, γ and β, including a channel whose pre-activations are all exactly 0 (γ = β = 0: the
    /// gradient passes, as candle's ReLU lets it through at 0) and one the ReLU zeroes.
    #[test]
    fn the_fused_relu_gives_relu_of_batch_norm_exactly() {
        let (n, c, h, w) = (6, 4, 5, 7);
        let x0 = (Tensor::randn(0f32, 1f32, (n, c, h, w), &Device::Cpu).expect("x") * 2.0)
            .and_then(|t| t - 0.5)
            .expect("x");
        let r = Tensor::randn(0f32, 1f32, (n, c, h, w), &Device::Cpu).expect("r");
        let run = |fused: bool| {
            let varmap = VarMap::new();
            let layer = bn(&varmap, c);
            let (g, b) = layer.weight_and_bias().expect("affine");
            Var::from_tensor(g)
                .and_then(|v| v.set(&Tensor::new(&[0.5f32, 0.0, -1.5, 0.1], &Device::Cpu)?))
                .expect("γ");
            Var::from_tensor(b)
                .and_then(|v| v.set(&Tensor::new(&[0.1f32, 0.0, 0.3, -9.0], &Device::Cpu)?))
                .expect("β");
            let x = Var::from_tensor(&x0).expect("x var");
            let y = if fused {
                forward_train_relu(&layer, x.as_tensor()).expect("fused")
            } else {
                forward_train(&layer, x.as_tensor())
                    .and_then(|t| super::super::relu::relu(&t))
                    .expect("unfused")
            };
            let grads = (&y * &r)
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let v = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
            let gx = v(grads.get(x.as_tensor()).expect("dx"));
            (
                v(&y),
                gx,
                v(grads.get(g).expect("dγ")),
                v(grads.get(b).expect("dβ")),
            )
        };
        let (fused, unfused) = (run(true), run(false));
        assert_eq!(fused, unfused);
        let (y, gx, _, gb) = fused;
        let plane = h * w;
        let channel = |v: &[f32], ch: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|i| v[(i * c + ch) * plane..][..plane].to_vec())
                .collect()
        };
        assert!(channel(&y, 1).iter().all(|&v| v == 0.0), "γ = β = 0");
        assert!(channel(&gx, 3).iter().all(|&v| v == 0.0), "all masked");
        assert_ne!(gb[1], 0.0, "exact zeros let the gradient through");
        assert_eq!(gb[3], 0.0, "a fully masked channel has no dβ");
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count() {
        let x = Tensor::randn(0f32, 1f32, (9, 4, 5, 5), &Device::Cpu).expect("x");
        let out = |threads: usize| -> Vec<f32> {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| {
                    let varmap = VarMap::new();
                    let layer = bn(&varmap, 4);
                    let xv = Var::from_tensor(&x).expect("var");
                    let y = forward_train(&layer, xv.as_tensor()).expect("bn");
                    let g = y
                        .sqr()
                        .and_then(|t| t.sum_all())
                        .and_then(|l| l.backward())
                        .expect("bwd");
                    let mut v: Vec<f32> = g
                        .get(xv.as_tensor())
                        .expect("dx")
                        .flatten_all()
                        .and_then(|t| t.to_vec1())
                        .expect("vec");
                    v.extend(layer.running_var().to_vec1::<f32>().expect("rv"));
                    v
                })
        };
        assert_eq!(out(1), out(3));
    }
}
