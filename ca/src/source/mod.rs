//! Where Kubernetes objects come from: a watched directory of YAML ([`dir`]) or the API server
//! ([`kube`]). Both write validated objects into the same [`Store`](crate::objects::Store) and
//! mark it synced once their initial state is loaded.

pub mod dir;
pub mod kube;
