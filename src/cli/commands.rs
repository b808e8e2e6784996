use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use caf::data::{self, Split};
use caf::methods::{
    self,
    common::Slice,
    eval::predict_indices,
    slice::{certify_slice, SliceEnd, SliceRun},
};
use caf::models::{self, Arch, Normalize};
use caf::plan::Plan;
use caf::sched::{self, CancelFlag, LogProgress, Progress, SchedConfig, TerminalProgress};
use caf::spec::Spec;
use caf::store::{SqliteStore, Store};

use super::args::*;
use super::Exit;

pub fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Run(a) => run(a),
        Command::Plan(a) => plan(a),
        Command::Status(a) => runtime()?.block_on(super::status::status(a)),
        Command::Retry(a) => runtime()?.block_on(retry(a)),
        Command::Export(a) => runtime()?.block_on(super::export::export(a)),
        Command::Report(a) => runtime()?.block_on(super::report::report(a)),
        Command::Import(a) => runtime()?.block_on(super::report::import(a)),
        Command::Certify(a) => certify(a),
        Command::Eval(a) => eval(a),
        Command::Bench(a) => bench(a),
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Loads and plans a spec; any problem with it is a usage error (exit 2, nothing written).
fn load_plan(path: &Path) -> Result<(Spec, Plan)> {
    let spec = Spec::load(path).map_err(|e| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    let plan = Plan::from_spec(&spec, &methods::planner()).map_err(|e| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    Ok((spec, plan))
}

pub async fn open_store(db: &Path) -> Result<SqliteStore> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(SqliteStore::open(db).await?)
}

/// Opens an existing database for reading commands; a missing file is a usage error.
pub async fn open_existing_store(db: &Path) -> Result<SqliteStore> {
    if !db.exists() {
        return Err(Exit {
            code: 2,
            message: Some(format!(
                "no database at {} (run a study first, or pass --db)",
                db.display()
            )),
        }
        .into());
    }
    open_store(db).await
}

async fn retry(a: RetryArgs) -> Result<i32> {
    let store = open_existing_store(&a.db.db).await?;
    let study = store.study_by_name(&a.study).await?;
    let n = store.retry_failed(study.id).await?;
    println!(
        "{n} failed job(s) of {} returned to pending with fresh attempts",
        study.name
    );
    if n > 0 {
        // Their checkpoints and finished images are kept: the rerun resumes from them.
        println!(
            "a running `caf run` on this study picks them up; otherwise: caf run {} --db {}",
            study.spec_path,
            a.db.db.display()
        );
    }
    Ok(0)
}

fn plan(a: PlanArgs) -> Result<i32> {
    let (_, plan) = load_plan(&a.spec)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&plan.to_json())?)?;
        return Ok(0);
    }
    writeln!(
        out,
        "study {} (seed {}, spec sha256 {})",
        plan.study.name,
        plan.study.seed,
        &plan.study.spec_sha256[..12]
    )?;
    writeln!(out, "{:<16}  {:<8}  {:<34}  DEPS", "JOB", "KIND", "LABEL")?;
    for j in &plan.jobs {
        let deps: Vec<&str> = j.deps.iter().map(|d| d.as_str()).collect();
        writeln!(
            out,
            "{:<16}  {:<8}  {:<34}  {}",
            j.id,
            j.kind,
            j.label,
            if deps.is_empty() {
                "-".into()
            } else {
                deps.join(",")
            }
        )?;
    }
    writeln!(out, "{} jobs", plan.jobs.len())?;
    let budgets: Vec<(&caf::plan::Job, caf::methods::budget::Budget)> = plan
        .jobs
        .iter()
        .filter_map(|j| caf::methods::budget::of(j).map(|b| (j, b)))
        .collect();
    if !budgets.is_empty() {
        writeln!(
            out,
            "\ntraining compute (FLOPs = 2 × multiply-adds; see `caf::methods::budget`)"
        )?;
        writeln!(
            out,
            "{:<16}  {:>12}  {:>14}  {:>16}  {:>12}  {:>8}  LABEL",
            "JOB", "TRAINED PAR.", "MFLOP/IMG FWD", "MFLOP/TRAIN IMG", "IMAGES", "TFLOP"
        )?;
        for (j, b) in budgets {
            writeln!(
                out,
                "{:<16}  {:>12}  {:>14.1}  {:>16.1}  {:>12}  {:>8.1}  {}",
                j.id,
                b.trained_params,
                b.trained_flops as f64 / 1e6,
                b.flops_per_train_image / 1e6,
                b.images,
                b.tflops,
                j.label
            )?;
        }
    }
    Ok(0)
}

fn run(a: RunArgs) -> Result<i32> {
    let (_, plan) = load_plan(&a.spec)?;
    if a.workers == 0 {
        bail!(Exit {
            code: 2,
            message: Some("--workers must be at least 1".into())
        });
    }
    if !(a.lease_secs.is_finite() && a.lease_secs >= 1.0) {
        bail!(Exit {
            code: 2,
            message: Some("--lease-secs must be at least 1".into())
        });
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let store = open_store(&a.db.db).await?;
        let study = store.register_plan(&plan).await?;
        if a.retry_failed {
            let n = store.retry_failed(study).await?;
            if n > 0 {
                eprintln!("retrying {n} failed job(s)");
            }
        }
        let lease = Duration::from_secs_f64(a.lease_secs);
        let cfg = SchedConfig {
            workers: a.workers,
            device: a.device,
            lease,
            heartbeat: lease / 4,
            poll: Duration::from_millis(500),
            artifacts_dir: a.artifacts.clone(),
            ..SchedConfig::default()
        };
        let progress: Arc<dyn Progress> = if a.quiet {
            Arc::new(sched::progress::NoProgress)
        } else if std::io::stderr().is_terminal() {
            Arc::new(TerminalProgress::new())
        } else {
            Arc::new(LogProgress::new(Duration::from_secs(10)))
        };
        let shutdown = CancelFlag::new();
        spawn_signal_handler(shutdown.clone());
        let results = methods::StoreResults::new(store.clone(), tokio::runtime::Handle::current());
        let registry = Arc::new(methods::registry(Arc::new(results)));
        let summary = sched::run_study(store.clone(), study, registry, cfg, shutdown, progress).await?;
        let jobs = store.study_jobs(study).await?;
        let done = jobs.iter().filter(|j| j.state == caf::store::JobState::Done).count();
        let failed: Vec<_> = jobs.iter().filter(|j| j.state == caf::store::JobState::Failed).collect();
        let blocked = jobs.iter().filter(|j| j.blocked).count();
        let resume = format!("caf run {} --db {}", a.spec.display(), a.db.db.display());
        if summary.shutdown_requested {
            eprintln!(
                "interrupted: {done}/{} jobs done, finished work is saved. Resume with:\n  {resume}",
                jobs.len()
            );
            return Ok(130);
        }
        eprintln!("study {}: {done}/{} jobs done, {} failed, {blocked} blocked", plan.study.name, jobs.len(), failed.len());
        for f in &failed {
            eprintln!("  FAILED {} [{}]: {}", f.label, f.id, f.error.as_deref().unwrap_or("?"));
        }
        if !failed.is_empty() || blocked > 0 {
            eprintln!("fix the cause, then: {resume} --retry-failed");
            return Ok(1);
        }
        Ok(0)
    })
}

/// First Ctrl-C / SIGTERM: stop at the next clean point. Second: exit at once (the image in
/// flight is redone on resume).
fn spawn_signal_handler(shutdown: CancelFlag) {
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("\nstopping after the image in flight (press Ctrl-C again to abort now)…");
        shutdown.cancel();
        wait_for_signal().await;
        eprintln!("aborted; finished images are saved");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Mean/std from flags, defaulting to the akamaster convention for ResNets.
fn normalize_of(m: &ModelArgs, arch: Arch) -> Result<Normalize> {
    let default = match arch {
        Arch::Linear => Normalize::IDENTITY,
        _ => Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        },
    };
    let mut n = default;
    if let Some(v) = &m.mean {
        n.mean = [v[0], v[1], v[2]];
    }
    if let Some(v) = &m.std {
        if v.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(Exit {
                code: 2,
                message: Some("--std values must be > 0".into())
            });
        }
        n.std = [v[0], v[1], v[2]];
    }
    Ok(n)
}

fn load_model_args(m: &ModelArgs) -> Result<(Box<dyn models::Classifier>, candle_core::Device)> {
    let arch: Arch = m.arch.parse().map_err(|e: caf::arch::UnknownArch| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    let normalize = normalize_of(m, arch)?;
    if !m.weights.is_file() {
        bail!(Exit {
            code: 2,
            message: Some(format!("weights file not found: {}", m.weights.display()))
        });
    }
    let device = m.device.open()?;
    let model = models::load_classifier(arch, &m.weights, normalize, &device)?;
    Ok((model, device))
}

fn load_data(m: &ModelArgs, split: Split) -> Result<data::ImageSet> {
    match m.data {
        DatasetArg::Cifar10 => Ok(data::load_cifar10(&m.data_root, split)?),
    }
}

fn certify(a: CertifyArgs) -> Result<i32> {
    let settings = caf::certify::Settings {
        n0: a.n0,
        n: a.n,
        alpha: a.alpha,
        batch: a.batch,
    };
    settings.validate().map_err(|e| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    if !(a.sigma.is_finite() && a.sigma > 0.0) {
        bail!(Exit {
            code: 2,
            message: Some(format!("--sigma must be > 0, got {}", a.sigma))
        });
    }
    if a.skip == 0 {
        bail!(Exit {
            code: 2,
            message: Some("--skip must be at least 1".into())
        });
    }
    let (model, device) = load_model_args(&a.model)?;
    let set = load_data(&a.model, Split::Test)?;
    let indices = Slice {
        skip: a.skip,
        max: a.max,
    }
    .indices(set.len());
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    writeln!(out, "idx\tlabel\tpredict\tradius\tcorrect\ttime\tnA\tn")?;
    out.flush()?;
    let shutdown = CancelFlag::new();
    {
        let s = shutdown.clone();
        let _ = ctrlc_once(move || s.cancel());
    }
    let mut count = 0usize;
    let done = [Default::default()];
    let run = SliceRun {
        data: &set,
        indices: &indices,
        done: &done,
        seed: a.seed,
        sigma: a.sigma,
        settings,
    };
    let smooth = caf::certify::Smooth::new(model.as_ref(), a.sigma, device.clone());
    let end = certify_slice(&smooth, &run, &|| shutdown.is_cancelled(), &mut |rows| {
        let Some((_, r)) = rows.into_iter().next() else {
            return Ok(());
        };
        // Flushed per row, like Cohen's certify.py, so a partial log is usable.
        writeln!(
            out,
            "{}\t{}\t{}\t{:.3}\t{}\t{:.4}\t{}\t{}",
            r.idx, r.label, r.predict, r.radius, r.correct as u8, r.seconds, r.n_a, r.n
        )
        .and_then(|_| out.flush())
        .map_err(|e| caf::sched::JobError::fatal(format!("writing {}: {e}", a.out.display())))?;
        count += 1;
        tracing::info!(
            idx = r.idx,
            predict = r.predict,
            radius = r.radius,
            "certified"
        );
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!(e.message))?;
    eprintln!("wrote {count} rows to {}", a.out.display());
    Ok(match end {
        SliceEnd::Finished => 0,
        SliceEnd::Interrupted => 130,
    })
}

/// Installs a one-shot Ctrl-C callback for synchronous commands.
fn ctrlc_once(f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(wait_for_signal());
                eprintln!("\nstopping after the image in flight…");
                f();
                rt.block_on(wait_for_signal());
                std::process::exit(130);
            }
        })?;
    Ok(())
}

fn eval(a: EvalArgs) -> Result<i32> {
    if a.skip == 0 || a.batch == 0 {
        bail!(Exit {
            code: 2,
            message: Some("--skip and --batch must be at least 1".into())
        });
    }
    let (model, device) = load_model_args(&a.model)?;
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::Test => Split::Test,
    };
    let set = load_data(&a.model, split)?;
    let indices = Slice {
        skip: a.skip,
        max: a.max,
    }
    .indices(set.len());
    let mut correct = 0usize;
    for chunk in indices.chunks(a.batch) {
        let rows = predict_indices(model.as_ref(), &device, &set, chunk)?;
        correct += rows.iter().filter(|r| r.label == r.predict).count();
    }
    let total = indices.len();
    let acc = if total == 0 {
        0.0
    } else {
        correct as f64 / total as f64
    };
    outln!("accuracy: {acc:.4} ({correct}/{total})");
    Ok(0)
}

fn bench(a: BenchArgs) -> Result<i32> {
    match a.what {
        BenchWhat::Forward(f) => bench_forward(f),
        BenchWhat::TrainStep(t) => bench_train_step(t),
    }
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

fn bench_forward(f: BenchForwardArgs) -> Result<i32> {
    let arch: Arch = f.arch.parse().map_err(|e: caf::arch::UnknownArch| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    let weights = match f.weights.clone().or_else(|| default_weights(arch)) {
        Some(w) => w,
        None => bail!(Exit {
            code: 2,
            message: Some(format!("no default weights for {arch}: pass --weights"))
        }),
    };
    if f.batch == 0 || !f.seconds.is_finite() || f.seconds <= 0.0 {
        bail!(Exit {
            code: 2,
            message: Some("--batch and --seconds must be positive".into())
        });
    }
    let m = ModelArgs {
        arch: f.arch.clone(),
        weights,
        mean: None,
        std: None,
        data: DatasetArg::Cifar10,
        data_root: PathBuf::new(),
        device: caf::sched::DeviceSpec::Cpu,
    };
    let (mut model, device) = load_model_args(&m)?;
    model.set_precision(f.precision).map_err(|e| Exit {
        code: 2,
        message: Some(e.to_string()),
    })?;
    if f.precision == models::Precision::Bf16 && !models::gemm::bf16_kernel_available() {
        eprintln!("note: this CPU has no AVX-512 BF16; bf16 runs the emulated (f32) GEMM");
    }
    let report = caf::bench::bench_forward(model.as_ref(), f.batch, f.seconds, f.sigma, &device)?;
    outln!("images/s: {:.1}", report.images_per_sec_median);
    // Forward FLOPs of the network (convolutions + linear layer).
    let flops = match arch {
        Arch::CifarResNet { depth } => {
            Some(models::adapter::cifar_resnet_cost(depth, 10)?.flops_per_image as f64)
        }
        _ => None,
    };
    let share = flops
        .map(|fl| peak_share(report.images_per_sec_median, fl, f.seconds))
        .transpose()?;
    if f.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "throughput": report, "peak": share, "precision": f.precision
            }))?
        );
    }
    Ok(0)
}

fn bench_train_step(t: BenchTrainArgs) -> Result<i32> {
    use caf::methods::budget;
    use caf::methods::denoised::DenoiserObjective;
    use caf::methods::train::{Classification, OptimizerConfig};
    let usage = |m: String| Exit {
        code: 2,
        message: Some(m),
    };
    let arch: Arch = t
        .arch
        .parse()
        .map_err(|e: caf::arch::UnknownArch| usage(e.to_string()))?;
    let Arch::CifarResNet { depth } = arch else {
        bail!(usage(format!(
            "train-step needs a CIFAR ResNet, not {arch}"
        )));
    };
    let weights = match t.weights.clone().or_else(|| default_weights(arch)) {
        Some(w) => w,
        None => bail!(usage(format!(
            "no default weights for {arch}: pass --weights"
        ))),
    };
    if !t.seconds.is_finite() || t.seconds <= 0.0 {
        bail!(usage("--seconds must be positive".into()));
    }
    let device = candle_core::Device::Cpu;
    let normalize = Normalize {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    let varmap = candle_nn::VarMap::new();
    let backbone_flops = models::adapter::cifar_resnet_cost(depth, 10)?.flops_per_image;
    // Each arm returns the throughput and the training FLOPs per image (`methods::budget`).
    let (report, flops) = match t.method {
        BenchMethod::Caf => {
            let adapter: models::AdapterArch = t
                .adapter
                .parse()
                .map_err(|e: models::ModelError| usage(e.to_string()))?;
            let phi = models::load_cifar_resnet(depth, &weights, normalize, &device)?.detached()?;
            let (model, vars) =
                models::caf::build_caf_seeded(phi, &adapter, 10, &varmap, &device, 0)?;
            let report = caf::bench::bench_train_step(
                &Classification { model: &model },
                vars,
                OptimizerConfig::adam(1e-3),
                t.batch,
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::caf_train_flops(backbone_flops, &adapter)
                .ok_or_else(|| usage(format!("no FLOP count for adapter {adapter}")))?;
            (report, flops.0)
        }
        BenchMethod::Rs => {
            let init = models::load_state_dict(&weights, &device)?;
            let (model, vars) = models::build_trainable_resnet(
                depth,
                10,
                normalize,
                &varmap,
                &device,
                Some(&init),
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
                t.batch,
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::rs_train_flops(depth, None)
                .ok_or_else(|| usage(format!("no FLOP count for resnet{depth}")))?;
            (report, flops.0)
        }
        BenchMethod::Denoised => {
            let arch: models::dncnn::DnCnnArch = t
                .denoiser
                .parse()
                .map_err(|e: models::ModelError| usage(e.to_string()))?;
            let classifier =
                models::load_cifar_resnet(depth, &weights, normalize, &device)?.detached()?;
            let (denoiser, vars) = models::dncnn::build_seeded(arch, &varmap, &device, 0)?;
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
                t.batch,
                t.seconds,
                t.sigma,
                &device,
            )?;
            let flops = budget::denoised_train_flops(backbone_flops, arch, objective);
            (report, flops.0)
        }
    };
    outln!("images/s: {:.1}", report.images_per_sec_median);
    let share = peak_share(report.images_per_sec_median, flops, t.seconds)?;
    if t.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "throughput": report, "peak": share })
            )?
        );
    }
    Ok(0)
}
