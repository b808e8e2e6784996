//! The schema migrations of both backends, embedded in the binary.
//!
//! sqlx's `migrate!` macro would embed them too, but it needs sqlx's `macros` feature, whose
//! proc-macro crate builds a second copy of SQLite's C library for the host: about three
//! minutes of every clean build for one macro call. These are the same [`Migration`]s it
//! builds (version and description from the file name, checksum over the file's text), so a
//! database migrated by an older caf validates against them unchanged.

use std::borrow::Cow;
use std::sync::LazyLock;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::SqlStr;

/// One migration file: its name (`VERSION_DESCRIPTION.sql`) and its text.
type Embedded = (&'static str, &'static str);

/// Both backends' migrations, from one list of file names: every SQLite migration has a
/// PostgreSQL twin of the same name (so both report the same schema version). Adding a
/// migration means adding its name here; a unit test compares the lists with the directories,
/// so a file left out fails the tests rather than a user's database.
macro_rules! embed {
    ($($name:literal),+ $(,)?) => {
        const SQLITE: &[Embedded] =
            &[$(($name, include_str!(concat!("../../migrations/sqlite/", $name)))),+];
        const POSTGRES: &[Embedded] =
            &[$(($name, include_str!(concat!("../../migrations/postgres/", $name)))),+];
    };
}

embed!(
    "20261125000001_init.sql",
    "20261125000002_train_metrics.sql",
    "20261125000003_study_cells.sql",
    "20261125000004_job_precision.sql",
    "20261126000005_study_job_labels.sql",
    "20261128000006_job_unit_external.sql",
    "20261128000007_interruptions_workers.sql",
    "20261128000008_sequential_certification.sql",
    "20261128000009_slurm_jobs.sql",
    "20261128000010_claim_index.sql",
    "20261129000011_job_lookup_indexes.sql",
);

pub static SQLITE_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(SQLITE));
pub static POSTGRES_MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(POSTGRES));

fn migrator(files: &'static [Embedded]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(name, sql)| migration(name, sql))
            .collect(),
    )
}

/// The migration `migrate!` makes of a file: `VERSION_the_description.sql` gives version
/// `VERSION` and description "the description"; a file starting `-- no-transaction` runs
/// outside a transaction.
fn migration(name: &'static str, sql: &'static str) -> Migration {
    let (version, rest) = name.split_once('_').unwrap_or(("", name));
    // The names are the constants above, checked by the tests below: a malformed one is a
    // programming error caught before any release, not something a user can cause.
    let version: i64 = version
        .parse()
        .unwrap_or_else(|_| panic!("migration file {name} has no integer version"));
    let description = rest.trim_end_matches(".sql").replace('_', " ");
    Migration::new(
        version,
        Cow::Owned(description),
        MigrationType::Simple,
        SqlStr::from_static(sql),
        sql.starts_with("-- no-transaction"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk(dir: &str) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .expect("migrations directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_migration_file_is_embedded_in_order() {
        for (dir, files) in [("sqlite", SQLITE), ("postgres", POSTGRES)] {
            let embedded: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
            assert_eq!(embedded, on_disk(dir), "migrations/{dir}");
        }
    }

    #[test]
    fn migrations_are_what_sqlx_reads_from_the_directories() {
        // sqlx's own reading of a directory (what `migrate!` expands to at compile time).
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for (dir, embedded) in [
            ("sqlite", &*SQLITE_MIGRATOR),
            ("postgres", &*POSTGRES_MIGRATOR),
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(dir);
            let read = rt
                .block_on(Migrator::new(path))
                .expect("sqlx reads the directory");
            let key = |m: &Migration| {
                (
                    m.version,
                    m.description.to_string(),
                    m.checksum.to_vec(),
                    m.no_tx,
                    m.sql.as_str().to_string(),
                )
            };
            let a: Vec<_> = embedded.iter().map(key).collect();
            let b: Vec<_> = read.iter().map(key).collect();
            assert!(!a.is_empty(), "migrations/{dir} is empty");
            assert_eq!(a, b, "migrations/{dir}");
        }
    }
}
