//! A real OTLP/gRPC trace collector (the published OTLP service, `opentelemetry-proto`'s
//! generated server), for tests and benchmarks: it keeps every span it is sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use ztunnel::netns::NetNs;

/// A span as the collector received it.
#[derive(Debug, Clone)]
pub struct Got {
    /// The reporter's `service.name`.
    pub service: String,
    /// Its name.
    pub name: String,
    /// Its kind ([`SpanKind`] as a number).
    pub kind: i32,
    /// Its trace.
    pub trace: u128,
    /// Its id.
    pub span: u64,
    /// Its parent's id; `None` for a root.
    pub parent: Option<u64>,
    /// Its attributes, as text.
    pub attributes: BTreeMap<String, String>,
}

/// The spans received so far (cheap to clone; all clones see the same spans).
#[derive(Default, Clone, Debug)]
pub struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

impl Collector {
    /// Serves OTLP/gRPC on `addr` inside `netns` until the runtime ends.
    pub fn serve(netns: &NetNs, addr: SocketAddr) -> std::io::Result<Collector> {
        let collector = Collector::default();
        let listener = netns.tcp_listener(addr)?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Ok(collector)
    }

    /// Every span received.
    pub fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many spans were received.
    pub fn count(&self) -> usize {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The spans of trace `trace`.
    pub fn of_trace(&self, trace: u128) -> Vec<Got> {
        self.spans().into_iter().filter(|s| s.trace == trace).collect()
    }

    /// Waits (up to 20 s) until trace `trace` has `n` spans; its spans, or what it had.
    pub async fn wait_for(&self, trace: u128, n: usize) -> Result<Vec<Got>, Vec<Got>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.of_trace(trace);
            if spans.len() >= n {
                return Ok(spans);
            }
            if std::time::Instant::now() > deadline {
                return Err(spans);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(value_text)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let id = |b: &[u8]| <[u8; 8]>::try_from(b).map(u64::from_be_bytes);
                let (Ok(trace), Ok(span_id)) = (<[u8; 16]>::try_from(span.trace_id.as_slice()), id(&span.span_id))
                else {
                    return Err(tonic::Status::invalid_argument("a span with a malformed trace or span id"));
                };
                received.push(Got {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace: u128::from_be_bytes(trace),
                    span: span_id,
                    parent: id(&span.parent_span_id).ok(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|a| (a.key.clone(), a.value.as_ref().map(value_text).unwrap_or_default()))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn value_text(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}
