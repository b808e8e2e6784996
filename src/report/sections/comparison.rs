//! Every method against one baseline on the same images: paired differences with intervals, so
//! a gap can be told from test-set noise.

use super::{accuracy_plot, diagonal, diff_cells, fmt_sigma, format_p, job_name, BOOTSTRAP_SEED};
use crate::report::data::{short_value, CertJob, StudyData};
use crate::report::plot::{self, Series};
use crate::report::stats::{self, PairedDiff};
use crate::report::tables::{Cell, Table};
use crate::report::Options;
use crate::report::{ReportError, Section};

pub(crate) fn comparison_section(
    study: &StudyData,
    opts: &Options,
) -> Result<Option<Section>, ReportError> {
    let methods = study.methods();
    let baseline = match &opts.baseline {
        Some(b) => b.clone(),
        None if methods.iter().any(|m| m == "denoised") => "denoised".into(),
        None => "smooth".into(),
    };
    if !methods.contains(&baseline) || methods.len() < 2 {
        return Ok(None);
    }
    let mut sec = Section::new("compare", &format!("Paired comparison against {baseline}"));
    sec.notes.push(format!(
        "Both methods certify the same test images, so each difference is paired: Δ = certified \
         accuracy of the method minus that of {baseline} over the images both certified. The \
         interval is a 95% paired-bootstrap percentile interval ({} resamples of the images, seed \
         {BOOTSTRAP_SEED:#x}); the images' Monte Carlo outcomes are resampled with them, so it \
         covers test-set sampling and certification noise together. p is McNemar's exact \
         two-sided test on the discordant images (certified by one method only). With few \
         images, intervals are wide: a gap inside its interval is not evidence of a difference.",
        stats::BOOTSTRAP_RESAMPLES
    ));
    let mut header: Vec<String> = vec!["baseline".into(), "method".into()];
    header.extend(study.swept.iter().cloned());
    header.extend(
        [
            "σ",
            "radius",
            "images",
            "method acc",
            "baseline acc",
            "Δ",
            "95% CI low",
            "95% CI high",
            "only method",
            "only baseline",
            "McNemar p",
        ]
        .map(String::from),
    );
    let mut rows = Vec::new();
    for sigma in study.sigmas() {
        let bases: Vec<&CertJob> = diagonal(study)
            .filter(|c| c.sigma == sigma && c.method == baseline)
            .collect();
        let Some(&base) = bases.first() else {
            continue;
        };
        let others: Vec<&CertJob> = diagonal(study)
            .filter(|c| c.sigma == sigma && c.method != baseline)
            .collect();
        // Every method against every baseline configuration (e.g. each denoiser objective).
        for b in &bases {
            for other in &others {
                // A sequential job is known at its requested radii only: compare there.
                let radii: Vec<f64> = match (other.sequential_radii(), b.sequential_radii()) {
                    (None, None) => opts.radii.clone(),
                    (Some(s), None) | (None, Some(s)) => s.to_vec(),
                    (Some(s), Some(t)) => s.iter().copied().filter(|r| t.contains(r)).collect(),
                };
                for &r in &radii {
                    let Some(d) = stats::paired(&other.rows, &b.rows, r, BOOTSTRAP_SEED) else {
                        continue;
                    };
                    let mut row = diff_row(other, &study.swept, sigma, r, &d);
                    row.insert(0, Cell::text(b.name(&study.swept)));
                    rows.push(row);
                }
            }
        }
        if !others.is_empty() {
            let (points, points_only) = base.curve();
            let mut series = vec![Series {
                name: job_name(base, &study.swept),
                color: plot::method_color(&baseline),
                points,
                dashed: true,
                error_bars: None,
                points_only,
            }];
            let methods: Vec<&str> = std::iter::once(baseline.as_str())
                .chain(others.iter().map(|o| o.method.as_str()))
                .collect();
            for (o, color) in others
                .iter()
                .zip(plot::figure_colors(&methods).into_iter().skip(1))
            {
                let (points, points_only) = o.curve();
                series.push(Series {
                    name: job_name(o, &study.swept),
                    color,
                    points,
                    dashed: false,
                    error_bars: None,
                    points_only,
                });
            }
            let p = accuracy_plot(format!("vs {baseline}, σ = {}", fmt_sigma(sigma)), series);
            sec.push_line(
                format!("compare-sigma-{}", fmt_sigma(sigma)),
                format!("Each method against {baseline} (dashed) at σ = {}.", sigma),
                &p,
            )?;
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    sec.tables.push((
        "differences".into(),
        Table {
            header,
            rows,
            best_columns: Vec::new(),
        },
    ));
    Ok(Some(sec))
}

fn diff_row(other: &CertJob, swept: &[String], sigma: f64, r: f64, d: &PairedDiff) -> Vec<Cell> {
    let mut row = vec![Cell::text(other.method.clone())];
    for k in swept {
        row.push(Cell::text(
            other.values.get(k).map(short_value).unwrap_or_default(),
        ));
    }
    row.extend(diff_cells(sigma, r, d));
    row.extend([
        Cell::text(d.only_a.to_string()),
        Cell::text(d.only_b.to_string()),
        Cell::text(format_p(d.p_value)),
    ]);
    row
}
