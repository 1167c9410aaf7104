//! Golden tests: a fixture directory of Kubernetes YAML → the exact xDS resources ztunnel
//! receives (`istio.workload.Address` and `istio.security.Authorization`).
//!
//! The expected output is `fixtures/<case>/expected.txt`, one block per resource (name, aliases,
//! decoded message). After a deliberate change, regenerate with `UPDATE_GOLDEN=1 cargo test -p ca
//! --test integration golden::` (that run always fails, naming each file it rewrote), review the diff like code,
//! and run again without it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write;
use std::path::Path;

use ca::objects::Store;
use ca::source::dir::DirSource;
use ca::translate::{MeshConfig, translate};
use ca::xds::Resources;
use prost::Message;
use proto::api::ambient::waypoint::v1::{
    DestinationPolicy, IngressGateway, L7Policy, MeshSettings, RequestAuthn, ServiceRoutes, Telemetry,
};
use proto::api::istio::security::Authorization;
use proto::api::istio::workload::Address;
use proto::api::type_url;

fn render(case: &str) -> (String, Vec<ca::objects::ConfigError>, Vec<String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case).join("input");
    let store = Store::new();
    let mut source = DirSource::new(&dir, store.clone()).unwrap();
    assert!(source.rescan());
    let state = translate(&store.snapshot(), &MeshConfig::default());
    let resources = Resources::build(&state, None, 1, &Resources::default(), ca::xds::ServedTypes::All);
    let mut out = String::new();
    let types = [
        (type_url::ADDRESS, "Address"),
        (type_url::AUTHORIZATION, "Authorization"),
        (type_url::SERVICE_ROUTES, "ServiceRoutes"),
        (type_url::L7_POLICY, "L7Policy"),
        (type_url::REQUEST_AUTHN, "RequestAuthn"),
        (type_url::DESTINATION_POLICY, "DestinationPolicy"),
        (type_url::INGRESS_GATEWAY, "IngressGateway"),
        (type_url::MESH_SETTINGS, "MeshSettings"),
        (type_url::TELEMETRY, "Telemetry"),
    ];
    for (url, label) in types {
        for (name, r) in &resources.of_type(url).unwrap().by_name {
            assert_eq!(r.body.type_url, url);
            writeln!(out, "=== {label} {name}").unwrap();
            if !r.aliases.is_empty() {
                writeln!(out, "aliases: {:?}", r.aliases).unwrap();
            }
            let bytes = r.body.value.as_slice();
            let body = match url {
                type_url::ADDRESS => format!("{:#?}", Address::decode(bytes).unwrap()),
                type_url::AUTHORIZATION => format!("{:#?}", Authorization::decode(bytes).unwrap()),
                type_url::SERVICE_ROUTES => format!("{:#?}", ServiceRoutes::decode(bytes).unwrap()),
                type_url::L7_POLICY => format!("{:#?}", L7Policy::decode(bytes).unwrap()),
                type_url::REQUEST_AUTHN => format!("{:#?}", RequestAuthn::decode(bytes).unwrap()),
                type_url::DESTINATION_POLICY => format!("{:#?}", DestinationPolicy::decode(bytes).unwrap()),
                type_url::MESH_SETTINGS => format!("{:#?}", MeshSettings::decode(bytes).unwrap()),
                type_url::TELEMETRY => format!("{:#?}", Telemetry::decode(bytes).unwrap()),
                _ => format!("{:#?}", IngressGateway::decode(bytes).unwrap()),
            };
            writeln!(out, "{body}").unwrap();
        }
    }
    // Objects the translation made fail closed are part of the expected output.
    for e in &state.config_errors {
        writeln!(out, "=== config error {}\n{}", e.source, e.message).unwrap();
    }
    (out, store.errors(), state.warnings)
}

fn check(case: &str) {
    let (actual, errors, warnings) = render(case);
    assert!(errors.is_empty(), "fixture {case} has config errors: {errors:#?}");
    assert!(case == "failclosed" || !actual.contains("=== config error"), "fixture {case}: {actual}");
    assert!(warnings.is_empty(), "fixture {case} has warnings: {warnings:#?}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case).join("expected.txt");
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        // Never a pass: a regenerating run must not be mistaken for a checking one.
        if actual == expected {
            panic!("{case}: UPDATE_GOLDEN is set; {} is already up to date (run without it to check)", path.display());
        }
        std::fs::write(&path, &actual).unwrap();
        panic!("{case}: UPDATE_GOLDEN is set; rewrote {} — review the diff, then run without it", path.display());
    }
    if actual != expected {
        let first = actual.lines().zip(expected.lines()).position(|(a, e)| a != e);
        panic!(
            "{case}: resources differ from {} (first differing line: {:?}).\n--- actual ---\n{actual}",
            path.display(),
            first.map(|i| i + 1)
        );
    }
}

#[test]
fn mesh_fixture_yields_the_expected_resources() {
    check("mesh");
}

/// VirtualService + DestinationRule: ordered routes, subsets resolved to the service's pods with
/// the subset's labels, faults, timeouts, retries, header changes, the destination policy.
#[test]
fn istio_fixture_yields_the_expected_resources() {
    check("istio");
}

/// The tutorial's Gateway, VirtualService and DestinationRule, unedited: an ingress gateway for
/// `xingren.upup` on port 80 whose one route is the VirtualService's (the `version: new` header
/// rule with its delay and timeout, then 70/30 over the subsets, resolved to the pods), no mesh
/// routes for `hello` (the VirtualService names only the gateway), and the circuit breaker.
#[test]
fn tutorial_fixture_yields_the_expected_resources() {
    check("tutorial");
}

/// AuthorizationPolicies the mesh cannot take as written fail closed, each reported with its
/// name: serviceAccounts is enforced (not dropped), a typo or a bad value drops an ALLOW rule and
/// makes a DENY rule match everything, an unreadable spec or unknown action denies, dry-run is
/// carried to the proxies, and the waypoint's policies get the same treatment.
#[test]
fn failclosed_fixture_yields_the_expected_resources() {
    check("failclosed");
}

/// A Gateway API Gateway of class `istio` as an ingress gateway: its listeners as servers (the
/// HTTPS one with its certificateRefs Secret, sent to the service account of the pod labelled with
/// the Gateway's name), the HTTPRoutes that name it bound where the listeners admit them (by
/// section name; by allowedRoutes: a namespace selector, All), for the hostnames both serve.
#[test]
fn gateway_api_fixture_yields_the_expected_resources() {
    check("gateway-api");
}

/// Routes from a namespace a listener does not admit do not attach to it: a route from namespace
/// `other` (not labelled team=shop) gets the HTTPS listener (from: All) only, and one naming the
/// HTTP listener by section is refused with a warning that says why.
/// ServiceEntries as services and workloads, as Istio's ambient control plane sends them: STATIC
/// endpoints at their IPs (an endpoint's own port by name), DNS endpoints (or, with none, the host)
/// as workloads with a hostname, an address allocated in 240.240.0.0/16 when none is given,
/// NONE as a passthrough service, a workloadSelector making a pod the endpoint; the root
/// namespace's `istio` ConfigMap as the mesh settings (REGISTRY_ONLY).
#[test]
fn egress_fixture_yields_the_expected_resources() {
    check("egress");
}

/// The Telemetry API: mesh-wide, namespace and Gateway scopes, the provider resolved from the
/// mesh config's `extensionProviders`.
#[test]
fn telemetry_fixture_yields_the_expected_resources() {
    check("telemetry");
}

/// What the waypoints cannot carry out of a Telemetry is reported and left out, never half
/// applied: a selector (sidecars'), a target that is not a Gateway, a provider that is not an
/// OpenTelemetry one or is not defined; a percentage out of range refuses the object.
#[test]
fn telemetry_the_waypoints_cannot_carry_out_is_reported_and_left_out() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/telemetry/input");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("telemetry.yaml"), dir.path().join("telemetry.yaml")).unwrap();
    let telemetry = |name: &str, spec: &str| {
        format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: {name}, namespace: web}}\nspec:\n{spec}\n---\n"
        )
    };
    let yaml =
        telemetry("by-selector", "  selector: {matchLabels: {app: web}}\n  tracing: [{randomSamplingPercentage: 5}]")
            + &telemetry(
                "by-service",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n  tracing: [{randomSamplingPercentage: 5}]",
            )
            + &telemetry("to-a-log", "  tracing: [{providers: [{name: file-log}]}]")
            + &telemetry(
                "to-nowhere",
                "  tracing: [{providers: [{name: zipkin}], customTags: {a: {literal: {value: b}}}}]",
            )
            + &telemetry("too-much", "  tracing: [{randomSamplingPercentage: 150}]");
    std::fs::write(dir.path().join("more.yaml"), yaml).unwrap();
    let store = Store::new();
    let mut source = DirSource::new(dir.path(), store.clone()).unwrap();
    assert!(source.rescan());
    let state = translate(&store.snapshot(), &MeshConfig::default());

    let errors: Vec<String> = store.errors().iter().map(|e| format!("{}: {}", e.source, e.message)).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("tracing[0].randomSamplingPercentage 150 is not between 0 and 100"), "{errors:#?}");
    assert_eq!(
        state.warnings,
        [
            "Telemetry web/by-selector: selector names sidecars and node proxies; waypoints and gateways are named by targetRefs (left out)",
            "Telemetry web/by-service: targetRefs /Service web is not a Gateway; only waypoints and gateways read Telemetry here",
            "Telemetry web/to-a-log: provider \"file-log\" is of kind envoyFileAccessLog; spans go to opentelemetry providers only",
            "Telemetry web/to-nowhere: tracing[0].customTags is not read",
            "Telemetry web/to-nowhere: provider \"zipkin\" is not among the mesh config's extensionProviders",
        ]
    );
    // Neither the selector's nor the Service's: they would otherwise apply to the whole namespace.
    let names: Vec<&String> = state.telemetry.keys().collect();
    assert_eq!(
        names,
        ["istio-system/mesh-default", "shop/quiet-waypoint", "shop/shop-tracing", "web/to-a-log", "web/to-nowhere"]
    );
    assert_eq!(state.telemetry["web/to-nowhere"].tracing.as_ref().unwrap().collector, None);
}

#[test]
fn gateway_api_routes_attach_only_where_allowed_routes_admit_them() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gateway-api/input");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let route = |name: &str, section: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: other}}\nspec:\n  parentRefs: [{{name: edge, namespace: edge{section}}}]\n  hostnames: [api.shop.example]\n  rules:\n  - backendRefs: [{{name: web, namespace: shop, port: 80}}]\n"
        )
    };
    std::fs::write(
        dir.path().join("other.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: other}}\n---\n{}---\n{}",
            route("any-listener", ""),
            route("http-only", ", sectionName: http")
        ),
    )
    .unwrap();
    let store = Store::new();
    let mut source = DirSource::new(dir.path(), store.clone()).unwrap();
    assert!(source.rescan());
    let state = translate(&store.snapshot(), &MeshConfig::default());
    let gateway = &state.ingress_gateways["gateway.networking.k8s.io/edge/edge"];
    let bound: Vec<(&str, &[u32])> = gateway
        .routes
        .iter()
        .map(|r| (r.route.as_ref().unwrap().name.as_str(), r.ports.as_slice()))
        .filter(|(name, _)| name.starts_with("other/"))
        .collect();
    assert_eq!(bound, [("other/any-listener", &[443][..])]);
    assert_eq!(state.warnings, ["HTTPRoute other/http-only: no listener of Gateway edge/edge it names admits it"],);
    // The HTTPS listener's Secret goes to the service account of the Gateway's pod only.
    let credential = &state.gateway_credentials["edge/edge-cert"];
    assert_eq!(credential.readers.iter().collect::<Vec<_>>(), ["spiffe://cluster.local/ns/edge/sa/edge-istio"]);
}

/// A ServiceEntry never takes an address or a name the mesh already uses: a VIP or an endpoint at
/// a pod's IP or a Service's ClusterIP is dropped (else a node proxy would take the pod for a
/// workload outside the mesh and reach it in plaintext), a host that is a Service's hostname is
/// skipped; each is reported. Malformed entries and mesh configurations are refused with reasons.
#[test]
fn service_entries_cannot_take_what_the_mesh_holds_and_bad_ones_are_refused() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/egress/input");
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let entry = |name: &str, spec: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}---\n"
        )
    };
    let tcp = "  ports: [{number: 5432, name: tcp}]\n";
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.30\n  ports: [{port: 80}]\n---\n",
    );
    // Hijacks: the db pod's IP as an endpoint and as a VIP, the web Service's ClusterIP, its name.
    yaml += &entry(
        "steal-pod",
        &format!("  hosts: [steal.example]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.1.50}}]\n{tcp}"),
    );
    yaml += &entry(
        "steal-vip",
        &format!("  hosts: [vip.example]\n  addresses: [10.0.1.50, 10.96.0.30]\n  resolution: NONE\n{tcp}"),
    );
    yaml += &entry("steal-name", &format!("  hosts: [web.shop.svc.cluster.local]\n  resolution: DNS\n{tcp}"));
    // Another entry's address (payments has 192.0.2.100): the first in namespace/name order keeps it.
    yaml +=
        &entry("z-copycat", &format!("  hosts: [copy.example]\n  addresses: [192.0.2.100]\n  resolution: NONE\n{tcp}"));
    // Two hosts, one address: the first host's; the second gets an allocated one.
    yaml += &entry(
        "pair",
        &format!("  hosts: [one.example, two.example]\n  addresses: [198.51.100.9]\n  resolution: DNS\n{tcp}"),
    );
    // Refused outright.
    yaml += &entry("wildcard", &format!("  hosts: ['*.example.com']\n  resolution: DNS\n{tcp}"));
    yaml += &entry("range", &format!("  hosts: [r.example]\n  addresses: [10.9.0.0/16]\n{tcp}"));
    yaml += &entry(
        "static-name",
        &format!("  hosts: [s.example]\n  resolution: STATIC\n  endpoints: [{{address: db.example}}]\n{tcp}"),
    );
    yaml += &entry("no-ports", "  hosts: [p.example]\n  resolution: DNS\n");
    yaml += &entry("odd", &format!("  hosts: [o.example]\n  resolution: MAGIC\n{tcp}"));
    std::fs::write(dir.path().join("hostile.yaml"), yaml).unwrap();
    std::fs::write(
        dir.path().join("mesh-config.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |-\n    outboundTrafficPolicy: {mode: BLOCK_ALL}\n",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("egress.yaml")).unwrap();
    let original = std::fs::read_to_string(fixture.join("egress.yaml")).unwrap();
    // Without its ConfigMap (replaced by the bad one above).
    let without_config: String =
        original.split("---\n").filter(|d| !d.contains("kind: ConfigMap")).collect::<Vec<_>>().join("---\n");
    std::fs::write(dir.path().join("egress.yaml"), without_config).unwrap();

    let store = Store::new();
    let mut source = DirSource::new(dir.path(), store.clone()).unwrap();
    assert!(source.rescan());
    let state = translate(&store.snapshot(), &MeshConfig::default());

    let mut refused: Vec<String> = store.errors().iter().map(|e| e.message.clone()).collect();
    refused.sort();
    let expect = [
        "BLOCK_ALL\" is not ALLOW_ANY or REGISTRY_ONLY",
        "wildcard hosts are not supported",
        "is a range: only single addresses are supported",
        "resolution STATIC needs IP addresses",
        "spec.ports is empty",
        "resolution \"MAGIC\" is not NONE, STATIC, DNS or DNS_ROUND_ROBIN",
    ];
    assert_eq!(refused.len(), expect.len(), "{refused:#?}");
    for e in expect {
        assert!(refused.iter().any(|r| r.contains(e)), "no refusal says {e:?}: {refused:#?}");
    }
    // The refused ConfigMap leaves the defaults.
    assert_eq!(state.settings, ca::mesh::MeshSettings::default());

    assert_eq!(
        state.warnings,
        [
            "ServiceEntry shop/steal-vip: address 10.0.1.50 is pod shop/db-0's; the entry does not take it",
            "ServiceEntry shop/steal-vip: address 10.96.0.30 is service shop/web.shop.svc.cluster.local's; the entry does not take it",
            "ServiceEntry shop/z-copycat: address 192.0.2.100 is ServiceEntry shop/payments's; the entry does not take it",
            "ServiceEntry shop/steal-name: host web.shop.svc.cluster.local is already a service; skipped",
            "ServiceEntry shop/steal-pod: endpoint 10.0.1.50 is pod shop/db-0's; the entry does not take it",
        ]
    );
    assert_eq!(state.services["shop/one.example"].vips, ["198.51.100.9".parse::<std::net::IpAddr>().unwrap()]);
    let second = &state.services["shop/two.example"].vips;
    assert!(second.len() == 1 && second[0].to_string().starts_with("240.240."), "{second:?}");
    // The pod stays a mesh workload, reached over HBONE, and no entry's workload holds its IP.
    let holders: Vec<&str> = state
        .workloads
        .values()
        .filter(|w| w.ips.contains(&"10.0.1.50".parse().unwrap()))
        .map(|w| w.uid.as_str())
        .collect();
    assert_eq!(holders, ["Kubernetes//Pod/shop/db-0"]);
    assert!(state.workloads["Kubernetes//Pod/shop/db-0"].captured);
    assert!(state.services["shop/vip.example"].vips.is_empty());
    // A Service's hostname is not an entry's: the Service keeps it (same key, its own VIP).
    assert_eq!(
        state.services["shop/web.shop.svc.cluster.local"].vips,
        ["10.96.0.30".parse::<std::net::IpAddr>().unwrap()]
    );
}

/// The egress fixture with one more file `name` holding `yaml`: the store (for its refusals) and
/// the translated state.
fn egress_fixture_with(name: &str, yaml: &str) -> (std::sync::Arc<Store>, ca::mesh::MeshState) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/egress/input");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("egress.yaml"), dir.path().join("egress.yaml")).unwrap();
    std::fs::write(dir.path().join(name), yaml).unwrap();
    let store = Store::new();
    let mut source = DirSource::new(dir.path(), store.clone()).unwrap();
    assert!(source.rescan());
    let state = translate(&store.snapshot(), &MeshConfig::default());
    (store, state)
}

/// TLS a DestinationRule asks for that the waypoint cannot originate — MUTUAL, or roots from a
/// Secret that is not there — is carried to the waypoint as a refusal (its requests get 503, never
/// the plaintext the rule tried to rule out) and reported; a mode Istio does not define refuses
/// the rule.
#[test]
fn tls_the_waypoint_cannot_originate_is_a_refusal_not_plaintext() {
    let rule = |name: &str, host: &str, tls: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  host: {host}\n  trafficPolicy:\n    tls: {tls}\n---\n"
        )
    };
    let yaml = rule("mutual", "payments.example.com", "{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}")
        + &rule("no-secret", "legacy.internal", "{mode: SIMPLE, credentialName: missing}")
        + &rule("odd", "db.shop.svc.cluster.local", "{mode: STRICT}")
        + &rule("bad-sni", "db.shop.svc.cluster.local", "{mode: SIMPLE, sni: 'not a name'}");
    let (store, state) = egress_fixture_with("rules.yaml", &yaml);

    let mut refused: Vec<String> = store.errors().iter().map(|e| format!("{}: {}", e.source, e.message)).collect();
    refused.sort();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(
        refused[0].contains("odd is invalid: trafficPolicy.tls.mode \"STRICT\" is not DISABLE, SIMPLE"),
        "{refused:#?}"
    );
    assert!(
        refused[1].contains("bad-sni is invalid: trafficPolicy.tls.sni: \"not a name\" is not a DNS name"),
        "{refused:#?}"
    );
    let refusal = |key: &str| state.destination_policies[key].tls.as_ref().unwrap().refusal.clone();
    assert_eq!(
        refusal("shop/payments.example.com"),
        "DestinationRule shop/mutual: tls.mode MUTUAL is not supported (only SIMPLE is)"
    );
    assert_eq!(
        refusal("shop/legacy.internal"),
        "DestinationRule shop/no-secret: Secret shop/missing (type kubernetes.io/tls) is not found"
    );
    let tls_warnings: Vec<&String> = state.warnings.iter().filter(|w| w.starts_with("DestinationRule")).collect();
    assert_eq!(
        tls_warnings,
        [
            "DestinationRule shop/mutual: tls.mode MUTUAL is not supported (only SIMPLE is); requests to its destination are refused",
            "DestinationRule shop/no-secret: Secret shop/missing (type kubernetes.io/tls) is not found; requests to its destination are refused",
        ]
    );
}

/// A namespace's owner cannot reroute or relax another namespace's services: a VirtualService or
/// an HTTPRoute in namespace `evil` naming shop's Service is not taken (only producer routes, as
/// Istio's waypoints take them), nor is a DestinationRule there for shop's ServiceEntry host (it
/// would turn off TLS verification); each is reported. A rule in the root namespace applies
/// where the service's own namespace has none.
#[test]
fn another_namespace_cannot_reroute_or_relax_a_service() {
    let yaml = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  ports: [{port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hijack, namespace: evil}
spec:
  hosts: [web.shop.svc.cluster.local, payments.example.com]
  http: [{route: [{destination: {host: sink.evil.svc.cluster.local}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hijack, namespace: evil}
spec:
  parentRefs: [{group: '', kind: Service, name: web, namespace: shop}]
  rules: [{backendRefs: [{name: sink, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a-relax, namespace: evil}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy-limits, namespace: istio-system}
spec:
  host: legacy.internal
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 10}}
";
    let (store, state) = egress_fixture_with("tenants.yaml", yaml);
    assert_eq!(store.errors(), []);

    assert!(!state.routes.contains_key("shop/web.shop.svc.cluster.local"), "{:#?}", state.routes);
    assert!(!state.routes.contains_key("shop/payments.example.com"), "{:#?}", state.routes);
    let api = &state.destination_policies["shop/api.example.com"];
    assert_eq!(api.name, "shop/api-tls");
    assert!(!api.tls.as_ref().unwrap().insecure_skip_verify);
    assert_eq!(state.destination_policies["shop/legacy.internal"].name, "istio-system/legacy-limits");
    let mut warnings = state.warnings.clone();
    warnings.sort();
    assert_eq!(
        warnings,
        [
            "DestinationRule evil/a-relax: host api.example.com is a service of namespace shop; only rules in shop or istio-system apply to it",
            "VirtualService evil/hijack: host payments.example.com is a service of namespace shop; only VirtualServices in that namespace route it",
            "VirtualService evil/hijack: host web.shop.svc.cluster.local is a service of namespace shop; only VirtualServices in that namespace route it",
            "route evil/hijack: parentRef shop/web is in another namespace; waypoints take only routes in the namespace of what they name",
        ]
    );
}

/// A waypoint policy may target a ServiceEntry (the services of its hosts, which carry its name);
/// one naming a kind the mesh does not know is not dropped (a DENY would deny nothing) but applies
/// to every service of its namespace — of the mesh from the root namespace — and is reported.
#[test]
fn policy_targets_of_unknown_kinds_fail_closed_within_their_namespace() {
    let policy = |ns: &str, name: &str, target: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  targetRefs: [{target}]\n  action: DENY\n  rules: [{{to: [{{operation: {{paths: [/x]}}}}]}}]\n---\n"
        )
    };
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: other}\nspec:\n  clusterIP: 10.96.0.31\n  ports: [{port: 80}]\n---\n".to_owned()
        + &policy("shop", "entry", "{group: networking.istio.io, kind: ServiceEntry, name: payments}")
        + &policy("shop", "odd", "{group: example.com, kind: Frobnicator, name: x}")
        + &policy("istio-system", "classwide", "{group: gateway.networking.k8s.io, kind: GatewayClass, name: istio-waypoint}");
    let (_, state) = egress_fixture_with("policies.yaml", &yaml);
    let targets = |key: &str| -> Vec<String> {
        let mut t: Vec<String> = state.l7_policies[key]
            .targets
            .iter()
            .map(|t| format!("{:?} {}/{}", t.kind(), t.namespace, t.name))
            .collect();
        t.sort();
        t.dedup();
        t
    };
    assert_eq!(targets("shop/entry"), ["Service shop/payments"]);
    let shop = ["Service shop/apis", "Service shop/legacy", "Service shop/payments", "Service shop/search"];
    let odd = targets("shop/odd");
    assert!(shop.iter().all(|s| odd.contains(&s.to_string())), "{odd:?}");
    assert!(odd.iter().all(|t| t.starts_with("Service shop/")), "{odd:?}");
    let classwide = targets("istio-system/classwide");
    assert!(
        classwide.contains(&"Service other/web".to_owned()) && classwide.contains(&"Service shop/payments".to_owned())
    );
    let errors: Vec<String> = state.config_errors.iter().map(|e| format!("{}: {}", e.source, e.message)).collect();
    for (source, says) in [
        (
            "AuthorizationPolicy shop/odd",
            "targetRefs kind \"Frobnicator\" (group \"example.com\") is not one the mesh knows; the policy applies to every service of its namespace instead",
        ),
        (
            "AuthorizationPolicy istio-system/classwide",
            "kind \"GatewayClass\" (group \"gateway.networking.k8s.io\") is not one the mesh knows; the policy applies to every service of the mesh instead",
        ),
    ] {
        assert!(errors.iter().any(|e| e.starts_with(source) && e.contains(says)), "{source}: {errors:#?}");
    }
}
