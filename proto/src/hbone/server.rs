//! The HBONE server: mutual TLS, then HTTP/2 `CONNECT` streams handed to a [`Handler`].
//!
//! Per connection: the TLS and HTTP/2 handshakes must finish within `handshake_timeout` (a peer
//! that stalls is dropped, not kept). The client's SPIFFE ID comes from its verified certificate
//! only. Per stream, the server answers by itself:
//! - `400` when the request is not `CONNECT`, the authority is not `ip:port` (nor
//!   `hostname:port`, where [`ServerConfig::service_hostnames`] allows it), the authority's IP is
//!   not the address the connection arrived on (when required);
//! - `503` when it targets a mesh port, as Istio's ztunnel answers a call to itself;
//! - `503` when the handler drops the request without answering.
//!
//! The handler answers `200` ([`InboundConnect::accept`]) or any status it decides, `401` for a
//! policy deny ([`InboundConnect::reject`]). Work done before the answer can be tied to the stream
//! ([`InboundConnect::until_reset`]): a client that resets the stream cancels it; one that resets
//! more than [`ServerConfig::max_early_resets`] streams per [`RESET_WINDOW`] before they are
//! answered is cut off with GOAWAY `ENHANCE_YOUR_CALM` (rapid reset).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
pub use http::StatusCode;
use http::{HeaderMap, Method, Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, warn};

use super::{H2Settings, H2Stream, MESH_PORTS, Target, parse_target};
use crate::drain::DrainWatcher;
use crate::identity::SpiffeId;
use crate::tls::peer_identity;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time allowed for the TLS and HTTP/2 handshakes together.
    pub handshake_timeout: Duration,
    /// HTTP/2 windows and frame size.
    pub h2: H2Settings,
    /// Concurrent streams a client may open on one connection.
    pub max_concurrent_streams: u32,
    /// Refuse a `CONNECT` whose authority IP is not the address the connection arrived on (what a
    /// node proxy's inbound listener wants; a waypoint, which is addressed for others, does not).
    pub require_local_authority: bool,
    /// Accept `hostname:port` authorities ([`Target::Service`]) for the handler to resolve, as
    /// Istio's ztunnel does on its inbound side; otherwise they are refused (`400`).
    pub service_hostnames: bool,
    /// Ports a tunnel may not target.
    pub forbidden_ports: Vec<u16>,
    /// Streams a client may reset before they are answered, per [`RESET_WINDOW`], before the
    /// connection is cut off (GOAWAY `ENHANCE_YOUR_CALM`): the rapid-reset pattern, where each
    /// stream costs the server work (policy, a dial to the app) and the client nothing.
    pub max_early_resets: u32,
}

/// The window [`ServerConfig::max_early_resets`] counts in.
pub const RESET_WINDOW: Duration = Duration::from_secs(10);

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            h2: H2Settings::default(),
            max_concurrent_streams: 1000,
            require_local_authority: true,
            service_hostnames: false,
            forbidden_ports: MESH_PORTS.to_vec(),
            max_early_resets: 200,
        }
    }
}

/// Picks the TLS configuration (and so the certificate presented) for a connection, by the local
/// address it arrived on.
pub trait TlsProvider: Send + Sync + std::fmt::Debug + 'static {
    /// The configuration for a connection to `local`, or `None` to refuse it.
    fn config_for(&self, local: SocketAddr) -> Option<Arc<rustls::ServerConfig>>;
}

impl TlsProvider for Arc<rustls::ServerConfig> {
    fn config_for(&self, _local: SocketAddr) -> Option<Arc<rustls::ServerConfig>> {
        Some(self.clone())
    }
}

/// Decides what to do with each validated `CONNECT`.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request; runs in its own task. Must answer through `connect` (dropping it
    /// answers `503`).
    fn handle(&self, connect: InboundConnect) -> impl Future<Output = ()> + Send;
}

/// A validated `CONNECT` waiting for an answer.
#[derive(Debug)]
pub struct InboundConnect {
    /// The client's SPIFFE ID, from its verified certificate.
    pub peer_identity: SpiffeId,
    /// The client's TCP address.
    pub peer_addr: SocketAddr,
    /// The address the connection arrived on.
    pub local_addr: SocketAddr,
    /// The `:authority`: where the client wants to go. A [`Target::Service`] only where
    /// [`ServerConfig::service_hostnames`] allows it; the handler resolves it and checks the
    /// resolved port is not a mesh port.
    pub target: Target,
    /// The request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub headers: HeaderMap,
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
    resets: Arc<EarlyResets>,
}

/// Streams of one connection its client reset before they were answered, in the current window.
#[derive(Debug)]
struct EarlyResets {
    window: std::sync::Mutex<(tokio::time::Instant, u32)>,
    exceeded: tokio::sync::Notify,
    max: u32,
}

impl EarlyResets {
    fn new(max: u32) -> Self {
        EarlyResets {
            window: std::sync::Mutex::new((tokio::time::Instant::now(), 0)),
            exceeded: tokio::sync::Notify::new(),
            max,
        }
    }

    fn record(&self) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed() > RESET_WINDOW {
            *w = (tokio::time::Instant::now(), 0);
        }
        w.1 += 1;
        if w.1 > self.max {
            self.exceeded.notify_one();
        }
    }
}

/// Errors answering a request.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The stream was already reset or the connection is gone.
    #[error("sending the response: {0}")]
    Respond(#[from] h2::Error),
    /// The request was already answered.
    #[error("the request was already answered")]
    AlreadyAnswered,
}

fn response(status: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp
}

impl InboundConnect {
    /// Runs `work` (authorization, the dial to the app, ...) until it finishes or the client
    /// resets the stream; `None` on a reset, with `work` dropped, so whatever it was doing stops.
    pub async fn until_reset<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let Some(respond) = self.respond.as_mut() else { return Some(work.await) };
        tokio::pin!(work);
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        tokio::select! {
            out = &mut work => Some(out),
            reason = reset => {
                debug!(target_addr = %self.target, ?reason, "stream reset by the client before it was answered");
                self.respond = None;
                self.resets.record();
                None
            }
        }
    }

    /// Answers `200` and returns the tunnel stream.
    pub fn accept(mut self) -> Result<H2Stream, ServerError> {
        let (Some(mut respond), Some(body)) = (self.respond.take(), self.body.take()) else {
            return Err(ServerError::AlreadyAnswered);
        };
        let send = respond.send_response(response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, body, None))
    }

    /// Answers `status` (e.g. `401` for a policy deny, `503` when the upstream is unavailable)
    /// and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        self.answer(status);
    }

    fn answer(&mut self, status: StatusCode) {
        if let Some(mut respond) = self.respond.take() {
            // The client may already be gone; nothing more to do then.
            let _ = respond.send_response(response(status), true);
        }
    }
}

impl Drop for InboundConnect {
    fn drop(&mut self) {
        if self.respond.is_some() {
            debug!(target_addr = %self.target, "request dropped without an answer; sending 503");
            self.answer(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

/// An HBONE listener.
#[derive(Debug)]
pub struct Server<H> {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Arc<dyn TlsProvider>,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
}

impl<H: Handler> Server<H> {
    /// Wraps a bound listener (e.g. one opened inside a pod's network namespace).
    pub fn new(
        listener: TcpListener,
        tls: impl TlsProvider,
        config: ServerConfig,
        handler: Arc<H>,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        Ok(Server { listener, local_addr, tls: Arc::new(tls), config: Arc::new(config), handler })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts connections until a drain starts; open connections then get GOAWAY and finish
    /// their streams.
    pub async fn run(self, mut drain: DrainWatcher) {
        info!(addr = %self.local_addr, "HBONE server listening");
        loop {
            let (tcp, peer) = tokio::select! {
                biased;
                () = drain.signaled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Usually fd exhaustion: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let local = tcp.local_addr().unwrap_or(self.local_addr);
            let Some(tls) = self.tls.config_for(local) else {
                debug!(%peer, %local, "no certificate for this address; closing");
                continue;
            };
            let conn = Connection {
                peer,
                local,
                config: self.config.clone(),
                handler: self.handler.clone(),
                drain: drain.clone(),
            };
            tokio::spawn(conn.serve(tcp, tls).instrument(tracing::debug_span!("hbone_inbound", %peer, %local)));
        }
        info!(addr = %self.local_addr, "HBONE server stopped accepting");
    }
}

struct Connection<H> {
    peer: SocketAddr,
    local: SocketAddr,
    config: Arc<ServerConfig>,
    handler: Arc<H>,
    drain: DrainWatcher,
}

impl<H: Handler> Connection<H> {
    async fn serve(mut self, tcp: TcpStream, tls: Arc<rustls::ServerConfig>) {
        if let Err(e) = super::configure_socket(&tcp) {
            debug!(error = %e, "could not set socket options");
        }
        let h2 = self.config.h2;
        let max_streams = self.config.max_concurrent_streams;
        let handshake = async move {
            let mut tls = TlsAcceptor::from(tls)
                .accept(super::readahead::ReadAhead::new(tcp))
                .await
                .map_err(|e| crate::tls::describe_io_error(&e))?;
            let identity = peer_identity(tls.get_ref().1).ok_or("the client presented no SPIFFE identity")?;
            super::configure_tls(tls.get_mut().1);
            let conn = h2::server::Builder::new()
                .initial_window_size(h2.stream_window)
                .initial_connection_window_size(h2.connection_window)
                .max_frame_size(h2.max_frame_size)
                .max_send_buffer_size(h2.max_send_buffer)
                .max_concurrent_streams(max_streams)
                .max_header_list_size(16 * 1024)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            Ok::<_, String>((identity, conn))
        };
        let (identity, mut conn) = match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(reason)) => {
                info!(reason, "HBONE handshake failed");
                return;
            }
            Err(_) => {
                info!(timeout = ?self.config.handshake_timeout, "HBONE handshake timed out; closing");
                return;
            }
        };
        debug!(peer_identity = %identity, "HBONE connection established");

        let resets = Arc::new(EarlyResets::new(self.config.max_early_resets));
        let mut draining = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = resets.exceeded.notified() => {
                    warn!(peer_identity = %identity, peer = %self.peer, max = self.config.max_early_resets,
                        window = ?RESET_WINDOW, "client reset too many streams before they were answered; closing (GOAWAY)");
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    draining = true;
                    continue;
                }
                () = self.drain.signaled(), if !draining => {
                    // GOAWAY now; keep driving the connection until open streams finish.
                    conn.graceful_shutdown();
                    draining = true;
                    continue;
                }
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    debug!(error = %e, "HBONE connection ended with an error");
                    break;
                }
                Some(Ok((request, respond))) => self.dispatch(&identity, request, respond, &resets),
            }
        }
        debug!(peer_identity = %identity, "HBONE connection closed");
    }

    fn dispatch(
        &self,
        identity: &SpiffeId,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        resets: &Arc<EarlyResets>,
    ) {
        let target = match validate(&request, self.local, &self.config) {
            Ok(target) => target,
            Err(refusal) => {
                let (status, reason) = (refusal.status(), crate::error_chain(&refusal));
                info!(peer_identity = %identity, method = %request.method(), uri = %request.uri(), reason,
                    "rejected HBONE request: {}", status.as_u16());
                let _ = respond.send_response(response(status), true);
                return;
            }
        };
        let (parts, body) = request.into_parts();
        let connect = InboundConnect {
            peer_identity: identity.clone(),
            peer_addr: self.peer,
            local_addr: self.local,
            target,
            headers: parts.headers,
            respond: Some(respond),
            body: Some(body),
            resets: resets.clone(),
        };
        let handler = self.handler.clone();
        let span = tracing::debug_span!("connect", target = %connect.target);
        let task = stream_task(handler, Box::new(connect));
        // A span takes 40 bytes of the task for as long as the stream lives, enabled or not:
        // only one that records (debug logging) is attached.
        if span.is_disabled() {
            tokio::spawn(task);
        } else {
            tokio::spawn(task.instrument(span));
        }
    }
}

/// The task of one stream: the handler's future, and no more for as long as the stream lives.
/// The request comes boxed, so the task is not sized for it (a handler is done with it long
/// before the stream ends), and the box is freed as soon as the handler has taken the request: a
/// box moved out of is freed where its binding goes out of scope, which for a capture of the
/// task's block would be the end of the stream.
#[allow(clippy::manual_async_fn, reason = "an async fn stores its arguments twice: 8 bytes more here")]
fn stream_task<H: Handler>(handler: Arc<H>, connect: Box<InboundConnect>) -> impl Future<Output = ()> + Send {
    async move {
        let handling = {
            let connect = connect;
            handler.handle(*connect)
        };
        handling.await
    }
}

/// Bytes of the future of each stream's task with handler `H` (tokio's task header and trailer
/// come on top: about 168 bytes, the whole rounded up to a multiple of 128). For tests that
/// keep what an open stream costs in check.
#[doc(hidden)]
pub fn stream_task_size<H: Handler>() -> usize {
    fn output_size<A, B, R>(_: impl FnOnce(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    output_size(stream_task::<H>)
}

/// Why a request breaks the HBONE rules: answered `400`, but `503` for a target that is one of
/// the proxy's own ports, as Istio's ztunnel answers a call to itself.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("CONNECT without an authority")]
    NoAuthority,
    #[error("bad authority")]
    Authority(#[source] super::AuthorityError),
    #[error("authority {0} names a service; this proxy takes ip:port only")]
    Hostname(Target),
    #[error("authority {target} is not the address the connection arrived on ({local})")]
    NotLocal { target: SocketAddr, local: std::net::IpAddr },
    #[error("authority {0} targets a mesh port")]
    MeshPort(SocketAddr),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::MeshPort(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a request against the HBONE rules.
fn validate(request: &Request<RecvStream>, local: SocketAddr, config: &ServerConfig) -> Result<Target, Refusal> {
    if request.method() != Method::CONNECT {
        return Err(Refusal::NotConnect(request.method().clone()));
    }
    let authority = request.uri().authority().ok_or(Refusal::NoAuthority)?;
    match parse_target(authority.as_str()).map_err(Refusal::Authority)? {
        Target::Addr(target) => {
            if config.require_local_authority && target.ip() != local.ip() {
                return Err(Refusal::NotLocal { target, local: local.ip() });
            }
            if config.forbidden_ports.contains(&target.port()) {
                return Err(Refusal::MeshPort(target));
            }
            Ok(Target::Addr(target))
        }
        // The service port says nothing yet: the handler checks the port it resolves to.
        service if config.service_hostnames => Ok(service),
        service => Err(Refusal::Hostname(service)),
    }
}
