//! The command-line interface: every command, option and value parser.
//! Behaviour lives in `commands`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// A brokerless publish/subscribe log on etcd.
#[derive(Debug, Parser)]
#[command(name = "pubsub-etcd", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// How to reach etcd; accepted before or after the subcommand.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionArgs {
    /// etcd endpoints, comma-separated (host:port or http(s):// URLs)
    #[arg(
        long,
        global = true,
        env = "PUBSUB_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = pubsub_etcd::DEFAULT_ENDPOINT,
        value_name = "E1,E2"
    )]
    pub endpoints: Vec<String>,

    /// Key prefix that isolates this application's topics and groups
    #[arg(
        long,
        global = true,
        env = "PUBSUB_ETCD_NAMESPACE",
        default_value = pubsub_etcd::DEFAULT_NAMESPACE,
        value_name = "NS"
    )]
    pub namespace: String,

    /// CA certificate (PEM) to verify etcd with; enables TLS
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM) for TLS client authentication; needs --key
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of --cert
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// etcd user; without ":PASSWORD" the password comes from $PUBSUB_ETCD_PASSWORD
    #[arg(long, global = true, value_name = "NAME[:PASSWORD]")]
    pub user: Option<String>,

    /// Longest any one etcd request may take, e.g. 5s or 500ms [default: 10s]
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Take no part in compacting etcd's history (for an etcd compacted already)
    #[arg(long, global = true)]
    pub no_auto_compaction: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect, change and delete topics
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Publish one message per input line
    Produce(ProduceArgs),
    /// Print messages of a topic, alone or as a member of a consumer group
    Consume(ConsumeArgs),
    /// Inspect, reposition and delete consumer groups
    #[command(subcommand)]
    Group(GroupCommand),
    /// Delete individual messages
    #[command(subcommand)]
    Message(MessageCommand),
    /// etcd maintenance: history compaction, defragmentation, alarms
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print a shell completion script
    Completions(CompletionsArgs),
}

/// Output of listings and descriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Aligned columns for people
    #[default]
    Table,
    /// One JSON document for programs
    Json,
}

#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic
    Create {
        name: String,
        /// Number of partitions
        #[arg(long, value_name = "N")]
        partitions: u32,
        #[command(flatten)]
        config: TopicConfigArgs,
    },
    /// List topics
    List {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show a topic's settings and each partition's offsets
    Describe {
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Add partitions or change settings; settings not given keep their value
    #[command(group(
        ArgGroup::new("change")
            .required(true)
            .multiple(true)
            .args(["partitions", "max_message_bytes", "retention", "retention_messages",
                   "retention_bytes", "cleanup_policy"])
    ))]
    Alter {
        name: String,
        /// New partition count (partitions can only be added)
        #[arg(long, value_name = "N")]
        partitions: Option<u32>,
        #[command(flatten)]
        config: TopicConfigArgs,
    },
    /// Delete a topic, its messages and every group's offsets for it
    Delete { name: String },
    /// Delete every message of a partition below an offset
    Truncate {
        name: String,
        #[arg(long, value_name = "P")]
        partition: u32,
        /// First offset to keep; offsets are never reused
        #[arg(long, value_name = "OFFSET")]
        before: u64,
    },
    /// Keep only the newest message of each key in every partition, now
    Compact {
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Apply the topic's retention limits (and key compaction) to every partition, now
    EnforceRetention {
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
}

/// Topic settings of `topic create` and `topic alter`.
#[derive(Debug, Args)]
pub struct TopicConfigArgs {
    /// Largest accepted message (value, key and headers, encoded), in bytes
    #[arg(long, value_name = "N")]
    pub max_message_bytes: Option<u32>,

    /// Delete messages older than this, e.g. 7d or 12h; "none" for no age limit
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub retention: Option<Limit<Duration>>,

    /// Keep at most this many messages (offsets) per partition; "none" for no limit
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub retention_messages: Option<Limit<u64>>,

    /// Keep at most this many bytes of messages per partition; "none" for no limit
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub retention_bytes: Option<Limit<u64>>,

    /// What the retention sweep does besides enforcing the limits
    #[arg(long, value_enum, value_name = "POLICY")]
    pub cleanup_policy: Option<CleanupPolicy>,
}

/// A retention limit: a value, or `None` for no limit (given as "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<T>(pub Option<T>);

/// `--cleanup-policy`, as the library's `CleanupPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CleanupPolicy {
    /// Only the retention limits delete messages
    Delete,
    /// Also keep only the newest message of each key (an empty value deletes the key)
    Compact,
}

#[derive(Debug, Subcommand)]
pub enum MessageCommand {
    /// Delete messages of a partition by offset; offsets are never reused
    Delete {
        topic: String,
        /// Partition holding the messages
        #[arg(long, value_name = "P")]
        partition: u32,
        /// Offset of a message to delete (repeatable, or comma-separated)
        #[arg(
            long = "offset",
            value_name = "O",
            required = true,
            value_delimiter = ','
        )]
        offsets: Vec<u64>,
        #[command(flatten)]
        format: FormatArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Compact etcd's history so that deleted data stops taking space
    ///
    /// This affects the whole etcd cluster, every namespace. Space is reused
    /// after compaction; --defrag also shrinks each member's database file.
    Compact {
        /// Defragment every member afterwards (blocks each member briefly)
        #[arg(long)]
        defrag: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// List the alarms raised in the etcd cluster
    Alarms {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Disarm NOSPACE alarms so etcd accepts writes again (free space first)
    Disarm {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show etcd's history span, the last automatic compaction, and each
    /// member's database size against its in-use size
    Status {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Take part in automatic history compaction until interrupted (Ctrl-C)
    ///
    /// For clusters whose producers and consumers may not compact (RBAC)
    /// or run with --no-auto-compaction: one such process is enough.
    AutoCompact,
}

/// How `produce` reports each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ProduceFormat {
    /// Nothing on stdout; each failed line on stderr
    #[default]
    Text,
    /// One JSON line per input line, in input order
    Json,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    pub topic: String,

    /// Read messages from this file instead of stdin
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,

    /// Split each line into key and value at the first SEP
    #[arg(long, value_name = "SEP", value_parser = parse_separator)]
    pub key_separator: Option<String>,

    /// Send every message to this partition instead of choosing by key
    #[arg(long, value_name = "P")]
    pub partition: Option<u32>,

    /// Add a header to every message (repeatable)
    #[arg(long = "header", value_name = "K=V", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,

    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: ProduceFormat,
}

/// How `consume` prints each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ConsumeFormat {
    /// The value alone, one per line
    #[default]
    Raw,
    /// One JSON object per line, with key, headers and position
    Json,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").multiple(false)))]
pub struct ConsumeArgs {
    pub topic: String,

    /// Join this consumer group and commit each message once printed
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// Start at the oldest stored message
    #[arg(long, group = "start")]
    pub from_beginning: bool,

    /// Start at this offset (clamped to what is stored)
    #[arg(long, value_name = "N", group = "start")]
    pub offset: Option<u64>,

    /// Start at the first message at or after this time (RFC 3339 or ms since the epoch)
    #[arg(long, value_name = "T", group = "start", value_parser = parse_time)]
    pub from_time: Option<i64>,

    /// Read only this partition
    #[arg(long, value_name = "P", conflicts_with = "group")]
    pub partition: Option<u32>,

    /// Stop after this many messages
    #[arg(long, value_name = "N")]
    pub max_messages: Option<u64>,

    /// Stop once every partition read is caught up with what was stored at start
    #[arg(long)]
    pub exit_at_end: bool,

    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: ConsumeFormat,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups and the topics they have state on
    List {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show owner, committed offset and lag of each partition
    Describe {
        group: String,
        /// Only this topic [default: every topic the group has state on]
        #[arg(long, value_name = "T")]
        topic: Option<String>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Move a stopped group's committed offsets on every partition of a topic
    #[command(group(ArgGroup::new("to").required(true).multiple(false)))]
    ResetOffsets {
        group: String,
        #[arg(long, value_name = "T")]
        topic: String,
        /// To the oldest stored message
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// To the end: only new messages
        #[arg(long, group = "to")]
        to_latest: bool,
        /// To this offset (clamped to what is stored)
        #[arg(long, value_name = "N", group = "to")]
        to_offset: Option<u64>,
        /// To the first message at or after this time (RFC 3339 or ms since the epoch)
        #[arg(long, value_name = "T", group = "to", value_parser = parse_time)]
        to_time: Option<i64>,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Delete a stopped group's offsets on every topic
    Delete { group: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    #[arg(value_enum)]
    pub shell: Shell,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

/// A duration for `--retention`, or "none".
fn parse_retention(s: &str) -> Result<Limit<Duration>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    humantime::parse_duration(s)
        .map(|d| Limit(Some(d)))
        .map_err(|e| format!("{e} (give a duration like 7d, 12h or 30m, or none)"))
}

/// A count for `--retention-messages` and `--retention-bytes`, or "none".
fn parse_limit(s: &str) -> Result<Limit<u64>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    s.parse::<u64>()
        .map(|n| Limit(Some(n)))
        .map_err(|e| format!("{e} (give a number, or none)"))
}

fn parse_separator(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(s.to_string())
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err("expected NAME=VALUE".into()),
    }
}

/// Milliseconds since the Unix epoch, or an RFC 3339 time. humantime reads
/// only UTC, so a numeric offset (`+02:00`) is taken off and applied here.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let invalid = || format!("{s:?} is neither an RFC 3339 time nor milliseconds since the epoch");
    let (local, offset_secs) = split_utc_offset(s).ok_or_else(invalid)?;
    let time = humantime::parse_rfc3339_weak(local).map_err(|_| invalid())?;
    let ms = match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).map_err(|_| invalid())?,
        Err(before) => -i64::try_from(before.duration().as_millis()).map_err(|_| invalid())?,
    };
    Ok(ms - offset_secs * 1000)
}

/// Splits `2024-05-01T12:00:00+02:00` into the local time and the offset
/// in seconds east of UTC; a time ending in `Z` (or nothing) has offset 0.
fn split_utc_offset(s: &str) -> Option<(&str, i64)> {
    if let Some(local) = s.strip_suffix(['Z', 'z']) {
        return Some((local, 0));
    }
    // The offset is the last six characters when they read ±HH:MM.
    if s.len() > 6 && s.is_char_boundary(s.len() - 6) {
        let (local, offset) = s.split_at(s.len() - 6);
        let bytes = offset.as_bytes();
        let sign = match bytes[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Some((s, 0)),
        };
        if bytes[3] != b':' {
            return None;
        }
        let hours: i64 = offset[1..3].parse().ok()?;
        let minutes: i64 = offset[4..6].parse().ok()?;
        if hours > 23 || minutes > 59 {
            return None;
        }
        return Some((local, sign * (hours * 3600 + minutes * 60)));
    }
    Some((s, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert_eq!(parse_time("1970-01-01T02:00:00+02:00"), Ok(0));
        assert_eq!(parse_time("1970-01-01T00:00:00-01:30"), Ok(5_400_000));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("1970-01-01T00:00:00+25:00").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(
            parse_retention("7d"),
            Ok(Limit(Some(Duration::from_secs(7 * 86_400))))
        );
        assert_eq!(parse_retention("None"), Ok(Limit(None)));
        assert!(parse_retention("week").is_err());
        assert_eq!(parse_limit("10"), Ok(Limit(Some(10))));
        assert_eq!(parse_limit("0"), Ok(Limit(Some(0))));
        assert_eq!(parse_limit("none"), Ok(Limit(None)));
        assert!(parse_limit("-1").is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }
}
