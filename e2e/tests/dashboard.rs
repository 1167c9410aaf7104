//! `ambientctl dashboard` on a live one-machine mesh, looked at in a real headless browser.
//!
//! The mesh carries three kinds of traffic at once: the tutorial's (an outside client through the
//! ingress gateway `xingren-gateway` to service `hello`, split over `hello-latest` and
//! `hello-new`), HTTP from `shop/client` to service `server` through namespace `shop`'s waypoint
//! (one request in ten answered 503), and plain TCP from `shop/client` to `hello` (no waypoint:
//! ztunnel alone, mutual TLS). A real Prometheus scrapes every component.
//!
//! Two `ambientctl dashboard` processes read it: one from Prometheus, one straight from the
//! proxies' metrics endpoints (the mesh's Prometheus target files), both from inside the mesh's
//! network while serving the page on this machine's loopback. Both must draw the same graph —
//! exactly the expected nodes and edges, the waypoint and gateway on their paths, the errors, the
//! padlocks — and Chromium must show it: the page's table lists every edge, the graph holds every
//! node and edge, each service has its charts. The screenshot is the one the README shows
//! (`UPDATE_SCREENSHOT=1` writes it to `ca/ctl/dashboard/screenshot.png`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::apps::http_server;
use e2e::mesh::{Mesh, MeshOptions, PodSpec, http_exchange, http_exchange_as};
use serde_json::Value;

const APP_PORT: u16 = 8080;
const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);

/// The dashboards' rate window.
const WINDOW: Duration = Duration::from_secs(10);

const HELLO_SVC: &str = "service:hello.default.svc.cluster.local";
const GATEWAY: &str = "workload:istio-system/istio-ingressgateway";

/// The graph the traffic draws: (edge, protocol, mutual TLS).
const EXPECTED: [(&str, &str, Option<bool>); 9] = [
    ("service:hello.default.svc.cluster.local -> workload:default/hello-latest", "http", Some(true)),
    ("service:hello.default.svc.cluster.local -> workload:default/hello-new", "http", Some(true)),
    ("service:server.shop.svc.cluster.local -> workload:shop/server", "http", Some(true)),
    ("unknown -> workload:istio-system/istio-ingressgateway", "http", None),
    ("workload:istio-system/istio-ingressgateway -> service:hello.default.svc.cluster.local", "http", None),
    ("workload:shop/client -> workload:default/hello-latest", "tcp", Some(true)),
    ("workload:shop/client -> workload:default/hello-new", "tcp", Some(true)),
    ("workload:shop/client -> workload:shop/waypoint", "http", Some(true)),
    ("workload:shop/waypoint -> service:server.shop.svc.cluster.local", "http", Some(true)),
];

/// A running `ambientctl dashboard`, stopped on drop.
struct Dashboard {
    child: Child,
    url: String,
    addr: SocketAddr,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dashboard {
    fn start(mesh: &Mesh, figures: &[&str]) -> Dashboard {
        let mut child = Command::new(e2e::mesh::binary("ambientctl").unwrap())
            .args(["dashboard", "--listen", "127.0.0.1:0", "--interval", "1s"])
            .args(["--window", &format!("{}s", WINDOW.as_secs())])
            .args(["--netns", &mesh.underlay.name])
            .args(figures)
            .env("AMBIENT_MESH_REGISTRY", "/nonexistent")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // `Dashboard: http://127.0.0.1:PORT  (figures from …; Ctrl-C stops it)`
        let url =
            line.strip_prefix("Dashboard: ").unwrap_or_else(|| panic!("{line:?}")).split_whitespace().next().unwrap();
        assert!(line.contains("from network namespace"), "{line}");
        let addr = url.strip_prefix("http://").unwrap().parse().unwrap();
        Dashboard { child, url: format!("{url}/"), addr }
    }

    async fn get(&self, path: &str) -> Value {
        let here = ztunnel::netns::NetNs::current().unwrap();
        let answer = http_exchange(&here, "GET", self.addr, path, &[]).await.unwrap();
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        serde_json::from_str(&answer.data().unwrap()).unwrap()
    }

    /// The graph once it has every expected edge with traffic on it (and nothing else), and a
    /// whole window of traffic has passed since.
    async fn graph(&self, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let graph = self.get("/api/graph").await;
            if edge_ids(&graph) == EXPECTED.map(|e| e.0) {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: the graph never became the expected one: {graph:#}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(WINDOW + Duration::from_secs(2)).await;
        let graph = self.get("/api/graph").await;
        assert_eq!(edge_ids(&graph), EXPECTED.map(|e| e.0), "{what}: {graph:#}");
        graph
    }
}

fn edge_ids(graph: &Value) -> Vec<&str> {
    graph["edges"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect()
}

fn edge<'a>(graph: &'a Value, id: &str) -> &'a Value {
    graph["edges"].as_array().unwrap().iter().find(|e| e["id"] == id).unwrap()
}

fn nodes(graph: &Value) -> BTreeMap<String, String> {
    graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_owned(), n["kind"].as_str().unwrap().to_owned()))
        .collect()
}

/// Sends requests in a loop until `stop`.
fn keep_sending<F, Fut>(stop: &Arc<AtomicBool>, send: F)
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            send(n).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_live_mesh_in_a_real_browser() {
    assert!(e2e::browser::binary().is_some(), "no chromium: install Debian's chromium (.ci/run does) or set CHROMIUM");
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    // The tutorial: hello-latest and hello-new behind the ingress gateway.
    let gateway_pod = e2e::tutorial::deploy(&mut mesh, HELLO, APP_PORT).await.unwrap().gateway;
    let gateway = SocketAddr::from((gateway_pod.ip, 80));
    let outside = mesh.outside_client(1).unwrap();
    // Namespace shop: client → server through the namespace's waypoint.
    mesh.namespace("shop", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "shop", 1).label("app", "client")).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "shop", 2).label("app", "server")).await.unwrap();
    http_server(server.listen(APP_PORT).unwrap(), "server");
    mesh.service("server", "shop", SERVER, 80, "server", APP_PORT).unwrap();
    mesh.waypoint("shop", "waypoint", 1, WAYPOINT).await.unwrap();
    mesh.use_waypoint("shop", Some("waypoint")).unwrap();
    let to_server = SocketAddr::from((SERVER, 80));
    let to_hello = SocketAddr::from((HELLO, 80));
    mesh.wait_until("every path to answer", Duration::from_secs(30), || async {
        let gw = http_exchange_as(&outside.ns, "xingren.upup", gateway, "/", &[]).await;
        let shop = http_exchange(&client.netns.ns, "GET", to_server, "/", &[]).await;
        let l4 = http_exchange(&client.netns.ns, "GET", to_hello, "/", &[]).await;
        [gw, shop, l4].iter().all(|a| a.as_ref().is_ok_and(|a| a.status == 200))
    })
    .await
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ns = outside.ns.clone();
    keep_sending(&stop, move |_| {
        let ns = ns.clone();
        async move {
            let _ = http_exchange_as(&ns, "xingren.upup", gateway, "/", &[]).await;
        }
    });
    let ns = client.netns.ns.clone();
    keep_sending(&stop, move |n| {
        let ns = ns.clone();
        async move {
            let path = if n % 10 == 9 { "/status/503" } else { "/" };
            let _ = http_exchange(&ns, "GET", to_server, path, &[]).await;
        }
    });
    let ns = client.netns.ns.clone();
    keep_sending(&stop, move |_| {
        let ns = ns.clone();
        async move {
            let _ = http_exchange(&ns, "GET", to_hello, "/", &[]).await;
        }
    });

    mesh.start_prometheus().unwrap();
    mesh.prometheus().unwrap().all_up(5, Duration::from_secs(30)).await.unwrap();
    let prometheus_url = format!("http://{}", e2e::prometheus::LISTEN);
    let targets = mesh.scrape_targets().dir().join("targets");
    let from_prometheus = Dashboard::start(&mesh, &["--prometheus", &prometheus_url]);
    let from_proxies = Dashboard::start(&mesh, &["--targets", targets.to_str().unwrap()]);

    let (a, b) = tokio::join!(from_prometheus.graph("from Prometheus"), from_proxies.graph("from the proxies"));
    for (graph, what) in [(a, "from Prometheus"), (b, "from the proxies")] {
        assert!(graph["problems"].as_array().unwrap().is_empty(), "{what}: {graph:#}");
        let kinds = nodes(&graph);
        assert_eq!(
            kinds.iter().map(|(id, kind)| format!("{kind} {id}")).collect::<Vec<_>>(),
            [
                "service service:hello.default.svc.cluster.local",
                "service service:server.shop.svc.cluster.local",
                "unknown unknown",
                "workload workload:default/hello-latest",
                "workload workload:default/hello-new",
                "gateway workload:istio-system/istio-ingressgateway",
                "workload workload:shop/client",
                "workload workload:shop/server",
                "waypoint workload:shop/waypoint",
            ],
            "{what}"
        );
        for (id, protocol, mtls) in EXPECTED {
            let e = edge(&graph, id);
            assert_eq!(e["protocol"], protocol, "{what}: {e}");
            assert_eq!(e["mtls"].as_bool(), mtls, "{what}: {e}");
            if protocol == "http" {
                assert!(e["rps"].as_f64().unwrap() > 1.0, "{what}: {e}");
                assert!(e["p50_ms"].as_f64().is_some() && e["p99_ms"].as_f64().is_some(), "{what}: {e}");
            } else {
                assert!(e["cps"].as_f64().unwrap() > 1.0 && e["bytes_per_s"].as_f64().unwrap() > 100.0, "{what}: {e}");
            }
        }
        // One request in ten to server is answered 503: on every hop of its path, and nowhere else.
        for id in [
            "workload:shop/client -> workload:shop/waypoint",
            "workload:shop/waypoint -> service:server.shop.svc.cluster.local",
            "service:server.shop.svc.cluster.local -> workload:shop/server",
        ] {
            let errors = edge(&graph, id)["error_rate"].as_f64().unwrap();
            assert!((0.05..=0.15).contains(&errors), "{what}: {id}: error rate {errors}");
        }
        let to_gateway = edge(&graph, &format!("unknown -> {GATEWAY}"));
        assert_eq!(to_gateway["error_rate"].as_f64(), Some(0.0), "{what}: {to_gateway}");
        let hello = &graph["services"]["hello.default.svc.cluster.local"];
        assert!(hello["rps"].as_f64().unwrap() > 1.0 && hello["error_rate"] == 0.0, "{what}: {hello}");
        assert!(graph["services"]["server.shop.svc.cluster.local"]["error_rate"].as_f64().unwrap() > 0.05, "{what}");
        assert_eq!(edge(&graph, &format!("{GATEWAY} -> {HELLO_SVC}"))["rps"], to_gateway["rps"], "{what}");
    }

    // A page elsewhere that points its own name at the dashboard (DNS rebinding) is refused.
    let here = ztunnel::netns::NetNs::current().unwrap();
    let rebound = http_exchange_as(&here, "evil.example", from_prometheus.addr, "/api/graph", &[]).await.unwrap();
    assert_eq!(rebound.status, 421, "{rebound:?}");

    // The page, in Chromium: live, every node and edge drawn, every edge in the table, the
    // services charted.
    let dom = e2e::browser::dom(&from_prometheus.url).await.unwrap();
    assert_eq!(e2e::browser::attribute(&dom, "data-state"), Some("live"), "{dom}");
    assert_eq!(e2e::browser::attribute(&dom, "data-nodes"), Some("9"), "{dom}");
    assert_eq!(e2e::browser::attribute(&dom, "data-edges"), Some("9"), "{dom}");
    let mut rows = e2e::browser::attributes(&dom, "data-edge");
    rows.sort_unstable();
    assert_eq!(rows, EXPECTED.map(|e| e.0), "{dom}");
    assert_eq!(
        e2e::browser::attributes(&dom, "data-service"),
        ["hello.default.svc.cluster.local", "server.shop.svc.cluster.local"],
        "{dom}"
    );
    assert!(dom.contains("🔒 mTLS"), "padlocks in the table: {dom}");
    assert_eq!(dom.matches("class=\"uplot").count(), 4, "two charts per service: {dom}");

    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("dashboard.png");
    e2e::browser::screenshot(&from_prometheus.url, &png, 1400, 1700).await.unwrap();
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(size > 50_000, "a screenshot of a drawn page, not a blank one: {size} bytes");
    if std::env::var_os("UPDATE_SCREENSHOT").is_some() {
        let dest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ca/ctl/dashboard/screenshot.png");
        std::fs::copy(&png, dest).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
}
