//! The CA's integration tests, one binary: every test file below is a module of it, so the
//! control plane, kube and tonic are compiled and linked once for all of them rather than once
//! per file. Run one file's tests with its module name as the filter:
//! `cargo test -p ca --test integration golden::`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod recording_api;
mod support;

mod crash;
mod ctl;
mod deploy;
mod dir_source;
mod golden;
mod issuance;
mod key_secret;
mod kube_source;
mod root_cert;
mod token_review;
mod xds;
