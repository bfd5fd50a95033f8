//! The Go original's shape on top of a group member: one [`Subscription`]
//! per owned partition, each with its own stream of messages, appearing as
//! partitions are assigned and ending when they are revoked or lost.

use std::collections::HashMap;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::record::Message;
use crate::{consumer::Consumer, group::Committer, group::Event};

/// A group member whose partitions arrive as separate [`Subscription`]s.
#[derive(Debug)]
pub struct PartitionedConsumer {
    subscriptions: mpsc::Receiver<Subscription>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    dispatcher: JoinHandle<Result<()>>,
}

/// The messages of one owned partition. Its stream ends when the partition
/// is revoked (after the messages read before the revocation) or lost.
#[derive(Debug)]
pub struct Subscription {
    pub partition: u32,
    messages: mpsc::Receiver<Result<Message>>,
    committer: Committer,
}

impl Subscription {
    /// The next message of this partition; `None` once it is revoked.
    ///
    /// # Errors
    ///
    /// The errors of [`Consumer::recv`] on this partition.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped call loses no message.
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        self.messages.recv().await
    }

    /// The messages as a `Stream`.
    pub fn stream(&mut self) -> impl Stream<Item = Result<Message>> + '_ {
        futures::stream::unfold(self, |sub| async move {
            let item = sub.recv().await?;
            Some((item, sub))
        })
    }

    /// Commits `message` as handled (fenced like [`Consumer::commit`]).
    ///
    /// # Errors
    ///
    /// As [`Consumer::commit`].
    ///
    /// # Cancel safety
    ///
    /// As [`Consumer::commit`]: done or not done, and committing again is
    /// harmless.
    pub async fn commit(&self, message: &Message) -> Result<()> {
        self.committer.commit(message).await
    }
}

impl Consumer {
    /// Turns this member into one subscription per owned partition, each
    /// buffering at most `buffer` messages (1 to 2^20). A slow subscription holds back
    /// the others once its buffer is full.
    pub fn into_partitioned(self, buffer: usize) -> PartitionedConsumer {
        let (subs_tx, subs_rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let dispatcher = tokio::spawn(dispatch(self, buffer.clamp(1, 1 << 20), subs_tx, stop_rx));
        PartitionedConsumer {
            subscriptions: subs_rx,
            stop: Some(stop_tx),
            dispatcher,
        }
    }
}

impl PartitionedConsumer {
    /// The subscription of the next partition assigned to this member;
    /// `None` once the member is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped call loses no subscription.
    pub async fn next_subscription(&mut self) -> Option<Subscription> {
        self.subscriptions.recv().await
    }

    /// Unsubscribes from everything: ends every subscription, commits per
    /// the policy, releases the partitions and leaves the group.
    ///
    /// # Errors
    ///
    /// As [`Consumer::close`]; [`Error::ConsumerClosed`] when the task routing
    /// the subscriptions ended abnormally.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: once started, the member leaves in the background
    /// and a dropped call does not learn whether its final commits landed.
    pub async fn close(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.subscriptions.close();
        match (&mut self.dispatcher).await {
            Ok(result) => result,
            Err(_) => Err(Error::ConsumerClosed),
        }
    }
}

/// Routes the member's events to per-partition channels. Before a revoked
/// partition is released, waits for its subscriber to take every message
/// already routed to it (or drop its subscription), however long that
/// takes: those messages can then still be committed, and the partition
/// moves to another member only once none of them is left here.
async fn dispatch(
    mut consumer: Consumer,
    buffer: usize,
    subscriptions: mpsc::Sender<Subscription>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    let mut partitions: HashMap<u32, mpsc::Sender<Result<Message>>> = HashMap::new();
    loop {
        let event = tokio::select! {
            _ = &mut stop => break,
            event = consumer.next_event() => event,
        };
        let Some(event) = event else { break };
        match event {
            Ok(Event::Message(message)) => {
                if let Some(tx) = partitions.get(&message.partition) {
                    let _ = tx.send(Ok(message)).await;
                }
            }
            Ok(Event::Assigned(assigned)) => {
                for partition in assigned {
                    let (tx, rx) = mpsc::channel(buffer);
                    partitions.insert(partition, tx);
                    let subscription = Subscription {
                        partition,
                        messages: rx,
                        committer: consumer.committer(),
                    };
                    if subscriptions.send(subscription).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Event::Revoking(revoked)) => {
                let handed_over = async {
                    for partition in revoked {
                        if let Some(tx) = partitions.remove(&partition) {
                            while tx.capacity() < tx.max_capacity() && !tx.is_closed() {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = &mut stop => break,
                    () = handed_over => {}
                }
            }
            // Informational: the partition's stream simply resumes later.
            Ok(Event::OffsetReset { .. } | Event::Disconnected { .. } | Event::Reconnected) => {}
            Ok(Event::Lost(lost)) => {
                for partition in lost {
                    partitions.remove(&partition);
                }
            }
            Err(e) => {
                for tx in partitions.values() {
                    let _ = tx.send(Err(e.clone())).await;
                }
            }
        }
    }
    partitions.clear();
    consumer.close().await
}
