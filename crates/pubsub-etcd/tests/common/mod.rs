//! Shared test support, pulled into each integration test with `mod common;`.
// Not every test binary uses every helper.
#![allow(dead_code)]

pub mod etcd_proc;
pub mod group;
pub mod ns;

use std::future::Future;
use std::time::Duration;

/// Upper bound for any single library call in the tests: a call that takes
/// longer has hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than [`CALL_TIMEOUT`].
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CALL_TIMEOUT:?}"))
}

/// The wall clock in Unix milliseconds, the unit of record timestamps.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}
