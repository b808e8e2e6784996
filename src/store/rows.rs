//! Rows → the store's plain types, once for every backend: the backends' queries select the
//! same columns under the same names and types (integers as BIGINT, times as double), so only
//! the SQL text differs between them.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    CertRow, JobState, JobStatus, SequentialRow, SlurmJob, StoreError, StudyId, StudyInfo,
    WorkerInfo, WorkerRow,
};
use crate::plan::{JobId, ProgressUnit};

/// A pending job is blocked when one of its deps failed or is itself blocked. The DAGs are
/// shallow, so a recursive CTE over the failed jobs is cheap (the same text in both dialects).
pub(crate) const BLOCKED_CTE: &str = "WITH RECURSIVE dead(id) AS (
        SELECT id FROM jobs WHERE status = 'failed'
        UNION
        SELECT d.job_id FROM job_deps d JOIN dead ON d.dep_id = dead.id
    )";

pub(crate) fn parse_state(s: &str) -> Result<JobState, StoreError> {
    JobState::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown job status `{s}`")))
}

fn get<'r, R, T>(row: &'r R, column: &str, context: &'static str) -> Result<T, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(column)
        .map_err(|source| StoreError::Query { context, source })
}

/// A job row of `study_jobs` (with the computed `blocked` as 0/1 and `work_seconds`).
pub(crate) fn job_status<'r, R>(row: &'r R) -> Result<JobStatus, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    Option<f64>: Decode<'r, R::Database> + Type<R::Database>,
{
    const C: &str = "reading a job row";
    let state: String = get(row, "status", C)?;
    let result = match get::<R, Option<String>>(row, "result", C)? {
        Some(text) => Some(
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("job result JSON: {e}")))?,
        ),
        None => None,
    };
    let unit: String = get(row, "unit", C)?;
    Ok(JobStatus {
        id: JobId::new(get::<R, String>(row, "id", C)?),
        kind: get(row, "kind", C)?,
        label: get(row, "label", C)?,
        state: parse_state(&state)?,
        blocked: get::<R, i64>(row, "blocked", C)? != 0,
        attempts: get::<R, i64>(row, "attempts", C)? as u32,
        max_attempts: get::<R, i64>(row, "max_attempts", C)? as u32,
        progress_done: get::<R, i64>(row, "progress_done", C)? as u64,
        progress_total: get::<R, i64>(row, "progress_total", C)? as u64,
        run_seconds: get(row, "run_seconds", C)?,
        work_seconds: get(row, "work_seconds", C)?,
        started_at: get(row, "started_at", C)?,
        finished_at: get(row, "finished_at", C)?,
        lease_owner: get(row, "lease_owner", C)?,
        interruptions: get::<R, i64>(row, "interruptions", C)? as u32,
        max_interruptions: get::<R, i64>(row, "max_interruptions", C)? as u32,
        ran_host: get(row, "ran_host", C)?,
        ran_cpu: get(row, "ran_cpu", C)?,
        ran_device: get(row, "ran_device", C)?,
        error: get(row, "error", C)?,
        result,
        precision: get(row, "precision", C)?,
        unit: ProgressUnit::parse(&unit)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown progress unit `{unit}`")))?,
    })
}

/// A row of `studies`.
pub(crate) fn study<'r, R>(row: &'r R) -> Result<StudyInfo, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const C: &str = "reading a study row";
    Ok(StudyInfo {
        id: StudyId(get(row, "id", C)?),
        name: get(row, "name", C)?,
        seed: get::<R, i64>(row, "seed", C)? as u64,
        spec_path: get(row, "spec_path", C)?,
        spec_sha256: get(row, "spec_sha256", C)?,
        spec_text: get(row, "spec_text", C)?,
    })
}

/// A job's compute seconds on its recorded per-image results, for `caf status`'s rate and time
/// left: the seconds of its own rows, or, for a job that records rows for the jobs waiting on
/// it (a fused certification writes its members'), of those rows (a fused certification splits
/// each image's time among its members' rows, so they add up to the shared pass). 0 for
/// training jobs, whose rate comes from their epochs. Valid in SQLite and PostgreSQL; `j` is the
/// job.
pub(crate) const WORK_SECONDS: &str = "CASE WHEN j.unit = 'epochs' THEN 0.0 ELSE COALESCE(
        (SELECT SUM(c.seconds) FROM cert_results c WHERE c.job_id = j.id),
        (SELECT SUM(c.seconds) FROM cert_results c
             JOIN job_deps d ON d.job_id = c.job_id WHERE d.dep_id = j.id),
        0.0) END";

/// The columns of `jobs` a claim sets and `study_jobs` reads beyond the original ones, for both
/// backends' SELECTs.
pub(crate) const RUN_COLUMNS: &str =
    "j.interruptions, j.max_interruptions, j.ran_host, j.ran_cpu, j.ran_device";

/// The columns [`worker`] reads.
pub(crate) const WORKER_COLUMNS: &str = "id, host, pid, cpu, device, slurm_job_id, \
     slurm_array_job_id, slurm_array_task_id, studies, started_at, last_seen, stopped_at";

/// A row of `workers` (its held jobs are filled in by the caller).
pub(crate) fn worker<'r, R>(row: &'r R) -> Result<WorkerRow, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    Option<f64>: Decode<'r, R::Database> + Type<R::Database>,
{
    const C: &str = "reading a worker row";
    let studies: Option<String> = get(row, "studies", C)?;
    let studies: Vec<i64> = match studies {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("worker studies JSON: {e}")))?,
        None => Vec::new(),
    };
    Ok(WorkerRow {
        id: get(row, "id", C)?,
        info: WorkerInfo {
            host: get(row, "host", C)?,
            pid: get::<R, i64>(row, "pid", C)? as u32,
            cpu: get::<R, Option<String>>(row, "cpu", C)?.unwrap_or_default(),
            device: get::<R, Option<String>>(row, "device", C)?.unwrap_or_default(),
            slurm_job_id: get(row, "slurm_job_id", C)?,
            slurm_array_job_id: get(row, "slurm_array_job_id", C)?,
            slurm_array_task_id: get(row, "slurm_array_task_id", C)?,
            studies: studies.into_iter().map(StudyId).collect(),
        },
        started_at: get(row, "started_at", C)?,
        last_seen: get(row, "last_seen", C)?,
        stopped_at: get(row, "stopped_at", C)?,
        jobs: Vec::new(),
    })
}

/// The studies of a worker as stored (a JSON array of study ids).
pub(crate) fn studies_json(info: &WorkerInfo) -> String {
    serde_json::to_string(&info.studies.iter().map(|s| s.0).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

/// Attaches to each worker the jobs it holds (`(job, lease_owner)` pairs of running jobs).
pub(crate) fn attach_jobs(workers: &mut [WorkerRow], held: Vec<(String, String)>) {
    for (job, owner) in held {
        if let Some(w) = workers.iter_mut().find(|w| w.id == owner) {
            w.jobs.push(JobId::new(job));
        }
    }
}

/// The sequential columns of a certification row as bound by both backends' INSERT, in the
/// order seq_n_max, seq_lower, seq_upper, seq_prior_a, seq_prior_b, seq_radii, seq_decisions,
/// stopped_wrong; all NULL (and stopped_wrong 0) for a Cohen row.
pub(crate) struct SeqBind {
    pub n_max: Option<i64>,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub prior_a: Option<f64>,
    pub prior_b: Option<f64>,
    pub radii: Option<String>,
    pub decisions: Option<String>,
    pub stopped_wrong: i64,
}

impl SeqBind {
    pub fn of(r: &CertRow) -> Self {
        match &r.sequential {
            None => SeqBind {
                n_max: None,
                lower: None,
                upper: None,
                prior_a: None,
                prior_b: None,
                radii: None,
                decisions: None,
                stopped_wrong: 0,
            },
            Some(q) => SeqBind {
                n_max: Some(q.n_max as i64),
                lower: Some(q.lower),
                upper: Some(q.upper),
                prior_a: Some(q.prior_a),
                prior_b: Some(q.prior_b),
                radii: serde_json::to_string(&q.radii).ok(),
                decisions: serde_json::to_string(&q.decisions).ok(),
                stopped_wrong: q.stopped_wrong as i64,
            },
        }
    }
}

/// A row of `slurm_jobs`.
pub(crate) fn slurm_job<'r, R>(row: &'r R) -> Result<SlurmJob, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
{
    const C: &str = "reading a Slurm job row";
    Ok(SlurmJob {
        job_id: get(row, "slurm_job_id", C)?,
        array_tasks: get::<R, i64>(row, "array_tasks", C)? as u64,
        script: get(row, "script", C)?,
        submitted_at: get(row, "submitted_at", C)?,
    })
}

/// A row of `cert_results` selected with every column under its own name.
pub(crate) fn cert_row<'r, R>(row: &'r R) -> Result<CertRow, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    f64: Decode<'r, R::Database> + Type<R::Database>,
    Option<f64>: Decode<'r, R::Database> + Type<R::Database>,
{
    const C: &str = "reading a certification row";
    let sequential = match get::<R, Option<i64>>(row, "seq_n_max", C)? {
        None => None,
        Some(n_max) => {
            let json = |column: &str| -> Result<String, StoreError> {
                get::<R, Option<String>>(row, column, C)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("{column} is NULL in a sequential row"))
                })
            };
            let num = |column: &str| -> Result<f64, StoreError> {
                get::<R, Option<f64>>(row, column, C)?.ok_or_else(|| {
                    StoreError::Corrupt(format!("{column} is NULL in a sequential row"))
                })
            };
            let corrupt =
                |e: serde_json::Error| StoreError::Corrupt(format!("sequential row JSON: {e}"));
            Some(SequentialRow {
                n_max: n_max as u64,
                lower: num("seq_lower")?,
                upper: num("seq_upper")?,
                prior_a: num("seq_prior_a")?,
                prior_b: num("seq_prior_b")?,
                radii: serde_json::from_str(&json("seq_radii")?).map_err(corrupt)?,
                decisions: serde_json::from_str(&json("seq_decisions")?).map_err(corrupt)?,
                stopped_wrong: get::<R, i64>(row, "stopped_wrong", C)? != 0,
            })
        }
    };
    Ok(CertRow {
        idx: get::<R, i64>(row, "idx", C)? as u64,
        label: get::<R, i64>(row, "label", C)? as u32,
        predict: get(row, "predict", C)?,
        radius: get(row, "radius", C)?,
        correct: get::<R, i64>(row, "correct", C)? != 0,
        c_hat: get::<R, i64>(row, "c_hat", C)? as u32,
        n_a: get::<R, i64>(row, "n_a", C)? as u64,
        n: get::<R, i64>(row, "n", C)? as u64,
        n0: get::<R, i64>(row, "n0", C)? as u64,
        alpha: get(row, "alpha", C)?,
        sigma: get(row, "sigma", C)?,
        seconds: get(row, "seconds", C)?,
        sequential,
    })
}
