//! How a member reaches its share: planning the moves, releasing
//! partitions after the application acknowledged the revocation (the owner
//! keys of many partitions deleted per transaction), and cleaning up owner
//! keys nobody reads. Claiming is in `claim`.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::oneshot;

use super::claim::CLAIMS_PER_TXN;
use super::{Member, Revocation, MAX_TXN_OPS};
use crate::error::Result;
use crate::group::assign;
use crate::group::state::{Ack, Claim, Event};
use crate::partition::Partition;
use crate::reader::ReaderSpec;
use crate::telemetry;

/// Owner keys deleted per transaction: each a nested transaction (one
/// operation) holding a compare and a delete.
const RELEASES_PER_TXN: usize = MAX_TXN_OPS / 3;

impl Member {
    /// Claims or releases partitions to reach this member's quota.
    #[tracing::instrument(level = "debug", skip_all, fields(topic = %self.name, group = %self.config.group, member = %self.member_id))]
    pub(super) async fn rebalance(&mut self) -> Result<()> {
        let Some(index) = self.members.iter().position(|m| *m == self.member_id) else {
            return Ok(());
        };
        self.remove_orphans().await;
        let mine = self.shared.owned();
        let moves = assign::plan(
            self.topic.partitions,
            self.members.len(),
            index,
            &mine,
            |p| self.owners.get(&p).is_none_or(|o| o.lease == 0),
        );
        if self.revoking.is_some() {
            // One release at a time; its notice may still have to be sent.
            self.announce_revocation().await;
        } else if !moves.release.is_empty() {
            let kept = mine.len() - moves.release.len();
            self.release(moves.release).await;
            telemetry::rebalanced(&self.name, &self.config.group, kept);
        }
        if !moves.claim.is_empty() {
            let mut claimed = Vec::new();
            let mut failed = None;
            for chunk in moves.claim.chunks(CLAIMS_PER_TXN) {
                let (taken, error) = self.claim(chunk).await;
                claimed.extend(taken);
                if error.is_some() {
                    // Keep what was claimed: it gets its readers below.
                    failed = error;
                    break;
                }
            }
            if !claimed.is_empty() {
                telemetry::rebalanced(&self.name, &self.config.group, mine.len() + claimed.len());
                let mut assigned: Vec<u32> = claimed.iter().map(|(p, _)| *p).collect();
                assigned.sort_unstable();
                self.shared.announced(&assigned);
                self.notify(Event::Assigned(assigned), None).await;
                for event in std::mem::take(&mut self.resets) {
                    self.notify(event, None).await;
                }
                for (p, from) in claimed {
                    self.start_reader(p, from);
                }
            }
            if let Some(error) = failed {
                return Err(error);
            }
        }
        Ok(())
    }

    /// Deletes owner keys under this member's lease for partitions it does
    /// not (or no longer) read: left by a claim that failed half-way or a
    /// release whose delete failed. The lease would keep them forever.
    async fn remove_orphans(&mut self) {
        let orphans: Vec<(u32, i64)> = self
            .owners
            .iter()
            .filter(|(p, o)| o.lease == self.lease && !self.shared.owns(**p))
            .map(|(p, o)| (*p, o.revision))
            .collect();
        self.delete_owners(&orphans).await;
    }

    /// Deletes this member's owner keys of these (partition, create
    /// revision of its claim) pairs, each guarded by that revision: one
    /// transaction per [`RELEASES_PER_TXN`], a nested transaction per key,
    /// so a key that is no longer this claim's (lost, claimed again by
    /// another member) stays while the others go.
    pub(super) async fn delete_owners(&mut self, owners: &[(u32, i64)]) {
        for chunk in owners.chunks(RELEASES_PER_TXN) {
            let deletes: Vec<TxnOp> = chunk
                .iter()
                .map(|&(partition, revision)| {
                    let owner = self
                        .client
                        .keys
                        .owner(&self.name, &self.config.group, partition);
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::create_revision(
                                owner.clone(),
                                CompareOp::Equal,
                                revision,
                            )])
                            .and_then([TxnOp::delete(owner, None)]),
                    )
                })
                .collect();
            match self
                .client
                .timed(
                    "release partitions",
                    self.client.kv.clone().txn(Txn::new().and_then(deletes)),
                )
                .await
            {
                Ok(_) => {
                    for (partition, _) in chunk {
                        self.owners.remove(partition);
                    }
                }
                // Retried by `remove_orphans` on a later rebalance.
                Err(error) => {
                    tracing::warn!(member = %self.member_id, partitions = chunk.len(), %error, "release failed")
                }
            }
        }
    }

    pub(super) fn start_reader(&mut self, partition: u32, from: u64) {
        let Some(claim) = self.shared.claim(partition) else {
            return;
        };
        let spec = ReaderSpec {
            client: self.data.clone(),
            partition: Partition::new(self.name.clone(), self.topic.incarnation, partition),
            from,
            page: self.config.page,
            epoch: claim.epoch(),
            watches: self.watches.clone(),
            reads: self.reads.clone(),
            turns: self.turns.clone(),
        };
        if let Some(old) = self
            .readers
            .insert(partition, tokio::spawn(spec.run(self.queue.clone())))
        {
            old.abort();
        }
    }

    /// Starts handing partitions back: stop reading them and tell the
    /// application. The release itself ([`Member::finish_release`]) waits
    /// for the application's acknowledgement, however long it takes: before
    /// it, the application may still hold delivered messages of them, and
    /// another member must not deliver the same partitions meanwhile.
    pub(super) async fn release(&mut self, partitions: Vec<u32>) {
        for p in &partitions {
            if let Some(reader) = self.readers.remove(p) {
                reader.abort();
                let _ = reader.await;
            }
        }
        self.revoking = Some(Revocation {
            partitions,
            acked: None,
        });
        self.announce_revocation().await;
    }

    /// Sends the pending revocation's notice if it has not reached the
    /// application yet (its event channel was full).
    async fn announce_revocation(&mut self) {
        let Some(partitions) = self
            .revoking
            .as_ref()
            .filter(|r| r.acked.is_none())
            .map(|r| r.partitions.clone())
        else {
            return;
        };
        let claims = self.shared.owner_revisions(&partitions);
        let (done, acked) = oneshot::channel();
        let ack = Ack { claims, done };
        if self.notify(Event::Revoking(partitions), Some(ack)).await {
            if let Some(revocation) = self.revoking.as_mut() {
                revocation.acked = Some(acked);
            }
        }
    }

    /// The application acknowledged the revocation: commit per the policy,
    /// forget the partitions, delete their owner keys.
    pub(super) async fn finish_release(&mut self) {
        let Some(revocation) = self.revoking.take() else {
            return;
        };
        // Some may have been lost meanwhile.
        let partitions: Vec<u32> = revocation
            .partitions
            .into_iter()
            .filter(|p| self.shared.owns(*p))
            .collect();
        if let Err(error) = self.commit_delivered(Some(&partitions)).await {
            tracing::warn!(member = %self.member_id, %error, "commit before release failed");
        }
        let owners: Vec<(u32, i64)> = self
            .drop_partitions(&partitions)
            .into_iter()
            .map(|(p, claim)| (p, claim.owner_revision()))
            .collect();
        self.delete_owners(&owners).await;
    }

    /// Forgets partitions locally: their queued messages are dropped and
    /// commits for them refused from now on.
    pub(super) fn drop_partitions(&mut self, partitions: &[u32]) -> Vec<(u32, Claim)> {
        let mut claims = Vec::new();
        for p in partitions {
            if let Some(reader) = self.readers.remove(p) {
                reader.abort();
            }
            if let Some(claim) = self.shared.forget(*p) {
                claims.push((*p, claim));
            }
            // Another member reports it from now on.
            telemetry::lag(&self.name, &self.config.group, *p, 0);
        }
        claims
    }
}
