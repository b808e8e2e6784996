//! A CIFAR ResNet's residual blocks, all of them, as one autograd op over (x, every block's
//! parameters as one flat tensor).
//!
//! Why: each block as its own op (see [`super::block`]) is one node of candle's graph, and
//! candle's backward gives every node's output a gradient accumulator, a zeroed tensor of its
//! size plus an add, on the calling thread alone while the other cores wait; for ResNet-20's
//! nine blocks that is 42 MB zeroed and added per batch of 128. As one op the trunk has one
//! node: its backward hands each block's input gradient straight to the block before it. The
//! blocks run the same code in the same order as the per-block ops, so values, running
//! statistics and gradients are equal bit for bit.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::block::{self, cpu_backward, BlockOp, Grads, Prepared};
use super::conv::f32_slice;
use super::resnet::BasicBlock;

/// The blocks in sequence on `x`; in train mode they update their BatchNorms' running
/// statistics. `None` when the input or a block does not fit the fused op (the caller then runs
/// the blocks one by one).
pub(crate) fn forward(x: &Tensor, blocks: &[BasicBlock], train: bool) -> Result<Option<Tensor>> {
    if blocks.is_empty() || !block::takes(x) {
        return Ok(None);
    }
    let mut prepared = Vec::with_capacity(blocks.len());
    let mut dims = x.dims4()?;
    for b in blocks {
        let Some(p) = Prepared::new(dims, (&b.a, &b.b), b.shortcut_pad, train)? else {
            return Ok(None);
        };
        dims = p.op.out_shape().dims4()?;
        prepared.push(p);
    }
    let params = Tensor::cat(&prepared.iter().map(|p| &p.params).collect::<Vec<_>>(), 0)?;
    let keep = x.track_op() || params.track_op();
    let mut ranges = Vec::with_capacity(prepared.len());
    let mut at = 0;
    let mut ops = Vec::with_capacity(prepared.len());
    let mut norms = Vec::with_capacity(prepared.len());
    for mut p in prepared {
        let len = p.params.elem_count();
        ranges.push(at..at + len);
        at += len;
        p.op.keep = keep;
        norms.push((p.op.saved.clone(), p.norms));
        ops.push(p.op);
    }
    let op = TrunkOp {
        blocks: ops,
        ranges,
        inputs: Mutex::new(Vec::new()),
    };
    let y = x.contiguous()?.apply_op2(&params, op)?;
    if train {
        for (saved, bns) in &norms {
            block::update_running(saved, *bns)?;
        }
    }
    Ok(Some(y))
}

struct TrunkOp {
    blocks: Vec<BlockOp>,
    /// Each block's parameters' place in the flat tensor.
    ranges: Vec<std::ops::Range<usize>>,
    /// The inputs of blocks 1.. (the outputs of the blocks before them), for the backward.
    inputs: Mutex<Vec<Vec<f32>>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused ResNet trunk: its forward state is unreadable".into())
}

impl CustomOp2 for TrunkOp {
    fn name(&self) -> &'static str {
        "caf-resnet-trunk"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "ResNet trunk input")?;
        let p = f32_slice(s2, l2, "ResNet trunk parameters")?;
        let mut kept: Vec<Vec<f32>> = Vec::new();
        let mut h: Option<Vec<f32>> = None;
        for (b, r) in self.blocks.iter().zip(&self.ranges) {
            let input = h.as_deref().unwrap_or(x);
            let out = b.run(input, &p[r.clone()])?;
            // Block b's input is kept when b keeps its state for a backward pass.
            if let Some(prev) = h.replace(out) {
                if b.keep {
                    kept.push(prev);
                }
            }
        }
        *self.inputs.lock().map_err(|_| poisoned())? = kept;
        let (Some(out), Some(last)) = (h, self.blocks.last()) else {
            candle_core::bail!("fused ResNet trunk without blocks");
        };
        Ok((CpuStorage::F32(out), last.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        cpu_backward((x, p, grad_out), "ResNet trunk", |(xs, ps, g), tracks| {
            self.backward(xs, ps, g, tracks)
        })
    }
}

impl TrunkOp {
    /// The blocks' backward passes from the last to the first, each block's input gradient the
    /// output gradient of the one before it.
    fn backward(
        &self,
        xs: &[f32],
        ps: &[f32],
        grad_out: &[f32],
        (x_track, p_track): (bool, bool),
    ) -> Result<Grads> {
        let inputs = self.inputs.lock().map_err(|_| poisoned())?;
        if inputs.len() + 1 != self.blocks.len() {
            candle_core::bail!("fused ResNet trunk: the forward kept no block inputs");
        }
        let mut dp = if p_track {
            vec![0f32; ps.len()]
        } else {
            Vec::new()
        };
        let mut g = grad_out.to_vec();
        let mut dx = None;
        for (i, (b, r)) in self.blocks.iter().zip(&self.ranges).enumerate().rev() {
            let input = match i {
                0 => xs,
                _ => &inputs[i - 1],
            };
            let (d_in, d_p) =
                b.backward_kept(input, &ps[r.clone()], &g, (i > 0 || x_track, p_track))?;
            if let Some(d_p) = d_p {
                dp[r.clone()].copy_from_slice(&d_p);
            }
            match (i, d_in) {
                (0, d) => dx = d,
                (_, Some(d)) => g = d,
                (_, None) => candle_core::bail!("fused ResNet trunk: a block kept no gradient"),
            }
        }
        Ok((dx, p_track.then_some(dp)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    use super::super::block::tests::{outcome, randomize, Run};
    use super::super::conv::tests::randn;
    use super::super::{CifarResNet, Normalize};

    /// One forward and backward of a depth-`depth` CIFAR ResNet's blocks on a random stem
    /// output of `size`, as one op or block by block, from the same parameter values: the
    /// trunk's output, every running statistic, ∂L/∂h if h is tracked, the blocks' parameters'
    /// gradients.
    fn run(
        depth: usize,
        size: (usize, usize, usize),
        (track_h, train): (bool, bool),
        one_op: bool,
    ) -> Run {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = CifarResNet::new(depth, 10, Normalize::IDENTITY, vb).expect("network");
        let names = randomize(&varmap, 200);
        let (n, h, w) = size;
        let h0 = (randn(11, &[n, 16, h, w]) * 2.0).expect("h");
        let hv = Var::from_tensor(&h0).expect("h var");
        let x = if track_h { hv.as_tensor().clone() } else { h0 };
        let y = if one_op {
            super::forward(&x, net.blocks(), train)
                .expect("trunk")
                .expect("the blocks fit the trunk op")
        } else {
            net.blocks_one_by_one(&x, train).expect("blocks")
        };
        let blocks = |n: &str| n.starts_with("layer");
        outcome((&y, 13), (&varmap, &names), track_h.then_some(&hv), blocks)
    }

    /// The trunk as one op equals the blocks one by one bit for bit: output, every running
    /// statistic, the input's and every block parameter's gradient; train and eval mode,
    /// ResNet-8 and -14 (both option-A shortcuts, identity blocks in every stage for -14), a
    /// plane the direct kernels take and an odd one, the input tracked or not.
    #[test]
    fn the_trunk_op_equals_the_blocks_one_by_one_exactly() {
        let cases = [
            (8, (2, 16, 16), true),
            (14, (2, 9, 7), true),
            (14, (3, 8, 8), false),
        ];
        for ((depth, size, track), train) in cases.into_iter().flat_map(|c| {
            let (d, s, t) = c;
            [((d, s, t), true), ((d, s, t), false)]
        }) {
            let fused = run(depth, size, (track, train), true);
            let blocks = run(depth, size, (track, train), false);
            let case = format!("ResNet-{depth} {size:?} track {track} train {train}");
            assert_eq!(fused.0, blocks.0, "output {case}");
            assert_eq!(fused.1, blocks.1, "running statistics {case}");
            assert_eq!(fused.2, blocks.2, "dh {case}");
            assert_eq!(fused.3, blocks.3, "parameter gradients {case}");
            assert_eq!(fused.3.len(), 6 * (depth - 2) / 2);
            assert!(fused.0.iter().all(|v| v.is_finite()));
        }
    }
}
