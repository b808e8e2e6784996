//! bf16 GEMMs and convolutions on AMX tiles (`TDPBF16PS`, Intel Sapphire Rapids and later).
//!
//! A tile multiply takes a 16 × 32 bf16 block of A (16 rows of 16 bf16 pairs), a 16-pair ×
//! 16-column block of B in the pair-interleaved ("VNNI") layout (row p holds B's rows 2p and
//! 2p + 1, interleaved), and adds their product into a 16 × 16 f32 block of C. Each bf16
//! product is exact in f32; the sums round in f32, in another order than the AVX-512 BF16
//! kernel's. So the AMX kernels compute the same rounded classifier as the other two bf16 paths,
//! which differ from them only in summation order (tested against f64 sums of the rounded
//! operands).
//!
//! [`gemm`] multiplies operands padded so that every tile is full (A to a multiple of 16 rows
//! and of 16 pairs, B to a multiple of 16 pair rows and 16 columns); C blocks that reach past
//! the matrix go through a scratch block, so nothing outside C is read or written.
//! [`conv_bf16`] runs a convolution's products without an im2col (see [`PlaneLayout`]; the
//! convolution around it is `super::plane_conv::bf16`), [`conv_i8`] the same in int8
//! (`tdpbsud`, for `super::int8`).
//!
//! Linux gives a process the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`); [`available`] asks once and says no when the kernel refuses, so the
//! caller falls back to the AVX-512 BF16 kernel. The tile instructions are written in inline
//! assembly: Rust's AMX intrinsics are not stable.

use super::planes::PlaneLayout;

/// Rows of a tile (of A and C).
pub(crate) const TILE_ROWS: usize = 16;
/// bf16 pairs in a row of an A tile, which is also the pair rows of a B tile.
pub(crate) const TILE_PAIRS: usize = 16;
/// f32 columns of a C tile (and u32 columns of a B tile).
pub(crate) const TILE_COLS: usize = 16;

/// Whether this CPU has AMX-BF16 and the OS lets this process use the tiles (asked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && request_tile_state())
}

/// Whether this CPU has AMX-INT8 and the OS lets this process use the tiles (asked once).
pub(crate) fn int8_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_amx_bits(1 << 25) && request_tile_state())
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
fn cpu_has_amx_bf16() -> bool {
    cpu_amx_bits(1 << 22)
}

/// Whether CPUID leaf 7's EDX has AMX-TILE (bit 24) and every bit of `unit` (AMX-BF16 is bit
/// 22, AMX-INT8 bit 25).
fn cpu_amx_bits(unit: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when the CPU reports it.
        #[allow(unused_unsafe)]
        let edx = unsafe {
            if __cpuid(0).eax < 7 {
                return false;
            }
            __cpuid_count(7, 0).edx
        };
        edx & unit == unit && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = unit;
        false
    }
}

/// Asks Linux for the tile data state (Linux ≥ 5.16); without it the first tile instruction
/// raises SIGILL.
fn request_tile_state() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes this process's permitted
        // xsave features; it reads no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// `x` rounded up to a multiple of `to`.
pub(crate) fn padded(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// `tmp` ([mp rows, g images × `layout.out_values()`], every value written) = the f32 sums
/// Σ_taps Σ_groups A_tap · B_tap of a convolution on AMX-BF16 tiles: `taps` as
/// `plane_conv::conv_taps` writes them, `planes` as `plane_conv::pack_planes` does (bf16
/// pairs). Returns false, computing nothing, when AMX-BF16 is not available.
pub(crate) fn conv_bf16(
    mp: usize,
    g: usize,
    layout: &PlaneLayout,
    taps: &[u32],
    planes: &[u32],
    tmp: &mut [f32],
) -> bool {
    assert!(mp.is_multiple_of(TILE_ROWS));
    if !available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX-BF16 is available; mp is whole tiles, and the tile loop checks the operands'
    // sizes against the layout.
    unsafe {
        kernel::conv::<f32>(mp, g, layout, taps, planes, tmp)
    };
    true
}

/// `tmp` ([mp rows, g images × `layout.out_values()`], every value written) = the i32 sums
/// Σ_taps Σ_groups A_tap · B_tap of a convolution on AMX-INT8 tiles: `taps` as
/// `plane_conv::conv_taps_i8` writes them, `planes` as `int8::pack_planes_i8` writes them
/// (unsigned bytes). Returns false, computing nothing, when AMX-INT8 is not available.
pub(crate) fn conv_i8(
    taps: &[u32],
    mp: usize,
    g: usize,
    layout: &PlaneLayout,
    planes: &[u32],
    tmp: &mut [i32],
) -> bool {
    assert!(mp.is_multiple_of(TILE_ROWS));
    if !int8_available() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX-INT8 is available; mp is whole tiles, and the tile loop checks the operands'
    // sizes against the layout.
    unsafe {
        kernel::conv::<i32>(mp, g, layout, taps, planes, tmp)
    };
    true
}

#[cfg(target_arch = "x86_64")]
pub(crate) use kernel::{gemm, gemm_panels, PANEL_COLS};

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{padded, TILE_COLS, TILE_PAIRS, TILE_ROWS};
    use std::arch::asm;

    /// The tile configuration (palette 1): tiles 0–3 hold C blocks, 4–5 A blocks, 6–7 B
    /// blocks, all 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        TileConfig(c)
    };

    macro_rules! tile_load {
        ($t:literal, $ptr:expr, $stride:expr) => {
            asm!(
                concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
                p = in(reg) $ptr,
                s = in(reg) $stride,
                options(nostack, preserves_flags)
            )
        };
    }

    macro_rules! tile_store {
        ($t:literal, $ptr:expr, $stride:expr) => {
            asm!(
                concat!("tilestored [{p} + {s}*1], tmm", $t),
                p = in(reg) $ptr,
                s = in(reg) $stride,
                options(nostack, preserves_flags)
            )
        };
    }

    macro_rules! tile_dot {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                options(nostack, nomem, preserves_flags)
            )
        };
    }

    macro_rules! tile_dot_i8 {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $b),
                options(nostack, nomem, preserves_flags)
            )
        };
    }

    /// What a C tile sums: f32 (`tdpbf16ps` of bf16 pairs) or i32 (`tdpbsud` of signed by
    /// unsigned bytes).
    pub(crate) trait TileSum: Copy {
        const INT8: bool;
    }
    impl TileSum for f32 {
        const INT8: bool = false;
    }
    impl TileSum for i32 {
        const INT8: bool = true;
    }

    /// Where a C tile lives during a block: in C itself, or in a scratch block when the tile
    /// reaches past C's rows or columns (a C tile's 16 × 16 sums, f32 or i32; see [`TileSum`]).
    struct CTile {
        ptr: *mut f32,
        stride: usize,
        /// (rows, columns) of C the tile covers when it is a scratch copy.
        partial: Option<(usize, usize)>,
    }

    /// `c[m×n] += A · B`: A as m rows (rounded up to 16, zeros past m) of `k2p` pairs, B as `k2p` rows of `ldb` interleaved pairs (row p holds B's rows
    /// 2p and 2p + 1).
    ///
    /// # Safety
    /// [`available`](super::available) must have returned true; `k2p` a multiple of 16;
    /// `a.len() ≥ padded(m, 16)·k2p`; `ldb ≥ padded(n, 16)` and `b.len() ≥ k2p·ldb`;
    /// `c.len() ≥ m·n`.
    pub(crate) unsafe fn gemm(
        m: usize,
        n: usize,
        k2p: usize,
        a: &[u32],
        (b, ldb): (&[u32], usize),
        c: &mut [f32],
    ) {
        let np = padded(n, TILE_COLS);
        assert!(ldb >= np && b.len() >= k2p * ldb);
        gemm_with(m, n, k2p, a, |j0| (b.as_ptr().add(j0), ldb), c)
    }

    /// Columns of a panel of [`gemm_panels`]'s right operand (two tiles).
    pub(crate) const PANEL_COLS: usize = 2 * TILE_COLS;

    /// [`gemm`] with B in panels of [`PANEL_COLS`] columns: panel q holds B's columns
    /// [32q, 32q + 32) as `k2p` rows of 32 interleaved pairs (zero past n), one panel after the
    /// other. A tile of B is then 16 rows 128 bytes apart; read from a row-major B thousands of
    /// columns wide, every row of a tile is on another page.
    ///
    /// # Safety
    /// As [`gemm`], with `b.len() ≥ k2p·padded(n, 32)`.
    pub(crate) unsafe fn gemm_panels(
        m: usize,
        n: usize,
        k2p: usize,
        a: &[u32],
        b: &[u32],
        c: &mut [f32],
    ) {
        assert!(b.len() >= k2p * padded(n, PANEL_COLS));
        gemm_with(
            m,
            n,
            k2p,
            a,
            |j0| {
                (
                    b.as_ptr().add(j0 / PANEL_COLS * k2p * PANEL_COLS),
                    PANEL_COLS,
                )
            },
            c,
        )
    }

    /// The tile loop of [`gemm`] and [`gemm_panels`]: `b_at(j0)` is the start and row stride
    /// of B's columns from j0 on (j0 a multiple of 32; the next 16 columns start 16 values on).
    unsafe fn gemm_with(
        m: usize,
        n: usize,
        k2p: usize,
        a: &[u32],
        b_at: impl Fn(usize) -> (*const u32, usize),
        c: &mut [f32],
    ) {
        let (mp, np) = (padded(m, TILE_ROWS), padded(n, TILE_COLS));
        assert!(k2p.is_multiple_of(TILE_PAIRS));
        assert!(a.len() >= mp * k2p && c.len() >= m * n);
        let mut scratch = [[0f32; TILE_ROWS * TILE_COLS]; 4];
        asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
        for j0 in (0..np).step_by(2 * TILE_COLS) {
            let nt = if j0 + 2 * TILE_COLS <= np { 2 } else { 1 };
            for i0 in (0..mp).step_by(2 * TILE_ROWS) {
                let mt = if i0 + 2 * TILE_ROWS <= mp { 2 } else { 1 };
                let mut tiles: [CTile; 4] = std::array::from_fn(|_| CTile {
                    ptr: std::ptr::null_mut(),
                    stride: 0,
                    partial: None,
                });
                for (idx, (tile, buf)) in tiles.iter_mut().zip(scratch.iter_mut()).enumerate() {
                    let (mi, ni) = (idx / 2, idx % 2);
                    if mi >= mt || ni >= nt {
                        continue;
                    }
                    let (i, j) = (i0 + mi * TILE_ROWS, j0 + ni * TILE_COLS);
                    let (rows, cols) = ((m - i).min(TILE_ROWS), (n - j).min(TILE_COLS));
                    *tile = if rows == TILE_ROWS && cols == TILE_COLS {
                        CTile {
                            ptr: c.as_mut_ptr().add(i * n + j),
                            stride: n * 4,
                            partial: None,
                        }
                    } else {
                        buf.fill(0.0);
                        for r in 0..rows {
                            buf[r * TILE_COLS..][..cols]
                                .copy_from_slice(&c[(i + r) * n + j..][..cols]);
                        }
                        CTile {
                            ptr: buf.as_mut_ptr(),
                            stride: TILE_COLS * 4,
                            partial: Some((rows, cols)),
                        }
                    };
                }
                let (b_j0, ldb) = b_at(j0);
                let steps = (0..k2p).step_by(TILE_PAIRS).map(|p| (p, p * ldb));
                block::<f32>(
                    (mt, nt),
                    &tiles,
                    true,
                    (a.as_ptr().add(i0 * k2p), k2p),
                    (b_j0, ldb),
                    steps,
                );
                for (idx, (tile, buf)) in tiles.iter().zip(scratch.iter()).enumerate() {
                    if let Some((rows, cols)) = tile.partial {
                        let (i, j) = (i0 + (idx / 2) * TILE_ROWS, j0 + (idx % 2) * TILE_COLS);
                        for r in 0..rows {
                            c[(i + r) * n + j..][..cols]
                                .copy_from_slice(&buf[r * TILE_COLS..][..cols]);
                        }
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }

    /// The tile loop of [`conv_bf16`](super::conv_bf16) and [`conv_i8`](super::conv_i8): `tmp` ([mp rows,
    /// g images × tiles · 16 padded-row outputs]) = Σ over taps and group tiles of A_tap · B_tap,
    /// in f32 from bf16 pairs (`T` = f32) or in i32 from signed × unsigned bytes (`T` = i32).
    ///
    /// # Safety
    /// [`available`](super::available) (bf16) or [`int8_available`](super::int8_available)
    /// (int8) must have returned true; `taps` holds k·k taps of `mp` rows of `layout.groups`
    /// groups, `planes` g·s²·groups planes of `layout.stride` values and `tmp` mp·g·tiles·16
    /// values.
    pub(super) unsafe fn conv<T: TileSum>(
        mp: usize,
        g: usize,
        layout: &super::PlaneLayout,
        taps: &[u32],
        planes: &[u32],
        tmp: &mut [T],
    ) {
        let (k, qp, stride, step) = (layout.k, layout.groups, layout.stride, layout.step);
        let image = layout.image_values();
        let plane_out = layout.out_values();
        let ld = g * plane_out;
        layout.assert_operands((taps.len(), mp, g), planes.len(), tmp.len());
        let steps = move || {
            (0..k * k).flat_map(move |t| {
                let shift = layout.tap(t);
                (0..qp)
                    .step_by(step)
                    .map(move |q| (t * mp * qp + q, q * stride + shift))
            })
        };
        // A tiles of `step` pairs (4 bytes each) per row, B tiles of `step` pair rows.
        let mut config = TileConfig(CONFIG.0);
        for t in [4, 5] {
            config.0[16 + 2 * t] = (step * 4) as u8;
        }
        for t in [6, 7] {
            config.0[48 + t] = step as u8;
        }
        asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly, preserves_flags));
        for gi in 0..g {
            let b = planes.as_ptr().add(gi * image);
            for o0 in (0..layout.tiles).step_by(2) {
                let nt = (layout.tiles - o0).min(2);
                for i0 in (0..mp).step_by(2 * TILE_ROWS) {
                    let mt = if i0 + 2 * TILE_ROWS <= mp { 2 } else { 1 };
                    let tiles: [CTile; 4] = std::array::from_fn(|idx| {
                        let (mi, ni) = (idx / 2, idx % 2);
                        let (i, o) = (i0 + mi * TILE_ROWS, (o0 + ni) * TILE_COLS);
                        // Unused tiles (past mt, nt) are never stored.
                        let at = if mi < mt && ni < nt {
                            i * ld + gi * plane_out + o
                        } else {
                            0
                        };
                        CTile {
                            ptr: tmp.as_mut_ptr().add(at).cast(),
                            stride: ld * 4,
                            partial: None,
                        }
                    });
                    block::<T>(
                        (mt, nt),
                        &tiles,
                        false,
                        (taps.as_ptr().add(i0 * qp), qp),
                        (b.add(o0 * TILE_COLS), stride),
                        steps(),
                    );
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }

    /// One block of `mt` × `nt` C tiles (tiles 0, 1 in the first row, 2, 3 in the second):
    /// load them (or start from zero), add A's `mt` row tiles times B's `nt` column tiles for
    /// each step, store them. Step (da, db) reads A's first row tile at `a + da` (its second
    /// 16 rows of `lda` pairs further) and B's first column tile at `b + db` (its second 16
    /// columns further), B's rows `ldb` u32s apart.
    ///
    /// # Safety
    /// The tile configuration is loaded; `tiles` point at 16 × 16 f32 blocks with their
    /// strides; every step's tiles lie inside A and B.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<T: TileSum>(
        (mt, nt): (usize, usize),
        tiles: &[CTile; 4],
        load_c: bool,
        (a, lda): (*const u32, usize),
        (b, ldb): (*const u32, usize),
        steps: impl Iterator<Item = (usize, usize)>,
    ) {
        let (a_bytes, b_bytes) = (lda * 4, ldb * 4);
        let a1 = a.add(TILE_ROWS * lda);
        let b1 = b.add(TILE_COLS);
        if load_c {
            tile_load!("0", tiles[0].ptr, tiles[0].stride);
            if nt == 2 {
                tile_load!("1", tiles[1].ptr, tiles[1].stride);
            }
            if mt == 2 {
                tile_load!("2", tiles[2].ptr, tiles[2].stride);
                if nt == 2 {
                    tile_load!("3", tiles[3].ptr, tiles[3].stride);
                }
            }
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
        }
        for (da, db) in steps {
            tile_load!("4", a.add(da), a_bytes);
            tile_load!("6", b.add(db), b_bytes);
            if T::INT8 {
                tile_dot_i8!("0", "4", "6");
            } else {
                tile_dot!("0", "4", "6");
            }
            if nt == 2 {
                tile_load!("7", b1.add(db), b_bytes);
                if T::INT8 {
                    tile_dot_i8!("1", "4", "7");
                } else {
                    tile_dot!("1", "4", "7");
                }
            }
            if mt == 2 {
                tile_load!("5", a1.add(da), a_bytes);
                if T::INT8 {
                    tile_dot_i8!("2", "5", "6");
                } else {
                    tile_dot!("2", "5", "6");
                }
                if nt == 2 {
                    if T::INT8 {
                        tile_dot_i8!("3", "5", "7");
                    } else {
                        tile_dot!("3", "5", "7");
                    }
                }
            }
        }
        tile_store!("0", tiles[0].ptr, tiles[0].stride);
        if nt == 2 {
            tile_store!("1", tiles[1].ptr, tiles[1].stride);
        }
        if mt == 2 {
            tile_store!("2", tiles[2].ptr, tiles[2].stride);
            if nt == 2 {
                tile_store!("3", tiles[3].ptr, tiles[3].stride);
            }
        }
    }
}
