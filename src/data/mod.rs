//! Datasets: CIFAR-10 in its official binary format, held in memory as raw bytes.
//!
//! Images stay as `u8` until a batch is requested, so the 50,000-image training set costs
//! 150 MB instead of 600 MB, and pixel values are exactly `byte / 255` wherever they are used.

pub mod augment;
mod cifar10;
pub mod imagefolder;
pub mod jpeg;
pub mod resize;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use augment::Chw;

pub use cifar10::{
    CIFAR100_DIR, CIFAR10_CLASSES, CIFAR10_DIR, META_FILE, RECORD_BYTES, TEST_FILE, TRAIN_FILES,
};

/// Bytes of one CIFAR image: 3 planes of 32×32, channel-major (C, H, W).
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl DataError {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Train => write!(f, "train"),
            Split::Test => write!(f, "test"),
        }
    }
}

/// A set of RGB images of one shape with labels, kept as raw bytes (pixels / 255 = [0,1] values).
///
/// Labels are `u16` so ImageNet's 1,000 classes fit; CIFAR's fit in a byte and hash as bytes
/// (see [`ImageSet::labels_digest_bytes`]).
#[derive(Clone, Debug)]
pub struct ImageSet {
    pixels: Vec<u8>,
    labels: Vec<u16>,
    classes: Vec<String>,
    shape: Chw,
    augment: TrainAugment,
    order: RecordOrder,
}

/// How a set's records are ordered, which decides how the trainer holds images out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordOrder {
    /// Classes interleaved (CIFAR's training batches): the last images are a fair held-out
    /// sample and the first `max_train` a fair subset.
    Mixed,
    /// Grouped by class (an image folder: every image of the first class, then the next): the
    /// trainer holds out and subsamples through a fixed shuffle, else its validation images
    /// would all come from the last classes.
    ByClass,
}

/// How the trainer augments a set's training images (see `methods::train::batches`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainAugment {
    /// CIFAR's recipe: random crop of the image zero-padded by 4, horizontal flip.
    PadCropFlip,
    /// ImageNet's recipe: random-resized crop back to the image's size, horizontal flip.
    ResizedCropFlip,
}

impl ImageSet {
    /// A set of CIFAR-shaped (3 × 32 × 32) images.
    ///
    /// # Panics
    /// If `pixels` does not hold exactly `labels.len()` images of [`IMAGE_BYTES`] bytes: every
    /// accessor relies on that, and callers build both vectors together.
    pub fn new(pixels: Vec<u8>, labels: Vec<u8>, classes: Vec<String>) -> Self {
        Self::with_shape(
            Chw::CIFAR,
            pixels,
            labels.into_iter().map(u16::from).collect(),
            classes,
        )
    }

    /// A set of `shape`-sized images, (C, H, W) bytes each, concatenated.
    ///
    /// # Panics
    /// If `pixels` does not hold exactly `labels.len()` images of `shape.len()` bytes.
    pub fn with_shape(shape: Chw, pixels: Vec<u8>, labels: Vec<u16>, classes: Vec<String>) -> Self {
        assert_eq!(
            pixels.len(),
            labels.len() * shape.len(),
            "ImageSet::with_shape: {} pixel bytes for {} labels of {shape:?}",
            pixels.len(),
            labels.len()
        );
        Self {
            pixels,
            labels,
            classes,
            shape,
            augment: TrainAugment::PadCropFlip,
            order: RecordOrder::Mixed,
        }
    }

    /// The same set, augmented for training as `augment` says.
    pub fn with_train_augment(mut self, augment: TrainAugment) -> Self {
        self.augment = augment;
        self
    }

    /// The same set, its records ordered as `order` says.
    pub fn with_record_order(mut self, order: RecordOrder) -> Self {
        self.order = order;
        self
    }

    /// How the records are ordered.
    pub fn record_order(&self) -> RecordOrder {
        self.order
    }

    /// How training augments these images.
    pub fn train_augment(&self) -> TrainAugment {
        self.augment
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// (C, H, W) of every image.
    pub fn shape(&self) -> Chw {
        self.shape
    }
    /// Bytes (= values) of one image.
    pub fn image_len(&self) -> usize {
        self.shape.len()
    }
    pub fn label(&self, i: usize) -> u16 {
        self.labels[i]
    }
    /// All labels, in record order.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }
    /// The labels as hashed into training checkpoints: one byte each when every label fits in
    /// a byte (so CIFAR checkpoints written before labels widened still match), else two
    /// little-endian bytes each.
    pub fn labels_digest_bytes(&self) -> Vec<u8> {
        labels_digest_bytes(&self.labels)
    }
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// Raw bytes of image `i`, (C, H, W) order.
    pub fn image_u8(&self, i: usize) -> &[u8] {
        let n = self.shape.len();
        &self.pixels[i * n..(i + 1) * n]
    }
    /// Image `i` as f32 in [0,1], (C, H, W) order.
    pub fn image_f32(&self, i: usize) -> Vec<f32> {
        self.image_u8(i).iter().map(|&b| b as f32 / 255.0).collect()
    }
    /// Images `idx` as a [B, C, H, W] f32 tensor in [0,1].
    pub fn batch_tensor(&self, idx: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let mut buf = Vec::with_capacity(idx.len() * self.shape.len());
        for &i in idx {
            buf.extend(self.image_u8(i).iter().map(|&b| b as f32 / 255.0));
        }
        Tensor::from_vec(buf, self.shape.batch_dims(idx.len()), device)
    }
}

/// A split's images by index: held in memory ([`ImageSet`]), or decoded from their files batch
/// by batch ([`imagefolder::Streamed`]) so that a split larger than memory (ImageNet's 1.28 M
/// training images are 190 GB at 224 × 224) still trains, and certifying every 100th of its
/// 50,000 validation images decodes those 500 only. Both give a batch the same bytes.
pub trait Images: Send + Sync {
    /// Every image's label, in record order (known without decoding anything).
    fn labels(&self) -> &[u16];
    /// Class names, by label: a trained head has one output per class.
    fn classes(&self) -> &[String];
    /// (C, H, W) of every image.
    fn shape(&self) -> Chw;
    fn train_augment(&self) -> TrainAugment;
    fn record_order(&self) -> RecordOrder;
    /// The (C, H, W) bytes of images `idx`, concatenated in that order.
    fn bytes(&self, idx: &[usize]) -> Result<Vec<u8>, DataError>;
    /// A hint that `bytes(idx)` comes next: a source that reads files starts on it in the
    /// background while the caller computes. The answer is the same with or without it.
    fn read_ahead(&self, _idx: &[usize]) {}

    /// Images `idx` as f32 in [0,1], concatenated: exactly byte / 255, as [`ImageSet::image_f32`].
    fn floats(&self, idx: &[usize]) -> Result<Vec<f32>, DataError> {
        Ok(self
            .bytes(idx)?
            .into_iter()
            .map(|b| b as f32 / 255.0)
            .collect())
    }

    fn len(&self) -> usize {
        self.labels().len()
    }
    fn is_empty(&self) -> bool {
        self.labels().is_empty()
    }
    fn label(&self, i: usize) -> u16 {
        self.labels()[i]
    }
    /// See [`ImageSet::labels_digest_bytes`].
    fn labels_digest_bytes(&self) -> Vec<u8> {
        labels_digest_bytes(self.labels())
    }
}

impl Images for ImageSet {
    fn labels(&self) -> &[u16] {
        &self.labels
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn shape(&self) -> Chw {
        self.shape
    }
    fn train_augment(&self) -> TrainAugment {
        self.augment
    }
    fn record_order(&self) -> RecordOrder {
        self.order
    }
    fn bytes(&self, idx: &[usize]) -> Result<Vec<u8>, DataError> {
        let mut out = Vec::with_capacity(idx.len() * self.shape.len());
        for &i in idx {
            out.extend_from_slice(self.image_u8(i));
        }
        Ok(out)
    }
}

fn labels_digest_bytes(labels: &[u16]) -> Vec<u8> {
    if labels.iter().all(|&l| l <= u16::from(u8::MAX)) {
        labels.iter().map(|&l| l as u8).collect()
    } else {
        labels.iter().flat_map(|l| l.to_le_bytes()).collect()
    }
}

/// Accepts the folder holding `cifar-10-batches-bin` or that folder itself; returns the latter.
///
/// A folder counts as the batch folder when it holds `test_batch.bin` or `data_batch_1.bin`, so
/// test-only copies (such as the 100-image exact subset) resolve too.
pub fn resolve_cifar10_root(root: &Path) -> Result<PathBuf, DataError> {
    cifar10::resolve_root(root, cifar10::CIFAR10)
}

/// Accepts the folder holding `cifar-100-binary` or that folder itself; returns the latter.
pub fn resolve_cifar100_root(root: &Path) -> Result<PathBuf, DataError> {
    cifar10::resolve_root(root, cifar10::CIFAR100)
}

/// Loads a CIFAR-100 split from the official binary format (`train.bin`, `test.bin`; records
/// of coarse label, fine label, 3,072 pixel bytes). The class is the fine label; names come
/// from `fine_label_names.txt` when present, else the numbers 0–99.
pub fn load_cifar100(root: &Path, split: Split) -> Result<ImageSet, DataError> {
    cifar10::load(root, split, cifar10::CIFAR100)
}

/// The binary files of a CIFAR split (`cifar100`: CIFAR-100's) in a resolved folder, in the
/// order they are read.
pub fn cifar_split_files(dir: &Path, split: Split, cifar100: bool) -> Vec<PathBuf> {
    let f = if cifar100 {
        cifar10::CIFAR100
    } else {
        cifar10::CIFAR10
    };
    cifar10::split_files(dir, split, f)
}

/// Loads a CIFAR-10 split from the official binary format.
///
/// `Train` is `data_batch_1.bin` … `data_batch_5.bin` concatenated in that order; `Test` is
/// `test_batch.bin`, which may hold fewer than 10,000 records. Class names come from
/// `batches.meta.txt` when present, else the standard ten.
pub fn load_cifar10(root: &Path, split: Split) -> Result<ImageSet, DataError> {
    cifar10::load(root, split, cifar10::CIFAR10)
}
