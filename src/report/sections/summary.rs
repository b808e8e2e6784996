//! The main results table per σ, and the machine-readable CSVs scripts read instead of parsing
//! Markdown.

use std::fmt::Write as _;

use super::{diagonal, fmt_sigma};
use crate::report::data::{short_value, CertJob, StudyData};
use crate::report::stats;
use crate::report::tables::{self, Cell, Table};
use crate::report::Section;

/// The main table per σ plus the machine-readable CSVs the issue names.
pub(crate) fn summary_section(
    study: &StudyData,
    radii: &[f64],
) -> (Section, Vec<(String, String)>) {
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
            let seq = c.sequential_radii();
            r.push(Cell::text(match seq {
                // Draws vary per image: the mean used, and the budget.
                Some(_) => {
                    let mean =
                        c.rows.iter().map(|x| x.n as f64).sum::<f64>() / c.rows.len().max(1) as f64;
                    let n_max = c
                        .rows
                        .iter()
                        .find_map(|x| x.sequential.as_ref())
                        .map_or(0, |q| q.n_max);
                    format!("seq: mean {mean:.0} of ≤ {n_max}")
                }
                // Imported logs without counts have n = 0: unknown, not zero samples.
                None => c
                    .rows
                    .first()
                    .filter(|x| x.n > 0)
                    .map_or_else(|| "–".to_string(), |x| x.n.to_string()),
            }));
            for &rad in radii {
                let decided = seq.is_none_or(|s| s.contains(&rad));
                r.push(if c.rows.is_empty() || !decided {
                    Cell::missing()
                } else {
                    Cell::num(stats::certified_accuracy(&c.rows, rad), 3)
                });
            }
            r.push(if c.rows.is_empty() || seq.is_some() {
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
    if study.cert.iter().any(|c| c.sequential_radii().is_some()) {
        sec.notes.push(format!(
            "{} In the tables it has values only at its requested radii (– elsewhere, and for \
             ACR), and n shows the mean estimation draws it used and its budget n_max.",
            super::curves::SEQUENTIAL_NOTE
        ));
    }
    for c in &study.cert {
        let m = tables::csv_field(&c.method);
        // A sequential job: its own radii, and no ACR row (see the note).
        if let Some(seq) = c.sequential_radii() {
            for &rad in seq {
                let _ = writeln!(
                    acc_csv,
                    "{},{m},{},{rad},{},{}",
                    c.job,
                    c.sigma,
                    stats::certified_accuracy(&c.rows, rad),
                    c.rows.len()
                );
            }
            continue;
        }
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
