//! Runs one store test on every backend: SQLite always, PostgreSQL when `CAF_TEST_POSTGRES`
//! names a server (`postgres://user@host:port/db`, a role that may create databases;
//! `scripts/services.sh start` starts one and prints the line to export). Each test gets a
//! database of its own, a fresh SQLite file or `CREATE DATABASE caf_test_…` dropped afterwards
//! (even when the test panics), so tests run in parallel as cargo runs them.

use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor};

use super::{PgStore, SqliteStore, Store};

/// The variable naming the PostgreSQL server the tests may use.
pub(crate) const PG_ENV: &str = "CAF_TEST_POSTGRES";

/// One test's database on one backend.
pub(crate) trait Fixture: Send + Sync + 'static {
    type S: Store;
    /// A new handle on the fixture's database, as another `caf` process would open it (its
    /// own pool; migrations applied if still pending).
    fn open(&self) -> impl Future<Output = Self::S> + Send;
    /// Runs `sql` directly, for tests that set up states no store method produces.
    fn execute(&self, sql: &'static str) -> impl Future<Output = ()> + Send;
}

pub(crate) struct SqliteFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SqliteFixture {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("caf.db");
        SqliteFixture { _dir: dir, path }
    }
}

impl Fixture for SqliteFixture {
    type S = SqliteStore;

    async fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path.display()))
    }

    async fn execute(&self, sql: &'static str) {
        let s = self.open().await;
        sqlx::query(sql)
            .execute(&s.pool_for_tests())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A database of its own on the `CAF_TEST_POSTGRES` server, dropped with the fixture.
pub(crate) struct PgFixture {
    admin: PgConnectOptions,
    admin_url: String,
    name: String,
}

impl PgFixture {
    /// `None` when `CAF_TEST_POSTGRES` is unset (the caller skips its test). Panics when it is
    /// set but the server cannot be used: a test run meant to cover PostgreSQL must not pass
    /// without it.
    pub(crate) async fn new() -> Option<Self> {
        let url = std::env::var(PG_ENV).ok().filter(|u| !u.is_empty())?;
        let admin = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("{PG_ENV}={}: {e}", super::postgres::redact_url(&url)));
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Unique across the threads of this run (counter) and across runs and processes
        // (pid, clock), so parallel and repeated runs never meet.
        let name = format!(
            "caf_test_{}_{}_{nanos:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = admin
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {PG_ENV}: {e}"));
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = conn.close().await;
        Some(PgFixture {
            admin,
            admin_url: url,
            name,
        })
    }

    pub(crate) fn options(&self) -> PgConnectOptions {
        self.admin.clone().database(&self.name)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The `CAF_TEST_POSTGRES` URL with this fixture's database in place of its own, as a
    /// user would pass it to `--db`.
    pub(crate) fn url(&self) -> String {
        let url = &self.admin_url;
        let authority = url.find("://").map_or(0, |i| i + 3);
        let path = url[authority..]
            .find(['/', '?'])
            .map_or(url.len(), |i| authority + i);
        let query = url[path..].find('?').map_or(url.len(), |i| path + i);
        format!("{}/{}{}", &url[..path], self.name, &url[query..])
    }
}

impl Fixture for PgFixture {
    type S = PgStore;

    async fn open(&self) -> PgStore {
        PgStore::connect(self.options(), &self.name, 4)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.name))
    }

    async fn execute(&self, sql: &'static str) {
        let mut conn = self
            .options()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.name));
        conn.execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let _ = conn.close().await;
    }
}

impl Drop for PgFixture {
    /// Drops the database, closing whatever connections the test left open. On a thread and
    /// runtime of its own: `Drop` cannot await, and the test's runtime may be shutting down.
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let mut conn = admin.connect().await.map_err(|e| e.to_string())?;
                conn.execute(AssertSqlSafe(sql))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = conn.close().await;
                Ok(())
            })
        })
        .join();
        if let Ok(Err(e)) | Err(e) = dropped.map_err(|_| "panicked".to_string()) {
            eprintln!("leaving test database {}: {e}", self.name);
        }
    }
}

/// Runs each named test body (an `async fn(impl Fixture)` in scope) once per backend, as
/// `<name>::sqlite` and `<name>::postgres`. The PostgreSQL run is skipped, saying so, when
/// `CAF_TEST_POSTGRES` is unset; CI sets it.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::store::testing::SqliteFixture::new()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                match $crate::store::testing::PgFixture::new().await {
                    Some(f) => {
                        eprintln!("postgres: running {} in {}", stringify!($name), f.name());
                        super::$name(f).await
                    }
                    None => eprintln!(
                        "postgres: skipped {} ({} is unset)",
                        stringify!($name),
                        $crate::store::testing::PG_ENV
                    ),
                }
            }
        }
    )*};
}
pub(crate) use on_every_backend;
