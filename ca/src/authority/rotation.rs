//! Rotation, driven by an operator through the admin API: a new intermediate, or a new root in
//! three steps (prepare, activate, retire).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::{info, warn};

use super::material::{Material, Root, RootState, encode, new_intermediate, new_root, self_check, unix};
use super::store::KeyStore;
use super::{AdminError, Authority, KeySource, SetupError};

impl Authority {
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
