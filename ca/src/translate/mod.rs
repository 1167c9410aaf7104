//! Kubernetes objects → mesh state, the way Istio's ambient control plane derives it.
//!
//! - Every Pod with an IP is a workload; it is *captured* (HBONE) when its namespace carries
//!   `istio.io/dataplane-mode=ambient` and the pod does not opt out with `=none`.
//! - Every Service is a service; its endpoints are the pods its selector picks (or, for
//!   selector-less services, the pods its EndpointSlices name), with named target ports resolved
//!   against each pod's container ports.
//! - `istio.io/use-waypoint` on a pod, service or namespace (the most specific wins; `none` opts
//!   out) names a waypoint Gateway; it applies to services when the waypoint is for `service` or
//!   `all` (the default is `service`), to workloads when it is for `workload` or `all`.
//! - AuthorizationPolicies and STRICT PeerAuthentications become L4 policies ([`authz`]).
//! - HTTPRoutes and waypoint-targeted AuthorizationPolicies become the waypoint's routes and L7
//!   policies ([`waypoint`]); VirtualServices and DestinationRules add to them ([`istio`]).
//! - Istio Gateways, with the VirtualServices bound to them, become ingress gateways ([`ingress`]).

pub mod authz;
pub mod egress;
pub mod ingress;
pub mod istio;
pub mod request_authn;
pub mod telemetry;
pub mod waypoint;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proto::SpiffeId;

use crate::k8s::{self, Gateway, Pod, Service};
use crate::mesh::{Locality, MeshState, PortMapping, Service as MeshService, WaypointRef, Workload, WorkloadType};
use crate::objects::Objects;

/// Label the waypoint deployment puts on its pods: the Gateway's name.
const WAYPOINT_POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Mesh-wide settings the translation needs.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// Cluster id, part of workload uids.
    pub cluster_id: String,
    /// DNS suffix of service hostnames.
    pub domain_suffix: String,
    /// Namespace whose namespace-wide policies apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_namespace: "istio-system".into(),
        }
    }
}

/// Which traffic a waypoint handles (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }
    fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// Waypoints by (namespace, name).
struct Waypoints<'a> {
    by_name: HashMap<(&'a str, &'a str), (WaypointRef, WaypointFor)>,
}

impl<'a> Waypoints<'a> {
    fn new(objects: &'a Objects, services: &HashMap<(&str, &str), &Service>, config: &MeshConfig) -> Self {
        let by_name = objects
            .gateways()
            .filter(|g| g.spec.gateway_class_name == k8s::WAYPOINT_GATEWAY_CLASS)
            .map(|g: &'a std::sync::Arc<Gateway>| {
                let (ns, name) = k8s::ns_name(&g.metadata);
                let port = g.spec.listeners.iter().find(|l| l.protocol == "HBONE").map(|l| l.port).unwrap_or(15008);
                // Istio's waypoint deployment puts a Service with the Gateway's name in front of it.
                let address = services.get(&(ns, name)).and_then(|s| cluster_ips(s).into_iter().next());
                let waypoint_for = match k8s::label(&g.metadata, k8s::WAYPOINT_FOR_LABEL) {
                    Some("workload") => WaypointFor::Workload,
                    Some("all") => WaypointFor::All,
                    Some("none") => WaypointFor::None,
                    _ => WaypointFor::Service,
                };
                let r = WaypointRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    address,
                    hostname: format!("{name}.{ns}.svc.{}", config.domain_suffix),
                    port,
                };
                ((ns, name), (r, waypoint_for))
            })
            .collect();
        Waypoints { by_name }
    }
}

/// What `istio.io/use-waypoint` says for an object, before looking at less specific objects.
enum UseWaypoint<'a> {
    Unset,
    OptOut,
    Named { namespace: &'a str, name: &'a str },
}

fn use_waypoint<'a>(meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> UseWaypoint<'a> {
    match k8s::label(meta, k8s::USE_WAYPOINT_LABEL) {
        None | Some("") => UseWaypoint::Unset,
        Some(k8s::USE_WAYPOINT_NONE) => UseWaypoint::OptOut,
        Some(name) => {
            // A Namespace's own namespace is itself.
            let own_ns = meta.namespace.as_deref().or(meta.name.as_deref());
            let namespace = k8s::label(meta, k8s::USE_WAYPOINT_NAMESPACE_LABEL).or(own_ns).unwrap_or_default();
            UseWaypoint::Named { namespace, name }
        }
    }
}

/// Which object's `istio.io/use-waypoint` label binds a service (`service`) or a pod (`pod`) of
/// `namespace` to a waypoint, as the translation reads it (the object's own label, else its
/// namespace's): `"istio.io/use-waypoint=waypoint on Namespace web"`. `None` when no label does.
pub fn waypoint_binding(
    objects: &Objects,
    namespace: &str,
    service: Option<&str>,
    pod: Option<&str>,
) -> Option<String> {
    let said =
        |kind: &str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, at: String| match use_waypoint(
            meta,
        ) {
            UseWaypoint::Named { namespace: ns, name }
                if ns == meta.namespace.as_deref().or(meta.name.as_deref()).unwrap_or_default() =>
            {
                Some(Some(format!("{}={name} on {kind} {at}", k8s::USE_WAYPOINT_LABEL)))
            }
            UseWaypoint::Named { namespace: ns, name } => Some(Some(format!(
                "{}={name} ({}={ns}) on {kind} {at}",
                k8s::USE_WAYPOINT_LABEL,
                k8s::USE_WAYPOINT_NAMESPACE_LABEL
            ))),
            UseWaypoint::OptOut => Some(None),
            UseWaypoint::Unset => None,
        };
    let own = match (service, pod) {
        (Some(svc), _) => objects
            .services()
            .find(|s| s.metadata.namespace.as_deref() == Some(namespace) && s.metadata.name.as_deref() == Some(svc))
            .and_then(|s| said("Service", &s.metadata, format!("{namespace}/{svc}"))),
        (None, Some(p)) => objects
            .pods()
            .find(|o| o.metadata.namespace.as_deref() == Some(namespace) && o.metadata.name.as_deref() == Some(p))
            .and_then(|o| said("Pod", &o.metadata, format!("{namespace}/{p}"))),
        (None, None) => None,
    };
    if let Some(own) = own {
        return own;
    }
    objects
        .namespaces()
        .find(|n| n.metadata.name.as_deref() == Some(namespace))
        .and_then(|n| said("Namespace", &n.metadata, namespace.to_owned()))
        .flatten()
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else { return Vec::new() };
    let mut ips: Vec<IpAddr> = status.pod_ips.iter().flatten().filter_map(|p| p.ip.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(status.pod_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()));
    }
    ips
}

/// Resolves a service port's target on one pod: numbers directly, names against the pod's
/// container ports. `None` when a name does not resolve (the pod does not serve that port).
fn target_port(port: &ServicePort, pod: Option<&Pod>) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n != 0),
        Some(IntOrString::String(name)) => {
            // A numeric string is a number (the API server accepts "8080").
            if let Ok(n) = name.parse::<u16>() {
                return Some(n);
            }
            let spec = pod?.spec.as_ref()?;
            spec.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }
    }
}

/// A pod's locality, as istiod reports it: its `istio-locality` label (`region.zone.subzone`) if
/// it has one, else its node's topology labels; `None` when neither says anything.
fn locality(pod: &Pod, node_labels: Option<&BTreeMap<String, String>>) -> Option<Locality> {
    let locality = match k8s::label(&pod.metadata, k8s::LOCALITY_LABEL).filter(|v| !v.is_empty()) {
        Some(value) => {
            let mut parts = value.splitn(3, '.').map(str::to_owned);
            Locality {
                region: parts.next().unwrap_or_default(),
                zone: parts.next().unwrap_or_default(),
                subzone: parts.next().unwrap_or_default(),
            }
        }
        None => {
            let node = node_labels?;
            let get = |key: &str| node.get(key).cloned().unwrap_or_default();
            Locality {
                region: get(k8s::TOPOLOGY_REGION_LABEL),
                zone: get(k8s::TOPOLOGY_ZONE_LABEL),
                subzone: get(k8s::TOPOLOGY_SUBZONE_LABEL),
            }
        }
    };
    (locality != Locality::default()).then_some(locality)
}

fn canonical(pod: &Pod, workload_name: &str) -> (String, String) {
    let l = k8s::labels(&pod.metadata);
    let name = ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| l.get(*k))
        .cloned()
        .unwrap_or_else(|| workload_name.to_owned());
    let revision = ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]
        .iter()
        .find_map(|k| l.get(*k))
        .cloned()
        .unwrap_or_else(|| "latest".to_owned());
    (name, revision)
}

/// The controller that owns a pod, for telemetry: a Deployment's ReplicaSet is named
/// `<deployment>-<pod-template-hash>`.
fn workload_owner(pod: &Pod) -> (WorkloadType, String) {
    let (_, pod_name) = k8s::ns_name(&pod.metadata);
    let owner = pod.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let Some(owner) = owner else { return (WorkloadType::Pod, pod_name.to_owned()) };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            let hash = k8s::label(&pod.metadata, "pod-template-hash");
            match hash.and_then(|h| owner.name.strip_suffix(h)).and_then(|n| n.strip_suffix('-')) {
                Some(deployment) => (WorkloadType::Deployment, deployment.to_owned()),
                None => (WorkloadType::Deployment, owner.name.clone()),
            }
        }
        "Job" => (WorkloadType::Job, owner.name.clone()),
        "CronJob" => (WorkloadType::CronJob, owner.name.clone()),
        _ => (WorkloadType::Deployment, owner.name.clone()),
    }
}

fn healthy(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = pod.status.as_ref() else { return true };
    if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded" | "Pending")) {
        return false;
    }
    // Declared pods (YAML directory) usually carry no conditions: present and running means ready.
    !status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status != "True")
}

/// A selector-less service a pod backs through an EndpointSlice, with the slice's (name, port)s.
type SliceMembership<'a> = (&'a Service, Vec<(Option<&'a str>, u16)>);
/// A service and its (non-empty) selector.
type Selecting<'a> = (&'a Service, &'a BTreeMap<String, String>);

/// Derives the whole mesh state from the current objects.
pub fn translate(objects: &Objects, config: &MeshConfig) -> MeshState {
    let mut state = MeshState::default();
    let namespaces: HashMap<&str, &k8s::Namespace> =
        objects.namespaces().map(|n| (n.metadata.name.as_deref().unwrap_or_default(), n.as_ref())).collect();
    let services_by_name: HashMap<(&str, &str), &Service> =
        objects.services().map(|s| (k8s::ns_name(&s.metadata), s.as_ref())).collect();
    let waypoints = Waypoints::new(objects, &services_by_name, config);

    // Resolves use-waypoint on the object, then on its namespace.
    let resolve_waypoint = |state: &mut MeshState,
                            what: &str,
                            object: UseWaypoint<'_>,
                            ns: &str,
                            wants: fn(WaypointFor) -> bool|
     -> Option<WaypointRef> {
        let chosen = match object {
            UseWaypoint::Named { namespace, name } => Some((namespace, name)),
            UseWaypoint::OptOut => None,
            UseWaypoint::Unset => match namespaces.get(ns).map(|n| use_waypoint(&n.metadata)) {
                Some(UseWaypoint::Named { namespace, name }) => Some((namespace, name)),
                _ => None,
            },
        }?;
        match waypoints.by_name.get(&chosen) {
            Some((r, waypoint_for)) if wants(*waypoint_for) => Some(r.clone()),
            Some(_) => None,
            None => {
                state.warnings.push(format!("{what} uses waypoint {}/{}, which does not exist", chosen.0, chosen.1));
                None
            }
        }
    };

    // Services.
    for svc in objects.services() {
        let (ns, name) = k8s::ns_name(&svc.metadata);
        let hostname = format!("{name}.{ns}.svc.{}", config.domain_suffix);
        let ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let service_port = u16::try_from(p.port).ok()?;
                // Named target ports are per workload; 0 says so.
                let target = match &p.target_port {
                    Some(IntOrString::String(n)) if n.parse::<u16>().is_err() => 0,
                    _ => target_port(p, None).unwrap_or(0),
                };
                Some(PortMapping { service_port, target_port: target, app_protocol: waypoint::app_protocol(p) })
            })
            .collect();
        let is_waypoint_service = waypoints.by_name.contains_key(&(ns, name));
        let waypoint = if is_waypoint_service {
            None
        } else {
            resolve_waypoint(
                &mut state,
                &format!("service {ns}/{name}"),
                use_waypoint(&svc.metadata),
                ns,
                WaypointFor::services,
            )
        };
        let service = MeshService {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            hostname,
            vips: cluster_ips(svc),
            ports,
            waypoint,
            passthrough: false,
        };
        state.services.insert(service.resource_name(), service);
    }

    // ServiceEntry hosts (after the Services: a Service's name and addresses win); one labelled
    // istio.io/use-waypoint goes through that (egress) waypoint.
    let entry_waypoint = |state: &mut MeshState, se: &k8s::ServiceEntry| {
        let (ns, name) = k8s::ns_name(&se.metadata);
        let what = format!("ServiceEntry {ns}/{name}");
        resolve_waypoint(state, &what, use_waypoint(&se.metadata), ns, WaypointFor::services)
    };
    egress::services(objects, &mut state, &entry_waypoint);
    state.settings = egress::settings(objects, config);
    let (telemetry, telemetry_warnings) = telemetry::translate(objects, config);
    state.telemetry = telemetry;
    state.warnings.extend(telemetry_warnings);

    // What waypoints need: routes per service and the policies targeting them.
    let (routes, route_warnings) = waypoint::routes(objects, config, &state.services);
    state.routes = routes;
    state.warnings.extend(route_warnings);
    let (l7_policies, l7_errors) = waypoint::l7_policies(objects, &state.services, &config.root_namespace);
    state.l7_policies = l7_policies;
    state.config_errors.extend(l7_errors);
    let authn = request_authn::translate(objects, &state.services, &config.root_namespace);
    state.request_authns = authn.rules;
    state.config_errors.extend(authn.errors);
    state.warnings.extend(authn.warnings);
    // VirtualServices are tried before the HTTPRoutes of the same service.
    let (vs_routes, vs_warnings) = istio::virtual_service_routes(objects, config, &state.services);
    state.warnings.extend(vs_warnings);
    for (key, mut vs_routes) in vs_routes {
        if let Some(existing) = state.routes.remove(&key) {
            vs_routes.routes.extend(existing.routes);
        }
        state.routes.insert(key, vs_routes);
    }
    let (destination_policies, tls_warnings) = istio::destination_policies(objects, config, &state.services);
    state.destination_policies = destination_policies;
    state.warnings.extend(tls_warnings);
    let (mut ingress_gateways, ingress_warnings) = ingress::ingress_gateways(objects, config, &state.services);
    let (api_gateways, api_warnings) = ingress::gateway_api_gateways(objects, config);
    ingress_gateways.extend(api_gateways);
    state.warnings.extend(api_warnings);
    let (credentials, credential_warnings) = ingress::gateway_credentials(objects, &ingress_gateways, config);
    state.ingress_gateways = ingress_gateways;
    state.gateway_credentials = credentials;
    state.warnings.extend(ingress_warnings);
    state.warnings.extend(credential_warnings);

    // Which services each pod backs: by selector, or by EndpointSlice for selector-less services.
    let mut slice_members: HashMap<(&str, &str), Vec<SliceMembership<'_>>> = HashMap::new();
    for slice in objects.endpoint_slices() {
        let (ns, _) = k8s::ns_name(&slice.metadata);
        let Some(svc_name) = k8s::label(&slice.metadata, "kubernetes.io/service-name") else { continue };
        let Some(svc) = services_by_name.get(&(ns, svc_name)) else { continue };
        let has_selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty());
        if has_selector {
            continue;
        }
        let ports: Vec<(Option<&str>, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.as_deref(), u16::try_from(p.port?).ok()?)))
            .collect();
        for ep in &slice.endpoints {
            if let Some(r) = ep.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")) {
                let pod_ns = r.namespace.as_deref().unwrap_or(ns);
                if let Some(pod_name) = r.name.as_deref() {
                    slice_members.entry((pod_ns, pod_name)).or_default().push((svc, ports.clone()));
                }
            }
        }
    }

    let mut selector_policies: Vec<(&str, &std::collections::BTreeMap<String, String>, String)> = Vec::new();
    for policy in objects.authorization_policies() {
        let (ns, name) = k8s::ns_name(&policy.metadata);
        state.config_errors.extend(authz::review(policy).messages().into_iter().map(|message| {
            crate::objects::ConfigError { source: format!("AuthorizationPolicy {ns}/{name}"), message }
        }));
        match authz::translate(policy, &config.root_namespace) {
            authz::Translated::Policy(p) => {
                if let Some(labels) = authz::selector(&policy.spec.selector) {
                    selector_policies.push((k8s::ns_name(&policy.metadata).0, labels, p.resource_name()));
                }
                state.policies.insert(p.resource_name(), p);
            }
            authz::Translated::ForWaypoint => {}
            authz::Translated::Skipped(reason) => {
                state.warnings.push(format!("AuthorizationPolicy {ns}/{name}: {reason}"));
            }
        }
    }
    for pa in objects.peer_authentications() {
        if let Some(p) = authz::translate_peer_authentication(pa, &config.root_namespace) {
            if let Some(labels) = authz::selector(&pa.spec.selector) {
                selector_policies.push((k8s::ns_name(&pa.metadata).0, labels, p.resource_name()));
            }
            state.policies.insert(p.resource_name(), p);
        }
    }

    // Services with selectors, per namespace: each pod only looks at its own namespace's.
    let mut selecting: HashMap<&str, Vec<Selecting<'_>>> = HashMap::new();
    for svc in objects.services() {
        if let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty()) {
            selecting.entry(k8s::ns_name(&svc.metadata).0).or_default().push((svc, sel));
        }
    }

    // Workloads.
    let node_labels: HashMap<&str, &BTreeMap<String, String>> =
        objects.nodes().map(|n| (k8s::ns_name(&n.metadata).1, k8s::labels(&n.metadata))).collect();
    let mut waypoint_identities: HashMap<(String, String), std::collections::BTreeSet<SpiffeId>> = HashMap::new();
    let mut waypoint_only: Vec<String> = Vec::new();
    for pod in objects.pods() {
        let ips = pod_ips(pod);
        if ips.is_empty() {
            // Pending: nothing can reach it yet.
            continue;
        }
        let (ns, name) = k8s::ns_name(&pod.metadata);
        let spec = pod.spec.as_ref();
        let sa = spec.and_then(|s| s.service_account_name.as_deref()).filter(|s| !s.is_empty()).unwrap_or("default");
        let identity = match SpiffeId::new(&config.trust_domain, ns, sa) {
            Ok(id) => id,
            Err(e) => {
                state.warnings.push(format!("pod {ns}/{name} has no valid identity: {e}"));
                continue;
            }
        };
        let pod_labels = k8s::labels(&pod.metadata);
        let ns_ambient = namespaces
            .get(ns)
            .and_then(|n| k8s::label(&n.metadata, k8s::DATAPLANE_MODE_LABEL))
            .is_some_and(|m| m == k8s::DATAPLANE_MODE_AMBIENT);
        let opted_out = k8s::label(&pod.metadata, k8s::DATAPLANE_MODE_LABEL) == Some(k8s::DATAPLANE_MODE_NONE);
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        // A waypoint's own pods speak HBONE themselves and are never captured.
        let waypoint_of =
            k8s::label(&pod.metadata, WAYPOINT_POD_LABEL).filter(|gw| waypoints.by_name.contains_key(&(ns, *gw)));
        let captured = ns_ambient && !opted_out && !host_network && waypoint_of.is_none();
        if let Some(gw) = waypoint_of {
            waypoint_identities.entry((ns.to_owned(), gw.to_owned())).or_default().insert(identity.clone());
        }

        let mut services: BTreeMap<String, Vec<PortMapping>> = BTreeMap::new();
        for (svc, selector) in selecting.get(ns).into_iter().flatten() {
            if !k8s::selects(selector, pod_labels) {
                continue;
            }
            let (svc_ns, svc_name) = k8s::ns_name(&svc.metadata);
            let ports = svc
                .spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| Some(PortMapping::new(u16::try_from(p.port).ok()?, target_port(p, Some(pod))?)))
                .collect();
            services.insert(format!("{svc_ns}/{svc_name}.{svc_ns}.svc.{}", config.domain_suffix), ports);
        }
        for (svc, slice_ports) in slice_members.get(&(ns, name)).into_iter().flatten() {
            let (svc_ns, svc_name) = k8s::ns_name(&svc.metadata);
            let ports = svc
                .spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter_map(|p| {
                    let target = slice_ports
                        .iter()
                        .find(|(n, _)| *n == p.name.as_deref() || slice_ports.len() == 1)
                        .map(|(_, port)| *port)?;
                    Some(PortMapping::new(u16::try_from(p.port).ok()?, target))
                })
                .collect();
            services.insert(format!("{svc_ns}/{svc_name}.{svc_ns}.svc.{}", config.domain_suffix), ports);
        }

        let mut policies: Vec<String> = selector_policies
            .iter()
            .filter(|(pns, sel, _)| *pns == ns && k8s::selects(sel, pod_labels))
            .map(|(_, _, n)| n.clone())
            .collect();
        policies.sort();

        let waypoint = if waypoint_of.is_some() {
            None
        } else {
            resolve_waypoint(
                &mut state,
                &format!("pod {ns}/{name}"),
                use_waypoint(&pod.metadata),
                ns,
                WaypointFor::workloads,
            )
        };
        let (workload_type, workload_name) = workload_owner(pod);
        let (canonical_name, canonical_revision) = canonical(pod, waypoint_of.unwrap_or(&workload_name));
        let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        let locality = locality(pod, node_labels.get(node.as_str()).copied());
        let workload = Workload {
            uid: format!("{}//Pod/{ns}/{name}", config.cluster_id),
            name: name.to_owned(),
            namespace: ns.to_owned(),
            ips,
            hostname: None,
            node,
            identity,
            captured,
            native_hbone: waypoint_of.is_some(),
            waypoint,
            services,
            authorization_policies: policies,
            healthy: healthy(pod),
            canonical_name,
            canonical_revision,
            workload_type,
            workload_name,
            cluster_id: config.cluster_id.clone(),
            locality,
        };
        if workload.waypoint.is_some() && !allows_waypoint_bypass(&pod.metadata, namespaces.get(ns).copied()) {
            waypoint_only.push(workload.uid.clone());
        }
        state.workloads.insert(workload.uid.clone(), workload);
    }

    // ServiceEntry endpoints (after the pods: a pod's address is never an entry's).
    egress::endpoints(objects, config, &mut state);

    // A workload whose own address is served by a waypoint accepts traffic only from that
    // waypoint: an Istio-compatible DENY of every other peer, which Istio's ztunnel enforces too.
    for uid in waypoint_only {
        let Some(w) = state.workloads.get_mut(&uid) else { continue };
        let Some(gw) = &w.waypoint else { continue };
        let ids = waypoint_identities.get(&(gw.namespace.clone(), gw.name.clone()));
        let policy = authz::waypoint_only(&w.namespace, gw, ids.into_iter().flatten());
        w.authorization_policies.push(policy.resource_name());
        w.authorization_policies.sort();
        state.policies.insert(policy.resource_name(), policy);
    }
    state
}

/// Annotation on a pod (or its namespace) that lets other peers reach a workload served by a
/// waypoint directly, as Istio allows by default.
pub const ALLOW_WAYPOINT_BYPASS_ANNOTATION: &str = "ambient-mesh.io/allow-waypoint-bypass";

fn allows_waypoint_bypass(
    pod: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespace: Option<&k8s::Namespace>,
) -> bool {
    fn set(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
        m.annotations.as_ref().and_then(|a| a.get(ALLOW_WAYPOINT_BYPASS_ANNOTATION)).map(String::as_str)
    }
    set(pod).or_else(|| namespace.and_then(|n| set(&n.metadata))) == Some("true")
}

#[cfg(test)]
mod binding_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn objects(yaml: &str) -> Objects {
        Objects::from_yaml(yaml)
    }

    /// The most specific label is named: the service's (or pod's) own, else its namespace's; an
    /// opt-out on the object means no binding even where the namespace has one.
    #[test]
    fn the_label_that_binds_a_waypoint_is_named() {
        let o = objects(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {istio.io/use-waypoint: wp}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: own, namespace: web, labels: {istio.io/use-waypoint: other, istio.io/use-waypoint-namespace: infra}}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: web}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: out, namespace: web, labels: {istio.io/use-waypoint: none}}\nspec: {ports: [{port: 80}]}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: web, labels: {istio.io/use-waypoint: podwp}}\nspec: {containers: []}\n",
        );
        let b = |svc, pod| waypoint_binding(&o, "web", svc, pod);
        assert_eq!(
            b(Some("own"), None).as_deref(),
            Some("istio.io/use-waypoint=other (istio.io/use-waypoint-namespace=infra) on Service web/own")
        );
        assert_eq!(b(Some("plain"), None).as_deref(), Some("istio.io/use-waypoint=wp on Namespace web"));
        assert_eq!(b(Some("out"), None), None);
        assert_eq!(b(None, Some("p")).as_deref(), Some("istio.io/use-waypoint=podwp on Pod web/p"));
        assert_eq!(waypoint_binding(&o, "elsewhere", Some("x"), None), None);
    }
}
