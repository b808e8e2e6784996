use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use caf::sched::{DeviceList, DeviceSpec};

/// caf: certified adversarial robustness experiments (randomized smoothing, certifying adapters).
#[derive(Debug, Parser)]
#[command(name = "caf", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a study: plan it, record it in the store, run every job not yet done (resumes).
    Run(RunArgs),
    /// Record a study and start its workers on a cluster: Slurm job arrays of `caf worker`
    /// sharing one PostgreSQL store.
    Submit(SubmitArgs),
    /// Expand a study into its job DAG and print it (nothing is written unless --record).
    Plan(PlanArgs),
    /// Run jobs of studies already recorded in --db (by `caf plan --record`, `caf run` or `caf
    /// submit`) until none is left to run: one of many workers sharing a store, e.g. a Slurm
    /// array task.
    Worker(WorkerArgs),
    /// Show the jobs of a study: state, progress, throughput, ETA.
    Status(StatusArgs),
    /// Give a study's failed jobs a fresh set of attempts without running anything: a `caf
    /// run` already working on the study (or the next one) picks them up.
    Retry(RetryArgs),
    /// Export per-image results of a study.
    Export(ExportArgs),
    /// Write a study's report: curves, tables, comparisons, sensitivity, ensemble, training
    /// curves, as PNG/SVG, Markdown/CSV/LaTeX and one self-contained index.html.
    Report(ReportArgs),
    /// Import external per-image results (e.g. a published certification log) into a study.
    Import(ImportArgs),
    /// Certify a model once, outside any study (Cohen's certify.py).
    Certify(CertifyArgs),
    /// Clean accuracy of a model on a CIFAR-10 split.
    Eval(EvalArgs),
    /// Measure throughput of caf's numerical core, and of its job queue.
    Bench(BenchArgs),
    /// Work on whole databases: copy studies between them.
    Db(DbArgs),
}

#[derive(Debug, Args)]
pub struct DbArgs {
    #[command(subcommand)]
    pub what: DbWhat,
}

#[derive(Debug, Subcommand)]
pub enum DbWhat {
    /// Copy whole studies (spec, cells, jobs with their states and attempts, every result,
    /// training metrics, events, artifact records) from one database to another, e.g. from
    /// a cluster's PostgreSQL to a laptop's SQLite file. A study the destination holds with
    /// the same content is left alone; one with different content is refused.
    Copy(DbCopyArgs),
}

#[derive(Debug, Args)]
pub struct DbCopyArgs {
    /// Source database: an SQLite file (a path or sqlite:PATH) or a PostgreSQL URL.
    pub src: PathBuf,
    /// Destination database (an SQLite file is created if missing).
    pub dst: PathBuf,
    /// Study to copy (repeatable; default: every study of the source).
    #[arg(long = "study", value_name = "NAME")]
    pub studies: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DbArg {
    /// Database of results: an SQLite file (a path or sqlite:PATH) or a PostgreSQL URL
    /// (postgres://user:password@host:port/database, the database created beforehand).
    #[arg(long, env = "CAF_DB", default_value = "runs/caf.db")]
    pub db: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Study spec (YAML).
    pub spec: PathBuf,
    #[command(flatten)]
    pub db: DbArg,
    /// Concurrent job slots per device (on the CPU: in this process); several jobs may share
    /// one GPU for small models.
    #[arg(long, visible_alias = "slots-per-device", default_value_t = 1)]
    pub workers: usize,
    /// cpu; cuda (one slot per visible GPU, respecting CUDA_VISIBLE_DEVICES); cuda:N; or a
    /// list such as cuda:0,cuda:2 (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceList,
    /// Give failed jobs a fresh set of attempts.
    #[arg(long)]
    pub retry_failed: bool,
    /// Seconds without a heartbeat after which a job's lease expires and it is re-run.
    #[arg(long, default_value_t = 60.0)]
    pub lease_secs: f64,
    /// Where jobs write files (checkpoints, weights).
    #[arg(long, default_value = "runs/artifacts")]
    pub artifacts: PathBuf,
    /// No progress bars or per-job lines.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Study spec (YAML).
    pub spec: PathBuf,
    /// The store every worker shares: a PostgreSQL URL (it reaches the workers in their
    /// environment as CAF_DB, never on a command line).
    #[command(flatten)]
    pub db: DbArg,
    /// Submit to Slurm with sbatch (the only cluster scheduler caf submits to, so required).
    #[arg(long)]
    pub slurm: bool,
    /// Workers to start: array tasks, capped at the study's runnable jobs; past the cluster's
    /// MaxArraySize, several arrays.
    #[arg(long, default_value_t = 1)]
    pub array: u64,
    /// sbatch --partition.
    #[arg(long)]
    pub partition: Option<String>,
    /// sbatch --time: each worker's walltime (jobs cut by it resume in another worker).
    #[arg(long)]
    pub time: Option<String>,
    /// sbatch --gres, e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// sbatch --cpus-per-task.
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// sbatch --mem, e.g. 16G.
    #[arg(long)]
    pub mem: Option<String>,
    /// sbatch --account.
    #[arg(long)]
    pub account: Option<String>,
    /// sbatch --qos.
    #[arg(long)]
    pub qos: Option<String>,
    /// Any other sbatch option, one per flag: `--sbatch-arg=--constraint=a100`. Options that
    /// set --array, --signal or --requeue are refused (caf sets those).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// The caf binary the workers run (default: this one), e.g. a copy on the shared
    /// filesystem: compute nodes need not have caf on their PATH.
    #[arg(long, value_name = "PATH")]
    pub caf: Option<PathBuf>,
    /// Seconds before the walltime at which Slurm sends SIGUSR2, so a worker hands its job
    /// back (training after a checkpoint) before it is killed.
    #[arg(long, default_value_t = 120)]
    pub signal_lead: u32,
    /// Print the sbatch script and command without recording, writing or submitting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Concurrent job slots per device in each worker.
    #[arg(long, visible_alias = "slots-per-device", default_value_t = 1)]
    pub slots: usize,
    /// Each worker's devices: cpu; cuda (every GPU of the task: with --gres gpu:N, N slots'
    /// worth of GPUs); cuda:N; or a list such as cuda:0,cuda:1.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceList,
    /// Where jobs write files: a directory on the filesystem every node shares.
    #[arg(long, default_value = "runs/artifacts")]
    pub artifacts: PathBuf,
    /// Workers' lease: seconds without a heartbeat after which another worker takes a job over.
    #[arg(long)]
    pub lease_secs: Option<f64>,
    /// Give failed jobs a fresh set of attempts.
    #[arg(long)]
    pub retry_failed: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub spec: PathBuf,
    /// Machine-readable jobs `{id, kind, label, params, deps}`.
    #[arg(long)]
    pub json: bool,
    /// Also record the plan in --db (as `caf run` does before running), so that `caf worker`
    /// processes can run it.
    #[arg(long)]
    pub record: bool,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Only jobs of this study (repeatable; default: every study in the database).
    #[arg(long = "study", value_name = "NAME")]
    pub studies: Vec<String>,
    /// Concurrent job slots per device; several jobs may share one GPU for small models.
    #[arg(long, visible_alias = "slots-per-device", default_value_t = 1)]
    pub slots: usize,
    /// cpu; cuda (one slot set per visible GPU, respecting CUDA_VISIBLE_DEVICES, so a Slurm
    /// task with --gres gpu:N gets N); cuda:N; or a list such as cuda:0,cuda:2 (CUDA needs a
    /// build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceList,
    /// Where jobs write files (checkpoints, weights): a directory every worker sees.
    #[arg(long, default_value = "runs/artifacts")]
    pub artifacts: PathBuf,
    /// Seconds without a heartbeat after which a job's lease expires and another worker
    /// takes the job over (counted as an interruption).
    #[arg(long, default_value_t = 60.0)]
    pub lease_secs: f64,
    /// No progress bars or per-job lines.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Study name (default: every study in the database).
    pub study: Option<String>,
    #[command(flatten)]
    pub db: DbArg,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Study name.
    pub study: String,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ExportFormat {
    /// One row per (job, image): job,idx,label,predict,radius,correct,nA,n.
    Csv,
    /// Cohen's certify.py log (idx label predict radius correct time, then nA n); one job.
    CohenTsv,
    /// Jobs with their parameters and per-image results.
    Json,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Study name (default: the only study in the database).
    pub study: Option<String>,
    #[command(flatten)]
    pub db: DbArg,
    /// Output directory (created; files in it are replaced).
    #[arg(long, default_value = "reports/latest")]
    pub out: PathBuf,
    /// Radii of the tables, comma-separated (default: the spec's `report.radii`).
    #[arg(long, value_delimiter = ',')]
    pub radii: Option<Vec<f64>>,
    /// Method every other method is compared against (default: denoised if present, else
    /// smooth).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Overlay two studies instead: each `STUDY` (in --db) or `PATH.db` (its only study) or
    /// `PATH.db:STUDY`. The first is drawn solid, the second dashed.
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "study")]
    pub compare: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ImportFormat {
    /// Cohen et al.'s certify.py output: `idx label predict radius correct time`, tab-separated,
    /// optionally with caf's extra `nA n` columns.
    CohenTsv,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: PathBuf,
    #[arg(long, value_enum, default_value = "cohen-tsv")]
    pub format: ImportFormat,
    /// Method name the results stand for (e.g. `cohen2019-resnet110`).
    #[arg(long)]
    pub method: String,
    /// σ the results were certified at (pixel units, images in [0,1]).
    #[arg(long)]
    pub sigma: f64,
    /// Free text kept with the job (source, paper, commit).
    #[arg(long)]
    pub label: Option<String>,
    /// Study to add the results to (created if missing).
    #[arg(long, default_value = "imported")]
    pub study: String,
    #[command(flatten)]
    pub db: DbArg,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Study name (default: the only study in the database).
    pub study: Option<String>,
    #[command(flatten)]
    pub db: DbArg,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: ExportFormat,
    /// Only this job (id or unique id prefix).
    #[arg(long)]
    pub job: Option<String>,
    /// Output file (stdout by default); for cohen-tsv with several jobs, a directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DatasetArg {
    Cifar10,
    Cifar100,
    /// `train/CLASS/*` and `val/CLASS/*` of PNG or JPEG images (torchvision's ImageFolder).
    Imagefolder,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum SplitArg {
    Train,
    Test,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// linear | resnet20 | resnet32 | resnet44 | resnet56 | resnet110 | resnet50 |
    /// vit_tiny_patch16_224 | vit_small_patch16_224 | vit_base_patch16_224 | vit_cifar_tiny_patch4_32 |
    /// onnx (a graph exported with `torch.onnx.export`, as `--weights`)
    #[arg(long)]
    pub arch: String,
    /// safetensors, PyTorch zip (torch ≥ 1.6) or legacy PyTorch pickle file.
    #[arg(long)]
    pub weights: PathBuf,
    /// `--arch onnx`: the graph output holding the logits (default: the output named `logits`,
    /// or the graph's only output).
    #[arg(long, value_name = "NAME")]
    pub onnx_logits: Option<String>,
    /// Per-channel input mean, e.g. 0.485,0.456,0.406 (default: akamaster's for ResNets, none for linear and onnx).
    // Not `num_args = 3`: clap counts that before splitting at the commas, so it refused the
    // documented `--mean 0.5,0.5,0.5`; the three values are checked where they are read.
    #[arg(long, value_delimiter = ',')]
    pub mean: Option<Vec<f32>>,
    /// Per-channel input std, e.g. 0.229,0.224,0.225.
    #[arg(long, value_delimiter = ',')]
    pub std: Option<Vec<f32>>,
    #[arg(long, value_enum, default_value = "cifar10")]
    pub data: DatasetArg,
    /// Folder holding `cifar-10-batches-bin` (`cifar-100-binary`), or that folder itself; for
    /// imagefolder the folder holding `train/` and `val/`.
    #[arg(long, default_value = "../shared/data/cifar10-jpeg")]
    pub data_root: PathBuf,
    /// imagefolder: the centre crop's side (default: the arch's input size).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// imagefolder: the shorter side before the crop (default: image size / 0.875, as timm).
    #[arg(long)]
    pub resize: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

#[derive(Debug, Args)]
pub struct CertifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Noise level σ in [0,1]-pixel units.
    #[arg(long)]
    pub sigma: f64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_N0)]
    pub n0: u64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_N)]
    pub n: u64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_ALPHA)]
    pub alpha: f64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_BATCH)]
    pub batch: usize,
    /// Certify images 0, skip, 2·skip, …
    #[arg(long, default_value_t = 1)]
    pub skip: usize,
    /// Stop before this image index.
    #[arg(long)]
    pub max: Option<usize>,
    /// Noise seed: image i's draws depend only on (seed, σ, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output TSV (Cohen's columns, then nA and n; n is the draws used when sequential).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub mode: CertifyModeArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum CertifyModeArg {
    /// Cohen's CERTIFY: n draws for every image.
    Cohen,
    /// Anytime-valid sequential certification: stop once every --radii is decided.
    Sequential,
    /// `caf bench certify` only: Clopper–Pearson at the fixed --stages, α split over them, the
    /// simplest valid alternative to `sequential`, to compare with it.
    Staged,
}

/// Sequential certification options shared by `caf certify` and `caf bench certify`.
#[derive(Debug, Clone, Args)]
pub struct CertifyModeArgs {
    #[arg(long, value_enum, default_value = "cohen")]
    pub mode: CertifyModeArg,
    /// Sequential: radii to decide, comma-separated (e.g. 0.25,0.5,0.75,1.0).
    #[arg(long, value_delimiter = ',')]
    pub radii: Vec<f64>,
    /// Sequential: estimation-draw budget (default: --n).
    #[arg(long)]
    pub n_max: Option<u64>,
    /// Sequential: stop after selection when the selected class is not the label.
    #[arg(long)]
    pub stop_if_wrong: bool,
    /// Staged: cumulative estimation-draw counts, comma-separated (default: n/100, n/10, n).
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<u64>,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    #[arg(long, default_value_t = 1)]
    pub skip: usize,
    #[arg(long)]
    pub max: Option<usize>,
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Arithmetic of the fused CPU path (see `caf bench forward --precision`).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: caf::models::Precision,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Noisy forward pass + argmax in eval mode: the certification inner loop.
    Forward(BenchForwardArgs),
    /// One training step (noisy batch, forward, cross-entropy, backward, optimizer update).
    TrainStep(BenchTrainArgs),
    /// Claim → complete throughput of trivial jobs through a store's job queue, and through
    /// the scheduler around it (writes two bench studies into --db: use a scratch database).
    Queue(BenchQueueArgs),
    /// Certification of a few test images: forward passes per image and images/s, Cohen's
    /// fixed n against sequential certification.
    Certify(BenchCertifyArgs),
    /// Decoding + preprocessing throughput of an image folder (ImageFolder layout), through the
    /// parallel prefetch the jobs use.
    Load(BenchLoadArgs),
    /// Drawing certification noise on the host (the seeded ChaCha stream every device's
    /// certificates use, one thread per stream): the rate a GPU's certification of one image
    /// cannot exceed.
    Noise(BenchNoiseArgs),
}

#[derive(Debug, Args)]
pub struct BenchNoiseArgs {
    /// Noisy copies per call (certify's `--batch`).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Side of the square RGB image (32: CIFAR-10; 224: ImageNet).
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchLoadArgs {
    /// Folder with `train/CLASS/*` and/or `val/CLASS/*`.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// Side of the centre crop.
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Shorter side after resizing (default: image_size / 0.875).
    #[arg(long)]
    pub resize: Option<usize>,
    /// Decoding threads (default: every core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Images per decoded batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Decode at most this many images (the first ones).
    #[arg(long)]
    pub max: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchQueueArgs {
    /// Database to bench: an SQLite file (a path or sqlite:PATH) or a PostgreSQL URL.
    #[arg(long)]
    pub db: PathBuf,
    /// Concurrent claim loops (and scheduler slots), all in this process.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// Jobs per phase.
    #[arg(long, default_value_t = 10000)]
    pub jobs: usize,
    /// Only the queue phase, without the scheduler around it.
    #[arg(long)]
    pub queue_only: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchCertifyArgs {
    #[arg(long, default_value = "resnet20")]
    pub arch: String,
    /// Weights (default: the akamaster file of the arch under ../shared/data/pretrained).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Folder holding `cifar-10-batches-bin`, or that folder itself.
    #[arg(long, default_value = "../shared/data/cifar10-jpeg")]
    pub data_root: PathBuf,
    #[arg(long, default_value_t = 0.25)]
    pub sigma: f64,
    /// Arithmetic of the fused CPU path (see `caf bench forward --precision`); a bf16 or int8
    /// certificate is one of that classifier.
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: caf::models::Precision,
    /// Test images 0, skip, 2·skip, … (`--images` of them).
    #[arg(long, default_value_t = 10)]
    pub images: usize,
    #[arg(long, default_value_t = 500)]
    pub skip: usize,
    #[arg(long, default_value_t = caf::certify::DEFAULT_N0)]
    pub n0: u64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_N)]
    pub n: u64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_ALPHA)]
    pub alpha: f64,
    #[arg(long, default_value_t = caf::certify::DEFAULT_BATCH)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub mode: CertifyModeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum BenchMethod {
    /// Adapter + head trained on a frozen backbone (Adam).
    Caf,
    /// The whole network trained (SGD).
    Rs,
    /// A DnCNN denoiser in front of the frozen backbone, stability objective (Adam).
    Denoised,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// cpu, or cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, value_enum)]
    pub method: BenchMethod,
    #[arg(long, default_value = "resnet20")]
    pub arch: String,
    /// Backbone weights (default: the akamaster file of the arch under ../shared/data/pretrained).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Adapter for `--method caf` (`default`, `resnet18:W`, `cnn:W:D`, …).
    #[arg(long, default_value = "default")]
    pub adapter: String,
    /// Denoiser for `--method denoised` (`dncnn` = 5 × 16, `dncnn-paper` = 17 × 64,
    /// `dncnn:DEPTH:WIDTH`).
    #[arg(long, default_value = "dncnn")]
    pub denoiser: String,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 0.25)]
    pub sigma: f32,
    #[arg(long)]
    pub json: bool,
}

fn parse_precision(s: &str) -> Result<caf::models::Precision, String> {
    s.parse()
}

#[derive(Debug, Args)]
pub struct BenchForwardArgs {
    #[arg(long, default_value = "resnet20")]
    pub arch: String,
    /// cpu, or cuda:N (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Weights (default: the akamaster file of the arch under ../shared/data/pretrained).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value_t = 400)]
    pub batch: usize,
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 0.25)]
    pub sigma: f32,
    /// Arithmetic of the fused CPU path: f32, bf16 (on AMX tiles or AVX-512 BF16 where the
    /// CPU has them), or int8 (CIFAR ResNets; AMX-INT8 or AVX-512 VNNI).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    pub precision: caf::models::Precision,
    #[arg(long)]
    pub json: bool,
}
