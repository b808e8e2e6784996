//! Convolutions that read their input in place from group planes ([`PlaneLayout`]), without an
//! im2col: the bf16 convolution ([`bf16`]: the weights as taps, the input as pair planes, the
//! products on AMX tiles or with `vdpbf16ps`, the padded output rows added into the output),
//! the int8 taps `super::int8` gives the same kernels, and the AVX-512 tile loop of the CPUs
//! without AMX: one loop, compiled once for `vdpbf16ps` (AVX-512 BF16, f32 sums of bf16 pairs)
//! and once for `vpdpbusd` (VNNI, i32 sums of byte quads: [`vnni_i8`]).
//!
//! Every bf16 product is exact in f32, so the two bf16 kernels compute the same rounded
//! classifier and differ only in the order of the f32 sums, like the bf16 GEMM kernels
//! (`super::gemm`); the int8 sums are exact integers, the same in every kernel.

use super::amx::{self, padded, TILE_COLS, TILE_ROWS};
use super::gemm::{best_bf16_kernel, Bf16Kernel, KernelLevel};
use super::planes::{group_tiles, PlaneLayout};

/// Whether this CPU has AVX-512 F and VNNI ([`vnni_i8`]'s instructions).
pub(crate) fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A convolution's bf16 weights for [`bf16`]: per kernel tap t = (ky, kx), an A
/// operand of `c_out` rounded up to 16 rows and [`group_tiles`]`(c_in, 2)` pairs, row o pair q
/// holding bf16(w[o][2q][ky][kx]) | bf16(w[o][2q + 1][ky][kx]) << 16 (zero past the
/// channels). `values` is [c_out, c_in·k·k] in PyTorch's (c, ky, kx) order.
pub(crate) fn conv_taps(values: &[f32], c_out: usize, c_in: usize, k: usize) -> Vec<u32> {
    use super::gemm::bf16_bits;
    let (kk, mp) = (k * k, padded(c_out, TILE_ROWS));
    let qp = group_tiles(c_in, 2).1;
    let mut out = vec![0u32; kk * mp * qp];
    for t in 0..kk {
        for o in 0..c_out {
            let row = &values[o * c_in * kk..][..c_in * kk];
            let dst = &mut out[(t * mp + o) * qp..][..qp];
            for (q, d) in dst.iter_mut().enumerate().take(c_in.div_ceil(2)) {
                let lo = bf16_bits(row[2 * q * kk + t]);
                let hi = if 2 * q + 1 < c_in {
                    bf16_bits(row[(2 * q + 1) * kk + t])
                } else {
                    0
                };
                *d = lo | (hi << 16);
            }
        }
    }
    out
}

thread_local! {
    /// The input as pair planes and the padded-row outputs, reused across calls.
    static CONV_SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `out += conv(x)` for a k×k convolution (padding k/2, stride s) of `g` images in bf16, by
/// `kernel` (AMX tiles or AVX-512 BF16: one this CPU has, not the emulated one): `x` is
/// [c_in, g, h, w] f32, rounded to bf16 here; `taps` as [`conv_taps`] writes them; `out` is
/// [c_out, g, ho, wo].
pub(crate) fn bf16(
    kernel: Bf16Kernel,
    taps: &[u32],
    (c_in, c_out, k, s): (usize, usize, usize, usize),
    g: usize,
    (h, w): (usize, usize),
    x: &[f32],
    out: &mut [f32],
) {
    let layout = PlaneLayout::new(c_in, 2, (h, w), k, s);
    let mp = padded(c_out, TILE_ROWS);
    let (ho, wo) = (layout.ho, layout.wo);
    assert!(s >= 1 && taps.len() == k * k * mp * layout.groups);
    assert!(x.len() >= c_in * g * h * w && out.len() >= c_out * g * ho * wo);
    assert!(
        kernel != Bf16Kernel::Emulated && kernel <= best_bf16_kernel(KernelLevel::Native),
        "{kernel} plane convolution requested on a CPU without it"
    );
    CONV_SCRATCH.with_borrow_mut(|(planes, tmp)| {
        pack_planes(x, c_in, g, &layout, planes);
        let ld = g * layout.out_values();
        if tmp.len() < mp * ld {
            tmp.resize(mp * ld, 0.0);
        }
        let tmp = &mut tmp[..mp * ld];
        let done = match kernel {
            Bf16Kernel::Amx => amx::conv_bf16(mp, g, &layout, taps, planes, tmp),
            _ => dot::bf16::conv(taps, mp, g, &layout, planes, tmp),
        };
        assert!(done, "{kernel} kernel unavailable");
        let (wpp, plane_out) = (layout.wpp, layout.out_values());
        for (c, o) in out.chunks_exact_mut(g * ho * wo).take(c_out).enumerate() {
            for (gi, img) in o.chunks_exact_mut(ho * wo).enumerate() {
                let src = &tmp[c * ld + gi * plane_out..][..plane_out];
                for (y, row) in img.chunks_exact_mut(wo).enumerate() {
                    for (d, &v) in row.iter_mut().zip(&src[y * wpp..]) {
                        *d += v;
                    }
                }
            }
        }
    });
}

/// `acc` ([mp rows, g images × `layout.out_values()`], every value written) = the i32 sums of
/// an int8 convolution with `vpdpbusd`: the operands and sums of `amx::conv_i8` (`taps` as
/// [`conv_taps_i8`] writes them, `planes` as `int8::pack_planes_i8` does). Returns false,
/// computing nothing, without AVX-512 VNNI.
pub(crate) fn vnni_i8(
    taps: &[u32],
    mp: usize,
    g: usize,
    layout: &PlaneLayout,
    planes: &[u32],
    acc: &mut [i32],
) -> bool {
    dot::vnni::conv(taps, mp, g, layout, planes, acc)
}

/// A convolution's int8 weights for `amx::conv_i8` and [`vnni_i8`]: per kernel tap
/// t = (ky, kx), `c_out` rounded up to 16 rows of [`group_tiles`]`(c_in, 4)` groups, row o group
/// q holding the signed bytes of w_q[o][4q + l][ky][kx] in byte l (zero past the channels).
/// `q` is [c_out, c_in·k·k] in PyTorch's (c, ky, kx) order.
pub(crate) fn conv_taps_i8(q: &[i8], c_out: usize, c_in: usize, k: usize) -> Vec<u32> {
    let (kk, mp) = (k * k, padded(c_out, TILE_ROWS));
    let qp = group_tiles(c_in, 4).1;
    let mut out = vec![0u32; kk * mp * qp];
    for t in 0..kk {
        for o in 0..c_out {
            let row = &q[o * c_in * kk..][..c_in * kk];
            let dst = &mut out[(t * mp + o) * qp..][..qp];
            for (g, d) in dst.iter_mut().enumerate().take(c_in.div_ceil(4)) {
                let byte = |l: usize| {
                    let c = 4 * g + l;
                    if c < c_in {
                        u32::from(row[c * kk + t] as u8) << (8 * l)
                    } else {
                        0
                    }
                };
                *d = byte(0) | byte(1) | byte(2) | byte(3);
            }
        }
    }
    out
}

/// Writes `x` ([c_in, g, h, w] f32) as `layout`'s pair planes into `dst` (resized; zero borders,
/// zero planes past the channels).
pub(crate) fn pack_planes(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    dst: &mut Vec<u32>,
) {
    dst.clear();
    dst.resize(g * layout.image_values(), 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 F.
        return unsafe { pack_planes_avx512(x, c_in, g, layout, dst) };
    }
    pack_planes_body(x, c_in, g, layout, dst)
}

/// [`pack_planes`]'s conversion compiled for AVX-512 (every CPU with AMX or AVX-512 BF16 has it).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_planes_avx512(
    x: &[f32],
    c_in: usize,
    g: usize,
    layout: &PlaneLayout,
    dst: &mut [u32],
) {
    pack_planes_body(x, c_in, g, layout, dst)
}

#[inline(always)]
fn pack_planes_body(x: &[f32], c_in: usize, g: usize, layout: &PlaneLayout, dst: &mut [u32]) {
    use super::gemm::pair_bits;
    let PlaneLayout { h, w, k, s, .. } = *layout;
    let (hw, pad) = (h * w, k / 2);
    let zeros = vec![0f32; w];
    let mut row = vec![0u32; w];
    for gi in 0..g {
        for q in 0..c_in.div_ceil(2) {
            let lo = &x[(2 * q * g + gi) * hw..][..hw];
            let hi = (2 * q + 1 < c_in).then(|| &x[((2 * q + 1) * g + gi) * hw..][..hw]);
            for y in 0..h {
                let hi_row = hi.map_or(&zeros[..], |hi| &hi[y * w..][..w]);
                if s == 1 {
                    // Straight into the plane, without the row copy.
                    let at = layout.row_at((gi, q, y), 0) + pad;
                    pair_bits(&lo[y * w..][..w], hi_row, &mut dst[at..][..w]);
                    continue;
                }
                pair_bits(&lo[y * w..][..w], hi_row, &mut row);
                layout.place_row((gi, q, y), &row, dst);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dot {
    use std::arch::x86_64::*;

    /// Output rows per tile call: 4 rows × up to 6 vectors of 16 outputs, 24 accumulators of
    /// the 32 registers (6 vectors rather than 4: +10 % for ResNet-56 in bf16 and +7 % in int8
    /// on a Zen 5, the broadcast taps read once per 6 vectors).
    const MR: usize = 4;

    /// The AVX-512 plane convolution for one dot-product instruction, as module `$name` with
    /// `conv` (checks the CPU with `$cpu`, then runs) and its tile loop, compiled with
    /// `$features`: sums of `$vec` (`$scalar` lanes, starting at `$zero()`), `$dot(sum,
    /// planes, taps)` per group (`vpdpbusd` takes its unsigned bytes first: the planes),
    /// `$store` at the end.
    macro_rules! plane_dot {
        ($name:ident, $cpu:expr, $features:literal, $scalar:ty, $vec:ty, $zero:path, $dot:path, $store:path) => {
            pub(super) mod $name {
                use super::super::{PlaneLayout, TILE_COLS as COLS};
                use super::MR;
                #[allow(unused_imports)]
                use super::*;

                /// Rows × every output of `g` images: `acc` = Σ over taps and groups of
                /// taps · planes (see [`super::super::bf16`] / [`super::super::vnni_i8`]).
                /// Returns false, computing nothing, when the CPU lacks the instructions.
                pub(in super::super) fn conv(
                    taps: &[u32],
                    mp: usize,
                    g: usize,
                    layout: &PlaneLayout,
                    planes: &[u32],
                    acc: &mut [$scalar],
                ) -> bool {
                    assert!(mp.is_multiple_of(MR));
                    layout.assert_operands((taps.len(), mp, g), planes.len(), acc.len());
                    if !$cpu {
                        return false;
                    }
                    // SAFETY: the CPU has the instructions; the sizes are asserted above, and
                    // every tap's reads stay inside its plane (`PlaneLayout::new` sizes
                    // `stride` for that).
                    unsafe { run(taps, mp, g, layout, planes, acc) };
                    true
                }

                #[target_feature(enable = $features)]
                unsafe fn run(
                    taps: &[u32],
                    mp: usize,
                    g: usize,
                    layout: &PlaneLayout,
                    planes: &[u32],
                    acc: &mut [$scalar],
                ) {
                    let image = layout.image_values();
                    let plane_out = layout.out_values();
                    let ld = g * plane_out;
                    for gi in 0..g {
                        let b = planes.as_ptr().add(gi * image);
                        let mut o0 = 0;
                        while o0 < layout.tiles {
                            let v = (layout.tiles - o0).min(6);
                            for i0 in (0..mp).step_by(MR) {
                                let c = acc.as_mut_ptr().add(i0 * ld + gi * plane_out + o0 * COLS);
                                let at = (taps.as_ptr().add(i0 * layout.groups), mp);
                                let b = b.add(o0 * COLS);
                                match v {
                                    6 => tile::<6>(layout, at, b, c, ld),
                                    5 => tile::<5>(layout, at, b, c, ld),
                                    4 => tile::<4>(layout, at, b, c, ld),
                                    3 => tile::<3>(layout, at, b, c, ld),
                                    2 => tile::<2>(layout, at, b, c, ld),
                                    _ => tile::<1>(layout, at, b, c, ld),
                                }
                            }
                            o0 += v;
                        }
                    }
                }

                /// Rows i0 … i0 + 3 × outputs o0 … o0 + 16·V − 1 of one image: `a` points at
                /// row i0 of tap 0 (taps `mp` rows apart), `b` at output o0 of the image's
                /// planes.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn tile<const V: usize>(
                    layout: &PlaneLayout,
                    (a, mp): (*const u32, usize),
                    b: *const u32,
                    c: *mut $scalar,
                    ldc: usize,
                ) {
                    let (qp, stride) = (layout.groups, layout.stride);
                    let mut sums: [[$vec; V]; MR] = [[$zero(); V]; MR];
                    for t in 0..layout.k * layout.k {
                        let (at, bt) = (a.add(t * mp * qp), b.add(layout.tap(t)));
                        for q in 0..qp {
                            let mut bv = [_mm512_setzero_si512(); V];
                            for (v, x) in bv.iter_mut().enumerate() {
                                *x = _mm512_loadu_si512(bt.add(q * stride + v * COLS) as *const _);
                            }
                            for (r, row) in sums.iter_mut().enumerate() {
                                let w = _mm512_set1_epi32(*at.add(r * qp + q) as i32);
                                for (s, &x) in row.iter_mut().zip(&bv) {
                                    *s = $dot(*s, x, w);
                                }
                            }
                        }
                    }
                    for (r, row) in sums.iter().enumerate() {
                        for (v, s) in row.iter().enumerate() {
                            $store(c.add(r * ldc + v * COLS), *s);
                        }
                    }
                }
            }
        };
    }

    plane_dot!(
        vnni,
        crate::models::plane_conv::cpu_has_vnni(),
        "avx512f,avx512vnni",
        i32,
        __m512i,
        _mm512_setzero_si512,
        _mm512_dpbusd_epi32,
        store_i32
    );
    plane_dot!(
        bf16,
        crate::models::gemm::cpu_has_bf16_kernel(),
        "avx512f,avx512bf16",
        f32,
        __m512,
        _mm512_setzero_ps,
        dot_bf16,
        _mm512_storeu_ps
    );

    /// Stores 16 i32 sums at their own pointer type.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_i32(p: *mut i32, v: __m512i) {
        _mm512_storeu_si512(p as *mut _, v)
    }

    /// `sum + Σ_pairs planes · taps` in f32 (each bf16 product exact).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot_bf16(sum: __m512, x: __m512i, w: __m512i) -> __m512 {
        _mm512_dpbf16_ps(
            sum,
            std::mem::transmute::<__m512i, __m512bh>(x),
            std::mem::transmute::<__m512i, __m512bh>(w),
        )
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod dot {
    /// No AVX-512 here: the callers never pick these kernels.
    macro_rules! none {
        ($name:ident, $scalar:ty) => {
            pub(super) mod $name {
                pub(in super::super) fn conv(
                    _: &[u32],
                    _: usize,
                    _: usize,
                    _: &super::super::PlaneLayout,
                    _: &[u32],
                    _: &mut [$scalar],
                ) -> bool {
                    false
                }
            }
        };
    }
    none!(vnni, i32);
    none!(bf16, f32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gemm::round_bf16;

    /// Each bf16 plane kernel this CPU has (AMX tiles, AVX-512 BF16) against an f64 direct sum
    /// over the rounded operands, for shapes that leave every kind of partial tile: odd channel
    /// counts, fewer than 16 output channels, planes narrower than a tile, 5×5 and even
    /// kernels, strides 2 and 3 on even and odd planes, several images, and rows of 1 to 6
    /// vectors of outputs in the AVX-512 tile loop.
    #[test]
    fn plane_convolution_is_the_direct_sum_of_the_rounded_operands() {
        let kernels: Vec<Bf16Kernel> = crate::models::gemm::tests::kernels_here()
            .into_iter()
            .filter(|&k| k != Bf16Kernel::Emulated)
            .collect();
        if kernels.is_empty() {
            eprintln!("no AMX or AVX-512 BF16 on this CPU: no plane convolution is run");
            return;
        }
        for kernel in kernels {
            plane_convolution_with(kernel);
        }
    }

    fn plane_convolution_with(kernel: Bf16Kernel) {
        for &(c_in, c_out, k, s, g, h, w) in &[
            (16, 16, 3, 1, 1, 32, 32),
            (3, 16, 3, 1, 2, 8, 8),
            (32, 48, 3, 1, 1, 8, 8),
            (5, 7, 5, 1, 2, 3, 6),
            (64, 64, 3, 1, 1, 8, 8),
            (1, 1, 1, 1, 1, 1, 1),
            (33, 20, 3, 1, 3, 2, 17),
            (16, 32, 3, 2, 1, 32, 32),
            (32, 64, 3, 2, 2, 16, 16),
            (5, 9, 3, 2, 1, 7, 9),
            (16, 32, 1, 2, 1, 8, 8),
            (4, 6, 2, 2, 1, 6, 5),
            (3, 5, 5, 3, 2, 11, 10),
            (8, 16, 3, 1, 1, 6, 8),
        ] {
            let mut seed = 12345u64;
            let mut next = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            };
            let p = k / 2;
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let weights: Vec<f32> = (0..c_out * c_in * k * k)
                .map(|_| round_bf16(next()))
                .collect();
            let x: Vec<f32> = (0..c_in * g * h * w).map(|_| next()).collect();
            let out0: Vec<f32> = (0..c_out * g * ho * wo).map(|_| next()).collect();
            let taps = conv_taps(&weights, c_out, c_in, k);
            let mut out = out0.clone();
            out.extend([7.0; 9]);
            bf16(kernel, &taps, (c_in, c_out, k, s), g, (h, w), &x, &mut out);
            assert_eq!(
                out[c_out * g * ho * wo..],
                [7.0; 9],
                "wrote past the output"
            );
            for o in 0..c_out {
                for gi in 0..g {
                    for y in 0..ho {
                        for xx in 0..wo {
                            let at = ((o * g + gi) * ho + y) * wo + xx;
                            let (mut sum, mut abs) = (out0[at] as f64, out0[at].abs() as f64);
                            for c in 0..c_in {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let (Some(iy), Some(ix)) = (
                                            (y * s + ky).checked_sub(p),
                                            (xx * s + kx).checked_sub(p),
                                        ) else {
                                            continue;
                                        };
                                        if iy >= h || ix >= w {
                                            continue;
                                        }
                                        let v = round_bf16(x[((c * g + gi) * h + iy) * w + ix]);
                                        let t = weights[((o * c_in + c) * k + ky) * k + kx] as f64
                                            * v as f64;
                                        sum += t;
                                        abs += t.abs();
                                    }
                                }
                            }
                            let got = out[at] as f64;
                            assert!(
                                (got - sum).abs() <= 1e-6 * abs + 1e-7,
                                "{kernel}: ({c_in},{c_out},{k},{s},{g},{h},{w}) at \
                                 ({o},{gi},{y},{xx}): {got} vs {sum}"
                            );
                        }
                    }
                }
            }
        }
    }
}
