//! A directory of Kubernetes YAML as the source of objects (the one-machine mesh).
//!
//! Every `.yaml`/`.yml` file below the directory (hidden files and directories skipped) may hold
//! several documents, or a `List`. The directory is watched (inotify, plus a slow rescan as a
//! safety net); only files whose size, mtime or inode changed are read again.
//!
//! Bad input never costs good state:
//! - a file that is not valid YAML keeps the objects it last yielded;
//! - an invalid object keeps its last valid version from that file, if any;
//! - an object defined twice keeps the definition that was already in force;
//! - kinds the mesh does not read are reported and ignored.
//!
//! Every problem is logged once with its file and reason, and listed by the admin API until fixed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::objects::{ConfigError, Object, ObjectKey, Objects, PodRules, Store, validate};

/// How long to wait after a change notification for more to arrive (editors write in bursts).
const SETTLE: Duration = Duration::from_millis(50);
/// Rescan this often even without notifications.
const RESCAN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: SystemTime,
    ino: u64,
}

#[derive(Debug, Default, Clone)]
struct FileState {
    stamp: Option<Stamp>,
    /// The objects this file currently contributes (last good versions included).
    objects: Vec<(ObjectKey, Object)>,
    errors: Vec<String>,
}

/// Errors starting the directory source.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The directory cannot be read.
    #[error("config directory {path}: {source}")]
    Read {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A scan did not complete (it panicked or was cancelled).
    #[error("scanning config directory {path}: {reason}")]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The directory cannot be watched.
    #[error("watching config directory {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// notify's error.
        source: notify::Error,
    },
}

/// Reads a directory of YAML into a [`Store`].
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    store: Arc<Store>,
    files: BTreeMap<PathBuf, FileState>,
    /// Which file each object came from, to keep the incumbent when a duplicate appears.
    owners: HashMap<ObjectKey, PathBuf>,
    /// Problems already logged, so each is logged once.
    reported: BTreeSet<(String, String)>,
}

pub use proto::yaml_dir::list_yaml;

/// What one YAML file (possibly many `---` documents) yields on its own: its objects, and a message
/// per document or object that was refused. The parser behind the directory source, public for
/// the fuzz target.
pub fn parse_documents(content: &str) -> (Vec<Object>, Vec<String>) {
    let state = parse_file(content, None);
    (state.objects.into_iter().map(|(_, o)| o).collect(), state.errors)
}

/// Parses one file. `previous` supplies last good versions.
fn parse_file(content: &str, previous: Option<&FileState>) -> FileState {
    let mut state = FileState::default();
    let previous_objects: HashMap<&ObjectKey, &Object> =
        previous.map(|p| p.objects.iter().map(|(k, o)| (k, o)).collect()).unwrap_or_default();

    let mut values = Vec::new();
    for (i, document) in serde_norway::Deserializer::from_str(content).enumerate() {
        match serde_norway::Value::deserialize(document) {
            Ok(serde_norway::Value::Null) => {}
            Ok(v) => values.push((i + 1, v)),
            Err(e) => {
                // Not YAML: nothing in this file can be trusted, keep what it gave before.
                state.objects = previous.map(|p| p.objects.clone()).unwrap_or_default();
                state.errors = vec![format!("not valid YAML: {e}; keeping its last good objects")];
                return state;
            }
        }
    }

    let mut seen = BTreeSet::new();
    for (doc, value) in values {
        let json = match serde_json::to_value(&value) {
            Ok(j) => j,
            Err(e) => {
                state.errors.push(format!("document {doc}: cannot be read as an object: {e}"));
                continue;
            }
        };
        for result in Object::from_value(json) {
            let object = match result {
                Ok(o) => o.with_default_namespace(),
                Err(e) => {
                    state.errors.push(format!("document {doc}: {e}"));
                    continue;
                }
            };
            let key = object.key();
            if !seen.insert(key.clone()) {
                state.errors.push(format!("document {doc}: {key} is defined twice in this file; keeping the first"));
                continue;
            }
            match validate(&object, PodRules::Declared) {
                Ok(()) => state.objects.push((key, object)),
                Err(e) => {
                    let kept = previous_objects.get(&key).map(|o| (*o).clone());
                    let note = if kept.is_some() { "; keeping its last valid version" } else { "; skipped" };
                    state.errors.push(format!("document {doc}: {e}{note}"));
                    if let Some(old) = kept {
                        state.objects.push((key, old));
                    }
                }
            }
        }
    }
    state
}

impl DirSource {
    /// A source for `dir`, writing into `store`. Fails if the directory cannot be read.
    pub fn new(dir: impl Into<PathBuf>, store: Arc<Store>) -> Result<Self, DirError> {
        let dir = dir.into();
        std::fs::read_dir(&dir).map_err(|source| DirError::Read { path: dir.clone(), source })?;
        Ok(DirSource { dir, store, files: BTreeMap::new(), owners: HashMap::new(), reported: BTreeSet::new() })
    }

    /// Reads what changed since the last scan and updates the store. Returns whether the objects
    /// changed.
    pub fn rescan(&mut self) -> bool {
        let mut paths = Vec::new();
        if let Err(e) = list_yaml(&self.dir, &mut paths) {
            let message = format!("cannot list the directory: {e}; keeping the current objects");
            self.report(vec![ConfigError { source: self.dir.display().to_string(), message }]);
            return false;
        }
        let mut changed = false;
        let listed: BTreeSet<&PathBuf> = paths.iter().collect();
        let before = self.files.len();
        self.files.retain(|p, _| listed.contains(p));
        changed |= self.files.len() != before;

        for path in &paths {
            let stamp = std::fs::metadata(path).ok().map(|m| Stamp {
                len: m.len(),
                mtime: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ino: m.ino(),
            });
            let previous = self.files.get(path);
            if stamp.is_some() && previous.and_then(|p| p.stamp) == stamp {
                continue;
            }
            let state = match std::fs::read_to_string(path) {
                Ok(content) => FileState { stamp, ..parse_file(&content, previous) },
                Err(e) => FileState {
                    stamp: None,
                    objects: previous.map(|p| p.objects.clone()).unwrap_or_default(),
                    errors: vec![format!("cannot read: {e}; keeping its last good objects")],
                },
            };
            debug!(file = %path.display(), objects = state.objects.len(), "read config file");
            self.files.insert(path.clone(), state);
            changed = true;
        }
        if !changed {
            return false;
        }

        // Merge, resolving duplicates across files in favour of the incumbent.
        let mut errors = Vec::new();
        let mut merged: BTreeMap<ObjectKey, (PathBuf, Object)> = BTreeMap::new();
        for (path, state) in &self.files {
            errors.extend(
                state.errors.iter().map(|m| ConfigError { source: path.display().to_string(), message: m.clone() }),
            );
            for (key, object) in &state.objects {
                match merged.get(key) {
                    None => {
                        merged.insert(key.clone(), (path.clone(), object.clone()));
                    }
                    Some((first, _)) => {
                        let incumbent = self.owners.get(key);
                        let (keep, drop) = if incumbent == Some(path) {
                            (path.clone(), first.clone())
                        } else {
                            (first.clone(), path.clone())
                        };
                        errors.push(ConfigError {
                            source: drop.display().to_string(),
                            message: format!(
                                "{key} is already defined in {}; ignoring this definition",
                                keep.display()
                            ),
                        });
                        if keep == *path {
                            merged.insert(key.clone(), (path.clone(), object.clone()));
                        }
                    }
                }
            }
        }
        self.owners = merged.iter().map(|(k, (p, _))| (k.clone(), p.clone())).collect();
        let mut objects = Objects::default();
        for (_, (_, object)) in merged {
            objects.insert(object);
        }
        let count = objects.len();
        self.store.update(|o| *o = objects);
        self.report(errors);
        info!(dir = %self.dir.display(), files = self.files.len(), objects = count, "config directory loaded");
        true
    }

    fn report(&mut self, errors: Vec<ConfigError>) {
        let current: BTreeSet<(String, String)> =
            errors.iter().map(|e| (e.source.clone(), e.message.clone())).collect();
        for (file, message) in current.difference(&self.reported) {
            warn!(file = %file, "{message}");
        }
        self.reported = current;
        self.store.set_errors(&self.dir.display().to_string(), errors);
    }

    /// Scans, then watches until `stop` resolves.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), DirError> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |_event| {
            // Full channel: a rescan is already due.
            let _ = tx.try_send(());
        })
        .map_err(|source| DirError::Watch { path: self.dir.clone(), source })?;
        notify::Watcher::watch(&mut watcher, &self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| DirError::Watch { path: self.dir.clone(), source })?;

        self.store.expect_sources(1);
        self = scan_blocking(self).await?;
        self.store.source_synced();
        let mut tick = tokio::time::interval(RESCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
            }
            self = scan_blocking(self).await?;
        }
        drop(watcher);
        Ok(())
    }
}

/// Parsing large files is CPU work: keep it off the async workers.
async fn scan_blocking(mut source: DirSource) -> Result<DirSource, DirError> {
    let path = source.dir.clone();
    tokio::task::spawn_blocking(move || {
        source.rescan();
        source
    })
    .await
    .map_err(|e| DirError::Scan { path, reason: e.to_string() })
}
