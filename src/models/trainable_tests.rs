//! Whole networks to train: a ViT trained from scratch starts from the same weights every run,
//! every parameter learns, the saved VarMap loads as a timm checkpoint, and initial weights are
//! copied in or refused with what differs.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{Optimizer, VarMap, SGD};

use super::*;
use crate::models::{load_backbone, Classifier, VitName};

const VIT: Arch = Arch::Vit(VitName::CifarTiny4);

/// Four fixed images (a multiplicative hash of the element index, in [0, 1)): the same batch
/// every run, so what the test asserts about training on it does not depend on luck.
fn batch(dev: &Device) -> (Tensor, Tensor) {
    let n = 4 * 3 * 32 * 32;
    let v: Vec<f32> = (0..n as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0)
        .collect();
    let x = Tensor::from_vec(v, (4, 3, 32, 32), dev).expect("x");
    let y = Tensor::new(&[0u32, 1, 2, 3], dev).expect("y");
    (x, y)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn a_vit_from_scratch_is_seeded_learns_in_every_parameter_and_saves_as_a_timm_checkpoint() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let (net, vars) =
        build_trainable(VIT, 10, Normalize::HALF, &vm, &dev, None).expect("trainable ViT");
    // The same job starts from the same weights.
    let again = VarMap::new();
    build_trainable(VIT, 10, Normalize::HALF, &again, &dev, None).expect("again");
    let names = |m: &VarMap| {
        let mut v: Vec<String> = m.data().lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(names(&vm), names(&again));
    for name in names(&vm) {
        let a = vm.data().lock().unwrap()[&name].as_tensor().clone();
        let b = again.data().lock().unwrap()[&name].as_tensor().clone();
        assert_eq!(flat(&a), flat(&b), "{name}");
    }
    // timm's initialisation: the position embedding N(0, 0.02²), the class token ~1e-6.
    let pos = flat(vm.data().lock().unwrap()["pos_embed"].as_tensor());
    let std = (pos.iter().map(|v| v * v).sum::<f32>() / pos.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "pos_embed std {std}");
    let cls = flat(vm.data().lock().unwrap()["cls_token"].as_tensor());
    assert!(cls.iter().all(|v| v.abs() < 1e-4), "{cls:?}");

    // Every parameter gets a gradient, and a few steps fit a fixed batch.
    let (x, y) = batch(&dev);
    let loss =
        |n: &Backbone| candle_nn::loss::cross_entropy(&n.forward_t(&x, true).unwrap(), &y).unwrap();
    let l0 = loss(&net).to_scalar::<f32>().unwrap();
    let grads = loss(&net).backward().expect("backward");
    for v in &vars {
        let g = grads.get(v.as_tensor()).expect("every var has a gradient");
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0,
            "a zero gradient for a var of shape {:?}",
            v.shape()
        );
    }
    let mut sgd = SGD::new(vars.clone(), 0.05).expect("sgd");
    for _ in 0..10 {
        sgd.backward_step(&loss(&net)).expect("step");
    }
    let l1 = loss(&net).to_scalar::<f32>().unwrap();
    assert!(l1 < 0.75 * l0, "loss {l0} → {l1}");

    // The trained VarMap saved and loaded as a timm checkpoint computes the same logits.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("vit.safetensors");
    vm.save(&path).expect("save");
    let loaded = load_backbone(VIT, &path, Normalize::HALF, &dev).expect("load");
    let a = flat(&net.logits(&x).unwrap());
    let b = flat(&loaded.logits(&x).unwrap());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-5, "max |Δlogit| {diff}");
}

#[test]
fn initial_weights_are_copied_in_or_refused_with_what_differs() {
    let dev = Device::Cpu;
    let named = expected_tensors(VIT, 10).expect("names");
    let dict = crate::models::formula::tensors(&named, &dev).expect("formula weights");
    let vm = VarMap::new();
    let (net, vars) = build_trainable(VIT, 10, Normalize::HALF, &vm, &dev, Some(&dict))
        .expect("from a state dict");
    assert_eq!(vars.len(), named.len(), "a ViT has no running statistics");
    for (name, _) in &named {
        let var = vm.data().lock().unwrap()[name].as_tensor().clone();
        assert_eq!(flat(&var), flat(&dict[name]), "{name}");
    }
    // Training moves the vars, and the reshaped patch projection with them.
    let (x, y) = batch(&dev);
    let before = flat(&net.logits(&x).unwrap());
    let loss = candle_nn::loss::cross_entropy(&net.forward_t(&x, true).unwrap(), &y).unwrap();
    SGD::new(vars, 0.1).unwrap().backward_step(&loss).unwrap();
    assert_ne!(flat(&net.logits(&x).unwrap()), before);
    assert_eq!(
        dict["pos_embed"].dtype(),
        DType::F32,
        "the state dict is not touched"
    );

    // 100 classes' weights for a 10-class network: the head's shapes are named.
    let err = build_trainable(VIT, 100, Normalize::HALF, &VarMap::new(), &dev, Some(&dict))
        .expect_err("class mismatch")
        .to_string();
    assert!(
        err.contains("initial weights for vit_cifar_tiny_patch4_32 with 100 classes"),
        "{err}"
    );
    assert!(err.contains("head.weight"), "{err}");

    // Networks caf only runs frozen are refused with what to do instead.
    for arch in [Arch::ResNet50, Arch::Onnx, Arch::Linear] {
        let err = build_trainable(arch, 10, Normalize::IMAGENET, &VarMap::new(), &dev, None)
            .expect_err("not trainable")
            .to_string();
        assert!(err.contains("frozen backbone"), "{arch}: {err}");
    }
}
