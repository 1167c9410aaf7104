//! One pod as ztunnel serves it: who it is, and how its sockets are made.
//!
//! [`PodSockets`] is the only place that knows where a pod's sockets live. In a mesh they are made
//! inside the pod's network namespace ([`NetNs`]), marked so capture lets them through, and the
//! connection to the app carries the client's IP; [`Loopback`] makes plain sockets in ztunnel's own
//! namespace (tests that run without namespaces).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use proto::SpiffeId;
use proto::hbone::pool::{Dialer, PoolKey};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::netns::NetNs;

/// How a pod's sockets are made.
pub trait PodSockets: Send + Sync + fmt::Debug + 'static {
    /// A socket for ztunnel's own traffic leaving the pod (HBONE, passthrough).
    fn outbound(&self, ipv6: bool) -> io::Result<TcpSocket>;
    /// A socket to the pod's app that presents `client` as its source.
    fn as_client(&self, client: IpAddr) -> io::Result<TcpSocket>;
}

impl PodSockets for NetNs {
    fn outbound(&self, ipv6: bool) -> io::Result<TcpSocket> {
        self.marked_socket(ipv6)
    }

    fn as_client(&self, client: IpAddr) -> io::Result<TcpSocket> {
        self.transparent_socket(client)
    }
}

/// Plain sockets in ztunnel's own namespace; the app sees ztunnel's address.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loopback;

impl PodSockets for Loopback {
    fn outbound(&self, ipv6: bool) -> io::Result<TcpSocket> {
        if ipv6 { TcpSocket::new_v6() } else { TcpSocket::new_v4() }
    }

    fn as_client(&self, client: IpAddr) -> io::Result<TcpSocket> {
        self.outbound(client.is_ipv6())
    }
}

/// Connects `socket` to `target` with the proxy's socket options (no Nagle delay).
pub async fn connect(socket: TcpSocket, target: SocketAddr) -> io::Result<TcpStream> {
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Dials HBONE connections from the pod (its IP as source, marked).
#[derive(Debug, Clone)]
pub struct PodDialer(pub Arc<dyn PodSockets>);

impl Dialer for PodDialer {
    fn dial<'a>(&'a self, key: &'a PoolKey) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>> {
        Box::pin(async move {
            let socket = self.0.outbound(key.dst.is_ipv6())?;
            let tcp = socket.connect(key.dst).await?;
            proto::hbone::configure_socket(&tcp)?;
            Ok(tcp)
        })
    }
}

/// A pod served by this ztunnel.
#[derive(Debug)]
pub struct Pod {
    /// The Kubernetes pod uid (from ZDS).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Its SPIFFE ID (namespace + service account).
    pub identity: SpiffeId,
    /// Where its sockets are made.
    pub sockets: Arc<dyn PodSockets>,
    /// Cancelled when the pod's proxy is torn down: every connection of the pod ends.
    pub cancel: CancellationToken,
}
