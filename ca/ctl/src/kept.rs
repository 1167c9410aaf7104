//! A one-machine mesh left running (`demo --keep`) says where it is, so `ambientctl` can reach it
//! without flags: the network namespace its CA listens in and the CA's address, certificate name
//! and state directory, the YAML directory the CA reads, and each node's network namespace.
//!
//! Each kept mesh writes `<REGISTRY>/<pid>/mesh.json` and removes the directory when it stops.
//! An entry whose process is gone (killed before it could clean up) is ignored and removed; a
//! process is known by its pid and its start time, so a reused pid does not revive an entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where kept meshes register, unless `AMBIENT_MESH_REGISTRY` names another directory.
pub const REGISTRY: &str = "/run/ambient-mesh";

fn registry() -> PathBuf {
    std::env::var_os("AMBIENT_MESH_REGISTRY").map_or_else(|| PathBuf::from(REGISTRY), PathBuf::from)
}

/// What `ambientctl` needs to reach a kept mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptMesh {
    /// The process keeping it (the demo).
    pub pid: u32,
    /// When that process started ([`process_start`]); 0: unknown, the pid alone is checked.
    #[serde(default)]
    pub started: u64,
    /// The CA's gRPC address, reachable inside `ca_netns`.
    pub ca_addr: SocketAddr,
    /// The name the CA's certificate is valid for.
    pub ca_name: String,
    /// The network namespace to reach the CA from (`ip netns` name).
    pub ca_netns: String,
    /// The CA's state directory (its root certificate and admin credential).
    pub state_dir: PathBuf,
    /// The YAML directory the CA reads.
    pub config_dir: PathBuf,
    /// Each node's name and network namespace, where its ztunnel's admin endpoint listens.
    pub nodes: BTreeMap<String, String>,
    /// A Prometheus scraping the mesh, reachable from this machine's network (`http://…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// The Prometheus target files listing the mesh's metrics endpoints, reachable inside
    /// `ca_netns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape_targets: Option<PathBuf>,
}

impl KeptMesh {
    /// Registers this mesh in [`REGISTRY`]; returns the directory to remove when it stops.
    pub fn register(&self) -> std::io::Result<PathBuf> {
        self.register_in(&registry())
    }

    fn register_in(&self, registry: &Path) -> std::io::Result<PathBuf> {
        let dir = registry.join(self.pid.to_string());
        std::fs::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(".mesh.json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, dir.join("mesh.json"))?;
        Ok(dir)
    }

    /// The kept mesh whose process is alive: `None` when there is none, an error naming them
    /// when there are several (then flags must say which).
    pub fn find() -> Result<Option<KeptMesh>, KeptError> {
        find_in(&registry(), |m| process_start(m.pid).is_some_and(|s| m.started == 0 || s == m.started))
    }

    /// The network namespace of node `name`.
    pub fn node_netns(&self, name: &str) -> Result<&str, KeptError> {
        self.nodes.get(name).map(String::as_str).ok_or_else(|| KeptError::NoNode {
            name: name.to_owned(),
            known: self.nodes.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }
}

/// Why no one kept mesh could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeptError {
    /// More than one is running.
    #[error(
        "several one-machine meshes are kept ({0}); say which with --config-dir, or the CA's --server and --state-dir"
    )]
    Several(String),
    /// The mesh has no such node.
    #[error("the kept mesh has no node {name:?} (its nodes: {known})")]
    NoNode {
        /// The node asked for.
        name: String,
        /// Those it has.
        known: String,
    },
}

/// When process `pid` started, in clock ticks after boot (`/proc/<pid>/stat`, field 22); `None`
/// when there is no such process.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_name = stat.rsplit_once(')')?.1;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn find_in(registry: &Path, alive: impl Fn(&KeptMesh) -> bool) -> Result<Option<KeptMesh>, KeptError> {
    let Ok(entries) = std::fs::read_dir(registry) else { return Ok(None) };
    let mut found = Vec::new();
    for dir in entries.flatten().map(|e| e.path()) {
        // A directory without a readable entry may be one being written: left alone.
        let Some(mesh) =
            std::fs::read(dir.join("mesh.json")).ok().and_then(|b| serde_json::from_slice::<KeptMesh>(&b).ok())
        else {
            continue;
        };
        if alive(&mesh) {
            found.push(mesh);
        } else {
            // Its process was killed before it could remove it (best effort: the caller may not
            // be allowed to).
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => {
            found.sort_by_key(|m| m.pid);
            let list: Vec<String> =
                found.iter().map(|m| format!("pid {} (objects in {})", m.pid, m.config_dir.display())).collect();
            Err(KeptError::Several(list.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mesh(pid: u32) -> KeptMesh {
        KeptMesh {
            pid,
            started: 0,
            ca_addr: "10.10.0.254:15012".parse().unwrap(),
            ca_name: "10.10.0.254".into(),
            ca_netns: format!("underlay-{pid}"),
            state_dir: format!("/tmp/m{pid}/state").into(),
            config_dir: format!("/tmp/m{pid}/objects").into(),
            nodes: BTreeMap::from([("node-1".into(), format!("n1-{pid}"))]),
            prometheus: None,
            scrape_targets: None,
        }
    }

    #[test]
    fn only_a_living_mesh_is_found_and_two_are_an_error() {
        let registry = tempfile::tempdir().unwrap();
        assert_eq!(find_in(&registry.path().join("absent"), |_| true), Ok(None));
        mesh(10).register_in(registry.path()).unwrap();
        mesh(20).register_in(registry.path()).unwrap();
        std::fs::create_dir(registry.path().join("30")).unwrap();
        std::fs::write(registry.path().join("30/mesh.json"), "{not json").unwrap();
        let both = find_in(registry.path(), |_| true).unwrap_err().to_string();
        assert!(both.contains("pid 10") && both.contains("pid 20"), "{both}");
        // A dead one is passed over and its entry removed; the unreadable one is left alone.
        assert_eq!(find_in(registry.path(), |m| m.pid == 20), Ok(Some(mesh(20))));
        assert!(!registry.path().join("10").exists(), "the dead mesh's entry stayed");
        assert!(registry.path().join("30").exists());
        assert_eq!(find_in(registry.path(), |_| false), Ok(None));
        assert!(!registry.path().join("20").exists());
        assert_eq!(mesh(20).node_netns("node-1"), Ok("n1-20"));
        assert!(mesh(20).node_netns("node-3").unwrap_err().to_string().contains("its nodes: node-1"));
    }

    #[test]
    fn a_process_is_known_by_its_start_time() {
        let me = process_start(std::process::id()).expect("this process has a start time");
        assert!(me > 0);
        assert_eq!(process_start(std::process::id()), Some(me), "the same process, the same time");
        // pid 1 started before this test did.
        assert!(process_start(1).is_some_and(|init| init <= me));
        assert_eq!(process_start(u32::MAX), None);
    }
}
