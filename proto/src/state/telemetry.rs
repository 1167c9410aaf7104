//! The telemetry a waypoint or gateway applies: the `Telemetry` resources that reach it, merged
//! field by field from the widest scope to the narrowest, as Istio merges its Telemetry API — the
//! mesh's (root namespace, no targets), then its namespace's (no targets), then those whose
//! targets name its Gateway; within one scope the first by name wins.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::ambient::waypoint::v1::{OtlpCollector, Telemetry, policy_target};

/// The share of new traces sampled when a scope names a collector and none names a percentage
/// (Istio's default, `meshConfig.defaultConfig.tracing.sampling`).
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// What a proxy does with its requests' telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Spans reported, and where; `None`: none (context is still propagated).
    pub tracing: Option<Tracing>,
    /// One access-log line per request.
    pub access_log: bool,
}

impl Default for Effective {
    fn default() -> Self {
        Effective { tracing: None, access_log: true }
    }
}

/// Span reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct Tracing {
    /// The OTLP/gRPC collector.
    pub collector: OtlpCollector,
    /// The share of new traces (requests arriving without a sampling decision) sampled, 0–100.
    pub sampling_percent: f64,
}

/// The telemetry of the proxy of Gateway `gateway` in `namespace`, from `all` (by resource name).
pub fn effective(all: &BTreeMap<String, Arc<Telemetry>>, namespace: &str, gateway: &str) -> Effective {
    let targets_me = |t: &Telemetry| {
        t.targets
            .iter()
            .any(|r| r.kind == policy_target::Kind::Gateway as i32 && r.namespace == namespace && r.name == gateway)
    };
    // Widest first; within a scope, name order (a BTreeMap's), the first winning.
    let scopes: [Vec<&Telemetry>; 3] = [
        all.values().map(AsRef::as_ref).filter(|t| t.mesh_wide).collect(),
        all.values()
            .map(AsRef::as_ref)
            .filter(|t| !t.mesh_wide && t.targets.is_empty() && t.namespace == namespace)
            .collect(),
        all.values().map(AsRef::as_ref).filter(|t| !t.mesh_wide && t.namespace == namespace && targets_me(t)).collect(),
    ];
    let mut collector: Option<OtlpCollector> = None;
    let mut percent: Option<f64> = None;
    let mut disabled: Option<bool> = None;
    let mut access_log_disabled: Option<bool> = None;
    for scope in &scopes {
        collector = first(scope, |t| t.tracing.as_ref()?.collector.clone()).or(collector);
        percent = first(scope, |t| t.tracing.as_ref()?.random_sampling_percentage).or(percent);
        disabled = first(scope, |t| t.tracing.as_ref()?.disable_span_reporting).or(disabled);
        access_log_disabled = first(scope, |t| t.access_logging.as_ref()?.disabled).or(access_log_disabled);
    }
    let tracing = match (collector, disabled) {
        (Some(collector), None | Some(false)) => Some(Tracing {
            collector,
            sampling_percent: percent.filter(|p| p.is_finite()).unwrap_or(DEFAULT_SAMPLING_PERCENT).clamp(0.0, 100.0),
        }),
        _ => None,
    };
    Effective { tracing, access_log: access_log_disabled != Some(true) }
}

/// The first of `scope` (name order) that sets what `field` reads.
fn first<T>(scope: &[&Telemetry], field: impl Fn(&Telemetry) -> Option<T>) -> Option<T> {
    scope.iter().find_map(|t| field(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ambient::waypoint::v1::{AccessLogSettings, PolicyTarget, TracingSettings};

    fn telemetry(namespace: &str, name: &str, mesh_wide: bool, gateway: Option<&str>) -> Telemetry {
        Telemetry {
            name: name.into(),
            namespace: namespace.into(),
            mesh_wide,
            targets: gateway
                .map(|g| PolicyTarget {
                    kind: policy_target::Kind::Gateway as i32,
                    namespace: namespace.into(),
                    name: g.into(),
                })
                .into_iter()
                .collect(),
            tracing: None,
            access_logging: None,
        }
    }

    fn collector(name: &str) -> OtlpCollector {
        OtlpCollector { provider: name.into(), service: format!("{name}.observability"), port: 4317 }
    }

    fn all(list: Vec<Telemetry>) -> BTreeMap<String, Arc<Telemetry>> {
        list.into_iter().map(|t| (format!("{}/{}", t.namespace, t.name), Arc::new(t))).collect()
    }

    #[test]
    fn narrower_scopes_override_wider_ones_field_by_field() {
        let mut mesh = telemetry("istio-system", "mesh", true, None);
        mesh.tracing = Some(TracingSettings {
            collector: Some(collector("otel")),
            random_sampling_percentage: Some(5.0),
            disable_span_reporting: None,
        });
        let mut ns = telemetry("shop", "ns", false, None);
        ns.tracing = Some(TracingSettings {
            collector: None,
            random_sampling_percentage: Some(50.0),
            disable_span_reporting: None,
        });
        let mut mine = telemetry("shop", "mine", false, Some("waypoint"));
        mine.access_logging = Some(AccessLogSettings { disabled: Some(true) });
        let mut other = telemetry("shop", "other", false, Some("other-waypoint"));
        other.tracing = Some(TracingSettings {
            collector: None,
            random_sampling_percentage: None,
            disable_span_reporting: Some(true),
        });
        let resources = all(vec![mesh, ns, mine, other]);

        // The mesh's collector, the namespace's percentage, the Gateway's own access-log switch;
        // another Gateway's resource does not apply.
        let e = effective(&resources, "shop", "waypoint");
        assert_eq!(
            e,
            Effective {
                tracing: Some(Tracing { collector: collector("otel"), sampling_percent: 50.0 }),
                access_log: false
            }
        );
        // Another namespace: the mesh's settings only.
        let e = effective(&resources, "web", "waypoint");
        assert_eq!(
            e,
            Effective {
                tracing: Some(Tracing { collector: collector("otel"), sampling_percent: 5.0 }),
                access_log: true
            }
        );
        // The other Gateway turns span reporting off.
        assert_eq!(effective(&resources, "shop", "other-waypoint").tracing, None);
    }

    #[test]
    fn another_namespace_cannot_reach_a_gateway_that_is_not_its_own() {
        // A resource of namespace `evil` whose target names shop's waypoint: the control plane
        // never sends one, and a proxy does not take it either.
        let mut forged = telemetry("evil", "forged", false, None);
        forged.targets = vec![PolicyTarget {
            kind: policy_target::Kind::Gateway as i32,
            namespace: "shop".into(),
            name: "waypoint".into(),
        }];
        forged.access_logging = Some(AccessLogSettings { disabled: Some(true) });
        forged.tracing = Some(TracingSettings { disable_span_reporting: Some(true), ..Default::default() });
        let mut mesh = telemetry("istio-system", "mesh", true, None);
        mesh.tracing = Some(TracingSettings { collector: Some(collector("otel")), ..Default::default() });
        let e = effective(&all(vec![forged, mesh]), "shop", "waypoint");
        assert!(e.access_log);
        assert_eq!(e.tracing.map(|t| t.collector), Some(collector("otel")));
    }

    #[test]
    fn no_collector_no_spans_and_the_default_percentage_is_istios() {
        assert_eq!(effective(&BTreeMap::new(), "shop", "waypoint"), Effective::default());
        let mut mesh = telemetry("istio-system", "mesh", true, None);
        mesh.tracing = Some(TracingSettings { collector: Some(collector("otel")), ..Default::default() });
        let e = effective(&all(vec![mesh]), "shop", "waypoint");
        assert_eq!(e.tracing.unwrap().sampling_percent, DEFAULT_SAMPLING_PERCENT);
    }

    #[test]
    fn within_a_scope_the_first_by_name_wins() {
        let mut a = telemetry("shop", "a", false, None);
        a.tracing = Some(TracingSettings {
            collector: Some(collector("first")),
            random_sampling_percentage: Some(10.0),
            ..Default::default()
        });
        let mut b = telemetry("shop", "b", false, None);
        b.tracing = Some(TracingSettings {
            collector: Some(collector("second")),
            random_sampling_percentage: Some(90.0),
            ..Default::default()
        });
        let e = effective(&all(vec![b, a]), "shop", "waypoint");
        assert_eq!(e.tracing, Some(Tracing { collector: collector("first"), sampling_percent: 10.0 }));
    }
}
