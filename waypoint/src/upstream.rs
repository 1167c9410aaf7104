//! Requests to endpoint pods, each over HBONE.
//!
//! The HTTP clients (hyper-util's pooled client, one for HTTP/1.1 and one for HTTP/2 with prior
//! knowledge for gRPC, per downstream client) keep idle keep-alive connections per endpoint; each
//! new connection is an HBONE tunnel from [`Connector`]: a `CONNECT <pod ip>:<port>` stream on a
//! pooled mutual-TLS HTTP/2 connection to the pod's `:15008`, presenting the waypoint's
//! certificate, accepting only the pod's own identity, and naming the original client in
//! `forwarded`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proto::hbone::pool::{ConnectRequest, Pool};
use proto::hbone::{H2Stream, HBONE_PORT};
use proto::tls::Credential;
use proto::xds::MeshView;

/// Bodies on both sides of the proxy.
pub type Body = BoxBody<Bytes, BoxError>;
/// Errors inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens an HBONE tunnel for each new upstream connection.
#[derive(Debug, Clone)]
pub struct Connector {
    view: Arc<MeshView>,
    pool: Pool,
    credential: Arc<Credential>,
    /// The original client, passed on in each tunnel's `forwarded` header: the endpoint's ztunnel
    /// believes it from this waypoint (and only from it) and shows it to the app.
    client: Option<IpAddr>,
}

/// An HBONE tunnel as a hyper connection.
#[derive(Debug)]
pub struct Tunnel(TokioIo<H2Stream>);

impl Connection for Tunnel {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Why no tunnel was opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URI is not `http://<ip>:<port>`.
    #[error("upstream URI {0} is not http://<ip>:<port>")]
    BadUri(String),
    /// No workload has the address.
    #[error("no workload has the address {0}")]
    UnknownEndpoint(IpAddr),
    /// The HBONE connection or CONNECT failed.
    #[error(transparent)]
    Hbone(#[from] proto::hbone::pool::PoolError),
}

impl Connector {
    /// A connector presenting `credential`.
    pub fn new(view: Arc<MeshView>, pool: Pool, credential: Arc<Credential>) -> Self {
        Connector { view, pool, credential, client: None }
    }

    /// The same connector, for traffic of `client`.
    pub fn for_client(&self, client: Option<IpAddr>) -> Connector {
        Connector { client, ..self.clone() }
    }

    async fn open(self, uri: Uri) -> Result<Tunnel, ConnectError> {
        let bad = || ConnectError::BadUri(uri.to_string());
        let host = uri.host().ok_or_else(bad)?.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = host.parse().map_err(|_| bad())?;
        let port = uri.port_u16().ok_or_else(bad)?;
        Ok(Tunnel(TokioIo::new(self.tunnel(ip, port).await?)))
    }

    /// Opens an HBONE tunnel to `port` of the pod at `ip`, accepting only the pod's identity; or,
    /// when `ip` is the VIP of a service with a waypoint, to a pod of that waypoint (accepting only
    /// its identity) for the VIP and port, as a ztunnel sends a client's traffic.
    pub async fn tunnel(&self, ip: IpAddr, port: u16) -> Result<H2Stream, ConnectError> {
        let (peer, hbone_port) = self
            .view
            .read(|s| match s.workload_by_ip(ip) {
                Some(w) => Some((w.clone(), HBONE_PORT)),
                None => {
                    let svc = s.service_by_vip(ip)?;
                    let hbone_port = svc.waypoint.as_ref()?.hbone_port;
                    Some((crate::target::waypoint_of(s, svc)?, hbone_port))
                }
            })
            .ok_or(ConnectError::UnknownEndpoint(ip))?;
        let dial = peer.primary_address().ok_or(ConnectError::UnknownEndpoint(ip))?;
        let mut request = ConnectRequest::new(
            self.credential.clone(),
            SocketAddr::new(dial, hbone_port),
            vec![peer.identity.clone()],
            SocketAddr::new(ip, port),
        );
        if let Some(client) = self.client {
            request = request.forwarded_for(SocketAddr::new(client, 0));
        }
        Ok(self.pool.connect(request).await?)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = Tunnel;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Tunnel, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().open(uri))
    }
}

/// One client's HTTP clients: their pooled tunnels all carry that client's address.
#[derive(Debug, Clone)]
pub struct ClientPair {
    /// HTTP/1.1.
    pub http1: Client<Connector, Body>,
    /// HTTP/2 with prior knowledge (gRPC and HTTP/2 clients).
    pub http2: Client<Connector, Body>,
}

/// Most downstream clients with pools of their own; beyond it the pools start over (idle tunnels
/// of the dropped ones close, requests in flight finish).
const MAX_CLIENT_POOLS: usize = 4096;

/// The HTTP clients, one pair per downstream client address. A pooled upstream tunnel says in its
/// `forwarded` header whose traffic it carries, so it is never shared between clients (Envoy keys
/// its HBONE pools the same way).
#[derive(Debug)]
pub struct Clients {
    connector: Connector,
    by_client: std::sync::Mutex<std::collections::HashMap<Option<IpAddr>, ClientPair>>,
}

impl Clients {
    /// Clients over `connector`.
    pub fn new(connector: &Connector) -> Self {
        Clients { connector: connector.clone(), by_client: Default::default() }
    }

    /// The clients for traffic from `client`.
    pub fn for_client(&self, client: Option<IpAddr>) -> ClientPair {
        let mut all = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pair) = all.get(&client) {
            return pair.clone();
        }
        if all.len() >= MAX_CLIENT_POOLS {
            all.clear();
        }
        let connector = self.connector.for_client(client);
        let build = |http2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                .http2_only(http2)
                .build(connector.clone())
        };
        let pair = ClientPair { http1: build(false), http2: build(true) };
        all.insert(client, pair.clone());
        pair
    }
}

impl crate::send::Upstream for ClientPair {
    async fn send(&self, request: http::Request<Body>, http2: bool) -> Result<http::Response<Body>, BoxError> {
        let client = if http2 { &self.http2 } else { &self.http1 };
        let response = client.request(request).await?;
        Ok(response.map(|b| http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(b, BoxError::from))))
    }

    fn mirror(&self, request: http::Request<Body>) {
        let client = self.http1.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(crate::send::MIRROR_TIMEOUT, client.request(request)).await;
        });
    }
}
