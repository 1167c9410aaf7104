//! The control plane: config sources, mesh state, the delta xDS server and the certificate
//! authority, served on one TLS port.
//!
//! Layout:
//! - [`k8s`]: the Kubernetes objects the mesh reads and the labels that drive it.
//! - [`objects`]: validated objects in one [`objects::Store`], whichever source wrote them.
//! - [`source`]: the sources: a directory of YAML ([`source::dir`]) or the Kubernetes API
//!   ([`source::kube`]).
//! - [`translate`]: objects → [`mesh::MeshState`] (workloads, services, L4 policies), Istio's way.
//! - [`xds`]: the state as xDS resources, served over delta ADS.
//! - [`authority`]: signing material (self-managed or plugged in), issuance, rotation, the
//!   issuance log.
//! - [`auth`]: who is calling (service-account tokens, client certificates) and which identities
//!   they may have (node proxies: only pods on their node).
//! - [`grpc`]: the gRPC services: Istio's certificate service and our CA admin service, on TLS.
//! - [`metrics`]: the CA's Prometheus metrics.
//! - [`admin`]: the HTTP admin API (state dump, config errors, readiness, metrics).
//! - [`root_cert`]: the trust bundle published to every namespace (ConfigMap `istio-ca-root-cert`).
//! - [`ctl`]: the operator commands of `ambientctl` (and `ca <command>`).
//!
//! [`ControlPlane`] wires them: `bind` opens the CA, issues the control plane's own certificate
//! and returns the addresses actually bound; `run` serves until told to stop.

pub mod admin;
pub mod auth;
pub mod authority;
pub mod explain;
pub mod grpc;
pub mod jwks;
pub mod k8s;
pub mod mesh;
pub mod metrics;
pub mod objects;
pub mod root_cert;
pub mod source;
pub mod translate;
pub mod validate;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::{AuthConfig, Authenticator, NodeAuthorizer, PodIndex};
use crate::authority::{Authority, AuthorityConfig};
use crate::mesh::MeshState;
use crate::metrics::CaMetrics;
use crate::objects::Store;
use crate::translate::MeshConfig;
use crate::xds::{Resources, XdsServer};
use proto::api::ambient::ca::v1::ca_admin_server::CaAdminServer;
use proto::api::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer;
use proto::tls::{Credential, SharedTrustBundle};

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

/// The control plane's own certificate on the gRPC port.
#[derive(Debug, Clone)]
pub struct ServingConfig {
    /// Namespace of the control plane's service account (its SPIFFE ID).
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// DNS names and IP addresses clients dial it by (SANs of its certificate).
    pub names: Vec<String>,
    /// Write a credential for the first admin identity to `<state-dir>/admin/` (mode 0600), for
    /// the `ca` CLI on the same machine.
    pub write_admin_credential: bool,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig {
            namespace: "istio-system".into(),
            service_account: "ca".into(),
            names: ["localhost", "127.0.0.1", "ca.istio-system.svc", "istiod.istio-system.svc"]
                .map(String::from)
                .to_vec(),
            write_admin_credential: true,
        }
    }
}

/// The local admin credential in `<state-dir>/admin/`: chain (leaf first) then key, PEM.
pub use proto::control::ADMIN_CREDENTIAL;

/// Lifetime of the control plane's serving certificate and the local admin credential; renewed
/// at half-life and whenever the signer changes.
pub const OWN_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Control-plane settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Object source.
    pub source: Source,
    /// gRPC listen address (TLS): certificate service, xDS and the CA admin service.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP listen address (debug, readiness, metrics).
    pub admin_addr: SocketAddr,
    /// Mesh-wide translation settings.
    pub mesh: MeshConfig,
    /// Certificate authority settings.
    pub authority: AuthorityConfig,
    /// Caller authentication and authorization.
    pub auth: AuthConfig,
    /// The control plane's own certificate.
    pub serving: ServingConfig,
    /// Quiet time after an object change before the state is recomputed (coalesces bursts).
    pub debounce: Duration,
    /// What a caller of the gRPC port can make the control plane do, authenticated or not.
    pub limits: Limits,
    /// How RequestAuthentication keys named by `jwksUri` are fetched.
    pub jwks: jwks::JwksConfig,
    /// Changes the log filter (admin `/logging`), when the binary installed one.
    pub log: Option<proto::lifecycle::LogControl>,
    /// The xDS types served: all, or only Istio's two (as istiod).
    pub xds_types: xds::ServedTypes,
    /// On shutdown, how long requests in flight may take to finish before they are dropped.
    pub drain_timeout: Duration,
}

/// How long calls in flight may take to finish on shutdown, unless configured.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds on the gRPC port (15012). Its TLS needs no client certificate (proxies authenticate
/// with tokens), so anyone who can reach it can open connections and streams: these keep the
/// work and memory they can cause bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once (handshaking or established); more are closed at once.
    pub max_connections: usize,
    /// Concurrent streams per connection (a proxy holds one xDS stream and asks for its pods'
    /// certificates concurrently, one stream each).
    pub max_streams_per_connection: u32,
    /// Largest certificate or admin request, bytes (a CSR is a few KiB). tonic reserves a
    /// message's announced size before it is read, so this is also what one stream can reserve.
    pub max_request_bytes: usize,
    /// Largest xDS request, bytes (a reconnecting proxy lists the resource versions it holds).
    pub max_xds_request_bytes: usize,
    /// Certificates issued per second to one caller (identity and the node its token is bound to).
    pub issue_per_second: u32,
    /// How many a caller may ask for at once before the rate applies (a node starting its pods).
    pub issue_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_streams_per_connection: 256,
            max_request_bytes: 64 * 1024,
            max_xds_request_bytes: 1024 * 1024,
            issue_per_second: 20,
            issue_burst: 200,
        }
    }
}

/// Configuration mistakes.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The trust domain is not a valid SPIFFE trust domain.
    #[error("invalid trust domain {0:?}")]
    TrustDomain(String),
    /// The parts disagree on the trust domain.
    #[error("the mesh, CA and authentication settings name different trust domains")]
    TrustDomainMismatch,
    /// Nobody could authenticate.
    #[error("no admin identity configured")]
    NoAdmin,
    /// Bad service account for the serving certificate.
    #[error("invalid control-plane identity")]
    Identity(#[source] proto::identity::SpiffeIdError),
    /// Leaf lifetimes.
    #[error("the default certificate lifetime must be positive and at most the maximum")]
    Ttl,
}

impl Config {
    /// A control plane on this machine with Istio's defaults: objects from `objects_dir`, state in
    /// `state_dir`, trust domain `cluster.local`, node account `istio-system/ztunnel`, admin
    /// `istio-system/mesh-admin`, audience `istio-ca`, and both ports on 127.0.0.1 with a free port
    /// each (read them back from [`ControlPlane`]).
    pub fn local(objects_dir: PathBuf, state_dir: PathBuf, tokens: auth::TokenCheck) -> Self {
        let mesh = MeshConfig::default();
        let td = mesh.trust_domain.clone();
        let account = |ns: &str, sa: &str| proto::SpiffeId::new(&td, ns, sa).ok();
        Config {
            source: Source::Dir(objects_dir),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            authority: AuthorityConfig::new(td.clone(), state_dir),
            auth: AuthConfig {
                trust_domain: td.clone(),
                audiences: vec![auth::DEFAULT_AUDIENCE.into()],
                tokens,
                node_accounts: account("istio-system", "ztunnel").into_iter().collect(),
                admins: account("istio-system", "mesh-admin").into_iter().collect(),
            },
            mesh,
            serving: ServingConfig::default(),
            debounce: Duration::from_millis(20),
            limits: Limits::default(),
            jwks: jwks::JwksConfig::default(),
            log: None,
            xds_types: xds::ServedTypes::All,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Checks the settings before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let td = &self.mesh.trust_domain;
        if proto::SpiffeId::new(td, "a", "b").is_err() {
            return Err(ConfigError::TrustDomain(td.clone()));
        }
        if &self.authority.trust_domain != td || &self.auth.trust_domain != td {
            return Err(ConfigError::TrustDomainMismatch);
        }
        if self.auth.admins.is_empty() {
            return Err(ConfigError::NoAdmin);
        }
        if self.authority.default_ttl.is_zero() || self.authority.default_ttl > self.authority.max_ttl {
            return Err(ConfigError::Ttl);
        }
        self.serving_identity().map(|_| ())
    }

    fn serving_identity(&self) -> Result<proto::SpiffeId, ConfigError> {
        proto::SpiffeId::new(&self.mesh.trust_domain, &self.serving.namespace, &self.serving.service_account)
            .map_err(ConfigError::Identity)
    }
}

/// Errors starting or running the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("binding {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA could not start.
    #[error("certificate authority: {0}")]
    Authority(#[from] authority::SetupError),
    /// The CA could not issue its own certificate.
    #[error("issuing the control plane's own certificate: {0}")]
    OwnCertificate(#[from] authority::SignError),
    /// TLS setup.
    #[error("TLS: {0}")]
    Tls(#[from] proto::tls::TlsError),
    /// The JWKS fetcher could not be set up.
    #[error("setting up the JWKS fetcher")]
    Jwks(#[source] jwks::ClientError),
    /// Writing a file for clients.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The YAML directory source failed.
    #[error(transparent)]
    Dir(#[from] source::dir::DirError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
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
    grpc_listener: TcpListener,
    admin_listener: TcpListener,
    store: Arc<Store>,
    authority: Arc<Authority>,
    serving: Arc<Credential>,
    trust: Arc<SharedTrustBundle>,
}

impl ControlPlane {
    /// Validates the config, opens the CA (creating its keys on first start), issues the control
    /// plane's own certificate and binds the listeners (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let authority = Authority::open(config.authority.clone()).await?;
        let serving_id = config.serving_identity()?;
        let serving = Credential::new(
            authority.issue_local(&serving_id, &config.serving.names, OWN_CERT_TTL).await?.workload_cert()?,
        );
        let trust = SharedTrustBundle::new(authority.material().trust_bundle()?);
        // The files clients start from exist before the port opens: whoever waits for the port
        // can read them.
        write_client_files(&config, &authority).await?;
        let grpc_listener = TcpListener::bind(config.grpc_addr).await.map_err(|source| Error::Bind {
            what: "gRPC",
            addr: config.grpc_addr,
            source,
        })?;
        let admin_listener = TcpListener::bind(config.admin_addr).await.map_err(|source| Error::Bind {
            what: "admin",
            addr: config.admin_addr,
            source,
        })?;
        Ok(ControlPlane { config, grpc_listener, admin_listener, store: Store::new(), authority, serving, trust })
    }

    /// The gRPC address actually bound.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener.local_addr().unwrap_or(self.config.grpc_addr)
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or(self.config.admin_addr)
    }

    /// The object store (for in-process embedding and tests).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The certificate authority.
    pub fn authority(&self) -> Arc<Authority> {
        self.authority.clone()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        // The server itself is not generic: it is compiled once, here, not in every caller.
        self.serve(Box::pin(shutdown)).await
    }

    async fn serve(
        self,
        shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> Result<(), Error> {
        let ControlPlane { config, grpc_listener, admin_listener, store, authority, serving, trust } = self;
        info!(
            source = ?config.source,
            grpc = ?grpc_listener.local_addr().ok(),
            admin = ?admin_listener.local_addr().ok(),
            trust_domain = %config.mesh.trust_domain,
            "control plane starting"
        );

        // Every task stops on this token (one stop, as in ztunnel and the waypoint).
        let stopping = CancellationToken::new();
        let stop = || stopping.clone().cancelled_owned();

        let metrics = Arc::new(CaMetrics::new());
        metrics.signer_expiry.set(authority.material().signer.info.not_after);
        let auth = Arc::new(Authenticator::new(config.auth.clone()));
        let nodes = Arc::new(NodeAuthorizer::new(config.mesh.trust_domain.clone(), config.auth.node_accounts.clone()));

        let (view_tx, view_rx) = watch::channel(Arc::new(MeshView::default()));
        let (resources_tx, resources_rx) = watch::channel(Arc::new(Resources::default()));
        let jwks = jwks::Jwks::new(config.jwks.clone()).map_err(Error::Jwks)?;
        let jwks_fetcher = tokio::spawn(jwks.clone().run(stop()));
        let translator = tokio::spawn(translate_loop(
            TranslateInputs {
                store: store.clone(),
                mesh: config.mesh.clone(),
                debounce: config.debounce,
                bundle: authority.bundle(),
                nodes: nodes.clone(),
                jwks,
                served: config.xds_types,
            },
            view_tx,
            resources_tx,
            stop(),
        ));
        let renewer =
            tokio::spawn(renew_loop(config.clone(), authority.clone(), serving.clone(), trust.clone(), stop()));

        let mut source_task = match config.source.clone() {
            Source::Dir(dir) => {
                let source = source::dir::DirSource::new(dir, store.clone())?;
                let stop = stop();
                tokio::spawn(async move { source.run(stop).await.map_err(Error::from) })
            }
            Source::Kubernetes(client) => {
                tokio::spawn(root_cert::publish(client.clone(), store.clone(), authority.bundle(), stop()));
                let store = store.clone();
                let stop = stop();
                let root_namespace = config.mesh.root_namespace.clone();
                tokio::spawn(async move {
                    Box::pin(source::kube::run(client, store, &root_namespace, stop)).await;
                    Ok(())
                })
            }
        };

        let xds = XdsServer::new(resources_rx.clone(), auth.clone()).serving(config.xds_types);
        let clients = xds.client_counter();
        let limits = &config.limits;
        let issue_limit = Arc::new(grpc::IssueLimiter::new(limits.issue_per_second, limits.issue_burst));
        let ca = grpc::CaService { authority: authority.clone(), auth, nodes, metrics: metrics.clone(), issue_limit };
        let tls =
            proto::tls::control_plane_server_config(serving, trust.clone(), vec![config.mesh.trust_domain.clone()])?;
        let incoming = grpc::tls::incoming(
            grpc_listener,
            tls,
            limits.max_connections,
            metrics.connections_refused.clone(),
            stop(),
        );
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            // What a peer can make the CA buffer before anything is read: 64 KiB per stream and
            // 256 KiB per connection (hyper's defaults are 1 MiB each), so all connections
            // together hold at most `max_connections` × 256 KiB (1 GiB at the defaults).
            .initial_stream_window_size(Some(64 * 1024))
            .initial_connection_window_size(Some(256 * 1024))
            .add_service(
                AggregatedDiscoveryServiceServer::new(xds).max_decoding_message_size(limits.max_xds_request_bytes),
            )
            .add_service(
                IstioCertificateServiceServer::new(ca.clone()).max_decoding_message_size(limits.max_request_bytes),
            )
            .add_service(CaAdminServer::new(grpc::AdminService(ca)).max_decoding_message_size(limits.max_request_bytes))
            .serve_with_incoming_shutdown(incoming, stop());
        let grpc = tokio::spawn(grpc);

        let admin_state = admin::AdminState {
            store: store.clone(),
            view: view_rx,
            resources: resources_rx.clone(),
            trust: trust.clone(),
            clients,
            metrics,
            log: config.log.clone(),
        };
        let admin = tokio::spawn(admin::serve(admin_listener, admin_state, stop()));

        // Run until asked to stop, or until the source fails (then stop and report why).
        let source_result = tokio::select! {
            () = shutdown => None,
            result = &mut source_task => Some(result.unwrap_or(Ok(()))),
        };
        if let Some(Err(e)) = &source_result {
            tracing::error!(error = proto::error_chain(&e), "config source failed; stopping");
        }
        info!(deadline = ?config.drain_timeout, "control plane stopping");
        stopping.cancel();
        // xDS streams end with the translator; gRPC calls in flight and admin requests get until
        // the deadline, then whatever is left is dropped.
        let aborts = [&translator, &jwks_fetcher, &renewer].map(|t| t.abort_handle());
        let servers = [grpc.abort_handle(), admin.abort_handle(), source_task.abort_handle()];
        let source_ended = source_result.is_some();
        let stopped = async {
            let _ = translator.await;
            let _ = jwks_fetcher.await;
            let _ = renewer.await;
            let source_result = if source_ended { Ok(()) } else { source_task.await.unwrap_or(Ok(())) };
            let grpc_result = grpc.await.map(|r| r.map_err(Error::from)).unwrap_or(Ok(()));
            let admin_result = admin.await.map(|r| r.map_err(Error::Admin)).unwrap_or(Ok(()));
            source_result.and(grpc_result).and(admin_result)
        };
        let stopped = match tokio::time::timeout(config.drain_timeout, stopped).await {
            Ok(result) => {
                info!("control plane stopped");
                result
            }
            Err(_) => {
                warn!(deadline = ?config.drain_timeout, "drain deadline passed with calls still open; dropping them");
                for task in aborts.iter().chain(&servers) {
                    task.abort();
                }
                Ok(())
            }
        };
        source_result.unwrap_or(Ok(())).and(stopped)
    }
}

/// Writes the trust bundle to `<state-dir>/root-cert.pem` (how clients first learn to trust the
/// control plane) and, if enabled, the local admin credential.
async fn write_client_files(config: &Config, authority: &Authority) -> Result<(), Error> {
    let dir = &config.authority.state_dir;
    let write = |name: PathBuf, contents: String| {
        write_private(&name, contents.as_bytes()).map_err(|source| Error::Write { path: name.clone(), source })
    };
    write(dir.join("root-cert.pem"), authority.material().bundle_pem().concat())?;
    if config.serving.write_admin_credential
        && let Some(admin) = config.auth.admins.first()
    {
        let cert = authority.issue_local(admin, &[], OWN_CERT_TTL).await?;
        let admin_dir = dir.join("admin");
        std::fs::create_dir_all(&admin_dir).map_err(|source| Error::Write { path: admin_dir.clone(), source })?;
        // One file, replaced atomically: a reader never sees a new chain with an old key.
        write(admin_dir.join(ADMIN_CREDENTIAL), format!("{}{}", cert.chain_pem(), cert.key_pem))?;
    }
    Ok(())
}

use crate::authority::store::write_private;

/// Keeps the control plane's own certificate (and the local admin credential) fresh: renews at
/// half-life, and at once when the signer or the trust bundle changes (rotation).
async fn renew_loop(
    config: Config,
    authority: Arc<Authority>,
    serving: Arc<Credential>,
    trust: Arc<SharedTrustBundle>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = authority.changes();
    tokio::pin!(stop);
    loop {
        let remaining = serving.current().remaining(std::time::SystemTime::now());
        let wait = (remaining / 2).max(Duration::from_secs(1));
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
            changed = changes.changed() => if changed.is_err() { return },
        }
        let material = authority.material();
        match material.trust_bundle() {
            Ok(b) => trust.replace(b),
            Err(e) => tracing::error!(error = proto::error_chain(&e), "the new trust bundle is unusable"),
        }
        let Ok(id) = config.serving_identity() else { return };
        match authority.issue_local(&id, &config.serving.names, OWN_CERT_TTL).await.map(|c| c.workload_cert()) {
            Ok(Ok(cert)) => {
                serving.replace(cert);
                info!("renewed the control plane's serving certificate");
            }
            Ok(Err(e)) => warn!(
                error = proto::error_chain(&e),
                "renewing the control plane's serving certificate failed; retrying"
            ),
            Err(e) => warn!(
                error = proto::error_chain(&e),
                "renewing the control plane's serving certificate failed; retrying"
            ),
        }
        if let Err(e) = write_client_files(&config, &authority).await {
            warn!(error = proto::error_chain(&e), "updating the trust bundle and admin credential files failed");
        }
    }
}

/// Resolves when the stop flag is raised (or its sender is gone).
/// What the translation loop reads.
struct TranslateInputs {
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Duration,
    /// The CA's trust bundle, served as an xDS resource.
    bundle: watch::Receiver<Arc<Vec<String>>>,
    /// Told which pods run where after every change (certificate authorization).
    nodes: Arc<NodeAuthorizer>,
    /// Keys fetched for RequestAuthentication rules.
    jwks: Arc<jwks::Jwks>,
    /// The xDS types published.
    served: xds::ServedTypes,
}

/// Recomputes the state after each change of the objects (debounced) or of the trust bundle, and
/// publishes it.
async fn translate_loop(
    inputs: TranslateInputs,
    view_tx: watch::Sender<Arc<MeshView>>,
    resources_tx: watch::Sender<Arc<Resources>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let TranslateInputs { store, mesh, debounce, mut bundle, nodes, jwks, served } = inputs;
    let mut changes = store.subscribe();
    let mut keys = jwks.changes();
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
                changed = bundle.changed() => if changed.is_err() { return },
                changed = keys.changed() => if changed.is_err() { return },
            }
            // Coalesce a burst of changes into one recomputation.
            tokio::time::sleep(debounce).await;
        }
        changes.mark_unchanged();
        keys.mark_unchanged();
        let roots = bundle.borrow_and_update().clone();
        let objects = store.snapshot();
        let started = Instant::now();
        nodes.update(PodIndex::build(&objects, &mesh.trust_domain));
        let mut state = translate::translate(&objects, &mesh);
        let key_errors = jwks.fill(&mut state.request_authns);
        state.config_errors.extend(key_errors);
        generation += 1;
        let trust_bundle = proto::api::ambient::ca::v1::TrustBundle {
            trust_domain: mesh.trust_domain.clone(),
            roots_pem: roots.to_vec(),
        };
        let resources = Arc::new(Resources::build(&state, Some(&trust_bundle), generation, &previous, served));
        previous = resources.clone();
        let took = started.elapsed();
        let config_errors = state.config_errors.iter().map(|e| format!("{}: {} (fails closed)", e.source, e.message));
        let current: std::collections::BTreeSet<String> = state.warnings.iter().cloned().chain(config_errors).collect();
        for w in current.difference(&warned) {
            warn!("{w}");
        }
        warned = current;
        info!(
            generation,
            workloads = state.workloads.len(),
            services = state.services.len(),
            policies = state.policies.len(),
            roots = roots.len(),
            took_ms = took.as_secs_f64() * 1e3,
            "mesh state updated"
        );
        resources_tx.send_replace(resources);
        view_tx.send_replace(Arc::new(MeshView { generation, translate_ms: took.as_secs_f64() * 1e3, state }));
    }
}
