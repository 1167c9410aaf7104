//! The manifests in `deploy/` against the Kubernetes schemas: every document decodes into its
//! k8s-openapi type without dropping a field (a misspelled or misplaced field fails), and the
//! control plane's roles grant exactly what it does: the reads its watchers make, TokenReview,
//! and its own key Secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
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
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
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
