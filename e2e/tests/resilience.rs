//! The mesh through failures: the CA stopped (traffic keeps flowing on the certificates held), a
//! certificate renewed under a long-lived stream (it is not interrupted), ztunnel killed and
//! restarted (new connections work again within seconds), ztunnel stopped with SIGTERM (it drains
//! and exits by its deadline).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

async fn expiry(mesh: &Mesh, node: u8, identity: &str) -> Option<u64> {
    let (_, body) = mesh.ztunnel_get(node, 15000, "/certs").await.ok()?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["certificates"].as_array()?.iter().find(|c| c["identity"] == identity)?["expires_unix"].as_u64()
}

async fn works(client: &MeshPod, server: &MeshPod) -> bool {
    let Ok(stream) = client.connect(server.addr(8080)).await else { return false };
    let Ok(mut c) = EchoClient::greet(stream).await else { return false };
    c.round_trip(b"are you there").await.is_ok()
}

/// A mesh with an enrolled client on node-1 and an echo server on node-2.
async fn client_and_server(options: MeshOptions) -> (Mesh, Arc<MeshPod>, Arc<MeshPod>) {
    let mut mesh = Mesh::start(options).unwrap();
    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await.unwrap();
    // The app task lives as long as the runtime.
    drop(echo_server(server.listen(8080).unwrap(), "server"));
    mesh.settle(&[], &[]).await.unwrap();
    assert!(works(&client, &server).await);
    (mesh, client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_ca_outage_renewal_and_ztunnel_restart() {
    let options = MeshOptions { cert_ttl: Some(Duration::from_secs(20)), ..MeshOptions::default() };
    let (mut mesh, client, server) = client_and_server(options).await;

    // A stream that lives through everything below until the restart.
    let mut long = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    long.round_trip(b"start").await.unwrap();
    let first_expiry = expiry(&mesh, 2, SERVER_ID).await.expect("node-2 holds the server's certificate");

    // The CA goes away: the long stream and new connections keep working on the certificates held.
    mesh.stop_ca();
    tokio::time::sleep(Duration::from_millis(500)).await;
    long.round_trip(b"ca down").await.unwrap();
    for _ in 0..3 {
        assert!(works(&client, &server).await, "a new connection failed while the CA was down");
    }
    mesh.start_ca().unwrap();

    // The 20 s certificate is renewed around half-life; the long stream does not notice.
    mesh.wait_until("the server's certificate to be renewed", Duration::from_secs(30), || async {
        expiry(&mesh, 2, SERVER_ID).await.is_some_and(|e| e > first_expiry)
    })
    .await
    .unwrap();
    long.round_trip(b"after renewal").await.unwrap();
    assert!(works(&client, &server).await, "a new connection failed after the renewal");

    // ztunnel on the server's node is killed and restarted: the node agent hands it the pod again
    // and new connections work within seconds.
    mesh.kill_ztunnel(2).unwrap();
    assert!(!works(&client, &server).await, "traffic flowed with the server's ztunnel dead");
    let restarted = Instant::now();
    mesh.start_ztunnel(2).unwrap();
    mesh.wait_until("traffic through the restarted ztunnel", Duration::from_secs(10), || works(&client, &server))
        .await
        .unwrap();
    eprintln!("new connections worked {:?} after the restart", restarted.elapsed());
    assert_eq!(mesh.nodes[1].agent.snapshots(), 2, "the agent sent the restarted ztunnel a fresh snapshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_by_the_deadline() {
    let options = MeshOptions { drain_timeout: Duration::from_secs(2), ..MeshOptions::default() };
    let (mut mesh, client, server) = client_and_server(options).await;
    let mut open = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    open.round_trip(b"open during the drain").await.unwrap();

    // The open connection keeps ztunnel draining until the deadline, then is closed.
    let took = mesh.terminate_ztunnel(1).unwrap();
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}, before the drain deadline");
    assert!(took < Duration::from_secs(8), "took {took:?} to exit");
    assert!(open.closed_within(Duration::from_secs(2)).await, "the connection outlived ztunnel");
    let log = mesh.ztunnel_log(1).unwrap();
    for line in ["shutting down", "drained", "ztunnel stopped"] {
        assert!(log.contains(line), "no {line:?} in the log");
    }
}
