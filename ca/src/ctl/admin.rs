//! Operator commands against a running CA's admin API (gRPC on the CA's port, authenticated as an
//! admin identity): status, trust bundle, intermediate and root rotation, issued certificates.
//! Shared by `ca <command>` and `ambientctl ca <command>`.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use proto::api::ambient::ca::v1 as pb;
use proto::api::ambient::ca::v1::ca_admin_client::CaAdminClient;
use proto::control::{ControlPlaneTarget, with_token};
use proto::tls::{Credential, SharedTrustBundle, TrustBundle, WorkloadCert};

/// The admin commands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
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
pub enum Phase {
    /// Add a new root to the trust bundle (proxies receive it over xDS).
    Prepare,
    /// Sign under the new root; the old one stays trusted.
    Activate,
    /// Remove the old root from the trust bundle.
    Retire,
}

/// How the operator commands reach the CA.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Address of the CA's gRPC port.
    #[arg(long, default_value = "127.0.0.1:15012", value_name = "ADDR")]
    pub server: SocketAddr,

    /// Name the CA's certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,

    /// The CA's state directory: its root-cert.pem and admin/ credential are used unless
    /// --ca-cert / --cert / --token-file say otherwise.
    #[arg(long, default_value = "/var/lib/ambient-ca", value_name = "DIR")]
    pub state_dir: PathBuf,

    /// Roots to verify the CA with (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Client certificate chain (PEM) of an admin identity.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// A service-account token of an admin identity (e.g. from `kubectl create token`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
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
            let file = args.state_dir.join("admin").join(crate::ADMIN_CREDENTIAL);
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
/// Runs `command` against the CA.
pub async fn run(command: AdminCommand) -> Result<()> {
    let describe = |e: tonic::Status| anyhow::anyhow!("{:?}: {}", e.code(), e.message());
    match command {
        AdminCommand::Status(args) => {
            let s = admin_client(&args).await?.get_status(pb::GetStatusRequest {}).await.map_err(describe)?;
            print_status(s.get_ref());
        }
        AdminCommand::TrustBundle(args) => {
            let s = admin_client(&args).await?.get_status(pb::GetStatusRequest {}).await.map_err(describe)?;
            for pem in s.get_ref().bundle.iter().flat_map(|b| &b.roots_pem) {
                print!("{pem}");
            }
        }
        AdminCommand::RotateIntermediate(args) => {
            let s = admin_client(&args)
                .await?
                .rotate_intermediate(pb::RotateIntermediateRequest {})
                .await
                .map_err(describe)?;
            println!("intermediate rotated; new certificates are signed by {}", s.get_ref().signer_fingerprint_sha256);
            print_status(s.get_ref());
        }
        AdminCommand::RotateRoot { phase, force, client } => {
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
        AdminCommand::Certs { all, identity, client } => {
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
