//! The pods this ztunnel serves, each with its own listeners inside the pod's network namespace,
//! kept in step with the node agent over ZDS.
//!
//! Per pod: `15001` (outbound capture), `15006` (inbound plaintext capture) and `15008` (inbound
//! HBONE, presenting the pod's certificate once the CA issued it; connections that arrive before
//! wait in the listen queue). Removing a pod stops its listeners, lets its open connections finish
//! for up to the drain deadline, then closes what is left.
//!
//! ZDS: ztunnel connects to the node agent, which sends every pod (`AddWorkload`, or
//! `KeepWorkload` for one ztunnel already serves after a reconnect) and then `SnapshotSent`; pods
//! the snapshot did not name are removed. Each request is acknowledged, with the reason when it is
//! refused. A pod served on sockets a predecessor handed over ([`crate::handoff`]) keeps them; a
//! pod whose listeners could not be bound (a port still held in its namespace, say by a
//! predecessor that does not hand over) is refused, kept pending and retried with backoff (200 ms doubling to
//! 5 s) until it is served or removed, as Istio's ztunnel does; it is counted
//! (`ztunnel_workloads_pending`) and named in the log. ztunnel is ready only while the snapshot of
//! the current connection has been applied and no pod is pending.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::SpiffeId;
use proto::api::istio::workload::zds::WorkloadInfo;
use proto::drain::{self, DrainOutcome, DrainTrigger, DrainWatcher};
use proto::hbone::server::Server;
use tokio::net::{TcpListener, UdpSocket};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::context::Context;
use crate::handoff::{HandedPod, SocketKind};
use crate::inbound::{Inbound, serve_plaintext};
use crate::netns::NetNs;
use crate::outbound::Outbound;
use crate::pod::{Pod, PodSockets};
use crate::zds::{ZdsClient, ZdsError, ZdsEvent};

/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const PLAINTEXT_PORT: u16 = 15006;

/// A pod's listeners, bound.
#[derive(Debug)]
pub struct PodListeners {
    /// 15001.
    pub outbound: TcpListener,
    /// 15006.
    pub plaintext: TcpListener,
    /// 15008.
    pub hbone: TcpListener,
    /// 15053 on the pod's loopback, UDP and TCP: its captured DNS (none: not proxied).
    pub dns: Option<(UdpSocket, TcpListener)>,
}

impl PodListeners {
    /// Copies of the sockets' descriptors, to hand to a successor ([`crate::handoff`]).
    fn handoff_fds(&self) -> std::io::Result<Vec<(SocketKind, OwnedFd)>> {
        let mut fds = vec![
            (SocketKind::Outbound, self.outbound.as_fd().try_clone_to_owned()?),
            (SocketKind::Plaintext, self.plaintext.as_fd().try_clone_to_owned()?),
            (SocketKind::Hbone, self.hbone.as_fd().try_clone_to_owned()?),
        ];
        if let Some((udp, tcp)) = &self.dns {
            fds.push((SocketKind::DnsUdp, udp.as_fd().try_clone_to_owned()?));
            fds.push((SocketKind::DnsTcp, tcp.as_fd().try_clone_to_owned()?));
        }
        Ok(fds)
    }

    /// Binds the three traffic ports on all addresses inside `netns`, and the DNS port on its
    /// loopback only (the capture rules redirect the pod's own queries there; nothing from
    /// outside the pod can ask it).
    pub fn open(netns: &NetNs) -> std::io::Result<PodListeners> {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        let dns = SocketAddr::from(([127, 0, 0, 1], crate::dns::DNS_PORT));
        Ok(PodListeners {
            outbound: netns.tcp_listener(any(OUTBOUND_PORT))?,
            plaintext: netns.tcp_listener(any(PLAINTEXT_PORT))?,
            hbone: netns.tcp_listener(any(proto::hbone::HBONE_PORT))?,
            dns: Some((netns.udp_socket(dns)?, netns.tcp_listener(dns)?)),
        })
    }
}

/// A pod the node agent sent whose listeners could not be bound yet: retried.
struct Pending {
    info: Option<WorkloadInfo>,
    netns: NetNs,
}

/// First and longest wait between retries of pending pods.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why starting a pod failed, and whether it is worth retrying (with the namespace kept for it).
enum Refused {
    Retry(AddError, NetNs),
    Final(AddError),
}

struct Served {
    pod: Arc<Pod>,
    /// Identifies the namespace the listeners live in (a re-add with the same one is a no-op).
    netns_inode: Option<u64>,
    /// One per traffic thread (each with its HBONE pool).
    outbound: Vec<Arc<Outbound>>,
    drain: DrainTrigger,
    /// Copies of the listening sockets for a successor; closed as the pod is retired (a socket
    /// kept open for nobody would queue connections no one accepts).
    handoff: Vec<(SocketKind, OwnedFd)>,
}

/// What the admin API shows of a pod.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodSummary {
    /// Pod uid.
    pub uid: String,
    /// Namespace/name.
    pub name: String,
    /// SPIFFE ID.
    pub identity: String,
    /// Pooled HBONE connections.
    pub pooled_connections: usize,
}

/// Why a pod could not be served (the node agent is told, in its Ack).
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// Its outbound, inbound and HBONE listeners could not be bound in its namespace.
    #[error("opening listeners in the pod")]
    Listeners(#[source] std::io::Error),
    /// The request carried no workload info.
    #[error("AddWorkload {0} without workload info")]
    NoInfo(String),
    /// Its namespace and service account do not form a SPIFFE identity.
    #[error("pod {namespace}/{name}: no valid identity")]
    Identity {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: proto::identity::SpiffeIdError,
    },
}

/// The pods served.
pub struct Proxy {
    ctx: Arc<Context>,
    pods: Mutex<HashMap<String, Served>>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Sockets a predecessor handed over, by pod uid, until the node agent names their pods.
    inherited: Mutex<HashMap<String, HandedPod>>,
    drain_timeout: Duration,
    zds_ready: watch::Sender<bool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("pods", &self.pod_count()).finish()
    }
}

impl Proxy {
    /// No pods yet.
    pub fn new(ctx: Arc<Context>, drain_timeout: Duration) -> Arc<Self> {
        Arc::new(Proxy {
            ctx,
            pods: Mutex::default(),
            pending: Mutex::default(),
            inherited: Mutex::default(),
            drain_timeout,
            zds_ready: watch::channel(false).0,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uids of the pods waiting for a retry, sorted.
    pub fn pending_uids(&self) -> Vec<String> {
        let mut uids: Vec<String> = self.pending().keys().cloned().collect();
        uids.sort();
        uids
    }

    fn set_pending(&self, uid: &str, pending: Option<Pending>) {
        let mut all = self.pending();
        match pending {
            Some(p) => all.insert(uid.to_owned(), p),
            None => all.remove(uid),
        };
        self.ctx.metrics.pods_pending.set(all.len() as i64);
    }

    /// Retries every pending pod once; true when none is left.
    fn retry_pending(&self) -> bool {
        let due: Vec<(String, Pending)> = self.pending().drain().collect();
        for (uid, p) in due {
            match self.add_netns(&uid, p.info.as_ref(), p.netns) {
                Ok(()) => info!(uid, "pending pod served on retry"),
                Err(e) => warn!(uid, reason = %proto::error_chain(&e), "pending pod still refused; retrying"),
            }
        }
        let left = self.pending().len();
        self.ctx.metrics.pods_pending.set(left as i64);
        left == 0
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of pods served.
    pub fn pod_count(&self) -> usize {
        self.pods().len()
    }

    /// The pods served.
    pub fn summaries(&self) -> Vec<PodSummary> {
        let mut v: Vec<PodSummary> = self
            .pods()
            .values()
            .map(|s| PodSummary {
                uid: s.pod.uid.clone(),
                name: format!("{}/{}", s.pod.namespace, s.pod.name),
                identity: s.pod.identity.to_string(),
                pooled_connections: s.outbound.iter().map(|o| o.pooled_connections()).sum(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// True while the node agent's snapshot for the current ZDS connection has been applied.
    pub fn zds_ready(&self) -> watch::Receiver<bool> {
        self.zds_ready.subscribe()
    }

    /// Starts serving a pod whose network namespace is `netns` (ZDS `AddWorkload`). When its
    /// listeners cannot be bound the pod is kept pending and retried (see the module docs).
    pub fn add_netns(&self, uid: &str, info: Option<&WorkloadInfo>, netns: NetNs) -> Result<(), AddError> {
        match self.start_netns(uid, info, netns) {
            Ok(()) => {
                self.set_pending(uid, None);
                Ok(())
            }
            Err(Refused::Retry(e, netns)) => {
                self.set_pending(uid, Some(Pending { info: info.cloned(), netns }));
                Err(e)
            }
            Err(Refused::Final(e)) => {
                self.set_pending(uid, None);
                Err(e)
            }
        }
    }

    fn start_netns(&self, uid: &str, info: Option<&WorkloadInfo>, netns: NetNs) -> Result<(), Refused> {
        let inode = netns.inode().ok();
        if let Some(existing) = self.pods().get(uid)
            && existing.netns_inode.is_some()
            && existing.netns_inode == inode
        {
            info!(uid, pod = %existing.pod.name, "pod already served in this namespace");
            return Ok(());
        }
        let handed = self.inherited.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        let handed = handed.and_then(|h| match h.into_listeners(&netns) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(uid, reason = %proto::error_chain(&e), "the predecessor's sockets for this pod are not usable; binding new ones");
                None
            }
        });
        if handed.is_some() {
            info!(uid, "serving the pod on the sockets its previous ztunnel handed over");
        }
        let listeners = match handed.map_or_else(|| PodListeners::open(&netns), Ok) {
            Ok(l) => l,
            Err(e) => return Err(Refused::Retry(AddError::Listeners(e), netns)),
        };
        self.add(uid, info, Arc::new(netns), listeners, inode).map_err(Refused::Final)
    }

    /// Starts serving a pod with listeners already bound (tests bind them where they like).
    pub fn add(
        &self,
        uid: &str,
        info: Option<&WorkloadInfo>,
        sockets: Arc<dyn PodSockets>,
        listeners: PodListeners,
        netns_inode: Option<u64>,
    ) -> Result<(), AddError> {
        let info = info.ok_or_else(|| AddError::NoInfo(uid.to_owned()))?;
        let sa = if info.service_account.is_empty() { "default" } else { &info.service_account };
        let identity = SpiffeId::new(&self.ctx.trust_domain, &info.namespace, sa).map_err(|source| {
            AddError::Identity { namespace: info.namespace.clone(), name: info.name.clone(), source }
        })?;
        let pod = Arc::new(Pod {
            uid: uid.to_owned(),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            identity,
            sockets,
            cancel: CancellationToken::new(),
        });
        let handoff = listeners.handoff_fds().map_err(AddError::Listeners)?;
        // Whatever tears the pod's proxy down (removal, shutdown) ends its inbound connections.
        tokio::spawn(self.ctx.tracker.clone().revoke_when_cancelled(pod.clone()));
        let (trigger, watcher) = drain::new();
        let span = info_span!("pod", pod = %format!("{}/{}", pod.namespace, pod.name));
        // The traffic ports on every traffic thread (see `shards`); DNS with the control plane.
        let runtimes = match &self.ctx.shards {
            Some(shards) => shards.handles().to_vec(),
            None => vec![Handle::current()],
        };
        let per_runtime = |l: TcpListener| copies(l, runtimes.len()).map_err(AddError::Listeners);
        let (outbound_l, plaintext_l, hbone_l) =
            (per_runtime(listeners.outbound)?, per_runtime(listeners.plaintext)?, per_runtime(listeners.hbone)?);
        let mut outbound = Vec::with_capacity(runtimes.len());
        for ((runtime, o), p) in runtimes.iter().zip(outbound_l).zip(plaintext_l) {
            let out = Outbound::new(self.ctx.clone(), pod.clone());
            outbound.push(out.clone());
            let w = watcher.clone();
            runtime.spawn(serve_on(o, "outbound", |l| out.serve(l, w)).instrument(span.clone()));
            let (ctx, pod, w) = (self.ctx.clone(), pod.clone(), watcher.clone());
            runtime
                .spawn(serve_on(p, "inbound plaintext", |l| serve_plaintext(ctx, pod, l, w)).instrument(span.clone()));
        }
        if let Some((udp, tcp)) = listeners.dns {
            let stop = |mut w: DrainWatcher| async move { w.signaled().await };
            let (ctx, p) = (self.ctx.clone(), pod.clone());
            tokio::spawn(crate::dns::serve_udp(ctx, p, udp, stop(watcher.clone())).instrument(span.clone()));
            let (ctx, p) = (self.ctx.clone(), pod.clone());
            tokio::spawn(crate::dns::serve_tcp(ctx, p, tcp, stop(watcher.clone())).instrument(span.clone()));
        }
        let hbone = runtimes.into_iter().zip(hbone_l).collect();
        tokio::spawn(serve_hbone(self.ctx.clone(), pod.clone(), hbone, watcher).instrument(span));
        info!(uid, pod = %format!("{}/{}", pod.namespace, pod.name), identity = %pod.identity, "serving pod");
        let old = self.pods().insert(uid.to_owned(), Served { pod, netns_inode, outbound, drain: trigger, handoff });
        self.ctx.metrics.pods.set(self.pod_count() as i64);
        if let Some(old) = old {
            info!(uid, "replacing the proxy of a pod re-added with a new namespace");
            self.retire(old);
        }
        Ok(())
    }

    /// Whether `uid` is served.
    pub fn has(&self, uid: &str) -> bool {
        self.pods().contains_key(uid)
    }

    /// Stops serving `uid` (ZDS `DelWorkload`); false if it was not served.
    pub fn remove(&self, uid: &str) -> bool {
        let removed = self.pods().remove(uid);
        self.ctx.metrics.pods.set(self.pod_count() as i64);
        match removed {
            Some(served) => {
                info!(uid, pod = %format!("{}/{}", served.pod.namespace, served.pod.name), "removing pod");
                self.retire(served);
                true
            }
            None => false,
        }
    }

    /// Takes the sockets a predecessor handed over; each is used when the node agent names its
    /// pod (after checking it), the rest are closed once the agent's snapshot is applied.
    pub fn inherit(&self, pods: HashMap<String, HandedPod>) {
        *self.inherited.lock().unwrap_or_else(|p| p.into_inner()) = pods;
    }

    /// Every served pod's uid with its namespace's inode and copies of its listening sockets, to
    /// hand to a successor.
    pub fn handoff_sockets(&self) -> std::io::Result<Vec<(String, HandedPod)>> {
        self.pods()
            .iter()
            .map(|(uid, s)| {
                let sockets =
                    s.handoff.iter().map(|(k, fd)| Ok((*k, fd.try_clone()?))).collect::<std::io::Result<_>>()?;
                Ok((uid.clone(), HandedPod { netns_inode: s.netns_inode, sockets }))
            })
            .collect()
    }

    /// Drains a pod's proxy in the background, then closes what is left.
    fn retire(&self, mut served: Served) {
        served.handoff.clear();
        let identity = served.pod.identity.clone();
        if !self.pods().values().any(|s| s.pod.identity == identity) {
            self.ctx.certs.forget(&identity);
        }
        let deadline = self.drain_timeout;
        tokio::spawn(async move {
            let outcome = served.drain.drain(deadline).await;
            if outcome == DrainOutcome::TimedOut {
                info!(pod = %served.pod.name, ?deadline, "drain deadline passed; closing the pod's remaining connections");
            }
            served.pod.cancel.cancel();
        });
    }

    /// Drains every pod together (shutdown), waiting up to the drain deadline.
    pub async fn shutdown(&self) {
        let all: Vec<Served> = self
            .pods()
            .drain()
            .map(|(_, mut s)| {
                s.handoff.clear();
                s
            })
            .collect();
        self.ctx.metrics.pods.set(0);
        let deadline = self.drain_timeout;
        let drains = all.into_iter().map(|served| async move {
            let outcome = served.drain.drain(deadline).await;
            served.pod.cancel.cancel();
            outcome
        });
        let outcomes = futures_util::future::join_all(drains).await;
        let timed_out = outcomes.iter().filter(|o| **o == DrainOutcome::TimedOut).count();
        info!(pods = outcomes.len(), timed_out, "drained");
    }

    /// Follows the node agent at `path` until `stop` is cancelled: connect (retrying), apply each
    /// request, acknowledge it; after a disconnect, connect again and reconcile with the new
    /// snapshot.
    pub async fn follow_node_agent(self: Arc<Self>, path: PathBuf, stop: CancellationToken) {
        loop {
            let client = tokio::select! {
                () = stop.cancelled() => return,
                c = ZdsClient::connect(&path) => c,
            };
            info!(path = %path.display(), "connected to the node agent");
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.session(&client) => r,
            };
            self.zds_ready.send_replace(false);
            match result {
                Err(ZdsError::Closed) => warn!("node agent closed the ZDS connection; reconnecting"),
                Err(e) => warn!(error = %e, "ZDS connection failed; reconnecting"),
                Ok(()) => {}
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// One ZDS connection, answered as Istio's ztunnel answers: `KeepWorkload` and `DelWorkload`
    /// of a pod not served here are acknowledged (there is nothing to keep or remove), while a
    /// `KeepWorkload` after `SnapshotSent` or a second `SnapshotSent` is a protocol error:
    /// refused, and the connection ends (the node agent then sends a new snapshot).
    async fn session(&self, client: &ZdsClient) -> Result<(), ZdsError> {
        let mut named: HashSet<String> = HashSet::new();
        let mut snapshot_applied = false;
        // A new connection brings a new snapshot, which names again whatever was pending.
        self.pending().clear();
        self.ctx.metrics.pods_pending.set(0);
        let mut retry_in = RETRY_MIN;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            // The next request, retrying pending pods meanwhile. The request future is kept across
            // retries, never dropped half-read.
            let event = {
                let next = client.next();
                tokio::pin!(next);
                loop {
                    if self.pending().is_empty() {
                        retry_at = None;
                        retry_in = RETRY_MIN;
                        break (&mut next).await?;
                    }
                    let at = *retry_at.get_or_insert_with(|| tokio::time::Instant::now() + retry_in);
                    tokio::select! {
                        event = &mut next => break event?,
                        () = tokio::time::sleep_until(at) => {
                            retry_at = None;
                            if self.retry_pending() {
                                info!("every pending pod is served");
                                self.zds_ready.send_replace(snapshot_applied);
                            } else {
                                retry_in = (retry_in * 2).min(RETRY_MAX);
                            }
                        }
                    }
                }
            };
            let (reply, protocol_error) = match event {
                ZdsEvent::Add { uid, info, netns } => {
                    let refused = self.add_netns(&uid, info.as_ref(), NetNs::from_fd(netns)).err();
                    let reason = refused.map(|e| proto::error_chain(&e));
                    if let Some(reason) = &reason {
                        if self.pending().contains_key(&uid) {
                            warn!(uid, %reason, "AddWorkload refused for now; the pod is pending and retried");
                        } else {
                            warn!(uid, %reason, "AddWorkload refused");
                        }
                    }
                    named.insert(uid);
                    (reason, false)
                }
                ZdsEvent::Keep { uid } if snapshot_applied => {
                    warn!(uid, "KeepWorkload after SnapshotSent: protocol error; closing the ZDS connection");
                    (Some(format!("KeepWorkload {uid} after SnapshotSent: protocol error")), true)
                }
                ZdsEvent::Keep { uid } => {
                    if !self.has(&uid) {
                        info!(uid, "KeepWorkload for a pod this ztunnel does not serve: nothing to keep");
                    }
                    named.insert(uid);
                    (None, false)
                }
                ZdsEvent::Del { uid } => {
                    let was_pending = self.pending().contains_key(&uid);
                    self.set_pending(&uid, None);
                    if !self.remove(&uid) && !was_pending {
                        info!(uid, "DelWorkload for a pod this ztunnel does not serve: nothing to remove");
                    }
                    named.remove(&uid);
                    (None, false)
                }
                ZdsEvent::SnapshotSent if snapshot_applied => {
                    warn!("a second SnapshotSent on one connection: protocol error; closing the ZDS connection");
                    (Some("SnapshotSent received already: protocol error".to_owned()), true)
                }
                ZdsEvent::SnapshotSent => {
                    let stale: Vec<String> = self.pods().keys().filter(|u| !named.contains(*u)).cloned().collect();
                    for uid in &stale {
                        self.remove(uid);
                    }
                    let stale_pending: Vec<String> =
                        self.pending().keys().filter(|u| !named.contains(*u)).cloned().collect();
                    for uid in &stale_pending {
                        self.set_pending(uid, None);
                    }
                    let unclaimed = std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|p| p.into_inner()));
                    if !unclaimed.is_empty() {
                        info!(
                            pods = unclaimed.len(),
                            "closing the handed sockets of pods the node agent no longer names"
                        );
                    }
                    info!(pods = self.pod_count(), removed = stale.len(), "node agent snapshot applied");
                    snapshot_applied = true;
                    (None, false)
                }
            };
            // Ready once the snapshot is applied and every pod it named is served.
            let ready = snapshot_applied && self.pending().is_empty();
            if self.zds_ready.send_replace(ready) != ready && snapshot_applied && !ready {
                warn!(pending = ?self.pending_uids(), "not ready: pods the node agent sent are not served yet");
            }
            if protocol_error {
                let reason = reply.clone().unwrap_or_default();
                client.ack(reply).await?;
                return Err(ZdsError::Protocol(reason));
            }
            client.ack(reply).await?;
        }
    }
}

/// Registers `listener` with the current runtime's reactor and serves it with `serve`; one that
/// cannot be registered is logged (as the `what` listener) and not served.
async fn serve_on<F, Fut>(listener: std::net::TcpListener, what: &str, serve: F)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = ()>,
{
    match TcpListener::from_std(listener) {
        Ok(listener) => serve(listener).await,
        Err(e) => warn!(error = %e, "{what} listener unusable"),
    }
}

/// `listener` as `n` listeners for as many runtimes: the same socket under as many descriptors,
/// each to be registered with its runtime's reactor ([`TcpListener::from_std`] on it).
fn copies(listener: TcpListener, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let listener = listener.into_std()?;
    let mut all = (1..n).map(|_| listener.try_clone()).collect::<std::io::Result<Vec<_>>>()?;
    all.push(listener);
    Ok(all)
}

/// Gets the pod's certificate (retrying while the CA cannot give it), then serves HBONE on each
/// runtime with its copy of the listener.
async fn serve_hbone(
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    listeners: Vec<(Handle, std::net::TcpListener)>,
    mut drain: DrainWatcher,
) {
    let mut delay = Duration::from_millis(200);
    let credential = loop {
        let fetched = tokio::select! {
            () = drain.signaled() => return,
            f = ctx.certs.fetch(&pod.identity) => f,
        };
        match fetched {
            Ok(c) => break c,
            Err(e) => {
                warn!(identity = %pod.identity, error = %e, "no certificate for the pod yet; inbound HBONE waits; retrying in {delay:?}");
                tokio::select! {
                    () = drain.signaled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    };
    let tls = match proto::tls::server_config(credential, ctx.view.trust.clone(), vec![ctx.trust_domain.clone()]) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "cannot build the pod's TLS configuration; inbound HBONE is not served");
            return;
        }
    };
    for (runtime, listener) in listeners {
        let (ctx, pod, tls, drain) = (ctx.clone(), pod.clone(), tls.clone(), drain.clone());
        let serve = serve_on(listener, "inbound HBONE", |l| async move {
            match Server::new(l, tls, ctx.hbone.clone(), Inbound::new(ctx.clone(), pod)) {
                Ok(server) => server.run(drain).await,
                Err(e) => warn!(error = %e, "inbound HBONE listener unusable"),
            }
        });
        runtime.spawn(serve.in_current_span());
    }
}
