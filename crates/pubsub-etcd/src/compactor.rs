//! Automatic etcd history compaction, owned by the library: every client
//! (unless built with [`AutoCompaction::Disabled`]) runs one background task
//! that takes part in compacting etcd's history, so that the overwritten
//! heads and deleted batches this library leaves behind do not pile up in
//! etcd until an operator compacts.
//!
//! The protocol is Kubernetes' (its API servers compact etcd the same way),
//! with a load-adaptive trigger. One cluster-wide key
//! ([`Keys::COMPACTION`]) holds the revision recorded by the last cycle.
//! A cycle is due once that key has been unchanged for one interval as seen
//! by this client, or once the history since the recorded revision exceeds a
//! revision or byte budget. The client that wins a compare-and-swap on the
//! key's mod revision writes the current revision into it and compacts to
//! the revision the key held, the one recorded one cycle earlier. So at most
//! one compaction happens per cycle across every client of the cluster, and
//! etcd never loses history a watcher less than one cycle behind still needs.
//!
//! The task is stopped by [`Client::close`] or ends when the last clone of
//! its client is dropped.

use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::record::now_millis;
use crate::telemetry;

/// Whether a client takes part in compacting etcd's history, and when a
/// compaction is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AutoCompaction {
    /// Take no part: for an etcd that is compacted already (etcd's
    /// `--auto-compaction-*` flags, or Kubernetes' API server).
    Disabled,
    /// Compact once per `interval` across the cluster, or sooner once the
    /// history since the last compaction holds `max_revisions` revisions or
    /// has grown etcd's in-use database size by `max_history_bytes`.
    Enabled {
        interval: Duration,
        max_revisions: i64,
        max_history_bytes: i64,
    },
}

impl AutoCompaction {
    /// Default interval, as Kubernetes' API server compacts etcd.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
    /// Default revision budget (see DESIGN.md for how it was chosen).
    pub const DEFAULT_MAX_REVISIONS: i64 = 10_000;
    /// Default byte budget (see DESIGN.md for how it was chosen).
    pub const DEFAULT_MAX_HISTORY_BYTES: i64 = 128 * 1024 * 1024;

    /// Enabled with this interval and the default budgets.
    pub fn every(interval: Duration) -> Self {
        AutoCompaction::Enabled {
            interval,
            max_revisions: Self::DEFAULT_MAX_REVISIONS,
            max_history_bytes: Self::DEFAULT_MAX_HISTORY_BYTES,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            AutoCompaction::Disabled => Ok(()),
            AutoCompaction::Enabled {
                interval,
                max_revisions,
                max_history_bytes,
            } => {
                if interval.is_zero() || max_revisions <= 0 || max_history_bytes <= 0 {
                    return Err(Error::InvalidConfig(format!(
                        "auto compaction needs a positive interval and budgets, got {self:?}"
                    )));
                }
                Ok(())
            }
        }
    }
}

impl Default for AutoCompaction {
    fn default() -> Self {
        AutoCompaction::every(Self::DEFAULT_INTERVAL)
    }
}

/// The last compaction cycle, as recorded in the coordinating key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CompactionRecord {
    /// The revision recorded by this cycle: the next cycle compacts to it.
    pub revision: i64,
    /// The revision this cycle compacted etcd's history to (0: none, the
    /// first cycle only records).
    pub compacted: i64,
    /// When the cycle ran, ms since the epoch (the winner's clock).
    pub at_ms: i64,
    /// The id of the client that won the cycle.
    pub by: String,
}

/// Parses the coordinating key's value; garbage is an error naming the key.
pub(crate) fn parse_record(value: &[u8]) -> Result<CompactionRecord> {
    let record: CompactionRecord = serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: Keys::COMPACTION.to_string(),
        reason: e.to_string(),
    })?;
    if record.revision <= 0 || record.compacted < 0 || record.compacted > record.revision {
        return Err(Error::Corrupt {
            key: Keys::COMPACTION.to_string(),
            reason: format!(
                "revisions out of order: recorded {}, compacted {}",
                record.revision, record.compacted
            ),
        });
    }
    Ok(record)
}

/// The background task's handle, shared by every clone of a [`Client`].
#[derive(Debug)]
pub(crate) struct Compactor {
    /// Dropped with the last client clone, which ends the task.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Compactor {
    /// No task (compaction disabled, or the client is still connecting).
    pub(crate) fn idle() -> Self {
        Compactor {
            stop: watch::channel(false).0,
            task: Mutex::new(None),
        }
    }

    /// Starts the task for `client`, which must not hold this handle (it
    /// would keep itself alive).
    pub(crate) fn spawn(client: Client, policy: AutoCompaction) -> Self {
        let AutoCompaction::Enabled {
            interval,
            max_revisions,
            max_history_bytes,
        } = policy
        else {
            return Compactor::idle();
        };
        let (stop, stopped) = watch::channel(false);
        let task = Participant {
            client,
            interval,
            max_revisions,
            max_history_bytes,
            id: format!("{:016x}", rand::random::<u64>()),
            seen: None,
            refused_logged: false,
            unreadable_logged: false,
        };
        Compactor {
            stop,
            task: Mutex::new(Some(tokio::spawn(task.run(stopped)))),
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.task
            .lock()
            .map(|t| t.as_ref().is_some_and(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// Stops the task and waits until it has ended.
    pub(crate) async fn stop(&self) {
        // Ignored: without receivers the task has ended already.
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            // A panic inside the task has nothing left to clean up.
            let _ = task.await;
        }
    }
}

/// What one client knows of the coordinating key between cycles.
#[derive(Debug)]
struct Seen {
    mod_revision: i64,
    /// When this client first saw this version: the interval counts from
    /// here, on this client's monotonic clock, so clock skew between
    /// machines cannot make a cycle early.
    since: Instant,
    /// The smallest in-use database size seen during this version: the
    /// size right after the last compaction took effect.
    min_in_use: Option<i64>,
}

/// The compaction side of one client.
struct Participant {
    client: Client,
    interval: Duration,
    max_revisions: i64,
    max_history_bytes: i64,
    /// Names this client in the records it writes.
    id: String,
    seen: Option<Seen>,
    refused_logged: bool,
    unreadable_logged: bool,
}

/// What a cycle attempt leads to.
enum Next {
    /// Check again after the usual tick.
    Tick,
    /// etcd refused: try again only after an interval (RBAC may change).
    Interval,
}

impl Participant {
    /// How often a client checks whether a cycle is due: often enough that
    /// a budget is never overshot by much, rarely enough to cost etcd
    /// nothing measurable (one small read and one status per client).
    fn tick(&self) -> Duration {
        (self.interval / 10).min(Duration::from_secs(1))
    }

    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let mut wait = self.tick();
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let next = tokio::select! {
                _ = stopped.changed() => return,
                next = self.cycle() => next,
            };
            wait = match next {
                Next::Tick => self.tick(),
                Next::Interval => self.interval,
            };
        }
    }

    #[tracing::instrument(level = "debug", name = "compaction", skip_all)]
    async fn cycle(&mut self) -> Next {
        match self.try_cycle().await {
            Ok(()) => Next::Tick,
            Err(e) if is_permission_denied(&e) => {
                if !self.refused_logged {
                    self.refused_logged = true;
                    tracing::warn!(
                        namespace = self.client.namespace(),
                        key = Keys::COMPACTION,
                        error = %e,
                        "etcd refused automatic history compaction to this client; \
                         it carries on without (grant the key and compaction, or \
                         compact etcd another way)"
                    );
                }
                Next::Interval
            }
            Err(e @ Error::Corrupt { .. }) => {
                if !self.unreadable_logged {
                    self.unreadable_logged = true;
                    tracing::warn!(error = %e, "automatic history compaction stays out: the coordinating key is unreadable (delete it to start afresh)");
                }
                Next::Interval
            }
            Err(e) => {
                tracing::debug!(error = %e, "automatic history compaction: cycle failed");
                Next::Tick
            }
        }
    }

    async fn try_cycle(&mut self) -> Result<()> {
        let key = Keys::COMPACTION;
        let response = self
            .client
            .timed("read compaction key", self.client.kv.clone().get(key, None))
            .await?;
        let current = response.header().map_or(0, |h| h.revision());
        let Some(kv) = response.kvs().first() else {
            // The first cycle ever: record a revision for the next to
            // compact to. Losing the race to create it is just as good.
            let record = self.record(current, 0);
            let txn = Txn::new()
                .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, record, None)]);
            self.client
                .timed("record compaction", self.client.kv.clone().txn(txn))
                .await?;
            return Ok(());
        };
        let recorded = parse_record(kv.value())?;
        self.unreadable_logged = false;
        let mod_revision = kv.mod_revision();
        if self.seen.as_ref().map(|s| s.mod_revision) != Some(mod_revision) {
            self.seen = Some(Seen {
                mod_revision,
                since: Instant::now(),
                min_in_use: None,
            });
        }
        let in_use = self.in_use().await;
        let seen = self.seen.as_mut().expect("set above");
        if let Some(in_use) = in_use {
            seen.min_in_use = Some(seen.min_in_use.map_or(in_use, |m| m.min(in_use)));
        }
        let history_bytes = match (in_use, seen.min_in_use) {
            (Some(now), Some(min)) => now - min,
            _ => 0,
        };
        let due = seen.since.elapsed() >= self.interval
            || current - recorded.revision >= self.max_revisions
            || history_bytes >= self.max_history_bytes;
        if !due {
            return Ok(());
        }
        // The revision recorded one cycle earlier, never anything newer; a
        // recorded revision above the current one (an etcd restored from an
        // older backup) is not compacted to.
        let target = recorded.revision;
        let compact = target <= current;
        let record = self.record(current, if compact { target } else { 0 });
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, record, None)]);
        let won = self
            .client
            .timed("record compaction", self.client.kv.clone().txn(txn))
            .await?
            .succeeded();
        if !won || !compact {
            return Ok(());
        }
        match self
            .client
            .timed("compact", self.client.kv.clone().compact(target, None))
            .await
        {
            Ok(_) => {
                telemetry::history_compacted();
                tracing::debug!(revision = target, "compacted etcd history");
                Ok(())
            }
            // Someone (an operator, etcd's own auto-compaction) compacted
            // further already.
            Err(Error::Etcd { detail, .. }) if detail.contains("has been compacted") => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn record(&self, revision: i64, compacted: i64) -> String {
        let record = CompactionRecord {
            revision,
            compacted,
            at_ms: now_millis(),
            by: self.id.clone(),
        };
        serde_json::to_string(&record).expect("a record serialises")
    }

    /// The in-use database size of the member this client's request lands
    /// on; `None` when etcd does not tell (the byte budget then waits for
    /// the next answer, the other triggers still work).
    async fn in_use(&self) -> Option<i64> {
        let mut maintenance = self.client.etcd.maintenance_client();
        match self.client.timed("status", maintenance.status()).await {
            Ok(status) => Some(status.raft_used_db_size()),
            Err(e) => {
                tracing::debug!(error = %e, "automatic history compaction: status failed");
                None
            }
        }
    }
}

fn is_permission_denied(error: &Error) -> bool {
    matches!(error, Error::Etcd { source, .. }
        if matches!(source.inner(), etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::PermissionDenied))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_named() {
        let record = CompactionRecord {
            revision: 10,
            compacted: 4,
            at_ms: 1,
            by: "a".into(),
        };
        let value = serde_json::to_vec(&record).unwrap();
        assert_eq!(parse_record(&value).unwrap(), record);
        let e = parse_record(b"not json").unwrap_err();
        assert!(e.to_string().contains(Keys::COMPACTION), "{e}");
        let e = parse_record(br#"{"revision":3,"compacted":5,"at_ms":0,"by":""}"#).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
    }

    #[test]
    fn budgets_must_be_positive() {
        assert!(AutoCompaction::default().validate().is_ok());
        assert!(AutoCompaction::Disabled.validate().is_ok());
        assert!(AutoCompaction::every(Duration::ZERO).validate().is_err());
        let zero = AutoCompaction::Enabled {
            interval: Duration::from_secs(1),
            max_revisions: 0,
            max_history_bytes: 1,
        };
        assert!(zero.validate().is_err());
    }
}
