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

    #[command(flatten)]
    pub log: LogArgs,

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
    #[arg(long, global = true, env = "PUBSUB_ETCD_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// Client certificate (PEM) for TLS client authentication; needs --key
    #[arg(
        long,
        global = true,
        env = "PUBSUB_ETCD_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,

    /// Private key (PEM) of --cert
    #[arg(
        long,
        global = true,
        env = "PUBSUB_ETCD_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,

    /// etcd user; without ":PASSWORD" the password comes from $PUBSUB_ETCD_PASSWORD
    #[arg(
        long,
        global = true,
        env = "PUBSUB_ETCD_USER",
        value_name = "NAME[:PASSWORD]"
    )]
    pub user: Option<String>,

    /// Connection settings saved under this name in the config file
    /// ($PUBSUB_ETCD_CONFIG or ~/.config/pubsub-etcd/config.toml); options
    /// and environment variables given win over it
    #[arg(long, global = true, env = "PUBSUB_ETCD_CONTEXT", value_name = "NAME")]
    pub context: Option<String>,

    /// Longest any one etcd request may take, e.g. 5s or 500ms [default: 10s]
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,

    /// Take no part in compacting etcd's history (for an etcd compacted already)
    #[arg(long, global = true)]
    pub no_auto_compaction: bool,
}

/// How much the library and the tool log on stderr.
#[derive(Debug, Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// Log more: -v info, -vv debug, -vvv trace (warnings are always shown).
    /// RUST_LOG, when set, replaces these levels (e.g. RUST_LOG=pubsub_etcd=debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Log less: -q errors only, -qq nothing
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
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
    /// Work queues: consume with per-message acks, describe, reset, delete
    #[command(subcommand)]
    Queue(QueueCommand),
    /// An exactly-once pipeline stage: feed IN's messages to a command,
    /// publish its output lines to OUT
    Pipe(PipeArgs),
    /// Delete individual messages
    #[command(subcommand)]
    Message(MessageCommand),
    /// etcd maintenance: history compaction, defragmentation, alarms
    #[command(subcommand)]
    Admin(AdminCommand),
    /// List the saved connection contexts, or show the settings in effect
    #[command(subcommand)]
    Context(ContextCommand),
    /// Health of etcd and this namespace: members, space, alarms, topics,
    /// groups; exits 1 when an alarm is raised or space runs low
    Status(StatusArgs),
    /// Serve a web console of this namespace (read-only unless --allow-writes)
    Console(ConsoleArgs),
    /// Measure throughput and latency, optionally next to raw etcd
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a shell completion script
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address to serve the console on; loopback unless told otherwise
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Enable the write endpoints (produce, delete a message, reset offsets,
    /// create and delete topics); needs --auth-token
    #[arg(long)]
    pub allow_writes: bool,
    /// Token every write must carry as `Authorization: Bearer TOKEN`
    #[arg(
        long,
        env = "PUBSUB_ETCD_CONSOLE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
    #[command(flatten)]
    pub limits: HealthLimits,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub limits: HealthLimits,
    #[command(flatten)]
    pub format: FormatArg,
}

/// What `status` and the console's overview judge etcd's health against.
#[derive(Debug, Clone, Copy, Args)]
pub struct HealthLimits {
    /// etcd's --quota-backend-bytes, which etcd does not report
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, default_value = "2GiB")]
    pub quota: u64,
    /// Report a problem when a member's database leaves less than this share of the quota free, in percent
    #[arg(long, value_name = "PERCENT", default_value_t = 10.0)]
    pub min_headroom: f64,
}

#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// List the contexts of the config file; the one in effect is marked
    List {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show the connection settings in effect (context, options, environment)
    Show {
        #[command(flatten)]
        format: FormatArg,
    },
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

/// `--metrics-addr` of long-running commands.
#[derive(Debug, Args)]
pub struct MetricsArg {
    /// Serve the library's metrics in the Prometheus text format at
    /// http://ADDR/metrics while the command runs, e.g. 127.0.0.1:9000
    /// [default: not served]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
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
        /// Name of the new topic
        name: String,
        /// Number of partitions
        #[arg(long, value_name = "N")]
        partitions: u32,
        /// Succeed without changing anything when the topic exists
        #[arg(long)]
        if_not_exists: bool,
        #[command(flatten)]
        config: TopicConfigArgs,
        #[command(flatten)]
        format: FormatArg,
    },
    /// List topics
    List {
        #[command(flatten)]
        format: FormatArg,
    },
    /// Show a topic's settings and each partition's offsets
    Describe {
        /// Topic to describe
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
                   "retention_bytes", "cleanup_policy", "compression"])
    ))]
    Alter {
        /// Topic to change
        name: String,
        /// New partition count (partitions can only be added)
        #[arg(long, value_name = "N")]
        partitions: Option<u32>,
        #[command(flatten)]
        config: TopicConfigArgs,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Delete a topic, its messages and every group's offsets for it
    Delete {
        /// Topic to delete
        name: String,
        /// Succeed without doing anything when the topic does not exist
        #[arg(long)]
        if_exists: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Delete every message of a partition below an offset
    Truncate {
        /// Topic to truncate
        name: String,
        /// Partition to truncate
        #[arg(long, value_name = "P")]
        partition: u32,
        /// First offset to keep; offsets are never reused
        #[arg(long, value_name = "OFFSET")]
        before: u64,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Keep only the newest message of each key in every partition, now
    Compact {
        /// Topic to compact
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Apply the topic's retention limits (and key compaction) to every partition, now
    EnforceRetention {
        /// Topic to sweep
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
}

/// Topic settings of `topic create` and `topic alter`.
#[derive(Debug, Args)]
pub struct TopicConfigArgs {
    /// Largest accepted message (value, key and headers, encoded), e.g. 1000 or 64KiB
    #[arg(long, value_name = "SIZE", value_parser = parse_message_bytes)]
    pub max_message_bytes: Option<u32>,

    /// Delete messages older than this, e.g. 7d or 12h; "none" for no age limit
    #[arg(long, value_name = "DURATION", value_parser = parse_retention)]
    pub retention: Option<Limit<Duration>>,

    /// Keep at most this many messages (offsets) per partition; "none" for no limit
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub retention_messages: Option<Limit<u64>>,

    /// Keep at most this many bytes of messages per partition, e.g. 10MB or 1GiB; "none" for no limit
    #[arg(long, value_name = "SIZE", value_parser = parse_byte_limit)]
    pub retention_bytes: Option<Limit<u64>>,

    /// What the retention sweep does besides enforcing the limits
    #[arg(long, value_enum, value_name = "POLICY")]
    pub cleanup_policy: Option<CleanupPolicy>,

    /// How producers that choose no codec compress each batch: none, lz4,
    /// zstd or zstd:LEVEL (1-22)
    #[arg(long, value_name = "CODEC", value_parser = parse_compression)]
    pub compression: Option<pubsub_etcd::Compression>,
}

fn parse_compression(s: &str) -> Result<pubsub_etcd::Compression, String> {
    s.parse().map_err(|e: pubsub_etcd::Error| e.to_string())
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

    /// Each line starts with its own headers, NAME:VALUE pairs joined by ','
    /// and ended by a tab (Kafka's console producer `parse.headers`)
    #[arg(long)]
    pub parse_headers: bool,

    /// Messages end at this byte instead of a newline: one character, or
    /// one of \n, \t, \r, \0
    #[arg(short = 'D', long, value_name = "BYTE", value_parser = parse_delimiter, default_value = "\\n",
          conflicts_with = "whole_file")]
    pub delimiter: u8,

    /// Send the whole input (stdin or --file) as one message
    #[arg(long, conflicts_with_all = ["key_separator", "parse_headers"])]
    pub whole_file: bool,

    /// Messages expire after this long, e.g. 1h; readers skip them from then on
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<Duration>,

    /// Timestamp for every message [default: the time of sending]
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub timestamp: Option<i64>,

    /// Give up on a message not stored after this long, retries included
    /// [default: --timeout when given, else 60s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub delivery_timeout: Option<Duration>,

    /// Compress each batch: none, lz4, zstd or zstd:LEVEL (1-22) [default:
    /// the topic's --compression]
    #[arg(long, value_name = "CODEC", value_parser = parse_compression)]
    pub compression: Option<pubsub_etcd::Compression>,

    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: ProduceFormat,

    #[command(flatten)]
    pub metrics: MetricsArg,
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

/// `pipe`: see `commands/pipe.rs` for the contract with CMD.
#[derive(Debug, Args)]
pub struct PipeArgs {
    /// Topic to read, as a member of --group
    pub input: String,

    /// Topic to publish CMD's output lines to (each with its input's key)
    pub output: String,

    /// Consumer group of the stage's members
    #[arg(long, value_name = "G")]
    pub group: String,

    /// Shell command started once: it reads one message value per line on
    /// stdin and writes exactly one output line per input line, in order,
    /// flushing each (e.g. `sed -u`, `python3 -u`)
    #[arg(long, value_name = "CMD")]
    pub exec: String,

    /// Inputs per transaction at most: their outputs and offsets are
    /// committed together
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub batch: usize,

    /// How long a batch waits for more inputs after its first
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "50ms")]
    pub linger: Duration,

    /// Lease time of the member: a stopped member's partitions move on
    /// after this long
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10s")]
    pub session_ttl: Duration,

    /// Stable member id [default: host-pid-random]
    #[arg(long, value_name = "ID")]
    pub member_id: Option<String>,

    /// Stop after committing this many inputs
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,

    /// The longest CMD may take to answer a batch: past it the stage stops
    /// with an error, commits nothing of the batch, and CMD is killed
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub exec_timeout: Duration,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("start").multiple(false)))]
pub struct ConsumeArgs {
    /// Topics to read (several are read at once, as `kcat -G g t1 t2`)
    #[arg(required_unless_present = "include")]
    pub topics: Vec<String>,

    /// Also read every topic whose whole name matches this regular
    /// expression, as they exist when the command starts
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub include: Option<regex::Regex>,

    /// Join this consumer group and commit each message once printed
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// Start at the oldest stored message
    #[arg(long, group = "start")]
    pub from_beginning: bool,

    /// Start at this offset (clamped to what is stored); a negative N starts
    /// N messages before the end of each partition (not with --group)
    #[arg(long, value_name = "N", group = "start", allow_negative_numbers = true)]
    pub offset: Option<i64>,

    /// Start at the first message at or after this time (ms since the epoch, RFC 3339, a local date or time, or a duration ago like 1h)
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

    /// Stop each partition at its first message at or after this time (not
    /// printed), and exit once every partition is stopped or caught up
    /// (ms since the epoch, RFC 3339, a local date or time, or a duration ago like 1h)
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<i64>,

    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: ConsumeFormat,

    /// Print each message with this kcat-style format instead, e.g.
    /// '%t %p %o %k %s\n': %t topic, %p partition, %o offset, %k key,
    /// %K key length, %s value, %S value length, %T timestamp (ms),
    /// %h headers, %% percent; \n \t \r \0 \\ escapes
    #[arg(short = 'f', long, value_name = "FORMAT", value_parser = parse_template, conflicts_with = "format")]
    pub format_string: Option<crate::template::Template>,

    #[command(flatten)]
    pub metrics: MetricsArg,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups with their state, members and total lag
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
    /// Move a stopped group's committed offsets: shows the plan, and applies
    /// it with --execute (as kafka-consumer-groups --reset-offsets)
    #[command(group(ArgGroup::new("to").required(true).multiple(false)))]
    #[command(group(ArgGroup::new("which").required(true).multiple(false)))]
    ResetOffsets {
        /// Group whose offsets move
        group: String,
        /// Topic, optionally with some partitions: orders or orders:0,1,5 (repeatable)
        #[arg(long = "topic", value_name = "T[:P,..]", value_parser = parse_topic_partitions, group = "which")]
        topics: Vec<TopicPartitions>,
        /// Every topic the group has state on
        #[arg(long, group = "which")]
        all_topics: bool,
        /// To the oldest stored message
        #[arg(long, group = "to")]
        to_earliest: bool,
        /// To the end: only new messages
        #[arg(long, group = "to")]
        to_latest: bool,
        /// To this offset (clamped to what is stored)
        #[arg(long, value_name = "N", group = "to")]
        to_offset: Option<u64>,
        /// By N from the committed offset (or the earliest without one); negative moves back
        #[arg(long, value_name = "N", group = "to", allow_negative_numbers = true)]
        shift_by: Option<i64>,
        /// To the first message at or after this long ago, e.g. 1h or 2d
        #[arg(long, value_name = "DURATION", group = "to", value_parser = parse_duration)]
        by_duration: Option<Duration>,
        /// To the first message at or after this time (ms since the epoch, RFC 3339, a local date or time, or a duration ago like 1h)
        #[arg(long, alias = "to-time", value_name = "T", group = "to", value_parser = parse_time)]
        to_datetime: Option<i64>,
        /// Apply the plan; without it the plan is only shown
        #[arg(long, conflicts_with = "dry_run")]
        execute: bool,
        /// Only show the plan (the default)
        #[arg(long)]
        dry_run: bool,
        /// Allow --execute to create offsets for a group that has no state yet
        #[arg(long)]
        new_group: bool,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Delete a stopped group's offsets on every topic
    Delete {
        /// Group to delete
        group: String,
        #[command(flatten)]
        format: FormatArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Work on a queue: print each message (or run --exec on it) and ack it
    Consume {
        topic: String,
        /// Queue name
        #[arg(long)]
        name: String,
        /// Run this shell command per message (the value on its stdin, and
        /// PUBSUB_TOPIC, PUBSUB_PARTITION, PUBSUB_OFFSET, PUBSUB_DELIVERY in its
        /// environment): ack on exit 0, nack otherwise. The lease is extended
        /// while it runs
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        /// Kill a --exec command (its whole process group) that runs longer
        /// than this, and nack its message
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
        exec_timeout: Duration,
        /// Stop after settling N messages
        #[arg(long, value_name = "N")]
        max: Option<u64>,
        /// Lease time before an unsettled message is redelivered
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
        ack_wait: Duration,
        /// Deliveries before a message goes to the dead-letter topic
        #[arg(long, value_name = "N", default_value_t = 5)]
        max_deliveries: u32,
        /// Topic for messages past --max-deliveries [default: none, dropped]
        #[arg(long, value_name = "T")]
        dead_letter: Option<String>,
        /// How long a nacked message waits before redelivery
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        nack_delay: Duration,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Pending, in-flight, redelivered and dead-lettered counts and the
    /// oldest unsettled message's age
    Describe {
        topic: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    /// Drop a queue's leases and redeliveries: from the earliest stored
    /// message again, or past everything stored with --to-latest
    Reset {
        topic: String,
        #[arg(long)]
        name: String,
        /// Settle everything stored now instead
        #[arg(long)]
        to_latest: bool,
    },
    /// Delete a queue's state (it stops holding retention back)
    Delete {
        topic: String,
        #[arg(long)]
        name: String,
    },
    /// The queues that have state on a topic
    List {
        topic: String,
        #[command(flatten)]
        format: FormatArg,
    },
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

/// Each benchmark runs in a namespace of its own, `<NS>-bench-<random>`,
/// deleted at the end, also after an error or Ctrl-C.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Producer throughput and send latency (enqueue to stored), up to
    /// 50,000 messages in flight per producer
    Produce(BenchProduceArgs),
    /// Catch-up rate of one group member over a backlog it first produces,
    /// and the peak RSS while catching up
    Consume(BenchConsumeArgs),
    /// Send-to-delivery latency through a consumer group at a fixed rate
    Latency(BenchLatencyArgs),
    /// Cost of many partitions: produce, plain consume and group drains,
    /// peak RSS, etcd requests and rebalance settle, each phase in a child
    /// process
    Partitions(BenchPartitionsArgs),
    /// Queue workers settling a backlog with one ack per message, next to a
    /// consumer group draining the same backlog, and etcd's work per
    /// message
    Queue(BenchQueueArgs),
    /// One phase of `bench partitions`, run by it in a child process
    #[command(hide = true)]
    PartitionsWorker(PartitionsWorkerArgs),
    /// A pipeline stage copying a backlog exactly once (a transaction per
    /// batch) against plain consume-then-produce of the same backlog, and
    /// their ratio
    Pipeline(BenchPipelineArgs),
    /// How long the console's overview (`status`'s report) takes to build
    /// for many topics, partitions and groups
    Console(BenchConsoleArgs),
}

/// Options every benchmark takes.
#[derive(Debug, Args)]
pub struct BenchOptions {
    /// Also run the raw etcd baseline (raw puts; put to watch; range gets)
    /// against the same etcd, and print pubsub-etcd/raw ratios [default: off]
    #[arg(long)]
    pub compare_raw: bool,

    /// Output format: a table, or one JSON summary object
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,

    #[command(flatten)]
    pub metrics: MetricsArg,
}

impl BenchCommand {
    pub fn options(&self) -> &BenchOptions {
        match self {
            BenchCommand::Produce(args) => &args.options,
            BenchCommand::Consume(args) => &args.options,
            BenchCommand::Latency(args) => &args.options,
            BenchCommand::Partitions(args) => &args.options,
            BenchCommand::Queue(args) => &args.options,
            BenchCommand::PartitionsWorker(args) => &args.options,
            BenchCommand::Pipeline(args) => &args.options,
            BenchCommand::Console(args) => &args.options,
        }
    }
}

/// `bench console`: it measures one read path, so `--compare-raw` adds
/// nothing to it.
#[derive(Debug, Args)]
pub struct BenchConsoleArgs {
    /// Topics to seed
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub topics: u32,

    /// Partitions of each topic
    #[arg(long, value_name = "P", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,

    /// Groups, each with committed offsets on one topic
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub groups: u32,

    /// Messages in each partition
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub messages: u32,

    /// Times the overview is built
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: u32,

    #[command(flatten)]
    pub options: BenchOptions,
}

/// `bench pipeline`: its plain stage is its baseline, so `--compare-raw`
/// adds nothing to it.
#[derive(Debug, Args)]
pub struct BenchPipelineArgs {
    /// Messages in the backlog each stage copies
    #[arg(long, value_name = "N", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Value size of each message, e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_message_bytes)]
    pub size: u32,

    /// Partitions of the input and of each output topic
    #[arg(long, value_name = "P", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub partitions: u32,

    /// Inputs per transaction (and per plain send-then-commit) at most
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub batch: usize,

    #[command(flatten)]
    pub options: BenchOptions,
}

#[derive(Debug, Args)]
pub struct BenchProduceArgs {
    /// Messages to send, over all producers
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Value size of each message, e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_message_bytes)]
    pub size: u32,

    /// Partitions of the benchmark topic
    #[arg(long, value_name = "P", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=i64::from(pubsub_etcd::MAX_PARTITIONS)))]
    pub partitions: u32,

    /// Producers sending at once, each with its own batching
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub producers: u32,

    /// Messages per second over all producers [default: as fast as possible]
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,

    #[command(flatten)]
    pub data: BenchDataArgs,

    #[command(flatten)]
    pub options: BenchOptions,
}

/// What the benchmarks' message values are (`--payload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Payload {
    /// Random bytes of --size: incompressible
    #[default]
    Random,
    /// English-like prose of --size, words from a small vocabulary
    Text,
    /// JSON log lines of 200-600 bytes (timestamp, level, service, trace id,
    /// message, a few fields); --size is ignored
    JsonLogs,
}

/// What a benchmark's messages are and how producers compress them.
#[derive(Debug, Args)]
pub struct BenchDataArgs {
    /// Message values
    #[arg(long, value_enum, default_value_t)]
    pub payload: Payload,

    /// How producers compress each batch: none, lz4, zstd or zstd:LEVEL
    #[arg(long, value_name = "CODEC", value_parser = parse_compression, default_value = "none")]
    pub compression: pubsub_etcd::Compression,
}

#[derive(Debug, Args)]
pub struct BenchConsumeArgs {
    /// Messages in the backlog
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Value size of each message, e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_message_bytes)]
    pub size: u32,

    /// Partitions of the benchmark topic
    #[arg(long, value_name = "P", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(pubsub_etcd::MAX_PARTITIONS)))]
    pub partitions: u32,

    /// Messages the consumer reads per etcd request while catching up [default: 1000]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub fetch_messages: Option<u64>,

    #[command(flatten)]
    pub data: BenchDataArgs,

    #[command(flatten)]
    pub options: BenchOptions,
}

#[derive(Debug, Args)]
pub struct BenchQueueArgs {
    /// Messages in the backlog
    #[arg(long, value_name = "N", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Value size of each message, e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_message_bytes)]
    pub size: u32,

    /// Partitions of the benchmark topic
    #[arg(long, value_name = "P", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=i64::from(pubsub_etcd::MAX_PARTITIONS)))]
    pub partitions: u32,

    /// Queue workers, as tasks of this process
    #[arg(long, value_name = "K", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,

    /// Members of the consumer group that drains the same backlog first
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub group_members: u32,

    /// Most offsets one queue lease takes [default: the library's, 1024]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_batch: Option<u64>,

    /// How often each worker stores its settled jobs [default: the
    /// library's, 10ms]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub flush_interval: Option<Duration>,

    /// Unconfirmed acks each worker keeps in flight
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub acks_in_flight: u32,

    /// etcd's Prometheus metrics URL, for the request and write counts
    /// [default: http://<first endpoint>/metrics]
    #[arg(long, value_name = "URL")]
    pub etcd_metrics: Option<String>,

    #[command(flatten)]
    pub data: BenchDataArgs,

    #[command(flatten)]
    pub options: BenchOptions,
}

#[derive(Debug, Args)]
pub struct BenchPartitionsArgs {
    /// Partition counts to run, comma-separated
    #[arg(long, value_name = "P1,P2", value_delimiter = ',', default_value = "64,1024,4096", value_parser = clap::value_parser!(u32).range(1..=i64::from(pubsub_etcd::MAX_PARTITIONS)))]
    pub partitions: Vec<u32>,

    /// Messages produced to each partition
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages_per_partition: u64,

    /// Value size of each message, e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_message_bytes)]
    pub size: u32,

    /// Group sizes that drain the partitions, comma-separated
    #[arg(long, value_name = "K1,K2", value_delimiter = ',', default_value = "1,2,8", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub members: Vec<u32>,

    /// At the largest partition count, a group of this many members
    /// settles and then one more joins [default: 64]
    #[arg(long, value_name = "K", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub join_group: u32,

    /// A group's members are tasks spread over at most this many child
    /// processes (the join's extra member gets one more)
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: u32,

    /// A phase still running after this long is reported as "timeout",
    /// its processes killed, and the benchmark goes on
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub phase_timeout: Duration,

    /// etcd's Prometheus metrics URL, for the request counts
    /// [default: http://<first endpoint>/metrics]
    #[arg(long, value_name = "URL")]
    pub etcd_metrics: Option<String>,

    #[command(flatten)]
    pub options: BenchOptions,
}

/// What one `bench partitions` child process does.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PartitionsRole {
    Produce,
    Consume,
    Group,
    Join,
}

impl PartitionsRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionsRole::Produce => "produce",
            PartitionsRole::Consume => "consume",
            PartitionsRole::Group => "group",
            PartitionsRole::Join => "join",
        }
    }
}

#[derive(Debug, Args)]
pub struct PartitionsWorkerArgs {
    /// The parent's bench namespace, used as it is
    #[arg(long)]
    pub bench_namespace: String,
    #[arg(long, value_enum)]
    pub role: PartitionsRole,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub partitions: u32,
    #[arg(long)]
    pub messages_per_partition: u64,
    #[arg(long)]
    pub size: u32,
    #[arg(long)]
    pub members: u32,
    #[command(flatten)]
    pub options: BenchOptions,
}

#[derive(Debug, Args)]
pub struct BenchLatencyArgs {
    /// Messages per second
    #[arg(long, value_name = "R", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// Seconds measured, after a 1 s warm-up that is not
    #[arg(long, value_name = "S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,

    /// Value size of each message, at least 16 (the sequence number and
    /// send time it carries), e.g. 100 or 1KiB
    #[arg(long, value_name = "SIZE", default_value = "100", value_parser = parse_stamp_size)]
    pub size: u32,

    #[command(flatten)]
    pub options: BenchOptions,
}

fn parse_stamp_size(s: &str) -> Result<u32, String> {
    let size = parse_message_bytes(s)?;
    if size < 16 {
        return Err(
            "must be at least 16 bytes: each message carries its sequence number and send time"
                .into(),
        );
    }
    Ok(size)
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

/// A size for `--retention-bytes`, or "none".
fn parse_byte_limit(s: &str) -> Result<Limit<u64>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Limit(None));
    }
    parse_bytes(s).map(|n| Limit(Some(n)))
}

/// A message delimiter: one byte, written as itself or as an escape.
fn parse_delimiter(s: &str) -> Result<u8, String> {
    match s {
        "\\n" => Ok(b'\n'),
        "\\t" => Ok(b'\t'),
        "\\r" => Ok(b'\r'),
        "\\0" => Ok(0),
        _ if s.len() == 1 => Ok(s.as_bytes()[0]),
        _ => Err("give one character, or one of \\n, \\t, \\r, \\0".into()),
    }
}

fn parse_regex(s: &str) -> Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| e.to_string())
}

fn parse_template(s: &str) -> Result<crate::template::Template, String> {
    crate::template::Template::parse(s)
}

/// A topic and, after `:`, some of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPartitions {
    pub topic: String,
    /// `None` for every partition.
    pub partitions: Option<Vec<u32>>,
}

fn parse_topic_partitions(s: &str) -> Result<TopicPartitions, String> {
    let Some((topic, list)) = s.split_once(':') else {
        return Ok(TopicPartitions {
            topic: s.to_string(),
            partitions: None,
        });
    };
    let partitions = list
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{p:?} is not a partition number"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    Ok(TopicPartitions {
        topic: topic.to_string(),
        partitions: Some(partitions),
    })
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

/// What `--from-time` and `--to-time` accept, for their help and errors.
const TIME_FORMS: &str =
    "milliseconds since the epoch, an RFC 3339 time, a local date or time like 2026-12-01 or \
     2026-12-01T08:30, or a duration ago like 1h or 2d";

/// A point in time as milliseconds since the Unix epoch; see [`TIME_FORMS`].
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, jiff::Timestamp::now())
}

fn parse_time_at(s: &str, now: jiff::Timestamp) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(time) = s.parse::<jiff::Timestamp>() {
        return Ok(time.as_millisecond());
    }
    // jiff reads a civil time out of a string with any offset, even an
    // invalid one, ignoring it: only strings without one are local times.
    let has_offset = s
        .get(10..)
        .is_some_and(|time| time.contains(['+', '-', 'Z', 'z', '[']));
    let local = s
        .parse::<jiff::civil::DateTime>()
        .ok()
        .filter(|_| !has_offset);
    if let Some(local) = local {
        return local
            .to_zoned_datetime(jiff::tz::TimeZone::system())
            .map(|zoned| zoned.timestamp().as_millisecond())
            .map_err(|e| format!("{s:?}: {e}"));
    }
    if let Ok(ago) = humantime::parse_duration(s) {
        let ago = i64::try_from(ago.as_millis()).map_err(|_| format!("{s:?} is too long ago"))?;
        return Ok(now.as_millisecond().saturating_sub(ago));
    }
    Err(format!("{s:?} is not a time: give {TIME_FORMS}"))
}

/// A size in bytes: a number, or with a unit (`10MB`, `1.5 GiB`, `512KiB`).
fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("{e} (give a size like 1000, 10MB or 1GiB)"))
}

fn parse_message_bytes(s: &str) -> Result<u32, String> {
    let bytes = parse_bytes(s)?;
    u32::try_from(bytes).map_err(|_| format!("{s:?} is over the largest message size of 4 GiB"))
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
        let now: jiff::Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let at = |s| parse_time_at(s, now);
        assert_eq!(at("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(at("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(at("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert_eq!(at("1970-01-01T02:00:00+02:00"), Ok(0));
        assert_eq!(at("1970-01-01T00:00:00-01:30"), Ok(5_400_000));
        assert_eq!(at("1h"), Ok(now.as_millisecond() - 3_600_000));
        assert_eq!(at("2d"), Ok(now.as_millisecond() - 2 * 86_400_000));
        let local = |s: &str| {
            s.parse::<jiff::civil::DateTime>()
                .unwrap()
                .to_zoned_datetime(jiff::tz::TimeZone::system())
                .unwrap()
                .timestamp()
                .as_millisecond()
        };
        assert_eq!(at("2026-12-01"), Ok(local("2026-12-01T00:00")));
        assert_eq!(at("2026-12-01T08:30"), Ok(local("2026-12-01T08:30")));
        assert!(at("yesterday").unwrap_err().contains("a duration ago"));
        assert!(at("1970-01-01T00:00:00+99:00").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_limit("none"), Ok(Limit(None)));
        assert_eq!(parse_message_bytes("64KiB"), Ok(65_536));
        assert!(parse_message_bytes("5GiB").is_err());
        assert!(parse_bytes("ten").is_err());
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
    fn topic_partitions() {
        assert_eq!(
            parse_topic_partitions("t:0,3"),
            Ok(TopicPartitions {
                topic: "t".into(),
                partitions: Some(vec![0, 3])
            })
        );
        assert_eq!(parse_topic_partitions("t").unwrap().partitions, None);
        assert!(parse_topic_partitions("t:x").is_err());
    }

    #[test]
    fn delimiters() {
        assert_eq!(parse_delimiter("\\n"), Ok(b'\n'));
        assert_eq!(parse_delimiter("\\0"), Ok(0));
        assert_eq!(parse_delimiter("|"), Ok(b'|'));
        assert!(parse_delimiter("ab").is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_header("a="), Ok(("a".into(), String::new())));
        assert!(parse_header("=b").is_err());
        assert!(parse_header("ab").is_err());
    }
}
