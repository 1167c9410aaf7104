//! The per-namespace L7 proxy.
//!
//! This crate will own the waypoint: HBONE termination, HTTP routing from HTTPRoute/GRPCRoute,
//! canary splits, retries, timeouts, fault injection, circuit breaking, L7 authorization and request
//! metrics. Nothing is implemented yet; see the project's issues for the order of work.
