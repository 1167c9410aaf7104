//! ztunnel's view of the mesh, kept current over delta xDS.
//!
//! One ADS stream ([`proto::xds::AdsClient`]) subscribes (wildcard) to workloads and services
//! (`istio.workload.Address`), L4 policies (`istio.security.Authorization`), the trust bundle and
//! the mesh settings (`ambient.waypoint.v1.MeshSettings`: the outbound traffic policy).
//! Each response is applied to [`MeshView`] and ACKed; a resource that does not decode is NACKed
//! with the reason and the rest of the response still applies. A new trust bundle is swapped into
//! the shared bundle at once: the next handshake uses it.

use std::sync::Arc;
use std::time::Duration;

use proto::api::type_url::{ADDRESS, AUTHORIZATION, MESH_SETTINGS, TRUST_BUNDLE};
use proto::certs::TokenSource;
use proto::control::ControlPlaneTarget;
pub use proto::state::MeshState;
use proto::xds::AdsClient;
pub use proto::xds::MeshView;

/// The types subscribed to, in order. The mesh settings come first: the control plane answers
/// subscriptions in order, so a `REGISTRY_ONLY` policy is in place before the workloads and
/// policies that make the proxy ready.
pub const SUBSCRIBED: [&str; 4] = [MESH_SETTINGS, ADDRESS, AUTHORIZATION, TRUST_BUNDLE];

/// Keeps a [`MeshView`] current (the shared [`AdsClient`] subscribed to ztunnel's types).
#[derive(Debug, Clone)]
pub struct XdsClient {
    /// The control plane.
    pub target: ControlPlaneTarget,
    /// ztunnel's token.
    pub token: TokenSource,
    /// Node id sent to the control plane (`ztunnel~<node>`).
    pub node_id: String,
    /// First reconnect delay.
    pub retry_min: Duration,
    /// Longest reconnect delay.
    pub retry_max: Duration,
}

impl XdsClient {
    /// Runs until `stop` resolves: connects, applies, reconnects.
    pub async fn run(self, view: Arc<MeshView>, stop: impl std::future::Future<Output = ()>) {
        let client = AdsClient {
            target: self.target,
            token: self.token,
            node_id: self.node_id,
            types: SUBSCRIBED.to_vec(),
            // istiod serves only Istio's two types: then the trust bundle comes with the
            // certificate answers (proto::tls::SharedTrustBundle), and the settings keep Istio's
            // defaults (ALLOW_ANY, as Istio's ztunnel behaves).
            optional: vec![MESH_SETTINGS, TRUST_BUNDLE],
            retry_min: self.retry_min,
            retry_max: self.retry_max,
        };
        client.run(view, stop).await;
    }
}
