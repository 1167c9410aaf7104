//! Where a tunnel's traffic goes, for HTTP requests and TCP streams alike: the service or pod at
//! the tunnel's address, the policies bound to it, and the endpoints a backend has with the
//! DestinationRule that governs them. Reads of the mesh state only; nothing here waits or sends.

use std::net::IpAddr;
use std::sync::Arc;

use proto::api::ambient::waypoint::v1::DestinationPolicy;
use proto::state::{MeshState, Service, WaypointAt, Workload};

use crate::authz::{self, AuthzInput, Decision};

/// Where a tunnel is going, resolved from its target address.
#[derive(Debug, Clone)]
pub(crate) enum Destination {
    /// A service.
    Service(Arc<Service>),
    /// A pod addressed directly.
    Workload(Arc<Workload>),
}

impl Destination {
    /// The service or pod at `ip`.
    pub(crate) fn at(state: &MeshState, ip: IpAddr) -> Option<Destination> {
        match state.service_by_vip(ip) {
            Some(svc) => Some(Destination::Service(svc.clone())),
            None => state.workload_by_ip(ip).cloned().map(Destination::Workload),
        }
    }

    /// The service's `namespace`, `name`, for policy targets (`None` for a pod).
    pub(crate) fn service_ref(&self) -> Option<(&str, &str)> {
        match self {
            Destination::Service(s) => Some((s.namespace.as_str(), s.name.as_str())),
            Destination::Workload(_) => None,
        }
    }
}

/// An authorization decision, with what the dry-run policies would have decided (for the log
/// and metrics; `None` when no dry-run policy applies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// What is enforced.
    pub(crate) decision: Decision,
    /// What would be, with the dry-run policies enforced too.
    pub(crate) dry_run: Option<Decision>,
}

/// The policy decision for `input`, a connection or request to `destination`, over the policies
/// bound to the Gateway `gateway` (namespace, name) or to the destination's Service.
pub(crate) fn authorize(
    state: &MeshState,
    gateway: (&str, &str),
    destination: Option<&Destination>,
    input: &AuthzInput<'_>,
) -> Verdict {
    let service = destination.and_then(Destination::service_ref);
    let applicable = state.l7_policies.targeting(gateway, service);
    let policies = || applicable.iter().map(|(_, p)| p.as_ref());
    Verdict { decision: authz::decide(policies(), input), dry_run: authz::dry_run(policies(), input) }
}

/// An endpoint pod and the port it serves the backend on.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) workload: Arc<Workload>,
    pub(crate) port: u16,
    /// The address requests name when it is not the pod's own: a service VIP, for a waypoint pod
    /// that takes the service's traffic (see [`Backend::through_waypoint`]).
    pub(crate) address: Option<IpAddr>,
}

/// A pod of `service`'s waypoint that can take traffic, if the service has a waypoint.
pub(crate) fn waypoint_of(state: &MeshState, service: &Service) -> Option<Arc<Workload>> {
    let pod = |key: &str| state.endpoints(key).find(|w| w.healthy).cloned();
    match &service.waypoint.as_ref()?.at {
        WaypointAt::Address(ip) => match state.service_by_vip(*ip) {
            Some(svc) => pod(&svc.key),
            None => state.workload_by_ip(*ip).cloned(),
        },
        WaypointAt::Service(key) => pod(key),
    }
}

impl AsRef<Workload> for Endpoint {
    fn as_ref(&self) -> &Workload {
        &self.workload
    }
}

/// Healthy endpoints of `service_key` serving `port`, with the port to reach them on.
pub(crate) fn endpoints(state: &MeshState, service_key: &str, port: u16) -> Vec<Endpoint> {
    state
        .endpoints(service_key)
        .filter(|w| w.healthy)
        .filter_map(|w| {
            let p = w.services.get(service_key)?.iter().find(|p| p.service_port == port)?;
            Some(Endpoint { workload: w.clone(), port: p.target_port.unwrap_or(p.service_port), address: None })
        })
        .collect()
}

/// What traffic is sent to: a service (or one subset of it) or a pod, its endpoints, and the
/// DestinationRule policy that governs them.
#[derive(Debug, Clone)]
pub(crate) struct Backend {
    /// Names the backend's limits, balancing and ejections: the service key, `<key>#<subset>`
    /// for a subset (a destination of its own), empty for a pod addressed directly.
    pub(crate) key: String,
    /// Where it can be sent.
    pub(crate) endpoints: Vec<Endpoint>,
    service_policy: Option<Arc<DestinationPolicy>>,
    subset: Option<String>,
    /// The service port it is sent to (0 for a pod addressed directly).
    service_port: u16,
    /// Sent to the service's waypoint, which applies the service's policy itself.
    via_waypoint: bool,
}

impl Backend {
    /// Its name as Envoy names a cluster (`outbound|<port>|<subset>|<host>`), for spans.
    pub(crate) fn cluster(&self) -> String {
        let service = self.key.split('#').next().unwrap_or_default();
        let host = service.split_once('/').map_or(service, |(_, h)| h);
        format!("outbound|{}|{}|{}", self.service_port, self.subset.as_deref().unwrap_or_default(), host)
    }

    /// The endpoints of `service_key` on `port`, or of its `subset` (the workloads named
    /// `members`), under the service's policy (the subset's own when it has one).
    pub(crate) fn service(
        state: &MeshState,
        service_key: &str,
        port: u16,
        subset: Option<(&str, &[String])>,
    ) -> Backend {
        let mut endpoints = endpoints(state, service_key, port);
        if let Some((_, members)) = subset {
            endpoints.retain(|e| members.contains(&e.workload.uid));
        }
        Backend {
            key: match subset {
                Some((name, _)) => format!("{service_key}#{name}"),
                None => service_key.to_owned(),
            },
            endpoints,
            service_policy: state.destination_policies.get(service_key).cloned(),
            subset: subset.map(|(name, _)| name.to_owned()),
            service_port: port,
            via_waypoint: false,
        }
    }

    /// The same backend reached through `service`'s waypoint pod `waypoint`: one endpoint, the
    /// waypoint, with requests naming the service's VIP and port (the waypoint routes them and
    /// applies the service's policies; a subset chosen here is not kept). `None` when the service
    /// has no VIP.
    pub(crate) fn through_waypoint(mut self, service: &Service, waypoint: Arc<Workload>) -> Option<Backend> {
        let vip = *service.vips.first()?;
        self.endpoints = vec![Endpoint { workload: waypoint, port: self.service_port, address: Some(vip) }];
        self.via_waypoint = true;
        Some(self)
    }

    /// What `destination` itself is on `port`: the service's endpoints, or the pod.
    pub(crate) fn of(state: &MeshState, destination: &Destination, port: u16) -> Backend {
        match destination {
            Destination::Service(svc) => Backend::service(state, &svc.key, port, None),
            Destination::Workload(w) => Backend {
                key: String::new(),
                endpoints: vec![Endpoint { workload: w.clone(), port, address: None }],
                service_policy: None,
                subset: None,
                service_port: 0,
                via_waypoint: false,
            },
        }
    }

    /// The service port whose DestinationRule TLS this proxy originates to the endpoints: `None`
    /// for a pod addressed directly, and when the service's waypoint is the next hop (the
    /// waypoint originates it).
    pub(crate) fn tls_port(&self) -> Option<u16> {
        (self.service_policy.is_some() && !self.via_waypoint).then_some(self.service_port)
    }

    /// The DestinationRule policy: the subset's when it has its own, else the service's.
    pub(crate) fn policy(&self) -> Option<&DestinationPolicy> {
        let service = self.service_policy.as_deref()?;
        Some(self.subset.as_ref().and_then(|s| service.subsets.get(s)).unwrap_or(service))
    }
}
