//! The per-node L4 proxy.
//!
//! This crate will own ztunnel: pod enrollment over ZDS (listeners opened inside each pod's network
//! namespace), outbound capture on 15001, inbound HBONE on 15008 and plaintext on 15006, L4
//! authorization and the node agent that installs capture rules.
//!
//! Built so far:
//! - [`certs`]: workload certificates for the pods on this node (CSR with impersonation, renewal at
//!   half-life, keeps serving through a CA outage).
//! - [`xds`]: the mesh as the control plane describes it (workloads, services, L4 policies, trust
//!   bundle), kept current over delta xDS with reconnect and resync.
//! - [`inbound`]: the inbound HBONE handler (destination lookup, L4 policy, connect to the app).
//! - [`netns`]: sockets created inside a pod's network namespace.
//! - [`outbound`]: where a captured connection goes (service VIP → endpoint or waypoint, pod,
//!   passthrough) and the handler that carries it.
//! - [`rbac`]: L4 authorization with Istio's semantics.
//! - [`zds`]: the ZDS protocol, both ends (node agent server, ztunnel client), with descriptor
//!   passing and checks.

pub mod certs;
pub mod inbound;
pub mod netns;
pub mod outbound;
pub mod rbac;
pub mod xds;
pub mod zds;
