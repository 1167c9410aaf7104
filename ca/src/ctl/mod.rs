//! `ambientctl`, the operator's everyday commands, in the spirit of `istioctl`:
//!
//! - [`admin`]: the CA's admin API (status, trust bundle, rotation, issued certificates);
//! - [`config`]: the objects that drive the mesh (namespace labels, waypoints), changed in a
//!   cluster through the API server or in the one-machine mesh's YAML directory;
//! - [`waypoint`]: the objects a namespace's waypoint is made of;
//! - [`inspect`]: what a node's ztunnel holds (workloads, certificates, connections).

pub mod admin;
pub mod config;
pub mod inspect;
pub mod waypoint;
