//! The control plane end to end: YAML files on disk → a running `ControlPlane` → a real gRPC
//! delta xDS client. Edits to the files arrive as incremental updates within a second.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ca::ControlPlane;
use ca::translate::MeshConfig;
use prost::Message;
use proto::api::envoy::config::core::v3::Node;
use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use proto::api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use proto::api::istio::security::Authorization;
use proto::api::istio::workload::{Address, TunnelProtocol, address};
use proto::api::type_url::{ADDRESS, AUTHORIZATION};
use proto::testing::eventually;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::support::Mesh;
/// The acceptance bound for an edit to reach a subscribed client.
const PROPAGATION: Duration = Duration::from_secs(1);

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
const NAMESPACE_AMBIENT: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n";

fn pod(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: {name}\nspec:\n  nodeName: node-a\n  serviceAccountName: {name}\n  containers: []\nstatus:\n  podIP: {ip}\n"
    )
}

fn policy(principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow\n  namespace: shop\nspec:\n  rules:\n    - from:\n        - source:\n            principals: [\"{principal}\"]\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: server\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.1\n  selector:\n    app: server\n  ports:\n    - port: 80\n";

trait MeshExt {
    async fn start() -> Mesh;
    async fn client(&self) -> Client;
}

impl MeshExt for Mesh {
    async fn start() -> Mesh {
        let mesh = Mesh::new();
        mesh.write("namespace.yaml", NAMESPACE);
        mesh.write("pods.yaml", &format!("{}---\n{}", pod("sleep", "10.0.0.1"), pod("server", "10.0.0.2")));
        mesh.write("service.yaml", SERVICE);
        mesh.write("policy.yaml", &policy("cluster.local/ns/shop/sa/sleep"));
        mesh.boot().await
    }

    async fn client(&self) -> Client {
        let token = self.token("istio-system", "ztunnel", Some("node-a"));
        Client::connect(self.channel(None), Some(token)).await.unwrap()
    }
}

/// A delta ADS stream, driven by hand.
struct Client {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(channel: Channel, token: Option<String>) -> Result<Client, tonic::Status> {
        let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(channel, proto::control::with_token(token));
        let (tx, rx) = mpsc::channel(16);
        let responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Client { requests: tx, responses })
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        self.requests.send(request).await.unwrap();
    }

    async fn subscribe(&self, type_url: &str, names: &[&str], initial: BTreeMap<String, String>) {
        self.send(DeltaDiscoveryRequest {
            node: Some(Node { id: "ztunnel~test".into(), ..Default::default() }),
            type_url: type_url.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            initial_resource_versions: initial.into_iter().collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self, within: Duration) -> DeltaDiscoveryResponse {
        tokio::time::timeout(within, self.responses.message())
            .await
            .expect("no xDS response in time")
            .unwrap()
            .expect("stream closed")
    }

    async fn expect_silence(&mut self, for_: Duration) {
        if let Ok(m) = tokio::time::timeout(for_, self.responses.message()).await {
            panic!("unexpected xDS message: {m:?}");
        }
    }
}

fn workloads(r: &DeltaDiscoveryResponse) -> BTreeMap<String, proto::api::istio::workload::Workload> {
    r.resources
        .iter()
        .filter_map(|res| match Address::decode(res.resource.as_ref()?.value.as_slice()).ok()?.r#type? {
            address::Type::Workload(w) => Some((res.name.clone(), w)),
            address::Type::Service(_) => None,
        })
        .collect()
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut n: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    n.sort();
    n
}

#[tokio::test]
async fn live_updates_reach_a_subscribed_client_within_a_second() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    client.subscribe(ADDRESS, &[], BTreeMap::new()).await;
    let snapshot = client.recv(Duration::from_secs(10)).await;
    assert_eq!(snapshot.type_url, ADDRESS);
    assert_eq!(
        names(&snapshot),
        ["Kubernetes//Pod/shop/server", "Kubernetes//Pod/shop/sleep", "shop/server.shop.svc.cluster.local"]
    );
    assert!(workloads(&snapshot).values().all(|w| w.tunnel_protocol == TunnelProtocol::None as i32));
    client.ack(&snapshot).await;
    client.subscribe(AUTHORIZATION, &[], BTreeMap::new()).await;
    let policies = client.recv(Duration::from_secs(5)).await;
    assert_eq!(policies.type_url, AUTHORIZATION);
    assert_eq!(names(&policies), ["shop/allow"]);
    client.ack(&policies).await;
    // ACKs are not answered.
    client.expect_silence(Duration::from_millis(300)).await;

    // 1. The namespace joins ambient: both pods become captured; only they are sent.
    let started = Instant::now();
    mesh.write("namespace.yaml", NAMESPACE_AMBIENT);
    let update = client.recv(PROPAGATION).await;
    let took = started.elapsed();
    assert_eq!(update.type_url, ADDRESS);
    assert_eq!(names(&update), ["Kubernetes//Pod/shop/server", "Kubernetes//Pod/shop/sleep"], "took {took:?}");
    assert!(workloads(&update).values().all(|w| w.tunnel_protocol == TunnelProtocol::Hbone as i32));
    assert!(update.removed_resources.is_empty());
    assert_ne!(update.nonce, snapshot.nonce);
    client.ack(&update).await;

    // 2. A pod is deleted: it is removed, nothing else is sent.
    let started = Instant::now();
    mesh.write("pods.yaml", &pod("sleep", "10.0.0.1"));
    let update = client.recv(PROPAGATION).await;
    assert!(started.elapsed() < PROPAGATION);
    assert_eq!(update.type_url, ADDRESS);
    assert!(update.resources.is_empty(), "{:?}", names(&update));
    assert_eq!(update.removed_resources, ["Kubernetes//Pod/shop/server"]);
    client.ack(&update).await;

    // 3. A policy changes: the new version arrives.
    let started = Instant::now();
    mesh.write("policy.yaml", &policy("cluster.local/ns/other/sa/*"));
    let update = client.recv(PROPAGATION).await;
    assert!(started.elapsed() < PROPAGATION);
    assert_eq!(update.type_url, AUTHORIZATION);
    assert_eq!(names(&update), ["shop/allow"]);
    let p = Authorization::decode(update.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    let principal = &p.rules[0].clauses[0].matches[0].principals[0];
    assert_eq!(
        principal.match_type,
        Some(proto::api::istio::security::string_match::MatchType::Prefix("cluster.local/ns/other/sa/".into()))
    );
    client.ack(&update).await;
    client.expect_silence(Duration::from_millis(300)).await;
    mesh.shutdown().await;
}

#[tokio::test]
async fn reconnecting_client_gets_only_what_changed() {
    let mesh = Mesh::start().await;
    let mut first = mesh.client().await;
    first.subscribe(ADDRESS, &[], BTreeMap::new()).await;
    let snapshot = first.recv(Duration::from_secs(10)).await;
    let held: BTreeMap<String, String> =
        snapshot.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
    drop(first);

    // While disconnected: one pod changes IP, one disappears.
    mesh.write("pods.yaml", &pod("sleep", "10.0.0.9"));
    // The change is translated before the client reconnects.
    eventually("the CA to see the new address", Duration::from_secs(10), || async {
        let (_, body) = mesh.admin_get("/debug/state").await;
        let state: serde_json::Value = serde_json::from_str(&body).ok()?;
        let sleep = &state["workloads"]["Kubernetes//Pod/shop/sleep"];
        sleep.to_string().contains("\"10.0.0.9\"").then_some(())
    })
    .await;

    let mut again = mesh.client().await;
    again.subscribe(ADDRESS, &[], held).await;
    let resync = again.recv(Duration::from_secs(5)).await;
    assert_eq!(names(&resync), ["Kubernetes//Pod/shop/sleep"]);
    assert_eq!(resync.removed_resources, ["Kubernetes//Pod/shop/server"]);
    mesh.shutdown().await;
}

/// An on-demand client that reconnects keeps what it held subscribed: it lists it in
/// `initial_resource_versions`, subscribes only to what it newly wants, and still gets later
/// changes of what it held.
#[tokio::test]
async fn an_on_demand_reconnect_keeps_what_it_held_subscribed() {
    let mesh = Mesh::start().await;
    let mut first = mesh.client().await;
    first.subscribe(ADDRESS, &["/10.0.0.2"], BTreeMap::new()).await;
    let r = first.recv(Duration::from_secs(10)).await;
    assert_eq!(names(&r), ["Kubernetes//Pod/shop/server"]);
    let held: BTreeMap<String, String> = r.resources.iter().map(|x| (x.name.clone(), x.version.clone())).collect();
    drop(first);

    let mut again = mesh.client().await;
    again.subscribe(ADDRESS, &["/10.96.0.1"], held).await;
    let resync = again.recv(Duration::from_secs(10)).await;
    assert_eq!(names(&resync), ["shop/server.shop.svc.cluster.local"], "only what it did not hold");
    again.ack(&resync).await;
    mesh.write(
        "pods.yaml",
        &format!("{}---\n{}", pod("sleep", "10.0.0.1"), pod("server", "10.0.0.2").replace("node-a", "node-b")),
    );
    let update = again.recv(PROPAGATION).await;
    assert_eq!(names(&update), ["Kubernetes//Pod/shop/server"], "what it held is still subscribed");
    mesh.shutdown().await;
}

#[tokio::test]
async fn on_demand_lookup_by_address_resolves_aliases_and_reports_unknowns() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    client.subscribe(ADDRESS, &["/10.0.0.2", "/10.96.0.1", "/192.0.2.1"], BTreeMap::new()).await;
    let r = client.recv(Duration::from_secs(10)).await;
    assert_eq!(names(&r), ["Kubernetes//Pod/shop/server", "shop/server.shop.svc.cluster.local"]);
    let server = r.resources.iter().find(|x| x.name == "Kubernetes//Pod/shop/server").unwrap();
    assert!(server.aliases.contains(&"/10.0.0.2".to_owned()));
    assert_eq!(r.removed_resources, ["/192.0.2.1"]);

    // Not subscribed to sleep: its changes are not pushed; the subscribed pod's are.
    client.ack(&r).await;
    mesh.write(
        "pods.yaml",
        &format!("{}---\n{}", pod("sleep", "10.0.0.1"), pod("server", "10.0.0.2").replace("node-a", "node-b")),
    );
    let update = client.recv(PROPAGATION).await;
    assert_eq!(names(&update), ["Kubernetes//Pod/shop/server"]);
    assert_eq!(workloads(&update)["Kubernetes//Pod/shop/server"].node, "node-b");
    mesh.shutdown().await;
}

#[tokio::test]
async fn nack_is_not_answered_with_the_same_version() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    client.subscribe(AUTHORIZATION, &[], BTreeMap::new()).await;
    let r = client.recv(Duration::from_secs(10)).await;
    client
        .send(DeltaDiscoveryRequest {
            type_url: AUTHORIZATION.into(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(proto::api::google::rpc::Status {
                code: 3,
                message: "cannot apply".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    client.expect_silence(Duration::from_millis(300)).await;
    // A later change is still pushed.
    mesh.write("policy.yaml", &policy("cluster.local/ns/shop/sa/other"));
    let update = client.recv(PROPAGATION).await;
    assert_eq!(names(&update), ["shop/allow"]);
    mesh.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_clients_are_refused() {
    let mesh = Mesh::start().await;
    let foreign = ca::auth::TokenSigner::new(crate::support::ISSUER, None).unwrap();
    let forged = foreign
        .mint(&ca::auth::TokenRequest {
            namespace: "istio-system",
            service_account: "ztunnel",
            pod: None,
            node: None,
            audience: ca::auth::DEFAULT_AUDIENCE,
            ttl: Duration::from_secs(60),
        })
        .unwrap();
    for token in [None, Some("not-a-jwt".to_owned()), Some(forged)] {
        let err = match Client::connect(mesh.channel(None), token.clone()).await {
            Err(status) => status,
            Ok(mut c) => {
                c.subscribe(ADDRESS, &[], BTreeMap::new()).await;
                c.responses.message().await.unwrap_err()
            }
        };
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}: {err}");
    }
    // A client certificate from the CA is enough.
    let mut client = Client::connect(mesh.channel(Some(mesh.admin_credential())), None).await.unwrap();
    client.subscribe(ADDRESS, &[], BTreeMap::new()).await;
    assert_eq!(client.recv(Duration::from_secs(10)).await.type_url, ADDRESS);
    mesh.shutdown().await;
}

#[tokio::test]
async fn admin_api_dumps_state_and_config_errors() {
    let mesh = Mesh::start().await;
    mesh.wait_ready().await;
    let (status, body) = mesh.admin_get("/debug/state").await;
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["workloads"]["Kubernetes//Pod/shop/sleep"]["identity"], "spiffe://cluster.local/ns/shop/sa/sleep");
    assert_eq!(state["services"]["shop/server.shop.svc.cluster.local"]["vips"][0], "10.96.0.1");
    assert_eq!(state["policies"]["shop/allow"]["action"], "Allow");

    // What the sources hold, by kind, and how many proxies follow over xDS.
    let objects = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let (status, body) = mesh.admin_get("/debug/objects").await;
    assert_eq!(status, 200);
    let counts = serde_json::json!({"AuthorizationPolicy": 1, "Namespace": 1, "Pod": 2, "Service": 1});
    assert_eq!(objects(body), serde_json::json!({"objects": counts, "xds_clients": 0}));
    let mut follower = mesh.client().await;
    follower.subscribe(ADDRESS, &[], BTreeMap::new()).await;
    follower.recv(Duration::from_secs(10)).await;
    assert_eq!(objects(mesh.admin_get("/debug/objects").await.1)["xds_clients"], 1);
    drop(follower);
    eventually("the CA to count the client gone", Duration::from_secs(5), || async {
        (objects(mesh.admin_get("/debug/objects").await.1)["xds_clients"] == 0).then_some(())
    })
    .await;

    mesh.write("broken.yaml", "kind: [");
    let e = eventually("the config error to be reported", Duration::from_secs(5), || async {
        let (_, body) = mesh.admin_get("/debug/config_errors").await;
        let errors: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        errors.into_iter().next()
    })
    .await;
    assert!(e["source"].as_str().unwrap().ends_with("broken.yaml"), "{e}");
    assert!(e["message"].as_str().unwrap().starts_with("not valid YAML"), "{e}");
    mesh.shutdown().await;
}

#[tokio::test]
async fn bad_config_is_refused_at_bind() {
    let mesh = Mesh::new();
    let good = mesh.config();
    let mut config = good.clone();
    config.auth.admins.clear();
    assert!(matches!(ControlPlane::bind(config).await, Err(ca::Error::Config(ca::ConfigError::NoAdmin))));
    let mut config = good.clone();
    config.mesh = MeshConfig { trust_domain: "Bad Domain".into(), ..MeshConfig::default() };
    assert!(matches!(ControlPlane::bind(config).await, Err(ca::Error::Config(ca::ConfigError::TrustDomain(_)))));
    let mut config = good.clone();
    config.authority.trust_domain = "other.domain".into();
    assert!(matches!(ControlPlane::bind(config).await, Err(ca::Error::Config(ca::ConfigError::TrustDomainMismatch))));
    let mut config = good;
    config.authority.default_ttl = config.authority.max_ttl + Duration::from_secs(1);
    assert!(matches!(ControlPlane::bind(config).await, Err(ca::Error::Config(ca::ConfigError::Ttl))));
}

#[tokio::test]
async fn waypoint_types_are_served_on_the_same_stream() {
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    client.subscribe(proto::api::type_url::SERVICE_ROUTES, &[], BTreeMap::new()).await;
    let empty = client.recv(Duration::from_secs(10)).await;
    assert_eq!(empty.type_url, proto::api::type_url::SERVICE_ROUTES);
    assert!(empty.resources.is_empty(), "no HTTPRoute yet");
    client.ack(&empty).await;

    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\n  namespace: shop\nspec:\n  parentRefs:\n    - kind: Service\n      group: \"\"\n      name: server\n  rules:\n    - backendRefs:\n        - name: server\n          port: 80\n";
    mesh.write("route.yaml", route);
    let update = client.recv(PROPAGATION).await;
    assert_eq!(names(&update), ["shop/server.shop.svc.cluster.local"]);
    let routes = proto::api::ambient::waypoint::v1::ServiceRoutes::decode(
        update.resources[0].resource.as_ref().unwrap().value.as_slice(),
    )
    .unwrap();
    assert_eq!(routes.routes[0].name, "shop/r");
    assert_eq!(routes.routes[0].rules[0].backends[0].service, "shop/server.shop.svc.cluster.local");
    mesh.shutdown().await;
}

/// An Istio Gateway and a VirtualService naming it reach a subscriber of `IngressGateway` as
/// written in the YAML directory, and the binding follows edits: the VirtualService's rules appear
/// on the gateway when it binds, and go when its `gateways:` no longer names it.
#[tokio::test]
async fn an_istio_gateway_and_its_bound_routes_are_served_live() {
    use proto::api::ambient::waypoint::v1::{IngressGateway, gateway_server::Protocol};
    use proto::api::type_url::INGRESS_GATEWAY;
    let decode = |r: &DeltaDiscoveryResponse| {
        assert_eq!(r.resources.len(), 1, "{r:?}");
        IngressGateway::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap()
    };
    let mesh = Mesh::start().await;
    let mut client = mesh.client().await;
    client.subscribe(INGRESS_GATEWAY, &[], BTreeMap::new()).await;
    let empty = client.recv(Duration::from_secs(10)).await;
    assert!(empty.resources.is_empty(), "no Gateway yet");
    client.ack(&empty).await;

    let gateway = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [shop.example]\n";
    mesh.write("gateway.yaml", gateway);
    let update = client.recv(PROPAGATION).await;
    assert_eq!(names(&update), ["shop/edge"]);
    let served = decode(&update);
    assert_eq!(served.selector.get("istio").map(String::as_str), Some("ingressgateway"));
    assert_eq!((served.servers[0].port, served.servers[0].protocol()), (80, Protocol::Http));
    assert!(served.routes.is_empty(), "no VirtualService names it yet");
    client.ack(&update).await;

    let vs = |gateways: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: front, namespace: shop}}\nspec:\n  hosts: [shop.example, server]\n  gateways: [{gateways}]\n  http:\n  - route: [{{destination: {{host: server}}}}]\n"
        )
    };
    mesh.write("vs.yaml", &vs("edge"));
    let update = client.recv(PROPAGATION).await;
    let bound = decode(&update);
    assert_eq!(bound.routes.len(), 1);
    assert_eq!(bound.routes[0].hosts, ["shop.example"], "`server` is not a host the gateway serves");
    let route = bound.routes[0].route.as_ref().unwrap();
    assert_eq!(route.name, "shop/front");
    assert_eq!(route.rules[0].backends[0].service, "shop/server.shop.svc.cluster.local");
    client.ack(&update).await;

    mesh.write("vs.yaml", &vs("mesh"));
    let update = client.recv(PROPAGATION).await;
    assert!(decode(&update).routes.is_empty(), "still bound after `gateways:` stopped naming it");
    mesh.shutdown().await;
}

/// A client that speaks to the CA exactly as Istio's ztunnel does (istio/ztunnel
/// `src/xds/client.rs`, `src/identity/auth.rs`, `src/identity/caclient.rs`): node id
/// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`; `authorization: Bearer <token>` with a
/// `clusterid` header; an on-demand `Address` subscription that starts by subscribing to nothing
/// (`*` subscribed and unsubscribed in one request), a wildcard `Authorization` one; ACKs and a
/// NACK; certificates asked for with `ImpersonatedIdentity` and read with the roots last.
#[tokio::test]
async fn a_client_speaking_as_istios_ztunnel_is_served() {
    use proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

    let mesh = Mesh::start().await;
    let token = mesh.token("istio-system", "ztunnel", Some("node-a"));
    let headers = move |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.metadata_mut().insert("clusterid", "Kubernetes".parse().unwrap());
        Ok(req)
    };
    let channel = mesh.channel(None);
    let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(channel.clone(), headers.clone());
    let (tx, rx) = mpsc::channel(16);
    let mut responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut next =
        async || tokio::time::timeout(Duration::from_secs(10), responses.message()).await.unwrap().unwrap().unwrap();
    let node = Node {
        id: "ztunnel~10.0.0.100~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local".into(),
        ..Default::default()
    };
    let nothing = DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: ADDRESS.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    };
    tx.send(nothing).await.unwrap();
    let wildcard = DeltaDiscoveryRequest { node: Some(node), type_url: AUTHORIZATION.into(), ..Default::default() };
    tx.send(wildcard).await.unwrap();
    let mut first = BTreeMap::new();
    for _ in 0..2 {
        let r = next().await;
        first.insert(r.type_url.clone(), r);
    }
    assert!(first[ADDRESS].resources.is_empty(), "subscribed to nothing: {:?}", names(&first[ADDRESS]));
    assert_eq!(names(&first[AUTHORIZATION]), ["shop/allow"]);
    for r in first.values() {
        let ack = DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        tx.send(ack).await.unwrap();
    }

    // On demand, by address: the pod at 10.0.0.2.
    let lookup = DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        resource_names_subscribe: vec!["/10.0.0.2".into()],
        ..Default::default()
    };
    tx.send(lookup).await.unwrap();
    let found = next().await;
    assert_eq!(names(&found), ["Kubernetes//Pod/shop/server"]);
    // A NACK is not answered with the same resources again.
    let nack = DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        response_nonce: found.nonce.clone(),
        error_detail: Some(proto::api::google::rpc::Status { code: 3, message: "test".into(), details: vec![] }),
        ..Default::default()
    };
    tx.send(nack).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), next()).await.is_err(),
        "the NACKed resources were sent again"
    );

    // A certificate for a pod of its node, impersonated.
    let mut ca = IstioCertificateServiceClient::with_interceptor(channel, headers);
    let id = "spiffe://cluster.local/ns/shop/sa/server";
    let (_key, pem) = crate::support::csr(&[id]);
    let answer =
        ca.create_certificate(crate::support::request(pem, 3600, Some(id))).await.unwrap().into_inner().cert_chain;
    let (certs, roots) = proto::certs::split_answer(&answer).unwrap();
    assert_eq!(certs.matches("BEGIN CERTIFICATE").count(), 2, "leaf and intermediate");
    assert_eq!(roots.roots().len(), 1);
    mesh.shutdown().await;
}

/// A gateway's TLS credential goes to the service account of the gateway pod the Gateway selects,
/// in the Secret's namespace, and to nobody else: a ztunnel subscribing gets nothing; when the pod
/// no longer runs as that account the credential is taken back. The CA's state dump names it
/// without its key.
#[tokio::test]
async fn a_gateway_credential_reaches_only_the_gateway_pods_that_use_it() {
    use proto::api::ambient::waypoint::v1::GatewayCredential;
    use proto::api::type_url::GATEWAY_CREDENTIAL;

    let cert = rcgen::generate_simple_self_signed(vec!["shop.example".to_owned()]).unwrap();
    let (chain, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: shop-cert, namespace: istio-system}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&chain),
        indent(&key)
    );
    let gateway_pod = |sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ingress\n  namespace: istio-system\n  labels: {{istio: ingressgateway}}\nspec:\n  nodeName: node-a\n  serviceAccountName: {sa}\n  containers: []\nstatus:\n  podIP: 10.0.0.50\n"
        )
    };
    let mesh = Mesh::start().await;
    mesh.write("secret.yaml", &secret);
    mesh.write("gateway-pod.yaml", &gateway_pod("ingress-sa"));
    mesh.write(
        "gateway.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [shop.example]\n    tls: {mode: SIMPLE, credentialName: shop-cert}\n",
    );

    let gateway_token = mesh.token("istio-system", "ingress-sa", None);
    let mut gateway = Client::connect(mesh.channel(None), Some(gateway_token)).await.unwrap();
    let mut ztunnel = mesh.client().await;
    // The gateway gets it once the objects are read.
    gateway.subscribe(GATEWAY_CREDENTIAL, &[], BTreeMap::new()).await;
    let mut got = gateway.recv(Duration::from_secs(10)).await;
    while got.resources.is_empty() {
        gateway.ack(&got).await;
        got = gateway.recv(Duration::from_secs(10)).await;
    }
    assert_eq!(names(&got), ["istio-system/shop-cert"]);
    let served = GatewayCredential::decode(got.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!((served.cert_chain.as_str(), served.private_key.as_str()), (chain.as_str(), key.as_str()));
    assert!(served.ca_certificates.is_empty());
    gateway.ack(&got).await;

    // A ztunnel (in the same namespace) subscribing to everything of the type gets nothing.
    ztunnel.subscribe(GATEWAY_CREDENTIAL, &[], BTreeMap::new()).await;
    let nothing = ztunnel.recv(Duration::from_secs(10)).await;
    assert!(nothing.resources.is_empty(), "a ztunnel was sent a gateway's key: {:?}", names(&nothing));
    ztunnel.ack(&nothing).await;
    // Nor by name.
    ztunnel.subscribe(GATEWAY_CREDENTIAL, &["istio-system/shop-cert"], BTreeMap::new()).await;
    let nothing = ztunnel.recv(PROPAGATION).await;
    assert!(nothing.resources.is_empty(), "a ztunnel was sent a gateway's key by name");

    // The dump shows the credential without its key.
    let (_, body) = mesh.admin_get("/debug/state").await;
    assert!(body.contains("istio-system/shop-cert") && body.contains("ingress-sa"), "{body}");
    let key_line = key.lines().nth(1).unwrap();
    assert!(!body.contains(key_line), "the state dump shows the private key");

    // The pod now runs as another account: taken back from the first.
    mesh.write("gateway-pod.yaml", &gateway_pod("other-sa"));
    let update = gateway.recv(PROPAGATION).await;
    assert_eq!(update.removed_resources, ["istio-system/shop-cert"], "{update:?}");
    assert!(update.resources.is_empty());
    mesh.shutdown().await;
}
