//! The delta xDS server (Envoy's `AggregatedDiscoveryService/DeltaAggregatedResources`).
//!
//! Per client stream and per type URL the server tracks what the client subscribed to (wildcard
//! and/or names, where a name may be an alias such as `/10.0.0.5` for on-demand address lookups)
//! and which version of each resource it last sent. On every request and every state change it
//! sends only the difference: changed resources, and removals. ACKs and NACKs are matched to
//! responses by nonce; a NACK is logged and the rejected version is not resent until it changes.
//! A reconnecting client sends `initial_resource_versions` and gets only what differs from them.

pub mod resources;

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::Stream;
use proto::api::envoy::service::discovery::v3 as xds;
use proto::api::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, warn};

pub use resources::{Resources, ServedTypes, XdsResource};

use crate::auth::Authenticator;

/// The ADS service.
#[derive(Debug, Clone)]
pub struct XdsServer {
    resources: watch::Receiver<Arc<Resources>>,
    served: ServedTypes,
    clients: Arc<AtomicUsize>,
    auth: Arc<Authenticator>,
}

impl XdsServer {
    /// Serves the resources published on `resources` to callers `auth` accepts (a service-account
    /// token or a client certificate from the CA).
    pub fn new(resources: watch::Receiver<Arc<Resources>>, auth: Arc<Authenticator>) -> Self {
        XdsServer { resources, served: ServedTypes::All, clients: Arc::default(), auth }
    }

    /// Serves only `served` types: a subscription to another is ignored, as istiod ignores types
    /// it does not know (the resources published must be built for the same set).
    pub fn serving(mut self, served: ServedTypes) -> Self {
        self.served = served;
        self
    }

    /// Streams currently open.
    pub fn connected_clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// A handle that reports the number of open streams.
    pub fn client_counter(&self) -> Arc<AtomicUsize> {
        self.clients.clone()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<xds::DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<xds::DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<xds::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("state-of-the-world xDS is not served; use DeltaAggregatedResources"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<xds::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request
            .extensions()
            .get::<crate::grpc::PeerInfo>()
            .map(|p| p.addr)
            .or_else(|| request.remote_addr())
            .map_or_else(|| "unknown".into(), |a| a.to_string());
        let caller = match crate::grpc::authenticate(&self.auth, &request).await {
            Ok(c) => c,
            Err(e) => {
                warn!(%peer, reason = proto::error_chain(&e), "xDS stream refused: authentication failed");
                return Err(Status::unauthenticated("request authentication failed"));
            }
        };
        let caller = caller.identity.to_string();
        // Istio's ztunnel names its cluster in a header (for the log; nothing is decided by it).
        let cluster = request
            .metadata()
            .get(proto::control::CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection {
            resources: self.resources.clone(),
            served: self.served,
            types: HashMap::new(),
            nonce: 0,
            node: String::new(),
            caller: caller.clone(),
            cluster,
            out: tx,
        };
        let clients = self.clients.clone();
        let requests = request.into_inner();
        tokio::spawn(
            async move {
                clients.fetch_add(1, Ordering::Relaxed);
                conn.run(requests).await;
                clients.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(tracing::info_span!("xds", %peer, %caller)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one client holds of one type.
#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    /// Explicitly subscribed names (resource names or aliases).
    names: BTreeSet<String>,
    /// Name → content hash of the version the client holds.
    sent: HashMap<Arc<str>, u64>,
    /// Subscribed names the client was told do not exist.
    absent: BTreeSet<String>,
    /// The resources generation this type was last reconciled against (0: never).
    generation: u64,
    /// The subscription changed since: the next push compares everything.
    full: bool,
}

impl TypeState {
    fn wants(&self, r: &XdsResource) -> bool {
        self.wildcard || self.names.contains(&*r.name) || r.aliases.iter().any(|a| self.names.contains(a))
    }
}

/// Whether `caller` may be sent `r`: anyone, unless the resource names its readers (a gateway's
/// TLS credential goes to that gateway's service accounts only). For everyone else it does not
/// exist: never sent, and taken back if the caller lost access.
fn readable(r: &XdsResource, caller: &str) -> bool {
    r.readers.as_ref().is_none_or(|readers| readers.iter().any(|id| id == caller))
}

/// A hash no content produces in practice: for versions a client reports that we cannot read.
const UNKNOWN_VERSION: u64 = u64::MAX;

struct Connection {
    resources: watch::Receiver<Arc<Resources>>,
    served: ServedTypes,
    types: HashMap<String, TypeState>,
    nonce: u64,
    node: String,
    /// The caller's identity, from its credentials.
    caller: String,
    /// The `clusterid` the client sent, `-` for none.
    cluster: String,
    out: mpsc::Sender<Result<xds::DeltaDiscoveryResponse, Status>>,
}

impl Connection {
    async fn run(mut self, mut requests: Streaming<xds::DeltaDiscoveryRequest>) {
        // Answer nothing before the first state exists; requests wait in the stream meanwhile.
        if self.resources.wait_for(|r| r.generation > 0).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                message = requests.message() => match message {
                    Ok(Some(request)) => {
                        if self.handle(request).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %self.node, %status, "xDS stream ended with an error");
                        break;
                    }
                },
                changed = self.resources.changed() => {
                    if changed.is_err() || self.push_all().await.is_err() {
                        break;
                    }
                }
            }
        }
        info!(node = %self.node, "xDS client disconnected");
    }

    async fn handle(&mut self, request: xds::DeltaDiscoveryRequest) -> Result<(), ()> {
        if let (true, Some(node)) = (self.node.is_empty(), &request.node) {
            self.node = node.id.clone();
            info!(node = %self.node, cluster = %self.cluster, "xDS client connected");
        }
        let type_url = request.type_url.clone();
        if !self.served.urls().contains(&type_url.as_str()) {
            warn!(node = %self.node, %type_url, "subscription to a type this server does not serve; ignored");
            return Ok(());
        }
        if !request.response_nonce.is_empty() {
            match &request.error_detail {
                Some(err) => warn!(
                    node = %self.node, %type_url, nonce = %request.response_nonce, code = err.code, message = %err.message,
                    "client rejected (NACK) an update"
                ),
                None => debug!(node = %self.node, %type_url, nonce = %request.response_nonce, "ACK"),
            }
        }

        let first = !self.types.contains_key(&type_url);
        let state = self.types.entry(type_url.clone()).or_default();
        if first {
            // A first request without names is a wildcard subscription.
            state.wildcard = request.resource_names_subscribe.is_empty();
            // Reconnect: start from what the client already holds. For a subscription by name,
            // what it holds stays subscribed (as Istio's ztunnel expects of istiod).
            state.sent = request
                .initial_resource_versions
                .iter()
                .map(|(n, v)| (Arc::from(n.as_str()), u64::from_str_radix(v, 16).unwrap_or(UNKNOWN_VERSION)))
                .collect();
            if !state.wildcard {
                state.names.extend(request.initial_resource_versions.keys().cloned());
            }
        }
        for name in &request.resource_names_subscribe {
            if name == "*" {
                state.wildcard = true;
            } else {
                state.names.insert(name.clone());
                // The protocol requires (re)sending every resource named in a subscribe.
                state.absent.remove(name);
                state.sent.remove(name.as_str());
                if let Some(r) = self.resources.borrow().of_type(&type_url).and_then(|r| r.resolve(name)) {
                    state.sent.remove(&r.name);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else {
                state.names.remove(name);
                state.absent.remove(name);
            }
        }
        let changed_subscription =
            first || !request.resource_names_subscribe.is_empty() || !request.resource_names_unsubscribe.is_empty();
        if changed_subscription {
            state.full = true;
            // The first response of a type is always sent, even empty: it tells the client the
            // initial state is complete.
            self.push(&type_url, first).await?;
        }
        Ok(())
    }

    async fn push_all(&mut self) -> Result<(), ()> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for t in types {
            self.push(&t, false).await?;
        }
        Ok(())
    }

    /// Sends what this client lacks of `type_url`; with `always`, sends even when nothing differs.
    async fn push(&mut self, type_url: &str, always: bool) -> Result<(), ()> {
        let snapshot = self.resources.borrow_and_update().clone();
        let Some(all) = snapshot.of_type(type_url) else { return Ok(()) };
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        let caller = self.caller.as_str();
        let resolve = |name: &str| all.resolve(name).filter(|r| readable(r, caller));

        let mut send: Vec<&Arc<XdsResource>> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let deltas = if state.full || state.generation == 0 { None } else { snapshot.deltas_since(state.generation) };
        match deltas {
            // Up to date until recently: look only at what changed since.
            Some(deltas) => {
                let mut changed = BTreeSet::new();
                let mut gone = BTreeSet::new();
                for d in deltas {
                    if let Some(t) = d.types.get(type_url) {
                        changed.extend(t.changed.iter());
                        gone.extend(t.removed.iter());
                    }
                }
                for name in changed {
                    match all.by_name.get(name).filter(|r| state.wants(r)) {
                        Some(r) if readable(r, caller) && state.sent.get(name) != Some(&r.hash) => send.push(r),
                        // No longer readable by this caller: taken back.
                        Some(r) if !readable(r, caller) && state.sent.remove(name).is_some() => {
                            removed.push(name.to_string());
                        }
                        _ => {}
                    }
                }
                for name in gone {
                    if !all.by_name.contains_key(name) && state.sent.remove(name).is_some() {
                        removed.push(name.to_string());
                    }
                }
            }
            // First push, new subscriptions, or too far behind: compare everything.
            None => {
                let mut wanted: BTreeSet<&str> = BTreeSet::new();
                if state.wildcard {
                    for r in all.by_name.values().filter(|r| readable(r, caller)) {
                        if state.sent.get(&r.name) != Some(&r.hash) {
                            send.push(r);
                        }
                    }
                }
                for name in &state.names {
                    match resolve(name) {
                        Some(r) => {
                            wanted.insert(&r.name);
                            if !state.wildcard && state.sent.get(&r.name) != Some(&r.hash) {
                                send.push(r);
                            }
                        }
                        // Tell an on-demand subscriber once that the name does not exist.
                        None => {
                            if state.absent.insert(name.clone()) {
                                removed.push(name.clone());
                            }
                        }
                    }
                }
                let stale: Vec<Arc<str>> = state
                    .sent
                    .keys()
                    .filter(|n| match all.by_name.get(*n) {
                        None => true,
                        Some(r) if !readable(r, caller) => true,
                        Some(_) => !state.wildcard && !wanted.contains(&***n),
                    })
                    .cloned()
                    .collect();
                for n in stale {
                    state.sent.remove(&n);
                    removed.push(n.to_string());
                }
                send.sort_by(|a, b| a.name.cmp(&b.name));
                send.dedup_by(|a, b| a.name == b.name);
            }
        }
        state.generation = snapshot.generation;
        state.full = false;
        for r in &send {
            state.sent.insert(r.name.clone(), r.hash);
            for a in &r.aliases {
                state.absent.remove(a);
            }
        }
        let resources: Vec<xds::Resource> = send
            .iter()
            .map(|r| xds::Resource {
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                name: r.name.to_string(),
                aliases: r.aliases.clone(),
                ttl: None,
                cache_control: None,
            })
            .collect();
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        removed.sort();
        self.nonce += 1;
        let response = xds::DeltaDiscoveryResponse {
            system_version_info: snapshot.generation.to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        };
        debug!(
            node = %self.node, %type_url, nonce = self.nonce, resources = response.resources.len(),
            removed = response.removed_resources.len(), "push"
        );
        self.out.send(Ok(response)).await.map_err(|_| ())
    }
}
