//! TLS the waypoint originates to a destination's endpoints: a DestinationRule's `tls` with mode
//! `SIMPLE` (Istio's TLS origination, typically at an egress waypoint: the app sends plain HTTP
//! to a ServiceEntry host, the waypoint applies L7 policy to it and sends HTTPS out).
//!
//! The endpoint's certificate is verified against the rule's roots (`credentialName`'s `ca.crt`,
//! the `caCertificates` file, else the system's) and must carry the SNI name, or one of
//! `subjectAltNames` when the rule lists them; `insecureSkipVerify` accepts any certificate (the
//! handshake signature is still checked). A rule the waypoint cannot carry out is a refusal:
//! requests to the destination get `503` instead of going out without the TLS asked for.

use std::sync::{Arc, OnceLock};

use proto::api::ambient::waypoint::v1::UpstreamTls;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why a rule's TLS cannot be originated.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    /// The control plane found the rule cannot be carried out (an unsupported mode, a missing
    /// Secret); its reason.
    #[error("{0}")]
    Refused(String),
    /// The SNI (or the destination's hostname standing for it) is no server name.
    #[error("SNI {0:?} is not a DNS name or IP address")]
    Sni(String),
    /// A `subjectAltNames` entry is no server name.
    #[error("subjectAltNames entry {0:?} is not a DNS name or IP address")]
    SubjectAltName(String),
    /// The `caCertificates` file could not be read.
    #[error("caCertificates file {path}")]
    CaFile {
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The roots are not PEM certificates rustls takes.
    #[error("the roots ({0}) hold no usable certificate")]
    NoRoots(&'static str),
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
}

/// A rule's TLS, ready to wrap endpoint connections in.
#[derive(Debug)]
pub struct Origination {
    /// The SNI sent.
    server_name: ServerName<'static>,
    /// Offering `http/1.1`.
    http1: Arc<ClientConfig>,
    /// Offering `h2`.
    http2: Arc<ClientConfig>,
}

impl Origination {
    /// The TLS `tls` asks for to endpoints of the service `hostname`.
    pub fn new(tls: &UpstreamTls, hostname: &str) -> Result<Origination, OriginationError> {
        if !tls.refusal.is_empty() {
            return Err(OriginationError::Refused(tls.refusal.clone()));
        }
        let sni = if tls.sni.is_empty() { hostname } else { tls.sni.as_str() };
        let server_name = ServerName::try_from(sni.to_owned()).map_err(|_| OriginationError::Sni(sni.to_owned()))?;
        let names = tls
            .subject_alt_names
            .iter()
            .map(|n| ServerName::try_from(n.clone()).map_err(|_| OriginationError::SubjectAltName(n.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        let provider = proto::tls::provider();
        let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
            Arc::new(AnyCertificate(provider.clone()))
        } else {
            let roots = roots(tls)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| OriginationError::Config(rustls::Error::General(e.to_string())))?;
            if names.is_empty() { webpki } else { Arc::new(AnyOfNames { webpki, names }) }
        };
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, OriginationError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(OriginationError::Config)?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(Origination { server_name, http1: config(b"http/1.1")?, http2: config(b"h2")? })
    }

    /// The SNI sent.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// `stream` wrapped in TLS to the endpoint, offering `h2` when `http2`, else `http/1.1`.
    pub async fn connect<S>(&self, stream: S, http2: bool) -> std::io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = if http2 { &self.http2 } else { &self.http1 };
        TlsConnector::from(config.clone()).connect(self.server_name.clone(), stream).await
    }
}

/// The roots for `tls`: inline PEM, else the file, else the system's.
fn roots(tls: &UpstreamTls) -> Result<Arc<RootCertStore>, OriginationError> {
    let from_pem = |pem: &[u8], what: &'static str| {
        let mut store = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|_| OriginationError::NoRoots(what))?;
            store.add(cert).map_err(|_| OriginationError::NoRoots(what))?;
        }
        if store.is_empty() { Err(OriginationError::NoRoots(what)) } else { Ok(Arc::new(store)) }
    };
    if !tls.ca_certificates.is_empty() {
        return from_pem(tls.ca_certificates.as_bytes(), "credentialName's ca.crt");
    }
    if !tls.ca_certificates_file.is_empty() {
        let path = &tls.ca_certificates_file;
        let pem = std::fs::read(path).map_err(|source| OriginationError::CaFile { path: path.clone(), source })?;
        return from_pem(&pem, "caCertificates");
    }
    system_roots()
}

/// The system's roots, read once.
fn system_roots() -> Result<Arc<RootCertStore>, OriginationError> {
    static SYSTEM: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    let store = SYSTEM.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let (_added, _ignored) = store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        Arc::new(store)
    });
    if store.is_empty() { Err(OriginationError::NoRoots("the system's")) } else { Ok(store.clone()) }
}

/// Verification against the roots with the certificate carrying any one of `names` (the rule's
/// `subjectAltNames`) instead of the SNI name.
#[derive(Debug)]
struct AnyOfNames {
    webpki: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AnyOfNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = rustls::Error::General("no subjectAltNames to verify".to_owned());
        for name in &self.names {
            match self.webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: any certificate, as long as the peer holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::ServerConfig;
    use rustls_pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA and a server certificate it signs for `names`.
    fn pki(names: &[&str]) -> (String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_cert.pem(), vec![leaf.der().clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
    }

    /// Originates `tls` for the service `hostname` to a server presenting a certificate for
    /// `names`: the ALPN the server saw, or the client's error.
    async fn handshake(tls: &UpstreamTls, hostname: &str, names: &[&str], ca: Option<&str>) -> Result<String, String> {
        let (own_ca, chain, key) = pki(names);
        let mut tls = tls.clone();
        if tls.ca_certificates.is_empty() && !tls.insecure_skip_verify {
            tls.ca_certificates = ca.unwrap_or(&own_ca).to_owned();
        }
        let origination = Origination::new(&tls, hostname).map_err(|e| e.to_string())?;
        let mut server = ServerConfig::builder_with_provider(proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let served = tokio::spawn(async move {
            let mut s = acceptor.accept(server_io).await.ok()?;
            let alpn = String::from_utf8(s.get_ref().1.alpn_protocol()?.to_vec()).ok()?;
            let sni = s.get_ref().1.server_name().map(str::to_owned);
            s.write_all(b"ok").await.ok()?;
            s.flush().await.ok()?;
            Some(format!("{alpn} {}", sni.unwrap_or_default()))
        });
        let mut client = origination.connect(client_io, false).await.map_err(|e| proto::tls::describe_io_error(&e))?;
        let mut got = [0u8; 2];
        client.read_exact(&mut got).await.map_err(|e| e.to_string())?;
        assert_eq!(&got, b"ok");
        Ok(served.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn verifies_the_endpoint_by_the_sni_name_or_the_rule_s_names() {
        let simple = UpstreamTls::default();
        let host = "api.example.test";
        assert_eq!(handshake(&simple, host, &[host], None).await.unwrap(), "http/1.1 api.example.test");
        // A certificate for another name, or from another CA, is refused.
        let err = handshake(&simple, host, &["other.example.test"], None).await.unwrap_err();
        assert!(err.contains("certificate not valid for name"), "{err}");
        let (foreign, _, _) = pki(&[host]);
        let err = handshake(&simple, host, &[host], Some(&foreign)).await.unwrap_err();
        assert!(err.starts_with("invalid peer certificate"), "{err}");
        // `sni` replaces the hostname on the wire and in verification.
        let sni = UpstreamTls { sni: "edge.example.test".into(), ..Default::default() };
        assert_eq!(handshake(&sni, host, &["edge.example.test"], None).await.unwrap(), "http/1.1 edge.example.test");
        assert!(handshake(&sni, host, &[host], None).await.is_err());
        // `subjectAltNames`: any one of them, instead of the SNI name.
        let sans = UpstreamTls { subject_alt_names: vec!["a.test".into(), "b.test".into()], ..Default::default() };
        assert_eq!(handshake(&sans, host, &["b.test"], None).await.unwrap(), "http/1.1 api.example.test");
        let err = handshake(&sans, host, &[host], None).await.unwrap_err();
        assert!(err.contains("certificate not valid for name"), "{err}");
        // insecureSkipVerify takes anything.
        let insecure = UpstreamTls { insecure_skip_verify: true, ..Default::default() };
        assert!(handshake(&insecure, host, &["whatever.test"], None).await.is_ok());
    }

    #[test]
    fn rules_that_cannot_be_carried_out_are_refusals() {
        let new = |tls: UpstreamTls| Origination::new(&tls, "api.example.test").unwrap_err().to_string();
        let refused = UpstreamTls {
            refusal: "DestinationRule a/b: tls.mode MUTUAL is not supported".into(),
            ..Default::default()
        };
        assert_eq!(new(refused), "DestinationRule a/b: tls.mode MUTUAL is not supported");
        let file = UpstreamTls { ca_certificates_file: "/nonexistent/ca.pem".into(), ..Default::default() };
        assert_eq!(new(file), "caCertificates file /nonexistent/ca.pem");
        let junk = UpstreamTls { ca_certificates: "not pem".into(), ..Default::default() };
        assert_eq!(new(junk), "the roots (credentialName's ca.crt) hold no usable certificate");
        let sni = UpstreamTls { sni: "bad name!".into(), ..Default::default() };
        assert_eq!(new(sni), "SNI \"bad name!\" is not a DNS name or IP address");
    }
}
