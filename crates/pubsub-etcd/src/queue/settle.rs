//! A queue worker's settling: the jobs' settle operations coalesced into
//! one write of the worker's settled key per flush, and what the partition
//! states already reflect pruned from it. It runs in a task of its own, so
//! an ack is stored within `flush_interval` even while the worker's lease
//! round waits on a contended partition state. Also the deletion of the
//! settled keys that workers which are gone left behind.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use super::snapshot::{
    backoff, cas, read_snapshot, Cas, Settlement, Snapshot, CAS_PATIENCE, MAX_STATE_BYTES,
};
use super::state::{Op, Settled, State};
use super::worker::{ERROR_PAUSE, FLUSH_OPS};
use super::{Cmd, FlushRequest};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::record::now_millis;
use crate::topic::TopicInfo;

/// How long a settled key every state reflects stays unchanged before
/// another worker deletes it as left behind by a worker that is gone.
const STALE_SETTLED: Duration = Duration::from_secs(60);

/// Attempts to store a worker's settled key while etcd does not answer.
const STORE_ATTEMPTS: u32 = 5;

/// What the settling task and the lease rounds share. The lock is never
/// held across an await.
#[derive(Debug, Default)]
struct Settling {
    /// Operations not stored yet.
    buffered: Vec<Cmd>,
    /// This worker's operations stored in its settled key that some
    /// partition state may not reflect yet.
    unmerged: BTreeMap<u32, Settled>,
    /// `unmerged` shrank since it was last stored.
    rewrite: bool,
    /// Why the last flush failed, until one succeeds.
    failure: Option<Error>,
}

/// One worker's handle on its settled key; clones share it.
#[derive(Debug, Clone)]
pub(super) struct Settler {
    client: Client,
    info: TopicInfo,
    name: String,
    worker: String,
    shared: Arc<Mutex<Settling>>,
}

impl Settler {
    pub(super) fn new(client: Client, info: TopicInfo, name: String, worker: String) -> Settler {
        Settler {
            client,
            info,
            name,
            worker,
            shared: Arc::default(),
        }
    }

    /// Deletes the settled keys of workers that are gone: unchanged for
    /// [`STALE_SETTLED`] and reflected in every partition state. Compared
    /// on their revision, so a worker that writes again keeps its key.
    pub(super) async fn clean_stale(&self, snapshot: &Snapshot) {
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

    fn lock(&self) -> MutexGuard<'_, Settling> {
        // A panic elsewhere cannot leave the buffers half-changed: every
        // critical section is a push, a prune or a swap.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an operation for the next flush, without anyone waiting for it.
    pub(super) fn push(&self, partition: u32, op: Op) {
        self.lock().buffered.push(Cmd {
            partition,
            op,
            done: None,
        });
    }

    /// Drops from the unmerged operations what the state of `partition`
    /// reflects.
    pub(super) fn prune(&self, partition: u32, state: &State) {
        let mut settling = self.lock();
        if let Some(settled) = settling.unmerged.get_mut(&partition) {
            if settled.prune(&self.worker, state) {
                if settled.is_empty() {
                    settling.unmerged.remove(&partition);
                }
                settling.rewrite = true;
            }
        }
    }

    /// Receives the jobs' operations and flushes them every `interval` (or
    /// at [`FLUSH_OPS`], or when `flushes` asks) until `stop`; `nacked` is
    /// told when a flush stored a nack, which may make work due at once that
    /// only this worker is woken for.
    pub(super) async fn run(
        &self,
        ops: &mut mpsc::Receiver<Cmd>,
        flushes: &mut mpsc::Receiver<FlushRequest>,
        stop: &mut oneshot::Receiver<()>,
        interval: Duration,
        nacked: &Notify,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = tokio::select! {
                biased;
                _ = &mut *stop => break,
                // Before `ops`: while acks keep coming, `ops` is never
                // empty, and a flush asked for must not wait for a pause.
                Some(request) = flushes.recv() => {
                    // What the caller handed over before asking is queued
                    // in `ops` by now.
                    let mut settling = self.lock();
                    while let Ok(cmd) = ops.try_recv() {
                        settling.buffered.push(cmd);
                    }
                    Some(request)
                }
                Some(cmd) = ops.recv() => {
                    let mut settling = self.lock();
                    settling.buffered.push(cmd);
                    if settling.buffered.len() < FLUSH_OPS {
                        continue;
                    }
                    None
                }
                _ = tick.tick() => None,
            };
            let flushed = self.flush().await;
            let failed = flushed.is_err();
            if matches!(flushed, Ok(true)) {
                nacked.notify_one();
            }
            if let Some(request) = request {
                let _ = request.send(flushed.map(drop));
            }
            if failed {
                // Past FLUSH_OPS every new operation would otherwise start
                // another flush at once while etcd keeps refusing them.
                tokio::select! {
                    biased;
                    _ = &mut *stop => break,
                    _ = tokio::time::sleep(ERROR_PAUSE) => {}
                }
            }
        }
    }

    /// Settle operations not stored yet (only flushes that keep failing let
    /// them pile up), and why the last flush failed.
    pub(super) fn unstored(&self) -> (usize, Option<Error>) {
        let settling = self.lock();
        (settling.buffered.len(), settling.failure.clone())
    }

    /// Stores what is left once the lease rounds stopped, then merges this
    /// worker's operations into the partition states itself and deletes its
    /// settled key, so a closed worker leaves nothing behind.
    pub(super) async fn finish(&self, ops: &mut mpsc::Receiver<Cmd>) {
        ops.close();
        while let Ok(cmd) = ops.try_recv() {
            self.lock().buffered.push(cmd);
        }
        // A failure is reported by the merge below, or by the workers
        // that merge what this one left.
        let _ = self.flush().await;
        if self.lock().unmerged.is_empty() {
            return;
        }
        if let Err(error) = self.merge_own().await {
            tracing::debug!(%error, queue = %self.name, "merging settled operations on close failed; other workers will");
        }
    }

    /// Stores the buffered settle operations with the unmerged ones in this
    /// worker's settled key: one plain write per flush, whatever the number
    /// of partitions, that no other worker contends for. True when a nack
    /// was among them.
    async fn flush(&self) -> Result<bool> {
        let (cmds, next) = {
            let mut settling = self.lock();
            if settling.buffered.is_empty() && !settling.rewrite {
                return Ok(false);
            }
            let cmds = std::mem::take(&mut settling.buffered);
            let mut next = settling.unmerged.clone();
            for cmd in &cmds {
                next.entry(cmd.partition).or_default().push(cmd.op.clone());
            }
            next.retain(|_, s| !s.is_empty());
            (cmds, next)
        };
        let nacked = cmds.iter().any(|c| matches!(c.op, Op::Nack { .. }));
        let result = self.store(&next).await;
        if result.is_ok() {
            // A prune that ran during the store is undone here; the next
            // lease round prunes again (settled operations are idempotent,
            // so a longer settled key only costs bytes).
            let mut settling = self.lock();
            settling.unmerged = next;
            settling.rewrite = false;
            settling.failure = None;
        } else {
            // Stored by nobody: the operations without a waiter (gaps,
            // releases, `ack_nowait`s, acks whose caller stopped waiting)
            // go with the next flush; waiters get the error.
            let mut settling = self.lock();
            settling.failure = result.clone().err();
            let unwaited = |c: &&Cmd| c.done.as_ref().is_none_or(|done| done.is_closed());
            settling
                .buffered
                .extend(cmds.iter().filter(unwaited).map(|c| Cmd {
                    partition: c.partition,
                    op: c.op.clone(),
                    done: None,
                }));
        }
        for cmd in cmds {
            if let Some(done) = cmd.done {
                let _ = done.send(result.clone());
            }
        }
        result.map(|()| nacked)
    }

    /// Writes (or, when empty, deletes) this worker's settled key. Both are
    /// idempotent, so a write whose outcome is unknown is simply repeated.
    async fn store(&self, partitions: &BTreeMap<u32, Settled>) -> Result<()> {
        let key = self
            .client
            .keys
            .queue_settled(&self.info.name, &self.name, &self.worker);
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

    /// Writes this worker's unmerged operations into the partition states
    /// and stores what is left (nothing, when every CAS went through).
    async fn merge_own(&self) -> Result<()> {
        // The topic may have grown since this worker joined.
        let info = match self.client.topic(&self.info.name).await {
            Ok(info) if info.incarnation == self.info.incarnation => info,
            _ => self.info.clone(),
        };
        let snapshot = read_snapshot(&self.client, &info, &self.name).await?;
        let partitions: Vec<u32> = self.lock().unmerged.keys().copied().collect();
        for partition in partitions {
            let Some(slot) = snapshot.slots.get(partition as usize) else {
                continue;
            };
            let mut slot = slot.clone();
            let settled = snapshot.settled(partition);
            let key = self
                .client
                .keys
                .queue_partition(&info.name, &self.name, partition);
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
                match cas(&self.client, &info, &key, slot.revision, &state).await? {
                    Cas::Written(_) => {
                        slot.state = state;
                        break;
                    }
                    Cas::Lost(current) => slot = current,
                }
                if started.elapsed() >= CAS_PATIENCE {
                    return Err(Error::Contended {
                        topic: info.name.clone(),
                        partition,
                        waited: started.elapsed(),
                    });
                }
                lost += 1;
                backoff(lost).await;
            }
            self.prune(partition, &slot.state);
        }
        self.flush().await.map(drop)
    }
}
