//! The SQLite backend: WAL journal, a busy timeout so several `caf run` processes can share one
//! file, migrations applied at open. Claims are one compare-and-set `UPDATE … RETURNING`, which
//! SQLite executes atomically under its single-writer lock.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use super::rows::{self, BLOCKED_CTE, RUN_COLUMNS, WORK_SECONDS};
use super::*;
use crate::plan::{CellRecord, Job};

mod queue;
use crate::util::now_unix;

/// `caf db copy`'s reading and writing (see [`crate::store::copy`]) in SQLite's parameters.
mod copy_io {
    crate::store::copy::backend_io!(sqlx::Sqlite, sqlx::SqliteConnection, |i: usize| format!(
        "?{i}"
    ));
}

pub use super::migrations::SQLITE_MIGRATOR as MIGRATOR;

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Throttles the `last_seen` writes of claims that hand out jobs (shared by clones).
    claim_liveness: std::sync::Arc<liveness::ClaimLiveness>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, super::DEFAULT_CONNECTIONS).await
    }

    /// As [`SqliteStore::open`], with at most `connections` pooled connections (at least 1).
    pub async fn open_with(path: &Path, connections: u32) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(60))
            .foreign_keys(true);
        Self::connect(opts, &path.display().to_string(), connections).await
    }

    /// A private in-memory database (tests).
    pub async fn in_memory() -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|source| StoreError::Open {
                path: ":memory:".into(),
                source,
            })?
            .foreign_keys(true);
        Self::connect(opts, ":memory:", 1).await
    }

    /// Opens and migrates, retrying while another process is creating or migrating the same
    /// file: SQLite answers "database is locked" to a journal-mode switch or a schema change
    /// that races another one, without waiting on the busy timeout, and sqlx takes no lock
    /// around SQLite migrations. A retry then finds the schema in place.
    async fn connect(
        opts: SqliteConnectOptions,
        shown: &str,
        connections: u32,
    ) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut wait = Duration::from_millis(20);
        loop {
            match Self::connect_once(opts.clone(), shown, connections).await {
                Ok(store) => return Ok(store),
                Err(Opening { error: e, raced })
                    if std::time::Instant::now() < deadline && (raced || is_contention(&e)) =>
                {
                    tracing::debug!("opening {shown} raced another process ({e}); retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(Opening { error, .. }) => return Err(error),
            }
        }
    }

    async fn connect_once(
        opts: SqliteConnectOptions,
        shown: &str,
        connections: u32,
    ) -> Result<Self, Opening> {
        let memory = shown == ":memory:";
        let pool = SqlitePoolOptions::new()
            // An in-memory database exists once per connection: keep exactly one.
            .max_connections(if memory { 1 } else { connections.max(1) })
            .min_connections(if memory { 1 } else { 0 })
            .idle_timeout(if memory {
                None
            } else {
                Some(Duration::from_secs(600))
            })
            .max_lifetime(if memory {
                None
            } else {
                Some(Duration::from_secs(1800))
            })
            .connect_with(opts)
            .await
            .map_err(|source| Opening {
                error: StoreError::Open {
                    path: shown.to_string(),
                    source,
                },
                raced: false,
            })?;
        if let Err(e) = MIGRATOR.run(&pool).await {
            if let sqlx::migrate::MigrateError::VersionMissing(version) = e {
                // An older caf on a database a newer one migrated (mixed versions on a cluster):
                // say so instead of sqlx's "previously applied but missing".
                pool.close().await;
                let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
                return Err(Opening {
                    error: StoreError::NewerSchema {
                        path: shown.to_string(),
                        version,
                        known,
                    },
                    raced: false,
                });
            }
            // Two processes can both see a migration as pending; the loser's DDL then fails
            // ("duplicate column name", "table … already exists"). Whatever the message, if the
            // failed migration is now recorded as applied, another process won and a retry
            // finds the schema in place.
            let raced = match &e {
                sqlx::migrate::MigrateError::ExecuteMigration(_, version) => {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM _sqlx_migrations WHERE version = ? AND success",
                    )
                    .bind(version)
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|n| n > 0)
                }
                _ => false,
            };
            pool.close().await;
            return Err(Opening {
                error: e.into(),
                raced,
            });
        }
        Ok(Self {
            pool,
            claim_liveness: Default::default(),
        })
    }

    /// Whether `lease.worker` still runs `lease.job`.
    pub(super) async fn holds(&self, lease: &Lease) -> Result<bool, StoreError> {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?",
        )
        .bind(lease.job.as_str())
        .bind(&lease.worker.0)
        .fetch_optional(&self.pool)
        .await
        .ctx("checking a lease")?;
        Ok(held.is_some())
    }

    async fn current_revision(&self, study: StudyId) -> Result<String, StoreError> {
        sqlx::query_scalar::<_, String>("SELECT spec_sha256 FROM studies WHERE id = ?")
            .bind(study.0)
            .fetch_one(&self.pool)
            .await
            .ctx("reading the study's spec revision")
    }
}

/// A condition true while the job (first bind) runs under the worker (second bind). SQLite
/// runs one writer at a time, so the check and the write it guards are one atomic statement.
pub(super) fn holds_lease(_first: usize) -> String {
    "EXISTS (SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?)".into()
}

/// Inserts one certification row unless the (job, image) pair already has one, and (given a
/// lease) only while the lease is held; whether a row was inserted.
async fn insert_cert<'e, E: sqlx::Executor<'e, Database = sqlx::Sqlite>>(
    executor: E,
    lease: Option<&Lease>,
    job: &JobId,
    r: &CertRow,
) -> Result<bool, sqlx::Error> {
    // The upsert form needs a WHERE on its SELECT (SQLite's parsing ambiguity); `1 = 1` when
    // there is no lease to check (imports).
    let sql = format!(
        "INSERT INTO cert_results (job_id, idx, label, predict, radius, correct, c_hat, n_a, n, n0, alpha, sigma, seconds,
                                   seq_n_max, seq_lower, seq_upper, seq_prior_a, seq_prior_b, seq_radii, seq_decisions, stopped_wrong)
         SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {} ON CONFLICT (job_id, idx) DO NOTHING",
        if lease.is_some() { holds_lease(22) } else { "1 = 1".to_string() }
    );
    let s = rows::SeqBind::of(r);
    let q = sqlx::query(AssertSqlSafe(sql))
        .bind(job.as_str())
        .bind(r.idx as i64)
        .bind(r.label as i64)
        .bind(r.predict)
        .bind(r.radius)
        .bind(r.correct as i64)
        .bind(r.c_hat as i64)
        .bind(r.n_a as i64)
        .bind(r.n as i64)
        .bind(r.n0 as i64)
        .bind(r.alpha)
        .bind(r.sigma)
        .bind(r.seconds)
        .bind(s.n_max)
        .bind(s.lower)
        .bind(s.upper)
        .bind(s.prior_a)
        .bind(s.prior_b)
        .bind(s.radii)
        .bind(s.decisions)
        .bind(s.stopped_wrong);
    let q = match lease {
        Some(l) => q.bind(l.job.as_str()).bind(&l.worker.0),
        None => q,
    };
    Ok(q.execute(executor).await?.rows_affected() == 1)
}

/// Copies the imported (external) jobs and cells from revision `prev` to `rev`, after the plan's
/// own `n_jobs` jobs and `n_cells` cells.
async fn carry_imports(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    study: i64,
    prev: &str,
    rev: &str,
    n_jobs: usize,
    n_cells: usize,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO study_jobs (study_id, job_id, spec_sha256, seq, label)
         SELECT sj.study_id, sj.job_id, ?, ? + sj.seq, sj.label FROM study_jobs sj JOIN jobs j ON j.id = sj.job_id
         WHERE sj.study_id = ? AND sj.spec_sha256 = ? AND j.external = 1
         ON CONFLICT DO NOTHING",
    )
    .bind(rev)
    .bind(n_jobs as i64)
    .bind(study)
    .bind(prev)
    .execute(&mut **tx)
    .await
    .ctx("carrying imported jobs to the new revision")?;
    sqlx::query(
        "INSERT INTO study_cells (study_id, spec_sha256, cell, job_id, method, kind, sigma, trained_sigma, params)
         SELECT study_id, ?, ? + cell, job_id, method, kind, sigma, trained_sigma, params FROM study_cells
         WHERE study_id = ? AND spec_sha256 = ?
           AND job_id IN (SELECT id FROM jobs WHERE external = 1)
         ON CONFLICT DO NOTHING",
    )
    .bind(rev)
    .bind(n_cells as i64)
    .bind(study)
    .bind(prev)
    .execute(&mut **tx)
    .await
    .ctx("carrying imported cells to the new revision")?;
    Ok(())
}

/// A failed open, and whether it lost a race to another process applying the same migration.
struct Opening {
    error: StoreError,
    raced: bool,
}

/// Errors that mean another process holds the file or is applying the same migration.
fn is_contention(e: &StoreError) -> bool {
    let text = match e {
        StoreError::Open { source, .. } => source.to_string(),
        StoreError::Migrate(m) => m.to_string(),
        _ => return false,
    };
    let text = text.to_lowercase();
    text.contains("locked") || text.contains("busy") || text.contains("already exists")
}

impl Store for SqliteStore {
    async fn dump_study(&self, name: &str) -> Result<Option<StudyDump>, StoreError> {
        // One read transaction: a sweep still running elsewhere cannot change rows between
        // the tables read.
        let mut tx = self.pool.begin().await.ctx("starting a transaction")?;
        let dump = copy_io::dump(&mut tx, name).await?;
        tx.commit().await.ctx("ending the read")?;
        Ok(dump)
    }

    async fn load_study(&self, dump: &StudyDump) -> Result<CopyOutcome, StoreError> {
        // IMMEDIATE: it reads (is the study there?) before it writes, as `register_plan`.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("starting a transaction")?;
        let outcome = copy_io::load(&mut tx, dump).await?;
        tx.commit().await.ctx("committing the copied study")?;
        Ok(outcome)
    }

    async fn register_plan(&self, plan: &Plan) -> Result<StudyId, StoreError> {
        let now = now_unix();
        // IMMEDIATE: this transaction reads before it writes, and a deferred one could not
        // upgrade to a writer after another process committed (SQLITE_BUSY_SNAPSHOT, which the
        // busy timeout does not retry); two `caf run`s registering one plan hit exactly that.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("starting a transaction")?;
        let s = &plan.study;
        let previous: Option<String> =
            sqlx::query_scalar("SELECT spec_sha256 FROM studies WHERE name = ?")
                .bind(&s.name)
                .fetch_optional(&mut *tx)
                .await
                .ctx("reading the study's previous revision")?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO studies (name, spec_path, spec_text, spec_sha256, seed, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET spec_path = excluded.spec_path, spec_text = excluded.spec_text,
                 spec_sha256 = excluded.spec_sha256, seed = excluded.seed, updated_at = excluded.updated_at
             RETURNING id",
        )
        .bind(&s.name)
        .bind(s.spec_path.display().to_string())
        .bind(&s.spec_text)
        .bind(&s.spec_sha256)
        .bind(s.seed as i64)
        .bind(now)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .ctx("recording the study")?;
        sqlx::query(
            "INSERT INTO study_revisions (study_id, spec_sha256, spec_text, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (study_id, spec_sha256) DO NOTHING",
        )
        .bind(id)
        .bind(&s.spec_sha256)
        .bind(&s.spec_text)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("recording the spec revision")?;
        // The plan is the revision's whole job list: a caf whose job kinds changed version
        // plans other ids for the same spec text, and the old ones must not linger in it (their
        // results stay in `jobs`). Imported jobs are not planned and are kept.
        for table in ["study_jobs", "study_cells"] {
            let sql = format!(
                "DELETE FROM {table} WHERE study_id = ? AND spec_sha256 = ?
                   AND job_id NOT IN (SELECT id FROM jobs WHERE external = 1)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .bind(&s.spec_sha256)
                .execute(&mut *tx)
                .await
                .ctx("clearing the revision's previous plan")?;
        }
        for (seq, job) in plan.jobs.iter().enumerate() {
            // Params may carry paths that moved; the id (content) is what decides reuse.
            sqlx::query(
                "INSERT INTO jobs (id, kind, label, params, created_at, unit, max_attempts, max_interruptions)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET label = excluded.label, params = excluded.params,
                     unit = excluded.unit, max_interruptions = excluded.max_interruptions,
                     max_attempts = CASE WHEN jobs.status = 'pending'
                         THEN MAX(excluded.max_attempts, jobs.attempts + 1)
                         ELSE excluded.max_attempts END",
            )
            .bind(job.id.as_str())
            .bind(&job.kind)
            .bind(&job.label)
            .bind(job.params.to_string())
            .bind(now)
            .bind(job.unit.as_str())
            .bind(i64::from(plan.study.retries.attempts))
            .bind(i64::from(plan.study.retries.interruptions))
            .execute(&mut *tx)
            .await
            .ctx("recording a job")?;
            for dep in &job.deps {
                sqlx::query(
                    "INSERT INTO job_deps (job_id, dep_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(job.id.as_str())
                .bind(dep.as_str())
                .execute(&mut *tx)
                .await
                .ctx("recording a job dependency")?;
            }
            sqlx::query(
                "INSERT INTO study_jobs (study_id, job_id, spec_sha256, seq, label) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(job.id.as_str())
            .bind(&s.spec_sha256)
            .bind(seq as i64)
            .bind(&job.label)
            .execute(&mut *tx)
            .await
            .ctx("linking a job to the study")?;
        }
        for cell in &plan.cells {
            let values = serde_json::to_string(&cell.values)
                .map_err(|e| StoreError::Corrupt(format!("cell parameters as JSON: {e}")))?;
            for out in &cell.outputs {
                sqlx::query(
                    "INSERT INTO study_cells (study_id, spec_sha256, cell, job_id, method, kind, sigma, trained_sigma, params)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(id)
                .bind(&s.spec_sha256)
                .bind(cell.cell as i64)
                .bind(out.job.as_str())
                .bind(&cell.method)
                .bind(&out.kind)
                .bind(out.sigma)
                .bind(out.trained_sigma)
                .bind(&values)
                .execute(&mut *tx)
                .await
                .ctx("recording a grid cell")?;
            }
        }
        if let Some(prev) = previous.filter(|p| *p != s.spec_sha256) {
            // Imported results (`caf import`) are not in any spec: keep them in the study.
            carry_imports(
                &mut tx,
                id,
                &prev,
                &s.spec_sha256,
                plan.jobs.len(),
                plan.cells.len(),
            )
            .await?;
        }
        tx.commit().await.ctx("committing the plan")?;
        Ok(StudyId(id))
    }

    async fn retry_failed(&self, study: StudyId) -> Result<u64, StoreError> {
        let rev = self.current_revision(study).await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = 'pending', attempts = 0, interruptions = 0, not_before = 0, error = NULL
             WHERE status = 'failed' AND id IN (SELECT job_id FROM study_jobs WHERE study_id = ? AND spec_sha256 = ?)",
        )
        .bind(study.0)
        .bind(rev)
        .execute(&self.pool)
        .await
        .ctx("resetting failed jobs")?;
        Ok(r.rows_affected())
    }

    async fn record_cert(
        &self,
        lease: &Lease,
        job: &JobId,
        r: &CertRow,
    ) -> Result<bool, StoreError> {
        // A result is final once written; a re-run of an in-flight image computes the same row.
        let inserted = insert_cert(&self.pool, Some(lease), job, r)
            .await
            .ctx("recording a certification result")?;
        // Nothing inserted: the image was recorded before, or the lease is gone.
        Ok(inserted || self.holds(lease).await?)
    }

    async fn cert_draws(&self, job: &JobId) -> Result<u64, StoreError> {
        let v: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(n0 + n), 0) AS BIGINT) FROM cert_results WHERE job_id = ?",
        )
        .bind(job.as_str())
        .fetch_one(&self.pool)
        .await
        .ctx("counting the draws of finished images")?;
        Ok(v as u64)
    }

    async fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        let v: Vec<i64> =
            sqlx::query_scalar("SELECT idx FROM cert_results WHERE job_id = ? ORDER BY idx")
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .ctx("reading finished images")?;
        Ok(v.into_iter().map(|i| i as u64).collect())
    }

    async fn record_eval(
        &self,
        lease: &Lease,
        job: &JobId,
        rows: &[EvalRow],
    ) -> Result<bool, StoreError> {
        // IMMEDIATE: the lease check and the rows are one write transaction, so no other
        // process can take the lease over between them.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("starting a transaction")?;
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND lease_owner = ?",
        )
        .bind(lease.job.as_str())
        .bind(&lease.worker.0)
        .fetch_optional(&mut *tx)
        .await
        .ctx("checking a lease")?;
        if held.is_none() {
            return Ok(false);
        }
        for r in rows {
            sqlx::query(
                "INSERT INTO eval_results (job_id, idx, label, predict, correct) VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (job_id, idx) DO NOTHING",
            )
            .bind(job.as_str())
            .bind(r.idx as i64)
            .bind(r.label as i64)
            .bind(r.predict as i64)
            .bind((r.label == r.predict) as i64)
            .execute(&mut *tx)
            .await
            .ctx("recording an evaluation result")?;
        }
        tx.commit().await.ctx("committing evaluation results")?;
        Ok(true)
    }

    async fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        let v: Vec<i64> =
            sqlx::query_scalar("SELECT idx FROM eval_results WHERE job_id = ? ORDER BY idx")
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .ctx("reading evaluated images")?;
        Ok(v.into_iter().map(|i| i as u64).collect())
    }

    async fn record_epoch(
        &self,
        lease: &Lease,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO train_metrics (job_id, epoch, metrics, at) SELECT ?, ?, ?, ? WHERE {}
             ON CONFLICT (job_id, epoch) DO UPDATE SET metrics = excluded.metrics, at = excluded.at",
            holds_lease(5)
        );
        let r = sqlx::query(AssertSqlSafe(sql))
            .bind(job.as_str())
            .bind(epoch as i64)
            .bind(metrics.to_string())
            .bind(now_unix())
            .bind(lease.job.as_str())
            .bind(&lease.worker.0)
            .execute(&self.pool)
            .await
            .ctx("recording epoch metrics")?;
        Ok(r.rows_affected() > 0)
    }

    async fn epochs(&self, job: &JobId) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT metrics FROM train_metrics WHERE job_id = ? ORDER BY epoch")
                .bind(job.as_str())
                .fetch_all(&self.pool)
                .await
                .ctx("reading epoch metrics")?;
        rows.iter()
            .map(|t| {
                serde_json::from_str(t)
                    .map_err(|e| StoreError::Corrupt(format!("epoch metrics JSON: {e}")))
            })
            .collect()
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM workers ORDER BY started_at DESC, id",
            rows::WORKER_COLUMNS
        );
        let found = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .ctx("listing workers")?;
        let mut workers = found
            .iter()
            .map(rows::worker)
            .collect::<Result<Vec<_>, _>>()?;
        let held: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, lease_owner FROM jobs WHERE status = 'running' AND lease_owner IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("listing held leases")?;
        rows::attach_jobs(&mut workers, held);
        Ok(workers)
    }

    async fn studies(&self) -> Result<Vec<StudyInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, seed, spec_path, spec_sha256, spec_text FROM studies ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("listing studies")?;
        rows.iter().map(rows::study).collect()
    }

    async fn study_by_name(&self, name: &str) -> Result<StudyInfo, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, seed, spec_path, spec_sha256, spec_text FROM studies WHERE name = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up a study")?;
        match row {
            Some(r) => rows::study(&r),
            None => Err(StoreError::NotFound(format!("study `{name}`"))),
        }
    }

    async fn study_jobs(&self, study: StudyId) -> Result<Vec<JobStatus>, StoreError> {
        let rev = self.current_revision(study).await?;
        let sql = format!(
            "{BLOCKED_CTE}
             SELECT j.id, j.kind, COALESCE(sj.label, j.label) AS label, j.status, j.attempts, j.max_attempts, j.progress_done, j.progress_total,
                    j.run_seconds, j.started_at, j.finished_at, j.lease_owner, j.error, j.result, j.precision, j.unit, {RUN_COLUMNS},
                    CASE WHEN j.status = 'pending' AND j.id IN (SELECT id FROM dead) THEN 1 ELSE 0 END AS blocked,
                    {WORK_SECONDS} AS work_seconds
             FROM jobs j JOIN study_jobs sj ON sj.job_id = j.id
             WHERE sj.study_id = ? AND sj.spec_sha256 = ? ORDER BY sj.seq"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(study.0)
            .bind(rev)
            .fetch_all(&self.pool)
            .await
            .ctx("listing the study's jobs")?;
        rows.iter().map(rows::job_status).collect()
    }

    async fn import_results(
        &self,
        study: &str,
        job: &Job,
        cell: &CellRecord,
        rows: &[CertRow],
    ) -> Result<StudyId, StoreError> {
        let now = now_unix();
        // IMMEDIATE for the same reason as in `register_plan`: it reads before it writes.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .ctx("starting a transaction")?;
        let existing: Option<(i64, String, String)> =
            sqlx::query_as("SELECT id, spec_sha256, spec_text FROM studies WHERE name = ?")
                .bind(study)
                .fetch_optional(&mut *tx)
                .await
                .ctx("looking up the study")?;
        let (id, prev, text) = match existing {
            Some(e) => e,
            None => {
                let rev = crate::util::sha256_bytes(format!("import:{study}").as_bytes());
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO studies (name, spec_path, spec_text, spec_sha256, seed, created_at, updated_at)
                     VALUES (?, '(imported)', '', ?, 0, ?, ?) RETURNING id",
                )
                .bind(study)
                .bind(&rev)
                .bind(now)
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .ctx("creating the study")?;
                (id, rev, String::new())
            }
        };
        let already: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM study_jobs WHERE study_id = ? AND spec_sha256 = ? AND job_id = ?",
        )
        .bind(id)
        .bind(&prev)
        .bind(job.id.as_str())
        .fetch_one(&mut *tx)
        .await
        .ctx("checking for an earlier import")?;
        if already > 0 {
            tx.commit().await.ctx("committing")?;
            return Ok(StudyId(id));
        }
        let rev = crate::util::sha256_bytes(format!("{prev}+{}", job.id).as_bytes());
        let text = format!("{text}# caf import: {}\n", job.label);
        sqlx::query(
            "UPDATE studies SET spec_sha256 = ?, spec_text = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&rev)
        .bind(&text)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .ctx("recording the new revision")?;
        sqlx::query(
            "INSERT INTO study_revisions (study_id, spec_sha256, spec_text, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(&rev)
        .bind(&text)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("recording the new revision")?;
        for table in ["study_jobs", "study_cells"] {
            let cols = if table == "study_jobs" {
                "job_id, seq, label"
            } else {
                "cell, job_id, method, kind, sigma, trained_sigma, params"
            };
            let sql = format!(
                "INSERT INTO {table} (study_id, spec_sha256, {cols})
                 SELECT study_id, ?, {cols} FROM {table} WHERE study_id = ? AND spec_sha256 = ?"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(&rev)
                .bind(id)
                .bind(&prev)
                .execute(&mut *tx)
                .await
                .ctx("carrying the study's jobs to the new revision")?;
        }
        sqlx::query(
            "INSERT INTO jobs (id, kind, label, params, status, progress_done, progress_total, result,
                               created_at, started_at, finished_at, external)
             VALUES (?, ?, ?, ?, 'done', ?, ?, '{}', ?, ?, ?, 1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(job.id.as_str())
        .bind(&job.kind)
        .bind(&job.label)
        .bind(job.params.to_string())
        .bind(rows.len() as i64)
        .bind(rows.len() as i64)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("recording the imported job")?;
        sqlx::query(
            "INSERT INTO study_jobs (study_id, job_id, spec_sha256, seq, label)
             VALUES (?, ?, ?, (SELECT COALESCE(MAX(seq), -1) + 1 FROM study_jobs WHERE study_id = ? AND spec_sha256 = ?), ?)",
        )
        .bind(id)
        .bind(job.id.as_str())
        .bind(&rev)
        .bind(id)
        .bind(&rev)
        .bind(&job.label)
        .execute(&mut *tx)
        .await
        .ctx("linking the imported job")?;
        let values = serde_json::to_string(&cell.values)
            .map_err(|e| StoreError::Corrupt(format!("cell parameters as JSON: {e}")))?;
        for out in &cell.outputs {
            sqlx::query(
                "INSERT INTO study_cells (study_id, spec_sha256, cell, job_id, method, kind, sigma, trained_sigma, params)
                 VALUES (?, ?, (SELECT COALESCE(MAX(cell), -1) + 1 FROM study_cells WHERE study_id = ? AND spec_sha256 = ?),
                         ?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(&rev)
            .bind(id)
            .bind(&rev)
            .bind(out.job.as_str())
            .bind(&cell.method)
            .bind(&out.kind)
            .bind(out.sigma)
            .bind(out.trained_sigma)
            .bind(&values)
            .execute(&mut *tx)
            .await
            .ctx("recording the imported cell")?;
        }
        for r in rows {
            insert_cert(&mut *tx, None, &job.id, r)
                .await
                .ctx("recording an imported row")?;
        }
        tx.commit().await.ctx("committing the import")?;
        Ok(StudyId(id))
    }

    async fn study_cells(&self, study: StudyId) -> Result<Vec<CellRow>, StoreError> {
        let rev = self.current_revision(study).await?;
        let rows = sqlx::query(
            "SELECT c.cell, c.job_id, c.method, c.kind, c.sigma, c.trained_sigma, c.params, j.status
             FROM study_cells c JOIN jobs j ON j.id = c.job_id
             WHERE c.study_id = ? AND c.spec_sha256 = ? ORDER BY c.cell, c.job_id",
        )
        .bind(study.0)
        .bind(rev)
        .fetch_all(&self.pool)
        .await
        .ctx("reading the study's grid cells")?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let g = |e: sqlx::Error| StoreError::Query {
                context: "reading a grid cell",
                source: e,
            };
            let params: String = r.try_get("params").map_err(g)?;
            out.push(CellRow {
                cell: r.try_get::<i64, _>("cell").map_err(g)? as usize,
                job: JobId::new(r.try_get::<String, _>("job_id").map_err(g)?),
                method: r.try_get("method").map_err(g)?,
                kind: r.try_get("kind").map_err(g)?,
                sigma: r.try_get("sigma").map_err(g)?,
                trained_sigma: r.try_get("trained_sigma").map_err(g)?,
                values: serde_json::from_str(&params)
                    .map_err(|e| StoreError::Corrupt(format!("cell parameters JSON: {e}")))?,
                state: rows::parse_state(&r.try_get::<String, _>("status").map_err(g)?)?,
            });
        }
        Ok(out)
    }

    async fn study_cert_results(
        &self,
        study: StudyId,
    ) -> Result<Vec<(JobId, CertRow)>, StoreError> {
        let rev = self.current_revision(study).await?;
        let rows = sqlx::query(
            "SELECT c.job_id, c.idx, c.label, c.predict, c.radius, c.correct, c.c_hat, c.n_a, c.n, c.n0, c.alpha, c.sigma, c.seconds,
                    c.seq_n_max, c.seq_lower, c.seq_upper, c.seq_prior_a, c.seq_prior_b, c.seq_radii, c.seq_decisions, c.stopped_wrong
             FROM cert_results c JOIN study_jobs sj ON sj.job_id = c.job_id
             WHERE sj.study_id = ? AND sj.spec_sha256 = ? ORDER BY c.job_id, c.idx",
        )
        .bind(study.0)
        .bind(rev)
        .fetch_all(&self.pool)
        .await
        .ctx("reading certification results")?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let g = |e: sqlx::Error| StoreError::Query {
                context: "reading a certification row",
                source: e,
            };
            out.push((
                JobId::new(r.try_get::<String, _>("job_id").map_err(g)?),
                rows::cert_row(&r)?,
            ));
        }
        Ok(out)
    }

    async fn record_slurm_job(&self, study: StudyId, job: &SlurmJob) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO slurm_jobs (study_id, slurm_job_id, array_tasks, script, submitted_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (study_id, slurm_job_id) DO NOTHING",
        )
        .bind(study.0)
        .bind(&job.job_id)
        .bind(job.array_tasks as i64)
        .bind(&job.script)
        .bind(job.submitted_at)
        .execute(&self.pool)
        .await
        .ctx("recording a Slurm job")?;
        Ok(())
    }

    async fn slurm_jobs(&self, study: StudyId) -> Result<Vec<SlurmJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT slurm_job_id, array_tasks, script, submitted_at FROM slurm_jobs
             WHERE study_id = ? ORDER BY submitted_at, slurm_job_id",
        )
        .bind(study.0)
        .fetch_all(&self.pool)
        .await
        .ctx("listing the study's Slurm jobs")?;
        rows.iter().map(rows::slurm_job).collect()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
impl SqliteStore {
    /// Direct SQL access for tests that need to set up unusual states.
    pub(crate) fn pool_for_tests(&self) -> SqlitePool {
        self.pool.clone()
    }
}
