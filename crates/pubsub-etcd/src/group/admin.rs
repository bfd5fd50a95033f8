//! Consumer-group state in etcd that is not tied to a live member, as the
//! admin calls see it: which groups exist, their committed offsets, owners
//! and lag, and resetting or deleting a group.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use serde::Serialize;

use super::commit::parse_offset;
use super::start::StartOffset;
use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::{prefix_end, Keys};
use crate::topic::validate_group_name;

/// One partition of a group's view of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
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

impl Client {
    /// Names of every group with state (commits or members) in this
    /// namespace, with the topics each has state for.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not
    /// answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
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
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGroupName`]; [`Error::Corrupt`] for a stored offset
    /// that is not a number; [`Error::Timeout`] or [`Error::Etcd`] when etcd does not
    /// answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
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
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGroupName`]; [`Error::TopicNotFound`];
    /// [`Error::Corrupt`] for an unreadable stored value; [`Error::Timeout`] or [`Error::Etcd`] when etcd does not
    /// answer.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
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

    /// Moves a group's committed offsets on every partition of `topic` to
    /// `to`. The group must have no live member owning a partition.
    ///
    /// # Errors
    ///
    /// As for [`Client::commit_offsets_unowned`].
    ///
    /// # Cancel safety
    ///
    /// As for [`Client::commit_offsets_unowned`].
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
    ///
    /// # Errors
    ///
    /// [`Error::GroupNotFound`] when it has no state; [`Error::GroupActive`]
    /// while a member is live; [`Error::Timeout`] or [`Error::Etcd`].
    ///
    /// # Cancel safety
    ///
    /// The state of each topic goes in one transaction: a dropped call may
    /// have deleted the group on some topics only.
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
    pub(super) async fn remove_unleased(&self, prefix: &str) -> Result<()> {
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
}
