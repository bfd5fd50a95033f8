//! A running worker's presence key: put under the queue on an etcd lease
//! of the worker's own and kept alive while it runs, so lease rounds share
//! fresh offsets among every worker that is there, not only among those
//! that hold leases (a worker that arrives late would otherwise find the
//! whole backlog leased out to the first ones).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::error::Result;

/// TTL of the presence lease: how long a worker that died without closing
/// still counts, which only makes the others take smaller leases.
const PRESENCE_TTL: Duration = Duration::from_secs(10);
/// Pause before announcing again after the lease could not be granted or
/// kept alive (etcd unreachable, or the lease expired meanwhile).
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The task that keeps a worker's presence key alive.
pub(super) struct Presence {
    task: JoinHandle<()>,
    /// The current lease (0 before the first grant).
    lease: Arc<AtomicI64>,
}

impl Presence {
    /// Starts announcing `worker` under `queue` of `topic`.
    pub(super) fn start(client: Client, topic: &str, queue: &str, worker: &str) -> Presence {
        let key = client.keys.queue_worker(topic, queue, worker);
        let lease = Arc::new(AtomicI64::new(0));
        let task = tokio::spawn(keep_present(client, key, lease.clone()));
        Presence { task, lease }
    }

    /// Stops renewing and revokes the lease, which deletes the key at once;
    /// if the revoke fails the key goes when the lease expires.
    pub(super) async fn stop(self, client: &Client) {
        self.task.abort();
        let _ = self.task.await;
        let lease = self.lease.load(Ordering::Relaxed);
        if lease != 0 {
            let mut leases = client.etcd.lease_client();
            if let Err(error) = client
                .timed("revoke worker lease", leases.revoke(lease))
                .await
            {
                tracing::debug!(%error, lease, "revoking a queue worker's lease failed");
            }
        }
    }
}

/// Announces the worker and renews its lease until aborted, announcing it
/// again under a new lease whenever the old one is lost.
async fn keep_present(client: Client, key: String, current: Arc<AtomicI64>) {
    loop {
        match announce(&client, &key).await {
            Ok(lease) => {
                current.store(lease, Ordering::Relaxed);
                renew(&client, lease).await;
            }
            Err(error) => tracing::debug!(%error, %key, "announcing a queue worker failed"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn announce(client: &Client, key: &str) -> Result<i64> {
    let ttl = PRESENCE_TTL.as_secs() as i64;
    let mut leases = client.etcd.lease_client();
    let lease = client
        .timed("grant worker lease", leases.grant(ttl, None))
        .await?
        .id();
    let value = format!("{{\"pid\":{}}}", std::process::id());
    let options = PutOptions::new().with_lease(lease);
    let mut kv = client.kv.clone();
    client
        .timed("announce queue worker", kv.put(key, value, Some(options)))
        .await?;
    Ok(lease)
}

/// Renews `lease` every third of its TTL; returns once a renewal fails or
/// etcd no longer has the lease.
async fn renew(client: &Client, lease: i64) {
    let every = PRESENCE_TTL / 3;
    let mut lease_client = client.etcd.lease_client();
    let Ok((mut keeper, mut responses)) = client
        .timed("keep worker lease alive", lease_client.keep_alive(lease))
        .await
    else {
        return;
    };
    loop {
        let renewed = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {}
            other => {
                tracing::debug!(lease, ?other, "queue worker lease renewal ended");
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}
