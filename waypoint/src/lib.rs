//! The per-namespace L7 proxy.
//!
//! A waypoint is a Deployment behind the Service of a `Gateway` with class `istio-waypoint`.
//! ztunnels send it the traffic of the services (and pods) that use it, as HBONE tunnels whose
//! `:authority` is the address the client dialed (a service VIP and port). A port the Service
//! declares TCP (or a protocol the waypoint does not parse), or an undeclared port whose first
//! bytes are not HTTP, is proxied as a byte stream with L4 policy ([`tcp`]). Otherwise the
//! tunnel carries HTTP (HTTP/1.1 or HTTP/2, detected), and for each request:
//!
//! 1. puts the method and path in canonical form ([`normalize`]);
//! 2. plans it against the mesh as it is now (`plan`, no I/O): the L7 AuthorizationPolicies that
//!    target the waypoint or the service ([`authz`]), with the caller's identity from the
//!    tunnel's TLS handshake (`403` on deny); the rule of the service's routes ([`route`]), its
//!    filters (header changes, redirects, rewrites, mirroring), a weighted backend and its
//!    endpoints (`target`, shared with the TCP path), the faults, the retry and timeout policy;
//! 3. carries the plan out (`send`): the fault delay, the DestinationRule's limits, balancing and
//!    outlier ejection ([`destination`]), then tries to endpoint pods over HBONE ([`upstream`])
//!    with the rule's timeouts and retries;
//! 4. counts it (`istio_requests_total`, `istio_request_duration_milliseconds`, [`metrics`]) and
//!    writes one access-log line.
//!
//! It gets its own certificate from the CA with its service account's token (no impersonation)
//! and follows the control plane over delta xDS for workloads, services, routes, L7 policies and
//! the trust bundle.

pub mod authz;
pub mod body;
pub mod destination;
mod edge_tls;
pub mod explain;
#[cfg(test)]
mod fixture;
mod headers;
pub mod ingress;
pub mod jwt;
pub mod metrics;
pub mod normalize;
pub mod origination;
mod passthrough;
mod plan;
pub mod proxy;
pub mod route;
mod send;
pub mod spans;
mod target;
pub mod tcp;
pub mod upstream;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proto::SpiffeId;
use proto::api::type_url::{
    ADDRESS, DESTINATION_POLICY, GATEWAY_CREDENTIAL, INGRESS_GATEWAY, L7_POLICY, REQUEST_AUTHN, SERVICE_ROUTES,
    TELEMETRY, TRUST_BUNDLE,
};
use proto::certs::{CertConfig, CertManager, TokenSource};
use proto::control::ControlPlaneTarget;
use proto::drain::{self, DrainTrigger};
use proto::hbone::pool::{Pool, PoolConfig};
use proto::hbone::server::{Handler, InboundConnect, Server, ServerConfig};
use proto::hbone::{Baggage, Target};
use proto::lifecycle::LogControl;
use proto::state::WaypointAt;
use proto::xds::{AdsClient, MeshView};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::route::Regexes;
use crate::upstream::{Clients, Connector};

/// The xDS types a waypoint follows.
pub const SUBSCRIBED: [&str; 7] =
    [ADDRESS, SERVICE_ROUTES, L7_POLICY, REQUEST_AUTHN, DESTINATION_POLICY, TELEMETRY, TRUST_BUNDLE];
/// The xDS types an ingress gateway follows: the Gateways and their routes, what the routes send
/// to, and the policies of the destinations (no service routes: those are the waypoints').
pub const SUBSCRIBED_INGRESS: [&str; 7] =
    [ADDRESS, INGRESS_GATEWAY, GATEWAY_CREDENTIAL, L7_POLICY, DESTINATION_POLICY, TELEMETRY, TRUST_BUNDLE];

/// Largest request head (HTTP/1.1 line + headers, or an HTTP/2 header list) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What every request shares.
#[derive(Debug)]
pub struct Context {
    /// The Gateway's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The identity it presents (its certificate's).
    pub identity: SpiffeId,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The mesh.
    pub view: Arc<MeshView>,
    /// Upstream HTTP clients (over HBONE).
    pub clients: Clients,
    /// Metrics.
    pub metrics: Metrics,
    /// Compiled route regexes.
    pub regexes: Regexes,
    /// Limits, balancing and ejections per destination service.
    pub destinations: destination::Destinations,
    /// HBONE tunnels to endpoints (TCP streams use them directly).
    pub connector: Connector,
    /// How long to wait for a client's first bytes on a port whose protocol is not declared.
    pub detect_timeout: Duration,
    /// Parsed JWT verification keys.
    pub jwt_keys: jwt::KeyCache,
    /// Span reporting (Telemetry API).
    pub tracer: spans::Tracer,
    /// One access-log line per request (Telemetry API; on by default).
    pub access_log: AtomicBool,
}

impl Context {
    /// What planning needs of the waypoint.
    pub(crate) fn env(&self) -> plan::Env<'_> {
        plan::Env { gateway: (&self.namespace, &self.name), regexes: &self.regexes, jwt_keys: &self.jwt_keys }
    }

    /// Counts and logs what the dry-run policies would have decided.
    pub(crate) fn record_dry_run(&self, would: Option<&crate::authz::Decision>, peer: &SpiffeId, port: u16) {
        let Some(would) = would else { return };
        let decision = if matches!(would, crate::authz::Decision::Allow(_)) { "allow" } else { "deny" };
        self.metrics.dry_run.get_or_create(&metrics::DryRunLabels { decision }).inc();
        info!(%peer, port, dry_run.decision = ?would, "dry-run policies applied (not enforced)");
    }
}

/// Settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Gateway's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The service account the waypoint runs as (its identity).
    pub service_account: String,
    /// Trust domain.
    pub trust_domain: String,
    /// The control plane, with the roots to verify it.
    pub ca: ControlPlaneTarget,
    /// The service-account token.
    pub token: TokenSource,
    /// HBONE listener.
    pub listen: SocketAddr,
    /// Prometheus endpoint.
    pub metrics_addr: SocketAddr,
    /// Readiness endpoint.
    pub readiness_addr: SocketAddr,
    /// Admin endpoint (`/config_dump`); keep it on loopback.
    pub admin_addr: SocketAddr,
    /// How long open connections may finish on shutdown.
    pub drain_timeout: Duration,
    /// How long to wait for a client's first bytes on a port whose protocol is not declared
    /// before treating the connection as TCP (a protocol where the server speaks first).
    pub detect_timeout: Duration,
    /// Changes the log filter (admin `/logging`), when the binary installed one.
    pub log: Option<LogControl>,
    /// Serve as an ingress gateway instead of a waypoint (no HBONE listener: the Gateways'
    /// server ports instead).
    pub ingress: Option<ingress::IngressConfig>,
}

/// Why the waypoint could not start.
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
    /// The identity is not a valid SPIFFE ID.
    #[error("identity")]
    Identity(#[source] proto::identity::SpiffeIdError),
    /// The control plane's address or roots are unusable.
    #[error("control plane")]
    Control(#[source] proto::control::ControlError),
    /// The certificate could not be had.
    #[error("certificate")]
    Certificate(#[source] proto::certs::CertError),
    /// The TLS server could not be set up with it.
    #[error("TLS")]
    Tls(#[source] proto::tls::TlsError),
}

/// Waits until the mesh state is synced and, for an ingress gateway (`own_ip`), its own workload
/// is in it (until then it denies every request: see [`ingress`]). False if the state's source
/// went away first.
async fn became_ready(view: &MeshView, own_ip: Option<IpAddr>) -> bool {
    if view.synced().wait_for(|s| *s).await.is_err() {
        return false;
    }
    let Some(ip) = own_ip else { return true };
    let mut changes = view.changes();
    let mut waiting = false;
    loop {
        if view.read(|s| s.workload_by_ip(ip).is_some()) {
            return true;
        }
        if !waiting {
            info!(pod_ip = %ip, "not ready: waiting for this gateway's own workload in the mesh state");
            waiting = true;
        }
        if changes.changed().await.is_err() {
            return false;
        }
    }
}

/// Applies the Telemetry API's settings for this proxy (tracing, access log) as they change.
async fn follow_telemetry(ctx: Arc<Context>, stop: CancellationToken) {
    let mut changes = ctx.view.changes();
    loop {
        let effective = ctx.view.read(|s| proto::state::telemetry::effective(&s.telemetry, &ctx.namespace, &ctx.name));
        ctx.tracer.configure(effective.tracing.as_ref());
        if ctx.access_log.swap(effective.access_log, Ordering::Relaxed) != effective.access_log {
            info!(access_log = effective.access_log, "access log switched by the Telemetry API");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// What the proxy listens on for traffic.
enum Mode {
    /// A waypoint: HBONE from ztunnels.
    Waypoint(TcpListener),
    /// An ingress gateway: its Gateways' server ports.
    Ingress(ingress::IngressConfig),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })
}

/// Whether traffic to `target` is this waypoint's to handle: a service or pod that names it.
fn serves(ctx: &Context, target: IpAddr, local: IpAddr) -> bool {
    // The waypoint's service key starts with `<namespace>/<name>.<namespace>.`.
    let own_key = format!("{ns}/{}.{ns}.", ctx.name, ns = ctx.namespace);
    ctx.view.read(|s| {
        let waypoint = match s.service_by_vip(target) {
            Some(svc) => svc.waypoint.as_ref(),
            None => s.workload_by_ip(target).and_then(|w| w.waypoint.as_ref()),
        };
        match waypoint.map(|w| &w.at) {
            Some(WaypointAt::Service(key)) => key.starts_with(&own_key),
            // The waypoint's service VIP (or this pod's own address).
            Some(WaypointAt::Address(ip)) => {
                *ip == local
                    || s.service_by_vip(*ip).is_some_and(|svc| svc.namespace == ctx.namespace && svc.name == ctx.name)
            }
            None => false,
        }
    })
}

/// Serves HTTP inside each accepted tunnel.
#[derive(Debug)]
struct Inbound {
    ctx: Arc<Context>,
}

impl Handler for Inbound {
    async fn handle(&self, connect: InboundConnect) {
        // The server refuses `hostname:port` for a waypoint (`service_hostnames` off): clients
        // send a waypoint the address they resolved.
        let Target::Addr(target) = connect.target else {
            warn!(peer = %connect.peer_identity, target = %connect.target,
                "tunnel refused: a waypoint takes ip:port authorities only");
            connect.reject(StatusCode::BAD_REQUEST);
            return;
        };
        if !serves(&self.ctx, target.ip(), connect.local_addr.ip()) {
            warn!(peer = %connect.peer_identity, %target, "tunnel refused: the target does not use this waypoint");
            connect.reject(StatusCode::BAD_REQUEST);
            return;
        }
        let header = |name: &str| connect.headers.get(name).and_then(|v| v.to_str().ok());
        let down = Arc::new(proxy::Downstream {
            peer: connect.peer_identity.clone(),
            // From the network: a `forwarded` header is the peer's claim, and the peer is the
            // client's ztunnel, which dials from the client's own address anyway.
            source_ip: Some(connect.peer_addr.ip()),
            source_workload: header(proto::hbone::BAGGAGE).and_then(|b| Baggage::parse(b).workload.map(|(_, n)| n)),
            target,
        });
        // The protocol the service declares on the port (`Port.app_protocol`), if it does.
        let declared = self.ctx.view.read(|s| Some(s.service_by_vip(target.ip())?.app_protocol(target.port())));
        let mut stream = match connect.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "tunnel closed before it was answered");
                return;
            }
        };
        let handling = match declared.and_then(tcp::declared) {
            Some(h) => h,
            None => match tcp::detect(&mut stream, self.ctx.detect_timeout).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel ended before its protocol was known");
                    return;
                }
            },
        };
        if handling == tcp::Handling::Tcp {
            tcp::proxy(self.ctx.clone(), down, stream).await;
            return;
        }
        let ctx = self.ctx.clone();
        let service = hyper::service::service_fn(move |req| {
            let (ctx, down) = (ctx.clone(), down.clone());
            async move { Ok::<_, Infallible>(proxy::handle(ctx, down, req).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(1000)
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(100));
        if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
            tracing::debug!(error = %e, "HTTP connection in a tunnel ended with an error");
        }
    }
}

/// A running waypoint.
#[derive(Debug)]
pub struct Waypoint {
    /// Shared state.
    pub ctx: Arc<Context>,
    hbone_addr: Option<SocketAddr>,
    metrics_addr: SocketAddr,
    readiness_addr: SocketAddr,
    drain: DrainTrigger,
    drain_timeout: Duration,
    ready: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
}

#[derive(Clone)]
struct Endpoints {
    ctx: Arc<Context>,
    ready: tokio::sync::watch::Receiver<bool>,
    certs: Arc<CertManager>,
    log: Option<LogControl>,
}

async fn metrics(State(s): State<Endpoints>) -> axum::response::Response {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.ctx.metrics.encode()).into_response()
}

/// What the waypoint holds: its identity and certificate, the services it serves, and the
/// routes, L7 policies and destination policies it applies to them.
async fn config_dump(State(s): State<Endpoints>) -> axum::Json<serde_json::Value> {
    use serde_json::json;
    let unix = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let certificates: Vec<_> = s
        .certs
        .held()
        .into_iter()
        .map(|h| {
            json!({
                "identity": h.identity.to_string(),
                "expires_unix": h.current.as_ref().map(|c| unix(c.not_after)),
                "chain_sha256": h.current.map(|c| c.chain_sha256).unwrap_or_default(),
            })
        })
        .collect();
    let gateway = format!("{}/{}", s.ctx.namespace, s.ctx.name);
    let dump = s.ctx.view.read(|m| {
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let routes: std::collections::BTreeMap<&String, Vec<&str>> =
            m.routes.iter().map(|(svc, r)| (svc, r.routes.iter().map(|r| r.name.as_str()).collect())).collect();
        json!({
            "gateway": gateway,
            "workloads": m.workload_count(),
            "services": sorted(m.services().map(|svc| svc.key.clone()).collect()),
            "routes": routes,
            "l7_policies": sorted(m.l7_policies.names().cloned().collect()),
            "request_authns": sorted(m.request_authns.names().cloned().collect()),
            "destination_policies": sorted(m.destination_policies.keys().cloned().collect()),
        })
    });
    let trust_bundle = s.ctx.view.trust.current().fingerprints();
    axum::Json(json!({"waypoint": dump, "certificates": certificates, "trust_bundle": trust_bundle}))
}

async fn logging(State(s): State<Endpoints>, method: http::Method, uri: http::Uri) -> axum::response::Response {
    proto::lifecycle::logging_endpoint(s.log.as_ref(), &method, uri.query()).into_response()
}

async fn ready(State(s): State<Endpoints>) -> axum::response::Response {
    if *s.ready.borrow() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
        .into_response()
}

async fn serve_http(listener: TcpListener, router: Router, stop: CancellationToken) {
    proto::endpoint::serve(listener, router, proto::endpoint::EndpointLimits::default(), stop.cancelled_owned()).await;
}

impl Waypoint {
    /// Gets the certificate, binds the endpoints and starts following the control plane.
    pub async fn start(config: Config) -> Result<Waypoint, Error> {
        let mode = match config.ingress.clone() {
            None => Mode::Waypoint(bind("the HBONE listener", config.listen).await?),
            Some(ingress) => Mode::Ingress(ingress),
        };
        let metrics_listener = bind("the metrics endpoint", config.metrics_addr).await?;
        let readiness_listener = bind("the readiness endpoint", config.readiness_addr).await?;
        let admin_listener = bind("the admin endpoint", config.admin_addr).await?;

        let identity =
            SpiffeId::new(&config.trust_domain, &config.namespace, &config.service_account).map_err(Error::Identity)?;
        let mut cert_config = CertConfig::new(config.ca.clone(), config.token.clone(), identity.clone());
        cert_config.retry_min = Duration::from_millis(500);
        let certs = CertManager::new(cert_config).map_err(Error::Control)?;
        let credential = certs.fetch(&identity).await.map_err(Error::Certificate)?;
        info!(%identity, "certificate issued");

        let subscribed: &[&'static str] = if config.ingress.is_some() { &SUBSCRIBED_INGRESS } else { &SUBSCRIBED };
        let view = MeshView::new(subscribed, config.ca.trust.clone());
        let pool = Pool::new(PoolConfig::default(), view.trust.clone());
        let connector = Connector::new(view.clone(), pool, credential.clone());
        let ctx = Arc::new(Context {
            name: config.name.clone(),
            namespace: config.namespace.clone(),
            identity: identity.clone(),
            trust_domain: config.trust_domain.clone(),
            view: view.clone(),
            clients: Clients::new(&connector),
            metrics: Metrics::new(),
            regexes: Regexes::default(),
            destinations: destination::Destinations::default(),
            connector,
            detect_timeout: config.detect_timeout,
            jwt_keys: jwt::KeyCache::default(),
            tracer: spans::Tracer::new(&config.name, &config.namespace, None),
            access_log: AtomicBool::new(true),
        });
        let stop = CancellationToken::new();
        tokio::spawn(follow_telemetry(ctx.clone(), stop.clone()));
        let xds = AdsClient {
            target: config.ca.clone(),
            token: config.token.clone(),
            node_id: format!(
                "{}~{}~{}",
                if config.ingress.is_some() { "router" } else { "waypoint" },
                config.namespace,
                config.name
            ),
            types: subscribed.to_vec(),
            optional: Vec::new(),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
        };
        tokio::spawn({
            // Keep renewing the certificate for as long as the waypoint runs.
            let certs = certs.clone();
            let stop = stop.clone();
            async move {
                xds.run(view.clone(), stop.cancelled_owned()).await;
                drop(certs);
            }
        });

        let (drain, watcher) = drain::new();
        let hbone_addr = match mode {
            Mode::Waypoint(listener) => {
                let tls =
                    proto::tls::server_config(credential, ctx.view.trust.clone(), vec![config.trust_domain.clone()])
                        .map_err(Error::Tls)?;
                let hbone = ServerConfig { require_local_authority: false, ..ServerConfig::default() };
                let server = Server::new(listener, tls, hbone, Arc::new(Inbound { ctx: ctx.clone() }))
                    .map_err(|source| Error::Bind { what: "the HBONE listener", addr: config.listen, source })?;
                let addr = server.local_addr();
                tokio::spawn(server.run(watcher));
                Some(addr)
            }
            Mode::Ingress(ingress) => {
                tokio::spawn(ingress::run(ctx.clone(), ingress, stop.clone(), watcher));
                None
            }
        };

        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        {
            let (ready_tx, stop, ctx) = (ready_tx.clone(), stop.clone(), ctx.clone());
            let own_ip = config.ingress.as_ref().map(|i| i.pod_ip);
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    ready = became_ready(&ctx.view, own_ip) => if ready {
                        info!("ready: certificate issued and mesh state synced");
                        ready_tx.send_replace(true);
                    },
                }
            });
        }
        let endpoints = Endpoints { ctx: ctx.clone(), ready: ready_rx, certs: certs.clone(), log: config.log.clone() };
        let addr = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let (metrics_addr, readiness_addr) =
            (addr(&metrics_listener, config.metrics_addr), addr(&readiness_listener, config.readiness_addr));
        let metrics_router = Router::new()
            .route("/metrics", get(metrics))
            .route("/stats/prometheus", get(metrics))
            .with_state(endpoints.clone());
        let readiness_router = Router::new().route("/healthz/ready", get(ready)).with_state(endpoints.clone());
        let admin_router = Router::new()
            .route("/config_dump", get(config_dump))
            .route("/logging", get(logging).post(logging))
            .with_state(endpoints);
        tokio::spawn(serve_http(admin_listener, admin_router, stop.clone()));
        tokio::spawn(serve_http(metrics_listener, metrics_router, stop.clone()));
        tokio::spawn(serve_http(readiness_listener, readiness_router, stop.clone()));
        info!(gateway = %format!("{}/{}", config.namespace, config.name), hbone_addr = ?hbone_addr, %metrics_addr,
            %readiness_addr, ca = %config.ca.addr, "waypoint started");
        Ok(Waypoint {
            ctx,
            hbone_addr,
            metrics_addr,
            readiness_addr,
            drain,
            drain_timeout: config.drain_timeout,
            ready: ready_tx,
            stop,
        })
    }

    /// The HBONE listener's address (none for an ingress gateway).
    pub fn hbone_addr(&self) -> Option<SocketAddr> {
        self.hbone_addr
    }

    /// The metrics endpoint's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The readiness endpoint's address.
    pub fn readiness_addr(&self) -> SocketAddr {
        self.readiness_addr
    }

    /// No longer ready; stops accepting, lets open connections finish up to the drain timeout,
    /// then stops everything.
    pub async fn shutdown(self) {
        info!("draining");
        self.ready.send_replace(false);
        let outcome = self.drain.drain(self.drain_timeout).await;
        info!(?outcome, "drained");
        self.stop.cancel();
        self.ctx.tracer.shutdown().await;
        info!("waypoint stopped");
    }
}
