//! One HTTP request through the waypoint: put its target in canonical form, plan it against the
//! mesh as it is now (`plan`), carry the plan out (`send`), then count it and
//! write its access-log line.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proto::SpiffeId;
use proto::metrics::Hashed;
use tracing::{info, warn};

use crate::Context;
use crate::metrics::{Parties, RequestLabels};
use crate::normalize;
use crate::plan::{self, Answer, Head, Next, Outcome};
use crate::send::{self, DownstreamUpgrade};
use crate::spans;
use crate::target::Destination;
use crate::upstream::{Body, BoxError};

/// Who is on the other side of one inbound tunnel.
#[derive(Debug)]
pub struct Downstream {
    /// The peer's identity, from its TLS certificate.
    pub peer: SpiffeId,
    /// The client: the tunnel's TCP peer (the client's ztunnel dials from the client pod's own
    /// address). Never taken from a header.
    pub source_ip: Option<IpAddr>,
    /// The source workload's name, from `baggage` (telemetry only).
    pub source_workload: Option<String>,
    /// The `CONNECT` target: a service VIP (or pod IP) and port.
    pub target: SocketAddr,
}

/// Handles one request from `down`.
pub async fn handle(ctx: Arc<Context>, down: Arc<Downstream>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let mut upgrade = DownstreamUpgrade::of(&mut req);
    let method = normalize::method(req.method());
    let raw_path = req.uri().path().to_owned();
    // The one canonical view policy and routing see, and the backend receives.
    let target = normalize::path(&raw_path).and_then(|p| Ok((p, normalize::host(req.headers(), req.uri())?)));
    let host = target.as_ref().map(|(_, h)| h.clone()).unwrap_or_default();
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let (version, request_id, user_agent) =
        (req.version(), header_text(&req, "x-request-id"), header_text(&req, "user-agent"));
    let mut spans = ctx.tracer.start(&req, &host, down.target.port(), down.source_ip);
    let (mut parts, body) = req.into_parts();
    parts.method = method.clone();
    let (destination, planned) = ctx.view.read(|s| {
        let destination = Destination::at(s, down.target.ip());
        let planned = match (&destination, target) {
            (None, _) => {
                Answer::text(StatusCode::SERVICE_UNAVAILABLE, "no service or workload at this address\n", "NR", "")
                    .into()
            }
            // A tunnel inside the tunnel would carry bytes no policy looked at.
            (Some(_), _) if method == http::Method::CONNECT => {
                warn!(peer = %down.peer, "request refused: CONNECT is not proxied by the waypoint");
                Answer::text(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied by the waypoint\n", "-", "").into()
            }
            (Some(_), Err(e)) => {
                warn!(peer = %down.peer, path = %raw_path, reason = %e, "request refused: ambiguous request target");
                Answer::text(StatusCode::BAD_REQUEST, "bad request target\n", "-", "").into()
            }
            (Some(d), Ok((path, host))) => {
                plan::plan(&ctx.env(), s, &down, d, Head { parts, path, host }, &mut rand::rng())
            }
        };
        (destination, planned)
    });
    ctx.record_dry_run(planned.dry_run.as_ref(), &down.peer, down.target.port());
    if let (Some(spans), Some(Destination::Service(s))) = (spans.as_mut(), &destination) {
        spans.rename(spans::operation(&s.hostname, down.target.port()));
    }
    let parties = Parties::new(&down, destination.as_ref());
    let (response, outcome): (Response<Body>, Outcome) = match planned.next {
        Next::Answer(a) => a.into_parts(),
        Next::Send(mut plan) => {
            if let Some(spans) = spans.as_mut() {
                spans.upstream(&mut plan.head.headers, &plan.backend.cluster());
            }
            let clients = ctx.clients.for_client(down.source_ip);
            let body = body.map_err(BoxError::from).boxed();
            send::send(*plan, body, &clients, &ctx.destinations, &mut upgrade).await
        }
    };
    let elapsed = start.elapsed();
    let endpoint = outcome.endpoint.as_deref();
    let mut parties = parties;
    if let Some(w) = endpoint {
        parties.set_endpoint(w);
    }
    let labels = Hashed::new(RequestLabels {
        reporter: "waypoint",
        parties,
        request_protocol: if grpc { "grpc" } else { "http" },
        response_code: outcome.status.as_u16(),
        response_flags: outcome.flags,
        connection_security_policy: "mutual_tls",
    });
    ctx.metrics.record(&labels, elapsed.as_secs_f64() * 1000.0);
    if let Some(spans) = spans {
        spans.finish(outcome.status.as_u16(), outcome.flags, endpoint.and_then(|w| w.primary_address()));
    }
    if !ctx.access_log.load(Ordering::Relaxed) {
        return response;
    }
    // Envoy's and Istio's access-log names (`--log-format json` writes them as JSON keys).
    info!(
        target: "access",
        method = %method,
        path = %raw_path,
        protocol = ?version,
        authority = %host,
        response_code = outcome.status.as_u16(),
        response_flags = outcome.flags,
        route_name = %outcome.route,
        upstream_host = %endpoint.and_then(|w| w.primary_address()).map_or_else(|| "-".to_owned(), |a| a.to_string()),
        upstream_request_attempt_count = outcome.attempts,
        downstream_remote_address = %down.source_ip.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        request_id = log_text(request_id.as_ref()),
        user_agent = log_text(user_agent.as_ref()),
        duration = elapsed.as_millis() as u64,
        src.identity = %down.peer,
        dst.service = %labels.labels().parties.destination_service,
        dst.workload = %endpoint.map_or("-", |w| w.name.as_str()),
        "request"
    );
    response
}

/// A request header's value (a cheap copy: the bytes are shared), if it has one.
pub(crate) fn header_text<B>(req: &Request<B>, name: &str) -> Option<http::HeaderValue> {
    req.headers().get(name).cloned()
}

/// A header value for a log line: its text, `-` when absent or not text.
pub(crate) fn log_text(v: Option<&http::HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("-")
}
