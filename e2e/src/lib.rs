//! End-to-end harness and benchmarks.
//!
//! This crate owns the one-machine topology (network namespaces as nodes and pods), the end-to-end
//! tests, the demo and the benchmarks. Today it holds the HBONE-versus-TCP loopback benchmark
//! (`bench-hbone`); the topology harness comes with the ztunnel work.
