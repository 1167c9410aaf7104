//! ztunnel's HTTP endpoints.
//!
//! - admin (default `127.0.0.1:15000`, keep it on localhost): `GET /config_dump` (pods served,
//!   workloads, services and policies as the control plane described them), `GET /certs`
//!   (certificates held, with expiry), `GET /logging` (current filter), `POST /logging?level=<filter>`
//!   (change it live, e.g. `debug` or `info,ztunnel::inbound=debug`), and the readiness check;
//! - metrics (`:15020`): `GET /metrics` and `GET /stats/prometheus`, Prometheus text;
//! - readiness (`:15021`): `GET /healthz/ready`, 200 once the node agent's snapshot is applied and
//!   the mesh state synced, 503 before and while draining.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use proto::lifecycle::LogControl;

use crate::context::Context;
use crate::pods::Proxy;

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// Shared proxy state.
    pub ctx: Arc<Context>,
    /// The pods.
    pub proxy: Arc<Proxy>,
    /// True when ready.
    pub ready: watch::Receiver<bool>,
    /// Log filter control, when the binary installed one.
    pub log: Option<LogControl>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").field("ready", &*self.ready.borrow()).finish()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

async fn config_dump(State(s): State<AdminState>) -> Json<Value> {
    let mesh = s.ctx.view.read(|state| {
        let mut workloads: Vec<Value> = state
            .workloads()
            .map(|w| {
                json!({
                    "uid": w.uid,
                    "name": w.name,
                    "namespace": w.namespace,
                    "addresses": w.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "node": w.node,
                    "service_account": w.service_account,
                    "protocol": if w.speaks_hbone() { "HBONE" } else { "TCP" },
                    "waypoint": w.waypoint.is_some(),
                    "services": w.services.keys().collect::<Vec<_>>(),
                    "authorization_policies": w.authorization_policies,
                    "healthy": w.healthy,
                })
            })
            .collect();
        workloads.sort_by(|a, b| a["uid"].as_str().cmp(&b["uid"].as_str()));
        let mut services: Vec<Value> = state
            .services()
            .map(|svc| {
                json!({
                    "key": svc.key,
                    "addresses": svc.vips.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "ports": svc.ports.iter().map(|p| json!({"port": p.service_port, "target_port": p.target_port.unwrap_or(0)})).collect::<Vec<_>>(),
                    "waypoint": svc.waypoint.is_some(),
                })
            })
            .collect();
        services.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        let mut policies: Vec<&String> = state.policies.names().collect();
        policies.sort();
        json!({"workloads": workloads, "services": services, "policies": policies})
    });
    Json(json!({
        "pods": s.proxy.summaries(),
        // Sent by the node agent but not served yet (listeners could not be bound): retried.
        "pods_pending": s.proxy.pending_uids(),
        "mesh": mesh,
        "certificates": certificates(&s),
        "trust_bundle": s.ctx.view.trust.current().fingerprints(),
        "live_inbound_connections": s.ctx.tracker.len(),
    }))
}

fn certificates(s: &AdminState) -> Vec<Value> {
    s.ctx
        .certs
        .held()
        .into_iter()
        .map(|h| match h.current {
            Some(c) => json!({
                "identity": h.identity.to_string(),
                "state": "ready",
                "not_before_unix": unix(c.not_before),
                "expires_unix": unix(c.not_after),
                "renews_unix": c.renews_at.map(unix),
                "chain_sha256": c.chain_sha256,
            }),
            None => json!({"identity": h.identity.to_string(), "state": "pending", "expires_unix": null}),
        })
        .collect()
}

/// Live inbound connections: who (identity proven by TLS, or none for plaintext), from where, to
/// which pod address, since when.
async fn connections(State(s): State<AdminState>) -> Json<Value> {
    let live: Vec<Value> = s
        .ctx
        .tracker
        .snapshot()
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id,
                "source_identity": c.source.map(|id| id.to_string()),
                "source_ip": c.source_ip.to_string(),
                "destination": c.destination.to_string(),
                "opened_unix": unix(c.opened),
            })
        })
        .collect();
    Json(json!({"inbound": live}))
}

async fn certs(State(s): State<AdminState>) -> Json<Value> {
    Json(json!({"certificates": certificates(&s)}))
}

async fn logging(State(s): State<AdminState>, method: axum::http::Method, uri: axum::http::Uri) -> Response {
    proto::lifecycle::logging_endpoint(s.log.as_ref(), &method, uri.query()).into_response()
}

async fn ready(State(s): State<AdminState>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the node agent's snapshot and the mesh state\n")
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.ctx.metrics.encode())
        .into_response()
}

/// The admin router.
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/config_dump", get(config_dump))
        .route("/certs", get(certs))
        .route("/connections", get(connections))
        .route("/logging", get(logging).post(logging))
        .route("/healthz/ready", get(ready))
        .with_state(state)
}

/// The metrics router.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new().route("/metrics", get(metrics)).route("/stats/prometheus", get(metrics)).with_state(state)
}

/// The readiness router.
pub fn readiness_router(state: AdminState) -> Router {
    Router::new().route("/healthz/ready", get(ready)).with_state(state)
}

/// Serves `router` on `listener` until `stop` is cancelled, within the endpoint limits (a flood
/// of connections to a metrics port cannot take descriptors pod traffic needs).
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    proto::endpoint::serve(listener, router, proto::endpoint::EndpointLimits::default(), stop.cancelled_owned()).await;
}
