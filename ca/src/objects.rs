//! The Kubernetes objects the control plane knows, whichever source they came from.
//!
//! Sources turn YAML documents or API watch events into [`Object`]s, checked by [`validate`];
//! the [`Store`] holds the current set and tells the translator when it changed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::Resource;
use serde::Serialize;
use tokio::sync::watch;

use crate::k8s::{
    AuthorizationPolicy, ConfigMap, DestinationRule, EndpointSlice, GRPCRoute, Gateway, HTTPRoute, IstioGateway,
    Namespace, Node, PeerAuthentication, Pod, RequestAuthentication, Secret, Service, ServiceEntry, Telemetry,
    VirtualService,
};
use crate::validate::{self, Invalid};

/// The kinds the mesh reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    /// core/v1 Namespace.
    Namespace,
    /// core/v1 Node (its topology labels: the locality of its pods).
    Node,
    /// core/v1 Pod.
    Pod,
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Secret of type `kubernetes.io/tls` (a gateway's `credentialName`).
    Secret,
    /// gateway.networking.k8s.io Gateway.
    Gateway,
    /// gateway.networking.k8s.io HTTPRoute.
    HTTPRoute,
    /// gateway.networking.k8s.io GRPCRoute.
    GRPCRoute,
    /// security.istio.io AuthorizationPolicy.
    AuthorizationPolicy,
    /// security.istio.io PeerAuthentication.
    PeerAuthentication,
    /// security.istio.io RequestAuthentication.
    RequestAuthentication,
    /// networking.istio.io Gateway (shown as `IstioGateway`, apart from Gateway API's).
    IstioGateway,
    /// networking.istio.io VirtualService.
    VirtualService,
    /// networking.istio.io DestinationRule.
    DestinationRule,
    /// networking.istio.io ServiceEntry.
    ServiceEntry,
    /// telemetry.istio.io Telemetry.
    Telemetry,
    /// core/v1 ConfigMap `istio` of the root namespace (the mesh configuration); others are
    /// never read.
    ConfigMap,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies one object: kind, namespace (empty for Namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    /// Kind.
    pub kind: Kind,
    /// Namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of a kind the mesh reads.
#[derive(Clone, Debug)]
pub enum Object {
    /// A Namespace.
    Namespace(Arc<Namespace>),
    /// A Node.
    Node(Arc<Node>),
    /// A Pod.
    Pod(Arc<Pod>),
    /// A Service.
    Service(Arc<Service>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A TLS Secret.
    Secret(Arc<Secret>),
    /// A Gateway.
    Gateway(Arc<Gateway>),
    /// An HTTPRoute.
    HTTPRoute(Arc<HTTPRoute>),
    /// A GRPCRoute.
    GRPCRoute(Arc<GRPCRoute>),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// A PeerAuthentication.
    PeerAuthentication(Arc<PeerAuthentication>),
    /// A RequestAuthentication.
    RequestAuthentication(Arc<RequestAuthentication>),
    /// An Istio Gateway.
    IstioGateway(Arc<IstioGateway>),
    /// A VirtualService.
    VirtualService(Arc<VirtualService>),
    /// A DestinationRule.
    DestinationRule(Arc<DestinationRule>),
    /// A ServiceEntry.
    ServiceEntry(Arc<ServiceEntry>),
    /// A Telemetry.
    Telemetry(Arc<Telemetry>),
    /// A ConfigMap (the mesh configuration).
    ConfigMap(Arc<ConfigMap>),
}

/// Why a document is not a usable object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// The document has no `apiVersion`/`kind`.
    #[error("document has no apiVersion and kind")]
    NoKind,
    /// A kind the mesh does not read.
    #[error("kind {kind} ({api_version}) is not one the mesh reads; ignored")]
    UnknownKind {
        /// `apiVersion`.
        api_version: String,
        /// `kind`.
        kind: String,
    },
    /// The document does not have the kind's schema.
    #[error("{kind} does not match its schema: {reason}")]
    Schema {
        /// The kind.
        kind: Kind,
        /// The decoder's message.
        reason: String,
    },
    /// The object is well-formed but invalid.
    #[error("{key} is invalid: {reason}")]
    Invalid {
        /// The object.
        key: ObjectKey,
        /// What is wrong.
        reason: Invalid,
    },
}

fn decode<T: serde::de::DeserializeOwned>(kind: Kind, value: serde_json::Value) -> Result<Arc<T>, ObjectError> {
    serde_json::from_value(value).map(Arc::new).map_err(|e| ObjectError::Schema { kind, reason: e.to_string() })
}

/// `spec.<key>` of an object whose spec as a whole does not decode, if that part does.
fn part<T: serde::de::DeserializeOwned>(spec: Option<&serde_json::Value>, key: &str) -> Option<T> {
    T::deserialize(spec?.get(key)?).ok()
}

/// Decodes an AuthorizationPolicy. One whose spec does not decode is still admitted (when its
/// metadata does), marked unreadable with the decoder's reason, and carrying whatever of its
/// selector, targets and action could be read: dropping it would silently lift the restriction it
/// was written to add, so the translation makes it fail closed instead.
fn decode_authorization_policy(value: &serde_json::Value) -> Result<Arc<AuthorizationPolicy>, ObjectError> {
    use serde::Deserialize;
    let kind = Kind::AuthorizationPolicy;
    let reason = match AuthorizationPolicy::deserialize(value) {
        Ok(p) => return Ok(Arc::new(p)),
        Err(e) => e.to_string(),
    };
    let metadata = value.get("metadata").unwrap_or(&serde_json::Value::Null);
    let metadata =
        Deserialize::deserialize(metadata).map_err(|e| ObjectError::Schema { kind, reason: e.to_string() })?;
    let spec = value.get("spec");
    let spec = crate::k8s::AuthorizationPolicySpec {
        selector: part(spec, "selector"),
        target_ref: part(spec, "targetRef"),
        target_refs: part(spec, "targetRefs").unwrap_or_default(),
        action: part(spec, "action"),
        unreadable: Some(reason),
        ..Default::default()
    };
    Ok(Arc::new(AuthorizationPolicy { metadata, spec }))
}

/// Decodes a RequestAuthentication; like an AuthorizationPolicy, one whose spec does not decode is
/// admitted as unreadable (with its targets, if they can be read), and fails closed: the waypoints
/// it targets refuse every token rather than let unchecked ones through.
fn decode_request_authentication(value: &serde_json::Value) -> Result<Arc<RequestAuthentication>, ObjectError> {
    use serde::Deserialize;
    let kind = Kind::RequestAuthentication;
    let reason = match RequestAuthentication::deserialize(value) {
        Ok(p) => return Ok(Arc::new(p)),
        Err(e) => e.to_string(),
    };
    let metadata = value.get("metadata").unwrap_or(&serde_json::Value::Null);
    let metadata =
        Deserialize::deserialize(metadata).map_err(|e| ObjectError::Schema { kind, reason: e.to_string() })?;
    let spec = value.get("spec");
    let spec = crate::k8s::RequestAuthenticationSpec {
        selector: part(spec, "selector"),
        target_ref: part(spec, "targetRef"),
        target_refs: part(spec, "targetRefs").unwrap_or_default(),
        unreadable: Some(reason),
        ..Default::default()
    };
    Ok(Arc::new(RequestAuthentication { metadata, spec }))
}

impl Object {
    /// Decodes one document (`apiVersion` + `kind` pick the type). A `List` expands to its items.
    pub fn from_value(value: serde_json::Value) -> Vec<Result<Object, ObjectError>> {
        let api_version = value.get("apiVersion").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        if api_version.is_empty() || kind.is_empty() {
            return vec![Err(ObjectError::NoKind)];
        }
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let object = match (group, kind.as_str()) {
            ("", "List") => {
                let items = match value.get("items") {
                    Some(serde_json::Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                return items.into_iter().flat_map(Object::from_value).collect();
            }
            ("", "Namespace") => decode(Kind::Namespace, value).map(Object::Namespace),
            ("", "Node") => decode(Kind::Node, value).map(Object::Node),
            ("", "Pod") => decode(Kind::Pod, value).map(Object::Pod),
            ("", "Service") => decode(Kind::Service, value).map(Object::Service),
            ("discovery.k8s.io", "EndpointSlice") => decode(Kind::EndpointSlice, value).map(Object::EndpointSlice),
            ("", "Secret") => decode(Kind::Secret, value).map(Object::Secret),
            ("gateway.networking.k8s.io", "Gateway") => decode(Kind::Gateway, value).map(Object::Gateway),
            ("gateway.networking.k8s.io", "HTTPRoute") => decode(Kind::HTTPRoute, value).map(Object::HTTPRoute),
            ("gateway.networking.k8s.io", "GRPCRoute") => decode(Kind::GRPCRoute, value).map(Object::GRPCRoute),
            ("security.istio.io", "AuthorizationPolicy") => {
                decode_authorization_policy(&value).map(Object::AuthorizationPolicy)
            }
            ("security.istio.io", "PeerAuthentication") => {
                decode(Kind::PeerAuthentication, value).map(Object::PeerAuthentication)
            }
            ("security.istio.io", "RequestAuthentication") => {
                decode_request_authentication(&value).map(Object::RequestAuthentication)
            }
            ("networking.istio.io", "Gateway") => decode(Kind::IstioGateway, value).map(Object::IstioGateway),
            ("networking.istio.io", "VirtualService") => {
                decode(Kind::VirtualService, value).map(Object::VirtualService)
            }
            ("networking.istio.io", "DestinationRule") => {
                decode(Kind::DestinationRule, value).map(Object::DestinationRule)
            }
            ("networking.istio.io", "ServiceEntry") => decode(Kind::ServiceEntry, value).map(Object::ServiceEntry),
            ("telemetry.istio.io", "Telemetry") => decode(Kind::Telemetry, value).map(Object::Telemetry),
            ("", "ConfigMap") => decode(Kind::ConfigMap, value).map(Object::ConfigMap),
            _ => Err(ObjectError::UnknownKind { api_version, kind }),
        };
        vec![object]
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => o.meta(),
            Object::Node(o) => o.meta(),
            Object::Pod(o) => o.meta(),
            Object::Service(o) => o.meta(),
            Object::EndpointSlice(o) => o.meta(),
            Object::Secret(o) => o.meta(),
            Object::Gateway(o) => o.meta(),
            Object::HTTPRoute(o) => o.meta(),
            Object::GRPCRoute(o) => o.meta(),
            Object::AuthorizationPolicy(o) => o.meta(),
            Object::PeerAuthentication(o) => o.meta(),
            Object::RequestAuthentication(o) => o.meta(),
            Object::IstioGateway(o) => o.meta(),
            Object::VirtualService(o) => o.meta(),
            Object::DestinationRule(o) => o.meta(),
            Object::ServiceEntry(o) => o.meta(),
            Object::Telemetry(o) => o.meta(),
            Object::ConfigMap(o) => o.meta(),
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Secret(_) => Kind::Secret,
            Object::Gateway(_) => Kind::Gateway,
            Object::HTTPRoute(_) => Kind::HTTPRoute,
            Object::GRPCRoute(_) => Kind::GRPCRoute,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::RequestAuthentication(_) => Kind::RequestAuthentication,
            Object::IstioGateway(_) => Kind::IstioGateway,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::Telemetry(_) => Kind::Telemetry,
            Object::ConfigMap(_) => Kind::ConfigMap,
        }
    }

    /// The object's key. Namespaced objects without a namespace are in `default`, as `kubectl
    /// apply` would put them.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        let kind = self.kind();
        let namespace = match kind {
            Kind::Namespace | Kind::Node => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".to_owned()),
        };
        ObjectKey { kind, namespace, name: meta.name.clone().unwrap_or_default() }
    }

    /// Fills in the namespace of a namespaced object that has none (`default`).
    pub fn with_default_namespace(self) -> Object {
        fn fill<T: Resource + Clone>(o: Arc<T>) -> Arc<T> {
            if o.meta().namespace.is_some() {
                return o;
            }
            let mut owned = (*o).clone();
            owned.meta_mut().namespace = Some("default".to_owned());
            Arc::new(owned)
        }
        match self {
            Object::Namespace(o) => Object::Namespace(o),
            Object::Node(o) => Object::Node(o),
            Object::Pod(o) => Object::Pod(fill(o)),
            Object::Service(o) => Object::Service(fill(o)),
            Object::EndpointSlice(o) => Object::EndpointSlice(fill(o)),
            Object::Secret(o) => Object::Secret(fill(o)),
            Object::Gateway(o) => Object::Gateway(fill(o)),
            Object::HTTPRoute(o) => Object::HTTPRoute(fill(o)),
            Object::GRPCRoute(o) => Object::GRPCRoute(fill(o)),
            Object::AuthorizationPolicy(o) => Object::AuthorizationPolicy(fill(o)),
            Object::PeerAuthentication(o) => Object::PeerAuthentication(fill(o)),
            Object::RequestAuthentication(o) => Object::RequestAuthentication(fill(o)),
            Object::IstioGateway(o) => Object::IstioGateway(fill(o)),
            Object::VirtualService(o) => Object::VirtualService(fill(o)),
            Object::DestinationRule(o) => Object::DestinationRule(fill(o)),
            Object::ServiceEntry(o) => Object::ServiceEntry(fill(o)),
            Object::Telemetry(o) => Object::Telemetry(fill(o)),
            Object::ConfigMap(o) => Object::ConfigMap(fill(o)),
        }
    }
}

/// How strictly to check Pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRules {
    /// From the API server: a Pod may still be pending (no IP, no node yet).
    Cluster,
    /// From a YAML directory: a Pod describes a running workload and must have its IP and node.
    Declared,
}

fn valid_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

/// Checks what the translation relies on, so a bad object is refused with a reason instead of
/// being half-used.
pub fn validate(object: &Object, pods: PodRules) -> Result<(), ObjectError> {
    let key = object.key();
    let invalid = |reason: Invalid| ObjectError::Invalid { key: key.clone(), reason };
    if key.name.is_empty() {
        return Err(invalid(Invalid("metadata.name is missing".to_owned())));
    }
    match object {
        Object::Pod(pod) => {
            let status_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
            if let Some(ip) = status_ip.filter(|ip| !valid_ip(ip)) {
                return Err(invalid(Invalid(format!("status.podIP {ip:?} is not an IP address"))));
            }
            for ip in pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten()) {
                if !valid_ip(&ip.ip) {
                    return Err(invalid(Invalid(format!("status.podIPs entry {:?} is not an IP address", ip.ip))));
                }
            }
            if pods == PodRules::Declared {
                if status_ip.is_none() {
                    return Err(invalid(Invalid("status.podIP is missing; a declared Pod needs its IP".to_owned())));
                }
                if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default().is_empty() {
                    return Err(invalid(Invalid("spec.nodeName is missing; a declared Pod needs its node".to_owned())));
                }
            }
        }
        Object::Service(svc) => {
            let spec = svc.spec.as_ref();
            for ip in spec.and_then(|s| s.cluster_ip.as_deref()).into_iter() {
                if !ip.is_empty() && ip != "None" && !valid_ip(ip) {
                    return Err(invalid(Invalid(format!("spec.clusterIP {ip:?} is not an IP address"))));
                }
            }
            for port in spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                if !(1..=65535).contains(&port.port) {
                    return Err(invalid(Invalid(format!("port {} is out of range", port.port))));
                }
            }
        }
        Object::Secret(secret) => validate::tls_secret(secret).map_err(invalid)?,
        // Never refused: what cannot be evaluated fails closed in translation (`authz::review`).
        Object::AuthorizationPolicy(_) => {}
        Object::HTTPRoute(route) => validate::http_route(&route.spec).map_err(invalid)?,
        Object::GRPCRoute(route) => validate::http_route(&route.spec.as_http().map_err(invalid)?).map_err(invalid)?,
        Object::IstioGateway(gw) => validate::istio_gateway(&gw.spec).map_err(invalid)?,
        Object::VirtualService(vs) => validate::virtual_service(&vs.spec).map_err(invalid)?,
        Object::DestinationRule(dr) => validate::destination_rule(&dr.spec).map_err(invalid)?,
        Object::ServiceEntry(se) => validate::service_entry(&se.spec).map_err(invalid)?,
        Object::Telemetry(t) => validate::telemetry(&t.spec).map_err(invalid)?,
        Object::ConfigMap(cm) => validate::mesh_config_map(cm).map_err(invalid)?,
        _ => {}
    }
    Ok(())
}

/// Every object the control plane knows, by kind and key.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    by_key: BTreeMap<ObjectKey, Object>,
}

impl Objects {
    /// The objects of a multi-document YAML string (tests; panics on what does not parse).
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub(crate) fn from_yaml(yaml: &str) -> Objects {
        let mut all = Objects::default();
        for doc in serde_norway::Deserializer::from_str(yaml) {
            let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            for o in Object::from_value(value) {
                all.insert(o.unwrap());
            }
        }
        all
    }

    /// Adds or replaces an object.
    pub fn insert(&mut self, object: Object) {
        self.by_key.insert(object.key(), object);
    }

    /// Removes an object.
    pub fn remove(&mut self, key: &ObjectKey) -> Option<Object> {
        self.by_key.remove(key)
    }

    /// Replaces every object of `kind` (a relist).
    pub fn replace_kind(&mut self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        self.by_key.retain(|k, _| k.kind != kind);
        for o in objects {
            self.insert(o);
        }
    }

    /// The object with this key.
    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.by_key.get(key)
    }

    /// All objects, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &Object)> {
        self.by_key.iter()
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Objects of one kind, in key order.
    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        let start = ObjectKey { kind, namespace: String::new(), name: String::new() };
        self.by_key.range(start..).take_while(move |(k, _)| k.kind == kind).map(|(_, o)| o)
    }

    /// Namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.of_kind(Kind::Namespace).filter_map(|o| if let Object::Namespace(x) = o { Some(x) } else { None })
    }

    /// Nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.of_kind(Kind::Node).filter_map(|o| if let Object::Node(x) = o { Some(x) } else { None })
    }

    /// Pods.
    pub fn pods(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.of_kind(Kind::Pod).filter_map(|o| if let Object::Pod(x) = o { Some(x) } else { None })
    }

    /// Services.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.of_kind(Kind::Service).filter_map(|o| if let Object::Service(x) = o { Some(x) } else { None })
    }

    /// EndpointSlices.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.of_kind(Kind::EndpointSlice).filter_map(|o| if let Object::EndpointSlice(x) = o { Some(x) } else { None })
    }

    /// Gateways.
    pub fn gateways(&self) -> impl Iterator<Item = &Arc<Gateway>> {
        self.of_kind(Kind::Gateway).filter_map(|o| if let Object::Gateway(x) = o { Some(x) } else { None })
    }

    /// The TLS Secret `namespace/name`.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<&Arc<Secret>> {
        let key = ObjectKey { kind: Kind::Secret, namespace: namespace.to_owned(), name: name.to_owned() };
        match self.get(&key) {
            Some(Object::Secret(s)) => Some(s),
            _ => None,
        }
    }

    /// Istio Gateways.
    pub fn istio_gateways(&self) -> impl Iterator<Item = &Arc<IstioGateway>> {
        self.of_kind(Kind::IstioGateway).filter_map(|o| if let Object::IstioGateway(x) = o { Some(x) } else { None })
    }

    /// VirtualServices.
    pub fn virtual_services(&self) -> impl Iterator<Item = &Arc<VirtualService>> {
        self.of_kind(Kind::VirtualService)
            .filter_map(|o| if let Object::VirtualService(x) = o { Some(x) } else { None })
    }

    /// DestinationRules.
    pub fn destination_rules(&self) -> impl Iterator<Item = &Arc<DestinationRule>> {
        self.of_kind(Kind::DestinationRule)
            .filter_map(|o| if let Object::DestinationRule(x) = o { Some(x) } else { None })
    }

    /// ServiceEntries.
    pub fn service_entries(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.of_kind(Kind::ServiceEntry).filter_map(|o| if let Object::ServiceEntry(x) = o { Some(x) } else { None })
    }

    /// The ConfigMap `namespace/name`.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<&Arc<ConfigMap>> {
        let key = ObjectKey { kind: Kind::ConfigMap, namespace: namespace.to_owned(), name: name.to_owned() };
        match self.get(&key) {
            Some(Object::ConfigMap(c)) => Some(c),
            _ => None,
        }
    }

    /// GRPCRoutes.
    pub fn grpc_routes(&self) -> impl Iterator<Item = &Arc<GRPCRoute>> {
        self.of_kind(Kind::GRPCRoute).filter_map(|o| if let Object::GRPCRoute(x) = o { Some(x) } else { None })
    }

    /// HTTPRoutes.
    pub fn http_routes(&self) -> impl Iterator<Item = &Arc<HTTPRoute>> {
        self.of_kind(Kind::HTTPRoute).filter_map(|o| if let Object::HTTPRoute(x) = o { Some(x) } else { None })
    }

    /// AuthorizationPolicies.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &Arc<AuthorizationPolicy>> {
        self.of_kind(Kind::AuthorizationPolicy)
            .filter_map(|o| if let Object::AuthorizationPolicy(x) = o { Some(x) } else { None })
    }

    /// PeerAuthentications.
    pub fn peer_authentications(&self) -> impl Iterator<Item = &Arc<PeerAuthentication>> {
        self.of_kind(Kind::PeerAuthentication)
            .filter_map(|o| if let Object::PeerAuthentication(x) = o { Some(x) } else { None })
    }

    /// Telemetries.
    pub fn telemetries(&self) -> impl Iterator<Item = &Arc<Telemetry>> {
        self.of_kind(Kind::Telemetry).filter_map(|o| if let Object::Telemetry(x) = o { Some(x) } else { None })
    }

    /// RequestAuthentications.
    pub fn request_authentications(&self) -> impl Iterator<Item = &Arc<RequestAuthentication>> {
        self.of_kind(Kind::RequestAuthentication)
            .filter_map(|o| if let Object::RequestAuthentication(x) = o { Some(x) } else { None })
    }

    /// Count of objects per kind.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut counts = BTreeMap::new();
        for k in self.by_key.keys() {
            *counts.entry(k.kind).or_default() += 1;
        }
        counts
    }
}

/// A problem with the configuration a source read, kept for the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    /// Where: a file path, or `kubernetes`.
    pub source: String,
    /// What.
    pub message: String,
}

/// The current objects, shared between the sources (writers) and the translator (reader).
#[derive(Debug)]
pub struct Store {
    objects: Mutex<Objects>,
    errors: Mutex<Vec<ConfigError>>,
    generation: watch::Sender<u64>,
    /// Sources (or kinds) still loading their initial state.
    unsynced: Mutex<usize>,
    synced: watch::Sender<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Writers never panic while holding the lock, so poisoned data is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// An empty store.
    pub fn new() -> Arc<Store> {
        Arc::new(Store {
            objects: Mutex::default(),
            errors: Mutex::default(),
            generation: watch::Sender::new(0),
            unsynced: Mutex::new(0),
            synced: watch::Sender::new(false),
        })
    }

    /// Announces `n` more sources whose initial load must finish before the state is served.
    pub fn expect_sources(&self, n: usize) {
        *lock(&self.unsynced) += n;
    }

    /// One announced source has loaded its initial state.
    pub fn source_synced(&self) {
        let mut pending = lock(&self.unsynced);
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.synced.send_replace(true);
        }
    }

    /// Resolves once every announced source has loaded.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as the store, which the caller holds.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Applies a change and tells the translator.
    pub fn update(&self, change: impl FnOnce(&mut Objects)) {
        change(&mut lock(&self.objects));
        self.generation.send_modify(|g| *g += 1);
    }

    /// A copy of the current objects (cheap: objects are shared).
    pub fn snapshot(&self) -> Objects {
        lock(&self.objects).clone()
    }

    /// Replaces the list of current configuration problems of one source.
    pub fn set_errors(&self, source_prefix: &str, errors: Vec<ConfigError>) {
        let mut all = lock(&self.errors);
        all.retain(|e| !e.source.starts_with(source_prefix));
        all.extend(errors);
    }

    /// Current configuration problems.
    pub fn errors(&self) -> Vec<ConfigError> {
        lock(&self.errors).clone()
    }

    /// Notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
