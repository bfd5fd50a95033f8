//! The etcd key layout: the one place that spells out every key the library
//! reads or writes. DESIGN.md documents the same layout for other readers.
//!
//! ```text
//! <ns>/topics/<topic>                               topic metadata (JSON); its create
//!                                                   revision is the topic's incarnation
//! <ns>/data/<topic>/<inc>/<partition>/head          partition head (next offset, idempotence table)
//! <ns>/data/<topic>/<inc>/<partition>/b/<last>      record batch, named by its LAST offset
//! <ns>/data/<topic>/<inc>/<partition>/w/<producer>  a producer starved by contention (ms timestamp)
//! <ns>/groups/<topic>/<group>/members/<member>      live member (leased)
//! <ns>/groups/<topic>/<group>/owners/<partition>    partition owner (leased)
//! <ns>/groups/<topic>/<group>/offsets/<partition>   committed offset (next offset to read)
//! _pubsub-etcd!/compaction                          cluster-wide: automatic history compaction
//! <ns>/queues/<topic>/<queue>/<partition>           queue state of one partition (JSON)
//! <ns>/queues/<topic>/<queue>/s/<worker>            settle operations of one worker (JSON)
//! <ns>/queues/<topic>/<queue>/w/<worker>            a running worker (leased)
//! ```
//!
//! `<ns>` is a single name, optionally after a leading `/` ([`Keys::new`]),
//! so no namespace's keys lie under another's prefix.
//!
//! Partitions and offsets are zero-padded decimals, so etcd's byte order is
//! numeric order. Every prefix used in a range ends in `/`: names may contain
//! `-` and `.`, which sort before `/`, so `topics/a` must never match `topics/a-b`.

use crate::error::{Error, Result};
use crate::partition::Partition;
use crate::topic::check_name;

/// Width of a zero-padded offset: `u64::MAX` has 20 digits.
const OFFSET_WIDTH: usize = 20;
/// Width of a zero-padded partition number; `MAX_PARTITIONS` fits in 5 digits.
const PARTITION_WIDTH: usize = 5;

/// Builds the keys of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The namespace followed by `/`.
    root: String,
}

impl Keys {
    /// Checks the namespace rule. A namespace is one name (the topic naming
    /// rules), optionally after a leading `/`, so `<ns>/` of one namespace
    /// is never a prefix of another's: every key and range of a namespace
    /// lies under its own root, and no two roots nest.
    pub(crate) fn new(namespace: &str) -> Result<Self> {
        let trimmed = namespace.strip_suffix('/').unwrap_or(namespace);
        let name = trimmed.strip_prefix('/').unwrap_or(trimmed);
        let reason = if name.contains('/') {
            Some("must be a single name without '/' (namespaces that nest would share keys)")
        } else {
            check_name(name).err()
        };
        match reason {
            Some(reason) => Err(Error::InvalidNamespace {
                namespace: namespace.to_string(),
                reason,
            }),
            None => Ok(Keys {
                root: format!("{trimmed}/"),
            }),
        }
    }

    /// The namespace, without the trailing `/`.
    pub(crate) fn namespace(&self) -> &str {
        &self.root[..self.root.len() - 1]
    }

    pub(crate) fn topics_prefix(&self) -> String {
        format!("{}topics/", self.root)
    }

    pub(crate) fn topic(&self, topic: &str) -> String {
        format!("{}topics/{topic}", self.root)
    }

    /// Every incarnation's data of one topic.
    pub(crate) fn topic_data_prefix(&self, topic: &str) -> String {
        format!("{}data/{topic}/", self.root)
    }

    /// Everything stored under one partition.
    pub(crate) fn partition_prefix(&self, p: &Partition) -> String {
        format!(
            "{}data/{}/{}/{:0PARTITION_WIDTH$}/",
            self.root,
            p.topic(),
            p.incarnation(),
            p.number()
        )
    }

    pub(crate) fn head(&self, p: &Partition) -> String {
        format!("{}head", self.partition_prefix(p))
    }

    pub(crate) fn batches_prefix(&self, p: &Partition) -> String {
        format!("{}b/", self.partition_prefix(p))
    }

    /// Markers of producers starved by contention on one partition.
    pub(crate) fn waiting_prefix(&self, p: &Partition) -> String {
        format!("{}w/", self.partition_prefix(p))
    }

    pub(crate) fn waiting(&self, p: &Partition, producer_id: u64) -> String {
        format!("{}{producer_id:016x}", self.waiting_prefix(p))
    }

    /// The key of the batch whose last offset is `last_offset`.
    pub(crate) fn batch(&self, p: &Partition, last_offset: u64) -> String {
        format!("{}{last_offset:0OFFSET_WIDTH$}", self.batches_prefix(p))
    }

    /// Every group's state for one topic.
    pub(crate) fn topic_groups_prefix(&self, topic: &str) -> String {
        format!("{}groups/{topic}/", self.root)
    }

    pub(crate) fn groups_root(&self) -> String {
        format!("{}groups/", self.root)
    }

    pub(crate) fn group_prefix(&self, topic: &str, group: &str) -> String {
        format!("{}groups/{topic}/{group}/", self.root)
    }

    pub(crate) fn members_prefix(&self, topic: &str, group: &str) -> String {
        format!("{}members/", self.group_prefix(topic, group))
    }

    pub(crate) fn member(&self, topic: &str, group: &str, member: &str) -> String {
        format!("{}{member}", self.members_prefix(topic, group))
    }

    pub(crate) fn owners_prefix(&self, topic: &str, group: &str) -> String {
        format!("{}owners/", self.group_prefix(topic, group))
    }

    pub(crate) fn owner(&self, topic: &str, group: &str, partition: u32) -> String {
        format!(
            "{}{partition:0PARTITION_WIDTH$}",
            self.owners_prefix(topic, group)
        )
    }

    pub(crate) fn offsets_prefix(&self, topic: &str, group: &str) -> String {
        format!("{}offsets/", self.group_prefix(topic, group))
    }

    pub(crate) fn offset(&self, topic: &str, group: &str, partition: u32) -> String {
        format!(
            "{}{partition:0PARTITION_WIDTH$}",
            self.offsets_prefix(topic, group)
        )
    }

    /// Parses the number after the last `/` of a key (a partition or offset).
    pub(crate) fn trailing_number(key: &[u8]) -> Option<u64> {
        let key = std::str::from_utf8(key).ok()?;
        key.rsplit('/').next()?.parse().ok()
    }

    /// The key that coordinates automatic history compaction across every
    /// client of the etcd cluster, whatever their namespace (compaction is
    /// cluster-wide). Outside every namespace: its first segment holds a
    /// `!`, which no namespace may contain, so no namespace's prefix (and
    /// no RBAC grant of one) covers it.
    pub(crate) const COMPACTION: &'static str = "_pubsub-etcd!/compaction";

    /// Every queue's state on one topic.
    pub(crate) fn topic_queues_prefix(&self, topic: &str) -> String {
        format!("{}queues/{topic}/", self.root)
    }

    /// Every partition's state of one queue.
    pub(crate) fn queue_prefix(&self, topic: &str, queue: &str) -> String {
        format!("{}queues/{topic}/{queue}/", self.root)
    }

    pub(crate) fn queue_partition(&self, topic: &str, queue: &str, partition: u32) -> String {
        format!(
            "{}{partition:0PARTITION_WIDTH$}",
            self.queue_prefix(topic, queue)
        )
    }

    /// Where one worker of a queue keeps the settle operations it made that
    /// may not be in the partition states yet.
    pub(crate) fn queue_settled(&self, topic: &str, queue: &str, worker: &str) -> String {
        format!("{}{worker}", self.queue_settled_prefix(topic, queue))
    }

    /// Where a running worker of a queue announces itself, on an etcd lease
    /// of its own, so lease rounds know how many workers share the work.
    pub(crate) fn queue_worker(&self, topic: &str, queue: &str, worker: &str) -> String {
        format!("{}w/{worker}", self.queue_prefix(topic, queue))
    }

    /// Every worker's settled key of one queue.
    pub(crate) fn queue_settled_prefix(&self, topic: &str, queue: &str) -> String {
        format!("{}s/", self.queue_prefix(topic, queue))
    }

    /// What a key under [`Keys::queue_prefix`] is; None for a key of any
    /// other shape.
    pub(crate) fn queue_key<'k>(
        &self,
        topic: &str,
        queue: &str,
        key: &'k [u8],
    ) -> Option<QueueKey<'k>> {
        let rest = key.strip_prefix(self.queue_prefix(topic, queue).as_bytes())?;
        let worker = |tail: &'k [u8]| {
            std::str::from_utf8(tail)
                .ok()
                .filter(|w| !w.is_empty() && !w.contains('/'))
        };
        if let Some(tail) = rest.strip_prefix(b"s/") {
            return worker(tail).map(QueueKey::Settled);
        }
        if let Some(tail) = rest.strip_prefix(b"w/") {
            return worker(tail).map(QueueKey::Live);
        }
        if rest.len() != PARTITION_WIDTH || !rest.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(rest)
            .ok()?
            .parse()
            .ok()
            .map(QueueKey::Partition)
    }

    /// The queue a key under [`Keys::topic_queues_prefix`] belongs to.
    pub(crate) fn queue_of<'k>(&self, topic: &str, key: &'k [u8]) -> Option<&'k str> {
        let rest = key.strip_prefix(self.topic_queues_prefix(topic).as_bytes())?;
        let (queue, _) = std::str::from_utf8(rest).ok()?.split_once('/')?;
        Some(queue)
    }
}

/// The kinds of key under a queue's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueKey<'k> {
    /// The state of one partition.
    Partition(u32),
    /// One worker's settle operations.
    Settled(&'k str),
    /// A running worker.
    Live(&'k str),
}

/// The end of a prefix range: the prefix with its last byte incremented.
/// Every prefix here ends in `/`, so the increment never overflows.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keys_sort_in_offset_order() {
        let keys = Keys::new("ns").unwrap();
        let p = Partition::new("t".into(), 7, 3);
        let a = keys.batch(&p, 9);
        let b = keys.batch(&p, 10);
        let c = keys.batch(&p, u64::MAX);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a, "ns/data/t/7/00003/b/00000000000000000009");
        assert_eq!(Keys::trailing_number(c.as_bytes()), Some(u64::MAX));
    }

    #[test]
    fn queue_keys_parse_back_and_refuse_other_shapes() {
        let keys = Keys::new("ns").unwrap();
        let key = keys.queue_partition("t", "q", 42);
        let parse = |queue: &str, key: &str| {
            keys.queue_key("t", queue, key.as_bytes()).map(|k| match k {
                QueueKey::Partition(p) => p.to_string(),
                QueueKey::Settled(w) => format!("s {w}"),
                QueueKey::Live(w) => format!("w {w}"),
            })
        };
        assert_eq!(parse("q", &key).as_deref(), Some("42"));
        assert_eq!(keys.queue_of("t", key.as_bytes()), Some("q"));
        let settled = keys.queue_settled("t", "q", "host-1-a");
        assert_eq!(parse("q", &settled).as_deref(), Some("s host-1-a"));
        let live = keys.queue_worker("t", "q", "host-1-a");
        assert_eq!(parse("q", &live).as_deref(), Some("w host-1-a"));
        for bad in [
            "ns/queues/t/q/42",
            "ns/queues/t/q/0004x",
            "ns/queues/t/q/000420",
            "ns/queues/t/q/s/",
            "ns/queues/t/q/s/a/b",
            "ns/queues/t/q/w/",
            "ns/queues/t/q/w/a/b",
            "ns/queues/t/q/x/a",
        ] {
            assert_eq!(parse("q", bad), None, "{bad}");
        }
        assert_eq!(parse("q-b", &key), None);
    }

    #[test]
    fn prefixes_do_not_match_longer_names() {
        let keys = Keys::new("ns/").unwrap();
        let a = keys.topic_data_prefix("a");
        let ab = keys.topic_data_prefix("a-b");
        assert!(!ab.starts_with(&a));
        assert!(ab.as_bytes() < prefix_end(&a).as_slice() && ab < a);
        assert_eq!(prefix_end("x/"), b"x0".to_vec());
    }

    /// Every key and range prefix the library can form in one namespace,
    /// for names chosen to collide with the layout's own segments.
    fn everything(keys: &Keys) -> Vec<String> {
        let mut all = vec![keys.topics_prefix(), keys.groups_root()];
        for topic in ["t", "data", "groups", "topics", "foo", "a-b"] {
            all.push(keys.topic(topic));
            all.push(keys.topic_data_prefix(topic));
            let p = Partition::new(topic.into(), 1, 0);
            all.push(keys.head(&p));
            all.push(keys.batch(&p, u64::MAX));
            all.push(keys.waiting(&p, 7));
            all.push(keys.topic_groups_prefix(topic));
            for group in ["g", "members", "offsets"] {
                all.push(keys.member(topic, group, "m"));
                all.push(keys.owner(topic, group, 0));
                all.push(keys.offset(topic, group, 0));
            }
            all.push(keys.topic_queues_prefix(topic));
            for queue in ["q", "queues", "q-b"] {
                all.push(keys.queue_prefix(topic, queue));
                all.push(keys.queue_partition(topic, queue, 0));
                all.push(keys.queue_settled(topic, queue, "w"));
            }
        }
        all
    }

    #[test]
    fn no_namespace_reaches_into_another() {
        let names = [
            "x",
            "x-",
            "x.",
            "x_",
            "xx",
            "data",
            "topics",
            "groups",
            "queues",
            "foo",
            "g",
            "t",
            "/x",
            "/data",
            "x/",
            "pubsub-etcd",
            "..x",
        ];
        for a in names {
            let ka = Keys::new(a).unwrap();
            for b in names {
                let kb = Keys::new(b).unwrap();
                if ka.namespace() == kb.namespace() {
                    continue;
                }
                // A range over a prefix covers exactly the keys starting with
                // it, so "B can touch a key of A" is "A's key starts with B's root".
                for key in everything(&ka) {
                    assert!(
                        !key.starts_with(&kb.root),
                        "namespace {b:?} reaches {key:?} of namespace {a:?}"
                    );
                    assert!(key.as_bytes() >= ka.root.as_bytes());
                    assert!(key.as_bytes() < prefix_end(&ka.root).as_slice());
                }
            }
        }
    }

    #[test]
    fn nesting_namespaces_are_refused() {
        for bad in [
            "x/data/foo",
            "n/topics",
            "g/groups/t",
            "a//b",
            "",
            "/",
            "//",
            ".",
            "a b",
        ] {
            let err = Keys::new(bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidNamespace { namespace, .. } if namespace == bad),
                "{bad:?}: {err}"
            );
        }
        assert_eq!(Keys::new("/app/").unwrap().namespace(), "/app");
        assert_eq!(Keys::new("app/").unwrap().namespace(), "app");
    }
}
