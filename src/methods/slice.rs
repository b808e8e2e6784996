//! Certifying a slice of test images, resumably: the loop every certification runs (one model,
//! a fused set of models, or `caf certify` outside any study), and the progress bookkeeping of
//! jobs that resume from the images an earlier attempt recorded.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::certify::{
    Certificate, NoiseKey, SequentialCertificate, SequentialSettings, Settings, Smooth,
};
use crate::data::Images;
use crate::sched::{JobContext, JobError};
use crate::store::{CertRow, SequentialRow};

/// How each image is certified.
#[derive(Clone, Debug, PartialEq)]
pub enum Procedure {
    /// Cohen et al.'s CERTIFY with a fixed n.
    Cohen(Settings),
    /// Sequential certification at chosen radii (`crate::certify::sequential`).
    Sequential {
        settings: SequentialSettings,
        /// Stop after selection when ĉ is not the label.
        stop_if_wrong: bool,
    },
}

impl Procedure {
    fn validate(&self) -> Result<(), JobError> {
        match self {
            Procedure::Cohen(s) => s.validate().map_err(JobError::fatal),
            Procedure::Sequential { settings, .. } => settings.validate().map_err(JobError::fatal),
        }
    }

    /// The most forward passes one member may spend on one image.
    pub fn budget_per_image(&self) -> u64 {
        match self {
            Procedure::Cohen(s) => s.n0 + s.n,
            Procedure::Sequential { settings, .. } => settings.n0 + settings.n_max,
        }
    }

    pub fn is_sequential(&self) -> bool {
        matches!(self, Procedure::Sequential { .. })
    }
}

/// How a run over a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    Finished,
    Interrupted,
}

/// What to certify: images `indices` of `data`, for each member of the smoothed set those its
/// `done` does not contain.
pub struct SliceRun<'a> {
    pub data: &'a dyn Images,
    pub indices: &'a [usize],
    /// One set per member of the smoothed classifier set, in member order.
    pub done: &'a [BTreeSet<u64>],
    pub seed: u64,
    pub sigma: f64,
    pub procedure: Procedure,
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
    run.procedure.validate()?;
    for &idx in run.indices {
        if run.image_done(idx) {
            continue;
        }
        if cancelled() {
            return Ok(SliceEnd::Interrupted);
        }
        let start = Instant::now();
        let image = run
            .data
            .floats(&[idx])
            .map_err(|e| JobError::fatal(format!("image {idx}: {e}")))?;
        let label = run.data.label(idx) as u32;
        let key = NoiseKey {
            seed: run.seed,
            sigma: run.sigma,
            idx: idx as u64,
        };
        let failed = |e: &dyn std::fmt::Display| JobError::retryable(format!("image {idx}: {e}"));
        let rows: Vec<CertRow> = match &run.procedure {
            Procedure::Cohen(settings) => {
                let certs = smooth
                    .certify_all(&image, key, settings)
                    .map_err(|e| failed(&e))?;
                // Members share the work: each row records an equal share of the time.
                let seconds = start.elapsed().as_secs_f64() / certs.len().max(1) as f64;
                certs
                    .iter()
                    .map(|cert| cert_row(idx, label, cert, settings, run.sigma, seconds))
                    .collect()
            }
            Procedure::Sequential {
                settings,
                stop_if_wrong,
            } => {
                let certs = smooth
                    .certify_sequential_all(&image, key, settings, stop_if_wrong.then_some(label))
                    .map_err(|e| failed(&e))?;
                // Members share batches until they stop: time is shared by the draws each used.
                let seconds = start.elapsed().as_secs_f64();
                let draws: u64 = certs.iter().map(|c| settings.n0 + c.draws).sum();
                certs
                    .iter()
                    .map(|cert| {
                        let share = (settings.n0 + cert.draws) as f64 / draws.max(1) as f64;
                        sequential_row(idx, label, cert, settings, run.sigma, seconds * share)
                    })
                    .collect()
            }
        };
        let rows = rows
            .into_iter()
            .enumerate()
            .filter(|(m, _)| !run.done.get(*m).is_some_and(|d| d.contains(&(idx as u64))))
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
        sequential: None,
    }
}

/// The stored row of a sequential certificate: `n` is the estimation draws used, and the
/// sequential columns hold what recomputing the bound and the decisions needs.
pub fn sequential_row(
    idx: usize,
    label: u32,
    cert: &SequentialCertificate,
    settings: &SequentialSettings,
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
        n: cert.draws,
        n0: settings.n0,
        alpha: settings.alpha,
        sigma,
        seconds,
        sequential: Some(SequentialRow {
            n_max: settings.n_max,
            lower: cert.lower,
            upper: cert.upper,
            prior_a: settings.prior.a,
            prior_b: settings.prior.b,
            radii: cert.decisions.iter().map(|d| d.radius).collect(),
            decisions: cert.decisions.iter().map(|d| d.decision).collect(),
            stopped_wrong: cert.stopped_wrong,
        }),
    }
}

/// What a certification job's progress counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Counted {
    /// Images every member has finished (Cohen: every image costs the same).
    Images,
    /// Forward passes (n0 + draws used, summed over members): a sequential image costs from
    /// n0 to n0 + n_max, so images say little about the time left. `spent` is what earlier
    /// attempts recorded; `budget` is the most one image may cost (all members), used for
    /// the projection until an image has finished.
    Draws { spent: u64, budget: u64 },
}

/// A job's progress over its slice, counted in images every member has finished, or in draws.
pub struct SliceProgress {
    finished: u64,
    total: u64,
    counted: Counted,
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
        Self::resume_counting(ctx, indices, done, what, Counted::Images)
    }

    /// [`Self::resume`], counting `counted`.
    pub fn resume_counting(
        ctx: &JobContext,
        indices: &[usize],
        done: &[BTreeSet<u64>],
        what: &str,
        counted: Counted,
    ) -> Result<Self, JobError> {
        let total = indices.len() as u64;
        let finished = indices
            .iter()
            .filter(|&&i| done.iter().all(|d| d.contains(&(i as u64))))
            .count() as u64;
        let progress = Self {
            finished,
            total,
            counted,
        };
        progress.report(ctx)?;
        if finished > 0 {
            let msg = format!("resuming: {finished}/{total} images already {what}");
            tracing::info!("{msg}");
            ctx.sink.event("info", &msg)?;
        }
        Ok(progress)
    }

    /// (done, total) in the counted unit. In draws, the total is a projection: the draws spent
    /// plus the images left at the mean cost so far (the budget before any image finished), so
    /// `caf status` turns it into an ETA at the measured draws per second.
    fn counts(&self) -> (u64, u64) {
        match self.counted {
            Counted::Images => (self.finished, self.total),
            Counted::Draws { spent, budget } => {
                let left = self.total.saturating_sub(self.finished);
                let per_image = if self.finished > 0 {
                    spent.div_ceil(self.finished)
                } else {
                    budget
                };
                (spent, spent.saturating_add(left.saturating_mul(per_image)))
            }
        }
    }

    fn report(&self, ctx: &JobContext) -> Result<(), JobError> {
        let (done, total) = self.counts();
        ctx.sink.progress(done, total)
    }

    /// `n` more images are finished.
    pub fn advance(&mut self, ctx: &JobContext, n: u64) -> Result<(), JobError> {
        self.finished += n;
        self.report(ctx)
    }

    /// One more image is finished, with these (recorded) rows.
    pub fn image_done(
        &mut self,
        ctx: &JobContext,
        rows: &[(usize, CertRow)],
    ) -> Result<(), JobError> {
        if let Counted::Draws { spent, .. } = &mut self.counted {
            *spent += rows.iter().map(|(_, r)| r.n0 + r.n).sum::<u64>();
        }
        self.advance(ctx, 1)
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}
