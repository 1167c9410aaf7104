//! The control plane's admin HTTP API. `/metrics` and `/healthz/ready` answer anyone who can
//! reach the port; `/debug/*` only callers on loopback.
//!
//! - `GET /debug/state`: the translated mesh state (workloads, services, policies, warnings) as JSON;
//! - `GET /debug/config_errors`: problems in the sources (file and reason) and objects the
//!   translation could not take as written (policies made to fail closed), until fixed;
//! - `GET /debug/objects`: object counts per kind;
//! - `GET /debug/explain?from=<ns>/<pod>&to=<dest>`: what the mesh would do with that connection
//!   now, by ztunnel's own decision code ([`crate::explain`]); 400 with the reason for a question
//!   it cannot answer;
//! - `GET /logging`: the log filter in force; `POST /logging?level=<filter>` changes it (loopback
//!   only too);
//! - `GET /healthz/ready`: 200 once the first state is computed, 503 before;
//! - `GET /metrics`: Prometheus metrics (certificates issued and refused, signing latency, xDS
//!   clients).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::MeshView;
use crate::metrics::CaMetrics;
use crate::objects::Store;

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The object store.
    pub store: Arc<Store>,
    /// The latest state.
    pub view: watch::Receiver<Arc<MeshView>>,
    /// The resources served over xDS (what every ztunnel holds).
    pub resources: watch::Receiver<Arc<crate::xds::resources::Resources>>,
    /// The CA's trust bundle.
    pub trust: Arc<proto::tls::SharedTrustBundle>,
    /// Open xDS streams.
    pub clients: Arc<AtomicUsize>,
    /// Metrics.
    pub metrics: Arc<CaMetrics>,
    /// Changes the log filter, when the binary installed one.
    pub log: Option<proto::lifecycle::LogControl>,
}

async fn metrics(State(s): State<AdminState>) -> Response {
    s.metrics.xds_clients.set(s.clients.load(Ordering::Relaxed) as i64);
    s.metrics.config_errors.set(all_config_errors(&s).len() as i64);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode())
        .into_response()
}

async fn state_dump(State(s): State<AdminState>) -> Response {
    let view = s.view.borrow().clone();
    Json(view.as_ref()).into_response()
}

/// The sources' errors, then the translation's (policies made to fail closed).
fn all_config_errors(s: &AdminState) -> Vec<crate::objects::ConfigError> {
    let mut errors = s.store.errors();
    errors.extend(s.view.borrow().state.config_errors.iter().cloned());
    errors
}

async fn config_errors(State(s): State<AdminState>) -> Response {
    Json(all_config_errors(&s)).into_response()
}

async fn objects(State(s): State<AdminState>) -> Response {
    let counts = s.store.snapshot().counts();
    let body = serde_json::json!({
        "objects": counts,
        "xds_clients": s.clients.load(Ordering::Relaxed),
    });
    Json(body).into_response()
}

/// The question `/debug/explain` answers.
#[derive(Debug, serde::Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    /// At a waypoint: the request's method, path and headers (`Name: value` lines).
    method: Option<String>,
    path: Option<String>,
    header: Option<String>,
}

async fn explain(
    State(s): State<AdminState>,
    query: Result<axum::extract::Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(q)) = query else {
        return (StatusCode::BAD_REQUEST, "expected ?from=<ns>/<pod>&to=<ns>/<pod>:<port>|<host>:<port>|<ip>:<port>\n")
            .into_response();
    };
    let resources = s.resources.borrow().clone();
    let view = crate::explain::ztunnel_view(&resources, s.trust.clone());
    let objects = s.store.snapshot();
    let binding =
        |ns: &str, svc: Option<&str>, pod: Option<&str>| crate::translate::waypoint_binding(&objects, ns, svc, pod);
    let mut http = crate::explain::HttpQuestion::default();
    if let Some(m) = q.method.filter(|m| !m.is_empty()) {
        http.method = m;
    }
    if let Some(p) = q.path.filter(|p| !p.is_empty()) {
        http.path = p;
    }
    for line in q.header.iter().flat_map(|h| h.lines()).filter(|l| !l.trim().is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return (StatusCode::BAD_REQUEST, format!("header {line:?}: expected <name>: <value>\n")).into_response();
        };
        http.headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let answer = view.read(|state| crate::explain::explain(state, &q.from, &q.to, &binding)).and_then(|mut a| {
        if a.waypoint.is_some() {
            let waypoint = crate::explain::waypoint_view(&resources, s.trust.clone());
            waypoint.read(|state| crate::explain::explain_request(&mut a, state, &http))?;
        }
        Ok(a)
    });
    match answer {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn ready(State(s): State<AdminState>) -> Response {
    if s.view.borrow().generation > 0 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading configuration\n").into_response()
    }
}

/// `/debug/*` shows the whole mesh (every workload, identity and policy): it answers only
/// callers on loopback (the CA's own pod: `kubectl port-forward` or `exec`), whatever address
/// the port is bound to, so that Prometheus may scrape `/metrics` from elsewhere.
async fn loopback_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request.extensions().get::<proto::endpoint::PeerAddr>().map(|p| p.0);
    match peer {
        Some(addr) if addr.ip().is_loopback() => next.run(request).await,
        _ => {
            tracing::warn!(peer = ?peer, path = %request.uri().path(), "debug endpoint refused: not from loopback");
            (StatusCode::FORBIDDEN, "debug endpoints answer only on loopback (kubectl port-forward)\n").into_response()
        }
    }
}

async fn logging(State(s): State<AdminState>, method: axum::http::Method, uri: axum::http::Uri) -> Response {
    proto::lifecycle::logging_endpoint(s.log.as_ref(), &method, uri.query()).into_response()
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    let debug = Router::new()
        .route("/debug/state", get(state_dump))
        .route("/debug/config_errors", get(config_errors))
        .route("/debug/objects", get(objects))
        .route("/debug/explain", get(explain))
        .route("/logging", get(logging).post(logging))
        .route_layer(axum::middleware::from_fn(loopback_only));
    Router::new().merge(debug).route("/healthz/ready", get(ready)).route("/metrics", get(metrics)).with_state(state)
}

/// Serves the admin API until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    proto::endpoint::serve(listener, router(state), proto::endpoint::EndpointLimits::default(), stop).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn debug_answers_only_loopback_while_metrics_answer_anyone() {
        let (_tx, view) = watch::channel(Arc::new(MeshView::default()));
        let state = AdminState {
            store: Store::new(),
            view,
            resources: watch::channel(Arc::default()).1,
            trust: proto::testing::TestCa::new().shared_bundle(),
            clients: Arc::default(),
            metrics: Arc::new(CaMetrics::new()),
            log: None,
        };
        let status = |path: &str, peer: Option<&str>| {
            let mut request = Request::get(path).body(Body::empty()).unwrap();
            if let Some(p) = peer {
                request.extensions_mut().insert(proto::endpoint::PeerAddr(p.parse().unwrap()));
            }
            let router = router(state.clone());
            async move { router.oneshot(request).await.unwrap().status() }
        };
        assert_eq!(status("/logging", Some("10.1.2.3:5000")).await, StatusCode::FORBIDDEN);
        for path in ["/debug/state", "/debug/config_errors", "/debug/objects"] {
            assert_eq!(status(path, Some("127.0.0.1:5000")).await, StatusCode::OK, "{path}");
            assert_eq!(status(path, Some("[::1]:5000")).await, StatusCode::OK, "{path}");
            assert_eq!(status(path, Some("10.1.2.3:5000")).await, StatusCode::FORBIDDEN, "{path}");
            assert_eq!(status(path, None).await, StatusCode::FORBIDDEN, "{path}");
        }
        assert_eq!(status("/metrics", Some("10.1.2.3:5000")).await, StatusCode::OK);
        // Explaining answers loopback (here: 400, no such workload) and refuses anyone else.
        let explain = "/debug/explain?from=demo/a&to=demo/b:80";
        assert_eq!(status(explain, Some("127.0.0.1:5000")).await, StatusCode::BAD_REQUEST);
        assert_eq!(status("/debug/explain?from=demo/a", Some("127.0.0.1:5000")).await, StatusCode::BAD_REQUEST);
        assert_eq!(status(explain, Some("10.1.2.3:5000")).await, StatusCode::FORBIDDEN);
    }
}
