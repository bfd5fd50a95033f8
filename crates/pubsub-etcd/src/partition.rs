//! One partition of one topic incarnation: the owned [`Partition`] handle
//! that names it below the public API, and the decoding of what is stored
//! under it, its [`Head`] and its batches checked against their keys. The
//! keys themselves are spelled in `keys.rs`, from this handle.

use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::record::{self, pb, MAX_RECORDS_PER_BATCH};
use crate::topic::{topic_arc, TopicInfo};

/// One partition of one incarnation of a topic. Cheap to clone: the name is
/// shared, the rest is two numbers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Partition {
    topic: Arc<str>,
    incarnation: i64,
    number: u32,
}

impl Partition {
    pub(crate) fn new(topic: Arc<str>, incarnation: i64, number: u32) -> Self {
        Partition {
            topic,
            incarnation,
            number,
        }
    }

    /// Partition `number` of the topic `info` describes (not checked
    /// against its partition count).
    pub(crate) fn of(info: &TopicInfo, number: u32) -> Self {
        Partition::new(topic_arc(&info.name), info.incarnation, number)
    }

    /// These partitions of `info`, sharing one copy of its name.
    pub(crate) fn each(
        info: &TopicInfo,
        numbers: impl IntoIterator<Item = u32>,
    ) -> impl Iterator<Item = Partition> {
        let topic = topic_arc(&info.name);
        let incarnation = info.incarnation;
        numbers
            .into_iter()
            .map(move |number| Partition::new(topic.clone(), incarnation, number))
    }

    /// Every partition of `info`, in order.
    pub(crate) fn all(info: &TopicInfo) -> impl Iterator<Item = Partition> {
        Partition::each(info, 0..info.partitions)
    }

    pub(crate) fn topic(&self) -> &Arc<str> {
        &self.topic
    }

    pub(crate) fn incarnation(&self) -> i64 {
        self.incarnation
    }

    pub(crate) fn number(&self) -> u32 {
        self.number
    }

    /// Decodes the batch stored at `key` of this partition and checks it
    /// against its key before anything trusts its offsets: the key must be
    /// the one the batch's extent names (its last offset, so garbage names
    /// such as a 21-digit number never pass), the extent must hold 1 to
    /// [`MAX_RECORDS_PER_BATCH`] offsets and end below `u64::MAX` (so
    /// `last + 1` never overflows), and the records' offsets must increase
    /// within it.
    pub(crate) fn decode_batch(
        &self,
        keys: &Keys,
        key: &[u8],
        value: Bytes,
    ) -> Result<pb::RecordBatch> {
        let batch = record::decode_batch_value(key, value)?;
        let corrupt = |reason: String| Error::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason,
        };
        let count = u64::from(batch.offset_count);
        if count == 0 || count > MAX_RECORDS_PER_BATCH {
            return Err(corrupt(format!(
                "batch spans {count} offsets; a batch spans 1 to {MAX_RECORDS_PER_BATCH}"
            )));
        }
        let last = match batch.base_offset.checked_add(count - 1) {
            Some(last) if last < u64::MAX => last,
            _ => {
                return Err(corrupt(format!(
                    "batch of {count} offsets from {} ends beyond the largest offset",
                    batch.base_offset
                )))
            }
        };
        let expected = keys.batch(self, last);
        if key != expected.as_bytes() {
            return Err(corrupt(format!(
                "batch holds offsets {}..={last}, so its key would be {expected}",
                batch.base_offset
            )));
        }
        let mut previous = None;
        for r in &batch.records {
            if u64::from(r.offset_delta) >= count || previous.is_some_and(|p| p >= r.offset_delta) {
                return Err(corrupt(format!(
                    "record offset delta {} is out of order or outside the batch's {count} offsets",
                    r.offset_delta
                )));
            }
            previous = Some(r.offset_delta);
        }
        Ok(batch)
    }
}

/// A partition head as read from etcd: where the next append goes, what
/// was appended so far, and the idempotence table of recent producers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Head {
    pub(crate) next_offset: u64,
    /// 0 while the head key does not exist yet: etcd compares a missing
    /// key's mod revision as 0.
    pub(crate) mod_revision: i64,
    pub(crate) producers: Vec<pb::ProducerState>,
    /// Record bytes ever appended (application bytes, before compression).
    pub(crate) total_bytes: u64,
    /// Batch value bytes ever stored (after compression): what byte
    /// retention counts.
    pub(crate) total_stored_bytes: u64,
}

impl Head {
    /// The head stored in `kv`, the head key's value; no key is the empty
    /// head of a partition nothing was appended to yet.
    pub(crate) fn decode(kv: Option<&etcd_client::KeyValue>) -> Result<Head> {
        let Some(kv) = kv else {
            return Ok(Head::default());
        };
        let stored: pb::PartitionHead =
            record::decode(kv.key(), Bytes::copy_from_slice(kv.value()))?;
        Ok(Head {
            next_offset: stored.next_offset,
            mod_revision: kv.mod_revision(),
            producers: stored.producers,
            total_bytes: stored.total_bytes,
            total_stored_bytes: stored.total_stored_bytes,
        })
    }

    /// The value to store for this head.
    pub(crate) fn encode(&self) -> Vec<u8> {
        record::encode(&pb::PartitionHead {
            next_offset: self.next_offset,
            producers: self.producers.clone(),
            total_bytes: self.total_bytes,
            total_stored_bytes: self.total_stored_bytes,
        })
    }
}
