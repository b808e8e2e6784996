//! `caf bench`: throughput of caf's numerical core, and its share of the machine's SGEMM peak.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use caf::methods::source::NUM_CLASSES;
use caf::models::{self, Arch};

use caf::store::DbLocation;

use super::args::{
    BenchArgs, BenchCertifyArgs, BenchForwardArgs, BenchLoadArgs, BenchMethod, BenchNoiseArgs,
    BenchQueueArgs, BenchTrainArgs, BenchWhat, CertifyModeArg, DatasetArg, ModelArgs, SplitArg,
};
use super::db::{open_store_with, shown};
use super::exit::usage;
use super::model::{load_classifier, load_data, parse_arch};

pub fn bench(a: BenchArgs) -> Result<i32> {
    match a.what {
        BenchWhat::Forward(f) => bench_forward(f),
        BenchWhat::TrainStep(t) => bench_train_step(t),
        BenchWhat::Certify(c) => bench_certify(c),
        BenchWhat::Load(l) => bench_load(l),
        BenchWhat::Noise(n) => bench_noise(n),
        // Async: `main` runs it on the runtime (`bench_queue`).
        BenchWhat::Queue(q) => bail!(usage(format!(
            "bench queue --db {} must run on the async runtime",
            shown(&q.db)
        ))),
    }
}

/// `caf bench queue`: see [`caf::bench::queue`].
pub async fn bench_queue(q: BenchQueueArgs) -> Result<i32> {
    if q.workers == 0 || q.jobs == 0 {
        bail!(usage("--workers and --jobs must be at least 1"));
    }
    DbLocation::parse(&q.db.to_string_lossy()).map_err(|e| usage(e.to_string()))?;
    // One connection per claim loop, and one for the scheduler's heartbeats.
    let store = open_store_with(&q.db, u32::try_from(q.workers + 1).unwrap_or(u32::MAX)).await?;
    let r = caf::bench::queue::bench_queue(store.clone(), q.workers, q.jobs, !q.queue_only)
        .await
        .map_err(|e| match e {
            caf::bench::queue::QueueBenchError::Invalid(m) => usage(m),
            other => other.into(),
        })?;
    outln!(
        "{} ({}), {} workers, {} jobs per phase; recording a phase's study took {:.2} s",
        shown(&q.db),
        store.backend(),
        r.workers,
        r.queue.jobs,
        r.register_seconds
    );
    let line = |name: &str, p: &caf::bench::queue::Phase| {
        format!(
            "{name:<6} {:>9.0} jobs/s  {:>7.3} ms wall/job{}",
            p.jobs_per_sec,
            p.wall_ms_per_job,
            p.latency_ms_per_job
                .map(|l| format!("  {l:.3} ms claim+complete/job per worker"))
                .unwrap_or_default()
        )
    };
    outln!("{}", line("queue", &r.queue));
    if let Some(s) = &r.sched {
        outln!("{}", line("sched", s));
    }
    if q.json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(0)
}

/// Certifies `--images` test images as a study job would (same slice runner, same noise) and
/// reports forward passes (n0 + estimation draws) per image and certified images per second.
fn bench_certify(c: BenchCertifyArgs) -> Result<i32> {
    let arch = parse_arch(&c.arch)?;
    let Some(weights) = c.weights.clone().or_else(|| default_weights(arch)) else {
        bail!(usage(format!(
            "no default weights for {arch}: pass --weights"
        )));
    };
    if c.images == 0 || c.skip == 0 {
        bail!(usage("--images and --skip must be at least 1"));
    }
    if !(c.sigma.is_finite() && c.sigma > 0.0) {
        bail!(usage(format!("--sigma must be > 0, got {}", c.sigma)));
    }
    let settings = caf::certify::Settings {
        n0: c.n0,
        n: c.n,
        alpha: c.alpha,
        batch: c.batch,
    };
    let staged = match c.mode.mode {
        CertifyModeArg::Staged => Some(staged_settings(&c)?),
        _ => None,
    };
    let procedure = match &staged {
        Some(_) => None,
        None => Some(super::certify::procedure(settings, &c.mode)?),
    };
    let m = ModelArgs {
        arch: c.arch.clone(),
        weights,
        onnx_logits: None,
        mean: None,
        std: None,
        data: DatasetArg::Cifar10,
        data_root: c.data_root.clone(),
        image_size: None,
        resize: None,
        device: caf::sched::DeviceSpec::Cpu,
    };
    let (mut model, device) = load_classifier(&m)?;
    model
        .set_precision(c.precision)
        .map_err(|e| usage(e.to_string()))?;
    let set = load_data(&m, caf::data::Split::Test, model.as_ref())?;
    let indices: Vec<usize> = caf::methods::common::Slice {
        skip: c.skip,
        max: None,
    }
    .indices(set.len())
    .into_iter()
    .take(c.images)
    .collect();
    let smooth = caf::certify::Smooth::new(model.as_ref(), c.sigma, device.clone())
        .with_input(set.shape().tuple());
    let mut rows = Vec::new();
    let start = std::time::Instant::now();
    match (procedure, &staged) {
        (Some(procedure), _) => {
            let done = [Default::default()];
            let run = caf::methods::slice::SliceRun {
                data: set.as_ref(),
                indices: &indices,
                done: &done,
                seed: c.seed,
                sigma: c.sigma,
                procedure,
            };
            caf::methods::slice::certify_slice(&smooth, &run, &|| false, &mut |r| {
                rows.extend(r.into_iter().map(|(_, row)| row));
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!(e.message))?;
        }
        (None, Some(s)) => {
            for &idx in &indices {
                let key = caf::certify::NoiseKey {
                    seed: c.seed,
                    sigma: c.sigma,
                    idx: idx as u64,
                };
                let t = std::time::Instant::now();
                let cert = smooth.certify_staged(&set.floats(&[idx])?, key, s)?;
                rows.push(staged_row(idx, set.label(idx) as u32, &cert, s, c.sigma, t));
            }
        }
        (None, None) => bail!("no procedure"),
    }
    let seconds = start.elapsed().as_secs_f64();
    let images = rows.len().max(1) as f64;
    let passes: u64 = rows.iter().map(|r| r.n0 + r.n).sum();
    let per_image = passes as f64 / images;
    let certified = rows.iter().filter(|r| r.predict >= 0 && r.correct).count();
    outln!("mode: {:?}", c.mode.mode);
    outln!("precision: {}", c.precision);
    outln!("machine: {}", caf::bench::MachineInfo::of(&device));
    outln!("images: {}", rows.len());
    outln!("forward passes per image: {per_image:.0}");
    outln!("images/s: {:.3}", images / seconds);
    outln!("forward passes/s: {:.0}", passes as f64 / seconds);
    outln!("correct and certified (R > 0): {certified}");
    for &r in &c.mode.radii {
        let at = rows
            .iter()
            .filter(|row| row.correct && row.radius >= r)
            .count();
        outln!("certified at r = {r}: {at}/{}", rows.len());
    }
    if c.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "mode": format!("{:?}", c.mode.mode).to_lowercase(),
                "precision": c.precision,
                "images": rows.len(),
                "forward_passes_per_image": per_image,
                "images_per_sec": images / seconds,
                "seconds": seconds,
                "stages": staged.as_ref().map(|s| s.stages.clone()),
                "rows": rows,
            }))?
        );
    }
    Ok(0)
}

/// `--mode staged`: Clopper–Pearson at `--stages` (default n/100, n/10, n) for `--radii`.
fn staged_settings(c: &BenchCertifyArgs) -> Result<caf::certify::StagedSettings> {
    let stages = match c.mode.stages.as_slice() {
        [] => vec![c.n / 100, c.n / 10, c.n],
        s => s.to_vec(),
    };
    if c.mode.n_max.is_some() || c.mode.stop_if_wrong {
        bail!(usage(
            "--n-max and --stop-if-wrong apply to --mode sequential; staged stops at its last \
             stage"
        ));
    }
    let s = caf::certify::StagedSettings {
        n0: c.n0,
        stages,
        batch: c.batch,
        alpha: c.alpha,
        radii: c.mode.radii.clone(),
    };
    s.validate().map_err(|e| usage(e.to_string()))?;
    Ok(s)
}

/// A staged certificate as a row, for the same summary and JSON as the other modes: `n` is the
/// estimation draws used (a stage), so (`n_a`, `n`, α, the number of stages) recompute the
/// bound with `certify::sequential::staged_lower_upper`.
fn staged_row(
    idx: usize,
    label: u32,
    cert: &caf::certify::SequentialCertificate,
    s: &caf::certify::StagedSettings,
    sigma: f64,
    start: std::time::Instant,
) -> caf::store::CertRow {
    let as_cohen = caf::certify::Certificate {
        predict: cert.predict,
        radius: cert.radius,
        c_hat: cert.c_hat,
        n_a: cert.n_a,
        n: cert.draws,
    };
    let settings = caf::certify::Settings {
        n0: s.n0,
        n: cert.draws,
        alpha: s.alpha,
        batch: s.batch,
    };
    let seconds = start.elapsed().as_secs_f64();
    caf::methods::slice::cert_row(idx, label, &as_cohen, &settings, sigma, seconds)
}

fn default_weights(arch: Arch) -> Option<PathBuf> {
    let root = Path::new("../shared/data/pretrained/akamaster");
    match arch {
        Arch::CifarResNet { depth: 20 } => Some(root.join("resnet20-12fca82f.th")),
        Arch::CifarResNet { depth: 56 } => Some(root.join("resnet56-4bfd9763.th")),
        _ => None,
    }
}

/// Measures the SGEMM peak (a fifth of the bench's duration, at least a second) and prints
/// the workload's share of it.
fn peak_share(
    images_per_sec: f64,
    flops_per_image: f64,
    seconds: f64,
) -> Result<caf::bench::PeakShare> {
    let peak = caf::bench::sgemm_peak_gflops((seconds / 5.0).max(1.0));
    let share = caf::bench::PeakShare::new(images_per_sec, flops_per_image, peak);
    outln!(
        "GFLOP/s: {:.1} ({:.1} MFLOP/image), {:.0}% of the measured sgemm peak of {:.1} GFLOP/s",
        share.gflops,
        flops_per_image / 1e6,
        share.percent_of_peak,
        peak
    );
    Ok(share)
}

fn bench_noise(n: BenchNoiseArgs) -> Result<i32> {
    if n.batch == 0 || n.image_size == 0 || !n.seconds.is_finite() || n.seconds <= 0.0 {
        bail!(usage(
            "--batch, --image-size and --seconds must be positive"
        ));
    }
    let input = caf::data::augment::Chw {
        c: 3,
        h: n.image_size,
        w: n.image_size,
    };
    let r = caf::bench::bench_noise(input, n.batch, n.seconds)?;
    outln!(
        "images/s: {:.1} ({}x{} RGB, batch {}, one thread: the stream is sequential)",
        r.images_per_sec_median,
        n.image_size,
        n.image_size,
        n.batch
    );
    let machine = caf::bench::MachineInfo::of(&candle_core::Device::Cpu);
    outln!("machine: {}", machine.device);
    if n.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "throughput": r, "machine": machine.device
            }))?
        );
    }
    Ok(0)
}

fn bench_forward(f: BenchForwardArgs) -> Result<i32> {
    let arch = parse_arch(&f.arch)?;
    if f.batch == 0 || !f.seconds.is_finite() || f.seconds <= 0.0 {
        bail!(usage("--batch and --seconds must be positive"));
    }
    let (mut model, device) = match f.weights.clone().or_else(|| default_weights(arch)) {
        Some(weights) => load_classifier(&ModelArgs {
            arch: f.arch.clone(),
            weights,
            onnx_logits: None,
            mean: None,
            std: None,
            data: DatasetArg::Cifar10,
            data_root: PathBuf::new(),
            image_size: None,
            resize: None,
            device: f.device,
        })?,
        // The ViTs and ResNet-50 have no checkpoint on these machines: their speed does not
        // depend on the weights' values, so deterministic formula weights stand in.
        None if matches!(arch, Arch::Vit(_) | Arch::ResNet50) => {
            let classes = if arch.input_size() == Some(32) {
                10
            } else {
                1000
            };
            let device = f.device.open()?;
            eprintln!("note: no --weights: {arch} with formula (seeded, untrained) weights");
            let m = models::formula_backbone(arch, classes, arch.default_normalize(), &device)?;
            (Box::new(m) as Box<dyn models::Classifier>, device)
        }
        None => bail!(usage(format!(
            "no default weights for {arch}: pass --weights"
        ))),
    };
    model
        .set_precision(f.precision)
        .map_err(|e| usage(e.to_string()))?;
    if let Some(note) = models::emulated_precision_note(f.precision) {
        eprintln!("note: {note}");
    }
    let size = arch.input_size().or(model.input_size()).unwrap_or(32);
    let report = caf::bench::bench_forward_shaped(
        model.as_ref(),
        caf::data::augment::Chw {
            c: 3,
            h: size,
            w: size,
        },
        f.batch,
        f.seconds,
        f.sigma,
        &device,
    )?;
    outln!("images/s: {:.1}", report.images_per_sec_median);
    let machine = caf::bench::MachineInfo::of(&device);
    outln!("machine: {machine}");
    // Forward FLOPs of the network (convolutions + linear layer).
    let flops = match arch {
        Arch::CifarResNet { depth } => {
            Some(models::adapter::cifar_resnet_cost(depth, 10)?.flops_per_image as f64)
        }
        Arch::Vit(name) => Some(models::VitConfig::named(name).cost(model.num_classes()).1 as f64),
        _ => None,
    };
    // The share of the CPU's sgemm peak means nothing for a GPU run.
    let share = flops
        .filter(|_| device.is_cpu())
        .map(|fl| peak_share(report.images_per_sec_median, fl, f.seconds))
        .transpose()?;
    if f.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "throughput": report, "peak": share, "precision": f.precision,
                "machine": machine
            }))?
        );
    }
    Ok(0)
}

fn bench_train_step(t: BenchTrainArgs) -> Result<i32> {
    use caf::methods::budget;
    use caf::methods::denoised::DenoiserObjective;
    use caf::methods::train::{Classification, OptimizerConfig};
    let arch = parse_arch(&t.arch)?;
    if !arch.is_trainable() {
        bail!(usage(format!(
            "train-step needs a CIFAR ResNet or a ViT, not {arch}"
        )));
    }
    // A ViT has no weights on these machines: formula weights serve (a step costs the same).
    let weights = t.weights.clone().or_else(|| default_weights(arch));
    if !t.seconds.is_finite() || t.seconds <= 0.0 {
        bail!(usage("--seconds must be positive"));
    }
    let device = t.device.open()?;
    let normalize = arch.default_normalize();
    let varmap = candle_nn::VarMap::new();
    let size = arch.input_size().unwrap_or(32);
    let (_, backbone_flops) = budget::network_cost(arch, size)
        .ok_or_else(|| usage(format!("no FLOP count for {arch}")))?;
    let shape = caf::data::augment::Chw {
        c: 3,
        h: size,
        w: size,
    };
    // The frozen network of `caf` and `denoised`: the weights file, or formula weights.
    let frozen = || -> Result<models::Backbone> {
        Ok(match &weights {
            Some(w) => models::load_backbone(arch, w, normalize, &device)?,
            None => {
                eprintln!("note: no --weights: {arch} with formula (seeded, untrained) weights");
                models::formula_backbone(arch, NUM_CLASSES, normalize, &device)?
            }
        })
    };
    // Each arm returns the throughput and the training FLOPs per image (`methods::budget`).
    let (report, flops) = match t.method {
        BenchMethod::Caf => {
            let adapter: models::AdapterArch = t
                .adapter
                .parse()
                .map_err(|e: models::ModelError| usage(e.to_string()))?;
            // The `train-caf` handler's construction: adapters and head on the frozen backbone.
            let phi = frozen()?;
            let feature_dim = phi.feature_dim();
            let (model, vars) = caf::methods::caf::trainable_model(
                phi,
                &adapter,
                NUM_CLASSES,
                &varmap,
                &device,
                0,
            )?;
            let report = caf::bench::bench_train_step(
                &Classification { model: &model },
                vars,
                OptimizerConfig::adam(1e-3),
                (shape, t.batch),
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::caf_train_flops(backbone_flops, &adapter, feature_dim, size)
                .ok_or_else(|| usage(format!("no FLOP count for adapter {adapter}")))?;
            (report, flops.0)
        }
        BenchMethod::Rs => {
            // The `train-rs` handler's construction: the whole network, fine-tuned from
            // `weights`, or from scratch without them.
            let init = match &weights {
                Some(w) => Some(models::load_state_dict(w, &device)?),
                None => {
                    eprintln!("note: no --weights: {arch} trained from its initialisation");
                    None
                }
            };
            let (model, vars) = caf::methods::rs::trainable_network(
                &t.arch,
                normalize,
                init.as_ref(),
                NUM_CLASSES,
                &varmap,
                &device,
            )?;
            let sgd = OptimizerConfig::Sgd {
                lr: 0.01,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 1e-4,
            };
            let report = caf::bench::bench_train_step(
                &Classification { model: &model },
                vars,
                sgd,
                (shape, t.batch),
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::rs_train_flops(arch, None)
                .ok_or_else(|| usage(format!("no FLOP count for {arch}")))?;
            (report, flops.0)
        }
        BenchMethod::Denoised => {
            let arch: models::dncnn::DnCnnArch = t
                .denoiser
                .parse()
                .map_err(|e: models::ModelError| usage(e.to_string()))?;
            let classifier = frozen()?.detached()?;
            // The `train-denoised` handler's construction, in front of the frozen classifier.
            let (denoiser, vars) =
                caf::methods::denoised::trainable_denoiser(arch, &varmap, &device, 0)?;
            let objective = DenoiserObjective::Stability;
            let loss = caf::methods::denoised::DenoiserLoss {
                denoiser: &denoiser,
                classifier: &classifier,
                objective,
            };
            let report = caf::bench::bench_train_step(
                &loss,
                vars,
                OptimizerConfig::adam(1e-3),
                (shape, t.batch),
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::denoised_train_flops(backbone_flops, arch, objective);
            (report, flops.0)
        }
    };
    outln!("images/s: {:.1}", report.images_per_sec_median);
    let machine = caf::bench::MachineInfo::of(&device);
    outln!("machine: {machine}");
    let share = if device.is_cpu() {
        Some(peak_share(report.images_per_sec_median, flops, t.seconds)?)
    } else {
        None
    };
    if t.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "throughput": report, "peak": share, "machine": machine })
            )?
        );
    }
    Ok(0)
}

/// `caf bench load`: images/s of decoding + preprocessing an image folder through
/// [`caf::data::imagefolder::Prefetch`], consumed as the jobs consume it.
fn bench_load(l: BenchLoadArgs) -> Result<i32> {
    use caf::data::imagefolder::{self, Prefetch, Preprocess};
    let split = match l.split {
        SplitArg::Train => caf::data::Split::Train,
        SplitArg::Test => caf::data::Split::Test,
    };
    if l.image_size == 0 || l.batch == 0 || l.workers == Some(0) {
        bail!(usage(
            "--image-size, --batch and --workers must be at least 1"
        ));
    }
    let resize = l
        .resize
        .unwrap_or_else(|| Preprocess::default_resize(l.image_size));
    if resize < l.image_size {
        bail!(usage(format!(
            "--resize {resize} is smaller than --image-size {}",
            l.image_size
        )));
    }
    let pre = Preprocess {
        resize,
        image_size: l.image_size,
    };
    let index = imagefolder::scan(&l.root, split).map_err(|e| usage(e.to_string()))?;
    let n = l.max.map_or(index.len(), |m| m.min(index.len()));
    let workers = l.workers.unwrap_or_else(imagefolder::default_workers);
    let start = std::time::Instant::now();
    let mut images = 0usize;
    let mut checksum = 0u64;
    let batches = Prefetch::new(
        std::sync::Arc::new(index),
        pre,
        (0..n).collect(),
        l.batch,
        workers,
        2 * workers,
    );
    for b in batches {
        let b = b?;
        images += b.labels.len();
        // Touch the pixels as a consumer converting them would, so nothing is optimised away.
        checksum = checksum.wrapping_add(b.pixels.iter().map(|&p| u64::from(p)).sum::<u64>());
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = images as f64 / secs.max(1e-9);
    if l.json {
        println!(
            "{}",
            serde_json::json!({
                "images": images,
                "seconds": secs,
                "images_per_s": rate,
                "workers": workers,
                "image_size": l.image_size,
                "resize": resize,
                "checksum": checksum,
            })
        );
    } else {
        println!(
            "load {}: {images} images in {secs:.2} s = {rate:.1} images/s ({workers} decoding \
             threads, resize {resize}, crop {}×{})",
            l.root.display(),
            l.image_size,
            l.image_size
        );
    }
    Ok(0)
}
