//! Traffic leaving the mesh: ServiceEntries as services (and their endpoints as workloads), and
//! the mesh settings (`outboundTrafficPolicy`) of the root namespace's `istio` ConfigMap.
//!
//! A ServiceEntry host becomes a service `<namespace>/<host>`, as Istio's ambient control plane
//! sends it: the entry's `addresses` are its first host's VIPs (one is allocated from
//! 240.240.0.0/16, where Istio allocates them, for a host without any when the resolution is not
//! NONE; an address belongs to one service, so two entries giving it: the first keeps it), `resolution: NONE` is
//! load-balancing mode PASSTHROUGH (connections go where the client dialed), STATIC endpoints are
//! workloads at their IPs, DNS ones (or, with none, the hosts themselves) workloads with a
//! `hostname` the node proxy resolves when it connects. A `workloadSelector` makes the selected
//! pods its endpoints.
//!
//! An entry never takes an address the mesh already uses: a VIP or an endpoint at a pod's IP or a
//! Service's ClusterIP is dropped with a warning. Otherwise any namespace could write a
//! ServiceEntry that makes the node proxies treat a mesh pod as outside the mesh, and send its
//! traffic in plaintext.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use proto::SpiffeId;

use super::MeshConfig;
use crate::k8s::{self, Resolution, ServiceEntry};
use crate::mesh::{MeshSettings, MeshState, PortMapping, Service as MeshService, Workload, WorkloadType};
use crate::objects::Objects;
use crate::validate;

/// The mesh settings: from the root namespace's `istio` ConfigMap, else the defaults. (A ConfigMap
/// whose settings do not parse is refused when it arrives, its previous version kept.)
pub(super) fn settings(objects: &Objects, config: &MeshConfig) -> MeshSettings {
    let (name, _) = k8s::MESH_CONFIG_MAP;
    objects.config_map(&config.root_namespace, name).and_then(|cm| validate::mesh_settings(cm).ok()).unwrap_or_default()
}

/// The first address of 240.240.0.0/16 free for `key`, starting at a slot its hash picks (the
/// same key gets the same address while the set of entries stays the same).
fn allocate(key: &str, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let start = (hash % 65_534) as u32;
    (0..65_534_u32)
        .map(|i| (start + i) % 65_534 + 1)
        .map(|n| IpAddr::V4(Ipv4Addr::from(0xf0f0_0000 | n)))
        .find(|ip| !used.contains(ip))
}

/// The entries in a stable order, with their resolution (validated when they arrived).
fn entries(objects: &Objects) -> Vec<(&ServiceEntry, Resolution)> {
    objects.service_entries().filter_map(|se| Some((se.as_ref(), se.spec.resolution().ok()?))).collect()
}

fn app_protocol(protocol: Option<&str>) -> proto::api::istio::workload::AppProtocol {
    use proto::api::istio::workload::AppProtocol;
    match protocol.map(str::to_ascii_uppercase).as_deref() {
        Some("HTTP") => AppProtocol::Http11,
        Some("HTTP2") => AppProtocol::Http2,
        Some("GRPC") => AppProtocol::Grpc,
        Some("TCP") => AppProtocol::Tcp,
        Some("TLS" | "HTTPS") => AppProtocol::Tls,
        _ => AppProtocol::Unknown,
    }
}

fn service_ports(se: &ServiceEntry) -> Vec<PortMapping> {
    se.spec
        .ports
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p.number).ok()?;
            let target = u16::try_from(p.target_port.unwrap_or(p.number)).ok()?;
            Some(PortMapping {
                service_port: port,
                target_port: target,
                app_protocol: app_protocol(p.protocol.as_deref()),
            })
        })
        .collect()
}

/// The addresses pods and Services already hold.
fn taken(objects: &Objects, state: &MeshState) -> HashMap<IpAddr, String> {
    let mut taken = HashMap::new();
    for s in state.services.values() {
        for ip in &s.vips {
            taken.insert(*ip, format!("service {}", s.resource_name()));
        }
    }
    for pod in objects.pods() {
        let (ns, name) = k8s::ns_name(&pod.metadata);
        for ip in super::pod_ips(pod) {
            taken.insert(ip, format!("pod {ns}/{name}"));
        }
    }
    taken
}

/// Adds a service per ServiceEntry host (after the Kubernetes Services, whose hostnames and
/// addresses win).
pub(super) fn services(
    objects: &Objects,
    state: &mut MeshState,
    waypoint_of: &dyn Fn(&mut MeshState, &ServiceEntry) -> Option<crate::mesh::WaypointRef>,
) {
    let taken = taken(objects, state);
    let mut used: BTreeSet<IpAddr> = taken.keys().copied().collect();
    let mut wanted: Vec<(String, &ServiceEntry, &String, Vec<IpAddr>, Resolution)> = Vec::new();
    // Addresses entries gave, by the entry that has it: the first (in namespace/name order) keeps
    // an address two entries give, as an address is one service's.
    let mut claimed: HashMap<IpAddr, String> = HashMap::new();
    for (se, resolution) in entries(objects) {
        let (ns, name) = k8s::ns_name(&se.metadata);
        let mut vips = Vec::new();
        for a in &se.spec.addresses {
            let Ok(ip) = validate::service_entry_address(a) else { continue };
            let holder = taken.get(&ip).cloned().or_else(|| claimed.get(&ip).map(|e| format!("ServiceEntry {e}")));
            match holder {
                Some(holder) => state
                    .warnings
                    .push(format!("ServiceEntry {ns}/{name}: address {ip} is {holder}'s; the entry does not take it")),
                None => {
                    claimed.insert(ip, format!("{ns}/{name}"));
                    vips.push(ip);
                }
            }
        }
        used.extend(vips.iter().copied());
        // The addresses are the first host's; further hosts get their own (allocated) ones.
        for (i, host) in se.spec.hosts.iter().enumerate() {
            let own = if i == 0 { vips.clone() } else { Vec::new() };
            wanted.push((format!("{ns}/{host}"), se, host, own, resolution));
        }
    }
    for (key, se, host, mut vips, resolution) in wanted {
        let (ns, name) = k8s::ns_name(&se.metadata);
        if state.services.contains_key(&key) {
            state.warnings.push(format!("ServiceEntry {ns}/{name}: host {host} is already a service; skipped"));
            continue;
        }
        if vips.is_empty() && resolution != Resolution::None {
            match allocate(&key, &used) {
                Some(ip) => {
                    used.insert(ip);
                    vips.push(ip);
                }
                None => {
                    state.warnings.push(format!("ServiceEntry {ns}/{name}: no address left to allocate for {host}"))
                }
            }
        }
        let waypoint = waypoint_of(state, se);
        let service = MeshService {
            name: name.to_owned(),
            namespace: ns.to_owned(),
            hostname: host.clone(),
            vips,
            ports: service_ports(se),
            waypoint,
            passthrough: resolution == Resolution::None,
        };
        state.services.insert(key, service);
    }
}

/// Adds the entries' endpoints: workloads for STATIC and DNS endpoints (or hosts), and the
/// entries' services on the pods a `workloadSelector` picks (after the pods' workloads).
pub(super) fn endpoints(objects: &Objects, config: &MeshConfig, state: &mut MeshState) {
    let taken = taken(objects, state);
    for (se, resolution) in entries(objects) {
        let (ns, name) = k8s::ns_name(&se.metadata);
        let keys: Vec<String> = se
            .spec
            .hosts
            .iter()
            .map(|h| format!("{ns}/{h}"))
            .filter(|k| state.services.get(k).is_some_and(|s| s.name == name && s.namespace == ns))
            .collect();
        if keys.is_empty() {
            continue;
        }
        if let Some(selector) = &se.spec.workload_selector {
            // On a workload, ports carry no protocol (the service declares it).
            let ports: Vec<PortMapping> =
                service_ports(se).iter().map(|p| PortMapping::new(p.service_port, p.target_port)).collect();
            let picked: Vec<String> = objects
                .pods()
                .filter(|p| {
                    k8s::ns_name(&p.metadata).0 == ns && k8s::selects(&selector.labels, k8s::labels(&p.metadata))
                })
                .map(|p| format!("{}//Pod/{ns}/{}", config.cluster_id, k8s::ns_name(&p.metadata).1))
                .collect();
            for uid in picked {
                let Some(w) = state.workloads.get_mut(&uid) else { continue };
                for key in &keys {
                    w.services.insert(key.clone(), ports.clone());
                }
            }
            continue;
        }
        let endpoints: Vec<(String, Option<&k8s::WorkloadEntrySpec>)> = match resolution {
            Resolution::None => continue,
            Resolution::Dns if se.spec.endpoints.is_empty() => {
                se.spec.hosts.iter().map(|h| (h.clone(), None)).collect()
            }
            _ => se.spec.endpoints.iter().map(|e| (e.address.clone(), Some(e))).collect(),
        };
        for (address, entry) in endpoints {
            let ip = address.parse::<IpAddr>().ok();
            if let Some(holder) = ip.and_then(|ip| taken.get(&ip)) {
                state.warnings.push(format!(
                    "ServiceEntry {ns}/{name}: endpoint {address} is {holder}'s; the entry does not take it"
                ));
                continue;
            }
            let sa = entry.and_then(|e| e.service_account.as_deref()).filter(|s| !s.is_empty()).unwrap_or("default");
            let Ok(identity) = SpiffeId::new(&config.trust_domain, ns, sa) else {
                state
                    .warnings
                    .push(format!("ServiceEntry {ns}/{name}: service account {sa:?} is not a valid identity"));
                continue;
            };
            let ports: Vec<PortMapping> = se
                .spec
                .ports
                .iter()
                .filter_map(|p| {
                    let own = entry.and_then(|e| e.ports.get(&p.name)).copied();
                    let target = own.or(p.target_port).unwrap_or(p.number);
                    Some(PortMapping::new(u16::try_from(p.number).ok()?, u16::try_from(target).ok()?))
                })
                .collect();
            let services: BTreeMap<String, Vec<PortMapping>> =
                keys.iter().map(|k| (k.clone(), ports.clone())).collect();
            let uid = format!("{}/networking.istio.io/ServiceEntry/{ns}/{name}/{address}", config.cluster_id);
            let workload = Workload {
                uid: uid.clone(),
                name: name.to_owned(),
                namespace: ns.to_owned(),
                ips: ip.into_iter().collect(),
                hostname: if ip.is_none() { Some(address.clone()) } else { None },
                node: String::new(),
                identity,
                // Outside the mesh (or inside it without a ztunnel in front): plain TCP.
                captured: false,
                native_hbone: false,
                waypoint: None,
                services,
                authorization_policies: Vec::new(),
                healthy: true,
                canonical_name: name.to_owned(),
                canonical_revision: "latest".to_owned(),
                workload_type: WorkloadType::Pod,
                workload_name: name.to_owned(),
                cluster_id: config.cluster_id.clone(),
                locality: None,
            };
            state.workloads.insert(uid, workload);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn allocation_is_stable_and_skips_what_is_used() {
        let used = BTreeSet::new();
        let a = allocate("shop/api.example.com", &used).unwrap();
        assert_eq!(a, allocate("shop/api.example.com", &used).unwrap());
        let IpAddr::V4(v4) = a else { panic!("{a}") };
        assert_eq!(&v4.octets()[..2], &[240, 240]);
        assert_ne!(v4.octets()[2..], [0, 0]);
        let used = BTreeSet::from([a]);
        let b = allocate("shop/api.example.com", &used).unwrap();
        assert_ne!(a, b);
    }
}
