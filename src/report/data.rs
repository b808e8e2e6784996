//! What a report is made from, read from the store in one place: the study, its grid cells
//! with their result jobs and per-image results, and its training jobs' epoch metrics.

use std::collections::BTreeMap;

use crate::plan::JobId;
use crate::store::{CertRow, JobState, JobStatus, Store, StoreError, StudyInfo};

/// One certification job as a report sees it.
#[derive(Clone, Debug)]
pub struct CertJob {
    pub job: JobId,
    pub cell: usize,
    pub method: String,
    pub sigma: f64,
    pub trained_sigma: Option<f64>,
    /// The cell's parameters (method, backbone, hyperparameters…).
    pub values: BTreeMap<String, serde_json::Value>,
    pub state: JobState,
    /// Images planned for the job (its progress total; 0 when not started).
    pub planned: u64,
    pub rows: Vec<CertRow>,
    /// The arithmetic the classifier ran in, as the store records it (`f32` or `bf16`).
    pub precision: String,
}

impl CertJob {
    /// A job whose results are all in (a running or interrupted job's rows are a prefix).
    pub fn complete(&self) -> bool {
        self.state == JobState::Done
    }

    /// Whether every row carries the counts that let a reader recompute its certificate
    /// (imported logs without `nA`/`n` do not).
    pub fn recomputable(&self) -> bool {
        self.rows.iter().all(|r| r.n > 0)
    }

    /// The radii a sequential certification decided, from its rows; `None` for Cohen's
    /// fixed-n jobs (or a sequential one with no row yet). Its certified-accuracy curve is
    /// known at these radii only, and its ACR is not comparable with Cohen's: the radius at
    /// the stop is only as large as deciding the requested radii needed.
    pub fn sequential_radii(&self) -> Option<&[f64]> {
        self.rows
            .iter()
            .find_map(|r| r.sequential.as_ref())
            .map(|q| q.radii.as_slice())
    }

    /// The curve to draw: the step curve of Cohen's radii, or a sequential job's points at its
    /// radii (with `true`: draw them as markers only).
    pub fn curve(&self) -> (Vec<(f64, f64)>, bool) {
        match self.sequential_radii() {
            None => (crate::report::stats::curve(&self.rows), false),
            Some(radii) => (
                radii
                    .iter()
                    .map(|&r| (r, crate::report::stats::certified_accuracy(&self.rows, r)))
                    .collect(),
                true,
            ),
        }
    }

    /// A short name for legends and tables: the method plus the cell's swept values.
    pub fn name(&self, swept: &[String]) -> String {
        let mut s = self.method.clone();
        for k in swept {
            if let Some(v) = self.values.get(k) {
                s.push_str(&format!(" {k}={}", short_value(v)));
            }
        }
        if let Some(t) = self.trained_sigma.filter(|t| *t != self.sigma) {
            s.push_str(&format!(" (trained σ={t})"));
        }
        s
    }
}

/// A parameter value without JSON quotes.
pub fn short_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A training job with its per-epoch metrics.
#[derive(Clone, Debug)]
pub struct TrainJob {
    pub job: JobId,
    pub label: String,
    pub state: JobState,
    pub epochs: Vec<serde_json::Value>,
    pub run_seconds: f64,
}

#[derive(Clone, Debug)]
pub struct StudyData {
    pub study: StudyInfo,
    pub jobs: Vec<JobStatus>,
    pub cert: Vec<CertJob>,
    pub train: Vec<TrainJob>,
    /// Cell parameters that take more than one value among cells of the same method (the
    /// swept hyperparameters), excluding `method` and `sigma`. A union over methods: a key in it
    /// may exist for one method only, so a view across keys must stay within one method.
    pub swept: Vec<String>,
}

impl StudyData {
    pub async fn load<S: Store>(store: &S, study: StudyInfo) -> Result<Self, StoreError> {
        let jobs = store.study_jobs(study.id).await?;
        let cells = store.study_cells(study.id).await?;
        let mut rows: BTreeMap<JobId, Vec<CertRow>> = BTreeMap::new();
        for (job, row) in store.study_cert_results(study.id).await? {
            rows.entry(job).or_default().push(row);
        }
        let status: BTreeMap<&JobId, &JobStatus> = jobs.iter().map(|j| (&j.id, j)).collect();
        let mut cert = Vec::new();
        for c in cells.iter().filter(|c| c.kind == "certify") {
            let Some(sigma) = c.sigma else { continue };
            let st = status.get(&c.job);
            cert.push(CertJob {
                job: c.job.clone(),
                cell: c.cell,
                method: c.method.clone(),
                sigma,
                // Plans before caf recorded clean trainings as σ = 0.
                trained_sigma: c.trained_sigma.filter(|&t| t > 0.0),
                values: c.values.clone(),
                state: c.state,
                planned: st.map_or(0, |s| s.progress_total),
                rows: rows.get(&c.job).cloned().unwrap_or_default(),
                precision: st.map_or_else(|| "f32".to_string(), |s| s.precision.clone()),
            });
        }
        let mut train = Vec::new();
        for j in jobs.iter().filter(|j| j.is_training()) {
            train.push(TrainJob {
                job: j.id.clone(),
                label: j.label.clone(),
                state: j.state,
                epochs: store.epochs(&j.id).await?,
                run_seconds: j.run_seconds,
            });
        }
        let swept = swept_keys(&cert);
        Ok(StudyData {
            study,
            jobs,
            cert,
            train,
            swept,
        })
    }

    /// Whether any result of the study is still missing (a sweep in progress or interrupted).
    pub fn partial(&self) -> bool {
        self.jobs.iter().any(|j| j.state != JobState::Done)
    }

    /// Methods in first-appearance order.
    pub fn methods(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.cert {
            if !out.contains(&c.method) {
                out.push(c.method.clone());
            }
        }
        out
    }

    /// Certified σ values, ascending.
    pub fn sigmas(&self) -> Vec<f64> {
        let mut s: Vec<f64> = self.cert.iter().map(|c| c.sigma).collect();
        s.sort_by(f64::total_cmp);
        s.dedup();
        s
    }
}

pub(super) fn swept_keys(cert: &[CertJob]) -> Vec<String> {
    let mut values: BTreeMap<(&str, &str), Vec<&serde_json::Value>> = BTreeMap::new();
    for c in cert {
        for (k, v) in &c.values {
            if k == "method" || k == "sigma" {
                continue;
            }
            let seen = values.entry((c.method.as_str(), k.as_str())).or_default();
            if !seen.contains(&v) {
                seen.push(v);
            }
        }
    }
    let mut keys: Vec<String> = Vec::new();
    for ((_, k), vs) in values {
        if vs.len() > 1 && !keys.iter().any(|x| x == k) {
            keys.push(k.to_string());
        }
    }
    keys
}
