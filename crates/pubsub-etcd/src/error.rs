//! The library's error type: one enum, every variant naming what was wrong.

use std::sync::Arc;
use std::time::Duration;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in pubsub-etcd.
///
/// `Clone` because one failed etcd transaction fails every record of the
/// batch it carried, and each record's caller gets its own copy.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A topic name breaks the naming rules.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },

    /// A consumer group name breaks the naming rules.
    #[error("invalid group name {name:?}: {reason}")]
    InvalidGroupName { name: String, reason: &'static str },

    /// A namespace breaks the naming rules (one name, optionally after a
    /// leading `/`; see [`ClientBuilder::namespace`](crate::ClientBuilder::namespace)).
    #[error("invalid namespace {namespace:?}: {reason}")]
    InvalidNamespace {
        namespace: String,
        reason: &'static str,
    },

    /// A partition count outside `1..=MAX_PARTITIONS`.
    #[error("invalid partition count {count}: must be between 1 and {max}")]
    InvalidPartitionCount { count: u32, max: u32 },

    /// A setting of a builder or of a topic is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// `create_topic` lost to an existing topic of the same name.
    #[error("topic {0:?} already exists")]
    TopicExists(String),

    /// No topic of that name exists.
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),

    /// The topic this handle was made for was deleted (and possibly created
    /// again as a new topic, which this handle never writes to).
    #[error("topic {0:?} was deleted")]
    TopicDeleted(String),

    /// A partition number the topic does not have.
    #[error("partition {partition} does not exist: topic {topic:?} has {partitions} partitions")]
    PartitionOutOfRange {
        topic: String,
        partition: u32,
        partitions: u32,
    },

    /// Partition counts only grow: keyed records would change partition.
    #[error("cannot decrease the partitions of topic {topic:?} from {current} to {requested}")]
    PartitionDecrease {
        topic: String,
        current: u32,
        requested: u32,
    },

    /// One record is larger than fits in one etcd request; nothing was written.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes per message")]
    MessageTooLarge { size: usize, limit: usize },

    /// Other producers won every append to the partition until the
    /// delivery timeout; the records were not stored.
    #[error("records for partition {partition} of topic {topic:?} were not stored within {waited:?}: other producers won every append")]
    Contended {
        topic: String,
        partition: u32,
        waited: Duration,
    },

    /// etcd did not answer within the request timeout.
    #[error("etcd did not answer {op} within {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },

    /// etcd could not be reached, or did not answer, for `waited` while
    /// records were being stored: they were not acknowledged, and may or
    /// may not be stored (an attempt may have applied unseen).
    #[error("etcd unavailable: {op} got no answer for {waited:?} ({detail}); the records may or may not be stored")]
    Unavailable {
        op: &'static str,
        waited: Duration,
        detail: String,
    },

    /// etcd's backend quota is exhausted (NOSPACE alarm): writes fail until
    /// an operator compacts, defragments and disarms the alarm.
    #[error("etcd quota exceeded during {op}: database space exceeded (compact, defragment and disarm the NOSPACE alarm)")]
    QuotaExceeded { op: &'static str },

    /// Any other failure reported by etcd or the connection to it.
    /// `detail` is etcd's own message (e.g. `etcdserver: request is too
    /// large`) or the connection error; `source` keeps the full error.
    #[error("etcd {op} failed: {detail}")]
    Etcd {
        op: &'static str,
        detail: String,
        #[source]
        source: EtcdError,
    },

    /// A stored value that this version cannot read.
    #[error("corrupt or unreadable value at key {key:?}: {reason}")]
    Corrupt { key: String, reason: String },

    /// The producer was closed before the record was sent.
    #[error("producer is closed")]
    ProducerClosed,

    /// No group of that name has state in this namespace.
    #[error("consumer group {0:?} does not exist")]
    GroupNotFound(String),

    /// An admin change to a group that live members would race with.
    #[error("consumer group {group:?} has live members on topic {topic:?}; stop them first")]
    GroupActive { group: String, topic: String },

    /// This member no longer owns the partition (its lease expired, or the
    /// partition was reassigned), so it may not commit for it.
    #[error("partition {partition} of topic {topic:?} is not owned by this member (lost or reassigned); commit refused")]
    NotOwner { topic: String, partition: u32 },

    /// A commit below the offset the partition's previous owner committed
    /// (possible after seeking back): committed offsets never move
    /// backwards past another owner's commit.
    #[error("commit of offset {offset} on partition {partition} of topic {topic:?} refused: it is below {committed}, committed by the partition's previous owner")]
    CommitBehind {
        topic: String,
        partition: u32,
        offset: u64,
        committed: u64,
    },

    /// A transaction commits an input message below the group's committed
    /// offset: it was handled already, and committed offsets never move
    /// backwards. Nothing of the transaction was written.
    #[error("input offset {offset} of partition {partition} of topic {topic:?} is below the committed offset {committed}: already handled; transaction refused")]
    InputCommitted {
        topic: String,
        partition: u32,
        offset: u64,
        committed: u64,
    },

    /// A transaction would exceed one of etcd's limits per transaction;
    /// nothing was sent.
    #[error("transaction needs {needed} {limit}, above the limit of {max}; nothing was written")]
    TransactionTooLarge {
        limit: &'static str,
        needed: usize,
        max: usize,
    },

    /// etcd ended a watch stream without an error.
    #[error("etcd ended the watch stream")]
    WatchEnded,

    /// The consumer was closed.
    #[error("consumer is closed")]
    ConsumerClosed,

    /// A queue partition's state would exceed what one etcd write carries
    /// (too many scattered unsettled offsets); the settlements it carried
    /// were not written, so their messages will be redelivered.
    #[error("queue state at key {key:?} would be {bytes} bytes, above the limit of {limit}")]
    QueueStateTooLarge {
        key: String,
        bytes: usize,
        limit: usize,
    },
}

/// The error etcd or the connection to it reported, as the etcd client
/// library gave it. Opaque, so that the etcd client's version is not part of
/// this crate's API: print it, or follow [`std::error::Error::source`].
#[derive(Debug, Clone)]
pub struct EtcdError(Arc<etcd_client::Error>);

impl EtcdError {
    pub(crate) fn inner(&self) -> &etcd_client::Error {
        &self.0
    }
}

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for EtcdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl Error {
    /// Wraps an etcd-client error, recognising the few that callers act on.
    pub(crate) fn etcd(op: &'static str, source: etcd_client::Error) -> Self {
        if let etcd_client::Error::GRpcStatus(status) = &source {
            if status.message().contains("database space exceeded") {
                return Error::QuotaExceeded { op };
            }
        }
        let detail = match &source {
            etcd_client::Error::GRpcStatus(status) if !status.message().is_empty() => {
                format!("{} ({:?})", status.message(), status.code())
            }
            other => other.to_string(),
        };
        Error::Etcd {
            op,
            detail,
            source: EtcdError(Arc::new(source)),
        }
    }

    /// True when a request may or may not have been applied by etcd: a
    /// timeout or a connection that broke mid-request. Retrying such a write
    /// is only safe when it is idempotent.
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Unavailable { .. } => true,
            Error::Etcd { source, .. } => match source.inner() {
                etcd_client::Error::GRpcStatus(status) => matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                ),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }
}
