//! CA signing benchmark.
//!
//! Starts the real `ca` binary, pre-generates CSRs (ECDSA P-256, as proxies send), then keeps a
//! fixed number of `CreateCertificate` calls in flight over a few TLS connections for a fixed
//! time, as a node proxy would (service-account token + `ImpersonatedIdentity`). In the same run
//! it measures the raw rate of what each issuance must do cryptographically, with the CA's own
//! key type: one ECDSA P-256 signature (the certificate) + one verification (the CSR), in a tight
//! loop on one core. Reports certificates/s, latency p50/p99, the CA's CPU time per certificate,
//! and the ratios to the raw rate, as a table and JSON.
//!
//! Build first: `cargo build --release -p ca -p e2e`.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use clap::Parser;
use e2e::ca_process::{CaProcess, ca_binary, cpu_seconds, rss_mib};
use proto::api::istio::v1::auth::IstioCertificateRequest;
use proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use proto::control::with_token;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use serde::Serialize;

/// Measure the CA's signing rate against the raw crypto rate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Requests kept in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// TLS connections they share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured time, seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Distinct CSRs to cycle through.
    #[arg(long, default_value_t = 512)]
    csrs: usize,
    /// The `ca` binary (default: next to this one).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    concurrency: usize,
    connections: usize,
    seconds: f64,
    certificates: u64,
    errors: u64,
    certificates_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    ca_cpu_ms_per_certificate: f64,
    raw_sign_verify_per_s_one_core: f64,
    raw_cpu_ms_per_sign_verify: f64,
    ratio_rate_to_raw_one_core: f64,
    ratio_raw_cpu_to_ca_cpu: f64,
    ca_rss_mib_peak: f64,
    cores: usize,
}

const IDENTITY: &str = e2e::ca_process::BENCH_IDENTITY;

fn csr() -> Result<String> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(IDENTITY.try_into()?)];
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Raw ECDSA P-256 sign (the CA signing a ~400-byte TBS certificate) + verify (the CA checking a
/// ~200-byte CSR), on this thread, for `for_`. Returns operations per second.
fn raw_rate(for_: Duration) -> Result<f64> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation failed"))?;
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("key parse failed"))?;
    let tbs = vec![0x5au8; 400];
    let csr_body = vec![0xa5u8; 200];
    let csr_sig = key.sign(&rng, &csr_body).map_err(|_| anyhow::anyhow!("sign failed"))?;
    let public = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < for_ {
        for _ in 0..64 {
            let sig = key.sign(&rng, &tbs).map_err(|_| anyhow::anyhow!("sign failed"))?;
            std::hint::black_box(sig);
            public.verify(&csr_body, csr_sig.as_ref()).map_err(|_| anyhow::anyhow!("verify failed"))?;
        }
        n += 64;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ca_bin = ca_binary(args.ca.as_deref())?;
    let dir = tempfile::tempdir()?;
    let config = e2e::ca_process::bench_config(dir.path())?;
    let log = std::env::var("CA_LOG").ok();
    let mut launch = e2e::ca_process::CaLaunch::local(&ca_bin, &config, &dir.path().join("state"))?;
    if let Some(filter) = &log {
        launch.log_filter = filter.clone();
    }
    // One caller asks for every certificate: lift the per-caller rate limit, which would
    // otherwise be what is measured.
    launch.extra_args = ["--issue-rate", "1000000", "--issue-burst", "1000000"].map(String::from).to_vec();
    let ca = CaProcess::launch(&launch, log.is_some())?;
    let target = ca.target(None)?;
    let token = ca.token("istio-system", "ztunnel", Some("node-1"))?;

    println!("generating {} CSRs…", args.csrs);
    let csrs: Arc<Vec<String>> = Arc::new((0..args.csrs).map(|_| csr()).collect::<Result<_>>()?);
    let channels: Vec<_> = (0..args.connections).map(|_| target.channel()).collect::<Result<_, _>>()?;
    let request = |pem: String| IstioCertificateRequest {
        csr: pem,
        validity_duration: 0,
        metadata: Some(prost_types_struct(IDENTITY)),
    };
    // The CA is ready once one request succeeds (it serves only after loading its objects).
    let mut probe =
        IstioCertificateServiceClient::with_interceptor(channels[0].clone(), with_token(Some(token.clone())));
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = probe.create_certificate(request(csrs[0].clone())).await {
        if Instant::now() > deadline {
            anyhow::bail!("the CA never issued: {e}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "issuing with {} in flight over {} connections for {} s…",
        args.concurrency, args.connections, args.seconds
    );
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let mut client = IstioCertificateServiceClient::with_interceptor(
            channels[worker % channels.len()].clone(),
            with_token(Some(token.clone())),
        );
        let (csrs, measuring, stop) = (csrs.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let req = IstioCertificateRequest {
                    csr: csrs[i % csrs.len()].clone(),
                    validity_duration: 0,
                    metadata: Some(prost_types_struct(IDENTITY)),
                };
                i += 7;
                let t0 = Instant::now();
                let ok = client.create_certificate(req).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = cpu_seconds(ca.pid())?;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(ca.pid())? - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    latencies.sort_by(f64::total_cmp);
    let (_, rss_peak) = rss_mib(ca.pid())?;
    drop(ca);

    println!("measuring the raw ECDSA P-256 sign+verify rate on one core…");
    let raw = tokio::task::spawn_blocking(|| raw_rate(Duration::from_secs(3))).await??;
    let certificates = latencies.len() as u64;
    let rate = certificates as f64 / elapsed;
    let cpu_per_cert = cpu / certificates.max(1) as f64;
    let report = Report {
        concurrency: args.concurrency,
        connections: args.connections,
        seconds: elapsed,
        certificates,
        errors,
        certificates_per_s: rate,
        latency_p50_ms: e2e::load::quantile(&latencies, 0.50),
        latency_p99_ms: e2e::load::quantile(&latencies, 0.99),
        ca_cpu_ms_per_certificate: cpu_per_cert * 1e3,
        raw_sign_verify_per_s_one_core: raw,
        raw_cpu_ms_per_sign_verify: 1e3 / raw,
        ratio_rate_to_raw_one_core: rate / raw,
        ratio_raw_cpu_to_ca_cpu: (1.0 / raw) / cpu_per_cert,
        ca_rss_mib_peak: rss_peak,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    println!();
    println!("{:<44} {:>12}", "metric", "value");
    println!("{:<44} {:>12.0}", "certificates/s (CA + client share the cores)", report.certificates_per_s);
    println!("{:<44} {:>12.2}", "latency p50 (ms)", report.latency_p50_ms);
    println!("{:<44} {:>12.2}", "latency p99 (ms)", report.latency_p99_ms);
    println!("{:<44} {:>12.3}", "CA CPU per certificate (ms)", report.ca_cpu_ms_per_certificate);
    println!("{:<44} {:>12.0}", "raw P-256 sign+verify/s (one core)", report.raw_sign_verify_per_s_one_core);
    println!("{:<44} {:>12.3}", "raw CPU per sign+verify (ms)", report.raw_cpu_ms_per_sign_verify);
    println!("{:<44} {:>12.2}", "ratio: certificates/s ÷ raw/s (one core)", report.ratio_rate_to_raw_one_core);
    println!("{:<44} {:>12.2}", "ratio: raw CPU ÷ CA CPU per certificate", report.ratio_raw_cpu_to_ca_cpu);
    println!("{:<44} {:>12}", "errors", report.errors);
    println!("{:<44} {:>12.1}", "CA RSS peak (MiB)", report.ca_rss_mib_peak);
    let json = serde_json::to_string_pretty(&report)?;
    println!("\n{json}");
    if let Some(path) = &args.json {
        std::fs::write(path, &json)?;
    }
    Ok(())
}

fn prost_types_struct(identity: &str) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())) },
        )]
        .into(),
    }
}
