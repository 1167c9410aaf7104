//! Outbound (15001): where a captured connection goes, decided from its original destination by
//! [`proto::route`] (shared with the CA, which explains connections with it); [`Outbound`] applies
//! it to each captured connection, with one HBONE connection pool per pod (a pool never mixes
//! source identities).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use proto::drain::DrainWatcher;
use proto::hbone::copy;
use proto::hbone::pool::{ConnectRequest, Pool, PoolError};
use proto::hbone::server::StatusCode;
pub use proto::route::{Balancer, Route, is_waypoint_of, route};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::{debug, warn};

use crate::context::Context;
use crate::pod::{Pod, PodDialer, connect};
use crate::telemetry::{ConnectionInfo, ConnectionRecord, Outcome, Peer};

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
            let this = self.clone();
            let watcher = drain.clone();
            tokio::spawn(async move {
                let _watcher = watcher;
                match original_dst(&stream) {
                    Ok(dst) => this.handle(stream, client, dst).await,
                    Err(e) => {
                        debug!(pod = %this.pod.name, %client, error = %e, "outbound connection without an original destination; closing")
                    }
                }
            });
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
            let service = state.service_by_vip(dst.ip()).map(|s| s.hostname.clone()).unwrap_or_default();
            let info = ConnectionInfo { reporter: "source", src: client, dst, source, destination, service, mtls };
            Decided { route, info }
        })
    }

    /// Proxies `downstream` (from the app at `client`) to `dst`, its original destination, until
    /// both sides close.
    ///
    /// A connection's task lives as long as the connection and its size is what every open
    /// connection costs, so it holds only what the copy needs: the set-up (decisions, the
    /// certificate, the `CONNECT` or the dial) runs in its own allocation, freed before the copy
    /// starts, and so does a plain copy (bigger than the tunnel's, and rarer).
    pub fn handle(&self, downstream: TcpStream, client: SocketAddr, dst: SocketAddr) -> impl Future<Output = ()> + '_ {
        // Boxed before the task's future is built, so the arguments are not kept in it either.
        let establish = Box::pin(self.establish(downstream, client, dst));
        async move {
            let Some(Established { downstream, upstream, record }) = establish.await else { return };
            // The pod's own token (no per-connection child: nothing revokes an outbound connection alone).
            let stop = Box::pin(self.pod.cancel.clone().cancelled_owned());
            match upstream {
                Upstream::Tunnel(tunnel) => {
                    self.relay(copy::copy_bidirectional_until(downstream, tunnel, stop), record).await;
                }
                Upstream::Plain(upstream) => {
                    let (t, stopped, error) = Box::pin(copy::copy_plain_until(downstream, upstream, stop)).await;
                    record.close(self.ended(stopped), t.sent, t.received, error.map(|e| e.to_string()).as_deref());
                }
            }
        }
    }

    /// Decides where the connection goes and opens its upstream; `None` when it goes nowhere (the
    /// record is closed then, with the reason).
    async fn establish(&self, downstream: TcpStream, client: SocketAddr, dst: SocketAddr) -> Option<Established> {
        let _ = downstream.set_nodelay(true);
        let Decided { route, info } = self.decide(client, dst);
        // What Istio's ztunnel tells the other side: the service the client addressed, and the
        // client workload's attributes (telemetry only; never trusted for identity).
        let service = (!info.service.is_empty()).then(|| info.service.clone());
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
                    .forwarded_for_service(client, service.as_deref());
                if let Some(b) = baggage {
                    request = request.baggage_value(b);
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
        Some(Established { downstream, upstream, record })
    }

    /// Copies until both sides close (or the pod goes), then closes the record. An `async`
    /// block that owns both and awaits the copy in place stores each once (an `async fn` would
    /// keep its arguments twice, and `.await` on the copy would move it into a third slot).
    #[allow(clippy::manual_async_fn, reason = "an async fn would store its arguments twice (see above)")]
    fn relay(
        &self,
        mut copy: copy::CopyUntil<Pin<Box<WaitForCancellationFutureOwned>>>,
        record: ConnectionRecord,
    ) -> impl Future<Output = ()> + '_ {
        async move {
            match (&mut copy).await {
                Ok((t, stopped)) => record.close(self.ended(stopped), t.sent, t.received, None),
                Err(e) => {
                    let t = e.transferred;
                    record.close(Outcome::Done, t.sent, t.received, Some(&e.to_string()))
                }
            }
        }
    }

    fn ended(&self, stopped: bool) -> Outcome {
        if stopped { Outcome::Shutdown } else { Outcome::Done }
    }
}
