//! `caf db copy SRC DST [--study NAME …]`: whole studies from one database to another.

use anyhow::{bail, Result};

use caf::store::{CopyOutcome, DbLocation, Store, StoreError};

use super::args::DbCopyArgs;
use super::db::{open_existing_store, open_store, shown};
use super::exit::usage;

pub async fn copy(a: DbCopyArgs) -> Result<i32> {
    let (src_at, dst_at) = (shown(&a.src), shown(&a.dst));
    let same = |p: &std::path::Path| DbLocation::parse(&p.to_string_lossy()).ok();
    if same(&a.src).is_some() && same(&a.src) == same(&a.dst) {
        bail!(usage(format!("source and destination are both {src_at}")));
    }
    let src = open_existing_store(&a.src).await?;
    let all: Vec<String> = src.studies().await?.into_iter().map(|s| s.name).collect();
    let names = if a.studies.is_empty() {
        if all.is_empty() {
            bail!(usage(format!("no studies in {src_at}")));
        }
        all.clone()
    } else {
        a.studies.clone()
    };
    // Every named study must exist before anything is written.
    if let Some(missing) = names.iter().find(|n| !all.contains(n)) {
        bail!(usage(format!(
            "no study `{missing}` in {src_at} (studies: {})",
            if all.is_empty() {
                "none".into()
            } else {
                all.join(", ")
            }
        )));
    }
    let dst = open_store(&a.dst).await?;
    for name in &names {
        let Some(dump) = src.dump_study(name).await? else {
            bail!(usage(format!("study `{name}` disappeared from {src_at}")));
        };
        match dst.load_study(&dump).await {
            Ok(CopyOutcome::Identical) => eprintln!(
                "study {name}: {dst_at} already holds it with the same results; nothing to copy"
            ),
            Ok(CopyOutcome::Copied {
                jobs,
                shared,
                rows,
                released,
            }) => {
                eprintln!(
                    "study {name}: copied to {dst_at}: {jobs} jobs ({shared} of them already \
                     there), {rows} rows"
                );
                if released > 0 {
                    eprintln!(
                        "  {released} job(s) were running in {src_at}; they are pending in the \
                         copy (their finished images are kept)"
                    );
                }
            }
            Err(StoreError::Conflict(msg)) => bail!(usage(msg)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(0)
}
