//! The node agent (binary `node-agent`, one per node next to ztunnel) and the CNI plugin's side
//! of it: which pods of the node are in the mesh, the capture rules in their network namespaces,
//! and handing them to ztunnel over ZDS.
//!
//! - [`agent`]: the agent itself, whatever tells it about pods: enrolls a pod (capture rules,
//!   then `AddWorkload` to ztunnel) and takes it back, and replays the node's pods to a ztunnel
//!   that (re)connects;
//! - [`cluster`]: what drives it in a cluster: watches of this node's pods and of the namespaces,
//!   the CNI plugin's reports, pods found through `/proc`, and installing the plugin;
//! - [`capture`]: the capture rules installed in a pod's namespace.
//!
//! The one-machine mesh (`e2e`) drives [`agent::NodeAgent`] from its YAML directory instead of
//! [`cluster`].

pub mod agent;
pub mod capture;
pub mod cluster;

pub use self::cluster::{
    AgentConfig, CNI_PLUGIN, CNI_SOCKET, CniAdd, CniReply, PodFacts, chain_plugin, desired, find_netns, install_cni,
    run_agent,
};
