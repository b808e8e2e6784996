//! Reading state dicts from weight files: safetensors, PyTorch's zip format (torch ≥ 1.6) and
//! PyTorch's legacy pickle format (torch < 1.6, e.g. the akamaster `.th` files).
//!
//! The format is detected from the file's first bytes, not its extension. Every read is
//! bounds-checked: a truncated or garbage file gives a [`ModelError::Weights`] naming the file.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pickle::{self, Value};
use super::ModelError;

/// A tensor may not need more than this many bytes: a corrupt size or a zero stride must not
/// make the reader allocate the whole machine.
const MAX_TENSOR_BYTES: usize = 1 << 30;

/// The first pickle of a legacy checkpoint: torch's `MAGIC_NUMBER` 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// The weight-file formats caf reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` since torch 1.6: a zip archive with `data.pkl` and one entry per storage.
    TorchZip,
    /// `torch.save` before torch 1.6 (or with `_use_new_zipfile_serialization=False`).
    TorchLegacy,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::TorchZip => "PyTorch zip",
            WeightFormat::TorchLegacy => "legacy PyTorch pickle",
        })
    }
}

/// Detects the format from the leading bytes; `None` if it is none of the three.
pub fn detect_format(bytes: &[u8]) -> Option<WeightFormat> {
    if bytes.starts_with(b"PK\x03\x04") {
        return Some(WeightFormat::TorchZip);
    }
    // safetensors: u64 little-endian header length, then a JSON object. Checked before pickle
    // because a header length of 128–133 bytes also starts with 0x80 0x00–0x05.
    if bytes.len() >= 9 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&bytes[..8]);
        let header = u64::from_le_bytes(n);
        if bytes[8] == b'{' && header <= (bytes.len() - 8) as u64 {
            return Some(WeightFormat::Safetensors);
        }
    }
    // Pickle protocol >= 2 starts with PROTO; torch has always saved with protocol 2.
    if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        return Some(WeightFormat::TorchLegacy);
    }
    None
}

/// Reads every tensor of a state dict, whatever the format, on `device`.
///
/// Tensors keep their stored dtype. A checkpoint wrapped as `{'state_dict': …, …}` is unwrapped
/// (other entries such as `best_prec1` are ignored), and a wrapper's prefix that every name
/// carries (`module.` from `nn.DataParallel`, `1.module.` from Cohen et al.'s checkpoints) is
/// removed.
pub fn load_state_dict(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, ModelError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ModelError::weights(path, format!("cannot read weights file: {e}")))?;
    let format = detect_format(&bytes)
        .ok_or_else(|| ModelError::weights(path, unrecognised_format(&bytes)))?;
    let tensors = match format {
        WeightFormat::Safetensors => candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| e.to_string())
            .map(|m| m.into_iter().collect()),
        WeightFormat::TorchZip => read_torch_zip(&bytes, device),
        WeightFormat::TorchLegacy => read_torch_legacy(&bytes, device),
    }
    .map_err(|m| ModelError::weights(path, format!("{format} file: {m}")))?;
    if tensors.is_empty() {
        return Err(ModelError::weights(
            path,
            format!("{format} file holds no tensors"),
        ));
    }
    Ok(strip_wrapper_prefix(tensors))
}

/// Removes the name prefix a training wrapper put on every tensor: `module.` (from
/// `nn.DataParallel`), or `N.module.` where the data-parallel network is item N of an
/// `nn.Sequential` (Cohen et al.'s and Salman et al.'s released checkpoints are
/// `Sequential(NormalizeLayer, DataParallel(net))`, so every name starts with `1.module.`; the
/// normalisation layer holds no tensors). Only a prefix that every name carries is removed.
fn strip_wrapper_prefix(tensors: Vec<(String, Tensor)>) -> HashMap<String, Tensor> {
    let index_prefix = |k: &str| -> Option<String> {
        let (head, rest) = k.split_once('.')?;
        if head.is_empty() || !head.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut p = format!("{head}.");
        if rest.starts_with("module.") {
            p.push_str("module.");
        }
        Some(p)
    };
    let first = tensors.first().and_then(|(k, _)| index_prefix(k));
    let prefix = match first {
        Some(p) if p.ends_with("module.") && tensors.iter().all(|(k, _)| k.starts_with(&p)) => p,
        _ => "module.".to_string(),
    };
    strip_common_prefix(tensors, &prefix)
}

fn unrecognised_format(bytes: &[u8]) -> String {
    let head = if bytes.is_empty() {
        "none, the file is empty".to_string()
    } else {
        let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        hex.join(" ")
    };
    format!(
        "unrecognised weights format (first bytes: {head}); expected safetensors, a PyTorch zip \
         checkpoint (torch >= 1.6) or a legacy PyTorch pickle checkpoint"
    )
}

fn strip_common_prefix(tensors: Vec<(String, Tensor)>, prefix: &str) -> HashMap<String, Tensor> {
    let all = tensors.iter().all(|(k, _)| k.starts_with(prefix));
    tensors
        .into_iter()
        .map(|(k, t)| match k.strip_prefix(prefix) {
            Some(rest) if all => (rest.to_string(), t),
            _ => (k, t),
        })
        .collect()
}

/// One storage referenced by the pickle: a flat typed buffer that tensors view.
#[derive(Clone, Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
    /// Elements in the root storage.
    numel: usize,
    /// For legacy views of a root storage: (element offset, element count) within it.
    view: Option<(usize, usize)>,
}

/// What `_rebuild_tensor(_v2)` would build, before the storage bytes are attached.
#[derive(Debug)]
struct TensorRef {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn storage_dtype(class_name: &str) -> Result<DType, String> {
    Ok(match class_name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" => DType::U8,
        other => return Err(format!("unsupported storage type {other}")),
    })
}

fn usize_of(v: &Value, what: &str) -> Result<usize, String> {
    v.as_int()
        .and_then(|i| usize::try_from(i).ok())
        .ok_or_else(|| format!("{what}: expected a non-negative int, found {}", v.kind()))
}

fn usizes_of(v: &Value, what: &str) -> Result<Vec<usize>, String> {
    v.to_seq()
        .ok_or_else(|| format!("{what}: expected a tuple, found {}", v.kind()))?
        .iter()
        .map(|x| usize_of(x, what))
        .collect()
}

/// Decodes the persistent id torch writes for a storage:
/// `('storage', StorageClass, key, location, numel[, view_metadata])`.
fn storage_ref(pid: &Value) -> Result<StorageRef, String> {
    let Value::PersistentId(inner) = pid else {
        return Err(format!(
            "tensor storage: expected a persistent id, found {}",
            pid.kind()
        ));
    };
    let items = inner
        .items
        .as_tuple()
        .ok_or_else(|| format!("storage id: expected a tuple, found {}", inner.items.kind()))?;
    if items.len() < 5 || items[0].as_str() != Some("storage") {
        return Err("storage id: expected ('storage', type, key, location, size, …)".into());
    }
    let (_, class_name) = items[1]
        .as_global()
        .ok_or_else(|| format!("storage type: found {}", items[1].kind()))?;
    let dtype = storage_dtype(class_name)?;
    let key = match &items[2] {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => return Err(format!("storage key: found {}", other.kind())),
    };
    let numel = usize_of(&items[4], "storage size")?;
    let view = match items.get(5) {
        None | Some(Value::None) => None,
        Some(meta) => {
            let meta = meta.as_tuple().filter(|m| m.len() == 3).ok_or_else(|| {
                "storage view metadata: expected (view_key, offset, size)".to_string()
            })?;
            Some((
                usize_of(&meta[1], "view offset")?,
                usize_of(&meta[2], "view size")?,
            ))
        }
    };
    Ok(StorageRef {
        key,
        dtype,
        numel,
        view,
    })
}

/// Recognises the callables torch pickles tensors with; `Ok(None)` for non-tensor values.
fn tensor_ref(v: &Value) -> Result<Option<TensorRef>, String> {
    let Value::Call(call) = v else {
        return Ok(None);
    };
    let (callable, args) = &call.items;
    let Some((module, name)) = callable.as_global() else {
        return Ok(None);
    };
    let args = args.as_tuple().unwrap_or(&[]);
    match (module, name) {
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
            if args.len() < 4 {
                return Err(format!("{name} with {} arguments", args.len()));
            }
            let storage = storage_ref(&args[0])?;
            let offset = usize_of(&args[1], "tensor offset")?;
            let size = usizes_of(&args[2], "tensor size")?;
            let stride = usizes_of(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "tensor with {} sizes but {} strides",
                    size.len(),
                    stride.len()
                ));
            }
            Ok(Some(TensorRef {
                storage,
                offset,
                size,
                stride,
            }))
        }
        // nn.Parameter(data, requires_grad, hooks): the data is the tensor.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            args.first().map_or(Ok(None), tensor_ref)
        }
        // Tensor subclasses: (func, type, args, state); rebuild as func(*args).
        ("torch._tensor", "_rebuild_from_type_v2") => {
            if args.len() < 3 {
                return Ok(None);
            }
            tensor_ref(&pickle::call(args[0].clone(), args[2].clone()))
        }
        _ => Ok(None),
    }
}

/// The (name, tensor) entries of the checkpoint object, unwrapping `{'state_dict': …}`.
fn state_dict_entries(root: &Value) -> Result<Vec<(String, TensorRef)>, String> {
    let items = root
        .dict_items()
        .ok_or_else(|| format!("expected a dict of tensors, found {}", root.kind()))?;
    let inner = items
        .iter()
        .find(|(k, _)| k.as_str() == Some("state_dict"))
        .map(|(_, v)| v.clone());
    let items = match inner {
        Some(sd) => sd
            .dict_items()
            .ok_or_else(|| format!("'state_dict' is a {}, not a dict", sd.kind()))?,
        None => items,
    };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in &items {
        let Some(name) = k.as_str() else { continue };
        if let Some(t) = tensor_ref(v).map_err(|e| format!("tensor {name}: {e}"))? {
            out.push((name.to_string(), t));
        }
    }
    if out.is_empty() {
        let keys: Vec<String> = items.iter().take(10).map(|(k, _)| k.kind()).collect();
        return Err(format!(
            "no tensors found; top-level keys: [{}]",
            keys.join(", ")
        ));
    }
    Ok(out)
}

/// Copies the elements a (size, stride, offset) view selects out of `storage` into a contiguous
/// tensor. `storage` holds the bytes of exactly the storage the view indexes.
fn materialize(
    name: &str,
    t: &TensorRef,
    storage: &[u8],
    storage_numel: usize,
    device: &Device,
) -> Result<Tensor, String> {
    let dtype = t.storage.dtype;
    let elem = dtype.size_in_bytes();
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n.saturating_mul(elem) <= MAX_TENSOR_BYTES)
        .ok_or_else(|| format!("tensor {name}: size {:?} is implausibly large", t.size))?;
    if numel > 0 {
        // The furthest element the view touches must lie inside the storage.
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            });
        match last {
            Some(last) if last < storage_numel => {}
            _ => {
                return Err(format!(
                    "tensor {name}: view (offset {}, size {:?}, stride {:?}) reaches past its \
                     storage of {storage_numel} elements",
                    t.offset, t.size, t.stride
                ))
            }
        }
    }
    let contiguous = {
        let mut expect = 1usize;
        let mut ok = true;
        for (&d, &s) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && s != expect {
                ok = false;
                break;
            }
            expect *= d;
        }
        ok
    };
    let bytes: Vec<u8> = if numel == 0 {
        Vec::new()
    } else if contiguous {
        storage[t.offset * elem..(t.offset + numel) * elem].to_vec()
    } else {
        let mut out = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; t.size.len()];
        for _ in 0..numel {
            let at: usize = t.offset
                + index
                    .iter()
                    .zip(&t.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.extend_from_slice(&storage[at * elem..(at + 1) * elem]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        out
    };
    Tensor::from_raw_buffer(&bytes, dtype, &t.size, device)
        .map_err(|e| format!("tensor {name}: {e}"))
}

/// Resolves a storage to its bytes and element count, applying a legacy view's sub-range.
fn storage_bytes<'a>(
    t: &TensorRef,
    roots: &HashMap<String, (&'a [u8], DType)>,
) -> Result<(&'a [u8], usize), String> {
    let s = &t.storage;
    let (bytes, dtype) = roots
        .get(&s.key)
        .ok_or_else(|| format!("storage {} is not in the file", s.key))?;
    if *dtype != s.dtype {
        return Err(format!(
            "storage {} is read as both {dtype:?} and {:?}",
            s.key, s.dtype
        ));
    }
    let elem = s.dtype.size_in_bytes();
    let root_numel = bytes.len() / elem;
    match s.view {
        None => Ok((bytes, root_numel)),
        Some((offset, count)) => match offset.checked_add(count) {
            Some(end) if end <= root_numel => Ok((&bytes[offset * elem..end * elem], count)),
            _ => Err(format!(
                "storage view {offset}+{count} exceeds storage {} of {root_numel} elements",
                s.key
            )),
        },
    }
}

/// The legacy layout: five pickles (magic number, protocol version, system info, the object
/// with storages as persistent ids, the list of storage keys), then each storage in key-list
/// order as an 8-byte little-endian element count and the raw little-endian elements.
fn read_torch_legacy(bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>, String> {
    let pickle_err = |what: &str, e: pickle::PickleError| format!("{what}: {e}");
    let (magic, pos) = pickle::unpickle(bytes, 0).map_err(|e| pickle_err("magic number", e))?;
    match magic {
        Value::BigInt(b) if b[..] == LEGACY_MAGIC => {}
        // A bare pickle (e.g. `pickle.dump(state_dict)`) would land here: say what was found.
        other => {
            return Err(format!(
                "not a torch checkpoint: the first pickle is {}, not torch's magic number",
                other.kind()
            ))
        }
    }
    let (proto, pos) =
        pickle::unpickle(bytes, pos).map_err(|e| pickle_err("protocol version", e))?;
    if proto.as_int() != Some(LEGACY_PROTOCOL_VERSION) {
        return Err(format!(
            "unsupported legacy protocol version {}",
            proto.kind()
        ));
    }
    let (sys_info, pos) = pickle::unpickle(bytes, pos).map_err(|e| pickle_err("system info", e))?;
    let little_endian = sys_info
        .dict_items()
        .and_then(|items| {
            items
                .into_iter()
                .find(|(k, _)| k.as_str() == Some("little_endian"))
                .map(|(_, v)| v)
        })
        .and_then(|v| v.as_int());
    if little_endian == Some(0) {
        return Err("saved on a big-endian machine, which is not supported".into());
    }
    let (root, pos) = pickle::unpickle(bytes, pos).map_err(|e| pickle_err("state dict", e))?;
    let (keys, mut pos) =
        pickle::unpickle(bytes, pos).map_err(|e| pickle_err("storage key list", e))?;
    let keys: Vec<String> = keys
        .to_seq()
        .ok_or_else(|| format!("storage key list: found {}", keys.kind()))?
        .iter()
        .map(|k| match k {
            Value::Str(s) => Ok(s.to_string()),
            Value::Int(i) => Ok(i.to_string()),
            other => Err(format!("storage key: found {}", other.kind())),
        })
        .collect::<Result<_, _>>()?;

    let entries = state_dict_entries(&root)?;
    // The data section does not record element sizes; they come from the tensors' storage types.
    let mut declared: HashMap<&str, (DType, usize)> = HashMap::new();
    for (_, t) in &entries {
        declared.insert(&t.storage.key, (t.storage.dtype, t.storage.numel));
    }
    let mut roots: HashMap<String, (&[u8], DType)> = HashMap::new();
    for key in &keys {
        let &(dtype, numel) = declared.get(key.as_str()).ok_or_else(|| {
            format!("storage {key} is listed but no tensor uses it, so its size is unknown")
        })?;
        let header = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("storage {key}: file ends before its size (truncated file?)"))?;
        let mut n = [0u8; 8];
        n.copy_from_slice(header);
        let count = u64::from_le_bytes(n);
        if count != numel as u64 {
            return Err(format!(
                "storage {key}: data section says {count} elements, the pickle says {numel}"
            ));
        }
        pos += 8;
        let len = numel
            .checked_mul(dtype.size_in_bytes())
            .filter(|&l| l <= bytes.len() - pos)
            .ok_or_else(|| {
                format!(
                    "storage {key}: needs {numel} elements of {} bytes but the file ends after \
                     {} more bytes (truncated file?)",
                    dtype.size_in_bytes(),
                    bytes.len() - pos
                )
            })?;
        roots.insert(key.clone(), (&bytes[pos..pos + len], dtype));
        pos += len;
    }
    build_tensors(entries, &roots, device)
}

fn build_tensors(
    entries: Vec<(String, TensorRef)>,
    roots: &HashMap<String, (&[u8], DType)>,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, String> {
    entries
        .into_iter()
        .map(|(name, t)| {
            let (storage, numel) = storage_bytes(&t, roots).map_err(|e| format!("{name}: {e}"))?;
            let tensor = materialize(&name, &t, storage, numel, device)?;
            Ok((name, tensor))
        })
        .collect()
}

/// The zip layout: `<archive>/data.pkl` holds the object, `<archive>/data/<key>` each storage.
fn read_torch_zip(bytes: &[u8], device: &Device) -> Result<Vec<(String, Tensor)>, String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or_else(|| "zip archive has no data.pkl: not a PyTorch checkpoint".to_string())?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Some(order) = names.iter().find(|n| *n == &format!("{prefix}byteorder")) {
        let order = read_entry(&mut zip, order, 16)?;
        if order != b"little" {
            return Err("saved with big-endian byte order, which is not supported".into());
        }
    }
    let pkl_bytes = read_entry(&mut zip, pkl, bytes.len())?;
    let (root, _) = pickle::unpickle(&pkl_bytes, 0).map_err(|e| format!("data.pkl: {e}"))?;
    let entries = state_dict_entries(&root)?;

    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for (_, t) in &entries {
        let s = &t.storage;
        if data.contains_key(&s.key) {
            continue;
        }
        let want = s
            .numel
            .checked_mul(s.dtype.size_in_bytes())
            .filter(|&l| l <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "storage {}: {} elements cannot fit in the file",
                    s.key, s.numel
                )
            })?;
        let entry = format!("{prefix}data/{}", s.key);
        let buf = read_entry(&mut zip, &entry, want)?;
        if buf.len() != want {
            return Err(format!(
                "{entry}: {} bytes, but {} elements of {:?} need {want}",
                buf.len(),
                s.numel,
                s.dtype
            ));
        }
        data.insert(s.key.clone(), buf);
    }
    let roots: HashMap<String, (&[u8], DType)> = entries
        .iter()
        .filter_map(|(_, t)| {
            data.get(&t.storage.key)
                .map(|b| (t.storage.key.clone(), (&b[..], t.storage.dtype)))
        })
        .collect();
    build_tensors(entries, &roots, device)
}

/// Reads at most `limit + 1` bytes of an entry, so a lying header cannot exhaust memory.
fn read_entry<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let mut buf = Vec::new();
    entry
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(buf)
}
