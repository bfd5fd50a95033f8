//! Where reading a partition starts: the [`StartOffset`] policy, and how it
//! resolves to an offset against a partition's stored range now. Shared by
//! group members (a partition with no commit), admin resets and the
//! group-less [`crate::AssignedReader`].

use std::fmt;
use std::str::FromStr;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::fetch::{fetch_partition, Cut};
use crate::partition::Partition;
use crate::topic::TopicInfo;

/// Where a group starts reading a partition it has no committed offset for,
/// or where an admin reset puts it.
///
/// Its text form, read by [`FromStr`] and written by
/// [`Display`](fmt::Display), is `earliest`, `latest`, an offset (`42`) or `@` and
/// a timestamp in ms since the epoch (`@1700000000000`).
///
/// ```
/// use pubsub_etcd::StartOffset;
///
/// let start: StartOffset = "@1700000000000".parse().unwrap();
/// assert_eq!(start, StartOffset::Timestamp(1_700_000_000_000));
/// assert_eq!(start.to_string(), "@1700000000000");
/// ```
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

impl fmt::Display for StartOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartOffset::Earliest => f.write_str("earliest"),
            StartOffset::Latest => f.write_str("latest"),
            StartOffset::Offset(offset) => write!(f, "{offset}"),
            StartOffset::Timestamp(ms) => write!(f, "@{ms}"),
        }
    }
}

/// As its text form, the one [`FromStr`] reads.
impl serde::Serialize for StartOffset {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for StartOffset {
    type Err = Error;

    /// Reads the text form (the words in any case); anything else is
    /// [`Error::InvalidConfig`] naming the input.
    fn from_str(s: &str) -> Result<StartOffset> {
        let parsed = if s.eq_ignore_ascii_case("earliest") {
            Some(StartOffset::Earliest)
        } else if s.eq_ignore_ascii_case("latest") {
            Some(StartOffset::Latest)
        } else if let Some(ms) = s.strip_prefix('@') {
            digits(ms.strip_prefix('-').unwrap_or(ms))
                .then(|| ms.parse().ok())
                .flatten()
                .map(StartOffset::Timestamp)
        } else {
            digits(s)
                .then(|| s.parse().ok())
                .flatten()
                .map(StartOffset::Offset)
        };
        parsed.ok_or_else(|| {
            Error::InvalidConfig(format!(
                "start offset {s:?}: expected earliest, latest, an offset or @<ms since the epoch>"
            ))
        })
    }
}

/// Only ASCII digits: `u64`/`i64` parsing alone would also take a `+`.
fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
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
        self.resolve_within(topic, partition, start, bounds).await
    }

    /// [`Client::resolve_start`] with the partition's (earliest, next)
    /// bounds already read.
    pub(crate) async fn resolve_within(
        &self,
        topic: &TopicInfo,
        partition: u32,
        start: StartOffset,
        bounds: (u64, u64),
    ) -> Result<u64> {
        Ok(match start {
            StartOffset::Earliest => bounds.0,
            StartOffset::Latest => bounds.1,
            StartOffset::Offset(o) => o.clamp(bounds.0, bounds.1),
            StartOffset::Timestamp(ts) => {
                // No time index: scan forward. Timestamps set by producers
                // need not be monotonic, so the first match wins.
                let part = Partition::of(topic, partition);
                let mut from = bounds.0;
                loop {
                    let page =
                        fetch_partition(self, &part, from, 1000, Cut::WholeBatches(4)).await?;
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

    /// Earliest stored and next offsets of each of `partitions` (sorted,
    /// distinct), in their order: a run of neighbouring partitions per
    /// request rather than one partition per request.
    pub(crate) async fn partition_bounds_of(
        &self,
        topic: &TopicInfo,
        partitions: &[u32],
    ) -> Result<Vec<(u64, u64)>> {
        let mut bounds = Vec::with_capacity(partitions.len());
        let mut rest = partitions;
        while let Some(&first) = rest.first() {
            // A run ends where a gap would make it read partitions not asked for.
            let run = rest
                .windows(2)
                .position(|w| w[1] != w[0] + 1)
                .map_or(rest.len(), |i| i + 1);
            let last = rest[run - 1];
            // One entry per partition of the range, in order.
            let infos = self.partition_infos(topic, first..last + 1).await?;
            bounds.extend(infos.iter().map(|p| (p.earliest, p.next)));
            rest = &rest[run..];
        }
        Ok(bounds)
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

#[cfg(test)]
mod tests {
    use super::StartOffset;

    #[test]
    fn the_text_form_round_trips() {
        for start in [
            StartOffset::Earliest,
            StartOffset::Latest,
            StartOffset::Offset(0),
            StartOffset::Offset(u64::MAX),
            StartOffset::Timestamp(1_700_000_000_000),
            StartOffset::Timestamp(-5),
            StartOffset::Timestamp(i64::MIN),
        ] {
            assert_eq!(start.to_string().parse::<StartOffset>().unwrap(), start);
        }
        assert_eq!(StartOffset::Offset(42).to_string(), "42");
        assert_eq!(
            serde_json::to_string(&StartOffset::Timestamp(5)).unwrap(),
            r#""@5""#
        );
        assert_eq!(
            "EARLIEST".parse::<StartOffset>().unwrap(),
            StartOffset::Earliest
        );
        assert_eq!(
            "Latest".parse::<StartOffset>().unwrap(),
            StartOffset::Latest
        );
    }

    #[test]
    fn anything_else_is_refused_naming_the_input() {
        for bad in [
            "",
            "@",
            "+5",
            "-1",
            "@+5",
            "@-",
            "1.5",
            " 1",
            "18446744073709551616",
            "@9223372036854775808",
            "first",
            "@latest",
        ] {
            let err = bad.parse::<StartOffset>().unwrap_err();
            assert!(
                matches!(&err, crate::Error::InvalidConfig(m) if m.contains(&format!("{bad:?}"))),
                "{bad:?}: {err}"
            );
        }
    }
}
