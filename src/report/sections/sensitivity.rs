//! How much the swept hyperparameters matter: accuracy against each one, two-way heatmaps and the
//! spread over all configurations.

use super::{diagonal, fmt_sigma, slug};
use crate::report::data::{short_value, CertJob, StudyData};
use crate::report::plot::{self, Heatmap, LinePlot, Series};
use crate::report::stats;
use crate::report::tables::{Cell, Table};
use crate::report::{Fig, ReportError, Section};

pub(crate) fn sensitivity_section(
    study: &StudyData,
    radii: &[f64],
) -> Result<Option<Section>, ReportError> {
    if study.swept.is_empty() {
        return Ok(None);
    }
    let mut sec = Section::new("sensitivity", "Sensitivity to swept hyperparameters");
    sec.notes.push(
        "For each swept parameter: certified accuracy at each report radius against the \
         parameter's value, averaged over the other swept parameters (bars: min and max over \
         them). The spread table gives max − min over all configurations per radius: the size \
         of the effect of the whole sweep."
            .into(),
    );
    for sigma in study.sigmas() {
        let jobs: Vec<&CertJob> = diagonal(study)
            .filter(|c| c.sigma == sigma && !c.rows.is_empty())
            .collect();
        let swept: Vec<&String> = study
            .swept
            .iter()
            .filter(|k| jobs.iter().any(|c| c.values.contains_key(*k)))
            .collect();
        if jobs.len() < 2 || swept.is_empty() {
            continue;
        }
        for key in &swept {
            let mut values: Vec<&serde_json::Value> = Vec::new();
            for c in &jobs {
                if let Some(v) = c.values.get(*key) {
                    if !values.contains(&v) {
                        values.push(v);
                    }
                }
            }
            values.sort_by(|a, b| match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                _ => a.to_string().cmp(&b.to_string()),
            });
            let mut series = Vec::new();
            for (ri, &r) in radii.iter().enumerate() {
                let mut pts = Vec::new();
                let mut bars = Vec::new();
                for (xi, v) in values.iter().enumerate() {
                    let accs: Vec<f64> = jobs
                        .iter()
                        .filter(|c| c.values.get(*key) == Some(v))
                        .map(|c| stats::certified_accuracy(&c.rows, r))
                        .collect();
                    if accs.is_empty() {
                        continue;
                    }
                    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
                    let lo = accs.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = accs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    pts.push((xi as f64, mean));
                    bars.push((lo, hi));
                }
                series.push(Series {
                    name: format!("r = {r}"),
                    color: plot::palette(ri),
                    points: pts,
                    dashed: false,
                    error_bars: Some(bars),
                });
            }
            let p = LinePlot {
                title: format!("certified accuracy vs {key} (σ = {})", fmt_sigma(sigma)),
                x_label: (*key).clone(),
                y_label: "certified accuracy".into(),
                series,
                step: false,
                x_range: None,
                y_range: Some((0.0, 1.0)),
                x_categories: Some(values.iter().map(|v| short_value(v)).collect()),
            };
            sec.figures.push(Fig {
                stem: format!("sensitivity-{}-sigma-{}", slug(key), fmt_sigma(sigma)),
                caption: format!("Sensitivity to {key} at σ = {}.", fmt_sigma(sigma)),
                figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
            });
        }
        if swept.len() >= 2 {
            sec.figures
                .push(two_way_heatmap(&jobs, swept[0], swept[1], sigma)?);
        }
        let mut rows = Vec::new();
        for &r in radii {
            let accs: Vec<f64> = jobs
                .iter()
                .map(|c| stats::certified_accuracy(&c.rows, r))
                .collect();
            let lo = accs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = accs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            rows.push(vec![
                Cell::text(format!("{r}")),
                Cell::num(lo, 3),
                Cell::num(hi, 3),
                Cell::num(hi - lo, 3),
            ]);
        }
        let acrs: Vec<f64> = jobs.iter().map(|c| stats::acr(&c.rows)).collect();
        let lo = acrs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = acrs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        rows.push(vec![
            Cell::text("ACR"),
            Cell::num(lo, 3),
            Cell::num(hi, 3),
            Cell::num(hi - lo, 3),
        ]);
        sec.tables.push((
            format!(
                "spread over {} configurations, σ = {}",
                jobs.len(),
                fmt_sigma(sigma)
            ),
            Table {
                header: ["radius", "min", "max", "spread (max − min)"]
                    .map(String::from)
                    .to_vec(),
                rows,
                best_columns: Vec::new(),
            },
        ));
    }
    Ok(Some(sec))
}

fn two_way_heatmap(jobs: &[&CertJob], kx: &str, ky: &str, sigma: f64) -> Result<Fig, ReportError> {
    let distinct = |k: &str| {
        let mut v: Vec<serde_json::Value> = Vec::new();
        for c in jobs {
            if let Some(x) = c.values.get(k) {
                if !v.contains(x) {
                    v.push(x.clone());
                }
            }
        }
        v.sort_by(|a, b| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => a.to_string().cmp(&b.to_string()),
        });
        v
    };
    let (xs, ys) = (distinct(kx), distinct(ky));
    let values = ys
        .iter()
        .map(|y| {
            xs.iter()
                .map(|x| {
                    let acrs: Vec<f64> = jobs
                        .iter()
                        .filter(|c| c.values.get(kx) == Some(x) && c.values.get(ky) == Some(y))
                        .map(|c| stats::acr(&c.rows))
                        .collect();
                    (!acrs.is_empty()).then(|| acrs.iter().sum::<f64>() / acrs.len() as f64)
                })
                .collect()
        })
        .collect();
    let map = Heatmap {
        title: format!("ACR by {kx} × {ky} (σ = {})", fmt_sigma(sigma)),
        x_label: kx.into(),
        y_label: ky.into(),
        x_ticks: xs.iter().map(short_value).collect(),
        y_ticks: ys.iter().map(short_value).collect(),
        values,
        decimals: 3,
    };
    Ok(Fig {
        stem: format!(
            "heatmap-{}-{}-sigma-{}",
            slug(kx),
            slug(ky),
            fmt_sigma(sigma)
        ),
        caption: format!(
            "Average certified radius over the two first swept parameters, averaged over the \
             others, σ = {}.",
            fmt_sigma(sigma)
        ),
        figure: plot::render_heatmap(&map, plot::DEFAULT_SIZE)?,
    })
}
