//! Outbound (15001): where a captured connection goes, decided from its original destination.
//!
//! - A **service VIP**: through the service's waypoint if it has one; otherwise to one healthy
//!   endpoint (round robin), at the endpoint's target port.
//! - A **pod IP**: through the pod's waypoint if it has one; otherwise to the pod.
//! - A destination in the mesh (it speaks HBONE) is reached over HBONE at `<ip>:15008`, expecting
//!   its identity (or the waypoint's); anything else is passed through as plain TCP.
//!
//! [`route`] is the pure decision; the listener applies it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use proto::SpiffeId;
use proto::api::istio::workload::{GatewayAddress, TunnelProtocol, Workload, WorkloadStatus, gateway_address};
use proto::hbone::HBONE_PORT;

use crate::xds::MeshState;

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
    /// A known service with no healthy endpoint.
    NoHealthyEndpoint(String),
}

/// Round-robin state for endpoint picks.
#[derive(Debug, Default)]
pub struct Balancer(AtomicUsize);

fn identity(w: &Workload) -> Option<SpiffeId> {
    SpiffeId::new(&w.trust_domain, &w.namespace, &w.service_account).ok()
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn speaks_hbone(w: &Workload) -> bool {
    w.tunnel_protocol == TunnelProtocol::Hbone as i32 || w.native_tunnel
}

fn healthy(w: &Workload) -> bool {
    w.status == WorkloadStatus::Healthy as i32
}

/// A waypoint's workload: by address, or by hostname (a service) and one of its endpoints.
fn waypoint_workload<'a>(state: &'a MeshState, gw: &GatewayAddress, lb: &Balancer) -> Option<&'a Workload> {
    match gw.destination.as_ref()? {
        gateway_address::Destination::Address(a) => state.workload_by_ip(ip_of(&a.address)?).map(|w| w.as_ref()),
        gateway_address::Destination::Hostname(h) => {
            let key = format!("{}/{}", h.namespace, h.hostname);
            pick(state, &key, lb).map(|(w, _)| w)
        }
    }
}

fn via_waypoint(state: &MeshState, gw: &GatewayAddress, target: SocketAddr, lb: &Balancer) -> Option<Route> {
    let w = waypoint_workload(state, gw, lb)?;
    let ip = w.addresses.iter().find_map(|a| ip_of(a))?;
    let port = if gw.hbone_mtls_port == 0 { HBONE_PORT } else { gw.hbone_mtls_port as u16 };
    Some(Route::Hbone {
        hbone: SocketAddr::new(ip, port),
        target,
        identities: identity(w).into_iter().collect(),
        workload: w.uid.clone(),
    })
}

/// A healthy endpoint of service `key` and the port list it serves the service on.
fn pick<'a>(
    state: &'a MeshState,
    key: &str,
    lb: &Balancer,
) -> Option<(&'a Workload, &'a [proto::api::istio::workload::Port])> {
    let mut endpoints: Vec<(&Workload, &[proto::api::istio::workload::Port])> = state
        .workloads
        .values()
        .filter(|w| healthy(w))
        .filter_map(|w| w.services.get(key).map(|ports| (w.as_ref(), ports.ports.as_slice())))
        .collect();
    if endpoints.is_empty() {
        return None;
    }
    endpoints.sort_by(|a, b| a.0.uid.cmp(&b.0.uid));
    let i = lb.0.fetch_add(1, Ordering::Relaxed) % endpoints.len();
    Some(endpoints[i])
}

fn to_workload(w: &Workload, port: u16) -> Option<Route> {
    let ip = w.addresses.iter().find_map(|a| ip_of(a))?;
    let target = SocketAddr::new(ip, port);
    if speaks_hbone(w) {
        Some(Route::Hbone {
            hbone: SocketAddr::new(ip, HBONE_PORT),
            target,
            identities: identity(w).into_iter().collect(),
            workload: w.uid.clone(),
        })
    } else {
        Some(Route::Passthrough(target))
    }
}

/// Decides where a connection to `dst` goes.
pub fn route(state: &MeshState, dst: SocketAddr, lb: &Balancer) -> Route {
    if let Some((key, service)) = state.service_by_vip(dst.ip()) {
        if let Some(gw) = &service.waypoint
            && let Some(r) = via_waypoint(state, gw, dst, lb)
        {
            return r;
        }
        let Some((endpoint, ports)) = pick(state, key, lb) else {
            return Route::NoHealthyEndpoint(key.clone());
        };
        // The endpoint's port for this service port; the service's own mapping, else the same.
        let service_port = u32::from(dst.port());
        let target_port = ports
            .iter()
            .chain(service.ports.iter())
            .find(|p| p.service_port == service_port && p.target_port != 0)
            .map_or(dst.port(), |p| p.target_port as u16);
        return to_workload(endpoint, target_port).unwrap_or(Route::Passthrough(dst));
    }
    if let Some(w) = state.workload_by_ip(dst.ip()) {
        if speaks_hbone(w)
            && let Some(gw) = &w.waypoint
            && let Some(r) = via_waypoint(state, gw, dst, lb)
        {
            return r;
        }
        return to_workload(w, dst.port()).unwrap_or(Route::Passthrough(dst));
    }
    Route::Passthrough(dst)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use proto::api::istio::workload::{NamespacedHostname, NetworkAddress, Port, PortList, Service};

    use super::*;

    fn workload(name: &str, ip: [u8; 4], hbone: bool, services: &[(&str, u32, u32)]) -> Workload {
        let mut by_service: HashMap<String, PortList> = HashMap::new();
        for (svc, sp, tp) in services {
            by_service.entry(svc.to_string()).or_default().ports.push(Port { service_port: *sp, target_port: *tp });
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
            addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec() }],
            ports: vec![Port { service_port: port, target_port: target }],
            ..Default::default()
        }
    }

    fn state(workloads: Vec<Workload>, services: Vec<(&str, Service)>) -> MeshState {
        let mut s = MeshState::default();
        for w in workloads {
            s.insert_workload_for_test(w);
        }
        for (k, svc) in services {
            s.insert_service(k.into(), svc);
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
    fn a_service_without_healthy_endpoints_is_reported() {
        let mut sick = workload("a", [10, 0, 0, 1], true, &[(KEY, 80, 8080)]);
        sick.status = WorkloadStatus::Unhealthy as i32;
        let s = state(vec![sick], vec![(KEY, service([10, 96, 0, 1], 80, 8080))]);
        assert_eq!(
            route(&s, "10.96.0.1:80".parse().unwrap(), &Balancer::default()),
            Route::NoHealthyEndpoint(KEY.into())
        );
    }
}

/// The original destination of a redirected connection (`SO_ORIGINAL_DST`, set by the capture
/// rule's REDIRECT).
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// Carries one pod's outbound connections.
#[derive(Debug)]
pub struct Outbound {
    view: std::sync::Arc<crate::xds::MeshView>,
    certs: std::sync::Arc<crate::certs::CertManager>,
    pool: proto::hbone::pool::Pool,
    /// The pod's identity (its certificate is presented).
    source: SpiffeId,
    lb: Balancer,
}

impl Outbound {
    /// For the pod with identity `source`.
    pub fn new(
        view: std::sync::Arc<crate::xds::MeshView>,
        certs: std::sync::Arc<crate::certs::CertManager>,
        pool: proto::hbone::pool::Pool,
        source: SpiffeId,
    ) -> Self {
        Outbound { view, certs, pool, source, lb: Balancer::default() }
    }

    /// Proxies `downstream` (from the app at `client`) to `dst` (its original destination) until
    /// both sides close. `passthrough` opens plain connections (from the pod's namespace).
    pub async fn handle<F, Fut>(
        &self,
        downstream: tokio::net::TcpStream,
        client: SocketAddr,
        dst: SocketAddr,
        passthrough: F,
    ) where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>>,
    {
        let decision = self.view.read(|state| route(state, dst, &self.lb));
        match decision {
            Route::Hbone { hbone, target, identities, workload } => {
                let credential = match self.certs.fetch(&self.source).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(src.identity = %self.source, dst = %dst, error = %e, "outbound: no certificate for the source; closing");
                        return;
                    }
                };
                let request = proto::hbone::pool::ConnectRequest::new(credential, hbone, identities, target)
                    .forwarded_for(client);
                let tunnel = match self.pool.connect(request).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::info!(src.identity = %self.source, dst = %dst, dst.workload = %workload, error = %e, "outbound refused");
                        return;
                    }
                };
                match proto::hbone::copy::copy_bidirectional(downstream, tunnel).await {
                    Ok(t) => {
                        tracing::info!(src.identity = %self.source, dst = %dst, dst.workload = %workload, via = %hbone,
                        bytes_sent = t.sent, bytes_received = t.received, "outbound connection complete")
                    }
                    Err(e) => {
                        tracing::info!(src.identity = %self.source, dst = %dst, dst.workload = %workload, error = %e,
                        "outbound connection ended with an error")
                    }
                }
            }
            Route::Passthrough(to) => {
                let mut downstream = downstream;
                match passthrough(to).await {
                    Ok(mut upstream) => {
                        let result = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                        tracing::info!(src.identity = %self.source, dst = %to, result = ?result, "passthrough connection complete");
                    }
                    Err(e) => {
                        tracing::info!(src.identity = %self.source, dst = %to, error = %e, "passthrough connect failed")
                    }
                }
            }
            Route::NoHealthyEndpoint(service) => {
                tracing::warn!(src.identity = %self.source, dst = %dst, %service, "outbound: no healthy endpoint; closing");
            }
        }
    }
}
