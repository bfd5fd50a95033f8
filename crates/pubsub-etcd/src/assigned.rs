//! Reading without a group: [`AssignedReader`] follows chosen partitions
//! from chosen positions, with no ownership and no commits.

use std::collections::HashMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::SharedReads;
use crate::group::{check_partition, StartOffset};
use crate::join::DEFAULT_FETCHES;
use crate::partition::Partition;
use crate::reader::{watch_topic, Envelope, ReaderSpec};
use crate::record::Message;
use crate::topic::topic_arc;
use crate::watches::WatchHub;

/// Reads chosen partitions from chosen positions with no group: no
/// ownership, no commits (see [`Client::commit_offsets_unowned`] to record
/// positions anyway).
#[derive(Debug)]
pub struct AssignedReader {
    queue: mpsc::Receiver<Envelope>,
    tasks: Vec<JoinHandle<()>>,
}

impl Client {
    /// Follows `partitions` of `topic`, each from its [`StartOffset`].
    ///
    /// # Errors
    ///
    /// [`Error::TopicNotFound`]; [`Error::PartitionOutOfRange`] for a
    /// partition the topic does not have; [`Error::Timeout`] or
    /// [`Error::Etcd`] when etcd does not answer while the start offsets
    /// are resolved.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: nothing runs until it returns the reader.
    pub async fn assign(
        &self,
        topic: &str,
        partitions: impl IntoIterator<Item = (u32, StartOffset)>,
    ) -> Result<AssignedReader> {
        let info = self.topic(topic).await?;
        let requested: Vec<(u32, StartOffset)> = partitions.into_iter().collect();
        for &(partition, _) in &requested {
            check_partition(&info, partition)?;
        }
        // The bounds of neighbouring partitions come 64 per request, not
        // one request per partition (4,096 requests for a whole topic).
        let mut distinct: Vec<u32> = requested.iter().map(|&(p, _)| p).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let bounds: HashMap<u32, (u64, u64)> = distinct
            .iter()
            .copied()
            .zip(self.partition_bounds_of(&info, &distinct).await?)
            .collect();
        // Every start is resolved before any reader starts, so a failure
        // leaves nothing running.
        let mut starts = Vec::with_capacity(requested.len());
        for (partition, start) in requested {
            let from = self
                .resolve_within(&info, partition, start, bounds[&partition])
                .await?;
            starts.push((partition, from));
        }
        let name = topic_arc(topic);
        let (queue_tx, queue_rx) = mpsc::channel(1024);
        let watches = WatchHub::new(self.clone());
        let reads = SharedReads::new(self.clone());
        let turns = Arc::new(Semaphore::new(DEFAULT_FETCHES));
        let mut tasks = Vec::with_capacity(starts.len() + 1);
        for (partition, from) in starts {
            let spec = ReaderSpec {
                client: self.clone(),
                partition: Partition::new(name.clone(), info.incarnation, partition),
                from,
                page: 1000,
                epoch: 0,
                watches: watches.clone(),
                reads: reads.clone(),
                turns: turns.clone(),
            };
            tasks.push(tokio::spawn(spec.run(queue_tx.clone())));
        }
        tasks.push(tokio::spawn(watch_topic(
            self.clone(),
            name,
            info.incarnation,
            queue_tx,
        )));
        Ok(AssignedReader {
            queue: queue_rx,
            tasks,
        })
    }
}

impl AssignedReader {
    /// The next message of any assigned partition. Once the topic is
    /// deleted (or deleted and created again), yields
    /// [`Error::TopicDeleted`] after the messages read before, then ends.
    ///
    /// # Errors
    ///
    /// [`Error::TopicDeleted`] as above; [`Error::Corrupt`] for an
    /// undecodable batch, which is skipped.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped call loses no message.
    pub async fn recv(&mut self) -> Option<Result<Message>> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message>>> {
        Poll::Ready(match ready!(self.queue.poll_recv(cx)) {
            None => None,
            Some(Envelope::Message { message, .. }) => Some(Ok(message)),
            Some(Envelope::Error {
                error: error @ Error::TopicDeleted(_),
                ..
            }) => {
                for task in &self.tasks {
                    task.abort();
                }
                Some(Err(error))
            }
            Some(Envelope::Error { error, .. }) => Some(Err(error)),
        })
    }

    /// Stops every reader task.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the reader, which aborts its tasks too.
    pub async fn close(mut self) {
        self.stop().await;
    }

    async fn stop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// The messages, as [`AssignedReader::recv`] yields them.
impl Stream for AssignedReader {
    type Item = Result<Message>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl Drop for AssignedReader {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
