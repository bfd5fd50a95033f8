//! The console's write endpoints and the guard every one passes first.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use pubsub_etcd::Record;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, Console};

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
    let (partition, offset) = sent?;
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
