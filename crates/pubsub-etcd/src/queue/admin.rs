//! Queue administration: counters, listing, deletion and reset of a
//! queue's stored state.

use std::collections::BTreeSet;

use etcd_client::GetOptions;

use super::snapshot::read_snapshot;
use super::state::State;
use super::{QueueReset, QueueStats};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::partition::Partition;
use crate::record::now_millis;
use crate::topic::{topic_arc, validate_group_name};

impl Client {
    /// Running workers and pending, in-flight, redelivered and
    /// dead-lettered counts of a queue, from one read of its state and the
    /// partition heads.
    ///
    /// # Errors
    /// [`Error::InvalidGroupName`], [`Error::TopicNotFound`], [`Error::Corrupt`]
    /// naming a queue key whose value is not a valid state, and etcd errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only reads.
    pub async fn queue_stats(&self, topic: &str, name: &str) -> Result<QueueStats> {
        validate_group_name(name)?;
        let info = self.topic(topic).await?;
        let snapshot = read_snapshot(self, &info, name).await?;
        let now = now_millis();
        let topic = topic_arc(topic);
        let mut stats = QueueStats {
            workers: snapshot.live as u64,
            ..QueueStats::default()
        };
        for (partition, head) in snapshot.heads.iter().enumerate() {
            let mut state = snapshot.effective(partition as u32);
            state.expire(now);
            stats.pending += state.pending_count() + head.saturating_sub(state.next);
            stats.in_flight += state.in_flight();
            stats.redelivered = stats.redelivered.saturating_add(state.redelivered);
            stats.expired = stats.expired.saturating_add(state.expired);
            stats.dead_lettered = stats.dead_lettered.saturating_add(state.dead_lettered);
            stats.terminated = stats.terminated.saturating_add(state.terminated);
            let low = state.low_watermark();
            if low < *head {
                let part = Partition::new(topic.clone(), info.incarnation, partition as u32);
                let page = fetch_partition(self, &part, low, 1, Cut::Exact).await?;
                if let Some(m) = page.messages.first() {
                    let oldest = stats.oldest_unsettled_ms.get_or_insert(m.timestamp);
                    *oldest = (*oldest).min(m.timestamp);
                }
            }
        }
        Ok(stats)
    }

    /// The queues that have state on `topic`, in name order.
    ///
    /// # Errors
    /// etcd errors.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only reads.
    pub async fn list_queues(&self, topic: &str) -> Result<Vec<String>> {
        let prefix = self.keys.topic_queues_prefix(topic);
        let response = self
            .read(
                "list queues",
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let names: BTreeSet<String> = response
            .kvs()
            .iter()
            .filter_map(|kv| self.keys.queue_of(topic, kv.key()))
            .map(str::to_string)
            .collect();
        Ok(names.into_iter().collect())
    }

    /// Deletes a queue's state: a worker joining later starts from the
    /// earliest stored message.
    ///
    /// # Errors
    /// [`Error::InvalidGroupName`] and etcd errors.
    ///
    /// # Cancel safety
    /// One etcd delete: a dropped call has deleted everything or nothing.
    pub async fn delete_queue(&self, topic: &str, name: &str) -> Result<()> {
        validate_group_name(name)?;
        let prefix = self.keys.queue_prefix(topic, name);
        self.timed(
            "delete queue",
            self.kv.clone().delete(
                prefix.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        Ok(())
    }

    /// Moves a queue to `to`, dropping its leases, pending redeliveries and
    /// counters. Workers still running keep the jobs they hold; their acks
    /// and nacks then change nothing, so stop them first.
    ///
    /// # Errors
    /// [`Error::InvalidGroupName`], [`Error::TopicNotFound`] and etcd errors; a
    /// failure part-way leaves some partitions reset and others not:
    /// run it again.
    ///
    /// # Cancel safety
    /// As on error: a dropped call may have reset some partitions only.
    pub async fn reset_queue(&self, topic: &str, name: &str, to: QueueReset) -> Result<()> {
        validate_group_name(name)?;
        let info = self.topic(topic).await?;
        if to == QueueReset::Earliest {
            return self.delete_queue(topic, name).await;
        }
        let heads = self
            .next_offsets(&info, &(0..info.partitions).collect::<Vec<_>>())
            .await?;
        self.timed(
            "reset queue",
            self.kv.clone().delete(
                self.keys.queue_settled_prefix(topic, name),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
        for (partition, head) in heads {
            let key = self.keys.queue_partition(topic, name, partition);
            let state = State::fresh(info.incarnation, head);
            let value =
                serde_json::to_vec(&state).map_err(|e| Error::InvalidConfig(e.to_string()))?;
            self.timed("reset queue", self.kv.clone().put(key, value, None))
                .await?;
        }
        Ok(())
    }
}
