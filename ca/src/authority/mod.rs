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
//!
//! Here: the configuration, the errors and the [`Authority`] that holds the material in force.
//! `material` generates, loads, checks and stores keys and certificates; `issuance` signs
//! workload certificates; `rotation` carries out the operator's steps; [`csr`] checks requests,
//! [`log`] records what was issued, [`store`] keeps self-managed material.

pub mod csr;
mod issuance;
pub mod log;
mod material;
mod rotation;
pub mod store;

pub use self::issuance::{Issued, LocalCert, Requester};
pub use self::material::{CertInfo, Material, Root, RootState, Signer, fingerprint};

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, watch};
use tracing::info;

use self::log::{IssuanceLog, LogError};
use self::material::{active_root, encode, generate_initial, io_err, load_plugged_in, load_stored, self_check, unix};
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
    #[error("{path}: unusable CA material")]
    Material {
        /// The file.
        path: PathBuf,
        /// Why.
        source: MaterialError,
    },
    /// Generating keys or certificates failed.
    #[error("generating CA material: {0}")]
    Crypto(#[from] rcgen::Error),
    /// A new intermediate was asked of a root whose key this CA does not hold (plugged-in roots).
    #[error("root {0} has no private key here; it cannot sign an intermediate")]
    NoRootKey(String),
    /// A certificate just generated does not read back as X.509 (a bug in the generator).
    #[error("a certificate just generated cannot be read back")]
    Generated(#[source] x509_parser::error::X509Error),
    /// Reading or writing the stored material.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The issuance log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The material does not produce certificates that verify.
    #[error("self-check failed: a test certificate did not verify against the trust bundle")]
    SelfCheck(#[source] SelfCheckError),
}

/// What is wrong with stored or plugged-in CA material.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A certificate's PEM does not decode.
    #[error("bad certificate PEM")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// A certificate is not valid X.509.
    #[error("bad certificate")]
    Certificate(#[source] x509_parser::error::X509Error),
    /// A key does not parse.
    #[error("bad {which} key")]
    Key {
        /// Which key (root, signing).
        which: &'static str,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// The stored JSON does not (de)serialize.
    #[error("bad stored material")]
    Json(#[source] serde_json::Error),
    /// A format version this build does not know.
    #[error("unknown format version {0}")]
    Version(u32),
    /// The signing key is not the signing certificate's.
    #[error("the signing key does not match the signing certificate")]
    KeyMismatch,
    /// No trusted root issued the signing certificate.
    #[error("the signing certificate was not issued by any trusted root")]
    NoIssuingRoot,
    /// The roots file holds no certificate.
    #[error("no certificate")]
    NoCertificate,
}

/// Which part of the start-up self-check failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfCheckError {
    /// The trust bundle cannot be built from the roots.
    #[error("the trust bundle is unusable")]
    Bundle(#[source] proto::tls::TlsError),
    /// The test certificate is not one webpki reads.
    #[error("the test certificate cannot be read")]
    Leaf(#[source] webpki::Error),
    /// The chain does not verify.
    #[error("the chain does not verify")]
    Verify(#[source] webpki::Error),
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

/// The material in `store`; on first start, a new root and intermediate, stored (if another
/// replica stored its own meanwhile, that one wins).
async fn load_or_create(store: &KeyStore, config: &AuthorityConfig) -> Result<Material, SetupError> {
    let where_ = PathBuf::from(store.to_string());
    if let Some(bytes) = store.load().await? {
        let m = load_stored(&where_, &bytes)?;
        info!(%store, root = %active_root(&m), "loaded CA signing material");
        return Ok(m);
    }
    let fresh = encode(&where_, &generate_initial(config)?)?;
    let stored = store.create(fresh).await?;
    let m = load_stored(&where_, &stored)?;
    info!(%store, root = %active_root(&m), "created a new self-signed root and intermediate");
    Ok(m)
}

impl Authority {
    /// Loads the signing material (creating it on first start), opens the issuance log and
    /// checks that a test certificate verifies.
    pub async fn open(config: AuthorityConfig) -> Result<Arc<Self>, SetupError> {
        let dir = &config.state_dir;
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        let (store, material) = match &config.keys {
            KeySource::PlugIn(dir) => (None, load_plugged_in(dir)?),
            KeySource::SelfManaged => {
                let store = KeyStore::File(dir.join("authority.json"));
                let material = load_or_create(&store, &config).await?;
                (Some(store), material)
            }
            KeySource::SelfManagedInSecret { client, namespace, name } => {
                let store = KeyStore::secret(client.clone(), namespace, name);
                let material = load_or_create(&store, &config).await?;
                (Some(store), material)
            }
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
}
