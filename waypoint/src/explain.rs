//! What a waypoint would do with one HTTP request, step by step, for `ambientctl explain`: the
//! steps [`crate::plan`] takes — the request's JWT, the L7 AuthorizationPolicies, the route rule,
//! the backends with their DestinationRule — by the same functions, on a state built like the
//! waypoint's. Where the proxy rolls dice (weighted backends, fault percentages) every outcome is
//! listed with its share instead.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proto::SpiffeId;
use proto::api::ambient::waypoint::v1::{self as pb, DestinationPolicy, filter, l7_policy::Action};
use proto::state::MeshState;
use serde::Serialize;

use crate::authz::{self, AuthzInput, Decision, HttpAttributes};
use crate::jwt::{self, Authn, KeyCache};
use crate::route::{self, Regexes, RouteInput};
use crate::target::{self, Backend, Destination};

/// The request to explain.
#[derive(Debug)]
pub struct Request<'a> {
    /// Its method.
    pub method: &'a str,
    /// Its path, with the query if any.
    pub path: &'a str,
    /// Its headers (`Host` among them, or the destination's hostname is taken).
    pub headers: &'a [(String, String)],
    /// The service port (or the pod's port) it is sent to.
    pub port: u16,
    /// The client's identity, which the waypoint learns from the HBONE handshake.
    pub peer: &'a SpiffeId,
    /// The client's address.
    pub source_ip: Option<IpAddr>,
}

/// Why a request cannot be explained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Nothing at the address the request goes to.
    #[error("no service or workload at {0}")]
    NoDestination(IpAddr),
    /// A header name or value HTTP does not allow.
    #[error("header {0:?} is not a valid HTTP header")]
    Header(String),
    /// The method is not an HTTP method.
    #[error("method {0:?} is not an HTTP method")]
    Method(String),
    /// The path is not one a waypoint accepts.
    #[error("path {0:?}: {1}")]
    Path(String, String),
}

/// One L7 AuthorizationPolicy that applies, and what it made of the request.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct L7PolicyVerdict {
    /// `<namespace>/<name>`.
    pub name: String,
    /// `ALLOW`, `DENY`, or the unknown action's number (which denies).
    pub action: String,
    /// Evaluated for the log only.
    pub dry_run: bool,
    /// Whether it matched.
    pub matched: bool,
    /// The first of its rules that matched (0-based), when one did.
    pub rule: Option<usize>,
}

/// The route rule the request matches.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RouteChoice {
    /// `HTTPRoute` or `VirtualService`.
    pub kind: &'static str,
    /// `<namespace>/<name>`.
    pub route: String,
    /// The rule's position in it (0-based).
    pub rule: usize,
    /// The rule's name, if it has one.
    pub rule_name: String,
}

/// One place the request may go.
#[derive(Debug, Serialize, PartialEq)]
pub struct BackendChoice {
    /// The service (`<namespace>/<hostname>`), or the pod addressed.
    pub service: String,
    /// The port it is sent to, when known.
    pub port: Option<u16>,
    /// The DestinationRule subset.
    pub subset: Option<String>,
    /// Its share of requests, in percent.
    pub share: f64,
    /// Its endpoints (`<namespace>/<name>`), healthy ones only.
    pub endpoints: Vec<String>,
    /// The DestinationRule policy that governs it, in words; `None` when no DestinationRule
    /// applies.
    pub policy: Option<String>,
}

/// The waypoint's part of an explanation.
#[derive(Debug, Serialize, PartialEq)]
pub struct RequestExplanation {
    /// The request as explained (`<METHOD> <path>`, host).
    pub request: String,
    /// What its JWT (RequestAuthentication) gives.
    pub authentication: String,
    /// `ALLOW` or `DENY`.
    pub verdict: &'static str,
    /// Why.
    pub reason: String,
    /// Every L7 policy bound to the waypoint or the destination service, in evaluation order.
    pub policies: Vec<L7PolicyVerdict>,
    /// The rule that routes it, if one does.
    pub route: Option<RouteChoice>,
    /// How it is routed, in words.
    pub routing: String,
    /// Where it may go.
    pub backends: Vec<BackendChoice>,
    /// What the rule adds: timeouts, retries, faults, filters.
    pub rule_settings: Vec<String>,
    /// The outcome in one line.
    pub outcome: String,
}

/// Explains `request`, sent to `destination` through the waypoint of Gateway `gateway`
/// (namespace, name), on `state` as that waypoint holds it.
pub fn request(
    state: &MeshState,
    gateway: (&str, &str),
    destination: IpAddr,
    request: &Request<'_>,
) -> Result<RequestExplanation, RequestError> {
    let destination = Destination::at(state, destination).ok_or(RequestError::NoDestination(destination))?;
    let method =
        Method::from_bytes(request.method.as_bytes()).map_err(|_| RequestError::Method(request.method.to_owned()))?;
    let method = crate::normalize::method(&method);
    let (raw_path, query) = match request.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (request.path, None),
    };
    let path =
        crate::normalize::path(raw_path).map_err(|e| RequestError::Path(request.path.to_owned(), e.to_string()))?;
    let mut headers = HeaderMap::new();
    for (name, value) in request.headers {
        let bad = || RequestError::Header(format!("{name}: {value}"));
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        headers.append(name, HeaderValue::from_str(value.trim()).map_err(|_| bad())?);
    }
    let host = match headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        Some(h) => h.split(':').next().unwrap_or_default().to_ascii_lowercase(),
        None => match &destination {
            Destination::Service(s) => s.hostname.clone(),
            Destination::Workload(w) => w.primary_address().map(|a| a.to_string()).unwrap_or_default(),
        },
    };
    let mut out = RequestExplanation {
        request: format!("{method} {}  (host {host}, port {})", request.path, request.port),
        authentication: String::new(),
        verdict: "ALLOW",
        reason: String::new(),
        policies: Vec::new(),
        route: None,
        routing: String::new(),
        backends: Vec::new(),
        rule_settings: Vec::new(),
        outcome: String::new(),
    };

    // 1. The JWT, checked against the RequestAuthentications bound here.
    let authns = state.request_authns.targeting(gateway, destination.service_ref());
    let rules: Vec<&pb::JwtRule> = authns.iter().flat_map(|(_, p)| &p.jwt_rules).collect();
    let principal = if authns.is_empty() {
        out.authentication = "no RequestAuthentication applies".into();
        None
    } else {
        let names = authns.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        match jwt::authenticate(&rules, &mut headers, query, &KeyCache::default()) {
            Authn::Anonymous => {
                out.authentication = format!("no token ({names} apply): anonymous");
                None
            }
            Authn::Verified(p) => {
                out.authentication = format!("token verified by {names}: principal {}", p.principal);
                Some(p)
            }
            Authn::Refused(why) => {
                out.authentication = format!("token refused by {names}: {}", proto::error_chain(&why));
                out.verdict = "DENY";
                out.reason = "the request's JWT is not valid here".into();
                out.outcome = "answered 401 by the waypoint (Jwt verification fails)".into();
                return Ok(out);
            }
        }
    };

    // 2. L7 authorization: the waypoint's own decision, then each policy's part in it.
    let http = HttpAttributes {
        method: method.as_str(),
        path: &path,
        host: &host,
        headers: &headers,
        auth: principal.as_ref(),
    };
    let input = AuthzInput { peer: request.peer, source_ip: request.source_ip, port: request.port, http: Some(http) };
    let verdict = target::authorize(state, gateway, Some(&destination), &input);
    out.policies = state
        .l7_policies
        .targeting(gateway, destination.service_ref())
        .iter()
        .map(|(name, p)| {
            let rule = authz::matching_rule(p, &input);
            L7PolicyVerdict {
                name: (*name).to_owned(),
                action: match Action::try_from(p.action) {
                    Ok(a) => a.as_str_name().to_owned(),
                    Err(_) => p.action.to_string(),
                },
                dry_run: p.dry_run,
                matched: rule.is_some(),
                rule,
            }
        })
        .collect();
    match &verdict.decision {
        Decision::Allow(Some(p)) => out.reason = format!("allowed by {p}"),
        Decision::Allow(None) => out.reason = "no ALLOW policy applies and no DENY policy matches".into(),
        Decision::Deny(by) => {
            out.verdict = "DENY";
            out.reason = match by {
                Some(p) => format!("denied by {p}"),
                None => "ALLOW policies apply and none matches".into(),
            };
            out.outcome = format!("answered 403 by the waypoint (RBAC: access denied): {}", out.reason);
            return Ok(out);
        }
    }

    // 3. The route rule.
    let routes = match &destination {
        Destination::Service(svc) => state.routes.get(&svc.key).filter(|r| route::serves_port(r, request.port)),
        Destination::Workload(_) => None,
    };
    let Some(routes) = routes else {
        out.routing = "no HTTPRoute or VirtualService for this port: sent to the destination itself".into();
        let backend = Backend::of(state, &destination, request.port);
        out.backends.push(choice(&describe_destination(&destination), Some(request.port), None, 100.0, &backend));
        out.outcome = sent_to(&out.backends);
        return Ok(out);
    };
    let route_input = RouteInput { method: method.as_str(), path: &path, query, headers: &headers, port: request.port };
    let Some(chosen) = route::select(routes, &route_input, &Regexes::default()) else {
        out.routing = "the destination's routes have no rule matching the request".into();
        out.outcome = "answered 404 by the waypoint (no route matched)".into();
        return Ok(out);
    };
    let index = chosen.route.rules.iter().position(|r| std::ptr::eq(r, chosen.rule)).unwrap_or_default();
    let kind = if chosen.route.ordered { "VirtualService" } else { "HTTPRoute" };
    out.routing = format!("rule {index} of {kind} {}", chosen.route.name);
    out.route =
        Some(RouteChoice { kind, route: chosen.route.name.clone(), rule: index, rule_name: chosen.rule.name.clone() });
    let rule = chosen.rule;
    out.rule_settings = rule_settings(rule);

    // 4. The backends, each with its share, endpoints and DestinationRule.
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    for b in &rule.backends {
        let port = match b.port {
            0 => Some(request.port),
            p => u16::try_from(p).ok(),
        };
        let share = if total == 0 { 0.0 } else { 100.0 * f64::from(b.weight) / total as f64 };
        let subset = (!b.subset.is_empty()).then_some((b.subset.as_str(), b.workloads.as_slice()));
        let backend = Backend::service(state, &b.service, port.unwrap_or(request.port), subset);
        out.backends.push(choice(&b.service, port, subset.map(|(s, _)| s), share, &backend));
    }
    out.outcome = if total == 0 {
        "answered 500 by the waypoint (the rule has no backend with weight)".into()
    } else if let Some(redirect) = rule.filters.iter().find_map(|f| match &f.kind {
        Some(filter::Kind::RequestRedirect(r)) => Some(r),
        _ => None,
    }) {
        format!("redirected by the waypoint ({})", if redirect.status_code == 0 { 302 } else { redirect.status_code })
    } else {
        let abort = rule.fault.as_ref().and_then(|f| f.abort.as_ref()).filter(|a| a.percent > 0.0);
        match abort {
            Some(a) if a.percent >= 100.0 => {
                format!("aborted by the waypoint with {} (fault injection)", a.http_status)
            }
            Some(a) => format!(
                "{}% aborted with {} (fault injection); otherwise {}",
                a.percent,
                a.http_status,
                sent_to(&out.backends)
            ),
            None => sent_to(&out.backends),
        }
    };
    Ok(out)
}

fn describe_destination(destination: &Destination) -> String {
    match destination {
        Destination::Service(s) => s.key.clone(),
        Destination::Workload(w) => format!("{}/{} (the pod addressed)", w.namespace, w.name),
    }
}

fn choice(service: &str, port: Option<u16>, subset: Option<&str>, share: f64, backend: &Backend) -> BackendChoice {
    BackendChoice {
        service: service.to_owned(),
        port,
        subset: subset.map(str::to_owned),
        share,
        endpoints: backend.endpoints.iter().map(|e| format!("{}/{}", e.workload.namespace, e.workload.name)).collect(),
        policy: backend.policy().map(describe_policy),
    }
}

fn sent_to(backends: &[BackendChoice]) -> String {
    let each: Vec<String> = backends
        .iter()
        .map(|b| {
            let subset = b.subset.as_ref().map(|s| format!(" subset {s}")).unwrap_or_default();
            let port = b.port.map(|p| format!(":{p}")).unwrap_or_default();
            if b.endpoints.is_empty() {
                format!("{}{port}{subset} ({:.0}%: 503, no healthy endpoint)", b.service, b.share)
            } else {
                format!("{}{port}{subset} ({:.0}%)", b.service, b.share)
            }
        })
        .collect();
    format!("sent by the waypoint to {}", each.join(", "))
}

/// A DestinationRule policy in words.
fn describe_policy(p: &DestinationPolicy) -> String {
    let mut parts = vec![format!("DestinationRule {}", p.name)];
    let lb = pb::destination_policy::LoadBalancer::try_from(p.load_balancer)
        .map_or_else(|_| p.load_balancer.to_string(), |l| l.as_str_name().to_ascii_lowercase());
    parts.push(format!("load balancer {lb}"));
    if let Some(c) = &p.connection_pool {
        let mut pool = Vec::new();
        let mut limit = |what: &str, n: u32| {
            if n > 0 {
                pool.push(format!("{what} {n}"));
            }
        };
        limit("max connections", c.max_connections);
        limit("max pending requests", c.max_pending_requests);
        limit("max requests per connection", c.max_requests_per_connection);
        limit("max requests", c.max_requests);
        if !pool.is_empty() {
            parts.push(format!("connection pool: {}", pool.join(", ")));
        }
    }
    if let Some(o) = &p.outlier_detection {
        let errors = if o.gateway_errors_only { "gateway errors" } else { "5xx" };
        parts.push(format!(
            "outlier detection: eject after {} {errors} in a row for {} ms (at most {}%)",
            o.consecutive_errors, o.base_ejection_ms, o.max_ejection_percent
        ));
    }
    if let Some(tls) = &p.tls {
        parts.push(if tls.refusal.is_empty() {
            "TLS originated to the endpoints".to_owned()
        } else {
            format!("TLS that cannot be carried out ({}): requests refused", tls.refusal)
        });
    }
    parts.join("; ")
}

/// What a rule adds to a request, in words.
fn rule_settings(rule: &pb::RouteRule) -> Vec<String> {
    let mut out = Vec::new();
    if rule.request_timeout_ms > 0 {
        out.push(format!("timeout {} ms", rule.request_timeout_ms));
    }
    if rule.backend_request_timeout_ms > 0 {
        out.push(format!("per-try timeout {} ms", rule.backend_request_timeout_ms));
    }
    if let Some(r) = rule.retry.as_ref().filter(|r| r.attempts > 0) {
        let on = if r.codes.is_empty() {
            "500, 502, 503, 504".to_owned()
        } else {
            r.codes.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        };
        out.push(format!("retries: {} on {on}", r.attempts));
    }
    if let Some(f) = &rule.fault {
        if let Some(d) = f.delay.as_ref().filter(|d| d.percent > 0.0) {
            out.push(format!("fault: {} ms delay for {}% of requests", d.fixed_delay_ms, d.percent));
        }
        if let Some(a) = f.abort.as_ref().filter(|a| a.percent > 0.0) {
            out.push(format!("fault: abort with {} for {}% of requests", a.http_status, a.percent));
        }
    }
    for f in &rule.filters {
        let what = match &f.kind {
            Some(filter::Kind::RequestHeaderModifier(_)) => "filter: request headers modified",
            Some(filter::Kind::ResponseHeaderModifier(_)) => "filter: response headers modified",
            Some(filter::Kind::RequestRedirect(_)) => "filter: redirect",
            Some(filter::Kind::UrlRewrite(_)) => "filter: URL rewrite",
            Some(filter::Kind::RequestMirror(_)) => "filter: mirrored",
            None => continue,
        };
        out.push(what.to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use http::StatusCode;
    use proto::api::ambient::waypoint::v1::value_match;

    use super::*;
    use crate::fixture::{self, KEY, V1, V2, Waypoint};
    use crate::plan::Next;

    const WEB: [u8; 4] = [10, 96, 0, 1];

    fn ask(state: &MeshState, path: &str, headers: &[(&str, &str)]) -> RequestExplanation {
        let down = fixture::downstream();
        let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let req =
            Request { method: "GET", path, headers: &headers, port: 80, peer: &down.peer, source_ip: down.source_ip };
        request(state, ("shop", "waypoint"), IpAddr::from(WEB), &req).unwrap()
    }

    /// What the proxy answers itself, or `None` when it sends the request on.
    fn proxy_answer(state: &MeshState, path: &str, headers: &[(&str, &str)]) -> Option<StatusCode> {
        match Waypoint::new().plan(state, fixture::head("GET", path, headers), 1).next {
            Next::Answer(a) => Some(a.into_parts().1.status),
            Next::Send(_) => None,
        }
    }

    fn no_admin() -> pb::L7Policy {
        pb::L7Policy {
            name: "no-admin".into(),
            namespace: "shop".into(),
            targets: vec![pb::PolicyTarget {
                kind: pb::policy_target::Kind::Gateway as i32,
                namespace: "shop".into(),
                name: "waypoint".into(),
            }],
            action: Action::Deny as i32,
            rules: vec![
                pb::L7Rule {
                    to: vec![pb::L7Operation { methods: vec!["DELETE".into()], ..Default::default() }],
                    ..Default::default()
                },
                pb::L7Rule {
                    to: vec![pb::L7Operation { paths: vec!["/admin*".into()], ..Default::default() }],
                    ..Default::default()
                },
            ],
            dry_run: false,
        }
    }

    #[test]
    fn a_denied_request_names_the_policy_and_rule_and_the_proxy_denies_it() {
        let mut state = fixture::state();
        state.l7_policies.insert("shop/no-admin".into(), no_admin());
        let denied = ask(&state, "/admin/users?x=1", &[]);
        assert_eq!(denied.request, "GET /admin/users?x=1  (host web.shop.svc.cluster.local, port 80)");
        assert_eq!((denied.verdict, denied.reason.as_str()), ("DENY", "denied by shop/no-admin"));
        assert_eq!(
            denied.policies,
            [L7PolicyVerdict {
                name: "shop/no-admin".into(),
                action: "DENY".into(),
                dry_run: false,
                matched: true,
                rule: Some(1)
            }]
        );
        assert_eq!(denied.outcome, "answered 403 by the waypoint (RBAC: access denied): denied by shop/no-admin");
        assert_eq!(proxy_answer(&state, "/admin/users?x=1", &[]), Some(StatusCode::FORBIDDEN));
        // A path the policy does not name: allowed, the policy listed as not matching, and sent on.
        let allowed = ask(&state, "/shop", &[]);
        assert_eq!(allowed.verdict, "ALLOW");
        assert!(!allowed.policies[0].matched && allowed.policies[0].rule.is_none());
        assert_eq!(allowed.routing, "no HTTPRoute or VirtualService for this port: sent to the destination itself");
        assert_eq!(allowed.backends[0].endpoints, ["shop/web-v1", "shop/web-v2"]);
        assert_eq!(allowed.outcome, "sent by the waypoint to shop/web.shop.svc.cluster.local:80 (100%)");
        assert_eq!(proxy_answer(&state, "/shop", &[]), None);
    }

    /// The tutorial's VirtualService: `version: new` to the subset `new` with a delay and a
    /// timeout, the rest 70/30 to `latest`/`new`; the DestinationRule's circuit breaker.
    #[test]
    fn the_matching_rule_its_split_and_the_destination_rule_are_listed() {
        let latest = Some(("latest", &[V1][..]));
        let new = Some(("new", &[V2][..]));
        let header_new = pb::RouteRule {
            matches: vec![pb::RouteMatch {
                headers: vec![pb::ValueMatch {
                    kind: value_match::Kind::Exact as i32,
                    name: "version".into(),
                    value: "new".into(),
                }],
                ..Default::default()
            }],
            backends: vec![fixture::backend(100, new)],
            request_timeout_ms: 5000,
            fault: Some(pb::Fault { delay: Some(pb::Delay { fixed_delay_ms: 10_000, percent: 10.0 }), abort: None }),
            ..Default::default()
        };
        let split = pb::RouteRule {
            name: "split".into(),
            backends: vec![fixture::backend(70, latest), fixture::backend(30, new)],
            ..Default::default()
        };
        let mut state = fixture::with_rules(fixture::state(), vec![header_new, split]);
        let mut routes = (**state.routes.get(KEY).unwrap()).clone();
        routes.routes[0].ordered = true;
        routes.routes[0].name = "shop/web".into();
        state.routes.insert(KEY.into(), Arc::new(routes));
        state.destination_policies.insert(
            KEY.into(),
            Arc::new(DestinationPolicy {
                name: "shop/web".into(),
                connection_pool: Some(pb::ConnectionPool {
                    max_connections: 1,
                    max_pending_requests: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );

        let new = ask(&state, "/", &[("version", "new")]);
        assert_eq!(new.routing, "rule 0 of VirtualService shop/web");
        assert_eq!(new.rule_settings, ["timeout 5000 ms", "fault: 10000 ms delay for 10% of requests"]);
        assert_eq!(new.backends.len(), 1);
        assert_eq!(
            (new.backends[0].subset.as_deref(), new.backends[0].share, new.backends[0].endpoints.as_slice()),
            (Some("new"), 100.0, &["shop/web-v2".to_owned()][..])
        );
        assert_eq!(
            new.backends[0].policy.as_deref(),
            Some(
                "DestinationRule shop/web; load balancer round_robin; connection pool: max connections 1, max pending requests 1"
            )
        );

        let rest = ask(&state, "/", &[]);
        assert_eq!(rest.route.as_ref().map(|r| (r.rule, r.rule_name.as_str())), Some((1, "split")));
        let shares: Vec<(Option<&str>, f64)> = rest.backends.iter().map(|b| (b.subset.as_deref(), b.share)).collect();
        assert_eq!(shares, [(Some("latest"), 70.0), (Some("new"), 30.0)]);
        assert_eq!(
            rest.outcome,
            "sent by the waypoint to shop/web.shop.svc.cluster.local:80 subset latest (70%), shop/web.shop.svc.cluster.local:80 subset new (30%)"
        );
    }

    #[test]
    fn a_request_no_rule_matches_is_answered_404_as_the_proxy_does() {
        let only_v2 = pb::RouteRule {
            matches: vec![pb::RouteMatch { method: "POST".into(), ..Default::default() }],
            backends: vec![fixture::backend(1, None)],
            ..Default::default()
        };
        let state = fixture::with_rules(fixture::state(), vec![only_v2]);
        let e = ask(&state, "/", &[]);
        assert_eq!(e.outcome, "answered 404 by the waypoint (no route matched)");
        assert_eq!(proxy_answer(&state, "/", &[]), Some(StatusCode::NOT_FOUND));
    }

    #[test]
    fn a_question_that_is_not_http_says_why() {
        let state = fixture::state();
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let ask = |method, path, headers: &[(String, String)], to: [u8; 4]| {
            let req = Request { method, path, headers, port: 80, peer: &peer, source_ip: None };
            request(&state, ("shop", "waypoint"), IpAddr::from(to), &req).unwrap_err().to_string()
        };
        assert_eq!(ask("GET", "/", &[], [10, 9, 9, 9]), "no service or workload at 10.9.9.9");
        assert_eq!(ask("G ET", "/", &[], WEB), "method \"G ET\" is not an HTTP method");
        assert!(ask("GET", "admin", &[], WEB).starts_with("path \"admin\": "));
        let bad = [("x bad".to_owned(), "1".to_owned())];
        assert_eq!(ask("GET", "/", &bad, WEB), "header \"x bad: 1\" is not a valid HTTP header");
    }
}
