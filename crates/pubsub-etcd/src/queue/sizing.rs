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
    /// The size of the last lease taken: `next` allows at most twice it.
    last_lease: u64,
    /// The size `next` last allowed, which `took` makes `last_lease`.
    allowed: u64,
}

impl LeaseSizer {
    pub(super) fn new() -> LeaseSizer {
        LeaseSizer {
            rate: 0.0,
            sampled: (Instant::now(), 0),
            last_lease: MIN_LEASE,
            allowed: MIN_LEASE,
        }
    }

    /// How many offsets to lease now: what this worker finishes in
    /// [`LEASE_WORK`] (or a quarter of `ack_wait`, if shorter) at its
    /// measured rate (at least [`MIN_LEASE`], at most `max_batch`), less the
    /// jobs it holds. A worker never leases more than it can finish before
    /// the leases expire, a new worker starts small, and a busy worker comes
    /// back for more often, so many workers on one partition all get work.
    ///
    /// A worker leases again only once it holds at most half of its last
    /// lease size, so leases stay large where topping up after every few
    /// jobs made many small ones (0 means not yet). Until its rate is
    /// measured, each such top-up doubles the size (a slow start): waiting
    /// [`RATE_WINDOW`] at [`MIN_LEASE`] cost a quarter of a one-second
    /// drain, and a worker must finish half of one size to get the next.
    /// Only a lease taken counts ([`LeaseSizer::took`]): rounds that find no
    /// work do not grow the size of a worker that has finished nothing.
    pub(super) fn next(&mut self, load: &Load, ack_wait: Duration, max_batch: u64) -> u64 {
        let finished = load.finished.load(Ordering::Relaxed);
        let outstanding = load.outstanding.load(Ordering::Relaxed);
        if outstanding > self.last_lease / 2 {
            return 0;
        }
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
        let target = if self.rate == 0.0 {
            u64::MAX
        } else {
            (self.rate * work.as_secs_f64()) as u64
        };
        let size = target
            .min(self.last_lease.saturating_mul(2))
            .clamp(MIN_LEASE.min(max_batch), max_batch);
        self.allowed = size;
        size.saturating_sub(outstanding)
    }

    /// The round that asked [`LeaseSizer::next`] took a lease.
    pub(super) fn took(&mut self) {
        self.last_lease = self.allowed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(outstanding: u64, finished: u64) -> Load {
        let load = Load::default();
        load.outstanding.store(outstanding, Ordering::Relaxed);
        load.finished.store(finished, Ordering::Relaxed);
        load
    }

    #[test]
    fn a_new_worker_doubles_its_lease_until_its_rate_is_known() {
        let mut sizer = LeaseSizer::new();
        let wait = Duration::from_secs(30);
        let sizes: Vec<u64> = (0..8)
            .map(|_| {
                let size = sizer.next(&load(0, 0), wait, 1024);
                sizer.took();
                size
            })
            .collect();
        assert_eq!(sizes, [16, 32, 64, 128, 256, 512, 1024, 1024]);
        assert_eq!(sizer.next(&load(0, 0), wait, 100), 100);
    }

    #[test]
    fn rounds_that_take_no_lease_do_not_grow_it() {
        let mut sizer = LeaseSizer::new();
        let wait = Duration::from_secs(30);
        for _ in 0..10 {
            assert_eq!(sizer.next(&load(0, 0), wait, 1024), 16);
        }
        sizer.took();
        assert_eq!(sizer.next(&load(0, 0), wait, 1024), 32);
    }

    #[test]
    fn a_worker_tops_up_only_once_it_used_half_of_its_lease() {
        let mut sizer = LeaseSizer::new();
        let wait = Duration::from_secs(30);
        assert_eq!(sizer.next(&load(0, 0), wait, 1024), 16);
        sizer.took();
        // Holding its first lease, a worker gets no more, nor a larger size.
        assert_eq!(sizer.next(&load(16, 0), wait, 1024), 0);
        assert_eq!(sizer.next(&load(9, 7), wait, 1024), 0);
        assert_eq!(sizer.next(&load(8, 8), wait, 1024), 32 - 8);
        sizer.took();
        for _ in 0..4 {
            sizer.next(&load(0, 8), wait, 1024);
            sizer.took();
        }
        assert_eq!(sizer.next(&load(257, 8), wait, 1024), 0);
        assert_eq!(sizer.next(&load(256, 8), wait, 1024), 1024 - 256);
    }

    #[test]
    fn a_measured_rate_bounds_the_lease() {
        let mut sizer = LeaseSizer::new();
        sizer.rate = 40.0;
        sizer.sampled = (Instant::now(), 0);
        sizer.last_lease = 1024;
        // 40 jobs/s, a quarter of a 400 ms ack_wait: 4 jobs, raised to the minimum.
        assert_eq!(
            sizer.next(&load(0, 0), Duration::from_millis(400), 1024),
            MIN_LEASE
        );
        sizer.took();
        // One second of work at 40 jobs/s is 40, but at most twice the last lease.
        assert_eq!(sizer.next(&load(0, 0), Duration::from_secs(30), 1024), 16);
    }
}
