//! From metric rates to the service graph: which workloads and services talk, through which
//! proxies, how much, how well and how securely.
//!
//! The input is [`Rates`]: per-second rates of Istio's standard metrics, each series with its
//! labels plus the labels of the proxy that reported it (`component`, `namespace`, `workload`, as
//! `deploy/prometheus.yaml` attaches them). The same rates come from Prometheus (`rate()` queries)
//! or from the proxies' own endpoints (two scrapes apart), so the graph is built one way for both.
//!
//! What each report draws:
//! - a **waypoint** (`reporter="waypoint"`) saw requests from a client to a service, answered by an
//!   endpoint: client → waypoint → service → endpoint;
//! - an **ingress gateway** (`reporter="source"`, component `ingress-gateway`) saw requests from
//!   outside: outside → gateway → service → endpoint (when a waypoint reports the gateway's
//!   requests to that service too, the waypoint's report draws the rest of the path);
//! - a **ztunnel** saw connections: client → server, from the server's side when it reported
//!   them (`reporter="destination"`), else from the client's. Connections a proxy opened are
//!   already drawn by that proxy's requests (their mutual TLS marks the proxy's hops); connections
//!   to a proxy add their figures to the client → proxy edge.
//!
//! An edge carries requests per second, the share answered 5xx, p50/p99 latency (from summed
//! histogram buckets, interpolated as PromQL's `histogram_quantile` does), connections and bytes
//! per second, and whether the hop is mutual TLS.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// Labels of one series.
pub type Labels = BTreeMap<String, String>;

/// The labels the graph reads; everything else is summed away.
pub const KEPT_LABELS: [&str; 12] = [
    "component",
    "namespace",
    "workload",
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "response_code",
    "connection_security_policy",
    "le",
];

/// Per-second rates of the metrics the graph is drawn from.
#[derive(Debug, Clone, Default)]
pub struct Rates {
    /// `istio_requests_total`.
    pub requests: Vec<(Labels, f64)>,
    /// `istio_request_duration_milliseconds_bucket` (each with its `le` label).
    pub duration_buckets: Vec<(Labels, f64)>,
    /// `istio_tcp_connections_opened_total`.
    pub connections: Vec<(Labels, f64)>,
    /// `istio_tcp_sent_bytes_total` + `istio_tcp_received_bytes_total`.
    pub bytes: Vec<(Labels, f64)>,
    /// The proxies known to be running, whether or not they carried traffic.
    pub proxies: Vec<Proxy>,
}

/// A waypoint or ingress gateway.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Proxy {
    /// What it is.
    pub kind: NodeKind,
    /// Its namespace.
    pub namespace: String,
    /// Its workload (Deployment) name, as ztunnel names it.
    pub workload: String,
}

/// What a node of the graph stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    /// An application's pods.
    Workload,
    /// A service (what clients address).
    Service,
    /// A namespace's L7 proxy.
    Waypoint,
    /// An ingress gateway.
    Gateway,
    /// Clients outside the mesh, or peers the mesh cannot name.
    Unknown,
}

impl NodeKind {
    /// The kind of proxy a scrape target's `component` label names.
    pub fn of_component(component: &str) -> Option<NodeKind> {
        match component {
            "waypoint" => Some(NodeKind::Waypoint),
            "ingress-gateway" => Some(NodeKind::Gateway),
            _ => None,
        }
    }
}

/// A node of the graph.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// `workload:<namespace>/<name>`, `service:<hostname>` or `unknown`.
    pub id: String,
    /// What it stands for.
    pub kind: NodeKind,
    /// Its short name (a service's first DNS label).
    pub name: String,
    /// Its namespace (empty for [`NodeKind::Unknown`]).
    pub namespace: String,
}

/// An edge of the graph: traffic from one node to another over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Edge {
    /// `<source id> -> <target id>`.
    pub id: String,
    /// The source node's id.
    pub source: String,
    /// The target node's id.
    pub target: String,
    /// `http` when requests were seen, else `tcp`.
    pub protocol: &'static str,
    /// Requests per second.
    pub rps: f64,
    /// The share of requests answered 5xx (or not answered), 0–1; `None` without requests.
    pub error_rate: Option<f64>,
    /// Median latency in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: Option<f64>,
    /// Connections opened per second.
    pub cps: f64,
    /// Bytes per second, both ways.
    pub bytes_per_s: f64,
    /// Mutual TLS on every connection seen (`Some(true)`), plaintext on some (`Some(false)`), or
    /// not known.
    pub mtls: Option<bool>,
}

/// A service's golden signals over the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Signals {
    /// Requests per second.
    pub rps: f64,
    /// The share answered 5xx, 0–1.
    pub error_rate: Option<f64>,
    /// Median latency in milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: Option<f64>,
}

/// The service graph.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Graph {
    /// Nodes, by id.
    pub nodes: Vec<Node>,
    /// Edges, by id.
    pub edges: Vec<Edge>,
    /// Each service's signals, by hostname.
    pub services: BTreeMap<String, Signals>,
}

/// Rates smaller than this are noise (a counter that did not move).
const IDLE: f64 = 1e-9;

/// What is summed onto an edge (or a service).
#[derive(Debug, Default)]
struct Tally {
    rps: f64,
    errors: f64,
    /// Cumulative bucket rates by upper bound (`f64::to_bits` keeps them ordered for finite
    /// positive bounds and +Inf).
    buckets: BTreeMap<u64, f64>,
    cps: f64,
    bytes: f64,
    secure: bool,
    plaintext: bool,
    /// Requests that went out from a proxy whose own label does not say (a gateway's
    /// `connection_security_policy="unknown"`): the proxy, to look its connections up.
    via_proxy: BTreeSet<String>,
}

impl Tally {
    fn quantile(&self, q: f64) -> Option<f64> {
        quantile(q, self.buckets.iter().map(|(le, rate)| (f64::from_bits(*le), *rate)))
    }

    fn security(&mut self, policy: Option<&str>) {
        match policy {
            Some("mutual_tls") => self.secure = true,
            Some("none") => self.plaintext = true,
            _ => {}
        }
    }
}

/// PromQL's `histogram_quantile` over cumulative bucket rates sorted by upper bound: linear
/// interpolation inside the bucket holding the rank; the highest finite bound when the rank falls
/// in the +Inf bucket; `None` without observations.
pub fn quantile(q: f64, buckets: impl Iterator<Item = (f64, f64)>) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = buckets.collect();
    let total = buckets.last()?.1;
    if total <= IDLE || !buckets.last()?.0.is_infinite() {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(below.0);
            }
            if count - below.1 <= IDLE {
                return Some(le);
            }
            return Some(below.0 + (le - below.0) * (rank - below.1) / (count - below.1));
        }
        below = (le, count);
    }
    Some(below.0)
}

fn label<'a>(labels: &'a Labels, name: &str) -> Option<&'a str> {
    labels.get(name).map(String::as_str).filter(|v| !v.is_empty() && *v != "unknown")
}

fn workload_id(namespace: &str, name: &str) -> String {
    format!("workload:{namespace}/{name}")
}

/// Builds nodes and edges as it reads the series.
#[derive(Debug, Default)]
struct Builder {
    nodes: BTreeMap<String, Node>,
    edges: BTreeMap<(String, String), Tally>,
    services: BTreeMap<String, Tally>,
    proxies: BTreeMap<(String, String), NodeKind>,
}

impl Builder {
    fn node(&mut self, id: String, kind: NodeKind, name: &str, namespace: &str) -> String {
        self.nodes.entry(id.clone()).or_insert_with(|| Node {
            id: id.clone(),
            kind,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        });
        id
    }

    fn unknown(&mut self) -> String {
        self.node("unknown".into(), NodeKind::Unknown, "unknown", "")
    }

    /// The workload `namespace/name`: drawn as a proxy when it is one.
    fn workload(&mut self, namespace: &str, name: &str) -> String {
        let kind = self.proxies.get(&(namespace.to_owned(), name.to_owned())).copied().unwrap_or(NodeKind::Workload);
        self.node(workload_id(namespace, name), kind, name, namespace)
    }

    /// The workload named by `{prefix}_workload` and `{prefix}_workload_namespace`.
    fn party(&mut self, labels: &Labels, prefix: &str) -> Option<String> {
        let name = label(labels, &format!("{prefix}_workload"))?;
        let namespace = label(labels, &format!("{prefix}_workload_namespace"))?;
        Some(self.workload(namespace, name))
    }

    fn service(&mut self, hostname: &str) -> String {
        let mut parts = hostname.split('.');
        let name = parts.next().unwrap_or(hostname);
        let namespace = parts.next().unwrap_or("");
        self.node(format!("service:{hostname}"), NodeKind::Service, name, namespace)
    }

    /// Notes the proxy that reported a series, when a waypoint or gateway did.
    fn note_proxy(&mut self, labels: &Labels) -> Option<(NodeKind, String, String)> {
        let kind = NodeKind::of_component(label(labels, "component")?)?;
        let namespace = label(labels, "namespace")?.to_owned();
        let name = label(labels, "workload")?.to_owned();
        self.proxies.insert((namespace.clone(), name.clone()), kind);
        Some((kind, namespace, name))
    }

    /// The proxy that reported a series, when a waypoint or gateway did.
    fn reporter(&mut self, labels: &Labels) -> Option<(NodeKind, String)> {
        let (kind, namespace, name) = self.note_proxy(labels)?;
        Some((kind, self.workload(&namespace, &name)))
    }

    fn edge(&mut self, from: &str, to: &str) -> &mut Tally {
        self.edges.entry((from.to_owned(), to.to_owned())).or_default()
    }

    /// The hops a request series (or bucket series) is drawn on: (from, to) pairs, the service it
    /// addressed, and the proxy that carried it.
    fn request_path(&mut self, labels: &Labels, covered: &BTreeSet<(String, String)>) -> RequestPath {
        let reporter = self.reporter(labels);
        let service = label(labels, "destination_service").map(|s| self.service(s));
        let endpoint = self.party(labels, "destination");
        let mut hops = Vec::new();
        let source = match reporter {
            Some((NodeKind::Gateway, ref gateway)) => {
                let outside = self.unknown();
                hops.push((outside, gateway.clone()));
                if let Some(s) = &service
                    && covered.contains(&(gateway.clone(), s.clone()))
                {
                    // A waypoint reports the rest of this path.
                    return RequestPath { hops, service: None, proxy: None };
                }
                gateway.clone()
            }
            Some((_, ref waypoint)) => {
                let client = self.party(labels, "source").unwrap_or_else(|| self.unknown());
                hops.push((client, waypoint.clone()));
                waypoint.clone()
            }
            None => self.party(labels, "source").unwrap_or_else(|| self.unknown()),
        };
        match (&service, endpoint) {
            (Some(s), Some(e)) => {
                hops.push((source.clone(), s.clone()));
                hops.push((s.clone(), e));
            }
            (Some(s), None) => hops.push((source.clone(), s.clone())),
            (None, Some(e)) => hops.push((source.clone(), e)),
            (None, None) => {}
        }
        RequestPath { hops, service, proxy: reporter.map(|(_, p)| p) }
    }
}

struct RequestPath {
    hops: Vec<(String, String)>,
    service: Option<String>,
    proxy: Option<String>,
}

fn is_error(labels: &Labels) -> bool {
    labels.get("response_code").and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| c >= 500 || c == 0)
}

impl Graph {
    /// Draws the graph of `rates`.
    pub fn build(rates: &Rates) -> Graph {
        let mut b = Builder::default();
        for p in &rates.proxies {
            b.proxies.insert((p.namespace.clone(), p.workload.clone()), p.kind);
        }
        // Every proxy first, so a node is drawn as the proxy it is whichever series names it first.
        for (labels, _) in
            [&rates.requests, &rates.duration_buckets, &rates.connections, &rates.bytes].into_iter().flatten()
        {
            b.note_proxy(labels);
        }
        for p in &rates.proxies {
            b.workload(&p.namespace, &p.workload);
        }
        // Requests a waypoint saw coming from a gateway: (gateway, service).
        let mut covered = BTreeSet::new();
        for (labels, _) in rates.requests.iter().chain(&rates.duration_buckets) {
            let Some((NodeKind::Waypoint, _)) = b.reporter(labels) else { continue };
            if let (Some(client), Some(service)) = (b.party(labels, "source"), label(labels, "destination_service")) {
                let service = b.service(service);
                covered.insert((client, service));
            }
        }
        b.requests(rates, &covered);
        b.connections(rates);
        b.finish()
    }
}

impl Builder {
    fn requests(&mut self, rates: &Rates, covered: &BTreeSet<(String, String)>) {
        for (labels, rate) in &rates.requests {
            if *rate <= IDLE {
                continue;
            }
            let path = self.request_path(labels, covered);
            let error = is_error(labels);
            let policy = labels.get("connection_security_policy").map(String::as_str);
            let last = path.hops.len().saturating_sub(1);
            for (i, (from, to)) in path.hops.iter().enumerate() {
                let proxy = path.proxy.clone();
                let tally = self.edge(from, to);
                tally.rps += rate;
                if error {
                    tally.errors += rate;
                }
                // The proxy's label speaks for its own upstream hops; the hop into it is the
                // client's connection, which ztunnel reports.
                if path.proxy.as_deref() != Some(to.as_str()) {
                    tally.security(policy);
                    if policy != Some("mutual_tls") && i == last {
                        tally.via_proxy.extend(proxy);
                    }
                }
            }
            if let Some(service) = path.service {
                let tally = self.services.entry(service).or_default();
                tally.rps += rate;
                if error {
                    tally.errors += rate;
                }
            }
        }
        for (labels, rate) in &rates.duration_buckets {
            let Some(le) = labels.get("le").and_then(|l| l.parse::<f64>().ok()).filter(|l| *l >= 0.0) else {
                continue;
            };
            let path = self.request_path(labels, covered);
            for (from, to) in &path.hops {
                *self.edge(from, to).buckets.entry(le.to_bits()).or_default() += rate;
            }
            if let Some(service) = path.service {
                *self.services.entry(service).or_default().buckets.entry(le.to_bits()).or_default() += rate;
            }
        }
    }

    fn connections(&mut self, rates: &Rates) {
        // (client, server) pairs the server's ztunnel reported: the client's report is not added.
        let mut from_server = BTreeSet::new();
        let mut pairs = Vec::new();
        for (labels, rate) in
            rates.connections.iter().map(|(l, r)| (l, (r, 0.0))).chain(rates.bytes.iter().map(|(l, r)| (l, (&0.0, *r))))
        {
            let (cps, bytes) = (*rate.0, rate.1);
            if cps + bytes <= IDLE || self.reporter(labels).is_some() {
                continue;
            }
            let reporter = label(labels, "reporter").unwrap_or("");
            let client = self.party(labels, "source").unwrap_or_else(|| self.unknown());
            let server = match (self.party(labels, "destination"), label(labels, "destination_service")) {
                (Some(w), _) => w,
                (None, Some(s)) => self.service(s),
                (None, None) => self.unknown(),
            };
            if reporter == "destination" {
                from_server.insert((client.clone(), server.clone()));
            }
            let secure = labels.get("connection_security_policy").map(String::as_str) == Some("mutual_tls");
            pairs.push((client, server, reporter == "destination", cps, bytes, secure));
        }
        for (client, server, by_server, cps, bytes, secure) in pairs {
            if !by_server && from_server.contains(&(client.clone(), server.clone())) {
                continue;
            }
            if self.nodes.get(&client).is_some_and(|n| matches!(n.kind, NodeKind::Waypoint | NodeKind::Gateway)) {
                // A proxy's own connections: its requests draw them; they say whether its hops
                // to each endpoint are mutual TLS.
                for ((from, to), tally) in &mut self.edges {
                    if *to == server && tally.via_proxy.contains(&client) && from.starts_with("service:") {
                        if secure { tally.secure = true } else { tally.plaintext = true }
                    }
                }
                continue;
            }
            let tally = self.edge(&client, &server);
            tally.cps += cps;
            tally.bytes += bytes;
            if secure {
                tally.secure = true;
            } else {
                tally.plaintext = true;
            }
        }
    }

    fn finish(self) -> Graph {
        let rate_of = |t: &Tally| (t.rps > IDLE).then(|| t.errors / t.rps);
        let edges = self
            .edges
            .into_iter()
            .filter(|(_, t)| t.rps + t.cps + t.bytes > IDLE)
            .map(|((source, target), t)| Edge {
                id: format!("{source} -> {target}"),
                protocol: if t.rps > IDLE { "http" } else { "tcp" },
                rps: t.rps,
                error_rate: rate_of(&t),
                p50_ms: t.quantile(0.5),
                p99_ms: t.quantile(0.99),
                cps: t.cps,
                bytes_per_s: t.bytes,
                mtls: match (t.secure, t.plaintext) {
                    (_, true) => Some(false),
                    (true, false) => Some(true),
                    (false, false) => None,
                },
                source,
                target,
            })
            .collect::<Vec<_>>();
        let used: BTreeSet<&str> = edges.iter().flat_map(|e| [e.source.as_str(), e.target.as_str()]).collect();
        let nodes = self
            .nodes
            .into_values()
            .filter(|n| used.contains(n.id.as_str()) || matches!(n.kind, NodeKind::Waypoint | NodeKind::Gateway))
            .collect();
        let services = self
            .services
            .into_iter()
            .filter_map(|(id, t)| {
                let hostname = id.strip_prefix("service:")?.to_owned();
                let signals =
                    Signals { rps: t.rps, error_rate: rate_of(&t), p50_ms: t.quantile(0.5), p99_ms: t.quantile(0.99) };
                Some((hostname, signals))
            })
            .collect();
        Graph { nodes, edges, services }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    const WAYPOINT: [(&str, &str); 4] =
        [("component", "waypoint"), ("namespace", "demo"), ("workload", "waypoint"), ("reporter", "waypoint")];

    fn from_waypoint(code: &str, endpoint: &str) -> Labels {
        let mut l = labels(&WAYPOINT);
        l.extend(labels(&[
            ("source_workload", "client"),
            ("source_workload_namespace", "demo"),
            ("destination_service", "server.demo.svc.cluster.local"),
            ("destination_workload", endpoint),
            ("destination_workload_namespace", "demo"),
            ("response_code", code),
            ("connection_security_policy", "mutual_tls"),
        ]));
        l
    }

    fn ztunnel(reporter: &str, src: &str, dst: &str, policy: &str) -> Labels {
        labels(&[
            ("component", "ztunnel"),
            ("namespace", "istio-system"),
            ("workload", "ztunnel"),
            ("reporter", reporter),
            ("source_workload", src),
            ("source_workload_namespace", "demo"),
            ("destination_workload", dst),
            ("destination_workload_namespace", "demo"),
            ("connection_security_policy", policy),
        ])
    }

    fn edge<'a>(g: &'a Graph, id: &str) -> &'a Edge {
        g.edges.iter().find(|e| e.id == id).unwrap_or_else(|| panic!("no edge {id} in {:#?}", g.edges))
    }

    fn ids(g: &Graph) -> Vec<&str> {
        g.edges.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_promql() {
        let b = [(5.0, 50.0), (10.0, 90.0), (25.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, b.into_iter()), Some(5.0));
        assert_eq!(quantile(0.7, b.into_iter()), Some(7.5));
        assert_eq!(quantile(0.99, b.into_iter()), Some(10.0 + 15.0 * 9.0 / 10.0));
        // Past the last finite bound: that bound.
        let tail = [(5.0, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, tail.into_iter()), Some(5.0));
        assert_eq!(quantile(0.5, [(5.0, 0.0), (f64::INFINITY, 0.0)].into_iter()), None);
        assert_eq!(quantile(0.5, [(5.0, 3.0)].into_iter()), None, "no +Inf bucket: not a histogram");
        assert_eq!(quantile(0.5, std::iter::empty()), None);
    }

    #[test]
    fn a_waypoint_sits_on_the_path_from_client_to_service_to_endpoints() {
        let mut rates = Rates::default();
        rates.requests.push((from_waypoint("200", "server-v1"), 7.0));
        rates.requests.push((from_waypoint("200", "server-v2"), 2.0));
        rates.requests.push((from_waypoint("503", "server-v2"), 1.0));
        for (le, count) in [("10", 5.0), ("50", 9.0), ("+Inf", 10.0)] {
            let mut l = from_waypoint("200", "server-v1");
            l.remove("response_code");
            l.insert("le".into(), le.into());
            rates.duration_buckets.push((l, count));
        }
        // The client's ztunnel saw its connections to the waypoint; the server's saw the
        // waypoint's connections to the endpoints.
        rates.connections.push((ztunnel("source", "client", "waypoint", "mutual_tls"), 0.5));
        rates.connections.push((ztunnel("destination", "waypoint", "server-v1", "mutual_tls"), 0.5));
        let g = Graph::build(&rates);
        assert_eq!(
            ids(&g),
            [
                "service:server.demo.svc.cluster.local -> workload:demo/server-v1",
                "service:server.demo.svc.cluster.local -> workload:demo/server-v2",
                "workload:demo/client -> workload:demo/waypoint",
                "workload:demo/waypoint -> service:server.demo.svc.cluster.local",
            ]
        );
        let into = edge(&g, "workload:demo/client -> workload:demo/waypoint");
        assert_eq!((into.protocol, into.rps, into.cps, into.mtls), ("http", 10.0, 0.5, Some(true)));
        assert_eq!(into.error_rate, Some(0.1));
        let v2 = edge(&g, "service:server.demo.svc.cluster.local -> workload:demo/server-v2");
        assert_eq!((v2.rps, v2.error_rate, v2.mtls), (3.0, Some(1.0 / 3.0), Some(true)));
        let v1 = edge(&g, "service:server.demo.svc.cluster.local -> workload:demo/server-v1");
        assert_eq!((v1.p50_ms, v1.p99_ms), (Some(10.0), Some(50.0)));
        let waypoint = g.nodes.iter().find(|n| n.id == "workload:demo/waypoint").unwrap();
        assert_eq!(waypoint.kind, NodeKind::Waypoint);
        let service = &g.services["server.demo.svc.cluster.local"];
        assert_eq!((service.rps, service.error_rate), (10.0, Some(0.1)));
        assert_eq!(service.p50_ms, Some(10.0));
    }

    #[test]
    fn gateway_requests_come_from_outside_and_their_hops_are_secure_when_ztunnel_says_so() {
        let gateway = |endpoint: &str| {
            labels(&[
                ("component", "ingress-gateway"),
                ("namespace", "istio-system"),
                ("workload", "istio-ingressgateway"),
                ("reporter", "source"),
                ("source_workload", "istio-ingressgateway"),
                ("source_workload_namespace", "istio-system"),
                ("destination_service", "hello.default.svc.cluster.local"),
                ("destination_workload", endpoint),
                ("destination_workload_namespace", "default"),
                ("response_code", "200"),
                ("connection_security_policy", "unknown"),
            ])
        };
        let mut rates = Rates::default();
        rates.requests.push((gateway("hello-latest"), 7.0));
        rates.requests.push((gateway("hello-new"), 3.0));
        let mut hop = ztunnel("destination", "istio-ingressgateway", "hello-latest", "mutual_tls");
        hop.insert("source_workload_namespace".into(), "istio-system".into());
        hop.insert("destination_workload_namespace".into(), "default".into());
        rates.connections.push((hop, 1.0));
        let g = Graph::build(&rates);
        assert_eq!(
            ids(&g),
            [
                "service:hello.default.svc.cluster.local -> workload:default/hello-latest",
                "service:hello.default.svc.cluster.local -> workload:default/hello-new",
                "unknown -> workload:istio-system/istio-ingressgateway",
                "workload:istio-system/istio-ingressgateway -> service:hello.default.svc.cluster.local",
            ]
        );
        assert_eq!(edge(&g, "unknown -> workload:istio-system/istio-ingressgateway").rps, 10.0);
        let latest = edge(&g, "service:hello.default.svc.cluster.local -> workload:default/hello-latest");
        assert_eq!((latest.rps, latest.mtls), (7.0, Some(true)), "ztunnel proved the gateway's hop is mutual TLS");
        let new = edge(&g, "service:hello.default.svc.cluster.local -> workload:default/hello-new");
        assert_eq!(new.mtls, None, "nothing says how the gateway reached hello-new");
        let gw = g.nodes.iter().find(|n| n.id == "workload:istio-system/istio-ingressgateway").unwrap();
        assert_eq!(gw.kind, NodeKind::Gateway);
    }

    #[test]
    fn ztunnel_connections_prefer_the_servers_report_and_show_plaintext() {
        let mut rates = Rates::default();
        rates.connections.push((ztunnel("source", "client", "server", "mutual_tls"), 2.0));
        rates.connections.push((ztunnel("destination", "client", "server", "mutual_tls"), 2.0));
        rates.bytes.push((ztunnel("destination", "client", "server", "mutual_tls"), 1000.0));
        rates.connections.push((ztunnel("source", "client", "legacy", "unknown"), 1.0));
        rates.connections.push((ztunnel("destination", "client", "idle", "mutual_tls"), 0.0));
        let g = Graph::build(&rates);
        assert_eq!(
            ids(&g),
            ["workload:demo/client -> workload:demo/legacy", "workload:demo/client -> workload:demo/server"]
        );
        let secure = edge(&g, "workload:demo/client -> workload:demo/server");
        assert_eq!((secure.protocol, secure.cps, secure.bytes_per_s, secure.mtls), ("tcp", 2.0, 1000.0, Some(true)));
        assert_eq!((secure.rps, secure.error_rate, secure.p50_ms), (0.0, None, None));
        assert_eq!(edge(&g, "workload:demo/client -> workload:demo/legacy").mtls, Some(false));
        assert_eq!(g.nodes.len(), 3, "the idle pair draws nothing: {:?}", g.nodes);
    }

    #[test]
    fn an_idle_proxy_is_still_drawn_and_unknown_labels_are_outside() {
        let rates = Rates {
            proxies: vec![Proxy { kind: NodeKind::Waypoint, namespace: "demo".into(), workload: "waypoint".into() }],
            ..Rates::default()
        };
        let g = Graph::build(&rates);
        assert_eq!(g.nodes.len(), 1);
        assert_eq!((g.nodes[0].kind, g.nodes[0].name.as_str()), (NodeKind::Waypoint, "waypoint"));
        assert!(g.edges.is_empty());
        let mut anonymous = from_waypoint("200", "server");
        anonymous.insert("source_workload".into(), "unknown".into());
        let rates = Rates { requests: vec![(anonymous, 1.0)], ..Rates::default() };
        assert!(ids(&Graph::build(&rates)).contains(&"unknown -> workload:demo/waypoint"));
    }

    #[test]
    fn a_gateway_routed_through_a_waypoint_is_drawn_once() {
        let mut via = from_waypoint("200", "server");
        via.insert("source_workload".into(), "gw".into());
        via.insert("source_workload_namespace".into(), "istio-system".into());
        let gateway = labels(&[
            ("component", "ingress-gateway"),
            ("namespace", "istio-system"),
            ("workload", "gw"),
            ("source_workload", "gw"),
            ("source_workload_namespace", "istio-system"),
            ("destination_service", "server.demo.svc.cluster.local"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "demo"),
            ("response_code", "200"),
        ]);
        let rates = Rates { requests: vec![(via, 4.0), (gateway, 4.0)], ..Rates::default() };
        let g = Graph::build(&rates);
        assert_eq!(
            ids(&g),
            [
                "service:server.demo.svc.cluster.local -> workload:demo/server",
                "unknown -> workload:istio-system/gw",
                "workload:demo/waypoint -> service:server.demo.svc.cluster.local",
                "workload:istio-system/gw -> workload:demo/waypoint",
            ]
        );
        assert_eq!(edge(&g, "service:server.demo.svc.cluster.local -> workload:demo/server").rps, 4.0);
        assert_eq!(g.services["server.demo.svc.cluster.local"].rps, 4.0);
    }
}
