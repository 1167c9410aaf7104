//! A real Prometheus for the one-machine mesh.
//!
//! The mesh keeps a scrape configuration next to its state (`<state>/prometheus/`): the job of the
//! cluster's Prometheus (`deploy/prometheus.yaml`, compiled in) with its relabelling rules as they
//! are, only the pods discovered from files instead of from the API server ([`ScrapeTargets`]): one
//! file per component, written as the component starts — the CA, each node's ztunnel, each
//! waypoint and ingress gateway — holding the metadata Prometheus' Kubernetes discovery gives a pod
//! (`__meta_kubernetes_pod_ip`, its `prometheus.io/*` annotations, namespace, name, node, phase,
//! `app.kubernetes.io/name` label). So the rules a cluster relies on run here on real components,
//! and Prometheus re-reads the files by itself as components come and go.
//!
//! Prometheus runs in the underlay namespace (it reaches the CA on loopback, the ztunnels on their
//! nodes' addresses and the waypoints on their pods' addresses, as a cluster's Prometheus reaches
//! pod IPs) and answers its HTTP API there ([`Prometheus::query`], [`Prometheus::targets`]). Each
//! target is labelled `component`, `namespace`, `pod` and `node`, as in a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use ztunnel::netns::NetNs;

use crate::ca_process::{output, spawn_child_with, wait_for_port};
use crate::mesh::{http_exchange, http_get, write_atomic};

/// Where Prometheus listens, in the underlay namespace.
pub const LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

/// The cluster's Prometheus manifests (the configuration is their ConfigMap's `prometheus.yml`).
const CLUSTER_MANIFESTS: &str = include_str!("../../deploy/prometheus.yaml");

/// The job of the cluster's configuration that scrapes the mesh's pods.
pub const JOB: &str = "mesh-pods";

/// The scrape configuration of a mesh: `prometheus.yml` and its target files.
#[derive(Debug, Clone)]
pub struct ScrapeTargets {
    dir: PathBuf,
}

/// One component to scrape, described as a pod.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// What it is (its pod's `app.kubernetes.io/name`: `ca`, `ztunnel`, `waypoint`,
    /// `ingress-gateway`, as in `deploy/`).
    pub component: &'static str,
    /// The address of its metrics endpoint, as seen from the underlay (its "pod IP" and its
    /// `prometheus.io/port`).
    pub addr: SocketAddr,
    /// Its `prometheus.io/path`.
    pub path: &'static str,
    /// Its namespace (the CA's and the ztunnels' is `istio-system`, as in a cluster).
    pub namespace: &'a str,
    /// Its pod's name.
    pub pod: &'a str,
    /// Its workload's name (its pods' `service.istio.io/canonical-name`).
    pub workload: &'a str,
    /// The node it runs on.
    pub node: &'a str,
}

/// The cluster's scrape configuration (`deploy/prometheus.yaml`), as a YAML value.
pub fn cluster_config() -> Result<serde_norway::Value> {
    for doc in serde_norway::Deserializer::from_str(CLUSTER_MANIFESTS) {
        let doc = serde_norway::Value::deserialize(doc)?;
        if doc["kind"].as_str() == Some("ConfigMap") {
            let text = doc["data"]["prometheus.yml"].as_str().context("the ConfigMap has no prometheus.yml")?;
            return Ok(serde_norway::from_str(text)?);
        }
    }
    bail!("deploy/prometheus.yaml has no ConfigMap")
}

impl ScrapeTargets {
    /// Writes `prometheus.yml` into `dir` (created): the cluster's [`JOB`] reading pods from
    /// `dir/targets/*.json`, scraping every `interval`.
    pub fn create(dir: &Path, interval: Duration) -> Result<ScrapeTargets> {
        use serde_norway::Value;
        std::fs::create_dir_all(dir.join("targets")).with_context(|| format!("creating {}", dir.display()))?;
        let mut config = cluster_config()?;
        let every = Value::from(format!("{}ms", interval.as_millis().max(1)));
        for key in ["scrape_interval", "evaluation_interval", "scrape_timeout"] {
            config["global"][key] = every.clone();
        }
        let jobs = config["scrape_configs"].as_sequence_mut().context("no scrape_configs")?;
        jobs.retain(|j| j["job_name"].as_str() == Some(JOB));
        let job = jobs.first_mut().with_context(|| format!("no job {JOB} in deploy/prometheus.yaml"))?;
        let job = job.as_mapping_mut().context("a job that is not a mapping")?;
        job.remove("kubernetes_sd_configs").context("the job discovers no Kubernetes pods")?;
        let files = serde_norway::from_str::<Value>(&format!(
            "[{{files: ['{}/targets/*.json'], refresh_interval: 1s}}]",
            dir.display()
        ))?;
        job.insert("file_sd_configs".into(), files);
        let text = format!(
            "# Written by the one-machine mesh: deploy/prometheus.yaml's job, pods listed in targets/*.json.\n{}",
            serde_norway::to_string(&config)?
        );
        write_atomic(&dir.join("prometheus.yml"), &text)?;
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
                "__meta_kubernetes_pod_ip": t.addr.ip().to_string(),
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_port": t.addr.port().to_string(),
                "__meta_kubernetes_pod_annotation_prometheus_io_path": t.path,
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_namespace": t.namespace,
                "__meta_kubernetes_pod_name": t.pod,
                "__meta_kubernetes_pod_node_name": t.node,
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": t.component,
                "__meta_kubernetes_pod_label_service_istio_io_canonical_name": t.workload,
            },
        }]);
        let file = self.dir.join(format!("targets/{}-{}-{}.json", t.component, t.namespace, t.pod));
        write_atomic(&file, &serde_json::to_string_pretty(&entry)?)
    }
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
    /// Its labels after relabelling (`job`, `instance`, `component`, `namespace`, `pod`, `node`).
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
        let answer = http_exchange(&self.netns, "GET", self.addr, path, &[]).await?;
        let (status, body) = (answer.status, answer.data().context("Prometheus' answer was cut")?);
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
                    .map(|t| {
                        format!("{} {} ({}: {})", t.label("component"), t.label("instance"), t.health, t.last_error)
                    })
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
    fn the_configuration_is_the_clusters_job_reading_pods_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let targets = ScrapeTargets::create(&dir.path().join("p"), Duration::from_secs(1)).unwrap();
        let doc: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(targets.config()).unwrap()).unwrap();
        let cluster = cluster_config().unwrap();
        assert_eq!(doc["global"]["scrape_interval"].as_str(), Some("1000ms"));
        let jobs = doc["scrape_configs"].as_sequence().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0]["job_name"].as_str(), Some(JOB));
        // The cluster's relabelling, unchanged.
        assert_eq!(jobs[0]["relabel_configs"], cluster["scrape_configs"][0]["relabel_configs"]);
        assert!(jobs[0].get("kubernetes_sd_configs").is_none());
        let files = jobs[0]["file_sd_configs"][0]["files"][0].as_str().unwrap().to_owned();
        assert_eq!(files, format!("{}/targets/*.json", targets.dir().display()));

        let t = Target {
            component: "ztunnel",
            addr: "10.10.0.1:15020".parse().unwrap(),
            path: "/metrics",
            namespace: "istio-system",
            pod: "ztunnel-node-1",
            workload: "ztunnel",
            node: "node-1",
        };
        targets.add(&t).unwrap();
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(targets.dir().join("targets/ztunnel-istio-system-ztunnel-node-1.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(written[0]["targets"][0], "10.10.0.1:15020");
        assert_eq!(written[0]["labels"]["__meta_kubernetes_pod_ip"], "10.10.0.1");
        assert_eq!(written[0]["labels"]["__meta_kubernetes_pod_annotation_prometheus_io_port"], "15020");
        assert_eq!(written[0]["labels"]["__meta_kubernetes_pod_node_name"], "node-1");
        assert_eq!(written[0]["labels"]["__meta_kubernetes_pod_label_service_istio_io_canonical_name"], "ztunnel");
    }
}
