//! Enrollment follows the namespace label, live: running pods (the same processes, sockets and
//! listeners) move into the mesh and out of it without a restart, and the pod label
//! `istio.io/dataplane-mode=none` keeps a pod out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, metric_sum};
use e2e::sniff::{Sniffer, contains};

/// Sends `marker` from `a` to `b` and says whether it crossed the underlay in the clear. In the
/// same capture `a` sends a control marker to `plain`, a pod outside the mesh on another node:
/// it must be seen, or the capture proves nothing.
async fn seen_in_clear(mesh: &Mesh, a: &MeshPod, b: &MeshPod, marker: &[u8], plain: &MeshPod) -> bool {
    // (Not containing `marker`: the markers are upper case.)
    let control = [b"control-".as_slice(), &marker.to_ascii_lowercase()].concat();
    let sniffer = Sniffer::start(&mesh.underlay.ns).unwrap();
    let mut c = EchoClient::greet(a.connect(b.addr(8080)).await.unwrap()).await.unwrap();
    assert_eq!(c.seen_as.ip(), a.ip, "the app must always see the real client");
    c.round_trip(marker).await.unwrap();
    let mut p = EchoClient::greet(a.connect(plain.addr(8080)).await.unwrap()).await.unwrap();
    p.round_trip(&control).await.unwrap();
    let seen = sniffer.finish().unwrap();
    assert!(contains(&seen, &control), "the capture missed plaintext traffic ({} bytes captured)", seen.len());
    contains(&seen, marker)
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

    assert!(seen_in_clear(&mesh, &a, &b, b"OUT-OF-MESH-1", &opted_out).await, "before enrollment traffic is plain");
    // A connection opened before enrollment keeps working afterwards.
    let mut early = EchoClient::greet(a.connect(b.addr(8080)).await.unwrap()).await.unwrap();

    mesh.namespace("flip", true).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    assert!(!seen_in_clear(&mesh, &a, &b, b"IN-MESH-SECRET-2", &opted_out).await, "enrolled pods sent plaintext");
    let m = mesh.metrics(2).await.unwrap();
    assert!(
        metric_sum(&m, "istio_tcp_connections_opened_total{", &["ns/flip/sa/a"]) >= 1.0,
        "node-2's ztunnel did not carry a → b: {m}"
    );
    early.round_trip(b"opened before enrollment").await.unwrap();
    // The opted-out pod stays out: reached in plaintext (passthrough), never through its ztunnel.
    assert!(seen_in_clear(&mesh, &a, &opted_out, b"OPTED-OUT-3", &opted_out).await);
    let dump = mesh.config_dump(2).await.unwrap();
    let served: Vec<String> =
        dump["pods"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(served, ["flip/b"], "node-2 serves exactly the enrolled pod");

    mesh.namespace("flip", false).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    assert!(seen_in_clear(&mesh, &a, &b, b"OUT-AGAIN-4", &opted_out).await, "unenrolled pods still captured");
    let dump = mesh.config_dump(2).await.unwrap();
    assert!(dump["pods"].as_array().unwrap().is_empty(), "node-2 still serves a pod: {dump}");
    assert!(!ztunnel::node::capture::installed(&b.netns.ns).unwrap(), "capture rules left in the pod");
}

/// IPv6 is not captured yet, so it must not be a way around the mesh: with IPv6 addresses on the
/// pods (one bridge, one /64), two pods outside the mesh talk over IPv6 (the control), but an
/// enrolled pod can neither be reached over IPv6 nor open an IPv6 connection, while its IPv4
/// traffic goes through the mesh as usual. Unenrolling it gives IPv6 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_cannot_bypass_an_enrolled_pod() {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 1)).await.unwrap();
    let plain_a = mesh.pod(PodSpec::new("plain-a", "legacy", 1)).await.unwrap();
    let plain_b = mesh.pod(PodSpec::new("plain-b", "legacy", 1)).await.unwrap();
    let v6 = |n: u16| Ipv6Addr::new(0xfd00, 0x20, 1, 0, 0, 0, 0, n);
    for (pod, n) in [(&client, 2), (&server, 3), (&plain_a, 4), (&plain_b, 5)] {
        pod.netns.ip(&["-6", "addr", "add", &format!("{}/64", v6(n)), "dev", "eth0", "nodad"]).unwrap();
    }
    let _v4 = echo_server(server.listen(8080).unwrap(), "server");
    mesh.settle(&[], &[]).await.unwrap();

    // An IPv6 echo listener in a pod.
    let listen6 = |pod: &MeshPod, addr: Ipv6Addr| {
        let socket = pod.netns.ns.tcp_socket(true).unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(SocketAddr::new(IpAddr::V6(addr), 8080)).unwrap();
        let listener = socket.listen(16).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"v6").await;
            }
        })
    };
    let _server6 = listen6(&server, v6(3));
    let _plain6 = listen6(&plain_b, v6(5));
    let talks6 = |from: &MeshPod, to: Ipv6Addr| {
        let socket = from.netns.ns.tcp_socket(true).unwrap();
        async move {
            let attempt = async {
                let mut s = socket.connect(SocketAddr::new(IpAddr::V6(to), 8080)).await?;
                let mut hello = [0u8; 2];
                s.read_exact(&mut hello).await?;
                Ok::<_, std::io::Error>(&hello == b"v6")
            };
            matches!(tokio::time::timeout(Duration::from_secs(3), attempt).await, Ok(Ok(true)))
        }
    };
    assert!(talks6(&plain_a, v6(5)).await, "control: IPv6 between two pods outside the mesh does not work");
    assert!(!talks6(&plain_a, v6(3)).await, "an enrolled pod was reached over IPv6, around the mesh");
    assert!(!talks6(&server, v6(5)).await, "an enrolled pod opened an IPv6 connection, around the mesh");
    // IPv4 still goes through the mesh.
    let mut c = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    c.round_trip(b"over v4, through the mesh").await.unwrap();

    // Leaving the mesh gives IPv6 back.
    mesh.namespace("demo", false).await.unwrap();
    mesh.settle(&[], &[]).await.unwrap();
    assert!(talks6(&plain_a, v6(3)).await, "IPv6 stayed blocked after the pod left the mesh");
}
