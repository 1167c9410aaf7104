//! The Kubernetes source, through `kube`'s own client and watchers, against a mock API server on
//! loopback that speaks the real list/watch protocol (JSON lists, chunked watch streams, 410 Gone).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use ca::objects::{Kind, ObjectKey, Store};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One collection (e.g. all Pods).
struct Collection {
    list_kind: &'static str,
    objects: BTreeMap<String, Value>,
    events: broadcast::Sender<String>,
    /// Every event with its resource version, so a watch from version N replays what followed N.
    log: Vec<(u64, String)>,
    lists: usize,
    /// The query of every request (list or watch).
    queries: Vec<String>,
}

#[derive(Clone)]
struct MockApi(Arc<Mutex<Api>>);

struct Api {
    version: u64,
    collections: BTreeMap<&'static str, Collection>,
}

const PATHS: &[(&str, &str)] = &[
    ("/api/v1/namespaces", "NamespaceList"),
    ("/api/v1/nodes", "NodeList"),
    ("/api/v1/pods", "PodList"),
    ("/api/v1/services", "ServiceList"),
    ("/api/v1/secrets", "SecretList"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "EndpointSliceList"),
    ("/apis/gateway.networking.k8s.io/v1/gateways", "GatewayList"),
    ("/apis/gateway.networking.k8s.io/v1/httproutes", "HTTPRouteList"),
    ("/apis/gateway.networking.k8s.io/v1/grpcroutes", "GRPCRouteList"),
    ("/apis/security.istio.io/v1/authorizationpolicies", "AuthorizationPolicyList"),
    ("/apis/security.istio.io/v1/requestauthentications", "RequestAuthenticationList"),
    ("/apis/networking.istio.io/v1/gateways", "GatewayList"),
    ("/apis/networking.istio.io/v1/virtualservices", "VirtualServiceList"),
    ("/apis/networking.istio.io/v1/destinationrules", "DestinationRuleList"),
    // PeerAuthentication is left out: the CRD "is not installed" and answers 404.
];

impl MockApi {
    fn new() -> Self {
        let collections = PATHS
            .iter()
            .map(|(p, k)| {
                (
                    *p,
                    Collection {
                        list_kind: k,
                        objects: BTreeMap::new(),
                        events: broadcast::channel(64).0,
                        log: Vec::new(),
                        lists: 0,
                        queries: Vec::new(),
                    },
                )
            })
            .collect();
        MockApi(Arc::new(Mutex::new(Api { version: 1, collections })))
    }

    fn key(o: &Value) -> String {
        format!("{}/{}", o["metadata"]["namespace"].as_str().unwrap_or(""), o["metadata"]["name"].as_str().unwrap())
    }

    /// Creates or updates an object and tells the watchers (unless `silently`).
    fn apply(&self, path: &str, mut object: Value, silently: bool) {
        let mut api = self.0.lock().unwrap();
        api.version += 1;
        object["metadata"]["resourceVersion"] = json!(api.version.to_string());
        let version = api.version;
        let c = api.collections.get_mut(path).unwrap();
        let existed = c.objects.insert(Self::key(&object), object.clone()).is_some();
        if !silently {
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            let event = json!({"type": kind, "object": object}).to_string();
            c.log.push((version, event.clone()));
            let _ = c.events.send(event);
        }
    }

    fn delete(&self, path: &str, ns: &str, name: &str, silently: bool) {
        let mut api = self.0.lock().unwrap();
        api.version += 1;
        let version = api.version;
        let c = api.collections.get_mut(path).unwrap();
        let mut object = c.objects.remove(&format!("{ns}/{name}")).unwrap();
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if !silently {
            let event = json!({"type": "DELETED", "object": object}).to_string();
            c.log.push((version, event.clone()));
            let _ = c.events.send(event);
        }
    }

    /// Ends every open watch of `path` with 410 Gone, as an API server does when its watch cache
    /// has moved on: clients must relist.
    fn expire_watches(&self, path: &str) {
        let api = self.0.lock().unwrap();
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}});
        let _ = api.collections[path].events.send(status.to_string());
    }

    fn lists(&self, path: &str) -> usize {
        self.0.lock().unwrap().collections[path].lists
    }

    fn queries(&self, path: &str) -> Vec<String> {
        self.0.lock().unwrap().collections[path].queries.clone()
    }
}

async fn handle(State(mock): State<MockApi>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let watch = request.uri().query().unwrap_or_default().split('&').any(|q| q == "watch=true");
    let mut api = mock.0.lock().unwrap();
    let version = api.version;
    let Some(c) = api.collections.get_mut(path.as_str()) else {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
            "message": format!("the server could not find the requested resource ({path})")});
        return Response::builder()
            .status(404)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    };
    c.queries.push(request.uri().query().unwrap_or_default().to_owned());
    if watch {
        let from: u64 = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|q| q.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut rx = c.events.subscribe();
        let replay: Vec<String> = c.log.iter().filter(|(v, _)| *v > from).map(|(_, e)| e.clone()).collect();
        let stream = async_stream(move |tx| async move {
            for line in replay {
                if tx.send(format!("{line}\n")).await.is_err() {
                    return;
                }
            }
            while let Ok(line) = rx.recv().await {
                let expired = line.contains("\"code\":410");
                if tx.send(format!("{line}\n")).await.is_err() || expired {
                    break;
                }
            }
        });
        return Response::builder().header("content-type", "application/json").body(Body::from_stream(stream)).unwrap();
    }
    c.lists += 1;
    let items: Vec<Value> = c.objects.values().cloned().collect();
    let body = json!({"apiVersion": "v1", "kind": c.list_kind, "metadata": {"resourceVersion": version.to_string()}, "items": items});
    Response::builder().header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

/// A body stream fed by a task.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<String, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), Ok)
}

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient { json!({"istio.io/dataplane-mode": "ambient"}) } else { json!({}) };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, ip: Option<&str>) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "i"}]}, "status": {}});
    if let Some(ip) = ip {
        p["status"]["podIP"] = json!(ip);
    }
    p
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    proto::testing::eventually(what, Duration::from_secs(10), || std::future::ready(check().then_some(()))).await;
}

fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
    ObjectKey { kind, namespace: ns.into(), name: name.into() }
}

#[tokio::test]
async fn lists_watches_and_relists_through_kube() {
    let mock = MockApi::new();
    mock.apply("/api/v1/namespaces", namespace("shop", false), true);
    mock.apply(
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}}}),
        true,
    );
    mock.apply("/api/v1/pods", pod("a", Some("10.0.0.1")), true);
    mock.apply("/api/v1/pods", pod("pending", None), true);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(handle).with_state(mock.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let store = Store::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ca::source::kube::run(client, store.clone(), "istio-system", async {
        let _ = stop_rx.await;
    }));

    // Initial list: every kind synced (the missing CRD too), objects in the store.
    tokio::time::timeout(Duration::from_secs(10), store.wait_synced()).await.expect("never synced");
    let snap = store.snapshot();
    assert!(snap.get(&key(Kind::Namespace, "", "shop")).is_some());
    assert!(snap.get(&key(Kind::Node, "", "node-a")).is_some(), "nodes are watched (their pods' locality)");
    assert!(snap.get(&key(Kind::Pod, "shop", "a")).is_some());
    // A pending pod (no IP yet) is a valid object in a cluster; the translation skips it.
    assert!(snap.get(&key(Kind::Pod, "shop", "pending")).is_some());

    // Watch events apply live.
    mock.apply("/api/v1/namespaces", namespace("shop", true), false);
    mock.apply("/api/v1/pods", pod("b", Some("10.0.0.2")), false);
    mock.delete("/api/v1/pods", "shop", "a", false);
    eventually("watch events applied", || {
        let s = store.snapshot();
        s.get(&key(Kind::Pod, "shop", "b")).is_some() && s.get(&key(Kind::Pod, "shop", "a")).is_none()
    })
    .await;
    let state = ca::translate::translate(&store.snapshot(), &Default::default());
    assert!(state.workloads["Kubernetes//Pod/shop/b"].captured, "namespace label change not applied");

    // A RequestAuthentication from the API server becomes the waypoint's JWT rules.
    let ra = json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                 "jwtRules": [{"issuer": "https://idp.example", "jwksUri": "https://idp.example/keys"}]},
    });
    mock.apply("/apis/security.istio.io/v1/requestauthentications", ra, false);
    eventually("RequestAuthentication watched", || {
        store.snapshot().get(&key(Kind::RequestAuthentication, "shop", "jwt")).is_some()
    })
    .await;
    let state = ca::translate::translate(&store.snapshot(), &Default::default());
    assert_eq!(state.request_authns["shop/jwt"].jwt_rules[0].jwks_uri, "https://idp.example/keys");

    // An Istio Gateway (networking.istio.io, not Gateway API's kind of the same name) is watched
    // and becomes an ingress gateway.
    let gw = json!({
        "apiVersion": "networking.istio.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": "shop"},
        "spec": {"selector": {"istio": "ingressgateway"},
                 "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["shop.example"]}]},
    });
    mock.apply("/apis/networking.istio.io/v1/gateways", gw, false);
    eventually("Istio Gateway watched", || store.snapshot().get(&key(Kind::IstioGateway, "shop", "edge")).is_some())
        .await;
    assert!(store.snapshot().get(&key(Kind::Gateway, "shop", "edge")).is_none(), "taken for a Gateway API Gateway");
    let state = ca::translate::translate(&store.snapshot(), &Default::default());
    assert_eq!(state.ingress_gateways["shop/edge"].servers[0].hosts, ["shop.example"]);

    // TLS Secrets are asked for by type only, and one named by a Gateway server becomes that
    // gateway's credential.
    let queries = mock.queries("/api/v1/secrets");
    assert!(
        !queries.is_empty() && queries.iter().all(|q| q.contains("fieldSelector=type%3Dkubernetes.io%2Ftls")),
        "{queries:?}"
    );
    let cert = rcgen::generate_simple_self_signed(vec!["shop.example".to_owned()]).unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "edge-cert", "namespace": "shop"},
        "stringData": {"tls.crt": cert.cert.pem(), "tls.key": cert.signing_key.serialize_pem()},
    });
    mock.apply("/api/v1/secrets", secret, false);
    eventually("TLS Secret watched", || store.snapshot().get(&key(Kind::Secret, "shop", "edge-cert")).is_some()).await;

    // An invalid object from the API is refused and reported; the store keeps the valid version.
    mock.apply("/api/v1/pods", pod("b", Some("garbage")), false);
    eventually("invalid object reported", || {
        store.errors().iter().any(|e| e.message.contains("\"garbage\" is not an IP"))
    })
    .await;
    let s = store.snapshot();
    let Some(ca::objects::Object::Pod(b)) = s.get(&key(Kind::Pod, "shop", "b")) else { panic!() };
    assert_eq!(b.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.0.0.2"));

    // A change the watch never reported (the client was cut off), then 410 Gone: the client
    // relists and the store converges on the server's truth.
    let lists_before = mock.lists("/api/v1/pods");
    mock.delete("/api/v1/pods", "shop", "b", true);
    mock.apply("/api/v1/pods", pod("c", Some("10.0.0.3")), true);
    mock.expire_watches("/api/v1/pods");
    eventually("relist after 410", || {
        let s = store.snapshot();
        s.get(&key(Kind::Pod, "shop", "b")).is_none() && s.get(&key(Kind::Pod, "shop", "c")).is_some()
    })
    .await;
    assert!(mock.lists("/api/v1/pods") > lists_before, "no relist happened");
    // The refused object is gone from the server, and so is its reported problem.
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    // Other kinds are untouched by a pod relist.
    assert!(store.snapshot().get(&key(Kind::Namespace, "", "shop")).is_some());

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("source did not stop").unwrap();
}
