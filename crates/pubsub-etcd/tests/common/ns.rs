//! A throwaway namespace on the development etcd for each test.
//!
//! [`client`] connects to `PUBSUB_ETCD_ENDPOINTS` (default `127.0.0.1:2379`)
//! in a fresh namespace `test-<random hex>`; dropping the returned
//! [`Namespace`] deletes every key under `<ns>/`, also when the test panics,
//! so tests can run in parallel and leave nothing behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pubsub_etcd::Client;

/// How long the cleanup may take before it gives up (it never panics).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd endpoints the tests use: `PUBSUB_ETCD_ENDPOINTS`, or
/// `127.0.0.1:2379` when it is unset.
pub fn endpoints() -> Vec<String> {
    pubsub_etcd::endpoints_from_env()
}

/// A namespace that deletes its keys when dropped.
#[derive(Debug)]
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// A fresh, random namespace name `test-<16 hex digits>`; nothing is
    /// written to etcd yet.
    pub fn new() -> Namespace {
        Namespace {
            name: format!("test-{:016x}", rand::random::<u64>()),
        }
    }

    /// A namespace of a chosen name (for tests about how names relate);
    /// dropping it deletes its keys like any other.
    pub fn named(name: impl Into<String>) -> Namespace {
        Namespace { name: name.into() }
    }

    /// The namespace, without the trailing `/`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prefix every key of the namespace starts with.
    pub fn prefix(&self) -> String {
        format!("{}/", self.name)
    }

    /// A client for this namespace with default settings.
    pub async fn connect(&self) -> Client {
        connect(&self.name).await
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Namespace::new()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if NO_ETCD.load(Ordering::Relaxed) {
            return;
        }
        // A thread with its own runtime: blocking on the cleanup is then safe
        // from inside any tokio runtime (even a current-thread one, which
        // cannot drive a future while it is blocked here).
        let prefix = self.prefix();
        let result = std::thread::Builder::new()
            .name("ns-cleanup".into())
            .spawn(move || delete_prefix_blocking(&prefix))
            .map_err(|e| e.to_string())
            .and_then(|t| t.join().map_err(|_| "cleanup thread panicked".to_string()))
            .and_then(|r| r);
        if let Err(e) = result {
            eprintln!("warning: cleanup of namespace {} failed: {e}", self.name);
        }
    }
}

/// Deletes every key starting with `prefix`, on a runtime of its own.
pub fn delete_prefix_blocking(prefix: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    runtime.block_on(async {
        let cleanup = async {
            let mut etcd = etcd_client::Client::connect(endpoints(), None)
                .await
                .map_err(|e| e.to_string())?;
            etcd.delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok(())
        };
        match tokio::time::timeout(CLEANUP_TIMEOUT, cleanup).await {
            Ok(result) => result,
            Err(_) => Err(format!("timed out after {CLEANUP_TIMEOUT:?}")),
        }
    })
}

/// Set once a test found no etcd, so that dropping namespaces does not add
/// a cleanup warning per test to the one message that matters.
static NO_ETCD: AtomicBool = AtomicBool::new(false);

/// A client for an existing namespace (e.g. one a parent test process
/// created), with default settings. When etcd is unreachable the test fails
/// with how to run the suite, since a plain `cargo test` starts no etcd.
pub async fn connect(namespace: &str) -> Client {
    match Client::builder(endpoints())
        .namespace(namespace)
        .connect()
        .await
    {
        Ok(client) => client,
        Err(e) => {
            NO_ETCD.store(true, Ordering::Relaxed);
            panic!(
                "no etcd answers at {:?} ({e}).\n\
                 These tests need a real etcd. Either run `scripts/test.sh`, which installs \
                 etcd, starts a throwaway one and runs the whole suite, or start one with \
                 `scripts/etcd-up.sh` (it prints its endpoint) and run \
                 `PUBSUB_ETCD_ENDPOINTS=<endpoint> cargo test`.",
                endpoints()
            )
        }
    }
}

/// A client in a fresh namespace, and the guard that deletes it on drop.
/// Keep the guard alive until the end of the test.
pub async fn client() -> (Client, Namespace) {
    let ns = Namespace::new();
    let client = ns.connect().await;
    (client, ns)
}

/// The number of keys under the namespace (to check a test left nothing
/// behind, or that an operation wrote nothing).
pub async fn key_count(client: &Client, ns: &Namespace) -> i64 {
    let mut kv = client.etcd().kv_client();
    let response = kv
        .get(
            ns.prefix(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .expect("count keys");
    response.count()
}
