//! The mesh as a proxy holds it: what the control plane sent, converted once when it arrived
//! ([`model`]) and indexed so that what a connection or a request looks up costs the same in a
//! mesh of ten workloads as in one of ten thousand:
//!
//! - workloads by address, services by VIP, a service's endpoints by its key;
//! - L4 policies by scope: mesh-wide ones, each namespace's, and selector-scoped ones by name
//!   (a workload lists those that select it), so a connection meets only the policies that apply
//!   to its destination;
//! - waypoint policies and JWT rules by what they target (a Gateway or a Service); one that names a
//!   kind of target this proxy does not know applies everywhere, so that it denies more, never less.
//!
//! [`MeshState`] is written only by the xDS client ([`crate::xds::MeshView`]) and read under its
//! lock; everything in it is behind an `Arc`, so a reader may keep what it found.

pub mod model;
pub mod telemetry;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

pub use model::{ModelError, PortMapping, Service, Tunnel, Waypoint, WaypointAt, Workload, service_key};

use crate::api::ambient::waypoint::v1::{
    DestinationPolicy, GatewayCredential, IngressGateway, L7Policy, MeshSettings, PolicyTarget, RequestAuthn,
    ServiceRoutes, Telemetry, policy_target,
};
use crate::api::istio::security::{Authorization, Scope};

/// What the control plane told us.
#[derive(Debug, Default)]
pub struct MeshState {
    /// Workloads by resource name (their uid).
    workloads: HashMap<String, Arc<Workload>>,
    /// Services by resource name (their key, `<namespace>/<hostname>`).
    services: HashMap<String, Arc<Service>>,
    /// Workload name by IP.
    by_ip: HashMap<IpAddr, String>,
    /// Service name by VIP.
    by_vip: HashMap<IpAddr, String>,
    /// Service names by hostname (lower case): a ServiceEntry host may be named in several
    /// namespaces.
    by_hostname: HashMap<String, BTreeSet<String>>,
    /// The workloads (names, in order) that are endpoints of each service, by service key.
    endpoints: HashMap<String, BTreeSet<String>>,
    /// Workloads the control plane sent that could not be converted, by name: their readable
    /// addresses and why. Connections to those addresses are refused, never sent around the mesh.
    refused: HashMap<String, (Vec<IpAddr>, String)>,
    /// Refused workload name by IP.
    refused_by_ip: HashMap<IpAddr, String>,
    /// L4 policies.
    pub policies: Policies,
    /// Waypoint routes by service, `<namespace>/<hostname>`.
    pub routes: HashMap<String, Arc<ServiceRoutes>>,
    /// Waypoint (L7) policies.
    pub l7_policies: Targeted<L7Policy>,
    /// Waypoint JWT rules (RequestAuthentication).
    pub request_authns: Targeted<RequestAuthn>,
    /// DestinationRule traffic policies by service, `<namespace>/<hostname>`.
    pub destination_policies: HashMap<String, Arc<DestinationPolicy>>,
    /// Istio Gateways with the routes bound to them, by `<namespace>/<name>` (ingress gateways
    /// follow these).
    pub ingress_gateways: HashMap<String, Arc<IngressGateway>>,
    /// TLS credentials this gateway terminates with, by `<namespace>/<secret>`.
    pub gateway_credentials: Credentials,
    /// Mesh-wide settings (the defaults until the control plane sends them).
    pub settings: MeshSettings,
    /// Telemetry API settings by `<namespace>/<name>` (name order is merge order, see
    /// [`telemetry::effective`]).
    pub telemetry: BTreeMap<String, Arc<Telemetry>>,
}

/// Gateway TLS credentials by `<namespace>/<secret>`; their debug form never shows a key.
#[derive(Default)]
pub struct Credentials(pub HashMap<String, Arc<GatewayCredential>>);

impl std::ops::Deref for Credentials {
    type Target = HashMap<String, Arc<GatewayCredential>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Credentials {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

impl MeshState {
    /// The workload named `uid`.
    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// The workload with this IP.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(self.by_ip.get(&ip)?)
    }

    /// Why the workload at `ip` was refused, if the control plane sent one there that this proxy
    /// could not take: a connection to it is refused, not sent in plaintext around the mesh.
    pub fn refused_at(&self, ip: IpAddr) -> Option<(&str, &str)> {
        let name = self.refused_by_ip.get(&ip)?;
        self.refused.get(name).map(|(_, why)| (name.as_str(), why.as_str()))
    }

    /// Records that the workload `name` at `addresses` was refused, and why (replacing what was
    /// held under that name).
    pub fn refuse_workload(&mut self, name: &str, addresses: Vec<IpAddr>, why: String) {
        self.remove_address(name);
        for ip in &addresses {
            self.refused_by_ip.insert(*ip, name.to_owned());
        }
        self.refused.insert(name.to_owned(), (addresses, why));
    }

    /// Every workload, in no order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// How many workloads are known.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// The service with key `key` (`<namespace>/<hostname>`).
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    /// The services with this hostname (compared in lower case), in key order.
    pub fn services_by_hostname(&self, hostname: &str) -> impl Iterator<Item = &Arc<Service>> {
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
    }

    /// The service with this VIP.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services.get(self.by_vip.get(&ip)?)
    }

    /// Every service, in no order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The workloads that are endpoints of service `key`, healthy or not, ordered by uid.
    pub fn endpoints(&self, key: &str) -> impl Iterator<Item = &Arc<Workload>> {
        self.endpoints.get(key).into_iter().flatten().filter_map(|name| self.workloads.get(name))
    }

    /// Adds or replaces a workload (under its uid).
    pub fn insert_workload(&mut self, w: Workload) {
        let name = w.uid.clone();
        self.remove_workload(&name);
        self.forget_refusal(&name);
        for ip in &w.addresses {
            self.by_ip.insert(*ip, name.clone());
        }
        for key in w.services.keys() {
            self.endpoints.entry(key.clone()).or_default().insert(name.clone());
        }
        self.workloads.insert(name, Arc::new(w));
    }

    /// Adds or replaces a service (under its key).
    pub fn insert_service(&mut self, s: Service) {
        let name = s.key.clone();
        self.remove_service(&name);
        for ip in &s.vips {
            self.by_vip.insert(*ip, name.clone());
        }
        self.by_hostname.entry(s.hostname.to_ascii_lowercase()).or_default().insert(name.clone());
        self.services.insert(name, Arc::new(s));
    }

    /// Removes the workload or service named `name` (an `istio.workload.Address` removal).
    pub fn remove_address(&mut self, name: &str) {
        self.remove_workload(name);
        self.remove_service(name);
        self.forget_refusal(name);
    }

    fn forget_refusal(&mut self, name: &str) {
        let Some((addresses, _)) = self.refused.remove(name) else { return };
        for ip in &addresses {
            if self.refused_by_ip.get(ip).is_some_and(|n| n == name) {
                self.refused_by_ip.remove(ip);
            }
        }
    }

    fn remove_workload(&mut self, name: &str) {
        let Some(old) = self.workloads.remove(name) else { return };
        for ip in &old.addresses {
            if self.by_ip.get(ip).is_some_and(|n| n == name) {
                self.by_ip.remove(ip);
            }
        }
        for key in old.services.keys() {
            if let Some(set) = self.endpoints.get_mut(key) {
                set.remove(name);
                if set.is_empty() {
                    self.endpoints.remove(key);
                }
            }
        }
    }

    fn remove_service(&mut self, name: &str) {
        let Some(old) = self.services.remove(name) else { return };
        for ip in &old.vips {
            if self.by_vip.get(ip).is_some_and(|n| n == name) {
                self.by_vip.remove(ip);
            }
        }
        let hostname = old.hostname.to_ascii_lowercase();
        if let Some(set) = self.by_hostname.get_mut(&hostname) {
            set.remove(name);
            if set.is_empty() {
                self.by_hostname.remove(&hostname);
            }
        }
    }
}

/// L4 policies (`istio.security.Authorization`), indexed by where they apply.
#[derive(Debug, Default)]
pub struct Policies {
    by_name: HashMap<String, Arc<Authorization>>,
    /// Mesh-wide policies, and those of a scope this proxy does not know (applied everywhere, so
    /// that they deny more, never less).
    everywhere: BTreeSet<String>,
    /// Namespace-scoped policies by namespace.
    by_namespace: HashMap<String, BTreeSet<String>>,
}

impl Policies {
    /// Adds or replaces the policy named `name` (`<namespace>/<name>`).
    pub fn insert(&mut self, name: String, policy: Authorization) {
        self.remove(&name);
        match Scope::try_from(policy.scope) {
            Ok(Scope::Namespace) => {
                self.by_namespace.entry(policy.namespace.clone()).or_default().insert(name.clone());
            }
            // Found through the workloads that list them.
            Ok(Scope::WorkloadSelector) => {}
            Ok(Scope::Global) | Err(_) => {
                self.everywhere.insert(name.clone());
            }
        }
        self.by_name.insert(name, Arc::new(policy));
    }

    /// Removes the policy named `name`.
    pub fn remove(&mut self, name: &str) {
        let Some(old) = self.by_name.remove(name) else { return };
        self.everywhere.remove(name);
        if let Some(set) = self.by_namespace.get_mut(&old.namespace) {
            set.remove(name);
            if set.is_empty() {
                self.by_namespace.remove(&old.namespace);
            }
        }
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Authorization>> {
        self.by_name.get(name)
    }

    /// The names of every policy, in no order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// How many policies are known.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no policy is known.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The policies that apply to `destination`, each once: the mesh-wide ones (and those of an
    /// unknown scope), its namespace's, and the selector-scoped ones that select it.
    pub fn applying_to<'a>(&'a self, destination: &'a Workload) -> impl Iterator<Item = (&'a str, &'a Authorization)> {
        let named = |name: &'a String| self.by_name.get(name).map(|p| (name.as_str(), p.as_ref()));
        let selected = destination
            .authorization_policies
            .iter()
            .filter_map(named)
            .filter(|(_, p)| p.scope == Scope::WorkloadSelector as i32);
        self.everywhere
            .iter()
            .chain(self.by_namespace.get(&destination.namespace).into_iter().flatten())
            .filter_map(named)
            .chain(selected)
    }
}

/// Something that targets Gateways or Services by name: waypoint policies, JWT rules.
pub trait HasTargets {
    /// What it targets.
    fn targets(&self) -> &[PolicyTarget];
}

impl HasTargets for L7Policy {
    fn targets(&self) -> &[PolicyTarget] {
        &self.targets
    }
}

impl HasTargets for RequestAuthn {
    fn targets(&self) -> &[PolicyTarget] {
        &self.targets
    }
}

/// What a policy target names: a Gateway (a waypoint) or a Service, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A Gateway: the waypoint itself.
    Gateway(String, String),
    /// A Service the waypoint serves.
    Service(String, String),
}

impl Target {
    /// `None` for a kind this proxy does not know (such a target names nothing here).
    fn of(t: &PolicyTarget) -> Option<Target> {
        match policy_target::Kind::try_from(t.kind).ok()? {
            policy_target::Kind::Gateway => Some(Target::Gateway(t.namespace.clone(), t.name.clone())),
            policy_target::Kind::Service => Some(Target::Service(t.namespace.clone(), t.name.clone())),
        }
    }
}

/// Names of resources by the namespace and name of what they target (looked up with `&str`, no
/// allocation per request).
type ByNamespacedName = HashMap<String, HashMap<String, BTreeSet<String>>>;

/// Resources that target Gateways or Services, indexed by target.
#[derive(Debug)]
pub struct Targeted<T> {
    by_name: HashMap<String, Arc<T>>,
    gateways: ByNamespacedName,
    services: ByNamespacedName,
    /// Those naming a kind of target this proxy does not know: they apply everywhere (a DENY
    /// denies more, an ALLOW makes the others' absence deny, a JWT rule checks more tokens).
    unknown_kind: BTreeSet<String>,
}

impl<T> Default for Targeted<T> {
    fn default() -> Self {
        Targeted {
            by_name: HashMap::new(),
            gateways: HashMap::new(),
            services: HashMap::new(),
            unknown_kind: BTreeSet::new(),
        }
    }
}

impl<T: HasTargets> Targeted<T> {
    fn index(&mut self, target: &Target) -> &mut ByNamespacedName {
        match target {
            Target::Gateway(..) => &mut self.gateways,
            Target::Service(..) => &mut self.services,
        }
    }

    /// Adds or replaces the resource named `name`.
    pub fn insert(&mut self, name: String, resource: T) {
        self.remove(&name);
        for target in resource.targets() {
            match Target::of(target) {
                Some(t) => {
                    let (Target::Gateway(ns, n) | Target::Service(ns, n)) = &t;
                    let (ns, n) = (ns.clone(), n.clone());
                    self.index(&t).entry(ns).or_default().entry(n).or_default().insert(name.clone());
                }
                None => {
                    self.unknown_kind.insert(name.clone());
                }
            }
        }
        self.by_name.insert(name, Arc::new(resource));
    }

    /// Removes the resource named `name`.
    pub fn remove(&mut self, name: &str) {
        let Some(old) = self.by_name.remove(name) else { return };
        self.unknown_kind.remove(name);
        for target in old.targets().iter().filter_map(Target::of) {
            let (Target::Gateway(ns, n) | Target::Service(ns, n)) = &target;
            let index = self.index(&target);
            if let Some(names) = index.get_mut(ns) {
                if let Some(set) = names.get_mut(n) {
                    set.remove(name);
                    if set.is_empty() {
                        names.remove(n);
                    }
                }
                if names.is_empty() {
                    index.remove(ns);
                }
            }
        }
    }

    /// The names of every resource, in no order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// The resources that target the Gateway `gateway` or the Service `service` (namespace, name),
    /// and those naming a kind of target this proxy does not know; each once, in name order.
    pub fn targeting(&self, gateway: (&str, &str), service: Option<(&str, &str)>) -> Vec<(&str, &Arc<T>)> {
        fn find<'a>(index: &'a ByNamespacedName, (ns, n): (&str, &str)) -> Option<&'a BTreeSet<String>> {
            index.get(ns).and_then(|m| m.get(n))
        }
        let names: BTreeSet<&String> = [find(&self.gateways, gateway), service.and_then(|s| find(&self.services, s))]
            .into_iter()
            .flatten()
            .flatten()
            .chain(&self.unknown_kind)
            .collect();
        names.into_iter().filter_map(|n| self.by_name.get(n).map(|r| (n.as_str(), r))).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::api::istio::workload as pb;

    fn workload(uid: &str, ns: &str, ip: [u8; 4], services: &[&str], selected_by: &[&str]) -> Workload {
        Workload::from_pb(pb::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: ns.into(),
            addresses: vec![ip.to_vec()],
            services: services.iter().map(|s| ((*s).to_owned(), pb::PortList::default())).collect(),
            authorization_policies: selected_by.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn policy(ns: &str, scope: Scope) -> Authorization {
        Authorization { namespace: ns.into(), scope: scope as i32, ..Default::default() }
    }

    #[test]
    fn a_workloads_baggage_is_formatted_once_when_it_is_converted() {
        let w = workload("web-1", "shop", [10, 0, 0, 1], &[], &[]);
        assert_eq!(w.baggage.unwrap(), "k8s.namespace.name=shop,k8s.pod.name=web-1");
    }

    #[test]
    fn endpoints_and_addresses_follow_replacement_and_removal() {
        let mut s = MeshState::default();
        s.insert_workload(workload("b", "shop", [10, 0, 0, 2], &["shop/web"], &[]));
        s.insert_workload(workload("a", "shop", [10, 0, 0, 1], &["shop/web", "shop/api"], &[]));
        let uids = |s: &MeshState, key| s.endpoints(key).map(|w| w.uid.clone()).collect::<Vec<_>>();
        assert_eq!(uids(&s, "shop/web"), ["a", "b"]);
        // `a` moves to another address and leaves `web`.
        s.insert_workload(workload("a", "shop", [10, 0, 0, 3], &["shop/api"], &[]));
        assert_eq!(uids(&s, "shop/web"), ["b"]);
        assert!(s.workload_by_ip("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(s.workload_by_ip("10.0.0.3".parse().unwrap()).unwrap().uid, "a");
        s.remove_address("a");
        assert!(uids(&s, "shop/api").is_empty());
        assert!(!s.endpoints.contains_key("shop/api"), "an empty endpoint set is dropped");
        assert_eq!(s.workload_count(), 1);
    }

    #[test]
    fn a_workload_meets_only_the_policies_that_apply_to_it() {
        let mut p = Policies::default();
        p.insert("istio-system/mesh".into(), policy("istio-system", Scope::Global));
        p.insert("shop/all".into(), policy("shop", Scope::Namespace));
        p.insert("bank/all".into(), policy("bank", Scope::Namespace));
        p.insert("shop/web-only".into(), policy("shop", Scope::WorkloadSelector));
        p.insert("shop/db-only".into(), policy("shop", Scope::WorkloadSelector));
        let mut odd = policy("shop", Scope::Global);
        odd.scope = 42;
        p.insert("shop/odd-scope".into(), odd);
        // A workload may list a name that is not selector-scoped: it is not counted twice.
        let web = workload("web", "shop", [10, 0, 0, 1], &[], &["shop/web-only", "shop/all", "shop/gone"]);
        let names: Vec<&str> = p.applying_to(&web).map(|(n, _)| n).collect();
        assert_eq!(names, ["istio-system/mesh", "shop/odd-scope", "shop/all", "shop/web-only"]);

        p.remove("shop/all");
        p.insert("shop/web-only".into(), policy("shop", Scope::Namespace));
        let names: Vec<&str> = p.applying_to(&web).map(|(n, _)| n).collect();
        assert_eq!(names, ["istio-system/mesh", "shop/odd-scope", "shop/web-only"]);
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn targeted_resources_are_found_by_gateway_or_service() {
        let target = |kind: policy_target::Kind, ns: &str, name: &str| PolicyTarget {
            kind: kind as i32,
            namespace: ns.into(),
            name: name.into(),
        };
        let mut t = Targeted::<L7Policy>::default();
        let gw = target(policy_target::Kind::Gateway, "shop", "waypoint");
        let svc = target(policy_target::Kind::Service, "shop", "web");
        t.insert("shop/both".into(), L7Policy { targets: vec![gw.clone(), svc.clone()], ..Default::default() });
        t.insert("shop/web".into(), L7Policy { targets: vec![svc], ..Default::default() });
        t.insert(
            "shop/unknown-kind".into(),
            L7Policy { targets: vec![PolicyTarget { kind: 9, ..gw }], ..Default::default() },
        );
        let names = |t: &Targeted<L7Policy>, svc| {
            t.targeting(("shop", "waypoint"), svc).into_iter().map(|(n, _)| n.to_owned()).collect::<Vec<_>>()
        };
        // A kind this proxy does not know applies everywhere, so that it denies more, never less.
        assert_eq!(names(&t, Some(("shop", "web"))), ["shop/both", "shop/unknown-kind", "shop/web"]);
        assert_eq!(names(&t, None), ["shop/both", "shop/unknown-kind"]);
        // A Gateway and a Service of the same name are different targets.
        let gw_web = target(policy_target::Kind::Gateway, "shop", "web");
        t.insert("shop/gateway-web".into(), L7Policy { targets: vec![gw_web], ..Default::default() });
        assert_eq!(names(&t, Some(("shop", "web"))), ["shop/both", "shop/unknown-kind", "shop/web"]);
        t.remove("shop/both");
        t.remove("shop/unknown-kind");
        assert_eq!(names(&t, Some(("shop", "web"))), ["shop/web"]);
        t.remove("shop/web");
        t.remove("shop/gateway-web");
        assert!(t.gateways.is_empty() && t.services.is_empty() && t.by_name.is_empty(), "{t:?}");
    }
}
