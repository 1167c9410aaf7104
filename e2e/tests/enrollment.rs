//! Enrollment follows the namespace label, live: running pods (the same processes, sockets and
//! listeners) move into the mesh and out of it without a restart, and the pod label
//! `istio.io/dataplane-mode=none` keeps a pod out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, metric_sum};
use e2e::sniff::{Sniffer, contains};

/// Sends `marker` from `a` to `b` and says whether it crossed the underlay in the clear.
async fn seen_in_clear(mesh: &Mesh, a: &MeshPod, b: &MeshPod, marker: &[u8]) -> bool {
    let sniffer = Sniffer::start(&mesh.underlay.ns).unwrap();
    let mut c = EchoClient::greet(a.connect(b.addr(8080)).await.unwrap()).await.unwrap();
    assert_eq!(c.seen_as.ip(), a.ip, "the app must always see the real client");
    c.round_trip(marker).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    contains(&sniffer.finish().unwrap(), marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_the_namespace_label_enrolls_and_unenrolls_running_pods() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("flip", false).await.unwrap();
    let a = mesh.pod(PodSpec::new("a", "flip", 1)).await.unwrap();
    let b = mesh.pod(PodSpec::new("b", "flip", 2)).await.unwrap();
    let opted_out = mesh.pod(PodSpec::new("c", "flip", 2).label("istio.io/dataplane-mode", "none")).await.unwrap();
    // The apps start once and keep running through every flip.
    let _b_app = echo_server(b.listen(8080).unwrap(), "b");
    let _c_app = echo_server(opted_out.listen(8080).unwrap(), "c");
    mesh.settle(&[], &[]).await.unwrap();

    assert!(seen_in_clear(&mesh, &a, &b, b"OUT-OF-MESH-1").await, "before enrollment traffic is plain");
    // A connection opened before enrollment keeps working afterwards.
    let mut early = EchoClient::greet(a.connect(b.addr(8080)).await.unwrap()).await.unwrap();

    mesh.namespace("flip", true).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    assert!(!seen_in_clear(&mesh, &a, &b, b"IN-MESH-SECRET-2").await, "enrolled pods sent plaintext");
    let m = mesh.metrics(2).await.unwrap();
    assert!(
        metric_sum(&m, "istio_tcp_connections_opened_total{", &["ns/flip/sa/a"]) >= 1.0,
        "node-2's ztunnel did not carry a → b: {m}"
    );
    early.round_trip(b"opened before enrollment").await.unwrap();
    // The opted-out pod stays out: reached in plaintext (passthrough), never through its ztunnel.
    assert!(seen_in_clear(&mesh, &a, &opted_out, b"OPTED-OUT-3").await);
    let dump = mesh.config_dump(2).await.unwrap();
    let served: Vec<String> =
        dump["pods"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(served, ["flip/b"], "node-2 serves exactly the enrolled pod");

    mesh.namespace("flip", false).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    assert!(seen_in_clear(&mesh, &a, &b, b"OUT-AGAIN-4").await, "unenrolled pods still captured");
    let dump = mesh.config_dump(2).await.unwrap();
    assert!(dump["pods"].as_array().unwrap().is_empty(), "node-2 still serves a pod: {dump}");
    assert!(!ztunnel::capture::installed(&b.netns.ns).unwrap(), "capture rules left in the pod");
}
