//! `ambientctl ztunnel` against the real ztunnels of the one-machine mesh (`--netns` enters a
//! node): the pods a node serves and the workloads it knows, the certificates it holds with their
//! signer and root, and a live connection with the identity its peer proved; and `ambientctl
//! namespace enable|disable --config-dir` on the mesh's YAML directory enrolls and unenrolls a
//! running pod.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, PodSpec, binary};

fn ambientctl(args: &[&str]) -> String {
    let out = Command::new(binary("ambientctl").unwrap()).args(args).output().unwrap();
    assert!(out.status.success(), "ambientctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table row whose first column is `first`, split into columns.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambientctl_shows_what_ztunnel_holds_and_enrolls_namespaces_in_the_yaml_directory() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("shop", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "shop", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "shop", 2)).await.unwrap();
    let _app = echo_server(server.listen(8080).unwrap(), "server");
    mesh.settle(&[], &[]).await.unwrap();
    let mut live = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    live.round_trip(b"hello").await.unwrap();
    let node2 = mesh.nodes[1].netns.name.clone();

    let workloads = ambientctl(&["ztunnel", "workloads", "--netns", &node2]);
    let served = row(&workloads, "shop/server");
    assert_eq!(served[1], "spiffe://cluster.local/ns/shop/sa/server", "{workloads}");
    let known = row(workloads.split("WORKLOADS IN THE MESH").nth(1).unwrap(), "shop/client");
    assert_eq!(&known[1..4], [client.ip.to_string().as_str(), "node-1", "HBONE"], "{workloads}");

    let certs = ambientctl(&["ztunnel", "certs", "--netns", &node2]);
    let cert = row(&certs, "spiffe://cluster.local/ns/shop/sa/server");
    assert_eq!(cert[1], "ready", "{certs}");
    let dump = mesh.config_dump(2).await.unwrap();
    let root = dump["trust_bundle"][0].as_str().unwrap();
    assert_eq!(cert.last().copied(), Some(&root[..16]), "the certificate chains to the trusted root: {certs}");
    assert!(certs.contains(root), "the trust bundle is listed: {certs}");
    // Expiry as a date and a distance, the next renewal as a distance.
    let line = certs.lines().find(|l| l.starts_with("spiffe://cluster.local/ns/shop/sa/server")).unwrap();
    assert!(line.contains(" UTC (in ") && line.contains(" ready "), "{certs}");
    // The same for scripts: the admin endpoint's document.
    let json: serde_json::Value =
        serde_json::from_str(&ambientctl(&["ztunnel", "certs", "--netns", &node2, "-o", "json"])).unwrap();
    assert_eq!(json["certificates"][0]["identity"], "spiffe://cluster.local/ns/shop/sa/server", "{json}");
    assert!(json["certificates"][0]["renews_unix"].as_u64().is_some(), "{json}");

    let connections = ambientctl(&["ztunnel", "connections", "--netns", &node2]);
    let conn = row(&connections, "spiffe://cluster.local/ns/shop/sa/client");
    assert_eq!(&conn[1..3], [client.ip.to_string().as_str(), server.addr(8080).to_string().as_str()], "{connections}");
    drop(live);

    // `ambientctl --config-dir` on the mesh's YAML directory: the CA and the harness (playing the
    // node agent) follow the label; the running pod joins the mesh and leaves it again.
    mesh.namespace("later", false).await.unwrap();
    mesh.pod(PodSpec::new("app", "later", 1)).await.unwrap();
    let dir = mesh.objects_dir().display().to_string();
    let served = |dump: &serde_json::Value| dump["pods"].as_array().unwrap().iter().any(|p| p["name"] == "later/app");
    let out = ambientctl(&["--config-dir", &dir, "namespace", "enable", "later"]);
    assert!(out.contains("namespace later: istio.io/dataplane-mode=ambient"), "{out}");
    assert_eq!(mesh.follow_namespace_labels().await.unwrap(), ["later"]);
    mesh.settle(&[], &[]).await.unwrap();
    assert!(served(&mesh.config_dump(1).await.unwrap()), "the pod was not enrolled");
    ambientctl(&["--config-dir", &dir, "namespace", "disable", "later"]);
    assert_eq!(mesh.follow_namespace_labels().await.unwrap(), ["later"]);
    mesh.settle(&[], &[]).await.unwrap();
    assert!(!served(&mesh.config_dump(1).await.unwrap()), "the pod was not unenrolled");
}

/// `ambientctl explain` on the one-machine mesh: the CA's answer, computed with ztunnel's own
/// routing and authorization code, agrees with what the mesh then does — an allowed connection
/// (the DENY policy that applies, evaluated and not matching), one denied by an L4 policy (named),
/// one passed through to a pod outside the mesh, and one to a service bound to a waypoint (the
/// waypoint and why; its L7 decisions said to be left out), and under REGISTRY_ONLY one to an
/// address the mesh does not know (refused, and the client's ztunnel says so); a live connection
/// taken from a ztunnel's table by its id. A question it cannot answer is refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambientctl_explain_agrees_with_what_the_mesh_does() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 2)).await.unwrap();
    let _server = echo_server(server.listen(8080).unwrap(), "server");
    let _outsider = echo_server(outsider.listen(8080).unwrap(), "outsider");
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/intruder\"]\n";
    mesh.apply("deny-intruder", deny).unwrap();
    // `web` has a waypoint; its service `hello` is bound to it.
    mesh.namespace("web", true).await.unwrap();
    let hello = mesh.pod(PodSpec::new("hello", "web", 2)).await.unwrap();
    let _hello = e2e::apps::http_server(hello.listen(8080).unwrap(), "hello");
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: web\nspec:\n  clusterIP: 10.96.4.10\n  selector:\n    app: hello\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n";
    mesh.apply("svc-web-hello", svc).unwrap();
    let waypoint = mesh.waypoint("web", "waypoint", 1, std::net::Ipv4Addr::new(10, 96, 4, 2)).await.unwrap();
    mesh.use_waypoint("web", Some("waypoint")).unwrap();
    mesh.settle(&["demo/deny-intruder"], &[]).await.unwrap();

    let works = async |from: &e2e::mesh::MeshPod, to: std::net::SocketAddr| {
        let Ok(stream) = from.connect(to).await else { return false };
        let Ok(mut c) = EchoClient::greet(stream).await else { return false };
        c.round_trip(b"explain me").await.is_ok()
    };
    let explain = async |from: &str, to: &str| {
        let query = ca_ctl::fetch::query(&[("from", from), ("to", to)]);
        let (status, body) = mesh.ca_get(&format!("/debug/explain?{query}")).await.unwrap();
        assert_eq!(status, 200, "{from} -> {to}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let explain_http = async |from: &str, to: &str, path: &str, header: &str| {
        let query =
            ca_ctl::fetch::query(&[("from", from), ("to", to), ("method", "GET"), ("path", path), ("header", header)]);
        let (status, body) = mesh.ca_get(&format!("/debug/explain?{query}")).await.unwrap();
        assert_eq!(status, 200, "{from} -> {to} {path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let verdicts = |e: &serde_json::Value| -> Vec<(String, bool)> {
        e["authorization"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (format!("{} {}", p["action"].as_str().unwrap(), p["name"].as_str().unwrap()), p["matched"] == true)
            })
            .collect()
    };

    // Allowed: the DENY that applies is evaluated and does not match.
    let allowed = explain("demo/client", "demo/server:8080").await;
    assert_eq!(allowed["source"]["identity"], "spiffe://cluster.local/ns/demo/sa/client", "{allowed}");
    assert_eq!(allowed["destination"]["workload"], "demo/server", "{allowed}");
    assert_eq!(allowed["authorization"]["verdict"], "ALLOW", "{allowed}");
    assert_eq!(verdicts(&allowed), [("DENY demo/deny-intruder".to_owned(), false)], "{allowed}");
    assert_eq!(allowed["outcome"], format!("connected to demo/server at {}", server.addr(8080)), "{allowed}");
    assert!(works(&client, server.addr(8080)).await, "the mesh refused what explain allowed");

    // Denied by the L4 policy, named.
    let denied = explain("demo/intruder", &server.addr(8080).to_string()).await;
    assert_eq!(denied["authorization"]["verdict"], "DENY", "{denied}");
    assert_eq!(denied["authorization"]["reason"], "denied by demo/deny-intruder", "{denied}");
    assert_eq!(verdicts(&denied), [("DENY demo/deny-intruder".to_owned(), true)], "{denied}");
    assert!(!works(&intruder, server.addr(8080)).await, "the mesh allowed what explain denied");

    // Passthrough: the destination is not in the mesh.
    let plain = explain("demo/client", "legacy/outsider:8080").await;
    assert_eq!(plain["outcome"], format!("passed through to {}", outsider.addr(8080)), "{plain}");
    assert!(plain["authorization"].is_null(), "{plain}");
    assert_eq!(plain["destination"]["in_mesh"], false, "{plain}");
    assert!(works(&client, outsider.addr(8080)).await, "the passthrough did not connect");

    // A service bound to a waypoint, by its short name (once the CA has taken the binding in),
    // and the waypoint then carries the request.
    mesh.wait_until("the CA to bind hello to the waypoint", Duration::from_secs(10), || async {
        explain("demo/client", "hello.web:80").await["waypoint"].is_object()
    })
    .await
    .unwrap();
    let via = explain("demo/client", "hello.web:80").await;
    assert_eq!(via["service"]["hostname"], "hello.web.svc.cluster.local", "{via}");
    assert_eq!(via["service"]["endpoints"], serde_json::json!(["web/hello"]), "{via}");
    assert_eq!(via["waypoint"]["workload"], format!("web/{}", waypoint.name), "{via}");
    assert_eq!(
        via["waypoint"]["reason"],
        "service web/hello.web.svc.cluster.local is bound to it: istio.io/use-waypoint=waypoint on Namespace web",
        "{via}"
    );
    assert!(via["hop"].as_str().unwrap().contains(&format!("to {}:15008", waypoint.ip)), "{via}");
    assert!(!via["not_explained"].as_array().unwrap().is_empty(), "{via}");
    let requests = async || {
        let m = mesh.waypoint_metrics(&waypoint).await.unwrap();
        e2e::mesh::metric_sum(&m, "istio_requests_total{", &["destination_service=\"hello.web.svc.cluster.local\""])
    };
    let before = requests().await;
    mesh.wait_until("a request to hello to cross the waypoint", Duration::from_secs(30), || async {
        let to = std::net::SocketAddr::from(([10, 96, 4, 10], 80));
        let answered =
            e2e::mesh::http_exchange(&client.netns.ns, "GET", to, "/", &[]).await.is_ok_and(|a| a.status == 200);
        answered && requests().await > before
    })
    .await
    .unwrap();

    // At the waypoint: an L7 DENY bound to its Gateway, an HTTPRoute with a header match and a
    // timeout, a DestinationRule with a connection limit. What explain says the waypoint does
    // with a request, the waypoint then does.
    let hello_vip = std::net::SocketAddr::from(([10, 96, 4, 10], 80));
    mesh.apply(
        "l7-hello",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: web}\nspec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin*\"]}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: hello, namespace: web}\nspec:\n  parentRefs:\n    - {group: \"\", kind: Service, name: hello, port: 80}\n  rules:\n    - matches:\n        - headers: [{name: x-canary, value: \"yes\"}]\n      timeouts: {request: 3s}\n      backendRefs: [{name: hello, port: 80}]\n    - backendRefs: [{name: hello, port: 80}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: hello, namespace: web}\nspec:\n  host: hello.web.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1}\n",
    )
    .unwrap();
    mesh.wait_until("the CA to take the L7 objects in", Duration::from_secs(10), || async {
        let e = explain_http("demo/client", "hello.web:80", "/", "x-canary: yes").await;
        e["request"]["route"]["rule"] == 0 && e["request"]["backends"][0]["policy"].is_string()
    })
    .await
    .unwrap();
    let admin = explain_http("demo/client", "hello.web:80", "/admin/users", "").await;
    let r = &admin["request"];
    assert_eq!(r["request"], "GET /admin/users  (host hello.web.svc.cluster.local, port 80)", "{admin}");
    assert_eq!(r["authentication"], "no RequestAuthentication applies", "{admin}");
    assert_eq!(r["verdict"], "DENY", "{admin}");
    assert_eq!(r["reason"], "denied by web/deny-admin", "{admin}");
    assert_eq!(
        r["policies"],
        serde_json::json!([{"name": "web/deny-admin", "action": "DENY", "dry_run": false, "matched": true, "rule": 0}]),
        "{admin}"
    );
    let forbidden = "answered 403 by the waypoint (RBAC: access denied): denied by web/deny-admin";
    assert_eq!(admin["outcome"], forbidden, "{admin}");
    mesh.wait_until("the waypoint to deny /admin", Duration::from_secs(20), || async {
        let a = e2e::mesh::http_exchange(&client.netns.ns, "GET", hello_vip, "/admin/users", &[]).await;
        a.is_ok_and(|a| a.status == 403)
    })
    .await
    .unwrap();
    let canary = explain_http("demo/client", "hello.web:80", "/", "x-canary: yes").await;
    let r = &canary["request"];
    assert_eq!(r["verdict"], "ALLOW", "{canary}");
    assert_eq!(r["policies"][0]["matched"], false, "{canary}");
    assert_eq!(r["route"], serde_json::json!({"kind": "HTTPRoute", "route": "web/hello", "rule": 0, "rule_name": ""}));
    assert_eq!(r["rule_settings"], serde_json::json!(["timeout 3000 ms"]), "{canary}");
    assert_eq!(r["backends"][0]["service"], "web/hello.web.svc.cluster.local", "{canary}");
    assert_eq!(r["backends"][0]["share"], 100.0, "{canary}");
    assert_eq!(r["backends"][0]["endpoints"], serde_json::json!(["web/hello"]), "{canary}");
    assert_eq!(
        r["backends"][0]["policy"],
        "DestinationRule web/hello; load balancer round_robin; connection pool: max connections 1",
        "{canary}"
    );
    assert_eq!(canary["outcome"], "sent by the waypoint to web/hello.web.svc.cluster.local:80 (100%)", "{canary}");
    let plain = explain_http("demo/client", "hello.web:80", "/", "").await;
    assert_eq!(plain["request"]["route"]["rule"], 1, "{plain}");
    assert_eq!(plain["request"]["rule_settings"], serde_json::json!([]), "{plain}");
    let answered = e2e::mesh::http_exchange(&client.netns.ns, "GET", hello_vip, "/", &[("x-canary", "yes")]).await;
    assert_eq!(answered.unwrap().status, 200, "the waypoint did not carry what explain said it sends");

    // REGISTRY_ONLY: an address the mesh does not know is refused by the client's ztunnel.
    let unknown = "192.0.2.1:443";
    mesh.apply(
        "mesh-config",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n",
    )
    .unwrap();
    mesh.wait_until("the CA to take REGISTRY_ONLY in", Duration::from_secs(10), || async {
        explain("demo/client", unknown).await["outcome"] == "refused"
    })
    .await
    .unwrap();
    let refused = explain("demo/client", unknown).await;
    let why = format!("none: {unknown} is not known to the mesh and outboundTrafficPolicy is REGISTRY_ONLY");
    assert_eq!(refused["hop"], why, "{refused}");
    mesh.wait_until("node-1's ztunnel to refuse the unknown address", Duration::from_secs(20), || async {
        let _ = client.connect(unknown.parse().unwrap()).await;
        mesh.ztunnel_log(1).unwrap().contains(&format!("outboundTrafficPolicy REGISTRY_ONLY: {unknown}"))
    })
    .await
    .unwrap();

    // ambientctl prints the same for people, from inside the CA's network.
    let underlay = mesh.underlay.name.clone();
    let printed = ambientctl(&["explain", "demo/intruder", "demo/server:8080", "--netns", &underlay]);
    eprintln!("{printed}");
    for line in [
        "from       demo/intruder  spiffe://cluster.local/ns/demo/sa/intruder  (node node-1",
        "reaches    demo/server  spiffe://cluster.local/ns/demo/sa/server  (node node-2",
        "DENY   demo/deny-intruder",
        "verdict    DENY: denied by demo/deny-intruder",
        "outcome    refused by demo/server's ztunnel (HBONE 401): denied by demo/deny-intruder",
    ] {
        assert!(printed.contains(line), "no {line:?} in:\n{printed}");
    }
    // The waypoint's part, printed.
    let printed =
        ambientctl(&["explain", "demo/client", "hello.web:80", "--path", "/admin/users", "--netns", &underlay]);
    eprintln!("{printed}");
    for line in [
        "request    GET /admin/users  (host hello.web.svc.cluster.local, port 80) at the waypoint",
        "DENY   web/deny-admin",
        "matched (rule 0)",
        "verdict    DENY: denied by web/deny-admin",
        &format!("outcome    {forbidden}"),
    ] {
        assert!(printed.contains(line), "no {line:?} in:\n{printed}");
    }
    let printed = ambientctl(&["explain", "demo/client", "hello.web:80", "-H", "x-canary: yes", "--netns", &underlay]);
    for line in [
        "route      rule 0 of HTTPRoute web/hello",
        "backend    100%  web/hello.web.svc.cluster.local:80 (endpoints: web/hello)",
        "             DestinationRule web/hello; load balancer round_robin; connection pool: max connections 1",
        "rule       timeout 3000 ms",
    ] {
        assert!(printed.contains(line), "no {line:?} in:\n{printed}");
    }
    // A live connection from node-2's table, explained as the mesh is now.
    let mut live = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    live.round_trip(b"still here").await.unwrap();
    let node2 = mesh.nodes[1].netns.name.clone();
    let table: serde_json::Value =
        serde_json::from_str(&ambientctl(&["ztunnel", "connections", "--netns", &node2, "-o", "json"])).unwrap();
    let id = table["inbound"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["source_identity"] == "spiffe://cluster.local/ns/demo/sa/client"
                && c["destination"] == server.addr(8080).to_string()
        })
        .and_then(|c| c["id"].as_u64())
        .unwrap_or_else(|| panic!("the client's connection is not in node-2's table: {table}"));
    let id = id.to_string();
    let printed = ambientctl(&["explain", "--connection", &id, "--ztunnel-netns", &node2, "--netns", &underlay]);
    let first = format!(
        "connection {id} from {} (spiffe://cluster.local/ns/demo/sa/client) to {}, open for",
        client.ip,
        server.addr(8080)
    );
    assert!(printed.starts_with(&first), "{printed}");
    assert!(printed.contains("verdict    ALLOW: no ALLOW policy applies and no DENY policy matches"), "{printed}");
    live.round_trip(b"after the explanation").await.unwrap();
    let out = Command::new(binary("ambientctl").unwrap())
        .args(["explain", "--connection", "999999", "--ztunnel-netns", &node2, "--netns", &underlay])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live connection 999999 in that ztunnel's table"));

    // A question it cannot answer: the reason, and a failure status.
    let out = Command::new(binary("ambientctl").unwrap())
        .args(["explain", "demo/nobody", "demo/server:8080", "--netns", &underlay])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("source \"demo/nobody\": no workload"), "{err}");
}
