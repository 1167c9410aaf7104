//! What the mesh would do with a connection now (`GET /debug/explain?from=<ns>/<pod>&to=<dest>`,
//! `ambientctl explain`).
//!
//! Computed by ztunnel's own decision code — [`proto::route`] (where the connection goes) and
//! [`proto::rbac`] (the destination's L4 policies) — on the state the CA pushes to every ztunnel,
//! rebuilt the way a ztunnel builds it ([`proto::xds::MeshView`] applying the resources). So the
//! explanation and the decision cannot drift apart: they are one function.
//!
//! The destination is `<ns>/<pod>:<port>`, a service `<host>:<port>` (its hostname, or
//! `<name>.<ns>` / `<name>.<ns>.svc`), or `<ip>:<port>`. Explained: the source's identity; the
//! service and its endpoints; the waypoint on the path and why; the hop ztunnel takes (HBONE to whom,
//! expecting which identity, or plaintext, or a refusal); at the destination's ztunnel, every L4
//! AuthorizationPolicy that applies with whether it matched, and the verdict. When a waypoint is on
//! the path, what it does with an HTTP request (method, path, headers; `GET /` by default):
//! [`waypoint::explain::request`] — the waypoint's own planning steps — on the state the CA pushes
//! to waypoints ([`explain_request`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proto::api::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use proto::api::type_url::{ADDRESS, AUTHORIZATION, MESH_SETTINGS};
use proto::rbac::{self, Connection, Decision, PolicyVerdict};
use proto::route::{self, Balancer, Route};
use proto::state::{MeshState, Workload};
use proto::state::{Waypoint, WaypointAt};
use proto::tls::SharedTrustBundle;
use serde::Serialize;

use crate::xds::resources::Resources;

/// Why a question cannot be answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    /// The source is neither `<ns>/<pod>` nor the address of a workload the mesh knows.
    #[error("source {0:?}: no workload of that <namespace>/<name> or address is known")]
    UnknownSource(String),
    /// The destination cannot be read or resolved.
    #[error("destination {0:?}: {1}")]
    Destination(String, String),
    /// The HTTP request asked about cannot be explained.
    #[error("request: {0}")]
    Request(String),
}

/// One end of the connection.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct End {
    /// `<namespace>/<name>`.
    pub workload: String,
    /// Its SPIFFE ID.
    pub identity: String,
    /// Its address.
    pub address: Option<IpAddr>,
    /// Its node.
    pub node: String,
    /// Whether it is in the mesh (its traffic is captured, it speaks HBONE).
    pub in_mesh: bool,
}

impl End {
    fn of(w: &Workload) -> End {
        End {
            workload: format!("{}/{}", w.namespace, w.name),
            identity: w.identity.to_string(),
            address: w.primary_address(),
            node: w.node.clone(),
            in_mesh: w.speaks_hbone(),
        }
    }
}

/// The service addressed.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `<namespace>/<hostname>`.
    pub key: String,
    /// Its hostname.
    pub hostname: String,
    /// Its endpoints (`<namespace>/<name>`), healthy ones only.
    pub endpoints: Vec<String>,
}

/// The waypoint on the path.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct WaypointInfo {
    /// The waypoint workload the hop reaches.
    pub workload: String,
    /// Its identity, which the hop expects.
    pub identity: String,
    /// Why traffic goes through it.
    pub reason: String,
    /// Its Gateway (`<namespace>/<name>`): L7 policies bound to it apply.
    pub gateway: String,
}

/// The L4 decision at the destination's ztunnel.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Authorization {
    /// Where it is taken.
    pub at: String,
    /// The identity it authorizes (from the TLS handshake).
    pub peer_identity: String,
    /// `ALLOW` or `DENY`.
    pub verdict: &'static str,
    /// The policy that decided (the matching DENY, or the matching ALLOW), or why none did.
    pub reason: String,
    /// Every policy that applies, in evaluation order.
    pub policies: Vec<PolicyVerdict>,
}

/// The answer.
#[derive(Debug, Serialize, PartialEq)]
pub struct Explanation {
    /// The client.
    pub source: End,
    /// The address the client connects to.
    pub destination_address: SocketAddr,
    /// The service of that address, if it is a service VIP.
    pub service: Option<ServiceInfo>,
    /// The waypoint the connection goes through, if any.
    pub waypoint: Option<WaypointInfo>,
    /// What the source's ztunnel does with the connection.
    pub hop: String,
    /// The workload the hop reaches last (the endpoint chosen, or the pod addressed).
    pub destination: Option<End>,
    /// The L4 decision at the destination's ztunnel (none: no ztunnel on the destination side).
    pub authorization: Option<Authorization>,
    /// The outcome in one line.
    pub outcome: String,
    /// What the waypoint on the path does with the HTTP request asked about.
    pub request: Option<waypoint::explain::RequestExplanation>,
    /// What this explanation leaves out.
    pub not_explained: Vec<String>,
}

/// The HTTP request to explain at a waypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpQuestion {
    /// Method.
    pub method: String,
    /// Path, with the query if any.
    pub path: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

impl Default for HttpQuestion {
    fn default() -> Self {
        HttpQuestion { method: "GET".into(), path: "/".into(), headers: Vec::new() }
    }
}

/// The state as a ztunnel holds it, from the resources the CA serves (`trust`: the bundle the
/// view starts from; the resources applied here do not touch it).
pub fn ztunnel_view(resources: &Resources, trust: Arc<SharedTrustBundle>) -> Arc<proto::xds::MeshView> {
    view_of(resources, &[MESH_SETTINGS, ADDRESS, AUTHORIZATION], trust)
}

/// The state as a waypoint holds it (the types it subscribes to), from the resources the CA serves.
pub fn waypoint_view(resources: &Resources, trust: Arc<SharedTrustBundle>) -> Arc<proto::xds::MeshView> {
    let types: Vec<&'static str> =
        waypoint::SUBSCRIBED.into_iter().filter(|t| *t != proto::api::type_url::TRUST_BUNDLE).collect();
    view_of(resources, &types, trust)
}

fn view_of(resources: &Resources, types: &[&'static str], trust: Arc<SharedTrustBundle>) -> Arc<proto::xds::MeshView> {
    let view = proto::xds::MeshView::new(types, trust);
    for &type_url in types {
        let Some(of_type) = resources.of_type(type_url) else { continue };
        let response = DeltaDiscoveryResponse {
            type_url: type_url.to_owned(),
            resources: of_type
                .by_name
                .values()
                .map(|r| Resource {
                    name: r.name.to_string(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        for error in view.apply(&response) {
            tracing::warn!(%error, "explain: a resource the CA serves does not decode as its proxy decodes it");
        }
    }
    view
}

/// The Gateway of a waypoint (namespace, name): the Service it is reached through is named after
/// it, as Istio names a waypoint's Service after its Gateway.
fn gateway_of(state: &MeshState, waypoint: &Waypoint) -> Option<(String, String)> {
    let service = match &waypoint.at {
        WaypointAt::Service(key) => state.service(key),
        WaypointAt::Address(ip) => state.service_by_vip(*ip),
    };
    match (service, &waypoint.at) {
        (Some(s), _) => Some((s.namespace.clone(), s.name.clone())),
        (None, WaypointAt::Address(ip)) => state.workload_by_ip(*ip).map(|w| (w.namespace.clone(), w.name.clone())),
        (None, WaypointAt::Service(_)) => None,
    }
}

/// Adds to `explanation`, whose connection goes through a waypoint, what that waypoint does with
/// the HTTP request `question`; `state` is the waypoint's (see [`waypoint_view`]).
pub fn explain_request(
    explanation: &mut Explanation,
    state: &MeshState,
    question: &HttpQuestion,
) -> Result<(), ExplainError> {
    let Some(gw) = &explanation.waypoint else { return Ok(()) };
    let gateway = gw.gateway.split_once('/').unwrap_or(("", &gw.gateway));
    let peer: proto::SpiffeId = explanation
        .source
        .identity
        .parse()
        .map_err(|_| ExplainError::UnknownSource(explanation.source.workload.clone()))?;
    let request = waypoint::explain::Request {
        method: &question.method,
        path: &question.path,
        headers: &question.headers,
        port: explanation.destination_address.port(),
        peer: &peer,
        source_ip: explanation.source.address,
    };
    let answer = waypoint::explain::request(state, gateway, explanation.destination_address.ip(), &request)
        .map_err(|e| ExplainError::Request(e.to_string()))?;
    explanation.outcome = answer.outcome.clone();
    explanation.request = Some(answer);
    Ok(())
}

/// The workload `<namespace>/<name>`.
fn workload_named<'a>(state: &'a MeshState, name: &str) -> Option<&'a Arc<Workload>> {
    let (ns, name) = name.split_once('/')?;
    state.workloads().find(|w| w.namespace == ns && w.name == name)
}

/// The address `to` names.
fn destination_address(state: &MeshState, to: &str) -> Result<SocketAddr, ExplainError> {
    let bad = |why: &str| ExplainError::Destination(to.to_owned(), why.to_owned());
    if let Ok(addr) = to.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) =
        to.rsplit_once(':').ok_or_else(|| bad("expected <ns>/<pod>:<port>, <host>:<port> or <ip>:<port>"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    if host.contains('/') {
        let w = workload_named(state, host).ok_or_else(|| bad("no such workload"))?;
        let ip = w.primary_address().ok_or_else(|| bad("the workload has no address"))?;
        return Ok(SocketAddr::new(ip, port));
    }
    let candidates = [host.to_owned(), format!("{host}.cluster.local"), format!("{host}.svc.cluster.local")];
    let service = candidates
        .iter()
        .find_map(|h| state.services_by_hostname(h).next())
        .ok_or_else(|| bad("no service of that hostname"))?;
    let vip = service.vips.first().ok_or_else(|| bad("the service has no VIP (headless or DNS-resolved)"))?;
    Ok(SocketAddr::new(*vip, port))
}

/// Says which object's label binds a service or pod to its waypoint: `(namespace, service, pod)`
/// → e.g. `istio.io/use-waypoint=waypoint on Namespace web` (`crate::translate::waypoint_binding`).
pub type BindingSource<'a> = &'a dyn Fn(&str, Option<&str>, Option<&str>) -> Option<String>;

/// Explains a connection from workload `from` (`<ns>/<pod>`) to `to`; `binding` names the label
/// that put a waypoint on the path.
pub fn explain(
    state: &MeshState,
    from: &str,
    to: &str,
    binding: BindingSource<'_>,
) -> Result<Explanation, ExplainError> {
    let by_ip = || from.parse::<IpAddr>().ok().and_then(|ip| state.workload_by_ip(ip));
    let source =
        workload_named(state, from).or_else(by_ip).ok_or_else(|| ExplainError::UnknownSource(from.to_owned()))?;
    let dst = destination_address(state, to)?;
    let service = state.service_by_vip(dst.ip());
    let service_info = service.map(|s| ServiceInfo {
        key: s.key.clone(),
        hostname: s.hostname.clone(),
        endpoints: state
            .endpoints(&s.key)
            .filter(|w| w.healthy)
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect(),
    });
    let mut not_explained = Vec::new();
    let mut explanation = Explanation {
        source: End::of(source),
        destination_address: dst,
        service: service_info,
        waypoint: None,
        hop: String::new(),
        destination: None,
        authorization: None,
        outcome: String::new(),
        request: None,
        not_explained: Vec::new(),
    };
    if !source.speaks_hbone() {
        explanation.hop = "none: the source is not in the mesh, so its traffic is not captured".into();
        explanation.outcome = "plain TCP, straight from the source; the mesh takes no part".into();
        return Ok(explanation);
    }
    let addressed = state.workload_by_ip(dst.ip());
    let (outcome, hop) = match route::route(state, dst, &Balancer::default()) {
        Route::Hbone { hbone, target, identities, workload } => {
            let reached = state.workload(&workload);
            let names = identities.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            let hop = format!("HBONE (mutual TLS) to {hbone}, CONNECT {target}, expecting {names}");
            let via_service = service.and_then(|s| s.waypoint.as_ref().map(|_| s));
            let via_pod = addressed.filter(|w| w.waypoint.is_some());
            if let (Some(gw), true) = (reached, via_service.is_some() || via_pod.is_some()) {
                let label = |ns: &str, svc, pod| {
                    binding(ns, svc, pod).unwrap_or_else(|| "istio.io/use-waypoint on it or its namespace".into())
                };
                let reason = match (via_service, via_pod) {
                    (Some(s), _) => format!(
                        "service {} is bound to it: {}",
                        s.key,
                        label(&s.namespace, Some(s.name.as_str()), None)
                    ),
                    (None, Some(w)) => format!(
                        "workload {}/{} is bound to it: {}",
                        w.namespace,
                        w.name,
                        label(&w.namespace, None, Some(w.name.as_str()))
                    ),
                    (None, None) => unreachable!("checked above"),
                };
                let waypoint = via_service.and_then(|s| s.waypoint.as_ref()).or_else(|| via_pod?.waypoint.as_ref());
                let gateway = waypoint
                    .and_then(|w| gateway_of(state, w))
                    .unwrap_or_else(|| (gw.namespace.clone(), gw.name.clone()));
                explanation.waypoint = Some(WaypointInfo {
                    workload: format!("{}/{}", gw.namespace, gw.name),
                    identity: gw.identity.to_string(),
                    reason,
                    gateway: format!("{}/{}", gateway.0, gateway.1),
                });
                not_explained.push(
                    "the hop from the waypoint to the endpoint it picks, and the L4 policy at that endpoint's \
                     ztunnel (where the waypoint's identity is the peer)"
                        .into(),
                );
                ("to the waypoint, which decides the rest".to_owned(), hop)
            } else if let Some(w) = reached {
                explanation.destination = Some(End::of(w));
                let conn = Connection {
                    source: Some(&source.identity),
                    source_ip: source.primary_address().unwrap_or(IpAddr::from([0, 0, 0, 0])),
                    destination_ip: target.ip(),
                    destination_port: target.port(),
                };
                let (decision, policies) = rbac::explain(state, w, &conn);
                let (verdict, reason) = match &decision {
                    Decision::Allow(Some(p)) => ("ALLOW", format!("allowed by {p}")),
                    Decision::Allow(None) => ("ALLOW", "no ALLOW policy applies and no DENY policy matches".into()),
                    Decision::DeniedBy(p) => ("DENY", format!("denied by {p}")),
                    Decision::NotAllowed => ("DENY", "ALLOW policies apply and none matches".into()),
                };
                let outcome = if decision.allowed() {
                    format!("connected to {}/{} at {target}", w.namespace, w.name)
                } else {
                    format!("refused by {}/{}'s ztunnel (HBONE 401): {reason}", w.namespace, w.name)
                };
                explanation.authorization = Some(Authorization {
                    at: format!("the ztunnel of node {}", w.node),
                    peer_identity: source.identity.to_string(),
                    verdict,
                    reason,
                    policies,
                });
                (outcome, hop)
            } else {
                ("the reached workload is not in the state".to_owned(), hop)
            }
        }
        Route::Passthrough(to) => {
            explanation.destination = addressed.map(|w| End::of(w));
            let hop = format!("plain TCP to {to} (the destination is not in the mesh: no tunnel, no policy)");
            (format!("passed through to {to}"), hop)
        }
        Route::Resolve(host, port) => {
            (format!("passed through to {host}:{port}"), format!("plain TCP to what {host} resolves to, port {port}"))
        }
        Route::Unregistered(to) => (
            "refused".into(),
            format!("none: {to} is not known to the mesh and outboundTrafficPolicy is REGISTRY_ONLY"),
        ),
        Route::NoHealthyEndpoint(what) => ("refused".into(), format!("none: {what} has no healthy endpoint")),
        Route::Refused(why) => ("refused".into(), format!("none: the ztunnel refused the workload there ({why})")),
    };
    explanation.hop = hop;
    explanation.outcome = outcome;
    explanation.not_explained = not_explained;
    Ok(explanation)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proto::api::istio::workload as pb;

    use super::*;

    fn state() -> MeshState {
        let mut state = MeshState::default();
        let w = pb::Workload {
            uid: "Kubernetes//Pod/demo/client".into(),
            name: "client".into(),
            namespace: "demo".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
            trust_domain: "cluster.local".into(),
            service_account: "client".into(),
            ..Default::default()
        };
        state.insert_workload(Workload::from_pb(w).unwrap());
        state
    }

    #[test]
    fn questions_it_cannot_answer_say_why() {
        let s = state();
        let none = |_: &str, _: Option<&str>, _: Option<&str>| None;
        let err = |from: &str, to: &str| explain(&s, from, to, &none).unwrap_err().to_string();
        assert_eq!(
            err("demo/nobody", "10.0.0.9:80"),
            "source \"demo/nobody\": no workload of that <namespace>/<name> or address is known"
        );
        assert_eq!(
            err("client", "10.0.0.9:80"),
            "source \"client\": no workload of that <namespace>/<name> or address is known"
        );
        for (to, why) in [
            ("demo/client", "expected <ns>/<pod>:<port>, <host>:<port> or <ip>:<port>"),
            ("demo/client:http", "the port is not a number"),
            ("demo/client:70000", "the port is not a number"),
            ("demo/gone:80", "no such workload"),
            ("nothing.demo:80", "no service of that hostname"),
        ] {
            assert_eq!(err("demo/client", to), format!("destination {to:?}: {why}"));
        }
        // To itself by name: the pod's own address, over HBONE (no policy applies).
        let e = explain(&s, "demo/client", "demo/client:8080", &none).unwrap();
        assert_eq!(e.destination_address, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(e.authorization.unwrap().verdict, "ALLOW");
        // An address the mesh does not know is passed through (ALLOW_ANY, the default).
        let e = explain(&s, "demo/client", "192.0.2.1:443", &none).unwrap();
        assert_eq!((e.outcome.as_str(), e.authorization), ("passed through to 192.0.2.1:443", None));
    }
}
