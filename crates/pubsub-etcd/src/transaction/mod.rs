//! Exactly-once consume, transform, produce: a group member's [`Transaction`]
//! writes output records to any topics and commits input offsets in one etcd
//! transaction, all or nothing.
//!
//! The transaction compares the member's owner keys of the input partitions
//! (the fence of `group::commit`), the output topics' metadata revisions and
//! the output partitions' heads (the compare of `append`), then puts the
//! output batches, their heads and the input offsets. A lost race on an
//! output head is retried on the fresh head with the same fences; a lost
//! input partition refuses the whole commit. Every output batch carries the
//! transaction's producer id and the commit's sequence number, so a commit
//! whose outcome was unknown is recognised when it landed, as appends are.
//! DESIGN.md ("Exactly-once transactions") gives the protocol.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::client::Client;
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::group::{AutoCommit, Committer};
use crate::producer::RecordMetadata;
use crate::record::{pb, Message, Record};
use crate::topic::TopicInfo;

mod attempt;

use attempt::{Attempt, Head, Plan, Refused};

/// etcd's limit of compares, and of operations per branch, per transaction.
const MAX_TXN_OPS: usize = 128;
/// etcd's default request size limit (`--max-request-bytes`).
const MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Allowance per compare and operation for the request's framing, above
/// its keys and values: generous, so an estimate that passes is never
/// refused by etcd.
const FRAMING_BYTES: usize = 64;
/// Attempts with an unknown outcome one commit looks after at most.
const MAX_UNCERTAIN: usize = 8;
/// How long lost races on output heads are retried.
const CONTENDED_AFTER: Duration = Duration::from_secs(60);
/// How long unknown outcomes are retried.
const UNAVAILABLE_AFTER: Duration = Duration::from_secs(10);
/// Pause before checking again after an unknown outcome.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl Consumer {
    /// An empty exactly-once transaction of this member: outputs added
    /// with [`Transaction::send`] and input messages marked handled with
    /// [`Transaction::commit_input`] are written together by
    /// [`Transaction::commit`], or not at all. The consumer must use
    /// [`AutoCommit::Disabled`]: other policies commit offsets outside the
    /// transactions.
    pub fn transaction(&self) -> Transaction {
        let committer = self.committer();
        Transaction {
            client: committer.client().clone(),
            committer,
            auto_commit: self.auto_commit_policy(),
            producer_id: rand::random(),
            seq: 0,
            keyless: rand::random::<u32>(),
            outputs: Vec::new(),
            inputs: BTreeMap::new(),
            uncertain: Vec::new(),
            topics: HashMap::new(),
            heads: HashMap::new(),
        }
    }
}

/// Outputs and input offsets of a group member, committed by one etcd
/// transaction (see [`Consumer::transaction`]).
///
/// Reusable: a successful [`Transaction::commit`] empties it and keeps what
/// it learnt of the output topics and partition heads, so a pipeline that
/// keeps one transaction costs one etcd transaction per commit.
///
/// ```no_run
/// use pubsub_etcd::{AutoCommit, Client, Record};
///
/// # async fn run(client: Client) -> pubsub_etcd::Result<()> {
/// let mut consumer = client
///     .consumer("orders", "enrich")
///     .auto_commit(AutoCommit::Disabled)
///     .join()
///     .await?;
/// let mut tx = consumer.transaction();
/// while let Some(message) = consumer.recv().await {
///     let message = message?;
///     let mut out = Record::new(message.value.to_ascii_uppercase());
///     if let Some(key) = &message.key {
///         out = out.key(key.clone());
///     }
///     tx.send("orders-enriched", out);
///     tx.commit_input(&message);
///     tx.commit().await?; // the output and the offset, or neither
/// }
/// consumer.close().await
/// # }
/// ```
#[derive(Debug)]
pub struct Transaction {
    /// The member's own connection.
    client: Client,
    committer: Committer,
    auto_commit: AutoCommit,
    producer_id: u64,
    /// Sequence number of the next commit.
    seq: u64,
    /// Where this commit's keyless records go (modulo the partitions).
    keyless: u32,
    outputs: Vec<Output>,
    /// Input partition -> the next offset to commit.
    inputs: BTreeMap<u32, u64>,
    /// Attempts of the current commit whose outcome is unknown.
    uncertain: Vec<Attempt>,
    topics: HashMap<String, TopicInfo>,
    heads: HashMap<(String, u32), Head>,
}

/// An output record, converted (its timestamp fixed) when sent.
#[derive(Debug, Clone)]
struct Output {
    topic: String,
    partition: Option<u32>,
    key: Option<Bytes>,
    has_ttl: bool,
    record: pb::Record,
}

impl Transaction {
    /// Adds `record` to the outputs for `topic`, partitioned as the
    /// producer does ([`crate::Partitioner::KeyHash`]), except that the
    /// keyless records of one commit all go to one partition (the next one
    /// for each commit). Problems with it (an unknown topic, a partition
    /// out of range, a size or TTL) are reported by [`Transaction::commit`].
    pub fn send(&mut self, topic: impl Into<String>, record: Record) {
        self.outputs.push(Output {
            topic: topic.into(),
            partition: record.partition,
            key: record.key.clone(),
            has_ttl: record.ttl.is_some(),
            record: record.into_pb(),
        });
    }

    /// Marks `message` (delivered by this transaction's consumer) handled:
    /// the commit moves its partition's committed offset past it. Of
    /// several messages of one partition, the last counts.
    pub fn commit_input(&mut self, message: &Message) {
        let next = message.offset + 1;
        let entry = self.inputs.entry(message.partition).or_insert(next);
        *entry = (*entry).max(next);
    }

    /// Nothing added since the last commit.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty() && self.inputs.is_empty()
    }

    /// Writes the outputs and the input offsets in one etcd transaction and
    /// returns where each output was stored, in send order. Afterwards the
    /// transaction is empty, unless the outcome is unknown
    /// ([`Error::is_outcome_unknown`]): then it keeps everything, and
    /// calling `commit` again finds out whether it landed before writing.
    ///
    /// # Errors
    ///
    /// Nothing is written when it fails, unless the outcome is unknown.
    /// [`Error::InvalidConfig`] when the consumer auto-commits, or for a
    /// record with a TTL; [`Error::NotOwner`] when the member lost an input
    /// partition, or an input was not delivered under its current claim;
    /// [`Error::InputCommitted`] or [`Error::CommitBehind`] for an input
    /// below the committed offset; [`Error::TopicNotFound`],
    /// [`Error::TopicDeleted`], [`Error::InvalidTopicName`] or
    /// [`Error::PartitionOutOfRange`] for an output topic;
    /// [`Error::MessageTooLarge`] for a record over the topic's limit;
    /// [`Error::TransactionTooLarge`] over etcd's limits (128 compares or
    /// operations, 1.5 MiB) or 10,000 records in one partition;
    /// [`Error::Contended`] after 60 s of lost races on an output head;
    /// [`Error::Unavailable`], [`Error::Timeout`] or [`Error::Etcd`] when
    /// etcd does not answer for 10 s (outcome unknown).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the transaction written or not; the
    /// transaction then keeps its content, and the next `commit` finds out
    /// which, as after an unknown outcome.
    pub async fn commit(&mut self) -> Result<Vec<RecordMetadata>> {
        let result = self.try_commit().await;
        match &result {
            Err(e) if e.is_outcome_unknown() => {}
            _ => {
                self.outputs.clear();
                self.inputs.clear();
                self.uncertain.clear();
            }
        }
        result
    }

    async fn try_commit(&mut self) -> Result<Vec<RecordMetadata>> {
        if self.auto_commit != AutoCommit::Disabled {
            return Err(Error::InvalidConfig(format!(
                "exactly-once transactions need AutoCommit::Disabled; this consumer uses {:?}, \
                 which commits offsets outside the transactions",
                self.auto_commit
            )));
        }
        if self.outputs.iter().any(|o| o.has_ttl) {
            return Err(Error::InvalidConfig(
                "records with a TTL cannot be sent in a transaction (it attaches no lease)".into(),
            ));
        }
        self.read_missing_topics().await?;
        let mut plan = self.plan()?;
        // An earlier call's outcome first: if it landed, its offsets are
        // committed and the fences below no longer describe it.
        let mut unknown_since = (!self.uncertain.is_empty()).then(Instant::now);
        if let Some(placed) = self.refresh_known(&plan, unknown_since).await? {
            return Ok(self.landed(&plan, placed));
        }
        let claims = self.committer.input_claims(&self.inputs)?;
        let started = Instant::now();
        loop {
            if let Some(placed) = self.refresh_known(&plan, unknown_since).await? {
                return Ok(self.landed(&plan, placed));
            }
            let (txn, attempt, new_heads) = self.build(&claims, &plan)?;
            let sent = self
                .client
                .timed("commit transaction", self.client.kv.clone().txn(txn))
                .await;
            match sent {
                Ok(response) if response.succeeded() => {
                    let revision = response.header().map_or(0, |h| h.revision());
                    for (key, stored) in new_heads {
                        self.heads.insert(
                            key,
                            Head {
                                stored,
                                mod_revision: revision,
                            },
                        );
                    }
                    return Ok(self.landed(&plan, attempt.placed));
                }
                Ok(response) => match self.refused(&response, &claims, &plan)? {
                    Refused::Landed(bases) => return Ok(self.landed(&plan, bases)),
                    Refused::Moved => {
                        if started.elapsed() >= CONTENDED_AFTER {
                            let first = plan.batches.first();
                            return Err(Error::Contended {
                                topic: first.map_or_else(String::new, |b| b.topic.clone()),
                                partition: first.map_or(0, |b| b.partition),
                                waited: started.elapsed(),
                            });
                        }
                        plan = self.plan()?;
                    }
                },
                Err(e) if e.is_outcome_unknown() => {
                    if !plan.batches.is_empty() {
                        self.uncertain.push(attempt);
                    }
                    for batch in &plan.batches {
                        self.heads.remove(&(batch.topic.clone(), batch.partition));
                    }
                    let since = *unknown_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNAVAILABLE_AFTER || self.uncertain.len() >= MAX_UNCERTAIN
                    {
                        return Err(Error::Unavailable {
                            op: "commit transaction",
                            waited: since.elapsed(),
                            detail: e.to_string(),
                        });
                    }
                    tracing::debug!(error = %e, "transaction outcome unknown, checking");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Transaction::refresh`], retried while its outcome is unknown and
    /// attempts are uncertain, for up to 10 s from `unknown_since`: never
    /// send again before knowing whether an attempt landed.
    async fn refresh_known(
        &mut self,
        plan: &Plan,
        unknown_since: Option<Instant>,
    ) -> Result<Option<Vec<RecordMetadata>>> {
        loop {
            match self.refresh(plan).await {
                Err(e)
                    if e.is_outcome_unknown()
                        && !self.uncertain.is_empty()
                        && unknown_since
                            .is_some_and(|since| since.elapsed() < UNAVAILABLE_AFTER) =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// The commit landed, placing the outputs so: records its offsets and
    /// moves on to the next sequence number.
    fn landed(&mut self, plan: &Plan, placed: Vec<RecordMetadata>) -> Vec<RecordMetadata> {
        self.committer
            .recorded(self.inputs.iter().map(|(p, offset)| (*p, *offset)));
        self.seq += 1;
        self.keyless = self.keyless.wrapping_add(1);
        if !self.uncertain.is_empty() {
            // Landed unseen: the heads cached are older than our own write.
            for batch in &plan.batches {
                self.heads.remove(&(batch.topic.clone(), batch.partition));
            }
        }
        placed
    }
}
