//! The mesh through failures: the CA stopped (traffic keeps flowing on the certificates held), a
//! certificate renewed under a long-lived stream (it is not interrupted), ztunnel killed and
//! restarted (new connections work again within seconds), ztunnel stopped with SIGTERM (it drains
//! and exits by its deadline), a pod whose capture port is held when ztunnel enrolls it (pending:
//! counted, not ready, retried until the port frees up, then served), ztunnel's log output stalled
//! (traffic flows on, no line lost).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::apps::{EchoClient, echo_server};
use e2e::mesh::{Mesh, MeshOptions, MeshPod, PodSpec, metric_sum};

const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";

/// A certificate as ztunnel's admin `/certs` shows it (Unix seconds).
struct Held {
    not_before: u64,
    expires: u64,
    renews: Option<u64>,
}

async fn held(mesh: &Mesh, node: u8, identity: &str) -> Option<Held> {
    let (_, body) = mesh.ztunnel_get(node, 15000, "/certs").await.ok()?;
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    let cert = json["certificates"].as_array()?.iter().find(|c| c["identity"] == identity)?;
    Some(Held {
        not_before: cert["not_before_unix"].as_u64()?,
        expires: cert["expires_unix"].as_u64()?,
        renews: cert["renews_unix"].as_u64(),
    })
}

async fn readiness(mesh: &Mesh, node: u8) -> Option<u16> {
    mesh.ztunnel_get(node, 15021, "/healthz/ready").await.map(|(status, _)| status).ok()
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
    let first = held(&mesh, 2, SERVER_ID).await.expect("node-2 holds the server's certificate");

    // The CA goes away, and both ztunnels see their control-plane stream fail; the long stream
    // and new connections keep working on the certificates held.
    let lost = |log: &str| log.matches("xDS stream failed").count() + log.matches("xDS stream closed").count();
    let before = [lost(&mesh.ztunnel_log(1).unwrap()), lost(&mesh.ztunnel_log(2).unwrap())];
    mesh.stop_ca();
    mesh.wait_until("both ztunnels to lose their xDS stream", Duration::from_secs(10), || async {
        lost(&mesh.ztunnel_log(1).unwrap()) > before[0] && lost(&mesh.ztunnel_log(2).unwrap()) > before[1]
    })
    .await
    .unwrap();
    long.round_trip(b"ca down").await.unwrap();
    for _ in 0..3 {
        assert!(works(&client, &server).await, "a new connection failed while the CA was down");
    }
    mesh.start_ca().unwrap();

    // The 20 s certificate is due for renewal at half of its lifetime left at receipt (± 10 %;
    // receipt is 60 s after its backdated notBefore, to the second), and renewed then; the long
    // stream does not notice.
    let received = first.not_before + 60;
    let due = first.renews.expect("a renewal is scheduled");
    let lifetime = first.expires - received;
    assert!(
        (due - received) * 20 >= lifetime * 9 - 20 && (due - received) * 20 <= lifetime * 11 + 20,
        "renewal due {} s after receipt, not about half of {lifetime} s",
        due - received
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let wait = Duration::from_secs(due.saturating_sub(now) + 5);
    mesh.wait_until("the server's certificate to be renewed when due", wait, || async {
        held(&mesh, 2, SERVER_ID).await.is_some_and(|h| h.expires > first.expires)
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

    assert_eq!(readiness(&mesh, 1).await, Some(200), "ready before the signal");

    // SIGTERM: within a second not ready and the pod's listeners closed (a new connection from the
    // client is refused; the listener tasks wake to the drain just after readiness flips), while
    // the open connection keeps ztunnel draining until the deadline.
    let exiting = mesh.terminate_ztunnel(1).unwrap();
    // Readiness stops answering at once (where a successor shares the port, it answers alone).
    mesh.wait_until("ztunnel to stop answering readiness", Duration::from_secs(1), || async {
        readiness(&mesh, 1).await.is_none()
    })
    .await
    .unwrap();
    mesh.wait_until("a new connection from the pod to be refused", Duration::from_secs(1), || async {
        client.connect(server.addr(8080)).await.is_err_and(|e| format!("{e:#}").contains("Connection refused"))
    })
    .await
    .unwrap();
    open.round_trip(b"still open while draining").await.unwrap();
    let took = exiting.exited().await.unwrap();
    assert!(took >= Duration::from_millis(1500), "exited after {took:?}, before the drain deadline");
    assert!(took < Duration::from_secs(8), "took {took:?} to exit");
    assert!(open.closed_within(Duration::from_secs(2)).await, "the connection outlived ztunnel");
    let log = mesh.ztunnel_log(1).unwrap();
    for line in ["shutting down", "no longer ready, closing every pod's listeners", "drained", "ztunnel stopped"] {
        assert!(log.contains(line), "no {line:?} in the log");
    }
}

fn log_count(mesh: &Mesh, node: u8, line: &str) -> usize {
    mesh.ztunnel_log(node).unwrap().matches(line).count()
}

/// The log level changes at run time through the admin `/logging` endpoint (and a bad filter is
/// refused with the reason, the old one kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_log_level_changes_at_run_time() {
    let (mesh, client, server) = client_and_server(MeshOptions::default()).await;
    let logging = |method: &'static str, query: &'static str| {
        let mesh = &mesh;
        async move { mesh.ztunnel_request(2, method, 15000, &format!("/logging{query}")).await.unwrap() }
    };
    let (status, before) = logging("GET", "").await;
    assert_eq!(status, 200);
    assert!(before.starts_with("log filter: "), "{before}");
    // Each connection ends with an info line from the `access` target.
    let closed = async || metric_sum(&mesh.metrics(2).await.unwrap(), "istio_tcp_connections_closed_total{", &[]);
    let connect_and_wait = async || {
        let n = closed().await;
        assert!(works(&client, &server).await);
        mesh.wait_until("the connection to be counted closed", Duration::from_secs(5), || async { closed().await > n })
            .await
            .unwrap();
    };

    assert_eq!(logging("POST", "?level=warn").await, (200, "log filter: warn\n".to_owned()));
    let lines = log_count(&mesh, 2, "connection complete");
    connect_and_wait().await;
    assert_eq!(log_count(&mesh, 2, "connection complete"), lines, "an info line was logged at level warn");

    let (status, reason) = logging("POST", "?level=ztunnel=[bad").await;
    assert_eq!(status, 400, "{reason}");
    assert_eq!(logging("GET", "").await, (200, "log filter: warn\n".to_owned()), "a refused filter was applied");
    assert_eq!(logging("POST", "").await.0, 400);

    assert_eq!(logging("POST", "?level=info").await, (200, "log filter: info\n".to_owned()));
    connect_and_wait().await;
    assert_eq!(log_count(&mesh, 2, "connection complete"), lines + 1);
}

/// ztunnel's stderr is a pipe nobody reads (a log collector that stopped): once the pipe is full,
/// traffic keeps flowing (the access lines queue instead of blocking the workers), and when the
/// pipe is read again every connection's line arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_output_does_not_stop_traffic() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let (mut mesh, client, server) = client_and_server(MeshOptions::default()).await;
    mesh.kill_ztunnel(1).unwrap();
    let log = mesh.nodes[0].log_path().to_owned();
    std::fs::remove_file(&log).unwrap();
    e2e::topology::run("mkfifo", &[log.to_str().unwrap()]).unwrap();
    // Open for reading first (without waiting for a writer), so ztunnel's open for writing
    // succeeds; then read nothing.
    let mut reader = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(&log).unwrap();
    mesh.start_ztunnel(1).unwrap();
    // ztunnel holds the pipe open; the harness (which prints the logs of a failed test) finds a
    // plain file in its place.
    std::fs::rename(&log, log.with_extension("fifo")).unwrap();
    std::fs::write(&log, "").unwrap();
    mesh.wait_until("traffic through the restarted ztunnel", Duration::from_secs(10), || works(&client, &server))
        .await
        .unwrap();

    // 1,000 connections: their access lines (~400 bytes each) are several times what the pipe
    // holds (64 KiB), so the pipe is full long before the last.
    for i in 0..1000 {
        let done = tokio::time::timeout(Duration::from_secs(10), works(&client, &server)).await;
        assert_eq!(done, Ok(true), "connection {i} with the log output stalled");
    }

    // The collector comes back: one access line for each connection counted closed, none lost
    // (a connection is counted just before its line is logged).
    let closed = async || metric_sum(&mesh.metrics(1).await.unwrap(), "istio_tcp_connections_closed_total{", &[]);
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the log pipe: {e}"),
            }
        }
        let lines = String::from_utf8_lossy(&text).matches("connection complete").count() as f64;
        let total = closed().await;
        if lines == total && total >= 1000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{lines} access lines out of the pipe for {total} connections closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = String::from_utf8_lossy(&text);
    assert!(!text.contains("log lines were dropped"), "lines were dropped below the queue's limit");
    // The loss counter is exported, and says none were lost.
    let metrics = mesh.metrics(1).await.unwrap();
    assert!(metrics.contains("# TYPE ztunnel_log_lines_dropped counter"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "ztunnel_log_lines_dropped_total 0"), "{metrics}");
}

/// ztunnel is ready only once it has both the node agent's snapshot and the mesh state: restarted
/// while the agent's socket is out of reach, it syncs with the CA but stays not ready until it
/// gets the snapshot; restarted while the CA is down, it does not even take the snapshot (a
/// ztunnel that listened in pods without knowing the mesh would refuse what it should carry) and
/// stays not ready until the CA is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_is_not_ready_until_it_has_the_snapshot_and_the_mesh_state() {
    let (mut mesh, client, server) = client_and_server(MeshOptions::default()).await;
    let synced = "xDS synced: every required type received";
    let applied = "node agent snapshot applied";

    // No snapshot: the agent's socket moved aside, so ztunnel cannot reach it.
    let socket = mesh.nodes[1].agent.path().to_owned();
    let aside = socket.with_extension("aside");
    mesh.kill_ztunnel(2).unwrap();
    let (synced_before, applied_before) = (log_count(&mesh, 2, synced), log_count(&mesh, 2, applied));
    std::fs::rename(&socket, &aside).unwrap();
    mesh.start_ztunnel(2).unwrap();
    mesh.wait_until("the new ztunnel to sync with the CA", Duration::from_secs(10), || async {
        log_count(&mesh, 2, synced) > synced_before
    })
    .await
    .unwrap();
    let (status, body) = mesh.ztunnel_get(2, 15021, "/healthz/ready").await.unwrap();
    assert_eq!(status, 503, "ready without the node agent's snapshot: {body}");
    assert_eq!(log_count(&mesh, 2, applied), applied_before, "a snapshot arrived through a moved socket");
    std::fs::rename(&aside, &socket).unwrap();
    mesh.wait_until("ztunnel to become ready with the snapshot", Duration::from_secs(15), || async {
        readiness(&mesh, 2).await == Some(200)
    })
    .await
    .unwrap();

    // No mesh state: the CA is down.
    let failed = "xDS stream failed";
    mesh.kill_ztunnel(2).unwrap();
    mesh.stop_ca();
    let (applied_before, failed_before) = (log_count(&mesh, 2, applied), log_count(&mesh, 2, failed));
    let snapshots_before = mesh.nodes[1].agent.snapshots();
    mesh.start_ztunnel(2).unwrap();
    mesh.wait_until("the new ztunnel to fail to reach the CA twice", Duration::from_secs(10), || async {
        log_count(&mesh, 2, failed) >= failed_before + 2
    })
    .await
    .unwrap();
    let (status, body) = mesh.ztunnel_get(2, 15021, "/healthz/ready").await.unwrap();
    assert_eq!(status, 503, "ready without the mesh state: {body}");
    assert_eq!(log_count(&mesh, 2, applied), applied_before, "took the agent's snapshot without the mesh state");
    assert_eq!(mesh.nodes[1].agent.snapshots(), snapshots_before, "connected to the agent without the mesh state");
    mesh.start_ca().unwrap();
    mesh.wait_until("ztunnel to become ready", Duration::from_secs(15), || async {
        readiness(&mesh, 2).await == Some(200)
    })
    .await
    .unwrap();
    mesh.wait_until("traffic again", Duration::from_secs(10), || works(&client, &server)).await.unwrap();
}

/// What ztunnel cannot serve yet it neither serves wrongly nor drops: a pod whose certificate the
/// CA does not grant yet has its inbound HBONE wait (the connection completes once it is granted);
/// plaintext to an enrolled pod the mesh state does not know is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_waits_for_a_certificate_and_refuses_an_unknown_workload() {
    let (mut mesh, client, _server) = client_and_server(MeshOptions::default()).await;
    mesh.namespace("legacy", false).await.unwrap();
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await.unwrap();

    // The object says another node, so the CA refuses node-2's ztunnel the pod's certificate.
    let late = mesh.pod(PodSpec::new("late", "demo", 2).object_node("node-9")).await.unwrap();
    drop(echo_server(late.listen(8080).unwrap(), "late"));
    mesh.settle(&[], &[]).await.unwrap();
    mesh.wait_until("node-2 to be refused the certificate", Duration::from_secs(10), || async {
        let log = mesh.ztunnel_log(2).unwrap();
        log.lines().any(|l| l.contains("no certificate for the pod yet; inbound HBONE waits") && l.contains("sa/late"))
    })
    .await
    .unwrap();
    let waiting = {
        let (client, to) = (client.clone(), late.addr(8080));
        tokio::spawn(async move {
            let mut c = EchoClient::greet(client.connect(to).await?).await?;
            c.round_trip(b"worth the wait").await
        })
    };
    // Under test: the connection is held, not refused, while the certificate is missing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the connection ended without a certificate: {:?}", waiting.await);
    let object = std::fs::read_to_string(mesh.objects_dir().join("pod-demo-late.yaml")).unwrap();
    mesh.apply("pod-demo-late", &object.replace("nodeName: node-9", "nodeName: node-2")).unwrap();
    tokio::time::timeout(Duration::from_secs(15), waiting).await.unwrap().unwrap().unwrap();

    // The mesh state loses the pod while node-2 still serves it: plaintext to it is refused.
    assert!(works(&outsider, &late).await, "plaintext from outside the mesh is allowed by default");
    mesh.delete("pod-demo-late").unwrap();
    let refused = "plaintext inbound refused: no workload known at the destination address";
    mesh.wait_until("a plaintext connection to be refused", Duration::from_secs(10), || async {
        !works(&outsider, &late).await && log_count(&mesh, 2, refused) >= 1
    })
    .await
    .unwrap();
    mesh.apply("pod-demo-late", &object.replace("nodeName: node-9", "nodeName: node-2")).unwrap();
    mesh.wait_until("the pod to be reachable again", Duration::from_secs(10), || works(&outsider, &late))
        .await
        .unwrap();
}

/// A pod whose ports cannot be bound when ztunnel (re)starts is not left unserved: it is refused
/// for now, counted pending (metric, config dump), ztunnel is not ready, and it is retried with
/// backoff until the port frees up; then it is served and ztunnel is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_port_is_held_is_retried_until_served() {
    let (mut mesh, client, server) = client_and_server(MeshOptions::default()).await;
    let pending = |metrics: &str| metric_sum(metrics, "ztunnel_workloads_pending", &[]);

    // node-1's ztunnel goes away, and something in the client pod takes 15006 meanwhile.
    mesh.kill_ztunnel(1).unwrap();
    let squatter = client.listen(15006).unwrap();
    mesh.start_ztunnel(1).unwrap();
    mesh.wait_until("node-1 to count the client pod pending", Duration::from_secs(20), || async {
        mesh.metrics(1).await.is_ok_and(|m| pending(&m) == 1.0)
    })
    .await
    .unwrap();
    let dump = mesh.config_dump(1).await.unwrap();
    assert_eq!(dump["pods_pending"], serde_json::json!([client.uid]), "{dump}");
    assert_eq!(readiness(&mesh, 1).await, Some(503), "ready with a pod unserved");
    // Fail closed meanwhile: the client's traffic is refused, not sent to the server around its
    // ztunnel (the server's namespace takes plaintext, so a leak would get through).
    let leaked = tokio::time::timeout(Duration::from_secs(5), works(&client, &server)).await.unwrap_or(false);
    assert!(!leaked, "a pending pod's traffic reached the server without its ztunnel");
    // Retried, not given up on: still pending after several retries, and said so in the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pending(&mesh.metrics(1).await.unwrap()), 1.0);
    let log = mesh.ztunnel_log(1).unwrap();
    assert!(log.contains("pending pod still refused; retrying"), "{log}");

    // The port frees up: the next retry serves the pod.
    drop(squatter);
    mesh.wait_until("node-1 to serve the client pod", Duration::from_secs(20), || async {
        readiness(&mesh, 1).await == Some(200) && mesh.metrics(1).await.is_ok_and(|m| pending(&m) == 0.0)
    })
    .await
    .unwrap();
    assert!(mesh.ztunnel_log(1).unwrap().contains("pending pod served on retry"));
    assert!(works(&client, &server).await, "the client pod is not served after the retry");
}

/// A long-lived connection's record: round trips every 10 ms until stopped.
#[derive(Debug, Default)]
struct Ticks {
    count: u64,
    /// The longest time between two round trips completing.
    max_gap: Duration,
    error: Option<String>,
}

/// One echo round trip on a long-lived connection.
trait RoundTrip: Send + 'static {
    fn exchange<'a>(
        &'a mut self,
        msg: &'a [u8],
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;
}

impl RoundTrip for EchoClient {
    fn exchange<'a>(
        &'a mut self,
        msg: &'a [u8],
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        Box::pin(self.round_trip(msg))
    }
}

/// A connection the server echoes raw (an upgraded one).
impl RoundTrip for tokio::net::TcpStream {
    fn exchange<'a>(
        &'a mut self,
        msg: &'a [u8],
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        Box::pin(async move {
            self.write_all(msg).await?;
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(10), self.read_exact(&mut back)).await??;
            anyhow::ensure!(
                back == msg,
                "echoed {:?} for {:?}",
                String::from_utf8_lossy(&back),
                String::from_utf8_lossy(msg)
            );
            Ok(())
        })
    }
}

/// Round trips on `stream` every 10 ms until `stop` (or the first failure).
fn keep_talking(mut stream: impl RoundTrip, stop: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<Ticks> {
    tokio::spawn(async move {
        let mut ticks = Ticks::default();
        let mut last = Instant::now();
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            let msg = format!("message {}", ticks.count);
            if let Err(e) = stream.exchange(msg.as_bytes()).await {
                ticks.error = Some(format!("round trip {}: {e:#}", ticks.count));
                return ticks;
            }
            ticks.count += 1;
            ticks.max_gap = ticks.max_gap.max(last.elapsed());
            last = Instant::now();
            tokio::select! {
                () = &mut stopped => return ticks,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
}

/// A ztunnel upgrade resets nothing: ztunnel on both nodes is replaced, one after the other, by a
/// new process (started beside the old one, it takes over the pods' listening sockets; the old
/// one then gets SIGTERM and drains) while a
/// long-lived echo stream pod to pod and an upgraded connection through a waypoint keep
/// exchanging messages every 10 ms — no reset, no gap over 100 ms — and new connections opened
/// all along succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_handover_resets_no_connection() {
    use e2e::apps::http_server;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The predecessors hold what they carry until this deadline: longer than the test.
    let options = MeshOptions { drain_timeout: Duration::from_secs(120), ..MeshOptions::default() };
    let (mut mesh, client, server) = client_and_server(options).await;
    // Namespace `web` has a waypoint (node-1); `hello` (node-2) behind it.
    mesh.namespace("web", true).await.unwrap();
    let hello = mesh.pod(PodSpec::new("hello", "web", 2)).await.unwrap();
    drop(http_server(hello.listen(8080).unwrap(), "hello"));
    let vip = std::net::Ipv4Addr::new(10, 96, 3, 10);
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: web\nspec:\n  clusterIP: {vip}\n  selector:\n    app: hello\n  ports:\n    - name: http\n      port: 80\n      targetPort: 8080\n"
    );
    mesh.apply("svc-web-hello", &svc).unwrap();
    let waypoint = mesh.waypoint("web", "waypoint", 1, std::net::Ipv4Addr::new(10, 96, 3, 2)).await.unwrap();
    mesh.use_waypoint("web", Some("waypoint")).unwrap();
    mesh.settle(&[], &[]).await.unwrap();

    // The upgraded connection, once the waypoint carries `hello` (it counts the 101).
    let upgraded = async || {
        let mut s = client.connect(std::net::SocketAddr::from((vip, 80))).await?;
        s.write_all(b"GET /chat HTTP/1.1\r\nHost: hello.web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut byte)).await??;
            head.push(byte[0]);
        }
        anyhow::ensure!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        Ok::<_, anyhow::Error>(s)
    };
    let switched = |m: &str| metric_sum(m, "istio_requests_total{", &["response_code=\"101\""]);
    let upgrade = std::sync::Mutex::new(None);
    mesh.wait_until("an upgraded connection through the waypoint", Duration::from_secs(30), || async {
        let before = mesh.waypoint_metrics(&waypoint).await.map(|m| switched(&m)).unwrap_or(0.0);
        let Ok(s) = upgraded().await else { return false };
        let after = mesh.waypoint_metrics(&waypoint).await.map(|m| switched(&m)).unwrap_or(0.0);
        *upgrade.lock().unwrap() = Some(s);
        after > before
    })
    .await
    .unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let through_waypoint = keep_talking(upgrade.into_inner().unwrap().unwrap(), stop.clone());
    let long = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    let pod_to_pod = keep_talking(long, stop.clone());
    // New connections all along, one every 20 ms.
    let opener = {
        let (client, server, stop) = (client.clone(), server.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(5), works(&client, &server)).await {
                    Ok(true) => ok += 1,
                    _ => failed.push(format!("{:?}", started.elapsed())),
                }
                tokio::select! {
                    () = &mut stopped => return (ok, failed),
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut predecessors = Vec::new();
    for node in [1, 2] {
        let old = mesh.replace_ztunnel(node).await.unwrap();
        predecessors.push(old);
        // The predecessor lets go of the node agent as it starts draining; it keeps relaying.
        mesh.wait_until("the predecessor to leave the node agent", Duration::from_secs(5), || async {
            mesh.agent_connections(node).await.unwrap() == 1
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(predecessors.last_mut().unwrap().running(), "node-{node}'s predecessor exited while draining");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.notify_waiters();
    let (waypoint_ticks, pod_ticks) = (through_waypoint.await.unwrap(), pod_to_pod.await.unwrap());
    let (opened, failed) = opener.await.unwrap();
    eprintln!(
        "pod to pod: {} round trips, longest gap {:?}; through the waypoint: {} round trips, longest gap {:?}; {opened} new connections",
        pod_ticks.count, pod_ticks.max_gap, waypoint_ticks.count, waypoint_ticks.max_gap
    );
    for (what, ticks) in [("pod to pod", &pod_ticks), ("through the waypoint", &waypoint_ticks)] {
        assert_eq!(ticks.error, None, "the {what} stream broke during the handover");
        assert!(ticks.max_gap < Duration::from_millis(100), "the {what} stream stalled {:?}", ticks.max_gap);
        assert!(ticks.count > 100, "the {what} stream made only {} round trips", ticks.count);
    }
    assert!(failed.is_empty(), "{} new connections failed during the handover (after {failed:?})", failed.len());
    assert!(opened > 50, "only {opened} new connections were tried");
    // The successors serve the very sockets their predecessors listened on, which no app in a pod
    // can join, even as root with SO_REUSEPORT.
    for port in [15001, 15006, 15008] {
        let squat = client.netns.ns.run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_port(true)?;
            s.set_reuse_address(true)?;
            s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())
        });
        assert_eq!(squat.unwrap_err().kind(), std::io::ErrorKind::AddrInUse, "an app joined ztunnel's port {port}");
    }
    for node in [1, 2] {
        let log = mesh.ztunnel_log(node).unwrap();
        for line in [
            "taking over from the running ztunnel",
            "serving the pod on the sockets its previous ztunnel handed over",
            "the successor serves every pod now",
        ] {
            assert!(log.contains(line), "node-{node}'s ztunnel log lacks {line:?}:\n{log}");
        }
    }

    // The successors alone serve new connections once the predecessors are gone.
    drop(predecessors);
    assert!(works(&client, &server).await, "no new connection through the successors");
    let log = mesh.ztunnel_log(1).unwrap();
    assert!(log.contains("mesh state synced; following the node agent"), "{log}");
}

/// A node agent restarted on both nodes: it comes back knowing its pods, ztunnel reconnects and
/// takes its snapshot, keeps serving every pod in place (no reset, no stall over 100 ms on a
/// long-lived stream), and new connections work after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_restart_resets_nothing() {
    let (mut mesh, client, server) = client_and_server(MeshOptions::default()).await;
    let stop = Arc::new(tokio::sync::Notify::new());
    let long = EchoClient::greet(client.connect(server.addr(8080)).await.unwrap()).await.unwrap();
    let talking = keep_talking(long, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in [1, 2] {
        mesh.restart_node_agent(node).await.unwrap();
        assert_eq!(mesh.agent_connections(node).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.notify_waiters();
    let ticks = talking.await.unwrap();
    assert_eq!(ticks.error, None, "the stream broke while the node agents restarted");
    assert!(ticks.max_gap < Duration::from_millis(100), "the stream stalled {:?}", ticks.max_gap);
    assert!(ticks.count > 50, "only {} round trips", ticks.count);
    assert!(works(&client, &server).await, "no new connection after the node agents restarted");
    for node in [1, 2] {
        let log = mesh.ztunnel_log(node).unwrap();
        assert!(log.contains("node agent closed the ZDS connection; reconnecting"), "node-{node}: {log}");
        assert!(log.contains("pod already served in this namespace"), "node-{node} re-served a pod: {log}");
        assert!(!log.contains("removing pod"), "node-{node} dropped a pod: {log}");
    }
}
