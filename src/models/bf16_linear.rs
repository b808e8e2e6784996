//! A linear layer's weight as the right operand of the bf16 GEMMs: y[m×n] += x[m×k] · Wᵀ for
//! a weight W [n×k] (the ViTs' linear layers, `precision: bf16`).
//!
//! The convolutions' GEMMs ([`GemmWeight`](super::gemm::GemmWeight)) keep the weight on the
//! left and pack the activations as the right operand; a token matrix x [tokens, k] is already
//! the left operand's layout (a row of x, rounded to bf16 and read two values at a time, is a
//! row of bf16 pairs), so here the weight is packed once, as the right operand, and the output
//! comes out as y [tokens, n] without a transpose of x or of y. The arithmetic is the one of
//! [`super::gemm`]: both operands rounded to bf16 (nearest even), products exact in f32, sums
//! in f32; the three kernels (AMX tiles, AVX-512 BF16, the f32 GEMM over the rounded values)
//! differ only in summation order.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::amx;
use super::gemm::{self, bf16_bits, gemm_accumulate, round_bf16, Bf16Kernel};

/// W [n×k] packed for the bf16 kernels, each layout built on its first use.
#[derive(Debug)]
pub(crate) struct Bf16Linear {
    n: usize,
    k: usize,
    /// The AMX layout, from which the others are derived: (p, o) = bf16(W[o][2p]) |
    /// bf16(W[o][2p + 1]) << 16 for `pair_stride(k)` pair rows, in panels of 32 columns
    /// (`amx::gemm_panels`), zero past k and past n.
    pairs: Vec<u32>,
    /// The AVX-512 BF16 kernel's panels of the same pair rows.
    panels: OnceLock<Vec<u32>>,
    /// Wᵀ rounded to bf16, [k × n] f32, for the emulated kernel.
    rounded: OnceLock<Vec<f32>>,
}

thread_local! {
    /// x's rows as bf16 pairs (the left operand), reused across calls.
    static LEFT: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// x rounded to bf16 in f32 (the emulated kernel's left operand).
    static LEFT_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Bf16Linear {
    /// Packs `w` ([n×k], row-major: a linear layer's weight): the right operand is Wᵀ.
    pub(crate) fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "linear weight size");
        let (k2, k2p) = (k.div_ceil(2), gemm::pair_stride(k));
        let mut pairs = vec![0u32; k2p * amx::padded(n, amx::PANEL_COLS)];
        // Row o of W is column o of the right operand: its pairs, converted as a row, go down
        // column o of its panel.
        let mut row_pairs = vec![0u32; k2];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            row_pairs.fill(0);
            to_pairs(row, &mut row_pairs);
            let column = &mut pairs[Self::at(k2p, 0, o)..];
            for (p, &v) in row_pairs.iter().enumerate() {
                column[p * amx::PANEL_COLS] = v;
            }
        }
        Self::from_pairs(n, k, pairs)
    }

    /// Packs `b` ([k×n], row-major: the right operand itself, e.g. attention's values).
    pub(crate) fn from_right(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "right operand size");
        let (k2, k2p) = (k.div_ceil(2), gemm::pair_stride(k));
        let panel = amx::PANEL_COLS;
        let mut pairs = vec![0u32; k2p * amx::padded(n, panel)];
        let zeros = vec![0f32; n];
        let mut row = vec![0u32; n];
        for p in 0..k2 {
            let lo = &b[2 * p * n..][..n];
            let hi = if 2 * p + 1 < k {
                &b[(2 * p + 1) * n..][..n]
            } else {
                &zeros[..]
            };
            super::simd::widest(
                #[inline(always)]
                || gemm::pair_bits(lo, hi, &mut row),
            );
            for (q, cols) in row.chunks(panel).enumerate() {
                pairs[Self::at(k2p, p, q * panel)..][..cols.len()].copy_from_slice(cols);
            }
        }
        Self::from_pairs(n, k, pairs)
    }

    fn from_pairs(n: usize, k: usize, pairs: Vec<u32>) -> Self {
        Self {
            n,
            k,
            pairs,
            panels: OnceLock::new(),
            rounded: OnceLock::new(),
        }
    }

    /// Output width n.
    pub(crate) fn out_dim(&self) -> usize {
        self.n
    }

    /// Input width k.
    pub(crate) fn in_dim(&self) -> usize {
        self.k
    }

    /// Where pair (p, o) is in `pairs`.
    fn at(k2p: usize, p: usize, o: usize) -> usize {
        let panel = amx::PANEL_COLS;
        o / panel * k2p * panel + p * panel + o % panel
    }

    /// `y[m×n] += x[m×k] · Wᵀ` with the bf16 kernel this process uses.
    pub(crate) fn accumulate(&self, m: usize, x: &[f32], y: &mut [f32]) {
        self.accumulate_with(gemm::kernel_in_use(), m, x, y)
    }

    /// [`accumulate`](Self::accumulate) computed by `kernel`, which this CPU must have.
    pub(crate) fn accumulate_with(&self, kernel: Bf16Kernel, m: usize, x: &[f32], y: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && y.len() >= m * n, "linear operand sizes");
        assert!(
            kernel <= gemm::best_bf16_kernel(gemm::KernelLevel::Native),
            "{kernel} kernel requested on a CPU without it"
        );
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        let (k2, k2p) = (k.div_ceil(2), gemm::pair_stride(k));
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Amx => LEFT.with_borrow_mut(|left| {
                // A tile reads 16 rows: the rows past m must be zero (0 × NaN is not).
                let rows = amx::padded(m, amx::TILE_ROWS);
                left_pairs(m, k, k2p, x, left, rows);
                // The tile loop sweeps all of its rows of x once per 32 columns of W: blocks
                // of rows small enough to stay in L2 (see `AMX_LEFT_BYTES`).
                let block = amx_rows(k2p);
                for i in (0..m).step_by(block) {
                    let r = block.min(m - i);
                    // SAFETY: AMX is available (asserted above); `left` from row i on is
                    // padded(r, 16) rows of k2p pairs (a multiple of 16: i is a multiple of 32),
                    // `pairs` k2p pair rows in panels of 32 columns covering n, y from row i on
                    // r rows of n.
                    unsafe {
                        amx::gemm_panels(r, n, k2p, &left[i * k2p..], &self.pairs, &mut y[i * n..])
                    }
                }
            }),
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 => LEFT.with_borrow_mut(|left| {
                left_pairs(m, k, k2p, x, left, m);
                let panels = self.panels.get_or_init(|| self.build_panels(k2, k2p));
                // SAFETY: the CPU has AVX-512 F and BF16 (asserted above); `left` is m rows of
                // k2p slots, the first k2 of them pairs; `panels` packs a k×n matrix with k2p
                // pair rows per panel; y is m rows of n.
                unsafe { gemm::gemm_bf16_avx512(m, n, (k2, k2p), left, panels, y) }
            }),
            _ => LEFT_F32.with_borrow_mut(|left| {
                left.clear();
                left.extend(x[..m * k].iter().map(|&v| round_bf16(v)));
                let rounded = self.rounded.get_or_init(|| self.build_rounded());
                gemm_accumulate(m, n, k, left, rounded, y)
            }),
        }
    }

    fn build_panels(&self, k2: usize, k2p: usize) -> Vec<u32> {
        let n = self.n;
        let mut panels = vec![0u32; k2p * n.div_ceil(16) * 16];
        let mut row = vec![0u32; n];
        for p in 0..k2 {
            for (o, v) in row.iter_mut().enumerate() {
                *v = self.pairs[Self::at(k2p, p, o)];
            }
            gemm::place_pair_row(k2p, p, &row, &mut panels);
        }
        panels
    }

    fn build_rounded(&self) -> Vec<f32> {
        let (n, k, k2p) = (self.n, self.k, gemm::pair_stride(self.k));
        let mut rounded = vec![0f32; k * n];
        for (r, row) in rounded.chunks_exact_mut(n).enumerate() {
            for (o, v) in row.iter_mut().enumerate() {
                // The low half of a pair is the even row; shifting it up makes it an f32.
                let bits = self.pairs[Self::at(k2p, r / 2, o)];
                *v = f32::from_bits(if r % 2 == 0 {
                    bits << 16
                } else {
                    bits & 0xFFFF_0000
                });
            }
        }
        rounded
    }
}

/// Bytes of x's bf16 rows one AMX GEMM call multiplies: the tile loop reads them once per 32
/// output columns, so they must stay in L2 (2 MiB a core on Sapphire Rapids) next to W's
/// columns. With all 1,024 rows of a linear layer's task a ViT-B/16 MLP's left operand is 1.5 MB
/// and streamed from memory 96 times.
const AMX_LEFT_BYTES: usize = 256 << 10;

/// Rows of x per AMX GEMM call for k2p pairs a row: a multiple of 32 (the tile loop's rows).
fn amx_rows(k2p: usize) -> usize {
    (AMX_LEFT_BYTES / (4 * k2p.max(1)) / 32).max(1) * 32
}

/// x's first m rows (k values each) as `rows` rows of k2p bf16 pairs: zero past k, and whole
/// zero rows past m.
///
/// A pair is the two values' bf16 bits in memory order (little-endian: the even value in the
/// low half), so a row of pairs is the row of x converted to bf16 one value at a time: a loop
/// the widest vectors run (reading x two values at a time in baseline SSE2 code, it was 8 % of
/// a bf16 ViT forward pass).
fn left_pairs(m: usize, k: usize, k2p: usize, x: &[f32], left: &mut Vec<u32>, rows: usize) {
    left.clear();
    left.resize(rows * k2p, 0);
    let rows_of_x = x.chunks_exact(k.max(1)).take(m);
    for (row, dst) in rows_of_x.zip(left.chunks_exact_mut(k2p)) {
        to_pairs(row, dst);
    }
}

/// `dst[p] = bf16(row[2p]) | bf16(row[2p + 1]) << 16`, in the widest vectors; `dst` holds at
/// least ⌈len/2⌉ pairs, and for an odd length its last pair's high half must already be zero.
fn to_pairs(row: &[f32], dst: &mut [u32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: a u32 slice is also 2·len valid, aligned u16s in the same memory.
        let halves = unsafe {
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u16>(), 2 * dst.len())
        };
        super::simd::widest(
            #[inline(always)]
            || {
                for (d, &v) in halves.iter_mut().zip(row) {
                    *d = bf16_bits(v) as u16;
                }
            },
        )
    }
    #[cfg(not(target_endian = "little"))]
    for (r, &v) in row.iter().enumerate() {
        dst[r / 2] |= bf16_bits(v) << (16 * (r % 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gemm::tests::{kernels_here, random};

    /// Each kernel this CPU has against the f64 sum of the rounded operands (and the packing from
    /// the right operand equal to the packing from the weight), for shapes whose
    /// m, n and k are not multiples of the tiles (odd k, k = 1, n past a panel), a ViT's, and
    /// more rows than one AMX call takes (700 > `amx_rows` = 672 at k = 192).
    #[test]
    fn bf16_linear_is_the_product_of_the_rounded_operands() {
        assert_eq!(amx_rows(gemm::pair_stride(192)), 672);
        for kernel in kernels_here() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (7, 17, 9),
                (33, 130, 100),
                (65, 576, 192),
                (20, 3, 48),
                (40, 200, 31),
                (700, 40, 192),
            ] {
                let x = random(m * k, 1);
                let w = random(n * k, 2);
                let y0 = random(m * n, 3);
                let lin = Bf16Linear::new(&w, n, k);
                assert_eq!((lin.out_dim(), lin.in_dim()), (n, k));
                // The same packing from the right operand Wᵀ [k×n] as it is.
                let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
                assert_eq!(Bf16Linear::from_right(&wt, k, n).pairs, lin.pairs);
                let mut y = y0.clone();
                // Past the end of y: the kernel must leave it alone.
                y.extend([7.0; 40]);
                lin.accumulate_with(kernel, m, &x, &mut y);
                assert_eq!(y[m * n..], [7.0; 40], "{kernel} wrote past y");
                for i in 0..m {
                    for o in 0..n {
                        let (mut want, mut abs) = (y0[i * n + o] as f64, 0.0);
                        for r in 0..k {
                            let p =
                                round_bf16(x[i * k + r]) as f64 * round_bf16(w[o * k + r]) as f64;
                            want += p;
                            abs += p.abs();
                        }
                        let got = y[i * n + o] as f64;
                        // Products of bf16 values are exact in f32; only the f32 sums round.
                        assert!(
                            (got - want).abs() <= 1e-6 * (abs + 1.0),
                            "{kernel} ({m},{n},{k}) [{i},{o}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
