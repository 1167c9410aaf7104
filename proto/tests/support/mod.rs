//! Shared harness for the HBONE integration tests: servers with real certificates from a throwaway
//! CA, upstream TCP services, and a local "outbound" listener that tunnels through the pool the way
//! a node proxy does.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use proto::drain::{self, DrainTrigger};
use proto::hbone::copy_bidirectional;
use proto::hbone::pool::{ConnectRequest, Pool};
use proto::hbone::server::{Handler, InboundConnect, Server, ServerConfig};
use proto::identity::SpiffeId;
use proto::testing::TestCa;
use proto::tls::{Credential, SharedTrustBundle, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TD: &str = "cluster.local";

pub fn id(s: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/test/sa/{s}").parse().unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// What a handler saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer_identity: SpiffeId,
    pub peer_addr: SocketAddr,
    pub target: proto::hbone::Target,
    pub headers: HeaderMap,
}

/// Records each request, then forwards it to its target over TCP (503 when that fails), like a
/// node proxy's inbound side.
#[derive(Debug, Default)]
pub struct Forward {
    pub seen: Mutex<Vec<Seen>>,
}

impl Forward {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for Forward {
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send {
        self.seen.lock().unwrap().push(Seen {
            peer_identity: connect.peer_identity.clone(),
            peer_addr: connect.peer_addr,
            target: connect.target.clone(),
            headers: connect.headers.clone(),
        });
        async move {
            let Some(Ok(upstream)) = connect_to(connect.target.addr()).await else {
                connect.reject(http::StatusCode::SERVICE_UNAVAILABLE);
                return;
            };
            // (A client that reset the stream meanwhile gets nothing.)
            let Ok(stream) = connect.accept() else { return };
            let _ = copy_bidirectional(upstream, stream).await;
        }
    }
}

async fn connect_to(target: Option<SocketAddr>) -> Option<std::io::Result<TcpStream>> {
    Some(TcpStream::connect(target?).await)
}

/// A handler from a closure.
#[derive(Debug)]
pub struct FnHandler<F>(pub F);

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(InboundConnect) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send {
        (self.0)(connect)
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub credential: Arc<Credential>,
    pub trust: Arc<SharedTrustBundle>,
    drain: Option<DrainTrigger>,
}

impl TestServer {
    pub async fn start<H: Handler>(
        credential: Arc<Credential>,
        trust: Arc<SharedTrustBundle>,
        config: ServerConfig,
        handler: Arc<H>,
    ) -> TestServer {
        let tls = server_config(credential.clone(), trust.clone(), vec![TD.to_owned()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Server::new(listener, tls, config, handler).unwrap();
        let addr = server.local_addr();
        let (trigger, watcher) = drain::new();
        tokio::spawn(server.run(watcher));
        TestServer { addr, credential, trust, drain: Some(trigger) }
    }

    pub async fn shutdown(mut self) -> drain::DrainOutcome {
        self.drain.take().unwrap().drain(Duration::from_secs(5)).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Dropping the trigger signals the watchers: the server stops with the test.
        self.drain.take();
    }
}

/// A TCP service that echoes until EOF, then half-closes.
pub async fn echo_upstream() -> SocketAddr {
    echo_upstream_on("127.0.0.1".parse().unwrap()).await
}

/// [`echo_upstream`] on a given loopback address.
pub async fn echo_upstream_on(ip: std::net::IpAddr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A local listener that tunnels each accepted connection through `pool` with `request`, the way a
/// node proxy's outbound side does.
pub async fn outbound_listener(pool: Pool, request: ConnectRequest) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((app, client)) = listener.accept().await {
            let pool = pool.clone();
            let request = request.clone().forwarded_for(client);
            tokio::spawn(async move {
                match pool.connect(request).await {
                    Ok(tunnel) => {
                        let _ = copy_bidirectional(app, tunnel).await;
                    }
                    Err(e) => tracing::info!(error = %e, "outbound tunnel failed"),
                }
            });
        }
    });
    addr
}

/// A fresh CA with a server credential for `server_sa`.
pub fn ca_and_server(server_sa: &str) -> (TestCa, Arc<Credential>, Arc<SharedTrustBundle>) {
    let ca = TestCa::new();
    let cred = ca.credential(id(server_sa).as_str());
    let trust = ca.shared_bundle();
    (ca, cred, trust)
}

/// Reads until EOF with a deadline.
pub async fn read_to_end_timeout(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut out)).await.expect("timed out waiting for EOF").unwrap();
    out
}

/// The common setup: a CA, an HBONE server for `sa/server` that forwards to the target, and a pool
/// trusting the same CA.
pub struct Fixture {
    pub ca: TestCa,
    pub server: TestServer,
    pub forward: Arc<Forward>,
    pub pool: Pool,
}

impl Fixture {
    pub async fn new() -> Fixture {
        Self::with(ServerConfig::default(), proto::hbone::pool::PoolConfig::default()).await
    }

    pub async fn with(server: ServerConfig, pool: proto::hbone::pool::PoolConfig) -> Fixture {
        let (ca, cred, trust) = ca_and_server("server");
        let forward = Arc::new(Forward::default());
        let server = TestServer::start(cred, trust.clone(), server, forward.clone()).await;
        Fixture { ca, server, forward, pool: Pool::new(pool, trust) }
    }

    /// A `CONNECT` from `client_sa` to `target`, through the server.
    pub fn request(&self, client_sa: &str, target: SocketAddr) -> ConnectRequest {
        ConnectRequest::new(self.ca.credential(id(client_sa).as_str()), self.server.addr, vec![id("server")], target)
    }

    /// An application connection that the mesh carries to `target` (via an outbound listener).
    pub async fn app_connection(&self, client_sa: &str, target: SocketAddr) -> TcpStream {
        let outbound = outbound_listener(self.pool.clone(), self.request(client_sa, target)).await;
        TcpStream::connect(outbound).await.unwrap()
    }
}

/// A TCP service that accepts one connection and runs `serve` on it.
pub async fn one_shot_upstream<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        serve(s).await;
    });
    addr
}

/// An mTLS connection to `server` as `sa/<client_sa>`, for tests that speak raw HTTP/2 bytes.
pub async fn raw_tls(ca: &TestCa, server: &TestServer, client_sa: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls =
        proto::tls::client_config(ca.credential(id(client_sa).as_str()), server.trust.clone(), vec![id("server")])
            .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(rustls_pki_types::ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap()
}
