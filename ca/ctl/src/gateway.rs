//! The objects an ingress gateway is made of, as Istio's `istio-ingressgateway` chart lays them
//! out: a ServiceAccount (the gateway's identity, which the CA sends its TLS credentials to), a
//! Deployment of the `waypoint` image in ingress mode whose pods carry the labels Istio Gateways
//! select (`istio: ingressgateway`), and a LoadBalancer Service in front of them. The pods bind the
//! servers' ports themselves (80 and 443 by default) as a non-root user: the pod lowers
//! `net.ipv4.ip_unprivileged_port_start` to 0, as Istio's gateways do.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use proto::labels::{DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};

use crate::waypoint::{credential_volumes, proxy_container};

/// What to generate.
#[derive(Debug, Clone)]
pub struct IngressGatewaySpec {
    /// Namespace (its TLS Secrets live there).
    pub namespace: String,
    /// ServiceAccount, Deployment and Service name.
    pub name: String,
    /// The pods' labels that Gateways select.
    pub labels: BTreeMap<String, String>,
    /// The ports the Service exposes (the Gateways' server ports).
    pub ports: Vec<u16>,
    /// The `waypoint` image.
    pub image: String,
    /// Pods.
    pub replicas: u32,
    /// The CA's address as pods reach it.
    pub ca_address: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

impl IngressGatewaySpec {
    /// Istio's defaults: `istio-ingressgateway` in `istio-system`, label `istio: ingressgateway`,
    /// ports 80 and 443, one replica.
    pub fn new(namespace: &str) -> IngressGatewaySpec {
        IngressGatewaySpec {
            namespace: namespace.to_owned(),
            name: "istio-ingressgateway".into(),
            labels: BTreeMap::from([("istio".to_owned(), "ingressgateway".to_owned())]),
            ports: vec![80, 443],
            image: format!("ambient-mesh/waypoint:{}", env!("CARGO_PKG_VERSION")),
            replicas: 1,
            ca_address: "ca.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    /// ServiceAccount, Deployment and Service, in the order they should be applied.
    pub fn objects(&self) -> Vec<Value> {
        let (name, namespace) = (&self.name, &self.namespace);
        let meta_labels = json!({
            "app": name,
            "app.kubernetes.io/name": "ingress-gateway",
            "app.kubernetes.io/part-of": "ambient-mesh",
        });
        let mut selector = serde_json::Map::new();
        selector.insert("app".into(), json!(name));
        for (k, v) in &self.labels {
            selector.insert(k.clone(), json!(v));
        }
        let mut pod_labels = selector.clone();
        pod_labels.insert("app.kubernetes.io/name".into(), json!("ingress-gateway"));
        pod_labels.insert("app.kubernetes.io/part-of".into(), json!("ambient-mesh"));
        pod_labels.insert(DATAPLANE_MODE_LABEL.into(), json!(DATAPLANE_MODE_NONE));
        pod_labels.insert(crate::waypoint::CANONICAL_NAME_LABEL.into(), json!(name));
        let mut args: Vec<String> = ["--ingress", "--name", name, "--ca-addr", &self.ca_address]
            .into_iter()
            .chain(["--trust-domain", &self.trust_domain])
            .map(str::to_owned)
            .collect();
        for (k, v) in &self.labels {
            args.extend(["--gateway-label".to_owned(), format!("{k}={v}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let port_names: Vec<(String, u16)> = self.ports.iter().map(|p| (format!("port-{p}"), *p)).collect();
        let ports: Vec<(&str, u16)> = port_names.iter().map(|(n, p)| (n.as_str(), *p)).collect();
        let service_ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": format!("port-{p}"), "port": p, "targetPort": p, "protocol": "TCP"}))
            .chain([json!({"name": "status-port", "port": 15021, "targetPort": 15021, "protocol": "TCP"})])
            .collect();
        let service_account = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
        });
        let deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": selector},
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
                        "securityContext": {"sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]},
                        "containers": [proxy_container("istio-proxy", &self.image, &args, &ports)],
                        "volumes": credential_volumes(),
                    },
                },
            },
        });
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": meta_labels},
            "spec": {"type": "LoadBalancer", "selector": selector, "ports": service_ports},
        });
        vec![service_account, deployment, service]
    }
}
