//! The node agent in a cluster (binary `node-agent`, one per node next to ztunnel): which pods of
//! this node belong in the mesh, where their network namespaces are, and the CNI plugin's hook.
//!
//! - Pods come from the API server (a watch of this node's pods and of all namespaces); a pod is
//!   enrolled when [`in_mesh`] says so, it is not on the host network and its
//!   network namespace exists (a sandbox was made); it is unenrolled when that stops being true or
//!   it goes away.
//! - A pod's network namespace comes from the CNI plugin (`ambient-cni`, chained after the
//!   cluster's network plugin), which reports every new pod sandbox on [`CNI_SOCKET`] *before*
//!   the pod's containers start, so a new pod's first packet is already captured. Pods that were
//!   running before the agent are found by scanning `/proc` for a process in the pod's cgroup
//!   ([`find_netns`]).
//! - [`install_cni`] puts the plugin into the node's CNI configuration; [`run_agent`] is the agent.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use proto::api::istio::workload::zds::WorkloadInfo;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::netns::NetNs;
use crate::node::agent::in_mesh;

/// Where the agent listens for the CNI plugin (next to the ZDS socket, in the host path both
/// share).
pub const CNI_SOCKET: &str = "/var/run/ztunnel/cni.sock";

/// The plugin's name in a CNI configuration (`"type"`), and its binary's.
pub const CNI_PLUGIN: &str = "ambient-cni";

/// What the agent needs to know of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Kubernetes uid.
    pub uid: String,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The pod's `istio.io/dataplane-mode` label.
    pub mode: Option<String>,
    /// `spec.hostNetwork`: such pods share the node's namespace and are never captured.
    pub host_network: bool,
    /// Whether it is terminating or finished.
    pub gone: bool,
}

impl PodFacts {
    /// From a Pod object.
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref()?;
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref());
        Some(PodFacts {
            uid: meta.uid.clone()?,
            name: meta.name.clone()?,
            namespace: meta.namespace.clone()?,
            service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
            mode: meta.labels.as_ref().and_then(|l| l.get(crate::node::agent::DATAPLANE_MODE_LABEL).cloned()),
            host_network: spec.host_network.unwrap_or(false),
            gone: meta.deletion_timestamp.is_some() || matches!(phase, Some("Succeeded" | "Failed")),
        })
    }
}

/// The pods that belong in the mesh, by uid: `namespaces` maps each namespace to its
/// `istio.io/dataplane-mode` label.
pub fn desired(pods: &[PodFacts], namespaces: &HashMap<String, Option<String>>) -> BTreeMap<String, WorkloadInfo> {
    pods.iter()
        .filter(|p| !p.host_network && !p.gone)
        .filter(|p| in_mesh(namespaces.get(&p.namespace).and_then(|m| m.as_deref()), p.mode.as_deref()))
        .map(|p| {
            let info = WorkloadInfo {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                service_account: p.service_account.clone(),
            };
            (p.uid.clone(), info)
        })
        .collect()
}

/// Whether a `/proc/<pid>/cgroup` text places the process in the pod with `uid` (cgroupfs
/// `.../pod<uid>/...` or systemd `...-pod<uid with _>.slice/...`).
pub fn cgroup_matches(cgroup: &str, uid: &str) -> bool {
    let systemd = uid.replace('-', "_");
    cgroup.lines().any(|line| {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        path.split('/').any(|part| {
            part.strip_prefix("pod").is_some_and(|rest| rest == uid || rest == systemd)
                || part.split('-').any(|p| {
                    p.strip_prefix("pod")
                        .and_then(|r| r.strip_suffix(".slice"))
                        .is_some_and(|rest| rest == systemd || rest == uid)
                })
        })
    })
}

/// The network namespace of a running pod: that of a process in the pod's cgroup, found under
/// `proc_root` (the host's `/proc`), skipping processes in the node's own namespace (`host_ns`
/// inode).
pub fn find_netns(proc_root: &Path, uid: &str, host_ns: u64) -> io::Result<Option<NetNs>> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(proc_root)?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = entry.path();
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        if !cgroup_matches(&cgroup, uid) {
            continue;
        }
        let ns_path = dir.join("ns/net");
        // A process that exits or execs mid-scan is skipped; another of the pod's will do.
        match std::fs::metadata(&ns_path) {
            Ok(m) if m.ino() != host_ns => match NetNs::open(&ns_path) {
                Ok(ns) => return Ok(Some(ns)),
                Err(_) => continue,
            },
            _ => continue,
        }
    }
    Ok(None)
}

/// What the CNI plugin reports for a new pod sandbox (one JSON line on [`CNI_SOCKET`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAdd {
    /// `K8S_POD_UID` (may be empty with runtimes that do not pass it).
    #[serde(default)]
    pub uid: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `CNI_NETNS`: the sandbox's network namespace.
    pub netns: PathBuf,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniReply {
    /// Whether the pod was enrolled (captured) now.
    pub enrolled: bool,
    /// Why the sandbox must not start (the plugin fails the ADD), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A CNI configuration that is not a `.conflist` (no `plugins` array to chain into).
#[derive(Debug, thiserror::Error)]
#[error("not a CNI configuration list (no \"plugins\" array)")]
pub struct NotAConfList;

/// Adds `plugin` (`{"type": "ambient-cni", ...}`) at the end of the chain of a CNI `.conflist`
/// document, or replaces an older entry of ours; `None` when it is already there as given.
pub fn chain_plugin(
    conflist: &serde_json::Value,
    plugin: &serde_json::Value,
) -> Result<Option<serde_json::Value>, NotAConfList> {
    let mut out = conflist.clone();
    let plugins = out.get_mut("plugins").and_then(|p| p.as_array_mut()).ok_or(NotAConfList)?;
    if plugins.iter().any(|p| p == plugin) {
        return Ok(None);
    }
    plugins.retain(|p| p["type"] != CNI_PLUGIN);
    plugins.push(plugin.clone());
    Ok(Some(out))
}

/// Installs the plugin on the node: copies `binary` into `bin_dir` and chains it into the first
/// `.conflist` of `conf_dir` (in name order, as the kubelet picks it). Returns the file changed.
pub fn install_cni(binary: &Path, bin_dir: &Path, conf_dir: &Path, socket: &Path) -> io::Result<PathBuf> {
    let target = bin_dir.join(CNI_PLUGIN);
    let tmp = bin_dir.join(format!(".{CNI_PLUGIN}.tmp"));
    std::fs::copy(binary, &tmp)?;
    std::fs::rename(&tmp, &target)?;
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    let Some(list) = lists.into_iter().next() else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no .conflist in {} (is the cluster's network plugin installed?)", conf_dir.display()),
        ));
    };
    let text = std::fs::read_to_string(&list)?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", list.display())))?;
    let plugin = serde_json::json!({"type": CNI_PLUGIN, "agent_socket": socket});
    let changed = chain_plugin(&doc, &plugin)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", list.display())))?;
    if let Some(doc) = changed {
        let tmp = list.with_file_name(format!(".{}.tmp", list.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::write(&tmp, serde_json::to_string_pretty(&doc).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &list)?;
    }
    Ok(list)
}

/// Settings of the node agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (pods are watched with `spec.nodeName=<node>`).
    pub node: String,
    /// The ZDS socket ztunnel connects to.
    pub zds_socket: PathBuf,
    /// Where the CNI plugin reports new pods.
    pub cni_socket: PathBuf,
    /// The host's `/proc` (to find running pods' namespaces).
    pub proc_root: PathBuf,
    /// How long a CNI report waits for its pod to show up in the watch.
    pub cni_wait: std::time::Duration,
}

#[derive(Debug, Default)]
struct Known {
    pods: HashMap<String, PodFacts>,
    namespaces: HashMap<String, Option<String>>,
    /// Namespace paths the CNI plugin reported, by pod uid.
    cni: HashMap<String, PathBuf>,
    /// The CNI-reported path each pod was enrolled with (a new sandbox means a new namespace).
    enrolled_from: HashMap<String, PathBuf>,
    synced_pods: bool,
    synced_namespaces: bool,
}

type Shared = std::sync::Arc<std::sync::Mutex<Known>>;

fn lock(k: &Shared) -> std::sync::MutexGuard<'_, Known> {
    k.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the node agent until `stop` resolves: serves ZDS and the CNI socket, watches the API
/// server, and keeps the node's enrolled pods equal to the pods that belong in the mesh.
pub async fn run_agent(
    client: kube::Client,
    config: AgentConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), crate::node::agent::AgentError> {
    // The agent itself is not generic: it is compiled once, here, not in every caller.
    agent_loop(client, config, Box::pin(stop)).await
}

async fn agent_loop(
    client: kube::Client,
    config: AgentConfig,
    stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) -> Result<(), crate::node::agent::AgentError> {
    use futures_util::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher::{self, Event};
    use tracing::{info, warn};

    // ztunnel is served once the node's pods are enrolled: after a restart of this agent its
    // first snapshot must name every pod ztunnel already serves.
    let agent = std::sync::Arc::new(crate::node::agent::NodeAgent::bind_closed(&config.zds_socket)?);
    let known: Shared = Shared::default();
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());

    let pods_api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client.clone());
    let pod_watch = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node));
    let pods = {
        let (known, changed) = (known.clone(), changed.clone());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(watcher::watcher(pods_api, pod_watch).default_backoff());
            let mut listing: Option<HashMap<String, PodFacts>> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Init) => listing = Some(HashMap::new()),
                    Ok(Event::InitApply(p)) => {
                        if let Some(f) = PodFacts::of(&p) {
                            listing.get_or_insert_with(HashMap::new).insert(f.uid.clone(), f);
                        }
                    }
                    Ok(Event::InitDone) => {
                        let mut k = lock(&known);
                        k.pods = listing.take().unwrap_or_default();
                        k.synced_pods = true;
                        info!(pods = k.pods.len(), "pods on this node listed");
                    }
                    Ok(Event::Apply(p)) => {
                        if let Some(f) = PodFacts::of(&p) {
                            lock(&known).pods.insert(f.uid.clone(), f);
                        }
                    }
                    Ok(Event::Delete(p)) => {
                        if let Some(uid) = p.metadata.uid {
                            let mut k = lock(&known);
                            k.pods.remove(&uid);
                            k.cni.remove(&uid);
                        }
                    }
                    Err(e) => warn!(error = %e, "pod watch failed; retrying with backoff"),
                }
                changed.notify_one();
            }
        })
    };
    let ns_api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let namespaces = {
        let (known, changed) = (known.clone(), changed.clone());
        tokio::spawn(async move {
            let mode = |n: &k8s_openapi::api::core::v1::Namespace| {
                n.metadata.labels.as_ref().and_then(|l| l.get(crate::node::agent::DATAPLANE_MODE_LABEL).cloned())
            };
            let mut stream = std::pin::pin!(watcher::watcher(ns_api, watcher::Config::default()).default_backoff());
            let mut listing: Option<HashMap<String, Option<String>>> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Init) => listing = Some(HashMap::new()),
                    Ok(Event::InitApply(n)) => {
                        if let Some(name) = n.metadata.name.clone() {
                            listing.get_or_insert_with(HashMap::new).insert(name, mode(&n));
                        }
                    }
                    Ok(Event::InitDone) => {
                        let mut k = lock(&known);
                        k.namespaces = listing.take().unwrap_or_default();
                        k.synced_namespaces = true;
                    }
                    Ok(Event::Apply(n)) => {
                        if let Some(name) = n.metadata.name.clone() {
                            lock(&known).namespaces.insert(name, mode(&n));
                        }
                    }
                    Ok(Event::Delete(n)) => {
                        if let Some(name) = n.metadata.name {
                            lock(&known).namespaces.remove(&name);
                        }
                    }
                    Err(e) => warn!(error = %e, "namespace watch failed; retrying with backoff"),
                }
                changed.notify_one();
            }
        })
    };

    let cni = {
        let listener = bind_unix(&config.cni_socket).map_err(|source| {
            crate::node::agent::AgentError::Listen(crate::zds::ZdsError::Io { path: config.cni_socket.clone(), source })
        })?;
        let (known, changed, wait) = (known.clone(), changed.clone(), config.cni_wait);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (known, changed) = (known.clone(), changed.clone());
                tokio::spawn(async move { serve_cni(stream, known, changed, wait).await });
            }
        })
    };

    // The agent runs on the host network: its own namespace is the node's.
    let host_ns = NetNs::current().and_then(|n| n.inode()).unwrap_or(0);
    info!(node = %config.node, zds = %config.zds_socket.display(), cni = %config.cni_socket.display(), "node agent started");
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        if reconcile(&known, &agent, &config.proc_root, host_ns).await && agent.open() {
            info!(pods = agent.enrolled().len(), "the node's pods are enrolled; serving ztunnel");
        }
        tokio::select! {
            () = &mut stop => break,
            () = changed.notified() => {}
            _ = tick.tick() => {}
        }
    }
    pods.abort();
    namespaces.abort();
    cni.abort();
    let _ = std::fs::remove_file(&config.cni_socket);
    Ok(())
}

fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

/// Enrolls what belongs in the mesh and is not, unenrolls what is and no longer belongs, and
/// enrolls again a pod whose sandbox (network namespace) the CNI plugin reported anew. The only
/// place that enrolls: CNI reports wait for it. False until the pods and namespaces are listed.
async fn reconcile(known: &Shared, agent: &crate::node::agent::NodeAgent, proc_root: &Path, host_ns: u64) -> bool {
    use tracing::warn;
    let (want, cni, enrolled_from) = {
        let k = lock(known);
        if !(k.synced_pods && k.synced_namespaces) {
            return false;
        }
        let pods: Vec<PodFacts> = k.pods.values().cloned().collect();
        (desired(&pods, &k.namespaces), k.cni.clone(), k.enrolled_from.clone())
    };
    let have = agent.enrolled();
    for uid in have.iter().filter(|u| !want.contains_key(*u)) {
        lock(known).enrolled_from.remove(uid);
        if let Err(e) = agent.unenroll(uid).await {
            warn!(uid, error = %e, "unenrolling a pod failed");
        }
    }
    for (uid, info) in want {
        let reported = cni.get(&uid);
        let current = have.contains(&uid) && (reported.is_none() || reported == enrolled_from.get(&uid));
        if current {
            continue;
        }
        let netns = match reported {
            Some(path) => NetNs::open(path).map(Some),
            None => find_netns(proc_root, &uid, host_ns),
        };
        match netns {
            Ok(Some(netns)) => match agent.enroll(&uid, info, netns).await {
                Ok(()) => {
                    if let Some(path) = reported {
                        lock(known).enrolled_from.insert(uid, path.clone());
                    }
                }
                Err(e) => warn!(uid, error = %e, "enrolling a pod failed; retrying"),
            },
            // Not started yet (no process, no CNI report): the next change or tick retries.
            Ok(None) => {}
            Err(e) => warn!(uid, error = %e, "cannot open the pod's network namespace; retrying"),
        }
    }
    true
}

/// One CNI report: remember the namespace, wait until the pod is known, enroll it now if it
/// belongs in the mesh, answer.
async fn serve_cni(
    stream: tokio::net::UnixStream,
    known: Shared,
    changed: std::sync::Arc<tokio::sync::Notify>,
    wait: std::time::Duration,
) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    use tracing::{info, warn};
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(read.take(64 * 1024));
    let reply = match tokio::time::timeout(std::time::Duration::from_secs(5), reader.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<CniAdd>(&line) {
            Ok(add) => handle_cni(add, &known, &changed, wait).await,
            Err(e) => CniReply { enrolled: false, error: Some(format!("malformed report: {e}")) },
        },
        _ => CniReply { enrolled: false, error: Some("no report received".into()) },
    };
    if let Some(e) = &reply.error {
        warn!(error = %e, "CNI report refused");
    } else {
        info!(enrolled = reply.enrolled, "CNI report handled");
    }
    changed.notify_one();
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
}

async fn handle_cni(add: CniAdd, known: &Shared, changed: &tokio::sync::Notify, wait: std::time::Duration) -> CniReply {
    let deadline = tokio::time::Instant::now() + wait;
    // The pod (by uid, or by namespace/name when the runtime does not pass the uid).
    let facts = loop {
        let found = {
            let k = lock(known);
            let synced = k.synced_pods && k.synced_namespaces;
            let pod = k.pods.values().find(|p| {
                (if add.uid.is_empty() { true } else { p.uid == add.uid })
                    && p.namespace == add.namespace
                    && p.name == add.name
            });
            pod.filter(|_| synced).map(|p| (p.clone(), k.namespaces.get(&p.namespace).cloned().flatten()))
        };
        if let Some(f) = found {
            break f;
        }
        if tokio::time::Instant::now() >= deadline {
            return CniReply {
                enrolled: false,
                error: Some(format!("pod {}/{} is not known to the node agent yet; retry", add.namespace, add.name)),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (pod, ns_mode) = facts;
    lock(known).cni.insert(pod.uid.clone(), add.netns.clone());
    if pod.host_network || !in_mesh(ns_mode.as_deref(), pod.mode.as_deref()) {
        return CniReply { enrolled: false, error: None };
    }
    // The reconcile loop enrolls it with this namespace; answer once it has.
    changed.notify_one();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if lock(known).enrolled_from.get(&pod.uid) == Some(&add.netns) {
            return CniReply { enrolled: true, error: None };
        }
        if tokio::time::Instant::now() >= deadline {
            return CniReply {
                enrolled: false,
                error: Some(format!(
                    "pod {}/{}: capture was not installed within 10 s (see the node agent's log)",
                    pod.namespace, pod.name
                )),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(uid: &str, ns: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: ns.into(),
            service_account: "sa".into(),
            mode: None,
            host_network: false,
            gone: false,
        }
    }

    #[test]
    fn only_running_pods_of_ambient_namespaces_that_do_not_opt_out_are_desired() {
        let namespaces = HashMap::from([("mesh".to_owned(), Some("ambient".to_owned())), ("plain".to_owned(), None)]);
        let pods = vec![
            pod("a", "mesh"),
            PodFacts { mode: Some("none".into()), ..pod("opted-out", "mesh") },
            PodFacts { host_network: true, ..pod("host", "mesh") },
            PodFacts { gone: true, ..pod("terminating", "mesh") },
            pod("b", "plain"),
            pod("c", "unknown-namespace"),
        ];
        let want = desired(&pods, &namespaces);
        assert_eq!(want.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(want["a"].service_account, "sa");
        assert_eq!(want["a"].namespace, "mesh");
    }

    #[test]
    fn cgroup_paths_of_both_drivers_match_only_their_pod() {
        let uid = "0b6a3c1e-1111-2222-3333-444455556666";
        let cgroupfs = "0::/kubepods/burstable/pod0b6a3c1e-1111-2222-3333-444455556666/abcdef\n";
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0b6a3c1e_1111_2222_3333_444455556666.slice/cri-containerd-abc.scope\n";
        let v1 = "11:pids:/kubepods/pod0b6a3c1e-1111-2222-3333-444455556666/x\n4:memory:/other\n";
        for text in [cgroupfs, systemd, v1] {
            assert!(cgroup_matches(text, uid), "{text}");
            assert!(!cgroup_matches(text, "0b6a3c1e-1111-2222-3333-444455556667"), "{text}");
        }
        assert!(!cgroup_matches("0::/\n", uid));
        assert!(!cgroup_matches("garbage", uid));
    }

    #[test]
    fn the_plugin_is_chained_once_at_the_end() {
        let list = serde_json::json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}, {"type": "portmap"}]});
        let ours = serde_json::json!({"type": CNI_PLUGIN, "agent_socket": CNI_SOCKET});
        let once = chain_plugin(&list, &ours).unwrap().unwrap();
        assert_eq!(once["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(once["plugins"][2], ours);
        assert_eq!(once["cniVersion"], "1.0.0");
        assert_eq!(chain_plugin(&once, &ours).unwrap(), None, "already there");
        // An older entry of ours is replaced, not duplicated.
        let moved = serde_json::json!({"type": CNI_PLUGIN, "agent_socket": "/elsewhere.sock"});
        let replaced = chain_plugin(&once, &moved).unwrap().unwrap();
        assert_eq!(replaced["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(replaced["plugins"][2], moved);
        assert!(chain_plugin(&serde_json::json!({"type": "bridge"}), &ours).is_err(), "a single .conf is refused");
    }

    #[test]
    fn install_copies_the_binary_and_edits_the_first_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let (bin, conf) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let plugin = dir.path().join("plugin");
        std::fs::write(&plugin, b"binary").unwrap();
        assert_eq!(
            install_cni(&plugin, &bin, &conf, Path::new(CNI_SOCKET)).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        std::fs::write(conf.join("20-second.conflist"), r#"{"name":"b","plugins":[{"type":"x"}]}"#).unwrap();
        std::fs::write(conf.join("10-first.conflist"), r#"{"name":"a","plugins":[{"type":"flannel"}]}"#).unwrap();
        let changed = install_cni(&plugin, &bin, &conf, Path::new(CNI_SOCKET)).unwrap();
        assert_eq!(changed, conf.join("10-first.conflist"));
        assert_eq!(std::fs::read(bin.join(CNI_PLUGIN)).unwrap(), b"binary");
        let first: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&changed).unwrap()).unwrap();
        assert_eq!(first["plugins"][1]["type"], CNI_PLUGIN);
        let second = std::fs::read_to_string(conf.join("20-second.conflist")).unwrap();
        assert_eq!(second, r#"{"name":"b","plugins":[{"type":"x"}]}"#, "only the first list changes");
    }
}
