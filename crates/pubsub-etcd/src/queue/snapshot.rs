//! What a worker or an operator reads of a queue: every partition's
//! state and head and every worker's settled operations, checked as read,
//! and the compare-and-swap that writes one partition's state.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::state::{Settled, State};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::QueueKey;
use crate::partition::{Head, Partition};
use crate::topic::TopicInfo;

/// Largest queue state written, below etcd's 1.5 MiB request limit.
/// How long a lease or flush keeps retrying a CAS that other workers win
/// before it gives up (a flush then fails the acks it carried).
pub(super) const CAS_PATIENCE: Duration = Duration::from_secs(10);
/// Longest pause between two CAS attempts on one partition.
const CAS_BACKOFF: Duration = Duration::from_millis(20);
pub(super) const MAX_STATE_BYTES: usize = 1024 * 1024;
/// Partition heads read per transaction; the first one also reads the
/// queue's states, within etcd's 128 operations per transaction.
pub(super) const HEADS_PER_TXN: usize = 127;

/// A partition's queue state and the `mod_revision` it was read at (0: no
/// key yet).
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub(super) revision: i64,
    pub(super) state: State,
}

/// The value of one worker's settled key: per partition, the settle
/// operations it made that the partition's state may not reflect yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Settlement {
    pub(super) inc: i64,
    /// When the worker last wrote it: a key unchanged for long whose
    /// operations every state reflects belongs to a worker that is gone.
    #[serde(default)]
    pub(super) written_ms: i64,
    #[serde(default)]
    pub(super) partitions: BTreeMap<u32, Settled>,
}

/// One worker's settled key as read.
#[derive(Debug, Clone)]
pub(super) struct WorkerOps {
    pub(super) worker: String,
    pub(super) key: String,
    pub(super) revision: i64,
    pub(super) settlement: Settlement,
}

/// Every partition's queue state and head, and every worker's settled
/// operations, read in one transaction (one per [`HEADS_PER_TXN`]
/// partitions beyond the first).
pub(super) struct Snapshot {
    pub(super) revision: i64,
    pub(super) heads: Vec<u64>,
    pub(super) slots: Vec<Slot>,
    pub(super) workers: Vec<WorkerOps>,
    /// Workers running now (their presence keys).
    pub(super) live: usize,
}

impl Snapshot {
    /// The state of `partition` with every worker's settled operations
    /// applied: what the queue holds now.
    pub(super) fn effective(&self, partition: u32) -> State {
        let mut state = self.slots[partition as usize].state.clone();
        for w in &self.workers {
            if let Some(settled) = w.settlement.partitions.get(&partition) {
                settled.apply_to(&w.worker, &mut state);
            }
        }
        state
    }

    /// The settled operations of every worker on `partition`.
    pub(super) fn settled(&self, partition: u32) -> Vec<(String, Settled)> {
        self.workers
            .iter()
            .filter_map(|w| {
                let s = w.settlement.partitions.get(&partition)?;
                Some((w.worker.clone(), s.clone()))
            })
            .collect()
    }
}

pub(super) fn corrupt(key: &[u8], reason: String) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    }
}

/// Decodes and checks one stored state. A state of another incarnation of
/// the topic is stale: the queue starts over on this one.
pub(super) fn parse_state(
    key: &[u8],
    value: &[u8],
    incarnation: i64,
    head: Option<u64>,
) -> Result<State> {
    let state: State = serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))?;
    if state.inc != incarnation {
        return Ok(State::fresh(incarnation, 0));
    }
    state.validate(head).map_err(|r| corrupt(key, r))?;
    Ok(state)
}

pub(super) fn slot_of(
    kv: Option<&etcd_client::KeyValue>,
    incarnation: i64,
    head: Option<u64>,
) -> Result<Slot> {
    match kv {
        Some(kv) => Ok(Slot {
            revision: kv.mod_revision(),
            state: parse_state(kv.key(), kv.value(), incarnation, head)?,
        }),
        None => Ok(Slot {
            revision: 0,
            state: State::fresh(incarnation, 0),
        }),
    }
}

pub(super) fn parse_settlement(
    kv: &etcd_client::KeyValue,
    info: &TopicInfo,
) -> Result<Option<Settlement>> {
    let settlement: Settlement =
        serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv.key(), e.to_string()))?;
    if settlement.inc != info.incarnation {
        return Ok(None);
    }
    for (partition, settled) in &settlement.partitions {
        settled
            .validate()
            .map_err(|r| corrupt(kv.key(), format!("partition {partition}: {r}")))?;
    }
    Ok(Some(settlement))
}

pub(super) async fn read_snapshot(
    client: &Client,
    info: &TopicInfo,
    name: &str,
) -> Result<Snapshot> {
    let prefix = client.keys.queue_prefix(&info.name, name);
    let partitions: Vec<u32> = (0..info.partitions).collect();
    let mut heads = Vec::with_capacity(partitions.len());
    let mut stored: Vec<Option<etcd_client::KeyValue>> = vec![None; partitions.len()];
    let mut workers = Vec::new();
    let mut live = 0;
    let mut revision = 0;
    for (i, chunk) in partitions.chunks(HEADS_PER_TXN).enumerate() {
        let mut ops = Vec::with_capacity(chunk.len() + 1);
        if i == 0 {
            ops.push(TxnOp::get(
                prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            ));
        }
        ops.extend(
            Partition::each(info, chunk.iter().copied())
                .map(|p| TxnOp::get(client.keys.head(&p), None)),
        );
        let response = client
            .read_txn("read queue state", Txn::new().and_then(ops))
            .await?;
        let mut responses = response.op_responses().into_iter();
        if i == 0 {
            revision = response.header().map_or(0, |h| h.revision());
            if let Some(TxnOpResponse::Get(get)) = responses.next() {
                for kv in get.kvs() {
                    match client.keys.queue_key(&info.name, name, kv.key()) {
                        // A partition beyond the count this worker knows
                        // belongs to a topic that grew since; not its own.
                        Some(QueueKey::Partition(p)) => {
                            if let Some(slot) = stored.get_mut(p as usize) {
                                *slot = Some(kv.clone());
                            }
                        }
                        Some(QueueKey::Settled(worker)) => {
                            if let Some(settlement) = parse_settlement(kv, info)? {
                                workers.push(WorkerOps {
                                    worker: worker.to_string(),
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    revision: kv.mod_revision(),
                                    settlement,
                                });
                            }
                        }
                        Some(QueueKey::Live(_)) => live += 1,
                        None => {
                            return Err(corrupt(kv.key(), "not a queue key".into()));
                        }
                    }
                }
            }
        }
        for op in responses {
            let next = match op {
                TxnOpResponse::Get(get) => Head::decode(get.kvs().first())?.next_offset,
                _ => 0,
            };
            heads.push(next);
        }
    }
    let slots = stored
        .iter()
        .zip(&heads)
        .map(|(kv, &head)| slot_of(kv.as_ref(), info.incarnation, Some(head)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Snapshot {
        revision,
        heads,
        slots,
        workers,
        live,
    })
}

/// The lowest low watermark of every queue of `topic` on `partition`:
/// retention keeps every offset from it on, which some queue has not
/// settled yet. None when the topic has no queue. One range read of the
/// topic's queue keys; a queue without state for the partition holds all of
/// it (it starts from the earliest stored message).
pub(crate) async fn retention_floor(
    client: &Client,
    topic: &str,
    incarnation: i64,
    partition: u32,
) -> Result<Option<u64>> {
    let prefix = client.keys.topic_queues_prefix(topic);
    let response = client
        .read(
            "read queue states",
            prefix,
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut states: BTreeMap<String, State> = BTreeMap::new();
    let mut settled: Vec<(String, String, Settled)> = Vec::new();
    for kv in response.kvs() {
        let Some(queue) = client.keys.queue_of(topic, kv.key()) else {
            return Err(corrupt(kv.key(), "not a queue key".into()));
        };
        let fresh = State::fresh(incarnation, 0);
        let state = states.entry(queue.to_string()).or_insert(fresh);
        match client.keys.queue_key(topic, queue, kv.key()) {
            Some(QueueKey::Partition(p)) if p == partition => {
                *state = parse_state(kv.key(), kv.value(), incarnation, None)?;
            }
            Some(QueueKey::Partition(_) | QueueKey::Live(_)) => {}
            Some(QueueKey::Settled(worker)) => {
                let settlement: Settlement = serde_json::from_slice(kv.value())
                    .map_err(|e| corrupt(kv.key(), e.to_string()))?;
                if settlement.inc != incarnation {
                    continue;
                }
                if let Some(s) = settlement.partitions.get(&partition) {
                    s.validate().map_err(|r| corrupt(kv.key(), r))?;
                    settled.push((queue.to_string(), worker.to_string(), s.clone()));
                }
            }
            None => return Err(corrupt(kv.key(), "not a queue key".into())),
        }
    }
    for (queue, worker, s) in &settled {
        if let Some(state) = states.get_mut(queue) {
            s.apply_to(worker, state);
        }
    }
    Ok(states.values().map(State::low_watermark).min())
}

/// The outcome of a compare-and-swap of one partition's state.
pub(super) enum Cas {
    /// Written at this revision (the key's new `mod_revision`).
    Written(i64),
    /// Another worker changed it first: what it holds now.
    Lost(Slot),
}

/// Writes `state` if the key is still at `revision`; else returns what the
/// key holds, read by the same transaction.
pub(super) async fn cas(
    client: &Client,
    info: &TopicInfo,
    key: &str,
    revision: i64,
    state: &State,
) -> Result<Cas> {
    let value = serde_json::to_vec(state).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    if value.len() > MAX_STATE_BYTES {
        return Err(Error::QueueStateTooLarge {
            key: key.to_string(),
            bytes: value.len(),
            limit: MAX_STATE_BYTES,
        });
    }
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
        .and_then([TxnOp::put(key, value, None)])
        .or_else([TxnOp::get(key, None)]);
    let response = client
        .timed("write queue state", client.kv.clone().txn(txn))
        .await?;
    if response.succeeded() {
        return Ok(Cas::Written(response.header().map_or(0, |h| h.revision())));
    }
    let kv = match response.op_responses().into_iter().next() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    };
    Ok(Cas::Lost(slot_of(kv.as_ref(), info.incarnation, None)?))
}

/// A random pause after the `lost`-th lost CAS in a row, growing up to
/// [`CAS_BACKOFF`], so workers writing one partition's state at once spread
/// out instead of colliding again in lockstep.
pub(super) async fn backoff(lost: u32) {
    // The first retry goes at once: the lost CAS returned the current
    // state, so it is usually the one that wins.
    if lost <= 1 {
        return;
    }
    let cap = CAS_BACKOFF.as_micros() as u64;
    let ceiling = (100u64 << lost.min(10)).min(cap);
    let pause = rand::random::<u64>() % ceiling.max(1);
    tokio::time::sleep(Duration::from_micros(pause)).await;
}
