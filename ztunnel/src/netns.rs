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

    /// A TCP listener bound to `addr` inside this namespace (call from within a tokio runtime).
    pub fn tcp_listener(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std = self.run(|| {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM.nonblocking(),
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(std::net::TcpListener::from(socket))
        })?;
        tokio::net::TcpListener::from_std(std)
    }

    /// A UDP socket bound to `addr` inside this namespace (call from within a tokio runtime).
    pub fn udp_socket(&self, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let std = self.run(|| {
            let socket = std::net::UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })?;
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
