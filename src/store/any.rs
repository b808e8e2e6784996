//! One store type for whichever backend a `--db` value names: a plain path or `sqlite:PATH`
//! (SQLite, as caf always did) or a `postgres://`/`postgresql://` URL (PostgreSQL). The CLI
//! opens with [`open`] and stays generic over nothing: [`AnyStore`] implements [`Queue`] and
//! [`Store`] by delegating to the backend it holds.

use std::path::PathBuf;
use std::time::Duration;

pub use super::postgres::redact_url;
use super::postgres::PgStore;
use super::*;
use crate::plan::{CellRecord, Job};

#[derive(Clone)]
pub enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl std::fmt::Debug for AnyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnyStore({})", self.backend())
    }
}

/// Where a `--db` value points, before anything is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DbLocation {
    Sqlite(PathBuf),
    /// The URL as given (the password included: the connection needs it).
    Postgres(String),
}

impl DbLocation {
    /// Parses `db`: `postgres://…` or `postgresql://…` is PostgreSQL, `sqlite:PATH` (also
    /// `sqlite://PATH`) and anything else is an SQLite file path. Only an empty value, or a
    /// scheme-only one, is an error.
    pub fn parse(db: &str) -> Result<Self, StoreError> {
        let lower = db.get(..13).unwrap_or(db).to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            let host_part = &db[db.find("://").map_or(0, |i| i + 3)..];
            if host_part.is_empty() {
                return Err(StoreError::BadLocation(format!(
                    "`{}` names no server",
                    redact_url(db)
                )));
            }
            return Ok(DbLocation::Postgres(db.to_string()));
        }
        let path = if lower.starts_with("sqlite:") {
            let rest = &db["sqlite:".len()..];
            rest.strip_prefix("//").unwrap_or(rest)
        } else {
            db
        };
        if path.is_empty() {
            return Err(StoreError::BadLocation(format!(
                "`{db}` names no database file"
            )));
        }
        Ok(DbLocation::Sqlite(PathBuf::from(path)))
    }

    /// How messages name this database: the path, or the URL without its password.
    pub fn shown(&self) -> String {
        match self {
            DbLocation::Sqlite(p) => p.display().to_string(),
            DbLocation::Postgres(url) => redact_url(url),
        }
    }
}

/// Opens the database `db` names (see [`DbLocation::parse`]), applying pending migrations.
pub async fn open(db: &str) -> Result<AnyStore, StoreError> {
    open_with(db, DEFAULT_CONNECTIONS).await
}

/// As [`open`], with at most `connections` pooled connections: a worker running `slots` jobs
/// at once wants `slots + 1` (each job's writes, and the claims and heartbeats), no more, since
/// a cluster's workers share one PostgreSQL server's connection limit.
pub async fn open_with(db: &str, connections: u32) -> Result<AnyStore, StoreError> {
    match DbLocation::parse(db)? {
        DbLocation::Sqlite(path) => Ok(AnyStore::Sqlite(
            SqliteStore::open_with(&path, connections).await?,
        )),
        DbLocation::Postgres(url) => Ok(AnyStore::Postgres(
            PgStore::open_with(&url, connections).await?,
        )),
    }
}

impl AnyStore {
    /// Which backend this is, for logs: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

/// Calls the same method on whichever backend `self` holds.
macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $call.await,
            AnyStore::Postgres($s) => $call.await,
        }
    };
}

impl Queue for AnyStore {
    type Error = StoreError;

    fn is_transient(e: &StoreError) -> bool {
        e.is_transient()
    }

    async fn register_worker(
        &self,
        worker: &WorkerId,
        info: &WorkerInfo,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.register_worker(worker, info))
    }

    async fn worker_stopped(&self, worker: &WorkerId) -> Result<(), StoreError> {
        delegate!(self, s => s.worker_stopped(worker))
    }

    async fn unstopped_workers_on(&self, host: &str) -> Result<Vec<(WorkerId, u32)>, StoreError> {
        delegate!(self, s => s.unstopped_workers_on(host))
    }

    async fn worker_gone(&self, worker: &WorkerId) -> Result<u64, StoreError> {
        delegate!(self, s => s.worker_gone(worker))
    }

    async fn claim(
        &self,
        study: StudyId,
        worker: &WorkerId,
        kinds: &[&str],
        lease: Duration,
    ) -> Result<Option<Claimed>, StoreError> {
        delegate!(self, s => s.claim(study, worker, kinds, lease))
    }

    async fn heartbeat(
        &self,
        job: &JobId,
        worker: &WorkerId,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.heartbeat(job, worker, lease))
    }

    async fn complete(
        &self,
        job: &JobId,
        worker: &WorkerId,
        device: &str,
        result: &serde_json::Value,
        seconds: f64,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.complete(job, worker, device, result, seconds))
    }

    async fn fail(
        &self,
        job: &JobId,
        worker: &WorkerId,
        error: &str,
        retry_after: Option<Duration>,
        seconds: f64,
    ) -> Result<FailOutcome, StoreError> {
        delegate!(self, s => s.fail(job, worker, error, retry_after, seconds))
    }

    async fn release(
        &self,
        job: &JobId,
        worker: &WorkerId,
        reason: &str,
        seconds: f64,
    ) -> Result<FailOutcome, StoreError> {
        delegate!(self, s => s.release(job, worker, reason, seconds))
    }

    async fn reap_expired(&self) -> Result<Vec<Abandoned>, StoreError> {
        delegate!(self, s => s.reap_expired())
    }

    async fn outstanding(&self, study: StudyId) -> Result<(u64, u64), StoreError> {
        delegate!(self, s => s.outstanding(study))
    }

    async fn set_progress(&self, lease: &Lease, done: u64, total: u64) -> Result<bool, StoreError> {
        delegate!(self, s => s.set_progress(lease, done, total))
    }

    async fn log_event(
        &self,
        job: Option<&JobId>,
        worker: Option<&WorkerId>,
        level: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        delegate!(self, s => s.log_event(job, worker, level, message))
    }

    async fn record_artifact(
        &self,
        lease: &Lease,
        artifact: &Artifact,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.record_artifact(lease, artifact))
    }

    async fn artifact(&self, job: &JobId, name: &str) -> Result<Option<Artifact>, StoreError> {
        delegate!(self, s => s.artifact(job, name))
    }
}

impl Store for AnyStore {
    async fn register_plan(&self, plan: &Plan) -> Result<StudyId, StoreError> {
        delegate!(self, s => s.register_plan(plan))
    }

    async fn retry_failed(&self, study: StudyId) -> Result<u64, StoreError> {
        delegate!(self, s => s.retry_failed(study))
    }

    async fn record_cert(
        &self,
        lease: &Lease,
        job: &JobId,
        row: &CertRow,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.record_cert(lease, job, row))
    }

    async fn cert_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        delegate!(self, s => s.cert_done(job))
    }

    async fn cert_draws(&self, job: &JobId) -> Result<u64, StoreError> {
        delegate!(self, s => s.cert_draws(job))
    }

    async fn record_eval(
        &self,
        lease: &Lease,
        job: &JobId,
        rows: &[EvalRow],
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.record_eval(lease, job, rows))
    }

    async fn eval_done(&self, job: &JobId) -> Result<Vec<u64>, StoreError> {
        delegate!(self, s => s.eval_done(job))
    }

    async fn record_epoch(
        &self,
        lease: &Lease,
        job: &JobId,
        epoch: u64,
        metrics: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.record_epoch(lease, job, epoch, metrics))
    }

    async fn epochs(&self, job: &JobId) -> Result<Vec<serde_json::Value>, StoreError> {
        delegate!(self, s => s.epochs(job))
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        delegate!(self, s => s.workers())
    }

    async fn studies(&self) -> Result<Vec<StudyInfo>, StoreError> {
        delegate!(self, s => s.studies())
    }

    async fn study_by_name(&self, name: &str) -> Result<StudyInfo, StoreError> {
        delegate!(self, s => s.study_by_name(name))
    }

    async fn study_jobs(&self, study: StudyId) -> Result<Vec<JobStatus>, StoreError> {
        delegate!(self, s => s.study_jobs(study))
    }

    async fn import_results(
        &self,
        study: &str,
        job: &Job,
        cell: &CellRecord,
        rows: &[CertRow],
    ) -> Result<StudyId, StoreError> {
        delegate!(self, s => s.import_results(study, job, cell, rows))
    }

    async fn study_cells(&self, study: StudyId) -> Result<Vec<CellRow>, StoreError> {
        delegate!(self, s => s.study_cells(study))
    }

    async fn study_cert_results(
        &self,
        study: StudyId,
    ) -> Result<Vec<(JobId, CertRow)>, StoreError> {
        delegate!(self, s => s.study_cert_results(study))
    }

    async fn record_slurm_job(&self, study: StudyId, job: &SlurmJob) -> Result<(), StoreError> {
        delegate!(self, s => s.record_slurm_job(study, job))
    }

    async fn slurm_jobs(&self, study: StudyId) -> Result<Vec<SlurmJob>, StoreError> {
        delegate!(self, s => s.slurm_jobs(study))
    }

    async fn dump_study(&self, name: &str) -> Result<Option<StudyDump>, StoreError> {
        delegate!(self, s => s.dump_study(name))
    }

    async fn load_study(&self, dump: &StudyDump) -> Result<CopyOutcome, StoreError> {
        delegate!(self, s => s.load_study(dump))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_and_sqlite_urls_are_sqlite_files() {
        for (db, path) in [
            ("caf.db", "caf.db"),
            ("/data/runs/caf.db", "/data/runs/caf.db"),
            ("sqlite:caf.db", "caf.db"),
            ("sqlite:/abs/caf.db", "/abs/caf.db"),
            ("sqlite:///abs/caf.db", "/abs/caf.db"),
            ("SQLite:x.db", "x.db"),
            // A relative path that merely contains a colon is still a path.
            ("runs:old/caf.db", "runs:old/caf.db"),
        ] {
            assert_eq!(
                DbLocation::parse(db).unwrap(),
                DbLocation::Sqlite(PathBuf::from(path)),
                "{db}"
            );
        }
    }

    #[test]
    fn postgres_urls_are_postgres() {
        for url in [
            "postgres://caf@db.example:5432/caf",
            "postgresql://caf:secret@10.0.0.5/caf?sslmode=require",
            "POSTGRES://h/db",
        ] {
            assert_eq!(
                DbLocation::parse(url).unwrap(),
                DbLocation::Postgres(url.to_string())
            );
        }
    }

    #[test]
    fn empty_locations_are_errors() {
        for db in ["", "sqlite:", "postgres://", "postgresql://"] {
            let err = DbLocation::parse(db).unwrap_err();
            assert!(matches!(err, StoreError::BadLocation(_)), "{db}: {err}");
        }
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://caf:s3cr3t@db:5432/caf"),
            "postgres://caf:***@db:5432/caf"
        );
        // '@' and ':' inside the password: the credentials end at the authority's last '@'.
        assert_eq!(
            redact_url("postgresql://u:p@ss:w@host/db?x=1"),
            "postgresql://u:***@host/db?x=1"
        );
        for plain in [
            "postgres://caf@db/caf",
            "postgres://db/caf",
            "caf.db",
            "postgres://h/db?user=a@b",
        ] {
            assert_eq!(redact_url(plain), plain);
        }
        assert_eq!(
            redact_url("postgres://db/caf?sslmode=require&password=s3cr3t&user=caf"),
            "postgres://db/caf?sslmode=require&password=***&user=caf"
        );
        let loc = DbLocation::parse("postgres://caf:s3cr3t@db/caf").unwrap();
        assert_eq!(loc.shown(), "postgres://caf:***@db/caf");
    }

    /// The error of a connection that fails names the server without its password, and comes
    /// at once rather than after the pool's acquire timeout.
    #[tokio::test]
    async fn open_errors_name_the_url_without_its_password() {
        // Port 1 on localhost: nothing listens there, so the connection is refused at once.
        let started = std::time::Instant::now();
        let err = open("postgres://caf:s3cr3t@127.0.0.1:1/caf")
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(10), "{err}");
        assert!(err.contains("postgres://caf:***@127.0.0.1:1/caf"), "{err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }

    /// A `postgres://` URL opens PostgreSQL, and the store works through the enum.
    #[tokio::test]
    async fn a_url_opens_postgres() {
        let Some(f) = crate::store::testing::PgFixture::new().await else {
            eprintln!("postgres: skipped a_url_opens_postgres (CAF_TEST_POSTGRES is unset)");
            return;
        };
        eprintln!("postgres: running a_url_opens_postgres in {}", f.name());
        let s = open(&f.url()).await.unwrap();
        assert_eq!(s.backend(), "postgres");
        let a = crate::plan::testing::job("test", "a", &[]);
        let study = s
            .register_plan(&crate::plan::testing::plan("p", vec![a.clone()]))
            .await
            .unwrap();
        let me = WorkerId("w".into());
        let c = s
            .claim(study, &me, &["test"], Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.id, a.id);
        assert!(s
            .complete(&a.id, &me, "cpu", &serde_json::json!({}), 1.0)
            .await
            .unwrap());
        assert_eq!(s.study_jobs(study).await.unwrap()[0].state, JobState::Done);
    }

    #[tokio::test]
    async fn a_path_opens_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("any.db");
        let s = open(&format!("sqlite:{}", path.display())).await.unwrap();
        assert_eq!(s.backend(), "sqlite");
        assert!(path.exists());
        assert!(s.studies().await.unwrap().is_empty());
    }
}
