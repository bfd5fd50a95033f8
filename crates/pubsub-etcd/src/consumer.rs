//! The group [`Consumer`]: a member that reads the partitions it owns
//! (configured and joined through `join.rs`'s [`ConsumerBuilder`]).
//!
//! The consumer is the application-facing half of a member; the other half,
//! a background task in `group::member`, keeps the lease alive, balances
//! partitions and runs one reader task per owned partition. Both halves
//! share a `group::MemberState`: which partitions are owned under which
//! epoch, how long the lease is known to be valid, and what has been
//! delivered. Commits go through the member's `group::Committer`, which a
//! [`CommitHandle`] hands to other tasks.
//!
//! The consumer is polled, not awaited step by step: every step of
//! [`Consumer::next_event`] keeps its progress in the consumer itself, so a
//! dropped call (a `select!` branch that lost) loses nothing, and the same
//! poll function makes the consumer a [`Stream`].
//!
//! A little over 500 lines, kept whole: that state machine, the commits it
//! makes on its own and the [`CommitHandle`] sharing them are one concept,
//! and a split would hand the state machine's fields to another module.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::group::{
    Ack, AutoCommit, Committer, Control, Event, Member, MemberConfig, MemberState, Notice,
};
use crate::join::ConsumerBuilder;
use crate::reader::Envelope;
use crate::record::Message;
use crate::telemetry;
use crate::topic::{topic_arc, TopicInfo};

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
    delivered: metrics::Counter,
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
    /// That commit once started, awaited by the next call that finds it.
    committing: Option<JoinHandle<Result<()>>>,
}

impl Consumer {
    /// The application's half of member `member_id` of `builder`'s group
    /// on `topic`: joins, starts the member task, and returns.
    pub(crate) async fn start(
        builder: ConsumerBuilder,
        topic: TopicInfo,
        member_id: String,
    ) -> Result<Consumer> {
        let (queue_tx, queue_rx) = mpsc::channel(builder.buffer);
        let (events_tx, events_rx) = mpsc::channel(64);
        let (control_tx, control_rx) = mpsc::channel(16);
        let shared = Arc::new(MemberState::new());
        let config = MemberConfig {
            client: builder.client.clone(),
            group: builder.group.clone(),
            session_ttl: builder.session_ttl,
            start: builder.start,
            auto_commit: builder.auto_commit,
            page: builder.page,
            fetches: builder.fetches,
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
            delivered: telemetry::delivered(&builder.topic, &builder.group),
            topic: topic_arc(&builder.topic),
            group: builder.group,
            member_id,
            auto_commit: builder.auto_commit,
            queue: queue_rx,
            events: events_rx,
            events_open: true,
            shared,
            control: control_tx,
            task: Some(task),
            pending_ack: None,
            uncommitted: None,
            committing: None,
        })
    }

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
    ///
    /// Under [`AutoCommit::EveryMessage`] it first commits the message it
    /// returned last; then it lets the member release the partitions of the
    /// last [`Event::Revoking`] it returned.
    ///
    /// # Errors
    ///
    /// The item is an error when that auto-commit failed (e.g.
    /// [`Error::NotOwner`] when the partition was lost meanwhile, or
    /// [`Error::Timeout`]; the message is then delivered again to whoever
    /// owns its partition next), when a partition reader failed on an owned
    /// partition ([`Error::Corrupt`] for an undecodable batch, which is
    /// skipped), or [`Error::TopicDeleted`] once the topic is gone (the
    /// stream then ends).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: when the future is dropped before it completes (e.g. in
    /// a `select!` branch that lost), no message and no event is lost and a
    /// commit under way goes on; the next call resumes where this one
    /// stopped.
    pub async fn next_event(&mut self) -> Option<Result<Event>> {
        poll_fn(|cx| self.poll_next_event(cx)).await
    }

    /// [`Consumer::next_event`] as a poll function: all of its progress is
    /// kept in `self`, which is what makes it cancel-safe.
    fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Event>>> {
        // Commit the message taken last before acknowledging a revocation:
        // after the acknowledgement its partition may be gone. The commit
        // runs as its own task so that a dropped call neither loses nor
        // restarts it.
        if let Some((partition, offset)) = self.uncommitted.take() {
            let committer = self.committer.clone();
            self.committing = Some(tokio::spawn(async move {
                committer.commit_at(partition, offset).await
            }));
        }
        if let Some(task) = &mut self.committing {
            let joined = ready!(Pin::new(task).poll(cx));
            self.committing = None;
            // A panicked commit task: the commit's outcome is unknown.
            let committed = joined.unwrap_or(Err(Error::ConsumerClosed));
            if let Err(e) = committed {
                self.acknowledge_revocation();
                return Poll::Ready(Some(Err(e)));
            }
        }
        self.acknowledge_revocation();
        loop {
            if self.events_open {
                match self.events.poll_recv(cx) {
                    Poll::Ready(Some(Notice { event, ack })) => {
                        if ack.is_some() {
                            self.pending_ack = ack;
                        }
                        return Poll::Ready(Some(Ok(event)));
                    }
                    Poll::Ready(None) => self.events_open = false,
                    Poll::Pending => {}
                }
            }
            let Some(item) = ready!(self.queue.poll_recv(cx)) else {
                return Poll::Ready(None);
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
                    self.delivered.increment(1);
                    return Poll::Ready(Some(Ok(Event::Message(message))));
                }
                Envelope::Error { error, epoch } => {
                    if let Error::TopicDeleted(_) = error {
                        return Poll::Ready(Some(Err(error)));
                    }
                    if self.shared.owns_epoch(epoch) {
                        return Poll::Ready(Some(Err(error)));
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
    ///
    /// # Errors
    ///
    /// As for [`Consumer::next_event`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`Consumer::next_event`].
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        loop {
            match ready!(self.poll_next_event(cx)) {
                Some(Ok(Event::Message(m))) => return Poll::Ready(Some(Ok(m))),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => return Poll::Ready(None),
            }
        }
    }

    /// The auto-commit policy this consumer was built with.
    pub(crate) fn auto_commit_policy(&self) -> AutoCommit {
        self.auto_commit
    }

    /// A handle that commits for this member from another task.
    pub(crate) fn committer(&self) -> Committer {
        self.committer.clone()
    }

    /// A handle that commits for this member from any task, with the same
    /// fencing as [`Consumer::commit`]. It shares the consumer's connection
    /// and state; once the consumer is closed its commits are refused.
    pub fn commit_handle(&self) -> CommitHandle {
        CommitHandle {
            committer: self.committer.clone(),
        }
    }

    /// Commits `message` as handled: the group resumes after it.
    ///
    /// # Errors
    ///
    /// [`Error::NotOwner`] when the message was not delivered under this
    /// member's current claim of its partition (e.g. it was read before the
    /// partition was lost and claimed again); [`Error::CommitBehind`] below
    /// the previous owner's commit; [`Error::Timeout`] or [`Error::Etcd`]
    /// when etcd does not answer (the commit may or may not have landed).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the commit either
    /// done or not done; committing again is harmless.
    pub async fn commit(&self, message: &Message) -> Result<()> {
        self.committer.commit(message).await
    }

    /// Commits everything delivered so far on every owned partition.
    ///
    /// # Errors
    ///
    /// As for [`Consumer::commit_offsets`].
    ///
    /// # Cancel safety
    ///
    /// As for [`Consumer::commit`].
    pub async fn commit_delivered(&self) -> Result<()> {
        self.committer.commit_delivered(None).await
    }

    /// Commits explicit next-offsets per partition.
    ///
    /// # Errors
    ///
    /// Fenced: refused with [`Error::NotOwner`] for a partition this member
    /// does not own now (including one it lost while paused or cut off),
    /// and for an offset this claim did not deliver (below where it started
    /// reading, or past the last message delivered); refused with
    /// [`Error::CommitBehind`] below the offset the previous owner
    /// committed, so that a committed offset never moves backwards past
    /// another owner's commit. [`Error::Timeout`] or [`Error::Etcd`] when
    /// etcd does not answer. Partitions go 40 to a transaction, so a commit
    /// of more partitions that fails may have landed for the first ones.
    ///
    /// # Cancel safety
    ///
    /// As for [`Consumer::commit`].
    pub async fn commit_offsets(&self, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        self.committer.commit_offsets(offsets).await
    }

    /// Moves this member's reading position on an owned partition; the next
    /// messages of that partition start at `offset`. Under
    /// [`AutoCommit::EveryMessage`], the message taken last on that
    /// partition is not committed: the application chose to read again.
    ///
    /// # Errors
    ///
    /// [`Error::NotOwner`] when this member does not own `partition` now;
    /// [`Error::ConsumerClosed`] once the consumer is closed.
    ///
    /// # Cancel safety
    ///
    /// A seek dropped before it completes may still take effect.
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
    ///
    /// # Errors
    ///
    /// [`Error::TopicNotFound`] once the topic is gone; [`Error::Timeout`]
    /// or [`Error::Etcd`] when etcd does not answer; [`Error::Corrupt`] for
    /// an unreadable stored value.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn lag(&self) -> Result<Vec<crate::PartitionLag>> {
        self.client.group_lag(&self.topic, &self.group).await
    }

    /// Commits per the auto-commit policy, releases every partition at once
    /// (other members take them over immediately), leaves the group and
    /// stops every task this consumer started.
    ///
    /// # Errors
    ///
    /// The error of the final commit ([`Error::NotOwner`] for a partition
    /// lost meanwhile, [`Error::Timeout`] or [`Error::Etcd`]); the member
    /// still leaves. [`Error::ConsumerClosed`] when the member task had
    /// panicked.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the consumer: it then leaves in the
    /// background as on drop, and the final commit may not happen.
    pub async fn close(mut self) -> Result<()> {
        self.shutdown().await
    }

    async fn shutdown(&mut self) -> Result<()> {
        let mut result = match self.committing.take() {
            Some(task) => task.await.unwrap_or(Err(Error::ConsumerClosed)),
            None => Ok(()),
        };
        self.acknowledge_revocation();
        if let Some((partition, offset)) = self.uncommitted.take() {
            result = result.and(self.committer.commit_at(partition, offset).await);
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

/// The messages, skipping rebalance events, as [`Consumer::recv`] yields
/// them: `Unpin`, so `consumer.next()` and `(&mut consumer).next()` work
/// as they are, and commits can be made between items.
impl Stream for Consumer {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

/// Commits for one [`Consumer`] from any task ([`Consumer::commit_handle`]):
/// cheap to clone, `Send` and `Sync`. Every commit is fenced exactly as the
/// consumer's own: refused for a partition the member no longer owns, for
/// a message not delivered under its current claim, and below the previous
/// owner's commit.
///
/// ```no_run
/// use futures::StreamExt;
///
/// # async fn run(client: pubsub_etcd::Client) -> pubsub_etcd::Result<()> {
/// let mut consumer = client.consumer("orders", "billing").join().await?;
/// let commits = consumer.commit_handle();
/// while let Some(message) = consumer.next().await {
///     let message = message?;
///     let commits = commits.clone();
///     // Handle the message elsewhere, and commit once it is handled.
///     tokio::spawn(async move {
///         println!("{}: {} bytes", message.offset, message.value.len());
///         if let Err(e) = commits.commit(&message).await {
///             eprintln!("commit refused: {e}");
///         }
///     });
/// }
/// consumer.close().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct CommitHandle {
    committer: Committer,
}

// What the handle and the stream are for: commits from other tasks, and a
// consumer moved into a task and polled as it is.
const _: () = {
    const fn handle<T: Clone + Send + Sync + 'static>() {}
    const fn stream<T: Stream + Unpin + Send + Sync + 'static>() {}
    handle::<CommitHandle>();
    stream::<Consumer>();
    stream::<crate::AssignedReader>();
};

impl CommitHandle {
    /// [`Consumer::commit`], from any task.
    ///
    /// # Errors
    ///
    /// As for [`Consumer::commit`]; [`Error::NotOwner`] too once the
    /// consumer is closed.
    ///
    /// # Cancel safety
    ///
    /// As for [`Consumer::commit`].
    pub async fn commit(&self, message: &Message) -> Result<()> {
        self.committer.commit(message).await
    }

    /// [`Consumer::commit_offsets`], from any task.
    ///
    /// # Errors
    ///
    /// As for [`Consumer::commit_offsets`].
    ///
    /// # Cancel safety
    ///
    /// As for [`Consumer::commit`].
    pub async fn commit_offsets(&self, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        self.committer.commit_offsets(offsets).await
    }

    /// [`Consumer::commit_delivered`], from any task.
    ///
    /// # Errors
    ///
    /// As for [`Consumer::commit_offsets`].
    ///
    /// # Cancel safety
    ///
    /// As for [`Consumer::commit`].
    pub async fn commit_delivered(&self) -> Result<()> {
        self.committer.commit_delivered(None).await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // The member task notices the closed control channel and leaves.
        self.queue.close();
    }
}
