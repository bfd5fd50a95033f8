//! `console`: a web console over the state already in etcd (members,
//! topics, partitions, groups, lag, messages), served by the CLI binary
//! itself with its assets embedded.
//!
//! Its etcd load is bounded whatever the number of viewers: the overview,
//! each topic and each group are read at most once per [`CACHE_FOR`] and the
//! read is shared by every open page; a live tail is one reader per open
//! page, at most [`messages::MAX_TAILS`] at once. Writes are off unless
//! `--allow-writes`, and then pass [`writes`]'s guard.

mod messages;
mod writes;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use pubsub_etcd::Client;
use serde_json::{json, Value};
use tokio::sync::{Mutex, Semaphore};

use super::group::group_lags;
use super::topic::{describe_json, Stored};
use crate::cli::{ConsoleArgs, HealthLimits};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");

/// How long a read of etcd is reused for every page.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// Most topics, and most groups, whose last read is kept; past it the
/// stalest is dropped, so browsing many names cannot grow memory.
const MAX_VIEWS: usize = 256;

/// How far back a group's lag chart goes.
const LAG_HISTORY: Duration = Duration::from_secs(10 * 60);

struct Console {
    client: Client,
    allow_writes: bool,
    token: Option<String>,
    limits: HealthLimits,
    // Each lock is held across its read of etcd, so pages asking at once
    // share that one read.
    overview: Mutex<Option<(Instant, Value)>>,
    topics: Mutex<HashMap<String, TopicView>>,
    groups: Mutex<HashMap<String, GroupView>>,
    tails: Arc<Semaphore>,
}

/// A topic's last read, and each partition's next offset then, from which
/// the next read computes the write rate.
struct TopicView {
    at: Instant,
    value: Value,
    nexts: Vec<u64>,
}

/// A group's last read and its total lag at each read in the last
/// [`LAG_HISTORY`] (at most one per [`CACHE_FOR`]), in Unix milliseconds.
struct GroupView {
    at: Instant,
    value: Value,
    history: VecDeque<(i64, u64)>,
}

pub async fn run(client: &Client, args: ConsoleArgs) -> anyhow::Result<()> {
    if args.allow_writes && args.auth_token.is_none() {
        anyhow::bail!("--allow-writes needs --auth-token (or PUBSUB_ETCD_CONSOLE_TOKEN)");
    }
    let state = Arc::new(Console {
        client: client.clone(),
        allow_writes: args.allow_writes,
        token: args.auth_token,
        limits: args.limits,
        overview: Mutex::new(None),
        topics: Mutex::new(HashMap::new()),
        groups: Mutex::new(HashMap::new()),
        tails: Arc::new(Semaphore::new(messages::MAX_TAILS)),
    });
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("console on http://{}", listener.local_addr()?);
    let shutdown = super::consume::shutdown_signal()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("console server failed")
}

fn router(state: Arc<Console>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], APP_JS) }),
        )
        .route("/api/console", get(about))
        .route("/api/overview", get(overview))
        .route("/api/topics", post(writes::create_topic))
        .route(
            "/api/topics/{name}",
            get(topic).delete(writes::delete_topic),
        )
        .route("/api/groups/{name}", get(group))
        .route(
            "/api/groups/{name}/reset-offsets",
            post(writes::reset_offsets),
        )
        .route(
            "/api/topics/{name}/partitions/{partition}/messages",
            get(messages::browse),
        )
        .route(
            "/api/topics/{name}/partitions/{partition}/messages/{offset}",
            delete(writes::delete_message),
        )
        .route("/api/topics/{name}/tail", get(messages::tail))
        .route("/api/topics/{name}/messages", post(writes::produce))
        .with_state(state)
}

/// An error as the API answers it: a status and `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<pubsub_etcd::Error> for ApiError {
    fn from(error: pubsub_etcd::Error) -> Self {
        use pubsub_etcd::Error::*;
        let status = match error {
            TopicNotFound(_) | GroupNotFound(_) | PartitionOutOfRange { .. } => {
                StatusCode::NOT_FOUND
            }
            InvalidTopicName { .. }
            | InvalidGroupName { .. }
            | InvalidPartitionCount { .. }
            | InvalidConfig(_)
            | MessageTooLarge { .. } => StatusCode::BAD_REQUEST,
            TopicExists(_) | GroupActive { .. } | CommitBehind { .. } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError(status, error.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        match error.downcast::<pubsub_etcd::Error>() {
            Ok(error) => error.into(),
            Err(error) => ApiError(StatusCode::BAD_GATEWAY, format!("{error:#}")),
        }
    }
}

/// What the page needs to know of the console itself.
async fn about(State(console): State<Arc<Console>>) -> Json<Value> {
    Json(json!({ "allow_writes": console.allow_writes }))
}

async fn overview(State(console): State<Arc<Console>>) -> Result<Json<Value>, ApiError> {
    let mut cached = console.overview.lock().await;
    if let Some((at, value)) = cached.as_ref() {
        if at.elapsed() < CACHE_FOR {
            return Ok(Json(value.clone()));
        }
    }
    let (value, _problems) = super::status::report(&console.client, console.limits).await?;
    *cached = Some((Instant::now(), value.clone()));
    Ok(Json(value))
}

/// `topic describe`'s JSON, each partition with its `write_rate`: messages
/// per second since the previous read (null on the first).
async fn topic(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut views = console.topics.lock().await;
    let previous = views.get(&name);
    if let Some(view) = previous.filter(|view| view.at.elapsed() < CACHE_FOR) {
        return Ok(Json(view.value.clone()));
    }
    let client = &console.client;
    let description = client.describe_topic(&name).await?;
    let stored = Stored::of(client, &description).await?;
    let now = Instant::now();
    let nexts: Vec<u64> = description.partitions.iter().map(|p| p.next).collect();
    // A topic deleted and created again with other partitions has no rate yet.
    let previous = previous.filter(|view| view.nexts.len() == nexts.len());
    let mut value = describe_json(&description, &stored);
    if let Some(Value::Array(partitions)) = value.get_mut("partitions") {
        for (i, partition) in partitions.iter_mut().enumerate() {
            let rate = previous.map(|view| {
                nexts[i].saturating_sub(view.nexts[i]) as f64
                    / now.duration_since(view.at).as_secs_f64()
            });
            partition["write_rate"] = json!(rate);
        }
    }
    make_room(&mut views, &name, |view| view.at);
    views.insert(
        name,
        TopicView {
            at: now,
            value: value.clone(),
            nexts,
        },
    );
    Ok(Json(value))
}

/// Lag per partition (`group describe`'s JSON), the members with the
/// partitions each owns, the total lag and its `history` for the chart.
async fn group(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut views = console.groups.lock().await;
    if let Some(view) = views.get(&name).filter(|v| v.at.elapsed() < CACHE_FOR) {
        return Ok(Json(view.value.clone()));
    }
    let lags = group_lags(&console.client, &name, None).await?;
    let total: u64 = lags.iter().map(|lag| lag.lag).sum();
    let mut members: std::collections::BTreeMap<&str, Vec<Value>> = Default::default();
    for lag in &lags {
        if let Some(owner) = &lag.owner {
            members
                .entry(owner)
                .or_default()
                .push(json!({ "topic": lag.topic, "partition": lag.partition }));
        }
    }
    let members: Vec<Value> = members
        .into_iter()
        .map(|(member, owned)| json!({ "member": member, "partitions": owned }))
        .collect();
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let mut history = match views.remove(&name) {
        Some(view) => view.history,
        None => VecDeque::new(),
    };
    let oldest = now_ms - LAG_HISTORY.as_millis() as i64;
    while history.front().is_some_and(|&(at, _)| at < oldest) {
        history.pop_front();
    }
    history.push_back((now_ms, total));
    let chart: Vec<Value> = history
        .iter()
        .map(|&(at_ms, lag)| json!({ "at_ms": at_ms, "lag": lag }))
        .collect();
    let value = json!({
        "group": name,
        "partitions": lags,
        "members": members,
        "lag": total,
        "history": chart,
    });
    make_room(&mut views, &name, |view| view.at);
    views.insert(
        name,
        GroupView {
            at: Instant::now(),
            value: value.clone(),
            history,
        },
    );
    Ok(Json(value))
}

/// Drops the stalest view when `name` would be one too many.
fn make_room<T>(views: &mut HashMap<String, T>, name: &str, at: impl Fn(&T) -> Instant) {
    if views.len() < MAX_VIEWS || views.contains_key(name) {
        return;
    }
    let stalest = views
        .iter()
        .min_by_key(|(_, view)| at(view))
        .map(|(name, _)| name.clone());
    if let Some(stalest) = stalest {
        views.remove(&stalest);
    }
}
