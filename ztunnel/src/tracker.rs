//! Live inbound connections, re-authorized when policy changes.
//!
//! Every connection admitted by L4 policy is registered here with what its authorization used
//! (peer identity, source IP, destination). When the mesh state changes, each is checked again; one
//! the new policies no longer allow is cancelled, which closes both of its sides, and logged.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::SpiffeId;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::rbac::{self, Connection};
use crate::xds::MeshView;

#[derive(Debug)]
struct Tracked {
    source: Option<SpiffeId>,
    source_ip: IpAddr,
    destination: SocketAddr,
    opened: std::time::SystemTime,
    cancel: CancellationToken,
}

/// A live inbound connection, as admin endpoints show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveConnection {
    /// Its number in this ztunnel's table (`ambientctl explain --connection`).
    pub id: u64,
    /// The peer's identity, proven by its TLS certificate (`None`: plaintext inbound).
    pub source: Option<SpiffeId>,
    /// The client's IP.
    pub source_ip: IpAddr,
    /// The pod address it reaches.
    pub destination: SocketAddr,
    /// When it was admitted.
    pub opened: std::time::SystemTime,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Tracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

/// Keeps a connection registered until dropped.
#[derive(Debug)]
pub struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Tracker {
    /// Registers a connection; `cancel` is cancelled if policy revokes it.
    pub fn register(
        self: &Arc<Self>,
        source: Option<SpiffeId>,
        source_ip: IpAddr,
        destination: SocketAddr,
        cancel: CancellationToken,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tracked = Tracked { source, source_ip, destination, opened: std::time::SystemTime::now(), cancel };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tracked);
        Registration { tracker: self.clone(), id }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The connections registered now, oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<LiveConnection> = live
            .iter()
            .map(|(id, t)| LiveConnection {
                id: *id,
                source: t.source.clone(),
                source_ip: t.source_ip,
                destination: t.destination,
                opened: t.opened,
            })
            .collect();
        out.sort_by_key(|c| c.opened);
        out
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-authorizes every connection against the current state; returns how many were closed.
    pub fn recheck(&self, view: &MeshView) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        view.read(|state| {
            for t in live.values().filter(|t| !t.cancel.is_cancelled()) {
                let Some(destination) = state.workload_by_ip(t.destination.ip()) else {
                    continue;
                };
                let conn = Connection {
                    source: t.source.as_ref(),
                    source_ip: t.source_ip,
                    destination_ip: t.destination.ip(),
                    destination_port: t.destination.port(),
                };
                let decision = rbac::authorize(state, destination, &conn);
                if !decision.allowed() {
                    info!(src.identity = ?t.source.as_ref().map(ToString::to_string), src.ip = %t.source_ip,
                        dst.addr = %t.destination, ?decision, "closing a live connection: policy no longer allows it");
                    t.cancel.cancel();
                    closed += 1;
                }
            }
        });
        closed
    }

    /// Re-checks after every change of `view` until `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, view: Arc<MeshView>, stop: CancellationToken) {
        let mut changes = view.changes();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            self.recheck(&view);
        }
    }
}
