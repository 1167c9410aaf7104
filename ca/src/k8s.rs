//! The Kubernetes objects the mesh reads, and the labels that drive it.
//!
//! Core kinds come from `k8s-openapi`; the Gateway API and Istio security and networking kinds are declared here
//! with the fields the mesh uses (serde skips the rest, so newer objects still load).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Namespace (and pod) label that enrolls workloads in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// `istio.io/dataplane-mode` value that enrolls a namespace.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// `istio.io/dataplane-mode` value that opts a pod (or namespace) out.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Label on a namespace, service or pod naming the waypoint its traffic goes through.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Optional label next to `istio.io/use-waypoint`: the waypoint's namespace, when not the object's.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Label on a waypoint Gateway: which traffic it handles (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The `gatewayClassName` of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// `istio.io/use-waypoint` value meaning "no waypoint, even if the namespace has one".
pub const USE_WAYPOINT_NONE: &str = "none";
/// Annotation that makes an AuthorizationPolicy dry-run (`"true"`): evaluated and logged, never
/// enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Gateway API `Gateway` (gateway.networking.k8s.io/v1). Waypoints are Gateways of class
/// `istio-waypoint`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "Gateway", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// The class; `istio-waypoint` for waypoints.
    pub gateway_class_name: String,
    /// Listeners; a waypoint has an HBONE listener on 15008.
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

/// One listener of a Gateway.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    /// Listener name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol, `HBONE` for waypoints.
    pub protocol: String,
}

/// A reference to a parent (Gateway or Service) or a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// API group; empty for core (Service).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind; `Gateway` for parents, `Service` for backends by default.
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace; defaults to the referring object's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Port (for Service parents and backends).
    #[serde(default)]
    pub port: Option<u16>,
    /// Listener name (for Gateway parents).
    #[serde(default)]
    pub section_name: Option<String>,
}

/// Gateway API `HTTPRoute` (gateway.networking.k8s.io/v1).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "HTTPRoute", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    /// A Service (GAMMA: the route applies to traffic to it) or a waypoint Gateway.
    #[serde(default)]
    pub parent_refs: Vec<ObjectRef>,
    /// Hostnames the route matches (for Gateway parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules, tried in order of match precedence.
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

/// Gateway API `GRPCRoute` (gateway.networking.k8s.io/v1): routes gRPC calls by service and
/// method. Translated as the HTTPRoute it amounts to ([`GRPCRouteSpec::as_http`]): a gRPC call is
/// an HTTP/2 POST to `/<service>/<method>`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "gateway.networking.k8s.io", version = "v1", kind = "GRPCRoute", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    /// A Service (GAMMA) or a waypoint Gateway.
    #[serde(default)]
    pub parent_refs: Vec<ObjectRef>,
    /// Hostnames (for Gateway parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

/// One GRPCRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; an empty list matches every call.
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters (header modifiers, mirror).
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
}

/// A call match: method and headers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    /// Service and/or method.
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    /// Header (metadata) matches.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
}

/// `Exact` (default) or `RegularExpression` on the fully qualified service and the method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    #[serde(default)]
    pub service: Option<String>,
    /// Method, e.g. `SayHello`.
    #[serde(default)]
    pub method: Option<String>,
}

impl GRPCRouteSpec {
    /// The HTTPRoute this route amounts to: a method match becomes a path match on
    /// `/<service>/<method>` (exact when both are given, a prefix `/<service>/` for a service alone,
    /// a regular expression otherwise).
    pub fn as_http(&self) -> Result<HTTPRouteSpec, String> {
        let rules = self
            .rules
            .iter()
            .map(|r| {
                let matches = r
                    .matches
                    .iter()
                    .map(|m| {
                        let path = m.method.as_ref().map(GrpcMethodMatch::as_path).transpose()?;
                        Ok(HttpRouteMatch { path, headers: m.headers.clone(), ..Default::default() })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(HttpRouteRule {
                    name: r.name.clone(),
                    matches,
                    filters: r.filters.clone(),
                    backend_refs: r.backend_refs.clone(),
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(HTTPRouteSpec { parent_refs: self.parent_refs.clone(), hostnames: self.hostnames.clone(), rules })
    }
}

impl GrpcMethodMatch {
    fn as_path(&self) -> Result<HttpPathMatch, String> {
        let (service, method) = (self.service.as_deref(), self.method.as_deref());
        let path = |kind: &str, value: String| HttpPathMatch { kind: Some(kind.into()), value: Some(value) };
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        match self.kind.as_deref() {
            None | Some("Exact") => {
                for part in [service, method].into_iter().flatten() {
                    if !valid(part) {
                        return Err(format!("gRPC method match {part:?} is empty or contains '/'"));
                    }
                }
                match (service, method) {
                    (Some(s), Some(m)) => Ok(path("Exact", format!("/{s}/{m}"))),
                    (Some(s), None) => Ok(path("PathPrefix", format!("/{s}"))),
                    (None, Some(m)) => Ok(path("RegularExpression", format!("/[^/]+/{}", regex_syntax::escape(m)))),
                    (None, None) => Err("a gRPC method match needs a service or a method".into()),
                }
            }
            Some("RegularExpression") => {
                let s = service.unwrap_or("[^/]+");
                let m = method.unwrap_or("[^/]+");
                Ok(path("RegularExpression", format!("/({s})/({m})")))
            }
            Some(other) => Err(format!("gRPC method match type {other:?} is not Exact or RegularExpression")),
        }
    }
}

/// One HTTPRoute rule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    /// Optional rule name.
    #[serde(default)]
    pub name: Option<String>,
    /// Alternatives; an empty list matches every request (prefix `/`).
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters applied to matching requests.
    #[serde(default)]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries (Gateway API experimental `retry`).
    #[serde(default)]
    pub retry: Option<HttpRouteRetry>,
}

/// A request match: all set fields must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    /// Path match.
    #[serde(default)]
    pub path: Option<HttpPathMatch>,
    /// Header matches.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameter matches.
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    /// Method.
    #[serde(default)]
    pub method: Option<String>,
}

/// Path match: `Exact`, `PathPrefix` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPathMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Value; defaults to `/`.
    #[serde(default)]
    pub value: Option<String>,
}

/// Header or query-parameter match: `Exact` (default) or `RegularExpression`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpValueMatch {
    /// Match type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Header or parameter name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// HTTPRoute filter (the core and extended kinds a waypoint implements).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`, `RequestMirror`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier`.
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<serde_json::Value>,
    /// For `URLRewrite`.
    #[serde(default, rename = "urlRewrite")]
    pub url_rewrite: Option<serde_json::Value>,
    /// For `RequestMirror`.
    #[serde(default)]
    pub request_mirror: Option<serde_json::Value>,
}

/// Header edits.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Headers to set (replace).
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Headers to add (append).
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A weighted backend.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpBackendRef {
    /// The backend (a Service by default).
    #[serde(flatten)]
    pub target: ObjectRef,
    /// Relative weight; defaults to 1.
    #[serde(default)]
    pub weight: Option<u32>,
}

/// Timeouts, as Gateway API durations (`10s`, `500ms`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteTimeouts {
    /// Whole request, including retries.
    #[serde(default)]
    pub request: Option<String>,
    /// Each attempt to a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Retry policy (Gateway API GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRetry {
    /// Status codes that are retried.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Maximum attempts after the first.
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Base backoff, a duration.
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Istio `AuthorizationPolicy` (security.istio.io/v1).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "security.istio.io", version = "v1", kind = "AuthorizationPolicy", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// Workloads (pods) the policy applies to; none means the whole namespace.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// A single target (Gateway or Service): the policy is for the waypoint.
    #[serde(default)]
    pub target_ref: Option<ObjectRef>,
    /// Targets (Gateways or Services): the policy is for the waypoint.
    #[serde(default)]
    pub target_refs: Vec<ObjectRef>,
    /// `ALLOW` (default), `DENY`, `AUDIT` or `CUSTOM`.
    #[serde(default)]
    pub action: Option<String>,
    /// Rules; a request matches the policy if any rule matches.
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
    /// Why the spec could not be decoded at all, when it could not: the policy fails closed.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// Label selector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a pod must all carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// One rule: every set part (from, to, when) must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    /// Sources; any may match.
    #[serde(default)]
    pub from: Vec<AuthzFrom>,
    /// Operations; any may match.
    #[serde(default)]
    pub to: Vec<AuthzTo>,
    /// Conditions; all must match.
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `from` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzFrom {
    /// The source.
    #[serde(default)]
    pub source: AuthzSource,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A source: set fields must all hold; values within a field are alternatives.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSource {
    /// Peer identities, `<td>/ns/<ns>/sa/<sa>` (wildcards `*` at either end).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Negated principals.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Request (JWT) principals: L7.
    #[serde(default)]
    pub request_principals: Vec<String>,
    /// Negated request principals: L7.
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    /// Peer namespaces.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Negated namespaces.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Peer IPs or CIDRs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    /// Negated IP blocks.
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs (from headers): L7.
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    /// Negated remote IP blocks: L7.
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Peer service accounts, `<namespace>/<name>` (from the peer's certificate; no wildcards).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Negated service accounts.
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzTo {
    /// The operation.
    #[serde(default)]
    pub operation: AuthzOperation,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// An operation: set fields must all hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzOperation {
    /// Destination ports (Istio writes them as strings; a YAML number is read as its digits).
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub ports: Vec<String>,
    /// Negated ports.
    #[serde(default, deserialize_with = "strings_or_numbers")]
    pub not_ports: Vec<String>,
    /// Hosts: L7.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Negated hosts: L7.
    #[serde(default)]
    pub not_hosts: Vec<String>,
    /// Methods: L7.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Negated methods: L7.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths: L7.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Negated paths: L7.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A `when` condition on an attribute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzCondition {
    /// Attribute, e.g. `source.ip`, `request.headers[x-token]`.
    pub key: String,
    /// Accepted values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Rejected values.
    #[serde(default)]
    pub not_values: Vec<String>,
    /// Fields this mesh does not read (a typo, or a field of a newer Istio). They are never
    /// ignored silently: the policy fails closed and the CA reports them.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A list of strings in which a YAML number stands for its decimal digits (`ports: [80]`).
fn strings_or_numbers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        String(String),
        Number(serde_json::Number),
    }
    let items = Vec::<Item>::deserialize(d)?;
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::String(s) => s,
            Item::Number(n) => n.to_string(),
        })
        .collect())
}

/// Istio `PeerAuthentication` (security.istio.io/v1).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "security.istio.io", version = "v1", kind = "PeerAuthentication", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; none means the namespace (or the mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Mutual TLS mode.
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
    /// Per-port overrides.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// mTLS mode: `UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerMtls {
    /// The mode.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Istio `RequestAuthentication` (security.istio.io/v1): which JWTs a waypoint accepts. A request
/// with a token that fails validation is refused (401); one without a token is anonymous.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "security.istio.io", version = "v1", kind = "RequestAuthentication", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Workloads (sidecar mode); in ambient mode JWTs are checked by waypoints, through targetRefs.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// A single target (Gateway or Service).
    #[serde(default)]
    pub target_ref: Option<ObjectRef>,
    /// Targets (Gateways or Services).
    #[serde(default)]
    pub target_refs: Vec<ObjectRef>,
    /// One rule per accepted issuer.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
    /// Fields this mesh does not read: reported, and the policy fails closed (every token refused).
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
    /// Why the spec could not be decoded at all, when it could not: the policy fails closed.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// How tokens of one issuer are found and checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// Required `iss`.
    #[serde(default)]
    pub issuer: String,
    /// Accepted `aud` values; empty: any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the control plane fetches the keys (HTTPS).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// The keys, inline (a JWKS document); takes precedence over `jwksUri`.
    #[serde(default)]
    pub jwks: Option<String>,
    /// Headers the token is read from; with neither this nor `fromParams`,
    /// `Authorization: Bearer <token>` and the `access_token` query parameter.
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters the token is read from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Cookies the token is read from.
    #[serde(default)]
    pub from_cookies: Vec<String>,
    /// A header that receives the verified payload (base64url JSON).
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the request sent on (default: removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims copied to request headers.
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Fetch timeout for `jwksUri` (a duration such as `5s`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Fields this mesh does not read.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A header a token is read from, with the text before it (such as `Bearer `).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JwtHeader {
    /// Header name.
    #[serde(default)]
    pub name: String,
    /// Prefix stripped from the value.
    #[serde(default)]
    pub prefix: String,
    /// Fields this mesh does not read.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A claim copied to a header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClaimToHeader {
    /// Header name.
    #[serde(default)]
    pub header: String,
    /// Claim name (`a.b` for a nested claim).
    #[serde(default)]
    pub claim: String,
    /// Fields this mesh does not read.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// Labels of an object, or an empty map.
pub fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&EMPTY)
}

/// A label's value.
pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Namespace and name of a namespaced object (empty strings when missing; validation rejects those).
pub fn ns_name(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

/// Whether `selector` selects an object with `labels` (an empty selector selects everything).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
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

#[cfg(test)]
mod grpc_route_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn path_of(kind: Option<&str>, service: Option<&str>, method: Option<&str>) -> Result<(String, String), String> {
        let m = GrpcMethodMatch {
            kind: kind.map(str::to_owned),
            service: service.map(str::to_owned),
            method: method.map(str::to_owned),
        };
        let spec = GRPCRouteSpec {
            rules: vec![GrpcRouteRule {
                matches: vec![GrpcRouteMatch { method: Some(m), headers: vec![] }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let http = spec.as_http()?;
        let p = http.rules[0].matches[0].path.clone().unwrap();
        Ok((p.kind.unwrap(), p.value.unwrap()))
    }

    #[test]
    fn a_method_match_is_the_path_of_the_call() {
        let s = |a: &str, b: &str| Ok((a.to_owned(), b.to_owned()));
        assert_eq!(path_of(None, Some("demo.Greeter"), Some("SayHello")), s("Exact", "/demo.Greeter/SayHello"));
        assert_eq!(path_of(Some("Exact"), Some("demo.Greeter"), None), s("PathPrefix", "/demo.Greeter"));
        assert_eq!(path_of(None, None, Some("Say.Hello")), s("RegularExpression", "/[^/]+/Say\\.Hello"));
        assert_eq!(
            path_of(Some("RegularExpression"), Some("demo\\..*"), None),
            s("RegularExpression", "/(demo\\..*)/([^/]+)")
        );
        assert!(path_of(None, None, None).is_err());
        assert!(path_of(None, Some("a/b"), Some("M")).is_err());
        assert!(path_of(Some("Prefix"), Some("a"), None).is_err());
    }

    #[test]
    fn a_grpcroute_from_yaml_keeps_parents_headers_filters_and_backends() {
        let route: GRPCRoute = serde_norway::from_str(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: demo}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: greeter, port: 90}]\n  rules:\n    - matches:\n        - method: {service: demo.Greeter, method: SayHello}\n          headers: [{name: x-user, value: ann}]\n      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}]\n      backendRefs: [{name: greeter-new, port: 90, weight: 3}]\n",
        )
        .unwrap();
        let http = route.spec.as_http().unwrap();
        assert_eq!(http.parent_refs, route.spec.parent_refs);
        let rule = &http.rules[0];
        assert_eq!(rule.matches[0].headers[0].name, "x-user");
        assert_eq!(rule.filters[0].kind, "RequestHeaderModifier");
        assert_eq!(rule.backend_refs[0].weight, Some(3));
        assert_eq!(rule.backend_refs[0].target.name, "greeter-new");
    }
}
