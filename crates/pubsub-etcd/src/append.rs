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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse, TxnResponse};
use rand::Rng;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::record::{self, pb};

/// Entries kept in a head's idempotence table.
const PRODUCER_TABLE_LEN: usize = 32;

/// What this appender last knew of its partition's head.
#[derive(Debug, Clone)]
struct Head {
    next_offset: u64,
    /// 0 while the head key does not exist yet: etcd compares a missing
    /// key's mod revision as 0.
    mod_revision: i64,
    producers: Vec<pb::ProducerState>,
}

/// The single writer of one producer to one partition.
#[derive(Debug)]
pub(crate) struct PartitionAppender {
    client: Client,
    topic: Arc<str>,
    incarnation: i64,
    partition: u32,
    producer_id: u64,
    /// Sequence number of the next batch.
    next_seq: u64,
    head: Option<Head>,
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
        topic: Arc<str>,
        incarnation: i64,
        partition: u32,
        producer_id: u64,
    ) -> Self {
        PartitionAppender {
            client,
            topic,
            incarnation,
            partition,
            producer_id,
            next_seq: 0,
            head: None,
        }
    }

    /// Appends `records` (at most [`record::MAX_RECORDS_PER_BATCH`]) as one
    /// batch and returns the offset of the first. Gives up with the last
    /// error once `deadline` passes while the outcome is still unknown.
    pub(crate) async fn append(
        &mut self,
        mut records: Vec<pb::Record>,
        deadline: Instant,
    ) -> Result<u64> {
        let count = records.len() as u64;
        debug_assert!(count > 0 && count <= record::MAX_RECORDS_PER_BATCH);
        for (delta, r) in records.iter_mut().enumerate() {
            r.offset_delta = delta as u32;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut uncertain: Vec<Uncertain> = Vec::new();
        let mut conflicts = 0u32;
        let mut batch = pb::RecordBatch {
            base_offset: 0,
            producer_id: self.producer_id,
            producer_seq: seq,
            records,
            offset_count: count as u32,
        };
        loop {
            let head = match self.head.clone() {
                Some(head) => head,
                None => match self.read_head(seq, &uncertain).await {
                    Ok(Landed::Yes(base)) => return Ok(base),
                    Ok(Landed::No) => continue,
                    Err(e) if e.is_outcome_unknown() && Instant::now() < deadline => {
                        backoff(&mut conflicts).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            batch.base_offset = head.next_offset;
            let (txn, new_head) = self.append_txn(&head, &batch, seq, count);
            match self
                .client
                .timed("append", self.client.kv.clone().txn(txn))
                .await
            {
                Ok(response) if response.succeeded() => {
                    self.head = Some(Head {
                        mod_revision: response.header().map_or(0, |h| h.revision()),
                        ..new_head
                    });
                    return Ok(batch.base_offset);
                }
                Ok(response) => {
                    // Lost a race: the else branch brought the current head.
                    match self.parse_state(&response, seq, &uncertain)? {
                        Landed::Yes(base) => return Ok(base),
                        Landed::No => backoff(&mut conflicts).await,
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
                    tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "append outcome unknown, checking");
                }
                Err(e) => {
                    self.head = None;
                    return Err(e);
                }
            }
        }
    }

    fn head_key(&self) -> String {
        self.client
            .keys
            .head(&self.topic, self.incarnation, self.partition)
    }

    fn topic_key(&self) -> String {
        self.client.keys.topic(&self.topic)
    }

    fn append_txn(
        &self,
        head: &Head,
        batch: &pb::RecordBatch,
        seq: u64,
        count: u64,
    ) -> (Txn, Head) {
        let mut producers: Vec<pb::ProducerState> = head
            .producers
            .iter()
            .filter(|p| p.producer_id != self.producer_id)
            .cloned()
            .collect();
        producers.push(pb::ProducerState {
            producer_id: self.producer_id,
            seq,
            base_offset: batch.base_offset,
            offset_count: count as u32,
        });
        if producers.len() > PRODUCER_TABLE_LEN {
            producers.drain(..producers.len() - PRODUCER_TABLE_LEN);
        }
        let new_head = Head {
            next_offset: batch.base_offset + count,
            mod_revision: 0,
            producers,
        };
        let head_value = record::encode(&pb::PartitionHead {
            next_offset: new_head.next_offset,
            producers: new_head.producers.clone(),
        });
        let batch_key = self.client.keys.batch(
            &self.topic,
            self.incarnation,
            self.partition,
            batch.base_offset + count - 1,
        );
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.topic_key(), CompareOp::Equal, self.incarnation),
                Compare::mod_revision(self.head_key(), CompareOp::Equal, head.mod_revision),
            ])
            .and_then([
                TxnOp::put(batch_key, record::encode(batch), None),
                TxnOp::put(self.head_key(), head_value, None),
            ])
            .or_else([
                TxnOp::get(self.topic_key(), None),
                TxnOp::get(self.head_key(), None),
            ]);
        (txn, new_head)
    }

    /// Reads the topic key, the head and the batches of uncertain attempts.
    async fn read_head(&mut self, seq: u64, uncertain: &[Uncertain]) -> Result<Landed> {
        let mut ops = vec![
            TxnOp::get(self.topic_key(), None),
            TxnOp::get(self.head_key(), None),
        ];
        for u in uncertain {
            ops.push(TxnOp::get(
                self.client.keys.batch(
                    &self.topic,
                    self.incarnation,
                    self.partition,
                    u.base_offset + u.count - 1,
                ),
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
        if topic.map(|kv| kv.create_revision()) != Some(self.incarnation) {
            return Err(Error::TopicDeleted(self.topic.to_string()));
        }
        let head = match gets.next().flatten() {
            Some(kv) => {
                let stored: pb::PartitionHead =
                    record::decode(kv.key(), Bytes::copy_from_slice(kv.value()))?;
                Head {
                    next_offset: stored.next_offset,
                    mod_revision: kv.mod_revision(),
                    producers: stored.producers,
                }
            }
            None => Head {
                next_offset: 0,
                mod_revision: 0,
                producers: Vec::new(),
            },
        };
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
                let batch: pb::RecordBatch =
                    record::decode(kv.key(), Bytes::copy_from_slice(kv.value()))?;
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

/// Whether the batch being appended is already stored, and where.
enum Landed {
    Yes(u64),
    No,
}

/// Sleeps a little longer after each consecutive conflict, with jitter so
/// contending producers spread out. The first retry is immediate.
async fn backoff(conflicts: &mut u32) {
    *conflicts += 1;
    if *conflicts > 1 {
        let cap_ms = (1u64 << (*conflicts).min(6)).min(50);
        let ms = rand::rng().random_range(0..=cap_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
