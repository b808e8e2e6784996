//! The CIFAR ResNets' option-A shortcut (`x[:, :, ::2, ::2]`, then `pad` zero channels on each
//! side) as one differentiable op.
//!
//! Why: candle builds it from a reshape, two narrows, a copy and a zero-padding concatenation,
//! and its backward runs each of those in reverse, plus a zeroed accumulator and an add per
//! node, all on the calling thread while rayon's workers wait (a ResNet-20 `rs` step kept only
//! 1.52 of its 2 cores busy). Here the forward and the backward are one parallel pass each.
//! Both only copy values and write zeros, so they equal candle's ops exactly.
//!
//! Other devices and dtypes run candle's ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::f32_slice;
use super::pointwise::unfilled;

/// `x[:, :, ::2, ::2]` of an NCHW x, then `pad` zero channels before and after.
pub(crate) fn option_a(x: &Tensor, pad: usize) -> Result<Tensor> {
    let fused = super::path::fused(x.device()) && x.dtype() == DType::F32 && x.rank() == 4;
    if fused {
        x.contiguous()?.apply_op1(OptionA { pad })
    } else {
        with_candle_ops(x, pad)
    }
}

/// [`option_a`] in candle's ops.
fn with_candle_ops(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    // Pad odd sizes by one so the pairs line up; the padding is never selected.
    let x = if h % 2 == 1 {
        x.pad_with_zeros(2, 0, 1)?
    } else {
        x.clone()
    };
    let x = if w % 2 == 1 {
        x.pad_with_zeros(3, 0, 1)?
    } else {
        x
    };
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    let sub = x
        .reshape((b, c, h2, 2, w2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h2, w2))?;
    sub.pad_with_zeros(1, pad, pad)
}

/// One plane's `[::2, ::2]`: `dst` (⌈h/2⌉ × ⌈w/2⌉) from `src` (h × w). Also the fused eval
/// path's shortcut (`resnet_eval`).
pub(crate) fn subsample_plane(src: &[f32], (h, w): (usize, usize), dst: &mut [f32]) {
    let w2 = w.div_ceil(2);
    for (row, s) in dst.chunks_exact_mut(w2).zip(src[..h * w].chunks(2 * w)) {
        for (v, &x) in row.iter_mut().zip(s[..w].iter().step_by(2)) {
            *v = x;
        }
    }
}

struct OptionA {
    pad: usize,
}

impl CustomOp1 for OptionA {
    fn name(&self) -> &'static str {
        "caf-shortcut-a"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "shortcut input")?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (co, h2, w2) = (c + 2 * self.pad, h.div_ceil(2), w.div_ceil(2));
        if x.is_empty() {
            // No input channels (or no images): only the zero padding, if anything.
            let y = vec![0f32; n * co * h2 * w2];
            return Ok((CpuStorage::F32(y), Shape::from((n, co, h2, w2))));
        }
        let mut y = unfilled(n * co * h2 * w2);
        y.par_chunks_mut(co * h2 * w2)
            .zip(x.par_chunks(c * h * w))
            .for_each(|(yi, xi)| {
                for (oc, plane) in yi.chunks_exact_mut(h2 * w2).enumerate() {
                    match oc.checked_sub(self.pad).filter(|&ic| ic < c) {
                        Some(ic) => subsample_plane(&xi[ic * h * w..], (h, w), plane),
                        None => plane.fill(0.0),
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, co, h2, w2))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let op = OptionAGrad {
            pad: self.pad,
            h,
            w,
        };
        Ok(Some(grad_y.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// dy [n, c + 2·pad, ⌈h/2⌉, ⌈w/2⌉] ↦ dx [n, c, h, w]: each selected value's gradient in its
/// place, zeros elsewhere.
struct OptionAGrad {
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for OptionAGrad {
    fn name(&self) -> &'static str {
        "caf-shortcut-a-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gy = f32_slice(s, l, "shortcut output gradient")?;
        let (h, w) = (self.h, self.w);
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let (n, co) = match l.dims() {
            &[n, co, a, b] if a == h2 && b == w2 && co >= 2 * self.pad => (n, co),
            d => candle_core::bail!("option-A shortcut gradient of shape {d:?} for {h}×{w}"),
        };
        let c = co - 2 * self.pad;
        let mut gx = unfilled(n * c * h * w);
        if !gx.is_empty() {
            gx.par_chunks_mut(c * h * w)
                .zip(gy.par_chunks(co * h2 * w2))
                .for_each(|(gxi, gyi)| {
                    for (ic, plane) in gxi.chunks_exact_mut(h * w).enumerate() {
                        let src = &gyi[(ic + self.pad) * h2 * w2..][..h2 * w2];
                        for (i, row) in plane.chunks_exact_mut(w).enumerate() {
                            if i % 2 == 1 {
                                row.fill(0.0);
                                continue;
                            }
                            let s = &src[i / 2 * w2..][..w2];
                            for (j, v) in row.iter_mut().enumerate() {
                                *v = if j % 2 == 0 { s[j / 2] } else { 0.0 };
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(gx), Shape::from((n, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Forward values and input gradients equal candle's ops bit for bit, even and odd sizes.
    #[test]
    fn equals_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for (n, c, h, w, pad) in [
            (2, 4, 8, 8, 2),
            (3, 2, 5, 7, 1),
            (1, 3, 1, 1, 0),
            (2, 1, 6, 3, 3),
        ] {
            let len = n * c * h * w;
            let vals: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let x = Var::from_vec(vals, (n, c, h, w), &dev).unwrap();
            let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
            let r_len = n * (c + 2 * pad) * h2 * w2;
            let r: Vec<f32> = (0..r_len).map(|i| (i as f32 * 0.11).cos()).collect();
            let r = Tensor::from_vec(r, (n, c + 2 * pad, h2, w2), &dev).unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor()).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                (
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    gx.to_vec1::<f32>().unwrap(),
                    y.dims().to_vec(),
                )
            };
            let fused = run(&|x| x.contiguous()?.apply_op1(OptionA { pad }));
            let candle = run(&|x| with_candle_ops(x, pad));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(fused.2, candle.2, "shape, {n}×{c}×{h}×{w} pad {pad}");
            assert_eq!(bits(&fused.0), bits(&candle.0), "values, {h}×{w}");
            assert_eq!(bits(&fused.1), bits(&candle.1), "gradients, {h}×{w}");
        }
    }

    #[test]
    fn a_gradient_of_the_wrong_shape_is_an_error() {
        let dev = Device::Cpu;
        let gy = Tensor::zeros((1, 2, 3, 3), DType::F32, &dev).unwrap();
        let op = OptionAGrad { pad: 1, h: 8, w: 8 };
        assert!(gy.apply_op1_no_bwd(&op).is_err());
    }
}
