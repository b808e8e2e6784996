//! The report's section builders, one file per section, and the few helpers they share (σ labels,
//! the diagonal jobs, legend names); `report` assembles their output into pages.

mod comparison;
mod curves;
mod ensemble;
mod reproducibility;
mod sensitivity;
mod summary;
mod training;

pub(crate) use comparison::comparison_section;
pub(crate) use curves::curves_section;
pub use curves::upper_envelope;
pub(crate) use ensemble::ensemble_section;
pub(crate) use reproducibility::reproducibility_section;
pub(crate) use sensitivity::sensitivity_section;
pub(crate) use summary::summary_section;
pub(crate) use training::training_section;

use crate::report::data::{CertJob, StudyData};
use crate::report::plot::{LinePlot, Series};
use crate::report::stats::PairedDiff;
use crate::report::tables::Cell;

/// The x-axis label of every certified-accuracy figure: σ and radii are in pixel units of
/// images scaled to [0, 1], the convention caf uses everywhere.
pub(super) const RADIUS_LABEL: &str = "ℓ2 radius (pixel units, images in [0,1])";
/// Seed of the paired bootstrap, fixed so a report is a function of the results.
pub(super) const BOOTSTRAP_SEED: u64 = 0x5eed;

pub(super) fn fmt_sigma(s: f64) -> String {
    format!("{s}")
}

/// Jobs that certify at the σ their model was trained for (ensemble off-diagonals are shown in
/// the ensemble section only).
pub(super) fn diagonal(study: &StudyData) -> impl Iterator<Item = &CertJob> {
    study
        .cert
        .iter()
        .filter(|c| c.trained_sigma.is_none_or(|t| t == c.sigma))
}

pub(super) fn job_name(c: &CertJob, swept: &[String]) -> String {
    let mut n = c.name(swept);
    if !c.complete() {
        // A job that has not started has no planned total yet; its rows may still exist (a
        // fused certification writes its members' rows before the members are marked done).
        n.push_str(&match c.planned {
            0 => format!(" [partial {} images, job pending]", c.rows.len()),
            planned => format!(" [partial {}/{planned}]", c.rows.len()),
        });
    }
    n
}

/// A certified-accuracy-vs-radius step plot.
pub(super) fn accuracy_plot(title: String, series: Vec<Series>) -> LinePlot {
    LinePlot {
        title,
        x_label: RADIUS_LABEL.into(),
        y_label: "certified accuracy".into(),
        series,
        step: true,
        x_range: None,
        y_range: Some((0.0, 1.0)),
        x_categories: None,
    }
}

/// σ, radius, images, both accuracies, Δ and its interval: the columns every paired table shares.
pub(super) fn diff_cells(sigma: f64, r: f64, d: &PairedDiff) -> [Cell; 8] {
    [
        Cell::text(fmt_sigma(sigma)),
        Cell::text(format!("{r}")),
        Cell::text(d.n_images.to_string()),
        Cell::num(d.acc_a, 3),
        Cell::num(d.acc_b, 3),
        Cell::num(d.diff, 3),
        Cell::num(d.ci_low, 3),
        Cell::num(d.ci_high, 3),
    ]
}

pub(super) fn format_p(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

pub(super) fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}
