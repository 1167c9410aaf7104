//! The ingress gateway in the one-machine mesh: real `ca`, `ztunnel` and `waypoint --ingress`
//! processes, and a client outside the mesh and outside the nodes.
//!
//! The tutorial's three objects are applied exactly as the tutorial writes them (Gateway
//! `xingren-gateway`, VirtualService `hello-virtualservice` bound to it, DestinationRule
//! `hello-destinationrule`, in namespace `default`, the same file the CA's golden test reads),
//! with service `hello` and pods labelled `version: latest|new`. The outside client sends
//! `Host: xingren.upup` to the gateway's address, as `wget http://xingren.upup` does once the name
//! resolves to the gateway, and sees: the 70/30 split; `version: new` always on the new pods,
//! about 10 % delayed 10 s and cut at 5 s (504); the one-connection circuit breaker's overflow
//! (503, `UO`); a host no server serves answered 404. The pods' ztunnel sees the gateway's own
//! identity on each tunnel.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use e2e::apps::{http_server, https_app, tls_secret};
use e2e::mesh::{Mesh, MeshOptions, PodSpec, http_exchange_as, metric_sum as sum};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use ztunnel::netns::NetNs;

const APP_PORT: u16 = 8080;
const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const GATEWAY_SA: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_verbatim_through_the_ingress_gateway() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    let gateway_pod = e2e::tutorial::deploy(&mut mesh, HELLO, APP_PORT).await.unwrap().gateway;
    let gateway = SocketAddr::from((gateway_pod.ip, 80));
    let outside = mesh.outside_client(1).unwrap();

    mesh.wait_until("the gateway to route xingren.upup", Duration::from_secs(30), || async {
        let mut ok = true;
        for _ in 0..10 {
            ok &= http_exchange_as(&outside.ns, "xingren.upup", gateway, "/", &[]).await.is_ok_and(|a| a.status == 200);
        }
        ok
    })
    .await
    .unwrap();

    // A real Prometheus scrapes every component of the mesh: the CA, both ztunnels, the gateway.
    mesh.start_prometheus().unwrap();
    let up = mesh.prometheus().unwrap().all_up(4, Duration::from_secs(30)).await.unwrap();
    let mut scraped: Vec<String> = up.iter().map(|t| format!("{} {}", t.label("component"), t.label("pod"))).collect();
    scraped.sort();
    assert_eq!(
        scraped,
        ["ca ca", "ingress-gateway istio-ingressgateway", "ztunnel ztunnel-node-1", "ztunnel ztunnel-node-2"],
        "{up:?}"
    );
    let split = split_seen_by_prometheus(&mesh, &gateway_pod).await;

    // The tutorial's loop, run as written (`wget -q -O - http://xingren.upup`, the name pointed at
    // the gateway in the client's /etc/hosts): ~70 % latest, ~30 % new, within ±5 %: 500..=700 of
    // 2,000. Binomial(2000, 0.3) has sd 20.5, so the bound is 4.9 sd (over 600 requests it would
    // be 2.7 sd, a failure in ~140 runs).
    e2e::tutorial::point_host_at(&outside, gateway_pod.ip).unwrap();
    let mut new = 0;
    for _ in 0..2000 {
        match e2e::tutorial::wget(&outside).await.unwrap().trim() {
            "hello-new" => new += 1,
            "hello-latest" => {}
            other => panic!("answered by {other:?}"),
        }
    }
    assert!((500..=700).contains(&new), "subset new got {new} of 2000 (want 600 ± 100)");

    // Prometheus saw exactly that split: the PromQL sum per destination workload grew by what the
    // loop's answers counted, once a scrape after the loop has landed.
    let after = split_seen_by_prometheus(&mesh, &gateway_pod).await;
    let grew = |w: &str| after.get(w).copied().unwrap_or(0.0) - split.get(w).copied().unwrap_or(0.0);
    assert_eq!(
        (grew("hello-latest"), grew("hello-new")),
        (f64::from(2000 - new), f64::from(new)),
        "{split:?} {after:?}"
    );

    // `version: new`: always the new pods; ~10 % delayed 10 s and cut at 5 s (504). Two lanes,
    // within the pool (one connection, one waiting).
    let ns = outside.ns.clone();
    let header = e2e::tutorial::header_route(2, 40, move || {
        let ns = ns.clone();
        async move { http_exchange_as(&ns, "xingren.upup", gateway, "/", &[("version", "new")]).await }
    })
    .await
    .unwrap();
    assert!(header.unexpected.is_empty(), "{:?}", header.unexpected);
    let timeouts = header.timed_out;
    // Binomial(80, 0.1): outside 1..=20 with probability < 0.001.
    assert!((1..=20).contains(&timeouts), "{timeouts} of 80 delayed past the timeout (want ~8)");

    // Beyond the pool (1 connection + 1 waiting), concurrent requests get 503 (overflow).
    let ns = outside.ns.clone();
    let statuses = e2e::tutorial::burst(30, move || {
        let ns = ns.clone();
        async move { http_exchange_as(&ns, "xingren.upup", gateway, "/delay/300", &[]).await }
    })
    .await
    .unwrap();
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(overflow + ok, 30, "{statuses:?}");
    assert!(ok >= 2 && overflow >= 20, "{ok} served, {overflow} overflowed: {statuses:?}");

    // A host no server of the Gateway serves: 404, no route.
    let other = http_exchange_as(&outside.ns, "elsewhere.upup", gateway, "/", &[]).await.unwrap();
    assert_eq!(other.status, 404, "{other:?}");

    // The gateway counts what it did, as Istio's gateways report (reporter="source").
    let m = mesh.waypoint_metrics(&gateway_pod).await.unwrap();
    let by = |needles: &[&str]| sum(&m, "istio_requests_total{", needles);
    assert_eq!(by(&["reporter=\"source\"", "response_code=\"503\"", "response_flags=\"UO\""]), overflow as f64);
    assert_eq!(by(&["response_code=\"504\"", "response_flags=\"UT\""]), timeouts as f64);
    assert_eq!(by(&["response_code=\"404\"", "response_flags=\"NR\""]), 1.0);
    assert!(
        by(&["response_code=\"200\"", "destination_workload=\"hello-new\"", "destination_service_name=\"hello\""])
            >= f64::from(new),
        "{m}"
    );

    // Each pod's ztunnel saw the gateway's own identity (from its certificate) on the tunnels.
    for node in [1, 2] {
        let m = mesh.metrics(node).await.unwrap();
        let from_gateway = sum(
            &m,
            "istio_tcp_connections_opened_total{",
            &["reporter=\"destination\"", &format!("source_principal=\"{GATEWAY_SA}\"")],
        );
        assert!(from_gateway >= 1.0, "node {node}'s ztunnel saw no tunnel from the gateway:\n{m}");
    }

    // The Grafana dashboards of deploy/grafana against the same Prometheus, with the tutorial's
    // service and workload chosen: every panel's query is valid PromQL and has data, but the one
    // panel the tutorial gives nothing to (hello-new opens no connection of its own).
    let empty = dashboard_panels_without_data(&mesh).await;
    assert_eq!(empty, ["Ambient workload / Outbound connections by destination"]);
}

/// Runs every variable and panel query of the dashboards on the mesh's Prometheus: the variables
/// must offer the tutorial's values, every query must be accepted; the panels without data.
async fn dashboard_panels_without_data(mesh: &Mesh) -> Vec<String> {
    use e2e::dashboards::{all, label_values_promql, substitute};
    let prometheus = mesh.prometheus().unwrap();
    let values = [("service", "hello.default.svc.cluster.local"), ("namespace", "default"), ("workload", "hello-new")];
    let mut empty = Vec::new();
    for board in all().unwrap() {
        for v in &board.variables {
            let (promql, label) = label_values_promql(&substitute(&v.query, &values, "1m")).unwrap();
            let offered: Vec<String> = prometheus
                .query(&promql)
                .await
                .unwrap_or_else(|e| panic!("{} variable {}: {e:#}", board.title, v.name))
                .into_iter()
                .filter_map(|s| s.labels.get(&label).cloned())
                .collect();
            let wanted = values.iter().find(|(n, _)| *n == v.name).map(|(_, value)| *value).unwrap();
            assert!(offered.iter().any(|o| o == wanted), "{} variable {} offers {offered:?}", board.title, v.name);
        }
        for q in &board.queries {
            let promql = substitute(&q.expr, &values, "1m");
            let samples = prometheus
                .query(&promql)
                .await
                .unwrap_or_else(|e| panic!("{} / {}: {promql}: {e:#}", q.dashboard, q.panel));
            if samples.is_empty() {
                empty.push(format!("{} / {}", q.dashboard, q.panel));
            }
        }
    }
    empty
}

/// The PromQL query of the tutorial's split (`istio_requests_total` per destination workload, as
/// the gateway reports it), answered by the mesh's Prometheus once it has scraped the gateway's
/// current counters (compared with the gateway's own `/metrics` at the time of asking).
async fn split_seen_by_prometheus(mesh: &Mesh, gateway: &e2e::mesh::MeshPod) -> BTreeMap<String, f64> {
    let m = mesh.waypoint_metrics(gateway).await.unwrap();
    let own: BTreeMap<String, f64> = ["hello-latest", "hello-new"]
        .into_iter()
        .map(|w| {
            let needles = [
                "response_code=\"200\"",
                "destination_service_name=\"hello\"",
                &format!("destination_workload=\"{w}\""),
            ];
            (w.to_owned(), sum(&m, "istio_requests_total{", &needles))
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    let prometheus = mesh.prometheus().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen: BTreeMap<String, f64> = prometheus
            .query(e2e::tutorial::SPLIT_PROMQL)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.labels.get("destination_workload").cloned().unwrap_or_default(), s.value))
            .collect();
        if seen == own {
            return seen;
        }
        assert!(std::time::Instant::now() < deadline, "Prometheus answers {seen:?}, the gateway counts {own:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A destination with a waypoint is reached through it: the waypoint sees the gateway's identity
/// and its policy decides (a DENY for the gateway on `/admin` answers 403; the rest passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_with_a_waypoint_is_reached_through_it_as_the_gateway() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("shop", true).await.unwrap();
    let web = mesh.pod(PodSpec::new("web", "shop", 2).label("app", "web")).await.unwrap();
    http_server(web.listen(APP_PORT).unwrap(), "web");
    mesh.service("web", "shop", Ipv4Addr::new(10, 96, 3, 10), 80, "web", APP_PORT).unwrap();
    let waypoint = mesh.waypoint("shop", "waypoint", 1, Ipv4Addr::new(10, 96, 3, 2)).await.unwrap();
    mesh.use_waypoint("shop", Some("waypoint")).unwrap();
    mesh.apply(
        "shop-gateway",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: shop, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*.shop.example\"]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\nspec:\n  hosts: [www.shop.example]\n  gateways: [shop]\n  http:\n  - route: [{destination: {host: web}}]\n",
    )
    .unwrap();
    mesh.apply(
        "shop-deny-admin",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin-from-edge, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  action: DENY\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n    to: [{{operation: {{paths: [\"/admin*\"]}}}}]\n",
            GATEWAY_SA.trim_start_matches("spiffe://")
        ),
    )
    .unwrap();
    let gateway_pod =
        mesh.ingress_gateway("istio-system", "istio-ingressgateway", 1, &[("istio", "ingressgateway")]).await.unwrap();
    let gateway = SocketAddr::from((gateway_pod.ip, 80));
    let outside = mesh.outside_client(1).unwrap();
    let get = |path: &'static str| {
        let ns = outside.ns.clone();
        async move { http_exchange_as(&ns, "www.shop.example", gateway, path, &[]).await }
    };
    mesh.wait_until("the gateway, the waypoint and its policy", Duration::from_secs(30), || async {
        get("/public").await.is_ok_and(|a| a.status == 200) && get("/admin").await.is_ok_and(|a| a.status == 403)
    })
    .await
    .unwrap();
    for _ in 0..5 {
        let a = get("/public").await.unwrap();
        assert_eq!((a.status, a.body.trim()), (200, "web"), "{a:?}");
        let a = get("/admin/users").await.unwrap();
        assert_eq!((a.status, a.body.trim()), (403, "RBAC: access denied"), "{a:?}");
    }
    // The waypoint saw the gateway as the caller, from its certificate.
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let from_gateway = |code: &str| {
        sum(
            &m,
            "istio_requests_total{",
            &[
                &format!("source_principal=\"{GATEWAY_SA}\""),
                &format!("response_code=\"{code}\""),
                "reporter=\"waypoint\"",
            ],
        )
    };
    assert!(from_gateway("200") >= 5.0 && from_gateway("403") >= 5.0, "{m}");
}

/// One HTTPS request to the gateway from `outside`, naming `sni` in the handshake and `host` in `Host`, trusting
/// `roots`, presenting `client` if given. Returns the status and body, or the handshake/read
/// error, with the certificate the gateway presented.
async fn https_get(
    outside: &NetNs,
    gateway: SocketAddr,
    (sni, host): (&str, &str),
    roots: &proto::testing::TestCa,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<(u16, String, CertificateDer<'static>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let mut store = rustls::RootCertStore::empty();
    store.add(roots.root().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    let config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = outside.tcp_socket(false).unwrap().connect(gateway).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .map_err(|_| "read timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("malformed answer {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    Ok((status, body.trim().to_owned(), presented))
}

/// HTTPS at the gateway with certificates from Secrets: SNI picks among two servers on port 443
/// (each presents its own certificate) and a PASSTHROUGH one (the app's own certificate), MUTUAL refuses a client without a certificate (or with one
/// from another CA) and serves one with a certificate its `ca.crt` verifies, an unknown name gets
/// no handshake, and the plain server's `httpsRedirect` answers 301.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_servers_terminate_tls_with_secrets_picked_by_sni() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("shop", true).await.unwrap();
    let web = mesh.pod(PodSpec::new("web", "shop", 2).label("app", "web")).await.unwrap();
    http_server(web.listen(APP_PORT).unwrap(), "web");
    mesh.service("web", "shop", Ipv4Addr::new(10, 96, 3, 10), 80, "web", APP_PORT).unwrap();

    let server_ca = proto::testing::TestCa::new();
    let client_ca = proto::testing::TestCa::new();
    // An app that terminates its own TLS, behind a PASSTHROUGH server on the same port.
    let vault = mesh.pod(PodSpec::new("vault", "shop", 2).label("app", "vault")).await.unwrap();
    let (vault_chain, vault_key) = server_ca.issue_server(&["vault.shop.example"]);
    let _vault = https_app(vault.listen(8443).unwrap(), vault_chain.clone(), vault_key, "vault").unwrap();
    mesh.service("vault", "shop", Ipv4Addr::new(10, 96, 3, 11), 443, "vault", 8443).unwrap();
    mesh.apply(
        "vault-route",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vault, namespace: shop}\nspec:\n  hosts: [vault.shop.example]\n  gateways: [shop]\n  tls:\n  - match: [{port: 443, sniHosts: [vault.shop.example]}]\n    route: [{destination: {host: vault, port: {number: 443}}}]\n",
    )
    .unwrap();
    let (www_chain, www_key) = server_ca.issue_server(&["www.shop.example"]);
    let (api_chain, api_key) = server_ca.issue_server(&["api.shop.example"]);
    mesh.apply("secret-www", &tls_secret("istio-system", "www-cert", &www_chain, &www_key, None)).unwrap();
    mesh.apply("secret-api", &tls_secret("istio-system", "api-cert", &api_chain, &api_key, Some(client_ca.root_pem())))
        .unwrap();
    mesh.apply(
        "shop-gateway",
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: shop, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n  - port: {number: 443, name: https-www, protocol: HTTPS}\n    hosts: [www.shop.example]\n    tls: {mode: SIMPLE, credentialName: www-cert}\n  - port: {number: 443, name: https-api, protocol: HTTPS}\n    hosts: [api.shop.example]\n    tls: {mode: MUTUAL, credentialName: api-cert}\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [www.shop.example]\n    tls: {httpsRedirect: true}\n  - port: {number: 443, name: tls-vault, protocol: TLS}\n    hosts: [vault.shop.example]\n    tls: {mode: PASSTHROUGH}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: shop}\nspec:\n  hosts: [www.shop.example, api.shop.example]\n  gateways: [shop]\n  http:\n  - route: [{destination: {host: web}}]\n",
    )
    .unwrap();
    let gateway_pod =
        mesh.ingress_gateway("istio-system", "istio-ingressgateway", 1, &[("istio", "ingressgateway")]).await.unwrap();
    let https = SocketAddr::from((gateway_pod.ip, 443));
    let outside = mesh.outside_client(1).unwrap();
    mesh.wait_until("the gateway to serve HTTPS", Duration::from_secs(30), || async {
        https_get(&outside.ns, https, ("www.shop.example", "www.shop.example"), &server_ca, None)
            .await
            .is_ok_and(|(s, _, _)| s == 200)
    })
    .await
    .unwrap();

    // SNI picks the server; each presents its own certificate.
    let (status, body, presented) =
        https_get(&outside.ns, https, ("www.shop.example", "www.shop.example"), &server_ca, None).await.unwrap();
    assert_eq!((status, body.as_str(), &presented), (200, "web", &www_chain[0]));
    let client_cert = client_ca.issue_raw(&["spiffe://partner.example/client"], proto::testing::Validity::Current);
    let (status, body, presented) =
        https_get(&outside.ns, https, ("api.shop.example", "api.shop.example"), &server_ca, Some(client_cert))
            .await
            .unwrap();
    assert_eq!((status, body.as_str(), &presented), (200, "web", &api_chain[0]));

    // MUTUAL: no client certificate, or one its CA did not sign: no answer.
    let without = https_get(&outside.ns, https, ("api.shop.example", "api.shop.example"), &server_ca, None).await;
    assert!(without.is_err(), "served without a client certificate: {without:?}");
    let stranger = server_ca.issue_raw(&["spiffe://elsewhere.example/client"], proto::testing::Validity::Current);
    let foreign =
        https_get(&outside.ns, https, ("api.shop.example", "api.shop.example"), &server_ca, Some(stranger)).await;
    assert!(foreign.is_err(), "served a client certificate from another CA: {foreign:?}");

    // A connection whose handshake chose www cannot ask for api (whose server requires a client
    // certificate): 421.
    let fronted = https_get(&outside.ns, https, ("www.shop.example", "api.shop.example"), &server_ca, None).await;
    assert_eq!(fronted.map(|(s, b, _)| (s, b)), Ok((421, "misdirected request".to_owned())));

    // PASSTHROUGH by SNI on the same port: the app's own certificate (the gateway never opens the
    // stream), the stream carried into the mesh over HBONE and counted by the gateway.
    let (status, body, presented) =
        https_get(&outside.ns, https, ("vault.shop.example", "vault.shop.example"), &server_ca, None).await.unwrap();
    assert_eq!((status, body.as_str(), &presented), (200, "vault", &vault_chain[0]));
    let m = mesh.waypoint_metrics(&gateway_pod).await.unwrap();
    let passed = sum(
        &m,
        "istio_tcp_connections_opened_total{",
        &["reporter=\"source\"", "destination_service=\"vault.shop.svc.cluster.local\"", "response_flags=\"-\""],
    );
    assert_eq!(passed, 1.0, "{m}");

    // A name no server serves: no handshake.
    let unknown = https_get(&outside.ns, https, ("other.shop.example", "other.shop.example"), &server_ca, None).await;
    assert!(unknown.is_err(), "{unknown:?}");

    // Plain HTTP for www: redirected.
    let redirect =
        http_exchange_as(&outside.ns, "www.shop.example", SocketAddr::from((gateway_pod.ip, 80)), "/a?b=c", &[])
            .await
            .unwrap();
    assert_eq!((redirect.status, redirect.header("location")), (301, Some("https://www.shop.example/a?b=c")));

    let log = mesh.log_tails(200);
    assert!(log.contains("TLS handshake refused") && log.contains("no HTTPS server on port 443"), "{log}");
}

/// A Gateway API Gateway of class `istio` and an HTTPRoute that names it: the pod labelled with
/// the Gateway's name serves its listener, routes the route's hostname and paths, and answers 404
/// for what the route does not match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_api_gateway_of_class_istio_serves_its_httproutes() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("shop", true).await.unwrap();
    let web = mesh.pod(PodSpec::new("web", "shop", 2).label("app", "web")).await.unwrap();
    http_server(web.listen(APP_PORT).unwrap(), "web");
    mesh.service("web", "shop", Ipv4Addr::new(10, 96, 3, 10), 80, "web", APP_PORT).unwrap();
    mesh.apply(
        "edge-gateway",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {name: http, port: 8080, protocol: HTTP, hostname: \"*.shop.example\"}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [www.shop.example]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: web, port: 80}]\n",
    )
    .unwrap();
    let pod = mesh
        .ingress_gateway("shop", "edge-istio", 1, &[("gateway.networking.k8s.io/gateway-name", "edge")])
        .await
        .unwrap();
    let gateway = SocketAddr::from((pod.ip, 8080));
    let outside = mesh.outside_client(1).unwrap();
    mesh.wait_until("the Gateway API gateway to route", Duration::from_secs(30), || async {
        http_exchange_as(&outside.ns, "www.shop.example", gateway, "/api/items", &[])
            .await
            .is_ok_and(|a| a.status == 200)
    })
    .await
    .unwrap();
    let a = http_exchange_as(&outside.ns, "www.shop.example", gateway, "/api/items", &[]).await.unwrap();
    assert_eq!((a.status, a.body.trim()), (200, "web"));
    let unmatched = http_exchange_as(&outside.ns, "www.shop.example", gateway, "/elsewhere", &[]).await.unwrap();
    assert_eq!((unmatched.status, unmatched.body.trim()), (404, "no route matched"));
    let other_host = http_exchange_as(&outside.ns, "api.shop.example", gateway, "/api", &[]).await.unwrap();
    assert_eq!(other_host.status, 404, "a host the route does not name: {other_host:?}");
}
