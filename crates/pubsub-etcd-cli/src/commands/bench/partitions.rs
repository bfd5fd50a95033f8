//! `bench partitions`: what thousands of partitions cost. For each
//! partition count it produces a number of messages to every partition,
//! drains them with a plain consume and with groups of several sizes, and
//! at the largest count times a large group's settle after one more member
//! joins.
//!
//! Every phase runs in child processes of this binary (the hidden
//! `bench partitions-worker`), so the peak RSS each child reports (VmHWM,
//! read from its own /proc/self/status as it ends) is that phase's alone.
//! A group's members are tasks spread over at most `--processes` children.
//! Children stream what happens as JSON lines on stdout (a member's owned
//! partitions, partitions drained); the parent decides from them when a
//! group settled and drained, and ends a group child by closing its stdin.
//! Each phase has a deadline: past it the phase is reported as a timeout,
//! its children are killed, and the run goes on. etcd requests are the
//! growth of etcd's `grpc_server_handled_total` over the phase.

use std::collections::{BTreeSet, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::future::join_all;
use pubsub_etcd::{Bytes, Client, Delivery, Event, NewTopic, Record, StartOffset};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, watch};

use super::etcd_metrics::EtcdMetrics;
use super::Summary;
use crate::cli::{BenchPartitionsArgs, ConnectionArgs, PartitionsRole, PartitionsWorkerArgs};
use crate::output::Table;

/// Records in flight in the producing child.
const IN_FLIGHT: usize = 50_000;
/// How long children may take to close their clients and report once told
/// to stop; they are killed after it.
const CLOSE: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize)]
pub struct PartitionsSummary {
    messages_per_partition: u64,
    size: u32,
    phase_timeout_seconds: f64,
    /// Where the etcd request counts come from; absent when not reachable.
    etcd_metrics: Option<String>,
    runs: Vec<Run>,
}

#[derive(Debug, Serialize)]
struct Run {
    partitions: u32,
    phases: Vec<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Ok,
    /// The phase did not finish within the phase timeout.
    Timeout,
    Failed,
    /// Not run: producing did not finish, so there was nothing to drain.
    Skipped,
}

#[derive(Debug, Serialize)]
struct Phase {
    name: String,
    outcome: Outcome,
    /// What went wrong, or how far a phase that timed out got.
    detail: Option<String>,
    processes: usize,
    /// From the start of the phase's work (the first member starting to
    /// join, or the child's first request) to its end: the last message, or
    /// the settle after the join.
    seconds: Option<f64>,
    messages: u64,
    /// From the start to the first moment every partition was owned once,
    /// by members whose shares differ by at most one (group phases).
    settle_seconds: Option<f64>,
    /// For the join: from the extra member starting to join to the settle.
    join_settle_seconds: Option<f64>,
    /// The largest peak RSS of the phase's child processes.
    peak_rss_bytes: Option<u64>,
    etcd_requests: Option<u64>,
}

/// What a child prints, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    /// Connected; its members start joining now (group roles).
    Ready,
    /// Member `member` of this child now owns exactly `partitions`.
    Owned {
        member: u32,
        partitions: Vec<u32>,
    },
    /// These partitions were read up to the number produced.
    Drained {
        partitions: Vec<u32>,
    },
    /// Producing or the plain consume finished, in this many seconds from
    /// the child's first request.
    Done {
        seconds: f64,
    },
    /// The child's last line, after its clients closed.
    Exit {
        peak_rss_bytes: Option<u64>,
    },
    Failed {
        error: String,
    },
}

impl Summary for PartitionsSummary {
    const BENCH: &'static str = "partitions";

    fn text(&self, namespace: &str) -> String {
        let mut out = format!(
            "namespace {namespace}, {} messages of {} B per partition, phase timeout {} s; \
             etcd requests from {}\n",
            self.messages_per_partition,
            self.size,
            self.phase_timeout_seconds,
            self.etcd_metrics.as_deref().unwrap_or("(no metrics)")
        );
        let mut table = Table::new([
            "partitions",
            "phase",
            "procs",
            "seconds",
            "µs/msg",
            "settle s",
            "join settle s",
            "peak RSS MiB",
            "etcd requests",
        ]);
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.2}"));
        let mut notes = String::new();
        for run in &self.runs {
            for phase in &run.phases {
                let seconds = match phase.outcome {
                    Outcome::Ok => secs(phase.seconds),
                    Outcome::Timeout => "timeout".into(),
                    Outcome::Failed => "failed".into(),
                    Outcome::Skipped => "skipped".into(),
                };
                let per_message = match (phase.outcome, phase.seconds) {
                    (Outcome::Ok, Some(s)) if phase.messages > 0 => {
                        format!("{:.1}", s * 1e6 / phase.messages as f64)
                    }
                    _ => "-".into(),
                };
                if let Some(detail) = &phase.detail {
                    notes.push_str(&format!(
                        "{} partitions, {}: {detail}\n",
                        run.partitions, phase.name
                    ));
                }
                table.row([
                    run.partitions.to_string(),
                    phase.name.clone(),
                    phase.processes.to_string(),
                    seconds,
                    per_message,
                    secs(phase.settle_seconds),
                    secs(phase.join_settle_seconds),
                    phase.peak_rss_bytes.map_or_else(
                        || "-".into(),
                        |b| format!("{:.1}", b as f64 / (1024.0 * 1024.0)),
                    ),
                    phase
                        .etcd_requests
                        .map_or_else(|| "-".into(), |n| n.to_string()),
                ]);
            }
        }
        out.push_str(&table.render());
        out.push_str(&notes);
        out
    }
}

/// What every phase of one run shares.
struct Context<'a> {
    connection: &'a ConnectionArgs,
    credentials: Option<&'a (String, String)>,
    args: &'a BenchPartitionsArgs,
    metrics: Option<EtcdMetrics>,
}

/// What a phase does.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Produce,
    Consume,
    /// A group of this many members drains the partitions from the start.
    Group(u32),
    /// A group of this many members settles on the latest offsets, then
    /// one more member joins in a child of its own.
    Join(u32),
}

pub async fn run(
    client: &Client,
    connection: &ConnectionArgs,
    credentials: Option<&(String, String)>,
    args: &BenchPartitionsArgs,
) -> anyhow::Result<PartitionsSummary> {
    let metrics = EtcdMetrics::locate(args.etcd_metrics.as_deref(), connection).await;
    let context = Context {
        connection,
        credentials,
        args,
        metrics,
    };
    let largest = args.partitions.iter().copied().max().unwrap_or(0);
    let mut runs = Vec::new();
    for &partitions in &args.partitions {
        let topic = format!("p{partitions}");
        client
            .create_topic(NewTopic::new(topic.as_str(), partitions))
            .await?;
        let mut kinds = vec![Kind::Produce, Kind::Consume];
        kinds.extend(args.members.iter().map(|&m| Kind::Group(m)));
        if partitions == largest {
            kinds.push(Kind::Join(args.join_group));
        }
        let mut phases: Vec<Phase> = Vec::new();
        for kind in kinds {
            let produced = phases
                .first()
                .is_none_or(|produce| produce.outcome == Outcome::Ok);
            let phase = if produced {
                phase(&context, &topic, partitions, kind).await
            } else {
                Phase::empty(kind, Outcome::Skipped, None)
            };
            phases.push(phase);
        }
        runs.push(Run { partitions, phases });
    }
    Ok(PartitionsSummary {
        messages_per_partition: args.messages_per_partition,
        size: args.size,
        phase_timeout_seconds: args.phase_timeout.as_secs_f64(),
        etcd_metrics: context.metrics.map(|m| m.url().to_string()),
        runs,
    })
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Produce => "produce".into(),
            Kind::Consume => "plain consume".into(),
            Kind::Group(m) => format!("group of {m}"),
            Kind::Join(m) => format!("{m} + 1 join"),
        }
    }

    fn role(self) -> PartitionsRole {
        match self {
            Kind::Produce => PartitionsRole::Produce,
            Kind::Consume => PartitionsRole::Consume,
            Kind::Group(_) => PartitionsRole::Group,
            Kind::Join(_) => PartitionsRole::Join,
        }
    }

    /// Group names allow only letters, digits, '.', '_' and '-'.
    fn group(self) -> String {
        match self {
            Kind::Join(m) => format!("join-{m}"),
            Kind::Group(m) => format!("group-{m}"),
            Kind::Produce | Kind::Consume => String::new(),
        }
    }

    /// Members per child process.
    fn processes(self, max: u32) -> Vec<u32> {
        match self {
            Kind::Produce | Kind::Consume => vec![0],
            Kind::Group(m) | Kind::Join(m) => {
                let n = m.min(max).max(1);
                (0..n).map(|i| m / n + u32::from(i < m % n)).collect()
            }
        }
    }
}

impl Phase {
    fn empty(kind: Kind, outcome: Outcome, detail: Option<String>) -> Phase {
        Phase {
            name: kind.name(),
            outcome,
            detail,
            processes: 0,
            seconds: None,
            messages: 0,
            settle_seconds: None,
            join_settle_seconds: None,
            peak_rss_bytes: None,
            etcd_requests: None,
        }
    }
}

/// Runs one phase under the phase timeout; never fails: what went wrong is
/// the phase's outcome.
async fn phase(context: &Context<'_>, topic: &str, partitions: u32, kind: Kind) -> Phase {
    let before = match &context.metrics {
        Some(metrics) => metrics.read().await.ok(),
        None => None,
    };
    let mut children = Children::new();
    let mut state = State::new(partitions);
    let deadline = tokio::time::Instant::now() + context.args.phase_timeout;
    let measured = tokio::time::timeout_at(
        deadline,
        measure(context, topic, partitions, kind, &mut children, &mut state),
    )
    .await;
    let exits = children.finish().await;
    let etcd_requests = match (&context.metrics, before) {
        (Some(metrics), Some(before)) => metrics
            .read()
            .await
            .ok()
            .map(|after| after.since(before).requests),
        _ => None,
    };
    let (outcome, detail) = match measured {
        Ok(Ok(())) => (Outcome::Ok, None),
        Ok(Err(e)) => (Outcome::Failed, Some(format!("{e:#}"))),
        Err(_) => (Outcome::Timeout, Some(state.progress(kind))),
    };
    let messages = match kind {
        Kind::Produce | Kind::Consume | Kind::Group(_) => {
            context.args.messages_per_partition * u64::from(partitions)
        }
        Kind::Join(_) => 0,
    };
    Phase {
        name: kind.name(),
        outcome,
        detail,
        processes: children.started,
        seconds: state.seconds,
        messages,
        settle_seconds: state.settle_seconds(),
        join_settle_seconds: state.join_settle_seconds(),
        peak_rss_bytes: exits.into_iter().flatten().max(),
        etcd_requests,
    }
}

/// Starts the phase's children and follows their lines until the phase's
/// work is done.
async fn measure(
    context: &Context<'_>,
    topic: &str,
    partitions: u32,
    kind: Kind,
    children: &mut Children,
    state: &mut State,
) -> anyhow::Result<()> {
    for members in kind.processes(context.args.processes) {
        children.spawn(context, topic, partitions, kind, members)?;
        state.add_members(children.started - 1, members);
    }
    let mut extra = None;
    loop {
        let (child, line) = children.next().await;
        let Some(line) = line else {
            bail!("a worker ended before its phase did (its error is above)");
        };
        match line {
            Line::Ready => {
                let now = Instant::now();
                state.started.get_or_insert(now);
                if extra == Some(child) {
                    state.joined = Some(now);
                }
            }
            Line::Owned { member, partitions } => state.owned(child, member, partitions),
            Line::Drained { partitions } => state.drained(&partitions),
            Line::Done { seconds } => state.seconds = Some(seconds),
            Line::Exit { .. } => bail!("a worker ended before its phase did"),
            Line::Failed { error } => bail!("{error}"),
        }
        match kind {
            Kind::Produce | Kind::Consume if state.seconds.is_some() => return Ok(()),
            Kind::Group(_) if state.settled.is_some() && state.all_drained() => {
                state.finished();
                return Ok(());
            }
            Kind::Join(_) if extra.is_none() && state.settled.is_some() => {
                state.first_settle = state.settled;
                children.spawn(context, topic, partitions, kind, 1)?;
                extra = Some(children.started - 1);
                state.add_members(children.started - 1, 1);
            }
            Kind::Join(_) if state.joined.is_some() && state.settled.is_some() => {
                state.finished();
                return Ok(());
            }
            _ => {}
        }
    }
}

/// The phase's children and the lines they print.
struct Children {
    started: usize,
    processes: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    lines_tx: mpsc::Sender<(usize, Option<Line>)>,
    lines: mpsc::Receiver<(usize, Option<Line>)>,
    /// Children that sent their last line (`None` or `Exit`).
    ended: BTreeSet<usize>,
    exits: Vec<Option<u64>>,
}

impl Children {
    fn new() -> Self {
        let (lines_tx, lines) = mpsc::channel(1024);
        Children {
            started: 0,
            processes: Vec::new(),
            stdins: Vec::new(),
            lines_tx,
            lines,
            ended: BTreeSet::new(),
            exits: Vec::new(),
        }
    }

    /// Starts a child with this process's connection.
    fn spawn(
        &mut self,
        context: &Context<'_>,
        topic: &str,
        partitions: u32,
        kind: Kind,
        members: u32,
    ) -> anyhow::Result<()> {
        let (connection, args) = (context.connection, context.args);
        let exe = std::env::current_exe().context("cannot find this program to start workers")?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg("--endpoints")
            .arg(connection.endpoints.join(","))
            .arg("--no-auto-compaction")
            .args(["bench", "partitions-worker"])
            .args(["--bench-namespace", &connection.namespace])
            .args(["--role", kind.role().as_str()])
            .args(["--topic", topic])
            .args(["--group", &kind.group()])
            .args(["--partitions", &partitions.to_string()])
            .args([
                "--messages-per-partition",
                &args.messages_per_partition.to_string(),
            ])
            .args(["--size", &args.size.to_string()])
            .args(["--members", &members.to_string()]);
        for (flag, file) in [
            ("--cacert", &connection.cacert),
            ("--cert", &connection.cert),
            ("--key", &connection.key),
        ] {
            if let Some(file) = file {
                command.arg(flag).arg(file);
            }
        }
        if let Some(timeout) = connection.timeout {
            command
                .arg("--timeout")
                .arg(humantime::format_duration(timeout).to_string());
        }
        if let Some((user, password)) = context.credentials {
            // The password goes by environment, not where `ps` shows it.
            command
                .args(["--user", user])
                .env("PUBSUB_ETCD_PASSWORD", password);
        }
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().context("cannot start a worker")?;
        let index = self.started;
        self.started += 1;
        self.stdins.push(child.stdin.take());
        self.exits.push(None);
        let stdout = child.stdout.take().context("a worker without stdout")?;
        let tx = self.lines_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let line = serde_json::from_str(&text).unwrap_or_else(|e| Line::Failed {
                    error: format!("bad worker line {text:?}: {e}"),
                });
                if tx.send((index, Some(line))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send((index, None)).await;
        });
        self.processes.push(child);
        Ok(())
    }

    /// The next line of any child; `None` when that child's output ended.
    async fn next(&mut self) -> (usize, Option<Line>) {
        let (child, line) = self.lines.recv().await.expect("the sender lives in self");
        match &line {
            None => {
                self.ended.insert(child);
            }
            Some(Line::Exit { peak_rss_bytes }) => {
                self.exits[child] = *peak_rss_bytes;
                self.ended.insert(child);
            }
            Some(_) => {}
        }
        (child, line)
    }

    /// Tells every child to stop (closes its stdin), waits up to [`CLOSE`]
    /// for their last lines, kills the rest, and returns each child's peak
    /// RSS.
    async fn finish(&mut self) -> Vec<Option<u64>> {
        self.stdins.clear();
        let _ = tokio::time::timeout(CLOSE, async {
            while self.ended.len() < self.started {
                self.next().await;
            }
        })
        .await;
        for child in &mut self.processes {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        std::mem::take(&mut self.exits)
    }
}

/// What the parent knows of a phase from its children's lines.
struct State {
    partitions: u32,
    /// Owned partitions of each member: (child, member in it, partitions).
    owners: Vec<(usize, u32, BTreeSet<u32>)>,
    drained: Vec<bool>,
    drained_count: u32,
    /// When the first member started to join.
    started: Option<Instant>,
    /// When the group last became settled; reset when a member is added.
    settled: Option<Instant>,
    first_settle: Option<Instant>,
    /// When the extra member of a join started to join.
    joined: Option<Instant>,
    seconds: Option<f64>,
}

impl State {
    fn new(partitions: u32) -> Self {
        State {
            partitions,
            owners: Vec::new(),
            drained: vec![false; partitions as usize],
            drained_count: 0,
            started: None,
            settled: None,
            first_settle: None,
            joined: None,
            seconds: None,
        }
    }

    fn add_members(&mut self, child: usize, members: u32) {
        self.owners
            .extend((0..members).map(|m| (child, m, BTreeSet::new())));
        self.settled = None;
    }

    fn owned(&mut self, child: usize, member: u32, partitions: Vec<u32>) {
        if let Some((_, _, set)) = self
            .owners
            .iter_mut()
            .find(|(c, m, _)| *c == child && *m == member)
        {
            *set = partitions.into_iter().collect();
        }
        let total: usize = self.owners.iter().map(|(_, _, s)| s.len()).sum();
        let union: BTreeSet<u32> = self
            .owners
            .iter()
            .flat_map(|(_, _, s)| s.iter().copied())
            .collect();
        let min = self.owners.iter().map(|(_, _, s)| s.len()).min();
        let max = self.owners.iter().map(|(_, _, s)| s.len()).max();
        let balanced = matches!((min, max), (Some(min), Some(max)) if max - min <= 1);
        let settled = balanced
            && total == self.partitions as usize
            && union.len() == self.partitions as usize;
        if !settled {
            self.settled = None;
        } else if self.settled.is_none() {
            self.settled = Some(Instant::now());
        }
    }

    fn drained(&mut self, partitions: &[u32]) {
        for &p in partitions {
            if let Some(done) = self.drained.get_mut(p as usize) {
                if !*done {
                    *done = true;
                    self.drained_count += 1;
                }
            }
        }
    }

    fn all_drained(&self) -> bool {
        self.drained_count == self.partitions
    }

    /// Records the phase's time: now, from the first member's start.
    fn finished(&mut self) {
        if let Some(started) = self.started {
            self.seconds = Some(started.elapsed().as_secs_f64());
        }
    }

    fn settle_seconds(&self) -> Option<f64> {
        let settle = self.first_settle.or(self.settled)?;
        Some(settle.checked_duration_since(self.started?)?.as_secs_f64())
    }

    fn join_settle_seconds(&self) -> Option<f64> {
        self.first_settle?;
        let settled = self.settled?;
        Some(settled.checked_duration_since(self.joined?)?.as_secs_f64())
    }

    /// How far a phase that timed out got.
    fn progress(&self, kind: Kind) -> String {
        let owned: usize = self.owners.iter().map(|(_, _, s)| s.len()).sum();
        match kind {
            Kind::Produce | Kind::Consume => "the worker did not finish".into(),
            Kind::Group(_) => format!(
                "{} of {} partitions drained; {owned} owned by {} members",
                self.drained_count,
                self.partitions,
                self.owners.len()
            ),
            Kind::Join(_) => format!(
                "first settle: {}; extra member started: {}; {owned} of {} partitions owned",
                if self.first_settle.is_some() {
                    "yes"
                } else {
                    "no"
                },
                if self.joined.is_some() { "yes" } else { "no" },
                self.partitions
            ),
        }
    }
}

/// Writes a child's lines to stdout, one JSON object each.
#[derive(Clone)]
struct Out(mpsc::Sender<Line>);

impl Out {
    async fn send(&self, line: Line) {
        let _ = self.0.send(line).await;
    }
}

/// The worker side: one phase's child. Its failure is reported as a
/// `Failed` line, so the parent can say what it was.
pub async fn worker(client: &Client, args: &PartitionsWorkerArgs) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Line>(1024);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            let mut text = serde_json::to_string(&line)?;
            text.push('\n');
            stdout.write_all(text.as_bytes()).await?;
            stdout.flush().await?;
        }
        anyhow::Ok(())
    });
    let out = Out(tx);
    let work = match args.role {
        PartitionsRole::Produce => produce(client, args, &out).await,
        PartitionsRole::Consume => consume(client, args, &out).await,
        PartitionsRole::Group | PartitionsRole::Join => group(client, args, &out).await,
    };
    match work {
        Ok(()) => {
            out.send(Line::Exit {
                peak_rss_bytes: peak_rss(),
            })
            .await;
        }
        Err(e) => {
            out.send(Line::Failed {
                error: format!("{e:#}"),
            })
            .await;
        }
    }
    drop(out);
    writer.await?
}

fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

async fn produce(client: &Client, args: &PartitionsWorkerArgs, out: &Out) -> anyhow::Result<()> {
    let producer = client.producer(args.topic.as_str()).build().await?;
    let value = Bytes::from(vec![b'x'; args.size as usize]);
    let started = Instant::now();
    // Acknowledgements are awaited in send order: a task per message would
    // cost more than the sends.
    let mut in_flight: VecDeque<Delivery> = VecDeque::with_capacity(IN_FLIGHT);
    // Round by round over the partitions, as many independent keys would.
    for _ in 0..args.messages_per_partition {
        for partition in 0..args.partitions {
            if in_flight.len() >= IN_FLIGHT {
                if let Some(delivery) = in_flight.pop_front() {
                    delivery.await.context("producing")?;
                }
            }
            let record = Record::new(value.clone()).partition(partition);
            in_flight.push_back(producer.enqueue(record).await?);
        }
    }
    for delivery in in_flight {
        delivery.await.context("producing")?;
    }
    out.send(Line::Done {
        seconds: started.elapsed().as_secs_f64(),
    })
    .await;
    producer.close().await?;
    Ok(())
}

/// The next offset to read of each partition; says when one is drained.
struct Progress {
    next: Vec<AtomicU64>,
    target: u64,
}

impl Progress {
    fn new(partitions: u32, target: u64) -> Arc<Self> {
        Arc::new(Progress {
            next: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            target,
        })
    }

    /// Whether this message drained its partition, for the first time.
    fn saw(&self, partition: u32, offset: u64) -> bool {
        let Some(next) = self.next.get(partition as usize) else {
            return false;
        };
        let before = next.fetch_max(offset + 1, Ordering::Relaxed);
        before < self.target && offset + 1 >= self.target
    }
}

async fn consume(client: &Client, args: &PartitionsWorkerArgs, out: &Out) -> anyhow::Result<()> {
    let started = Instant::now();
    let progress = Progress::new(args.partitions, args.messages_per_partition);
    let mut reader = client
        .assign(
            &args.topic,
            (0..args.partitions).map(|p| (p, StartOffset::Earliest)),
        )
        .await?;
    let mut drained = 0;
    while drained < args.partitions {
        let Some(message) = reader.recv().await else {
            bail!("the reader ended before the partitions were drained");
        };
        let message = message?;
        if progress.saw(message.partition, message.offset) {
            drained += 1;
        }
    }
    out.send(Line::Done {
        seconds: started.elapsed().as_secs_f64(),
    })
    .await;
    tokio::time::timeout(CLOSE, reader.close())
        .await
        .context("the reader did not close")?;
    Ok(())
}

/// Members as tasks of this child, until the parent closes its stdin.
/// `Group`: drain from the earliest message. `Join`: start at the latest
/// (nothing to read); the parent only watches ownership.
async fn group(client: &Client, args: &PartitionsWorkerArgs, out: &Out) -> anyhow::Result<()> {
    let progress = Progress::new(args.partitions, args.messages_per_partition);
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut tokio::io::sink()).await;
        stop_tx.send_replace(true);
    });
    let start = match args.role {
        PartitionsRole::Join => StartOffset::Latest,
        _ => StartOffset::Earliest,
    };
    out.send(Line::Ready).await;
    let members = (0..args.members).map(|member| {
        let builder = client
            .consumer(args.topic.as_str(), args.group.as_str())
            .start_offset(start);
        let (progress, out, mut stop) = (progress.clone(), out.clone(), stop.clone());
        let member_out = out.clone();
        let run = async move {
            let mut consumer = tokio::select! {
                consumer = builder.join() => consumer.context("joining")?,
                _ = stop.wait_for(|s| *s) => return anyhow::Ok(()),
            };
            let mut owned = BTreeSet::new();
            loop {
                let event = tokio::select! {
                    event = consumer.next_event() => event,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let changed = match event {
                    None => break,
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    Some(Ok(Event::Message(m))) => {
                        if progress.saw(m.partition, m.offset) {
                            out.send(Line::Drained {
                                partitions: vec![m.partition],
                            })
                            .await;
                        }
                        false
                    }
                    Some(Ok(Event::Assigned(ps))) => {
                        owned.extend(ps);
                        true
                    }
                    Some(Ok(Event::Revoking(ps) | Event::Lost(ps))) => {
                        ps.iter().for_each(|p| {
                            owned.remove(p);
                        });
                        true
                    }
                    Some(Ok(_)) => false,
                };
                if changed {
                    out.send(Line::Owned {
                        member,
                        partitions: owned.iter().copied().collect(),
                    })
                    .await;
                }
            }
            tokio::time::timeout(CLOSE, consumer.close())
                .await
                .context("a member did not close")??;
            anyhow::Ok(())
        };
        // Said at once: the parent would otherwise wait for a settle that
        // cannot come.
        tokio::spawn(async move {
            let outcome = run.await;
            if let Err(e) = &outcome {
                member_out
                    .send(Line::Failed {
                        error: format!("member {member}: {e:#}"),
                    })
                    .await;
            }
            outcome
        })
    });
    for member in join_all(members).await {
        member??;
    }
    Ok(())
}
