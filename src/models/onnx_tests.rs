//! ONNX backbones against PyTorch: `tests/fixtures/onnx/` from `bench/make_onnx_fixtures.py`.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};

use super::*;
use crate::data::{load_cifar10, Split};
use crate::models::{load_backbone, load_classifier, Arch, Backbone};

fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn fixture(file: &str) -> PathBuf {
    manifest("tests/fixtures/onnx").join(file)
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("read expected.json");
    serde_json::from_str(&text).expect("parse expected.json")
}

fn exact100(dev: &Device) -> Tensor {
    let data =
        load_cifar10(&manifest("../shared/data/cifar10-exact100"), Split::Test).expect("exact100");
    let idx: Vec<usize> = (0..data.len()).collect();
    data.batch_tensor(&idx, dev).expect("batch")
}

/// Largest |got - want| over the rows of `want` (a JSON list of lists).
fn worst(got: &Tensor, want: &serde_json::Value) -> f64 {
    let want = want.as_array().expect("rows");
    let got = got
        .narrow(0, 0, want.len())
        .expect("narrow")
        .to_vec2::<f32>()
        .expect("vec");
    let mut worst = 0f64;
    for (i, row) in want.iter().enumerate() {
        let row = row.as_array().expect("row");
        assert_eq!(row.len(), got[i].len(), "width");
        for (j, v) in row.iter().enumerate() {
            worst = worst.max((v.as_f64().expect("f64") - f64::from(got[i][j])).abs());
        }
    }
    worst
}

/// Logits and features of `name`.onnx on exact100 match PyTorch's to 1e-4, and the
/// predictions on all 100 images are PyTorch's.
fn check_against_pytorch(name: &str, feature_dim: usize) {
    let fx = &expected()[name];
    let dev = Device::Cpu;
    let net = load_onnx(
        &fixture(&format!("{name}.onnx")),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
    )
    .expect("load");
    assert_eq!((net.num_classes(), net.feature_dim()), (10, feature_dim));
    let x = exact100(&dev);
    let logits = net.logits(&x).expect("logits");
    assert_eq!(logits.dims(), &[100, 10]);
    let (l, f) = (
        worst(&logits, &fx["logits"]),
        worst(&net.features(&x).expect("features"), &fx["features"]),
    );
    eprintln!("{name}: max |caf - pytorch| logits {l:e}, features {f:e}");
    assert!(l < 1e-4 && f < 1e-4, "{name}: logits {l}, features {f}");
    let preds: Vec<u32> = logits
        .argmax(D::Minus1)
        .expect("argmax")
        .to_vec1()
        .expect("v");
    let want: Vec<u32> = fx["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .map(|v| v.as_u64().expect("u64") as u32)
        .collect();
    assert_eq!(preds, want);
}

#[test]
fn resnet20_export_matches_pytorch() {
    check_against_pytorch("resnet20", 64);
    assert_eq!(expected()["resnet20"]["correct"], 94);
}

#[test]
fn timm_vit_export_matches_pytorch() {
    check_against_pytorch("vit_small_cifar", 64);
}

#[test]
fn arch_onnx_loads_as_classifier_and_backbone() {
    let dev = Device::Cpu;
    let path = fixture("resnet20.onnx");
    let x = exact100(&dev).narrow(0, 0, 4).expect("narrow");
    let c = load_classifier(Arch::Onnx, &path, Normalize::IDENTITY, &dev).expect("classifier");
    let b = load_backbone(Arch::Onnx, &path, Normalize::IDENTITY, &dev).expect("backbone");
    assert!(matches!(b, Backbone::Onnx(_)));
    assert_eq!((b.feature_dim(), b.num_classes()), (64, 10));
    let (a, z) = (c.logits(&x).expect("a"), b.logits(&x).expect("b"));
    let diff = (a - z).expect("sub").abs().expect("abs");
    assert_eq!(
        diff.max_all().expect("max").to_scalar::<f32>().expect("s"),
        0.0
    );
    // The features are constants: nothing of the frozen graph is trainable.
    let phi = b.features_t(&x, true).expect("features");
    assert_eq!(phi.dims(), &[4, 64]);
    assert!(!phi.is_variable());
    // Its head is inside the graph, so caf cannot apply it to other features.
    assert!(b.head(&phi).is_err());
}

#[test]
fn outputs_are_chosen_by_name() {
    let path = fixture("resnet20.onnx");
    let only_logits = OnnxOutputs {
        feature: None,
        logits: Some("logits".into()),
    };
    // An explicit `logits:` alone still finds `feature` by its default name.
    let net = load_onnx(&path, &only_logits, Normalize::IDENTITY).expect("load");
    assert_eq!(net.feature_dim(), 64);
    // Named outputs swapped: the widths follow the names.
    let swapped = OnnxOutputs {
        feature: Some("logits".into()),
        logits: Some("feature".into()),
    };
    let net = load_onnx(&path, &swapped, Normalize::IDENTITY).expect("load");
    assert_eq!((net.feature_dim(), net.num_classes()), (10, 64));
    let missing = OnnxOutputs {
        feature: Some("penultimate".into()),
        logits: None,
    };
    let e = load_onnx(&path, &missing, Normalize::IDENTITY).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("no output `penultimate`") && msg.contains("feature, logits"),
        "{msg}"
    );
}

#[test]
fn normalize_is_applied_before_the_graph() {
    let dev = Device::Cpu;
    let path = fixture("resnet20.onnx");
    let x = exact100(&dev).narrow(0, 0, 2).expect("narrow");
    let shift = Normalize {
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    let net = load_onnx(&path, &OnnxOutputs::default(), shift).expect("load");
    let plain = load_onnx(&path, &OnnxOutputs::default(), Normalize::IDENTITY).expect("load");
    let by_hand = ((x.clone() - 0.5).expect("sub") / 0.25).expect("div");
    let a = net.logits(&x).expect("a");
    let b = plain.logits(&by_hand).expect("b");
    let diff = (a - b).expect("sub").abs().expect("abs");
    assert!(diff.max_all().expect("max").to_scalar::<f32>().expect("s") < 1e-5);
}

#[test]
fn unsupported_operator_is_named_with_its_node() {
    let e = load_onnx(
        &fixture("unsupported.onnx"),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
    )
    .unwrap_err();
    assert!(
        matches!(&e, ModelError::UnsupportedOnnxOp { op, node, .. } if op == "Det" && node == "det0"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("`Det`") && msg.contains("`det0`") && msg.contains("unsupported.onnx"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_onnx_is_a_located_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, b"not a protobuf").expect("write");
    let e = load_onnx(&path, &OnnxOutputs::default(), Normalize::IDENTITY).unwrap_err();
    assert!(e.to_string().contains("model.onnx"), "{e}");
}

/// torchvision's ResNet-18 (45 MB, never committed): `bench/make_onnx_fixtures.py --resnet18
/// DIR` writes it, then `CAF_ONNX_RESNET18=DIR cargo test --lib torchvision_resnet18 --
/// --ignored`.
#[test]
#[ignore = "needs CAF_ONNX_RESNET18 (see bench/make_onnx_fixtures.py --resnet18)"]
fn torchvision_resnet18() {
    let dir = PathBuf::from(std::env::var("CAF_ONNX_RESNET18").expect("CAF_ONNX_RESNET18"));
    let text = std::fs::read_to_string(dir.join("resnet18.json")).expect("resnet18.json");
    let fx: serde_json::Value = serde_json::from_str(&text).expect("json");
    let net = load_onnx(
        &dir.join("resnet18.onnx"),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
    )
    .expect("load");
    assert_eq!((net.num_classes(), net.feature_dim()), (1000, 512));
    let flat: Vec<f32> = fx["input"]
        .as_array()
        .expect("input")
        .iter()
        .flat_map(|c| c.as_array().expect("c").iter())
        .flat_map(|r| r.as_array().expect("r").iter())
        .flat_map(|p| p.as_array().expect("p").iter())
        .map(|v| v.as_f64().expect("f") as f32)
        .collect();
    let x = Tensor::from_vec(flat, (2, 3, 224, 224), &Device::Cpu).expect("x");
    let (l, f) = (
        worst(&net.logits(&x).expect("logits"), &fx["logits"]),
        worst(&net.features(&x).expect("features"), &fx["features"]),
    );
    eprintln!("resnet18: max |caf - pytorch| logits {l:e}, features {f:e}");
    assert!(l < 1e-4 && f < 1e-4, "resnet18: logits {l}, features {f}");
}
