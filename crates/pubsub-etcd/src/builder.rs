//! What a [`Client`](crate::Client) is configured with: the [`ClientBuilder`], its
//! settings and their defaults, and the environment variables (the CLI's
//! too) that set them. Connecting with those settings is `client.rs`'s.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::compactor::AutoCompaction;
use crate::error::{Error, Result};

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

/// Configures and opens a [`Client`](crate::Client).
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
    pub(crate) endpoints: Vec<String>,
    pub(crate) namespace: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) ca_cert: Option<PathBuf>,
    pub(crate) client_identity: Option<(PathBuf, PathBuf)>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) max_response_bytes: usize,
    pub(crate) auto_compaction: AutoCompaction,
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
    pub(crate) fn new(endpoints: Vec<String>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

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
