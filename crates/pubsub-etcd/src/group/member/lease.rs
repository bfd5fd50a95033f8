//! The member's lease: granting it with the member key, keeping it alive
//! (which bounds how long the member may deliver and commit), and giving it
//! up when it is lost.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Member;
use crate::client::Client;
use crate::error::Result;
use crate::group::state::{Event, MemberState};

impl Member {
    /// Grants a lease, starts keeping it alive and puts the member key.
    pub(super) async fn register(&mut self) -> Result<()> {
        let ttl = self.config.session_ttl;
        let sent = Instant::now();
        let mut lease_client = self.client.etcd.lease_client();
        let grant = self
            .client
            .timed(
                "grant lease",
                lease_client.grant(ttl.as_secs() as i64, None),
            )
            .await?;
        self.lease = grant.id();
        self.shared
            .lease_renewed(sent + Duration::from_secs(grant.ttl().max(0) as u64));
        let key = self
            .client
            .keys
            .member(&self.name, &self.config.group, &self.member_id);
        let value = format!(
            "{{\"member\":\"{}\",\"pid\":{}}}",
            self.member_id,
            std::process::id()
        );
        self.client
            .timed(
                "register member",
                self.client.kv.clone().put(
                    key,
                    value,
                    Some(PutOptions::new().with_lease(self.lease)),
                ),
            )
            .await?;
        self.keepalive.abort();
        self.keepalive = tokio::spawn(keep_alive(
            self.client.clone(),
            self.lease,
            ttl,
            self.shared.clone(),
            self.lease_lost_tx.clone(),
        ));
        tracing::debug!(member = %self.member_id, lease = self.lease, "joined group");
        Ok(())
    }

    /// The lease expired (or may have): everything owned is lost. Tell the
    /// application and give up the old lease; the run loop joins again.
    pub(super) async fn lose_everything(&mut self) {
        let lost = self.shared.owned();
        tracing::warn!(member = %self.member_id, ?lost, "lease lost");
        self.revoking = None;
        self.drop_partitions(&lost);
        if !lost.is_empty() {
            self.notify(Event::Lost(lost), None).await;
        }
        self.keepalive.abort();
        let old = self.lease;
        let _ = self
            .client
            .timed("revoke lease", self.client.etcd.lease_client().revoke(old))
            .await;
        self.joined = false;
        self.watch = None;
    }

    /// Joins again under a new lease after losing the old one; the run loop
    /// retries on its next tick while etcd is unreachable, so closing the
    /// consumer is never blocked behind it.
    pub(super) async fn rejoin(&mut self) -> Result<()> {
        self.register().await?;
        self.relist().await?;
        self.joined = true;
        Ok(())
    }
}

/// Renews the lease every third of its TTL. Each renewal extends the
/// member's known validity to (time the request was sent + TTL), so a member
/// frozen past that instant stops delivering before anyone else can own its
/// partitions.
pub(super) async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    shared: Arc<MemberState>,
    lost: mpsc::Sender<i64>,
) {
    let every = ttl / 3;
    loop {
        let mut lease_client = client.etcd.lease_client();
        let (mut keeper, mut responses) = match client
            .timed("keep lease alive", lease_client.keep_alive(lease))
            .await
        {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(lease, %error, "lease keep-alive failed to start");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            let renewed = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(every.max(Duration::from_millis(500)), renewed).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {
                    shared.lease_renewed(sent + Duration::from_secs(response.ttl() as u64));
                }
                Ok(Ok(Some(_))) => {
                    // TTL 0: etcd no longer has the lease.
                    let _ = lost.try_send(lease);
                    return;
                }
                other => {
                    tracing::debug!(lease, ?other, "lease keep-alive interrupted");
                    break;
                }
            }
            tokio::time::sleep_until(sent + every).await;
        }
    }
}
