//! A large mesh around a small one: objects that fill the proxies' state without touching the
//! traffic being measured, so a benchmark can compare the same path with ten workloads and with
//! ten thousand.
//!
//! The padding lives in its own ambient namespaces (`pad-0` …), on nodes that do not exist (no
//! ztunnel gets certificates for its pods, and no pod of it has a network), with addresses out of
//! the harness's ranges (`10.100.0.0/16` for pods, `10.101.0.0/16` for service VIPs). Its
//! services select its pods; its L4 policies are an even mix of namespace-wide and
//! selector-scoped ALLOW rules in its own namespaces, and its L7 policies target its services, so
//! none applies to a measured connection or request.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::mesh::{Mesh, MeshPod};

/// The benchmarks' scale options.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Workloads in the padded mesh of the scale measurement (0: no scale measurement).
    #[arg(long, default_value_t = 10_000)]
    pub pad_workloads: usize,
    /// Services in the padded mesh.
    #[arg(long, default_value_t = 1_000)]
    pub pad_services: usize,
    /// AuthorizationPolicies in the padded mesh (L4, and as many L7 where a waypoint is measured).
    #[arg(long, default_value_t = 1_000)]
    pub pad_policies: usize,
    /// Measure only the scale: small, padded, small again.
    #[arg(long)]
    pub scale_only: bool,
}

impl ScaleArgs {
    /// The padding asked for; with `l7`, L7 policies as many as L4 ones.
    pub fn padding(&self, l7: bool) -> Padding {
        Padding {
            workloads: self.pad_workloads,
            services: self.pad_services,
            policies: self.pad_policies,
            l7_policies: if l7 { self.pad_policies } else { 0 },
        }
    }
}

/// How much padding.
#[derive(Debug, Clone, Copy)]
pub struct Padding {
    /// Pods.
    pub workloads: usize,
    /// Services, each selecting an equal share of the pods.
    pub services: usize,
    /// L4 AuthorizationPolicies (for ztunnels).
    pub policies: usize,
    /// L7 AuthorizationPolicies (for waypoints), each targeting a padding service.
    pub l7_policies: usize,
}

/// Namespaces the padding spreads over.
const NAMESPACES: usize = 10;

fn address(base: [u8; 2], i: usize) -> Result<Ipv4Addr> {
    let (hi, lo) = (i / 250, i % 250 + 1);
    match u8::try_from(hi) {
        Ok(hi) => Ok(Ipv4Addr::new(base[0], base[1], hi, lo as u8)),
        Err(_) => bail!("padding of more than 64,000 objects of a kind does not fit its /16"),
    }
}

impl Padding {
    /// The padding as one YAML file of many documents.
    pub fn yaml(&self) -> Result<String> {
        let mut out = String::new();
        for n in 0..NAMESPACES {
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: pad-{n}\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n"
            );
        }
        let services = self.services.max(1);
        for i in 0..self.workloads {
            let ip = address([10, 100], i)?;
            let (ns, app) = (i % NAMESPACES, i % services);
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pad-{i}\n  namespace: pad-{ns}\n  uid: pad-{i}\n  labels:\n    app: pad-{app}\nspec:\n  nodeName: pad-node-{}\n  serviceAccountName: pad-{app}\n  containers: []\nstatus:\n  phase: Running\n  podIP: {ip}\n---\n",
                i % 100
            );
        }
        for j in 0..self.services {
            let vip = address([10, 101], j)?;
            // A service's pods are those with `app: pad-<j>`: in namespace j % NAMESPACES.
            let ns = j % NAMESPACES;
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: pad-{j}\n  namespace: pad-{ns}\nspec:\n  clusterIP: {vip}\n  selector:\n    app: pad-{j}\n  ports:\n    - port: 80\n      targetPort: 8080\n---\n"
            );
        }
        for k in 0..self.policies {
            let ns = k % NAMESPACES;
            let selector =
                if k % 2 == 0 { String::new() } else { format!("  selector:\n    matchLabels:\n      app: pad-{k}\n") };
            let _ = write!(
                out,
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: pad-{k}\n  namespace: pad-{ns}\nspec:\n{selector}  action: ALLOW\n  rules:\n    - from:\n        - source:\n            principals: [\"cluster.local/ns/pad-{ns}/sa/pad-{k}\"]\n---\n"
            );
        }
        for k in 0..self.l7_policies {
            let (ns, svc) = (k % NAMESPACES, k % services);
            let _ = write!(
                out,
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: pad-l7-{k}\n  namespace: pad-{ns}\nspec:\n  targetRefs:\n    - {{group: \"\", kind: Service, name: pad-{svc}}}\n  action: DENY\n  rules:\n    - to:\n        - operation:\n            methods: [DELETE]\n            paths: [\"/pad-{k}*\"]\n---\n"
            );
        }
        Ok(out)
    }

    /// Waits until `waypoint`'s state holds at least the padding's workloads and L7 policies.
    pub async fn wait_for_waypoint(&self, mesh: &Mesh, waypoint: &MeshPod, timeout: Duration) -> Result<()> {
        mesh.wait_until("the waypoint to receive the padding", timeout, || async move {
            let Ok(dump) = mesh.waypoint_config(waypoint).await else { return false };
            let held = &dump["waypoint"];
            held["workloads"].as_u64().is_some_and(|n| n as usize >= self.workloads)
                && held["l7_policies"].as_array().is_some_and(|p| p.len() >= self.l7_policies)
        })
        .await
    }

    /// Waits until `waypoint`'s state holds at most `workloads`.
    pub async fn wait_for_waypoint_to_drop(
        &self,
        mesh: &Mesh,
        waypoint: &MeshPod,
        workloads: usize,
        timeout: Duration,
    ) -> Result<()> {
        mesh.wait_until("the waypoint to drop the padding", timeout, || async move {
            let Ok(dump) = mesh.waypoint_config(waypoint).await else { return false };
            dump["waypoint"]["workloads"].as_u64().is_some_and(|n| n as usize <= workloads)
        })
        .await
    }

    /// Writes the padding into `mesh`'s objects and waits until node `index`'s ztunnel holds at
    /// least the padding's workloads and policies.
    pub async fn apply(&self, mesh: &Mesh, nodes: &[u8], timeout: Duration) -> Result<()> {
        mesh.apply("zz-padding", &self.yaml()?)?;
        for &index in nodes {
            let what = format!("node {index}'s ztunnel to receive the padding");
            mesh.wait_until(&what, timeout, || async move {
                let Ok(dump) = mesh.config_dump(index).await else { return false };
                let count = |k: &str| dump["mesh"][k].as_array().map_or(0, Vec::len);
                count("workloads") >= self.workloads
                    && count("services") >= self.services
                    && count("policies") >= self.policies
            })
            .await?;
        }
        Ok(())
    }

    /// Removes the padding and waits until node `index`'s ztunnel holds at most `workloads`.
    pub async fn remove(&self, mesh: &Mesh, nodes: &[u8], workloads: usize, timeout: Duration) -> Result<()> {
        mesh.delete("zz-padding")?;
        for &index in nodes {
            let what = format!("node {index}'s ztunnel to drop the padding");
            mesh.wait_until(&what, timeout, || async move {
                let Ok(dump) = mesh.config_dump(index).await else { return false };
                dump["mesh"]["workloads"].as_array().is_some_and(|w| w.len() <= workloads)
            })
            .await?;
        }
        Ok(())
    }
}
