//! The trust bundle published to every namespace as ConfigMap `istio-ca-root-cert`, against a
//! recording mock API server: one server-side apply per namespace, again for a new namespace, and
//! for every namespace when the bundle changes (root rotation); nothing when nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use ca::objects::{Object, Store};
use k8s_openapi::api::core::v1::Namespace;
use serde_json::json;

use crate::recording_api::{Mock, Seen};

fn add_namespace(store: &Store, name: &str) {
    let ns = Namespace {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
        ..Default::default()
    };
    store.update(|o| o.insert(Object::Namespace(Arc::new(ns))));
}

async fn writes(mock: &Mock, n: usize) -> Vec<Seen> {
    proto::testing::eventually(&format!("{n} writes"), Duration::from_secs(10), || async {
        (mock.seen.lock().unwrap().len() >= n).then_some(())
    })
    .await;
    // Under test: nothing beyond what is expected arrives in a further 200 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut all = mock.take();
    all.sort_by(|a, b| a.uri.cmp(&b.uri));
    all
}

#[tokio::test]
async fn every_namespace_gets_the_trust_bundle_and_its_changes() {
    let mock = Mock::default();
    let client = mock.serve().await;
    let store = Store::new();
    add_namespace(&store, "shop");
    add_namespace(&store, "istio-system");
    store.expect_sources(1);
    store.source_synced();
    let (bundle_tx, bundle_rx) = tokio::sync::watch::channel(Arc::new(vec!["ROOT-1\n".to_owned()]));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ca::root_cert::publish(client, store.clone(), bundle_rx, async {
        let _ = stop_rx.await;
    }));

    let seen = writes(&mock, 2).await;
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(
        uris,
        [
            "/api/v1/namespaces/istio-system/configmaps/istio-ca-root-cert?&force=true&fieldManager=ambient-ca",
            "/api/v1/namespaces/shop/configmaps/istio-ca-root-cert?&force=true&fieldManager=ambient-ca",
        ]
    );
    assert!(seen.iter().all(|s| s.method == "PATCH" && s.content_type == "application/apply-patch+yaml"));
    assert_eq!(
        seen[1].body,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-ca-root-cert", "namespace": "shop", "labels": {"istio.io/config": "true"}},
            "data": {"root-cert.pem": "ROOT-1\n"}})
    );

    // A new namespace: only it.
    add_namespace(&store, "blog");
    let seen = writes(&mock, 1).await;
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].uri.starts_with("/api/v1/namespaces/blog/configmaps/istio-ca-root-cert"));

    // Root rotation: every namespace gets both roots.
    bundle_tx.send(Arc::new(vec!["ROOT-1\n".to_owned(), "ROOT-2\n".to_owned()])).unwrap();
    let seen = writes(&mock, 3).await;
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert!(seen.iter().all(|s| s.body["data"]["root-cert.pem"] == "ROOT-1\nROOT-2\n"));

    let _ = stop_tx.send(());
    task.await.unwrap();
}
