//! The background half of a group member: its lease, its member key, the
//! balancing of partitions between members, and one reader task per owned
//! partition.
//!
//! Ownership protocol. A member holds a lease (TTL = session TTL) and puts
//! `members/<id>` under it. A partition is owned by whoever created
//! `owners/<p>` (value: member id, under the owner's lease); creation
//! compares the key's create revision with 0, so two members can never own
//! one partition at once (many partitions per transaction, each under its
//! own compare in a nested transaction: `member::claim`). Every member watches the group's
//! members and owners and, from the sorted member list, computes its quota
//! (`P / n`, plus one for the first `P % n` members). Above quota it releases
//! its highest partitions (stop reading, tell the application, commit,
//! delete the owner key); below quota it claims unowned partitions. A
//! partition moves only when balance requires it, and members keep reading
//! the partitions that stay theirs. A member that dies stops renewing its
//! lease; etcd deletes its keys at expiry and the others claim them.

mod claim;
mod lease;
mod ownership;
mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::commit::{AutoCommit, Committer};
use super::start::StartOffset;
use super::state::{Ack, Event, MemberState, Notice};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::SharedReads;
use crate::reader::Envelope;
use crate::telemetry;
use crate::topic::{topic_arc, TopicInfo};
use crate::watches::WatchHub;

/// etcd's limit of operations per transaction (`--max-txn-ops`, 128 by
/// default). Batched claims and releases count every compare and operation
/// against it, nested ones included, which keeps within it however the
/// server counts.
const MAX_TXN_OPS: usize = 128;

/// What a member is configured with: the consumer builder's settings, as
/// checked by `ConsumerBuilder::join`.
#[derive(Debug, Clone)]
pub(crate) struct MemberConfig {
    /// The application's shared connection, for the partition readers.
    pub(crate) client: Client,
    pub(crate) group: String,
    pub(crate) session_ttl: Duration,
    pub(crate) start: StartOffset,
    pub(crate) auto_commit: AutoCommit,
    /// Messages per read while catching up.
    pub(crate) page: usize,
    /// Fetch turns of its readers (see `reader`).
    pub(crate) fetches: usize,
}

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
    config: MemberConfig,
    /// On a connection of its own: the lease, membership, claims, commits.
    client: Client,
    /// The application's shared connection, for the partition readers.
    data: Client,
    topic: TopicInfo,
    name: Arc<str>,
    member_id: String,
    shared: Arc<MemberState>,
    /// Commits on the member's own connection, for the consumer too.
    committer: Committer,
    queue: mpsc::Sender<Envelope>,
    /// Rebalance notices, apart from the messages so they are never stuck
    /// behind a full message queue.
    events: mpsc::Sender<Notice>,
    control: mpsc::Receiver<Control>,
    lease: i64,
    keepalive: JoinHandle<()>,
    /// Tells the application when etcd stops and starts answering.
    watchdog: JoinHandle<()>,
    /// Lease ids the keep-alive task found gone in etcd; a stale one (of a
    /// lease already replaced) is ignored.
    lease_lost: mpsc::Receiver<i64>,
    lease_lost_tx: mpsc::Sender<i64>,
    readers: HashMap<u32, JoinHandle<()>>,
    /// Shared by the readers: one watch stream, their reads' requests and
    /// their fetch turns.
    watches: WatchHub,
    reads: SharedReads,
    turns: Arc<Semaphore>,
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
        config: MemberConfig,
        topic: TopicInfo,
        member_id: String,
        shared: Arc<MemberState>,
        queue: mpsc::Sender<Envelope>,
        events: mpsc::Sender<Notice>,
        control: mpsc::Receiver<Control>,
    ) -> Result<Member> {
        // Readers leave watch data unread while the application is slow,
        // and that must never hold up the lease (see `Client::own_connection`).
        let client = config.client.own_connection().await?;
        let (lease_lost_tx, lease_lost) = mpsc::channel(4);
        let name = topic_arc(&topic.name);
        let committer = Committer::new(
            client.clone(),
            name.clone(),
            &config.group,
            &member_id,
            shared.clone(),
        );
        let watchdog = tokio::spawn(watch::watchdog(
            shared.clone(),
            events.clone(),
            client.request_timeout,
            config.session_ttl,
        ));
        let mut member = Member {
            name,
            client,
            committer,
            data: config.client.clone(),
            topic,
            member_id,
            shared,
            queue,
            events,
            control,
            lease: 0,
            keepalive: tokio::spawn(async {}),
            watchdog,
            lease_lost,
            lease_lost_tx,
            readers: HashMap::new(),
            watches: WatchHub::new(config.client.clone()),
            reads: SharedReads::new(config.client.clone()),
            turns: Arc::new(Semaphore::new(config.fetches)),
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

    /// Commits for this member, fenced, on its own connection.
    pub(crate) fn committer(&self) -> Committer {
        self.committer.clone()
    }

    /// The member's own connection, for the consumer's other calls.
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
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
            let expired = self.shared.lease_expired();
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
                            self.shared.heard();
                            telemetry::membership_events(&self.name, &self.config.group, response.events().len());
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
                    self.probe().await;
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

    /// Hands a rebalance notice to the application. Bounded by the TTL, so
    /// an application that stopped polling cannot wedge the member.
    async fn notify(&self, event: Event, ack: Option<Ack>) -> bool {
        let notice = Notice { event, ack };
        matches!(
            tokio::time::timeout(self.config.session_ttl, self.events.send(notice)).await,
            Ok(Ok(()))
        )
    }

    /// Publishes each owned partition's lag (stored but not yet delivered)
    /// to the metrics, from the partition heads: one request per 128 owned
    /// partitions, every fifth tick (at most every 5 s).
    async fn report_lag(&self) {
        let positions = self.shared.positions();
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

    fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        if !self.shared.seek(partition, offset, self.next_epoch) {
            return Err(Error::NotOwner {
                topic: self.name.to_string(),
                partition,
            });
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
        self.committer.commit_delivered(only).await
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
        self.shared.forget_all();
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
        self.watchdog.abort();
        for reader in self.readers.values() {
            reader.abort();
        }
    }
}
