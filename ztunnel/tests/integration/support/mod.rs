//! A real control plane in process for ztunnel's tests, and what ztunnel needs to talk to it.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca::auth::{DEFAULT_AUDIENCE, JwtIssuer, TokenCheck, TokenRequest, TokenSigner};
use ca::{Config, ControlPlane};
use proto::control::ControlPlaneTarget;
use proto::tls::{SharedTrustBundle, TrustBundle};
use tokio::sync::oneshot;

pub const ISSUER: &str = "https://kubelet.test";
pub const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

/// A running control plane.
pub struct Ca {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ca::Error>>,
    pub grpc: SocketAddr,
    pub authority: Arc<ca::authority::Authority>,
}

/// Starts a control plane on `addr` (port 0: any) reading `objects`, keeping state in `state`,
/// trusting tokens from `signer`. It serves before the objects are loaded, as after a restart.
pub async fn start_ca(objects: &Path, state: &Path, signer: &TokenSigner, addr: SocketAddr) -> Ca {
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
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    /// Certificates issued to ztunnel's requests.
    pub fn issued_to_ztunnel(&self) -> usize {
        self.authority.log().records(0).iter().filter(|r| r.requested_by == ZTUNNEL).count()
    }
}

/// ztunnel's node-bound token.
pub fn ztunnel_token(signer: &TokenSigner, node: &str) -> String {
    signer
        .mint(&TokenRequest {
            namespace: "istio-system",
            service_account: "ztunnel",
            pod: None,
            node: Some(node),
            audience: DEFAULT_AUDIENCE,
            ttl: Duration::from_secs(3600),
        })
        .unwrap()
}

/// How to reach the control plane at `grpc`, trusting the roots it wrote to `state`.
pub fn target(grpc: SocketAddr, state: &Path) -> (ControlPlaneTarget, Arc<SharedTrustBundle>) {
    let roots = std::fs::read(state.join("root-cert.pem")).unwrap();
    let trust = SharedTrustBundle::new(TrustBundle::from_pem(&roots).unwrap());
    (
        ControlPlaneTarget {
            addr: grpc,
            server_name: "localhost".into(),
            trust: trust.clone(),
            credential: None,
            cluster_id: None,
        },
        trust,
    )
}

/// What ztunnel's connection handlers share, over `view` and `certs`, with default settings and no
/// DNS upstream.
pub fn context(view: Arc<ztunnel::xds::MeshView>, certs: Arc<ztunnel::certs::CertManager>) -> Arc<ztunnel::Context> {
    Arc::new(ztunnel::Context {
        view,
        certs,
        metrics: Arc::new(ztunnel::telemetry::Metrics::new()),
        tracker: Arc::new(ztunnel::tracker::Tracker::default()),
        trust_domain: "cluster.local".into(),
        pool: proto::hbone::pool::PoolConfig::default(),
        hbone: proto::hbone::server::ServerConfig::default(),
        dns: ztunnel::dns::DnsConfig { upstreams: Vec::new(), domain: "cluster.local".into() },
        shards: None,
    })
}
