//! Joining a consumer group: the [`ConsumerBuilder`] with its settings,
//! their defaults and bounds, and the member id a member gets by default.
//! What a joined member does is `consumer.rs`'s and `group/`'s.

use std::time::Duration;

use crate::client::Client;
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::group::{AutoCommit, StartOffset};
use crate::topic::validate_group_name;

/// Upper bounds of the builder's sizes and durations: far above any sane
/// setting, low enough that no arithmetic on them overflows.
const MAX_BUFFER: usize = 1 << 20;
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
const MAX_FETCHES: usize = 1024;
/// Enough reads in flight to keep one etcd member busy during a catch-up
/// over many partitions, few enough that their pages stay a few MiB.
pub(crate) const DEFAULT_FETCHES: usize = 8;

/// Configures a group [`Consumer`]; every setting has a documented default.
#[derive(Debug, Clone)]
pub struct ConsumerBuilder {
    pub(crate) client: Client,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) member_id: Option<String>,
    pub(crate) session_ttl: Duration,
    pub(crate) start: StartOffset,
    pub(crate) auto_commit: AutoCommit,
    pub(crate) page: usize,
    pub(crate) buffer: usize,
    pub(crate) fetches: usize,
}

impl ConsumerBuilder {
    /// Lease TTL of the member: a member that stops renewing it (dies,
    /// freezes, is cut off) loses its partitions this long after its last
    /// renewal. Default: 10 s; from 2 s (etcd's minimum) to 24 h.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Where to start on a partition the group never committed. Default:
    /// [`StartOffset::Earliest`].
    pub fn start_offset(mut self, start: StartOffset) -> Self {
        self.start = start;
        self
    }

    /// When to commit on its own. Default: [`AutoCommit::Interval`] of 5 s.
    pub fn auto_commit(mut self, policy: AutoCommit) -> Self {
        self.auto_commit = policy;
        self
    }

    /// A stable member id (e.g. a pod name). Default: host-pid-random.
    pub fn member_id(mut self, id: impl Into<String>) -> Self {
        self.member_id = Some(id.into());
        self
    }

    /// Messages read per etcd request while catching up. Default: 1,000.
    pub fn fetch_messages(mut self, messages: usize) -> Self {
        self.page = messages;
        self
    }

    /// Messages buffered ahead of the application, across all owned
    /// partitions. Default: 1,024; at most 2^20 (as for `fetch_messages`).
    pub fn buffer(mut self, messages: usize) -> Self {
        self.buffer = messages;
        self
    }

    /// Reads (or watch responses) whose messages may be held at once,
    /// waiting for room in the buffer, across all owned partitions. With
    /// `buffer`, this bounds the messages a consumer holds at
    /// `buffer + max_fetches_in_flight × fetch_messages`, whatever the
    /// partition count; a watch response counts as one fetch.
    /// Default: 8; from 1 to 1,024.
    pub fn max_fetches_in_flight(mut self, fetches: usize) -> Self {
        self.fetches = fetches;
        self
    }

    /// Joins the group and starts consuming.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGroupName`] or [`Error::InvalidConfig`] for a bad
    /// group name, member id or setting; [`Error::TopicNotFound`] when the
    /// topic does not exist; [`Error::Timeout`] or [`Error::Etcd`] when
    /// etcd cannot be reached to register the member.
    ///
    /// # Cancel safety
    ///
    /// Not cancel-safe: a join dropped half-way may leave a member key that
    /// stays until its lease expires (the session TTL), and the group
    /// balances partitions to it meanwhile.
    pub async fn join(self) -> Result<Consumer> {
        validate_group_name(&self.group)?;
        if self.session_ttl < Duration::from_secs(2) || self.session_ttl > MAX_DURATION {
            return Err(Error::InvalidConfig(format!(
                "session_ttl is {:?}; it must be between 2 s and 24 h",
                self.session_ttl
            )));
        }
        if let AutoCommit::Interval(every) = self.auto_commit {
            if every.is_zero() || every > MAX_DURATION {
                return Err(Error::InvalidConfig(format!(
                    "the auto-commit interval is {every:?}; it must be between 1 ns and 24 h"
                )));
            }
        }
        if !(1..=MAX_BUFFER).contains(&self.page) || !(1..=MAX_BUFFER).contains(&self.buffer) {
            return Err(Error::InvalidConfig(format!(
                "fetch_messages is {} and buffer is {}; both must be between 1 and {MAX_BUFFER}",
                self.page, self.buffer
            )));
        }
        if !(1..=MAX_FETCHES).contains(&self.fetches) {
            return Err(Error::InvalidConfig(format!(
                "max_fetches_in_flight is {}; it must be between 1 and {MAX_FETCHES}",
                self.fetches
            )));
        }
        if let Some(id) = &self.member_id {
            validate_group_name(id).map_err(|_| {
                Error::InvalidConfig(format!(
                    "member id {id:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
                ))
            })?;
        }
        let topic = self.client.topic(&self.topic).await?;
        let member_id = self.member_id.clone().unwrap_or_else(default_member_id);
        Consumer::start(self, topic, member_id).await
    }
}

fn default_member_id() -> String {
    // The machine's own name ($HOSTNAME is a shell variable, rarely
    // exported), cut to leave room for the suffix.
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .take(200)
        .collect();
    let host = Some(host)
        .filter(|h| !h.is_empty() && validate_group_name(h).is_ok())
        .unwrap_or_else(|| "member".to_string());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

impl Client {
    /// Starts configuring a member of consumer group `group` on `topic`.
    pub fn consumer(&self, topic: impl Into<String>, group: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder {
            client: self.clone(),
            topic: topic.into(),
            group: group.into(),
            member_id: None,
            session_ttl: Duration::from_secs(10),
            start: StartOffset::Earliest,
            auto_commit: AutoCommit::default(),
            page: 1000,
            buffer: 1024,
            fetches: DEFAULT_FETCHES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_member_id;

    #[test]
    fn member_ids_start_with_the_host_name() {
        // The kernel's name for the machine, whatever the environment says.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let id = default_member_id();
        assert!(
            id.starts_with(&format!("{}-{}-", host.trim(), std::process::id())),
            "{id}"
        );
    }
}
