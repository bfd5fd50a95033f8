//! Consumer-group state in etcd that is not tied to a live member: committed
//! offsets, lag, and the admin operations on groups (list, describe, reset,
//! delete). Membership and ownership live in `member`.

pub(crate) mod assign;

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use serde::Serialize;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::keys::{prefix_end, Keys};
use crate::topic::{topic_arc, validate_group_name, TopicInfo};

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

/// One partition of a group's view of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    /// The member id owning the partition now, if any.
    pub owner: Option<String>,
    /// The next offset the group will read, if it committed one.
    pub committed: Option<u64>,
    /// The offset the next produced message will get.
    pub next: u64,
    /// `next - committed` (or `next - earliest` without a commit).
    pub lag: u64,
}

/// Parses a committed offset value (a decimal number).
pub(crate) fn parse_offset(key: &[u8], value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "committed offset is not a decimal number".into(),
        })
}

impl Client {
    /// Names of every group with state (commits or members) in this
    /// namespace, with the topics each has state for.
    pub async fn list_groups(&self) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let root = self.keys.groups_root();
        let options = GetOptions::new()
            .with_range(prefix_end(&root))
            .with_keys_only();
        let mut response = self
            .read("list groups", root.clone(), Some(options))
            .await?;
        let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for kv in response.take_kvs() {
            let rest = String::from_utf8_lossy(&kv.key()[root.len()..]).into_owned();
            let mut parts = rest.split('/');
            if let (Some(topic), Some(group)) = (parts.next(), parts.next()) {
                groups
                    .entry(group.to_string())
                    .or_default()
                    .insert(topic.to_string());
            }
        }
        Ok(groups)
    }

    /// Committed offsets of a group on a topic, by partition.
    pub async fn committed_offsets(&self, topic: &str, group: &str) -> Result<BTreeMap<u32, u64>> {
        validate_group_name(group)?;
        let prefix = self.keys.offsets_prefix(topic, group);
        let options = GetOptions::new().with_range(prefix_end(&prefix));
        let mut response = self.read("read offsets", prefix, Some(options)).await?;
        let mut offsets = BTreeMap::new();
        for kv in response.take_kvs() {
            if let Some(partition) = Keys::trailing_number(kv.key()) {
                offsets.insert(partition as u32, parse_offset(kv.key(), kv.value())?);
            }
        }
        Ok(offsets)
    }

    /// Per partition of `topic`: owner, committed offset, next offset, lag.
    pub async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>> {
        validate_group_name(group)?;
        let description = self.describe_topic(topic).await?;
        let committed = self.committed_offsets(topic, group).await?;
        let owners = self.partition_owners(topic, group).await?;
        Ok(description
            .partitions
            .iter()
            .map(|p| {
                // As members do, ignore a commit past the end: no member made it.
                let committed = committed.get(&p.partition).copied().filter(|&offset| {
                    let sane = offset <= p.next;
                    if !sane {
                        tracing::warn!(
                            key = %self.keys.offset(topic, group, p.partition),
                            value = offset,
                            next = p.next,
                            "ignoring a committed offset beyond the end of the partition"
                        );
                    }
                    sane
                });
                let from = committed.unwrap_or(p.earliest).max(p.earliest);
                PartitionLag {
                    topic: topic.to_string(),
                    partition: p.partition,
                    owner: owners.get(&p.partition).cloned(),
                    committed,
                    next: p.next,
                    lag: p.next.saturating_sub(from),
                }
            })
            .collect())
    }

    /// Owner member id of each owned partition.
    pub(crate) async fn partition_owners(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<BTreeMap<u32, String>> {
        let prefix = self.keys.owners_prefix(topic, group);
        let options = GetOptions::new().with_range(prefix_end(&prefix));
        let mut response = self.read("read owners", prefix, Some(options)).await?;
        Ok(response
            .take_kvs()
            .iter()
            .filter_map(|kv| {
                Some((
                    Keys::trailing_number(kv.key())? as u32,
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ))
            })
            .collect())
    }

    /// Sets a group's committed offsets without being a member: for tools
    /// and manual assignment. Refused with [`Error::GroupActive`] while any
    /// member owns a partition of the topic, since its commits would race
    /// with these.
    pub async fn commit_offsets_unowned(
        &self,
        topic: &str,
        group: &str,
        offsets: &BTreeMap<u32, u64>,
    ) -> Result<()> {
        validate_group_name(group)?;
        let info = self.topic(topic).await?;
        let owners = self.keys.owners_prefix(topic, group);
        self.remove_unleased(&owners).await?;
        // A range compare holds when no key in the range exists: no owners.
        let compares = [
            Compare::create_revision(self.keys.topic(topic), CompareOp::Equal, info.incarnation),
            Compare::create_revision(owners.clone(), CompareOp::Equal, 0)
                .with_range(prefix_end(&owners)),
        ];
        let mut ops = Vec::with_capacity(offsets.len());
        for (&partition, &offset) in offsets {
            check_partition(&info, partition)?;
            ops.push(TxnOp::put(
                self.keys.offset(topic, group, partition),
                offset.to_string(),
                None,
            ));
        }
        for chunk in ops.chunks(100) {
            let txn = Txn::new().when(compares.clone()).and_then(chunk.to_vec());
            let response = self
                .timed("commit offsets", self.kv.clone().txn(txn))
                .await?;
            if !response.succeeded() {
                return Err(Error::GroupActive {
                    group: group.to_string(),
                    topic: topic.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Moves a group's committed offsets on every partition of `topic` to
    /// `to`. The group must have no live member owning a partition.
    pub async fn reset_offsets(
        &self,
        topic: &str,
        group: &str,
        to: StartOffset,
    ) -> Result<BTreeMap<u32, u64>> {
        let info = self.topic(topic).await?;
        let mut offsets = BTreeMap::new();
        for partition in 0..info.partitions {
            offsets.insert(partition, self.resolve_start(&info, partition, to).await?);
        }
        self.commit_offsets_unowned(topic, group, &offsets).await?;
        Ok(offsets)
    }

    /// Deletes a group's state on every topic. Refused while a member is live.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        validate_group_name(group)?;
        let groups = self.list_groups().await?;
        let Some(topics) = groups.get(group) else {
            return Err(Error::GroupNotFound(group.to_string()));
        };
        for topic in topics {
            let members = self.keys.members_prefix(topic, group);
            let prefix = self.keys.group_prefix(topic, group);
            self.remove_unleased(&members).await?;
            // No member key may exist: compare the whole members range.
            let txn = Txn::new()
                .when([
                    Compare::create_revision(members.clone(), CompareOp::Equal, 0)
                        .with_range(prefix_end(&members)),
                ])
                .and_then([TxnOp::delete(
                    prefix.clone(),
                    Some(DeleteOptions::new().with_range(prefix_end(&prefix))),
                )]);
            let response = self.timed("delete group", self.kv.clone().txn(txn)).await?;
            if !response.succeeded() {
                return Err(Error::GroupActive {
                    group: group.to_string(),
                    topic: topic.clone(),
                });
            }
        }
        Ok(())
    }

    /// Deletes the keys under `prefix` (a group's members or owners) that
    /// have no lease: no live member wrote them (a member's keys live under
    /// its lease, and etcd deletes them with it), so they only block the
    /// group. Each is deleted only if unchanged since it was read.
    async fn remove_unleased(&self, prefix: &str) -> Result<()> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_keys_only();
        let mut response = self
            .read("read group members", prefix.to_string(), Some(options))
            .await?;
        for kv in response.take_kvs().iter().filter(|kv| kv.lease() == 0) {
            tracing::warn!(
                key = %String::from_utf8_lossy(kv.key()),
                "deleting a group key without a lease: no live member holds it"
            );
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision()),
                    Compare::lease(kv.key(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::delete(kv.key(), None)]);
            self.timed("delete ownerless key", self.kv.clone().txn(txn))
                .await?;
        }
        Ok(())
    }

    /// The offset a [`StartOffset`] means on one partition of `topic` now
    /// (clamped to the stored range).
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
