//! How much the swept hyperparameters matter: accuracy against each one, two-way heatmaps and the
//! spread over all configurations, one set of views per method and σ.

use super::{diagonal, fmt_sigma, slug};
use crate::report::data::{short_value, CertJob, StudyData};
use crate::report::plot::{self, Heatmap, LinePlot, Series};
use crate::report::stats;
use crate::report::tables::{Cell, Table};
use crate::report::{ReportError, Section};

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
    let methods = study.methods();
    // `study.swept` is the union over methods: in a head-to-head, CAF's `base` and a denoiser's
    // `objective` are both in it although no job has both. Each view therefore covers one
    // method's jobs, and names the method when there are several to tell apart.
    let several = methods.len() > 1;
    if several {
        sec.notes.push(
            "Each view covers one method at one σ, over the parameters that vary among that \
             method's jobs there; parameters of different methods are never crossed, and \
             configurations of different methods are never pooled."
                .into(),
        );
    }
    for sigma in study.sigmas() {
        for method in &methods {
            let jobs: Vec<&CertJob> = diagonal(study)
                .filter(|c| c.sigma == sigma && &c.method == method && !c.rows.is_empty())
                .collect();
            let swept = varying(&study.swept, &jobs);
            if jobs.len() < 2 || swept.is_empty() {
                continue;
            }
            let view = View {
                method: several.then_some(method.as_str()),
                sigma,
            };
            method_views(&mut sec, &view, &jobs, &swept, radii)?;
        }
    }
    if sec.figures.is_empty() && sec.tables.is_empty() {
        return Ok(None);
    }
    Ok(Some(sec))
}

/// The candidate keys (in their order) that take at least two values among `jobs`: a key one
/// value or none cannot show an effect, and a key absent from these jobs belongs to another
/// method.
fn varying<'a>(keys: &'a [String], jobs: &[&CertJob]) -> Vec<&'a String> {
    keys.iter()
        .filter(|k| {
            let mut seen: Vec<&serde_json::Value> = Vec::new();
            for v in jobs.iter().filter_map(|c| c.values.get(*k)) {
                if !seen.contains(&v) {
                    seen.push(v);
                }
            }
            seen.len() > 1
        })
        .collect()
}

/// Whose jobs a set of views covers. `method` is None in a single-method study, whose figure
/// names and titles stay as they were before views were split by method.
struct View<'a> {
    method: Option<&'a str>,
    sigma: f64,
}

impl View<'_> {
    fn title(&self, what: String) -> String {
        match self.method {
            Some(m) => format!("{m}: {what}"),
            None => what,
        }
    }

    /// A figure's file stem: `kind-[method-]what-sigma-σ`.
    fn stem(&self, kind: &str, what: &str) -> String {
        let method = self.method.map(|m| format!("{}-", slug(m)));
        format!(
            "{kind}-{}{what}-sigma-{}",
            method.unwrap_or_default(),
            fmt_sigma(self.sigma)
        )
    }
}

/// Lines per swept key, the heatmap of the first two, and the spread table, for one method's
/// jobs at one σ.
fn method_views(
    sec: &mut Section,
    view: &View,
    jobs: &[&CertJob],
    swept: &[&String],
    radii: &[f64],
) -> Result<(), ReportError> {
    let sigma = view.sigma;
    for key in swept {
        let mut values: Vec<&serde_json::Value> = Vec::new();
        for c in jobs {
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
                points_only: false,
            });
        }
        let p = LinePlot {
            title: view.title(format!(
                "certified accuracy vs {key} (σ = {})",
                fmt_sigma(sigma)
            )),
            x_label: (*key).clone(),
            y_label: "certified accuracy".into(),
            series,
            step: false,
            x_range: None,
            y_range: Some((0.0, 1.0)),
            x_categories: Some(values.iter().map(|v| short_value(v)).collect()),
        };
        let caption = match view.method {
            Some(m) => format!("Sensitivity of {m} to {key} at σ = {}.", fmt_sigma(sigma)),
            None => format!("Sensitivity to {key} at σ = {}.", fmt_sigma(sigma)),
        };
        sec.push_line(view.stem("sensitivity", &slug(key)), caption, &p)?;
    }
    if swept.len() >= 2 {
        two_way_heatmap(sec, view, jobs, swept[0], swept[1])?;
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
        view.title(format!(
            "spread over {} configurations, σ = {}",
            jobs.len(),
            fmt_sigma(sigma)
        )),
        Table {
            header: ["radius", "min", "max", "spread (max − min)"]
                .map(String::from)
                .to_vec(),
            rows,
            best_columns: Vec::new(),
        },
    ));
    Ok(())
}

fn two_way_heatmap(
    sec: &mut Section,
    view: &View,
    jobs: &[&CertJob],
    kx: &str,
    ky: &str,
) -> Result<(), ReportError> {
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
    let sigma = fmt_sigma(view.sigma);
    let map = Heatmap {
        title: view.title(format!("ACR by {kx} × {ky} (σ = {sigma})")),
        x_label: kx.into(),
        y_label: ky.into(),
        x_ticks: xs.iter().map(short_value).collect(),
        y_ticks: ys.iter().map(short_value).collect(),
        values,
        decimals: 3,
    };
    let caption = match view.method {
        Some(m) => format!(
            "Average certified radius of {m} over its two first swept parameters, averaged over \
             the others, σ = {sigma}."
        ),
        None => format!(
            "Average certified radius over the two first swept parameters, averaged over the \
             others, σ = {sigma}."
        ),
    };
    sec.push_heatmap(
        view.stem("heatmap", &format!("{}-{}", slug(kx), slug(ky))),
        caption,
        &map,
    )
}
