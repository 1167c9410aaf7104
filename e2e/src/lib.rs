//! End-to-end harness and benchmarks.
//!
//! - [`mesh`]: the one-machine mesh (network namespaces as nodes and pods, the real `ca` and one
//!   real `ztunnel` per node as processes, the harness as node agent), torn down on drop;
//! - [`topology`]: the namespace plumbing under it; [`sniff`]: packet capture on the underlay;
//!   [`apps`]: the test apps run inside pods; [`load`]: load generators for the benchmarks;
//! - [`ca_process`]: the real `ca` as a child process;
//! - benchmarks: `bench-hbone` (one HBONE stream against plain TCP over loopback),
//!   `bench-control-plane` (the `ca` process at 10,000 pods with 100 xDS clients), `bench-ca`
//!   (certificates signed per second against the raw sign+verify rate of the same key type).

pub mod apps;
pub mod browser;
pub mod ca_process;
pub mod dashboards;
pub mod load;
pub mod mesh;
pub mod otlp;
pub mod prometheus;
pub mod scale;
pub mod sniff;
pub mod topology;
pub mod tutorial;
