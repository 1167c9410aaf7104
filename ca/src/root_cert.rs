//! Publishes the trust bundle to every namespace as ConfigMap `istio-ca-root-cert` (key
//! `root-cert.pem`), as Istio does: how a pod (ztunnel, a waypoint) learns which roots to trust
//! before it can ask the CA anything. Only against a cluster; in the one-machine mesh the proxies
//! read `<state-dir>/root-cert.pem`.
//!
//! Rewritten (server-side apply, field manager `ambient-ca`) when a namespace appears or the
//! bundle changes (root rotation); a failed write is logged and retried every 30 s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::objects::Store;

/// The ConfigMap's name.
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
/// Its key.
pub const KEY: &str = "root-cert.pem";
/// The field manager it is applied as.
pub const FIELD_MANAGER: &str = "ambient-ca";

/// Runs until `stop` resolves.
pub async fn publish(
    client: kube::Client,
    store: Arc<Store>,
    mut bundle: watch::Receiver<Arc<Vec<String>>>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut changes = store.subscribe();
    // What each namespace holds now (as we wrote it).
    let mut published: HashMap<String, Arc<Vec<String>>> = HashMap::new();
    let mut retry = tokio::time::interval(Duration::from_secs(30));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    store.wait_synced().await;
    loop {
        let roots = bundle.borrow_and_update().clone();
        let namespaces: Vec<String> = store.snapshot().namespaces().filter_map(|n| n.metadata.name.clone()).collect();
        published.retain(|ns, _| namespaces.contains(ns));
        for ns in namespaces {
            if published.get(&ns).is_some_and(|p| *p == roots) {
                continue;
            }
            let config_map = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": CONFIG_MAP, "namespace": ns, "labels": {"istio.io/config": "true"}},
                "data": {KEY: roots.concat()},
            });
            let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
            match api.patch(CONFIG_MAP, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&config_map)).await {
                Ok(_) => {
                    info!(namespace = %ns, roots = roots.len(), "trust bundle published ({CONFIG_MAP})");
                    published.insert(ns, roots.clone());
                }
                Err(e) => warn!(namespace = %ns, error = %e, "publishing the trust bundle failed; retrying in 30 s"),
            }
        }
        tokio::select! {
            () = &mut stop => return,
            r = changes.changed() => if r.is_err() { return },
            r = bundle.changed() => if r.is_err() { return },
            _ = retry.tick() => {}
        }
    }
}
