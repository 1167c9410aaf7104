//! Network namespaces: ztunnel runs in the node's namespace but opens each pod's listeners and
//! outgoing sockets *inside the pod's* namespace (from the descriptor ZDS hands over).
//!
//! A socket belongs to the namespace it was created in, for its whole life, whichever thread uses
//! it later. So creating one in a pod's namespace is: the calling thread joins the namespace
//! (`setns`), creates the socket, and returns to its own namespace before doing anything else: two
//! system calls, cheap enough for every connection. A guard restores the thread's namespace even if
//! the closure fails; if that ever became impossible the process aborts rather than run on in the
//! wrong namespace.
//!
//! Sockets ztunnel opens for traffic carry [`crate::node::capture::ZTUNNEL_MARK`] so the pod's capture
//! rules let them through instead of redirecting them back to ztunnel.

use std::cell::OnceCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sched::{CloneFlags, setns, unshare};
use tokio::net::TcpSocket;

use crate::node::capture::ZTUNNEL_MARK;

/// A network namespace, held open by a descriptor.
#[derive(Debug, Clone)]
pub struct NetNs {
    fd: Arc<OwnedFd>,
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

thread_local! {
    /// The namespace this thread lives in (taken at its first switch, when it is at home).
    static HOME: OnceCell<OwnedFd> = const { OnceCell::new() };
}

/// Returns the thread to its home namespace when dropped.
struct Return<'a>(std::os::fd::BorrowedFd<'a>);

impl Drop for Return<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0, CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return a thread to its own network namespace; aborting");
            std::process::abort();
        }
    }
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

    /// A namespace by path (`/proc/<pid>/ns/net`, `/var/run/netns/<name>`).
    pub fn open(path: &std::path::Path) -> io::Result<NetNs> {
        Ok(NetNs { fd: Arc::new(std::fs::File::open(path)?.into()) })
    }

    /// A new, empty namespace (only a loopback interface, down), alive while this value (or a
    /// socket or process in it) is.
    pub fn new_isolated() -> io::Result<NetNs> {
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_err)?;
            NetNs::current()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// The descriptor (to pass over ZDS, or as `/proc/<pid>/fd/<n>` to tools).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The namespace's inode: two descriptors name the same namespace when these are equal.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))?.ino())
    }

    /// Runs `f` on the calling thread while it is inside this namespace. `f` must not block for
    /// long or await: the thread is switched only for its duration. Child processes spawned by
    /// `f` start in this namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        HOME.with(|home| {
            let home = match home.get() {
                Some(fd) => fd,
                None => {
                    let fd: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")?.into();
                    home.get_or_init(|| fd)
                }
            };
            setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(nix_err)?;
            let _back = Return(home.as_fd());
            f()
        })
    }

    /// A TCP listener bound to `addr` inside this namespace (call from within a tokio runtime),
    /// with `SO_REUSEADDR` (it binds beside a predecessor's `TIME_WAIT` sockets) and without
    /// `SO_REUSEPORT`: no other socket can join the port while it listens. A pod's listeners
    /// pass to a successor ztunnel as they are ([`crate::handoff`]).
    pub fn tcp_listener(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std = self.run(|| tcp_listener(addr, false))?;
        tokio::net::TcpListener::from_std(std)
    }

    /// A UDP socket bound to `addr` inside this namespace (call from within a tokio runtime).
    pub fn udp_socket(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let std = self.run(|| udp_socket(addr))?;
        tokio::net::UdpSocket::from_std(std)
    }

    /// An unconnected TCP socket inside this namespace, for connecting out from it.
    pub fn tcp_socket(&self, ipv6: bool) -> io::Result<TcpSocket> {
        self.run(|| if ipv6 { TcpSocket::new_v6() } else { TcpSocket::new_v4() })
    }

    /// A socket for ztunnel's own traffic out of this namespace (tunnels, passthrough): marked so
    /// the capture rules let it through.
    pub fn marked_socket(&self, ipv6: bool) -> io::Result<TcpSocket> {
        let socket = self.tcp_socket(ipv6)?;
        socket2::SockRef::from(&socket).set_mark(ZTUNNEL_MARK)?;
        Ok(socket)
    }

    /// A marked socket bound to `source`, an address that need not be local (`IP_TRANSPARENT`):
    /// ztunnel connects to a pod's app *as the original client*, so the app sees the real source
    /// IP. The pod's capture rules route the app's replies back to this socket.
    pub fn transparent_socket(&self, source: IpAddr) -> io::Result<TcpSocket> {
        let socket = self.marked_socket(source.is_ipv6())?;
        let sock = socket2::SockRef::from(&socket);
        if source.is_ipv6() {
            sock.set_ip_transparent_v6(true)?;
        } else {
            sock.set_ip_transparent_v4(true)?;
        }
        socket.bind(SocketAddr::new(source, 0))?;
        Ok(socket)
    }
}

/// A non-blocking TCP listener on `addr` in the calling thread's namespace that a successor
/// process can bind beside (`SO_REUSEPORT`; the kernel then spreads new connections over both
/// until one closes) and that binds beside a predecessor's `TIME_WAIT` sockets (`SO_REUSEADDR`).
/// Only a process of the same user can join the port: another user's bind still fails. For
/// ztunnel's own endpoints in the node's namespace (admin, metrics, readiness), where only the
/// node's root runs; never for a pod's ports, where an app running as root could join.
pub fn shared_tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    tcp_listener(addr, true)
}

fn socket(addr: SocketAddr, ty: socket2::Type, reuse_port: bool) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty.nonblocking(), None)?;
    socket.set_reuse_port(reuse_port)?;
    Ok(socket)
}

fn tcp_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = socket(addr, socket2::Type::STREAM, reuse_port)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket(addr, socket2::Type::DGRAM, false)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
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

    /// A successor binds beside a listening predecessor and both take connections; the
    /// predecessor closing leaves the successor serving; an app's plain bind cannot join.
    #[tokio::test]
    async fn a_successor_listens_beside_its_predecessor() {
        let old = shared_tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = old.local_addr().unwrap();
        let new = tokio::net::TcpListener::from_std(shared_tcp_listener(addr).unwrap()).unwrap();
        let old = tokio::net::TcpListener::from_std(old).unwrap();
        let err = std::net::TcpListener::bind(addr).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "a socket without SO_REUSEPORT joined the port");
        // The kernel spreads connections over both (by the 4-tuple's hash): with 64 clients each
        // gets some.
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let (mut to_old, mut to_new) = (0, 0);
        let idle = std::time::Duration::from_millis(100);
        loop {
            tokio::select! {
                Ok(_) = old.accept() => to_old += 1,
                Ok(_) = new.accept() => to_new += 1,
                () = tokio::time::sleep(idle) => break,
            }
        }
        assert_eq!(to_old + to_new, 64);
        assert!(to_old > 0 && to_new > 0, "old took {to_old}, new {to_new}");
        drop(old);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(idle * 10, new.accept()).await.unwrap().unwrap();
    }
}
