//! One commit's attempts: where the outputs go (the plan), the etcd
//! transaction of an attempt on the heads known, and what the else branch
//! of a refused attempt, or a read after an unknown outcome, says.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp, TxnOpResponse, TxnResponse};

use super::{Transaction, FRAMING_BYTES, MAX_REQUEST_BYTES, MAX_TXN_OPS, MAX_UNCERTAIN};
use crate::append::producer_table;
use crate::error::{Error, Result};
use crate::group::Claim;
use crate::partition::{self, Partition};
use crate::producer::{partition_for_key, RecordMetadata};
use crate::record::{self, pb, BatchRecords, MAX_RECORDS_PER_BATCH};
use crate::topic::{parse_topic, topic_arc, validate_topic_name};

/// An output partition's head as last read or written.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub(super) stored: pb::PartitionHead,
    /// 0 while the head key does not exist: etcd compares a missing key's
    /// mod revision as 0.
    pub(super) mod_revision: i64,
}

/// One output partition's share of a commit.
#[derive(Debug)]
pub(super) struct Batch {
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) records: BatchRecords,
    pub(super) count: u64,
}

/// Where a commit's records go: the batches, and for each output in send
/// order its batch and offset delta.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) batches: Vec<Batch>,
    pub(super) placed: Vec<(usize, u64)>,
}

/// A sent attempt: the first output batch's head and batch keys and its
/// base offset (every batch of a transaction lands or none does), and
/// where each output went.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub(super) head_key: String,
    pub(super) batch_key: String,
    pub(super) base: u64,
    pub(super) placed: Vec<RecordMetadata>,
}

/// What the else branch of a refused attempt says.
pub(super) enum Refused {
    /// An earlier attempt of this commit had landed, placing the outputs so.
    Landed(Vec<RecordMetadata>),
    /// Only heads or topic metadata moved: rebuild and send again.
    Moved,
}

impl Transaction {
    /// Reads the metadata of output topics not known yet, in one request.
    pub(super) async fn read_missing_topics(&mut self) -> Result<()> {
        let mut missing: Vec<String> = Vec::new();
        for output in &self.outputs {
            if !self.topics.contains_key(&output.topic) && !missing.contains(&output.topic) {
                validate_topic_name(&output.topic)?;
                missing.push(output.topic.clone());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let gets = missing
            .iter()
            .map(|t| TxnOp::get(self.client.keys.topic(t), None));
        let response = self
            .client
            .read_txn(
                "read output topics",
                Txn::new().and_then(gets.collect::<Vec<_>>()),
            )
            .await?;
        for (name, kv) in missing.into_iter().zip(first_kvs(&response)) {
            let Some(kv) = kv else {
                return Err(Error::TopicNotFound(name));
            };
            let info = parse_topic(&name, &kv)?;
            self.topics.insert(name, info);
        }
        Ok(())
    }

    /// Reads the heads of the plan's partitions not known yet and, in the
    /// same request (one revision), the heads and batches of the uncertain
    /// attempts: says where the commit landed, if it did. Not landed, the
    /// heads cached are from a revision at which it had not, so a stale
    /// attempt that applies later moves them and the next attempt's compare
    /// fails rather than writing the outputs twice.
    pub(super) async fn refresh(&mut self, plan: &Plan) -> Result<Option<Vec<RecordMetadata>>> {
        let missing: Vec<(String, u32)> = plan
            .batches
            .iter()
            .map(|b| (b.topic.clone(), b.partition))
            .filter(|k| !self.heads.contains_key(k))
            .collect();
        let mut gets: Vec<TxnOp> = missing
            .iter()
            .map(|(t, p)| TxnOp::get(self.head_key(t, *p), None))
            .collect();
        for attempt in &self.uncertain {
            gets.push(TxnOp::get(attempt.head_key.clone(), None));
            gets.push(TxnOp::get(attempt.batch_key.clone(), None));
        }
        if gets.is_empty() {
            return Ok(None);
        }
        let response = self
            .client
            .read_txn("read output heads", Txn::new().and_then(gets))
            .await?;
        let kvs = first_kvs(&response);
        let (heads, uncertain) = kvs.split_at(missing.len());
        for (key, kv) in missing.into_iter().zip(heads) {
            self.heads.insert(key, head_of(kv.as_ref())?);
        }
        self.find_landed(uncertain)
    }

    pub(super) fn head_key(&self, topic: &str, partition: u32) -> String {
        let incarnation = self.topics.get(topic).map_or(0, |t| t.incarnation);
        self.client
            .keys
            .head(&Partition::new(topic_arc(topic), incarnation, partition))
    }

    /// Places every output on a partition of its topic's current metadata
    /// and encodes each partition's records.
    pub(super) fn plan(&self) -> Result<Plan> {
        let mut grouped: BTreeMap<(String, u32), Vec<pb::Record>> = BTreeMap::new();
        let mut chosen: Vec<(String, u32, u64)> = Vec::with_capacity(self.outputs.len());
        for output in &self.outputs {
            let info = self
                .topics
                .get(&output.topic)
                .ok_or_else(|| Error::TopicNotFound(output.topic.clone()))?;
            let limit = info
                .config
                .max_message_bytes
                .map_or(crate::DEFAULT_MAX_BATCH_BYTES, |m| m as usize);
            let size = record::encoded_record_len(&output.record);
            if size > limit {
                return Err(Error::MessageTooLarge { size, limit });
            }
            let partition = match (output.partition, &output.key) {
                (Some(p), _) if p >= info.partitions => {
                    return Err(Error::PartitionOutOfRange {
                        topic: output.topic.clone(),
                        partition: p,
                        partitions: info.partitions,
                    })
                }
                (Some(p), _) => p,
                (None, Some(key)) => partition_for_key(key, info.partitions),
                (None, None) => self.keyless % info.partitions,
            };
            let records = grouped
                .entry((output.topic.clone(), partition))
                .or_default();
            let delta = records.len() as u64;
            if delta >= MAX_RECORDS_PER_BATCH {
                return Err(Error::TransactionTooLarge {
                    limit: "records for one output partition",
                    needed: delta as usize + 1,
                    max: MAX_RECORDS_PER_BATCH as usize,
                });
            }
            let mut record = output.record.clone();
            record.offset_delta = delta as u32;
            records.push(record);
            chosen.push((output.topic.clone(), partition, delta));
        }
        let index: HashMap<(String, u32), usize> = grouped
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let placed = chosen
            .into_iter()
            .map(|(t, p, delta)| (index[&(t, p)], delta))
            .collect();
        let batches = grouped
            .into_iter()
            .map(|((topic, partition), records)| {
                let count = records.len() as u64;
                let compression = self.topics[&topic].config.compression;
                Batch {
                    topic,
                    partition,
                    records: BatchRecords::new(records, compression),
                    count,
                }
            })
            .collect();
        Ok(Plan { batches, placed })
    }

    /// The transaction of one attempt on the heads known now, the attempt's
    /// record, and the heads it writes; or why it would exceed etcd's limits.
    #[allow(clippy::type_complexity)]
    pub(super) fn build(
        &self,
        claims: &[(u32, u64, Claim)],
        plan: &Plan,
    ) -> Result<(Txn, Attempt, Vec<((String, u32), pb::PartitionHead)>)> {
        let mut topics: Vec<&str> = plan.batches.iter().map(|b| b.topic.as_str()).collect();
        topics.dedup();
        let mut compares: Vec<Compare> = Vec::new();
        let mut puts: Vec<TxnOp> = Vec::new();
        let mut elses: Vec<TxnOp> = Vec::new();
        let mut bytes = 0usize;
        for (partition, offset, claim) in claims {
            compares.extend(self.committer.fence(*partition, claim));
            puts.push(self.committer.offset_put(*partition, *offset));
            elses.push(self.committer.owner_get(*partition));
            bytes += 2 * FRAMING_BYTES + 200;
        }
        for topic in &topics {
            let key = self.client.keys.topic(topic);
            bytes += key.len() + FRAMING_BYTES;
            compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                self.topics[*topic].mod_revision,
            ));
            elses.push(TxnOp::get(key, None));
        }
        let mut bases = Vec::with_capacity(plan.batches.len());
        let mut new_heads = Vec::with_capacity(plan.batches.len());
        let mut first_keys: Option<(String, String)> = None;
        for batch in &plan.batches {
            let head = &self.heads[&(batch.topic.clone(), batch.partition)];
            let incarnation = self.topics[&batch.topic].incarnation;
            let base = head.stored.next_offset;
            let header = pb::RecordBatch {
                base_offset: base,
                producer_id: self.producer_id,
                producer_seq: self.seq,
                offset_count: batch.count as u32,
                base_bytes: head.stored.total_bytes,
                base_stored_bytes: head.stored.total_stored_bytes,
                ..pb::RecordBatch::default()
            };
            let value = batch.records.value(&header);
            let stored = self.next_head(&head.stored, base, batch, value.len());
            let head_value = record::encode(&stored);
            let head_key = self.head_key(&batch.topic, batch.partition);
            let batch_key = self.client.keys.batch(
                &Partition::new(topic_arc(&batch.topic), incarnation, batch.partition),
                base + batch.count - 1,
            );
            bytes += value.len() + head_value.len() + 2 * head_key.len() + batch_key.len();
            bytes += 3 * FRAMING_BYTES;
            compares.push(Compare::mod_revision(
                head_key.clone(),
                CompareOp::Equal,
                head.mod_revision,
            ));
            puts.push(TxnOp::put(batch_key.clone(), value, None));
            puts.push(TxnOp::put(head_key.clone(), head_value, None));
            elses.push(TxnOp::get(head_key.clone(), None));
            first_keys.get_or_insert((head_key, batch_key));
            bases.push(base);
            new_heads.push(((batch.topic.clone(), batch.partition), stored));
        }
        for attempt in &self.uncertain {
            elses.push(TxnOp::get(attempt.head_key.clone(), None));
            elses.push(TxnOp::get(attempt.batch_key.clone(), None));
        }
        let else_reads = claims.len() + topics.len() + plan.batches.len() + 2 * MAX_UNCERTAIN;
        for (limit, needed, max) in [
            ("compares per etcd transaction", compares.len(), MAX_TXN_OPS),
            ("operations per etcd transaction", puts.len(), MAX_TXN_OPS),
            (
                "reads in the transaction's else branch",
                else_reads,
                MAX_TXN_OPS,
            ),
            (
                "bytes per etcd request (estimated)",
                bytes,
                MAX_REQUEST_BYTES,
            ),
        ] {
            if needed > max {
                return Err(Error::TransactionTooLarge { limit, needed, max });
            }
        }
        let (head_key, batch_key) = first_keys.unwrap_or_default();
        let attempt = Attempt {
            head_key,
            batch_key,
            base: bases.first().copied().unwrap_or_default(),
            placed: plan
                .placed
                .iter()
                .zip(&self.outputs)
                .map(|((batch, delta), output)| RecordMetadata {
                    partition: plan.batches[*batch].partition,
                    offset: bases[*batch] + delta,
                    timestamp: output.record.timestamp_ms,
                })
                .collect(),
        };
        let txn = Txn::new().when(compares).and_then(puts).or_else(elses);
        Ok((txn, attempt, new_heads))
    }

    /// The head after appending `batch` at `base` as a `stored_len`-byte
    /// value: the next offset, the byte counters, and this commit in the
    /// idempotence table (replacing this producer's earlier entry).
    pub(super) fn next_head(
        &self,
        head: &pb::PartitionHead,
        base: u64,
        batch: &Batch,
        stored_len: usize,
    ) -> pb::PartitionHead {
        let latest = pb::ProducerState {
            producer_id: self.producer_id,
            seq: self.seq,
            base_offset: base,
            offset_count: batch.count as u32,
        };
        pb::PartitionHead {
            next_offset: base + batch.count,
            producers: producer_table(&head.producers, latest),
            total_bytes: head.total_bytes + batch.records.len(),
            total_stored_bytes: head.total_stored_bytes + stored_len as u64,
        }
    }

    /// Reads what a refused attempt's else branch brought: an earlier
    /// attempt that landed, a lost input partition, a deleted output topic,
    /// or moved heads and metadata (cached for the next attempt).
    pub(super) fn refused(
        &mut self,
        response: &TxnResponse,
        claims: &[(u32, u64, Claim)],
        plan: &Plan,
    ) -> Result<Refused> {
        let mut kvs = first_kvs(response).into_iter();
        let owners: Vec<Option<KeyValue>> = kvs.by_ref().take(claims.len()).collect();
        let mut topics: Vec<String> = plan.batches.iter().map(|b| b.topic.clone()).collect();
        topics.dedup();
        let topic_kvs: Vec<Option<KeyValue>> = kvs.by_ref().take(topics.len()).collect();
        let head_kvs: Vec<Option<KeyValue>> = kvs.by_ref().take(plan.batches.len()).collect();
        let uncertain: Vec<Option<KeyValue>> = kvs.collect();
        if let Some(bases) = self.find_landed(&uncertain)? {
            return Ok(Refused::Landed(bases));
        }
        for ((partition, _, claim), kv) in claims.iter().zip(&owners) {
            if !self.committer.holds(kv.as_ref(), claim) {
                return Err(Error::NotOwner {
                    topic: self.committer_topic(),
                    partition: *partition,
                });
            }
        }
        for (name, kv) in topics.into_iter().zip(topic_kvs) {
            let known = self.topics[&name].incarnation;
            match kv {
                Some(kv) if kv.create_revision() == known => {
                    let info = parse_topic(&name, &kv)?;
                    self.topics.insert(name, info);
                }
                _ => return Err(Error::TopicDeleted(name)),
            }
        }
        for (batch, kv) in plan.batches.iter().zip(head_kvs) {
            self.heads.insert(
                (batch.topic.clone(), batch.partition),
                head_of(kv.as_ref())?,
            );
        }
        Ok(Refused::Moved)
    }

    pub(super) fn committer_topic(&self) -> String {
        self.committer.topic().to_string()
    }

    /// Looks for this commit's `(producer id, seq)` in the heads and
    /// batches read for the uncertain attempts (a head and a batch each).
    pub(super) fn find_landed(
        &self,
        kvs: &[Option<KeyValue>],
    ) -> Result<Option<Vec<RecordMetadata>>> {
        for (attempt, pair) in self.uncertain.iter().zip(kvs.chunks(2)) {
            let (head, batch) = (
                pair.first().and_then(Option::as_ref),
                pair.get(1).and_then(Option::as_ref),
            );
            if let Some(head) = head {
                let head = stored_head(Some(head))?;
                let mine = head
                    .producers
                    .iter()
                    .find(|p| p.producer_id == self.producer_id && p.seq == self.seq);
                if let Some(entry) = mine {
                    // Attempts on this head differ by base: the one that
                    // landed is the one at the base the table records.
                    if let Some(landed) = self
                        .uncertain
                        .iter()
                        .find(|a| a.head_key == attempt.head_key && a.base == entry.base_offset)
                    {
                        return Ok(Some(landed.placed.clone()));
                    }
                }
            }
            if let Some(kv) = batch {
                let stored =
                    record::decode_batch_value(kv.key(), Bytes::copy_from_slice(kv.value()))?;
                if stored.producer_id == self.producer_id && stored.producer_seq == self.seq {
                    return Ok(Some(attempt.placed.clone()));
                }
            }
        }
        Ok(None)
    }
}

/// The first key-value of each get in a response, in order.
fn first_kvs(response: &TxnResponse) -> Vec<Option<KeyValue>> {
    response
        .op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        })
        .collect()
}

fn head_of(kv: Option<&KeyValue>) -> Result<Head> {
    Ok(Head {
        stored: stored_head(kv)?,
        mod_revision: kv.map_or(0, KeyValue::mod_revision),
    })
}

/// The head as stored, decoded by the one head decoding.
fn stored_head(kv: Option<&KeyValue>) -> Result<pb::PartitionHead> {
    let head = partition::Head::decode(kv)?;
    Ok(pb::PartitionHead {
        next_offset: head.next_offset,
        producers: head.producers,
        total_bytes: head.total_bytes,
        total_stored_bytes: head.total_stored_bytes,
    })
}
