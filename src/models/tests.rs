//! Model and weight-reader tests on the shared akamaster checkpoints, the PyTorch fixtures
//! written by `bench/make_fixture.py` / `bench/make_weight_fixtures.py`, and hand-built files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

use super::*;
use crate::data::{load_cifar10, Split};

fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn akamaster(file: &str) -> PathBuf {
    manifest("../shared/data/pretrained/akamaster").join(file)
}

fn fixture(file: &str) -> PathBuf {
    manifest("tests/fixtures").join(file)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor to vec")
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

fn assert_same_state_dicts(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for (k, ta) in a {
        let tb = &b[k];
        assert_eq!(ta.dims(), tb.dims(), "{k}");
        assert_eq!(ta.dtype(), tb.dtype(), "{k}");
        assert_eq!(flat(ta), flat(tb), "{k}");
    }
}

#[test]
fn legacy_th_and_safetensors_are_identical() {
    for (th, st, n) in [
        ("resnet20-12fca82f.th", "resnet20.safetensors", 20),
        ("resnet56-4bfd9763.th", "resnet56.safetensors", 56),
    ] {
        let dev = Device::Cpu;
        let a = load_state_dict(&akamaster(th), &dev).expect("legacy");
        let b = load_state_dict(&akamaster(st), &dev).expect("safetensors");
        assert_same_state_dicts(&a, &b);
        // Every tensor the architecture reads, and nothing else.
        let expected = expected_tensors(Arch::CifarResNet { depth: n }, 10).expect("names");
        let shapes = a
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        assert_eq!(compare_names(&expected, &shapes), None, "{th}");
    }
}

#[test]
fn detects_formats_by_magic() {
    let read = |p: PathBuf| std::fs::read(p).expect("read");
    assert_eq!(
        detect_format(&read(akamaster("resnet20-12fca82f.th"))),
        Some(WeightFormat::TorchLegacy)
    );
    assert_eq!(
        detect_format(&read(akamaster("resnet20.safetensors"))),
        Some(WeightFormat::Safetensors)
    );
    assert_eq!(
        detect_format(&read(fixture("torch_formats_zip.pt"))),
        Some(WeightFormat::TorchZip)
    );
    // A 128-byte safetensors header starts with 0x80 0x00, like a pickle PROTO opcode would.
    let mut st = 128u64.to_le_bytes().to_vec();
    st.push(b'{');
    st.extend([b' '; 127]);
    assert_eq!(detect_format(&st), Some(WeightFormat::Safetensors));
    assert_eq!(detect_format(b"hello world"), None);
    assert_eq!(detect_format(b""), None);
}

/// The zip and legacy fixtures: views (transposed, row, strided), f64, f16, a long
/// `num_batches_tracked`, `module.` prefix and a `{'state_dict': …}` wrapper.
#[test]
fn torch_zip_and_legacy_formats_with_views_and_dtypes() {
    let expected = read_json(&fixture("torch_formats_expected.json"));
    let expected = expected.as_object().expect("object");
    for file in ["torch_formats_zip.pt", "torch_formats_legacy.pt"] {
        let sd = load_state_dict(&fixture(file), &Device::Cpu).expect(file);
        assert_eq!(sd.len(), expected.len(), "{file}");
        for (name, want) in expected {
            let t = sd
                .get(name)
                .unwrap_or_else(|| panic!("{file}: {name} missing"));
            let shape: Vec<usize> = want["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|v| v.as_u64().expect("dim") as usize)
                .collect();
            assert_eq!(t.dims(), shape.as_slice(), "{file} {name}");
            let dtype = match want["dtype"].as_str().expect("dtype") {
                "float32" => DType::F32,
                "float64" => DType::F64,
                "float16" => DType::F16,
                "int64" => DType::I64,
                other => panic!("unexpected dtype {other}"),
            };
            assert_eq!(t.dtype(), dtype, "{file} {name}");
            let values: Vec<f64> = want["values"]
                .as_array()
                .expect("values")
                .iter()
                .map(|v| v.as_f64().expect("value"))
                .collect();
            let got: Vec<f64> = flat(&t.to_dtype(DType::F64).expect("f64"))
                .iter()
                .map(|&v| v as f64)
                .collect();
            let got = if dtype == DType::F64 {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f64>())
                    .expect("f64 values")
            } else {
                got
            };
            assert_eq!(got, values, "{file} {name}");
        }
    }
}

// ---- A tiny pickle writer, to build legacy checkpoints the real files do not cover. ----

fn p_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn p_int(out: &mut Vec<u8>, i: u32) {
    out.push(b'J');
    out.extend(i.to_le_bytes());
}

fn p_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.extend(format!("c{module}\n{name}\n").as_bytes());
}

fn p_ints_tuple(out: &mut Vec<u8>, xs: &[u32]) {
    out.push(b'(');
    for &x in xs {
        p_int(out, x);
    }
    out.push(b't');
}

/// A legacy checkpoint `{'w': tensor}` whose storage is the view `view` of a root storage
/// holding 0.0, 1.0, …, 9.0, as torch < 0.4 wrote storage views.
fn legacy_file(view: Option<(u32, u32)>, offset: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
    let mut f = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec();
    f.extend(b"\x80\x02M\xe9\x03.");
    f.extend(b"\x80\x02}.");
    f.extend(b"\x80\x02}");
    p_str(&mut f, "w");
    p_global(&mut f, "torch._utils", "_rebuild_tensor");
    f.push(b'(');
    // Persistent id: ('storage', FloatStorage, 'root', 'cpu', 10, view_metadata).
    f.push(b'(');
    p_str(&mut f, "storage");
    p_global(&mut f, "torch", "FloatStorage");
    p_str(&mut f, "root");
    p_str(&mut f, "cpu");
    p_int(&mut f, 10);
    match view {
        None => f.push(b'N'),
        Some((o, n)) => {
            f.push(b'(');
            p_str(&mut f, "view");
            p_int(&mut f, o);
            p_int(&mut f, n);
            f.push(b't');
        }
    }
    f.push(b't');
    f.push(b'Q');
    p_int(&mut f, offset);
    p_ints_tuple(&mut f, size);
    p_ints_tuple(&mut f, stride);
    f.push(b't');
    f.extend(b"Rs.");
    f.extend(b"\x80\x02]");
    p_str(&mut f, "root");
    f.extend(b"a.");
    f.extend(10u64.to_le_bytes());
    for i in 0..10 {
        f.extend((i as f32).to_le_bytes());
    }
    f
}

fn load_bytes(bytes: &[u8]) -> Result<HashMap<String, Tensor>, ModelError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.th");
    std::fs::write(&path, bytes).expect("write");
    load_state_dict(&path, &Device::Cpu)
}

#[test]
fn legacy_storage_views_and_strides() {
    // view = root[2..8] = 2..7; offset 1, size (2,2), stride (1,2) → [[3,5],[4,6]].
    let sd = load_bytes(&legacy_file(Some((2, 6)), 1, &[2, 2], &[1, 2])).expect("view");
    assert_eq!(flat(&sd["w"]), vec![3.0, 5.0, 4.0, 6.0]);
    let sd = load_bytes(&legacy_file(None, 4, &[3], &[2])).expect("strided");
    assert_eq!(flat(&sd["w"]), vec![4.0, 6.0, 8.0]);
}

#[test]
fn legacy_out_of_range_views_are_errors() {
    for (view, offset, size, stride) in [
        (None, 8, vec![3], vec![1]),
        (None, 0, vec![4], vec![4]),
        (Some((5, 6)), 0, vec![1], vec![1]),
        (Some((2, 3)), 0, vec![4], vec![1]),
        (None, 0, vec![2, 2], vec![1]),
        (None, 0, vec![1 << 30, 1 << 30], vec![0, 0]),
    ] {
        let e = load_bytes(&legacy_file(view, offset, &size, &stride))
            .expect_err("out-of-range view must fail")
            .to_string();
        assert!(e.contains("w.th"), "{e}");
    }
}

#[test]
fn truncated_and_garbage_files_are_errors_not_panics() {
    let real = std::fs::read(akamaster("resnet20-12fca82f.th")).expect("read");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cut.th");
    let n = real.len();
    for cut in [
        0,
        1,
        2,
        5,
        15,
        16,
        30,
        100,
        200,
        500,
        1000,
        5000,
        n / 2,
        n - 100,
        n - 1,
    ] {
        std::fs::write(&path, &real[..cut]).expect("write");
        let e = load_state_dict(&path, &Device::Cpu).expect_err("truncated file must fail");
        let msg = e.to_string();
        assert!(msg.contains("cut.th"), "{msg}");
        // The same cuts must fail (not panic) through the model loader too.
        assert!(load_classifier(
            Arch::CifarResNet { depth: 20 },
            &path,
            Normalize::IMAGENET,
            &Device::Cpu
        )
        .is_err());
    }
    for (name, bytes) in [
        ("garbage.bin", b"this is not a checkpoint at all".to_vec()),
        ("pickleish.th", b"\x80\x02garbage".to_vec()),
        ("zipish.pt", b"PK\x03\x04 definitely not a zip".to_vec()),
        (
            "st.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}".to_vec(),
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        let msg = load_state_dict(&p, &Device::Cpu)
            .expect_err(name)
            .to_string();
        assert!(msg.contains(name), "{msg}");
    }
}

#[test]
fn corrupted_headers_never_panic() {
    // The legacy pickle part and the safetensors JSON header are both in the first ~16 KB; the
    // rest is raw floats, where any byte value is valid.
    for (file, rounds) in [("resnet20-12fca82f.th", 400), ("resnet20.safetensors", 150)] {
        corrupt_and_load(&akamaster(file), rounds);
    }
    // The zip fixture is small enough to corrupt anywhere.
    corrupt_and_load(&fixture("torch_formats_zip.pt"), 300);
}

fn corrupt_and_load(path: &Path, rounds: usize) {
    let real = std::fs::read(path).expect("read");
    let region = real.len().min(16 * 1024);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for i in 0..rounds {
        let mut bytes = real.clone();
        for _ in 0..1 + i % 3 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng as usize) % region;
            bytes[at] = (rng >> 32) as u8;
        }
        // Ok or Err are both acceptable; a panic fails the test.
        let _ = load_bytes(&bytes);
    }
}

#[test]
fn unrecognised_format_error_is_clear() {
    let e = load_bytes(b"hello, weights")
        .expect_err("garbage")
        .to_string();
    assert!(e.contains("unrecognised weights format"), "{e}");
    let e = load_bytes(b"").expect_err("empty").to_string();
    assert!(e.contains("empty"), "{e}");
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load_state_dict(&dir.path().join("absent.th"), &Device::Cpu)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("absent.th") && e.contains("cannot read"), "{e}");
}

#[test]
fn name_mismatches_list_missing_unexpected_and_misshaped() {
    let dev = Device::Cpu;
    let mut sd = load_state_dict(&akamaster("resnet20.safetensors"), &dev).expect("load");
    sd.remove("layer1.0.conv1.weight");
    let extra = Tensor::zeros(3, DType::F32, &dev).expect("zeros");
    sd.insert("layer9.extra".into(), extra);
    sd.insert(
        "layer1.0.bn1.num_batches_tracked".into(),
        Tensor::new(5i64, &dev).expect("t"),
    );
    let bad = Tensor::zeros((16, 3, 5, 5), DType::F32, &dev).expect("zeros");
    sd.insert("conv1.weight".into(), bad);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&sd, &path).expect("save");
    let e = match load_classifier(
        Arch::CifarResNet { depth: 20 },
        &path,
        Normalize::IMAGENET,
        &dev,
    ) {
        Ok(_) => panic!("mismatched weights must fail"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bad.safetensors"), "{e}");
    assert!(
        e.contains("1 missing: layer1.0.conv1.weight [16, 16, 3, 3]"),
        "{e}"
    );
    assert!(e.contains("1 unexpected: layer9.extra [3]"), "{e}");
    assert!(
        e.contains("conv1.weight expected [16, 3, 3, 3], found [16, 3, 5, 5]"),
        "{e}"
    );
    assert!(!e.contains("num_batches_tracked"), "{e}");

    // A ResNet-56 file is not a ResNet-20.
    let e = match load_classifier(
        Arch::CifarResNet { depth: 20 },
        &akamaster("resnet56.safetensors"),
        Normalize::IMAGENET,
        &dev,
    ) {
        Ok(_) => panic!("resnet56 weights must not load as resnet20"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("unexpected") && e.contains("layer1.3.conv1.weight"),
        "{e}"
    );

    // Linear weights for a ResNet: the class tensor is missing.
    let e = match load_classifier(
        Arch::Linear,
        &akamaster("resnet20.safetensors"),
        Normalize::IDENTITY,
        &dev,
    ) {
        Ok(_) => panic!("resnet weights must not load as linear"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("`weight` is missing"), "{e}");
}

#[test]
fn module_prefix_and_other_dtypes_load_into_a_model() {
    let dev = Device::Cpu;
    let sd = load_state_dict(&akamaster("resnet20.safetensors"), &dev).expect("load");
    let prefixed: HashMap<String, Tensor> = sd
        .iter()
        .map(|(k, t)| (format!("module.{k}"), t.to_dtype(DType::F64).expect("f64")))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("prefixed.safetensors");
    candle_core::safetensors::save(&prefixed, &path).expect("save");
    let back = load_state_dict(&path, &dev).expect("load");
    assert!(back.contains_key("conv1.weight"));
    let model = load_cifar_resnet(20, &path, Normalize::IMAGENET, &dev).expect("model");
    assert_eq!(model.num_classes(), 10);
}

#[test]
fn cohen_style_sequential_prefix_is_removed_only_when_every_name_has_it() {
    // Cohen et al.'s checkpoints: Sequential(NormalizeLayer, DataParallel(net)) names every
    // tensor `1.module.…`.
    let dev = Device::Cpu;
    let sd = load_state_dict(&akamaster("resnet20.safetensors"), &dev).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let save = |name: &str, map: HashMap<String, Tensor>| {
        let path = dir.path().join(name);
        candle_core::safetensors::save(&map, &path).expect("save");
        path
    };
    let cohen = save(
        "cohen.safetensors",
        sd.iter()
            .map(|(k, t)| (format!("1.module.{k}"), t.clone()))
            .collect(),
    );
    let back = load_state_dict(&cohen, &dev).expect("load");
    assert_eq!(back.len(), sd.len());
    assert!(
        back.contains_key("conv1.weight"),
        "{:?}",
        back.keys().take(3).collect::<Vec<_>>()
    );
    let model = load_cifar_resnet(20, &cohen, Normalize::IMAGENET, &dev).expect("model");
    assert_eq!(model.num_classes(), 10);

    // One name without the prefix: nothing is stripped.
    let mut mixed: HashMap<String, Tensor> = sd
        .iter()
        .map(|(k, t)| (format!("1.module.{k}"), t.clone()))
        .collect();
    let (k, t) = sd.iter().next().expect("a tensor");
    mixed.remove(&format!("1.module.{k}"));
    mixed.insert(k.clone(), t.clone());
    let back = load_state_dict(&save("mixed.safetensors", mixed), &dev).expect("load");
    assert!(back.keys().filter(|n| n.starts_with("1.module.")).count() == sd.len() - 1);

    // A numbered prefix without `module.` is the network's own naming: kept.
    let seq = save(
        "seq.safetensors",
        sd.iter()
            .map(|(k, t)| (format!("0.{k}"), t.clone()))
            .collect(),
    );
    let back = load_state_dict(&seq, &dev).expect("load");
    assert!(back.keys().all(|n| n.starts_with("0.")));
}

fn exact100() -> crate::data::ImageSet {
    load_cifar10(&manifest("../shared/data/cifar10-exact100"), Split::Test).expect("exact100")
}

/// caf's logits on the first images and its predictions on all 100 must match PyTorch's.
fn check_against_pytorch(arch: &str, weights: &str, want_correct: usize) {
    let fx = read_json(&fixture(&format!("pytorch_logits_{arch}.json")));
    let dev = Device::Cpu;
    let model = load_classifier(
        arch.parse().expect("arch"),
        &akamaster(weights),
        Normalize::IMAGENET,
        &dev,
    )
    .expect("load");
    assert_eq!(model.num_classes(), 10);
    let data = exact100();
    let idx: Vec<usize> = (0..data.len()).collect();
    let x = data.batch_tensor(&idx, &dev).expect("batch");
    let logits = model.logits(&x).expect("forward");
    assert_eq!(logits.dims(), &[100, 10]);

    let want = fx["logits"].as_array().expect("logits");
    let got = logits
        .narrow(0, 0, want.len())
        .expect("narrow")
        .to_vec2::<f32>()
        .expect("vec");
    let mut worst = 0f64;
    for (i, row) in want.iter().enumerate() {
        for (j, v) in row.as_array().expect("row").iter().enumerate() {
            worst = worst.max((v.as_f64().expect("f64") - got[i][j] as f64).abs());
        }
    }
    eprintln!("{arch}: max |caf - pytorch| logit difference {worst:e}");
    assert!(
        worst < 1e-4,
        "{arch}: max |caf - pytorch| logit difference {worst}"
    );

    let preds: Vec<u32> = logits
        .argmax(D::Minus1)
        .expect("argmax")
        .to_vec1()
        .expect("vec");
    let want_preds: Vec<u32> = fx["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .map(|v| v.as_u64().expect("u64") as u32)
        .collect();
    assert_eq!(preds, want_preds, "{arch}: predictions differ from PyTorch");
    let correct = preds
        .iter()
        .zip(data.labels())
        .filter(|(p, l)| **p == u32::from(**l))
        .count();
    assert_eq!(correct, want_correct, "{arch}");
    assert_eq!(fx["correct"].as_u64(), Some(want_correct as u64));
}

#[test]
fn resnet20_matches_pytorch_and_gets_94_of_100() {
    check_against_pytorch("resnet20", "resnet20-12fca82f.th", 94);
}

#[test]
fn resnet56_matches_pytorch_and_gets_96_of_100() {
    check_against_pytorch("resnet56", "resnet56.safetensors", 96);
}

#[test]
fn features_then_head_equals_logits_and_train_mode_runs() {
    let dev = Device::Cpu;
    let model = load_cifar_resnet(
        20,
        &akamaster("resnet20.safetensors"),
        Normalize::IMAGENET,
        &dev,
    )
    .expect("load");
    let data = exact100();
    let x = data.batch_tensor(&[0, 1, 2, 3], &dev).expect("batch");
    let phi = model.features(&x).expect("features");
    assert_eq!(phi.dims(), &[4, FEATURE_DIM]);
    let a = flat(&model.head(&phi).expect("head"));
    let b = flat(&model.logits(&x).expect("logits"));
    assert_eq!(a, b);
    // An input tracked by autograd takes candle's path, and gradients reach it.
    let xv = candle_core::Var::from_tensor(&x).expect("var");
    let l = model.logits(xv.as_tensor()).expect("tracked logits");
    let d = max_abs_diff(&l, &model.logits(&x).expect("logits"));
    assert!(d < 1e-4, "{d}");
    let grads = l.sum_all().and_then(|s| s.backward()).expect("backward");
    let g = grads.get(xv.as_tensor()).expect("input gradient");
    assert_eq!(g.dims(), x.dims());
    // Train mode uses batch statistics: different logits, same shape.
    let t = model.forward_t(&x, true).expect("train forward");
    assert_eq!(t.dims(), &[4, 10]);
    assert_ne!(flat(&t), b);
}

#[test]
fn builds_from_varmap_with_pytorch_names() {
    let dev = Device::Cpu;
    for depth in [20, 32, 44, 56, 110] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let model = CifarResNet::new(depth, 10, Normalize::IMAGENET, vb).expect("build");
        let names: std::collections::BTreeSet<String> = varmap
            .data()
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect();
        let expected = expected_tensors(Arch::CifarResNet { depth }, 10).expect("names");
        assert_eq!(names.len(), expected.len(), "depth {depth}");
        assert!(expected.iter().all(|(k, _)| names.contains(k)));
        assert!(names.contains("layer3.0.bn2.running_var"));
        // 6n + 2 layers: 1 stem conv + 6n block convs + the linear layer.
        let convs = names
            .iter()
            .filter(|k| k.contains("conv") && k.ends_with("weight"))
            .count();
        assert_eq!(convs + 1, depth, "depth {depth}");
        if depth == 20 {
            let x = Tensor::zeros((2, 3, 32, 32), DType::F32, &dev).expect("zeros");
            assert_eq!(model.logits(&x).expect("forward").dims(), &[2, 10]);
        }
    }
    assert!(CifarResNet::new(
        21,
        10,
        Normalize::IDENTITY,
        VarBuilder::zeros(DType::F32, &dev)
    )
    .is_err());
}

#[test]
fn rejects_bad_inputs() {
    let dev = Device::Cpu;
    let model = CifarResNet::new(
        20,
        10,
        Normalize::IMAGENET,
        VarBuilder::zeros(DType::F32, &dev),
    )
    .expect("build");
    let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &dev).expect("zeros");
    assert!(model.logits(&x).is_err());
    let x = Tensor::zeros((2, 3, 32, 32), DType::F64, &dev).expect("zeros");
    assert!(model.logits(&x).is_err());
}

#[test]
fn linear_classifier_computes_wx_plus_b() {
    let dev = Device::Cpu;
    let classes = 3;
    let w: Vec<f32> = (0..classes * 3072)
        .map(|i| ((i % 97) as f32 - 48.0) / 1000.0)
        .collect();
    let weight = Tensor::from_vec(w.clone(), (classes, 3072), &dev).expect("w");
    let bias = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).expect("b");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("linear.safetensors");
    let sd: HashMap<String, Tensor> =
        [("weight".to_string(), weight), ("bias".to_string(), bias)].into();
    candle_core::safetensors::save(&sd, &path).expect("save");
    let model = load_classifier(Arch::Linear, &path, Normalize::IDENTITY, &dev).expect("load");
    assert_eq!(model.num_classes(), 3);
    let data = exact100();
    let x = data.batch_tensor(&[0, 1], &dev).expect("batch");
    let got = model
        .logits(&x)
        .expect("logits")
        .to_vec2::<f32>()
        .expect("vec");
    for (i, row) in got.iter().enumerate() {
        let px = data.image_f32(i);
        for (c, &g) in row.iter().enumerate() {
            let want: f64 = px
                .iter()
                .zip(&w[c * 3072..(c + 1) * 3072])
                .map(|(&p, &wv)| p as f64 * wv as f64)
                .sum::<f64>()
                + [0.5, -1.0, 2.0][c];
            assert!(
                (g as f64 - want).abs() < 1e-4,
                "image {i} class {c}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn arch_names_round_trip() {
    // Every name a spec or `--arch` accepts, the ViTs and ResNet-50 included.
    for &name in Arch::NAMES {
        let arch: Arch = name.parse().expect("arch");
        assert_eq!(arch.to_string(), name);
    }
    assert!(matches!(
        "resnet18".parse::<Arch>(),
        Err(crate::arch::UnknownArch(_))
    ));
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    flat(a)
        .iter()
        .zip(flat(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fused_cpu_path_matches_candle_ops() {
    let dev = Device::Cpu;
    let model = load_cifar_resnet(
        56,
        &akamaster("resnet56.safetensors"),
        Normalize::IMAGENET,
        &dev,
    )
    .expect("load");
    let x = exact100()
        .batch_tensor(&[0, 1, 2, 3, 4, 5], &dev)
        .expect("batch");
    let fast = model.features(&x).expect("fused");
    let reference = model.features_candle(&x, false).expect("candle");
    let d = max_abs_diff(&fast, &reference);
    assert!(d < 1e-4, "fused vs candle features differ by {d}");

    // Random weights with non-trivial BatchNorm statistics, and sizes that are not 32×32
    // (odd sizes exercise the stride-2 and shortcut edges).
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = CifarResNet::new(20, 7, Normalize::IMAGENET, vb).expect("build");
    for (name, var) in varmap.data().lock().expect("lock").iter() {
        let shape = var.as_tensor().shape().clone();
        let v = if name.ends_with("running_var") || name.ends_with("bn1.weight") {
            Tensor::rand(0.5f32, 1.5, shape, &dev)
        } else {
            Tensor::randn(0f32, 0.2, shape, &dev)
        };
        var.set(&v.expect("rand")).expect("set");
    }
    // VarMap parameters are tracked by autograd, so the model itself must take candle's path.
    assert!(model.tracks_grad());
    let frozen = model.detached().expect("detach");
    assert!(!frozen.tracks_grad());
    // Any grouping of images into GEMMs gives the same features.
    let net = frozen.folded().expect("fold");
    let x = Tensor::rand(0f32, 1.0, (5, 3, 16, 16), &dev).expect("input");
    let input: Vec<f32> = x.flatten_all().and_then(|t| t.to_vec1()).expect("vec");
    let single = net.features_in_groups(&input, 5, (16, 16), 1);
    for group in [2, 3, 8] {
        let grouped = net.features_in_groups(&input, 5, (16, 16), group);
        let d = single
            .iter()
            .zip(&grouped)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = single.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        assert!(
            d / scale < 1e-5,
            "group {group}: features differ by {d} (scale {scale})"
        );
    }
    for (h, w) in [(32, 32), (17, 23), (5, 4)] {
        let x = Tensor::rand(0f32, 1.0, (3, 3, h, w), &dev).expect("input");
        let fast = frozen.logits(&x).expect("fused");
        let reference = model.logits(&x).expect("candle");
        let d = max_abs_diff(&fast, &reference);
        let scale = flat(&reference).iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        assert!(
            d / scale < 1e-5,
            "{h}x{w}: fused vs candle logits differ by {d} (scale {scale})"
        );
    }
}

#[test]
fn bf16_path_runs_the_rounded_network() {
    use super::gemm::{bf16_kernel, cap_kernel, Bf16Kernel};
    let dev = Device::Cpu;
    let model = super::test_resnet20();
    let data = exact100();
    let idx: Vec<usize> = (0..100).collect();
    let x = data.batch_tensor(&idx, &dev).expect("batch");
    let full = model.logits(&x).expect("f32");
    let mut half = model.clone();
    half.set_precision(Precision::Bf16);
    let rounded = half.logits(&x).expect("bf16");
    let d_bf16 = max_abs_diff(&full, &rounded);
    let d = d_bf16;
    let scale = flat(&full).iter().fold(0f32, |m, v| m.max(v.abs()));
    // The arithmetic really changed, but only by bf16's relative precision (2⁻⁸) compounded
    // over 19 convolutions, not by a broken layer.
    assert!(
        d > 0.0,
        "bf16 logits are bitwise the f32 ones: the flag did nothing"
    );
    assert!(d / scale < 0.1, "bf16 logits differ by {d} (scale {scale})");
    let argmax =
        |t: &Tensor| -> Vec<u32> { t.argmax(1).and_then(|a| a.to_vec1()).expect("argmax") };
    let agree = argmax(&full)
        .iter()
        .zip(argmax(&rounded))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(
        agree >= 95,
        "bf16 and f32 agree on only {agree}/100 predictions"
    );
    // The bf16 kernels (AMX, AVX-512 BF16) compute what the emulated path computes: the same
    // rounded operands, f32 sums in another order. A different last bit can round an
    // activation to the neighbouring bf16 value at the next layer, so they differ a little,
    // but far less than either differs from f32 (measured: 0.027 vs 0.23 at a logit scale of
    // 35). Each kernel below the one in use is compared with it.
    let lower = [Bf16Kernel::Emulated, Bf16Kernel::Avx512Bf16];
    for kernel in lower.into_iter().filter(|k| *k < bf16_kernel()) {
        cap_kernel(Some(kernel));
        let other = half.logits(&x);
        cap_kernel(None);
        let d = max_abs_diff(&rounded, &other.expect("capped kernel"));
        assert!(
            d / scale < 2e-3 && d < d_bf16 / 2.0,
            "{} vs {kernel} bf16 logits differ by {d} (bf16 vs f32: {d_bf16})",
            bf16_kernel()
        );
    }
    // The candle path (training, autograd) is untouched by the flag.
    let reference = half.features_candle(&x, false).expect("candle");
    let d = max_abs_diff(&model.features(&x).expect("f32"), &reference);
    assert!(d < 1e-4);
}

#[test]
fn int8_path_runs_the_quantised_network_with_the_same_bits_on_every_kernel() {
    use super::gemm::KernelLevel;
    use super::int8::{best_int8_kernel, cap_kernel, Int8Kernel};
    let dev = Device::Cpu;
    let model = super::test_resnet20();
    let data = exact100();
    let idx: Vec<usize> = (0..100).collect();
    let x = data.batch_tensor(&idx, &dev).expect("batch");
    let full = model.logits(&x).expect("f32");
    let mut int8 = model.clone();
    int8.set_precision(Precision::Int8);
    let quantised = int8.logits(&x).expect("int8");
    let d = max_abs_diff(&full, &quantised);
    let scale = flat(&full).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        d > 0.0,
        "int8 logits are bitwise the f32 ones: the flag did nothing"
    );
    assert!(d / scale < 0.1, "int8 logits differ by {d} (scale {scale})");
    let argmax =
        |t: &Tensor| -> Vec<u32> { t.argmax(1).and_then(|a| a.to_vec1()).expect("argmax") };
    let agree = argmax(&full)
        .iter()
        .zip(argmax(&quantised))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(
        agree >= 95,
        "int8 and f32 agree on only {agree}/100 predictions"
    );
    // The sums are exact integers, so every kernel gives the same logits, bit for bit.
    let best = best_int8_kernel(KernelLevel::Native);
    for kernel in [Int8Kernel::Emulated, Int8Kernel::Avx512Vnni] {
        if kernel >= best {
            continue;
        }
        cap_kernel(Some(kernel));
        let other = int8.logits(&x);
        cap_kernel(None);
        let other = flat(&other.expect("capped kernel"));
        let same = other
            .iter()
            .zip(flat(&quantised))
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{kernel} int8 logits differ from {best}'s");
    }
    // int8 exists on the fused CPU path only: the generic path says so rather than run f32.
    let err = super::path::with_generic_path(|| int8.logits(&x)).expect_err("generic int8");
    assert!(err.to_string().contains("int8"), "{err}");
}
