//! A running control plane for integration tests: objects from a temp directory of YAML, CA state
//! in another, tokens minted by a local issuer (the kubelet's part), clients over real TLS.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ca::auth::{DEFAULT_AUDIENCE, JwtIssuer, TokenCheck, TokenRequest, TokenSigner};
use ca::{Config, ControlPlane};
use proto::SpiffeId;
use proto::api::istio::v1::auth::IstioCertificateRequest;
use proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use proto::control::{ControlPlaneTarget, with_token};
use proto::tls::{Credential, SharedTrustBundle, TrustBundle, WorkloadCert};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub const ISSUER: &str = "https://kubelet.test";
pub const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
pub const ADMIN: &str = "spiffe://cluster.local/ns/istio-system/sa/mesh-admin";

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub signer: Arc<TokenSigner>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub authority: Option<Arc<ca::authority::Authority>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ca::Error>>>,
}

pub fn config(objects: &Path, state: &Path, signer: &TokenSigner) -> Config {
    let tokens = TokenCheck::Local(JwtIssuer { issuer: ISSUER.into(), jwks: signer.jwks().clone() });
    Config::local(objects.to_owned(), state.to_owned(), tokens)
}

impl Mesh {
    /// A mesh with no objects yet (write some, then `boot`).
    pub fn new() -> Mesh {
        Mesh {
            dir: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
            signer: Arc::new(TokenSigner::new(ISSUER, None).unwrap()),
            grpc: "0.0.0.0:0".parse().unwrap(),
            admin: "0.0.0.0:0".parse().unwrap(),
            authority: None,
            stop: None,
            task: None,
        }
    }

    pub fn config(&self) -> Config {
        config(self.dir.path(), self.state.path(), &self.signer)
    }

    pub async fn boot(self) -> Mesh {
        let config = self.config();
        self.boot_with(config).await
    }

    pub async fn boot_with(mut self, config: Config) -> Mesh {
        let cp = ControlPlane::bind(config).await.unwrap();
        self.grpc = cp.grpc_addr();
        self.admin = cp.admin_addr();
        self.authority = Some(cp.authority());
        let (tx, rx) = oneshot::channel();
        self.task = Some(tokio::spawn(cp.run(async {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
        self
    }

    pub fn write(&self, name: &str, content: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }

    /// The roots clients start from (`<state>/root-cert.pem`).
    pub fn trust(&self) -> Arc<SharedTrustBundle> {
        let pem = std::fs::read(self.state.path().join("root-cert.pem")).unwrap();
        SharedTrustBundle::new(TrustBundle::from_pem(&pem).unwrap())
    }

    /// A TLS channel, presenting `credential` if given.
    pub fn channel(&self, credential: Option<Arc<Credential>>) -> Channel {
        ControlPlaneTarget {
            addr: self.grpc,
            server_name: "localhost".into(),
            trust: self.trust(),
            credential,
            cluster_id: None,
        }
        .channel()
        .unwrap()
    }

    pub fn token(&self, namespace: &str, service_account: &str, node: Option<&str>) -> String {
        self.signer
            .mint(&TokenRequest {
                namespace,
                service_account,
                pod: None,
                node,
                audience: DEFAULT_AUDIENCE,
                ttl: Duration::from_secs(600),
            })
            .unwrap()
    }

    /// A certificate client authenticating with `token`.
    pub fn ca_client(
        &self,
        token: Option<String>,
        credential: Option<Arc<Credential>>,
    ) -> IstioCertificateServiceClient<
        tonic::service::interceptor::InterceptedService<Channel, impl tonic::service::Interceptor + Clone>,
    > {
        IstioCertificateServiceClient::with_interceptor(self.channel(credential), with_token(token))
    }

    /// The admin credential the CA wrote to its state directory.
    pub fn admin_credential(&self) -> Arc<Credential> {
        let dir = self.state.path().join("admin");
        let pem = std::fs::read(dir.join(ca::ADMIN_CREDENTIAL)).unwrap();
        Credential::new(WorkloadCert::from_pem(&pem, &pem).unwrap())
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split(' ').nth(1).unwrap().parse().unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    pub async fn wait_ready(&self) {
        proto::testing::eventually("the CA to be ready", Duration::from_secs(10), || async {
            (self.admin_get("/healthz/ready").await.0 == 200).then_some(())
        })
        .await;
    }

    pub async fn shutdown(mut self) -> Mesh {
        self.stop.take().unwrap().send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap()).await;
        result.expect("control plane did not stop").unwrap().unwrap();
        self.authority = None;
        self
    }
}

/// A key and a PEM CSR for `uris`.
pub fn csr(uris: &[&str]) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let pem = csr_with(uris, &key);
    (key, pem)
}

pub fn csr_with(uris: &[&str], key: &KeyPair) -> String {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris.iter().map(|u| SanType::URI(u.to_string().try_into().unwrap())).collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

pub fn request(csr: String, ttl: i64, impersonate: Option<&str>) -> IstioCertificateRequest {
    let metadata = impersonate.map(|id| prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_owned())) },
        )]
        .into(),
    });
    IstioCertificateRequest { csr, validity_duration: ttl, metadata }
}

/// A credential from an issued chain and its key.
/// The credential a proxy makes of an answer: leaf and intermediates (the trust bundle, last, is
/// not presented).
pub fn credential(chain: &[String], key: &KeyPair) -> Arc<Credential> {
    let (certs, _roots) = proto::certs::split_answer(chain).unwrap();
    Credential::new(WorkloadCert::from_pem(certs.as_bytes(), key.serialize_pem().as_bytes()).unwrap())
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}
