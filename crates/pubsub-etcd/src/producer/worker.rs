//! A partition's batching loop: one task per partition being written, which
//! takes what is queued, appends it as one batch and answers each sender.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::ttl::ttl_bucket;
use super::{Item, Pending, Shared};
use crate::append::PartitionAppender;
use crate::compression::Compression;
use crate::error::Error;
use crate::partition::Partition;
use crate::retention;

/// How often a partition worker trims its partition to the topic's
/// retention limits (after a successful append; never two trims at once).
const TRIM_INTERVAL: Duration = Duration::from_secs(1);
/// How long a closing worker's final trim may take.
const FINAL_TRIM_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition's batching loop. What all workers share stays in
/// `Shared`, so a worker costs little beside its appender and queue.
pub(super) struct Worker {
    shared: Arc<Shared>,
    appender: PartitionAppender,
    partition: u32,
    queue: mpsc::Receiver<Item>,
    /// Its slot's count of senders handing it a record.
    handing: Arc<AtomicUsize>,
    /// A record taken from the queue that did not fit the last batch.
    held: Option<Box<Pending>>,
    incarnation: i64,
    /// When the last retention trim started.
    last_trim: Option<Instant>,
    appended_since_trim: bool,
    /// The background trim started last; awaited on close, so no trim
    /// outlives the producer.
    trim_task: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.live.send_modify(|n| *n -= 1);
    }
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        partition: u32,
        incarnation: i64,
        compression: Compression,
        queue: mpsc::Receiver<Item>,
        handing: Arc<AtomicUsize>,
    ) -> Worker {
        Worker {
            appender: PartitionAppender::new(
                shared.client.clone(),
                Partition::new(shared.name.clone(), incarnation, partition),
                // Each worker its own id: a successor cannot continue its
                // predecessor's sequence.
                rand::random(),
                compression,
            ),
            shared,
            partition,
            queue,
            handing,
            held: None,
            incarnation,
            last_trim: None,
            appended_since_trim: false,
            trim_task: None,
        }
    }

    pub(super) async fn run(mut self) {
        let config = &self.shared.config;
        let (linger, idle) = (config.linger, config.worker_idle_timeout);
        let (max_batch_bytes, max_batch_records) =
            (config.max_batch_bytes, config.max_batch_records);
        loop {
            let mut batch = Vec::new();
            let mut flushes = Vec::new();
            let mut bytes = 0usize;
            let first = match self.held.take() {
                Some(pending) => Item::Record(pending),
                None => match tokio::time::timeout(idle, self.queue.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => {
                        Box::pin(self.final_trim()).await;
                        return;
                    }
                    Err(_) if self.retire() => {
                        Box::pin(self.final_trim()).await;
                        return;
                    }
                    Err(_) => continue,
                },
            };
            // Waiting for a turn lets the queue fill, so the batch taken
            // next holds what came meanwhile. The semaphore is never closed.
            let turn = self.shared.appends.clone().acquire_owned().await;
            let linger_until = Instant::now() + linger;
            let mut item = Some(first);
            loop {
                match item.take() {
                    Some(Item::Record(pending)) => {
                        // Records of different deadline buckets (or with and
                        // without a time to live) go in different batches:
                        // a batch key carries at most one lease.
                        let other_bucket = batch.first().is_some_and(|first: &Pending| {
                            ttl_bucket(&first.record) != ttl_bucket(&pending.record)
                        });
                        if !batch.is_empty()
                            && (bytes + pending.size > max_batch_bytes || other_bucket)
                        {
                            self.held = Some(pending);
                            break;
                        }
                        bytes += pending.size;
                        batch.push(*pending);
                        if batch.len() >= max_batch_records {
                            break;
                        }
                    }
                    // A flush ends lingering: its caller wants the batch now.
                    Some(Item::Flush(done)) => {
                        flushes.push(done);
                        if !linger.is_zero() {
                            break;
                        }
                    }
                    None => {}
                }
                item = match self.queue.try_recv() {
                    Ok(next) => Some(next),
                    Err(mpsc::error::TryRecvError::Empty) if Instant::now() < linger_until => {
                        tokio::select! {
                            next = self.queue.recv() => next,
                            _ = tokio::time::sleep_until(linger_until) => None,
                        }
                    }
                    Err(_) => None,
                };
                if item.is_none() {
                    break;
                }
            }
            if !batch.is_empty() {
                // Boxed, like the final trims: the append's state lives on
                // the heap only while it runs (at most
                // `max_appends_in_flight` at once), not in every
                // partition's task.
                Box::pin(self.send(batch)).await;
            }
            drop(turn);
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Ends this worker if nothing is queued for it nor being handed to it:
    /// its slot goes, so the next record for the partition starts a new
    /// worker. Under the workers lock, which every hand-over takes first.
    fn retire(&mut self) -> bool {
        let mut workers = self.shared.workers.lock().expect("workers lock");
        if self.handing.load(Ordering::SeqCst) > 0 || !self.queue.is_empty() {
            return false;
        }
        if workers
            .slots
            .get(&self.partition)
            .is_some_and(|slot| Arc::ptr_eq(&slot.handing, &self.handing))
        {
            workers.slots.remove(&self.partition);
        }
        // Flushes that still hold the queue see it closed: nothing to wait for.
        self.queue.close();
        true
    }

    async fn send(&mut self, batch: Vec<Pending>) {
        let mut records = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        // The records' buffer room is held until they are answered.
        let mut permits = Vec::with_capacity(batch.len());
        for pending in batch {
            records.push(pending.record);
            replies.push(pending.reply);
            permits.push(pending.permit);
        }
        let config = &self.shared.config;
        let started = Instant::now();
        let delivery_deadline = started + config.delivery_timeout;
        let lease = match records.first().and_then(ttl_bucket) {
            Some(bucket) => match self
                .shared
                .leases
                .lease_for(&self.shared.client, bucket)
                .await
            {
                Ok(lease) => Some(lease),
                Err(e) => {
                    let e = if e.is_outcome_unknown() {
                        Error::Unavailable {
                            op: "grant lease",
                            waited: started.elapsed(),
                            detail: e.to_string(),
                        }
                    } else {
                        e
                    };
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
            },
            None => None,
        };
        let outcome = loop {
            // The append gives up at the unavailable deadline, also when
            // other producers won every attempt; those records were never
            // written, so they may go again until the delivery deadline.
            let deadline = (Instant::now() + config.unavailable_timeout).min(delivery_deadline);
            let retry = (delivery_deadline > deadline).then(|| records.clone());
            match self.appender.append_leased(records, deadline, lease).await {
                Err(Error::Contended { .. })
                    if Instant::now() < delivery_deadline && retry.is_some() =>
                {
                    records = retry.expect("checked");
                }
                Err(Error::Contended {
                    topic, partition, ..
                }) => {
                    break Err(Error::Contended {
                        topic,
                        partition,
                        waited: started.elapsed(),
                    })
                }
                Err(e) if e.is_outcome_unknown() => {
                    break Err(Error::Unavailable {
                        op: "append",
                        waited: started.elapsed(),
                        detail: e.to_string(),
                    })
                }
                outcome => break outcome,
            }
        };
        match outcome {
            Ok(base) => {
                for (i, reply) in replies.into_iter().enumerate() {
                    let _ = reply.send(Ok((self.partition, base + i as u64)));
                }
                self.appended_since_trim = true;
                self.maybe_trim();
            }
            Err(e) => {
                if matches!(e, Error::TopicDeleted(_)) {
                    self.shared.deleted.store(true, Ordering::Relaxed);
                }
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        drop(permits);
    }

    /// A trim of this partition to the topic's retention limits, when the
    /// topic has limits and this worker knows the partition's head.
    fn trim_job(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let config = self
            .shared
            .retention
            .lock()
            .expect("retention lock")
            .clone();
        if !retention::wants_trim(&config) {
            return None;
        }
        let (next, total_bytes) = self.appender.known_head()?;
        Some(retention::producer_trim(
            self.shared.client.clone(),
            Partition::new(self.shared.name.clone(), self.incarnation, self.partition),
            config,
            next,
            total_bytes,
        ))
    }

    /// Starts a background trim at most once per [`TRIM_INTERVAL`] and never
    /// two at once, so the append path only pays for a clock read.
    fn maybe_trim(&mut self) {
        if self.trim_task.as_ref().is_some_and(|t| !t.is_finished())
            || self.last_trim.is_some_and(|t| t.elapsed() < TRIM_INTERVAL)
        {
            return;
        }
        let Some(trim) = self.trim_job() else {
            return;
        };
        self.last_trim = Some(Instant::now());
        self.appended_since_trim = false;
        self.trim_task = Some(tokio::spawn(trim));
    }

    /// On close: waits for a running trim, then trims once more if anything
    /// was appended since, so a closed producer leaves its partitions within
    /// the limits and no trim runs on after it.
    async fn final_trim(&mut self) {
        let deadline = Instant::now() + FINAL_TRIM_TIMEOUT;
        if let Some(mut task) = self.trim_task.take() {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
            }
        }
        if !self.appended_since_trim {
            return;
        }
        if let Some(trim) = self.trim_job() {
            let _ = tokio::time::timeout_at(deadline, trim).await;
        }
    }
}
