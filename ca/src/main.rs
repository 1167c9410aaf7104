//! `ca`: the mesh control plane and certificate authority, and the operator commands that talk to
//! its admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use ca::auth::{AuthConfig, DEFAULT_AUDIENCE, JwtIssuer, TokenCheck};
use ca::authority::{AuthorityConfig, KeySource};
use ca::translate::MeshConfig;
use ca::{Config, ControlPlane, ServingConfig, Source};
use clap::{Parser, Subcommand};
use proto::SpiffeId;
use proto::lifecycle::{self, LogControl, LogFormat};

/// The mesh control plane and certificate authority.
///
/// Without a subcommand (or with `serve`) it runs: reads Kubernetes objects (from a directory of
/// YAML or the API server), pushes mesh state to every proxy over delta xDS, and issues SPIFFE
/// certificates, all on one TLS port (15012). The other subcommands are operator tools that call
/// a running CA's admin API.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (the default).
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Admin(ca_ctl::admin::AdminCommand),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Read objects from this directory of Kubernetes YAML (.yaml/.yml, multi-document), watched
    /// for changes. Without it, objects come from the Kubernetes API (in-cluster config or
    /// KUBECONFIG).
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,

    /// Address of the gRPC port (TLS): certificates, xDS and the admin service.
    #[arg(long, default_value = "0.0.0.0:15012", value_name = "ADDR")]
    grpc_addr: SocketAddr,

    /// Address for the admin HTTP API (/debug/state, /debug/config_errors, /healthz/ready,
    /// /metrics). Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15014", value_name = "ADDR")]
    admin_addr: SocketAddr,

    /// Directory for the CA's keys (authority.json, mode 0600), the issuance log, the trust
    /// bundle for clients (root-cert.pem) and the local admin credential (admin/).
    #[arg(long, default_value = "/var/lib/ambient-ca", value_name = "DIR")]
    state_dir: PathBuf,

    /// In cluster mode, keep the self-managed keys in this Secret (namespace/name) so they
    /// outlive the pod; the issuance log stays in --state-dir.
    #[arg(long, default_value = "istio-system/ambient-ca", value_name = "NS/NAME")]
    key_secret: String,

    /// In cluster mode, keep the keys in --state-dir instead of a Secret (e.g. on a persistent
    /// volume).
    #[arg(long)]
    keys_in_state_dir: bool,

    /// Use operator-provided signing material in Istio's `cacerts` layout (ca-cert.pem,
    /// ca-key.pem, root-cert.pem, optional cert-chain.pem) instead of a self-managed root.
    #[arg(long, value_name = "DIR")]
    plugin_certs: Option<PathBuf>,

    /// Trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,

    /// Lifetime of a workload certificate when the request names none (e.g. 24h, 90m).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    default_ttl: Duration,

    /// Longest lifetime granted; longer requests are refused.
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    max_ttl: Duration,

    /// Accepted audience of service-account tokens (repeatable).
    #[arg(long = "token-audience", default_value = DEFAULT_AUDIENCE, value_name = "AUD")]
    token_audiences: Vec<String>,

    /// Check tokens locally: the required issuer (`iss`). Needs --jwks-file. Without it, tokens
    /// are checked by TokenReview against the API server (cluster mode) or not accepted
    /// (directory mode: client certificates only).
    #[arg(long, value_name = "ISSUER", requires = "jwks_file")]
    jwt_issuer: Option<String>,

    /// JWKS document with the token issuer's public keys.
    #[arg(long, value_name = "FILE", requires = "jwt_issuer")]
    jwks_file: Option<PathBuf>,

    /// Service account (namespace/name) of node proxies, which may ask for the identities of the
    /// pods on their node (repeatable).
    #[arg(long = "node-account", default_value = "istio-system/ztunnel", value_name = "NS/SA")]
    node_accounts: Vec<String>,

    /// Service account (namespace/name) allowed to use the admin API (repeatable). The first one
    /// gets a local credential in <state-dir>/admin/.
    #[arg(long = "admin-account", default_value = "istio-system/mesh-admin", value_name = "NS/SA")]
    admin_accounts: Vec<String>,

    /// Extra DNS name or IP address clients dial the control plane by (repeatable; localhost,
    /// 127.0.0.1, ca.istio-system.svc and istiod.istio-system.svc are always included).
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,

    /// The control plane's own service account (namespace/name): the identity of its certificate.
    #[arg(long, default_value = "istio-system/ca", value_name = "NS/SA")]
    ca_account: String,

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

    /// Most connections open at once on the gRPC port; more are closed at once and counted
    /// (ca_grpc_connections_refused).
    #[arg(long, default_value_t = ca::Limits::default().max_connections)]
    max_connections: usize,

    /// Certificates issued per second to one caller (identity and the node its token is bound
    /// to); beyond it, RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = ca::Limits::default().issue_per_second)]
    issue_rate: u32,

    /// Certificates one caller may ask for at once before --issue-rate applies (a node starting
    /// all its pods).
    #[arg(long, default_value_t = ca::Limits::default().issue_burst)]
    issue_burst: u32,

    /// Extra roots (PEM) trusted when fetching RequestAuthentication `jwksUri` keys, besides the
    /// system's (an identity provider with a private CA). Keys are fetched over HTTPS only.
    #[arg(long, value_name = "FILE")]
    jwks_ca_file: Option<PathBuf>,

    /// How often `jwksUri` keys are fetched again (a failed fetch keeps the last keys and is
    /// retried sooner).
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    jwks_refresh: Duration,

    /// Time allowed for one `jwksUri` fetch.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    jwks_timeout: Duration,

    /// Log format: `text` (or `plain`) or `json` (one object per line, access-log lines with
    /// Istio's field names). The filter comes from `RUST_LOG` (default `info`) and can
    /// be changed while the CA runs: `POST /logging?level=<filter>` on the admin endpoint (from
    /// loopback).
    #[arg(long, env = "LOG_FORMAT", default_value_t)]
    log_format: LogFormat,

    /// The xDS types served: `all` (Istio's Address and Authorization, and the mesh's own types
    /// our ztunnel and waypoint read), or `istio` (only Istio's two, exactly what istiod serves a
    /// ztunnel: to check that a ztunnel runs behind istiod; waypoints get no routes this way).
    #[arg(long, default_value_t, value_name = "all|istio")]
    xds_types: ca::xds::ServedTypes,

    /// On SIGTERM or SIGINT, how long certificate and admin calls in flight may take to finish
    /// before they are dropped (xDS streams end at once; proxies reconnect to another replica).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, proto::duration::DurationError> {
    proto::duration::parse(s)
}

fn account(trust_domain: &str, s: &str) -> Result<SpiffeId> {
    let (ns, sa) = s.split_once('/').with_context(|| format!("{s:?}: expected <namespace>/<service-account>"))?;
    SpiffeId::new(trust_domain, ns, sa).with_context(|| format!("{s:?}: not a valid service account"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let serve_args = match args.command {
        None => args.serve,
        Some(Command::Serve(serve_args)) => *serve_args,
        Some(Command::Admin(command)) => {
            let runtime = lifecycle::runtime(0).context("starting the runtime")?;
            return runtime.block_on(ca_ctl::admin::run(command, ca_ctl::Output::Table));
        }
    };
    // Logging outlives the runtime: lines logged while its tasks are dropped are written too.
    let logging = lifecycle::init_logging(serve_args.log_format);
    let runtime = lifecycle::runtime(0).context("starting the runtime")?;
    runtime.block_on(serve(serve_args, logging.control()))
}

async fn serve(args: ServeArgs, log: LogControl) -> Result<()> {
    let signal = lifecycle::shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
    let td = args.trust_domain.clone();

    let (source, kube_client): (Source, Option<kube::Client>) = match &args.config_dir {
        Some(dir) => (Source::Dir(dir.clone()), None),
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (use --config-dir DIR to run without a cluster)")?;
            (Source::Kubernetes(client.clone()), Some(client))
        }
    };
    let key_secret_client = kube_client.clone().filter(|_| !args.keys_in_state_dir);
    let tokens = match (&args.jwt_issuer, &args.jwks_file, kube_client) {
        (Some(issuer), Some(jwks), _) => {
            let text = std::fs::read_to_string(jwks).with_context(|| format!("reading {}", jwks.display()))?;
            let jwks =
                serde_json::from_str(&text).with_context(|| format!("{}: not a JWKS document", jwks.display()))?;
            TokenCheck::Local(JwtIssuer { issuer: issuer.clone(), jwks })
        }
        (_, _, Some(client)) => TokenCheck::TokenReview(client),
        _ => {
            tracing::warn!(
                "no token issuer configured (--jwt-issuer/--jwks-file) and no API server: only client certificates are accepted"
            );
            TokenCheck::Disabled
        }
    };
    let node_accounts = args.node_accounts.iter().map(|a| account(&td, a)).collect::<Result<Vec<_>>>()?;
    let admins = args.admin_accounts.iter().map(|a| account(&td, a)).collect::<Result<Vec<_>>>()?;
    let ca_account = account(&td, &args.ca_account)?;
    let mut serving = ServingConfig {
        namespace: ca_account.namespace().to_owned(),
        service_account: ca_account.service_account().to_owned(),
        ..ServingConfig::default()
    };
    serving.names.extend(args.tls_names.iter().cloned());
    if !args.grpc_addr.ip().is_unspecified() {
        serving.names.push(args.grpc_addr.ip().to_string());
    }
    let mut authority = AuthorityConfig::new(td.clone(), args.state_dir.clone());
    authority.default_ttl = args.default_ttl;
    authority.max_ttl = args.max_ttl;
    if let Some(dir) = &args.plugin_certs {
        authority.keys = KeySource::PlugIn(dir.clone());
    } else if let Some(client) = key_secret_client {
        let (namespace, name) = args
            .key_secret
            .split_once('/')
            .with_context(|| format!("--key-secret {:?}: expected <namespace>/<name>", args.key_secret))?;
        authority.keys = KeySource::SelfManagedInSecret { client, namespace: namespace.into(), name: name.into() };
    }
    let extra_roots = match &args.jwks_ca_file {
        None => Vec::new(),
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("--jwks-ca-file {}", path.display()))?;
            proto::tls::TrustBundle::from_pem(&pem)
                .with_context(|| format!("--jwks-ca-file {}", path.display()))?
                .roots()
                .to_vec()
        }
    };
    let config = Config {
        source,
        grpc_addr: args.grpc_addr,
        admin_addr: args.admin_addr,
        mesh: MeshConfig {
            trust_domain: td.clone(),
            cluster_id: args.cluster_id,
            domain_suffix: args.domain_suffix,
            root_namespace: args.root_namespace,
        },
        authority,
        auth: AuthConfig { trust_domain: td, audiences: args.token_audiences, tokens, node_accounts, admins },
        serving,
        debounce: Duration::from_millis(args.debounce_ms),
        limits: ca::Limits {
            max_connections: args.max_connections,
            issue_per_second: args.issue_rate,
            issue_burst: args.issue_burst,
            ..ca::Limits::default()
        },
        jwks: ca::jwks::JwksConfig { refresh: args.jwks_refresh, timeout: args.jwks_timeout, extra_roots },
        log: Some(log),
        xds_types: args.xds_types,
        drain_timeout: args.drain_timeout,
    };
    let cp = ControlPlane::bind(config).await?;
    cp.run(async {
        let signal = signal.await;
        tracing::info!(signal, "shutting down");
    })
    .await?;
    Ok(())
}
