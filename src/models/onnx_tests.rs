//! ONNX backbones against PyTorch: `tests/fixtures/onnx/` from `bench/make_onnx_fixtures.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
        &Device::Cpu,
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
    let net = load_onnx(&path, &only_logits, Normalize::IDENTITY, &Device::Cpu).expect("load");
    assert_eq!(net.feature_dim(), 64);
    // Named outputs swapped: the widths follow the names.
    let swapped = OnnxOutputs {
        feature: Some("logits".into()),
        logits: Some("feature".into()),
    };
    let net = load_onnx(&path, &swapped, Normalize::IDENTITY, &Device::Cpu).expect("load");
    assert_eq!((net.feature_dim(), net.num_classes()), (10, 64));
    let missing = OnnxOutputs {
        feature: Some("penultimate".into()),
        logits: None,
    };
    let e = load_onnx(&path, &missing, Normalize::IDENTITY, &Device::Cpu).unwrap_err();
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
    let net = load_onnx(&path, &OnnxOutputs::default(), shift, &Device::Cpu).expect("load");
    let plain = load_onnx(
        &path,
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
        &Device::Cpu,
    )
    .expect("load");
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
        &Device::Cpu,
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
    let e = load_onnx(
        &path,
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
        &Device::Cpu,
    )
    .unwrap_err();
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
        &Device::Cpu,
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

/// Row `i` of `a` against row `i` of `b`, over the rows both have: the largest difference.
fn max_diff_rows(a: &Tensor, b: &Tensor) -> f32 {
    let n = a.dim(0).expect("a").min(b.dim(0).expect("b"));
    let (a, b) = (a.narrow(0, 0, n).expect("a"), b.narrow(0, 0, n).expect("b"));
    let d = (a - b).expect("sub").abs().expect("abs");
    d.max_all().expect("max").to_scalar::<f32>().expect("s")
}

#[test]
fn images_run_one_at_a_time_through_one_plan_and_agree_with_a_batch() {
    // The export's batch dimension is symbolic: every batch size runs its images through the
    // one plan for a single image, and an image gets the same logits whatever batch it is in.
    let dev = Device::Cpu;
    let net = load_onnx(
        &fixture("resnet20.onnx"),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
        &dev,
    )
    .expect("load");
    assert_eq!(net.chunk(), 1);
    // Only the batch is symbolic in this export: the image side is the graph's.
    assert_eq!(net.input_size(), Some(32));
    let x = exact100(&dev);
    let all = net.logits(&x).expect("100");
    for b in [1, 4, 7] {
        let got = net.logits(&x.narrow(0, 0, b).expect("b")).expect("b");
        assert_eq!(got.dims(), &[b, 10]);
        assert!(max_diff_rows(&all, &got) < 1e-5, "batch {b}");
    }
    let none = net.logits(&x.narrow(0, 0, 0).expect("0")).expect("empty");
    assert_eq!(none.dims(), &[0, 10]);
    assert_eq!(net.planned_shapes(), vec![vec![1, 3, 32, 32]]);
    // A clone shares the cache (fused certification clones backbones).
    assert_eq!(net.clone().planned_shapes().len(), 1);

    // The image size is fixed by the graph: another is refused, naming the input it takes.
    let small = Tensor::zeros((2, 3, 16, 16), candle_core::DType::F32, &dev).expect("zeros");
    let e = net.logits(&small).unwrap_err().to_string();
    assert!(
        e.contains("3, 32, 32]") && e.contains("[1, 3, 16, 16]") && e.contains("resnet20.onnx"),
        "{e}"
    );
}

#[test]
fn a_graph_exported_with_a_fixed_batch_runs_in_padded_chunks() {
    // What `torch.onnx.export` without dynamic shapes gives: the batch fixed at the example's
    // size (here 3, set on the loaded graph), so 7 images run as 3 + 3 + 1 padded with 2.
    let dev = Device::Cpu;
    let mut net = load_onnx(
        &fixture("resnet20.onnx"),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
        &dev,
    )
    .expect("load");
    let reference = net.clone();
    let Dim::Symbol(batch) = net.input[0].clone() else {
        panic!("the fixture's batch is symbolic: {:?}", net.input)
    };
    let fixed = net
        .model
        .set_symbols(&HashMap::from([(batch, TDim::Val(3))]))
        .expect("fix the batch");
    net.model = Arc::new(fixed);
    net.input[0] = Dim::Fixed(3);
    net.plans = Arc::new(Mutex::new(Cache::new(MAX_PLANS)));
    assert_eq!(net.chunk(), 3);
    let x = exact100(&dev).narrow(0, 0, 7).expect("7");
    let (phi, logits) = net.outputs(&x, true, true).expect("run");
    let (phi, logits) = (phi.expect("phi"), logits.expect("logits"));
    assert_eq!((phi.dims(), logits.dims()), (&[7, 64][..], &[7, 10][..]));
    assert!(max_diff_rows(&logits, &reference.logits(&x).expect("ref")) < 1e-5);
    assert!(max_diff_rows(&phi, &reference.features(&x).expect("ref")) < 1e-5);
    assert_eq!(net.planned_shapes(), vec![vec![3, 3, 32, 32]]);
}

#[test]
fn the_plan_cache_keeps_the_newest_and_makes_each_once() {
    let mut cache: Cache<u32, u32> = Cache::new(2);
    let mut made = 0;
    let mut get = |cache: &mut Cache<u32, u32>, k: u32| {
        cache
            .get_or_try_insert(k, || {
                made += 1;
                Ok::<_, String>(k * 10)
            })
            .expect("made")
    };
    assert_eq!(get(&mut cache, 1), 10);
    assert_eq!(get(&mut cache, 1), 10);
    assert_eq!(get(&mut cache, 2), 20);
    assert_eq!(get(&mut cache, 3), 30);
    assert_eq!(cache.keys().copied().collect::<Vec<_>>(), [2, 3]);
    assert_eq!(made, 3);
    // A failure is returned and nothing is kept.
    let e = cache.get_or_try_insert(4, || Err("no".to_string()));
    assert_eq!(e, Err("no".to_string()));
    assert_eq!(cache.keys().copied().collect::<Vec<_>>(), [2, 3]);
}

#[test]
fn outputs_come_from_one_run_and_only_as_asked() {
    let dev = Device::Cpu;
    let net = load_onnx(
        &fixture("vit_small_cifar.onnx"),
        &OnnxOutputs::default(),
        Normalize::IDENTITY,
        &dev,
    )
    .expect("load");
    let x = exact100(&dev).narrow(0, 0, 3).expect("3");
    let (phi, logits) = net.outputs(&x, true, true).expect("both");
    let (phi, logits) = (phi.expect("phi"), logits.expect("logits"));
    assert_eq!((phi.dims(), logits.dims()), (&[3, 64][..], &[3, 10][..]));
    assert_eq!(max_diff_rows(&phi, &net.features(&x).expect("f")), 0.0);
    assert_eq!(max_diff_rows(&logits, &net.logits(&x).expect("l")), 0.0);
    let (none, some) = net.outputs(&x, false, true).expect("logits only");
    assert!(none.is_none() && some.is_some());
    let (none, none2) = net.outputs(&x, false, false).expect("nothing");
    assert!(none.is_none() && none2.is_none());
}

#[test]
fn unsupported_operators_inside_subgraphs_are_found() {
    use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto};
    let node = |op: &str, name: &str, output: &str| NodeProto {
        op_type: op.into(),
        name: name.into(),
        output: vec![output.into()],
        ..Default::default()
    };
    // A supported `If` whose else branch holds an unnamed `Det`: named by its output.
    let branch = GraphProto {
        node: vec![node("Relu", "r1", "a"), node("Det", "", "det_out")],
        ..Default::default()
    };
    let mut cond = node("If", "cond", "y");
    cond.attribute = vec![AttributeProto {
        name: "else_branch".into(),
        g: Some(branch),
        ..Default::default()
    }];
    let graph = GraphProto {
        node: vec![node("Relu", "r0", "x"), cond],
        ..Default::default()
    };
    let onnx = tract_onnx::onnx();
    assert_eq!(
        unsupported_op(&onnx, &graph),
        Some(("Det".to_string(), "det_out".to_string()))
    );
    let fine = GraphProto {
        node: vec![node("Relu", "r0", "x")],
        ..Default::default()
    };
    assert_eq!(unsupported_op(&onnx, &fine), None);
}
