//! `waypoint`: the per-namespace L7 proxy of the ambient mesh.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use proto::certs::TokenSource;
use proto::control::ControlPlaneTarget;
use proto::lifecycle::{self, LogControl, LogFormat};
use proto::tls::{SharedTrustBundle, TrustBundle};
use waypoint::ingress::IngressConfig;
use waypoint::{Config, Waypoint};

proto::proxy_allocator!();

/// The L7 proxy of one namespace (a Gateway of class `istio-waypoint`).
///
/// ztunnels send it, over HBONE on 15008, the traffic of the services and pods that use it
/// (`istio.io/use-waypoint`). It authorizes each HTTP request with the L7 AuthorizationPolicies
/// that target the waypoint or the service (identity from the tunnel's TLS handshake), routes it
/// by the service's HTTPRoutes (matches, weighted backends, header changes, redirects, rewrites,
/// mirrors, timeouts, retries) and sends it over HBONE to an endpoint pod. Metrics:
/// `istio_requests_total`, `istio_request_duration_milliseconds`; one access-log line per request
/// (target `access`).
///
/// On SIGTERM or SIGINT it stops being ready, stops accepting, lets open connections finish for
/// --drain-timeout, then exits.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Name of the waypoint's Gateway.
    #[arg(long, env = "WAYPOINT_NAME", default_value = "waypoint")]
    name: String,

    /// Namespace of the Gateway (the waypoint's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,

    /// Service account the waypoint runs as; its certificate carries this identity.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "waypoint")]
    service_account: String,

    /// The control plane (CA + xDS) as host:port; a name is resolved once at start.
    #[arg(long, env = "CA_ADDRESS", default_value = "ca.istio-system.svc:15012", value_name = "HOST:PORT")]
    ca_addr: String,

    /// Name the control plane's certificate must carry.
    #[arg(long, default_value = "ca.istio-system.svc")]
    ca_name: String,

    /// PEM roots to verify the control plane with (updates come over xDS).
    #[arg(long, default_value = "/var/run/secrets/istio/root-cert.pem")]
    ca_root: PathBuf,

    /// The service-account token (projected, audience istio-ca), re-read for every request.
    #[arg(long, default_value = "/var/run/secrets/tokens/istio-token")]
    token_file: PathBuf,

    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,

    /// HBONE listener.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,

    /// Prometheus endpoint (/metrics, /stats/prometheus).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,

    /// Readiness endpoint (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,

    /// Admin endpoint (/config_dump: certificate, services, routes and policies held; /logging:
    /// the log filter, changed with POST /logging?level=<filter>). Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,

    /// How long open connections may take to finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = proto::duration::parse)]
    drain_timeout: Duration,

    /// On a Service port that declares no protocol (neither `appProtocol` nor a name such as
    /// `http-web` or `tcp-db`), how long to wait for the client's first bytes to tell HTTP from
    /// TCP. A client that sends nothing in that time (its server speaks first, as with MySQL or
    /// SMTP) is proxied as TCP; declare such ports to skip the wait.
    #[arg(long, default_value = "1s", value_parser = proto::duration::parse)]
    protocol_detection_timeout: Duration,

    /// Log format: `text` (or `plain`) or `json` (one object per line, access-log lines with
    /// Istio's field names). The filter comes from `RUST_LOG` (default `info`) and can
    /// be changed while the waypoint runs: `POST /logging?level=<filter>` on the admin endpoint.
    #[arg(long, env = "LOG_FORMAT", default_value_t)]
    log_format: LogFormat,

    /// Run as an ingress gateway instead of a waypoint: serve the Istio Gateways whose `selector`
    /// matches --gateway-label on their servers' ports (plain HTTP), routed by the VirtualServices
    /// bound to them, into the mesh over HBONE with this proxy's identity. No HBONE listener.
    #[arg(long)]
    ingress: bool,

    /// A label of the gateway's pod, `key=value` (repeat for more), matched against each
    /// Gateway's `selector` (e.g. `istio=ingressgateway`).
    #[arg(long = "gateway-label", value_name = "KEY=VALUE", value_parser = proto::labels::parse_label, requires = "ingress")]
    gateway_labels: Vec<(String, String)>,

    /// The gateway pod's own address (with --ingress; from the Downward API's `status.podIP`).
    /// The gateway finds its own workload by it, and denies every request while that workload
    /// is unknown or a policy applies to it.
    #[arg(long, env = "INSTANCE_IP", value_name = "IP")]
    pod_ip: Option<IpAddr>,

    /// Address the Gateways' server ports are bound on (with --ingress).
    #[arg(long, default_value = "0.0.0.0")]
    ingress_bind: IpAddr,

    /// Threads serving requests. One thread avoids handing requests between threads (on a
    /// 2-core node: ~13,000 requests/s per core against ~9,500 with two); scale a busy waypoint out
    /// with replicas, or raise this.
    #[arg(long, env = "WAYPOINT_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let logging = lifecycle::init_logging(args.log_format);
    let runtime = lifecycle::runtime(args.worker_threads.max(1)).context("starting the runtime")?;
    runtime.block_on(run(args, logging.control()))
}

async fn run(args: Args, log: LogControl) -> Result<()> {
    let signal = lifecycle::shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;

    let roots =
        std::fs::read(&args.ca_root).with_context(|| format!("reading --ca-root {}", args.ca_root.display()))?;
    let bundle = TrustBundle::from_pem(&roots).with_context(|| format!("--ca-root {}", args.ca_root.display()))?;
    if !args.token_file.exists() {
        bail!(
            "--token-file {} does not exist (the waypoint needs a service-account token for the CA)",
            args.token_file.display()
        );
    }
    let ca_addr = tokio::net::lookup_host(&args.ca_addr)
        .await
        .with_context(|| format!("resolving --ca-addr {}", args.ca_addr))?
        .next()
        .with_context(|| format!("--ca-addr {} resolved to no address", args.ca_addr))?;
    let ingress = match (args.ingress, args.pod_ip) {
        (false, _) => None,
        (true, Some(pod_ip)) => {
            Some(IngressConfig { labels: args.gateway_labels.into_iter().collect(), bind: args.ingress_bind, pod_ip })
        }
        (true, None) => bail!(
            "--ingress needs the gateway pod's address: --pod-ip or INSTANCE_IP (the Downward API's status.podIP)"
        ),
    };
    let config = Config {
        name: args.name,
        namespace: args.namespace,
        service_account: args.service_account,
        trust_domain: args.trust_domain,
        ca: ControlPlaneTarget {
            addr: ca_addr,
            server_name: args.ca_name,
            trust: SharedTrustBundle::new(bundle),
            credential: None,
            cluster_id: None,
        },
        token: TokenSource::File(args.token_file),
        listen: args.listen,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
        admin_addr: args.admin_addr,
        drain_timeout: args.drain_timeout,
        detect_timeout: args.protocol_detection_timeout,
        log: Some(log),
        ingress,
    };
    let waypoint = Waypoint::start(config).await?;
    let signal = signal.await;
    tracing::info!(signal, "shutting down");
    waypoint.shutdown().await;
    Ok(())
}
