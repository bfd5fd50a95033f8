//! The record batches a queue worker keeps decoded between its leases.
//!
//! A lease takes a few hundred or thousand offsets, and a batch holds up to
//! 10,000 records (about 1 MiB of 100-byte messages), so reading the batch
//! for every lease moved and decoded each message many times: in
//! `bench queue`, 850 leases read 850 MiB to settle 200,000 messages of
//! 100 B. A lease now lists the batch keys of its range with a keys-only read
//! and takes each batch from this cache when etcd still holds it at the same
//! `mod_revision`; only a batch that is new, or changed (rewritten by key
//! compaction or a deletion), is read and decoded again. Serving from the
//! cache therefore gives exactly what a read would, expiry included (it is
//! checked at serve time).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue};

use crate::client::Client;
use crate::error::Result;
use crate::partition::Partition;
use crate::record::{self, pb, Message, MAX_RECORDS_PER_BATCH};

/// Decoded batches kept per worker: the one a lease ended in, which its
/// next lease on the partition most likely starts in, and one more.
const CACHED: usize = 2;

/// Batch keys one listing returns; a lease over more (small) batches lists
/// again from the last one it read.
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
    pub(super) async fn read(
        &mut self,
        client: &Client,
        part: &Partition,
        from: u64,
        to: u64,
    ) -> Result<Range> {
        let keys = &client.keys;
        let now = record::now_millis();
        let mut range = Range {
            messages: Vec::new(),
            covered: from,
            beyond: None,
        };
        while range.covered < to {
            // A batch is named by its last offset and spans at most
            // MAX_RECORDS_PER_BATCH, so every batch holding an offset of
            // the range is named below `to + MAX_RECORDS_PER_BATCH`.
            let start = keys.batch(part, range.covered);
            let end = keys.batch(part, to.saturating_add(MAX_RECORDS_PER_BATCH));
            let options = GetOptions::new()
                .with_range(end)
                .with_limit(KEYS_PER_LIST)
                .with_keys_only();
            let listed = client.read("list batches", start, Some(options)).await?;
            let full = listed.kvs().len() as i64 == KEYS_PER_LIST;
            // Key order is offset order: the first batch named at or past
            // `to - 1` is the last one the range can need.
            let last_needed = keys.batch(part, to - 1);
            let needed = listed
                .kvs()
                .iter()
                .position(|kv| kv.key() >= last_needed.as_bytes())
                .map_or(listed.kvs(), |i| &listed.kvs()[..=i]);
            let mut values = self.missing_values(client, needed).await?;
            // Batches are put back in the cache once the listing is done, so
            // that none this listing needs is evicted by another it needs.
            let mut used = Vec::new();
            let mut last = None;
            for kv in needed {
                let entry = match self.take(kv.key(), kv.mod_revision()) {
                    Some(entry) => entry,
                    None => {
                        let got = match values.remove(kv.key()) {
                            Some(got) => Some(got),
                            None => client
                                .read("fetch", kv.key().to_vec(), None)
                                .await?
                                .take_kvs()
                                .into_iter()
                                .next(),
                        };
                        // Deleted since the listing: its offsets are gaps.
                        let Some(got) = got else { continue };
                        let mod_revision = got.mod_revision();
                        let (key, value) = got.into_key_value();
                        match part.decode_batch(keys, &key, Bytes::from(value)) {
                            Ok(batch) => Entry {
                                key,
                                mod_revision,
                                batch,
                            },
                            // Nothing of it can be delivered, so its offsets
                            // are gaps, as for a reader that skips it.
                            Err(error) => {
                                tracing::warn!(%error, "skipping a corrupt batch");
                                continue;
                            }
                        }
                    }
                };
                let batch = &entry.batch;
                let batch_end = batch.base_offset + u64::from(batch.offset_count);
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
                last = Some(batch_end);
                used.push(entry);
                if batch_end >= to {
                    break;
                }
            }
            for entry in used {
                if self.entries.len() >= CACHED {
                    self.entries.pop_front();
                }
                self.entries.push_back(entry);
            }
            range.covered = match last {
                Some(end) if full && end < to => end,
                _ => to,
            };
        }
        Ok(range)
    }

    /// The cached batch at `key` as of `mod_revision`, taken out.
    fn take(&mut self, key: &[u8], mod_revision: i64) -> Option<Entry> {
        let index = self
            .entries
            .iter()
            .position(|e| e.key == key && e.mod_revision == mod_revision)?;
        self.entries.remove(index)
    }

    /// The values of the `listed` batches the cache does not hold, by key:
    /// one read from the first such key to the last, where one read per
    /// batch would cost a round trip for each small batch. A key this read
    /// misses (written or deleted meanwhile) is read alone by the caller.
    async fn missing_values(
        &self,
        client: &Client,
        listed: &[KeyValue],
    ) -> Result<HashMap<Vec<u8>, KeyValue>> {
        let cached = |kv: &KeyValue| {
            self.entries
                .iter()
                .any(|e| e.key == kv.key() && e.mod_revision == kv.mod_revision())
        };
        let mut missing = listed.iter().filter(|kv| !cached(kv));
        let Some(first) = missing.next() else {
            return Ok(HashMap::new());
        };
        let mut end = missing.next_back().unwrap_or(first).key().to_vec();
        end.push(0);
        let options = GetOptions::new().with_range(end).with_limit(KEYS_PER_LIST);
        let mut response = client
            .read("fetch", first.key().to_vec(), Some(options))
            .await?;
        Ok(response
            .take_kvs()
            .into_iter()
            .map(|kv| (kv.key().to_vec(), kv))
            .collect())
    }
}
