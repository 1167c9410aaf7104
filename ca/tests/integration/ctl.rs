//! `ambientctl`'s changes to the objects that drive the mesh:
//!
//! - in a YAML directory: a namespace label set and removed in the file that holds the namespace
//!   (its other documents untouched), a missing namespace created, no-ops reported as such, a
//!   waypoint's objects written to one file and removed again; the result still loads in the CA's
//!   directory source;
//! - in a cluster: the exact requests `kube` sends to a recording mock API server (merge patch of
//!   the namespace's labels, server-side apply of each waypoint object, deletes, 404s);
//! - the `ambientctl` binary: `--help` everywhere, `waypoint generate` output, clear errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use ca_ctl::config::{Outcome, Target};
use ca_ctl::waypoint::WaypointSpec;
use serde_json::{Value, json};

use crate::recording_api::Mock;

fn docs(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_norway::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn namespace_labels_and_waypoints_in_a_yaml_directory() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("apps.yaml");
    std::fs::write(
        &shared,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    team: red\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: shop\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    let target = Target::Dir(dir.path().to_owned());

    let out = target.label_namespace("shop", "istio.io/dataplane-mode", Some("ambient")).await.unwrap();
    assert!(matches!(out, Outcome::Changed(_)), "{out:?}");
    let now = docs(&std::fs::read_to_string(&shared).unwrap());
    assert_eq!(now.len(), 2);
    assert_eq!(now[0]["metadata"]["labels"], json!({"team": "red", "istio.io/dataplane-mode": "ambient"}));
    assert_eq!(now[1]["kind"], "Service", "the other document is kept");
    assert_eq!(now[1]["spec"]["clusterIP"], "10.96.0.1");

    let again = target.label_namespace("shop", "istio.io/dataplane-mode", Some("ambient")).await.unwrap();
    assert!(matches!(again, Outcome::Unchanged(_)), "{again:?}");

    target.label_namespace("shop", "istio.io/dataplane-mode", None).await.unwrap();
    let now = docs(&std::fs::read_to_string(&shared).unwrap());
    assert_eq!(now[0]["metadata"]["labels"], json!({"team": "red"}));

    // A namespace no file holds is created.
    target.label_namespace("blog", "istio.io/dataplane-mode", Some("ambient")).await.unwrap();
    let created = docs(&std::fs::read_to_string(dir.path().join("namespace-blog.yaml")).unwrap());
    assert_eq!(
        created,
        [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "blog", "labels": {"istio.io/dataplane-mode": "ambient"}}})
        ]
    );
    // Removing a label from a namespace that does not exist is a no-op.
    let none = target.label_namespace("ghost", "istio.io/dataplane-mode", None).await.unwrap();
    assert!(matches!(none, Outcome::Unchanged(_)));
    assert!(!dir.path().join("namespace-ghost.yaml").exists());

    // A waypoint: four objects in one file, and gone again.
    let spec = WaypointSpec::new("shop");
    let applied = target.apply(&spec.objects(), "waypoint-shop-waypoint").await.unwrap();
    assert_eq!(applied.len(), 4);
    let file = dir.path().join("waypoint-shop-waypoint.yaml");
    let written = docs(&std::fs::read_to_string(&file).unwrap());
    let kinds: Vec<&str> = written.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Gateway", "ServiceAccount", "Deployment", "Service"]);
    let reapplied = target.apply(&spec.objects(), "waypoint-shop-waypoint").await.unwrap();
    assert!(reapplied.iter().all(|o| matches!(o, Outcome::Unchanged(_))), "{reapplied:?}");
    // No temporary file is left for the CA's watcher to trip on.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");

    // The CA's directory source reads all of it: the namespace label and the waypoint's Gateway.
    let store = ca::objects::Store::new();
    let mut source = ca::source::dir::DirSource::new(dir.path(), store.clone()).unwrap();
    source.rescan();
    let snap = store.snapshot();
    use ca::objects::{Kind, ObjectKey};
    let key = |kind, ns: &str, name: &str| ObjectKey { kind, namespace: ns.into(), name: name.into() };
    assert!(snap.get(&key(Kind::Gateway, "shop", "waypoint")).is_some(), "the Gateway did not load");
    assert!(snap.get(&key(Kind::Service, "shop", "waypoint")).is_some(), "the waypoint's Service did not load");
    assert!(snap.get(&key(Kind::Namespace, "", "blog")).is_some());

    let removed = target.delete(&spec.objects(), "waypoint-shop-waypoint").await.unwrap();
    assert!(matches!(removed[0], Outcome::Changed(_)));
    assert!(!file.exists());
    let missing = target.delete(&spec.objects(), "waypoint-shop-waypoint").await.unwrap();
    assert!(matches!(missing[0], Outcome::Unchanged(_)));
}

#[tokio::test]
async fn namespace_labels_and_waypoints_in_a_cluster() {
    let mock = Mock::default();
    mock.objects.lock().unwrap().insert(
        "/api/v1/namespaces/shop".into(),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "red"}}}),
    );
    let target = Target::Cluster(mock.serve().await);
    let take = || mock.take();

    // Enable: read, then a merge patch of the one label.
    let out = target.label_namespace("shop", "istio.io/dataplane-mode", Some("ambient")).await.unwrap();
    assert!(matches!(out, Outcome::Changed(_)));
    let seen = take();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!((seen[0].method.as_str(), seen[0].uri.as_str()), ("GET", "/api/v1/namespaces/shop"));
    assert_eq!((seen[1].method.as_str(), seen[1].uri.as_str()), ("PATCH", "/api/v1/namespaces/shop?"));
    assert_eq!(seen[1].content_type, "application/merge-patch+json");
    assert_eq!(seen[1].body, json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}));
    // Already so: no write.
    let again = target.label_namespace("shop", "istio.io/dataplane-mode", Some("ambient")).await.unwrap();
    assert!(matches!(again, Outcome::Unchanged(_)));
    assert_eq!(take().len(), 1, "only the read");
    // Disable: a null removes the label.
    target.label_namespace("shop", "istio.io/dataplane-mode", None).await.unwrap();
    let seen = take();
    assert_eq!(seen[1].body, json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}}));
    // A namespace that does not exist is an error that says so.
    let err = target.label_namespace("ghost", "istio.io/dataplane-mode", Some("ambient")).await.unwrap_err();
    assert_eq!(err.to_string(), "namespace ghost not found");
    take();

    // A waypoint: one server-side apply per object, forced, as field manager ambientctl.
    let spec = WaypointSpec::new("shop");
    target.apply(&spec.objects(), "unused").await.unwrap();
    let seen = take();
    let calls: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.uri.as_str())).collect();
    assert_eq!(
        calls,
        [
            (
                "PATCH",
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint?&force=true&fieldManager=ambientctl"
            ),
            ("PATCH", "/api/v1/namespaces/shop/serviceaccounts/waypoint?&force=true&fieldManager=ambientctl"),
            ("PATCH", "/apis/apps/v1/namespaces/shop/deployments/waypoint?&force=true&fieldManager=ambientctl"),
            ("PATCH", "/api/v1/namespaces/shop/services/waypoint?&force=true&fieldManager=ambientctl"),
        ]
    );
    assert!(seen.iter().all(|s| s.content_type == "application/apply-patch+yaml"), "{seen:#?}");
    assert_eq!(seen[0].body, spec.objects()[0]);

    // An ingress gateway: its ServiceAccount, Deployment and LoadBalancer Service, the same way.
    let gateway = ca_ctl::gateway::IngressGatewaySpec::new("istio-system");
    target.apply(&gateway.objects(), "unused").await.unwrap();
    let seen = take();
    let calls: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.uri.as_str())).collect();
    let at = |kind: &str| {
        format!("/namespaces/istio-system/{kind}/istio-ingressgateway?&force=true&fieldManager=ambientctl")
    };
    assert_eq!(
        calls,
        [
            ("PATCH", format!("/api/v1{}", at("serviceaccounts")).as_str()),
            ("PATCH", format!("/apis/apps/v1{}", at("deployments")).as_str()),
            ("PATCH", format!("/api/v1{}", at("services")).as_str()),
        ]
    );
    assert_eq!(seen[2].body["spec"]["type"], "LoadBalancer");

    // Deleting: each object; one already gone is reported, not an error.
    mock.objects.lock().unwrap().remove("/api/v1/namespaces/shop/services/waypoint");
    let out = target.delete(&spec.objects(), "unused").await.unwrap();
    let seen = take();
    assert!(seen.iter().all(|s| s.method == "DELETE"), "{seen:#?}");
    assert_eq!(out.iter().filter(|o| matches!(o, Outcome::Unchanged(_))).count(), 1, "{out:?}");
}

fn ambientctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ambientctl"))
        .args(args)
        .env_remove("AMBIENT_CONFIG_DIR")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("AMBIENT_MESH_REGISTRY", "/nonexistent/registry")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_explains_itself_and_fails_clearly() {
    for args in [
        &["--help"][..],
        &["namespace", "--help"],
        &["namespace", "enable", "--help"],
        &["namespace", "disable", "--help"],
        &["namespace", "use-waypoint", "--help"],
        &["waypoint", "--help"],
        &["waypoint", "generate", "--help"],
        &["waypoint", "apply", "--help"],
        &["waypoint", "delete", "--help"],
        &["ca", "--help"],
        &["ca", "rotate-root", "--help"],
        &["ztunnel", "--help"],
        &["ztunnel", "certs", "--help"],
        &["dashboard", "--help"],
    ] {
        let (code, stdout, _) = ambientctl(args);
        assert_eq!(code, 0, "{args:?}");
        assert!(stdout.contains("Usage: ambientctl"), "{args:?}: {stdout}");
    }

    let (code, stdout, _) = ambientctl(&["waypoint", "generate", "-n", "shop", "--name", "edge", "--replicas", "2"]);
    assert_eq!(code, 0);
    let generated = docs(&stdout);
    assert_eq!(generated, WaypointSpec { name: "edge".into(), replicas: 2, ..WaypointSpec::new("shop") }.objects());

    // No cluster, no directory, no kept mesh: the error says what to do (exit status 3: nothing
    // to reach).
    let (code, _, stderr) = ambientctl(&["namespace", "enable", "shop"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("--config-dir"), "{stderr}");
    let (code, _, stderr) = ambientctl(&["--config-dir", "/nonexistent", "namespace", "enable", "shop"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent: not a directory"), "{stderr}");
    // Nothing listens: the error names the endpoint (3).
    let (code, _, stderr) = ambientctl(&["ztunnel", "workloads", "--admin-addr", "127.0.0.1:1"]);
    assert_eq!(code, 3);
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    // A dashboard with nothing to read says where figures come from (3); sources that cannot work
    // are refused before anything is served (1); a listener in use is named.
    let (code, _, stderr) = ambientctl(&["dashboard"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("--prometheus http://HOST:PORT") && stderr.contains("--targets"), "{stderr}");
    let (code, _, stderr) = ambientctl(&["dashboard", "--prometheus", "https://prometheus:9090"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--prometheus: https://prometheus:9090: only http:// is read"), "{stderr}");
    let (code, _, stderr) = ambientctl(&["dashboard", "--targets", "/nonexistent/targets.json"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--targets: reading /nonexistent/targets.json"), "{stderr}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = ambientctl(&["dashboard", "--prometheus", "http://127.0.0.1:9", "--listen", &at]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("listening on {at} (in use: pick another with --listen)")), "{stderr}");
    assert_eq!(ambientctl(&["dashboard", "--prometheus", "http://a:1", "--targets", "t.json"]).0, 2);
    assert_eq!(ambientctl(&["dashboard", "--window", "soon"]).0, 2);
    // Conflicting or missing arguments are usage errors.
    assert_eq!(ambientctl(&["namespace", "use-waypoint", "shop"]).0, 2);
    assert_eq!(ambientctl(&["namespace", "use-waypoint", "shop", "wp", "--none"]).0, 2);
}

/// A one-machine mesh kept running is found without flags: namespace commands edit its YAML
/// directory, `--node` names its nodes; a registration whose process is gone is ignored.
#[test]
fn a_kept_mesh_is_found_without_flags() {
    let registry = tempfile::tempdir().unwrap();
    let objects = tempfile::tempdir().unwrap();
    std::fs::write(objects.path().join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n")
        .unwrap();
    let kept = |pid: u32| ca_ctl::kept::KeptMesh {
        pid,
        started: ca_ctl::kept::process_start(pid).unwrap_or(0),
        ca_addr: "10.10.0.254:15012".parse().unwrap(),
        ca_name: "10.10.0.254".into(),
        ca_netns: "nowhere".into(),
        state_dir: objects.path().join("state"),
        config_dir: objects.path().to_owned(),
        nodes: [("node-1".to_owned(), "nowhere-1".to_owned())].into(),
        prometheus: None,
        scrape_targets: None,
    };
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ambientctl"))
            .args(args)
            .env_remove("AMBIENT_CONFIG_DIR")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("AMBIENT_MESH_REGISTRY", registry.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A registration left by a process that is gone: as if there were none.
    let dead = std::fs::create_dir_all(registry.path().join("4000000")).and_then(|()| {
        std::fs::write(registry.path().join("4000000/mesh.json"), serde_json::to_vec(&kept(4_000_000)).unwrap())
    });
    dead.unwrap();
    assert_eq!(run(&["namespace", "enable", "shop"]).0, Some(3));
    assert!(!registry.path().join("4000000").exists(), "the dead registration was not removed");

    // A registration whose pid was reused by another process (another start time): as if none.
    let write = |mesh: &ca_ctl::kept::KeptMesh| {
        std::fs::create_dir_all(registry.path().join(mesh.pid.to_string())).unwrap();
        std::fs::write(registry.path().join(format!("{}/mesh.json", mesh.pid)), serde_json::to_vec(mesh).unwrap())
            .unwrap();
    };
    let alive = kept(std::process::id());
    write(&ca_ctl::kept::KeptMesh { started: alive.started + 1, ..alive.clone() });
    assert_eq!(run(&["namespace", "enable", "shop"]).0, Some(3));

    // This test's own process keeps it alive.
    write(&alive);
    let (code, stdout, stderr) = run(&["namespace", "enable", "shop"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("namespace shop: istio.io/dataplane-mode=ambient"), "{stdout}");
    let yaml = std::fs::read_to_string(objects.path().join("ns.yaml")).unwrap();
    assert!(yaml.contains("istio.io/dataplane-mode: ambient"), "{yaml}");
    let (code, _, stderr) = run(&["ztunnel", "workloads", "--node", "node-3"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("has no node \"node-3\" (its nodes: node-1)"), "{stderr}");
    // `explain` asks the kept mesh's CA from inside its network namespace (here one that does
    // not exist: said so), unless --ca-admin names a CA.
    let (code, _, stderr) = run(&["explain", "shop/a", "shop/b:80"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("network namespace nowhere"), "{stderr}");
    let (code, _, stderr) = run(&["explain", "shop/a", "shop/b:80", "--ca-admin", "127.0.0.1:1"]);
    assert_eq!(code, Some(3), "nothing to reach: {stderr}");
    assert!(stderr.contains("asking the CA's admin endpoint at 127.0.0.1:1"), "{stderr}");
    let (code, _, stderr) = run(&["explain", "--connection", "3", "--node", "node-3"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("has no node \"node-3\""), "{stderr}");
    assert_eq!(run(&["explain", "shop/a"]).0, Some(2), "TO is required");
}
