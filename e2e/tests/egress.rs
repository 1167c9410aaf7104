//! Traffic leaving the mesh, with real namespaces, capture rules and processes: two servers outside
//! the mesh and outside the nodes (network namespaces on the underlay), a client pod in an ambient
//! namespace.
//!
//! - by default (`ALLOW_ANY`) the client reaches an unknown address (passthrough);
//! - with the root namespace's `istio` ConfigMap saying `outboundTrafficPolicy: REGISTRY_ONLY`,
//!   ztunnel refuses it (counted as `DENY`), while ServiceEntry hosts work: a STATIC entry by its
//!   address and at its endpoint's own address, a DNS entry whose endpoint ztunnel resolves, and
//!   a NONE entry that registers the unknown server's address, after which it is reached again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, metric_sum};

const PORT: u16 = 9000;

/// Whether `client` gets the greeting of the server named `server` at `to`.
async fn reaches(client: &MeshPod, to: SocketAddr, server: &str) -> bool {
    let Ok(stream) = client.connect(to).await else { return false };
    match EchoClient::greet(stream).await {
        Ok(mut c) => {
            assert_eq!(c.server, server, "{to} answered as {}", c.server);
            assert_eq!(c.seen_as.ip(), client.ip, "the server outside saw another source address");
            c.round_trip(b"out of the mesh").await.unwrap();
            true
        }
        Err(_) => false,
    }
}

const REGISTRY_ONLY: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
";

const ENTRIES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: demo}
spec:
  hosts: [api.partner.example]
  addresses: [240.240.0.10]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9000}]
  endpoints: [{address: 10.10.0.201}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-name, namespace: demo}
spec:
  hosts: [named.partner.example]
  addresses: [240.240.0.11]
  resolution: DNS
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  endpoints: [{address: 10.10.0.201}]
";

const LEGACY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: demo}
spec:
  hosts: [legacy.partner.example]
  addresses: [10.10.0.202]
  resolution: NONE
  ports: [{number: 9000, name: tcp, protocol: TCP}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_unknown_destinations_and_service_entries_open_them() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let partner = mesh.outside_client(1).unwrap();
    let stranger = mesh.outside_client(2).unwrap();
    let _apps = [
        echo_server(partner.ns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap(), "partner"),
        echo_server(stranger.ns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], PORT))).unwrap(), "stranger"),
    ];
    mesh.settle(&[], &[]).await.unwrap();
    let stranger_at = SocketAddr::from(([10, 10, 0, 202], PORT));
    let partner_at = SocketAddr::from(([10, 10, 0, 201], PORT));

    // ALLOW_ANY (no mesh configuration): an address the mesh does not know is passed through.
    assert!(reaches(&client, stranger_at, "stranger").await, "ALLOW_ANY did not pass an unknown address through");

    // REGISTRY_ONLY with two ServiceEntries.
    mesh.apply("entries", ENTRIES).unwrap();
    mesh.wait_for_service(1, "240.240.0.10".parse().unwrap()).await.unwrap();
    mesh.wait_for_service(1, "240.240.0.11".parse().unwrap()).await.unwrap();
    mesh.apply("mesh-config", REGISTRY_ONLY).unwrap();
    mesh.wait_until("REGISTRY_ONLY to refuse the unknown address", Duration::from_secs(20), || {
        let client = client.clone();
        async move { !reaches(&client, stranger_at, "stranger").await }
    })
    .await
    .unwrap();
    // It stays refused, and each refusal is counted as a denial by the client's ztunnel.
    let denied = || async {
        let m = mesh.metrics(1).await.unwrap();
        metric_sum(&m, "istio_tcp_connections_closed_total{", &["reporter=\"source\"", "response_flags=\"DENY\""])
    };
    let before = denied().await;
    for _ in 0..3 {
        assert!(!reaches(&client, stranger_at, "stranger").await, "REGISTRY_ONLY let an unknown address through");
    }
    assert_eq!(denied().await - before, 3.0);
    let log = mesh.ztunnel_log(1).unwrap();
    assert!(log.contains("outboundTrafficPolicy REGISTRY_ONLY: 10.10.0.202:9000"), "no log line says why");

    // The entries' hosts work: the STATIC one by its address (port 80 → the endpoint's 9000) and
    // at its endpoint's own address, the DNS one through the name ztunnel resolves.
    assert!(reaches(&client, SocketAddr::from(([240, 240, 0, 10], 80)), "partner").await);
    assert!(reaches(&client, partner_at, "partner").await);
    assert!(reaches(&client, SocketAddr::from(([240, 240, 0, 11], PORT)), "partner").await);

    // A NONE entry registers the stranger's address: reached again, where the client dialed.
    mesh.apply("legacy", LEGACY).unwrap();
    mesh.wait_until("the NONE entry to register the address", Duration::from_secs(20), || {
        let client = client.clone();
        async move { reaches(&client, stranger_at, "stranger").await }
    })
    .await
    .unwrap();
}

/// The egress waypoint's policy: nobody reaches `/admin` of a partner.
const NO_PARTNER_ADMIN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-partner-admin, namespace: demo}
spec:
  targetRefs:
    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  action: DENY
  rules:
    - to:
        - operation:
            paths: [\"/admin*\"]
";

const EGRESS: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: partner-api
  namespace: demo
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [api.partner.example]
  addresses: [240.240.0.20]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints: [{address: 10.10.0.201}]
";

/// A ServiceEntry labelled `istio.io/use-waypoint` sends its traffic through that waypoint (an
/// egress waypoint): L7 policy applies to it (a path denied with 403 by the waypoint, the rest
/// served by the server outside the mesh, reached in plain TCP from the waypoint), and the
/// waypoint's metrics name the entry's host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_waypoint_applies_l7_policy_to_a_service_entry() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let partner = mesh.outside_client(1).unwrap();
    let _app =
        e2e::apps::http_server(partner.ns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], 8080))).unwrap(), "partner");
    let waypoint = mesh.waypoint("demo", "waypoint", 2, std::net::Ipv4Addr::new(10, 96, 0, 90)).await.unwrap();
    mesh.apply("egress", EGRESS).unwrap();
    mesh.apply("no-partner-admin", NO_PARTNER_ADMIN).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_for_service(1, "240.240.0.20".parse().unwrap()).await.unwrap();

    let vip = SocketAddr::from(([240, 240, 0, 20], 80));
    let get = |path: &'static str| {
        let ns = client.netns.ns.clone();
        async move { e2e::mesh::http_exchange_as(&ns, "api.partner.example", vip, path, &[]).await }
    };
    mesh.wait_until("the entry's traffic to cross the waypoint", Duration::from_secs(30), || async {
        let Ok(a) = get("/").await else { return false };
        let Ok(m) = mesh.waypoint_metrics(&waypoint).await else { return false };
        a.status == 200
            && metric_sum(&m, "istio_requests_total{", &["destination_service=\"api.partner.example\""]) >= 1.0
    })
    .await
    .unwrap();
    let ok = get("/orders").await.unwrap();
    assert_eq!((ok.status, ok.header("x-served-by")), (200, Some("partner")), "{ok:?}");
    let denied = get("/admin/keys").await.unwrap();
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied\n"), "{denied:?}");
    let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
    let to_partner = |code: &str| {
        metric_sum(
            &m,
            "istio_requests_total{",
            &["destination_service=\"api.partner.example\"", &format!("response_code=\"{code}\"")],
        )
    };
    assert!(to_partner("200") >= 2.0 && to_partner("403") == 1.0, "{m}");
}

const ORIGINATION: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: partner-secure
  namespace: demo
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [secure.partner.example]
  addresses: [240.240.0.30]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8443}]
  endpoints: [{address: 10.10.0.201}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: partner-impostor
  namespace: demo
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [impostor.partner.example]
  addresses: [240.240.0.31]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8443}]
  endpoints: [{address: 10.10.0.201}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: secure-not-internal, namespace: demo}
spec:
  targetRefs:
    - {group: networking.istio.io, kind: ServiceEntry, name: partner-secure}
  action: DENY
  rules:
    - to:
        - operation:
            paths: [\"/internal*\"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: impostor-tls, namespace: demo}
spec:
  host: impostor.partner.example
  trafficPolicy:
    tls: {mode: SIMPLE, credentialName: partner-ca}
";

/// The rule for the secure host, with `tls` as given.
fn partner_tls(tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: partner-tls, namespace: demo}}\nspec:\n  host: secure.partner.example\n  trafficPolicy:\n    tls: {tls}\n"
    )
}

/// TLS origination at the egress waypoint (a DestinationRule's `tls.mode: SIMPLE`): the client
/// sends plain HTTP to a ServiceEntry host, the waypoint applies L7 policy and sends it in TLS
/// to the server outside the mesh — SNI the entry's host, the server's certificate verified
/// against the roots of the rule's `credentialName` Secret. A server whose certificate is not for
/// the name is refused (503, logged), and a rule asking for what the waypoint cannot do (MUTUAL)
/// refuses requests rather than send them in plaintext. A DENY policy may target the ServiceEntry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_waypoint_originates_tls_and_verifies_the_server() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let partner = mesh.outside_client(1).unwrap();
    let ca = proto::testing::TestCa::new();
    let (chain, key) = ca.issue_server(&["secure.partner.example"]);
    let listener = partner.ns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], 8443))).unwrap();
    let _app = e2e::apps::https_app(listener, chain.clone(), key.clone_key(), "partner").unwrap();
    let waypoint = mesh.waypoint("demo", "waypoint", 2, std::net::Ipv4Addr::new(10, 96, 0, 90)).await.unwrap();
    mesh.apply("partner-ca", &e2e::apps::tls_secret("demo", "partner-ca", &chain, &key, Some(ca.root_pem()))).unwrap();
    mesh.apply("origination", ORIGINATION).unwrap();
    mesh.apply("no-partner-admin", NO_PARTNER_ADMIN).unwrap();
    mesh.apply("partner-tls", &partner_tls("{mode: SIMPLE, credentialName: partner-ca}")).unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_for_service(1, "240.240.0.30".parse().unwrap()).await.unwrap();
    mesh.wait_for_service(1, "240.240.0.31".parse().unwrap()).await.unwrap();

    let get = |host: &'static str, vip: [u8; 4], path: &'static str| {
        let ns = client.netns.ns.clone();
        async move { e2e::mesh::http_exchange_as(&ns, host, SocketAddr::from((vip, 80)), path, &[]).await }
    };
    let secure = |path| get("secure.partner.example", [240, 240, 0, 30], path);
    mesh.wait_until("the waypoint to originate TLS to the partner", Duration::from_secs(30), || async {
        secure("/").await.is_ok_and(|a| a.status == 200)
    })
    .await
    .unwrap();
    let ok = secure("/orders?page=2").await.unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        (ok.header("x-served-by"), ok.header("x-sni"), ok.header("x-host"), ok.header("x-path")),
        (Some("partner"), Some("secure.partner.example"), Some("secure.partner.example"), Some("/orders?page=2")),
        "the server did not get the request in TLS for the entry's host: {ok:?}"
    );
    // L7 policy applies before the TLS leaves.
    let denied = secure("/admin/keys").await.unwrap();
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied\n"), "{denied:?}");
    // A policy may name the ServiceEntry itself.
    let denied = secure("/internal/report").await.unwrap();
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied\n"), "{denied:?}");

    // The same server under another name: its certificate is not for it, so nothing is sent.
    let impostor = get("impostor.partner.example", [240, 240, 0, 31], "/orders").await.unwrap();
    assert_eq!(impostor.status, 503, "{impostor:?}");
    let log = mesh.waypoint_log(&waypoint).unwrap();
    assert!(
        log.contains("TLS to 10.10.0.201:8443 (impostor.partner.example)")
            && log.contains("certificate not valid for name"),
        "no log line says why the impostor was refused:\n{log}"
    );

    // A rule the waypoint cannot carry out: refused, not sent without it.
    mesh.apply("partner-tls", &partner_tls("{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}")).unwrap();
    mesh.wait_until("MUTUAL to be refused", Duration::from_secs(20), || async {
        secure("/orders").await.is_ok_and(|a| a.status == 503)
    })
    .await
    .unwrap();
    let refused = secure("/orders").await.unwrap();
    assert!(refused.body.contains("TLS origination refused"), "{refused:?}");
    let log = mesh.waypoint_log(&waypoint).unwrap();
    assert!(log.contains("tls.mode MUTUAL is not supported"), "no log line says why:\n{log}");
}
