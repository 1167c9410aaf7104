//! Mutual TLS for HBONE.
//!
//! - [`TrustBundle`]: the roots a peer's chain must lead to; may hold several (during rotation).
//! - [`Credential`]: one workload's certificate chain and key, swappable at run time.
//! - [`SharedTrustBundle`]: a trust bundle swappable at run time.
//! - [`server_config`] / [`client_config`]: rustls configurations for HBONE (TLS 1.3 only, ALPN
//!   `h2`, aws-lc-rs). The server verifies the client's chain and trust domain; the client verifies
//!   the server's chain and that its SPIFFE ID is one of those expected.
//!
//! Swaps take effect on the next handshake: configurations read the current certificate and bundle
//! at handshake time, and established connections keep what they negotiated. Session resumption is
//! disabled on both sides, so every connection is authenticated against the current bundle.

mod verify;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::{SpiffeId, SpiffeIdError};

pub use verify::{peer_identity, spiffe_id_from_cert};

/// SHA-256 fingerprint of a certificate's DER bytes, lowercase hex (how the CA names its roots and
/// signers).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM input could not be decoded.
    #[error("invalid PEM for {what}: {source}")]
    Pem {
        /// What was being read.
        what: &'static str,
        /// The decoder's error.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate chain was empty.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// A trust bundle had no certificate.
    #[error("the trust bundle holds no certificate")]
    EmptyBundle,
    /// A certificate could not be used as a trust anchor.
    #[error("root certificate #{index} is not a usable trust anchor: {source}")]
    TrustAnchor {
        /// Position of the certificate in the bundle.
        index: usize,
        /// webpki's reason.
        source: webpki::Error,
    },
    /// The leaf certificate does not carry exactly one valid SPIFFE ID.
    #[error("the leaf certificate has no usable SPIFFE identity: {0}")]
    Identity(#[from] IdentityError),
    /// rustls rejected the key, or the key does not match the leaf certificate.
    #[error("the private key cannot be used with this certificate: {0}")]
    Key(rustls::Error),
    /// rustls rejected the configuration.
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Why a certificate does not carry a mesh identity.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate is not valid DER X.509, or its SAN extension is not readable.
    #[error("the certificate cannot be parsed")]
    Parse(#[source] x509_parser::error::X509Error),
    /// The certificate has no URI SAN.
    #[error("the certificate has no URI subject alternative name")]
    NoUriSan,
    /// The certificate has several URI SANs; the profile allows exactly one.
    #[error("the certificate has {0} URI subject alternative names; exactly one is allowed")]
    MultipleUriSans(usize),
    /// The URI SAN is not a mesh SPIFFE ID.
    #[error(transparent)]
    Spiffe(#[from] SpiffeIdError),
}

/// A readable description of an I/O error from a TLS handshake: rustls prints errors raised by
/// our verifiers as `Other(OtherError(..))`; this prints their own message instead.
pub fn describe_io_error(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// The crypto provider every mesh TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// A set of trusted roots, in DER and as webpki trust anchors.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates.
    pub fn from_der(roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|source| TlsError::TrustAnchor { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustBundle { roots, anchors })
    }

    /// Builds a bundle from concatenated PEM certificates.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem { what: "trust bundle", source })?;
        Self::from_der(roots)
    }

    /// The roots, in DER.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots' SHA-256 fingerprints (lowercase hex), for admin endpoints.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| fingerprint_sha256(r)).collect()
    }

    /// A bundle holding the roots of both, without duplicates (for root rotation).
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut merged = self.clone();
        for (der, anchor) in other.roots.iter().zip(&other.anchors) {
            if !merged.roots.contains(der) {
                merged.roots.push(der.clone());
                merged.anchors.push(anchor.clone());
            }
        }
        merged
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[rustls_pki_types::TrustAnchor<'static>] {
        &self.anchors
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle").field("roots", &self.roots.len()).finish()
    }
}

/// A trust bundle that can be replaced while connections use it.
///
/// It starts from the bootstrap roots (the root-cert file). The control plane's pushed bundle
/// replaces it; until one is pushed, the roots that come with certificate answers are trusted too
/// (a control plane that never pushes one, such as istiod, is trusted through its answers, as
/// Istio's ztunnel trusts them).
#[derive(Debug)]
pub struct SharedTrustBundle {
    current: ArcSwap<TrustBundle>,
    bootstrap: TrustBundle,
    /// Set by the first pushed bundle; from then on answers do not change the bundle.
    pushed: std::sync::Mutex<bool>,
}

impl SharedTrustBundle {
    /// Wraps an initial bundle.
    pub fn new(bundle: TrustBundle) -> Arc<Self> {
        Arc::new(SharedTrustBundle {
            current: ArcSwap::from_pointee(bundle.clone()),
            bootstrap: bundle,
            pushed: std::sync::Mutex::new(false),
        })
    }

    /// The current bundle.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// Replaces the bundle with one the control plane pushed; the next handshake verifies
    /// against it.
    pub fn replace(&self, bundle: TrustBundle) {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        *pushed = true;
        self.current.store(Arc::new(bundle));
    }

    /// The roots a certificate answer came with: trusted, with the bootstrap roots, until the
    /// control plane pushes a bundle. Returns whether they were taken.
    pub fn adopt_answer_roots(&self, roots: &TrustBundle) -> bool {
        let pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        if *pushed {
            return false;
        }
        self.current.store(Arc::new(self.bootstrap.merged(roots)));
        true
    }
}

/// A parsed workload certificate: chain, key and the identity it proves.
#[derive(Clone)]
pub struct WorkloadCert {
    key: Arc<CertifiedKey>,
    identity: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The root the chain leads to, when known (not presented in handshakes; for admin dumps).
    root: Option<CertificateDer<'static>>,
}

impl WorkloadCert {
    /// Builds from a DER chain (leaf first) and the leaf's private key; checks that the key matches
    /// the leaf and that the leaf carries exactly one SPIFFE ID.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let identity = spiffe_id_from_cert(leaf)?;
        let (not_before, not_after) = verify::validity(leaf)?;
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Key)?;
        Ok(WorkloadCert { key: Arc::new(key), identity, not_before, not_after, root: None })
    }

    /// Builds from a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem { what: "certificate chain", source })?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem { what: "private key", source })?;
        Self::from_der(chain, key)
    }

    /// The same certificate, knowing the root among `roots` that its chain leads to (matched by
    /// the last certificate's authority key identifier, else its issuer name); unchanged when
    /// none does.
    pub fn with_root_among(mut self, roots: &[CertificateDer<'static>]) -> Self {
        if let Some(last) = self.key.cert.last() {
            self.root = verify::issuing_root(last, roots).cloned();
        }
        self
    }

    /// The root the chain leads to, when known.
    pub fn root(&self) -> Option<&CertificateDer<'static>> {
        self.root.as_ref()
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// Start of the validity period.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the validity period.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Time left until expiry (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("not_before_unix", &secs(self.not_before))
            .field("not_after_unix", &secs(self.not_after))
            .finish_non_exhaustive()
    }
}

/// A workload's current certificate, replaceable at run time (rotation).
///
/// Configurations built from it pick up a replacement on their next handshake.
#[derive(Debug)]
pub struct Credential(ArcSwap<WorkloadCert>);

impl Credential {
    /// Wraps an initial certificate.
    pub fn new(cert: WorkloadCert) -> Arc<Self> {
        Arc::new(Credential(ArcSwap::from_pointee(cert)))
    }

    /// The current certificate.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.0.load_full()
    }

    /// The identity of the current certificate.
    pub fn identity(&self) -> SpiffeId {
        self.0.load().identity.clone()
    }

    /// Replaces the certificate; the next handshake presents the new one.
    pub fn replace(&self, cert: WorkloadCert) {
        self.0.store(Arc::new(cert));
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.0.load().key.clone()
    }
}

impl rustls::server::ResolvesServerCert for Credential {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl rustls::client::ResolvesClientCert for Credential {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS configuration for an HBONE server presenting `credential`.
///
/// Clients must present a chain to `trust` whose SPIFFE ID is in one of `trust_domains`.
pub fn server_config(
    credential: Arc<Credential>,
    trust: Arc<SharedTrustBundle>,
    trust_domains: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(verify::ClientVerifier::new(trust, trust_domains, provider.clone(), true));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(credential);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection is verified against the current trust bundle.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// TLS configuration for an HBONE client presenting `credential` and accepting only a server whose
/// SPIFFE ID is one of `expected`.
pub fn client_config(
    credential: Arc<Credential>,
    trust: Arc<SharedTrustBundle>,
    expected: Vec<SpiffeId>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier =
        Arc::new(verify::ServerVerifier::new(trust, verify::ExpectedServer::Identities(expected), provider.clone()));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(credential);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// TLS configuration for the control plane's gRPC port (CA + xDS), presenting `certificate`.
///
/// A client certificate is optional (callers may authenticate with a token instead); one that is
/// presented must chain to `trust` and carry a SPIFFE ID in one of `trust_domains`.
pub fn control_plane_server_config(
    certificate: Arc<dyn rustls::server::ResolvesServerCert>,
    trust: Arc<SharedTrustBundle>,
    trust_domains: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(verify::ClientVerifier::new(trust, trust_domains, provider.clone(), false));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// TLS configuration for a client of the control plane: the server must chain to `trust` and
/// hold a certificate for the name dialed. `credential`, if any, is presented as the client
/// certificate (renewal, admin access).
pub fn control_plane_client_config(
    trust: Arc<SharedTrustBundle>,
    credential: Option<Arc<Credential>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(verify::ServerVerifier::new(trust, verify::ExpectedServer::Name, provider.clone()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match credential {
        Some(credential) => builder.with_client_cert_resolver(credential),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testing::TestCa;

    #[test]
    fn a_certificate_knows_the_root_its_chain_leads_to() {
        let (mine, other) = (TestCa::new(), TestCa::new());
        let cert = mine.issue(&"spiffe://cluster.local/ns/a/sa/b".parse().unwrap());
        let roots = [other.root().clone(), mine.root().clone()];
        assert_eq!(cert.clone().with_root_among(&roots).root(), Some(mine.root()));
        assert_eq!(cert.with_root_among(&roots[..1]).root(), None, "no root of the answer issued it");
    }

    #[test]
    fn answer_roots_are_trusted_until_the_control_plane_pushes_a_bundle() {
        let (bootstrap, answered, pushed) = (TestCa::new(), TestCa::new(), TestCa::new());
        let shared = SharedTrustBundle::new(bootstrap.bundle());
        let prints = |s: &SharedTrustBundle| s.current().fingerprints();
        // Before any push: the bootstrap roots and those of the latest answer.
        assert!(shared.adopt_answer_roots(&answered.bundle()));
        assert_eq!(prints(&shared), [bootstrap.bundle().fingerprints(), answered.bundle().fingerprints()].concat());
        // An answer replaces what an earlier answer added (a retired root does not linger).
        assert!(shared.adopt_answer_roots(&pushed.bundle()));
        assert_eq!(prints(&shared), [bootstrap.bundle().fingerprints(), pushed.bundle().fingerprints()].concat());
        // A pushed bundle is authoritative; answers no longer change it.
        shared.replace(pushed.bundle());
        assert!(!shared.adopt_answer_roots(&answered.bundle()));
        assert_eq!(prints(&shared), pushed.bundle().fingerprints());
    }
}
