//! Reports: certified-accuracy curves, tables at chosen radii, paired method comparisons,
//! sensitivity and ensemble views, training curves and a reproducibility block, written as
//! PNG/SVG figures, Markdown/CSV/LaTeX tables and one self-contained `index.html`.
//!
//! A report is a pure function of the store: it can be regenerated at any time, including while
//! a sweep runs (unfinished jobs are marked partial) and after a resume.
//!
//! Each section is built in `sections`, its figures drawn by `plot`; this file assembles the
//! sections into the HTML and Markdown pages and writes the files.

pub mod data;
mod html;
pub mod plot;
mod sections;
pub mod stats;
pub mod tables;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use data::StudyData;
use plot::{Figure, Heatmap, LinePlot, Series};
pub use sections::upper_envelope;
use sections::{
    accuracy_plot, comparison_section, curves_section, diagonal, diff_cells, ensemble_section,
    fmt_sigma, format_p, job_name, reproducibility_section, sensitivity_section, summary_section,
    training_section, BOOTSTRAP_SEED,
};
use tables::{Cell, Table};

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

    /// Adds a line plot, unless it has no point to draw: a figure that only says "no data"
    /// tells the reader nothing, and among real figures it reads as a result.
    fn push_line(
        &mut self,
        stem: String,
        caption: String,
        p: &LinePlot,
    ) -> Result<(), ReportError> {
        if p.has_data() {
            let figure = plot::render_line(p, plot::DEFAULT_SIZE)?;
            self.figures.push(Fig {
                stem,
                caption,
                figure,
            });
        }
        Ok(())
    }

    /// Adds a heatmap unless every cell is empty, for the same reason as [`Section::push_line`].
    fn push_heatmap(
        &mut self,
        stem: String,
        caption: String,
        map: &Heatmap,
    ) -> Result<(), ReportError> {
        if map.has_data() {
            let figure = plot::render_heatmap(map, plot::DEFAULT_SIZE)?;
            self.figures.push(Fig {
                stem,
                caption,
                figure,
            });
        }
        Ok(())
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
                    points_only: false,
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
        sec.push_line(
            format!("compare-studies-sigma-{}", fmt_sigma(sigma)),
            format!("σ = {}: {na} solid, {nb} dashed.", fmt_sigma(sigma)),
            &p,
        )?;
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
