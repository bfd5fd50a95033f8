//! `produce`: one message per input line, many in flight, results reported
//! in input order.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use pubsub_etcd::{
    Bytes, Client, Delivery, Error, Record, RecordMetadata, DEFAULT_MAX_BATCH_BYTES,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::cli::{ProduceArgs, ProduceFormat};
use crate::output;

/// Records awaiting their outcome. Bounds memory and the output kept back
/// behind a slow record; the producer's own buffer bounds bytes.
const MAX_IN_FLIGHT: usize = 50_000;
/// Show progress only for inputs that take at least this long.
const PROGRESS_AFTER: Duration = Duration::from_secs(1);
/// Failed lines reported one by one on stderr; later failures are only
/// counted, so a run against a full etcd does not print a line per message.
const ERRORS_SHOWN: u64 = 10;
/// Input handed from the reading thread in chunks of about this many bytes;
/// with [`CHUNKS_QUEUED`] it bounds the input read ahead.
const CHUNK_BYTES: usize = 256 * 1024;
const CHUNK_LINES: usize = 1024;
const CHUNKS_QUEUED: usize = 8;

/// Why one input line was not sent.
struct Failure {
    message: String,
    /// The topic is gone: every later line would fail the same way.
    fatal: bool,
}

impl From<pubsub_etcd::SendError> for Failure {
    fn from(failed: pubsub_etcd::SendError) -> Self {
        failed.error.into()
    }
}

impl From<pubsub_etcd::Error> for Failure {
    fn from(error: pubsub_etcd::Error) -> Self {
        let fatal = matches!(error, Error::TopicDeleted(_) | Error::TopicNotFound(_));
        Failure {
            message: error.to_string(),
            fatal,
        }
    }
}

/// One input line on its way: queued in the producer, or already failed.
enum InFlight {
    Queued(Delivery),
    Failed(Failure),
}

/// One line of input as the reading thread saw it.
enum Line {
    Data(Vec<u8>),
    /// Longer than any message may be; its bytes were skipped, not kept.
    TooLong(u64),
}

pub async fn run(
    client: &Client,
    args: ProduceArgs,
    request_timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let input: Box<dyn Read + Send> = match &args.file {
        Some(path) => {
            Box::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?)
        }
        None => Box::new(io::stdin()),
    };
    let mut builder = client.producer(&args.topic);
    if let Some(timeout) = args.delivery_timeout.or(request_timeout) {
        builder = builder.delivery_timeout(timeout);
    }
    if let Some(compression) = args.compression {
        builder = builder.compression(compression);
    }
    let producer = builder.build().await?;
    let topic = client.topic(&args.topic).await?;
    let limit = topic
        .config
        .max_message_bytes
        .map_or(DEFAULT_MAX_BATCH_BYTES, |bytes| bytes as usize)
        + args.key_separator.as_ref().map_or(0, String::len);
    let mut lines = spawn_line_reader(input, limit, args.delimiter, args.whole_file);
    let mut report = Report::new(args.format);
    let mut in_flight: VecDeque<(u64, InFlight)> = VecDeque::new();
    let mut line_number = 0u64;
    let mut input_done = false;
    let mut read_error = None;
    let mut fatal = None;
    // A failure to write output (a closed pipe, say) stops reading input.
    let mut outcome: anyhow::Result<()> = Ok(());
    loop {
        tokio::select! {
            // Results first, so output keeps up with input.
            biased;
            result = settle_front(&mut in_flight), if !in_flight.is_empty() => {
                let (line, _) = in_flight.pop_front().expect("front was just settled");
                let result = match result {
                    Err(failure) if failure.fatal => {
                        fatal = Some((line, failure.message));
                        break;
                    }
                    other => other
                        .map(|sent| (sent.partition, sent.offset))
                        .map_err(|failure| failure.message),
                };
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
            chunk = lines.recv(), if !input_done && in_flight.len() < MAX_IN_FLIGHT => match chunk {
                Some(Ok(chunk)) => {
                    for line in chunk {
                        line_number += 1;
                        let entry = match line {
                            Line::Data(line) => match to_record(line, &args) {
                                Ok(record) => match producer.enqueue(record).await {
                                    Ok(delivery) => InFlight::Queued(delivery),
                                    Err(error) => InFlight::Failed(error.into()),
                                },
                                Err(message) => InFlight::Failed(Failure { message, fatal: false }),
                            },
                            Line::TooLong(bytes) => InFlight::Failed(Failure {
                                message: format!(
                                    "line of {bytes} bytes exceeds the limit of {limit} bytes"
                                ),
                                fatal: false,
                            }),
                        };
                        in_flight.push_back((line_number, entry));
                    }
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
    // Stops the reading thread at its next chunk.
    drop(lines);
    // Lets every queued record finish even when output stopped early.
    producer.close().await?;
    if let Some((line, message)) = fatal {
        report.finish()?;
        anyhow::bail!(
            "line {line}: {message}; stopped reading input ({} later lines read were not sent)",
            in_flight.len()
        );
    }
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
async fn settle_front(
    in_flight: &mut VecDeque<(u64, InFlight)>,
) -> Result<RecordMetadata, Failure> {
    match in_flight.front_mut() {
        Some((_, InFlight::Queued(delivery))) => delivery.await.map_err(Failure::from),
        Some((_, InFlight::Failed(failure))) => Err(Failure {
            message: std::mem::take(&mut failure.message),
            fatal: failure.fatal,
        }),
        None => std::future::pending().await,
    }
}

/// Reads lines on a thread of its own: stdin and files block, and a thread
/// blocked on a terminal must not hold up the runtime's shutdown. A line
/// longer than `limit` is skipped as it is read, never held whole, so a
/// huge line costs no more memory than a short one.
fn spawn_line_reader(
    input: Box<dyn Read + Send>,
    limit: usize,
    delimiter: u8,
    whole: bool,
) -> mpsc::Receiver<io::Result<Vec<Line>>> {
    let (sender, receiver) = mpsc::channel(CHUNKS_QUEUED);
    std::thread::spawn(move || {
        let mut reader = BufReader::with_capacity(256 * 1024, input);
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        loop {
            let read = if whole {
                read_whole(&mut reader, limit)
            } else {
                read_line(&mut reader, limit, delimiter)
            };
            let line = match read {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(error) => {
                    if !chunk.is_empty() && sender.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            };
            chunk_bytes += match &line {
                Line::Data(bytes) => bytes.len(),
                Line::TooLong(_) => 0,
            };
            chunk.push(line);
            // An empty read buffer means the next line needs another read,
            // which may block (someone typing): hand over what is here.
            if chunk_bytes >= CHUNK_BYTES
                || chunk.len() >= CHUNK_LINES
                || reader.buffer().is_empty()
            {
                if sender
                    .blocking_send(Ok(std::mem::take(&mut chunk)))
                    .is_err()
                {
                    return;
                }
                chunk_bytes = 0;
            }
        }
        if !chunk.is_empty() {
            let _ = sender.blocking_send(Ok(chunk));
        }
    });
    receiver
}

/// The whole input as one message (at most `limit` bytes kept), then
/// `None`.
fn read_whole(reader: &mut impl BufRead, limit: usize) -> io::Result<Option<Line>> {
    // An empty input sends nothing, as in line mode.
    let mut content = Vec::new();
    let kept = reader.take(limit as u64 + 1).read_to_end(&mut content)?;
    if kept == 0 && reader.fill_buf()?.is_empty() {
        return Ok(None);
    }
    if kept > limit {
        let rest = io::copy(reader, &mut io::sink())?;
        return Ok(Some(Line::TooLong(kept as u64 + rest)));
    }
    Ok(Some(Line::Data(content)))
}

/// The next line without its delimiter (values are bytes: before a `\n`, a
/// `\r` may be part of one), or `None` at the end of the input.
fn read_line(reader: &mut impl BufRead, limit: usize, delimiter: u8) -> io::Result<Option<Line>> {
    let mut line = Vec::new();
    let mut too_long: Option<u64> = None;
    loop {
        let buffer = match reader.fill_buf() {
            Ok(buffer) => buffer,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if buffer.is_empty() {
            return Ok(match too_long {
                Some(bytes) => Some(Line::TooLong(bytes)),
                None if line.is_empty() => None,
                None => Some(Line::Data(line)),
            });
        }
        let (taken, end_of_line) = match memchr::memchr(delimiter, buffer) {
            Some(at) => (at, true),
            None => (buffer.len(), false),
        };
        match &mut too_long {
            Some(bytes) => *bytes += taken as u64,
            None if line.len() + taken > limit => {
                too_long = Some((line.len() + taken) as u64);
                line = Vec::new();
            }
            None => line.extend_from_slice(&buffer[..taken]),
        }
        reader.consume(taken + usize::from(end_of_line));
        if end_of_line {
            return Ok(Some(match too_long {
                Some(bytes) => Line::TooLong(bytes),
                None => Line::Data(line),
            }));
        }
    }
}

fn to_record(line: Vec<u8>, args: &ProduceArgs) -> Result<Record, String> {
    let mut line = Bytes::from(line);
    let mut line_headers = Vec::new();
    if args.parse_headers {
        let at = memchr::memchr(b'\t', &line).ok_or("no tab after the line's headers")?;
        line_headers = parse_line_headers(&line[..at])?;
        line = line.slice(at + 1..);
    }
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
    for (name, value) in line_headers {
        record = record.header(name, value);
    }
    if let Some(partition) = args.partition {
        record = record.partition(partition);
    }
    if let Some(ttl) = args.ttl {
        record = record.ttl(ttl);
    }
    if let Some(timestamp) = args.timestamp {
        record = record.timestamp(timestamp);
    }
    Ok(record)
}

/// `name:value,name:value` (empty for none) at the start of a line.
fn parse_line_headers(text: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(|b| *b == b',')
        .map(|pair| {
            let at = memchr::memchr(b':', pair)
                .ok_or_else(|| format!("header {:?} has no ':'", String::from_utf8_lossy(pair)))?;
            let name = std::str::from_utf8(&pair[..at])
                .map_err(|_| "a header name is not UTF-8".to_string())?;
            if name.is_empty() {
                return Err("a header name is empty".to_string());
            }
            Ok((name.to_string(), pair[at + 1..].to_vec()))
        })
        .collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// A stored line in `--format json`: where it went.
#[derive(Serialize)]
struct Stored {
    partition: u32,
    offset: u64,
}

/// A failed line in `--format json`: its number and why.
#[derive(Serialize)]
struct Failed {
    line: u64,
    error: String,
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
                serde_json::to_writer(&mut self.out, &Stored { partition, offset })?;
                self.out.write_all(b"\n")?;
            }
            (ProduceFormat::Json, Err(error)) => {
                serde_json::to_writer(&mut self.out, &Failed { line, error })?;
                self.out.write_all(b"\n")?;
            }
            (ProduceFormat::Text, Ok(_)) => {}
            (ProduceFormat::Text, Err(error)) => {
                let message = match self.failed {
                    ..ERRORS_SHOWN => Some(format!("error: line {line}: {error}")),
                    ERRORS_SHOWN => Some(format!(
                        "error: line {line}: {error}\n(further failed lines are counted, not shown)"
                    )),
                    _ => None,
                };
                if let Some(message) = message {
                    match &self.progress {
                        Some(progress) => progress.suspend(|| eprintln!("{message}")),
                        None => eprintln!("{message}"),
                    }
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

    fn lines(input: &[u8], limit: usize) -> Vec<String> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        while let Some(line) = read_line(&mut reader, limit, b'\n').unwrap() {
            out.push(match line {
                Line::Data(bytes) => String::from_utf8(bytes).unwrap(),
                Line::TooLong(bytes) => format!("<{bytes}>"),
            });
        }
        out
    }

    #[test]
    fn long_lines_are_skipped_not_kept() {
        assert_eq!(lines(b"ab\n\ncdefghij\nxyz", 5), ["ab", "", "<8>", "xyz"]);
        assert_eq!(lines(b"abcdefgh", 5), ["<8>"]);
        assert_eq!(lines(b"abcde\n", 5), ["abcde"]);
        assert_eq!(lines(b"", 5), Vec::<String>::new());
        assert_eq!(lines(b"a\r\n", 5), ["a\r"]);
    }

    #[test]
    fn whole_input_is_one_message() {
        let whole = |input: &[u8]| {
            let mut reader = BufReader::with_capacity(4, input);
            let first = read_whole(&mut reader, 8).unwrap();
            let again = read_whole(&mut reader, 8).unwrap();
            assert!(again.is_none());
            match first {
                Some(Line::Data(bytes)) => String::from_utf8(bytes).unwrap(),
                Some(Line::TooLong(bytes)) => format!("<{bytes}>"),
                None => "none".to_string(),
            }
        };
        assert_eq!(whole(b"a\nb\n"), "a\nb\n");
        assert_eq!(whole(b"0123456789"), "<10>");
        assert_eq!(whole(b""), "none");
    }

    #[test]
    fn headers_at_the_start_of_a_line() {
        assert_eq!(
            parse_line_headers(b"a:1,b:x:y"),
            Ok(vec![
                ("a".to_string(), b"1".to_vec()),
                ("b".to_string(), b"x:y".to_vec())
            ])
        );
        assert_eq!(parse_line_headers(b""), Ok(vec![]));
        assert!(parse_line_headers(b"a").is_err());
        assert!(parse_line_headers(b":v").is_err());
    }

    #[test]
    fn finds_separators() {
        assert_eq!(find(b"k::v::w", b"::"), Some(1));
        assert_eq!(find(b"kv", b"::"), None);
        assert_eq!(find(b"", b":"), None);
    }
}
