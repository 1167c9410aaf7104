//! Outbound (15001): where a captured connection goes, decided from its original destination by
//! [`proto::route`] (shared with the CA, which explains connections with it); [`Outbound`] applies
//! it to each captured connection, with one HBONE connection pool per pod (a pool never mixes
//! source identities).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use proto::drain::{DrainGuard, DrainWatcher};
use proto::hbone::copy;
use proto::hbone::pool::{ConnectRequest, MAX_EARLY_DATA, Pool, PoolError};
use proto::hbone::server::StatusCode;
pub use proto::route::{Balancer, Route, is_waypoint_of, route};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use crate::context::Context;
use crate::pod::{Pod, PodDialer, connect};
use crate::telemetry::{ConnectionInfo, ConnectionRecord, Outcome, Peer, Reporter};

/// Resolves `host` (with the node's resolver) and connects from the pod to the first address that
/// answers. An address of a workload in the mesh is skipped: a name must not lead the proxy to
/// reach a mesh pod in plaintext.
async fn resolve_and_connect(ctx: &Context, pod: &Pod, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for to in tokio::net::lookup_host((host, port)).await? {
        if ctx.view.read(|s| s.workload_by_ip(to.ip()).is_some_and(|w| w.speaks_hbone())) {
            warn!(%host, address = %to.ip(), "a DNS answer names a workload in the mesh; not connecting to it in plaintext");
            last = Some(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "resolved to a mesh workload"));
            continue;
        }
        let attempt = match pod.sockets.outbound(to.is_ipv6()) {
            Ok(socket) => connect(socket, to).await,
            Err(e) => Err(e),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolved to no address")))
}

/// The original destination of a redirected connection (`SO_ORIGINAL_DST`, set by the capture
/// rule's REDIRECT).
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket().ok_or_else(|| std::io::Error::other("original destination is not an IP address"))
}

/// What the client has sent so far (up to [`MAX_EARLY_DATA`] bytes), read without waiting, to go
/// with the `CONNECT` ([`ConnectRequest::early_data`]): empty when it has sent nothing yet (a
/// server-speaks-first protocol, or a client not that quick) or has only closed; the copy reads
/// the rest. An error is the client's connection failing (a reset) and ends the set-up.
fn sent_so_far(downstream: &TcpStream) -> std::io::Result<bytes::Bytes> {
    use std::io::Read as _;
    let mut buf = [0u8; MAX_EARLY_DATA];
    // A read of the socket itself: tokio's own would answer from its readiness state, which the
    // reactor has not updated yet for a connection this new. The socket is non-blocking.
    match (&*socket2::SockRef::from(downstream)).read(&mut buf) {
        Ok(n) => Ok(bytes::Bytes::copy_from_slice(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(bytes::Bytes::new()),
        Err(e) => Err(e),
    }
}

/// Carries one pod's outbound connections (its 15001 listener).
#[derive(Debug)]
pub struct Outbound {
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    pool: Pool,
    lb: Balancer,
}

/// A route with what the metrics and the log say about it.
struct Decided {
    route: Route,
    info: ConnectionInfo,
}

/// Where an established connection goes.
enum Upstream {
    /// An HBONE stream.
    Tunnel(proto::hbone::H2Stream),
    /// A plain TCP connection (passthrough, egress to a resolved name).
    Plain(TcpStream),
}

/// A connection with both sides open: what its copy needs.
struct Established {
    downstream: TcpStream,
    upstream: Upstream,
    record: ConnectionRecord,
    /// The pod's own token (no per-connection one: nothing revokes an outbound connection alone).
    stop: CancellationToken,
}

/// Waits for the pod's token; boxed, as the copy keeps its stop inline and this one is not `Unpin`.
type PodGone = Pin<Box<WaitForCancellationFutureOwned>>;

/// A plain copy: what moved, whether the pod's going stopped it, and its error.
type PlainCopy = Pin<Box<dyn Future<Output = (copy::Transferred, bool, Option<std::io::Error>)> + Send>>;

/// The copy of an established connection.
#[allow(
    clippy::large_enum_variant,
    reason = "the common case, in place on purpose: boxing it would add an allocation per connection"
)]
enum Relay {
    /// Through an HBONE stream, in place.
    Tunnel(copy::CopyUntil<PodGone>),
    /// Plain TCP, boxed (bigger than the tunnel's, and rarer).
    Plain(PlainCopy),
}

impl Established {
    fn into_relay(self) -> (Relay, ConnectionRecord) {
        let Established { downstream, upstream, record, stop } = self;
        let stop = Box::pin(stop.cancelled_owned());
        let relay = match upstream {
            Upstream::Tunnel(tunnel) => Relay::Tunnel(copy::copy_bidirectional_until(downstream, tunnel, stop)),
            Upstream::Plain(upstream) => Relay::Plain(Box::pin(copy::copy_plain_until(downstream, upstream, stop))),
        };
        (relay, record)
    }
}

impl Outbound {
    /// For `pod`; its tunnels are dialed from the pod ([`PodDialer`]) and pooled per pod.
    pub fn new(ctx: Arc<Context>, pod: Arc<Pod>) -> Arc<Self> {
        let dialer = Arc::new(PodDialer(pod.sockets.clone()));
        let pool = Pool::with_dialer(ctx.pool.clone(), ctx.view.trust.clone(), dialer);
        Arc::new(Outbound { ctx, pod, pool, lb: Balancer::default() })
    }

    /// HBONE connections open in this pod's pool.
    pub fn pooled_connections(&self) -> usize {
        self.pool.connection_count()
    }

    /// Accepts captured connections until a drain starts; each connection holds `drain` until
    /// it ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut drain: DrainWatcher) {
        loop {
            let (stream, client) = tokio::select! {
                () = drain.signaled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(pod = %self.pod.name, error = %e, "accept failed on the outbound listener");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(self.connection(stream, client, None, drain.guard()));
        }
    }

    fn decide(&self, client: SocketAddr, dst: SocketAddr) -> Decided {
        self.ctx.view.read(|state| {
            let route = route(state, dst, &self.lb);
            let source = Peer::proven(state.workload_by_ip(client.ip()), Some(self.pod.identity.clone()));
            let (destination, mtls) = match &route {
                Route::Hbone { workload, .. } => (state.workload(workload).map(Peer::of).unwrap_or_default(), true),
                Route::Passthrough(to) => (state.workload_by_ip(to.ip()).map(Peer::of).unwrap_or_default(), false),
                Route::NoHealthyEndpoint(_) | Route::Refused(_) | Route::Resolve(..) | Route::Unregistered(_) => {
                    (Peer::default(), false)
                }
            };
            let service = state.service_by_vip(dst.ip()).cloned();
            let info =
                ConnectionInfo { reporter: Reporter::Source, src: client, dst, source, destination, service, mtls };
            Decided { route, info }
        })
    }

    /// The task of one captured connection: proxies `downstream` (from the app at `client`) to
    /// `dst` — `None`: its original destination, read from the socket — until both sides close or
    /// the pod goes, holding `guard` (the pod's drain) until then.
    ///
    /// A connection's task lives as long as the connection and its size is what every open
    /// connection costs, so it holds only what the copy needs (the copy, the record, the drain
    /// guard): the set-up (the original destination, decisions, the certificate, the `CONNECT`
    /// or the dial) runs in its own allocation, freed before the copy starts, and so does a plain
    /// copy (bigger than the tunnel's, and rarer).
    pub fn connection(
        self: &Arc<Self>,
        downstream: TcpStream,
        client: SocketAddr,
        dst: Option<SocketAddr>,
        guard: DrainGuard,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        // Boxed before the task's future is built, so the arguments are not kept in it either;
        // it hands back the drain guard with the connection, so the task holds only what it returns.
        let establish = Box::pin(async move {
            let dst = match dst.map_or_else(|| original_dst(&downstream), Ok) {
                Ok(dst) => dst,
                Err(e) => {
                    debug!(pod = %this.pod.name, %client, error = %e, "outbound connection without an original destination; closing");
                    return None;
                }
            };
            Some((this.establish(downstream, client, dst).await?, guard))
        });
        async move {
            // Bound in this arm only, so the set-up's results take no room beside the copy.
            let (mut relay, record, _guard) = match establish.await {
                Some((established, guard)) => {
                    let (relay, record) = established.into_relay();
                    (relay, record, guard)
                }
                None => return,
            };
            let (t, stopped, error) = match &mut relay {
                Relay::Tunnel(copy) => match copy.await {
                    Ok((t, stopped)) => (t, stopped, None),
                    Err(e) => (e.transferred, false, Some(e.to_string())),
                },
                Relay::Plain(copy) => {
                    let (t, stopped, error) = copy.await;
                    (t, stopped, error.map(|e| e.to_string()))
                }
            };
            let outcome = if stopped { Outcome::Shutdown } else { Outcome::Done };
            record.close(outcome, t.sent, t.received, error.as_deref());
        }
    }

    /// Decides where the connection goes and opens its upstream; `None` when it goes nowhere (the
    /// record is closed then, with the reason).
    async fn establish(&self, downstream: TcpStream, client: SocketAddr, dst: SocketAddr) -> Option<Established> {
        let _ = downstream.set_nodelay(true);
        let Decided { route, info } = self.decide(client, dst);
        // What Istio's ztunnel tells the other side: the service the client addressed, and the
        // client workload's attributes (telemetry only; never trusted for identity).
        let service = info.service.clone();
        let baggage = info.source.workload.as_ref().and_then(|w| w.baggage.clone());
        let record = ConnectionRecord::open(&self.ctx.metrics, info);
        let upstream = match route {
            Route::Hbone { hbone, target, identities, .. } => {
                let credential = match self.ctx.certs.fetch(&self.pod.identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        let detail = format!("no certificate for {}: {e}", self.pod.identity);
                        record.close(Outcome::ConnectFailed, 0, 0, Some(&detail));
                        return None;
                    }
                };
                let mut request = ConnectRequest::new(credential, hbone, identities, target)
                    .forwarded_for_service(client, service.as_deref().map(|s| s.hostname.as_str()));
                if let Some(b) = baggage {
                    request = request.baggage_value(b);
                }
                // Last, so the client has had the most time to speak.
                match sent_so_far(&downstream) {
                    Ok(early) => request = request.early_data(early),
                    Err(e) => {
                        record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("client connection failed: {e}")));
                        return None;
                    }
                }
                match self.pool.connect(request).await {
                    Ok(tunnel) => Upstream::Tunnel(tunnel),
                    Err(e) => {
                        let outcome = match &e {
                            PoolError::Refused { status, .. } if *status == StatusCode::UNAUTHORIZED => Outcome::Denied,
                            _ => Outcome::ConnectFailed,
                        };
                        record.close(outcome, 0, 0, Some(&e.to_string()));
                        return None;
                    }
                }
            }
            Route::Passthrough(to) => {
                let upstream = match self.pod.sockets.outbound(to.is_ipv6()) {
                    Ok(socket) => connect(socket, to).await,
                    Err(e) => Err(e),
                };
                match upstream {
                    Ok(u) => Upstream::Plain(u),
                    Err(e) => {
                        record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("passthrough: {e}")));
                        return None;
                    }
                }
            }
            Route::Resolve(host, port) => match resolve_and_connect(&self.ctx, &self.pod, &host, port).await {
                Ok(u) => Upstream::Plain(u),
                Err(e) => {
                    record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("{host}:{port}: {e}")));
                    return None;
                }
            },
            Route::Unregistered(to) => {
                let detail = format!(
                    "outboundTrafficPolicy REGISTRY_ONLY: {to} is no workload, service or ServiceEntry address"
                );
                record.close(Outcome::Denied, 0, 0, Some(&detail));
                return None;
            }
            Route::NoHealthyEndpoint(service) => {
                record.close(Outcome::ConnectFailed, 0, 0, Some(&format!("service {service} has no healthy endpoint")));
                return None;
            }
            Route::Refused(workload) => {
                let detail = format!("the destination's workload was refused by this proxy ({workload})");
                record.close(Outcome::ConnectFailed, 0, 0, Some(&detail));
                return None;
            }
        };
        Some(Established { downstream, upstream, record, stop: self.pod.cancel.clone() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    /// What the client sent is taken (once, at most `MAX_EARLY_DATA`), nothing is waited for, a
    /// client that only closed gives nothing, and a reset is the set-up's error.
    #[tokio::test]
    async fn early_data_is_what_the_client_already_sent() {
        let (mut client, accepted) = pair().await;
        assert!(sent_so_far(&accepted).unwrap().is_empty(), "nothing sent yet");
        let big = vec![7u8; MAX_EARLY_DATA + 100];
        client.write_all(&big).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sent_so_far(&accepted).unwrap().len(), MAX_EARLY_DATA);
        assert_eq!(sent_so_far(&accepted).unwrap().len(), 100, "the rest, not the same bytes again");

        let (client, accepted) = pair().await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(sent_so_far(&accepted).unwrap().is_empty(), "a close is no data");

        let (client, accepted) = pair().await;
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let err = sent_so_far(&accepted).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
}
