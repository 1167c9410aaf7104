//! Where self-managed signing material is kept: a file in the state directory (one machine), or a
//! Kubernetes Secret (a cluster, where the pod's disk does not outlive it).
//!
//! Both hold the same JSON document. The file is written atomically (temp file, fsync, rename,
//! fsync of the directory), mode 0600. The Secret is created if absent (if another replica
//! created it first, theirs is used) and updated with optimistic concurrency (the
//! resourceVersion last read), so two writers can never silently overwrite each other.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};

/// The key of the document in the Secret's data.
pub const SECRET_KEY: &str = "authority.json";

/// Errors reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// API trouble.
    #[error("Secret {namespace}/{name}: {reason}")]
    Secret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// A place for the material.
pub enum KeyStore {
    /// A file.
    File(PathBuf),
    /// A Secret.
    Secret(Box<SecretStore>),
}

/// A Secret holding the material.
#[derive(Debug)]
pub struct SecretStore {
    /// The API, scoped to the namespace.
    api: kube::Api<Secret>,
    /// Namespace (for messages).
    namespace: String,
    /// Name.
    name: String,
    /// resourceVersion last read or written.
    version: Mutex<Option<String>>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyStore::File(p) => write!(f, "File({})", p.display()),
            KeyStore::Secret(s) => write!(f, "Secret({}/{})", s.namespace, s.name),
        }
    }
}

impl fmt::Display for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyStore::File(p) => write!(f, "{}", p.display()),
            KeyStore::Secret(s) => write!(f, "Secret {}/{}", s.namespace, s.name),
        }
    }
}

impl KeyStore {
    /// A Secret store.
    pub fn secret(client: kube::Client, namespace: &str, name: &str) -> Self {
        KeyStore::Secret(Box::new(SecretStore {
            api: kube::Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version: Mutex::new(None),
        }))
    }

    fn secret_err(&self, reason: impl fmt::Display) -> StoreError {
        match self {
            KeyStore::Secret(s) => {
                StoreError::Secret { namespace: s.namespace.clone(), name: s.name.clone(), reason: reason.to_string() }
            }
            KeyStore::File(path) => {
                StoreError::Io { path: path.clone(), source: std::io::Error::other(reason.to_string()) }
            }
        }
    }

    /// The stored document, if any.
    pub async fn load(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            KeyStore::File(path) => match std::fs::read(path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::Io { path: path.clone(), source }),
            },
            KeyStore::Secret(secret_store) => {
                let SecretStore { api, name, version, .. } = secret_store.as_ref();
                let Some(secret) = api.get_opt(name).await.map_err(|e| self.secret_err(e))? else {
                    return Ok(None);
                };
                *version.lock().unwrap_or_else(|p| p.into_inner()) = secret.metadata.resource_version.clone();
                let data = secret.data.unwrap_or_default();
                let doc = data
                    .get(SECRET_KEY)
                    .ok_or_else(|| self.secret_err(format!("exists but has no {SECRET_KEY:?} key")))?;
                Ok(Some(doc.0.clone()))
            }
        }
    }

    /// Stores the first document. Returns the document actually stored: `bytes`, or, if another
    /// writer got there first, theirs.
    pub async fn create(&self, bytes: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        match self {
            KeyStore::File(_) => {
                self.save(&bytes).await?;
                Ok(bytes)
            }
            KeyStore::Secret(secret_store) => {
                let SecretStore { api, name, version, .. } = secret_store.as_ref();
                let secret = secret_object(name, None, &bytes);
                match api.create(&PostParams::default(), &secret).await {
                    Ok(created) => {
                        *version.lock().unwrap_or_else(|p| p.into_inner()) = created.metadata.resource_version;
                        Ok(bytes)
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        tracing::info!(store = %self, "another replica created the CA material first; using it");
                        self.load().await?.ok_or_else(|| self.secret_err("vanished right after a conflict"))
                    }
                    Err(e) => Err(self.secret_err(e)),
                }
            }
        }
    }

    /// Replaces the document.
    pub async fn save(&self, bytes: &[u8]) -> Result<(), StoreError> {
        match self {
            KeyStore::File(path) => {
                write_private(path, bytes).map_err(|source| StoreError::Io { path: path.clone(), source })
            }
            KeyStore::Secret(secret_store) => {
                let SecretStore { api, name, version, .. } = secret_store.as_ref();
                let current = version.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let secret = secret_object(name, current, bytes);
                let saved = api.replace(name, &PostParams::default(), &secret).await.map_err(|e| match e {
                    kube::Error::Api(s) if s.code == 409 => self
                        .secret_err("changed by someone else since it was read (another CA replica?); not overwritten"),
                    other => self.secret_err(other),
                })?;
                *version.lock().unwrap_or_else(|p| p.into_inner()) = saved.metadata.resource_version;
                Ok(())
            }
        }
    }
}

/// The Secret holding `bytes`; `resource_version` set makes an update conditional on it.
fn secret_object(name: &str, resource_version: Option<String>, bytes: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            resource_version,
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "ambient-mesh".to_owned())].into_iter().collect()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some([(SECRET_KEY.to_owned(), ByteString(bytes.to_vec()))].into_iter().collect()),
        ..Default::default()
    }
}

/// Writes a file readable by its owner only, atomically: temp file, fsync, rename, fsync dir.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
