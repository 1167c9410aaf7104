//! Contracts shared by every part of the mesh.
//!
//! Layout:
//! - [`identity`]: SPIFFE IDs (`spiffe://<td>/ns/<ns>/sa/<sa>`), parsed strictly.
//! - [`tls`]: rustls configurations for HBONE mTLS, swappable workload certificates and trust bundles.
//! - [`hbone`]: the HBONE tunnel (HTTP/2 `CONNECT` over TLS 1.3): server, pooled client, and the
//!   bidirectional copy between a TCP stream and a tunnel stream.
//! - [`drain`]: graceful shutdown shared by every listener.
//! - [`control`]: TLS gRPC channels to the control plane (CA, xDS, admin).
//! - [`certs`]: certificates from the CA for the identities a proxy serves, renewed at half-life.
//! - [`xds`]: the delta ADS client loop (subscribe, apply, ACK/NACK, reconnect with backoff).
//! - [`api`]: generated protobuf types and gRPC stubs (CA, delta xDS, workload, authorization, ZDS).
//!
//! - [`metrics`]: label sets hashed once (the proxies' per-connection and per-request families),
//!   and the count of log lines dropped, which every binary exports.
//! - [`alloc`]: the proxies' allocator (jemalloc and its options), [`proxy_allocator!`].
//! - [`rbac`], [`route`]: ztunnel's L4 decisions (authorization; where a connection goes), pure
//!   functions of the mesh state, here so the CA explains a connection with the very code that
//!   decides it.
//!
//! Otherwise no component logic lives here: ztunnel, waypoint and ca build on these pieces.

pub mod alloc;
pub mod api;
pub mod certs;
pub mod control;
pub mod drain;
pub mod duration;
pub mod endpoint;
pub mod hbone;
pub mod host;
pub mod identity;
pub mod labels;
pub mod lifecycle;
pub mod metrics;
pub mod rbac;
pub mod route;
pub mod state;
pub mod tls;
pub mod xds;
pub mod yaml_dir;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use identity::SpiffeId;

/// `e` and each of its sources, joined by `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_chain_names_every_cause() {
        let e = crate::xds::StreamError::Status(tonic::Status::unavailable("control plane gone"));
        let chain = super::error_chain(&e);
        assert!(chain.starts_with("the stream failed: "), "{chain}");
        assert!(chain.contains("control plane gone"), "{chain}");
    }
}
