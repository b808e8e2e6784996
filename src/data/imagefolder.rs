//! torchvision's `ImageFolder` layout: `ROOT/train/CLASS/…` and `ROOT/val/CLASS/…`, classes the
//! sorted folder names, images PNG or JPEG, preprocessed as torchvision's eval transform.
//!
//! Preprocessing (`Resize(resize)`, `CenterCrop(image_size)`, `ToTensor()` on a PIL image):
//! decode to 8-bit RGB (PNG with the `png` crate, expanded to 8 bits per channel, palette and
//! grey expanded to RGB, alpha dropped as Pillow's `convert("RGB")` drops it; JPEG with caf's
//! own decoder, bit-identical to Pillow's ([`super::jpeg`])), resize the shorter side to
//! `resize` with Pillow's antialiased bilinear filter ([`super::resize`]), centre-crop
//! `image_size` × `image_size`, keep the bytes (the model sees byte / 255). A `resize` equal to
//! the shorter side is no resize at all.
//!
//! Decoding runs on worker threads ahead of the consumer ([`Prefetch`]): a bounded number of
//! decoded batches wait, in order, so memory stays flat whatever the folder's size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use sha2::{Digest, Sha256};

use super::resize::{centre_crop, resize_bilinear, shorter_side_size};
use super::{Chw, DataError, ImageSet, Images, RecordOrder, Split, TrainAugment};

/// Extensions torchvision's `ImageFolder` accepts; files with others are not images and are
/// skipped as torchvision skips them.
const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp",
];

/// The split's folder name: `train`, and `val` for the test split (ImageNet's name).
pub fn split_dir(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Test => "val",
    }
}

/// How images are turned into model inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preprocess {
    /// The shorter side after resizing.
    pub resize: usize,
    /// The side of the centre crop, i.e. of every image of the set.
    pub image_size: usize,
}

impl Preprocess {
    /// timm's default: resize to `image_size / 0.875` (crop_pct 0.875), rounded down as timm's
    /// `math.floor(img_size / crop_pct)`.
    pub fn default_resize(image_size: usize) -> usize {
        (image_size as f64 / 0.875).floor() as usize
    }

    pub fn shape(&self) -> Chw {
        Chw {
            c: 3,
            h: self.image_size,
            w: self.image_size,
        }
    }
}

/// What identifies a folder's contents in a job id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fingerprint {
    /// Relative path, size and modification time of every image: cheap, moves with `cp -a`.
    Stat,
    /// Relative path and SHA-256 of every image's bytes: reads everything once per plan.
    Content,
}

/// The images of one split, in torchvision's order.
#[derive(Clone, Debug)]
pub struct FolderIndex {
    /// The split folder (`ROOT/train` or `ROOT/val`).
    pub dir: PathBuf,
    pub classes: Vec<String>,
    /// Path relative to `dir`, and class index.
    pub files: Vec<(PathBuf, u16)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |e| DataError::io(path, e)
}

/// Sorted names of the sub-folders of `dir`.
fn class_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        // Follows symlinks, as torchvision's `entry.is_dir()` does.
        if entry.path().is_dir() {
            let name = entry.file_name().into_string().map_err(|n| {
                DataError::invalid(dir, format!("class folder name {n:?} is not UTF-8"))
            })?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Every file under `dir`, recursively, as torchvision walks it: folders in sorted order, the
/// files of each sorted.
fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if path.is_dir() {
            dirs.push(entry.file_name());
        } else {
            files.push(entry.file_name());
        }
    }
    files.sort();
    dirs.sort();
    out.extend(files.into_iter().map(|f| rel.join(f)));
    for d in dirs {
        walk(&dir.join(&d), &rel.join(&d), out)?;
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Lists `root/<split>` (`train` or `val`). Classes are that folder's sorted sub-folders; when
/// both splits exist they must have the same classes, so labels mean the same in both.
pub fn scan(root: &Path, split: Split) -> Result<FolderIndex, DataError> {
    let dir = root.join(split_dir(split));
    if !dir.is_dir() {
        return Err(DataError::invalid(
            root,
            format!(
                "not an image folder for the {split} split: `{}` is missing (expected \
                 ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg, torchvision's ImageFolder \
                 layout)",
                split_dir(split)
            ),
        ));
    }
    let classes = class_names(&dir)?;
    if classes.is_empty() {
        return Err(DataError::invalid(&dir, "no class folders"));
    }
    if classes.len() > usize::from(u16::MAX) {
        return Err(DataError::invalid(
            &dir,
            format!(
                "{} classes; at most {} are supported",
                classes.len(),
                u16::MAX
            ),
        ));
    }
    let other = root.join(split_dir(match split {
        Split::Train => Split::Test,
        Split::Test => Split::Train,
    }));
    if other.is_dir() {
        let theirs = class_names(&other)?;
        if theirs != classes {
            let only_here: Vec<&String> = classes.iter().filter(|c| !theirs.contains(c)).collect();
            let only_there: Vec<&String> = theirs.iter().filter(|c| !classes.contains(c)).collect();
            return Err(DataError::invalid(
                root,
                format!(
                    "`train` and `val` have different class folders (only in {}: {only_here:?}; \
                     only in the other: {only_there:?})",
                    split_dir(split)
                ),
            ));
        }
    }
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut found = Vec::new();
        walk(&dir.join(class), Path::new(class), &mut found)?;
        files.extend(
            found
                .into_iter()
                .filter(|p| is_image(p))
                .map(|p| (p, label as u16)),
        );
    }
    if files.is_empty() {
        return Err(DataError::invalid(
            &dir,
            "no images (.jpg, .jpeg, .png …) in any class folder",
        ));
    }
    Ok(FolderIndex {
        dir,
        classes,
        files,
    })
}

impl FolderIndex {
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// SHA-256 over every image's relative path with its size and modification time (`Stat`),
    /// or with the SHA-256 of its bytes (`Content`), in order; the folder's own path is not part
    /// of it, so a copy elsewhere (`cp -a` keeps mtimes) keeps its job ids.
    pub fn fingerprint(&self, kind: Fingerprint) -> Result<String, DataError> {
        let mut h = Sha256::new();
        h.update(match kind {
            Fingerprint::Stat => b"caf-imagefolder-stat-v1\n".as_slice(),
            Fingerprint::Content => b"caf-imagefolder-content-v1\n".as_slice(),
        });
        for (rel, label) in &self.files {
            let path = self.dir.join(rel);
            let what = match kind {
                Fingerprint::Stat => {
                    let m = std::fs::metadata(&path).map_err(io(&path))?;
                    let mtime = m
                        .modified()
                        .map_err(io(&path))?
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    format!(
                        "{}\t{}.{:09}",
                        m.len(),
                        mtime.as_secs(),
                        mtime.subsec_nanos()
                    )
                }
                Fingerprint::Content => crate::util::sha256_file(&path).map_err(io(&path))?,
            };
            h.update(format!("{}\t{label}\t{what}\n", rel.to_string_lossy()).as_bytes());
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Image `i` decoded and preprocessed: `pre.shape()` bytes, (C, H, W).
    pub fn load(&self, i: usize, pre: Preprocess) -> Result<Vec<u8>, DataError> {
        let path = self.dir.join(&self.files[i].0);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let (dims, pixels) = decode(&path, &bytes)?;
        preprocess(&path, &pixels, dims, pre)
    }
}

/// Decodes a PNG or JPEG file's bytes to planar 8-bit RGB, recognised by its signature.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<(Chw, Vec<u8>), DataError> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        decode_png(path, bytes)
    } else if bytes.starts_with(&[0xFF, 0xD8]) {
        decode_jpeg(path, bytes)
    } else {
        Err(DataError::invalid(
            path,
            "not a PNG or JPEG file (only those two formats are decoded)",
        ))
    }
}

/// Interleaved pixels with `channels` per pixel to planar RGB: grey is repeated, alpha dropped.
fn planar_rgb(interleaved: &[u8], channels: usize, h: usize, w: usize) -> Vec<u8> {
    let n = h * w;
    let mut out = vec![0u8; 3 * n];
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (p, px) in interleaved.chunks_exact(channels).take(n).enumerate() {
        if channels >= 3 {
            (r[p], g[p], b[p]) = (px[0], px[1], px[2]);
        } else {
            (r[p], g[p], b[p]) = (px[0], px[0], px[0]);
        }
    }
    out
}

fn decode_png(path: &Path, bytes: &[u8]) -> Result<(Chw, Vec<u8>), DataError> {
    let bad = |e: png::DecodingError| DataError::invalid(path, format!("PNG: {e}"));
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().map_err(bad)?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(DataError::invalid(path, "PNG: palette was not expanded"))
        }
    };
    let (h, w) = (info.height as usize, info.width as usize);
    let pixels = planar_rgb(&buf[..info.buffer_size()], channels, h, w);
    Ok((Chw { c: 3, h, w }, pixels))
}

/// JPEG through caf's own decoder ([`super::jpeg`]), which reproduces Pillow's decode
/// (libjpeg-turbo's islow IDCT, fancy upsampling and YCbCr → RGB) bit for bit. What it does
/// not handle (arithmetic coding, lossless, 12-bit, CMYK …) goes to zune-jpeg instead, so
/// such files still load, without that guarantee.
fn decode_jpeg(path: &Path, bytes: &[u8]) -> Result<(Chw, Vec<u8>), DataError> {
    match super::jpeg::decode(bytes) {
        Ok(d) => {
            let (h, w) = (d.height, d.width);
            let pixels = if d.channels == 3 {
                d.pixels
            } else {
                d.pixels.repeat(3)
            };
            Ok((Chw { c: 3, h, w }, pixels))
        }
        Err(super::jpeg::JpegError::Unsupported(_)) => decode_jpeg_zune(path, bytes),
        Err(e) => Err(DataError::invalid(path, format!("JPEG: {e}"))),
    }
}

/// The fallback for JPEG variants [`super::jpeg`] does not decode; its IDCT and chroma
/// upsampling round differently from libjpeg-turbo (up to 4/255 on 4:2:0 images).
fn decode_jpeg_zune(path: &Path, bytes: &[u8]) -> Result<(Chw, Vec<u8>), DataError> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16);
    let mut dec = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let bad = |e: zune_jpeg::errors::DecodeErrors| DataError::invalid(path, format!("JPEG: {e}"));
    let interleaved = dec.decode().map_err(bad)?;
    let info = dec
        .info()
        .ok_or_else(|| DataError::invalid(path, "JPEG: no header"))?;
    let (h, w) = (usize::from(info.height), usize::from(info.width));
    let channels = dec.output_colorspace().map_or(3, |c| c.num_components());
    if interleaved.len() < h * w * channels {
        return Err(DataError::invalid(
            path,
            "JPEG: decoded fewer pixels than its size",
        ));
    }
    Ok((Chw { c: 3, h, w }, planar_rgb(&interleaved, channels, h, w)))
}

/// Resize the shorter side to `pre.resize`, then centre-crop `pre.image_size`.
pub fn preprocess(
    path: &Path,
    pixels: &[u8],
    dims: Chw,
    pre: Preprocess,
) -> Result<Vec<u8>, DataError> {
    let (h, w) = shorter_side_size(dims.h, dims.w, pre.resize);
    if h < pre.image_size || w < pre.image_size || h == 0 || w == 0 {
        return Err(DataError::invalid(
            path,
            format!(
                "a {}×{} image resized to {h}×{w} is smaller than the {}×{} crop",
                dims.h, dims.w, pre.image_size, pre.image_size
            ),
        ));
    }
    let resized = resize_bilinear(pixels, dims, h, w);
    Ok(centre_crop(
        &resized,
        Chw { c: 3, h, w },
        pre.image_size,
        pre.image_size,
    ))
}

/// A batch of decoded images: `indices` into the index, their bytes concatenated, their labels.
#[derive(Debug)]
pub struct DecodedBatch {
    pub indices: Vec<usize>,
    pub pixels: Vec<u8>,
    pub labels: Vec<u16>,
}

/// Decodes batches of a [`FolderIndex`] on worker threads ahead of the consumer, handing them
/// out in order. At most `depth` batches are decoded and not yet consumed at any time, so a
/// slow consumer holds the workers back instead of filling memory.
pub struct Prefetch {
    rx: mpsc::Receiver<(usize, Result<DecodedBatch, DataError>)>,
    pending: BTreeMap<usize, Result<DecodedBatch, DataError>>,
    next: usize,
    batches: usize,
    gate: Arc<(Mutex<usize>, Condvar)>,
    stop: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Prefetch {
    /// Decodes `order` (indices into `index`) in batches of `batch` on `workers` threads.
    pub fn new(
        index: Arc<FolderIndex>,
        pre: Preprocess,
        order: Vec<usize>,
        batch: usize,
        workers: usize,
        depth: usize,
    ) -> Self {
        let batch = batch.max(1);
        let depth = depth.max(1);
        let order = Arc::new(order);
        let batches = order.len().div_ceil(batch);
        let (tx, rx) = mpsc::channel();
        let claim = Arc::new(AtomicUsize::new(0));
        // The number of batches handed out so far: a worker may start batch b only while
        // b < consumed + depth.
        let gate = Arc::new((Mutex::new(0usize), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers.max(1))
            .map(|_| {
                let (index, order, claim, gate, stop, tx) = (
                    index.clone(),
                    order.clone(),
                    claim.clone(),
                    gate.clone(),
                    stop.clone(),
                    tx.clone(),
                );
                std::thread::spawn(move || loop {
                    let b = claim.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return;
                    }
                    {
                        let (lock, cv) = &*gate;
                        let mut consumed = lock.lock().unwrap_or_else(|p| p.into_inner());
                        while b >= *consumed + depth {
                            consumed = cv.wait(consumed).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let idx = &order[b * batch..((b + 1) * batch).min(order.len())];
                    let result = decode_batch(&index, pre, idx);
                    if tx.send((b, result)).is_err() {
                        return; // the consumer is gone
                    }
                })
            })
            .collect();
        Self {
            rx,
            pending: BTreeMap::new(),
            next: 0,
            batches,
            gate,
            stop,
            workers,
        }
    }
}

fn decode_batch(
    index: &FolderIndex,
    pre: Preprocess,
    idx: &[usize],
) -> Result<DecodedBatch, DataError> {
    let mut pixels = Vec::with_capacity(idx.len() * pre.shape().len());
    let mut labels = Vec::with_capacity(idx.len());
    for &i in idx {
        pixels.extend(index.load(i, pre)?);
        labels.push(index.files[i].1);
    }
    Ok(DecodedBatch {
        indices: idx.to_vec(),
        pixels,
        labels,
    })
}

impl Iterator for Prefetch {
    type Item = Result<DecodedBatch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.batches {
            return None;
        }
        let item = loop {
            if let Some(item) = self.pending.remove(&self.next) {
                break item;
            }
            match self.rx.recv() {
                Ok((b, r)) => {
                    self.pending.insert(b, r);
                }
                // Every worker exited without sending batch `next`: only a panic does that.
                Err(_) => {
                    break Err(DataError::invalid(
                        Path::new("<prefetch>"),
                        "a decoding thread stopped unexpectedly",
                    ))
                }
            }
        };
        self.next += 1;
        let (lock, cv) = &*self.gate;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = self.next;
        cv.notify_all();
        Some(item)
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Release workers waiting at the gate; they see `stop` and exit without decoding more.
        self.stop.store(true, Ordering::Relaxed);
        let (lock, cv) = &*self.gate;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = usize::MAX / 2;
        cv.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Decoding threads: the machine's cores.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Loads a whole split, decoded and preprocessed in parallel, as an in-memory [`ImageSet`]
/// whose training augmentation is the random-resized crop and whose records are grouped by
/// class (torchvision's order).
pub fn load(root: &Path, split: Split, pre: Preprocess) -> Result<ImageSet, DataError> {
    let index = Arc::new(scan(root, split)?);
    let n = index.len();
    let classes = index.classes.clone();
    let mut pixels = Vec::with_capacity(n * pre.shape().len());
    let mut labels = Vec::with_capacity(n);
    let workers = default_workers();
    for b in Prefetch::new(index, pre, (0..n).collect(), 32, workers, 2 * workers) {
        let b = b?;
        pixels.extend_from_slice(&b.pixels);
        labels.extend_from_slice(&b.labels);
    }
    Ok(ImageSet::with_shape(pre.shape(), pixels, labels, classes)
        .with_train_augment(TrainAugment::ResizedCropFlip)
        .with_record_order(RecordOrder::ByClass))
}

/// A split read from its files batch by batch, for training: nothing but the index and the
/// labels stays in memory. Each batch's images are decoded in parallel (rayon), and the batch
/// the trainer announces with [`Images::read_ahead`] is decoded on a background thread while
/// the model computes. Preprocessed, augmented and ordered exactly as [`load`]'s set.
pub struct Streamed {
    index: Arc<FolderIndex>,
    pre: Preprocess,
    labels: Vec<u16>,
    ahead: Mutex<Option<Ahead>>,
}

/// A batch being decoded ahead: its indices and the thread decoding them.
struct Ahead {
    idx: Vec<usize>,
    thread: std::thread::JoinHandle<Result<Vec<u8>, DataError>>,
}

impl Streamed {
    /// Scans the split (no image is decoded here).
    pub fn open(root: &Path, split: Split, pre: Preprocess) -> Result<Self, DataError> {
        let index = scan(root, split)?;
        let labels = index.files.iter().map(|(_, l)| *l).collect();
        Ok(Self {
            index: Arc::new(index),
            pre,
            labels,
            ahead: Mutex::new(None),
        })
    }

    fn decode(index: &FolderIndex, pre: Preprocess, idx: &[usize]) -> Result<Vec<u8>, DataError> {
        use rayon::prelude::*;
        let images: Vec<Vec<u8>> = idx
            .par_iter()
            .map(|&i| index.load(i, pre))
            .collect::<Result<_, _>>()?;
        Ok(images.concat())
    }

    fn take_ahead(&self) -> Option<Ahead> {
        self.ahead.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Images for Streamed {
    fn labels(&self) -> &[u16] {
        &self.labels
    }
    fn classes(&self) -> &[String] {
        &self.index.classes
    }
    fn shape(&self) -> Chw {
        self.pre.shape()
    }
    fn train_augment(&self) -> TrainAugment {
        TrainAugment::ResizedCropFlip
    }
    fn record_order(&self) -> RecordOrder {
        RecordOrder::ByClass
    }
    fn bytes(&self, idx: &[usize]) -> Result<Vec<u8>, DataError> {
        if let Some(ahead) = self.take_ahead() {
            // Another batch than announced is decoded here; the announced one is dropped.
            let done = ahead.thread.join();
            if ahead.idx == idx {
                if let Ok(result) = done {
                    return result;
                }
                // A decoding thread that panicked: decode here, where an error has a name.
            }
        }
        Self::decode(&self.index, self.pre, idx)
    }
    fn read_ahead(&self, idx: &[usize]) {
        let (index, pre, batch) = (self.index.clone(), self.pre, idx.to_vec());
        let thread = std::thread::spawn(move || Self::decode(&index, pre, &batch));
        let old = self
            .ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Ahead {
                idx: idx.to_vec(),
                thread,
            });
        if let Some(old) = old {
            let _ = old.thread.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{load_cifar10, IMAGE_BYTES};

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    /// Writes planar RGB `pixels` (`h` × `w`) as an 8-bit RGB PNG.
    fn write_png(path: &Path, pixels: &[u8], h: usize, w: usize) {
        let n = h * w;
        let mut rgb = Vec::with_capacity(3 * n);
        for p in 0..n {
            rgb.extend([pixels[p], pixels[n + p], pixels[2 * n + p]]);
        }
        let file = std::fs::File::create(path).expect("create png");
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().expect("png header");
        writer.write_image_data(&rgb).expect("png data");
    }

    /// The first 100 official CIFAR-10 test images written as `val/CLASS/NNNN.png` (NNNN = record
    /// index), plus the first 50 again as `train/`. Class names sort into CIFAR's label order.
    pub(crate) fn exact100_folder(dir: &Path) -> ImageSet {
        let set =
            load_cifar10(&repo("../shared/data/cifar10-exact100"), Split::Test).expect("exact100");
        for split in ["train", "val"] {
            for class in set.classes() {
                std::fs::create_dir_all(dir.join(split).join(class)).expect("mkdir");
            }
        }
        for i in 0..set.len() {
            let class = &set.classes()[usize::from(set.label(i))];
            let name = format!("{i:04}.png");
            write_png(
                &dir.join("val").join(class).join(&name),
                set.image_u8(i),
                32,
                32,
            );
            if i < 50 {
                write_png(
                    &dir.join("train").join(class).join(&name),
                    set.image_u8(i),
                    32,
                    32,
                );
            }
        }
        set
    }

    #[test]
    fn png_folder_of_exact100_equals_the_binary_batch_bit_for_bit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let binary = exact100_folder(tmp.path());
        let pre = Preprocess {
            resize: 32,
            image_size: 32,
        };
        let index = scan(tmp.path(), Split::Test).expect("scan");
        let folder = load(tmp.path(), Split::Test, pre).expect("load folder");
        assert_eq!(folder.len(), 100);
        assert_eq!(folder.classes(), binary.classes());
        assert_eq!(folder.shape(), Chw::CIFAR);
        // Folder order is class by class; the file name gives the record.
        let records: Vec<usize> = index
            .files
            .iter()
            .map(|(p, _)| {
                p.file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse().ok())
                    .expect("record number")
            })
            .collect();
        for (k, &r) in records.iter().enumerate() {
            assert_eq!(folder.label(k), binary.label(r), "image {k} (record {r})");
            assert_eq!(
                folder.image_u8(k),
                binary.image_u8(r),
                "image {k} (record {r})"
            );
        }
        let dev = candle_core::Device::Cpu;
        let a = folder
            .batch_tensor(&(0..100).collect::<Vec<_>>(), &dev)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("folder tensor");
        let b = binary
            .batch_tensor(&records, &dev)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .expect("binary tensor");
        assert_eq!(a.len(), 100 * IMAGE_BYTES);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "tensors differ"
        );
        // Training images are augmented with the random-resized crop.
        let train = load(tmp.path(), Split::Train, pre).expect("train");
        assert_eq!(train.len(), 50);
        assert_eq!(train.train_augment(), TrainAugment::ResizedCropFlip);
    }

    #[test]
    fn a_streamed_split_gives_the_bytes_labels_and_order_of_the_loaded_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        exact100_folder(tmp.path());
        let pre = Preprocess {
            resize: 36,
            image_size: 32,
        };
        for split in [Split::Train, Split::Test] {
            let loaded = load(tmp.path(), split, pre).expect("load");
            let streamed = Streamed::open(tmp.path(), split, pre).expect("open");
            let loaded: &dyn Images = &loaded;
            assert_eq!(streamed.labels(), loaded.labels());
            assert_eq!(streamed.classes(), loaded.classes());
            assert_eq!(streamed.shape(), loaded.shape());
            assert_eq!(streamed.train_augment(), loaded.train_augment());
            assert_eq!(streamed.record_order(), loaded.record_order());
            assert_eq!(streamed.labels_digest_bytes(), loaded.labels_digest_bytes());
            // Any order, repeats included: a batch is whatever indices the trainer asks for.
            let n = loaded.len();
            let idx: Vec<usize> = (0..n).rev().chain([0, n / 2, 0]).collect();
            assert_eq!(
                streamed.bytes(&idx).expect("decode"),
                loaded.bytes(&idx).expect("copy")
            );
        }
        // Read-ahead changes nothing but when the decoding happens: the announced batch, or
        // another one if the caller asks for another.
        let loaded = load(tmp.path(), Split::Train, pre).expect("load");
        let streamed = Streamed::open(tmp.path(), Split::Train, pre).expect("open");
        let (a, b) = (vec![3, 1, 4], vec![1, 5, 9, 2]);
        streamed.read_ahead(&a);
        assert_eq!(streamed.bytes(&a).expect("a"), loaded.bytes(&a).expect("a"));
        streamed.read_ahead(&a);
        streamed.read_ahead(&b);
        assert_eq!(streamed.bytes(&a).expect("a"), loaded.bytes(&a).expect("a"));
        streamed.read_ahead(&b);
        assert_eq!(streamed.bytes(&b).expect("b"), loaded.bytes(&b).expect("b"));

        // A file that went missing is an error naming it, not a panic, read ahead or not.
        let gone = tmp.path().join("train").join(&streamed.classes()[0]);
        std::fs::remove_dir_all(&gone).expect("remove");
        let e = streamed.bytes(&[0]).unwrap_err().to_string();
        assert!(e.contains(&gone.display().to_string()), "{e}");
        streamed.read_ahead(&[0]);
        let e = streamed.bytes(&[0]).unwrap_err().to_string();
        assert!(e.contains(&gone.display().to_string()), "{e}");
    }

    #[test]
    fn jpeg_decode_equals_pillow_and_eval_transform_matches_torchvision() {
        let dir = repo("tests/fixtures/jpeg");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
        )
        .expect("json");
        let images = manifest["images"].as_array().expect("images");
        assert!(images.len() >= 4);
        for m in images {
            let name = m["name"].as_str().expect("name");
            let (h, w) = (
                m["height"].as_u64().expect("h") as usize,
                m["width"].as_u64().expect("w") as usize,
            );
            let path = dir.join(format!("{name}.jpg"));
            let (dims, ours) = decode(&path, &std::fs::read(&path).expect("jpg")).expect("decode");
            assert_eq!((dims.c, dims.h, dims.w), (3, h, w), "{name}");
            let pillow = std::fs::read(dir.join(format!("{name}.rgb"))).expect("rgb");
            assert_eq!(pillow.len(), 3 * h * w, "{name}");
            let n = h * w;
            // Pillow's decode, byte for byte: report the first difference, not a count.
            for p in 0..n {
                for c in 0..3 {
                    let (got, want) = (ours[c * n + p], pillow[p * 3 + c]);
                    assert_eq!(
                        got,
                        want,
                        "{name}: pixel (y {}, x {}) channel {c}: caf {got}, Pillow {want}",
                        p / w,
                        p % w
                    );
                }
            }
        }
        // Resize 40 + centre crop 32 of Pillow's decode equals torchvision's output exactly
        // (the resize is Pillow's own arithmetic), and so does it from caf's own decode.
        let e = &manifest["eval"];
        let name = e["image"].as_str().expect("eval image");
        let pre = Preprocess {
            resize: e["resize"].as_u64().expect("resize") as usize,
            image_size: e["crop"].as_u64().expect("crop") as usize,
        };
        let want = std::fs::read(dir.join("eval.chw")).expect("eval.chw");
        let pillow = std::fs::read(dir.join(format!("{name}.rgb"))).expect("rgb");
        let (h, w) = (48, 64);
        let planar = planar_rgb(&pillow, 3, h, w);
        let path = dir.join(format!("{name}.jpg"));
        let got = preprocess(&path, &planar, Chw { c: 3, h, w }, pre).expect("pre");
        assert_eq!(got, want);
        let index = FolderIndex {
            dir: dir.clone(),
            classes: vec!["x".into()],
            files: vec![(PathBuf::from(format!("{name}.jpg")), 0)],
        };
        let full = index.load(0, pre).expect("load");
        assert_eq!(full, want, "eval transform of caf's decode");
    }

    #[test]
    fn fingerprints_follow_content_not_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let a = tmp.path().join("a");
        let img = vec![7u8; 3 * 4 * 4];
        for split in ["train", "val"] {
            for class in ["cat", "dog"] {
                let d = a.join(split).join(class);
                std::fs::create_dir_all(&d).expect("mkdir");
                write_png(&d.join("x.png"), &img, 4, 4);
            }
        }
        std::fs::write(a.join("val/cat/notes.txt"), "not an image").expect("txt");
        let idx = scan(&a, Split::Test).expect("scan");
        assert_eq!(idx.classes, vec!["cat", "dog"]);
        assert_eq!(idx.len(), 2, "the .txt file is skipped");
        let stat = idx.fingerprint(Fingerprint::Stat).expect("stat");
        let content = idx.fingerprint(Fingerprint::Content).expect("content");
        assert_ne!(stat, content);
        // A copy elsewhere with the same mtimes (cp -a) has the same fingerprints.
        let b = tmp.path().join("b");
        let status = std::process::Command::new("cp")
            .args(["-a"])
            .arg(&a)
            .arg(&b)
            .status()
            .expect("cp");
        assert!(status.success());
        let copy = scan(&b, Split::Test).expect("scan copy");
        assert_eq!(copy.fingerprint(Fingerprint::Stat).expect("stat"), stat);
        assert_eq!(copy.fingerprint(Fingerprint::Content).expect("c"), content);
        // Changing one image's bytes (same size) changes the content fingerprint.
        write_png(&b.join("val/dog/x.png"), &[8u8; 3 * 4 * 4], 4, 4);
        let changed = scan(&b, Split::Test).expect("scan changed");
        assert_ne!(
            changed.fingerprint(Fingerprint::Content).expect("c"),
            content
        );
    }

    #[test]
    fn bad_folders_and_files_are_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = scan(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("`val` is missing"), "{e}");
        std::fs::create_dir_all(tmp.path().join("val/a")).expect("mkdir");
        let e = scan(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("no images"), "{e}");
        std::fs::create_dir_all(tmp.path().join("train/b")).expect("mkdir");
        let e = scan(tmp.path(), Split::Test).unwrap_err().to_string();
        assert!(e.contains("different class folders"), "{e}");
        std::fs::remove_dir_all(tmp.path().join("train")).expect("rmdir");
        std::fs::write(tmp.path().join("val/a/broken.jpg"), b"\xFF\xD8 not really").expect("w");
        let pre = Preprocess {
            resize: 8,
            image_size: 8,
        };
        let e = load(tmp.path(), Split::Test, pre).unwrap_err().to_string();
        assert!(e.contains("broken.jpg") && e.contains("JPEG"), "{e}");
        std::fs::write(tmp.path().join("val/a/broken.jpg"), b"GIF89a").expect("w");
        let e = load(tmp.path(), Split::Test, pre).unwrap_err().to_string();
        assert!(e.contains("not a PNG or JPEG"), "{e}");
        // A small image is upscaled (shorter side to `resize`), then cropped.
        std::fs::remove_file(tmp.path().join("val/a/broken.jpg")).expect("rm");
        write_png(&tmp.path().join("val/a/small.png"), &[9u8; 3 * 4 * 6], 4, 6);
        let set = load(tmp.path(), Split::Test, pre).expect("small image");
        assert_eq!(set.shape(), Chw { c: 3, h: 8, w: 8 });
        assert!(set.image_u8(0).iter().all(|&v| v == 9));
    }

    #[test]
    fn prefetch_yields_every_batch_in_order_with_few_workers_and_stops_early() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for i in 0..23u8 {
            let d = tmp.path().join("val").join(format!("c{}", i % 3));
            std::fs::create_dir_all(&d).expect("mkdir");
            write_png(&d.join(format!("{i:02}.png")), &[i; 3 * 6 * 5], 6, 5);
        }
        let index = Arc::new(scan(tmp.path(), Split::Test).expect("scan"));
        let pre = Preprocess {
            resize: 4,
            image_size: 4,
        };
        let order: Vec<usize> = (0..23).rev().collect();
        let serial: Vec<u8> = order
            .iter()
            .flat_map(|&i| index.load(i, pre).expect("load"))
            .collect();
        for (workers, depth, batch) in [(1, 1, 4), (3, 2, 5), (8, 1, 1)] {
            let got: Vec<DecodedBatch> =
                Prefetch::new(index.clone(), pre, order.clone(), batch, workers, depth)
                    .collect::<Result<_, _>>()
                    .expect("prefetch");
            let idx: Vec<usize> = got.iter().flat_map(|b| b.indices.clone()).collect();
            assert_eq!(idx, order);
            let px: Vec<u8> = got.iter().flat_map(|b| b.pixels.clone()).collect();
            assert_eq!(px, serial, "workers {workers}");
        }
        // Dropping after one batch returns promptly (workers stop at the gate).
        let mut p = Prefetch::new(index, pre, order, 1, 2, 1);
        assert!(p.next().is_some());
        drop(p);
    }
}
