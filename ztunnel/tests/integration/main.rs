//! ztunnel's integration tests, one binary: every test file below is a module of it, so the
//! in-process control plane and ztunnel are compiled and linked once for all of them rather than
//! once per file. Run one file's tests with its module name as the filter:
//! `cargo test -p ztunnel --test integration inbound::`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod certs;
mod handoff;
mod inbound;
mod node_agent;
mod xds;
mod zds;
