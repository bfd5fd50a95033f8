//! The console's write endpoints (produce, delete a message, reset a
//! group's offsets, create and delete a topic) and the guard every one
//! passes before it reads its body.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::Json;
use pubsub_etcd::{CleanupPolicy, NewTopic, Record, StartOffset};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Console};
use crate::cli::TopicPartitions;
use crate::commands::group::{plan_reset, Target};

/// The body of a produce: a text value, an optional key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Produce {
    value: String,
    key: Option<String>,
}

/// `POST /api/topics/{name}/messages`: `{"value", "key"?}`; answers the
/// partition and offset it was stored at.
pub(super) async fn produce(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &Method::POST, &headers)?;
    let request: Produce = parse("produce", &body)?;
    let producer = console.client.producer(&name).build().await?;
    let mut record = Record::new(request.value);
    if let Some(key) = request.key {
        record = record.key(key);
    }
    let sent = producer.send(record).await;
    producer.close().await?;
    let sent = sent.map_err(pubsub_etcd::Error::from)?;
    Ok(Json(
        json!({ "topic": name, "partition": sent.partition, "offset": sent.offset }),
    ))
}

/// `DELETE /api/topics/{name}/partitions/{partition}/messages/{offset}`:
/// answers as `message delete --format json`, or 404 when no message is
/// stored there.
pub(super) async fn delete_message(
    State(console): State<Arc<Console>>,
    Path((name, partition, offset)): Path<(String, u32, u64)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &Method::DELETE, &headers)?;
    if !console
        .client
        .delete_message(&name, partition, offset)
        .await?
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no message stored at offset {offset} of partition {partition} of topic {name:?}"
            ),
        ));
    }
    Ok(Json(
        json!({ "deleted": 1, "requested": 1, "not_found": [] }),
    ))
}

/// The body of a topic create; absent settings keep the library's defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateTopic {
    name: String,
    partitions: u32,
    retention_ms: Option<u64>,
    retention_messages: Option<u64>,
    retention_bytes: Option<u64>,
    max_message_bytes: Option<u32>,
    cleanup_policy: Option<CleanupPolicy>,
}

/// `POST /api/topics`: creates a topic; answers its name and settings.
pub(super) async fn create_topic(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &Method::POST, &headers)?;
    let request: CreateTopic = parse("topic create", &body)?;
    let mut topic = NewTopic::new(request.name, request.partitions);
    if let Some(ms) = request.retention_ms {
        topic = topic.retention(Duration::from_millis(ms));
    }
    if let Some(messages) = request.retention_messages {
        topic = topic.retention_messages(messages);
    }
    if let Some(bytes) = request.retention_bytes {
        topic = topic.retention_bytes(bytes);
    }
    if let Some(bytes) = request.max_message_bytes {
        topic = topic.max_message_bytes(bytes);
    }
    if let Some(policy) = request.cleanup_policy {
        topic = topic.cleanup_policy(policy);
    }
    let info = console.client.create_topic(topic).await?;
    Ok(Json(json!({
        "name": info.name,
        "partitions": info.partitions,
        "config": info.config,
    })))
}

/// `DELETE /api/topics/{name}`: deletes the topic and its messages.
pub(super) async fn delete_topic(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &Method::DELETE, &headers)?;
    console.client.delete_topic(&name).await?;
    Ok(Json(json!({ "topic": name, "deleted": true })))
}

/// Where a reset moves the offsets: `"earliest"`, `"latest"`,
/// `{"offset": N}`, `{"shift_by": N}` or `{"timestamp": MS}`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum ResetTo {
    Earliest,
    Latest,
    Offset(u64),
    ShiftBy(i64),
    Timestamp(i64),
}

/// The body of a reset: `group reset-offsets`' options for one topic.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResetOffsets {
    topic: String,
    /// Default: every partition.
    partitions: Option<Vec<u32>>,
    to: ResetTo,
    /// Without it the answer is only the plan, as the CLI without --execute.
    #[serde(default)]
    execute: bool,
    /// Allows `execute` on a group with no state yet, as --new-group.
    #[serde(default)]
    new_group: bool,
}

/// `POST /api/groups/{name}/reset-offsets`: answers as `group reset-offsets
/// --format json`, `{"executed", "offsets": [{topic, partition, current,
/// offset}]}`, and commits the offsets only when asked to `execute`.
pub(super) async fn reset_offsets(
    State(console): State<Arc<Console>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Value>, ApiError> {
    authorize_write(&console, &Method::POST, &headers)?;
    let request: ResetOffsets = parse("reset-offsets", &body)?;
    let client = &console.client;
    let target = match request.to {
        ResetTo::Earliest => Target::To(StartOffset::Earliest),
        ResetTo::Latest => Target::To(StartOffset::Latest),
        ResetTo::Offset(offset) => Target::To(StartOffset::Offset(offset)),
        ResetTo::ShiftBy(by) => Target::Shift(by),
        ResetTo::Timestamp(ms) => Target::To(StartOffset::Timestamp(ms)),
    };
    if request.execute && !request.new_group && !client.list_groups().await?.contains_key(&group) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "consumer group {group:?} has no state in this namespace; \
                 pass \"new_group\": true to create it"
            ),
        ));
    }
    let topics = [TopicPartitions {
        topic: request.topic,
        partitions: request.partitions,
    }];
    let plan = plan_reset(client, &group, &topics, target).await?;
    let mut offsets = Vec::new();
    for (topic, moves) in &plan {
        if request.execute {
            let commit: BTreeMap<u32, u64> = moves.iter().map(|m| (m.partition, m.new)).collect();
            client
                .commit_offsets_unowned(topic, &group, &commit)
                .await?;
        }
        offsets.extend(moves.iter().map(|m| {
            json!({ "topic": topic, "partition": m.partition, "current": m.current, "offset": m.new })
        }));
    }
    Ok(Json(
        json!({ "executed": request.execute, "offsets": offsets }),
    ))
}

/// A write's JSON body, or a 400 naming what was wrong with it.
fn parse<T: DeserializeOwned>(what: &str, body: &str) -> Result<T, ApiError> {
    serde_json::from_str(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad {what} body: {e}")))
}

/// A write needs `--allow-writes`, the token as `Authorization: Bearer`
/// and, when the browser names one, an Origin that is this server. A POST
/// also needs a JSON content type, which a cross-site form cannot send
/// without a CORS preflight this server never grants; a DELETE always needs
/// that preflight, so it carries no body.
fn authorize_write(
    console: &Console,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
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
    if method == Method::POST && !json_body {
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
