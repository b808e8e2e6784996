//! A per-channel shift of NCHW activations, optionally followed by ReLU, as one differentiable
//! op: an eval-mode convolution's folded BatchNorm (`ConvBn::forward_t` with `train = false`)
//! when gradients flow through a frozen network, as in denoised smoothing (the denoiser learns
//! through the frozen classifier) and attacks on a smoothed classifier.
//!
//! Why: candle computes `relu(x.broadcast_add(shift))` as two passes forward and, backward, a
//! ReLU mask pass plus a gradient accumulation (a zeroed buffer and an add) for the sum, each a
//! full pass over the activation; in the `denoised` training step the frozen ResNet-20 ran them
//! after every convolution. Here the forward is one pass and the backward one masked pass, the
//! ReLU mask recomputed from x and the shift with the forward's f32 expression, so values and
//! gradients equal candle's ops exactly. The shift's own gradient (a per-channel sum, computed
//! only when the shift is tracked) is summed per channel in a fixed order, so it does not depend
//! on the thread count.
//!
//! Other devices and dtypes fall back to candle's own ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::f32_slice;
use super::lanes::{channel_totals, lane_sums, LANES};
use super::simd;

/// `x + shift` (shift broadcast over the channels of an NCHW x), then ReLU if `relu`.
pub fn shift(x: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let fused = super::path::fused(x.device())
        && x.dtype() == DType::F32
        && shift.dtype() == DType::F32
        && x.rank() == 4;
    if !fused {
        let c = shift.dim(0)?;
        let y = x.broadcast_add(&shift.reshape((1, c, 1, 1))?)?;
        return if relu { super::relu::relu(&y) } else { Ok(y) };
    }
    let (_, c, _, _) = x.dims4()?;
    if shift.dims() != [c] {
        candle_core::bail!(
            "channel shift {:?} does not match the {c} channels of {:?}",
            shift.dims(),
            x.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&shift.contiguous()?, ShiftOp { relu })
}

/// The (n, c, h·w) of an NCHW layout.
fn nc_plane(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        [n, c, h, w] => Ok((*n, *c, h * w)),
        d => candle_core::bail!("channel shift: expected an NCHW tensor, got {d:?}"),
    }
}

/// y = x + s[c], then max(y, 0) if `relu`.
struct ShiftOp {
    relu: bool,
}

impl CustomOp2 for ShiftOp {
    fn name(&self) -> &'static str {
        "caf-channel-shift"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "channel shift input")?;
        let s = f32_slice(s2, l2, "channel shift")?;
        let (_, c, plane) = nc_plane(l1)?;
        if s.len() != c {
            candle_core::bail!("channel shift of {} values for {c} channels", s.len());
        }
        let y = super::pointwise::channel_affine(x, plane, &vec![1.0; c], s, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The gradient of the sum, before the ReLU: dy itself without one.
        let g = if self.relu {
            grad_y
                .contiguous()?
                .apply_op3_no_bwd(x, s, &ShiftReluGradOp)?
        } else {
            grad_y.clone()
        };
        let gs = if s.track_op() {
            Some(g.contiguous()?.apply_op1_no_bwd(&ChannelSumOp)?)
        } else {
            None
        };
        Ok((x.track_op().then_some(g), gs))
    }
}

/// (dy, x, s) ↦ dy where x + s[c] ≥ 0, else 0 (NaN included), as ReLU's own backward.
struct ShiftReluGradOp;

impl CustomOp3 for ShiftReluGradOp {
    fn name(&self) -> &'static str {
        "caf-channel-shift-relu-grad"
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
        let g = f32_slice(s1, l1, "channel shift output gradient")?;
        let x = f32_slice(s2, l2, "channel shift input")?;
        let s = f32_slice(s3, l3, "channel shift")?;
        let (_, c, plane) = nc_plane(l2)?;
        if g.len() != x.len() {
            candle_core::bail!(
                "channel shift gradient {:?} does not match its input",
                l1.dims()
            );
        }
        let mut gx = super::pointwise::unfilled(g.len());
        gx.par_chunks_mut(plane.max(1))
            .zip(g.par_chunks(plane.max(1)).zip(x.par_chunks(plane.max(1))))
            .enumerate()
            .for_each(|(i, (o, (gi, xi)))| {
                let b = s[i % c];
                for ((o, &g), &v) in o.iter_mut().zip(gi).zip(xi) {
                    *o = if v + b >= 0.0 { g } else { 0.0 };
                }
            });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}

/// Σ over images and pixels of an NCHW tensor, per channel, in f64 in a fixed order.
struct ChannelSumOp;

impl candle_core::CustomOp1 for ChannelSumOp {
    fn name(&self) -> &'static str {
        "caf-channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "channel shift gradient")?;
        let (n, c, plane) = nc_plane(l)?;
        let sums = channel_sums(g, (n, c, plane));
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// Σ over images and pixels of each channel of an NCHW buffer, in f64 and a fixed order (the
/// shift's gradient): each plane in [`LANES`] partial sums, in parallel and in the CPU's widest
/// vectors, then the planes of a channel image by image.
pub(crate) fn channel_sums(g: &[f32], (n, c, plane): (usize, usize, usize)) -> Vec<f32> {
    let planes: Vec<[[f64; LANES]; 1]> = g[..n * c * plane]
        .par_chunks(plane.max(1))
        .map(|p| {
            simd::widest(
                #[inline(always)]
                || {
                    let (mut s, mut unused) = ([0f64; LANES], [0f64; LANES]);
                    lane_sums(p, p, |v, _| (f64::from(v), 0.0), (&mut s, &mut unused));
                    [s]
                },
            )
        })
        .collect();
    channel_totals(&planes, c)
        .into_iter()
        .map(|[s]| s as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and the gradients of x and the shift equal candle's broadcast add (and ReLU), with
    /// and without the ReLU, including sums that are exactly 0 and a frozen shift (no gradient
    /// asked for); the shift's gradient matches candle's to rounding (its sum runs in f64).
    #[test]
    fn matches_candles_broadcast_add_and_relu() {
        let (n, c, h, w) = (5, 3, 4, 6);
        let len = n * c * h * w;
        let s0 = [0.5f32, -0.25, 1.5];
        // Every fourth value of channel 1 is exactly −shift, so x + s = 0 there.
        let xs: Vec<f32> = (0..len)
            .map(|i| match ((i / (h * w)) % c, i % 4) {
                (1, 0) => 0.25,
                _ => ((i * 29) % 23) as f32 * 0.2 - 2.0,
            })
            .collect();
        let r = Tensor::randn(0f32, 1f32, (n, c, h, w), &Device::Cpu).unwrap();
        for relu in [false, true] {
            for frozen_shift in [false, true] {
                let run = |fused: bool| {
                    let x = Var::from_vec(xs.clone(), (n, c, h, w), &Device::Cpu).unwrap();
                    let sv = Var::from_slice(&s0, c, &Device::Cpu).unwrap();
                    let st = if frozen_shift {
                        sv.as_tensor().detach()
                    } else {
                        sv.as_tensor().clone()
                    };
                    let y = if fused {
                        shift(x.as_tensor(), &st, relu).unwrap()
                    } else {
                        let y = x
                            .as_tensor()
                            .broadcast_add(&st.reshape((1, c, 1, 1)).unwrap())
                            .unwrap();
                        if relu {
                            y.relu().unwrap()
                        } else {
                            y
                        }
                    };
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let gs = g.get(sv.as_tensor()).map(v);
                    (v(&y), v(g.get(x.as_tensor()).unwrap()), gs)
                };
                let (ours, theirs) = (run(true), run(false));
                assert_eq!(ours.0, theirs.0, "values, relu {relu}");
                assert_eq!(ours.1, theirs.1, "x gradient, relu {relu}");
                match (ours.2, theirs.2) {
                    (None, None) => assert!(frozen_shift),
                    (Some(a), Some(b)) => {
                        assert!(!frozen_shift);
                        for (a, b) in a.iter().zip(&b) {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                        }
                    }
                    other => panic!("shift gradient mismatch: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_shift_of_the_wrong_width_is_refused() {
        let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let s = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let e = shift(&x, &s, true).unwrap_err().to_string();
        assert!(e.contains("does not match the 3 channels"), "{e}");
    }
}
