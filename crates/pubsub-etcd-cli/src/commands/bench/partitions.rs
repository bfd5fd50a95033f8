//! `bench partitions`: what thousands of partitions cost. For each
//! partition count it produces a number of messages to every partition,
//! drains them with a plain consume and with groups of several sizes, and
//! times a large group's settle after one more member joins.
//!
//! Every phase runs in a child process of this binary (the hidden
//! `bench partitions-worker`), so the peak RSS it reports (VmHWM, read from
//! the child's own /proc/self/status as it ends) is that phase's alone. The
//! members of one group are tasks in one child process. etcd requests are
//! the growth of etcd's `grpc_server_handled_total` over the phase.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::future::join_all;
use pubsub_etcd::{Bytes, Client, Event, NewTopic, Record, StartOffset};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{watch, Semaphore};

use super::Summary;
use crate::cli::{BenchPartitionsArgs, ConnectionArgs, PartitionsRole, PartitionsWorkerArgs};
use crate::output::Table;

/// Records in flight in the producing child.
const IN_FLIGHT: usize = 50_000;
/// A phase with no progress for this long has stalled.
const STALL: Duration = Duration::from_secs(120);
/// How long a child may take to close its consumers after its measurement.
const CLOSE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct PartitionsSummary {
    messages_per_partition: u64,
    size: u32,
    /// Where the etcd request counts come from; absent when not reachable.
    etcd_metrics: Option<String>,
    runs: Vec<Run>,
}

#[derive(Debug, Serialize)]
struct Run {
    partitions: u32,
    phases: Vec<Phase>,
}

#[derive(Debug, Serialize)]
struct Phase {
    name: String,
    #[serde(flatten)]
    report: Report,
    etcd_requests: Option<u64>,
}

/// What a worker child prints as its one line of JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// From the start of the phase's work to its end (the last message, or
    /// the settle).
    seconds: f64,
    /// The first time every partition was owned, by members whose shares
    /// differ by at most one (group phases).
    settle_seconds: Option<f64>,
    /// For `join`: the settle after the extra member joined.
    join_settle_seconds: Option<f64>,
    messages: u64,
    peak_rss_bytes: Option<u64>,
}

impl Summary for PartitionsSummary {
    const BENCH: &'static str = "partitions";

    fn text(&self, namespace: &str) -> String {
        let mut out = format!(
            "namespace {namespace}, {} messages of {} B per partition; etcd requests from {}\n",
            self.messages_per_partition,
            self.size,
            self.etcd_metrics.as_deref().unwrap_or("(no metrics)")
        );
        let mut table = Table::new([
            "partitions",
            "phase",
            "seconds",
            "µs/msg",
            "settle s",
            "join settle s",
            "peak RSS MiB",
            "etcd requests",
        ]);
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.2}"));
        for run in &self.runs {
            for phase in &run.phases {
                let r = &phase.report;
                let per_message = (r.messages > 0)
                    .then(|| format!("{:.1}", r.seconds * 1e6 / r.messages as f64))
                    .unwrap_or_else(|| "-".into());
                table.row([
                    run.partitions.to_string(),
                    phase.name.clone(),
                    format!("{:.2}", r.seconds),
                    per_message,
                    secs(r.settle_seconds),
                    secs(r.join_settle_seconds),
                    r.peak_rss_bytes.map_or_else(
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
        out
    }
}

pub async fn run(
    client: &Client,
    connection: &ConnectionArgs,
    credentials: Option<&(String, String)>,
    args: &BenchPartitionsArgs,
) -> anyhow::Result<PartitionsSummary> {
    let metrics = args.etcd_metrics.clone().or_else(|| {
        let endpoint = connection.endpoints.first()?;
        let host = endpoint
            .strip_prefix("http://")
            .unwrap_or(endpoint)
            .trim_end_matches('/');
        (!host.contains("://")).then(|| format!("http://{host}/metrics"))
    });
    let metrics = match &metrics {
        Some(url) if etcd_requests(url).await.is_ok() => Some(url.clone()),
        _ => None,
    };
    let largest = args.partitions.iter().copied().max().unwrap_or(0);
    let mut runs = Vec::new();
    for &partitions in &args.partitions {
        let topic = format!("p{partitions}");
        client
            .create_topic(NewTopic::new(topic.as_str(), partitions))
            .await?;
        let mut phases = Vec::new();
        let phase = |name: String, role: PartitionsRole, members: u32| {
            let worker = Worker {
                role,
                topic: topic.clone(),
                group: name.replace(' ', "-"),
                partitions,
                members,
            };
            let metrics = metrics.clone();
            async move {
                let before = match &metrics {
                    Some(url) => Some(etcd_requests(url).await?),
                    None => None,
                };
                let report = spawn_worker(connection, credentials, args, &worker)
                    .await
                    .with_context(|| format!("{partitions} partitions, {name}"))?;
                let etcd_requests = match (&metrics, before) {
                    (Some(url), Some(before)) => {
                        Some(etcd_requests(url).await?.saturating_sub(before))
                    }
                    _ => None,
                };
                anyhow::Ok(Phase {
                    name,
                    report,
                    etcd_requests,
                })
            }
        };
        phases.push(phase("produce".into(), PartitionsRole::Produce, 0).await?);
        phases.push(phase("plain consume".into(), PartitionsRole::Consume, 0).await?);
        for &members in &args.members {
            phases.push(
                phase(
                    format!("group of {members}"),
                    PartitionsRole::Group,
                    members,
                )
                .await?,
            );
        }
        if partitions == largest {
            let members = args.join_group;
            phases.push(phase(format!("{members} + 1 join"), PartitionsRole::Join, members).await?);
        }
        runs.push(Run { partitions, phases });
    }
    Ok(PartitionsSummary {
        messages_per_partition: args.messages_per_partition,
        size: args.size,
        etcd_metrics: metrics,
        runs,
    })
}

/// One phase as the parent describes it to its child.
struct Worker {
    role: PartitionsRole,
    topic: String,
    group: String,
    partitions: u32,
    members: u32,
}

/// Runs one phase in a child process with this process's connection and
/// reads its report.
async fn spawn_worker(
    connection: &ConnectionArgs,
    credentials: Option<&(String, String)>,
    args: &BenchPartitionsArgs,
    worker: &Worker,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("cannot find this program to start workers")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("--endpoints")
        .arg(connection.endpoints.join(","))
        .arg("--no-auto-compaction")
        .args(["bench", "partitions-worker"])
        .args(["--bench-namespace", &connection.namespace])
        .args(["--role", worker.role.as_str()])
        .args(["--topic", &worker.topic])
        .args(["--group", &worker.group])
        .args(["--partitions", &worker.partitions.to_string()])
        .args([
            "--messages-per-partition",
            &args.messages_per_partition.to_string(),
        ])
        .args(["--size", &args.size.to_string()])
        .args(["--members", &worker.members.to_string()]);
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
    if let Some((user, password)) = credentials {
        // The password goes by environment, not where `ps` shows it.
        command
            .args(["--user", user])
            .env("PUBSUB_ETCD_PASSWORD", password);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let output = command.output().await.context("cannot start a worker")?;
    if !output.status.success() {
        bail!("the worker failed ({})", output.status);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("bad worker report {line:?}"))
}

/// The sum of etcd's `grpc_server_handled_total`: every gRPC request etcd
/// finished, of any method. Read by a plain HTTP/1.0 GET, which is all the
/// loopback metrics endpoint needs.
async fn etcd_requests(url: &str) -> anyhow::Result<u64> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// metrics URLs are read"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(host).await?;
        stream
            .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        // Bounded: etcd's metrics page is some hundred KiB.
        stream.take(64 << 20).read_to_string(&mut body).await?;
        std::io::Result::Ok(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .with_context(|| format!("{url} did not answer"))?
        .with_context(|| format!("cannot read {url}"))?;
    let total = body
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    Ok(total as u64)
}

/// The worker side: one phase, its report printed as one JSON line.
pub async fn worker(client: &Client, args: &PartitionsWorkerArgs) -> anyhow::Result<String> {
    let report = match args.role {
        PartitionsRole::Produce => produce(client, args).await?,
        PartitionsRole::Consume => consume(client, args).await?,
        PartitionsRole::Group | PartitionsRole::Join => group(client, args).await?,
    };
    Ok(format!("{}\n", serde_json::to_string(&report)?))
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

async fn produce(client: &Client, args: &PartitionsWorkerArgs) -> anyhow::Result<Report> {
    let producer = client.producer(args.topic.as_str()).build().await?;
    let value = Bytes::from(vec![b'x'; args.size as usize]);
    let window = Arc::new(Semaphore::new(IN_FLIGHT));
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<pubsub_etcd::Error>(1);
    let started = Instant::now();
    let mut acks = Vec::new();
    // Round by round over the partitions, as many independent keys would.
    for _ in 0..args.messages_per_partition {
        for partition in 0..args.partitions {
            let permit = window.clone().acquire_owned().await?;
            if let Ok(error) = failed_rx.try_recv() {
                return Err(error).context("producing");
            }
            let delivery = producer
                .enqueue(Record::new(value.clone()).partition(partition))
                .await?;
            let failed = failed_tx.clone();
            acks.push(tokio::spawn(async move {
                if let Err(e) = delivery.await {
                    let _ = failed.try_send(e);
                }
                drop(permit);
            }));
        }
    }
    join_all(acks).await;
    if let Ok(error) = failed_rx.try_recv() {
        return Err(error).context("producing");
    }
    let seconds = started.elapsed().as_secs_f64();
    producer.close().await?;
    Ok(Report {
        seconds,
        settle_seconds: None,
        join_settle_seconds: None,
        messages: args.messages_per_partition * u64::from(args.partitions),
        peak_rss_bytes: peak_rss(),
    })
}

/// Offsets seen per partition; drained when every partition reached the
/// number produced.
struct Progress {
    next: Vec<AtomicU64>,
    complete: AtomicU64,
    target: u64,
    done: watch::Sender<bool>,
    last: Mutex<Instant>,
}

impl Progress {
    fn new(partitions: u32, target: u64) -> Arc<Self> {
        Arc::new(Progress {
            next: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            complete: AtomicU64::new(0),
            target,
            done: watch::channel(false).0,
            last: Mutex::new(Instant::now()),
        })
    }

    fn saw(&self, partition: u32, offset: u64) {
        let Some(next) = self.next.get(partition as usize) else {
            return;
        };
        let before = next.fetch_max(offset + 1, Ordering::Relaxed);
        if before < self.target && offset + 1 >= self.target {
            *self.last.lock().expect("progress lock") = Instant::now();
            let complete = self.complete.fetch_add(1, Ordering::Relaxed) + 1;
            if complete == self.next.len() as u64 {
                self.done.send_replace(true);
            }
        } else if offset % 1000 == 0 {
            *self.last.lock().expect("progress lock") = Instant::now();
        }
    }

    /// Waits until drained, failing after [`STALL`] without progress.
    async fn drained(&self) -> anyhow::Result<()> {
        let mut done = self.done.subscribe();
        loop {
            if *done.borrow_and_update() {
                return Ok(());
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), done.changed()).await;
            if self.last.lock().expect("progress lock").elapsed() > STALL {
                bail!(
                    "stalled: {} of {} partitions drained",
                    self.complete.load(Ordering::Relaxed),
                    self.next.len()
                );
            }
        }
    }
}

async fn consume(client: &Client, args: &PartitionsWorkerArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let progress = Progress::new(args.partitions, args.messages_per_partition);
    let mut reader = client
        .assign(
            &args.topic,
            (0..args.partitions).map(|p| (p, StartOffset::Earliest)),
        )
        .await?;
    let reading = async {
        while let Some(message) = reader.recv().await {
            let message = message?;
            progress.saw(message.partition, message.offset);
        }
        anyhow::Ok(())
    };
    tokio::select! {
        read = reading => { read?; bail!("the reader ended before the partitions were drained") }
        drained = progress.drained() => drained?,
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(CLOSE, reader.close()).await;
    Ok(Report {
        seconds,
        settle_seconds: None,
        join_settle_seconds: None,
        messages: args.messages_per_partition * u64::from(args.partitions),
        peak_rss_bytes: peak_rss(),
    })
}

/// Who owns what, as the members' events tell; settled when every
/// partition is owned exactly once and the live members' shares differ by
/// at most one.
struct Owners {
    partitions: u32,
    owned: Mutex<Vec<Option<BTreeSet<u32>>>>,
    settled: watch::Sender<Option<Instant>>,
}

impl Owners {
    fn update(&self, member: usize, change: impl FnOnce(&mut BTreeSet<u32>)) {
        let mut owned = self.owned.lock().expect("owners lock");
        if let Some(Some(set)) = owned.get_mut(member) {
            change(set);
        }
        let live: Vec<&BTreeSet<u32>> = owned.iter().flatten().collect();
        let total: usize = live.iter().map(|s| s.len()).sum();
        let union: BTreeSet<u32> = live.iter().flat_map(|s| s.iter().copied()).collect();
        let min = live.iter().map(|s| s.len()).min().unwrap_or(0);
        let max = live.iter().map(|s| s.len()).max().unwrap_or(0);
        let settled = total == self.partitions as usize
            && union.len() == self.partitions as usize
            && max - min <= 1;
        if settled && self.settled.borrow().is_none() {
            self.settled.send_replace(Some(Instant::now()));
        }
    }

    /// Adds a member (not owning anything yet) and forgets any earlier settle.
    fn add(&self) -> usize {
        let mut owned = self.owned.lock().expect("owners lock");
        owned.push(Some(BTreeSet::new()));
        self.settled.send_replace(None);
        owned.len() - 1
    }

    async fn wait_settled(&self) -> anyhow::Result<Instant> {
        let mut settled = self.settled.subscribe();
        let at = tokio::time::timeout(STALL, settled.wait_for(Option::is_some))
            .await
            .context("the group did not settle")??;
        Ok(at.expect("waited for a settle"))
    }
}

/// Members as tasks of this process. `Group`: drain from the earliest
/// message. `Join`: start at the latest (nothing to read), settle, then one
/// more member joins and the settle is timed again.
async fn group(client: &Client, args: &PartitionsWorkerArgs) -> anyhow::Result<Report> {
    let drain = matches!(args.role, PartitionsRole::Group);
    let progress = Progress::new(args.partitions, args.messages_per_partition);
    let owners = Arc::new(Owners {
        partitions: args.partitions,
        owned: Mutex::new(Vec::new()),
        settled: watch::channel(None).0,
    });
    let (stop_tx, stop) = watch::channel(false);
    let start = if drain {
        StartOffset::Earliest
    } else {
        StartOffset::Latest
    };
    let spawn_member = |index: usize| {
        let builder = client
            .consumer(args.topic.as_str(), args.group.as_str())
            .start_offset(start);
        let (progress, owners, mut stop) = (progress.clone(), owners.clone(), stop.clone());
        tokio::spawn(async move {
            let mut consumer = builder.join().await?;
            loop {
                let event = tokio::select! {
                    event = consumer.next_event() => event,
                    _ = stop.wait_for(|s| *s) => break,
                };
                match event {
                    None => break,
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    Some(Ok(Event::Message(m))) => progress.saw(m.partition, m.offset),
                    Some(Ok(Event::Assigned(ps))) => owners.update(index, |s| s.extend(ps)),
                    Some(Ok(Event::Revoking(ps) | Event::Lost(ps))) => owners.update(index, |s| {
                        ps.iter().for_each(|p| {
                            s.remove(p);
                        })
                    }),
                    Some(Ok(_)) => {}
                }
            }
            let _ = tokio::time::timeout(CLOSE, consumer.close()).await;
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    let mut members: Vec<_> = (0..args.members)
        .map(|_| spawn_member(owners.add()))
        .collect();
    let outcome = async {
        let settled = owners.wait_settled().await?;
        let mut join_settle = None;
        if drain {
            progress.drained().await?;
        } else {
            let joined = Instant::now();
            members.push(spawn_member(owners.add()));
            join_settle = Some(owners.wait_settled().await?.duration_since(joined));
        }
        anyhow::Ok((settled, join_settle, started.elapsed()))
    }
    .await;
    stop_tx.send_replace(true);
    for member in join_all(members).await {
        member??;
    }
    let (settled, join_settle, elapsed) = outcome?;
    Ok(Report {
        seconds: elapsed.as_secs_f64(),
        settle_seconds: Some(settled.duration_since(started).as_secs_f64()),
        join_settle_seconds: join_settle.map(|d| d.as_secs_f64()),
        messages: if drain {
            args.messages_per_partition * u64::from(args.partitions)
        } else {
            0
        },
        peak_rss_bytes: peak_rss(),
    })
}
