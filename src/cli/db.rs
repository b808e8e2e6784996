//! The `--db` database and the study in it that a command works on.

use std::path::Path;

use anyhow::{bail, Context, Result};

use caf::store::{AnyStore, DbLocation, Store, StoreError, StudyInfo};

use super::exit::usage;

/// Where `--db` points: an SQLite path (`sqlite:PATH` too) or a `postgres://` URL.
fn location(db: &Path) -> Result<DbLocation> {
    DbLocation::parse(&db.to_string_lossy()).map_err(|e| usage(e.to_string()))
}

/// How messages name the database: its path, or its URL without the password.
pub fn shown(db: &Path) -> String {
    location(db).map_or_else(|_| db.display().to_string(), |l| l.shown())
}

/// Opens the database, creating an SQLite file and its folder if missing: for commands that
/// write a study. A PostgreSQL database must exist (caf creates its tables, not the database).
pub async fn open_store(db: &Path) -> Result<AnyStore> {
    open_store_with(db, caf::store::DEFAULT_CONNECTIONS).await
}

/// As [`open_store`], with at most `connections` pooled connections (a worker: its slots + 1).
pub async fn open_store_with(db: &Path, connections: u32) -> Result<AnyStore> {
    if let DbLocation::Sqlite(path) = location(db)? {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    Ok(caf::store::open_with(&db.to_string_lossy(), connections).await?)
}

/// Opens an existing database for reading commands; a missing SQLite file is a usage error,
/// since creating an empty one would only hide a mistyped `--db`.
pub async fn open_existing_store(db: &Path) -> Result<AnyStore> {
    open_existing_store_with(db, caf::store::DEFAULT_CONNECTIONS).await
}

/// As [`open_existing_store`], with at most `connections` pooled connections.
pub async fn open_existing_store_with(db: &Path, connections: u32) -> Result<AnyStore> {
    if let DbLocation::Sqlite(path) = location(db)? {
        if !path.exists() {
            bail!(usage(format!(
                "no database at {} (run a study first, or pass --db)",
                path.display()
            )));
        }
    }
    open_store_with(db, connections).await
}

/// The named study, or the only one in the database.
pub async fn pick_study(store: &impl Store, name: Option<&str>, db: &Path) -> Result<StudyInfo> {
    Ok(match name {
        Some(name) => match store.study_by_name(name).await {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => {
                let names: Vec<String> =
                    store.studies().await?.into_iter().map(|s| s.name).collect();
                bail!(usage(format!(
                    "no study `{name}` in {} (studies: {})",
                    shown(db),
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                )))
            }
            Err(e) => return Err(e.into()),
        },
        None => {
            let mut all = store.studies().await?;
            match all.len() {
                1 => all.remove(0),
                0 => bail!(usage(format!("no studies in {}", shown(db)))),
                _ => {
                    let names: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
                    bail!(usage(format!(
                        "several studies in the database; name one of: {}",
                        names.join(", ")
                    )))
                }
            }
        }
    })
}
