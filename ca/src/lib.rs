//! The control plane: certificate authority and discovery server.
//!
//! This crate will own the Citadel-compatible CA (`istio.v1.auth.IstioCertificateService`), the config
//! sources (Kubernetes API or a directory of Kubernetes YAML), the translation of Kubernetes objects
//! into mesh state, the delta xDS server and the admin API (rotation, trust bundle, issued
//! certificates). Nothing is implemented yet; see the project's issues for the order of work.
