//! L4 authorization in the one-machine mesh: DENY policies by principal, by namespace and by port
//! refuse exactly what they name (the rest still flows), Istio's connection metrics count opens and
//! denials, and a policy change closes a live connection it no longer allows. Policies the mesh
//! cannot evaluate fail closed, and a source address is never taken from a header.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
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

/// An ALLOW policy admits exactly what its rules name (by principal, by namespace, on a port)
/// and nothing else reaches the workload it selects; two ALLOW policies add up; workloads it does
/// not select are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policies_admit_only_what_they_name() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("elsewhere", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    let stranger = mesh.pod(PodSpec::new("stranger", "elsewhere", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    let other = mesh.pod(PodSpec::new("other", "demo", 2)).await.unwrap();
    let _web = echo_server(server.listen(8080).unwrap(), "web");
    let _admin = echo_server(server.listen(9090).unwrap(), "admin");
    let _other = echo_server(other.listen(8080).unwrap(), "other");
    mesh.settle(&[], &[]).await.unwrap();
    let (web, admin) = (server.addr(8080), server.addr(9090));

    let allow = |name: &str, rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n    - {rule}\n"
        )
    };
    // The client, on port 8080 only.
    let client_web = "from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/client\"]\n      to:\n        - operation:\n            ports: [\"8080\"]";
    mesh.apply("allow-client", &allow("allow-client", client_web)).unwrap();
    mesh.settle(&["demo/allow-client"], &[]).await.unwrap();
    assert!(allowed(&client, web).await, "the ALLOW refused what it names");
    assert!(!allowed(&client, admin).await, "the ALLOW let the client in on a port it does not name");
    assert!(!allowed(&intruder, web).await, "the ALLOW let in a principal it does not name");
    assert!(!allowed(&stranger, web).await, "the ALLOW let in a namespace it does not name");
    for from in [&client, &intruder, &stranger] {
        assert!(allowed(from, other.addr(8080)).await, "{} refused by a pod the policy does not select", from.name);
    }

    // A second ALLOW, for namespace `elsewhere` on any port: either one admits.
    let namespace = "from:\n        - source:\n            namespaces: [elsewhere]";
    mesh.apply("allow-elsewhere", &allow("allow-elsewhere", namespace)).unwrap();
    mesh.settle(&["demo/allow-elsewhere"], &[]).await.unwrap();
    assert!(allowed(&stranger, web).await && allowed(&stranger, admin).await);
    assert!(allowed(&client, web).await && !allowed(&client, admin).await);
    assert!(!allowed(&intruder, web).await);

    let m = mesh.metrics(2).await.unwrap();
    let denied =
        sum(&m, "istio_tcp_connections_closed_total{", &["reporter=\"destination\"", "response_flags=\"DENY\""]);
    assert_eq!(denied, 5.0, "{m}");
}

fn policy(name: &str, annotations: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: demo\n{annotations}spec:\n  selector:\n    matchLabels:\n      app: server\n{body}"
    )
}

/// Policies the mesh cannot take as written fail closed, end to end: `serviceAccounts` is
/// enforced (it used to be dropped, so an ALLOW with only it allowed everyone), a typo'd field
/// makes an ALLOW allow nothing and is reported by the CA with the policy's name, a DENY rule with a
/// port that is not a port denies everything it applies to (it used to be refused whole, so it
/// denied nothing), and a dry-run DENY is evaluated and counted but never enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_the_mesh_cannot_evaluate_fail_closed() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2).label("app", "server")).await.unwrap();
    let _web = echo_server(server.listen(8080).unwrap(), "web");
    mesh.settle(&[], &[]).await.unwrap();
    let web = server.addr(8080);
    assert!(allowed(&client, web).await && allowed(&intruder, web).await, "refused before any policy");
    let config_errors = || async { mesh.ca_get("/debug/config_errors").await.unwrap().1 };
    assert!(!config_errors().await.contains("demo/"), "{}", config_errors().await);

    // 1. serviceAccounts: only demo/client gets in.
    let by_account = "  rules:\n    - from:\n        - source:\n            serviceAccounts: [\"demo/client\"]\n";
    mesh.apply("p", &policy("by-account", "", by_account)).unwrap();
    mesh.settle(&["demo/by-account"], &[]).await.unwrap();
    assert!(allowed(&client, web).await, "serviceAccounts refused the account it names");
    assert!(!allowed(&intruder, web).await, "serviceAccounts was not enforced: another account got in");

    // 2. A typo (`principal:`) in an ALLOW: it allows nothing, and the CA says why and where.
    let typo =
        "  rules:\n    - from:\n        - source:\n            principal: [\"cluster.local/ns/demo/sa/client\"]\n";
    mesh.apply("p", &policy("typo", "", typo)).unwrap();
    mesh.settle(&["demo/typo"], &["demo/by-account"]).await.unwrap();
    assert!(!allowed(&client, web).await, "an ALLOW rule with an unknown field allowed a caller");
    assert!(!allowed(&intruder, web).await, "an ALLOW rule with an unknown field allowed a caller");
    let errors: serde_json::Value = serde_json::from_str(&config_errors().await).unwrap();
    let reported = errors.as_array().unwrap().iter().any(|e| {
        e["source"] == "AuthorizationPolicy demo/typo"
            && e["message"].as_str().unwrap().contains("field \"principal\" is not one this mesh reads")
    });
    assert!(reported, "the typo is not reported: {errors}");
    let ca_metrics = mesh.ca_get("/metrics").await.unwrap().1;
    assert_eq!(sum(&ca_metrics, "ca_config_errors", &[]), 1.0, "{ca_metrics}");
    let ca_log = std::fs::read_to_string(mesh.state_dir().join("logs/ca.log")).unwrap();
    assert!(
        ca_log.contains("AuthorizationPolicy demo/typo: rules[0]: from[0].source: field \"principal\""),
        "{ca_log}"
    );

    // 3. A DENY of the intruder on a port written "08080": it cannot be read, so it denies all.
    let bad_port = "  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/intruder\"]\n      to:\n        - operation:\n            ports: [\"08080\"]\n";
    mesh.apply("p", &policy("bad-port", "", bad_port)).unwrap();
    mesh.settle(&["demo/bad-port"], &["demo/typo"]).await.unwrap();
    assert!(!allowed(&intruder, web).await, "a DENY with a malformed port let its target in");
    assert!(!allowed(&client, web).await, "a DENY rule that cannot be read must deny everything it applies to");

    // 4. A dry-run DENY of the client: evaluated, logged and counted, never enforced.
    let before = mesh.metrics(2).await.unwrap();
    let would_deny = |m: &str| sum(m, "ztunnel_dry_run_authorizations_total{", &["decision=\"deny\""]);
    let deny_client = "  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/client\"]\n";
    mesh.apply("p", &policy("dry-run", "  annotations:\n    istio.io/dry-run: \"true\"\n", deny_client)).unwrap();
    mesh.settle(&["demo/dry-run"], &["demo/bad-port"]).await.unwrap();
    assert!(allowed(&client, web).await, "a dry-run DENY was enforced");
    assert!(allowed(&intruder, web).await, "a dry-run DENY was enforced");
    let after = mesh.metrics(2).await.unwrap();
    assert_eq!(would_deny(&after) - would_deny(&before), 1.0, "{after}");
    let log = mesh.ztunnel_log(2).unwrap();
    assert!(log.contains("dry-run policies applied (not enforced)"), "no dry-run log line");
    assert!(log.contains("DeniedBy(\"demo/dry-run\")"), "the dry-run log line does not name the policy");

    // Fixed: nothing left to report.
    mesh.delete("p").unwrap();
    mesh.settle(&[], &["demo/dry-run"]).await.unwrap();
    assert!(!config_errors().await.contains("demo/"), "{}", config_errors().await);
}

/// A source address comes from the network, never from a header: a mesh client that claims
/// another address in HBONE's `forwarded` header is seen by the app with its real address, and an
/// `ipBlocks` DENY of that real address still refuses it. (ztunnel used to believe the header:
/// the app saw the claimed address and the DENY missed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_header_never_changes_the_source_address() {
    use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolError};
    use proto::hbone::server::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2).label("app", "server")).await.unwrap();
    // A host outside the mesh holding a real mesh certificate (demo/client).
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await.unwrap();
    let listener = server.listen(8080).unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let _app = tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let _ = seen_tx.send(peer.ip());
            let _ = s.write_all(b"hi").await;
        }
    });
    mesh.settle(&[], &[]).await.unwrap();

    let credential = mesh.workload_certificate("demo", "client").await.unwrap();
    let trust = proto::tls::SharedTrustBundle::new(
        proto::tls::TrustBundle::from_pem(&std::fs::read(mesh.ca_root()).unwrap()).unwrap(),
    );
    let dialer = Arc::new(ztunnel::pod::PodDialer(Arc::new(outsider.netns.ns.clone())));
    let pool = Pool::with_dialer(PoolConfig::default(), trust, dialer);
    let expected = vec!["spiffe://cluster.local/ns/demo/sa/server".parse().unwrap()];
    let connect = |claimed: &str| {
        let request = ConnectRequest::new(credential.clone(), server.addr(15008), expected.clone(), server.addr(8080))
            .forwarded_for(claimed.parse().unwrap());
        pool.connect(request)
    };
    for claimed in ["127.0.0.1:1", "10.20.2.250:4000"] {
        let mut tunnel = connect(claimed).await.unwrap();
        let mut hi = [0u8; 2];
        tunnel.read_exact(&mut hi).await.unwrap();
        let ip = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap();
        assert_eq!(ip, std::net::IpAddr::V4(outsider.ip), "the app saw the claimed {claimed}, not the real client");
    }

    let deny = format!(
        "  action: DENY\n  rules:\n    - from:\n        - source:\n            ipBlocks: [\"{}/32\"]\n",
        outsider.ip
    );
    mesh.apply("p", &policy("deny-outsider-ip", "", &deny)).unwrap();
    mesh.settle(&["demo/deny-outsider-ip"], &[]).await.unwrap();
    for claimed in ["10.99.0.1:1", "127.0.0.1:1"] {
        match connect(claimed).await {
            Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED, "{claimed}"),
            Ok(_) => panic!("an ipBlocks DENY of the real address was dodged by claiming {claimed}"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
