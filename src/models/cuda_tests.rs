//! The models on a real GPU, in builds with `--features cuda` (scripts/gpu-check.sh runs them):
//! candle's generic ops on CUDA against the fused CPU path. Without a GPU they fail rather than
//! skip, so a passing run always means the GPU computed what the CPU computes.

use candle_core::{DType, Device};

use super::generic_tests::{argmax, compare_steps, exact100, max_abs_diff, train_step_on};
use super::*;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (cuda:0)")
}

fn resnet20_on(dev: &Device) -> CifarResNet {
    let path = shared_data("pretrained/akamaster/resnet20-12fca82f.th");
    load_cifar_resnet(20, &path, Normalize::IMAGENET, dev).expect("ResNet-20")
}

#[test]
fn resnet20_on_cuda_matches_the_fused_cpu_path_on_the_exact_100() {
    let dev = gpu();
    let data = exact100();
    let idx: Vec<usize> = (0..data.len()).collect();
    let x = data.batch_tensor(&idx, &Device::Cpu).expect("batch");
    let cpu = resnet20_on(&Device::Cpu).logits(&x).expect("cpu");
    let on_gpu = resnet20_on(&dev)
        .logits(&x.to_device(&dev).expect("to gpu"))
        .expect("gpu");
    let d = max_abs_diff(&cpu, &on_gpu);
    eprintln!("ResNet-20, exact 100: max |CPU fused - CUDA| logit difference {d:e}");
    assert!(d < 1e-4, "CUDA vs CPU logits differ by {d}");
    assert_eq!(argmax(&cpu), argmax(&on_gpu));
}

#[test]
fn bf16_on_cuda_runs_candles_bf16_tensors_close_to_f32() {
    let dev = gpu();
    let data = exact100();
    let idx: Vec<usize> = (0..data.len()).collect();
    let x = data
        .batch_tensor(&idx, &Device::Cpu)
        .and_then(|t| t.to_device(&dev))
        .expect("batch");
    let full_model = resnet20_on(&dev);
    let mut half = full_model.clone();
    half.set_precision(Precision::Bf16);
    let full = full_model.logits(&x).expect("f32");
    let rounded = half.logits(&x).expect("bf16");
    assert_eq!(rounded.dtype(), DType::F32);
    let d = max_abs_diff(&full, &rounded);
    let scale = full
        .abs()
        .and_then(|a| a.max_all()?.to_scalar::<f32>())
        .expect("scale");
    eprintln!("ResNet-20 on CUDA: bf16 vs f32 logits differ by {d:e} (scale {scale})");
    assert!(
        d > 0.0,
        "bf16 logits are bitwise the f32 ones: nothing ran in bf16"
    );
    assert!(d / scale < 0.1, "bf16 logits differ by {d} (scale {scale})");
    let agree = argmax(&full)
        .iter()
        .zip(argmax(&rounded))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(
        agree >= 95,
        "bf16 and f32 agree on only {agree}/100 predictions"
    );
}

#[test]
fn a_training_step_on_cuda_has_the_cpu_steps_gradients() {
    let dev = gpu();
    compare_steps(
        train_step_on(&Device::Cpu, false),
        train_step_on(&dev, false),
        "CUDA vs CPU fused",
    );
}
