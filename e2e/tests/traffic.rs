//! Traffic through the one-machine mesh: real namespaces, capture rules, `ca` and `ztunnel`
//! processes.
//!
//! - same-node and cross-node pod → pod, and the app sees the client's real IP;
//! - on the underlay only TLS is seen (a payload marker sent between enrolled pods never appears,
//!   while the same marker sent in plaintext by pods outside the mesh does: the capture works);
//! - a client outside the mesh reaches an enrolled server in plaintext (PERMISSIVE) and is refused
//!   once a STRICT PeerAuthentication applies; an enrolled client reaches a server outside the mesh
//!   (passthrough);
//! - a service VIP with three endpoints spreads connections over all three;
//! - behind a control plane serving only what istiod serves (`ca --xds-types istio`: Address and
//!   Authorization, no trust-bundle type), ztunnel still syncs, takes its roots from the
//!   certificate answers, carries traffic over mTLS and enforces policy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, PodSpec, metric_sum as sum};
use e2e::sniff::{Sniffer, contains};

const PORT: u16 = 8080;

/// Connections a destination ztunnel reported from `demo/client` over mutual TLS.
fn mtls_from_client(metrics: &str) -> f64 {
    sum(
        metrics,
        "istio_tcp_connections_opened_total{",
        &[
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"",
            "connection_security_policy=\"mutual_tls\"",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_talk_through_the_mesh_and_only_tls_crosses_nodes() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let near = mesh.pod(PodSpec::new("near", "demo", 1)).await.unwrap();
    let far = mesh.pod(PodSpec::new("far", "demo", 2)).await.unwrap();
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await.unwrap();
    let plain_far = mesh.pod(PodSpec::new("plain-far", "legacy", 2)).await.unwrap();
    let _apps: Vec<_> =
        [&near, &far, &plain_far].iter().map(|p| echo_server(p.listen(PORT).unwrap(), &p.name)).collect();
    mesh.settle(&[], &[]).await.unwrap();

    // Same node and across nodes: the app sees the client pod's own IP.
    for server in [&near, &far] {
        let mut c = EchoClient::greet(client.connect(server.addr(PORT)).await.unwrap()).await.unwrap();
        assert_eq!(c.seen_as.ip(), client.ip, "{} saw the wrong client address", server.name);
        c.round_trip(b"hello through the mesh").await.unwrap();
    }
    // Both ztunnels reported it, with Istio's names: node-1 as source (twice), node-2 as destination.
    let m1 = mesh.metrics(1).await.unwrap();
    let m2 = mesh.metrics(2).await.unwrap();
    assert!(
        sum(&m1, "istio_tcp_connections_opened_total{", &["reporter=\"source\"", "destination_workload=\"far\""])
            >= 1.0,
        "{m1}"
    );
    assert!(mtls_from_client(&m2) >= 1.0, "{m2}");

    // On the underlay: an enrolled pair sends a marker that must never be seen; a pair outside
    // the mesh sends another that must be seen (proof the capture sees payloads).
    let sniffer = Sniffer::start(&mesh.underlay.ns).unwrap();
    let secret = b"MESH-SECRET-7f3a9c1e-never-in-the-clear";
    let open = b"PLAIN-MARKER-51d0b2aa-visible-in-the-clear";
    let mut c = EchoClient::greet(client.connect(far.addr(PORT)).await.unwrap()).await.unwrap();
    c.round_trip(secret).await.unwrap();
    let mut p = EchoClient::greet(outsider.connect(plain_far.addr(PORT)).await.unwrap()).await.unwrap();
    p.round_trip(open).await.unwrap();
    let seen = sniffer.finish().unwrap();
    assert!(contains(&seen, open), "the capture did not see plaintext traffic ({} bytes captured)", seen.len());
    assert!(!contains(&seen, secret), "mesh payload crossed the underlay in the clear");

    // An enrolled client reaches a server outside the mesh: passthrough, plain TCP.
    let mut c = EchoClient::greet(client.connect(plain_far.addr(PORT)).await.unwrap()).await.unwrap();
    assert_eq!(c.seen_as.ip(), client.ip);
    c.round_trip(b"passthrough").await.unwrap();

    // A client outside the mesh reaches an enrolled server in plaintext (PERMISSIVE by default)...
    let mut c = EchoClient::greet(outsider.connect(far.addr(PORT)).await.unwrap()).await.unwrap();
    assert_eq!(c.seen_as.ip(), outsider.ip);
    c.round_trip(b"plaintext inbound").await.unwrap();
    // ...and is refused under STRICT, while mesh traffic still flows.
    mesh.apply(
        "strict",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: demo\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    mesh.settle(&["demo/converted_peer_authentication_strict"], &[]).await.unwrap();
    let refused = match outsider.connect(far.addr(PORT)).await {
        Err(_) => true,
        Ok(stream) => EchoClient::greet(stream).await.is_err(),
    };
    assert!(refused, "STRICT let a plaintext client through");
    let mut c = EchoClient::greet(client.connect(far.addr(PORT)).await.unwrap()).await.unwrap();
    c.round_trip(b"still fine over mTLS").await.unwrap();
    let m2 = mesh.metrics(2).await.unwrap();
    assert!(
        sum(
            &m2,
            "istio_tcp_connections_closed_total{",
            &["reporter=\"destination\"", "response_flags=\"DENY\"", "source_principal=\"unknown\""]
        ) >= 1.0,
        "{m2}"
    );

    // Each ztunnel named its cluster to the CA as Istio's ztunnel does (`clusterid`).
    let ca_log = std::fs::read_to_string(mesh.state_dir().join("logs/ca.log")).unwrap();
    let named = ca_log
        .lines()
        .filter(|l| l.contains("xDS client connected") && l.contains(&format!("cluster={}", e2e::mesh::E2E_CLUSTER_ID)))
        .count();
    assert!(named >= 2, "{named} xDS clients named the cluster:\n{ca_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_spreads_connections_over_its_endpoints() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let mut backends = Vec::new();
    for (i, node) in [(1, 1), (2, 2), (3, 2)] {
        let pod = mesh.pod(PodSpec::new(&format!("web-{i}"), "demo", node).label("app", "web")).await.unwrap();
        backends.push((echo_server(pod.listen(9000).unwrap(), &pod.name), pod));
    }
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    mesh.service("web", "demo", vip, 80, "web", 9000).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_for_service(1, vip.into()).await.unwrap();

    // Every connection lands on one of the three (the greeting names it); over 12, all three.
    let mut hit = BTreeSet::new();
    for _ in 0..12 {
        let mut c = EchoClient::greet(client.connect((vip, 80).into()).await.unwrap()).await.unwrap();
        assert_eq!(c.seen_as.ip(), client.ip);
        c.round_trip(b"ping").await.unwrap();
        hit.insert(c.server.clone());
    }
    assert_eq!(hit, BTreeSet::from(["web-1".to_owned(), "web-2".to_owned(), "web-3".to_owned()]));
    drop(backends);
}

/// Our ztunnel behind a control plane that serves only Istio's two xDS types, as istiod does: it
/// asks for the trust-bundle type too, gets nothing, and runs on the roots that come with its
/// certificates; services resolve and AuthorizationPolicy is enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_runs_on_only_what_istiod_serves() {
    let options = MeshOptions { ca_args: vec!["--xds-types".into(), "istio".into()], ..MeshOptions::default() };
    let mut mesh = Mesh::start(options).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let web = mesh.pod(PodSpec::new("web", "demo", 2).label("app", "web")).await.unwrap();
    let _app = echo_server(web.listen(9000).unwrap(), &web.name);
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    mesh.service("web", "demo", vip, 80, "web", 9000).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_for_service(1, vip.into()).await.unwrap();

    // Across nodes, by pod address and by service VIP, over mutual TLS.
    for target in [web.addr(9000), (vip, 80).into()] {
        let mut c = EchoClient::greet(client.connect(target).await.unwrap()).await.unwrap();
        assert_eq!(c.seen_as.ip(), client.ip);
        c.round_trip(b"behind an istiod-like control plane").await.unwrap();
    }
    let m2 = mesh.metrics(2).await.unwrap();
    assert!(mtls_from_client(&m2) >= 2.0, "{m2}");

    // istio.security.Authorization is applied: a DENY of the client's identity refuses it.
    mesh.apply(
        "deny-client",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/client\"]\n",
    )
    .unwrap();
    mesh.settle(&["demo/deny-client"], &[]).await.unwrap();
    let refused = match client.connect(web.addr(9000)).await {
        Err(_) => true,
        Ok(stream) => EchoClient::greet(stream).await.is_err(),
    };
    assert!(refused, "the DENY policy let the client through");
    let m2 = mesh.metrics(2).await.unwrap();
    assert!(
        sum(&m2, "istio_tcp_connections_closed_total{", &["reporter=\"destination\"", "response_flags=\"DENY\""])
            >= 1.0,
        "{m2}"
    );

    // Each ztunnel asked for the trust-bundle type and was served nothing for it, as istiod would.
    let ca_log = std::fs::read_to_string(mesh.state_dir().join("logs/ca.log")).unwrap();
    let ignored = ca_log
        .lines()
        .filter(|l| {
            l.contains("subscription to a type this server does not serve")
                && l.contains(proto::api::type_url::TRUST_BUNDLE)
        })
        .count();
    assert!(ignored >= 2, "{ignored} trust-bundle subscriptions ignored:\n{ca_log}");
}
