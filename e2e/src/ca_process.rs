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

impl CaProcess {
    /// Starts `binary` reading objects from `config_dir`, keeping its state in `state`; waits
    /// until its gRPC port accepts connections. `log` passes RUST_LOG through and shows output.
    pub fn start(binary: &Path, config_dir: &Path, state: &Path, log: Option<&str>) -> Result<CaProcess> {
        let keys = tempfile::tempdir()?;
        let tokens = Arc::new(TokenSigner::new(ISSUER, None).map_err(anyhow::Error::msg)?);
        let jwks = keys.path().join("jwks.json");
        std::fs::write(&jwks, serde_json::to_string(tokens.jwks())?)?;
        let grpc = free_port()?;
        let admin = free_port()?;
        let mut child = Command::new(binary)
            .args(["--config-dir", &config_dir.display().to_string()])
            .args(["--state-dir", &state.display().to_string()])
            .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string()])
            .args(["--jwt-issuer", ISSUER, "--jwks-file", &jwks.display().to_string()])
            .env("RUST_LOG", log.unwrap_or("warn"))
            .stdout(if log.is_some() { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log.is_some() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(grpc).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited during startup: {status}", binary.display());
            }
            if Instant::now() > deadline {
                bail!("{} did not open {grpc} within 30 s", binary.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(CaProcess { child, grpc, admin, state: state.to_owned(), tokens, _keys: keys })
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
        })
    }
}
