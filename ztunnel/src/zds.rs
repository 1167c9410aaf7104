//! ZDS: how the node agent tells ztunnel which pods to serve (Istio's `istio.workload.zds`).
//!
//! The node agent is the **server** on a `SOCK_SEQPACKET` Unix socket; ztunnel **connects**
//! (retrying with backoff while the agent is absent), sends `ZdsHello{V1}`, then receives one
//! `WorkloadRequest` per packet and answers each with `WorkloadResponse{Ack}` (empty error = done).
//! `AddWorkload` carries the pod's network namespace as an `SCM_RIGHTS` file descriptor.
//! `SnapshotSent` ends the initial snapshot: ztunnel then forgets pods the snapshot did not name.
//!
//! Both ends are here: [`ZdsListener`]/[`AgentConnection`] for the node agent (the `e2e` harness
//! plays it on one machine), [`ZdsClient`] for ztunnel. Messages are checked before they are acted
//! on: an `AddWorkload` without exactly one descriptor, or whose descriptor is not a network
//! namespace, is refused with the reason in the Ack; ztunnel keeps serving.

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use proto::api::istio::workload::zds::{
    Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent, Version, WorkloadInfo, WorkloadRequest,
    WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tracing::{info, warn};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest message accepted (a WorkloadRequest is a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// ZDS errors.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    /// Socket trouble.
    #[error("ZDS socket {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("ZDS peer closed the connection")]
    Closed,
    /// A message did not decode or made no sense.
    #[error("bad ZDS message: {0}")]
    Protocol(String),
    /// The other side refused a request (its Ack carried an error).
    #[error("refused by ztunnel: {0}")]
    Refused(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ZdsError + '_ {
    move |source| ZdsError::Io { path: path.to_owned(), source }
}

/// What can go wrong with one packet on a `SOCK_SEQPACKET` socket (ZDS, and ztunnel's handoff
/// socket, [`crate::handoff`]).
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// The packet was larger than expected.
    #[error("message or its descriptors truncated")]
    Truncated,
    /// More descriptors than a packet may carry.
    #[error("no room for {0} descriptors")]
    TooManyFds(usize),
}

impl PacketError {
    fn zds(self, path: &Path) -> ZdsError {
        match self {
            PacketError::Io(source) => ZdsError::Io { path: path.to_owned(), source },
            PacketError::Closed => ZdsError::Closed,
            e => ZdsError::Protocol(e.to_string()),
        }
    }
}

/// Most descriptors one packet may carry (ZDS sends one; a handoff, one per listening socket of a pod).
pub(crate) const MAX_FDS: usize = 8;

/// One packet of at most `max` bytes, with the descriptors that came with it.
pub(crate) async fn recv(sock: &UnixSeqpacket, max: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), PacketError> {
    let mut buf = vec![0u8; max];
    let mut ancillary = [0u8; 256];
    let (info, reader) = sock.recv_with_ancillary(&mut buf, &mut ancillary).await?;
    let mut fds = Vec::new();
    for message in reader.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(received) = message {
            fds.extend(received);
        }
    }
    if info.bytes_read() == 0 && !info.truncated() {
        return Err(PacketError::Closed);
    }
    if info.truncated() || info.ancillary_truncated() {
        return Err(PacketError::Truncated);
    }
    buf.truncate(info.bytes_read());
    Ok((buf, fds))
}

/// Sends one packet, with `fds` (at most [`MAX_FDS`]) as `SCM_RIGHTS`.
pub(crate) async fn send(sock: &UnixSeqpacket, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), PacketError> {
    if fds.is_empty() {
        return sock.send(bytes).await.map(|_| ()).map_err(PacketError::from);
    }
    let mut space = [0u8; 128];
    let mut ancillary = AncillaryMessageWriter::new(&mut space);
    if fds.len() > MAX_FDS || ancillary.add_fds(fds.iter().copied()).is_err() {
        return Err(PacketError::TooManyFds(fds.len()));
    }
    sock.send_vectored_with_ancillary(&[IoSlice::new(bytes)], &mut ancillary).await?;
    Ok(())
}

async fn recv_packet(sock: &UnixSeqpacket, path: &Path) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
    recv(sock, MAX_MESSAGE).await.map_err(|e| e.zds(path))
}

async fn send_packet(
    sock: &UnixSeqpacket,
    path: &Path,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ZdsError> {
    send(sock, bytes, fd.as_slice()).await.map_err(|e| e.zds(path))
}

/// The node agent's listening socket.
#[derive(Debug)]
pub struct ZdsListener {
    listener: UnixSeqpacketListener,
    path: PathBuf,
}

impl ZdsListener {
    /// Binds `path` (a stale socket file from a previous run is replaced).
    pub fn bind(path: &Path) -> Result<Self, ZdsError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(path))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        let listener = UnixSeqpacketListener::bind(path).map_err(io(path))?;
        Ok(ZdsListener { listener, path: path.to_owned() })
    }

    /// Waits for ztunnel to connect and say hello.
    pub async fn accept(&mut self) -> Result<AgentConnection, ZdsError> {
        let sock = self.listener.accept().await.map_err(io(&self.path))?;
        let (bytes, _) = recv_packet(&sock, &self.path).await?;
        let hello = ZdsHello::decode(bytes.as_slice()).map_err(|e| ZdsError::Protocol(format!("hello: {e}")))?;
        if hello.version != Version::V1 as i32 {
            return Err(ZdsError::Protocol(format!("unsupported ZDS version {}", hello.version)));
        }
        info!(path = %self.path.display(), "ztunnel connected over ZDS");
        Ok(AgentConnection { sock, path: self.path.clone() })
    }
}

/// The node agent's side of one ztunnel connection.
#[derive(Debug)]
pub struct AgentConnection {
    sock: UnixSeqpacket,
    path: PathBuf,
}

impl AgentConnection {
    async fn request(&self, payload: workload_request::Payload, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let msg = WorkloadRequest { payload: Some(payload) }.encode_to_vec();
        send_packet(&self.sock, &self.path, &msg, fd).await?;
        let (bytes, _) = recv_packet(&self.sock, &self.path).await?;
        let response =
            WorkloadResponse::decode(bytes.as_slice()).map_err(|e| ZdsError::Protocol(format!("response: {e}")))?;
        match response.payload {
            Some(workload_response::Payload::Ack(Ack { error })) if error.is_empty() => Ok(()),
            Some(workload_response::Payload::Ack(Ack { error })) => Err(ZdsError::Refused(error)),
            None => Err(ZdsError::Protocol("response without an Ack".into())),
        }
    }

    /// Whether ztunnel has closed this connection (it exited, or drained and let go). Between
    /// requests ztunnel sends nothing, so anything to read then is the end of the connection.
    pub fn is_closed(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// Tells ztunnel to serve a pod whose network namespace is `netns`.
    pub async fn add(&self, uid: &str, info: WorkloadInfo, netns: BorrowedFd<'_>) -> Result<(), ZdsError> {
        let add = AddWorkload { uid: uid.into(), workload_info: Some(info) };
        self.request(workload_request::Payload::Add(add), Some(netns)).await
    }

    /// Sends an `AddWorkload` with no descriptor or any descriptor (for tests of ztunnel's checks).
    #[cfg(feature = "testing")]
    pub async fn add_raw(&self, uid: &str, fd: Option<BorrowedFd<'_>>) -> Result<(), ZdsError> {
        let add = AddWorkload { uid: uid.into(), workload_info: None };
        self.request(workload_request::Payload::Add(add), fd).await
    }

    /// Tells ztunnel a pod it already serves is still there (after a reconnect).
    pub async fn keep(&self, uid: &str) -> Result<(), ZdsError> {
        self.request(workload_request::Payload::Keep(KeepWorkload { uid: uid.into() }), None).await
    }

    /// Tells ztunnel to stop serving a pod.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        self.request(workload_request::Payload::Del(DelWorkload { uid: uid.into() }), None).await
    }

    /// Ends the initial snapshot.
    pub async fn snapshot_sent(&self) -> Result<(), ZdsError> {
        self.request(workload_request::Payload::SnapshotSent(SnapshotSent {}), None).await
    }
}

/// What the node agent asked.
#[derive(Debug)]
pub enum ZdsEvent {
    /// Serve this pod; `netns` is its network namespace (checked to be one).
    Add {
        /// Pod uid.
        uid: String,
        /// Pod name, namespace, service account.
        info: Option<WorkloadInfo>,
        /// The pod's network namespace.
        netns: OwnedFd,
    },
    /// A pod still there (reconnect).
    Keep {
        /// Pod uid.
        uid: String,
    },
    /// Stop serving this pod.
    Del {
        /// Pod uid.
        uid: String,
    },
    /// The initial snapshot is complete.
    SnapshotSent,
}

/// ztunnel's side.
#[derive(Debug)]
pub struct ZdsClient {
    sock: UnixSeqpacket,
    path: PathBuf,
}

impl ZdsClient {
    /// Connects and says hello, retrying (100 ms → 5 s) until the node agent listens.
    pub async fn connect(path: &Path) -> ZdsClient {
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::try_connect(path).await {
                Ok(c) => return c,
                Err(e) => {
                    warn!(error = %e, "node agent not reachable over ZDS; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_connect(path: &Path) -> Result<ZdsClient, ZdsError> {
        let sock = UnixSeqpacket::connect(path).await.map_err(io(path))?;
        let hello = ZdsHello { version: Version::V1 as i32 }.encode_to_vec();
        send_packet(&sock, path, &hello, None).await?;
        Ok(ZdsClient { sock, path: path.to_owned() })
    }

    /// The next request. A request that fails its checks is answered (Ack with the reason) here
    /// and skipped; the caller sees only valid events and must [`ack`](Self::ack) each.
    pub async fn next(&self) -> Result<ZdsEvent, ZdsError> {
        loop {
            let (bytes, mut fds) = recv_packet(&self.sock, &self.path).await?;
            match parse(&bytes, &mut fds) {
                Ok(event) => return Ok(event),
                Err(bad) => {
                    let reason = proto::error_chain(&bad);
                    warn!(%reason, "refusing a ZDS request");
                    self.ack(Some(reason)).await?;
                }
            }
        }
    }

    /// Answers the last event: `None` = done, `Some(reason)` = refused.
    pub async fn ack(&self, error: Option<String>) -> Result<(), ZdsError> {
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: error.unwrap_or_default() })),
        };
        send_packet(&self.sock, &self.path, &ack.encode_to_vec(), None).await
    }
}

/// Why a ZDS request was refused (the node agent is told, in its Ack).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// Not a `WorkloadRequest`.
    #[error("undecodable request")]
    Undecodable(#[source] prost::DecodeError),
    /// A request with no payload.
    #[error("request without a payload")]
    NoPayload,
    /// Descriptors sent with a request that takes none.
    #[error("unexpected file descriptors ({0}) with a non-add request")]
    UnexpectedFds(usize),
    /// A request that must name a pod and does not.
    #[error("{0} without a uid")]
    NoUid(&'static str),
    /// An AddWorkload without exactly one descriptor.
    #[error("AddWorkload {uid} must carry exactly one netns descriptor, got {got}")]
    NetnsCount {
        /// The pod.
        uid: String,
        /// How many came.
        got: usize,
    },
    /// An AddWorkload whose descriptor cannot be inspected.
    #[error("AddWorkload {uid}: cannot inspect the descriptor")]
    Inspect {
        /// The pod.
        uid: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// An AddWorkload whose descriptor is not a network namespace.
    #[error("AddWorkload {uid}: the descriptor is not a network namespace")]
    NotNetns {
        /// The pod.
        uid: String,
        /// What joining it said.
        #[source]
        source: std::io::Error,
    },
}

/// Reads one ZDS request (a datagram from the node agent) and the descriptors that came with it.
/// Public for the fuzz target.
pub fn parse(bytes: &[u8], fds: &mut Vec<OwnedFd>) -> Result<ZdsEvent, BadRequest> {
    let request = WorkloadRequest::decode(bytes).map_err(BadRequest::Undecodable)?;
    let payload = request.payload.ok_or(BadRequest::NoPayload)?;
    let expects_fd = matches!(payload, workload_request::Payload::Add(_));
    if !expects_fd && !fds.is_empty() {
        return Err(BadRequest::UnexpectedFds(fds.len()));
    }
    match payload {
        workload_request::Payload::Add(add) => {
            if add.uid.is_empty() {
                return Err(BadRequest::NoUid("AddWorkload"));
            }
            if fds.len() != 1 {
                return Err(BadRequest::NetnsCount { uid: add.uid, got: fds.len() });
            }
            let netns = fds.remove(0);
            let dup = match netns.try_clone() {
                Ok(dup) => dup,
                Err(source) => return Err(BadRequest::Inspect { uid: add.uid, source }),
            };
            // The calling thread joins it and returns at once, which the kernel allows for
            // exactly a network namespace.
            if let Err(source) = crate::netns::NetNs::from_fd(dup).run(|| Ok(())) {
                return Err(BadRequest::NotNetns { uid: add.uid, source });
            }
            Ok(ZdsEvent::Add { uid: add.uid, info: add.workload_info, netns })
        }
        workload_request::Payload::Keep(k) if !k.uid.is_empty() => Ok(ZdsEvent::Keep { uid: k.uid }),
        workload_request::Payload::Del(d) if !d.uid.is_empty() => Ok(ZdsEvent::Del { uid: d.uid }),
        workload_request::Payload::Keep(_) => Err(BadRequest::NoUid("KeepWorkload")),
        workload_request::Payload::Del(_) => Err(BadRequest::NoUid("DelWorkload")),
        workload_request::Payload::SnapshotSent(_) => Ok(ZdsEvent::SnapshotSent),
    }
}
