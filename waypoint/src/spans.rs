//! Spans of the requests a waypoint or ingress gateway handles, exported with OTLP/gRPC to the
//! collector the Telemetry API names (`proto::state::telemetry`).
//!
//! Per sampled request, two spans, as Istio's proxies report them: a server span for the request
//! as it arrived (a child of the client's span when the request carries a `traceparent`) and a
//! client span for the request sent on (a child of the server span); the request goes upstream
//! with the client span's `traceparent`, so the server's spans are its children. The attributes
//! carry Istio's names (`http.method`, `http.url`, `http.status_code`, `upstream_cluster`,
//! `response_flags`, `istio.namespace`, ...).
//!
//! Sampling follows the request: one that arrives with a `traceparent` is sampled when its flag
//! says so, whatever the percentage (a trace is whole or absent); one without is sampled with the
//! configured percentage and starts a trace. Unsampled requests cost nothing here: no span is
//! built (their `traceparent` is still passed on by the request path).
//!
//! Spans are batched (at most [`QUEUE`] waiting, exported every second); a collector that is
//! down loses spans, never requests.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span};
use proto::hbone::TraceParent;
use proto::state::telemetry::Tracing;
use rand::Rng;
use tracing::{info, warn};

/// Spans waiting for export at most; more are dropped (and the SDK says so).
pub const QUEUE: usize = 4096;

/// The proxy's span reporting, reconfigured as the Telemetry API changes.
#[derive(Debug)]
pub struct Tracer {
    /// The service name spans are reported under (`<gateway>.<namespace>`, as Istio names a
    /// proxy's spans).
    service: String,
    /// Attributes every server span carries.
    own: Vec<KeyValue>,
    current: ArcSwapOption<Exporting>,
}

struct Exporting {
    settings: Tracing,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Exporting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporting").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Tracer {
    /// Reports nothing until [`configure`](Self::configure) names a collector.
    pub fn new(gateway: &str, namespace: &str, node: Option<&str>) -> Tracer {
        let mut own = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("istio.namespace", namespace.to_owned()),
            KeyValue::new("istio.canonical_service", gateway.to_owned()),
        ];
        if let Some(node) = node {
            own.push(KeyValue::new("node_id", node.to_owned()));
        }
        Tracer { service: format!("{gateway}.{namespace}"), own, current: ArcSwapOption::empty() }
    }

    /// Applies the effective tracing settings: starts exporting, changes collector or rate, or
    /// stops (the previous exporter sends what it holds, in the background). Call within the
    /// runtime.
    pub fn configure(&self, tracing: Option<&Tracing>) {
        let current = self.current.load();
        if current.as_ref().map(|c| &c.settings) == tracing {
            return;
        }
        let next = match tracing.map(|t| self.exporting(t)).transpose() {
            Ok(next) => next,
            Err(e) => {
                // The settings come from the control plane, which checked them; an endpoint that
                // still does not parse leaves spans off rather than the proxy down.
                warn!(error = %e, "tracing not started: the collector's address is not usable");
                None
            }
        };
        match &next {
            Some(n) => info!(
                provider = %n.settings.collector.provider,
                collector = %format!("{}:{}", n.settings.collector.service, n.settings.collector.port),
                sampling_percent = n.settings.sampling_percent,
                "tracing: exporting spans"
            ),
            None => info!("tracing: no spans reported"),
        }
        if let Some(old) = self.current.swap(next.map(Arc::new)) {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = old.provider.shutdown() {
                    warn!(error = %e, "tracing: the previous exporter did not shut down cleanly");
                }
            });
        }
    }

    fn exporting(&self, settings: &Tracing) -> Result<Exporting, opentelemetry_otlp::ExporterBuildError> {
        use opentelemetry_otlp::WithExportConfig as _;
        let c = &settings.collector;
        let host = if c.service.contains(':') { format!("[{}]", c.service) } else { c.service.clone() };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{host}:{}", c.port))
            .with_timeout(Duration::from_secs(5))
            .build()?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE)
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build())
            .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(self.service.clone()).build())
            .build();
        let tracer = provider.tracer("ambient-waypoint");
        Ok(Exporting { settings: settings.clone(), provider, tracer })
    }

    /// The spans of `req` (to `host` on `port`, from `peer`), when spans are reported and it is
    /// sampled; nothing is built otherwise.
    pub fn start<B>(
        &self,
        req: &http::Request<B>,
        host: &str,
        port: u16,
        peer: Option<std::net::IpAddr>,
    ) -> Option<RequestSpans> {
        let exporting = self.current.load_full()?;
        let incoming = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        let parent = match incoming {
            Some(t) if t.flags & 1 == 1 => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from(t.trace_id),
                SpanId::from(t.span_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            )),
            Some(_) => return None,
            None if sampled(&mut rand::rng(), exporting.settings.sampling_percent) => Context::new(),
            None => return None,
        };
        let (name, mut attributes) = describe(req, host, port, peer);
        attributes.extend(self.own.iter().cloned());
        let server = exporting
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&exporting.tracer, &parent);
        Some(RequestSpans { exporting, server, client: None })
    }

    /// Sends what is held and stops exporting (on shutdown).
    pub async fn shutdown(&self) {
        if let Some(old) = self.current.swap(None) {
            let _ = tokio::task::spawn_blocking(move || old.provider.shutdown()).await;
        }
    }
}

/// The server span's name and attributes for a request to `host` on `port` (Istio's names).
fn describe<B>(
    req: &http::Request<B>,
    host: &str,
    port: u16,
    peer: Option<std::net::IpAddr>,
) -> (String, Vec<KeyValue>) {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut attributes = vec![
        KeyValue::new("http.method", req.method().as_str().to_owned()),
        KeyValue::new("http.url", format!("http://{host}{}", req.uri().path())),
        KeyValue::new("http.protocol", format!("{:?}", req.version())),
        KeyValue::new("downstream_cluster", "-"),
    ];
    if let Some(agent) = header("user-agent") {
        attributes.push(KeyValue::new("user_agent", agent));
    }
    if let Some(id) = header("x-request-id") {
        attributes.push(KeyValue::new("guid:x-request-id", id));
    }
    if let Some(peer) = peer {
        attributes.push(KeyValue::new("peer.address", peer.to_string()));
    }
    (operation(host, port), attributes)
}

/// Istio's operation name: `<host>:<port>/*` (the host's own port when it names one).
pub fn operation(host: &str, port: u16) -> String {
    let has_port =
        host.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.ends_with(':') && p.parse::<u16>().is_ok());
    if has_port { format!("{host}/*") } else { format!("{host}:{port}/*") }
}

/// True with probability `percent` / 100.
fn sampled(rng: &mut impl Rng, percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rng.random_bool(percent / 100.0))
}

/// The spans of one sampled request.
pub struct RequestSpans {
    exporting: Arc<Exporting>,
    server: Span,
    client: Option<Span>,
}

impl std::fmt::Debug for RequestSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestSpans").field("server", &self.server.span_context()).finish_non_exhaustive()
    }
}

impl RequestSpans {
    /// Names the request by the service it was found to be for (`<service host>:<port>/*`).
    pub fn rename(&mut self, name: String) {
        self.server.update_name(name);
    }

    /// Starts the client span of the request sent to `cluster` and puts its context in the
    /// outgoing `headers` (`traceparent`), so the next hop's spans are its children.
    pub fn upstream(&mut self, headers: &mut HeaderMap, cluster: &str) {
        let parent = Context::new().with_remote_span_context(self.server.span_context().clone());
        let tracer = &self.exporting.tracer;
        let client = tracer
            .span_builder(format!("router {cluster} egress"))
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("upstream_cluster", cluster.to_owned())])
            .start_with_context(tracer, &parent);
        let cx = client.span_context();
        let outgoing = TraceParent {
            trace_id: u128::from_be_bytes(cx.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(cx.span_id().to_bytes()),
            flags: 1,
        };
        if let Ok(v) = http::HeaderValue::from_str(&outgoing.to_string()) {
            headers.insert("traceparent", v);
        }
        self.server.set_attribute(KeyValue::new("upstream_cluster", cluster.to_owned()));
        self.client = Some(client);
    }

    /// Ends both spans with the answer: its status, Envoy's response flags, the endpoint reached.
    pub fn finish(mut self, status: u16, flags: &str, endpoint: Option<std::net::IpAddr>) {
        let error = status >= 500;
        let ending = |span: &mut Span| {
            span.set_attribute(KeyValue::new("http.status_code", i64::from(status)));
            span.set_attribute(KeyValue::new("response_flags", flags.to_owned()));
            if error {
                span.set_attribute(KeyValue::new("error", true));
                span.set_status(Status::error(format!("{status} {flags}")));
            }
        };
        if let Some(mut client) = self.client.take() {
            if let Some(endpoint) = endpoint {
                client.set_attribute(KeyValue::new("peer.address", endpoint.to_string()));
            }
            ending(&mut client);
            client.end();
        }
        ending(&mut self.server);
        self.server.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_carry_one_port() {
        assert_eq!(operation("hello.shop.svc.cluster.local", 80), "hello.shop.svc.cluster.local:80/*");
        assert_eq!(operation("10.96.3.10:8080", 80), "10.96.3.10:8080/*");
        assert_eq!(operation("[fd00::1]:8080", 80), "[fd00::1]:8080/*");
        assert_eq!(operation("[fd00::1]", 80), "[fd00::1]:80/*");
    }

    #[test]
    fn the_percentage_is_a_probability_with_exact_ends() {
        let mut rng = rand::rng();
        assert!((0..1000).all(|_| sampled(&mut rng, 100.0)));
        assert!((0..1000).all(|_| !sampled(&mut rng, 0.0)));
        // 10 %: Binomial(10000, 0.1) has sd 30; 700..=1300 is 10 sd.
        let hits = (0..10_000).filter(|_| sampled(&mut rng, 10.0)).count();
        assert!((700..=1300).contains(&hits), "{hits}");
    }
}
