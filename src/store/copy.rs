//! Whole studies moved between databases (`caf db copy`): a sweep run on a cluster's PostgreSQL
//! reported on a laptop's SQLite file, or the other way round.
//!
//! A study is read into a [`StudyDump`] (every row that belongs to it: its revisions, job
//! lists and cells, its jobs with their dependencies, results of every kind, training metrics,
//! artifact records and events) as backend-neutral [`Value`]s, and written by the other backend
//! in one transaction. The table list below is the one place that knows which rows make a
//! study; both backends share it and the reading/writing code ([`backend_io!`]), and differ
//! only in their parameter syntax and how a write transaction starts.
//!
//! Identity: a study is its name (ids differ between databases and are remapped); a job is its
//! content-addressed id, so a job another study of the destination already holds is shared, not
//! copied twice. What must agree for a study or a shared job to count as "the same" is what
//! its reports show (states, per-image results, trained weights' hashes), not clocks, leases,
//! attempts or where files lie: a study already in the destination with the same content is
//! left alone (copying again changes nothing), and one with different content is refused.

use std::collections::{BTreeMap, BTreeSet};

use super::StoreError;

/// One value of a copied row, as both backends store it (integers as 64-bit, reals as double,
/// text, or NULL).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Value {
    fn text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// A total order and equality over values for comparing row sets (reals by their bits:
    /// copied values are the same bits).
    fn key(&self) -> String {
        match self {
            Value::Null => "∅".into(),
            Value::Int(i) => format!("i{i}"),
            Value::Real(r) => format!("r{:016x}", r.to_bits()),
            Value::Text(s) => format!("t{s}"),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r}"),
            Value::Text(s) if s.chars().count() > 60 => {
                let short: String = s.chars().take(57).collect();
                write!(f, "`{short}…`")
            }
            Value::Text(s) => write!(f, "`{s}`"),
        }
    }
}

/// A column's storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    Int,
    Real,
    Text,
}

/// Which rows of a table belong to what is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `studies` itself: the row whose id is the parameter.
    StudyRow,
    /// Rows whose `study_id` is the parameter.
    Study,
    /// Rows of the study's jobs (those its revisions list, and their dependencies); `column`
    /// names the job id.
    StudyJobs { column: &'static str },
    /// Rows of one job, named by the parameter (a destination's copy of a shared job).
    Job { column: &'static str },
}

/// A table that holds part of a study.
pub(crate) struct Table {
    pub name: &'static str,
    /// Every copied column, in order (ids a database assigns itself are left out).
    pub cols: &'static [(&'static str, Ty)],
    /// Columns that differ between two honest copies of the same results (clocks, leases,
    /// attempts, paths, logs) and so are not compared.
    pub uncompared: &'static [&'static str],
    /// Row order (stable output, and events in the order they happened).
    pub order: &'static str,
    /// True for the tables that belong to one job (and so are shared with other studies).
    pub per_job: bool,
}

use Ty::{Int, Real, Text};

pub(crate) const STUDIES: Table = Table {
    name: "studies",
    cols: &[
        ("name", Text),
        ("spec_path", Text),
        ("spec_text", Text),
        ("spec_sha256", Text),
        ("seed", Int),
        ("created_at", Real),
        ("updated_at", Real),
    ],
    uncompared: &["spec_path", "created_at", "updated_at"],
    order: "id",
    per_job: false,
};

pub(crate) const JOBS: Table = Table {
    name: "jobs",
    cols: &[
        ("id", Text),
        ("kind", Text),
        ("label", Text),
        ("params", Text),
        ("status", Text),
        ("attempts", Int),
        ("max_attempts", Int),
        ("not_before", Real),
        ("lease_owner", Text),
        ("lease_expires", Real),
        ("progress_done", Int),
        ("progress_total", Int),
        ("result", Text),
        ("error", Text),
        ("created_at", Real),
        ("started_at", Real),
        ("finished_at", Real),
        ("run_seconds", Real),
        ("unit", Text),
        ("external", Int),
        ("interruptions", Int),
        ("max_interruptions", Int),
        ("ran_host", Text),
        ("ran_cpu", Text),
        ("ran_device", Text),
    ],
    // The machine that ran a job is provenance, not content: the same results may come from
    // two machines (a job shared by two studies, run once on each cluster).
    uncompared: &[
        "label",
        "attempts",
        "max_attempts",
        "interruptions",
        "max_interruptions",
        "ran_host",
        "ran_cpu",
        "ran_device",
        "not_before",
        "lease_owner",
        "lease_expires",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "run_seconds",
    ],
    order: "id",
    per_job: true,
};

/// Every table of a study after `studies`, in an order that satisfies the foreign keys.
pub(crate) const TABLES: &[Table] = &[
    Table {
        name: "study_revisions",
        cols: &[
            ("study_id", Int),
            ("spec_sha256", Text),
            ("spec_text", Text),
            ("created_at", Real),
        ],
        uncompared: &["created_at"],
        order: "spec_sha256",
        per_job: false,
    },
    JOBS,
    Table {
        name: "job_deps",
        cols: &[("job_id", Text), ("dep_id", Text)],
        uncompared: &[],
        order: "job_id, dep_id",
        per_job: true,
    },
    Table {
        name: "study_jobs",
        cols: &[
            ("study_id", Int),
            ("job_id", Text),
            ("spec_sha256", Text),
            ("seq", Int),
            ("label", Text),
        ],
        uncompared: &[],
        order: "spec_sha256, seq",
        per_job: false,
    },
    Table {
        name: "study_cells",
        cols: &[
            ("study_id", Int),
            ("spec_sha256", Text),
            ("cell", Int),
            ("job_id", Text),
            ("method", Text),
            ("kind", Text),
            ("sigma", Real),
            ("trained_sigma", Real),
            ("params", Text),
        ],
        uncompared: &[],
        order: "spec_sha256, cell, job_id",
        per_job: false,
    },
    Table {
        name: "cert_results",
        cols: &[
            ("job_id", Text),
            ("idx", Int),
            ("label", Int),
            ("predict", Int),
            ("radius", Real),
            ("correct", Int),
            ("c_hat", Int),
            ("n_a", Int),
            ("n", Int),
            ("n0", Int),
            ("alpha", Real),
            ("sigma", Real),
            ("seconds", Real),
            ("seq_n_max", Int),
            ("seq_lower", Real),
            ("seq_upper", Real),
            ("seq_prior_a", Real),
            ("seq_prior_b", Real),
            ("seq_radii", Text),
            ("seq_decisions", Text),
            ("stopped_wrong", Int),
        ],
        uncompared: &["seconds"],
        order: "job_id, idx",
        per_job: true,
    },
    Table {
        name: "eval_results",
        cols: &[
            ("job_id", Text),
            ("idx", Int),
            ("label", Int),
            ("predict", Int),
            ("correct", Int),
        ],
        uncompared: &[],
        order: "job_id, idx",
        per_job: true,
    },
    Table {
        name: "train_metrics",
        cols: &[
            ("job_id", Text),
            ("epoch", Int),
            ("metrics", Text),
            ("at", Real),
        ],
        // Metrics hold throughput; the trained weights' hash (artifacts) is what must agree.
        uncompared: &["metrics", "at"],
        order: "job_id, epoch",
        per_job: true,
    },
    Table {
        name: "artifacts",
        cols: &[
            ("job_id", Text),
            ("name", Text),
            ("path", Text),
            ("sha256", Text),
            ("bytes", Int),
            ("created_at", Real),
        ],
        uncompared: &["path", "created_at"],
        order: "job_id, name",
        per_job: true,
    },
    Table {
        name: "events",
        cols: &[
            ("at", Real),
            ("job_id", Text),
            ("worker", Text),
            ("level", Text),
            ("message", Text),
        ],
        uncompared: &["at", "job_id", "worker", "level", "message"],
        order: "id",
        per_job: true,
    },
    Table {
        name: "slurm_jobs",
        cols: &[
            ("study_id", Int),
            ("slurm_job_id", Text),
            ("array_tasks", Int),
            ("script", Text),
            ("submitted_at", Real),
        ],
        // Which cluster jobs ran a study is history, not results.
        uncompared: &["slurm_job_id", "array_tasks", "script", "submitted_at"],
        order: "submitted_at, slurm_job_id",
        per_job: false,
    },
];

/// Tables of a database that belong to no study (or to sqlx), and the columns of study tables
/// a database assigns itself: what a copy leaves behind on purpose.
#[cfg(test)]
pub(crate) const NOT_COPIED: &[&str] = &[
    "_sqlx_migrations",
    "sqlite_sequence",
    "workers",
    "studies.id",
    "events.id",
    // Derived from the job's status by triggers (migration 10) wherever a row is written.
    "study_jobs.open",
];

/// Every row of one study, backend-neutral. `tables` holds the rows of [`TABLES`] by name.
#[derive(Clone, Debug, PartialEq)]
pub struct StudyDump {
    /// The `studies` row ([`STUDIES`] columns).
    pub study: Vec<Value>,
    pub tables: BTreeMap<&'static str, Vec<Vec<Value>>>,
    /// Jobs that were running when the study was read, released in the dump.
    pub released: usize,
}

impl StudyDump {
    pub fn name(&self) -> &str {
        self.study.first().and_then(Value::text).unwrap_or("")
    }

    /// The job ids the study holds.
    pub fn jobs(&self) -> Vec<String> {
        self.rows("jobs")
            .iter()
            .filter_map(|r| r.first().and_then(Value::text).map(str::to_string))
            .collect()
    }

    pub fn rows(&self, table: &str) -> &[Vec<Value>] {
        self.tables.get(table).map_or(&[], Vec::as_slice)
    }

    /// Rows over all tables (the study's own row included).
    pub fn row_count(&self) -> usize {
        1 + self.tables.values().map(Vec::len).sum::<usize>()
    }

    /// A job that was running when the study was read is copied as its lease's release would
    /// leave it: pending, the attempt handed back. Nobody in the destination holds that lease,
    /// and a lease that merely expired there would cost the job an attempt.
    pub(crate) fn release_running(&mut self) {
        let col = |name: &str| JOBS.cols.iter().position(|(c, _)| *c == name);
        let (Some(status), Some(attempts), Some(owner), Some(expires)) = (
            col("status"),
            col("attempts"),
            col("lease_owner"),
            col("lease_expires"),
        ) else {
            return;
        };
        let mut released = 0;
        for row in self.tables.entry("jobs").or_default() {
            if row[status] == Value::Text("running".into()) {
                row[status] = Value::Text("pending".into());
                if let Value::Int(a) = row[attempts] {
                    row[attempts] = Value::Int((a - 1).max(0));
                }
                row[owner] = Value::Null;
                row[expires] = Value::Null;
                released += 1;
            }
        }
        self.released += released;
    }

    /// The study's content minus one job's rows: for comparing a job the destination already
    /// holds with the source's.
    pub(crate) fn only_job(&self, job: &str) -> StudyDump {
        let mut tables = BTreeMap::new();
        for t in TABLES.iter().filter(|t| t.per_job) {
            let at = job_column(t);
            let rows: Vec<Vec<Value>> = self
                .rows(t.name)
                .iter()
                .filter(|r| r.get(at).and_then(Value::text) == Some(job))
                .cloned()
                .collect();
            tables.insert(t.name, rows);
        }
        StudyDump {
            study: self.study.clone(),
            tables,
            released: 0,
        }
    }
}

/// Where a per-job table holds its job id.
pub(crate) fn job_column(t: &Table) -> usize {
    let name = if t.name == "jobs" { "id" } else { "job_id" };
    t.cols.iter().position(|(c, _)| *c == name).unwrap_or(0)
}

/// What a copy did with one study.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Written to the destination: its jobs (`shared` of them were there already, with the same
    /// results) and `rows` rows in all.
    Copied {
        jobs: usize,
        shared: usize,
        rows: usize,
        /// Jobs that were running in the source, copied as pending.
        released: usize,
    },
    /// The destination already held the study with the same content; nothing was written.
    Identical,
}

/// The first way `dst` differs from `src` in what its reports show, or `None`. `tables` limits
/// the comparison (the per-job ones, for a shared job).
pub(crate) fn first_difference(
    src: &StudyDump,
    dst: &StudyDump,
    study_too: bool,
) -> Option<String> {
    if study_too {
        if let Some(d) = row_difference(
            &STUDIES,
            std::slice::from_ref(&src.study),
            std::slice::from_ref(&dst.study),
        ) {
            return Some(d);
        }
    }
    for t in TABLES {
        if !study_too && !t.per_job {
            continue;
        }
        if let Some(d) = row_difference(t, src.rows(t.name), dst.rows(t.name)) {
            return Some(d);
        }
    }
    None
}

/// Compares two row sets on the compared columns (and never on `study_id`, which each
/// database assigns).
fn row_difference(t: &Table, src: &[Vec<Value>], dst: &[Vec<Value>]) -> Option<String> {
    let compared: Vec<usize> = t
        .cols
        .iter()
        .enumerate()
        .filter(|(_, (c, _))| *c != "study_id" && !t.uncompared.contains(c))
        .map(|(i, _)| i)
        .collect();
    if compared.is_empty() {
        return None;
    }
    let project = |rows: &[Vec<Value>]| -> BTreeMap<String, Vec<Value>> {
        rows.iter()
            .map(|r| {
                let vals: Vec<Value> = compared.iter().map(|&i| r[i].clone()).collect();
                (
                    vals.iter()
                        .map(Value::key)
                        .collect::<Vec<_>>()
                        .join("\u{1f}"),
                    vals,
                )
            })
            .collect()
    };
    let (a, b) = (project(src), project(dst));
    if a.len() == b.len() && a.keys().eq(b.keys()) {
        return None;
    }
    let names: Vec<&str> = compared.iter().map(|&i| t.cols[i].0).collect();
    let show = |vals: &[Value]| -> String {
        names
            .iter()
            .zip(vals)
            .map(|(n, v)| format!("{n} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let only_src: BTreeSet<&String> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_dst: BTreeSet<&String> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    Some(match (only_src.first(), only_dst.first()) {
        (Some(s), Some(d)) => format!(
            "{}: the source has ({}) where the destination has ({})",
            t.name,
            show(&a[*s]),
            show(&b[*d])
        ),
        (Some(s), None) => format!(
            "{}: the destination lacks ({}) ({} rows here, {} there)",
            t.name,
            show(&a[*s]),
            a.len(),
            b.len()
        ),
        (None, Some(d)) => format!(
            "{}: the destination also has ({}) ({} rows there, {} in the source)",
            t.name,
            show(&b[*d]),
            b.len(),
            a.len()
        ),
        (None, None) => format!("{}: {} rows differ", t.name, a.len().abs_diff(b.len())),
    })
}

/// The `SELECT` of one table's rows in `scope`, with `ph(1)` as its one parameter.
pub(crate) fn select_sql(t: &Table, scope: Scope, ph: &dyn Fn(usize) -> String) -> String {
    let cols: Vec<&str> = t.cols.iter().map(|(c, _)| *c).collect();
    let p = ph(1);
    let filter = match scope {
        Scope::StudyRow => format!("id = {p}"),
        Scope::Study => format!("study_id = {p}"),
        Scope::StudyJobs { column } => format!(
            "{column} IN (SELECT job_id FROM study_jobs WHERE study_id = {p}
                          UNION SELECT d.dep_id FROM job_deps d JOIN study_jobs sj ON sj.job_id = d.job_id
                          WHERE sj.study_id = {p})"
        ),
        Scope::Job { column } => format!("{column} = {p}"),
    };
    format!(
        "SELECT {} FROM {} WHERE {filter} ORDER BY {}",
        cols.join(", "),
        t.name,
        t.order
    )
}

/// How a table's rows are read for a study.
pub(crate) fn study_scope(t: &Table) -> Scope {
    if t.name == "jobs" {
        Scope::StudyJobs { column: "id" }
    } else if t.per_job {
        Scope::StudyJobs { column: "job_id" }
    } else {
        Scope::Study
    }
}

/// How a per-job table's rows of one job are read.
pub(crate) fn job_scope(t: &Table) -> Scope {
    Scope::Job {
        column: if t.name == "jobs" { "id" } else { "job_id" },
    }
}

/// A multi-row `INSERT` of `rows` rows into `t`.
pub(crate) fn insert_sql(t: &Table, rows: usize, ph: &dyn Fn(usize) -> String) -> String {
    let cols: Vec<&str> = t.cols.iter().map(|(c, _)| *c).collect();
    let n = cols.len();
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let p: Vec<String> = (0..n).map(|c| ph(r * n + c + 1)).collect();
            format!("({})", p.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES {}",
        t.name,
        cols.join(", "),
        values.join(", ")
    )
}

/// Rows per `INSERT`: well under both backends' limits on bound parameters.
pub(crate) fn chunk_rows(t: &Table) -> usize {
    (4000 / t.cols.len()).max(1)
}

/// The study a copy would overwrite.
pub(crate) fn conflict(name: &str, what: &str) -> StoreError {
    StoreError::Conflict(format!(
        "study `{name}` already exists in the destination with different content ({what}); \
         nothing was copied. Copy into another database, or remove the study there first"
    ))
}

/// A job the destination holds (for another study) with different results.
pub(crate) fn job_conflict(name: &str, job: &str, what: &str) -> StoreError {
    StoreError::Conflict(format!(
        "job {job} of study `{name}` already exists in the destination with different \
         results ({what}); nothing was copied"
    ))
}

/// Reading and writing [`StudyDump`]s on one sqlx backend; expanded once per backend so the
/// same code runs on both without sqlx's generic executor bounds. `$ph` maps a 1-based
/// parameter number to the backend's syntax.
macro_rules! backend_io {
    ($db:ty, $conn:ty, $ph:expr) => {
        use sqlx::{AssertSqlSafe, Row};

        use $crate::store::copy::{
            self, chunk_rows, first_difference, insert_sql, job_scope, select_sql, study_scope,
            CopyOutcome, Scope, StudyDump, Table, Ty, Value, STUDIES, TABLES,
        };
        use $crate::store::{QueryContext, StoreError};

        fn ph(i: usize) -> String {
            ($ph)(i)
        }

        fn decode(
            row: &<$db as sqlx::Database>::Row,
            i: usize,
            ty: Ty,
        ) -> Result<Value, sqlx::Error> {
            Ok(match ty {
                Ty::Int => row
                    .try_get::<Option<i64>, _>(i)?
                    .map_or(Value::Null, Value::Int),
                Ty::Real => row
                    .try_get::<Option<f64>, _>(i)?
                    .map_or(Value::Null, Value::Real),
                Ty::Text => row
                    .try_get::<Option<String>, _>(i)?
                    .map_or(Value::Null, Value::Text),
            })
        }

        /// The rows of `t` in `scope` for parameter `param`.
        async fn fetch(
            conn: &mut $conn,
            t: &Table,
            scope: Scope,
            param: &Value,
        ) -> Result<Vec<Vec<Value>>, StoreError> {
            let sql = select_sql(t, scope, &ph);
            let q = sqlx::query(AssertSqlSafe(sql));
            let q = match param {
                Value::Int(i) => q.bind(*i),
                Value::Text(s) => q.bind(s.clone()),
                Value::Real(r) => q.bind(*r),
                Value::Null => q.bind(None::<i64>),
            };
            let rows = q
                .fetch_all(&mut *conn)
                .await
                .ctx("reading a study to copy")?;
            rows.iter()
                .map(|r| {
                    t.cols
                        .iter()
                        .enumerate()
                        .map(|(i, (_, ty))| decode(r, i, *ty))
                        .collect::<Result<Vec<Value>, _>>()
                        .map_err(|source| StoreError::Query {
                            context: "reading a row to copy",
                            source,
                        })
                })
                .collect()
        }

        /// Inserts `rows` into `t`, with `study_id` (where `t` has one) set to `study`.
        async fn insert(
            conn: &mut $conn,
            t: &Table,
            rows: &[Vec<Value>],
            study: i64,
        ) -> Result<(), StoreError> {
            let study_col = t.cols.iter().position(|(c, _)| *c == "study_id");
            for chunk in rows.chunks(chunk_rows(t)) {
                let mut q = sqlx::query(AssertSqlSafe(insert_sql(t, chunk.len(), &ph)));
                for row in chunk {
                    for (i, ((_, ty), v)) in t.cols.iter().zip(row).enumerate() {
                        q = if Some(i) == study_col {
                            q.bind(study)
                        } else {
                            match (v, ty) {
                                (Value::Int(x), _) => q.bind(*x),
                                (Value::Real(x), _) => q.bind(*x),
                                (Value::Text(x), _) => q.bind(x.clone()),
                                (Value::Null, Ty::Int) => q.bind(None::<i64>),
                                (Value::Null, Ty::Real) => q.bind(None::<f64>),
                                (Value::Null, Ty::Text) => q.bind(None::<String>),
                            }
                        };
                    }
                }
                q.execute(&mut *conn).await.ctx("writing a copied study")?;
            }
            Ok(())
        }

        /// The study named `name`'s id, if any.
        async fn study_id(conn: &mut $conn, name: &str) -> Result<Option<i64>, StoreError> {
            let sql = format!("SELECT id FROM studies WHERE name = {}", ph(1));
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
                .bind(name.to_string())
                .fetch_optional(&mut *conn)
                .await
                .ctx("looking up the study")
        }

        /// Every row of the study `name`, or `None` when there is no such study. Read inside
        /// the caller's transaction so the rows are one consistent state.
        pub(crate) async fn dump(
            conn: &mut $conn,
            name: &str,
        ) -> Result<Option<StudyDump>, StoreError> {
            let Some(id) = study_id(&mut *conn, name).await? else {
                return Ok(None);
            };
            let mut study = fetch(&mut *conn, &STUDIES, Scope::StudyRow, &Value::Int(id)).await?;
            let Some(study) = study.pop() else {
                return Ok(None);
            };
            let mut dump = StudyDump {
                study,
                tables: Default::default(),
                released: 0,
            };
            for t in TABLES {
                let rows = fetch(&mut *conn, t, study_scope(t), &Value::Int(id)).await?;
                dump.tables.insert(t.name, rows);
            }
            dump.release_running();
            Ok(Some(dump))
        }

        /// The rows of one job (the per-job tables), or `None` when the job is not there.
        async fn dump_job(
            conn: &mut $conn,
            src: &StudyDump,
            job: &str,
        ) -> Result<Option<StudyDump>, StoreError> {
            let mut dump = StudyDump {
                study: src.study.clone(),
                tables: Default::default(),
                released: 0,
            };
            for t in TABLES.iter().filter(|t| t.per_job) {
                let rows = fetch(&mut *conn, t, job_scope(t), &Value::Text(job.into())).await?;
                if t.name == "jobs" && rows.is_empty() {
                    return Ok(None);
                }
                dump.tables.insert(t.name, rows);
            }
            dump.release_running();
            Ok(Some(dump))
        }

        /// Writes `src` inside the caller's transaction (see [`CopyOutcome`]); the caller
        /// commits only on `Ok`.
        pub(crate) async fn load(
            conn: &mut $conn,
            src: &StudyDump,
        ) -> Result<CopyOutcome, StoreError> {
            let name = src.name().to_string();
            if let Some(dst) = dump(&mut *conn, &name).await? {
                return match first_difference(src, &dst, true) {
                    None => Ok(CopyOutcome::Identical),
                    Some(what) => Err(copy::conflict(&name, &what)),
                };
            }
            // Jobs the destination holds already (shared with its other studies) keep their
            // rows there, provided they agree with the source's.
            let mut shared = std::collections::BTreeSet::new();
            for job in src.jobs() {
                if let Some(there) = dump_job(&mut *conn, src, &job).await? {
                    if let Some(what) = first_difference(&src.only_job(&job), &there, false) {
                        return Err(copy::job_conflict(&name, &job, &what));
                    }
                    shared.insert(job);
                }
            }
            let cols: Vec<&str> = STUDIES.cols.iter().map(|(c, _)| *c).collect();
            let params: Vec<String> = (1..=cols.len()).map(ph).collect();
            let sql = format!(
                "INSERT INTO studies ({}) VALUES ({}) RETURNING id",
                cols.join(", "),
                params.join(", ")
            );
            let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for v in &src.study {
                q = match v {
                    Value::Int(x) => q.bind(*x),
                    Value::Real(x) => q.bind(*x),
                    Value::Text(x) => q.bind(x.clone()),
                    Value::Null => q.bind(None::<String>),
                };
            }
            let id = q
                .fetch_one(&mut *conn)
                .await
                .ctx("creating the copied study")?;
            let mut rows = 1;
            for t in TABLES {
                let mine: Vec<Vec<Value>> = if t.per_job {
                    let at = copy::job_column(t);
                    src.rows(t.name)
                        .iter()
                        .filter(|r| {
                            r.get(at)
                                .and_then(|v| match v {
                                    Value::Text(s) => Some(!shared.contains(s)),
                                    _ => None,
                                })
                                .unwrap_or(false)
                        })
                        .cloned()
                        .collect()
                } else {
                    src.rows(t.name).to_vec()
                };
                insert(&mut *conn, t, &mine, id).await?;
                rows += mine.len();
            }
            Ok(CopyOutcome::Copied {
                jobs: src.jobs().len(),
                shared: shared.len(),
                rows,
                released: src.released,
            })
        }
    };
}
pub(crate) use backend_io;

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vals: &[Value]) -> Vec<Value> {
        vals.to_vec()
    }

    #[test]
    fn statements_use_each_backends_parameters() {
        let q = |i: usize| format!("${i}");
        let sql = insert_sql(&TABLES[2], 2, &q);
        assert_eq!(
            sql,
            "INSERT INTO job_deps (job_id, dep_id) VALUES ($1, $2), ($3, $4)"
        );
        let s = |i: usize| format!("?{i}");
        let sql = select_sql(&JOBS, Scope::Job { column: "id" }, &s);
        assert!(
            sql.ends_with("FROM jobs WHERE id = ?1 ORDER BY id"),
            "{sql}"
        );
    }

    #[test]
    fn differences_ignore_clocks_and_name_what_differs() {
        let t = &TABLES[5]; // cert_results
        assert_eq!(t.name, "cert_results");
        let r = |radius: f64, seconds: f64| {
            row(&[
                Value::Text("j".into()),
                Value::Int(0),
                Value::Int(3),
                Value::Int(3),
                Value::Real(radius),
                Value::Int(1),
                Value::Int(3),
                Value::Int(90),
                Value::Int(100),
                Value::Int(10),
                Value::Real(0.001),
                Value::Real(0.25),
                Value::Real(seconds),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Int(0),
            ])
        };
        assert_eq!(row_difference(t, &[r(0.5, 1.0)], &[r(0.5, 9.0)]), None);
        let d = row_difference(t, &[r(0.5, 1.0)], &[r(0.25, 1.0)]).expect("differs");
        assert!(
            d.contains("radius = 0.5") && d.contains("radius = 0.25"),
            "{d}"
        );
        let d = row_difference(t, &[r(0.5, 1.0)], &[]).expect("missing");
        assert!(d.contains("destination lacks"), "{d}");
    }

    /// A migration that adds a column or a table must say whether copies carry it: every
    /// column of the migrated schema is either copied or listed in [`NOT_COPIED`].
    #[tokio::test]
    async fn every_column_of_the_schema_is_copied_or_excused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::SqliteStore::open(&dir.path().join("s.db"))
            .await
            .expect("open");
        let pool = store.pool_for_tests();
        let cols: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p \
             WHERE m.type = 'table' ORDER BY m.name, p.cid",
        )
        .fetch_all(&pool)
        .await
        .expect("schema");
        assert!(cols.len() > 40, "{cols:?}");
        let copied = |t: &str, c: &str| {
            std::iter::once(&STUDIES)
                .chain(TABLES)
                .any(|x| x.name == t && x.cols.iter().any(|(n, _)| *n == c))
        };
        let missing: Vec<String> = cols
            .iter()
            .filter(|(t, c)| {
                !NOT_COPIED.contains(&t.as_str())
                    && !NOT_COPIED.contains(&format!("{t}.{c}").as_str())
                    && !copied(t, c)
            })
            .map(|(t, c)| format!("{t}.{c}"))
            .collect();
        assert!(missing.is_empty(), "not copied, not excused: {missing:?}");
    }

    #[test]
    fn running_jobs_are_copied_as_released() {
        let mut vals = vec![Value::Null; JOBS.cols.len()];
        let at = |c: &str| JOBS.cols.iter().position(|(n, _)| *n == c).unwrap();
        vals[at("id")] = Value::Text("j".into());
        vals[at("status")] = Value::Text("running".into());
        vals[at("attempts")] = Value::Int(2);
        vals[at("lease_owner")] = Value::Text("host:1:ab".into());
        vals[at("lease_expires")] = Value::Real(1e9);
        let mut d = StudyDump {
            study: vec![Value::Text("s".into())],
            tables: BTreeMap::from([("jobs", vec![vals])]),
            released: 0,
        };
        d.release_running();
        assert_eq!(d.released, 1);
        let j = &d.rows("jobs")[0];
        assert_eq!(j[at("status")], Value::Text("pending".into()));
        assert_eq!(j[at("attempts")], Value::Int(1));
        assert_eq!(j[at("lease_owner")], Value::Null);
        assert_eq!(d.jobs(), vec!["j".to_string()]);
    }
}
