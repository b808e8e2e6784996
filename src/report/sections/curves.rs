//! Certified accuracy against radius, one panel per σ plus the per-method envelope: the figure
//! every study has.

use std::collections::BTreeMap;

use super::{accuracy_plot, diagonal, fmt_sigma, job_name};
use crate::report::data::{CertJob, StudyData};
use crate::report::plot::{self, Series};
use crate::report::{ReportError, Section};

/// Why sequential jobs are drawn as points.
pub(crate) const SEQUENTIAL_NOTE: &str =
    "Sequential certification (markers without a line) decides only its requested radii: it \
     stops sampling as soon as each is certified or ruled out, so its accuracy is known at those \
     radii and nowhere between. It is left out of the envelope, and its ACR is not reported: the \
     radius at the stop is only as large as deciding the requested radii needed, so an average \
     of it is not comparable with Cohen's fixed-n radii.";

pub(crate) fn curves_section(study: &StudyData) -> Result<Section, ReportError> {
    let mut sec = Section::new("curves", "Certified accuracy vs radius");
    sec.notes.push(
        "Certified accuracy at radius r: the fraction of the certified test images whose smoothed \
         prediction is correct with certified radius ≥ r (Cohen et al. 2019). Abstentions and \
         wrong predictions never count. One panel per σ; the envelope takes, per method, the best \
         σ at each radius."
            .into(),
    );
    if study.cert.iter().any(|c| c.sequential_radii().is_some()) {
        sec.notes.push(SEQUENTIAL_NOTE.into());
    }
    let mut envelope: BTreeMap<String, Vec<Vec<(f64, f64)>>> = BTreeMap::new();
    for sigma in study.sigmas() {
        let jobs: Vec<&CertJob> = diagonal(study).filter(|c| c.sigma == sigma).collect();
        if jobs.is_empty() {
            continue;
        }
        let methods: Vec<&str> = jobs.iter().map(|c| c.method.as_str()).collect();
        let colors = plot::figure_colors(&methods);
        let mut series = Vec::new();
        for (c, color) in jobs.iter().zip(colors) {
            let (pts, points_only) = c.curve();
            if !points_only {
                envelope
                    .entry(c.method.clone())
                    .or_default()
                    .push(pts.clone());
            }
            series.push(Series {
                name: job_name(c, &study.swept),
                color,
                points: pts,
                dashed: !c.complete(),
                error_bars: None,
                points_only,
            });
        }
        let p = accuracy_plot(
            format!("{}: σ = {}", study.study.name, fmt_sigma(sigma)),
            series,
        );
        sec.push_line(
            format!("curves-sigma-{}", fmt_sigma(sigma)),
            format!("Certified accuracy at σ = {}.", fmt_sigma(sigma)),
            &p,
        )?;
    }
    if study.sigmas().len() > 1 {
        let series = envelope
            .iter()
            .map(|(m, curves)| Series {
                name: m.clone(),
                color: plot::method_color(m),
                points: upper_envelope(curves),
                dashed: false,
                error_bars: None,
                points_only: false,
            })
            .collect();
        let p = accuracy_plot(
            format!("{}: best over σ per method", study.study.name),
            series,
        );
        sec.push_line(
            "curves-envelope".into(),
            "Envelope: for each method, the maximum over its jobs (all σ) at each radius.".into(),
            &p,
        )?;
    }
    Ok(sec)
}

/// Pointwise maximum of step curves given by their corners (each constant until its next
/// corner, 0 after its last).
pub fn upper_envelope(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut xs: Vec<f64> = curves.iter().flatten().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let value_at = |c: &[(f64, f64)], x: f64| -> f64 {
        // The last corner at or before x.
        c.iter()
            .take_while(|p| p.0 <= x)
            .last()
            .map_or(0.0, |p| p.1)
    };
    xs.iter()
        .map(|&x| {
            let v = curves.iter().map(|c| value_at(c, x)).fold(0.0f64, f64::max);
            (x, v)
        })
        .collect()
}
