//! Inbound HBONE (15008): a `CONNECT` from a peer ztunnel (or waypoint) to a pod on this node.
//!
//! The HBONE server has already completed mTLS (presenting the destination pod's certificate) and
//! validated the request (authority is the IP the connection landed on, not one of our ports). Here:
//! 1. the destination must be a workload the control plane knows at that IP, or `400`;
//! 2. L4 authorization with the peer's identity from the handshake, or `401`;
//! 3. connect to the app (through [`Upstream`]: from inside the pod's namespace, keeping the
//!    client's source IP), or `503`;
//! 4. `200` and bytes both ways until both sides close.
//!
//! One log line per connection says who, where, the decision and the bytes each way.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::hbone::server::{Handler, InboundConnect, StatusCode};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::rbac::{self, Connection, Decision};
use crate::xds::MeshView;

/// How ztunnel reaches the destination app.
pub trait Upstream: Send + Sync + 'static {
    /// Connects to `target` on behalf of the client at `client` (whose IP the app should see).
    fn connect(&self, target: SocketAddr, client: SocketAddr) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

/// Plain connect from ztunnel's own namespace, source address not preserved (tests, loopback).
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectUpstream;

impl Upstream for DirectUpstream {
    async fn connect(&self, target: SocketAddr, _client: SocketAddr) -> io::Result<TcpStream> {
        TcpStream::connect(target).await
    }
}

/// The inbound handler.
#[derive(Debug)]
pub struct Inbound<U> {
    view: Arc<MeshView>,
    upstream: U,
}

impl<U: Upstream> Inbound<U> {
    /// Serves destinations described by `view`, reaching them through `upstream`.
    pub fn new(view: Arc<MeshView>, upstream: U) -> Arc<Self> {
        Arc::new(Inbound { view, upstream })
    }
}

impl<U: Upstream> Handler for Inbound<U> {
    async fn handle(&self, connect: InboundConnect) {
        let peer = connect.peer_identity.clone();
        let target = connect.target;
        // The client's own address, as the sending ztunnel saw it (`forwarded: for=`), else the
        // peer ztunnel's.
        let client_ip = connect
            .headers
            .get(proto::hbone::FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(proto::hbone::parse_forwarded_for)
            .unwrap_or(connect.peer_addr.ip());
        let client = SocketAddr::new(client_ip, 0);

        let decision = self.view.read(|state| {
            let destination = state.workload_by_ip(target.ip())?;
            let conn = Connection {
                source: Some(&peer),
                source_ip: client_ip,
                destination_ip: target.ip(),
                destination_port: target.port(),
            };
            Some((destination.uid.clone(), rbac::authorize(state, destination, &conn)))
        });
        let Some((workload, decision)) = decision else {
            warn!(src.identity = %peer, dst.addr = %target, "inbound refused: no workload at the destination address");
            connect.reject(StatusCode::BAD_REQUEST);
            return;
        };
        if let Decision::DeniedBy(_) | Decision::NotAllowed = decision {
            info!(src.identity = %peer, src.ip = %client_ip, dst.workload = %workload, dst.addr = %target,
                ?decision, "inbound denied by policy");
            connect.reject(StatusCode::UNAUTHORIZED);
            return;
        }
        let app = match self.upstream.connect(target, client).await {
            Ok(s) => s,
            Err(e) => {
                warn!(src.identity = %peer, dst.workload = %workload, dst.addr = %target, error = %e,
                    "inbound: the app did not accept the connection");
                connect.reject(StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        let tunnel = match connect.accept() {
            Ok(t) => t,
            Err(e) => {
                warn!(src.identity = %peer, error = %e, "inbound: client went away before the answer");
                return;
            }
        };
        let result = proto::hbone::copy::copy_bidirectional(app, tunnel).await;
        match result {
            Ok(t) => info!(src.identity = %peer, src.ip = %client_ip, dst.workload = %workload, dst.addr = %target,
                bytes_from_client = t.received, bytes_to_client = t.sent, "inbound connection complete"),
            Err(e) => info!(src.identity = %peer, src.ip = %client_ip, dst.workload = %workload, dst.addr = %target,
                error = %e, "inbound connection ended with an error"),
        }
    }
}
