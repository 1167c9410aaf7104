//! RequestAuthentication at the waypoint, with real processes: an identity provider serving its
//! JWKS over HTTPS (in the CA's network namespace, with its own CA), the `ca` fetching and
//! refreshing it, the waypoint checking tokens, and AuthorizationPolicy rules on the result.
//!
//! - no token is anonymous: allowed where no rule needs a principal, 403 where one does;
//! - a valid token reaches the app without its `Authorization` header, with the claim header the
//!   rule asks for; a client's own copy of that header never reaches the app;
//! - expired, wrongly signed, HMAC, wrong-audience and two-token requests are 401;
//! - `request.auth.claims[group]` decides per token;
//! - the provider rotates its key: after the CA's refresh new tokens pass and old ones are 401;
//!   the provider goes down: the last keys stay in use;
//! - a rule whose keys cannot be fetched refuses its tokens and is reported at
//!   `/debug/config_errors`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::apps::{http_server, jwks_server};
use e2e::mesh::{HttpAnswer, Mesh, MeshOptions, PodSpec, http_exchange};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const APP_PORT: u16 = 8080;
const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
const WAYPOINT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const ISSUER: &str = "https://idp.test";
const JWKS_PORT: u16 = 8443;

/// An identity provider's signing key.
struct Idp {
    key: EncodingKey,
    jwk: Jwk,
    kid: String,
}

impl Idp {
    fn new(kid: &str) -> Idp {
        let der = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_der();
        let key = EncodingKey::from_ec_der(&der);
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        Idp { key, jwk, kid: kid.to_owned() }
    }

    fn jwks(keys: &[&Idp]) -> String {
        serde_json::to_string(&JwkSet { keys: keys.iter().map(|i| i.jwk.clone()).collect() }).unwrap()
    }

    /// A token for `sub` (audience `hello`, valid 5 min) with `extra` claims.
    fn token(&self, sub: &str, extra: &Value) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = json!({"iss": ISSUER, "sub": sub, "aud": "hello", "iat": now, "exp": now + 300});
        claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn bearer(token: &str) -> (&'static str, String) {
    ("Authorization", format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_checks_jwts_with_keys_the_ca_fetches() {
    // The provider's TLS identity, issued by a CA only the mesh's CA is told to trust.
    let provider_ca = proto::testing::TestCa::new();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), provider_ca.root_pem()).unwrap();
    let options = MeshOptions {
        ca_args: vec![
            "--jwks-ca-file".into(),
            ca_file.path().display().to_string(),
            "--jwks-refresh".into(),
            "2s".into(),
        ],
        ..MeshOptions::default()
    };
    let mut mesh = Mesh::start(options).unwrap();
    let key_a = Idp::new("a");
    let document = Arc::new(Mutex::new(Some(Idp::jwks(&[&key_a]))));
    let listener = mesh.underlay.ns.tcp_listener(SocketAddr::from(([127, 0, 0, 1], JWKS_PORT))).unwrap();
    let (chain, key) = provider_ca.issue_server(&["127.0.0.1"]);
    let (_provider, fetches) = jwks_server(listener, chain, key, document.clone()).unwrap();

    mesh.namespace("demo", true).await.unwrap();
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await.unwrap();
    let server = mesh.pod(PodSpec::new("hello", "demo", 2).label("app", "hello")).await.unwrap();
    http_server(server.listen(APP_PORT).unwrap(), "hello");
    mesh.apply(
        "svc-hello",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: demo\nspec:\n  clusterIP: {HELLO}\n  \
             selector:\n    app: hello\n  ports:\n    - name: http\n      port: 80\n      targetPort: {APP_PORT}\n"
        ),
    )
    .unwrap();
    mesh.waypoint("demo", "waypoint", 1, WAYPOINT).await.unwrap();
    mesh.use_waypoint("demo", Some("waypoint")).unwrap();
    mesh.apply(
        "request-authn",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: idp\n  namespace: demo\n\
             spec:\n  targetRefs:\n    - {{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}\n  \
             jwtRules:\n    - issuer: {ISSUER}\n      jwksUri: https://127.0.0.1:{JWKS_PORT}/keys\n      \
             audiences: [hello]\n      outputClaimToHeaders:\n        - {{header: x-jwt-group, claim: group}}\n"
        ),
    )
    .unwrap();
    // /secure needs a token; /admin needs group admin; the rest is open.
    mesh.apply(
        "authz-jwt",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: need-token\n  namespace: demo\n\
         spec:\n  targetRefs:\n    - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}\n  action: DENY\n  \
         rules:\n    - from:\n        - source:\n            notRequestPrincipals: [\"*\"]\n      to:\n        - operation:\n            paths: [\"/secure*\", \"/admin*\"]\n    \
         - to:\n        - operation:\n            paths: [\"/admin*\"]\n      when:\n        - key: request.auth.claims[group]\n          notValues: [admin]\n",
    )
    .unwrap();
    mesh.settle(&[], &[]).await.unwrap();

    let to = SocketAddr::from((HELLO, 80));
    let ns = client.netns.ns.clone();
    let get = |path: &str, headers: Vec<(&'static str, String)>| {
        let (ns, path) = (ns.clone(), path.to_owned());
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http_exchange(&ns, "GET", to, &path, &h).await.unwrap()
        }
    };
    let alice = key_a.token("alice", &json!({"group": "dev"}));
    // The policy first (before it arrives, /secure is open to anyone, token or not); then, until
    // the CA has fetched the keys and the waypoint has them, tokens are refused.
    mesh.wait_until("the waypoint to deny anonymous /secure", Duration::from_secs(30), || async {
        get("/secure", vec![]).await.status == 403
    })
    .await
    .unwrap();
    mesh.wait_until("a valid token to pass the waypoint", Duration::from_secs(30), || async {
        get("/secure", vec![bearer(&alice)]).await.status == 200
    })
    .await
    .unwrap();
    assert!(fetches.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    // Anonymous: open paths pass, paths that need a principal are denied.
    assert_eq!(get("/public", vec![]).await.status, 200);
    let anonymous = get("/secure", vec![]).await;
    assert_eq!(anonymous.status, 403, "{anonymous:?}");

    // A valid token: the app sees the claim header, not the token; a forged claim header is gone.
    let a: HttpAnswer = get("/secure", vec![bearer(&alice), ("x-jwt-group", "admin".into())]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-seen-authorization"), Some("-"), "the token was forwarded: {a:?}");
    assert_eq!(a.header("x-seen-x-jwt-group"), Some("dev"), "{a:?}");
    let forged = get("/public", vec![("x-jwt-group", "admin".into())]).await;
    assert_eq!(forged.status, 200);
    assert_eq!(forged.header("x-seen-x-jwt-group"), None, "a client-set claim header reached the app: {forged:?}");

    // Claims decide: group dev may not reach /admin, group admin may.
    assert_eq!(get("/admin", vec![bearer(&alice)]).await.status, 403);
    let root = key_a.token("root", &json!({"group": "admin"}));
    assert_eq!(get("/admin", vec![bearer(&root)]).await.status, 200);

    // Invalid tokens are 401, on open paths too.
    let now = jsonwebtoken::get_current_timestamp();
    let stranger = Idp::new("a");
    let hmac = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"iss": ISSUER, "sub": "x", "aud": "hello", "exp": now + 300}),
        &EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    for (what, headers) in [
        ("expired", vec![bearer(&key_a.token("alice", &json!({"exp": now - 300})))]),
        ("signed by another key", vec![bearer(&stranger.token("alice", &json!({})))]),
        ("HMAC", vec![bearer(&hmac)]),
        ("another audience", vec![bearer(&key_a.token("alice", &json!({"aud": "other"})))]),
        ("another issuer", vec![bearer(&key_a.token("alice", &json!({"iss": "https://evil.test"})))]),
        ("two tokens", vec![bearer(&alice), ("Authorization", format!("Bearer {root}"))]),
    ] {
        let a = get("/public", headers).await;
        assert_eq!(a.status, 401, "{what}: {a:?}");
        assert_eq!(a.header("www-authenticate"), Some("Bearer error=\"invalid_token\""), "{what}");
    }
    let a = get(&format!("/public?access_token={}", stranger.token("x", &json!({}))), vec![]).await;
    assert_eq!(a.status, 401, "a bad token in the query string: {a:?}");

    // The provider rotates to key b: after the CA's refresh, b's tokens pass and a's are refused.
    let key_b = Idp::new("b");
    *document.lock().unwrap() = Some(Idp::jwks(&[&key_b]));
    let bob = key_b.token("bob", &json!({}));
    mesh.wait_until("the rotated key to be used", Duration::from_secs(30), || async {
        get("/secure", vec![bearer(&bob)]).await.status == 200
    })
    .await
    .unwrap();
    assert_eq!(get("/secure", vec![bearer(&alice)]).await.status, 401, "a retired key still verifies");

    // The provider goes down: after several failed refreshes the last keys are still in use.
    let before = fetches.load(std::sync::atomic::Ordering::Relaxed);
    *document.lock().unwrap() = None;
    mesh.wait_until("failed refreshes", Duration::from_secs(30), || async {
        fetches.load(std::sync::atomic::Ordering::Relaxed) >= before + 2
    })
    .await
    .unwrap();
    assert_eq!(get("/secure", vec![bearer(&bob)]).await.status, 200, "the last keys were dropped");
    let log = mesh.log_tails(400);
    assert!(log.contains("JWKS fetch failed"), "the CA did not log the failed refresh:\n{log}");
    assert!(log.contains("invalid JWT"), "the waypoint did not log a refusal:\n{log}");

    // Keys that cannot be fetched at all (nothing listens there): that rule's tokens are refused
    // and the CA reports why.
    mesh.apply(
        "request-authn-2",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: gone\n  namespace: demo\n\
             spec:\n  targetRefs:\n    - {{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}\n  \
             jwtRules:\n    - issuer: https://gone.test\n      jwksUri: https://127.0.0.1:{}/keys\n",
            JWKS_PORT + 1
        ),
    )
    .unwrap();
    mesh.wait_until("the unreachable keys to be reported", Duration::from_secs(30), || async {
        mesh.ca_get("/debug/config_errors").await.is_ok_and(|(_, body)| {
            body.contains("RequestAuthentication demo/gone") && body.contains("could not be fetched")
        })
    })
    .await
    .unwrap();
    let gone = key_b.token("x", &json!({"iss": "https://gone.test"}));
    mesh.wait_until("tokens of the unreachable issuer to be refused", Duration::from_secs(20), || async {
        get("/public", vec![bearer(&gone)]).await.status == 401
    })
    .await
    .unwrap();
    assert_eq!(get("/secure", vec![bearer(&bob)]).await.status, 200, "another rule's failure spilled over");
}
