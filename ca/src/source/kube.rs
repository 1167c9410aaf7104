//! The Kubernetes API server as the source of objects.
//!
//! One `kube` watcher per kind (Namespaces, Nodes, Pods, Services, EndpointSlices, TLS Secrets
//! (`type=kubernetes.io/tls` only, for gateways' `credentialName`), Gateway API Gateways,
//! HTTPRoutes, GRPCRoutes, AuthorizationPolicies, PeerAuthentications, RequestAuthentications, Istio
//! Gateways, VirtualServices, DestinationRules, ServiceEntries, Telemetries, the root namespace's
//! `istio` ConfigMap), across all namespaces. A watcher lists, then watches; when its watch breaks it backs off, reconnects and relists, and the relist replaces
//! everything of that kind in the store (objects deleted meanwhile disappear). Invalid objects are
//! logged and keep their previous valid version.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::k8s::{
    AuthorizationPolicy, ConfigMap, DestinationRule, EndpointSlice, GRPCRoute, Gateway, HTTPRoute, IstioGateway,
    Namespace, Node, PeerAuthentication, Pod, RequestAuthentication, Secret, Service, ServiceEntry, Telemetry,
    VirtualService,
};
use crate::objects::{ConfigError, Kind, Object, ObjectKey, PodRules, Store, validate};

/// The `source` of errors this source reports to the admin API.
pub const SOURCE_NAME: &str = "kubernetes";

/// Invalid objects currently known, by key, for the admin API.
#[derive(Debug, Default)]
struct Problems(Mutex<BTreeMap<ObjectKey, String>>);

impl Problems {
    /// Drops the problems of `kind` whose key fails `keep`.
    fn retain(&self, store: &Store, kind: Kind, keep: impl Fn(&ObjectKey) -> bool) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|k, _| k.kind != kind || keep(k));
        if all.len() != before {
            store.set_errors(SOURCE_NAME, Self::errors(&all));
        }
    }

    fn errors(all: &BTreeMap<ObjectKey, String>) -> Vec<ConfigError> {
        all.iter().map(|(k, m)| ConfigError { source: format!("{SOURCE_NAME}: {k}"), message: m.clone() }).collect()
    }

    fn set(&self, store: &Store, key: ObjectKey, message: Option<String>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match message {
            Some(m) => all.insert(key, m.clone()).as_ref() != Some(&m),
            None => all.remove(&key).is_some(),
        };
        if changed {
            store.set_errors(SOURCE_NAME, Self::errors(&all));
        }
    }
}

/// Watches every kind until `stop` resolves; ConfigMaps only the mesh configuration's
/// (`istio` in `root_namespace`).
pub async fn run(client: Client, store: Arc<Store>, root_namespace: &str, stop: impl std::future::Future<Output = ()>) {
    let problems = Arc::new(Problems::default());
    let watchers: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> = vec![
        Box::pin(watch::<Namespace>(Api::all(client.clone()), Kind::Namespace, Object::Namespace, &store, &problems)),
        Box::pin(watch::<Node>(Api::all(client.clone()), Kind::Node, Object::Node, &store, &problems)),
        Box::pin(watch::<Pod>(Api::all(client.clone()), Kind::Pod, Object::Pod, &store, &problems)),
        Box::pin(watch::<Service>(Api::all(client.clone()), Kind::Service, Object::Service, &store, &problems)),
        Box::pin(watch::<EndpointSlice>(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            Object::EndpointSlice,
            &store,
            &problems,
        )),
        // TLS Secrets only (gateway credentials): other Secrets are never read.
        Box::pin(watch_with::<Secret>(
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("type={}", crate::k8s::TLS_SECRET_TYPE)),
            (Kind::Secret, Object::Secret),
            &store,
            &problems,
        )),
        Box::pin(watch::<Gateway>(Api::all(client.clone()), Kind::Gateway, Object::Gateway, &store, &problems)),
        Box::pin(watch::<HTTPRoute>(Api::all(client.clone()), Kind::HTTPRoute, Object::HTTPRoute, &store, &problems)),
        Box::pin(watch::<GRPCRoute>(Api::all(client.clone()), Kind::GRPCRoute, Object::GRPCRoute, &store, &problems)),
        Box::pin(watch::<AuthorizationPolicy>(
            Api::all(client.clone()),
            Kind::AuthorizationPolicy,
            Object::AuthorizationPolicy,
            &store,
            &problems,
        )),
        Box::pin(watch::<IstioGateway>(
            Api::all(client.clone()),
            Kind::IstioGateway,
            Object::IstioGateway,
            &store,
            &problems,
        )),
        Box::pin(watch::<VirtualService>(
            Api::all(client.clone()),
            Kind::VirtualService,
            Object::VirtualService,
            &store,
            &problems,
        )),
        Box::pin(watch::<DestinationRule>(
            Api::all(client.clone()),
            Kind::DestinationRule,
            Object::DestinationRule,
            &store,
            &problems,
        )),
        Box::pin(watch::<PeerAuthentication>(
            Api::all(client.clone()),
            Kind::PeerAuthentication,
            Object::PeerAuthentication,
            &store,
            &problems,
        )),
        Box::pin(watch::<ServiceEntry>(
            Api::all(client.clone()),
            Kind::ServiceEntry,
            Object::ServiceEntry,
            &store,
            &problems,
        )),
        // The mesh configuration only: no other ConfigMap is read.
        Box::pin(watch_with::<ConfigMap>(
            Api::namespaced(client.clone(), root_namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", crate::k8s::MESH_CONFIG_MAP.0)),
            (Kind::ConfigMap, Object::ConfigMap),
            &store,
            &problems,
        )),
        Box::pin(watch::<Telemetry>(Api::all(client.clone()), Kind::Telemetry, Object::Telemetry, &store, &problems)),
        Box::pin(watch::<RequestAuthentication>(
            Api::all(client),
            Kind::RequestAuthentication,
            Object::RequestAuthentication,
            &store,
            &problems,
        )),
    ];
    // The store is synced when every watcher has listed (a count short of them would let the mesh
    // start without a kind, e.g. its RequestAuthentications).
    store.expect_sources(watchers.len());
    let watchers = futures_util::future::join_all(watchers);
    tokio::select! {
        () = stop => {}
        _ = watchers => {}
    }
}

/// Checks an object from the API; invalid ones are reported and not applied.
fn admit(object: Object, store: &Store, problems: &Problems) -> Option<Object> {
    let key = object.key();
    match validate(&object, PodRules::Cluster) {
        Ok(()) => {
            problems.set(store, key, None);
            Some(object)
        }
        Err(e) => {
            warn!(object = %key, error = %e, "invalid object from the API server; keeping its previous version");
            problems.set(store, key, Some(e.to_string()));
            None
        }
    }
}

async fn watch<K>(api: Api<K>, kind: Kind, wrap: fn(Arc<K>) -> Object, store: &Store, problems: &Problems)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    watch_with(api, watcher::Config::default(), (kind, wrap), store, problems).await;
}

async fn watch_with<K>(
    api: Api<K>,
    config: watcher::Config,
    (kind, wrap): (Kind, fn(Arc<K>) -> Object),
    store: &Store,
    problems: &Problems,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    // During a relist: the valid objects, and the keys of listed objects that were refused.
    let mut relist: Option<(Vec<Object>, Vec<ObjectKey>)> = None;
    let mut synced = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist = Some(Default::default()),
            Ok(Event::InitApply(o)) => {
                let object = wrap(Arc::new(o));
                let key = object.key();
                let (valid, refused) = relist.get_or_insert_with(Default::default);
                match admit(object, store, problems) {
                    Some(object) => valid.push(object),
                    None => refused.push(key),
                }
            }
            Ok(Event::InitDone) => {
                let (valid, refused) = relist.take().unwrap_or_default();
                let count = valid.len();
                // What the server no longer lists is gone, valid or not.
                problems.retain(store, kind, |k| refused.contains(k));
                store.update(|o| {
                    // A listed but invalid object keeps its previous valid version.
                    let kept: Vec<Object> = refused.iter().filter_map(|k| o.get(k).cloned()).collect();
                    o.replace_kind(kind, valid.into_iter().chain(kept));
                });
                info!(%kind, objects = count, refused = refused.len(), "listed");
                if !synced {
                    synced = true;
                    store.source_synced();
                }
            }
            Ok(Event::Apply(o)) => {
                if let Some(object) = admit(wrap(Arc::new(o)), store, problems) {
                    store.update(|objects| objects.insert(object));
                }
            }
            Ok(Event::Delete(o)) => {
                let key = wrap(Arc::new(o)).key();
                problems.set(store, key.clone(), None);
                store.update(|objects| {
                    objects.remove(&key);
                });
            }
            Err(e) => {
                warn!(%kind, error = %e, "watch failed; retrying with backoff");
                if !synced {
                    // A kind the cluster does not have (CRD not installed) must not hold the
                    // whole mesh back: serve without it until a relist succeeds.
                    synced = true;
                    store.source_synced();
                }
            }
        }
    }
}
