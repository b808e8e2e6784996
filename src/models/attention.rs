//! A ViT block's multi-head self-attention in bf16, without autograd, on the fused CPU path
//! (`precision: bf16`).
//!
//! Why: with the linear layers on bf16 kernels, the two attention products left in f32 took a
//! fifth of a ViT-B/16's bf16 forward pass (`perf`, AMX Xeon), for 4 % of its FLOPs: candle runs
//! them as 2·B·H small GEMMs (k = 64, or 197 rows by 64 columns) after a permuted copy of q, k
//! and v, with a softmax that calls a scalar `expf` per score (another 8 %). Here each image's
//! heads are read in place from the qkv layer's output rows, both products run on the bf16
//! kernels of [`Bf16Linear`] (both operands rounded to bf16, f32 sums; the same arithmetic as
//! the linear layers'), the softmax is one vectorised pass in f32, and each head's output is
//! written straight into the [B, N, D] rows the projection reads.
//!
//! The classifier this computes: per head, S = bf16(q·s)·bf16(k)ᵀ with s = 1/√head_dim and f32
//! sums; P = softmax(S) in f32 (the exponential of `gelu`'s `exp_nonpositive`, the sum in 16
//! fixed lanes); O = bf16(P)·bf16(v) with f32 sums. The same bits at every SIMD level; the
//! three bf16 kernels differ only in summation order, as for the linear layers.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bf16_linear::Bf16Linear;
use super::conv::f32_slice;
use super::gelu::exp_nonpositive;

/// Whether [`attention_bf16`] computes this block's attention: the CPU's fused path, f32
/// activations, nothing recorded for autograd.
pub(crate) fn fused_bf16(qkv: &Tensor) -> bool {
    super::path::fused(qkv.device()) && qkv.dtype() == DType::F32 && !qkv.track_op()
}

/// `qkv` [B, N, 3·D] (the qkv layer's output: q, k, v of head h in columns h·hd.., D + h·hd..,
/// 2·D + h·hd..) ↦ the heads' outputs [B, N, D] (head h in columns h·hd..), hd = D / heads.
pub(crate) fn attention_bf16(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&AttentionBf16 { heads })
}

struct AttentionBf16 {
    heads: usize,
}

impl CustomOp1 for AttentionBf16 {
    fn name(&self) -> &'static str {
        "caf-attention-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "attention input")?;
        let (b, n, d3) = l.shape().dims3()?;
        let d = d3 / 3;
        if d3 % 3 != 0 || self.heads == 0 || d % self.heads != 0 {
            candle_core::bail!(
                "attention: qkv width {d3} is not 3 × a multiple of {} heads",
                self.heads
            );
        }
        // Every value is written: each head fills its columns of every row.
        let mut out = super::pointwise::unfilled(b * n * d);
        if n > 0 && d > 0 {
            out.par_chunks_mut(n * d)
                .zip(x.par_chunks(n * d3))
                .for_each_init(Scratch::default, |scratch, (o, x)| {
                    image(x, n, d, self.heads, scratch, o)
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, n, d))))
    }
}

/// One head's operands and products, reused across heads and images of a thread.
#[derive(Default)]
struct Scratch {
    /// q·s [N, hd].
    q: Vec<f32>,
    /// k [N, hd].
    k: Vec<f32>,
    /// v [N, hd].
    v: Vec<f32>,
    /// Scores, then probabilities [N, N].
    p: Vec<f32>,
    /// P·v [N, hd].
    o: Vec<f32>,
}

/// Attention of one image: `x` [N, 3·D] ↦ `out` [N, D].
fn image(x: &[f32], n: usize, d: usize, heads: usize, s: &mut Scratch, out: &mut [f32]) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for h in 0..heads {
        s.q.clear();
        s.k.clear();
        s.v.clear();
        for row in x.chunks_exact(3 * d) {
            s.q.extend(row[h * hd..][..hd].iter().map(|&v| v * scale));
            s.k.extend_from_slice(&row[d + h * hd..][..hd]);
            s.v.extend_from_slice(&row[2 * d + h * hd..][..hd]);
        }
        // The key matrix is the right operand of q·kᵀ: a "weight" of N outputs over hd inputs.
        s.p.clear();
        s.p.resize(n * n, 0.0);
        Bf16Linear::new(&s.k, n, hd).accumulate(n, &s.q, &mut s.p);
        // A `for` loop: an iterator adapter's `fold` is not inlined, and out of line it keeps
        // the baseline (SSE2) build.
        super::simd::widest(
            #[inline(always)]
            || {
                for row in s.p.chunks_exact_mut(n) {
                    softmax(row)
                }
            },
        );
        s.o.clear();
        s.o.resize(n * hd, 0.0);
        Bf16Linear::from_right(&s.v, n, hd).accumulate(n, &s.p, &mut s.o);
        for (dst, src) in out.chunks_exact_mut(d).zip(s.o.chunks_exact(hd)) {
            dst[h * hd..][..hd].copy_from_slice(src);
        }
    }
}

/// Partial sums of the softmax's denominator: independent additions the compiler can keep in
/// one vector register, in a fixed order (the same bits at every SIMD level).
const LANES: usize = 16;

/// `row` ↦ softmax(row) in place: e^(x − max) / Σ e^(x − max).
#[inline(always)]
fn softmax(row: &mut [f32]) {
    // The maximum in lanes too: a running `f32::max` is a chain of scalar compares (its NaN
    // rule keeps the compiler from reordering it).
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in maxes.iter_mut().zip(chunks.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    let max = maxes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (v, l) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *v = exp_nonpositive(*v - max);
            *l += *v;
        }
    }
    for (v, l) in chunks.into_remainder().iter_mut().zip(lanes.iter_mut()) {
        *v = exp_nonpositive(*v - max);
        *l += *v;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
    }
    let inv = 1.0 / lanes[0];
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gemm::round_bf16;
    use crate::models::gemm::tests::random;
    use crate::models::simd;

    /// Exact attention of `x` [N, 3·D] (f64 from the f32 values, no rounding): [N, D].
    fn attention_f64(x: &[f32], n: usize, d: usize, heads: usize) -> Vec<f64> {
        let hd = d / heads;
        let at = |i: usize, c: usize| x[i * 3 * d + c] as f64;
        let mut out = vec![0f64; n * d];
        for h in 0..heads {
            for i in 0..n {
                let scores: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|c| at(i, h * hd + c) * at(j, d + h * hd + c))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..hd {
                    out[i * d + h * hd + c] =
                        (0..n).map(|j| e[j] / sum * at(j, 2 * d + h * hd + c)).sum();
                }
            }
        }
        out
    }

    /// The fused bf16 attention against exact attention, for shapes with a partial tile
    /// everywhere (N = 1, 17, 65 tokens; head widths 8 and 64 with 1, 3 and 2 heads; 2 images):
    /// every output within bf16's rounding of the operands (a misplaced head, column or token
    /// would be off by the values' own size), and no output exact to f32 (the operands were
    /// rounded). The kernel is the one this process uses: `.ci/run` runs the tests again under
    /// CAF_KERNELS=avx512 and portable.
    #[test]
    fn bf16_attention_is_attention_within_bf16_rounding() {
        for &(b, n, d, heads) in &[(1, 1, 8, 1), (2, 17, 24, 3), (1, 65, 128, 2)] {
            let x = random(b * n * 3 * d, (n + d) as u64);
            let qkv =
                Tensor::from_vec(x.clone(), (b, n, 3 * d), &candle_core::Device::Cpu).expect("qkv");
            assert!(fused_bf16(&qkv));
            let got = attention_bf16(&qkv, heads).expect("attention");
            assert_eq!(got.dims(), [b, n, d]);
            let got = got
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            let mut worst = 0f64;
            for i in 0..b {
                let want = attention_f64(&x[i * n * 3 * d..][..n * 3 * d], n, d, heads);
                for (g, w) in got[i * n * d..][..n * d].iter().zip(&want) {
                    worst = worst.max((*g as f64 - w).abs());
                }
            }
            // Values in [-1, 1): a rounded operand is off by at most 2^-9 of itself; the worst
            // output here is off by 1.6e-3.
            assert!(worst < 5e-3, "({b},{n},{d},{heads}): off by {worst}");
            assert!(
                n == 1 || worst > 1e-6,
                "({b},{n},{d},{heads}): nothing was rounded"
            );
        }
        let bad = Tensor::zeros((1, 2, 10), DType::F32, &candle_core::Device::Cpu).expect("x");
        assert!(
            attention_bf16(&bad, 2).is_err(),
            "a width that is not 3 × D"
        );
    }

    /// The softmax: within 1e-6 of f64's, rows sum to 1, a row of equal scores is uniform, and
    /// the same bits at every SIMD level this CPU has.
    #[test]
    fn softmax_is_accurate_and_the_same_at_every_level() {
        let scores: Vec<f32> = random(197, 7).iter().map(|v| 30.0 * v).collect();
        let mut reference = None;
        for level in simd::simd_levels_here() {
            let mut row = scores.clone();
            simd::with(level, || softmax(&mut row));
            match &reference {
                None => reference = Some(row),
                Some(r) => assert!(
                    r.iter().zip(&row).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{level:?} differs"
                ),
            }
        }
        let row = reference.expect("at least the portable level");
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = scores.iter().map(|&s| (s as f64 - max).exp()).sum();
        for (&p, &s) in row.iter().zip(&scores) {
            let want = (s as f64 - max).exp() / sum;
            assert!(
                (p as f64 - want).abs() <= 1e-6 * want + 1e-12,
                "{p} vs {want}"
            );
        }
        assert!((row.iter().map(|&p| p as f64).sum::<f64>() - 1.0).abs() < 1e-5);
        let mut flat = vec![round_bf16(0.3); 5];
        softmax(&mut flat);
        assert!(flat.iter().all(|&p| (p - 0.2).abs() < 1e-7), "{flat:?}");
    }
}
