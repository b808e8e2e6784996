//! What a reader needs to rerun or audit a study: the spec and its hash, the seed, the machine,
//! each certification job's settings, and the host, CPU and device that produced each job.

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
    let jobs_in = |precision: &str| -> Vec<String> {
        study
            .cert
            .iter()
            .filter(|c| c.precision == precision)
            .map(|c| c.job.to_string())
            .collect()
    };
    let bf16 = jobs_in("bf16");
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
    let int8 = jobs_in("int8");
    if !int8.is_empty() {
        sec.notes.push(format!(
            "{} certification job(s) ran the classifier in int8 ({}): every convolution's \
             weights quantised per output channel and its input per image (symmetric, 127 \
             steps each side, the image's own largest value), exact integer sums, f32 scaling, \
             bias, ReLU and pooling. Their certificates are exact for that int8 classifier, \
             which is the one that was evaluated; they are not certificates of the f32 network.",
            int8.len(),
            int8.join(", ")
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
                // From +0: an empty f64 sum is −0, which prints as "-0.0".
                Cell::num(c.rows.iter().fold(0.0, |s, r| s + r.seconds), 1),
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
    machines(study, &mut sec);
    sec.pre.push(study.study.spec_text.clone());
    sec
}

/// Which machine produced each finished job: floating-point training results differ between
/// CPU models (the same adapter trained on an AMD and an Intel machine certifies 0.35 vs 0.34
/// at r = 0), so a reader must be able to see which machine made which number.
fn machines(study: &StudyData, sec: &mut Section) {
    let ran: Vec<_> = study
        .jobs
        .iter()
        .filter(|j| j.ran_host.is_some() || j.ran_cpu.is_some())
        .collect();
    if ran.is_empty() {
        return;
    }
    let text = |v: &Option<String>| Cell::text(v.clone().unwrap_or_else(|| "?".into()));
    let rows = ran
        .iter()
        .map(|j| {
            vec![
                Cell::text(j.id.to_string()),
                Cell::text(j.kind.clone()),
                Cell::text(j.label.clone()),
                text(&j.ran_host),
                text(&j.ran_cpu),
                text(&j.ran_device),
                Cell::text(j.interruptions.to_string()),
            ]
        })
        .collect();
    let mut cpus: Vec<&str> = ran.iter().filter_map(|j| j.ran_cpu.as_deref()).collect();
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.len() > 1 {
        sec.notes.push(format!(
            "the jobs ran on {} CPU models ({}): floating-point training results differ between \
             CPU models, so compare numbers from different machines with that in mind.",
            cpus.len(),
            cpus.join("; ")
        ));
    }
    sec.tables.push((
        "machines".into(),
        Table {
            header: [
                "job",
                "kind",
                "label",
                "host",
                "CPU",
                "device",
                "interruptions",
            ]
            .map(String::from)
            .to_vec(),
            rows,
            best_columns: Vec::new(),
        },
    ));
}
