//! The timm ViTs and torchvision's ResNet-50 against PyTorch: names and shapes of every tensor
//! as timm/torchvision create them, and logits with formula weights (see [`super::formula`]) on
//! formula images, both recorded by `bench/make_backbone_fixtures.py`; and a real timm
//! checkpoint (safetensors and .pth) through the loader.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use super::*;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("backbones.json")).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn logits_of(v: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).expect("logits")
}

fn max_diff(got: &Tensor, want: &[Vec<f32>]) -> f32 {
    let got: Vec<Vec<f32>> = got.to_vec2().expect("logits");
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .flat_map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            g.iter().zip(w).map(|(a, b)| (a - b).abs())
        })
        .fold(0f32, f32::max)
}

/// Every named architecture: caf's tensors are exactly timm's/torchvision's (names and
/// shapes), and with the same formula weights the logits agree to 1e-4.
fn check_arch(name: &str) {
    let fx = fixture();
    let entry = &fx["archs"][name];
    let arch: Arch = name.parse().expect("arch");
    let want = logits_of(&entry["logits"]);
    let classes = want[0].len();
    let listed: BTreeMap<String, Vec<usize>> =
        serde_json::from_value::<Vec<(String, Vec<usize>)>>(entry["tensors"].clone())
            .expect("tensors")
            .into_iter()
            .collect();
    let expected = expected_tensors(arch, classes).expect("expected");
    let ours: BTreeMap<String, Vec<usize>> = expected.iter().cloned().collect();
    assert_eq!(ours.len(), expected.len(), "{name}: duplicate names");
    let actual: HashMap<String, Vec<usize>> = listed.clone().into_iter().collect();
    assert_eq!(compare_names(&expected, &actual), None, "{name}");
    assert_eq!(ours, listed, "{name}");

    let dev = Device::Cpu;
    let vb = formula::var_builder(&expected, &dev).expect("formula weights");
    let norm = arch.default_normalize();
    let model: Box<dyn Classifier> = match arch {
        Arch::Vit(v) => {
            Box::new(VisionTransformer::new(VitConfig::named(v), classes, norm, vb).expect("vit"))
        }
        Arch::ResNet50 => {
            Box::new(TvResNet::new(resnet50::RESNET50_LAYERS, classes, norm, vb).expect("resnet50"))
        }
        other => panic!("no fixture for {other}"),
    };
    let size = entry["input_size"].as_u64().expect("size") as usize;
    assert_eq!(arch.input_size(), Some(size));
    let x = formula::images(size, want.len(), &dev).expect("images");
    let got = model.logits(&x).expect("logits");
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "{name}: max |logit difference| {d}");
}

#[test]
fn vit_cifar_tiny_matches_timm() {
    check_arch("vit_cifar_tiny_patch4_32");
}

#[test]
fn vit_tiny_patch16_224_matches_timm() {
    check_arch("vit_tiny_patch16_224");
}

#[test]
fn vit_small_patch16_224_matches_timm() {
    check_arch("vit_small_patch16_224");
}

#[test]
fn vit_base_patch16_224_matches_timm() {
    check_arch("vit_base_patch16_224");
}

#[test]
fn resnet50_matches_torchvision() {
    check_arch("resnet50");
}

fn micro() -> (VitConfig, Vec<Vec<f32>>) {
    let fx = fixture();
    let c = &fx["micro"]["config"];
    let n = |k: &str| c[k].as_u64().expect(k) as usize;
    let cfg = VitConfig {
        img_size: n("img_size"),
        patch: n("patch"),
        dim: n("dim"),
        depth: n("depth"),
        heads: n("heads"),
        mlp_ratio: 4,
    };
    (cfg, logits_of(&fx["micro"]["logits"]))
}

#[test]
fn a_timm_checkpoint_loads_from_safetensors_and_pth() {
    let (cfg, want) = micro();
    let dev = Device::Cpu;
    let x = formula::images(cfg.img_size, want.len(), &dev).expect("images");
    for file in ["vit_micro.safetensors", "vit_micro.pth"] {
        let m = load_vit(cfg, &fixture_dir().join(file), Normalize::HALF, &dev).expect(file);
        assert_eq!(m.num_classes(), 10);
        let d = max_diff(&m.logits(&x).expect("logits"), &want);
        assert!(d < 1e-4, "{file}: {d}");
    }
    // The wrong size is refused with the size it needs, not a shape error deep inside.
    let m = load_vit(
        cfg,
        &fixture_dir().join("vit_micro.pth"),
        Normalize::HALF,
        &dev,
    )
    .expect("load");
    let err = m
        .logits(&Tensor::zeros((1, 3, 64, 64), DType::F32, &dev).expect("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("32×32"), "{err}");
}

#[test]
fn a_checkpoint_that_does_not_fit_names_what_differs() {
    let (cfg, _) = micro();
    let dev = Device::Cpu;
    let mut t = load_state_dict(&fixture_dir().join("vit_micro.safetensors"), &dev).expect("read");
    let qkv = t.remove("blocks.0.attn.qkv.weight").expect("qkv");
    t.insert("blocks.0.attn.qkv_renamed.weight".into(), qkv);
    t.insert(
        "pos_embed".into(),
        Tensor::zeros((1, 5, cfg.dim), DType::F32, &dev).expect("pos"),
    );
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&t, &path).expect("save");
    let err = load_vit(cfg, &path, Normalize::HALF, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 missing: blocks.0.attn.qkv.weight [96, 32]"),
        "{err}"
    );
    assert!(
        err.contains("1 unexpected: blocks.0.attn.qkv_renamed.weight"),
        "{err}"
    );
    assert!(
        err.contains("pos_embed expected [1, 17, 32], found [1, 5, 32]"),
        "{err}"
    );

    // A ViT file given as ResNet-50: the class tensor is named.
    let err = load_backbone(
        Arch::ResNet50,
        &fixture_dir().join("vit_micro.safetensors"),
        Normalize::IMAGENET,
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`fc.weight` is missing"), "{err}");
}

#[test]
fn vit_cost_counts_every_parameter() {
    for name in VitName::ALL {
        let cfg = VitConfig::named(name);
        let expected = expected_tensors(Arch::Vit(name), 1000).expect("names");
        let n: usize = expected
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(cfg.cost(1000).0, n as u64, "{name:?}");
    }
    // vit_base_patch16_224: timm's model card says 86.6 M parameters and 17.6 GMACs.
    let (p, f) = VitConfig::named(VitName::Base16).cost(1000);
    assert_eq!(p, 86_567_656);
    assert!((17.5e9..17.7e9).contains(&(f as f64 / 2.0)), "{f}");
}

/// The micro ViT of the fixture with formula weights, as a detached backbone.
fn micro_backbone() -> VisionTransformer {
    let (cfg, _) = micro();
    let named =
        record_tensors(|vb| VisionTransformer::new(cfg, 10, Normalize::HALF, vb).map(|_| ()))
            .expect("names");
    let vb = formula::var_builder(&named, &Device::Cpu).expect("weights");
    VisionTransformer::new(cfg, 10, Normalize::HALF, vb).expect("vit")
}

#[test]
fn caf_on_a_vit_trains_adapter_and_head_only_for_both_adapter_types() {
    use candle_core::{Module, ModuleT};
    use candle_nn::VarMap;

    let backbone = micro_backbone();
    let dev = Device::Cpu;
    let x = formula::images(32, 3, &dev).expect("x");
    let phi = backbone.features(&x).expect("phi");
    assert_eq!(phi.dims(), [3, 32]);
    for spec in ["cnn:8:2", "vit:16:1:8", "vit:16:2:4:2"] {
        let arch: adapter::AdapterArch = spec.parse().expect(spec);
        assert_eq!(arch.to_string(), spec);
        let vm = VarMap::new();
        let (model, vars) =
            caf::build_caf_seeded(backbone.clone(), &arch, 10, &vm, &dev, 3).expect(spec);
        // Every trained parameter is counted by `cost` (plus the head), and only those.
        let c = adapter::cost(&arch, 32).expect("cost");
        let n: usize = vars.iter().map(|v| v.elem_count()).sum();
        assert_eq!(c.params + 32 * 10 + 10, n as u64, "{spec}");
        let expected = caf::caf_expected_tensors_for(&arch, 32, 10).expect("names");
        assert!(expected
            .iter()
            .all(|(k, _)| k.starts_with("adapter.") || k.starts_with("head.")));

        // Step 0: the adapter's last layer is zero, so logits are the new head on φ alone.
        let logits = model.logits(&x).expect("logits");
        let head_only = model.head().forward(&phi).expect("head");
        let d = (logits - head_only)
            .expect("diff")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar");
        assert!(d < 1e-5, "{spec}: {d}");

        // Gradients reach adapter and head, never the backbone (it has no vars at all).
        let y = model.forward_t(&x, true).expect("train forward");
        let loss = y.sqr().expect("sq").sum_all().expect("sum");
        let grads = loss.backward().expect("backward");
        let head_w = vars.last().expect("head bias");
        assert!(grads.get(head_w.as_tensor()).is_some(), "{spec}");
        let with_grad = vars
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        // All of the head's and the adapter's last layer's; the deeper adapter layers get
        // gradients once the zero-initialised last layer has moved (second step).
        assert!(with_grad >= 4, "{spec}: {with_grad}");
        assert!(!model.backbone().features(&x).expect("phi").track_op());
    }
}

#[test]
fn a_vit_adapter_learns_through_every_layer_after_one_step() {
    use candle_core::ModuleT;
    use candle_nn::{Optimizer, VarMap};

    let backbone = micro_backbone();
    let dev = Device::Cpu;
    let x = formula::images(32, 4, &dev).expect("x");
    let arch: adapter::AdapterArch = "vit:16:1:8".parse().expect("arch");
    let vm = VarMap::new();
    let (model, vars) = caf::build_caf_seeded(backbone, &arch, 10, &vm, &dev, 1).expect("build");
    let mut opt = candle_nn::AdamW::new_lr(vars.clone(), 1e-2).expect("adam");
    for _ in 0..2 {
        let loss = model
            .forward_t(&x, true)
            .expect("fwd")
            .sqr()
            .expect("sq")
            .mean_all()
            .expect("mean");
        opt.backward_step(&loss).expect("step");
    }
    let loss = model
        .forward_t(&x, true)
        .expect("fwd")
        .sqr()
        .expect("sq")
        .mean_all()
        .expect("m");
    let grads = loss.backward().expect("backward");
    for v in &vars {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "no gradient for {:?}",
            v.dims()
        );
    }
    // Eval through candle's fused kernels equals the differentiable composition.
    let fused = model.logits(&x).expect("eval");
    let composed = model.forward_t(&x, false).expect("composed");
    let d = (fused - composed)
        .expect("d")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("s");
    assert!(d < 1e-4, "{d}");
}
