//! Signing material: the roots and the intermediate, generated, loaded (self-managed or plugged
//! in), checked and stored.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::tls::TrustBundle;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{AuthorityConfig, BACKDATE, MaterialError, SelfCheckError, SetupError};

/// Where a root stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootState {
    /// Trusted, not yet signing.
    Pending,
    /// Signing (through the intermediate).
    Active,
    /// Replaced, still trusted.
    Retiring,
}

/// Facts about one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Validity end, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    fn of(der: &[u8]) -> Result<Self, x509_parser::error::X509Error> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)?;
        Ok(CertInfo {
            fingerprint: fingerprint(der),
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// SHA-256 fingerprint of DER bytes, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    proto::tls::fingerprint_sha256(der)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A trusted root.
#[derive(Debug, Clone)]
pub struct Root {
    /// PEM.
    pub pem: String,
    pub(super) der: CertificateDer<'static>,
    /// PEM private key (self-managed roots only).
    pub(super) key_pem: Option<String>,
    /// Rotation state.
    pub state: RootState,
    /// Facts.
    pub info: CertInfo,
}

/// The intermediate that signs workload certificates.
pub struct Signer {
    pub(super) issuer: Issuer<'static, KeyPair>,
    /// Its PEM (persisted).
    pub(super) cert_pem: String,
    /// Its key's PEM (persisted; `None` for plugged-in material, which is never rewritten).
    pub(super) key_pem: Option<String>,
    /// The chain appended to every leaf: intermediates → root, PEM.
    pub(super) chain: Vec<String>,
    /// Fingerprint of the root it leads to.
    pub(super) root: String,
    /// Facts.
    pub info: CertInfo,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer").field("info", &self.info).field("root", &self.root).finish_non_exhaustive()
    }
}

/// All signing material at one moment.
#[derive(Debug)]
pub struct Material {
    /// Trusted roots, oldest first.
    pub roots: Vec<Root>,
    /// The signer.
    pub signer: Arc<Signer>,
    /// Plugged-in from this directory.
    pub plugged_in: Option<PathBuf>,
}

impl Material {
    /// The trust bundle (every root).
    pub fn bundle_pem(&self) -> Vec<String> {
        self.roots.iter().map(|r| r.pem.clone()).collect()
    }

    /// The trust bundle, parsed.
    pub fn trust_bundle(&self) -> Result<TrustBundle, proto::tls::TlsError> {
        TrustBundle::from_der(self.roots.iter().map(|r| r.der.clone()).collect())
    }
}

/// The file format of self-managed material.
#[derive(Serialize, Deserialize)]
struct Stored {
    pub(super) version: u32,
    pub(super) roots: Vec<StoredRoot>,
    pub(super) intermediate: StoredCert,
}

#[derive(Serialize, Deserialize)]
struct StoredRoot {
    pub(super) cert: String,
    pub(super) key: String,
    pub(super) state: RootState,
}

#[derive(Serialize, Deserialize)]
struct StoredCert {
    pub(super) cert: String,
    pub(super) key: String,
}

pub(super) fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub(super) fn to_datetime(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix(t)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

pub(super) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    // Positive, and no leading zero byte to strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io { path: path.to_owned(), source }
}

pub(super) fn material_err(path: &Path, source: MaterialError) -> SetupError {
    SetupError::Material { path: path.to_owned(), source }
}

pub(super) fn distinguished_name(trust_domain: &str, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    dn
}

pub(super) fn new_root(config: &AuthorityConfig, state: RootState) -> Result<Root, SetupError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    // Subjects must differ between roots (and between intermediates): a verifier picks candidate
    // issuers by name, and two roots named alike during a rotation would shadow each other.
    params.distinguished_name =
        distinguished_name(&config.trust_domain, &format!("ambient mesh root {}", unique_tag()));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = to_datetime(now - BACKDATE);
    params.not_after = to_datetime(now + config.root_ttl);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    let der = cert.der().clone();
    let info = CertInfo::of(&der).map_err(SetupError::Generated)?;
    Ok(Root { pem: cert.pem(), der, key_pem: Some(key.serialize_pem()), state, info })
}

pub(super) fn new_intermediate(config: &AuthorityConfig, root: &Root) -> Result<Signer, SetupError> {
    let root_key_pem = root.key_pem.as_deref().ok_or_else(|| SetupError::NoRootKey(root.info.fingerprint.clone()))?;
    let root_issuer = Issuer::from_ca_cert_der(&root.der, KeyPair::from_pem(root_key_pem)?)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name =
        distinguished_name(&config.trust_domain, &format!("ambient mesh intermediate {}", unique_tag()));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = to_datetime(now - BACKDATE);
    // Within the root's own validity.
    let not_after = unix(now + config.intermediate_ttl).min(root.info.not_after);
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, &root_issuer)?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    let issuer = Issuer::from_ca_cert_der(cert.der(), key)?;
    let info = CertInfo::of(cert.der()).map_err(SetupError::Generated)?;
    Ok(Signer {
        issuer,
        cert_pem: cert_pem.clone(),
        key_pem: Some(key_pem),
        chain: vec![cert_pem, root.pem.clone()],
        root: root.info.fingerprint.clone(),
        info,
    })
}

pub(super) fn generate_initial(config: &AuthorityConfig) -> Result<Material, SetupError> {
    let root = new_root(config, RootState::Active)?;
    let signer = new_intermediate(config, &root)?;
    Ok(Material { roots: vec![root], signer: Arc::new(signer), plugged_in: None })
}

pub(super) fn parse_cert_pem(path: &Path, pem: &str) -> Result<CertificateDer<'static>, SetupError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| material_err(path, MaterialError::Pem(e)))
}

pub(super) fn load_stored(path: &Path, bytes: &[u8]) -> Result<Material, SetupError> {
    let stored: Stored = serde_json::from_slice(bytes).map_err(|e| material_err(path, MaterialError::Json(e)))?;
    if stored.version != 1 {
        return Err(material_err(path, MaterialError::Version(stored.version)));
    }
    let mut roots = Vec::new();
    for r in stored.roots {
        let der = parse_cert_pem(path, &r.cert)?;
        KeyPair::from_pem(&r.key).map_err(|e| material_err(path, MaterialError::Key { which: "root", source: e }))?;
        let info = CertInfo::of(&der).map_err(|e| material_err(path, MaterialError::Certificate(e)))?;
        roots.push(Root { pem: r.cert, der, key_pem: Some(r.key), state: r.state, info });
    }
    let signer = signer_from_pem(path, &stored.intermediate.cert, &stored.intermediate.key, &roots, true)?;
    Ok(Material { roots, signer: Arc::new(signer), plugged_in: None })
}

/// Builds the signer from its certificate and key, finding the root it was issued by.
pub(super) fn signer_from_pem(
    path: &Path,
    cert_pem: &str,
    key_pem: &str,
    roots: &[Root],
    keep_key: bool,
) -> Result<Signer, SetupError> {
    use x509_parser::prelude::FromDer;
    let der = parse_cert_pem(path, cert_pem)?;
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| material_err(path, MaterialError::Key { which: "signing", source: e }))?;
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| material_err(path, MaterialError::Certificate(e.into())))?;
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(material_err(path, MaterialError::KeyMismatch));
    }
    let root = roots
        .iter()
        .find(|r| {
            x509_parser::certificate::X509Certificate::from_der(&r.der)
                .map(|(_, root)| x509.verify_signature(Some(root.public_key())).is_ok())
                .unwrap_or(false)
        })
        .or_else(|| roots.iter().find(|r| r.der == der))
        .ok_or_else(|| material_err(path, MaterialError::NoIssuingRoot))?;
    let info = CertInfo::of(&der).map_err(|e| material_err(path, MaterialError::Certificate(e)))?;
    let issuer = Issuer::from_ca_cert_der(&der, key)?;
    let chain = if root.der == der { vec![root.pem.clone()] } else { vec![cert_pem.to_owned(), root.pem.clone()] };
    Ok(Signer {
        issuer,
        cert_pem: cert_pem.to_owned(),
        key_pem: keep_key.then(|| key_pem.to_owned()),
        chain,
        root: root.info.fingerprint.clone(),
        info,
    })
}

/// Istio's plug-in layout: `ca-cert.pem` + `ca-key.pem` sign; `root-cert.pem` holds the trusted
/// roots; `cert-chain.pem` (optional) is the chain from `ca-cert.pem` up to the root.
pub(super) fn load_plugged_in(dir: &Path) -> Result<Material, SetupError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(io_err(&path)).map(|s| (path, s))
    };
    let (cert_path, cert_pem) = read("ca-cert.pem")?;
    let (_, key_pem) = read("ca-key.pem")?;
    let (root_path, roots_pem) = read("root-cert.pem")?;
    let mut roots = Vec::new();
    for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        let der = der.map_err(|e| material_err(&root_path, MaterialError::Pem(e)))?;
        let info = CertInfo::of(&der).map_err(|e| material_err(&root_path, MaterialError::Certificate(e)))?;
        let pem = pem_of(&der);
        roots.push(Root { pem, der, key_pem: None, state: RootState::Active, info });
    }
    if roots.is_empty() {
        return Err(material_err(&root_path, MaterialError::NoCertificate));
    }
    let mut signer = signer_from_pem(&cert_path, &cert_pem, &key_pem, &roots, false)?;
    let chain_path = dir.join("cert-chain.pem");
    match fs::read_to_string(&chain_path) {
        Ok(chain_pem) => {
            let mut chain: Vec<String> = Vec::new();
            for der in CertificateDer::pem_slice_iter(chain_pem.as_bytes()) {
                chain.push(pem_of(&der.map_err(|e| material_err(&chain_path, MaterialError::Pem(e)))?));
            }
            let ca_der = parse_cert_pem(&cert_path, &cert_pem)?;
            if chain.first().map(|c| c.as_str()) != Some(pem_of(&ca_der).as_str()) {
                chain.insert(0, pem_of(&ca_der));
            }
            let root_pem = roots.iter().find(|r| r.info.fingerprint == signer.root).map(|r| r.pem.clone());
            if let Some(root_pem) = root_pem
                && chain.last() != Some(&root_pem)
            {
                chain.push(root_pem);
            }
            signer.chain = chain;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&chain_path)(e)),
    }
    info!(dir = %dir.display(), signer = %signer.info.subject, roots = roots.len(), "using plugged-in CA material");
    Ok(Material { roots, signer: Arc::new(signer), plugged_in: Some(dir.to_owned()) })
}

pub(super) fn pem_of(der: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.as_ref()), config)
}

/// The stored form of self-managed material.
pub(super) fn encode(path: &Path, m: &Material) -> Result<Vec<u8>, SetupError> {
    let stored = Stored {
        version: 1,
        roots: m
            .roots
            .iter()
            .map(|r| StoredRoot { cert: r.pem.clone(), key: r.key_pem.clone().unwrap_or_default(), state: r.state })
            .collect(),
        intermediate: StoredCert { cert: m.signer.cert_pem.clone(), key: m.signer.key_pem.clone().unwrap_or_default() },
    };
    serde_json::to_vec_pretty(&stored).map_err(|e| material_err(path, MaterialError::Json(e)))
}

/// Issues a throwaway leaf with the material and verifies it against the material's own bundle:
/// catches mismatched keys, broken chains and expired signers before anything is served.
pub(super) fn self_check(m: &Material, trust_domain: &str) -> Result<(), SetupError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let id = format!("spiffe://{trust_domain}/ns/self-check/sa/self-check");
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = to_datetime(now - BACKDATE);
    params.not_after = to_datetime(now + Duration::from_secs(60));
    let leaf = params.signed_by(&key, &m.signer.issuer)?;
    let bundle = m.trust_bundle().map_err(|e| SetupError::SelfCheck(SelfCheckError::Bundle(e)))?;
    let intermediates: Vec<CertificateDer<'static>> = m
        .signer
        .chain
        .iter()
        .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().collect::<Vec<_>>())
        .collect();
    let ee = webpki::EndEntityCert::try_from(leaf.der()).map_err(|e| SetupError::SelfCheck(SelfCheckError::Leaf(e)))?;
    let now = rustls_pki_types::UnixTime::now();
    ee.verify_for_usage(
        proto::tls::provider().signature_verification_algorithms.all,
        bundle.anchors(),
        &intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| SetupError::SelfCheck(SelfCheckError::Verify(e)))?;
    Ok(())
}

/// A random tag for CA subject names.
pub(super) fn unique_tag() -> String {
    let mut bytes = [0u8; 6];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    hex(&bytes)
}

/// The fingerprint of the root that signs now.
pub(super) fn active_root(m: &Material) -> String {
    m.roots.iter().find(|r| r.state == RootState::Active).map(|r| r.info.fingerprint.clone()).unwrap_or_default()
}
