//! `ambientctl dashboard`: a web page that shows the mesh, live — the service graph (workloads,
//! services and the proxies on their paths; per edge request rate, error rate, p50/p99 latency and
//! whether the hop is mutual TLS) and each service's golden signals over time.
//!
//! One task polls the figures every `interval` ([`source`]: Prometheus, or the proxies' metrics
//! endpoints), draws the graph ([`graph`]) and keeps the services' history; the page reads both
//! as JSON (`/api/graph`, `/api/history`) however many browsers look. The page itself and the
//! libraries it draws with (Cytoscape.js for the graph, uPlot for the charts, vendored under
//! `ca/ctl/dashboard/vendor/` with their licences) are compiled into the binary: nothing is
//! fetched from the internet.

pub mod graph;
pub mod source;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use self::graph::{Graph, Signals};
use self::source::{PrometheusApi, Scraper};

/// Where the figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Figures {
    /// A Prometheus that scrapes the mesh (`http://host:port`).
    Prometheus(String),
    /// The proxies' metrics endpoints, listed in Prometheus target files (a file or directory).
    Targets(PathBuf),
}

/// How the dashboard reads and keeps its figures.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where from.
    pub figures: Figures,
    /// Rates are averaged over this long (PromQL's `rate(...[window])`).
    pub window: Duration,
    /// How often the figures are read.
    pub interval: Duration,
    /// How much of the services' history the charts show.
    pub history: Duration,
}

impl Options {
    /// Reads `figures` with the defaults: a 1-minute window, every 2 s, 15 minutes of history.
    pub fn new(figures: Figures) -> Options {
        Options {
            figures,
            window: Duration::from_secs(60),
            interval: Duration::from_secs(2),
            history: Duration::from_secs(900),
        }
    }
}

/// What `/api/graph` answers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Where the figures come from, in words.
    pub source: String,
    /// The rate window, in seconds.
    pub window_s: u64,
    /// When the figures were last read successfully (Unix milliseconds; 0: not yet).
    pub updated_ms: u64,
    /// Reads so far (successful or not).
    pub polls: u64,
    /// What went wrong in the last read: an unreachable source, endpoints that did not answer.
    pub problems: Vec<String>,
    /// The graph.
    #[serde(flatten)]
    pub graph: Graph,
}

/// The services' signals over time, by poll.
#[derive(Debug, Default)]
struct History {
    points: VecDeque<(u64, BTreeMap<String, Signals>)>,
}

/// What `/api/history` answers: per service, columns for a chart (`null` where it had no
/// requests or no latency then).
#[derive(Debug, Serialize)]
struct HistoryView {
    interval_s: f64,
    t: Vec<f64>,
    services: BTreeMap<String, Columns>,
}

#[derive(Debug, Default, Serialize)]
struct Columns {
    rps: Vec<Option<f64>>,
    error_rate: Vec<Option<f64>>,
    p50_ms: Vec<Option<f64>>,
    p99_ms: Vec<Option<f64>>,
}

#[derive(Debug)]
struct Shared {
    snapshot: RwLock<Snapshot>,
    history: RwLock<History>,
    interval: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Reads the figures every `options.interval`, forever.
async fn poll(shared: Arc<Shared>, options: Options) {
    enum Reader {
        Prometheus(PrometheusApi),
        Scraper(Scraper),
    }
    let (mut reader, source) = match &options.figures {
        Figures::Prometheus(url) => match PrometheusApi::new(url) {
            Ok(api) => (Reader::Prometheus(api), format!("Prometheus at {url}")),
            Err(e) => {
                let mut s = write(&shared.snapshot);
                s.problems = vec![format!("{e:#}")];
                return;
            }
        },
        Figures::Targets(path) => {
            (Reader::Scraper(Scraper::new(path.clone())), format!("the proxies listed in {}", path.display()))
        }
    };
    let mut tick = tokio::time::interval(options.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read = match &mut reader {
            Reader::Prometheus(api) => api.rates(options.window).await.map(|r| (r, Vec::new())),
            Reader::Scraper(scraper) => scraper.rates(options.window).await,
        };
        let at = now_ms();
        let mut s = write(&shared.snapshot);
        s.source.clone_from(&source);
        s.window_s = options.window.as_secs();
        s.polls += 1;
        match read {
            Ok((rates, problems)) => {
                for p in &problems {
                    tracing::warn!(problem = %p, "reading the mesh's figures");
                }
                s.graph = Graph::build(&rates);
                s.updated_ms = at;
                s.problems = problems;
                let mut h = write(&shared.history);
                h.points.push_back((at, s.graph.services.clone()));
                let keep = (options.history.as_millis() / options.interval.as_millis().max(1)) as usize + 1;
                while h.points.len() > keep {
                    h.points.pop_front();
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading the mesh's figures failed; the page shows the last ones"
                );
                s.problems = vec![format!("{e:#}")];
            }
        }
    }
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Moves the calling thread (and the threads it starts later) into network namespace `name` (an
/// `ip netns` name): the sockets it opens from then on are that namespace's. Sockets already open,
/// like the page's listener, stay where they are.
pub fn enter_netns(name: &str) -> Result<()> {
    use anyhow::Context as _;
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(name))
        .with_context(|| format!("network namespace {name} (see `ip netns list`; are you root?)"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {name} (are you root?)"))
}

/// Serves the dashboard on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, options: Options) -> Result<()> {
    let shared = Arc::new(Shared {
        snapshot: RwLock::new(Snapshot::default()),
        history: RwLock::new(History::default()),
        interval: options.interval,
    });
    tokio::spawn(poll(shared.clone(), options));
    let hosts = Hosts::of(listener.local_addr()?);
    axum::serve(listener, router(shared).layer(axum::middleware::from_fn_with_state(hosts, check_host))).await?;
    Ok(())
}

/// The `Host` values a page served on loopback answers to. A web page elsewhere could point a
/// name of its own at 127.0.0.1 (DNS rebinding) and read the mesh's graph from the browser; such
/// requests carry that name, and are refused. Served on another address (`--listen`), any name
/// is answered: whoever reaches it can read it anyway.
#[derive(Debug, Clone)]
struct Hosts(Option<Arc<[String]>>);

impl Hosts {
    fn of(addr: std::net::SocketAddr) -> Hosts {
        if !addr.ip().is_loopback() {
            return Hosts(None);
        }
        let port = addr.port();
        let names =
            [addr.to_string(), format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")];
        Hosts(Some(names.into_iter().collect()))
    }

    fn allow(&self, host: Option<&str>) -> bool {
        match &self.0 {
            None => true,
            Some(names) => host.is_some_and(|h| names.iter().any(|n| n.eq_ignore_ascii_case(h))),
        }
    }
}

async fn check_host(
    State(hosts): State<Hosts>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if hosts.allow(host) {
        return next.run(request).await;
    }
    tracing::warn!(host = host.unwrap_or("-"), "refused a request for another host name (DNS rebinding?)");
    (StatusCode::MISDIRECTED_REQUEST, "this dashboard answers only to the address it listens on\n").into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/dashboard.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/vendor/cytoscape.min.js", get(|| async { asset("text/javascript; charset=utf-8", CYTOSCAPE) }))
        .route("/vendor/uPlot.iife.min.js", get(|| async { asset("text/javascript; charset=utf-8", UPLOT) }))
        .route("/vendor/uPlot.min.css", get(|| async { asset("text/css; charset=utf-8", UPLOT_CSS) }))
        .route("/api/graph", get(api_graph))
        .route("/api/history", get(api_history))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: the dashboard is at /\n") })
        .with_state(shared)
}

const INDEX: &str = include_str!("../../dashboard/index.html");
const SCRIPT: &str = include_str!("../../dashboard/dashboard.js");
const STYLE: &str = include_str!("../../dashboard/dashboard.css");
const CYTOSCAPE: &str = include_str!("../../dashboard/vendor/cytoscape.min.js");
const UPLOT: &str = include_str!("../../dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../dashboard/vendor/uPlot.min.css");

/// Nothing but this server's own files runs on the page.
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

fn json<T: Serialize>(value: &T) -> Response {
    let mut r = axum::Json(value).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn api_graph(State(shared): State<Arc<Shared>>) -> Response {
    json(&*read(&shared.snapshot))
}

async fn api_history(State(shared): State<Arc<Shared>>) -> Response {
    let h = read(&shared.history);
    let mut view = HistoryView {
        interval_s: shared.interval.as_secs_f64(),
        t: Vec::with_capacity(h.points.len()),
        services: BTreeMap::new(),
    };
    for (i, (at, services)) in h.points.iter().enumerate() {
        view.t.push(*at as f64 / 1000.0);
        for (name, s) in services {
            let c = view.services.entry(name.clone()).or_insert_with(|| Columns {
                rps: vec![None; i],
                error_rate: vec![None; i],
                p50_ms: vec![None; i],
                p99_ms: vec![None; i],
            });
            c.rps.push(Some(s.rps));
            c.error_rate.push(s.error_rate);
            c.p50_ms.push(s.p50_ms);
            c.p99_ms.push(s.p99_ms);
        }
        for c in view.services.values_mut() {
            for column in [&mut c.rps, &mut c.error_rate, &mut c.p50_ms, &mut c.p99_ms] {
                column.resize(i + 1, None);
            }
        }
    }
    json(&view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_loopback_only_the_listening_address_is_answered() {
        let hosts = Hosts::of("127.0.0.1:20001".parse().unwrap());
        for ok in ["127.0.0.1:20001", "localhost:20001", "LOCALHOST:20001", "[::1]:20001"] {
            assert!(hosts.allow(Some(ok)), "{ok}");
        }
        for refused in [None, Some("evil.example:20001"), Some("127.0.0.1:20002"), Some("localhost")] {
            assert!(!hosts.allow(refused), "{refused:?}");
        }
        let anywhere = Hosts::of("10.0.0.5:20001".parse().unwrap());
        assert!(anywhere.allow(Some("dashboard.example:20001")) && anywhere.allow(None));
    }

    #[tokio::test]
    async fn the_history_has_a_column_per_service_aligned_on_time() {
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Snapshot::default()),
            history: RwLock::new(History::default()),
            interval: Duration::from_secs(2),
        });
        let s = |rps| Signals { rps, error_rate: Some(0.0), p50_ms: Some(1.0), p99_ms: None };
        {
            let mut h = write(&shared.history);
            h.points.push_back((1000, BTreeMap::from([("a".to_owned(), s(1.0))])));
            h.points.push_back((3000, BTreeMap::from([("b".to_owned(), s(2.0))])));
            h.points.push_back((5000, BTreeMap::from([("a".to_owned(), s(3.0)), ("b".to_owned(), s(4.0))])));
        }
        let response = api_history(State(shared)).await;
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["t"], serde_json::json!([1.0, 3.0, 5.0]));
        assert_eq!(v["services"]["a"]["rps"], serde_json::json!([1.0, null, 3.0]));
        assert_eq!(v["services"]["b"]["rps"], serde_json::json!([null, 2.0, 4.0]));
        assert_eq!(v["services"]["b"]["p99_ms"], serde_json::json!([null, null, null]));
    }
}
