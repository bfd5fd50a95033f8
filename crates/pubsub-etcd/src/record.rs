//! Messages as the application sees them ([`Record`] going in, [`Message`]
//! coming out) and the versioned on-etcd encoding of record batches and
//! partition heads (`proto/record.proto`), plain (format version 1) or with
//! compressed records (version 2).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message as _;
use serde::Serialize;

use crate::compression::{self, Compression};
use crate::error::{Error, Result};
use crate::partition::Partition;

/// The generated protobuf types of `proto/record.proto`.
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/pubsub_etcd.v1.rs"));
}

/// The format-version byte that starts every head value and every batch
/// value with plain records.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// The format-version byte of a batch value with compressed records.
pub(crate) const FORMAT_VERSION_COMPRESSED: u8 = 2;

/// The most records one batch may hold. Part of the format: readers rely on
/// it to bound the key range that can contain a given offset.
pub const MAX_RECORDS_PER_BATCH: u64 = 10_000;

/// The longest time to live a record can have: well within etcd's lease
/// limit (about 285 years) and far from any arithmetic overflow.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A message to produce.
///
/// ```
/// use pubsub_etcd::Record;
/// let record = Record::new("hello").key("user-42").header("trace", "abc");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Record {
    /// The payload; any bytes, empty allowed.
    pub value: Bytes,
    /// Decides the partition (unless one is set) and identifies the record
    /// for key compaction.
    pub key: Option<Bytes>,
    /// Application metadata.
    pub headers: BTreeMap<String, Bytes>,
    /// Milliseconds since the Unix epoch; the producer's clock when unset.
    pub timestamp: Option<i64>,
    /// Send to this partition instead of choosing one.
    pub partition: Option<u32>,
    /// Time to live, counted from when the producer accepts the record:
    /// readers skip the record after it, and etcd deletes its batch soon
    /// after (through a lease shared by all records of a ~1 s deadline bucket).
    pub ttl: Option<Duration>,
}

impl Record {
    /// A record with this value and nothing else set.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header, replacing one of the same name.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the timestamp in milliseconds since the Unix epoch.
    pub fn timestamp(mut self, millis: i64) -> Self {
        self.timestamp = Some(millis);
        self
    }

    /// Sends the record to this partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Sets a time to live: the record disappears at send time + `ttl`,
    /// even when the topic's retention would keep it longer. Longer TTLs
    /// than [`MAX_TTL`] (100 years) count as [`MAX_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl.min(MAX_TTL));
        self
    }

    /// The stored form, with its timestamp (and deadline) fixed now.
    pub(crate) fn into_pb(self) -> pb::Record {
        let now = now_millis();
        let expires_at_ms = match self.ttl {
            // At least 1 ms: 0 means "never expires".
            Some(ttl) => now
                .saturating_add(i64::try_from(ttl.min(MAX_TTL).as_millis()).unwrap_or(i64::MAX))
                .max(1),
            None => 0,
        };
        pb::Record {
            offset_delta: 0,
            timestamp_ms: self.timestamp.unwrap_or(now),
            key: self.key,
            value: self.value,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| pb::Header { name, value })
                .collect(),
            expires_at_ms,
        }
    }
}

/// A message read back from a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Message {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: BTreeMap<String, Bytes>,
}

impl Message {
    /// The message a reader would yield for `record` stored at `offset` of
    /// `partition`: for tests of code that handles messages, since the
    /// struct is `#[non_exhaustive]`. As a producer does, it takes the
    /// record's timestamp or else the current time; the record's partition
    /// and TTL play no part.
    pub fn from_record(
        topic: impl Into<Arc<str>>,
        partition: u32,
        offset: u64,
        record: Record,
    ) -> Message {
        Message {
            topic: topic.into(),
            partition,
            offset,
            timestamp: record.timestamp.unwrap_or_else(now_millis),
            key: record.key,
            value: record.value,
            headers: record.headers,
        }
    }
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// Protobuf bytes that one record adds to a batch, including its field tag.
pub(crate) fn encoded_record_len(record: &pb::Record) -> usize {
    // Tag (1 byte) + length varint (at most 5) + the record itself.
    record.encoded_len() + 6
}

/// Serialises a value with its format-version byte.
pub(crate) fn encode<M: prost::Message>(message: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(FORMAT_VERSION);
    message.encode(&mut out).expect("a Vec grows as needed");
    out
}

/// The records of one batch, encoded (and compressed) once, so that an
/// append retried at another offset only re-encodes the batch's few header
/// fields.
#[derive(Debug)]
pub(crate) struct BatchRecords {
    /// The records' protobuf encoding, as field 4 entries of a batch.
    plain: Vec<u8>,
    compressed: Option<(pb::Codec, Bytes)>,
}

impl BatchRecords {
    pub(crate) fn new(records: Vec<pb::Record>, compression: Compression) -> Self {
        let plain = pb::RecordBatch {
            records,
            ..pb::RecordBatch::default()
        }
        .encode_to_vec();
        let compressed = compression::compress(compression, &plain);
        BatchRecords { plain, compressed }
    }

    /// Application bytes: the records encoded, before compression.
    pub(crate) fn len(&self) -> u64 {
        self.plain.len() as u64
    }

    /// The stored value of the batch `header` (whose `records` are empty)
    /// holding these records.
    pub(crate) fn value(&self, header: &pb::RecordBatch) -> Vec<u8> {
        debug_assert!(header.records.is_empty());
        match &self.compressed {
            Some((codec, data)) => {
                let mut batch = header.clone();
                batch.set_codec(*codec);
                batch.compressed_records = data.clone();
                batch.records_len = self.plain.len() as u32;
                let mut out = Vec::with_capacity(1 + batch.encoded_len());
                out.push(FORMAT_VERSION_COMPRESSED);
                batch.encode(&mut out).expect("a Vec grows as needed");
                out
            }
            None => {
                // Protobuf fields may come in any order and repeated ones
                // concatenate: header then records is a valid batch.
                let mut out = Vec::with_capacity(1 + header.encoded_len() + self.plain.len());
                out.push(FORMAT_VERSION);
                header.encode(&mut out).expect("a Vec grows as needed");
                out.extend_from_slice(&self.plain);
                out
            }
        }
    }
}

/// The compression a rewrite of a batch stored with `codec` uses.
pub(crate) fn compression_of(codec: i32) -> Compression {
    match pb::Codec::try_from(codec) {
        Ok(pb::Codec::Lz4) => Compression::Lz4,
        Ok(pb::Codec::Zstd) => Compression::zstd(),
        _ => Compression::None,
    }
}

/// Parses a value written by [`encode`].
pub(crate) fn decode<M: prost::Message + Default>(key: &[u8], value: Bytes) -> Result<M> {
    match value.first() {
        Some(&FORMAT_VERSION) => {
            M::decode(value.slice(1..)).map_err(|e| corrupt(key, format!("bad protobuf: {e}")))
        }
        Some(version) => Err(corrupt(key, format!("unknown format version {version}"))),
        None => Err(corrupt(key, "empty value".into())),
    }
}

fn corrupt(key: &[u8], reason: String) -> Error {
    Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    }
}

/// Parses a batch value of either format version, decompressing records
/// within [`compression::MAX_DECODED_RECORDS_BYTES`]. The batch keeps its
/// `codec` (so a rewrite can keep it) but not its compressed bytes.
pub(crate) fn decode_batch_value(key: &[u8], value: Bytes) -> Result<pb::RecordBatch> {
    if value.first() != Some(&FORMAT_VERSION_COMPRESSED) {
        let batch: pb::RecordBatch = decode(key, value)?;
        if batch.codec != 0 || !batch.compressed_records.is_empty() {
            return Err(corrupt(
                key,
                format!("format version 1 batch names codec {}", batch.codec),
            ));
        }
        return Ok(batch);
    }
    let mut batch = pb::RecordBatch::decode(value.slice(1..))
        .map_err(|e| corrupt(key, format!("bad protobuf: {e}")))?;
    if !batch.records.is_empty() {
        return Err(corrupt(
            key,
            "compressed batch also holds plain records".into(),
        ));
    }
    let plain = compression::decompress(
        key,
        batch.codec,
        &batch.compressed_records,
        batch.records_len,
    )?;
    let records = pb::RecordBatch::decode(Bytes::from(plain))
        .map_err(|e| corrupt(key, format!("bad protobuf in compressed records: {e}")))?;
    batch.records = records.records;
    batch.compressed_records = Bytes::new();
    batch.records_len = 0;
    Ok(batch)
}

/// Turns a stored batch into messages, keeping those at or after `from`
/// that have not expired by `now_ms`.
pub(crate) fn batch_messages(
    part: &Partition,
    batch: pb::RecordBatch,
    from: u64,
    now_ms: i64,
) -> impl Iterator<Item = Message> + '_ {
    let (topic, partition) = (part.topic(), part.number());
    let base = batch.base_offset;
    batch.records.into_iter().filter_map(move |r| {
        let offset = base + u64::from(r.offset_delta);
        if offset < from || (r.expires_at_ms != 0 && r.expires_at_ms <= now_ms) {
            return None;
        }
        Some(Message {
            topic: topic.clone(),
            partition,
            offset,
            timestamp: r.timestamp_ms,
            key: r.key,
            value: r.value,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        })
    })
}

/// The messages of a batch kept decoded, at offsets in `[from, to)` and
/// not expired at `now_ms`: [`batch_messages`] without consuming the batch,
/// so it can serve again (payloads are shared, not copied).
pub(crate) fn batch_messages_in<'a>(
    part: &'a Partition,
    batch: &'a pb::RecordBatch,
    from: u64,
    to: u64,
    now_ms: i64,
) -> impl Iterator<Item = Message> + 'a {
    let base = batch.base_offset;
    batch.records.iter().filter_map(move |r| {
        let offset = base + u64::from(r.offset_delta);
        if offset < from || offset >= to || (r.expires_at_ms != 0 && r.expires_at_ms <= now_ms) {
            return None;
        }
        Some(Message {
            topic: part.topic().clone(),
            partition: part.number(),
            offset,
            timestamp: r.timestamp_ms,
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r
                .headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trips_with_version_byte() {
        let batch = pb::RecordBatch {
            base_offset: 10,
            producer_id: 7,
            producer_seq: 3,
            offset_count: 2,
            base_bytes: 0,
            records: vec![
                Record::new("a")
                    .key("k")
                    .header("h", "v")
                    .timestamp(5)
                    .into_pb(),
                pb::Record {
                    offset_delta: 1,
                    ..Record::new(Bytes::new()).into_pb()
                },
            ],
            ..pb::RecordBatch::default()
        };
        let bytes = encode(&batch);
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back: pb::RecordBatch = decode(b"k", Bytes::from(bytes)).unwrap();
        assert_eq!(back, batch);
        let part = Partition::new("t".into(), 1, 0);
        let messages: Vec<_> = batch_messages(&part, back, 11, 0).collect();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].offset, 11);
        assert!(messages[0].value.is_empty());
    }

    #[test]
    fn ttl_sets_a_deadline_and_readers_skip_past_it() {
        let before = now_millis();
        let r = Record::new("v").ttl(Duration::from_secs(5)).into_pb();
        assert!(r.expires_at_ms >= before + 5000 && r.expires_at_ms <= now_millis() + 5000);
        assert_eq!(Record::new("v").into_pb().expires_at_ms, 0);
        let batch = pb::RecordBatch {
            offset_count: 1,
            records: vec![r.clone()],
            ..pb::RecordBatch::default()
        };
        let part = Partition::new("t".into(), 1, 0);
        assert_eq!(batch_messages(&part, batch.clone(), 0, before).count(), 1);
        assert_eq!(batch_messages(&part, batch, 0, r.expires_at_ms).count(), 0);
    }

    #[test]
    fn unknown_version_and_garbage_are_errors() {
        let err = decode::<pb::RecordBatch>(b"key", Bytes::from_static(&[9, 1, 2])).unwrap_err();
        assert!(
            err.to_string().contains("unknown format version 9"),
            "{err}"
        );
        let err = decode::<pb::RecordBatch>(b"key", Bytes::from_static(&[1, 0xff])).unwrap_err();
        assert!(err.to_string().contains("bad protobuf"), "{err}");
        assert!(decode::<pb::RecordBatch>(b"key", Bytes::new()).is_err());
    }
}
