//! Bad input to a running ztunnel, each refused cleanly and logged while it keeps serving:
//! plaintext and garbage to 15008, `CONNECT` to ztunnel's own ports, an authority that is not the
//! address the connection landed on, and ZDS requests with a bad descriptor or an unknown uid.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec};
use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolError};
use proto::hbone::server::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::pod::PodDialer;
use ztunnel::zds::ZdsError;

async fn still_serving(client: &MeshPod, server: &MeshPod) {
    let mut c = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    c.round_trip(b"still serving").await.unwrap();
}

/// Sends `bytes` to `addr` from `from` and waits for the server to close the connection; returns
/// what it answered.
async fn refused_raw(from: &MeshPod, addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = from.connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the connection to {addr} was kept open after garbage");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_ztunnel_keeps_serving() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    mesh.namespace("legacy", false).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    let neighbour = mesh.pod(PodSpec::new("neighbour", "demo", 2)).await.unwrap();
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await.unwrap();
    let _app = echo_server(server.listen(8080).unwrap(), "server");
    let _app2 = echo_server(neighbour.listen(8080).unwrap(), "neighbour");
    mesh.settle(&[], &[]).await.unwrap();
    still_serving(&client, &server).await;
    let hbone = server.addr(15008);

    // Plaintext HTTP and raw garbage to the HBONE port: the TLS handshake fails, the connection
    // is closed, and nothing but (at most) a TLS alert comes back.
    for bytes in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 0xff][..]] {
        let answer = refused_raw(&outsider, hbone, bytes).await;
        assert!(answer.len() < 16, "unexpected answer to garbage: {answer:?}");
        assert!(answer.is_empty() || answer[0] == 0x15, "answer is not a TLS alert: {answer:?}");
    }
    still_serving(&client, &server).await;

    // A well-formed HBONE client with a real mesh certificate, from outside the mesh.
    let credential = mesh.workload_certificate("demo", "client").await.unwrap();
    let trust = proto::tls::SharedTrustBundle::new(
        proto::tls::TrustBundle::from_pem(&std::fs::read(mesh.ca_root()).unwrap()).unwrap(),
    );
    let pool =
        Pool::with_dialer(PoolConfig::default(), trust, Arc::new(PodDialer(Arc::new(outsider.netns.ns.clone()))));
    let expected = vec!["spiffe://cluster.local/ns/demo/sa/server".parse().unwrap()];
    let connect =
        |target: SocketAddr| pool.connect(ConnectRequest::new(credential.clone(), hbone, expected.clone(), target));
    let status = |r: Result<proto::hbone::H2Stream, PoolError>| match r {
        Err(PoolError::Refused { status, .. }) => status,
        Ok(_) => StatusCode::OK,
        Err(e) => panic!("unexpected error: {e}"),
    };
    // ztunnel's own ports are not reachable through a tunnel.
    for port in [15001, 15006, 15008, 15021] {
        // As Istio's ztunnel answers a call to itself.
        assert_eq!(status(connect(server.addr(port)).await), StatusCode::SERVICE_UNAVAILABLE, "CONNECT to :{port}");
    }
    // The authority must be the address the connection landed on: not another pod of the node.
    assert_eq!(status(connect(neighbour.addr(8080)).await), StatusCode::BAD_REQUEST);
    // The same client and connection pool, asking properly, gets through.
    let mut tunnel = connect(server.addr(8080)).await.unwrap();
    let mut greeting = [0u8; 6];
    tunnel.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"server");
    drop(tunnel);

    // ZDS: a descriptor that is not a network namespace, none at all, and unknown uids.
    let agent = &mesh.nodes[1].agent;
    let not_a_netns = std::fs::File::open("/proc/self/status").unwrap();
    let results = agent
        .with_connection(async |c| {
            use std::os::fd::AsFd;
            vec![
                c.add_raw("bogus-fd", Some(not_a_netns.as_fd())).await,
                c.add_raw("no-fd", None).await,
                c.del("no-such-pod").await,
                c.keep("no-such-pod").await,
            ]
        })
        .await
        .expect("the agent is connected to node-2's ztunnel");
    // As Istio's ztunnel answers: a bad descriptor is refused with the reason, a DelWorkload of a
    // pod it does not serve is acknowledged, and a KeepWorkload after the snapshot is a protocol
    // error (refused; the connection ends and the agent sends a new snapshot).
    let refusal = |r: &Result<(), ZdsError>| match r {
        Err(ZdsError::Refused(reason)) => reason.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refusal(&results[0]).contains("not a network namespace"), "{results:?}");
    assert!(refusal(&results[1]).contains("exactly one netns descriptor"), "{results:?}");
    assert!(matches!(results[2], Ok(())), "{results:?}");
    assert!(refusal(&results[3]).contains("after SnapshotSent: protocol error"), "{results:?}");

    // Logged, and still serving: existing pods, and a pod enrolled after all of this.
    let log = mesh.ztunnel_log(2).unwrap();
    for needle in [
        "HBONE handshake failed",
        "rejected HBONE request: 400",
        "not a network namespace",
        "DelWorkload for a pod this ztunnel does not serve: nothing to remove",
        "KeepWorkload after SnapshotSent: protocol error",
    ] {
        assert!(log.contains(needle), "no {needle:?} in node-2's log");
    }
    still_serving(&client, &server).await;
    let late = mesh.pod(PodSpec::new("late", "demo", 2)).await.unwrap();
    let _app3 = echo_server(late.listen(8080).unwrap(), "late");
    mesh.settle(&[], &[]).await.unwrap();
    still_serving(&client, &late).await;
}

/// A flood of slow connections to ztunnel's metrics port (a slowloris: headers that never end) is
/// held to the endpoint's connection limit: ztunnel's descriptors stay bounded, pod traffic
/// flows, readiness answers, and the slow connections are closed at the header timeout, after
/// which metrics answer again. (Before, each one held a descriptor for as long as it liked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_metrics_port_does_not_starve_pod_traffic() {
    let mut mesh = Mesh::start(MeshOptions::default()).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    let _app = echo_server(server.listen(8080).unwrap(), "server");
    mesh.settle(&[], &[]).await.unwrap();
    still_serving(&client, &server).await;

    let node = &mesh.nodes[1];
    let pid = node.ztunnel_pid().unwrap();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    let slow: usize = std::env::var("E2E_SLOWLORIS").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let metrics_port = SocketAddr::from(([127, 0, 0, 1], 15020));
    let mut held = Vec::new();
    for _ in 0..slow {
        let Ok(socket) = node.netns.ns.tcp_socket(false) else { break };
        let Ok(mut s) = socket.connect(metrics_port).await else { continue };
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Slow: ").await;
        held.push(s);
    }
    assert!(held.len() >= slow.min(1000), "only {} slow connections opened", held.len());
    let during = fds();
    assert!(
        during <= before + 64 + 16,
        "ztunnel holds {during} descriptors (was {before}) under {slow} slow connections"
    );
    for _ in 0..10 {
        still_serving(&client, &server).await;
    }
    assert_eq!(mesh.ztunnel_get(2, 15021, "/healthz/ready").await.unwrap().0, 200);
    // The 10 s header timeout frees the slots while the slow connections are still open.
    let body = proto::testing::eventually("the header timeout to free the slots", Duration::from_secs(20), || async {
        mesh.ztunnel_get(2, 15020, "/metrics").await.ok().filter(|(status, _)| *status == 200).map(|(_, body)| body)
    })
    .await;
    drop(held);
    assert!(body.contains("istio_tcp_connections_opened_total"), "{body}");
    let log = mesh.ztunnel_log(2).unwrap();
    assert!(log.contains("HTTP endpoint at its connection limit"), "the refusals were not logged");
}
