//! `ambientctl`: the everyday commands of an ambient mesh.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ca::ctl::admin::AdminCommand;
use ca::ctl::config::{Outcome, Target, to_yaml};
use ca::ctl::inspect;
use ca::ctl::waypoint::WaypointSpec;
use ca::k8s::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, USE_WAYPOINT_LABEL};
use clap::{Args, Parser, Subcommand};

/// Everyday commands of an ambient mesh, in the spirit of `istioctl`.
///
/// Namespace and waypoint commands change the objects that drive the mesh: in a cluster through
/// the API server (your kubeconfig, as kubectl uses it), or, with --config-dir, in the YAML
/// directory the one-machine mesh's `ca` reads. `ca` commands call the CA's admin API; `ztunnel`
/// commands read a node proxy's admin endpoint.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Edit the YAML directory the `ca` reads (the one-machine mesh) instead of a cluster.
    #[arg(long, global = true, env = "AMBIENT_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Kubeconfig context (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Put namespaces in the mesh or take them out (label istio.io/dataplane-mode).
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Generate, deploy or remove a namespace's waypoint (its L7 proxy).
    #[command(subcommand)]
    Waypoint(WaypointCommand),
    /// The CA: status, trust bundle, certificate rotation, issued certificates.
    #[command(subcommand)]
    Ca(AdminCommand),
    /// What a node's ztunnel holds: workloads, certificates, live connections.
    Ztunnel(ZtunnelArgs),
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    /// Enroll a namespace: its pods' traffic goes through ztunnel (mutual TLS, L4 policy) at once,
    /// without restarting them.
    Enable {
        /// The namespace.
        namespace: String,
    },
    /// Take a namespace out of the mesh: its pods' traffic is plain again, without restarts.
    Disable {
        /// The namespace.
        namespace: String,
    },
    /// Send a namespace's traffic through a waypoint (label istio.io/use-waypoint), or stop it
    /// with --none.
    UseWaypoint {
        /// The namespace.
        namespace: String,
        /// The waypoint (a Gateway in the namespace).
        #[arg(required_unless_present = "none", conflicts_with = "none")]
        waypoint: Option<String>,
        /// Remove the label: no waypoint.
        #[arg(long)]
        none: bool,
    },
}

#[derive(Debug, Args)]
struct WaypointArgs {
    /// The namespace.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The waypoint's name (Gateway, ServiceAccount, Deployment and Service).
    #[arg(long, default_value = "waypoint")]
    name: String,
}

#[derive(Debug, Args)]
struct WaypointSpecArgs {
    #[command(flatten)]
    at: WaypointArgs,
    /// Which traffic it takes (label istio.io/waypoint-for).
    #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all", "none"])]
    traffic_for: String,
    /// The waypoint image.
    #[arg(long)]
    image: Option<String>,
    /// Pods.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// The CA's address as pods reach it.
    #[arg(long, default_value = "ca.istio-system.svc:15012", value_name = "HOST:PORT")]
    ca_address: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

impl WaypointSpecArgs {
    fn spec(&self) -> WaypointSpec {
        let mut spec = WaypointSpec::new(&self.at.namespace);
        spec.name.clone_from(&self.at.name);
        spec.traffic_for.clone_from(&self.traffic_for);
        if let Some(image) = &self.image {
            spec.image.clone_from(image);
        }
        spec.replicas = self.replicas;
        spec.ca_address.clone_from(&self.ca_address);
        spec.trust_domain.clone_from(&self.trust_domain);
        spec
    }
}

#[derive(Debug, Subcommand)]
enum WaypointCommand {
    /// Print the waypoint's objects as YAML (Gateway, ServiceAccount, Deployment, Service).
    Generate(WaypointSpecArgs),
    /// Create or update the waypoint's objects.
    Apply {
        #[command(flatten)]
        spec: WaypointSpecArgs,
        /// Also label the namespace istio.io/use-waypoint=<name>: its traffic goes through the
        /// waypoint.
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// Delete the waypoint's objects (the namespace's use-waypoint label is left as it is).
    Delete(WaypointArgs),
}

#[derive(Debug, Args)]
struct ZtunnelArgs {
    #[command(subcommand)]
    what: ZtunnelCommand,
    /// ztunnel's admin endpoint.
    #[arg(long, global = true, default_value = "127.0.0.1:15000", value_name = "HOST:PORT")]
    admin_addr: String,
    /// Reach the admin endpoint from inside this network namespace (`ip netns exec`), e.g. a
    /// node of the one-machine mesh.
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ZtunnelCommand {
    /// The pods this ztunnel serves and every workload it knows (protocol, waypoint, policies).
    Workloads,
    /// The certificates it holds (expiry, signer, root) and the roots it trusts.
    Certs,
    /// Live inbound connections: the identity each peer proved, its address, the destination.
    Connections,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ambientctl: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambientctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn target(cli: &Cli) -> Result<Target> {
    if let Some(dir) = &cli.config_dir {
        if !dir.is_dir() {
            bail!("--config-dir {}: not a directory", dir.display());
        }
        return Ok(Target::Dir(dir.clone()));
    }
    let options = kube::config::KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let config = match kube::Config::from_kubeconfig(&options).await {
        Ok(c) => c,
        Err(kubeconfig) => kube::Config::incluster().map_err(|_| kubeconfig).context(
            "no cluster: no usable kubeconfig (KUBECONFIG or ~/.kube/config) and not in a pod; \
             for the one-machine mesh pass --config-dir",
        )?,
    };
    Ok(Target::Cluster(kube::Client::try_from(config)?))
}

fn report(outcomes: &[Outcome]) {
    for o in outcomes {
        match o {
            Outcome::Changed(what) => println!("{what}"),
            Outcome::Unchanged(what) => println!("{what} (no change)"),
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Namespace(command) => {
            let target = target(&cli).await?;
            let outcome = match command {
                NamespaceCommand::Enable { namespace } => {
                    target.label_namespace(namespace, DATAPLANE_MODE_LABEL, Some(DATAPLANE_MODE_AMBIENT)).await?
                }
                NamespaceCommand::Disable { namespace } => {
                    target.label_namespace(namespace, DATAPLANE_MODE_LABEL, None).await?
                }
                NamespaceCommand::UseWaypoint { namespace, waypoint, .. } => {
                    target.label_namespace(namespace, USE_WAYPOINT_LABEL, waypoint.as_deref()).await?
                }
            };
            report(&[outcome]);
        }
        Command::Waypoint(WaypointCommand::Generate(args)) => print!("{}", to_yaml(&args.spec().objects())?),
        Command::Waypoint(WaypointCommand::Apply { spec, enroll_namespace }) => {
            let target = target(&cli).await?;
            let spec = spec.spec();
            report(&target.apply(&spec.objects(), &file_of(&spec.namespace, &spec.name)).await?);
            if *enroll_namespace {
                report(&[target.label_namespace(&spec.namespace, USE_WAYPOINT_LABEL, Some(&spec.name)).await?]);
            }
        }
        Command::Waypoint(WaypointCommand::Delete(at)) => {
            let target = target(&cli).await?;
            let objects = WaypointSpec { name: at.name.clone(), ..WaypointSpec::new(&at.namespace) }.objects();
            // Reverse order: what runs the Gateway goes first.
            let objects: Vec<_> = objects.into_iter().rev().collect();
            report(&target.delete(&objects, &file_of(&at.namespace, &at.name)).await?);
        }
        Command::Ca(command) => ca::ctl::admin::run(command.clone()).await?,
        Command::Ztunnel(args) => {
            if let Some(netns) = &args.netns {
                return reexec_in(netns);
            }
            match args.what {
                ZtunnelCommand::Workloads => {
                    inspect::print_workloads(&inspect::get_json(&args.admin_addr, "/config_dump").await?)
                }
                ZtunnelCommand::Certs => {
                    inspect::print_certs(&inspect::get_json(&args.admin_addr, "/config_dump").await?)
                }
                ZtunnelCommand::Connections => {
                    inspect::print_connections(&inspect::get_json(&args.admin_addr, "/connections").await?)
                }
            }
        }
    }
    Ok(())
}

/// The file a waypoint's objects go to in a YAML directory.
fn file_of(namespace: &str, name: &str) -> String {
    format!("waypoint-{namespace}-{name}")
}

/// Runs this same command again inside network namespace `netns`, without `--netns`.
fn reexec_in(netns: &str) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut args: Vec<String> = Vec::new();
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if skip {
            skip = false;
        } else if a == "--netns" {
            skip = true;
        } else if !a.starts_with("--netns=") {
            args.push(a);
        }
    }
    let err = std::process::Command::new("ip").args(["netns", "exec", netns]).arg(exe).args(args).exec();
    Err(err).context("running `ip netns exec` (is iproute2 installed, and are you root?)")
}
