//! The official CIFAR-10 binary format: files of 3,073-byte records, each one label byte (0–9)
//! followed by 1,024 red, 1,024 green and 1,024 blue bytes (32×32 row-major planes); and
//! CIFAR-100's, the same with two label bytes (coarse 0–19, fine 0–99) per record, of which the
//! fine label is the class.

use std::path::{Path, PathBuf};

use super::{DataError, ImageSet, Split, IMAGE_BYTES};

/// One of the two binary CIFAR layouts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Format {
    pub name: &'static str,
    pub dir: &'static str,
    pub train: &'static [&'static str],
    pub test: &'static str,
    pub meta: &'static str,
    /// Label bytes per record; the class is the last of them.
    pub label_bytes: usize,
    pub classes: usize,
    /// Class names when the folder has no meta file (CIFAR-100's are numbered).
    pub default_classes: Option<&'static [&'static str]>,
}

pub(super) const CIFAR10: Format = Format {
    name: "CIFAR-10",
    dir: CIFAR10_DIR,
    train: &TRAIN_FILES,
    test: TEST_FILE,
    meta: META_FILE,
    label_bytes: 1,
    classes: 10,
    default_classes: Some(&CIFAR10_CLASSES),
};

/// The folder name the official CIFAR-100 binary archive unpacks to.
pub const CIFAR100_DIR: &str = "cifar-100-binary";

pub(super) const CIFAR100: Format = Format {
    name: "CIFAR-100",
    dir: CIFAR100_DIR,
    train: &["train.bin"],
    test: "test.bin",
    meta: "fine_label_names.txt",
    label_bytes: 2,
    classes: 100,
    default_classes: None,
};

/// The folder name the official archive unpacks to.
pub const CIFAR10_DIR: &str = "cifar-10-batches-bin";
/// One label byte plus one image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
pub const META_FILE: &str = "batches.meta.txt";
/// The class names of the official `batches.meta.txt`, used when a folder lacks that file.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

fn looks_like_batch_dir(dir: &Path, f: Format) -> bool {
    dir.join(f.test).is_file() || dir.join(f.train[0]).is_file()
}

pub(super) fn resolve_root(root: &Path, f: Format) -> Result<PathBuf, DataError> {
    let nested = root.join(f.dir);
    if nested.is_dir() {
        return Ok(nested);
    }
    if looks_like_batch_dir(root, f) {
        return Ok(root.to_path_buf());
    }
    let name = f.name;
    let message = match std::fs::metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{name} folder does not exist")
        }
        Err(e) => return Err(DataError::io(root, e)),
        Ok(m) if !m.is_dir() => format!("expected a {name} folder, found a file"),
        Ok(_) => format!(
            "not a {name} folder: it neither contains `{}` nor the batch files `{}` / `{}` \
             (expected the official binary version)",
            f.dir, f.test, f.train[0]
        ),
    };
    Err(DataError::invalid(root, message))
}

/// The files of `split`, in the order they are concatenated.
pub(super) fn split_files(dir: &Path, split: Split, f: Format) -> Vec<PathBuf> {
    match split {
        Split::Test => vec![dir.join(f.test)],
        Split::Train => f.train.iter().map(|n| dir.join(n)).collect(),
    }
}

pub(super) fn load(root: &Path, split: Split, f: Format) -> Result<ImageSet, DataError> {
    let dir = resolve_root(root, f)?;
    let files = split_files(&dir, split, f);
    let missing: Vec<&str> = files
        .iter()
        .filter(|p| !p.is_file())
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
        .collect();
    if !missing.is_empty() {
        let mut message = format!(
            "the {split} split needs {}, which is missing",
            missing.join(", ")
        );
        if split == Split::Train && dir.join(f.test).is_file() {
            message.push_str(" (this folder only holds the test split)");
        }
        return Err(DataError::invalid(&dir, message));
    }

    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for file in &files {
        read_batch_file(file, f, &mut pixels, &mut labels)?;
    }
    let classes = read_classes(&dir, f)?;
    Ok(ImageSet::new(pixels, labels, classes))
}

/// Appends one batch file's records; validates the whole file before keeping any of it.
fn read_batch_file(
    path: &Path,
    f: Format,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let name = f.name;
    if bytes.is_empty() {
        return Err(DataError::invalid(
            path,
            format!("file is empty: no {name} records"),
        ));
    }
    let record_bytes = f.label_bytes + IMAGE_BYTES;
    let records = bytes.len() / record_bytes;
    let extra = bytes.len() % record_bytes;
    if extra != 0 {
        return Err(DataError::invalid(
            path,
            format!(
                "file size {} bytes is not a multiple of the {record_bytes}-byte {name} record: \
                 {records} whole records and {extra} extra bytes (truncated or not a {name} \
                 binary batch)",
                bytes.len()
            ),
        ));
    }
    let label_at = f.label_bytes - 1;
    if let Some((index, record)) = bytes
        .chunks_exact(record_bytes)
        .enumerate()
        .find(|(_, r)| usize::from(r[label_at]) >= f.classes)
    {
        return Err(DataError::invalid(
            path,
            format!(
                "record {index} (0-based, byte offset {}): label {} is out of range 0–{}",
                index * record_bytes,
                record[label_at],
                f.classes - 1
            ),
        ));
    }
    pixels.reserve(records * IMAGE_BYTES);
    labels.reserve(records);
    for record in bytes.chunks_exact(record_bytes) {
        labels.push(record[label_at]);
        pixels.extend_from_slice(&record[f.label_bytes..]);
    }
    Ok(())
}

fn read_classes(dir: &Path, f: Format) -> Result<Vec<String>, DataError> {
    let path = dir.join(f.meta);
    if !path.is_file() {
        return Ok(match f.default_classes {
            Some(names) => names.iter().map(|s| s.to_string()).collect(),
            None => (0..f.classes).map(|i| i.to_string()).collect(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    // The official file ends with blank lines; they are not classes.
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if names.len() != f.classes {
        return Err(DataError::invalid(
            &path,
            format!(
                "lists {} class names; {} has {}",
                names.len(),
                f.name,
                f.classes
            ),
        ));
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_cifar10, resolve_cifar10_root};
    use candle_core::Device;

    fn shared(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(rel)
    }

    /// `labels.len()` records whose pixels encode (record, position) so ordering bugs show.
    fn records(labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(labels.len() * RECORD_BYTES);
        for (r, &l) in labels.iter().enumerate() {
            out.push(l);
            out.extend((0..IMAGE_BYTES).map(|p| ((r * 7 + p) % 251) as u8));
        }
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).expect("write fixture");
    }

    fn err_text(e: DataError) -> String {
        e.to_string()
    }

    #[test]
    fn resolves_parent_or_batch_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inner = tmp.path().join(CIFAR10_DIR);
        std::fs::create_dir(&inner).expect("mkdir");
        write(&inner, TEST_FILE, &records(&[1]));
        assert_eq!(resolve_cifar10_root(tmp.path()).expect("parent"), inner);
        assert_eq!(resolve_cifar10_root(&inner).expect("itself"), inner);
    }

    #[test]
    fn resolve_rejects_missing_and_unrelated_folders() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = err_text(resolve_cifar10_root(&tmp.path().join("nope")).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        let e = err_text(resolve_cifar10_root(tmp.path()).unwrap_err());
        assert!(e.contains("not a CIFAR-10 folder"), "{e}");
        write(tmp.path(), "file.bin", b"x");
        let e = err_text(resolve_cifar10_root(&tmp.path().join("file.bin")).unwrap_err());
        assert!(e.contains("found a file"), "{e}");
    }

    #[test]
    fn loads_small_test_batch_with_default_classes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bytes = records(&[3, 9, 0]);
        write(tmp.path(), TEST_FILE, &bytes);
        let set = load_cifar10(tmp.path(), Split::Test).expect("load");
        assert_eq!(set.len(), 3);
        assert_eq!(set.labels(), &[3, 9, 0]);
        assert_eq!(set.classes()[0], "airplane");
        assert_eq!(set.classes().len(), 10);
        assert_eq!(set.image_u8(1), &bytes[RECORD_BYTES + 1..2 * RECORD_BYTES]);
        let t = set.batch_tensor(&[2, 0], &Device::Cpu).expect("tensor");
        assert_eq!(t.dims(), &[2, 3, 32, 32]);
        let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
        assert_eq!(v[0], bytes[2 * RECORD_BYTES + 1] as f32 / 255.0);
        assert_eq!(v[IMAGE_BYTES], bytes[1] as f32 / 255.0);
    }

    #[test]
    fn train_concatenates_batches_in_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (i, f) in TRAIN_FILES.iter().enumerate() {
            write(tmp.path(), f, &records(&[i as u8, 9 - i as u8]));
        }
        let set = load_cifar10(tmp.path(), Split::Train).expect("load");
        assert_eq!(set.labels(), &[0, 9, 1, 8, 2, 7, 3, 6, 4, 5]);
    }

    #[test]
    fn train_on_test_only_folder_fails_clearly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), TEST_FILE, &records(&[0]));
        let e = err_text(load_cifar10(tmp.path(), Split::Train).unwrap_err());
        assert!(e.contains("data_batch_1.bin"), "{e}");
        assert!(e.contains("only holds the test split"), "{e}");
    }

    #[test]
    fn size_not_multiple_of_record_names_file_and_extra_bytes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut bytes = records(&[1, 2]);
        bytes.extend_from_slice(&[0; 5]);
        write(tmp.path(), TEST_FILE, &bytes);
        let e = err_text(load_cifar10(tmp.path(), Split::Test).unwrap_err());
        assert!(e.contains(TEST_FILE), "{e}");
        assert!(e.contains("2 whole records and 5 extra bytes"), "{e}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), TEST_FILE, &[]);
        let e = err_text(load_cifar10(tmp.path(), Split::Test).unwrap_err());
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn bad_label_names_record_index() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), TEST_FILE, &records(&[1, 2, 10, 4]));
        let e = err_text(load_cifar10(tmp.path(), Split::Test).unwrap_err());
        assert!(e.contains(TEST_FILE), "{e}");
        assert!(e.contains("record 2"), "{e}");
        assert!(e.contains("label 10"), "{e}");
    }

    #[test]
    fn error_in_later_train_batch_names_that_batch() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for f in TRAIN_FILES {
            write(tmp.path(), f, &records(&[0]));
        }
        write(tmp.path(), TRAIN_FILES[3], &records(&[0, 200]));
        let e = err_text(load_cifar10(tmp.path(), Split::Train).unwrap_err());
        assert!(e.contains("data_batch_4.bin"), "{e}");
        assert!(e.contains("record 1"), "{e}");
    }

    #[test]
    fn meta_file_supplies_class_names_and_is_validated() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), TEST_FILE, &records(&[0]));
        let names: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        write(
            tmp.path(),
            META_FILE,
            format!("{}\n\n", names.join("\n")).as_bytes(),
        );
        let set = load_cifar10(tmp.path(), Split::Test).expect("load");
        assert_eq!(set.classes(), names.as_slice());
        write(tmp.path(), META_FILE, b"a\nb\n");
        let e = err_text(load_cifar10(tmp.path(), Split::Test).unwrap_err());
        assert!(
            e.contains(META_FILE) && e.contains("lists 2 class names"),
            "{e}"
        );
    }

    /// CIFAR-100 records: coarse label, fine label, 3,072 pixel bytes.
    fn records100(labels: &[(u8, u8)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (r, &(coarse, fine)) in labels.iter().enumerate() {
            out.extend([coarse, fine]);
            out.extend((0..IMAGE_BYTES).map(|p| ((r * 11 + p) % 253) as u8));
        }
        out
    }

    #[test]
    fn cifar100_reads_fine_labels_and_names() {
        use crate::data::{load_cifar100, resolve_cifar100_root};
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join(CIFAR100_DIR);
        std::fs::create_dir(&dir).expect("mkdir");
        let test = records100(&[(4, 30), (19, 99), (0, 0)]);
        write(&dir, "test.bin", &test);
        write(&dir, "train.bin", &records100(&[(1, 7), (2, 8)]));
        assert_eq!(resolve_cifar100_root(tmp.path()).expect("root"), dir);
        let set = load_cifar100(tmp.path(), Split::Test).expect("test");
        assert_eq!(set.labels(), &[30, 99, 0]);
        assert_eq!(
            set.image_u8(1),
            &test[IMAGE_BYTES + 2 + 2..2 * (IMAGE_BYTES + 2)]
        );
        assert_eq!(set.classes().len(), 100);
        assert_eq!(set.classes()[42], "42");
        let set = load_cifar100(&dir, Split::Train).expect("train");
        assert_eq!(set.labels(), &[7, 8]);
        let names: Vec<String> = (0..100).map(|i| format!("fine{i}")).collect();
        write(&dir, "fine_label_names.txt", names.join("\n").as_bytes());
        let set = load_cifar100(&dir, Split::Test).expect("named");
        assert_eq!(set.classes()[99], "fine99");
        // A fine label of 100 is out of range, a CIFAR-10 record is the wrong size.
        write(&dir, "test.bin", &records100(&[(0, 100)]));
        let e = err_text(load_cifar100(&dir, Split::Test).unwrap_err());
        assert!(e.contains("label 100 is out of range 0–99"), "{e}");
        write(&dir, "test.bin", &records(&[1, 2]));
        let e = err_text(load_cifar100(&dir, Split::Test).unwrap_err());
        assert!(e.contains("3074-byte CIFAR-100 record"), "{e}");
        let e = err_text(resolve_cifar100_root(&tmp.path().join("nope")).unwrap_err());
        assert!(e.contains("CIFAR-100 folder does not exist"), "{e}");
    }

    #[test]
    fn real_exact100_subset() {
        let set = load_cifar10(&shared("cifar10-exact100"), Split::Test).expect("exact100");
        assert_eq!(set.len(), 100);
        assert_eq!(&set.labels()[..10], &[3, 8, 8, 0, 6, 6, 1, 6, 3, 1]);
        assert_eq!(set.classes()[3], "cat");
        let e = err_text(load_cifar10(&shared("cifar10-exact100"), Split::Train).unwrap_err());
        assert!(e.contains("only holds the test split"), "{e}");
    }

    #[test]
    fn real_jpeg_copy_test_split() {
        let set = load_cifar10(&shared("cifar10-jpeg"), Split::Test).expect("test split");
        assert_eq!(set.len(), 10_000);
        // The README promises 1,000 images per class.
        let mut counts = [0usize; 10];
        for &l in set.labels() {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1000; 10]);
        // It is in official order, so its labels match the official label list.
        let official = std::fs::read_to_string(shared("cifar10-official-test-labels.txt"))
            .expect("official labels");
        let official: Vec<u16> = official
            .lines()
            .map(|l| l.trim().parse().expect("label"))
            .collect();
        assert_eq!(set.labels(), official.as_slice());
    }

    #[test]
    fn real_jpeg_copy_train_split() {
        let set = load_cifar10(&shared("cifar10-jpeg"), Split::Train).expect("train split");
        assert_eq!(set.len(), 50_000);
        // The README: classes interleaved 0, 1, …, 9, 0, 1, … across all five batches.
        assert!(set
            .labels()
            .iter()
            .enumerate()
            .all(|(i, &l)| usize::from(l) == i % 10));
    }
}
