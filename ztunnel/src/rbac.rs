//! L4 authorization with Istio's semantics.
//!
//! The policies that apply to a destination workload are the mesh-wide ones (`GLOBAL`, from the root
//! namespace), its namespace's (`NAMESPACE`) and those selecting it (`WORKLOAD_SELECTOR`, named in
//! the workload's `authorization_policies`). Then:
//! 1. any matching `DENY` policy denies;
//! 2. if any `ALLOW` policy applies, one of them must match;
//! 3. otherwise the connection is allowed.
//!
//! A policy matches when any of its rules matches; a rule when all its clauses match (a rule with
//! no clause matches everything); a clause when any of its matches matches; a match when every field
//! it sets holds, a field holding when any of its values does (the `not_` fields when none does).
//! A connection without a peer identity (plaintext) has the empty principal and namespace, as in
//! Envoy's RBAC: `principals` and `namespaces` never match it, `not_` variants do.

use std::net::IpAddr;

use proto::SpiffeId;
use proto::api::istio::security::{Action, Address, Authorization, Match, Scope, StringMatch, string_match};
use proto::api::istio::workload::Workload;

use crate::xds::MeshState;

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's identity from its TLS handshake (`None`: plaintext).
    pub source: Option<&'a SpiffeId>,
    /// The source IP.
    pub source_ip: IpAddr,
    /// The destination IP.
    pub destination_ip: IpAddr,
    /// The destination port.
    pub destination_port: u16,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the ALLOW policy that matched, if policies applied.
    Allow(Option<String>),
    /// Denied by this DENY policy.
    DeniedBy(String),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Decision {
    /// Whether the connection may proceed.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// Authorizes a connection to `destination`.
pub fn authorize(state: &MeshState, destination: &Workload, conn: &Connection<'_>) -> Decision {
    let applicable = state.policies.iter().filter(|(name, p)| applies(p, name, destination));
    let mut allow_policies = false;
    let mut allowed_by = None;
    for (name, policy) in applicable {
        let matched = policy_matches(policy, conn);
        match Action::try_from(policy.action).unwrap_or(Action::Allow) {
            Action::Deny if matched => return Decision::DeniedBy(name.clone()),
            Action::Deny => {}
            Action::Allow => {
                allow_policies = true;
                if matched && allowed_by.is_none() {
                    allowed_by = Some(name.clone());
                }
            }
        }
    }
    match (allow_policies, allowed_by) {
        (false, _) => Decision::Allow(None),
        (true, Some(name)) => Decision::Allow(Some(name)),
        (true, None) => Decision::NotAllowed,
    }
}

fn applies(policy: &Authorization, name: &str, destination: &Workload) -> bool {
    match Scope::try_from(policy.scope).unwrap_or(Scope::WorkloadSelector) {
        Scope::Global => true,
        Scope::Namespace => policy.namespace == destination.namespace,
        Scope::WorkloadSelector => destination.authorization_policies.iter().any(|p| p == name),
    }
}

fn policy_matches(policy: &Authorization, conn: &Connection<'_>) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| rule.clauses.iter().all(|clause| clause.matches.iter().any(|m| match_holds(m, conn))))
}

fn match_holds(m: &Match, conn: &Connection<'_>) -> bool {
    // Principals are compared without the scheme, as Istio writes them (`<td>/ns/<ns>/sa/<sa>`).
    let principal = conn.source.map_or("", |id| id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str()));
    let namespace = conn.source.map_or("", |id| id.namespace());
    let any = |values: &[StringMatch], s: &str| values.iter().any(|v| string_matches(v, s));
    let any_ip = |values: &[Address], ip: IpAddr| values.iter().any(|a| prefix_contains(a, ip));
    let ports = |values: &[u32]| values.contains(&u32::from(conn.destination_port));
    (m.namespaces.is_empty() || any(&m.namespaces, namespace))
        && !any(&m.not_namespaces, namespace)
        && (m.principals.is_empty() || any(&m.principals, principal))
        && !any(&m.not_principals, principal)
        && (m.source_ips.is_empty() || any_ip(&m.source_ips, conn.source_ip))
        && !any_ip(&m.not_source_ips, conn.source_ip)
        && (m.destination_ips.is_empty() || any_ip(&m.destination_ips, conn.destination_ip))
        && !any_ip(&m.not_destination_ips, conn.destination_ip)
        && (m.destination_ports.is_empty() || ports(&m.destination_ports))
        && !ports(&m.not_destination_ports)
}

fn string_matches(m: &StringMatch, s: &str) -> bool {
    match &m.match_type {
        Some(string_match::MatchType::Exact(e)) => s == e,
        Some(string_match::MatchType::Prefix(p)) => s.starts_with(p.as_str()),
        Some(string_match::MatchType::Suffix(x)) => s.ends_with(x.as_str()),
        Some(string_match::MatchType::Presence(_)) => !s.is_empty(),
        None => false,
    }
}

fn prefix_contains(prefix: &Address, ip: IpAddr) -> bool {
    let (net, bits): (Vec<u8>, u32) = (prefix.address.clone(), prefix.length);
    let addr: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    if net.len() != addr.len() || bits as usize > addr.len() * 8 {
        return false;
    }
    let full = (bits / 8) as usize;
    if net[..full] != addr[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        net[full] & mask == addr[full] & mask
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proto::api::istio::security::{Clause, Rule};

    use super::*;

    fn exact(s: &str) -> StringMatch {
        StringMatch { match_type: Some(string_match::MatchType::Exact(s.into())) }
    }

    fn policy(ns: &str, scope: Scope, action: Action, matches: Vec<Match>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: ns.into(),
            scope: scope as i32,
            action: action as i32,
            rules: vec![Rule { clauses: vec![Clause { matches }] }],
        }
    }

    fn state(policies: Vec<(&str, Authorization)>) -> MeshState {
        let mut s = MeshState::default();
        for (name, p) in policies {
            s.policies.insert(name.into(), std::sync::Arc::new(p));
        }
        s
    }

    fn workload(selected: &[&str]) -> Workload {
        Workload {
            namespace: "demo".into(),
            authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn conn<'a>(source: Option<&'a SpiffeId>, port: u16) -> Connection<'a> {
        Connection {
            source,
            source_ip: "10.0.1.5".parse().unwrap(),
            destination_ip: "10.0.2.7".parse().unwrap(),
            destination_port: port,
        }
    }

    #[test]
    fn istio_semantics() {
        let client: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/other/sa/x".parse().unwrap();
        let w = workload(&["demo/allow-client"]);

        // No policy: allowed.
        assert_eq!(authorize(&state(vec![]), &w, &conn(Some(&client), 80)), Decision::Allow(None));

        // A selector ALLOW by principal: the principal passes, others and plaintext do not.
        let allow = policy(
            "demo",
            Scope::WorkloadSelector,
            Action::Allow,
            vec![Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..Default::default() }],
        );
        let s = state(vec![("demo/allow-client", allow.clone())]);
        assert_eq!(authorize(&s, &w, &conn(Some(&client), 80)), Decision::Allow(Some("demo/allow-client".into())));
        assert_eq!(authorize(&s, &w, &conn(Some(&other), 80)), Decision::NotAllowed);
        assert_eq!(authorize(&s, &w, &conn(None, 80)), Decision::NotAllowed);
        // ...but only for the workloads it selects.
        assert_eq!(authorize(&s, &workload(&[]), &conn(Some(&other), 80)), Decision::Allow(None));

        // A namespace DENY by port wins over the ALLOW.
        let deny_port = policy(
            "demo",
            Scope::Namespace,
            Action::Deny,
            vec![Match { destination_ports: vec![9090], ..Default::default() }],
        );
        let s = state(vec![("demo/allow-client", allow.clone()), ("demo/deny-9090", deny_port)]);
        assert_eq!(authorize(&s, &w, &conn(Some(&client), 9090)), Decision::DeniedBy("demo/deny-9090".into()));
        assert!(authorize(&s, &w, &conn(Some(&client), 80)).allowed());

        // A global DENY by namespace; not_namespaces matches plaintext (empty namespace).
        let deny_ns = policy(
            "istio-system",
            Scope::Global,
            Action::Deny,
            vec![Match { namespaces: vec![exact("other")], ..Default::default() }],
        );
        let s = state(vec![("istio-system/deny-other", deny_ns)]);
        assert_eq!(authorize(&s, &w, &conn(Some(&other), 80)), Decision::DeniedBy("istio-system/deny-other".into()));
        assert!(authorize(&s, &w, &conn(Some(&client), 80)).allowed());
        assert!(authorize(&s, &w, &conn(None, 80)).allowed());
        let deny_not_demo = policy(
            "demo",
            Scope::Namespace,
            Action::Deny,
            vec![Match { not_namespaces: vec![exact("demo")], ..Default::default() }],
        );
        let s = state(vec![("demo/deny-outsiders", deny_not_demo)]);
        assert!(!authorize(&s, &w, &conn(None, 80)).allowed(), "plaintext is an outsider");
        assert!(authorize(&s, &w, &conn(Some(&client), 80)).allowed());

        // Source IP prefixes, in both polarities, and an empty rule allowing everyone.
        let by_ip = |not: bool| {
            let a = Address { address: vec![10, 0, 1, 0], length: 24 };
            let m = if not {
                Match { not_source_ips: vec![a], ..Default::default() }
            } else {
                Match { source_ips: vec![a], ..Default::default() }
            };
            policy("demo", Scope::Namespace, Action::Allow, vec![m])
        };
        assert!(authorize(&state(vec![("demo/ip", by_ip(false))]), &w, &conn(None, 80)).allowed());
        assert!(!authorize(&state(vec![("demo/ip", by_ip(true))]), &w, &conn(None, 80)).allowed());
        let allow_all = Authorization {
            namespace: "demo".into(),
            scope: Scope::Namespace as i32,
            action: Action::Allow as i32,
            rules: vec![Rule { clauses: vec![] }],
            ..Default::default()
        };
        assert!(authorize(&state(vec![("demo/all", allow_all)]), &w, &conn(None, 1)).allowed());
        let allow_nothing =
            Authorization { namespace: "demo".into(), scope: Scope::Namespace as i32, ..Default::default() };
        assert!(!authorize(&state(vec![("demo/none", allow_nothing)]), &w, &conn(Some(&client), 1)).allowed());
    }

    #[test]
    fn prefixes() {
        let a = |bytes: Vec<u8>, length| Address { address: bytes, length };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(prefix_contains(&a(vec![10, 0, 0, 0], 8), ip("10.200.1.1")));
        assert!(!prefix_contains(&a(vec![10, 0, 0, 0], 8), ip("11.0.0.1")));
        assert!(prefix_contains(&a(vec![10, 0, 0, 128], 25), ip("10.0.0.200")));
        assert!(!prefix_contains(&a(vec![10, 0, 0, 128], 25), ip("10.0.0.100")));
        assert!(prefix_contains(&a(vec![1, 2, 3, 4], 32), ip("1.2.3.4")));
        assert!(prefix_contains(&a(vec![0; 4], 0), ip("8.8.8.8")));
        assert!(!prefix_contains(&a(vec![10, 0, 0, 0], 8), ip("::1")), "families never mix");
        assert!(!prefix_contains(&a(vec![10, 0, 0, 0], 33), ip("10.0.0.0")), "bad length never matches");
    }
}
