//! The ztunnel and waypoint pair in the one-machine mesh: real `ca`, `ztunnel` and `waypoint`
//! processes, HTTP through HBONE both ways.
//!
//! - an HTTPRoute on a service (GAMMA): `version: new` always reaches the new backend, the rest
//!   splits ~70/30; the waypoint counts every request (`istio_requests_total`), and traffic to a
//!   namespace without a waypoint never reaches it;
//! - retries turn an endpoint failing every other request into full success, and a request
//!   timeout answers 504;
//! - an L7 DENY by method and path answers 403 and is logged, and neither the method's case nor
//!   encoded or dotted paths slip past it;
//! - the tutorial VirtualService + DestinationRule behave as written: the 70/30 subset split, the
//!   header route with its injected delay cut by the timeout (504), the connection pool's
//!   overflow (503);
//! - outlier detection ejects a dead endpoint;
//! - an HTTP/1.1 upgrade (101) joins both connections through the waypoint;
//! - malformed HTTP (400), oversized headers (431), a CONTINUATION flood (connection cut) and
//!   HTTP/2 rapid reset (cut off with GOAWAY) are refused or bounded while the waypoint keeps serving;
//! - a port declared TCP is a byte stream (HTTP-looking bytes are not parsed), an undeclared one
//!   is detected (a server-first protocol and HTTP both work), and an L4 DENY at the waypoint
//!   refuses one peer on one port while the rest flows; the waypoint counts TCP streams.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use e2e::apps::{EchoClient, TUTORIAL, echo_server, grpc_call, grpc_server, http_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, http_exchange, http_exchange_with_body, metric_sum as sum};

const APP_PORT: u16 = 8080;
const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const LATEST: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
const NEW: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 12);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const PLAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 2, 10);
const GRPC_PORT: u16 = 9090;
const GREETER: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 20);
const DB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 30);

fn service(name: &str, namespace: &str, vip: Ipv4Addr, selector: &[(&str, &str)]) -> String {
    let selector: String = selector.iter().map(|(k, v)| format!("\n    {k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {vip}\n  selector:{selector}\n  ports:\n    - name: http\n      port: 80\n      targetPort: {APP_PORT}\n"
    )
}

/// A mesh with namespace `demo` (ambient, waypoint `waypoint`): `hello` served by `hello-latest`
/// (node 2) and `hello-new` (node 1), each also behind its own service; a client on node 1.
async fn demo_mesh() -> (Mesh, Arc<MeshPod>, Arc<MeshPod>) {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    for (name, version, node) in [("hello-latest", "latest", 2), ("hello-new", "new", 1)] {
        let pod =
            mesh.pod(PodSpec::new(name, "demo", node).label("app", "hello").label("version", version)).await.unwrap();
        http_server(pod.listen(APP_PORT).unwrap(), name);
        grpc_server(pod.listen(GRPC_PORT).unwrap(), name);
    }
    mesh.apply("svc-demo-hello", &service("hello", "demo", HELLO, &[("app", "hello")])).unwrap();
    let latest = service("hello-latest", "demo", LATEST, &[("app", "hello"), ("version", "latest")]);
    mesh.apply("svc-demo-hello-latest", &latest).unwrap();
    let new = service("hello-new", "demo", NEW, &[("app", "hello"), ("version", "new")]);
    mesh.apply("svc-demo-hello-new", &new).unwrap();
    let waypoint = mesh.waypoint("demo", "waypoint", 1, WAYPOINT).await.unwrap();
    mesh.use_waypoint("demo", Some("waypoint")).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    // Wait until ztunnel sends `hello` through the waypoint: the waypoint starts counting it.
    let to = SocketAddr::from((HELLO, 80));
    mesh.wait_until("traffic to hello to cross the waypoint", Duration::from_secs(30), || async {
        let Ok(a) = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await else { return false };
        let Ok(m) = mesh.waypoint_metrics(&waypoint).await else { return false };
        a.status == 200
            && sum(&m, "istio_requests_total{", &["destination_service=\"hello.demo.svc.cluster.local\""]) >= 1.0
    })
    .await
    .unwrap();
    (mesh, client, waypoint)
}

async fn get(client: &MeshPod, vip: Ipv4Addr, path: &str, headers: &[(&str, &str)]) -> e2e::mesh::HttpAnswer {
    http_exchange(&client.netns.ns, "GET", SocketAddr::from((vip, 80)), path, headers).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_splits_and_matches_and_the_waypoint_sees_it_all() {
    let (mut mesh, client, waypoint) = demo_mesh().await;
    mesh.apply(
        "route-hello",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: hello\n  namespace: demo\nspec:\n  parentRefs:\n    - {group: \"\", kind: Service, name: hello, port: 80}\n  rules:\n    - matches:\n        - headers: [{name: version, value: new}]\n      backendRefs: [{name: hello-new, port: 80}]\n    - backendRefs:\n        - {name: hello-latest, port: 80, weight: 70}\n        - {name: hello-new, port: 80, weight: 30}\n",
    )
    .unwrap();
    mesh.wait_until("the route to apply", Duration::from_secs(20), || async {
        let mut all_new = true;
        for _ in 0..10 {
            all_new &= get(&client, HELLO, "/", &[("version", "new")]).await.body.trim() == "hello-new";
        }
        all_new
    })
    .await
    .unwrap();
    let before = mesh.waypoint_metrics(&waypoint).await.unwrap();

    // The header route: always the new version.
    for _ in 0..100 {
        let a = get(&client, HELLO, "/", &[("version", "new")]).await;
        assert_eq!((a.status, a.body.trim()), (200, "hello-new"));
    }
    // The split: 1,000 requests, ~30% new (binomial sd ≈ 14.5: ±4 sd).
    let mut new = 0;
    for _ in 0..1000 {
        let a = get(&client, HELLO, "/", &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        match a.body.trim() {
            "hello-new" => new += 1,
            "hello-latest" => {}
            other => panic!("answered by {other:?}"),
        }
    }
    assert!((242..=358).contains(&new), "hello-new got {new} of 1000 (want ~300)");

    // The waypoint counted all 1,100, with Istio's labels.
    let after = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let labels = [
        "reporter=\"waypoint\"",
        "destination_service=\"hello.demo.svc.cluster.local\"",
        "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        // From the baggage the client's ztunnel sends, as Istio's does.
        "source_workload=\"client\"",
        "response_code=\"200\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    let counted = sum(&after, "istio_requests_total{", &labels) - sum(&before, "istio_requests_total{", &labels);
    assert_eq!(counted, 1100.0, "{after}");
    let new_counted = sum(&after, "istio_requests_total{", &["destination_workload=\"hello-new\""])
        - sum(&before, "istio_requests_total{", &["destination_workload=\"hello-new\""]);
    assert_eq!(new_counted, f64::from(100 + new));

    // W3C trace context: the app sees the client's trace with a new span (the waypoint's hop).
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = get(&client, HELLO, "/", &[("traceparent", sent)]).await;
    let seen = a.header("x-seen-traceparent").unwrap_or_default().to_owned();
    assert!(seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "trace lost: {seen:?} in {}", a.head);
    assert!(!seen.contains("00f067aa0ba902b7") && seen.len() == sent.len(), "no new span: {seen:?}");
    assert!(sum(&after, "istio_request_duration_milliseconds_count{", &labels[..2]) >= 1100.0);

    // A namespace without a waypoint never crosses it.
    mesh.namespace("plain", true).await.unwrap();
    let plain = mesh.pod(PodSpec::new("plain-server", "plain", 2).label("app", "plain")).await.unwrap();
    http_server(plain.listen(APP_PORT).unwrap(), "plain-server");
    mesh.apply("svc-plain", &service("plain", "plain", PLAIN, &[("app", "plain")])).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_until("the plain service", Duration::from_secs(20), || async {
        http_exchange(&client.netns.ns, "GET", SocketAddr::from((PLAIN, 80)), "/", &[])
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await
    .unwrap();
    for _ in 0..20 {
        assert_eq!(get(&client, PLAIN, "/", &[]).await.body.trim(), "plain-server");
    }
    let last = mesh.waypoint_metrics(&waypoint).await.unwrap();
    assert_eq!(sum(&last, "istio_requests_total{", &["destination_service=\"plain.plain.svc.cluster.local\""]), 0.0);
    assert!(!last.contains("plain-server"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_flaky_endpoint_and_timeouts_answer_504() {
    let (mesh, client, waypoint) = demo_mesh().await;
    // Without retries, /flaky fails every other request (per endpoint).
    let mut failures = 0;
    for _ in 0..20 {
        failures += usize::from(get(&client, LATEST, "/flaky", &[]).await.status == 503);
    }
    assert!((8..=12).contains(&failures), "{failures} of 20 failed without retries");

    mesh.apply(
        "route-latest",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: latest\n  namespace: demo\nspec:\n  parentRefs:\n    - {group: \"\", kind: Service, name: hello-latest, port: 80}\n  rules:\n    - matches: [{path: {type: PathPrefix, value: /delay}}, {path: {type: PathPrefix, value: /slow-body}}]\n      timeouts: {request: 300ms}\n      backendRefs: [{name: hello-latest, port: 80}]\n    - retry: {codes: [503], attempts: 2}\n      backendRefs: [{name: hello-latest, port: 80}]\n",
    )
    .unwrap();
    mesh.wait_until("the retry route", Duration::from_secs(20), || async {
        http_exchange(&client.netns.ns, "GET", SocketAddr::from((LATEST, 80)), "/delay/1000", &[])
            .await
            .is_ok_and(|a| a.status == 504)
    })
    .await
    .unwrap();
    for _ in 0..50 {
        let a = get(&client, LATEST, "/flaky", &[]).await;
        assert_eq!(a.status, 200, "a retry should have hidden the failure: {a:?}");
    }
    let a = get(&client, LATEST, "/delay/1000", &[]).await;
    assert_eq!(a.status, 504, "{a:?}");
    assert_eq!(get(&client, LATEST, "/delay/10", &[]).await.status, 200);
    // The timeout covers the body too: headers at once, a body 1 s later is cut at 300 ms (the
    // status has gone out, so the cut is a chunked body that never ends).
    let asked = std::time::Instant::now();
    let cut =
        http_exchange(&client.netns.ns, "GET", SocketAddr::from((LATEST, 80)), "/slow-body/1000", &[]).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(cut.status, 200, "{cut:?}");
    assert!(cut.head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{cut:?}");
    assert!(!cut.body.contains("late body") && !cut.body.ends_with("0\r\n\r\n"), "the body was not cut: {cut:?}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1000), "cut after {took:?}");
    let whole = get(&client, LATEST, "/slow-body/10", &[]).await;
    assert_eq!(whole.status, 200, "{whole:?}");
    assert!(whole.body.contains("late body\n"), "{whole:?}");
    // A body too large to keep for a retry (3 MiB > 1 MiB) is streamed once, not refused.
    let big = vec![b'b'; 3 << 20];
    let a = http_exchange_with_body(&client.netns.ns, "POST", SocketAddr::from((LATEST, 80)), "/upload", &[], &big)
        .await
        .unwrap();
    assert_eq!((a.status, a.header("x-seen-body-bytes")), (200, Some("3145728")), "{a:?}");
    // ...and so not retried: of two in a row to /flaky (which fails every other time), one fails.
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let to = SocketAddr::from((LATEST, 80));
        statuses.push(http_exchange_with_body(&client.netns.ns, "POST", to, "/flaky", &[], &big).await.unwrap().status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 503], "a body over 1 MiB was retried");
    let small =
        http_exchange_with_body(&client.netns.ns, "POST", SocketAddr::from((LATEST, 80)), "/flaky", &[], &[b's'; 1000])
            .await
            .unwrap();
    assert_eq!((small.status, small.header("x-seen-body-bytes")), (200, Some("1000")), "{small:?}");
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    assert!(sum(&m, "istio_requests_total{", &["response_code=\"504\"", "response_flags=\"UT\""]) >= 2.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_deny_by_method_and_path_cannot_be_bypassed() {
    let (mesh, client, _waypoint) = demo_mesh().await;
    mesh.apply(
        "authz-admin",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-admin-reads\n  namespace: demo\nspec:\n  targetRefs:\n    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n  action: DENY\n  rules:\n    - to:\n        - operation:\n            methods: [GET]\n            paths: [\"/admin*\"]\n",
    )
    .unwrap();
    let to = SocketAddr::from((LATEST, 80));
    mesh.wait_until("the L7 policy", Duration::from_secs(20), || async {
        http_exchange(&client.netns.ns, "GET", to, "/admin", &[]).await.is_ok_and(|a| a.status == 403)
    })
    .await
    .unwrap();
    for (method, path) in [
        ("GET", "/admin"),
        ("GET", "/admin/users"),
        ("get", "/admin"),
        ("Get", "/admin/users"),
        ("GET", "/%61dmin"),
        ("GET", "/%2Fadmin"),
        ("GET", "//admin"),
        ("GET", "/public/../admin"),
        ("GET", "/public/%2e%2e/admin"),
    ] {
        let a = http_exchange(&client.netns.ns, method, to, path, &[]).await.unwrap();
        assert_eq!(a.status, 403, "{method} {path} slipped past the DENY: {a:?}");
    }
    // What is not denied still works, and reaches the app in canonical form.
    let a = http_exchange(&client.netns.ns, "get", to, "/public/./page", &[]).await.unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-seen-method"), Some("GET"));
    assert_eq!(a.header("x-seen-path"), Some("/public/page"));
    // The app sees the original client's address, not the waypoint's: the waypoint names the
    // client in the tunnel's `forwarded`, which the endpoint's ztunnel believes from it alone.
    assert_eq!(a.header("x-seen-peer"), Some(client.ip.to_string().as_str()), "{a:?}");
    assert_eq!(http_exchange(&client.netns.ns, "POST", to, "/admin", &[]).await.unwrap().status, 200);
    // Malformed escapes and path parameters are refused outright.
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/a%zz", &[]).await.unwrap().status, 400);
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/admin;x=1", &[]).await.unwrap().status, 400);
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/public;/../admin", &[]).await.unwrap().status, 400);
    // A second Host, or a Host that disagrees with an absolute-form target: refused.
    let two_hosts = http_exchange(&client.netns.ns, "GET", to, "/public", &[("Host", "hello-latest")]).await.unwrap();
    assert_eq!(two_hosts.status, 400, "{two_hosts:?}");
    let absolute = "http://hello-latest.demo.svc.cluster.local/public";
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, absolute, &[]).await.unwrap().status, 400);
    // CONNECT inside the tunnel is not proxied.
    assert_eq!(http_exchange(&client.netns.ns, "CONNECT", to, &to.to_string(), &[]).await.unwrap().status, 405);
    // A header sent twice cannot dodge a DENY on one of its values.
    mesh.apply(
        "authz-header",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-admin-user\n  namespace: demo\nspec:\n  targetRefs:\n    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n  action: DENY\n  rules:\n    - when:\n        - key: request.headers[x-user]\n          values: [admin]\n",
    )
    .unwrap();
    mesh.wait_until("the header policy", Duration::from_secs(20), || async {
        http_exchange(&client.netns.ns, "GET", to, "/public", &[("x-user", "admin")])
            .await
            .is_ok_and(|a| a.status == 403)
    })
    .await
    .unwrap();
    let twice = [("x-user", "guest"), ("x-user", "admin")];
    assert_eq!(http_exchange(&client.netns.ns, "GET", to, "/public", &twice).await.unwrap().status, 403);
    assert_eq!(
        http_exchange(&client.netns.ns, "GET", to, "/public", &[("x-user", "guest")]).await.unwrap().status,
        200
    );
    let log = mesh.log_tails(400);
    assert!(log.contains("request denied by policy"), "no deny in the waypoint log:\n{log}");
    assert!(log.contains("demo/no-admin-reads"), "the deny does not name the policy:\n{log}");
}

/// The VirtualService and DestinationRule users copy from tutorials, exactly as the issue gives
/// them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_virtualservice_and_destinationrule_behave_as_written() {
    let (mesh, client, waypoint) = demo_mesh().await;
    mesh.apply("istio-hello", TUTORIAL).unwrap();
    mesh.wait_until("the VirtualService", Duration::from_secs(20), || async {
        let mut all_new = true;
        for _ in 0..10 {
            let a = get(&client, HELLO, "/", &[]).await;
            all_new &= a.status == 200 && a.header("x-served-by").is_some();
        }
        let m = mesh.waypoint_metrics(&waypoint).await.unwrap_or_default();
        // The DestinationRule (subsets, connection pool) has reached the waypoint.
        let config = mesh.waypoint_config(&waypoint).await.unwrap_or_default();
        let policies = config["waypoint"]["destination_policies"].as_array().cloned().unwrap_or_default();
        all_new
            && m.contains("destination_service=\"hello.demo.svc.cluster.local\"")
            && policies.iter().any(|p| p.as_str().is_some_and(|p| p.contains("hello")))
    })
    .await
    .unwrap();

    // The split over the subsets: ~30 % new.
    let mut new = 0;
    for _ in 0..1000 {
        let a = get(&client, HELLO, "/", &[]).await;
        assert_eq!(a.status, 200, "{a:?}");
        match a.body.trim() {
            "hello-new" => new += 1,
            "hello-latest" => {}
            other => panic!("answered by {other:?}"),
        }
    }
    assert!((242..=358).contains(&new), "subset new got {new} of 1000 (want ~300)");

    // `version: new`: always the new subset; ~10 % delayed 10 s, cut at 5 s with 504. Two at a
    // time (within the pool: one in flight, one waiting).
    let ns = client.netns.ns.clone();
    let to = SocketAddr::from((HELLO, 80));
    let header = e2e::tutorial::header_route(2, 40, move || {
        let ns = ns.clone();
        async move { http_exchange(&ns, "GET", to, "/", &[("version", "new")]).await }
    })
    .await
    .unwrap();
    assert!(header.unexpected.is_empty(), "{:?}", header.unexpected);
    let timeouts = header.timed_out;
    // Binomial(80, 0.1): outside 1..=20 with probability < 0.001. (The percentage itself is
    // measured more tightly by the abort test, with 1,000 requests.)
    assert!((1..=20).contains(&timeouts), "{timeouts} of 80 delayed past the timeout (want ~8)");

    // Beyond the pool (1 in flight + 1 waiting), concurrent requests get 503 (overflow).
    let ns = client.netns.ns.clone();
    let statuses = e2e::tutorial::burst(30, move || {
        let ns = ns.clone();
        async move { http_exchange(&ns, "GET", to, "/delay/300", &[]).await }
    })
    .await
    .unwrap();
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(overflow + ok, 30, "{statuses:?}");
    assert!(ok >= 2 && overflow >= 20, "{ok} served, {overflow} overflowed: {statuses:?}");
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    assert_eq!(sum(&m, "istio_requests_total{", &["response_code=\"503\"", "response_flags=\"UO\""]), overflow as f64);
    assert_eq!(sum(&m, "istio_requests_total{", &["response_code=\"504\"", "response_flags=\"UT\""]), timeouts as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_a_dead_endpoint() {
    let (mut mesh, client, _waypoint) = demo_mesh().await;
    let alive = mesh.pod(PodSpec::new("doa-alive", "demo", 2).label("app", "doa")).await.unwrap();
    http_server(alive.listen(APP_PORT).unwrap(), "doa-alive");
    // In the mesh, selected by the service, but nothing listens: every request to it fails.
    let _dead = mesh.pod(PodSpec::new("doa-dead", "demo", 1).label("app", "doa")).await.unwrap();
    let vip = Ipv4Addr::new(10, 96, 1, 20);
    mesh.apply("svc-doa", &service("doa", "demo", vip, &[("app", "doa")])).unwrap();
    mesh.apply(
        "dr-doa",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: doa, namespace: demo}\nspec:\n  host: doa\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n",
    )
    .unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_until("the doa service through the waypoint", Duration::from_secs(20), || async {
        http_exchange(&client.netns.ns, "GET", SocketAddr::from((vip, 80)), "/", &[])
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await
    .unwrap();
    // Round robin reaches the dead endpoint at most once more before it is ejected.
    let mut failures = 0;
    for _ in 0..30 {
        let a = get(&client, vip, "/", &[]).await;
        if a.status == 200 {
            assert_eq!(a.body.trim(), "doa-alive");
        } else {
            failures += 1;
        }
    }
    assert!(failures <= 1, "{failures} of 30 failed after the dead endpoint should have been ejected");
    let log = mesh.log_tails(400);
    assert!(log.contains("endpoint ejected"), "no ejection logged:\n{log}");
}

/// Raw HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_is_refused_or_bounded_and_the_waypoint_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mesh, client, waypoint) = demo_mesh().await;
    let to = SocketAddr::from((LATEST, 80));
    let pid = mesh.waypoint_pid(&waypoint).unwrap();
    let serves = || async {
        let a = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await.unwrap();
        assert_eq!((a.status, a.body.trim()), (200, "hello-latest"));
    };

    // Malformed HTTP/1.1: 400.
    let a = http_exchange(&client.netns.ns, "GET", to, "/ HTTP/1.1\r\nbroken header line\r\nX:", &[]).await;
    assert!(a.as_ref().is_err() || a.as_ref().is_ok_and(|a| a.status == 400), "{a:?}");
    let mut raw = client.connect(to).await.unwrap();
    raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&answer));
    serves().await;

    // Oversized headers (over 64 KiB): 431.
    let big = "a".repeat(80 * 1024);
    let a = http_exchange(&client.netns.ns, "GET", to, "/", &[("x-big", &big)]).await.unwrap();
    assert_eq!(a.status, 431, "{a:?}");
    serves().await;

    // CONTINUATION flood: a header block that never ends. The waypoint cuts the connection long
    // before 64 MiB of it arrive.
    let mut flood = client.connect(to).await.unwrap();
    flood.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    flood.write_all(&frame(4, 0, 0, &[])).await.unwrap();
    flood.write_all(&frame(1, 0, 1, &[0x82, 0x86, 0x84])).await.unwrap();
    let mut literal = vec![0x00, 0x05];
    literal.extend_from_slice(b"x-pad");
    literal.extend_from_slice(&[0x7f, 0x81, 0x7f]); // value length 16,384 - 1 (HPACK 7-bit prefix)
    literal.resize(16 * 1024, b'p');
    let continuation = frame(9, 0, 1, &literal);
    let mut sent = 0usize;
    let cut = loop {
        if sent >= 64 << 20 {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(10), flood.write_all(&continuation)).await {
            Ok(Ok(())) => sent += continuation.len(),
            _ => break true,
        }
    };
    assert!(cut, "the waypoint accepted {sent} bytes of one header block");
    eprintln!("CONTINUATION flood cut after {sent} bytes");
    serves().await;

    // Rapid reset: 5,000 streams opened and cancelled at once while another client is served.
    let stream = client.connect(to).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut opened = 0;
    let mut stopped = None;
    for _ in 0..5000 {
        let ready = match h2.clone().ready().await {
            Ok(r) => r,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        };
        h2 = ready;
        let req = http::Request::get(format!("http://{to}/delay/50")).body(()).unwrap();
        match h2.send_request(req, false) {
            Ok((resp, send)) => drop((resp, send)),
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
        opened += 1;
        if opened % 500 == 0 {
            serves().await;
        }
    }
    drop(h2);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    // Refused (streams reset before the waypoint took them trip its limit: GOAWAY; the client may
    // see only the closed connection when its next write hits the socket first), or, when the
    // waypoint took each stream before its reset arrived, bounded by the stream limit: either
    // way it kept serving (checked every 500) and its memory stays bounded (below).
    let cut_by_server = stopped
        .as_ref()
        .and_then(h2::Error::get_io)
        .is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset));
    let refused = format!("{stopped:?} {ended:?}").contains("ENHANCE_YOUR_CALM") || cut_by_server;
    assert!(refused, "the flood was never cut off: {opened} streams, {stopped:?}, {ended:?}");
    assert!(opened < 5000, "cut off only after all {opened} streams");
    serves().await;
    let (rss, peak) = e2e::ca_process::rss_mib(pid).unwrap();
    assert!(peak < 256.0, "waypoint peak RSS {peak:.0} MiB after the floods (now {rss:.0} MiB)");
    let log = mesh.log_tails(100);
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_pass_through_the_waypoint() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mesh, client, waypoint) = demo_mesh().await;
    let before = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let mut s = client.connect(SocketAddr::from((LATEST, 80))).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: hello-latest\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    // Both ways, several times, on the switched connection.
    for msg in [&b"ping"[..], b"a longer message over the upgraded connection", &[0u8; 4096]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg);
    }
    let after = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let switched = |m: &str| sum(m, "istio_requests_total{", &["response_code=\"101\""]);
    assert_eq!(switched(&after) - switched(&before), 1.0);

    // An upgrade to h2c would hand the backend HTTP/2 requests no policy sees: the waypoint drops
    // it and the request goes on as HTTP/1.1 (and its answer arrives: an upgrade request answered
    // without 101 on a closing connection used to lose the answer).
    let h2c =
        [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")];
    let a = http_exchange(&client.netns.ns, "GET", SocketAddr::from((LATEST, 80)), "/", &h2c).await.unwrap();
    assert_eq!((a.status, a.header("x-seen-upgrade")), (200, Some("-")), "{a:?}");
    // What a client claims about forwarding is kept behind what the waypoint saw, never believed:
    // its own X-Forwarded-For entry comes last, and a client certificate header is removed.
    let claims =
        [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-Client-Cert", "By=spiffe://cluster.local/ns/x/sa/admin")];
    let a = http_exchange(&client.netns.ns, "GET", SocketAddr::from((LATEST, 80)), "/", &claims).await.unwrap();
    assert_eq!(a.header("x-seen-xff"), Some(format!("127.0.0.1, {}", client.ip).as_str()), "{a:?}");
    assert_eq!(a.header("x-seen-xfcc"), Some("-"), "{a:?}");
}

/// A gRPC service (port 90 → 9090) of the same pods, and one service per version.
fn grpc_service(name: &str, vip: Ipv4Addr, selector: &[(&str, &str)]) -> String {
    let selector: String = selector.iter().map(|(k, v)| format!("\n    {k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  clusterIP: {vip}\n  selector:{selector}\n  ports:\n    - name: grpc\n      port: 90\n      targetPort: {GRPC_PORT}\n      appProtocol: grpc\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcroute_routes_calls_by_method_and_trailers_come_back() {
    let (mesh, client, waypoint) = demo_mesh().await;
    mesh.apply("svc-greeter", &grpc_service("greeter", GREETER, &[("app", "hello")])).unwrap();
    mesh.apply("svc-greeter-new", &grpc_service("greeter-new", Ipv4Addr::new(10, 96, 1, 21), &[("version", "new")]))
        .unwrap();
    mesh.apply(
        "svc-greeter-latest",
        &grpc_service("greeter-latest", Ipv4Addr::new(10, 96, 1, 22), &[("version", "latest")]),
    )
    .unwrap();
    mesh.apply(
        "grpcroute-greeter",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: greeter\n  namespace: demo\nspec:\n  parentRefs:\n    - {group: \"\", kind: Service, name: greeter, port: 90}\n  rules:\n    - matches:\n        - method: {service: demo.Greeter, method: SayHello}\n      backendRefs: [{name: greeter-new, port: 90}]\n    - matches:\n        - method: {service: demo.Greeter}\n      backendRefs: [{name: greeter-latest, port: 90}]\n",
    )
    .unwrap();
    let to = SocketAddr::from((GREETER, 90));
    let call = |path: &'static str| {
        let client = client.clone();
        async move { grpc_call(client.connect(to).await?, path, b"hi").await }
    };
    mesh.wait_until("the GRPCRoute to apply", Duration::from_secs(30), || async {
        let mut routed = true;
        for _ in 0..6 {
            routed &= call("/demo.Greeter/SayHello").await.is_ok_and(|a| a.message.starts_with("hello-new "));
        }
        routed
    })
    .await
    .unwrap();
    for _ in 0..20 {
        let a = call("/demo.Greeter/SayHello").await.unwrap();
        assert_eq!((a.status, a.message.as_str()), (200, "hello-new /demo.Greeter/SayHello"));
        assert_eq!(a.grpc_status.as_deref(), Some("0"), "the trailers did not come back: {a:?}");
        let b = call("/demo.Greeter/SayGoodbye").await.unwrap();
        assert_eq!((b.status, b.message.as_str()), (200, "hello-latest /demo.Greeter/SayGoodbye"));
        assert_eq!(b.grpc_status.as_deref(), Some("0"));
    }
    // Another service matches neither rule: no route, as Gateway API says (404).
    assert_eq!(call("/other.Service/Call").await.unwrap().status, 404);
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    assert!(
        sum(&m, "istio_requests_total{", &["destination_service=\"greeter.demo.svc.cluster.local\""]) >= 40.0,
        "{m}"
    );
}

/// Service `db` (pod `db`, node 2): port 5432 declared TCP, 7001 undeclared (both to an echo
/// server, which speaks first), 8080 undeclared (to an HTTP server).
const DB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: demo\nspec:\n  clusterIP: 10.96.1.30\n  selector:\n    app: db\n  ports:\n    - {name: tcp-postgres, port: 5432, targetPort: 7000}\n    - {name: stream, port: 7001, targetPort: 7000}\n    - {name: web, port: 8080, targetPort: 8080}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_ports_are_streams_through_the_waypoint_with_l4_policy() {
    let (mut mesh, client, waypoint) = demo_mesh().await;
    let db = mesh.pod(PodSpec::new("db", "demo", 2)).await.unwrap();
    echo_server(db.listen(7000).unwrap(), "db");
    http_server(db.listen(8080).unwrap(), "db-web");
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    mesh.apply("svc-demo-db", DB_SERVICE).unwrap();
    let declared = SocketAddr::from((DB, 5432));
    let undeclared = SocketAddr::from((DB, 7001));
    let tcp_opened = |m: &str, flags: &str| {
        sum(
            m,
            "istio_tcp_connections_opened_total{",
            &["reporter=\"waypoint\"", "destination_service=\"db.demo.svc.cluster.local\"", flags],
        )
    };
    mesh.wait_until("TCP to db to cross the waypoint", Duration::from_secs(30), || async {
        let Ok(stream) = client.connect(declared).await else { return false };
        let Ok(m) = mesh.waypoint_metrics(&waypoint).await else { return false };
        EchoClient::greet(stream).await.is_ok() && tcp_opened(&m, "response_flags=\"-\"") >= 1.0
    })
    .await
    .unwrap();
    let before = mesh.waypoint_metrics(&waypoint).await.unwrap();

    // Declared TCP: bytes that look like HTTP are echoed as they are, not parsed.
    let mut echo = EchoClient::greet(client.connect(declared).await.unwrap()).await.unwrap();
    assert_eq!(echo.server, "db");
    echo.round_trip(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n").await.unwrap();
    echo.round_trip(&[0u8; 100_000]).await.unwrap();
    drop(echo);

    // Undeclared, server speaks first: after the detection wait it is a stream.
    let mut echo = EchoClient::greet(client.connect(undeclared).await.unwrap()).await.unwrap();
    echo.round_trip(b"\x16\x03\x01 not http").await.unwrap();
    echo.round_trip(&[7u8; 300_000]).await.unwrap();
    drop(echo);

    // Undeclared, client speaks HTTP: detected, routed and counted as requests.
    let a = http_exchange(&client.netns.ns, "GET", SocketAddr::from((DB, 8080)), "/", &[]).await.unwrap();
    assert_eq!((a.status, a.body.trim()), (200, "db-web"));

    // L4 DENY at the waypoint: the intruder, on the declared port only.
    mesh.apply(
        "authz-db",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-intruder-db\n  namespace: demo\nspec:\n  targetRefs:\n    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [cluster.local/ns/demo/sa/intruder]\n      to:\n        - operation:\n            ports: [\"5432\"]\n",
    )
    .unwrap();
    mesh.wait_until("the L4 policy at the waypoint", Duration::from_secs(20), || async {
        let Ok(stream) = intruder.connect(declared).await else { return true };
        EchoClient::greet(stream).await.is_err()
    })
    .await
    .unwrap();
    for _ in 0..3 {
        let refused = EchoClient::greet(intruder.connect(declared).await.unwrap()).await;
        assert!(refused.is_err(), "the intruder got through: {refused:?}");
    }
    let mut allowed = EchoClient::greet(client.connect(declared).await.unwrap()).await.unwrap();
    allowed.round_trip(b"still flowing").await.unwrap();
    let mut other_port = EchoClient::greet(intruder.connect(undeclared).await.unwrap()).await.unwrap();
    other_port.round_trip(b"another port").await.unwrap();
    drop((allowed, other_port));

    let after = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let client_opened = |m: &str| tcp_opened(m, "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"");
    // The client's streams since `before`: declared, undeclared, declared again under the policy.
    assert_eq!(client_opened(&after) - client_opened(&before), 3.0, "{after}");
    let refused = |m: &str| tcp_opened(m, "response_flags=\"RBAC\"");
    assert!(refused(&after) - refused(&before) >= 3.0, "{after}");
    let requests = |m: &str| {
        sum(m, "istio_requests_total{", &["destination_service=\"db.demo.svc.cluster.local\"", "response_code=\"200\""])
    };
    assert_eq!(requests(&after) - requests(&before), 1.0, "only the HTTP port counts requests");
    let echoed = sum(
        &after,
        "istio_tcp_received_bytes_total{",
        &[
            "destination_service=\"db.demo.svc.cluster.local\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
        ],
    );
    assert!(echoed >= 100_000.0, "bytes from the client: {echoed}");
    let log = mesh.log_tails(400);
    assert!(log.contains("connection denied by policy"), "no deny in the waypoint log:\n{log}");
    assert!(log.contains("demo/no-intruder-db"), "the deny does not name the policy:\n{log}");
}

/// A subset's own traffic policy: only subset `new` has a connection pool (1 in flight, 1
/// waiting), so a burst to it overflows while the same burst to `latest` is all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_policy_applies_to_that_subset_only() {
    let (mesh, client, _waypoint) = demo_mesh().await;
    mesh.apply(
        "istio-subsets",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: demo}
spec:
  hosts: [hello]
  http:
  - match: [{headers: {lane: {exact: new}}}]
    route: [{destination: {host: hello, subset: new}}]
  - route: [{destination: {host: hello, subset: latest}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: demo}
spec:
  host: hello
  subsets:
  - {name: latest, labels: {version: latest}}
  - name: new
    labels: {version: new}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
",
    )
    .unwrap();
    mesh.wait_until("the subset routes", Duration::from_secs(20), || async {
        get(&client, HELLO, "/", &[("lane", "new")]).await.body.trim() == "hello-new"
            && get(&client, HELLO, "/", &[]).await.body.trim() == "hello-latest"
    })
    .await
    .unwrap();
    let burst = |lane: &'static str| {
        let client = client.clone();
        async move {
            let calls: Vec<_> = (0..20)
                .map(|_| {
                    let client = client.clone();
                    tokio::spawn(async move { get(&client, HELLO, "/delay/300", &[("lane", lane)]).await.status })
                })
                .collect();
            let mut statuses = Vec::new();
            for c in calls {
                statuses.push(c.await.unwrap());
            }
            statuses
        }
    };
    let latest = burst("latest").await;
    assert!(latest.iter().all(|s| *s == 200), "subset latest has no limits: {latest:?}");
    let new = burst("new").await;
    let overflow = new.iter().filter(|s| **s == 503).count();
    assert_eq!(overflow + new.iter().filter(|s| **s == 200).count(), 20, "{new:?}");
    assert!(overflow >= 10, "subset new's pool (1 + 1 waiting) let {} of 20 through: {new:?}", 20 - overflow);
}

/// No way around a waypoint: once the waypoint serves `server` for its own address
/// (`istio.io/waypoint-for: all`), traffic to the pod's IP goes through the waypoint and works,
/// while a mesh identity dialing the pod's HBONE port directly is refused (401) and counted by
/// the pod's ztunnel. (Before, a direct tunnel skipped every L7 policy of the waypoint.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_serving_a_pod_cannot_be_bypassed() {
    use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolError};
    use proto::hbone::server::StatusCode;

    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2).label("app", "server")).await.unwrap();
    http_server(server.listen(APP_PORT).unwrap(), "server");
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await.unwrap();
    let waypoint = mesh.waypoint("demo", "waypoint", 1, WAYPOINT).await.unwrap();
    mesh.apply(
        "gw-demo-waypoint",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: demo\n  labels:\n    istio.io/waypoint-for: all\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n    - name: mesh\n      port: 15008\n      protocol: HBONE\n",
    )
    .unwrap();
    mesh.use_waypoint("demo", Some("waypoint")).unwrap();
    mesh.settle(&["demo/waypoint_only_demo_waypoint"], &[]).await.unwrap();

    // Through the waypoint, by the pod's address.
    let to = SocketAddr::from((server.ip, APP_PORT));
    mesh.wait_until("pod traffic to cross the waypoint", Duration::from_secs(30), || async {
        let Ok(a) = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await else { return false };
        let Ok(m) = mesh.waypoint_metrics(&waypoint).await else { return false };
        a.status == 200
            && a.body.trim() == "server"
            && sum(&m, "istio_requests_total{", &["destination_workload=\"server\""]) >= 1.0
    })
    .await
    .unwrap();

    // Straight to the pod's HBONE port with a real mesh identity: refused, and counted.
    let credential = mesh.workload_certificate("demo", "client").await.unwrap();
    let trust = proto::tls::SharedTrustBundle::new(
        proto::tls::TrustBundle::from_pem(&std::fs::read(mesh.ca_root()).unwrap()).unwrap(),
    );
    let dialer = Arc::new(ztunnel::pod::PodDialer(Arc::new(outsider.netns.ns.clone())));
    let pool = Pool::with_dialer(PoolConfig::default(), trust, dialer);
    let before = mesh.metrics(2).await.unwrap();
    let denied = |m: &str| {
        sum(
            m,
            "istio_tcp_connections_closed_total{",
            &["response_flags=\"DENY\"", "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\""],
        )
    };
    let expected = vec!["spiffe://cluster.local/ns/demo/sa/server".parse().unwrap()];
    let direct = ConnectRequest::new(credential, SocketAddr::from((server.ip, 15008)), expected, to);
    match pool.connect(direct).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        Ok(_) => panic!("a direct tunnel to a pod served by a waypoint was accepted"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    let after = mesh.metrics(2).await.unwrap();
    assert_eq!(denied(&after) - denied(&before), 1.0, "{after}");
    assert!(
        mesh.ztunnel_log(2).unwrap().contains("waypoint_only_demo_waypoint"),
        "the refusal does not name the policy"
    );
    // The waypoint's own path still works afterwards.
    let again = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await.unwrap();
    assert_eq!((again.status, again.body.trim()), (200, "server"));

    // A tunnel to the waypoint itself is taken for a target that uses it, and refused (400) for
    // one that does not (the outsider, in a namespace without a waypoint).
    let credential = mesh.workload_certificate("demo", "client").await.unwrap();
    let waypoint_id = vec!["spiffe://cluster.local/ns/demo/sa/waypoint".parse().unwrap()];
    let at_waypoint = SocketAddr::from((waypoint.ip, 15008));
    let served = ConnectRequest::new(credential.clone(), at_waypoint, waypoint_id.clone(), to);
    drop(pool.connect(served).await.expect("a tunnel for a target that uses the waypoint"));
    let elsewhere = ConnectRequest::new(credential, at_waypoint, waypoint_id, outsider.addr(APP_PORT));
    match pool.connect(elsewhere).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::BAD_REQUEST),
        Ok(_) => panic!("the waypoint took a tunnel for a target that does not use it"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    let log = std::fs::read_to_string(mesh.state_dir().join("logs/waypoint-demo-waypoint.log")).unwrap_or_default();
    assert!(log.contains("tunnel refused: the target does not use this waypoint"), "{log}");
}

const VS_FEATURES: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello-features, namespace: demo}
spec:
  hosts: [hello]
  http:
    - match: [{uri: {prefix: /abort}}]
      fault: {abort: {percentage: {value: 10}, httpStatus: 418}}
      route: [{destination: {host: hello-new}}]
    - match: [{uri: {prefix: /old}}]
      redirect: {uri: /new-place, authority: hello.example, redirectCode: 308}
    - match: [{uri: {prefix: /headers}}]
      headers:
        request: {set: {x-test-set: set}, add: {x-test-add: added}, remove: [x-test-gone]}
        response: {set: {x-answer: changed}, remove: [x-seen-peer]}
      route: [{destination: {host: hello-new}}]
    - match: [{uri: {prefix: /mirror}}]
      route: [{destination: {host: hello-latest}}]
      mirror: {host: hello-new}
    - route: [{destination: {host: hello-new}}]
";

/// What hello-new's app has had so far: requests and body bytes (its `/requests`).
async fn new_has_had(client: &MeshPod) -> (u64, u64) {
    let a = get(client, NEW, "/requests", &[]).await;
    let mut n = a.body.split_whitespace().map(|v| v.parse::<u64>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

/// A VirtualService takes precedence over an HTTPRoute for the same service, and its abort
/// fault, redirect, header changes and mirror apply at run time (a body over 1 MiB is not
/// mirrored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtualservice_comes_first_and_its_faults_redirects_headers_and_mirrors_apply() {
    let (mesh, client, waypoint) = demo_mesh().await;
    mesh.apply(
        "route-hello",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: hello\n  namespace: demo\nspec:\n  parentRefs:\n    - {group: \"\", kind: Service, name: hello, port: 80}\n  rules:\n    - backendRefs: [{name: hello-latest, port: 80}]\n",
    )
    .unwrap();
    let all_from = |name: &'static str| {
        let client = client.clone();
        async move {
            for _ in 0..10 {
                if get(&client, HELLO, "/", &[]).await.header("x-served-by") != Some(name) {
                    return false;
                }
            }
            true
        }
    };
    mesh.wait_until("the HTTPRoute", Duration::from_secs(20), || all_from("hello-latest")).await.unwrap();
    mesh.apply("vs-hello", VS_FEATURES).unwrap();
    // Both now exist for `hello`: the VirtualService's routes are tried first.
    mesh.wait_until("the VirtualService to win", Duration::from_secs(20), || all_from("hello-new")).await.unwrap();

    // Abort 10 % with 418: Binomial(1000, 0.1) (sd 9.5) leaves 50..=150 with probability < 1e-6
    // (60..=140, at 4.2 sd, failed once in CI with 59).
    let mut aborted = 0;
    for _ in 0..1000 {
        let a = get(&client, HELLO, "/abort", &[]).await;
        match a.status {
            418 => {
                aborted += 1;
                assert_eq!(a.body, "fault filter abort\n", "{a:?}");
            }
            _ => assert_eq!((a.status, a.header("x-served-by")), (200, Some("hello-new")), "{a:?}"),
        }
    }
    assert!((50..=150).contains(&aborted), "{aborted} of 1000 aborted (want ~100)");
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    assert_eq!(
        sum(&m, "istio_requests_total{", &["response_code=\"418\"", "response_flags=\"FI\""]),
        f64::from(aborted)
    );

    // Redirect: answered by the waypoint, never forwarded.
    let before = new_has_had(&client).await;
    let a = get(&client, HELLO, "/old/page", &[]).await;
    assert_eq!((a.status, a.header("location")), (308, Some("http://hello.example/new-place")), "{a:?}");

    // Header changes both ways.
    let a =
        get(&client, HELLO, "/headers", &[("x-test-gone", "bye"), ("x-test-add", "mine"), ("x-test-set", "old")]).await;
    assert_eq!((a.status, a.header("x-served-by")), (200, Some("hello-new")), "{a:?}");
    assert_eq!(a.header("x-seen-x-test-set"), Some("set"), "{a:?}");
    let head = a.head.to_ascii_lowercase();
    for line in ["x-seen-x-test-add: mine", "x-seen-x-test-add: added", "x-answer: changed"] {
        assert!(head.contains(line), "no {line:?} in {a:?}");
    }
    assert!(!head.contains("x-seen-x-test-gone") && !head.contains("x-seen-peer"), "{a:?}");
    assert_eq!(new_has_had(&client).await.0, before.0 + 1, "the redirect reached the app");

    // Mirror: each request is answered by hello-latest and copied to hello-new.
    let before = new_has_had(&client).await;
    for _ in 0..20 {
        assert_eq!(get(&client, HELLO, "/mirror", &[]).await.header("x-served-by"), Some("hello-latest"));
    }
    mesh.wait_until("20 copies at hello-new", Duration::from_secs(10), || async {
        new_has_had(&client).await.0 == before.0 + 20
    })
    .await
    .unwrap();
    // A body over 1 MiB is streamed to hello-latest once and not copied; a small one is.
    let to = SocketAddr::from((HELLO, 80));
    let big = vec![b'b'; 3 << 20];
    let a = http_exchange_with_body(&client.netns.ns, "POST", to, "/mirror", &[], &big).await.unwrap();
    assert_eq!((a.status, a.header("x-seen-body-bytes")), (200, Some("3145728")), "{a:?}");
    let a = http_exchange_with_body(&client.netns.ns, "POST", to, "/mirror", &[], &[b's'; 1000]).await.unwrap();
    assert_eq!((a.status, a.header("x-served-by")), (200, Some("hello-latest")), "{a:?}");
    mesh.wait_until("the small body's copy", Duration::from_secs(10), || async {
        new_has_had(&client).await.0 > before.0 + 20
    })
    .await
    .unwrap();
    // Under test: no copy of the big body follows.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(new_has_had(&client).await, (before.0 + 21, before.1 + 1000), "the 3 MiB body was mirrored");
}

/// An L7 AuthorizationPolicy bound to a Service (`targetRefs`) applies to that Service only: an
/// ALLOW for one caller's GETs lets exactly those through there, and changes nothing elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l7_policy_on_a_service_applies_to_it_alone() {
    let (mut mesh, client, _waypoint) = demo_mesh().await;
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.apply(
        "authz-latest",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: latest-readers\n  namespace: demo\nspec:\n  targetRefs:\n    - {group: \"\", kind: Service, name: hello-latest}\n  action: ALLOW\n  rules:\n    - from:\n        - source:\n            principals: [cluster.local/ns/demo/sa/client]\n      to:\n        - operation:\n            methods: [GET]\n",
    )
    .unwrap();
    mesh.wait_until("the policy", Duration::from_secs(20), || async {
        get(&intruder, LATEST, "/", &[]).await.status == 403
    })
    .await
    .unwrap();
    let to = |vip| SocketAddr::from((vip, 80));
    let status = async |from: &MeshPod, method: &str, vip| {
        http_exchange(&from.netns.ns, method, to(vip), "/", &[]).await.unwrap().status
    };
    // The service it targets: only the client's GETs.
    assert_eq!(status(&client, "GET", LATEST).await, 200);
    assert_eq!(status(&client, "POST", LATEST).await, 403);
    assert_eq!(status(&intruder, "GET", LATEST).await, 403);
    assert_eq!(status(&intruder, "POST", LATEST).await, 403);
    // Another service behind the same waypoint: untouched.
    assert_eq!(status(&intruder, "GET", NEW).await, 200);
    assert_eq!(status(&intruder, "POST", NEW).await, 200);
    assert_eq!(status(&client, "POST", NEW).await, 200);
}

/// SIGTERM: the waypoint stops being ready and taking new requests at once, lets the request in
/// flight finish, then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_drains_on_sigterm() {
    let (mut mesh, client, waypoint) = demo_mesh().await;
    let ready = async || {
        let at = SocketAddr::from((waypoint.ip, 15021));
        e2e::mesh::http_get(&waypoint.netns.ns, at, "/healthz/ready").await.map(|(status, _)| status).ok()
    };
    assert_eq!(ready().await, Some(200));
    let opened = async |mesh: &Mesh| {
        let m = mesh.metrics(1).await.unwrap();
        sum(
            &m,
            "istio_tcp_connections_opened_total{",
            &["reporter=\"source\"", "destination_service=\"hello.demo.svc.cluster.local\""],
        )
    };
    let before = opened(&mesh).await;
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move {
            http_exchange(&client.netns.ns, "GET", SocketAddr::from((HELLO, 80)), "/delay/1500", &[]).await
        })
    };
    mesh.wait_until("the request to reach the waypoint", Duration::from_secs(5), || async {
        opened(&mesh).await > before
    })
    .await
    .unwrap();

    let exiting = mesh.terminate_waypoint(&waypoint).unwrap();
    mesh.wait_until("the waypoint to report not ready", Duration::from_secs(2), || async {
        ready().await == Some(503)
    })
    .await
    .unwrap();
    let refused = http_exchange(&client.netns.ns, "GET", SocketAddr::from((HELLO, 80)), "/", &[]).await;
    assert!(refused.is_err(), "a new request was served while draining: {refused:?}");
    let a = in_flight.await.unwrap().unwrap();
    assert_eq!(a.status, 200, "the request in flight was cut: {a:?}");
    let took = exiting.exited().await.unwrap();
    assert!(took >= Duration::from_millis(1000), "exited after {took:?}, before its request was answered");
    let log = std::fs::read_to_string(mesh.state_dir().join("logs/waypoint-demo-waypoint.log")).unwrap();
    for line in ["draining", "drained", "waypoint stopped"] {
        assert!(log.contains(line), "no {line:?} in the log");
    }
}

/// The waypoint's and the CA's log filters change at run time through their admin endpoints'
/// `/logging` (ztunnel's: `resilience.rs`); a bad filter is refused with its reason and the one in
/// force kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_and_the_ca_change_their_log_filter_at_run_time() {
    let (mesh, client, waypoint) = demo_mesh().await;
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let logging = async |method: &str, query: &str| {
        e2e::mesh::http_request(&waypoint.netns.ns, method, admin, &format!("/logging{query}")).await.unwrap()
    };
    let log = || std::fs::read_to_string(mesh.state_dir().join("logs/waypoint-demo-waypoint.log")).unwrap();
    // One info line per request, written before the answer is sent.
    let access_lines = || log().matches("access: request").count();
    let request = async || http_exchange(&client.netns.ns, "GET", SocketAddr::from((HELLO, 80)), "/", &[]).await;

    assert_eq!(logging("GET", "").await, (200, "log filter: info\n".to_owned()));
    let before = access_lines();
    assert_eq!(request().await.unwrap().status, 200);
    assert_eq!(access_lines(), before + 1, "no access line at info");

    assert_eq!(logging("POST", "?level=warn").await, (200, "log filter: warn\n".to_owned()));
    assert_eq!(request().await.unwrap().status, 200);
    assert_eq!(access_lines(), before + 1, "an info line was logged at warn");
    let (status, reason) = logging("POST", "?level=waypoint=[bad").await;
    assert_eq!(status, 400, "{reason}");
    assert!(reason.starts_with("invalid log filter \"waypoint=[bad\": "), "{reason}");
    assert_eq!(logging("GET", "").await, (200, "log filter: warn\n".to_owned()), "a refused filter was applied");
    assert_eq!(logging("POST", "?level=info").await, (200, "log filter: info\n".to_owned()));
    assert_eq!(request().await.unwrap().status, 200);
    assert_eq!(access_lines(), before + 2);

    assert_eq!(mesh.ca_request("POST", "/logging?level=debug").await.unwrap(), (200, "log filter: debug\n".to_owned()));
    assert_eq!(mesh.ca_get("/logging").await.unwrap(), (200, "log filter: debug\n".to_owned()));
    let ca_log = std::fs::read_to_string(mesh.state_dir().join("logs/ca.log")).unwrap();
    assert!(ca_log.contains("log filter changed"), "the CA did not log the change");
    assert_eq!(mesh.ca_request("POST", "/logging?level=nope=[").await.unwrap().0, 400);
}
