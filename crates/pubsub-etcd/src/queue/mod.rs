//! Queue mode: any number of workers share a topic's messages with
//! per-message acknowledgement, redelivery after `ack_wait`, delivery limits
//! and dead-letter topics. At-least-once, unordered. The protocols are in
//! DESIGN.md ("Queue mode"); the state transitions are in [`state`].

mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::keys::QueueKey;
use crate::partition::Partition;
use crate::record::{self, now_millis, pb, Message, Record};
use crate::topic::{topic_arc, validate_group_name, TopicInfo};
use crate::Producer;
use state::{Op, Settled, State, MAX_RANGES, MAX_REASON};

/// Largest queue state written, below etcd's 1.5 MiB request limit.
const MAX_STATE_BYTES: usize = 1024 * 1024;
/// Settle operations buffered before a flush regardless of the interval.
const FLUSH_OPS: usize = 1024;
/// How long a lease or flush keeps retrying a CAS that other workers win
/// before it gives up (a flush then fails the acks it carried).
const CAS_PATIENCE: Duration = Duration::from_secs(10);
/// Longest pause between two CAS attempts on one partition.
const CAS_BACKOFF: Duration = Duration::from_millis(20);
/// Smallest lease a worker takes before it has measured its rate.
const MIN_LEASE: u64 = 8;
/// How often a worker samples how fast it finishes jobs.
const RATE_WINDOW: Duration = Duration::from_millis(200);
/// Attempts to store a worker's settled key while etcd does not answer.
const STORE_ATTEMPTS: u32 = 5;
/// How long a settled key every state reflects stays unchanged before
/// another worker deletes it as left behind by a worker that is gone.
const STALE_SETTLED: Duration = Duration::from_secs(60);
/// Pause after a failed lease round or a broken watch before trying again.
const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// How soon a worker whose job buffer has no room for a lease looks again.
const FULL_PAUSE: Duration = Duration::from_millis(2);
/// Partition heads read per transaction; the first one also reads the
/// queue's states, within etcd's 128 operations per transaction.
const HEADS_PER_TXN: usize = 127;

/// Configures a [`QueueConsumer`]; see [`Client::queue`].
#[derive(Debug, Clone)]
pub struct QueueConsumerBuilder {
    client: Client,
    topic: String,
    name: String,
    ack_wait: Duration,
    max_deliveries: u32,
    dead_letter: Option<String>,
    max_batch: u64,
    flush_interval: Duration,
}

/// Queue counters, from [`Client::queue_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Offsets that wait for (re)delivery, including never delivered ones.
    pub pending: u64,
    /// Offsets leased to a worker now.
    pub in_flight: u64,
    /// Deliveries made again, after a nack or an expired lease.
    pub redelivered: u64,
    /// Offsets whose lease expired before they were settled: the only
    /// deliveries a worker may have processed that come back (duplicates).
    pub expired: u64,
    pub dead_lettered: u64,
    pub terminated: u64,
    /// Timestamp (ms) of the oldest unsettled message, if any.
    pub oldest_unsettled_ms: Option<i64>,
}

/// Where [`Client::reset_queue`] puts a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueReset {
    /// Forget every lease and settlement: the earliest stored message is
    /// delivered next.
    Earliest,
    /// Settle everything stored now: only messages appended later are
    /// delivered.
    Latest,
}

impl Client {
    /// Starts configuring a worker of queue `name` on `topic`.
    pub fn queue(&self, topic: &str, name: &str) -> QueueConsumerBuilder {
        QueueConsumerBuilder {
            client: self.clone(),
            topic: topic.to_string(),
            name: name.to_string(),
            ack_wait: Duration::from_secs(30),
            max_deliveries: 5,
            dead_letter: None,
            max_batch: 256,
            flush_interval: Duration::from_millis(10),
        }
    }

    /// Pending, in-flight, redelivered and dead-lettered counts of a queue,
    /// from one read of its state and the partition heads.
    pub async fn queue_stats(&self, topic: &str, name: &str) -> Result<QueueStats> {
        validate_group_name(name)?;
        let info = self.topic(topic).await?;
        let snapshot = read_snapshot(self, &info, name).await?;
        let now = now_millis();
        let topic = topic_arc(topic);
        let mut stats = QueueStats::default();
        for (partition, head) in snapshot.heads.iter().enumerate() {
            let mut state = snapshot.effective(partition as u32);
            state.expire(now);
            stats.pending += state.pending_count() + head.saturating_sub(state.next);
            stats.in_flight += state.in_flight();
            stats.redelivered = stats.redelivered.saturating_add(state.redelivered);
            stats.expired = stats.expired.saturating_add(state.expired);
            stats.dead_lettered = stats.dead_lettered.saturating_add(state.dead_lettered);
            stats.terminated = stats.terminated.saturating_add(state.terminated);
            let low = state.low_watermark();
            if low < *head {
                let part = Partition::new(topic.clone(), info.incarnation, partition as u32);
                let page = fetch_partition(self, &part, low, 1, Cut::Exact).await?;
                if let Some(m) = page.messages.first() {
                    let oldest = stats.oldest_unsettled_ms.get_or_insert(m.timestamp);
                    *oldest = (*oldest).min(m.timestamp);
                }
            }
        }
        Ok(stats)
    }

    /// The queues that have state on `topic`, in name order.
    pub async fn list_queues(&self, topic: &str) -> Result<Vec<String>> {
        let prefix = self.keys.topic_queues_prefix(topic);
        let response = self
            .read(
                "list queues",
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let names: BTreeSet<String> = response
            .kvs()
            .iter()
            .filter_map(|kv| self.keys.queue_of(topic, kv.key()))
            .map(str::to_string)
            .collect();
        Ok(names.into_iter().collect())
    }

    /// Deletes a queue's state: a worker joining later starts from the
    /// earliest stored message.
    pub async fn delete_queue(&self, topic: &str, name: &str) -> Result<()> {
        validate_group_name(name)?;
        let prefix = self.keys.queue_prefix(topic, name);
        self.timed(
            "delete queue",
            self.kv.clone().delete(
                prefix.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        Ok(())
    }

    /// Moves a queue to `to`, dropping its leases, pending redeliveries and
    /// counters. Workers still running keep the jobs they hold; their acks
    /// and nacks then change nothing, so stop them first.
    pub async fn reset_queue(&self, topic: &str, name: &str, to: QueueReset) -> Result<()> {
        validate_group_name(name)?;
        let info = self.topic(topic).await?;
        if to == QueueReset::Earliest {
            return self.delete_queue(topic, name).await;
        }
        let heads = self
            .next_offsets(&info, &(0..info.partitions).collect::<Vec<_>>())
            .await?;
        self.timed(
            "reset queue",
            self.kv.clone().delete(
                self.keys.queue_settled_prefix(topic, name),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        for (partition, head) in heads {
            let key = self.keys.queue_partition(topic, name, partition);
            let state = State::fresh(info.incarnation, head);
            let value =
                serde_json::to_vec(&state).map_err(|e| Error::InvalidConfig(e.to_string()))?;
            self.timed("reset queue", self.kv.clone().put(key, value, None))
                .await?;
        }
        Ok(())
    }
}

impl QueueConsumerBuilder {
    /// How long a delivery is leased before it is redelivered; default 30 s.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Deliveries before a message is dead-lettered; default 5.
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// Topic that takes messages past `max_deliveries`; default none (they
    /// are settled and counted as dead-lettered).
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = Some(topic.into());
        self
    }

    /// Most offsets one lease takes; default 256.
    pub fn max_batch(mut self, n: u64) -> Self {
        self.max_batch = n;
        self
    }

    /// How long settle operations are coalesced; default 10 ms.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Joins the queue and starts leasing work.
    pub async fn join(self) -> Result<QueueConsumer> {
        validate_group_name(&self.name)?;
        if self.max_batch == 0 || self.max_batch > 10_000 {
            return Err(Error::InvalidConfig(format!(
                "queue max_batch {} must be between 1 and 10000",
                self.max_batch
            )));
        }
        if self.max_deliveries == 0
            || self.max_deliveries == u32::MAX
            || self.ack_wait.is_zero()
            || self.flush_interval.is_zero()
        {
            return Err(Error::InvalidConfig(
                "queue max_deliveries (below u32::MAX), ack_wait and flush_interval must be above zero"
                    .into(),
            ));
        }
        let info = self.client.topic(&self.topic).await?;
        let dead_letter = match &self.dead_letter {
            Some(t) => Some(self.client.producer(t).build().await?),
            None => None,
        };
        static WORKERS: AtomicU64 = AtomicU64::new(0);
        // Unique across restarts too (a pid comes back): a worker's lease
        // ids restart at 1 and must not match a predecessor's leases.
        let host: String = gethostname::gethostname()
            .to_string_lossy()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let worker = format!(
            "{host}-{}-{}-{:08x}",
            std::process::id(),
            WORKERS.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let capacity = (2 * self.max_batch) as usize;
        let (jobs_tx, jobs) = mpsc::channel(capacity);
        let (ops_tx, ops_rx) = mpsc::channel(FLUSH_OPS * 4);
        let (stop_tx, stop_rx) = oneshot::channel();
        let worker_task = Worker {
            client: self.client.clone(),
            topic: topic_arc(&self.topic),
            info,
            name: self.name.clone(),
            worker,
            config: self.clone(),
            dead_letter,
            jobs: jobs_tx,
            ops: ops_tx.clone(),
            buffered: Vec::new(),
            next_lease: 0,
            load: Arc::default(),
            rate: 0.0,
            sampled: (Instant::now(), 0),
            last_lease: MIN_LEASE,
            next_partition: rand::random::<u32>(),
            skip: HashMap::new(),
            unmerged: BTreeMap::new(),
            rewrite: false,
        };
        let task = tokio::spawn(worker_task.run(ops_rx, stop_rx));
        Ok(QueueConsumer {
            jobs,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// A worker of a queue: yields [`Job`]s until closed.
#[derive(Debug)]
pub struct QueueConsumer {
    jobs: mpsc::Receiver<Result<Job>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl QueueConsumer {
    /// The next job whose lease has not expired, or an error that stops
    /// this worker from leasing (a corrupt queue state, a deleted topic,
    /// a failed dead-letter append...; the worker keeps trying, the caller
    /// decides whether to close). Transient etcd errors are retried, not
    /// returned. None once closed.
    pub async fn recv(&mut self) -> Option<Result<Job>> {
        while let Some(item) = self.jobs.recv().await {
            match item {
                Ok(job) if job.deadline <= Instant::now() => continue,
                other => return Some(other),
            }
        }
        None
    }

    /// The jobs as a stream.
    pub fn stream(self) -> impl futures::Stream<Item = Result<Job>> {
        futures::stream::unfold(self, |mut q| async move { q.recv().await.map(|j| (j, q)) })
    }

    /// Stops leasing, releases the jobs leased but not received yet, flushes
    /// settled jobs and waits until that is in etcd. Jobs received and still
    /// unsettled are redelivered after their lease expires.
    pub async fn close(mut self) {
        // Jobs leased but never handed out are released at once instead
        // of waiting out ack_wait.
        self.jobs.close();
        while let Ok(item) = self.jobs.try_recv() {
            if let Ok(job) = item {
                let cmd = Cmd {
                    partition: job.message.partition,
                    op: Op::Release {
                        offset: job.message.offset,
                        lease: job.lease,
                    },
                    done: None,
                };
                let _ = job.ops.try_send(cmd);
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
/// One delivery of one message, leased to this worker until `ack_wait`.
#[derive(Debug)]
pub struct Job {
    pub message: Message,
    /// 1 for the first delivery.
    pub delivery_count: u32,
    lease: u64,
    deadline: Instant,
    ack_wait: Duration,
    ops: mpsc::Sender<Cmd>,
    load: Arc<Load>,
}

/// Jobs a worker handed out and has not seen dropped yet, and how many it
/// has seen dropped in all (settled, or given up when their lease ended).
#[derive(Debug, Default)]
struct Load {
    outstanding: AtomicU64,
    finished: AtomicU64,
}

impl Drop for Job {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.load.finished.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Cmd {
    partition: u32,
    op: Op,
    done: Option<oneshot::Sender<Result<()>>>,
}

impl Job {
    async fn send(&self, op: Op) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd {
            partition: self.message.partition,
            op,
            done: Some(tx),
        };
        self.ops
            .send(cmd)
            .await
            .map_err(|_| Error::ConsumerClosed)?;
        rx.await.map_err(|_| Error::ConsumerClosed)?
    }

    /// Settles the message; returns once that is stored in etcd.
    pub async fn ack(self) -> Result<()> {
        self.send(Op::Ack(self.message.offset)).await
    }

    /// Settles the message without processing it.
    pub async fn term(self) -> Result<()> {
        self.send(Op::Term(self.message.offset)).await
    }

    /// Makes the message deliverable again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.nack_with_reason(delay, "").await
    }

    /// [`Job::nack`] with a reason the dead-letter topic's header carries.
    pub async fn nack_with_reason(self, delay: Duration, reason: &str) -> Result<()> {
        let mut reason = reason.to_string();
        state::truncate(&mut reason, MAX_REASON);
        let op = Op::Nack {
            offset: self.message.offset,
            lease: self.lease,
            not_before_ms: now_millis().saturating_add(delay.as_millis() as i64),
            reason,
        };
        self.send(op).await
    }

    /// Extends this job's lease (and its batch's) by `ack_wait` from now.
    pub async fn in_progress(&mut self) -> Result<()> {
        let op = Op::Extend {
            lease: self.lease,
            deadline_ms: now_millis() + self.ack_wait.as_millis() as i64,
        };
        self.send(op).await?;
        self.deadline = Instant::now() + self.ack_wait;
        Ok(())
    }
}

/// A partition's queue state and the `mod_revision` it was read at (0: no
/// key yet).
#[derive(Debug, Clone)]
struct Slot {
    revision: i64,
    state: State,
}

/// The value of one worker's settled key: per partition, the settle
/// operations it made that the partition's state may not reflect yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Settlement {
    inc: i64,
    /// When the worker last wrote it: a key unchanged for long whose
    /// operations every state reflects belongs to a worker that is gone.
    #[serde(default)]
    written_ms: i64,
    #[serde(default)]
    partitions: BTreeMap<u32, Settled>,
}

/// One worker's settled key as read.
#[derive(Debug, Clone)]
struct WorkerOps {
    worker: String,
    key: String,
    revision: i64,
    settlement: Settlement,
}

/// Every partition's queue state and head, and every worker's settled
/// operations, read in one transaction (one per [`HEADS_PER_TXN`]
/// partitions beyond the first).
struct Snapshot {
    revision: i64,
    heads: Vec<u64>,
    slots: Vec<Slot>,
    workers: Vec<WorkerOps>,
}

impl Snapshot {
    /// The state of `partition` with every worker's settled operations
    /// applied: what the queue holds now.
    fn effective(&self, partition: u32) -> State {
        let mut state = self.slots[partition as usize].state.clone();
        for w in &self.workers {
            if let Some(settled) = w.settlement.partitions.get(&partition) {
                settled.apply_to(&w.worker, &mut state);
            }
        }
        state
    }

    /// The settled operations of every worker on `partition`.
    fn settled(&self, partition: u32) -> Vec<(String, Settled)> {
        self.workers
            .iter()
            .filter_map(|w| {
                let s = w.settlement.partitions.get(&partition)?;
                Some((w.worker.clone(), s.clone()))
            })
            .collect()
    }
}

fn corrupt(key: &[u8], reason: String) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    }
}

/// Decodes and checks one stored state. A state of another incarnation of
/// the topic is stale: the queue starts over on this one.
fn parse_state(key: &[u8], value: &[u8], incarnation: i64, head: Option<u64>) -> Result<State> {
    let state: State = serde_json::from_slice(value).map_err(|e| corrupt(key, e.to_string()))?;
    if state.inc != incarnation {
        return Ok(State::fresh(incarnation, 0));
    }
    state.validate(head).map_err(|r| corrupt(key, r))?;
    Ok(state)
}

fn slot_of(
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

fn parse_settlement(kv: &etcd_client::KeyValue, info: &TopicInfo) -> Result<Option<Settlement>> {
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

async fn read_snapshot(client: &Client, info: &TopicInfo, name: &str) -> Result<Snapshot> {
    let prefix = client.keys.queue_prefix(&info.name, name);
    let partitions: Vec<u32> = (0..info.partitions).collect();
    let mut heads = Vec::with_capacity(partitions.len());
    let mut stored: Vec<Option<etcd_client::KeyValue>> = vec![None; partitions.len()];
    let mut workers = Vec::new();
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
                        None => {
                            return Err(corrupt(kv.key(), "not a queue key".into()));
                        }
                    }
                }
            }
        }
        for op in responses {
            let next = match op {
                TxnOpResponse::Get(get) => match get.kvs().first() {
                    Some(kv) => {
                        let head: pb::PartitionHead =
                            record::decode(kv.key(), Bytes::copy_from_slice(kv.value()))?;
                        head.next_offset
                    }
                    None => 0,
                },
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
            Some(QueueKey::Partition(_)) => {}
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
enum Cas {
    Written,
    /// Another worker changed it first: what it holds now.
    Lost(Slot),
}

/// Writes `state` if the key is still at `revision`; else returns what the
/// key holds, read by the same transaction.
async fn cas(
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
        return Ok(Cas::Written);
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
async fn backoff(lost: u32) {
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

/// What wakes the worker for its next lease round.
type Wake = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What one lease round found.
enum Round {
    Leased,
    /// No partition had work at `revision`; the earliest lease deadline or
    /// nack delay (ms) is when some may come without any write.
    Idle {
        revision: i64,
        due_ms: Option<i64>,
    },
}

/// Returns once a message is appended to the topic or a partition's queue
/// state is deleted (`queue delete`, `queue reset`) after `revision`, or
/// after [`ERROR_PAUSE`] once a watch fails. Other queue writes do not wake
/// it: a lease takes work and settling frees none for others (a nack's
/// redelivery is due at a time, which the caller waits for, and the nacking
/// worker looks again itself), so idle workers stay idle while busy ones
/// lease and ack.
async fn changed_after(client: Client, topic: String, queue: String, revision: i64) {
    let prefixes = [
        client.keys.topic_data_prefix(&topic),
        client.keys.queue_prefix(&topic, &queue),
    ];
    let mut streams = Vec::with_capacity(prefixes.len());
    for prefix in prefixes {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        match client
            .timed(
                "watch queue",
                client.watch.clone().watch(prefix, Some(options)),
            )
            .await
        {
            Ok(stream) => streams.push(stream),
            Err(error) => {
                tracing::debug!(%error, "watching for queue work failed");
                tokio::time::sleep(ERROR_PAUSE).await;
                return;
            }
        }
    }
    let data = client.keys.topic_data_prefix(&topic);
    let wakes = |event: &etcd_client::Event| {
        let Some(kv) = event.kv() else { return false };
        kv.key().starts_with(data.as_bytes())
            || (event.event_type() == EventType::Delete
                && matches!(
                    client.keys.queue_key(&topic, &queue, kv.key()),
                    Some(QueueKey::Partition(_))
                ))
    };
    let first_event = |mut stream: WatchStream| async move {
        loop {
            match stream.message().await {
                Ok(Some(response)) if response.canceled() => break,
                Ok(Some(response)) => {
                    if response.events().iter().any(wakes) {
                        return;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        tokio::time::sleep(ERROR_PAUSE).await;
    };
    let mut streams = streams.into_iter();
    let (Some(a), Some(b)) = (streams.next(), streams.next()) else {
        return;
    };
    tokio::select! {
        _ = first_event(a) => {}
        _ = first_event(b) => {}
    }
}

/// Leased or found nothing to lease on one partition.
enum Leased {
    Took,
    Nothing { due_ms: Option<i64> },
}

struct Worker {
    client: Client,
    topic: Arc<str>,
    info: TopicInfo,
    name: String,
    worker: String,
    config: QueueConsumerBuilder,
    dead_letter: Option<Producer>,
    jobs: mpsc::Sender<Result<Job>>,
    ops: mpsc::Sender<Cmd>,
    buffered: Vec<Cmd>,
    next_lease: u64,
    next_partition: u32,
    /// Per partition, an offset below which no message is stored any more.
    skip: HashMap<u32, u64>,
    /// This worker's settle operations stored in its settled key that some
    /// partition state may not reflect yet.
    unmerged: BTreeMap<u32, Settled>,
    /// `unmerged` shrank since it was last stored.
    rewrite: bool,
    load: Arc<Load>,
    /// Jobs this worker finishes per second while it has some, smoothed.
    rate: f64,
    /// When `rate` was last sampled, and `load.finished` then.
    sampled: (Instant, u64),
    /// The lease size `lease_size` last allowed.
    last_lease: u64,
}

impl Worker {
    fn settled_key(&self) -> String {
        self.client
            .keys
            .queue_settled(&self.info.name, &self.name, &self.worker)
    }

    async fn run(mut self, mut ops: mpsc::Receiver<Cmd>, mut stop: oneshot::Receiver<()>) {
        let mut flush = tokio::time::interval(self.config.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wake: Wake = Box::pin(std::future::ready(()));
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some(cmd) = ops.recv() => {
                    self.buffered.push(cmd);
                    if self.buffered.len() >= FLUSH_OPS && self.flush().await {
                        wake = Box::pin(std::future::ready(()));
                    }
                }
                _ = flush.tick() => {
                    // A nack may make work due at once, and only this
                    // worker is woken by its own settled key.
                    if self.flush().await {
                        wake = Box::pin(std::future::ready(()));
                    }
                }
                _ = &mut wake => wake = self.round().await,
            }
        }
        ops.close();
        while let Ok(cmd) = ops.try_recv() {
            self.buffered.push(cmd);
        }
        self.flush().await;
        if !self.unmerged.is_empty() {
            if let Err(error) = self.merge_own().await {
                tracing::debug!(%error, queue = %self.name, "merging settled operations on close failed; other workers will");
            }
        }
        if let Some(producer) = self.dead_letter.take() {
            let _ = producer.close().await;
        }
    }

    /// Leases once if there is room for the jobs, and says what wakes the
    /// next round: at once after a lease; a change in etcd or the next due
    /// time when idle, so idle workers cost a watch, not polling reads.
    async fn round(&mut self) -> Wake {
        let size = self.lease_size();
        if size == 0 || self.jobs.capacity() < size as usize {
            return Box::pin(tokio::time::sleep(FULL_PAUSE));
        }
        match self.lease(size).await {
            Ok(Round::Leased) => Box::pin(std::future::ready(())),
            Ok(Round::Idle { revision, due_ms }) => {
                let changed = changed_after(
                    self.client.clone(),
                    self.info.name.clone(),
                    self.name.clone(),
                    revision,
                );
                let Some(due_ms) = due_ms else {
                    return Box::pin(changed);
                };
                let wait = Duration::from_millis(due_ms.saturating_sub(now_millis()).max(0) as u64);
                Box::pin(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changed => {}
                    }
                })
            }
            Err(error) => {
                tracing::warn!(%error, queue = %self.name, "queue lease failed");
                let transient =
                    error.is_outcome_unknown() || matches!(error, Error::Contended { .. });
                if !transient {
                    // Full means the caller has not taken the last ones
                    // yet; the next failing round reports it again.
                    let _ = self.jobs.try_send(Err(error));
                }
                Box::pin(tokio::time::sleep(ERROR_PAUSE))
            }
        }
    }

    /// How many offsets to lease now: what this worker finishes in a
    /// quarter of `ack_wait` at its measured rate (at least [`MIN_LEASE`], at most
    /// `max_batch`), less the jobs it holds. A worker never leases more than
    /// it can finish before the leases expire, and a new worker starts
    /// small, so many workers on one partition all get work.
    fn lease_size(&mut self) -> u64 {
        let finished = self.load.finished.load(Ordering::Relaxed);
        let outstanding = self.load.outstanding.load(Ordering::Relaxed);
        let (at, before) = self.sampled;
        let elapsed = at.elapsed();
        if elapsed >= RATE_WINDOW {
            if outstanding > 0 || finished > before {
                let sample = (finished - before) as f64 / elapsed.as_secs_f64();
                self.rate = if self.rate == 0.0 {
                    sample
                } else {
                    (self.rate + sample) / 2.0
                };
            }
            self.sampled = (Instant::now(), finished);
        }
        // A quarter of ack_wait, and at most twice the last lease: the rate
        // was measured before this lease adds to the load.
        let target = (self.rate * self.config.ack_wait.as_secs_f64() / 4.0) as u64;
        let size = target
            .min(self.last_lease.saturating_mul(2))
            .clamp(MIN_LEASE.min(self.config.max_batch), self.config.max_batch);
        self.last_lease = size;
        size.saturating_sub(outstanding)
    }

    /// Stores the buffered settle operations with the unmerged ones in this
    /// worker's settled key: one plain write per flush, whatever the number
    /// of partitions, that no other worker contends for. True when a nack
    /// was among them.
    async fn flush(&mut self) -> bool {
        if self.buffered.is_empty() && !self.rewrite {
            return false;
        }
        let cmds: Vec<Cmd> = self.buffered.drain(..).collect();
        let mut next = self.unmerged.clone();
        let mut nacked = false;
        for cmd in &cmds {
            nacked |= matches!(cmd.op, Op::Nack { .. });
            next.entry(cmd.partition).or_default().push(cmd.op.clone());
        }
        next.retain(|_, s| !s.is_empty());
        let result = self.store(&next).await;
        if result.is_ok() {
            self.unmerged = next;
            self.rewrite = false;
        }
        for cmd in cmds {
            if let Some(done) = cmd.done {
                let _ = done.send(result.clone());
            }
        }
        nacked && result.is_ok()
    }

    /// Writes (or, when empty, deletes) this worker's settled key. Both are
    /// idempotent, so a write whose outcome is unknown is simply repeated.
    async fn store(&self, partitions: &BTreeMap<u32, Settled>) -> Result<()> {
        let key = self.settled_key();
        let value = if partitions.is_empty() {
            None
        } else {
            let settlement = Settlement {
                inc: self.info.incarnation,
                written_ms: now_millis(),
                partitions: partitions.clone(),
            };
            let value =
                serde_json::to_vec(&settlement).map_err(|e| Error::InvalidConfig(e.to_string()))?;
            if value.len() > MAX_STATE_BYTES {
                return Err(Error::QueueStateTooLarge {
                    key,
                    bytes: value.len(),
                    limit: MAX_STATE_BYTES,
                });
            }
            Some(value)
        };
        let mut attempt = 0;
        loop {
            let result = match &value {
                Some(value) => self
                    .client
                    .timed(
                        "store settled jobs",
                        self.client.kv.clone().put(key.clone(), value.clone(), None),
                    )
                    .await
                    .map(drop),
                None => self
                    .client
                    .timed(
                        "store settled jobs",
                        self.client.kv.clone().delete(key.clone(), None),
                    )
                    .await
                    .map(drop),
            };
            match result {
                Err(e) if e.is_outcome_unknown() && attempt < STORE_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Drops from `unmerged` what the state of `partition` reflects.
    fn prune(&mut self, partition: u32, state: &State) {
        if let Some(settled) = self.unmerged.get_mut(&partition) {
            if settled.prune(&self.worker, state) {
                self.rewrite = true;
                if settled.is_empty() {
                    self.unmerged.remove(&partition);
                }
            }
        }
    }

    /// Writes this worker's unmerged operations into the partition states
    /// itself and deletes its settled key, so a closed worker leaves
    /// nothing behind.
    async fn merge_own(&mut self) -> Result<()> {
        let snapshot = read_snapshot(&self.client, &self.info, &self.name).await?;
        let partitions: Vec<u32> = self.unmerged.keys().copied().collect();
        for partition in partitions {
            let mut slot = snapshot.slots[partition as usize].clone();
            let settled = snapshot.settled(partition);
            let key = self
                .client
                .keys
                .queue_partition(&self.info.name, &self.name, partition);
            let started = Instant::now();
            let mut lost = 0;
            loop {
                let mut state = slot.state.clone();
                for (worker, s) in &settled {
                    s.apply_to(worker, &mut state);
                }
                if state == slot.state {
                    break;
                }
                match cas(&self.client, &self.info, &key, slot.revision, &state).await? {
                    Cas::Written => {
                        slot.state = state;
                        break;
                    }
                    Cas::Lost(current) => slot = current,
                }
                if started.elapsed() >= CAS_PATIENCE {
                    return Err(Error::Contended {
                        topic: self.info.name.clone(),
                        partition,
                        waited: started.elapsed(),
                    });
                }
                lost += 1;
                backoff(lost).await;
            }
            self.prune(partition, &slot.state);
        }
        self.flush().await;
        Ok(())
    }

    /// Deletes the settled keys of workers that are gone: unchanged for
    /// [`STALE_SETTLED`] and reflected in every partition state. Compared
    /// on their revision, so a worker that writes again keeps its key.
    async fn clean_stale(&self, snapshot: &Snapshot) {
        let now = now_millis();
        for w in &snapshot.workers {
            if w.worker == self.worker
                || now.saturating_sub(w.settlement.written_ms) < STALE_SETTLED.as_millis() as i64
            {
                continue;
            }
            let reflected = w.settlement.partitions.iter().all(|(&p, settled)| {
                snapshot.slots.get(p as usize).is_none_or(|slot| {
                    let mut settled = settled.clone();
                    settled.prune(&w.worker, &slot.state);
                    settled.is_empty()
                })
            });
            if !reflected {
                continue;
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    w.key.as_str(),
                    CompareOp::Equal,
                    w.revision,
                )])
                .and_then([TxnOp::delete(w.key.as_str(), None)]);
            if let Err(error) = self
                .client
                .timed("delete stale settled jobs", self.client.kv.clone().txn(txn))
                .await
            {
                tracing::debug!(%error, key = %w.key, "deleting a stale settled key failed");
            }
        }
    }

    /// Leases one range of some partition and hands out its jobs, from one
    /// read of every partition's state and head and every worker's settled
    /// operations.
    async fn lease(&mut self, size: u64) -> Result<Round> {
        let snapshot = read_snapshot(&self.client, &self.info, &self.name).await?;
        let partitions = self.info.partitions;
        for (p, slot) in snapshot.slots.iter().enumerate() {
            self.prune(p as u32, &slot.state);
        }
        self.clean_stale(&snapshot).await;
        self.next_partition = self.next_partition.wrapping_add(1);
        let mut due: Option<i64> = None;
        for i in 0..partitions {
            let partition = self.next_partition.wrapping_add(i) % partitions;
            let slot = snapshot.slots[partition as usize].clone();
            let head = snapshot.heads[partition as usize];
            let settled = snapshot.settled(partition);
            match self
                .lease_partition(partition, head, slot, &settled, size)
                .await?
            {
                Leased::Took => return Ok(Round::Leased),
                Leased::Nothing { due_ms } => {
                    due = due.into_iter().chain(due_ms).min();
                }
            }
        }
        Ok(Round::Idle {
            revision: snapshot.revision,
            due_ms: due,
        })
    }

    /// Takes a lease on `partition` by one CAS of its state, merging every
    /// worker's settled operations into it on the way. With nothing to
    /// lease it still writes the merge once if that changes the state, so
    /// settled keys shrink even on a queue that has run dry.
    async fn lease_partition(
        &mut self,
        partition: u32,
        head: u64,
        mut slot: Slot,
        settled: &[(String, Settled)],
        size: u64,
    ) -> Result<Leased> {
        let key = self
            .client
            .keys
            .queue_partition(&self.info.name, &self.name, partition);
        let ack_wait = self.config.ack_wait.as_millis() as i64;
        let started = Instant::now();
        let mut lost = 0;
        let (taken, id) = loop {
            let mut state = slot.state.clone();
            let mut merged = false;
            for (worker, s) in settled {
                merged |= s.apply_to(worker, &mut state);
            }
            let now = now_millis();
            if let Some(&skip) = self.skip.get(&partition) {
                if skip > state.next && state.next < head {
                    state.next = skip.min(head);
                }
            }
            let unexpired = state.clone();
            state.expire(now);
            self.next_lease += 1;
            let id = self.next_lease;
            let Some(taken) = state.take(
                &self.worker,
                id,
                head,
                size,
                self.config.max_deliveries,
                now,
                now + ack_wait,
            ) else {
                let due_ms = state.next_due_ms();
                // A state too fragmented to lease from shrinks only by
                // merging what workers settled: write that merge even
                // though nothing is leased (best effort: whoever loses this
                // race merged the same).
                if merged && state.ranges() >= MAX_RANGES {
                    if let Cas::Written =
                        cas(&self.client, &self.info, &key, slot.revision, &unexpired).await?
                    {
                        self.prune(partition, &unexpired);
                    }
                }
                return Ok(Leased::Nothing { due_ms });
            };
            match cas(&self.client, &self.info, &key, slot.revision, &state).await? {
                Cas::Written => {
                    self.prune(partition, &state);
                    break (taken, id);
                }
                Cas::Lost(current) => slot = current,
            }
            if started.elapsed() >= CAS_PATIENCE {
                return Err(Error::Contended {
                    topic: self.info.name.clone(),
                    partition,
                    waited: started.elapsed(),
                });
            }
            lost += 1;
            backoff(lost).await;
        };
        let deadline = Instant::now() + self.config.ack_wait;
        // A fetch may stop short of the range (it bounds its bytes): read
        // on from where it stopped. Offsets it covered without a message
        // are gaps (deleted, expired, trimmed), settled with the next flush.
        let mut messages = Vec::new();
        let mut covered = taken.from;
        let mut beyond = None;
        while covered < taken.to {
            let part = Partition::new(self.topic.clone(), self.info.incarnation, partition);
            let fetched = fetch_partition(
                &self.client,
                &part,
                covered,
                (taken.to - covered) as usize,
                Cut::Exact,
            )
            .await?;
            for m in fetched.messages {
                if m.offset < taken.to {
                    messages.push(m);
                } else {
                    beyond = beyond.or(Some(m.offset));
                }
            }
            if fetched.next_offset <= covered {
                break;
            }
            covered = fetched.next_offset;
        }
        if taken.deliveries == 1 && messages.is_empty() {
            if let Some(offset) = beyond {
                self.skip.insert(partition, offset);
            }
        }
        let mut present = std::collections::HashSet::with_capacity(messages.len());
        let mut release = Vec::new();
        let mut dead = Vec::new();
        for message in messages {
            present.insert(message.offset);
            if taken.deliveries > self.config.max_deliveries {
                dead.push(message);
                continue;
            }
            if !release.is_empty() {
                release.push(message.offset);
                continue;
            }
            self.load.outstanding.fetch_add(1, Ordering::Relaxed);
            let job = Job {
                message,
                delivery_count: taken.deliveries,
                lease: id,
                deadline,
                ack_wait: self.config.ack_wait,
                ops: self.ops.clone(),
                load: self.load.clone(),
            };
            // Full (lease_size leaves room, so only if the caller closed
            // meanwhile): hand this one and the rest back.
            if let Err(e) = self.jobs.try_send(Ok(job)) {
                if let Ok(job) = e.into_inner() {
                    release.push(job.message.offset);
                }
            }
        }
        for offset in taken.from..taken.to {
            let op = if present.contains(&offset) {
                continue;
            } else if offset < covered {
                Op::Ack(offset)
            } else {
                Op::Release { offset, lease: id }
            };
            self.buffered.push(Cmd {
                partition,
                op,
                done: None,
            });
        }
        for offset in release {
            self.buffered.push(Cmd {
                partition,
                op: Op::Release { offset, lease: id },
                done: None,
            });
        }
        for message in dead {
            let offset = message.offset;
            if let Some(producer) = &self.dead_letter {
                let mut record = Record::new(message.value.clone())
                    .header("pubsub-dlq-topic", Bytes::from(self.info.name.clone()))
                    .header("pubsub-dlq-partition", Bytes::from(partition.to_string()))
                    .header("pubsub-dlq-offset", Bytes::from(offset.to_string()))
                    .header(
                        "pubsub-dlq-deliveries",
                        Bytes::from((taken.deliveries - 1).to_string()),
                    )
                    .header("pubsub-dlq-reason", Bytes::from(taken.reason.clone()));
                if let Some(k) = message.key.clone() {
                    record = record.key(k);
                }
                producer.send(record).await?;
            }
            self.buffered.push(Cmd {
                partition,
                op: Op::DeadLettered(offset),
                done: None,
            });
        }
        Ok(Leased::Took)
    }
}
