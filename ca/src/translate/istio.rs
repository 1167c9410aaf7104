//! Istio `VirtualService` and `DestinationRule` → the waypoint's routes and destination policies.
//!
//! - A VirtualService applying to the mesh (no `gateways`, or `mesh` among them) gives each
//!   service named in `hosts` an ordered route: its `http` entries in order, the first match
//!   winning, tried before the service's HTTPRoutes. Matches, weighted destinations (subsets
//!   resolved to the workloads whose labels the DestinationRule names), header changes,
//!   redirects, rewrites, mirrors, timeouts, retries and faults carry over.
//! - A DestinationRule's traffic policy (load balancer, connection pool, outlier detection)
//!   becomes the service's [`pb::DestinationPolicy`]; a subset's own traffic policy overrides it
//!   field by field, as Istio merges them.
//!
//! Hosts resolve like Istio's: `name` in the object's namespace, `name.namespace`, or the full
//! `name.namespace.svc.<suffix>`; hosts that name no service are skipped.

use std::collections::BTreeMap;

use proto::api::ambient::waypoint::v1 as pb;

use crate::k8s::{self, ClientTlsSettings, StringMatch, TrafficPolicy, VsHeaderOps, VsHttpRoute};
use crate::mesh::Service;
use crate::objects::Objects;
use crate::translate::MeshConfig;
use crate::translate::waypoint::parse_duration;

/// `(namespace, hostname)` of the service a VirtualService or DestinationRule in `namespace`
/// names by `host`: the Kubernetes reading of [`resolve_host`] when such a service exists, else a
/// ServiceEntry host as written (in `namespace` first, then in any namespace, as Istio matches
/// hosts across namespaces): `httpbin.org` is a ServiceEntry's host, never a Service `httpbin`
/// in a namespace `org`.
pub fn service_key(
    services: &BTreeMap<String, Service>,
    host: &str,
    namespace: &str,
    suffix: &str,
) -> (String, String) {
    let resolved = resolve_host(host, namespace, suffix);
    if services.contains_key(&format!("{}/{}", resolved.0, resolved.1)) {
        return resolved;
    }
    let literal = host.trim_end_matches('.');
    if literal.contains('.') {
        if services.contains_key(&format!("{namespace}/{literal}")) {
            return (namespace.to_owned(), literal.to_owned());
        }
        if let Some(s) = services.values().find(|s| s.hostname == literal) {
            return (s.namespace.clone(), literal.to_owned());
        }
    }
    resolved
}

/// `(namespace, hostname)` of a host as written in `namespace`, read as a Kubernetes Service name.
pub fn resolve_host(host: &str, namespace: &str, suffix: &str) -> (String, String) {
    let host = host.trim_end_matches('.');
    let parts: Vec<&str> = host.split('.').collect();
    match parts.as_slice() {
        [name] => (namespace.to_owned(), format!("{name}.{namespace}.svc.{suffix}")),
        [name, ns] => ((*ns).to_owned(), format!("{name}.{ns}.svc.{suffix}")),
        [_, ns, "svc", ..] => ((*ns).to_owned(), host.to_owned()),
        _ => (namespace.to_owned(), host.to_owned()),
    }
}

fn value_match(name: &str, m: &StringMatch) -> pb::ValueMatch {
    let (kind, value) = match (&m.exact, &m.prefix, &m.regex) {
        (Some(v), _, _) => (pb::value_match::Kind::Exact, v.clone()),
        (_, Some(p), _) => (pb::value_match::Kind::Regex, format!("{}.*", regex_syntax::escape(p))),
        (_, _, Some(r)) => (pb::value_match::Kind::Regex, r.clone()),
        _ => (pb::value_match::Kind::Regex, ".*".into()),
    };
    pb::ValueMatch { kind: kind as i32, name: name.to_owned(), value }
}

fn header_modifier(ops: Option<&VsHeaderOps>) -> Option<pb::HeaderModifier> {
    let ops = ops?;
    let headers = |m: &BTreeMap<String, String>| {
        m.iter().map(|(k, v)| pb::Header { name: k.clone(), value: v.clone() }).collect()
    };
    Some(pb::HeaderModifier { set: headers(&ops.set), add: headers(&ops.add), remove: ops.remove.clone() })
}

/// Status codes a `retryOn` list retries on (connection failures are always retried).
fn retry_codes(retry_on: Option<&str>) -> Vec<u32> {
    let mut codes = Vec::new();
    for cond in retry_on.unwrap_or("gateway-error").split(',').map(str::trim) {
        match cond {
            "5xx" => codes.extend(500..=599),
            "gateway-error" => codes.extend([502, 503, 504]),
            "retriable-4xx" => codes.push(409),
            c => codes.extend(c.parse::<u32>().ok()),
        }
    }
    codes.sort_unstable();
    codes.dedup();
    codes
}

/// What resolving a destination needs.
/// Resolves a VirtualService's destinations (services, subsets) against the objects.
pub(crate) struct Resolver<'a> {
    objects: &'a Objects,
    config: &'a MeshConfig,
    services: &'a BTreeMap<String, Service>,
}

impl<'a> Resolver<'a> {
    /// A resolver over `objects`, naming `services`.
    pub(crate) fn new(objects: &'a Objects, config: &'a MeshConfig, services: &'a BTreeMap<String, Service>) -> Self {
        Resolver { objects, config, services }
    }

    /// The uids of the workloads of subset `subset` of the service `(ns, hostname)`.
    fn subset_workloads(&self, ns: &str, hostname: &str, subset: &str) -> Vec<String> {
        let suffix = &self.config.domain_suffix;
        // The rules that may govern the service (see `destination_policies`), its own namespace's first.
        let mut rules: Vec<_> = self
            .objects
            .destination_rules()
            .filter(|dr| {
                let (dr_ns, _) = k8s::ns_name(&dr.metadata);
                (dr_ns == ns || dr_ns == self.config.root_namespace)
                    && service_key(self.services, &dr.spec.host, dr_ns, suffix) == (ns.to_owned(), hostname.to_owned())
            })
            .collect();
        rules.sort_by_key(|dr| k8s::ns_name(&dr.metadata).0 != ns);
        let Some(labels) =
            rules.iter().flat_map(|dr| dr.spec.subsets.iter()).find(|s| s.name == subset).map(|s| &s.labels)
        else {
            return Vec::new();
        };
        let name = hostname.split('.').next().unwrap_or_default();
        let selector = self
            .objects
            .services()
            .find(|s| k8s::ns_name(&s.metadata) == (ns, name))
            .and_then(|s| s.spec.as_ref()?.selector.clone())
            .unwrap_or_default();
        let mut uids: Vec<String> = self
            .objects
            .pods()
            .filter(|p| k8s::ns_name(&p.metadata).0 == ns)
            .filter(|p| {
                k8s::selects(&selector, k8s::labels(&p.metadata)) && k8s::selects(labels, k8s::labels(&p.metadata))
            })
            .map(|p| format!("{}//Pod/{ns}/{}", self.config.cluster_id, k8s::ns_name(&p.metadata).1))
            .collect();
        uids.sort();
        uids
    }

    pub(crate) fn backend(&self, d: &k8s::VsDestination, vs_ns: &str, weight: u32) -> pb::Backend {
        let (ns, host) = service_key(self.services, &d.host, vs_ns, &self.config.domain_suffix);
        let subset = d.subset.clone().unwrap_or_default();
        let workloads = if subset.is_empty() { Vec::new() } else { self.subset_workloads(&ns, &host, &subset) };
        pb::Backend {
            service: format!("{ns}/{host}"),
            port: d.port.as_ref().and_then(|p| p.number).unwrap_or(0),
            weight,
            subset,
            workloads,
        }
    }

    /// One `http` entry of a VirtualService in namespace `vs_ns`, as a route rule.
    pub(crate) fn rule(&self, h: &VsHttpRoute, vs_ns: &str) -> pb::RouteRule {
        let ms = |d: Option<&String>| d.and_then(|d| parse_duration(d).ok()).unwrap_or(0);
        let matches = h
            .matches
            .iter()
            .map(|m| pb::RouteMatch {
                path: m.uri.as_ref().map(|u| match (&u.exact, &u.prefix, &u.regex) {
                    (Some(v), _, _) => pb::PathMatch { kind: pb::path_match::Kind::Exact as i32, value: v.clone() },
                    (_, Some(v), _) => pb::PathMatch {
                        // Istio prefixes are plain string prefixes, not path segments.
                        kind: pb::path_match::Kind::Regex as i32,
                        value: format!("{}.*", regex_syntax::escape(v)),
                    },
                    (_, _, r) => pb::PathMatch {
                        kind: pb::path_match::Kind::Regex as i32,
                        value: r.clone().unwrap_or_else(|| ".*".into()),
                    },
                }),
                headers: m.headers.iter().map(|(n, v)| value_match(n, v)).collect(),
                query_params: m.query_params.iter().map(|(n, v)| value_match(n, v)).collect(),
                method: m.method.as_ref().and_then(|x| x.exact.clone()).unwrap_or_default(),
            })
            .collect();
        // One destination without a weight takes it all; weights otherwise as written.
        let only = h.route.len() == 1;
        let backends = h
            .route
            .iter()
            .map(|r| self.backend(&r.destination, vs_ns, r.weight.unwrap_or(if only { 100 } else { 0 })))
            .collect();
        let mut filters = Vec::new();
        if let Some(m) = header_modifier(h.headers.as_ref().and_then(|x| x.request.as_ref())) {
            filters.push(pb::Filter { kind: Some(pb::filter::Kind::RequestHeaderModifier(m)) });
        }
        if let Some(m) = header_modifier(h.headers.as_ref().and_then(|x| x.response.as_ref())) {
            filters.push(pb::Filter { kind: Some(pb::filter::Kind::ResponseHeaderModifier(m)) });
        }
        if let Some(r) = &h.redirect {
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let n = |k: &str| r.get(k).and_then(serde_json::Value::as_u64).and_then(|v| u32::try_from(v).ok());
            filters.push(pb::Filter {
                kind: Some(pb::filter::Kind::RequestRedirect(pb::Redirect {
                    scheme: s("scheme"),
                    hostname: s("authority"),
                    path: r.get("uri").and_then(|v| v.as_str()).map(|u| pb::PathModifier {
                        kind: Some(pb::path_modifier::Kind::ReplaceFullPath(u.to_owned())),
                    }),
                    port: n("port").unwrap_or(0),
                    status_code: n("redirectCode").unwrap_or(301),
                })),
            });
        }
        if let Some(rw) = &h.rewrite {
            filters.push(pb::Filter {
                kind: Some(pb::filter::Kind::UrlRewrite(pb::Rewrite {
                    hostname: rw.authority.clone().unwrap_or_default(),
                    path: rw.uri.as_ref().map(|u| pb::PathModifier {
                        kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch(u.clone())),
                    }),
                })),
            });
        }
        if let Some(m) = &h.mirror {
            let percent = match (&h.mirror_percentage, h.mirror_percent) {
                (Some(p), _) => Some(p.value.clamp(0.0, 100.0)),
                (None, Some(p)) => Some(f64::from(p.min(100))),
                (None, None) => None,
            };
            filters.push(pb::Filter {
                kind: Some(pb::filter::Kind::RequestMirror(pb::Mirror {
                    backend: Some(self.backend(m, vs_ns, 1)),
                    percent,
                })),
            });
        }
        let percent = |p: &Option<k8s::Percent>| p.as_ref().map_or(100.0, |p| p.value.clamp(0.0, 100.0));
        let fault = h.fault.as_ref().map(|f| pb::Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| pb::Delay { fixed_delay_ms: ms(d.fixed_delay.as_ref()), percent: percent(&d.percentage) }),
            abort: f
                .abort
                .as_ref()
                .map(|a| pb::Abort { http_status: a.http_status.unwrap_or(503), percent: percent(&a.percentage) }),
        });
        pb::RouteRule {
            name: h.name.clone().unwrap_or_default(),
            matches,
            filters,
            backends,
            request_timeout_ms: ms(h.timeout.as_ref()),
            backend_request_timeout_ms: ms(h.retries.as_ref().and_then(|r| r.per_try_timeout.as_ref())),
            retry: h.retries.as_ref().filter(|r| r.attempts.unwrap_or(0) > 0).map(|r| pb::Retry {
                codes: retry_codes(r.retry_on.as_deref()),
                attempts: r.attempts.unwrap_or(0),
                backoff_ms: 25,
            }),
            fault,
        }
    }
}

/// Ordered routes per service (`namespace/hostname`) from the mesh's VirtualServices, and the
/// hosts refused: a VirtualService routes only services of its own namespace at the waypoints (a
/// producer route, as Istio's waypoints take them; another namespace's would let its owner
/// reroute the service).
pub fn virtual_service_routes(
    objects: &Objects,
    config: &MeshConfig,
    services: &BTreeMap<String, Service>,
) -> (BTreeMap<String, pb::ServiceRoutes>, Vec<String>) {
    let mut warnings = Vec::new();
    let resolver = Resolver::new(objects, config, services);
    let mut out: BTreeMap<String, pb::ServiceRoutes> = BTreeMap::new();
    let mut vss: Vec<_> = objects.virtual_services().collect();
    // Oldest-named first, for a stable order when two VirtualServices name one host.
    vss.sort_by(|a, b| k8s::ns_name(&a.metadata).cmp(&k8s::ns_name(&b.metadata)));
    for vs in vss {
        let spec = &vs.spec;
        if !(spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh")) {
            continue;
        }
        let (ns, name) = k8s::ns_name(&vs.metadata);
        let rules: Vec<pb::RouteRule> = spec.http.iter().map(|h| resolver.rule(h, ns)).collect();
        for host in &spec.hosts {
            let (svc_ns, hostname) = service_key(services, host, ns, &config.domain_suffix);
            let key = format!("{svc_ns}/{hostname}");
            let Some(svc) = services.get(&key) else { continue };
            if svc_ns != ns {
                warnings.push(format!(
                    "VirtualService {ns}/{name}: host {host} is a service of namespace {svc_ns}; only VirtualServices in that namespace route it"
                ));
                continue;
            }
            out.entry(key)
                .or_insert_with(|| pb::ServiceRoutes {
                    namespace: svc.namespace.clone(),
                    hostname: svc.hostname.clone(),
                    ..Default::default()
                })
                .routes
                .push(pb::Route {
                    name: format!("{ns}/{name}"),
                    ports: Vec::new(),
                    rules: rules.clone(),
                    ordered: true,
                });
        }
    }
    (out, warnings)
}

/// Destination policies per service (`namespace/hostname`) from the DestinationRules, and a
/// warning for each TLS setting the waypoints will refuse requests for.
pub fn destination_policies(
    objects: &Objects,
    config: &MeshConfig,
    services: &BTreeMap<String, Service>,
) -> (BTreeMap<String, pb::DestinationPolicy>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    // Which rule governs each service: the first (by name) of its own namespace, else of the root
    // namespace. A rule elsewhere is ignored, as Istio ignores it for the service's own proxies:
    // otherwise any namespace could turn off another's TLS verification or limits.
    let mut chosen: BTreeMap<String, (bool, &k8s::DestinationRule)> = BTreeMap::new();
    for dr in objects.destination_rules() {
        let (ns, name) = k8s::ns_name(&dr.metadata);
        let (svc_ns, hostname) = service_key(services, &dr.spec.host, ns, &config.domain_suffix);
        let key = format!("{svc_ns}/{hostname}");
        if !services.contains_key(&key) {
            continue;
        }
        let own = ns == svc_ns;
        if !own && ns != config.root_namespace {
            warnings.push(format!(
                "DestinationRule {ns}/{name}: host {} is a service of namespace {svc_ns}; only rules in {svc_ns} or {} apply to it",
                dr.spec.host, config.root_namespace
            ));
            continue;
        }
        match chosen.get(&key) {
            Some((true, _)) => {}
            Some((false, _)) if !own => {}
            _ => {
                chosen.insert(key, (own, dr));
            }
        }
    }
    for (key, (_, dr)) in chosen {
        let (ns, name) = k8s::ns_name(&dr.metadata);
        let (svc_ns, hostname) = key.split_once('/').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap_or_default();
        let policy = dr.spec.traffic_policy.clone().unwrap_or_default();
        let name = format!("{ns}/{name}");
        let tls = |t: &ClientTlsSettings| upstream_tls(t, objects, ns, &name);
        let mut converted = destination_policy(&policy, &svc_ns, &hostname, &name, &tls);
        for subset in &dr.spec.subsets {
            let Some(own) = &subset.traffic_policy else { continue };
            let merged = TrafficPolicy {
                load_balancer: own.load_balancer.clone().or_else(|| policy.load_balancer.clone()),
                connection_pool: own.connection_pool.clone().or_else(|| policy.connection_pool.clone()),
                outlier_detection: own.outlier_detection.clone().or_else(|| policy.outlier_detection.clone()),
                tls: own.tls.clone().or_else(|| policy.tls.clone()),
                port_level_settings: if own.port_level_settings.is_empty() {
                    policy.port_level_settings.clone()
                } else {
                    own.port_level_settings.clone()
                },
            };
            converted.subsets.insert(subset.name.clone(), destination_policy(&merged, &svc_ns, &hostname, &name, &tls));
        }
        out.insert(key, converted);
    }
    let refusals: std::collections::BTreeSet<String> = out
        .values()
        .flat_map(|p| std::iter::once(p).chain(p.subsets.values()))
        .flat_map(|p| p.tls.iter().chain(p.port_tls.values()))
        .filter(|t| !t.refusal.is_empty())
        .map(|t| format!("{}; requests to its destination are refused", t.refusal))
        .collect();
    warnings.extend(refusals);
    (out, warnings)
}

/// A DestinationRule's `tls` in the waypoint's form; `None` when no TLS is originated. The roots
/// of `credentialName` are looked up here (the rule's namespace, the Secret's `ca.crt`) and sent
/// inline: they are public. What the waypoint cannot carry out (MUTUAL, a missing Secret) becomes
/// a refusal: requests are refused rather than sent without the TLS the rule asks for.
fn upstream_tls(t: &ClientTlsSettings, objects: &Objects, namespace: &str, rule: &str) -> Option<pb::UpstreamTls> {
    let refuse =
        |why: String| Some(pb::UpstreamTls { refusal: format!("DestinationRule {rule}: {why}"), ..Default::default() });
    match t.mode.as_deref().map(str::to_ascii_uppercase).as_deref() {
        // Mesh traffic is mutual TLS (HBONE) already; a destination outside the mesh has no
        // Istio identity to present one to.
        None | Some("DISABLE" | "ISTIO_MUTUAL") => return None,
        Some("SIMPLE") => {}
        Some(other) => return refuse(format!("tls.mode {other} is not supported (only SIMPLE is)")),
    }
    let ca_certificates = match t.credential_name.as_deref() {
        None => String::new(),
        Some(secret) => match objects.secret(namespace, secret) {
            Some(s) => match crate::k8s::secret_value(s, "ca.crt").and_then(|pem| String::from_utf8(pem).ok()) {
                Some(pem) => pem,
                None => return refuse(format!("Secret {namespace}/{secret} has no ca.crt")),
            },
            None => return refuse(format!("Secret {namespace}/{secret} (type kubernetes.io/tls) is not found")),
        },
    };
    Some(pb::UpstreamTls {
        sni: t.sni.clone().unwrap_or_default(),
        subject_alt_names: t.subject_alt_names.clone(),
        ca_certificates,
        ca_certificates_file: t.ca_certificates.clone().unwrap_or_default(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        refusal: String::new(),
    })
}

/// One traffic policy in the waypoint's form.
fn destination_policy(
    policy: &TrafficPolicy,
    namespace: &str,
    hostname: &str,
    name: &str,
    tls: &dyn Fn(&ClientTlsSettings) -> Option<pb::UpstreamTls>,
) -> pb::DestinationPolicy {
    let load_balancer = match policy.load_balancer.as_ref().and_then(|l| l.simple.as_deref()) {
        Some("LEAST_REQUEST" | "LEAST_CONN") => pb::destination_policy::LoadBalancer::LeastRequest,
        Some("RANDOM") => pb::destination_policy::LoadBalancer::Random,
        _ => pb::destination_policy::LoadBalancer::RoundRobin,
    };
    let pool = policy.connection_pool.as_ref();
    let http = pool.and_then(|p| p.http.as_ref());
    let connection_pool = pool.map(|p| pb::ConnectionPool {
        max_connections: p.tcp.as_ref().and_then(|t| t.max_connections).unwrap_or(0),
        max_pending_requests: http.and_then(|h| h.http1_max_pending_requests).unwrap_or(0),
        max_requests_per_connection: http.and_then(|h| h.max_requests_per_connection).unwrap_or(0),
        max_requests: http.and_then(|h| h.http2_max_requests).unwrap_or(0),
    });
    let outlier_detection = policy.outlier_detection.as_ref().map(|o| {
        let ms =
            |d: &Option<String>, default: u64| d.as_deref().and_then(|d| parse_duration(d).ok()).unwrap_or(default);
        let (consecutive_errors, gateway_errors_only) = match (o.consecutive_5xx_errors, o.consecutive_gateway_errors) {
            (Some(n), _) if n > 0 => (n, false),
            (_, Some(n)) if n > 0 => (n, true),
            (Some(0), _) => (0, false),
            _ => (5, false),
        };
        pb::OutlierDetection {
            consecutive_errors,
            gateway_errors_only,
            base_ejection_ms: ms(&o.base_ejection_time, 30_000),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
        }
    });
    pb::DestinationPolicy {
        namespace: namespace.to_owned(),
        hostname: hostname.to_owned(),
        name: name.to_owned(),
        load_balancer: load_balancer as i32,
        connection_pool,
        outlier_detection,
        subsets: Default::default(),
        tls: policy.tls.as_ref().and_then(tls),
        port_tls: policy
            .port_level_settings
            .iter()
            .filter_map(|p| Some((p.port.as_ref()?.number?, tls(p.tls.as_ref()?)?)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve_like_istio() {
        let r = |h| resolve_host(h, "demo", "cluster.local");
        assert_eq!(r("hello"), ("demo".into(), "hello.demo.svc.cluster.local".into()));
        assert_eq!(r("hello.shop"), ("shop".into(), "hello.shop.svc.cluster.local".into()));
        assert_eq!(r("hello.shop.svc.cluster.local"), ("shop".into(), "hello.shop.svc.cluster.local".into()));
    }

    #[test]
    fn retry_conditions_become_codes() {
        assert_eq!(retry_codes(Some("gateway-error,connect-failure")), vec![502, 503, 504]);
        assert_eq!(retry_codes(Some("5xx")).len(), 100);
        assert_eq!(retry_codes(Some("429, 503")), vec![429, 503]);
    }
}
