//! The certificate authority: signing material, issuance and rotation.
//!
//! Signing material is either **self-managed** (a root and an intermediate generated on first start
//! and kept in `<state-dir>/authority.json`, mode 0600, rewritten atomically) or **plugged in** from
//! operator files in Istio's `cacerts` layout (read-only: rotation is done by replacing the files).
//!
//! Workload certificates are signed by the intermediate; the chain returned is leaf → intermediate
//! → root. Rotation keeps every live connection working:
//! - **intermediate**: a new intermediate under the same root; old leaves still chain to the root.
//! - **root**, in three steps an operator drives through the admin API:
//!   1. *prepare*: a new root joins the trust bundle (pushed to every proxy); signing is unchanged;
//!   2. *activate*: a new intermediate under the new root signs from now on; the old root stays
//!      trusted (state *retiring*);
//!   3. *retire*: the old root leaves the bundle, refused while the issuance log shows
//!      certificates under it that are still valid (unless forced).
//!
//! Every issued certificate is appended to the [`log::IssuanceLog`] before it is returned.

pub mod csr;
pub mod log;
pub mod store;

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use proto::SpiffeId;
use proto::tls::{TrustBundle, WorkloadCert};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

use self::csr::CheckedCsr;
use self::log::{IssuanceLog, LogError, Record};
use self::store::KeyStore;

/// Clock skew tolerated: certificates start this long before they are issued.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Where the signing material comes from.
#[derive(Clone)]
pub enum KeySource {
    /// Generated on first start and kept in `<state-dir>/authority.json`.
    SelfManaged,
    /// Generated on first start and kept in a Kubernetes Secret (a cluster).
    SelfManagedInSecret {
        /// API client.
        client: kube::Client,
        /// Namespace of the Secret (the CA's own).
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Istio `cacerts` files in this directory (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`).
    PlugIn(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::SelfManaged => f.write_str("SelfManaged"),
            KeySource::SelfManagedInSecret { namespace, name, .. } => write!(f, "Secret({namespace}/{name})"),
            KeySource::PlugIn(p) => write!(f, "PlugIn({})", p.display()),
        }
    }
}

/// CA settings.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    /// Trust domain of the identities signed.
    pub trust_domain: String,
    /// Directory for the self-managed keys and the issuance log (created, mode 0700).
    pub state_dir: PathBuf,
    /// Signing material.
    pub keys: KeySource,
    /// Lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime granted; longer requests are refused.
    pub max_ttl: Duration,
    /// Lifetime of generated roots.
    pub root_ttl: Duration,
    /// Lifetime of generated intermediates.
    pub intermediate_ttl: Duration,
}

impl AuthorityConfig {
    /// Defaults: 24 h leaves (90 d max), 10 y roots, 1 y intermediates, self-managed keys.
    pub fn new(trust_domain: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        AuthorityConfig {
            trust_domain: trust_domain.into(),
            state_dir: state_dir.into(),
            keys: KeySource::SelfManaged,
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            intermediate_ttl: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// Errors loading or creating the signing material.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Stored or plugged-in material is unusable.
    #[error("{path}: {reason}")]
    Material {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generating keys or certificates failed.
    #[error("generating CA material: {0}")]
    Crypto(#[from] rcgen::Error),
    /// Reading or writing the stored material.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The issuance log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The material does not produce certificates that verify.
    #[error("self-check failed: a test certificate did not verify against the trust bundle: {0}")]
    SelfCheck(String),
}

/// Why a signing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Requested lifetime out of range.
    #[error("requested lifetime {requested}s is over the maximum of {max}s")]
    TtlTooLong {
        /// Asked.
        requested: i64,
        /// Allowed.
        max: u64,
    },
    /// Negative lifetime.
    #[error("requested lifetime {0}s is negative")]
    TtlNegative(i64),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Crypto(#[from] rcgen::Error),
    /// Could not record the issuance: nothing is handed out.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Why an admin operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Plugged-in material is managed by the operator's files.
    #[error("the signing material is plugged in from {0}: rotate by replacing those files")]
    PluggedIn(PathBuf),
    /// The step does not follow from the current state.
    #[error("{0}")]
    WrongStep(String),
    /// The old root still backs valid certificates.
    #[error(
        "{count} certificate(s) issued under the retiring root {root} are still valid (the last until {until}); \
         retire after that, or force it (they stop being accepted at once)"
    )]
    RootInUse {
        /// How many.
        count: u64,
        /// Fingerprint.
        root: String,
        /// Unix seconds.
        until: i64,
    },
    /// Generating or saving.
    #[error(transparent)]
    Setup(#[from] SetupError),
}

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
    fn of(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| e.to_string())?;
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

fn hex(bytes: &[u8]) -> String {
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
    der: CertificateDer<'static>,
    /// PEM private key (self-managed roots only).
    key_pem: Option<String>,
    /// Rotation state.
    pub state: RootState,
    /// Facts.
    pub info: CertInfo,
}

/// The intermediate that signs workload certificates.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Its PEM (persisted).
    cert_pem: String,
    /// Its key's PEM (persisted; `None` for plugged-in material, which is never rewritten).
    key_pem: Option<String>,
    /// The chain appended to every leaf: intermediates → root, PEM.
    chain: Vec<String>,
    /// Fingerprint of the root it leads to.
    root: String,
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
    version: u32,
    roots: Vec<StoredRoot>,
    intermediate: StoredCert,
}

#[derive(Serialize, Deserialize)]
struct StoredRoot {
    cert: String,
    key: String,
    state: RootState,
}

#[derive(Serialize, Deserialize)]
struct StoredCert {
    cert: String,
    key: String,
}

/// One issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf → intermediates → root, PEM.
    pub chain: Vec<String>,
    /// The log record.
    pub record: Record,
}

/// A certificate issued for a key generated by the CA itself.
#[derive(Debug, Clone)]
pub struct LocalCert {
    /// Leaf → intermediates → root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key, PKCS#8 PEM.
    pub key_pem: String,
}

impl LocalCert {
    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(pem_of).collect()
    }

    /// As a TLS credential.
    pub fn workload_cert(&self) -> Result<WorkloadCert, proto::tls::TlsError> {
        WorkloadCert::from_pem(self.chain_pem().as_bytes(), self.key_pem.as_bytes())
    }
}

/// Who asked, for the log.
#[derive(Debug, Clone)]
pub struct Requester {
    /// The authenticated caller.
    pub caller: String,
    /// The node the caller asked for a pod of (impersonation).
    pub node: Option<String>,
}

/// The certificate authority.
pub struct Authority {
    config: AuthorityConfig,
    /// Where self-managed material lives (`None`: plugged in).
    store: Option<KeyStore>,
    material: ArcSwap<Material>,
    /// Serializes rotations (signing never waits on it).
    admin: Mutex<()>,
    log: IssuanceLog,
    bundle: watch::Sender<Arc<Vec<String>>>,
    /// Bumped on every change of the material (any rotation step).
    changes: watch::Sender<u64>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority").field("config", &self.config).field("material", &self.material.load()).finish()
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn to_datetime(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix(t)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    // Positive, and no leading zero byte to strip.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError + '_ {
    move |source| SetupError::Io { path: path.to_owned(), source }
}

fn material_err(path: &Path, reason: impl fmt::Display) -> SetupError {
    SetupError::Material { path: path.to_owned(), reason: reason.to_string() }
}

impl Authority {
    /// Loads the signing material (creating it on first start), opens the issuance log and
    /// checks that a test certificate verifies.
    pub async fn open(config: AuthorityConfig) -> Result<Arc<Self>, SetupError> {
        let dir = &config.state_dir;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        let store = match &config.keys {
            KeySource::PlugIn(_) => None,
            KeySource::SelfManaged => Some(KeyStore::File(dir.join("authority.json"))),
            KeySource::SelfManagedInSecret { client, namespace, name } => {
                Some(KeyStore::secret(client.clone(), namespace, name))
            }
        };
        let material = match (&config.keys, &store) {
            (KeySource::PlugIn(dir), _) => load_plugged_in(dir)?,
            (_, Some(store)) => {
                let where_ = PathBuf::from(store.to_string());
                match store.load().await? {
                    Some(bytes) => {
                        let m = load_stored(&where_, &bytes)?;
                        info!(%store, root = %active_root(&m), "loaded CA signing material");
                        m
                    }
                    None => {
                        let fresh = encode(&where_, &generate_initial(&config)?)?;
                        // Another replica may have created it meanwhile: the stored one wins.
                        let stored = store.create(fresh).await?;
                        let m = load_stored(&where_, &stored)?;
                        info!(%store, root = %active_root(&m), "created a new self-signed root and intermediate");
                        m
                    }
                }
            }
            (_, None) => return Err(SetupError::SelfCheck("no key store".into())),
        };
        let log_path = dir.join("issued.jsonl");
        let (log, recovery) = IssuanceLog::open(&log_path, unix(SystemTime::now()))?;
        info!(path = %log_path.display(), records = recovery.records, truncated_bytes = recovery.truncated_bytes, "issuance log open");
        self_check(&material, &config.trust_domain)?;
        let (bundle, _) = watch::channel(Arc::new(material.bundle_pem()));
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Authority {
            config,
            store,
            material: ArcSwap::from_pointee(material),
            admin: Mutex::new(()),
            log,
            bundle,
            changes,
        }))
    }

    /// The settings.
    pub fn config(&self) -> &AuthorityConfig {
        &self.config
    }

    /// The current material.
    pub fn material(&self) -> Arc<Material> {
        self.material.load_full()
    }

    /// The trust bundle (PEM roots), updated on every change.
    pub fn bundle(&self) -> watch::Receiver<Arc<Vec<String>>> {
        self.bundle.subscribe()
    }

    /// A counter bumped on every rotation step (new signer or new bundle).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The issuance log.
    pub fn log(&self) -> &IssuanceLog {
        &self.log
    }

    /// The lifetime to grant for a requested `validity_duration` (seconds; 0 = default).
    pub fn lifetime(&self, requested_secs: i64) -> Result<Duration, SignError> {
        match requested_secs {
            0 => Ok(self.config.default_ttl),
            s if s < 0 => Err(SignError::TtlNegative(s)),
            s if s as u64 > self.config.max_ttl.as_secs() => {
                Err(SignError::TtlTooLong { requested: s, max: self.config.max_ttl.as_secs() })
            }
            s => Ok(Duration::from_secs(s as u64)),
        }
    }

    /// Signs a checked request for its identity, logs it, and returns the chain.
    pub async fn issue(&self, csr: &CheckedCsr, ttl: Duration, by: Requester) -> Result<Issued, SignError> {
        let (cert, record, signer) = self.sign_leaf(&csr.identity, &[], &csr.public_key, ttl, by).await?;
        let mut chain = Vec::with_capacity(1 + signer.chain.len());
        chain.push(cert.pem());
        chain.extend(signer.chain.iter().cloned());
        Ok(Issued { chain, record })
    }

    /// Issues a certificate for a key generated here (the CA's own serving certificate, the local
    /// admin credential). `names` are extra DNS names or IP addresses in the SAN.
    pub async fn issue_local(
        &self,
        identity: &SpiffeId,
        names: &[String],
        ttl: Duration,
    ) -> Result<LocalCert, SignError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let by = Requester { caller: "ca (its own key)".into(), node: None };
        let (cert, _, signer) = self.sign_leaf(identity, names, &key, ttl, by).await?;
        let mut chain = vec![cert.der().clone()];
        for pem in &signer.chain {
            chain.extend(CertificateDer::pem_slice_iter(pem.as_bytes()).flatten());
        }
        Ok(LocalCert { chain, key_pem: key.serialize_pem() })
    }

    /// Signs an X.509-SVID for `identity` (+ `names`, DNS names or IPs) over `public_key`, and
    /// records it in the issuance log before returning it.
    async fn sign_leaf(
        &self,
        identity: &SpiffeId,
        names: &[String],
        public_key: &impl PublicKeyData,
        ttl: Duration,
        by: Requester,
    ) -> Result<(rcgen::Certificate, Record, Arc<Signer>), SignError> {
        let signer = self.material.load().signer.clone();
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        // Never past the signer's own end: the chain would not verify.
        let not_after = unix(now + ttl).min(signer.info.not_after);
        let serial = random_serial();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
        for name in names {
            params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_datetime(not_before);
        params.not_after =
            time::OffsetDateTime::from_unix_timestamp(not_after).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(public_key, &signer.issuer)?;

        let record = Record {
            serial: hex(&serial.to_bytes()),
            identity: identity.to_string(),
            node: by.node,
            requested_by: by.caller,
            not_before: unix(not_before),
            not_after,
            root: signer.root.clone(),
        };
        self.log.append(record.clone()).await?;
        Ok((cert, record, signer))
    }

    fn self_managed(&self) -> Result<&KeyStore, AdminError> {
        match (&self.store, &self.config.keys) {
            (Some(store), _) => Ok(store),
            (None, KeySource::PlugIn(dir)) => Err(AdminError::PluggedIn(dir.clone())),
            (None, _) => Err(AdminError::WrongStep("no key store".into())),
        }
    }

    /// Checks, persists, then publishes new material (in that order: what is served is on disk).
    async fn commit(&self, store: &KeyStore, material: Material) -> Result<Arc<Material>, AdminError> {
        self_check(&material, &self.config.trust_domain)?;
        let bytes = encode(&PathBuf::from(store.to_string()), &material)?;
        store.save(&bytes).await.map_err(SetupError::from)?;
        let material = Arc::new(material);
        self.material.store(material.clone());
        self.bundle.send_if_modified(|b| {
            let new = material.bundle_pem();
            let changed = **b != new;
            *b = Arc::new(new);
            changed
        });
        self.changes.send_modify(|n| *n += 1);
        Ok(material)
    }

    /// Replaces the intermediate with a new one under the active root.
    pub async fn rotate_intermediate(&self) -> Result<Arc<Material>, AdminError> {
        let store = self.self_managed()?;
        let _guard = self.admin.lock().await;
        let current = self.material();
        let root = current
            .roots
            .iter()
            .find(|r| r.state == RootState::Active)
            .ok_or_else(|| AdminError::WrongStep("no active root".into()))?;
        let signer = new_intermediate(&self.config, root)?;
        info!(old = %current.signer.info.fingerprint, new = %signer.info.fingerprint, "rotated the intermediate");
        self.commit(store, Material { roots: current.roots.clone(), signer: Arc::new(signer), plugged_in: None }).await
    }

    /// Root rotation step 1: a new root joins the trust bundle.
    pub async fn prepare_root(&self) -> Result<Arc<Material>, AdminError> {
        let store = self.self_managed()?;
        let _guard = self.admin.lock().await;
        let current = self.material();
        if let Some(r) = current.roots.iter().find(|r| r.state != RootState::Active) {
            return Err(AdminError::WrongStep(format!(
                "a root rotation is already under way (root {} is {:?}); finish it first",
                r.info.fingerprint, r.state
            )));
        }
        let root = new_root(&self.config, RootState::Pending)?;
        info!(root = %root.info.fingerprint, "root rotation: new root added to the trust bundle");
        let mut roots = current.roots.clone();
        roots.push(root);
        self.commit(store, Material { roots, signer: current.signer.clone(), plugged_in: None }).await
    }

    /// Root rotation step 2: sign under the prepared root.
    pub async fn activate_root(&self) -> Result<Arc<Material>, AdminError> {
        let store = self.self_managed()?;
        let _guard = self.admin.lock().await;
        let current = self.material();
        let Some(pending) = current.roots.iter().find(|r| r.state == RootState::Pending) else {
            return Err(AdminError::WrongStep("no prepared root to activate: run the prepare step first".into()));
        };
        let signer = new_intermediate(&self.config, pending)?;
        let roots = current
            .roots
            .iter()
            .map(|r| Root {
                state: match r.state {
                    RootState::Pending => RootState::Active,
                    RootState::Active | RootState::Retiring => RootState::Retiring,
                },
                ..r.clone()
            })
            .collect();
        info!(root = %pending.info.fingerprint, intermediate = %signer.info.fingerprint, "root rotation: signing under the new root");
        self.commit(store, Material { roots, signer: Arc::new(signer), plugged_in: None }).await
    }

    /// Root rotation step 3: the old root leaves the trust bundle.
    pub async fn retire_root(&self, force: bool) -> Result<Arc<Material>, AdminError> {
        let store = self.self_managed()?;
        let _guard = self.admin.lock().await;
        let current = self.material();
        let retiring: Vec<&Root> = current.roots.iter().filter(|r| r.state == RootState::Retiring).collect();
        if retiring.is_empty() {
            return Err(AdminError::WrongStep("no retiring root: run the prepare and activate steps first".into()));
        }
        let now = unix(SystemTime::now());
        for r in &retiring {
            let (count, until) = self.log.unexpired_under(&r.info.fingerprint, now);
            if count > 0 {
                if !force {
                    return Err(AdminError::RootInUse {
                        count,
                        root: r.info.fingerprint.clone(),
                        until: until.unwrap_or(now),
                    });
                }
                warn!(root = %r.info.fingerprint, count, "retiring a root that still backs valid certificates (forced)");
            }
        }
        let roots = current.roots.iter().filter(|r| r.state != RootState::Retiring).cloned().collect();
        info!(retired = ?retiring.iter().map(|r| &r.info.fingerprint).collect::<Vec<_>>(), "root rotation: old root retired");
        self.commit(store, Material { roots, signer: current.signer.clone(), plugged_in: None }).await
    }
}

fn active_root(m: &Material) -> String {
    m.roots.iter().find(|r| r.state == RootState::Active).map(|r| r.info.fingerprint.clone()).unwrap_or_default()
}

/// A random tag for CA subject names.
fn unique_tag() -> String {
    let mut bytes = [0u8; 6];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    hex(&bytes)
}

fn distinguished_name(trust_domain: &str, cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, cn);
    dn
}

fn new_root(config: &AuthorityConfig, state: RootState) -> Result<Root, SetupError> {
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
    let info = CertInfo::of(&der).map_err(rcgen::Error::X509)?;
    Ok(Root { pem: cert.pem(), der, key_pem: Some(key.serialize_pem()), state, info })
}

fn new_intermediate(config: &AuthorityConfig, root: &Root) -> Result<Signer, SetupError> {
    let root_key_pem = root.key_pem.as_deref().ok_or_else(|| rcgen::Error::X509("root has no key".into()))?;
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
    let info = CertInfo::of(cert.der()).map_err(rcgen::Error::X509)?;
    Ok(Signer {
        issuer,
        cert_pem: cert_pem.clone(),
        key_pem: Some(key_pem),
        chain: vec![cert_pem, root.pem.clone()],
        root: root.info.fingerprint.clone(),
        info,
    })
}

fn generate_initial(config: &AuthorityConfig) -> Result<Material, SetupError> {
    let root = new_root(config, RootState::Active)?;
    let signer = new_intermediate(config, &root)?;
    Ok(Material { roots: vec![root], signer: Arc::new(signer), plugged_in: None })
}

fn parse_cert_pem(path: &Path, pem: &str) -> Result<CertificateDer<'static>, SetupError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| material_err(path, format!("bad certificate PEM: {e}")))
}

fn load_stored(path: &Path, bytes: &[u8]) -> Result<Material, SetupError> {
    let stored: Stored = serde_json::from_slice(bytes).map_err(|e| material_err(path, e))?;
    if stored.version != 1 {
        return Err(material_err(path, format!("unknown format version {}", stored.version)));
    }
    let mut roots = Vec::new();
    for r in stored.roots {
        let der = parse_cert_pem(path, &r.cert)?;
        KeyPair::from_pem(&r.key).map_err(|e| material_err(path, format!("bad root key: {e}")))?;
        let info = CertInfo::of(&der).map_err(|e| material_err(path, e))?;
        roots.push(Root { pem: r.cert, der, key_pem: Some(r.key), state: r.state, info });
    }
    let signer = signer_from_pem(path, &stored.intermediate.cert, &stored.intermediate.key, &roots, true)?;
    Ok(Material { roots, signer: Arc::new(signer), plugged_in: None })
}

/// Builds the signer from its certificate and key, finding the root it was issued by.
fn signer_from_pem(
    path: &Path,
    cert_pem: &str,
    key_pem: &str,
    roots: &[Root],
    keep_key: bool,
) -> Result<Signer, SetupError> {
    use x509_parser::prelude::FromDer;
    let der = parse_cert_pem(path, cert_pem)?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| material_err(path, format!("bad signing key: {e}")))?;
    let (_, x509) = x509_parser::certificate::X509Certificate::from_der(&der).map_err(|e| material_err(path, e))?;
    if x509.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(material_err(path, "the signing key does not match the signing certificate"));
    }
    let root = roots
        .iter()
        .find(|r| {
            x509_parser::certificate::X509Certificate::from_der(&r.der)
                .map(|(_, root)| x509.verify_signature(Some(root.public_key())).is_ok())
                .unwrap_or(false)
        })
        .or_else(|| roots.iter().find(|r| r.der == der))
        .ok_or_else(|| material_err(path, "the signing certificate was not issued by any trusted root"))?;
    let info = CertInfo::of(&der).map_err(|e| material_err(path, e))?;
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
fn load_plugged_in(dir: &Path) -> Result<Material, SetupError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(io_err(&path)).map(|s| (path, s))
    };
    let (cert_path, cert_pem) = read("ca-cert.pem")?;
    let (_, key_pem) = read("ca-key.pem")?;
    let (root_path, roots_pem) = read("root-cert.pem")?;
    let mut roots = Vec::new();
    for der in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        let der = der.map_err(|e| material_err(&root_path, e))?;
        let info = CertInfo::of(&der).map_err(|e| material_err(&root_path, e))?;
        let pem = pem_of(&der);
        roots.push(Root { pem, der, key_pem: None, state: RootState::Active, info });
    }
    if roots.is_empty() {
        return Err(material_err(&root_path, "no certificate"));
    }
    let mut signer = signer_from_pem(&cert_path, &cert_pem, &key_pem, &roots, false)?;
    let chain_path = dir.join("cert-chain.pem");
    match fs::read_to_string(&chain_path) {
        Ok(chain_pem) => {
            let mut chain: Vec<String> = Vec::new();
            for der in CertificateDer::pem_slice_iter(chain_pem.as_bytes()) {
                chain.push(pem_of(&der.map_err(|e| material_err(&chain_path, e))?));
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

fn pem_of(der: &CertificateDer<'_>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.as_ref()), config)
}

/// The stored form of self-managed material.
fn encode(path: &Path, m: &Material) -> Result<Vec<u8>, SetupError> {
    let stored = Stored {
        version: 1,
        roots: m
            .roots
            .iter()
            .map(|r| StoredRoot { cert: r.pem.clone(), key: r.key_pem.clone().unwrap_or_default(), state: r.state })
            .collect(),
        intermediate: StoredCert { cert: m.signer.cert_pem.clone(), key: m.signer.key_pem.clone().unwrap_or_default() },
    };
    serde_json::to_vec_pretty(&stored).map_err(|e| material_err(path, e))
}

/// Issues a throwaway leaf with the material and verifies it against the material's own bundle:
/// catches mismatched keys, broken chains and expired signers before anything is served.
fn self_check(m: &Material, trust_domain: &str) -> Result<(), SetupError> {
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
    let bundle = m.trust_bundle().map_err(|e| SetupError::SelfCheck(e.to_string()))?;
    let intermediates: Vec<CertificateDer<'static>> = m
        .signer
        .chain
        .iter()
        .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().collect::<Vec<_>>())
        .collect();
    let ee = webpki::EndEntityCert::try_from(leaf.der()).map_err(|e| SetupError::SelfCheck(e.to_string()))?;
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
    .map_err(|e| SetupError::SelfCheck(e.to_string()))?;
    Ok(())
}
