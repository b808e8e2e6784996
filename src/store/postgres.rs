//! The PostgreSQL backend: the SQLite backend's schema and semantics on a server many hosts can
//! share. A small pool per process; claims are one `UPDATE … WHERE id = (SELECT … FOR UPDATE
//! SKIP LOCKED LIMIT 1) RETURNING …`, so concurrent workers never wait on each other's candidate
//! and no transaction stays open while a job runs. Migrations are applied at open under sqlx's
//! advisory lock, so many processes can open one fresh database at once.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use super::rows::{self, BLOCKED_CTE, RUN_COLUMNS, WORK_SECONDS};
use super::*;
use crate::plan::{CellRecord, Job};

mod queue;
use crate::util::now_unix;

/// `caf db copy`'s reading and writing (see [`crate::store::copy`]) in PostgreSQL's parameters.
mod copy_io {
    crate::store::copy::backend_io!(sqlx::Postgres, sqlx::PgConnection, |i: usize| format!(
        "${i}"
    ));
}

pub use super::migrations::POSTGRES_MIGRATOR as MIGRATOR;

/// Key of the transaction-level advisory lock that serializes plan registrations and imports
/// (what SQLite's `BEGIN IMMEDIATE` gives the SQLite backend): both read a study's revision
/// before rewriting its job list, and two interleaved ones would deadlock on shared job rows or
/// carry imports from a stale revision. They are rare and short, so one lock for all is enough.
const PLAN_LOCK: i64 = 0x6361_665f_706c_616e; // "caf_plan"

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Throttles the `last_seen` writes of claims that hand out jobs (shared by clones).
    claim_liveness: std::sync::Arc<liveness::ClaimLiveness>,
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?…]`) with
    /// [`super::DEFAULT_CONNECTIONS`] and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, super::DEFAULT_CONNECTIONS).await
    }

    /// As [`PgStore::open`], with at most `max_connections` pooled connections (at least 1).
    pub async fn open_with(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let opts = PgConnectOptions::from_str(url)
            .map_err(|source| StoreError::Open {
                path: shown.clone(),
                source,
            })?
            .application_name("caf");
        Self::connect(opts, &shown, max_connections).await
    }

    /// Opens with explicit options; `shown` names the database in errors (no password).
    pub async fn connect(
        opts: PgConnectOptions,
        shown: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let open_err = |source: sqlx::Error| StoreError::Open {
            path: shown.to_string(),
            source,
        };
        // Reach the server directly first: a pool retries a refused or failed connection until
        // its acquire timeout (30 s) and then says only that it timed out; this fails at once,
        // with the reason (no such host, refused, authentication, no such database).
        let probe = opts.connect().await.map_err(open_err)?;
        let _ = probe.close().await;
        // Migrate through a one-connection pool of its own, closed whatever happens: sqlx's
        // migrator holds a session-level advisory lock, which an error path leaves taken;
        // closing the session releases it instead of parking it in the pool to block every
        // later open. (A pool, not a bare connection: `run(&mut conn)` makes this future
        // not `Send`, sqlx's "Acquire is not general enough".)
        let migration_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        let migrated = MIGRATOR.run(&migration_pool).await;
        migration_pool.close().await;
        if let Err(e) = migrated {
            if let sqlx::migrate::MigrateError::VersionMissing(version) = e {
                // An older caf on a database a newer one migrated: say so, as SQLite does.
                let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
                return Err(StoreError::NewerSchema {
                    path: shown.to_string(),
                    version,
                    known,
                });
            }
            return Err(e.into());
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .min_connections(0)
            .idle_timeout(Some(Duration::from_secs(600)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        Ok(Self {
            pool,
            claim_liveness: Default::default(),
        })
    }

    /// Closes the pool's connections (tests drop their database afterwards).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Whether `lease.worker` still runs `lease.job`.
    pub(super) async fn holds(&self, lease: &Lease) -> Result<bool, StoreError> {
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT 1::BIGINT FROM jobs WHERE id = $1 AND status = 'running' AND lease_owner = $2",
        )
        .bind(lease.job.as_str())
        .bind(&lease.worker.0)
        .fetch_optional(&self.pool)
        .await
        .ctx("checking a lease")?;
        Ok(held.is_some())
    }

    async fn current_revision(&self, study: StudyId) -> Result<String, StoreError> {
        sqlx::query_scalar::<_, String>("SELECT spec_sha256 FROM studies WHERE id = $1")
            .bind(study.0)
            .fetch_one(&self.pool)
            .await
            .ctx("reading the study's spec revision")
    }

    /// Starts a transaction holding [`PLAN_LOCK`] until it ends.
    async fn begin_plan_change(&self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.ctx("starting a transaction")?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PLAN_LOCK)
            .execute(&mut *tx)
            .await
            .ctx("waiting for other plan registrations")?;
        Ok(tx)
    }
}

/// `url` with any password replaced by `***`, for messages and logs: the one in the userinfo
/// (`user:password@`) and a `password=` query parameter, which libpq URLs also accept.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let (head, rest) = url.split_at(scheme_end);
    // The authority ends at the first '/', '?' or '#'; credentials end at its last '@'.
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!("{}:***{}", &authority[..colon], &authority[at..]),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{head}{authority}{tail}")
}

/// A condition true while `job_id = $first` runs under `lease_owner = $first + 1`. `FOR SHARE`
/// locks the job row until the write commits, so the lease cannot be reaped or completed
/// between the check and the write.
pub(super) fn holds_lease(first: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM jobs WHERE id = ${first} AND status = 'running' AND lease_owner = ${} FOR SHARE)",
        first + 1
    )
}

/// Inserts one certification row unless the (job, image) pair already has one, and (given a
/// lease) only while the lease is held; whether a row was inserted.
async fn insert_cert<'e, E: sqlx::Executor<'e, Database = sqlx::Postgres>>(
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
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21 WHERE {} ON CONFLICT (job_id, idx) DO NOTHING",
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
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    study: i64,
    prev: &str,
    rev: &str,
    n_jobs: usize,
    n_cells: usize,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO study_jobs (study_id, job_id, spec_sha256, seq, label)
         SELECT sj.study_id, sj.job_id, $1, $2 + sj.seq, sj.label FROM study_jobs sj JOIN jobs j ON j.id = sj.job_id
         WHERE sj.study_id = $3 AND sj.spec_sha256 = $4 AND j.external = 1
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
         SELECT study_id, $1, $2 + cell, job_id, method, kind, sigma, trained_sigma, params FROM study_cells
         WHERE study_id = $3 AND spec_sha256 = $4
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

impl Store for PgStore {
    async fn dump_study(&self, name: &str) -> Result<Option<StudyDump>, StoreError> {
        // One snapshot for every table: workers may be recording results while we read.
        let mut tx = self.pool.begin().await.ctx("starting a transaction")?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .ctx("starting a snapshot")?;
        let dump = copy_io::dump(&mut tx, name).await?;
        tx.commit().await.ctx("ending the read")?;
        Ok(dump)
    }

    async fn load_study(&self, dump: &StudyDump) -> Result<CopyOutcome, StoreError> {
        // Under the plan lock: a copy creates a study and links jobs, as a registration does.
        let mut tx = self.begin_plan_change().await?;
        let outcome = copy_io::load(&mut tx, dump).await?;
        tx.commit().await.ctx("committing the copied study")?;
        Ok(outcome)
    }

    async fn register_plan(&self, plan: &Plan) -> Result<StudyId, StoreError> {
        let now = now_unix();
        let mut tx = self.begin_plan_change().await?;
        let s = &plan.study;
        let previous: Option<String> =
            sqlx::query_scalar("SELECT spec_sha256 FROM studies WHERE name = $1")
                .bind(&s.name)
                .fetch_optional(&mut *tx)
                .await
                .ctx("reading the study's previous revision")?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO studies (name, spec_path, spec_text, spec_sha256, seed, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
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
            "INSERT INTO study_revisions (study_id, spec_sha256, spec_text, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (study_id, spec_sha256) DO NOTHING",
        )
        .bind(id)
        .bind(&s.spec_sha256)
        .bind(&s.spec_text)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("recording the spec revision")?;
        // The plan is the revision's whole job list (see the SQLite backend); imports are kept.
        for table in ["study_jobs", "study_cells"] {
            let sql = format!(
                "DELETE FROM {table} WHERE study_id = $1 AND spec_sha256 = $2
                   AND job_id NOT IN (SELECT id FROM jobs WHERE external = 1)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(id)
                .bind(&s.spec_sha256)
                .execute(&mut *tx)
                .await
                .ctx("clearing the revision's previous plan")?;
        }
        // Upsert jobs in id order: the row locks this takes then come in the same order as
        // those of `reap_expired` and `retry_failed`, so the three cannot deadlock. Deps go in
        // after every job exists (their foreign keys need both ends).
        let mut by_id: Vec<&Job> = plan.jobs.iter().collect();
        by_id.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        for job in &by_id {
            // Params may carry paths that moved; the id (content) is what decides reuse.
            sqlx::query(
                "INSERT INTO jobs (id, kind, label, params, created_at, unit, max_attempts, max_interruptions)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (id) DO UPDATE SET label = excluded.label, params = excluded.params,
                     unit = excluded.unit, max_interruptions = excluded.max_interruptions,
                     max_attempts = CASE WHEN jobs.status = 'pending'
                         THEN GREATEST(excluded.max_attempts, jobs.attempts + 1)
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
        }
        for (seq, job) in plan.jobs.iter().enumerate() {
            for dep in &job.deps {
                sqlx::query(
                    "INSERT INTO job_deps (job_id, dep_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(job.id.as_str())
                .bind(dep.as_str())
                .execute(&mut *tx)
                .await
                .ctx("recording a job dependency")?;
            }
            sqlx::query(
                "INSERT INTO study_jobs (study_id, job_id, spec_sha256, seq, label) VALUES ($1, $2, $3, $4, $5)
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
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
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
        // Rows locked in id order, like `register_plan`'s upserts (no deadlock between them).
        let r = sqlx::query(
            "UPDATE jobs SET status = 'pending', attempts = 0, interruptions = 0, not_before = 0, error = NULL
             WHERE status = 'failed' AND id IN (
                 SELECT j.id FROM jobs j JOIN study_jobs sj ON sj.job_id = j.id
                 WHERE j.status = 'failed' AND sj.study_id = $1 AND sj.spec_sha256 = $2
                 ORDER BY j.id FOR UPDATE OF j)",
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
            "SELECT CAST(COALESCE(SUM(n0 + n), 0) AS BIGINT) FROM cert_results WHERE job_id = $1",
        )
        .bind(job.as_str())
        .fetch_one(&self.pool)
        .await
        .ctx("counting the draws of finished images")?;
        Ok(v as u64)
    }

    async fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        let v: Vec<i64> =
            sqlx::query_scalar("SELECT idx FROM cert_results WHERE job_id = $1 ORDER BY idx")
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
        // One statement for the batch (a round trip per row adds up on a remote server).
        let idx: Vec<i64> = rows.iter().map(|r| r.idx as i64).collect();
        let label: Vec<i64> = rows.iter().map(|r| r.label as i64).collect();
        let predict: Vec<i64> = rows.iter().map(|r| r.predict as i64).collect();
        let correct: Vec<i64> = rows.iter().map(|r| (r.label == r.predict) as i64).collect();
        let sql = format!(
            "INSERT INTO eval_results (job_id, idx, label, predict, correct)
             SELECT $1, * FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
             WHERE {}
             ON CONFLICT (job_id, idx) DO NOTHING",
            holds_lease(6)
        );
        let r = sqlx::query(AssertSqlSafe(sql))
            .bind(job.as_str())
            .bind(&idx)
            .bind(&label)
            .bind(&predict)
            .bind(&correct)
            .bind(lease.job.as_str())
            .bind(&lease.worker.0)
            .execute(&self.pool)
            .await
            .ctx("recording evaluation results")?;
        Ok(r.rows_affected() > 0 || self.holds(lease).await?)
    }

    async fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        let v: Vec<i64> =
            sqlx::query_scalar("SELECT idx FROM eval_results WHERE job_id = $1 ORDER BY idx")
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
            "INSERT INTO train_metrics (job_id, epoch, metrics, at) SELECT $1, $2, $3, $4 WHERE {}
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
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT metrics FROM train_metrics WHERE job_id = $1 ORDER BY epoch",
        )
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
            "SELECT id, name, seed, spec_path, spec_sha256, spec_text FROM studies WHERE name = $1",
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
                    CASE WHEN j.status = 'pending' AND j.id IN (SELECT id FROM dead) THEN 1 ELSE 0 END::bigint AS blocked,
                    {WORK_SECONDS} AS work_seconds
             FROM jobs j JOIN study_jobs sj ON sj.job_id = j.id
             WHERE sj.study_id = $1 AND sj.spec_sha256 = $2 ORDER BY sj.seq"
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
        // Under the plan lock for the same reason as `register_plan`: it reads before it writes.
        let mut tx = self.begin_plan_change().await?;
        let existing: Option<(i64, String, String)> =
            sqlx::query_as("SELECT id, spec_sha256, spec_text FROM studies WHERE name = $1")
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
                     VALUES ($1, '(imported)', '', $2, 0, $3, $4) RETURNING id",
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
            "SELECT COUNT(*) FROM study_jobs WHERE study_id = $1 AND spec_sha256 = $2 AND job_id = $3",
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
            "UPDATE studies SET spec_sha256 = $1, spec_text = $2, updated_at = $3 WHERE id = $4",
        )
        .bind(&rev)
        .bind(&text)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .ctx("recording the new revision")?;
        sqlx::query(
            "INSERT INTO study_revisions (study_id, spec_sha256, spec_text, created_at) VALUES ($1, $2, $3, $4)
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
                 SELECT study_id, $1, {cols} FROM {table} WHERE study_id = $2 AND spec_sha256 = $3"
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
             VALUES ($1, $2, $3, $4, 'done', $5, $6, '{}', $7, $8, $9, 1) ON CONFLICT (id) DO NOTHING",
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
             VALUES ($1, $2, $3, (SELECT COALESCE(MAX(seq), -1) + 1 FROM study_jobs WHERE study_id = $1 AND spec_sha256 = $3), $4)",
        )
        .bind(id)
        .bind(job.id.as_str())
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
                 VALUES ($1, $2, (SELECT COALESCE(MAX(cell), -1) + 1 FROM study_cells WHERE study_id = $1 AND spec_sha256 = $2),
                         $3, $4, $5, $6, $7, $8)",
            )
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
             WHERE c.study_id = $1 AND c.spec_sha256 = $2 ORDER BY c.cell, c.job_id",
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
             WHERE sj.study_id = $1 AND sj.spec_sha256 = $2 ORDER BY c.job_id, c.idx",
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
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (study_id, slurm_job_id) DO NOTHING",
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
             WHERE study_id = $1 ORDER BY submitted_at, slurm_job_id",
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
impl PgStore {
    /// Direct SQL access for tests that need to set up unusual states.
    pub(crate) fn pool_for_tests(&self) -> PgPool {
        self.pool.clone()
    }
}
