//! Queue mode: any number of workers share a topic's messages with
//! per-message acknowledgement, redelivery after `ack_wait`, delivery limits
//! and dead-letter topics. At-least-once, unordered. The protocols are in
//! DESIGN.md ("Queue mode"); the state transitions are in [`state`].

mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::record::{now_millis, Message, Record};
use crate::topic::{topic_arc, validate_group_name, TopicInfo};
use crate::Producer;
use state::{Op, State};

/// Largest queue state written, below etcd's 1.5 MiB request limit.
const MAX_STATE_BYTES: usize = 1024 * 1024;
/// Settle operations buffered before a flush regardless of the interval.
const FLUSH_OPS: usize = 1024;
/// CAS attempts per lease or flush before giving up until the next round.
const CAS_ATTEMPTS: usize = 32;

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
    poll_interval: Duration,
}

/// Queue counters, from [`Client::queue_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Offsets that wait for (re)delivery, including never delivered ones.
    pub pending: u64,
    /// Offsets leased to a worker now.
    pub in_flight: u64,
    /// Deliveries made again after a lease expired.
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub terminated: u64,
    /// Timestamp (ms) of the oldest unsettled message, if any.
    pub oldest_unsettled_ms: Option<i64>,
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
            poll_interval: Duration::from_millis(100),
        }
    }

    /// Pending, in-flight, redelivered and dead-lettered counts of a queue.
    pub async fn queue_stats(&self, topic: &str, name: &str) -> Result<QueueStats> {
        validate_group_name(name)?;
        let info = self.topic(topic).await?;
        let heads = self
            .next_offsets(&info, &(0..info.partitions).collect::<Vec<_>>())
            .await?;
        let mut stats = QueueStats::default();
        for (partition, head) in heads {
            let state = read_state(self, &info, name, partition).await?.1;
            let fresh = head.saturating_sub(state.next);
            stats.pending += state.pending_count() + fresh;
            stats.in_flight += state.in_flight();
            stats.redelivered += state.redelivered;
            stats.dead_lettered += state.dead_lettered;
            stats.terminated += state.terminated;
            let low = state.low_watermark();
            if low < head {
                let topic = topic_arc(topic);
                let page = fetch_partition(
                    self,
                    &topic,
                    info.incarnation,
                    partition,
                    low,
                    1,
                    Cut::Exact,
                )
                .await?;
                if let Some(m) = page.messages.first() {
                    let oldest = stats.oldest_unsettled_ms.get_or_insert(m.timestamp);
                    *oldest = (*oldest).min(m.timestamp);
                }
            }
        }
        Ok(stats)
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

    /// How often an idle worker looks for work; default 100 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
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
        if self.max_deliveries == 0 || self.ack_wait.is_zero() {
            return Err(Error::InvalidConfig(
                "queue max_deliveries and ack_wait must be above zero".into(),
            ));
        }
        let info = self.client.topic(&self.topic).await?;
        let dead_letter = match &self.dead_letter {
            Some(t) => Some(self.client.producer(t).build().await?),
            None => None,
        };
        static WORKERS: AtomicU64 = AtomicU64::new(0);
        let worker = format!(
            "{}-{}-{}",
            gethostname::gethostname().to_string_lossy(),
            std::process::id(),
            WORKERS.fetch_add(1, Ordering::Relaxed)
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
            next_partition: rand::random::<u32>(),
            skip: HashMap::new(),
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
    jobs: mpsc::Receiver<Job>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl QueueConsumer {
    /// The next job whose lease has not expired; None once closed.
    pub async fn recv(&mut self) -> Option<Job> {
        while let Some(job) = self.jobs.recv().await {
            if job.deadline > Instant::now() {
                return Some(job);
            }
        }
        None
    }

    /// The jobs as a stream.
    pub fn stream(self) -> impl futures::Stream<Item = Job> {
        futures::stream::unfold(self, |mut q| async move { q.recv().await.map(|j| (j, q)) })
    }

    /// Stops leasing, flushes settled jobs and waits until that is in etcd.
    /// Jobs still unsettled are redelivered after their lease expires.
    pub async fn close(mut self) {
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
        let op = Op::Nack {
            offset: self.message.offset,
            lease: self.lease,
            not_before_ms: now_millis() + delay.as_millis() as i64,
            reason: reason.to_string(),
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

async fn read_state(
    client: &Client,
    info: &TopicInfo,
    name: &str,
    partition: u32,
) -> Result<(i64, State)> {
    let key = client.keys.queue_partition(&info.name, name, partition);
    let response = client.read("read queue state", key.clone(), None).await?;
    match response.kvs().first() {
        Some(kv) => {
            let state: State = serde_json::from_slice(kv.value()).map_err(|e| Error::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            if state.inc != info.incarnation {
                return Ok((kv.mod_revision(), State::fresh(info.incarnation, 0)));
            }
            Ok((kv.mod_revision(), state))
        }
        None => Ok((0, State::fresh(info.incarnation, 0))),
    }
}

/// Writes `state` if the key is still at `revision` (0: absent); false when
/// another worker changed it first.
async fn write_state(client: &Client, key: &str, revision: i64, state: &State) -> Result<bool> {
    let value = serde_json::to_vec(state).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    if value.len() > MAX_STATE_BYTES {
        return Err(Error::QueueStateTooLarge {
            key: key.to_string(),
            bytes: value.len(),
            limit: MAX_STATE_BYTES,
        });
    }
    let compare = Compare::mod_revision(key, CompareOp::Equal, revision);
    let txn = Txn::new()
        .when([compare])
        .and_then([TxnOp::put(key, value, None)]);
    let response = client
        .timed("write queue state", client.kv.clone().txn(txn))
        .await?;
    Ok(response.succeeded())
}

struct Worker {
    client: Client,
    topic: Arc<str>,
    info: TopicInfo,
    name: String,
    worker: String,
    config: QueueConsumerBuilder,
    dead_letter: Option<Producer>,
    jobs: mpsc::Sender<Job>,
    ops: mpsc::Sender<Cmd>,
    buffered: Vec<Cmd>,
    next_lease: u64,
    next_partition: u32,
    /// Per partition, an offset below which no message is stored any more.
    skip: HashMap<u32, u64>,
}

impl Worker {
    async fn run(mut self, mut ops: mpsc::Receiver<Cmd>, mut stop: oneshot::Receiver<()>) {
        let mut flush = tokio::time::interval(self.config.flush_interval);
        let mut lease_at = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                Some(cmd) = ops.recv() => {
                    self.buffered.push(cmd);
                    if self.buffered.len() >= FLUSH_OPS {
                        self.flush().await;
                    }
                }
                _ = flush.tick() => self.flush().await,
                _ = tokio::time::sleep_until(lease_at) => {
                    lease_at = if self.jobs.capacity() < self.config.max_batch as usize {
                        Instant::now() + Duration::from_millis(2)
                    } else {
                        match self.lease().await {
                            Ok(true) => Instant::now(),
                            Ok(false) => Instant::now() + self.config.poll_interval,
                            Err(error) => {
                                tracing::warn!(%error, queue = %self.name, "queue lease failed");
                                Instant::now() + self.config.poll_interval
                            }
                        }
                    };
                }
            }
        }
        ops.close();
        while let Ok(cmd) = ops.try_recv() {
            self.buffered.push(cmd);
        }
        self.flush().await;
        if let Some(producer) = self.dead_letter.take() {
            let _ = producer.close().await;
        }
    }

    /// Writes the buffered settle operations, one CAS per partition.
    async fn flush(&mut self) {
        if self.buffered.is_empty() {
            return;
        }
        let mut by_partition: HashMap<u32, Vec<Cmd>> = HashMap::new();
        for cmd in self.buffered.drain(..) {
            by_partition.entry(cmd.partition).or_default().push(cmd);
        }
        for (partition, cmds) in by_partition {
            let result = self.flush_partition(partition, &cmds).await;
            for cmd in cmds {
                if let Some(done) = cmd.done {
                    let _ = done.send(result.clone());
                }
            }
        }
    }

    async fn flush_partition(&self, partition: u32, cmds: &[Cmd]) -> Result<()> {
        let key = self
            .client
            .keys
            .queue_partition(&self.info.name, &self.name, partition);
        for _ in 0..CAS_ATTEMPTS {
            let (revision, mut state) =
                read_state(&self.client, &self.info, &self.name, partition).await?;
            for cmd in cmds {
                state.apply(&self.worker, &cmd.op);
            }
            match write_state(&self.client, &key, revision, &state).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                // A write whose outcome is unknown is repeated on a fresh
                // read: settling an already settled offset changes nothing.
                Err(e) if e.is_outcome_unknown() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contended {
            topic: self.info.name.clone(),
            partition,
            waited: Duration::ZERO,
        })
    }

    /// Leases one range of some partition and hands out its jobs; false when
    /// no partition had work.
    async fn lease(&mut self) -> Result<bool> {
        let partitions = self.info.partitions;
        let all: Vec<u32> = (0..partitions).collect();
        let heads: HashMap<u32, u64> = self
            .client
            .next_offsets(&self.info, &all)
            .await?
            .into_iter()
            .collect();
        self.next_partition = self.next_partition.wrapping_add(1);
        for i in 0..partitions {
            let partition = (self.next_partition.wrapping_add(i)) % partitions;
            if self.lease_partition(partition, heads[&partition]).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn lease_partition(&mut self, partition: u32, head: u64) -> Result<bool> {
        let key = self
            .client
            .keys
            .queue_partition(&self.info.name, &self.name, partition);
        let ack_wait = self.config.ack_wait.as_millis() as i64;
        let (taken, id) = loop {
            let (revision, mut state) =
                read_state(&self.client, &self.info, &self.name, partition).await?;
            let now = now_millis();
            if let Some(&skip) = self.skip.get(&partition) {
                if skip > state.next && state.next < head {
                    state.next = skip.min(head);
                }
            }
            state.expire(now);
            self.next_lease += 1;
            let id = self.next_lease;
            let Some(taken) = state.take(
                &self.worker,
                id,
                head,
                self.config.max_batch,
                now,
                now + ack_wait,
            ) else {
                return Ok(false);
            };
            if write_state(&self.client, &key, revision, &state).await? {
                break (taken, id);
            }
        };
        let deadline = Instant::now() + self.config.ack_wait;
        let fetched = fetch_partition(
            &self.client,
            &self.topic,
            self.info.incarnation,
            partition,
            taken.from,
            (taken.to - taken.from) as usize,
            Cut::Exact,
        )
        .await?;
        if taken.deliveries == 1
            && fetched
                .messages
                .first()
                .is_none_or(|m| m.offset >= taken.to)
        {
            if let Some(m) = fetched.messages.first() {
                self.skip.insert(partition, m.offset);
            }
        }
        let mut present = Vec::with_capacity(fetched.messages.len());
        let mut dead = Vec::new();
        for message in fetched.messages {
            if message.offset >= taken.to {
                break;
            }
            present.push(message.offset);
            if taken.deliveries > self.config.max_deliveries {
                dead.push(message);
                continue;
            }
            let job = Job {
                message,
                delivery_count: taken.deliveries,
                lease: id,
                deadline,
                ack_wait: self.config.ack_wait,
                ops: self.ops.clone(),
            };
            if self.jobs.try_send(job).is_err() {
                break;
            }
        }
        for offset in taken.from..taken.to {
            if !present.contains(&offset) {
                self.buffered.push(Cmd {
                    partition,
                    op: Op::Ack(offset),
                    done: None,
                });
            }
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
        Ok(true)
    }
}
