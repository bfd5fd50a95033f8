//! The group [`Consumer`] (a member that reads the partitions it owns) with
//! its [`ConsumerBuilder`].
//!
//! The consumer is the application-facing half of a member; the other half,
//! a background task in `group::member`, keeps the lease alive, balances
//! partitions and runs one reader task per owned partition. Both halves
//! share a `group::MemberState`: which partitions are owned under which
//! epoch, how long the lease is known to be valid, and what has been
//! delivered. Commits go through the member's `group::Committer`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::group::{
    Ack, AutoCommit, Committer, Control, Event, Member, MemberConfig, MemberState, Notice,
    StartOffset,
};
use crate::reader::Envelope;
use crate::record::Message;
use crate::telemetry;
use crate::topic::{topic_arc, validate_group_name};

/// Upper bounds of the builder's sizes and durations: far above any sane
/// setting, low enough that no arithmetic on them overflows.
const MAX_BUFFER: usize = 1 << 20;
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Configures a group [`Consumer`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    pub(crate) client: Client,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) member_id: Option<String>,
    pub(crate) session_ttl: Duration,
    pub(crate) start: StartOffset,
    pub(crate) auto_commit: AutoCommit,
    pub(crate) page: usize,
    pub(crate) buffer: usize,
}

impl ConsumerBuilder {
    /// Lease TTL of the member: a member that stops renewing it (dies,
    /// freezes, is cut off) loses its partitions this long after its last
    /// renewal. Default: 10 s; from 2 s (etcd's minimum) to 24 h.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Where to start on a partition the group never committed. Default:
    /// [`StartOffset::Earliest`].
    pub fn start_offset(mut self, start: StartOffset) -> Self {
        self.start = start;
        self
    }

    /// When to commit on its own. Default: [`AutoCommit::Interval`] of 5 s.
    pub fn auto_commit(mut self, policy: AutoCommit) -> Self {
        self.auto_commit = policy;
        self
    }

    /// A stable member id (e.g. a pod name). Default: host-pid-random.
    pub fn member_id(mut self, id: impl Into<String>) -> Self {
        self.member_id = Some(id.into());
        self
    }

    /// Messages read per etcd request while catching up. Default: 1,000.
    pub fn fetch_messages(mut self, messages: usize) -> Self {
        self.page = messages;
        self
    }

    /// Messages buffered ahead of the application, across all owned
    /// partitions; each partition reader also holds at most one page.
    /// Default: 1,024; at most 2^20 (as for `fetch_messages`).
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = messages;
        self
    }

    /// Joins the group and starts consuming.
    pub async fn join(self) -> Result<Consumer> {
        validate_group_name(&self.group)?;
        if self.session_ttl < Duration::from_secs(2) || self.session_ttl > MAX_DURATION {
            return Err(Error::InvalidConfig(format!(
                "session_ttl is {:?}; it must be between 2 s and 24 h",
                self.session_ttl
            )));
        }
        if let AutoCommit::Interval(every) = self.auto_commit {
            if every.is_zero() || every > MAX_DURATION {
                return Err(Error::InvalidConfig(format!(
                    "the auto-commit interval is {every:?}; it must be between 1 ns and 24 h"
                )));
            }
        }
        if !(1..=MAX_BUFFER).contains(&self.page) || !(1..=MAX_BUFFER).contains(&self.buffer) {
            return Err(Error::InvalidConfig(format!(
                "fetch_messages is {} and buffer is {}; both must be between 1 and {MAX_BUFFER}",
                self.page, self.buffer
            )));
        }
        if let Some(id) = &self.member_id {
            validate_group_name(id).map_err(|_| {
                Error::InvalidConfig(format!(
                    "member id {id:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
                ))
            })?;
        }
        let topic = self.client.topic(&self.topic).await?;
        let member_id = self.member_id.clone().unwrap_or_else(default_member_id);
        let (queue_tx, queue_rx) = mpsc::channel(self.buffer);
        let (events_tx, events_rx) = mpsc::channel(64);
        let (control_tx, control_rx) = mpsc::channel(16);
        let shared = Arc::new(MemberState::new());
        let config = MemberConfig {
            client: self.client.clone(),
            group: self.group.clone(),
            session_ttl: self.session_ttl,
            start: self.start,
            auto_commit: self.auto_commit,
            page: self.page,
        };
        let member = Member::join(
            config,
            topic,
            member_id.clone(),
            shared.clone(),
            queue_tx,
            events_tx,
            control_rx,
        )
        .await?;
        let control = member.client();
        let committer = member.committer();
        let task = tokio::spawn(member.run());
        Ok(Consumer {
            client: control,
            committer,
            topic: topic_arc(&self.topic),
            group: self.group,
            member_id,
            auto_commit: self.auto_commit,
            queue: queue_rx,
            events: events_rx,
            events_open: true,
            shared,
            control: control_tx,
            task: Some(task),
            pending_ack: None,
            uncommitted: None,
        })
    }
}

fn default_member_id() -> String {
    // The machine's own name ($HOSTNAME is a shell variable, rarely
    // exported), cut to leave room for the suffix.
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .take(200)
        .collect();
    let host = Some(host)
        .filter(|h| !h.is_empty() && validate_group_name(h).is_ok())
        .unwrap_or_else(|| "member".to_string());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Client {
    /// Starts configuring a member of consumer group `group` on `topic`.
    pub fn consumer(&self, topic: impl Into<String>, group: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder {
            client: self.clone(),
            topic: topic.into(),
            group: group.into(),
            member_id: None,
            session_ttl: Duration::from_secs(10),
            start: StartOffset::Earliest,
            auto_commit: AutoCommit::default(),
            page: 1000,
            buffer: 1024,
        }
    }
}

/// A live member of a consumer group: yields the messages of the partitions
/// it owns, rebalanced automatically as members join, leave or die.
///
/// Call [`Consumer::close`] to commit (per the policy), release the
/// partitions at once and leave. Dropping it without closing leaves in the
/// background; if the runtime is gone, its lease expires within the TTL.
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    topic: Arc<str>,
    group: String,
    member_id: String,
    auto_commit: AutoCommit,
    queue: mpsc::Receiver<Envelope>,
    /// Rebalance notices; read before messages.
    events: mpsc::Receiver<Notice>,
    events_open: bool,
    shared: Arc<MemberState>,
    committer: Committer,
    control: mpsc::Sender<Control>,
    task: Option<JoinHandle<()>>,
    /// The partitions of the last `Revoking` and its acknowledgement, sent
    /// when the application asks for the next event.
    pending_ack: Option<Ack>,
    /// Partition and offset of the last delivered message, committed on
    /// the next call under [`AutoCommit::EveryMessage`].
    uncommitted: Option<(u32, u64)>,
}

impl Consumer {
    /// This member's id in the group.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The partitions this member owns now, sorted. A partition appears
    /// once its `Assigned` is sent, i.e. once the claim pass that took it is
    /// over (claiming hundreds of partitions takes a while), so a partly
    /// claimed share never looks like the whole of it.
    pub fn assignment(&self) -> Vec<u32> {
        self.shared.assignment()
    }

    /// The next message or rebalance event. `None` once the consumer is
    /// closed or its topic deleted.
    pub async fn next_event(&mut self) -> Option<Result<Event>> {
        // Commit the message taken last before acknowledging a revocation:
        // after the acknowledgement its partition may be gone.
        let committed = match self.uncommitted.take() {
            Some((partition, offset)) => self.commit_delivered_message(partition, offset).await,
            None => Ok(()),
        };
        self.acknowledge_revocation();
        if let Err(e) = committed {
            return Some(Err(e));
        }
        loop {
            let item = tokio::select! {
                biased;
                notice = self.events.recv(), if self.events_open => match notice {
                    Some(Notice { event, ack }) => {
                        if ack.is_some() {
                            self.pending_ack = ack;
                        }
                        return Some(Ok(event));
                    }
                    None => {
                        self.events_open = false;
                        continue;
                    }
                },
                item = self.queue.recv() => item?,
            };
            match item {
                Envelope::Message { message, epoch } => {
                    if !self
                        .shared
                        .deliver(message.partition, epoch, message.offset)
                    {
                        continue;
                    }
                    if self.auto_commit == AutoCommit::EveryMessage {
                        self.uncommitted = Some((message.partition, message.offset));
                    }
                    telemetry::delivered(&self.topic, &self.group);
                    return Some(Ok(Event::Message(message)));
                }
                Envelope::Error { error, epoch } => {
                    if let Error::TopicDeleted(_) = error {
                        return Some(Err(error));
                    }
                    if self.shared.owns_epoch(epoch) {
                        return Some(Err(error));
                    }
                }
            }
        }
    }

    /// Stops delivering the partitions of the last `Revoking`, then lets
    /// the member release them.
    fn acknowledge_revocation(&mut self) {
        if let Some(ack) = self.pending_ack.take() {
            self.shared.revoked(&ack.claims);
            let _ = ack.done.send(());
        }
    }

    /// The next message, skipping rebalance events. `None` once closed.
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        loop {
            match self.next_event().await? {
                Ok(Event::Message(m)) => return Some(Ok(m)),
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The messages as a `Stream`, skipping rebalance events.
    pub fn stream(&mut self) -> impl Stream<Item = Result<Message>> + '_ {
        futures::stream::unfold(self, |consumer| async move {
            let item = consumer.recv().await?;
            Some((item, consumer))
        })
    }

    /// A handle that commits for this member from another task.
    pub(crate) fn committer(&self) -> Committer {
        self.committer.clone()
    }

    /// Commits `message` as handled: the group resumes after it. Refused
    /// with [`Error::NotOwner`] when the message was not delivered under
    /// this member's current claim of its partition (e.g. it was read before
    /// the partition was lost and claimed again).
    pub async fn commit(&self, message: &Message) -> Result<()> {
        self.commit_delivered_message(message.partition, message.offset)
            .await
    }

    async fn commit_delivered_message(&self, partition: u32, offset: u64) -> Result<()> {
        self.committer.commit_at(partition, offset).await
    }

    /// Commits everything delivered so far on every owned partition.
    pub async fn commit_delivered(&self) -> Result<()> {
        self.committer.commit_delivered(None).await
    }

    /// Commits explicit next-offsets per partition. Fenced: refused with
    /// [`Error::NotOwner`] for a partition this member does not own now
    /// (including one it lost while paused or cut off), and for an offset
    /// this claim did not deliver (below where it started reading, or past
    /// the last message delivered); refused with [`Error::CommitBehind`]
    /// below the offset the previous owner committed, so that a committed
    /// offset never moves backwards past another owner's commit.
    pub async fn commit_offsets(&self, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        self.committer.commit_offsets(offsets).await
    }

    /// Moves this member's reading position on an owned partition; the next
    /// messages of that partition start at `offset`. Under
    /// [`AutoCommit::EveryMessage`], the message taken last on that
    /// partition is not committed: the application chose to read again.
    pub async fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        if self.uncommitted.is_some_and(|(p, _)| p == partition) {
            self.uncommitted = None;
        }
        let (done, wait) = oneshot::channel();
        self.control
            .send(Control::Seek {
                partition,
                offset,
                done,
            })
            .await
            .map_err(|_| Error::ConsumerClosed)?;
        wait.await.map_err(|_| Error::ConsumerClosed)?
    }

    /// Lag of this consumer's group on every partition of its topic.
    pub async fn lag(&self) -> Result<Vec<crate::PartitionLag>> {
        self.client.group_lag(&self.topic, &self.group).await
    }

    /// Commits per the auto-commit policy, releases every partition at once
    /// (other members take them over immediately), leaves the group and
    /// stops every task this consumer started.
    pub async fn close(mut self) -> Result<()> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> Result<()> {
        self.acknowledge_revocation();
        let mut result = Ok(());
        if let Some((partition, offset)) = self.uncommitted.take() {
            result = self.commit_delivered_message(partition, offset).await;
        }
        let Some(task) = self.task.take() else {
            return result;
        };
        let (done, wait) = oneshot::channel();
        if self.control.send(Control::Close { done }).await.is_ok() {
            // Keep draining so the member task never blocks on a full queue.
            let mut wait = wait;
            loop {
                tokio::select! {
                    r = &mut wait => {
                        if let Ok(Err(e)) = r {
                            result = result.and(Err(e));
                        }
                        break;
                    }
                    item = self.queue.recv() => if item.is_none() { break },
                    Some(_) = self.events.recv(), if self.events_open => {}
                }
            }
        }
        self.queue.close();
        if task.await.is_err() {
            // It panicked; its Drop stopped the lease keep-alive and readers.
            result = result.and(Err(Error::ConsumerClosed));
        }
        result
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // The member task notices the closed control channel and leaves.
        self.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::default_member_id;

    #[test]
    fn member_ids_start_with_the_host_name() {
        // The kernel's name for the machine, whatever the environment says.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let id = default_member_id();
        assert!(
            id.starts_with(&format!("{}-{}-", host.trim(), std::process::id())),
            "{id}"
        );
    }
}
