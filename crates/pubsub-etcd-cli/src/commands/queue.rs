//! `queue consume | describe | reset | delete | list`.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use pubsub_etcd::{Client, Job, QueueReset};
use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use super::process;
use crate::cli::{Format, QueueCommand};
use crate::output::{self, Table};

pub async fn run(client: &Client, command: QueueCommand) -> anyhow::Result<()> {
    match command {
        QueueCommand::Consume {
            topic,
            name,
            exec,
            exec_timeout,
            max,
            ack_wait,
            max_deliveries,
            dead_letter,
            nack_delay,
            format,
        } => {
            let mut builder = client
                .queue(&topic, &name)
                .ack_wait(ack_wait)
                .max_deliveries(max_deliveries);
            if let Some(dlq) = dead_letter {
                builder = builder.dead_letter(dlq);
            }
            let mut queue = builder.join().await?;
            let exec = exec.map(|command| Exec {
                command,
                timeout: exec_timeout,
                heartbeat: (ack_wait / 3).max(Duration::from_millis(1)),
            });
            let result = consume(&mut queue, exec.as_ref(), max, nack_delay, format.format).await;
            queue.close().await;
            result
        }
        QueueCommand::Describe {
            topic,
            name,
            format,
        } => {
            let stats = client.queue_stats(&topic, &name).await?;
            let age_ms = stats.oldest_unsettled_ms.map(|t| (now_ms() - t).max(0));
            match format.format {
                Format::Json => output::print_json(&StatsJson {
                    topic: &topic,
                    queue: &name,
                    workers: stats.workers,
                    pending: stats.pending,
                    in_flight: stats.in_flight,
                    redelivered: stats.redelivered,
                    expired: stats.expired,
                    dead_lettered: stats.dead_lettered,
                    terminated: stats.terminated,
                    oldest_unsettled_age_ms: age_ms,
                }),
                Format::Table => {
                    let mut table = Table::new([
                        "WORKERS",
                        "PENDING",
                        "IN FLIGHT",
                        "REDELIVERED",
                        "EXPIRED",
                        "DEAD LETTERED",
                        "TERMINATED",
                        "OLDEST UNSETTLED",
                    ]);
                    table.row([
                        stats.workers.to_string(),
                        stats.pending.to_string(),
                        stats.in_flight.to_string(),
                        stats.redelivered.to_string(),
                        stats.expired.to_string(),
                        stats.dead_lettered.to_string(),
                        stats.terminated.to_string(),
                        output::or_dash(age_ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0))),
                    ]);
                    table.print()
                }
            }
        }
        QueueCommand::Reset {
            topic,
            name,
            to_latest,
        } => {
            let to = if to_latest {
                QueueReset::Latest
            } else {
                QueueReset::Earliest
            };
            client.reset_queue(&topic, &name, to).await?;
            Ok(())
        }
        QueueCommand::Delete { topic, name } => {
            client.delete_queue(&topic, &name).await?;
            Ok(())
        }
        QueueCommand::List { topic, format } => {
            let queues = client.list_queues(&topic).await?;
            match format.format {
                Format::Json => output::print_json(&queues),
                Format::Table => {
                    let mut table = Table::new(["QUEUE"]);
                    for queue in queues {
                        table.row([queue]);
                    }
                    table.print()
                }
            }
        }
    }
}

/// How `queue consume --exec` runs its command.
struct Exec {
    command: String,
    timeout: Duration,
    /// How often the lease of a running job is extended.
    heartbeat: Duration,
}

/// How one run of the command ended.
enum Outcome {
    Succeeded,
    Failed(String),
    /// Ctrl-C or SIGTERM came first.
    Stopped,
}

/// Prints (or runs `exec` on) each job and settles it, until `max` are
/// settled, the queue ends, or Ctrl-C or SIGTERM. A failed ack stops with
/// its error: the job comes back after ack_wait. A command cut short by a
/// signal is killed and its job nacked at once, so another worker takes it.
async fn consume(
    queue: &mut pubsub_etcd::QueueConsumer,
    exec: Option<&Exec>,
    max: Option<u64>,
    nack_delay: Duration,
    format: Format,
) -> anyhow::Result<()> {
    let shutdown = process::shutdown()?;
    tokio::pin!(shutdown);
    let mut settled = 0u64;
    while max.is_none_or(|max| settled < max) {
        let job = tokio::select! {
            job = queue.recv() => job,
            () = &mut shutdown => break,
        };
        let Some(job) = job else {
            break;
        };
        let mut job = job?;
        match exec {
            Some(exec) => match run_exec(exec, &mut job, &mut shutdown).await? {
                Outcome::Succeeded => job.ack().await?,
                Outcome::Failed(reason) => job.nack_with_reason(nack_delay, &reason).await?,
                Outcome::Stopped => {
                    job.nack_with_reason(Duration::ZERO, "the worker was stopped")
                        .await?;
                    break;
                }
            },
            None => {
                print_job(&job, format)?;
                job.ack().await?;
            }
        }
        settled += 1;
    }
    Ok(())
}

fn print_job(job: &Job, format: Format) -> anyhow::Result<()> {
    let m = &job.message;
    let mut out = output::stdout();
    match format {
        Format::Json => {
            let json = JobJson {
                topic: &m.topic,
                partition: m.partition,
                offset: m.offset,
                timestamp_ms: m.timestamp,
                delivery_count: job.delivery_count,
                key: m.key.as_ref().map(|k| String::from_utf8_lossy(k)),
                value: String::from_utf8_lossy(&m.value),
            };
            serde_json::to_writer(&mut out, &json)?;
            out.write_all(b"\n")?;
        }
        Format::Table => {
            out.write_all(&m.value)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Runs the command with `sh -c`, the message value on its stdin,
/// extending the job's lease while it runs.
async fn run_exec(
    exec: &Exec,
    job: &mut Job,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> anyhow::Result<Outcome> {
    let m = &job.message;
    let mut child = process::shell(&exec.command)
        .env("PUBSUB_TOPIC", &*m.topic)
        .env("PUBSUB_PARTITION", m.partition.to_string())
        .env("PUBSUB_OFFSET", m.offset.to_string())
        .env("PUBSUB_DELIVERY", job.delivery_count.to_string())
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?}", exec.command))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input closes the pipe early:
        // not an error.
        let _ = stdin.write_all(&m.value).await;
    }
    let deadline = tokio::time::Instant::now() + exec.timeout;
    let mut heartbeat = tokio::time::interval(exec.heartbeat);
    heartbeat.tick().await;
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok(if status.success() {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed(format!("{} failed: {status}", exec.command))
                });
            }
            _ = heartbeat.tick() => {
                // A lost extension is not fatal: at worst the job is
                // delivered again, as at-least-once allows.
                if let Err(error) = job.in_progress().await {
                    tracing::warn!(%error, "extending a running job's lease failed");
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                process::kill_group(&mut child).await;
                return Ok(Outcome::Failed(format!(
                    "{} ran longer than --exec-timeout {}",
                    exec.command,
                    humantime::format_duration(exec.timeout)
                )));
            }
            () = &mut *shutdown => {
                process::kill_group(&mut child).await;
                return Ok(Outcome::Stopped);
            }
        }
    }
}

/// `queue describe` in JSON: the library's counters, and the age of the
/// oldest unsettled message in place of its timestamp (the age is what a
/// probe compares).
#[derive(Serialize)]
struct StatsJson<'a> {
    topic: &'a str,
    queue: &'a str,
    workers: u64,
    pending: u64,
    in_flight: u64,
    redelivered: u64,
    expired: u64,
    dead_lettered: u64,
    terminated: u64,
    oldest_unsettled_age_ms: Option<i64>,
}

/// One delivered job in JSON; key and value as text, invalid UTF-8
/// replaced.
#[derive(Serialize)]
struct JobJson<'a> {
    topic: &'a str,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    delivery_count: u32,
    key: Option<std::borrow::Cow<'a, str>>,
    value: std::borrow::Cow<'a, str>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
