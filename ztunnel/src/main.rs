//! `ztunnel`: the per-node L4 proxy of the ambient mesh.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use proto::SpiffeId;
use proto::control::ControlPlaneTarget;
use proto::lifecycle::{self, LogControl, LogFormat};
use proto::tls::{SharedTrustBundle, TrustBundle};
use ztunnel::certs::TokenSource;
use ztunnel::shards::Shards;
use ztunnel::{Config, Ztunnel};

proto::proxy_allocator!();

/// The per-node proxy of the ambient mesh.
///
/// Runs in the node's network namespace. It follows the node agent over ZDS (which pods of this
/// node are in the mesh, with their network namespaces) and the control plane over gRPC/TLS
/// (workloads, services, policies, trust bundle; and a certificate for each pod, asked for with
/// ztunnel's own token). In each pod it listens on 15001 (outbound, redirected by the capture
/// rules), 15006 (inbound plaintext) and 15008 (inbound HBONE), and carries traffic between pods as
/// HBONE: HTTP/2 CONNECT over mutual TLS with the pods' own identities. L4 authorization policies
/// are enforced on the receiving side; the app sees the real client IP.
///
/// On SIGTERM or SIGINT it stops being ready, stops accepting, lets open connections finish for
/// --drain-timeout, then exits.
///
/// Upgrades: a new ztunnel started on the node while one runs takes over the pods' listening
/// sockets from it (--handoff-socket) and serves them; the old one then stops accepting, drains
/// what it holds and waits for SIGTERM. No connection is refused or reset.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Name of the node this ztunnel serves; the CA gives it certificates only for pods on it.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// The control plane (CA + xDS) as host:port or https://host:port, as Istio's charts set
    /// CA_ADDRESS (port 15012 when none is given); a name is resolved once at start.
    #[arg(long, env = "CA_ADDRESS", default_value = "ca.istio-system.svc:15012", value_name = "HOST:PORT")]
    ca_addr: String,

    /// Istio's separate xDS address. This ztunnel takes certificates and xDS from one control
    /// plane, so it must name the same one as --ca-addr (as in Istio's default install).
    #[arg(long, env = "XDS_ADDRESS", value_name = "HOST:PORT")]
    xds_addr: Option<String>,

    /// Name the control plane's certificate must carry [default: the host of --ca-addr].
    #[arg(long)]
    ca_name: Option<String>,

    /// PEM roots to verify the control plane with (the mesh trust bundle; updates come over xDS).
    #[arg(long, env = "CA_ROOT_CA", default_value = "/var/run/secrets/istio/root-cert.pem")]
    ca_root: PathBuf,

    /// ztunnel's service-account token (projected, audience istio-ca), re-read for every request
    /// (`AUTH_TOKEN`: the variable Istio's ztunnel reads it from).
    #[arg(long, env = "AUTH_TOKEN", default_value = "/var/run/secrets/tokens/istio-token")]
    token_file: PathBuf,

    /// The mesh's trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// The cluster this node belongs to, sent to the control plane as Istio's `clusterid` header.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,

    /// ztunnel's own service account (namespace/name).
    #[arg(long, default_value = "istio-system/ztunnel", value_name = "NS/SA")]
    service_account: String,

    /// The node agent's ZDS socket.
    #[arg(long, env = "INPOD_UDS", default_value = ztunnel::zds::DEFAULT_SOCKET)]
    zds_socket: PathBuf,

    /// The socket through which this ztunnel takes the pods' listening sockets from one already
    /// running on the node (an upgrade), and later hands them to its successor [default: beside
    /// --zds-socket, named after it: /var/run/ztunnel/ztunnel-handoff.sock for the default].
    #[arg(long, value_name = "PATH")]
    handoff_socket: Option<PathBuf>,

    /// Admin endpoint (config dump, certificates, log level). Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,

    /// Prometheus endpoint (/metrics, /stats/prometheus).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,

    /// Readiness endpoint (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,

    /// How long open connections may take to finish when a pod leaves or ztunnel stops.
    #[arg(long, default_value = "5s", value_parser = proto::duration::parse)]
    drain_timeout: Duration,

    /// Log format: `text` (or `plain`) or `json` (one object per line, access-log lines with
    /// Istio's field names). The filter comes from `RUST_LOG` (default `info`) and can
    /// be changed while ztunnel runs: `POST /logging?level=<filter>` on the admin endpoint.
    #[arg(long, env = "LOG_FORMAT", default_value_t)]
    log_format: LogFormat,

    /// Resolver for the names the mesh does not know, `ip` or `ip:port` (repeat for more, tried
    /// in order). Default: the nameservers of ztunnel's own /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = parse_upstream)]
    dns_upstreams: Vec<SocketAddr>,

    /// The cluster's DNS domain: services are `<name>.<namespace>.svc.<domain>`.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,

    /// Threads carrying traffic, each a single-threaded runtime: a connection stays on the one
    /// that accepted it, every hop of it on one core, and connections spread over the threads.
    /// The control plane (xDS, certificates, node agent, admin, DNS) has a thread of its own.
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
}

/// The control plane's host and port from `host:port`, `https://host:port` or `https://host`
/// (port 15012), as Istio's charts write CA_ADDRESS and XDS_ADDRESS.
fn control_plane(addr: &str) -> Result<(String, u16)> {
    if addr.starts_with("http://") {
        bail!("{addr:?}: the control plane is reached over TLS only; use https:// or host:port");
    }
    let rest = addr.strip_prefix("https://").unwrap_or(addr).trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 address without a port has colons but ends with `]`.
        Some((host, port)) if !port.ends_with(']') => {
            (host, port.parse::<u16>().with_context(|| format!("{addr:?}: port {port:?} is not a port number"))?)
        }
        _ => (rest, 15012),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || port == 0 {
        bail!("{addr:?}: expected host:port or https://host:port");
    }
    Ok((host.to_owned(), port))
}

async fn resolve((host, port): &(String, u16)) -> Result<SocketAddr> {
    let mut found =
        tokio::net::lookup_host((host.as_str(), *port)).await.with_context(|| format!("resolving --ca-addr {host}"))?;
    found.next().with_context(|| format!("--ca-addr {host} resolved to no address"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Logging outlives the runtime: lines logged while its tasks are dropped are written too.
    let logging = lifecycle::init_logging(args.log_format);
    // Traffic runs on threads of its own (`ztunnel::shards`); the control plane, admin and DNS
    // on this runtime's one thread.
    let shards = Shards::start(args.worker_threads.max(1)).context("starting the traffic threads")?;
    let runtime = lifecycle::runtime(1).context("starting the runtime")?;
    let result = runtime.block_on(run(args, logging.control(), shards.clone()));
    shards.stop();
    result
}

async fn run(args: Args, log: LogControl, shards: Shards) -> Result<()> {
    let signal = lifecycle::shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
    ztunnel::raise_open_files_limit();

    let (ns, sa) = args
        .service_account
        .split_once('/')
        .with_context(|| format!("--service-account {:?}: expected <namespace>/<name>", args.service_account))?;
    let identity = SpiffeId::new(&args.trust_domain, ns, sa).context("--service-account")?;
    let roots =
        std::fs::read(&args.ca_root).with_context(|| format!("reading --ca-root {}", args.ca_root.display()))?;
    let bundle = TrustBundle::from_pem(&roots).with_context(|| format!("--ca-root {}", args.ca_root.display()))?;
    if !args.token_file.exists() {
        bail!(
            "--token-file {} does not exist (ztunnel needs a service-account token for the CA)",
            args.token_file.display()
        );
    }
    let ca_addr = control_plane(&args.ca_addr).context("--ca-addr (CA_ADDRESS)")?;
    if let Some(xds) = &args.xds_addr
        && control_plane(xds).context("--xds-addr (XDS_ADDRESS)")? != ca_addr
    {
        bail!(
            "--xds-addr (XDS_ADDRESS) {xds:?} names another control plane than --ca-addr (CA_ADDRESS) {:?}: this ztunnel takes certificates and xDS from one",
            args.ca_addr
        );
    }
    let ca = ControlPlaneTarget {
        addr: resolve(&ca_addr).await?,
        server_name: args.ca_name.clone().unwrap_or_else(|| ca_addr.0.clone()),
        trust: SharedTrustBundle::new(bundle),
        credential: None,
        cluster_id: Some(args.cluster_id.clone()),
    };
    let dns_upstreams = if args.dns_upstreams.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        ztunnel::dns::DnsConfig::upstreams_from_resolv_conf(&conf)
    } else {
        args.dns_upstreams
    };
    if dns_upstreams.is_empty() {
        tracing::warn!(
            "no DNS upstream (--dns-upstream, /etc/resolv.conf): pods get SERVFAIL for names the mesh does not know"
        );
    }
    let config = Config {
        node_name: args.node_name,
        trust_domain: args.trust_domain,
        identity,
        ca,
        token: TokenSource::File(args.token_file),
        handoff_socket: args.handoff_socket.unwrap_or_else(|| ztunnel::handoff::default_path(&args.zds_socket)),
        zds_socket: args.zds_socket,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
        drain_timeout: args.drain_timeout,
        pool: Default::default(),
        hbone: Default::default(),
        dns: ztunnel::dns::DnsConfig { upstreams: dns_upstreams, domain: args.cluster_domain },
        shards: Some(shards),
    };
    let ztunnel = Ztunnel::start(config, Some(log)).await?;
    tokio::pin!(signal);
    tokio::select! {
        signal = &mut signal => {
            tracing::info!(signal, "shutting down");
            ztunnel.shutdown().await;
        }
        () = ztunnel.handed_over() => {
            tracing::info!("handed over to a successor: draining what this process holds, then waiting for SIGTERM");
            ztunnel.shutdown().await;
            let signal = signal.await;
            tracing::info!(signal, "exiting");
        }
    }
    Ok(())
}

/// `ip` (port 53) or `ip:port`.
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an IP address or IP:port"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn control_plane_addresses_are_read_as_istio_writes_them() {
        let ok = |s: &str| control_plane(s).unwrap();
        assert_eq!(ok("istiod.istio-system.svc:15012"), ("istiod.istio-system.svc".into(), 15012));
        assert_eq!(ok("https://istiod.istio-system.svc:15012"), ("istiod.istio-system.svc".into(), 15012));
        assert_eq!(ok("https://istiod.istio-system.svc"), ("istiod.istio-system.svc".into(), 15012));
        assert_eq!(ok("https://10.0.0.5:443/"), ("10.0.0.5".into(), 443));
        assert_eq!(ok("[fd00::5]:15012"), ("fd00::5".into(), 15012));
        assert_eq!(ok("https://[fd00::5]"), ("fd00::5".into(), 15012));
        for bad in ["http://istiod:15012", "istiod:http", "https://:15012", "istiod:0", "https://istiod/path:1"] {
            assert!(control_plane(bad).is_err(), "{bad}");
        }
    }
}
