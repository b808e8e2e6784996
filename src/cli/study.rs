//! The study a spec describes: loading and planning it, and recording it in a store, as `caf
//! run` and `caf submit` both do before any job runs.

use std::path::Path;

use anyhow::Result;

use caf::methods;
use caf::plan::Plan;
use caf::spec::Spec;
use caf::store::{AnyStore, Store, StudyId};

use super::db::open_store_with;
use super::exit::usage;

/// Loads and plans a spec; any problem with it is a usage error (exit 2, nothing written).
pub fn load_plan(path: &Path) -> Result<Plan> {
    let spec = Spec::load(path).map_err(|e| usage(e.to_string()))?;
    Plan::from_spec(&spec, &methods::planner()).map_err(|e| usage(e.to_string()))
}

/// Records `plan` in the database `db` names (created if it is an SQLite file), and with
/// `retry_failed` gives its failed jobs fresh attempts.
/// The store is opened with `connections` pooled connections (see [`open_store_with`]).
pub async fn record(
    plan: &Plan,
    db: &Path,
    retry_failed: bool,
    connections: u32,
) -> Result<(AnyStore, StudyId)> {
    let store = open_store_with(db, connections).await?;
    let study = store.register_plan(plan).await?;
    if retry_failed {
        let n = store.retry_failed(study).await?;
        if n > 0 {
            eprintln!("retrying {n} failed job(s)");
        }
    }
    Ok((store, study))
}
