//! ztunnel's xDS client against a real control plane (in process, TLS, token auth): initial sync,
//! live edits, the trust bundle swapped live, and a control-plane restart with resync.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca::auth::{DEFAULT_AUDIENCE, JwtIssuer, TokenCheck, TokenRequest, TokenSigner};
use ca::{Config, ControlPlane};
use proto::control::ControlPlaneTarget;
use proto::tls::{SharedTrustBundle, TrustBundle};
use tokio::sync::oneshot;
use ztunnel::certs::TokenSource;
use ztunnel::xds::{MeshView, XdsClient};

const ISSUER: &str = "https://kubelet.test";

struct Ca {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ca::Error>>,
    grpc: SocketAddr,
    authority: Arc<ca::authority::Authority>,
}

async fn start_ca(objects: &Path, state: &Path, signer: &TokenSigner, addr: SocketAddr) -> Ca {
    let tokens = TokenCheck::Local(JwtIssuer { issuer: ISSUER.into(), jwks: signer.jwks().clone() });
    let mut config = Config::local(objects.to_owned(), state.to_owned(), tokens);
    config.grpc_addr = addr;
    let cp = ControlPlane::bind(config).await.unwrap();
    let (grpc, authority) = (cp.grpc_addr(), cp.authority());
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(cp.run(async {
        let _ = rx.await;
    }));
    Ca { stop, task, grpc, authority }
}

impl Ca {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

fn write_pods(dir: &Path, names: &[(&str, &str)]) {
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    );
    for (name, ip) in names {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: demo\nspec:\n  nodeName: node-1\n  serviceAccountName: {name}\n  containers: []\nstatus:\n  podIP: {ip}\n"
        ));
    }
    let tmp = dir.join(".mesh.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("mesh.yaml")).unwrap();
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn follows_edits_bundle_changes_and_a_control_plane_restart() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write_pods(objects.path(), &[("client", "10.0.0.1"), ("server", "10.0.0.2")]);
    let signer = TokenSigner::new(ISSUER, None).unwrap();
    let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
    let addr = ca.grpc;

    let roots = std::fs::read(state.path().join("root-cert.pem")).unwrap();
    let trust = SharedTrustBundle::new(TrustBundle::from_pem(&roots).unwrap());
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
    let view = MeshView::new(trust.clone());
    let client = XdsClient {
        target: ControlPlaneTarget { addr, server_name: "localhost".into(), trust: trust.clone(), credential: None },
        token: TokenSource::Static(token),
        node_id: "ztunnel~node-1".into(),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(500),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(client.run(view.clone(), async {
        let _ = stop_rx.await;
    }));

    let mut synced = view.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s)).await.expect("synced").unwrap();
    assert_eq!(view.read(|s| s.workloads.len()), 2);
    let ip: IpAddr = "10.0.0.2".parse().unwrap();
    assert_eq!(view.read(|s| s.workload_by_ip(ip).map(|w| w.service_account.clone())), Some("server".into()));

    // A live edit: one pod goes, one arrives.
    write_pods(objects.path(), &[("client", "10.0.0.1"), ("other", "10.0.0.3")]);
    eventually("edit applied", || {
        view.read(|s| s.workload_by_ip(ip).is_none() && s.workload_by_ip("10.0.0.3".parse().unwrap()).is_some())
    })
    .await;

    // A root rotation step reaches the shared trust bundle.
    ca.authority.prepare_root().await.unwrap();
    eventually("two roots trusted", || trust.current().roots().len() == 2).await;

    // The control plane restarts; meanwhile the objects change. The client reconnects and resyncs.
    ca.stop().await;
    write_pods(objects.path(), &[("client", "10.0.0.1")]);
    let ca = start_ca(objects.path(), state.path(), &signer, addr).await;
    eventually("resynced after restart", || view.read(|s| s.workloads.len() == 1)).await;
    assert_eq!(trust.current().roots().len(), 2, "the bundle persisted with the CA state");

    stop_tx.send(()).unwrap();
    task.await.unwrap();
    ca.stop().await;
}
