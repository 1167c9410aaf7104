//! ztunnel, the per-node L4 proxy of the ambient mesh, and the node agent that enrolls pods.
//!
//! ztunnel runs in the node's network namespace. For each pod the node agent hands over (ZDS), it
//! opens listeners *inside the pod's* namespace: `15001` for the app's outbound connections (the
//! capture rules redirect them there), `15006` for plaintext inbound, `15008` for inbound HBONE.
//! Traffic between pods goes as HBONE (HTTP/2 `CONNECT` over mutual TLS with each pod's own SPIFFE
//! certificate), L4 policy is enforced on the receiving side, and the app sees the real client IP.
//!
//! - [`Ztunnel::start`] ties it together: [`xds`] (mesh state), [`certs`] (pod certificates), [`pods`]
//!   (the pods served and their listeners, following the node agent), [`admin`] (admin,
//!   metrics, readiness).
//! - Connection handling: [`outbound`] (routing and tunnels), [`inbound`] (HBONE and plaintext),
//!   [`rbac`] (L4 authorization, Istio's semantics), [`tracker`] (live connections re-authorized
//!   when policy changes), [`telemetry`] (Istio's metrics, access log).
//! - Pods: [`pod`] (identity, where sockets are made), [`netns`] (sockets in a pod's namespace).
//! - Enrollment: [`zds`] (the protocol, both ends), [`node`] (the node agent and the CNI
//!   plugin's side of it, with the capture rules it installs in a pod).
//! - Upgrades: [`handoff`] (the pods' listening sockets passed to a successor process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::SpiffeId;
use proto::control::ControlPlaneTarget;
use proto::hbone::pool::PoolConfig;
use proto::hbone::server::ServerConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod admin;
mod context;
pub mod dns;
pub mod handoff;
pub mod inbound;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod pod;
pub mod pods;
pub mod rbac;
pub mod shards;
pub mod telemetry;
pub mod tracker;
pub mod xds;
pub mod zds;

/// Workload certificates (shared with the waypoint; lives in `proto`).
pub use proto::certs;

pub use crate::context::Context;

use crate::certs::{CertConfig, CertManager, TokenSource};
use crate::telemetry::Metrics;
use crate::tracker::Tracker;
use crate::xds::{MeshView, XdsClient};

/// ztunnel's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The node this ztunnel serves (sent to the control plane).
    pub node_name: String,
    /// Trust domain.
    pub trust_domain: String,
    /// ztunnel's own identity (`istio-system/ztunnel`): requests for pod identities impersonate.
    pub identity: SpiffeId,
    /// The control plane (CA + xDS), with the roots to verify it.
    pub ca: ControlPlaneTarget,
    /// ztunnel's token for the control plane.
    pub token: TokenSource,
    /// The node agent's ZDS socket.
    pub zds_socket: PathBuf,
    /// Where this ztunnel takes over from a running one and later hands over to its successor
    /// ([`handoff`]).
    pub handoff_socket: PathBuf,
    /// Admin endpoint (localhost).
    pub admin_addr: SocketAddr,
    /// Prometheus endpoint.
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint.
    pub readiness_addr: SocketAddr,
    /// How long a drain (pod removal, shutdown) lets connections finish.
    pub drain_timeout: Duration,
    /// HBONE client settings.
    pub pool: PoolConfig,
    /// HBONE server settings.
    pub hbone: ServerConfig,
    /// The DNS proxy (upstream resolvers, cluster domain).
    pub dns: dns::DnsConfig,
    /// The threads pods' connections run on ([`shards`]); `None`: on the runtime that starts
    /// ztunnel, with everything else.
    pub shards: Option<shards::Shards>,
}

/// Why ztunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An endpoint could not be bound.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which endpoint.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control-plane connection could not be set up.
    #[error("control plane: {0}")]
    Control(#[from] proto::control::ControlError),
}

/// Binds an endpoint so that a successor can bind it too while this process drains (a handover
/// on one network namespace, the node's; in a cluster each ztunnel pod has its own).
fn bind(what: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    netns::shared_tcp_listener(addr).and_then(tokio::net::TcpListener::from_std).map_err(|source| Error::Bind {
        what,
        addr,
        source,
    })
}

/// A started ztunnel (endpoints bound, tasks running).
#[derive(Debug)]
pub struct Ztunnel {
    /// Shared state.
    pub ctx: Arc<Context>,
    /// The pods.
    pub proxy: Arc<Proxy>,
    admin_addr: SocketAddr,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    ready: tokio::sync::watch::Sender<bool>,
    draining: CancellationToken,
    stop: CancellationToken,
    handed_over: CancellationToken,
}

use crate::pods::Proxy;

impl Ztunnel {
    /// Binds the endpoints and starts following the control plane and the node agent.
    pub async fn start(config: Config, log: Option<proto::lifecycle::LogControl>) -> Result<Ztunnel, Error> {
        let admin_listener = bind("the admin endpoint", config.admin_addr)?;
        let metrics_listener = bind("the metrics endpoint", config.metrics_addr)?;
        let readiness_listener = bind("the readiness endpoint", config.readiness_addr)?;

        let view = MeshView::new(&xds::SUBSCRIBED, config.ca.trust.clone());
        let mut cert_config = CertConfig::new(config.ca.clone(), config.token.clone(), config.identity.clone());
        cert_config.retry_min = Duration::from_millis(500);
        let certs = CertManager::new(cert_config)?;
        let ctx = Arc::new(Context {
            view: view.clone(),
            certs,
            metrics: Arc::new(Metrics::new()),
            tracker: Arc::new(Tracker::default()),
            trust_domain: config.trust_domain.clone(),
            pool: config.pool.clone(),
            // The inbound handler resolves `hostname:port` authorities (inbound::resolve_target).
            hbone: ServerConfig { service_hostnames: true, ..config.hbone.clone() },
            dns: config.dns.clone(),
            shards: config.shards.clone(),
        });
        let proxy = Proxy::new(ctx.clone(), config.drain_timeout);
        // `draining` ends readiness and the node-agent session; `stop` everything else, after
        // the drain.
        let (draining, stop) = (CancellationToken::new(), CancellationToken::new());

        let xds = XdsClient {
            target: config.ca.clone(),
            token: config.token.clone(),
            node_id: format!("ztunnel~{}", config.node_name),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        };
        tokio::spawn(xds.run(view.clone(), stop.clone().cancelled_owned()));
        tokio::spawn(ctx.tracker.clone().watch(view.clone(), stop.clone()));
        // Pods are taken only once the mesh state is in (see `take_pods`).
        let handed_over = CancellationToken::new();
        tokio::spawn(take_pods(proxy.clone(), config.clone(), view.synced(), draining.clone(), handed_over.clone()));

        // Ready = the node agent's snapshot applied and the mesh state synced.
        let (ready, ready_rx) = tokio::sync::watch::channel(false);
        {
            let (mut zds, mut synced, ready, draining) =
                (proxy.zds_ready(), view.synced(), ready.clone(), draining.clone());
            tokio::spawn(async move {
                loop {
                    let now = *zds.borrow_and_update() && *synced.borrow_and_update();
                    if *ready.borrow() != now {
                        info!(ready = now, "readiness changed");
                        ready.send_replace(now);
                    }
                    tokio::select! {
                        () = draining.cancelled() => return,
                        r = zds.changed() => if r.is_err() { return },
                        r = synced.changed() => if r.is_err() { return },
                    }
                }
            });
        }

        let state = admin::AdminState { ctx: ctx.clone(), proxy: proxy.clone(), ready: ready_rx, log };
        let addr = |l: &tokio::net::TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let (admin_addr, metrics_addr, readiness_addr) = (
            addr(&admin_listener, config.admin_addr),
            addr(&metrics_listener, config.metrics_addr),
            addr(&readiness_listener, config.readiness_addr),
        );
        tokio::spawn(admin::serve(admin_listener, admin::admin_router(state.clone()), stop.clone()));
        tokio::spawn(admin::serve(metrics_listener, admin::metrics_router(state.clone()), stop.clone()));
        // A draining ztunnel stops answering readiness at once: where a successor shares the
        // port, every probe then reaches the successor.
        tokio::spawn(admin::serve(readiness_listener, admin::readiness_router(state), draining.clone()));
        info!(node = %config.node_name, %admin_addr, %metrics_addr, %readiness_addr,
            zds = %config.zds_socket.display(), ca = %config.ca.addr, "ztunnel started");
        Ok(Ztunnel { ctx, proxy, admin_addr, metrics_addr, readiness_addr, ready, draining, stop, handed_over })
    }

    /// The admin endpoint's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics endpoint's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The readiness endpoint's address.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    /// Returns once a successor serves every pod ([`handoff`]): this ztunnel should then
    /// [`shutdown`](Self::shutdown), and wait for SIGTERM to exit.
    pub async fn handed_over(&self) {
        self.handed_over.cancelled().await;
    }

    /// Drains (no longer ready; every pod's listeners stop, connections get up to the drain
    /// deadline), then stops everything.
    pub async fn shutdown(self) {
        self.draining.cancel();
        self.ready.send_replace(false);
        info!("draining: no longer ready, closing every pod's listeners");
        self.proxy.shutdown().await;
        self.stop.cancel();
        info!("ztunnel stopped");
    }
}

/// Takes the node's pods once the mesh state is in (a ztunnel that served a pod before knowing
/// its workloads and policies would refuse what it should carry): first the listening sockets of
/// a ztunnel already running on the node ([`handoff`]), then the node agent's snapshot; once it
/// serves every pod the agent names it tells its predecessor so, and from then on stands ready to
/// hand over to its own successor (`handed_over` is cancelled when one has taken over).
async fn take_pods(
    proxy: Arc<Proxy>,
    config: Config,
    mut synced: tokio::sync::watch::Receiver<bool>,
    draining: CancellationToken,
    handed_over: CancellationToken,
) {
    tokio::select! {
        () = draining.cancelled() => return,
        r = synced.wait_for(|s| *s) => if r.is_err() { return },
    }
    let (handoff_path, node) = (&config.handoff_socket, &config.node_name);
    let predecessor = match handoff::Predecessor::take_over(handoff_path, node).await {
        Ok(Some(mut p)) => {
            info!(pods = p.pods.len(), predecessor_pid = p.pid, "taking over from the running ztunnel");
            proxy.inherit(std::mem::take(&mut p.pods));
            Some(p)
        }
        Ok(None) => None,
        Err(e) => {
            warn!(reason = %proto::error_chain(&e),
                "could not take over from the running ztunnel; its pods stay pending here until it lets go of them");
            None
        }
    };
    info!("mesh state synced; following the node agent");
    let gate = Arc::new(handoff::ZdsGate::default());
    {
        let (gate, proxy, path, draining) = (gate.clone(), proxy.clone(), config.zds_socket.clone(), draining.clone());
        tokio::spawn(async move { gate.follow(proxy, path, draining).await });
    }
    if let Some(predecessor) = predecessor {
        let mut zds_ready = proxy.zds_ready();
        tokio::select! {
            () = draining.cancelled() => return,
            r = zds_ready.wait_for(|r| *r) => if r.is_err() { return },
        }
        match predecessor.taken().await {
            Ok(()) => info!("serving every pod the node agent named; the previous ztunnel drains what it holds"),
            Err(e) => {
                info!(reason = %proto::error_chain(&e), "serving every pod; the previous ztunnel was already gone")
            }
        }
    }
    match handoff::HandoffServer::bind(handoff_path, node) {
        Ok(server) => server.serve(proxy, gate, handed_over, draining).await,
        Err(e) => {
            warn!(reason = %proto::error_chain(&e), "no handoff socket: a successor will have to wait for this ztunnel to exit")
        }
    }
}

/// Raises the open-files limit to the hard limit (each connection holds two or more descriptors).
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => warn!(error = %e, soft, hard, "could not raise the open-files limit"),
        },
        Ok((soft, _)) => info!(limit = soft, "open-files limit"),
        Err(e) => warn!(error = %e, "could not read the open-files limit"),
    }
}
