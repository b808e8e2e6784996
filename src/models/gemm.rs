//! The GEMMs of the fused CPU inference paths (CIFAR ResNets and adapters), in f32 or bf16.
//!
//! bf16 here means: weights and the im2col'd activations are rounded to bf16 (round to
//! nearest even) and multiplied into f32 accumulators, as AMX's `tdpbf16ps` and AVX-512 BF16's
//! `vdpbf16ps` do; biases, residual adds, ReLU and pooling stay in f32. Three kernels compute
//! it, picked at run time ([`bf16_kernel`]): AMX tiles (`super::amx`), AVX-512 BF16, and on
//! other CPUs the f32 GEMM over the same rounded operands. They differ only in summation order.
//! A certificate computed in bf16 is a certificate of this rounded classifier, not of the f32
//! network; the store and the report say which one ran.

use super::amx;
use super::int8::Int8Weight;
use super::precision::Precision;

/// Environment variable that caps caf's own instruction-set-specific CPU kernels, for the whole
/// process: `native` (the default) lets each kernel use what the CPU has; `avx512` keeps caf
/// off AMX (the bf16 GEMM runs the AVX-512 BF16 kernel where the CPU has it); `avx2` keeps
/// caf's own kernels to AVX2 + FMA, as on a server without AVX-512 (bf16 and int8 emulated);
/// `portable` forces every fall-back (the bf16 GEMM's emulated path), so the fall-backs are
/// tested on any CPU (`.ci/run` runs the library tests at each level). The f32 GEMM is the
/// `gemm` crate's, which picks AVX-512, AVX2+FMA or scalar code itself at every level.
pub const KERNELS_ENV: &str = "CAF_KERNELS";

/// The kernel levels [`KERNELS_ENV`] accepts, from the most capable down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelLevel {
    /// Only the portable fall-backs.
    Portable,
    /// Up to AVX2 with FMA: what a server without AVX-512 runs (no bf16 or int8 kernel).
    Avx2,
    /// Up to AVX-512 (BF16): no AMX tiles.
    Avx512,
    /// Every kernel the CPU supports.
    Native,
}

impl std::str::FromStr for KernelLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "native" => Ok(Self::Native),
            "avx512" => Ok(Self::Avx512),
            "avx2" => Ok(Self::Avx2),
            "portable" => Ok(Self::Portable),
            other => Err(format!(
                "{KERNELS_ENV}={other:?}: expected `native` (the default), `avx512` (no AMX), \
                 `avx2` (no AVX-512) or `portable`"
            )),
        }
    }
}

/// [`KERNELS_ENV`]'s level, or the error naming a value it does not accept (the CLI checks it
/// before any work starts).
pub fn kernel_level_from_env() -> Result<KernelLevel, String> {
    match std::env::var(KERNELS_ENV) {
        Ok(v) => v.parse(),
        Err(std::env::VarError::NotPresent) => Ok(KernelLevel::Native),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{KERNELS_ENV} is not valid UTF-8")),
    }
}

/// The level in force for this process (read once). A library user's unreadable value falls
/// back to the portable kernels, which are correct on every CPU.
pub fn kernel_level() -> KernelLevel {
    static LEVEL: std::sync::OnceLock<KernelLevel> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| kernel_level_from_env().unwrap_or(KernelLevel::Portable))
}

/// Whether this CPU has the AVX-512 bf16 kernel's instructions (AVX-512 F and BF16).
pub fn cpu_has_bf16_kernel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AMX-BF16 tiles and the OS lets caf use them.
pub fn cpu_has_amx() -> bool {
    amx::available()
}

/// Which kernel computes the bf16 GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bf16Kernel {
    /// The f32 GEMM over the rounded operands (any CPU).
    Emulated,
    /// `vdpbf16ps` (AVX-512 BF16).
    Avx512Bf16,
    /// `tdpbf16ps` on AMX tiles.
    Amx,
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Emulated => "emulated in f32",
            Self::Avx512Bf16 => "AVX-512 BF16",
            Self::Amx => "AMX-BF16",
        })
    }
}

/// The bf16 kernel this process uses: the best the CPU has, capped by [`KERNELS_ENV`].
pub fn bf16_kernel() -> Bf16Kernel {
    best_bf16_kernel(kernel_level())
}

/// The best bf16 kernel this CPU has at `level`.
pub fn best_bf16_kernel(level: KernelLevel) -> Bf16Kernel {
    if level >= KernelLevel::Native && cpu_has_amx() {
        Bf16Kernel::Amx
    } else if level >= KernelLevel::Avx512 && cpu_has_bf16_kernel() {
        Bf16Kernel::Avx512Bf16
    } else {
        Bf16Kernel::Emulated
    }
}

/// Whether bf16 GEMMs run a bf16 kernel (otherwise they take the emulated path).
pub fn bf16_kernel_available() -> bool {
    bf16_kernel() != Bf16Kernel::Emulated
}

/// The kernel the bf16 GEMMs run now: [`bf16_kernel`], under a test's cap.
pub(super) fn kernel_in_use() -> Bf16Kernel {
    bf16_kernel().min(forced_kernel())
}

/// Pairs per row of the bf16 weights, and pair rows of each panel of the packed right operand:
/// k/2 rounded up to a whole AMX tile.
pub(super) fn pair_stride(k: usize) -> usize {
    amx::padded(k.div_ceil(2), amx::TILE_PAIRS)
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays a quiet NaN).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    // A select rather than a branch, so packing loops vectorise.
    if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits(bf16_bits(x) << 16)
}

/// `c[m×n] += a[m×k] · b[k×n]` in f32, all row-major and dense: the training convolutions'
/// strided GEMM with unit column strides.
pub(crate) fn gemm_accumulate(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    super::conv::gemm(m, n, k, (a, k, 1), (b, n, 1), c, true)
}

/// The left operand of a layer's GEMMs (a convolution's [c_out, c_in·k·k] weights), ready for
/// the precision it runs in.
#[derive(Clone, Debug)]
pub(crate) struct GemmWeight {
    m: usize,
    k: usize,
    /// f32: the weights; bf16: the weights rounded to bf16 (for the emulated path).
    values: Vec<f32>,
    /// bf16 only: row i, pair p holds bf16(a[i][2p]) | bf16(a[i][2p+1]) << 16, zero past k,
    /// rows padded to a multiple of 16 and [`pair_stride`] pairs each (the
    /// AMX tiles' layout; the AVX-512 kernel reads the same rows and skips the padding).
    pairs: Option<Vec<u32>>,
    /// bf16 only, built on first use: the weights as the plane convolutions' taps
    /// (`plane_conv::conv_taps`).
    taps: std::sync::OnceLock<Vec<u32>>,
    /// f32 only, built on first use: the weights as the direct 3×3 kernels read them
    /// (`direct::pack_weight`).
    direct: std::sync::OnceLock<Vec<f32>>,
    /// int8 only: the weights quantised per row (the convolution runs `super::int8`).
    int8: Option<Box<Int8Weight>>,
}

impl GemmWeight {
    pub(crate) fn new(values: Vec<f32>, m: usize, k: usize, precision: Precision) -> Self {
        debug_assert_eq!(values.len(), m * k);
        match precision {
            Precision::F32 => Self {
                m,
                k,
                values,
                pairs: None,
                taps: std::sync::OnceLock::new(),
                direct: std::sync::OnceLock::new(),
                int8: None,
            },
            Precision::Int8 => Self {
                m,
                k,
                int8: Some(Box::new(Int8Weight::new(&values, m, k))),
                values,
                pairs: None,
                taps: std::sync::OnceLock::new(),
                direct: std::sync::OnceLock::new(),
            },
            Precision::Bf16 => {
                let (k2, k2p) = (k.div_ceil(2), pair_stride(k));
                let mut pairs = vec![0u32; amx::padded(m, amx::TILE_ROWS) * k2p];
                for (row, dst) in values.chunks_exact(k).zip(pairs.chunks_exact_mut(k2p)) {
                    for (p, d) in dst[..k2].iter_mut().enumerate() {
                        let lo = bf16_bits(row[2 * p]);
                        let hi = row.get(2 * p + 1).map_or(0, |&v| bf16_bits(v));
                        *d = lo | (hi << 16);
                    }
                }
                Self {
                    m,
                    k,
                    values: values.into_iter().map(round_bf16).collect(),
                    pairs: Some(pairs),
                    taps: std::sync::OnceLock::new(),
                    direct: std::sync::OnceLock::new(),
                    int8: None,
                }
            }
        }
    }

    /// `c[m×n] += self · b[k×n]` in this weight's precision.
    pub(crate) fn accumulate(&self, n: usize, b: &[f32], c: &mut [f32]) {
        debug_assert!(
            self.int8.is_none(),
            "int8 weights run int8::Int8Weight::conv"
        );
        let k = self.k;
        if self.pairs.is_none() {
            return gemm_accumulate(self.m, n, k, &self.values, b, c);
        }
        assert!(b.len() >= k * n, "gemm operand sizes");
        self.accumulate_rows(n, |r, dst| dst.copy_from_slice(&b[r * n..(r + 1) * n]), c);
    }

    /// `c[m×n] += self · B` one block of B's columns at a time: `fill(j0, j1, dst)` writes
    /// columns [j0, j1) of B into `dst` (k rows of j1 − j0 values, every value written), for
    /// the blocks `blocks` lists (covering 0..n). A block's operand stays in cache between being
    /// written and being read (a whole im2col of a ResNet's first stage is larger than L2).
    /// bf16 weights take [`accumulate_rows`](Self::accumulate_rows)'s path instead.
    pub(crate) fn accumulate_blocks(
        &self,
        n: usize,
        blocks: impl Iterator<Item = (usize, usize)>,
        mut fill: impl FnMut(usize, usize, &mut [f32]),
        c: &mut [f32],
    ) {
        let (m, k) = (self.m, self.k);
        assert!(c.len() >= m * n, "gemm operand sizes");
        debug_assert!(self.pairs.is_none(), "f32 weights only");
        COLS.with_borrow_mut(|cols| {
            for (j0, j1) in blocks {
                let nb = j1 - j0;
                if cols.len() < k * nb {
                    cols.resize(k * nb, 0.0);
                }
                let cols = &mut cols[..k * nb];
                fill(j0, j1, cols);
                let c_block = &mut c[j0..(m - 1) * n + j1];
                super::conv::gemm_into(
                    m,
                    nb,
                    k,
                    (&self.values, k, 1),
                    (cols, nb, 1),
                    (c_block, n),
                    true,
                );
            }
        });
    }

    /// Whether this weight runs in f32 (not bf16 or int8).
    pub(crate) fn is_f32(&self) -> bool {
        self.pairs.is_none() && self.int8.is_none()
    }

    /// The quantised weight, when this weight runs in int8.
    pub(crate) fn int8(&self) -> Option<&Int8Weight> {
        self.int8.as_deref()
    }

    /// The bf16 kernel that runs this weight's convolutions over group planes now
    /// (`plane_conv::bf16`): AMX or AVX-512 BF16, when the weight is bf16 and the kernel in use
    /// is one of them.
    pub(crate) fn plane_kernel(&self) -> Option<Bf16Kernel> {
        let kernel = kernel_in_use();
        (self.pairs.is_some() && kernel != Bf16Kernel::Emulated).then_some(kernel)
    }

    /// This weight, [c_out, c_in·k·k], as the plane convolutions' taps (built once).
    pub(crate) fn conv_taps(&self, c_in: usize, k: usize) -> &[u32] {
        debug_assert_eq!(c_in * k * k, self.k);
        self.taps
            .get_or_init(|| super::plane_conv::conv_taps(&self.values, self.m, c_in, k))
    }

    /// This f32 weight, [c_out, c_in·9], as the direct 3×3 kernels read it (built once).
    pub(crate) fn direct_taps(&self, c_in: usize) -> &[f32] {
        debug_assert!(self.is_f32() && c_in * 9 == self.k);
        self.direct
            .get_or_init(|| super::direct::pack_weight(&self.values, c_in, self.m))
    }

    /// `c[m×n] += self · B` where `row(r, dst)` writes row r (of k) of B into `dst` (n values;
    /// every value must be written). The bf16 kernel packs B two rows at a time as they are
    /// produced, so an im2col never goes through a full f32 matrix first.
    pub(crate) fn accumulate_rows(
        &self,
        n: usize,
        row: impl FnMut(usize, &mut [f32]),
        c: &mut [f32],
    ) {
        self.accumulate_rows_with(kernel_in_use(), n, row, c)
    }

    /// [`accumulate_rows`](Self::accumulate_rows) with bf16 weights computed by `kernel`, which
    /// must be one this CPU has (at most [`best_bf16_kernel`]`(Native)`).
    fn accumulate_rows_with(
        &self,
        kernel: Bf16Kernel,
        n: usize,
        mut row: impl FnMut(usize, &mut [f32]),
        c: &mut [f32],
    ) {
        let (m, k) = (self.m, self.k);
        assert!(c.len() >= m * n, "gemm operand sizes");
        assert!(
            kernel <= best_bf16_kernel(KernelLevel::Native),
            "{kernel} kernel requested on a CPU without it"
        );
        if self.pairs.is_some() && kernel != Bf16Kernel::Emulated {
            // The bf16 kernels take B two rows at a time, rounded and interleaved.
            return ROWS.with_borrow_mut(|rows| {
                rows.clear();
                rows.resize(2 * n, 0.0);
                let (lo, hi) = rows.split_at_mut(n);
                let pair_row = |p: usize, dst: &mut [u32]| {
                    row(2 * p, lo);
                    if 2 * p + 1 < k {
                        row(2 * p + 1, hi);
                    } else {
                        hi.fill(0.0);
                    }
                    pair_bits(lo, hi, dst);
                };
                self.accumulate_pair_rows_with(kernel, n, pair_row, c)
            });
        }
        COLS.with_borrow_mut(|cols| {
            // `row` writes every value: grow the buffer, never clear it (zeroing k·n values
            // per layer cost ~4% of a forward pass).
            if cols.len() < k * n {
                cols.resize(k * n, 0.0);
            }
            let cols = &mut cols[..k * n];
            for (r, dst) in cols.chunks_exact_mut(n).enumerate() {
                row(r, dst);
            }
            if self.pairs.is_some() {
                for v in cols.iter_mut() {
                    *v = round_bf16(*v);
                }
            }
            gemm_accumulate(m, n, k, &self.values, cols, c);
        });
    }

    /// `c[m×n] += self · B` for bf16 weights, where `pair_row(p, dst)` writes B's rows 2p and
    /// 2p + 1 already rounded and interleaved: dst[j] = bf16(B[2p][j]) | bf16(B[2p+1][j]) << 16
    /// for j < n (row k, past an odd k, is zero). A convolution's im2col can write these
    /// directly, without an f32 copy.
    pub(crate) fn accumulate_pair_rows(
        &self,
        n: usize,
        pair_row: impl FnMut(usize, &mut [u32]),
        c: &mut [f32],
    ) {
        self.accumulate_pair_rows_with(kernel_in_use(), n, pair_row, c)
    }

    /// [`accumulate_pair_rows`](Self::accumulate_pair_rows) computed by `kernel`.
    fn accumulate_pair_rows_with(
        &self,
        kernel: Bf16Kernel,
        n: usize,
        mut pair_row: impl FnMut(usize, &mut [u32]),
        c: &mut [f32],
    ) {
        let (m, k) = (self.m, self.k);
        let (k2, k2p) = (k.div_ceil(2), pair_stride(self.k));
        assert!(c.len() >= m * n, "gemm operand sizes");
        assert!(
            kernel <= best_bf16_kernel(KernelLevel::Native),
            "{kernel} kernel requested on a CPU without it"
        );
        let Some(pairs) = &self.pairs else {
            panic!("accumulate_pair_rows needs bf16 weights");
        };
        PACKED.with_borrow_mut(|packed| match kernel {
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Amx => {
                // Row-major pair rows, each padded to whole tiles: a B tile is 16 rows read at
                // any stride. The padding rows must be zero (A's padding is, and 0 × NaN is
                // not); the padding columns only reach C columns the kernel discards.
                let ldb = amx::padded(n, amx::TILE_COLS);
                if packed.len() < k2p * ldb {
                    packed.resize(k2p * ldb, 0);
                }
                let packed = &mut packed[..k2p * ldb];
                for (p, dst) in packed.chunks_exact_mut(ldb).enumerate() {
                    if p < k2 {
                        pair_row(p, &mut dst[..n]);
                    } else {
                        dst.fill(0);
                    }
                }
                // SAFETY: AMX is available (the assert above); `pairs` is padded(m, 16) rows of
                // k2p pairs, `packed` k2p rows of ldb ≥ padded(n, 16), c is m rows of n.
                unsafe { amx::gemm(m, n, k2p, pairs, (packed, ldb), c) }
            }
            #[cfg(target_arch = "x86_64")]
            Bf16Kernel::Avx512Bf16 => {
                packed.clear();
                packed.resize(k2p * n.div_ceil(16) * 16, 0);
                PAIR_ROW.with_borrow_mut(|row| {
                    row.resize(n, 0);
                    for p in 0..k2 {
                        pair_row(p, row);
                        place_pair_row(k2p, p, row, packed);
                    }
                });
                // SAFETY: as in `accumulate_rows_with`.
                unsafe { kernel::gemm_bf16(m, n, (k2, k2p), pairs, packed, c) }
            }
            _ => COLS.with_borrow_mut(|cols| {
                if cols.len() < 2 * k2 * n {
                    cols.resize(2 * k2 * n, 0.0);
                }
                let cols = &mut cols[..2 * k2 * n];
                PAIR_ROW.with_borrow_mut(|row| {
                    row.resize(n, 0);
                    for (p, two) in cols.chunks_exact_mut(2 * n).enumerate() {
                        pair_row(p, row);
                        let (lo, hi) = two.split_at_mut(n);
                        for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(row.iter()) {
                            *l = f32::from_bits(v << 16);
                            *h = f32::from_bits(v & 0xFFFF_0000);
                        }
                    }
                });
                gemm_accumulate(m, n, k, &self.values, &cols[..k * n], c);
            }),
        })
    }
}

/// Tests compare the kernels with each other inside whole networks: the bf16 GEMMs use at most
/// the kernel whose discriminant this holds (`u8::MAX`: no cap). Set it with [`cap_kernel`].
#[cfg(test)]
static FORCE_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the bf16 kernel of this test process at `cap` (`None` lifts the cap).
#[cfg(test)]
pub(crate) fn cap_kernel(cap: Option<Bf16Kernel>) {
    let v = cap.map_or(u8::MAX, |k| k as u8);
    FORCE_KERNEL.store(v, std::sync::atomic::Ordering::Relaxed)
}

#[inline]
fn forced_kernel() -> Bf16Kernel {
    #[cfg(test)]
    {
        const EMULATED: u8 = Bf16Kernel::Emulated as u8;
        const AVX512: u8 = Bf16Kernel::Avx512Bf16 as u8;
        match FORCE_KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
            EMULATED => Bf16Kernel::Emulated,
            AVX512 => Bf16Kernel::Avx512Bf16,
            _ => Bf16Kernel::Amx,
        }
    }
    #[cfg(not(test))]
    {
        Bf16Kernel::Amx
    }
}

thread_local! {
    /// The right operand packed for a bf16 kernel, reused across calls (no allocation per
    /// layer once it has grown).
    static PACKED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Two f32 rows of the right operand, before they are rounded and interleaved.
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One interleaved pair row, before it is placed into the AVX-512 kernel's panels.
    static PAIR_ROW: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The f32 right operand (f32 weights, or bf16 without a bf16 kernel).
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `dst[j] = bf16(lo[j]) | bf16(hi[j]) << 16`: two rows of B rounded and interleaved. Always
/// inlined, so a caller compiled for wider vectors (`simd::widest`, an AVX-512 body) runs it in
/// them.
#[inline(always)]
pub(crate) fn pair_bits(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
        *d = bf16_bits(l) | (bf16_bits(h) << 16);
    }
}

/// Copies pair row `p` (n interleaved values) into the AVX-512 kernel's panels: panels of up to
/// [`PANEL`] columns (the last one padded with zeros to a multiple of 16), each `k2` pair rows,
/// pair-major.
pub(super) fn place_pair_row(k2: usize, p: usize, row: &[u32], packed: &mut [u32]) {
    let n = row.len();
    let mut offset = 0;
    for j0 in (0..n).step_by(PANEL) {
        let width = (n - j0).min(PANEL);
        let stride = width.div_ceil(16) * 16;
        packed[offset + p * stride..][..width].copy_from_slice(&row[j0..j0 + width]);
        offset += k2 * stride;
    }
}

/// Columns per panel of the packed right operand (four AVX-512 vectors).
const PANEL: usize = 64;

/// `c[m×n] += A · B` by the AVX-512 BF16 kernel: A as m rows of `lda` slots (the first k2 of
/// them bf16 pairs), B as [`place_pair_row`] lays it out with `lda` pair rows per panel.
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; `pairs.len() ≥ m·lda`, `packed` must hold the packing
/// of a k×n matrix with k.div_ceil(2) = k2 ≤ lda, and `c.len() ≥ m·n`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn gemm_bf16_avx512(
    m: usize,
    n: usize,
    lda: (usize, usize),
    pairs: &[u32],
    packed: &[u32],
    c: &mut [f32],
) {
    kernel::gemm_bf16(m, n, lda, pairs, packed, c)
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// Rows of `c` per micro-kernel call: 4 rows × 4 vectors = 16 accumulators.
    const MR: usize = 4;

    /// `c[m×n] += A · B` with A as `pairs` (m rows of `lda` slots, the first k2 of them bf16
    /// pairs) and B as [`place_pair_row`](super::place_pair_row) lays it out with `lda` pair rows
    /// per panel.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `pairs.len() ≥ m·lda`, `packed` must hold the
    /// packing of a k×n matrix with k.div_ceil(2) = k2 ≤ lda, and `c.len() ≥ m·n`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemm_bf16(
        m: usize,
        n: usize,
        (k2, lda): (usize, usize),
        pairs: &[u32],
        packed: &[u32],
        c: &mut [f32],
    ) {
        let mut offset = 0;
        for j0 in (0..n).step_by(PANEL) {
            let width = (n - j0).min(PANEL);
            let vectors = width.div_ceil(16);
            let panel = packed[offset..].as_ptr();
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(MR);
                let a = pairs[i * lda..].as_ptr();
                let out = c[i * n + j0..].as_mut_ptr();
                match (rows, vectors) {
                    (4, 4) => tile::<4, 4>(k2, lda, a, panel, out, n, width),
                    (4, 3) => tile::<4, 3>(k2, lda, a, panel, out, n, width),
                    (4, 2) => tile::<4, 2>(k2, lda, a, panel, out, n, width),
                    (4, 1) => tile::<4, 1>(k2, lda, a, panel, out, n, width),
                    (_, 4) => tile::<1, 4>(k2, lda, a, panel, out, n, width),
                    (_, 3) => tile::<1, 3>(k2, lda, a, panel, out, n, width),
                    (_, 2) => tile::<1, 2>(k2, lda, a, panel, out, n, width),
                    _ => tile::<1, 1>(k2, lda, a, panel, out, n, width),
                }
                i += if rows == MR { MR } else { 1 };
            }
            offset += lda * vectors * 16;
        }
    }

    /// One R × (16·V) block of c: `c[r][j] += Σ_p a[r][p] · panel[p][j]` for j < `width`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize, const V: usize>(
        k2: usize,
        lda: usize,
        a: *const u32,
        panel: *const u32,
        c: *mut f32,
        ldc: usize,
        width: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let stride = V * 16;
        for p in 0..k2 {
            let row = panel.add(p * stride);
            let mut b = [_mm512_setzero_si512(); V];
            for (v, bv) in b.iter_mut().enumerate() {
                *bv = _mm512_loadu_si512(row.add(v * 16) as *const _);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + p) as i32));
                for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                    *acc_rv = _mm512_dpbf16_ps(
                        *acc_rv,
                        av,
                        std::mem::transmute::<__m512i, __m512bh>(b[v]),
                    );
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let out = c.add(r * ldc);
            for (v, acc_rv) in acc_r.iter().enumerate() {
                let j = v * 16;
                let left = width.saturating_sub(j).min(16);
                let mask: __mmask16 = if left == 16 {
                    0xFFFF
                } else {
                    (1u16 << left) - 1
                };
                let dst = out.add(j);
                let cur = _mm512_maskz_loadu_ps(mask, dst);
                _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(cur, *acc_rv));
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    pub(in crate::models) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// c + a·b in f64 over the given (already rounded) operands, and Σ|a||b| per entry.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &[f32]) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (c[i * n + j] as f64, c[i * n + j].abs() as f64);
                for p in 0..k {
                    let t = a[i * k + p] as f64 * b[p * n + j] as f64;
                    s += t;
                    abs += t.abs();
                }
                out.push((s, abs));
            }
        }
        out
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even mantissa (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties go to 1 + 2⁻⁶.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        for x in random(1000, 7) {
            let r = round_bf16(x);
            assert!((r - x).abs() <= x.abs() * 2f32.powi(-8), "{x} → {r}");
            assert_eq!(r.to_bits() & 0xFFFF, 0);
        }
    }

    /// Every bf16 kernel this CPU has (the test names them, so a run shows what it covered).
    pub(in crate::models) fn kernels_here() -> Vec<Bf16Kernel> {
        let best = best_bf16_kernel(KernelLevel::Native);
        let all = [
            Bf16Kernel::Emulated,
            Bf16Kernel::Avx512Bf16,
            Bf16Kernel::Amx,
        ];
        let here: Vec<_> = all.into_iter().filter(|k| *k <= best).collect();
        eprintln!("bf16 kernels on this CPU: {here:?}");
        here
    }

    #[test]
    fn bf16_gemm_is_the_product_of_the_rounded_operands() {
        // Odd k, n not a multiple of 16 or of the panel, m not a multiple of the row tile (nor
        // of AMX's 16 or 32 rows), k/2 not a multiple of AMX's 16 pairs, and k = 1.
        for kernel in kernels_here() {
            for &(m, n, k) in &[
                (16, 1024, 27),
                (7, 100, 9),
                (64, 64, 576),
                (5, 17, 1),
                (32, 200, 288),
                (48, 80, 72),
                (33, 130, 100),
                (16, 16, 32),
                (10, 1000, 576),
            ] {
                let a = random(m * k, 1);
                let b = random(k * n, 2);
                let c0 = random(m * n, 3);
                let w = GemmWeight::new(a.clone(), m, k, Precision::Bf16);
                let ar: Vec<f32> = a.iter().map(|&v| round_bf16(v)).collect();
                let br: Vec<f32> = b.iter().map(|&v| round_bf16(v)).collect();
                let want = reference(m, n, k, &ar, &br, &c0);
                let zeros = vec![0f32; n];
                let row = |r: usize| if r < k { &b[r * n..][..n] } else { &zeros[..] };
                // B given as f32 rows, then as interleaved bf16 pair rows.
                for via_pairs in [false, true] {
                    let mut c = c0.clone();
                    // Past the end of C: the kernel must leave it alone.
                    c.extend([7.0; 40]);
                    if via_pairs {
                        let pair_row =
                            |p: usize, d: &mut [u32]| pair_bits(row(2 * p), row(2 * p + 1), d);
                        w.accumulate_pair_rows_with(kernel, n, pair_row, &mut c);
                    } else {
                        w.accumulate_rows_with(kernel, n, |r, d| d.copy_from_slice(row(r)), &mut c);
                    }
                    assert_eq!(c[m * n..], [7.0; 40], "{kernel} wrote past C");
                    for (got, (want, abs)) in c.iter().zip(&want) {
                        // Products of bf16 values are exact in f32; only the f32 sums round.
                        assert!(
                            (*got as f64 - want).abs() <= 1e-6 * abs + 1e-7,
                            "{kernel} ({m},{n},{k}) pairs {via_pairs}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn f32_weights_are_the_plain_gemm() {
        let (m, n, k) = (8, 50, 30);
        let a = random(m * k, 4);
        let b = random(k * n, 5);
        let mut c = vec![0f32; m * n];
        GemmWeight::new(a.clone(), m, k, Precision::F32).accumulate(n, &b, &mut c);
        for (got, (want, abs)) in c.iter().zip(reference(m, n, k, &a, &b, &vec![0.0; m * n])) {
            assert!((*got as f64 - want).abs() <= 1e-6 * abs + 1e-7);
        }
    }

    #[test]
    fn kernel_levels_parse_and_bad_values_are_named() {
        assert_eq!("native".parse::<KernelLevel>(), Ok(KernelLevel::Native));
        assert_eq!("".parse::<KernelLevel>(), Ok(KernelLevel::Native));
        assert_eq!(
            " portable".parse::<KernelLevel>(),
            Ok(KernelLevel::Portable)
        );
        assert_eq!("avx512".parse::<KernelLevel>(), Ok(KernelLevel::Avx512));
        assert_eq!("avx2".parse::<KernelLevel>(), Ok(KernelLevel::Avx2));
        let e = "amx".parse::<KernelLevel>().unwrap_err();
        assert!(
            e.contains("CAF_KERNELS=\"amx\"")
                && e.contains("portable")
                && e.contains("avx512")
                && e.contains("avx2"),
            "{e}"
        );
        // Forcing the fall-back never claims the kernel; the kernel needs the CPU's support.
        assert!(!bf16_kernel_available() || cpu_has_bf16_kernel());
        if kernel_level() == KernelLevel::Portable {
            assert!(!bf16_kernel_available());
        }
        // Each level caps the kernel; AMX only at `native`.
        assert_eq!(
            best_bf16_kernel(KernelLevel::Portable),
            Bf16Kernel::Emulated
        );
        assert_eq!(best_bf16_kernel(KernelLevel::Avx2), Bf16Kernel::Emulated);
        assert!(best_bf16_kernel(KernelLevel::Avx512) <= Bf16Kernel::Avx512Bf16);
        assert_eq!(
            best_bf16_kernel(KernelLevel::Native) == Bf16Kernel::Amx,
            cpu_has_amx()
        );
    }

    #[test]
    fn precision_parses_and_prints() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("f32".parse::<Precision>(), Ok(Precision::F32));
        assert_eq!("int8".parse::<Precision>(), Ok(Precision::Int8));
        assert!("fp16"
            .parse::<Precision>()
            .unwrap_err()
            .contains("f32, bf16 or int8"));
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        assert_eq!(Precision::Int8.to_string(), "int8");
        assert_eq!(
            serde_json::to_string(&Precision::Bf16).ok().as_deref(),
            Some("\"bf16\"")
        );
    }
}
