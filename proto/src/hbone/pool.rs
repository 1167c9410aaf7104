//! The HBONE client: a pool of multiplexed HTTP/2 connections.
//!
//! A connection is reused for any stream with the same [`PoolKey`]: source identity (and source
//! IP), destination address and the set of identities the server may present. Keys never mix
//! source identities, so a connection authenticated as one workload never carries another's
//! traffic. Per key:
//! - a new stream takes a connection with fewer than `max_streams_per_conn` open streams;
//! - when all are full, one dial starts; concurrent callers wait for it instead of dialing too,
//!   and all of them see its error if it fails;
//! - a connection with no stream for `idle_timeout` is closed (GOAWAY) and forgotten;
//! - a connection that leaves a `CONNECT` unanswered for `connect_timeout` takes no new stream
//!   and is closed when its open ones end.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug};

use super::{BAGGAGE, Baggage, FORWARDED, H2Settings, H2Stream, TRACEPARENT, Target, TraceParent, forwarded_for};
use crate::identity::SpiffeId;
use crate::tls::{ALPN_H2, Credential, SharedTrustBundle, TlsError, client_config};

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams one connection carries at most before another is opened.
    pub max_streams_per_conn: u32,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Time allowed for TCP connect, TLS and HTTP/2 handshakes together; and, again, for the
    /// peer to answer each `CONNECT` (a peer that takes the stream and never answers would
    /// otherwise hold the caller forever).
    pub connect_timeout: Duration,
    /// HTTP/2 windows and frame size.
    pub h2: H2Settings,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            h2: H2Settings::default(),
        }
    }
}

/// What makes two streams share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the client presents.
    pub src_identity: SpiffeId,
    /// Local address to connect from, if not the default.
    pub src_ip: Option<IpAddr>,
    /// The HBONE address dialed (`<pod or waypoint IP>:15008`).
    pub dst: SocketAddr,
    /// Identities the server may present, sorted.
    pub dst_identities: Arc<[SpiffeId]>,
}

/// Opens the TCP connection for a key. Node proxies supply their own (e.g. to connect from inside
/// a pod's network namespace, or to mark sockets); [`TcpDialer`] is the plain one.
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// Connects to `key.dst`.
    fn dial<'a>(&'a self, key: &'a PoolKey) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;
}

/// Dials from the current network namespace, binding `src_ip` when the key has one.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>> {
        Box::pin(async move {
            let socket = if key.dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            if let Some(ip) = key.src_ip {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let tcp = socket.connect(key.dst).await?;
            super::configure_socket(&tcp)?;
            Ok(tcp)
        })
    }
}

/// One tunnel to open.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The source workload's certificate, presented to the server.
    pub credential: Arc<Credential>,
    /// Local address to connect from, if not the default.
    pub src_ip: Option<IpAddr>,
    /// The HBONE address to dial.
    pub dst: SocketAddr,
    /// Identities the server may present (the destination workload, or its waypoint).
    pub expected_identities: Vec<SpiffeId>,
    /// The `:authority`: the final destination `ip:port`, or a service `hostname:port` for the
    /// server to resolve (only a peer that accepts them: Istio's ztunnel and ours do, inbound).
    pub target: Target,
    /// Extra request headers (see [`ConnectRequest::forwarded_for`] and friends).
    pub headers: HeaderMap,
    /// Bytes the client has already sent, to go right behind the `CONNECT` (see
    /// [`ConnectRequest::early_data`]); empty for none.
    pub early_data: Bytes,
}

/// The most early data a caller should give a request ([`ConnectRequest::early_data`]): one
/// HTTP/2 frame at the default frame size, well inside the smallest stream window a peer may
/// start with (65,535 bytes), so it is sent at once, never held for window.
pub const MAX_EARLY_DATA: usize = 16 * 1024;

impl ConnectRequest {
    /// A request with no extra headers; a random unsampled `traceparent` is added on send unless
    /// one is set.
    pub fn new(
        credential: Arc<Credential>,
        dst: SocketAddr,
        expected_identities: Vec<SpiffeId>,
        target: impl Into<Target>,
    ) -> Self {
        let target = target.into();
        ConnectRequest {
            credential,
            src_ip: None,
            dst,
            expected_identities,
            target,
            headers: HeaderMap::new(),
            early_data: Bytes::new(),
        }
    }

    /// Sends `data` — bytes the client has already sent, at most [`MAX_EARLY_DATA`] — on the
    /// stream right behind the `CONNECT` instead of after its answer, so a client that speaks first
    /// (an HTTP request, a TLS ClientHello) is heard one round trip sooner. The server holds them
    /// (inside the stream's flow-control window) until it has decided: a refused stream's bytes
    /// are discarded with it, never delivered. A stream retried on another connection sends them
    /// again. The copy counts them as sent ([`H2Stream`]).
    pub fn early_data(mut self, data: Bytes) -> Self {
        self.early_data = data;
        self
    }

    /// Sets `forwarded: for="<client>"`.
    pub fn forwarded_for(mut self, client: SocketAddr) -> Self {
        if let Ok(v) = HeaderValue::from_str(&forwarded_for(client)) {
            self.headers.insert(FORWARDED, v);
        }
        self
    }

    /// Sets `forwarded: for="<client>";host=<service>` when the client addressed a service.
    pub fn forwarded_for_service(mut self, client: SocketAddr, service_hostname: Option<&str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(&super::forwarded_for_service(client, service_hostname)) {
            self.headers.insert(FORWARDED, v);
        }
        self
    }

    /// Sets a `baggage` header already formatted (a workload's, see `state::Workload::baggage`).
    pub fn baggage_value(mut self, value: HeaderValue) -> Self {
        self.headers.insert(BAGGAGE, value);
        self
    }

    /// Sets `baggage` from the source workload's attributes (omitted when empty).
    pub fn baggage(mut self, baggage: &Baggage) -> Self {
        let value = baggage.to_header();
        if let (false, Ok(v)) = (value.is_empty(), HeaderValue::from_str(&value)) {
            self.headers.insert(BAGGAGE, v);
        }
        self
    }

    /// Sets `traceparent`.
    pub fn traceparent(mut self, trace: TraceParent) -> Self {
        if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
            self.headers.insert(TRACEPARENT, v);
        }
        self
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    /// TCP connect failed.
    #[error("connecting to {dst}: {source}")]
    Connect {
        /// The HBONE address.
        dst: SocketAddr,
        /// The socket error.
        source: Arc<io::Error>,
    },
    /// The TLS handshake failed (including the server's certificate being refused).
    #[error("TLS handshake with {dst}: {}", crate::tls::describe_io_error(source))]
    Tls {
        /// The HBONE address.
        dst: SocketAddr,
        /// rustls' error, wrapped by tokio-rustls.
        source: Arc<io::Error>,
    },
    /// The server did not negotiate `h2`.
    #[error("{dst} did not negotiate ALPN h2")]
    Alpn {
        /// The HBONE address.
        dst: SocketAddr,
    },
    /// Building the TLS configuration failed.
    #[error("TLS configuration for {dst}: {source}")]
    Config {
        /// The HBONE address.
        dst: SocketAddr,
        /// The configuration error.
        source: Arc<TlsError>,
    },
    /// HTTP/2 failed (handshake, stream open, or the connection went away).
    #[error("HTTP/2 with {dst}: {source}")]
    Http2 {
        /// The HBONE address.
        dst: SocketAddr,
        /// h2's error.
        source: Arc<h2::Error>,
    },
    /// The `CONNECT` was not answered within `connect_timeout` (the stream is reset).
    #[error("{dst} did not answer CONNECT {target} within {after:?}")]
    Unanswered {
        /// The HBONE address.
        dst: SocketAddr,
        /// The requested authority.
        target: Target,
        /// The limit.
        after: Duration,
    },
    /// Connecting took longer than `connect_timeout`.
    #[error("connecting to {dst} timed out after {after:?}")]
    Timeout {
        /// The HBONE address.
        dst: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The dial was abandoned before it finished (the runtime is shutting down).
    #[error("dialing {dst} was aborted")]
    DialAborted {
        /// The HBONE address.
        dst: SocketAddr,
    },
    /// The target cannot be expressed as a `CONNECT` authority.
    #[error("{target} is not a valid CONNECT authority")]
    InvalidTarget {
        /// The requested authority.
        target: Target,
    },
    /// The server answered the `CONNECT` with a non-200 status (400, 401, 503, ...).
    #[error("{dst} refused CONNECT {target}: {status}")]
    Refused {
        /// The HBONE address.
        dst: SocketAddr,
        /// The requested authority.
        target: Target,
        /// The server's status.
        status: StatusCode,
    },
}

/// The client pool. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    trust: Arc<SharedTrustBundle>,
    dialer: Arc<dyn Dialer>,
    state: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("config", &self.config).field("dialer", &self.dialer).finish_non_exhaustive()
    }
}

type DialOutcome = Option<Result<(), PoolError>>;

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    /// Set while the one dial for this key is in flight.
    dialing: Option<watch::Receiver<DialOutcome>>,
}

struct Conn {
    id: u64,
    dst: SocketAddr,
    send: h2::client::SendRequest<Bytes>,
    /// Streams reserved on this connection; incremented only under the pool lock.
    active: AtomicU64,
    closed: AtomicBool,
    /// When the last stream ended (meaningful while `active` is 0).
    idle_since: Mutex<Instant>,
    /// Signalled when `active` drops to 0.
    became_idle: Notify,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A reserved stream on a pooled connection, released when dropped.
pub(crate) struct StreamSlot {
    conn: Arc<Conn>,
}

impl fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSlot").field("conn", &self.conn.id).finish()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
            self.conn.became_idle.notify_one();
        }
    }
}

/// The pool's locks are never held across an await and their holders cannot panic mid-update, so
/// a poisoned lock still holds consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// A pool verifying servers against `trust`, dialing with [`TcpDialer`].
    pub fn new(config: PoolConfig, trust: Arc<SharedTrustBundle>) -> Self {
        Self::with_dialer(config, trust, Arc::new(TcpDialer))
    }

    /// A pool using a custom dialer.
    pub fn with_dialer(config: PoolConfig, trust: Arc<SharedTrustBundle>, dialer: Arc<dyn Dialer>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                config,
                trust,
                dialer,
                state: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// Open connections across all keys.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.state).values().map(|e| e.conns.iter().filter(|c| !c.is_closed()).count()).sum()
    }

    /// Opens a tunnel stream: reuses or dials a connection, sends `CONNECT`, waits for `200`.
    pub async fn connect(&self, request: ConnectRequest) -> Result<H2Stream, PoolError> {
        let mut ids = request.expected_identities.clone();
        ids.sort();
        ids.dedup();
        let key = PoolKey {
            src_identity: request.credential.identity(),
            src_ip: request.src_ip,
            dst: request.dst,
            dst_identities: ids.into(),
        };
        let mut headers = request.headers;
        if !headers.contains_key(TRACEPARENT)
            && let Ok(v) = HeaderValue::from_str(&TraceParent::random(false).to_string())
        {
            headers.insert(TRACEPARENT, v);
        }

        // One retry: a pooled connection may have been told to go away just now.
        let mut retried = false;
        loop {
            let conn = self.checkout(&key, &request.credential).await?;
            let slot = StreamSlot { conn };
            let mut req = Request::new(());
            *req.method_mut() = Method::CONNECT;
            // An ip:port or a DNS name always forms a valid authority-form URI; the error path is
            // unreachable in practice but reported rather than unwrapped.
            *req.uri_mut() = http::Uri::try_from(request.target.to_string())
                .map_err(|_| PoolError::InvalidTarget { target: request.target.clone() })?;
            *req.headers_mut() = headers.clone();

            let opened = async {
                let mut send = slot.conn.send.clone().ready().await?;
                let (response, mut stream) = send.send_request(req, false)?;
                if !request.early_data.is_empty() {
                    // Queued with the headers: the connection task writes both at once.
                    stream.send_data(request.early_data.clone(), false)?;
                }
                Ok::<_, h2::Error>((response, stream))
            }
            .await;
            let (response, send_stream) = match opened {
                Ok(ok) => ok,
                Err(e) if !retried => {
                    debug!(dst = %key.dst, error = %e, "pooled connection unusable; retrying on another");
                    slot.conn.closed.store(true, Ordering::Release);
                    retried = true;
                    continue;
                }
                Err(e) => return Err(PoolError::Http2 { dst: key.dst, source: Arc::new(e) }),
            };
            let limit = self.inner.config.connect_timeout;
            // On the deadline the response future and the send stream are dropped: h2 resets the
            // stream, so the peer learns it too. The connection takes no new stream: its peer or
            // the path to it may be gone (TCP does not probe a connection with unacknowledged
            // data), and the next caller would wait out the same deadline. Its open streams go on.
            let Ok(response) = tokio::time::timeout(limit, response).await else {
                debug!(conn = slot.conn.id, dst = %key.dst, target = %request.target,
                    "CONNECT unanswered; no new streams on this connection");
                slot.conn.closed.store(true, Ordering::Release);
                return Err(PoolError::Unanswered { dst: key.dst, target: request.target.clone(), after: limit });
            };
            let response = match response {
                Ok(response) => response,
                // A stream the server says it did not process — refused, or above the last one its
                // GOAWAY accepted (a draining peer, e.g. a ztunnel handing over to its successor) —
                // is safe to send again (RFC 9113 §8.7): once, on another connection.
                Err(e) if !retried && (e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away()) => {
                    debug!(dst = %key.dst, error = %e, "stream not processed by a draining peer; retrying on another");
                    slot.conn.closed.store(true, Ordering::Release);
                    retried = true;
                    continue;
                }
                Err(e) => return Err(PoolError::Http2 { dst: key.dst, source: Arc::new(e) }),
            };
            if response.status() != StatusCode::OK {
                return Err(PoolError::Refused {
                    dst: key.dst,
                    target: request.target.clone(),
                    status: response.status(),
                });
            }
            let mut stream = H2Stream::new(send_stream, response.into_body(), Some(slot));
            stream.sent_early = u32::try_from(request.early_data.len()).unwrap_or(u32::MAX);
            return Ok(stream);
        }
    }

    /// Reserves a stream on a connection for `key`, dialing one if needed.
    async fn checkout(&self, key: &PoolKey, credential: &Arc<Credential>) -> Result<Arc<Conn>, PoolError> {
        let max = u64::from(self.inner.config.max_streams_per_conn.max(1));
        loop {
            let mut waiter = {
                let mut state = lock(&self.inner.state);
                let entry = state.entry(key.clone()).or_default();
                entry.conns.retain(|c| !c.is_closed());
                if let Some(conn) = entry.conns.iter().find(|c| c.active.load(Ordering::Acquire) < max) {
                    conn.active.fetch_add(1, Ordering::AcqRel);
                    return Ok(conn.clone());
                }
                match &entry.dialing {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        entry.dialing = Some(rx.clone());
                        let dial = dial(Arc::downgrade(&self.inner), key.clone(), credential.clone(), tx);
                        tokio::spawn(dial.instrument(tracing::debug_span!("hbone_dial", dst = %key.dst)));
                        rx
                    }
                }
            };
            let outcome = waiter.wait_for(Option::is_some).await.map(|v| v.clone());
            match outcome {
                Ok(Some(Err(e))) => return Err(e),
                Ok(_) => continue,
                // The dial task is gone without an outcome (the runtime is shutting down).
                Err(_) => return Err(PoolError::DialAborted { dst: key.dst }),
            }
        }
    }
}

/// Dials one connection for `key`, registers it, and tells the waiters.
async fn dial(inner: Weak<Inner>, key: PoolKey, credential: Arc<Credential>, tx: watch::Sender<DialOutcome>) {
    let Some(pool) = inner.upgrade() else { return };
    let limit = pool.config.connect_timeout;
    let established = match tokio::time::timeout(limit, establish(&pool, &key, credential)).await {
        Ok(result) => result,
        Err(_) => Err(PoolError::Timeout { dst: key.dst, after: limit }),
    };
    let mut state = lock(&pool.state);
    let entry = state.entry(key.clone()).or_default();
    entry.dialing = None;
    let outcome = match established {
        Ok((send, connection)) => {
            let conn = Arc::new(Conn {
                id: pool.next_id.fetch_add(1, Ordering::Relaxed),
                dst: key.dst,
                send,
                active: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                idle_since: Mutex::new(Instant::now()),
                became_idle: Notify::new(),
            });
            debug!(conn = conn.id, dst = %key.dst, src = %key.src_identity, "HBONE connection established");
            entry.conns.push(conn.clone());
            let driver = drive(Arc::downgrade(&pool), key.clone(), conn, connection);
            tokio::spawn(driver.in_current_span());
            Ok(())
        }
        Err(e) => {
            debug!(dst = %key.dst, error = %e, "HBONE dial failed");
            if entry.conns.is_empty() {
                state.remove(&key);
            }
            Err(e)
        }
    };
    drop(state);
    let _ = tx.send(Some(outcome));
}

type TlsStream = tokio_rustls::client::TlsStream<super::readahead::ReadAhead<TcpStream>>;

async fn establish(
    pool: &Inner,
    key: &PoolKey,
    credential: Arc<Credential>,
) -> Result<(h2::client::SendRequest<Bytes>, h2::client::Connection<TlsStream, Bytes>), PoolError> {
    let dst = key.dst;
    let tls = client_config(credential, pool.trust.clone(), key.dst_identities.to_vec())
        .map_err(|e| PoolError::Config { dst, source: Arc::new(e) })?;
    let tcp = pool.dialer.dial(key).await.map_err(|e| PoolError::Connect { dst, source: Arc::new(e) })?;
    let mut tls = TlsConnector::from(tls)
        .connect(ServerName::IpAddress(dst.ip().into()), super::readahead::ReadAhead::new(tcp))
        .await
        .map_err(|e| PoolError::Tls { dst, source: Arc::new(e) })?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
        return Err(PoolError::Alpn { dst });
    }
    super::configure_tls(tls.get_mut().1);
    let h2 = pool.config.h2;
    h2::client::Builder::new()
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_send_buffer_size(h2.max_send_buffer)
        .enable_push(false)
        .handshake(tls)
        .await
        .map_err(|e| PoolError::Http2 { dst, source: Arc::new(e) })
}

/// Runs a connection until it closes or idles out, then removes it from the pool.
async fn drive(
    pool: Weak<Inner>,
    key: PoolKey,
    conn: Arc<Conn>,
    mut connection: h2::client::Connection<TlsStream, Bytes>,
) {
    let idle_timeout = pool.upgrade().map(|p| p.config.idle_timeout).unwrap_or_default();
    let id = conn.id;
    let idle = async {
        loop {
            if conn.active.load(Ordering::Acquire) > 0 {
                conn.became_idle.notified().await;
                continue;
            }
            // Retired (it takes no new stream) and its last stream is done: close it now.
            if conn.is_closed() {
                if let Some(pool) = pool.upgrade() {
                    forget(&mut lock(&pool.state), &key, id);
                }
                return;
            }
            let since = *lock(&conn.idle_since);
            let deadline = since + idle_timeout;
            tokio::time::sleep_until(deadline).await;
            let Some(pool) = pool.upgrade() else { return };
            let mut state = lock(&pool.state);
            // Re-check under the lock: reservations happen under it, so none can race this.
            if conn.active.load(Ordering::Acquire) == 0 && *lock(&conn.idle_since) <= deadline {
                conn.closed.store(true, Ordering::Release);
                forget(&mut state, &key, id);
                return;
            }
        }
    };
    let evicted = tokio::select! {
        result = &mut connection => {
            if let Err(e) = result {
                debug!(conn = id, dst = %conn.dst, error = %e, "HBONE connection failed");
            }
            false
        }
        () = idle => true,
    };
    conn.closed.store(true, Ordering::Release);
    if evicted {
        debug!(conn = id, dst = %conn.dst, "closing idle HBONE connection");
        // Dropping the last request handle makes h2 send GOAWAY and finish.
        drop(conn);
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    } else if let Some(pool) = pool.upgrade() {
        forget(&mut lock(&pool.state), &key, id);
    }
}

fn forget(state: &mut HashMap<PoolKey, Entry>, key: &PoolKey, id: u64) {
    if let Some(entry) = state.get_mut(key) {
        entry.conns.retain(|c| c.id != id);
        if entry.conns.is_empty() && entry.dialing.is_none() {
            state.remove(key);
        }
    }
}
