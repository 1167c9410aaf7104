//! The ingress gateway: a mode of the waypoint (`waypoint --ingress`) with the same L7 engine.
//!
//! It serves the Istio `Gateway`s whose `selector` matches its own pod labels (`--gateway-label`).
//! For each plain-HTTP server port of those Gateways it listens on that port; a request is
//! matched to a server by its port and `Host` (a name, `*.<domain>` or `*`), then to the rules of
//! the VirtualServices bound to the Gateway for that host (the first match wins, as Istio orders
//! them), and carried out like a waypoint's: weighted backends, subsets, header changes,
//! redirects, rewrites, mirrors, faults, retries, timeouts, the DestinationRule's limits. It goes
//! to the endpoint pods over HBONE with the gateway's own certificate, so the destination's
//! ztunnel sees the gateway as the caller.
//!
//! A destination service that has a waypoint is reached through it (HBONE to a waypoint pod,
//! naming the service's VIP and port), so the policies it enforces apply; the waypoint routes
//! the request by the service's own routes (a subset chosen at the gateway is not kept).
//!
//! What it does not do yet is refused, never done halfway: a policy that selects the gateway's
//! own pod denies every request (`403`), since the gateway cannot evaluate it; HTTPS, TLS and TCP
//! servers are reported and not listened on.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proto::api::ambient::waypoint::v1::{self as pb, gateway_server::Protocol};
use proto::drain::DrainWatcher;
use proto::metrics::Hashed;
use proto::state::MeshState;
use rand::Rng;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Context;
use crate::edge_tls::{self, TlsServers};
use crate::metrics::{Parties, RequestLabels};
use crate::normalize;
use crate::passthrough;
use crate::plan::{self, Answer, Head, Plan, Ports, UnsetPort};
use crate::route::{self, Regexes, RouteInput};
use crate::send::{self, DownstreamUpgrade};
use crate::target::{self, Backend};
use crate::upstream::{Body, BoxError};

/// What makes a waypoint an ingress gateway.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// The gateway pod's labels: it serves the Gateways whose `selector` they match.
    pub labels: BTreeMap<String, String>,
    /// The address the servers' ports are bound on.
    pub bind: IpAddr,
    /// The gateway pod's own address (`status.podIP`): its workload in the mesh state, whose
    /// policies it must honour. Not the address a client connected to, which a node port, a
    /// host-network pod or a load balancer can make something else.
    pub pod_ip: IpAddr,
}

/// Whether `gateway`'s selector matches `labels` (an empty selector matches every gateway).
fn selects(gateway: &pb::IngressGateway, labels: &BTreeMap<String, String>) -> bool {
    gateway.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A server this gateway answers in plain HTTP (HTTP/1.1 or HTTP/2 with prior knowledge).
fn plain_http(server: &pb::GatewayServer) -> bool {
    matches!(server.protocol(), Protocol::Http | Protocol::Http2 | Protocol::Grpc)
}

/// The Gateways that select `labels`, in a stable order.
pub(crate) fn selected<'s>(state: &'s MeshState, labels: &BTreeMap<String, String>) -> Vec<&'s pb::IngressGateway> {
    let mut gateways: Vec<_> =
        state.ingress_gateways.values().map(AsRef::as_ref).filter(|g| selects(g, labels)).collect();
    gateways.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    gateways
}

/// The ports to listen on (true: TLS is terminated there), and the servers this gateway cannot
/// serve (for the log). A port with both HTTPS and plain servers is a TLS port; its plain servers
/// are reported, as Istio refuses the conflict.
fn listening_ports(state: &MeshState, labels: &BTreeMap<String, String>) -> (BTreeMap<u16, bool>, Vec<String>) {
    let mut ports = BTreeMap::new();
    let mut unserved = Vec::new();
    let describe = |g: &pb::IngressGateway, s: &pb::GatewayServer, why: &str| {
        format!("{}/{} port {} ({}): {why}", g.namespace, g.name, s.port, s.protocol().as_str_name())
    };
    for g in selected(state, labels) {
        for s in g.servers.iter().filter(|s| edge_tls::terminates(s) || passthrough::passes_through(s)) {
            if let Ok(port) = u16::try_from(s.port) {
                ports.insert(port, true);
            }
        }
    }
    for g in selected(state, labels) {
        for s in &g.servers {
            match u16::try_from(s.port) {
                Ok(port) if plain_http(s) => match ports.get(&port) {
                    Some(true) => unserved.push(describe(g, s, "the port also has HTTPS servers")),
                    _ => {
                        ports.insert(port, false);
                    }
                },
                Ok(_) if edge_tls::terminates(s) || passthrough::passes_through(s) => {}
                _ => {
                    unserved.push(describe(g, s, "this gateway serves HTTP, terminated HTTPS and TLS passthrough only"))
                }
            }
        }
    }
    (ports, unserved)
}

/// Whether the host pattern (a name, `*.<domain>` or `*`) admits `host` (a name without port).
pub(crate) use proto::host::admits as host_matches;

/// How specifically `pattern` admits `host`: an exact name beats any wildcard, a longer
/// `*.<domain>` beats a shorter one, `*` admits everything least specifically. `None`: it does
/// not admit it. A missing host (no SNI) is admitted by `*` only.
fn specificity(pattern: &str, host: Option<&str>) -> Option<usize> {
    match (pattern, host) {
        ("*", _) => Some(0),
        (_, None) => None,
        (p, Some(h)) if !host_matches(p, h) => None,
        (p, Some(_)) if p.starts_with('*') => Some(p.len()),
        _ => Some(usize::MAX),
    }
}

/// The server among `servers` that admits `host` most specifically (the first of equals), as the
/// SNI and the `Host` are matched alike.
pub(crate) fn best_server<'g>(
    servers: impl Iterator<Item = &'g pb::GatewayServer>,
    host: Option<&str>,
) -> Option<&'g pb::GatewayServer> {
    let mut best: Option<(usize, &pb::GatewayServer)> = None;
    for s in servers {
        let Some(rank) = s.hosts.iter().filter_map(|p| specificity(p, host)).max() else { continue };
        if best.is_none_or(|(b, _)| rank > b) {
            best = Some((rank, s));
        }
    }
    best.map(|(_, s)| s)
}

/// Which server a TLS connection's handshake chose: its name and hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerId {
    pub(crate) name: String,
    pub(crate) hosts: Vec<String>,
}

impl ServerId {
    pub(crate) fn of(server: &pb::GatewayServer) -> ServerId {
        ServerId { name: server.name.clone(), hosts: server.hosts.clone() }
    }
}

/// The name in a canonical host (`name`, `name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.rsplit_once("]:").map_or(host, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    }
    host.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(host, |(h, _)| h)
}

/// Why the gateway at `own_ip` must refuse everything, if it must: a policy that applies to its
/// own pod is one it does not evaluate, and until that pod's workload is known, whether one
/// applies cannot be told.
pub(crate) fn own_pod_refusal(state: &MeshState, own_ip: IpAddr) -> Option<String> {
    let Some(own) = state.workload_by_ip(own_ip) else {
        return Some(
            "this gateway's own workload is not in the mesh state (yet), so the policies that may apply to it cannot be checked"
                .to_owned(),
        );
    };
    let (name, _) = state.policies.applying_to(own).next()?;
    Some(format!("AuthorizationPolicy {name} applies to this ingress gateway, which does not evaluate L4 policies"))
}

/// Decides what to do with a request that came to `port` of the gateway, as [`plan::plan`]
/// does for a waypoint; `own_ip` is the gateway pod's address (its workload's policies).
pub(crate) fn plan_request(
    regexes: &Regexes,
    state: &MeshState,
    labels: &BTreeMap<String, String>,
    (own_ip, port): (IpAddr, u16),
    head: Head,
    (client, tls): (IpAddr, Option<&ServerId>),
    rng: &mut impl Rng,
) -> Result<Plan, Answer> {
    if let Some(reason) = own_pod_refusal(state, own_ip) {
        warn!(pod_ip = %own_ip, "request denied: {reason}");
        return Err(Answer::text(StatusCode::FORBIDDEN, "RBAC: access denied\n", "RBAC", ""));
    }
    let name = host_name(&head.host).to_owned();
    let gateways = selected(state, labels);
    let admits = |hosts: &[String]| hosts.iter().any(|h| host_matches(h, &name));
    let candidates = gateways
        .iter()
        .flat_map(|g| &g.servers)
        .filter(|s| s.port == u32::from(port) && if tls.is_some() { edge_tls::terminates(s) } else { plain_http(s) });
    let Some(server) = best_server(candidates, Some(&name)) else {
        return Err(Answer::text(StatusCode::NOT_FOUND, "no gateway server for this host\n", "NR", ""));
    };
    // Over TLS, the request must be for the server whose certificate (and client check) the
    // handshake used: a `Host` of another server would skip its client-certificate requirement.
    if let Some(handshake) = tls
        && *handshake != ServerId::of(server)
    {
        warn!(host = %name, handshake_server = %handshake.name, request_server = %server.name,
            "request refused: its host belongs to another server than the one its TLS handshake chose");
        return Err(Answer::text(StatusCode::MISDIRECTED_REQUEST, "misdirected request\n", "-", ""));
    }
    if tls.is_none() && server.tls.as_ref().is_some_and(|t| t.https_redirect) {
        let location = format!("https://{name}{}", head.parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        let answer = Answer::text(StatusCode::MOVED_PERMANENTLY, "", "-", "");
        return Err(match HeaderValue::from_str(&location) {
            Ok(v) => answer.with_header(header::LOCATION, v),
            Err(_) => answer,
        });
    }
    let routes = gateways
        .iter()
        .flat_map(|g| &g.routes)
        .filter(|r| r.ports.contains(&u32::from(port)) && admits(&r.hosts))
        .filter_map(|r| r.route.as_ref());
    let input = RouteInput {
        method: head.parts.method.as_str(),
        path: &head.path,
        query: head.parts.uri.query(),
        headers: &head.parts.headers,
        port,
    };
    let Some(chosen) = route::select_among(&routes, &input, regexes) else {
        return Err(Answer::text(StatusCode::NOT_FOUND, "no route matched\n", "NR", ""));
    };
    let route_name = chosen.route.name.clone();
    let ports = Ports { request: port, unset: UnsetPort::OnlyServicePort };
    // Every rule here has a route; a request without one was answered above.
    let unrouted = || Backend::service(state, "", port, None);
    let mut plan =
        plan::plan_rule(state, Some((chosen.rule, route_name.clone())), head, ports, Some(client), unrouted, rng)?;
    // A service with a waypoint is reached through it, never around it: its policies apply there.
    let key = plan.backend.key.split('#').next().unwrap_or_default();
    if let Some(service) = state.service(key).filter(|s| s.waypoint.is_some()) {
        let through =
            target::waypoint_of(state, service).and_then(|w| plan.backend.clone().through_waypoint(service, w));
        let Some(backend) = through else {
            warn!(route = %route_name, service = key, "request refused: the destination's waypoint has no pod to take it");
            return Err(Answer::text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n", "UH", &route_name));
        };
        plan.backend = backend;
    }
    Ok(plan)
}

/// Handles one request that came to `local` from `client`.
async fn handle(
    ctx: Arc<Context>,
    gw: Arc<IngressConfig>,
    (local, client, tls): (SocketAddr, SocketAddr, Option<Arc<ServerId>>),
    mut req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let mut upgrade = DownstreamUpgrade::of(&mut req);
    let method = normalize::method(req.method());
    let raw_path = req.uri().path().to_owned();
    let target = normalize::path(&raw_path).and_then(|p| Ok((p, normalize::host(req.headers(), req.uri())?)));
    let host = target.as_ref().map(|(_, h)| h.clone()).unwrap_or_default();
    let (version, request_id, user_agent) =
        (req.version(), crate::proxy::header_text(&req, "x-request-id"), crate::proxy::header_text(&req, "user-agent"));
    let mut spans = ctx.tracer.start(&req, &host, local.port(), Some(client.ip()));
    let (mut parts, body) = req.into_parts();
    parts.method = method.clone();
    let planned = match target {
        _ if method == http::Method::CONNECT => {
            Err(Answer::text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied by the gateway\n", "-", ""))
        }
        Err(e) => {
            warn!(client = %client, path = %raw_path, reason = %e, "request refused: ambiguous request target");
            Err(Answer::text(StatusCode::BAD_REQUEST, "bad request target\n", "-", ""))
        }
        Ok((path, host)) => ctx.view.read(|s| {
            let head = Head { parts, path, host };
            let (own, from) = ((gw.pod_ip, local.port()), (client.ip(), tls.as_deref()));
            plan_request(&ctx.regexes, s, &gw.labels, own, head, from, &mut rand::rng())
        }),
    };
    let destination = planned.as_ref().ok().and_then(|p| {
        let key = p.backend.key.split('#').next()?;
        ctx.view.read(|s| s.service(key).cloned())
    });
    let (response, outcome) = match planned {
        Err(answer) => answer.into_parts(),
        Ok(mut plan) => {
            if let Some(spans) = spans.as_mut() {
                spans.upstream(&mut plan.head.headers, &plan.backend.cluster());
            }
            let clients = ctx.clients.for_client(None);
            let body = body.map_err(BoxError::from).boxed();
            send::send(plan, body, &clients, &ctx.destinations, &mut upgrade).await
        }
    };
    let elapsed = start.elapsed();
    let unknown = || "unknown".to_owned();
    let mut parties = Parties {
        source_workload: ctx.name.clone(),
        source_workload_namespace: ctx.namespace.clone(),
        source_principal: ctx.identity.as_str().to_owned(),
        destination_service: destination.as_ref().map_or_else(unknown, |s| s.hostname.clone()),
        destination_service_name: destination.as_ref().map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: destination.as_ref().map_or_else(unknown, |s| s.namespace.clone()),
        destination_workload: unknown(),
        destination_workload_namespace: unknown(),
        destination_principal: unknown(),
    };
    if let Some(w) = outcome.endpoint.as_deref() {
        parties.set_endpoint(w);
    }
    let labels = Hashed::new(RequestLabels {
        reporter: "source",
        parties,
        request_protocol: "http",
        response_code: outcome.status.as_u16(),
        response_flags: outcome.flags,
        connection_security_policy: "unknown",
    });
    ctx.metrics.record(&labels, elapsed.as_secs_f64() * 1000.0);
    if let Some(spans) = spans {
        let endpoint = outcome.endpoint.as_deref().and_then(|w| w.primary_address());
        spans.finish(outcome.status.as_u16(), outcome.flags, endpoint);
    }
    if !ctx.access_log.load(std::sync::atomic::Ordering::Relaxed) {
        return response;
    }
    // Envoy's and Istio's access-log names (`--log-format json` writes them as JSON keys).
    let endpoint = outcome.endpoint.as_deref();
    info!(
        target: "access",
        method = %method,
        path = %raw_path,
        protocol = ?version,
        authority = %host,
        response_code = outcome.status.as_u16(),
        response_flags = outcome.flags,
        route_name = %outcome.route,
        upstream_host = %endpoint.and_then(|w| w.primary_address()).map_or_else(|| "-".to_owned(), |a| a.to_string()),
        upstream_request_attempt_count = outcome.attempts,
        downstream_remote_address = %client,
        request_id = crate::proxy::log_text(request_id.as_ref()),
        user_agent = crate::proxy::log_text(user_agent.as_ref()),
        duration = elapsed.as_millis() as u64,
        dst.service = %labels.labels().parties.destination_service,
        dst.workload = %endpoint.map_or("-", |w| w.name.as_str()),
        "request"
    );
    response
}

/// Serves one client connection (HTTP/1.1, or HTTP/2: with prior knowledge, or by ALPN over TLS)
/// until it ends or a drain closes it gracefully.
async fn serve_connection<IO>(
    ctx: Arc<Context>,
    gw: Arc<IngressConfig>,
    io: IO,
    (local, client, tls): (SocketAddr, SocketAddr, Option<Arc<ServerId>>),
    mut drain: DrainWatcher,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (ctx, gw) = (ctx.clone(), gw.clone());
        let tls = tls.clone();
        async move { Ok::<_, Infallible>(handle(ctx, gw, (local, client, tls), req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(crate::MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(crate::MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(1000)
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(100));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(%client, error = %e, "client connection ended with an error");
    }
}

/// Accepts on one server port until it is no longer wanted or a drain starts; with `tls`, each
/// connection's handshake is completed first ([`edge_tls`]).
async fn accept_loop(
    ctx: Arc<Context>,
    gw: Arc<IngressConfig>,
    (listener, tls): (TcpListener, Option<Arc<TlsServers>>),
    stop: CancellationToken,
    mut drain: DrainWatcher,
) {
    let addr = listener.local_addr().ok();
    loop {
        let (tcp, client) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(local) = tcp.local_addr() else { continue };
        let _ = tcp.set_nodelay(true);
        let (ctx, gw, drain) = (ctx.clone(), gw.clone(), drain.clone());
        match &tls {
            None => {
                tokio::spawn(serve_connection(ctx, gw, tcp, (local, client, None), drain));
            }
            Some(servers) => {
                let servers = servers.clone();
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let port = local.port();
                    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, passthrough::read_client_hello(&mut tcp)).await;
                    let (bytes, sni) = match hello {
                        Ok(Ok(read)) => read,
                        Ok(Err(reason)) => return info!(%client, port, reason, "TLS connection refused"),
                        Err(_) => return debug!(%client, "no ClientHello in time"),
                    };
                    let passes = ctx.view.read(|s| passthrough::is_passthrough(s, &gw.labels, port, sni.as_deref()));
                    if passes {
                        return passthrough::forward(ctx, gw, tcp, (bytes, sni), (port, client)).await;
                    }
                    let stream = passthrough::Prefixed::new(bytes, tcp);
                    let handshake = terminate(&ctx, &gw.labels, &servers, stream, port);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok((stream, server))) => {
                            let tls = Some(Arc::new(server));
                            serve_connection(ctx, gw, stream, (local, client, tls), drain).await;
                        }
                        Ok(Err(reason)) => info!(%client, port = local.port(), reason, "TLS handshake refused"),
                        Err(_) => debug!(%client, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    info!(addr = ?addr, "gateway port closed");
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the ClientHello, picks the server by its SNI and completes the handshake with that
/// server's credential; a MUTUAL server's SAN list is checked on the client's certificate.
async fn terminate<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    ctx: &Context,
    labels: &BTreeMap<String, String>,
    servers: &TlsServers,
    tcp: IO,
    port: u16,
) -> Result<(tokio_rustls::server::TlsStream<IO>, ServerId), String> {
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let start = acceptor.await.map_err(|e| format!("reading the ClientHello: {e}"))?;
    let sni = start.client_hello().server_name().map(str::to_owned);
    let chosen = ctx
        .view
        .read(|s| servers.choose(s, labels, &ctx.namespace, port, sni.as_deref()))
        .map_err(|e| proto::error_chain(&e))?;
    let stream = start.into_stream(chosen.config).await.map_err(|e| format!("handshake: {e}"))?;
    if !chosen.subject_alt_names.is_empty() {
        let leaf = stream.get_ref().1.peer_certificates().and_then(<[_]>::first);
        if !leaf.is_some_and(|l| edge_tls::client_san_matches(l, &chosen.subject_alt_names)) {
            return Err(format!(
                "the client certificate carries none of the server's subjectAltNames {:?}",
                chosen.subject_alt_names
            ));
        }
    }
    Ok((stream, chosen.server))
}

/// Keeps one listener per plain-HTTP server port of the Gateways that select this gateway,
/// following the mesh state: ports are opened as servers appear and closed as they go (requests
/// in flight on a closed port finish).
pub(crate) async fn run(ctx: Arc<Context>, config: IngressConfig, stop: CancellationToken, drain: DrainWatcher) {
    let gw = Arc::new(config);
    let mut changes = ctx.view.changes();
    let tls_servers = Arc::new(TlsServers::default());
    let mut open: HashMap<u16, (bool, CancellationToken)> = HashMap::new();
    let mut reported: Vec<String> = Vec::new();
    loop {
        let (want, unserved) = ctx.view.read(|s| listening_ports(s, &gw.labels));
        if unserved != reported {
            for s in &unserved {
                warn!(server = %s, "gateway server not served");
            }
            reported = unserved;
        }
        open.retain(|port, (tls, token)| {
            let keep = want.get(port) == Some(tls);
            if !keep {
                token.cancel();
            }
            keep
        });
        let mut failed = false;
        let missing: Vec<(u16, bool)> =
            want.iter().map(|(p, tls)| (*p, *tls)).filter(|(p, _)| !open.contains_key(p)).collect();
        for (port, tls) in missing {
            let addr = SocketAddr::new(gw.bind, port);
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(%addr, tls, "gateway port listening");
                    let token = stop.child_token();
                    open.insert(port, (tls, token.clone()));
                    let listening = (listener, tls.then(|| tls_servers.clone()));
                    tokio::spawn(accept_loop(ctx.clone(), gw.clone(), listening, token, drain.clone()));
                }
                Err(e) => {
                    warn!(%addr, error = %e, "cannot listen on a gateway server's port; retrying");
                    failed = true;
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            changed = changes.changed() => if changed.is_err() { break },
            () = retry => {}
        }
    }
    for (_, token) in open.values() {
        token.cancel();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use proto::api::ambient::waypoint::v1::GatewayTls;
    use proto::api::istio::security::{self as sec, Authorization, Scope};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::fixture::{self, GATEWAY_IP, KEY, V1, V2, gateway_labels as labels, gateway_pod};

    /// The tutorial's shape: Gateway `default/web-gateway` (selector istio=ingressgateway, port
    /// 80 HTTP, host `shop.example`) with one VirtualService: `version: new` → subset v2, else
    /// 70/30 v1/v2. Backends name no port (the service has one).
    fn gateway_state() -> MeshState {
        let mut s = fixture::state();
        let mut v1 = fixture::backend(70, Some(("v1", &[V1])));
        let mut v2 = fixture::backend(30, Some(("v2", &[V2])));
        v1.port = 0;
        v2.port = 0;
        let header_match = pb::RouteMatch {
            headers: vec![pb::ValueMatch {
                kind: pb::value_match::Kind::Exact as i32,
                name: "version".into(),
                value: "new".into(),
            }],
            ..Default::default()
        };
        let rules = vec![
            pb::RouteRule {
                name: "new".into(),
                matches: vec![header_match],
                backends: vec![pb::Backend { weight: 100, ..v2.clone() }],
                ..Default::default()
            },
            pb::RouteRule { name: "split".into(), backends: vec![v1, v2], ..Default::default() },
        ];
        let gateway = pb::IngressGateway {
            namespace: "default".into(),
            name: "web-gateway".into(),
            selector: labels().into_iter().collect(),
            servers: vec![pb::GatewayServer {
                port: 80,
                protocol: Protocol::Http as i32,
                hosts: vec!["shop.example".into()],
                ..Default::default()
            }],
            routes: vec![pb::GatewayRoute {
                hosts: vec!["shop.example".into()],
                ports: vec![80],
                route: Some(pb::Route { name: "default/web".into(), rules, ordered: true, ..Default::default() }),
                tls_rules: Vec::new(),
            }],
        };
        s.ingress_gateways.insert("default/web-gateway".into(), Arc::new(gateway));
        s.insert_workload(proto::state::Workload::from_pb(gateway_pod(&[])).unwrap());
        s
    }

    fn head(host: &str, headers: &[(&str, &str)]) -> Head {
        let mut head = fixture::head("GET", "/hello?x=1", headers);
        head.host = host.into();
        head
    }

    fn plan(state: &MeshState, labels: &BTreeMap<String, String>, head: Head, seed: u64) -> Result<Plan, Answer> {
        let own = (IpAddr::from(GATEWAY_IP), 80);
        let client = IpAddr::from([192, 0, 2, 7]);
        plan_request(&Regexes::default(), state, labels, own, head, (client, None), &mut StdRng::seed_from_u64(seed))
    }

    #[test]
    fn the_split_follows_the_weights_and_the_header_route_wins() {
        let state = gateway_state();
        let mut counts = BTreeMap::new();
        for seed in 0..1000 {
            let plan = plan(&state, &labels(), head("shop.example", &[]), seed).unwrap();
            *counts.entry(plan.backend.key.clone()).or_insert(0) += 1;
            assert_eq!(plan.route, "default/web");
            // The backend named no port: the service's only one (80 → 8080).
            assert!(plan.backend.endpoints.iter().all(|e| e.port == 8080));
        }
        let v1 = counts[&format!("{KEY}#v1")];
        assert!((650..=750).contains(&v1), "{counts:?}");
        assert_eq!(v1 + counts[&format!("{KEY}#v2")], 1000);
        for seed in 0..20 {
            let plan = plan(&state, &labels(), head("shop.example:80", &[("version", "new")]), seed).unwrap();
            assert_eq!(plan.backend.key, format!("{KEY}#v2"));
            // The client's address goes upstream in x-forwarded-for, from the socket.
            assert_eq!(plan.head.headers["x-forwarded-for"], "192.0.2.7");
        }
    }

    fn refused(result: Result<Plan, Answer>) -> Answer {
        match result {
            Ok(plan) => panic!("planned to {}", plan.backend.key),
            Err(a) => a,
        }
    }

    #[test]
    fn a_host_port_or_selector_no_gateway_serves_gets_404() {
        let state = gateway_state();
        for host in ["other.example", "", "x.shop.example"] {
            let a = refused(plan(&state, &labels(), head(host, &[]), 1));
            assert_eq!((a.status, a.flags), (StatusCode::NOT_FOUND, "NR"), "{host}");
        }
        let other = BTreeMap::from([("istio".to_owned(), "eastwestgateway".to_owned())]);
        let a = refused(plan(&state, &other, head("shop.example", &[]), 1));
        assert_eq!((a.status, a.flags), (StatusCode::NOT_FOUND, "NR"));
        let mut no_route = gateway_state();
        Arc::make_mut(no_route.ingress_gateways.get_mut("default/web-gateway").unwrap()).routes.clear();
        let a = refused(plan(&no_route, &labels(), head("shop.example", &[]), 1));
        assert_eq!((a.status, a.body), (StatusCode::NOT_FOUND, "no route matched\n"));
    }

    #[test]
    fn an_https_redirect_server_answers_301_with_the_https_location() {
        let mut state = gateway_state();
        let g = Arc::make_mut(state.ingress_gateways.get_mut("default/web-gateway").unwrap());
        g.servers[0].tls = Some(GatewayTls { https_redirect: true, ..Default::default() });
        let a = refused(plan(&state, &labels(), head("shop.example", &[]), 1));
        assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(a.header.unwrap().1, "https://shop.example/hello?x=1");
    }

    #[test]
    fn a_destination_with_a_waypoint_is_reached_through_it_never_around_it() {
        let mut state = gateway_state();
        let mut svc = (**state.service(KEY).unwrap()).clone();
        svc.waypoint = Some(proto::state::Waypoint {
            at: proto::state::WaypointAt::Address("10.0.0.60".parse().unwrap()),
            hbone_port: 15008,
        });
        state.insert_service(svc);
        // Its waypoint has no pod (yet): refused, not sent around it.
        let a = refused(plan(&state, &labels(), head("shop.example", &[]), 1));
        assert_eq!((a.status, a.flags), (StatusCode::SERVICE_UNAVAILABLE, "UH"));

        let pod = proto::api::istio::workload::Workload {
            uid: "Kubernetes//Pod/shop/waypoint".into(),
            name: "waypoint".into(),
            namespace: "shop".into(),
            addresses: vec![vec![10, 0, 0, 60]],
            service_account: "waypoint".into(),
            ..Default::default()
        };
        state.insert_workload(proto::state::Workload::from_pb(pod).unwrap());
        for seed in 0..10 {
            let plan = plan(&state, &labels(), head("shop.example", &[]), seed).unwrap();
            let [only] = plan.backend.endpoints.as_slice() else { panic!("{:?}", plan.backend.endpoints) };
            // The waypoint pod, with requests naming the service's VIP and port.
            assert_eq!(only.workload.name, "waypoint");
            assert_eq!((only.address, only.port), (Some(IpAddr::from([10, 96, 0, 1])), 80));
        }
    }

    #[test]
    fn a_policy_applying_to_the_gateway_pod_or_an_unknown_pod_denies_every_request() {
        let denied = |state: &MeshState| {
            let a = refused(plan(state, &labels(), head("shop.example", &[]), 1));
            assert_eq!((a.status, a.flags), (StatusCode::FORBIDDEN, "RBAC"));
        };
        let policy = |name: &str, namespace: &str, scope: Scope| Authorization {
            name: name.into(),
            namespace: namespace.into(),
            scope: scope as i32,
            action: sec::Action::Allow as i32,
            ..Default::default()
        };
        let base = || {
            let mut state = gateway_state();
            // A policy elsewhere does not concern it.
            state.policies.insert("shop/allow-some".into(), policy("allow-some", "shop", Scope::Namespace));
            state
        };
        assert!(plan(&base(), &labels(), head("shop.example", &[]), 1).is_ok());

        // Its namespace's policy, the mesh-wide one, one whose selector picks its pod.
        let mut namespaced = base();
        namespaced.policies.insert("istio-system/ns".into(), policy("ns", "istio-system", Scope::Namespace));
        denied(&namespaced);
        let mut global = base();
        global.policies.insert("istio-system/all".into(), policy("all", "istio-system", Scope::Global));
        denied(&global);
        let mut selected = base();
        let by_selector = policy("pick", "istio-system", Scope::WorkloadSelector);
        selected.policies.insert("istio-system/pick".into(), by_selector);
        // ... only once the control plane says the selector picks it.
        assert!(plan(&selected, &labels(), head("shop.example", &[]), 1).is_ok());
        selected.insert_workload(proto::state::Workload::from_pb(gateway_pod(&["istio-system/pick"])).unwrap());
        denied(&selected);

        // Its own workload not (yet) known: whether a policy applies cannot be told.
        let mut unknown = base();
        unknown.remove_address("Kubernetes//Pod/istio-system/ingress");
        assert!(unknown.workload_by_ip(IpAddr::from(GATEWAY_IP)).is_none());
        denied(&unknown);
    }

    #[test]
    fn the_most_specific_server_wins_whatever_the_order() {
        let server = |name: &str, hosts: &[&str]| pb::GatewayServer {
            name: name.into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ..Default::default()
        };
        let servers =
            [server("any", &["*"]), server("shop", &["*.shop.example"]), server("api", &["api.shop.example"])];
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            let listed: Vec<&pb::GatewayServer> = order.iter().map(|i| &servers[*i]).collect();
            let best = |host| best_server(listed.iter().copied(), host).map(|s| s.name.as_str());
            assert_eq!(best(Some("api.shop.example")), Some("api"));
            assert_eq!(best(Some("www.shop.example")), Some("shop"));
            assert_eq!(best(Some("elsewhere.example")), Some("any"));
            assert_eq!(best(None), Some("any"));
        }
        assert_eq!(best_server([&servers[2]].into_iter(), None).map(|s| s.name.as_str()), None);
    }

    #[test]
    fn a_request_for_another_server_than_its_handshake_chose_is_misdirected() {
        let mut state = gateway_state();
        let g = Arc::make_mut(state.ingress_gateways.get_mut("default/web-gateway").unwrap());
        let https = |name: &str, host: &str| pb::GatewayServer {
            name: name.into(),
            port: 443,
            protocol: Protocol::Https as i32,
            hosts: vec![host.into()],
            tls: Some(GatewayTls {
                mode: proto::api::ambient::waypoint::v1::gateway_tls::Mode::Simple as i32,
                ..Default::default()
            }),
        };
        g.servers = vec![https("public", "shop.example"), https("partners", "api.example")];
        g.routes[0].ports = vec![443];
        let public = ServerId::of(&g.servers[0]);
        let own = (IpAddr::from(GATEWAY_IP), 443);
        let client = IpAddr::from([192, 0, 2, 7]);
        let plan = |host: &str, handshake: &ServerId| {
            let rng = &mut StdRng::seed_from_u64(1);
            plan_request(&Regexes::default(), &state, &labels(), own, head(host, &[]), (client, Some(handshake)), rng)
        };
        let partners = ServerId { name: "partners".into(), hosts: vec!["api.example".into()] };
        assert!(plan("shop.example", &public).is_ok());
        let a = refused(plan("api.example", &public));
        assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
        let a = refused(plan("shop.example", &partners));
        assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    }

    #[test]
    fn a_host_loses_its_port() {
        assert_eq!(host_name("xingren.upup:80"), "xingren.upup");
        assert_eq!(host_name("xingren.upup"), "xingren.upup");
        assert_eq!(host_name("[fd00::1]:8080"), "fd00::1");
        assert_eq!(host_name("[fd00::1]"), "fd00::1");
    }
}
