//! ztunnel's certificate manager against a real control plane (in process, real TLS gRPC): pod
//! identities through impersonation, one request for many concurrent callers, renewal in place,
//! a CA outage survived on the current certificate, and refusal for a pod on another node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ca::auth::TokenSigner;
use proto::SpiffeId;
use proto::testing::eventually;
use ztunnel::certs::{CertConfig, CertError, CertManager, TokenSource};

use crate::support::{ISSUER, ZTUNNEL, start_ca, ztunnel_token};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

fn pods(dir: &Path) {
    let pod = |name: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers: []\nstatus:\n  podIP: 10.0.0.{}\n",
            name.len()
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n---\n{}---\n{}",
        pod("client", "node-1"),
        pod("server", "node-2")
    );
    std::fs::write(dir.join("mesh.yaml"), text).unwrap();
}

fn manager(grpc: SocketAddr, state: &Path, signer: &TokenSigner, ttl: Duration) -> Arc<CertManager> {
    let (target, _) = crate::support::target(grpc, state);
    let token = ztunnel_token(signer, "node-1");
    let mut config = CertConfig::new(target, TokenSource::Static(token), ZTUNNEL.parse().unwrap());
    config.ttl = ttl;
    config.retry_min = Duration::from_millis(100);
    config.retry_max = Duration::from_millis(400);
    CertManager::new(config).unwrap()
}

/// A CA (in process, on `objects` with the pods of [`pods`]) and a manager of `ttl` certificates
/// talking to it as node-1's ztunnel. Keep the directories bound: the CA works in them.
struct Fixture {
    objects: tempfile::TempDir,
    state: tempfile::TempDir,
    signer: TokenSigner,
    ca: crate::support::Ca,
    certs: Arc<CertManager>,
}

impl Fixture {
    async fn start(ttl: Duration) -> Fixture {
        let objects = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        pods(objects.path());
        let signer = TokenSigner::new(ISSUER, None).unwrap();
        let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
        let certs = manager(ca.grpc, state.path(), &signer, ttl);
        Fixture { objects, state, signer, ca, certs }
    }
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

#[tokio::test]
async fn pod_certificates_are_fetched_once_and_refused_for_other_nodes() {
    let Fixture { ca, certs, objects: _objects, state: _state, .. } = Fixture::start(Duration::ZERO).await;

    // 50 concurrent first uses: one request, one credential.
    let fetches: Vec<_> = (0..50)
        .map(|_| {
            let certs = certs.clone();
            tokio::spawn(async move { certs.fetch(&id(CLIENT)).await })
        })
        .collect();
    let mut creds = Vec::new();
    for f in fetches {
        creds.push(f.await.unwrap().unwrap());
    }
    assert!(creds.iter().all(|c| Arc::ptr_eq(c, &creds[0])));
    assert_eq!(creds[0].identity(), id(CLIENT));
    assert_eq!(ca.issued_to_ztunnel(), 1, "one CSR for 50 callers");
    let lifetime = creds[0].current().not_after().duration_since(creds[0].current().not_before()).unwrap();
    assert_eq!(lifetime, Duration::from_secs(24 * 3600 + 60), "the CA's default lifetime");

    // A pod on another node: the CA refuses, the caller learns it, nothing is held.
    let err = certs.fetch(&id(SERVER)).await.unwrap_err();
    assert!(matches!(err, CertError::Ca { code: tonic::Code::Unauthenticated, .. }), "{err}");
    assert_eq!(certs.held().len(), 2);
    assert!(certs.held().iter().any(|h| h.identity == id(SERVER) && h.current.is_none()));
    certs.forget(&id(SERVER));
    assert_eq!(certs.held().len(), 1);
    ca.stop().await;
}

#[tokio::test]
async fn renewal_swaps_in_place_and_survives_a_ca_outage() {
    // 4 s certificates; the CA's one-minute backdating is in the past and does not count.
    let Fixture { objects, state, signer, ca, certs } = Fixture::start(Duration::from_secs(4)).await;
    let addr = ca.grpc;
    let before = SystemTime::now();
    let cred = certs.fetch(&id(CLIENT)).await.unwrap();
    let after = SystemTime::now();
    let first = cred.current();

    // Scheduled at half of the lifetime left at receipt, ± 10 %: with 4 s left, 1.8 s to 2.2 s
    // after receipt. Receipt lies between `before` and `after`, and the later the receipt the
    // later the renewal (receipt + f × (not_after − receipt) grows with it), so the earliest
    // possible time is from `before` with f = 0.45, the latest from `after` with f = 0.55.
    let held = certs.held();
    let renews_at = held[0].current.as_ref().unwrap().renews_at.expect("a renewal is scheduled");
    let left = |at: SystemTime| first.not_after().duration_since(at).unwrap().as_secs_f64();
    let (earliest, latest) = (before + seconds(0.45 * left(before)), after + seconds(0.55 * left(after)));
    assert!(
        earliest <= renews_at && renews_at <= latest,
        "renewal due {:?} after the request, not within half of the lifetime left at receipt ± 10 % \
         ({:.2} s left when asked, {:.2} s when answered)",
        renews_at.duration_since(before).unwrap(),
        left(before),
        left(after)
    );

    // It happens then, not before, and swaps the certificate in place.
    eventually("the renewal", Duration::from_secs(10), || async {
        (!Arc::ptr_eq(&cred.current(), &first)).then_some(())
    })
    .await;
    assert!(SystemTime::now() >= renews_at, "renewed before it was due");
    assert!(cred.current().not_after() > first.not_after());
    assert_eq!(ca.issued_to_ztunnel(), 2);

    // CA down: renewals fail and are retried, the current certificate keeps being served.
    ca.stop().await;
    let during = cred.current();
    let due = certs.held()[0].current.as_ref().unwrap().renews_at.unwrap();
    eventually("the renewal to come due and be retried", Duration::from_secs(10), || async {
        (SystemTime::now() > due && certs.held()[0].current.as_ref().unwrap().renews_at.is_none()).then_some(())
    })
    .await;
    // Under test: an outage that outlasts several retries (every 100 ms to 400 ms here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Arc::ptr_eq(&cred.current(), &during), "kept the current certificate through the outage");

    // CA back on the same address: the next retry renews.
    let ca = start_ca(objects.path(), state.path(), &signer, addr).await;
    eventually("the renewal after the CA came back", Duration::from_secs(10), || async {
        (!Arc::ptr_eq(&cred.current(), &during)).then_some(())
    })
    .await;
    assert_eq!(cred.identity(), id(CLIENT));
    ca.stop().await;
}

/// In ztunnel a pod's first connection may be outbound, so its certificate is first asked for
/// from a traffic shard's runtime. The renewal must live on the manager's own runtime: were it
/// spawned on the asker's, it would end with that runtime.
#[tokio::test]
async fn renewal_runs_on_the_managers_runtime_not_the_first_askers() {
    let Fixture { ca, certs, objects: _objects, state: _state, .. } = Fixture::start(Duration::from_secs(4)).await;

    let asker = certs.clone();
    let cred = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cred = runtime.block_on(asker.fetch(&id(CLIENT))).unwrap();
        drop(runtime); // everything spawned on it ends here
        cred
    })
    .await
    .unwrap();
    let first = cred.current();

    eventually("the renewal after the asker's runtime ended", Duration::from_secs(10), || async {
        (!Arc::ptr_eq(&cred.current(), &first)).then_some(())
    })
    .await;
    assert_eq!(ca.issued_to_ztunnel(), 2);
    ca.stop().await;
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}
