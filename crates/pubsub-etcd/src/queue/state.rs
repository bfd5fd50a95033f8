//! The queue state of one partition (see DESIGN.md, "Queue mode"): which
//! offsets are leased to whom, which wait for redelivery, and the pure
//! transitions the lease and settle protocols apply to it before their
//! compare-and-swap.
//!
//! Over 500 lines with its tests: the transitions share the state's
//! invariant (every offset below `next` in at most one range) and its
//! checks of values read from etcd, so they stay in one place.

use serde::{Deserialize, Serialize};

/// Most ranges (lease ranges plus pending spans) a state may hold before new
/// leases are refused, which bounds how far nacks and scattered acks grow it.
pub(crate) const MAX_RANGES: usize = 4096;
/// Longest nack reason kept, in bytes.
pub(crate) const MAX_REASON: usize = 256;

/// Offsets `[from, to)` leased to one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub worker: String,
    pub id: u64,
    pub deadline_ms: i64,
    pub deliveries: u32,
    pub ranges: Vec<(u64, u64)>,
}

/// Delivered but unsettled offsets `[from, to)` that wait for redelivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pending {
    pub from: u64,
    pub to: u64,
    pub deliveries: u32,
    pub not_before_ms: i64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    pub inc: i64,
    pub next: u64,
    #[serde(default)]
    pub leases: Vec<Lease>,
    #[serde(default)]
    pub pending: Vec<Pending>,
    #[serde(default)]
    pub redelivered: u64,
    #[serde(default)]
    pub dead_lettered: u64,
    #[serde(default)]
    pub terminated: u64,
    #[serde(default)]
    pub expired: u64,
}

/// What a lease request took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Taken {
    pub from: u64,
    pub to: u64,
    pub deliveries: u32,
    /// The last nack reason of redelivered offsets.
    pub reason: String,
}

/// One settle operation of a flush.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Op {
    Ack(u64),
    Term(u64),
    DeadLettered(u64),
    Nack {
        offset: u64,
        lease: u64,
        not_before_ms: i64,
        reason: String,
    },
    Extend {
        lease: u64,
        deadline_ms: i64,
    },
    /// A job never handed to the caller (the worker closed first): due at
    /// once, and its delivery does not count.
    Release {
        offset: u64,
        lease: u64,
    },
}

impl State {
    pub(crate) fn fresh(inc: i64, next: u64) -> Self {
        State {
            inc,
            next,
            ..State::default()
        }
    }

    /// Checks what the protocols rely on of a state read from etcd, so a
    /// garbage value that still parses is refused instead of delivering an
    /// offset twice at once, overflowing a count or stalling forever: every
    /// range non-empty, below `next` and disjoint from every other, delivery
    /// counts from 1 to below `u32::MAX`, reasons of at most [`MAX_REASON`]
    /// bytes, and `next` not beyond the partition's `head` when that was
    /// read in the same snapshot.
    pub(crate) fn validate(&self, head: Option<u64>) -> Result<(), String> {
        if let Some(head) = head.filter(|&h| self.next > h) {
            return Err(format!(
                "next {} is beyond the partition head {head}",
                self.next
            ));
        }
        let mut ranges = Vec::with_capacity(self.ranges());
        for lease in &self.leases {
            check_deliveries(lease.deliveries)?;
            if lease.ranges.is_empty() {
                return Err(format!(
                    "lease {} of {:?} has no ranges",
                    lease.id, lease.worker
                ));
            }
            ranges.extend(lease.ranges.iter().copied());
        }
        for p in &self.pending {
            // 0: released before its first delivery reached a caller.
            check_deliveries(p.deliveries.max(1))?;
            if p.reason.len() > MAX_REASON {
                return Err(format!(
                    "pending reason of {} bytes, above {MAX_REASON}",
                    p.reason.len()
                ));
            }
            ranges.push((p.from, p.to));
        }
        ranges.sort_unstable();
        let mut end = 0;
        for &(from, to) in &ranges {
            if from >= to || to > self.next {
                return Err(format!(
                    "range [{from}, {to}) is empty or not below next {}",
                    self.next
                ));
            }
            if from < end {
                return Err(format!("range [{from}, {to}) overlaps another one"));
            }
            end = to;
        }
        Ok(())
    }

    /// The earliest time (ms) at which a lease expires or a pending span
    /// becomes due: when an idle worker must look again even if nothing is
    /// written.
    pub(crate) fn next_due_ms(&self) -> Option<i64> {
        let deadlines = self.leases.iter().map(|l| l.deadline_ms);
        let due = self.pending.iter().map(|p| p.not_before_ms);
        deadlines.chain(due).min()
    }

    /// Everything below is settled.
    pub(crate) fn low_watermark(&self) -> u64 {
        let leased = self
            .leases
            .iter()
            .flat_map(|l| l.ranges.iter().map(|r| r.0));
        let pending = self.pending.iter().map(|p| p.from);
        leased
            .chain(pending)
            .min()
            .unwrap_or(self.next)
            .min(self.next)
    }

    pub(crate) fn ranges(&self) -> usize {
        self.leases.iter().map(|l| l.ranges.len()).sum::<usize>() + self.pending.len()
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.leases
            .iter()
            .flat_map(|l| l.ranges.iter())
            .map(|(a, b)| b - a)
            .sum()
    }

    pub(crate) fn pending_count(&self) -> u64 {
        self.pending.iter().map(|p| p.to - p.from).sum()
    }

    /// Moves the ranges of leases whose deadline passed to `pending`.
    pub(crate) fn expire(&mut self, now_ms: i64) {
        let (expired, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leases)
            .into_iter()
            .partition(|l| l.deadline_ms <= now_ms);
        self.leases = live;
        for lease in expired {
            for (from, to) in lease.ranges {
                self.expired = self.expired.saturating_add(to - from);
                self.pending.push(Pending {
                    from,
                    to,
                    deliveries: lease.deliveries,
                    not_before_ms: lease.deadline_ms,
                    reason: String::new(),
                });
            }
        }
    }

    /// Takes a lease for `worker`: due pending offsets first, else fresh ones
    /// below `head`, at most a share of them: what is left divided by the
    /// workers expected on this partition (`sharers`) or holding leases on
    /// it, whichever are more, so that every worker finds some. Refuses
    /// (None) when nothing is due or the state is full.
    /// Offsets taken again count as redelivered unless they are past
    /// `max_deliveries` (those go to the dead-letter topic, not to a worker).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take(
        &mut self,
        worker: &str,
        id: u64,
        head: u64,
        sharers: usize,
        max: u64,
        max_deliveries: u32,
        now_ms: i64,
        deadline_ms: i64,
    ) -> Option<Taken> {
        if self.ranges() >= MAX_RANGES || max == 0 {
            return None;
        }
        let due = self.pending.iter().position(|p| p.not_before_ms <= now_ms);
        let taken = if let Some(i) = due {
            let p = &mut self.pending[i];
            let to = p.to.min(p.from + max);
            let taken = Taken {
                from: p.from,
                to,
                deliveries: p.deliveries + 1,
                reason: p.reason.clone(),
            };
            if to == p.to {
                self.pending.remove(i);
            } else {
                p.from = to;
            }
            if taken.deliveries > 1 && taken.deliveries <= max_deliveries {
                self.redelivered = self.redelivered.saturating_add(to - taken.from);
            }
            taken
        } else {
            if head <= self.next {
                return None;
            }
            let holders = self.holders();
            let fresh = head - self.next - self.reserved_among(worker, head, sharers, holders);
            if fresh == 0 {
                return None;
            }
            let share = fresh.div_ceil((holders + 1).max(sharers) as u64);
            let to = self.next + share.clamp(1, max);
            let taken = Taken {
                from: self.next,
                to,
                deliveries: 1,
                reason: String::new(),
            };
            self.next = to;
            taken
        };
        self.leases.push(Lease {
            worker: worker.to_string(),
            id,
            deadline_ms,
            deliveries: taken.deliveries,
            ranges: vec![(taken.from, taken.to)],
        });
        Some(taken)
    }

    /// How many workers hold a lease.
    fn holders(&self) -> usize {
        let mut holders: Vec<&str> = self.leases.iter().map(|l| l.worker.as_str()).collect();
        holders.sort_unstable();
        holders.dedup();
        holders.len()
    }

    /// How many of the fresh offsets below `head` `worker` must leave to
    /// the workers expected on this partition (`sharers`) that hold no
    /// lease on it: one each, if `worker` holds one itself. A race of
    /// compare-and-swaps favours no one, so without this a worker that
    /// keeps losing could watch the others take the whole backlog lease
    /// after lease.
    pub(crate) fn reserved(&self, worker: &str, head: u64, sharers: usize) -> u64 {
        self.reserved_among(worker, head, sharers, self.holders())
    }

    /// [`State::reserved`] with the number of lease holders already counted.
    fn reserved_among(&self, worker: &str, head: u64, sharers: usize, holders: usize) -> u64 {
        if !self.leases.iter().any(|l| l.worker == worker) {
            return 0;
        }
        let without = sharers.saturating_sub(holders) as u64;
        without.min(head.saturating_sub(self.next))
    }

    /// Removes `offset` from whatever lease or pending span holds it; true
    /// when it was unsettled.
    fn settle(&mut self, offset: u64) -> bool {
        for lease in &mut self.leases {
            if remove(&mut lease.ranges, offset) {
                self.leases.retain(|l| !l.ranges.is_empty());
                return true;
            }
        }
        if let Some(i) = self
            .pending
            .iter()
            .position(|p| p.from <= offset && offset < p.to)
        {
            let p = self.pending.remove(i);
            if p.from < offset {
                self.pending.push(Pending {
                    to: offset,
                    ..p.clone()
                });
            }
            if offset + 1 < p.to {
                self.pending.push(Pending {
                    from: offset + 1,
                    ..p
                });
            }
            return true;
        }
        false
    }

    /// Whether `offset` is unsettled (in a lease or a pending span).
    fn holds(&self, offset: u64) -> bool {
        let leased = self
            .leases
            .iter()
            .flat_map(|l| &l.ranges)
            .any(|&(a, b)| a <= offset && offset < b);
        leased
            || self
                .pending
                .iter()
                .any(|p| p.from <= offset && offset < p.to)
    }

    /// Whether any offset of `[from, to)` is unsettled.
    fn holds_any(&self, from: u64, to: u64) -> bool {
        let leased = self
            .leases
            .iter()
            .flat_map(|l| &l.ranges)
            .any(|&(a, b)| a < to && from < b);
        leased || self.pending.iter().any(|p| p.from < to && from < p.to)
    }

    /// Settles every offset of `[from, to)`, in time proportional to the
    /// ranges held, not to the size of the range.
    fn settle_range(&mut self, from: u64, to: u64) {
        for lease in &mut self.leases {
            lease.ranges = subtract(&lease.ranges, from, to);
        }
        self.leases.retain(|l| !l.ranges.is_empty());
        let mut kept = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            for (a, b) in subtract(&[(p.from, p.to)], from, to) {
                kept.push(Pending {
                    from: a,
                    to: b,
                    ..p.clone()
                });
            }
        }
        self.pending = kept;
    }

    /// Whether applying `op` of `worker` would change nothing. Once true it
    /// stays true: offsets only go from unsettled to settled, a lease only
    /// loses offsets and its deadline only grows.
    pub(crate) fn is_settled(&self, worker: &str, op: &Op) -> bool {
        let lease = |id: u64| {
            self.leases
                .iter()
                .find(move |l| l.id == id && l.worker == worker)
        };
        match op {
            Op::Ack(o) | Op::Term(o) | Op::DeadLettered(o) => !self.holds(*o),
            Op::Nack {
                offset, lease: id, ..
            }
            | Op::Release { offset, lease: id } => !lease(*id)
                .is_some_and(|l| l.ranges.iter().any(|&(a, b)| a <= *offset && *offset < b)),
            Op::Extend {
                lease: id,
                deadline_ms,
            } => lease(*id).is_none_or(|l| l.deadline_ms >= *deadline_ms),
        }
    }

    /// Moves `offset` from lease `lease` of `worker` to pending, its
    /// delivery count lowered by `undo`.
    fn unlease(
        &mut self,
        worker: &str,
        offset: u64,
        lease: u64,
        undo: u32,
        not_before_ms: i64,
        reason: String,
    ) {
        let Some(l) = self
            .leases
            .iter_mut()
            .find(|l| l.id == lease && l.worker == worker)
        else {
            return;
        };
        if remove(&mut l.ranges, offset) {
            self.pending.push(Pending {
                from: offset,
                to: offset + 1,
                deliveries: l.deliveries - undo,
                not_before_ms,
                reason,
            });
            self.leases.retain(|l| !l.ranges.is_empty());
        }
    }

    /// Applies one settle operation of `worker`.
    pub(crate) fn apply(&mut self, worker: &str, op: &Op) {
        match op {
            Op::Ack(offset) => {
                self.settle(*offset);
            }
            Op::Term(offset) => {
                if self.settle(*offset) {
                    self.terminated = self.terminated.saturating_add(1);
                }
            }
            Op::DeadLettered(offset) => {
                if self.settle(*offset) {
                    self.dead_lettered = self.dead_lettered.saturating_add(1);
                }
            }
            Op::Nack {
                offset,
                lease,
                not_before_ms,
                reason,
            } => {
                let mut reason = reason.clone();
                truncate(&mut reason, MAX_REASON);
                self.unlease(worker, *offset, *lease, 0, *not_before_ms, reason);
            }
            Op::Release { offset, lease } => {
                self.unlease(worker, *offset, *lease, 1, 0, String::new());
            }
            Op::Extend { lease, deadline_ms } => {
                if let Some(l) = self
                    .leases
                    .iter_mut()
                    .find(|l| l.id == *lease && l.worker == worker)
                {
                    l.deadline_ms = l.deadline_ms.max(*deadline_ms);
                }
            }
        }
    }
}

fn check_deliveries(deliveries: u32) -> Result<(), String> {
    if deliveries == 0 || deliveries == u32::MAX {
        return Err(format!("delivery count {deliveries} is out of range"));
    }
    Ok(())
}

/// `ranges` without `[from, to)`.
fn subtract(ranges: &[(u64, u64)], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges {
        if b <= from || to <= a {
            out.push((a, b));
            continue;
        }
        if a < from {
            out.push((a, from));
        }
        if to < b {
            out.push((to, b));
        }
    }
    out
}

/// The settle operations one worker made on one partition that may not be
/// in the partition's state yet: acks as sorted disjoint offset ranges
/// (a worker acks mostly contiguous offsets), everything else one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Settled {
    #[serde(default)]
    pub acked: Vec<(u64, u64)>,
    #[serde(default)]
    pub ops: Vec<Op>,
}

impl Settled {
    pub(crate) fn push(&mut self, op: Op) {
        match op {
            Op::Ack(offset) => insert(&mut self.acked, offset),
            other => self.ops.push(other),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.acked.is_empty() && self.ops.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.acked.len() + self.ops.len()
    }

    /// Applies these operations of `worker` to `state`; true if that changed
    /// it.
    pub(crate) fn apply_to(&self, worker: &str, state: &mut State) -> bool {
        let before = state.clone();
        for &(from, to) in &self.acked {
            state.settle_range(from, to);
        }
        for op in &self.ops {
            state.apply(worker, op);
        }
        *state != before
    }

    /// Drops what `state` already reflects; true if anything was dropped.
    pub(crate) fn prune(&mut self, worker: &str, state: &State) -> bool {
        let before = self.len();
        self.acked.retain(|&(a, b)| state.holds_any(a, b));
        self.ops.retain(|op| !state.is_settled(worker, op));
        self.len() != before
    }

    /// Refuses what no worker writes: empty or unsorted ack ranges, and
    /// reasons beyond [`MAX_REASON`].
    pub(crate) fn validate(&self) -> Result<(), String> {
        let mut end = 0;
        for (i, &(a, b)) in self.acked.iter().enumerate() {
            if a >= b || (i > 0 && a <= end) {
                return Err(format!(
                    "acked range [{a}, {b}) is empty, unsorted or touches another"
                ));
            }
            end = b;
        }
        for op in &self.ops {
            if let Op::Nack { reason, .. } = op {
                if reason.len() > MAX_REASON {
                    return Err(format!(
                        "nack reason of {} bytes, above {MAX_REASON}",
                        reason.len()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Adds `offset` to sorted disjoint ranges, joining neighbours.
fn insert(ranges: &mut Vec<(u64, u64)>, offset: u64) {
    let i = ranges.partition_point(|&(_, b)| b < offset);
    if let Some(r) = ranges.get_mut(i) {
        if r.0 <= offset && offset < r.1 {
            return;
        }
        if r.1 == offset {
            r.1 = offset + 1;
            if ranges.get(i + 1).is_some_and(|n| n.0 == offset + 1) {
                ranges[i].1 = ranges[i + 1].1;
                ranges.remove(i + 1);
            }
            return;
        }
        if r.0 == offset + 1 {
            r.0 = offset;
            return;
        }
    }
    ranges.insert(i, (offset, offset + 1));
}

/// Removes `offset` from sorted disjoint ranges, splitting the one holding it.
fn remove(ranges: &mut Vec<(u64, u64)>, offset: u64) -> bool {
    let Some(i) = ranges.iter().position(|&(a, b)| a <= offset && offset < b) else {
        return false;
    };
    let (a, b) = ranges[i];
    match (a < offset, offset + 1 < b) {
        (false, false) => {
            ranges.remove(i);
        }
        (true, false) => ranges[i].1 = offset,
        (false, true) => ranges[i].0 = offset + 1,
        (true, true) => {
            ranges[i].1 = offset;
            ranges.insert(i + 1, (offset + 1, b));
        }
    }
    true
}

pub(crate) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_settle_and_the_watermark_follows() {
        let mut s = State::fresh(1, 0);
        let t = s.take("w", 1, 10, 0, 4, 5, 0, 100).unwrap();
        assert_eq!((t.from, t.to, t.deliveries), (0, 4, 1));
        s.apply("w", &Op::Ack(1));
        assert_eq!(s.low_watermark(), 0);
        s.apply("w", &Op::Ack(0));
        assert_eq!(s.low_watermark(), 2);
        s.apply("w", &Op::Ack(2));
        s.apply("w", &Op::Ack(3));
        assert!(s.leases.is_empty());
        assert_eq!(s.low_watermark(), 4);
        s.apply("w", &Op::Ack(3));
        assert_eq!(
            s,
            State {
                next: 4,
                ..State::fresh(1, 0)
            }
        );
    }

    #[test]
    fn expiry_and_nack_redeliver_with_counts() {
        let mut s = State::fresh(1, 0);
        s.take("a", 1, 3, 0, 3, 5, 0, 100).unwrap();
        s.apply(
            "a",
            &Op::Nack {
                offset: 1,
                lease: 1,
                not_before_ms: 500,
                reason: "x".repeat(1000),
            },
        );
        s.apply(
            "b",
            &Op::Nack {
                offset: 0,
                lease: 1,
                not_before_ms: 0,
                reason: String::new(),
            },
        );
        s.expire(100);
        assert_eq!((s.expired, s.redelivered), (2, 0));
        let t = s.take("b", 1, 3, 0, 10, 5, 100, 200).unwrap();
        assert_eq!((t.from, t.to, t.deliveries), (0, 1, 2));
        let t = s.take("b", 2, 3, 0, 10, 5, 100, 200).unwrap();
        assert_eq!((t.from, t.to), (2, 3));
        assert_eq!(
            s.take("b", 3, 3, 0, 10, 5, 100, 200),
            None,
            "the nack delay holds"
        );
        let t = s.take("b", 3, 3, 0, 10, 5, 500, 600).unwrap();
        assert_eq!((t.from, t.deliveries, t.reason.len()), (1, 2, MAX_REASON));
        assert_eq!(
            (s.expired, s.redelivered),
            (2, 3),
            "nacks count as redelivered"
        );
    }

    #[test]
    fn fresh_offsets_are_shared_between_workers() {
        let mut s = State::fresh(1, 0);
        let mut got = Vec::new();
        for w in 0..50 {
            let t = s.take(&format!("w{w}"), 1, 2000, 0, 256, 5, 0, 10);
            got.push(t.map_or(0, |t| t.to - t.from));
        }
        assert!(got.iter().all(|&n| n >= 1), "{got:?}");
        assert!(s.next <= 2000);
    }

    #[test]
    fn the_first_of_many_running_workers_leaves_the_rest_to_the_others() {
        let mut s = State::fresh(1, 0);
        let t = s.take("w0", 1, 2000, 50, 256, 5, 0, 10).unwrap();
        assert_eq!((t.from, t.to), (0, 40), "a fiftieth of the backlog");
        let alone = State::fresh(1, 0).take("w0", 1, 2000, 1, 256, 5, 0, 10);
        assert_eq!(alone.map(|t| t.to), Some(256), "alone: up to its maximum");
        // w0 holds a lease; two of the three running workers hold none.
        let mut s = State::fresh(1, 0);
        s.take("w0", 1, 3, 3, 256, 5, 0, 10).unwrap();
        assert_eq!(s.next, 1);
        assert_eq!(s.reserved("w0", 3, 3), 2);
        assert_eq!(
            s.take("w0", 2, 3, 3, 256, 5, 0, 10),
            None,
            "left to the others"
        );
        assert_eq!(s.reserved("w1", 3, 3), 0);
        assert!(s.take("w1", 1, 3, 3, 256, 5, 0, 10).is_some());
    }

    #[test]
    fn settled_ops_coalesce_apply_and_prune() {
        let mut s = State::fresh(1, 0);
        s.take("a", 1, 100, 0, 10, 5, 0, 100).unwrap();
        let mut settled = Settled::default();
        for o in [3, 1, 2, 0, 7, 5, 6] {
            settled.push(Op::Ack(o));
        }
        assert_eq!(settled.acked, [(0, 4), (5, 8)]);
        settled.validate().unwrap();
        settled.push(Op::Term(4));
        let mut merged = s.clone();
        assert!(settled.apply_to("a", &mut merged));
        assert_eq!(
            (merged.leases[0].ranges.clone(), merged.terminated),
            (vec![(8, 10)], 1)
        );
        assert!(!settled.clone().prune("a", &s));
        assert!(settled.prune("a", &merged) && settled.is_empty());
        assert!(!Settled::default().apply_to("a", &mut merged));
        let bad = Settled {
            acked: vec![(5, 9), (2, 3)],
            ops: vec![],
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn in_progress_extends_only_the_owners_lease() {
        let mut s = State::fresh(1, 0);
        s.take("a", 7, 5, 0, 5, 5, 0, 100).unwrap();
        s.apply(
            "b",
            &Op::Extend {
                lease: 7,
                deadline_ms: 900,
            },
        );
        assert_eq!(s.leases[0].deadline_ms, 100);
        s.apply(
            "a",
            &Op::Extend {
                lease: 7,
                deadline_ms: 900,
            },
        );
        s.expire(500);
        assert_eq!(s.in_flight(), 5);
    }
}
