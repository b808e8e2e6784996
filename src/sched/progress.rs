//! Live progress of a run: a bar per running job on a terminal, plain log lines otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::plan::JobId;

pub trait Progress: Send + Sync {
    fn job_started(&self, id: &JobId, label: &str);
    fn job_progress(&self, id: &JobId, done: u64, total: u64);
    fn job_finished(&self, id: &JobId, label: &str, outcome: &str);
}

/// indicatif bars, one per running job.
pub struct TerminalProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<JobId, ProgressBar>>,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        }
    }
}

impl TerminalProgress {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Progress for TerminalProgress {
    fn job_started(&self, id: &JobId, label: &str) {
        let bar = self.multi.add(ProgressBar::new(0));
        let style =
            ProgressStyle::with_template("{prefix:>32} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.chars().take(32).collect::<String>());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(id.clone(), bar);
        }
    }
    fn job_progress(&self, id: &JobId, done: u64, total: u64) {
        if let Ok(bars) = self.bars.lock() {
            if let Some(bar) = bars.get(id) {
                bar.set_length(total);
                bar.set_position(done);
            }
        }
    }
    fn job_finished(&self, id: &JobId, label: &str, outcome: &str) {
        if let Ok(mut bars) = self.bars.lock() {
            if let Some(bar) = bars.remove(id) {
                bar.finish_and_clear();
            }
        }
        let _ = self.multi.println(format!("{label} [{id}]: {outcome}"));
    }
}

/// `tracing` lines at most every `every` per job, for logs and pipes.
pub struct LogProgress {
    every: Duration,
    state: Mutex<HashMap<JobId, (Instant, Instant)>>,
}

impl LogProgress {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(HashMap::new()),
        }
    }
}

impl Progress for LogProgress {
    fn job_started(&self, id: &JobId, label: &str) {
        tracing::info!(job = %id, "{label}: started");
        if let Ok(mut s) = self.state.lock() {
            s.insert(id.clone(), (Instant::now(), Instant::now()));
        }
    }
    fn job_progress(&self, id: &JobId, done: u64, total: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        let Some((started, last)) = s.get_mut(id) else {
            return;
        };
        if last.elapsed() >= self.every || done == total {
            *last = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            tracing::info!("{done}/{total} ({secs:.1} s elapsed)");
        }
    }
    fn job_finished(&self, id: &JobId, label: &str, outcome: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.remove(id);
        }
        tracing::info!(job = %id, "{label}: {outcome}");
    }
}

/// Reports nothing (tests, `--quiet`).
pub struct NoProgress;

impl Progress for NoProgress {
    fn job_started(&self, _: &JobId, _: &str) {}
    fn job_progress(&self, _: &JobId, _: u64, _: u64) {}
    fn job_finished(&self, _: &JobId, _: &str, _: &str) {}
}
