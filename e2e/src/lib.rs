//! End-to-end harness and benchmarks.
//!
//! This crate owns the one-machine topology (network namespaces as nodes and pods), the end-to-end
//! tests, the demo and the benchmarks. Today it holds three benchmarks: `bench-hbone` (one HBONE
//! stream against plain TCP over loopback), `bench-control-plane` (the `ca` process at 10,000
//! pods with 100 xDS clients) and `bench-ca` (certificates signed per second against the raw
//! sign+verify rate of the same key type), and [`ca_process`], the real `ca` as a child process.
//! The topology harness comes with the ztunnel work.

pub mod ca_process;
