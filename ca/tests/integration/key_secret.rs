//! Self-managed CA keys kept in a Kubernetes Secret (cluster mode), through `kube` against a mock
//! API server with real optimistic concurrency (resourceVersion) and conflict answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ca::authority::{Authority, AuthorityConfig, KeySource};
use serde_json::{Value, json};

#[derive(Default)]
struct Api {
    secret: Option<Value>,
    version: u64,
    creates: usize,
    replaces: usize,
    /// Answer the next GET with 404 although the Secret exists (another replica created it
    /// between this replica's read and its create).
    hide_once: bool,
}

type Shared = Arc<Mutex<Api>>;

fn status(code: u16, reason: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), Json(body)).into_response()
}

async fn read(State(api): State<Shared>) -> Response {
    let mut api = api.lock().unwrap();
    if std::mem::take(&mut api.hide_once) {
        return status(404, "NotFound");
    }
    match &api.secret {
        Some(s) => Json(s.clone()).into_response(),
        None => status(404, "NotFound"),
    }
}

async fn create(State(api): State<Shared>, Json(mut body): Json<Value>) -> Response {
    let mut api = api.lock().unwrap();
    api.creates += 1;
    if api.secret.is_some() {
        return status(409, "AlreadyExists");
    }
    api.version += 1;
    body["metadata"]["resourceVersion"] = json!(api.version.to_string());
    body["metadata"]["namespace"] = json!("istio-system");
    api.secret = Some(body.clone());
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn replace(State(api): State<Shared>, Json(mut body): Json<Value>) -> Response {
    let mut api = api.lock().unwrap();
    api.replaces += 1;
    if body["metadata"]["resourceVersion"] != json!(api.version.to_string()) {
        return status(409, "Conflict");
    }
    api.version += 1;
    body["metadata"]["resourceVersion"] = json!(api.version.to_string());
    api.secret = Some(body.clone());
    Json(body).into_response()
}

async fn mock() -> (Shared, kube::Client) {
    let api: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/api/v1/namespaces/istio-system/secrets", post(create))
        .route("/api/v1/namespaces/istio-system/secrets/ambient-ca", get(read).put(replace))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    (api, client)
}

fn config(client: &kube::Client, state: &std::path::Path) -> AuthorityConfig {
    let mut config = AuthorityConfig::new("cluster.local", state);
    config.keys = KeySource::SelfManagedInSecret {
        client: client.clone(),
        namespace: "istio-system".into(),
        name: "ambient-ca".into(),
    };
    config
}

/// The stored document (base64 of the JSON, as the API carries Secret data).
fn stored_doc(api: &Shared) -> String {
    let secret = api.lock().unwrap().secret.clone().unwrap();
    secret["data"]["authority.json"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn keys_live_in_the_secret_across_restarts_and_writers_never_overwrite_each_other() {
    let (api, client) = mock().await;
    // First start: nothing stored, a root is created in the Secret (not on disk).
    let state = tempfile::tempdir().unwrap();
    let first = Authority::open(config(&client, state.path())).await.unwrap();
    let root = first.material().roots[0].info.fingerprint.clone();
    assert_eq!(api.lock().unwrap().creates, 1);
    assert!(!state.path().join("authority.json").exists(), "keys are not written to the pod's disk");
    let created_doc = stored_doc(&api);

    // A restart on a fresh disk (a new pod) finds the same root.
    let other_disk = tempfile::tempdir().unwrap();
    let second = Authority::open(config(&client, other_disk.path())).await.unwrap();
    assert_eq!(second.material().roots[0].info.fingerprint, root);
    assert_eq!(api.lock().unwrap().creates, 1);

    // A rotation is written back with the version last read.
    second.rotate_intermediate().await.unwrap();
    assert_eq!(api.lock().unwrap().replaces, 1);
    assert_ne!(stored_doc(&api), created_doc);

    // The first instance's view is stale: its write is refused, not applied.
    let err = first.rotate_intermediate().await.unwrap_err().to_string();
    assert!(err.contains("changed by someone else"), "{err}");
    assert_eq!(api.lock().unwrap().version, 2, "nothing overwritten");
}

#[tokio::test]
async fn a_replica_that_loses_the_creation_race_uses_the_winners_keys() {
    let (api, client) = mock().await;
    let winner = Authority::open(config(&client, tempfile::tempdir().unwrap().path())).await.unwrap();
    let winner_root = winner.material().roots[0].info.fingerprint.clone();
    api.lock().unwrap().hide_once = true;
    let loser = Authority::open(config(&client, tempfile::tempdir().unwrap().path())).await.unwrap();
    assert_eq!(api.lock().unwrap().creates, 2, "the loser tried to create, got a conflict");
    assert_eq!(loser.material().roots[0].info.fingerprint, winner_root);
    assert_eq!(loser.material().signer.info.fingerprint, winner.material().signer.info.fingerprint);
}
