//! How often a worker's claims write its sign of life (`workers.last_seen`).

use std::sync::atomic::{AtomicU64, Ordering};

/// A claim that finds nothing always writes `last_seen` (an idle worker's claims are its only
/// sign of life in `caf status`); one that hands out a job writes it at most once a second, since
/// a sweep of short jobs claims many times a second, `caf status` shows whole seconds, and a job
/// in flight keeps it fresh through its lease heartbeats. On the 2-core Zen 3 this saved one of
/// the eight store statements of a 44 ms certification job.
#[derive(Debug, Default)]
pub(crate) struct ClaimLiveness {
    /// Unix time (f64 bits) of the last write through a claim; 0 = never.
    last: AtomicU64,
}

impl ClaimLiveness {
    /// Seconds between two writes through claims that hand out jobs.
    const INTERVAL: f64 = 1.0;

    /// Whether a claim at unix time `now` that `claimed` a job (or not) writes `last_seen`;
    /// when it does, the write is recorded as done.
    pub(crate) fn due(&self, now: f64, claimed: bool) -> bool {
        let last = f64::from_bits(self.last.load(Ordering::Relaxed));
        if claimed && now - last < Self::INTERVAL && now >= last {
            return false;
        }
        self.last.store(now.to_bits(), Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimLiveness;

    #[test]
    fn idle_claims_always_write_and_busy_ones_once_a_second() {
        let l = ClaimLiveness::default();
        assert!(l.due(100.0, true), "the first claim writes");
        assert!(!l.due(100.4, true));
        assert!(!l.due(100.99, true));
        assert!(l.due(100.5, false), "a claim that found nothing writes");
        assert!(!l.due(101.2, true));
        assert!(l.due(101.6, true), "a second after the last write");
        assert!(l.due(50.0, true), "a clock that went back writes");
    }
}
