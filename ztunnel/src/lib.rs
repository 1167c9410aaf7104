//! The per-node L4 proxy.
//!
//! This crate will own ztunnel: pod enrollment over ZDS (listeners opened inside each pod's network
//! namespace), outbound capture on 15001, inbound HBONE on 15008 and plaintext on 15006, L4
//! authorization, certificate fetching and rotation, and the node agent that installs capture rules.
//! Nothing is implemented yet; see the project's issues for the order of work.
