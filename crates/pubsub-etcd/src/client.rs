//! Connecting to etcd: the [`ClientBuilder`] and the [`Client`] handle that
//! every other part of the library borrows its etcd connection from.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, ConnectOptions, GetOptions, GetResponse, Identity, KvClient, TlsOptions, Txn,
    TxnResponse, WatchClient,
};

use crate::compactor::{AutoCompaction, Compactor};
use crate::error::{Error, Result};
use crate::health;
use crate::keys::Keys;

/// Environment variable with comma-separated etcd endpoints.
pub const ENDPOINTS_ENV: &str = "PUBSUB_ETCD_ENDPOINTS";
/// The namespace, read by [`ClientBuilder::from_env`] and the CLI.
pub const NAMESPACE_ENV: &str = "PUBSUB_ETCD_NAMESPACE";
/// The etcd user as `NAME` or `NAME:PASSWORD`.
pub const USER_ENV: &str = "PUBSUB_ETCD_USER";
/// The password of a user given without one.
pub const PASSWORD_ENV: &str = "PUBSUB_ETCD_PASSWORD";
/// The CA certificate (PEM file) that enables TLS.
pub const CACERT_ENV: &str = "PUBSUB_ETCD_CACERT";
/// The client certificate (PEM file) for TLS client authentication.
pub const CERT_ENV: &str = "PUBSUB_ETCD_CERT";
/// The private key (PEM file) of the client certificate.
pub const KEY_ENV: &str = "PUBSUB_ETCD_KEY";
/// The endpoint used when none is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";
/// The namespace used when none is given.
pub const DEFAULT_NAMESPACE: &str = "pubsub-etcd";

/// Endpoints from `PUBSUB_ETCD_ENDPOINTS` (comma-separated), or
/// `127.0.0.1:2379` when it is unset or empty.
pub fn endpoints_from_env() -> Vec<String> {
    let endpoints: Vec<String> = std::env::var(ENDPOINTS_ENV)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    if endpoints.is_empty() {
        vec![DEFAULT_ENDPOINT.to_string()]
    } else {
        endpoints
    }
}

/// Configures and opens a [`Client`].
///
/// ```no_run
/// # async fn f() -> pubsub_etcd::Result<()> {
/// use std::time::Duration;
/// let client = pubsub_etcd::Client::builder(["127.0.0.1:2379"])
///     .namespace("my-app")
///     .request_timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    namespace: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    ca_cert: Option<PathBuf>,
    client_identity: Option<(PathBuf, PathBuf)>,
    user: Option<(String, String)>,
    max_response_bytes: usize,
    auto_compaction: AutoCompaction,
}

impl fmt::Debug for ClientBuilder {
    // Never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    fn new(endpoints: Vec<String>) -> Self {
        ClientBuilder {
            endpoints,
            namespace: DEFAULT_NAMESPACE.to_string(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            ca_cert: None,
            client_identity: None,
            user: None,
            max_response_bytes: 256 * 1024 * 1024,
            auto_compaction: AutoCompaction::default(),
        }
    }

    /// A builder set up from the environment, the same variables the CLI
    /// reads: the endpoints of [`ENDPOINTS_ENV`] (default
    /// [`DEFAULT_ENDPOINT`]), [`NAMESPACE_ENV`], [`USER_ENV`] (`NAME` or
    /// `NAME:PASSWORD`, the password otherwise from [`PASSWORD_ENV`]),
    /// [`CACERT_ENV`], and [`CERT_ENV`] with [`KEY_ENV`]. Unset or empty
    /// variables keep the defaults.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the variable when only one of
    /// [`CERT_ENV`] and [`KEY_ENV`] is set, or a user has no password.
    pub fn from_env() -> Result<ClientBuilder> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<ClientBuilder> {
        let endpoints = var(ENDPOINTS_ENV)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(String::from)
                    .collect()
            })
            .filter(|e: &Vec<String>| !e.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_string()]);
        let mut builder = ClientBuilder::new(endpoints);
        if let Some(namespace) = var(NAMESPACE_ENV) {
            builder = builder.namespace(namespace);
        }
        if let Some(ca) = var(CACERT_ENV) {
            builder = builder.ca_cert(ca);
        }
        match (var(CERT_ENV), var(KEY_ENV)) {
            (Some(cert), Some(key)) => builder = builder.client_cert(cert, key),
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::InvalidConfig(format!(
                    "{CERT_ENV} is set but {KEY_ENV} is not"
                )))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidConfig(format!(
                    "{KEY_ENV} is set but {CERT_ENV} is not"
                )))
            }
        }
        if let Some(user) = var(USER_ENV) {
            let (name, password) = match user.split_once(':') {
                Some((name, password)) => (name.to_string(), password.to_string()),
                None => match var(PASSWORD_ENV) {
                    Some(password) => (user, password),
                    None => {
                        return Err(Error::InvalidConfig(format!(
                            "{USER_ENV} names user {user:?} without a password, and {PASSWORD_ENV} is not set"
                        )))
                    }
                },
            };
            builder = builder.user(name, password);
        }
        Ok(builder)
    }

    /// The prefix under which every key of the library lives, so that
    /// applications can share an etcd and etcd's RBAC can confine a user to
    /// one namespace (grant it the prefix `<namespace>/`). Default:
    /// `pubsub-etcd`.
    ///
    /// A namespace is one name of 1 to 249 characters from
    /// `[A-Za-z0-9._-]` (not `.` or `..`), optionally after a leading `/`
    /// (`/my-app`); a trailing `/` is ignored. It cannot contain another `/`:
    /// namespaces that nest (`x` and `x/data/foo`) would share keys, and one
    /// could list or delete the other's. [`connect`](Self::connect) fails
    /// with [`Error::InvalidNamespace`] otherwise.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long to wait for a connection (and authentication). Default: 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long any one etcd request may take before it fails with
    /// [`Error::Timeout`]. Default: 10 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Use TLS, trusting the CA certificate in this PEM file. Default: plain text.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert = Some(path.into());
        self
    }

    /// Authenticate with this client certificate and key (PEM files); implies TLS.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_identity = Some((cert.into(), key.into()));
        self
    }

    /// Authenticate as this etcd user. Default: no authentication.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// The largest etcd response the client accepts. etcd-client's default of
    /// 4 MiB is too small for a page of record batches or a watch replay.
    /// Default: 256 MiB.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Whether this client takes part in compacting etcd's history
    /// (DESIGN.md, "Automatic history compaction"). Disable it for an etcd
    /// that is compacted already: etcd's `--auto-compaction-*` flags, or
    /// Kubernetes' API server. Default: enabled, every 5 minutes or sooner
    /// once 10,000 revisions or 128 MiB of history accumulated.
    pub fn auto_compaction(mut self, policy: AutoCompaction) -> Self {
        self.auto_compaction = policy;
        self
    }

    /// Opens the connection.
    pub async fn connect(self) -> Result<Client> {
        self.auto_compaction.validate()?;
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig("no etcd endpoints given".into()));
        }
        let keys = Keys::new(&self.namespace)?;
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::InvalidConfig(
                "timeouts must be greater than zero".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        let tls = self.ca_cert.is_some() || self.client_identity.is_some();
        if tls {
            let mut tls_options = TlsOptions::new();
            if let Some(ca) = &self.ca_cert {
                tls_options = tls_options.ca_certificate(Certificate::from_pem(read_pem(ca)?));
            }
            if let Some((cert, key)) = &self.client_identity {
                tls_options =
                    tls_options.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
            }
            options = options.with_tls(tls_options);
        }
        if let Some((name, password)) = &self.user {
            // etcd's auth tokens expire (simple tokens after 5 minutes);
            // members and producers live much longer than that.
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let etcd = match tokio::time::timeout(
            self.connect_timeout,
            etcd_client::Client::connect(&endpoints, Some(options.clone())),
        )
        .await
        {
            Ok(connected) => connected.map_err(|e| Error::etcd("connect", e))?,
            Err(_) => {
                return Err(Error::Timeout {
                    op: "connect",
                    timeout: self.connect_timeout,
                })
            }
        };
        let kv = etcd
            .kv_client()
            .max_decoding_message_size(self.max_response_bytes);
        let watch = etcd
            .watch_client()
            .max_decoding_message_size(self.max_response_bytes);
        let client = ClientInner {
            etcd,
            kv,
            watch,
            namespace: keys.namespace().to_string(),
            keys,
            request_timeout: self.connect_timeout,
            endpoints: endpoints.len(),
            connection: Arc::new(Connection {
                urls: endpoints.clone(),
                max_response_bytes: self.max_response_bytes,
            }),
            connect_options: options.clone(),
            _alive: Arc::new(()),
            compactor: Arc::new(Compactor::idle()),
        };
        // etcd-client connects lazily: one small read inside the namespace
        // (allowed to a user confined to it by RBAC) makes an unreachable or
        // refusing etcd fail here, with the connect timeout, not later.
        let probe = GetOptions::new().with_count_only().with_limit(1);
        client
            .timed(
                "connect",
                client
                    .kv
                    .clone()
                    .get(client.keys.topics_prefix(), Some(probe)),
            )
            .await?;
        let alive = Arc::new(());
        health::spawn(
            client.etcd.clone(),
            endpoints,
            options,
            client.keys.topics_prefix(),
            Arc::downgrade(&alive),
        );
        // The task's own client holds an idle handle, not the one it is
        // stopped by, so it does not keep itself alive.
        let task_client = Client::from(ClientInner {
            request_timeout: self.request_timeout,
            ..client.clone()
        });
        let compactor = Arc::new(Compactor::spawn(task_client, self.auto_compaction));
        Ok(Client::from(ClientInner {
            request_timeout: self.request_timeout,
            _alive: alive,
            compactor,
            ..client
        }))
    }
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::InvalidConfig(format!("cannot read {}: {e}", path.display())))
}

/// An endpoint as it may be shown in logs and errors: credentials written
/// into a URL (`http://user:secret@host:2379`) become `***`.
pub fn redact_endpoint(endpoint: &str) -> String {
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, endpoint),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let redacted = match rest[..authority_end].rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => return endpoint.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{redacted}"),
        None => redacted,
    }
}

/// A connection to etcd, scoped to one namespace. A cheap handle (one
/// pointer): clones share the connection, the settings and the background
/// tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

// Lets the crate's modules read the shared settings as `client.kv`,
// `client.keys`, ... ClientInner is `pub` only because a trait impl may not
// name a crate-private type; it lives in a private module, so no user can
// name it, and its fields and methods are crate-private.
#[doc(hidden)]
impl Deref for Client {
    type Target = ClientInner;

    fn deref(&self) -> &ClientInner {
        &self.inner
    }
}

impl From<ClientInner> for Client {
    fn from(inner: ClientInner) -> Client {
        Client {
            inner: Arc::new(inner),
        }
    }
}

/// What a [`Client`] handle points to. Built by the builder and by
/// [`Client::own_connection`], never changed afterwards.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // printed through Client's Debug
pub struct ClientInner {
    /// For leases, maintenance and anything without a dedicated client below.
    pub(crate) etcd: etcd_client::Client,
    /// KV client with the raised response limit.
    pub(crate) kv: KvClient,
    /// Watch client with the raised response limit.
    pub(crate) watch: WatchClient,
    pub(crate) keys: Keys,
    namespace: String,
    pub(crate) request_timeout: Duration,
    /// How many endpoints the client balances over.
    endpoints: usize,
    /// TLS, credentials and timeouts, for connections to single members
    /// (maintenance). Holds the password: never printed.
    pub(crate) connect_options: ConnectOptions,
    /// How to open another connection like this one.
    connection: Arc<Connection>,
    /// Shared by every clone; the endpoint health task ends with the last.
    _alive: Arc<()>,
    /// The automatic history compaction task, shared by every clone; it
    /// ends with the last clone or at [`Client::close`].
    compactor: Arc<Compactor>,
}

/// What [`Client::own_connection`] needs besides the connect options.
#[derive(Debug)]
struct Connection {
    urls: Vec<String>,
    max_response_bytes: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("namespace", &self.namespace)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A clone of this client on a connection of its own, to the same
    /// endpoints with the same options. HTTP/2 flow control is per
    /// connection: watch data that a slow application leaves unread fills
    /// the connection's window, and from then on nothing on that connection
    /// is answered. What must go on regardless (a group member's lease,
    /// membership and commits) therefore does not share a connection with
    /// partition readers.
    pub(crate) async fn own_connection(&self) -> Result<Client> {
        let etcd = self
            .timed(
                "connect",
                etcd_client::Client::connect(
                    &self.connection.urls,
                    Some(self.connect_options.clone()),
                ),
            )
            .await?;
        Ok(Client::from(ClientInner {
            kv: etcd
                .kv_client()
                .max_decoding_message_size(self.connection.max_response_bytes),
            watch: etcd
                .watch_client()
                .max_decoding_message_size(self.connection.max_response_bytes),
            etcd,
            ..ClientInner::clone(self)
        }))
    }

    /// Starts configuring a client for these etcd endpoints
    /// (`host:port`, or URLs with `http://` / `https://`).
    pub fn builder<E: Into<String>>(endpoints: impl IntoIterator<Item = E>) -> ClientBuilder {
        ClientBuilder::new(endpoints.into_iter().map(Into::into).collect())
    }

    /// Connects as [`ClientBuilder::from_env`] describes: the endpoints,
    /// namespace, user and TLS files of the `PUBSUB_ETCD_*` variables the
    /// CLI reads too, and defaults for everything else.
    ///
    /// # Errors
    /// Those of [`ClientBuilder::from_env`] and [`ClientBuilder::connect`].
    pub async fn connect_from_env() -> Result<Client> {
        ClientBuilder::from_env()?.connect().await
    }

    /// The namespace this client works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The raw etcd client underneath, outside the namespace and every check
    /// of this library.
    ///
    /// Hidden and exempt from this crate's semver: it hands out
    /// etcd-client's own type, whose version this crate may change in any
    /// release. It exists for what must bypass the library by design: the
    /// CLI benchmark's raw etcd baselines (and its sweep of the benchmark's
    /// namespace), and tests that write garbage or count watch events
    /// under a namespace. Applications have a library method for
    /// everything else; none needs this.
    #[doc(hidden)]
    pub fn etcd(&self) -> &etcd_client::Client {
        &self.etcd
    }

    /// Stops the client's background work (automatic history compaction)
    /// for this handle and every clone of it, and waits until it has ended.
    /// Requests keep working. Without a call, the work ends when the last
    /// clone is dropped.
    pub async fn close(self) {
        self.compactor.stop().await;
    }

    /// Whether this client takes part in automatic history compaction
    /// (enabled and not closed).
    pub fn auto_compacting(&self) -> bool {
        self.compactor.is_running()
    }
}

impl ClientInner {
    /// A range read under the request timeout, made once more when its
    /// outcome was unknown and there is another endpoint to reach: a read is
    /// safe to repeat, and the first attempt may have gone to a member that
    /// froze in the second before the health check noticed.
    pub(crate) async fn read(
        &self,
        op: &'static str,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse> {
        let key = key.into();
        let result = self
            .timed(op, self.kv.clone().get(key.clone(), options.clone()))
            .await;
        match result {
            Err(e) if e.is_outcome_unknown() && self.endpoints > 1 => {
                tracing::debug!(op, error = %e, "read failed, retrying once");
                self.timed(op, self.kv.clone().get(key, options)).await
            }
            other => other,
        }
    }

    /// [`Client::read`] for a transaction of reads only.
    pub(crate) async fn read_txn(&self, op: &'static str, txn: Txn) -> Result<TxnResponse> {
        match self.timed(op, self.kv.clone().txn(txn.clone())).await {
            Err(e) if e.is_outcome_unknown() && self.endpoints > 1 => {
                tracing::debug!(op, error = %e, "read failed, retrying once");
                self.timed(op, self.kv.clone().txn(txn)).await
            }
            other => other,
        }
    }

    /// Runs one etcd request under the request timeout.
    pub(crate) async fn timed<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(result) => result.map_err(|e| Error::etcd(op, e)),
            Err(_) => Err(Error::Timeout {
                op,
                timeout: self.request_timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_a_cheap_handle() {
        assert!(std::mem::size_of::<Client>() <= 64);
    }

    fn builder_from(vars: &[(&str, &str)]) -> Result<ClientBuilder> {
        ClientBuilder::from_vars(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_environment_gives_endpoints_namespace_user_and_tls() {
        let builder = builder_from(&[
            (ENDPOINTS_ENV, "a:1, b:2"),
            (NAMESPACE_ENV, "app"),
            (USER_ENV, "alice"),
            (PASSWORD_ENV, "secret"),
            (CACERT_ENV, "/ca.pem"),
            (CERT_ENV, "/c.pem"),
            (KEY_ENV, "/k.pem"),
        ])
        .unwrap();
        assert_eq!(builder.endpoints, ["a:1", "b:2"]);
        assert_eq!(builder.namespace, "app");
        assert_eq!(builder.user, Some(("alice".into(), "secret".into())));
        assert_eq!(builder.ca_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            builder.client_identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let inline = builder_from(&[(USER_ENV, "bob:pw:with:colons")]).unwrap();
        assert_eq!(inline.user, Some(("bob".into(), "pw:with:colons".into())));
        let defaults = builder_from(&[]).unwrap();
        assert_eq!(defaults.endpoints, [DEFAULT_ENDPOINT]);
        assert_eq!(defaults.namespace, DEFAULT_NAMESPACE);
        assert!(defaults.user.is_none() && defaults.ca_cert.is_none());
    }

    #[test]
    fn half_a_setting_in_the_environment_is_refused_by_name() {
        let err = builder_from(&[(CERT_ENV, "/c.pem")]).unwrap_err();
        assert!(err.to_string().contains(KEY_ENV), "{err}");
        let err = builder_from(&[(USER_ENV, "alice")]).unwrap_err();
        assert!(err.to_string().contains(PASSWORD_ENV), "{err}");
    }

    #[test]
    fn credentials_in_endpoints_are_redacted() {
        assert_eq!(redact_endpoint("http://u:pw@h:2379"), "http://***@h:2379");
        assert_eq!(redact_endpoint("u:pw@h:2379"), "***@h:2379");
        assert_eq!(
            redact_endpoint("https://h:2379/p@th"),
            "https://h:2379/p@th"
        );
        assert_eq!(redact_endpoint("127.0.0.1:2379"), "127.0.0.1:2379");
    }
}
