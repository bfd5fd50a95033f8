//! `consume`: prints messages as a group member, committing each message
//! only once it is written and flushed (at-least-once), or, without a
//! group, from every partition or one, committing nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::io::{self, BufWriter, Stdout, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use pubsub_etcd::{
    AssignedReader, AutoCommit, Client, Consumer, Error, Event, Message, PartitionInfo, StartOffset,
};
use serde::Serialize;

use crate::cli::{ConsumeArgs, ConsumeFormat};
use crate::output;
use crate::template::Template;

/// With `--exit-at-end`, how long without a message before checking
/// whether anything is left to read below the end seen at start.
const IDLE: Duration = Duration::from_millis(250);
/// Most messages written between two flushes (and group commits).
const MAX_BATCH: u64 = 1000;

pub async fn run(client: &Client, args: ConsumeArgs, quiet: bool) -> anyhow::Result<()> {
    // Installed first so that a signal from here on ends the run cleanly.
    let signal = shutdown_signal().context("cannot install signal handlers")?;
    let topics = chosen_topics(client, &args).await?;
    if args.partition.is_some() && topics.len() > 1 {
        anyhow::bail!("--partition reads one topic, not {}", topics.len());
    }
    // One stop for every topic: a signal, or one topic's run failing.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop = Arc::new(stop);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        signal.await;
        let _ = on_signal.send(true);
    });
    let out = Arc::new(tokio::sync::Mutex::new(MessageWriter::new(
        args.format,
        args.format_string.clone(),
    )));
    let args = Arc::new(args);
    let started = std::time::Instant::now();
    let runs = topics.into_iter().map(|topic| {
        let (client, args, out, stop) = (client.clone(), args.clone(), out.clone(), stop.clone());
        let mut stopped = stopped.clone();
        async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            let result = run_topic(&client, &args, &topic, &out, shutdown).await;
            if result.is_err() {
                let _ = stop.send(true);
            }
            result
        }
    });
    let results = futures::future::join_all(runs).await;
    let consumed = out.lock().await.count;
    let mut first_error = None;
    let mut unassigned = false;
    for result in results {
        match result {
            Ok(assigned) => unassigned |= !assigned,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    // A failure says so itself, and a closed output pipe ends the run
    // quietly, as `head` expects: the summary is for runs that ended well.
    if !quiet && first_error.is_none() {
        eprintln!(
            "consumed {consumed} messages in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        if args.group.is_some() && unassigned && (args.exit_at_end || args.until.is_some()) {
            eprintln!(
                "note: this member was given no partitions of some topic: the group's other \
                 members hold them all"
            );
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// The topics named, then those `--include` matches, each once.
async fn chosen_topics(client: &Client, args: &ConsumeArgs) -> anyhow::Result<Vec<String>> {
    let mut topics = args.topics.clone();
    if let Some(include) = &args.include {
        for topic in client.list_topics().await? {
            if include.is_match(&topic.name) && !topics.contains(&topic.name) {
                topics.push(topic.name);
            }
        }
        if topics.is_empty() {
            anyhow::bail!(
                "no topic in namespace {:?} matches {}",
                client.namespace(),
                include.as_str()
            );
        }
    }
    Ok(topics)
}

/// Reads one topic into the shared output until it ends; says whether a
/// group member was ever given partitions of it (always true without one).
async fn run_topic(
    client: &Client,
    args: &ConsumeArgs,
    topic: &str,
    out: &tokio::sync::Mutex<MessageWriter>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<bool> {
    let mut shutdown = std::pin::pin!(shutdown);
    let description = client.describe_topic(topic).await?;
    let from_end = match args.offset {
        Some(offset) if offset < 0 => {
            if args.group.is_some() {
                anyhow::bail!("--offset {offset} (from the end) cannot be used with --group");
            }
            Some(offset.unsigned_abs())
        }
        _ => None,
    };
    let requested = requested_start(args);
    let (mut source, mut tracker) = match &args.group {
        Some(group) => {
            let start = requested.unwrap_or(StartOffset::Earliest);
            let consumer = client
                .consumer(topic, group)
                .auto_commit(AutoCommit::Disabled)
                .start_offset(start)
                .join()
                .await?;
            // A member may hold only some partitions, or none yet (it claims
            // them one by one), so it drains the whole group's topic.
            let scope = description.partitions.iter().map(|p| p.partition).collect();
            let tracker = EndTracker::new(&description.partitions, start, scope);
            (
                Source::Group(Box::new(consumer), group.clone(), false),
                tracker,
            )
        }
        None => {
            // Like kcat and kafka-console-consumer: only new messages unless
            // told otherwise.
            let start = requested.unwrap_or(StartOffset::Latest);
            let partitions: Vec<PartitionInfo> = match args.partition {
                Some(partition) => {
                    let info = description
                        .partitions
                        .iter()
                        .find(|p| p.partition == partition)
                        .ok_or_else(|| Error::PartitionOutOfRange {
                            topic: topic.to_string(),
                            partition,
                            partitions: description.topic.partitions,
                        })?;
                    vec![*info]
                }
                None => description.partitions.clone(),
            };
            let scope = partitions.iter().map(|p| p.partition).collect();
            let mut tracker = EndTracker::new(&description.partitions, start, scope);
            let mut starts = Vec::with_capacity(partitions.len());
            for info in &partitions {
                // Resolved here, from the same snapshot as the end offsets,
                // so that --exit-at-end knows where each partition starts.
                let from = match from_end {
                    Some(back) => info.next.saturating_sub(back).max(info.earliest),
                    None => start_position(client, topic, info, start).await?,
                };
                tracker.positions.insert(info.partition, from);
                starts.push((info.partition, StartOffset::Offset(from)));
            }
            let reader = client.assign(topic, starts).await?;
            (Source::Assigned(reader), tracker)
        }
    };
    let run = Run {
        client,
        args,
        topic,
        out,
    };
    let result = consume(&run, &mut source, &mut tracker, shutdown.as_mut()).await;
    let assigned = args.group.is_none() || source.was_assigned();
    // Leaves the group (releasing its partitions at once) however the loop
    // ended: done, signalled, failed, or its output closed.
    let closed = source.close().await;
    result?;
    closed?;
    Ok(assigned)
}

/// What one topic's run reads with and writes to.
struct Run<'a> {
    client: &'a Client,
    args: &'a ConsumeArgs,
    topic: &'a str,
    /// Shared by every topic's run.
    out: &'a tokio::sync::Mutex<MessageWriter>,
}

async fn consume(
    run: &Run<'_>,
    source: &mut Source,
    tracker: &mut EndTracker,
    shutdown: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let mut commits = Commits::default();
    let result = consume_batches(run, source, tracker, &mut commits, shutdown).await;
    // What was handed on is committed however the loop ended, so that a
    // retried or pending commit is not lost to a signal or an error.
    let committed = match source {
        Source::Group(consumer, ..) => commits.commit(consumer).await,
        Source::Assigned(_) => Ok(()),
    };
    if commits.over_quota && !commits.pending.is_empty() {
        eprintln!(
            "warning: the last offsets of {} partition(s) are not committed (etcd quota exceeded): \
             the group will deliver those messages again",
            commits.pending.len()
        );
    }
    result.and(committed)
}

async fn consume_batches(
    run: &Run<'_>,
    source: &mut Source,
    tracker: &mut EndTracker,
    commits: &mut Commits,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let Run {
        client,
        args,
        topic,
        out,
    } = *run;
    loop {
        // --max-messages counts every topic's messages together.
        let count = out.lock().await.count;
        let room = args
            .max_messages
            .map_or(u64::MAX, |max| max - count.min(max));
        if room == 0 {
            return Ok(());
        }
        let exit_at_end = args.exit_at_end || args.until.is_some();
        if exit_at_end && tracker.caught_up() {
            return Ok(());
        }
        let first = tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            item = source.next() => item,
            () = tokio::time::sleep(IDLE), if exit_at_end => {
                if tracker.settled(client, topic, source.group()).await? {
                    return Ok(());
                }
                continue;
            }
        };
        // Whatever else is ready joins this batch, so that one flush and one
        // commit cover it; a batch ends at anything but a message, so that
        // a rebalance event is acknowledged only after the commit.
        let mut batch = vec![first];
        let mut messages = 1;
        while messages < room.min(MAX_BATCH)
            && matches!(batch.last(), Some(Some(Ok(Item::Message(_)))))
        {
            match tokio::time::timeout(Duration::ZERO, source.next()).await {
                Ok(item) => {
                    messages += 1;
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        let mut written = BTreeMap::new();
        let mut ended = false;
        let mut out = out.lock().await;
        let mut reassigned = Vec::new();
        let mut failure = None;
        for item in batch {
            match item {
                None => ended = true,
                Some(Err(error @ Error::TopicDeleted(_))) => failure = Some(error),
                // Readers report a failure once and keep retrying; a tail
                // should survive a passing etcd hiccup. The library has
                // logged it as a warning already.
                Some(Err(error)) => tracing::debug!(%error, "reader error"),
                Some(Ok(Item::Reassigned(partitions))) => reassigned = partitions,
                Some(Ok(Item::Message(message))) => {
                    if tracker.past_bound(&message, args.until) {
                        continue;
                    }
                    // Another topic may have filled --max-messages meanwhile.
                    if args.max_messages.is_some_and(|max| out.count >= max) {
                        continue;
                    }
                    out.write(&message)?;
                    tracker.delivered(&message);
                    written.insert(message.partition, message.offset + 1);
                }
            }
        }
        // Committed only once flushed: at-least-once.
        out.flush()?;
        drop(out);
        if let Source::Group(consumer, ..) = source {
            commits.add(written);
            commits.commit(consumer).await?;
        }
        tracker.forget(&reassigned);
        commits.forget(&reassigned);
        if let Some(error) = failure {
            return Err(error.into());
        }
        if ended {
            return Ok(());
        }
    }
}

/// A group's next offsets that were handed on but not yet committed.
#[derive(Debug, Default)]
struct Commits {
    pending: BTreeMap<u32, u64>,
    /// etcd refused the last commit for lack of space (NOSPACE): delivery
    /// goes on, and every later batch tries again.
    over_quota: bool,
}

impl Commits {
    fn add(&mut self, written: BTreeMap<u32, u64>) {
        self.pending.extend(written);
    }

    /// A partition that changed hands restarts from the group's commit.
    fn forget(&mut self, partitions: &[u32]) {
        for p in partitions {
            self.pending.remove(p);
        }
    }

    async fn commit(&mut self, consumer: &Consumer) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            match consumer.commit_offsets(&self.pending).await {
                Ok(()) => {
                    self.pending.clear();
                    if std::mem::take(&mut self.over_quota) {
                        eprintln!("note: etcd has space again; offsets are committed again");
                    }
                }
                // Another member has the partition now, or had it since these
                // messages were read, and reads it again from its own commit:
                // duplicates, which at-least-once allows.
                Err(
                    error @ (Error::NotOwner { partition, .. }
                    | Error::CommitBehind { partition, .. }),
                ) => {
                    eprintln!("warning: {error}");
                    if self.pending.remove(&partition).is_none() {
                        self.pending.clear();
                    }
                }
                // A later commit covers these offsets too, so a commit that
                // may not have happened is tried again with the next batch.
                Err(error) if error.is_outcome_unknown() => {
                    eprintln!("warning: {error}; will retry");
                    return Ok(());
                }
                // Reads go on under a NOSPACE alarm, so delivery does too, as
                // for a reader without a group; said once, not per batch.
                Err(error @ Error::QuotaExceeded { .. }) => {
                    if !self.over_quota {
                        eprintln!(
                            "warning: {error}; delivery goes on, and offsets are committed again \
                             once etcd has space"
                        );
                        self.over_quota = true;
                    }
                    return Ok(());
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context("cannot commit offsets"));
                }
            }
        }
        Ok(())
    }
}

/// Where to start when the options say so; `None` leaves the default.
fn requested_start(args: &ConsumeArgs) -> Option<StartOffset> {
    if args.from_beginning {
        Some(StartOffset::Earliest)
    } else if let Some(offset) = args.offset {
        // A negative offset is resolved per partition from its end.
        Some(StartOffset::Offset(u64::try_from(offset).unwrap_or(0)))
    } else {
        args.from_time.map(StartOffset::Timestamp)
    }
}

/// The offset a start policy means on one partition. The simple policies
/// are taken from `info`, so that they agree with the end offsets read in
/// the same snapshot; a time needs a scan of the partition, which the
/// library does.
async fn start_position(
    client: &Client,
    topic: &str,
    info: &PartitionInfo,
    start: StartOffset,
) -> pubsub_etcd::Result<u64> {
    Ok(match start {
        StartOffset::Earliest => info.earliest,
        StartOffset::Latest => info.next,
        StartOffset::Offset(offset) => offset.clamp(info.earliest, info.next),
        _ => client.resolve_offset(topic, info.partition, start).await?,
    })
}

/// What is read: a group member's partitions, or chosen ones.
enum Source {
    /// Boxed: a `Consumer` is several KiB (it holds a whole `Client`).
    /// With its group name, and whether it was ever given partitions.
    Group(Box<Consumer>, String, bool),
    Assigned(AssignedReader),
}

enum Item {
    Message(Message),
    /// These partitions changed hands; positions known for them are stale.
    Reassigned(Vec<u32>),
}

impl Source {
    /// Cancel-safe (both receivers are), so it can sit in a `select!`.
    async fn next(&mut self) -> Option<pubsub_etcd::Result<Item>> {
        match self {
            Source::Group(consumer, _, assigned) => loop {
                return Some(match consumer.next_event().await? {
                    Ok(Event::Message(message)) => Ok(Item::Message(message)),
                    Ok(Event::Assigned(partitions)) => {
                        *assigned = true;
                        tracing::info!(?partitions, "partitions assigned");
                        Ok(Item::Reassigned(partitions))
                    }
                    Ok(Event::Revoking(partitions)) => {
                        tracing::info!(?partitions, "partitions revoked");
                        Ok(Item::Reassigned(partitions))
                    }
                    Ok(Event::Lost(partitions)) => {
                        tracing::warn!(
                            ?partitions,
                            "partitions lost without a handover (lease expired): \
                             their last messages may be delivered again"
                        );
                        Ok(Item::Reassigned(partitions))
                    }
                    Ok(Event::OffsetReset {
                        partition,
                        committed,
                        resumed_at,
                    }) => {
                        tracing::warn!(
                            partition,
                            committed,
                            resumed_at,
                            "committed offset is below the earliest stored message: resuming there"
                        );
                        continue;
                    }
                    Ok(_) => continue,
                    Err(error) => Err(error),
                });
            },
            Source::Assigned(reader) => Some(reader.recv().await?.map(Item::Message)),
        }
    }

    fn was_assigned(&self) -> bool {
        matches!(self, Source::Group(_, _, true))
    }

    fn group(&self) -> Option<&str> {
        match self {
            Source::Group(_, group, _) => Some(group),
            Source::Assigned(_) => None,
        }
    }

    async fn close(self) -> anyhow::Result<()> {
        match self {
            Source::Group(consumer, group, _) => consumer
                .close()
                .await
                .with_context(|| format!("cannot leave group {group:?} cleanly")),
            Source::Assigned(reader) => {
                reader.close().await;
                Ok(())
            }
        }
    }
}

/// Decides when `--exit-at-end` may stop: every partition in scope has been
/// read up to the next offset it had when the command started. Without a
/// group the scope is the partitions read; in a group it is every partition
/// of the topic, read by this member or by others (as their commits show):
/// what this member holds can be a part of its share still being claimed,
/// or nothing while others are about to hand partitions over, and a member
/// that left early could leave partitions nobody reads.
///
/// Reaching `last delivered + 1 >= end` is the quick test. It can fail to
/// happen: the last messages below the end may be deleted or expired, and
/// a partition may have nothing to deliver at all. So once idle, each
/// partition still short of its end is checked by reading from its
/// position (this member's, else the group's commit, else the start
/// policy): nothing stored below the end means nothing will come.
struct EndTracker {
    /// Next offset of each partition when the command started.
    ends: HashMap<u32, u64>,
    /// Next offset to deliver, where known: the resolved start, or one
    /// past the last delivered message.
    positions: HashMap<u32, u64>,
    /// Where a group starts on a partition it never committed.
    start: StartOffset,
    scope: Vec<u32>,
    /// Partitions stopped at `--until`.
    stopped: HashSet<u32>,
}

impl EndTracker {
    fn new(partitions: &[PartitionInfo], start: StartOffset, scope: Vec<u32>) -> Self {
        EndTracker {
            ends: partitions.iter().map(|p| (p.partition, p.next)).collect(),
            positions: HashMap::new(),
            start,
            scope,
            stopped: HashSet::new(),
        }
    }

    /// Partitions added after the start had nothing to read then.
    fn end(&self, partition: u32) -> u64 {
        self.ends.get(&partition).copied().unwrap_or(0)
    }

    fn delivered(&mut self, message: &Message) {
        self.positions.insert(message.partition, message.offset + 1);
    }

    /// Whether `message` lies at or after the `--until` bound of its
    /// partition; the first such message stops the partition, which then
    /// counts as caught up.
    fn past_bound(&mut self, message: &Message, until: Option<i64>) -> bool {
        let p = message.partition;
        if self.stopped.contains(&p) {
            return true;
        }
        match until {
            Some(until) if message.timestamp >= until => {
                self.stopped.insert(p);
                self.ends.insert(p, message.offset);
                self.positions.insert(p, message.offset);
                true
            }
            _ => false,
        }
    }

    fn forget(&mut self, partitions: &[u32]) {
        for p in partitions {
            if !self.stopped.contains(p) {
                self.positions.remove(p);
            }
        }
    }

    fn caught_up(&self) -> bool {
        self.scope.iter().all(|p| {
            self.positions
                .get(p)
                .is_some_and(|position| *position >= self.end(*p))
        })
    }

    /// The slow test, for when no message came for a while.
    async fn settled(
        &mut self,
        client: &Client,
        topic: &str,
        group: Option<&str>,
    ) -> pubsub_etcd::Result<bool> {
        if self.caught_up() {
            return Ok(true);
        }
        let committed = match group {
            Some(group) => client.committed_offsets(topic, group).await?,
            None => BTreeMap::new(),
        };
        let mut partitions: Option<Vec<PartitionInfo>> = None;
        for &p in &self.scope {
            let end = self.end(p);
            let position = match (self.positions.get(&p), committed.get(&p)) {
                (Some(position), _) => *position,
                (None, Some(committed)) => *committed,
                (None, None) => {
                    if partitions.is_none() {
                        partitions = Some(client.describe_topic(topic).await?.partitions);
                    }
                    match partitions.iter().flatten().find(|i| i.partition == p) {
                        Some(info) => start_position(client, topic, info, self.start).await?,
                        None => continue,
                    }
                }
            };
            if position >= end {
                continue;
            }
            let next = client.fetch(topic, p, position, 1).await?;
            if next.messages.first().is_some_and(|m| m.offset < end) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Writes messages in the chosen format; the caller flushes before it
/// commits, so that what a group commits has really been handed on.
struct MessageWriter {
    /// Messages written so far, over every topic.
    count: u64,
    format: ConsumeFormat,
    /// `--format-string`, which replaces `format`.
    template: Option<Template>,
    out: BufWriter<Stdout>,
}

impl MessageWriter {
    fn new(format: ConsumeFormat, template: Option<Template>) -> Self {
        MessageWriter {
            count: 0,
            format,
            template,
            out: output::stdout(),
        }
    }

    fn write(&mut self, message: &Message) -> io::Result<()> {
        self.count += 1;
        if let Some(template) = &self.template {
            // The format string says where lines end.
            return template.write(&mut self.out, message);
        }
        match self.format {
            ConsumeFormat::Raw => self.out.write_all(&message.value)?,
            ConsumeFormat::Json => {
                serde_json::to_writer(&mut self.out, &JsonMessage::new(message))?
            }
        }
        self.out.write_all(b"\n")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A message as one JSON object. Bytes that are not UTF-8 go in a
/// `*_base64` field instead, so that no value is silently altered.
#[derive(Serialize)]
pub(super) struct JsonMessage<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    timestamp: i64,
    #[serde(flatten)]
    key: KeyField<'a>,
    #[serde(flatten)]
    value: ValueField<'a>,
    headers: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    headers_base64: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
enum KeyField<'a> {
    #[serde(rename = "key")]
    Text(Option<&'a str>),
    #[serde(rename = "key_base64")]
    Base64(String),
}

#[derive(Serialize)]
enum ValueField<'a> {
    #[serde(rename = "value")]
    Text(&'a str),
    #[serde(rename = "value_base64")]
    Base64(String),
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl<'a> JsonMessage<'a> {
    pub(super) fn new(message: &'a Message) -> Self {
        let key = match message.key.as_deref().map(std::str::from_utf8) {
            None => KeyField::Text(None),
            Some(Ok(text)) => KeyField::Text(Some(text)),
            Some(Err(_)) => KeyField::Base64(base64(message.key.as_deref().unwrap_or_default())),
        };
        let value = match std::str::from_utf8(&message.value) {
            Ok(text) => ValueField::Text(text),
            Err(_) => ValueField::Base64(base64(&message.value)),
        };
        let mut headers = BTreeMap::new();
        let mut headers_base64 = BTreeMap::new();
        for (name, value) in &message.headers {
            match std::str::from_utf8(value) {
                Ok(text) => {
                    headers.insert(name.as_str(), text);
                }
                Err(_) => {
                    headers_base64.insert(name.as_str(), base64(value));
                }
            }
        }
        JsonMessage {
            topic: &message.topic,
            partition: message.partition,
            offset: message.offset,
            timestamp: message.timestamp,
            key,
            value,
            headers,
            headers_base64,
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are in place once this
/// returns, so the default (killing the process) no longer applies.
pub(crate) fn shutdown_signal() -> io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: Option<&'static [u8]>, value: &'static [u8]) -> Message {
        let mut record = pubsub_etcd::Record::new(value)
            .header("a", "x")
            .header("b", &[0xff][..])
            .timestamp(42);
        record.key = key.map(pubsub_etcd::Bytes::from_static);
        Message::from_record("t", 1, 7, record)
    }

    #[test]
    fn json_messages() {
        let json = serde_json::to_value(JsonMessage::new(&message(Some(b"k"), b"v"))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "topic": "t", "partition": 1, "offset": 7, "timestamp": 42,
                "key": "k", "value": "v", "headers": {"a": "x"},
                "headers_base64": {"b": "/w=="},
            })
        );
        let json = serde_json::to_value(JsonMessage::new(&message(None, &[0xc3, 0x28]))).unwrap();
        assert_eq!(json["key"], serde_json::Value::Null);
        assert_eq!(json["value_base64"], "wyg=");
        assert!(json.get("value").is_none());
        let json = serde_json::to_value(JsonMessage::new(&message(Some(&[0x80]), b""))).unwrap();
        assert_eq!(json["key_base64"], "gA==");
        assert!(json.get("key").is_none());
        assert_eq!(json["value"], "");
    }
}
