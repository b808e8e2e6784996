//! Adapters certified at σ other than their own: whether one adapter per σ is worth training.

use super::fmt_sigma;
use crate::report::data::{CertJob, StudyData};
use crate::report::plot::Heatmap;
use crate::report::stats;
use crate::report::tables::{Cell, Table};
use crate::report::{ReportError, Section};

pub(crate) fn ensemble_section(
    study: &StudyData,
    radii: &[f64],
) -> Result<Option<Section>, ReportError> {
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
    sec.push_heatmap(
        "ensemble-matrix".into(),
        "Cross-σ matrix of average certified radius.".into(),
        &map,
    )?;
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
