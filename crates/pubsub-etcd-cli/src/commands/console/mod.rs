//! `console`: a read-only web console over the state already in etcd
//! (members, topics, partitions, groups, lag), served by the CLI binary
//! itself with its assets embedded. Reads are cached for one second and
//! shared by every open page, so the console's etcd load does not grow with
//! the number of viewers. Writes are off unless `--allow-writes`, and then
//! need the `--auth-token` and a JSON body from the console's own origin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pubsub_etcd::{Client, Record};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::group::group_lags;
use super::topic::{describe_json, Stored};
use crate::cli::{ConsoleArgs, HealthLimits};

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");

/// How long a read of etcd is reused for every page.
const CACHE_FOR: Duration = Duration::from_secs(1);

struct Console {
    client: Client,
    allow_writes: bool,
    token: Option<String>,
    limits: HealthLimits,
    overview: Mutex<Option<(Instant, Value)>>,
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
        .route("/api/overview", get(overview))
        .route("/api/topics/{name}", get(topic))
        .route("/api/groups/{name}", get(group))
        .route("/api/topics/{name}/messages", post(produce))
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
        let status = match error {
            pubsub_etcd::Error::TopicNotFound(_) | pubsub_etcd::Error::GroupNotFound(_) => {
                StatusCode::NOT_FOUND
            }
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

async fn overview(State(console): State<Arc<Console>>) -> Result<Json<Value>, ApiError> {
    // Held across the read, so pages asking at once share one read of etcd.
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

async fn topic(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let client = &console.client;
    let description = client.describe_topic(&name).await?;
    let stored = Stored::of(client, &description).await?;
    Ok(Json(describe_json(&description, &stored)))
}

async fn group(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let lags = group_lags(&console.client, &name, None).await?;
    Ok(Json(json!({ "group": name, "partitions": lags })))
}

/// The body of a produce: a text value, an optional key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Produce {
    value: String,
    key: Option<String>,
}

async fn produce(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &headers)?;
    let request: Produce = serde_json::from_str(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad produce body: {e}")))?;
    let producer = console.client.producer(&name).build().await?;
    let mut record = Record::new(request.value);
    if let Some(key) = request.key {
        record = record.key(key);
    }
    let sent = producer.send(record).await;
    producer.close().await?;
    let sent = sent.map_err(pubsub_etcd::Error::from)?;
    let (partition, offset) = (sent.partition, sent.offset);
    Ok(Json(
        json!({ "topic": name, "partition": partition, "offset": offset }),
    ))
}

/// A write needs `--allow-writes`, the token as `Authorization: Bearer`, a
/// JSON content type (which a cross-site form cannot send without a CORS
/// preflight this server never grants) and, when the browser names one, an
/// Origin that is this server.
fn authorize_write(console: &Console, headers: &HeaderMap) -> Result<(), ApiError> {
    if !console.allow_writes {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "the console is read-only; start it with --allow-writes".into(),
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_none() || given != console.token.as_deref() {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token".into(),
        ));
    }
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "writes take an application/json body".into(),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin = origin.to_str().ok();
        let same = match (origin, host) {
            (Some(origin), Some(host)) => origin.strip_prefix("http://") == Some(host),
            _ => false,
        };
        if !same {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "cross-origin write refused".into(),
            ));
        }
    }
    Ok(())
}
