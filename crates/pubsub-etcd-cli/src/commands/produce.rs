//! `produce`: one message per input line, many in flight, results reported
//! in input order.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pubsub_etcd::{Bytes, Client, Delivery, Record};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cli::{ProduceArgs, ProduceFormat};
use crate::output;

/// Records awaiting their outcome. Bounds memory and the output kept back
/// behind a slow record; the producer's own buffer bounds bytes.
const MAX_IN_FLIGHT: usize = 50_000;
/// Show progress only for inputs that take at least this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);

/// One input line on its way: queued in the producer, or already failed.
enum InFlight {
    Queued(Delivery),
    Failed(String),
}

pub async fn run(client: &Client, args: ProduceArgs) -> anyhow::Result<()> {
    let input: Box<dyn Read + Send> = match &args.file {
        Some(path) => {
            Box::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
        }
        None => Box::new(io::stdin()),
    };
    let producer = client.producer(&args.topic).build().await?;
    let mut lines = spawn_line_reader(input);
    let mut report = Report::new(args.format);
    let mut in_flight: VecDeque<(u64, InFlight)> = VecDeque::new();
    let mut line_number = 0u64;
    let mut input_done = false;
    let mut read_error = None;
    // A failure to write output (a closed pipe, say) stops reading input.
    let mut outcome: anyhow::Result<()> = Ok(());
    loop {
        tokio::select! {
            // Results first, so output keeps up with input.
            biased;
            result = settle_front(&mut in_flight), if !in_flight.is_empty() => {
                let (line, _) = in_flight.pop_front().expect("front was just settled");
                // Flushing when caught up shows results at once to someone
                // typing lines, while bulk input still writes in large blocks.
                let written = report
                    .record(line, result)
                    .and_then(|()| if in_flight.is_empty() { report.flush() } else { Ok(()) });
                if let Err(error) = written {
                    outcome = Err(error);
                    break;
                }
            }
            line = lines.recv(), if !input_done && in_flight.len() < MAX_IN_FLIGHT => match line {
                Some(Ok(line)) => {
                    line_number += 1;
                    let entry = match to_record(line, &args) {
                        Ok(record) => match producer.enqueue(record).await {
                            Ok(delivery) => InFlight::Queued(delivery),
                            Err(error) => InFlight::Failed(error.to_string()),
                        },
                        Err(reason) => InFlight::Failed(reason),
                    };
                    in_flight.push_back((line_number, entry));
                }
                Some(Err(error)) => {
                    read_error = Some(error);
                    input_done = true;
                }
                None => input_done = true,
            },
            else => break,
        }
    }
    // Lets every queued record finish even when output stopped early.
    producer.close().await?;
    outcome?;
    report.finish()?;
    if let Some(error) = read_error {
        return Err(anyhow::Error::new(error).context("cannot read input"));
    }
    if report.failed > 0 {
        anyhow::bail!(
            "{} of {} messages failed",
            report.failed,
            report.failed + report.sent
        );
    }
    Ok(())
}

/// The outcome of the oldest line in flight, without removing it (so that
/// the caller's `select!` can drop this future without losing a result).
async fn settle_front(in_flight: &mut VecDeque<(u64, InFlight)>) -> Result<(u32, u64), String> {
    match in_flight.front_mut() {
        Some((_, InFlight::Queued(delivery))) => delivery.await.map_err(|e| e.to_string()),
        Some((_, InFlight::Failed(reason))) => Err(std::mem::take(reason)),
        None => std::future::pending().await,
    }
}

/// Reads lines on a thread of its own: stdin and files block, and a thread
/// blocked on a terminal must not hold up the runtime's shutdown.
fn spawn_line_reader(input: Box<dyn Read + Send>) -> mpsc::Receiver<io::Result<Vec<u8>>> {
    let (sender, receiver) = mpsc::channel(1024);
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(256 * 1024, input);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    // Only the newline is taken off: values are bytes, and a
                    // trailing '\r' may be part of one.
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if sender.blocking_send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            }
        }
    });
    receiver
}

fn to_record(line: Vec<u8>, args: &ProduceArgs) -> Result<Record, String> {
    let line = Bytes::from(line);
    let mut record = match &args.key_separator {
        Some(separator) => {
            let at = find(&line, separator.as_bytes())
                .ok_or_else(|| format!("no key separator {separator:?} in line"))?;
            Record::new(line.slice(at + separator.len()..)).key(line.slice(..at))
        }
        None => Record::new(line),
    };
    for (name, value) in &args.headers {
        record = record.header(name.clone(), value.clone());
    }
    if let Some(partition) = args.partition {
        record = record.partition(partition);
    }
    Ok(record)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Per-line output, progress and the closing summary.
struct Report {
    format: ProduceFormat,
    out: io::BufWriter<io::Stdout>,
    started: Instant,
    progress: Option<ProgressBar>,
    /// Whether stderr is a terminal, where progress may be drawn.
    terminal: bool,
    sent: u64,
    failed: u64,
}

impl Report {
    fn new(format: ProduceFormat) -> Self {
        Report {
            format,
            out: output::stdout(),
            started: Instant::now(),
            progress: None,
            terminal: io::stderr().is_terminal(),
            sent: 0,
            failed: 0,
        }
    }

    fn record(&mut self, line: u64, result: Result<(u32, u64), String>) -> anyhow::Result<()> {
        match &result {
            Ok(_) => self.sent += 1,
            Err(_) => self.failed += 1,
        }
        match (self.format, result) {
            (ProduceFormat::Json, Ok((partition, offset))) => {
                serde_json::to_writer(
                    &mut self.out,
                    &json!({ "partition": partition, "offset": offset }),
                )?;
                self.out.write_all(b"\n")?;
            }
            (ProduceFormat::Json, Err(error)) => {
                serde_json::to_writer(&mut self.out, &json!({ "error": error }))?;
                self.out.write_all(b"\n")?;
            }
            (ProduceFormat::Text, Ok(_)) => {}
            (ProduceFormat::Text, Err(error)) => {
                let message = format!("error: line {line}: {error}");
                match &self.progress {
                    Some(progress) => progress.suspend(|| eprintln!("{message}")),
                    None => eprintln!("{message}"),
                }
            }
        }
        self.update_progress();
        Ok(())
    }

    fn update_progress(&mut self) {
        if self.progress.is_none() && self.terminal && self.started.elapsed() >= PROGRESS_AFTER {
            let progress = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                .with_elapsed(self.started.elapsed());
            progress.set_style(
                ProgressStyle::with_template("{spinner} {human_pos} sent {msg} [{elapsed}]")
                    .expect("the progress template is valid"),
            );
            progress.enable_steady_tick(Duration::from_millis(200));
            self.progress = Some(progress);
        }
        if let Some(progress) = &self.progress {
            progress.set_position(self.sent);
            if self.failed > 0 {
                progress.set_message(format!("{} failed", self.failed));
            }
        }
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(progress) = self.progress.take() {
            progress.finish_and_clear();
        }
        // Before the summary: a closed pipe ends quietly, without one.
        self.out.flush()?;
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            self.sent as f64 / seconds
        } else {
            0.0
        };
        eprintln!(
            "sent {}, failed {} in {:.2}s ({:.0} messages/s)",
            self.sent, self.failed, seconds, rate
        );
        Ok(())
    }
}

impl Drop for Report {
    // Also on early exits, so no half-drawn spinner is left on the terminal.
    fn drop(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separators() {
        assert_eq!(find(b"k::v::w", b"::"), Some(1));
        assert_eq!(find(b"kv", b"::"), None);
        assert_eq!(find(b"", b":"), None);
    }
}
