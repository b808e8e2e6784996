//! The PostgreSQL backend's side of the job queue: the SQLite backend's leases, with row locks
//! in place of SQLite's single writer. Every statement is its own transaction; none stays open
//! while a job runs. Split from `postgres.rs`, which keeps plans and results.

use std::time::Duration;

use sqlx::{AssertSqlSafe, QueryBuilder, Row};

use super::PgStore;
use crate::plan::JobId;
use crate::queue::{
    interruption_cap_error, Abandoned, Artifact, Claimed, FailOutcome, Lease, Queue, StudyId,
    WorkerId, WorkerInfo,
};
use crate::store::rows::studies_json;
use crate::store::rows::BLOCKED_CTE;
use crate::store::{QueryContext, StoreError};
use crate::util::now_unix;

impl Queue for PgStore {
    type Error = StoreError;

    fn is_transient(e: &StoreError) -> bool {
        e.is_transient()
    }

    async fn register_worker(
        &self,
        worker: &WorkerId,
        info: &WorkerInfo,
    ) -> Result<(), StoreError> {
        let now = now_unix();
        sqlx::query(
            "INSERT INTO workers (id, host, pid, started_at, last_seen, cpu, device, slurm_job_id,
                 slurm_array_job_id, slurm_array_task_id, studies)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, stopped_at = NULL",
        )
        .bind(&worker.0)
        .bind(&info.host)
        .bind(info.pid as i64)
        .bind(now)
        .bind(now)
        .bind(&info.cpu)
        .bind(&info.device)
        .bind(&info.slurm_job_id)
        .bind(&info.slurm_array_job_id)
        .bind(&info.slurm_array_task_id)
        .bind(studies_json(info))
        .execute(&self.pool)
        .await
        .ctx("registering the worker")?;
        Ok(())
    }

    async fn worker_stopped(&self, worker: &WorkerId) -> Result<(), StoreError> {
        let now = now_unix();
        sqlx::query("UPDATE workers SET stopped_at = $1, last_seen = $2 WHERE id = $3")
            .bind(now)
            .bind(now)
            .bind(&worker.0)
            .execute(&self.pool)
            .await
            .ctx("recording that the worker stopped")?;
        Ok(())
    }

    async fn unstopped_workers_on(&self, host: &str) -> Result<Vec<(WorkerId, u32)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, pid FROM workers WHERE host = $1 AND stopped_at IS NULL ORDER BY id",
        )
        .bind(host)
        .fetch_all(&self.pool)
        .await
        .ctx("listing this host's workers")?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, pid)| Some((WorkerId(id), u32::try_from(pid).ok()?)))
            .collect())
    }

    async fn worker_gone(&self, worker: &WorkerId) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await.ctx("starting a transaction")?;
        sqlx::query(
            "UPDATE workers SET stopped_at = last_seen WHERE id = $1 AND stopped_at IS NULL",
        )
        .bind(&worker.0)
        .execute(&mut *tx)
        .await
        .ctx("recording that a worker is gone")?;
        let ended = sqlx::query(
            "UPDATE jobs SET lease_expires = 0 WHERE status = 'running' AND lease_owner = $1",
        )
        .bind(&worker.0)
        .execute(&mut *tx)
        .await
        .ctx("ending a gone worker's leases")?;
        tx.commit().await.ctx("committing a gone worker")?;
        Ok(ended.rows_affected())
    }

    async fn claim(
        &self,
        study: StudyId,
        worker: &WorkerId,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        if kinds.is_empty() {
            return Ok(None);
        }
        // Looked up first, not as a subquery of the claim (as SQLite's claim does): with the
        // revision as a bound value PostgreSQL's planner sees how many rows the study has and
        // joins study_jobs by job id; with a subquery it guessed one row and scanned the
        // study's whole job list for every pending job (1000 no-op jobs, 8 workers: 16 jobs/s
        // instead of hundreds).
        let rev = self.current_revision(study).await?;
        let now = now_unix();
        // The inner SELECT locks its candidate and skips rows other claimers hold, so
        // concurrent claims each get a different job without waiting; PostgreSQL re-checks a
        // locked row's conditions (still pending) before returning it. `OF j`: lock the job
        // row only, not the study_jobs row it was joined with.
        let mut q = QueryBuilder::new("UPDATE jobs SET status = 'running', lease_owner = ");
        q.push_bind(&worker.0)
            .push(", lease_expires = ")
            .push_bind(now + lease.as_secs_f64())
            .push(", attempts = attempts + 1, started_at = COALESCE(started_at, ")
            .push_bind(now)
            .push(") WHERE status = 'pending' AND id = (SELECT j.id FROM jobs j JOIN study_jobs sj ON sj.job_id = j.id WHERE sj.study_id = ")
            .push_bind(study.0)
            .push(" AND sj.spec_sha256 = ")
            .push_bind(rev.clone())
            // Open jobs only (not done, not failed): the partial index study_jobs_open walks
            // them in plan order without passing the finished ones.
            .push(" AND sj.open AND j.status = 'pending' AND j.attempts < j.max_attempts AND j.not_before <= ")
            .push_bind(now)
            .push(" AND j.kind IN (");
        let mut sep = q.separated(", ");
        for k in kinds {
            sep.push_bind(*k);
        }
        q.push(
            ") AND NOT EXISTS (SELECT 1 FROM job_deps d JOIN jobs p ON p.id = d.dep_id
                 WHERE d.job_id = j.id AND p.status <> 'done')
             ORDER BY sj.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED)
             RETURNING id, kind, params, attempts, max_attempts,
                 COALESCE((SELECT sj.label FROM study_jobs sj WHERE sj.job_id = jobs.id AND sj.study_id = ",
        );
        // The claiming study's own name for the job, which another study sharing it may word
        // differently.
        q.push_bind(study.0)
            .push(" AND sj.spec_sha256 = ")
            .push_bind(rev)
            .push("), label) AS label");
        let row = q
            .build()
            .fetch_optional(&self.pool)
            .await
            .ctx("claiming a job")?;
        // An idle worker's claims are its sign of life in `caf status` (throttled while it
        // is handed jobs: see ClaimLiveness).
        if self.claim_liveness.due(now, row.is_some()) {
            self.touch_worker(worker, now).await?;
        }
        let Some(row) = row else { return Ok(None) };
        let get_err = |e: sqlx::Error| StoreError::Query {
            context: "reading a claimed job",
            source: e,
        };
        let params: String = row.try_get("params").map_err(get_err)?;
        Ok(Some(Claimed {
            id: JobId::new(row.try_get::<String, _>("id").map_err(get_err)?),
            kind: row.try_get("kind").map_err(get_err)?,
            label: row.try_get("label").map_err(get_err)?,
            params: serde_json::from_str(&params)
                .map_err(|e| StoreError::Corrupt(format!("job params JSON: {e}")))?,
            attempt: row.try_get::<i64, _>("attempts").map_err(get_err)? as u32,
            max_attempts: row.try_get::<i64, _>("max_attempts").map_err(get_err)? as u32,
        }))
    }

    async fn heartbeat(
        &self,
        job: &JobId,
        worker: &WorkerId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = now_unix();
        let r = sqlx::query(
            "UPDATE jobs SET lease_expires = $1 WHERE id = $2 AND status = 'running' AND lease_owner = $3",
        )
        .bind(now + lease.as_secs_f64())
        .bind(job.as_str())
        .bind(&worker.0)
        .execute(&self.pool)
        .await
        .ctx("extending a lease")?;
        self.touch_worker(worker, now).await?;
        Ok(r.rows_affected() == 1)
    }

    async fn complete(
        &self,
        job: &JobId,
        worker: &WorkerId,
        device: &str,
        result: &serde_json::Value,
        seconds: f64,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'done', result = $1, error = NULL, finished_at = $2, lease_owner = NULL,
                 lease_expires = NULL, run_seconds = run_seconds + $3,
                 ran_host = (SELECT host FROM workers w WHERE w.id = $5),
                 ran_cpu = (SELECT cpu FROM workers w WHERE w.id = $5),
                 ran_device = $6
             WHERE id = $4 AND status = 'running' AND lease_owner = $5",
        )
        .bind(result.to_string())
        .bind(now_unix())
        .bind(seconds)
        .bind(job.as_str())
        .bind(&worker.0)
        .bind(device)
        .execute(&self.pool)
        .await
        .ctx("completing a job")?;
        Ok(r.rows_affected() == 1)
    }

    async fn fail(
        &self,
        job: &JobId,
        worker: &WorkerId,
        error: &str,
        retry_after: Option<Duration>,
        seconds: f64,
    ) -> Result<FailOutcome, StoreError> {
        let now = now_unix();
        let retry = retry_after.map(|d| now + d.as_secs_f64());
        let row = sqlx::query(
            "UPDATE jobs SET
                 status = CASE WHEN $1::double precision IS NOT NULL AND attempts < max_attempts
                               THEN 'pending' ELSE 'failed' END,
                 not_before = COALESCE($1::double precision, not_before), error = $2,
                 lease_owner = NULL, lease_expires = NULL, finished_at = $3, run_seconds = run_seconds + $4
             WHERE id = $5 AND status = 'running' AND lease_owner = $6
             RETURNING status",
        )
        .bind(retry)
        .bind(error)
        .bind(now)
        .bind(seconds)
        .bind(job.as_str())
        .bind(&worker.0)
        .fetch_optional(&self.pool)
        .await
        .ctx("recording a job failure")?;
        match row.map(|r| r.try_get::<String, _>("status")) {
            Some(Ok(s)) if s == "pending" => Ok(FailOutcome::WillRetry),
            Some(Ok(_)) | None => Ok(FailOutcome::Failed),
            Some(Err(source)) => Err(StoreError::Query {
                context: "reading a failure outcome",
                source,
            }),
        }
    }

    async fn release(
        &self,
        job: &JobId,
        worker: &WorkerId,
        reason: &str,
        seconds: f64,
    ) -> Result<FailOutcome, StoreError> {
        let row = sqlx::query(
            "UPDATE jobs SET
                 status = CASE WHEN interruptions + 1 < max_interruptions THEN 'pending' ELSE 'failed' END,
                 error = CASE WHEN interruptions + 1 < max_interruptions THEN $1 ELSE $2 END,
                 attempts = GREATEST(attempts - 1, 0), interruptions = interruptions + 1,
                 lease_owner = NULL, lease_expires = NULL, run_seconds = run_seconds + $3
             WHERE id = $4 AND status = 'running' AND lease_owner = $5
             RETURNING status",
        )
        .bind(reason)
        .bind(interruption_cap_error(reason, self.max_interruptions(job).await?))
        .bind(seconds)
        .bind(job.as_str())
        .bind(&worker.0)
        .fetch_optional(&self.pool)
        .await
        .ctx("releasing a lease")?;
        match row.map(|r| r.try_get::<String, _>("status")) {
            Some(Ok(s)) if s == "failed" => Ok(FailOutcome::Failed),
            // Pending, or no longer ours (whoever holds it now decides).
            Some(Ok(_)) | None => Ok(FailOutcome::WillRetry),
            Some(Err(source)) => Err(StoreError::Query {
                context: "reading a release outcome",
                source,
            }),
        }
    }

    async fn reap_expired(&self) -> Result<Vec<Abandoned>, StoreError> {
        let now = now_unix();
        // Rows locked in id order (as `register_plan` upserts them), skipping any another
        // statement holds right now (a heartbeat racing the reap; the next reap sees it).
        let rows = sqlx::query(
            "UPDATE jobs SET
                 status = CASE WHEN interruptions + 1 < max_interruptions THEN 'pending' ELSE 'failed' END,
                 error = CASE WHEN interruptions + 1 < max_interruptions THEN '' ELSE 'interrupted ' || max_interruptions || ' times (the cap), the last time: ' END
                     || 'interrupted: runner ' || COALESCE(lease_owner, '?') || ' stopped renewing its lease',
                 attempts = GREATEST(attempts - 1, 0), interruptions = interruptions + 1,
                 lease_owner = NULL, lease_expires = NULL
             WHERE status = 'running' AND lease_expires < $1 AND id IN (
                 SELECT id FROM jobs WHERE status = 'running' AND lease_expires < $1
                 ORDER BY id FOR UPDATE SKIP LOCKED)
             RETURNING id, status, error",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .ctx("reaping expired leases")?;
        let mut out = Vec::new();
        for r in rows {
            let get_err = |e: sqlx::Error| StoreError::Query {
                context: "reading a reaped job",
                source: e,
            };
            let status: String = r.try_get("status").map_err(get_err)?;
            let error: String = r.try_get("error").map_err(get_err)?;
            out.push(Abandoned {
                id: JobId::new(r.try_get::<String, _>("id").map_err(get_err)?),
                reason: error,
                outcome: if status == "pending" {
                    FailOutcome::WillRetry
                } else {
                    FailOutcome::Failed
                },
            });
        }
        Ok(out)
    }

    async fn outstanding(&self, study: StudyId) -> Result<(u64, u64), StoreError> {
        let rev = self.current_revision(study).await?;
        let sql = format!(
            "{BLOCKED_CTE}
             SELECT
                 COUNT(*) FILTER (WHERE j.status = 'running') AS running,
                 COUNT(*) FILTER (WHERE j.status = 'pending' AND j.attempts < j.max_attempts
                      AND j.id NOT IN (SELECT id FROM dead)) AS pending
             FROM jobs j JOIN study_jobs sj ON sj.job_id = j.id
             WHERE sj.study_id = $1 AND sj.spec_sha256 = $2"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(study.0)
            .bind(rev)
            .fetch_one(&self.pool)
            .await
            .ctx("counting outstanding jobs")?;
        let running: i64 = row.try_get("running").ctx("counting running jobs")?;
        let pending: i64 = row.try_get("pending").ctx("counting pending jobs")?;
        Ok((running as u64, pending as u64))
    }

    async fn set_progress(&self, lease: &Lease, done: u64, total: u64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE jobs SET progress_done = $1, progress_total = $2
             WHERE id = $3 AND status = 'running' AND lease_owner = $4",
        )
        .bind(done as i64)
        .bind(total as i64)
        .bind(lease.job.as_str())
        .bind(&lease.worker.0)
        .execute(&self.pool)
        .await
        .ctx("recording progress")?;
        Ok(r.rows_affected() == 1)
    }

    async fn log_event(
        &self,
        job: Option<&JobId>,
        worker: Option<&WorkerId>,
        level: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events (at, job_id, worker, level, message) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(now_unix())
        .bind(job.map(|j| j.as_str().to_string()))
        .bind(worker.map(|w| w.0.clone()))
        .bind(level)
        .bind(message)
        .execute(&self.pool)
        .await
        .ctx("logging an event")?;
        Ok(())
    }

    async fn record_artifact(&self, lease: &Lease, a: &Artifact) -> Result<bool, StoreError> {
        let sql = format!(
            "INSERT INTO artifacts (job_id, name, path, sha256, bytes, created_at)
             SELECT $1, $2, $3, $4, $5, $6 WHERE {}
             ON CONFLICT (job_id, name) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,
                 bytes = excluded.bytes, created_at = excluded.created_at",
            super::holds_lease(7)
        );
        let r = sqlx::query(AssertSqlSafe(sql))
            .bind(lease.job.as_str())
            .bind(&a.name)
            .bind(&a.path)
            .bind(&a.sha256)
            .bind(a.bytes as i64)
            .bind(now_unix())
            .bind(lease.job.as_str())
            .bind(&lease.worker.0)
            .execute(&self.pool)
            .await
            .ctx("recording an artifact")?;
        Ok(r.rows_affected() > 0)
    }

    async fn artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, StoreError> {
        let row = sqlx::query(
            "SELECT name, path, sha256, bytes FROM artifacts WHERE job_id = $1 AND name = $2",
        )
        .bind(job.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up an artifact")?;
        let Some(r) = row else { return Ok(None) };
        let g = |e: sqlx::Error| StoreError::Query {
            context: "reading an artifact row",
            source: e,
        };
        Ok(Some(Artifact {
            name: r.try_get("name").map_err(g)?,
            path: r.try_get("path").map_err(g)?,
            sha256: r.try_get("sha256").map_err(g)?,
            bytes: r.try_get::<i64, _>("bytes").map_err(g)? as u64,
        }))
    }
}

impl PgStore {
    /// The worker's sign of life for `caf status` (claims and lease heartbeats).
    async fn touch_worker(&self, worker: &WorkerId, now: f64) -> Result<(), StoreError> {
        sqlx::query("UPDATE workers SET last_seen = $1 WHERE id = $2")
            .bind(now)
            .bind(&worker.0)
            .execute(&self.pool)
            .await
            .ctx("updating the worker heartbeat")?;
        Ok(())
    }

    /// The job's interruption cap, for the error of the release that reaches it.
    async fn max_interruptions(&self, job: &JobId) -> Result<u32, StoreError> {
        let cap: Option<i64> =
            sqlx::query_scalar("SELECT max_interruptions FROM jobs WHERE id = $1")
                .bind(job.as_str())
                .fetch_optional(&self.pool)
                .await
                .ctx("reading the interruption cap")?;
        Ok(cap.unwrap_or(crate::queue::DEFAULT_MAX_INTERRUPTIONS as i64) as u32)
    }
}
