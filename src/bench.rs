//! Throughput of the certification inner loop: Gaussian noise on copies of one image, forward,
//! argmax. `bench/pytorch_forward.py` does the same in PyTorch for comparison.

pub mod queue;

use std::time::Instant;

use candle_core::{Device, Tensor, D};
use rand::{RngExt, SeedableRng};

use crate::data::Chw;
use crate::models::gemm::{Bf16Kernel, KernelLevel};
use crate::models::int8::Int8Kernel;
use crate::models::Classifier;

/// Number of timed windows; the report's figure is their median.
pub const WINDOWS: usize = 5;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchReport {
    /// Median over the timed windows of images (noisy copies) classified per second.
    pub images_per_sec_median: f64,
    /// Images per second in each timed window, in order.
    pub windows: Vec<f64>,
    pub batch: usize,
    /// Threads in rayon's global pool, which candle and the fused ResNet path run on
    /// (`RAYON_NUM_THREADS` sets it).
    pub threads: usize,
}

/// Runs noise + forward + argmax on batches of `batch` noisy copies of one fixed image for about
/// `seconds`: a warm-up of `seconds / 10`, then [`WINDOWS`] windows of `seconds / 5` each, every
/// window at least one batch. Each window's rate counts only whole batches it ran.
pub fn bench_forward(
    model: &dyn Classifier,
    batch: usize,
    seconds: f64,
    sigma: f32,
    device: &Device,
) -> candle_core::Result<BenchReport> {
    bench_forward_shaped(model, Chw::CIFAR, batch, seconds, sigma, device)
}

/// [`bench_forward`] on images of shape `input` (a model for larger images than CIFAR's).
pub fn bench_forward_shaped(
    model: &dyn Classifier,
    input: Chw,
    batch: usize,
    seconds: f64,
    sigma: f32,
    device: &Device,
) -> candle_core::Result<BenchReport> {
    if batch == 0 {
        candle_core::bail!("bench batch must be at least 1");
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        candle_core::bail!("bench seconds must be positive, got {seconds}");
    }
    if !(sigma.is_finite() && sigma >= 0.0) {
        candle_core::bail!("bench sigma must be finite and non-negative, got {sigma}");
    }
    // The image's content does not change the work; a fixed pseudo-random one keeps runs alike.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let pixels: Vec<f32> = (0..input.len()).map(|_| rng.random::<f32>()).collect();
    let image = Tensor::from_vec(pixels, input.batch_dims(1), device)?;

    let step = || -> candle_core::Result<()> {
        let noise = Tensor::randn(0f32, sigma, input.batch_dims(batch), device)?;
        let x = noise.broadcast_add(&image)?;
        let preds = model.logits(&x)?.argmax(D::Minus1)?;
        // Reading the predictions back is part of the loop (counts are kept on the host), and
        // on an asynchronous device it makes the timing wait for the work.
        let preds: Vec<u32> = preds.to_vec1()?;
        if preds.len() != batch {
            candle_core::bail!(
                "model returned {} predictions for {batch} inputs",
                preds.len()
            );
        }
        Ok(())
    };

    measure(step, batch, seconds)
}

/// Drawing the certification noise on the host, as [`crate::certify::Smooth`] does before every
/// forward pass: `batch` noisy copies of one `input`-sized image per call, from the seeded ChaCha
/// stream, which is drawn on the calling thread.
pub fn bench_noise(input: Chw, batch: usize, seconds: f64) -> candle_core::Result<BenchReport> {
    if batch == 0 || !(seconds.is_finite() && seconds > 0.0) {
        candle_core::bail!("bench batch and seconds must be positive");
    }
    let image = vec![0.5f32; input.len()];
    let key = crate::certify::NoiseKey {
        seed: 0,
        sigma: 0.25,
        idx: 0,
    };
    let mut stream = crate::certify::NoiseStream::new(key, crate::certify::Phase::Estimation);
    let mut buf = Vec::new();
    measure(
        || {
            stream.fill_noisy(&image, batch, &mut buf);
            Ok(())
        },
        batch,
        seconds,
    )
}

/// Warm-up of `seconds / 10`, then [`WINDOWS`] windows of `seconds / WINDOWS`, each at least one
/// call of `step` (which processes `batch` images); the median window is the figure.
fn measure(
    mut step: impl FnMut() -> candle_core::Result<()>,
    batch: usize,
    seconds: f64,
) -> candle_core::Result<BenchReport> {
    let mut run_for = |budget: f64| -> candle_core::Result<f64> {
        let start = Instant::now();
        let mut batches = 0usize;
        loop {
            step()?;
            batches += 1;
            let elapsed = start.elapsed().as_secs_f64();
            if elapsed >= budget {
                return Ok((batches * batch) as f64 / elapsed);
            }
        }
    };

    run_for(seconds / 10.0)?;
    let windows = (0..WINDOWS)
        .map(|_| run_for(seconds / WINDOWS as f64))
        .collect::<candle_core::Result<Vec<f64>>>()?;
    Ok(BenchReport {
        images_per_sec_median: median(&windows),
        windows,
        batch,
        threads: rayon::current_num_threads(),
    })
}

/// Size of the square SGEMM that measures the machine's practical f32 peak.
const PEAK_GEMM: usize = 1024;

/// The machine's practical f32 matrix-multiply peak in GFLOP/s: median over [`WINDOWS`]
/// windows of `C = A·B` with 1024×1024 operands through the `gemm` crate (the kernel caf's fast
/// paths use) on all of rayon's threads. The yardstick: a network is compared with the
/// best dense f32 arithmetic this CPU sustains, not with a datasheet figure.
pub fn sgemm_peak_gflops(seconds: f64) -> f64 {
    let n = PEAK_GEMM;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.5).collect();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut one = || {
        // SAFETY: a, b and c are dense n×n row-major buffers of exactly n² elements; c is a
        // distinct mutable borrow.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        }
    };
    one();
    let flops = 2.0 * (n as f64).powi(3);
    let mut windows: Vec<f64> = (0..WINDOWS)
        .map(|_| {
            let start = Instant::now();
            let mut runs = 0u32;
            while runs == 0 || start.elapsed().as_secs_f64() < seconds / WINDOWS as f64 {
                one();
                runs += 1;
            }
            f64::from(runs) * flops / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    windows.sort_by(f64::total_cmp);
    windows[WINDOWS / 2]
}

/// Achieved GFLOP/s of a workload and its share of [`sgemm_peak_gflops`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PeakShare {
    /// FLOPs counted per image (2 × multiply-adds; see the caller for what is counted).
    pub flops_per_image: f64,
    pub gflops: f64,
    pub sgemm_peak_gflops: f64,
    pub percent_of_peak: f64,
}

impl PeakShare {
    pub fn new(images_per_sec: f64, flops_per_image: f64, peak: f64) -> Self {
        let gflops = images_per_sec * flops_per_image / 1e9;
        PeakShare {
            flops_per_image,
            gflops,
            sgemm_peak_gflops: peak,
            percent_of_peak: 100.0 * gflops / peak,
        }
    }
}

/// Throughput of one training step as the training loop runs it: a batch of noisy images
/// (σ), forward in train mode, cross-entropy on logits, backward, optimizer update of
/// `trainable` only, on batches of `batch` images of `shape`. Images and labels are fixed
/// pseudo-random data: their content does not change the work.
pub fn bench_train_step(
    objective: &dyn crate::methods::train::Objective,
    trainable: Vec<candle_core::Var>,
    optimizer: crate::methods::train::OptimizerConfig,
    (shape, batch): (Chw, usize),
    seconds: f64,
    sigma: f32,
    device: &Device,
) -> candle_core::Result<BenchReport> {
    if batch < 2 {
        candle_core::bail!("train-step batch must be at least 2 (BatchNorm)");
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        candle_core::bail!("bench seconds must be positive, got {seconds}");
    }
    let lr = optimizer.lr();
    let mut opt = crate::methods::train::Optimizer::new(optimizer, trainable)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = batch * shape.len();
    let pixels: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
    let images = Tensor::from_vec(pixels, shape.batch_dims(batch), device)?;
    let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10u32)).collect();
    let label_vec = labels.clone();
    let labels = Tensor::from_vec(labels, batch, device)?;
    let step = || -> candle_core::Result<()> {
        let noise = Tensor::randn(
            0f32,
            sigma.max(f32::MIN_POSITIVE),
            shape.batch_dims(batch),
            device,
        )?;
        let batch = crate::methods::train::batches::Batch {
            x: (&images + noise)?,
            y: labels.clone(),
            labels: label_vec.clone(),
            clean: images.clone(),
        };
        let at = crate::methods::train::StepKey {
            seed: 0,
            epoch: 0,
            step: 0,
        };
        let (loss, _) = objective.loss(&batch, true, at)?;
        let grads = loss.backward()?;
        opt.step(&grads, lr)
    };
    measure(step, batch, seconds)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{load_classifier, LinearClassifier, Normalize};
    use candle_core::DType;
    use candle_nn::VarBuilder;

    #[test]
    fn reports_windows_and_median() {
        let dev = Device::Cpu;
        let model =
            LinearClassifier::new(10, Normalize::IDENTITY, VarBuilder::zeros(DType::F32, &dev))
                .expect("model");
        let r = bench_forward(&model, 8, 0.05, 0.25, &dev).expect("bench");
        assert_eq!(r.windows.len(), WINDOWS);
        assert_eq!(r.batch, 8);
        assert!(r.threads >= 1);
        assert!(r.windows.iter().all(|w| w.is_finite() && *w > 0.0));
        assert_eq!(r.images_per_sec_median, median(&r.windows));
        assert!(bench_forward(&model, 0, 1.0, 0.25, &dev).is_err());
        assert!(bench_forward(&model, 8, 0.0, 0.25, &dev).is_err());
        assert!(bench_forward(&model, 8, 1.0, -1.0, &dev).is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// The throughput figure for reports (compare `bench/pytorch_forward.py`); run with
    /// `CAF_BENCH_ARCH=resnet20 CAF_BENCH_BATCH=400 CAF_BENCH_SECONDS=20 \
    ///  cargo test --lib bench::tests::forward_throughput -- --ignored --nocapture`.
    /// The test profile already compiles candle, gemm and rayon with opt-level 3.
    #[test]
    #[ignore = "benchmark: takes tens of seconds"]
    fn forward_throughput() {
        let arch = std::env::var("CAF_BENCH_ARCH").unwrap_or_else(|_| "resnet20".into());
        let batch: usize = std::env::var("CAF_BENCH_BATCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(400);
        let seconds: f64 = std::env::var("CAF_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20.0);
        let weights = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/pretrained/akamaster")
            .join(format!("{arch}.safetensors"));
        let dev = Device::Cpu;
        let model = load_classifier(
            arch.parse().expect("arch"),
            &weights,
            Normalize::IMAGENET,
            &dev,
        )
        .expect("load");
        let report = bench_forward(model.as_ref(), batch, seconds, 0.25, &dev).expect("bench");
        println!("{arch} images/s: {:.1}", report.images_per_sec_median);
        println!("{}", serde_json::to_string(&report).expect("json"));
    }
}

/// What a bench ran on, for its output and README rows: figures are only comparable on the
/// same CPU, and the kernels caf dispatches to at run time differ between CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MachineInfo {
    /// The CPU model (`/proc/cpuinfo`'s model name) or the GPU device.
    pub device: String,
    /// The instruction sets caf's kernels use on this CPU, as they are chosen at run time.
    pub kernels: String,
}

impl MachineInfo {
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cpu => Self {
                device: crate::sched::cpu_model(),
                kernels: cpu_kernels(
                    &cpu_flags(),
                    (
                        crate::models::gemm::bf16_kernel(),
                        crate::models::int8::int8_kernel(),
                    ),
                    crate::models::gemm::kernel_level(),
                ),
            },
            // A figure names the GPU model as a CPU one names the CPU's.
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let stream = d.cuda_stream();
                let ctx = stream.context();
                let name = ctx
                    .name()
                    .unwrap_or_else(|e| format!("(name unknown: {e})"));
                Self {
                    device: format!("cuda:{} {name}", ctx.ordinal()),
                    kernels: "candle's CUDA kernels and cuBLAS".into(),
                }
            }
            other => Self {
                device: format!("{other:?}"),
                kernels: "candle's CUDA kernels and cuBLAS".into(),
            },
        }
    }
}

impl std::fmt::Display for MachineInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; kernels: {}", self.device, self.kernels)
    }
}

/// The CPU's feature flags as Linux lists them (empty elsewhere).
fn cpu_flags() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("flags"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// The kernels' instruction sets: the f32 GEMM's from the CPU's `flags` (the `gemm` crate picks
/// AVX-512 or AVX2+FMA at run time), caf's direct 3×3 convolutions' (the same choice, capped by
/// `CAF_KERNELS`), caf's bf16 GEMM `bf16` (AMX, AVX-512 BF16 or emulated through the f32
/// one) and its int8 GEMM `int8` (AMX, AVX-512 VNNI or emulated), naming `level` when
/// `CAF_KERNELS` caps it.
fn cpu_kernels(
    flags: &[String],
    (bf16, int8): (Bf16Kernel, Int8Kernel),
    level: KernelLevel,
) -> String {
    let has = |f: &str| flags.iter().any(|x| x == f);
    let isa = if has("avx512f") && has("fma") {
        "AVX-512"
    } else if has("avx2") && has("fma") {
        "AVX2+FMA"
    } else {
        "scalar/SSE"
    };
    let direct = match level {
        KernelLevel::Portable => "scalar/SSE",
        KernelLevel::Avx2 if isa == "AVX-512" => "AVX2+FMA",
        _ => isa,
    };
    let mut s =
        format!("f32 GEMM {isa}, direct 3×3 conv {direct}, bf16 GEMM {bf16}, int8 GEMM {int8}");
    match level {
        KernelLevel::Native => {}
        KernelLevel::Avx512 => s.push_str(" (CAF_KERNELS=avx512)"),
        KernelLevel::Avx2 => s.push_str(" (CAF_KERNELS=avx2)"),
        KernelLevel::Portable => s.push_str(" (CAF_KERNELS=portable)"),
    }
    if has("amx_bf16") && has("amx_tile") && bf16 != Bf16Kernel::Amx && level == KernelLevel::Native
    {
        s.push_str("; AMX-BF16 present, but the OS refused the tile state");
    }
    s
}

#[cfg(test)]
mod machine_tests {
    use super::*;
    use crate::models::gemm::Bf16Kernel::{Amx, Avx512Bf16, Emulated};
    use crate::models::gemm::KernelLevel::{Avx2, Avx512, Native, Portable};
    use crate::models::int8::Int8Kernel;

    fn flags(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn kernels_follow_the_cpus_flags() {
        let avx512 = flags("sse2 avx2 fma avx512f avx512_bf16");
        assert_eq!(
            cpu_kernels(&avx512, (Avx512Bf16, Int8Kernel::Avx512Vnni), Native),
            "f32 GEMM AVX-512, direct 3×3 conv AVX-512, bf16 GEMM AVX-512 BF16, int8 GEMM \
             AVX-512 VNNI"
        );
        assert_eq!(
            cpu_kernels(&avx512, (Emulated, Int8Kernel::Emulated), Portable),
            "f32 GEMM AVX-512, direct 3×3 conv scalar/SSE, bf16 GEMM emulated in f32, int8 GEMM \
             emulated in f32 (CAF_KERNELS=portable)"
        );
        // The f32 GEMM is the `gemm` crate's, which no level caps.
        assert_eq!(
            cpu_kernels(&avx512, (Emulated, Int8Kernel::Emulated), Avx2),
            "f32 GEMM AVX-512, direct 3×3 conv AVX2+FMA, bf16 GEMM emulated in f32, int8 GEMM \
             emulated in f32 (CAF_KERNELS=avx2)"
        );
        assert_eq!(
            cpu_kernels(
                &flags("sse2 avx2 fma"),
                (Emulated, Int8Kernel::Emulated),
                Native
            ),
            "f32 GEMM AVX2+FMA, direct 3×3 conv AVX2+FMA, bf16 GEMM emulated in f32, int8 GEMM \
             emulated in f32"
        );
        let amx = flags("avx2 fma avx512f avx512_bf16 amx_tile amx_bf16");
        assert_eq!(
            cpu_kernels(&amx, (Amx, Int8Kernel::Amx), Native),
            "f32 GEMM AVX-512, direct 3×3 conv AVX-512, bf16 GEMM AMX-BF16, int8 GEMM AMX-INT8"
        );
        assert_eq!(
            cpu_kernels(&amx, (Avx512Bf16, Int8Kernel::Avx512Vnni), Avx512),
            "f32 GEMM AVX-512, direct 3×3 conv AVX-512, bf16 GEMM AVX-512 BF16, int8 GEMM \
             AVX-512 VNNI (CAF_KERNELS=avx512)"
        );
        assert_eq!(
            cpu_kernels(&amx, (Avx512Bf16, Int8Kernel::Avx512Vnni), Native),
            "f32 GEMM AVX-512, direct 3×3 conv AVX-512, bf16 GEMM AVX-512 BF16, int8 GEMM \
             AVX-512 VNNI; AMX-BF16 present, but the OS refused the tile state"
        );
        assert_eq!(
            cpu_kernels(&[], (Emulated, Int8Kernel::Emulated), Native),
            "f32 GEMM scalar/SSE, direct 3×3 conv scalar/SSE, bf16 GEMM emulated in f32, int8 GEMM \
             emulated in f32"
        );
        // This machine's line names its CPU and some GEMM.
        let here = MachineInfo::of(&Device::Cpu).to_string();
        assert!(here.contains("f32 GEMM"), "{here}");
    }
}
