//! Mesh state encoded as xDS resources, once per change, shared by every client stream.
//!
//! Each resource's version is a hash of its encoded bytes: equal content means equal version, so
//! a client that reconnects with the versions it holds is sent only what differs, and a change
//! that leaves a resource's bytes alone is never pushed.
//!
//! Each build also records which names changed since the previous build (a short history), so a
//! client stream that is up to date only looks at what changed instead of diffing every resource:
//! with thousands of resources and a hundred clients, that is the difference between a full scan
//! per client per change and a handful of lookups.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use prost::Message;
use proto::api::istio::workload as pb;
use proto::api::type_url;

use crate::mesh::MeshState;

/// How many builds of change history to keep. A stream further behind does a full diff.
const HISTORY: usize = 32;

/// The served types.
pub const TYPES: [&str; 11] = [
    type_url::ADDRESS,
    type_url::AUTHORIZATION,
    type_url::SERVICE_ROUTES,
    type_url::L7_POLICY,
    type_url::REQUEST_AUTHN,
    type_url::DESTINATION_POLICY,
    type_url::INGRESS_GATEWAY,
    type_url::GATEWAY_CREDENTIAL,
    type_url::MESH_SETTINGS,
    type_url::TELEMETRY,
    type_url::TRUST_BUNDLE,
];

/// Istio's two types: what istiod serves a ztunnel.
pub const ISTIO_TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

/// Which types the server serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServedTypes {
    /// Istio's and ours ([`TYPES`]): what our ztunnel and waypoint read.
    #[default]
    All,
    /// Only Istio's two ([`ISTIO_TYPES`]), as istiod serves them: subscriptions to the others are
    /// ignored. For checking that a proxy runs behind istiod (no waypoint works this way).
    Istio,
}

impl std::str::FromStr for ServedTypes {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(ServedTypes::All),
            "istio" => Ok(ServedTypes::Istio),
            _ => Err(format!("{s:?}: expected `all` or `istio`")),
        }
    }
}

impl std::fmt::Display for ServedTypes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServedTypes::All => "all",
            ServedTypes::Istio => "istio",
        })
    }
}

impl ServedTypes {
    /// The type URLs.
    pub fn urls(self) -> &'static [&'static str] {
        match self {
            ServedTypes::All => &TYPES,
            ServedTypes::Istio => &ISTIO_TYPES,
        }
    }
}

/// One encoded resource.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsResource {
    /// xDS name.
    pub name: Arc<str>,
    /// Content hash.
    pub hash: u64,
    /// Content version, as sent (the hash in hex).
    pub version: String,
    /// Other names it answers to (for on-demand lookups by address).
    pub aliases: Vec<String>,
    /// The encoded message.
    pub body: prost_types::Any,
    /// The identities it is sent to; `None`: every client.
    pub readers: Option<Arc<[String]>>,
}

/// Resources of one type, with an alias index.
#[derive(Debug, Default)]
pub struct TypeResources {
    /// By name.
    pub by_name: BTreeMap<Arc<str>, Arc<XdsResource>>,
    /// Alias → name.
    pub aliases: HashMap<String, Arc<str>>,
}

impl TypeResources {
    /// Resolves a subscribed name: a resource name, or an alias of one.
    pub fn resolve(&self, name: &str) -> Option<&Arc<XdsResource>> {
        self.by_name.get(name).or_else(|| self.by_name.get(self.aliases.get(name)?))
    }
}

/// What one build changed for one type.
#[derive(Debug, Default, Clone)]
pub struct TypeDelta {
    /// Added or modified.
    pub changed: Vec<Arc<str>>,
    /// Gone.
    pub removed: Vec<Arc<str>>,
}

/// What one build changed.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    /// The build's generation.
    pub generation: u64,
    /// Per type URL.
    pub types: HashMap<&'static str, TypeDelta>,
}

/// Every served resource, by type URL.
#[derive(Debug, Default)]
pub struct Resources {
    /// Monotonic generation of the state these were built from (0: nothing built yet).
    pub generation: u64,
    by_type: HashMap<&'static str, TypeResources>,
    /// Recent deltas, oldest first, ending with this build's.
    history: Arc<VecDeque<Arc<Delta>>>,
}

/// FNV-1a, 64 bit: stable across runs and processes, so versions survive a control-plane restart.
fn content_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn resource(type_url: &str, name: Arc<str>, aliases: Vec<String>, message: &impl Message) -> Arc<XdsResource> {
    let value = message.encode_to_vec();
    let hash = content_hash(&value);
    Arc::new(XdsResource {
        name,
        hash,
        version: format!("{hash:016x}"),
        aliases,
        body: prost_types::Any { type_url: type_url.to_owned(), value },
        readers: None,
    })
}

/// The alias Istio uses for an address on the default network: `<network>/<ip>`.
fn address_alias(ip: &std::net::IpAddr) -> String {
    format!("/{ip}")
}

impl Resources {
    /// Encodes the state and the trust bundle (if the CA runs); `previous` is the last build, for
    /// the change history.
    pub fn build(
        state: &MeshState,
        bundle: Option<&proto::api::ambient::ca::v1::TrustBundle>,
        generation: u64,
        previous: &Resources,
        served: ServedTypes,
    ) -> Resources {
        let mut addresses = TypeResources::default();
        for w in state.workloads.values() {
            let name: Arc<str> = Arc::from(w.uid.as_str());
            let aliases: Vec<String> = w.ips.iter().map(address_alias).collect();
            for a in &aliases {
                addresses.aliases.insert(a.clone(), name.clone());
            }
            let msg = pb::Address { r#type: Some(pb::address::Type::Workload(w.to_proto())) };
            addresses.by_name.insert(name.clone(), resource(type_url::ADDRESS, name, aliases, &msg));
        }
        for s in state.services.values() {
            let name: Arc<str> = Arc::from(s.resource_name());
            let aliases: Vec<String> = s.vips.iter().map(address_alias).collect();
            for a in &aliases {
                addresses.aliases.insert(a.clone(), name.clone());
            }
            let msg = pb::Address { r#type: Some(pb::address::Type::Service(s.to_proto())) };
            addresses.by_name.insert(name.clone(), resource(type_url::ADDRESS, name, aliases, &msg));
        }

        let mut authz = TypeResources::default();
        for p in state.policies.values() {
            let name: Arc<str> = Arc::from(p.resource_name());
            authz.by_name.insert(name.clone(), resource(type_url::AUTHORIZATION, name, Vec::new(), &p.to_proto()));
        }

        // Only what is served is encoded (istiod's two types alone with `--xds-types istio`).
        let wanted = |url: &str| served.urls().contains(&url);
        let mut routes = TypeResources::default();
        for (name, r) in state.routes.iter().filter(|_| wanted(type_url::SERVICE_ROUTES)) {
            let name: Arc<str> = Arc::from(name.as_str());
            routes.by_name.insert(name.clone(), resource(type_url::SERVICE_ROUTES, name, Vec::new(), r));
        }
        let mut l7 = TypeResources::default();
        for (name, p) in state.l7_policies.iter().filter(|_| wanted(type_url::L7_POLICY)) {
            let name: Arc<str> = Arc::from(name.as_str());
            l7.by_name.insert(name.clone(), resource(type_url::L7_POLICY, name, Vec::new(), p));
        }

        let mut authns = TypeResources::default();
        for (name, p) in state.request_authns.iter().filter(|_| wanted(type_url::REQUEST_AUTHN)) {
            let name: Arc<str> = Arc::from(name.as_str());
            authns.by_name.insert(name.clone(), resource(type_url::REQUEST_AUTHN, name, Vec::new(), p));
        }

        let mut destinations = TypeResources::default();
        for (name, p) in state.destination_policies.iter().filter(|_| wanted(type_url::DESTINATION_POLICY)) {
            let name: Arc<str> = Arc::from(name.as_str());
            destinations.by_name.insert(name.clone(), resource(type_url::DESTINATION_POLICY, name, Vec::new(), p));
        }

        let mut gateways = TypeResources::default();
        for (name, g) in state.ingress_gateways.iter().filter(|_| wanted(type_url::INGRESS_GATEWAY)) {
            let name: Arc<str> = Arc::from(name.as_str());
            gateways.by_name.insert(name.clone(), resource(type_url::INGRESS_GATEWAY, name, Vec::new(), g));
        }

        let mut credentials = TypeResources::default();
        for (name, c) in state.gateway_credentials.iter().filter(|_| wanted(type_url::GATEWAY_CREDENTIAL)) {
            let name: Arc<str> = Arc::from(name.as_str());
            let mut r = resource(type_url::GATEWAY_CREDENTIAL, name.clone(), Vec::new(), &c.credential);
            let r_mut = Arc::make_mut(&mut r);
            // Who may read it is part of its version: a change of readers is a change to push
            // (sent to a new reader, taken back from a former one).
            let mut versioned = r_mut.body.value.clone();
            for reader in &c.readers {
                versioned.push(0);
                versioned.extend_from_slice(reader.as_bytes());
            }
            r_mut.hash = content_hash(&versioned);
            r_mut.version = format!("{:016x}", r_mut.hash);
            r_mut.readers = Some(c.readers.iter().cloned().collect());
            credentials.by_name.insert(name, r);
        }

        let mut telemetry = TypeResources::default();
        for (name, t) in state.telemetry.iter().filter(|_| wanted(type_url::TELEMETRY)) {
            let name: Arc<str> = Arc::from(name.as_str());
            telemetry.by_name.insert(name.clone(), resource(type_url::TELEMETRY, name, Vec::new(), t));
        }

        let mut settings = TypeResources::default();
        if wanted(type_url::MESH_SETTINGS) {
            let name: Arc<str> = Arc::from(proto::api::MESH_SETTINGS_NAME);
            let msg = state.settings.to_proto();
            settings.by_name.insert(name.clone(), resource(type_url::MESH_SETTINGS, name, Vec::new(), &msg));
        }

        let mut trust = TypeResources::default();
        if let Some(bundle) = bundle.filter(|_| wanted(type_url::TRUST_BUNDLE)) {
            let name: Arc<str> = Arc::from(proto::api::TRUST_BUNDLE_NAME);
            trust.by_name.insert(name.clone(), resource(type_url::TRUST_BUNDLE, name, Vec::new(), bundle));
        }

        let mut by_type = HashMap::new();
        by_type.insert(type_url::TRUST_BUNDLE, trust);
        by_type.insert(type_url::TELEMETRY, telemetry);
        by_type.insert(type_url::ADDRESS, addresses);
        by_type.insert(type_url::AUTHORIZATION, authz);
        by_type.insert(type_url::SERVICE_ROUTES, routes);
        by_type.insert(type_url::L7_POLICY, l7);
        by_type.insert(type_url::REQUEST_AUTHN, authns);
        by_type.insert(type_url::DESTINATION_POLICY, destinations);
        by_type.insert(type_url::INGRESS_GATEWAY, gateways);
        by_type.insert(type_url::GATEWAY_CREDENTIAL, credentials);
        by_type.insert(type_url::MESH_SETTINGS, settings);
        by_type.retain(|url, _| served.urls().contains(url));

        let mut delta = Delta { generation, types: HashMap::new() };
        for (url, current) in &by_type {
            let mut d = TypeDelta::default();
            let before = previous.by_type.get(url);
            for (name, r) in &current.by_name {
                if before.and_then(|b| b.by_name.get(name)).map(|p| p.hash) != Some(r.hash) {
                    d.changed.push(name.clone());
                }
            }
            for name in before.iter().flat_map(|b| b.by_name.keys()) {
                if !current.by_name.contains_key(name) {
                    d.removed.push(name.clone());
                }
            }
            delta.types.insert(url, d);
        }
        let mut history: VecDeque<Arc<Delta>> = (*previous.history).clone();
        // The history is only continuous if the previous build is the one just before this one.
        if previous.generation + 1 != generation {
            history.clear();
        }
        history.push_back(Arc::new(delta));
        while history.len() > HISTORY {
            history.pop_front();
        }
        Resources { generation, by_type, history: Arc::new(history) }
    }

    /// Resources of a type, if the server serves it.
    pub fn of_type(&self, type_url: &str) -> Option<&TypeResources> {
        self.by_type.get(type_url)
    }

    /// The deltas that lead from `generation` to this build, if all are still known.
    pub fn deltas_since(&self, generation: u64) -> Option<impl Iterator<Item = &Arc<Delta>>> {
        if generation == self.generation {
            return Some(self.history.iter().skip(self.history.len()));
        }
        let first = self.history.front()?.generation;
        if generation + 1 < first || generation > self.generation {
            return None;
        }
        Some(self.history.iter().skip(usize::try_from(generation + 1 - first).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Action, Policy, Scope};

    fn state_with(policies: &[&str]) -> MeshState {
        let mut s = MeshState::default();
        for name in policies {
            let p = Policy {
                name: (*name).into(),
                namespace: "ns".into(),
                scope: Scope::Namespace,
                action: Action::Deny,
                rules: vec![],
                dry_run: false,
            };
            s.policies.insert(p.resource_name(), p);
        }
        s
    }

    #[test]
    fn history_records_what_each_build_changed() {
        let g1 = Resources::build(&state_with(&["a", "b"]), None, 1, &Resources::default(), ServedTypes::All);
        let g2 = Resources::build(&state_with(&["a", "c"]), None, 2, &g1, ServedTypes::All);
        let g3 = Resources::build(&state_with(&["a", "c"]), None, 3, &g2, ServedTypes::All);
        let deltas: Vec<_> = g3.deltas_since(1).unwrap().collect();
        assert_eq!(deltas.iter().map(|d| d.generation).collect::<Vec<_>>(), [2, 3]);
        let d2 = &deltas[0].types[type_url::AUTHORIZATION];
        assert_eq!(d2.changed.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["ns/c"]);
        assert_eq!(d2.removed.iter().map(|n| n.to_string()).collect::<Vec<_>>(), ["ns/b"]);
        // Unchanged content: nothing changed in generation 3.
        assert!(deltas[1].types[type_url::AUTHORIZATION].changed.is_empty());
        assert_eq!(g3.deltas_since(3).unwrap().count(), 0);
        // Unknown futures and gaps force a full comparison.
        assert!(g3.deltas_since(4).is_none());
        let gap = Resources::build(&state_with(&["a"]), None, 10, &g3, ServedTypes::All);
        assert!(gap.deltas_since(3).is_none());
        assert_eq!(gap.deltas_since(9).unwrap().count(), 1);
    }
}
