//! Topics: naming rules, the stored metadata, and the admin operations
//! (create, get, list, alter, delete) on [`Client`]; what their partitions
//! hold now is `offsets.rs`'s.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::keys::prefix_end;
use crate::record;

/// The most partitions a topic may have. Each partition costs a head key,
/// and a consumer group an owner and an offset key per partition; 4,096 keeps
/// a whole topic's group state within a few etcd pages.
pub const MAX_PARTITIONS: u32 = 4096;
/// The longest topic or group name, as in Kafka.
pub const MAX_NAME_LEN: usize = 249;

/// Checks a name against the rules shared by topics and groups:
/// 1 to 249 characters from `[A-Za-z0-9._-]`, and not `.` or `..`.
pub(crate) fn check_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return Err("must not be \".\" or \"..\"");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

pub(crate) fn validate_topic_name(name: &str) -> Result<()> {
    check_name(name).map_err(|reason| Error::InvalidTopicName {
        name: name.to_string(),
        reason,
    })
}

pub(crate) fn validate_group_name(name: &str) -> Result<()> {
    check_name(name).map_err(|reason| Error::InvalidGroupName {
        name: name.to_string(),
        reason,
    })
}

fn validate_partitions(count: u32) -> Result<()> {
    if count == 0 || count > MAX_PARTITIONS {
        return Err(Error::InvalidPartitionCount {
            count,
            max: MAX_PARTITIONS,
        });
    }
    Ok(())
}

/// Per-topic settings, stored with the topic and changeable later.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TopicConfig {
    /// Largest accepted record (value, key and headers, encoded), in bytes.
    /// Producers refuse larger records with [`Error::MessageTooLarge`].
    /// Default (`None`): as large as fits in one etcd request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u32>,
    /// Maximum age of a message, in milliseconds of its record timestamp:
    /// a record batch is deleted once its newest record is older than this.
    /// Default (`None`): no age limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Maximum messages per partition, counted in offsets: offsets below
    /// `next - retention_messages` are deleted. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_messages: Option<u64>,
    /// Maximum bytes per partition as stored in etcd (batch values, after
    /// compression, so what fills etcd's quota): the oldest batches are
    /// deleted while the partition holds more. Batches written before
    /// stored bytes were recorded count as the oldest. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    /// Whether the retention sweep also keeps only the newest message per key.
    #[serde(default, skip_serializing_if = "CleanupPolicy::is_delete")]
    pub cleanup_policy: CleanupPolicy,
    /// The compression of producers that choose none themselves
    /// ([`ProducerBuilder::compression`](crate::ProducerBuilder::compression)).
    /// Default: [`Compression::None`].
    #[serde(default, skip_serializing_if = "is_no_compression")]
    pub compression: Compression,
}

fn is_no_compression(c: &Compression) -> bool {
    *c == Compression::None
}

/// What the retention sweep does besides enforcing the limits, like Kafka's
/// `cleanup.policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CleanupPolicy {
    /// Only the retention limits delete messages.
    #[default]
    Delete,
    /// Key compaction as well: per partition, only the newest message of each
    /// key is kept, and a key whose newest message has an empty value (a
    /// tombstone) is dropped altogether. Keyless messages are kept.
    Compact,
}

impl CleanupPolicy {
    fn is_delete(&self) -> bool {
        *self == CleanupPolicy::Delete
    }
}

impl TopicConfig {
    fn validate(&self) -> Result<()> {
        self.compression.validate()?;
        if self.max_message_bytes == Some(0) {
            return Err(Error::InvalidConfig(
                "max_message_bytes is 0; it must be greater than zero".into(),
            ));
        }
        for (name, value) in [
            ("retention_ms", self.retention_ms),
            ("retention_messages", self.retention_messages),
            ("retention_bytes", self.retention_bytes),
        ] {
            if value == Some(0) {
                return Err(Error::InvalidConfig(format!(
                    "{name} is 0; it must be greater than zero (or unset for no limit)"
                )));
            }
        }
        Ok(())
    }

    /// True when any retention limit is set.
    pub fn has_retention_limits(&self) -> bool {
        self.retention_ms.is_some()
            || self.retention_messages.is_some()
            || self.retention_bytes.is_some()
    }
}

/// What a new topic looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub config: TopicConfig,
}

impl NewTopic {
    /// A topic with this name and partition count and default settings.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        NewTopic {
            name: name.into(),
            partitions,
            config: TopicConfig::default(),
        }
    }

    /// Sets [`TopicConfig::max_message_bytes`].
    pub fn max_message_bytes(mut self, bytes: u32) -> Self {
        self.config.max_message_bytes = Some(bytes);
        self
    }

    /// Sets [`TopicConfig::retention_ms`] (maximum message age).
    pub fn retention(mut self, age: std::time::Duration) -> Self {
        self.config.retention_ms = Some(u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Sets [`TopicConfig::retention_messages`] (maximum messages per partition).
    pub fn retention_messages(mut self, messages: u64) -> Self {
        self.config.retention_messages = Some(messages);
        self
    }

    /// Sets [`TopicConfig::retention_bytes`] (maximum bytes per partition).
    pub fn retention_bytes(mut self, bytes: u64) -> Self {
        self.config.retention_bytes = Some(bytes);
        self
    }

    /// Sets [`TopicConfig::compression`].
    pub fn compression(mut self, compression: Compression) -> Self {
        self.config.compression = compression;
        self
    }

    /// Sets [`TopicConfig::cleanup_policy`].
    pub fn cleanup_policy(mut self, policy: CleanupPolicy) -> Self {
        self.config.cleanup_policy = policy;
        self
    }
}

/// The stored metadata of a topic (the JSON value of its topic key).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTopic {
    partitions: u32,
    created_ms: i64,
    #[serde(default)]
    config: TopicConfig,
}

/// A topic as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    pub config: TopicConfig,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// The etcd create revision of the topic key. It tells a topic from a
    /// later topic of the same name, and names the topic's data keys.
    pub incarnation: i64,
    /// The etcd revision of the last change to the topic's metadata.
    #[serde(skip)]
    pub(crate) mod_revision: i64,
}

impl Client {
    /// Creates a topic. Of several concurrent creates of one name exactly one
    /// succeeds; the others get [`Error::TopicExists`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopicName`], [`Error::InvalidPartitionCount`],
    /// [`Error::InvalidConfig`] for a bad setting; [`Error::TopicExists`];
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or
    /// refuses (a [`Error::Timeout`] leaves it unknown whether the topic was
    /// created: read it with [`Client::topic`]).
    ///
    /// # Cancel safety
    ///
    /// One transaction: a dropped call created the topic or did not.
    pub async fn create_topic(&self, topic: NewTopic) -> Result<TopicInfo> {
        validate_topic_name(&topic.name)?;
        validate_partitions(topic.partitions)?;
        topic.config.validate()?;
        let key = self.keys.topic(&topic.name);
        let stored = StoredTopic {
            partitions: topic.partitions,
            created_ms: record::now_millis(),
            config: topic.config,
        };
        let value = serde_json::to_vec(&stored).expect("topic metadata serialises");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let response = self.timed("create topic", self.kv.clone().txn(txn)).await?;
        if !response.succeeded() {
            return Err(Error::TopicExists(topic.name));
        }
        let revision = response.header().map_or(0, |h| h.revision());
        Ok(TopicInfo {
            name: topic.name,
            partitions: stored.partitions,
            config: stored.config,
            created_ms: stored.created_ms,
            incarnation: revision,
            mod_revision: revision,
        })
    }

    /// Reads a topic's metadata.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopicName`], [`Error::TopicNotFound`]; [`Error::Corrupt`]
    /// for metadata that does not parse or check; [`Error::Timeout`] or
    /// [`Error::Etcd`] when etcd does not answer in time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn topic(&self, name: &str) -> Result<TopicInfo> {
        validate_topic_name(name)?;
        let key = self.keys.topic(name);
        let mut response = self.read("get topic", key, None).await?;
        match response.take_kvs().into_iter().next() {
            Some(kv) => parse_topic(name, &kv),
            None => Err(Error::TopicNotFound(name.to_string())),
        }
    }

    /// Every topic of the namespace, sorted by name.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] naming the first topic key whose metadata does not parse
    /// or check; [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in
    /// time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let prefix = self.keys.topics_prefix();
        let options = GetOptions::new().with_range(prefix_end(&prefix));
        let mut response = self
            .read("list topics", prefix.clone(), Some(options))
            .await?;
        response
            .take_kvs()
            .iter()
            .map(|kv| {
                let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                parse_topic(&name, kv)
            })
            .collect()
    }

    /// Changes a topic's partition count (growing only) and edits its
    /// current settings with `change`, which sees the stored settings and
    /// may run more than once: the write is guarded by the metadata's mod
    /// revision, so two concurrent edits of different settings both land.
    /// `None` keeps the partition count; `|_| {}` keeps the settings, and
    /// `|c| *c = new.clone()` replaces them whole.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPartitionCount`], [`Error::InvalidConfig`] for a bad result
    /// of `change`; [`Error::TopicNotFound`]; [`Error::PartitionDecrease`];
    /// [`Error::Timeout`] or [`Error::Etcd`] when etcd does not answer in time or
    /// refuses.
    ///
    /// # Cancel safety
    ///
    /// Each attempt is one guarded write: a dropped call changed the topic
    /// whole or not at all.
    pub async fn alter_topic(
        &self,
        name: &str,
        partitions: Option<u32>,
        change: impl Fn(&mut TopicConfig),
    ) -> Result<TopicInfo> {
        if let Some(count) = partitions {
            validate_partitions(count)?;
        }
        loop {
            let current = self.topic(name).await?;
            let partitions = partitions.unwrap_or(current.partitions);
            if partitions < current.partitions {
                return Err(Error::PartitionDecrease {
                    topic: name.to_string(),
                    current: current.partitions,
                    requested: partitions,
                });
            }
            let mut config = current.config.clone();
            change(&mut config);
            config.validate()?;
            let stored = StoredTopic {
                partitions,
                created_ms: current.created_ms,
                config,
            };
            let key = self.keys.topic(name);
            let value = serde_json::to_vec(&stored).expect("topic metadata serialises");
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    current.mod_revision,
                )])
                .and_then([TxnOp::put(key, value, None)]);
            let response = self.timed("update topic", self.kv.clone().txn(txn)).await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                return Ok(TopicInfo {
                    partitions,
                    config: stored.config,
                    mod_revision: revision,
                    ..current
                });
            }
        }
    }

    /// Deletes a topic with its messages and every group's offsets and
    /// ownership for it, in one transaction. Producers holding the topic get
    /// [`Error::TopicDeleted`]; a later topic of the same name starts empty.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopicName`], [`Error::TopicNotFound`]; [`Error::Timeout`] or
    /// [`Error::Etcd`] when etcd does not answer in time or refuses.
    ///
    /// # Cancel safety
    ///
    /// One transaction: a dropped call deleted everything of the topic or
    /// nothing.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        validate_topic_name(name)?;
        let key = self.keys.topic(name);
        let data = self.keys.topic_data_prefix(name);
        let groups = self.keys.topic_groups_prefix(name);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::delete(key, None),
                TxnOp::delete(
                    data.clone(),
                    Some(DeleteOptions::new().with_range(prefix_end(&data))),
                ),
                TxnOp::delete(
                    groups.clone(),
                    Some(DeleteOptions::new().with_range(prefix_end(&groups))),
                ),
            ]);
        let response = self.timed("delete topic", self.kv.clone().txn(txn)).await?;
        if !response.succeeded() {
            return Err(Error::TopicNotFound(name.to_string()));
        }
        Ok(())
    }
}

/// Reads a topic key's value with the checks `create_topic` makes, so that
/// metadata written by hand or restored from elsewhere cannot make a reader
/// divide by zero, allocate per partition without bound, or delete data.
pub(crate) fn parse_topic(name: &str, kv: &etcd_client::KeyValue) -> Result<TopicInfo> {
    let corrupt = |reason: String| Error::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: format!("bad topic metadata: {reason}"),
    };
    check_name(name)
        .map_err(|reason| corrupt(format!("{name:?} is not a topic name: {reason}")))?;
    let stored: StoredTopic =
        serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
    validate_partitions(stored.partitions).map_err(|e| corrupt(e.to_string()))?;
    stored
        .config
        .validate()
        .map_err(|e| corrupt(e.to_string()))?;
    Ok(TopicInfo {
        name: name.to_string(),
        partitions: stored.partitions,
        config: stored.config,
        created_ms: stored.created_ms,
        incarnation: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// The name shared by every message of a topic, so messages clone cheaply.
pub(crate) fn topic_arc(name: &str) -> Arc<str> {
    Arc::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "A-b_c.9", &"x".repeat(249), "..."] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a[b",
            "a\\b",
            "a^b",
            "a`b",
            "é",
            &"x".repeat(250),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_without_retention_fields_parses_and_defaults_are_not_written() {
        let old: StoredTopic =
            serde_json::from_str(r#"{"partitions":3,"created_ms":1,"config":{}}"#).unwrap();
        assert_eq!(old.config, TopicConfig::default());
        assert_eq!(old.config.cleanup_policy, CleanupPolicy::Delete);
        assert_eq!(
            serde_json::to_string(&TopicConfig::default()).unwrap(),
            "{}"
        );
        let config = NewTopic::new("t", 1)
            .retention(std::time::Duration::from_secs(1))
            .retention_messages(2)
            .retention_bytes(3)
            .cleanup_policy(CleanupPolicy::Compact)
            .config;
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            json,
            r#"{"retention_ms":1000,"retention_messages":2,"retention_bytes":3,"cleanup_policy":"compact"}"#
        );
        assert_eq!(serde_json::from_str::<TopicConfig>(&json).unwrap(), config);
        assert!(config.validate().is_ok());
        let zero = TopicConfig {
            retention_bytes: Some(0),
            ..TopicConfig::default()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn partition_counts() {
        assert!(validate_partitions(0).is_err());
        assert!(validate_partitions(1).is_ok());
        assert!(validate_partitions(1024).is_ok());
        assert!(validate_partitions(MAX_PARTITIONS).is_ok());
        let err = validate_partitions(MAX_PARTITIONS + 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid partition count 4097: must be between 1 and 4096"
        );
    }
}
