//! Training curves and a table per training job, to see whether a model converged before its
//! certificates are read.

use crate::report::data::StudyData;
use crate::report::plot::{self, LinePlot, Series};
use crate::report::tables::{Cell, Table};
use crate::report::{ReportError, Section};

pub(crate) fn training_section(study: &StudyData) -> Result<Option<Section>, ReportError> {
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
                points_only: false,
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
        sec.push_line(
            stem.into(),
            format!("{ylabel} per epoch, one line per training job."),
            &p,
        )?;
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
