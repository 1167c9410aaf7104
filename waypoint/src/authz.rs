//! L7 authorization with Istio's semantics, for the policies that target this waypoint (its
//! Gateway) or the destination Service.
//!
//! Any matching DENY policy denies; otherwise, if ALLOW policies apply, one of them must match;
//! with none, the request is allowed. A policy matches when any of its rules does; a rule when
//! each part it sets matches (`from`, `to`, `when`: any element of each). String fields use
//! Istio's forms: exact, `prefix*`, `*suffix`, `*`. Methods and paths are compared in their
//! canonical form (see [`crate::normalize`]); hosts case-insensitively, without a port. The
//! source principal and namespace come only from the peer's TLS certificate.
//!
//! A `when` key this waypoint does not evaluate makes the rule match for DENY and not match for
//! ALLOW (fail closed either way).
//!
//! A TCP stream has no HTTP attributes. As in Istio, an ALLOW rule that uses an HTTP-only field
//! (hosts, methods, paths, request principals, `request.*` conditions) never matches it, and a
//! DENY rule is applied with its HTTP-only fields ignored: it denies more, never less.

use std::net::IpAddr;

use http::HeaderMap;
use proto::SpiffeId;

use crate::jwt::RequestPrincipal;
use proto::api::ambient::waypoint::v1::{self as pb, l7_policy::Action};

/// What a decision looks at.
#[derive(Debug)]
pub struct AuthzInput<'a> {
    /// The peer's identity (TLS).
    pub peer: &'a SpiffeId,
    /// The original client IP (`forwarded`), if known.
    pub source_ip: Option<IpAddr>,
    /// Destination service port.
    pub port: u16,
    /// The HTTP request; `None` for a TCP stream.
    pub http: Option<HttpAttributes<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Debug)]
pub struct HttpAttributes<'a> {
    /// Canonical method.
    pub method: &'a str,
    /// Canonical path (no query).
    pub path: &'a str,
    /// Host header (or authority).
    pub host: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The verified JWT caller (`None`: anonymous).
    pub auth: Option<&'a RequestPrincipal>,
}

/// The outcome, with the deciding policy for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed (by this ALLOW policy, or `None` when no ALLOW policy applies).
    Allow(Option<String>),
    /// Denied by this DENY policy, or by no ALLOW policy matching (`None`).
    Deny(Option<String>),
}

/// Istio string match: exact, `prefix*`, `*suffix`, or `*`.
fn string_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

fn host_match(pattern: &str, host: &str) -> bool {
    string_match(&pattern.to_ascii_lowercase(), &host.to_ascii_lowercase())
}

/// `values` set → one must match; `not_values` → none may.
fn field(values: &[String], not_values: &[String], matches: impl Fn(&str) -> bool) -> bool {
    (values.is_empty() || values.iter().any(|v| matches(v))) && !not_values.iter().any(|v| matches(v))
}

fn ip_in_block(block: &str, ip: IpAddr) -> bool {
    let (net, bits) = match block.split_once('/') {
        Some((n, b)) => (n, b.parse::<u32>().ok()),
        None => (block, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn source_matches(s: &pb::L7Source, input: &AuthzInput<'_>) -> bool {
    // Istio principals are the SPIFFE ID without the scheme.
    let principal = input.peer.as_str().trim_start_matches("spiffe://");
    let ip_field = |values: &[String], not: &[String]| match input.source_ip {
        Some(ip) => field(values, not, |b| ip_in_block(b, ip)),
        None => values.is_empty(),
    };
    let account = Some((input.peer.namespace(), input.peer.service_account()));
    field(&s.principals, &s.not_principals, |p| string_match(p, principal))
        && field(&s.service_accounts, &s.not_service_accounts, |a| a.split_once('/') == account)
        && field(&s.namespaces, &s.not_namespaces, |n| string_match(n, input.peer.namespace()))
        && ip_field(&s.ip_blocks, &s.not_ip_blocks)
        && ip_field(&s.remote_ip_blocks, &s.not_remote_ip_blocks)
        // On a TCP stream the field is ignored (see above). An anonymous request matches no
        // `requestPrincipals` and every `notRequestPrincipals`.
        && match input.http.as_ref() {
            None => true,
            Some(http) => match http.auth {
                Some(a) => field(&s.request_principals, &s.not_request_principals, |p| string_match(p, &a.principal)),
                None => s.request_principals.is_empty(),
            },
        }
}

fn operation_matches(o: &pb::L7Operation, input: &AuthzInput<'_>) -> bool {
    let port = input.port.to_string();
    if !field(&o.ports, &o.not_ports, |p| p == port) {
        return false;
    }
    let Some(http) = &input.http else { return true };
    let host =
        http.host.rsplit_once(':').map_or(http.host, |(h, p)| if p.parse::<u16>().is_ok() { h } else { http.host });
    field(&o.hosts, &o.not_hosts, |h| host_match(h, host))
        && field(&o.methods, &o.not_methods, |m| string_match(m, http.method))
        && field(&o.paths, &o.not_paths, |p| string_match(p, http.path))
}

/// Whether `rule` looks at anything only an HTTP request has.
fn uses_http_fields(rule: &pb::L7Rule) -> bool {
    rule.from.iter().any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
        || rule.to.iter().any(|o| {
            !(o.hosts.is_empty()
                && o.not_hosts.is_empty()
                && o.methods.is_empty()
                && o.not_methods.is_empty()
                && o.paths.is_empty()
                && o.not_paths.is_empty())
        })
        || rule.when.iter().any(|c| c.key.starts_with("request."))
}

/// A condition's verdict: `Some(bool)` when evaluated, `None` for an unknown key. A header sent
/// more than once is judged so that the policy denies more, never less: in a DENY rule one
/// matching value is enough, in an ALLOW rule every value must match.
fn condition_matches(c: &pb::L7Condition, input: &AuthzInput<'_>, deny: bool) -> Option<bool> {
    let principal = input.peer.as_str().trim_start_matches("spiffe://");
    if let Some(name) = c.key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
        // Only DENY rules reach here without a request (with the condition ignored).
        let Some(http) = &input.http else { return Some(true) };
        let values: Vec<&str> = http.headers.get_all(name).iter().map(|v| v.to_str().unwrap_or("\u{fffd}")).collect();
        if values.is_empty() {
            return Some(c.values.is_empty());
        }
        let holds = |v: &&str| field(&c.values, &c.not_values, |p| string_match(p, v));
        return Some(if deny { values.iter().any(holds) } else { values.iter().all(holds) });
    }
    if let Some(rest) = c.key.strip_prefix("request.auth.") {
        let Some(http) = &input.http else { return Some(true) };
        let values: Option<Vec<String>> = match rest {
            "principal" => http.auth.map(|a| vec![a.principal.clone()]),
            "audiences" => http.auth.map(|a| a.audiences.clone()),
            "presenter" => http.auth.and_then(|a| a.presenter.clone()).map(|p| vec![p]),
            _ => {
                let path = rest.strip_prefix("claims").and_then(claim_path)?;
                http.auth.and_then(|a| a.claim(&path))
            }
        };
        // A list (audiences, a list claim) matches when any element does; `notValues` when none.
        let values = values.unwrap_or_default();
        return Some(
            (c.values.is_empty() || values.iter().any(|v| c.values.iter().any(|p| string_match(p, v))))
                && !values.iter().any(|v| c.not_values.iter().any(|p| string_match(p, v))),
        );
    }
    let value: Option<String> = match c.key.as_str() {
        "source.principal" => Some(principal.to_owned()),
        "source.namespace" => Some(input.peer.namespace().to_owned()),
        "source.ip" | "remote.ip" => {
            let ip = input.source_ip?;
            return Some(field(&c.values, &c.not_values, |b| ip_in_block(b, ip)));
        }
        "destination.port" => Some(input.port.to_string()),
        _ => return None,
    };
    let Some(value) = value else { return Some(c.values.is_empty()) };
    Some(field(&c.values, &c.not_values, |v| string_match(v, &value)))
}

/// The claim names of `[<a>][<b>]…` (at least one, none empty).
fn claim_path(brackets: &str) -> Option<Vec<&str>> {
    let inner = brackets.strip_prefix('[')?.strip_suffix(']')?;
    let names: Vec<&str> = inner.split("][").collect();
    names.iter().all(|n| !n.is_empty() && !n.contains(['[', ']'])).then_some(names)
}

fn rule_matches(rule: &pb::L7Rule, input: &AuthzInput<'_>, action: Action) -> bool {
    if input.http.is_none() && action == Action::Allow && uses_http_fields(rule) {
        return false;
    }
    let ignored = |c: &pb::L7Condition| input.http.is_none() && c.key.starts_with("request.");
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, input)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, input)))
        && rule.when.iter().all(|c| {
            ignored(c) || condition_matches(c, input, action == Action::Deny).unwrap_or(action == Action::Deny)
        })
}

fn policy_matches(p: &pb::L7Policy, input: &AuthzInput<'_>) -> bool {
    matching_rule(p, input).is_some()
}

/// The first of `p`'s rules (0-based) that matches `input`: what makes the policy match in
/// [`decide`].
pub fn matching_rule(p: &pb::L7Policy, input: &AuthzInput<'_>) -> Option<usize> {
    let action = Action::try_from(p.action).unwrap_or(Action::Allow);
    p.rules.iter().position(|r| rule_matches(r, input, action))
}

/// Decides a request against the policies that apply to it; dry-run policies take no part.
pub fn decide<'a>(policies: impl IntoIterator<Item = &'a pb::L7Policy>, input: &AuthzInput<'_>) -> Decision {
    decide_with(policies.into_iter().filter(|p| !p.dry_run), input)
}

/// What the decision would be with the dry-run policies among `policies` enforced too; `None`
/// when there is none. For the log and metrics only.
pub fn dry_run<'a>(
    policies: impl IntoIterator<Item = &'a pb::L7Policy> + Clone,
    input: &AuthzInput<'_>,
) -> Option<Decision> {
    policies.clone().into_iter().any(|p| p.dry_run).then(|| decide_with(policies, input))
}

fn decide_with<'a>(policies: impl IntoIterator<Item = &'a pb::L7Policy>, input: &AuthzInput<'_>) -> Decision {
    let mut allow_policies = 0;
    let mut allowed_by = None;
    for p in policies {
        let key = format!("{}/{}", p.namespace, p.name);
        match Action::try_from(p.action) {
            Ok(Action::Deny) => {
                if policy_matches(p, input) {
                    return Decision::Deny(Some(key));
                }
            }
            Ok(Action::Allow) => {
                allow_policies += 1;
                if allowed_by.is_none() && policy_matches(p, input) {
                    allowed_by = Some(key);
                }
            }
            // An action this waypoint does not know: refuse rather than guess.
            Err(_) => return Decision::Deny(Some(key)),
        }
    }
    match (allow_policies, allowed_by) {
        (0, _) => Decision::Allow(None),
        (_, Some(p)) => Decision::Allow(Some(p)),
        (_, None) => Decision::Deny(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A policy as `decide` sees it (already selected for the request: no targets needed).
    fn policy(action: Action, op: pb::L7Operation, from: Vec<pb::L7Source>) -> pb::L7Policy {
        pb::L7Policy {
            name: "p".into(),
            namespace: "demo".into(),
            action: action as i32,
            rules: vec![pb::L7Rule { from, to: vec![op], when: vec![] }],
            ..Default::default()
        }
    }

    fn decide_for(policies: &[pb::L7Policy], peer: &str, method: &str, path: &str) -> Decision {
        let peer: SpiffeId = peer.parse().unwrap();
        let headers = HeaderMap::new();
        let http =
            HttpAttributes { method, path, host: "hello.demo.svc.cluster.local:80", headers: &headers, auth: None };
        decide(policies, &AuthzInput { peer: &peer, source_ip: None, port: 80, http: Some(http) })
    }

    fn decide_tcp(policies: &[pb::L7Policy], peer: &str, port: u16) -> Decision {
        let peer: SpiffeId = peer.parse().unwrap();
        decide(policies, &AuthzInput { peer: &peer, source_ip: None, port, http: None })
    }

    #[test]
    fn a_header_sent_twice_cannot_dodge_a_deny_nor_widen_an_allow() {
        let when = |values: &[&str]| pb::L7Rule {
            when: vec![pb::L7Condition {
                key: "request.headers[x-user]".into(),
                values: values.iter().map(|v| v.to_string()).collect(),
                not_values: vec![],
            }],
            ..Default::default()
        };
        let with = |action: Action| pb::L7Policy {
            action: action as i32,
            rules: vec![when(&["admin"])],
            ..Default::default()
        };
        let peer: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.append("x-user", "guest".parse().unwrap());
        headers.append("x-user", "admin".parse().unwrap());
        let http = HttpAttributes { method: "GET", path: "/", host: "h", headers: &headers, auth: None };
        let input = AuthzInput { peer: &peer, source_ip: None, port: 80, http: Some(http) };
        assert!(
            matches!(decide([&with(Action::Deny)], &input), Decision::Deny(Some(_))),
            "DENY missed the second value"
        );
        assert_eq!(decide([&with(Action::Allow)], &input), Decision::Deny(None), "ALLOW took one value of two");
    }

    #[test]
    fn service_accounts_and_dry_run() {
        let by_account = |accounts: &[&str], not: &[&str]| {
            vec![pb::L7Source {
                service_accounts: accounts.iter().map(|s| s.to_string()).collect(),
                not_service_accounts: not.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }]
        };
        let allow = [policy(Action::Allow, pb::L7Operation::default(), by_account(&["demo/client"], &[]))];
        let client = "spiffe://cluster.local/ns/demo/sa/client";
        assert!(matches!(decide_for(&allow, client, "GET", "/"), Decision::Allow(Some(_))));
        assert_eq!(decide_for(&allow, "spiffe://cluster.local/ns/other/sa/client", "GET", "/"), Decision::Deny(None));
        assert_eq!(decide_for(&allow, "spiffe://cluster.local/ns/demo/sa/client2", "GET", "/"), Decision::Deny(None));
        let deny = [policy(Action::Deny, pb::L7Operation::default(), by_account(&[], &["demo/client"]))];
        assert_eq!(decide_for(&deny, client, "GET", "/"), Decision::Allow(None));
        assert!(matches!(
            decide_for(&deny, "spiffe://cluster.local/ns/demo/sa/x", "GET", "/"),
            Decision::Deny(Some(_))
        ));

        // Dry-run: left out of the decision, reported by `dry_run`.
        let mut dry = policy(Action::Deny, pb::L7Operation::default(), vec![]);
        dry.dry_run = true;
        let peer: SpiffeId = client.parse().unwrap();
        let headers = HeaderMap::new();
        let http = HttpAttributes { method: "GET", path: "/", host: "h", headers: &headers, auth: None };
        let input = AuthzInput { peer: &peer, source_ip: None, port: 80, http: Some(http) };
        assert_eq!(decide([&dry], &input), Decision::Allow(None));
        assert_eq!(dry_run([&dry], &input), Some(Decision::Deny(Some("demo/p".into()))));
        assert_eq!(dry_run(std::iter::empty(), &input), None);
        // An action from the future denies.
        let mut future = policy(Action::Allow, pb::L7Operation::default(), vec![]);
        future.action = 9;
        assert!(matches!(decide([&future], &input), Decision::Deny(Some(_))));
    }

    #[test]
    fn request_principals_and_jwt_conditions() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let headers = HeaderMap::new();
        let mut claims = serde_json::Map::new();
        claims.insert("groups".into(), serde_json::json!(["dev", "admin"]));
        claims.insert("org".into(), serde_json::json!({"team": "core"}));
        let alice = RequestPrincipal {
            principal: "https://idp/alice".into(),
            audiences: vec!["shop".into()],
            presenter: Some("web".into()),
            claims,
        };
        let decide_as = |policies: &[pb::L7Policy], auth: Option<&RequestPrincipal>| {
            let http = HttpAttributes { method: "GET", path: "/", host: "h", headers: &headers, auth };
            decide(policies.iter(), &AuthzInput { peer: &peer, source_ip: None, port: 80, http: Some(http) })
        };
        let source = |rp: &[&str], not: &[&str]| {
            vec![pb::L7Source {
                request_principals: rp.iter().map(|s| s.to_string()).collect(),
                not_request_principals: not.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }]
        };
        // ALLOW requestPrincipals ["*"]: any valid token; anonymous is denied.
        let any = [policy(Action::Allow, pb::L7Operation::default(), source(&["*"], &[]))];
        assert!(matches!(decide_as(&any, Some(&alice)), Decision::Allow(Some(_))));
        assert_eq!(decide_as(&any, None), Decision::Deny(None));
        let exact = [policy(Action::Allow, pb::L7Operation::default(), source(&["https://idp/bob"], &[]))];
        assert_eq!(decide_as(&exact, Some(&alice)), Decision::Deny(None));
        // DENY notRequestPrincipals ["*"]: denies anonymous requests only.
        let deny_anon = [policy(Action::Deny, pb::L7Operation::default(), source(&[], &["*"]))];
        assert!(matches!(decide_as(&deny_anon, None), Decision::Deny(Some(_))));
        assert_eq!(decide_as(&deny_anon, Some(&alice)), Decision::Allow(None));

        let when = |action: Action, key: &str, values: &[&str], not: &[&str]| pb::L7Policy {
            name: "p".into(),
            namespace: "demo".into(),
            action: action as i32,
            rules: vec![pb::L7Rule {
                when: vec![pb::L7Condition {
                    key: key.into(),
                    values: values.iter().map(|s| s.to_string()).collect(),
                    not_values: not.iter().map(|s| s.to_string()).collect(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let allowed = |p: pb::L7Policy, auth| matches!(decide_as(&[p], auth), Decision::Allow(_));
        assert!(allowed(when(Action::Allow, "request.auth.claims[groups]", &["admin"], &[]), Some(&alice)));
        assert!(!allowed(when(Action::Allow, "request.auth.claims[groups]", &["ops"], &[]), Some(&alice)));
        assert!(!allowed(when(Action::Allow, "request.auth.claims[groups]", &["admin"], &[]), None));
        assert!(allowed(when(Action::Allow, "request.auth.claims[org][team]", &["core"], &[]), Some(&alice)));
        assert!(allowed(when(Action::Allow, "request.auth.audiences", &["shop"], &[]), Some(&alice)));
        assert!(allowed(when(Action::Allow, "request.auth.presenter", &["web"], &[]), Some(&alice)));
        assert!(allowed(when(Action::Allow, "request.auth.principal", &["https://idp/*"], &[]), Some(&alice)));
        // DENY unless in group admin: denies anonymous (no claim) and non-admins.
        assert!(!allowed(when(Action::Deny, "request.auth.claims[groups]", &[], &["admin"]), None));
        assert!(allowed(when(Action::Deny, "request.auth.claims[groups]", &[], &["admin"]), Some(&alice)));
        // A malformed claim key cannot be evaluated: fails closed both ways.
        assert!(!allowed(when(Action::Allow, "request.auth.claims[groups", &["admin"], &[]), Some(&alice)));
        assert!(!allowed(when(Action::Deny, "request.auth.claims[]", &["admin"], &[]), Some(&alice)));
    }

    #[test]
    fn tcp_streams_see_only_l4_fields() {
        let by_namespace = vec![pb::L7Source { namespaces: vec!["other".into()], ..Default::default() }];
        let get_admin =
            pb::L7Operation { methods: vec!["GET".into()], paths: vec!["/admin".into()], ..Default::default() };
        let port_5432 = pb::L7Operation { ports: vec!["5432".into()], ..Default::default() };
        // L4 DENY: by namespace, by port.
        let p = [policy(Action::Deny, pb::L7Operation::default(), by_namespace.clone())];
        assert!(matches!(decide_tcp(&p, OTHER, 80), Decision::Deny(Some(_))));
        assert_eq!(decide_tcp(&p, CLIENT, 80), Decision::Allow(None));
        let p = [policy(Action::Deny, port_5432.clone(), vec![])];
        assert!(matches!(decide_tcp(&p, CLIENT, 5432), Decision::Deny(Some(_))));
        assert_eq!(decide_tcp(&p, CLIENT, 80), Decision::Allow(None));
        // A DENY with HTTP-only fields denies the whole stream (they are ignored), never less.
        let p = [policy(Action::Deny, get_admin.clone(), by_namespace.clone())];
        assert!(matches!(decide_tcp(&p, OTHER, 80), Decision::Deny(Some(_))));
        assert_eq!(decide_tcp(&p, CLIENT, 80), Decision::Allow(None));
        // An ALLOW rule with HTTP-only fields never matches a stream; an L4 one does.
        let p = [policy(Action::Allow, get_admin, vec![])];
        assert_eq!(decide_tcp(&p, CLIENT, 80), Decision::Deny(None));
        assert!(matches!(decide_for(&p, CLIENT, "GET", "/admin"), Decision::Allow(Some(_))));
        let p = [policy(Action::Allow, port_5432, vec![])];
        assert!(matches!(decide_tcp(&p, CLIENT, 5432), Decision::Allow(Some(_))));
        assert_eq!(decide_tcp(&p, CLIENT, 80), Decision::Deny(None));
        // A `request.headers` condition: ignored by DENY, disqualifies ALLOW.
        let mut deny = policy(Action::Deny, pb::L7Operation::default(), vec![]);
        deny.rules[0].when = vec![pb::L7Condition {
            key: "request.headers[x-user]".into(),
            values: vec!["eve".into()],
            ..Default::default()
        }];
        assert!(matches!(decide_tcp(std::slice::from_ref(&deny), CLIENT, 80), Decision::Deny(Some(_))));
        let mut allow = deny;
        allow.action = Action::Allow as i32;
        assert_eq!(decide_tcp(&[allow], CLIENT, 80), Decision::Deny(None));
    }

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
    const OTHER: &str = "spiffe://cluster.local/ns/other/sa/client";

    #[test]
    fn deny_by_method_and_path_prefix() {
        let deny = policy(
            Action::Deny,
            pb::L7Operation { methods: vec!["DELETE".into()], paths: vec!["/admin*".into()], ..Default::default() },
            vec![],
        );
        let p = [deny];
        assert!(matches!(decide_for(&p, CLIENT, "DELETE", "/admin/users"), Decision::Deny(Some(_))));
        assert_eq!(decide_for(&p, CLIENT, "GET", "/admin/users"), Decision::Allow(None));
        assert_eq!(decide_for(&p, CLIENT, "DELETE", "/public"), Decision::Allow(None));
    }

    #[test]
    fn allow_needs_a_match_and_sources_come_from_the_certificate() {
        let allow = policy(
            Action::Allow,
            pb::L7Operation { methods: vec!["GET".into()], ..Default::default() },
            vec![pb::L7Source { namespaces: vec!["demo".into()], ..Default::default() }],
        );
        let p = [allow];
        assert!(matches!(decide_for(&p, CLIENT, "GET", "/"), Decision::Allow(Some(_))));
        assert_eq!(decide_for(&p, OTHER, "GET", "/"), Decision::Deny(None));
        assert_eq!(decide_for(&p, CLIENT, "POST", "/"), Decision::Deny(None));
    }

    #[test]
    fn principals_and_hosts() {
        let deny = policy(
            Action::Deny,
            pb::L7Operation { hosts: vec!["*.DEMO.svc.cluster.local".into()], ..Default::default() },
            vec![pb::L7Source { principals: vec!["cluster.local/ns/other/*".into()], ..Default::default() }],
        );
        let p = [deny];
        assert!(matches!(decide_for(&p, OTHER, "GET", "/"), Decision::Deny(Some(_))));
        assert_eq!(decide_for(&p, CLIENT, "GET", "/"), Decision::Allow(None));
    }

    #[test]
    fn ip_blocks() {
        assert!(ip_in_block("10.1.0.0/16", "10.1.2.3".parse().unwrap()));
        assert!(!ip_in_block("10.1.0.0/16", "10.2.2.3".parse().unwrap()));
        assert!(ip_in_block("10.1.2.3", "10.1.2.3".parse().unwrap()));
        assert!(!ip_in_block("garbage", "10.1.2.3".parse().unwrap()));
    }
}
