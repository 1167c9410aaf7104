//! telemetry.istio.io: `Telemetry` (v1; v1alpha1 decodes the same), the tracing and access-log
//! settings of the mesh, a namespace or a waypoint/gateway (`targetRefs` naming its Gateway).

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

use super::{ObjectRef, WorkloadSelector};

/// Istio `Telemetry`: which tracing provider receives spans and at what sampling rate, and
/// whether requests are access-logged, for the scope it applies to (the mesh from the root
/// namespace, else its namespace, narrowed by `targetRefs`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(group = "telemetry.istio.io", version = "v1", kind = "Telemetry", namespaced, schema = "disabled")]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// Workloads by label (sidecars and node proxies); waypoints and gateways are named by
    /// `targetRefs`.
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// A single target.
    #[serde(default)]
    pub target_ref: Option<ObjectRef>,
    /// Targets (Gateways).
    #[serde(default)]
    pub target_refs: Vec<ObjectRef>,
    /// Tracing settings; the first entry is the one used.
    #[serde(default)]
    pub tracing: Vec<TracingConfig>,
    /// Access-log settings; the first entry is the one used.
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
    /// Metrics overrides (not read; reported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<serde_json::Value>,
    /// Fields this mesh does not read: reported.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A provider, named as in the mesh config's `extensionProviders`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderRef {
    /// Its name.
    pub name: String,
}

/// `tracing[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TracingConfig {
    /// Where spans go; the first is used.
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// Share of new traces sampled, 0 to 100.
    #[serde(default)]
    pub random_sampling_percentage: Option<f64>,
    /// Spans not reported (context still propagated).
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    /// Fields this mesh does not read (`match`, `customTags`, ...): reported.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `accessLogging[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessLogging {
    /// Where lines go (this mesh writes them to the proxy's log; the names are not read).
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    /// No access log.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Fields this mesh does not read (`match`, `filter`): reported.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}
