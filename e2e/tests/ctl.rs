//! `ambientctl ztunnel` against the real ztunnels of the one-machine mesh (`--netns` enters a
//! node): the pods a node serves and the workloads it knows, the certificates it holds with their
//! signer and root, and a live connection with the identity its peer proved; and `ambientctl
//! namespace enable|disable --config-dir` on the mesh's YAML directory enrolls and unenrolls a
//! running pod.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

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
