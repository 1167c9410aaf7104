//! Live inbound connections, re-authorized when policy changes.
//!
//! Every connection admitted by L4 policy is registered here with what its authorization used
//! (peer identity, source IP, destination). When the mesh state changes, each is checked again; one
//! the new policies no longer allow is revoked, which closes both of its sides, and logged. So is
//! every connection of a pod whose proxy is torn down.
//!
//! A registration is one allocation shared by the table and the connection ([`Live`]: the facts,
//! a flag and the connection task's waker); the connection waits on it through [`Revocation`],
//! which it owns for as long as its copy runs. Per open connection that is all it costs here: no
//! cancellation token of its own, no copy of the facts in the table.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use proto::SpiffeId;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::pod::Pod;
use crate::rbac::{self, Connection};
use crate::xds::MeshView;

/// One registered connection: what its authorization used, and what ends it.
#[derive(Debug)]
struct Live {
    id: u64,
    source: Option<SpiffeId>,
    source_ip: IpAddr,
    destination: SocketAddr,
    opened: std::time::SystemTime,
    /// The pod it reaches (compared by pointer: its connections end when it goes).
    pod: Arc<Pod>,
    revoked: AtomicBool,
    /// The connection task, woken when `revoked` is set.
    waker: AtomicWaker,
}

impl Live {
    /// Ends the connection (its task wakes and stops its copy); true if it was not already.
    fn revoke(&self) -> bool {
        let first = !self.revoked.swap(true, Ordering::AcqRel);
        self.waker.wake();
        first
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
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
    live: Mutex<HashMap<u64, Arc<Live>>>,
}

/// Keeps a connection registered until dropped; [`revoked`](Self::revoked) turns it into the
/// future that ends the connection's copy.
#[derive(Debug)]
pub struct Registration {
    tracker: Arc<Tracker>,
    live: Arc<Live>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker.table().remove(&self.live.id);
    }
}

impl Registration {
    /// Resolves once the connection is revoked: a policy change no longer allows it, or its pod's
    /// proxy was torn down. Holds the registration, so the connection stays listed exactly as long
    /// as this future lives.
    pub fn revoked(self) -> Revocation {
        Revocation(self)
    }
}

/// The future of [`Registration::revoked`].
#[derive(Debug)]
pub struct Revocation(Registration);

impl Future for Revocation {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let live = &self.0.live;
        if live.is_revoked() {
            return Poll::Ready(());
        }
        live.waker.register(cx.waker());
        // Revoked between the check and the registration: its wake went to the old waker.
        if live.is_revoked() { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Tracker {
    fn table(&self) -> MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection to `pod`. It is revoked if policy no longer allows it, or once the
    /// pod's `cancel` token is cancelled and [`revoke_pod`](Self::revoke_pod) runs — at once if
    /// that already happened.
    pub fn register(
        self: &Arc<Self>,
        pod: &Arc<Pod>,
        source: Option<SpiffeId>,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> Registration {
        let live = Arc::new(Live {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            source,
            source_ip,
            destination,
            opened: std::time::SystemTime::now(),
            pod: pod.clone(),
            revoked: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let mut table = self.table();
        table.insert(live.id, live.clone());
        // Under the lock `revoke_pod` scans with: a pod cancelled before this line is seen here,
        // one cancelled after it finds the connection in the table.
        if pod.cancel.is_cancelled() {
            live.revoke();
        }
        drop(table);
        Registration { tracker: self.clone(), live }
    }

    /// Revokes every connection to `pod` (its proxy is being torn down). Call it after cancelling
    /// `pod.cancel`, as [`revoke_when_cancelled`](Self::revoke_when_cancelled) does.
    pub fn revoke_pod(&self, pod: &Arc<Pod>) -> usize {
        let table = self.table();
        table.values().filter(|l| Arc::ptr_eq(&l.pod, pod)).filter(|l| l.revoke()).count()
    }

    /// Waits until `pod.cancel` is cancelled, then revokes the pod's connections: spawned once per
    /// pod served, so whatever tears the pod down ends its inbound connections too.
    pub async fn revoke_when_cancelled(self: Arc<Self>, pod: Arc<Pod>) {
        pod.cancel.cancelled().await;
        self.revoke_pod(&pod);
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// The connections registered now, oldest first.
    pub fn snapshot(&self) -> Vec<LiveConnection> {
        let mut out: Vec<LiveConnection> = self
            .table()
            .values()
            .map(|l| LiveConnection {
                id: l.id,
                source: l.source.clone(),
                source_ip: l.source_ip,
                destination: l.destination,
                opened: l.opened,
            })
            .collect();
        out.sort_by_key(|c| (c.opened, c.id));
        out
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-authorizes every connection against the current state; returns how many were closed.
    pub fn recheck(&self, view: &MeshView) -> usize {
        let table = self.table();
        let mut closed = 0;
        view.read(|state| {
            for l in table.values().filter(|l| !l.is_revoked()) {
                let Some(destination) = state.workload_by_ip(l.destination.ip()) else {
                    continue;
                };
                let conn = Connection {
                    source: l.source.as_ref(),
                    source_ip: l.source_ip,
                    destination_ip: l.destination.ip(),
                    destination_port: l.destination.port(),
                };
                let decision = rbac::authorize(state, destination, &conn);
                if !decision.allowed() {
                    info!(src.identity = ?l.source.as_ref().map(ToString::to_string), src.ip = %l.source_ip,
                        dst.addr = %l.destination, ?decision, "closing a live connection: policy no longer allows it");
                    l.revoke();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::Future;
    use std::task::Waker;

    use super::*;
    use crate::pod::Loopback;

    fn pod(name: &str) -> Arc<Pod> {
        Arc::new(Pod {
            uid: format!("uid-{name}"),
            name: name.into(),
            namespace: "demo".into(),
            identity: SpiffeId::new("cluster.local", "demo", name).unwrap(),
            sockets: Arc::new(Loopback),
            cancel: CancellationToken::new(),
        })
    }

    fn register(tracker: &Arc<Tracker>, pod: &Arc<Pod>, port: u16) -> Registration {
        tracker.register(pod, None, "10.0.0.9".parse().unwrap(), SocketAddr::from(([10, 0, 0, 1], port)))
    }

    /// Polls once with a waker that counts its wakes.
    struct Probe {
        wakes: Arc<AtomicU64>,
        waker: Waker,
    }

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Counter(Arc<AtomicU64>);

    impl Probe {
        fn new() -> Self {
            let wakes = Arc::new(AtomicU64::new(0));
            Probe { waker: Waker::from(Arc::new(Counter(wakes.clone()))), wakes }
        }

        fn poll(&self, f: &mut Revocation) -> Poll<()> {
            Pin::new(f).poll(&mut Context::from_waker(&self.waker))
        }

        fn wakes(&self) -> u64 {
            self.wakes.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn revoking_wakes_the_connection_and_dropping_it_unregisters() {
        let tracker = Arc::new(Tracker::default());
        let (a, b) = (pod("a"), pod("b"));
        let mut on_a = register(&tracker, &a, 80).revoked();
        let mut on_b = register(&tracker, &b, 81).revoked();
        assert_eq!(tracker.len(), 2);
        let probe = Probe::new();
        assert_eq!(probe.poll(&mut on_a), Poll::Pending);
        assert_eq!(probe.poll(&mut on_b), Poll::Pending);

        // The pod goes: only its own connection ends, and its task is woken to notice.
        a.cancel.cancel();
        assert_eq!(tracker.revoke_pod(&a), 1);
        assert_eq!(probe.wakes(), 1);
        assert_eq!(probe.poll(&mut on_a), Poll::Ready(()));
        assert_eq!(probe.poll(&mut on_b), Poll::Pending);
        // Revoking twice counts once.
        assert_eq!(tracker.revoke_pod(&a), 0);

        // Still listed until its future is dropped (the copy is being torn down).
        assert_eq!(tracker.len(), 2);
        drop(on_a);
        let left = tracker.snapshot();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].destination, SocketAddr::from(([10, 0, 0, 1], 81)));
        drop(on_b);
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_connection_registered_after_its_pod_was_cancelled_is_revoked_at_once() {
        let tracker = Arc::new(Tracker::default());
        let a = pod("a");
        a.cancel.cancel();
        // The pod's revoke already ran (it found nothing); the late registration must not survive.
        assert_eq!(tracker.revoke_pod(&a), 0);
        let mut late = register(&tracker, &a, 80).revoked();
        assert_eq!(Probe::new().poll(&mut late), Poll::Ready(()));
    }

    #[tokio::test]
    async fn cancelling_a_pod_revokes_its_connections() {
        let tracker = Arc::new(Tracker::default());
        let a = pod("a");
        tokio::spawn(tracker.clone().revoke_when_cancelled(a.clone()));
        let revoked = register(&tracker, &a, 80).revoked();
        let waiting = tokio::spawn(revoked);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        a.cancel.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert!(tracker.is_empty());
    }
}
