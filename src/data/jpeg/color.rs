//! YCbCr → RGB with libjpeg's fixed-point tables (jdcolor.c `build_ycc_rgb_table`): 16
//! fractional bits, the constants rounded with `FIX(x) = (x · 65536 + 0.5) as i32`, and
//! red and blue rounded per table entry while green rounds once after summing both terms.

const SCALEBITS: u32 = 16;
const ONE_HALF: i32 = 1 << (SCALEBITS - 1);

fn fix(x: f64) -> i32 {
    (x * f64::from(1 << SCALEBITS) + 0.5) as i32
}

struct Tables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

fn tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Tables {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i32 - 128;
            t.cr_r[i] = (fix(1.40200) * x + ONE_HALF) >> SCALEBITS;
            t.cb_b[i] = (fix(1.77200) * x + ONE_HALF) >> SCALEBITS;
            t.cr_g[i] = -fix(0.71414) * x;
            // The rounding half for green is folded into this table, as libjpeg does.
            t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        t
    })
}

#[inline]
fn clamp(x: i32) -> u8 {
    x.clamp(0, 255) as u8
}

/// Converts planes in place: `a`, `b`, `c` hold Y, Cb, Cr on entry and R, G, B on return.
pub(super) fn ycc_to_rgb(a: &mut [u8], b: &mut [u8], c: &mut [u8]) {
    let t = tables();
    for ((y, cb), cr) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()) {
        let (yy, cbi, cri) = (i32::from(*y), usize::from(*cb), usize::from(*cr));
        *y = clamp(yy + t.cr_r[cri]);
        *cb = clamp(yy + ((t.cb_g[cbi] + t.cr_g[cri]) >> SCALEBITS));
        *cr = clamp(yy + t.cb_b[cbi]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_axis_stays_grey_and_extremes_clamp() {
        for v in [0u8, 1, 77, 128, 254, 255] {
            let (mut a, mut b, mut c) = ([v], [128u8], [128u8]);
            ycc_to_rgb(&mut a, &mut b, &mut c);
            assert_eq!((a[0], b[0], c[0]), (v, v, v));
        }
        let (mut a, mut b, mut c) = ([255u8], [255u8], [255u8]);
        ycc_to_rgb(&mut a, &mut b, &mut c);
        assert_eq!((a[0], c[0]), (255, 255));
        // Hand-checked against libjpeg's tables: Cr 255 → R +178, Cb 0 → B -227.
        assert_eq!(tables().cr_r[255], 178);
        assert_eq!(tables().cb_b[0], -227);
    }
}
