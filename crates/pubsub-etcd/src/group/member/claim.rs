//! Claiming partitions: the owner keys of many partitions created in one
//! transaction, each under its own guard, then where reading each starts.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::{Member, Owner, MAX_TXN_OPS};
use crate::error::{Error, Result};
use crate::group::commit::parse_offset;
use crate::group::state::{Claim, Event};

/// Partitions claimed per transaction: the topic compare, then per
/// partition a nested transaction (one operation) holding a compare, a put
/// and a get.
pub(super) const CLAIMS_PER_TXN: usize = (MAX_TXN_OPS - 1) / 4;

impl Member {
    /// Tries to create the owner keys of `partitions` (at most
    /// [`CLAIMS_PER_TXN`]) in one transaction, and returns those it got with
    /// the offset to read each from (the group's commit, or the start
    /// policy). The transaction holds only if the topic is still the
    /// incarnation this member joined; inside it, each owner key is created
    /// only if absent, by a nested transaction of its own, so a partition
    /// another member took meanwhile is skipped while the rest are claimed.
    /// On an error, the claims made before it are returned with it.
    pub(super) async fn claim(&mut self, partitions: &[u32]) -> (Vec<(u32, u64)>, Option<Error>) {
        match self.try_claim(partitions).await {
            Ok(claimed) => (claimed, None),
            Err((claimed, error)) => (claimed, Some(error)),
        }
    }

    async fn try_claim(
        &mut self,
        partitions: &[u32],
    ) -> std::result::Result<Vec<(u32, u64)>, (Vec<(u32, u64)>, Error)> {
        let ghosts: Vec<(u32, i64)> = partitions
            .iter()
            .filter_map(|p| {
                self.owners
                    .get(p)
                    .filter(|o| o.lease == 0)
                    .map(|o| (*p, o.revision))
            })
            .collect();
        for (partition, revision) in ghosts {
            self.remove_ghost_owner(partition, revision)
                .await
                .map_err(|e| (Vec::new(), e))?;
        }
        let keys = &self.client.keys;
        let (name, group) = (&*self.name, &*self.config.group);
        let creates: Vec<TxnOp> = partitions
            .iter()
            .map(|&p| {
                let owner = keys.owner(name, group, p);
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(owner.clone(), CompareOp::Equal, 0)])
                        .and_then([
                            TxnOp::put(
                                owner,
                                self.member_id.clone(),
                                Some(PutOptions::new().with_lease(self.lease)),
                            ),
                            TxnOp::get(keys.offset(name, group, p), None),
                        ]),
                )
            })
            .collect();
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.topic(name),
                CompareOp::Equal,
                self.topic.incarnation,
            )])
            .and_then(creates);
        let response = self
            .client
            .timed("claim partitions", self.client.kv.clone().txn(txn))
            .await
            .map_err(|e| (Vec::new(), e))?;
        if !response.succeeded() {
            return Err((Vec::new(), Error::TopicDeleted(self.name.to_string())));
        }
        // Every key created in one transaction has its revision.
        let owner_revision = response.header().map_or(0, |h| h.revision());
        let mut won: Vec<(u32, Option<Result<u64>>)> = Vec::new();
        for (&partition, op) in partitions.iter().zip(response.op_responses()) {
            let TxnOpResponse::Txn(nested) = op else {
                continue;
            };
            if !nested.succeeded() {
                continue;
            }
            let committed = nested
                .op_responses()
                .into_iter()
                .nth(1)
                .and_then(|op| match op {
                    TxnOpResponse::Get(get) => get
                        .kvs()
                        .first()
                        .map(|kv| parse_offset(kv.key(), kv.value())),
                    _ => None,
                });
            self.owners.insert(
                partition,
                Owner {
                    lease: self.lease,
                    revision: owner_revision,
                },
            );
            won.push((partition, committed));
        }
        // The owner keys are ours from here on: if finding a start position
        // fails, give back those not started rather than hold partitions
        // nobody reads.
        won.sort_unstable_by_key(|(p, _)| *p);
        let sorted: Vec<u32> = won.iter().map(|(p, _)| *p).collect();
        let bounds = match self.client.partition_bounds_of(&self.topic, &sorted).await {
            Ok(bounds) => bounds,
            Err(error) => {
                let owners: Vec<(u32, i64)> = sorted.iter().map(|p| (*p, owner_revision)).collect();
                self.delete_owners(&owners).await;
                return Err((Vec::new(), error));
            }
        };
        let mut claimed = Vec::with_capacity(won.len());
        let mut won = won.into_iter().zip(bounds);
        while let Some(((partition, committed), bounds)) = won.next() {
            let committed_ok = committed.as_ref().and_then(|c| c.as_ref().ok().copied());
            let from = match self.start_position(partition, committed, bounds).await {
                Ok(from) => from,
                Err(error) => {
                    let owners: Vec<(u32, i64)> = std::iter::once(partition)
                        .chain(won.map(|((p, _), _)| p))
                        .map(|p| (p, owner_revision))
                        .collect();
                    self.delete_owners(&owners).await;
                    return Err((claimed, error));
                }
            };
            let epoch = self.next_epoch;
            self.next_epoch += 1;
            // A commit beyond the end was ignored: `from` is below it.
            let floor = committed_ok.map_or(0, |c| c.min(from));
            self.shared.claimed(
                partition,
                Claim::new(epoch, owner_revision, from, floor),
                committed_ok,
            );
            tracing::debug!(member = %self.member_id, partition, from, "claimed partition");
            claimed.push((partition, from));
        }
        Ok(claimed)
    }

    /// Deletes an owner key without a lease (written by hand or by a tool):
    /// no live member holds it, yet it would keep the partition from ever
    /// being claimed. Guarded so that only that very key is deleted.
    async fn remove_ghost_owner(&mut self, partition: u32, revision: i64) -> Result<()> {
        let owner = self
            .client
            .keys
            .owner(&self.name, &self.config.group, partition);
        tracing::warn!(
            member = %self.member_id,
            key = %owner,
            "deleting an owner key without a lease: no live member holds it"
        );
        let txn = Txn::new()
            .when([
                Compare::create_revision(owner.clone(), CompareOp::Equal, revision),
                Compare::lease(owner.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::delete(owner, None)]);
        self.client
            .timed("delete ownerless key", self.client.kv.clone().txn(txn))
            .await?;
        self.owners.remove(&partition);
        Ok(())
    }

    /// Where reading a newly claimed partition starts: the group's commit,
    /// or the start policy when there is none (or it is unreadable).
    async fn start_position(
        &mut self,
        partition: u32,
        committed: Option<Result<u64>>,
        (earliest, next): (u64, u64),
    ) -> Result<u64> {
        let committed = match committed {
            Some(Ok(offset)) => Some(offset),
            Some(Err(error)) => {
                tracing::warn!(member = %self.member_id, partition, %error, "ignoring an unreadable committed offset");
                None
            }
            None => None,
        };
        let committed = committed.filter(|&offset| {
            // No commit can be past the end: none was made by a member
            // (it only commits what it delivered), so treat it as garbage
            // rather than skip everything produced until the end reaches it.
            let sane = offset <= next;
            if !sane {
                tracing::warn!(
                    member = %self.member_id,
                    key = %self.client.keys.offset(&self.name, &self.config.group, partition),
                    value = offset,
                    next,
                    "ignoring a committed offset beyond the end of the partition"
                );
            }
            sane
        });
        Ok(match committed {
            // Retention may have removed what the group had not read yet:
            // resume at the earliest stored message rather than stall, and
            // say so.
            Some(offset) if offset < earliest => {
                self.resets.push(Event::OffsetReset {
                    partition,
                    committed: offset,
                    resumed_at: earliest,
                });
                earliest
            }
            Some(offset) => offset,
            None => {
                self.client
                    .resolve_within(&self.topic, partition, self.config.start, (earliest, next))
                    .await?
            }
        })
    }
}
