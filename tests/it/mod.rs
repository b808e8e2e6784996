mod util;

mod certify_cli;
mod layering;
mod postgres_cli;
mod report_cli;
mod resume;
mod sequential;
mod spec_cli;
mod train;
