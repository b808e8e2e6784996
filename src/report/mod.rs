//! Reports: certified-accuracy curves, tables at chosen radii, paired method comparisons,
//! sensitivity and ensemble views, training curves and a reproducibility block, written as
//! PNG/SVG figures, Markdown/CSV/LaTeX tables and one self-contained `index.html`.
//!
//! A report is a pure function of the store: it can be regenerated at any time, including while
//! a sweep runs (unfinished jobs are marked partial) and after a resume.

pub mod data;
mod html;
pub mod plot;
pub mod stats;
pub mod tables;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use data::{short_value, CertJob, StudyData};
use plot::{Figure, Heatmap, LinePlot, Series};
use stats::PairedDiff;
use tables::{Cell, Table};

/// The x-axis label of every certified-accuracy figure: σ and radii are in pixel units of
/// images scaled to [0, 1], the convention caf uses everywhere.
const RADIUS_LABEL: &str = "ℓ2 radius (pixel units, images in [0,1])";
/// Seed of the paired bootstrap, fixed so a report is a function of the results.
const BOOTSTRAP_SEED: u64 = 0x5eed;

#[derive(thiserror::Error, Debug)]
pub enum ReportError {
    #[error("writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    #[error("no certification results to report for study {0}")]
    Empty(String),
    #[error("studies {0} and {1} have no method, σ and parameters in common to compare")]
    NothingInCommon(String, String),
}

/// What to report and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// Radii of the tables (the spec's `report.radii`).
    pub radii: Vec<f64>,
    /// Method every other method is compared against; default: `denoised` if the study has
    /// it, else `smooth`.
    pub baseline: Option<String>,
    /// Facts about the run for the reproducibility block (version, git, machine).
    pub provenance: Vec<(String, String)>,
}

/// A figure kept for the HTML/Markdown pages.
struct Fig {
    /// File stem under `figures/`.
    stem: String,
    caption: String,
    figure: Figure,
}

/// One section of the report.
struct Section {
    id: String,
    title: String,
    /// Paragraphs of plain text (escaped when rendered).
    notes: Vec<String>,
    figures: Vec<Fig>,
    tables: Vec<(String, Table)>,
    /// Preformatted text blocks (spec text).
    pre: Vec<String>,
}

impl Section {
    fn new(id: &str, title: &str) -> Self {
        Section {
            id: id.into(),
            title: title.into(),
            notes: Vec::new(),
            figures: Vec::new(),
            tables: Vec::new(),
            pre: Vec::new(),
        }
    }
}

/// Files written by [`write`].
#[derive(Clone, Debug)]
pub struct Written {
    pub index: PathBuf,
    pub markdown: PathBuf,
    pub files: usize,
}

/// Builds every section and writes the report under `out`.
pub fn write(study: &StudyData, opts: &Options, out: &Path) -> Result<Written, ReportError> {
    if study.cert.iter().all(|c| c.rows.is_empty()) && study.train.is_empty() {
        return Err(ReportError::Empty(study.study.name.clone()));
    }
    let mut sections = Vec::new();
    sections.push(curves_section(study)?);
    let (summary, machine_tables) = summary_section(study, &opts.radii);
    sections.push(summary);
    if let Some(s) = comparison_section(study, opts)? {
        sections.push(s);
    }
    if let Some(s) = sensitivity_section(study, &opts.radii)? {
        sections.push(s);
    }
    if let Some(s) = ensemble_section(study, &opts.radii)? {
        sections.push(s);
    }
    if let Some(s) = training_section(study)? {
        sections.push(s);
    }
    sections.push(reproducibility_section(study, opts));

    let title = format!("caf report: {}", study.study.name);
    emit(
        &title,
        &status_line(study),
        study.partial(),
        &sections,
        machine_tables,
        out,
    )
}

/// Overlays two studies (e.g. before and after a code change): per σ, each method both have,
/// the first solid and the second dashed, and a paired table of differences per method, σ and
/// radius over the images both certified.
pub fn write_compare(
    a: &StudyData,
    b: &StudyData,
    opts: &Options,
    out: &Path,
) -> Result<Written, ReportError> {
    let (na, nb) = (&a.study.name, &b.study.name);
    let mut sec = Section::new("compare-studies", &format!("{na} vs {nb}"));
    sec.notes.push(format!(
        "Solid: {na}. Dashed: {nb}. Δ = {na} − {nb}, paired over the images both certified, \
         with a 95% paired-bootstrap interval ({} resamples) and McNemar's exact p.",
        stats::BOOTSTRAP_RESAMPLES
    ));
    let mut sigmas = a.sigmas();
    sigmas.extend(b.sigmas());
    sigmas.sort_by(f64::total_cmp);
    sigmas.dedup();
    let mut rows = Vec::new();
    for sigma in sigmas {
        let mut series = Vec::new();
        for ja in diagonal(a).filter(|c| c.sigma == sigma) {
            let Some(jb) = diagonal(b)
                .find(|c| c.sigma == sigma && c.method == ja.method && c.values == ja.values)
            else {
                continue;
            };
            let color = plot::method_color(&ja.method);
            for (j, dashed, who) in [(ja, false, na), (jb, true, nb)] {
                series.push(Series {
                    name: format!("{} [{who}]", job_name(j, &a.swept)),
                    color,
                    points: stats::curve(&j.rows),
                    dashed,
                    error_bars: None,
                });
            }
            for &r in &opts.radii {
                if let Some(d) = stats::paired(&ja.rows, &jb.rows, r, BOOTSTRAP_SEED) {
                    let mut row = vec![Cell::text(ja.name(&a.swept))];
                    row.extend(diff_cells(sigma, r, &d));
                    row.push(Cell::text(format_p(d.p_value)));
                    rows.push(row);
                }
            }
        }
        if series.is_empty() {
            continue;
        }
        let p = accuracy_plot(format!("{na} vs {nb}, σ = {}", fmt_sigma(sigma)), series);
        sec.figures.push(Fig {
            stem: format!("compare-studies-sigma-{}", fmt_sigma(sigma)),
            caption: format!("σ = {}: {na} solid, {nb} dashed.", fmt_sigma(sigma)),
            figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
        });
    }
    if rows.is_empty() {
        return Err(ReportError::NothingInCommon(na.clone(), nb.clone()));
    }
    sec.tables.push((
        "paired differences".into(),
        Table {
            header: [
                "job",
                "σ",
                "radius",
                "images",
                na.as_str(),
                nb.as_str(),
                "Δ",
                "95% CI low",
                "95% CI high",
                "McNemar p",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            best_columns: Vec::new(),
        },
    ));
    let sections = vec![
        sec,
        reproducibility_section(a, opts),
        reproducibility_section(b, opts),
    ];
    let title = format!("caf report: {na} vs {nb}");
    let status = format!("{} | {}", status_line(a), status_line(b));
    emit(
        &title,
        &status,
        a.partial() || b.partial(),
        &sections,
        Vec::new(),
        out,
    )
}

/// Writes figures, tables, index.html and report.md under `out`.
fn emit(
    title: &str,
    status: &str,
    partial: bool,
    sections: &[Section],
    machine_tables: Vec<(String, String)>,
    out: &Path,
) -> Result<Written, ReportError> {
    let mut files = 0;
    let fig_dir = out.join("figures");
    let tab_dir = out.join("tables");
    mkdir(&fig_dir)?;
    mkdir(&tab_dir)?;
    for s in sections {
        for f in &s.figures {
            write_file(
                &fig_dir.join(format!("{}.svg", f.stem)),
                f.figure.svg.as_bytes(),
            )?;
            write_file(&fig_dir.join(format!("{}.png", f.stem)), &f.figure.png)?;
            files += 2;
        }
        for (i, (_, t)) in s.tables.iter().enumerate() {
            let stem = format!("{}-{}", s.id, i + 1);
            write_file(&tab_dir.join(format!("{stem}.md")), t.markdown().as_bytes())?;
            write_file(&tab_dir.join(format!("{stem}.csv")), t.csv().as_bytes())?;
            write_file(&tab_dir.join(format!("{stem}.tex")), t.latex().as_bytes())?;
            files += 3;
        }
    }
    for (name, text) in machine_tables {
        write_file(&tab_dir.join(name), text.as_bytes())?;
        files += 1;
    }
    let index = out.join("index.html");
    write_file(
        &index,
        html::page(title, status, partial, sections).as_bytes(),
    )?;
    let markdown = out.join("report.md");
    write_file(&markdown, markdown_page(title, status, sections).as_bytes())?;
    Ok(Written {
        index,
        markdown,
        files: files + 2,
    })
}

fn mkdir(p: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(p).map_err(|source| ReportError::Io {
        path: p.to_path_buf(),
        source,
    })
}

fn write_file(p: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    crate::util::write_atomic(p, bytes).map_err(|source| ReportError::Io {
        path: p.to_path_buf(),
        source,
    })
}

fn status_line(study: &StudyData) -> String {
    let done = study
        .jobs
        .iter()
        .filter(|j| j.state == crate::store::JobState::Done)
        .count();
    let mut s = format!(
        "{done}/{} jobs done; spec sha256 {}",
        study.jobs.len(),
        &study.study.spec_sha256[..12.min(study.study.spec_sha256.len())]
    );
    if study.partial() {
        s.push_str(
            ". PARTIAL: some jobs have not finished; their rows cover only the images certified so far.",
        );
    }
    s
}

fn fmt_sigma(s: f64) -> String {
    format!("{s}")
}

/// Jobs that certify at the σ their model was trained for (ensemble off-diagonals are shown in
/// the ensemble section only).
fn diagonal(study: &StudyData) -> impl Iterator<Item = &CertJob> {
    study
        .cert
        .iter()
        .filter(|c| c.trained_sigma.is_none_or(|t| t == c.sigma))
}

fn job_name(c: &CertJob, swept: &[String]) -> String {
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

fn curves_section(study: &StudyData) -> Result<Section, ReportError> {
    let mut sec = Section::new("curves", "Certified accuracy vs radius");
    sec.notes.push(
        "Certified accuracy at radius r: the fraction of the certified test images whose smoothed \
         prediction is correct with certified radius ≥ r (Cohen et al. 2019). Abstentions and \
         wrong predictions never count. One panel per σ; the envelope takes, per method, the best \
         σ at each radius."
            .into(),
    );
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
            let pts = stats::curve(&c.rows);
            envelope
                .entry(c.method.clone())
                .or_default()
                .push(pts.clone());
            series.push(Series {
                name: job_name(c, &study.swept),
                color,
                points: pts,
                dashed: !c.complete(),
                error_bars: None,
            });
        }
        let p = accuracy_plot(
            format!("{}: σ = {}", study.study.name, fmt_sigma(sigma)),
            series,
        );
        sec.figures.push(Fig {
            stem: format!("curves-sigma-{}", fmt_sigma(sigma)),
            caption: format!("Certified accuracy at σ = {}.", fmt_sigma(sigma)),
            figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
        });
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
            })
            .collect();
        let p = accuracy_plot(
            format!("{}: best over σ per method", study.study.name),
            series,
        );
        sec.figures.push(Fig {
            stem: "curves-envelope".into(),
            caption: "Envelope: for each method, the maximum over its jobs (all σ) at each radius."
                .into(),
            figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
        });
    }
    Ok(sec)
}

/// A certified-accuracy-vs-radius step plot.
fn accuracy_plot(title: String, series: Vec<Series>) -> LinePlot {
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

/// The main table per σ plus the machine-readable CSVs the issue names.
fn summary_section(study: &StudyData, radii: &[f64]) -> (Section, Vec<(String, String)>) {
    let mut sec = Section::new("tables", "Certified accuracy at chosen radii");
    sec.notes.push(
        "Per σ, the best value of each column is in bold. ACR = average certified radius. \
         Images = test images certified; n = Monte Carlo samples of the estimation round \
         (n0 and α per job are in the reproducibility section). Full-precision CSV and LaTeX \
         (booktabs) copies are under tables/."
            .to_string(),
    );
    let mut acc_csv = String::from("job,method,sigma,radius,certified_accuracy,n_images\n");
    let mut acr_csv = String::from("job,method,sigma,acr,n_images\n");
    for sigma in study.sigmas() {
        let jobs: Vec<&CertJob> = diagonal(study).filter(|c| c.sigma == sigma).collect();
        if jobs.is_empty() {
            continue;
        }
        let mut header = vec!["method".to_string()];
        header.extend(study.swept.iter().cloned());
        header.extend(["images".to_string(), "n".into()]);
        let first_num = header.len();
        header.extend(radii.iter().map(|r| format!("r = {r}")));
        header.push("ACR".into());
        let mut rows = Vec::new();
        for c in &jobs {
            let mut r = vec![Cell::text(if c.complete() {
                c.method.clone()
            } else {
                format!("{} (partial)", c.method)
            })];
            for k in &study.swept {
                r.push(Cell::text(
                    c.values.get(k).map(short_value).unwrap_or_default(),
                ));
            }
            r.push(Cell::text(c.rows.len().to_string()));
            // Imported logs without counts have n = 0: unknown, not zero samples.
            r.push(Cell::text(
                c.rows
                    .first()
                    .filter(|x| x.n > 0)
                    .map_or_else(|| "–".to_string(), |x| x.n.to_string()),
            ));
            for &rad in radii {
                r.push(if c.rows.is_empty() {
                    Cell::missing()
                } else {
                    Cell::num(stats::certified_accuracy(&c.rows, rad), 3)
                });
            }
            r.push(if c.rows.is_empty() {
                Cell::missing()
            } else {
                Cell::num(stats::acr(&c.rows), 3)
            });
            rows.push(r);
        }
        let best_columns = (first_num..header.len()).collect();
        sec.tables.push((
            format!("σ = {}", fmt_sigma(sigma)),
            Table {
                header,
                rows,
                best_columns,
            },
        ));
    }
    for c in &study.cert {
        let m = tables::csv_field(&c.method);
        for &rad in radii {
            let _ = writeln!(
                acc_csv,
                "{},{m},{},{rad},{},{}",
                c.job,
                c.sigma,
                stats::certified_accuracy(&c.rows, rad),
                c.rows.len()
            );
        }
        let _ = writeln!(
            acr_csv,
            "{},{m},{},{},{}",
            c.job,
            c.sigma,
            stats::acr(&c.rows),
            c.rows.len()
        );
    }
    (
        sec,
        vec![
            ("certified_accuracy.csv".into(), acc_csv),
            ("acr.csv".into(), acr_csv),
        ],
    )
}

fn comparison_section(study: &StudyData, opts: &Options) -> Result<Option<Section>, ReportError> {
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
                for &r in &opts.radii {
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
            let mut series = vec![Series {
                name: job_name(base, &study.swept),
                color: plot::method_color(&baseline),
                points: stats::curve(&base.rows),
                dashed: true,
                error_bars: None,
            }];
            let methods: Vec<&str> = std::iter::once(baseline.as_str())
                .chain(others.iter().map(|o| o.method.as_str()))
                .collect();
            for (o, color) in others
                .iter()
                .zip(plot::figure_colors(&methods).into_iter().skip(1))
            {
                series.push(Series {
                    name: job_name(o, &study.swept),
                    color,
                    points: stats::curve(&o.rows),
                    dashed: false,
                    error_bars: None,
                });
            }
            let p = accuracy_plot(format!("vs {baseline}, σ = {}", fmt_sigma(sigma)), series);
            sec.figures.push(Fig {
                stem: format!("compare-sigma-{}", fmt_sigma(sigma)),
                caption: format!("Each method against {baseline} (dashed) at σ = {}.", sigma),
                figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
            });
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

/// σ, radius, images, both accuracies, Δ and its interval: the columns every paired table shares.
fn diff_cells(sigma: f64, r: f64, d: &PairedDiff) -> [Cell; 8] {
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

fn format_p(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

fn sensitivity_section(study: &StudyData, radii: &[f64]) -> Result<Option<Section>, ReportError> {
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

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
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

fn ensemble_section(study: &StudyData, radii: &[f64]) -> Result<Option<Section>, ReportError> {
    let members: Vec<&CertJob> = study
        .cert
        .iter()
        .filter(|c| c.trained_sigma.is_some())
        .collect();
    if !members.iter().any(|c| c.trained_sigma != Some(c.sigma)) {
        return Ok(None);
    }
    let mut sec = Section::new("ensemble", "Ensemble: adapters across noise levels");
    sec.notes.push(
        "Each adapter (row: the σ it was trained at) certified at every σ (column). The \
         ensemble uses the diagonal; the off-diagonal cells show what one adapter for all σ \
         would give."
            .into(),
    );
    let mut trained: Vec<f64> = members.iter().filter_map(|c| c.trained_sigma).collect();
    trained.sort_by(f64::total_cmp);
    trained.dedup();
    let mut at: Vec<f64> = members.iter().map(|c| c.sigma).collect();
    at.sort_by(f64::total_cmp);
    at.dedup();
    let find = |t: f64, s: f64| {
        members
            .iter()
            .find(|c| c.trained_sigma == Some(t) && c.sigma == s && !c.rows.is_empty())
    };
    let values = trained
        .iter()
        .map(|&t| {
            at.iter()
                .map(|&s| find(t, s).map(|c| stats::acr(&c.rows)))
                .collect()
        })
        .collect();
    let map = Heatmap {
        title: "ACR: adapter trained at σ (rows) certified at σ (columns)".into(),
        x_label: "certified at σ".into(),
        y_label: "trained at σ".into(),
        x_ticks: at.iter().map(|s| fmt_sigma(*s)).collect(),
        y_ticks: trained.iter().map(|s| fmt_sigma(*s)).collect(),
        values,
        decimals: 3,
    };
    sec.figures.push(Fig {
        stem: "ensemble-matrix".into(),
        caption: "Cross-σ matrix of average certified radius.".into(),
        figure: plot::render_heatmap(&map, plot::DEFAULT_SIZE)?,
    });
    let mut header = vec!["trained σ".to_string(), "certified σ".into()];
    let first = header.len();
    header.extend(radii.iter().map(|r| format!("r = {r}")));
    header.push("ACR".into());
    let mut rows = Vec::new();
    for &t in &trained {
        for &s in &at {
            let Some(c) = find(t, s) else { continue };
            let mut row = vec![Cell::text(fmt_sigma(t)), Cell::text(fmt_sigma(s))];
            for &r in radii {
                row.push(Cell::num(stats::certified_accuracy(&c.rows, r), 3));
            }
            row.push(Cell::num(stats::acr(&c.rows), 3));
            rows.push(row);
        }
    }
    sec.tables.push((
        "cross-σ certified accuracy".into(),
        Table {
            best_columns: (first..header.len()).collect(),
            header,
            rows,
        },
    ));
    Ok(Some(sec))
}

fn training_section(study: &StudyData) -> Result<Option<Section>, ReportError> {
    let jobs: Vec<_> = study
        .train
        .iter()
        .filter(|t| !t.epochs.is_empty())
        .collect();
    if jobs.is_empty() {
        return Ok(None);
    }
    let mut sec = Section::new("training", "Training curves");
    sec.notes.push(
        "Per epoch: training loss, and accuracy on noisy copies of the held-out validation split \
         (the last 5,000 training images by default; the test set is never used for selection)."
            .into(),
    );
    let metric = |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_f64());
    for (key, ylabel, stem) in [
        ("train_loss", "training loss", "training-loss"),
        ("val_acc", "noisy validation accuracy", "training-val-acc"),
    ] {
        let series: Vec<Series> = jobs
            .iter()
            .enumerate()
            .map(|(i, t)| Series {
                name: t.label.clone(),
                color: plot::palette(i),
                points: t
                    .epochs
                    .iter()
                    .enumerate()
                    .filter_map(|(ei, e)| {
                        let ep = metric(e, "epoch").unwrap_or(ei as f64);
                        metric(e, key).map(|v| (ep + 1.0, v))
                    })
                    .collect(),
                dashed: false,
                error_bars: None,
            })
            .collect();
        let p = LinePlot {
            title: ylabel.to_string(),
            x_label: "epoch".into(),
            y_label: ylabel.into(),
            series,
            step: false,
            x_range: None,
            y_range: None,
            x_categories: None,
        };
        sec.figures.push(Fig {
            stem: stem.into(),
            caption: format!("{ylabel} per epoch, one line per training job."),
            figure: plot::render_line(&p, plot::DEFAULT_SIZE)?,
        });
    }
    let rows = jobs
        .iter()
        .map(|t| {
            let last = t.epochs.last();
            let best = t
                .epochs
                .iter()
                .filter_map(|e| metric(e, "val_acc"))
                .fold(f64::NEG_INFINITY, f64::max);
            vec![
                Cell::text(t.job.to_string()),
                Cell::text(t.label.clone()),
                Cell::text(t.epochs.len().to_string()),
                last.and_then(|e| metric(e, "train_loss"))
                    .map_or(Cell::missing(), |v| Cell::num(v, 3)),
                Cell::num(best, 3),
                last.and_then(|e| metric(e, "images_per_sec"))
                    .map_or(Cell::missing(), |v| Cell::num(v, 0)),
                Cell::num(t.run_seconds / 60.0, 1),
            ]
        })
        .collect();
    sec.tables.push((
        "training jobs".into(),
        Table {
            header: [
                "job",
                "label",
                "epochs",
                "final loss",
                "best val acc",
                "images/s",
                "minutes",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            best_columns: Vec::new(),
        },
    ));
    Ok(Some(sec))
}

fn reproducibility_section(study: &StudyData, opts: &Options) -> Section {
    let mut sec = Section::new("reproducibility", "Reproducibility");
    let mut facts = vec![
        ("study".to_string(), study.study.name.clone()),
        ("spec".to_string(), study.study.spec_path.clone()),
        ("spec sha256".to_string(), study.study.spec_sha256.clone()),
        ("seed".to_string(), study.study.seed.to_string()),
    ];
    facts.extend(opts.provenance.iter().cloned());
    sec.tables.push((
        "run".into(),
        Table {
            header: vec!["".into(), "".into()],
            rows: facts
                .into_iter()
                .map(|(k, v)| vec![Cell::text(k), Cell::text(v)])
                .collect(),
            best_columns: Vec::new(),
        },
    ));
    let bf16: Vec<String> = study
        .cert
        .iter()
        .filter(|c| c.precision != "f32")
        .map(|c| c.job.to_string())
        .collect();
    if !bf16.is_empty() {
        sec.notes.push(format!(
            "{} certification job(s) ran the classifier in bf16 ({}): weights and activations \
             rounded to bf16 before every convolution, f32 accumulation. Their certificates \
             are exact for that bf16 classifier, which is the one that was evaluated; they are \
             not certificates of the f32 network.",
            bf16.len(),
            bf16.join(", ")
        ));
    }
    let rows = study
        .cert
        .iter()
        .map(|c| {
            let first = c.rows.first();
            vec![
                Cell::text(c.job.to_string()),
                Cell::text(c.method.clone()),
                Cell::text(fmt_sigma(c.sigma)),
                Cell::text(c.precision.clone()),
                Cell::text(format!("{:?}", c.state).to_lowercase()),
                Cell::text(c.rows.len().to_string()),
                Cell::text(first.map(|r| r.n0.to_string()).unwrap_or_default()),
                Cell::text(first.map(|r| r.n.to_string()).unwrap_or_default()),
                Cell::text(first.map(|r| r.alpha.to_string()).unwrap_or_default()),
                Cell::text(if c.recomputable() {
                    "yes"
                } else {
                    "no (no nA/n)"
                }),
                Cell::num(c.rows.iter().map(|r| r.seconds).sum::<f64>(), 1),
            ]
        })
        .collect();
    if study.cert.iter().any(|c| !c.rows.is_empty()) {
        // A certify job whose rows a fused certification wrote ran for no time itself; the
        // rows' own seconds are what certifying its images cost.
        sec.notes.push(
            "seconds: certification time summed over the job's images (a fused certification \
             splits each image's time evenly among the models it certified)."
                .into(),
        );
    }
    sec.tables.push((
        "certification jobs".into(),
        Table {
            header: [
                "job",
                "method",
                "σ",
                "precision",
                "state",
                "images",
                "n0",
                "n",
                "α",
                "recomputable",
                "seconds",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            best_columns: Vec::new(),
        },
    ));
    sec.pre.push(study.study.spec_text.clone());
    sec
}

fn markdown_page(title: &str, status: &str, sections: &[Section]) -> String {
    let mut out = format!("# {title}\n\n{status}\n\n");
    for s in sections {
        let _ = writeln!(out, "## {}\n", s.title);
        for n in &s.notes {
            let _ = writeln!(out, "{n}\n");
        }
        for f in &s.figures {
            let _ = writeln!(out, "![{}](figures/{}.png)\n", f.caption, f.stem);
        }
        for (name, t) in &s.tables {
            let _ = writeln!(out, "**{name}**\n\n{}", t.markdown());
        }
        for p in &s.pre {
            let _ = writeln!(out, "```yaml\n{}\n```\n", p.trim_end());
        }
    }
    out
}
