//! Sums of many f32 values in f64, in a fixed order whatever the thread count or instruction
//! set: BatchNorm's statistics and gradients, per-channel bias gradients.

/// Interleaved f64 partial sums per channel. Why: one running sum per channel made every value
/// wait for the previous addition (4 cycles), and the BatchNorm sums took about a tenth of a
/// ResNet-20 training step; eight independent sums run at the adder's throughput instead. The
/// order is fixed, so the result is the same on every run and thread count.
pub(crate) const LANES: usize = 8;

/// (s, t)[j] += f(a[i], b[i]) for the positions i ≡ j (mod [`LANES`]).
#[inline(always)]
pub(crate) fn lane_sums(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> (f64, f64),
    (s, t): (&mut [f64; LANES], &mut [f64; LANES]),
) {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    // Summed in locals, so the sums stay in registers whatever `s` and `t` point to.
    let (mut sl, mut tl) = (*s, *t);
    for (ca, cb) in ca.zip(cb) {
        for (((s, t), &a), &b) in sl.iter_mut().zip(tl.iter_mut()).zip(ca).zip(cb) {
            let (x, y) = f(a, b);
            *s += x;
            *t += y;
        }
    }
    (*s, *t) = (sl, tl);
    for (((s, t), &a), &b) in s.iter_mut().zip(t.iter_mut()).zip(ra).zip(rb) {
        let (x, y) = f(a, b);
        *s += x;
        *t += y;
    }
}

/// The partial sums' total, added pairwise.
pub(crate) fn lanes_total(mut v: [f64; LANES]) -> f64 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// Per channel, `K` sums from every plane's partial sums (NCHW order: plane i is of channel
/// i mod c), added lane by lane image by image and then totalled: the same order whatever the
/// thread count that produced the planes.
pub(crate) fn channel_totals<const K: usize>(
    planes: &[[[f64; LANES]; K]],
    c: usize,
) -> Vec<[f64; K]> {
    (0..c)
        .map(|ch| {
            let mut s = [[0f64; LANES]; K];
            for p in planes.iter().skip(ch).step_by(c.max(1)) {
                for (s, p) in s.iter_mut().zip(p) {
                    for (s, v) in s.iter_mut().zip(p) {
                        *s += v;
                    }
                }
            }
            s.map(lanes_total)
        })
        .collect()
}
