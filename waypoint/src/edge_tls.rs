//! TLS termination for the ingress gateway's HTTPS servers.
//!
//! The ClientHello's SNI picks the server among the HTTPS servers on the port: the one whose hosts
//! admit it most specifically (a name, then the longest `*.<domain>`, then `*`; a client without
//! SNI gets a `*` server). Requests on the connection must then be for that server (421 else). The
//! server's `credentialName` names the certificate and key the control plane sends this gateway
//! (a `GatewayCredential` from the Secret in the gateway's namespace); `MUTUAL` also requires a
//! client certificate that chains to the credential's `ca.crt` (and, when the server lists
//! `subjectAltNames`, carries one of them). What cannot be set up refuses the handshake, with the
//! reason in the log: never a fallback to another certificate or to no client check.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use proto::api::ambient::waypoint::v1::{self as pb, gateway_server::Protocol, gateway_tls::Mode};
use proto::state::MeshState;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ingress::{ServerId, best_server, selected};

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    /// No HTTPS server on the port serves the name.
    #[error("no HTTPS server on port {port} serves {sni:?}")]
    NoServer {
        /// The port.
        port: u16,
        /// The client's SNI.
        sni: Option<String>,
    },
    /// The server's credential has not arrived (its Secret is missing, or not yet sent).
    #[error("server {server}: credential {credential} is not available")]
    NoCredential {
        /// The server's name.
        server: String,
        /// `<namespace>/<secret>`.
        credential: String,
    },
    /// The credential does not make a usable configuration.
    #[error("server {server}: credential {credential}: {reason}")]
    BadCredential {
        /// The server's name.
        server: String,
        /// `<namespace>/<secret>`.
        credential: String,
        /// What is wrong (never its content).
        reason: String,
    },
}

/// The HTTPS servers a gateway terminates TLS for; configurations are built once per credential
/// version and mode.
#[derive(Debug, Default)]
pub(crate) struct TlsServers {
    /// By (credential, MUTUAL): the credential version it was built from, and the configuration.
    built: Mutex<HashMap<(String, bool), Built>>,
}

type Built = (Arc<pb::GatewayCredential>, Arc<ServerConfig>);

/// A server whose TLS this gateway terminates (SIMPLE or MUTUAL).
pub(crate) fn terminates(server: &pb::GatewayServer) -> bool {
    server.protocol() == Protocol::Https
        && server.tls.as_ref().is_some_and(|t| matches!(t.mode(), Mode::Simple | Mode::Mutual))
}

/// What a handshake needs: the configuration, and the client SANs a MUTUAL server accepts
/// (empty: any the CA verifies).
pub(crate) struct Chosen {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) subject_alt_names: Vec<String>,
    /// The server: requests on the connection must be for it.
    pub(crate) server: ServerId,
}

impl TlsServers {
    /// The configuration for a ClientHello with `sni` on `port`, from the Gateways that select
    /// `labels`; credentials are looked up in `namespace` (the gateway's own).
    pub(crate) fn choose(
        &self,
        state: &MeshState,
        labels: &std::collections::BTreeMap<String, String>,
        namespace: &str,
        port: u16,
        sni: Option<&str>,
    ) -> Result<Chosen, Refused> {
        let name = sni.map(str::to_ascii_lowercase);
        let gateways = selected(state, labels);
        let candidates =
            gateways.iter().flat_map(|g| &g.servers).filter(|s| s.port == u32::from(port) && terminates(s));
        let server = best_server(candidates, name.as_deref()).ok_or(Refused::NoServer { port, sni: name.clone() })?;
        let tls = server.tls.clone().unwrap_or_default();
        let mutual = tls.mode() == Mode::Mutual;
        let key = format!("{namespace}/{}", tls.credential_name);
        let credential = state
            .gateway_credentials
            .get(&key)
            .cloned()
            .ok_or_else(|| Refused::NoCredential { server: server.name.clone(), credential: key.clone() })?;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        let cache_key = (key.clone(), mutual);
        let config = match built.get(&cache_key) {
            Some((c, config)) if Arc::ptr_eq(c, &credential) => config.clone(),
            _ => {
                let config = build(&credential, mutual).map_err(|reason| Refused::BadCredential {
                    server: server.name.clone(),
                    credential: key,
                    reason,
                })?;
                built.insert(cache_key, (credential, config.clone()));
                config
            }
        };
        let subject_alt_names = if mutual { tls.subject_alt_names } else { Vec::new() };
        Ok(Chosen { config, subject_alt_names, server: ServerId::of(server) })
    }
}

/// A server configuration from `credential`: its chain and key, and for MUTUAL a client verifier
/// over its CA. HTTP/2 and HTTP/1.1 are offered.
fn build(credential: &pb::GatewayCredential, mutual: bool) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(credential.cert_chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "tls.crt is not PEM certificates".to_owned())?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(credential.private_key.as_bytes())
        .map_err(|_| "tls.key is not a PEM private key".to_owned())?;
    let provider = proto::tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if mutual {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(credential.ca_certificates.as_bytes()) {
            let ca = ca.map_err(|_| "ca.crt is not PEM certificates".to_owned())?;
            roots.add(ca).map_err(|e| format!("ca.crt: {e}"))?;
        }
        if roots.is_empty() {
            return Err("MUTUAL needs ca.crt in the Secret: no client could be verified".to_owned());
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| format!("client verifier: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| format!("certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the client's leaf certificate carries one of `wanted` as a DNS or URI SAN (or an IP
/// SAN written as an address).
pub(crate) fn client_san_matches(leaf: &CertificateDer<'_>, wanted: &[String]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else { return false };
    let Ok(Some(sans)) = cert.subject_alternative_name() else { return false };
    sans.value.general_names.iter().any(|name| match name {
        GeneralName::DNSName(n) | GeneralName::URI(n) => wanted.iter().any(|w| w == n),
        GeneralName::IPAddress(bytes) => {
            let ip = match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                _ => None,
            };
            ip.is_some_and(|ip| wanted.iter().any(|w| w.parse::<IpAddr>().ok() == Some(ip)))
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn leaf(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    #[test]
    fn a_client_certificate_matches_only_by_an_exact_san() {
        let cert = leaf(vec![
            SanType::DnsName("client.example".try_into().unwrap()),
            SanType::URI("spiffe://partner.example/ns/a/sa/b".try_into().unwrap()),
            SanType::IpAddress(IpAddr::from([192, 0, 2, 1])),
        ]);
        let wants = |w: &[&str]| client_san_matches(&cert, &w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert!(wants(&["client.example"]));
        assert!(wants(&["other.example", "spiffe://partner.example/ns/a/sa/b"]));
        assert!(wants(&["192.0.2.1"]));
        // No wildcard, suffix, prefix or case folding; an address matches only as an IP SAN.
        assert!(!wants(&["*.example"]));
        assert!(!wants(&["lient.example", "client.example.", "client", "Client.example"]));
        assert!(!wants(&["spiffe://partner.example/ns/a/sa/bb", "spiffe://partner.example/ns/a"]));
        assert!(!wants(&["192.0.2.10", "::ffff:192.0.2.1"]));
        assert!(!wants(&[]));

        let wildcard = leaf(vec![SanType::DnsName("*.example".try_into().unwrap())]);
        assert!(!client_san_matches(&wildcard, &["client.example".to_owned()]));
        assert!(!client_san_matches(&leaf(vec![]), &["client.example".to_owned()]));
        assert!(!client_san_matches(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]), &["x".to_owned()]));
    }
}
