//! Which images a run trains and validates on, in which order, and what each batch holds.
//!
//! Every random draw is a pure function of a key, never of an RNG that lives across steps, so a
//! run resumed at any step sees exactly the batches an uninterrupted run would have seen:
//!
//! | draw                          | key (SHA-256 → ChaCha12 seed)                          | stream |
//! |-------------------------------|--------------------------------------------------------|--------|
//! | epoch order (Fisher–Yates)    | `caf-train-shuffle-v1`, seed, epoch                    | 0      |
//! | crop offsets + flip of image i| `caf-train-sample-v1`, seed, epoch, i                  | 0      |
//! | training noise of image i     | `caf-train-sample-v1`, seed, epoch, i                  | 1      |
//! | validation noise of image i   | `caf-train-val-v1`, seed, i                            | 0      |
//!
//! `i` is the image's index in the training split, so the draws do not depend on batch size or
//! batch composition either. Noise keys leave σ out: runs at different σ with one seed see the
//! same standard normals scaled differently (common random numbers for paired comparisons).
//! Batches are built on the host (rayon over images, each image from its own stream, hence
//! thread-count independent) and uploaded in one copy.

use std::ops::Range;

use candle_core::{Device, Tensor};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::data::augment::{self, CropFlip, ResizedCrop};
use crate::data::{Chw, Images, RecordOrder, TrainAugment};

/// Zero padding of the random crop, as in the standard CIFAR recipe.
pub const CROP_PADDING: usize = 4;

/// The training and validation indices of one run within the training split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Training images: the first `min(max_train, len − val_size)` of the holdout order.
    pub train: Vec<usize>,
    /// Validation images: the last `val_size` of the holdout order.
    pub val: Vec<usize>,
}

impl SplitPlan {
    /// Assumes `val_size <= len` (checked by the config's validation). The holdout order is
    /// the records' own for a [`RecordOrder::Mixed`] set (CIFAR: the last 5,000 training
    /// images, as always); for a set grouped by class it is a fixed shuffle of the split, keyed
    /// by its size only, so every run, seed and σ on that data holds out the same images.
    pub fn new(len: usize, val_size: usize, max_train: Option<usize>, order: RecordOrder) -> Self {
        let mut holdout: Vec<usize> = (0..len).collect();
        if order == RecordOrder::ByClass {
            let mut rng = keyed_rng(b"caf-train-holdout-v1", &[len as u64]);
            fisher_yates(&mut holdout, &mut rng);
        }
        let val_start = len.saturating_sub(val_size);
        let train_end = max_train.map_or(val_start, |m| m.min(val_start));
        let val = holdout.split_off(val_start);
        holdout.truncate(train_end);
        Self {
            train: holdout,
            val,
        }
    }
}

/// A ChaCha12 stream keyed by SHA-256 of a domain tag and words (seed, epoch, index…).
pub fn keyed_rng(domain: &[u8], words: &[u64]) -> ChaCha12Rng {
    let mut h = Sha256::new();
    h.update(domain);
    for w in words {
        h.update(w.to_le_bytes());
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&h.finalize()[..32]);
    ChaCha12Rng::from_seed(seed)
}

/// The order in which epoch `epoch` visits the training images.
pub fn epoch_order(seed: u64, epoch: usize, train: &[usize]) -> Vec<usize> {
    let mut order = train.to_vec();
    let mut rng = keyed_rng(b"caf-train-shuffle-v1", &[seed, epoch as u64]);
    fisher_yates(&mut order, &mut rng);
    order
}

/// Fisher–Yates spelled out (rather than `SliceRandom::shuffle`) so the order is fixed by this
/// code, not by a helper's implementation.
fn fisher_yates(v: &mut [usize], rng: &mut ChaCha12Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

/// Number of optimizer steps of an epoch over `n` images: full batches plus the remainder,
/// unless the remainder is a single image (BatchNorm cannot normalise a batch of one).
pub fn steps_per_epoch(n: usize, batch: usize) -> usize {
    let full = n / batch;
    if n % batch >= 2 {
        full + 1
    } else {
        full
    }
}

/// Positions within the epoch order of step `step`'s images.
pub fn step_range(n: usize, batch: usize, step: usize) -> Range<usize> {
    let start = step * batch;
    start..(start + batch).min(n)
}

/// A batch ready for the model: pixels in [0, 1] + noise, [B, C, H, W], and labels.
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
    pub labels: Vec<u32>,
    /// The same images before the noise (augmented identically): the targets of objectives that
    /// compare with the clean image (a denoiser's reconstruction, its stability loss).
    pub clean: Tensor,
}

/// How training images are turned into model inputs.
#[derive(Clone, Copy, Debug)]
pub struct SampleSpec {
    pub seed: u64,
    pub epoch: usize,
    pub sigma: f32,
    pub augment: bool,
}

/// Builds the training batch of `indices`: crop + flip (when enabled), then + σ·z.
pub fn train_batch(
    data: &dyn Images,
    indices: &[usize],
    spec: SampleSpec,
    device: &Device,
) -> candle_core::Result<Batch> {
    let (shape, how) = (data.shape(), data.train_augment());
    let n = shape.len();
    let bytes = data.bytes(indices).map_err(candle_core::Error::wrap)?;
    let mut buf = vec![0f32; indices.len() * n];
    let mut clean = vec![0f32; indices.len() * n];
    let no_noise = SampleSpec { sigma: 0.0, ..spec };
    buf.par_chunks_mut(n)
        .zip(clean.par_chunks_mut(n))
        .zip(bytes.par_chunks(n).zip(indices.par_iter()))
        .for_each(|((out, cl), (image, &i))| {
            sample_into(image, shape, how, i, spec, out);
            // The crop and flip are drawn before the noise from the same keyed stream, so
            // this is exactly the noisy image's clean version.
            sample_into(image, shape, how, i, no_noise, cl);
        });
    finish(data, indices, buf, clean, device)
}

/// One training input: image `idx` (raw bytes, `shape`) augmented as `how` says and noised
/// into `out`.
pub fn sample_into(
    image: &[u8],
    shape: Chw,
    how: TrainAugment,
    idx: usize,
    spec: SampleSpec,
    out: &mut [f32],
) {
    let mut rng = keyed_rng(
        b"caf-train-sample-v1",
        &[spec.seed, spec.epoch as u64, idx as u64],
    );
    let mut cropped = Vec::new();
    let pixels: &[u8] = if spec.augment {
        cropped.resize(shape.len(), 0u8);
        match how {
            TrainAugment::PadCropFlip => {
                let aug = CropFlip::sample(&mut rng, CROP_PADDING, true);
                augment::apply(image, shape, CROP_PADDING, aug, &mut cropped);
            }
            TrainAugment::ResizedCropFlip => {
                let aug = ResizedCrop::sample(&mut rng, shape.h, shape.w, true);
                augment::apply_resized(image, shape, aug, &mut cropped);
            }
        }
        &cropped
    } else {
        image
    };
    // Same conversion as `ImageSet::image_f32`, so pixel values are exactly byte / 255.
    for (o, &b) in out.iter_mut().zip(pixels) {
        *o = b as f32 / 255.0;
    }
    if spec.sigma > 0.0 {
        rng.set_stream(1);
        add_noise(&mut rng, spec.sigma, out);
    }
}

/// Builds the validation batch of `indices`: clean pixels + σ·z with per-image noise that is the
/// same in every epoch, so accuracy changes between epochs come from the model only.
pub fn val_batch(
    data: &dyn Images,
    indices: &[usize],
    seed: u64,
    sigma: f32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let n = data.shape().len();
    let bytes = data.bytes(indices).map_err(candle_core::Error::wrap)?;
    let mut buf = vec![0f32; indices.len() * n];
    let mut clean = vec![0f32; indices.len() * n];
    buf.par_chunks_mut(n)
        .zip(clean.par_chunks_mut(n))
        .zip(bytes.par_chunks(n).zip(indices.par_iter()))
        .for_each(|((out, cl), (image, &i))| {
            for (o, &b) in out.iter_mut().zip(image) {
                *o = b as f32 / 255.0;
            }
            cl.copy_from_slice(out);
            if sigma > 0.0 {
                let mut rng = keyed_rng(b"caf-train-val-v1", &[seed, i as u64]);
                add_noise(&mut rng, sigma, out);
            }
        });
    finish(data, indices, buf, clean, device)
}

fn add_noise<R: Rng + ?Sized>(rng: &mut R, sigma: f32, out: &mut [f32]) {
    for o in out {
        let z: f32 = StandardNormal.sample(rng);
        *o += sigma * z;
    }
}

fn finish(
    data: &dyn Images,
    indices: &[usize],
    buf: Vec<f32>,
    clean: Vec<f32>,
    device: &Device,
) -> candle_core::Result<Batch> {
    let b = indices.len();
    let labels: Vec<u32> = indices.iter().map(|&i| u32::from(data.label(i))).collect();
    let x = Tensor::from_vec(buf, data.shape().batch_dims(b), device)?;
    let clean = Tensor::from_vec(clean, data.shape().batch_dims(b), device)?;
    let y = Tensor::from_slice(&labels, b, device)?;
    Ok(Batch {
        x,
        y,
        labels,
        clean,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ImageSet, IMAGE_BYTES};

    fn synthetic(n: usize) -> ImageSet {
        let pixels = (0..n * IMAGE_BYTES).map(|i| (i * 7 % 256) as u8).collect();
        let labels = (0..n).map(|i| (i % 10) as u8).collect();
        ImageSet::new(pixels, labels, Vec::new())
    }

    #[test]
    fn validation_is_the_tail_and_never_overlaps_training() {
        for (len, val, max) in [
            (50_000, 5_000, None),
            (50_000, 5_000, Some(256)),
            (100, 10, Some(1000)),
            (100, 0, None),
            (7, 3, None),
        ] {
            let plan = SplitPlan::new(len, val, max, RecordOrder::Mixed);
            assert_eq!(plan.val, (len - val..len).collect::<Vec<_>>());
            let n_train = max.map_or(len - val, |m| m.min(len - val));
            assert_eq!(plan.train, (0..n_train).collect::<Vec<_>>());
            // Every epoch's order is a permutation of the training images only.
            for epoch in 0..3 {
                let mut order = epoch_order(9, epoch, &plan.train);
                order.sort_unstable();
                assert_eq!(order, plan.train);
            }
        }
    }

    #[test]
    fn a_class_sorted_set_holds_out_a_fixed_sample_of_every_class() {
        // 10 classes of 100 images, grouped: the tail would be class 9 alone.
        let (len, val) = (1000, 100);
        let plan = SplitPlan::new(len, val, None, RecordOrder::ByClass);
        assert_eq!(plan, SplitPlan::new(len, val, None, RecordOrder::ByClass));
        assert_eq!((plan.train.len(), plan.val.len()), (900, 100));
        let mut all: Vec<usize> = plan.train.iter().chain(&plan.val).copied().collect();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..len).collect::<Vec<_>>(),
            "a partition of the split"
        );
        let mut per_class = [0usize; 10];
        for &i in &plan.val {
            per_class[i / 100] += 1;
        }
        // Hypergeometric: each class expects 10 of the 100; 2..=20 is far beyond 4 sd.
        assert!(
            per_class.iter().all(|&c| (2..=20).contains(&c)),
            "{per_class:?}"
        );
        // `max_train` takes a sample across classes too, disjoint from validation.
        let small = SplitPlan::new(len, val, Some(50), RecordOrder::ByClass);
        assert_eq!(small.val, plan.val);
        assert_eq!(small.train[..], plan.train[..50]);
        let classes: std::collections::HashSet<usize> =
            small.train.iter().map(|i| i / 100).collect();
        assert!(classes.len() >= 8, "{classes:?}");
    }

    #[test]
    fn epochs_and_seeds_shuffle_differently_and_reproducibly() {
        let train: Vec<usize> = (0..1000).collect();
        let a = epoch_order(1, 0, &train);
        assert_eq!(a, epoch_order(1, 0, &train));
        assert_ne!(a, epoch_order(1, 1, &train));
        assert_ne!(a, epoch_order(2, 0, &train));
        assert_ne!(a, train);
    }

    #[test]
    fn steps_cover_the_epoch_and_drop_only_a_lone_last_image() {
        assert_eq!(steps_per_epoch(256, 128), 2);
        assert_eq!(steps_per_epoch(257, 128), 2);
        assert_eq!(steps_per_epoch(258, 128), 3);
        assert_eq!(step_range(258, 128, 2), 256..258);
        assert_eq!(steps_per_epoch(1, 128), 0);
    }

    #[test]
    fn samples_depend_on_the_key_not_on_the_batch() {
        let data = synthetic(8);
        let spec = SampleSpec {
            seed: 3,
            epoch: 1,
            sigma: 0.25,
            augment: true,
        };
        let whole = train_batch(&data, &[5, 2, 7], spec, &Device::Cpu).expect("batch");
        let alone = train_batch(&data, &[2], spec, &Device::Cpu).expect("batch");
        let w: Vec<f32> = whole.x.flatten_all().and_then(|t| t.to_vec1()).expect("w");
        let a: Vec<f32> = alone.x.flatten_all().and_then(|t| t.to_vec1()).expect("a");
        assert_eq!(&w[IMAGE_BYTES..2 * IMAGE_BYTES], &a[..]);
        assert_eq!(whole.labels, vec![5, 2, 7]);
        let other_epoch =
            train_batch(&data, &[2], SampleSpec { epoch: 2, ..spec }, &Device::Cpu).expect("batch");
        let o: Vec<f32> = other_epoch
            .x
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("o");
        assert_ne!(a, o);
    }

    #[test]
    fn clean_unaugmented_samples_are_the_pixels() {
        let data = synthetic(3);
        let spec = SampleSpec {
            seed: 0,
            epoch: 0,
            sigma: 0.0,
            augment: false,
        };
        let b = train_batch(&data, &[1], spec, &Device::Cpu).expect("batch");
        let got: Vec<f32> = b.x.flatten_all().and_then(|t| t.to_vec1()).expect("x");
        assert_eq!(got, data.image_f32(1));
    }

    #[test]
    fn noise_has_the_requested_scale_and_validation_noise_is_fixed() {
        let data = synthetic(4);
        let spec = SampleSpec {
            seed: 0,
            epoch: 0,
            sigma: 0.5,
            augment: false,
        };
        let b = train_batch(&data, &[0, 1, 2, 3], spec, &Device::Cpu).expect("batch");
        let clean = data
            .batch_tensor(&[0, 1, 2, 3], &Device::Cpu)
            .expect("clean");
        let diff: Vec<f32> = (b.x - clean)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("diff");
        let n = diff.len() as f64;
        let var = diff.iter().map(|&d| (d as f64).powi(2)).sum::<f64>() / n;
        // 12,288 draws: the sample sd is within 2% of 0.5 with overwhelming probability.
        assert!((var.sqrt() - 0.5).abs() < 0.01, "sd {}", var.sqrt());

        let v1 = val_batch(&data, &[3, 1], 5, 0.5, &Device::Cpu).expect("val");
        let v2 = val_batch(&data, &[1], 5, 0.5, &Device::Cpu).expect("val");
        let v1: Vec<f32> = v1.x.flatten_all().and_then(|t| t.to_vec1()).expect("v1");
        let v2: Vec<f32> = v2.x.flatten_all().and_then(|t| t.to_vec1()).expect("v2");
        assert_eq!(&v1[IMAGE_BYTES..], &v2[..]);
    }
}
