//! Queue mode: any number of workers share a topic's messages with
//! per-message acknowledgement, redelivery after `ack_wait`, delivery limits
//! and dead-letter topics. At-least-once, unordered. The protocols are in
//! DESIGN.md ("Queue mode"); the state transitions are in [`state`].

mod admin;
mod batches;
mod presence;
mod settle;
mod sizing;
mod snapshot;
mod state;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::record::{now_millis, Message};
use crate::topic::validate_group_name;
use state::{Op, MAX_REASON};
use worker::{Worker, FLUSH_OPS};

pub(crate) use snapshot::retention_floor;

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
#[non_exhaustive]
pub struct QueueStats {
    /// Workers running now. One that died without closing counts until its
    /// presence lease expires (10 s).
    pub workers: u64,
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
            max_batch: 1024,
            flush_interval: Duration::from_millis(10),
        }
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

    /// Most offsets one lease takes; default 1024. A worker takes no more
    /// than it finishes in about a second, so a slow one takes far fewer.
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
    ///
    /// # Errors
    /// [`Error::InvalidGroupName`] for a bad queue name, [`Error::InvalidConfig`]
    /// for settings out of range, [`Error::TopicNotFound`] for a missing
    /// topic (or dead-letter topic), and etcd errors reading them.
    ///
    /// # Cancel safety
    /// Cancel-safe: the worker starts only as it returns.
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
        let capacity = (2 * self.max_batch) as usize;
        let (jobs_tx, jobs) = mpsc::channel(capacity);
        let (ops_tx, ops_rx) = mpsc::channel(FLUSH_OPS * 4);
        let (flushes_tx, flushes_rx) = mpsc::channel(FLUSH_REQUESTS);
        let (stop_tx, stop_rx) = oneshot::channel();
        let worker_task = Worker::new(self.clone(), info, dead_letter, jobs_tx, ops_tx);
        let task = tokio::spawn(worker_task.run(ops_rx, flushes_rx, stop_rx));
        Ok(QueueConsumer {
            jobs,
            flushes: flushes_tx,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// A worker of a queue: yields [`Job`]s until closed.
#[derive(Debug)]
pub struct QueueConsumer {
    jobs: mpsc::Receiver<Result<Job>>,
    flushes: mpsc::Sender<FlushRequest>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl QueueConsumer {
    /// The next job whose lease has not expired, or an error that stops
    /// this worker from leasing (a corrupt queue state, a deleted topic,
    /// a failed dead-letter append...; the worker keeps trying, the caller
    /// decides whether to close). Transient etcd errors are retried, not
    /// returned. None once closed.
    ///
    /// # Errors
    /// As said above: errors that stop the worker from leasing, such as
    /// [`Error::Corrupt`] naming the key, [`Error::TopicDeleted`], a failed
    /// dead-letter append, or the error of the last flush while 8,192
    /// settle operations wait for one to store them.
    ///
    /// # Cancel safety
    /// Cancel-safe: a dropped call loses no job.
    pub async fn recv(&mut self) -> Option<Result<Job>> {
        while let Some(item) = self.jobs.recv().await {
            match item {
                Ok(job) if job.deadline <= Instant::now() => continue,
                other => return Some(other),
            }
        }
        None
    }

    /// Stores every settle operation handed to this worker before the call
    /// (the [`Job::ack_nowait`]s above all) now, instead of at the next
    /// `flush_interval`, and returns once etcd has them.
    ///
    /// # Errors
    /// [`Error::ConsumerClosed`] if the worker has stopped, and the error of
    /// the flush (as for [`Job::ack`]); the operations nobody waits for
    /// ([`Job::ack_nowait`]s) are then kept for the next flush, while the
    /// [`Job::ack`]s, nacks and terms in it fail with the same error.
    ///
    /// # Cancel safety
    /// A dropped call may still have made the flush.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flushes
            .send(tx)
            .await
            .map_err(|_| Error::ConsumerClosed)?;
        rx.await.map_err(|_| Error::ConsumerClosed)?
    }

    /// The jobs as a stream.
    pub fn stream(self) -> impl futures::Stream<Item = Result<Job>> {
        futures::stream::unfold(self, |mut q| async move { q.recv().await.map(|j| (j, q)) })
    }

    /// Stops leasing, releases the jobs leased but not received yet, flushes
    /// settled jobs and waits until that is in etcd. Jobs received and still
    /// unsettled are redelivered after their lease expires.
    ///
    /// # Cancel safety
    /// A dropped call has already told the worker to stop; it flushes and
    /// ends in the background, and what it could not store is redelivered
    /// after `ack_wait`.
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
                let _ = job.handle.ops.try_send(cmd);
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
    handle: JobHandle,
}

/// What settling a job needs once its message is no longer wanted, and the
/// job's part in its worker's [`Load`] until then: an awaited ack holds
/// only this (a few words, not the message), which matters when an
/// application keeps a thousand acks in flight.
#[derive(Debug)]
struct JobHandle {
    ops: mpsc::Sender<Cmd>,
    load: Arc<Load>,
    /// Settled, waiting for etcd to confirm it.
    settling: bool,
}

/// How busy a worker is. A job counts as finished once the application
/// settles it, not once etcd confirms that: the confirmation waits for the
/// next flush, and counting it would make a worker look slower (and lease
/// less) the longer flushes take.
#[derive(Debug, Default)]
struct Load {
    /// Jobs handed out and not settled (nor dropped) yet.
    outstanding: AtomicU64,
    /// Jobs settled whose settling etcd has not confirmed yet.
    settling: AtomicU64,
    /// Jobs settled or dropped, in all.
    finished: AtomicU64,
}

impl Load {
    fn finish_one(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the worker has jobs in hand or settles some: such a worker
    /// leaves a contended partition to the others for a moment.
    fn busy(&self) -> bool {
        self.outstanding.load(Ordering::Relaxed) + self.settling.load(Ordering::Relaxed) > 0
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if self.settling {
            self.load.settling.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.load.finish_one();
        }
    }
}

/// Where the outcome of a [`QueueConsumer::flush`] goes.
type FlushRequest = oneshot::Sender<Result<()>>;

/// [`QueueConsumer::flush`] calls waiting for the worker's settling task;
/// callers beyond it wait for room.
const FLUSH_REQUESTS: usize = 8;

#[derive(Debug)]
struct Cmd {
    partition: u32,
    op: Op,
    done: Option<oneshot::Sender<Result<()>>>,
}

/// Where a settle operation went when it was made.
enum Handoff {
    /// In the worker's channel.
    Sent,
    /// Waiting for room in it.
    Full(Cmd),
    Closed,
}

impl JobHandle {
    /// Puts `op` in the worker's channel at once if it has room; the
    /// receiver hears when a flush stored it.
    fn hand_over(&self, partition: u32, op: Op) -> (Handoff, oneshot::Receiver<Result<()>>) {
        let (tx, rx) = oneshot::channel();
        let cmd = Cmd {
            partition,
            op,
            done: Some(tx),
        };
        (self.try_put(cmd), rx)
    }

    fn try_put(&self, cmd: Cmd) -> Handoff {
        match self.ops.try_send(cmd) {
            Ok(()) => Handoff::Sent,
            Err(mpsc::error::TrySendError::Full(cmd)) => Handoff::Full(cmd),
            Err(mpsc::error::TrySendError::Closed(_)) => Handoff::Closed,
        }
    }

    /// Waits for room in the channel, if there was none.
    async fn put(&self, handoff: Handoff) -> Result<()> {
        match handoff {
            Handoff::Sent => Ok(()),
            // Boxed: the wait for room is rare, and inline it would make
            // every settle future several times larger.
            Handoff::Full(cmd) => Box::pin(self.ops.send(cmd))
                .await
                .map_err(|_| Error::ConsumerClosed),
            Handoff::Closed => Err(Error::ConsumerClosed),
        }
    }

    /// Waits for room in the channel, if there was none, then for the
    /// flush that stores the operation.
    async fn confirmed(
        &self,
        handoff: Handoff,
        stored: oneshot::Receiver<Result<()>>,
    ) -> Result<()> {
        self.put(handoff).await?;
        stored.await.map_err(|_| Error::ConsumerClosed)?
    }
}

impl Job {
    /// Settles the job at once and returns the wait for etcd to store it,
    /// which holds the job's handle but not its message.
    fn settle(self, op: Op) -> impl Future<Output = Result<()>> + Send + 'static {
        let Job {
            message,
            mut handle,
            ..
        } = self;
        handle.load.finish_one();
        handle.load.settling.fetch_add(1, Ordering::Relaxed);
        handle.settling = true;
        let (handoff, stored) = handle.hand_over(message.partition, op);
        async move { handle.confirmed(handoff, stored).await }
    }

    /// Settles the message: the ack is handed to the worker when this is
    /// called (or, if the worker's channel is full, when the future is
    /// first polled), and the future returned resolves once etcd stores it.
    ///
    /// # Errors
    /// [`Error::ConsumerClosed`] if the worker has stopped, and the error of
    /// the flush that should have stored it (an etcd error such as
    /// [`Error::Unavailable`] or [`Error::Timeout`], or
    /// [`Error::QueueStateTooLarge`]). The message may then be delivered
    /// again.
    ///
    /// # Cancel safety
    /// A dropped call leaves the ack either handed to the worker (it is
    /// stored with the next flush) or not made (the message comes back after
    /// its lease expires); either way nothing is lost.
    pub fn ack(self) -> impl Future<Output = Result<()>> + Send + 'static {
        let op = Op::Ack(self.message.offset);
        self.settle(op)
    }

    /// Settles the message as [`Job::ack`] does, but returns once the
    /// worker holds the ack, not once etcd stores it: it is stored with the
    /// worker's next flush (within `flush_interval`), and a flush that fails
    /// keeps it for the one after. [`QueueConsumer::flush`] waits until
    /// every ack made so far is stored. This trades the confirmation for
    /// throughput, as JetStream's `ack` does next to its `double_ack`:
    /// delivery stays at-least-once, since an ack lost with its process
    /// (never stored) makes the message come back after `ack_wait`.
    ///
    /// # Errors
    /// [`Error::ConsumerClosed`] if the worker has stopped.
    ///
    /// # Cancel safety
    /// A dropped call leaves the ack either handed to the worker or not
    /// made (the message comes back after its lease expires).
    pub async fn ack_nowait(self) -> Result<()> {
        let cmd = Cmd {
            partition: self.message.partition,
            op: Op::Ack(self.message.offset),
            done: None,
        };
        let handoff = self.handle.try_put(cmd);
        self.handle.put(handoff).await
    }

    /// Settles the message without processing it.
    ///
    /// # Errors
    /// As for [`Job::ack`].
    ///
    /// # Cancel safety
    /// As for [`Job::ack`].
    pub fn term(self) -> impl Future<Output = Result<()>> + Send + 'static {
        let op = Op::Term(self.message.offset);
        self.settle(op)
    }

    /// Makes the message deliverable again after `delay`.
    ///
    /// # Errors
    /// As for [`Job::ack`].
    ///
    /// # Cancel safety
    /// As for [`Job::ack`]: an unstored nack means the message comes back
    /// once its lease expires instead of after `delay`.
    pub fn nack(self, delay: Duration) -> impl Future<Output = Result<()>> + Send + 'static {
        self.nack_with_reason(delay, "")
    }

    /// [`Job::nack`] with a reason the dead-letter topic's header carries
    /// (cut to 256 bytes).
    ///
    /// # Errors
    /// As for [`Job::ack`].
    ///
    /// # Cancel safety
    /// As for [`Job::nack`].
    pub fn nack_with_reason(
        self,
        delay: Duration,
        reason: &str,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let mut reason = reason.to_string();
        state::truncate(&mut reason, MAX_REASON);
        let op = Op::Nack {
            offset: self.message.offset,
            lease: self.lease,
            not_before_ms: now_millis().saturating_add(delay.as_millis() as i64),
            reason,
        };
        self.settle(op)
    }

    /// Extends this job's lease (and its batch's) by `ack_wait` from now.
    ///
    /// # Errors
    /// As for [`Job::ack`]; the lease then keeps its old deadline.
    ///
    /// # Cancel safety
    /// A dropped call may still extend the lease in etcd, but the job keeps
    /// its old deadline; calling it again is harmless.
    pub async fn in_progress(&mut self) -> Result<()> {
        let op = Op::Extend {
            lease: self.lease,
            deadline_ms: now_millis() + self.ack_wait.as_millis() as i64,
        };
        let (handoff, stored) = self.handle.hand_over(self.message.partition, op);
        self.handle.confirmed(handoff, stored).await?;
        self.deadline = Instant::now() + self.ack_wait;
        Ok(())
    }
}
