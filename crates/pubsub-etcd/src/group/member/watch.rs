//! What a member sees of its group: the membership and ownership watch
//! (and the read it starts from), and whether etcd still answers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::{Member, Owner};
use crate::error::Result;
use crate::group::state::{Event, MemberState, Notice};
use crate::keys::{prefix_end, Keys};

impl Member {
    /// Reads the members and owners, then watches them from that revision.
    pub(super) async fn relist(&mut self) -> Result<()> {
        let members = self.members_prefix();
        let owners = self.owners_prefix();
        let txn = Txn::new().and_then([
            TxnOp::get(
                members.clone(),
                Some(GetOptions::new().with_range(prefix_end(&members))),
            ),
            TxnOp::get(
                owners.clone(),
                Some(GetOptions::new().with_range(prefix_end(&owners))),
            ),
        ]);
        let response = self
            .client
            .timed("read group", self.client.kv.clone().txn(txn))
            .await?;
        self.shared.heard();
        let revision = response.header().map_or(0, |h| h.revision());
        let mut gets = response.op_responses().into_iter();
        self.members.clear();
        self.owners.clear();
        if let Some(TxnOpResponse::Get(get)) = gets.next() {
            for kv in get.kvs() {
                if live_member(kv) {
                    self.members
                        .insert(String::from_utf8_lossy(&kv.key()[members.len()..]).into_owned());
                }
            }
        }
        if let Some(TxnOpResponse::Get(get)) = gets.next() {
            for kv in get.kvs() {
                if let Some(p) = Keys::trailing_number(kv.key()) {
                    self.owners.insert(p as u32, Owner::of(kv));
                }
            }
        }
        // Two watches on one stream rather than one over the group: the
        // group's `offsets/` sit between them, and a watch over it would
        // wake every member on every commit of any member.
        let from = |prefix: &str| {
            WatchOptions::new()
                .with_range(prefix_end(prefix))
                .with_start_revision(revision + 1)
        };
        let owners_options = from(&owners);
        let mut watch = self
            .client
            .timed(
                "watch group members",
                self.client
                    .watch
                    .clone()
                    .watch(members.clone(), Some(from(&members))),
            )
            .await?;
        self.client
            .timed(
                "watch group owners",
                watch.watch(owners, Some(owners_options)),
            )
            .await?;
        self.watch = Some(watch);
        Ok(())
    }

    /// Asks etcd for a sign of life on the membership watch when the lease
    /// renewals alone (every TTL/3) are too far apart to tell an outage
    /// from silence within the request timeout; the answer is a watch
    /// message. Costs nothing while renewals come often enough.
    pub(super) async fn probe(&mut self) {
        if self.shared.silent_for() < self.client.request_timeout / 2 {
            return;
        }
        if let Some(watch) = self.watch.as_mut() {
            // A broken stream shows as a watch error, handled there.
            let _ = watch.request_progress().await;
        }
    }

    /// Applies watched changes to the member and owner views; an owner key
    /// of ours that disappeared means that partition was lost.
    pub(super) fn apply(&mut self, response: &etcd_client::WatchResponse) {
        let members = self.members_prefix();
        let owners = self.owners_prefix();
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let put = event.event_type() == EventType::Put;
            if let Some(id) = key.strip_prefix(&members) {
                if put && live_member(kv) {
                    self.members.insert(id.to_string());
                } else {
                    self.members.remove(id);
                }
            } else if key.starts_with(&owners) {
                let Some(p) = Keys::trailing_number(kv.key()) else {
                    continue;
                };
                let p = p as u32;
                if put {
                    self.owners.insert(p, Owner::of(kv));
                } else {
                    self.owners.remove(&p);
                    if let Some(claim) = self.shared.claim(p) {
                        if kv.mod_revision() > claim.owner_revision() {
                            self.drop_partitions(&[p]);
                            self.lost.push(p);
                        }
                    }
                }
            }
        }
    }
}

/// A member key counts only under a lease: one without (written by hand or
/// by a tool) belongs to no live process, and would take a share of the
/// partitions that nobody reads.
fn live_member(kv: &etcd_client::KeyValue) -> bool {
    if kv.lease() == 0 {
        tracing::warn!(
            key = %String::from_utf8_lossy(kv.key()),
            "ignoring a member key without a lease: no live member holds it (`group delete` removes it)"
        );
        return false;
    }
    true
}

/// Sends `Disconnected` once etcd has not answered the member (see
/// [`MemberState::silent_for`]) for `timeout`, and `Reconnected` when it
/// answers again. A task of its own, so a member request stuck on the
/// outage cannot delay the news; each send is bounded by the TTL, as for
/// every notice.
pub(super) async fn watchdog(
    shared: Arc<MemberState>,
    events: mpsc::Sender<Notice>,
    timeout: Duration,
    ttl: Duration,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(timeout));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut disconnected = false;
    loop {
        tick.tick().await;
        let silent = shared.silent_for();
        let event = if !disconnected && silent >= timeout {
            // The last answer; the epoch if the clock says it predates it.
            let since = SystemTime::now()
                .checked_sub(silent)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            tracing::warn!(?silent, "etcd does not answer the group member");
            Event::Disconnected { since }
        } else if disconnected && silent < timeout {
            tracing::info!("etcd answers the group member again");
            Event::Reconnected
        } else {
            continue;
        };
        disconnected = !disconnected;
        let notice = Notice { event, ack: None };
        match tokio::time::timeout(ttl, events.send(notice)).await {
            Ok(Ok(())) => {}
            // The consumer is gone.
            Ok(Err(_)) => return,
            Err(_) => tracing::debug!("the application did not take a connection event in time"),
        }
    }
}
