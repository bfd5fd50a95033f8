//! `pipe IN OUT --group G --exec CMD`: an exactly-once pipeline stage. One
//! long-running CMD transforms lines; each batch of inputs and CMD's output
//! lines for them are committed by one `Transaction`.
//!
//! The contract with CMD: it is started once (`sh -c CMD`) and reads input
//! values, one per line, on stdin; for each input line it writes exactly one
//! output line to stdout, in order, without waiting for more input (flush
//! after each line: `sed -u`, `awk` with `fflush()`, `python3 -u`). It must
//! not keep state that matters between lines: after a crash or a lost
//! partition, inputs are fed again, to this CMD or another member's.
//!
//! Ctrl-C or SIGTERM stops the stage between commits: a batch not yet
//! committed is dropped (its inputs go again), CMD's input is closed, and
//! the member leaves its group.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use pubsub_etcd::{AutoCommit, Bytes, Client, Consumer, Error, Message, Record, Transaction};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::sync::mpsc;

use super::process;
use crate::cli::PipeArgs;

/// How long one transaction is retried after unknown outcomes before the
/// stage gives up (the transaction keeps its content meanwhile, so every
/// retry first finds out whether it landed).
const UNKNOWN_RETRY_FOR: Duration = Duration::from_secs(60);

pub async fn run(client: &Client, args: PipeArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.batch as u64 > pubsub_etcd::MAX_RECORDS_PER_BATCH {
        bail!(
            "--batch is {}; it must be between 1 and {}",
            args.batch,
            pubsub_etcd::MAX_RECORDS_PER_BATCH
        );
    }
    client.topic(&args.output).await?;
    let mut builder = client
        .consumer(&args.input, &args.group)
        .auto_commit(AutoCommit::Disabled)
        .session_ttl(args.session_ttl);
    if let Some(id) = &args.member_id {
        builder = builder.member_id(id);
    }
    let mut consumer = builder.join().await?;
    let mut stage = Exec::start(&args.exec, args.exec_timeout)?;
    let shutdown = process::shutdown()?;
    tokio::pin!(shutdown);
    let mut tx = consumer.transaction();
    let mut done = 0u64;
    let result = loop {
        if args.max.is_some_and(|max| done >= max) {
            break Ok(());
        }
        let room = args
            .max
            .map_or(args.batch, |max| args.batch.min((max - done) as usize));
        let batch = tokio::select! {
            batch = collect(&mut consumer, room, args.linger) => batch,
            () = &mut shutdown => break Ok(()),
        };
        let batch = match batch {
            Ok(batch) if batch.is_empty() => break Ok(()),
            Ok(batch) => batch,
            Err(e) => break Err(e),
        };
        // Nothing of a batch is committed before its lines are all in, so
        // it may be dropped here.
        let lines = tokio::select! {
            lines = stage.transform(&batch) => match lines {
                Ok(lines) => lines,
                Err(e) => break Err(e),
            },
            () = &mut shutdown => break Ok(()),
        };
        for (message, line) in batch.iter().zip(lines) {
            let mut record = Record::new(line);
            if let Some(key) = &message.key {
                record = record.key(key.clone());
            }
            tx.send(args.output.as_str(), record);
            tx.commit_input(message);
        }
        match commit(&mut tx).await {
            Ok(()) => done += batch.len() as u64,
            Err(e @ (Error::NotOwner { .. } | Error::InputCommitted { .. })) => {
                tracing::info!(error = %e, "batch dropped, partitions moved on");
                if let Err(e) = rewind(&mut consumer, &batch).await {
                    break Err(e);
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    stage.stop().await;
    let closed = consumer.close().await;
    result?;
    closed?;
    Ok(())
}

/// Up to `room` messages: waits for the first, then takes what comes
/// within `linger` of it. Empty once the consumer is closed.
async fn collect(
    consumer: &mut Consumer,
    room: usize,
    linger: Duration,
) -> anyhow::Result<Vec<Message>> {
    let mut batch = Vec::with_capacity(room.min(1024));
    let Some(first) = consumer.recv().await else {
        return Ok(batch);
    };
    batch.push(first?);
    let until = tokio::time::Instant::now() + linger;
    while batch.len() < room {
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Ok(Some(message)) => batch.push(message?),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(batch)
}

/// Commits, retrying while the outcome is unknown: the transaction keeps
/// its content, and each retry first looks for the commit in etcd, so none
/// lands twice.
async fn commit(tx: &mut Transaction) -> Result<(), Error> {
    let started = tokio::time::Instant::now();
    loop {
        match tx.commit().await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_outcome_unknown() && started.elapsed() < UNKNOWN_RETRY_FOR => {
                tracing::warn!(error = %e, "transaction outcome unknown, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads a dropped batch's partitions again from its first message, on
/// those still owned: the consumer has moved past them, and nothing of
/// them was committed.
async fn rewind(consumer: &mut Consumer, batch: &[Message]) -> anyhow::Result<()> {
    let mut first: BTreeMap<u32, u64> = BTreeMap::new();
    for m in batch {
        first.entry(m.partition).or_insert(m.offset);
    }
    for (partition, offset) in first {
        match consumer.seek(partition, offset).await {
            Ok(()) | Err(Error::NotOwner { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The CMD process: a task writes each batch's lines to its stdin while
/// its output lines are read, so neither side waits on a full pipe.
struct Exec {
    child: Child,
    /// The longest a batch's output may take.
    timeout: Duration,
    lines: mpsc::Sender<Vec<Bytes>>,
    stdout: BufReader<ChildStdout>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Exec {
    fn start(command: &str, timeout: Duration) -> anyhow::Result<Exec> {
        let mut child = process::shell(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {command:?}"))?;
        let mut stdin = child.stdin.take().context("CMD's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("CMD's stdout")?);
        let (lines, mut batches) = mpsc::channel::<Vec<Bytes>>(1);
        let writer = tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                for value in batch {
                    stdin.write_all(&value).await?;
                    stdin.write_all(b"\n").await?;
                }
                stdin.flush().await?;
            }
            Ok(())
        });
        Ok(Exec {
            child,
            timeout,
            lines,
            stdout,
            writer,
        })
    }

    /// CMD's output line for each message of `batch`, in order.
    async fn transform(&mut self, batch: &[Message]) -> anyhow::Result<Vec<Vec<u8>>> {
        for m in batch {
            if m.value.contains(&b'\n') {
                bail!(
                    "message at offset {} of partition {} of {:?} contains a newline, \
                     which the line protocol with CMD cannot carry",
                    m.offset,
                    m.partition,
                    m.topic
                );
            }
        }
        let values = batch.iter().map(|m| m.value.clone()).collect();
        if self.lines.send(values).await.is_err() {
            bail!(
                "CMD stopped reading its input: {}",
                self.writer_error().await
            );
        }
        let until = tokio::time::Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(batch.len());
        for _ in batch {
            let mut line = Vec::new();
            let Ok(read) =
                tokio::time::timeout_at(until, self.stdout.read_until(b'\n', &mut line)).await
            else {
                bail!(
                    "CMD gave {} of {} output lines of a batch within --exec-timeout {}",
                    out.len(),
                    batch.len(),
                    humantime::format_duration(self.timeout)
                );
            };
            let read = read.context("reading CMD's output")?;
            if read == 0 || line.last() != Some(&b'\n') {
                bail!(
                    "CMD ended its output after {} of {} lines of a batch ({})",
                    out.len(),
                    batch.len(),
                    self.exit_status().await
                );
            }
            line.pop();
            out.push(line);
        }
        Ok(out)
    }

    async fn writer_error(&mut self) -> String {
        match (&mut self.writer).await {
            Ok(Err(e)) => e.to_string(),
            _ => self.exit_status().await,
        }
    }

    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(Ok(status)) => format!("it exited with {status}"),
            _ => "it is still running".to_string(),
        }
    }

    /// Closes CMD's input and waits a moment for it to end, then kills its
    /// process group.
    async fn stop(mut self) {
        drop(self.lines);
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_ok()
        {
            return;
        }
        process::kill_group(&mut self.child).await;
    }
}
