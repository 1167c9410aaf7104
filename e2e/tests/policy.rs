//! L4 authorization in the one-machine mesh: DENY policies by principal, by namespace and by port
//! refuse exactly what they name (the rest still flows), Istio's connection metrics count opens and
//! denials, and a policy change closes a live connection it no longer allows.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, metric_sum as sum};

fn deny(name: &str, from: &str, to_ports: &str) -> String {
    let mut rule = String::from("  rules:\n    - ");
    if !from.is_empty() {
        rule.push_str(&format!("from:\n        - source:\n            {from}\n      "));
    }
    if !to_ports.is_empty() {
        rule.push_str(&format!("to:\n        - operation:\n            ports: [\"{to_ports}\"]\n"));
    }
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n{rule}"
    )
}

async fn allowed(from: &MeshPod, to: std::net::SocketAddr) -> bool {
    let Ok(stream) = from.connect(to).await else { return false };
    match EchoClient::greet(stream).await {
        Ok(mut c) => c.round_trip(b"knock knock").await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policies_refuse_what_they_name_and_revoke_live_connections() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("elsewhere", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    let stranger = mesh.pod(PodSpec::new("stranger", "elsewhere", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    let _web = echo_server(server.listen(8080).unwrap(), "web");
    let _admin = echo_server(server.listen(9090).unwrap(), "admin");
    mesh.settle(&[], &[]).await.unwrap();
    let (web, admin) = (server.addr(8080), server.addr(9090));
    for from in [&client, &intruder, &stranger] {
        assert!(allowed(from, web).await, "{} refused before any policy", from.name);
    }

    // A connection that stays open while the policies arrive.
    let mut live = EchoClient::greet(client.connect(web).await.unwrap()).await.unwrap();
    live.round_trip(b"before").await.unwrap();

    let before = mesh.metrics(2).await.unwrap();
    mesh.apply("deny-principal", &deny("deny-principal", "principals: [\"cluster.local/ns/demo/sa/intruder\"]", ""))
        .unwrap();
    mesh.apply("deny-namespace", &deny("deny-namespace", "namespaces: [\"elsewhere\"]", "")).unwrap();
    mesh.apply("deny-port", &deny("deny-port", "", "9090")).unwrap();
    mesh.settle(&["demo/deny-principal", "demo/deny-namespace", "demo/deny-port"], &[]).await.unwrap();

    assert!(!allowed(&intruder, web).await, "DENY by principal did not refuse");
    assert!(!allowed(&stranger, web).await, "DENY by namespace did not refuse");
    assert!(!allowed(&client, admin).await, "DENY by port did not refuse");
    assert!(allowed(&client, web).await, "an allowed connection was refused");
    // The live connection is still allowed and still works.
    live.round_trip(b"during").await.unwrap();

    // The destination ztunnel counted the denials (response_flags DENY) and every open.
    let after = mesh.metrics(2).await.unwrap();
    let denied = |m: &str, principal: &str| {
        sum(
            m,
            "istio_tcp_connections_closed_total{",
            &["reporter=\"destination\"", "response_flags=\"DENY\"", principal],
        )
    };
    for principal in ["ns/demo/sa/intruder", "ns/elsewhere/sa/stranger", "ns/demo/sa/client"] {
        assert_eq!(denied(&after, principal) - denied(&before, principal), 1.0, "{principal}: {after}");
    }
    let opened = |m: &str| sum(m, "istio_tcp_connections_opened_total{", &["reporter=\"destination\""]);
    assert_eq!(opened(&after) - opened(&before), 4.0, "{after}");
    // The source side saw the refusals too.
    let source = mesh.metrics(1).await.unwrap();
    assert!(
        sum(&source, "istio_tcp_connections_closed_total{", &["reporter=\"source\"", "response_flags=\"DENY\""]) >= 3.0,
        "{source}"
    );

    // A policy that now denies the live connection closes it.
    mesh.apply("deny-client", &deny("deny-client", "principals: [\"cluster.local/ns/demo/sa/client\"]", "8080"))
        .unwrap();
    mesh.settle(&["demo/deny-client"], &[]).await.unwrap();
    assert!(live.closed_within(Duration::from_secs(10)).await, "the revoked connection stayed open");
    assert!(!allowed(&client, web).await);
    let log = mesh.ztunnel_log(2).unwrap();
    assert!(log.contains("policy no longer allows it"), "no log line for the revocation");

    // Removing the policies lets everyone back in.
    for p in ["deny-principal", "deny-namespace", "deny-port", "deny-client"] {
        mesh.delete(p).unwrap();
    }
    mesh.settle(&[], &["demo/deny-principal", "demo/deny-namespace", "demo/deny-port", "demo/deny-client"])
        .await
        .unwrap();
    for (from, to) in [(&client, web), (&intruder, web), (&stranger, web), (&client, admin)] {
        assert!(allowed(from, to).await, "{} → {to} still refused", from.name);
    }
}
