//! The one-machine mesh: nodes and pods as network namespaces, the real `ca` and one real
//! `ztunnel` per node as processes, and the harness itself as each node's agent.
//!
//! ```text
//!  underlay netns: bridge br0 10.10.0.254/24 (the CA listens here, :15012)
//!    ├── veth ── node-1 netns: eth0 10.10.0.1, bridge br0 10.20.1.1/24, ztunnel
//!    │             ├── veth ── pod netns: eth0 10.20.1.2/24 (default via 10.20.1.1)
//!    │             └── ...
//!    └── veth ── node-2 netns: eth0 10.10.0.2, bridge br0 10.20.2.1/24, ztunnel
//! ```
//! Nodes route each other's pod ranges over the underlay. Objects the CA reads are written as
//! YAML files (one per object) into a directory it watches. A pod whose namespace is labelled
//! `istio.io/dataplane-mode=ambient` (and that does not opt out) is enrolled through its node's
//! [`NodeAgent`]: capture rules in its namespace, then ZDS to that node's ztunnel.
//!
//! Everything is torn down on drop: processes are killed (and die with the harness thread that
//! started them in any case), namespaces deleted. On SIGINT/SIGTERM/SIGHUP the harness removes its
//! namespaces and exits; namespaces left by a harness that was killed outright (SIGKILL) are removed
//! by the next one.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use proto::api::istio::workload::zds::WorkloadInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztunnel::netns::NetNs;
use ztunnel::node::agent::{NodeAgent, in_mesh};

use crate::ca_process::{CaLaunch, CaProcess, ISSUER, output, sibling_binary, spawn_child_with, wait_for_port};
use crate::prometheus::{Prometheus, ScrapeTargets, Target};
use crate::topology::{NamedNetns, PREFIX, install_signal_cleanup, preflight, reap_stale};

/// The CA's address on the underlay.
pub const CA_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 254);
/// The cluster the one-machine mesh's ztunnels name (`CLUSTER_ID`, sent as `clusterid`).
pub const E2E_CLUSTER_ID: &str = "one-machine";

/// How often the mesh's Prometheus scrapes each component (Istio's sample configuration uses
/// 15 s; a second keeps tests and the demo's dashboards prompt).
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// Settings.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// RUST_LOG for ztunnel and the CA.
    pub log_filter: String,
    /// Drain deadline given to ztunnel.
    pub drain_timeout: Duration,
    /// Workload certificate lifetime (the CA's `--default-ttl`), when not its default.
    pub cert_ttl: Option<Duration>,
    /// More arguments for the CA.
    pub ca_args: Vec<String>,
    /// More arguments for every ztunnel.
    pub ztunnel_args: Vec<String>,
    /// ztunnels and waypoints write JSON log lines (`LOG_FORMAT=json`).
    pub json_logs: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            nodes: 2,
            log_filter: std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into()),
            drain_timeout: Duration::from_secs(2),
            cert_ttl: None,
            ca_args: Vec::new(),
            ztunnel_args: Vec::new(),
            json_logs: false,
        }
    }
}

/// Which ztunnel a node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZtunnelImpl {
    /// This project's, the binary next to the test's.
    Ours,
    /// Istio's ztunnel (built from its public source, outside the project), at this path: for
    /// side-by-side benchmarks and interop.
    Istio(PathBuf),
}

/// A node.
#[derive(Debug)]
pub struct Node {
    /// `node-<n>`.
    pub name: String,
    /// 1-based.
    pub index: u8,
    /// Its namespace.
    pub netns: NamedNetns,
    /// Its underlay address.
    pub ip: Ipv4Addr,
    /// The node agent (the harness plays it).
    pub agent: NodeAgent,
    ztunnel: Option<Child>,
    token: PathBuf,
    log: PathBuf,
    next_pod: u8,
}

impl Node {
    /// ztunnel's pid, if running.
    pub fn ztunnel_pid(&self) -> Option<u32> {
        self.ztunnel.as_ref().map(Child::id)
    }

    /// ztunnel's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// `d` as the proxies' duration flags take it (whole seconds where it is, as they allow at most
/// five digits per unit).
fn duration_flag(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// A ztunnel sent SIGTERM, on its way out.
#[derive(Debug)]
pub struct Exiting {
    /// `None` once waited for.
    child: Option<Child>,
    signalled: Instant,
}

impl Exiting {
    fn new(child: Child) -> Result<Exiting> {
        let signalled = Instant::now();
        crate::topology::run("kill", &["-TERM", &child.id().to_string()])?;
        Ok(Exiting { child: Some(child), signalled })
    }

    /// Waits for the process to exit; how long after the signal it did.
    pub async fn exited(mut self) -> Result<Duration> {
        let mut child = self.child.take().context("already waited for")?;
        let signalled = self.signalled;
        tokio::task::spawn_blocking(move || {
            child.wait()?;
            Ok(signalled.elapsed())
        })
        .await?
    }

    /// Whether it is still running (draining).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// One not waited for is killed (SIGKILL): a test that ends before a drain does leaves nothing.
impl Drop for Exiting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a pod should be.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node index (1-based).
    pub node: u8,
    /// Service account (default: the pod name).
    pub service_account: Option<String>,
    /// Labels (`app` defaults to the name).
    pub labels: BTreeMap<String, String>,
    /// The `nodeName` its object gives, when not its node's (an object that lags behind).
    pub object_node: Option<String>,
}

impl PodSpec {
    /// A pod `name` in `namespace` on node `node`.
    pub fn new(name: &str, namespace: &str, node: u8) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            node,
            service_account: None,
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            object_node: None,
        }
    }

    /// Gives the pod's object another `nodeName` than the node it runs on.
    pub fn object_node(mut self, node_name: &str) -> PodSpec {
        self.object_node = Some(node_name.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// A pod of the mesh.
#[derive(Debug)]
pub struct MeshPod {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node index.
    pub node: u8,
    /// Its IP.
    pub ip: Ipv4Addr,
    /// Kubernetes uid.
    pub uid: String,
    /// Service account.
    pub service_account: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Its namespace.
    pub netns: NamedNetns,
}

impl MeshPod {
    /// A listener inside the pod (an app).
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        Ok(self.netns.ns.tcp_listener(SocketAddr::from(([0, 0, 0, 0], port)))?)
    }

    /// A connection from the pod (an app's client; captured when the pod is enrolled).
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        let socket = self.netns.ns.tcp_socket(addr.is_ipv6())?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .with_context(|| format!("{}/{}: connecting to {addr} timed out", self.namespace, self.name))?
            .with_context(|| format!("{}/{}: connecting to {addr}", self.namespace, self.name))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// The pod's IP and `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The mesh.
#[derive(Debug)]
pub struct Mesh {
    prefix: String,
    dir: tempfile::TempDir,
    objects: PathBuf,
    options: MeshOptions,
    /// The underlay namespace (where the CA runs).
    pub underlay: NamedNetns,
    ca_launch: CaLaunch,
    ca: Option<CaProcess>,
    /// The nodes.
    pub nodes: Vec<Node>,
    pods: BTreeMap<String, Arc<MeshPod>>,
    namespaces: BTreeMap<String, bool>,
    /// `istio.io/use-waypoint` per namespace.
    use_waypoint: BTreeMap<String, String>,
    ztunnel_bin: PathBuf,
    waypoints: Vec<Waypoint>,
    scrape: ScrapeTargets,
    prometheus: Option<Prometheus>,
}

/// A waypoint process of the mesh.
#[derive(Debug)]
pub struct Waypoint {
    /// Its pod.
    pub pod: Arc<MeshPod>,
    child: Option<Child>,
    log: PathBuf,
}

static MESHES: AtomicU32 = AtomicU32::new(0);

/// Writes `text` to `path` through a temporary file and a rename (readers never see half of it).
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Where the binaries are: `E2E_BIN_DIR`, else next to the running test or benchmark (its parent
/// when it runs from `deps/`).
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("E2E_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("no parent directory")?;
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates.into_iter().find(|p| p.exists()).map_or_else(|| sibling_binary(name), Ok)
}

impl Mesh {
    /// Builds the topology and starts the CA and one ztunnel per node (call within a tokio
    /// runtime). Wait for [`Mesh::ready`] before sending traffic.
    pub fn start(options: MeshOptions) -> Result<Mesh> {
        preflight()?;
        reap_stale();
        install_signal_cleanup();
        let ca_bin = binary("ca")?;
        let ztunnel_bin = binary("ztunnel")?;
        for b in [&ca_bin, &ztunnel_bin] {
            if !b.exists() {
                bail!("{} not found: build it first (`cargo build -p ca -p ztunnel`)", b.display());
            }
        }
        let prefix = format!("{PREFIX}{}-{}", std::process::id(), MESHES.fetch_add(1, Ordering::SeqCst));
        let dir = tempfile::Builder::new().prefix("ambient-e2e-").tempdir()?;
        crate::topology::remove_on_signal(dir.path());
        let objects = dir.path().join("objects");
        for d in ["objects", "state", "run", "logs"] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }

        let underlay = NamedNetns::create(&format!("{prefix}-u"))?;
        underlay.bridge("br0", &format!("{CA_IP}/24"))?;
        let tokens = Arc::new(ca::auth::TokenSigner::new(ISSUER, None)?);
        let ca_launch = CaLaunch {
            binary: ca_bin,
            config_dir: objects.clone(),
            state: dir.path().join("state"),
            grpc: SocketAddr::from((CA_IP, 15012)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15014)),
            tokens,
            netns: Some(underlay.ns.clone()),
            log_filter: options.log_filter.clone(),
            log_file: Some(dir.path().join("logs/ca.log")),
            extra_args: options
                .cert_ttl
                .map(|t| vec!["--default-ttl".to_owned(), duration_flag(t)])
                .unwrap_or_default()
                .into_iter()
                .chain(options.ca_args.iter().cloned())
                .collect(),
        };
        write_atomic(
            &objects.join("ns-istio-system.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n",
        )?;
        let ca = CaProcess::launch(&ca_launch, false)?;
        let scrape = ScrapeTargets::create(&dir.path().join("prometheus"), SCRAPE_INTERVAL)?;
        scrape.add(&Target {
            component: "ca",
            addr: ca_launch.admin,
            path: "/metrics",
            namespace: "istio-system",
            pod: "ca",
            workload: "ca",
            node: "underlay",
        })?;

        let mut mesh = Mesh {
            prefix,
            dir,
            objects,
            options,
            underlay,
            ca_launch,
            ca: Some(ca),
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            use_waypoint: BTreeMap::new(),
            waypoints: Vec::new(),
            ztunnel_bin,
            scrape,
            prometheus: None,
        };
        let count = mesh.options.nodes;
        for i in 1..=count {
            mesh.add_node(i as u8)?;
        }
        for i in 0..count {
            mesh.start_ztunnel(i as u8 + 1)?;
        }
        Ok(mesh)
    }

    fn add_node(&mut self, index: u8) -> Result<()> {
        let name = format!("node-{index}");
        let netns = NamedNetns::create(&format!("{}-n{index}", self.prefix))?;
        let ip = Ipv4Addr::new(10, 10, 0, index);
        netns.veth("eth0", &self.underlay, &format!("n{index}"))?;
        self.underlay.ip(&["link", "set", &format!("n{index}"), "master", "br0"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.bridge("br0", &format!("10.20.{index}.1/24"))?;
        for other in 1..=self.options.nodes as u8 {
            if other != index {
                netns.ip(&["route", "add", &format!("10.20.{other}.0/24"), "via", &format!("10.10.0.{other}")])?;
            }
        }
        // The underlay (the CA) reaches the node's pods through the node: pods that talk to the
        // control plane themselves (a waypoint) get answers.
        self.underlay.ip(&["route", "add", &format!("10.20.{index}.0/24"), "via", &ip.to_string()])?;
        netns.sysctl("net.ipv4.ip_forward", "1")?;
        for iface in ["all", "default"] {
            netns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        }
        let token = self.dir.path().join(format!("run/{name}.token"));
        let ca = self.ca.as_ref().context("CA not running")?;
        std::fs::write(&token, ca.token("istio-system", "ztunnel", Some(&name))?)?;
        let agent = NodeAgent::bind(&self.dir.path().join(format!("run/{name}.sock")))?;
        let log = self.dir.path().join(format!("logs/ztunnel-{name}.log"));
        self.nodes.push(Node { name, index, netns, ip, agent, ztunnel: None, token, log, next_pod: 2 });
        Ok(())
    }

    fn node(&self, index: u8) -> Result<&Node> {
        self.nodes.get(usize::from(index).wrapping_sub(1)).with_context(|| format!("no node {index}"))
    }

    fn node_mut(&mut self, index: u8) -> Result<&mut Node> {
        self.nodes.get_mut(usize::from(index).wrapping_sub(1)).with_context(|| format!("no node {index}"))
    }

    /// Starts (or restarts) ztunnel on node `index`, configured as Istio's charts configure Istio's
    /// ztunnel (see [`E2E_CLUSTER_ID`] for the cluster it names).
    pub fn start_ztunnel(&mut self, index: u8) -> Result<()> {
        self.start_ztunnel_impl(index, &ZtunnelImpl::Ours)
    }

    /// Starts (or restarts) `which` ztunnel on node `index`: ours, or another implementation of
    /// the same contracts (Istio's) configured the way Istio's charts configure it, on this mesh's
    /// CA, xDS and node agent. Returns once its readiness port answers.
    pub fn start_ztunnel_impl(&mut self, index: u8, which: &ZtunnelImpl) -> Result<()> {
        let mut child = self.spawn_ztunnel(index, which)?;
        let node = self.node_mut(index)?;
        wait_for_port(
            &mut child,
            &format!("ztunnel on {}", node.name),
            "127.0.0.1:15021".parse()?,
            Some(&node.netns.ns),
        )?;
        node.ztunnel = Some(child);
        Ok(())
    }

    /// Starts `which` ztunnel on node `index` and adds it to the scrape targets.
    fn spawn_ztunnel(&mut self, index: u8, which: &ZtunnelImpl) -> Result<Child> {
        let root = self.ca_launch.state.join("root-cert.pem");
        let (filter, drain) = (self.options.log_filter.clone(), self.options.drain_timeout);
        let extra = self.options.ztunnel_args.clone();
        let log_format = if self.options.json_logs { "json" } else { "text" };
        let ours = self.ztunnel_bin.clone();
        let node = self.node_mut(index)?;
        // The shared settings through Istio's environment variable names, the control plane as
        // https://host:port (its certificate name taken from that host).
        let mut command = Command::new(match which {
            ZtunnelImpl::Ours => &ours,
            ZtunnelImpl::Istio(bin) => bin,
        });
        command
            .env("NODE_NAME", &node.name)
            .env("CA_ADDRESS", format!("https://{CA_IP}:15012"))
            .env("XDS_ADDRESS", format!("https://{CA_IP}:15012"))
            .env("CA_ROOT_CA", &root)
            .env("TRUST_DOMAIN", "cluster.local")
            .env("CLUSTER_ID", E2E_CLUSTER_ID)
            .env("INPOD_UDS", node.agent.path())
            .env("RUST_LOG", &filter);
        match which {
            ZtunnelImpl::Ours => {
                command
                    .args(["--token-file", &node.token.display().to_string()])
                    .args(["--drain-timeout", &duration_flag(drain)])
                    .args(&extra)
                    .env("LOG_FORMAT", log_format);
            }
            // Istio's reads the rest from the environment too: its token file, the xDS server's
            // root, its node address, and its drain deadline in whole seconds.
            ZtunnelImpl::Istio(_) => {
                command
                    .env("AUTH_TOKEN", &node.token)
                    .env("XDS_ROOT_CA", &root)
                    .env("PROXY_MODE", "shared")
                    .env("INSTANCE_IP", node.ip.to_string())
                    .env("TERMINATION_GRACE_PERIOD_SECONDS", drain.as_secs().max(1).to_string());
            }
        }
        let (stdout, stderr) = output(Some(&node.log), false)?;
        let child = spawn_child_with(&command, Some(&node.netns.ns), stdout, stderr)?;
        let (node_name, node_ip) = (node.name.clone(), node.ip);
        self.scrape.add(&Target {
            component: "ztunnel",
            addr: SocketAddr::from((node_ip, 15020)),
            path: "/metrics",
            namespace: "istio-system",
            pod: &format!("ztunnel-{node_name}"),
            workload: "ztunnel",
            node: &node_name,
        })?;
        Ok(child)
    }

    /// Kills ztunnel on node `index` (SIGKILL).
    pub fn kill_ztunnel(&mut self, index: u8) -> Result<()> {
        let node = self.node_mut(index)?;
        if let Some(mut child) = node.ztunnel.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Sends SIGTERM to ztunnel on node `index`; [`Exiting::exited`] waits for it to exit.
    pub fn terminate_ztunnel(&mut self, index: u8) -> Result<Exiting> {
        let node = self.node_mut(index)?;
        let child = node.ztunnel.take().ok_or_else(|| anyhow!("ztunnel on node-{index} is not running"))?;
        Exiting::new(child)
    }

    /// Replaces ztunnel on node `index` with a new process of ours, as a rolling update with a
    /// surge does: the successor starts beside the running one, takes the node agent's snapshot
    /// (it connects only once it has the mesh state) and so listens in every pod beside its
    /// predecessor; then the predecessor gets SIGTERM and drains. Returns the predecessor, still
    /// relaying the connections it holds.
    pub async fn replace_ztunnel(&mut self, index: u8) -> Result<Exiting> {
        let before = self.node(index)?.agent.snapshots();
        let mut successor = self.spawn_ztunnel(index, &ZtunnelImpl::Ours)?;
        let node = self.node(index)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.agent.snapshots() <= before {
            if let Some(status) = successor.try_wait()? {
                bail!("the successor ztunnel on {} exited before taking the snapshot: {status}", node.name);
            }
            if Instant::now() > deadline {
                let _ = successor.kill();
                bail!("the successor ztunnel on {} took no snapshot within 30 s", node.name);
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), node.agent.wait_for_snapshot(before)).await;
        }
        let node = self.node_mut(index)?;
        let predecessor = node.ztunnel.replace(successor).context("no ztunnel was running")?;
        Exiting::new(predecessor)
    }

    /// `identity`'s certificate as node `index`'s ztunnel holds it (`/certs`), once issued.
    async fn held_cert(&self, index: u8, identity: &str) -> Result<serde_json::Value> {
        let (_, body) = self.ztunnel_get(index, 15000, "/certs").await?;
        let certs: serde_json::Value = serde_json::from_str(&body)?;
        certs["certificates"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["identity"] == identity && c["state"] == "ready"))
            .cloned()
            .with_context(|| format!("node-{index}'s ztunnel holds no certificate for {identity}"))
    }

    /// The SHA-256 fingerprints of the certificates above `identity`'s leaf in node `index`'s
    /// ztunnel: its signer first, the root last.
    pub async fn cert_chain(&self, index: u8, identity: &str) -> Result<Vec<String>> {
        let cert = self.held_cert(index, identity).await?;
        let chain: Vec<String> = cert["chain_sha256"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str().map(str::to_owned))
            .collect();
        ensure!(chain.len() >= 2, "{identity}'s chain has no signer and root: {chain:?}");
        Ok(chain)
    }

    /// What tells `identity`'s certificate in node `index`'s ztunnel from the next one (its
    /// validity, `<not before>-<expiry>` in Unix seconds).
    pub async fn cert_validity(&self, index: u8, identity: &str) -> Result<String> {
        let cert = self.held_cert(index, identity).await?;
        Ok(format!("{}-{}", cert["not_before_unix"], cert["expires_unix"]))
    }

    /// Runs `ambientctl ca ARGS` against the CA's admin API (from the underlay, with the admin
    /// credential in the CA's state), returning what it printed.
    pub fn ambientctl_ca(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new(binary("ambientctl")?);
        command
            .arg("ca")
            .args(args)
            .args(["--server", &format!("{CA_IP}:15012"), "--server-name", &CA_IP.to_string()])
            .arg("--state-dir")
            .arg(&self.ca_launch.state);
        let child = spawn_child_with(&command, Some(&self.underlay.ns), Stdio::piped(), Stdio::piped())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ambientctl ca {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Restarts node `index`'s agent: the old one goes (its ZDS connections close), a new one
    /// serves the same socket knowing the node's enrolled pods, as a restarted agent rebuilds
    /// them before ztunnel reconnects. Returns once ztunnel has taken the new agent's snapshot.
    pub async fn restart_node_agent(&mut self, index: u8) -> Result<()> {
        let enrolled: Vec<(String, WorkloadInfo, NetNs)> = self
            .pods
            .values()
            .filter(|p| p.node == index && self.enrolled(p))
            .map(|p| {
                let info = WorkloadInfo {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                };
                (p.uid.clone(), info, p.netns.ns.clone())
            })
            .collect();
        let node = self.node_mut(index)?;
        let path = node.agent.path().to_owned();
        node.agent = NodeAgent::restore(&path, enrolled)?;
        tokio::time::timeout(Duration::from_secs(30), node.agent.wait_for_snapshot(0))
            .await
            .with_context(|| format!("ztunnel on {} did not come back to the restarted node agent", node.name))?;
        Ok(())
    }

    /// ztunnels connected to node `index`'s agent now (two during a handover).
    pub async fn agent_connections(&self, index: u8) -> Result<usize> {
        Ok(self.node(index)?.agent.connected().await)
    }

    /// Stops the CA (SIGKILL).
    pub fn stop_ca(&mut self) {
        if let Some(ca) = self.ca.take() {
            ca.kill();
        }
    }

    /// Starts the CA again (same state, same token issuer).
    pub fn start_ca(&mut self) -> Result<()> {
        if self.ca.is_none() {
            self.ca = Some(CaProcess::launch(&self.ca_launch, false)?);
        }
        Ok(())
    }

    /// The CA's state directory (root certificate, admin credential, issuance log).
    pub fn ca_state_dir(&self) -> &Path {
        &self.ca_launch.state
    }

    /// The mesh's root certificate (PEM), as the CA wrote it.
    pub fn ca_root(&self) -> PathBuf {
        self.ca_launch.state.join("root-cert.pem")
    }

    /// The directory of YAML the CA reads.
    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    /// Writes (or replaces) an object file `name.yaml`.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        write_atomic(&self.objects.join(format!("{name}.yaml")), yaml)
    }

    /// Deletes object file `name.yaml`.
    pub fn delete(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.objects.join(format!("{name}.yaml")))
            .with_context(|| format!("deleting object file {name}.yaml"))
    }

    /// Creates or relabels namespace `name`: ambient or not. Pods in it are enrolled or
    /// unenrolled to match, live.
    pub async fn namespace(&mut self, name: &str, ambient: bool) -> Result<()> {
        self.namespaces.insert(name.to_owned(), ambient);
        self.write_namespace(name)?;
        let pods: Vec<Arc<MeshPod>> = self.pods.values().filter(|p| p.namespace == name).cloned().collect();
        for pod in pods {
            self.reconcile(&pod).await?;
        }
        Ok(())
    }

    /// Follows namespace labels changed in the YAML directory by someone else (`ambientctl
    /// --config-dir`, an editor): pods of a namespace whose `istio.io/dataplane-mode` changed are
    /// enrolled or unenrolled, as a cluster's node agent would. Returns the namespaces that changed.
    pub async fn follow_namespace_labels(&mut self) -> Result<Vec<String>> {
        let mut seen: Vec<(String, bool, Option<String>)> = Vec::new();
        for entry in std::fs::read_dir(&self.objects)?.flatten() {
            let path = entry.path();
            if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            // A file being written or broken is read again on the next call.
            let Ok(docs) = ca_ctl::config::read_docs(&text) else { continue };
            for doc in docs.iter().filter(|d| d["kind"] == "Namespace") {
                let Some(name) = doc["metadata"]["name"].as_str() else { continue };
                let labels = &doc["metadata"]["labels"];
                let ambient = labels[ztunnel::node::agent::DATAPLANE_MODE_LABEL] == "ambient";
                let waypoint = labels["istio.io/use-waypoint"].as_str().map(str::to_owned);
                seen.push((name.to_owned(), ambient, waypoint));
            }
        }
        let mut changed = Vec::new();
        for (name, ambient, waypoint) in seen {
            let was = (self.namespaces.get(&name).copied().unwrap_or(false), self.use_waypoint.get(&name).cloned());
            if was == (ambient, waypoint.clone()) {
                continue;
            }
            self.namespaces.insert(name.clone(), ambient);
            match waypoint {
                Some(w) => self.use_waypoint.insert(name.clone(), w),
                None => self.use_waypoint.remove(&name),
            };
            let pods: Vec<Arc<MeshPod>> = self.pods.values().filter(|p| p.namespace == name).cloned().collect();
            for pod in pods {
                self.reconcile(&pod).await?;
            }
            changed.push(name);
        }
        Ok(changed)
    }

    fn write_namespace(&self, name: &str) -> Result<()> {
        let mut labels = String::new();
        if self.namespaces.get(name).copied().unwrap_or(false) {
            labels.push_str("\n    istio.io/dataplane-mode: ambient");
        }
        if let Some(w) = self.use_waypoint.get(name) {
            labels.push_str(&format!("\n    istio.io/use-waypoint: {w}"));
        }
        let labels = if labels.is_empty() { String::new() } else { format!("\n  labels:{labels}") };
        self.apply(
            &format!("ns-{name}"),
            &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n"),
        )
    }

    /// Sets (or with `None` removes) the namespace's `istio.io/use-waypoint` label.
    pub fn use_waypoint(&mut self, namespace: &str, waypoint: Option<&str>) -> Result<()> {
        match waypoint {
            Some(w) => self.use_waypoint.insert(namespace.to_owned(), w.to_owned()),
            None => self.use_waypoint.remove(namespace),
        };
        self.write_namespace(namespace)
    }

    /// Deploys waypoint `waypoint` for `namespace` on node `node`, as `istioctl waypoint apply`
    /// would (Gateway of class `istio-waypoint`, a Service with its name, a pod running the
    /// `waypoint` binary as service account `waypoint`), and waits until it is ready. Traffic goes
    /// through it once a namespace or service names it ([`Mesh::use_waypoint`]).
    pub async fn waypoint(&mut self, namespace: &str, name: &str, node: u8, vip: Ipv4Addr) -> Result<Arc<MeshPod>> {
        let bin = binary("waypoint")?;
        if !bin.exists() {
            bail!("{} not found: build it first (`cargo build -p waypoint`)", bin.display());
        }
        let spec = PodSpec::new(name, namespace, node)
            .label("gateway.networking.k8s.io/gateway-name", name)
            .label(ztunnel::node::agent::DATAPLANE_MODE_LABEL, "none");
        let spec = PodSpec { service_account: Some("waypoint".into()), ..spec };
        let pod = self.pod(spec).await?;
        self.apply(
            &format!("gw-{namespace}-{name}"),
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    istio.io/waypoint-for: service\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n    - name: mesh\n      port: 15008\n      protocol: HBONE\n"
            ),
        )?;
        self.apply(
            &format!("svc-{namespace}-{name}"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {vip}\n  selector:\n    gateway.networking.k8s.io/gateway-name: {name}\n  ports:\n    - name: mesh\n      port: 15008\n      targetPort: 15008\n"
            ),
        )?;
        self.run_proxy(&bin, &pod, "waypoint", &[]).await?;
        Ok(pod)
    }

    /// Starts the `waypoint` binary in `pod` (as its name, namespace and service account, with
    /// `extra` arguments) and waits until it is ready.
    async fn run_proxy(&mut self, bin: &Path, pod: &Arc<MeshPod>, what: &str, extra: &[&str]) -> Result<()> {
        let (namespace, name) = (pod.namespace.as_str(), pod.name.as_str());
        let token = self.dir.path().join(format!("run/{what}-{namespace}-{name}.token"));
        let ca = self.ca.as_ref().context("CA not running")?;
        std::fs::write(&token, ca.token(namespace, &pod.service_account, None)?)?;
        let log = self.dir.path().join(format!("logs/{what}-{namespace}-{name}.log"));
        let mut command = Command::new(bin);
        command
            .args(["--name", name, "--namespace", namespace, "--service-account", &pod.service_account])
            .args(["--ca-addr", &format!("{CA_IP}:15012"), "--ca-name", &CA_IP.to_string()])
            .args(["--ca-root", &self.ca_root().display().to_string()])
            .args(["--token-file", &token.display().to_string()])
            .args(["--drain-timeout", &duration_flag(self.options.drain_timeout)])
            .args(extra)
            .env("LOG_FORMAT", if self.options.json_logs { "json" } else { "text" })
            .env("RUST_LOG", &self.options.log_filter);
        let (stdout, stderr) = output(Some(&log), false)?;
        let mut child = spawn_child_with(&command, Some(&pod.netns.ns), stdout, stderr)?;
        let ready = SocketAddr::from((pod.ip, 15021));
        wait_for_port(&mut child, &format!("{what} {namespace}/{name}"), ready, Some(&pod.netns.ns))?;
        self.waypoints.push(Waypoint { pod: pod.clone(), child: Some(child), log });
        let node = self.node(pod.node)?.name.clone();
        self.scrape.add(&Target {
            component: if what == "ingress" { "ingress-gateway" } else { "waypoint" },
            addr: SocketAddr::from((pod.ip, 15020)),
            path: "/metrics",
            namespace,
            pod: name,
            workload: name,
            node: &node,
        })?;
        let what = format!("{what} {namespace}/{name} ready");
        let netns = pod.netns.ns.clone();
        self.wait_until(&what, Duration::from_secs(20), || {
            let netns = netns.clone();
            async move { http_get(&netns, ready, "/healthz/ready").await.is_ok_and(|(s, _)| s == 200) }
        })
        .await
    }

    /// Deploys an ingress gateway as Istio's chart does: pod `name` in `namespace` on node
    /// `node`, labelled `labels` (what Gateways select), outside the mesh's capture, running
    /// `waypoint --ingress` as service account `name`; waits until it is ready. Its ports open as
    /// Gateways that select it appear.
    pub async fn ingress_gateway(
        &mut self,
        namespace: &str,
        name: &str,
        node: u8,
        labels: &[(&str, &str)],
    ) -> Result<Arc<MeshPod>> {
        let bin = binary("waypoint")?;
        if !bin.exists() {
            bail!("{} not found: build it first (`cargo build -p waypoint`)", bin.display());
        }
        let mut spec = PodSpec::new(name, namespace, node).label(ztunnel::node::agent::DATAPLANE_MODE_LABEL, "none");
        let mut args = vec!["--ingress".to_owned()];
        for (k, v) in labels {
            spec = spec.label(k, v);
            args.extend(["--gateway-label".to_owned(), format!("{k}={v}")]);
        }
        let pod = self.pod(spec).await?;
        args.extend(["--pod-ip".to_owned(), pod.ip.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_proxy(&bin, &pod, "ingress", &args).await?;
        Ok(pod)
    }

    /// The mesh's scrape configuration (`<state>/prometheus/`, kept up to date as components
    /// start, whether or not a Prometheus runs).
    pub fn scrape_targets(&self) -> &ScrapeTargets {
        &self.scrape
    }

    /// Starts a real Prometheus on the scrape configuration, in the underlay namespace at
    /// [`crate::prometheus::LISTEN`] (its log: `logs/prometheus.log`). Needs the `prometheus`
    /// binary ([`crate::prometheus::binary`]).
    pub fn start_prometheus(&mut self) -> Result<&Prometheus> {
        let bin = crate::prometheus::binary()
            .context("no prometheus binary on PATH (Debian: apt-get install prometheus; or set PROMETHEUS)")?;
        let log = self.dir.path().join("logs/prometheus.log");
        let started = Prometheus::start(&bin, &self.scrape, &self.underlay.ns, crate::prometheus::LISTEN, &log)?;
        Ok(self.prometheus.insert(started))
    }

    /// The Prometheus [`start_prometheus`](Self::start_prometheus) started.
    pub fn prometheus(&self) -> Option<&Prometheus> {
        self.prometheus.as_ref()
    }

    /// A client outside the mesh and outside the nodes: network namespace `outside-<n>` on the
    /// underlay at `10.10.0.<200 + n>`, with routes to every node's pods (as a load balancer's
    /// network would have).
    pub fn outside_client(&mut self, n: u8) -> Result<NamedNetns> {
        let netns = NamedNetns::create(&format!("{}-o{n}", self.prefix))?;
        let veth = format!("o{n}");
        netns.veth("eth0", &self.underlay, &veth)?;
        self.underlay.ip(&["link", "set", &veth, "master", "br0"])?;
        netns.ip(&["addr", "add", &format!("10.10.0.{}/24", 200 + u16::from(n)), "dev", "eth0"])?;
        for node in &self.nodes {
            netns.ip(&["route", "add", &format!("10.20.{}.0/24", node.index), "via", &node.ip.to_string()])?;
        }
        Ok(netns)
    }

    /// Sends SIGTERM to the waypoint running in `pod`; [`Exiting::exited`] waits for it to exit.
    pub fn terminate_waypoint(&mut self, pod: &MeshPod) -> Result<Exiting> {
        let waypoint = self.waypoints.iter_mut().find(|w| w.pod.uid == pod.uid).context("no such waypoint")?;
        let child = waypoint.child.take().context("the waypoint is not running")?;
        Exiting::new(child)
    }

    /// The process id of the waypoint running in `pod`.
    pub fn waypoint_pid(&self, pod: &MeshPod) -> Option<u32> {
        self.waypoints.iter().find(|w| w.pod.uid == pod.uid)?.child.as_ref().map(Child::id)
    }

    /// The metrics of the waypoint running in `pod`.
    pub async fn waypoint_metrics(&self, pod: &MeshPod) -> Result<String> {
        let (status, body) = http_get(&pod.netns.ns, SocketAddr::from((pod.ip, 15020)), "/metrics").await?;
        ensure!(status == 200, "waypoint metrics answered {status}");
        Ok(body)
    }

    /// The admin config dump of the waypoint running in `pod`.
    pub async fn waypoint_config(&self, pod: &MeshPod) -> Result<serde_json::Value> {
        let (status, body) = http_get(&pod.netns.ns, SocketAddr::from(([127, 0, 0, 1], 15000)), "/config_dump").await?;
        ensure!(status == 200, "waypoint config_dump answered {status}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Where the mesh keeps its state, objects and logs (`logs/` has one file per process).
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    fn enrolled(&self, pod: &MeshPod) -> bool {
        let ns_mode = self.namespaces.get(&pod.namespace).copied().unwrap_or(false).then_some("ambient");
        in_mesh(ns_mode, pod.labels.get(ztunnel::node::agent::DATAPLANE_MODE_LABEL).map(String::as_str))
    }

    async fn reconcile(&self, pod: &MeshPod) -> Result<()> {
        let node = self.node(pod.node)?;
        let want = self.enrolled(pod);
        let have = node.agent.enrolled().contains(&pod.uid);
        match (want, have) {
            (true, false) => {
                let info = WorkloadInfo {
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    service_account: pod.service_account.clone(),
                };
                node.agent.enroll(&pod.uid, info, pod.netns.ns.clone()).await?;
            }
            (false, true) => node.agent.unenroll(&pod.uid).await?,
            _ => {}
        }
        Ok(())
    }

    /// Creates a pod: its namespace and network, its object for the CA, and its enrollment.
    pub async fn pod(&mut self, spec: PodSpec) -> Result<Arc<MeshPod>> {
        let prefix = self.prefix.clone();
        let node = self.node_mut(spec.node)?;
        let host = node.next_pod;
        node.next_pod += 1;
        let ip = Ipv4Addr::new(10, 20, spec.node, host);
        let netns = NamedNetns::create(&format!("{prefix}-p{}-{host}", spec.node))?;
        let veth = format!("p{host}");
        node.netns.veth(&veth, &netns, "eth0")?;
        node.netns.ip(&["link", "set", &veth, "master", "br0"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["route", "add", "default", "via", &format!("10.20.{}.1", spec.node)])?;
        for iface in ["all", "default"] {
            netns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        }
        // Ephemeral ports stay clear of 15001/15006/15008; TIME_WAIT does not starve a busy client.
        netns.sysctl("net.ipv4.ip_local_port_range", "32768 60999")?;
        netns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let node_name = spec.object_node.clone().unwrap_or_else(|| node.name.clone());

        let sa = spec.service_account.clone().unwrap_or_else(|| spec.name.clone());
        let uid = format!("{:08x}-e2e-{}-{}", rand_u32(), spec.namespace, spec.name);
        let labels: String = spec.labels.iter().map(|(k, v)| format!("\n    {k}: \"{v}\"")).collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {uid}\n  labels:{labels}\nspec:\n  nodeName: {node_name}\n  serviceAccountName: {sa}\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n",
            spec.name, spec.namespace
        );
        self.apply(&format!("pod-{}-{}", spec.namespace, spec.name), &yaml)?;
        let pod = Arc::new(MeshPod {
            name: spec.name,
            namespace: spec.namespace,
            node: spec.node,
            ip,
            uid,
            service_account: sa,
            labels: spec.labels,
            netns,
        });
        self.pods.insert(pod.key(), pod.clone());
        self.reconcile(&pod).await?;
        Ok(pod)
    }

    /// A ClusterIP service `name` in `namespace` at `vip:port`, selecting pods with `app=<app>`,
    /// forwarding to `target_port`.
    pub fn service(
        &self,
        name: &str,
        namespace: &str,
        vip: Ipv4Addr,
        port: u16,
        app: &str,
        target_port: u16,
    ) -> Result<()> {
        self.apply(
            &format!("svc-{namespace}-{name}"),
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {vip}\n  selector:\n    app: {app}\n  ports:\n    - port: {port}\n      targetPort: {target_port}\n"
            ),
        )
    }

    /// A GET to node `index`'s ztunnel (`port` 15000 admin, 15020 metrics, 15021 readiness).
    pub async fn ztunnel_get(&self, index: u8, port: u16, path: &str) -> Result<(u16, String)> {
        self.ztunnel_request(index, "GET", port, path).await
    }

    /// A request to node `index`'s ztunnel.
    pub async fn ztunnel_request(&self, index: u8, method: &str, port: u16, path: &str) -> Result<(u16, String)> {
        let node = self.node(index)?;
        http_request(&node.netns.ns, method, SocketAddr::from(([127, 0, 0, 1], port)), path).await
    }

    /// A GET to the CA's admin API (`/debug/config_errors`, `/metrics`, ...).
    pub async fn ca_get(&self, path: &str) -> Result<(u16, String)> {
        self.ca_request("GET", path).await
    }

    /// A request to the CA's admin API, from loopback.
    pub async fn ca_request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        http_request(&self.underlay.ns, method, self.ca_launch.admin, path).await
    }

    /// Node `index`'s ztunnel metrics.
    pub async fn metrics(&self, index: u8) -> Result<String> {
        Ok(self.ztunnel_get(index, 15020, "/metrics").await?.1)
    }

    /// Node `index`'s ztunnel config dump.
    pub async fn config_dump(&self, index: u8) -> Result<serde_json::Value> {
        let (status, body) = self.ztunnel_get(index, 15000, "/config_dump").await?;
        if status != 200 {
            bail!("config_dump answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until node `index`'s ztunnel knows a service at `vip`.
    pub async fn wait_for_service(&self, index: u8, vip: std::net::IpAddr) -> Result<()> {
        let what = format!("node-{index}'s ztunnel to know the service at {vip}");
        self.wait_until(&what, Duration::from_secs(20), || async {
            let Ok(dump) = self.config_dump(index).await else { return false };
            dump["mesh"]["services"].as_array().is_some_and(|s| s.iter().any(|s| s["addresses"][0] == vip.to_string()))
        })
        .await
    }

    /// Waits until `check` holds (polled as [`proto::testing::poll`] does), failing after
    /// `timeout` with `what`.
    pub async fn wait_until<F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let held = proto::testing::poll(timeout, || {
            let checked = check();
            async move { checked.await.then_some(()) }
        });
        held.await.ok_or_else(|| anyhow!("timed out after {timeout:?} waiting for {what}"))
    }

    /// Waits until every running ztunnel is ready and sees every pod as the harness does (HBONE
    /// when enrolled, plain TCP when not), every policy in `policies` (`namespace/name`, present)
    /// and the absence of `gone`.
    pub async fn settle(&self, policies: &[&str], gone: &[&str]) -> Result<()> {
        let expected: Vec<(String, &'static str)> = self
            .pods
            .values()
            .map(|p| {
                // A waypoint's pod terminates HBONE itself.
                let hbone = self.enrolled(p) || p.labels.contains_key("gateway.networking.k8s.io/gateway-name");
                (format!("Kubernetes//Pod/{}/{}", p.namespace, p.name), if hbone { "HBONE" } else { "TCP" })
            })
            .collect();
        for node in self.nodes.iter().filter(|n| n.ztunnel.is_some()) {
            let index = node.index;
            self.wait_until(&format!("{}'s ztunnel to see the mesh", node.name), Duration::from_secs(20), || async {
                let Ok((200, _)) = self.ztunnel_get(index, 15021, "/healthz/ready").await else { return false };
                let Ok(dump) = self.config_dump(index).await else { return false };
                let workloads = dump["mesh"]["workloads"].as_array().cloned().unwrap_or_default();
                let proto_of = |uid: &str| {
                    workloads.iter().find(|w| w["uid"] == uid).and_then(|w| w["protocol"].as_str().map(str::to_owned))
                };
                let policies_seen: Vec<String> = dump["mesh"]["policies"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                expected.iter().all(|(uid, proto)| proto_of(uid).as_deref() == Some(*proto))
                    && policies.iter().all(|p| policies_seen.iter().any(|s| s == p))
                    && gone.iter().all(|p| !policies_seen.iter().any(|s| s == p))
            })
            .await?;
        }
        Ok(())
    }

    /// The last `lines` lines of every process log (for failure reports).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut paths = vec![self.dir.path().join("logs/ca.log")];
        paths.extend(self.nodes.iter().map(|n| n.log.clone()));
        paths.extend(self.waypoints.iter().map(|w| w.log.clone()));
        for p in paths {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==> {} <==\n", p.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A node's ztunnel log so far.
    pub fn ztunnel_log(&self, index: u8) -> Result<String> {
        Ok(std::fs::read_to_string(&self.node(index)?.log).unwrap_or_default())
    }

    /// What the waypoint (or gateway) running in `pod` has logged so far.
    pub fn waypoint_log(&self, pod: &MeshPod) -> Result<String> {
        let w = self
            .waypoints
            .iter()
            .find(|w| w.pod.ip == pod.ip)
            .with_context(|| format!("no waypoint runs in pod {}/{}", pod.namespace, pod.name))?;
        Ok(std::fs::read_to_string(&w.log).unwrap_or_default())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- mesh logs (last 40 lines each) ---\n{}", self.log_tails(40));
        }
        for w in &mut self.waypoints {
            if let Some(mut child) = w.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.ztunnel.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.prometheus = None;
        self.stop_ca();
        // Pods, then nodes, then the underlay (field drop order does the rest).
        self.pods.clear();
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

/// A minimal HTTP/1.1 GET from inside `netns`: status and body.
pub async fn http_get(netns: &NetNs, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(netns, "GET", addr, path).await
}

/// A minimal HTTP/1.1 request without a body from inside `netns`: status and body.
pub async fn http_request(netns: &NetNs, method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let answer = http_exchange(netns, method, addr, path, &[]).await?;
    Ok((answer.status, answer.body))
}

/// An HTTP/1.1 answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Body (as text).
    pub body: String,
}

impl HttpAnswer {
    /// The body's data: without the chunk framing when it came chunked; `None` for a chunked body
    /// that is malformed or was cut.
    pub fn data(&self) -> Option<String> {
        if self.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            dechunk(self.body.as_bytes()).map(|d| String::from_utf8_lossy(&d).into_owned())
        } else {
            Some(self.body.clone())
        }
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A minimal HTTP/1.1 request without a body, with extra `headers`, from inside `netns` (one
/// connection per request, sent exactly as given: method and path are not normalized).
pub async fn http_exchange(
    netns: &NetNs,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpAnswer> {
    http_exchange_with_body(netns, method, addr, path, headers, &[]).await
}

/// [`http_exchange`] with `Host: <host>` instead of the address (a client that resolved `host` to
/// `addr`, as `wget http://<host>/` does).
pub async fn http_exchange_as(
    netns: &NetNs,
    host: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpAnswer> {
    exchange(netns, "GET", addr, host, path, headers, &[]).await
}

/// [`http_exchange`] with a request body (`Content-Length`).
pub async fn http_exchange_with_body(
    netns: &NetNs,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpAnswer> {
    exchange(netns, method, addr, &addr.to_string(), path, headers, body).await
}

async fn exchange(
    netns: &NetNs,
    method: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpAnswer> {
    let socket = netns.tcp_socket(addr.is_ipv6())?;
    let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))??;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let length = body.len();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .with_context(|| format!("reading the answer from {addr}{path} timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP answer")?;
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).context("malformed HTTP status line")?;
    // The body as it came on the wire (a chunked one with its framing: tests look at how it ends).
    Ok(HttpAnswer { status, head: head.to_owned(), body: body.to_owned() })
}

/// The data of a chunked body (RFC 9112 §7.1), extensions and trailers ignored; `None` when it
/// is malformed or ends early.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// The sum of the Prometheus samples in `metrics` whose line starts with `prefix` (e.g.
/// `istio_tcp_connections_opened_total{`) and contains every one of `needles` (label pairs).
pub fn metric_sum(metrics: &str, prefix: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Forwards a loopback port of the harness's namespace to `target` as seen from inside `netns`
/// (what `kubectl port-forward` does): how the harness reaches the CA on the underlay. Runs until
/// the returned task is aborted.
pub async fn port_forward(netns: NetNs, target: SocketAddr) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    port_forward_from(TcpListener::bind("127.0.0.1:0").await?, netns, target)
}

/// [`port_forward`] from a listener of the caller's (a chosen port).
pub fn port_forward_from(
    listener: TcpListener,
    netns: NetNs,
    target: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            let Ok(socket) = netns.tcp_socket(target.is_ipv6()) else { continue };
            tokio::spawn(async move {
                if let Ok(mut outbound) = socket.connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok((local, task))
}

impl Mesh {
    /// A certificate for `namespace/service_account`, asked of the CA with that service
    /// account's token (what a workload with its own token would do).
    pub async fn workload_certificate(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> Result<Arc<proto::tls::Credential>> {
        let ca = self.ca.as_ref().context("the CA is not running")?;
        let (addr, forward) = port_forward(self.underlay.ns.clone(), ca.grpc).await?;
        let mut target = ca.target(None)?;
        target.addr = addr;
        target.server_name = "ca.istio-system.svc".into();
        let id = proto::SpiffeId::new("cluster.local", namespace, service_account)?;
        let token = ca.token(namespace, service_account, None)?;
        let certs = ztunnel::certs::CertManager::new(ztunnel::certs::CertConfig::new(
            target,
            ztunnel::certs::TokenSource::Static(token),
            id.clone(),
        ))?;
        let credential = certs.fetch(&id).await;
        forward.abort();
        Ok(credential?)
    }
}
