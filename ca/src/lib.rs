//! The control plane: config sources, mesh state and the delta xDS server.
//!
//! Layout:
//! - [`k8s`]: the Kubernetes objects the mesh reads and the labels that drive it.
//! - [`objects`]: validated objects in one [`objects::Store`], whichever source wrote them.
//! - [`source`]: the sources: a directory of YAML ([`source::dir`]) or the Kubernetes API
//!   ([`source::kube`]).
//! - [`translate`]: objects → [`mesh::MeshState`] (workloads, services, L4 policies), Istio's way.
//! - [`xds`]: the state as xDS resources, served over delta ADS.
//! - [`admin`]: the HTTP admin API (state dump, config errors, readiness).
//!
//! [`ControlPlane`] wires them: `bind` returns the addresses actually bound, `run` serves until
//! told to stop. The certificate authority joins in a later step.

pub mod admin;
pub mod auth;
pub mod authority;
pub mod k8s;
pub mod mesh;
pub mod objects;
pub mod source;
pub mod translate;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::mesh::MeshState;
use crate::objects::Store;
use crate::translate::MeshConfig;
use crate::xds::{BearerAuth, Resources, XdsServer};

/// Where the control plane reads Kubernetes objects from.
#[derive(Clone)]
pub enum Source {
    /// A directory of YAML files, watched.
    Dir(PathBuf),
    /// The Kubernetes API server, through this client.
    Kubernetes(kube::Client),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(p) => write!(f, "Dir({})", p.display()),
            Source::Kubernetes(_) => f.write_str("Kubernetes"),
        }
    }
}

/// Control-plane settings.
#[derive(Clone)]
pub struct Config {
    /// Object source.
    pub source: Source,
    /// gRPC (xDS) listen address.
    pub xds_addr: SocketAddr,
    /// Admin HTTP listen address.
    pub admin_addr: SocketAddr,
    /// Mesh-wide translation settings.
    pub mesh: MeshConfig,
    /// Bearer tokens xDS clients may present.
    pub xds_tokens: Vec<String>,
    /// Quiet time after an object change before the state is recomputed (coalesces bursts).
    pub debounce: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("xds_addr", &self.xds_addr)
            .field("admin_addr", &self.admin_addr)
            .field("mesh", &self.mesh)
            .field("xds_tokens", &format_args!("[{} redacted]", self.xds_tokens.len()))
            .field("debounce", &self.debounce)
            .finish()
    }
}

/// Configuration mistakes.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No usable xDS token.
    #[error("no xDS bearer token configured: clients could not authenticate")]
    NoTokens,
    /// A token is too short to be a secret.
    #[error("an xDS bearer token is shorter than 16 characters")]
    WeakToken,
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {0:?}")]
    TrustDomain(String),
}

impl Config {
    /// Checks the settings before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.xds_tokens.is_empty() {
            return Err(ConfigError::NoTokens);
        }
        if self.xds_tokens.iter().any(|t| t.len() < 16) {
            return Err(ConfigError::WeakToken);
        }
        if proto::SpiffeId::new(&self.mesh.trust_domain, "a", "b").is_err() {
            return Err(ConfigError::TrustDomain(self.mesh.trust_domain.clone()));
        }
        Ok(())
    }
}

/// Errors starting or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML directory source failed.
    #[error(transparent)]
    Dir(#[from] source::dir::DirError),
    /// The gRPC server failed.
    #[error("xDS server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The admin server failed.
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

/// The translated state as the admin API shows it.
#[derive(Debug, Default, Serialize)]
pub struct MeshView {
    /// Increments with every recomputation.
    pub generation: u64,
    /// How long the last recomputation took, in milliseconds.
    pub translate_ms: f64,
    /// The state.
    #[serde(flatten)]
    pub state: MeshState,
}

/// A bound, not yet running, control plane.
#[derive(Debug)]
pub struct ControlPlane {
    config: Config,
    xds_listener: TcpListener,
    admin_listener: TcpListener,
    store: Arc<Store>,
}

impl ControlPlane {
    /// Validates the config and binds the listeners (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let xds_listener = TcpListener::bind(config.xds_addr).await.map_err(|source| Error::Bind {
            what: "xDS",
            addr: config.xds_addr,
            source,
        })?;
        let admin_listener = TcpListener::bind(config.admin_addr).await.map_err(|source| Error::Bind {
            what: "admin",
            addr: config.admin_addr,
            source,
        })?;
        Ok(ControlPlane { config, xds_listener, admin_listener, store: Store::new() })
    }

    /// The xDS address actually bound.
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_listener.local_addr().unwrap_or(self.config.xds_addr)
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// The object store (for in-process embedding and tests).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let ControlPlane { config, xds_listener, admin_listener, store } = self;
        info!(?config, xds = ?xds_listener.local_addr().ok(), admin = ?admin_listener.local_addr().ok(), "control plane starting");
        warn!(
            "xDS is served over plaintext HTTP/2 with bearer tokens until the CA provides TLS; keep it on a trusted network"
        );

        let (stop_tx, stop_rx) = watch::channel(false);
        let stop = || wait_stop(stop_rx.clone());

        let (view_tx, view_rx) = watch::channel(Arc::new(MeshView::default()));
        let (resources_tx, resources_rx) = watch::channel(Arc::new(Resources::default()));
        let translator = tokio::spawn(translate_loop(
            store.clone(),
            config.mesh.clone(),
            config.debounce,
            view_tx,
            resources_tx,
            stop(),
        ));

        let mut source_task = match config.source.clone() {
            Source::Dir(dir) => {
                let source = source::dir::DirSource::new(dir, store.clone())?;
                let stop = stop();
                tokio::spawn(async move { source.run(stop).await.map_err(Error::from) })
            }
            Source::Kubernetes(client) => {
                let store = store.clone();
                let stop = stop();
                tokio::spawn(async move {
                    Box::pin(source::kube::run(client, store, stop)).await;
                    Ok(())
                })
            }
        };

        let xds = XdsServer::new(resources_rx);
        let clients = xds.client_counter();
        let auth = BearerAuth::new(config.xds_tokens.clone());
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(AggregatedDiscoveryServiceServer::with_interceptor(xds, move |r| auth.check(r)))
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(xds_listener), stop());
        let grpc = tokio::spawn(grpc);

        let admin_state = admin::AdminState { store: store.clone(), view: view_rx, clients };
        let admin = tokio::spawn(admin::serve(admin_listener, admin_state, stop()));

        // Run until asked to stop, or until the source fails (then stop and report why).
        let source_result = tokio::select! {
            () = shutdown => None,
            result = &mut source_task => Some(result.unwrap_or(Ok(()))),
        };
        if let Some(Err(e)) = &source_result {
            tracing::error!(error = %e, "config source failed; stopping");
        }
        info!("control plane stopping");
        let _ = stop_tx.send(true);
        let _ = translator.await;
        let source_result = match source_result {
            Some(r) => r,
            None => source_task.await.unwrap_or(Ok(())),
        };
        let grpc_result = grpc.await.map(|r| r.map_err(Error::from)).unwrap_or(Ok(()));
        let admin_result = admin.await.map(|r| r.map_err(Error::Admin)).unwrap_or(Ok(()));
        source_result.and(grpc_result).and(admin_result)
    }
}

/// Resolves when the stop flag is raised (or its sender is gone).
async fn wait_stop(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Recomputes the state after each change (debounced) and publishes it.
async fn translate_loop(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Duration,
    view_tx: watch::Sender<Arc<MeshView>>,
    resources_tx: watch::Sender<Arc<Resources>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = store.subscribe();
    let mut generation = 0u64;
    let mut warned: std::collections::BTreeSet<String> = Default::default();
    let mut previous = Arc::new(Resources::default());
    tokio::pin!(stop);
    // Nothing is served until the sources have loaded: a partial first state would make proxies
    // briefly forget workloads.
    tokio::select! {
        () = &mut stop => return,
        () = store.wait_synced() => {}
    }
    loop {
        if generation > 0 {
            tokio::select! {
                () = &mut stop => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            // Coalesce a burst of changes into one recomputation.
            tokio::time::sleep(debounce).await;
        }
        changes.mark_unchanged();
        let objects = store.snapshot();
        let started = Instant::now();
        let state = translate::translate(&objects, &mesh);
        generation += 1;
        let resources = Arc::new(Resources::build(&state, generation, &previous));
        previous = resources.clone();
        let took = started.elapsed();
        let current: std::collections::BTreeSet<String> = state.warnings.iter().cloned().collect();
        for w in current.difference(&warned) {
            warn!("{w}");
        }
        warned = current;
        info!(
            generation,
            workloads = state.workloads.len(),
            services = state.services.len(),
            policies = state.policies.len(),
            took_ms = took.as_secs_f64() * 1e3,
            "mesh state updated"
        );
        resources_tx.send_replace(resources);
        view_tx.send_replace(Arc::new(MeshView { generation, translate_ms: took.as_secs_f64() * 1e3, state }));
    }
}
