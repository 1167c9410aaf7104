//! Workload certificates from the CA, kept fresh.
//!
//! A proxy asks the CA for each identity it serves, authenticating as itself (its service-account
//! token). ztunnel serves the pods on its node and names each pod's identity in
//! `ImpersonatedIdentity`; a waypoint asks only for its own identity, which needs no impersonation.
//! The private key is generated here (ECDSA P-256) and never leaves the process.
//!
//! - [`CertManager::fetch`] returns the identity's [`Credential`], requesting it on first use;
//!   concurrent first uses share one request, retried a few times while the CA is unavailable
//!   (e.g. still loading pods after a restart).
//! - Each identity then renews on its own at half of the remaining lifetime (± 10 % jitter so a
//!   node's certificates do not all renew at once). The [`Credential`] is swapped in place: every
//!   listener and pool holding it presents the new certificate on its next handshake, live streams
//!   are untouched.
//! - A failed renewal keeps the current certificate serving and retries with exponential backoff
//!   (1 s → 60 s); an expired certificate is logged loudly on every attempt.
//! - [`CertManager::forget`] stops renewing an identity no pod on the node has any more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::SpiffeId;
use crate::api::istio::v1::auth::IstioCertificateRequest;
use crate::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::control::ControlPlaneTarget;
use crate::tls::{Credential, TrustBundle, WorkloadCert};
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// Where ztunnel's own token comes from (re-read for every request: projected tokens rotate).
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token: authenticate with a client certificate only.
    None,
    /// A fixed token.
    Static(String),
    /// A file holding the token (Kubernetes projected service-account token).
    File(std::path::PathBuf),
}

impl TokenSource {
    /// The current token, if any.
    pub fn read(&self) -> Result<Option<String>, CertError> {
        match self {
            TokenSource::None => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| CertError::Token { path: path.clone(), source: Arc::new(e) }),
        }
    }
}

/// One identity a [`CertManager`] holds (for admin endpoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCert {
    /// The identity.
    pub identity: SpiffeId,
    /// Its current certificate; `None` while the first request is in flight or after it failed.
    pub current: Option<CertSummary>,
}

/// What an issued certificate is, in the terms an operator checks a rotation with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// When the next renewal is due (half of the lifetime left at receipt, ± 10 %); `None` while
    /// a renewal is under way or being retried.
    pub renews_at: Option<SystemTime>,
    /// SHA-256 fingerprints (lowercase hex) of the chain above the leaf: the signer (the CA's
    /// intermediate) first, last the root of the CA's answer it leads to.
    pub chain_sha256: Vec<String>,
}

impl HeldCert {
    fn of(identity: &SpiffeId, cert: Option<&WorkloadCert>, renews_at: Option<SystemTime>) -> HeldCert {
        let current = cert.map(|c| CertSummary {
            not_before: c.not_before(),
            not_after: c.not_after(),
            renews_at,
            chain_sha256: c.chain().iter().skip(1).chain(c.root()).map(|d| crate::tls::fingerprint_sha256(d)).collect(),
        });
        HeldCert { identity: identity.clone(), current }
    }
}

/// Settings.
#[derive(Debug, Clone)]
pub struct CertConfig {
    /// The CA.
    pub ca: ControlPlaneTarget,
    /// ztunnel's credentials for the CA.
    pub token: TokenSource,
    /// ztunnel's own identity: requests for other identities carry `ImpersonatedIdentity`.
    pub own_identity: SpiffeId,
    /// Requested lifetime (zero: the CA's default).
    pub ttl: Duration,
    /// First retry delay after a failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl CertConfig {
    /// Defaults: the CA's lifetime, retries from 1 s to 60 s.
    pub fn new(ca: ControlPlaneTarget, token: TokenSource, own_identity: SpiffeId) -> Self {
        CertConfig {
            ca,
            token,
            own_identity,
            ttl: Duration::ZERO,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    /// Reading the token.
    #[error("reading the service-account token {}", path.display())]
    Token {
        /// The token file.
        path: std::path::PathBuf,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// The token is not something an HTTP header can carry.
    #[error("the service-account token is not a valid header value")]
    TokenNotAHeader,
    /// Building the request.
    #[error("building the CSR")]
    Csr(#[source] rcgen::Error),
    /// The CA refused or could not be reached.
    #[error("CA: {code:?}: {message}")]
    Ca {
        /// gRPC status.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The answer is unusable.
    #[error("unusable certificate from the CA")]
    Response(#[source] Arc<crate::tls::TlsError>),
    /// The answer has no trust bundle after the certificate (a single entry).
    #[error("the CA's answer holds no root certificate after the leaf")]
    NoRoots,
    /// The CA answered with a certificate for someone else.
    #[error("the CA answered with a certificate for {got}, asked for {asked}")]
    WrongIdentity {
        /// What was asked.
        asked: SpiffeId,
        /// What came.
        got: SpiffeId,
    },
    /// The identity was forgotten while waiting.
    #[error("no longer wanted")]
    Forgotten,
}

/// The state of one identity, as fetchers see it.
#[derive(Debug, Clone)]
enum Slot {
    Pending,
    Ready(Arc<Credential>),
    Failed(CertError),
}

struct Entry {
    slot: watch::Sender<Slot>,
    /// When `maintain` will next renew (for [`CertManager::held`]).
    renews_at: Arc<Mutex<Option<SystemTime>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Fetches and renews workload certificates.
pub struct CertManager {
    config: CertConfig,
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    /// The roots the CA sent with the latest certificate (the last entry of its answer).
    ca_roots: arc_swap::ArcSwapOption<TrustBundle>,
    /// The runtime the manager was made on, where every renewal task runs — not the runtime of
    /// whoever asks first (in ztunnel, a traffic shard when a pod's first connection is outbound).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("CertManager").field("ca", &self.config.ca).field("identities", &n).finish()
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        for (_, e) in self.entries.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            e.task.abort();
        }
    }
}

impl CertManager {
    /// A manager talking to `config.ca` (connects lazily). Must be called inside a tokio runtime:
    /// its renewal tasks run there.
    pub fn new(config: CertConfig) -> Result<Arc<Self>, crate::control::ControlError> {
        let client = IstioCertificateServiceClient::new(config.ca.channel()?);
        Ok(Arc::new(CertManager {
            config,
            client,
            entries: Mutex::new(HashMap::new()),
            ca_roots: arc_swap::ArcSwapOption::empty(),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// The trust bundle the CA sent with the latest certificate: every root it trusts (during a
    /// root rotation, the old and the new), as Istio's ztunnel reads it. `None` before the first.
    pub fn ca_roots(&self) -> Option<Arc<TrustBundle>> {
        self.ca_roots.load_full()
    }

    /// The credential for `id`, requesting it (and starting its renewal) on first use. Fails
    /// if the first request fails; later calls try again.
    pub async fn fetch(self: &Arc<Self>, id: &SpiffeId) -> Result<Arc<Credential>, CertError> {
        let mut rx = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let failed = entries.get(id).is_some_and(|e| matches!(*e.slot.borrow(), Slot::Failed(_)));
            if failed && let Some(old) = entries.remove(id) {
                old.task.abort();
            }
            match entries.get(id) {
                Some(e) => e.slot.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(Slot::Pending);
                    let renews_at = Arc::default();
                    let task =
                        self.runtime.spawn(Arc::clone(self).maintain(id.clone(), tx.clone(), Arc::clone(&renews_at)));
                    entries.insert(id.clone(), Entry { slot: tx, renews_at, task });
                    rx
                }
            }
        };
        let slot = rx.wait_for(|s| !matches!(s, Slot::Pending)).await.map_err(|_| CertError::Forgotten)?.clone();
        match slot {
            Slot::Ready(c) => Ok(c),
            Slot::Failed(e) => Err(e),
            Slot::Pending => Err(CertError::Forgotten),
        }
    }

    /// Stops renewing `id`.
    pub fn forget(&self, id: &SpiffeId) {
        if let Some(e) = self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            e.task.abort();
            info!(identity = %id, "stopped renewing certificate (no pod needs it)");
        }
    }

    /// Identities currently held: what each one's certificate is, or that it is still being
    /// requested (or was refused).
    pub fn held(&self) -> Vec<HeldCert> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = entries
            .iter()
            .map(|(id, e)| match &*e.slot.borrow() {
                Slot::Ready(c) => {
                    HeldCert::of(id, Some(&c.current()), *e.renews_at.lock().unwrap_or_else(|p| p.into_inner()))
                }
                _ => HeldCert::of(id, None, None),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The first request: retried a few times while the CA is unreachable or starting
    /// (`Unavailable`); any other refusal is final for this attempt.
    async fn first(&self, id: &SpiffeId) -> Result<WorkloadCert, CertError> {
        let mut retry = self.config.retry_min;
        for _ in 0..4 {
            match self.request(id).await {
                Err(CertError::Ca { code: tonic::Code::Unavailable, message }) => {
                    info!(identity = %id, %message, "CA unavailable; retrying in {retry:?}");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(self.config.retry_max);
                }
                other => return other,
            }
        }
        self.request(id).await
    }

    /// Obtains the first certificate, then renews forever.
    async fn maintain(
        self: Arc<Self>,
        id: SpiffeId,
        slot: watch::Sender<Slot>,
        renews_at: Arc<Mutex<Option<SystemTime>>>,
    ) {
        let credential = match self.first(&id).await {
            Ok(cert) => {
                info!(identity = %id, not_after = ?cert.not_after(), "certificate issued");
                let c = Credential::new(cert);
                slot.send_replace(Slot::Ready(c.clone()));
                c
            }
            Err(e) => {
                warn!(identity = %id, error = %crate::error_chain(&e), "certificate request failed");
                slot.send_replace(Slot::Failed(e));
                return;
            }
        };
        let mut retry = self.config.retry_min;
        let set_renews_at = |at| *renews_at.lock().unwrap_or_else(|p| p.into_inner()) = at;
        loop {
            let now = SystemTime::now();
            let wait = renew_after(&credential.current(), now);
            set_renews_at(Some(now + wait));
            tokio::time::sleep(wait).await;
            set_renews_at(None);
            loop {
                match self.request(&id).await {
                    Ok(cert) => {
                        info!(identity = %id, not_after = ?cert.not_after(), "certificate renewed");
                        credential.replace(cert);
                        retry = self.config.retry_min;
                        break;
                    }
                    Err(e) => {
                        let current = credential.current();
                        if current.remaining(SystemTime::now()).is_zero() {
                            error!(identity = %id, error = %crate::error_chain(&e), "certificate EXPIRED and renewal failed; retrying in {retry:?}");
                        } else {
                            warn!(identity = %id, error = %crate::error_chain(&e), remaining = ?current.remaining(SystemTime::now()),
                                "certificate renewal failed; still serving the current one, retrying in {retry:?}");
                        }
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(self.config.retry_max);
                    }
                }
            }
        }
    }

    /// One CSR round trip.
    async fn request(&self, id: &SpiffeId) -> Result<WorkloadCert, CertError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::Csr)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = id.as_str().try_into().map_err(CertError::Csr)?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
        let csr = params.serialize_request(&key).and_then(|r| r.pem()).map_err(CertError::Csr)?;
        let metadata = (id != &self.config.own_identity).then(|| prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.config.ttl.as_secs() as i64,
            metadata,
        });
        request.set_timeout(Duration::from_secs(15));
        if let Some(token) = self.config.token.read()? {
            let value = format!("Bearer {token}").parse().map_err(|_| CertError::TokenNotAHeader)?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(cluster) = self.config.ca.cluster_id.as_deref().and_then(|c| c.parse().ok()) {
            request.metadata_mut().insert(crate::control::CLUSTER_ID_HEADER, cluster);
        }
        let chain = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|s| CertError::Ca { code: s.code(), message: s.message().to_owned() })?
            .into_inner()
            .cert_chain;
        let (certs, roots) = split_answer(&chain)?;
        let cert = WorkloadCert::from_pem(certs.as_bytes(), key.serialize_pem().as_bytes())
            .map_err(|e| CertError::Response(Arc::new(e)))?
            .with_root_among(roots.roots());
        if cert.identity() != id {
            return Err(CertError::WrongIdentity { asked: id.clone(), got: cert.identity().clone() });
        }
        if self.config.ca.trust.adopt_answer_roots(&roots) {
            debug!(roots = roots.roots().len(), "trusting the roots of the CA's answer (no bundle pushed yet)");
        }
        self.ca_roots.store(Some(Arc::new(roots)));
        Ok(cert)
    }
}

/// Splits a CA's answer as istiod gives it and Istio's ztunnel reads it: the leaf, the
/// intermediates, and last the trust bundle (one or more roots in one PEM entry). Returns the leaf
/// and intermediates as one PEM (the roots are not presented in handshakes) and the roots.
pub fn split_answer(cert_chain: &[String]) -> Result<(String, TrustBundle), CertError> {
    let [certs @ .., roots] = cert_chain else { return Err(CertError::NoRoots) };
    if certs.is_empty() {
        return Err(CertError::NoRoots);
    }
    let roots = TrustBundle::from_pem(roots.as_bytes()).map_err(|e| CertError::Response(Arc::new(e)))?;
    Ok((certs.concat(), roots))
}

/// When to renew: at half of the lifetime left when the certificate was received, ± 10 %.
fn renew_after(cert: &WorkloadCert, now: SystemTime) -> Duration {
    let remaining = cert.remaining(now);
    let jitter = rand::rng().random_range(0.9..1.1);
    remaining.mul_f64(0.5 * jitter)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testing::TestCa;

    #[test]
    fn the_last_entry_of_an_answer_is_the_whole_trust_bundle() {
        let (a, b) = (TestCa::new(), TestCa::new());
        let answer = ["LEAF\n".to_owned(), "INTERMEDIATE\n".to_owned(), format!("{}{}", a.root_pem(), b.root_pem())];
        let (certs, roots) = split_answer(&answer).unwrap();
        assert_eq!(certs, "LEAF\nINTERMEDIATE\n", "the roots are not presented");
        assert_eq!(roots.fingerprints(), [a.bundle().fingerprints(), b.bundle().fingerprints()].concat());
        for no_roots in [&[][..], &["LEAF".to_owned()][..]] {
            assert!(matches!(split_answer(no_roots), Err(CertError::NoRoots)), "{no_roots:?}");
        }
        let garbage = ["LEAF".to_owned(), "not a certificate".to_owned()];
        assert!(matches!(split_answer(&garbage), Err(CertError::Response(_))));
    }
}
