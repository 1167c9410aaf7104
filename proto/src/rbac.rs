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
//!
//! Policy never fails open: an action or scope this proxy does not know, an extension, or a match
//! it cannot evaluate makes a DENY deny and an ALLOW not allow. Dry-run policies are left out of
//! the decision; [`dry_run`] says what they would have changed, for the log.

use std::net::IpAddr;

use crate::SpiffeId;
use crate::api::istio::security::{
    Action, Address, Authorization, Match, ServiceAccountMatch, StringMatch, string_match,
};
use crate::state::{MeshState, Workload};

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

/// Authorizes a connection to `destination`. Dry-run policies take no part (see [`dry_run`]).
pub fn authorize(state: &MeshState, destination: &Workload, conn: &Connection<'_>) -> Decision {
    decide(state, destination, conn, false).0
}

/// The decision, and what it would be with the dry-run policies that apply enforced too (`None`
/// when none applies: the common case costs one pass over the policies). A dry-run policy never
/// changes a connection; the second answer is for the log and metrics.
pub fn authorize_with_dry_run(
    state: &MeshState,
    destination: &Workload,
    conn: &Connection<'_>,
) -> (Decision, Option<Decision>) {
    let (decision, dry_run_applies) = decide(state, destination, conn, false);
    let would = dry_run_applies.then(|| decide(state, destination, conn, true).0);
    (decision, would)
}

/// What the decision would be with the dry-run policies that apply enforced too; `None` when
/// none applies.
pub fn dry_run(state: &MeshState, destination: &Workload, conn: &Connection<'_>) -> Option<Decision> {
    authorize_with_dry_run(state, destination, conn).1
}

/// The decision (dry-run policies included when `with_dry_run`), and whether a dry-run policy
/// applies (not known when a DENY decided early).
fn decide(state: &MeshState, destination: &Workload, conn: &Connection<'_>, with_dry_run: bool) -> (Decision, bool) {
    let mut allow_policies = false;
    let mut allowed_by = None;
    let mut dry_run_applies = false;
    for (name, policy) in state.policies.applying_to(destination) {
        if policy.dry_run && !with_dry_run {
            dry_run_applies = true;
            continue;
        }
        match Action::try_from(policy.action) {
            Ok(Action::Deny) if policy_matches(policy, conn, Action::Deny) => {
                return (Decision::DeniedBy(name.to_owned()), dry_run_applies);
            }
            Ok(Action::Deny) => {}
            Ok(Action::Allow) => {
                allow_policies = true;
                if allowed_by.is_none() && policy_matches(policy, conn, Action::Allow) {
                    allowed_by = Some(name.to_owned());
                }
            }
            // An action this proxy does not know can only deny.
            Err(_) => return (Decision::DeniedBy(name.to_owned()), dry_run_applies),
        }
    }
    let decision = match (allow_policies, allowed_by) {
        (false, _) => Decision::Allow(None),
        (true, Some(name)) => Decision::Allow(Some(name)),
        (true, None) => Decision::NotAllowed,
    };
    (decision, dry_run_applies)
}

/// One policy's part in a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PolicyVerdict {
    /// The policy (`<namespace>/<name>`).
    pub name: String,
    /// `ALLOW`, `DENY`, or the unknown action's number (which denies).
    pub action: String,
    /// Dry-run: evaluated for the log, never enforced.
    pub dry_run: bool,
    /// Whether it matched the connection (what cannot be evaluated matches a DENY and does not
    /// match an ALLOW).
    pub matched: bool,
}

/// The decision [`authorize`] takes, with every policy that applies to `destination` and whether
/// it matched, in evaluation order: what `ambientctl explain` shows.
pub fn explain(state: &MeshState, destination: &Workload, conn: &Connection<'_>) -> (Decision, Vec<PolicyVerdict>) {
    let verdicts = state
        .policies
        .applying_to(destination)
        .map(|(name, policy)| {
            let (action, matched) = match Action::try_from(policy.action) {
                Ok(action) => (action.as_str_name().to_owned(), policy_matches(policy, conn, action)),
                Err(_) => (format!("unknown action {}", policy.action), true),
            };
            PolicyVerdict { name: name.to_owned(), action, dry_run: policy.dry_run, matched }
        })
        .collect();
    (authorize(state, destination, conn), verdicts)
}

/// Whether `policy` matches. Anything this proxy cannot evaluate (an extension, a string match
/// of an unknown kind, a malformed address) makes a DENY policy match and an ALLOW one not.
fn policy_matches(policy: &Authorization, conn: &Connection<'_>, action: Action) -> bool {
    let unevaluable = action == Action::Deny;
    if !policy.extensions.is_empty() {
        return unevaluable;
    }
    policy.rules.iter().any(|rule| {
        // A rule holds when every clause does; a clause when any of its matches does.
        let mut verdict = Some(true);
        for clause in &rule.clauses {
            let mut any = Some(false);
            for m in &clause.matches {
                match match_holds(m, conn) {
                    Some(true) => {
                        any = Some(true);
                        break;
                    }
                    Some(false) => {}
                    None => any = None,
                }
            }
            match any {
                Some(false) => return false,
                None => verdict = None,
                Some(true) => {}
            }
        }
        verdict.unwrap_or(unevaluable)
    })
}

/// Whether `m` holds; `None` when it cannot be evaluated.
fn match_holds(m: &Match, conn: &Connection<'_>) -> Option<bool> {
    let evaluable = m.extensions.is_empty()
        && [&m.namespaces, &m.not_namespaces, &m.principals, &m.not_principals]
            .iter()
            .all(|v| v.iter().all(|s| s.match_type.is_some()))
        && [&m.source_ips, &m.not_source_ips, &m.destination_ips, &m.not_destination_ips]
            .iter()
            .all(|v| v.iter().all(valid_prefix))
        && m.destination_ports.iter().chain(&m.not_destination_ports).all(|p| *p <= u32::from(u16::MAX));
    if !evaluable {
        return None;
    }
    // Principals are compared without the scheme, as Istio writes them (`<td>/ns/<ns>/sa/<sa>`).
    let principal = conn.source.map_or("", |id| id.as_str().strip_prefix("spiffe://").unwrap_or(id.as_str()));
    let namespace = conn.source.map_or("", |id| id.namespace());
    let any = |values: &[StringMatch], s: &str| values.iter().any(|v| string_matches(v, s));
    let any_ip = |values: &[Address], ip: IpAddr| values.iter().any(|a| prefix_contains(a, ip));
    let ports = |values: &[u32]| values.contains(&u32::from(conn.destination_port));
    // A plaintext peer has no service account: `service_accounts` never match it, `not_` ones do.
    let account = |values: &[ServiceAccountMatch]| {
        conn.source.is_some_and(|id| {
            values.iter().any(|a| a.namespace == id.namespace() && a.service_account == id.service_account())
        })
    };
    Some(
        (m.namespaces.is_empty() || any(&m.namespaces, namespace))
            && !any(&m.not_namespaces, namespace)
            && (m.service_accounts.is_empty() || account(&m.service_accounts))
            && !account(&m.not_service_accounts)
            && (m.principals.is_empty() || any(&m.principals, principal))
            && !any(&m.not_principals, principal)
            && (m.source_ips.is_empty() || any_ip(&m.source_ips, conn.source_ip))
            && !any_ip(&m.not_source_ips, conn.source_ip)
            && (m.destination_ips.is_empty() || any_ip(&m.destination_ips, conn.destination_ip))
            && !any_ip(&m.not_destination_ips, conn.destination_ip)
            && (m.destination_ports.is_empty() || ports(&m.destination_ports))
            && !ports(&m.not_destination_ports),
    )
}

/// A prefix of a whole IPv4 or IPv6 address with a length that fits it.
fn valid_prefix(a: &Address) -> bool {
    matches!((a.address.len(), a.length), (4, 0..=32) | (16, 0..=128))
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

    use crate::api::istio::security::{Clause, Rule, Scope};

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
            ..Default::default()
        }
    }

    fn state(policies: Vec<(&str, Authorization)>) -> MeshState {
        let mut s = MeshState::default();
        for (name, p) in policies {
            s.policies.insert(name.into(), p);
        }
        s
    }

    fn workload(selected: &[&str]) -> Workload {
        Workload::from_pb(crate::api::istio::workload::Workload {
            namespace: "demo".into(),
            authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .unwrap()
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
    fn service_accounts_match_namespace_and_account_exactly() {
        let sleep: SpiffeId = "spiffe://cluster.local/ns/shop/sa/sleep".parse().unwrap();
        let other: SpiffeId = "spiffe://cluster.local/ns/legacy/sa/sleep".parse().unwrap();
        let w = workload(&["demo/by-account"]);
        let account = |ns: &str, sa: &str| ServiceAccountMatch { namespace: ns.into(), service_account: sa.into() };
        let allow = policy(
            "demo",
            Scope::WorkloadSelector,
            Action::Allow,
            vec![Match { service_accounts: vec![account("shop", "sleep")], ..Default::default() }],
        );
        let s = state(vec![("demo/by-account", allow)]);
        assert!(authorize(&s, &w, &conn(Some(&sleep), 80)).allowed());
        assert_eq!(authorize(&s, &w, &conn(Some(&other), 80)), Decision::NotAllowed, "same account, other namespace");
        assert_eq!(authorize(&s, &w, &conn(None, 80)), Decision::NotAllowed, "plaintext has no account");
        let deny = policy(
            "demo",
            Scope::WorkloadSelector,
            Action::Deny,
            vec![Match { not_service_accounts: vec![account("shop", "sleep")], ..Default::default() }],
        );
        let s = state(vec![("demo/by-account", deny)]);
        assert!(authorize(&s, &w, &conn(Some(&sleep), 80)).allowed());
        assert!(!authorize(&s, &w, &conn(Some(&other), 80)).allowed());
        assert!(!authorize(&s, &w, &conn(None, 80)).allowed(), "plaintext is not shop/sleep");
    }

    #[test]
    fn what_cannot_be_evaluated_never_allows() {
        let client: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let w = workload(&["demo/p"]);
        let c = conn(Some(&client), 80);
        let unknown_string = Match { principals: vec![StringMatch { match_type: None }], ..Default::default() };
        let bad_prefix =
            Match { not_source_ips: vec![Address { address: vec![10, 0, 0], length: 8 }], ..Default::default() };
        let extension = Match { extensions: vec![Default::default()], ..Default::default() };
        for (what, m) in
            [("unknown string match", unknown_string), ("malformed address", bad_prefix), ("extension", extension)]
        {
            let deny = policy("demo", Scope::Namespace, Action::Deny, vec![m.clone()]);
            assert_eq!(
                authorize(&state(vec![("demo/p", deny)]), &w, &c),
                Decision::DeniedBy("demo/p".into()),
                "{what}"
            );
            let allow = policy("demo", Scope::Namespace, Action::Allow, vec![m.clone()]);
            assert_eq!(authorize(&state(vec![("demo/p", allow)]), &w, &c), Decision::NotAllowed, "{what}");
            // An evaluable alternative in the same clause still decides.
            let ok = Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..Default::default() };
            let allow = policy("demo", Scope::Namespace, Action::Allow, vec![m, ok]);
            assert!(authorize(&state(vec![("demo/p", allow)]), &w, &c).allowed(), "{what}");
        }
        // A policy-level extension.
        let mut deny = policy(
            "demo",
            Scope::Namespace,
            Action::Deny,
            vec![Match { destination_ports: vec![1], ..Default::default() }],
        );
        deny.extensions.push(Default::default());
        assert!(!authorize(&state(vec![("demo/p", deny)]), &w, &c).allowed());

        // An action from the future denies; it never allows.
        let mut future = policy("demo", Scope::Namespace, Action::Allow, vec![]);
        future.action = 7;
        assert_eq!(authorize(&state(vec![("demo/p", future)]), &w, &c), Decision::DeniedBy("demo/p".into()));
        // A scope from the future applies everywhere (here: a workload the policy does not select).
        let mut everywhere = policy("other", Scope::Namespace, Action::Deny, vec![Match::default()]);
        everywhere.scope = 9;
        assert!(!authorize(&state(vec![("other/p", everywhere)]), &workload(&[]), &c).allowed());
    }

    #[test]
    fn dry_run_policies_are_evaluated_never_enforced() {
        let client: SpiffeId = "spiffe://cluster.local/ns/demo/sa/client".parse().unwrap();
        let w = workload(&[]);
        let c = conn(Some(&client), 80);
        let mut deny = policy("demo", Scope::Namespace, Action::Deny, vec![Match::default()]);
        deny.dry_run = true;
        let s = state(vec![("demo/would-deny", deny)]);
        assert_eq!(authorize(&s, &w, &c), Decision::Allow(None));
        assert_eq!(dry_run(&s, &w, &c), Some(Decision::DeniedBy("demo/would-deny".into())));
        // A dry-run ALLOW that does not match: it would have refused.
        let mut allow = policy(
            "demo",
            Scope::Namespace,
            Action::Allow,
            vec![Match { destination_ports: vec![1], ..Default::default() }],
        );
        allow.dry_run = true;
        let s = state(vec![("demo/would-allow-1", allow)]);
        assert_eq!(authorize(&s, &w, &c), Decision::Allow(None));
        assert_eq!(dry_run(&s, &w, &c), Some(Decision::NotAllowed));
        // No dry-run policy: nothing to report.
        assert_eq!(dry_run(&state(vec![]), &w, &c), None);
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
