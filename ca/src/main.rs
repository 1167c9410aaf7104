//! `ca`: the mesh control plane and certificate authority, and the operator commands that talk to
//! its admin API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ca::auth::{AuthConfig, DEFAULT_AUDIENCE, JwtIssuer, TokenCheck};
use ca::authority::{AuthorityConfig, KeySource};
use ca::translate::MeshConfig;
use ca::{Config, ControlPlane, ServingConfig, Source};
use clap::{Parser, Subcommand};
use proto::SpiffeId;
use proto::api::ambient::ca::v1 as pb;
use proto::api::ambient::ca::v1::ca_admin_client::CaAdminClient;
use proto::control::{ControlPlaneTarget, with_token};
use proto::tls::{Credential, SharedTrustBundle, TrustBundle, WorkloadCert};

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
    /// Show the CA's roots, signer and trust bundle.
    Status(ClientArgs),
    /// Print the trust bundle (PEM roots).
    TrustBundle(ClientArgs),
    /// Replace the intermediate that signs workload certificates (same root).
    RotateIntermediate(ClientArgs),
    /// Rotate the root in three steps: prepare (new root joins the trust bundle), activate (sign
    /// under it), retire (the old root leaves the bundle once nothing it signed is valid).
    RotateRoot {
        /// The step.
        #[arg(value_enum)]
        phase: Phase,
        /// With `retire`: retire even though certificates under the old root are still valid
        /// (they stop being accepted at once).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List issued certificates (serial, identity, node, expiry) from the issuance log.
    Certs {
        /// Include expired certificates (those expired within the last 7 days).
        #[arg(long)]
        all: bool,
        /// Only certificates for this SPIFFE ID.
        #[arg(long, value_name = "SPIFFE_ID")]
        identity: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Phase {
    Prepare,
    Activate,
    Retire,
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

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// How the operator commands reach the CA.
#[derive(Debug, Clone, clap::Args)]
struct ClientArgs {
    /// Address of the CA's gRPC port.
    #[arg(long, default_value = "127.0.0.1:15012", value_name = "ADDR")]
    server: SocketAddr,

    /// Name the CA's certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    server_name: String,

    /// The CA's state directory: its root-cert.pem and admin/ credential are used unless
    /// --ca-cert / --cert / --token-file say otherwise.
    #[arg(long, default_value = "/var/lib/ambient-ca", value_name = "DIR")]
    state_dir: PathBuf,

    /// Roots to verify the CA with (PEM).
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,

    /// Client certificate chain (PEM) of an admin identity.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// A service-account token of an admin identity (e.g. from `kubectl create token`).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    proto::duration::parse(s)
}

fn account(trust_domain: &str, s: &str) -> Result<SpiffeId> {
    let (ns, sa) = s.split_once('/').with_context(|| format!("{s:?}: expected <namespace>/<service-account>"))?;
    SpiffeId::new(trust_domain, ns, sa).with_context(|| format!("{s:?}: not a valid service account"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        None => serve(args.serve).await,
        Some(Command::Serve(serve_args)) => serve(*serve_args).await,
        Some(command) => admin(command).await,
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
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
    };
    let cp = ControlPlane::bind(config).await?;
    cp.run(shutdown_signal()).await?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

async fn admin_client(
    args: &ClientArgs,
) -> Result<
    CaAdminClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
    >,
> {
    let roots = args.ca_cert.clone().unwrap_or_else(|| args.state_dir.join("root-cert.pem"));
    let trust =
        TrustBundle::from_pem(&read(&roots)?).with_context(|| format!("{}: no usable root", roots.display()))?;
    let token = match &args.token_file {
        Some(f) => Some(String::from_utf8(read(f)?).context("token file is not UTF-8")?.trim().to_owned()),
        None => None,
    };
    let credential = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ if token.is_none() => {
            let file = args.state_dir.join("admin").join(ca::ADMIN_CREDENTIAL);
            Some((file.clone(), file))
        }
        _ => None,
    };
    let credential = match credential {
        Some((cert, key)) => Some(Credential::new({
            // One read when chain and key share a file, so a concurrent renewal cannot mix them.
            let cert_pem = read(&cert)?;
            let key_pem = if key == cert { cert_pem.clone() } else { read(&key)? };
            WorkloadCert::from_pem(&cert_pem, &key_pem)
                .with_context(|| format!("{} / {}: unusable client certificate", cert.display(), key.display()))?
        })),
        None => None,
    };
    let target = ControlPlaneTarget {
        addr: args.server,
        server_name: args.server_name.clone(),
        trust: SharedTrustBundle::new(trust),
        credential,
    };
    Ok(CaAdminClient::with_interceptor(target.channel()?, with_token(token)))
}

fn when(unix: i64) -> String {
    let secs =
        unix - std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (sign, secs) = if secs < 0 { ("-", -secs) } else { ("", secs) };
    let human = if secs >= 86400 {
        format!("{}d{}h", secs / 86400, secs % 86400 / 3600)
    } else if secs >= 3600 {
        format!("{}h{}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    };
    format!("{unix} ({sign}{human})")
}

#[allow(clippy::print_stdout)]
fn print_status(s: &pb::CaStatus) {
    println!("trust domain: {}", s.trust_domain);
    println!("material:     {}", if s.plugged_in { "plugged in (operator files)" } else { "self-managed" });
    println!("signer:       {} {}", s.signer_fingerprint_sha256, s.signer_subject);
    println!("              expires {}", when(s.signer_not_after_unix));
    println!("roots:");
    for r in &s.roots {
        let state = pb::RootState::try_from(r.state).map_or("unknown", |s| match s {
            pb::RootState::Pending => "pending (trusted, not signing)",
            pb::RootState::Active => "active",
            pb::RootState::Retiring => "retiring (trusted, no longer signing)",
            pb::RootState::Unspecified => "unknown",
        });
        println!("  {} {}", r.fingerprint_sha256, r.subject);
        println!(
            "    state: {state}; expires {}; unexpired certificates issued under it: {}",
            when(r.not_after_unix),
            r.unexpired_issued
        );
    }
}

#[allow(clippy::print_stdout)]
async fn admin(command: Command) -> Result<()> {
    let describe = |e: tonic::Status| anyhow::anyhow!("{:?}: {}", e.code(), e.message());
    match command {
        Command::Serve(_) => bail!("serve is not an admin command"),
        Command::Status(args) => {
            let s = admin_client(&args).await?.get_status(pb::GetStatusRequest {}).await.map_err(describe)?;
            print_status(s.get_ref());
        }
        Command::TrustBundle(args) => {
            let s = admin_client(&args).await?.get_status(pb::GetStatusRequest {}).await.map_err(describe)?;
            for pem in s.get_ref().bundle.iter().flat_map(|b| &b.roots_pem) {
                print!("{pem}");
            }
        }
        Command::RotateIntermediate(args) => {
            let s = admin_client(&args)
                .await?
                .rotate_intermediate(pb::RotateIntermediateRequest {})
                .await
                .map_err(describe)?;
            println!("intermediate rotated; new certificates are signed by {}", s.get_ref().signer_fingerprint_sha256);
            print_status(s.get_ref());
        }
        Command::RotateRoot { phase, force, client } => {
            let phase_pb = match phase {
                Phase::Prepare => pb::rotate_root_request::Phase::Prepare,
                Phase::Activate => pb::rotate_root_request::Phase::Activate,
                Phase::Retire => pb::rotate_root_request::Phase::Retire,
            };
            let s = admin_client(&client)
                .await?
                .rotate_root(pb::RotateRootRequest { phase: phase_pb as i32, force })
                .await
                .map_err(describe)?;
            match phase {
                Phase::Prepare => println!(
                    "new root added to the trust bundle; proxies receive it over xDS. Next: rotate-root activate"
                ),
                Phase::Activate => println!(
                    "signing under the new root; the old root stays trusted. Next, once old certificates expire: rotate-root retire"
                ),
                Phase::Retire => println!("old root retired from the trust bundle"),
            }
            print_status(s.get_ref());
        }
        Command::Certs { all, identity, client } => {
            let list = admin_client(&client)
                .await?
                .list_certificates(pb::ListCertificatesRequest {
                    include_expired: all,
                    identity: identity.unwrap_or_default(),
                })
                .await
                .map_err(describe)?;
            println!("{:<34} {:<56} {:<16} EXPIRES", "SERIAL", "IDENTITY", "NODE");
            for c in &list.get_ref().certificates {
                let node = if c.node.is_empty() { "-" } else { &c.node };
                println!("{:<34} {:<56} {:<16} {}", c.serial_hex, c.identity, node, when(c.not_after_unix));
            }
        }
    }
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
