//! HBONE end to end over loopback, with real certificates: data integrity, half-close, pooling,
//! request validation and status codes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use proto::hbone::pool::{ConnectRequest, Dialer, Pool, PoolConfig, PoolError, PoolKey, TcpDialer};
use proto::hbone::server::ServerConfig;
use proto::hbone::{Baggage, Target, TraceParent};
use proto::testing::eventually;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

const WAIT: Duration = Duration::from_secs(20);

/// Pseudo-random bytes, cheap to produce at GiB scale.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_arrives_byte_identical() {
    init_tracing();
    const TOTAL: usize = 1 << 30;
    let mesh = Fixture::new().await;
    // Upstream: hash everything received, then answer with the count and digest, and close.
    let upstream = one_shot_upstream(|mut s| async move {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        s.write_all(&total.to_le_bytes()).await.unwrap();
        s.write_all(&hasher.finalize()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;

    let mut app = mesh.app_connection("client", upstream).await;
    let mut hasher = Sha256::new();
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0;
    while sent < TOTAL {
        fill(&mut buf, &mut state);
        hasher.update(&buf);
        app.write_all(&buf).await.unwrap();
        sent += buf.len();
    }
    app.shutdown().await.unwrap();
    let reply = read_to_end_timeout(&mut app, Duration::from_secs(120)).await;
    assert_eq!(reply.len(), 8 + 32, "upstream reply: {reply:?}");
    assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), TOTAL as u64);
    assert_eq!(&reply[8..], hasher.finalize().as_slice(), "digest of received bytes differs");
}

#[tokio::test]
async fn half_close_from_client_still_delivers_the_reply() {
    init_tracing();
    let mesh = Fixture::new().await;
    // Upstream reads to EOF, and only then answers: it needs the client's FIN to arrive while the
    // reverse direction stays open.
    let upstream = one_shot_upstream(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got)).as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let mut app = mesh.app_connection("client", upstream).await;
    app.write_all(b"hello").await.unwrap();
    app.shutdown().await.unwrap();
    let reply = read_to_end_timeout(&mut app, WAIT).await;
    assert_eq!(reply, b"got 5 bytes: hello");
}

#[tokio::test]
async fn half_close_from_server_still_accepts_client_data() {
    init_tracing();
    let mesh = Fixture::new().await;
    // Upstream greets, half-closes at once, then keeps reading until the client is done.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let upstream = one_shot_upstream(|mut s| async move {
        s.write_all(b"bye").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        tx.send(got).unwrap();
    })
    .await;
    let mut app = mesh.app_connection("client", upstream).await;
    // The server's FIN reaches the app as EOF...
    let greeting = read_to_end_timeout(&mut app, WAIT).await;
    assert_eq!(greeting, b"bye");
    // ...and the app can still send afterwards.
    app.write_all(b"late data").await.unwrap();
    app.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    assert_eq!(got, b"late data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_use_the_fewest_connections() {
    init_tracing();
    const STREAMS: usize = 1000;
    const PER_CONN: u32 = 100;
    let (ca, server_cred, trust) = ca_and_server("server");

    // Each stream waits until all 1,000 are open at once, then echoes: the streams are truly
    // concurrent, so the pool cannot satisfy them by reuse over time.
    let barrier = Arc::new(Barrier::new(STREAMS));
    let conns = Arc::new(std::sync::Mutex::new(HashSet::<SocketAddr>::new()));
    let handler = {
        let (barrier, conns) = (barrier.clone(), conns.clone());
        FnHandler(move |connect: proto::hbone::server::InboundConnect| {
            let (barrier, conns) = (barrier.clone(), conns.clone());
            async move {
                conns.lock().unwrap().insert(connect.peer_addr);
                let mut stream = connect.accept().unwrap();
                barrier.wait().await;
                let mut buf = [0u8; 1024];
                stream.read_exact(&mut buf).await.unwrap();
                stream.write_all(&buf).await.unwrap();
                stream.shutdown().await.unwrap();
            }
        })
    };
    let server = TestServer::start(server_cred, trust.clone(), ServerConfig::default(), Arc::new(handler)).await;
    let config = PoolConfig { max_streams_per_conn: PER_CONN, ..PoolConfig::default() };
    let pool = Pool::new(config, trust);
    let cred = ca.credential(id("client").as_str());
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let pool = pool.clone();
        let request = ConnectRequest::new(cred.clone(), server.addr, vec![id("server")], target);
        tasks.push(tokio::spawn(async move {
            let mut stream = pool.connect(request).await.unwrap();
            let payload = [(i % 251) as u8; 1024];
            stream.write_all(&payload).await.unwrap();
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, payload);
        }));
    }
    let all = futures_util::future::join_all(tasks);
    for result in tokio::time::timeout(Duration::from_secs(60), all).await.expect("streams did not complete") {
        result.unwrap();
    }
    let used = conns.lock().unwrap().len();
    assert_eq!(used, STREAMS / PER_CONN as usize, "server saw {used} connections");
    assert_eq!(pool.connection_count(), STREAMS / PER_CONN as usize);
}

#[tokio::test]
async fn source_identities_never_share_a_connection() {
    init_tracing();
    let mesh = Fixture::new().await;
    let upstream = echo_upstream().await;
    for sa in ["alice", "bob", "alice", "bob"] {
        let mut s = mesh.pool.connect(mesh.request(sa, upstream)).await.unwrap();
        s.write_all(sa.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(read_to_end_timeout(&mut s, WAIT).await, sa.as_bytes());
    }
    let seen = mesh.forward.seen();
    assert_eq!(seen.len(), 4);
    let mut by_conn = std::collections::HashMap::new();
    for s in &seen {
        by_conn.entry(s.peer_addr).or_insert_with(HashSet::new).insert(s.peer_identity.clone());
    }
    assert_eq!(by_conn.len(), 2, "expected one connection per identity: {by_conn:?}");
    assert!(by_conn.values().all(|ids| ids.len() == 1), "a connection carried two identities: {by_conn:?}");
    assert_eq!(mesh.pool.connection_count(), 2);
}

#[derive(Debug, Default)]
struct CountingDialer(AtomicUsize);

impl Dialer for CountingDialer {
    fn dial<'a>(
        &'a self,
        key: &'a PoolKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send + 'a>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            // Under test: a slow dial, so that the 50 callers arrive while it is under way.
            tokio::time::sleep(Duration::from_millis(50)).await;
            TcpDialer.dial(key).await
        })
    }
}

#[tokio::test]
async fn concurrent_callers_share_one_dial_and_its_failure() {
    init_tracing();
    let ca = proto::testing::TestCa::new();
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let dialer = Arc::new(CountingDialer::default());
    let pool = Pool::with_dialer(PoolConfig::default(), ca.shared_bundle(), dialer.clone());
    let cred = ca.credential(id("client").as_str());
    let attempts = (0..50).map(|_| {
        let req = ConnectRequest::new(cred.clone(), closed, vec![id("server")], closed);
        let pool = pool.clone();
        async move { pool.connect(req).await }
    });
    let results = futures_util::future::join_all(attempts).await;
    assert!(results.iter().all(|r| matches!(r, Err(PoolError::Connect { .. }))), "{results:?}");
    assert_eq!(dialer.0.load(Ordering::SeqCst), 1, "50 concurrent callers must share one dial");
    assert_eq!(pool.connection_count(), 0);
}

#[tokio::test]
async fn idle_connections_are_closed_and_forgotten() {
    init_tracing();
    let config = PoolConfig { idle_timeout: Duration::from_millis(300), ..PoolConfig::default() };
    let mesh = Fixture::with(ServerConfig::default(), config).await;
    let upstream = echo_upstream().await;

    let mut s = mesh.pool.connect(mesh.request("client", upstream)).await.unwrap();
    // Under test: while a stream is open the connection stays, even past its idle timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(mesh.pool.connection_count(), 1);
    s.write_all(b"x").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end_timeout(&mut s, WAIT).await, b"x");
    drop(s);

    eventually("the idle connection to be evicted", Duration::from_secs(5), || async {
        (mesh.pool.connection_count() == 0).then_some(())
    })
    .await;
    // A new stream dials afresh.
    let mut s = mesh.pool.connect(mesh.request("client", upstream)).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = read_to_end_timeout(&mut s, WAIT).await;
    let conns: HashSet<_> = mesh.forward.seen().iter().map(|s| s.peer_addr).collect();
    assert_eq!(conns.len(), 2, "the second stream should have used a new connection");
}

#[tokio::test]
async fn request_headers_reach_the_server() {
    init_tracing();
    let mesh = Fixture::new().await;
    let upstream = echo_upstream().await;
    let trace = TraceParent::random(true);
    let baggage = Baggage {
        namespace: Some("test".into()),
        workload: Some(("deployment".into(), "client".into())),
        service_name: Some("client".into()),
        service_version: Some("v1".into()),
        ..Default::default()
    };
    let client_addr: SocketAddr = "10.1.2.3:45678".parse().unwrap();
    let req = mesh.request("client", upstream).forwarded_for(client_addr).baggage(&baggage).traceparent(trace);
    let mut s = mesh.pool.connect(req).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = read_to_end_timeout(&mut s, WAIT).await;

    let seen = mesh.forward.seen();
    let h = &seen[0].headers;
    assert_eq!(seen[0].peer_identity, id("client"));
    assert_eq!(seen[0].target, upstream.into());
    assert_eq!(h["forwarded"], "for=\"10.1.2.3:45678\"");
    assert_eq!(proto::hbone::parse_forwarded_for(h["forwarded"].to_str().unwrap()), Some(client_addr.ip()));
    assert_eq!(Baggage::parse(h["baggage"].to_str().unwrap()), baggage);
    assert_eq!(TraceParent::parse(h["traceparent"].to_str().unwrap()), Some(trace));
}

#[tokio::test]
async fn handler_statuses_reach_the_client() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let handler = FnHandler(|connect: proto::hbone::server::InboundConnect| async move {
        match connect.target.port() {
            401 => connect.reject(StatusCode::UNAUTHORIZED),
            // Dropped without an answer: the server must answer 503 itself.
            _ => drop(connect),
        }
    });
    let server = TestServer::start(server_cred, trust.clone(), ServerConfig::default(), Arc::new(handler)).await;
    let pool = Pool::new(PoolConfig::default(), trust);
    let cred = ca.credential(id("client").as_str());
    for (port, status) in [(401, StatusCode::UNAUTHORIZED), (503, StatusCode::SERVICE_UNAVAILABLE)] {
        let target = SocketAddr::new(server.addr.ip(), port);
        let err =
            pool.connect(ConnectRequest::new(cred.clone(), server.addr, vec![id("server")], target)).await.unwrap_err();
        match err {
            PoolError::Refused { status: got, target: t, .. } => {
                assert_eq!(got, status);
                assert_eq!(t, target.into());
            }
            other => panic!("expected a refusal with {status}, got {other}"),
        }
    }
    // Refusals do not poison the connection.
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test]
async fn a_connect_never_answered_fails_at_the_deadline() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    // Takes the stream and never answers (until the test ends); notes the connection it came on.
    let seen_from = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let seen = seen_from.clone();
    let handler = FnHandler(move |connect: proto::hbone::server::InboundConnect| {
        seen.lock().unwrap().insert(connect.peer_addr);
        async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(connect);
        }
    });
    let server = TestServer::start(server_cred, trust.clone(), ServerConfig::default(), Arc::new(handler)).await;
    let limit = Duration::from_millis(300);
    let pool = Pool::new(PoolConfig { connect_timeout: limit, ..PoolConfig::default() }, trust);
    let target = SocketAddr::new(server.addr.ip(), 8080);
    let request = ConnectRequest::new(ca.credential(id("client").as_str()), server.addr, vec![id("server")], target);
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), pool.connect(request)).await;
    let err = outcome.expect("the pool waited past its deadline for the CONNECT's answer").unwrap_err();
    match err {
        PoolError::Unanswered { target: t, after, .. } => {
            assert_eq!((t, after), (target.into(), limit));
        }
        other => panic!("expected the CONNECT to go unanswered, got {other}"),
    }
    assert!(started.elapsed() >= limit, "gave up before the deadline: {:?}", started.elapsed());
    // The connection that left it unanswered takes no new stream (its peer or the path may be
    // gone): the next CONNECT dials another.
    assert_eq!(pool.connection_count(), 0);
    let again = ConnectRequest::new(ca.credential(id("client").as_str()), server.addr, vec![id("server")], target);
    let err = pool.connect(again).await.unwrap_err();
    assert!(matches!(err, PoolError::Unanswered { .. }), "{err}");
    assert_eq!(seen_from.lock().unwrap().len(), 2, "the second CONNECT came on the first connection");
}

/// A client's first bytes go right behind its `CONNECT` (early data): the server has them before it
/// answers; a stream a draining server refuses is sent again, bytes and all, on another connection;
/// the copy counts them as sent. (A plain HTTP/2 server here, to look before answering.)
#[tokio::test]
async fn early_data_arrives_before_the_answer_and_again_on_a_retry() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let tls = tokio_rustls::TlsAcceptor::from(
        proto::tls::server_config(server_cred, trust.clone(), vec![TD.to_owned()]).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for refuse in [true, false] {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tls.accept(tcp).await.unwrap()).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            // Nothing is answered yet: what arrives now was sent ahead of the answer.
            let mut body = request.into_body();
            let first = match tokio::time::timeout(Duration::from_secs(5), body.data()).await {
                Ok(Some(Ok(data))) => data,
                _ => bytes::Bytes::new(),
            };
            seen_tx.send(first.clone()).unwrap();
            if refuse {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            let mut send = respond.send_response(http::Response::new(()), false).unwrap();
            let reply = format!("got {}", String::from_utf8_lossy(&first));
            send.send_data(bytes::Bytes::from(reply), true).unwrap();
            // Held until the client ends its side.
            while let Some(Ok(_)) = body.data().await {}
        }
    });

    let pool = Pool::new(PoolConfig::default(), trust);
    let target = SocketAddr::new(addr.ip(), 8080);
    let request = ConnectRequest::new(ca.credential(id("client").as_str()), addr, vec![id("server")], target)
        .early_data(bytes::Bytes::from_static(b"hello"));
    let tunnel = tokio::time::timeout(WAIT, pool.connect(request)).await.expect("no answer").unwrap();
    assert_eq!(seen.recv().await.unwrap(), &b"hello"[..], "the refused stream carried no early data");
    assert_eq!(seen.recv().await.unwrap(), &b"hello"[..], "the retried stream carried no early data");
    assert_eq!(tunnel.sent_early(), 5);

    // The application side sends nothing more: the copy still counts the 5 bytes as sent.
    let app_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(app_listener.local_addr().unwrap()).await.unwrap();
    let (proxied, _) = app_listener.accept().await.unwrap();
    app.shutdown().await.unwrap();
    let copy = tokio::spawn(proto::hbone::copy_bidirectional(proxied, tunnel));
    assert_eq!(read_to_end_timeout(&mut app, WAIT).await, b"got hello");
    let moved = tokio::time::timeout(WAIT, copy).await.unwrap().unwrap().unwrap();
    assert_eq!((moved.sent, moved.received), (5, 9));
}

/// Sends one request over a raw mTLS + HTTP/2 connection and returns its status.
async fn raw_request(
    ca: &proto::testing::TestCa,
    server: &TestServer,
    method: Method,
    uri: &str,
) -> Result<StatusCode, h2::Error> {
    let (mut send, conn) = h2::client::handshake(raw_tls(ca, server, "raw").await).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri.parse().unwrap();
    let (resp, _stream) = send.send_request(req, false)?;
    Ok(resp.await?.status())
}

#[tokio::test]
async fn invalid_requests_get_400_and_calls_to_mesh_ports_503() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let forward = Arc::new(Forward::default());
    let server = TestServer::start(server_cred, trust, ServerConfig::default(), forward.clone()).await;
    let port = server.addr.port();
    let (bad, own) = (StatusCode::BAD_REQUEST, StatusCode::SERVICE_UNAVAILABLE);
    let cases = [
        (Method::GET, format!("http://127.0.0.1:{port}/"), bad),
        (Method::POST, format!("https://127.0.0.1:{port}/x"), bad),
        // Not ip:port.
        (Method::CONNECT, "example.com:80".to_owned(), bad),
        // Not the address the connection landed on.
        (Method::CONNECT, "127.0.0.2:80".to_owned(), bad),
        // Mesh ports: a call to the proxy itself, answered as Istio's ztunnel answers it.
        (Method::CONNECT, "127.0.0.1:15008".to_owned(), own),
        (Method::CONNECT, "127.0.0.1:15001".to_owned(), own),
        (Method::CONNECT, "127.0.0.1:15000".to_owned(), own),
    ];
    for (method, uri, want) in cases {
        let status = raw_request(&ca, &server, method.clone(), &uri).await.unwrap();
        assert_eq!(status, want, "{method} {uri}");
    }
    assert!(forward.seen().is_empty(), "an invalid request reached the handler");
}

#[tokio::test]
async fn waypoint_mode_accepts_authorities_for_other_addresses() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let forward = Arc::new(Forward::default());
    let config = ServerConfig { require_local_authority: false, ..ServerConfig::default() };
    let server = TestServer::start(server_cred, trust, config, forward.clone()).await;
    // 127.0.0.2 is not where the connection landed, but a waypoint serves other addresses.
    let target = echo_upstream_on("127.0.0.2".parse().unwrap()).await;
    let status = raw_request(&ca, &server, Method::CONNECT, &target.to_string()).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(forward.seen().len(), 1);
    assert_eq!(forward.seen()[0].target, target.into());
}

/// A `hostname:port` authority is refused (400) unless the server is configured to let its
/// handler resolve service hostnames, which then sees exactly the name and service port sent.
#[tokio::test]
async fn service_hostname_authorities_only_where_configured() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let forward = Arc::new(Forward::default());
    let server = TestServer::start(server_cred.clone(), trust.clone(), ServerConfig::default(), forward.clone()).await;
    let status = raw_request(&ca, &server, Method::CONNECT, "hello.demo.svc.cluster.local:8080").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(forward.seen().is_empty(), "the handler saw a refused request");

    let config = ServerConfig { service_hostnames: true, ..ServerConfig::default() };
    let resolving = Arc::new(Forward::default());
    let server = TestServer::start(server_cred, trust, config, resolving.clone()).await;
    // The test handler cannot resolve names: it answers 503, after seeing the request.
    let status = raw_request(&ca, &server, Method::CONNECT, "hello.demo.svc.cluster.local:8080").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let seen = resolving.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, Target::Service { host: "hello.demo.svc.cluster.local".into(), port: 8080 });
    // Malformed names are refused by the server whatever the handler could do.
    for bad in ["Hello.demo:8080", "hello_demo:8080", "hello.demo:0", "10.0.0.300:80"] {
        let status = raw_request(&ca, &server, Method::CONNECT, bad).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(resolving.seen().len(), 1);
}

/// A drain sends GOAWAY (seen by the client as a refusal of new streams on the connection it
/// has), lets the stream that was open finish its exchange, then stops: new connections are
/// refused at the TCP level because the listener is closed.
#[tokio::test]
async fn drain_sends_goaway_but_lets_open_streams_finish() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let server = TestServer::start(server_cred, trust, ServerConfig::default(), Arc::new(Forward::default())).await;
    let upstream = echo_upstream().await;
    let addr = server.addr;
    let (send, conn) = h2::client::handshake(raw_tls(&ca, &server, "client").await).await.unwrap();
    let conn = tokio::spawn(conn);
    let connect = |target: SocketAddr| {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = target.to_string().parse().unwrap();
        req
    };
    let (resp, mut to_app) = send.clone().ready().await.unwrap().send_request(connect(upstream), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut from_app = resp.into_body();

    let drained = tokio::spawn(server.shutdown());
    // The GOAWAY arrives: the client may open no new stream on this connection. (Probes sent
    // before it arrives go to a closed port and end at once with 503.)
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let refusal = eventually("the server's GOAWAY", WAIT, || {
        let send = send.clone();
        async move {
            match send.ready().await {
                Err(e) => Some(e),
                Ok(mut ready) => ready.send_request(connect(closed), true).err(),
            }
        }
    })
    .await;
    assert!(refusal.is_go_away() && refusal.is_remote(), "not a GOAWAY from the server: {refusal:?}");
    assert_eq!(refusal.reason(), Some(h2::Reason::NO_ERROR), "{refusal:?}");

    // The open stream still carries data both ways, to its end.
    to_app.send_data(bytes::Bytes::from_static(b"still here"), true).unwrap();
    let mut echoed = Vec::new();
    while let Some(chunk) = tokio::time::timeout(WAIT, from_app.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        from_app.flow_control().release_capacity(chunk.len()).unwrap();
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"still here");
    drop((to_app, from_app, send));

    // Then the drain completes, the connection ends cleanly and the listener is gone.
    assert_eq!(tokio::time::timeout(WAIT, drained).await.unwrap().unwrap(), proto::drain::DrainOutcome::Complete);
    tokio::time::timeout(WAIT, conn).await.unwrap().unwrap().unwrap();
    let refused = TcpStream::connect(addr).await.expect_err("the listener still accepts after the drain");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
}

#[tokio::test]
async fn tunnel_stream_works_as_async_read_write() {
    init_tracing();
    let mesh = Fixture::new().await;
    let upstream = echo_upstream().await;
    let mut s = mesh.pool.connect(mesh.request("client", upstream)).await.unwrap();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let writer = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    assert_eq!(back.len(), data.len());
    assert!(back == data);
}

#[tokio::test]
async fn tunnel_sockets_use_tcp_keepalive_and_nodelay() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let key = PoolKey {
        src_identity: id("client"),
        src_ip: Some("127.0.0.1".parse().unwrap()),
        dst: listener.local_addr().unwrap(),
        dst_identities: vec![id("server")].into(),
    };
    let dialed = TcpDialer.dial(&key).await.unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    proto::hbone::configure_socket(&accepted).unwrap();
    for s in [&dialed, &accepted] {
        let sock = socket2::SockRef::from(s);
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE off");
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
        assert!(s.nodelay().unwrap());
    }
    assert_eq!(dialed.local_addr().unwrap().ip(), key.src_ip.unwrap());
}

/// A stream the client resets before it is answered cancels the work the handler was doing for
/// it (here: a dial that would never finish), and a client that opens and resets streams in a
/// loop is cut off with GOAWAY `ENHANCE_YOUR_CALM` while the server keeps serving others.
#[tokio::test]
async fn a_reset_stream_cancels_its_work_and_rapid_reset_is_cut_off() {
    init_tracing();
    let (ca, server_cred, trust) = ca_and_server("server");
    let started = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    struct CountDrop(Arc<AtomicUsize>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let (s, c) = (started.clone(), cancelled.clone());
    let handler = FnHandler(move |mut connect: proto::hbone::server::InboundConnect| {
        let (s, c) = (s.clone(), c.clone());
        async move {
            if connect.target.port() == 1 {
                return connect.reject(StatusCode::UNAUTHORIZED);
            }
            // Work that only ends when cancelled.
            let work = async move {
                let _guard = CountDrop(c);
                s.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            };
            assert!(connect.until_reset(work).await.is_none(), "the work finished, yet it never ends");
        }
    });
    let config = ServerConfig { max_early_resets: 20, ..ServerConfig::default() };
    let server = TestServer::start(server_cred, trust.clone(), config, Arc::new(handler)).await;

    let (mut send, conn) = h2::client::handshake(raw_tls(&ca, &server, "raw").await).await.unwrap();
    let conn = tokio::spawn(conn);
    let connect = |port: u16| {
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = format!("{}:{port}", server.addr.ip()).parse().unwrap();
        req
    };
    // One stream, reset once its work has started: the work is dropped.
    let (_resp, mut stream) = send.send_request(connect(9), false).unwrap();
    eventually("the handler to start its work", WAIT, || async { (started.load(Ordering::SeqCst) == 1).then_some(()) })
        .await;
    stream.send_reset(h2::Reason::CANCEL);
    eventually("the reset to cancel the handler's work", WAIT, || async {
        (cancelled.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    // Open and reset in a loop: cut off after max_early_resets, with ENHANCE_YOUR_CALM.
    let mut opened = 1;
    let cut = loop {
        match send.clone().ready().await {
            Ok(mut ready) => match ready.send_request(connect(9), false) {
                Ok((_resp, mut stream)) => {
                    opened += 1;
                    // Let the server start the work, then reset.
                    let before = started.load(Ordering::SeqCst);
                    // (Once the connection is cut off no work starts: give up waiting after 1 s.)
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        eventually("the work to start", WAIT, || async {
                            (started.load(Ordering::SeqCst) != before).then_some(())
                        }),
                    )
                    .await;
                    stream.send_reset(h2::Reason::CANCEL);
                }
                Err(e) => break e,
            },
            Err(e) => break e,
        }
        assert!(opened < 200, "never cut off after {opened} reset streams");
    };
    let ended = tokio::time::timeout(WAIT, conn).await.unwrap().unwrap();
    let reason = format!("{cut:?} {ended:?}");
    assert!(reason.contains("ENHANCE_YOUR_CALM"), "{reason}");
    assert!((21..=30).contains(&opened), "cut off after {opened} streams");
    // Every started piece of work was cancelled, none leaked.
    eventually("every started piece of work to be cancelled", WAIT, || async {
        (started.load(Ordering::SeqCst) == cancelled.load(Ordering::SeqCst)).then_some(())
    })
    .await;
    // Other clients are still served.
    assert_eq!(
        raw_request(&ca, &server, Method::CONNECT, &format!("{}:1", server.addr.ip())).await.unwrap(),
        StatusCode::UNAUTHORIZED
    );
}
