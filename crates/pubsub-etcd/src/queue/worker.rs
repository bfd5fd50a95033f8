//! The background task of one queue worker: lease rounds that hand out
//! jobs, and the coalescing of settle operations into its settled key.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::batches::{BatchCache, Range};
use super::presence::Presence;
use super::settle::Settler;
use super::sizing::LeaseSizer;
use super::snapshot::{cas, read_snapshot, Cas, Slot, CAS_PATIENCE};
use super::state::{Op, Settled, MAX_RANGES};
use super::{Cmd, FlushRequest, Job, JobHandle, Load, QueueConsumerBuilder};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::QueueKey;
use crate::partition::Partition;
use crate::record::{now_millis, Record};
use crate::topic::{topic_arc, TopicInfo};
use crate::Producer;

/// Settle operations buffered before a flush regardless of the interval.
pub(super) const FLUSH_OPS: usize = 1024;
/// Pause after a failed lease round or a broken watch before trying again.
pub(super) const ERROR_PAUSE: Duration = Duration::from_millis(200);
/// About how long a worker that is not hungry waits after it lost a lease
/// race before it tries that partition again (jittered by ±50 %): long
/// enough for the hungry ones, which retry at once, to win.
const YIELD_PAUSE: Duration = Duration::from_millis(30);
/// A worker that took no lease for this long is hungry: it retries a lost
/// lease race at once, and the others step aside for it.
const HUNGRY_AFTER: Duration = Duration::from_secs(1);
/// Leases a worker takes in a row from one partition, while it has work,
/// before it looks at the next one first.
const STICKY_LEASES: u32 = 4;
/// How often a worker re-reads its topic's partition count.
const TOPIC_REFRESH: Duration = Duration::from_secs(5);
/// Settle operations a worker holds unstored before it stops leasing: only
/// flushes that keep failing (etcd refusing the settled key) let them pile
/// up, and more leases would only add to them.
const MAX_UNSTORED: usize = 8 * FLUSH_OPS;
/// How soon a worker whose job buffer has no room for a lease looks again.
const FULL_PAUSE: Duration = Duration::from_millis(2);

/// The partition state a worker wrote with its last lease, and what its
/// snapshot said then: enough to lease there again without a new snapshot.
struct Followup {
    partition: u32,
    slot: Slot,
    head: u64,
    sharers: usize,
}

/// What wakes the worker for its next lease round.
type Wake = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What one lease round found.
enum Round {
    Leased,
    /// Work was there, but this worker, not hungry, lost the CAS for it
    /// to another or left it to the workers without a lease: it tries
    /// again after a short pause.
    Yielded,
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
    Yielded,
}

pub(super) struct Worker {
    client: Client,
    topic: Arc<str>,
    info: TopicInfo,
    name: String,
    worker: String,
    config: QueueConsumerBuilder,
    dead_letter: Option<Producer>,
    jobs: mpsc::Sender<Result<Job>>,
    ops: mpsc::Sender<Cmd>,
    settler: Settler,
    /// Told when a flush stored a nack, which may make work due at once.
    nacked: Arc<Notify>,
    /// When `info` was last read: a topic may gain partitions.
    refreshed: Instant,
    next_lease: u64,
    next_partition: u32,
    /// Leases left to take from `next_partition` before moving on.
    sticky: u32,
    batches: BatchCache,
    /// Where the last lease was taken, for the next one in a row.
    followup: Option<Followup>,
    /// Per partition, an offset below which no message is stored any more.
    skip: HashMap<u32, u64>,
    load: Arc<Load>,
    sizer: LeaseSizer,
    /// When this worker last took a lease.
    last_took: Option<Instant>,
}

impl Worker {
    pub(super) fn new(
        config: QueueConsumerBuilder,
        info: TopicInfo,
        dead_letter: Option<Producer>,
        jobs: mpsc::Sender<Result<Job>>,
        ops: mpsc::Sender<Cmd>,
    ) -> Worker {
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
        let settler = Settler::new(
            config.client.clone(),
            info.clone(),
            config.name.clone(),
            worker.clone(),
        );
        Worker {
            client: config.client.clone(),
            topic: topic_arc(&config.topic),
            info,
            name: config.name.clone(),
            worker,
            config,
            dead_letter,
            jobs,
            ops,
            settler,
            nacked: Arc::default(),
            refreshed: Instant::now(),
            next_lease: 0,
            load: Arc::default(),
            sizer: LeaseSizer::new(),
            last_took: None,
            next_partition: rand::random::<u32>(),
            sticky: 0,
            batches: BatchCache::default(),
            followup: None,
            skip: HashMap::new(),
        }
    }

    /// Runs the lease rounds in a task of their own and the settling in
    /// this one until `stop`, then stores and merges what is left.
    pub(super) async fn run(
        self,
        mut ops: mpsc::Receiver<Cmd>,
        mut flushes: mpsc::Receiver<FlushRequest>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let client = self.client.clone();
        let presence = Presence::start(client.clone(), &self.info.name, &self.name, &self.worker);
        let settler = self.settler.clone();
        let nacked = self.nacked.clone();
        let interval = self.config.flush_interval;
        let (stop_leasing, leasing_stopped) = oneshot::channel();
        let leasing = tokio::spawn(self.lease_rounds(leasing_stopped));
        settler
            .run(&mut ops, &mut flushes, &mut stop, interval, &nacked)
            .await;
        let _ = stop_leasing.send(());
        let _ = leasing.await;
        presence.stop(&client).await;
        settler.finish(&mut ops).await;
    }

    async fn lease_rounds(mut self, mut stop: oneshot::Receiver<()>) {
        let mut wake: Wake = Box::pin(std::future::ready(()));
        loop {
            tokio::select! {
                biased;
                _ = &mut stop => break,
                _ = &mut wake => wake = self.round().await,
            }
        }
        if let Some(producer) = self.dead_letter.take() {
            let _ = producer.close().await;
        }
    }

    /// Reads the topic's partition count again. A topic deleted or
    /// recreated meanwhile keeps the old count: the reads of the next round
    /// report that.
    async fn refresh_topic(&mut self) {
        match self.client.topic(&self.info.name).await {
            Ok(info) if info.incarnation == self.info.incarnation => self.info = info,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, queue = %self.name, "re-reading the topic failed")
            }
        }
        self.refreshed = Instant::now();
    }

    /// Leases once if there is room for the jobs, and says what wakes the
    /// next round: at once after a lease; a change in etcd or the next due
    /// time when idle, so idle workers cost a watch, not polling reads.
    async fn round(&mut self) -> Wake {
        let size = self
            .sizer
            .next(&self.load, self.config.ack_wait, self.config.max_batch);
        let (unstored, failure) = self.settler.unstored();
        if unstored >= MAX_UNSTORED {
            // Leasing waits for a flush to store them; the application
            // hears why (the acks it did not wait for cannot tell it), once
            // it has taken what came before, so that errors do not pile up
            // in the channel while etcd fails.
            let Some(error) = failure else {
                // Flushes are behind, not failing.
                return Box::pin(tokio::time::sleep(FULL_PAUSE));
            };
            if self.jobs.capacity() == self.jobs.max_capacity() {
                let _ = self.jobs.try_send(Err(error));
            }
            return Box::pin(tokio::time::sleep(ERROR_PAUSE));
        }
        if size == 0 || self.jobs.capacity() < size as usize {
            return Box::pin(tokio::time::sleep(FULL_PAUSE));
        }
        match self.lease(size).await {
            Ok(Round::Leased) => {
                self.sizer.took();
                Box::pin(std::future::ready(()))
            }
            Ok(Round::Yielded) => {
                let pause = YIELD_PAUSE.mul_f64(0.5 + rand::random::<f64>());
                Box::pin(tokio::time::sleep(pause))
            }
            Ok(Round::Idle { revision, due_ms }) => {
                let changed = changed_after(
                    self.client.clone(),
                    self.info.name.clone(),
                    self.name.clone(),
                    revision,
                );
                // Looked at again after TOPIC_REFRESH at the latest, so that
                // partitions added to the topic meanwhile are found.
                let wait = due_ms.map_or(TOPIC_REFRESH, |due_ms| {
                    Duration::from_millis(due_ms.saturating_sub(now_millis()).max(0) as u64)
                        .min(TOPIC_REFRESH)
                });
                let nacked = self.nacked.clone();
                Box::pin(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changed => {}
                        _ = nacked.notified() => {}
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

    /// Whether this worker has had no lease for [`HUNGRY_AFTER`] (or never)
    /// and holds no job.
    fn hungry(&self) -> bool {
        !self.load.busy() && self.last_took.is_none_or(|t| t.elapsed() >= HUNGRY_AFTER)
    }

    /// Leases one range of some partition and hands out its jobs, from one
    /// read of every partition's state and head and every worker's settled
    /// operations.
    async fn lease(&mut self, size: u64) -> Result<Round> {
        if self.refreshed.elapsed() >= TOPIC_REFRESH {
            self.refresh_topic().await;
        }
        // The next leases in a row on a partition start from the state this
        // worker wrote there: a CAS at its revision fails (and returns the
        // current state) if any other write came between, so the snapshot
        // of every partition and settled key is read only every few leases.
        if let Some(next) = self.followup.take().filter(|_| self.sticky > 0) {
            let leased = self
                .lease_partition(
                    next.partition,
                    next.head,
                    next.sharers,
                    next.slot,
                    &[],
                    size,
                )
                .await?;
            if let Leased::Took = leased {
                self.sticky -= 1;
                return Ok(Round::Leased);
            }
        }
        let snapshot = read_snapshot(&self.client, &self.info, &self.name).await?;
        let partitions = self.info.partitions;
        for (p, slot) in snapshot.slots.iter().enumerate() {
            self.settler.prune(p as u32, &slot.state);
        }
        self.settler.clean_stale(&snapshot).await;
        if self.sticky == 0 {
            self.next_partition = self.next_partition.wrapping_add(1);
        }
        // The running workers spread over the partitions with fresh work:
        // each such partition expects its part of them, so that many
        // partitions are drained in large leases and one partition is
        // still shared by all.
        let with_work = snapshot
            .slots
            .iter()
            .zip(&snapshot.heads)
            .filter(|(slot, &head)| head > slot.state.next)
            .count();
        let sharers = snapshot.live.div_ceil(with_work.max(1));
        let mut due: Option<i64> = None;
        let mut yielded = false;
        for i in 0..partitions {
            let partition = self.next_partition.wrapping_add(i) % partitions;
            let slot = snapshot.slots[partition as usize].clone();
            let head = snapshot.heads[partition as usize];
            let settled = snapshot.settled(partition);
            match self
                .lease_partition(partition, head, sharers, slot, &settled, size)
                .await?
            {
                Leased::Took => {
                    // Back to the same partition for the next few leases:
                    // the batch this one read then serves them too (see
                    // `batches`), and fewer workers hold leases on each
                    // partition. Then on to the next, so that no partition
                    // waits while a busy one keeps a worker.
                    if partition == self.next_partition % partitions && self.sticky > 0 {
                        self.sticky -= 1;
                    } else {
                        self.next_partition = partition;
                        self.sticky = STICKY_LEASES - 1;
                    }
                    return Ok(Round::Leased);
                }
                Leased::Nothing { due_ms } => {
                    due = due.into_iter().chain(due_ms).min();
                }
                Leased::Yielded => yielded = true,
            }
        }
        if yielded {
            return Ok(Round::Yielded);
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
        sharers: usize,
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
                sharers,
                size,
                self.config.max_deliveries,
                now,
                now + ack_wait,
            ) else {
                // Fresh offsets kept for workers without a lease: this one
                // comes back soon, in case none of them takes them.
                if state.reserved(&self.worker, head, sharers) > 0 {
                    return Ok(Leased::Yielded);
                }
                let due_ms = state.next_due_ms();
                // A state too fragmented to lease from shrinks only by
                // merging what workers settled: write that merge even
                // though nothing is leased (best effort: whoever loses this
                // race merged the same).
                if merged && state.ranges() >= MAX_RANGES {
                    if let Cas::Written(_) =
                        cas(&self.client, &self.info, &key, slot.revision, &unexpired).await?
                    {
                        self.settler.prune(partition, &unexpired);
                    }
                }
                return Ok(Leased::Nothing { due_ms });
            };
            match cas(&self.client, &self.info, &key, slot.revision, &state).await? {
                Cas::Written(revision) => {
                    self.settler.prune(partition, &state);
                    self.last_took = Some(Instant::now());
                    self.followup = Some(Followup {
                        partition,
                        slot: Slot { revision, state },
                        head,
                        sharers,
                    });
                    break (taken, id);
                }
                // A race of compare-and-swaps favours whoever is fastest,
                // the same workers each time: a worker that had work
                // recently leaves the partition to the others for a
                // moment, so that workers without any get work too.
                Cas::Lost(_) if !self.hungry() => {
                    return Ok(Leased::Yielded);
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
        };
        let deadline = Instant::now() + self.config.ack_wait;
        // Offsets of the range without a message are gaps (deleted,
        // expired, trimmed), settled with the next flush.
        let part = Partition::new(self.topic.clone(), self.info.incarnation, partition);
        let Range {
            messages,
            covered,
            beyond,
        } = self
            .batches
            .read(&self.client, &part, taken.from, taken.to)
            .await?;
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
                handle: JobHandle {
                    ops: self.ops.clone(),
                    load: self.load.clone(),
                    settling: false,
                },
            };
            // Full (the lease size leaves room, so only if the caller closed
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
            self.settler.push(partition, op);
        }
        for offset in release {
            self.settler
                .push(partition, Op::Release { offset, lease: id });
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
            self.settler.push(partition, Op::DeadLettered(offset));
        }
        Ok(Leased::Took)
    }
}
