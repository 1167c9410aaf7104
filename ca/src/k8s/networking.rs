//! Istio networking kinds (networking.istio.io/v1): `Gateway`, `VirtualService`, `DestinationRule`.

use std::collections::BTreeMap;

use kube::CustomResource;
pub use proto::api::ambient::waypoint::v1::gateway_server::Protocol as GatewayProtocol;
pub use proto::api::ambient::waypoint::v1::gateway_tls::Mode as GatewayTlsMode;
use serde::{Deserialize, Serialize};

/// Istio `Gateway` (networking.istio.io/v1; v1beta1 and v1alpha3 decode the same): the servers
/// (ports, protocols, hosts, TLS) that the gateway proxies whose pod labels match `selector`
/// expose at the edge. VirtualServices naming it in `gateways:` route what arrives there.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "Gateway",
    root = "IstioGateway",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct IstioGatewaySpec {
    /// Pod labels of the gateway proxies that serve it (e.g. `istio: ingressgateway`); empty
    /// selects every gateway proxy, as in Istio.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// What is exposed.
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
}

/// One server of an Istio `Gateway`: a port, the hosts served on it and its TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServer {
    /// The port the proxy listens on.
    pub port: GatewayPort,
    /// Hosts served, `[namespace/]host`; `*` and a leading `*.` are wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// TLS settings (HTTPS and TLS ports; `httpsRedirect` on HTTP ones).
    #[serde(default)]
    pub tls: Option<GatewayTls>,
    /// Optional name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A server's port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPort {
    /// The port number.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `HTTP2`, `GRPC`, `TLS` or `TCP` (case-insensitive).
    pub protocol: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
}

/// A server's TLS settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTls {
    /// On an HTTP server: answer every request with a redirect to https.
    #[serde(default)]
    pub https_redirect: bool,
    /// `SIMPLE` (terminate), `MUTUAL` (terminate, require a client certificate), `PASSTHROUGH`
    /// (route by SNI without terminating); others are refused.
    #[serde(default)]
    pub mode: Option<String>,
    /// The Secret (in the gateway proxy's namespace) holding `tls.crt`/`tls.key` (and `ca.crt`
    /// for MUTUAL, or a `<name>-cacert` Secret).
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Client certificate SANs accepted (MUTUAL); empty: any the CA bundle verifies.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

impl GatewayPort {
    /// The protocol as the proxies know it; `None` for a name Istio does not define.
    pub fn protocol(&self) -> Option<GatewayProtocol> {
        GatewayProtocol::from_str_name(&self.protocol.to_ascii_uppercase())
            .filter(|p| *p != GatewayProtocol::Unspecified)
    }
}

impl GatewayTls {
    /// The mode as the proxies know it: SIMPLE, MUTUAL or PASSTHROUGH; `None` when unset or
    /// another (Istio's ISTIO_MUTUAL, AUTO_PASSTHROUGH, OPTIONAL_MUTUAL are not served).
    pub fn mode(&self) -> Option<GatewayTlsMode> {
        let mode = GatewayTlsMode::from_str_name(&self.mode.as_deref()?.to_ascii_uppercase())?;
        (mode != GatewayTlsMode::None).then_some(mode)
    }
}

/// A server host's namespace part (`*` when it has none) and host part.
pub fn split_server_host(host: &str) -> (&str, &str) {
    host.split_once('/').unwrap_or(("*", host))
}

/// Istio `VirtualService` (networking.istio.io/v1; v1beta1 and v1alpha3 decode the same): HTTP
/// routes for the hosts it names, tried in order (the first matching `http` entry wins).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "networking.istio.io", version = "v1", kind = "VirtualService", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts: a short service name (in the VirtualService's namespace), `name.namespace`, or a
    /// full `name.namespace.svc.<suffix>`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Where it applies: empty or containing `mesh` means traffic inside the mesh.
    #[serde(default)]
    pub gateways: Vec<String>,
    /// HTTP routes, in order.
    #[serde(default)]
    pub http: Vec<VsHttpRoute>,
    /// TLS routes (by SNI, the stream not opened), in order: for a gateway's PASSTHROUGH servers.
    #[serde(default)]
    pub tls: Vec<VsTlsRoute>,
}

/// One `tls` entry of a VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsTlsRoute {
    /// Alternatives (at least one).
    #[serde(default, rename = "match")]
    pub matches: Vec<VsTlsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
}

/// A `tls` entry's match: the SNI and, optionally, the port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsTlsMatch {
    /// SNI names (required).
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    /// The gateway port.
    #[serde(default)]
    pub port: Option<u32>,
}

/// One `http` entry of a VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsHttpRoute {
    /// Optional name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; none matches every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<VsMatch>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<VsRouteDestination>,
    /// Redirect instead of routing (`uri`, `authority`, `scheme`, `port`, `redirectCode`).
    #[serde(default)]
    pub redirect: Option<serde_json::Value>,
    /// Rewrite before routing (`uri`: the matched prefix, `authority`).
    #[serde(default)]
    pub rewrite: Option<VsRewrite>,
    /// Total time for the request, e.g. `5s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Retry policy.
    #[serde(default)]
    pub retries: Option<VsRetries>,
    /// Fault injection.
    #[serde(default)]
    pub fault: Option<VsFault>,
    /// A destination that also gets a copy of each request.
    #[serde(default)]
    pub mirror: Option<VsDestination>,
    /// Share of requests mirrored (default: all).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// The same as a whole number (deprecated in Istio, still read).
    #[serde(default)]
    pub mirror_percent: Option<u32>,
    /// Header changes.
    #[serde(default)]
    pub headers: Option<VsHeaders>,
}

/// Istio string match: one of `exact`, `prefix`, `regex`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StringMatch {
    /// Exact value.
    #[serde(default)]
    pub exact: Option<String>,
    /// Prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// RE2 regular expression (whole value).
    #[serde(default)]
    pub regex: Option<String>,
}

/// A VirtualService match: all set fields must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsMatch {
    /// Path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// Headers by (lower-case) name.
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Query parameters by name.
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<StringMatch>,
}

/// A destination with its weight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRouteDestination {
    /// Where.
    pub destination: VsDestination,
    /// Share of traffic (all weights of a route add up to 100; one destination may omit it).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A service (and optionally one of its DestinationRule subsets and a port).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsDestination {
    /// Service host, resolved like `hosts`.
    pub host: String,
    /// DestinationRule subset name.
    #[serde(default)]
    pub subset: Option<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// A port by number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortSelector {
    /// Port number.
    #[serde(default)]
    pub number: Option<u32>,
}

/// Rewrite of a VirtualService route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VsRewrite {
    /// Replaces the matched path prefix (or the whole path for an exact match).
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the Host header.
    #[serde(default)]
    pub authority: Option<String>,
}

/// Retry policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsRetries {
    /// Retries after the first try.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Time allowed per try.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    /// Comma-separated conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`,
    /// `retriable-4xx`, or status codes.
    #[serde(default)]
    pub retry_on: Option<String>,
}

/// Fault injection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VsFault {
    /// Delay a share of requests.
    #[serde(default)]
    pub delay: Option<VsDelay>,
    /// Abort a share of requests.
    #[serde(default)]
    pub abort: Option<VsAbort>,
}

/// A share of requests, in percent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percent {
    /// 0–100.
    #[serde(default)]
    pub value: f64,
}

/// Delay fault.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsDelay {
    /// Share delayed (absent: all).
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// The delay, e.g. `10s`.
    #[serde(default)]
    pub fixed_delay: Option<String>,
}

/// Abort fault.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VsAbort {
    /// Share aborted (absent: all).
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Status answered.
    #[serde(default)]
    pub http_status: Option<u32>,
}

/// Header changes for requests and responses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VsHeaders {
    /// On the request.
    #[serde(default)]
    pub request: Option<VsHeaderOps>,
    /// On the response.
    #[serde(default)]
    pub response: Option<VsHeaderOps>,
}

/// Set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VsHeaderOps {
    /// Replace.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Istio `DestinationRule` (networking.istio.io/v1): subsets of a service by pod labels, and
/// the traffic policy for requests to it.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "networking.istio.io", version = "v1", kind = "DestinationRule", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The service, resolved like a VirtualService host.
    pub host: String,
    /// Policy for every request to the service.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets.
    #[serde(default)]
    pub subsets: Vec<DrSubset>,
}

/// A named subset of a service's pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrSubset {
    /// Name, used by VirtualService destinations.
    pub name: String,
    /// Pod labels that select the subset.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The subset's own policy: each of its fields replaces the rule's.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Load balancing, connection pool and outlier detection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// `simple`: `ROUND_ROBIN` (default), `LEAST_REQUEST`, `RANDOM`.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Limits (a circuit breaker).
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// TLS originated to the endpoints.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Per-port settings (only `tls` is taken from them).
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// A DestinationRule's `tls`: how a proxy speaks TLS to the endpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// `DISABLE` (default), `SIMPLE`, `MUTUAL` or `ISTIO_MUTUAL`.
    #[serde(default)]
    pub mode: Option<String>,
    /// SNI (default: the destination's hostname).
    #[serde(default)]
    pub sni: Option<String>,
    /// Names the endpoint's certificate may carry (default: the SNI name).
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// A file in the proxy holding the roots.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// A Secret in the rule's namespace whose `ca.crt` holds the roots.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Accept any certificate.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    /// MUTUAL: the client certificate file (not supported).
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// MUTUAL: its key file (not supported).
    #[serde(default)]
    pub private_key: Option<String>,
}

/// Settings for one port of the destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The service port.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// TLS originated on it.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// Load balancer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadBalancerSettings {
    /// The algorithm.
    #[serde(default)]
    pub simple: Option<String>,
}

/// Connection pool limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    #[serde(default)]
    pub tcp: Option<TcpPoolSettings>,
    /// HTTP limits.
    #[serde(default)]
    pub http: Option<HttpPoolSettings>,
}

/// TCP limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPoolSettings {
    /// Connections to the service at most.
    #[serde(default)]
    pub max_connections: Option<u32>,
}

/// HTTP limits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPoolSettings {
    /// Requests waiting for a connection at most.
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    /// Requests in flight at most.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    /// Requests per connection (1 disables keep-alive).
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
}

/// Outlier detection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (including connection failures) that eject an endpoint.
    #[serde(default)]
    pub consecutive_5xx_errors: Option<u32>,
    /// Consecutive 502/503/504 answers that eject an endpoint.
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reviewed (ejections end on time regardless).
    #[serde(default)]
    pub interval: Option<String>,
    /// First ejection's length; each later one is longer by as much.
    #[serde(default)]
    pub base_ejection_time: Option<String>,
    /// Share of the endpoints that may be ejected at once (at least one always may).
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

/// Istio `ServiceEntry` (networking.istio.io/v1; v1beta1 and v1alpha3 decode the same): hosts
/// added to the mesh's registry, outside it (`MESH_EXTERNAL`) or inside (`MESH_INTERNAL`, its
/// endpoints possibly pods picked by `workloadSelector`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "networking.istio.io", version = "v1", kind = "ServiceEntry", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Hostnames (a leading `*.` wildcard is refused: ambient needs one name per service).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Virtual IPs (single addresses; `/32` and `/128` CIDRs are taken as addresses).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    /// `MESH_EXTERNAL` (default) or `MESH_INTERNAL`.
    #[serde(default)]
    pub location: Option<String>,
    /// `NONE` (default), `STATIC`, `DNS` or `DNS_ROUND_ROBIN`.
    #[serde(default)]
    pub resolution: Option<String>,
    /// Explicit endpoints.
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Pods (in the ServiceEntry's namespace) that are its endpoints.
    #[serde(default)]
    pub workload_selector: Option<EntrySelector>,
}

/// A ServiceEntry port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryPort {
    /// The port clients use.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `HTTP2`, `GRPC`, `TLS`, `TCP`, ...
    #[serde(default)]
    pub protocol: Option<String>,
    /// Its name (endpoints' `ports` map refers to it).
    #[serde(default)]
    pub name: String,
    /// The port endpoints serve it on (default: `number`).
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// An endpoint of a ServiceEntry (Istio's `WorkloadEntry` spec).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// An IP address, or a DNS name (with `resolution: DNS`).
    #[serde(default)]
    pub address: String,
    /// Port name → the endpoint's port for it.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels (subsets).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its service account (in the ServiceEntry's namespace).
    #[serde(default)]
    pub service_account: Option<String>,
}

/// Pod labels picking workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntrySelector {
    /// Labels every picked pod carries.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A ServiceEntry's `resolution`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Connections go to the address the client dialed.
    None,
    /// To the endpoints' IP addresses.
    Static,
    /// To what the endpoints' names (or the hosts) resolve to.
    Dns,
}

/// A ServiceEntry's `location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Outside the mesh: endpoints are reached in plaintext (or TLS the app or a waypoint adds).
    External,
    /// Inside: endpoints are mesh workloads.
    Internal,
}

impl ServiceEntrySpec {
    /// The resolution, or why it is not one this mesh knows.
    pub fn resolution(&self) -> Result<Resolution, String> {
        match self.resolution.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("NONE") => Ok(Resolution::None),
            Some("STATIC") => Ok(Resolution::Static),
            Some("DNS" | "DNS_ROUND_ROBIN") => Ok(Resolution::Dns),
            Some(other) => Err(format!("resolution {other:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN")),
        }
    }

    /// The location, or why it is not one this mesh knows.
    pub fn location(&self) -> Result<Location, String> {
        match self.location.as_deref().map(str::to_ascii_uppercase).as_deref() {
            None | Some("MESH_EXTERNAL") => Ok(Location::External),
            Some("MESH_INTERNAL") => Ok(Location::Internal),
            Some(other) => Err(format!("location {other:?} is not MESH_EXTERNAL or MESH_INTERNAL")),
        }
    }
}
