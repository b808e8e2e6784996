mod util;

mod certify_cli;
mod copy_cli;
mod imagefolder;
mod layering;
mod onnx;
mod postgres_cli;
mod report_cli;
mod resume;
mod sequential;
mod slurm_cli;
mod spec_cli;
mod train;
mod vit;
mod worker_cli;
