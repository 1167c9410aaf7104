//! `ca`: the mesh control plane. Parses flags, builds the config, runs until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca::translate::MeshConfig;
use ca::{Config, ControlPlane, Source};
use clap::Parser;

/// The mesh control plane: reads Kubernetes objects (from a directory of YAML or the API server),
/// turns them into mesh state, and pushes it to every ztunnel and waypoint over delta xDS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Read objects from this directory of Kubernetes YAML (.yaml/.yml, multi-document), watched
    /// for changes. Without it, objects come from the Kubernetes API (in-cluster config or
    /// KUBECONFIG).
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Address for gRPC (delta xDS).
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    xds_addr: SocketAddr,

    /// Address for the admin HTTP API (/debug/state, /debug/config_errors, /healthz/ready).
    /// Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15014", value_name = "ADDR")]
    admin_addr: SocketAddr,

    /// File with the bearer tokens xDS clients must present, one per line (at least 16
    /// characters each).
    #[arg(long, value_name = "FILE")]
    xds_token_file: PathBuf,

    /// Trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,

    /// Cluster id, part of workload uids.
    #[arg(long, default_value = "Kubernetes")]
    cluster_id: String,

    /// DNS suffix of service hostnames (<svc>.<ns>.svc.<suffix>).
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,

    /// Namespace whose namespace-wide policies apply to the whole mesh.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,

    /// Quiet time after a change before recomputing, in milliseconds (coalesces bursts).
    #[arg(long, default_value_t = 20)]
    debounce_ms: u64,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn read_tokens(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading xDS token file {}", path.display()))?;
    let tokens: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect();
    if tokens.is_empty() {
        bail!("xDS token file {} holds no token", path.display());
    }
    Ok(tokens)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }

    let source = match &args.config_dir {
        Some(dir) => Source::Dir(dir.clone()),
        None => Source::Kubernetes(
            kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (use --config-dir DIR to run without a cluster)")?,
        ),
    };
    let config = Config {
        source,
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
        mesh: MeshConfig {
            trust_domain: args.trust_domain,
            cluster_id: args.cluster_id,
            domain_suffix: args.domain_suffix,
            root_namespace: args.root_namespace,
        },
        xds_tokens: read_tokens(&args.xds_token_file)?,
        debounce: Duration::from_millis(args.debounce_ms),
    };
    let cp = ControlPlane::bind(config).await?;
    cp.run(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
