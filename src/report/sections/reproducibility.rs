//! What a reader needs to rerun or audit a study: the spec and its hash, the seed, the machine,
//! and each certification job's settings.

use super::fmt_sigma;
use crate::report::data::StudyData;
use crate::report::tables::{Cell, Table};
use crate::report::{Options, Section};

pub(crate) fn reproducibility_section(study: &StudyData, opts: &Options) -> Section {
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
