//! Handing a node's pods from a running ztunnel to the next one (an upgrade or a restart) without
//! refusing or resetting a connection, and without a pod's ports ever being open to another
//! process: the successor gets the very listening sockets, not new ones bound beside them.
//!
//! Every ztunnel serves a Unix socket next to the node agent's (`ztunnel-handoff.sock` in the
//! directory of the ZDS socket, mode 0600). A new ztunnel, once it has the mesh state, connects to
//! it before it follows the node agent:
//!
//! 1. The running ztunnel (the predecessor) lets go of the node agent, so that what the agent
//!    sends from then on (new pods, removals) goes to the successor alone, and sends, for each pod
//!    it serves, the pod's uid, its namespace's inode and its listening sockets (`SCM_RIGHTS`).
//! 2. The successor follows the node agent. For a pod the agent's snapshot names, it serves the
//!    handed sockets once it has checked them: each is the kind it claims (a listening TCP socket,
//!    a bound UDP one), on its port, and lives in the namespace the agent sent. Both processes
//!    accept from the same queue meanwhile, so nothing waits on a socket about to close.
//! 3. Once its snapshot is applied and no pod is pending, the successor says `taken`. The
//!    predecessor stops accepting, stops being ready and relays the connections it holds until
//!    they end or `--drain-timeout` passes; then it waits for SIGTERM (exiting earlier would make
//!    a supervisor restart it, and it would take the pods back).
//!
//! If the successor goes away before `taken`, the predecessor follows the node agent again and
//! serves on. Only a process of ztunnel's own user may connect, and the successor accepts sockets
//! only from one (both ends check the peer's credentials). One successor at a time: a second
//! connection waits until the first is done.
//!
//! Messages are JSON, one per packet, tagged by `type`: `hello {version}` (successor),
//! `pod {uid, netns_inode, sockets}` with the sockets attached in the order named, `end {pods}`
//! (predecessor), `taken` (successor).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::netns::NetNs;
use crate::pods::{OUTBOUND_PORT, PLAINTEXT_PORT, PodListeners, Proxy};
use crate::zds::{self, PacketError};

/// Where the handoff socket is when the node agent's ZDS socket is at `zds_socket`: beside it, in
/// a directory both generations of ztunnel on a node mount, named after it
/// (`/var/run/ztunnel/ztunnel.sock` → `/var/run/ztunnel/ztunnel-handoff.sock`).
pub fn default_path(zds_socket: &Path) -> PathBuf {
    let stem = zds_socket.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    zds_socket.with_file_name(format!("{stem}-handoff.sock"))
}

const VERSION: u32 = 1;
const MAX_MESSAGE: usize = 16 * 1024;
/// How long a successor waits for its predecessor's sockets.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// One of a pod's listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SocketKind {
    /// 15001, TCP.
    Outbound,
    /// 15006, TCP.
    Plaintext,
    /// 15008, TCP.
    Hbone,
    /// 15053 on the pod's loopback, UDP.
    DnsUdp,
    /// 15053 on the pod's loopback, TCP.
    DnsTcp,
}

impl SocketKind {
    fn port(self) -> u16 {
        match self {
            SocketKind::Outbound => OUTBOUND_PORT,
            SocketKind::Plaintext => PLAINTEXT_PORT,
            SocketKind::Hbone => proto::hbone::HBONE_PORT,
            SocketKind::DnsUdp | SocketKind::DnsTcp => crate::dns::DNS_PORT,
        }
    }

    fn is_tcp(self) -> bool {
        self != SocketKind::DnsUdp
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello { version: u32, node: String },
    Pod { uid: String, netns_inode: Option<u64>, sockets: Vec<SocketKind> },
    End { pods: usize },
    Taken,
}

/// Why a handoff failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The socket could not be bound, connected to or used.
    #[error("handoff socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A packet could not be read or sent.
    #[error("handoff socket {path}")]
    Packet {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: PacketError,
    },
    /// The peer runs as another user.
    #[error("handoff peer runs as uid {peer}, not this ztunnel's {ours}: refused")]
    ForeignPeer {
        /// The peer's uid.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// A message made no sense.
    #[error("handoff protocol: {0}")]
    Protocol(String),
    /// The predecessor sent nothing in time.
    #[error("the running ztunnel did not hand its sockets over within {0:?}")]
    Timeout(Duration),
}

/// Why handed sockets were not used for a pod (it is then bound anew).
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// They came for another namespace than the node agent sent.
    #[error("handed for namespace inode {handed:?}, the node agent sent {sent:?}")]
    OtherNamespace {
        /// The predecessor's.
        handed: Option<u64>,
        /// The agent's.
        sent: Option<u64>,
    },
    /// A socket is not what it was said to be.
    #[error("the {kind:?} socket: {reason}")]
    Socket {
        /// Which.
        kind: SocketKind,
        /// What is wrong.
        reason: String,
    },
    /// A socket is missing.
    #[error("no {0:?} socket was handed")]
    Missing(SocketKind),
    /// Inspecting a socket failed.
    #[error("inspecting the handed sockets")]
    Io(#[from] io::Error),
}

/// A pod's listening sockets, as a predecessor hands them over.
#[derive(Debug)]
pub struct HandedPod {
    pub(crate) netns_inode: Option<u64>,
    pub(crate) sockets: Vec<(SocketKind, OwnedFd)>,
}

impl HandedPod {
    /// The sockets as the pod's listeners, once checked against `netns`, the namespace the node
    /// agent sent for the pod.
    pub fn into_listeners(self, netns: &NetNs) -> Result<PodListeners, Unusable> {
        let sent = netns.inode().ok();
        if self.netns_inode.is_none() || self.netns_inode != sent {
            return Err(Unusable::OtherNamespace { handed: self.netns_inode, sent });
        }
        let mut sockets: HashMap<SocketKind, socket2::Socket> = HashMap::new();
        for (kind, fd) in self.sockets {
            let socket = socket2::Socket::from(fd);
            check(kind, &socket, netns)?;
            socket.set_nonblocking(true)?;
            sockets.insert(kind, socket);
        }
        let mut take = |kind| sockets.remove(&kind).ok_or(Unusable::Missing(kind));
        let tcp = |s: socket2::Socket| tokio::net::TcpListener::from_std(s.into());
        let listeners = PodListeners {
            outbound: tcp(take(SocketKind::Outbound)?)?,
            plaintext: tcp(take(SocketKind::Plaintext)?)?,
            hbone: tcp(take(SocketKind::Hbone)?)?,
            dns: match (take(SocketKind::DnsUdp), take(SocketKind::DnsTcp)) {
                (Ok(udp), Ok(t)) => Some((tokio::net::UdpSocket::from_std(udp.into())?, tcp(t)?)),
                (Err(Unusable::Missing(_)), Err(Unusable::Missing(_))) => None,
                (Err(e), _) | (_, Err(e)) => return Err(e),
            },
        };
        Ok(listeners)
    }
}

/// Checks that `socket` is a `kind` socket (type, listening, port) living in `netns`.
fn check(kind: SocketKind, socket: &socket2::Socket, netns: &NetNs) -> Result<(), Unusable> {
    let bad = |reason: String| Unusable::Socket { kind, reason };
    let ty = socket.r#type()?;
    if kind.is_tcp() {
        if ty != socket2::Type::STREAM || !socket.is_listener()? {
            return Err(bad("not a listening TCP socket".into()));
        }
    } else if ty != socket2::Type::DGRAM {
        return Err(bad("not a UDP socket".into()));
    }
    let port = socket.local_addr()?.as_socket().map(|a: SocketAddr| a.port());
    if port != Some(kind.port()) {
        return Err(bad(format!("bound to port {port:?}, not {}", kind.port())));
    }
    // A socket's inode appears in the socket tables of exactly its own namespace.
    let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd()))?;
    let inode = link
        .to_str()
        .and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']'))
        .ok_or_else(|| bad(format!("descriptor is {}", link.display())))?
        .to_owned();
    let tables: &[&str] = if kind.is_tcp() { &["tcp", "tcp6"] } else { &["udp", "udp6"] };
    let found = netns.run(|| {
        for table in tables {
            let text = match std::fs::read_to_string(format!("/proc/thread-self/net/{table}")) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Columns: sl local remote st tx:rx tr:when retrnsmt uid timeout inode ...
            if text.lines().skip(1).any(|l| l.split_whitespace().nth(9) == Some(inode.as_str())) {
                return Ok(true);
            }
        }
        Ok(false)
    })?;
    if !found {
        return Err(bad("does not live in the pod's network namespace".into()));
    }
    Ok(())
}

fn encode(message: &Message) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Result<Message, HandoffError> {
    serde_json::from_slice(bytes).map_err(|e| HandoffError::Protocol(format!("undecodable message: {e}")))
}

/// Checks that the peer of `sock` runs as this process's user; returns its pid.
fn same_user(sock: &UnixSeqpacket) -> io::Result<Result<Option<i32>, HandoffError>> {
    let peer = sock.peer_cred()?;
    let ours = tokio_seqpacket::UCred::from_current_process().uid();
    Ok(if peer.uid() == ours { Ok(peer.pid()) } else { Err(HandoffError::ForeignPeer { peer: peer.uid(), ours }) })
}

/// The successor's end, connected to a predecessor that handed its pods over.
#[derive(Debug)]
pub struct Predecessor {
    sock: UnixSeqpacket,
    path: PathBuf,
    /// The predecessor's process id.
    pub pid: Option<i32>,
    /// Its pods' sockets, by pod uid.
    pub pods: HashMap<String, HandedPod>,
}

impl Predecessor {
    /// Connects to a running ztunnel of node `node` at `path` and receives its pods' sockets;
    /// `None` when no ztunnel serves the socket (none runs, or one that does not hand over).
    pub async fn take_over(path: &Path, node: &str) -> Result<Option<Predecessor>, HandoffError> {
        let io_err = |source| HandoffError::Io { path: path.to_owned(), source };
        let sock = match UnixSeqpacket::connect(path).await {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Ok(None);
            }
            Err(e) => return Err(io_err(e)),
        };
        let pid = same_user(&sock).map_err(io_err)??;
        let mut predecessor = Predecessor { sock, path: path.to_owned(), pid, pods: HashMap::new() };
        predecessor.send(&Message::Hello { version: VERSION, node: node.to_owned() }).await?;
        tokio::time::timeout(RECEIVE_TIMEOUT, predecessor.receive())
            .await
            .map_err(|_| HandoffError::Timeout(RECEIVE_TIMEOUT))??;
        Ok(Some(predecessor))
    }

    async fn receive(&mut self) -> Result<(), HandoffError> {
        loop {
            let (bytes, fds) = zds::recv(&self.sock, MAX_MESSAGE)
                .await
                .map_err(|source| HandoffError::Packet { path: self.path.clone(), source })?;
            match decode(&bytes)? {
                Message::Pod { uid, netns_inode, sockets } => {
                    if sockets.len() != fds.len() {
                        return Err(HandoffError::Protocol(format!(
                            "pod {uid}: {} sockets named, {} attached",
                            sockets.len(),
                            fds.len()
                        )));
                    }
                    let sockets = sockets.into_iter().zip(fds).collect();
                    self.pods.insert(uid, HandedPod { netns_inode, sockets });
                }
                Message::End { pods } if pods == self.pods.len() => return Ok(()),
                Message::End { pods } => {
                    return Err(HandoffError::Protocol(format!("{pods} pods announced, {} received", self.pods.len())));
                }
                other => return Err(HandoffError::Protocol(format!("unexpected {other:?}"))),
            }
        }
    }

    async fn send(&self, message: &Message) -> Result<(), HandoffError> {
        zds::send(&self.sock, &encode(message), &[])
            .await
            .map_err(|source| HandoffError::Packet { path: self.path.clone(), source })
    }

    /// Tells the predecessor its pods are served here now: it stops accepting and drains.
    pub async fn taken(self) -> Result<(), HandoffError> {
        self.send(&Message::Taken).await
    }
}

/// Lets a handoff take the node agent away from this ztunnel's follower, and give it back.
#[derive(Debug)]
pub struct ZdsGate {
    paused: watch::Sender<bool>,
    /// Held by the follower while it follows the node agent.
    following: tokio::sync::Mutex<()>,
}

impl Default for ZdsGate {
    fn default() -> Self {
        ZdsGate { paused: watch::channel(false).0, following: tokio::sync::Mutex::new(()) }
    }
}

impl ZdsGate {
    /// Follows the node agent at `path` until `stop`, letting go of it while a handoff holds the
    /// gate.
    pub async fn follow(&self, proxy: Arc<Proxy>, path: PathBuf, stop: CancellationToken) {
        let mut paused = self.paused.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = paused.wait_for(|p| !*p) => if r.is_err() { return },
            }
            let _following = self.following.lock().await;
            let round = stop.child_token();
            tokio::select! {
                () = proxy.clone().follow_node_agent(path.clone(), round.clone()) => return,
                _ = paused.wait_for(|p| *p) => {
                    round.cancel();
                    info!("let go of the node agent: a successor is taking over");
                }
            }
        }
    }

    /// Stops the follower and waits until it has let go of the node agent.
    async fn pause(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.paused.send_replace(true);
        self.following.lock().await
    }

    fn resume(&self) {
        self.paused.send_replace(false);
    }
}

/// The predecessor's end: the listening handoff socket.
#[derive(Debug)]
pub struct HandoffServer {
    listener: UnixSeqpacketListener,
    path: PathBuf,
    node: String,
}

impl HandoffServer {
    /// Binds `path` for the ztunnel of node `node`, replacing whatever socket file is there (a
    /// predecessor's, which has handed over by then, or a stale one), readable and writable by
    /// this user only.
    pub fn bind(path: &Path, node: &str) -> Result<HandoffServer, HandoffError> {
        use std::os::unix::fs::PermissionsExt;
        let io_err = |source| HandoffError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixSeqpacketListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(HandoffServer { listener, path: path.to_owned(), node: node.to_owned() })
    }

    /// Serves successors one at a time until one has taken over (then `handed_over` is
    /// cancelled) or `stop`.
    pub async fn serve(
        mut self,
        proxy: Arc<Proxy>,
        gate: Arc<ZdsGate>,
        handed_over: CancellationToken,
        stop: CancellationToken,
    ) {
        loop {
            let sock = tokio::select! {
                () = stop.cancelled() => return,
                s = self.listener.accept() => match s {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(path = %self.path.display(), error = %e, "handoff socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                o = self.hand_over(&sock, &proxy, &gate) => o,
            };
            match outcome {
                Ok(true) => {
                    info!("the successor serves every pod now");
                    handed_over.cancel();
                    return;
                }
                Ok(false) => {
                    warn!("the successor went away before taking over; following the node agent again");
                    gate.resume();
                }
                Err(e) => {
                    warn!(reason = %proto::error_chain(&e), "handoff refused or failed; following the node agent again");
                    gate.resume();
                }
            }
        }
    }

    /// One successor: true once it has taken over, false when it left before.
    async fn hand_over(&self, sock: &UnixSeqpacket, proxy: &Proxy, gate: &ZdsGate) -> Result<bool, HandoffError> {
        let io_err = |source| HandoffError::Io { path: self.path.clone(), source };
        let packet_err = |source| HandoffError::Packet { path: self.path.clone(), source };
        let pid = same_user(sock).map_err(io_err)??;
        let (hello, _) = zds::recv(sock, MAX_MESSAGE).await.map_err(packet_err)?;
        match decode(&hello)? {
            Message::Hello { version: VERSION, node } if node == self.node => {}
            Message::Hello { version: VERSION, node } => {
                return Err(HandoffError::Protocol(format!(
                    "a ztunnel of node {node:?} asked for the pods of node {:?}",
                    self.node
                )));
            }
            other => return Err(HandoffError::Protocol(format!("expected hello version {VERSION}, got {other:?}"))),
        }
        info!(successor_pid = pid, "a successor is taking over; letting go of the node agent");
        let _paused = gate.pause().await;
        let pods = proxy.handoff_sockets().map_err(io_err)?;
        for (uid, pod) in &pods {
            let kinds = pod.sockets.iter().map(|(k, _)| *k).collect();
            let fds: Vec<BorrowedFd<'_>> = pod.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
            let message = Message::Pod { uid: uid.clone(), netns_inode: pod.netns_inode, sockets: kinds };
            zds::send(sock, &encode(&message), &fds).await.map_err(packet_err)?;
        }
        zds::send(sock, &encode(&Message::End { pods: pods.len() }), &[]).await.map_err(packet_err)?;
        info!(
            pods = pods.len(),
            successor_pid = pid,
            "handed every pod's sockets over; waiting for the successor to serve them"
        );
        drop(pods);
        match zds::recv(sock, MAX_MESSAGE).await {
            Ok((bytes, _)) => match decode(&bytes)? {
                Message::Taken => Ok(true),
                other => Err(HandoffError::Protocol(format!("expected taken, got {other:?}"))),
            },
            Err(PacketError::Closed) => Ok(false),
            Err(e) => Err(packet_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn listener_in(netns: &NetNs, port: u16) -> socket2::Socket {
        let l = netns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], port))).unwrap();
        socket2::Socket::from(OwnedFd::from(l.into_std().unwrap()))
    }

    /// A handed socket passes only as what it claims, where it claims to be.
    #[tokio::test]
    async fn a_handed_socket_must_be_the_kind_port_and_namespace_it_claims() {
        let (pod, other) = (NetNs::new_isolated().unwrap(), NetNs::new_isolated().unwrap());
        let outbound = listener_in(&pod, OUTBOUND_PORT);
        check(SocketKind::Outbound, &outbound, &pod).unwrap();
        let reason = |r: Result<(), Unusable>| r.unwrap_err().to_string();
        assert_eq!(
            reason(check(SocketKind::Outbound, &outbound, &other)),
            "the Outbound socket: does not live in the pod's network namespace"
        );
        assert_eq!(
            reason(check(SocketKind::Hbone, &outbound, &pod)),
            "the Hbone socket: bound to port Some(15001), not 15008"
        );
        assert_eq!(reason(check(SocketKind::DnsUdp, &outbound, &pod)), "the DnsUdp socket: not a UDP socket");
        let udp = pod.udp_socket(SocketAddr::from(([127, 0, 0, 1], crate::dns::DNS_PORT))).unwrap();
        let udp = socket2::Socket::from(OwnedFd::from(udp.into_std().unwrap()));
        check(SocketKind::DnsUdp, &udp, &pod).unwrap();
        assert_eq!(reason(check(SocketKind::DnsTcp, &udp, &pod)), "the DnsTcp socket: not a listening TCP socket");
    }

    #[test]
    fn the_handoff_socket_is_named_after_the_zds_socket() {
        assert_eq!(
            default_path(Path::new("/var/run/ztunnel/ztunnel.sock")),
            Path::new("/var/run/ztunnel/ztunnel-handoff.sock")
        );
        // Two nodes' agents in one directory (the one-machine mesh): two handoff sockets.
        assert_eq!(default_path(Path::new("/run/mesh/node-2.sock")), Path::new("/run/mesh/node-2-handoff.sock"));
    }

    #[test]
    fn messages_are_tagged_json() {
        let pod = Message::Pod { uid: "u".into(), netns_inode: Some(7), sockets: vec![SocketKind::DnsUdp] };
        assert_eq!(
            String::from_utf8(encode(&pod)).unwrap(),
            r#"{"type":"pod","uid":"u","netns_inode":7,"sockets":["dns-udp"]}"#
        );
        assert!(matches!(decode(br#"{"type":"taken"}"#).unwrap(), Message::Taken));
        assert!(decode(br#"{"type":"pods"}"#).unwrap_err().to_string().starts_with("handoff protocol: undecodable"));
    }
}
