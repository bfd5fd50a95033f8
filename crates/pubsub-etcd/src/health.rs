//! Endpoint health: keeps members that do not answer out of the client's
//! load balancer, and tells a person when etcd as a whole is unreachable.
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
//! When no endpoint answers, every request fails or waits out its timeout,
//! and a process that only follows a topic would otherwise stay silent. So
//! the outage is logged as a warning once it lasted [`OUTAGE_REPORT_AFTER`],
//! again every [`OUTAGE_REPORT_EVERY`], and once more when etcd answers again.
//!
//! [`Client`]: crate::Client

use std::collections::HashSet;
use std::sync::Weak;
use std::time::{Duration, Instant};

use etcd_client::{ConnectOptions, GetOptions};

use crate::builder::redact_endpoint;
use crate::telemetry;

/// How often every endpoint is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take before its endpoint counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// How long nothing must answer before the outage is reported: long enough
/// that one slow probe is not news, shorter than the default request timeout.
const OUTAGE_REPORT_AFTER: Duration = Duration::from_secs(2);
/// How often a continuing outage is reported again.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(30);

/// Starts the checker. With a single endpoint it only reports outages: there
/// is nothing to take out of rotation.
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
        let mut outage = Outage::default();
        telemetry::etcd_unreachable(false);
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
            let any_answers = healthy.iter().any(|h| *h);
            outage.observe(any_answers, &endpoints);
            if !any_answers || endpoints.len() == 1 {
                // Nothing answers: removing endpoints would only make the
                // client fail differently once etcd is back.
                continue;
            }
            for (i, endpoint) in endpoints.iter().enumerate() {
                let change = if !healthy[i] && removed.insert(i) {
                    let endpoint_shown = redact_endpoint(endpoint);
                    tracing::warn!(endpoint = %endpoint_shown, "etcd endpoint not answering, taking it out of rotation");
                    balancer.remove_endpoint(endpoint).await
                } else if healthy[i] && removed.remove(&i) {
                    let endpoint_shown = redact_endpoint(endpoint);
                    tracing::info!(endpoint = %endpoint_shown, "etcd endpoint answering again, back in rotation");
                    balancer.add_endpoint(endpoint).await
                } else {
                    Ok(())
                };
                if let Err(error) = change {
                    tracing::warn!(endpoint = %redact_endpoint(endpoint), %error, "could not change the endpoint rotation");
                }
            }
        }
    });
}

/// Tracks whether any endpoint answers, and reports outages.
#[derive(Debug, Default)]
struct Outage {
    /// When the current outage began.
    since: Option<Instant>,
    /// When it was last reported, if it was.
    reported: Option<Instant>,
}

impl Outage {
    fn observe(&mut self, any_answers: bool, endpoints: &[String]) {
        let now = Instant::now();
        match (any_answers, self.since) {
            (false, None) => {
                self.since = Some(now);
                telemetry::etcd_unreachable(true);
            }
            (false, Some(since)) => {
                let down = now - since;
                let due = match self.reported {
                    None => down >= OUTAGE_REPORT_AFTER,
                    Some(at) => now - at >= OUTAGE_REPORT_EVERY,
                };
                if due {
                    tracing::warn!(
                        endpoints = %shown(endpoints),
                        "etcd unreachable for {} s, retrying",
                        down.as_secs()
                    );
                    self.reported = Some(now);
                }
            }
            (true, Some(since)) => {
                if self.reported.is_some() {
                    tracing::warn!(
                        endpoints = %shown(endpoints),
                        "etcd reachable again after {} s",
                        (now - since).as_secs()
                    );
                }
                telemetry::etcd_unreachable(false);
                *self = Outage::default();
            }
            (true, None) => {}
        }
    }
}

fn shown(endpoints: &[String]) -> String {
    let shown: Vec<String> = endpoints.iter().map(|e| redact_endpoint(e)).collect();
    shown.join(",")
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
