//! The append protocol: how one batch of records becomes one etcd
//! transaction on one partition, exactly once, in order.
//!
//! Each append is a transaction that
//! - compares the topic key's create revision with the topic's incarnation
//!   (so a deleted or re-created topic is never written to), and the
//!   partition head's mod revision with the one this appender last saw (so
//!   appends to one partition are serialised and none is lost or reordered);
//! - then puts the batch under a key named by its last offset, and the new
//!   head (next offset, and this producer's latest `(id, seq)` in the
//!   idempotence table);
//! - else reads back the topic key and the head, so a lost race costs one
//!   round trip.
//!
//! When a transaction's outcome is unknown (timeout, broken connection) the
//! appender looks for its `(producer id, seq)` in the head's table, or in
//! the batch it may have written, before trying again: a retry never lands
//! twice. Any stale attempt still in flight carries a compare on an old
//! head revision and so cannot apply once anything else has.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use rand::Rng;
use tokio::time::Instant;

use crate::client::Client;
use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::keys::prefix_end;
use crate::partition::{Head, Partition};
use crate::record::{self, pb, BatchRecords};
use crate::telemetry;

/// Entries kept in a head's idempotence table.
const PRODUCER_TABLE_LEN: usize = 32;

/// The single writer of one producer to one partition.
#[derive(Debug)]
pub(crate) struct PartitionAppender {
    client: Client,
    partition: Partition,
    producer_id: u64,
    compression: Compression,
    /// Sequence number of the next batch.
    next_seq: u64,
    /// What this appender last knew of its partition's head.
    head: Option<Head>,
    /// When this appender last put its waiting marker (it is starved).
    marked_at: Option<Instant>,
    /// Another producer was waiting at our last append: yield before the
    /// next one.
    others_waiting: bool,
    /// When an append last read the waiting markers: appends read them only
    /// every `MARKER_CHECK_EVERY` while nobody waits, so an uncontended
    /// append skips that range read.
    markers_read_at: Option<Instant>,
}

/// An append attempt whose transaction may or may not have applied.
#[derive(Debug, Clone, Copy)]
struct Uncertain {
    base_offset: u64,
    count: u64,
}

impl PartitionAppender {
    pub(crate) fn new(
        client: Client,
        partition: Partition,
        producer_id: u64,
        compression: Compression,
    ) -> Self {
        PartitionAppender {
            client,
            partition,
            producer_id,
            compression,
            next_seq: 0,
            head: None,
            marked_at: None,
            others_waiting: false,
            markers_read_at: None,
        }
    }

    /// The partition's next offset and total stored bytes (what byte
    /// retention counts) as of this appender's last successful append or
    /// read, if known.
    pub(crate) fn known_head(&self) -> Option<(u64, u64)> {
        self.head
            .as_ref()
            .map(|h| (h.next_offset, h.total_stored_bytes))
    }

    /// Appends `records` (at most [`record::MAX_RECORDS_PER_BATCH`]) as one
    /// batch and returns the offset of the first. Gives up with the last
    /// error once `deadline` passes while the outcome is still unknown.
    /// With `lease`, the batch key is attached to that etcd lease (records
    /// with a time to live), so etcd deletes the batch when it expires.
    #[tracing::instrument(level = "debug", name = "append", skip_all, fields(topic = %self.partition.topic(), partition = self.partition.number(), records = records.len()))]
    pub(crate) async fn append_leased(
        &mut self,
        mut records: Vec<pb::Record>,
        deadline: Instant,
        lease: Option<i64>,
    ) -> Result<u64> {
        let count = records.len() as u64;
        debug_assert!(count > 0 && count <= record::MAX_RECORDS_PER_BATCH);
        for (delta, r) in records.iter_mut().enumerate() {
            r.offset_delta = delta as u32;
        }
        let started = Instant::now();
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut uncertain: Vec<Uncertain> = Vec::new();
        let mut conflicts = 0u32;
        // Encoded and compressed once; only the header is redone per attempt.
        let records = BatchRecords::new(records, self.compression);
        let bytes = records.len();
        let mut batch = pb::RecordBatch {
            producer_id: self.producer_id,
            producer_seq: seq,
            offset_count: count as u32,
            ..pb::RecordBatch::default()
        };
        loop {
            let head = match self.head.clone() {
                Some(head) => head,
                None => match self.read_head(seq, &uncertain).await {
                    Ok(Landed::Yes(base)) => return Ok(base),
                    Ok(Landed::No) => continue,
                    Err(e) if e.is_outcome_unknown() && Instant::now() < deadline => {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let others_waited = std::mem::take(&mut self.others_waiting);
            if others_waited {
                // Give a starved producer's retry a window to land first.
                let micros = rand::rng().random_range(0..=YIELD_MAX.as_micros() as u64);
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
            batch.base_offset = head.next_offset;
            batch.base_bytes = head.total_bytes;
            batch.base_stored_bytes = head.total_stored_bytes;
            let read_markers = self.should_read_markers(others_waited);
            let (txn, new_head) =
                self.append_txn(&head, &batch, &records, seq, lease, read_markers);
            match self
                .client
                .timed("append", self.client.kv.clone().txn(txn))
                .await
            {
                Ok(response) if response.succeeded() => {
                    telemetry::appended(self.partition.topic(), count, bytes, started.elapsed());
                    self.head = Some(Head {
                        mod_revision: response.header().map_or(0, |h| h.revision()),
                        ..new_head
                    });
                    self.marked_at = None;
                    if read_markers {
                        self.markers_read_at = Some(Instant::now());
                        self.others_waiting = self.others_waiting_in(&response);
                    }
                    return Ok(batch.base_offset);
                }
                Ok(response) => {
                    // Lost a race: the else branch brought the current head.
                    match self.parse_state(&response, seq, &uncertain)? {
                        Landed::Yes(base) => return Ok(base),
                        Landed::No if Instant::now() >= deadline => {
                            // Never written: the records fail, none is stored.
                            return Err(Error::Contended {
                                topic: self.partition.topic().to_string(),
                                partition: self.partition.number(),
                                waited: started.elapsed(),
                            });
                        }
                        Landed::No => {
                            telemetry::append_conflict(self.partition.topic());
                            conflicts += 1;
                            if conflicts >= STARVED_AFTER {
                                self.mark_waiting().await;
                            }
                            backoff(conflicts).await;
                        }
                    }
                }
                Err(e) if e.is_outcome_unknown() => {
                    uncertain.push(Uncertain {
                        base_offset: batch.base_offset,
                        count,
                    });
                    self.head = None;
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    telemetry::append_retry(self.partition.topic());
                    tracing::debug!(topic = %self.partition.topic(), partition = self.partition.number(), error = %e, "append outcome unknown, checking");
                }
                Err(e @ Error::QuotaExceeded { .. }) => {
                    // etcd applies a write that passed its quota pre-check
                    // but crosses the quota while being applied, and still
                    // answers "database space exceeded" (and raises the
                    // alarm): check, with a read (reads work under NOSPACE),
                    // whether this batch landed.
                    uncertain.push(Uncertain {
                        base_offset: batch.base_offset,
                        count,
                    });
                    self.head = None;
                    loop {
                        match self.read_head(seq, &uncertain).await {
                            Ok(Landed::Yes(base)) => return Ok(base),
                            Ok(Landed::No) => {
                                self.head = None;
                                return Err(e);
                            }
                            // Not known whether the batch is stored: say
                            // so, rather than a definite-looking refusal.
                            Err(other)
                                if !other.is_outcome_unknown() || Instant::now() >= deadline =>
                            {
                                return Err(other)
                            }
                            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
                        }
                    }
                }
                Err(e) => {
                    self.head = None;
                    return Err(e);
                }
            }
        }
    }

    fn head_key(&self) -> String {
        self.client.keys.head(&self.partition)
    }

    fn topic_key(&self) -> String {
        self.client.keys.topic(self.partition.topic())
    }

    /// Whether this append reads the waiting markers: always while another
    /// producer was seen waiting (so this one keeps yielding until it stops
    /// waiting), otherwise once per `MARKER_CHECK_EVERY`, which delays the
    /// first yield to a newly starved producer by at most that long.
    fn should_read_markers(&self, others_waited: bool) -> bool {
        others_waited
            || self
                .markers_read_at
                .is_none_or(|at| at.elapsed() >= MARKER_CHECK_EVERY)
    }

    /// The transaction appending `records` as `batch` (its header) on
    /// `head`, and the head it writes.
    fn append_txn(
        &self,
        head: &Head,
        batch: &pb::RecordBatch,
        records: &BatchRecords,
        seq: u64,
        lease: Option<i64>,
        read_markers: bool,
    ) -> (Txn, Head) {
        let count = u64::from(batch.offset_count);
        let batch_value = records.value(batch);
        let producers = producer_table(
            &head.producers,
            pb::ProducerState {
                producer_id: self.producer_id,
                seq,
                base_offset: batch.base_offset,
                offset_count: count as u32,
            },
        );
        let new_head = Head {
            next_offset: batch.base_offset + count,
            mod_revision: 0,
            producers,
            total_bytes: head.total_bytes + records.len(),
            total_stored_bytes: head.total_stored_bytes + batch_value.len() as u64,
        };
        let head_value = new_head.encode();
        let batch_key = self
            .client
            .keys
            .batch(&self.partition, batch.base_offset + count - 1);
        let txn = Txn::new()
            .when([
                Compare::create_revision(
                    self.topic_key(),
                    CompareOp::Equal,
                    self.partition.incarnation(),
                ),
                Compare::mod_revision(self.head_key(), CompareOp::Equal, head.mod_revision),
            ])
            .and_then(self.then_ops(batch_key, batch_value, head_value, lease, read_markers))
            .or_else([
                TxnOp::get(self.topic_key(), None),
                TxnOp::get(self.head_key(), None),
            ]);
        (txn, new_head)
    }

    /// The writes of an append, maybe a read of the waiting markers, and
    /// the removal of ours once this append ends our starvation.
    fn then_ops(
        &self,
        batch_key: String,
        batch_value: Vec<u8>,
        head_value: Vec<u8>,
        lease: Option<i64>,
        read_markers: bool,
    ) -> Vec<TxnOp> {
        let keys = &self.client.keys;
        let waiting = keys.waiting_prefix(&self.partition);
        let mut ops = vec![
            TxnOp::put(
                batch_key,
                batch_value,
                lease.map(|id| PutOptions::new().with_lease(id)),
            ),
            TxnOp::put(self.head_key(), head_value, None),
        ];
        if read_markers {
            ops.push(TxnOp::get(
                waiting.clone(),
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(&waiting))
                        .with_limit(MAX_MARKERS_READ),
                ),
            ));
        }
        if self.marked_at.is_some() {
            ops.push(TxnOp::delete(
                keys.waiting(&self.partition, self.producer_id),
                None,
            ));
        }
        ops
    }

    /// Whether a successful append saw a recent marker of another producer.
    fn others_waiting_in(&self, response: &TxnResponse) -> bool {
        let mine = self.client.keys.waiting(&self.partition, self.producer_id);
        let recent = record::now_millis() - MARKER_FRESH_MS;
        response.op_responses().into_iter().any(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().iter().any(|kv| {
                kv.key() != mine.as_bytes()
                    && std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|v| v.parse::<i64>().ok())
                        .is_some_and(|at| at >= recent)
            }),
            _ => false,
        })
    }

    /// Tells the producers that keep winning this partition that this one
    /// is starved, refreshing the marker at most once a second. Best
    /// effort: a failed put only means no help this time.
    async fn mark_waiting(&mut self) {
        if self
            .marked_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let key = self.client.keys.waiting(&self.partition, self.producer_id);
        // Under a short lease, so a producer that stops while starved
        // leaves nothing behind.
        let mut lease_client = self.client.etcd.lease_client();
        let grant = lease_client.grant(MARKER_LEASE_SECS, None);
        let Ok(lease) = self.client.timed("mark waiting", grant).await else {
            return;
        };
        let mut kv = self.client.kv.clone();
        let options = PutOptions::new().with_lease(lease.id());
        let put = kv.put(key, record::now_millis().to_string(), Some(options));
        if self.client.timed("mark waiting", put).await.is_ok() {
            self.marked_at = Some(Instant::now());
        }
    }

    /// Reads the topic key, the head and the batches of uncertain attempts.
    async fn read_head(&mut self, seq: u64, uncertain: &[Uncertain]) -> Result<Landed> {
        let mut ops = vec![
            TxnOp::get(self.topic_key(), None),
            TxnOp::get(self.head_key(), None),
        ];
        for u in uncertain {
            ops.push(TxnOp::get(
                self.client
                    .keys
                    .batch(&self.partition, u.base_offset + u.count - 1),
                None,
            ));
        }
        let response = self
            .client
            .timed(
                "read partition head",
                self.client.kv.clone().txn(Txn::new().and_then(ops)),
            )
            .await?;
        self.parse_state(&response, seq, uncertain)
    }

    /// Takes the topic key and head (and maybe batches) from a response,
    /// caches the head, and tells whether batch `seq` is already stored.
    fn parse_state(
        &mut self,
        response: &TxnResponse,
        seq: u64,
        uncertain: &[Uncertain],
    ) -> Result<Landed> {
        let mut gets = response.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let topic = gets.next().flatten();
        if topic.map(|kv| kv.create_revision()) != Some(self.partition.incarnation()) {
            return Err(Error::TopicDeleted(self.partition.topic().to_string()));
        }
        let head = Head::decode(gets.next().flatten().as_ref())?;
        let landed = head
            .producers
            .iter()
            .find(|p| p.producer_id == self.producer_id && p.seq == seq)
            .map(|p| p.base_offset);
        self.head = Some(head);
        if let Some(base) = landed {
            return Ok(Landed::Yes(base));
        }
        // Evicted from the table by many other producers: the batch itself
        // names its producer.
        for (u, kv) in uncertain.iter().zip(gets) {
            if let Some(kv) = kv {
                let batch =
                    record::decode_batch_value(kv.key(), Bytes::copy_from_slice(kv.value()))?;
                if batch.producer_id == self.producer_id && batch.producer_seq == seq {
                    return Ok(Landed::Yes(u.base_offset));
                }
            }
        }
        if !uncertain.is_empty() && response.op_responses().len() < 2 + uncertain.len() {
            // The else branch of a failed append carries no batches: read
            // again, batches included, before deciding to append anew.
            self.head = None;
        }
        Ok(Landed::No)
    }
}

/// A head's idempotence table after `latest`: its producer's earlier entry
/// replaced, the oldest entries dropped beyond the table's length.
pub(crate) fn producer_table(
    table: &[pb::ProducerState],
    latest: pb::ProducerState,
) -> Vec<pb::ProducerState> {
    let mut producers: Vec<pb::ProducerState> = table
        .iter()
        .filter(|p| p.producer_id != latest.producer_id)
        .cloned()
        .collect();
    producers.push(latest);
    let excess = producers.len().saturating_sub(PRODUCER_TABLE_LEN);
    producers.drain(..excess);
    producers
}

/// Whether the batch being appended is already stored, and where.
enum Landed {
    Yes(u64),
    No,
}

/// Consecutive lost races after which a producer marks itself waiting.
const STARVED_AFTER: u32 = 2;
/// Markers older than this are ignored (their producer stopped or won).
const MARKER_FRESH_MS: i64 = 2000;
/// TTL of a marker's lease: etcd removes a marker its producer abandoned.
const MARKER_LEASE_SECS: i64 = 5;
/// How often an append reads the waiting markers while nobody waits. Well
/// under `MARKER_FRESH_MS` and the starved producer's 1 s refresh, so a
/// starved producer is seen within a fraction of its marker's life.
const MARKER_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Markers an append reads at most; a few are enough to know to yield.
const MAX_MARKERS_READ: i64 = 8;
/// Longest pause a winning producer takes for a waiting one.
const YIELD_MAX: Duration = Duration::from_millis(2);
/// Pause before re-reading the head after a request with unknown outcome.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Retries after a lost race are immediate: the else branch brought the
/// current head, and a loser that sleeps only falls further behind the
/// winner. Many consecutive conflicts (a crowd of producers) add up to 1 ms
/// of jitter so attempts spread out.
async fn backoff(conflicts: u32) {
    if conflicts > 4 {
        let micros = rand::rng().random_range(0..=1000);
        tokio::time::sleep(Duration::from_micros(micros)).await;
    }
}
