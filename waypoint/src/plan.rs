//! The deciding half of one HTTP request: from its head, the caller and the mesh state as it is
//! now, what to do — answer at once (a refusal, a redirect, an injected abort) or send it on by
//! a [`Plan`] that [`crate::send`] carries out: the backend and its endpoints, the request as it
//! will go upstream, the fault delay, the retry and timeout policy, the mirror.
//!
//! Planning does no I/O and never waits. Its dice (weighted backends, fault percentages) come
//! from the caller's random number generator, so every branch can be tested with a state built
//! in memory.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proto::api::ambient::waypoint::v1::{self as pb, filter};
use proto::hbone::TraceParent;
use proto::state::{MeshState, Workload};
use rand::Rng;
use std::sync::Arc;
use tracing::warn;

use crate::authz::{AuthzInput, Decision, HttpAttributes};
use crate::headers;
use crate::jwt::{self, Authn, KeyCache, RequestPrincipal};
use crate::proxy::Downstream;
use crate::route::{self, Regexes, RouteInput};
use crate::target::{self, Backend, Destination, Endpoint};
use crate::upstream::Body;

/// What planning needs besides the state: who the waypoint is and its caches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Env<'a> {
    /// The waypoint's Gateway (namespace, name): policies bound to it apply to every request.
    pub(crate) gateway: (&'a str, &'a str),
    /// Compiled route regexes.
    pub(crate) regexes: &'a Regexes,
    /// Parsed JWT verification keys.
    pub(crate) jwt_keys: &'a KeyCache,
}

/// A request's head with its target in canonical form.
#[derive(Debug)]
pub(crate) struct Head {
    /// Method (canonical), URI, version, headers as received.
    pub(crate) parts: Parts,
    /// The canonical path, without the query.
    pub(crate) path: String,
    /// The canonical host (`Host` or `:authority`).
    pub(crate) host: String,
}

/// What happened to a request, for metrics and the access log.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// The status sent to the client.
    pub(crate) status: StatusCode,
    /// Envoy's response flags (`-`, `UO`, `UF`, `UT`, `UH`, `NR`, `RBAC`, `FI`, `DI`, `URX`, ...).
    pub(crate) flags: &'static str,
    /// The endpoint that answered, if one was reached.
    pub(crate) endpoint: Option<Arc<Workload>>,
    /// The route (`namespace/name`) whose rule applied, empty for none.
    pub(crate) route: String,
    /// Requests sent upstream.
    pub(crate) attempts: u32,
}

impl Outcome {
    /// Answered by the waypoint itself, no endpoint reached.
    pub(crate) fn local(status: StatusCode, flags: &'static str, route: &str) -> Outcome {
        Outcome { status, flags, endpoint: None, route: route.to_owned(), attempts: 0 }
    }
}

/// A plain-text response of the waypoint's own.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// An answer the waypoint gives without sending the request on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    /// Plain text.
    pub(crate) body: &'static str,
    /// Envoy's response flags.
    pub(crate) flags: &'static str,
    /// The route whose rule answered, empty for none.
    pub(crate) route: String,
    /// A header of its own (`Location`, `WWW-Authenticate`).
    pub(crate) header: Option<Box<(HeaderName, HeaderValue)>>,
}

impl Answer {
    /// A plain-text answer.
    pub(crate) fn text(status: StatusCode, body: &'static str, flags: &'static str, route: &str) -> Answer {
        Answer { status, body, flags, route: route.to_owned(), header: None }
    }

    /// The same answer with `name: value` added.
    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Answer {
        self.header = Some(Box::new((name, value)));
        self
    }

    /// The response, and the outcome to count and log.
    pub(crate) fn into_parts(self) -> (Response<Body>, Outcome) {
        let mut response = text(self.status, self.body);
        if let Some(h) = self.header {
            let (name, value) = *h;
            response.headers_mut().insert(name, value);
        }
        (response, Outcome::local(self.status, self.flags, &self.route))
    }
}

/// How a request is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Retry {
    /// Tries in all (the first one included).
    pub(crate) tries: u32,
    /// Statuses that are retried.
    pub(crate) on: Vec<u16>,
    /// Wait before each retry.
    pub(crate) backoff: Duration,
}

/// Statuses retried when a rule's retry policy names none (Istio's `5xx` family as Envoy's
/// `retriable-status-codes` sees it).
const DEFAULT_RETRY_ON: [u16; 4] = [500, 502, 503, 504];
/// The shortest backoff between retries (Envoy's default base interval).
const MIN_BACKOFF: Duration = Duration::from_millis(25);

/// Where a request's copy goes.
#[derive(Debug)]
pub(crate) struct Mirror {
    /// The endpoint picked for it.
    pub(crate) endpoint: Endpoint,
    /// The backend it is one of (its DestinationRule says how the copy is sent).
    pub(crate) backend: Backend,
}

/// A request to send on.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The request's head as it goes upstream; each try sets the URI to its endpoint.
    pub(crate) head: Parts,
    /// The path (rewritten, if the rule says so) and query sent upstream.
    pub(crate) path_and_query: String,
    /// The route whose rule applies, empty for none.
    pub(crate) route: String,
    /// Where it goes.
    pub(crate) backend: Backend,
    /// Where a copy goes, its answer ignored.
    pub(crate) mirror: Option<Mirror>,
    /// A fault delay that fired: the request waits this long first.
    pub(crate) delay: Option<Duration>,
    /// Retries, when the rule has them (never for an upgrade: its body is the connection).
    pub(crate) retry: Option<Retry>,
    /// Each try's timeout.
    pub(crate) per_try_timeout: Option<Duration>,
    /// The whole request's timeout, retries and the response's body included.
    pub(crate) timeout: Option<Duration>,
    /// Header changes to the response.
    pub(crate) response_headers: Option<pb::HeaderModifier>,
}

impl Plan {
    /// Whether the body has to be kept to be sent more than once.
    pub(crate) fn replays_body(&self) -> bool {
        self.retry.is_some() || self.mirror.is_some()
    }

    /// Tries in all.
    pub(crate) fn tries(&self) -> u32 {
        self.retry.as_ref().map_or(1, |r| r.tries)
    }
}

/// What to do with a request.
#[derive(Debug)]
pub(crate) enum Next {
    /// Answer it now.
    Answer(Answer),
    /// Send it on.
    Send(Box<Plan>),
}

/// A plan, and what the dry-run policies would have decided (for the log and metrics).
#[derive(Debug)]
pub(crate) struct Planned {
    pub(crate) next: Next,
    pub(crate) dry_run: Option<Decision>,
}

impl From<Answer> for Planned {
    fn from(answer: Answer) -> Planned {
        Planned { next: Next::Answer(answer), dry_run: None }
    }
}

/// Decides what to do with the request `head` from `down` to `destination`.
pub(crate) fn plan(
    env: &Env<'_>,
    state: &MeshState,
    down: &Downstream,
    destination: &Destination,
    head: Head,
    rng: &mut impl Rng,
) -> Planned {
    let mut dry_run = None;
    let next = match decide(env, state, down, destination, head, rng, &mut dry_run) {
        Ok(plan) => Next::Send(Box::new(plan)),
        Err(answer) => Next::Answer(answer),
    };
    Planned { next, dry_run }
}

fn decide(
    env: &Env<'_>,
    state: &MeshState,
    down: &Downstream,
    destination: &Destination,
    Head { mut parts, path, host }: Head,
    rng: &mut impl Rng,
    dry_run: &mut Option<Decision>,
) -> Result<Plan, Answer> {
    let port = down.target.port();
    let principal = authenticate(env, state, down, destination, &mut parts)?;
    let http = HttpAttributes {
        method: parts.method.as_str(),
        path: &path,
        host: &host,
        headers: &parts.headers,
        auth: principal.as_ref(),
    };
    let input = AuthzInput { peer: &down.peer, source_ip: down.source_ip, port, http: Some(http) };
    let verdict = target::authorize(state, env.gateway, Some(destination), &input);
    *dry_run = verdict.dry_run;
    if let Decision::Deny(policy) = &verdict.decision {
        warn!(peer = %down.peer, method = %parts.method, path = %path,
            policy = policy.as_deref().unwrap_or("no ALLOW policy matched"), "request denied by policy");
        return Err(Answer::text(StatusCode::FORBIDDEN, "RBAC: access denied\n", "RBAC", ""));
    }

    let chosen = choose_rule(env, state, destination, &parts, &path, port)?;
    let head = Head { parts, path, host };
    let ports = Ports { request: port, unset: UnsetPort::Request };
    plan_rule(state, chosen, head, ports, down.source_ip, || Backend::of(state, destination, port), rng)
}

/// What a backend that names no port is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnsetPort {
    /// The port the request came to (a waypoint: the client addressed the service's port).
    Request,
    /// The service's port when it has only one (an ingress gateway: the request came to the
    /// gateway's port, not the service's), as Istio resolves a VirtualService destination.
    OnlyServicePort,
}

/// The request's port, and how a backend without one gets its port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ports {
    pub(crate) request: u16,
    pub(crate) unset: UnsetPort,
}

impl Ports {
    /// The port to send to `service_key` on when the backend says `named` (0: none).
    fn for_backend(self, state: &MeshState, service_key: &str, named: u32) -> Option<u16> {
        if named != 0 {
            return u16::try_from(named).ok();
        }
        match self.unset {
            UnsetPort::Request => Some(self.request),
            UnsetPort::OnlyServicePort => match state.service(service_key).map(|s| s.ports.as_slice()) {
                Some([only]) => Some(only.service_port),
                _ => None,
            },
        }
    }
}

/// What the chosen rule of a route makes of a request to `port`: its filters, a backend by
/// weight, the faults, retries, mirror and timeouts. Without a rule the request goes to
/// `unrouted`.
pub(crate) fn plan_rule(
    state: &MeshState,
    chosen: Option<(&pb::RouteRule, String)>,
    Head { mut parts, path, host }: Head,
    ports: Ports,
    source_ip: Option<std::net::IpAddr>,
    unrouted: impl FnOnce() -> Backend,
    rng: &mut impl Rng,
) -> Result<Plan, Answer> {
    let (rule, route_name) = match chosen {
        Some((rule, route)) => (Some(rule), route),
        None => (None, String::new()),
    };
    let filtered = apply_filters(rule, &mut parts, path, &host, &route_name)?;

    let backend = match rule {
        Some(rule) => rule_backend(state, rule, ports, rng, &route_name)?,
        None => unrouted(),
    };
    if backend.endpoints.is_empty() {
        return Err(Answer::text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n", "UH", &route_name));
    }
    let one_request_per_connection =
        backend.policy().and_then(|p| p.connection_pool.as_ref()).is_some_and(|p| p.max_requests_per_connection == 1);

    let upgrade = prepare_head(&mut parts, source_ip, &host);
    if one_request_per_connection {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{}?{q}", filtered.path),
        None => filtered.path,
    };

    // Faults: an abort answers at once; a delay is the sender's to wait.
    let fault = rule.and_then(|r| r.fault.as_ref());
    if let Some(a) = fault.and_then(|f| f.abort.as_ref())
        && chance(rng, a.percent)
    {
        let status = StatusCode::from_u16(u16::try_from(a.http_status).unwrap_or(503))
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Err(Answer::text(status, "fault filter abort\n", "FI", &route_name));
    }
    let delay = fault
        .and_then(|f| f.delay.as_ref())
        .filter(|d| chance(rng, d.percent))
        .map(|d| Duration::from_millis(d.fixed_delay_ms));

    let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let retry = rule.and_then(|r| r.retry.as_ref()).filter(|r| r.attempts > 0 && upgrade.is_none()).map(|r| {
        let on: Vec<u16> = r.codes.iter().filter_map(|c| u16::try_from(*c).ok()).collect();
        Retry {
            tries: r.attempts.saturating_add(1),
            on: if on.is_empty() { DEFAULT_RETRY_ON.to_vec() } else { on },
            backoff: Duration::from_millis(r.backoff_ms).max(MIN_BACKOFF),
        }
    });
    // The mirror's share is rolled per request; its endpoint is picked at random among the
    // service's, or its subset's (a copy is never retried, so no state is kept for it).
    let mirror = filtered.mirror.filter(|m| m.percent.is_none_or(|p| chance(rng, p))).and_then(|m| {
        let b = m.backend.as_ref()?;
        let port = ports.for_backend(state, &b.service, b.port)?;
        let subset = (!b.subset.is_empty()).then_some((b.subset.as_str(), b.workloads.as_slice()));
        let mut backend = Backend::service(state, &b.service, port, subset);
        if backend.endpoints.is_empty() {
            return None;
        }
        let at = rng.random_range(0..backend.endpoints.len());
        let endpoint = backend.endpoints.swap_remove(at);
        Some(Mirror { endpoint, backend })
    });
    Ok(Plan {
        head: parts,
        path_and_query,
        route: route_name,
        backend,
        mirror,
        delay,
        retry,
        per_try_timeout: rule.and_then(|r| millis(r.backend_request_timeout_ms)),
        timeout: rule.and_then(|r| millis(r.request_timeout_ms)),
        response_headers: filtered.response_headers,
    })
}

/// The RequestAuthentication rules bound to this Gateway or to the destination's Service, checked
/// against the request's token: the verified principal, none for an anonymous request, `401`
/// for a token that is not valid here.
fn authenticate(
    env: &Env<'_>,
    state: &MeshState,
    down: &Downstream,
    destination: &Destination,
    parts: &mut Parts,
) -> Result<Option<RequestPrincipal>, Answer> {
    let policies = state.request_authns.targeting(env.gateway, destination.service_ref());
    if policies.is_empty() {
        return Ok(None);
    }
    let rules: Vec<&pb::JwtRule> = policies.iter().flat_map(|(_, p)| &p.jwt_rules).collect();
    match jwt::authenticate(&rules, &mut parts.headers, parts.uri.query(), env.jwt_keys) {
        Authn::Anonymous => Ok(None),
        Authn::Verified(p) => Ok(Some(p)),
        Authn::Refused(why) => {
            warn!(peer = %down.peer, method = %parts.method, path = parts.uri.path(), reason = %proto::error_chain(&why),
                "request refused: invalid JWT");
            Err(Answer::text(StatusCode::UNAUTHORIZED, "Jwt verification fails\n", "-", "")
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\"")))
        }
    }
}

/// The rule of the service's routes that applies, with its route's name; `None` when the
/// destination has no routes on this port (it is sent to itself), `404` when it has and none
/// matches.
fn choose_rule<'s>(
    env: &Env<'_>,
    state: &'s MeshState,
    destination: &Destination,
    parts: &Parts,
    path: &str,
    port: u16,
) -> Result<Option<(&'s pb::RouteRule, String)>, Answer> {
    let Destination::Service(svc) = destination else { return Ok(None) };
    let Some(routes) = state.routes.get(&svc.key).filter(|r| route::serves_port(r, port)) else { return Ok(None) };
    let input =
        RouteInput { method: parts.method.as_str(), path, query: parts.uri.query(), headers: &parts.headers, port };
    match route::select(routes, &input, env.regexes) {
        Some(c) => Ok(Some((c.rule, c.route.name.clone()))),
        None => Err(Answer::text(StatusCode::NOT_FOUND, "no route matched\n", "NR", "")),
    }
}

/// What a rule's filters leave to do after the request's headers were changed.
struct Filtered<'r> {
    /// The path to send (rewritten or not).
    path: String,
    response_headers: Option<pb::HeaderModifier>,
    mirror: Option<&'r pb::Mirror>,
}

/// Applies the rule's filters in order; a redirect answers at once.
fn apply_filters<'r>(
    rule: Option<&'r pb::RouteRule>,
    parts: &mut Parts,
    path: String,
    host: &str,
    route_name: &str,
) -> Result<Filtered<'r>, Answer> {
    let prefix = rule.and_then(|r| headers::matched_prefix(r, &path));
    let mut out = Filtered { path, response_headers: None, mirror: None };
    for f in rule.iter().flat_map(|r| &r.filters) {
        match &f.kind {
            Some(filter::Kind::RequestHeaderModifier(m)) => headers::modify_headers(&mut parts.headers, m),
            Some(filter::Kind::ResponseHeaderModifier(m)) => out.response_headers = Some(m.clone()),
            Some(filter::Kind::RequestRedirect(r)) => {
                let (status, location) = headers::redirect(r, host, &out.path, prefix);
                let answer = Answer::text(status, "", "-", route_name);
                return Err(match HeaderValue::from_str(&location) {
                    Ok(v) => answer.with_header(header::LOCATION, v),
                    Err(_) => answer,
                });
            }
            Some(filter::Kind::UrlRewrite(r)) => {
                if let Some(m) = &r.path {
                    out.path = headers::rewrite_path(&out.path, m, prefix);
                }
                if !r.hostname.is_empty()
                    && let Ok(v) = HeaderValue::from_str(&r.hostname)
                {
                    parts.headers.insert(header::HOST, v);
                }
            }
            Some(filter::Kind::RequestMirror(m)) => out.mirror = Some(m),
            None => {}
        }
    }
    Ok(out)
}

/// One of the rule's backends, by weight, with its endpoints.
fn rule_backend(
    state: &MeshState,
    rule: &pb::RouteRule,
    ports: Ports,
    rng: &mut impl Rng,
    route_name: &str,
) -> Result<Backend, Answer> {
    if rule.backends.is_empty() {
        return Err(Answer::text(StatusCode::INTERNAL_SERVER_ERROR, "route has no backends\n", "NR", route_name));
    }
    let Some(b) = route::pick_backend(&rule.backends, rng) else {
        return Err(Answer::text(StatusCode::INTERNAL_SERVER_ERROR, "no backend\n", "NR", route_name));
    };
    let Some(port) = ports.for_backend(state, &b.service, b.port) else {
        warn!(route = route_name, service = %b.service,
            "request refused: the route's destination names no port and the service has not exactly one");
        return Err(Answer::text(StatusCode::SERVICE_UNAVAILABLE, "destination port unknown\n", "NR", route_name));
    };
    let subset = (!b.subset.is_empty()).then_some((b.subset.as_str(), b.workloads.as_slice()));
    Ok(Backend::service(state, &b.service, port, subset))
}

/// Makes the head what goes upstream: hop-by-hop headers gone (an upgrade passed on keeps its
/// `Upgrade`), forwarding headers the waypoint vouches for, a new span, the canonical host.
/// Returns the upgrade passed on, if any.
fn prepare_head(parts: &mut Parts, source_ip: Option<std::net::IpAddr>, host: &str) -> Option<HeaderValue> {
    let upgrade = headers::upgrade(&parts.headers);
    parts.headers.remove("http2-settings");
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::sanitize_forwarding(&mut parts.headers, source_ip);
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
    upgrade
}

/// True with probability `percent` / 100; a percentage that is not a number never fires (the
/// control plane refuses those; this keeps a bad one from panicking the proxy).
pub(crate) fn chance(rng: &mut impl Rng, percent: f64) -> bool {
    let p = if percent.is_finite() { (percent / 100.0).clamp(0.0, 1.0) } else { 0.0 };
    rng.random_bool(p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use proto::api::ambient::waypoint::v1::{path_match, value_match};

    use super::*;
    use crate::fixture::{self, KEY, V1, V2, Waypoint};

    fn plan_of(planned: Planned) -> Plan {
        match planned.next {
            Next::Send(p) => *p,
            Next::Answer(a) => panic!("answered {} ({})", a.status, a.flags),
        }
    }

    fn answer_of(planned: Planned) -> Answer {
        match planned.next {
            Next::Answer(a) => a,
            Next::Send(p) => panic!("planned to send to {}", p.backend.key),
        }
    }

    fn uids(plan: &Plan) -> Vec<&str> {
        plan.backend.endpoints.iter().map(|e| e.workload.uid.as_str()).collect()
    }

    #[test]
    fn without_routes_a_request_goes_to_the_service_itself() {
        let wp = Waypoint::new();
        let plan = plan_of(wp.plan(&fixture::state(), fixture::head("GET", "/a?b=c", &[]), 1));
        assert_eq!(plan.backend.key, KEY);
        assert_eq!(uids(&plan), [V1, V2]);
        assert!(plan.backend.endpoints.iter().all(|e| e.port == 8080), "the target port");
        assert_eq!(plan.path_and_query, "/a?b=c");
        assert_eq!((plan.route.as_str(), &plan.retry, plan.timeout, plan.delay), ("", &None, None, None));
        assert!(plan.mirror.is_none() && !plan.replays_body());
    }

    #[test]
    fn a_deny_policy_answers_403_before_anything_is_planned() {
        let mut state = fixture::state();
        state.l7_policies.insert(
            "shop/no-admin".into(),
            pb::L7Policy {
                name: "no-admin".into(),
                namespace: "shop".into(),
                targets: vec![pb::PolicyTarget {
                    kind: pb::policy_target::Kind::Service as i32,
                    namespace: "shop".into(),
                    name: "web".into(),
                }],
                action: pb::l7_policy::Action::Deny as i32,
                rules: vec![pb::L7Rule {
                    to: vec![pb::L7Operation { paths: vec!["/admin*".into()], ..Default::default() }],
                    ..Default::default()
                }],
                dry_run: false,
            },
        );
        let wp = Waypoint::new();
        let denied = answer_of(wp.plan(&state, fixture::head("GET", "/admin/users", &[]), 1));
        assert_eq!((denied.status, denied.flags), (StatusCode::FORBIDDEN, "RBAC"));
        let allowed = plan_of(wp.plan(&state, fixture::head("GET", "/shop", &[]), 1));
        assert_eq!(allowed.backend.key, KEY);
    }

    /// The tutorial's VirtualService: `version: new` goes to the subset `new`, everything else
    /// 70/30 to `latest`/`new`.
    #[test]
    fn a_header_match_picks_its_rule_and_the_rest_is_split_by_weight() {
        let latest = Some(("latest", &[V1][..]));
        let new = Some(("new", &[V2][..]));
        let header_new = pb::RouteRule {
            name: "new".into(),
            matches: vec![pb::RouteMatch {
                headers: vec![pb::ValueMatch {
                    kind: value_match::Kind::Exact as i32,
                    name: "version".into(),
                    value: "new".into(),
                }],
                ..Default::default()
            }],
            backends: vec![fixture::backend(100, new)],
            ..Default::default()
        };
        let split = pb::RouteRule {
            name: "split".into(),
            backends: vec![fixture::backend(70, latest), fixture::backend(30, new)],
            ..Default::default()
        };
        let mut state = fixture::with_rules(fixture::state(), vec![header_new, split]);
        Arc::get_mut(state.routes.get_mut(KEY).unwrap()).unwrap().routes[0].ordered = true;
        let wp = Waypoint::new();
        for seed in 0..20 {
            let plan = plan_of(wp.plan(&state, fixture::head("GET", "/", &[("version", "new")]), seed));
            assert_eq!((plan.backend.key.as_str(), uids(&plan)), (format!("{KEY}#new").as_str(), vec![V2]));
            assert_eq!(plan.route, "shop/web-route");
        }
        let to_new = (0..1000)
            .filter(|seed| {
                let plan = plan_of(wp.plan(&state, fixture::head("GET", "/", &[]), *seed));
                plan.backend.key.ends_with("#new")
            })
            .count();
        // 1,000 draws at 30 %: ± 60 is more than 4 standard deviations.
        assert!((240..=360).contains(&to_new), "{to_new} of 1,000 went to `new`");
    }

    #[test]
    fn a_subset_is_governed_by_its_own_policy_when_it_has_one() {
        let pool = |n| pb::ConnectionPool { max_connections: n, ..Default::default() };
        let mut state = fixture::with_rules(
            fixture::state(),
            vec![pb::RouteRule { backends: vec![fixture::backend(1, Some(("new", &[V2][..])))], ..Default::default() }],
        );
        let mut policy = pb::DestinationPolicy { connection_pool: Some(pool(7)), ..Default::default() };
        policy
            .subsets
            .insert("new".into(), pb::DestinationPolicy { connection_pool: Some(pool(1)), ..Default::default() });
        state.destination_policies.insert(KEY.into(), Arc::new(policy));
        let plan = plan_of(Waypoint::new().plan(&state, fixture::head("GET", "/", &[]), 1));
        assert_eq!(plan.backend.policy().unwrap().connection_pool.unwrap().max_connections, 1);
    }

    #[test]
    fn no_matching_rule_is_404_and_no_endpoint_is_503() {
        let only_api = pb::RouteRule {
            matches: vec![pb::RouteMatch {
                path: Some(pb::PathMatch { kind: path_match::Kind::Prefix as i32, value: "/api".into() }),
                ..Default::default()
            }],
            backends: vec![fixture::backend(1, Some(("empty", &[][..])))],
            ..Default::default()
        };
        let state = fixture::with_rules(fixture::state(), vec![only_api]);
        let wp = Waypoint::new();
        let none = answer_of(wp.plan(&state, fixture::head("GET", "/web", &[]), 1));
        assert_eq!((none.status, none.flags), (StatusCode::NOT_FOUND, "NR"));
        let empty = answer_of(wp.plan(&state, fixture::head("GET", "/api/x", &[]), 1));
        assert_eq!((empty.status, empty.flags), (StatusCode::SERVICE_UNAVAILABLE, "UH"));
        assert_eq!(empty.route, "shop/web-route");
    }

    #[test]
    fn a_redirect_answers_with_its_location_and_sends_nothing() {
        let redirect = pb::RouteRule {
            filters: vec![pb::Filter {
                kind: Some(filter::Kind::RequestRedirect(pb::Redirect {
                    scheme: "https".into(),
                    status_code: 301,
                    ..Default::default()
                })),
            }],
            ..fixture::rule()
        };
        let state = fixture::with_rules(fixture::state(), vec![redirect]);
        let a = answer_of(Waypoint::new().plan(&state, fixture::head("GET", "/x", &[]), 1));
        assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
        let (name, location) = *a.header.unwrap();
        assert_eq!((name, location.to_str().unwrap()), (header::LOCATION, "https://web.shop.svc.cluster.local/x"));
    }

    #[test]
    fn faults_are_decided_when_the_request_is_planned() {
        let fault = |abort: f64, delay: f64| pb::RouteRule {
            fault: Some(pb::Fault {
                delay: Some(pb::Delay { fixed_delay_ms: 10_000, percent: delay }),
                abort: Some(pb::Abort { http_status: 418, percent: abort }),
            }),
            ..fixture::rule()
        };
        let wp = Waypoint::new();
        let aborted = answer_of(wp.plan(
            &fixture::with_rules(fixture::state(), vec![fault(100.0, 100.0)]),
            fixture::head("GET", "/", &[]),
            1,
        ));
        assert_eq!((aborted.status, aborted.flags), (StatusCode::IM_A_TEAPOT, "FI"));
        let delayed = plan_of(wp.plan(
            &fixture::with_rules(fixture::state(), vec![fault(0.0, 100.0)]),
            fixture::head("GET", "/", &[]),
            1,
        ));
        assert_eq!(delayed.delay, Some(Duration::from_secs(10)));
        let untouched = plan_of(wp.plan(
            &fixture::with_rules(fixture::state(), vec![fault(0.0, 0.0)]),
            fixture::head("GET", "/", &[]),
            1,
        ));
        assert_eq!(untouched.delay, None);
        // 10 % of requests, as the tutorial's delay.
        let state = fixture::with_rules(fixture::state(), vec![fault(0.0, 10.0)]);
        let n = (0..1000)
            .filter(|seed| plan_of(wp.plan(&state, fixture::head("GET", "/", &[]), *seed)).delay.is_some())
            .count();
        assert!((60..=140).contains(&n), "{n} of 1,000 delayed");
    }

    #[test]
    fn retries_and_timeouts_come_from_the_rule_but_an_upgrade_is_never_retried() {
        let rule = pb::RouteRule {
            request_timeout_ms: 5_000,
            backend_request_timeout_ms: 1_000,
            retry: Some(pb::Retry { codes: vec![], attempts: 2, backoff_ms: 1 }),
            ..fixture::rule()
        };
        let state = fixture::with_rules(fixture::state(), vec![rule]);
        let wp = Waypoint::new();
        let plan = plan_of(wp.plan(&state, fixture::head("POST", "/", &[]), 1));
        let retry = Retry { tries: 3, on: vec![500, 502, 503, 504], backoff: Duration::from_millis(25) };
        assert_eq!(plan.retry, Some(retry));
        assert_eq!((plan.timeout, plan.per_try_timeout), (Some(Duration::from_secs(5)), Some(Duration::from_secs(1))));
        assert!(plan.replays_body());
        let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
        let upgrade = plan_of(wp.plan(&state, fixture::head("GET", "/", &ws), 1));
        assert_eq!(upgrade.retry, None);
        assert_eq!(upgrade.head.headers["upgrade"], "websocket");
        assert_eq!(upgrade.head.headers["connection"], "upgrade");
    }

    #[test]
    fn the_head_sent_on_is_what_the_waypoint_vouches_for() {
        let mut state = fixture::state();
        let one = pb::ConnectionPool { max_requests_per_connection: 1, ..Default::default() };
        state
            .destination_policies
            .insert(KEY.into(), Arc::new(pb::DestinationPolicy { connection_pool: Some(one), ..Default::default() }));
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let head = fixture::head(
            "GET",
            "/",
            &[
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAAP__"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-client-cert", "By=spiffe://forged"),
                ("traceparent", parent),
                ("host", "WEB.shop.svc.cluster.local"),
            ],
        );
        let plan = plan_of(Waypoint::new().plan(&state, head, 1));
        let h = &plan.head.headers;
        for gone in ["x-secret", "upgrade", "http2-settings", "x-forwarded-client-cert", "keep-alive"] {
            assert!(!h.contains_key(gone), "{gone} was passed on");
        }
        assert_eq!(h["connection"], "close", "one request per connection");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["host"], "web.shop.svc.cluster.local");
        let sent = TraceParent::parse(h["traceparent"].to_str().unwrap()).unwrap();
        let parent = TraceParent::parse(parent).unwrap();
        assert_eq!(sent.trace_id, parent.trace_id, "the same trace");
        assert_ne!(sent.span_id, parent.span_id, "a span of its own");
    }

    #[test]
    fn percentages_that_are_not_numbers_never_fire_or_panic() {
        let mut rng = rand::rng();
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0, 0.0] {
            assert!((0..100).all(|_| !chance(&mut rng, p)), "{p}");
        }
        assert!((0..100).all(|_| chance(&mut rng, 100.0)) && (0..100).all(|_| chance(&mut rng, 1e300)));
    }

    /// VirtualService `mirrorPercentage` / Gateway API `percent`: that share of requests is
    /// copied, each copy to one of the mirror service's endpoints (not always the first).
    #[test]
    fn a_mirror_copies_its_share_of_requests_spread_over_the_endpoints() {
        let mirror = |percent: Option<f64>, subset: Option<(&str, &[&str])>| {
            let (subset, workloads) = subset.map_or((String::new(), Vec::new()), |(name, members)| {
                (name.to_owned(), members.iter().map(|m| m.to_string()).collect())
            });
            let backend = pb::Backend { service: KEY.into(), port: 80, weight: 1, subset, workloads };
            let filter =
                pb::Filter { kind: Some(filter::Kind::RequestMirror(pb::Mirror { backend: Some(backend), percent })) };
            fixture::with_rules(fixture::state(), vec![pb::RouteRule { filters: vec![filter], ..fixture::rule() }])
        };
        let wp = Waypoint::new();
        let mirrored = |state: &MeshState| {
            (0..1_000u64)
                .filter_map(|seed| plan_of(wp.plan(state, fixture::head("GET", "/", &[]), seed)).mirror)
                .map(|m| m.endpoint.workload.uid.clone())
                .collect::<Vec<_>>()
        };
        let all = mirrored(&mirror(None, None));
        assert_eq!(all.len(), 1_000, "no share given: every request");
        for uid in [V1, V2] {
            let n = all.iter().filter(|u| *u == uid).count();
            assert!((400..=600).contains(&n), "{uid} took {n} of 1,000 copies");
        }
        assert!(mirrored(&mirror(Some(0.0), None)).is_empty());
        let share = mirrored(&mirror(Some(25.0), None)).len();
        assert!((180..=320).contains(&share), "25 %: {share} of 1,000");
        // A subset's copies go to its members only.
        let to_v2 = mirrored(&mirror(None, Some(("v2", &[V2][..]))));
        assert!(to_v2.len() == 1_000 && to_v2.iter().all(|u| u == V2), "a copy left the subset");
    }

    #[test]
    fn a_percentage_fires_that_often() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for (percent, low, high) in [(10.0, 9_600, 10_400), (0.5, 400, 600), (99.9, 99_850, 99_950)] {
            // 100,000 draws: each range is more than 4 standard deviations wide on either side.
            let fired = (0..100_000).filter(|_| chance(&mut rng, percent)).count();
            assert!((low..=high).contains(&fired), "{percent} %: {fired} of 100,000");
        }
    }
}
