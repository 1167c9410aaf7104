//! A real Prometheus for the one-machine mesh.
//!
//! The mesh keeps a scrape configuration next to its state (`<state>/prometheus/`): one
//! `prometheus.yml` whose jobs read their targets from files ([`ScrapeTargets`], Prometheus'
//! `file_sd_configs`), and one target file per component, written as the component starts — the
//! CA, each node's ztunnel, each waypoint and ingress gateway. Prometheus re-reads those files by
//! itself, so targets added while it runs are picked up without a reload.
//!
//! Prometheus runs in the underlay namespace (it reaches the CA on loopback, the ztunnels on their
//! nodes' addresses and the waypoints on their pods' addresses, as a cluster's Prometheus reaches
//! pod IPs) and answers its HTTP API there ([`Prometheus::query`], [`Prometheus::targets`]).
//! Every target carries the labels a Kubernetes pod scrape gives (`namespace`, `pod`, `node`),
//! so dashboards written for a cluster read the one-machine mesh too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use ztunnel::netns::NetNs;

use crate::ca_process::{output, spawn_child_with, wait_for_port};
use crate::mesh::http_get;

/// Where Prometheus listens, in the underlay namespace.
pub const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

/// The jobs of the scrape configuration, one per kind of component.
pub const JOBS: [&str; 4] = ["ca", "ztunnel", "waypoint", "gateway"];

/// The scrape configuration of a mesh: `prometheus.yml` and its target files.
#[derive(Debug, Clone)]
pub struct ScrapeTargets {
    dir: PathBuf,
}

/// One component to scrape.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Its job ([`JOBS`]).
    pub job: &'static str,
    /// The address of its metrics endpoint, as seen from the underlay.
    pub addr: SocketAddr,
    /// Its metrics path.
    pub path: &'static str,
    /// Its namespace (the CA's and the ztunnels' is `istio-system`, as in a cluster).
    pub namespace: &'a str,
    /// Its pod's name.
    pub pod: &'a str,
    /// The node it runs on.
    pub node: &'a str,
}

impl ScrapeTargets {
    /// Writes `prometheus.yml` into `dir` (created), scraping every `interval`.
    pub fn create(dir: &Path, interval: Duration) -> Result<ScrapeTargets> {
        std::fs::create_dir_all(dir.join("targets")).with_context(|| format!("creating {}", dir.display()))?;
        let every = format!("{}ms", interval.as_millis().max(1));
        let mut yaml = format!(
            "# Written by the one-machine mesh. Prometheus re-reads targets/*.json as components start.\n\
             global:\n  scrape_interval: {every}\n  evaluation_interval: {every}\n  scrape_timeout: {every}\n\
             scrape_configs:\n"
        );
        for job in JOBS {
            yaml.push_str(&format!(
                "  - job_name: {job}\n    file_sd_configs:\n      - files: ['{}/targets/{job}-*.json']\n        refresh_interval: 1s\n",
                dir.display()
            ));
        }
        write_atomic(&dir.join("prometheus.yml"), &yaml)?;
        Ok(ScrapeTargets { dir: dir.to_owned() })
    }

    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    /// The directory (configuration, targets, and the data of a Prometheus started on it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds (or replaces) a target; a running Prometheus picks it up within a second.
    pub fn add(&self, t: &Target<'_>) -> Result<()> {
        let entry = serde_json::json!([{
            "targets": [t.addr.to_string()],
            "labels": {
                "__metrics_path__": t.path,
                "namespace": t.namespace,
                "pod": t.pod,
                "node": t.node,
            },
        }]);
        let file = self.dir.join(format!("targets/{}-{}-{}.json", t.job, t.namespace, t.pod));
        write_atomic(&file, &serde_json::to_string_pretty(&entry)?)
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The `prometheus` binary: `PROMETHEUS`, else the first on `PATH`.
pub fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("prometheus")).find(|p| p.is_file())
}

/// A running Prometheus (killed on drop).
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    netns: NetNs,
    addr: SocketAddr,
}

/// One active target, as `/api/v1/targets` reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct ActiveTarget {
    /// Its labels after relabelling (`job`, `instance`, `namespace`, `pod`, `node`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub health: String,
    /// Why the last scrape failed.
    #[serde(rename = "lastError")]
    pub last_error: String,
}

impl ActiveTarget {
    /// A label's value (empty when absent).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// One series of an instant query's answer.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer<T> {
    status: String,
    data: Option<T>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct TargetsData {
    #[serde(rename = "activeTargets")]
    active: Vec<ActiveTarget>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    kind: String,
    result: Vec<VectorEntry>,
}

#[derive(Deserialize)]
struct VectorEntry {
    metric: std::collections::BTreeMap<String, String>,
    value: (f64, String),
}

impl Prometheus {
    /// Starts `binary` on `targets`' configuration inside `netns`, listening on `addr` there,
    /// its log in `log`; returns once it answers.
    pub fn start(binary: &Path, targets: &ScrapeTargets, netns: &NetNs, addr: SocketAddr, log: &Path) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg(format!("--config.file={}", targets.config().display()))
            .arg(format!("--storage.tsdb.path={}", targets.dir().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let (stdout, stderr) = output(Some(log), false)?;
        let mut child = spawn_child_with(&command, Some(netns), stdout, stderr)?;
        wait_for_port(&mut child, "prometheus", addr, Some(netns))?;
        Ok(Prometheus { child, netns: netns.clone(), addr })
    }

    /// Where it listens (in the underlay namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn api<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = http_get(&self.netns, self.addr, path).await?;
        let answer: Answer<T> = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {path} with {status} and not its API's JSON: {body}"))?;
        match (answer.status.as_str(), answer.data) {
            ("success", Some(data)) => Ok(data),
            _ => bail!("Prometheus refused {path} ({status}): {}", answer.error.unwrap_or_default()),
        }
    }

    /// Its active targets.
    pub async fn targets(&self) -> Result<Vec<ActiveTarget>> {
        Ok(self.api::<TargetsData>("/api/v1/targets?state=active").await?.active)
    }

    /// An instant query (PromQL) whose answer is a vector.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let query: String = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
        let data = self.api::<QueryData>(&format!("/api/v1/query?{query}")).await?;
        if data.kind != "vector" {
            bail!("{promql}: a {} answer, not a vector", data.kind);
        }
        data.result
            .into_iter()
            .map(|e| {
                let value = e.value.1.parse().with_context(|| format!("{promql}: value {:?}", e.value.1))?;
                Ok(Sample { labels: e.metric, value })
            })
            .collect()
    }

    /// Waits until every active target has been scraped successfully and `expected` targets
    /// are active; the targets, or an error naming the ones down and why.
    pub async fn all_up(&self, expected: usize, timeout: Duration) -> Result<Vec<ActiveTarget>> {
        let deadline = Instant::now() + timeout;
        // It answers 503 until its storage is open.
        while http_get(&self.netns, self.addr, "/-/ready").await?.0 != 200 {
            if Instant::now() > deadline {
                bail!("Prometheus not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let targets = self.targets().await?;
            if targets.len() >= expected && targets.iter().all(|t| t.health == "up") {
                return Ok(targets);
            }
            if Instant::now() > deadline {
                let down: Vec<String> = targets
                    .iter()
                    .filter(|t| t.health != "up")
                    .map(|t| format!("{} {} ({}: {})", t.label("job"), t.label("instance"), t.health, t.last_error))
                    .collect();
                bail!("{} of {expected} targets active; not up: {}", targets.len(), down.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_reads_one_target_file_per_component() {
        let dir = tempfile::tempdir().unwrap();
        let targets = ScrapeTargets::create(&dir.path().join("p"), Duration::from_secs(1)).unwrap();
        let yaml = std::fs::read_to_string(targets.config()).unwrap();
        let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        let jobs: Vec<&str> =
            doc["scrape_configs"].as_array().unwrap().iter().map(|j| j["job_name"].as_str().unwrap()).collect();
        assert_eq!(jobs, JOBS);
        assert_eq!(doc["global"]["scrape_interval"], "1000ms");
        let files = &doc["scrape_configs"][1]["file_sd_configs"][0]["files"][0];
        assert_eq!(files.as_str().unwrap(), format!("{}/targets/ztunnel-*.json", targets.dir().display()));

        let t = Target {
            job: "ztunnel",
            addr: "10.10.0.1:15020".parse().unwrap(),
            path: "/metrics",
            namespace: "istio-system",
            pod: "ztunnel-node-1",
            node: "node-1",
        };
        targets.add(&t).unwrap();
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(targets.dir().join("targets/ztunnel-istio-system-ztunnel-node-1.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written[0]["targets"][0], "10.10.0.1:15020");
        assert_eq!(written[0]["labels"]["node"], "node-1");
        assert_eq!(written[0]["labels"]["__metrics_path__"], "/metrics");
    }
}
