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
    let pem = read(&roots).context(
        "no CA root to verify the CA with: pass --state-dir (the CA's state directory) or --ca-cert; \
         a one-machine mesh kept by `demo --keep` is found without flags",
    )?;
    let trust = TrustBundle::from_pem(&pem).with_context(|| format!("{}: no usable root", roots.display()))?;
    let token = match &args.token_file {
        Some(f) => Some(String::from_utf8(read(f)?).context("token file is not UTF-8")?.trim().to_owned()),
        None => None,
    };
    let credential = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ if token.is_none() => {
            let file = args.state_dir.join("admin").join(proto::control::ADMIN_CREDENTIAL);
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
        cluster_id: None,
    };
    Ok(CaAdminClient::with_interceptor(target.channel()?, with_token(token)))
}

use super::date_and_distance as when;
use super::{Output, rfc3339};

fn root_state(state: i32) -> &'static str {
    pb::RootState::try_from(state).map_or("unknown", |s| match s {
        pb::RootState::Pending => "pending",
        pb::RootState::Active => "active",
        pb::RootState::Retiring => "retiring",
        pb::RootState::Unspecified => "unknown",
    })
}

/// The status as a document (`-o json|yaml`).
fn status_document(s: &pb::CaStatus) -> serde_json::Value {
    let roots: Vec<_> = s
        .roots
        .iter()
        .map(|r| {
            serde_json::json!({
                "fingerprint_sha256": r.fingerprint_sha256,
                "subject": r.subject,
                "state": root_state(r.state),
                "expires": rfc3339(r.not_after_unix),
                "unexpired_issued": r.unexpired_issued,
            })
        })
        .collect();
    serde_json::json!({
        "trust_domain": s.trust_domain,
        "plugged_in": s.plugged_in,
        "signer": {
            "fingerprint_sha256": s.signer_fingerprint_sha256,
            "subject": s.signer_subject,
            "expires": rfc3339(s.signer_not_after_unix),
        },
        "roots": roots,
        "trust_bundle_pem": s.bundle.iter().flat_map(|b| &b.roots_pem).collect::<Vec<_>>(),
    })
}

fn certificates_document(list: &[pb::IssuedCertificate]) -> serde_json::Value {
    let certs: Vec<_> = list
        .iter()
        .map(|c| {
            serde_json::json!({
                "serial": c.serial_hex,
                "identity": c.identity,
                "node": c.node,
                "requested_by": c.requested_by,
                "not_before": rfc3339(c.not_before_unix),
                "expires": rfc3339(c.not_after_unix),
                "root_fingerprint_sha256": c.root_fingerprint_sha256,
            })
        })
        .collect();
    serde_json::json!({ "certificates": certs })
}

#[allow(clippy::print_stdout)]
fn print_status(s: &pb::CaStatus, output: Output) -> Result<()> {
    if output.document(&status_document(s))? {
        return Ok(());
    }
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
    Ok(())
}

#[allow(clippy::print_stdout)]
/// The CA answered a call with an error (or could not be reached: `Unavailable`).
#[derive(Debug)]
pub struct CaRefused(pub tonic::Status);

impl std::fmt::Display for CaRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for CaRefused {}

/// Runs `command` against the CA, printing as `output` says.
pub async fn run(command: AdminCommand, output: Output) -> Result<()> {
    let describe = |e: tonic::Status| anyhow::Error::new(CaRefused(e));
    match command {
        AdminCommand::Status(args) => {
            let s = admin_client(&args).await?.get_status(pb::GetStatusRequest {}).await.map_err(describe)?;
            print_status(s.get_ref(), output)?;
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
            if output == Output::Table {
                println!(
                    "intermediate rotated; new certificates are signed by {}",
                    s.get_ref().signer_fingerprint_sha256
                );
            }
            print_status(s.get_ref(), output)?;
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
                _ if output != Output::Table => {}
                Phase::Prepare => println!(
                    "new root added to the trust bundle; proxies receive it over xDS. Next: rotate-root activate"
                ),
                Phase::Activate => println!(
                    "signing under the new root; the old root stays trusted. Next, once old certificates expire: rotate-root retire"
                ),
                Phase::Retire => println!("old root retired from the trust bundle"),
            }
            print_status(s.get_ref(), output)?;
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
            let certificates = &list.get_ref().certificates;
            if output.document(&certificates_document(certificates))? {
                return Ok(());
            }
            let rows: Vec<[String; 4]> = certificates
                .iter()
                .map(|c| {
                    let node = if c.node.is_empty() { "-" } else { &c.node };
                    [c.serial_hex.clone(), c.identity.clone(), node.to_owned(), when(c.not_after_unix)]
                })
                .collect();
            super::print_table(&["SERIAL", "IDENTITY", "NODE", "EXPIRES"], &rows);
        }
    }
    Ok(())
}
