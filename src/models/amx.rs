//! The bf16 GEMM on AMX tiles (`TDPBF16PS`, Intel Sapphire Rapids and later).
//!
//! A tile multiply takes a 16 × 32 bf16 block of A (16 rows of 16 bf16 pairs), a 16-pair ×
//! 16-column block of B in the pair-interleaved ("VNNI") layout (row p holds B's rows 2p and
//! 2p + 1, interleaved), and adds their product into a 16 × 16 f32 block of C. Each bf16 product is exact in
//! f32; the sums round in f32, in another order than the AVX-512 BF16 kernel's. So the AMX
//! kernel computes the same rounded classifier as the other two bf16 paths, which differ from
//! it only in summation order (tested against an f64 product of the rounded operands).
//!
//! The operands are padded so that every tile is full: A to a multiple of 16 rows and of 16
//! pairs (zeros), B to a multiple of 16 pairs (zero rows) and of 16 columns. C blocks that reach past the matrix go through a scratch block, so nothing outside
//! C is read or written.
//!
//! Linux gives a process the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`); [`available`] asks once and says no when the kernel refuses, so the
//! caller falls back to the AVX-512 BF16 kernel. The tile instructions are written in inline
//! assembly: Rust's AMX intrinsics are not stable.

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

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
fn cpu_has_amx_bf16() -> bool {
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
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
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

/// A's pairs laid out for the tiles: `rows` rounded up to 16, `k2` pairs per row rounded up to
/// 16, zeros in the padding. `pairs` holds `rows` rows of `k2` pairs.
pub(crate) fn pad_rows(pairs: &[u32], rows: usize, k2: usize) -> Vec<u32> {
    let (mp, k2p) = (padded(rows, TILE_ROWS), padded(k2, TILE_PAIRS));
    let mut out = vec![0u32; mp * k2p];
    for (src, dst) in pairs.chunks_exact(k2).zip(out.chunks_exact_mut(k2p)) {
        dst[..k2].copy_from_slice(src);
    }
    out
}

/// `x` rounded up to a multiple of `to`.
pub(crate) fn padded(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

#[cfg(target_arch = "x86_64")]
pub(crate) use kernel::gemm;

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

    /// Where a C tile lives during a block: in C itself, or in a scratch block when the tile
    /// reaches past C's rows or columns.
    struct CTile {
        ptr: *mut f32,
        stride: usize,
        /// (rows, columns) of C the tile covers when it is a scratch copy.
        partial: Option<(usize, usize)>,
    }

    /// `c[m×n] += A · B`: A as [`pad_rows`](super::pad_rows) lays it out (m rounded up to 16
    /// rows of `k2p` pairs), B as `k2p` rows of `ldb` interleaved pairs (row p holds B's rows
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
        let (mp, np) = (padded(m, TILE_ROWS), padded(n, TILE_COLS));
        assert!(k2p.is_multiple_of(TILE_PAIRS) && ldb >= np);
        assert!(a.len() >= mp * k2p && b.len() >= k2p * ldb && c.len() >= m * n);
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
                block(
                    mt,
                    nt,
                    &tiles,
                    a.as_ptr().add(i0 * k2p),
                    k2p,
                    b.as_ptr().add(j0),
                    ldb,
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

    /// One block of `mt` × `nt` C tiles (tiles 0, 1 in the first row, 2, 3 in the second):
    /// load them, add A's `mt` row tiles times B's `nt` column tiles over all `k2p` pairs, store.
    ///
    /// # Safety
    /// The tile configuration is loaded; `tiles` point at 16 × 16 f32 blocks with their
    /// strides; `a` at 16·mt rows of `k2p` pairs; `b` at `k2p` rows of `b_stride` u32s, 16·nt
    /// of which are read per row.
    #[inline(always)]
    unsafe fn block(
        mt: usize,
        nt: usize,
        tiles: &[CTile; 4],
        a: *const u32,
        k2p: usize,
        b: *const u32,
        b_stride: usize,
    ) {
        let (a_stride, b_bytes) = (k2p * 4, b_stride * 4);
        let a1 = a.add(TILE_ROWS * k2p);
        let b1 = b.add(TILE_COLS);
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
        for p in (0..k2p).step_by(TILE_PAIRS) {
            let (ap, bp) = (p, p * b_stride);
            tile_load!("4", a.add(ap), a_stride);
            tile_load!("6", b.add(bp), b_bytes);
            tile_dot!("0", "4", "6");
            if nt == 2 {
                tile_load!("7", b1.add(bp), b_bytes);
                tile_dot!("1", "4", "7");
            }
            if mt == 2 {
                tile_load!("5", a1.add(ap), a_stride);
                tile_dot!("2", "5", "6");
                if nt == 2 {
                    tile_dot!("3", "5", "7");
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
