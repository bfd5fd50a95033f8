//! Following one partition: catch up with paged range reads, then watch
//! from just after the last read's revision, so nothing is missed or
//! delivered twice between the two. A watch that hits a compacted revision,
//! or breaks, falls back to range reads from the current position: reads
//! are made from the stored batches, never from history, so compaction
//! cannot lose a message, and the fallback neither stalls nor spins.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::error::Error;
use crate::fetch::{fetch_partition, Cut};
use crate::keys::{prefix_end, Keys};
use crate::record::{self, pb, Message};

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
    pub(crate) topic: Arc<str>,
    pub(crate) incarnation: i64,
    pub(crate) partition: u32,
    pub(crate) from: u64,
    pub(crate) page: usize,
    pub(crate) epoch: u64,
}

/// Pause after a failed read or watch before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

impl ReaderSpec {
    /// Reads and follows the partition until the queue closes. Sending into
    /// the bounded queue is the back-pressure: a slow consumer holds the
    /// reader at one page.
    pub(crate) async fn run(self, queue: mpsc::Sender<Envelope>) {
        let mut position = self.from;
        let mut reported = false;
        let batches =
            self.client
                .keys
                .batches_prefix(&self.topic, self.incarnation, self.partition);
        loop {
            let revision = match self.catch_up(&queue, &mut position).await {
                Ok(Some(revision)) => revision,
                Ok(None) => return,
                Err(Error::Corrupt { key, reason }) if key.starts_with(&batches) => {
                    // Reported, then skipped as in `follow`: one unreadable
                    // batch must not halt the partition.
                    if let Some(last) = Keys::trailing_number(key.as_bytes()) {
                        position = position.max(last.saturating_add(1));
                    }
                    let error = Error::Corrupt { key, reason };
                    let envelope = Envelope::Error {
                        error,
                        epoch: self.epoch,
                    };
                    if queue.send(envelope).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(error) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, %error, "partition read failed, retrying");
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
            match self.follow(&queue, &mut position, revision).await {
                Follow::QueueClosed => return,
                Follow::Restart => {}
                Follow::Failed(error) => {
                    tracing::debug!(topic = %self.topic, partition = self.partition, %error, "watch ended, re-reading");
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
    ) -> Result<Option<i64>, Error> {
        // Records per batch seen so far: sizes the next read to about one
        // page of messages without decoding any batch twice.
        let mut per_batch = 1usize;
        loop {
            let fetched = fetch_partition(
                &self.client,
                &self.topic,
                self.incarnation,
                self.partition,
                *position,
                self.page,
                Cut::WholeBatches(self.page.div_ceil(per_batch)),
            )
            .await?;
            if let Some(average) = fetched.messages.len().checked_div(fetched.batches) {
                per_batch = average.max(1);
            }
            let done = fetched.messages.is_empty() && fetched.next_offset <= *position;
            for message in fetched.messages {
                let envelope = Envelope::Message {
                    message,
                    epoch: self.epoch,
                };
                if queue.send(envelope).await.is_err() {
                    return Ok(None);
                }
            }
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
    ) -> Follow {
        let keys = &self.client.keys;
        let prefix = keys.batches_prefix(&self.topic, self.incarnation, self.partition);
        let start = keys.batch(&self.topic, self.incarnation, self.partition, *position);
        let options = WatchOptions::new()
            .with_range(prefix_end(&prefix))
            .with_start_revision(after + 1);
        let mut stream = match self
            .client
            .timed(
                "watch partition",
                self.client.watch.clone().watch(start, Some(options)),
            )
            .await
        {
            Ok(stream) => stream,
            Err(error) => return Follow::Failed(error),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Follow::Failed(Error::WatchEnded),
                Err(e) => return Follow::Failed(Error::etcd("watch partition", e)),
            };
            if response.canceled() {
                // Compacted past our revision (or cancelled by etcd): the
                // stored batches are still there, read them.
                return Follow::Restart;
            }
            let now = record::now_millis();
            for event in response.events() {
                if event.event_type() != EventType::Put {
                    continue;
                }
                let Some(kv) = event.kv() else { continue };
                let batch: pb::RecordBatch =
                    match record::decode(kv.key(), Bytes::copy_from_slice(kv.value())) {
                        Ok(batch) => batch,
                        Err(error) => {
                            // Reported, then skipped: the next batch moves on.
                            let envelope = Envelope::Error {
                                error,
                                epoch: self.epoch,
                            };
                            if queue.send(envelope).await.is_err() {
                                return Follow::QueueClosed;
                            }
                            continue;
                        }
                    };
                let end = batch.base_offset + u64::from(batch.offset_count);
                let from = *position;
                for message in record::batch_messages(&self.topic, self.partition, batch, from, now)
                {
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
}

enum Follow {
    QueueClosed,
    Restart,
    Failed(Error),
}
