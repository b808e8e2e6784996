//! Sweep specs: a YAML study file → a typed, validated [`Spec`] whose grid is expanded into cells.
//!
//! The public types here are the interface the rest of caf codes against. The syntax is documented
//! in `experiments/README-spec.md`. Layers:
//! * `yaml`: bytes → located node tree, with hard limits on size, depth, node count and alias
//!   expansion, because specs are untrusted input (limits re-exported below);
//! * `read`: typed, located accessors ("expected … for …, found …");
//! * `schema`: the fixed-schema sections (name, seed, data, backbones, certify, report);
//! * `grid`: params/axes/zip/methods/exclude/include → [`Cell`]s in a documented, stable order.
//!
//! Every error is a [`SpecError`] printed as `path:line:col: message`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::arch::{Arch, Normalize};

mod grid;
mod read;
mod schema;
mod yaml;

#[cfg(test)]
mod tests;

pub use yaml::{MAX_DEPTH, MAX_EXPANDED_BYTES, MAX_NODES};

/// Largest spec file accepted, in bytes. Real specs are a few KB; the cap bounds parse time.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Most cells a grid may produce before `exclude` is applied.
pub const MAX_CELLS: usize = 20_000;

/// A 1-based position in the spec file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span {
    pub line: usize,
    pub col: usize,
}

/// An error in a spec, located in its file: printed as `path:line:col: message`.
#[derive(Debug, Clone, thiserror::Error)]
pub struct SpecError {
    pub path: PathBuf,
    pub span: Option<Span>,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.span {
            Some(s) => write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                s.line,
                s.col,
                self.message
            ),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl SpecError {
    pub fn at(path: &Path, span: Span, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            span: Some(span),
            message: message.into(),
        }
    }
    pub fn whole_file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            span: None,
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dataset {
    Cifar10,
    Cifar100,
    /// torchvision's ImageFolder layout: `root/train/CLASS/*`, `root/val/CLASS/*`.
    ImageFolder,
}

impl Dataset {
    /// The name a spec uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            Dataset::Cifar10 => "cifar10",
            Dataset::Cifar100 => "cifar100",
            Dataset::ImageFolder => "imagefolder",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DataSpec {
    pub dataset: Dataset,
    /// Resolved against the working directory.
    pub root: PathBuf,
    pub span: Span,
    /// Side of the (square) images the models see: 32 for CIFAR; for an image folder the
    /// centre crop (default 224).
    pub image_size: usize,
    /// Image folders: the shorter side after resizing (default `image_size / 0.875`).
    pub resize: Option<usize>,
    /// Image folders: what identifies the images in job ids.
    pub fingerprint: crate::data::imagefolder::Fingerprint,
}

#[derive(Clone, Debug)]
pub struct Backbone {
    pub arch: Arch,
    /// Resolved against the working directory; checked to exist. `None` only for a backbone
    /// the study trains from scratch (`train:` without `weights:`).
    pub weights: Option<PathBuf>,
    /// `train:`: the study trains this backbone itself, clean (cross-entropy without noise),
    /// from `weights` when given, else from scratch. Its keys are the training keys of a grid
    /// cell (`epochs`, `lr`, `optimizer`, …), checked when the study is planned.
    pub train: Option<Cell>,
    pub normalize: Normalize,
    /// `feature:` / `logits:`, only for `arch: onnx`.
    pub onnx: crate::arch::OnnxOutputs,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CertifySettings {
    pub n0: u64,
    pub n: u64,
    pub alpha: f64,
    pub batch: usize,
    pub skip: usize,
    pub max: Option<usize>,
    pub mode: CertifyMode,
    /// Radii a sequential certification decides (required by `mode: sequential`).
    pub radii: Vec<f64>,
    /// Estimation-draw budget of a sequential certification; `n` when absent.
    pub n_max: Option<u64>,
    /// Sequential only: stop after selection when ĉ is not the label.
    pub stop_if_wrong: bool,
}

/// How a certification spends its draws: Cohen's fixed n, or sequentially until the requested
/// radii are decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CertifyMode {
    #[default]
    Cohen,
    Sequential,
}

impl CertifyMode {
    pub const NAMES: &'static [&'static str] = &["cohen", "sequential"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cohen" => Some(CertifyMode::Cohen),
            "sequential" => Some(CertifyMode::Sequential),
            _ => None,
        }
    }
}

impl Default for CertifySettings {
    fn default() -> Self {
        Self {
            n0: 100,
            n: 100_000,
            alpha: 0.001,
            batch: 400,
            skip: 1,
            max: None,
            mode: CertifyMode::Cohen,
            radii: Vec::new(),
            n_max: None,
            stop_if_wrong: false,
        }
    }
}

/// The interruption cap of a spec without `retries.interruptions` (and of the migration that
/// added the column).
pub const DEFAULT_INTERRUPTIONS: u32 = 20;

/// How often a job of the study may run before it counts as failed: `attempts` caps the runs
/// that ended in the job's own error; `interruptions` caps the runs stopped from outside
/// (SIGUSR2/SIGTERM at a walltime or preemption, a lost lease), counted apart so a job longer
/// than a walltime resumes across allocations but cannot loop forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Retries {
    pub attempts: u32,
    pub interruptions: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: 3,
            interruptions: DEFAULT_INTERRUPTIONS,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReportSettings {
    pub radii: Vec<f64>,
}

impl Default for ReportSettings {
    /// Certified accuracy is reported at these ℓ2 radii unless the spec lists its own.
    fn default() -> Self {
        Self {
            radii: vec![0.0, 0.25, 0.5, 0.75, 1.0],
        }
    }
}

/// One parameter value of a grid cell, with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub value: serde_json::Value,
    pub span: Span,
}

/// One point of the expanded grid: parameter name → value.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Cell {
    pub params: BTreeMap<String, Param>,
}

/// A parsed, validated study.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The spec file as resolved against the working directory (`base_dir` for [`Spec::parse`]).
    pub path: PathBuf,
    /// The file's text, byte for byte.
    pub text: String,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub name: String,
    pub seed: u64,
    pub data: DataSpec,
    pub backbones: BTreeMap<String, Backbone>,
    pub certify: CertifySettings,
    pub report: ReportSettings,
    /// `retries:` (not part of any job id: changing it re-caps the recorded jobs).
    pub retries: Retries,
    /// The expanded grid, in a stable order.
    pub cells: Vec<Cell>,
}

impl Spec {
    /// Reads and validates a spec file; relative paths inside resolve against the working directory.
    ///
    /// Errors name the spec as `path` joined onto the working directory.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let cwd = std::env::current_dir().map_err(|e| {
            SpecError::whole_file(path, format!("cannot determine the working directory: {e}"))
        })?;
        let resolved = cwd.join(path);
        let file = std::fs::File::open(&resolved)
            .map_err(|e| SpecError::whole_file(&resolved, format!("cannot read the spec: {e}")))?;
        // Read one byte past the cap so an oversized file (or an endless one like /dev/zero) is
        // detected without reading all of it.
        let mut bytes = Vec::new();
        file.take(MAX_SPEC_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| SpecError::whole_file(&resolved, format!("cannot read the spec: {e}")))?;
        Self::parse(&resolved, &bytes, &cwd)
    }

    /// Validates spec `bytes`. `path_for_errors` is joined onto `base_dir` when relative and names
    /// the spec in errors and in [`Spec::path`]; relative paths inside the spec (data root,
    /// weights) resolve against `base_dir`. [`Spec::load`] passes the working directory.
    pub fn parse(path_for_errors: &Path, bytes: &[u8], base_dir: &Path) -> Result<Spec, SpecError> {
        let path = base_dir.join(path_for_errors);
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(SpecError::whole_file(
                &path,
                format!(
                    "the spec is larger than {} MiB; specs are small text files",
                    MAX_SPEC_BYTES >> 20
                ),
            ));
        }
        let text = decode_utf8(&path, bytes)?;
        let root = match yaml::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                return Err(SpecError::whole_file(
                    &path,
                    "the spec is empty; expected a mapping with keys name, seed, data, backbones, grid",
                ));
            }
            Err(e) => return Err(SpecError::at(&path, e.span, e.message)),
        };
        schema::build(&path, text, bytes, &root, base_dir)
    }
}

/// UTF-8 text, or an error locating the first invalid byte by line, column and byte offset.
fn decode_utf8<'b>(path: &Path, bytes: &'b [u8]) -> Result<&'b str, SpecError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let offset = e.valid_up_to();
            let prefix =
                std::str::from_utf8(bytes.get(..offset).unwrap_or_default()).unwrap_or_default();
            let line = prefix.matches('\n').count() + 1;
            let col = prefix
                .rsplit('\n')
                .next()
                .unwrap_or_default()
                .chars()
                .count()
                + 1;
            let byte = bytes.get(offset).copied().unwrap_or_default();
            Err(SpecError::at(
                path,
                Span { line, col },
                format!("the spec is not valid UTF-8: invalid byte 0x{byte:02X} at byte offset {offset}"),
            ))
        }
    }
}
