//! Network plumbing for the one-machine mesh: named network namespaces, veth pairs, bridges,
//! addresses, routes and sysctls, all made with iproute2 and all removed again.
//!
//! Every namespace is named `<prefix>-<role>` where the prefix carries the harness's process id,
//! so namespaces left by a harness that was killed outright are recognised and removed by the next
//! one ([`reap_stale`]). Deleting a namespace takes its interfaces, addresses, routes and rules
//! with it; nothing is ever configured in the host's own namespace.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use ztunnel::netns::NetNs;

/// Prefix of every namespace the harness makes.
pub const PREFIX: &str = "ambe2e";

/// Runs a command, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    /// Its name.
    pub name: String,
    /// A handle for making sockets and processes in it.
    pub ns: NetNs,
}

impl NamedNetns {
    /// Creates the namespace with its loopback up.
    pub fn create(name: &str) -> Result<NamedNetns> {
        // A signal's cleanup lists the namespaces to delete: never while one is being added, and
        // none is added once it ran.
        let creating = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        if interrupted() {
            bail!("interrupted; not creating namespace {name}");
        }
        ip(&["netns", "add", name])?;
        drop(creating);
        let ns = NetNs::open(&Path::new("/run/netns").join(name)).with_context(|| format!("opening netns {name}"))?;
        let named = NamedNetns { name: name.to_owned(), ns };
        named.ip(&["link", "set", "lo", "up"])?;
        Ok(named)
    }

    /// Runs `ip -n <name> args`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside this namespace (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.ns
            .run(|| std::fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in netns {}", self.name))
    }

    /// Creates a veth pair: `local` here, `remote` in `other` (both up).
    pub fn veth(&self, local: &str, other: &NamedNetns, remote: &str) -> Result<()> {
        self.ip(&["link", "add", local, "type", "veth", "peer", "name", remote, "netns", &other.name])?;
        self.ip(&["link", "set", local, "up"])?;
        other.ip(&["link", "set", remote, "up"])
    }

    /// Creates a bridge with `addr` (CIDR) on it.
    ///
    /// The bridge gets a fixed MAC address derived from `addr`. Left to itself a Linux bridge
    /// takes the lowest MAC of its ports, so a pod added later can change the gateway's MAC under
    /// pods already talking through it; a pod whose neighbour entry was refreshed within the last
    /// second ignores the bridge's gratuitous ARP and keeps sending to the old MAC, which the
    /// bridge no longer routes: its connections through the gateway stall until the entry expires.
    pub fn bridge(&self, name: &str, addr: &str) -> Result<()> {
        let mac = bridge_mac(addr)?;
        self.ip(&["link", "add", name, "address", &mac, "type", "bridge"])?;
        self.ip(&["addr", "add", addr, "dev", name])?;
        self.ip(&["link", "set", name, "up"])
    }
}

/// A locally administered MAC for the bridge holding IPv4 `addr` (CIDR): `02:00:` and the address.
fn bridge_mac(addr: &str) -> Result<String> {
    let ip: std::net::Ipv4Addr = addr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("bridge address {addr:?} is not IPv4 CIDR"))?;
    let [a, b, c, d] = ip.octets();
    Ok(format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}"))
}

impl NamedNetns {
    /// Writes `/etc/netns/<name>/<file>`, which `ip netns exec` mounts over `/etc/<file>` for the
    /// commands it runs here (as a kubelet gives a pod its own `resolv.conf` and `hosts`). Removed
    /// with the namespace.
    pub fn etc_file(&self, file: &str, content: &str) -> Result<()> {
        let dir = etc_dir(&self.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(file), content).with_context(|| format!("writing {}/{file}", dir.display()))
    }

    /// Runs `args` in this namespace with `ip netns exec` (so its `/etc/netns` files apply).
    pub fn exec(&self, args: &[&str]) -> Result<std::process::Output> {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("running {args:?} in {}", self.name))
    }
}

fn etc_dir(netns: &str) -> std::path::PathBuf {
    Path::new("/etc/netns").join(netns)
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(netns = %self.name, error = %e, "could not delete a test namespace");
        }
        let dir = etc_dir(&self.name);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Removes namespaces left by harness processes that no longer exist.
pub fn reap_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(netns = %name, "removing a namespace left by a dead harness");
            let _ = ip(&["netns", "del", &name]);
            let _ = std::fs::remove_dir_all(etc_dir(&name));
        }
    }
}

/// Directories to remove with this process's namespaces on a signal (a mesh's state and logs).
static OWN_DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Registers `dir` to be removed by [`remove_own`].
pub fn remove_on_signal(dir: &Path) {
    OWN_DIRS.lock().unwrap_or_else(|p| p.into_inner()).push(dir.to_owned());
}

/// Held while a namespace is being added (see [`NamedNetns::create`]).
static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Removes this process's namespaces (all meshes it built) and registered directories. Its
/// child processes are killed first: a ztunnel or CA still running would write into a directory
/// being removed (a new log line, a renewed certificate) and leave it behind.
pub fn remove_own() {
    let _no_new_namespaces = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    kill_children();
    for dir in OWN_DIRS.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        // The harness's own threads may still be writing (the demo applying an object as the
        // signal came): retry until the directory is gone.
        for _ in 0..50 {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
    let own = format!("{PREFIX}{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&own) {
            let _ = ip(&["netns", "del", &name]);
            let _ = std::fs::remove_dir_all(etc_dir(&name));
        }
    }
}

/// Sends SIGKILL to every direct child of this process and reaps none (the process is about to
/// exit; `init` reaps them).
fn kill_children() {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses, so split after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(own) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a signal arrived and [`install_signal_cleanup`]'s handler is tearing down (the process
/// is about to exit with 130): work failing now failed because of it.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// On SIGINT, SIGTERM or SIGHUP: remove this process's namespaces and exit (130). Child
/// processes die with the process (they were started with `--pdeathsig`). Installed once per
/// process, on a thread of its own, so it works whatever runtime the harness runs in.
pub fn install_signal_cleanup() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new().name("mesh-signals".into()).spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                    (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
                else {
                    let _ = ready_tx.send(());
                    return;
                };
                let _ = ready_tx.send(());
                let name = tokio::select! {
                    _ = int.recv() => "SIGINT",
                    _ = term.recv() => "SIGTERM",
                    _ = hup.recv() => "SIGHUP",
                };
                INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
                eprintln!("{name}: removing the mesh's namespaces and files, and exiting");
                remove_own();
                std::process::exit(130);
            });
        });
        if spawned.is_ok() {
            let _ = ready_rx.recv();
        }
    });
}

/// Checks that the harness can run here: root, and the tools it uses.
pub fn preflight() -> Result<()> {
    if !nix_is_root() {
        bail!("the one-machine mesh needs root (network namespaces, nftables)");
    }
    for tool in ["ip", "nft", "setpriv"] {
        let found =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false);
        if !found {
            bail!("`{tool}` not found: install iproute2, nftables and util-linux");
        }
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac_of(netns: &NamedNetns, dev: &str) -> String {
        let out = Command::new("ip").args(["-n", &netns.name, "-br", "link", "show", dev]).output().unwrap();
        let line = String::from_utf8(out.stdout).unwrap();
        line.split_whitespace().nth(2).unwrap_or_default().to_owned()
    }

    /// A port added with a lower MAC than the bridge's must not change the gateway's MAC (it did:
    /// pods kept sending to the old one and their connections through the gateway stalled).
    #[test]
    fn a_bridge_keeps_its_mac_when_a_port_with_a_lower_one_joins() {
        preflight().unwrap();
        let pid = std::process::id();
        let node = NamedNetns::create(&format!("{PREFIX}{pid}-brmac")).unwrap();
        let pod = NamedNetns::create(&format!("{PREFIX}{pid}-brmac-pod")).unwrap();
        node.bridge("br0", "10.77.0.1/24").unwrap();
        let before = mac_of(&node, "br0");
        node.ip(&[
            "link",
            "add",
            "p1",
            "address",
            "02:00:00:00:00:01",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &pod.name,
        ])
        .unwrap();
        node.ip(&["link", "set", "p1", "master", "br0"]).unwrap();
        node.ip(&["link", "set", "p1", "up"]).unwrap();
        assert_eq!(mac_of(&node, "p1"), "02:00:00:00:00:01");
        assert_eq!(mac_of(&node, "br0"), before, "the bridge took its new port's lower MAC");
        assert_eq!(before, "02:00:0a:4d:00:01");
    }

    #[test]
    fn a_bridge_mac_is_made_from_its_ipv4_address() {
        assert_eq!(bridge_mac("10.20.3.1/24").unwrap(), "02:00:0a:14:03:01");
        assert!(bridge_mac("fd00::1/64").is_err());
    }
}
