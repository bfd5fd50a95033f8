//! Connecting to etcd with a [`ClientBuilder`]'s settings, and the
//! [`Client`] handle that every other part of the library borrows its etcd
//! connection from.

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

use crate::builder::ClientBuilder;
use crate::compactor::Compactor;
use crate::error::{Error, Result};
use crate::health;
use crate::keys::Keys;

impl ClientBuilder {
    /// Opens the connection.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for no endpoints, a zero timeout, a PEM file
    /// that cannot be read or a bad [`AutoCompaction`](crate::AutoCompaction);
    /// [`Error::InvalidNamespace`]; [`Error::Timeout`] when etcd is not reached
    /// within the connect timeout; [`Error::Etcd`] when it refuses the
    /// connection, the credentials or a read inside the namespace.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the background tasks start only as it returns, so a
    /// dropped call leaves nothing running.
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
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`ClientBuilder::connect`].
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
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a dropped call has already told the background work to
    /// stop; it ends on its own.
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
}
