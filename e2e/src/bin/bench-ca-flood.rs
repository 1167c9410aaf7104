//! The CA under an unauthenticated flood.
//!
//! Starts the real `ca` binary with its default limits, measures a legitimate caller's
//! `CreateCertificate` latency and the CA's memory at rest, then keeps `--streams` gRPC streams
//! open from callers with no credentials at all, each announcing a `--prefix-bytes` message (a
//! gRPC length prefix and nothing after it) to the certificate service, re-opening each one the
//! CA ends; and measures the legitimate caller again while the flood runs. Reports latency
//! p50/p99 at rest and under the flood, the CA's RSS (current and peak), and how the flood's
//! streams were answered, as a table and JSON.
//!
//! Build first: `cargo build --release -p ca -p e2e`.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use e2e::ca_process::{CaProcess, ca_binary, rss_mib};
use proto::api::istio::v1::auth::IstioCertificateRequest;
use proto::api::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use proto::control::with_token;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use serde::Serialize;

/// Flood the CA's certificate service with unauthenticated streams and measure a legitimate caller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Unauthenticated streams kept open.
    #[arg(long, default_value_t = 5000)]
    streams: usize,
    /// Connections they are spread over (each carries at most the CA's stream limit).
    #[arg(long, default_value_t = 25)]
    connections: usize,
    /// The message size each stream announces.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    prefix_bytes: u32,
    /// Legitimate requests measured at rest and again under the flood.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// The `ca` binary (default: next to this one).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    flood_streams: usize,
    flood_connections: usize,
    prefix_bytes: u32,
    legit_p50_ms_at_rest: f64,
    legit_p99_ms_at_rest: f64,
    legit_p50_ms_flooded: f64,
    legit_p99_ms_flooded: f64,
    legit_errors_flooded: usize,
    ca_rss_mib_at_rest: f64,
    ca_rss_mib_flooded: f64,
    ca_rss_mib_peak: f64,
    flood_streams_opened: u64,
    flood_streams_answered: u64,
    flood_streams_refused_by_h2: u64,
}

const IDENTITY: &str = e2e::ca_process::BENCH_IDENTITY;
const PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

fn csr() -> Result<String> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(IDENTITY.try_into()?)];
    Ok(params.serialize_request(&key)?.pem()?)
}

/// `n` sequential legitimate requests: their latencies (ms, sorted) and the number that failed.
async fn legit(
    client: &mut IstioCertificateServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
    >,
    csrs: &[String],
) -> (Vec<f64>, usize) {
    let mut latencies = Vec::new();
    let mut errors = 0;
    for pem in csrs {
        let request = IstioCertificateRequest { csr: pem.clone(), validity_duration: 0, metadata: None };
        let t0 = Instant::now();
        match client.create_certificate(request).await {
            Ok(_) => latencies.push(t0.elapsed().as_secs_f64() * 1e3),
            Err(_) => errors += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, errors)
}

#[derive(Default)]
struct FloodCounts {
    opened: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
}

/// One connection of the flood: keeps `streams` streams open, each announcing `prefix` bytes.
async fn flood_connection(
    target: proto::control::ControlPlaneTarget,
    streams: usize,
    prefix: u32,
    counts: Arc<FloodCounts>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(target.addr).await?;
    let tls = tokio_rustls::TlsConnector::from(proto::tls::control_plane_client_config(target.trust.clone(), None)?);
    let name = rustls_pki_types::ServerName::try_from(target.server_name.clone())?;
    let tls = tls.connect(name, tcp).await?;
    let (send, conn) = h2::client::Builder::new().max_concurrent_reset_streams(0).handshake::<_, Bytes>(tls).await?;
    tokio::spawn(conn);
    let mut prefix_frame = vec![0u8];
    prefix_frame.extend_from_slice(&prefix.to_be_bytes());
    let prefix_frame = Bytes::from(prefix_frame);
    let mut open = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        while open.len() < streams && !stop.load(Ordering::Relaxed) {
            let mut send = send.clone().ready().await?;
            let request = http::Request::post(format!("https://{}{PATH}", target.server_name))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())?;
            let (response, mut body) = send.send_request(request, false)?;
            body.send_data(prefix_frame.clone(), false)?;
            counts.opened.fetch_add(1, Ordering::Relaxed);
            let counts = counts.clone();
            open.spawn(async move {
                let _body = body;
                match response.await {
                    Ok(_) => counts.answered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counts.refused.fetch_add(1, Ordering::Relaxed),
                };
            });
        }
        tokio::select! {
            _ = open.join_next() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ca_bin = ca_binary(args.ca.as_deref())?;
    let dir = tempfile::tempdir()?;
    let config = e2e::ca_process::bench_config(dir.path())?;
    let ca = CaProcess::start(&ca_bin, &config, &dir.path().join("state"), std::env::var("CA_LOG").ok().as_deref())?;
    let target = ca.target(None)?;
    // The workload itself asks (token bound to its pod's identity), within its rate limit.
    let token = ca.token("bench", "client", None)?;
    let mut client = IstioCertificateServiceClient::with_interceptor(target.channel()?, with_token(Some(token)));
    let csrs: Vec<String> = (0..args.requests).map(|_| csr()).collect::<Result<_>>()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = IstioCertificateRequest { csr: csrs[0].clone(), validity_duration: 0, metadata: None };
        match client.create_certificate(probe).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => anyhow::bail!("the CA never issued: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    // At rest. Half the requests now, half under the flood: both within the caller's burst.
    let half = args.requests / 2;
    let (rest, _) = legit(&mut client, &csrs[..half]).await;
    let (rss_rest, _) = rss_mib(ca.pid())?;

    println!("flooding with {} unauthenticated streams over {} connections…", args.streams, args.connections);
    let counts = Arc::new(FloodCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let per = args.streams.div_ceil(args.connections);
    let mut flood = Vec::new();
    for _ in 0..args.connections {
        flood.push(tokio::spawn(flood_connection(
            target.clone(),
            per,
            args.prefix_bytes,
            counts.clone(),
            stop.clone(),
        )));
    }
    // Let the flood reach its size.
    let filled = Instant::now();
    while counts.opened.load(Ordering::Relaxed) < args.streams as u64 && filled.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (flooded, errors) = legit(&mut client, &csrs[half..]).await;
    let (rss_flooded, rss_peak) = rss_mib(ca.pid())?;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        if let Err(e) = f.await.context("flood task")? {
            println!("a flood connection ended: {e}");
        }
    }

    let report = Report {
        flood_streams: args.streams,
        flood_connections: args.connections,
        prefix_bytes: args.prefix_bytes,
        legit_p50_ms_at_rest: e2e::load::quantile(&rest, 0.5),
        legit_p99_ms_at_rest: e2e::load::quantile(&rest, 0.99),
        legit_p50_ms_flooded: e2e::load::quantile(&flooded, 0.5),
        legit_p99_ms_flooded: e2e::load::quantile(&flooded, 0.99),
        legit_errors_flooded: errors,
        ca_rss_mib_at_rest: rss_rest,
        ca_rss_mib_flooded: rss_flooded,
        ca_rss_mib_peak: rss_peak,
        flood_streams_opened: counts.opened.load(Ordering::Relaxed),
        flood_streams_answered: counts.answered.load(Ordering::Relaxed),
        flood_streams_refused_by_h2: counts.refused.load(Ordering::Relaxed),
    };
    println!();
    println!("{:<44} {:>12}", "metric", "value");
    println!("{:<44} {:>12.2}", "legitimate p50 ms, at rest", report.legit_p50_ms_at_rest);
    println!("{:<44} {:>12.2}", "legitimate p99 ms, at rest", report.legit_p99_ms_at_rest);
    println!("{:<44} {:>12.2}", "legitimate p50 ms, flooded", report.legit_p50_ms_flooded);
    println!("{:<44} {:>12.2}", "legitimate p99 ms, flooded", report.legit_p99_ms_flooded);
    println!("{:<44} {:>12}", "legitimate errors, flooded", report.legit_errors_flooded);
    println!("{:<44} {:>12.1}", "CA RSS MiB at rest", report.ca_rss_mib_at_rest);
    println!("{:<44} {:>12.1}", "CA RSS MiB flooded", report.ca_rss_mib_flooded);
    println!("{:<44} {:>12.1}", "CA RSS MiB peak", report.ca_rss_mib_peak);
    println!("{:<44} {:>12}", "flood streams opened", report.flood_streams_opened);
    println!("{:<44} {:>12}", "flood streams answered (refused by gRPC)", report.flood_streams_answered);
    println!("{:<44} {:>12}", "flood streams reset (HTTP/2)", report.flood_streams_refused_by_h2);
    let json = serde_json::to_string_pretty(&report)?;
    println!("\n{json}");
    if let Some(path) = args.json {
        std::fs::write(path, json)?;
    }
    Ok(())
}
