//! Client connections to the control plane's gRPC port (CA + xDS + admin), over TLS.
//!
//! The server must present a certificate for the name dialed that chains to the trust bundle
//! (read at each handshake, so a bundle pushed during a root rotation applies to the next
//! reconnect). Callers authenticate with a client certificate ([`Credential`]) and/or a bearer
//! token added per request ([`with_token`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{Credential, SharedTrustBundle, TlsError, control_plane_client_config};

/// Errors building a channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Connecting.
    #[error("connecting to the control plane at {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Where and how to reach the control plane.
#[derive(Clone)]
pub struct ControlPlaneTarget {
    /// Address to dial.
    pub addr: SocketAddr,
    /// Name its certificate must be valid for.
    pub server_name: String,
    /// Roots to verify it with.
    pub trust: Arc<SharedTrustBundle>,
    /// Client certificate to present, if any.
    pub credential: Option<Arc<Credential>>,
    /// The cluster this proxy runs in, sent as Istio's `clusterid` header with every request
    /// (Istio's ztunnel sends it, `Kubernetes` by default).
    pub cluster_id: Option<String>,
}

impl std::fmt::Debug for ControlPlaneTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneTarget")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .field("client_certificate", &self.credential.as_ref().map(|c| c.identity().to_string()))
            .finish()
    }
}

impl ControlPlaneTarget {
    /// A lazily connecting channel (connects on first use, reconnects after failures).
    pub fn channel(&self) -> Result<Channel, ControlError> {
        let config = control_plane_client_config(self.trust.clone(), self.credential.clone())?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|_| ControlError::ServerName(self.server_name.clone()))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let addr = self.addr;
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| ControlError::Connect { addr, source })?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })))
    }
}

/// An interceptor adding `authorization: Bearer <token>` and, when known, `clusterid: <cluster>`
/// to every request, as Istio's ztunnel sends them.
pub fn with_token_and_cluster(
    token: Option<String>,
    cluster_id: Option<&str>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let mut with_token = with_token(token);
    let cluster = cluster_id.and_then(|c| c.parse::<tonic::metadata::MetadataValue<_>>().ok());
    move |request: tonic::Request<()>| {
        let mut request = with_token(request)?;
        if let Some(c) = &cluster {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, c.clone());
        }
        Ok(request)
    }
}

/// The header Istio's ztunnel names its cluster in.
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// An interceptor adding `authorization: Bearer <token>` to every request.
pub fn with_token(
    token: Option<String>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    let value = token.and_then(|t| format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<_>>().ok());
    move |mut request: tonic::Request<()>| {
        if let Some(v) = &value {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// The audience Istio's proxies request for the tokens they present to the CA.
pub const CA_AUDIENCE: &str = "istio-ca";

/// The CA's local admin credential, in `<state-dir>/admin/`: chain (leaf first) then key, PEM.
pub const ADMIN_CREDENTIAL: &str = "credential.pem";
