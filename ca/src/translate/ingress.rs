//! Istio `Gateway`s (networking.istio.io) → the ingress gateways: their servers, and the routes of
//! the VirtualServices bound to them.
//!
//! - A VirtualService is bound to a Gateway it names in `gateways:`, as `<namespace>/<name>` or as
//!   a bare name in the VirtualService's own namespace (`mesh` stands for the mesh, not a
//!   gateway). A name that matches no Gateway binds nothing and is reported.
//! - Of its hosts, a gateway serves those a server's hosts admit (`*`, `*.<domain>`, a name;
//!   case does not matter); a wildcard host of the VirtualService takes the server hosts it
//!   covers instead. A server host's `<namespace>/` part limits whose VirtualServices bind there:
//!   `*` anyone's, `.` those in the Gateway's namespace, else that namespace's.
//! - A short host (no dot) is the service of that name in the VirtualService's namespace, as
//!   Istio expands it before matching.
//! - The rules carry over as for the mesh ([`super::istio`]): matches, weighted destinations with
//!   subsets, faults, timeouts, retries, header changes, redirects, rewrites, mirrors.

use std::collections::{BTreeMap, BTreeSet};

use proto::api::ambient::waypoint::v1 as pb;

use crate::k8s::{self, GatewayServer, IstioGateway};
use crate::mesh::{ServedCredential, Service};
use crate::objects::Objects;
use crate::translate::MeshConfig;
use crate::translate::istio::Resolver;

/// The ingress gateways by `namespace/name`, and what could not be bound (for the state's
/// warnings).
pub fn ingress_gateways(
    objects: &Objects,
    config: &MeshConfig,
    services: &BTreeMap<String, Service>,
) -> (BTreeMap<String, pb::IngressGateway>, Vec<String>) {
    let mut warnings = Vec::new();
    let by_key: BTreeMap<String, &IstioGateway> = objects
        .istio_gateways()
        .map(|g| {
            let (ns, name) = k8s::ns_name(&g.metadata);
            (format!("{ns}/{name}"), &**g)
        })
        .collect();
    let mut out: BTreeMap<String, pb::IngressGateway> = by_key.iter().map(|(k, g)| (k.clone(), gateway(g))).collect();
    let resolver = Resolver::new(objects, config, services);
    let mut vss: Vec<_> = objects.virtual_services().collect();
    vss.sort_by(|a, b| k8s::ns_name(&a.metadata).cmp(&k8s::ns_name(&b.metadata)));
    for vs in vss {
        let (vs_ns, vs_name) = k8s::ns_name(&vs.metadata);
        for reference in vs.spec.gateways.iter().filter(|g| *g != "mesh") {
            let key = if reference.contains('/') { reference.clone() } else { format!("{vs_ns}/{reference}") };
            let (Some(gw), Some(bound)) = (by_key.get(&key), out.get_mut(&key)) else {
                warnings.push(format!("VirtualService {vs_ns}/{vs_name}: gateway {key} does not exist"));
                continue;
            };
            let gw_ns = k8s::ns_name(&gw.metadata).0;
            let hosts: Vec<String> =
                vs.spec.hosts.iter().map(|h| expand_short_host(h, vs_ns, &config.domain_suffix)).collect();
            let (served, ports) = bind(&gw.spec.servers, gw_ns, vs_ns, &hosts);
            if served.is_empty() {
                warnings.push(format!(
                    "VirtualService {vs_ns}/{vs_name}: none of its hosts is served by gateway {key}'s servers"
                ));
                continue;
            }
            let route = pb::Route {
                name: format!("{vs_ns}/{vs_name}"),
                ports: Vec::new(),
                rules: vs.spec.http.iter().map(|h| resolver.rule(h, vs_ns)).collect(),
                ordered: true,
            };
            let tls_rules = vs
                .spec
                .tls
                .iter()
                .flat_map(|t| {
                    let only = t.route.len() == 1;
                    let backends: Vec<pb::Backend> = t
                        .route
                        .iter()
                        .map(|r| {
                            resolver.backend(&r.destination, vs_ns, r.weight.unwrap_or(if only { 100 } else { 0 }))
                        })
                        .collect();
                    t.matches.iter().map(move |m| pb::TlsRule {
                        sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                        port: m.port.unwrap_or(0),
                        backends: backends.clone(),
                    })
                })
                .collect();
            bound.routes.push(pb::GatewayRoute {
                hosts: served.into_iter().collect(),
                ports: ports.into_iter().collect(),
                route: Some(route),
                tls_rules,
            });
        }
    }
    (out, warnings)
}

/// The Gateway API class Istio serves ingress with (its automated deployments' pods carry
/// `gateway.networking.k8s.io/gateway-name: <name>`).
pub const ISTIO_GATEWAY_CLASS: &str = "istio";

/// Gateway API Gateways of class `istio`, as ingress gateways: each listener is a server (its
/// `hostname`, or `*`; HTTPS `Terminate` with its first `certificateRefs` Secret), served by the
/// pods labelled `gateway.networking.k8s.io/gateway-name: <name>`; the HTTPRoutes whose
/// `parentRefs` name it (and the listener, by `sectionName` or `port`) and that the listener's
/// `allowedRoutes` admit are bound to it, for the route's hostnames the listener serves. Keyed
/// `gateway.networking.k8s.io/<namespace>/<name>`, apart from Istio Gateways of the same name.
pub fn gateway_api_gateways(
    objects: &Objects,
    config: &MeshConfig,
) -> (BTreeMap<String, pb::IngressGateway>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    let namespace_labels: BTreeMap<&str, &BTreeMap<String, String>> = objects
        .namespaces()
        .map(|n| (n.metadata.name.as_deref().unwrap_or_default(), k8s::labels(&n.metadata)))
        .collect();
    for gw in objects.gateways().filter(|g| g.spec.gateway_class_name == ISTIO_GATEWAY_CLASS) {
        let (gw_ns, gw_name) = k8s::ns_name(&gw.metadata);
        let key = format!("gateway.networking.k8s.io/{gw_ns}/{gw_name}");
        let mut servers = Vec::new();
        for l in &gw.spec.listeners {
            let (protocol, tls) = match (l.protocol.as_str(), l.tls.as_ref()) {
                ("HTTP", _) => (pb::gateway_server::Protocol::Http, None),
                ("HTTPS", Some(t)) if t.mode.as_deref().unwrap_or("Terminate") == "Terminate" => {
                    let secret = t.certificate_refs.first().filter(|r| {
                        r.kind.as_deref().unwrap_or("Secret") == "Secret"
                            && r.namespace.as_deref().is_none_or(|n| n == gw_ns)
                    });
                    let Some(secret) = secret else {
                        warnings.push(format!(
                            "Gateway {gw_ns}/{gw_name} listener {}: HTTPS needs a certificateRefs Secret in its own namespace",
                            l.name
                        ));
                        continue;
                    };
                    let tls = pb::GatewayTls {
                        mode: pb::gateway_tls::Mode::Simple as i32,
                        credential_name: secret.name.clone(),
                        ..Default::default()
                    };
                    (pb::gateway_server::Protocol::Https, Some(tls))
                }
                (other, _) => {
                    warnings.push(format!(
                        "Gateway {gw_ns}/{gw_name} listener {}: protocol {other} is not served by ingress gateways",
                        l.name
                    ));
                    continue;
                }
            };
            servers.push(pb::GatewayServer {
                port: u32::from(l.port),
                protocol: protocol as i32,
                hosts: vec![l.hostname.clone().unwrap_or_else(|| "*".into()).to_ascii_lowercase()],
                tls,
                name: l.name.clone(),
            });
        }
        let admits_namespace = |l: &k8s::GatewayListener, route_ns: &str| {
            let from = l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref());
            match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
                "All" => true,
                "Selector" => {
                    let selector = from.and_then(|f| f.selector.as_ref());
                    let wanted = selector.and_then(|s| s.match_labels.clone()).unwrap_or_default();
                    let expressions =
                        selector.is_some_and(|s| s.match_expressions.as_ref().is_some_and(|e| !e.is_empty()));
                    !expressions && namespace_labels.get(route_ns).is_some_and(|labels| k8s::selects(&wanted, labels))
                }
                _ => route_ns == gw_ns,
            }
        };
        let mut routes = Vec::new();
        let mut http_routes: Vec<_> = objects.http_routes().collect();
        http_routes.sort_by(|a, b| k8s::ns_name(&a.metadata).cmp(&k8s::ns_name(&b.metadata)));
        for route in http_routes {
            let (route_ns, route_name) = k8s::ns_name(&route.metadata);
            for parent in route.spec.parent_refs.iter().filter(|p| super::waypoint::is_gateway(p)) {
                if parent.name != gw_name || parent.namespace.as_deref().unwrap_or(route_ns) != gw_ns {
                    continue;
                }
                let listeners: Vec<&k8s::GatewayListener> = gw
                    .spec
                    .listeners
                    .iter()
                    .filter(|l| parent.section_name.as_ref().is_none_or(|s| *s == l.name))
                    .filter(|l| parent.port.is_none_or(|p| p == l.port))
                    .filter(|l| admits_namespace(l, route_ns))
                    .filter(|l| servers.iter().any(|s| s.name == l.name))
                    .collect();
                if listeners.is_empty() {
                    warnings.push(format!(
                        "HTTPRoute {route_ns}/{route_name}: no listener of Gateway {gw_ns}/{gw_name} it names admits it"
                    ));
                    continue;
                }
                let mut hosts = BTreeSet::new();
                let mut ports = BTreeSet::new();
                for l in listeners {
                    let listener_host = l.hostname.clone().unwrap_or_else(|| "*".into()).to_ascii_lowercase();
                    let route_hosts: Vec<String> = if route.spec.hostnames.is_empty() {
                        vec![listener_host.clone()]
                    } else {
                        route.spec.hostnames.iter().map(|h| h.to_ascii_lowercase()).collect()
                    };
                    for h in route_hosts {
                        // The narrower of the two, when one admits the other.
                        let served = if proto::host::admits(&listener_host, &h) {
                            Some(h)
                        } else if proto::host::admits(&h, &listener_host) {
                            Some(listener_host.clone())
                        } else {
                            None
                        };
                        if let Some(h) = served {
                            hosts.insert(h);
                            ports.insert(u32::from(l.port));
                        }
                    }
                }
                if hosts.is_empty() {
                    warnings.push(format!(
                        "HTTPRoute {route_ns}/{route_name}: none of its hostnames is served by Gateway {gw_ns}/{gw_name}"
                    ));
                    continue;
                }
                let rules = route.spec.rules.iter().map(|r| super::waypoint::rule(r, route_ns, &config.domain_suffix));
                routes.push(pb::GatewayRoute {
                    hosts: hosts.into_iter().collect(),
                    ports: ports.into_iter().collect(),
                    route: Some(pb::Route {
                        name: format!("{route_ns}/{route_name}"),
                        ports: Vec::new(),
                        rules: rules.collect(),
                        ordered: false,
                    }),
                    tls_rules: Vec::new(),
                });
            }
        }
        out.insert(
            key,
            pb::IngressGateway {
                namespace: gw_ns.to_owned(),
                name: gw_name.to_owned(),
                selector: [(GATEWAY_NAME_LABEL.to_owned(), gw_name.to_owned())].into_iter().collect(),
                servers,
                routes,
            },
        );
    }
    (out, warnings)
}

/// The label Istio's automated gateway deployments put on their pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// The TLS credentials the Gateways' servers name (`tls.credentialName`), each read from the
/// Secret of that name in the namespace of every gateway pod the Gateway selects, and served to
/// those pods' service accounts only. A Secret that is missing is reported (the gateway then
/// refuses handshakes for that server).
pub fn gateway_credentials(
    objects: &Objects,
    gateways: &BTreeMap<String, pb::IngressGateway>,
    config: &MeshConfig,
) -> (BTreeMap<String, ServedCredential>, Vec<String>) {
    let mut out: BTreeMap<String, ServedCredential> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (key, g) in gateways {
        let selector: BTreeMap<String, String> = g.selector.clone().into_iter().collect();
        let pods: Vec<_> = objects.pods().filter(|p| k8s::selects(&selector, k8s::labels(&p.metadata))).collect();
        let names: BTreeSet<&str> = g
            .servers
            .iter()
            .filter_map(|s| s.tls.as_ref())
            .filter(|t| matches!(t.mode(), pb::gateway_tls::Mode::Simple | pb::gateway_tls::Mode::Mutual))
            .map(|t| t.credential_name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        for name in names {
            for pod in &pods {
                let (ns, _) = k8s::ns_name(&pod.metadata);
                let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).filter(|s| !s.is_empty());
                let reader = format!("spiffe://{}/ns/{ns}/sa/{}", config.trust_domain, sa.unwrap_or("default"));
                let Some(secret) = objects.secret(ns, name) else {
                    warnings.push(format!("Gateway {key}: credentialName {name}: no TLS Secret {ns}/{name} (the namespace of its gateway pods)"));
                    continue;
                };
                let value = |k: &str| {
                    k8s::secret_value(secret, k).map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default()
                };
                let entry = out.entry(format!("{ns}/{name}")).or_insert_with(|| ServedCredential {
                    credential: pb::GatewayCredential {
                        namespace: ns.to_owned(),
                        name: name.to_owned(),
                        cert_chain: value("tls.crt"),
                        private_key: value("tls.key"),
                        ca_certificates: value("ca.crt"),
                    },
                    readers: BTreeSet::new(),
                });
                entry.readers.insert(reader);
            }
        }
    }
    warnings.sort();
    warnings.dedup();
    (out, warnings)
}

fn gateway(g: &IstioGateway) -> pb::IngressGateway {
    let (ns, name) = k8s::ns_name(&g.metadata);
    pb::IngressGateway {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        selector: g.spec.selector.clone().into_iter().collect(),
        servers: g.spec.servers.iter().map(server).collect(),
        routes: Vec::new(),
    }
}

fn server(s: &GatewayServer) -> pb::GatewayServer {
    // Unknown names are refused by validation; a proxy that met one would serve nothing there.
    let protocol = s.port.protocol().unwrap_or(k8s::GatewayProtocol::Unspecified);
    let tls = s.tls.as_ref().map(|t| pb::GatewayTls {
        mode: t.mode().unwrap_or(k8s::GatewayTlsMode::None) as i32,
        https_redirect: t.https_redirect,
        credential_name: t.credential_name.clone().unwrap_or_default(),
        subject_alt_names: t.subject_alt_names.clone(),
    });
    pb::GatewayServer {
        port: s.port.number,
        protocol: protocol as i32,
        hosts: s.hosts.iter().map(|h| k8s::split_server_host(h).1.to_ascii_lowercase()).collect(),
        tls,
        name: s.name.clone().unwrap_or_else(|| s.port.name.clone()),
    }
}

/// `name` → `name.<namespace>.svc.<suffix>`; hosts with a dot and wildcards stay as written.
fn expand_short_host(host: &str, namespace: &str, suffix: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.contains('.') || host == "*" { host } else { format!("{host}.{namespace}.svc.{suffix}") }
}

/// The request hosts and server ports at which the VirtualService (hosts `hosts`, namespace
/// `vs_ns`) binds to servers of a Gateway in `gw_ns`.
fn bind(servers: &[GatewayServer], gw_ns: &str, vs_ns: &str, hosts: &[String]) -> (BTreeSet<String>, BTreeSet<u32>) {
    let mut served = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for s in servers {
        for written in &s.hosts {
            let (ns, pattern) = k8s::split_server_host(written);
            let namespace_ok = match ns {
                "*" => true,
                "." => vs_ns == gw_ns,
                ns => vs_ns == ns,
            };
            if !namespace_ok {
                continue;
            }
            let pattern = pattern.to_ascii_lowercase();
            for host in hosts {
                let bound = if proto::host::admits(&pattern, host) {
                    Some(host.clone())
                } else if proto::host::admits(host, &pattern) {
                    Some(pattern.clone())
                } else {
                    None
                };
                if let Some(h) = bound {
                    served.insert(h);
                    ports.insert(s.port.number);
                }
            }
        }
    }
    (served, ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(port: u32, hosts: &[&str]) -> GatewayServer {
        GatewayServer {
            port: k8s::GatewayPort { number: port, protocol: "HTTP".into(), name: "http".into() },
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        }
    }

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn a_virtual_service_binds_where_a_server_admits_its_hosts() {
        let servers = [server(80, &["xingren.upup"]), server(8080, &["*.shop.example"])];
        // The tutorial: of `hello` (a service) and `xingren.upup`, the gateway serves the latter.
        let vs = hosts(&["hello.default.svc.cluster.local", "xingren.upup"]);
        let (served, ports) = bind(&servers, "default", "default", &vs);
        assert_eq!(served.into_iter().collect::<Vec<_>>(), ["xingren.upup"]);
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), [80]);
        // A wildcard server admits names under it, not the bare domain.
        let (served, _) = bind(&servers, "default", "default", &hosts(&["a.shop.example", "shop.example"]));
        assert_eq!(served.into_iter().collect::<Vec<_>>(), ["a.shop.example"]);
        // A wildcard VirtualService takes the server hosts it covers.
        let (served, _) = bind(&servers, "default", "default", &hosts(&["*.upup"]));
        assert_eq!(served.into_iter().collect::<Vec<_>>(), ["xingren.upup"]);
        assert!(bind(&servers, "default", "default", &hosts(&["other.host"])).0.is_empty());
    }

    #[test]
    fn a_server_hosts_namespace_limits_who_binds() {
        let servers = [server(80, &["./own.example", "team-a/a.example", "*/any.example"])];
        let served = |vs_ns: &str, host: &str| !bind(&servers, "edge", vs_ns, &hosts(&[host])).0.is_empty();
        assert!(served("edge", "own.example"));
        assert!(!served("team-a", "own.example"), "`.` is the Gateway's namespace only");
        assert!(served("team-a", "a.example"));
        assert!(!served("team-b", "a.example"));
        assert!(served("team-b", "any.example"));
    }

    #[test]
    fn short_hosts_expand_in_the_virtual_services_namespace() {
        assert_eq!(expand_short_host("hello", "default", "cluster.local"), "hello.default.svc.cluster.local");
        assert_eq!(expand_short_host("Xingren.UPUP.", "default", "cluster.local"), "xingren.upup");
        assert_eq!(expand_short_host("*", "default", "cluster.local"), "*");
    }
}
