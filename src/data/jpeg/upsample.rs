//! Chroma upsampling to the full image size, choosing the method as libjpeg-turbo's
//! `jinit_upsampler` does with `do_fancy_upsampling` on (the default, so jdmerge.c's merged
//! upsampler is never used): triangular ("fancy") filters for 2×1, 1×2 and 2×2 ratios,
//! replication for any other integral ratio.
//!
//! Above the first row and below the last real row of a component, libjpeg's context rows
//! repeat that edge row; horizontally the fancy filters special-case the two end columns.

/// A decoded component: `width` × `height` real samples inside rows `stride` apart (the rest
/// is MCU padding, which libjpeg never lets reach the output).
pub(super) struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

impl Plane<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let start = y * self.stride;
        &self.data[start..start + self.width]
    }

    /// The rows a fancy vertical filter blends for output row `y` of a 2× taller image:
    /// the nearer input row, the further one (edge rows repeat) and libjpeg's rounding bias.
    fn vertical_pair(&self, y: usize) -> (&[u8], &[u8], bool) {
        let near = y / 2;
        let upper = y.is_multiple_of(2);
        let far = if upper {
            near.saturating_sub(1)
        } else {
            (near + 1).min(self.height - 1)
        };
        (self.row(near), self.row(far), upper)
    }
}

/// Upsamples `p` by the integral factors (`hx`, `vx`) into `out`, rows of `width`.
pub(super) fn upsample(p: &Plane, hx: usize, vx: usize, width: usize, out: &mut [u8]) {
    if p.width == 0 || p.height == 0 || width == 0 {
        return;
    }
    let rows = out.chunks_exact_mut(width);
    match (hx, vx) {
        (1, 1) => {
            for (y, dst) in rows.enumerate() {
                dst.copy_from_slice(&p.row(y)[..width]);
            }
        }
        (2, 1) if p.width > 2 => {
            let mut wide = vec![0u8; 2 * p.width];
            for (y, dst) in rows.enumerate() {
                h2v1_fancy(p.row(y), &mut wide);
                dst.copy_from_slice(&wide[..width]);
            }
        }
        (1, 2) => {
            for (y, dst) in rows.enumerate() {
                let (near, far, upper) = p.vertical_pair(y);
                // libjpeg-turbo rounds the upper output row with bias 1, the lower with 2.
                let bias = if upper { 1 } else { 2 };
                for ((d, &a), &b) in dst.iter_mut().zip(near).zip(far) {
                    *d = ((3 * u16::from(a) + u16::from(b) + bias) >> 2) as u8;
                }
            }
        }
        (2, 2) if p.width > 2 => {
            let mut sums = vec![0u16; p.width];
            let mut wide = vec![0u8; 2 * p.width];
            for (y, dst) in rows.enumerate() {
                let (near, far, _) = p.vertical_pair(y);
                for ((s, &a), &b) in sums.iter_mut().zip(near).zip(far) {
                    *s = 3 * u16::from(a) + u16::from(b);
                }
                h2v2_fancy(&sums, &mut wide);
                dst.copy_from_slice(&wide[..width]);
            }
        }
        _ => {
            for (y, dst) in rows.enumerate() {
                let src = p.row(y / vx);
                for (chunk, &v) in dst.chunks_mut(hx).zip(src) {
                    chunk.fill(v);
                }
            }
        }
    }
}

/// Each input sample becomes two: 3/4 of itself plus 1/4 of the neighbour on that side, with
/// libjpeg's alternating +1/+2 rounding; the outermost two outputs copy the end samples.
fn h2v1_fancy(src: &[u8], dst: &mut [u8]) {
    let n = src.len();
    let s = |i: usize| u16::from(src[i]);
    dst[0] = src[0];
    dst[1] = ((3 * s(0) + s(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let v = 3 * s(i);
        dst[2 * i] = ((v + s(i - 1) + 1) >> 2) as u8;
        dst[2 * i + 1] = ((v + s(i + 1) + 2) >> 2) as u8;
    }
    dst[2 * n - 2] = ((3 * s(n - 1) + s(n - 2) + 1) >> 2) as u8;
    dst[2 * n - 1] = src[n - 1];
}

/// The horizontal half of the 2×2 triangle filter on column sums that already carry the
/// vertical 3:1 weights, hence the /16 with libjpeg's +8/+7 rounding.
fn h2v2_fancy(sums: &[u16], dst: &mut [u8]) {
    let n = sums.len();
    dst[0] = ((sums[0] * 4 + 8) >> 4) as u8;
    dst[1] = ((sums[0] * 3 + sums[1] + 7) >> 4) as u8;
    for i in 1..n - 1 {
        let v = 3 * sums[i];
        dst[2 * i] = ((v + sums[i - 1] + 8) >> 4) as u8;
        dst[2 * i + 1] = ((v + sums[i + 1] + 7) >> 4) as u8;
    }
    dst[2 * n - 2] = ((3 * sums[n - 1] + sums[n - 2] + 8) >> 4) as u8;
    dst[2 * n - 1] = ((sums[n - 1] * 4 + 7) >> 4) as u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fancy_filters_keep_flat_planes_flat_and_blend_edges() {
        let data = [10u8, 20, 30, 40, 50, 60, 70, 80, 90];
        let p = Plane {
            data: &data,
            stride: 3,
            width: 3,
            height: 3,
        };
        let up = |hx, vx, w: usize, h: usize, p: &Plane| {
            let mut out = vec![0u8; w * h];
            upsample(p, hx, vx, w, &mut out);
            out
        };
        let out = up(2, 1, 6, 3, &p);
        assert_eq!(&out[..6], &[10, 13, 17, 23, 27, 30]);
        let out = up(1, 2, 3, 6, &p);
        // Row 0 blends row 0 with itself; row 1 is 3/4 row 0 + 1/4 row 1, bias 2.
        assert_eq!(&out[..6], &[10, 20, 30, 18, 28, 38]);
        let out = up(2, 2, 5, 5, &p);
        // Top row: column sums 4 · row 0 (the row above repeats it), then +8/+7 over 16.
        assert_eq!(&out[..3], &[10, 12, 18]);
        let flat = [7u8; 9];
        let p = Plane {
            data: &flat,
            stride: 3,
            width: 3,
            height: 3,
        };
        for (hx, vx) in [(2, 1), (1, 2), (2, 2), (3, 1), (4, 4)] {
            let out = up(hx, vx, 3 * hx - 1, 3 * vx - 1, &p);
            assert!(out.iter().all(|&v| v == 7), "{hx}×{vx}");
        }
    }
}
