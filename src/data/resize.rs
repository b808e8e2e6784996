//! Image resampling as Pillow does it for 8-bit images, so preprocessing matches
//! torchvision's transforms on PIL images (`Resize`, `CenterCrop`, `RandomResizedCrop`).
//!
//! What is implemented, exactly: Pillow's `Image.resize(size, Image.BILINEAR)` (its
//! `ImagingResample` in `libImaging/Resample.c`, reducing_gap off, which is what torchvision
//! calls): a separable convolution with the triangle filter, its support widened by the
//! downscale factor (that widening is the antialiasing), coefficients normalised per output
//! pixel and rounded to 22-bit fixed point, a horizontal pass into an 8-bit intermediate image
//! holding only the rows the vertical pass reads, then the vertical pass; each pass rounds
//! half up and clamps to 0–255. A pass whose size does not change is skipped, as Pillow skips
//! it, so resizing to the same size is the identity. Channels are independent, so planar
//! (C, H, W) images give what Pillow's interleaved ones do.

use super::Chw;

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 − 8 − 2.
const PRECISION_BITS: u32 = 22;

/// One pass's taps: for each output pixel the first input index and its weights.
struct Coeffs {
    /// (first input index, number of taps) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output pixel.
    weights: Vec<i32>,
    ksize: usize,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the input span `in0..in1` of an
/// axis of `in_size` pixels mapped onto `out_size` pixels.
fn coeffs(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Coeffs {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates towards zero; the values here are ≥ −support + 0.5 > −1 for
        // the lower bound, so clamping at 0 afterwards is what Pillow does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize;
        let n = (xmax - xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = triangle((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * f64::from(1u32 << PRECISION_BITS);
            row[x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        weights,
        ksize,
    }
}

fn clip8(v: i32) -> u8 {
    if v >= 1 << (PRECISION_BITS + 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes planar `src` (`dims`) to `out_h` × `out_w` with Pillow's antialiased bilinear
/// filter (see the module documentation).
///
/// # Panics
/// If `src` does not hold `dims.len()` bytes, or a size is zero: callers size both.
pub fn resize_bilinear(src: &[u8], dims: Chw, out_h: usize, out_w: usize) -> Vec<u8> {
    resize_region(src, dims, (0, 0, dims.h, dims.w), out_h, out_w)
}

/// Crops rows `top..top+h`, columns `left..left+w` of `src` and resizes that to
/// `out_h` × `out_w` (torchvision's `resized_crop` on a PIL image: `crop` then `resize`).
///
/// # Panics
/// If the region leaves the image or is empty.
pub fn resize_region(
    src: &[u8],
    dims: Chw,
    (top, left, h, w): (usize, usize, usize, usize),
    out_h: usize,
    out_w: usize,
) -> Vec<u8> {
    assert_eq!(src.len(), dims.len(), "resize: source size");
    assert!(
        h > 0 && w > 0 && out_h > 0 && out_w > 0,
        "resize: empty size"
    );
    assert!(
        top + h <= dims.h && left + w <= dims.w,
        "resize: region outside the image"
    );
    let c = dims.c;
    // The crop, as Pillow crops before resizing.
    let mut img = if (top, left, h, w) == (0, 0, dims.h, dims.w) {
        src.to_vec()
    } else {
        let mut v = Vec::with_capacity(c * h * w);
        for ch in 0..c {
            let plane = &src[ch * dims.h * dims.w..(ch + 1) * dims.h * dims.w];
            for y in top..top + h {
                v.extend_from_slice(&plane[y * dims.w + left..y * dims.w + left + w]);
            }
        }
        v
    };
    let (mut cur_h, mut cur_w) = (h, w);
    let vert = coeffs(h, 0.0, h as f64, out_h);
    if out_w != w {
        // Only the rows the vertical pass reads.
        let (first, last) = if out_h != h {
            let first = vert.bounds[0].0;
            let (lo, n) = vert.bounds[out_h - 1];
            (first, lo + n)
        } else {
            (0, h)
        };
        let horiz = coeffs(w, 0.0, w as f64, out_w);
        let rows = last - first;
        let mut out = vec![0u8; c * rows * out_w];
        for ch in 0..c {
            for (ry, y) in (first..last).enumerate() {
                let src_row = &img[(ch * cur_h + y) * cur_w..(ch * cur_h + y + 1) * cur_w];
                let dst = &mut out[(ch * rows + ry) * out_w..(ch * rows + ry + 1) * out_w];
                for (xx, d) in dst.iter_mut().enumerate() {
                    let (xmin, n) = horiz.bounds[xx];
                    let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                    // i32 as Pillow: the weights sum to about 2²², so 255 · 2²² + ½ fits.
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (p, &kw) in src_row[xmin..xmin + n].iter().zip(k) {
                        ss += i32::from(*p) * kw;
                    }
                    *d = clip8(ss);
                }
            }
        }
        img = out;
        cur_w = out_w;
        // The vertical bounds now count from `first`.
        cur_h = rows;
        if out_h != h {
            let shifted = Coeffs {
                bounds: vert.bounds.iter().map(|&(lo, n)| (lo - first, n)).collect(),
                weights: vert.weights,
                ksize: vert.ksize,
            };
            return vertical(&img, c, cur_h, cur_w, &shifted, out_h);
        }
        return img;
    }
    if out_h != h {
        return vertical(&img, c, cur_h, cur_w, &vert, out_h);
    }
    img
}

fn vertical(img: &[u8], c: usize, h: usize, w: usize, vert: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; c * out_h * w];
    // Whole rows at a time (the compiler vectorises the inner loops); the same sums as
    // Pillow's per-pixel loop, in the same integer arithmetic.
    let mut acc = vec![0i32; w];
    for ch in 0..c {
        let plane = &img[ch * h * w..(ch + 1) * h * w];
        for yy in 0..out_h {
            let (ymin, n) = vert.bounds[yy];
            let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
            acc.fill(1 << (PRECISION_BITS - 1));
            for (y, &kw) in k.iter().enumerate() {
                let row = &plane[(ymin + y) * w..(ymin + y + 1) * w];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += i32::from(p) * kw;
                }
            }
            let dst = &mut out[(ch * out_h + yy) * w..(ch * out_h + yy + 1) * w];
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    }
    out
}

/// torchvision's `Resize(size)` output size for an int `size`: the shorter side becomes `size`,
/// the longer `int(size · long / short)` (truncated, as torchvision computes it).
pub fn shorter_side_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    if h <= w {
        (size, (size as f64 * w as f64 / h as f64) as usize)
    } else {
        ((size as f64 * h as f64 / w as f64) as usize, size)
    }
}

/// torchvision's `CenterCrop` offset along one axis: `int(round((size − crop) / 2))` with
/// Python's round-half-to-even.
pub fn centre_offset(size: usize, crop: usize) -> usize {
    let twice = size - crop;
    let half = twice / 2;
    // An odd difference is a .5 case: Python rounds it to the even neighbour.
    if twice % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Centre-crops `src` (`dims`) to `crop_h` × `crop_w`.
///
/// # Panics
/// If the crop is larger than the image.
pub fn centre_crop(src: &[u8], dims: Chw, crop_h: usize, crop_w: usize) -> Vec<u8> {
    assert!(
        crop_h <= dims.h && crop_w <= dims.w,
        "centre_crop: crop larger than the image"
    );
    let top = centre_offset(dims.h, crop_h);
    let left = centre_offset(dims.w, crop_w);
    let mut v = Vec::with_capacity(dims.c * crop_h * crop_w);
    for ch in 0..dims.c {
        let plane = &src[ch * dims.h * dims.w..(ch + 1) * dims.h * dims.w];
        for y in top..top + crop_h {
            v.extend_from_slice(&plane[y * dims.w + left..y * dims.w + left + crop_w]);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity_and_constant_images_stay_constant() {
        let dims = Chw { c: 3, h: 5, w: 7 };
        let img: Vec<u8> = (0..dims.len()).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_bilinear(&img, dims, 5, 7), img);
        let flat = vec![200u8; dims.len()];
        for (h, w) in [(2, 3), (10, 14), (5, 3), (1, 1)] {
            let out = resize_bilinear(&flat, dims, h, w);
            assert_eq!(out.len(), 3 * h * w);
            assert!(out.iter().all(|&v| v == 200), "{h}×{w}");
        }
    }

    #[test]
    fn halving_averages_pixel_pairs() {
        // Downscaling by 2 widens the triangle to 4 taps (weights 1, 3, 3, 1 over 8 inside,
        // renormalised at the border). The expected row is what Pillow 13 prints for
        // `Image.fromarray(ramp).resize((4, 1), Image.BILINEAR)`.
        let dims = Chw { c: 1, h: 1, w: 8 };
        let img: Vec<u8> = (0..8u8).map(|x| x * 10).collect();
        let out = resize_bilinear(&img, dims, 1, 4);
        assert_eq!(out, vec![7, 25, 45, 63]);
    }

    #[test]
    fn torchvision_sizes_and_offsets() {
        assert_eq!(shorter_side_size(375, 500, 256), (256, 341));
        assert_eq!(shorter_side_size(500, 375, 256), (341, 256));
        assert_eq!(centre_offset(256, 224), 16);
        // round(33.5) = 34, round(32.5) = 32 in Python.
        assert_eq!(centre_offset(291, 224), 34);
        assert_eq!(centre_offset(289, 224), 32);
        let dims = Chw { c: 1, h: 4, w: 4 };
        let img: Vec<u8> = (0..16).collect();
        assert_eq!(centre_crop(&img, dims, 2, 2), vec![5, 6, 9, 10]);
    }
}
