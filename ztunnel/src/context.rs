//! What every connection handler shares: the mesh state, the pods' certificates, metrics, the
//! live connections, the HBONE settings and the threads traffic runs on.

use std::sync::Arc;

use proto::certs::CertManager;
use proto::hbone::pool::PoolConfig;
use proto::hbone::server::ServerConfig;

use crate::telemetry::Metrics;
use crate::tracker::Tracker;
use crate::xds::MeshView;

/// What every connection handler shares.
#[derive(Debug)]
pub struct Context {
    /// The mesh as the control plane describes it (and the trust bundle).
    pub view: Arc<MeshView>,
    /// Pod certificates.
    pub certs: Arc<CertManager>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live inbound connections, for policy re-checks.
    pub tracker: Arc<Tracker>,
    /// The mesh's trust domain (pod identities, accepted peers).
    pub trust_domain: String,
    /// HBONE client settings.
    pub pool: PoolConfig,
    /// HBONE server settings.
    pub hbone: ServerConfig,
    /// The DNS proxy's settings.
    pub dns: crate::dns::DnsConfig,
    /// The threads pods' connections run on; `None`: the current runtime.
    pub shards: Option<crate::shards::Shards>,
}
