//! Endpoint health: keeps members that do not answer out of the client's
//! load balancer.
//!
//! etcd-client spreads requests over all endpoints and never drops one that
//! still accepts TCP connections. A frozen or overloaded member does (the
//! kernel completes the handshake), so a third of all requests to a
//! three-member cluster with one frozen member would each wait out the
//! request timeout. This task probes every endpoint on its own connection
//! once a second, with a short timeout, and removes the endpoints that fail
//! from the shared balancer until they answer again. It never removes the
//! last answering endpoint, and stops when the last [`Client`] clone is
//! dropped.
//!
//! [`Client`]: crate::Client

use std::collections::HashSet;
use std::sync::Weak;
use std::time::Duration;

use etcd_client::{ConnectOptions, GetOptions};

/// How often every endpoint is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take before its endpoint counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Starts the checker for a client with more than one endpoint.
pub(crate) fn spawn(
    balancer: etcd_client::Client,
    endpoints: Vec<String>,
    options: ConnectOptions,
    probe_key: String,
    alive: Weak<()>,
) {
    tokio::spawn(async move {
        let mut probes: Vec<Option<etcd_client::Client>> = vec![None; endpoints.len()];
        let mut removed: HashSet<usize> = HashSet::new();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if alive.upgrade().is_none() {
                return;
            }
            let checks = endpoints
                .iter()
                .zip(probes.iter_mut())
                .map(|(endpoint, probe)| answers(endpoint, probe, &options, &probe_key));
            let healthy: Vec<bool> = futures::future::join_all(checks).await;
            if !healthy.iter().any(|h| *h) {
                // Nothing answers: removing endpoints would only make the
                // client fail differently once etcd is back.
                continue;
            }
            for (i, endpoint) in endpoints.iter().enumerate() {
                let change = if !healthy[i] && removed.insert(i) {
                    tracing::warn!(%endpoint, "etcd endpoint not answering, taking it out of rotation");
                    balancer.remove_endpoint(endpoint).await
                } else if healthy[i] && removed.remove(&i) {
                    tracing::info!(%endpoint, "etcd endpoint answering again, back in rotation");
                    balancer.add_endpoint(endpoint).await
                } else {
                    Ok(())
                };
                if let Err(error) = change {
                    tracing::warn!(%endpoint, %error, "could not change the endpoint rotation");
                }
            }
        }
    });
}

/// Probes one endpoint with a small read on a connection of its own,
/// connecting (again) when needed.
async fn answers(
    endpoint: &str,
    probe: &mut Option<etcd_client::Client>,
    options: &ConnectOptions,
    key: &str,
) -> bool {
    let attempt = async {
        if probe.is_none() {
            let client = etcd_client::Client::connect([endpoint], Some(options.clone())).await?;
            *probe = Some(client);
        }
        let client = probe.as_mut().expect("connected above");
        client
            .get(key, Some(GetOptions::new().with_count_only()))
            .await
            .map(|_| ())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => true,
        _ => {
            // A fresh connection next time: the old one may be stuck.
            *probe = None;
            false
        }
    }
}
