//! Training-time augmentation of (C, H, W) images: a random crop of the zero-padded image and a
//! random horizontal flip, i.e. torchvision's `RandomCrop(32, padding=4)` followed by
//! `RandomHorizontalFlip()`, the standard CIFAR recipe (Cohen et al. train with it).
//!
//! Everything is a pure function of the image and an explicitly passed RNG, so the trainer can
//! derive each image's augmentation from a counter-based key and reproduce it after a restart.
//! The functions are generic over the pixel type: the trainer crops raw `u8` bytes (a quarter of
//! the memory traffic) and converts afterwards; zero padding is `T::default()`, which is 0 for
//! both `u8` and `f32`, i.e. black in [0, 1] pixel space, as torchvision pads.

use rand::Rng;

/// Dimensions of one image, channel-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chw {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Chw {
    /// A CIFAR image: 3 × 32 × 32.
    pub const CIFAR: Chw = Chw { c: 3, h: 32, w: 32 };

    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (C, H, W) as a tuple.
    pub fn tuple(&self) -> (usize, usize, usize) {
        (self.c, self.h, self.w)
    }

    /// The tensor shape of `b` such images: (B, C, H, W).
    pub fn batch_dims(&self, b: usize) -> (usize, usize, usize, usize) {
        (b, self.c, self.h, self.w)
    }
}

impl std::fmt::Display for Chw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}×{}", self.c, self.h, self.w)
    }
}

/// One sampled augmentation: crop offsets into the padded image and whether to flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    /// Row of the padded image that becomes output row 0, in `0..=2·pad`.
    pub dy: usize,
    /// Column of the padded image that becomes output column 0, in `0..=2·pad`.
    pub dx: usize,
    pub flip: bool,
}

impl CropFlip {
    /// The augmentation that leaves an image as it is (offsets `pad`, `pad`, no flip).
    pub fn identity(pad: usize) -> Self {
        Self {
            dy: pad,
            dx: pad,
            flip: false,
        }
    }

    /// Draws offsets uniformly in `0..=2·pad` and a fair flip, consuming exactly three `u32`s
    /// (dy, dx, flip) so the stream position after it never depends on the outcome.
    ///
    /// The modulo has a bias of under 2⁻²⁸ for any realistic padding, far below what training
    /// could notice; spelling the draw out keeps it independent of `rand`'s range algorithm.
    pub fn sample<R: Rng + ?Sized>(rng: &mut R, pad: usize, flip: bool) -> Self {
        let span = (2 * pad + 1) as u64;
        let dy = (u64::from(rng.next_u32()) % span) as usize;
        let dx = (u64::from(rng.next_u32()) % span) as usize;
        let coin = rng.next_u32() >> 31 == 1;
        Self {
            dy,
            dx,
            flip: flip && coin,
        }
    }
}

/// Writes the `dims`-sized window at offset (`dy`, `dx`) of `src` zero-padded by `pad` pixels on
/// every side into `out`: `out[c][y][x] = src[c][y + dy − pad][x + dx − pad]`, or zero where that
/// falls outside `src`.
///
/// # Panics
/// If `src` or `out` do not hold exactly `dims.len()` values or an offset exceeds `2·pad`: these
/// are the caller's buffers, sized by the caller, so a mismatch is a bug there.
pub fn pad_crop<T: Copy + Default>(
    src: &[T],
    dims: Chw,
    pad: usize,
    dy: usize,
    dx: usize,
    out: &mut [T],
) {
    assert_eq!(src.len(), dims.len(), "pad_crop: source size");
    assert_eq!(out.len(), dims.len(), "pad_crop: output size");
    assert!(
        dy <= 2 * pad && dx <= 2 * pad,
        "pad_crop: offsets ({dy}, {dx}) beyond 2·pad = {}",
        2 * pad
    );
    let Chw { c, h, w } = dims;
    for ch in 0..c {
        let src_plane = &src[ch * h * w..(ch + 1) * h * w];
        let out_plane = &mut out[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let row = &mut out_plane[y * w..(y + 1) * w];
            // Source row y + dy − pad; rows outside the image are padding.
            let Some(sy) = (y + dy).checked_sub(pad).filter(|&sy| sy < h) else {
                row.fill(T::default());
                continue;
            };
            let src_row = &src_plane[sy * w..(sy + 1) * w];
            // Output columns x with 0 <= x + dx − pad < w read the source; the rest are padding.
            let x_lo = pad.saturating_sub(dx).min(w);
            let x_hi = (w + pad).saturating_sub(dx).min(w);
            row[..x_lo].fill(T::default());
            if x_lo < x_hi {
                let s0 = x_lo + dx - pad;
                row[x_lo..x_hi].copy_from_slice(&src_row[s0..s0 + (x_hi - x_lo)]);
            }
            row[x_hi.max(x_lo)..].fill(T::default());
        }
    }
}

/// Mirrors every row of `img` in place (left ↔ right).
///
/// # Panics
/// If `img` does not hold exactly `dims.len()` values.
pub fn hflip<T>(img: &mut [T], dims: Chw) {
    assert_eq!(img.len(), dims.len(), "hflip: image size");
    if dims.w == 0 {
        return;
    }
    for row in img.chunks_exact_mut(dims.w) {
        row.reverse();
    }
}

/// Applies `aug` to `src` (padding `pad`) and writes the result into `out`.
///
/// # Panics
/// As [`pad_crop`].
pub fn apply<T: Copy + Default>(src: &[T], dims: Chw, pad: usize, aug: CropFlip, out: &mut [T]) {
    pad_crop(src, dims, pad, aug.dy, aug.dx, out);
    if aug.flip {
        hflip(out, dims);
    }
}

/// Samples an augmentation from `rng` and applies it: the random crop of the `pad`-padded image,
/// then (when `flip`) a horizontal flip with probability ½. Returns what was applied.
///
/// # Panics
/// As [`pad_crop`].
pub fn random_crop_flip<T: Copy + Default, R: Rng + ?Sized>(
    src: &[T],
    dims: Chw,
    pad: usize,
    flip: bool,
    rng: &mut R,
    out: &mut [T],
) -> CropFlip {
    let aug = CropFlip::sample(rng, pad, flip);
    apply(src, dims, pad, aug, out);
    aug
}

/// One sampled random-resized crop (torchvision's `RandomResizedCrop` with its default scale
/// (0.08, 1) and ratio (3/4, 4/3)) and whether to flip afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizedCrop {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
    pub flip: bool,
}

impl ResizedCrop {
    /// torchvision's `RandomResizedCrop.get_params` on an `height` × `width` image: up to ten
    /// tries of an area fraction uniform in [0.08, 1] and a log-uniform aspect ratio in
    /// [3/4, 4/3], else the largest centred crop within those ratios; then a fair flip.
    /// Uniforms come from `rng` (24-bit floats, as torch draws them); the number consumed
    /// depends on the tries, which is harmless because the caller's noise uses another stream.
    pub fn sample<R: Rng + ?Sized>(rng: &mut R, height: usize, width: usize, flip: bool) -> Self {
        let unit = |rng: &mut R| f64::from(rng.next_u32() >> 8) / f64::from(1u32 << 24);
        let area = (height * width) as f64;
        let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let mut found = None;
        for _ in 0..10 {
            let target = area * (0.08 + (1.0 - 0.08) * unit(rng));
            let ratio = (lo + (hi - lo) * unit(rng)).exp();
            let w = (target * ratio).sqrt().round() as usize;
            let h = (target / ratio).sqrt().round() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = (u64::from(rng.next_u32()) % (height - h + 1) as u64) as usize;
                let left = (u64::from(rng.next_u32()) % (width - w + 1) as u64) as usize;
                found = Some((top, left, h, w));
                break;
            }
        }
        let (top, left, h, w) = found.unwrap_or_else(|| {
            let in_ratio = width as f64 / height as f64;
            let (h, w) = if in_ratio < 3.0 / 4.0 {
                (((width as f64) / (3.0 / 4.0)).round() as usize, width)
            } else if in_ratio > 4.0 / 3.0 {
                (height, ((height as f64) * (4.0 / 3.0)).round() as usize)
            } else {
                (height, width)
            };
            ((height - h) / 2, (width - w) / 2, h, w)
        });
        let coin = rng.next_u32() >> 31 == 1;
        Self {
            top,
            left,
            h,
            w,
            flip: flip && coin,
        }
    }
}

/// Applies `aug` to `src`: the crop resized back to `dims` (Pillow's antialiased bilinear, as
/// torchvision resizes PIL images), then the flip.
///
/// # Panics
/// If `src` or `out` do not hold `dims.len()` bytes or the crop leaves the image.
pub fn apply_resized(src: &[u8], dims: Chw, aug: ResizedCrop, out: &mut [u8]) {
    assert_eq!(out.len(), dims.len(), "apply_resized: output size");
    let resized =
        super::resize::resize_region(src, dims, (aug.top, aug.left, aug.h, aug.w), dims.h, dims.w);
    out.copy_from_slice(&resized);
    if aug.flip {
        hflip(out, dims);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha12Rng;

    /// A 1×4×4 image whose pixel (y, x) holds 10·(y+1) + (x+1), so every value names its position
    /// and 0 can only be padding.
    fn numbered() -> (Vec<u8>, Chw) {
        let dims = Chw { c: 1, h: 4, w: 4 };
        let img = (0..4u8)
            .flat_map(|y| (0..4u8).map(move |x| 10 * (y + 1) + (x + 1)))
            .collect();
        (img, dims)
    }

    #[test]
    fn crop_at_known_offsets_matches_the_padded_window() {
        let (img, dims) = numbered();
        let mut out = vec![0u8; 16];
        // Offset (0, 0) with pad 1: the window starts one pixel above and left of the image.
        pad_crop(&img, dims, 1, 0, 0, &mut out);
        #[rustfmt::skip]
        let expected = [
            0,  0,  0,  0,
            0, 11, 12, 13,
            0, 21, 22, 23,
            0, 31, 32, 33,
        ];
        assert_eq!(out, expected);
        // Offset (2, 1) with pad 1: one row below, columns aligned.
        pad_crop(&img, dims, 1, 2, 1, &mut out);
        #[rustfmt::skip]
        let expected = [
            21, 22, 23, 24,
            31, 32, 33, 34,
            41, 42, 43, 44,
             0,  0,  0,  0,
        ];
        assert_eq!(out, expected);
        // Offset (1, 2) with pad 1: columns shift left, the last one is padding.
        pad_crop(&img, dims, 1, 1, 2, &mut out);
        #[rustfmt::skip]
        let expected = [
            12, 13, 14, 0,
            22, 23, 24, 0,
            32, 33, 34, 0,
            42, 43, 44, 0,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn centre_crop_is_the_identity_and_extreme_offsets_are_all_padding() {
        let (img, dims) = numbered();
        let mut out = vec![0u8; 16];
        pad_crop(&img, dims, 2, 2, 2, &mut out);
        assert_eq!(out, img);
        // Padding wider than the image: the far corners of the padded image hold no pixel.
        pad_crop(&img, dims, 4, 0, 0, &mut out);
        assert!(out.iter().all(|&v| v == 0));
        pad_crop(&img, dims, 4, 8, 8, &mut out);
        assert!(out.iter().all(|&v| v == 0));
        // Offset 0 with pad 4 on a 4-wide image leaves no overlap either way round.
        pad_crop(&img, dims, 4, 4, 0, &mut out);
        assert!(out.iter().all(|&v| v == 0));
    }

    #[test]
    fn padding_is_zero_for_f32_images() {
        let dims = Chw { c: 2, h: 3, w: 3 };
        let img = vec![0.5f32; dims.len()];
        let mut out = vec![f32::NAN; dims.len()];
        pad_crop(&img, dims, 1, 0, 2, &mut out);
        for ch in 0..2 {
            let plane = &out[ch * 9..(ch + 1) * 9];
            // First row and last column come from the padding, the rest from the image.
            #[rustfmt::skip]
            let expected = [
                0.0, 0.0, 0.0,
                0.5, 0.5, 0.0,
                0.5, 0.5, 0.0,
            ];
            assert_eq!(plane, expected);
        }
    }

    #[test]
    fn flip_mirrors_rows_and_twice_is_the_identity() {
        let (img, dims) = numbered();
        let mut flipped = img.clone();
        hflip(&mut flipped, dims);
        assert_eq!(&flipped[..4], &[14, 13, 12, 11]);
        assert_eq!(&flipped[12..], &[44, 43, 42, 41]);
        hflip(&mut flipped, dims);
        assert_eq!(flipped, img);

        let dims = Chw::CIFAR;
        let img: Vec<f32> = (0..dims.len()).map(|i| i as f32).collect();
        let mut twice = img.clone();
        hflip(&mut twice, dims);
        assert_ne!(twice, img);
        hflip(&mut twice, dims);
        assert_eq!(twice, img);
    }

    #[test]
    fn channels_are_cropped_alike() {
        let dims = Chw { c: 3, h: 4, w: 4 };
        let (plane, _) = numbered();
        let img: Vec<u8> = (0..3u8)
            .flat_map(|c| plane.iter().map(move |&v| v + 100 * c))
            .collect();
        let mut out = vec![0u8; dims.len()];
        apply(
            &img,
            dims,
            1,
            CropFlip {
                dy: 2,
                dx: 0,
                flip: true,
            },
            &mut out,
        );
        for c in 0..3u8 {
            let got = &out[c as usize * 16..(c as usize + 1) * 16];
            let offset = |v: u8| if v == 0 { 0 } else { v + 100 * c };
            // Rows 2..4 of the image shifted up one, columns shifted right one, then mirrored.
            let expected: Vec<u8> = [23, 22, 21, 0, 33, 32, 31, 0, 43, 42, 41, 0, 0, 0, 0, 0]
                .into_iter()
                .map(offset)
                .collect();
            assert_eq!(got, expected, "channel {c}");
        }
    }

    #[test]
    fn sampling_covers_every_offset_and_both_flips_reproducibly() {
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        let draws: Vec<CropFlip> = (0..2000)
            .map(|_| CropFlip::sample(&mut rng, 4, true))
            .collect();
        for v in 0..=8 {
            assert!(draws.iter().any(|d| d.dy == v), "dy {v} never drawn");
            assert!(draws.iter().any(|d| d.dx == v), "dx {v} never drawn");
        }
        assert!(draws.iter().all(|d| d.dy <= 8 && d.dx <= 8));
        let flips = draws.iter().filter(|d| d.flip).count();
        assert!((800..1200).contains(&flips), "{flips} flips of 2000");

        let mut again = ChaCha12Rng::seed_from_u64(1);
        let replay: Vec<CropFlip> = (0..2000)
            .map(|_| CropFlip::sample(&mut again, 4, true))
            .collect();
        assert_eq!(draws, replay);

        // Without flipping the stream still advances by the same amount.
        let mut a = ChaCha12Rng::seed_from_u64(5);
        let mut b = ChaCha12Rng::seed_from_u64(5);
        let _ = CropFlip::sample(&mut a, 4, true);
        let no_flip = CropFlip::sample(&mut b, 4, false);
        assert!(!no_flip.flip);
        assert_eq!(a.next_u32(), b.next_u32());
    }

    #[test]
    fn resized_crops_stay_inside_and_respect_scale_and_ratio() {
        let mut rng = ChaCha12Rng::seed_from_u64(3);
        let (h, w) = (64, 48);
        let mut flips = 0;
        for _ in 0..500 {
            let a = ResizedCrop::sample(&mut rng, h, w, true);
            assert!(a.top + a.h <= h && a.left + a.w <= w, "{a:?}");
            let frac = (a.h * a.w) as f64 / (h * w) as f64;
            assert!((0.06..=1.0).contains(&frac), "{a:?}");
            flips += usize::from(a.flip);
        }
        assert!((180..320).contains(&flips), "{flips} flips of 500");
        let mut again = ChaCha12Rng::seed_from_u64(3);
        let mut rng = ChaCha12Rng::seed_from_u64(3);
        assert_eq!(
            ResizedCrop::sample(&mut rng, h, w, true),
            ResizedCrop::sample(&mut again, h, w, true)
        );
        // The whole image, unflipped, is the identity.
        let dims = Chw { c: 3, h: 8, w: 8 };
        let img: Vec<u8> = (0..dims.len()).map(|i| (i * 5 % 256) as u8).collect();
        let mut out = vec![0u8; dims.len()];
        let whole = ResizedCrop {
            top: 0,
            left: 0,
            h: 8,
            w: 8,
            flip: false,
        };
        apply_resized(&img, dims, whole, &mut out);
        assert_eq!(out, img);
        apply_resized(
            &img,
            dims,
            ResizedCrop {
                flip: true,
                ..whole
            },
            &mut out,
        );
        assert_eq!(&out[..8], &[35, 30, 25, 20, 15, 10, 5, 0]);
    }

    #[test]
    fn random_crop_flip_applies_what_it_reports() {
        let dims = Chw::CIFAR;
        let img: Vec<u8> = (0..dims.len()).map(|i| (i % 251) as u8 + 1).collect();
        let mut rng = ChaCha12Rng::seed_from_u64(9);
        let mut out = vec![0u8; dims.len()];
        for _ in 0..20 {
            let aug = random_crop_flip(&img, dims, 4, true, &mut rng, &mut out);
            let mut expected = vec![0u8; dims.len()];
            apply(&img, dims, 4, aug, &mut expected);
            assert_eq!(out, expected);
        }
        let mut out2 = vec![0u8; dims.len()];
        apply(&img, dims, 4, CropFlip::identity(4), &mut out2);
        assert_eq!(out2, img);
    }
}
