//! Mesh state: what the proxies need to know, as our own domain types.
//!
//! The translator produces these from Kubernetes objects; the xDS server converts them to Istio's
//! wire types at the edge ([`Workload::to_proto`] and friends), and the admin API dumps them as JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proto::SpiffeId;
use proto::api::istio::security as pb_authz;
use proto::api::istio::workload as pb;
use serde::Serialize;

/// The waypoint a service or workload sends its traffic through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaypointRef {
    /// The waypoint Gateway's namespace.
    pub namespace: String,
    /// The waypoint Gateway's name.
    pub name: String,
    /// The waypoint Service's VIP, when it has one.
    pub address: Option<IpAddr>,
    /// The waypoint Service's hostname.
    pub hostname: String,
    /// HBONE port.
    pub port: u16,
}

impl WaypointRef {
    fn to_proto(&self) -> pb::GatewayAddress {
        let destination = match self.address {
            Some(ip) => pb::gateway_address::Destination::Address(pb::NetworkAddress {
                length: None,
                network: String::new(),
                address: ip_bytes(ip),
            }),
            None => pb::gateway_address::Destination::Hostname(pb::NamespacedHostname {
                namespace: self.namespace.clone(),
                hostname: self.hostname.clone(),
            }),
        };
        pb::GatewayAddress { destination: Some(destination), hbone_mtls_port: u32::from(self.port) }
    }
}

/// A service port and where it lands on a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PortMapping {
    /// The port clients use.
    pub service_port: u16,
    /// The workload port; 0 at service level means "named, resolved per workload".
    pub target_port: u16,
    /// The application protocol the Service declares for it (service level only, as istiod
    /// sends it; `UNKNOWN` on a workload's ports).
    #[serde(serialize_with = "app_protocol_name", skip_serializing_if = "is_unknown")]
    pub app_protocol: pb::AppProtocol,
}

fn app_protocol_name<S: serde::Serializer>(p: &pb::AppProtocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.as_str_name())
}

fn is_unknown(p: &pb::AppProtocol) -> bool {
    *p == pb::AppProtocol::Unknown
}

impl PortMapping {
    /// A mapping with no declared application protocol.
    pub fn new(service_port: u16, target_port: u16) -> Self {
        PortMapping { service_port, target_port, app_protocol: pb::AppProtocol::Unknown }
    }

    fn to_proto(self) -> pb::Port {
        pb::Port {
            service_port: u32::from(self.service_port),
            target_port: u32::from(self.target_port),
            app_protocol: self.app_protocol as i32,
        }
    }
}

/// How telemetry names a workload's controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WorkloadType {
    /// Owned by a Deployment (or another long-running controller).
    Deployment,
    /// Owned by a CronJob.
    CronJob,
    /// A bare Pod.
    Pod,
    /// Owned by a Job.
    Job,
}

/// A workload (a Pod) as ztunnel sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Workload {
    /// Unique id, `<cluster>//Pod/<namespace>/<name>`; the xDS resource name.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Pod IPs.
    pub ips: Vec<IpAddr>,
    /// A DNS name the node proxy resolves when it connects (a ServiceEntry endpoint with
    /// `resolution: DNS`); then `ips` is empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Node the pod runs on.
    pub node: String,
    /// SPIFFE identity (trust domain, namespace, service account).
    pub identity: SpiffeId,
    /// Whether ztunnel captures it (ambient namespace, not opted out).
    pub captured: bool,
    /// Whether it terminates HBONE itself (a waypoint): reached over HBONE, never captured.
    pub native_hbone: bool,
    /// The waypoint its traffic goes through, if any.
    pub waypoint: Option<WaypointRef>,
    /// Services it backs, keyed `namespace/hostname`, with the ports it serves them on.
    pub services: BTreeMap<String, Vec<PortMapping>>,
    /// Selector-based policies that apply to it, `namespace/name`.
    pub authorization_policies: Vec<String>,
    /// Ready to receive traffic.
    pub healthy: bool,
    /// Canonical service name (telemetry).
    pub canonical_name: String,
    /// Canonical revision (telemetry).
    pub canonical_revision: String,
    /// Controller kind (telemetry).
    pub workload_type: WorkloadType,
    /// Controller name (telemetry).
    pub workload_name: String,
    /// Cluster id.
    pub cluster_id: String,
    /// Where it runs, from its node's topology labels (or its own `istio-locality` label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
}

/// A workload's region, zone and subzone (any may be empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// `topology.istio.io/subzone`.
    pub subzone: String,
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

impl Workload {
    /// Istio's wire form.
    pub fn to_proto(&self) -> pb::Workload {
        pb::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            addresses: self.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            hostname: self.hostname.clone().unwrap_or_default(),
            tunnel_protocol: if self.captured || self.native_hbone {
                pb::TunnelProtocol::Hbone
            } else {
                pb::TunnelProtocol::None
            } as i32,
            native_tunnel: self.native_hbone,
            trust_domain: self.identity.trust_domain().to_owned(),
            service_account: self.identity.service_account().to_owned(),
            waypoint: self.waypoint.as_ref().map(WaypointRef::to_proto),
            node: self.node.clone(),
            canonical_name: self.canonical_name.clone(),
            canonical_revision: self.canonical_revision.clone(),
            workload_type: match self.workload_type {
                WorkloadType::Deployment => pb::WorkloadType::Deployment,
                WorkloadType::CronJob => pb::WorkloadType::Cronjob,
                WorkloadType::Pod => pb::WorkloadType::Pod,
                WorkloadType::Job => pb::WorkloadType::Job,
            } as i32,
            workload_name: self.workload_name.clone(),
            services: self
                .services
                .iter()
                .map(|(k, ports)| (k.clone(), pb::PortList { ports: ports.iter().map(|p| p.to_proto()).collect() }))
                .collect(),
            authorization_policies: self.authorization_policies.clone(),
            status: if self.healthy { pb::WorkloadStatus::Healthy } else { pb::WorkloadStatus::Unhealthy } as i32,
            cluster_id: self.cluster_id.clone(),
            locality: self.locality.as_ref().map(|l| pb::Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            }),
            ..Default::default()
        }
    }
}

/// A service as ztunnel sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// FQDN.
    pub hostname: String,
    /// ClusterIPs; empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Ports; a named target port shows as 0 and is resolved per workload.
    pub ports: Vec<PortMapping>,
    /// The waypoint its traffic goes through, if any.
    pub waypoint: Option<WaypointRef>,
    /// Connections go to the address the client dialed, not to an endpoint (a ServiceEntry
    /// with `resolution: NONE`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

impl Service {
    /// The xDS resource name, `namespace/hostname`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }

    /// Istio's wire form.
    pub fn to_proto(&self) -> pb::Service {
        pb::Service {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            hostname: self.hostname.clone(),
            addresses: self
                .vips
                .iter()
                .map(|ip| pb::NetworkAddress { network: String::new(), address: ip_bytes(*ip), length: None })
                .collect(),
            ports: self.ports.iter().map(|p| p.to_proto()).collect(),
            waypoint: self.waypoint.as_ref().map(WaypointRef::to_proto),
            load_balancing: self.passthrough.then(|| pb::LoadBalancing {
                mode: pb::load_balancing::Mode::Passthrough as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Where an L4 policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scope {
    /// Every workload in the mesh (root namespace, no selector).
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads whose labels the selector matches (listed on each workload).
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Allow (and deny what no ALLOW policy matches).
    Allow,
    /// Deny.
    Deny,
}

/// A string matcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any value is present.
    Presence,
}

impl StringMatch {
    /// Istio's wildcard forms: `*` (present), `*x` (suffix), `x*` (prefix), otherwise exact.
    pub fn from_pattern(p: &str) -> StringMatch {
        if p == "*" {
            StringMatch::Presence
        } else if let Some(rest) = p.strip_prefix('*') {
            StringMatch::Suffix(rest.to_owned())
        } else if let Some(rest) = p.strip_suffix('*') {
            StringMatch::Prefix(rest.to_owned())
        } else {
            StringMatch::Exact(p.to_owned())
        }
    }

    fn to_proto(&self) -> pb_authz::StringMatch {
        use pb_authz::string_match::MatchType;
        let m = match self {
            StringMatch::Exact(s) => MatchType::Exact(s.clone()),
            StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
            StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        };
        pb_authz::StringMatch { match_type: Some(m) }
    }
}

/// An IP prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IpNet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpNet {
    fn to_proto(self) -> pb_authz::Address {
        pb_authz::Address { address: ip_bytes(self.addr), length: u32::from(self.prefix) }
    }
}

/// Conditions on a connection: within a field values are alternatives; set fields all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    /// Source namespaces.
    pub namespaces: Vec<StringMatch>,
    /// Excluded source namespaces.
    pub not_namespaces: Vec<StringMatch>,
    /// Source service accounts, `(namespace, name)`.
    pub service_accounts: Vec<(String, String)>,
    /// Excluded source service accounts.
    pub not_service_accounts: Vec<(String, String)>,
    /// Source principals (`<td>/ns/<ns>/sa/<sa>`).
    pub principals: Vec<StringMatch>,
    /// Excluded source principals.
    pub not_principals: Vec<StringMatch>,
    /// Source IP prefixes.
    pub source_ips: Vec<IpNet>,
    /// Excluded source IP prefixes.
    pub not_source_ips: Vec<IpNet>,
    /// Destination IP prefixes.
    pub destination_ips: Vec<IpNet>,
    /// Excluded destination IP prefixes.
    pub not_destination_ips: Vec<IpNet>,
    /// Destination ports.
    pub destination_ports: Vec<u16>,
    /// Excluded destination ports.
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// Whether it sets no condition (matches every connection).
    pub fn is_empty(&self) -> bool {
        *self == Match::default()
    }

    fn to_proto(&self) -> pb_authz::Match {
        let strings = |v: &[StringMatch]| v.iter().map(StringMatch::to_proto).collect();
        let nets = |v: &[IpNet]| v.iter().map(|n| n.to_proto()).collect();
        let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
        let accounts = |v: &[(String, String)]| {
            v.iter()
                .map(|(ns, sa)| pb_authz::ServiceAccountMatch { namespace: ns.clone(), service_account: sa.clone() })
                .collect()
        };
        pb_authz::Match {
            namespaces: strings(&self.namespaces),
            not_namespaces: strings(&self.not_namespaces),
            service_accounts: accounts(&self.service_accounts),
            not_service_accounts: accounts(&self.not_service_accounts),
            principals: strings(&self.principals),
            not_principals: strings(&self.not_principals),
            source_ips: nets(&self.source_ips),
            not_source_ips: nets(&self.not_source_ips),
            destination_ips: nets(&self.destination_ips),
            not_destination_ips: nets(&self.not_destination_ips),
            destination_ports: ports(&self.destination_ports),
            not_destination_ports: ports(&self.not_destination_ports),
            extensions: Vec::new(),
        }
    }
}

/// An L4 authorization policy as ztunnel enforces it. A policy matches when any rule matches; a
/// rule when all its clauses match; a clause when any of its matches matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Where it applies.
    pub scope: Scope,
    /// What it does.
    pub action: Action,
    /// Rules (clauses of matches).
    pub rules: Vec<Vec<Vec<Match>>>,
    /// Evaluated and logged, never enforced.
    pub dry_run: bool,
}

impl Policy {
    /// The xDS resource name, `namespace/name`.
    pub fn resource_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Istio's wire form.
    pub fn to_proto(&self) -> pb_authz::Authorization {
        pb_authz::Authorization {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            scope: match self.scope {
                Scope::Global => pb_authz::Scope::Global,
                Scope::Namespace => pb_authz::Scope::Namespace,
                Scope::WorkloadSelector => pb_authz::Scope::WorkloadSelector,
            } as i32,
            action: match self.action {
                Action::Allow => pb_authz::Action::Allow,
                Action::Deny => pb_authz::Action::Deny,
            } as i32,
            rules: self
                .rules
                .iter()
                .map(|clauses| pb_authz::Rule {
                    clauses: clauses
                        .iter()
                        .map(|matches| pb_authz::Clause { matches: matches.iter().map(Match::to_proto).collect() })
                        .collect(),
                })
                .collect(),
            dry_run: self.dry_run,
            extensions: Vec::new(),
        }
    }
}

/// A gateway's TLS credential (from a Secret) and the identities it is served to: the service
/// accounts of the gateway pods, in the Secret's namespace, that a Gateway naming it selects.
/// Its debug and JSON forms never show the private key.
#[derive(Clone, PartialEq)]
pub struct ServedCredential {
    /// What is served.
    pub credential: proto::api::ambient::waypoint::v1::GatewayCredential,
    /// SPIFFE IDs allowed to receive it.
    pub readers: std::collections::BTreeSet<String>,
}

impl ServedCredential {
    /// The SHA-256 of the certificate chain's PEM (to tell versions apart in dumps).
    pub fn chain_sha256(&self) -> String {
        proto::tls::fingerprint_sha256(self.credential.cert_chain.as_bytes())
    }
}

impl std::fmt::Debug for ServedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedCredential")
            .field("namespace", &self.credential.namespace)
            .field("name", &self.credential.name)
            .field("chain_sha256", &self.chain_sha256())
            .field("has_ca", &!self.credential.ca_certificates.is_empty())
            .field("readers", &self.readers)
            .finish_non_exhaustive()
    }
}

impl Serialize for ServedCredential {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("ServedCredential", 4)?;
        s.serialize_field("chain_sha256", &self.chain_sha256())?;
        s.serialize_field("has_ca_certificates", &!self.credential.ca_certificates.is_empty())?;
        s.serialize_field("readers", &self.readers)?;
        s.serialize_field("private_key", "(redacted)")?;
        s.end()
    }
}

/// Everything the control plane serves, derived from the current objects.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshState {
    /// Workloads by uid.
    pub workloads: BTreeMap<String, Workload>,
    /// Services by `namespace/hostname`.
    pub services: BTreeMap<String, Service>,
    /// L4 policies by `namespace/name`.
    pub policies: BTreeMap<String, Policy>,
    /// Waypoint routes by service, `namespace/hostname`.
    pub routes: BTreeMap<String, proto::api::ambient::waypoint::v1::ServiceRoutes>,
    /// Waypoint (L7) policies by `namespace/name`.
    pub l7_policies: BTreeMap<String, proto::api::ambient::waypoint::v1::L7Policy>,
    /// Waypoint JWT rules (RequestAuthentication) by `namespace/name`.
    pub request_authns: BTreeMap<String, proto::api::ambient::waypoint::v1::RequestAuthn>,
    /// DestinationRule traffic policies by service, `namespace/hostname`.
    pub destination_policies: BTreeMap<String, proto::api::ambient::waypoint::v1::DestinationPolicy>,
    /// Ingress gateways (Istio Gateways with their bound VirtualServices) by `namespace/name`.
    pub ingress_gateways: BTreeMap<String, proto::api::ambient::waypoint::v1::IngressGateway>,
    /// The TLS credentials gateways terminate with, by `<namespace>/<secret>`, with who may read
    /// them.
    pub gateway_credentials: BTreeMap<String, ServedCredential>,
    /// Mesh-wide settings (from the root namespace's `istio` ConfigMap).
    pub settings: MeshSettings,
    /// Telemetry API settings for waypoints and gateways by `namespace/name`.
    pub telemetry: BTreeMap<String, proto::api::ambient::waypoint::v1::Telemetry>,
    /// Problems found while translating (missing waypoints, unsupported policy fields).
    pub warnings: Vec<String>,
    /// Objects the translation could not take as written (policies it made fail closed), with
    /// the reasons; served with the sources' errors at `/debug/config_errors`.
    pub config_errors: Vec<crate::objects::ConfigError>,
}

/// What ztunnel does with a connection to an address the mesh does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Pass it through (Istio's default).
    #[default]
    AllowAny,
    /// Refuse it.
    RegistryOnly,
}

/// Mesh-wide settings, read from the root namespace's `istio` ConfigMap (key `mesh`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshSettings {
    /// `outboundTrafficPolicy.mode`.
    pub outbound_traffic_policy: OutboundTrafficPolicy,
}

impl MeshSettings {
    /// The wire form.
    pub fn to_proto(&self) -> proto::api::ambient::waypoint::v1::MeshSettings {
        use proto::api::ambient::waypoint::v1::mesh_settings::OutboundTrafficPolicy as Pb;
        let policy = match self.outbound_traffic_policy {
            OutboundTrafficPolicy::AllowAny => Pb::AllowAny,
            OutboundTrafficPolicy::RegistryOnly => Pb::RegistryOnly,
        };
        proto::api::ambient::waypoint::v1::MeshSettings { outbound_traffic_policy: policy as i32 }
    }
}
