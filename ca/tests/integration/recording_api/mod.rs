//! A mock Kubernetes API server on loopback that records every request and keeps objects by
//! path: GET answers what is stored (404 otherwise), PATCH stores (merging labels, a null removes
//! one), DELETE removes (404 when absent).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Value, json};

/// What the mock API server was asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct Mock {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn not_found(path: &str) -> Response {
    json_response(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
    )
}

async fn handle(State(mock): State<Mock>, request: Request) -> Response {
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let path = request.uri().path().to_owned();
    let content_type =
        request.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let bytes = to_bytes(request.into_body(), 1 << 20).await.unwrap();
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    mock.seen.lock().unwrap().push(Seen { method: method.clone(), uri, content_type, body: body.clone() });
    let mut objects = mock.objects.lock().unwrap();
    match method.as_str() {
        "GET" => objects.get(&path).map_or_else(|| not_found(&path), |o| json_response(200, o)),
        "PATCH" => {
            let mut object = objects.get(&path).cloned().unwrap_or(body.clone());
            if let Some(labels) = body["metadata"]["labels"].as_object() {
                let current = object["metadata"]["labels"].as_object().cloned().unwrap_or_default();
                let mut merged = current;
                for (k, v) in labels {
                    if v.is_null() {
                        merged.remove(k);
                    } else {
                        merged.insert(k.clone(), v.clone());
                    }
                }
                object["metadata"]["labels"] = Value::Object(merged);
            }
            objects.insert(path, object.clone());
            json_response(200, &object)
        }
        "DELETE" => match objects.remove(&path) {
            Some(_) => json_response(200, &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            None => not_found(&path),
        },
        _ => json_response(405, &json!({})),
    }
}

impl Mock {
    /// Serves on loopback; a `kube` client for it.
    pub async fn serve(&self) -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
    }

    /// What it was asked since the last call.
    pub fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}
