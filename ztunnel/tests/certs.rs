//! ztunnel's certificate manager against a real control plane (in process, real TLS gRPC): pod
//! identities through impersonation, one request for many concurrent callers, renewal in place,
//! a CA outage survived on the current certificate, and refusal for a pod on another node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ca::auth::{DEFAULT_AUDIENCE, JwtIssuer, TokenCheck, TokenRequest, TokenSigner};
use ca::{Config, ControlPlane};
use proto::SpiffeId;
use proto::control::ControlPlaneTarget;
use proto::tls::{SharedTrustBundle, TrustBundle};
use tokio::sync::oneshot;
use ztunnel::certs::{CertConfig, CertError, CertManager, TokenSource};

const ISSUER: &str = "https://kubelet.test";
const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/server";

struct Ca {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ca::Error>>,
    grpc: SocketAddr,
    authority: Arc<ca::authority::Authority>,
}

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

async fn start_ca(objects: &Path, state: &Path, signer: &TokenSigner, addr: SocketAddr) -> Ca {
    let tokens = TokenCheck::Local(JwtIssuer { issuer: ISSUER.into(), jwks: signer.jwks().clone() });
    let mut config = Config::local(objects.to_owned(), state.to_owned(), tokens);
    config.grpc_addr = addr;
    let cp = ControlPlane::bind(config).await.unwrap();
    let grpc = cp.grpc_addr();
    let authority = cp.authority();
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(cp.run(async {
        let _ = rx.await;
    }));
    // No wait for the objects to load: until then the CA answers Unavailable and the manager
    // retries.
    Ca { stop, task, grpc, authority }
}

impl Ca {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    fn issued(&self) -> usize {
        self.authority.log().records(0).iter().filter(|r| r.requested_by == ZTUNNEL).count()
    }
}

fn manager(grpc: SocketAddr, state: &Path, signer: &TokenSigner, ttl: Duration) -> Arc<CertManager> {
    let roots = std::fs::read(state.join("root-cert.pem")).unwrap();
    let target = ControlPlaneTarget {
        addr: grpc,
        server_name: "localhost".into(),
        trust: SharedTrustBundle::new(TrustBundle::from_pem(&roots).unwrap()),
        credential: None,
    };
    let token = signer
        .mint(&TokenRequest {
            namespace: "istio-system",
            service_account: "ztunnel",
            pod: None,
            node: Some("node-1"),
            audience: DEFAULT_AUDIENCE,
            ttl: Duration::from_secs(3600),
        })
        .unwrap();
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
    assert_eq!(ca.issued(), 1, "one CSR for 50 callers");
    let lifetime = creds[0].current().not_after().duration_since(creds[0].current().not_before()).unwrap();
    assert_eq!(lifetime, Duration::from_secs(24 * 3600 + 60), "the CA's default lifetime");

    // A pod on another node: the CA refuses, the caller learns it, nothing is held.
    let err = certs.fetch(&id(SERVER)).await.unwrap_err();
    assert!(matches!(err, CertError::Ca { code: tonic::Code::Unauthenticated, .. }), "{err}");
    assert_eq!(certs.held().len(), 2);
    assert!(certs.held().iter().any(|(i, exp)| i == &id(SERVER) && exp.is_none()));
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
    assert_eq!(ca.issued(), 2);

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
