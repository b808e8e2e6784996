//! The "group planes" layout of a convolution's input that the plane convolutions
//! read in place (no im2col): [`PlaneLayout`]. The packings into it live with their users:
//! bf16 pairs in `plane_conv.rs`, int8 quads in `int8.rs`.

use super::amx::{padded, TILE_COLS, TILE_PAIRS};

/// How a k×k convolution's input (padding k/2, stride s) is laid out for the plane
/// convolutions (`plane_conv`: bf16 on AMX or AVX-512 BF16, int8 on AMX or VNNI; "group planes"). The zero-padded image is split into s² phase planes (phase
/// (a, b) holds padded rows s·i + a and columns s·j + b; one phase at stride 1), each `wpp`
/// columns wide; per image and phase, `groups` planes of u32s (a group of `lanes` input channels
/// per u32: channels 2q and 2q + 1 as interleaved bf16 pairs, or channels 4q … 4q + 3 as int8
/// bytes; c_in/lanes rounded up, zeros past the channels) `stride` values apart. Outputs are
/// computed at every position of rows `wpp` wide (`tiles` tiles of 16; the columns past the
/// output width are discarded), so the input of output position o under tap (ky, kx) is in
/// phase (ky mod s, kx mod s) at o + ⌊ky/s⌋·wpp + ⌊kx/s⌋: a tile of B is 16 group planes at one
/// offset, read in place, without an im2col.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlaneLayout {
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) s: usize,
    /// Output size.
    pub(crate) ho: usize,
    pub(crate) wo: usize,
    /// Columns of a phase plane.
    pub(crate) wpp: usize,
    /// Group planes per image and phase, a multiple of `step`.
    pub(crate) groups: usize,
    /// Groups per tile multiply (see [`group_tiles`]).
    pub(crate) step: usize,
    pub(crate) stride: usize,
    pub(crate) tiles: usize,
}

/// Groups per tile multiply and group planes for `c_in` input channels, `lanes` to a group:
/// whole tiles of 16 groups, or one narrower tile when there are fewer (a 16-channel layer's 8
/// pairs would otherwise multiply as many zeros as values).
pub(crate) fn group_tiles(c_in: usize, lanes: usize) -> (usize, usize) {
    let q = c_in.div_ceil(lanes);
    let step = q.min(TILE_PAIRS);
    (step, padded(q, step))
}

impl PlaneLayout {
    pub(crate) fn new(
        c_in: usize,
        lanes: usize,
        (h, w): (usize, usize),
        k: usize,
        s: usize,
    ) -> Self {
        let pad = k / 2;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let (ho, wo) = ((hp - k) / s + 1, (wp - k) / s + 1);
        let (hpp, wpp) = (hp.div_ceil(s), wp.div_ceil(s));
        let tiles = (ho * wpp).div_ceil(TILE_COLS);
        // The last tile's last output reads ⌊(k − 1)/s⌋·(wpp + 1) past its own position; the
        // plane must also hold the phase's hpp·wpp values.
        let reach = tiles * TILE_COLS + ((k - 1) / s) * (wpp + 1);
        let stride = padded(reach.max(hpp * wpp), TILE_COLS);
        let (step, groups) = group_tiles(c_in, lanes);
        Self {
            h,
            w,
            k,
            s,
            ho,
            wo,
            wpp,
            groups,
            step,
            stride,
            tiles,
        }
    }

    /// Output values per channel and image, padded rows included.
    /// u32s of one image's planes (its s² phases × `groups` planes of `stride`).
    pub(crate) fn image_values(&self) -> usize {
        self.s * self.s * self.groups * self.stride
    }

    /// Checks a plane convolution's operand sizes against this layout: `taps` values of k·k taps
    /// of `mp` rows of `groups` groups, `planes` of `g` images, `out` of mp rows of g images'
    /// [`out_values`](Self::out_values).
    pub(crate) fn assert_operands(
        &self,
        (taps, mp, g): (usize, usize, usize),
        planes: usize,
        out: usize,
    ) {
        assert!(
            taps >= self.k * self.k * mp * self.groups,
            "plane convolution weights"
        );
        assert!(planes >= g * self.image_values(), "plane convolution input");
        assert!(
            out >= mp * g * self.out_values(),
            "plane convolution output"
        );
    }

    pub(crate) fn out_values(&self) -> usize {
        self.tiles * TILE_COLS
    }

    /// Where padded row y + pad of image gi, group q starts in phase column b's plane: padded
    /// row y + pad is row ⌊(y + pad)/s⌋ of phase row (y + pad) mod s.
    #[inline(always)]
    pub(crate) fn row_at(&self, (gi, q, y): (usize, usize, usize), b: usize) -> usize {
        let (s, pad) = (self.s, self.k / 2);
        let (a, i) = ((y + pad) % s, (y + pad) / s);
        ((gi * s * s + a * s + b) * self.groups + q) * self.stride + i * self.wpp
    }

    /// Writes input row y (w values) of image gi, group q into its phase planes: padded column
    /// x + pad goes to phase column (x + pad) mod s, position ⌊(x + pad)/s⌋.
    #[inline(always)]
    pub(crate) fn place_row(&self, at: (usize, usize, usize), row: &[u32], dst: &mut [u32]) {
        let (s, pad) = (self.s, self.k / 2);
        if s == 1 {
            return dst[self.row_at(at, 0) + pad..][..row.len()].copy_from_slice(row);
        }
        for b in 0..s {
            let first = (s + b - pad % s) % s;
            let out = &mut dst[self.row_at(at, b) + (first + pad) / s..];
            for (d, &v) in out.iter_mut().zip(row.iter().skip(first).step_by(s)) {
                *d = v;
            }
        }
    }

    /// Tap t = (ky, kx): its phase plane's offset among an image's planes and its shift.
    pub(crate) fn tap(&self, t: usize) -> usize {
        let (ky, kx, s) = (t / self.k, t % self.k, self.s);
        let phase = (ky % s) * s + kx % s;
        phase * self.groups * self.stride + (ky / s) * self.wpp + kx / s
    }
}
