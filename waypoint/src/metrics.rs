//! Metrics with Istio's names and labels (`reporter="waypoint"`), so existing dashboards work:
//! per request `istio_requests_total` and `istio_request_duration_milliseconds`; per TCP stream
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_received_bytes_total` (from the client) and `istio_tcp_sent_bytes_total` (to it).
//! Unknown label values are `unknown`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proto::metrics::Hashed;
use proto::state::Workload;

/// Who talked to whom: the labels the request and TCP families share.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Parties {
    /// The client's workload (from `baggage`, else `unknown`).
    pub source_workload: String,
    /// The client's namespace (from its certificate).
    pub source_workload_namespace: String,
    /// The client's SPIFFE ID (from its certificate).
    pub source_principal: String,
    /// The service addressed (hostname), or `unknown` when a pod was.
    pub destination_service: String,
    /// The service's short name.
    pub destination_service_name: String,
    /// The service's namespace.
    pub destination_service_namespace: String,
    /// The endpoint's workload, `unknown` when none was reached.
    pub destination_workload: String,
    /// The endpoint's namespace.
    pub destination_workload_namespace: String,
    /// The endpoint's SPIFFE ID.
    pub destination_principal: String,
}

impl Parties {
    /// The client of `down` and the service of `destination`; the endpoint is unknown until
    /// [`set_endpoint`](Self::set_endpoint).
    pub(crate) fn new(down: &crate::proxy::Downstream, destination: Option<&crate::target::Destination>) -> Self {
        let unknown = || "unknown".to_owned();
        let (service, name, namespace) = match destination {
            Some(crate::target::Destination::Service(s)) => (s.hostname.clone(), s.name.clone(), s.namespace.clone()),
            _ => (unknown(), unknown(), unknown()),
        };
        Parties {
            source_workload: down.source_workload.clone().unwrap_or_else(unknown),
            source_workload_namespace: down.peer.namespace().to_owned(),
            source_principal: down.peer.as_str().to_owned(),
            destination_service: service,
            destination_service_name: name,
            destination_service_namespace: namespace,
            destination_workload: unknown(),
            destination_workload_namespace: unknown(),
            destination_principal: unknown(),
        }
    }

    /// Names the endpoint reached.
    pub fn set_endpoint(&mut self, w: &Workload) {
        self.destination_workload = w.display_name().to_owned();
        self.destination_workload_namespace = w.namespace.clone();
        self.destination_principal = w.identity.as_str().to_owned();
    }
}

/// Labels of the request families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// Client, service and endpoint.
    #[prometheus(flatten)]
    pub parties: Parties,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The status sent to the client.
    pub response_code: u16,
    /// Envoy-style flags: `-`, `UO` (overflow), `UF` (upstream failure), `UT` (timeout), `NR` (no
    /// route/endpoint), `FI`/`DI` (fault abort/delay), `URX` (retries exhausted), `UAEX`/`RBAC`
    /// (denied by policy).
    pub response_flags: &'static str,
    /// Always `mutual_tls` (a waypoint is reached only over HBONE).
    pub connection_security_policy: &'static str,
}

/// Labels of the TCP families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
    /// Client, service and endpoint.
    #[prometheus(flatten)]
    pub parties: Parties,
    /// Always `tcp`.
    pub request_protocol: &'static str,
    /// `-`, or why the stream was refused: `RBAC` (policy), `UO` (connection limit), `UH` (no
    /// healthy endpoint), `UF` (upstream connection failed), `NR` (nothing at the address).
    pub response_flags: &'static str,
    /// Always `mutual_tls`.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    /// Labels for a stream between `parties`.
    pub fn new(parties: Parties) -> Self {
        TcpLabels {
            reporter: "waypoint",
            parties,
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }
}

/// Label of the dry-run counter: what the request or stream would have met.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
}

/// The waypoint's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests and streams to which dry-run policies applied, by what they would have decided.
    pub dry_run: Family<DryRunLabels, Counter>,
    // Keyed by labels hashed once: each request looks both request families up, each TCP stream
    // all four TCP families.
    requests: Family<Hashed<RequestLabels>, Counter>,
    duration: Family<Hashed<RequestLabels>, Histogram>,
    tcp_opened: Family<Hashed<TcpLabels>, Counter>,
    tcp_closed: Family<Hashed<TcpLabels>, Counter>,
    tcp_received: Family<Hashed<TcpLabels>, Counter>,
    tcp_sent: Family<Hashed<TcpLabels>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the families.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Hashed<RequestLabels>, Counter>::default();
        let duration = Family::<Hashed<RequestLabels>, Histogram>::new_with_constructor(|| {
            Histogram::new([1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0])
        });
        registry.register("istio_requests", "Requests handled by the waypoint", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to its response headers",
            duration.clone(),
        );
        let (tcp_opened, tcp_closed, tcp_received, tcp_sent) =
            (Family::default(), Family::default(), Family::default(), Family::default());
        registry.register(
            "istio_tcp_connections_opened",
            "TCP streams opened through the waypoint",
            tcp_opened.clone(),
        );
        registry.register("istio_tcp_connections_closed", "TCP streams closed (or refused)", tcp_closed.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received from the client", tcp_received.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent to the client", tcp_sent.clone());
        let dry_run = Family::default();
        registry.register(
            "waypoint_dry_run_authorizations",
            "Requests and streams to which dry-run AuthorizationPolicies applied, by the decision they would have made (never enforced)",
            dry_run.clone(),
        );
        proto::metrics::register_log_lines_dropped(&mut registry, "waypoint");
        Metrics { registry, dry_run, requests, duration, tcp_opened, tcp_closed, tcp_received, tcp_sent }
    }

    /// Counts a TCP stream connected to its endpoint.
    pub fn tcp_opened(&self, labels: &Hashed<TcpLabels>) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    /// Counts a TCP stream that ended, with the bytes it moved each way.
    pub fn tcp_closed(&self, labels: &Hashed<TcpLabels>, from_client: u64, to_client: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_received.get_or_create(labels).inc_by(from_client);
        self.tcp_sent.get_or_create(labels).inc_by(to_client);
    }

    /// Counts a TCP stream refused before it reached an endpoint (opened and closed at once,
    /// with the reason in `response_flags`).
    pub fn tcp_refused(&self, labels: &Hashed<TcpLabels>) {
        self.tcp_opened(labels);
        self.tcp_closed(labels, 0, 0);
    }

    /// Counts one request.
    pub fn record(&self, labels: &Hashed<RequestLabels>, millis: f64) {
        self.requests.get_or_create(labels).inc();
        self.duration.get_or_create(labels).observe(millis);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
