//! Following one partition: catch up with paged range reads, then watch
//! from just after the last read's revision, so nothing is missed or
//! delivered twice between the two. A watch that hits a compacted revision,
//! or breaks, falls back to range reads from the current position: reads
//! are made from the stored batches, never from history, so compaction
//! cannot lose a message, and the fallback neither stalls nor spins.
//!
//! The readers of one consumer share three things: one etcd watch stream
//! ([`WatchHub`]), their catch-up reads' requests ([`SharedReads`]), and a
//! budget of fetch turns. A reader holds a turn from each read (or watch
//! response) until the last of its messages is in the consumer's queue, so
//! however many partitions a consumer follows, at most `turns` pages of
//! messages are held outside the queue.
//!
//! A batch's data prefix just goes quiet when its topic is deleted, so
//! group-less readers also run [`watch_topic`], which ends them with
//! [`Error::TopicDeleted`] as a group member's topic check does.
//!
//! A batch key that fails [`Partition::decode_batch`] (garbage name, undecodable value,
//! extent contradicting the key) is skipped and reported once per reader,
//! as an error to the application and a warning: it never moves the
//! position, halts the partition, or makes the reader read it again and
//! again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::{mpsc, Semaphore};

use crate::client::Client;
use crate::error::Error;
use crate::fetch::{read_partition, Cut, SharedReads};
use crate::keys::prefix_end;
use crate::partition::Partition;
use crate::record::{self, Message};
use crate::telemetry;
use crate::watches::WatchHub;

/// What readers pass to the consumer front.
#[derive(Debug)]
pub(crate) enum Envelope {
    Message {
        message: Message,
        /// The ownership epoch the reader was started under; messages of an
        /// older epoch are dropped by the front.
        epoch: u64,
    },
    /// A reader error that the application should see once.
    Error { error: Error, epoch: u64 },
}

/// Everything a reader needs to follow one partition.
#[derive(Debug, Clone)]
pub(crate) struct ReaderSpec {
    pub(crate) client: Client,
    pub(crate) partition: Partition,
    pub(crate) from: u64,
    pub(crate) page: usize,
    pub(crate) epoch: u64,
    pub(crate) watches: WatchHub,
    pub(crate) reads: SharedReads,
    /// Fetch turns shared by the consumer's readers.
    pub(crate) turns: Arc<Semaphore>,
}

/// Pause after a failed read or watch before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Most corrupt batch keys a reader remembers having reported. Beyond that
/// (a partition full of garbage) a key may be reported again when the
/// reader re-reads it, which it only does after its watch ends.
const MAX_REPORTED_KEYS: usize = 1024;

/// The corrupt batch keys a reader has reported, so each is reported once.
#[derive(Debug, Default)]
struct Reported {
    keys: HashSet<String>,
}

impl Reported {
    /// Whether `error` is news: a corrupt key not reported yet (any other
    /// error always is).
    fn first_time(&mut self, error: &Error) -> bool {
        let Error::Corrupt { key, .. } = error else {
            return true;
        };
        if self.keys.contains(key) {
            return false;
        }
        if self.keys.len() < MAX_REPORTED_KEYS {
            self.keys.insert(key.clone());
        }
        true
    }
}

impl ReaderSpec {
    /// Reads and follows the partition until the queue closes. Sending into
    /// the bounded queue is the back-pressure: a slow consumer holds the
    /// reader at one page.
    pub(crate) async fn run(self, queue: mpsc::Sender<Envelope>) {
        let mut position = self.from;
        let mut reported = false;
        let mut corrupt = Reported::default();
        loop {
            let revision = match self.catch_up(&queue, &mut position, &mut corrupt).await {
                Ok(Some(revision)) => revision,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(topic = %self.partition.topic(), partition = self.partition.number(), %error, "partition read failed, retrying");
                    if !reported && !error.is_outcome_unknown() {
                        // Permanent-looking errors reach the application once.
                        reported = true;
                        let envelope = Envelope::Error {
                            error,
                            epoch: self.epoch,
                        };
                        if queue.send(envelope).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            };
            match self
                .follow(&queue, &mut position, revision, &mut corrupt)
                .await
            {
                Follow::QueueClosed => return,
                Follow::Restart => telemetry::reader_reconnect(self.partition.topic()),
                Follow::Failed(error) => {
                    telemetry::reader_reconnect(self.partition.topic());
                    tracing::debug!(topic = %self.partition.topic(), partition = self.partition.number(), %error, "watch ended, re-reading");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Sends every stored message from `position` on; returns the revision
    /// the final (empty) read saw, or `None` once the queue is closed.
    async fn catch_up(
        &self,
        queue: &mpsc::Sender<Envelope>,
        position: &mut u64,
        corrupt: &mut Reported,
    ) -> Result<Option<i64>, Error> {
        // Records per batch seen so far: sizes the next read to about one
        // page of messages without decoding any batch twice.
        let mut per_batch = 1usize;
        loop {
            // The turns are never closed; if they were, reading would end.
            let Ok(turn) = self.turns.acquire().await else {
                return Ok(None);
            };
            // Boxed: the read's state is large, and only readers holding a
            // turn need it, not every partition's task.
            let (fetched, skipped) = Box::pin(read_partition(
                &self.client,
                Some(&self.reads),
                &self.partition,
                *position,
                self.page,
                Cut::WholeBatches(self.page.div_ceil(per_batch)),
            ))
            .await?;
            if let Some(average) = fetched.messages.len().checked_div(fetched.batches) {
                per_batch = average.max(1);
            }
            let done = fetched.messages.is_empty() && fetched.next_offset <= *position;
            for error in skipped {
                if !self.report_corrupt(queue, corrupt, error).await {
                    return Ok(None);
                }
            }
            for message in fetched.messages {
                let envelope = Envelope::Message {
                    message,
                    epoch: self.epoch,
                };
                if queue.send(envelope).await.is_err() {
                    return Ok(None);
                }
            }
            drop(turn);
            *position = (*position).max(fetched.next_offset);
            if done {
                return Ok(Some(fetched.revision));
            }
        }
    }

    /// Delivers batches as they are written, from revision `after + 1`.
    async fn follow(
        &self,
        queue: &mpsc::Sender<Envelope>,
        position: &mut u64,
        after: i64,
        corrupt: &mut Reported,
    ) -> Follow {
        let keys = &self.client.keys;
        let prefix = keys.batches_prefix(&self.partition);
        let start = keys.batch(&self.partition, *position);
        let options = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(after + 1);
        let mut watch = self.watches.watch(start, options).await;
        loop {
            let Some(response) = watch.next().await else {
                return Follow::Failed(Error::WatchEnded);
            };
            if response.canceled() {
                // Compacted past our revision (or cancelled by etcd): the
                // stored batches are still there, read them.
                return Follow::Restart;
            }
            let Ok(_turn) = self.turns.acquire().await else {
                return Follow::QueueClosed;
            };
            let now = record::now_millis();
            for event in response.events() {
                if event.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = event.kv() else { continue };
                let value = Bytes::copy_from_slice(kv.value());
                let batch = match self.partition.decode_batch(keys, kv.key(), value) {
                    Ok(batch) => batch,
                    Err(error) => {
                        // Skipped: it says nothing trustworthy about offsets.
                        if !self.report_corrupt(queue, corrupt, error).await {
                            return Follow::QueueClosed;
                        }
                        continue;
                    }
                };
                let end = batch.base_offset + u64::from(batch.offset_count);
                let from = *position;
                for message in record::batch_messages(&self.partition, batch, from, now) {
                    if queue
                        .send(Envelope::Message {
                            message,
                            epoch: self.epoch,
                        })
                        .await
                        .is_err()
                    {
                        return Follow::QueueClosed;
                    }
                }
                *position = (*position).max(end);
            }
        }
    }

    /// Reports a skipped corrupt batch to the application and the log,
    /// unless this reader reported its key before. False once the queue is
    /// closed.
    async fn report_corrupt(
        &self,
        queue: &mpsc::Sender<Envelope>,
        corrupt: &mut Reported,
        error: Error,
    ) -> bool {
        if !corrupt.first_time(&error) {
            return true;
        }
        tracing::warn!(topic = %self.partition.topic(), partition = self.partition.number(), %error, "skipping a corrupt batch");
        let envelope = Envelope::Error {
            error,
            epoch: self.epoch,
        };
        queue.send(envelope).await.is_ok()
    }
}

/// Follows the topic key of one incarnation: reads it, watches it from
/// just after that read, and reads it again after any change to it (or a
/// broken watch, after [`RETRY_PAUSE`]). Once the key is gone or belongs to
/// a new incarnation it queues [`Error::TopicDeleted`] and ends. Costs one
/// watch per reader set, nothing while the topic is unchanged.
pub(crate) async fn watch_topic(
    client: Client,
    topic: Arc<str>,
    incarnation: i64,
    queue: mpsc::Sender<Envelope>,
) {
    let key = client.keys.topic(&topic);
    loop {
        let read = client
            .read(
                "get topic",
                key.clone(),
                Some(GetOptions::new().with_keys_only()),
            )
            .await;
        let response = match read {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%topic, %error, "reading the topic key failed, retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let alive = response
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == incarnation);
        if !alive {
            let envelope = Envelope::Error {
                error: Error::TopicDeleted(topic.to_string()),
                epoch: 0,
            };
            let _ = queue.send(envelope).await;
            return;
        }
        let revision = response.header().map_or(0, |h| h.revision());
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let watch = client
            .timed(
                "watch topic",
                client.watch.clone().watch(key.clone(), Some(options)),
            )
            .await;
        let mut stream = match watch {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%topic, %error, "watching the topic key failed, retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        // Any event (an update, or the delete) is checked by reading anew;
        // responses without events (the watch's creation, progress
        // notices) are not news.
        loop {
            match stream.message().await {
                Ok(Some(response)) if response.canceled() => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
                Ok(Some(response)) if response.events().is_empty() => {}
                Ok(Some(_)) => break,
                Ok(None) | Err(_) => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
            }
        }
    }
}

enum Follow {
    QueueClosed,
    Restart,
    Failed(Error),
}
