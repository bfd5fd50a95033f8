//! Metrics: the name, labels and meaning of everything the library records
//! through the [`metrics`] facade, and the one place that records them.
//!
//! Nothing is recorded until the application installs a recorder (for
//! example `metrics-exporter-prometheus`); without one every call here is a
//! no-op. Call [`describe_metrics`] after installing it so exporters can
//! show units and help texts.
//!
//! ```no_run
//! // In an application (with metrics-exporter-prometheus as a dependency):
//! // metrics_exporter_prometheus::PrometheusBuilder::new()
//! //     .with_http_listener(([127, 0, 0, 1], 9000))
//! //     .install()?;
//! pubsub_etcd::telemetry::describe_metrics();
//! ```
//!
//! Labels are `topic` and `group`, and `partition` for lag only, so the
//! number of series grows with topics and groups, not with messages.
//!
//! Install the recorder before making consumers: a group member takes its
//! delivered-messages counter when it is made.

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Unit,
};

/// Messages acknowledged as stored, by topic.
pub const PRODUCED_MESSAGES: &str = "pubsub_etcd_produced_messages_total";
/// Record bytes (encoded key, value and headers) acknowledged as stored, by topic.
pub const PRODUCED_BYTES: &str = "pubsub_etcd_produced_bytes_total";
/// Time from the first attempt of an append to its acknowledgement, by topic.
pub const APPEND_SECONDS: &str = "pubsub_etcd_append_seconds";
/// Append attempts that lost the race for a partition head, by topic.
pub const APPEND_CONFLICTS: &str = "pubsub_etcd_append_conflicts_total";
/// Append attempts made again after an unknown outcome or an unreachable etcd, by topic.
pub const APPEND_RETRIES: &str = "pubsub_etcd_append_retries_total";
/// Messages handed to the application by a group member, by topic and group.
pub const DELIVERED_MESSAGES: &str = "pubsub_etcd_delivered_messages_total";
/// Time a fenced commit of offsets takes, by topic and group.
pub const COMMIT_SECONDS: &str = "pubsub_etcd_commit_seconds";
/// Membership and ownership changes (etcd watch events) a group member's
/// balancing loop received, by topic and group. Commits are not among them:
/// a steady group adds nothing here however fast it commits.
pub const MEMBERSHIP_EVENTS: &str = "pubsub_etcd_membership_events_total";
/// Rebalances that changed what a member owns, by topic and group.
pub const REBALANCES: &str = "pubsub_etcd_rebalances_total";
/// Partitions a member owns now, by topic and group.
pub const OWNED_PARTITIONS: &str = "pubsub_etcd_owned_partitions";
/// Messages stored but not yet delivered, per owned partition, by topic,
/// group and partition; refreshed every few seconds (0 once released).
pub const LAG: &str = "pubsub_etcd_lag_messages";
/// Partition readers that went back to range reads after a watch broke or
/// was compacted, by topic.
pub const READER_RECONNECTS: &str = "pubsub_etcd_reader_reconnects_total";
/// etcd history compactions this process performed.
pub const HISTORY_COMPACTIONS: &str = "pubsub_etcd_history_compactions_total";
/// 1 while no etcd endpoint answers, 0 otherwise.
pub const ETCD_UNREACHABLE: &str = "pubsub_etcd_etcd_unreachable";

/// Registers the unit and help text of every metric with the installed
/// recorder.
pub fn describe_metrics() {
    describe_counter!(
        PRODUCED_MESSAGES,
        Unit::Count,
        "Messages acknowledged as stored"
    );
    describe_counter!(
        PRODUCED_BYTES,
        Unit::Bytes,
        "Record bytes acknowledged as stored"
    );
    describe_histogram!(
        APPEND_SECONDS,
        Unit::Seconds,
        "Append latency, first attempt to acknowledgement"
    );
    describe_counter!(
        APPEND_CONFLICTS,
        Unit::Count,
        "Append attempts that lost the race for the partition head"
    );
    describe_counter!(
        APPEND_RETRIES,
        Unit::Count,
        "Append attempts retried after an unknown outcome"
    );
    describe_counter!(
        DELIVERED_MESSAGES,
        Unit::Count,
        "Messages delivered to the application by a group member"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Fenced offset commit latency"
    );
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "Rebalances that changed a member's partitions"
    );
    describe_gauge!(OWNED_PARTITIONS, Unit::Count, "Partitions this member owns");
    describe_gauge!(
        LAG,
        Unit::Count,
        "Messages stored but not yet delivered, per owned partition"
    );
    describe_counter!(
        MEMBERSHIP_EVENTS,
        Unit::Count,
        "Membership and ownership changes a group member received"
    );
    describe_counter!(
        READER_RECONNECTS,
        Unit::Count,
        "Partition readers that fell back to range reads"
    );
    describe_counter!(
        HISTORY_COMPACTIONS,
        Unit::Count,
        "etcd history compactions performed"
    );
    describe_gauge!(
        ETCD_UNREACHABLE,
        Unit::Count,
        "1 while no etcd endpoint answers"
    );
}

pub(crate) fn appended(topic: &str, messages: u64, bytes: u64, took: Duration) {
    counter!(PRODUCED_MESSAGES, "topic" => topic.to_string()).increment(messages);
    counter!(PRODUCED_BYTES, "topic" => topic.to_string()).increment(bytes);
    histogram!(APPEND_SECONDS, "topic" => topic.to_string()).record(took.as_secs_f64());
}

pub(crate) fn append_conflict(topic: &str) {
    counter!(APPEND_CONFLICTS, "topic" => topic.to_string()).increment(1);
}

pub(crate) fn append_retry(topic: &str) {
    counter!(APPEND_RETRIES, "topic" => topic.to_string()).increment(1);
}

pub(crate) fn etcd_unreachable(unreachable: bool) {
    gauge!(ETCD_UNREACHABLE).set(if unreachable { 1.0 } else { 0.0 });
}

/// The counter of messages a group member delivers, taken once per
/// consumer: registering it per message cost two label strings and a
/// registry lookup each, 5% of a catch-up's profile. A consumer made
/// before the recorder was installed therefore records nothing.
pub(crate) fn delivered(topic: &str, group: &str) -> Counter {
    counter!(DELIVERED_MESSAGES, "topic" => topic.to_string(), "group" => group.to_string())
}

pub(crate) fn committed(topic: &str, group: &str, took: Duration) {
    histogram!(COMMIT_SECONDS, "topic" => topic.to_string(), "group" => group.to_string())
        .record(took.as_secs_f64());
}

pub(crate) fn membership_events(topic: &str, group: &str, events: usize) {
    counter!(MEMBERSHIP_EVENTS, "topic" => topic.to_string(), "group" => group.to_string())
        .increment(events as u64);
}

/// A rebalance that changed what this member owns; `owned` is what it owns now.
pub(crate) fn rebalanced(topic: &str, group: &str, owned: usize) {
    counter!(REBALANCES, "topic" => topic.to_string(), "group" => group.to_string()).increment(1);
    gauge!(OWNED_PARTITIONS, "topic" => topic.to_string(), "group" => group.to_string())
        .set(owned as f64);
}

pub(crate) fn reader_reconnect(topic: &str) {
    counter!(READER_RECONNECTS, "topic" => topic.to_string()).increment(1);
}

pub(crate) fn history_compacted() {
    counter!(HISTORY_COMPACTIONS).increment(1);
}

pub(crate) fn lag(topic: &str, group: &str, partition: u32, lag: u64) {
    gauge!(
        LAG,
        "topic" => topic.to_string(),
        "group" => group.to_string(),
        "partition" => partition.to_string()
    )
    .set(lag as f64);
}
