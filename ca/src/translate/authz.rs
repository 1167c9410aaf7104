//! AuthorizationPolicy and PeerAuthentication → the L4 policies ztunnel enforces.
//!
//! ztunnel sees only L4 attributes (peer identity, namespace, IPs, ports). A policy that also
//! names L7 attributes (methods, paths, hosts, request principals, headers...) is made *stricter*
//! at L4, never looser, as Istio does:
//! - in an ALLOW policy, a rule that needs L7 attributes can never be proven at L4, so the rule is
//!   dropped (an ALLOW policy left without rules allows nothing);
//! - in a DENY policy, the L7 conditions are dropped, so the rule denies more.
//!
//! Policies that target a waypoint (`targetRef(s)`) are the waypoint's business and skipped here.

use std::net::IpAddr;

use crate::k8s::{AuthorizationPolicy, AuthorizationPolicySpec, AuthzCondition, PeerAuthentication};
use crate::mesh::{Action, IpNet, Match, Policy, Scope, StringMatch};

/// `when` keys ztunnel can evaluate.
const L4_KEYS: &[&str] = &["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// Parses `a.b.c.d`, `a.b.c.d/n` or IPv6 equivalents.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => {
            p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?} has an invalid prefix length"))?
        }
        None => max,
    };
    Ok(IpNet { addr, prefix })
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{s:?} is not a port number"))
}

/// Checks the fields the L4 translation parses, so a bad policy is refused rather than misread.
pub fn validate(spec: &AuthorizationPolicySpec) -> Result<(), String> {
    match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" | "DENY" | "AUDIT" | "CUSTOM" => {}
        other => return Err(format!("action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM")),
    }
    for rule in &spec.rules {
        for from in &rule.from {
            let s = &from.source;
            for ip in
                s.ip_blocks.iter().chain(&s.not_ip_blocks).chain(&s.remote_ip_blocks).chain(&s.not_remote_ip_blocks)
            {
                parse_cidr(ip)?;
            }
        }
        for to in &rule.to {
            for p in to.operation.ports.iter().chain(&to.operation.not_ports) {
                parse_port(p)?;
            }
        }
        for cond in &rule.when {
            if cond.key.is_empty() {
                return Err("a when condition has an empty key".into());
            }
            if cond.values.is_empty() && cond.not_values.is_empty() {
                return Err(format!("when condition {:?} has neither values nor notValues", cond.key));
            }
            let vals = cond.values.iter().chain(&cond.not_values);
            match cond.key.as_str() {
                "source.ip" | "destination.ip" => vals.into_iter().try_for_each(|v| parse_cidr(v).map(drop))?,
                "destination.port" => vals.into_iter().try_for_each(|v| parse_port(v).map(drop))?,
                _ => {}
            }
        }
    }
    Ok(())
}

fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::from_pattern(s)).collect()
}

fn cidrs(v: &[String]) -> Vec<IpNet> {
    // Validated on admission; anything unparsable cannot be here.
    v.iter().filter_map(|s| parse_cidr(s).ok()).collect()
}

fn ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|s| parse_port(s).ok()).collect()
}

/// A positive and a negative match for one L4 `when` condition.
fn when_matches(c: &AuthzCondition) -> (Match, Match) {
    let mut pos = Match::default();
    let mut neg = Match::default();
    match c.key.as_str() {
        "source.ip" => {
            pos.source_ips = cidrs(&c.values);
            neg.not_source_ips = cidrs(&c.not_values);
        }
        "source.namespace" => {
            pos.namespaces = strings(&c.values);
            neg.not_namespaces = strings(&c.not_values);
        }
        "source.principal" => {
            pos.principals = strings(&c.values);
            neg.not_principals = strings(&c.not_values);
        }
        "destination.ip" => {
            pos.destination_ips = cidrs(&c.values);
            neg.not_destination_ips = cidrs(&c.not_values);
        }
        "destination.port" => {
            pos.destination_ports = ports(&c.values);
            neg.not_destination_ports = ports(&c.not_values);
        }
        _ => {}
    }
    (pos, neg)
}

/// The labels a policy selects workloads by, if it selects any.
pub fn selector(
    selector: &Option<crate::k8s::WorkloadSelector>,
) -> Option<&std::collections::BTreeMap<String, String>> {
    selector.as_ref().map(|s| &s.match_labels).filter(|l| !l.is_empty())
}

/// Where a policy applies: selected workloads, the whole mesh (root namespace) or its namespace.
fn scope(namespace: &str, selector: Option<&std::collections::BTreeMap<String, String>>, root: &str) -> Scope {
    match selector {
        Some(_) => Scope::WorkloadSelector,
        None if namespace == root => Scope::Global,
        None => Scope::Namespace,
    }
}

/// Translates one rule; `None` when, in an ALLOW policy, it needs L7 attributes.
fn rule(action: Action, rule: &crate::k8s::AuthzRule) -> Option<Vec<Vec<Match>>> {
    let allow = action == Action::Allow;
    let mut clauses = Vec::new();

    let mut from = Vec::new();
    for f in &rule.from {
        let s = &f.source;
        let l7 = !(s.request_principals.is_empty()
            && s.not_request_principals.is_empty()
            && s.remote_ip_blocks.is_empty()
            && s.not_remote_ip_blocks.is_empty());
        if l7 && allow {
            return None;
        }
        let m = Match {
            namespaces: strings(&s.namespaces),
            not_namespaces: strings(&s.not_namespaces),
            principals: strings(&s.principals),
            not_principals: strings(&s.not_principals),
            source_ips: cidrs(&s.ip_blocks),
            not_source_ips: cidrs(&s.not_ip_blocks),
            ..Match::default()
        };
        // A DENY source left with only L7 fields must still deny (stricter), so it matches all.
        from.push(m);
    }
    // A clause with an empty (match-everything) alternative always holds: leave it out.
    if !from.is_empty() && !from.iter().any(Match::is_empty) {
        clauses.push(from);
    }

    let mut to = Vec::new();
    for t in &rule.to {
        let o = &t.operation;
        let l7 =
            [&o.hosts, &o.not_hosts, &o.methods, &o.not_methods, &o.paths, &o.not_paths].iter().any(|v| !v.is_empty());
        if l7 && allow {
            return None;
        }
        to.push(Match {
            destination_ports: ports(&o.ports),
            not_destination_ports: ports(&o.not_ports),
            ..Match::default()
        });
    }
    if !to.is_empty() && !to.iter().any(Match::is_empty) {
        clauses.push(to);
    }

    for c in &rule.when {
        if !L4_KEYS.contains(&c.key.as_str()) {
            if allow {
                return None;
            }
            continue;
        }
        let (pos, neg) = when_matches(c);
        if !c.values.is_empty() {
            clauses.push(vec![pos]);
        }
        if !c.not_values.is_empty() {
            clauses.push(vec![neg]);
        }
    }
    Some(clauses)
}

/// The outcome of translating one AuthorizationPolicy for ztunnel.
#[derive(Debug, PartialEq)]
pub enum Translated {
    /// The L4 policy.
    Policy(Policy),
    /// The policy is for a waypoint (`targetRef(s)`).
    ForWaypoint,
    /// Not enforced by ztunnel, with the reason (AUDIT, CUSTOM).
    Skipped(String),
}

/// Translates an AuthorizationPolicy.
pub fn translate(policy: &AuthorizationPolicy, root_namespace: &str) -> Translated {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return Translated::ForWaypoint;
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        other => return Translated::Skipped(format!("action {other} is not enforced by ztunnel")),
    };
    let (namespace, name) = crate::k8s::ns_name(&policy.metadata);
    let scope = scope(namespace, selector(&spec.selector), root_namespace);
    let rules = spec.rules.iter().filter_map(|r| rule(action, r)).collect();
    Translated::Policy(Policy { name: name.to_owned(), namespace: namespace.to_owned(), scope, action, rules })
}

/// Name prefix of policies converted from PeerAuthentication, as Istio names them.
pub const CONVERTED_PEER_AUTHN_PREFIX: &str = "converted_peer_authentication_";

/// A STRICT PeerAuthentication becomes a DENY of connections without a peer identity (plaintext),
/// except on ports it sets to PERMISSIVE or DISABLE. Other modes need no policy.
pub fn translate_peer_authentication(pa: &PeerAuthentication, root_namespace: &str) -> Option<Policy> {
    let spec = &pa.spec;
    let mode = |m: &Option<crate::k8s::PeerMtls>| m.as_ref().and_then(|m| m.mode.clone()).unwrap_or_default();
    if mode(&spec.mtls) != "STRICT" {
        return None;
    }
    let exempt: Vec<u16> = spec
        .port_level_mtls
        .iter()
        .filter(|(_, m)| matches!(m.mode.as_deref(), Some("PERMISSIVE" | "DISABLE")))
        .filter_map(|(p, _)| parse_port(p).ok())
        .collect();
    let (namespace, name) = crate::k8s::ns_name(&pa.metadata);
    let scope = scope(namespace, selector(&spec.selector), root_namespace);
    let plaintext = Match { not_principals: vec![StringMatch::Presence], ..Match::default() };
    let mut clauses = vec![vec![plaintext]];
    if !exempt.is_empty() {
        clauses.push(vec![Match { not_destination_ports: exempt, ..Match::default() }]);
    }
    Some(Policy {
        name: format!("{CONVERTED_PEER_AUTHN_PREFIX}{name}"),
        namespace: namespace.to_owned(),
        scope,
        action: Action::Deny,
        rules: vec![clauses],
    })
}
