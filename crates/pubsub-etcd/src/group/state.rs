//! What the two halves of a group member share: the consumer front that the
//! application calls and the background member task. [`MemberState`] holds
//! which partitions are owned under which claim, how long the lease is known
//! to be valid, and what has been delivered and committed; every read and
//! change of it is one method here, so its lock is taken in one place and
//! never across an await. Rebalance [`Event`]s reach the application as
//! [`Notice`]s, a `Revoking` with the [`Ack`] that releases it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::record::Message;

/// What a consumer yields: messages, and changes to what it owns.
///
/// Serialised externally tagged in snake case: `{"assigned": [0, 1]}`,
/// `{"message": {...}}`, `"reconnected"`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A message of an owned partition.
    Message(Message),
    /// These partitions are now owned; their messages follow.
    Assigned(Vec<u32>),
    /// These partitions are about to be released: no more of their
    /// messages follow. They are released when the application next asks
    /// for an event, so it can commit or flush first.
    Revoking(Vec<u32>),
    /// The group's committed offset on `partition` was below the earliest
    /// stored message (retention or truncation removed what it had not
    /// read): reading resumes at `resumed_at`.
    OffsetReset {
        partition: u32,
        committed: u64,
        resumed_at: u64,
    },
    /// These partitions were lost without a handover (the lease expired,
    /// e.g. after a long pause): commits for them are refused and their
    /// undelivered messages are dropped.
    Lost(Vec<u32>),
    /// The member has heard nothing from etcd for the client's request
    /// timeout (no lease renewal, no watch answer): etcd is down or cut off.
    /// Reported within the request timeout plus one tick (at most 1 s) of
    /// the last answer, at `since`. Delivery goes on only while the lease
    /// is known valid; past it come `Lost` and, once etcd answers again, a
    /// new `Assigned`.
    Disconnected { since: SystemTime },
    /// etcd answers again after a [`Event::Disconnected`].
    Reconnected,
}

/// A rebalance event on its way to the application; `ack` (if any) is
/// answered when the application comes back for the next event, i.e. has
/// handled this one.
#[derive(Debug)]
pub(crate) struct Notice {
    pub(crate) event: Event,
    pub(crate) ack: Option<Ack>,
}

/// The acknowledgement of a `Revoking`, naming the claims it revokes (by
/// owner revision): a notice still unread when its partitions were lost
/// and claimed again must not revoke the new claims.
#[derive(Debug)]
pub(crate) struct Ack {
    pub(crate) claims: Vec<(u32, i64)>,
    pub(crate) done: oneshot::Sender<()>,
}

/// A partition this member owns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    /// Tags the messages of this ownership; a new claim gets a new epoch.
    epoch: u64,
    /// Create revision of the owner key: fences commits to this claim.
    owner_revision: i64,
    /// The offset reading started from under this claim (or the last
    /// seek): a message below it was delivered under an earlier claim.
    start: u64,
    /// The group's committed offset when this claim was made (0 without
    /// one): written by an earlier claim, so no commit under this one may
    /// go below it.
    floor: u64,
    /// The application acknowledged this claim's revocation: still owned
    /// until the member releases it, but nothing more of it is delivered.
    revoked: bool,
    /// Announced with `Assigned`: the claim pass it belongs to is over.
    assigned: bool,
}

impl Claim {
    pub(crate) fn new(epoch: u64, owner_revision: i64, start: u64, floor: u64) -> Claim {
        Claim {
            epoch,
            owner_revision,
            start,
            floor,
            revoked: false,
            assigned: false,
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn owner_revision(&self) -> i64 {
        self.owner_revision
    }
}

/// State shared by the consumer front and the member task. A std mutex:
/// it is never held across an await.
#[derive(Debug)]
pub(crate) struct MemberState(Mutex<Owned>);

#[derive(Debug)]
struct Owned {
    claims: HashMap<u32, Claim>,
    /// Past this instant the lease may have expired: deliver and commit
    /// nothing until it is renewed.
    lease_valid_until: Instant,
    /// When etcd last answered the member (a lease renewal, a watch message).
    last_heard: Instant,
    /// Per owned partition: the offset after the last delivered message.
    positions: HashMap<u32, u64>,
    /// Per owned partition: the last offset committed by this member.
    committed: HashMap<u32, u64>,
}

impl MemberState {
    /// Owns nothing, with a lease not yet granted.
    pub(crate) fn new() -> MemberState {
        MemberState(Mutex::new(Owned {
            claims: HashMap::new(),
            lease_valid_until: Instant::now(),
            last_heard: Instant::now(),
            positions: HashMap::new(),
            committed: HashMap::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Owned> {
        // Poisoned only by a panic inside one of these short methods; the
        // maps are still consistent (each method changes them at its end).
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lease is known valid until `until` (a renewal sent at `until - TTL`).
    pub(crate) fn lease_renewed(&self, until: Instant) {
        let mut state = self.lock();
        state.lease_valid_until = until;
        state.last_heard = Instant::now();
    }

    /// etcd answered the member.
    pub(crate) fn heard(&self) {
        self.lock().last_heard = Instant::now();
    }

    /// How long etcd has not answered the member.
    pub(crate) fn silent_for(&self) -> Duration {
        self.lock().last_heard.elapsed()
    }

    /// The lease may have expired already.
    pub(crate) fn lease_expired(&self) -> bool {
        Instant::now() >= self.lock().lease_valid_until
    }

    /// Every owned partition, announced or not, sorted.
    pub(crate) fn owned(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self.lock().claims.keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// The owned partitions already announced with `Assigned`, sorted.
    pub(crate) fn assignment(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self
            .lock()
            .claims
            .iter()
            .filter(|(_, claim)| claim.assigned)
            .map(|(p, _)| *p)
            .collect();
        owned.sort_unstable();
        owned
    }

    pub(crate) fn claim(&self, partition: u32) -> Option<Claim> {
        self.lock().claims.get(&partition).copied()
    }

    pub(crate) fn owns(&self, partition: u32) -> bool {
        self.lock().claims.contains_key(&partition)
    }

    /// Some claim read under `epoch` is still held.
    pub(crate) fn owns_epoch(&self, epoch: u64) -> bool {
        self.lock().claims.values().any(|c| c.epoch == epoch)
    }

    /// Records a new claim reading from `from`; `committed` is the group's
    /// offset the claim transaction read, if any.
    pub(crate) fn claimed(&self, partition: u32, claim: Claim, committed: Option<u64>) {
        let mut state = self.lock();
        state.claims.insert(partition, claim);
        state.positions.insert(partition, claim.start);
        match committed {
            Some(offset) => state.committed.insert(partition, offset),
            None => state.committed.remove(&partition),
        };
    }

    /// The claim pass that took `partitions` is over and announced.
    pub(crate) fn announced(&self, partitions: &[u32]) {
        let mut state = self.lock();
        for p in partitions {
            if let Some(claim) = state.claims.get_mut(p) {
                claim.assigned = true;
            }
        }
    }

    /// The application acknowledged the revocation of these claims
    /// (partition, owner revision): deliver nothing more of them.
    pub(crate) fn revoked(&self, claims: &[(u32, i64)]) {
        let mut state = self.lock();
        for (partition, revision) in claims {
            if let Some(claim) = state.claims.get_mut(partition) {
                if claim.owner_revision == *revision {
                    claim.revoked = true;
                }
            }
        }
    }

    /// Owner revisions of those of `partitions` still owned.
    pub(crate) fn owner_revisions(&self, partitions: &[u32]) -> Vec<(u32, i64)> {
        let state = self.lock();
        partitions
            .iter()
            .filter_map(|p| state.claims.get(p).map(|c| (*p, c.owner_revision)))
            .collect()
    }

    /// Reading restarts at `offset` under a new `epoch`; false if
    /// `partition` is not owned.
    pub(crate) fn seek(&self, partition: u32, offset: u64, epoch: u64) -> bool {
        let mut state = self.lock();
        let Some(claim) = state.claims.get_mut(&partition) else {
            return false;
        };
        claim.epoch = epoch;
        claim.start = offset;
        state.positions.insert(partition, offset);
        true
    }

    /// Forgets `partition`: commits for it are refused from now on.
    pub(crate) fn forget(&self, partition: u32) -> Option<Claim> {
        let mut state = self.lock();
        state.positions.remove(&partition);
        state.committed.remove(&partition);
        state.claims.remove(&partition)
    }

    /// Drops every claim (leaving the group): from now on every commit is
    /// refused as [`Error::NotOwner`].
    pub(crate) fn forget_all(&self) {
        self.lock().claims.clear();
    }

    /// True when a message of `partition` read under `epoch` may be handed
    /// to the application now; records the position after `offset` if so.
    pub(crate) fn deliver(&self, partition: u32, epoch: u64, offset: u64) -> bool {
        let mut state = self.lock();
        let valid = Instant::now() < state.lease_valid_until
            && state
                .claims
                .get(&partition)
                .is_some_and(|c| c.epoch == epoch && !c.revoked);
        if valid {
            state.positions.insert(partition, offset + 1);
        }
        valid
    }

    /// Each owned partition with the offset after its last delivered message.
    pub(crate) fn positions(&self) -> Vec<(u32, u64)> {
        let state = self.lock();
        state
            .claims
            .iter()
            .map(|(p, claim)| (*p, state.positions.get(p).copied().unwrap_or(claim.start)))
            .collect()
    }

    /// Delivered positions not committed yet (of `only` these partitions,
    /// or all).
    pub(crate) fn uncommitted(&self, only: Option<&[u32]>) -> BTreeMap<u32, u64> {
        let state = self.lock();
        state
            .positions
            .iter()
            .filter(|(p, _)| only.is_none_or(|only| only.contains(p)))
            .filter(|(p, pos)| state.committed.get(p) != Some(pos))
            .map(|(p, pos)| (*p, *pos))
            .collect()
    }

    /// The message at `offset` of `partition` was delivered under the
    /// current claim: between the claim's start and the position.
    pub(crate) fn delivered(&self, partition: u32, offset: u64) -> bool {
        let state = self.lock();
        let position = state.positions.get(&partition).copied().unwrap_or(0);
        state
            .claims
            .get(&partition)
            .is_some_and(|claim| claim.start <= offset && offset < position)
    }

    /// The claims a commit of `offsets` is made under, or why it is refused:
    /// [`Error::NotOwner`] for a partition not owned now, with the lease
    /// possibly expired, or at an offset this claim did not deliver;
    /// [`Error::CommitBehind`] below the claim's floor.
    pub(crate) fn commit_claims(
        &self,
        topic: &str,
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<Vec<(u32, u64, Claim)>> {
        let state = self.lock();
        let mut claims = Vec::with_capacity(offsets.len());
        for (&partition, &offset) in offsets {
            let not_owner = || Error::NotOwner {
                topic: topic.to_string(),
                partition,
            };
            let Some(claim) = state.claims.get(&partition) else {
                return Err(not_owner());
            };
            if Instant::now() >= state.lease_valid_until {
                return Err(not_owner());
            }
            // Only what this claim delivered: an offset outside
            // start..=position comes from messages read under an earlier
            // claim (or not delivered at all).
            let position = state
                .positions
                .get(&partition)
                .copied()
                .unwrap_or(claim.start);
            if offset < claim.start || offset > position {
                return Err(not_owner());
            }
            // Below the floor only after a seek back past it.
            if offset < claim.floor {
                return Err(Error::CommitBehind {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    committed: claim.floor,
                });
            }
            claims.push((partition, offset, *claim));
        }
        Ok(claims)
    }

    /// The group's committed offset on `partition` as this claim knows it
    /// (read with the claim, or written by this member since).
    pub(crate) fn committed_offset(&self, partition: u32) -> Option<u64> {
        self.lock().committed.get(&partition).copied()
    }

    /// These (partition, offset) commits are stored.
    pub(crate) fn committed(&self, commits: impl IntoIterator<Item = (u32, u64)>) {
        let mut state = self.lock();
        for (partition, offset) in commits {
            state.committed.insert(partition, offset);
        }
    }
}
