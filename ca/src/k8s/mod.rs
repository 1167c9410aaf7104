//! The Kubernetes objects the mesh reads, and the labels that drive it.
//!
//! Core kinds come from `k8s-openapi`; the Gateway API and Istio security and networking kinds are declared here
//! with the fields the mesh uses (serde skips the rest, so newer objects still load), one file per
//! API group: `gateway` (gateway.networking.k8s.io), `security` (security.istio.io), `networking`
//! (networking.istio.io), `telemetry` (telemetry.istio.io).

mod gateway;
mod networking;
mod security;
mod telemetry;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use self::gateway::*;
pub use self::networking::*;
pub use self::security::*;
pub use self::telemetry::*;
pub use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The labels and annotations that drive the mesh (Istio's names).
pub use proto::labels::*;
/// Labels of an object, or an empty map.
pub fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    meta.labels.as_ref().unwrap_or(&EMPTY)
}

/// A label's value.
pub fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// The ConfigMap holding the mesh configuration (in the root namespace), and its key.
pub const MESH_CONFIG_MAP: (&str, &str) = ("istio", "mesh");

/// The Secret type gateways' credentials have.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Value `key` of a Secret: from `data`, else `stringData` (as the API server would merge them).
pub fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.0.clone());
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).map(|v| v.as_bytes().to_vec())
}

/// Namespace and name of a namespaced object (empty strings when missing; validation rejects those).
pub fn ns_name(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

/// Whether `selector` selects an object with `labels` (an empty selector selects everything).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
