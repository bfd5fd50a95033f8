//! Reading a partition by offset: the low-level [`Client::fetch`], the
//! paged range read that consumers catch up with, the [`SharedReads`] that
//! put the catch-up reads of many partitions in one etcd request, and the
//! check every batch read passes before anything trusts its offsets.

use bytes::Bytes;
use etcd_client::{GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use tokio::sync::{mpsc, oneshot};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::keys::prefix_end;
use crate::partition::Partition;
use crate::record::{self, Message, MAX_RECORDS_PER_BATCH};

/// Most batch keys one read returns: a batch is at most about 1.4 MiB, so a
/// page stays within a few tens of MiB of memory.
const MAX_BATCHES_PER_READ: usize = 32;

/// What one fetch read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Fetched {
    /// Messages in offset order; deleted and expired ones are skipped, so
    /// offsets may have gaps.
    pub messages: Vec<Message>,
    /// Where the next fetch should start: past every offset this one covered.
    pub next_offset: u64,
    /// The etcd revision the read saw; a watch from `revision + 1` misses
    /// nothing written after it.
    #[serde(skip)]
    pub(crate) revision: i64,
    /// Batch keys the read decoded.
    #[serde(skip)]
    pub(crate) batches: usize,
}

/// Most skipped corrupt batches one fetch returns for its caller to report.
const MAX_CORRUPT_KEPT: usize = 32;

/// How a fetch bounds its result; see [`fetch_partition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    Exact,
    WholeBatches(usize),
}

impl Client {
    /// Reads up to `max` messages of one partition, starting at offset
    /// `from`, in offset order. Returns fewer (possibly none) at the end of
    /// the partition.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopicName`], [`Error::TopicNotFound`];
    /// [`Error::PartitionOutOfRange`]; [`Error::Corrupt`] for unreadable topic
    /// metadata (corrupt batches are skipped and logged); [`Error::Timeout`] or
    /// [`Error::Etcd`] when etcd does not answer in time or refuses.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Fetched> {
        let info = self.topic(topic).await?;
        if partition >= info.partitions {
            return Err(crate::Error::PartitionOutOfRange {
                topic: topic.to_string(),
                partition,
                partitions: info.partitions,
            });
        }
        fetch_partition(
            self,
            &Partition::of(&info, partition),
            from,
            max,
            Cut::Exact,
        )
        .await
    }
}

/// Reads of different partitions, queued while the previous ones are in
/// flight, sent as one read-only transaction: a catch-up over thousands of
/// partitions takes one request per round of readers instead of one per
/// partition. The reads of one transaction all see the same revision. A
/// transaction that etcd refuses (e.g. an answer over the client's message
/// size, which one read alone would not reach) is retried as separate reads,
/// so coalescing never makes a read fail that would succeed alone.
#[derive(Debug, Clone)]
pub(crate) struct SharedReads {
    requests: mpsc::Sender<RangeRead>,
}

/// Reads per transaction, well within etcd's 128 operations.
const READS_PER_TXN: usize = 64;

#[derive(Debug)]
struct RangeRead {
    key: Vec<u8>,
    options: GetOptions,
    reply: oneshot::Sender<Result<(i64, Vec<KeyValue>)>>,
}

impl SharedReads {
    /// Starts the task that sends the reads; it ends with the last handle.
    pub(crate) fn new(client: Client) -> SharedReads {
        let (requests, receiver) = mpsc::channel(READS_PER_TXN);
        tokio::spawn(send_reads(client, receiver));
        SharedReads { requests }
    }

    /// One range read: the revision it saw and its keys.
    async fn read(&self, key: Vec<u8>, options: GetOptions) -> Result<(i64, Vec<KeyValue>)> {
        let (reply, answer) = oneshot::channel();
        let read = RangeRead {
            key,
            options,
            reply,
        };
        if self.requests.send(read).await.is_err() {
            return Err(Error::ConsumerClosed);
        }
        answer.await.map_err(|_| Error::ConsumerClosed)?
    }
}

async fn send_reads(client: Client, mut requests: mpsc::Receiver<RangeRead>) {
    while let Some(first) = requests.recv().await {
        let mut reads = vec![first];
        while reads.len() < READS_PER_TXN {
            match requests.try_recv() {
                Ok(read) => reads.push(read),
                Err(_) => break,
            }
        }
        // Readers stopped meanwhile (a revoked partition) need no answer.
        reads.retain(|read| !read.reply.is_closed());
        if reads.len() > 1 {
            let ops: Vec<TxnOp> = reads
                .iter()
                .map(|read| TxnOp::get(read.key.clone(), Some(read.options.clone())))
                .collect();
            match client.read_txn("fetch", Txn::new().and_then(ops)).await {
                Ok(response) => {
                    let revision = response.header().map_or(0, |h| h.revision());
                    for (read, op) in reads.drain(..).zip(response.op_responses()) {
                        let answer = match op {
                            TxnOpResponse::Get(mut got) => Ok((revision, got.take_kvs())),
                            _ => Err(Error::Corrupt {
                                key: String::from_utf8_lossy(&read.key).into_owned(),
                                reason: "etcd answered a range read in a transaction with another operation".to_string(),
                            }),
                        };
                        let _ = read.reply.send(answer);
                    }
                }
                Err(error) if error.is_outcome_unknown() => {
                    for read in reads.drain(..) {
                        let _ = read.reply.send(Err(error.clone()));
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, reads = reads.len(), "shared read refused, reading one by one");
                }
            }
        }
        for read in reads {
            let answer = client
                .read("fetch", read.key, Some(read.options))
                .await
                .map(|mut got| (got.header().map_or(0, |h| h.revision()), got.take_kvs()));
            let _ = read.reply.send(answer);
        }
    }
}

/// [`read_partition`], logging each corrupt batch it skipped.
pub(crate) async fn fetch_partition(
    client: &Client,
    part: &Partition,
    from: u64,
    max: usize,
    cut: Cut,
) -> Result<Fetched> {
    let (fetched, corrupt) = read_partition(client, None, part, from, max, cut).await?;
    for error in &corrupt {
        tracing::warn!(%error, "skipped a corrupt batch");
    }
    Ok(fetched)
}

/// Reads batches whose last offset is at least `from`, within a key range
/// bounded by offsets (etcd's range cost grows with the keys left in the
/// range, whatever the limit), and falls back to an open range only when a
/// gap (a truncation) leaves that window empty.
///
/// `Cut::Exact` returns at most `max` messages, cutting inside a batch;
/// `Cut::WholeBatches(n)` reads at most `n` batches and returns all of their
/// messages, stopping after the batch that reaches `max`. Readers that
/// continue from `next_offset` use the latter so that a large batch is
/// decoded once, not once per page.
///
/// Keys that fail [`Partition::decode_batch`] are skipped and their errors returned
/// beside the result (at most [`MAX_CORRUPT_KEPT`]; more are only counted
/// in a warning); they never move `next_offset`. When a read found
/// only such keys, the next read starts just after them (and goes on to the
/// open range), so garbage neither stops the fetch short of a good batch
/// behind it nor makes it read the same keys again.
#[tracing::instrument(level = "debug", name = "fetch", skip(client, shared, part, cut), fields(topic = %part.topic(), partition = part.number()))]
pub(crate) async fn read_partition(
    client: &Client,
    shared: Option<&SharedReads>,
    part: &Partition,
    from: u64,
    max: usize,
    cut: Cut,
) -> Result<(Fetched, Vec<Error>)> {
    let max = max.max(1);
    let window_limit = match cut {
        Cut::Exact => max,
        Cut::WholeBatches(batches) => batches.max(1),
    }
    .min(MAX_BATCHES_PER_READ) as i64;
    let keys = &client.keys;
    let window_end = from
        .saturating_add(max as u64)
        .saturating_add(MAX_RECORDS_PER_BATCH);
    let mut start = keys.batch(part, from).into_bytes();
    let mut end = keys.batch(part, window_end).into_bytes();
    let mut limit = window_limit;
    let mut open = false;
    let mut fetched = Fetched {
        messages: Vec::new(),
        next_offset: from,
        revision: 0,
        batches: 0,
    };
    let mut corrupt = Vec::new();
    let mut corrupt_dropped = 0usize;
    let now = record::now_millis();
    'read: loop {
        let options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        // Only the first read is shared: the others (gaps, garbage) are rare.
        let (revision, kvs) = match shared {
            Some(shared) if fetched.revision == 0 => shared.read(start.clone(), options).await?,
            _ => {
                let mut response = client.read("fetch", start.clone(), Some(options)).await?;
                (
                    response.header().map_or(0, |h| h.revision()),
                    response.take_kvs(),
                )
            }
        };
        if fetched.revision == 0 {
            // The first read's revision: a watch from just after it misses
            // nothing, and readers drop what it delivers twice by offset.
            fetched.revision = revision;
        }
        let full = kvs.len() as i64 == limit;
        let Some(last_key) = kvs.last().map(|kv| kv.key().to_vec()) else {
            if open {
                break;
            }
            open = true;
            end = prefix_end(&keys.batches_prefix(part));
            limit = 1;
            continue;
        };
        for kv in kvs {
            let (key, value) = kv.into_key_value();
            let batch = match part.decode_batch(keys, &key, Bytes::from(value)) {
                Ok(batch) => batch,
                Err(error) if corrupt.len() < MAX_CORRUPT_KEPT => {
                    corrupt.push(error);
                    continue;
                }
                Err(_) => {
                    corrupt_dropped += 1;
                    continue;
                }
            };
            let batch_end = batch.base_offset + u64::from(batch.offset_count);
            for message in record::batch_messages(part, batch, from, now) {
                if cut == Cut::Exact && fetched.messages.len() == max {
                    break 'read;
                }
                fetched.next_offset = message.offset + 1;
                fetched.messages.push(message);
            }
            fetched.next_offset = fetched.next_offset.max(batch_end);
            fetched.batches += 1;
            if fetched.messages.len() >= max {
                break;
            }
        }
        if fetched.batches > 0 {
            break;
        }
        start = last_key;
        start.push(0);
        if !full && !open {
            open = true;
            end = prefix_end(&keys.batches_prefix(part));
            limit = 1;
        }
    }
    if corrupt_dropped > 0 {
        tracing::warn!(topic = %part.topic(), partition = part.number(), skipped = corrupt_dropped, "skipped more corrupt batches than reported");
    }
    Ok((fetched, corrupt))
}
