//! A CIFAR ResNet basic block, relu(BN₂(conv₂(relu(BN₁(conv₁ x)))) + shortcut(x)), as one
//! autograd op over (x, its parameters as one flat tensor): in train mode (batch statistics)
//! and in eval mode (BatchNorm folded into the convolutions, as when a denoiser or an attack
//! takes gradients through a frozen classifier).
//!
//! Why: chained as separate ops, a block is six nodes of candle's graph holding activations
//! (conv₁ out, BN₁+ReLU out, conv₂ out, BN₂ out, the shortcut, the block output), and candle's
//! backward gives each such node a gradient accumulator: a zeroed tensor of its size plus an
//! add per incoming gradient, run on the calling thread alone. In a ResNet-20 `rs` step that
//! serial work was about a tenth of the CPU time and kept one of two cores idle while it ran.
//! As one op, the block's only node is its output; its backward runs the same kernels as the
//! separate ops (`conv`, `bn`, `channel`, the option-A shortcut's subsampling) in the same
//! order, so values, running statistics and gradients equal the chained ops' bit for bit.
//!
//! The activations the backward needs (conv₁ out, BN₁+ReLU out, conv₂ out) are kept in the op
//! itself, which candle's graph holds exactly as long as it held those tensors.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use candle_nn::BatchNorm;
use rayon::prelude::*;

use super::bn::{BatchStats, PlaneSums};
use super::channel::channel_sums;
use super::conv::{self, f32_slice, Geom};
use super::convbn::ConvBn;
use super::direct;
use super::lanes::LANES;
use super::pointwise::{channel_affine, unfilled, CHUNK};
use super::simd;

/// The block on `x` ([n, c_in, h, w], f32 on the CPU, affine BatchNorms, 3×3 kernels); in train
/// mode it updates both BatchNorms' running statistics. `None` when the block does not fit the
/// fused op (the caller then chains the separate ops).
pub(crate) fn forward(
    x: &Tensor,
    layers: (&ConvBn, &ConvBn),
    shortcut_pad: Option<usize>,
    train: bool,
) -> Result<Option<Tensor>> {
    if !takes(x) {
        return Ok(None);
    }
    let Some(mut block) = Prepared::new(x.dims4()?, layers, shortcut_pad, train)? else {
        return Ok(None);
    };
    block.op.keep = x.track_op() || block.params.track_op();
    let saved = block.op.saved.clone();
    let y = x.contiguous()?.apply_op2(&block.params, block.op)?;
    if train {
        update_running(&saved, block.norms)?;
    }
    Ok(Some(y))
}

/// Whether the fused ops take an input like `x` (f32, [n, c, h, w], on the fused CPU path).
pub(super) fn takes(x: &Tensor) -> bool {
    super::path::fused(x.device()) && x.dtype() == DType::F32 && x.rank() == 4
}

/// A block ready for the fused op, on an input of known dimensions.
pub(super) struct Prepared<'a> {
    pub(super) op: BlockOp,
    /// The block's parameters as one flat tensor, in the op's order.
    pub(super) params: Tensor,
    /// The BatchNorms whose running statistics a train-mode forward updates.
    pub(super) norms: (&'a BatchNorm, &'a BatchNorm),
}

impl<'a> Prepared<'a> {
    /// The op for the block on an input [n, c_in, h, w], with `keep` unset; `None` when the
    /// block does not fit it.
    pub(super) fn new(
        (n, c_in, h, w): (usize, usize, usize, usize),
        (a, b): (&'a ConvBn, &'a ConvBn),
        shortcut_pad: Option<usize>,
        train: bool,
    ) -> Result<Option<Self>> {
        let ((wa, bn_a, stride), (wb, bn_b, stride_b)) = (a.parts(), b.parts());
        let (Some((g1, be1)), Some((g2, be2))) = (bn_a.weight_and_bias(), bn_b.weight_and_bias())
        else {
            return Ok(None);
        };
        let f32s = [wa, wb, g1, be1, g2, be2]
            .iter()
            .all(|t| t.dtype() == DType::F32);
        if !f32s || stride_b != 1 {
            return Ok(None);
        }
        let (planes, wc_in, k1, k1b) = wa.dims4()?;
        let (planes2, wc_in2, k2, k2b) = wb.dims4()?;
        let square3 = [k1, k1b, k2, k2b].iter().all(|&k| k == 3);
        let conv1 = Geom::same_padding(c_in, (h, w), 3, stride.max(1));
        let (h1, w1) = conv1.out_hw();
        let short_ok = match shortcut_pad {
            None => c_in == planes && stride == 1,
            Some(pad) => {
                stride == 2
                    && c_in + 2 * pad == planes
                    && (h1, w1) == (h.div_ceil(2), w.div_ceil(2))
            }
        };
        if !square3 || wc_in != c_in || planes2 != planes || wc_in2 != planes || !short_ok {
            return Ok(None);
        }
        if train && n * h1 * w1 < 2 {
            candle_core::bail!(
                "batch norm: input {:?} has one value per channel",
                [n, c_in, h, w]
            );
        }
        let (params, norm) = if train {
            let flat = [wa.flatten_all()?, g1.clone(), be1.clone()];
            let flat_b = [wb.flatten_all()?, g2.clone(), be2.clone()];
            let params = Tensor::cat(&[flat, flat_b].concat(), 0)?;
            (params, Norm::Batch([bn_a.eps(), bn_b.eps()]))
        } else {
            let ((fa, sa), (fb, sb)) = (a.folded()?, b.folded()?);
            let params = Tensor::cat(&[fa.flatten_all()?, sa, fb.flatten_all()?, sb], 0)?;
            (params, Norm::Folded)
        };
        let conv2 = Geom::same_padding(planes, (h1, w1), 3, 1);
        let op = BlockOp {
            n,
            planes,
            conv1,
            conv2,
            a1_padded: conv2.takes_padded(planes),
            shortcut_pad,
            norm,
            keep: false,
            saved: Arc::new(Mutex::new(None)),
        };
        Ok(Some(Self {
            op,
            params,
            norms: (bn_a, bn_b),
        }))
    }
}

/// Moves both BatchNorms' running statistics towards the batch statistics a train-mode forward
/// kept in `saved`.
pub(super) fn update_running(
    saved: &Mutex<Option<Saved>>,
    (bn_a, bn_b): (&BatchNorm, &BatchNorm),
) -> Result<()> {
    let saved = saved.lock().map_err(|_| missing())?;
    let bn = &saved.as_ref().ok_or_else(missing)?.bn;
    if let [Some(s1), Some(s2)] = bn {
        s1.update_running(bn_a)?;
        s2.update_running(bn_b)?;
    }
    Ok(())
}

fn unpadded() -> candle_core::Error {
    candle_core::Error::Msg("fused residual block: conv₂ does not take padded input".into())
}

fn missing() -> candle_core::Error {
    candle_core::Error::Msg("fused residual block: its forward state is missing".into())
}

/// How the block's BatchNorms normalise.
#[derive(Clone, Copy)]
enum Norm {
    /// With the batch's statistics (train mode), each with its ε; parameters
    /// [w₁, γ₁, β₁, w₂, γ₂, β₂].
    Batch([f64; 2]),
    /// Folded into the convolutions (eval mode); parameters [w₁·s₁, shift₁, w₂·s₂, shift₂].
    Folded,
}

pub(super) struct BlockOp {
    n: usize,
    planes: usize,
    conv1: Geom,
    conv2: Geom,
    /// Whether BN₁+ReLU writes its output in the direct kernels' zero-bordered layout, which
    /// conv₂'s forward and weight gradient then read without padding a copy each.
    a1_padded: bool,
    shortcut_pad: Option<usize>,
    norm: Norm,
    /// Whether a backward pass can follow (else nothing is kept).
    pub(super) keep: bool,
    /// Shared with the caller, which reads the batch statistics for the running ones.
    pub(super) saved: Arc<Mutex<Option<Saved>>>,
}

/// What the backward pass reads of the forward's.
pub(super) struct Saved {
    y1: Vec<f32>,
    /// BN₁+ReLU's output, in the direct kernels' padded layout when `BlockOp::a1_padded`.
    a1: Vec<f32>,
    y2: Vec<f32>,
    /// Each BatchNorm's batch statistics (train mode).
    bn: [Option<BatchStats>; 2],
    /// Each BatchNorm's per-channel affine map y = x·a + b as the forward applied it.
    affine: [(Vec<f32>, Vec<f32>); 2],
}

/// The parameters' places in the flat tensor: each convolution's weight and its BatchNorm's
/// [γ | β] (train mode) or [shift] (eval mode).
struct Params<'a> {
    w: [&'a [f32]; 2],
    norm: [&'a [f32]; 2],
}

impl BlockOp {
    fn params<'a>(&self, p: &'a [f32]) -> Result<Params<'a>> {
        let (c, c_in) = (self.planes, self.conv1.c_in());
        let (l1, l2) = (c * c_in * 9, c * c * 9);
        let ln = match self.norm {
            Norm::Batch(..) => 2 * c,
            Norm::Folded => c,
        };
        if p.len() != l1 + l2 + 2 * ln {
            let expected = l1 + l2 + 2 * ln;
            candle_core::bail!(
                "fused residual block: {} parameters, expected {expected}",
                p.len()
            );
        }
        let (w1, rest) = p.split_at(l1);
        let (n1, rest) = rest.split_at(ln);
        let (w2, n2) = rest.split_at(l2);
        Ok(Params {
            w: [w1, w2],
            norm: [n1, n2],
        })
    }

    fn plane(&self) -> usize {
        let (h, w) = self.conv2.hw();
        h * w
    }

    /// BatchNorm `i` of y: its batch statistics (train mode) and the affine map it applies.
    fn normalize(
        &self,
        i: usize,
        y: &[f32],
        norm: &[f32],
    ) -> (Option<BatchStats>, (Vec<f32>, Vec<f32>)) {
        let c = self.planes;
        match self.norm {
            Norm::Batch(eps) => {
                let stats = BatchStats::of(y, self.n, c, self.plane(), eps[i]);
                let affine = stats.affine(&norm[..c], &norm[c..]);
                (Some(stats), affine)
            }
            // The eval-mode shift as `channel::shift` applies it: x·1 + b, which is x + b.
            Norm::Folded => (None, (vec![1.0; c], norm.to_vec())),
        }
    }

    /// BatchNorm `i`'s backward from its output gradient `dy` (with its ReLU's mask when
    /// `relu`): its input gradient, in `dy`'s place, and its parameters' gradients.
    fn normalize_backward<'d>(
        &self,
        (i, s): (usize, &Saved),
        (y, norm): (&[f32], &[f32]),
        dy: Cow<'d, [f32]>,
        relu: bool,
        sums: Option<&[PlaneSums]>,
    ) -> (Cow<'d, [f32]>, Vec<f32>) {
        let (n, c, plane) = (self.n, self.planes, self.plane());
        let affine = &s.affine[i];
        match &s.bn[i] {
            Some(stats) => {
                let mut dx = unfilled(dy.len());
                let relu = relu.then_some(affine);
                let io = (y, &norm[..c], &*dy);
                let (dg, db) = match sums {
                    Some(sums) => stats.backward_from_sums(sums, io, (n, plane), relu, &mut dx),
                    None => stats.backward(io, (n, plane), relu, &mut dx),
                };
                (Cow::Owned(dx), [dg, db].concat())
            }
            None => {
                let mut dy = dy;
                if relu {
                    let dy = dy.to_mut();
                    dy.par_chunks_mut(plane).enumerate().for_each(|(k, d)| {
                        let b = affine.1[k % c];
                        let y = &y[k * plane..][..plane];
                        simd::widest(
                            #[inline(always)]
                            || {
                                for (g, &v) in d.iter_mut().zip(y) {
                                    *g = if v + b >= 0.0 { *g } else { 0.0 };
                                }
                            },
                        )
                    });
                }
                let dshift = channel_sums(&dy, (n, c, plane));
                (dy, dshift)
            }
        }
    }

    /// relu(y₁·a + b) per channel, as `channel_affine` computes it, written inside a zero
    /// border: each plane [h + 2][w + 2] as the direct kernels read their input.
    fn affine_relu_padded(&self, y1: &[f32], (a, b): &(Vec<f32>, Vec<f32>)) -> Vec<f32> {
        let (c, (h, w)) = (self.planes, self.conv2.hw());
        let (plane, wp) = (h * w, w + 2);
        let mut out = unfilled(self.n * direct::padded_len(c, (h, w)));
        out.par_chunks_mut((h + 2) * wp)
            .zip(y1.par_chunks(plane.max(1)))
            .enumerate()
            .for_each(|(i, (o, y))| {
                let (a, b) = (a[i % c], b[i % c]);
                simd::widest(
                    #[inline(always)]
                    || {
                        direct::pad_plane(o, (h, w), |row, r| {
                            for (o, &v) in row.iter_mut().zip(&y[r * w..][..w]) {
                                *o = (v * a + b).max(0.0);
                            }
                        })
                    },
                )
            });
        out
    }

    /// Writes into `s` (one plane) output plane `i`'s (image, channel) pre-activation
    /// BN₂(y₂) + shortcut(x), as the chained ops compute it: the BatchNorm's affine value v·a + b,
    /// then the sum with the shortcut (with 0 in option A's padding channels). The shortcut is
    /// read in place, not copied. A loop over whole slices, so it vectorises (see `simd`).
    #[inline(always)]
    fn pre_activation(
        &self,
        (x, y2): (&[f32], &[f32]),
        (a, b): &(Vec<f32>, Vec<f32>),
        i: usize,
        s: &mut [f32],
    ) {
        let (img, oc) = (i / self.planes, i % self.planes);
        let (c_in, (h, w)) = (self.conv1.c_in(), self.conv1.hw());
        let plane = self.plane();
        let (a, b) = (a[oc], b[oc]);
        let y = &y2[i * plane..][..plane];
        let s = &mut s[..plane];
        let bn = |v: f32| v * a + b;
        match self.shortcut_pad {
            None => {
                let xs = &x[(img * c_in + oc) * h * w..][..plane];
                for ((o, &xv), &v) in s.iter_mut().zip(xs).zip(y) {
                    *o = xv + bn(v);
                }
            }
            Some(pad) => match oc.checked_sub(pad).filter(|&ic| ic < c_in) {
                Some(ic) => {
                    // x[:, :, ::2, ::2] (see `shortcut::subsample_plane`).
                    let xp = &x[(img * c_in + ic) * h * w..][..h * w];
                    let w2 = w.div_ceil(2);
                    let rows = s.chunks_exact_mut(w2).zip(y.chunks_exact(w2));
                    for (xrow, (orow, yrow)) in xp.chunks(2 * w).zip(rows) {
                        let xs = xrow[..w].iter().step_by(2);
                        for ((o, &xv), &v) in orow.iter_mut().zip(xs).zip(yrow) {
                            *o = xv + bn(v);
                        }
                    }
                }
                None => {
                    for (o, &v) in s.iter_mut().zip(y) {
                        *o = bn(v) + 0.0;
                    }
                }
            },
        }
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "caf-resnet-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "residual block input")?;
        let out = self.run(x, f32_slice(s2, l2, "residual block parameters")?)?;
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_backward((x, p, grad_out), "residual block", |(xs, ps, g), tracks| {
            self.backward_kept(xs, ps, g, tracks)
        })
    }
}

pub(super) type Grads = (Option<Vec<f32>>, Option<Vec<f32>>);

impl BlockOp {
    /// The block's output on `x` with flat parameters `p`, keeping what the backward reads.
    pub(super) fn run(&self, x: &[f32], p: &[f32]) -> Result<Vec<f32>> {
        let p = self.params(p)?;
        let (n, c, plane) = (self.n, self.planes, self.plane());
        let y1 = conv::forward(self.conv1, x, p.w[0], n, c);
        let (bn1, affine1) = self.normalize(0, &y1, p.norm[0]);
        let (a1, y2) = if self.a1_padded {
            let a1 = self.affine_relu_padded(&y1, &affine1);
            let y2 = conv::forward_padded(self.conv2, &a1, p.w[1], n, c).ok_or_else(unpadded)?;
            (a1, y2)
        } else {
            let a1 = channel_affine(&y1, plane, &affine1.0, &affine1.1, true);
            let y2 = conv::forward(self.conv2, &a1, p.w[1], n, c);
            (a1, y2)
        };
        let (bn2, affine2) = self.normalize(1, &y2, p.norm[1]);
        let mut out = unfilled(n * c * plane);
        out.par_chunks_mut(plane).enumerate().for_each(|(i, o)| {
            simd::widest(
                #[inline(always)]
                || {
                    self.pre_activation((x, &y2), &affine2, i, o);
                    for v in o.iter_mut() {
                        *v = v.max(0.0);
                    }
                },
            )
        });
        let saved = Saved {
            y1: if self.keep { y1 } else { Vec::new() },
            a1: if self.keep { a1 } else { Vec::new() },
            y2: if self.keep { y2 } else { Vec::new() },
            bn: [bn1, bn2],
            affine: [affine1, affine2],
        };
        *self.saved.lock().map_err(|_| missing())? = Some(saved);
        Ok(out)
    }

    /// The output's dimensions [n, planes, h', w'].
    pub(super) fn out_shape(&self) -> Shape {
        let (h, w) = self.conv2.hw();
        Shape::from((self.n, self.planes, h, w))
    }

    /// The gradients of the input (if `x_track`) and of the flat parameters (if `p_track`)
    /// from the output's, with what [`run`](Self::run) kept.
    pub(super) fn backward_kept(
        &self,
        x: &[f32],
        p: &[f32],
        grad_out: &[f32],
        tracks: (bool, bool),
    ) -> Result<Grads> {
        let saved = self.saved.lock().map_err(|_| missing())?;
        let s = saved.as_ref().ok_or_else(missing)?;
        self.backward(s, x, self.params(p)?, grad_out, tracks)
    }

    fn backward(
        &self,
        s: &Saved,
        x: &[f32],
        p: Params,
        grad_out: &[f32],
        (x_track, p_track): (bool, bool),
    ) -> Result<Grads> {
        let (n, c, plane) = (self.n, self.planes, self.plane());
        if s.y2.len() != n * c * plane {
            // The forward kept nothing: nothing was tracked when it ran.
            return Err(missing());
        }
        if grad_out.len() != n * c * plane {
            candle_core::bail!(
                "fused residual block: output gradient of {} values",
                grad_out.len()
            );
        }
        // The output ReLU lets the gradient through where the pre-activation is ≥ 0; it is
        // also the shortcut's gradient and BN₂'s output gradient. In train mode BN₂'s gradient
        // sums are added up in the same pass, while each plane of d is in L1, instead of
        // reading d and y₂ again.
        let mut d = unfilled(n * c * plane);
        let sums: Vec<PlaneSums> = d
            .par_chunks_mut(plane)
            .enumerate()
            .map(|(i, di)| {
                simd::widest(
                    #[inline(always)]
                    || {
                        self.pre_activation((x, &s.y2), &s.affine[1], i, di);
                        for (d, &g) in di.iter_mut().zip(&grad_out[i * plane..][..plane]) {
                            *d = if *d >= 0.0 { g } else { 0.0 };
                        }
                        let y2 = &s.y2[i * plane..][..plane];
                        match &s.bn[1] {
                            Some(stats) => stats.plane_grad_sums(i % c, (di, y2), None),
                            None => [[0.0; LANES]; 2],
                        }
                    },
                )
            })
            .collect();
        let sums = s.bn[1].is_some().then_some(&sums[..]);
        let (dy2, dnorm2) =
            self.normalize_backward((1, s), (&s.y2, p.norm[1]), Cow::Borrowed(&d), false, sums);
        let da1 = conv::input_grad(self.conv2, &dy2, p.w[1], n, c);
        let dw2 = match (p_track, self.a1_padded) {
            (false, _) => None,
            (true, false) => Some(conv::weight_grad(self.conv2, &s.a1, &dy2, c)),
            (true, true) => {
                Some(conv::weight_grad_padded(self.conv2, &s.a1, &dy2, c).ok_or_else(unpadded)?)
            }
        };
        drop(dy2);
        let (dy1, dnorm1) =
            self.normalize_backward((0, s), (&s.y1, p.norm[0]), Cow::Owned(da1), true, None);
        let dw1 = p_track.then(|| conv::weight_grad(self.conv1, x, &dy1, c));
        let dx = x_track.then(|| {
            let mut dx = conv::input_grad(self.conv1, &dy1, p.w[0], n, c);
            self.add_shortcut_grad(&d, &mut dx);
            dx
        });
        let dp = dw1
            .zip(dw2)
            .map(|(dw1, dw2)| [dw1, dnorm1, dw2, dnorm2].concat());
        Ok((dx, dp))
    }

    /// dx += the shortcut's gradient: d itself (identity), or d's unpadded channels in the even
    /// positions they were sampled from (option A).
    fn add_shortcut_grad(&self, d: &[f32], dx: &mut [f32]) {
        let (c_in, (h, w)) = (self.conv1.c_in(), self.conv1.hw());
        let (c, plane) = (self.planes, self.plane());
        let Some(pad) = self.shortcut_pad else {
            dx.par_chunks_mut(CHUNK)
                .zip(d.par_chunks(CHUNK))
                .for_each(|(dx, d)| {
                    simd::widest(
                        #[inline(always)]
                        || dx.iter_mut().zip(d).for_each(|(v, &g)| *v += g),
                    )
                });
            return;
        };
        let w2 = w.div_ceil(2);
        dx.par_chunks_mut(h * w).enumerate().for_each(|(i, dxp)| {
            let (img, ic) = (i / c_in, i % c_in);
            let src = &d[(img * c + ic + pad) * plane..][..plane];
            // Even rows and columns; an odd height's last chunk is its last row alone.
            for (rows, s) in dxp.chunks_mut(2 * w).zip(src.chunks_exact(w2)) {
                for (v, &g) in rows[..w].iter_mut().step_by(2).zip(s) {
                    *v += g;
                }
            }
        });
    }
}

/// The backward of an op over (x, flat parameters) on the CPU: `f` gets their f32 values and
/// the output gradient's, and whether x and the parameters are tracked, and returns their
/// gradients, which come back as tensors of their shapes. `what` names the op in errors.
pub(super) fn cpu_backward(
    (x, p, grad_out): (&Tensor, &Tensor, &Tensor),
    what: &str,
    f: impl FnOnce((&[f32], &[f32], &[f32]), (bool, bool)) -> Result<Grads>,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad_out = grad_out.contiguous()?;
    let (xg, xl) = x.storage_and_layout();
    let (pg, pl) = p.storage_and_layout();
    let (gg, gl) = grad_out.storage_and_layout();
    let xs = cpu_f32(&xg, xl, &format!("{what} input"))?;
    let ps = cpu_f32(&pg, pl, &format!("{what} parameters"))?;
    let g = cpu_f32(&gg, gl, &format!("{what} output gradient"))?;
    let (dx, dp) = f((xs, ps, g), (x.track_op(), p.track_op()))?;
    let dx = dx
        .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
        .transpose()?;
    let dp = dp
        .map(|v| Tensor::from_vec(v, p.shape(), p.device()))
        .transpose()?;
    Ok((dx, dp))
}

/// The f32 values of a contiguous CPU tensor's storage.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(s) = storage else {
        candle_core::bail!("{what} must be on the CPU");
    };
    f32_slice(s, layout, what)
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::{Device, ModuleT, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::super::conv::tests::randn;
    use super::super::BasicBlock;
    use super::*;

    /// (output, running statistics, ∂L/∂x if x is tracked, the parameters' gradients) of one
    /// forward and backward.
    pub(in crate::models) type Run = (Vec<f32>, Vec<Vec<f32>>, Option<Vec<f32>>, Vec<Vec<f32>>);

    /// Gives every variable of `varmap` a non-trivial value from `seed` on (running variances
    /// positive), the same on every call; returns their names, sorted.
    pub(in crate::models) fn randomize(varmap: &VarMap, seed: u64) -> Vec<String> {
        let vars = varmap.data().lock().expect("vars");
        let mut names: Vec<String> = vars.keys().cloned().collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            let var = &vars[name];
            let v = randn(seed + i as u64, var.dims());
            let v = if name.ends_with("running_var") {
                (v.abs().and_then(|t| t + 0.5)).expect("var")
            } else {
                v
            };
            var.set(&v).expect("set");
        }
        names
    }

    /// The [`Run`] of output `y` after the backward of L = Σ y·r (r random from `seed`): the
    /// running statistics of `names`, x's gradient if `x` is given, and the gradients of the
    /// names `param` picks that have one.
    pub(in crate::models) fn outcome(
        (y, seed): (&Tensor, u64),
        (varmap, names): (&VarMap, &[String]),
        x: Option<&Var>,
        param: impl Fn(&str) -> bool,
    ) -> Run {
        let r = randn(seed, y.dims());
        let grads = (y * &r)
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        let v = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values")
        };
        let vars = varmap.data().lock().expect("vars");
        let running = names
            .iter()
            .filter(|n| n.contains("running"))
            .map(|n| v(vars[n].as_tensor()))
            .collect();
        let params = names
            .iter()
            .filter(|n| !n.contains("running") && param(n))
            .filter_map(|n| grads.get(vars[n].as_tensor()).map(v))
            .collect();
        let dx = x.map(|x| v(grads.get(x.as_tensor()).expect("dx")));
        (v(y), running, dx, params)
    }

    /// One forward and backward of a block in train or eval mode, fused or chained.
    fn run(
        (c_in, planes, stride): (usize, usize, usize),
        (n, h, w): (usize, usize, usize),
        (track_x, track_params): (bool, bool),
        (train, fused): (bool, bool),
    ) -> Run {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let block = BasicBlock::new(c_in, planes, stride, vb).expect("block");
        // The same values in both runs.
        let names = randomize(&varmap, 100);
        let x0 = (randn(7, &[n, c_in, h, w]) * 2.0).expect("x");
        let xv = Var::from_tensor(&x0).expect("x var");
        let x = if track_x { xv.as_tensor().clone() } else { x0 };
        let block = if track_params { block } else { frozen(&block) };
        let y = if fused {
            let layers = (&block.a, &block.b);
            let y = forward(&x, layers, block.shortcut_pad, train).expect("fused");
            y.expect("the block fits the fused op")
        } else {
            block.forward_ops(&x, train).expect("chained")
        };
        outcome((&y, 9), (&varmap, &names), track_x.then_some(&xv), |_| true)
    }

    fn frozen(block: &BasicBlock) -> BasicBlock {
        let mut b = block.clone();
        b.a = b.a.detached().expect("detach");
        b.b = b.b.detached().expect("detach");
        b
    }

    /// The fused block equals the chained ops bit for bit, in train and in eval mode: output,
    /// both BatchNorms' running statistics, the input's and all six parameters' gradients
    /// (through the folded weights in eval mode); identity and option-A shortcuts, even and odd
    /// planes, a plane the direct 3×3 kernels take, and frozen operands.
    #[test]
    fn the_fused_block_equals_the_chained_ops_exactly() {
        let cases = [
            ((4, 4, 1), (3, 6, 5), (true, true)),
            ((4, 8, 2), (3, 8, 8), (true, true)),
            ((4, 8, 2), (2, 7, 9), (true, true)),
            ((16, 16, 1), (2, 16, 16), (true, true)),
            ((8, 16, 2), (2, 16, 16), (false, true)),
            ((4, 8, 2), (3, 8, 8), (true, false)),
        ];
        for ((shape, size, track), train) in cases.into_iter().flat_map(|c| [(c, true), (c, false)])
        {
            let fused = run(shape, size, track, (train, true));
            let chained = run(shape, size, track, (train, false));
            let case = format!("{shape:?} {size:?} {track:?} train {train}");
            assert_eq!(fused.0, chained.0, "output {case}");
            assert_eq!(fused.1, chained.1, "running statistics {case}");
            assert_eq!(fused.2, chained.2, "dx {case}");
            assert_eq!(fused.3, chained.3, "parameter gradients {case}");
            assert_eq!(fused.3.len(), if track.1 { 6 } else { 0 });
            assert!(fused.0.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn blocks_the_op_does_not_take_fall_back() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let block = BasicBlock::new(4, 4, 1, vb).expect("block");
        let layers = (&block.a, &block.b);
        let x = randn(1, &[2, 4, 5, 5]);
        for train in [true, false] {
            assert!(forward(&x, layers, None, train).expect("fits").is_some());
        }
        let bf16 = x.to_dtype(DType::BF16).expect("bf16");
        assert!(forward(&bf16, layers, None, false).expect("bf16").is_none());
        let other_channels = randn(1, &[2, 3, 5, 5]);
        let y = forward(&other_channels, layers, None, true).expect("checked");
        assert!(y.is_none());
        // And the module still runs it, through the chained ops' own errors.
        assert!(block.forward_t(&other_channels, true).is_err());
    }
}
