//! The Telemetry API end to end: real `ca`, `ztunnel` and `waypoint` processes, and a real
//! OTLP/gRPC collector (the published OTLP service, served by this test on the underlay).
//!
//! - a mesh-wide Telemetry naming the mesh config's OpenTelemetry provider: a request arriving
//!   with a sampled `traceparent` gives the waypoint's server span (the client's span its parent)
//!   and client span (the server span its parent), and the server pod receives the client span's
//!   context — one tree, client → waypoint → server;
//! - at 0 % a request without a trace, or with an unsampled one, gives no span;
//! - a namespace Telemetry raising the rate to 100 % makes the waypoint start traces of its own;
//! - a Telemetry targeting the waypoint's Gateway turns its access log off, and back on.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use e2e::apps::http_server;
use e2e::mesh::{CA_IP, Mesh, MeshOptions, MeshPod, PodSpec, http_exchange};
use e2e::otlp::{Collector, Got, SpanKind};
use proto::hbone::TraceParent;

const APP_PORT: u16 = 8080;
const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 10);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 2);
const COLLECTOR_PORT: u16 = 4317;

fn mesh_config(extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |\n    extensionProviders:\n      - name: otel\n        opentelemetry:\n          service: {CA_IP}\n          port: {COLLECTOR_PORT}\n{extra}"
    )
}

fn telemetry(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// Namespace `shop` in the mesh with its waypoint: a client on node 1, `hello` (service and pod)
/// on node 2; hello reached through the waypoint.
/// A collector on the underlay (as a cluster's collector Service would be reached), named as the
/// mesh's OpenTelemetry provider and chosen mesh-wide at 0 %: only sampled callers are traced.
fn collect_spans(mesh: &Mesh) -> Collector {
    let collector = Collector::serve(&mesh.underlay.ns, SocketAddr::from((CA_IP, COLLECTOR_PORT))).unwrap();
    mesh.apply("mesh-config", &mesh_config("")).unwrap();
    mesh.apply(
        "telemetry-mesh",
        &telemetry(
            "istio-system",
            "mesh-default",
            "  tracing:\n    - providers: [{name: otel}]\n      randomSamplingPercentage: 0\n",
        ),
    )
    .unwrap();
    collector
}

/// The proxy's two spans of the request that `incoming` traced and `answer` answered (200): its
/// server span, child of the caller's span, and its client span, child of the server span, whose
/// context the answering pod received.
async fn one_trace(collector: &Collector, answer: &e2e::mesh::HttpAnswer, incoming: &TraceParent) -> (Got, Got) {
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = TraceParent::parse(answer.header("x-seen-traceparent").unwrap()).unwrap();
    let spans = collector.wait_for(incoming.trace_id, 2).await.unwrap_or_else(|s| panic!("{s:#?}"));
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server_span = spans.iter().find(|s| s.kind == SpanKind::Server as i32).expect("a server span");
    let client_span = spans.iter().find(|s| s.kind == SpanKind::Client as i32).expect("a client span");
    assert_eq!(server_span.parent, Some(incoming.span_id), "the server span's parent is the caller's span");
    assert_eq!(client_span.parent, Some(server_span.span), "the client span's parent is the server span");
    let seen = (seen.trace_id, seen.span_id, seen.flags);
    assert_eq!(seen, (incoming.trace_id, client_span.span, 1), "the pod's parent is the proxy's client span");
    (server_span.clone(), client_span.clone())
}

async fn shop_mesh(json_logs: bool) -> (Mesh, Arc<MeshPod>, Arc<MeshPod>, Arc<MeshPod>) {
    let mut mesh = Mesh::start(MeshOptions { json_logs, ..MeshOptions::default() }).unwrap();
    mesh.namespace("shop", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "shop", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("hello", "shop", 2).label("app", "hello")).await.unwrap();
    http_server(server.listen(APP_PORT).unwrap(), "hello");
    mesh.apply(
        "svc-hello",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: shop\nspec:\n  clusterIP: {HELLO}\n  selector:\n    app: hello\n  ports:\n    - name: http\n      port: 80\n      targetPort: {APP_PORT}\n"
        ),
    )
    .unwrap();
    let waypoint = mesh.waypoint("shop", "waypoint", 1, WAYPOINT).await.unwrap();
    mesh.use_waypoint("shop", Some("waypoint")).unwrap();
    let to = SocketAddr::from((HELLO, 80));
    mesh.wait_until("hello through the waypoint", Duration::from_secs(30), || async {
        http_exchange(&client.netns.ns, "GET", to, "/", &[]).await.is_ok_and(|a| a.status == 200)
            && mesh
                .waypoint_metrics(&waypoint)
                .await
                .is_ok_and(|m| m.contains("destination_service=\"hello.shop.svc.cluster.local\""))
    })
    .await
    .unwrap();
    (mesh, client, server, waypoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_the_waypoint_is_one_trace_and_the_telemetry_api_steers_it() {
    let (mesh, client, server, waypoint) = shop_mesh(false).await;
    let collector = collect_spans(&mesh);
    let log_has = |needle: &'static str| {
        let log = mesh.waypoint_log(&waypoint).unwrap();
        log.contains(needle)
    };
    mesh.wait_until("the waypoint to export spans", Duration::from_secs(30), || async {
        log_has("tracing: exporting spans provider=otel collector=10.10.0.254:4317 sampling_percent=0")
            || log_has("tracing: exporting spans provider=otel collector=10.10.0.254:4317 sampling_percent=0.0")
    })
    .await
    .unwrap();
    let to = SocketAddr::from((HELLO, 80));

    // A sampled request: one tree, client → waypoint (server span, client span) → server.
    let incoming =
        TraceParent { trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736, span_id: 0x00f0_67aa_0ba9_02b7, flags: 1 };
    let answer =
        http_exchange(&client.netns.ns, "GET", to, "/traced", &[("traceparent", &incoming.to_string())]).await.unwrap();
    let (server_span, client_span) = one_trace(&collector, &answer, &incoming).await;
    let (server_span, client_span) = (&server_span, &client_span);
    assert_eq!(server_span.name, "hello.shop.svc.cluster.local:80/*");
    assert_eq!(server_span.service, "waypoint.shop");
    for (k, v) in [
        ("http.method", "GET"),
        ("http.url", "http://10.96.3.10:80/traced"),
        ("http.status_code", "200"),
        ("response_flags", "-"),
        ("istio.namespace", "shop"),
        ("upstream_cluster", "outbound|80||hello.shop.svc.cluster.local"),
        ("peer.address", &client.ip.to_string()),
    ] {
        assert_eq!(server_span.attributes.get(k).map(String::as_str), Some(v), "{k}: {server_span:#?}");
    }
    assert_eq!(client_span.name, "router outbound|80||hello.shop.svc.cluster.local egress");
    assert_eq!(client_span.attributes.get("peer.address"), Some(&server.ip.to_string()));
    // A failed request is an error span.
    let failing = TraceParent { trace_id: 0x11, span_id: 0x22, flags: 1 };
    let answer = http_exchange(&client.netns.ns, "GET", to, "/status/503", &[("traceparent", &failing.to_string())])
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    let spans = collector.wait_for(failing.trace_id, 2).await.unwrap_or_else(|s| panic!("{s:#?}"));
    assert!(spans.iter().all(|s| s.attributes.get("error").map(String::as_str) == Some("true")), "{spans:#?}");

    // At 0 %: no trace of its own, and an unsampled caller's is not reported.
    let before = collector.count();
    let unsampled = TraceParent { trace_id: 0x33, span_id: 0x44, flags: 0 };
    for headers in [vec![], vec![("traceparent", unsampled.to_string())]] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = http_exchange(&client.netns.ns, "GET", to, "/", &headers).await.unwrap();
        assert_eq!(answer.status, 200);
    }

    // The namespace raises the rate to 100 %: every request starts a trace at the waypoint.
    mesh.apply("telemetry-shop", &telemetry("shop", "all", "  tracing:\n    - randomSamplingPercentage: 100\n"))
        .unwrap();
    mesh.wait_until("the namespace's rate to apply", Duration::from_secs(30), || async {
        log_has("sampling_percent=100")
    })
    .await
    .unwrap();
    // The batch of the requests above (exported every second) has gone by now: none of theirs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(collector.count(), before, "unsampled requests were reported");
    let answer = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await.unwrap();
    let started = TraceParent::parse(answer.header("x-seen-traceparent").unwrap()).unwrap();
    assert_eq!(started.flags, 1);
    let spans = collector.wait_for(started.trace_id, 2).await.unwrap_or_else(|s| panic!("{s:#?}"));
    let root = spans.iter().find(|s| s.kind == SpanKind::Server as i32).unwrap();
    assert_eq!(root.parent, None, "a trace the waypoint starts has its server span as the root");
    assert_eq!(spans.iter().find(|s| s.kind == SpanKind::Client as i32).unwrap().span, started.span_id);

    // The waypoint's access log, switched off for its Gateway, then on again.
    let access_lines = |path: &str| {
        let log = mesh.waypoint_log(&waypoint).unwrap();
        log.lines().filter(|l| l.contains("access") && l.contains(&format!("path={path} "))).count()
    };
    assert_eq!(access_lines("/traced"), 1);
    mesh.apply(
        "telemetry-quiet",
        &telemetry(
            "shop",
            "quiet",
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  accessLogging:\n    - disabled: true\n",
        ),
    )
    .unwrap();
    mesh.wait_until("the access log to go off", Duration::from_secs(30), || async {
        log_has("access log switched by the Telemetry API access_log=false")
    })
    .await
    .unwrap();
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/quiet", &[]).await.unwrap().status, 200);
    mesh.delete("telemetry-quiet").unwrap();
    mesh.wait_until("the access log to come back", Duration::from_secs(30), || async {
        log_has("access log switched by the Telemetry API access_log=true")
    })
    .await
    .unwrap();
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/loud", &[]).await.unwrap().status, 200);
    assert_eq!((access_lines("/quiet"), access_lines("/loud")), (0, 1));
}

/// `LOG_FORMAT=json`: every line of the proxies' logs is a JSON object, and the access-log lines
/// carry Istio's names: the waypoint's Envoy's (`method`, `path`, `response_code`,
/// `response_flags`, `upstream_host`, `duration`, ...), ztunnel's its own (`src.identity`,
/// `dst.workload`, `direction`, `bytes_sent`, `bytes_recv`, ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_are_json_lines_with_istios_field_names() {
    let (mesh, client, server, waypoint) = shop_mesh(true).await;
    let to = SocketAddr::from((HELLO, 80));
    let answer = http_exchange(
        &client.netns.ns,
        "GET",
        to,
        "/json-line",
        &[("x-request-id", "req-42"), ("user-agent", "e2e/1")],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    let lines = |log: String| -> Vec<serde_json::Value> {
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))).collect()
    };
    let mut request = None;
    mesh.wait_until("the waypoint's access line", Duration::from_secs(10), || {
        request = lines(mesh.waypoint_log(&waypoint).unwrap())
            .into_iter()
            .find(|l| l["target"] == "access" && l["path"] == "/json-line");
        std::future::ready(request.is_some())
    })
    .await
    .unwrap();
    let request = request.unwrap();
    for (k, v) in [
        ("message", serde_json::json!("request")),
        ("level", serde_json::json!("INFO")),
        ("method", serde_json::json!("GET")),
        ("protocol", serde_json::json!("HTTP/1.1")),
        ("authority", serde_json::json!("10.96.3.10:80")),
        ("response_code", serde_json::json!(200)),
        ("response_flags", serde_json::json!("-")),
        ("upstream_host", serde_json::json!(server.ip.to_string())),
        ("upstream_request_attempt_count", serde_json::json!(1)),
        ("downstream_remote_address", serde_json::json!(client.ip.to_string())),
        ("request_id", serde_json::json!("req-42")),
        ("user_agent", serde_json::json!("e2e/1")),
        ("src.identity", serde_json::json!(format!("spiffe://cluster.local/ns/shop/sa/{}", client.service_account))),
        ("dst.service", serde_json::json!("hello.shop.svc.cluster.local")),
        ("dst.workload", serde_json::json!("hello")),
    ] {
        assert_eq!(request[k], v, "{k}: {request}");
    }
    assert!(request["duration"].is_u64() && request["timestamp"].is_string(), "{request}");

    // The client's ztunnel: the client's connection (closed after the answer), outbound.
    let mut outbound = None;
    mesh.wait_until("ztunnel's access line", Duration::from_secs(10), || {
        outbound = lines(mesh.ztunnel_log(1).unwrap()).into_iter().find(|l| {
            l["target"] == "access"
                && l["direction"] == "outbound"
                && l["src.workload"] == "client"
                && l["bytes_sent"].as_u64().is_some_and(|b| b > 0)
        });
        std::future::ready(outbound.is_some())
    })
    .await
    .unwrap();
    let outbound = outbound.unwrap();
    for (k, v) in [
        ("message", serde_json::json!("connection complete")),
        ("src.namespace", serde_json::json!("shop")),
        ("src.identity", serde_json::json!(format!("spiffe://cluster.local/ns/shop/sa/{}", client.service_account))),
        ("dst.addr", serde_json::json!(to.to_string())),
        ("dst.service", serde_json::json!("hello.shop.svc.cluster.local")),
        ("mtls", serde_json::json!(true)),
    ] {
        assert_eq!(outbound[k], v, "{k}: {outbound}");
    }
    assert!(outbound["bytes_recv"].is_u64() && outbound["duration"].is_u64(), "{outbound}");
    assert!(outbound["src.addr"].as_str().unwrap().starts_with(&format!("{}:", client.ip)), "{outbound}");
    // And the lines that are not access lines are JSON too (checked by `lines` on both logs).
    assert!(lines(mesh.ztunnel_log(1).unwrap()).iter().any(|l| l["message"] == "ztunnel started"));
}

/// The ingress gateway traces like a waypoint: a request from outside the mesh through the
/// tutorial's `xingren-gateway` carrying a sampled `traceparent` is the gateway's server span (the
/// caller's span its parent) and client span (the server span its parent), and the pod that
/// answers receives the client span's context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_the_ingress_gateway_is_one_trace() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    let tutorial = e2e::tutorial::deploy(&mut mesh, Ipv4Addr::new(10, 96, 0, 20), APP_PORT).await.unwrap();
    let gateway = tutorial.gateway;
    let pods: Vec<String> = tutorial.hello.iter().map(|p| p.ip.to_string()).collect();
    let outside = mesh.outside_client(1).unwrap();
    let collector = collect_spans(&mesh);
    mesh.wait_until("the gateway to export spans", Duration::from_secs(30), || async {
        mesh.waypoint_log(&gateway).is_ok_and(|l| l.contains("tracing: exporting spans provider=otel"))
    })
    .await
    .unwrap();
    let to = SocketAddr::from((gateway.ip, 80));
    mesh.wait_until("the gateway to route xingren.upup", Duration::from_secs(30), || async {
        e2e::mesh::http_exchange_as(&outside.ns, "xingren.upup", to, "/", &[]).await.is_ok_and(|a| a.status == 200)
    })
    .await
    .unwrap();

    let incoming =
        TraceParent { trace_id: 0x5af7_183f_b1d4_cf5f_0000_0000_0000_0042, span_id: 0x0102_0304_0506_0708, flags: 1 };
    let answer = e2e::mesh::http_exchange_as(
        &outside.ns,
        "xingren.upup",
        to,
        "/traced",
        &[("traceparent", &incoming.to_string())],
    )
    .await
    .unwrap();
    let (server_span, client_span) = one_trace(&collector, &answer, &incoming).await;
    let (server_span, client_span) = (&server_span, &client_span);
    assert_eq!(server_span.service, "istio-ingressgateway.istio-system", "{server_span:#?}");
    assert_eq!(server_span.attributes.get("http.status_code").map(String::as_str), Some("200"), "{server_span:#?}");
    let endpoint = client_span.attributes.get("peer.address").cloned().unwrap_or_default();
    assert!(pods.contains(&endpoint), "the client span names the pod that answered: {client_span:#?}");
}
