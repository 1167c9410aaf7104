//! The node agent: decides which pods on the node are in the mesh, installs capture in their
//! network namespaces and tells ztunnel over ZDS.
//!
//! It serves the ZDS socket. Whenever a ztunnel connects (first start, a restart, or a successor
//! starting beside the current one) it gets the whole snapshot: `AddWorkload` for every enrolled
//! pod (with its namespace descriptor), then `SnapshotSent`. After that each
//! [`NodeAgent::enroll`] installs capture first and then sends `AddWorkload`;
//! [`NodeAgent::unenroll`] removes capture first (new connections bypass ztunnel) and then sends
//! `DelWorkload`. A pod enrolled while no ztunnel is connected is sent with the next snapshot.
//!
//! Several ztunnels may be connected at once: during a handover the successor serves the pods
//! beside its predecessor until the predecessor drains, and disconnects. Every request goes to
//! every connected ztunnel; one whose connection fails is dropped from the list.
//!
//! In a cluster the agent learns pods from the CNI plugin or the API server; in the one-machine
//! mesh the `e2e` harness drives it. [`in_mesh`] is the enrollment rule both use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use proto::api::istio::workload::zds::WorkloadInfo;
use tokio::sync::Notify;
use tracing::{info, warn};

use proto::labels::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_NONE};

use crate::netns::NetNs;
use crate::node::capture::{self, CaptureError};
use crate::zds::{AgentConnection, ZdsError, ZdsListener};

pub use proto::labels::DATAPLANE_MODE_LABEL;

/// Whether a pod is in the mesh: its namespace says `istio.io/dataplane-mode=ambient` and the pod
/// does not opt out with `istio.io/dataplane-mode=none`.
pub fn in_mesh(namespace_mode: Option<&str>, pod_mode: Option<&str>) -> bool {
    namespace_mode == Some(DATAPLANE_MODE_AMBIENT) && pod_mode != Some(DATAPLANE_MODE_NONE)
}

/// Node agent errors.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Capture rules.
    #[error("pod {uid}: capture: {source}")]
    Capture {
        /// Pod uid.
        uid: String,
        /// Why.
        source: CaptureError,
    },
    /// ztunnel refused or the connection failed.
    #[error("pod {uid}: ztunnel: {source}")]
    Zds {
        /// Pod uid.
        uid: String,
        /// Why.
        source: ZdsError,
    },
    /// The ZDS socket.
    #[error("ZDS socket: {0}")]
    Listen(ZdsError),
}

#[derive(Debug, Clone)]
struct Enrolled {
    info: WorkloadInfo,
    netns: NetNs,
}

#[derive(Debug, Default)]
struct Shared {
    pods: Mutex<BTreeMap<String, Enrolled>>,
    /// The connected ztunnels that have their snapshot, oldest first. Requests are strictly one
    /// at a time.
    conns: tokio::sync::Mutex<Vec<AgentConnection>>,
    /// Notified when a ztunnel has taken a snapshot.
    synced: Notify,
    snapshots: std::sync::atomic::AtomicU64,
}

/// The node agent.
#[derive(Debug)]
pub struct NodeAgent {
    shared: Arc<Shared>,
    path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    /// Whether ztunnels are served yet (connections wait in the listen queue until then).
    open: tokio::sync::watch::Sender<bool>,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl NodeAgent {
    /// Serves ZDS at `path` (call within a tokio runtime).
    pub fn bind(path: &Path) -> Result<NodeAgent, AgentError> {
        Self::restore(path, Vec::new())
    }

    /// Serves ZDS at `path` for pods already enrolled (capture installed) by an earlier run of
    /// the agent: a restarted agent knows its pods before any ztunnel connects, so the first
    /// snapshot names every one of them and ztunnel keeps serving them undisturbed (a snapshot
    /// missing a pod would make ztunnel drop it).
    pub fn restore(path: &Path, pods: Vec<(String, WorkloadInfo, NetNs)>) -> Result<NodeAgent, AgentError> {
        let agent = Self::bind_closed(path)?;
        {
            let mut known = agent.shared.pods.lock().unwrap_or_else(|p| p.into_inner());
            for (uid, info, netns) in pods {
                known.insert(uid, Enrolled { info, netns });
            }
        }
        agent.open();
        Ok(agent)
    }

    /// Binds `path` but serves no ztunnel until [`open`](Self::open): an agent that (re)starts
    /// enrolls the node's pods first, so that the first snapshot a ztunnel gets names every pod
    /// it serves (a ztunnel drops the pods a snapshot does not name). A ztunnel connecting
    /// meanwhile waits in the listen queue.
    pub fn bind_closed(path: &Path) -> Result<NodeAgent, AgentError> {
        let shared = Arc::new(Shared::default());
        let listener = ZdsListener::bind(path).map_err(AgentError::Listen)?;
        let open = tokio::sync::watch::Sender::new(false);
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), open.subscribe()));
        Ok(NodeAgent { shared, path: path.to_owned(), accept, open })
    }

    /// Starts serving ztunnels (see [`bind_closed`](Self::bind_closed)); true the first time.
    pub fn open(&self) -> bool {
        !self.open.send_replace(true)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Snapshots sent so far (one per ztunnel connection).
    pub fn snapshots(&self) -> u64 {
        self.shared.snapshots.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until a ztunnel connection has taken more than `after` snapshots in total.
    pub async fn wait_for_snapshot(&self, after: u64) {
        loop {
            let notified = self.shared.synced.notified();
            if self.snapshots() > after {
                return;
            }
            notified.await;
        }
    }

    /// The enrolled pods' uids.
    pub fn enrolled(&self) -> Vec<String> {
        self.shared.pods.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Puts a pod in the mesh: capture in `netns`, then `AddWorkload` to ztunnel (if one is
    /// connected; otherwise with the next snapshot).
    pub async fn enroll(&self, uid: &str, info: WorkloadInfo, netns: NetNs) -> Result<(), AgentError> {
        capture::install(&netns).map_err(|source| AgentError::Capture { uid: uid.into(), source })?;
        let enrolled = Enrolled { info, netns };
        self.shared.pods.lock().unwrap_or_else(|p| p.into_inner()).insert(uid.to_owned(), enrolled.clone());
        info!(uid, pod = %enrolled.info.name, namespace = %enrolled.info.namespace, "pod enrolled: capture installed");
        let mut conns = self.shared.conns.lock().await;
        if conns.is_empty() {
            info!(uid, "no ztunnel connected; the pod goes with the next snapshot");
            return Ok(());
        }
        send_to_all(&mut conns, uid, Request::Add(&enrolled)).await
    }

    /// Takes a pod out of the mesh: capture removed, then `DelWorkload` to ztunnel.
    pub async fn unenroll(&self, uid: &str) -> Result<(), AgentError> {
        let removed = self.shared.pods.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        let Some(pod) = removed else {
            return Ok(());
        };
        capture::remove(&pod.netns).map_err(|source| AgentError::Capture { uid: uid.into(), source })?;
        info!(uid, pod = %pod.info.name, namespace = %pod.info.namespace, "pod unenrolled: capture removed");
        let mut conns = self.shared.conns.lock().await;
        send_to_all(&mut conns, uid, Request::Del).await
    }

    /// Runs `f` with the newest ztunnel connection (tests send raw or malformed requests).
    #[cfg(feature = "testing")]
    pub async fn with_connection<T>(&self, f: impl AsyncFnOnce(&AgentConnection) -> T) -> Option<T> {
        let conns = self.shared.conns.lock().await;
        match conns.last() {
            Some(c) => Some(f(c).await),
            None => None,
        }
    }

    /// ztunnels connected now (two during a handover).
    pub async fn connected(&self) -> usize {
        let mut conns = self.shared.conns.lock().await;
        conns.retain(|c| !c.is_closed());
        conns.len()
    }
}

/// What [`send_to_all`] sends about a pod.
#[derive(Clone, Copy)]
enum Request<'a> {
    Add(&'a Enrolled),
    Del,
}

/// Sends one request to every connected ztunnel. A connection that fails is dropped (that ztunnel
/// gets the pod with its next snapshot, if it comes back); a refusal is the caller's error.
async fn send_to_all(conns: &mut Vec<AgentConnection>, uid: &str, request: Request<'_>) -> Result<(), AgentError> {
    conns.retain(|c| !c.is_closed());
    let mut refused = None;
    let mut lost = Vec::new();
    for (i, c) in conns.iter().enumerate() {
        let sent = match request {
            Request::Add(pod) => c.add(uid, pod.info.clone(), pod.netns.fd()).await,
            Request::Del => c.del(uid).await,
        };
        match sent {
            Ok(()) => {}
            Err(ZdsError::Refused(reason)) => refused = refused.or(Some(reason)),
            Err(e) => {
                warn!(uid, error = %e, "a ztunnel's connection is gone; it gets the pod with its next snapshot");
                lost.push(i);
            }
        }
    }
    for i in lost.into_iter().rev() {
        conns.remove(i);
    }
    match refused {
        Some(reason) => Err(AgentError::Zds { uid: uid.into(), source: ZdsError::Refused(reason) }),
        None => Ok(()),
    }
}

async fn accept_loop(mut listener: ZdsListener, shared: Arc<Shared>, mut open: tokio::sync::watch::Receiver<bool>) {
    if open.wait_for(|o| *o).await.is_err() {
        return;
    }
    loop {
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "ZDS accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Hold the list while the snapshot goes out, so enrollments queue behind it (and reach
        // this ztunnel either in the snapshot or after it, never neither).
        let mut conns = shared.conns.lock().await;
        conns.retain(|c| !c.is_closed());
        let pods: Vec<(String, Enrolled)> =
            shared.pods.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        match send_snapshot(&conn, &pods).await {
            Ok(()) => {
                info!(pods = pods.len(), connected = conns.len() + 1, "snapshot sent to ztunnel");
                conns.push(conn);
                shared.snapshots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                shared.synced.notify_waiters();
            }
            Err(e) => warn!(error = %e, "sending the snapshot to ztunnel failed; waiting for it to reconnect"),
        }
    }
}

async fn send_snapshot(conn: &AgentConnection, pods: &[(String, Enrolled)]) -> Result<(), ZdsError> {
    for (uid, pod) in pods {
        match conn.add(uid, pod.info.clone(), pod.netns.fd()).await {
            Ok(()) => {}
            // One pod ztunnel cannot serve does not stop the others.
            Err(ZdsError::Refused(reason)) => warn!(uid, %reason, "ztunnel refused a pod of the snapshot"),
            Err(e) => return Err(e),
        }
    }
    conn.snapshot_sent().await
}
