//! Retention, deletion, truncation and key compaction, all done by clients:
//! there is no server process.
//!
//! Every operation here only deletes batch keys or rewrites them without
//! some of their records; none touches a partition head, which producers
//! own, so offsets are never reused and the head still reports the next
//! offset. A rewrite (`rewrite.rs`) is a transaction guarded by the batch
//! key's mod revision, retried after re-reading the batch when it loses a
//! race (with another rewrite, or with the lease of a batch with a time to
//! live). Batch
//! keys are written once by producers and never again, so a producer never
//! races with these operations; readers skip absent records (a batch keeps
//! its `offset_count`, so gaps are known to be gaps).
//!
//! - [`Client::delete_messages`]: rewrites each batch holding one of the
//!   offsets without it, or deletes the batch key when no record is left.
//! - [`Client::truncate_partition`]: deletes every batch whose last offset is
//!   below `before` (range deletes, at most [`DELETE_CHUNK`] keys each) and
//!   rewrites the one batch straddling `before`.
//! - Retention limits (`trim_partition`): the messages limit is a truncation
//!   at `next - limit`; the age and byte limits delete whole batches from the
//!   oldest on, stopping at the first one within limits. Producers call it
//!   at most once per second per partition after a successful append, and
//!   [`Client::enforce_retention`] runs it for every partition.
//! - Key compaction ([`Client::compact_topic`]): one pass finds the newest
//!   offset of every key, a second rewrites the batches holding older
//!   records of a key (and tombstones). Records appended after the first
//!   pass have higher offsets and are never removed, so it is safe while
//!   producers run.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use etcd_client::{DeleteOptions, GetOptions};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::prefix_end;
use crate::offsets::PartitionInfo;
use crate::partition::{Head, Partition};
use crate::record::{self, pb};
use crate::rewrite::{key_after, read_page, Rewrite};
use crate::topic::{CleanupPolicy, TopicConfig, TopicInfo};

/// Most batch keys one range delete removes.
const DELETE_CHUNK: i64 = 1000;
/// Most batches (values) read in one page by sweeps.
const PAGE: i64 = 32;

/// What a retention sweep, truncation or compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RetentionReport {
    /// Batch keys deleted whole (each held one or more messages).
    pub batches_deleted: u64,
    /// Batches rewritten without some of their messages.
    pub batches_rewritten: u64,
    /// Messages removed by rewrites and by deleting batches that were read
    /// (batches removed by range deletes are not read, so not counted here).
    pub records_removed: u64,
    /// Every partition's offsets afterwards (sweeps of a whole topic only).
    pub partitions: Vec<PartitionInfo>,
}

impl RetentionReport {
    fn add(&mut self, other: &RetentionReport) {
        self.batches_deleted += other.batches_deleted;
        self.batches_rewritten += other.batches_rewritten;
        self.records_removed += other.records_removed;
    }

    /// Counts what one batch's rewrite did.
    fn count(&mut self, outcome: Rewrite) {
        match outcome {
            Rewrite::Unchanged => {}
            Rewrite::Rewritten { removed } => {
                self.batches_rewritten += 1;
                self.records_removed += removed;
            }
            Rewrite::Deleted { removed } => {
                self.batches_deleted += 1;
                self.records_removed += removed;
            }
        }
    }
}

impl Client {
    /// Deletes the message at `offset` of a partition. Returns whether a
    /// message was there to delete. The offset is never reused.
    ///
    /// # Errors
    ///
    /// As [`Client::delete_messages`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: one guarded rewrite of one batch, applied whole or not at
    /// all.
    pub async fn delete_message(&self, topic: &str, partition: u32, offset: u64) -> Result<bool> {
        Ok(self.delete_messages(topic, partition, &[offset]).await? == 1)
    }

    /// Reads the topic and checks that it has `partition`.
    async fn existing_partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(TopicInfo, Partition)> {
        let info = self.topic(topic).await?;
        crate::group::check_partition(&info, partition)?;
        let part = Partition::of(&info, partition);
        Ok((info, part))
    }

    /// Deletes the messages at these offsets of a partition (any order,
    /// duplicates ignored) and returns how many were there to delete.
    /// Each batch holding one of them is rewritten without them (or its key
    /// deleted when none is left) in one transaction guarded by the batch's
    /// mod revision. Offsets are never reused; the partition's next offset
    /// is unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::TopicNotFound`], [`Error::PartitionOutOfRange`]; [`Error::Corrupt`]
    /// for a batch that contradicts its key (nothing of it is deleted);
    /// [`Error::QuotaExceeded`] while etcd's quota is exhausted (a rewrite is a
    /// write); [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in
    /// time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: each batch is rewritten in a transaction of its own,
    /// so a dropped call may have deleted the offsets of some batches and not
    /// of others, never part of one batch's. Calling it again finishes.
    pub async fn delete_messages(
        &self,
        topic: &str,
        partition: u32,
        offsets: &[u64],
    ) -> Result<u64> {
        let (_, part) = self.existing_partition(topic, partition).await?;
        let mut offsets = offsets.to_vec();
        offsets.sort_unstable();
        offsets.dedup();
        let mut deleted = 0;
        let mut i = 0;
        while i < offsets.len() {
            let offset = offsets[i];
            let Some(stored) = self.batch_containing(&part, offset).await? else {
                i += 1;
                continue;
            };
            let last = stored.last_offset();
            let end = offsets[i..].partition_point(|&o| o <= last) + i;
            if stored.batch.base_offset > offset {
                // The batch starts after this offset: it is not stored.
                i += 1;
                continue;
            }
            let targets = &offsets[i..end];
            let outcome = self
                .rewrite_until_done(&part, stored, |o, _| targets.binary_search(&o).is_err())
                .await?;
            deleted += outcome.removed();
            i = end;
        }
        Ok(deleted)
    }

    /// Deletes every message of a partition below offset `before` (clamped
    /// to the partition's next offset) and returns the partition's offsets
    /// afterwards. Whole batches are deleted; the batch straddling `before`
    /// is rewritten. Offsets are never reused: the next offset is unchanged.
    ///
    /// # Errors
    ///
    /// As [`Client::delete_messages`]. Under [`Error::QuotaExceeded`] the
    /// whole batches below `before` may be gone already (deletes work under
    /// NOSPACE) while the batch straddling it is not rewritten yet.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have deleted some batches below
    /// `before`; calling it again finishes.
    pub async fn truncate_partition(
        &self,
        topic: &str,
        partition: u32,
        before: u64,
    ) -> Result<PartitionInfo> {
        let (info, part) = self.existing_partition(topic, partition).await?;
        let next = self.read_head(&part).await?.next_offset;
        truncate_before(self, &part, before.min(next)).await?;
        self.partition_info(&info, partition).await
    }

    /// Enforces a topic's retention limits on every partition now (and key
    /// compaction when its cleanup policy is [`CleanupPolicy::Compact`]).
    /// Any client may run it at any time, concurrently with producers,
    /// consumers and other sweeps. Producers trim the partitions they write
    /// to by themselves; this sweep is for partitions nobody writes to any
    /// more (age limits) and for compaction.
    ///
    /// # Errors
    ///
    /// As [`Client::delete_messages`], for the first partition that fails; the
    /// partitions before it are trimmed.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have trimmed some partitions; any
    /// later sweep (or the producers) finishes.
    pub async fn enforce_retention(&self, topic: &str) -> Result<RetentionReport> {
        let info = self.topic(topic).await?;
        let mut report = RetentionReport::default();
        for part in Partition::all(&info) {
            let head = self.read_head(&part).await?;
            let r = trim_partition(
                self,
                &part,
                &info.config,
                head.next_offset,
                head.total_stored_bytes,
            )
            .await?;
            report.add(&r);
            if info.config.cleanup_policy == CleanupPolicy::Compact {
                report.add(&compact_partition(self, &part).await?);
            }
        }
        report.partitions = self.describe_topic(topic).await?.partitions;
        Ok(report)
    }

    /// Key compaction of every partition of a topic, whatever its cleanup
    /// policy: keeps only the newest message of each key, and drops a key
    /// whose newest message has an empty value (a tombstone). Keyless
    /// messages are kept. Safe while producers append: messages appended
    /// during the sweep are never removed by it.
    ///
    /// # Errors
    ///
    /// As [`Client::delete_messages`], for the first partition that fails.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a dropped call may have compacted some batches; what
    /// it removed is only what a full run removes, and calling it again
    /// finishes.
    pub async fn compact_topic(&self, topic: &str) -> Result<RetentionReport> {
        let info = self.topic(topic).await?;
        let mut report = RetentionReport::default();
        for part in Partition::all(&info) {
            report.add(&compact_partition(self, &part).await?);
        }
        report.partitions = self.describe_topic(topic).await?.partitions;
        Ok(report)
    }

    /// The partition's head (the empty head before the first append).
    async fn read_head(&self, part: &Partition) -> Result<Head> {
        let key = self.keys.head(part);
        let response = self
            .timed("read partition head", self.kv.clone().get(key, None))
            .await?;
        Head::decode(response.kvs().first())
    }
}

/// Deletes every record below offset `before`: whole batches by range
/// deletes, then the straddling batch by a guarded rewrite.
pub(crate) async fn truncate_before(
    client: &Client,
    part: &Partition,
    before: u64,
) -> Result<RetentionReport> {
    let mut report = RetentionReport::default();
    if before == 0 {
        return Ok(report);
    }
    let prefix = client.keys.batches_prefix(part);
    // Batches are named by their last offset: those entirely below `before`
    // are exactly the keys below batch(before).
    let end = client.keys.batch(part, before);
    loop {
        // Range deletes of bounded size, so one request never removes an
        // unbounded number of keys.
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(DELETE_CHUNK)
            .with_keys_only();
        let response = client
            .timed(
                "list batches",
                client.kv.clone().get(prefix.clone(), Some(options)),
            )
            .await?;
        let Some(last) = response.kvs().last().map(|kv| kv.key().to_vec()) else {
            break;
        };
        let full = response.kvs().len() as i64 == DELETE_CHUNK;
        let options = DeleteOptions::new().with_range(key_after(&last));
        let deleted = client
            .timed(
                "delete batches",
                client.kv.clone().delete(prefix.clone(), Some(options)),
            )
            .await?;
        report.batches_deleted += deleted.deleted() as u64;
        if !full {
            break;
        }
    }
    if let Some(stored) = client.batch_containing(part, before).await? {
        if stored.batch.base_offset < before {
            let r = client
                .rewrite_until_done(part, stored, |offset, _| offset >= before)
                .await?;
            report.count(r);
        }
    }
    Ok(report)
}

/// Enforces a topic's retention limits on one partition whose head is at
/// `next` with `total_stored_bytes` stored (byte retention counts batch
/// values as stored, after compression: what fills etcd). Cheap when nothing is due: one
/// range delete over an empty range and one read of the oldest batch.
pub(crate) async fn trim_partition(
    client: &Client,
    part: &Partition,
    config: &TopicConfig,
    next: u64,
    total_stored_bytes: u64,
) -> Result<RetentionReport> {
    let mut cutoff = config
        .retention_messages
        .map_or(0, |limit| next.saturating_sub(limit));
    let min_timestamp = config
        .retention_ms
        .map(|ms| record::now_millis().saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX)));
    let min_base_bytes = config
        .retention_bytes
        .map(|limit| total_stored_bytes.saturating_sub(limit));
    if min_timestamp.is_some() || min_base_bytes.is_some() {
        // Whole batches from the oldest on, stopping at the first within
        // limits. The page grows from 1: usually the oldest batch is kept.
        let prefix = client.keys.batches_prefix(part);
        let end = prefix_end(&prefix);
        let mut start = client.keys.batch(part, cutoff).into_bytes();
        let mut limit = 1;
        'scan: loop {
            let page = read_page(client, part, start, end.clone(), limit).await?;
            let full = page.len() as i64 == limit;
            for stored in &page {
                let too_old = min_timestamp.is_some_and(|min| {
                    stored
                        .batch
                        .records
                        .iter()
                        .map(|r| r.timestamp_ms)
                        .max()
                        .is_none_or(|newest| newest < min)
                });
                // Deleting everything before this batch would leave
                // total_stored_bytes - base_stored_bytes: too much when
                // base_stored_bytes is low.
                let too_big =
                    min_base_bytes.is_some_and(|min| stored.batch.base_stored_bytes < min);
                if !(too_old || too_big) {
                    break 'scan;
                }
                cutoff = cutoff.max(stored.last_offset() + 1);
            }
            match page.last() {
                Some(last) if full => start = key_after(&last.key),
                _ => break,
            }
            limit = (limit * 4).min(PAGE);
        }
    }
    // Never below what a queue on this topic has not settled yet.
    let floor =
        crate::queue::retention_floor(client, part.topic(), part.incarnation(), part.number())
            .await?;
    truncate_before(
        client,
        part,
        cutoff.min(next).min(floor.unwrap_or(u64::MAX)),
    )
    .await
}

/// Key compaction of one partition (see [`Client::compact_topic`]).
pub(crate) async fn compact_partition(
    client: &Client,
    part: &Partition,
) -> Result<RetentionReport> {
    let prefix = client.keys.batches_prefix(part);
    // Pass 1: the newest offset of every key, up to the last batch seen.
    let mut newest: HashMap<Bytes, u64> = HashMap::new();
    let mut start = prefix.clone().into_bytes();
    let mut scanned_end: Option<Vec<u8>> = None;
    loop {
        let page = read_page(client, part, start, prefix_end(&prefix), PAGE).await?;
        for stored in &page {
            let base = stored.batch.base_offset;
            for r in &stored.batch.records {
                if let Some(key) = &r.key {
                    let offset = base + u64::from(r.offset_delta);
                    let entry = newest.entry(key.clone()).or_insert(offset);
                    *entry = (*entry).max(offset);
                }
            }
        }
        match page.last() {
            Some(last) => {
                start = key_after(&last.key);
                scanned_end = Some(start.clone());
            }
            None => break,
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    let mut report = RetentionReport::default();
    let Some(scanned_end) = scanned_end else {
        return Ok(report);
    };
    let newest = Arc::new(newest);
    // Pass 2: rewrite the batches (seen in pass 1) holding superseded records
    // or tombstones. A record appended after pass 1 has a higher offset than
    // any in `newest`, so `offset >= newest` keeps it.
    let keep = |offset: u64, r: &pb::Record| match &r.key {
        None => true,
        Some(key) => match newest.get(key) {
            None => true,
            Some(&n) if offset > n => true,
            Some(&n) if offset == n => !r.value.is_empty(),
            Some(_) => false,
        },
    };
    let mut start = prefix.into_bytes();
    loop {
        let page = read_page(client, part, start, scanned_end.clone(), PAGE).await?;
        for stored in &page {
            let r = client
                .rewrite_until_done(part, stored.clone(), keep)
                .await?;
            report.count(r);
        }
        match page.last() {
            Some(last) if page.len() as i64 == PAGE => start = key_after(&last.key),
            _ => break,
        }
    }
    Ok(report)
}

/// Retention limits of a topic, for a producer deciding whether to trim.
pub(crate) fn wants_trim(config: &TopicConfig) -> bool {
    config.has_retention_limits()
}

/// Trims one partition on behalf of a producer; errors are only logged.
pub(crate) async fn producer_trim(
    client: Client,
    part: Partition,
    config: TopicConfig,
    next: u64,
    total_stored_bytes: u64,
) {
    let (topic, partition) = (part.topic(), part.number());
    match trim_partition(&client, &part, &config, next, total_stored_bytes).await {
        Ok(report) if report.batches_deleted + report.batches_rewritten > 0 => {
            tracing::debug!(%topic, partition, ?report, "trimmed partition to its retention limits");
        }
        Ok(_) => {}
        // Garbage in the partition blocks every later trim until someone
        // removes it, so it must not be as quiet as a passing etcd error.
        Err(error @ Error::Corrupt { .. }) => {
            tracing::warn!(%topic, partition, %error, "retention trim stopped at a corrupt batch");
        }
        Err(error) => {
            tracing::debug!(%topic, partition, %error, "retention trim failed; the next one retries");
        }
    }
}
