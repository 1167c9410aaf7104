//! The real `ca` binary as a child process, with what a client needs to talk to it: the roots it
//! wrote, and a token issuer it trusts (playing the kubelet's part: there is no API server here).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ca::auth::{DEFAULT_AUDIENCE, TokenRequest, TokenSigner};
use proto::control::ControlPlaneTarget;
use proto::tls::{Credential, SharedTrustBundle, TrustBundle};

/// Issuer of the tokens the harness mints.
pub const ISSUER: &str = "https://kubelet.e2e.local";

/// A running `ca`; killed on drop.
#[derive(Debug)]
pub struct CaProcess {
    child: Child,
    /// gRPC (TLS) address.
    pub grpc: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// Its state directory.
    pub state: PathBuf,
    /// The token issuer it trusts.
    pub tokens: Arc<TokenSigner>,
    _keys: tempfile::TempDir,
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free localhost port (bound then released).
pub fn free_port() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The `ca` binary to run: `explicit` if given, else the one next to the running binary.
pub fn ca_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(p) => Ok(p.to_owned()),
        None => sibling_binary("ca"),
    }
}

/// A binary next to the running one (both built by `cargo build --release -p ca -p e2e`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!("{} not found: build it first with `cargo build --release -p ca -p e2e`", path.display());
    }
    Ok(path)
}

/// Resident and peak memory of a process, MiB.
pub fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU time (user + system) a process has used, seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("unexpected /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// How to launch the `ca` process.
#[derive(Debug, Clone)]
pub struct CaLaunch {
    /// The binary.
    pub binary: PathBuf,
    /// Directory of Kubernetes YAML it reads.
    pub config_dir: PathBuf,
    /// Its state directory (kept across restarts).
    pub state: PathBuf,
    /// gRPC (TLS) address.
    pub grpc: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// The token issuer it trusts (kept across restarts, so minted tokens stay valid).
    pub tokens: Arc<TokenSigner>,
    /// Network namespace to run in (default: the harness's).
    pub netns: Option<ztunnel::netns::NetNs>,
    /// RUST_LOG for it.
    pub log_filter: String,
    /// Where its output goes (appended); `None`: discarded.
    pub log_file: Option<PathBuf>,
    /// More arguments.
    pub extra_args: Vec<String>,
}

/// Identity of the one workload in [`bench_config`].
pub const BENCH_IDENTITY: &str = "spiffe://cluster.local/ns/bench/sa/client";

/// A config directory under `dir` holding one pod (`bench/client` on `node-1`), for benchmarks
/// that ask the CA for certificates.
pub fn bench_config(dir: &Path) -> Result<PathBuf> {
    let config = dir.join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: bench\nspec:\n  nodeName: node-1\n  serviceAccountName: client\n  containers: []\nstatus:\n  podIP: 10.0.0.1\n",
    )?;
    Ok(config)
}

impl CaLaunch {
    /// Loopback defaults: free ports, a new token issuer, warnings only, output discarded.
    pub fn local(binary: &Path, config_dir: &Path, state: &Path) -> Result<CaLaunch> {
        Ok(CaLaunch {
            binary: binary.to_owned(),
            config_dir: config_dir.to_owned(),
            state: state.to_owned(),
            grpc: free_port()?,
            admin: free_port()?,
            tokens: Arc::new(TokenSigner::new(ISSUER, None)?),
            netns: None,
            log_filter: "warn".into(),
            log_file: None,
            extra_args: Vec::new(),
        })
    }
}

/// Output of a child process: inherited, a file (appended), or nothing.
pub fn output(log_file: Option<&Path>, inherit: bool) -> Result<(Stdio, Stdio)> {
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
        }
        None if inherit => Ok((Stdio::inherit(), Stdio::inherit())),
        None => Ok((Stdio::null(), Stdio::null())),
    }
}

/// Spawns `command` with `stdout`/`stderr`, inside `netns` if given, killed with SIGKILL if the
/// spawning thread dies (`setpriv --pdeathsig`), so nothing outlives a harness that is killed
/// outright.
pub fn spawn_child_with(
    command: &Command,
    netns: Option<&ztunnel::netns::NetNs>,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child> {
    let program = command.get_program().to_owned();
    let mut wrapped = Command::new("setpriv");
    wrapped.args(["--pdeathsig", "KILL", "--"]).arg(&program).args(command.get_args());
    for (k, v) in command.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    let spawn = |mut c: Command| c.spawn().with_context(|| format!("starting {}", program.to_string_lossy()));
    match netns {
        Some(ns) => {
            let mut result = None;
            ns.run(|| {
                result = Some(spawn(wrapped));
                Ok(())
            })?;
            result.context("spawn did not run")?
        }
        None => spawn(wrapped),
    }
}

/// A helper process, killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` accepts TCP connections (from `netns`), or the child exits, or 30 s pass.
pub fn wait_for_port(
    child: &mut Child,
    what: &str,
    addr: SocketAddr,
    netns: Option<&ztunnel::netns::NetNs>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connected = match netns {
            Some(ns) => ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))).is_ok(),
            None => std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
        };
        if connected {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during startup: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not open {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl CaProcess {
    /// Starts `binary` on loopback reading objects from `config_dir`, keeping its state in
    /// `state`; waits until its gRPC port accepts connections. `log` passes RUST_LOG through and
    /// shows output.
    pub fn start(binary: &Path, config_dir: &Path, state: &Path, log: Option<&str>) -> Result<CaProcess> {
        let mut launch = CaLaunch::local(binary, config_dir, state)?;
        if let Some(filter) = log {
            launch.log_filter = filter.to_owned();
        }
        Self::launch(&launch, log.is_some())
    }

    /// Starts the CA as `launch` says; `inherit_output` shows its output when no log file is set.
    pub fn launch(launch: &CaLaunch, inherit_output: bool) -> Result<CaProcess> {
        let keys = tempfile::tempdir()?;
        crate::topology::remove_on_signal(keys.path());
        let jwks = keys.path().join("jwks.json");
        std::fs::write(&jwks, serde_json::to_string(launch.tokens.jwks())?)?;
        let mut command = Command::new(&launch.binary);
        command
            .args(["--config-dir", &launch.config_dir.display().to_string()])
            .args(["--state-dir", &launch.state.display().to_string()])
            .args(["--grpc-addr", &launch.grpc.to_string(), "--admin-addr", &launch.admin.to_string()])
            .args(["--jwt-issuer", ISSUER, "--jwks-file", &jwks.display().to_string()])
            .args(&launch.extra_args)
            .env("RUST_LOG", &launch.log_filter);
        let (stdout, stderr) = output(launch.log_file.as_deref(), inherit_output)?;
        let mut child = spawn_child_with(&command, launch.netns.as_ref(), stdout, stderr)?;
        wait_for_port(&mut child, &launch.binary.display().to_string(), launch.grpc, launch.netns.as_ref())?;
        Ok(CaProcess {
            child,
            grpc: launch.grpc,
            admin: launch.admin,
            state: launch.state.clone(),
            tokens: launch.tokens.clone(),
            _keys: keys,
        })
    }

    /// Stops it (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A service-account token it accepts.
    pub fn token(&self, namespace: &str, service_account: &str, node: Option<&str>) -> Result<String> {
        self.tokens
            .mint(&TokenRequest {
                namespace,
                service_account,
                pod: None,
                node,
                audience: DEFAULT_AUDIENCE,
                ttl: Duration::from_secs(3600),
            })
            .map_err(anyhow::Error::msg)
    }

    /// How to reach it, trusting the roots it wrote to its state directory.
    pub fn target(&self, credential: Option<Arc<Credential>>) -> Result<ControlPlaneTarget> {
        let pem = std::fs::read(self.state.join("root-cert.pem"))?;
        Ok(ControlPlaneTarget {
            addr: self.grpc,
            server_name: "localhost".into(),
            trust: SharedTrustBundle::new(TrustBundle::from_pem(&pem)?),
            credential,
            cluster_id: None,
        })
    }
}
