//! Certificate verification for mesh peers.
//!
//! Both directions verify the chain with webpki against the *current* trust bundle (read at
//! handshake time, which is what makes bundle swaps take effect), then check the peer's SPIFFE ID:
//! the server against the accepted trust domains, the client against the expected identities.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{IdentityError, SharedTrustBundle, TlsError};
use crate::identity::SpiffeId;

/// The SPIFFE ID in a certificate's single URI SAN.
pub fn spiffe_id_from_cert(der: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.into()))?;
    let san = cert.subject_alternative_name().map_err(IdentityError::Parse)?;
    let mut uris = san.iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|name| match name {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let first = uris.next().ok_or(IdentityError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(IdentityError::MultipleUriSans(extra + 1));
    }
    Ok(first.parse()?)
}

/// The SPIFFE ID of the peer of an established connection (the leaf of its verified chain).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_from_cert(leaf).ok()
}

/// A certificate's validity period.
pub(super) fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Identity(IdentityError::Parse(e.into())))?;
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((at(cert.validity().not_before.timestamp()), at(cert.validity().not_after.timestamp())))
}

fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    let cert_error = match e {
        W::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        W::CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext { time, not_before },
        W::InvalidCertValidity => CertificateError::Expired,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::BadDer | W::BadDerTime | W::TrailingData(_) => CertificateError::BadEncoding,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(cert_error)
}

fn identity_error(e: IdentityError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Why a verified chain was still refused.
#[derive(Debug, thiserror::Error)]
enum PeerRefused {
    #[error("peer {0} is not in an accepted trust domain")]
    TrustDomain(SpiffeId),
    #[error("peer {actual} is not one of the expected identities {expected:?}")]
    UnexpectedIdentity { actual: SpiffeId, expected: Vec<String> },
}

fn refused(e: PeerRefused) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// Verifies the chain against the current bundle and returns the leaf's identity.
fn verify_chain(
    trust: &SharedTrustBundle,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let bundle = trust.current();
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    spiffe_id_from_cert(end_entity).map_err(identity_error)
}

/// Server side: verifies a client's chain and trust domain.
#[derive(Debug)]
pub(super) struct ClientVerifier {
    trust: Arc<SharedTrustBundle>,
    trust_domains: Vec<String>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
}

impl ClientVerifier {
    /// `mandatory: false` lets clients without a certificate through (they authenticate another
    /// way, e.g. with a token); a certificate that is presented is still verified in full.
    pub(super) fn new(
        trust: Arc<SharedTrustBundle>,
        trust_domains: Vec<String>,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
    ) -> Self {
        ClientVerifier { trust, trust_domains, provider, mandatory }
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id =
            verify_chain(&self.trust, &self.provider, end_entity, intermediates, now, webpki::KeyUsage::client_auth())?;
        if !self.trust_domains.iter().any(|td| td == id.trust_domain()) {
            return Err(refused(PeerRefused::TrustDomain(id)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used in the mesh".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Client side: verifies the server's chain and that its identity is one of those expected.
///
/// With `server_name` set instead (the control plane), the server must hold a certificate for
/// that DNS name or IP address; its SPIFFE ID is not checked.
#[derive(Debug)]
pub(super) struct ServerVerifier {
    trust: Arc<SharedTrustBundle>,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
}

/// What a server must prove beyond a chain to the bundle.
#[derive(Debug)]
pub(super) enum ExpectedServer {
    /// One of these SPIFFE IDs (HBONE).
    Identities(Vec<SpiffeId>),
    /// A certificate valid for the name the client dialed (the control plane).
    Name,
}

impl ServerVerifier {
    pub(super) fn new(trust: Arc<SharedTrustBundle>, expected: ExpectedServer, provider: Arc<CryptoProvider>) -> Self {
        ServerVerifier { trust, expected, provider }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match &self.expected {
            ExpectedServer::Identities(expected) => {
                let id = verify_chain(
                    &self.trust,
                    &self.provider,
                    end_entity,
                    intermediates,
                    now,
                    webpki::KeyUsage::server_auth(),
                )?;
                if !expected.contains(&id) {
                    let expected = expected.iter().map(ToString::to_string).collect();
                    return Err(refused(PeerRefused::UnexpectedIdentity { actual: id, expected }));
                }
            }
            ExpectedServer::Name => {
                let bundle = self.trust.current();
                let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
                cert.verify_for_usage(
                    self.provider.signature_verification_algorithms.all,
                    bundle.anchors(),
                    intermediates,
                    now,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                )
                .map_err(pki_error)?;
                cert.verify_is_valid_for_subject_name(server_name).map_err(|e| match e {
                    webpki::Error::CertNotValidForName(_) => {
                        Error::InvalidCertificate(CertificateError::NotValidForName)
                    }
                    other => pki_error(other),
                })?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::General("TLS 1.2 is not used in the mesh".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The root among `roots` that issued `cert`: the one whose subject key identifier is `cert`'s
/// authority key identifier, or (without those extensions) whose subject is `cert`'s issuer.
pub(crate) fn issuing_root<'r>(
    cert: &CertificateDer<'_>,
    roots: &'r [CertificateDer<'static>],
) -> Option<&'r CertificateDer<'static>> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let aki = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    roots.iter().find(|der| {
        let Ok((_, root)) = X509Certificate::from_der(der) else { return false };
        let ski = root.extensions().iter().find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
        match (&aki, ski) {
            (Some(aki), Some(ski)) => *aki == ski,
            _ => root.subject().as_raw() == cert.issuer().as_raw(),
        }
    })
}
