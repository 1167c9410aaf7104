//! The tutorial's deployment ([`deploy`]) and checks, shared by the end-to-end tests and the demo:
//! the `version: new` header
//! route with its injected delay cut by the timeout, and the circuit breaker's overflow. Each
//! takes the request to send, so the same check runs against a waypoint (a pod's request to the
//! service) and an ingress gateway (an outside client's request for `xingren.upup`).

use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::apps::{TUTORIAL_VERBATIM, http_server};
use crate::mesh::{HttpAnswer, Mesh, MeshPod, PodSpec};
use crate::topology::NamedNetns;

/// The tutorial's host.
pub const HOST: &str = "xingren.upup";

/// The canary split in PromQL: requests the ingress gateway answered 200 for service `hello`, by
/// the workload that served them (Istio's metric and label names, as the gateway reports them).
pub const SPLIT_PROMQL: &str = r#"sum by (destination_workload) (istio_requests_total{reporter="source", destination_service_name="hello", response_code="200"})"#;

/// What [`deploy`] started.
#[derive(Debug)]
pub struct Deployed {
    /// Pods `default/hello-latest` (node 2) and `default/hello-new` (node 1).
    pub hello: [Arc<MeshPod>; 2],
    /// The ingress gateway's pod, `istio-system/istio-ingressgateway` on node 1 (label
    /// `istio: ingressgateway`).
    pub gateway: Arc<MeshPod>,
}

/// The tutorial's world in `mesh`: namespace `default` in the mesh; pods `hello-latest` and
/// `hello-new` (labels `app: hello`, `version: latest|new`), each answering HTTP on `port` with its
/// name ([`http_server`]); service `default/hello` at `vip`:80 (port named `http`); the tutorial's
/// Gateway, VirtualService and DestinationRule exactly as written; and the ingress gateway they
/// select.
pub async fn deploy(mesh: &mut Mesh, vip: Ipv4Addr, port: u16) -> Result<Deployed> {
    mesh.namespace("default", true).await?;
    let mut pods = Vec::new();
    for (name, version, node) in [("hello-latest", "latest", 2), ("hello-new", "new", 1)] {
        let pod = mesh.pod(PodSpec::new(name, "default", node).label("app", "hello").label("version", version)).await?;
        http_server(pod.listen(port)?, name);
        pods.push(pod);
    }
    mesh.apply(
        "svc-hello",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: default\nspec:\n  clusterIP: {vip}\n  selector:\n    app: hello\n  ports:\n    - name: http\n      port: 80\n      targetPort: {port}\n"
        ),
    )?;
    mesh.apply("tutorial", TUTORIAL_VERBATIM)?;
    let gateway =
        mesh.ingress_gateway("istio-system", "istio-ingressgateway", 1, &[("istio", "ingressgateway")]).await?;
    let [latest, new] = <[Arc<MeshPod>; 2]>::try_from(pods).map_err(|_| anyhow::anyhow!("two pods"))?;
    Ok(Deployed { hello: [latest, new], gateway })
}

/// Points the tutorial's host at `gateway` for the commands run in `client` (its own
/// `/etc/hosts`), as a reader outside the cluster points the name at the gateway's address.
pub fn point_host_at(client: &NamedNetns, gateway: std::net::Ipv4Addr) -> Result<()> {
    client.etc_file("hosts", &format!("127.0.0.1 localhost\n::1 localhost\n{gateway} {HOST}\n"))
}

/// One turn of the tutorial's loop, `wget -q -O - http://xingren.upup`, run in `client` (which
/// resolves the name through its own /etc/hosts, [`point_host_at`]); the page, or why there was
/// none (wget says nothing with `-q`: its exit status names the failure).
pub async fn wget(client: &NamedNetns) -> Result<String> {
    let name = client.name.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &name, "timeout", "20", "wget", "-q", "-O", "-", "http://xingren.upup"])
            // The client talks to the gateway itself, never through a proxy of the machine's.
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .output()
    })
    .await??;
    if !out.status.success() {
        bail!("wget -q -O - http://{HOST} failed ({}; 8 is an HTTP error status, 4 a network failure)", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the header route's requests got.
#[derive(Debug, Default)]
pub struct HeaderRoute {
    /// Answered by `hello-new` within 4 s.
    pub to_new: usize,
    /// Answered 504 after the 5 s timeout (4.9 s to 9 s) cut the 10 s delay.
    pub timed_out: usize,
    /// Anything else, described.
    pub unexpected: Vec<String>,
    /// How long it all took.
    pub elapsed: Duration,
}

/// `lanes` clients at once (the tutorial's pool holds one connection and one waiting request),
/// each sending `per_lane` requests with `version: new` through `get`.
pub async fn header_route<F, Fut>(lanes: usize, per_lane: usize, get: F) -> Result<HeaderRoute>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<HttpAnswer>> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..lanes)
        .map(|_| {
            let get = get.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..per_lane {
                    let t = Instant::now();
                    let answer = get().await;
                    out.push((answer, t.elapsed()));
                }
                out
            })
        })
        .collect();
    let mut outcome = HeaderRoute::default();
    for task in tasks {
        for (answer, took) in task.await? {
            match answer {
                Ok(a) if a.status == 200 && a.body.trim() == "hello-new" && took < Duration::from_secs(4) => {
                    outcome.to_new += 1;
                }
                Ok(a) if a.status == 504 && took >= Duration::from_millis(4900) && took < Duration::from_secs(9) => {
                    outcome.timed_out += 1;
                }
                Ok(a) => outcome.unexpected.push(format!("{} {:?} after {took:?}", a.status, a.body.trim())),
                Err(e) => outcome.unexpected.push(format!("{e:#} after {took:?}")),
            }
        }
    }
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// `n` requests at once through `get` (a slow path, so they overlap): the statuses, in order.
pub async fn burst<F, Fut>(n: usize, get: F) -> Result<Vec<u16>>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<HttpAnswer>> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(get.clone()())).collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await??.status);
    }
    Ok(statuses)
}
