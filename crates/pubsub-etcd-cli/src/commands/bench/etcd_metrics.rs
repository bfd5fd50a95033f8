//! etcd's own counters, read from its Prometheus endpoint, for benchmarks
//! that report the work etcd did (requests, keys written). The counters are
//! etcd-wide: a figure is the benchmark's alone only when nothing else uses
//! that etcd meanwhile.

use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cli::ConnectionArgs;

/// Where etcd's metrics are read.
#[derive(Debug, Clone)]
pub struct EtcdMetrics {
    url: String,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    /// gRPC requests etcd answered (`grpc_server_handled_total`).
    pub requests: u64,
    /// Keys etcd wrote: puts and deletes, also inside transactions
    /// (`etcd_mvcc_put_total` + `etcd_mvcc_delete_total`).
    pub keys_written: u64,
}

impl Counters {
    /// What happened since `before`.
    pub fn since(self, before: Counters) -> Counters {
        Counters {
            requests: self.requests.saturating_sub(before.requests),
            keys_written: self.keys_written.saturating_sub(before.keys_written),
        }
    }
}

impl EtcdMetrics {
    /// `explicit`, or `http://<first endpoint>/metrics`; None when neither
    /// answers (a TLS endpoint, metrics served elsewhere).
    pub async fn locate(explicit: Option<&str>, connection: &ConnectionArgs) -> Option<Self> {
        let url = match explicit {
            Some(url) => url.to_string(),
            None => {
                let endpoint = connection.endpoints.first()?;
                let host = endpoint
                    .strip_prefix("http://")
                    .unwrap_or(endpoint)
                    .trim_end_matches('/');
                if host.contains("://") {
                    return None;
                }
                format!("http://{host}/metrics")
            }
        };
        let metrics = EtcdMetrics { url };
        metrics.read().await.is_ok().then_some(metrics)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Reads the counters: a plain HTTP/1.0 GET, all a loopback metrics
    /// endpoint needs.
    pub async fn read(&self) -> anyhow::Result<Counters> {
        let url = &self.url;
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// metrics URLs are read"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let read = async {
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            stream
                .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
                .await?;
            let mut body = String::new();
            // Bounded: etcd's metrics page is some hundred KiB.
            stream.take(64 << 20).read_to_string(&mut body).await?;
            std::io::Result::Ok(body)
        };
        let body = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .with_context(|| format!("{url} did not answer"))?
            .with_context(|| format!("cannot read {url}"))?;
        let mut counters = Counters::default();
        for line in body.lines() {
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            if line.starts_with("grpc_server_handled_total{") {
                counters.requests += value as u64;
            } else if line.starts_with("etcd_mvcc_put_total ")
                || line.starts_with("etcd_mvcc_delete_total ")
            {
                counters.keys_written += value as u64;
            }
        }
        if counters.requests == 0 {
            anyhow::bail!("{url} has no grpc_server_handled_total: not etcd's metrics");
        }
        Ok(counters)
    }
}
