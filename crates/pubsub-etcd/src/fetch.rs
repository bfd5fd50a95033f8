//! Reading a partition by offset: the low-level [`Client::fetch`] and the
//! paged range read that consumers catch up with.

use std::sync::Arc;

use bytes::Bytes;
use etcd_client::GetOptions;

use crate::client::Client;
use crate::error::Result;
use crate::keys::prefix_end;
use crate::record::{self, pb, Message, MAX_RECORDS_PER_BATCH};
use crate::topic::topic_arc;

/// Most batch keys one read returns: a batch is at most about 1.4 MiB, so a
/// page stays within a few tens of MiB of memory.
const MAX_BATCHES_PER_READ: usize = 32;

/// What one fetch read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Messages in offset order; deleted and expired ones are skipped, so
    /// offsets may have gaps.
    pub messages: Vec<Message>,
    /// Where the next fetch should start: past every offset this one covered.
    pub next_offset: u64,
    /// The etcd revision the read saw; a watch from `revision + 1` misses
    /// nothing written after it.
    pub(crate) revision: i64,
    /// Batch keys the read decoded.
    pub(crate) batches: usize,
}

/// How a fetch bounds its result; see [`fetch_partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    Exact,
    WholeBatches(usize),
}

impl Client {
    /// Reads up to `max` messages of one partition, starting at offset
    /// `from`, in offset order. Returns fewer (possibly none) at the end of
    /// the partition.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Fetched> {
        let info = self.topic(topic).await?;
        if partition >= info.partitions {
            return Err(crate::Error::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions: info.partitions,
            });
        }
        fetch_partition(
            self,
            &topic_arc(topic),
            info.incarnation,
            partition,
            from,
            max,
            Cut::Exact,
        )
        .await
    }
}

/// Reads batches whose last offset is at least `from`, within a key range
/// bounded by offsets (etcd's range cost grows with the keys left in the
/// range, whatever the limit), and falls back to an open range only when a
/// gap (a truncation) leaves that window empty.
///
/// `Cut::Exact` returns at most `max` messages, cutting inside a batch;
/// `Cut::WholeBatches(n)` reads at most `n` batches and returns all of their
/// messages, stopping after the batch that reaches `max`. Readers that
/// continue from `next_offset` use the latter so that a large batch is
/// decoded once, not once per page.
pub(crate) async fn fetch_partition(
    client: &Client,
    topic: &Arc<str>,
    incarnation: i64,
    partition: u32,
    from: u64,
    max: usize,
    cut: Cut,
) -> Result<Fetched> {
    let max = max.max(1);
    let limit = match cut {
        Cut::Exact => max,
        Cut::WholeBatches(batches) => batches.max(1),
    }
    .min(MAX_BATCHES_PER_READ) as i64;
    let start = client.keys.batch(topic, incarnation, partition, from);
    let window_end = from
        .saturating_add(max as u64)
        .saturating_add(MAX_RECORDS_PER_BATCH);
    let bounded = GetOptions::new()
        .with_range(client.keys.batch(topic, incarnation, partition, window_end))
        .with_limit(limit);
    let mut response = client.read("fetch", start.clone(), Some(bounded)).await?;
    if response.kvs().is_empty() {
        let prefix = client.keys.batches_prefix(topic, incarnation, partition);
        let open = GetOptions::new()
            .with_range(prefix_end(&prefix))
            .with_limit(1);
        response = client.read("fetch", start, Some(open)).await?;
    }
    let revision = response.header().map_or(0, |h| h.revision());
    let now = record::now_millis();
    let mut messages = Vec::new();
    let mut next_offset = from;
    let mut batches = 0;
    for kv in response.take_kvs() {
        let (key, value) = kv.into_key_value();
        let batch: pb::RecordBatch = match record::decode(&key, Bytes::from(value)) {
            Ok(batch) => batch,
            // Return what came before it; the next read starts at the bad
            // batch and reports it alone, so a reader can skip just that.
            Err(_) if batches > 0 => break,
            Err(error) => return Err(error),
        };
        let batch_end = batch.base_offset + u64::from(batch.offset_count);
        for message in record::batch_messages(topic, partition, batch, from, now) {
            if cut == Cut::Exact && messages.len() == max {
                return Ok(Fetched {
                    messages,
                    next_offset,
                    revision,
                    batches,
                });
            }
            next_offset = message.offset + 1;
            messages.push(message);
        }
        next_offset = next_offset.max(batch_end);
        batches += 1;
        if messages.len() >= max {
            break;
        }
    }
    Ok(Fetched {
        messages,
        next_offset,
        revision,
        batches,
    })
}
