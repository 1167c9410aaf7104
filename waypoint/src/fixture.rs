//! A mesh built in memory for the request pipeline's unit tests: service `web` in namespace
//! `shop` (VIP 10.96.0.1, port 80 → 8080) with endpoints `web-v1` (10.0.0.1) and `web-v2`
//! (10.0.0.2), a shadow endpoint (10.0.0.3) for mirrors, a client at 10.0.0.9, and helpers for routes, policies and request heads.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use http::request::Parts;
use proto::api::ambient::waypoint::v1 as pb;
use proto::api::istio::workload as wl;
use proto::state::{MeshState, Service, Workload};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::jwt::KeyCache;
use crate::plan::{self, Env, Head, Planned};
use crate::proxy::Downstream;
use crate::route::Regexes;
use crate::target::Destination;

pub(crate) const KEY: &str = "shop/web.shop.svc.cluster.local";
pub(crate) const V1: &str = "Kubernetes//Pod/shop/web-v1";
pub(crate) const V2: &str = "Kubernetes//Pod/shop/web-v2";
/// The ingress gateway's own pod address (the gateway tests).
pub(crate) const GATEWAY_IP: [u8; 4] = [10, 0, 0, 50];

/// The labels the gateway tests' gateway pod carries (what their Gateways select).
pub(crate) fn gateway_labels() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([("istio".to_owned(), "ingressgateway".to_owned())])
}

/// The gateway tests' gateway pod (istio-system/ingress at [`GATEWAY_IP`]), with the names of the
/// selector policies that apply to it.
pub(crate) fn gateway_pod(policies: &[&str]) -> wl::Workload {
    wl::Workload {
        uid: "Kubernetes//Pod/istio-system/ingress".into(),
        name: "ingress".into(),
        namespace: "istio-system".into(),
        addresses: vec![GATEWAY_IP.to_vec()],
        service_account: "ingress".into(),
        authorization_policies: policies.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    }
}

/// A service with no VIP whose one endpoint (10.0.0.3) takes mirrored requests.
pub(crate) const SHADOW_KEY: &str = "shop/shadow.shop.svc.cluster.local";

fn workload(name: &str, ip: [u8; 4], service_key: &str) -> Workload {
    let ports = wl::PortList { ports: vec![wl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }] };
    Workload::from_pb(wl::Workload {
        uid: format!("Kubernetes//Pod/shop/{name}"),
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: "web".into(),
        services: HashMap::from([(service_key.to_owned(), ports)]),
        ..Default::default()
    })
    .unwrap()
}

/// The mesh: `web` and its two endpoints, no routes, no policies.
pub(crate) fn state() -> MeshState {
    let mut s = MeshState::default();
    s.insert_workload(workload("web-v1", [10, 0, 0, 1], KEY));
    s.insert_workload(workload("web-v2", [10, 0, 0, 2], KEY));
    s.insert_workload(workload("shadow", [10, 0, 0, 3], SHADOW_KEY));
    s.insert_service(
        Service::from_pb(wl::Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            addresses: vec![wl::NetworkAddress { network: String::new(), address: vec![10, 96, 0, 1], length: None }],
            ports: vec![wl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }],
            ..Default::default()
        })
        .unwrap(),
    );
    s
}

/// `web` routed by one HTTPRoute with `rules`.
pub(crate) fn with_rules(mut s: MeshState, rules: Vec<pb::RouteRule>) -> MeshState {
    let route = pb::Route { name: "shop/web-route".into(), rules, ..Default::default() };
    let routes = pb::ServiceRoutes {
        namespace: "shop".into(),
        hostname: "web.shop.svc.cluster.local".into(),
        routes: vec![route],
    };
    s.routes.insert(KEY.to_owned(), Arc::new(routes));
    s
}

/// A backend: `web`, or its subset `name` of the workloads `members`.
pub(crate) fn backend(weight: u32, subset: Option<(&str, &[&str])>) -> pb::Backend {
    pb::Backend {
        service: KEY.into(),
        port: 80,
        weight,
        subset: subset.map(|(n, _)| n.to_owned()).unwrap_or_default(),
        workloads: subset.map(|(_, m)| m.iter().map(|s| (*s).to_owned()).collect()).unwrap_or_default(),
    }
}

/// A rule matching every request, sent to `web`.
pub(crate) fn rule() -> pb::RouteRule {
    pb::RouteRule { name: "all".into(), backends: vec![backend(1, None)], ..Default::default() }
}

/// The client `spiffe://cluster.local/ns/shop/sa/client` at 10.0.0.9, calling `web:80`.
pub(crate) fn downstream() -> Downstream {
    Downstream {
        peer: "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap(),
        source_ip: Some("10.0.0.9".parse().unwrap()),
        source_workload: Some("client".into()),
        target: SocketAddr::from(([10, 96, 0, 1], 80)),
    }
}

/// The head of `method path` to `web`, with `headers`.
pub(crate) fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Head {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let parts: Parts = request.body(()).unwrap().into_parts().0;
    Head { path: parts.uri.path().to_owned(), host: "web.shop.svc.cluster.local".into(), parts }
}

/// What planning needs, for the waypoint `shop/waypoint`.
pub(crate) struct Waypoint {
    pub(crate) regexes: Regexes,
    pub(crate) jwt_keys: KeyCache,
}

impl Waypoint {
    pub(crate) fn new() -> Self {
        Waypoint { regexes: Regexes::default(), jwt_keys: KeyCache::default() }
    }

    /// Plans `head` against `state` with the dice seeded by `seed`.
    pub(crate) fn plan(&self, state: &MeshState, head: Head, seed: u64) -> Planned {
        let env = Env { gateway: ("shop", "waypoint"), regexes: &self.regexes, jwt_keys: &self.jwt_keys };
        let down = downstream();
        let destination = Destination::at(state, down.target.ip()).unwrap();
        plan::plan(&env, state, &down, &destination, head, &mut StdRng::seed_from_u64(seed))
    }
}
