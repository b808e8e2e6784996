//! libjpeg's "islow" inverse DCT (`jpeg_idct_islow`, the default `JDCT_ISLOW`), which Pillow
//! uses: a separable Loeffler–Ligtenberg–Moschytz transform in 13-bit fixed point, columns
//! first with 2 extra bits of precision kept between the passes. Every shift, rounding and
//! constant matches, so the output is bit-identical; intermediates are 64-bit as libjpeg's
//! `JLONG` is on 64-bit Linux, so even absurd coefficients wrap the same way (no overflow).

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;

// FIX(x) = round(x · 2^13).
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

/// libjpeg's post-IDCT range-limit table, indexed by `value & 1023` where `value` is the
/// output before the +128 level shift: values in -512..=511 clamp to 0..=255, and anything
/// further out wraps around (a corrupt block comes out as libjpeg would draw it, not
/// saturated).
static RANGE_LIMIT: [u8; 1024] = {
    let mut t = [0u8; 1024];
    let mut i = 0;
    while i < 1024 {
        let x = if i < 512 { i as i32 } else { i as i32 - 1024 } + 128;
        t[i] = if x < 0 {
            0
        } else if x > 255 {
            255
        } else {
            x as u8
        };
        i += 1;
    }
    t
};

#[inline]
fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

#[inline]
fn limit(x: i64) -> u8 {
    RANGE_LIMIT[(x & 1023) as usize]
}

/// The 1-D transform shared by both passes, before descaling: outputs 0..8 in order.
#[inline(always)]
fn idct_1d(i: [i64; 8]) -> [i64; 8] {
    // Even part: the rotator is sqrt(2)·c(-6).
    let z1 = (i[2] + i[6]) * FIX_0_541196100;
    let tmp2 = z1 - i[6] * FIX_1_847759065;
    let tmp3 = z1 + i[2] * FIX_0_765366865;
    let tmp0 = (i[0] + i[4]) << CONST_BITS;
    let tmp1 = (i[0] - i[4]) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
    let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);

    // Odd part (Loeffler figure 8): i7, i5, i3, i1.
    let (t0, t1, t2, t3) = (i[7], i[5], i[3], i[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    let t0 = t0 * FIX_0_298631336 + z1 + z3;
    let t1 = t1 * FIX_2_053119869 + z2 + z4;
    let t2 = t2 * FIX_3_072711026 + z2 + z3;
    let t3 = t3 * FIX_1_501321110 + z1 + z4;

    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

/// Dequantizes `coefs` (natural order) with `quant` and writes the 8×8 pixels at `out`, rows
/// `stride` apart. `any_ac` false promises every AC coefficient is zero (a flat block).
pub(super) fn idct_islow(
    coefs: &[i16; 64],
    quant: &[u16; 64],
    any_ac: bool,
    out: &mut [u8],
    stride: usize,
) {
    if !any_ac {
        // What both passes compute for a DC-only block: the DC term alone, descaled.
        let dc = i64::from(coefs[0]) * i64::from(quant[0]);
        let ws = i64::from((dc << PASS1_BITS) as i32);
        let v = limit(descale(ws, PASS1_BITS + 3));
        for row in out.chunks_mut(stride).take(8) {
            row[..8].fill(v);
        }
        return;
    }
    // Pass 1: columns into a workspace scaled by sqrt(8)·2^PASS1_BITS; libjpeg keeps it in
    // `int`, so each value is truncated to 32 bits.
    let mut ws = [0i64; 64];
    for c in 0..8 {
        let input: [i64; 8] =
            std::array::from_fn(|r| i64::from(coefs[r * 8 + c]) * i64::from(quant[r * 8 + c]));
        if input[1..].iter().all(|&x| x == 0) {
            // libjpeg's zero-AC column shortcut: `dc << PASS1_BITS` in `int`.
            let dc = i64::from((input[0] << PASS1_BITS) as i32);
            for r in 0..8 {
                ws[r * 8 + c] = dc;
            }
            continue;
        }
        let o = idct_1d(input);
        for r in 0..8 {
            ws[r * 8 + c] = i64::from(descale(o[r], CONST_BITS - PASS1_BITS) as i32);
        }
    }
    // Pass 2: rows, removing the sqrt(8)·8 scale and the pass-1 bits. libjpeg's zero-row
    // shortcut gives the same values as the full transform, so it is not needed here.
    for (row, out_row) in ws.chunks_exact(8).zip(out.chunks_mut(stride)) {
        let input: [i64; 8] = std::array::from_fn(|k| row[k]);
        let o = idct_1d(input);
        for (dst, v) in out_row[..8].iter_mut().zip(o) {
            *dst = limit(descale(v, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook 2-D IDCT in f64 of the dequantized coefficients, level-shifted.
    fn reference(coefs: &[i16; 64], quant: &[u16; 64]) -> [f64; 64] {
        let c = |u: usize| if u == 0 { (0.5f64).sqrt() } else { 1.0 };
        let mut out = [0f64; 64];
        for y in 0..8 {
            for x in 0..8 {
                let mut s = 0.0;
                for v in 0..8 {
                    for u in 0..8 {
                        let f = f64::from(coefs[v * 8 + u]) * f64::from(quant[v * 8 + u]);
                        s += c(u)
                            * c(v)
                            * f
                            * (((2 * x + 1) as f64 * u as f64 * std::f64::consts::PI) / 16.0).cos()
                            * (((2 * y + 1) as f64 * v as f64 * std::f64::consts::PI) / 16.0).cos();
                    }
                }
                out[y * 8 + x] = s / 4.0 + 128.0;
            }
        }
        out
    }

    #[test]
    fn islow_is_within_one_level_of_the_exact_idct() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut worst = 0f64;
        for trial in 0..2000 {
            let mut coefs = [0i16; 64];
            let mut quant = [0u16; 64];
            // Sparse, JPEG-like blocks: big DC, a few AC terms that shrink with frequency;
            // every fourth block is DC-only to cover the shortcut.
            let terms = if trial % 4 == 0 { 0 } else { next() % 12 };
            coefs[0] = (next() % 200) as i16 - 100;
            for _ in 0..terms {
                let k = (next() % 63 + 1) as usize;
                coefs[k] = (next() % 41) as i16 - 20;
            }
            for (k, q) in quant.iter_mut().enumerate() {
                *q = 1 + (next() % 8) as u16 + k as u16 / 8;
            }
            let mut out = [0u8; 64];
            idct_islow(&coefs, &quant, terms > 0, &mut out, 8);
            for (got, want) in out.iter().zip(reference(&coefs, &quant)) {
                let want = want.clamp(0.0, 255.0);
                worst = worst.max((f64::from(*got) - want).abs());
            }
        }
        // The fixed-point transform rounds twice, so it may land just beyond half a level.
        assert!(worst <= 1.0, "islow vs exact IDCT: {worst}");
    }

    #[test]
    fn range_limit_wraps_like_libjpeg() {
        assert_eq!(limit(-128), 0);
        assert_eq!(limit(127), 255);
        assert_eq!(limit(-129), 0);
        assert_eq!(limit(511), 255);
        assert_eq!(limit(-512), 0);
        // 640 & 1023 = 640, which libjpeg's table holds as "-384 → 0".
        assert_eq!(limit(640), 0);
        // 1023 + 1 wraps to 0 → 128.
        assert_eq!(limit(1024), 128);
    }
}
