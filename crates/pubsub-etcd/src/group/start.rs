//! Where reading a partition starts: the [`StartOffset`] policy, and how it
//! resolves to an offset against a partition's stored range now. Shared by
//! group members (a partition with no commit), admin resets and the
//! group-less [`crate::AssignedReader`].

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::topic::{topic_arc, TopicInfo};

/// Where a group starts reading a partition it has no committed offset for,
/// or where an admin reset puts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartOffset {
    /// The oldest message still stored (the default, so that nothing
    /// produced before the group's first member joined is skipped).
    #[default]
    Earliest,
    /// Only messages produced from now on.
    Latest,
    /// This offset (clamped to the partition's stored range).
    Offset(u64),
    /// The first message whose timestamp (ms since the epoch) is at least this.
    Timestamp(i64),
}

impl Client {
    /// The offset a [`StartOffset`] means on one partition of `topic` now
    /// (clamped to the stored range).
    ///
    /// # Errors
    ///
    /// [`Error::TopicNotFound`]; [`Error::PartitionOutOfRange`];
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer;
    /// [`Error::Corrupt`] for an unreadable partition head or batch.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn resolve_offset(
        &self,
        topic: &str,
        partition: u32,
        start: StartOffset,
    ) -> Result<u64> {
        let info = self.topic(topic).await?;
        check_partition(&info, partition)?;
        self.resolve_start(&info, partition, start).await
    }

    /// [`Client::resolve_offset`] for a topic already read.
    pub(crate) async fn resolve_start(
        &self,
        topic: &TopicInfo,
        partition: u32,
        start: StartOffset,
    ) -> Result<u64> {
        let bounds = self.partition_bounds(topic, partition).await?;
        Ok(match start {
            StartOffset::Earliest => bounds.0,
            StartOffset::Latest => bounds.1,
            StartOffset::Offset(o) => o.clamp(bounds.0, bounds.1),
            StartOffset::Timestamp(ts) => {
                // No time index: scan forward. Timestamps set by producers
                // need not be monotonic, so the first match wins.
                let name = topic_arc(&topic.name);
                let mut from = bounds.0;
                loop {
                    let page = fetch_partition(
                        self,
                        &name,
                        topic.incarnation,
                        partition,
                        from,
                        1000,
                        Cut::WholeBatches(4),
                    )
                    .await?;
                    if let Some(m) = page.messages.iter().find(|m| m.timestamp >= ts) {
                        break m.offset;
                    }
                    // Pages of only expired or deleted records still move
                    // on; only a read that advances nothing is the end.
                    if page.next_offset <= from || page.next_offset >= bounds.1 {
                        break bounds.1;
                    }
                    from = page.next_offset;
                }
            }
        })
    }

    /// Earliest stored and next offsets of one partition.
    pub(crate) async fn partition_bounds(
        &self,
        topic: &TopicInfo,
        partition: u32,
    ) -> Result<(u64, u64)> {
        let p = self.partition_info(topic, partition).await?;
        Ok((p.earliest, p.next))
    }
}

pub(crate) fn check_partition(topic: &TopicInfo, partition: u32) -> Result<()> {
    if partition >= topic.partitions {
        return Err(Error::PartitionOutOfRange {
            topic: topic.name.clone(),
            partition,
            partitions: topic.partitions,
        });
    }
    Ok(())
}
