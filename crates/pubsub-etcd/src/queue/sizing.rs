//! How many offsets a queue worker leases at a time, from how fast it
//! finishes its jobs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Load;

/// Smallest lease a worker takes before it has measured its rate.
const MIN_LEASE: u64 = 8;
/// How much work (at a worker's measured rate) one lease takes at most.
const LEASE_WORK: Duration = Duration::from_millis(1000);
/// How often a worker samples how fast it finishes jobs.
const RATE_WINDOW: Duration = Duration::from_millis(200);

/// One worker's measured rate and its last lease size.
#[derive(Debug)]
pub(super) struct LeaseSizer {
    /// Jobs this worker finishes per second while it has some, smoothed.
    rate: f64,
    /// When `rate` was last sampled, and `Load::finished` then.
    sampled: (Instant, u64),
    /// The lease size `next` last allowed.
    last_lease: u64,
}

impl LeaseSizer {
    pub(super) fn new() -> LeaseSizer {
        LeaseSizer {
            rate: 0.0,
            sampled: (Instant::now(), 0),
            last_lease: MIN_LEASE,
        }
    }

    /// How many offsets to lease now: what this worker finishes in
    /// [`LEASE_WORK`] (or a quarter of `ack_wait`, if shorter) at its
    /// measured rate (at least [`MIN_LEASE`], at most `max_batch`), less the
    /// jobs it holds. A worker never leases more than it can finish before
    /// the leases expire, a new worker starts small, and a busy worker comes
    /// back for more often, so many workers on one partition all get work.
    pub(super) fn next(&mut self, load: &Load, ack_wait: Duration, max_batch: u64) -> u64 {
        let finished = load.finished.load(Ordering::Relaxed);
        let outstanding = load.outstanding.load(Ordering::Relaxed);
        let (at, before) = self.sampled;
        let elapsed = at.elapsed();
        if elapsed >= RATE_WINDOW {
            if outstanding > 0 || finished > before {
                let sample = (finished - before) as f64 / elapsed.as_secs_f64();
                self.rate = if self.rate == 0.0 {
                    sample
                } else {
                    (self.rate + sample) / 2.0
                };
            }
            self.sampled = (Instant::now(), finished);
        }
        // At most twice the last lease: the rate was measured before this
        // lease adds to the load.
        let work = LEASE_WORK.min(ack_wait / 4);
        let target = (self.rate * work.as_secs_f64()) as u64;
        let size = target
            .min(self.last_lease.saturating_mul(2))
            .clamp(MIN_LEASE.min(max_batch), max_batch);
        self.last_lease = size;
        size.saturating_sub(outstanding)
    }
}
