//! Element-wise passes of caf's training kernels (ReLU, GELU, per-feature shifts and scales),
//! in parallel over fixed chunks: each output element depends on its inputs only, so the result
//! is the same whatever the thread count.

use rayon::prelude::*;

use super::simd;

/// Elements per rayon task: large enough that scheduling costs nothing next to the pass.
pub(crate) const CHUNK: usize = 1 << 15;

/// A buffer of `n` values for a pass that writes every one of them before anything reads them.
///
/// Why: zeroing what is about to be overwritten was most of the memset that took 9 % of a
/// ResNet-20 training step (every activation and gradient of caf's own ops). Debug builds (the
/// tests) fill it with NaN instead, so a pass that missed a value shows up in its results.
///
/// Clippy's `uninit_vec` is allowed here, and only here: the values are never read before they
/// are written, which is the case the lint cannot see; the safe alternative would be a
/// `MaybeUninit` variant of every kernel's output slice.
#[allow(clippy::uninit_vec)]
pub(crate) fn unfilled(n: usize) -> Vec<f32> {
    if cfg!(debug_assertions) {
        return vec![f32::NAN; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; f32 has no invalid bit patterns, and every caller overwrites
    // each value before reading it (debug builds check that through the NaN fill above). The
    // same as candle's own `alloc_uninit` for its CPU outputs.
    unsafe { v.set_len(n) };
    v
}

/// f(x) for every element.
pub(crate) fn map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = unfilled(x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            simd::widest(
                #[inline(always)]
                || {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = f(x);
                    }
                },
            )
        });
    y
}

/// f(a, b) for every pair of elements; a and b must have the same length.
pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    map2_chunks(a, b, |a, b, y| {
        simd::widest(
            #[inline(always)]
            || {
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    *y = f(a, b);
                }
            },
        )
    })
}

/// [`map2`] a chunk at a time: `f(a chunk, b chunk, y chunk)` writes every element of its y
/// chunk (for bodies compiled per instruction set, which dispatch once per chunk).
pub(crate) fn map2_chunks(
    a: &[f32],
    b: &[f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    let mut y = unfilled(a.len());
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| f(a, b, y));
    y
}

/// f(a, b, c) for every triple of elements; a, b and c must have the same length.
pub(crate) fn map3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let mut y = unfilled(a.len());
    y.par_chunks_mut(CHUNK)
        .zip(
            a.par_chunks(CHUNK)
                .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))),
        )
        .for_each(|(y, (a, (b, c)))| {
            simd::widest(
                #[inline(always)]
                || {
                    for (((y, &a), &b), &c) in y.iter_mut().zip(a).zip(b).zip(c) {
                        *y = f(a, b, c);
                    }
                },
            )
        });
    y
}

/// x·a[ch] + b[ch] for every element of an NCHW buffer of planes of `plane` values, the channel
/// ch of a plane being its index modulo `a.len()`; then max(·, 0) if `relu`. (A BatchNorm's
/// affine step, or with a = 1 a shift: x·1 + b is x + b exactly.)
pub(crate) fn channel_affine(
    x: &[f32],
    plane: usize,
    a: &[f32],
    b: &[f32],
    relu: bool,
) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    let (plane, c) = (plane.max(1), a.len().max(1));
    let mut y = unfilled(x.len());
    y.par_chunks_mut(plane)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (yo, xi))| {
            let (a, b) = (a[i % c], b[i % c]);
            simd::widest(
                #[inline(always)]
                || {
                    if relu {
                        for (o, &v) in yo.iter_mut().zip(xi) {
                            *o = (v * a + b).max(0.0);
                        }
                    } else {
                        for (o, &v) in yo.iter_mut().zip(xi) {
                            *o = v * a + b;
                        }
                    }
                },
            )
        });
    y
}

/// f(x, v) for every element of a [rows, d] matrix x and the element of the per-feature vector
/// v (length d) in its column.
pub(crate) fn map_rows(x: &[f32], v: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let d = v.len().max(1);
    let rows = CHUNK.div_ceil(d) * d;
    // Written from x in the parallel pass (a copy of x first was a serial memcpy, 7 % of a
    // CIFAR ViT's forward pass).
    let mut y = unfilled(x.len());
    y.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                for ((y, &x), &v) in yr.iter_mut().zip(xr).zip(v) {
                    *y = f(x, v);
                }
            }
        });
    y
}
