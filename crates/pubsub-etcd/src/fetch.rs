//! Reading a partition by offset: the low-level [`Client::fetch`], the
//! paged range read that consumers catch up with, and the check every
//! batch read passes before anything trusts its offsets.

use std::sync::Arc;

use bytes::Bytes;
use etcd_client::GetOptions;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::{prefix_end, Keys};
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

/// Most skipped corrupt batches one fetch returns for its caller to report.
const MAX_CORRUPT_KEPT: usize = 32;

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

/// Decodes the batch stored at `key` of a partition and checks it against
/// its key before anything trusts its offsets: the key must be the one the
/// batch's extent names (its last offset, so garbage names such as a
/// 21-digit number never pass), the extent must hold 1 to
/// [`MAX_RECORDS_PER_BATCH`] offsets and end below `u64::MAX` (so `last + 1`
/// never overflows), and the records' offsets must increase within it.
pub(crate) fn decode_batch(
    keys: &Keys,
    topic: &str,
    incarnation: i64,
    partition: u32,
    key: &[u8],
    value: Bytes,
) -> Result<pb::RecordBatch> {
    let batch = record::decode_batch_value(key, value)?;
    let corrupt = |reason: String| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let count = u64::from(batch.offset_count);
    if count == 0 || count > MAX_RECORDS_PER_BATCH {
        return Err(corrupt(format!(
            "batch spans {count} offsets; a batch spans 1 to {MAX_RECORDS_PER_BATCH}"
        )));
    }
    let last = match batch.base_offset.checked_add(count - 1) {
        Some(last) if last < u64::MAX => last,
        _ => {
            return Err(corrupt(format!(
                "batch of {count} offsets from {} ends beyond the largest offset",
                batch.base_offset
            )))
        }
    };
    let expected = keys.batch(topic, incarnation, partition, last);
    if key != expected.as_bytes() {
        return Err(corrupt(format!(
            "batch holds offsets {}..={last}, so its key would be {expected}",
            batch.base_offset
        )));
    }
    let mut previous = None;
    for r in &batch.records {
        if u64::from(r.offset_delta) >= count || previous.is_some_and(|p| p >= r.offset_delta) {
            return Err(corrupt(format!(
                "record offset delta {} is out of order or outside the batch's {count} offsets",
                r.offset_delta
            )));
        }
        previous = Some(r.offset_delta);
    }
    Ok(batch)
}

/// [`read_partition`], logging each corrupt batch it skipped.
pub(crate) async fn fetch_partition(
    client: &Client,
    topic: &Arc<str>,
    incarnation: i64,
    partition: u32,
    from: u64,
    max: usize,
    cut: Cut,
) -> Result<Fetched> {
    let (fetched, corrupt) =
        read_partition(client, topic, incarnation, partition, from, max, cut).await?;
    for error in &corrupt {
        tracing::warn!(%error, "skipped a corrupt batch");
    }
    Ok(fetched)
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
///
/// Keys that fail [`decode_batch`] are skipped and their errors returned
/// beside the result (at most [`MAX_CORRUPT_KEPT`]; more are only counted
/// in a warning); they never move `next_offset`. When a read found
/// only such keys, the next read starts just after them (and goes on to the
/// open range), so garbage neither stops the fetch short of a good batch
/// behind it nor makes it read the same keys again.
#[tracing::instrument(level = "debug", name = "fetch", skip(client, cut), fields(topic = %topic))]
pub(crate) async fn read_partition(
    client: &Client,
    topic: &Arc<str>,
    incarnation: i64,
    partition: u32,
    from: u64,
    max: usize,
    cut: Cut,
) -> Result<(Fetched, Vec<Error>)> {
    let max = max.max(1);
    let window_limit = match cut {
        Cut::Exact => max,
        Cut::WholeBatches(batches) => batches.max(1),
    }
    .min(MAX_BATCHES_PER_READ) as i64;
    let keys = &client.keys;
    let window_end = from
        .saturating_add(max as u64)
        .saturating_add(MAX_RECORDS_PER_BATCH);
    let mut start = keys.batch(topic, incarnation, partition, from).into_bytes();
    let mut end = keys
        .batch(topic, incarnation, partition, window_end)
        .into_bytes();
    let mut limit = window_limit;
    let mut open = false;
    let mut fetched = Fetched {
        messages: Vec::new(),
        next_offset: from,
        revision: 0,
        batches: 0,
    };
    let mut corrupt = Vec::new();
    let mut corrupt_dropped = 0usize;
    let now = record::now_millis();
    'read: loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        let mut response = client.read("fetch", start.clone(), Some(options)).await?;
        if fetched.revision == 0 {
            // The first read's revision: a watch from just after it misses
            // nothing, and readers drop what it delivers twice by offset.
            fetched.revision = response.header().map_or(0, |h| h.revision());
        }
        let kvs = response.take_kvs();
        let full = kvs.len() as i64 == limit;
        let Some(last_key) = kvs.last().map(|kv| kv.key().to_vec()) else {
            if open {
                break;
            }
            open = true;
            end = prefix_end(&keys.batches_prefix(topic, incarnation, partition));
            limit = 1;
            continue;
        };
        for kv in kvs {
            let (key, value) = kv.into_key_value();
            let batch = match decode_batch(
                keys,
                topic,
                incarnation,
                partition,
                &key,
                Bytes::from(value),
            ) {
                Ok(batch) => batch,
                Err(error) if corrupt.len() < MAX_CORRUPT_KEPT => {
                    corrupt.push(error);
                    continue;
                }
                Err(_) => {
                    corrupt_dropped += 1;
                    continue;
                }
            };
            let batch_end = batch.base_offset + u64::from(batch.offset_count);
            for message in record::batch_messages(topic, partition, batch, from, now) {
                if cut == Cut::Exact && fetched.messages.len() == max {
                    break 'read;
                }
                fetched.next_offset = message.offset + 1;
                fetched.messages.push(message);
            }
            fetched.next_offset = fetched.next_offset.max(batch_end);
            fetched.batches += 1;
            if fetched.messages.len() >= max {
                break;
            }
        }
        if fetched.batches > 0 {
            break;
        }
        start = last_key;
        start.push(0);
        if !full && !open {
            open = true;
            end = prefix_end(&keys.batches_prefix(topic, incarnation, partition));
            limit = 1;
        }
    }
    if corrupt_dropped > 0 {
        tracing::warn!(%topic, partition, skipped = corrupt_dropped, "skipped more corrupt batches than reported");
    }
    Ok((fetched, corrupt))
}
