//! `ambientctl`: the everyday commands of an ambient mesh.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ca::k8s::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, USE_WAYPOINT_LABEL};
use ca_ctl::Output;
use ca_ctl::admin::AdminCommand;
use ca_ctl::config::{Outcome, Target, to_yaml};
use ca_ctl::gateway::IngressGatewaySpec;
use ca_ctl::inspect;
use ca_ctl::kept::KeptMesh;
use ca_ctl::waypoint::WaypointSpec;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Everyday commands of an ambient mesh, in the spirit of `istioctl`.
///
/// Namespace and waypoint commands change the objects that drive the mesh: in a cluster through
/// the API server (your kubeconfig, as kubectl uses it), or, with --config-dir, in the YAML
/// directory the one-machine mesh's `ca` reads. `ca` commands call the CA's admin API; `ztunnel`
/// commands read a node proxy's admin endpoint.
///
/// A one-machine mesh kept running (`demo --keep`) is found without flags: when no flag and no
/// cluster say otherwise, namespace and waypoint commands edit its YAML directory, `ca` commands
/// reach its CA, and `ztunnel --node <name>` reads that node's ztunnel.
#[derive(Debug, Parser)]
#[command(
    version,
    propagate_version = true,
    after_help = "Exit status: 0 done; 1 failed; 2 wrong usage; 3 could not reach the CA, a ztunnel or \
                  the cluster; 4 refused (not authorized, or the request was invalid)."
)]
struct Cli {
    /// Edit the YAML directory the `ca` reads (the one-machine mesh) instead of a cluster.
    #[arg(long, global = true, env = "AMBIENT_CONFIG_DIR", value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Kubeconfig context (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    context: Option<String>,

    /// How to print what a command found: aligned tables, or a document for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,

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
    /// Generate, deploy or remove an ingress gateway (what Istio Gateways select, at the edge).
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// The CA: status, trust bundle, certificate rotation, issued certificates.
    #[command(subcommand)]
    Ca(AdminCommand),
    /// What a node's ztunnel holds: workloads, certificates, live connections.
    Ztunnel(ZtunnelArgs),
    /// The mesh in a web page, live: the service graph (workloads, services, waypoints and
    /// gateways; request rate, errors, p50/p99 latency and mutual TLS per edge) and each
    /// service's golden signals over time.
    ///
    /// The figures come from Prometheus (--prometheus) or straight from the proxies' metrics
    /// endpoints (--targets). A one-machine mesh kept running (`demo --keep`) is read without
    /// flags. The page is served until Ctrl-C; it has no login, so it listens on loopback unless
    /// --listen says otherwise.
    #[command(after_help = "Examples:\n  \
        ambientctl dashboard                                   # the kept one-machine mesh\n  \
        kubectl -n istio-system port-forward svc/prometheus 9090 &\n  \
        ambientctl dashboard --prometheus http://127.0.0.1:9090\n  \
        ambientctl dashboard --targets targets.json --netns mesh  # scrape the proxies from a namespace")]
    Dashboard(DashboardArgs),
    /// What the mesh would do now with a connection from a pod: its identity, the service and
    /// its endpoints, the waypoint on the path and why, the hop its ztunnel takes, and every L4
    /// AuthorizationPolicy the destination's ztunnel evaluates, with its verdict.
    ///
    /// The CA computes it from the state it pushes, with ztunnel's own routing and authorization
    /// code. A waypoint's L7 decisions are not explained yet (the answer says so).
    #[command(after_help = "Examples:\n  \
        ambientctl explain demo/client demo/server:8080        # pod to pod\n  \
        ambientctl explain demo/client hello.demo:80           # to a service (its VIP)\n  \
        ambientctl explain demo/client 10.96.1.10:80 -o json\n  \
        ambientctl explain demo/client hello.web:80 --method POST --path /admin -H 'x-user: bob'  # at its waypoint\n  \
        ambientctl explain --connection 7 --node node-2             # a live connection, as the mesh is now")]
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
struct ExplainArgs {
    /// The client pod, `<namespace>/<name>` (or its IP).
    #[arg(required_unless_present = "connection")]
    from: Option<String>,
    /// Where it connects: `<namespace>/<pod>:<port>`, a service `<host>:<port>` (its hostname, or
    /// `<name>.<namespace>`), or `<ip>:<port>`.
    #[arg(required_unless_present = "connection")]
    to: Option<String>,
    /// Explain a live inbound connection instead: its number in a ztunnel's table (`ambientctl
    /// ztunnel connections`), re-evaluated with its client and destination as the mesh is now.
    #[arg(long, value_name = "ID", conflicts_with_all = ["from", "to"])]
    connection: Option<u64>,
    /// That ztunnel's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000", value_name = "HOST:PORT", requires = "connection")]
    ztunnel_admin: String,
    /// Reach that ztunnel's admin endpoint from inside this network namespace.
    #[arg(long, value_name = "NAME", requires = "connection", conflicts_with = "node")]
    ztunnel_netns: Option<String>,
    /// That ztunnel is the one of this node of the kept one-machine mesh (`demo --keep`).
    #[arg(long, value_name = "NAME", requires = "connection")]
    node: Option<String>,
    /// The CA's admin endpoint; it answers on loopback only (in a cluster: `kubectl -n
    /// istio-system port-forward deploy/ca 15014`).
    #[arg(long, default_value = "127.0.0.1:15014", value_name = "HOST:PORT")]
    ca_admin: String,
    /// Reach the CA's admin endpoint from inside this network namespace (`ip netns` name).
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// When a waypoint is on the path: the method of the HTTP request to explain there.
    #[arg(long, default_value = "GET")]
    method: String,
    /// When a waypoint is on the path: the request's path, with the query if any.
    #[arg(long, default_value = "/")]
    path: String,
    /// When a waypoint is on the path: a header of the request, `Name: value` (repeat for more;
    /// without `Host`, the service's hostname is taken).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<String>,
}

/// A `Name: value` header.
fn parse_header(s: &str) -> Result<String, String> {
    match s.split_once(':') {
        Some((name, _)) if !name.trim().is_empty() && !s.contains('\n') => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: expected \"Name: value\"")),
    }
}

#[derive(Debug, Args)]
struct DashboardArgs {
    /// Where to serve the page (on this machine's network, whatever --netns says).
    #[arg(long, default_value = "127.0.0.1:20001", value_name = "HOST:PORT")]
    listen: std::net::SocketAddr,
    /// Read the figures from this Prometheus (plain HTTP), one that scrapes the mesh as
    /// deploy/prometheus.yaml does.
    #[arg(long, env = "AMBIENT_PROMETHEUS", value_name = "URL", conflicts_with = "targets")]
    prometheus: Option<String>,
    /// Scrape the proxies itself: the endpoints listed in Prometheus file-discovery target files
    /// (a file, or a directory of *.json/*.yml), labelled `component` (ztunnel, waypoint,
    /// ingress-gateway), `namespace` and `workload`.
    #[arg(long, value_name = "FILE|DIR")]
    targets: Option<PathBuf>,
    /// Reach Prometheus or the proxies from inside this network namespace (`ip netns` name).
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// Rates are averaged over this long.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    window: std::time::Duration,
    /// How often the figures are read.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, proto::duration::DurationError> {
    proto::duration::parse(s)
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
    #[command(flatten)]
    deploy: DeployArgs,
}

/// How the proxy's pods run (waypoints and gateways alike).
#[derive(Debug, Args)]
struct DeployArgs {
    /// The `waypoint` image.
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
        let d = &self.deploy;
        if let Some(image) = &d.image {
            spec.image.clone_from(image);
        }
        spec.replicas = d.replicas;
        spec.ca_address.clone_from(&d.ca_address);
        spec.trust_domain.clone_from(&d.trust_domain);
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
struct GatewayArgs {
    /// The namespace (the gateway's TLS Secrets live there).
    #[arg(short, long, default_value = "istio-system")]
    namespace: String,
    /// Its name (ServiceAccount, Deployment and Service).
    #[arg(long, default_value = "istio-ingressgateway")]
    name: String,
}

#[derive(Debug, Args)]
struct GatewaySpecArgs {
    #[command(flatten)]
    at: GatewayArgs,
    /// A label of its pods, `key=value` (repeat for more): what Gateways' `selector` matches.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = proto::labels::parse_label, default_value = "istio=ingressgateway")]
    labels: Vec<(String, String)>,
    /// A port its Service exposes (repeat for more): the Gateways' server ports.
    #[arg(long = "port", default_values_t = [80u16, 443])]
    ports: Vec<u16>,
    #[command(flatten)]
    deploy: DeployArgs,
}

impl GatewaySpecArgs {
    fn spec(&self) -> IngressGatewaySpec {
        let mut spec = IngressGatewaySpec::new(&self.at.namespace);
        spec.name.clone_from(&self.at.name);
        spec.labels = self.labels.iter().cloned().collect();
        spec.ports.clone_from(&self.ports);
        let d = &self.deploy;
        if let Some(image) = &d.image {
            spec.image.clone_from(image);
        }
        spec.replicas = d.replicas;
        spec.ca_address.clone_from(&d.ca_address);
        spec.trust_domain.clone_from(&d.trust_domain);
        spec
    }
}

#[derive(Debug, Subcommand)]
enum GatewayCommand {
    /// Print the gateway's objects as YAML (ServiceAccount, Deployment, LoadBalancer Service).
    Generate(GatewaySpecArgs),
    /// Create or update the gateway's objects.
    Apply(GatewaySpecArgs),
    /// Delete the gateway's objects.
    Delete(GatewayArgs),
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
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "node")]
    netns: Option<String>,
    /// A node of the kept one-machine mesh (`demo --keep`), e.g. node-1: its ztunnel.
    #[arg(long, global = true, value_name = "NAME")]
    node: Option<String>,
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
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ambientctl: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, ca_flags_given(&matches))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambientctl: {e:#}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// Whether a `ca` command was told how to reach a CA (otherwise a kept mesh's CA is used).
fn ca_flags_given(matches: &clap::ArgMatches) -> bool {
    if let Some(explain) = matches.subcommand_matches("explain") {
        return matches!(explain.value_source("ca_admin"), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    }
    let Some((_, command)) = matches.subcommand_matches("ca").and_then(clap::ArgMatches::subcommand) else {
        return false;
    };
    ["server", "server_name", "state_dir", "ca_cert", "cert", "token_file"].iter().any(|id| {
        matches!(command.try_get_raw(id), Ok(Some(_)))
            && matches!(command.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
    })
}

/// Nothing to talk to (exit status 3).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// 3: something could not be reached; 4: it refused; 1: anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.downcast_ref::<Unreachable>().is_some() {
            return 3;
        }
        if let Some(refused) = cause.downcast_ref::<ca_ctl::admin::CaRefused>() {
            return match refused.0.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 3,
                _ => 4,
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(io.kind(), ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable) {
                return 3;
            }
        }
        if cause.downcast_ref::<tokio::time::error::Elapsed>().is_some() {
            return 3;
        }
    }
    1
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
        Err(kubeconfig) => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => match KeptMesh::find()? {
                Some(kept) if cli.context.is_none() => return Ok(Target::Dir(kept.config_dir)),
                _ => {
                    return Err(anyhow::Error::new(Unreachable(format!(
                        "no cluster: no usable kubeconfig (KUBECONFIG or ~/.kube/config: {kubeconfig}), not in a \
                         pod, and no one-machine mesh kept running (demo --keep); for a mesh's YAML directory \
                         pass --config-dir"
                    ))));
                }
            },
        },
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

async fn run(cli: Cli, ca_flags_given: bool) -> Result<()> {
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
        Command::Gateway(GatewayCommand::Generate(args)) => print!("{}", to_yaml(&args.spec().objects())?),
        Command::Gateway(GatewayCommand::Apply(args)) => {
            let target = target(&cli).await?;
            let spec = args.spec();
            report(&target.apply(&spec.objects(), &format!("gateway-{}-{}", spec.namespace, spec.name)).await?);
        }
        Command::Gateway(GatewayCommand::Delete(at)) => {
            let target = target(&cli).await?;
            let spec = IngressGatewaySpec { name: at.name.clone(), ..IngressGatewaySpec::new(&at.namespace) };
            let objects: Vec<_> = spec.objects().into_iter().rev().collect();
            report(&target.delete(&objects, &format!("gateway-{}-{}", at.namespace, at.name)).await?);
        }
        Command::Ca(command) => {
            // No flag says which CA: the kept one-machine mesh's, from inside its network.
            if !ca_flags_given && let Some(kept) = KeptMesh::find()? {
                let state = kept.state_dir.display().to_string();
                let reach =
                    ["--server", &kept.ca_addr.to_string(), "--server-name", &kept.ca_name, "--state-dir", &state]
                        .map(String::from);
                return reexec(&kept.ca_netns, &[], &reach);
            }
            ca_ctl::admin::run(command.clone(), cli.output).await?;
        }
        Command::Dashboard(args) => dashboard(args).await?,
        Command::Explain(args) => explain(args, ca_flags_given, cli.output).await?,
        Command::Ztunnel(args) => {
            if let Some(netns) = &args.netns {
                return reexec(netns, &["--netns"], &[]);
            }
            if let Some(node) = &args.node {
                let kept = KeptMesh::find()?.context(
                    "--node reads a node of the one-machine mesh kept running by `demo --keep`, and none is; \
                     for another ztunnel use --admin-addr (or --netns)",
                )?;
                return reexec(kept.node_netns(node)?, &["--node"], &[]);
            }
            let path = match args.what {
                ZtunnelCommand::Connections => "/connections",
                ZtunnelCommand::Workloads | ZtunnelCommand::Certs => "/config_dump",
            };
            let found = inspect::get_json(&args.admin_addr, path).await?;
            if !cli.output.document(&found)? {
                match args.what {
                    ZtunnelCommand::Workloads => inspect::print_workloads(&found),
                    ZtunnelCommand::Certs => inspect::print_certs(&found),
                    ZtunnelCommand::Connections => inspect::print_connections(&found),
                }
            }
        }
    }
    Ok(())
}

/// `ambientctl explain`: a connection described by FROM and TO, or a live one from a ztunnel's
/// table, explained by the CA. The namespaces to reach ztunnel and the CA from are entered in turn
/// (this runs on one thread, so each socket opens where it should).
async fn explain(args: &ExplainArgs, ca_flags_given: bool, output: Output) -> Result<()> {
    let kept = if args.node.is_some() || (!ca_flags_given && args.netns.is_none()) { KeptMesh::find()? } else { None };
    let ca_netns =
        args.netns.clone().or_else(|| if ca_flags_given { None } else { kept.as_ref().map(|k| k.ca_netns.clone()) });
    let (from, to, connection) = match args.connection {
        Some(id) => {
            let ztunnel_netns = match &args.node {
                Some(node) => Some(
                    kept.as_ref()
                        .context(
                            "--node reads a node of the one-machine mesh kept running by `demo --keep`, and none is; \
                             for another ztunnel use --ztunnel-admin (or --ztunnel-netns)",
                        )?
                        .node_netns(node)?
                        .to_owned(),
                ),
                None => args.ztunnel_netns.clone(),
            };
            if let Some(netns) = &ztunnel_netns {
                ca_ctl::dashboard::enter_netns(netns)?;
            }
            let live = inspect::get_json(&args.ztunnel_admin, "/connections").await?;
            let found = live["inbound"].as_array().into_iter().flatten().find(|c| c["id"].as_u64() == Some(id));
            let c = found.with_context(|| {
                format!("no live connection {id} in that ztunnel's table (`ambientctl ztunnel connections` lists them)")
            })?;
            let (from, to) =
                (c["source_ip"].as_str().unwrap_or_default(), c["destination"].as_str().unwrap_or_default());
            (from.to_owned(), to.to_owned(), Some(c.clone()))
        }
        None => (
            args.from.clone().context("FROM is required (or --connection ID)")?,
            args.to.clone().context("TO is required (or --connection ID)")?,
            None,
        ),
    };
    if let Some(netns) = &ca_netns {
        ca_ctl::dashboard::enter_netns(netns)?;
    }
    let headers = args.headers.join("\n");
    let query = format!(
        "/debug/explain?{}",
        ca_ctl::fetch::query(&[
            ("from", &from),
            ("to", &to),
            ("method", &args.method),
            ("path", &args.path),
            ("header", &headers)
        ])
    );
    let body = ca_ctl::fetch::http_get(&args.ca_admin, &query)
        .await
        .with_context(|| format!("asking the CA's admin endpoint at {}", args.ca_admin))?;
    let mut found: serde_json::Value = serde_json::from_slice(&body).context("the CA's answer is not JSON")?;
    if let Some(c) = connection {
        found["connection"] = c;
    }
    if !output.document(&found)? {
        inspect::print_explanation(&found);
    }
    Ok(())
}

/// Serves the dashboard until the process ends.
async fn dashboard(args: &DashboardArgs) -> Result<()> {
    use ca_ctl::dashboard::{Figures, Options};
    let (figures, netns) = match (&args.prometheus, &args.targets) {
        (Some(url), _) => (Figures::Prometheus(url.clone()), args.netns.clone()),
        (None, Some(targets)) => (Figures::Targets(targets.clone()), args.netns.clone()),
        (None, None) => {
            let kept = KeptMesh::find()?.ok_or_else(|| {
                anyhow::Error::new(Unreachable(
                    "where are the mesh's figures? Say --prometheus http://HOST:PORT (in a cluster: kubectl -n \
                     istio-system port-forward svc/prometheus 9090, then --prometheus http://127.0.0.1:9090) or \
                     --targets FILE for the proxies' metrics endpoints; no one-machine mesh is kept running \
                     (demo --keep)"
                        .to_owned(),
                ))
            })?;
            match (kept.prometheus, kept.scrape_targets) {
                (Some(url), _) => (Figures::Prometheus(url), None),
                (None, Some(targets)) => (Figures::Targets(targets), Some(kept.ca_netns)),
                (None, None) => bail!(
                    "the kept one-machine mesh (pid {}) records neither a Prometheus nor its scrape targets; \
                     say --prometheus or --targets",
                    kept.pid
                ),
            }
        }
    };
    // What cannot work is said now, not on the page.
    match &figures {
        Figures::Prometheus(url) => {
            ca_ctl::dashboard::source::http_url(url).context("--prometheus")?;
        }
        Figures::Targets(path) => {
            ca_ctl::dashboard::source::read_targets(path).context("--targets")?;
        }
    }
    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse { " (in use: pick another with --listen)" } else { "" };
        anyhow::Error::new(e).context(format!("listening on {}{hint}", args.listen))
    })?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    if let Some(netns) = &netns {
        // The page stays on this network (the listener is open); the figures are read from there.
        ca_ctl::dashboard::enter_netns(netns)?;
    }
    let from = match &figures {
        Figures::Prometheus(u) => format!("Prometheus at {u}"),
        Figures::Targets(t) => format!("the proxies listed in {}", t.display()),
    };
    let inside = netns.map(|n| format!(", from network namespace {n}")).unwrap_or_default();
    println!("Dashboard: {url}  (figures from {from}{inside}; Ctrl-C stops it)");
    let options = Options { window: args.window, interval: args.interval, ..Options::new(figures) };
    ca_ctl::dashboard::serve(tokio::net::TcpListener::from_std(listener)?, options).await
}

/// The file a waypoint's objects go to in a YAML directory.
fn file_of(namespace: &str, name: &str) -> String {
    format!("waypoint-{namespace}-{name}")
}

/// Runs this same command again inside network namespace `netns`, without the flags `drop` (each
/// with its value) and with `extra` appended.
fn reexec(netns: &str, drop: &[&str], extra: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("finding this program")?;
    let args = without_flags(std::env::args().skip(1), drop);
    let err = std::process::Command::new("ip").args(["netns", "exec", netns]).arg(exe).args(args).args(extra).exec();
    Err(err).context("running `ip netns exec` (is iproute2 installed, and are you root?)")
}

/// `args` without the flags `drop` and their values (`--flag value` or `--flag=value`).
fn without_flags(args: impl Iterator<Item = String>, drop: &[&str]) -> Vec<String> {
    let mut kept = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        if drop.contains(&a.as_str()) {
            skip = true;
        } else if !drop.iter().any(|f| a.starts_with(&format!("{f}="))) {
            kept.push(a);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reexec_drops_the_flags_it_resolved() {
        let args = ["ztunnel", "--node", "node-1", "workloads", "--node=node-2", "-o", "json"].map(String::from);
        assert_eq!(without_flags(args.into_iter(), &["--node"]), ["ztunnel", "workloads", "-o", "json"]);
    }
}
