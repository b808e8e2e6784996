//! The `--db` database and the study in it that a command works on.

use std::path::Path;

use anyhow::{bail, Context, Result};

use caf::store::{SqliteStore, Store, StoreError, StudyInfo};

use super::exit::usage;

/// Opens the database, creating it and its folder if missing: for commands that write a study.
pub async fn open_store(db: &Path) -> Result<SqliteStore> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(SqliteStore::open(db).await?)
}

/// Opens an existing database for reading commands; a missing file is a usage error, since
/// creating an empty one would only hide a mistyped `--db`.
pub async fn open_existing_store(db: &Path) -> Result<SqliteStore> {
    if !db.exists() {
        bail!(usage(format!(
            "no database at {} (run a study first, or pass --db)",
            db.display()
        )));
    }
    open_store(db).await
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
                    db.display(),
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
                0 => bail!(usage(format!("no studies in {}", db.display()))),
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
