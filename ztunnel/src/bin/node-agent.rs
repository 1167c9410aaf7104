//! `node-agent`: hands this node's mesh pods to ztunnel (see `ztunnel::node`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use proto::lifecycle::{self, LogFormat};
use ztunnel::node::{AgentConfig, CNI_SOCKET, install_cni, run_agent};

/// The node agent of the ambient mesh, one per node (host network, host /proc).
///
/// Watches this node's pods and all namespaces through the API server; a pod of a namespace
/// labelled istio.io/dataplane-mode=ambient (that does not opt out with the pod label
/// istio.io/dataplane-mode=none) gets capture rules inside its own network namespace and is handed
/// to ztunnel over the ZDS socket; one that leaves the mesh is taken back. New pods are reported by
/// the CNI plugin (ambient-cni, installed with --install-cni) before their containers start;
/// pods already running are found through /proc.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// The ZDS socket ztunnel connects to.
    #[arg(long, default_value = "/var/run/ztunnel/ztunnel.sock")]
    zds_socket: PathBuf,

    /// Where the CNI plugin reports new pods.
    #[arg(long, default_value = CNI_SOCKET)]
    cni_socket: PathBuf,

    /// The host's /proc (mounted from the host, with hostPID).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,

    /// Install the CNI plugin on the node at start: copy --cni-plugin into --cni-bin-dir and chain
    /// it into the first .conflist of --cni-conf-dir.
    #[arg(long)]
    install_cni: bool,

    /// The plugin binary to install.
    #[arg(long, default_value = "/usr/local/bin/ambient-cni")]
    cni_plugin: PathBuf,

    /// The node's CNI binary directory (mounted from the host).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,

    /// The node's CNI configuration directory (mounted from the host).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,

    /// Log as JSON.
    #[arg(long)]
    json_logs: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _logging = lifecycle::init_logging(if args.json_logs { LogFormat::Json } else { LogFormat::Text });
    lifecycle::runtime(1).context("starting the runtime")?.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let signal = lifecycle::shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
    if args.install_cni {
        let list = install_cni(&args.cni_plugin, &args.cni_bin_dir, &args.cni_conf_dir, &args.cni_socket)
            .context("installing the CNI plugin")?;
        tracing::info!(conflist = %list.display(), "CNI plugin installed");
    }
    let client = kube::Client::try_default().await.context("connecting to the API server")?;
    let config = AgentConfig {
        node: args.node_name,
        zds_socket: args.zds_socket,
        cni_socket: args.cni_socket,
        proc_root: args.proc_root,
        cni_wait: Duration::from_secs(5),
    };
    run_agent(client, config, async {
        let signal = signal.await;
        tracing::info!(signal, "shutting down");
    })
    .await?;
    tracing::info!("node agent stopped");
    Ok(())
}
