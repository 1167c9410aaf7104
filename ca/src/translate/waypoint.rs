//! HTTPRoutes (and GRPCRoutes, as the HTTPRoutes they amount to) and waypoint-targeted
//! AuthorizationPolicies → the waypoint's own resources.
//!
//! - A route whose parentRef is a Service (GAMMA) applies to traffic to that service; one whose
//!   parentRef is a waypoint Gateway applies to every service that uses that waypoint and matches
//!   the route's hostnames (all, when it lists none).
//! - An AuthorizationPolicy with `targetRef(s)` (a waypoint Gateway or a Service) is enforced by
//!   the waypoint, L7 fields included; its fields pass through unchanged.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServicePort;
use proto::api::ambient::waypoint::v1 as pb;
use proto::api::istio::workload::AppProtocol;
use serde_json::Value;

use crate::k8s::{self, AuthorizationPolicy, HTTPRouteSpec, HttpRouteFilter, HttpRouteRule, ObjectRef};
use crate::mesh::Service;
use crate::objects::{ConfigError, Objects};
use crate::translate::MeshConfig;
use crate::translate::authz::{self, PolicyAction};

pub use proto::duration::parse_millis as parse_duration;

fn is_service(r: &ObjectRef) -> bool {
    matches!(r.group.as_deref(), None | Some("") | Some("core")) && r.kind.as_deref() == Some("Service")
}

pub(crate) fn is_gateway(r: &ObjectRef) -> bool {
    r.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        && matches!(r.group.as_deref(), None | Some("gateway.networking.k8s.io"))
}

fn service_key(r: &ObjectRef, route_ns: &str, suffix: &str) -> (String, String) {
    let ns = r.namespace.as_deref().unwrap_or(route_ns);
    (ns.to_owned(), format!("{}.{ns}.svc.{suffix}", r.name))
}

fn path_modifier(v: Option<&Value>) -> Option<pb::PathModifier> {
    let v = v?;
    let kind = match v.get("type")?.as_str()? {
        "ReplaceFullPath" => pb::path_modifier::Kind::ReplaceFullPath(v.get("replaceFullPath")?.as_str()?.to_owned()),
        "ReplacePrefixMatch" => {
            pb::path_modifier::Kind::ReplacePrefixMatch(v.get("replacePrefixMatch")?.as_str()?.to_owned())
        }
        _ => return None,
    };
    Some(pb::PathModifier { kind: Some(kind) })
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn u32_of(v: &Value, key: &str) -> u32 {
    v.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).unwrap_or_default()
}

fn header_modifier(m: &Option<k8s::HeaderModifier>) -> Option<pb::HeaderModifier> {
    let m = m.as_ref()?;
    let headers = |v: &[k8s::HeaderValue]| {
        v.iter().map(|h| pb::Header { name: h.name.clone(), value: h.value.clone() }).collect()
    };
    Some(pb::HeaderModifier { set: headers(&m.set), add: headers(&m.add), remove: m.remove.clone() })
}

fn filter(f: &HttpRouteFilter, route_ns: &str, suffix: &str) -> Option<pb::Filter> {
    use pb::filter::Kind;
    let kind = match f.kind.as_str() {
        "RequestHeaderModifier" => Kind::RequestHeaderModifier(header_modifier(&f.request_header_modifier)?),
        "ResponseHeaderModifier" => Kind::ResponseHeaderModifier(header_modifier(&f.response_header_modifier)?),
        "RequestRedirect" => {
            let v = f.request_redirect.as_ref()?;
            Kind::RequestRedirect(pb::Redirect {
                scheme: str_of(v, "scheme"),
                hostname: str_of(v, "hostname"),
                path: path_modifier(v.get("path")),
                port: u32_of(v, "port"),
                status_code: u32_of(v, "statusCode"),
            })
        }
        "URLRewrite" => {
            let v = f.url_rewrite.as_ref()?;
            Kind::UrlRewrite(pb::Rewrite { hostname: str_of(v, "hostname"), path: path_modifier(v.get("path")) })
        }
        "RequestMirror" => {
            let mirror = f.request_mirror.as_ref()?;
            let b = mirror.get("backendRef")?;
            let target = ObjectRef {
                name: str_of(b, "name"),
                namespace: b.get("namespace").and_then(Value::as_str).map(str::to_owned),
                ..ObjectRef::default()
            };
            let (ns, host) = service_key(&target, route_ns, suffix);
            Kind::RequestMirror(pb::Mirror {
                backend: Some(pb::Backend {
                    service: format!("{ns}/{host}"),
                    port: u32_of(b, "port"),
                    weight: 1,
                    ..Default::default()
                }),
                percent: mirror_percent(mirror),
            })
        }
        _ => return None,
    };
    Some(pb::Filter { kind: Some(kind) })
}

/// A RequestMirror filter's share of requests: `percent` (0-100), else `fraction`
/// (`numerator` / `denominator`, 100 by default), else every request.
fn mirror_percent(mirror: &Value) -> Option<f64> {
    if let Some(p) = mirror.get("percent").and_then(Value::as_f64) {
        return Some(p.clamp(0.0, 100.0));
    }
    let fraction = mirror.get("fraction")?;
    let numerator = fraction.get("numerator").and_then(Value::as_f64)?;
    let denominator = fraction.get("denominator").and_then(Value::as_f64).unwrap_or(100.0);
    Some(if denominator > 0.0 { (numerator / denominator * 100.0).clamp(0.0, 100.0) } else { 0.0 })
}

pub(crate) fn rule(r: &HttpRouteRule, route_ns: &str, suffix: &str) -> pb::RouteRule {
    let ms = |d: &Option<String>| d.as_deref().and_then(|d| parse_duration(d).ok()).unwrap_or(0);
    let value_match = |m: &k8s::HttpValueMatch| pb::ValueMatch {
        kind: match m.kind.as_deref() {
            Some("RegularExpression") => pb::value_match::Kind::Regex,
            _ => pb::value_match::Kind::Exact,
        } as i32,
        name: m.name.clone(),
        value: m.value.clone(),
    };
    pb::RouteRule {
        name: r.name.clone().unwrap_or_default(),
        matches: r
            .matches
            .iter()
            .map(|m| pb::RouteMatch {
                path: m.path.as_ref().map(|p| pb::PathMatch {
                    kind: match p.kind.as_deref() {
                        Some("Exact") => pb::path_match::Kind::Exact,
                        Some("RegularExpression") => pb::path_match::Kind::Regex,
                        _ => pb::path_match::Kind::Prefix,
                    } as i32,
                    value: p.value.clone().unwrap_or_else(|| "/".into()),
                }),
                headers: m.headers.iter().map(value_match).collect(),
                query_params: m.query_params.iter().map(value_match).collect(),
                method: m.method.clone().unwrap_or_default(),
            })
            .collect(),
        filters: r.filters.iter().filter_map(|f| filter(f, route_ns, suffix)).collect(),
        backends: r
            .backend_refs
            .iter()
            .map(|b| {
                let (ns, host) = service_key(&b.target, route_ns, suffix);
                pb::Backend {
                    service: format!("{ns}/{host}"),
                    port: u32::from(b.target.port.unwrap_or(0)),
                    weight: b.weight.unwrap_or(1),
                    ..Default::default()
                }
            })
            .collect(),
        request_timeout_ms: r.timeouts.as_ref().map(|t| ms(&t.request)).unwrap_or(0),
        backend_request_timeout_ms: r.timeouts.as_ref().map(|t| ms(&t.backend_request)).unwrap_or(0),
        retry: r.retry.as_ref().map(|x| pb::Retry {
            codes: x.codes.iter().map(|c| u32::from(*c)).collect(),
            attempts: x.attempts.unwrap_or(0),
            backoff_ms: ms(&x.backoff),
        }),
        fault: None,
    }
}

/// Whether a route hostname (possibly `*.suffix`) matches a service hostname.
fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.strip_suffix(suffix).is_some_and(|h| h.ends_with('.')),
        None => pattern == host,
    }
}

/// Routes per service, keyed `namespace/hostname`, and the attachments refused. Only producer
/// routes are taken, as Istio's waypoints take them: a route in the namespace of the Service it
/// names (or of the waypoint Gateway it names, whose listeners admit the same namespace only). A
/// route in another namespace would let that namespace's owner reroute someone else's service.
pub fn routes(
    objects: &Objects,
    config: &MeshConfig,
    services: &BTreeMap<String, Service>,
) -> (BTreeMap<String, pb::ServiceRoutes>, Vec<String>) {
    let mut out: BTreeMap<String, pb::ServiceRoutes> = BTreeMap::new();
    let mut warnings = Vec::new();
    // A GRPCRoute is the HTTPRoute it amounts to (validated on the way in).
    let grpc: Vec<(&kube::core::ObjectMeta, HTTPRouteSpec)> =
        objects.grpc_routes().filter_map(|r| Some((&r.metadata, r.spec.as_http().ok()?))).collect();
    let all = objects.http_routes().map(|r| (&r.metadata, &r.spec)).chain(grpc.iter().map(|(m, s)| (*m, s)));
    for (metadata, spec) in all {
        let (ns, name) = k8s::ns_name(metadata);
        let rules: Vec<pb::RouteRule> = spec.rules.iter().map(|r| rule(r, ns, &config.domain_suffix)).collect();
        for parent in &spec.parent_refs {
            let targets: Vec<&Service> = if is_service(parent) {
                let (pns, host) = service_key(parent, ns, &config.domain_suffix);
                services.get(&format!("{pns}/{host}")).into_iter().collect()
            } else if is_gateway(parent) {
                let gw_ns = parent.namespace.as_deref().unwrap_or(ns);
                services
                    .values()
                    .filter(|s| s.waypoint.as_ref().is_some_and(|w| w.namespace == gw_ns && w.name == parent.name))
                    .filter(|s| {
                        spec.hostnames.is_empty()
                            || spec.hostnames.iter().any(|h| hostname_matches(h, &s.hostname) || *h == s.name)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            // An ingress Gateway in another namespace is none of this (its listeners' allowedRoutes
            // decide, see `ingress`); a Service or a waypoint there is.
            let parent_ns = parent.namespace.as_deref().unwrap_or(ns);
            if parent_ns != ns && !targets.is_empty() {
                warnings.push(format!(
                    "route {ns}/{name}: parentRef {parent_ns}/{} is in another namespace; waypoints take only routes in the namespace of what they name",
                    parent.name
                ));
                continue;
            }
            for svc in targets {
                let entry = out.entry(svc.resource_name()).or_insert_with(|| pb::ServiceRoutes {
                    namespace: svc.namespace.clone(),
                    hostname: svc.hostname.clone(),
                    ..Default::default()
                });
                entry.routes.push(pb::Route {
                    name: format!("{ns}/{name}"),
                    ports: parent.port.map(u32::from).into_iter().collect(),
                    rules: rules.clone(),
                    ordered: false,
                });
            }
        }
    }
    (out, warnings)
}

/// The application protocol a Service port declares, reported in `istio.workload.Port.app_protocol`
/// and read by the waypoint to skip detection: from `appProtocol`, else the port name's
/// `<protocol>[-suffix]`, as Istio selects a port's protocol. The HTTP family is named as istiod
/// names it (HTTP/1.1, HTTP/2 for `http2`/`h2c`, gRPC); plain TCP protocols (`tcp`, `mongo`,
/// `mysql`, `redis`) are `TCP` and TLS ones (`tls`, `https`, `kubernetes.io/wss`) `TLS`, values the
/// enum defines but istiod leaves `UNKNOWN` (Istio's ztunnel does not read the field); anything
/// else is `UNKNOWN`, detected by the waypoint per connection.
pub fn app_protocol(port: &ServicePort) -> AppProtocol {
    let named = |name: &str| match name.to_ascii_lowercase().as_str() {
        "http" | "grpc-web" | "kubernetes.io/ws" => Some(AppProtocol::Http11),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
        "grpc" => Some(AppProtocol::Grpc),
        "tcp" | "mongo" | "mysql" | "redis" => Some(AppProtocol::Tcp),
        "tls" | "https" | "kubernetes.io/wss" => Some(AppProtocol::Tls),
        _ => None,
    };
    // An `appProtocol` Istio does not know falls back to the name, as Istio's does.
    port.app_protocol
        .as_deref()
        .and_then(named)
        .or_else(|| port.name.as_deref().and_then(|n| named(n.split('-').next().unwrap_or(n))))
        .unwrap_or(AppProtocol::Unknown)
}

/// The policies a waypoint enforces, keyed `namespace/name`, and the targets it cannot take as
/// written (see [`policy_targets`]).
pub fn l7_policies(
    objects: &Objects,
    services: &BTreeMap<String, Service>,
    root_namespace: &str,
) -> (BTreeMap<String, pb::L7Policy>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let policies = objects
        .authorization_policies()
        .filter_map(|p| {
            let (policy, unsupported) = l7_policy(p, services, root_namespace)?;
            let (ns, name) = k8s::ns_name(&p.metadata);
            errors.extend(
                unsupported
                    .into_iter()
                    .map(|message| ConfigError { source: format!("AuthorizationPolicy {ns}/{name}"), message }),
            );
            Some(policy)
        })
        .map(|p| (format!("{}/{}", p.namespace, p.name), p))
        .collect();
    (policies, errors)
}

fn l7_policy(
    policy: &AuthorizationPolicy,
    services: &BTreeMap<String, Service>,
    root_namespace: &str,
) -> Option<(pb::L7Policy, Vec<String>)> {
    let spec = &policy.spec;
    let refs: Vec<&ObjectRef> = spec.target_ref.iter().chain(&spec.target_refs).collect();
    if refs.is_empty() {
        return None;
    }
    let action = match authz::action(spec) {
        Ok(PolicyAction::Allow) => pb::l7_policy::Action::Allow,
        // With no external authorizer, what a CUSTOM policy matches is denied.
        Ok(PolicyAction::Deny | PolicyAction::Custom) | Err(_) => pb::l7_policy::Action::Deny,
        Ok(PolicyAction::Audit) => return None,
    };
    let allow = action == pb::l7_policy::Action::Allow;
    let review = authz::review(policy);
    let (ns, name) = k8s::ns_name(&policy.metadata);
    let (targets, unsupported) = policy_targets(&refs, ns, services, root_namespace);
    // What cannot be evaluated fails closed (see `authz::Review`): an unreadable ALLOW allows
    // nothing and an unreadable DENY denies everything; a bad rule leaves an ALLOW and matches
    // every request in a DENY.
    let match_all = pb::L7Rule::default;
    let rules = if !review.policy_ok() {
        if allow { Vec::new() } else { vec![match_all()] }
    } else {
        l7_rules(spec, &review, allow)
    };
    let policy = pb::L7Policy {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        targets,
        action: action as i32,
        rules,
        dry_run: authz::dry_run(policy),
    };
    Some((policy, unsupported))
}

/// A policy's `targetRefs` as waypoint targets (namespace defaulting to the policy's): Gateways
/// (waypoints and ingress gateways), Services, and ServiceEntries (the services of their hosts
/// carry the entry's name). A kind the mesh does not know cannot be dropped — a DENY aimed at it
/// would then deny nothing — so it fails closed within what the policy's author governs: it
/// targets every service of the policy's namespace (of the mesh, for the root namespace), and
/// is returned as a problem to report.
pub(crate) fn policy_targets(
    refs: &[&ObjectRef],
    ns: &str,
    services: &BTreeMap<String, Service>,
    root_namespace: &str,
) -> (Vec<pb::PolicyTarget>, Vec<String>) {
    let mut targets = Vec::new();
    let mut unsupported = Vec::new();
    let target = |kind: pb::policy_target::Kind, namespace: String, name: String| pb::PolicyTarget {
        kind: kind as i32,
        namespace,
        name,
    };
    for r in refs {
        let namespace = r.namespace.clone().unwrap_or_else(|| ns.to_owned());
        let group = r.group.as_deref().unwrap_or("");
        match (group, r.kind.as_deref().unwrap_or("")) {
            ("" | "core", "Service") => {
                targets.push(target(pb::policy_target::Kind::Service, namespace, r.name.clone()))
            }
            ("" | "gateway.networking.k8s.io", "Gateway") => {
                targets.push(target(pb::policy_target::Kind::Gateway, namespace, r.name.clone()));
            }
            ("networking.istio.io", "ServiceEntry") => {
                targets.push(target(pb::policy_target::Kind::Service, namespace, r.name.clone()));
            }
            (group, kind) => {
                let scope = if ns == root_namespace { "the mesh" } else { "its namespace" };
                unsupported.push(format!(
                    "targetRefs kind {kind:?} (group {group:?}) is not one the mesh knows; the policy applies to every service of {scope} instead"
                ));
                let mut seen = std::collections::BTreeSet::new();
                for svc in services.values().filter(|s| ns == root_namespace || s.namespace == ns) {
                    if seen.insert((svc.namespace.clone(), svc.name.clone())) {
                        targets.push(target(pb::policy_target::Kind::Service, svc.namespace.clone(), svc.name.clone()));
                    }
                }
            }
        }
    }
    (targets, unsupported)
}

/// The rules as written, but that a rule with a problem is left out of an ALLOW and matches
/// everything in a DENY.
fn l7_rules(spec: &k8s::AuthorizationPolicySpec, review: &authz::Review, allow: bool) -> Vec<pb::L7Rule> {
    let match_all = pb::L7Rule::default;
    spec.rules
        .iter()
        .enumerate()
        .filter(|(i, _)| !allow || review.rule_ok(*i))
        .map(|(i, r)| {
            if !review.rule_ok(i) {
                match_all()
            } else {
                pb::L7Rule {
                    from: r
                        .from
                        .iter()
                        .map(|f| {
                            let s = &f.source;
                            pb::L7Source {
                                principals: s.principals.clone(),
                                not_principals: s.not_principals.clone(),
                                request_principals: s.request_principals.clone(),
                                not_request_principals: s.not_request_principals.clone(),
                                namespaces: s.namespaces.clone(),
                                not_namespaces: s.not_namespaces.clone(),
                                ip_blocks: s.ip_blocks.clone(),
                                not_ip_blocks: s.not_ip_blocks.clone(),
                                remote_ip_blocks: s.remote_ip_blocks.clone(),
                                not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                                service_accounts: s.service_accounts.clone(),
                                not_service_accounts: s.not_service_accounts.clone(),
                            }
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| {
                            let o = &t.operation;
                            pb::L7Operation {
                                hosts: o.hosts.clone(),
                                not_hosts: o.not_hosts.clone(),
                                ports: o.ports.clone(),
                                not_ports: o.not_ports.clone(),
                                methods: o.methods.clone(),
                                not_methods: o.not_methods.clone(),
                                paths: o.paths.clone(),
                                not_paths: o.not_paths.clone(),
                            }
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| pb::L7Condition {
                            key: c.key.clone(),
                            values: c.values.clone(),
                            not_values: c.not_values.clone(),
                        })
                        .collect(),
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_mirror_takes_its_share_from_percent_or_fraction() {
        let share = |v: serde_json::Value| mirror_percent(&v);
        assert_eq!(share(serde_json::json!({"backendRef": {"name": "b"}})), None, "unset: every request");
        assert_eq!(share(serde_json::json!({"percent": 10})), Some(10.0));
        assert_eq!(share(serde_json::json!({"fraction": {"numerator": 1, "denominator": 4}})), Some(25.0));
        assert_eq!(share(serde_json::json!({"fraction": {"numerator": 5}})), Some(5.0), "denominator 100 by default");
        assert_eq!(share(serde_json::json!({"percent": 20, "fraction": {"numerator": 1}})), Some(20.0));
    }

    #[test]
    fn wildcard_hostnames_match_subdomains_only() {
        assert!(hostname_matches("*.shop.svc.cluster.local", "server.shop.svc.cluster.local"));
        assert!(!hostname_matches("*.shop.svc.cluster.local", "shop.svc.cluster.local"));
        assert!(hostname_matches("a.b", "a.b"));
        assert!(!hostname_matches("a.b", "x.a.b"));
    }

    #[test]
    fn app_protocols_come_from_app_protocol_then_the_port_name() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(str::to_owned),
            app_protocol: app.map(str::to_owned),
            port: 80,
            ..Default::default()
        };
        for (name, app, expected) in [
            (Some("http-web"), None, AppProtocol::Http11),
            (Some("http"), None, AppProtocol::Http11),
            (Some("web"), Some("grpc-web"), AppProtocol::Http11),
            // A name is read up to its first `-`, as Istio reads it.
            (Some("grpc-web"), None, AppProtocol::Grpc),
            (Some("http2"), None, AppProtocol::Http2),
            (Some("web"), Some("kubernetes.io/h2c"), AppProtocol::Http2),
            (Some("grpc"), None, AppProtocol::Grpc),
            (Some("grpc-api"), None, AppProtocol::Grpc),
            (Some("tcp-db"), None, AppProtocol::Tcp),
            (Some("MySQL"), None, AppProtocol::Tcp),
            (Some("tls"), None, AppProtocol::Tls),
            (Some("https"), None, AppProtocol::Tls),
            // appProtocol wins over the name.
            (Some("http"), Some("tcp"), AppProtocol::Tcp),
            (Some("tcp"), Some("http"), AppProtocol::Http11),
            // An appProtocol Istio does not know: the name decides.
            (Some("http"), Some("custom"), AppProtocol::Http11),
            // Neither names a protocol.
            (Some("web"), None, AppProtocol::Unknown),
            (Some("httpx"), None, AppProtocol::Unknown),
            (None, Some("custom"), AppProtocol::Unknown),
            (None, None, AppProtocol::Unknown),
        ] {
            assert_eq!(app_protocol(&port(name, app)), expected, "name {name:?}, appProtocol {app:?}");
        }
    }
}
