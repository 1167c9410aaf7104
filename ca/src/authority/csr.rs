//! Certificate signing requests: parsed and checked before anything is signed.
//!
//! A CSR is untrusted input. It must be one PEM `CERTIFICATE REQUEST` holding a PKCS#10 request
//! whose self-signature verifies, with an ECDSA P-256/P-384 or RSA ≥ 2048-bit key and exactly one
//! URI SAN that is a valid SPIFFE ID. Only the public key and that identity are used: everything
//! else the request asks for (subject, other SANs, key usages) is ignored, the CA decides those.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use proto::SpiffeId;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry as oid;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Largest CSR accepted, in PEM characters (a 16384-bit RSA CSR is well under this).
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// The key type of an accepted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA with this many modulus bits.
    Rsa(usize),
}

/// A request that passed every check.
#[derive(Debug)]
pub struct CheckedCsr {
    /// The SPIFFE ID the request asks for.
    pub identity: SpiffeId,
    /// The key to certify, as rcgen takes it.
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// Its type.
    pub key_type: KeyType,
}

/// Why a CSR was refused. The message is returned to the caller.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Empty or oversized.
    #[error("the CSR is {0} bytes; expected 1..={MAX_CSR_LEN}")]
    Size(usize),
    /// No `CERTIFICATE REQUEST` PEM block.
    #[error("the CSR is not a PEM CERTIFICATE REQUEST")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// Not PKCS#10.
    #[error("the CSR is not a valid PKCS#10 request")]
    Der(#[source] x509_parser::error::X509Error),
    /// Bytes after the PKCS#10 structure.
    #[error("the CSR has {0} bytes after the PKCS#10 request")]
    TrailingBytes(usize),
    /// The signature algorithm is not one we accept.
    #[error(
        "CSR signature algorithm {0} is not accepted (use ECDSA with SHA-256/384 or RSA PKCS#1 with SHA-256/384/512)"
    )]
    SignatureAlgorithm(String),
    /// The key is not one we accept.
    #[error("CSR key not accepted: {0} (use ECDSA P-256/P-384 or RSA of at least {MIN_RSA_BITS} bits)")]
    Key(String),
    /// The key's encoding is not usable for signing.
    #[error("the CSR's public key is not usable")]
    UnusableKey(#[source] rcgen::Error),
    /// The self-signature does not verify.
    #[error("the CSR's signature does not verify against its own public key")]
    Signature,
    /// No URI SAN.
    #[error("the CSR names no SPIFFE ID (it needs exactly one URI SAN)")]
    NoIdentity,
    /// More than one URI SAN.
    #[error("the CSR names {0} URI SANs; exactly one SPIFFE ID is allowed")]
    SeveralIdentities(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("the CSR's URI SAN {uri:?} is not a valid SPIFFE ID")]
    Identity {
        /// The URI (its first 256 characters).
        uri: String,
        /// Why.
        #[source]
        source: proto::identity::SpiffeIdError,
    },
}

impl CsrError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Size(_) | CsrError::Pem(_) | CsrError::Der(_) | CsrError::TrailingBytes(_) => "malformed_csr",
            CsrError::SignatureAlgorithm(_) | CsrError::Key(_) | CsrError::UnusableKey(_) => "weak_key",
            CsrError::Signature => "bad_signature",
            CsrError::NoIdentity | CsrError::SeveralIdentities(_) | CsrError::Identity { .. } => "bad_identity",
        }
    }
}

/// Parses and checks a PEM CSR.
pub fn check(pem: &str) -> Result<CheckedCsr, CsrError> {
    if pem.is_empty() || pem.len() > MAX_CSR_LEN {
        return Err(CsrError::Size(pem.len()));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(CsrError::Pem)?;
    check_der(der.as_ref())
}

/// Checks a DER CSR.
pub fn check_der(der: &[u8]) -> Result<CheckedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der(e.into()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes(rest.len()));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;

    let key_type = key_type(spki)?;
    let algorithm = verification_algorithm(&csr, key_type)?;
    UnparsedPublicKey::new(algorithm, spki.subject_public_key.data.as_ref())
        .verify(info.raw, csr.signature_value.data.as_ref())
        .map_err(|_| CsrError::Signature)?;

    let identity = requested_identity(&csr)?;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(CsrError::UnusableKey)?;
    Ok(CheckedCsr { identity, public_key, key_type })
}

fn key_type(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyType, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::Key("EC key without a named curve".into()))?;
        if curve == oid::OID_EC_P256 {
            Ok(KeyType::EcdsaP256)
        } else if curve == oid::OID_NIST_EC_P384 {
            Ok(KeyType::EcdsaP384)
        } else {
            Err(CsrError::Key(format!("EC curve {curve}")))
        }
    } else if *alg == oid::OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Key("unparsable RSA key".into())),
        };
        if bits < MIN_RSA_BITS { Err(CsrError::Key(format!("RSA key of {bits} bits"))) } else { Ok(KeyType::Rsa(bits)) }
    } else {
        Err(CsrError::Key(format!("key algorithm {alg}")))
    }
}

fn verification_algorithm(
    csr: &X509CertificationRequest<'_>,
    key: KeyType,
) -> Result<&'static dyn VerificationAlgorithm, CsrError> {
    let sig = &csr.signature_algorithm.algorithm;
    let algorithm: Option<&'static dyn VerificationAlgorithm> = match key {
        KeyType::EcdsaP256 if *sig == oid::OID_SIG_ECDSA_WITH_SHA256 => Some(&signature::ECDSA_P256_SHA256_ASN1),
        KeyType::EcdsaP256 if *sig == oid::OID_SIG_ECDSA_WITH_SHA384 => Some(&signature::ECDSA_P256_SHA384_ASN1),
        KeyType::EcdsaP384 if *sig == oid::OID_SIG_ECDSA_WITH_SHA256 => Some(&signature::ECDSA_P384_SHA256_ASN1),
        KeyType::EcdsaP384 if *sig == oid::OID_SIG_ECDSA_WITH_SHA384 => Some(&signature::ECDSA_P384_SHA384_ASN1),
        KeyType::Rsa(_) if *sig == oid::OID_PKCS1_SHA256WITHRSA => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
        KeyType::Rsa(_) if *sig == oid::OID_PKCS1_SHA384WITHRSA => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
        KeyType::Rsa(_) if *sig == oid::OID_PKCS1_SHA512WITHRSA => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
        _ => None,
    };
    algorithm.ok_or_else(|| CsrError::SignatureAlgorithm(sig.to_id_string()))
}

fn requested_identity(csr: &X509CertificationRequest<'_>) -> Result<SpiffeId, CsrError> {
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            uris.extend(san.general_names.iter().filter_map(|n| match n {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            }));
        }
    }
    match uris.as_slice() {
        [] => Err(CsrError::NoIdentity),
        [uri] => uri.parse().map_err(|source| CsrError::Identity { uri: uri.chars().take(256).collect(), source }),
        several => Err(CsrError::SeveralIdentities(several.len())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

    use super::*;

    fn csr_for(uris: &[&str], key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI(u.to_string().try_into().unwrap())).collect();
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    const ID: &str = "spiffe://cluster.local/ns/demo/sa/client";

    #[test]
    fn accepts_ecdsa_p256_and_p384_and_rsa_2048() {
        for (alg, expected) in
            [(&rcgen::PKCS_ECDSA_P256_SHA256, KeyType::EcdsaP256), (&rcgen::PKCS_ECDSA_P384_SHA384, KeyType::EcdsaP384)]
        {
            let key = KeyPair::generate_for(alg).unwrap();
            let checked = check(&csr_for(&[ID], &key)).unwrap();
            assert_eq!(checked.identity.as_str(), ID);
            assert_eq!(checked.key_type, expected);
        }
        let rsa = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        assert_eq!(check(&csr_for(&[ID], &rsa)).unwrap().key_type, KeyType::Rsa(2048));
    }

    #[test]
    fn refuses_identity_problems() {
        let key = KeyPair::generate().unwrap();
        assert!(matches!(check(&csr_for(&[], &key)).unwrap_err(), CsrError::NoIdentity));
        assert!(matches!(check(&csr_for(&[ID, ID], &key)).unwrap_err(), CsrError::SeveralIdentities(2)));
        let err = check(&csr_for(&["spiffe://cluster.local/ns/demo"], &key)).unwrap_err();
        assert!(matches!(err, CsrError::Identity { .. }), "{err}");
    }

    #[test]
    fn refuses_malformed_input() {
        assert!(matches!(check("").unwrap_err(), CsrError::Size(0)));
        assert!(matches!(check(&"A".repeat(MAX_CSR_LEN + 1)).unwrap_err(), CsrError::Size(n) if n == MAX_CSR_LEN + 1));
        assert!(matches!(check("not pem at all").unwrap_err(), CsrError::Pem(_)));
        let bogus = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(check(bogus).unwrap_err(), CsrError::Der(_)));
    }

    /// Every single-byte corruption of a valid request: never a panic, and whatever still passes
    /// names the original identity and key. (x509-parser tolerates a changed tag class on a few
    /// unsigned wrappers, e.g. the outer SEQUENCE; nothing inside the signed part can change.)
    #[test]
    fn single_byte_corruptions_never_panic_nor_change_the_identity() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_for(&[ID], &key);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap().as_ref().to_vec();
        let original = check_der(&der).unwrap();
        let mut accepted = 0;
        for i in 0..der.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = der.clone();
                m[i] ^= flip;
                if let Ok(c) = check_der(&m) {
                    assert_eq!(c.identity.as_str(), ID, "byte {i} ^ {flip:#x}");
                    assert_eq!(c.public_key, original.public_key, "byte {i} ^ {flip:#x}");
                    accepted += 1;
                }
            }
            // Truncations too.
            let _ = check_der(&der[..i]);
        }
        assert!(accepted <= 8, "{accepted} corruptions accepted");
        // And the metadata parser on odd shapes.
        use prost_types::value::Kind;
        for kind in
            [Kind::NullValue(0), Kind::BoolValue(true), Kind::NumberValue(1.0), Kind::StringValue(String::new())]
        {
            let meta = prost_types::Struct {
                fields: [("ImpersonatedIdentity".to_owned(), prost_types::Value { kind: Some(kind.clone()) })].into(),
            };
            let parsed = crate::grpc::impersonated_identity(Some(&meta));
            assert_eq!(parsed.is_ok(), matches!(kind, Kind::StringValue(_)));
        }
    }

    #[test]
    fn refuses_a_tampered_signature() {
        let key = KeyPair::generate().unwrap();
        let pem = csr_for(&[ID], &key);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap().as_ref().to_vec();
        // The signature is the last bytes of the DER; flip one.
        let last = der.len() - 2;
        der[last] ^= 0x01;
        assert!(matches!(check_der(&der).unwrap_err(), CsrError::Signature));
    }
}
