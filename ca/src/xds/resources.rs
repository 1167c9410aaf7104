//! Mesh state encoded as xDS resources, once per change, shared by every client stream.
//!
//! Each resource's version is a hash of its encoded bytes: equal content means equal version, so
//! a client that reconnects with the versions it holds is sent only what differs, and a change
//! that leaves a resource's bytes alone is never pushed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use proto::api::istio::workload as pb;
use proto::api::type_url;

use crate::mesh::MeshState;

/// One encoded resource.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsResource {
    /// xDS name.
    pub name: String,
    /// Content version.
    pub version: String,
    /// Other names it answers to (for on-demand lookups by address).
    pub aliases: Vec<String>,
    /// The encoded message.
    pub body: prost_types::Any,
}

/// Resources of one type, with an alias index.
#[derive(Debug, Default)]
pub struct TypeResources {
    /// By name.
    pub by_name: BTreeMap<String, Arc<XdsResource>>,
    /// Alias → name.
    pub aliases: HashMap<String, String>,
}

impl TypeResources {
    /// Resolves a subscribed name: a resource name, or an alias of one.
    pub fn resolve<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.by_name.contains_key(name) {
            return Some(name);
        }
        self.aliases.get(name).map(String::as_str)
    }
}

/// Every served resource, by type URL.
#[derive(Debug, Default)]
pub struct Resources {
    /// Monotonic generation of the state these were built from.
    pub generation: u64,
    by_type: HashMap<&'static str, TypeResources>,
}

/// FNV-1a, 64 bit: stable across runs and processes, so versions survive a control-plane restart.
fn content_version(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn resource(type_url: &str, name: String, aliases: Vec<String>, message: &impl Message) -> Arc<XdsResource> {
    let value = message.encode_to_vec();
    Arc::new(XdsResource {
        name,
        version: content_version(&value),
        aliases,
        body: prost_types::Any { type_url: type_url.to_owned(), value },
    })
}

/// The alias Istio uses for an address on the default network: `<network>/<ip>`.
fn address_alias(ip: &std::net::IpAddr) -> String {
    format!("/{ip}")
}

impl Resources {
    /// Encodes the state.
    pub fn build(state: &MeshState, generation: u64) -> Resources {
        let mut addresses = TypeResources::default();
        for w in state.workloads.values() {
            let aliases: Vec<String> = w.ips.iter().map(address_alias).collect();
            for a in &aliases {
                addresses.aliases.insert(a.clone(), w.uid.clone());
            }
            let msg = pb::Address { r#type: Some(pb::address::Type::Workload(w.to_proto())) };
            addresses.by_name.insert(w.uid.clone(), resource(type_url::ADDRESS, w.uid.clone(), aliases, &msg));
        }
        for s in state.services.values() {
            let name = s.resource_name();
            let aliases: Vec<String> = s.vips.iter().map(address_alias).collect();
            for a in &aliases {
                addresses.aliases.insert(a.clone(), name.clone());
            }
            let msg = pb::Address { r#type: Some(pb::address::Type::Service(s.to_proto())) };
            addresses.by_name.insert(name.clone(), resource(type_url::ADDRESS, name, aliases, &msg));
        }

        let mut authz = TypeResources::default();
        for p in state.policies.values() {
            let name = p.resource_name();
            authz.by_name.insert(name.clone(), resource(type_url::AUTHORIZATION, name, Vec::new(), &p.to_proto()));
        }

        let mut by_type = HashMap::new();
        by_type.insert(type_url::ADDRESS, addresses);
        by_type.insert(type_url::AUTHORIZATION, authz);
        Resources { generation, by_type }
    }

    /// Resources of a type, if the server serves it.
    pub fn of_type(&self, type_url: &str) -> Option<&TypeResources> {
        self.by_type.get(type_url)
    }

    /// Whether the server serves this type.
    pub fn serves(type_url: &str) -> bool {
        type_url == type_url::ADDRESS || type_url == type_url::AUTHORIZATION
    }
}
