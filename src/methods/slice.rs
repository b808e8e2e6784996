//! Certifying a slice of test images, resumably: the loop every certification runs (one model,
//! a fused set of models, or `caf certify` outside any study), and the progress bookkeeping of
//! jobs that resume from the images an earlier attempt recorded.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::certify::{Certificate, NoiseKey, Settings, Smooth};
use crate::data::ImageSet;
use crate::sched::{JobContext, JobError};
use crate::store::CertRow;

/// How a run over a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    Finished,
    Interrupted,
}

/// What to certify: images `indices` of `data`, for each member of the smoothed set those its
/// `done` does not contain.
pub struct SliceRun<'a> {
    pub data: &'a ImageSet,
    pub indices: &'a [usize],
    /// One set per member of the smoothed classifier set, in member order.
    pub done: &'a [BTreeSet<u64>],
    pub seed: u64,
    pub sigma: f64,
    pub settings: Settings,
}

impl SliceRun<'_> {
    fn image_done(&self, idx: usize) -> bool {
        self.done.iter().all(|d| d.contains(&(idx as u64)))
    }
}

/// Certifies the slice in index order, one noise stream per image shared by every member,
/// handing each image's new rows (member index, row) to `emit` as soon as they exist, so a
/// crash loses at most the image in flight.
pub fn certify_slice(
    smooth: &Smooth<'_>,
    run: &SliceRun<'_>,
    cancelled: &dyn Fn() -> bool,
    emit: &mut dyn FnMut(Vec<(usize, CertRow)>) -> Result<(), JobError>,
) -> Result<SliceEnd, JobError> {
    let settings = &run.settings;
    settings.validate().map_err(JobError::fatal)?;
    for &idx in run.indices {
        if run.image_done(idx) {
            continue;
        }
        if cancelled() {
            return Ok(SliceEnd::Interrupted);
        }
        let start = Instant::now();
        let image = run.data.image_f32(idx);
        let label = run.data.label(idx) as u32;
        let key = NoiseKey {
            seed: run.seed,
            sigma: run.sigma,
            idx: idx as u64,
        };
        let certs = smooth
            .certify_all(&image, key, settings)
            .map_err(|e| JobError::retryable(format!("image {idx}: {e}")))?;
        // Members share the work: each row records an equal share of the time.
        let seconds = start.elapsed().as_secs_f64() / certs.len().max(1) as f64;
        let rows = certs
            .iter()
            .enumerate()
            .filter(|(m, _)| !run.done.get(*m).is_some_and(|d| d.contains(&(idx as u64))))
            .map(|(m, cert)| {
                let row = cert_row(idx, label, cert, settings, run.sigma, seconds);
                (m, row)
            })
            .collect();
        emit(rows)?;
    }
    Ok(SliceEnd::Finished)
}

/// The stored row of one certificate: Cohen's columns plus what recomputing it needs.
pub fn cert_row(
    idx: usize,
    label: u32,
    cert: &Certificate,
    settings: &Settings,
    sigma: f64,
    seconds: f64,
) -> CertRow {
    let predict = cert.predict.map_or(-1, i64::from);
    CertRow {
        idx: idx as u64,
        label,
        predict,
        radius: cert.radius,
        correct: predict == label as i64,
        c_hat: cert.c_hat,
        n_a: cert.n_a,
        n: cert.n,
        n0: settings.n0,
        alpha: settings.alpha,
        sigma,
        seconds,
    }
}

/// A job's progress over its slice, counted in images every member has finished.
pub struct SliceProgress {
    finished: u64,
    total: u64,
}

impl SliceProgress {
    /// Counts what earlier attempts finished, reports it, and says so in the job's events when
    /// the job resumes (`what`: "certified", "predicted").
    pub fn resume(
        ctx: &JobContext,
        indices: &[usize],
        done: &[BTreeSet<u64>],
        what: &str,
    ) -> Result<Self, JobError> {
        let total = indices.len() as u64;
        let finished = indices
            .iter()
            .filter(|&&i| done.iter().all(|d| d.contains(&(i as u64))))
            .count() as u64;
        ctx.sink.progress(finished, total)?;
        if finished > 0 {
            let msg = format!("resuming: {finished}/{total} images already {what}");
            tracing::info!("{msg}");
            ctx.sink.event("info", &msg)?;
        }
        Ok(Self { finished, total })
    }

    /// `n` more images are finished.
    pub fn advance(&mut self, ctx: &JobContext, n: u64) -> Result<(), JobError> {
        self.finished += n;
        ctx.sink.progress(self.finished, self.total)
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}
