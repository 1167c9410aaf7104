//! The CA's Prometheus metrics, served on the admin HTTP port at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of a refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Short reason, e.g. `invalid_token`, `pod_not_on_node`, `weak_key`.
    pub reason: String,
}

/// The CA's metrics.
#[derive(Debug)]
pub struct CaMetrics {
    registry: Registry,
    /// Certificate requests received.
    pub requests: Counter,
    /// Certificates issued.
    pub issued: Counter,
    /// Requests refused, by reason.
    pub refused: Family<Reason, Counter>,
    /// Time to check and sign a request (authentication excluded), seconds.
    pub signing: Histogram,
    /// Expiry of the signing intermediate, Unix seconds.
    pub signer_expiry: Gauge,
    /// xDS streams open.
    pub xds_clients: Gauge,
    /// Configuration problems currently reported at `/debug/config_errors`.
    pub config_errors: Gauge,
    /// Connections to the gRPC port closed because it was at its limit.
    pub connections_refused: Counter,
}

impl Default for CaMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CaMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Counter::default();
        let issued = Counter::default();
        let refused = Family::<Reason, Counter>::default();
        let signing = Histogram::new(exponential_buckets(0.000_125, 2.0, 14));
        let signer_expiry = Gauge::default();
        let xds_clients = Gauge::default();
        let config_errors = Gauge::default();
        let connections_refused = Counter::default();
        registry.register(
            "ca_grpc_connections_refused",
            "Connections to the gRPC port closed because it had its maximum open",
            connections_refused.clone(),
        );
        registry.register("ca_certificate_requests", "Certificate signing requests received", requests.clone());
        registry.register("ca_certificates_issued", "Certificates issued", issued.clone());
        registry.register(
            "ca_certificate_requests_refused",
            "Certificate requests refused, by reason",
            refused.clone(),
        );
        registry.register(
            "ca_signing_duration_seconds",
            "Time to check a CSR, sign it and record it in the issuance log",
            signing.clone(),
        );
        registry.register(
            "ca_signer_expiry_timestamp_seconds",
            "When the intermediate that signs workload certificates expires",
            signer_expiry.clone(),
        );
        registry.register("ca_xds_clients", "Proxies connected to the xDS stream", xds_clients.clone());
        registry.register(
            "ca_config_errors",
            "Configuration problems reported at /debug/config_errors (invalid objects, policies that fail closed)",
            config_errors.clone(),
        );
        proto::metrics::register_log_lines_dropped(&mut registry, "ca");
        CaMetrics {
            registry,
            requests,
            issued,
            refused,
            signing,
            signer_expiry,
            xds_clients,
            config_errors,
            connections_refused,
        }
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &str) {
        self.refused.get_or_create(&Reason { reason: reason.to_owned() }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
