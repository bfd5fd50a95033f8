//! How a member reaches its share: claiming partitions (one owner-key
//! transaction each), releasing them after the application acknowledged the
//! revocation, and cleaning up owner keys nobody reads.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::oneshot;

use super::{Member, Owner, Revocation};
use crate::error::{Error, Result};
use crate::group::assign;
use crate::group::commit::parse_offset;
use crate::group::state::{Ack, Claim, Event};
use crate::reader::ReaderSpec;
use crate::telemetry;

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
            let free = moves.claim;
            let mut claimed = Vec::new();
            let mut failed = None;
            for p in free {
                match self.claim(p).await {
                    Ok(Some(from)) => claimed.push((p, from)),
                    Ok(None) => {}
                    Err(error) => {
                        // Keep what was claimed: it gets its readers below.
                        failed = Some(error);
                        break;
                    }
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
        for (partition, revision) in orphans {
            self.delete_owner(partition, revision).await;
        }
    }

    /// Deletes this member's owner key of `partition`, guarded by the
    /// create revision of its claim.
    pub(super) async fn delete_owner(&mut self, partition: u32, revision: i64) {
        let owner = self
            .client
            .keys
            .owner(&self.name, &self.config.group, partition);
        let txn = Txn::new()
            .when([Compare::create_revision(
                owner.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::delete(owner, None)]);
        match self
            .client
            .timed("release partition", self.client.kv.clone().txn(txn))
            .await
        {
            Ok(_) => {
                self.owners.remove(&partition);
            }
            // Retried by `remove_orphans` on a later rebalance.
            Err(error) => {
                tracing::warn!(member = %self.member_id, partition, %error, "release failed")
            }
        }
    }

    /// Tries to create the owner key of `partition`; on success returns the
    /// offset to read from (the group's commit, or the start policy).
    async fn claim(&mut self, partition: u32) -> Result<Option<u64>> {
        if let Some(ghost) = self.owners.get(&partition).filter(|o| o.lease == 0) {
            let revision = ghost.revision;
            self.remove_ghost_owner(partition, revision).await?;
        }
        let keys = &self.client.keys;
        let owner = keys.owner(&self.name, &self.config.group, partition);
        let topic_key = keys.topic(&self.name);
        let offset_key = keys.offset(&self.name, &self.config.group, partition);
        let txn = Txn::new()
            .when([
                Compare::create_revision(owner.clone(), CompareOp::Equal, 0),
                Compare::create_revision(
                    topic_key.clone(),
                    CompareOp::Equal,
                    self.topic.incarnation,
                ),
            ])
            .and_then([
                TxnOp::put(
                    owner,
                    self.member_id.clone(),
                    Some(PutOptions::new().with_lease(self.lease)),
                ),
                TxnOp::get(offset_key, None),
            ])
            .or_else([TxnOp::get(topic_key, None)]);
        let response = self
            .client
            .timed("claim partition", self.client.kv.clone().txn(txn))
            .await?;
        let mut responses = response.op_responses().into_iter();
        if !response.succeeded() {
            let topic_alive = matches!(responses.next(), Some(TxnOpResponse::Get(get))
                if get.kvs().first().map(|kv| kv.create_revision()) == Some(self.topic.incarnation));
            if !topic_alive {
                return Err(Error::TopicDeleted(self.name.to_string()));
            }
            return Ok(None);
        }
        let owner_revision = response.header().map_or(0, |h| h.revision());
        // The owner key is ours from here on: if finding the start position
        // fails, give it back rather than hold a partition nobody reads.
        let committed = match responses.nth(1) {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(|kv| parse_offset(kv.key(), kv.value())),
            _ => None,
        };
        let committed_ok = committed.as_ref().and_then(|c| c.as_ref().ok().copied());
        let from = match self.start_position(partition, committed).await {
            Ok(from) => from,
            Err(error) => {
                self.delete_owner(partition, owner_revision).await;
                return Err(error);
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
        self.owners.insert(
            partition,
            Owner {
                lease: self.lease,
                revision: owner_revision,
            },
        );
        tracing::debug!(member = %self.member_id, partition, from, "claimed partition");
        Ok(Some(from))
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
    ) -> Result<u64> {
        let committed = match committed {
            Some(Ok(offset)) => Some(offset),
            Some(Err(error)) => {
                tracing::warn!(member = %self.member_id, partition, %error, "ignoring an unreadable committed offset");
                None
            }
            None => None,
        };
        let (earliest, next) = self.client.partition_bounds(&self.topic, partition).await?;
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
                    .resolve_start(&self.topic, partition, self.config.start)
                    .await?
            }
        })
    }

    pub(super) fn start_reader(&mut self, partition: u32, from: u64) {
        let Some(claim) = self.shared.claim(partition) else {
            return;
        };
        let spec = ReaderSpec {
            client: self.data.clone(),
            topic: self.name.clone(),
            incarnation: self.topic.incarnation,
            partition,
            from,
            page: self.config.page,
            epoch: claim.epoch(),
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
        let claims = self.drop_partitions(&partitions);
        for (p, claim) in claims {
            self.delete_owner(p, claim.owner_revision()).await;
        }
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
