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

/// One registered connection: what its authorization used, and what ends it. Every live inbound
/// connection holds one, so it is packed: the destination as address and port (a `SocketAddr`
/// takes 32 bytes) and the opening time as microseconds (a `SystemTime` takes 16), which keeps it
/// in a 128-byte allocation with its reference counts.
#[derive(Debug)]
struct Live {
    id: u64,
    source: Option<SpiffeId>,
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    /// Microseconds since the Unix epoch.
    opened_us: u64,
    /// The pod it reaches (compared by pointer: its connections end when it goes).
    pod: Arc<Pod>,
    revoked: AtomicBool,
    /// The connection task, woken when `revoked` is set.
    waker: AtomicWaker,
}

const _: () = assert!(std::mem::size_of::<Live>() <= 112, "a live connection's entry outgrew its allocation");

impl Live {
    fn destination(&self) -> SocketAddr {
        SocketAddr::new(self.destination_ip, self.destination_port)
    }

    fn opened(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(self.opened_us)
    }

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

    /// Registers a connection to `pod`, admitted with the state of `view` at `admitted_at` (its
    /// [`generation`](MeshView::generation), taken before the decision). It is revoked if policy no
    /// longer allows it — at once if the state changed since the decision: a change applied between
    /// the decision and this call was rechecked without it — or once the pod's `cancel` token is
    /// cancelled and [`revoke_pod`](Self::revoke_pod) runs, at once if that already happened.
    pub fn register(
        self: &Arc<Self>,
        view: &MeshView,
        admitted_at: u64,
        pod: &Arc<Pod>,
        source: Option<SpiffeId>,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> Registration {
        let live = Arc::new(Live {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            source,
            source_ip,
            destination_ip: destination.ip(),
            destination_port: destination.port(),
            opened_us: std::time::UNIX_EPOCH.elapsed().map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
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
        // Once listed, every later change is rechecked with it (the recheck runs after each bump of
        // the generation and reads the table then); one that came between the decision and the
        // listing is checked here.
        if view.generation() != admitted_at && view.read(|state| Self::denies(state, &live)) {
            live.revoke();
        }
        Registration { tracker: self.clone(), live }
    }

    /// Whether the current state denies `live` (logged); a destination no longer known is left to
    /// its pod's removal, as in [`recheck`](Self::recheck).
    fn denies(state: &crate::xds::MeshState, live: &Live) -> bool {
        let Some(destination) = state.workload_by_ip(live.destination_ip) else {
            return false;
        };
        let conn = Connection {
            source: live.source.as_ref(),
            source_ip: live.source_ip,
            destination_ip: live.destination_ip,
            destination_port: live.destination_port,
        };
        let decision = rbac::authorize(state, destination, &conn);
        if decision.allowed() {
            return false;
        }
        info!(src.identity = ?live.source.as_ref().map(ToString::to_string), src.ip = %live.source_ip,
            dst.addr = %live.destination(), ?decision, "closing a live connection: policy no longer allows it");
        true
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
                destination: l.destination(),
                opened: l.opened(),
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
                if Self::denies(state, l) {
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

    fn empty_view() -> Arc<MeshView> {
        MeshView::new(&crate::xds::SUBSCRIBED, proto::testing::TestCa::new().shared_bundle())
    }

    fn register(tracker: &Arc<Tracker>, pod: &Arc<Pod>, port: u16) -> Registration {
        let view = empty_view();
        let generation = view.generation();
        tracker.register(
            &view,
            generation,
            pod,
            None,
            "10.0.0.9".parse().unwrap(),
            SocketAddr::from(([10, 0, 0, 1], port)),
        )
    }

    fn apply(view: &MeshView, type_url: &str, name: &str, body: Vec<u8>) {
        let response = proto::api::envoy::service::discovery::v3::DeltaDiscoveryResponse {
            type_url: type_url.into(),
            resources: vec![proto::testing::xds_resource(name, type_url, body)],
            ..Default::default()
        };
        assert!(view.apply(&response).is_empty());
    }

    #[test]
    fn a_change_between_the_decision_and_the_registration_is_checked_at_registration() {
        use prost::Message;
        use proto::api::istio::security::{Action, Authorization, Clause, Match, Rule, Scope};
        use proto::api::istio::workload::{Address, Workload, address};
        use proto::api::type_url::{ADDRESS, AUTHORIZATION};

        let view = empty_view();
        let workload = Workload {
            uid: "Kubernetes//Pod/demo/server".into(),
            name: "server".into(),
            namespace: "demo".into(),
            addresses: vec![vec![10, 0, 0, 1]],
            ..Default::default()
        };
        let body = Address { r#type: Some(address::Type::Workload(workload)) }.encode_to_vec();
        apply(&view, ADDRESS, "Kubernetes//Pod/demo/server", body);
        let tracker = Arc::new(Tracker::default());
        let a = pod("a");
        let (client, to_80) = ("10.0.0.9".parse().unwrap(), SocketAddr::from(([10, 0, 0, 1], 80)));

        // Decided (allowed: no policy yet) at this generation...
        let decided_at = view.generation();
        // ...then a DENY of port 80 arrives before the connection is listed: the recheck that
        // followed it could not see the connection, so registering must.
        let deny = Authorization {
            name: "deny-80".into(),
            namespace: "demo".into(),
            scope: Scope::Namespace as i32,
            action: Action::Deny as i32,
            rules: vec![Rule {
                clauses: vec![Clause { matches: vec![Match { destination_ports: vec![80], ..Default::default() }] }],
            }],
            ..Default::default()
        };
        apply(&view, AUTHORIZATION, "demo/deny-80", deny.encode_to_vec());
        assert_ne!(view.generation(), decided_at);
        let mut late = tracker.register(&view, decided_at, &a, None, client, to_80).revoked();
        assert_eq!(Probe::new().poll(&mut late), Poll::Ready(()));

        // A decision made at the current generation is not made again (nothing changed since).
        let to_81 = SocketAddr::from(([10, 0, 0, 1], 81));
        let mut current = tracker.register(&view, view.generation(), &a, None, client, to_81).revoked();
        assert_eq!(Probe::new().poll(&mut current), Poll::Pending);
        // Negative control: a connection to 80 decided at the current generation is left to the
        // recheck (which closes it).
        let mut stale_but_current = tracker.register(&view, view.generation(), &a, None, client, to_80).revoked();
        assert_eq!(Probe::new().poll(&mut stale_but_current), Poll::Pending);
        assert_eq!(tracker.recheck(&view), 1);
        assert_eq!(Probe::new().poll(&mut stale_but_current), Poll::Ready(()));
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
