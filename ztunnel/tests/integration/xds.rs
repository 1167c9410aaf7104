//! ztunnel's xDS client against a real control plane (in process, TLS, token auth): initial sync,
//! live edits, the trust bundle swapped live, and a control-plane restart with resync.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ca::auth::TokenSigner;
use tokio::sync::oneshot;
use ztunnel::certs::TokenSource;
use ztunnel::xds::{MeshView, XdsClient};

use crate::support::{ISSUER, start_ca, ztunnel_token};

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
    proto::testing::eventually(what, Duration::from_secs(10), || std::future::ready(check().then_some(()))).await;
}

#[tokio::test]
async fn follows_edits_bundle_changes_and_a_control_plane_restart() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    write_pods(objects.path(), &[("client", "10.0.0.1"), ("server", "10.0.0.2")]);
    let signer = TokenSigner::new(ISSUER, None).unwrap();
    let ca = start_ca(objects.path(), state.path(), &signer, "127.0.0.1:0".parse().unwrap()).await;
    let addr = ca.grpc;

    let (target, trust) = crate::support::target(addr, state.path());
    let token = ztunnel_token(&signer, "node-1");
    let view = MeshView::new(&ztunnel::xds::SUBSCRIBED, trust.clone());
    let client = XdsClient {
        target,
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
    assert_eq!(view.read(|s| s.workload_count()), 2);
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
    eventually("resynced after restart", || view.read(|s| s.workload_count() == 1)).await;
    assert_eq!(trust.current().roots().len(), 2, "the bundle persisted with the CA state");

    stop_tx.send(()).unwrap();
    task.await.unwrap();
    ca.stop().await;
}
