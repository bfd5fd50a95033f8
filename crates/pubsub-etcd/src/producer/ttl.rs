//! Records with a time to live: one etcd lease per second of deadlines,
//! shared by every batch of a producer whose records fall in it.

use std::collections::HashMap;

use crate::client::Client;
use crate::error::Result;
use crate::record::{self, pb};

/// Width of a deadline bucket: records whose deadlines fall in one bucket
/// share one etcd lease (per producer) and may share a batch.
const TTL_BUCKET_MS: i64 = 1000;
/// A cached lease is reused only while it has at least this long to live.
const LEASE_MARGIN_MS: i64 = 2000;

/// One etcd lease per deadline bucket, granted on first use and shared by
/// every batch of this producer whose records' deadlines fall in the bucket:
/// one grant per second of distinct deadlines, not one per message.
#[derive(Debug, Default)]
pub(super) struct LeaseCache {
    /// Bucket -> (lease id, when the lease ends in ms since the epoch).
    leases: tokio::sync::Mutex<HashMap<i64, (i64, i64)>>,
}

impl LeaseCache {
    /// The lease for records whose deadlines fall in `bucket`. It ends a few
    /// seconds after the bucket (readers skip expired records exactly by
    /// their own deadline; the lease only reclaims the space).
    pub(super) async fn lease_for(&self, client: &Client, bucket: i64) -> Result<i64> {
        let now = record::now_millis();
        {
            let mut leases = self.leases.lock().await;
            leases.retain(|_, (_, ends)| *ends > now);
            if let Some(&(id, ends)) = leases.get(&bucket) {
                if ends > now.saturating_add(LEASE_MARGIN_MS) {
                    return Ok(id);
                }
            }
        }
        // Granted without holding the lock, so partitions are not queued
        // behind one slow grant. Two workers may grant for one bucket at
        // once: the first stored wins; the other lease expires unused.
        let bucket_end = bucket.saturating_mul(TTL_BUCKET_MS);
        let ttl_secs = bucket_end.saturating_sub(now).max(0) / 1000 + 4;
        let granted = client
            .timed(
                "grant lease",
                client.etcd.clone().lease_grant(ttl_secs, None),
            )
            .await?;
        let ends = now.saturating_add(granted.ttl().saturating_mul(1000));
        let mut leases = self.leases.lock().await;
        Ok(leases.entry(bucket).or_insert((granted.id(), ends)).0)
    }
}

/// The deadline bucket of a record with a time to live.
pub(super) fn ttl_bucket(record: &pb::Record) -> Option<i64> {
    (record.expires_at_ms != 0)
        .then(|| record.expires_at_ms.saturating_add(TTL_BUCKET_MS - 1) / TTL_BUCKET_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_buckets_are_one_second_wide() {
        let at = |ms: i64| pb::Record {
            expires_at_ms: ms,
            ..pb::Record::default()
        };
        assert_eq!(ttl_bucket(&at(0)), None);
        assert_eq!(ttl_bucket(&at(1)), Some(1));
        assert_eq!(ttl_bucket(&at(1000)), Some(1));
        assert_eq!(ttl_bucket(&at(1001)), Some(2));
        assert_eq!(ttl_bucket(&at(1999)), Some(2));
    }
}
