//! The inbound HBONE path with every real part but the network namespaces: a control plane (CA +
//! xDS), the certificate manager, the xDS view, the HBONE server presenting the destination pod's
//! certificate, an app behind it, and a client pool presenting the source pod's certificate.
//! Allowed traffic flows, by address and by service hostname (Istio's cross-network form); a DENY
//! policy answers 401; a dead app answers 503. Then the client side:
//! a connection to a service VIP goes through the outbound path to the app, and a destination
//! outside the mesh is passed through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ca::auth::TokenSigner;
use proto::SpiffeId;
use proto::hbone::Target;
use proto::hbone::pool::{ConnectRequest, Pool, PoolConfig, PoolError};
use proto::hbone::server::{Server, ServerConfig, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use ztunnel::certs::{CertConfig, CertManager, TokenSource};
use ztunnel::inbound::Inbound;
use ztunnel::outbound::Outbound;
use ztunnel::pod::{Loopback, Pod};
use ztunnel::xds::{MeshView, XdsClient};

use crate::support::{ISSUER, start_ca, ztunnel_token};
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";
const SERVER_IP: &str = "127.0.0.3";

async fn echo(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn objects(deny_port: u16, open_port: u16) -> String {
    let pod = |name: &str, ip: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels:\n    app: {name}\nspec:\n  nodeName: node-1\n  serviceAccountName: {name}\n  containers: []\nstatus:\n  podIP: {ip}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n{}{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-admin-port\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/demo/sa/client\"]\n      to:\n        - operation:\n            ports: [\"{deny_port}\"]\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: demo\nspec:\n  clusterIP: 10.96.0.1\n  selector:\n    app: server\n  ports:\n    - name: web\n      port: 80\n      targetPort: {open_port}\n    - name: admin\n      port: 81\n      targetPort: {deny_port}\n",
        pod("client", "127.0.0.2"),
        pod("server", SERVER_IP),
    )
}

#[tokio::test]
async fn inbound_and_outbound_paths_over_real_hbone() {
    // The apps on the "server pod".
    let open = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let open_addr = open.local_addr().unwrap();
    tokio::spawn(echo(open));
    let admin = TcpListener::bind((SERVER_IP, 0)).await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    tokio::spawn(echo(admin));
    let dead_addr: SocketAddr = {
        let l = std::net::TcpListener::bind((SERVER_IP, 0)).unwrap();
        l.local_addr().unwrap()
    };

    // Control plane.
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), objects(admin_addr.port(), open_addr.port())).unwrap();
    let signer = TokenSigner::new(ISSUER, None).unwrap();
    let ca = start_ca(dir.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;

    // ztunnel's parts.
    let (target, trust) = crate::support::target(ca.grpc, state.path());
    let token = ztunnel_token(&signer, "node-1");
    let view = MeshView::new(&ztunnel::xds::SUBSCRIBED, trust.clone());
    let xds = XdsClient {
        target: target.clone(),
        token: TokenSource::Static(token.clone()),
        node_id: "ztunnel~node-1".into(),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
    };
    let (stop_xds, rx) = oneshot::channel::<()>();
    tokio::spawn(xds.run(view.clone(), async {
        let _ = rx.await;
    }));
    let mut synced = view.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.unwrap().unwrap();
    let certs = CertManager::new(CertConfig::new(
        target,
        TokenSource::Static(token),
        "spiffe://cluster.local/ns/istio-system/sa/ztunnel".parse().unwrap(),
    ))
    .unwrap();
    let server_cred = certs.fetch(&SERVER.parse().unwrap()).await.unwrap();
    let client_cred = certs.fetch(&CLIENT.parse().unwrap()).await.unwrap();
    let ctx = crate::support::context(view.clone(), certs.clone());
    let pod = |name: &str, id: &str| {
        Arc::new(Pod {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "demo".into(),
            identity: id.parse().unwrap(),
            sockets: Arc::new(Loopback),
            cancel: CancellationToken::new(),
        })
    };

    // The server pod's inbound HBONE listener.
    let tls = proto::tls::server_config(server_cred, trust.clone(), vec!["cluster.local".into()]).unwrap();
    let listener = TcpListener::bind((SERVER_IP, 15008)).await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let config = ServerConfig { service_hostnames: true, ..ServerConfig::default() };
    let server = Server::new(listener, tls, config, Inbound::new(ctx.clone(), pod("server", SERVER))).unwrap();
    let (drain, watcher) = proto::drain::new();
    let server_task = tokio::spawn(server.run(watcher));

    let pool = Pool::new(PoolConfig::default(), trust.clone());
    let expected: Vec<SpiffeId> = vec![SERVER.parse().unwrap()];
    let request = |target: Target| {
        ConnectRequest::new(client_cred.clone(), hbone, expected.clone(), target)
            .forwarded_for("127.0.0.2:40000".parse().unwrap())
    };
    let connect = |target: Target| pool.connect(request(target));

    // Allowed: bytes flow both ways.
    let mut stream = connect(open_addr.into()).await.unwrap();
    stream.write_all(b"hello through the mesh").await.unwrap();
    let mut back = [0u8; 22];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello through the mesh");
    drop(stream);

    // Istio's cross-network form: the service by hostname and service port, resolved by the
    // destination's ztunnel to the port the pod serves it on (the service's targetPort).
    let by_name = || Target::Service { host: "hello.demo.svc.cluster.local".into(), port: 80 };
    let mut stream = connect(by_name()).await.unwrap();
    stream.write_all(b"by name").await.unwrap();
    let mut back = [0u8; 7];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"by name");
    drop(stream);
    // By name, the policy sees the port the name resolves to: the DENY on the admin port holds
    // when it is reached as service port 81 (401), as it does by address below.
    match connect(Target::Service { host: "hello.demo.svc.cluster.local".into(), port: 81 }).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("expected 401 by name on the denied port, got {other:?}"),
    }
    // A service port the service does not have, and a service the pod does not serve: 400.
    for target in [
        Target::Service { host: "hello.demo.svc.cluster.local".into(), port: 82 },
        Target::Service { host: "nothing.demo.svc.cluster.local".into(), port: 80 },
    ] {
        match connect(target.clone()).await {
            Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::BAD_REQUEST, "{target}"),
            other => panic!("expected 400 for {target}, got {other:?}"),
        }
    }

    // Denied by the DENY policy on that port: 401. Bytes sent ahead of the answer (early data)
    // are dropped with the stream: never delivered, never counted (the byte total below).
    let early = request(admin_addr.into()).early_data(bytes::Bytes::from_static(b"let me in"));
    match pool.connect(early).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("expected 401, got {other:?}"),
    }
    // Nothing listening: 503.
    match connect(dead_addr.into()).await {
        Err(PoolError::Refused { status, .. }) => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
        other => panic!("expected 503, got {other:?}"),
    }
    // And the allowed port still works afterwards, on the same pooled connection.
    let mut again = connect(open_addr.into()).await.unwrap();
    again.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    again.read_exact(&mut one).await.unwrap();
    assert_eq!(pool.connection_count(), 1);
    drop(again);
    // Istio's metrics saw it: two connections carried, one denied by policy, one failed upstream
    // (a connection is counted closed once its task has finished: wait for the last one).
    let sum_in = |metrics: &str, prefix: &str, needle: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(needle))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let metrics = proto::testing::eventually("every connection counted closed", Duration::from_secs(5), || {
        let metrics = ctx.metrics.encode();
        let closed = sum_in(&metrics, "istio_tcp_connections_closed_total{", "reporter=\"destination\"");
        std::future::ready((closed == 6).then_some(metrics))
    })
    .await;
    let sum = |prefix: &str, needle: &str| sum_in(&metrics, prefix, needle);
    assert_eq!(sum("istio_tcp_connections_opened_total{", "reporter=\"destination\""), 6, "{metrics}");
    assert_eq!(sum("istio_tcp_connections_closed_total{", "response_flags=\"DENY\""), 2, "{metrics}");
    assert_eq!(sum("istio_tcp_connections_closed_total{", "response_flags=\"CONNECT\""), 1, "{metrics}");
    assert_eq!(
        sum("istio_tcp_received_bytes_total{", "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\""),
        30,
        "{metrics}"
    );

    // The client side: a captured connection to the service VIP goes through the outbound path
    // (VIP → endpoint → HBONE with the client pod's certificate) and reaches the app.
    let outbound = Outbound::new(ctx.clone(), pod("client", CLIENT));
    let capture = TcpListener::bind(("127.0.0.2", 0)).await.unwrap();
    let capture_addr = capture.local_addr().unwrap();
    let ob = outbound.clone();
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    let (size_tx, size_rx) = oneshot::channel();
    let (spoke_tx, spoke) = oneshot::channel();
    // Each outbound connection holds its pod's drain watcher.
    let (_pod_drain, pod_watcher) = proto::drain::new();
    let w = pod_watcher.guard();
    tokio::spawn(async move {
        let (downstream, client) = capture.accept().await.unwrap();
        // Taken up once the app has spoken: its bytes wait in the socket and go with the CONNECT.
        spoke.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let connection = ob.connection(downstream, client, Some(vip), w);
        let _ = size_tx.send(std::mem::size_of_val(&connection));
        connection.await;
    });
    let mut app = tokio::net::TcpStream::connect(capture_addr).await.unwrap();
    app.write_all(b"via the VIP").await.unwrap();
    spoke_tx.send(()).unwrap();
    let mut back = [0u8; 11];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"via the VIP");
    drop(app);
    // Those bytes went ahead of the CONNECT's answer (early data) and count as sent all the same.
    let source_bytes = proto::testing::eventually("the VIP connection counted closed", Duration::from_secs(5), || {
        let metrics = ctx.metrics.encode();
        let closed = sum_in(&metrics, "istio_tcp_connections_closed_total{", "reporter=\"source\"");
        std::future::ready((closed == 1).then(|| {
            [
                sum_in(&metrics, "istio_tcp_received_bytes_total{", "reporter=\"source\""),
                sum_in(&metrics, "istio_tcp_sent_bytes_total{", "reporter=\"source\""),
            ]
        }))
    })
    .await;
    assert_eq!(source_bytes, [11, 11], "client → server, server → client");
    // What each open connection's task holds for as long as it lives: the set-up is boxed away and
    // the copy stored once (it was 2,584 bytes when the set-up and a plain copy lived in it, 728
    // with the set-up's results kept beside the copy). With tokio's task header this is a 640-byte
    // allocation.
    let size = size_rx.await.unwrap();
    assert!(size <= 472, "an outbound connection's task future takes {size} bytes");
    // The same for each inbound stream's task (a 768-byte allocation while it kept the request's
    // emptied box, a disabled span and 32 bytes more of connection record).
    let size = proto::hbone::server::stream_task_size::<Inbound>();
    assert!(size <= 472, "an inbound stream's task future takes {size} bytes");

    // A destination outside the mesh is passed through in plaintext.
    let outside = TcpListener::bind(("127.0.0.9", 0)).await.unwrap();
    let outside_addr = outside.local_addr().unwrap();
    tokio::spawn(echo(outside));
    let capture = TcpListener::bind(("127.0.0.2", 0)).await.unwrap();
    let capture_addr = capture.local_addr().unwrap();
    let ob = outbound.clone();
    tokio::spawn(async move {
        let (downstream, client) = capture.accept().await.unwrap();
        ob.connection(downstream, client, Some(outside_addr), pod_watcher.guard()).await;
    });
    let mut app = tokio::net::TcpStream::connect(capture_addr).await.unwrap();
    app.write_all(b"plain").await.unwrap();
    let mut back = [0u8; 5];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"plain");

    drain.drain(Duration::from_secs(1)).await;
    server_task.abort();
    stop_xds.send(()).unwrap();
    ca.stop().await;
}
