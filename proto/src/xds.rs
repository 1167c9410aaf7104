//! The delta ADS client loop shared by the proxies.
//!
//! One `DeltaAggregatedResources` stream subscribes (wildcard) to a fixed list of types. Each
//! response goes to an [`XdsHandler`], which applies what decodes and reports what does not; the
//! response is then ACKed, or NACKed with those reasons (the rest of it still applies). A broken
//! stream reconnects with exponential backoff and jitter; the new stream sends the versions the
//! handler holds, so the control plane sends only what changed meanwhile.
//!
//! [`MeshView`] is the handler both proxies use: it converts workloads and services
//! (`istio.workload.Address`), L4 policies, waypoint routes and L7 policies (each only if
//! subscribed) into the typed, indexed [`MeshState`]; what does not convert is NACKed by name. A
//! new trust bundle is swapped into the shared bundle at once, so the next handshake uses it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::api::ambient::ca::v1::TrustBundle as TrustBundleMsg;
use crate::api::ambient::waypoint::v1::{
    DestinationPolicy, GatewayCredential, IngressGateway, L7Policy, MeshSettings, RequestAuthn, ServiceRoutes,
    Telemetry,
};
use crate::api::envoy::service::discovery::v3::Resource;
use crate::api::istio::security::Authorization;
use crate::api::istio::workload::{Address, address};
use crate::api::type_url::{
    ADDRESS, AUTHORIZATION, DESTINATION_POLICY, GATEWAY_CREDENTIAL, INGRESS_GATEWAY, L7_POLICY, MESH_SETTINGS,
    REQUEST_AUTHN, SERVICE_ROUTES, TELEMETRY, TRUST_BUNDLE,
};
use crate::state::{MeshState, Service, Workload};
use crate::tls::{SharedTrustBundle, TrustBundle};

use crate::api::envoy::config::core::v3::Node;
use crate::api::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::api::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use crate::api::google::rpc::Status as RpcStatus;
use crate::certs::TokenSource;
use crate::control::ControlPlaneTarget;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The control plane's address or TLS settings could not make a channel.
    #[error("cannot reach the control plane")]
    Channel(#[source] crate::control::ControlError),
    /// The service-account token could not be read.
    #[error("cannot read the token")]
    Token(#[source] crate::certs::CertError),
    /// The stream failed (or could not open).
    #[error("the stream failed")]
    Status(#[source] tonic::Status),
    /// The stream's request side closed under us.
    #[error("the request stream closed")]
    Closed,
}

/// Why a resource was not applied (NACKed with this, naming the resource).
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// The resource has no body.
    #[error("no body")]
    NoBody,
    /// The body is not the message its type says.
    #[error("does not decode")]
    Decode(#[source] prost::DecodeError),
    /// The message decodes but cannot be taken as sent.
    #[error(transparent)]
    Model(#[from] crate::state::ModelError),
    /// The resource's name is not the one its message implies.
    #[error("the resource is named {name:?}, its message says {says:?}")]
    Name {
        /// The resource's name.
        name: String,
        /// What the message implies (a workload's uid, a service's `namespace/hostname`).
        says: String,
    },
    /// An address that is neither a workload nor a service.
    #[error("address with neither workload nor service")]
    EmptyAddress,
    /// A trust bundle whose roots do not parse.
    #[error("unusable trust bundle")]
    Bundle(#[source] crate::tls::TlsError),
    /// A type this handler did not subscribe to.
    #[error("unexpected type {0}")]
    UnexpectedType(String),
}

/// What a proxy does with the responses of its stream.
pub trait XdsHandler: Send + Sync {
    /// Applies one response; returns the resources that could not be applied, each with why.
    fn apply(&self, response: &DeltaDiscoveryResponse) -> Vec<String>;
    /// The versions held for `type_url` (name → version), sent when a stream opens.
    fn versions_of(&self, type_url: &str) -> HashMap<String, String>;
    /// Called once every subscribed type has been received at least once on a stream.
    fn synced(&self);
}

/// Keeps an [`XdsHandler`] current.
#[derive(Debug, Clone)]
pub struct AdsClient {
    /// The control plane.
    pub target: ControlPlaneTarget,
    /// The proxy's service-account token.
    pub token: TokenSource,
    /// Node id sent to the control plane (`ztunnel~<node>`, `waypoint~<namespace>~<name>`).
    pub node_id: String,
    /// Types subscribed to, in order.
    pub types: Vec<&'static str>,
    /// Those among `types` that a control plane may never send (this project's own types, which
    /// istiod does not serve): the view is synced without them.
    pub optional: Vec<&'static str>,
    /// First reconnect delay.
    pub retry_min: Duration,
    /// Longest reconnect delay.
    pub retry_max: Duration,
}

impl AdsClient {
    /// Runs until `stop` resolves: connects, applies, reconnects.
    pub async fn run(self, handler: Arc<dyn XdsHandler>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut retry = self.retry_min;
        loop {
            let attempt = self.stream(handler.as_ref());
            tokio::select! {
                () = &mut stop => return,
                result = attempt => match result {
                    Ok(()) => { warn!("xDS stream closed by the control plane; reconnecting"); retry = self.retry_min; }
                    Err(e) => warn!(error = %crate::error_chain(&e), "xDS stream failed; reconnecting in {retry:?}"),
                },
            }
            let jittered = retry.mul_f64(rand::rng().random_range(0.8..1.2));
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(jittered) => {}
            }
            retry = (retry * 2).min(self.retry_max);
        }
    }

    /// One stream, until it ends.
    async fn stream(&self, handler: &dyn XdsHandler) -> Result<(), StreamError> {
        let channel = self.target.channel().map_err(StreamError::Channel)?;
        let token = self.token.read().map_err(StreamError::Token)?;
        let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            crate::control::with_token_and_cluster(token, self.target.cluster_id.as_deref()),
        )
        .max_decoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel(16);
        for type_url in &self.types {
            tx.send(DeltaDiscoveryRequest {
                node: Some(Node { id: self.node_id.clone(), ..Default::default() }),
                type_url: (*type_url).into(),
                initial_resource_versions: handler.versions_of(type_url),
                ..Default::default()
            })
            .await
            .map_err(|_| StreamError::Closed)?;
        }
        let mut responses =
            ads.delta_aggregated_resources(ReceiverStream::new(rx)).await.map_err(StreamError::Status)?.into_inner();
        info!(node = %self.node_id, "xDS stream open");
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(r) = responses.message().await.map_err(StreamError::Status)? {
            let errors = handler.apply(&r);
            let error_detail = (!errors.is_empty()).then(|| {
                warn!(type_url = %r.type_url, errors = ?errors, "NACK: resources that could not be applied");
                RpcStatus { code: tonic::Code::InvalidArgument as i32, message: errors.join("; "), details: vec![] }
            });
            tx.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail,
                ..Default::default()
            })
            .await
            .map_err(|_| StreamError::Closed)?;
            if let Some(t) = self.types.iter().copied().find(|t| *t == r.type_url)
                && !seen.contains(&t)
            {
                seen.push(t);
                let required = || self.types.iter().filter(|t| !self.optional.contains(t));
                if !self.optional.contains(&t) && required().all(|t| seen.contains(t)) {
                    handler.synced();
                    info!(types = ?self.types, received = ?seen, "xDS synced: every required type received");
                }
            }
        }
        Ok(())
    }
}

/// The shared view: state, trust bundle, and change notifications.
#[derive(Debug)]
pub struct MeshView {
    types: Vec<&'static str>,
    state: RwLock<MeshState>,
    /// Version held per (type, name), sent back on reconnect.
    versions: RwLock<HashMap<(&'static str, String), String>>,
    /// Roots to verify peers with; replaced when the control plane pushes a new bundle.
    pub trust: Arc<SharedTrustBundle>,
    changes: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl MeshView {
    /// An empty view of the `types` subscribed to, over `trust` (the bootstrap roots until the
    /// control plane sends its own).
    pub fn new(types: &[&'static str], trust: Arc<SharedTrustBundle>) -> Arc<Self> {
        Arc::new(MeshView {
            types: types.to_vec(),
            state: RwLock::default(),
            versions: RwLock::default(),
            trust,
            changes: watch::channel(0).0,
            synced: watch::channel(false).0,
        })
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&MeshState) -> T) -> T {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Bumped after every applied response.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many responses have been applied (the value [`changes`](Self::changes) carries). It is
    /// bumped after the state is written: a decision made with the state read after taking this
    /// number is current as long as the number has not moved.
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// True once every subscribed type has been received at least once.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Applies one response; returns the names that did not decode, with why.
    pub fn apply(&self, r: &DeltaDiscoveryResponse) -> Vec<String> {
        let Some(type_url) = self.types.iter().copied().find(|t| *t == r.type_url) else {
            return vec![format!("unexpected type {}", r.type_url)];
        };
        let mut errors = Vec::new();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut versions = self.versions.write().unwrap_or_else(|p| p.into_inner());
        for res in &r.resources {
            match apply_resource(&mut state, &self.trust, type_url, res) {
                Ok(()) => {
                    versions.insert((type_url, res.name.clone()), res.version.clone());
                }
                Err(e) => errors.push(format!("{}: {}", res.name, crate::error_chain(&e))),
            }
        }
        for name in &r.removed_resources {
            match type_url {
                ADDRESS => state.remove_address(name),
                AUTHORIZATION => state.policies.remove(name),
                SERVICE_ROUTES => {
                    state.routes.remove(name);
                }
                L7_POLICY => state.l7_policies.remove(name),
                REQUEST_AUTHN => state.request_authns.remove(name),
                DESTINATION_POLICY => {
                    state.destination_policies.remove(name);
                }
                INGRESS_GATEWAY => {
                    state.ingress_gateways.remove(name);
                }
                GATEWAY_CREDENTIAL => {
                    state.gateway_credentials.remove(name);
                }
                MESH_SETTINGS => state.settings = MeshSettings::default(),
                TELEMETRY => {
                    state.telemetry.remove(name);
                }
                _ => {}
            }
            versions.remove(&(type_url, name.clone()));
        }
        drop((state, versions));
        self.changes.send_modify(|n| *n += 1);
        errors
    }

    /// The versions held for `type_url`.
    pub fn versions_of(&self, type_url: &str) -> HashMap<String, String> {
        let versions = self.versions.read().unwrap_or_else(|p| p.into_inner());
        versions.iter().filter(|((t, _), _)| *t == type_url).map(|((_, n), v)| (n.clone(), v.clone())).collect()
    }
}

fn apply_resource(
    state: &mut MeshState,
    trust: &SharedTrustBundle,
    type_url: &str,
    res: &Resource,
) -> Result<(), ResourceError> {
    let body = res.resource.as_ref().ok_or(ResourceError::NoBody)?;
    match type_url {
        ADDRESS => match Address::decode(body.value.as_slice()).map_err(ResourceError::Decode)?.r#type {
            Some(address::Type::Workload(w)) => {
                let addresses = crate::state::model::readable_addresses(&w);
                let w = match Workload::from_pb(w) {
                    Ok(w) => w,
                    Err(e) => {
                        // Refused, and remembered as refused: traffic to its addresses is refused
                        // too rather than passed through as if it were outside the mesh.
                        state.refuse_workload(&res.name, addresses, crate::error_chain(&e));
                        return Err(e.into());
                    }
                };
                if w.uid != res.name {
                    return Err(ResourceError::Name { name: res.name.clone(), says: w.uid });
                }
                state.insert_workload(w);
            }
            Some(address::Type::Service(s)) => {
                let s = Service::from_pb(s)?;
                if s.key != res.name {
                    return Err(ResourceError::Name { name: res.name.clone(), says: s.key });
                }
                state.insert_service(s);
            }
            None => return Err(ResourceError::EmptyAddress),
        },
        AUTHORIZATION => {
            let p = Authorization::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.policies.insert(res.name.clone(), p);
        }
        SERVICE_ROUTES => {
            let r = ServiceRoutes::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.routes.insert(res.name.clone(), Arc::new(r));
        }
        L7_POLICY => {
            let p = L7Policy::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.l7_policies.insert(res.name.clone(), p);
        }
        REQUEST_AUTHN => {
            let p = RequestAuthn::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.request_authns.insert(res.name.clone(), p);
        }
        DESTINATION_POLICY => {
            let p = DestinationPolicy::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.destination_policies.insert(res.name.clone(), Arc::new(p));
        }
        INGRESS_GATEWAY => {
            let g = IngressGateway::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.ingress_gateways.insert(res.name.clone(), Arc::new(g));
        }
        GATEWAY_CREDENTIAL => {
            let c = GatewayCredential::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.gateway_credentials.insert(res.name.clone(), Arc::new(c));
        }
        MESH_SETTINGS => {
            let settings = MeshSettings::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            if settings.outbound_traffic_policy() != state.settings.outbound_traffic_policy() {
                info!(
                    outbound_traffic_policy = settings.outbound_traffic_policy().as_str_name(),
                    "mesh settings updated"
                );
            }
            state.settings = settings;
        }
        TELEMETRY => {
            let t = Telemetry::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            state.telemetry.insert(res.name.clone(), Arc::new(t));
        }
        TRUST_BUNDLE => {
            let b = TrustBundleMsg::decode(body.value.as_slice()).map_err(ResourceError::Decode)?;
            let bundle = TrustBundle::from_pem(b.roots_pem.concat().as_bytes()).map_err(ResourceError::Bundle)?;
            info!(roots = bundle.roots().len(), "trust bundle updated");
            trust.replace(bundle);
        }
        _ => return Err(ResourceError::UnexpectedType(type_url.to_owned())),
    }
    Ok(())
}

impl XdsHandler for MeshView {
    fn apply(&self, response: &DeltaDiscoveryResponse) -> Vec<String> {
        MeshView::apply(self, response)
    }

    fn versions_of(&self, type_url: &str) -> HashMap<String, String> {
        MeshView::versions_of(self, type_url)
    }

    fn synced(&self) {
        self.synced.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::IpAddr;

    use super::*;
    use crate::testing::xds_resource as resource;

    #[test]
    fn a_bad_resource_is_reported_and_the_rest_applies() {
        let ca = crate::testing::TestCa::new();
        let view = MeshView::new(&[ADDRESS, AUTHORIZATION, TRUST_BUNDLE], ca.shared_bundle());
        let workload = crate::api::istio::workload::Workload {
            uid: "Kubernetes//Pod/demo/a".into(),
            namespace: "demo".into(),
            addresses: vec![vec![10, 0, 0, 9]],
            ..Default::default()
        };
        let good = Address { r#type: Some(address::Type::Workload(workload)) }.encode_to_vec();
        let response = DeltaDiscoveryResponse {
            type_url: ADDRESS.into(),
            resources: vec![
                resource("Kubernetes//Pod/demo/a", ADDRESS, good),
                resource("garbage", ADDRESS, vec![0xff, 0xff, 0xff]),
            ],
            ..Default::default()
        };
        let errors = view.apply(&response);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("garbage: "), "{errors:?}");
        assert!(view.read(|s| s.workload_by_ip("10.0.0.9".parse().unwrap()).is_some()));

        // A workload that does not convert is refused, and its address remembered as refused
        // until the control plane replaces or removes it.
        let unusable = crate::api::istio::workload::Workload {
            uid: "Kubernetes//Pod/demo/b".into(),
            namespace: "demo/../x".into(),
            addresses: vec![vec![10, 0, 0, 10]],
            ..Default::default()
        };
        let body = Address { r#type: Some(address::Type::Workload(unusable)) }.encode_to_vec();
        let errors = view.apply(&DeltaDiscoveryResponse {
            type_url: ADDRESS.into(),
            resources: vec![resource("Kubernetes//Pod/demo/b", ADDRESS, body)],
            ..Default::default()
        });
        assert!(errors[0].starts_with("Kubernetes//Pod/demo/b: no valid identity"), "{errors:?}");
        let b: IpAddr = "10.0.0.10".parse().unwrap();
        assert_eq!(
            view.read(|s| s.refused_at(b).map(|(n, _)| n.to_owned())).as_deref(),
            Some("Kubernetes//Pod/demo/b")
        );
        assert!(view.read(|s| s.workload_by_ip(b).is_none()));
        view.apply(&DeltaDiscoveryResponse {
            type_url: ADDRESS.into(),
            removed_resources: vec!["Kubernetes//Pod/demo/b".into()],
            ..Default::default()
        });
        assert!(view.read(|s| s.refused_at(b).is_none()));

        // Removal by name clears the IP index too.
        let removal = DeltaDiscoveryResponse {
            type_url: ADDRESS.into(),
            removed_resources: vec!["Kubernetes//Pod/demo/a".into()],
            ..Default::default()
        };
        assert!(view.apply(&removal).is_empty());
        assert!(view.read(|s| s.workload_by_ip("10.0.0.9".parse().unwrap()).is_none()));
        // A bundle that is not PEM is refused and the old bundle stays.
        let bad_bundle = TrustBundleMsg { trust_domain: "cluster.local".into(), roots_pem: vec!["junk".into()] };
        let errors = view.apply(&DeltaDiscoveryResponse {
            type_url: TRUST_BUNDLE.into(),
            resources: vec![resource("trust-bundle", TRUST_BUNDLE, bad_bundle.encode_to_vec())],
            ..Default::default()
        });
        assert_eq!(errors.len(), 1);
        assert_eq!(view.trust.current().roots().len(), 1);
    }
}
