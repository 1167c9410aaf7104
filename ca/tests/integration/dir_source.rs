//! The YAML directory source under good and bad input: whatever is wrong is reported with its file
//! and reason, and the last good state stays in force.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use ca::objects::{Kind, ObjectKey, Store};
use ca::source::dir::DirSource;

const NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n";

fn pod(name: &str, ip: Option<&str>) -> String {
    let status = ip.map(|ip| format!("status:\n  podIP: {ip}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  nodeName: node-a\n  containers:\n    - name: c\n      image: i\n{status}"
    )
}

fn key(kind: Kind, ns: &str, name: &str) -> ObjectKey {
    ObjectKey { kind, namespace: ns.into(), name: name.into() }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    source: DirSource,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        let source = DirSource::new(dir.path(), store.clone()).unwrap();
        Fixture { dir, store, source }
    }

    fn write(&self, name: &str, content: &str) {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        // Write then rename, as editors and kubectl-style tools do: the change is atomic.
        let tmp = self.dir.path().join(format!(".{}.tmp", name.replace('/', "_")));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn has(&self, key: &ObjectKey) -> bool {
        self.store.snapshot().get(key).is_some()
    }

    fn errors_for(&self, file: &str) -> Vec<String> {
        let path = self.dir.path().join(file).display().to_string();
        self.store.errors().into_iter().filter(|e| e.source == path).map(|e| e.message).collect()
    }
}

#[test]
fn loads_multi_document_files_lists_and_yml_in_subdirectories() {
    let mut f = Fixture::new();
    f.write("ns.yaml", &format!("{NS}---\n{}", pod("a", Some("10.0.0.1"))));
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n  - {}\n",
        serde_json::to_string(&serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "b", "namespace": "shop"}, "spec": {"nodeName": "n", "containers": []}, "status": {"podIP": "10.0.0.2"}})).unwrap()
    );
    f.write("more/list.yml", &list);
    f.write("ignored.txt", "not yaml at all: [");
    f.write(".hidden.yaml", "garbage: [");
    assert!(f.source.rescan());
    assert!(f.has(&key(Kind::Namespace, "", "shop")));
    assert!(f.has(&key(Kind::Pod, "shop", "a")));
    assert!(f.has(&key(Kind::Pod, "shop", "b")));
    assert_eq!(f.store.snapshot().len(), 3);
    assert!(f.store.errors().is_empty(), "{:?}", f.store.errors());
    // Nothing changed: nothing is re-read.
    assert!(!f.source.rescan());
}

#[test]
fn invalid_yaml_keeps_the_files_last_good_objects() {
    let mut f = Fixture::new();
    f.write("shop.yaml", &format!("{NS}---\n{}", pod("a", Some("10.0.0.1"))));
    f.source.rescan();
    f.write("shop.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: [unclosed\n");
    f.source.rescan();
    assert!(f.has(&key(Kind::Namespace, "", "shop")), "last good objects were dropped");
    assert!(f.has(&key(Kind::Pod, "shop", "a")));
    let errors = f.errors_for("shop.yaml");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("not valid YAML"), "{errors:?}");
    // Fixing the file clears the error.
    f.write("shop.yaml", NS);
    f.source.rescan();
    assert!(f.errors_for("shop.yaml").is_empty());
    assert!(!f.has(&key(Kind::Pod, "shop", "a")));
}

#[test]
fn unknown_kinds_are_reported_and_the_rest_loads() {
    let mut f = Fixture::new();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n";
    f.write("mixed.yaml", &format!("{deployment}---\n{NS}---\nfoo: bar\n"));
    f.source.rescan();
    assert!(f.has(&key(Kind::Namespace, "", "shop")));
    let errors = f.errors_for("mixed.yaml");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("kind Deployment (apps/v1) is not one the mesh reads"), "{errors:?}");
    assert!(errors[1].contains("document 3: document has no apiVersion and kind"), "{errors:?}");
}

#[test]
fn pod_without_ip_is_refused_and_its_last_valid_version_kept() {
    let mut f = Fixture::new();
    f.write("pods.yaml", &format!("{}---\n{}", pod("new", None), pod("old", Some("10.0.0.7"))));
    f.source.rescan();
    assert!(!f.has(&key(Kind::Pod, "shop", "new")));
    assert!(f.has(&key(Kind::Pod, "shop", "old")));
    let errors = f.errors_for("pods.yaml");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("Pod shop/new is invalid: status.podIP is missing"), "{errors:?}");
    assert!(errors[0].ends_with("; skipped"), "{errors:?}");

    // Editing the valid pod into an invalid one keeps the valid version.
    f.write("pods.yaml", &pod("old", Some("not-an-ip")));
    f.source.rescan();
    let snapshot = f.store.snapshot();
    let Some(ca::objects::Object::Pod(p)) = snapshot.get(&key(Kind::Pod, "shop", "old")) else { panic!("pod lost") };
    assert_eq!(p.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.0.0.7"));
    let errors = f.errors_for("pods.yaml");
    assert!(
        errors[0].contains("\"not-an-ip\" is not an IP address")
            && errors[0].ends_with("keeping its last valid version"),
        "{errors:?}"
    );
}

#[test]
fn duplicates_keep_the_definition_already_in_force() {
    let mut f = Fixture::new();
    f.write("b.yaml", NS);
    f.source.rescan();
    // a.yaml sorts first, but b.yaml's definition was there before: it stays.
    f.write("a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n");
    f.source.rescan();
    let snapshot = f.store.snapshot();
    let Some(ca::objects::Object::Namespace(ns)) = snapshot.get(&key(Kind::Namespace, "", "shop")) else {
        panic!("namespace lost")
    };
    assert!(ns.metadata.labels.is_some(), "the newcomer replaced the incumbent");
    let errors = f.errors_for("a.yaml");
    assert_eq!(errors.len(), 1, "{:?}", f.store.errors());
    assert!(errors[0].contains("Namespace shop is already defined in"), "{errors:?}");

    // Twice in one file: the first stays.
    f.write("c.yaml", &format!("{}---\n{}", pod("p", Some("10.0.0.1")), pod("p", Some("10.0.0.2"))));
    f.source.rescan();
    assert!(f.errors_for("c.yaml")[0].contains("defined twice in this file"));
}

#[test]
fn deleting_a_file_removes_its_objects() {
    let mut f = Fixture::new();
    f.write("a.yaml", NS);
    f.write("b.yaml", &pod("a", Some("10.0.0.1")));
    f.source.rescan();
    std::fs::remove_file(f.dir.path().join("b.yaml")).unwrap();
    assert!(f.source.rescan());
    assert!(!f.has(&key(Kind::Pod, "shop", "a")));
    assert!(f.has(&key(Kind::Namespace, "", "shop")));
}

#[test]
fn missing_directory_is_a_clear_error() {
    let err = DirSource::new(Path::new("/nonexistent/mesh-config"), Store::new()).unwrap_err();
    assert!(err.to_string().starts_with("config directory /nonexistent/mesh-config:"), "{err}");
}

#[test]
fn policies_with_invalid_values_are_admitted_to_fail_closed() {
    // Refusing the object would lift the restriction it adds; it is admitted, and the translation
    // makes it fail closed and reports why (ca::translate::authz::review).
    let mut f = Fixture::new();
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: shop\nspec:\n  rules:\n    - from:\n        - source:\n            ipBlocks: [\"10.0.0.0/33\"]\n";
    f.write("p.yaml", policy);
    f.source.rescan();
    assert!(f.has(&key(Kind::AuthorizationPolicy, "shop", "p")));
    assert!(f.errors_for("p.yaml").is_empty());
    let state = ca::translate::translate(&f.store.snapshot(), &Default::default());
    let errors: Vec<_> = state.config_errors.iter().map(|e| format!("{}: {}", e.source, e.message)).collect();
    assert_eq!(
        errors,
        ["AuthorizationPolicy shop/p: rules[0]: from[0].source: \"10.0.0.0/33\" has an invalid prefix length"]
    );
    // The ALLOW's only rule is dropped: it allows nothing.
    let p = &state.policies["shop/p"];
    assert!(p.rules.is_empty(), "{p:?}");
}

#[test]
fn a_pod_served_by_a_waypoint_for_its_address_admits_only_the_waypoint() {
    let mut f = Fixture::new();
    let pod = |name: &str, sa: &str, ip: &str, labels: &str, annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: node-1\n  serviceAccountName: {sa}\nstatus:\n  podIP: {ip}\n---\n"
        )
    };
    let gateway = |waypoint_for: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: waypoint\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: demo\n  labels:\n    istio.io/waypoint-for: {waypoint_for}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n    - {{name: mesh, port: 15008, protocol: HBONE}}\n---\n"
        )
    };
    let pods = [
        pod("waypoint-0", "waypoint", "10.1.0.2", "gateway.networking.k8s.io/gateway-name: waypoint", ""),
        pod("server", "server", "10.1.0.3", "app: server", ""),
        pod("legacy", "legacy", "10.1.0.4", "app: legacy", "ambient-mesh.io/allow-waypoint-bypass: \"true\""),
    ]
    .concat();
    let name = "demo/waypoint_only_demo_waypoint";
    let policies_of = |state: &ca::mesh::MeshState, pod: &str| {
        state.workloads[&format!("Kubernetes//Pod/demo/{pod}")].authorization_policies.clone()
    };

    f.write("mesh.yaml", &format!("{}{pods}", gateway("workload")));
    f.source.rescan();
    assert!(f.errors_for("mesh.yaml").is_empty(), "{:?}", f.errors_for("mesh.yaml"));
    let state = ca::translate::translate(&f.store.snapshot(), &Default::default());
    let p = state.policies.get(name).expect("the waypoint-only policy");
    assert_eq!(p.action, ca::mesh::Action::Deny);
    let only = ca::mesh::Match {
        not_principals: vec![ca::mesh::StringMatch::Exact("cluster.local/ns/demo/sa/waypoint".into())],
        ..Default::default()
    };
    assert_eq!(p.rules, vec![vec![vec![only]]]);
    assert_eq!(policies_of(&state, "server"), [name]);
    assert!(policies_of(&state, "legacy").is_empty(), "the opt-out annotation was ignored");
    assert!(policies_of(&state, "waypoint-0").is_empty(), "the waypoint restricted itself");

    // A waypoint for services only leaves pod addresses alone, as Istio does.
    f.write("mesh.yaml", &format!("{}{pods}", gateway("service")));
    f.source.rescan();
    let state = ca::translate::translate(&f.store.snapshot(), &Default::default());
    assert!(!state.policies.contains_key(name));
    assert!(policies_of(&state, "server").is_empty());
}
