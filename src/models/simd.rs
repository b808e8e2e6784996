//! Which vector instructions caf's own CPU kernels use, picked once per process at run time.
//!
//! The release build targets baseline x86-64 (SSE2) so one binary runs on every server; the
//! kernels that matter are compiled again for AVX2 and AVX-512 and picked here. Two styles:
//! explicit-vector kernels (the direct convolutions, the exact GELU) are built per level with
//! their own macros, and plain element-wise loops (BatchNorm's sums and maps, the residual
//! block's pre-activation and masks, per-channel affine maps) run through [`widest`], which
//! recompiles the closure it is given for the level's vectors. Why the latter: `perf` of a
//! ResNet-20 training step showed those loops in 4-wide SSE and scalar code, a third of the
//! step's samples, on a CPU with 16-wide AVX-512.
//!
//! Results do not depend on the level: the loops are element-wise or keep their own fixed
//! partial sums (which the vectoriser maps onto lanes without reordering), and Rust never fuses
//! a multiply and an add, with FMA enabled or not. `CAF_KERNELS=portable` keeps the baseline
//! build, so the fall-backs are tested on any CPU.

use super::gemm::{kernel_level, KernelLevel};

/// Which build of caf's own vectorised kernels (the exact GELU, the direct 3×3 convolutions)
/// runs: each has one body compiled for AVX-512 F and for AVX2 (both with FMA available) and a
/// plain one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SimdLevel {
    Portable,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

/// The widest [`SimdLevel`] this CPU runs, capped by [`super::gemm::KERNELS_ENV`] (`avx2`: at
/// most the AVX2 builds; `portable`: the plain builds).
pub(crate) fn simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    if kernel_level() >= KernelLevel::Avx2 && std::arch::is_x86_feature_detected!("fma") {
        if kernel_level() >= KernelLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512f") {
            return SimdLevel::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Portable
}

/// Every [`SimdLevel`] this CPU runs, whatever [`super::gemm::KERNELS_ENV`] says (tests compare the builds).
#[cfg(test)]
pub(crate) fn simd_levels_here() -> Vec<SimdLevel> {
    let mut v = vec![SimdLevel::Portable];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        if std::arch::is_x86_feature_detected!("avx2") {
            v.push(SimdLevel::Avx2);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push(SimdLevel::Avx512);
        }
    }
    v
}

/// `f()` compiled for the widest vectors this CPU has (see the module docs), or for the
/// baseline under `CAF_KERNELS=portable`. `f` should be a loop over slices whose helpers are
/// `#[inline(always)]`: it is inlined into a function built for the level, and what it calls
/// out of line keeps the baseline build. Its scalars and accumulators should be its own (a
/// `move` closure, or locals inside it): captured by reference they live in the caller's
/// memory, which the loop's stores might alias, and LLVM may leave the loop scalar in one
/// build and not another (BatchNorm's input gradient was scalar in the AVX2 build only).
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    with(simd_level(), f)
}

/// `f()` compiled for `level`'s vectors, which this CPU must have ([`simd_level`] or below).
#[inline(always)]
pub(crate) fn with<R>(level: SimdLevel, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level {
            // SAFETY: the caller's level is one the CPU has.
            SimdLevel::Avx512 => return unsafe { avx512(f) },
            // SAFETY: as above.
            SimdLevel::Avx2 => return unsafe { avx2(f) },
            SimdLevel::Portable => {}
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops `widest` recompiles give the same bits at every level this CPU has: an affine
    /// map with a ReLU, a select on a mask, and f64 partial sums kept in eight lanes (the
    /// shapes of BatchNorm's passes and the residual block's).
    #[test]
    fn every_level_gives_the_same_bits() {
        let x: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let g: Vec<f32> = (0..4099)
            .map(|i| ((i * 104_729) % 997) as f32 / 31.0 - 16.0)
            .collect();
        let run = |level| {
            with(
                level,
                #[inline(always)]
                || {
                    let y: Vec<f32> = x.iter().map(|&v| (v * 0.37 + 1.25).max(0.0)).collect();
                    let m: Vec<f32> = y
                        .iter()
                        .zip(&g)
                        .map(|(&v, &g)| if v - 1.5 >= 0.0 { g } else { 0.0 })
                        .collect();
                    let mut lanes = [0f64; 8];
                    for c in m.chunks_exact(8) {
                        for (s, (&a, &b)) in lanes.iter_mut().zip(c.iter().zip(&x)) {
                            *s += f64::from(a) * f64::from(b * 0.5 - 0.25);
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    (bits(&y), bits(&m), lanes.map(f64::to_bits))
                },
            )
        };
        let levels = simd_levels_here();
        let portable = run(SimdLevel::Portable);
        assert!(portable.0.iter().any(|&b| b != 0), "a non-trivial case");
        for level in levels {
            assert_eq!(run(level), portable, "{level:?}");
        }
    }
}
