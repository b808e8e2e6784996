//! `caf certify`: Cohen et al.'s certify.py on one model, outside any study (or sequential
//! certification at chosen radii with `--mode sequential`).

use std::io::Write;

use anyhow::{bail, Context, Result};

use caf::certify::Settings;
use caf::data::Split;
use caf::methods::certify_job::SequentialParams;
use caf::methods::common::Slice;
use caf::methods::slice::{certify_slice, Procedure, SliceEnd, SliceRun};
use caf::sched::{CancelFlag, JobError};

use super::args::{CertifyArgs, CertifyModeArg, CertifyModeArgs};
use super::cohen_tsv;
use super::exit::{self, usage};
use super::model::{load_classifier, load_data};
use super::signals::{self, Notices};

/// The procedure `--mode` asks for, validated (a usage error otherwise). Sequential runs spend
/// at most `--n-max` (default `--n`) estimation draws.
pub fn procedure(settings: Settings, m: &CertifyModeArgs) -> Result<Procedure> {
    let sequential = match m.mode {
        _ if !m.stages.is_empty() && m.mode != CertifyModeArg::Staged => {
            bail!(usage("--stages applies to --mode staged only"));
        }
        CertifyModeArg::Staged => bail!(usage(
            "--mode staged is a comparison run by `caf bench certify --mode staged`; a \
             certification takes --mode cohen or sequential"
        )),
        CertifyModeArg::Cohen => {
            if !m.radii.is_empty() || m.n_max.is_some() || m.stop_if_wrong {
                bail!(usage(
                    "--radii, --n-max and --stop-if-wrong apply to --mode sequential only"
                ));
            }
            settings.validate().map_err(|e| usage(e.to_string()))?;
            return Ok(Procedure::Cohen(settings));
        }
        CertifyModeArg::Sequential => {
            if m.radii.windows(2).any(|w| w[0] >= w[1]) {
                bail!(usage("--radii must be strictly ascending"));
            }
            SequentialParams::new(m.radii.clone(), m.stop_if_wrong)
        }
    };
    let settings = Settings {
        n: m.n_max.unwrap_or(settings.n),
        ..settings
    };
    let p = sequential.procedure(&settings);
    if let Procedure::Sequential { settings, .. } = &p {
        settings.validate().map_err(|e| usage(e.to_string()))?;
    }
    Ok(p)
}

pub fn certify(a: CertifyArgs) -> Result<i32> {
    let settings = Settings {
        n0: a.n0,
        n: a.n,
        alpha: a.alpha,
        batch: a.batch,
    };
    let procedure = procedure(settings, &a.mode)?;
    if !(a.sigma.is_finite() && a.sigma > 0.0) {
        bail!(usage(format!("--sigma must be > 0, got {}", a.sigma)));
    }
    if a.skip == 0 {
        bail!(usage("--skip must be at least 1"));
    }
    let (model, device) = load_classifier(&a.model)?;
    let set = load_data(&a.model, Split::Test, model.as_ref())?;
    let indices = Slice {
        skip: a.skip,
        max: a.max,
    }
    .indices(set.len());
    let file =
        std::fs::File::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut out = std::io::BufWriter::new(file);
    cohen_tsv::write_header(&mut out)?;
    out.flush()?;
    let shutdown = CancelFlag::new();
    signals::stop_on_signal(
        shutdown.clone(),
        Notices {
            stopping: "\nstopping after the image in flight…",
            aborted: None,
        },
    );
    let mut count = 0usize;
    let done = [Default::default()];
    let run = SliceRun {
        data: set.as_ref(),
        indices: &indices,
        done: &done,
        seed: a.seed,
        sigma: a.sigma,
        procedure,
    };
    let smooth = caf::certify::Smooth::new(model.as_ref(), a.sigma, device.clone())
        .with_input(set.shape().tuple());
    let end = certify_slice(&smooth, &run, &|| shutdown.is_cancelled(), &mut |rows| {
        // One model: at most one row per image.
        let Some((_, r)) = rows.into_iter().next() else {
            return Ok(());
        };
        // Flushed per row, like Cohen's certify.py, so a partial log is usable.
        cohen_tsv::write_row(&mut out, &r)
            .and_then(|_| out.flush())
            .map_err(|e| JobError::fatal(format!("writing {}: {e}", a.out.display())))?;
        count += 1;
        tracing::info!(
            idx = r.idx,
            predict = r.predict,
            radius = r.radius,
            "certified"
        );
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!(e.message))?;
    eprintln!("wrote {count} rows to {}", a.out.display());
    Ok(match end {
        SliceEnd::Finished => 0,
        SliceEnd::Interrupted => exit::INTERRUPTED,
    })
}
