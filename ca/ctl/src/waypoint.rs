//! The objects a namespace's waypoint is made of, as `istioctl waypoint generate` describes them:
//! the Gateway (class `istio-waypoint`, an HBONE listener on 15008) and, since no controller here
//! deploys Gateways, what runs it: a ServiceAccount (the waypoint's identity), a Deployment of the
//! `waypoint` image and a Service selecting its pods.

use serde_json::{Value, json};

use proto::control::CA_AUDIENCE as DEFAULT_AUDIENCE;
use proto::labels::{DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE, WAYPOINT_FOR_LABEL, WAYPOINT_GATEWAY_CLASS};

/// The label tying a waypoint's Deployment, pods and Service to its Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Istio's canonical service label: on a proxy's pods, its Deployment's name.
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";

/// What to generate.
#[derive(Debug, Clone)]
pub struct WaypointSpec {
    /// Namespace.
    pub namespace: String,
    /// Gateway (and ServiceAccount, Deployment, Service) name.
    pub name: String,
    /// What traffic it takes: `service`, `workload`, `all` or `none` (`istio.io/waypoint-for`).
    pub traffic_for: String,
    /// The `waypoint` image.
    pub image: String,
    /// Pods.
    pub replicas: u32,
    /// The CA's address as pods reach it.
    pub ca_address: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

impl WaypointSpec {
    /// Defaults for `namespace` (`waypoint`, for services, one replica).
    pub fn new(namespace: &str) -> WaypointSpec {
        WaypointSpec {
            namespace: namespace.to_owned(),
            name: "waypoint".into(),
            traffic_for: "service".into(),
            image: format!("ambient-mesh/waypoint:{}", env!("CARGO_PKG_VERSION")),
            replicas: 1,
            ca_address: "ca.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    /// The Gateway only.
    pub fn gateway(&self) -> Value {
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {WAYPOINT_FOR_LABEL: self.traffic_for},
            },
            "spec": {
                "gatewayClassName": WAYPOINT_GATEWAY_CLASS,
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        })
    }

    /// Gateway, ServiceAccount, Deployment and Service, in the order they should be applied.
    pub fn objects(&self) -> Vec<Value> {
        let (name, namespace) = (&self.name, &self.namespace);
        let labels = json!({
            GATEWAY_NAME_LABEL: name,
            "app.kubernetes.io/name": "waypoint",
            "app.kubernetes.io/part-of": "ambient-mesh",
        });
        let service_account = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
        });
        let mut pod_labels = labels.clone();
        pod_labels[DATAPLANE_MODE_LABEL] = json!(DATAPLANE_MODE_NONE);
        // The workload's name for metrics scrapers (deploy/prometheus.yaml labels it `workload`).
        pod_labels[CANONICAL_NAME_LABEL] = json!(name);
        let deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                "template": {
                    "metadata": {
                        "labels": pod_labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": "15020",
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "terminationGracePeriodSeconds": 30,
                        "containers": [proxy_container(
                            "waypoint",
                            &self.image,
                            &["--name", name, "--ca-addr", &self.ca_address, "--trust-domain", &self.trust_domain],
                            &[("mesh", 15008)],
                        )],
                        "volumes": credential_volumes(),
                    },
                },
            },
        });
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "selector": {GATEWAY_NAME_LABEL: name},
                "ports": [
                    {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP"},
                    {"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"},
                ],
            },
        });
        vec![self.gateway(), service_account, deployment, service]
    }
}

/// A container of the `waypoint` image as the mesh runs it (a waypoint or an ingress gateway):
/// `args` then JSON logs, its namespace, service account and address from the pod, `ports` and the
/// metrics and readiness ports, a readiness probe, modest resources, the restricted security
/// context, and the token and roots mounted where the binary looks.
pub(crate) fn proxy_container(name: &str, image: &str, args: &[&str], ports: &[(&str, u16)]) -> Value {
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--log-format", "json"]);
    let ports: Vec<Value> = ports
        .iter()
        .chain(&[("metrics", 15020), ("status-port", 15021)])
        .map(|(name, port)| json!({"name": name, "containerPort": port, "protocol": "TCP"}))
        .collect();
    json!({
        "name": name,
        "image": image,
        "args": args,
        "env": [
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "ports": ports,
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": restricted_container(),
        "volumeMounts": credential_mounts(),
    })
}

/// A proxy container's security context: non-root, no capabilities, read-only root.
fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": 1337,
        "capabilities": {"drop": ["ALL"]},
    })
}

/// Where a proxy reads its service-account token (audience `istio-ca`) and the mesh's roots.
fn credential_mounts() -> Value {
    json!([
        {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
        {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true},
    ])
}

/// The volumes behind [`credential_mounts`].
pub(crate) fn credential_volumes() -> Value {
    json!([
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": DEFAULT_AUDIENCE, "expirationSeconds": 43200, "path": "istio-token",
        }}]}},
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
    ])
}
