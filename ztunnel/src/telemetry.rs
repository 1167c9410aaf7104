//! Connection metrics with Istio's names and labels, and one access-log line per connection.
//!
//! Every connection ztunnel handles is a [`ConnectionRecord`]: opening it counts
//! `istio_tcp_connections_opened_total`; closing it counts `istio_tcp_connections_closed_total`
//! (with `response_flags`: `-`, `DENY` for a policy refusal, `CONNECT` when the upstream could not
//! be reached) and the bytes each way, and writes the access-log line. As in Istio,
//! `istio_tcp_received_bytes_total` counts client → server bytes and `istio_tcp_sent_bytes_total`
//! server → client, whichever side reports (`reporter="source"` for outbound, `"destination"` for
//! inbound). Unknown label values are `unknown`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::metrics::Hashed;
use proto::state::{Service, Workload};

/// Labels of the `istio_tcp_*` families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `source` (outbound) or `destination` (inbound).
    pub reporter: &'static str,
    /// The client's workload (Deployment or Pod name).
    pub source_workload: String,
    /// The client's namespace.
    pub source_workload_namespace: String,
    /// The client's SPIFFE ID (from its TLS handshake), or `unknown` in plaintext.
    pub source_principal: String,
    /// The client's canonical service (`app` label).
    pub source_canonical_service: String,
    /// The server's workload.
    pub destination_workload: String,
    /// The server's namespace.
    pub destination_workload_namespace: String,
    /// The server's SPIFFE ID.
    pub destination_principal: String,
    /// The service addressed (hostname), when a VIP was.
    pub destination_service: String,
    /// The server's canonical service.
    pub destination_canonical_service: String,
    /// Always `tcp` here.
    pub request_protocol: &'static str,
    /// `-`, `DENY` or `CONNECT` (on closes; `-` on opens).
    pub response_flags: &'static str,
    /// `mutual_tls` when the connection was carried over HBONE, else `unknown`.
    pub connection_security_policy: &'static str,
}

/// Label of the dry-run counter: what the connection would have met.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
}

/// Label of the DNS counter: who answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `mesh`, `upstream`, `failed` (SERVFAIL) or `dropped` (too many in progress).
    pub answered: &'static str,
}

/// What ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Carried and closed normally (or with an I/O error after it was established).
    Done,
    /// Refused by policy.
    Denied,
    /// The upstream could not be reached.
    ConnectFailed,
    /// Closed because a policy change no longer allows it.
    Revoked,
    /// Closed because ztunnel (or the pod's proxy) shut down.
    Shutdown,
}

impl Outcome {
    fn flags(self) -> &'static str {
        match self {
            Outcome::Done | Outcome::Shutdown => "-",
            Outcome::Denied | Outcome::Revoked => "DENY",
            Outcome::ConnectFailed => "CONNECT",
        }
    }
}

/// ztunnel's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<Hashed<ConnectionLabels>, Counter>,
    closed: Family<Hashed<ConnectionLabels>, Counter>,
    received: Family<Hashed<ConnectionLabels>, Counter>,
    sent: Family<Hashed<ConnectionLabels>, Counter>,
    /// Pods served on this node.
    pub pods: Gauge,
    /// Pods the node agent sent that could not be served yet (retried).
    pub pods_pending: Gauge,
    /// Connections open now.
    pub active: Gauge,
    /// Connections to which dry-run policies applied, by what they would have decided.
    pub dry_run: Family<DryRunLabels, Counter>,
    /// DNS queries of the pods, by who answered them.
    pub dns_requests: Family<DnsLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let (opened, closed, received, sent) =
            (Family::default(), Family::default(), Family::default(), Family::default());
        let (pods, active) = (Gauge::default(), Gauge::default());
        registry.register("istio_tcp_connections_opened", "TCP connections opened", opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", closed.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the client (request direction)", {
            received.clone()
        });
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client (response direction)", sent.clone());
        registry.register("ztunnel_workloads", "Pods this ztunnel serves", pods.clone());
        let pods_pending = Gauge::default();
        registry.register(
            "ztunnel_workloads_pending",
            "Pods the node agent sent whose listeners could not be bound yet (retried with backoff)",
            pods_pending.clone(),
        );
        registry.register("ztunnel_active_connections", "Connections open through this ztunnel", active.clone());
        let dry_run = Family::default();
        registry.register(
            "ztunnel_dry_run_authorizations",
            "Connections to which dry-run AuthorizationPolicies applied, by the decision they would have made (never enforced)",
            dry_run.clone(),
        );
        let dns_requests = Family::default();
        registry.register(
            "istio_dns_requests",
            "DNS queries of the pods, by who answered: the mesh state, the upstream resolver, nobody (SERVFAIL), or dropped (too many in progress)",
            dns_requests.clone(),
        );
        proto::metrics::register_log_lines_dropped(&mut registry, "ztunnel");
        Metrics { registry, opened, closed, received, sent, pods, pods_pending, active, dry_run, dns_requests }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

const UNKNOWN: &str = "unknown";

fn or_unknown(s: &str) -> String {
    if s.is_empty() { UNKNOWN.to_owned() } else { s.to_owned() }
}

/// One side of a connection: its workload when the control plane knows it, and its SPIFFE ID if
/// it has one — both shared, not copied: a connection holds pointers, not strings.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The workload.
    pub workload: Option<Arc<Workload>>,
    /// Its SPIFFE ID: proven (a TLS handshake), known first-hand (the pod ztunnel serves) or
    /// implied by its workload (a destination the control plane describes); `None` for a
    /// plaintext client, which proves nothing.
    pub principal: Option<proto::SpiffeId>,
}

impl Peer {
    /// A workload whose identity is implied by the control plane's description of it.
    pub fn of(w: &Arc<Workload>) -> Peer {
        Peer { workload: Some(w.clone()), principal: Some(w.identity.clone()) }
    }

    /// A workload (if known) and the identity it proved (`None`: plaintext).
    pub fn proven(workload: Option<&Arc<Workload>>, principal: Option<proto::SpiffeId>) -> Peer {
        Peer { workload: workload.cloned(), principal }
    }

    fn name(&self) -> &str {
        self.workload.as_deref().map_or("", Workload::display_name)
    }

    fn namespace(&self) -> &str {
        self.workload.as_deref().map_or("", |w| &w.namespace)
    }

    fn canonical(&self) -> &str {
        self.workload.as_deref().map_or("", |w| &w.canonical_name)
    }

    fn spiffe(&self) -> &str {
        self.principal.as_ref().map_or("", proto::SpiffeId::as_str)
    }
}

/// Which end of a connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The client's ztunnel (outbound).
    Source,
    /// The server's ztunnel (inbound).
    Destination,
}

impl Reporter {
    /// The `reporter` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    /// The access log's `direction`.
    fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// Everything an access-log line and the metric labels say about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Which end reports.
    pub reporter: Reporter,
    /// Client address.
    pub src: SocketAddr,
    /// Where the client wanted to go.
    pub dst: SocketAddr,
    /// The client.
    pub source: Peer,
    /// The server.
    pub destination: Peer,
    /// The service, when its VIP was addressed.
    pub service: Option<Arc<Service>>,
    /// Carried over HBONE (mutual TLS).
    pub mtls: bool,
}

impl ConnectionInfo {
    /// The addressed service's hostname, or `""`.
    pub fn service_hostname(&self) -> &str {
        self.service.as_deref().map_or("", |s| &s.hostname)
    }

    fn labels(&self, flags: &'static str) -> Hashed<ConnectionLabels> {
        Hashed::new(ConnectionLabels {
            reporter: self.reporter.as_str(),
            source_workload: or_unknown(self.source.name()),
            source_workload_namespace: or_unknown(self.source.namespace()),
            source_principal: or_unknown(self.source.spiffe()),
            source_canonical_service: or_unknown(self.source.canonical()),
            destination_workload: or_unknown(self.destination.name()),
            destination_workload_namespace: or_unknown(self.destination.namespace()),
            destination_principal: or_unknown(self.destination.spiffe()),
            destination_service: or_unknown(self.service_hostname()),
            destination_canonical_service: or_unknown(self.destination.canonical()),
            request_protocol: "tcp",
            response_flags: flags,
            connection_security_policy: if self.mtls { "mutual_tls" } else { UNKNOWN },
        })
    }
}

/// An open connection, counted; [`close`](Self::close) it exactly once.
#[derive(Debug)]
pub struct ConnectionRecord {
    metrics: Arc<Metrics>,
    /// What is known about it.
    pub info: ConnectionInfo,
    start: Instant,
}

impl ConnectionRecord {
    /// Counts the connection as opened.
    pub fn open(metrics: &Arc<Metrics>, info: ConnectionInfo) -> Self {
        metrics.opened.get_or_create(&info.labels("-")).inc();
        metrics.active.inc();
        ConnectionRecord { metrics: metrics.clone(), info, start: Instant::now() }
    }

    /// Counts the close and the bytes (`received`: client → server, `sent`: server → client) and
    /// writes the access-log line; `detail` says why, when it did not end normally.
    pub fn close(self, outcome: Outcome, received: u64, sent: u64, detail: Option<&str>) {
        let labels = self.info.labels(outcome.flags());
        self.metrics.closed.get_or_create(&labels).inc();
        if received > 0 {
            self.metrics.received.get_or_create(&labels).inc_by(received);
        }
        if sent > 0 {
            self.metrics.sent.get_or_create(&labels).inc_by(sent);
        }
        self.metrics.active.dec();
        let i = &self.info;
        tracing::info!(
            target: "access",
            direction = i.reporter.direction(),
            src.addr = %i.src,
            src.workload = %i.source.name(),
            src.namespace = %i.source.namespace(),
            src.identity = %i.source.spiffe(),
            dst.addr = %i.dst,
            dst.service = %i.service_hostname(),
            dst.workload = %i.destination.name(),
            dst.namespace = %i.destination.namespace(),
            dst.identity = %i.destination.spiffe(),
            mtls = i.mtls,
            outcome = ?outcome,
            detail = detail.unwrap_or(""),
            bytes_recv = received,
            bytes_sent = sent,
            duration = self.start.elapsed().as_millis() as u64,
            "connection complete"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn istio_names_and_labels() {
        let metrics = Arc::new(Metrics::new());
        let info = ConnectionInfo {
            reporter: Reporter::Destination,
            src: "10.0.0.1:4000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            source: Peer::proven(None, Some("spiffe://cluster.local/ns/a/sa/client".parse().unwrap())),
            destination: Peer::of(&Arc::new(
                Workload::from_pb(proto::api::istio::workload::Workload {
                    name: "server".into(),
                    namespace: "b".into(),
                    trust_domain: "cluster.local".into(),
                    service_account: "server".into(),
                    ..Default::default()
                })
                .unwrap(),
            )),
            service: None,
            mtls: true,
        };
        ConnectionRecord::open(&metrics, info.clone()).close(Outcome::Done, 100, 7, None);
        ConnectionRecord::open(&metrics, info).close(Outcome::Denied, 0, 0, Some("policy"));
        let text = metrics.encode();
        let line = |prefix: &str| {
            text.lines().filter(|l| l.starts_with(prefix)).map(str::to_owned).collect::<Vec<_>>().join("\n")
        };
        let opened = line("istio_tcp_connections_opened_total{");
        assert!(opened.contains("reporter=\"destination\""), "{opened}");
        assert!(opened.contains("source_principal=\"spiffe://cluster.local/ns/a/sa/client\""), "{opened}");
        assert!(opened.contains("source_workload=\"unknown\""), "{opened}");
        assert!(opened.contains("connection_security_policy=\"mutual_tls\""), "{opened}");
        assert!(opened.ends_with(" 2"), "{opened}");
        let closed = line("istio_tcp_connections_closed_total{");
        assert!(closed.contains("response_flags=\"DENY\"") && closed.contains("response_flags=\"-\""), "{closed}");
        assert!(line("istio_tcp_received_bytes_total{").ends_with(" 100"), "{text}");
        assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 7"), "{text}");
        assert!(line("ztunnel_active_connections ").ends_with(" 0"), "{text}");
    }
}
