//! The device-generic path (candle's own conv2d, batch norm, relu and matmul: what runs on
//! CUDA) against the fused CPU kernels, both on the CPU: inference, a training step and a short
//! certification. [`with_generic_path`] turns the fused kernels off on the test's thread.

use candle_core::{Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;

use super::path::{fused, with_generic_path};
use super::*;
use crate::certify::noise::{NoiseKey, NoiseStream, Phase};
use crate::certify::{Settings, Smooth};
use crate::data::{load_cifar10, ImageSet, Split};

pub(super) fn exact100() -> ImageSet {
    let dir = shared_data("cifar10-exact100");
    load_cifar10(&dir, Split::Test).expect("exact100")
}

pub(super) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (
        a.to_device(&Device::Cpu).expect("to cpu"),
        b.to_device(&Device::Cpu).expect("to cpu"),
    );
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

pub(super) fn argmax(t: &Tensor) -> Vec<u32> {
    t.argmax(1).and_then(|a| a.to_vec1()).expect("argmax")
}

/// The gap between the two largest logits of each row.
fn top2_gaps(logits: &Tensor) -> Vec<f32> {
    logits
        .to_vec2::<f32>()
        .expect("logits")
        .into_iter()
        .map(|mut row| {
            row.sort_by(|a, b| b.total_cmp(a));
            row[0] - row[1]
        })
        .collect()
}

#[test]
fn generic_resnet20_logits_match_the_fused_path_on_the_exact_100() {
    let model = test_resnet20();
    let data = exact100();
    let idx: Vec<usize> = (0..data.len()).collect();
    let x = data.batch_tensor(&idx, &Device::Cpu).expect("batch");
    let fused_logits = model.logits(&x).expect("fused");
    let generic = with_generic_path(|| {
        assert!(!fused(&Device::Cpu));
        model.logits(&x).expect("generic")
    });
    let d = max_abs_diff(&fused_logits, &generic);
    eprintln!("ResNet-20, exact 100: max |fused - generic| logit difference {d:e}");
    assert!(d < 1e-4, "generic vs fused logits differ by {d}");
    // Not the same code: the fused path sums im2col GEMMs in its own order.
    assert_eq!(argmax(&fused_logits), argmax(&generic));
}

#[test]
fn generic_caf_logits_match_the_fused_path() {
    let backbone = test_resnet20();
    let varmap = VarMap::new();
    let (caf, _) = caf::build_caf_seeded(
        backbone,
        &AdapterArch::CPU_DEFAULT,
        10,
        &varmap,
        &Device::Cpu,
        5,
    )
    .expect("caf");
    let caf = caf.detached().expect("detached");
    let data = exact100();
    let idx: Vec<usize> = (0..16).collect();
    let x = data.batch_tensor(&idx, &Device::Cpu).expect("batch");
    let a = caf.logits(&x).expect("fused");
    let b = with_generic_path(|| caf.logits(&x).expect("generic"));
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "CAF generic vs fused logits differ by {d}");
    assert_eq!(argmax(&a), argmax(&b));
}

/// One training step's loss, gradients and BatchNorm running statistics, on either path, from
/// the pretrained weights. (From random weights a few ReLU inputs lie within rounding of 0 and
/// flip between the paths, each moving its weights' gradients by a whole term: measured 4e-3
/// relative on ResNet-20, the same kind of tie as a certification's.)
pub(super) fn train_step(generic: bool) -> (f32, Vec<Tensor>, Vec<Tensor>) {
    train_step_on(&Device::Cpu, generic)
}

/// [`train_step`] on `dev`.
pub(super) fn train_step_on(dev: &Device, generic: bool) -> (f32, Vec<Tensor>, Vec<Tensor>) {
    let run = || {
        let varmap = VarMap::new();
        let dev = dev.clone();
        let path = shared_data("pretrained/akamaster/resnet20.safetensors");
        let init = load_state_dict(&path, &dev).expect("pretrained");
        let (model, vars) =
            build_trainable_resnet(20, 10, Normalize::IMAGENET, &varmap, &dev, Some(&init))
                .expect("trainable");
        let data = exact100();
        let idx: Vec<usize> = (0..12).collect();
        let x = data.batch_tensor(&idx, &dev).expect("batch");
        let y = Tensor::new(
            idx.iter()
                .map(|&i| u32::from(data.labels()[i]))
                .collect::<Vec<_>>(),
            &dev,
        )
        .expect("labels");
        let logits = model.forward_t(&x, true).expect("train forward");
        let loss = candle_nn::loss::cross_entropy(&logits, &y).expect("loss");
        let grads = loss.backward().expect("backward");
        let g = vars
            .iter()
            .map(|v: &Var| grads.get(v.as_tensor()).expect("gradient").clone())
            .collect();
        // By name: a VarMap is a HashMap, whose order differs between two of them.
        let stats: std::collections::BTreeMap<String, Tensor> = varmap
            .data()
            .lock()
            .expect("varmap")
            .iter()
            .filter(|(k, _)| k.contains("running_"))
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let stats = stats.into_values().collect();
        (loss.to_scalar::<f32>().expect("loss"), g, stats)
    };
    if generic {
        with_generic_path(run)
    } else {
        run()
    }
}

#[test]
fn a_generic_training_step_has_the_fused_steps_gradients() {
    let (loss_f, grads_f, stats_f) = train_step(false);
    let (loss_g, grads_g, stats_g) = train_step(true);
    compare_steps(
        (loss_f, grads_f, stats_f),
        (loss_g, grads_g, stats_g),
        "CPU generic",
    );
}

/// Asserts two training steps agree: loss and running statistics within 1e-4, gradients within
/// 1e-4 of each tensor's largest.
pub(super) fn compare_steps(
    (loss_f, grads_f, stats_f): (f32, Vec<Tensor>, Vec<Tensor>),
    (loss_g, grads_g, stats_g): (f32, Vec<Tensor>, Vec<Tensor>),
    what: &str,
) {
    assert!((loss_f - loss_g).abs() < 1e-4, "loss {loss_f} vs {loss_g}");
    assert_eq!(grads_f.len(), grads_g.len());
    // Relative to each tensor's largest gradient: the two paths sum thousands of f32 products
    // per weight in different orders (BatchNorm's γ gradient sums 12·32·32 of them), so the
    // absolute rounding grows with the gradient's size.
    let (mut worst, mut worst_abs) = (0f32, 0f32);
    for (a, b) in grads_f.iter().zip(&grads_g) {
        let scale = a
            .abs()
            .and_then(|t| t.max_all()?.to_scalar::<f32>())
            .expect("max");
        assert!(scale > 0.0, "a parameter received no gradient");
        let d = max_abs_diff(a, b);
        worst_abs = worst_abs.max(d);
        worst = worst.max(d / scale);
    }
    eprintln!(
        "ResNet-20 training step, {what}: max gradient difference {worst:e} relative, \
         {worst_abs:e} absolute"
    );
    assert!(
        worst < 1e-4,
        "gradients differ by {worst} relative to their tensor's largest"
    );
    for (a, b) in stats_f.iter().zip(&stats_g) {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-4, "running statistics differ by {d}");
    }
}

#[test]
fn a_generic_certification_counts_what_the_fused_one_counts_except_rounding_ties() {
    let model = test_resnet20();
    let data = exact100();
    let settings = Settings {
        n0: 20,
        n: 200,
        alpha: 0.001,
        batch: 110,
    };
    let sigma = 0.25;
    let smooth = Smooth::new(&model, sigma, Device::Cpu);
    let mut ties_total = 0;
    for index in [0usize, 1, 2] {
        let image = data.image_f32(index);
        let key = NoiseKey {
            seed: 7,
            sigma,
            idx: index as u64,
        };
        let a = smooth.certify(&image, key, &settings).expect("fused");
        let b = with_generic_path(|| smooth.certify(&image, key, &settings).expect("generic"));
        // Where the two paths' predictions on a draw differ, the fused logits must have been
        // tied to rounding; every other draw counts alike.
        let mut ties = 0;
        for phase in [Phase::Selection, Phase::Estimation] {
            let n = if phase == Phase::Selection {
                settings.n0
            } else {
                settings.n
            } as usize;
            let mut stream = NoiseStream::new(key, phase);
            let mut buf = Vec::new();
            stream.fill_noisy(&image, n, &mut buf);
            let x = Tensor::from_slice(&buf, (n, 3, 32, 32), &Device::Cpu).expect("noisy");
            let lf = model.logits(&x).expect("fused");
            let lg = with_generic_path(|| model.logits(&x).expect("generic"));
            for ((pf, pg), gap) in argmax(&lf).iter().zip(argmax(&lg)).zip(top2_gaps(&lf)) {
                if *pf != pg {
                    assert!(
                        gap < 1e-4,
                        "image {index}: a prediction differs at gap {gap}"
                    );
                    ties += 1;
                }
            }
        }
        if ties == 0 {
            assert_eq!(a, b, "image {index}");
        } else {
            assert!(
                a.n_a.abs_diff(b.n_a) <= ties,
                "image {index}: {a:?} vs {b:?}"
            );
        }
        ties_total += ties;
        assert!(a.n_a > 0);
    }
    eprintln!("generic vs fused certification: {ties_total} rounding ties in 660 draws");
}
