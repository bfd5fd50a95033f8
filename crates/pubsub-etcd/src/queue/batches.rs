//! The record batches a queue worker keeps decoded between its leases.
//!
//! A lease takes a few hundred or thousand offsets, and a batch holds up to
//! 10,000 records (about 1 MiB of 100-byte messages), so reading the batch
//! for every lease moved and decoded each message many times: in
//! `bench queue`, 850 leases read 850 MiB to settle 200,000 messages of
//! 100 B. A lease now takes the batch its range starts in from this cache
//! when etcd still holds it at the same `mod_revision` (checked in the same
//! read-only transaction that reads the batches after it); only a batch that
//! is new, or changed (rewritten by key compaction or a deletion), is read
//! and decoded again. Serving from the cache therefore gives exactly what a
//! read would, expiry included (it is checked at serve time).

use std::collections::VecDeque;

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::partition::Partition;
use crate::record::{self, pb, Message, MAX_RECORDS_PER_BATCH};

/// Decoded batches kept per worker: the one a lease ended in, which its
/// next lease on the partition most likely starts in, and one more.
const CACHED: usize = 2;

/// Batches one read returns; a lease over more (small) batches reads on
/// from the last one it got.
const KEYS_PER_LIST: i64 = 32;

#[derive(Debug, Default)]
pub(super) struct BatchCache {
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    key: Vec<u8>,
    mod_revision: i64,
    batch: pb::RecordBatch,
}

/// What a lease's range held.
pub(super) struct Range {
    /// In offset order.
    pub(super) messages: Vec<Message>,
    /// Past every offset examined, which is the range's end: the offsets
    /// without a message are gaps (deleted, expired, trimmed, or in a
    /// corrupt batch).
    pub(super) covered: u64,
    /// The first offset at or past the range's end that a batch holds.
    pub(super) beyond: Option<u64>,
}

impl BatchCache {
    /// The messages of `part` at offsets in `[from, to)`.
    ///
    /// One read-only transaction per step: it checks that the cached batch
    /// holding `covered` (if any) is still stored at its `mod_revision`, and
    /// reads the values of the batches after it that the range needs. Those
    /// are the keys from `batch(start)` below `batch(to - 1)` (at most
    /// [`KEYS_PER_LIST`]), and the first key at or past `batch(to - 1)`:
    /// batch keys name their last offset, so only that one can still hold an
    /// offset below `to`.
    pub(super) async fn read(
        &mut self,
        client: &Client,
        part: &Partition,
        from: u64,
        to: u64,
    ) -> Result<Range> {
        let keys = &client.keys;
        let prefix = keys.batches_prefix(part);
        let now = record::now_millis();
        let mut range = Range {
            messages: Vec::new(),
            covered: from,
            beyond: None,
        };
        while range.covered < to {
            let cached = self.entries.iter().position(|e| {
                e.key.starts_with(prefix.as_bytes())
                    && e.batch.base_offset <= range.covered
                    && range.covered < e.end()
            });
            let start = cached.map_or(range.covered, |i| self.entries[i].end());
            let mut ops = Vec::with_capacity(3);
            if let Some(i) = cached {
                let options = GetOptions::new().with_keys_only();
                ops.push(TxnOp::get(self.entries[i].key.clone(), Some(options)));
            }
            if start < to {
                let last_needed = keys.batch(part, to - 1);
                let before = GetOptions::new()
                    .with_range(last_needed.clone())
                    .with_limit(KEYS_PER_LIST);
                ops.push(TxnOp::get(keys.batch(part, start), Some(before)));
                // A batch spans at most MAX_RECORDS_PER_BATCH offsets.
                let end = keys.batch(part, to.saturating_add(MAX_RECORDS_PER_BATCH));
                let last = GetOptions::new().with_range(end).with_limit(1);
                ops.push(TxnOp::get(last_needed, Some(last)));
            }
            let response = client.read_txn("fetch", Txn::new().and_then(ops)).await?;
            let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
                TxnOpResponse::Get(get) => Some(get),
                _ => None,
            });
            let mut batches = Vec::new();
            if let Some(i) = cached {
                let entry = &self.entries[i];
                let unchanged = gets.next().is_some_and(|get| {
                    get.kvs()
                        .first()
                        .is_some_and(|kv| kv.mod_revision() == entry.mod_revision)
                });
                if !unchanged {
                    // Rewritten or deleted since it was read: read again.
                    self.entries.remove(i);
                    continue;
                }
                batches.extend(self.entries.remove(i));
            }
            // Past a truncated listing, the next step starts after the
            // offset its last key names, decoded or not.
            let mut listed_up_to = None;
            if let (Some(mut before), Some(mut last)) = (gets.next(), gets.next()) {
                let truncated = before.more();
                let kvs = before.take_kvs();
                if truncated {
                    listed_up_to = Some(last_listed(keys, part, &kvs)?);
                }
                let mut stored = kvs;
                // The batch at or past `key(to - 1)` is the range's last:
                // after a truncated listing, a later step reads it.
                if !truncated {
                    stored.extend(last.take_kvs());
                }
                for kv in stored {
                    let mod_revision = kv.mod_revision();
                    let (key, value) = kv.into_key_value();
                    match part.decode_batch(keys, &key, Bytes::from(value)) {
                        Ok(batch) => batches.push(Entry {
                            key,
                            mod_revision,
                            batch,
                        }),
                        // Nothing of it can be delivered, so its offsets
                        // are gaps, as for a reader that skips it.
                        Err(error) => tracing::warn!(%error, "skipping a corrupt batch"),
                    }
                }
            }
            for entry in &batches {
                let batch = &entry.batch;
                range.messages.extend(record::batch_messages_in(
                    part,
                    batch,
                    range.covered,
                    to,
                    now,
                ));
                if range.beyond.is_none() {
                    range.beyond = batch
                        .records
                        .iter()
                        .map(|r| batch.base_offset + u64::from(r.offset_delta))
                        .find(|&offset| offset >= to);
                }
            }
            // Batches go back in the cache once this step is done, so that
            // none it needs is evicted by another it needs.
            for entry in batches {
                if self.entries.len() >= CACHED {
                    self.entries.pop_front();
                }
                self.entries.push_back(entry);
            }
            // Every batch this step holds ends at or before the listed
            // offset: a decoded batch's key names its last offset, and the
            // cached one ends where the listing starts.
            range.covered = match listed_up_to {
                Some(listed) => listed.saturating_add(1).clamp(range.covered + 1, to),
                None => to,
            };
        }
        Ok(range)
    }
}

/// The offset the last well-formed key of a cut-off listing names. A
/// malformed key (another width, a suffix) can sort among batch keys while
/// naming an offset far ahead or behind, so it is not trusted with where to
/// read on.
fn last_listed(keys: &Keys, part: &Partition, kvs: &[KeyValue]) -> Result<u64> {
    kvs.iter()
        .rev()
        .find_map(|kv| {
            Keys::trailing_number(kv.key())
                .filter(|&offset| keys.batch(part, offset).as_bytes() == kv.key())
        })
        .ok_or_else(|| Error::Corrupt {
            key: kvs
                .last()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .unwrap_or_default(),
            reason: format!(
                "none of the {} batch keys listed up to here ends in the offset of its last record",
                kvs.len()
            ),
        })
}

impl Entry {
    /// Past the batch's last offset.
    fn end(&self) -> u64 {
        self.batch.base_offset + u64::from(self.batch.offset_count)
    }
}
