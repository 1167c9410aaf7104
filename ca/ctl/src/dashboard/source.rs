//! Where the dashboard's figures come from: a Prometheus ([`PrometheusApi`]: `rate()` queries over
//! the window), or the proxies' own metrics endpoints ([`Scraper`]: scraped every poll, rates from
//! the counters' growth over the window). Both give the same [`Rates`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::graph::{KEPT_LABELS, Labels, NodeKind, Proxy, Rates};
pub use crate::fetch::{http_get, http_url};

/// A Prometheus HTTP API.
#[derive(Debug, Clone)]
pub struct PrometheusApi {
    authority: String,
    prefix: String,
    url: String,
}

#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<AnswerData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AnswerData {
    result: Vec<VectorSample>,
}

#[derive(Debug, Deserialize)]
struct VectorSample {
    metric: Labels,
    value: (f64, String),
}

/// Labels the request queries keep (everything of [`KEPT_LABELS`] but `le`).
fn by(without: &[&str]) -> String {
    KEPT_LABELS.iter().filter(|l| **l != "le" && !without.contains(l)).copied().collect::<Vec<_>>().join(", ")
}

impl PrometheusApi {
    /// The API at `url` (`http://host:port`, with a path prefix when Prometheus serves one).
    pub fn new(url: &str) -> Result<PrometheusApi> {
        let (authority, prefix) = http_url(url)?;
        Ok(PrometheusApi { authority, prefix, url: url.trim_end_matches('/').to_owned() })
    }

    /// The URL it was given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An instant query's samples.
    pub async fn query(&self, promql: &str) -> Result<Vec<(Labels, f64)>> {
        let query = form_urlencoded::Serializer::new(String::new()).append_pair("query", promql).finish();
        let body = http_get(&self.authority, &format!("{}/api/v1/query?{query}", self.prefix)).await?;
        let answer: Answer =
            serde_json::from_slice(&body).with_context(|| format!("{}: not Prometheus' query API", self.url))?;
        if answer.status != "success" {
            bail!("Prometheus refused {promql:?}: {}", answer.error.unwrap_or(answer.status));
        }
        let data = answer.data.context("an answer without data")?;
        Ok(data.result.into_iter().filter_map(|s| Some((s.metric, s.value.1.parse::<f64>().ok()?))).collect())
    }

    /// The rates over `window`.
    pub async fn rates(&self, window: Duration) -> Result<Rates> {
        let w = format!("{}s", window.as_secs().max(1));
        let requests = by(&[]);
        let streams = by(&["response_code"]);
        let queries = [
            format!("sum by ({requests}) (rate(istio_requests_total[{w}]))"),
            format!("sum by ({streams}, le) (rate(istio_request_duration_milliseconds_bucket[{w}]))"),
            format!("sum by ({streams}) (rate(istio_tcp_connections_opened_total[{w}]))"),
            format!("sum by ({streams}) (rate(istio_tcp_sent_bytes_total[{w}]))"),
            format!("sum by ({streams}) (rate(istio_tcp_received_bytes_total[{w}]))"),
            "group by (component, namespace, workload) (up{component=~\"waypoint|ingress-gateway\"} == 1)".to_owned(),
        ];
        let (requests, duration_buckets, connections, sent, received, up) = tokio::try_join!(
            self.query(&queries[0]),
            self.query(&queries[1]),
            self.query(&queries[2]),
            self.query(&queries[3]),
            self.query(&queries[4]),
            self.query(&queries[5]),
        )?;
        // Both directions of a pair are summed when the graph is drawn.
        let bytes = sent.into_iter().chain(received).collect();
        let proxies = up
            .iter()
            .filter_map(|(l, _)| {
                Some(Proxy {
                    kind: NodeKind::of_component(l.get("component")?)?,
                    namespace: l.get("namespace")?.clone(),
                    workload: l.get("workload")?.clone(),
                })
            })
            .collect();
        Ok(Rates { requests, duration_buckets, connections, bytes, proxies })
    }
}

/// A metrics endpoint to scrape, with what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub authority: String,
    /// Its metrics path.
    pub path: String,
    /// `component`, `namespace`, `workload` (and `pod` when known).
    pub labels: Labels,
}

impl Endpoint {
    fn describe(&self) -> String {
        let l = |k: &str| self.labels.get(k).map_or("?", String::as_str);
        format!("{} {}/{} at {}{}", l("component"), l("namespace"), l("workload"), self.authority, self.path)
    }
}

#[derive(Debug, Deserialize)]
struct TargetGroup {
    targets: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The endpoints of Prometheus file-discovery target files (`[{"targets": [...], "labels":
/// {...}}]`, JSON or YAML): `file`, or every `*.json`/`*.yml`/`*.yaml` in directory `file`. A
/// group's `component`, `namespace`, `workload`, `pod` and `__metrics_path__` labels say what it is;
/// without them, the Kubernetes metadata `deploy/prometheus.yaml` relabels (as the one-machine
/// mesh's files carry it) does.
pub fn read_targets(file: &Path) -> Result<Vec<Endpoint>> {
    let mut files = Vec::new();
    if file.is_dir() {
        for entry in std::fs::read_dir(file).with_context(|| format!("reading {}", file.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json" || e == "yml" || e == "yaml") {
                files.push(path);
            }
        }
        files.sort();
    } else {
        files.push(file.to_owned());
    }
    let mut endpoints = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        let groups: Vec<TargetGroup> =
            serde_norway::from_str(&text).with_context(|| format!("{}: not a list of target groups", f.display()))?;
        for g in groups {
            let get = |keys: &[&str]| keys.iter().find_map(|k| g.labels.get(*k).filter(|v| !v.is_empty())).cloned();
            let mut labels = Labels::new();
            let pod = get(&["pod", "__meta_kubernetes_pod_name"]);
            for (name, keys) in [
                ("component", &["component", "__meta_kubernetes_pod_label_app_kubernetes_io_name"][..]),
                ("namespace", &["namespace", "__meta_kubernetes_namespace"]),
                ("workload", &["workload", "__meta_kubernetes_pod_label_service_istio_io_canonical_name"]),
            ] {
                if let Some(v) = get(keys) {
                    labels.insert(name.to_owned(), v);
                }
            }
            if let Some(pod) = pod {
                labels.entry("workload".to_owned()).or_insert_with(|| pod.clone());
                labels.insert("pod".to_owned(), pod);
            }
            let path = get(&["__metrics_path__", "__meta_kubernetes_pod_annotation_prometheus_io_path"])
                .unwrap_or_else(|| "/metrics".to_owned());
            for authority in g.targets {
                endpoints.push(Endpoint { authority, path: path.clone(), labels: labels.clone() });
            }
        }
    }
    Ok(endpoints)
}

/// Which metric a scraped series counts toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    Requests,
    Buckets,
    Connections,
    Bytes,
}

type Counters = HashMap<(Family, Labels), f64>;

/// The counters of the series the graph reads, from one scrape of `endpoint`.
fn counters(text: &str, endpoint: &Endpoint) -> Counters {
    use prometheus_parse::Value;
    let mut out = Counters::new();
    let Ok(scrape) = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))) else {
        return out;
    };
    for sample in scrape.samples {
        let family = match sample.metric.as_str() {
            "istio_requests_total" => Family::Requests,
            "istio_request_duration_milliseconds" => Family::Buckets,
            "istio_tcp_connections_opened_total" => Family::Connections,
            "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => Family::Bytes,
            _ => continue,
        };
        let mut labels: Labels =
            KEPT_LABELS.iter().filter_map(|k| sample.labels.get(k).map(|v| ((*k).to_owned(), v.to_owned()))).collect();
        labels.extend(endpoint.labels.iter().filter(|(k, _)| *k != "pod").map(|(k, v)| (k.clone(), v.clone())));
        match (family, sample.value) {
            (Family::Buckets, Value::Histogram(buckets)) => {
                for b in buckets {
                    let mut l = labels.clone();
                    let le = if b.less_than.is_infinite() { "+Inf".to_owned() } else { b.less_than.to_string() };
                    l.insert("le".to_owned(), le);
                    *out.entry((family, l)).or_default() += b.count;
                }
            }
            (Family::Buckets, _) => {}
            (_, Value::Counter(v) | Value::Untyped(v) | Value::Gauge(v)) if v.is_finite() => {
                *out.entry((family, labels)).or_default() += v;
            }
            _ => {}
        }
    }
    out
}

/// Reads the proxies' metrics endpoints itself.
#[derive(Debug)]
pub struct Scraper {
    targets: PathBuf,
    /// Each endpoint's successful scrapes within the window, oldest first.
    history: HashMap<String, VecDeque<(Instant, Counters)>>,
}

impl Scraper {
    /// Scrapes the endpoints listed in `targets` (re-read every poll: endpoints come and go).
    pub fn new(targets: PathBuf) -> Scraper {
        Scraper { targets, history: HashMap::new() }
    }

    /// Where the endpoints are listed.
    pub fn targets(&self) -> &Path {
        &self.targets
    }

    /// Scrapes every endpoint once and returns the rates over `window` (endpoints scraped once so
    /// far have none yet), and what could not be scraped.
    pub async fn rates(&mut self, window: Duration) -> Result<(Rates, Vec<String>)> {
        let endpoints = read_targets(&self.targets)?;
        let scrapes = futures_util::future::join_all(endpoints.iter().map(|e| async move {
            let body = http_get(&e.authority, &e.path).await?;
            let text = std::str::from_utf8(&body).context("not UTF-8")?;
            anyhow::Ok(counters(text, e))
        }))
        .await;
        let now = Instant::now();
        let mut rates = Rates::default();
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (endpoint, scrape) in endpoints.iter().zip(scrapes) {
            let key = format!("{}{}", endpoint.authority, endpoint.path);
            seen.insert(key.clone());
            let counters = match scrape {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!("{}: {e:#}", endpoint.describe()));
                    continue;
                }
            };
            let labels = |k: &str| endpoint.labels.get(k).cloned();
            if let (Some(kind), Some(namespace), Some(workload)) =
                (labels("component").and_then(|c| NodeKind::of_component(&c)), labels("namespace"), labels("workload"))
            {
                rates.proxies.push(Proxy { kind, namespace, workload });
            }
            let history = self.history.entry(key).or_default();
            history.push_back((now, counters));
            while history.len() > 2 && history.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= window) {
                history.pop_front();
            }
            let (Some((then, before)), Some((_, latest))) = (history.front(), history.back()) else { continue };
            let seconds = now.duration_since(*then).as_secs_f64();
            if history.len() < 2 || seconds <= 0.0 {
                continue;
            }
            for ((family, labels), value) in latest {
                // A series born since the oldest scrape counted from zero; a counter that went
                // down was reset (the proxy restarted), so all it holds is new.
                let start = before.get(&(*family, labels.clone())).copied().filter(|b| *b <= *value).unwrap_or(0.0);
                let rate = (value - start) / seconds;
                let into = match family {
                    Family::Requests => &mut rates.requests,
                    Family::Buckets => &mut rates.duration_buckets,
                    Family::Connections => &mut rates.connections,
                    Family::Bytes => &mut rates.bytes,
                };
                into.push((labels.clone(), rate));
            }
        }
        self.history.retain(|k, _| seen.contains(k));
        Ok((rates, problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        let labels =
            [("component", "waypoint"), ("namespace", "demo"), ("workload", "waypoint"), ("pod", "waypoint-1")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()));
        Endpoint { authority: "10.0.0.1:15020".into(), path: "/metrics".into(), labels: labels.into_iter().collect() }
    }

    const METRICS: &str = "# HELP istio_requests Requests.
# TYPE istio_requests counter
istio_requests_total{reporter=\"waypoint\",source_workload=\"client\",source_principal=\"spiffe://x\",response_code=\"200\"} 12
istio_requests_total{reporter=\"waypoint\",source_workload=\"client\",source_principal=\"spiffe://y\",response_code=\"200\"} 3
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_sum{reporter=\"waypoint\"} 30.5
istio_request_duration_milliseconds_count{reporter=\"waypoint\"} 15
istio_request_duration_milliseconds_bucket{le=\"1.0\",reporter=\"waypoint\"} 10
istio_request_duration_milliseconds_bucket{le=\"+Inf\",reporter=\"waypoint\"} 15
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 4
# EOF
";

    #[test]
    fn a_scrape_keeps_the_graphs_series_summed_over_the_labels_it_drops() {
        let c = counters(METRICS, &endpoint());
        let mut want = Labels::new();
        for (k, v) in [
            ("reporter", "waypoint"),
            ("source_workload", "client"),
            ("response_code", "200"),
            ("component", "waypoint"),
            ("namespace", "demo"),
            ("workload", "waypoint"),
        ] {
            want.insert(k.into(), v.into());
        }
        assert_eq!(c.get(&(Family::Requests, want)), Some(&15.0), "{c:?}");
        let buckets: Vec<(&str, f64)> = c
            .iter()
            .filter(|((f, _), _)| *f == Family::Buckets)
            .map(|((_, l), v)| (l["le"].as_str(), *v))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(buckets, [("+Inf", 15.0), ("1", 10.0)]);
        assert!("+Inf".parse::<f64>().is_ok_and(f64::is_infinite), "the graph reads le=\"+Inf\" back");
        assert_eq!(c.len(), 3, "{c:?}");
    }

    #[test]
    fn garbage_scrapes_yield_nothing_and_never_panic() {
        for text in [
            "",
            "istio_requests_total{a=\"b} 1",
            "istio_requests_total NaN",
            "istio_requests_total{response_code=\"200\"} +Inf",
            "# TYPE istio_request_duration_milliseconds histogram\nistio_request_duration_milliseconds_bucket{le=\"x\"} 2",
            "\u{0}\u{ffff}{=",
            "istio_requests_total{a=\"1\",,} 5 abc",
        ] {
            let c = counters(text, &endpoint());
            assert!(c.values().all(|v| v.is_finite()), "{text:?}: {c:?}");
        }
    }

    #[test]
    fn target_files_name_endpoints_by_plain_or_kubernetes_labels() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("waypoint.json"),
            r#"[{"targets": ["10.1.0.5:15020"], "labels": {
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": "waypoint",
                "__meta_kubernetes_namespace": "demo", "__meta_kubernetes_pod_name": "waypoint-7f9c",
                "__meta_kubernetes_pod_label_service_istio_io_canonical_name": "waypoint",
                "__meta_kubernetes_pod_annotation_prometheus_io_path": "/stats/prometheus"}}]"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("ztunnel.yml"),
            "- targets: ['10.10.0.1:15020', '10.10.0.2:15020']\n  labels: {component: ztunnel, namespace: istio-system, pod: ztunnel-a}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a target file").unwrap();
        let found = read_targets(dir.path()).unwrap();
        let summary: Vec<String> = found.iter().map(|e| e.describe()).collect();
        assert_eq!(
            summary,
            [
                "waypoint demo/waypoint at 10.1.0.5:15020/stats/prometheus",
                "ztunnel istio-system/ztunnel-a at 10.10.0.1:15020/metrics",
                "ztunnel istio-system/ztunnel-a at 10.10.0.2:15020/metrics",
            ]
        );
        std::fs::write(dir.path().join("broken.json"), "{not a list").unwrap();
        let err = read_targets(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("broken.json: not a list of target groups"), "{err:#}");
    }
}
