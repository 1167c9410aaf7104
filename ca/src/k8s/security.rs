//! Istio security kinds (security.istio.io/v1): `AuthorizationPolicy`, `PeerAuthentication`,
//! `RequestAuthentication`.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::gateway::ObjectRef;

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
