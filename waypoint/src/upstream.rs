//! Requests to endpoints: over HBONE to mesh pods, in plain TCP to workloads outside the mesh.
//!
//! The HTTP clients (hyper-util's pooled client, one for HTTP/1.1 and one for HTTP/2 with prior
//! knowledge for gRPC, per downstream client) keep idle keep-alive connections per endpoint; each
//! new connection comes from [`Connector`]. To a mesh pod it is an HBONE tunnel: a
//! `CONNECT <pod ip>:<port>` stream on a pooled mutual-TLS HTTP/2 connection to the pod's
//! `:15008`, presenting the waypoint's certificate, accepting only the pod's own identity, and
//! naming the original client in `forwarded`. To a workload the mesh knows as outside it (a
//! ServiceEntry endpoint, when this waypoint is an egress waypoint) it is plain TCP from the
//! waypoint, to its address or to what its DNS name resolves to (never to a mesh pod's address).

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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::origination::Origination;

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
    /// TLS to originate inside each connection, and whether it is for HTTP/2.
    tls: Option<(Arc<Origination>, bool)>,
}

/// A connection to an endpoint.
#[derive(Debug)]
pub enum EndpointStream {
    /// An HBONE tunnel to a mesh pod.
    Hbone(H2Stream),
    /// Plain TCP to a workload outside the mesh.
    Plain(TcpStream),
}

impl EndpointStream {
    /// Ends the connection abruptly (a reset stream, or a TCP RST) after an error.
    pub fn reset(&mut self) {
        match self {
            EndpointStream::Hbone(s) => s.reset(),
            EndpointStream::Plain(s) => {
                let _ = socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO));
            }
        }
    }
}

impl AsyncRead for EndpointStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointStream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            EndpointStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EndpointStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EndpointStream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            EndpointStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointStream::Hbone(s) => Pin::new(s).poll_flush(cx),
            EndpointStream::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointStream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            EndpointStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An endpoint connection as it is (left), or in TLS the waypoint originates (right: a
/// DestinationRule's `tls`).
pub type Wire = Either<EndpointStream, Box<tokio_rustls::client::TlsStream<EndpointStream>>>;

/// An endpoint connection as a hyper connection.
#[derive(Debug)]
pub struct Tunnel(TokioIo<Wire>);

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
    /// The URI is not `http://<ip or name>:<port>`.
    #[error("upstream URI {0} is not http://<ip or name>:<port>")]
    BadUri(String),
    /// A plain connection to a workload outside the mesh failed.
    #[error("connecting to {to}")]
    Plain {
        /// The address or name.
        to: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake the waypoint originates failed (the endpoint's certificate, say).
    #[error("TLS to {to} ({sni})")]
    Tls {
        /// The address or name.
        to: String,
        /// The SNI sent.
        sni: String,
        /// Why; rustls' own error inside.
        #[source]
        source: io::Error,
    },
    /// A name resolved to no address a plain connection may go to.
    #[error("{0} resolved to no address outside the mesh")]
    Unresolved(String),
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
        Connector { view, pool, credential, client: None, tls: None }
    }

    /// The same connector, originating `tls` in each connection (offering `h2` when `http2`).
    fn originating(&self, tls: Arc<Origination>, http2: bool) -> Connector {
        Connector { tls: Some((tls, http2)), ..self.clone() }
    }

    /// The same connector, for traffic of `client`.
    pub fn for_client(&self, client: Option<IpAddr>) -> Connector {
        Connector { client, ..self.clone() }
    }

    async fn open(self, uri: Uri) -> Result<Tunnel, ConnectError> {
        let bad = || ConnectError::BadUri(uri.to_string());
        let host = uri.host().ok_or_else(bad)?.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().ok_or_else(bad)?;
        let stream = match host.parse::<IpAddr>() {
            Ok(ip) => self.connect(ip, port).await?,
            Err(_) => self.resolve_and_connect(host, port).await?,
        };
        let wire = match &self.tls {
            None => Either::Left(stream),
            Some((tls, http2)) => {
                let tls_stream = tls.connect(stream, *http2).await.map_err(|source| ConnectError::Tls {
                    to: format!("{host}:{port}"),
                    sni: tls.server_name().to_str().into_owned(),
                    source: io::Error::other(proto::tls::describe_io_error(&source)),
                })?;
                Either::Right(Box::new(tls_stream))
            }
        };
        Ok(Tunnel(TokioIo::new(wire)))
    }

    /// A connection to `port` at `ip`: plain TCP when the mesh knows `ip` as a workload outside
    /// it, else an HBONE tunnel ([`Connector::tunnel`]).
    pub async fn connect(&self, ip: IpAddr, port: u16) -> Result<EndpointStream, ConnectError> {
        let outside = self.view.read(|s| s.workload_by_ip(ip).is_some_and(|w| !w.speaks_hbone()));
        if outside {
            let to = SocketAddr::new(ip, port);
            let stream =
                TcpStream::connect(to).await.map_err(|source| ConnectError::Plain { to: to.to_string(), source })?;
            let _ = stream.set_nodelay(true);
            return Ok(EndpointStream::Plain(stream));
        }
        Ok(EndpointStream::Hbone(self.tunnel(ip, port).await?))
    }

    /// Plain TCP to what `host` resolves to (a ServiceEntry endpoint with `resolution: DNS`). An
    /// address of a mesh pod is skipped: a name must not make the waypoint reach a mesh workload
    /// in plaintext.
    pub async fn resolve_and_connect(&self, host: &str, port: u16) -> Result<EndpointStream, ConnectError> {
        let plain = |source| ConnectError::Plain { to: format!("{host}:{port}"), source };
        let mut last = None;
        for to in tokio::net::lookup_host((host, port)).await.map_err(plain)? {
            if self.view.read(|s| s.workload_by_ip(to.ip()).is_some_and(|w| w.speaks_hbone())) {
                continue;
            }
            match TcpStream::connect(to).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(EndpointStream::Plain(stream));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.map_or_else(|| ConnectError::Unresolved(host.to_owned()), plain))
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
    connector: Connector,
    /// Clients whose connections carry TLS the waypoint originates, one pair per TLS setting
    /// (a connection pooled for one setting is never used for another).
    originating: Arc<std::sync::Mutex<OriginatingClients>>,
}

/// The clients per TLS setting (by identity: a changed setting is a new one).
type OriginatingClients = Vec<(Arc<Origination>, ClientPair)>;

/// TLS settings with pools of their own per downstream client at most; beyond it they start over.
const MAX_ORIGINATING_POOLS: usize = 64;

fn http_client(connector: Connector, http2: bool) -> Client<Connector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .http2_only(http2)
        .build(connector)
}

impl ClientPair {
    fn new(connector: &Connector) -> ClientPair {
        ClientPair {
            http1: http_client(connector.clone(), false),
            http2: http_client(connector.clone(), true),
            connector: connector.clone(),
            originating: Default::default(),
        }
    }

    /// The HTTP client whose connections originate `tls`, HTTP/2 when `http2`.
    fn originating(&self, tls: &Arc<Origination>, http2: bool) -> Client<Connector, Body> {
        let mut all = self.originating.lock().unwrap_or_else(|p| p.into_inner());
        let pair = match all.iter().find(|(t, _)| Arc::ptr_eq(t, tls)) {
            Some((_, pair)) => pair.clone(),
            None => {
                if all.len() >= MAX_ORIGINATING_POOLS {
                    all.clear();
                }
                let pair = ClientPair {
                    http1: http_client(self.connector.originating(tls.clone(), false), false),
                    http2: http_client(self.connector.originating(tls.clone(), true), true),
                    connector: self.connector.clone(),
                    originating: Default::default(),
                };
                all.push((tls.clone(), pair.clone()));
                pair
            }
        };
        if http2 { pair.http2 } else { pair.http1 }
    }
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
        let pair = ClientPair::new(&self.connector.for_client(client));
        all.insert(client, pair.clone());
        pair
    }
}

impl crate::send::Upstream for ClientPair {
    async fn send(
        &self,
        request: http::Request<Body>,
        http2: bool,
        tls: Option<&Arc<Origination>>,
    ) -> Result<http::Response<Body>, BoxError> {
        let response = match tls {
            None => if http2 { &self.http2 } else { &self.http1 }.request(request).await?,
            Some(tls) => self.originating(tls, http2).request(request).await?,
        };
        Ok(response.map(|b| http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(b, BoxError::from))))
    }

    fn mirror(&self, request: http::Request<Body>, tls: Option<&Arc<Origination>>) {
        let client = match tls {
            None => self.http1.clone(),
            Some(tls) => self.originating(tls, false),
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(crate::send::MIRROR_TIMEOUT, client.request(request)).await;
        });
    }
}
