//! Where a captured outbound connection goes, decided from its original destination: ztunnel's
//! routing, here so that the CA can explain a connection with the same code (`ambientctl explain`).
//!
//! - A **service VIP**: through the service's waypoint if it has one; otherwise to one healthy
//!   endpoint (round robin), at the endpoint's target port.
//! - A **pod IP**: through the pod's waypoint if it has one; otherwise to the pod.
//! - A destination in the mesh (it speaks HBONE) is reached over HBONE at `<ip>:15008`, expecting
//!   its identity (or the waypoint's); anything else is passed through as plain TCP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::SpiffeId;
use crate::api::ambient::waypoint::v1::mesh_settings::OutboundTrafficPolicy;
use crate::hbone::HBONE_PORT;
use crate::state::{MeshState, PortMapping, Waypoint, WaypointAt, Workload};

/// Where to send a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// HBONE to `hbone` (`<ip>:15008`), `CONNECT target`, expecting one of `identities`.
    Hbone {
        /// The HBONE address.
        hbone: SocketAddr,
        /// The `:authority`.
        target: SocketAddr,
        /// Accepted server identities.
        identities: Vec<SpiffeId>,
        /// The workload uid reached (endpoint or waypoint), for logs and metrics.
        workload: String,
    },
    /// Plain TCP to this address.
    Passthrough(SocketAddr),
    /// Plain TCP to what this DNS name resolves to, at this port (a ServiceEntry endpoint with
    /// `resolution: DNS`).
    Resolve(String, u16),
    /// An address the mesh does not know, under `outboundTrafficPolicy: REGISTRY_ONLY`: refused.
    Unregistered(SocketAddr),
    /// A known service with no healthy endpoint.
    NoHealthyEndpoint(String),
    /// A workload the control plane sent and this proxy refused (named, with why): its traffic
    /// is refused, never passed through in plaintext.
    Refused(String),
}

/// Round-robin state for endpoint picks.
#[derive(Debug, Default)]
pub struct Balancer(AtomicUsize);

/// A waypoint's workload: by address (the waypoint service's VIP, whose endpoint is picked, or a
/// pod's own IP), or by service key and one of its endpoints.
fn waypoint_workload<'a>(state: &'a MeshState, at: &WaypointAt, lb: &Balancer) -> Option<&'a Workload> {
    match at {
        WaypointAt::Address(ip) => match state.service_by_vip(*ip) {
            Some(service) => pick(state, &service.key, lb).map(|(w, _)| w),
            None => state.workload_by_ip(*ip).map(|w| w.as_ref()),
        },
        WaypointAt::Service(key) => pick(state, key, lb).map(|(w, _)| w),
    }
}

/// Every workload behind a waypoint address (all endpoints of its service, or the pod itself).
pub fn waypoint_workloads<'a>(state: &'a MeshState, at: &'a WaypointAt) -> Box<dyn Iterator<Item = &'a Workload> + 'a> {
    let key = match at {
        WaypointAt::Address(ip) => match state.service_by_vip(*ip) {
            Some(service) => &service.key,
            None => return Box::new(state.workload_by_ip(*ip).map(|w| w.as_ref()).into_iter()),
        },
        WaypointAt::Service(key) => key,
    };
    Box::new(state.endpoints(key).map(|w| w.as_ref()))
}

/// Whether `peer` is a waypoint serving `destination` (its own, or one of its services'), proven
/// by the identity of the workloads behind that waypoint.
pub fn is_waypoint_of(state: &MeshState, destination: &Workload, peer: &SpiffeId) -> bool {
    let services = destination.services.keys().filter_map(|k| state.service(k)).filter_map(|s| s.waypoint.as_ref());
    destination.waypoint.iter().chain(services).any(|gw| waypoint_workloads(state, &gw.at).any(|w| &w.identity == peer))
}

fn via_waypoint(state: &MeshState, gw: &Waypoint, target: SocketAddr, lb: &Balancer) -> Option<Route> {
    let w = waypoint_workload(state, &gw.at, lb)?;
    Some(Route::Hbone {
        hbone: SocketAddr::new(w.primary_address()?, gw.hbone_port),
        target,
        identities: vec![w.identity.clone()],
        workload: w.uid.clone(),
    })
}

/// A healthy endpoint of service `key` and the ports it serves the service on.
fn pick<'a>(state: &'a MeshState, key: &str, lb: &Balancer) -> Option<(&'a Workload, &'a [PortMapping])> {
    let endpoints: Vec<(&Workload, &[PortMapping])> = state
        .endpoints(key)
        .filter(|w| w.healthy)
        .filter_map(|w| w.services.get(key).map(|ports| (w.as_ref(), ports.as_slice())))
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    let i = lb.0.fetch_add(1, Ordering::Relaxed) % endpoints.len();
    Some(endpoints[i])
}

fn to_workload(w: &Workload, port: u16) -> Option<Route> {
    let Some(ip) = w.primary_address() else {
        return w.hostname.as_ref().map(|h| Route::Resolve(h.clone(), port));
    };
    let target = SocketAddr::new(ip, port);
    if w.speaks_hbone() {
        Some(Route::Hbone {
            hbone: SocketAddr::new(ip, HBONE_PORT),
            target,
            identities: vec![w.identity.clone()],
            workload: w.uid.clone(),
        })
    } else {
        Some(Route::Passthrough(target))
    }
}

/// Decides where a connection to `dst` goes.
pub fn route(state: &MeshState, dst: SocketAddr, lb: &Balancer) -> Route {
    if let Some((name, why)) = state.refused_at(dst.ip()) {
        return Route::Refused(format!("{name}: {why}"));
    }
    if let Some(service) = state.service_by_vip(dst.ip()) {
        let key = &service.key;
        // Traffic for a service with a waypoint never skips it: without a waypoint endpoint the
        // connection fails rather than bypass its L7 policy.
        if let Some(gw) = &service.waypoint {
            return via_waypoint(state, gw, dst, lb)
                .unwrap_or_else(|| Route::NoHealthyEndpoint(format!("the waypoint of {key}")));
        }
        let Some((endpoint, ports)) = pick(state, key, lb) else {
            if service.passthrough {
                return Route::Passthrough(dst);
            }
            return Route::NoHealthyEndpoint(key.clone());
        };
        // The endpoint's port for this service port; the service's own mapping, else the same.
        let target_port = ports
            .iter()
            .chain(service.ports.iter())
            .filter(|p| p.service_port == dst.port())
            .find_map(|p| p.target_port)
            .unwrap_or(dst.port());
        return to_workload(endpoint, target_port).unwrap_or(Route::Passthrough(dst));
    }
    if let Some(w) = state.workload_by_ip(dst.ip()) {
        if w.speaks_hbone()
            && let Some(gw) = &w.waypoint
        {
            return via_waypoint(state, gw, dst, lb)
                .unwrap_or_else(|| Route::NoHealthyEndpoint(format!("the waypoint of {}", w.uid)));
        }
        return to_workload(w, dst.port()).unwrap_or(Route::Passthrough(dst));
    }
    match state.settings.outbound_traffic_policy() {
        OutboundTrafficPolicy::AllowAny => Route::Passthrough(dst),
        OutboundTrafficPolicy::RegistryOnly => Route::Unregistered(dst),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use crate::api::istio::workload::{
        GatewayAddress, NamespacedHostname, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload,
        WorkloadStatus, gateway_address,
    };

    use super::*;

    fn workload(name: &str, ip: [u8; 4], hbone: bool, services: &[(&str, u32, u32)]) -> Workload {
        let mut by_service: HashMap<String, PortList> = HashMap::new();
        for (svc, sp, tp) in services {
            by_service.entry(svc.to_string()).or_default().ports.push(Port {
                service_port: *sp,
                target_port: *tp,
                app_protocol: 0,
            });
        }
        Workload {
            uid: format!("Kubernetes//Pod/demo/{name}"),
            name: name.into(),
            namespace: "demo".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: if hbone { TunnelProtocol::Hbone } else { TunnelProtocol::None } as i32,
            trust_domain: "cluster.local".into(),
            service_account: name.into(),
            services: by_service,
            ..Default::default()
        }
    }

    fn service(vip: [u8; 4], port: u32, target: u32) -> Service {
        Service {
            name: "hello".into(),
            namespace: "demo".into(),
            hostname: "hello.demo.svc.cluster.local".into(),
            addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec(), length: None }],
            ports: vec![Port { service_port: port, target_port: target, app_protocol: 0 }],
            ..Default::default()
        }
    }

    fn state(workloads: Vec<Workload>, services: Vec<(&str, Service)>) -> MeshState {
        let mut s = MeshState::default();
        for w in workloads {
            s.insert_workload(crate::state::Workload::from_pb(w).unwrap());
        }
        for (key, svc) in services {
            let svc = crate::state::Service::from_pb(svc).unwrap();
            assert_eq!(svc.key, key);
            s.insert_service(svc);
        }
        s
    }

    const KEY: &str = "demo/hello.demo.svc.cluster.local";

    #[test]
    fn vip_spreads_over_endpoints_at_their_target_port() {
        let s = state(
            vec![
                workload("a", [10, 0, 0, 1], true, &[(KEY, 80, 8080)]),
                workload("b", [10, 0, 0, 2], true, &[(KEY, 80, 8080)]),
                workload("c", [10, 0, 0, 3], false, &[(KEY, 80, 8080)]),
            ],
            vec![(KEY, service([10, 96, 0, 1], 80, 8080))],
        );
        let lb = Balancer::default();
        let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
        let mut targets: Vec<SocketAddr> = (0..3)
            .map(|_| match route(&s, vip, &lb) {
                Route::Hbone { hbone, target, identities, .. } => {
                    assert_eq!(hbone, SocketAddr::new(target.ip(), 15008));
                    assert_eq!(
                        identities[0].service_account(),
                        if target.ip().to_string().ends_with(".1") { "a" } else { "b" }
                    );
                    target
                }
                Route::Passthrough(t) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"].map(|t| t.parse::<SocketAddr>().unwrap())
        );
        // The endpoint outside the mesh is reached in plaintext.
        assert!((0..3).any(|_| route(&s, vip, &lb) == Route::Passthrough("10.0.0.3:8080".parse().unwrap())));
    }

    #[test]
    fn pods_waypoints_and_strangers() {
        let mut server = workload("server", [10, 0, 0, 5], true, &[]);
        let wp = workload("waypoint", [10, 0, 0, 9], true, &[("demo/waypoint.demo.svc.cluster.local", 15008, 15008)]);
        let s = state(vec![server.clone(), wp.clone()], vec![]);
        let lb = Balancer::default();
        // A pod in the mesh: HBONE to it, expecting its identity.
        match route(&s, "10.0.0.5:9000".parse().unwrap(), &lb) {
            Route::Hbone { hbone, target, identities, .. } => {
                assert_eq!(hbone, "10.0.0.5:15008".parse().unwrap());
                assert_eq!(target, "10.0.0.5:9000".parse().unwrap());
                assert_eq!(identities[0].as_str(), "spiffe://cluster.local/ns/demo/sa/server");
            }
            other => panic!("{other:?}"),
        }
        // With a waypoint (by hostname): to the waypoint, CONNECT to the original destination.
        server.waypoint = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
                namespace: "demo".into(),
                hostname: "waypoint.demo.svc.cluster.local".into(),
            })),
            hbone_mtls_port: 15008,
        });
        let s = state(vec![server, wp], vec![]);
        match route(&s, "10.0.0.5:9000".parse().unwrap(), &lb) {
            Route::Hbone { hbone, target, identities, .. } => {
                assert_eq!(hbone, "10.0.0.9:15008".parse().unwrap());
                assert_eq!(target, "10.0.0.5:9000".parse().unwrap());
                assert_eq!(identities[0].service_account(), "waypoint");
            }
            other => panic!("{other:?}"),
        }
        // Outside the mesh entirely: passthrough.
        let out: SocketAddr = "192.0.2.7:443".parse().unwrap();
        assert_eq!(route(&s, out, &lb), Route::Passthrough(out));
    }

    #[test]
    fn a_service_waypoint_by_vip_is_never_skipped() {
        let backend = workload("hello", [10, 0, 0, 5], true, &[("demo/hello.demo.svc.cluster.local", 80, 8080)]);
        let wp = workload("waypoint", [10, 0, 0, 9], true, &[("demo/waypoint.demo.svc.cluster.local", 15008, 15008)]);
        let mut hello = service([10, 96, 0, 10], 80, 8080);
        // As the control plane sends it: the waypoint service's VIP.
        hello.waypoint = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                length: None,
                network: String::new(),
                address: vec![10, 96, 0, 20],
            })),
            hbone_mtls_port: 15008,
        });
        let waypoint_svc = Service {
            name: "waypoint".into(),
            hostname: "waypoint.demo.svc.cluster.local".into(),
            addresses: vec![NetworkAddress { network: String::new(), address: vec![10, 96, 0, 20], length: None }],
            ..service([10, 96, 0, 20], 15008, 15008)
        };
        let lb = Balancer::default();
        let to: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let s = state(
            vec![backend.clone(), wp],
            vec![
                ("demo/hello.demo.svc.cluster.local", hello.clone()),
                ("demo/waypoint.demo.svc.cluster.local", waypoint_svc.clone()),
            ],
        );
        match route(&s, to, &lb) {
            Route::Hbone { hbone, target, .. } => {
                assert_eq!(hbone, "10.0.0.9:15008".parse().unwrap(), "to the waypoint pod");
                assert_eq!(target, to, "CONNECT names the service VIP");
            }
            other => panic!("{other:?}"),
        }
        // No waypoint pod: the connection fails instead of going around the waypoint.
        let s = state(
            vec![backend],
            vec![("demo/hello.demo.svc.cluster.local", hello), ("demo/waypoint.demo.svc.cluster.local", waypoint_svc)],
        );
        assert!(matches!(route(&s, to, &lb), Route::NoHealthyEndpoint(_)));
    }

    #[test]
    fn registry_only_refuses_what_the_mesh_does_not_know_and_only_that() {
        use crate::api::ambient::waypoint::v1::MeshSettings;
        let pod = workload("server", [10, 0, 0, 5], true, &[]);
        let outside = workload("legacy", [10, 0, 0, 6], false, &[]);
        let mut s = state(vec![pod, outside], vec![(KEY, service([10, 96, 0, 1], 80, 8080))]);
        let lb = Balancer::default();
        let unknown: SocketAddr = "192.0.2.7:443".parse().unwrap();
        assert_eq!(route(&s, unknown, &lb), Route::Passthrough(unknown), "ALLOW_ANY by default");
        s.settings = MeshSettings { outbound_traffic_policy: OutboundTrafficPolicy::RegistryOnly as i32 };
        assert_eq!(route(&s, unknown, &lb), Route::Unregistered(unknown));
        // What the mesh knows is reached as before: a pod, a workload outside the mesh, a service.
        assert!(matches!(route(&s, "10.0.0.5:9000".parse().unwrap(), &lb), Route::Hbone { .. }));
        let legacy: SocketAddr = "10.0.0.6:5432".parse().unwrap();
        assert_eq!(route(&s, legacy, &lb), Route::Passthrough(legacy));
        assert_eq!(
            route(&s, "10.96.0.1:80".parse().unwrap(), &lb),
            Route::NoHealthyEndpoint(KEY.into()),
            "a known service is not refused as unregistered"
        );
    }

    #[test]
    fn service_entries_pass_through_or_resolve_their_endpoints() {
        use crate::api::istio::workload::{LoadBalancing, load_balancing};
        const LEGACY: &str = "demo/legacy.internal";
        const API: &str = "demo/api.example.com";
        // resolution NONE: no endpoints, load balancing PASSTHROUGH: where the client dialed.
        let mut legacy = service([198, 51, 100, 7], 5432, 5432);
        legacy.hostname = "legacy.internal".into();
        legacy.load_balancing =
            Some(LoadBalancing { mode: load_balancing::Mode::Passthrough as i32, ..Default::default() });
        // resolution DNS: an endpoint with a hostname and no address.
        let mut api = service([240, 240, 1, 2], 80, 8080);
        api.hostname = "api.example.com".into();
        let mut backend = workload("api-backend", [0, 0, 0, 0], false, &[(API, 80, 8080)]);
        backend.addresses.clear();
        backend.hostname = "api-backend.example.net".into();
        let s = state(vec![backend], vec![(LEGACY, legacy), (API, api)]);
        let lb = Balancer::default();
        let to: SocketAddr = "198.51.100.7:5432".parse().unwrap();
        assert_eq!(route(&s, to, &lb), Route::Passthrough(to));
        assert_eq!(
            route(&s, "240.240.1.2:80".parse().unwrap(), &lb),
            Route::Resolve("api-backend.example.net".into(), 8080)
        );
    }

    #[test]
    fn a_service_without_healthy_endpoints_is_reported() {
        let mut sick = workload("a", [10, 0, 0, 1], true, &[(KEY, 80, 8080)]);
        sick.status = WorkloadStatus::Unhealthy as i32;
        let s = state(vec![sick], vec![(KEY, service([10, 96, 0, 1], 80, 8080))]);
        assert_eq!(
            route(&s, "10.96.0.1:80".parse().unwrap(), &Balancer::default()),
            Route::NoHealthyEndpoint(KEY.into())
        );
    }

    #[test]
    fn a_workload_this_proxy_refused_is_not_reached_around_the_mesh() {
        let mut s = state(vec![], vec![]);
        let ip = "10.0.0.7".parse().unwrap();
        s.refuse_workload("Kubernetes//Pod/demo/odd", vec![ip], "no valid identity".into());
        let to = SocketAddr::new(ip, 8080);
        assert_eq!(
            route(&s, to, &Balancer::default()),
            Route::Refused("Kubernetes//Pod/demo/odd: no valid identity".into()),
            "not Passthrough: that would send a mesh workload's traffic in plaintext"
        );
        // Once the control plane sends it in a form this proxy takes, it is reached over HBONE.
        s.insert_workload(crate::state::Workload::from_pb(workload("odd", [10, 0, 0, 7], true, &[])).unwrap());
        assert!(matches!(route(&s, to, &Balancer::default()), Route::Hbone { .. }));
    }

    /// An address reused while a refused entry still claims it (a pod replaced by one the proxy
    /// cannot take, the old one not yet removed): refused until the bad entry goes, never
    /// guessed at.
    #[test]
    fn an_address_a_refused_workload_shares_with_a_good_one_is_refused_until_it_goes() {
        let mut s = state(vec![], vec![]);
        let ip = "10.0.0.8".parse().unwrap();
        let to = SocketAddr::new(ip, 8080);
        s.insert_workload(crate::state::Workload::from_pb(workload("good", [10, 0, 0, 8], true, &[])).unwrap());
        assert!(matches!(route(&s, to, &Balancer::default()), Route::Hbone { .. }));
        s.refuse_workload("Kubernetes//Pod/demo/bad", vec![ip], "no valid identity".into());
        assert_eq!(
            route(&s, to, &Balancer::default()),
            Route::Refused("Kubernetes//Pod/demo/bad: no valid identity".into()),
            "the good workload's identity is not assumed for an address a refused one claims"
        );
        s.remove_address("Kubernetes//Pod/demo/bad");
        assert!(matches!(route(&s, to, &Balancer::default()), Route::Hbone { .. }));
    }
}
