//! Token authentication through the Kubernetes API (TokenReview via `kube`), against a mock API
//! server that answers like a real one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use ca::auth::{AuthConfig, AuthError, Authenticator, Caller, DEFAULT_AUDIENCE, Method, TokenCheck};
use serde_json::{Value, json};

type Seen = Arc<Mutex<Vec<Value>>>;

async fn review(State(seen): State<Seen>, Json(body): Json<Value>) -> Json<Value> {
    seen.lock().unwrap().push(body.clone());
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let status = match token {
        "ztunnel-token" => json!({
            "authenticated": true,
            "audiences": [DEFAULT_AUDIENCE],
            "user": {
                "username": "system:serviceaccount:istio-system:ztunnel",
                "extra": {
                    "authentication.kubernetes.io/node-name": ["node-7"],
                    "authentication.kubernetes.io/pod-name": ["ztunnel-x1"],
                },
            },
        }),
        "other-audience" => json!({
            "authenticated": true,
            "audiences": ["https://kubernetes.default.svc"],
            "user": {"username": "system:serviceaccount:demo:app"},
        }),
        "a-person" => json!({
            "authenticated": true,
            "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": "alice@example.com"},
        }),
        _ => json!({"authenticated": false, "error": "token has expired"}),
    };
    Json(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {},
        "spec": body["spec"],
        "status": status,
    }))
}

#[tokio::test]
async fn tokens_are_checked_by_token_review_with_our_audience() {
    let seen: Seen = Arc::default();
    let app =
        axum::Router::new().route("/apis/authentication.k8s.io/v1/tokenreviews", post(review)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
    let auth = Authenticator::new(AuthConfig {
        trust_domain: "cluster.local".into(),
        audiences: vec![DEFAULT_AUDIENCE.into()],
        tokens: TokenCheck::TokenReview(client),
        node_accounts: vec![],
        admins: vec![],
    });

    let caller = auth.authenticate(Some(b"Bearer ztunnel-token"), None).await.unwrap();
    assert_eq!(
        caller,
        Caller {
            identity: "spiffe://cluster.local/ns/istio-system/sa/ztunnel".parse().unwrap(),
            method: Method::Token,
            node: Some("node-7".into()),
            pod: Some(("istio-system".into(), "ztunnel-x1".into())),
        }
    );
    let sent = seen.lock().unwrap()[0].clone();
    assert_eq!(sent["spec"]["audiences"], json!([DEFAULT_AUDIENCE]), "the review asks for our audience");
    // A positive answer is reused for a while: the same token again costs no API call.
    assert_eq!(auth.authenticate(Some(b"Bearer ztunnel-token"), None).await.unwrap(), caller);
    assert_eq!(seen.lock().unwrap().len(), 1);

    for (token, what) in [("other-audience", "wrong audience"), ("expired", "expired")] {
        let err = auth.authenticate(Some(format!("Bearer {token}").as_bytes()), None).await.unwrap_err();
        assert!(matches!(err, AuthError::InvalidToken(_)), "{what}: {err}");
    }
    // Refusals are not cached: asking again asks the API server again.
    let before = seen.lock().unwrap().len();
    auth.authenticate(Some(b"Bearer expired"), None).await.unwrap_err();
    assert_eq!(seen.lock().unwrap().len(), before + 1);
    let err = auth.authenticate(Some(b"Bearer a-person"), None).await.unwrap_err();
    assert!(matches!(err, AuthError::NotServiceAccount(_)), "{err}");
}
