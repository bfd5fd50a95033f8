//! The console's message view (a page of one partition from an offset) and
//! live tail (server-sent events of a topic's new messages). Both send each
//! message as `consume --format json` prints it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures::Stream;
use pubsub_etcd::{AssignedReader, Message, StartOffset};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::OwnedSemaphorePermit;

use super::{ApiError, Console};
use crate::commands::consume::JsonMessage;

/// Messages a page shows unless asked for another number.
const DEFAULT_PAGE: usize = 20;
/// Most messages one page returns.
const MAX_PAGE: usize = 100;
/// A page stops before the message that would take its keys, values and
/// headers past this (it always holds one), so a page of large messages
/// stays a few MiB.
const MAX_PAGE_BYTES: usize = 4 << 20;

/// Most live tails open at once; each follows its partitions with a watch.
pub(super) const MAX_TAILS: usize = 16;
/// How often an idle tail sends a comment. A closed page is noticed at the
/// next write, so this also bounds how long its reader outlives it.
const KEEP_ALIVE: Duration = Duration::from_secs(3);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Page {
    from: Option<u64>,
    limit: Option<usize>,
}

/// `GET /api/topics/{name}/partitions/{partition}/messages?from=&limit=`:
/// the stored messages from `from` (default 0, so the earliest), and
/// `next_offset`, where the next page starts.
pub(super) async fn browse(
    State(console): State<Arc<Console>>,
    Path((name, partition)): Path<(String, u32)>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let fetched = console
        .client
        .fetch(&name, partition, page.from.unwrap_or(0), limit)
        .await?;
    let mut next_offset = fetched.next_offset;
    let mut bytes = 0;
    let mut messages = Vec::with_capacity(fetched.messages.len());
    for message in &fetched.messages {
        let size = message_bytes(message);
        if !messages.is_empty() && bytes + size > MAX_PAGE_BYTES {
            next_offset = message.offset;
            break;
        }
        bytes += size;
        messages.push(JsonMessage::new(message));
    }
    Ok(Json(json!({
        "topic": name,
        "partition": partition,
        "messages": messages,
        "next_offset": next_offset,
    })))
}

fn message_bytes(message: &Message) -> usize {
    let headers: usize = message
        .headers
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    message.key.as_ref().map_or(0, |key| key.len()) + message.value.len() + headers
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TailFilter {
    partition: Option<u32>,
    /// Only messages whose key (as text) contains this.
    key: Option<String>,
}

/// What a tail's event stream holds between events: dropping it (the page
/// closed) stops the reader and frees the tail's place.
struct Tail {
    reader: AssignedReader,
    key: Option<String>,
    _permit: OwnedSemaphorePermit,
}

/// `GET /api/topics/{name}/tail?partition=&key=`: server-sent events, one
/// `message` event per message produced from now on, and a `problem` event
/// (`{"error": ...}`) for a message that could not be read; the stream ends
/// after the problem of the topic being deleted.
pub(super) async fn tail(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    Query(filter): Query<TailFilter>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = console.tails.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_TAILS} live tails are open already; close one"),
        )
    })?;
    let info = console.client.topic(&name).await?;
    let partitions: Vec<u32> = match filter.partition {
        Some(partition) => vec![partition],
        None => (0..info.partitions).collect(),
    };
    let reader = console
        .client
        .assign(
            &name,
            partitions.into_iter().map(|p| (p, StartOffset::Latest)),
        )
        .await?;
    let tail = Tail {
        reader,
        key: filter.key.filter(|key| !key.is_empty()),
        _permit: permit,
    };
    let events = futures::stream::unfold(Some(tail), |tail| async move {
        let mut tail = tail?;
        loop {
            let (event, ended) = match tail.reader.recv().await? {
                Ok(message) if !tail.wants(&message) => continue,
                Ok(message) => (json_event("message", &JsonMessage::new(&message)), false),
                Err(error) => {
                    let ended = matches!(error, pubsub_etcd::Error::TopicDeleted(_));
                    let problem = json!({ "error": error.to_string() });
                    (json_event("problem", &problem), ended)
                }
            };
            return Some((Ok(event), (!ended).then_some(tail)));
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

impl Tail {
    fn wants(&self, message: &Message) -> bool {
        match (&self.key, &message.key) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(wanted), Some(key)) => String::from_utf8_lossy(key).contains(wanted.as_str()),
        }
    }
}

fn json_event(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|error| Event::default().event("problem").data(error.to_string()))
}
