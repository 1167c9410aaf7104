//! End-to-end harness and benchmarks.
//!
//! This crate owns the one-machine topology (network namespaces as nodes and pods), the end-to-end
//! tests, the demo and the benchmarks. Today it holds two benchmarks: `bench-hbone` (one HBONE
//! stream against plain TCP over loopback) and `bench-control-plane` (the `ca` process at 10,000
//! pods with 100 xDS clients). The topology harness comes with the ztunnel work.
