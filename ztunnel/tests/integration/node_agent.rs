//! The cluster node agent, with real network namespaces and the real CNI plugin binary (root):
//!
//! - a running pod's network namespace is found through its cgroup in /proc;
//! - a new pod of an ambient namespace, reported by `ambient-cni` at sandbox creation, has its
//!   capture rules installed before the plugin returns (the previous plugin's result is passed
//!   on); a pod outside the mesh is left alone; a pod the agent does not know, or an unreachable
//!   agent, fails the ADD with a CNI error (the kubelet retries; a mesh pod never starts
//!   uncaptured). The API server is a mock that lists pods and namespaces and holds watches open.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};
use ztunnel::netns::NetNs;
use ztunnel::node::{AgentConfig, find_netns, run_agent};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A named network namespace, deleted on drop.
struct Named(String);

impl Named {
    fn new(tag: &str) -> Named {
        let name = format!("ztna-{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        Named(name)
    }
    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
    fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).unwrap().ino()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A cgroup directory of a writable hierarchy, removed (with its processes killed) on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(relative: &str) -> Cgroup {
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let dir = Path::new(root).join(relative);
            if std::fs::create_dir_all(&dir).is_ok() && dir.join("cgroup.procs").exists() {
                return Cgroup(dir);
            }
        }
        panic!("no writable cgroup hierarchy on this machine");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A failed test may leave its process inside: a cgroup with processes cannot be removed.
        let procs = self.0.join("cgroup.procs");
        for pid in std::fs::read_to_string(&procs).unwrap_or_default().lines() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        let _ = std::panic::catch_unwind(|| {
            proto::testing::eventually_blocking("the cgroup to empty", Duration::from_secs(5), || {
                std::fs::read_to_string(&procs).unwrap_or_default().trim().is_empty().then_some(())
            })
        });
        let mut dir = self.0.clone();
        // Remove the pod directory and its test parents.
        while dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pod") || n.to_string_lossy().starts_with("ztna-"))
        {
            let _ = std::fs::remove_dir(&dir);
            dir = dir.parent().unwrap().to_owned();
        }
    }
}

#[test]
fn a_running_pods_namespace_is_found_through_its_cgroup() {
    let uid = format!("1e3a0000-0000-4000-8000-{:012}", std::process::id());
    let netns = Named::new("running");
    let cgroup = Cgroup::new(&format!("ztna-{}/pod{uid}", std::process::id()));
    let mut app = Command::new("ip").args(["netns", "exec", &netns.0, "sleep", "30"]).spawn().unwrap();
    std::fs::write(cgroup.0.join("cgroup.procs"), app.id().to_string()).unwrap();
    let host = NetNs::current().unwrap().inode().unwrap();

    // `ip netns exec` switches namespace before it becomes `sleep`: wait for that.
    let found = proto::testing::eventually_blocking("the pod's namespace to be found", Duration::from_secs(5), || {
        find_netns(Path::new("/proc"), &uid, host).unwrap()
    });
    assert_eq!(found.inode().unwrap(), netns.inode());
    let other = "1e3a0000-0000-4000-8000-999999999999";
    assert!(find_netns(Path::new("/proc"), other, host).unwrap().is_none());
    // A process in the pod's cgroup but on the host network is not the pod's namespace.
    app.kill().unwrap();
    app.wait().unwrap();
    let mut host_proc = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(cgroup.0.join("cgroup.procs"), host_proc.id().to_string()).unwrap();
    assert!(find_netns(Path::new("/proc"), &uid, host).unwrap().is_none());
    host_proc.kill().unwrap();
    host_proc.wait().unwrap();
}

#[derive(Clone, Default)]
struct Api {
    queries: Arc<Mutex<Vec<String>>>,
}

fn pod(name: &str, namespace: &str, uid: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "1"},
        "spec": {"nodeName": "node-1", "serviceAccountName": name, "containers": []},
        "status": {"phase": "Pending"}})
}

async fn api(State(api): State<Api>, request: Request) -> Response {
    let query = request.uri().query().unwrap_or_default().to_owned();
    api.queries.lock().unwrap().push(format!("{} {query}", request.uri().path()));
    if query.contains("watch=true") {
        // Nothing changes: the watch stays open.
        let body = Body::from_stream(futures_util::stream::pending::<Result<String, std::io::Error>>());
        return Response::builder().header("content-type", "application/json").body(body).unwrap();
    }
    let list = match request.uri().path() {
        "/api/v1/pods" => json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "5"},
            "items": [pod("web", "shop", "uid-web"), pod("legacy", "plain", "uid-legacy")]}),
        "/api/v1/namespaces" => {
            json!({"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "5"},
            "items": [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "plain"}},
            ]})
        }
        _ => return Response::builder().status(404).body(Body::empty()).unwrap(),
    };
    Response::builder().header("content-type", "application/json").body(Body::from(list.to_string())).unwrap()
}

/// Runs the plugin binary: exit code and stdout.
fn cni(command: &str, socket: &Path, args: &str, netns: &Path) -> (i32, Value) {
    let config = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni",
        "agent_socket": socket, "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.7/24"}]}});
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambient-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "abc")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that needs no configuration (VERSION) may answer and exit before reading it.
    match child.stdin.take().unwrap().write_all(config.to_string().as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe && command == "VERSION" => {}
        written => written.unwrap(),
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap(), serde_json::from_str(stdout.trim()).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_plugin_has_a_new_mesh_pod_captured_before_it_starts() {
    let mock = Api::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(api).with_state(mock.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let config = AgentConfig {
        node: "node-1".into(),
        zds_socket: dir.path().join("zds.sock"),
        cni_socket: socket.clone(),
        proc_root: "/proc".into(),
        cni_wait: Duration::from_secs(1),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run_agent(client, config, async {
        let _ = stop_rx.await;
    }));
    proto::testing::eventually("the CNI socket", Duration::from_secs(5), || async { socket.exists().then_some(()) })
        .await;

    let web = Named::new("web");
    let run = |command: &'static str, args: String, netns: PathBuf| {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || cni(command, &socket, &args, &netns))
    };
    let (code, out) =
        run("ADD", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-web".into(), web.path())
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.7/24"}]}),
        "the previous result is passed on"
    );
    let web_ns = NetNs::open(&web.path()).unwrap();
    assert!(ztunnel::node::capture::installed(&web_ns).unwrap(), "the mesh pod was not captured before ADD returned");

    // A pod outside the mesh: passed through, not captured.
    let legacy = Named::new("legacy");
    let (code, _) =
        run("ADD", "K8S_POD_NAMESPACE=plain;K8S_POD_NAME=legacy;K8S_POD_UID=uid-legacy".into(), legacy.path())
            .await
            .unwrap();
    assert_eq!(code, 0);
    assert!(!ztunnel::node::capture::installed(&NetNs::open(&legacy.path()).unwrap()).unwrap());

    // A pod the agent does not know: the ADD fails with a CNI error (the kubelet retries).
    let (code, out) =
        run("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=ghost;K8S_POD_UID=uid-ghost".into(), legacy.path())
            .await
            .unwrap();
    assert_eq!(code, 1);
    assert_eq!(out["code"], 999);
    assert!(out["details"].as_str().unwrap().contains("shop/ghost is not known"), "{out}");

    // Not a Kubernetes pod: nothing asked, result passed on.
    let (code, out) = run("ADD", String::new(), legacy.path()).await.unwrap();
    assert_eq!((code, out["ips"][0]["address"].as_str()), (0, Some("10.0.0.7/24")));
    let (code, out) = run("VERSION", String::new(), legacy.path()).await.unwrap();
    assert_eq!(code, 0);
    assert!(out["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")));

    // Pods were watched for this node only.
    let queries = mock.queries.lock().unwrap().clone();
    assert!(
        queries
            .iter()
            .filter(|q| q.starts_with("/api/v1/pods "))
            .all(|q| q.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{queries:?}"
    );

    let _ = stop_tx.send(());
    agent.await.unwrap().unwrap();
    // The agent gone: a pod's ADD fails rather than start uncaptured.
    let (code, out) =
        run("ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=uid-web".into(), web.path()).await.unwrap();
    assert_eq!(code, 1);
    assert_eq!(out["msg"], "the node agent is unreachable");
}
