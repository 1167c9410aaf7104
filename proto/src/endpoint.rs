//! The small HTTP endpoints every part serves (metrics, readiness, admin), with bounds: anyone
//! who can reach a metrics port must not be able to hold the process's file descriptors or
//! memory. One place serves them all:
//! - at most [`EndpointLimits::max_connections`] connections at once; more are closed at once
//!   (a slowloris on 15020 cannot starve a proxy of descriptors for pod traffic);
//! - a request's headers must arrive within [`EndpointLimits::header_read_timeout`], and a
//!   connection with no request in flight is closed after the same time;
//! - HTTP/1.1 only, headers at most 16 KiB;
//! - each request carries its TCP peer ([`PeerAddr`]).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// The TCP peer of a request to an endpoint, in its extensions (for endpoints that answer only
/// on loopback).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Bounds on one HTTP endpoint.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (and for an idle connection to send one).
    pub header_read_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits { max_connections: 64, header_read_timeout: Duration::from_secs(10) }
    }
}

/// Serves `service` on `listener` within `limits` until `stop` resolves; connections in flight
/// then finish their current request.
pub async fn serve<S, B>(listener: TcpListener, service: S, limits: EndpointLimits, stop: impl Future<Output = ()>)
where
    S: tower::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = listener.local_addr().ok();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    let mut refused = 0u64;
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(?addr, error = %e, "accept failed on an HTTP endpoint");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                warn!(?addr, %peer, refused, max = limits.max_connections,
                    "HTTP endpoint at its connection limit; closing new connections");
            }
            continue;
        };
        let service = TowerToHyperService::new(tower::util::MapRequest::new(
            service.clone(),
            move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            },
        ));
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = stop_rx.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "HTTP endpoint connection ended with an error");
            }
        });
    }
    let _ = stop_tx.send(true);
}
