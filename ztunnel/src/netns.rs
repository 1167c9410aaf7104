//! Network namespaces: ztunnel runs in the node's namespace but opens each pod's listeners
//! *inside the pod's* namespace (from the descriptor ZDS hands over).
//!
//! A socket belongs to the namespace it was created in, for its whole life, whichever thread uses
//! it later. So creating one in a pod's namespace takes a short-lived thread that joins the
//! namespace (`setns`), creates the socket and exits; the runtime's threads never change namespace.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns, unshare};

/// A network namespace, held open by a descriptor.
#[derive(Debug, Clone)]
pub struct NetNs {
    fd: Arc<OwnedFd>,
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<NetNs> {
        Ok(NetNs { fd: Arc::new(std::fs::File::open("/proc/thread-self/ns/net")?.into()) })
    }

    /// A namespace passed as a descriptor (ZDS).
    pub fn from_fd(fd: OwnedFd) -> NetNs {
        NetNs { fd: Arc::new(fd) }
    }

    /// A new, empty namespace (only a loopback interface, down), alive while this value (or a
    /// socket in it) is. For tests and the one-machine harness.
    pub fn new_isolated() -> io::Result<NetNs> {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_err)?;
            NetNs::current()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let fd = self.fd.as_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                setns(fd, CloneFlags::CLONE_NEWNET).map_err(nix_err)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
        })
    }

    /// A TCP listener bound to `addr` inside this namespace (call from within a tokio runtime).
    pub fn tcp_listener(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std = self.run(|| {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        tokio::net::TcpListener::from_std(std)
    }

    /// An unconnected TCP socket inside this namespace, for connecting out from it.
    pub fn tcp_socket(&self, ipv6: bool) -> io::Result<tokio::net::TcpSocket> {
        self.run(|| if ipv6 { tokio::net::TcpSocket::new_v6() } else { tokio::net::TcpSocket::new_v4() })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn listeners_live_in_the_namespace_they_were_made_in() {
        let pod = NetNs::new_isolated().unwrap();
        let inside = pod.tcp_listener("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = inside.local_addr().unwrap().port();
        // The same port is free on the host: the two sockets are in different namespaces.
        let host = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.unwrap();
        // A connection from the host reaches the host listener, never the pod's.
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (_, _) = host.accept().await.unwrap();
        let pending = tokio::time::timeout(std::time::Duration::from_millis(100), inside.accept()).await;
        assert!(pending.is_err(), "nothing reaches the pod's listener from the host");
        // The pod's loopback is down, as in a fresh namespace: connecting from inside fails fast.
        let socket = pod.tcp_socket(false).unwrap();
        assert!(socket.connect(([127, 0, 0, 1], port).into()).await.is_err());
        // The calling thread never changed namespace.
        let me = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        assert_eq!(me, std::fs::read_link("/proc/self/ns/net").unwrap());
    }
}
