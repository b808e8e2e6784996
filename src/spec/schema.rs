//! The fixed-schema sections of a spec: name, seed, data, backbones, certify, report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::read::{
    as_int, as_json, as_map, as_number, as_seq, as_str, check_name, fields, Cx, Fields,
};
use super::yaml::{abbreviate, Kind, Node, Scalar, Value};
use super::{
    grid, Arch, Backbone, Cell, CertifyMode, CertifySettings, DataSpec, Dataset, Normalize, Param,
    ReportSettings, Retries, Spec, SpecError,
};

const TOP_KEYS: &[&str] = &[
    "name",
    "seed",
    "data",
    "backbones",
    "certify",
    "grid",
    "report",
    "retries",
];
const ARCHS: &[&str] = Arch::NAMES;

pub fn build(
    path: &Path,
    text: &str,
    bytes: &[u8],
    root: &Node,
    base_dir: &Path,
) -> Result<Spec, SpecError> {
    let cx = Cx { path };
    let top = fields(cx, root, "", TOP_KEYS)?;
    let name = check_name(cx, top.required(cx, "name")?, "name")?;
    let seed = as_int(cx, top.required(cx, "seed")?, "seed", 0, u64::MAX)?;
    let data = data(cx, &top, base_dir)?;
    let backbones = backbones(cx, top.required(cx, "backbones")?, base_dir)?;
    let certify = match top.get("certify") {
        Some(node) => certify(cx, node)?,
        None => CertifySettings::default(),
    };
    let report = match top.get("report") {
        Some(node) => report(cx, node)?,
        None => ReportSettings::default(),
    };
    let retries = match top.get("retries") {
        Some(node) => retries(cx, node)?,
        None => Retries::default(),
    };
    let grid_node = top.required(cx, "grid")?;
    let grid_at = top.key_span("grid").unwrap_or(grid_node.span);
    let cells = grid::expand(cx, grid_node, grid_at, &backbones)?;
    Ok(Spec {
        path: path.to_path_buf(),
        text: text.to_string(),
        sha256: crate::util::sha256_bytes(bytes),
        name,
        seed,
        data,
        backbones,
        certify,
        report,
        retries,
        cells,
    })
}

fn retries(cx: Cx, node: &Node) -> Result<Retries, SpecError> {
    let f = fields(cx, node, "retries", &["attempts", "interruptions"])?;
    let mut r = Retries::default();
    if let Some(n) = f.get("attempts") {
        r.attempts = as_int(cx, n, "retries.attempts", 1, 1000)? as u32;
    }
    if let Some(n) = f.get("interruptions") {
        r.interruptions = as_int(cx, n, "retries.interruptions", 1, 100_000)? as u32;
    }
    Ok(r)
}

fn data(cx: Cx, top: &Fields, base_dir: &Path) -> Result<DataSpec, SpecError> {
    let node = top.required(cx, "data")?;
    let f = fields(
        cx,
        node,
        "data",
        &["dataset", "root", "image_size", "resize", "fingerprint"],
    )?;
    let dataset_node = f.required(cx, "dataset")?;
    let dataset = match as_str(cx, dataset_node, "data.dataset")? {
        "cifar10" => Dataset::Cifar10,
        "cifar100" => Dataset::Cifar100,
        "imagefolder" => Dataset::ImageFolder,
        other => {
            return Err(cx.err(
                dataset_node.span,
                format!(
                    "unknown dataset `{}`; expected one of: cifar10, cifar100, imagefolder",
                    abbreviate(other)
                ),
            ));
        }
    };
    let folder = dataset == Dataset::ImageFolder;
    // CIFAR images are 32×32 as stored: the keys that transform images apply to folders only.
    if !folder {
        for key in ["resize", "fingerprint"] {
            if let Some(n) = f.get(key) {
                return Err(cx.err(
                    n.span,
                    format!(
                        "data.{key} applies to `dataset: imagefolder` only ({} files are \
                         fingerprinted by their SHA-256)",
                        dataset.as_str()
                    ),
                ));
            }
        }
    }
    let image_size = match f.get("image_size") {
        None if folder => 224,
        None => 32,
        Some(n) => {
            let v = as_int(cx, n, "data.image_size", 1, 4096)? as usize;
            if !folder && v != 32 {
                return Err(cx.err(
                    n.span,
                    format!(
                        "data.image_size of {} is 32 (its images are stored at 32×32), got {v}",
                        dataset.as_str()
                    ),
                ));
            }
            v
        }
    };
    let resize = match f.get("resize") {
        None if folder => Some(crate::data::imagefolder::Preprocess::default_resize(
            image_size,
        )),
        None => None,
        Some(n) => {
            let v = as_int(cx, n, "data.resize", 1, 65536)? as usize;
            if v < image_size {
                return Err(cx.err(
                    n.span,
                    format!(
                        "data.resize ({v}) is smaller than data.image_size ({image_size}): the \
                         centre crop would not fit"
                    ),
                ));
            }
            Some(v)
        }
    };
    let fingerprint = match f.get("fingerprint") {
        None => crate::data::imagefolder::Fingerprint::Stat,
        Some(n) => match as_str(cx, n, "data.fingerprint")? {
            "stat" => crate::data::imagefolder::Fingerprint::Stat,
            "content" => crate::data::imagefolder::Fingerprint::Content,
            other => {
                return Err(cx.err(
                    n.span,
                    format!(
                        "unknown data.fingerprint `{}`; expected one of: stat (sorted file \
                         list with sizes and mtimes), content (SHA-256 of every file)",
                        abbreviate(other)
                    ),
                ))
            }
        },
    };
    let root_node = f.required(cx, "root")?;
    let root = resolve(cx, root_node, "data.root", base_dir)?;
    match std::fs::metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(cx.err(
                root_node.span,
                format!("data root is not a directory: {}", root.display()),
            ))
        }
        Err(_) => {
            return Err(cx.err(
                root_node.span,
                format!("data root not found: {}", root.display()),
            ))
        }
    }
    Ok(DataSpec {
        dataset,
        root,
        span: node.span,
        image_size,
        resize,
        fingerprint,
    })
}

fn backbones(
    cx: Cx,
    node: &Node,
    base_dir: &Path,
) -> Result<BTreeMap<String, Backbone>, SpecError> {
    let entries = as_map(cx, node, "backbones")?;
    if entries.is_empty() {
        return Err(cx.err(
            node.span,
            "backbones is empty; define at least one backbone",
        ));
    }
    let mut out = BTreeMap::new();
    for (key, value) in entries {
        let name = check_name(cx, key, "a backbone name")?;
        let field = format!("backbones.{name}");
        let f = fields(
            cx,
            value,
            &field,
            &["arch", "weights", "train", "normalize", "feature", "logits"],
        )?;

        let arch_node = f.required(cx, "arch")?;
        let arch_name = as_str(cx, arch_node, &f.name("arch"))?;
        let arch: Arch = arch_name.parse().map_err(|_| {
            cx.err(
                arch_node.span,
                format!(
                    "unknown arch `{}`; expected one of: {}",
                    abbreviate(arch_name),
                    ARCHS.join(", ")
                ),
            )
        })?;

        // The graph outputs to read: names inside an ONNX graph, meaningless for other archs
        // (whose features and head caf builds itself), so refused there.
        let mut onnx = crate::arch::OnnxOutputs::default();
        for (key, slot) in [("feature", &mut onnx.feature), ("logits", &mut onnx.logits)] {
            let Some(node) = f.get(key) else { continue };
            if arch != Arch::Onnx {
                return Err(cx.err(
                    node.span,
                    format!(
                        "{} names an output of an ONNX graph; it is only valid with `arch: \
                         onnx` (this backbone is {arch})",
                        f.name(key)
                    ),
                ));
            }
            let name = as_str(cx, node, &f.name(key))?;
            if name.is_empty() {
                return Err(cx.err(node.span, format!("{} is empty", f.name(key))));
            }
            *slot = Some(name.to_string());
        }

        let train = match f.get("train") {
            None => None,
            Some(node) => {
                if !arch.is_trainable() {
                    return Err(cx.err(
                        f.key_span("train").unwrap_or(node.span),
                        format!(
                            "{} trains the whole network, which caf can do for a CIFAR ResNet \
                             or a ViT; this backbone is {arch} (give its `weights:` and use it \
                             frozen)",
                            f.name("train")
                        ),
                    ));
                }
                let mut params = BTreeMap::new();
                for (key, value) in as_map(cx, node, &f.name("train"))? {
                    let k = check_name(cx, key, "a training setting")?;
                    let value = as_json(cx, &k, value).map(|v| Param {
                        value: v,
                        span: value.span,
                    })?;
                    params.insert(k, value);
                }
                Some(Cell { params })
            }
        };

        let weights = match (f.get("weights"), &train) {
            (None, Some(_)) => None,
            (None, None) => {
                return Err(cx.err(
                    value.span,
                    format!(
                        "{field} needs `weights:` (a checkpoint file) or `train:` (the study \
                         trains it, clean)"
                    ),
                ))
            }
            (Some(weights_node), _) => {
                let weights = resolve(cx, weights_node, &f.name("weights"), base_dir)?;
                match std::fs::metadata(&weights) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(cx.err(
                            weights_node.span,
                            format!("weights path is not a file: {}", weights.display()),
                        ));
                    }
                    Err(_) => {
                        return Err(cx.err(
                            weights_node.span,
                            format!("weights file not found: {}", weights.display()),
                        ));
                    }
                }
                Some(weights)
            }
        };

        let normalize = match f.get("normalize") {
            // The CIFAR ResNets and the linear model keep "none" (the default before the other
            // archs existed: changing it would change the ids of recorded jobs); the ViTs and
            // ResNet-50 default to their reference weights' normalisation, as `caf certify` does.
            None => match arch {
                Arch::Linear | Arch::CifarResNet { .. } => Normalize::IDENTITY,
                _ => arch.default_normalize(),
            },
            Some(n) => {
                let nf = fields(cx, n, &f.name("normalize"), &["mean", "std"])?;
                let mean = triple(cx, nf.required(cx, "mean")?, &nf.name("mean"), false)?;
                let std = triple(cx, nf.required(cx, "std")?, &nf.name("std"), true)?;
                Normalize { mean, std }
            }
        };
        out.insert(
            name,
            Backbone {
                arch,
                weights,
                train,
                normalize,
                onnx,
                span: value.span,
            },
        );
    }
    Ok(out)
}

/// Exactly three finite numbers (per RGB channel), each > 0 when `positive`.
fn triple(cx: Cx, node: &Node, field: &str, positive: bool) -> Result<[f32; 3], SpecError> {
    let items = as_seq(cx, node, "a list of 3 numbers (one per RGB channel)", field)?;
    if items.len() != 3 {
        return Err(cx.err(
            node.span,
            format!(
                "expected exactly 3 numbers (one per RGB channel) for {field}, found {}",
                items.len()
            ),
        ));
    }
    let mut out = [0f32; 3];
    let what = if positive { "a number > 0" } else { "a number" };
    for (slot, item) in out.iter_mut().zip(items) {
        // Checked after the cast: values must survive the f32 the model uses (1e-50 would become 0).
        match as_number(item)
            .map(|x| x as f32)
            .filter(|&x| x.is_finite() && (!positive || x > 0.0))
        {
            Some(x) => *slot = x,
            None => return Err(cx.expected(item, what, field)),
        }
    }
    Ok(out)
}

fn certify(cx: Cx, node: &Node) -> Result<CertifySettings, SpecError> {
    let f = fields(
        cx,
        node,
        "certify",
        &[
            "n0",
            "n",
            "alpha",
            "batch",
            "skip",
            "max",
            "mode",
            "radii",
            "n_max",
            "stop_if_wrong",
        ],
    )?;
    let mut s = CertifySettings::default();
    let int = |key: &str, max: u64| -> Result<Option<u64>, SpecError> {
        f.get(key)
            .map(|n| as_int(cx, n, &f.name(key), 1, max))
            .transpose()
    };
    let usize_max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    if let Some(v) = int("n0", u64::MAX)? {
        s.n0 = v;
    }
    if let Some(v) = int("n", u64::MAX)? {
        s.n = v;
    }
    if let Some(v) = int("batch", usize_max)? {
        s.batch = usize::try_from(v).unwrap_or(usize::MAX);
    }
    if let Some(v) = int("skip", usize_max)? {
        s.skip = usize::try_from(v).unwrap_or(usize::MAX);
    }
    if let Some(v) = int("max", usize_max)? {
        s.max = Some(usize::try_from(v).unwrap_or(usize::MAX));
    }
    if let Some(n) = f.get("alpha") {
        match as_number(n).filter(|&a| a > 0.0 && a < 1.0) {
            Some(a) => s.alpha = a,
            None => {
                return Err(cx.expected(n, "a number strictly between 0 and 1", "certify.alpha"))
            }
        }
    }
    if let Some(n) = f.get("mode") {
        let text = as_str(cx, n, "certify.mode")?;
        s.mode = CertifyMode::parse(text).ok_or_else(|| {
            cx.err(
                n.span,
                format!(
                    "unknown certify.mode `{}`; expected one of: {}",
                    abbreviate(text),
                    CertifyMode::NAMES.join(", ")
                ),
            )
        })?;
    }
    if let Some(n) = f.get("radii") {
        s.radii = radii(cx, n, "certify.radii")?;
    }
    if let Some(n) = f.get("n_max") {
        s.n_max = Some(as_int(cx, n, "certify.n_max", 1, u64::MAX)?);
    }
    if let Some(n) = f.get("stop_if_wrong") {
        s.stop_if_wrong = match &n.kind {
            Kind::Scalar(Scalar {
                value: Value::Bool(b),
                ..
            }) => *b,
            _ => return Err(cx.expected(n, "true or false", "certify.stop_if_wrong")),
        };
    }
    if s.mode == CertifyMode::Cohen {
        // Settings Cohen's CERTIFY would silently ignore are almost always a forgotten mode.
        if let Some(key) = ["radii", "n_max", "stop_if_wrong"]
            .into_iter()
            .find(|k| f.get(k).is_some())
        {
            return Err(cx.err(
                f.key_span(key).unwrap_or(f.span()),
                format!("certify.{key} applies to sequential certification only; add `mode: sequential`"),
            ));
        }
    } else if s.radii.is_empty() {
        return Err(cx.err(
            f.key_span("mode").unwrap_or(f.span()),
            "certify.mode sequential needs certify.radii: the radii whose decision stops sampling",
        ));
    }
    if s.n0 >= s.n {
        // Point at whichever of the two the user wrote, preferring n0.
        let at = f
            .get("n0")
            .or_else(|| f.get("n"))
            .map_or(f.span(), |n| n.span);
        return Err(cx.err(
            at,
            format!(
                "certify.n0 ({}) must be less than certify.n ({}): n0 samples only select the \
                 class, n samples bound its probability",
                s.n0, s.n
            ),
        ));
    }
    Ok(s)
}

/// A non-empty, strictly ascending list of finite radii ≥ 0 (certify.radii).
fn radii(cx: Cx, node: &Node, field: &str) -> Result<Vec<f64>, SpecError> {
    let items = as_seq(cx, node, "a list of radii", field)?;
    if items.is_empty() {
        return Err(cx.err(
            node.span,
            format!("{field} is empty; list at least one radius"),
        ));
    }
    let mut radii: Vec<f64> = Vec::with_capacity(items.len());
    for item in items {
        let r = as_number(item)
            .filter(|&r| r.is_finite() && r >= 0.0)
            .ok_or_else(|| cx.expected(item, "a number ≥ 0", field))?;
        if let Some(&prev) = radii.last() {
            if r <= prev {
                return Err(cx.err(
                    item.span,
                    format!(
                        "{field} must be sorted in strictly ascending order, but {r} follows {prev}"
                    ),
                ));
            }
        }
        radii.push(r);
    }
    Ok(radii)
}

fn report(cx: Cx, node: &Node) -> Result<ReportSettings, SpecError> {
    let f = fields(cx, node, "report", &["radii"])?;
    let Some(radii_node) = f.get("radii") else {
        return Ok(ReportSettings::default());
    };
    let items = as_seq(cx, radii_node, "a list of radii", "report.radii")?;
    if items.is_empty() {
        return Err(cx.err(
            radii_node.span,
            "report.radii is empty; list at least one radius",
        ));
    }
    let mut radii: Vec<f64> = Vec::with_capacity(items.len());
    for item in items {
        let r = as_number(item)
            .filter(|&r| r >= 0.0)
            .ok_or_else(|| cx.expected(item, "a number ≥ 0", "report.radii"))?;
        if let Some(&prev) = radii.last() {
            if r <= prev {
                return Err(cx.err(
                    item.span,
                    format!(
                        "report.radii must be sorted in strictly ascending order, but {r} \
                         follows {prev}"
                    ),
                ));
            }
        }
        radii.push(r);
    }
    Ok(ReportSettings { radii })
}

/// A path from the spec, joined onto `base_dir` when relative (never canonicalised, so the error
/// shows what was actually looked up).
fn resolve(cx: Cx, node: &Node, field: &str, base_dir: &Path) -> Result<PathBuf, SpecError> {
    let s = node
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| cx.expected(node, "a path", field))?;
    Ok(base_dir.join(s))
}
