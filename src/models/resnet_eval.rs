//! Inference-only CPU forward pass for [`CifarResNet`](super::CifarResNet).
//!
//! Certification classifies ~10⁵ noisy copies per image, so eval-mode throughput is what caf's
//! run time is made of. candle 0.11's CPU conv2d runs the 3×3 convolutions of this network
//! about 4× slower than a plain GEMM of the same size, so eval mode on the CPU uses this path:
//! rayon over images, and for each image the whole network in one thread (activations of one
//! image stay in cache), each convolution as im2col + one GEMM with BatchNorm folded into the
//! weights and bias, residual add and ReLU fused around it.
//!
//! The weights are folded afresh on every call (a few thousand values per layer), so the path
//! always reflects the current parameters; training uses candle's differentiable ops instead.

use rayon::prelude::*;

use super::convbn::FoldedConv;
use super::relu::relu_in_place;
use super::Normalize;

#[derive(Clone, Debug)]
pub(crate) struct FoldedBlock {
    pub a: FoldedConv,
    pub b: FoldedConv,
    /// Option-A shortcut padding; `None` for the identity shortcut.
    pub shortcut_pad: Option<usize>,
}

/// Images per rayon task. Larger groups make fewer, larger GEMMs, but on the 2-core dev machine
/// (ResNet-20/56, batch 400) groups of 2–16 measured no faster than single images, whose
/// activations stay in cache.
const GROUP: usize = 1;

/// The whole network, folded, ready to run on groups of images.
#[derive(Clone, Debug)]
pub(crate) struct FoldedResNet {
    pub normalize: Normalize,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    pub feature_dim: usize,
}

#[derive(Default)]
struct Scratch {
    cur: Vec<f32>,
    tmp: Vec<f32>,
    next: Vec<f32>,
}

impl FoldedResNet {
    /// Features [B·feature_dim] for `input` = B images of [3, h, w].
    pub(crate) fn features(&self, input: &[f32], batch: usize, h: usize, w: usize) -> Vec<f32> {
        self.features_in_groups(input, batch, (h, w), GROUP)
    }

    pub(crate) fn features_in_groups(
        &self,
        input: &[f32],
        batch: usize,
        (h, w): (usize, usize),
        group: usize,
    ) -> Vec<f32> {
        let mut feats = vec![0f32; batch * self.feature_dim];
        let image = 3 * h * w;
        let group = group.max(1);
        feats
            .par_chunks_mut(group * self.feature_dim)
            .zip(input.par_chunks(group * image))
            .for_each_init(Scratch::default, |s, (f, x)| {
                self.forward_group(x, x.len() / image, (h, w), f, s)
            });
        feats
    }

    /// The whole network on `g` images; activations are [C, g, H, W] throughout.
    fn forward_group(
        &self,
        x: &[f32],
        g: usize,
        (h, w): (usize, usize),
        feats: &mut [f32],
        s: &mut Scratch,
    ) {
        let plane = h * w;
        s.cur.clear();
        s.cur.resize(3 * g * plane, 0.0);
        for (gi, img) in x.chunks_exact(3 * plane).enumerate() {
            for (c, xs) in img.chunks_exact(plane).enumerate() {
                let (m, sd) = (self.normalize.mean[c], self.normalize.std[c]);
                let dst = &mut s.cur[(c * g + gi) * plane..][..plane];
                // The same (x − mean) / std as PyTorch, so the first layer sees identical inputs.
                for (d, &v) in dst.iter_mut().zip(xs) {
                    *d = (v - m) / sd;
                }
            }
        }

        let (mut h, mut w) = (h, w);
        let conv = &self.stem;
        conv.bias_into(&mut s.next, g * plane);
        conv.accumulate(&s.cur, g, (h, w), &mut s.next);
        relu_in_place(&mut s.next);
        std::mem::swap(&mut s.cur, &mut s.next);

        for block in &self.blocks {
            let (ho, wo) = block.a.out_size((h, w));
            let out_plane = ho * wo;
            // tmp = relu(bn1(conv1(x)))
            block.a.bias_into(&mut s.tmp, g * out_plane);
            block.a.accumulate(&s.cur, g, (h, w), &mut s.tmp);
            relu_in_place(&mut s.tmp);
            // next = relu(shortcut(x) + bn2(conv2(tmp)))
            s.next.clear();
            match block.shortcut_pad {
                None => s.next.extend_from_slice(&s.cur),
                Some(pad) => {
                    s.next.resize(block.b.c_out * g * out_plane, 0.0);
                    // Channel c of every image moves to channel pad + c, subsampled by 2.
                    let src_all = &s.cur[..block.a.c_in * g * h * w];
                    let dst_all = &mut s.next[pad * g * out_plane..];
                    for (src, dst) in src_all
                        .chunks_exact(h * w)
                        .zip(dst_all.chunks_exact_mut(out_plane))
                    {
                        super::shortcut::subsample_plane(src, (h, w), dst);
                    }
                }
            }
            block.b.add_bias(&mut s.next, g * out_plane);
            block.b.accumulate(&s.tmp, g, (ho, wo), &mut s.next);
            relu_in_place(&mut s.next);
            std::mem::swap(&mut s.cur, &mut s.next);
            (h, w) = (ho, wo);
        }

        let plane = h * w;
        for (i, xs) in s.cur.chunks_exact(plane).enumerate() {
            let (c, gi) = (i / g, i % g);
            feats[gi * self.feature_dim + c] = xs.iter().sum::<f32>() / plane as f32;
        }
    }
}
