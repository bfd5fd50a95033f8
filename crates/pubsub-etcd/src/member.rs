//! The background half of a group member: its lease, its member key, the
//! balancing of partitions between members, and one reader task per owned
//! partition.
//!
//! Ownership protocol. A member holds a lease (TTL = session TTL) and puts
//! `members/<id>` under it. A partition is owned by whoever created
//! `owners/<p>` (value: member id, under the owner's lease); creation is a
//! transaction comparing the key's create revision with 0, so two members
//! can never own one partition at once. Every member watches the group's
//! members and owners and, from the sorted member list, computes its quota
//! (`P / n`, plus one for the first `P % n` members). Above quota it releases
//! its highest partitions (stop reading, tell the application, commit,
//! delete the owner key); below quota it claims unowned partitions. A
//! partition moves only when balance requires it, and members keep reading
//! the partitions that stay theirs. A member that dies stops renewing its
//! lease; etcd deletes its keys at expiry and the others claim them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
    WatchStream,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::consumer::{
    commit_fenced, Ack, AutoCommit, Claim, ConsumerBuilder, Event, MemberState, Notice,
};
use crate::error::{Error, Result};
use crate::group::{assign, parse_offset};
use crate::keys::{prefix_end, Keys};
use crate::reader::{Envelope, ReaderSpec};
use crate::telemetry;
use crate::topic::{topic_arc, TopicInfo};

/// Requests from the consumer front.
#[derive(Debug)]
pub(crate) enum Control {
    Seek {
        partition: u32,
        offset: u64,
        done: oneshot::Sender<Result<()>>,
    },
    Close {
        done: oneshot::Sender<Result<()>>,
    },
}

/// An owner key as last seen: the lease it lives under tells whether it
/// is this member's (a reused member id may belong to a dead process).
#[derive(Debug, Clone)]
struct Owner {
    lease: i64,
    revision: i64,
}

impl Owner {
    fn of(kv: &etcd_client::KeyValue) -> Owner {
        Owner {
            lease: kv.lease(),
            revision: kv.create_revision(),
        }
    }
}

/// A release waiting for the application to acknowledge its `Revoking`:
/// until then the partitions stay owned (and undelivered), since the
/// application may still hold messages of them.
struct Revocation {
    partitions: Vec<u32>,
    /// `None` until the notice is in the application's event channel.
    acked: Option<oneshot::Receiver<()>>,
}

/// The member task's state.
pub(crate) struct Member {
    config: ConsumerBuilder,
    /// On a connection of its own: the lease, membership, claims, commits.
    client: Client,
    /// The application's shared connection, for the partition readers.
    data: Client,
    topic: TopicInfo,
    name: Arc<str>,
    member_id: String,
    shared: Arc<Mutex<MemberState>>,
    queue: mpsc::Sender<Envelope>,
    /// Rebalance notices, apart from the messages so they are never stuck
    /// behind a full message queue.
    events: mpsc::Sender<Notice>,
    control: mpsc::Receiver<Control>,
    lease: i64,
    keepalive: JoinHandle<()>,
    /// Lease ids the keep-alive task found gone in etcd; a stale one (of a
    /// lease already replaced) is ignored.
    lease_lost: mpsc::Receiver<i64>,
    lease_lost_tx: mpsc::Sender<i64>,
    readers: HashMap<u32, JoinHandle<()>>,
    /// Live members and partition owners, as last seen in etcd.
    members: BTreeSet<String>,
    owners: BTreeMap<u32, Owner>,
    /// Owned partitions whose owner key vanished, to report as lost.
    lost: Vec<u32>,
    watch: Option<WatchStream>,
    next_epoch: u64,
    /// Offset resets found while claiming, reported after the assignment.
    resets: Vec<Event>,
    /// At most one release at a time, waiting for its acknowledgement.
    revoking: Option<Revocation>,
    /// False between losing the lease and joining again under a new one.
    joined: bool,
}

impl Member {
    pub(crate) async fn join(
        config: ConsumerBuilder,
        topic: TopicInfo,
        member_id: String,
        shared: Arc<Mutex<MemberState>>,
        queue: mpsc::Sender<Envelope>,
        events: mpsc::Sender<Notice>,
        control: mpsc::Receiver<Control>,
    ) -> Result<Member> {
        // Readers leave watch data unread while the application is slow,
        // and that must never hold up the lease (see `Client::own_connection`).
        let client = config.client.own_connection().await?;
        let (lease_lost_tx, lease_lost) = mpsc::channel(4);
        let mut member = Member {
            name: topic_arc(&topic.name),
            client,
            data: config.client.clone(),
            topic,
            member_id,
            shared,
            queue,
            events,
            control,
            lease: 0,
            keepalive: tokio::spawn(async {}),
            lease_lost,
            lease_lost_tx,
            readers: HashMap::new(),
            members: BTreeSet::new(),
            owners: BTreeMap::new(),
            lost: Vec::new(),
            watch: None,
            next_epoch: 1,
            resets: Vec::new(),
            revoking: None,
            joined: false,
            config,
        };
        member.rejoin().await?;
        Ok(member)
    }

    /// The member's own connection, for the consumer's commits too.
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Grants a lease, starts keeping it alive and puts the member key.
    async fn register(&mut self) -> Result<()> {
        let ttl = self.config.session_ttl;
        let sent = Instant::now();
        let mut lease_client = self.client.etcd.lease_client();
        let grant = self
            .client
            .timed(
                "grant lease",
                lease_client.grant(ttl.as_secs() as i64, None),
            )
            .await?;
        self.lease = grant.id();
        self.shared
            .lock()
            .expect("member state lock")
            .lease_valid_until = sent + Duration::from_secs(grant.ttl().max(0) as u64);
        let key = self
            .client
            .keys
            .member(&self.name, &self.config.group, &self.member_id);
        let value = format!(
            "{{\"member\":\"{}\",\"pid\":{}}}",
            self.member_id,
            std::process::id()
        );
        self.client
            .timed(
                "register member",
                self.client.kv.clone().put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(self.lease)),
                ),
            )
            .await?;
        self.keepalive.abort();
        self.keepalive = tokio::spawn(keep_alive(
            self.client.clone(),
            self.lease,
            ttl,
            self.shared.clone(),
            self.lease_lost_tx.clone(),
        ));
        tracing::debug!(member = %self.member_id, lease = self.lease, "joined group");
        Ok(())
    }

    fn group_prefix(&self) -> String {
        self.client
            .keys
            .group_prefix(&self.name, &self.config.group)
    }

    fn members_prefix(&self) -> String {
        self.client
            .keys
            .members_prefix(&self.name, &self.config.group)
    }

    fn owners_prefix(&self) -> String {
        self.client
            .keys
            .owners_prefix(&self.name, &self.config.group)
    }

    /// Reads the members and owners, then watches them from that revision.
    async fn relist(&mut self) -> Result<()> {
        let prefix = self.group_prefix();
        let members = self.members_prefix();
        let owners = self.owners_prefix();
        let txn = Txn::new().and_then([
            TxnOp::get(
                members.clone(),
                Some(GetOptions::new().with_range(prefix_end(&members))),
            ),
            TxnOp::get(
                owners.clone(),
                Some(GetOptions::new().with_range(prefix_end(&owners))),
            ),
        ]);
        let response = self
            .client
            .timed("read group", self.client.kv.clone().txn(txn))
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut gets = response.op_responses().into_iter();
        self.members.clear();
        self.owners.clear();
        if let Some(TxnOpResponse::Get(get)) = gets.next() {
            for kv in get.kvs() {
                if live_member(kv) {
                    self.members
                        .insert(String::from_utf8_lossy(&kv.key()[members.len()..]).into_owned());
                }
            }
        }
        if let Some(TxnOpResponse::Get(get)) = gets.next() {
            for kv in get.kvs() {
                if let Some(p) = Keys::trailing_number(kv.key()) {
                    self.owners.insert(p as u32, Owner::of(kv));
                }
            }
        }
        let options = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(revision + 1);
        let watch = self
            .client
            .timed(
                "watch group",
                self.client.watch.clone().watch(prefix, Some(options)),
            )
            .await?;
        self.watch = Some(watch);
        Ok(())
    }

    pub(crate) async fn run(mut self) {
        let ttl = self.config.session_ttl;
        let mut tick = tokio::time::interval((ttl / 4).min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let commit_every = match self.config.auto_commit {
            AutoCommit::Interval(every) if !every.is_zero() => every,
            // Never fires in practice; keeps one select arm for both cases.
            _ => Duration::from_secs(365 * 24 * 3600),
        };
        let mut commit_tick = tokio::time::interval_at(Instant::now() + commit_every, commit_every);
        let mut ticks: u64 = 0;
        let mut dirty = true;
        loop {
            if !self.joined {
                match self.rejoin().await {
                    Ok(()) => dirty = true,
                    Err(error) => {
                        tracing::warn!(member = %self.member_id, %error, "re-joining failed, will retry")
                    }
                }
            }
            let expired = Instant::now()
                >= self
                    .shared
                    .lock()
                    .expect("member state lock")
                    .lease_valid_until;
            // A missing member key means etcd dropped our lease already.
            let dropped = self.watch.is_some() && !self.members.contains(&self.member_id);
            if self.joined && (expired || dropped) {
                self.lose_everything().await;
                continue;
            }
            if dirty && self.joined {
                dirty = false;
                match self.rebalance().await {
                    Ok(()) => {}
                    Err(Error::TopicDeleted(name)) => {
                        let _ = self
                            .queue
                            .send(Envelope::Error {
                                error: Error::TopicDeleted(name),
                                epoch: 0,
                            })
                            .await;
                        self.leave_logged().await;
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(member = %self.member_id, %error, "rebalance failed, will retry")
                    }
                }
            }
            let watch_message = async {
                match self.watch.as_mut() {
                    Some(watch) => watch.message().await,
                    None => std::future::pending().await,
                }
            };
            let revocation_acked = async {
                match self.revoking.as_mut().and_then(|r| r.acked.as_mut()) {
                    // A dropped sender means the consumer is gone.
                    Some(acked) => {
                        let _ = acked.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = revocation_acked => {
                    self.finish_release().await;
                    dirty = true;
                }
                message = watch_message => {
                    dirty = true;
                    match message {
                        Ok(Some(response)) if !response.canceled() => {
                            self.apply(&response);
                            if !self.lost.is_empty() {
                                let lost = std::mem::take(&mut self.lost);
                                self.notify(Event::Lost(lost), None).await;
                            }
                        }
                        _ => {
                            // Broken or compacted watch: read the state anew.
                            self.watch = None;
                            if let Err(error) = self.relist().await {
                                tracing::warn!(member = %self.member_id, %error, "re-reading group failed");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    dirty = true;
                    if self.watch.is_none() {
                        if let Err(error) = self.relist().await {
                            tracing::warn!(member = %self.member_id, %error, "re-reading group failed");
                        }
                    }
                    if ticks % 5 == 0 {
                        self.report_lag().await;
                        if let Err(Error::TopicDeleted(name)) = self.refresh_topic().await {
                            let _ = self.queue.send(Envelope::Error { error: Error::TopicDeleted(name), epoch: 0 }).await;
                            self.leave_logged().await;
                            return;
                        }
                    }
                }
                Some(lease) = self.lease_lost.recv() => {
                    if self.joined && lease == self.lease {
                        self.lose_everything().await;
                    }
                }
                _ = commit_tick.tick() => {
                    if let Err(error) = self.commit_delivered(None).await {
                        tracing::warn!(member = %self.member_id, %error, "auto-commit failed");
                    }
                }
                control = self.control.recv() => match control {
                    Some(Control::Seek { partition, offset, done }) => {
                        let _ = done.send(self.seek(partition, offset));
                    }
                    Some(Control::Close { done }) => {
                        let result = self.leave().await;
                        let _ = done.send(result);
                        return;
                    }
                    None => {
                        self.leave_logged().await;
                        return;
                    }
                },
                _ = self.queue.closed() => {
                    self.leave_logged().await;
                    return;
                }
            }
        }
    }

    /// Applies watched changes to the member and owner views; an owner key
    /// of ours that disappeared means that partition was lost.
    fn apply(&mut self, response: &etcd_client::WatchResponse) {
        let members = self.members_prefix();
        let owners = self.owners_prefix();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let put = event.event_type() == EventType::Put;
            if let Some(id) = key.strip_prefix(&members) {
                if put && live_member(kv) {
                    self.members.insert(id.to_string());
                } else {
                    self.members.remove(id);
                }
            } else if key.starts_with(&owners) {
                let Some(p) = Keys::trailing_number(kv.key()) else {
                    continue;
                };
                let p = p as u32;
                if put {
                    self.owners.insert(p, Owner::of(kv));
                } else {
                    self.owners.remove(&p);
                    let claim = self
                        .shared
                        .lock()
                        .expect("member state lock")
                        .owned
                        .get(&p)
                        .copied();
                    if let Some(claim) = claim {
                        if kv.mod_revision() > claim.owner_revision {
                            self.drop_partitions(&[p]);
                            self.lost.push(p);
                        }
                    }
                }
            }
        }
    }

    /// Claims or releases partitions to reach this member's quota.
    #[tracing::instrument(level = "debug", skip_all, fields(topic = %self.name, group = %self.config.group, member = %self.member_id))]
    async fn rebalance(&mut self) -> Result<()> {
        let Some(index) = self.members.iter().position(|m| *m == self.member_id) else {
            return Ok(());
        };
        self.remove_orphans().await;
        let mut mine: Vec<u32> = self
            .shared
            .lock()
            .expect("member state lock")
            .owned
            .keys()
            .copied()
            .collect();
        mine.sort_unstable();
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
                {
                    let mut state = self.shared.lock().expect("member state lock");
                    for p in &assigned {
                        if let Some(claim) = state.owned.get_mut(p) {
                            claim.assigned = true;
                        }
                    }
                }
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
        let orphans: Vec<(u32, i64)> = {
            let state = self.shared.lock().expect("member state lock");
            self.owners
                .iter()
                .filter(|(p, o)| o.lease == self.lease && !state.owned.contains_key(p))
                .map(|(p, o)| (*p, o.revision))
                .collect()
        };
        for (partition, revision) in orphans {
            self.delete_owner(partition, revision).await;
        }
    }

    /// Deletes this member's owner key of `partition`, guarded by the
    /// create revision of its claim.
    async fn delete_owner(&mut self, partition: u32, revision: i64) {
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

    /// Hands a rebalance notice to the application. Bounded by the TTL, so
    /// an application that stopped polling cannot wedge the member.
    async fn notify(&self, event: Event, ack: Option<Ack>) -> bool {
        let notice = Notice { event, ack };
        matches!(
            tokio::time::timeout(self.config.session_ttl, self.events.send(notice)).await,
            Ok(Ok(()))
        )
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
        let mut state = self.shared.lock().expect("member state lock");
        state.owned.insert(
            partition,
            Claim {
                epoch,
                owner_revision,
                start: from,
                // A commit beyond the end was ignored: `from` is below it.
                floor: committed_ok.map_or(0, |c| c.min(from)),
                revoked: false,
                assigned: false,
            },
        );
        state.positions.insert(partition, from);
        if let Some(offset) = committed_ok {
            state.committed.insert(partition, offset);
        }
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

    fn start_reader(&mut self, partition: u32, from: u64) {
        let Some(claim) = self
            .shared
            .lock()
            .expect("member state lock")
            .owned
            .get(&partition)
            .copied()
        else {
            return;
        };
        let spec = ReaderSpec {
            client: self.data.clone(),
            topic: self.name.clone(),
            incarnation: self.topic.incarnation,
            partition,
            from,
            page: self.config.page,
            epoch: claim.epoch,
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
    async fn release(&mut self, partitions: Vec<u32>) {
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
        let claims = {
            let state = self.shared.lock().expect("member state lock");
            partitions
                .iter()
                .filter_map(|p| state.owned.get(p).map(|c| (*p, c.owner_revision)))
                .collect()
        };
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
    async fn finish_release(&mut self) {
        let Some(revocation) = self.revoking.take() else {
            return;
        };
        // Some may have been lost meanwhile.
        let partitions: Vec<u32> = {
            let state = self.shared.lock().expect("member state lock");
            revocation
                .partitions
                .into_iter()
                .filter(|p| state.owned.contains_key(p))
                .collect()
        };
        if let Err(error) = self.commit_delivered(Some(&partitions)).await {
            tracing::warn!(member = %self.member_id, %error, "commit before release failed");
        }
        let claims = self.drop_partitions(&partitions);
        for (p, claim) in claims {
            self.delete_owner(p, claim.owner_revision).await;
        }
    }

    /// Forgets partitions locally: their queued messages are dropped and
    /// commits for them refused from now on.
    fn drop_partitions(&mut self, partitions: &[u32]) -> Vec<(u32, Claim)> {
        let mut state = self.shared.lock().expect("member state lock");
        let mut claims = Vec::new();
        for p in partitions {
            if let Some(reader) = self.readers.remove(p) {
                reader.abort();
            }
            if let Some(claim) = state.owned.remove(p) {
                claims.push((*p, claim));
            }
            state.positions.remove(p);
            state.committed.remove(p);
            // Another member reports it from now on.
            telemetry::lag(&self.name, &self.config.group, *p, 0);
        }
        claims
    }

    /// Publishes each owned partition's lag (stored but not yet delivered)
    /// to the metrics, from the partition heads: one request per 128 owned
    /// partitions, every fifth tick (at most every 5 s).
    async fn report_lag(&self) {
        let positions: Vec<(u32, u64)> = {
            let state = self.shared.lock().expect("member state lock");
            state
                .owned
                .iter()
                .map(|(p, claim)| (*p, state.positions.get(p).copied().unwrap_or(claim.start)))
                .collect()
        };
        if positions.is_empty() {
            return;
        }
        let partitions: Vec<u32> = positions.iter().map(|(p, _)| *p).collect();
        match self.client.next_offsets(&self.topic, &partitions).await {
            Ok(nexts) => {
                for ((p, position), (_, next)) in positions.iter().zip(nexts) {
                    telemetry::lag(
                        &self.name,
                        &self.config.group,
                        *p,
                        next.saturating_sub(*position),
                    );
                }
            }
            Err(error) => tracing::debug!(member = %self.member_id, %error, "reading lag failed"),
        }
    }

    /// The lease expired (or may have): everything owned is lost. Tell the
    /// application and give up the old lease; the run loop joins again.
    async fn lose_everything(&mut self) {
        let lost: Vec<u32> = {
            let state = self.shared.lock().expect("member state lock");
            let mut owned: Vec<u32> = state.owned.keys().copied().collect();
            owned.sort_unstable();
            owned
        };
        tracing::warn!(member = %self.member_id, ?lost, "lease lost");
        self.revoking = None;
        self.drop_partitions(&lost);
        if !lost.is_empty() {
            self.notify(Event::Lost(lost), None).await;
        }
        self.keepalive.abort();
        let old = self.lease;
        let _ = self
            .client
            .timed("revoke lease", self.client.etcd.lease_client().revoke(old))
            .await;
        self.joined = false;
        self.watch = None;
    }

    /// Joins again under a new lease after losing the old one; the run loop
    /// retries on its next tick while etcd is unreachable, so closing the
    /// consumer is never blocked behind it.
    async fn rejoin(&mut self) -> Result<()> {
        self.register().await?;
        self.relist().await?;
        self.joined = true;
        Ok(())
    }

    fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        let epoch = self.next_epoch;
        {
            let mut state = self.shared.lock().expect("member state lock");
            let Some(claim) = state.owned.get_mut(&partition) else {
                return Err(Error::NotOwner {
                    topic: self.name.to_string(),
                    partition,
                });
            };
            claim.epoch = epoch;
            claim.start = offset;
            state.positions.insert(partition, offset);
        }
        self.next_epoch += 1;
        self.start_reader(partition, offset);
        Ok(())
    }

    async fn refresh_topic(&mut self) -> Result<()> {
        match self.client.topic(&self.name).await {
            Ok(topic) if topic.incarnation == self.topic.incarnation => {
                self.topic = topic;
                Ok(())
            }
            Ok(_) | Err(Error::TopicNotFound(_)) => Err(Error::TopicDeleted(self.name.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Commits delivered positions (of `only` these partitions, or all) when
    /// the policy commits on its own.
    async fn commit_delivered(&self, only: Option<&[u32]>) -> Result<()> {
        if self.config.auto_commit == AutoCommit::Disabled {
            return Ok(());
        }
        let positions: BTreeMap<u32, u64> = {
            let state = self.shared.lock().expect("member state lock");
            state
                .positions
                .iter()
                .filter(|(p, _)| only.is_none_or(|only| only.contains(p)))
                .filter(|(p, pos)| state.committed.get(p).is_none_or(|c| c != *pos))
                .map(|(p, pos)| (*p, *pos))
                .collect()
        };
        if positions.is_empty() {
            return Ok(());
        }
        commit_fenced(
            &self.client,
            &self.name,
            &self.config.group,
            &self.member_id,
            &self.shared,
            &positions,
        )
        .await
    }

    /// [`Member::leave`] when nobody waits for its outcome.
    async fn leave_logged(&mut self) {
        if let Err(error) = self.leave().await {
            tracing::warn!(member = %self.member_id, %error, "leaving the group failed");
        }
    }

    /// Stops reading, commits per the policy, and revokes the lease, which
    /// deletes the member key and every owner key at once.
    async fn leave(&mut self) -> Result<()> {
        for (_, reader) in self.readers.drain() {
            reader.abort();
        }
        let committed = self.commit_delivered(None).await;
        self.keepalive.abort();
        self.shared.lock().expect("member state lock").owned.clear();
        let revoked = self
            .client
            .timed(
                "revoke lease",
                self.client.etcd.lease_client().revoke(self.lease),
            )
            .await
            .map(|_| ());
        tracing::debug!(member = %self.member_id, "left group");
        committed.and(revoked)
    }
}

impl Drop for Member {
    // Also when the member task panics: a keep-alive left running would
    // hold the lease, and so the member's partitions, for ever.
    fn drop(&mut self) {
        self.keepalive.abort();
        for reader in self.readers.values() {
            reader.abort();
        }
    }
}

/// A member key counts only under a lease: one without (written by hand or
/// by a tool) belongs to no live process, and would take a share of the
/// partitions that nobody reads.
fn live_member(kv: &etcd_client::KeyValue) -> bool {
    if kv.lease() == 0 {
        tracing::warn!(
            key = %String::from_utf8_lossy(kv.key()),
            "ignoring a member key without a lease: no live member holds it (`group delete` removes it)"
        );
        return false;
    }
    true
}

/// Renews the lease every third of its TTL. Each renewal extends the
/// member's known validity to (time the request was sent + TTL), so a member
/// frozen past that instant stops delivering before anyone else can own its
/// partitions.
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    shared: Arc<Mutex<MemberState>>,
    lost: mpsc::Sender<i64>,
) {
    let every = ttl / 3;
    loop {
        let mut lease_client = client.etcd.lease_client();
        let (mut keeper, mut responses) = match client
            .timed("keep lease alive", lease_client.keep_alive(lease))
            .await
        {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(lease, %error, "lease keep-alive failed to start");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            let renewed = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(every.max(Duration::from_millis(500)), renewed).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    shared.lock().expect("member state lock").lease_valid_until =
                        sent + Duration::from_secs(response.ttl() as u64);
                }
                Ok(Ok(Some(_))) => {
                    // TTL 0: etcd no longer has the lease.
                    let _ = lost.try_send(lease);
                    return;
                }
                other => {
                    tracing::debug!(lease, ?other, "lease keep-alive interrupted");
                    break;
                }
            }
            tokio::time::sleep_until(sent + every).await;
        }
    }
}
