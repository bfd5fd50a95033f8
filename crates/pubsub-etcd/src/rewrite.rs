//! Guarded rewrites of stored batches, what every deletion of records
//! below the public API comes down to: a batch read with its mod revision
//! and lease, rewritten without some records (or its key deleted when none
//! is left) in a transaction guarded by that revision, and re-read and
//! retried when someone else changed it first. `retention.rs` decides what
//! to remove; this module removes it.

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partition::Partition;
use crate::record::{self, pb, BatchRecords, MAX_RECORDS_PER_BATCH};

/// Most rewrite attempts of one batch before giving up: each failure means
/// someone else changed the batch, so this is never reached in practice.
const MAX_REWRITE_ATTEMPTS: u32 = 100;

/// A batch as read from etcd, with what a guarded rewrite needs.
#[derive(Debug, Clone)]
pub(crate) struct StoredBatch {
    pub(crate) key: Vec<u8>,
    mod_revision: i64,
    lease: i64,
    pub(crate) batch: pb::RecordBatch,
}

impl StoredBatch {
    /// Checked by [`Partition::decode_batch`]: a rewrite trusts the
    /// batch's offsets, so a batch contradicting its key fails the sweep
    /// (naming the key) rather than have the wrong records deleted.
    fn from_kv(client: &Client, part: &Partition, kv: etcd_client::KeyValue) -> Result<Self> {
        let mod_revision = kv.mod_revision();
        let lease = kv.lease();
        let (key, value) = kv.into_key_value();
        let batch = part.decode_batch(&client.keys, &key, Bytes::from(value))?;
        Ok(StoredBatch {
            key,
            mod_revision,
            lease,
            batch,
        })
    }

    pub(crate) fn last_offset(&self) -> u64 {
        self.batch.base_offset + u64::from(self.batch.offset_count) - 1
    }
}

/// What rewriting one batch did in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rewrite {
    /// Every record was kept (or the batch was gone): nothing written.
    Unchanged,
    /// Rewritten without `removed` records.
    Rewritten { removed: u64 },
    /// No record was left: the key was deleted.
    Deleted { removed: u64 },
}

impl Rewrite {
    pub(crate) fn removed(self) -> u64 {
        match self {
            Rewrite::Unchanged => 0,
            Rewrite::Rewritten { removed } | Rewrite::Deleted { removed } => removed,
        }
    }
}

/// One guarded rewrite attempt: done, or lost to a change of the batch.
enum Attempt {
    Done(Rewrite),
    /// The batch changed (or vanished) since it was read.
    Conflict,
}

impl Client {
    /// The batch that would hold `offset`: the first whose last offset is at
    /// least `offset` (it holds it when its base offset is not above it).
    pub(crate) async fn batch_containing(
        &self,
        part: &Partition,
        offset: u64,
    ) -> Result<Option<StoredBatch>> {
        let start = self.keys.batch(part, offset);
        // A batch holds at most MAX_RECORDS_PER_BATCH offsets, so the one
        // holding `offset` ends below this key: keep the range narrow.
        let end = self
            .keys
            .batch(part, offset.saturating_add(MAX_RECORDS_PER_BATCH));
        let mut page = read_page(self, part, start.into_bytes(), end.into_bytes(), 1).await?;
        Ok(page.pop())
    }

    /// Re-reads one batch key.
    async fn reread(&self, part: &Partition, key: &[u8]) -> Result<Option<StoredBatch>> {
        // The range from the key to the key just after it: the key alone.
        let mut page = read_page(self, part, key.to_vec(), key_after(key), 1).await?;
        Ok(page.pop())
    }

    /// Rewrites a batch keeping the records for which `keep(offset, record)`
    /// holds, re-reading and retrying on conflict, until done or the batch
    /// is gone.
    pub(crate) async fn rewrite_until_done(
        &self,
        part: &Partition,
        mut stored: StoredBatch,
        keep: impl Fn(u64, &pb::Record) -> bool,
    ) -> Result<Rewrite> {
        for _ in 0..MAX_REWRITE_ATTEMPTS {
            match self.rewrite(&stored, &keep).await? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::Conflict => match self.reread(part, &stored.key).await? {
                    Some(again) => stored = again,
                    None => return Ok(Rewrite::Unchanged),
                },
            }
        }
        Err(Error::InvalidConfig(format!(
            "batch {} kept changing during {MAX_REWRITE_ATTEMPTS} rewrite attempts",
            String::from_utf8_lossy(&stored.key)
        )))
    }

    /// One guarded rewrite attempt.
    async fn rewrite(
        &self,
        stored: &StoredBatch,
        keep: &impl Fn(u64, &pb::Record) -> bool,
    ) -> Result<Attempt> {
        let base = stored.batch.base_offset;
        let before = stored.batch.records.len();
        let mut batch = stored.batch.clone();
        batch
            .records
            .retain(|r| keep(base + u64::from(r.offset_delta), r));
        let removed = (before - batch.records.len()) as u64;
        if removed == 0 {
            return Ok(Attempt::Done(Rewrite::Unchanged));
        }
        let key = stored.key.clone();
        let guard = Compare::mod_revision(key.clone(), CompareOp::Equal, stored.mod_revision);
        let (op, outcome) = if batch.records.is_empty() {
            (TxnOp::delete(key, None), Rewrite::Deleted { removed })
        } else {
            // Keep the batch's lease (records with a time to live), so etcd
            // still deletes it at its deadline.
            let options = (stored.lease != 0).then(|| PutOptions::new().with_lease(stored.lease));
            // Keep the batch's codec too (at its default level): a rewrite
            // only removes records, and a batch is stored plain unless that
            // is larger, so it never outgrows the request limit.
            let records = BatchRecords::new(
                std::mem::take(&mut batch.records),
                record::compression_of(batch.codec),
            );
            batch.codec = 0;
            (
                TxnOp::put(key, records.value(&batch), options),
                Rewrite::Rewritten { removed },
            )
        };
        let txn = Txn::new().when([guard]).and_then([op]);
        match self.timed("rewrite batch", self.kv.clone().txn(txn)).await {
            Ok(response) if response.succeeded() => Ok(Attempt::Done(outcome)),
            Ok(_) => Ok(Attempt::Conflict),
            // The batch's lease expired between read and rewrite: etcd has
            // deleted (or is deleting) the batch; re-read it.
            Err(Error::Etcd { source, .. }) if source.to_string().contains("lease not found") => {
                Ok(Attempt::Conflict)
            }
            Err(e) => Err(e),
        }
    }
}

/// Reads up to `limit` batches with keys in `[start, end)`.
pub(crate) async fn read_page(
    client: &Client,
    part: &Partition,
    start: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
) -> Result<Vec<StoredBatch>> {
    let options = GetOptions::new().with_range(end).with_limit(limit);
    let mut response = client
        .timed("read batches", client.kv.clone().get(start, Some(options)))
        .await?;
    response
        .take_kvs()
        .into_iter()
        .map(|kv| StoredBatch::from_kv(client, part, kv))
        .collect()
}

/// The key just after `key` in etcd's order.
pub(crate) fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}
