//! The Kubernetes objects the mesh reads, and the labels that drive it.
//!
//! Core kinds come from `k8s-openapi`; the Gateway API and Istio security and networking kinds are declared here
//! with the fields the mesh uses (serde skips the rest, so newer objects still load), one file per
//! API group: `gateway` (gateway.networking.k8s.io), `security` (security.istio.io), `networking`
//! (networking.istio.io).

mod gateway;
mod networking;
mod security;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use self::gateway::*;
pub use self::networking::*;
pub use self::security::*;
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
