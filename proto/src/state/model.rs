//! Workloads and services as the proxies use them, converted from `istio.workload.Address` once,
//! when the control plane sends them: addresses are `IpAddr`s, the identity a [`SpiffeId`], the
//! enums Rust enums. A message that cannot be converted is refused whole ([`ModelError`], which
//! the xDS client NACKs with the resource's name) rather than half applied.
//!
//! Where the control plane leaves a field empty, Istio's defaults hold: trust domain
//! `cluster.local`, service account `default`.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::SpiffeId;
use crate::api::istio::workload as pb;
use crate::identity::SpiffeIdError;

/// The trust domain of a workload that names none (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The service account of a workload that names none (Istio's default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Why a workload or service from the control plane was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An address is neither 4 nor 16 bytes long.
    #[error("address of {0} bytes (an IP address has 4 or 16)")]
    Address(usize),
    /// A port number above 65535.
    #[error("port {0} is out of range")]
    Port(u32),
    /// The namespace, service account or trust domain do not form a SPIFFE identity.
    #[error("no valid identity")]
    Identity(#[source] SpiffeIdError),
    /// A service without a namespace or hostname (its key would be ambiguous).
    #[error("a service needs a namespace and a hostname")]
    ServiceName,
}

/// An address as the workload API carries it (4 or 16 bytes).
pub fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, ModelError> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).map(IpAddr::from).map_err(|_| ModelError::Address(4)),
        16 => <[u8; 16]>::try_from(b).map(IpAddr::from).map_err(|_| ModelError::Address(16)),
        n => Err(ModelError::Address(n)),
    }
}

/// The addresses of `w` that are addresses, for a workload refused whole: connections to them
/// can still be refused rather than sent around the mesh.
pub fn readable_addresses(w: &pb::Workload) -> Vec<IpAddr> {
    w.addresses.iter().filter_map(|a| ip_from_bytes(a).ok()).collect()
}

fn port(p: u32) -> Result<u16, ModelError> {
    u16::try_from(p).map_err(|_| ModelError::Port(p))
}

/// How a workload is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// Plain TCP (not in the mesh, or a protocol this proxy does not speak).
    None,
    /// HBONE: mutual TLS and HTTP/2 `CONNECT` on the workload's 15008.
    Hbone,
}

/// A service port and the port its endpoints serve it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    /// The port clients connect to.
    pub service_port: u16,
    /// The port the endpoint listens on; `None` when the control plane left it unset.
    pub target_port: Option<u16>,
    /// The application protocol the service declares for it (`UNKNOWN`: not declared, or a value
    /// this proxy does not know; on a workload's own port lists it is always unset).
    pub app_protocol: pb::AppProtocol,
}

impl PortMapping {
    fn from_pb(p: &pb::Port) -> Result<Self, ModelError> {
        let target = port(p.target_port)?;
        Ok(PortMapping {
            service_port: port(p.service_port)?,
            target_port: (target != 0).then_some(target),
            app_protocol: pb::AppProtocol::try_from(p.app_protocol).unwrap_or(pb::AppProtocol::Unknown),
        })
    }
}

fn ports(list: &[pb::Port]) -> Result<Vec<PortMapping>, ModelError> {
    list.iter().map(PortMapping::from_pb).collect()
}

/// The key services are stored and referred to by: `<namespace>/<hostname>`.
pub fn service_key(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}

/// Where a waypoint is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaypointAt {
    /// An address: a service's VIP (one of its endpoints is picked) or a pod's own IP.
    Address(IpAddr),
    /// A service by key (`<namespace>/<hostname>`), reached through one of its endpoints.
    Service(String),
}

/// The waypoint a workload or service is sent through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    /// Where it is.
    pub at: WaypointAt,
    /// Its HBONE port (15008 unless the control plane says otherwise).
    pub hbone_port: u16,
}

impl Waypoint {
    /// `None` for a gateway address without a destination (nothing to send through).
    fn from_pb(gw: &pb::GatewayAddress) -> Result<Option<Self>, ModelError> {
        let at = match &gw.destination {
            None => return Ok(None),
            Some(pb::gateway_address::Destination::Address(a)) => WaypointAt::Address(ip_from_bytes(&a.address)?),
            Some(pb::gateway_address::Destination::Hostname(h)) => {
                WaypointAt::Service(service_key(&h.namespace, &h.hostname))
            }
        };
        let hbone_port = match port(gw.hbone_mtls_port)? {
            0 => crate::hbone::HBONE_PORT,
            p => p,
        };
        Ok(Some(Waypoint { at, hbone_port }))
    }
}

/// A workload (a pod, or a workload entry).
#[derive(Debug, Clone)]
pub struct Workload {
    /// Unique id, e.g. `Kubernetes//Pod/<namespace>/<name>`.
    pub uid: String,
    /// Its name (the pod's).
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The controller's name (e.g. the Deployment's); empty when unknown.
    pub workload_name: String,
    /// `service.istio.io/canonical-name`.
    pub canonical_name: String,
    /// `service.istio.io/canonical-revision`.
    pub canonical_revision: String,
    /// The controller's kind as telemetry names it (`deployment`, `cronjob`, `pod`, `job`).
    pub workload_type: &'static str,
    /// Where it runs: region and zone (`topology.kubernetes.io/*` of its node), when known.
    pub locality: Option<(String, String)>,
    /// Its service account (`default` when the control plane sent none).
    pub service_account: String,
    /// Its trust domain (`cluster.local` when the control plane sent none).
    pub trust_domain: String,
    /// The identity its certificate carries.
    pub identity: SpiffeId,
    /// The node it runs on.
    pub node: String,
    /// The cluster it runs in.
    pub cluster_id: String,
    /// Its addresses, first the one connections are sent to.
    pub addresses: Vec<IpAddr>,
    /// A DNS name to resolve when it has no address (a ServiceEntry endpoint with
    /// `resolution: DNS`): connections go to what the name resolves to at connect time.
    pub hostname: Option<String>,
    /// How it is reached.
    pub tunnel: Tunnel,
    /// Whether it may be sent new connections; a status this proxy does not know counts as not.
    pub healthy: bool,
    /// Its own waypoint, if it has one.
    pub waypoint: Option<Waypoint>,
    /// The services it is an endpoint of (by key), with the ports it serves each on.
    pub services: HashMap<String, Vec<PortMapping>>,
    /// The names (`<namespace>/<name>`) of the selector-scoped L4 policies that select it.
    pub authorization_policies: Vec<String>,
    /// The `baggage` header its ztunnel sends for its connections, formatted once here rather
    /// than per connection (`None` when it says nothing).
    pub baggage: Option<http::HeaderValue>,
}

impl Workload {
    /// Converts what the control plane sent.
    pub fn from_pb(w: pb::Workload) -> Result<Self, ModelError> {
        let addresses = w.addresses.iter().map(|a| ip_from_bytes(a)).collect::<Result<Vec<_>, _>>()?;
        let trust_domain = non_empty_or(w.trust_domain, DEFAULT_TRUST_DOMAIN);
        let service_account = non_empty_or(w.service_account, DEFAULT_SERVICE_ACCOUNT);
        let identity = SpiffeId::new(&trust_domain, &w.namespace, &service_account).map_err(ModelError::Identity)?;
        let tunnel = if w.tunnel_protocol == pb::TunnelProtocol::Hbone as i32 || w.native_tunnel {
            Tunnel::Hbone
        } else {
            Tunnel::None
        };
        let waypoint = match &w.waypoint {
            Some(gw) => Waypoint::from_pb(gw)?,
            None => None,
        };
        let services = w
            .services
            .iter()
            .map(|(k, list)| Ok((k.clone(), ports(&list.ports)?)))
            .collect::<Result<_, ModelError>>()?;
        let mut workload = Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            workload_name: w.workload_name,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_type: match pb::WorkloadType::try_from(w.workload_type) {
                Ok(pb::WorkloadType::Cronjob) => "cronjob",
                Ok(pb::WorkloadType::Pod) => "pod",
                Ok(pb::WorkloadType::Job) => "job",
                Ok(pb::WorkloadType::Deployment) | Err(_) => "deployment",
            },
            locality: w.locality.as_ref().map(|l| (l.region.clone(), l.zone.clone())),
            service_account,
            trust_domain,
            identity,
            node: w.node,
            cluster_id: w.cluster_id,
            addresses,
            hostname: (!w.hostname.is_empty()).then_some(w.hostname),
            tunnel,
            healthy: w.status == pb::WorkloadStatus::Healthy as i32,
            waypoint,
            services,
            authorization_policies: w.authorization_policies,
            baggage: None,
        };
        let baggage = crate::hbone::Baggage::of_workload(&workload).to_header();
        workload.baggage = (!baggage.is_empty()).then(|| http::HeaderValue::from_str(&baggage).ok()).flatten();
        Ok(workload)
    }

    /// Whether it is reached over HBONE (it is in the mesh).
    pub fn speaks_hbone(&self) -> bool {
        self.tunnel == Tunnel::Hbone
    }

    /// The address connections are sent to.
    pub fn primary_address(&self) -> Option<IpAddr> {
        self.addresses.first().copied()
    }

    /// The controller's name if known, else the pod's.
    pub fn display_name(&self) -> &str {
        if self.workload_name.is_empty() { &self.name } else { &self.workload_name }
    }
}

fn non_empty_or(s: String, default: &str) -> String {
    if s.is_empty() { default.to_owned() } else { s }
}

/// A service.
#[derive(Debug, Clone)]
pub struct Service {
    /// `<namespace>/<hostname>`: how workloads and waypoints refer to it.
    pub key: String,
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its hostname (`<name>.<namespace>.svc.<domain>`).
    pub hostname: String,
    /// Its virtual IPs.
    pub vips: Vec<IpAddr>,
    /// Its ports.
    pub ports: Vec<PortMapping>,
    /// Its waypoint, if it has one: traffic to the service never skips it.
    pub waypoint: Option<Waypoint>,
    /// Connections to it go to the address the client dialed, not to an endpoint (a
    /// ServiceEntry with `resolution: NONE`: load balancing mode `PASSTHROUGH`).
    pub passthrough: bool,
}

impl Service {
    /// Converts what the control plane sent.
    pub fn from_pb(s: pb::Service) -> Result<Self, ModelError> {
        if s.namespace.is_empty() || s.hostname.is_empty() {
            return Err(ModelError::ServiceName);
        }
        let vips = s.addresses.iter().map(|a| ip_from_bytes(&a.address)).collect::<Result<Vec<_>, _>>()?;
        let waypoint = match &s.waypoint {
            Some(gw) => Waypoint::from_pb(gw)?,
            None => None,
        };
        let passthrough =
            s.load_balancing.as_ref().is_some_and(|lb| lb.mode == pb::load_balancing::Mode::Passthrough as i32);
        Ok(Service {
            passthrough,
            key: service_key(&s.namespace, &s.hostname),
            ports: ports(&s.ports)?,
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            waypoint,
        })
    }

    /// The port endpoints serve `service_port` on, by the service's own mapping.
    pub fn target_port(&self, service_port: u16) -> Option<u16> {
        self.port(service_port).and_then(|p| p.target_port)
    }

    /// The application protocol the service declares on `service_port` (`UNKNOWN` for a port it
    /// does not have).
    pub fn app_protocol(&self, service_port: u16) -> pb::AppProtocol {
        self.port(service_port).map_or(pb::AppProtocol::Unknown, |p| p.app_protocol)
    }

    fn port(&self, service_port: u16) -> Option<&PortMapping> {
        self.ports.iter().find(|p| p.service_port == service_port)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn istio_defaults_fill_what_the_control_plane_left_empty() {
        let w = Workload::from_pb(pb::Workload {
            uid: "u".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 1], vec![0; 16]],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(w.identity.as_str(), "spiffe://cluster.local/ns/shop/sa/default");
        assert_eq!(w.addresses, vec!["10.0.0.1".parse::<IpAddr>().unwrap(), "::".parse().unwrap()]);
        assert_eq!(w.tunnel, Tunnel::None);
        assert!(w.healthy);
    }

    #[test]
    fn what_cannot_be_converted_is_refused_with_the_reason() {
        let bad_address =
            pb::Workload { namespace: "shop".into(), addresses: vec![vec![1, 2, 3]], ..Default::default() };
        assert!(matches!(Workload::from_pb(bad_address), Err(ModelError::Address(3))));
        let bad_port = pb::Workload {
            namespace: "shop".into(),
            services: [(
                "shop/a".into(),
                pb::PortList { ports: vec![pb::Port { service_port: 70_000, target_port: 0, app_protocol: 0 }] },
            )]
            .into(),
            ..Default::default()
        };
        assert!(matches!(Workload::from_pb(bad_port), Err(ModelError::Port(70_000))));
        let bad_identity = pb::Workload { namespace: "shop/../x".into(), ..Default::default() };
        assert!(matches!(Workload::from_pb(bad_identity), Err(ModelError::Identity(_))));
        let unnamed = pb::Service { namespace: "shop".into(), ..Default::default() };
        assert!(matches!(Service::from_pb(unnamed), Err(ModelError::ServiceName)));
    }

    #[test]
    fn enums_this_proxy_does_not_know_take_the_safe_side() {
        let w = Workload::from_pb(pb::Workload {
            namespace: "shop".into(),
            status: 7,
            tunnel_protocol: 9,
            waypoint: Some(pb::GatewayAddress {
                destination: Some(pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                    namespace: "shop".into(),
                    hostname: "wp.shop.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 0,
            }),
            ..Default::default()
        })
        .unwrap();
        assert!(!w.healthy, "an unknown status is not healthy");
        assert_eq!(w.tunnel, Tunnel::None, "an unknown tunnel protocol is not HBONE");
        assert_eq!(
            w.waypoint,
            Some(Waypoint { at: WaypointAt::Service("shop/wp.shop.svc.cluster.local".into()), hbone_port: 15008 })
        );
    }
}
