//! Shared test support, pulled into each integration test with `mod common;`.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod etcd_proc;
pub mod group;
pub mod ns;
pub mod proxy;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use etcd_proc::EtcdCluster;

/// Upper bound for any single library call in the tests: a call that takes
/// longer has hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than [`CALL_TIMEOUT`].
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CALL_TIMEOUT:?}"))
}

/// The wall clock in Unix milliseconds, the unit of record timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

/// The index of the member of a three-member cluster that currently
/// leads, by asking each member; fails the test if they do not agree
/// within 15 s.
pub async fn leader(cluster: &EtcdCluster) -> usize {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let mut ids = Vec::new();
            let mut leaders = HashSet::new();
            for endpoint in cluster.endpoints() {
                let Ok(mut etcd) = etcd_client::Client::connect([endpoint], None).await else {
                    break;
                };
                match etcd.status().await {
                    Ok(status) => {
                        ids.push(status.header().map_or(0, |h| h.member_id()));
                        leaders.insert(status.leader());
                    }
                    Err(_) => break,
                }
            }
            if ids.len() == 3 && leaders.len() == 1 {
                let leader = *leaders.iter().next().unwrap();
                if let Some(i) = ids.iter().position(|id| *id == leader) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the cluster did not agree on a leader")
}
