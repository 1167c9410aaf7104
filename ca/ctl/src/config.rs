//! The objects that drive the mesh, changed where they live: in a cluster through the API server
//! (server-side apply, field manager `ambientctl`), or in the one-machine mesh's YAML directory
//! (the files the `ca` watches).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use serde_json::{Value, json};

/// The name `ambientctl` applies as (server-side apply field manager).
pub const FIELD_MANAGER: &str = "ambientctl";

/// Where the objects live.
#[derive(Clone)]
pub enum Target {
    /// The one-machine mesh's directory of YAML.
    Dir(PathBuf),
    /// A cluster's API server.
    Cluster(kube::Client),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dir(d) => write!(f, "Dir({})", d.display()),
            Target::Cluster(_) => write!(f, "Cluster"),
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The object was changed (or created).
    Changed(String),
    /// It already was as asked.
    Unchanged(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Changed(what) | Outcome::Unchanged(what) => f.write_str(what),
        }
    }
}

impl Target {
    /// Sets (`Some`) or removes (`None`) label `key` on namespace `namespace`. In a cluster the
    /// namespace must exist; in a directory a missing namespace is created.
    pub async fn label_namespace(&self, namespace: &str, key: &str, value: Option<&str>) -> Result<Outcome> {
        let what = match value {
            Some(v) => format!("namespace {namespace}: {key}={v}"),
            None => format!("namespace {namespace}: {key} removed"),
        };
        match self {
            Target::Cluster(client) => {
                let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
                let current = api.get_opt(namespace).await.with_context(|| format!("reading namespace {namespace}"))?;
                let Some(current) = current else { bail!("namespace {namespace} not found") };
                let labels = current.metadata.labels.unwrap_or_default();
                if labels.get(key).map(String::as_str) == value {
                    return Ok(Outcome::Unchanged(what));
                }
                // A merge patch: a null value removes the label, other labels are left alone.
                let patch = json!({"metadata": {"labels": {key: value}}});
                api.patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .with_context(|| format!("labelling namespace {namespace}"))?;
                Ok(Outcome::Changed(what))
            }
            Target::Dir(dir) => {
                let found = find_in_dir(dir, "Namespace", None, namespace)?;
                let (path, mut docs, index) = match found {
                    Some(f) => f,
                    None if value.is_none() => return Ok(Outcome::Unchanged(what)),
                    None => {
                        let doc = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
                        (dir.join(format!("namespace-{namespace}.yaml")), vec![doc], 0)
                    }
                };
                let doc = &mut docs[index];
                if doc["metadata"]["labels"][key].as_str() == value {
                    return Ok(Outcome::Unchanged(what));
                }
                let metadata = doc["metadata"].as_object_mut().context("namespace without metadata")?;
                let labels = metadata.entry("labels").or_insert_with(|| json!({}));
                let labels = labels.as_object_mut().context("namespace labels are not a map")?;
                match value {
                    Some(v) => labels.insert(key.to_owned(), json!(v)),
                    None => labels.remove(key),
                };
                if labels.is_empty() {
                    metadata.remove("labels");
                }
                write_docs(&path, &docs)?;
                Ok(Outcome::Changed(format!("{what} ({})", path.display())))
            }
        }
    }

    /// Creates or updates `objects`; in a directory they go together into `<file>.yaml`.
    pub async fn apply(&self, objects: &[Value], file: &str) -> Result<Vec<Outcome>> {
        match self {
            Target::Cluster(client) => {
                let mut out = Vec::new();
                for object in objects {
                    let (api, name) = dynamic_api(client, object)?;
                    let params = PatchParams::apply(FIELD_MANAGER).force();
                    api.patch(&name, &params, &Patch::Apply(object))
                        .await
                        .with_context(|| format!("applying {}", describe(object)))?;
                    out.push(Outcome::Changed(format!("{} applied", describe(object))));
                }
                Ok(out)
            }
            Target::Dir(dir) => {
                let path = dir.join(format!("{file}.yaml"));
                let before = std::fs::read_to_string(&path).ok();
                write_docs(&path, objects)?;
                let now = std::fs::read_to_string(&path).ok();
                let verb = if before == now { "unchanged" } else { "written" };
                let changed = |o: &Value| format!("{} {verb} ({})", describe(o), path.display());
                Ok(objects
                    .iter()
                    .map(|o| if before == now { Outcome::Unchanged(changed(o)) } else { Outcome::Changed(changed(o)) })
                    .collect())
            }
        }
    }

    /// Deletes `objects` (in a directory: the file [`Target::apply`] wrote them to).
    pub async fn delete(&self, objects: &[Value], file: &str) -> Result<Vec<Outcome>> {
        match self {
            Target::Cluster(client) => {
                let mut out = Vec::new();
                for object in objects {
                    let (api, name) = dynamic_api(client, object)?;
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => out.push(Outcome::Changed(format!("{} deleted", describe(object)))),
                        Err(kube::Error::Api(e)) if e.code == 404 => {
                            out.push(Outcome::Unchanged(format!("{} not found", describe(object))))
                        }
                        Err(e) => return Err(e).with_context(|| format!("deleting {}", describe(object))),
                    }
                }
                Ok(out)
            }
            Target::Dir(dir) => {
                let path = dir.join(format!("{file}.yaml"));
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(vec![Outcome::Changed(format!("{} removed", path.display()))]),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Ok(vec![Outcome::Unchanged(format!("{} not found", path.display()))])
                    }
                    Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
                }
            }
        }
    }
}

/// `Kind namespace/name`.
fn describe(object: &Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// The API for `object`'s kind (in its namespace) and its name.
fn dynamic_api(client: &kube::Client, object: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = object["apiVersion"].as_str().context("object without apiVersion")?;
    let kind = object["kind"].as_str().context("object without kind")?;
    let name = object["metadata"]["name"].as_str().context("object without a name")?.to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    Ok((api, name))
}

/// The file, its documents and the index of the object `kind` `namespace/name` in the YAML
/// directory, if any file holds it.
fn find_in_dir(
    dir: &Path,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<(PathBuf, Vec<Value>, usize)>> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let mut files = Vec::new();
    proto::yaml_dir::list_yaml(dir, &mut files).with_context(|| format!("listing {}", dir.display()))?;
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let docs = read_docs(&text).with_context(|| format!("{}: not valid YAML", path.display()))?;
        let hit = docs.iter().position(|d| {
            d["kind"] == kind && d["metadata"]["name"] == name && d["metadata"]["namespace"].as_str() == namespace
        });
        if let Some(index) = hit {
            return Ok(Some((path, docs, index)));
        }
    }
    Ok(None)
}

/// The documents of a multi-document YAML text, as JSON values (empty documents skipped).
pub fn read_docs(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(serde_json::to_value(value)?);
        }
    }
    Ok(docs)
}

/// Renders documents as multi-document YAML.
pub fn to_yaml(docs: &[Value]) -> Result<String> {
    let mut out = String::new();
    for doc in docs {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_norway::to_string(doc)?);
    }
    Ok(out)
}

/// Writes `docs` to `path` at once (a hidden temporary file renamed over it: the CA's watcher
/// never reads half a file).
fn write_docs(path: &Path, docs: &[Value]) -> Result<()> {
    let text = to_yaml(docs)?;
    let name = path.file_name().and_then(|n| n.to_str()).context("bad file name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
