//! Istio's Telemetry API for waypoints and gateways: each `Telemetry` becomes one
//! `ambient.waypoint.v1.Telemetry` with its scope (the mesh from the root namespace, else its
//! namespace, narrowed to the Gateways its `targetRefs` name) and its tracing provider resolved
//! against the mesh config's `extensionProviders`. Proxies merge the ones that reach them
//! (`proto::state::telemetry::effective`).
//!
//! What this mesh does not carry out is reported and left out rather than half applied: a
//! `selector` (it names sidecars and node proxies, not waypoints), targets of another kind than
//! Gateway, a provider that is not an OpenTelemetry one, `metrics` overrides, and fields it does
//! not read (`match`, `customTags`, `filter`).

use std::collections::BTreeMap;

use proto::api::ambient::waypoint::v1 as pb;

use crate::k8s;
use crate::objects::Objects;
use crate::translate::MeshConfig;
use crate::validate::{self, ExtensionProvider};

/// The Telemetry resources by `<namespace>/<name>`, and what was left out of them.
pub(super) fn translate(objects: &Objects, config: &MeshConfig) -> (BTreeMap<String, pb::Telemetry>, Vec<String>) {
    let (config_map, _) = k8s::MESH_CONFIG_MAP;
    let providers = objects
        .config_map(&config.root_namespace, config_map)
        .and_then(|cm| validate::extension_providers(cm).ok())
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    for t in objects.telemetries() {
        let (ns, name) = k8s::ns_name(&t.metadata);
        let what = format!("Telemetry {ns}/{name}");
        let spec = &t.spec;
        if spec.selector.is_some() {
            warnings.push(format!(
                "{what}: selector names sidecars and node proxies; waypoints and gateways are named by targetRefs (left out)"
            ));
            continue;
        }
        let refs: Vec<&k8s::ObjectRef> = spec.target_ref.iter().chain(&spec.target_refs).collect();
        let mut targets = Vec::new();
        for r in &refs {
            let kind = r.kind.as_deref().unwrap_or_default();
            let group = r.group.as_deref().unwrap_or_default();
            if kind == "Gateway" && group == "gateway.networking.k8s.io" {
                targets.push(pb::PolicyTarget {
                    kind: pb::policy_target::Kind::Gateway as i32,
                    namespace: ns.to_owned(),
                    name: r.name.clone(),
                });
            } else {
                warnings.push(format!(
                    "{what}: targetRefs {group}/{kind} {} is not a Gateway; only waypoints and gateways read Telemetry here",
                    r.name
                ));
            }
        }
        if !refs.is_empty() && targets.is_empty() {
            continue;
        }
        for (field, value) in &spec.unknown {
            warnings.push(format!("{what}: {field} is not read (value {value})"));
        }
        if !spec.metrics.is_empty() {
            warnings
                .push(format!("{what}: metrics overrides are not read; the proxies report Istio's standard metrics"));
        }
        let tracing = spec.tracing.first().map(|tr| {
            for field in tr.unknown.keys() {
                warnings.push(format!("{what}: tracing[0].{field} is not read"));
            }
            let collector = tr.providers.first().and_then(|p| match providers.get(&p.name) {
                Some(ExtensionProvider::OpenTelemetry { service, port }) => Some(pb::OtlpCollector {
                    provider: p.name.clone(),
                    service: service.clone(),
                    port: u32::from(*port),
                }),
                Some(ExtensionProvider::Other(kind)) => {
                    warnings.push(format!(
                        "{what}: provider {:?} is of kind {kind}; spans go to opentelemetry providers only",
                        p.name
                    ));
                    None
                }
                None => {
                    warnings.push(format!(
                        "{what}: provider {:?} is not among the mesh config's extensionProviders",
                        p.name
                    ));
                    None
                }
            });
            pb::TracingSettings {
                collector,
                random_sampling_percentage: tr.random_sampling_percentage,
                disable_span_reporting: tr.disable_span_reporting,
            }
        });
        if spec.tracing.len() > 1 {
            warnings.push(format!("{what}: only the first tracing entry is read"));
        }
        let access_logging = spec.access_logging.first().map(|a| {
            for field in a.unknown.keys() {
                warnings.push(format!("{what}: accessLogging[0].{field} is not read"));
            }
            pb::AccessLogSettings { disabled: a.disabled }
        });
        let resource = pb::Telemetry {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            mesh_wide: ns == config.root_namespace && targets.is_empty(),
            targets,
            tracing,
            access_logging,
        };
        out.insert(format!("{ns}/{name}"), resource);
    }
    (out, warnings)
}
