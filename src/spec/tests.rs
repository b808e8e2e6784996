//! Spec tests. Paths in specs resolve against CARGO_MANIFEST_DIR (the real shared data lives at
//! `../shared/data` from there), passed as `base_dir` so no test depends on or changes the cwd.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;

const WEIGHTS: &str = "../shared/data/pretrained/akamaster/resnet20-12fca82f.th";
const DATA: &str = "../shared/data/cifar10-jpeg";

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Nine lines; a grid appended to it starts on line 10.
fn head() -> String {
    format!(
        "name: t\nseed: 0\ndata:\n  dataset: cifar10\n  root: {DATA}\nbackbones:\n  resnet20:\n    arch: resnet20\n    weights: {WEIGHTS}\n"
    )
}

fn parse(text: &str) -> Result<Spec, SpecError> {
    Spec::parse(Path::new("t.yaml"), text.as_bytes(), &base())
}

fn ok(text: &str) -> Spec {
    match parse(text) {
        Ok(spec) => spec,
        Err(e) => panic!("expected a valid spec, got: {e}\n---\n{text}"),
    }
}

fn fail(text: &str) -> SpecError {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error is at `line:col` and its message contains `needle`.
fn fail_at(text: &str, line: usize, col: usize, needle: &str) {
    let e = fail(text);
    assert_eq!(e.span, Some(Span { line, col }), "wrong location for: {e}");
    assert!(
        e.message.contains(needle),
        "`{}` does not contain `{needle}`",
        e.message
    );
}

fn grid(body: &str) -> String {
    format!("{}grid:\n{body}", head())
}

/// Cells as plain JSON objects, for compact comparisons.
fn cells_json(spec: &Spec) -> Vec<serde_json::Value> {
    spec.cells
        .iter()
        .map(|c| {
            serde_json::Value::Object(
                c.params
                    .iter()
                    .map(|(k, p)| (k.clone(), p.value.clone()))
                    .collect(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------------------------ corpus

fn corpus_dir() -> PathBuf {
    base().join("tests/spec_corpus")
}

/// Files whose error has no location by design (there is nothing in the file to point at).
const UNLOCATED: &[&str] = &["empty.yaml", "only_comments.yaml", "whitespace_only.yaml"];

/// Every file of the corpus (outside `valid/`) must fail fast with the error its header announces:
/// line 1 `# expect: <substring of the message>`, line 2 `# at: <line>:<col>` or `# at: -`.
#[test]
fn every_corpus_file_fails_fast_with_its_announced_error() {
    let mut files = Vec::new();
    let mut dirs = vec![corpus_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name() != Some("valid".as_ref()) {
                    dirs.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(
        files.len() >= 100,
        "corpus went missing: {} files",
        files.len()
    );

    let mut slowest = (Duration::ZERO, PathBuf::new());
    for file in &files {
        let rel = file.strip_prefix(base()).unwrap();
        let name = file.file_name().unwrap().to_str().unwrap();
        let bytes = std::fs::read(file).unwrap();
        let started = Instant::now();
        let result = Spec::parse(rel, &bytes, &base());
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(5), "{name} took {elapsed:?}");
        if elapsed > slowest.0 {
            slowest = (elapsed, file.clone());
        }
        let e = match result {
            Ok(_) => panic!("{name} was accepted"),
            Err(e) => e,
        };
        let shown = e.to_string();
        let resolved = base().join(rel).display().to_string();
        assert!(
            shown.starts_with(&resolved),
            "{name}: `{shown}` does not start with `{resolved}`"
        );

        let header = String::from_utf8_lossy(&bytes[..bytes.len().min(400)]).into_owned();
        let mut lines = header.lines();
        let (expect, at) = match (
            lines.next().and_then(|l| l.strip_prefix("# expect: ")),
            lines.next(),
        ) {
            (Some(expect), Some(at)) => (
                expect.to_string(),
                at.strip_prefix("# at: ").unwrap_or("-").to_string(),
            ),
            _ if name == "empty.yaml" => ("the spec is empty".to_string(), "-".to_string()),
            _ => panic!("{name} has no `# expect:` header"),
        };
        assert!(
            shown.contains(&expect),
            "{name}: `{shown}` does not contain `{expect}`"
        );

        if UNLOCATED.contains(&name) {
            assert_eq!(e.span, None, "{name}");
            continue;
        }
        let span = e
            .span
            .unwrap_or_else(|| panic!("{name}: no location in `{shown}`"));
        assert!(span.line >= 1 && span.col >= 1, "{name}: {span:?}");
        assert!(
            shown.contains(&format!(":{}:{}: ", span.line, span.col)),
            "{name}: `{shown}`"
        );
        if at != "-" {
            assert_eq!(
                format!("{}:{}", span.line, span.col),
                at,
                "{name}: `{shown}`"
            );
        }
    }
    eprintln!(
        "corpus: {} files, slowest {:?} ({})",
        files.len(),
        slowest.0,
        slowest.1.display()
    );
}

#[test]
fn every_valid_example_loads() {
    let dir = corpus_dir().join("valid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Err(e) = Spec::parse(&path, &bytes, &base()) {
            panic!("{e}");
        }
        n += 1;
    }
    assert!(n >= 2);
}

// ------------------------------------------------------------------------------- full example

#[test]
fn full_example_round_trip() {
    let rel = Path::new("tests/spec_corpus/valid/full.yaml");
    let bytes = std::fs::read(base().join(rel)).unwrap();
    let spec = Spec::parse(rel, &bytes, &base()).unwrap();

    assert_eq!(spec.path, base().join(rel));
    assert_eq!(spec.text.as_bytes(), &bytes[..]);
    assert_eq!(spec.sha256, crate::util::sha256_bytes(&bytes));
    assert_eq!(spec.name, "quickstart");
    assert_eq!(spec.seed, 0);
    assert_eq!(spec.data.dataset, Dataset::Cifar10);
    assert_eq!(spec.data.root, base().join(DATA));
    assert_eq!(spec.data.span, Span { line: 5, col: 3 });

    assert_eq!(spec.backbones.len(), 1);
    let b = &spec.backbones["resnet20"];
    assert_eq!(b.arch, Arch::CifarResNet { depth: 20 });
    assert_eq!(b.weights, Some(base().join(WEIGHTS)));
    assert_eq!(
        b.normalize,
        Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225]
        }
    );
    assert_eq!(b.span, Span { line: 9, col: 5 });

    assert_eq!(
        spec.certify,
        CertifySettings {
            n0: 100,
            n: 100_000,
            alpha: 0.001,
            batch: 400,
            skip: 20,
            max: Some(10_000),
            ..CertifySettings::default()
        }
    );
    assert_eq!(spec.report.radii, vec![0.0, 0.25, 0.5, 0.75, 1.0]);

    // method × sigma × (lr, epochs), first axis slowest; caf cells expanded in place over
    // adapter_width; smooth σ=0.12 excluded; the include appended last.
    let mut want = Vec::new();
    for method in ["smooth", "caf"] {
        for sigma in [0.12, 0.25, 0.5] {
            for (lr, epochs) in [(0.1, 10), (0.01, 20)] {
                let cell = json!({"backbone": "resnet20", "method": method, "sigma": sigma, "lr": lr, "epochs": epochs});
                if method == "smooth" {
                    if sigma != 0.12 {
                        want.push(cell);
                    }
                } else {
                    for width in [32, 64] {
                        let mut c = cell.clone();
                        c["optimizer"] = json!("adam");
                        c["adapter_width"] = json!(width);
                        want.push(c);
                    }
                }
            }
        }
    }
    want.push(json!({"backbone": "resnet20", "method": "smooth", "sigma": 1.0}));
    assert_eq!(cells_json(&spec), want);

    // Spans point at the value each parameter came from.
    let first = &spec.cells[0].params;
    assert_eq!(first["backbone"].span, Span { line: 23, col: 15 });
    assert_eq!(first["method"].span, Span { line: 25, col: 14 });
    assert_eq!(first["sigma"].span, Span { line: 26, col: 19 });
    assert_eq!(first["lr"].span, Span { line: 28, col: 12 });
    assert_eq!(first["epochs"].span, Span { line: 29, col: 16 });
    let caf = &spec.cells[4].params;
    assert_eq!(caf["method"].span, Span { line: 25, col: 22 });
    assert_eq!(caf["optimizer"].span, Span { line: 32, col: 27 });
    assert_eq!(caf["adapter_width"].span, Span { line: 33, col: 30 });
    let included = &spec.cells.last().unwrap().params;
    assert_eq!(included["sigma"].span, Span { line: 37, col: 31 });
    assert_eq!(included["backbone"].span, Span { line: 23, col: 15 });
}

#[test]
fn minimal_spec_gets_defaults() {
    let spec = ok(&grid(
        "  params: {method: smooth}\n  axes:\n    sigma: [0.25]\n",
    ));
    assert_eq!(spec.certify, CertifySettings::default());
    assert_eq!(spec.report, ReportSettings::default());
    assert_eq!(spec.backbones["resnet20"].normalize, Normalize::IDENTITY);
    assert_eq!(
        cells_json(&spec),
        vec![json!({"method": "smooth", "sigma": 0.25})]
    );
}

#[test]
fn null_optional_sections_mean_defaults() {
    let spec = ok(&format!(
        "{}certify:\nreport:\n  radii:\ngrid:\n  params: {{method: smooth}}\n",
        head()
    ));
    assert_eq!(spec.certify, CertifySettings::default());
    assert_eq!(spec.report, ReportSettings::default());
}

// -------------------------------------------------------------------------------- loading

#[test]
fn load_resolves_relative_paths_against_the_working_directory() {
    // cargo runs unit tests with the package root as working directory.
    let cwd = std::env::current_dir().unwrap();
    let rel = Path::new("tests/spec_corpus/valid/minimal.yaml");
    let spec = Spec::load(rel).unwrap();
    assert_eq!(spec.path, cwd.join(rel));
    assert_eq!(spec.backbones["resnet20"].weights, Some(cwd.join(WEIGHTS)));
    assert_eq!(spec.data.root, cwd.join(DATA));
}

#[test]
fn load_reports_missing_files_with_the_resolved_path() {
    let cwd = std::env::current_dir().unwrap();
    let e = Spec::load(Path::new("no/such/spec.yaml")).unwrap_err();
    assert_eq!(e.span, None);
    assert!(e.to_string().starts_with(&format!(
        "{}: cannot read the spec",
        cwd.join("no/such/spec.yaml").display()
    )));
}

#[test]
fn load_rejects_oversized_files_without_reading_them_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, vec![b'#'; MAX_SPEC_BYTES + 10]).unwrap();
    let e = Spec::load(&path).unwrap_err();
    assert_eq!(e.path, path);
    assert!(e.message.contains("larger than 1 MiB"), "{e}");
}

#[test]
fn weights_error_shows_the_joined_path() {
    let text =
        head().replace("resnet20-12fca82f.th", "nope.th") + "grid:\n  params: {method: smooth}\n";
    let e = fail(&text);
    let want = base().join("../shared/data/pretrained/akamaster/nope.th");
    assert_eq!(
        e.message,
        format!("weights file not found: {}", want.display())
    );
    assert_eq!(e.span, Some(Span { line: 9, col: 14 }));
    assert_eq!(
        e.to_string(),
        format!("{}:9:14: {}", base().join("t.yaml").display(), e.message)
    );
}

#[test]
fn absolute_paths_are_used_as_given() {
    let abs = base().join(WEIGHTS);
    let text =
        head().replace(WEIGHTS, abs.to_str().unwrap()) + "grid:\n  params: {method: smooth}\n";
    assert_eq!(ok(&text).backbones["resnet20"].weights, Some(abs));
}

// ---------------------------------------------------------------------------- hostile input

#[test]
fn generated_hostile_inputs_fail_fast() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "1 MiB of [",
            vec![b'['; MAX_SPEC_BYTES],
            "nesting is deeper",
        ),
        (
            "1 MiB of {",
            vec![b'{'; MAX_SPEC_BYTES],
            "nesting is deeper",
        ),
        (
            "one huge scalar",
            vec![b'a'; MAX_SPEC_BYTES],
            "found the string",
        ),
        (
            "a huge flow list",
            format!("[{}0]", "0,".repeat(300_000)).into_bytes(),
            "more than 100000 nodes",
        ),
        (
            "a huge block list",
            "- a\n".repeat(200_000).into_bytes(),
            "more than 100000 nodes",
        ),
        (
            "a huge mapping",
            (0..80_000)
                .map(|i| format!("k{i}: 1\n"))
                .collect::<String>()
                .into_bytes(),
            "more than 100000 nodes",
        ),
        (
            "deep block mappings",
            (0..1000)
                .map(|i| format!("{}k:\n", " ".repeat(i)))
                .collect::<String>()
                .into_bytes(),
            "nesting is deeper",
        ),
        (
            "a huge quoted string",
            format!("\"{}", "x".repeat(MAX_SPEC_BYTES - 10)).into_bytes(),
            "YAML syntax error",
        ),
        (
            "many anchors",
            (0..30_000)
                .map(|i| format!("k{i}: &a{i} [1, 2]\n"))
                .collect::<String>()
                .into_bytes(),
            "more than 100000 nodes",
        ),
        (
            "too large",
            vec![b' '; MAX_SPEC_BYTES + 1],
            "larger than 1 MiB",
        ),
        ("all NULs", vec![0u8; 4096], "control character U+0000"),
    ];
    for (what, bytes, needle) in cases {
        let started = Instant::now();
        let e = Spec::parse(Path::new("h.yaml"), &bytes, &base()).unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(5), "{what} took {elapsed:?}");
        assert!(e.message.contains(needle), "{what}: {e}");
    }
}

#[test]
fn aliases_expand_within_the_budget() {
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  a:\n    arch: resnet20\n    weights: {WEIGHTS}\n    normalize: &imagenet\n      mean: [0.485, 0.456, 0.406]\n      std: [0.229, 0.224, 0.225]\n  b:\n    arch: resnet20\n    weights: {WEIGHTS}\n    normalize: *imagenet\ngrid:\n  params: {{method: smooth, backbone: a}}\n  axes:\n    sigma: &sigmas [0.25, 0.5]\n    other: *sigmas\n"
    );
    let spec = ok(&text);
    assert_eq!(spec.backbones["a"].normalize, spec.backbones["b"].normalize);
    assert_eq!(spec.backbones["b"].normalize.std, [0.229, 0.224, 0.225]);
    assert_eq!(spec.cells.len(), 4);
    // An alias keeps the spans of the node it copies.
    assert_eq!(
        spec.cells[3].params["other"].span,
        Span { line: 18, col: 27 }
    );
}

#[test]
fn non_utf8_error_names_line_column_and_offset() {
    let mut bytes = b"name: t\nseed: 0\ndata: caf\xc3".to_vec();
    bytes.extend_from_slice(b"\xffmore\n");
    let e = Spec::parse(Path::new("u.yaml"), &bytes, &base()).unwrap_err();
    assert_eq!(e.span, Some(Span { line: 3, col: 10 }));
    assert!(
        e.message.contains("invalid byte 0xC3 at byte offset 25"),
        "{e}"
    );
}

#[test]
fn control_characters_are_located() {
    fail_at("name: t\nseed: 0\x07\n", 2, 8, "control character U+0007");
}

#[test]
fn scanner_errors_are_located() {
    let e = fail("name: t\n  seed: [1, 2\n");
    assert!(e.message.starts_with("YAML syntax error: "), "{e}");
    assert!(e.span.is_some());
}

// ------------------------------------------------------------------------------- scalars

/// The resolved value of `x: <scalar>` as the grid sees it (an arbitrary parameter).
fn scalar(src: &str) -> Result<serde_json::Value, SpecError> {
    let spec = parse(&grid(&format!(
        "  params:\n    method: smooth\n    x: {src}\n"
    )))?;
    Ok(spec.cells[0].params["x"].value.clone())
}

#[test]
fn scalars_resolve_with_the_core_schema() {
    let cases = [
        ("~", json!(null)),
        ("null", json!(null)),
        ("NULL", json!(null)),
        ("", json!(null)),
        ("true", json!(true)),
        ("False", json!(false)),
        ("yes", json!("yes")),
        ("on", json!("on")),
        ("42", json!(42)),
        ("-7", json!(-7)),
        ("+7", json!(7)),
        ("0x1F", json!(31)),
        ("0o17", json!(15)),
        ("007", json!(7)),
        ("18446744073709551615", json!(u64::MAX)),
        ("-9223372036854775808", json!(i64::MIN)),
        ("1.5", json!(1.5)),
        ("-.5", json!(-0.5)),
        ("1.", json!(1.0)),
        ("1e3", json!(1000.0)),
        ("2.5E-1", json!(0.25)),
        ("1_000", json!("1_000")),
        ("0x", json!("0x")),
        ("1e", json!("1e")),
        ("inf", json!("inf")),
        ("nan", json!("nan")),
        ("'42'", json!("42")),
        ("\"true\"", json!("true")),
        ("\"a\\tb\"", json!("a\tb")),
        ("!!str 42", json!("42")),
        ("!!float 3", json!(3.0)),
        ("!!int 0x10", json!(16)),
        ("!!bool true", json!(true)),
        ("!!null ~", json!(null)),
        ("[1, [2, {a: b}]]", json!([1, [2, {"a": "b"}]])),
        ("{b: 1, a: 2}", json!({"b": 1, "a": 2})),
        ("|\n      two\n      lines", json!("two\nlines\n")),
    ];
    for (src, want) in cases {
        match scalar(src) {
            Ok(got) => assert_eq!(got, want, "{src}"),
            Err(e) => panic!("{src}: {e}"),
        }
    }
    // Integers keep their integer type; floats stay floats.
    assert!(scalar("3").unwrap().is_u64());
    assert!(scalar("-3").unwrap().is_i64());
    assert!(scalar("3.0").unwrap().is_f64());
}

#[test]
fn invalid_scalars_are_rejected_where_they_are() {
    for (src, needle) in [
        (
            ".inf",
            "expected a finite number for parameter `x`, found .inf",
        ),
        ("-.Inf", "found -.Inf"),
        (".NaN", "found .NaN"),
        ("1e999", "found 1e999"),
        ("18446744073709551616", "out of range"),
        ("-9223372036854775809", "out of range"),
        ("!!int 1.5", "`1.5` is not a valid !!int"),
        ("!!bool yes", "is not a valid !!bool"),
        ("!!seq x", "tag !!seq cannot be applied to a scalar"),
        ("!custom x", "unsupported tag"),
    ] {
        let e = scalar(src).unwrap_err();
        assert!(e.message.contains(needle), "{src}: {e}");
        assert_eq!(e.span.map(|s| s.line), Some(13), "{src}: {e}");
    }
}

// -------------------------------------------------------------------------- fixed schema

#[test]
fn unknown_keys_list_the_expected_ones() {
    fail_at(
        &format!("{}certify:\n  n0: 10\n  nn: 100\n", head()),
        12,
        3,
        "unknown key `nn` in certify; expected one of: n0, n, alpha, batch, skip, max, mode, radii, n_max, stop_if_wrong (did you mean `n0`?)",
    );
    fail_at(
        &head().replace("dataset:", "datset:"),
        4,
        3,
        "unknown key `datset` in data; expected one of: dataset, root, image_size, resize, fingerprint (did you mean `dataset`?)",
    );
    fail_at(
        &format!("{}grid:\n  axes: {{}}\n  zipp: []\n", head()),
        12,
        3,
        "did you mean `zip`?",
    );
}

/// `head()` with the data section replaced by `data` lines (each indented by two spaces); the
/// first data key is on line 4.
fn with_data(data: &[&str]) -> String {
    let lines: Vec<String> = data.iter().map(|l| format!("  {l}\n")).collect();
    head().replace(
        &format!("  dataset: cifar10\n  root: {DATA}\n"),
        &lines.concat(),
    )
}

#[test]
fn data_keys_default_per_dataset() {
    let root = format!("root: {DATA}");
    let spec = ok(&format!(
        "{}grid: {{params: {{method: smooth, backbone: resnet20, sigma: 0.25}}}}\n",
        with_data(&["dataset: cifar10", &root])
    ));
    assert_eq!((spec.data.image_size, spec.data.resize), (32, None));
    let spec = ok(&format!(
        "{}grid: {{params: {{method: smooth, backbone: resnet20, sigma: 0.25}}}}\n",
        with_data(&["dataset: imagefolder", &root])
    ));
    assert_eq!(spec.data.dataset, Dataset::ImageFolder);
    // timm's crop_pct 0.875: 224 / 0.875 = 256.
    assert_eq!((spec.data.image_size, spec.data.resize), (224, Some(256)));
    assert_eq!(
        spec.data.fingerprint,
        crate::data::imagefolder::Fingerprint::Stat
    );
    let spec = ok(&format!(
        "{}grid: {{params: {{method: smooth, backbone: resnet20, sigma: 0.25}}}}\n",
        with_data(&[
            "dataset: imagefolder",
            &root,
            "image_size: 32",
            "resize: 32",
            "fingerprint: content"
        ])
    ));
    assert_eq!((spec.data.image_size, spec.data.resize), (32, Some(32)));
    assert_eq!(
        spec.data.fingerprint,
        crate::data::imagefolder::Fingerprint::Content
    );
    let spec = ok(&format!(
        "{}grid: {{params: {{method: smooth, backbone: resnet20, sigma: 0.25}}}}\n",
        with_data(&["dataset: cifar100", &root])
    ));
    assert_eq!(spec.data.dataset, Dataset::Cifar100);
}

#[test]
fn bad_data_keys_are_located() {
    let root = format!("root: {DATA}");
    fail_at(
        &with_data(&["dataset: imagenet", &root]),
        4,
        12,
        "unknown dataset `imagenet`; expected one of: cifar10, cifar100, imagefolder",
    );
    fail_at(
        &with_data(&[
            "dataset: imagefolder",
            &root,
            "image_size: 224",
            "resize: 200",
        ]),
        7,
        11,
        "data.resize (200) is smaller than data.image_size (224)",
    );
    fail_at(
        &with_data(&["dataset: cifar10", &root, "resize: 36"]),
        6,
        11,
        "data.resize applies to `dataset: imagefolder` only",
    );
    fail_at(
        &with_data(&["dataset: cifar100", &root, "fingerprint: content"]),
        6,
        16,
        "data.fingerprint applies to `dataset: imagefolder` only",
    );
    fail_at(
        &with_data(&["dataset: cifar10", &root, "image_size: 224"]),
        6,
        15,
        "data.image_size of cifar10 is 32",
    );
    fail_at(
        &with_data(&["dataset: imagefolder", &root, "image_size: 0"]),
        6,
        15,
        "image_size",
    );
    fail_at(
        &with_data(&["dataset: imagefolder", &root, "image_size: big"]),
        6,
        15,
        "image_size",
    );
    fail_at(
        &with_data(&["dataset: imagefolder", &root, "fingerprint: sha1"]),
        6,
        16,
        "unknown data.fingerprint `sha1`; expected one of: stat",
    );
}

#[test]
fn wrong_types_say_what_was_expected() {
    fail_at(
        &head().replace("seed: 0", "seed: [0]"),
        2,
        7,
        "expected an integer ≥ 0 for seed, found a list",
    );
    fail_at(
        &head().replace("name: t", "name: {a: 1}"),
        1,
        7,
        "found a mapping",
    );
    fail_at(
        &head().replace("arch: resnet20", "arch: 20"),
        8,
        11,
        "expected a string for backbones.resnet20.arch, found 20",
    );
    fail_at(
        &format!("{}certify:\n  alpha: high\n", head()),
        11,
        10,
        "expected a number strictly between 0 and 1 for certify.alpha, found the string \"high\"",
    );
}

#[test]
fn certify_bounds() {
    let spec = |c: &str| {
        format!(
            "{}certify: {{{c}}}\ngrid:\n  params: {{method: smooth}}\n",
            head()
        )
    };
    let s = ok(&spec("n0: 1, n: 2, alpha: 0.5, batch: 1, skip: 1, max: 1"));
    assert_eq!(
        s.certify,
        CertifySettings {
            n0: 1,
            n: 2,
            alpha: 0.5,
            batch: 1,
            skip: 1,
            max: Some(1),
            ..CertifySettings::default()
        }
    );
    fail_at(
        &spec("n0: 5, n: 5"),
        10,
        15,
        "certify.n0 (5) must be less than certify.n (5)",
    );
    fail_at(
        &spec("n: 100"),
        10,
        14,
        "certify.n0 (100) must be less than certify.n (100)",
    );
    fail_at(
        &spec("n0: 0"),
        10,
        15,
        "expected an integer ≥ 1 for certify.n0, found 0",
    );
    fail_at(&spec("alpha: 1.0"), 10, 18, "strictly between 0 and 1");
    fail_at(&spec("alpha: -0.1"), 10, 18, "strictly between 0 and 1");
    fail_at(
        &spec("max: 0"),
        10,
        16,
        "expected an integer ≥ 1 for certify.max, found 0",
    );
    fail_at(
        &spec("batch: 4.0"),
        10,
        18,
        "expected an integer ≥ 1 for certify.batch, found 4.0",
    );
}

#[test]
fn report_radii_rules() {
    let spec = |r: &str| {
        format!(
            "{}report: {{radii: {r}}}\ngrid:\n  params: {{method: smooth}}\n",
            head()
        )
    };
    assert_eq!(ok(&spec("[0, 0.5, 2]")).report.radii, vec![0.0, 0.5, 2.0]);
    fail_at(&spec("[0.5, 0.5]"), 10, 23, "strictly ascending");
    fail_at(
        &spec("[.inf]"),
        10,
        18,
        "expected a number ≥ 0 for report.radii, found .inf",
    );
    fail_at(
        &spec("0.5"),
        10,
        17,
        "expected a list of radii for report.radii, found 0.5",
    );
}

#[test]
fn missing_required_keys_point_at_their_mapping() {
    fail_at(
        &grid("  params: {method: smooth}\n").replace("seed: 0\n", ""),
        1,
        1,
        "missing required key `seed` at the top level",
    );
    fail_at(
        &head().replace("  root: ../shared/data/cifar10-jpeg\n", ""),
        4,
        3,
        "missing required key `root` in data",
    );
}

#[test]
fn names_are_checked() {
    for bad in ["\"a b\"", "\"a/b\"", "''", ".", "..", "ünïcode"] {
        let e =
            fail(&grid("  params: {method: smooth}\n").replace("name: t", &format!("name: {bad}")));
        assert!(e.message.contains("expected a name"), "{bad}: {e}");
    }
    assert_eq!(
        ok(&grid("  params: {method: smooth}\n").replace("name: t", "name: A-b_c.1")).name,
        "A-b_c.1"
    );
}

// ------------------------------------------------------------------------------------ grid

#[test]
fn axes_multiply_first_slowest_then_zip_groups() {
    let spec = ok(&grid(
        "  params: {method: smooth}\n  zip:\n    - {lr: [1, 2], ep: [3, 4]}\n  axes:\n    a: [x, y]\n    b: [true]\n",
    ));
    assert_eq!(
        cells_json(&spec),
        vec![
            json!({"method": "smooth", "a": "x", "b": true, "lr": 1, "ep": 3}),
            json!({"method": "smooth", "a": "x", "b": true, "lr": 2, "ep": 4}),
            json!({"method": "smooth", "a": "y", "b": true, "lr": 1, "ep": 3}),
            json!({"method": "smooth", "a": "y", "b": true, "lr": 2, "ep": 4}),
        ]
    );
}

#[test]
fn lists_in_params_are_values_not_axes() {
    let spec = ok(&grid(
        "  params:\n    method: smooth\n    milestones: [10, 20]\n",
    ));
    assert_eq!(
        cells_json(&spec),
        vec![json!({"method": "smooth", "milestones": [10, 20]})]
    );
}

#[test]
fn sigma_is_always_a_float() {
    let spec = ok(&grid(
        "  params: {method: smooth}\n  axes:\n    sigma: [1, 0.5]\n",
    ));
    assert!(spec.cells[0].params["sigma"].value.is_f64());
    assert_eq!(spec.cells[0].params["sigma"].value, json!(1.0));
}

#[test]
fn sigma_errors_point_at_the_offending_item() {
    fail_at(
        &grid("  params: {method: smooth}\n  axes:\n    sigma: [0.25,\n      -0.5]\n"),
        14,
        7,
        "expected a number > 0 for sigma, found -0.5",
    );
    fail_at(
        &grid("  params: {method: smooth, sigma: 0}\n"),
        11,
        35,
        "expected a number > 0 for sigma, found 0",
    );
}

#[test]
fn method_extras_apply_only_to_their_method() {
    let spec = ok(&grid(
        "  axes:\n    method: [a, b]\n    s: [1, 2]\n  methods:\n    b:\n      params: {opt: sgd}\n      axes: {w: [8, 16]}\n      zip: [{u: [0, 1], v: [2, 3]}]\n",
    ));
    let want: Vec<serde_json::Value> = vec![
        json!({"method": "a", "s": 1}),
        json!({"method": "a", "s": 2}),
        json!({"method": "b", "s": 1, "opt": "sgd", "w": 8, "u": 0, "v": 2}),
        json!({"method": "b", "s": 1, "opt": "sgd", "w": 8, "u": 1, "v": 3}),
        json!({"method": "b", "s": 1, "opt": "sgd", "w": 16, "u": 0, "v": 2}),
        json!({"method": "b", "s": 1, "opt": "sgd", "w": 16, "u": 1, "v": 3}),
        json!({"method": "b", "s": 2, "opt": "sgd", "w": 8, "u": 0, "v": 2}),
        json!({"method": "b", "s": 2, "opt": "sgd", "w": 8, "u": 1, "v": 3}),
        json!({"method": "b", "s": 2, "opt": "sgd", "w": 16, "u": 0, "v": 2}),
        json!({"method": "b", "s": 2, "opt": "sgd", "w": 16, "u": 1, "v": 3}),
    ];
    assert_eq!(cells_json(&spec), want);
}

#[test]
fn different_methods_may_share_extra_names() {
    let spec = ok(&grid(
        "  axes:\n    method: [a, b]\n  methods:\n    a: {axes: {lr: [1]}}\n    b: {axes: {lr: [2, 3]}}\n",
    ));
    assert_eq!(spec.cells.len(), 3);
}

#[test]
fn method_extras_must_be_used() {
    fail_at(
        &grid("  params: {method: smooth}\n  methods:\n    smoth: {params: {x: 1}}\n"),
        13,
        5,
        "no cell has method `smoth` (methods in the grid: smooth) (did you mean `smooth`?)",
    );
    // An include counts as a use.
    let spec = ok(&grid("  params: {method: smooth}\n  methods:\n    caf: {params: {x: 1}}\n  include:\n    - {method: caf}\n"));
    assert_eq!(cells_json(&spec)[1], json!({"method": "caf", "x": 1}));
}

#[test]
fn names_are_unique_per_level_and_across_levels() {
    fail_at(
        &grid("  params: {method: smooth, lr: 1}\n  axes:\n    lr: [1, 2]\n"),
        13,
        5,
        "`lr` is already defined in grid.params (line 11, column 28)",
    );
    // Reported at the later occurrence even when axes come first in the file.
    fail_at(
        &grid("  axes:\n    lr: [1, 2]\n  params: {method: smooth, lr: 1}\n"),
        13,
        28,
        "`lr` is already defined in grid.axes (line 12, column 5)",
    );
    fail_at(
        &grid(
            "  params: {method: smooth}\n  zip:\n    - {a: [1], b: [2]}\n    - {c: [1], a: [3]}\n",
        ),
        14,
        16,
        "`a` is already defined in grid.zip",
    );
    fail_at(
        &grid("  params: {method: smooth, lr: 1}\n  methods:\n    smooth: {params: {lr: 2}}\n"),
        13,
        23,
        "already defined in grid.params",
    );
}

#[test]
fn zip_mismatch_points_at_the_shorter_list() {
    fail_at(
        &grid("  params: {method: smooth}\n  zip:\n    - a: [1]\n      b: [1, 2, 3]\n      c: [1, 2]\n"),
        13,
        10,
        "`a` has 1 value but `b` has 3",
    );
}

#[test]
fn exclusion_compares_numbers_by_value() {
    let spec = ok(&grid(
        "  params: {method: smooth}\n  axes:\n    sigma: [0.5, 1]\n    lr: [1.0, 2]\n  exclude:\n    - {sigma: 1, lr: 1}\n    - {lr: 7}\n",
    ));
    assert_eq!(
        cells_json(&spec),
        vec![
            json!({"method": "smooth", "sigma": 0.5, "lr": 1.0}),
            json!({"method": "smooth", "sigma": 0.5, "lr": 2}),
            json!({"method": "smooth", "sigma": 1.0, "lr": 2}),
        ]
    );
}

#[test]
fn exclusion_can_name_method_extras_and_structured_values() {
    let spec = ok(&grid(
        "  axes:\n    method: [a, b]\n  methods:\n    b:\n      axes: {sched: [{gamma: 0.1, steps: [1]}, {steps: [2], gamma: 0.1}]}\n  exclude:\n    - {sched: {steps: [1], gamma: 0.1}}\n",
    ));
    assert_eq!(
        cells_json(&spec),
        vec![
            json!({"method": "a"}),
            json!({"method": "b", "sched": {"steps": [2], "gamma": 0.1}})
        ]
    );
}

#[test]
fn includes_merge_params_and_drop_duplicates() {
    let spec = ok(&grid(
        "  params: {method: smooth, backbone: resnet20}\n  axes:\n    sigma: [0.25]\n  methods:\n    caf: {params: {opt: adam}, axes: {w: [1, 2]}}\n  include:\n    - {sigma: 0.25}\n    - {method: caf, sigma: 1, w: 4}\n    - {method: caf, sigma: 1.0, w: 4}\n    - {sigma: 0.5, backbone: resnet20}\n",
    ));
    assert_eq!(
        cells_json(&spec),
        vec![
            json!({"method": "smooth", "backbone": "resnet20", "sigma": 0.25}),
            json!({"method": "caf", "backbone": "resnet20", "opt": "adam", "sigma": 1.0, "w": 4}),
            json!({"method": "smooth", "backbone": "resnet20", "sigma": 0.5}),
        ]
    );
}

#[test]
fn an_exclude_rule_matching_nothing_is_fine() {
    let spec = ok(&grid(
        "  params: {method: smooth}\n  axes:\n    sigma: [0.25]\n  exclude:\n    - {sigma: 0.5}\n",
    ));
    assert_eq!(spec.cells.len(), 1);
}

#[test]
fn backbone_and_method_params_are_validated_everywhere() {
    fail_at(
        &grid("  axes:\n    method: [smooth]\n    backbone: [resnet20, resnet56]\n"),
        13,
        26,
        "unknown backbone `resnet56`; backbones defined: resnet20",
    );
    fail_at(
        &grid(
            "  params: {method: smooth, backbone: resnet20}\n  exclude:\n    - {backbone: r20}\n",
        ),
        13,
        18,
        "unknown backbone `r20`",
    );
    fail_at(
        &grid("  params: {method: [smooth]}\n"),
        11,
        20,
        "expected a method name",
    );
    fail_at(
        &grid("  params: {method: smooth}\n  include:\n    - {method: 3}\n"),
        13,
        16,
        "found 3",
    );
}

#[test]
fn rules_name_only_known_parameters() {
    fail_at(
        &grid("  params: {method: smooth}\n  axes: {sigma: [1]}\n  include:\n    - {sigma: 1, lr: 2}\n"),
        14,
        18,
        "unknown parameter `lr` in grid.include; parameters in the grid: method, sigma",
    );
}

#[test]
fn cell_count_is_bounded_before_expanding() {
    let axes: String = (0..12)
        .map(|i| format!("    p{i}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n"))
        .collect();
    let started = Instant::now();
    let e = fail(&grid(&format!(
        "  params: {{method: smooth}}\n  axes:\n{axes}"
    )));
    assert!(e.message.contains("more than 20000 cells"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Method extras are bounded too.
    let e = fail(&grid(&format!(
        "  axes:\n    method: [a]\n    s: [{}]\n  methods:\n    a:\n      axes:\n{}",
        (0..200)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        (0..2)
            .map(|i| format!(
                "        q{i}: [{}]\n",
                (0..20)
                    .map(|j| j.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .collect::<String>()
    )));
    assert!(e.message.contains("more than 20000 cells"), "{e}");
}

#[test]
fn exclusion_work_is_bounded() {
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let rules = |n: usize| {
        (0..n)
            .map(|i| format!("    - {{a: {i}, b: -1}}\n"))
            .collect::<String>()
    };
    let text = |n_rules: usize| {
        grid(&format!(
            "  params: {{method: smooth}}\n  axes:\n    a: [{}]\n    b: [{}]\n  exclude:\n{}",
            values(1000),
            values(20),
            rules(n_rules)
        ))
    };
    // At the limit: 20,000 cells × 125 two-entry rules whose first entries match some cells.
    let started = Instant::now();
    assert_eq!(ok(&text(125)).cells.len(), MAX_CELLS);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let e = fail(&text(126));
    assert!(e.message.contains("too much filtering work"), "{e}");
}

#[test]
fn large_values_copied_into_many_cells_are_bounded() {
    let big_list = format!("[{}0]", "0, ".repeat(40_000));
    let big_string = format!("\"{}\"", "x".repeat(600_000));
    for value in [big_list, big_string] {
        let text = grid(&format!(
            "  params: {{method: smooth, blob: {value}}}\n  axes:\n    a: [{}]\n",
            (0..1000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let started = Instant::now();
        let e = fail(&text);
        assert!(e.message.contains("would take more than 128 MiB"), "{e}");
        assert_eq!(e.span, Some(Span { line: 10, col: 1 }));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[test]
fn thousands_of_names_keep_errors_short_and_fast() {
    let axes: String = (0..20_000).map(|i| format!("    p{i}: [0]\n")).collect();
    let text = grid(&format!(
        "  params: {{method: smooth}}\n  axes:\n{axes}  exclude:\n{}",
        "    - {p1: 0, p2: 0, p3: 1}\n".repeat(5_000) + "    - {q: 0}\n"
    ));
    let started = Instant::now();
    let e = fail(&text);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        e.message
            .starts_with("unknown parameter `q` in grid.exclude"),
        "{e}"
    );
    assert!(e.message.ends_with("… and 19981 more"), "{e}");
    assert!(e.message.len() < 400);
}

#[test]
fn a_grid_of_exactly_the_limit_is_accepted() {
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let spec = ok(&grid(&format!(
        "  params: {{method: smooth}}\n  axes:\n    a: [{}]\n    b: [{}]\n",
        values(200),
        values(MAX_CELLS / 200)
    )));
    assert_eq!(spec.cells.len(), MAX_CELLS);
}

#[test]
fn error_display_format() {
    let e = SpecError::at(Path::new("/x/s.yaml"), Span { line: 3, col: 4 }, "boom");
    assert_eq!(e.to_string(), "/x/s.yaml:3:4: boom");
    assert_eq!(
        SpecError::whole_file(Path::new("s.yaml"), "boom").to_string(),
        "s.yaml: boom"
    );
}

#[test]
fn unsupported_tags_are_shown_as_written() {
    let e = fail("name: !!python/object:os.system x\n");
    assert!(
        e.message
            .starts_with("unsupported tag `!!python/object:os.system`"),
        "{e}"
    );
    let e = fail("name: !<tag:example.com,2000:x> y\n");
    assert!(
        e.message
            .starts_with("unsupported tag `!<tag:example.com,2000:x>`"),
        "{e}"
    );
}

#[test]
fn byte_order_mark_and_crlf_are_accepted() {
    let text = format!(
        "\u{feff}{}",
        grid("  params: {method: smooth}\n").replace('\n', "\r\n")
    );
    let spec = ok(&text);
    assert_eq!(spec.cells.len(), 1);
    fail_at(
        &text.replace("seed: 0", "seed: x"),
        2,
        7,
        "expected an integer",
    );
}

/// Deterministic mutation fuzzing of the full example: whatever the bytes, parsing returns
/// (no panic, no hang) and errors stay located in the file.
#[test]
fn mutated_specs_never_panic_or_hang() {
    let original = std::fs::read(corpus_dir().join("valid/full.yaml")).unwrap();
    let specials = b"[]{}:,-?&*!|>'\"#%@\t\n \\~.0-9e\x00\xff";
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        // xorshift64*: enough variety for mutations, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    };
    let started = Instant::now();
    for _ in 0..1500 {
        let mut bytes = original.clone();
        for _ in 0..1 + next(4) {
            let at = next(bytes.len());
            match next(5) {
                0 => bytes.truncate(at),
                1 => bytes[at] = specials[next(specials.len())],
                2 => bytes.insert(at, specials[next(specials.len())]),
                3 => {
                    let len = next(40).min(bytes.len() - at);
                    bytes.drain(at..at + len);
                }
                _ => {
                    let len = next(60).min(bytes.len() - at);
                    let chunk: Vec<u8> = bytes[at..at + len].to_vec();
                    let to = next(bytes.len());
                    bytes.splice(to..to, chunk);
                }
            }
            if bytes.is_empty() {
                bytes.push(b'a');
            }
        }
        let one = Instant::now();
        let result = Spec::parse(Path::new("fuzz.yaml"), &bytes, &base());
        assert!(
            one.elapsed() < Duration::from_secs(2),
            "slow on {:?}",
            String::from_utf8_lossy(&bytes)
        );
        if let Err(e) = result {
            let lines = bytes.split(|&b| b == b'\n').count();
            if let Some(span) = e.span {
                assert!(
                    span.line >= 1 && span.line <= lines + 1 && span.col >= 1,
                    "{e}"
                );
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Prints every corpus error, for reviewing message wording:
/// `cargo test --lib spec::tests::dump_corpus_messages -- --ignored --nocapture`.
#[test]
#[ignore]
fn dump_corpus_messages() {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let rel = f.strip_prefix(base()).unwrap();
        let t = Instant::now();
        let e = Spec::parse(rel, &bytes, &base()).unwrap_err();
        println!(
            "{:>8.2?} {}",
            t.elapsed(),
            e.to_string().replace(&base().display().to_string(), "$B")
        );
    }
}

#[test]
fn sequential_certification_settings_parse() {
    let spec = ok(&format!(
        "{}certify: {{mode: sequential, radii: [0.25, 0.5, 1], n_max: 5000, batch: 200, stop_if_wrong: true}}\ngrid:\n  params: {{method: smooth}}\n",
        head()
    ));
    assert_eq!(
        spec.certify,
        CertifySettings {
            batch: 200,
            mode: crate::spec::CertifyMode::Sequential,
            radii: vec![0.25, 0.5, 1.0],
            n_max: Some(5000),
            stop_if_wrong: true,
            ..CertifySettings::default()
        }
    );
    // Cohen stays the default, with no sequential setting.
    let spec = ok(&format!("{}grid:\n  params: {{method: smooth}}\n", head()));
    assert_eq!(spec.certify.mode, crate::spec::CertifyMode::Cohen);
    assert!(spec.certify.radii.is_empty() && spec.certify.n_max.is_none());
}

#[test]
fn onnx_backbones_take_feature_and_logits_keys() {
    let onnx = "tests/fixtures/onnx/resnet20.onnx";
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  mine:\n    arch: onnx\n    weights: {onnx}\n    feature: feature\n    logits: logits\n  bare:\n    arch: onnx\n    weights: {onnx}\ngrid:\n  params: {{method: smooth, backbone: mine}}\n"
    );
    let spec = ok(&text);
    let mine = &spec.backbones["mine"];
    assert_eq!(mine.arch, Arch::Onnx);
    assert_eq!(
        (mine.onnx.feature.as_deref(), mine.onnx.logits.as_deref()),
        (Some("feature"), Some("logits"))
    );
    // Identity by default: an exported graph normalises inside.
    assert_eq!(mine.normalize, Normalize::IDENTITY);
    assert!(spec.backbones["bare"].onnx.is_default());

    // Only ONNX graphs have named outputs: on another arch the key is an error at the key's value.
    let text = format!(
        "{}    feature: feature\ngrid:\n  params: {{method: smooth, backbone: resnet20}}\n",
        head()
    );
    fail_at(&text, 10, 14, "only valid with `arch: onnx`");
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  mine:\n    arch: onnx\n    weights: {onnx}\n    logits: [a]\ngrid:\n  params: {{method: smooth, backbone: mine}}\n"
    );
    fail_at(&text, 8, 13, "backbones.mine.logits");
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  mine:\n    arch: onnx\n    weights: {onnx}\n    featur: x\ngrid:\n  params: {{method: smooth, backbone: mine}}\n"
    );
    fail_at(&text, 8, 5, "did you mean `feature`");
}

#[test]
fn a_vit_or_resnet50_without_normalize_gets_its_reference_normalisation() {
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  v:\n    arch: vit_cifar_tiny_patch4_32\n    weights: {WEIGHTS}\n  r:\n    arch: resnet50\n    weights: {WEIGHTS}\n  c:\n    arch: resnet20\n    weights: {WEIGHTS}\ngrid:\n  params: {{method: smooth, backbone: c}}\n  axes:\n    sigma: [0.25]\n"
    );
    let spec = ok(&text);
    assert_eq!(spec.backbones["v"].normalize.mean, [0.5, 0.5, 0.5]);
    assert_eq!(spec.backbones["v"].normalize.std, [0.5, 0.5, 0.5]);
    assert_eq!(spec.backbones["r"].normalize.std, [0.229, 0.224, 0.225]);
    // The CIFAR ResNets keep "none", so recorded job ids do not change.
    assert_eq!(spec.backbones["c"].normalize, Normalize::IDENTITY);
}

#[test]
fn retries_are_read_and_bad_caps_are_located() {
    let body = "  params: {method: smooth}\n  axes:\n    sigma: [0.25]\n";
    assert_eq!(ok(&grid(body)).retries, crate::spec::Retries::default());
    let text = format!(
        "retries: {{attempts: 5, interruptions: 40}}\n{}",
        grid(body)
    );
    let r = ok(&text).retries;
    assert_eq!((r.attempts, r.interruptions), (5, 40));
    let text = format!("retries: {{interruptions: 0}}\n{}", grid(body));
    let e = parse(&text).unwrap_err();
    assert_eq!(e.span, Some(crate::spec::Span { line: 1, col: 26 }), "{e}");
    assert!(e.message.contains("retries.interruptions"), "{e}");
    let text = format!("retries: {{attempt: 5}}\n{}", grid(body));
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("attempts"), "did you mean: {e}");
}

#[test]
fn a_backbone_has_weights_or_training_and_only_trainable_archs_train() {
    let text = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  v:\n    arch: vit_cifar_tiny_patch4_32\n    train: {{epochs: 3, lr: 0.001}}\n  r:\n    arch: resnet20\n    weights: {WEIGHTS}\n    train: {{epochs: 1}}\ngrid:\n  params: {{method: smooth, backbone: v}}\n"
    );
    let spec = ok(&text);
    let v = &spec.backbones["v"];
    assert_eq!(v.weights, None);
    let train = v.train.as_ref().expect("train");
    assert_eq!(train.params["epochs"].value, json!(3));
    assert_eq!(train.params["lr"].value, json!(0.001));
    assert_eq!(train.params["lr"].span, Span { line: 7, col: 28 });
    assert!(spec.backbones["r"].weights.is_some() && spec.backbones["r"].train.is_some());

    let neither = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  v:\n    arch: vit_cifar_tiny_patch4_32\ngrid:\n  params: {{method: smooth, backbone: v}}\n"
    );
    fail_at(
        &neither,
        6,
        5,
        "needs `weights:` (a checkpoint file) or `train:`",
    );
    let frozen_only = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  r:\n    arch: resnet50\n    weights: {WEIGHTS}\n    train: {{epochs: 1}}\ngrid:\n  params: {{method: smooth, backbone: r}}\n"
    );
    fail_at(&frozen_only, 8, 5, "a CIFAR ResNet or a ViT");
    let not_a_map = format!(
        "name: t\nseed: 0\ndata: {{dataset: cifar10, root: {DATA}}}\nbackbones:\n  v:\n    arch: vit_cifar_tiny_patch4_32\n    train: 3\ngrid:\n  params: {{method: smooth, backbone: v}}\n"
    );
    fail_at(&not_a_map, 7, 12, "backbones.v.train");
}
