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
use crate::validate::Invalid;

/// `when` keys ztunnel can evaluate.
const L4_KEYS: &[&str] = &["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];

/// Parses `a.b.c.d`, `a.b.c.d/n` or IPv6 equivalents.
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, Invalid> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| Invalid(format!("{s:?} is not an IP address or CIDR")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| Invalid(format!("{s:?} has an invalid prefix length")))?,
        None => max,
    };
    Ok(IpNet { addr, prefix })
}

/// A port as Istio writes it: decimal digits, no sign, no leading zero, 1–65535. Anything else
/// (`"080"`, `"+80"`, `"http"`) is refused rather than read one way here and another elsewhere.
pub(crate) fn parse_port(s: &str) -> Result<u16, Invalid> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    canonical
        .then(|| s.parse::<u16>().ok())
        .flatten()
        .ok_or_else(|| Invalid(format!("{s:?} is not a port number (1-65535)")))
}

/// A string match as Istio writes them: exact, `prefix*`, `*suffix` or `*`. Anything else would be
/// taken literally and silently match nothing: a `*` inside (`ns/*/sa/x`), surrounding whitespace,
/// an empty value.
pub(crate) fn check_pattern(p: &str) -> Result<(), Invalid> {
    let inner = p.strip_prefix('*').unwrap_or(p);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if p.is_empty() {
        Err(Invalid("an empty value matches nothing".to_owned()))
    } else if p != "*" && (inner.contains('*') || (p.starts_with('*') && p.ends_with('*'))) {
        Err(Invalid(format!("{p:?}: a wildcard is only allowed alone, at the start or at the end")))
    } else if p.trim() != p {
        Err(Invalid(format!("{p:?} has leading or trailing whitespace")))
    } else {
        Ok(())
    }
}

/// A `serviceAccounts` entry: `<namespace>/<name>`, both exact.
pub(crate) fn parse_service_account(s: &str) -> Result<(&str, &str), Invalid> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !s.contains('*') => Ok((ns, sa)),
        _ => Err(Invalid(format!("service account {s:?} is not <namespace>/<name> (wildcards are not allowed)"))),
    }
}

/// `when` keys the mesh evaluates: ztunnel the L4 ones, the waypoint these (but `destination.ip`)
/// and `remote.ip`, `request.headers[<name>]` and the JWT attributes (`request.auth.principal`,
/// `.audiences`, `.presenter`, `.claims[<name>]`, nested `.claims[<a>][<b>]`).
fn known_when_key(key: &str) -> bool {
    L4_KEYS.contains(&key)
        || matches!(key, "remote.ip" | "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter")
        || key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')).is_some_and(|k| !k.is_empty())
        || key.strip_prefix("request.auth.claims").and_then(claim_path).is_some()
}

/// The claim names of `[<a>][<b>]…` (at least one, none empty, no brackets inside).
pub fn claim_path(brackets: &str) -> Option<Vec<&str>> {
    let inner = brackets.strip_prefix('[')?.strip_suffix(']')?;
    let names: Vec<&str> = inner.split("][").collect();
    names.iter().all(|n| !n.is_empty() && !n.contains(['[', ']'])).then_some(names)
}

/// An AuthorizationPolicy `action`, as enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    /// `ALLOW` (the default).
    Allow,
    /// `DENY`.
    Deny,
    /// `AUDIT`: logging only, never enforced.
    Audit,
    /// `CUSTOM`: an external authorizer decides; there is none here, so what it matches is denied.
    Custom,
}

/// The policy's action; `Err` for a value Istio does not define.
pub fn action(spec: &AuthorizationPolicySpec) -> Result<PolicyAction, Invalid> {
    match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Ok(PolicyAction::Allow),
        "DENY" => Ok(PolicyAction::Deny),
        "AUDIT" => Ok(PolicyAction::Audit),
        "CUSTOM" => Ok(PolicyAction::Custom),
        other => Err(Invalid(format!("action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM"))),
    }
}

/// What the mesh cannot evaluate in one AuthorizationPolicy, found before translating it.
///
/// Nothing is ignored silently. A problem with the policy as a whole (its spec did not decode, a
/// field this mesh does not read, an unknown action) makes an ALLOW policy allow nothing and any
/// other policy deny everything it applies to. A problem in one rule (an unknown field, a
/// malformed value, a condition the mesh cannot evaluate) drops that rule from an ALLOW policy
/// and makes it match every request in a DENY policy. Either way the policy denies more, never
/// less, and every problem is reported with the policy's name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Review {
    /// Problems with the policy as a whole.
    pub policy: Vec<String>,
    /// Problems per rule, in rule order.
    pub rules: Vec<Vec<String>>,
    /// Reported, without changing what is enforced.
    pub notes: Vec<String>,
}

impl Review {
    /// Every problem and note, for the config error report.
    pub fn messages(&self) -> Vec<String> {
        let rules =
            self.rules.iter().enumerate().flat_map(|(i, ps)| ps.iter().map(move |p| format!("rules[{i}]: {p}")));
        self.policy.iter().cloned().chain(rules).chain(self.notes.iter().cloned()).collect()
    }

    /// Whether the policy as a whole can be evaluated.
    pub fn policy_ok(&self) -> bool {
        self.policy.is_empty()
    }

    /// Whether rule `i` can be evaluated as written.
    pub fn rule_ok(&self, i: usize) -> bool {
        self.rules.get(i).is_none_or(Vec::is_empty)
    }
}

fn unknown_fields(at: &str, unknown: &std::collections::BTreeMap<String, serde_json::Value>, out: &mut Vec<String>) {
    for field in unknown.keys() {
        out.push(format!("{at}: field {field:?} is not one this mesh reads"));
    }
}

/// Reviews `policy` (see [`Review`]).
pub fn review(policy: &AuthorizationPolicy) -> Review {
    let spec = &policy.spec;
    let mut review = Review::default();
    if let Some(reason) = &spec.unreadable {
        review.policy.push(format!("spec cannot be read: {reason}"));
    }
    unknown_fields("spec", &spec.unknown, &mut review.policy);
    match action(spec) {
        Err(e) => review.policy.push(e.0),
        Ok(PolicyAction::Custom) => review.notes.push(
            "action CUSTOM needs an external authorizer, which this mesh does not have: what its rules match is denied"
                .into(),
        ),
        Ok(_) => {}
    }
    if let Err(e) = dry_run_annotation(policy) {
        review.notes.push(e.0);
    }
    review.rules = spec.rules.iter().map(rule_problems).collect();
    review
}

/// Whether the policy is dry-run; `Err` (enforced) for a value that is neither `true` nor `false`.
fn dry_run_annotation(policy: &AuthorizationPolicy) -> Result<bool, Invalid> {
    let annotations = policy.metadata.annotations.as_ref();
    match annotations.and_then(|a| a.get(crate::k8s::DRY_RUN_ANNOTATION)).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Invalid(format!(
            "annotation {}: {other:?} is neither \"true\" nor \"false\"; the policy is enforced",
            crate::k8s::DRY_RUN_ANNOTATION
        ))),
    }
}

/// Whether the policy is dry-run (evaluated and logged, never enforced).
pub fn dry_run(policy: &AuthorizationPolicy) -> bool {
    dry_run_annotation(policy).unwrap_or(false)
}

fn rule_problems(rule: &crate::k8s::AuthzRule) -> Vec<String> {
    let mut out = Vec::new();
    unknown_fields("rule", &rule.unknown, &mut out);
    for (j, from) in rule.from.iter().enumerate() {
        let at = format!("from[{j}].source");
        unknown_fields(&format!("from[{j}]"), &from.unknown, &mut out);
        let s = &from.source;
        unknown_fields(&at, &s.unknown, &mut out);
        let blocks =
            s.ip_blocks.iter().chain(&s.not_ip_blocks).chain(&s.remote_ip_blocks).chain(&s.not_remote_ip_blocks);
        out.extend(blocks.filter_map(|b| parse_cidr(b).err()).map(|e| format!("{at}: {e}")));
        let accounts = s.service_accounts.iter().chain(&s.not_service_accounts);
        out.extend(accounts.filter_map(|a| parse_service_account(a).err()).map(|e| format!("{at}: {e}")));
        let patterns = s.principals.iter().chain(&s.not_principals).chain(&s.request_principals);
        let patterns = patterns.chain(&s.not_request_principals).chain(&s.namespaces).chain(&s.not_namespaces);
        out.extend(patterns.filter_map(|p| check_pattern(p).err()).map(|e| format!("{at}: {e}")));
    }
    for (j, to) in rule.to.iter().enumerate() {
        let at = format!("to[{j}].operation");
        unknown_fields(&format!("to[{j}]"), &to.unknown, &mut out);
        let o = &to.operation;
        unknown_fields(&at, &o.unknown, &mut out);
        let ports = o.ports.iter().chain(&o.not_ports);
        out.extend(ports.filter_map(|p| parse_port(p).err()).map(|e| format!("{at}: {e}")));
        let patterns = o.hosts.iter().chain(&o.not_hosts).chain(&o.methods).chain(&o.not_methods);
        let patterns = patterns.chain(&o.paths).chain(&o.not_paths);
        out.extend(patterns.filter_map(|p| check_pattern(p).err()).map(|e| format!("{at}: {e}")));
    }
    for (j, c) in rule.when.iter().enumerate() {
        let at = format!("when[{j}]");
        unknown_fields(&at, &c.unknown, &mut out);
        if !known_when_key(&c.key) {
            out.push(format!("{at}: key {:?} is not one this mesh evaluates", c.key));
            continue;
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            out.push(format!("{at}: {:?} has neither values nor notValues", c.key));
        }
        let values = c.values.iter().chain(&c.not_values);
        match c.key.as_str() {
            "source.ip" | "destination.ip" | "remote.ip" => {
                out.extend(values.filter_map(|v| parse_cidr(v).err()).map(|e| format!("{at}: {e}")))
            }
            "destination.port" => out.extend(values.filter_map(|v| parse_port(v).err()).map(|e| format!("{at}: {e}"))),
            _ => out.extend(values.filter_map(|v| check_pattern(v).err()).map(|e| format!("{at}: {e}"))),
        }
    }
    out
}

fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::from_pattern(s)).collect()
}

// Only rules whose values all parse are translated (see `Review`), so these drop nothing.
fn cidrs(v: &[String]) -> Vec<IpNet> {
    v.iter().filter_map(|s| parse_cidr(s).ok()).collect()
}

fn ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|s| parse_port(s).ok()).collect()
}

fn service_accounts(v: &[String]) -> Vec<(String, String)> {
    v.iter().filter_map(|s| parse_service_account(s).ok()).map(|(ns, sa)| (ns.to_owned(), sa.to_owned())).collect()
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
            service_accounts: service_accounts(&s.service_accounts),
            not_service_accounts: service_accounts(&s.not_service_accounts),
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

/// Translates an AuthorizationPolicy for ztunnel, failing closed on whatever [`review`] found.
pub fn translate(policy: &AuthorizationPolicy, root_namespace: &str) -> Translated {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        return Translated::ForWaypoint;
    }
    let action = match action(spec) {
        Ok(PolicyAction::Allow) => Action::Allow,
        // With no external authorizer, what a CUSTOM policy matches is denied.
        Ok(PolicyAction::Deny | PolicyAction::Custom) | Err(_) => Action::Deny,
        Ok(PolicyAction::Audit) => return Translated::Skipped("action AUDIT is not enforced by ztunnel".into()),
    };
    let review = review(policy);
    let rules = if !review.policy_ok() {
        // Unreadable as a whole: an ALLOW allows nothing, anything else denies everything.
        if action == Action::Allow { Vec::new() } else { vec![Vec::new()] }
    } else {
        spec.rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match (review.rule_ok(i), action) {
                (true, _) => rule(action, r),
                (false, Action::Allow) => None,
                (false, Action::Deny) => Some(Vec::new()),
            })
            .collect()
    };
    let (namespace, name) = crate::k8s::ns_name(&policy.metadata);
    let scope = scope(namespace, selector(&spec.selector), root_namespace);
    Translated::Policy(Policy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope,
        action,
        rules,
        dry_run: dry_run(policy),
    })
}

/// Name prefix of the policies that keep a waypoint-served workload reachable only through its
/// waypoint (`_` never appears in a Kubernetes name, so no user policy can collide).
pub const WAYPOINT_ONLY_PREFIX: &str = "waypoint_only_";

/// The DENY that admits only `waypoint`'s pods (`identities`) to workloads of `namespace` that it
/// serves for their own address. With no waypoint pod known yet, it denies everyone.
pub fn waypoint_only<'a>(
    namespace: &str,
    waypoint: &crate::mesh::WaypointRef,
    identities: impl IntoIterator<Item = &'a proto::SpiffeId>,
) -> Policy {
    let principals: Vec<StringMatch> = identities
        .into_iter()
        .map(|id| StringMatch::Exact(id.as_str().trim_start_matches("spiffe://").to_owned()))
        .collect();
    let rules = if principals.is_empty() {
        vec![Vec::new()]
    } else {
        vec![vec![vec![Match { not_principals: principals, ..Match::default() }]]]
    };
    Policy {
        name: format!("{WAYPOINT_ONLY_PREFIX}{}_{}", waypoint.namespace, waypoint.name),
        namespace: namespace.to_owned(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules,
        dry_run: false,
    }
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
        dry_run: false,
    })
}
