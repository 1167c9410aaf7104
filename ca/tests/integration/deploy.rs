//! The manifests in `deploy/` against the Kubernetes schemas: every document decodes into its
//! k8s-openapi type without dropping a field (a misspelled or misplaced field fails), and the
//! control plane's roles grant exactly what it does: the reads its watchers make, TokenReview,
//! and its own key Secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde_json::Value;

fn documents() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "yaml")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = serde_norway::Value::deserialize(doc).unwrap();
            out.push((path.display().to_string(), serde_json::to_value(v).unwrap()));
        }
    }
    out
}

/// Decodes into `T` and back: any field the schema does not know is lost on the way.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, doc, "{file}: document does not match its schema (fields lost or altered)");
}

#[test]
fn every_manifest_matches_its_kubernetes_schema() {
    let docs = documents();
    assert!(!docs.is_empty());
    for (file, doc) in &docs {
        match doc["kind"].as_str().unwrap() {
            "ServiceAccount" => round_trips::<ServiceAccount>(file, doc),
            "ClusterRole" => round_trips::<ClusterRole>(file, doc),
            "ClusterRoleBinding" => round_trips::<ClusterRoleBinding>(file, doc),
            "Role" => round_trips::<Role>(file, doc),
            "RoleBinding" => round_trips::<RoleBinding>(file, doc),
            "Namespace" => round_trips::<Namespace>(file, doc),
            "ConfigMap" => round_trips::<ConfigMap>(file, doc),
            "Service" => round_trips::<Service>(file, doc),
            "Deployment" => round_trips::<Deployment>(file, doc),
            "DaemonSet" => round_trips::<DaemonSet>(file, doc),
            "CustomResourceDefinition" => round_trips::<CustomResourceDefinition>(file, doc),
            "Gateway" => round_trips::<ca::k8s::Gateway>(file, doc),
            other => panic!("{file}: no schema check for kind {other}; add one"),
        }
    }
}

#[test]
fn control_plane_role_grants_exactly_what_the_watchers_read_and_token_review() {
    let role: ClusterRole = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "ambient-mesh-ca")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("ClusterRole ambient-mesh-ca");
    let mut granted: Vec<(String, String)> = Vec::new();
    for rule in role.rules.unwrap() {
        let groups = rule.api_groups.unwrap();
        if groups == ["authentication.k8s.io"] {
            // Caller authentication (ca::auth, TokenCheck::TokenReview): create only.
            assert_eq!(rule.resources.as_deref(), Some(&["tokenreviews".to_owned()][..]));
            assert_eq!(rule.verbs, ["create"]);
            continue;
        }
        if rule.resources.as_deref() == Some(&["configmaps".to_owned()][..]) {
            // The trust bundle in every namespace (ca::root_cert): server-side apply only.
            assert_eq!(groups, [""]);
            assert_eq!(rule.verbs, ["patch"]);
            continue;
        }
        if rule.resources.as_deref() == Some(&["secrets".to_owned()][..]) {
            // Gateway credentials (TLS Secrets, by a field selector): listed and watched, never
            // fetched one by one.
            assert_eq!(groups, [""]);
            assert_eq!(rule.verbs, ["list", "watch"]);
            granted.push((String::new(), "secrets".to_owned()));
            continue;
        }
        assert_eq!(rule.verbs, ["get", "list", "watch"], "the control plane only reads objects");
        for group in groups {
            for resource in rule.resources.clone().unwrap() {
                granted.push((group.clone(), resource));
            }
        }
    }
    granted.sort();
    let mut needed: Vec<(String, String)> = [
        ("", "namespaces"),
        ("", "nodes"),
        ("", "pods"),
        ("", "services"),
        ("", "secrets"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("gateway.networking.k8s.io", "grpcroutes"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "requestauthentications"),
        ("networking.istio.io", "gateways"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "serviceentries"),
        ("telemetry.istio.io", "telemetries"),
    ]
    .iter()
    .map(|(g, r)| (g.to_string(), r.to_string()))
    .collect();
    needed.sort();
    assert_eq!(granted, needed);
}

#[test]
fn key_secret_role_covers_create_get_update_of_the_default_secret_only() {
    let role: Role = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "Role" && d["metadata"]["name"] == "ambient-mesh-ca-keys")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("Role ambient-mesh-ca-keys");
    assert_eq!(role.metadata.namespace.as_deref(), Some("istio-system"));
    type Grant = (Vec<String>, Option<Vec<String>>, Vec<String>);
    let mut grants: Vec<Grant> =
        role.rules.unwrap().into_iter().map(|r| (r.resources.unwrap(), r.resource_names, r.verbs)).collect();
    grants.sort();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // The default of `ca --key-secret`.
    assert_eq!(
        grants,
        [(s(&["secrets"]), None, s(&["create"])), (s(&["secrets"]), Some(s(&["ambient-ca"])), s(&["get", "update"])),]
    );
    let binding: RoleBinding = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "RoleBinding" && d["metadata"]["name"] == "ambient-mesh-ca-keys")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("RoleBinding");
    assert_eq!(binding.role_ref.name, "ambient-mesh-ca-keys");
    assert_eq!(binding.subjects.unwrap()[0].name, "ca");
}

#[test]
fn the_mesh_config_is_read_in_the_root_namespace_only() {
    let role: Role = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "Role" && d["metadata"]["name"] == "ambient-mesh-ca-mesh-config")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("Role ambient-mesh-ca-mesh-config");
    assert_eq!(role.metadata.namespace.as_deref(), Some("istio-system"));
    let rules = role.rules.unwrap();
    let [rule] = rules.as_slice() else { panic!("{rules:?}") };
    assert_eq!(
        (rule.resources.as_deref(), rule.verbs.as_slice()),
        (Some(&["configmaps".to_owned()][..]), &["list".to_owned(), "watch".to_owned()][..])
    );
    let binding: RoleBinding = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "RoleBinding" && d["metadata"]["name"] == "ambient-mesh-ca-mesh-config")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("RoleBinding");
    assert_eq!(
        (binding.role_ref.name.as_str(), binding.subjects.unwrap()[0].name.as_str()),
        ("ambient-mesh-ca-mesh-config", "ca")
    );
}

fn pod_spec(kind: &str, name: &str) -> PodSpec {
    let doc = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
        .1;
    serde_json::from_value(doc["spec"]["template"]["spec"].clone()).unwrap()
}

/// Mount path of volume `volume` in the pod's first container.
fn mount(spec: &PodSpec, volume: &str) -> String {
    let c = &spec.containers[0];
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("{volume} not mounted"))
        .mount_path
        .clone()
}

/// The proxies find their token and the mesh's root where the binaries look by default
/// (`--token-file /var/run/secrets/tokens/istio-token`, `--ca-root
/// /var/run/secrets/istio/root-cert.pem`): a projected token for the CA's audience, and the
/// ConfigMap the CA publishes.
fn assert_proxy_volumes(spec: &PodSpec, what: &str) {
    assert_eq!(mount(spec, "istio-token"), "/var/run/secrets/tokens", "{what}");
    assert_eq!(mount(spec, "istiod-ca-cert"), "/var/run/secrets/istio", "{what}");
    let volumes = spec.volumes.clone().unwrap();
    let token = volumes.iter().find(|v| v.name == "istio-token").unwrap().projected.clone().unwrap();
    let sat = token.sources.unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(
        (sat.audience.as_deref(), sat.path.as_str()),
        (Some(ca::auth::DEFAULT_AUDIENCE), "istio-token"),
        "{what}"
    );
    let root = volumes.iter().find(|v| v.name == "istiod-ca-cert").unwrap().config_map.clone().unwrap();
    assert_eq!(root.name, ca::root_cert::CONFIG_MAP, "{what}");
    // No items: every key appears as a file, root-cert.pem among them.
    assert!(root.items.is_none(), "{what}");
    assert_eq!(ca::root_cert::KEY, "root-cert.pem");
}

#[test]
fn the_proxies_get_their_token_root_and_node_name_where_the_binaries_look() {
    let ztunnel = pod_spec("DaemonSet", "ztunnel");
    assert_proxy_volumes(&ztunnel, "ztunnel");
    assert_eq!(ztunnel.service_account_name.as_deref(), Some("ztunnel"), "the CA's default --node-account");
    let env = ztunnel.containers[0].env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
    assert_eq!(mount(&ztunnel, "zds"), "/var/run/ztunnel");
    let caps = ztunnel.containers[0].security_context.clone().unwrap().capabilities.unwrap();
    assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]);

    let waypoint = pod_spec("Deployment", "waypoint");
    assert_proxy_volumes(&waypoint, "waypoint");

    let ca = pod_spec("Deployment", "ca");
    assert_eq!(ca.service_account_name.as_deref(), Some("ca"), "the account ca-rbac.yaml grants");
}

#[test]
fn the_waypoint_template_is_what_ambientctl_generates() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/waypoint.yaml")).unwrap();
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    assert_eq!(docs, ca_ctl::waypoint::WaypointSpec::new("default").objects(), "regenerate deploy/waypoint.yaml");
}

#[test]
fn the_ingress_gateway_template_is_what_ambientctl_generates() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ingress-gateway.yaml")).unwrap();
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .collect();
    let spec = ca_ctl::gateway::IngressGatewaySpec::new("istio-system");
    assert_eq!(docs, spec.objects(), "regenerate deploy/ingress-gateway.yaml");
    let pod = pod_spec("Deployment", "istio-ingressgateway");
    assert_proxy_volumes(&pod, "ingress gateway");
    // Its pods carry what Istio Gateways select, stay out of ztunnel's capture, and may bind the
    // servers' ports (80, 443) as a non-root user.
    let deployment = documents()
        .into_iter()
        .find(|(_, d)| d["metadata"]["name"] == "istio-ingressgateway" && d["kind"] == "Deployment")
        .unwrap()
        .1;
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        (labels["istio"].as_str(), labels["istio.io/dataplane-mode"].as_str()),
        (Some("ingressgateway"), Some("none"))
    );
    let sysctls = pod.security_context.unwrap().sysctls.unwrap();
    assert_eq!((sysctls[0].name.as_str(), sysctls[0].value.as_str()), ("net.ipv4.ip_unprivileged_port_start", "0"));
    let args = pod.containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--gateway-label", "istio=ingressgateway"]), "{args:?}");
    let service = documents()
        .into_iter()
        .find(|(_, d)| d["metadata"]["name"] == "istio-ingressgateway" && d["kind"] == "Service")
        .unwrap()
        .1;
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    let ports: Vec<u64> =
        service["spec"]["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, [80, 443, 15021]);
}

#[test]
fn the_ca_deployment_passes_only_flags_the_ca_accepts() {
    let ca = pod_spec("Deployment", "ca");
    let args = ca.containers[0].args.clone().unwrap();
    // clap parses every flag before `--help`: an unknown flag or a bad value fails here.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ca")).args(&args).arg("--help").output().unwrap();
    assert!(out.status.success(), "ca {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_node_agent_reads_pods_and_namespaces_only_and_shares_the_zds_socket_with_ztunnel() {
    let role: ClusterRole = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "ambient-mesh-node-agent")
        .map(|(_, d)| serde_json::from_value(d).unwrap())
        .expect("ClusterRole ambient-mesh-node-agent");
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].api_groups.as_deref(), Some(&["".to_owned()][..]));
    assert_eq!(rules[0].resources.as_deref(), Some(&["pods".to_owned(), "namespaces".to_owned()][..]));
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);

    let agent = pod_spec("DaemonSet", "node-agent");
    assert_eq!(agent.host_network, Some(true), "capture rules are written from the node's namespace");
    assert_eq!(agent.host_pid, Some(true), "running pods are found through the host's /proc");
    assert_eq!(agent.service_account_name.as_deref(), Some("node-agent"));
    let args = agent.containers[0].args.clone().unwrap();
    let ztunnel_args = pod_spec("DaemonSet", "ztunnel").containers[0].args.clone().unwrap();
    let zds = "--zds-socket=/var/run/ztunnel/ztunnel.sock".to_owned();
    assert!(args.contains(&zds) && ztunnel_args.contains(&zds), "both ends of ZDS use one socket");
    assert_eq!(mount(&agent, "zds"), "/var/run/ztunnel");
    assert!(args.contains(&"--install-cni".to_owned()));
    assert_eq!(mount(&agent, "cni-bin"), "/host/opt/cni/bin");
    assert_eq!(mount(&agent, "cni-conf"), "/host/etc/cni/net.d");
    let caps = agent.containers[0].security_context.clone().unwrap().capabilities.unwrap();
    assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
}
