//! ztunnel's certificate manager against a real control plane (in process, real TLS gRPC): pod
//! identities through impersonation, one request for many concurrent callers, renewal in place,
//! a CA outage survived on the current certificate, and refusal for a pod on another node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca::auth::TokenSigner;
use proto::SpiffeId;
use ztunnel::certs::{CertConfig, CertError, CertManager, TokenSource};

mod support;

use support::{ISSUER, ZTUNNEL, start_ca, ztunnel_token};

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
    let (target, _) = support::target(grpc, state);
    let token = ztunnel_token(signer, "node-1");
    let mut config = CertConfig::new(target, TokenSource::Static(token), ZTUNNEL.parse().unwrap());
    config.ttl = ttl;
    config.retry_min = Duration::from_millis(100);
    config.retry_max = Duration::from_millis(400);
    CertManager::new(config).unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

#[tokio::test]
async fn pod_certificates_are_fetched_once_and_refused_for_other_nodes() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    pods(objects.path());
    let signer = TokenSigner::new(ISSUER, None).unwrap();
    let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
    let certs = manager(ca.grpc, state.path(), &signer, Duration::ZERO);

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
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    pods(objects.path());
    let signer = TokenSigner::new(ISSUER, None).unwrap();
    let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
    let addr = ca.grpc;
    // 4 s certificates: renewal comes at half of the lifetime left at receipt (~2 s); the CA's
    // one-minute backdating is in the past and does not count.
    let certs = manager(addr, state.path(), &signer, Duration::from_secs(4));
    let cred = certs.fetch(&id(CLIENT)).await.unwrap();
    let first = cred.current();

    // Renewed in place within ~2 s (half of 4 s ± 10 %).
    let deadline = Instant::now() + Duration::from_secs(6);
    while Arc::ptr_eq(&cred.current(), &first) {
        assert!(Instant::now() < deadline, "not renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cred.current().not_after() > first.not_after());
    assert_eq!(ca.issued_to_ztunnel(), 2);

    // CA down: renewals fail, the current certificate keeps being served.
    ca.stop().await;
    let during = cred.current();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(Arc::ptr_eq(&cred.current(), &during), "kept the current certificate through the outage");

    // CA back on the same address: the next retry renews.
    let ca = start_ca(objects.path(), state.path(), &signer, addr).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::ptr_eq(&cred.current(), &during) {
        assert!(Instant::now() < deadline, "not renewed after the CA came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cred.identity(), id(CLIENT));
    ca.stop().await;
}
