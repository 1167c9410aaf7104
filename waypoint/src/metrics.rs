//! Request metrics with Istio's names and labels (`reporter="waypoint"`), so existing dashboards
//! work: `istio_requests_total` and `istio_request_duration_milliseconds`. Unknown label values
//! are `unknown`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the request families.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `waypoint`.
    pub reporter: &'static str,
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

/// The waypoint's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
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
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0])
        });
        registry.register("istio_requests", "Requests handled by the waypoint", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to its response headers",
            duration.clone(),
        );
        Metrics { registry, requests, duration }
    }

    /// Counts one request.
    pub fn record(&self, labels: &RequestLabels, millis: f64) {
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
