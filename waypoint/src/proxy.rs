//! One HTTP request through the waypoint: authorize, route, apply the rule's filters, send to an
//! endpoint (with the rule's timeouts and retries), answer, count and log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proto::SpiffeId;
use proto::api::ambient::waypoint::v1::{self as pb, filter, path_modifier};
use proto::hbone::TraceParent;
use proto::state::{MeshState, Service, Workload};
use rand::Rng;
use tracing::{info, warn};

use crate::Context;
use crate::authz::{self, AuthzInput, Decision, HttpAttributes};
use crate::body::{Deadline, RequestBody};
use crate::jwt::{self, Authn};
use crate::metrics::{Parties, RequestLabels};
use crate::normalize;
use crate::route::{self, RouteInput};
use crate::upstream::{Body, BoxError};

/// Bodies buffered for retries and mirrors at most this large; larger ones stream, once (not
/// retried, not mirrored), as Envoy does past its buffer limit.
const MAX_REPLAY_BODY: usize = 1 << 20;

/// Who is on the other side of one inbound tunnel.
#[derive(Debug)]
pub struct Downstream {
    /// The peer's identity, from its TLS certificate.
    pub peer: SpiffeId,
    /// The client: the tunnel's TCP peer (the client's ztunnel dials from the client pod's own
    /// address). Never taken from a header.
    pub source_ip: Option<IpAddr>,
    /// The source workload's name, from `baggage` (telemetry only).
    pub source_workload: Option<String>,
    /// The `CONNECT` target: a service VIP (or pod IP) and port.
    pub target: SocketAddr,
}

/// Where a request is going, resolved from the tunnel's target.
pub(crate) enum Destination {
    /// A service.
    Service(Arc<Service>),
    /// A pod addressed directly.
    Workload(Arc<Workload>),
}

/// What happened, for metrics and the access log.
struct Outcome {
    status: StatusCode,
    flags: &'static str,
    endpoint: Option<Arc<Workload>>,
    route: String,
    attempts: u32,
}

impl Outcome {
    /// Answered by the waypoint itself, no endpoint reached.
    fn failed(status: StatusCode, flags: &'static str, route: &str) -> Outcome {
        Outcome { status, flags, endpoint: None, route: route.to_owned(), attempts: 0 }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The service or pod at `ip`.
pub(crate) fn resolve(ctx: &Context, ip: IpAddr) -> Option<Destination> {
    ctx.view.read(|s| match s.service_by_vip(ip) {
        Some(svc) => Some(Destination::Service(svc.clone())),
        None => s.workload_by_ip(ip).cloned().map(Destination::Workload),
    })
}

/// The policy decision for `input`, a connection or request to `destination`: over the policies
/// bound to this Gateway or to the destination's Service.
pub(crate) fn authorize(ctx: &Context, destination: Option<&Destination>, input: &AuthzInput<'_>) -> Decision {
    let service = destination.and_then(service_ref);
    let gateway = (ctx.namespace.as_str(), ctx.name.as_str());
    let (decision, dry_run) = ctx.view.read(|s| {
        let applicable = s.l7_policies.targeting(gateway, service);
        let policies = || applicable.iter().map(|(_, p)| p.as_ref());
        (authz::decide(policies(), input), authz::dry_run(policies(), input))
    });
    if let Some(would) = dry_run {
        let label = if matches!(would, Decision::Allow(_)) { "allow" } else { "deny" };
        ctx.metrics.dry_run.get_or_create(&crate::metrics::DryRunLabels { decision: label }).inc();
        info!(peer = %input.peer, port = input.port, method = input.http.as_ref().map(|h| h.method),
            path = input.http.as_ref().map(|h| h.path), dry_run.decision = ?would,
            "dry-run policies applied (not enforced)");
    }
    decision
}

/// Checks the request's JWT against the RequestAuthentication rules bound to this Gateway or to
/// the destination's Service.
fn authenticate(ctx: &Context, destination: &Destination, headers: &mut HeaderMap, query: Option<&str>) -> Authn {
    let service = service_ref(destination);
    let gateway = (ctx.namespace.as_str(), ctx.name.as_str());
    let policies: Vec<Arc<pb::RequestAuthn>> =
        ctx.view.read(|s| s.request_authns.targeting(gateway, service).into_iter().map(|(_, p)| p.clone()).collect());
    if policies.is_empty() {
        return Authn::Anonymous;
    }
    let rules: Vec<&pb::JwtRule> = policies.iter().flat_map(|p| &p.jwt_rules).collect();
    jwt::authenticate(&rules, headers, query, &ctx.jwt_keys)
}

/// The service's `namespace`, `name`, for policy targets (`None` for a pod).
fn service_ref(d: &Destination) -> Option<(&str, &str)> {
    match d {
        Destination::Service(s) => Some((s.namespace.as_str(), s.name.as_str())),
        Destination::Workload(_) => None,
    }
}

/// Endpoints of `service_key` serving `port`, with the port to reach them on.
pub(crate) fn endpoints(state: &MeshState, service_key: &str, port: u16) -> Vec<Endpoint> {
    state
        .endpoints(service_key)
        .filter(|w| w.healthy)
        .filter_map(|w| {
            let p = w.services.get(service_key)?.iter().find(|p| p.service_port == port)?;
            Some(Endpoint { workload: w.clone(), port: p.target_port.unwrap_or(p.service_port) })
        })
        .collect()
}

/// An endpoint pod and the port it serves the backend on.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) workload: Arc<Workload>,
    pub(crate) port: u16,
}

impl AsRef<Workload> for Endpoint {
    fn as_ref(&self) -> &Workload {
        &self.workload
    }
}

/// True with probability `percent` / 100; a percentage that is not a number never fires (the
/// control plane refuses those; this keeps a bad one from panicking the proxy).
fn chance(percent: f64) -> bool {
    chance_with(&mut rand::rng(), percent)
}

fn chance_with(rng: &mut impl Rng, percent: f64) -> bool {
    let p = if percent.is_finite() { (percent / 100.0).clamp(0.0, 1.0) } else { 0.0 };
    rng.random_bool(p)
}

/// Hop-by-hop headers, never forwarded.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "proxy-authorization"];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// What a client says about where a request came from is passed on only behind what the
/// waypoint saw itself, as Envoy does by default: `x-forwarded-for` gets the client's address
/// appended (the last entry is the one a server can trust), and `x-forwarded-client-cert`, which
/// only a proxy that terminated the client's TLS may set, is removed (Envoy's `SANITIZE`).
fn sanitize_forwarding(headers: &mut HeaderMap, client: Option<IpAddr>) {
    headers.remove("x-forwarded-client-cert");
    let Some(client) = client else { return };
    let mut chain: Vec<String> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    chain.push(client.to_string());
    if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert("x-forwarded-for", v);
    }
}

fn modify_headers(headers: &mut HeaderMap, m: &pb::HeaderModifier) {
    let pair =
        |h: &pb::Header| Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_str(&h.value).ok()?));
    for (name, value) in m.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in m.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

fn rewrite_path(path: &str, m: &pb::PathModifier, matched_prefix: Option<&str>) -> String {
    match &m.kind {
        Some(path_modifier::Kind::ReplaceFullPath(p)) => p.clone(),
        Some(path_modifier::Kind::ReplacePrefixMatch(p)) => {
            // `rest` is empty or starts with `/` (prefixes match whole segments).
            let prefix = matched_prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let base = p.trim_end_matches('/');
            match (base.is_empty(), rest.is_empty()) {
                (true, true) => "/".to_owned(),
                (_, true) => base.to_owned(),
                _ => format!("{base}{rest}"),
            }
        }
        None => path.to_owned(),
    }
}

/// The prefix a rule matched `path` with, if it was a prefix match.
fn matched_prefix<'a>(rule: &'a pb::RouteRule, path: &str) -> Option<&'a str> {
    rule.matches.iter().filter_map(|m| m.path.as_ref()).find_map(|p| {
        (p.kind == pb::path_match::Kind::Prefix as i32 && path.starts_with(p.value.trim_end_matches('/')))
            .then_some(p.value.as_str())
    })
}

fn redirect(r: &pb::Redirect, req_host: &str, path: &str, prefix: Option<&str>) -> Response<Body> {
    let scheme = if r.scheme.is_empty() { "http" } else { &r.scheme };
    let host = if r.hostname.is_empty() { req_host.split(':').next().unwrap_or(req_host) } else { &r.hostname };
    let port = if r.port == 0 { String::new() } else { format!(":{}", r.port) };
    let path = r.path.as_ref().map_or_else(|| path.to_owned(), |m| rewrite_path(path, m, prefix));
    // The redirect codes Envoy has; the control plane refuses others. Unset: 302 (Gateway API).
    let status = match r.status_code {
        301 | 303 | 307 | 308 => StatusCode::from_u16(r.status_code as u16).unwrap_or(StatusCode::FOUND),
        _ => StatusCode::FOUND,
    };
    let mut resp = text(status, "");
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{port}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Handles one request from `down`.
pub async fn handle(ctx: Arc<Context>, down: Arc<Downstream>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let upgrade = DownstreamUpgrade(req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>());
    let method = normalize::method(req.method());
    let raw_path = req.uri().path().to_owned();
    // The one canonical view policy and routing see, and the backend receives.
    let target = normalize::path(&raw_path).and_then(|p| Ok((p, normalize::host(req.headers(), req.uri())?)));
    let host = target.as_ref().map(|(_, h)| h.clone()).unwrap_or_default();
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let destination = resolve(&ctx, down.target.ip());
    let parties = Parties::new(&down, destination.as_ref());
    let (response, outcome) = match (destination, target) {
        (None, _) => (
            text(StatusCode::SERVICE_UNAVAILABLE, "no service or workload at this address\n"),
            Outcome::failed(StatusCode::SERVICE_UNAVAILABLE, "NR", ""),
        ),
        // A tunnel inside the tunnel would carry bytes no policy looked at.
        (Some(_), _) if method == http::Method::CONNECT => {
            warn!(peer = %down.peer, "request refused: CONNECT is not proxied by the waypoint");
            (
                text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied by the waypoint\n"),
                Outcome::failed(StatusCode::METHOD_NOT_ALLOWED, "-", ""),
            )
        }
        (Some(_), Err(e)) => {
            warn!(peer = %down.peer, path = %raw_path, reason = %e, "request refused: ambiguous request target");
            (text(StatusCode::BAD_REQUEST, "bad request target\n"), Outcome::failed(StatusCode::BAD_REQUEST, "-", ""))
        }
        (Some(d), Ok((path, host))) => route_and_send(&ctx, &down, d, req, upgrade, method.clone(), (path, host)).await,
    };
    let elapsed = start.elapsed();
    let endpoint = outcome.endpoint.as_deref();
    let mut parties = parties;
    if let Some(w) = endpoint {
        parties.set_endpoint(w);
    }
    let labels = RequestLabels {
        reporter: "waypoint",
        parties,
        request_protocol: if grpc { "grpc" } else { "http" },
        response_code: outcome.status.as_u16(),
        response_flags: outcome.flags,
        connection_security_policy: "mutual_tls",
    };
    ctx.metrics.record(&labels, elapsed.as_secs_f64() * 1000.0);
    info!(
        target: "access",
        src = %down.peer,
        src_ip = ?down.source_ip,
        method = %method,
        path = %raw_path,
        authority = %host,
        service = %labels.parties.destination_service,
        route = %outcome.route,
        endpoint = %endpoint.map(|w| w.name.as_str()).unwrap_or("-"),
        status = outcome.status.as_u16(),
        flags = outcome.flags,
        attempts = outcome.attempts,
        duration_ms = elapsed.as_millis() as u64,
        "request"
    );
    response
}

#[allow(clippy::too_many_lines)]
async fn route_and_send(
    ctx: &Arc<Context>,
    down: &Downstream,
    destination: Destination,
    req: Request<Incoming>,
    mut downstream_upgrade: DownstreamUpgrade,
    method: http::Method,
    (path, host): (String, String),
) -> (Response<Body>, Outcome) {
    let host = host.as_str();
    let port = down.target.port();
    let fail = Outcome::failed;
    let (mut parts, body) = req.into_parts();
    parts.method = method.clone();

    // Authentication (RequestAuthentication), whose principal authorization may need.
    let principal = match authenticate(ctx, &destination, &mut parts.headers, parts.uri.query()) {
        Authn::Anonymous => None,
        Authn::Verified(p) => Some(p),
        Authn::Refused(why) => {
            warn!(peer = %down.peer, method = %method, path = %path, reason = %why, "request refused: invalid JWT");
            let mut resp = text(StatusCode::UNAUTHORIZED, "Jwt verification fails\n");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
            return (resp, fail(StatusCode::UNAUTHORIZED, "-", ""));
        }
    };

    // Authorization.
    let http = HttpAttributes {
        method: method.as_str(),
        path: &path,
        host,
        headers: &parts.headers,
        auth: principal.as_ref(),
    };
    let input = AuthzInput { peer: &down.peer, source_ip: down.source_ip, port, http: Some(http) };
    let decision = authorize(ctx, Some(&destination), &input);
    if let Decision::Deny(policy) = &decision {
        warn!(peer = %down.peer, method = %method, path = %path, policy = policy.as_deref().unwrap_or("no ALLOW policy matched"), "request denied by policy");
        return (text(StatusCode::FORBIDDEN, "RBAC: access denied\n"), fail(StatusCode::FORBIDDEN, "RBAC", ""));
    }

    // Routing.
    let (service_key, rule, route_name) = match &destination {
        Destination::Workload(_) => (None, None, String::new()),
        Destination::Service(svc) => {
            let key = &svc.key;
            // A service with no route for this port (or only declared protocols) goes to itself.
            let routes = ctx.view.read(|s| s.routes.get(key).cloned()).filter(|r| route::serves_port(r, port));
            match routes {
                None => (Some(key.clone()), None, String::new()),
                Some(routes) => {
                    let input = RouteInput {
                        method: method.as_str(),
                        path: &path,
                        query: parts.uri.query(),
                        headers: &parts.headers,
                        port,
                    };
                    match route::select(&routes, &input, &ctx.regexes) {
                        Some(c) => (Some(key.clone()), Some(c.rule.clone()), c.route.name.clone()),
                        None => {
                            return (
                                text(StatusCode::NOT_FOUND, "no route matched\n"),
                                fail(StatusCode::NOT_FOUND, "NR", ""),
                            );
                        }
                    }
                }
            }
        }
    };

    // Filters.
    let prefix = rule.as_ref().and_then(|r| matched_prefix(r, &path));
    let mut path = path;
    let mut response_modifier = None;
    let mut mirror = None;
    for f in rule.iter().flat_map(|r| &r.filters) {
        match &f.kind {
            Some(filter::Kind::RequestHeaderModifier(m)) => modify_headers(&mut parts.headers, m),
            Some(filter::Kind::ResponseHeaderModifier(m)) => response_modifier = Some(m.clone()),
            Some(filter::Kind::RequestRedirect(r)) => {
                let resp = redirect(r, host, &path, prefix);
                let status = resp.status();
                return (resp, Outcome { status, flags: "-", endpoint: None, route: route_name, attempts: 0 });
            }
            Some(filter::Kind::UrlRewrite(r)) => {
                if let Some(m) = &r.path {
                    path = rewrite_path(&path, m, prefix);
                }
                if let Ok(v) = HeaderValue::from_str(&r.hostname)
                    && !r.hostname.is_empty()
                {
                    parts.headers.insert(header::HOST, v);
                }
            }
            Some(filter::Kind::RequestMirror(m)) => mirror = m.backend.clone(),
            None => {}
        }
    }

    // Backend: the rule's (by weight), else the destination itself.
    let (backend_key, backend_port, subset) = match (&rule, &service_key) {
        (Some(r), _) if !r.backends.is_empty() => match route::pick_backend(&r.backends, &mut rand::rng()) {
            Some(b) => (
                Some(b.service.clone()),
                if b.port == 0 { port } else { u16::try_from(b.port).unwrap_or(port) },
                (!b.subset.is_empty()).then(|| (b.subset.clone(), b.workloads.clone())),
            ),
            None => {
                return (
                    text(StatusCode::INTERNAL_SERVER_ERROR, "no backend\n"),
                    fail(StatusCode::INTERNAL_SERVER_ERROR, "NR", &route_name),
                );
            }
        },
        (Some(_), _) => {
            return (
                text(StatusCode::INTERNAL_SERVER_ERROR, "route has no backends\n"),
                fail(StatusCode::INTERNAL_SERVER_ERROR, "NR", &route_name),
            );
        }
        (None, key) => (key.clone(), port, None),
    };
    let mut candidates: Vec<Endpoint> = match (&backend_key, &destination) {
        (Some(key), _) => ctx.view.read(|s| endpoints(s, key, backend_port)),
        (None, Destination::Workload(w)) => vec![Endpoint { workload: w.clone(), port }],
        (None, Destination::Service(..)) => Vec::new(),
    };
    if let Some((_, members)) = &subset {
        candidates.retain(|e| members.contains(&e.workload.uid));
    }
    // A subset is a destination of its own (limits, ejections), under its own policy if it has one.
    let service_policy = backend_key.as_ref().and_then(|k| ctx.view.read(|s| s.destination_policies.get(k).cloned()));
    let policy = match (&service_policy, &subset) {
        (Some(p), Some((name, _))) => Some(p.subsets.get(name).unwrap_or(p)),
        (p, _) => p.as_deref(),
    };
    let state_key = match &subset {
        Some((name, _)) => format!("{}#{name}", backend_key.as_deref().unwrap_or_default()),
        None => backend_key.clone().unwrap_or_default(),
    };
    let destination_state = ctx.destinations.state(&state_key, policy);
    if destination_state.one_request_per_connection() {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if candidates.is_empty() {
        return (
            text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n"),
            fail(StatusCode::SERVICE_UNAVAILABLE, "UH", &route_name),
        );
    }

    // Request to send: canonical method and path, hop-by-hop headers gone, a new span.
    // An HTTP/1.1 upgrade (WebSocket and the like) keeps its Upgrade header; the two upgraded
    // connections are joined once the endpoint answers 101.
    // An upgrade to h2c is dropped (the request goes on as HTTP/1.1, as Envoy does): behind it
    // the backend would take HTTP/2 requests that no policy looked at.
    let upgrade = parts.headers.get(header::UPGRADE).cloned().filter(|proto| {
        let h2c = proto.to_str().map_or(true, |p| p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
        !h2c && parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
    });
    parts.headers.remove("http2-settings");
    strip_hop_by_hop(&mut parts.headers);
    sanitize_forwarding(&mut parts.headers, down.source_ip);
    if let Some(proto) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, proto.clone());
    }
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
        .map_or_else(|| TraceParent::random(false), |t| t.child());
    if let Ok(v) = HeaderValue::from_str(&trace.to_string()) {
        parts.headers.insert("traceparent", v);
    }
    if !host.is_empty()
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(header::HOST, v);
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    // An upgrade's body is the connection itself: never replayed.
    let retry = rule.as_ref().and_then(|r| r.retry.clone()).filter(|r| r.attempts > 0 && upgrade.is_none());
    let replayable = retry.is_some() || mirror.is_some();
    let mut body = if replayable {
        match RequestBody::buffer_up_to(body, MAX_REPLAY_BODY).await {
            Ok(b) => b,
            Err(e) => {
                warn!(peer = %down.peer, error = %e, "request body failed while it was read");
                return (
                    text(StatusCode::BAD_REQUEST, "request body failed\n"),
                    fail(StatusCode::BAD_REQUEST, "DPE", &route_name),
                );
            }
        }
    } else {
        RequestBody::Stream(Some(body.map_err(BoxError::from).boxed()))
    };
    let http2 = parts.version == Version::HTTP_2;

    if let (Some(m), RequestBody::Buffered(b)) = (&mirror, &body) {
        let targets = ctx.view.read(|s| endpoints(s, &m.service, if m.port == 0 { port } else { m.port as u16 }));
        if let Some(Endpoint { workload: w, port: p }) = targets.first()
            && let Some(ip) = w.primary_address()
            && let Ok(uri) = format!("http://{}{path_and_query}", SocketAddr::new(ip, *p)).parse::<Uri>()
        {
            let mut copy = Request::new(Full::new(b.clone()).map_err(|e| match e {}).boxed());
            *copy.method_mut() = parts.method.clone();
            *copy.uri_mut() = uri;
            *copy.headers_mut() = parts.headers.clone();
            let client = ctx.clients.for_client(down.source_ip).http1;
            // Mirrored requests are fire-and-forget: their answers and failures are ignored.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), client.request(copy)).await;
            });
        }
    }

    let total_timeout = rule.as_ref().map(|r| r.request_timeout_ms).filter(|ms| *ms > 0).map(Duration::from_millis);
    let per_try = rule.as_ref().map(|r| r.backend_request_timeout_ms).filter(|ms| *ms > 0).map(Duration::from_millis);
    let attempts = retry.as_ref().map_or(1, |r| r.attempts + 1);
    let clients = ctx.clients.for_client(down.source_ip);
    let retry_codes: Vec<u16> = retry
        .as_ref()
        .map(|r| r.codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect())
        .filter(|c: &Vec<u16>| !c.is_empty())
        .unwrap_or_else(|| vec![500, 502, 503, 504]);
    let backoff = retry.as_ref().map_or(Duration::ZERO, |r| Duration::from_millis(r.backoff_ms.max(25)));

    let fault = rule.as_ref().and_then(|r| r.fault);
    let outlier = policy.and_then(|p| p.outlier_detection);
    let send_all = async {
        // Faults first: an abort answers at once; a delay counts against the request timeout.
        let mut delayed = false;
        if let Some(f) = &fault {
            if let Some(a) = &f.abort
                && chance(a.percent)
            {
                let status = StatusCode::from_u16(u16::try_from(a.http_status).unwrap_or(503))
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return (text(status, "fault filter abort\n"), fail(status, "FI", &route_name));
            }
            if let Some(d) = &f.delay
                && chance(d.percent)
            {
                delayed = true;
                tokio::time::sleep(Duration::from_millis(d.fixed_delay_ms)).await;
            }
        }
        // The destination's limits: wait for a slot, or overflow.
        let Some(_slot) = destination_state.admit().await else {
            return (
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow\n",
                ),
                fail(StatusCode::SERVICE_UNAVAILABLE, "UO", &route_name),
            );
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last: (Response<Body>, Outcome) = (
            text(StatusCode::SERVICE_UNAVAILABLE, "upstream unavailable\n"),
            fail(StatusCode::SERVICE_UNAVAILABLE, "UF", &route_name),
        );
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
            }
            // A retry goes to another endpoint when there is one.
            let Some(Endpoint { workload, port: target_port }) = destination_state.pick(&candidates, policy, &tried)
            else {
                break;
            };
            tried.push(workload.uid.clone());
            let _in_flight = destination_state.start(&workload.uid);
            let Some(ip) = workload.primary_address() else { continue };
            let Some(b) = body.take() else { break };
            let Ok(uri) = format!("http://{}{path_and_query}", SocketAddr::new(ip, *target_port)).parse::<Uri>() else {
                break;
            };
            let mut upstream = Request::from_parts(parts.clone(), b);
            *upstream.uri_mut() = uri;
            *upstream.version_mut() = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
            let client = if http2 { &clients.http2 } else { &clients.http1 };
            let sent = client.request(upstream);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                None => Ok(sent.await),
            };
            let outcome = |status, flags: &'static str| Outcome {
                status,
                flags: if delayed && flags == "-" { "DI" } else { flags },
                endpoint: Some(workload.clone()),
                route: route_name.clone(),
                attempts: attempt + 1,
            };
            match result {
                Ok(Ok(mut resp)) => {
                    let status = resp.status();
                    destination_state.record(&workload.uid, status.as_u16(), outlier.as_ref(), candidates.len());
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        let Some(down) = downstream_upgrade.0.take() else {
                            return (
                                text(StatusCode::BAD_GATEWAY, "unexpected 101 from upstream\n"),
                                outcome(StatusCode::BAD_GATEWAY, "UPE"),
                            );
                        };
                        let up = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
                        tokio::spawn(join_upgraded(down, up, workload.name.clone()));
                        let (mut head, _) = resp.into_parts();
                        head.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        return (Response::from_parts(head, empty_body()), outcome(status, "-"));
                    }
                    let retryable = retry.is_some() && retry_codes.contains(&status.as_u16()) && attempt + 1 < attempts;
                    let resp = resp.map(|b| b.map_err(BoxError::from).boxed());
                    if !retryable {
                        return (resp, outcome(status, "-"));
                    }
                    last = (resp, outcome(status, "URX"));
                }
                Ok(Err(e)) => {
                    destination_state.record(&workload.uid, 0, outlier.as_ref(), candidates.len());
                    warn!(endpoint = %workload.name, error = %e, attempt = attempt + 1, "upstream request failed");
                    last = (
                        text(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n"),
                        outcome(StatusCode::SERVICE_UNAVAILABLE, "UF"),
                    );
                }
                Err(()) => {
                    destination_state.record(&workload.uid, 504, outlier.as_ref(), candidates.len());
                    last = (
                        text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                        outcome(StatusCode::GATEWAY_TIMEOUT, "UT"),
                    );
                }
            }
        }
        last
    };
    let deadline = total_timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
    let (mut resp, outcome) = match deadline {
        Some(d) => match tokio::time::timeout_at(d, send_all).await {
            Ok(r) => r,
            Err(_) => (
                text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n"),
                fail(StatusCode::GATEWAY_TIMEOUT, "UT", &route_name),
            ),
        },
        None => send_all.await,
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(resp.headers_mut());
        // The route's timeout covers the body too.
        if let Some(d) = deadline {
            resp = resp.map(|b| Deadline::new(b, d).boxed());
        }
    }
    if let Some(m) = &response_modifier {
        modify_headers(resp.headers_mut(), m);
    }
    (resp, outcome)
}

/// An empty body.
fn empty_body() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// The client's side of an HTTP/1.1 upgrade it asked for. Unless the endpoint switched protocols
/// (and the two sides were joined), dropping it ends the client's connection cleanly: hyper hands
/// over the connection of a request that asked for an upgrade even when the answer was not 101,
/// and a connection dropped unflushed would lose that answer (a 403, say).
pub(crate) struct DownstreamUpgrade(Option<hyper::upgrade::OnUpgrade>);

impl Drop for DownstreamUpgrade {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(io) = pending.await {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut TokioIo::new(io)).await;
                }
            });
        }
    }
}

/// Joins the client's and the endpoint's upgraded connections until either side closes.
async fn join_upgraded(down: hyper::upgrade::OnUpgrade, up: Option<hyper::upgrade::OnUpgrade>, endpoint: String) {
    let Some(up) = up else {
        warn!(%endpoint, "endpoint answered 101 without an upgradable connection");
        return;
    };
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((sent, received)) => tracing::debug!(%endpoint, sent, received, "upgraded connection closed"),
                Err(e) => tracing::debug!(%endpoint, error = %e, "upgraded connection ended with an error"),
            }
        }
        Err(e) => warn!(%endpoint, error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_keep_the_rest_of_the_path() {
        let m = pb::PathModifier { kind: Some(path_modifier::Kind::ReplacePrefixMatch("/v2".into())) };
        assert_eq!(rewrite_path("/api/users", &m, Some("/api")), "/v2/users");
        assert_eq!(rewrite_path("/api", &m, Some("/api")), "/v2");
        let full = pb::PathModifier { kind: Some(path_modifier::Kind::ReplaceFullPath("/x".into())) };
        assert_eq!(rewrite_path("/api/users", &full, None), "/x");
    }

    #[test]
    fn percentages_that_are_not_numbers_never_fire_or_panic() {
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0, 0.0] {
            assert!((0..100).all(|_| !chance(p)), "{p}");
        }
        assert!((0..100).all(|_| chance(100.0)) && (0..100).all(|_| chance(1e300)));
    }

    #[test]
    fn a_percentage_fires_that_often() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for (percent, low, high) in [(10.0, 9_600, 10_400), (0.5, 400, 600), (99.9, 99_850, 99_950)] {
            // 100,000 draws: each range is more than 4 standard deviations wide on either side.
            let fired = (0..100_000).filter(|_| chance_with(&mut rng, percent)).count();
            assert!((low..=high).contains(&fired), "{percent} %: {fired} of 100,000");
        }
    }

    #[test]
    fn forwarding_headers_are_appended_or_removed() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("127.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-client-cert", HeaderValue::from_static("By=spiffe://cluster.local/ns/x/sa/admin"));
        sanitize_forwarding(&mut h, Some("10.20.1.5".parse().unwrap()));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1, 1.2.3.4, 10.20.1.5");
        assert!(!h.contains_key("x-forwarded-client-cert"));
        let mut fresh = HeaderMap::new();
        sanitize_forwarding(&mut fresh, Some("10.20.1.5".parse().unwrap()));
        assert_eq!(fresh["x-forwarded-for"], "10.20.1.5");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
