//! `demo`: a whole ambient mesh on this machine, walked through step by step.
//!
//! Nodes and pods are network namespaces; the CA, one ztunnel per node and a waypoint run as
//! real processes (the binaries next to this one). The walk-through: an ambient namespace whose
//! pods talk across nodes over mutual TLS (the identities each side proved, and what the wire
//! between the nodes carried); a pod outside the mesh let in under PERMISSIVE and refused under
//! STRICT; the tutorial's Gateway, VirtualService and DestinationRule, unedited, from a client
//! outside the mesh through the ingress gateway (canary split, header route with fault injection,
//! connection-pool overflow); a waypoint whose AuthorizationPolicy denies one caller; the CA's
//! intermediate and root rotated through its API under a long-lived stream.
//! Everything is removed at the end, on Ctrl-C and on SIGTERM.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use e2e::apps::{EchoClient, TUTORIAL_VERBATIM, echo_server, http_server};
use e2e::mesh::{CA_IP, Mesh, MeshOptions, MeshPod, PodSpec, http_exchange, http_exchange_as, metric_sum};
use e2e::sniff::{Sniffer, contains, tcp_segments};

const STEPS: usize = 6;
const ECHO: u16 = 9000;
const HTTP: u16 = 8080;
const SERVER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const HELLO_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The tutorial's service `default/hello`.
const TUTORIAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);

/// A whole ambient mesh on this machine, walked through step by step (needs root).
///
/// Builds two nodes and their pods as network namespaces, runs the real `ca`, one `ztunnel` per
/// node, an ingress gateway and a waypoint as processes, and shows: mutual TLS between pods with
/// the identities each side proved; plaintext clients let in (PERMISSIVE) and refused (STRICT);
/// the tutorial's Gateway, VirtualService and DestinationRule, unedited, from a client outside
/// the mesh through the ingress gateway (canary split, header route with fault injection, circuit
/// breaker); a waypoint's AuthorizationPolicy denying a caller; certificate rotation through the
/// CA's API under a live stream. Removes everything it made when it ends, and on Ctrl-C / SIGTERM.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Requests sent through the ingress gateway for the 70/30 canary split.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    requests: u32,

    /// At the end, keep the mesh running until Ctrl-C (to look at logs, admin endpoints and
    /// the YAML directory the CA reads).
    #[arg(long)]
    keep: bool,

    /// Log filter for the mesh's processes (their logs go to files under the state directory).
    #[arg(long, default_value = "info")]
    log: String,
}

/// Prints the walk-through.
struct Story {
    step: usize,
    start: Instant,
}

impl Story {
    fn step(&mut self, title: &str) {
        self.step += 1;
        println!("\n[{}/{STEPS}] {title}", self.step);
    }

    fn say(&self, line: impl AsRef<str>) {
        println!("      {}", line.as_ref());
    }

    /// A progress line, rewritten in place on a terminal (and not printed otherwise).
    fn progress(&self, line: impl AsRef<str>) {
        if std::io::stdout().is_terminal() {
            print!("\r\x1b[2K      {}", line.as_ref());
            let _ = std::io::stdout().flush();
        }
    }

    /// The line that replaces the progress line.
    fn done_progress(&self, line: impl AsRef<str>) {
        if std::io::stdout().is_terminal() {
            print!("\r\x1b[2K");
        }
        println!("      {}", line.as_ref());
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        // Interrupted: the signal handler removes everything and exits (130); what failed here
        // failed because the mesh's processes were stopped.
        Err(_) if e2e::topology::interrupted() => loop {
            std::thread::park();
        },
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut story = Story { step: 0, start: Instant::now() };
    println!("ambient mesh demo: two nodes and their pods as network namespaces on this machine; the CA,");
    println!("one ztunnel per node, an ingress gateway and a waypoint run as real processes.");

    story.step("Starting the mesh: the CA (control plane) and a ztunnel on each node");
    let options = MeshOptions { nodes: 2, log_filter: args.log.clone(), ..MeshOptions::default() };
    let mesh = Mesh::start(options).context("starting the one-machine mesh")?;
    let state = mesh.state_dir().to_owned();
    story.say(format!("state, YAML objects and logs: {}", state.display()));
    story.say(format!(
        "CA at {CA_IP}:15012 (certificates + xDS); ztunnel on node-1 (10.10.0.1) and node-2 (10.10.0.2) ready ({:.1} s)",
        story.start.elapsed().as_secs_f64()
    ));

    let mut mesh = mesh;
    let result = walk(&mut mesh, &mut story, &args).await;
    if result.is_err() && !e2e::topology::interrupted() {
        eprintln!("\n--- last lines of each process log ---\n{}", mesh.log_tails(15));
    }
    if let Ok(live) = &result
        && args.keep
    {
        let ctl = ambientctl_path();
        println!("\nThe mesh stays up until Ctrl-C (which stops it and removes everything). Look around:");
        println!("  logs:          {}/logs/", state.display());
        println!("  YAML objects:  {}/objects/ (the CA watches it: edit, add, delete)", state.display());
        for node in &mesh.nodes {
            println!("  {}: ip netns exec {} curl -s 127.0.0.1:15000/config_dump", node.name, node.netns.name);
        }
        let prometheus_url = match prometheus(&mut mesh).await {
            Ok((url, lines)) => {
                lines.iter().for_each(|l| println!("{l}"));
                Some(url)
            }
            Err(e) => {
                println!("  Prometheus:    not started: {e:#}");
                None
            }
        };
        live.keep_sending();
        match dashboard(&mesh, prometheus_url.is_some()).await {
            Ok(line) => println!("{line}"),
            Err(e) => println!("  Dashboard:     not started: {e:#}"),
        }
        println!(
            "    (the outside client keeps calling xingren.upup and demo/client keeps calling hello, twice a second)"
        );
        println!("    the same page, served by ambientctl: sudo {ctl} dashboard");
        let registered = keep(&mesh, prometheus_url)?;
        println!("ambientctl finds this mesh by itself ({}):", registered.display());
        println!("  sudo {ctl} ca status");
        println!("  sudo {ctl} ztunnel workloads --node node-1");
        println!("  sudo {ctl} namespace enable legacy");
        println!("(the last one enrolls namespace legacy's pod; this demo follows the label and says so)");
        // Like a cluster's node agent, follow namespace labels edited in the YAML directory. The
        // signal handler (Ctrl-C, SIGTERM, SIGHUP) ends this: it removes the mesh and exits (130).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            match mesh.follow_namespace_labels().await {
                Ok(changed) => {
                    for ns in changed {
                        println!("namespace {ns}: labels changed; its pods were enrolled or unenrolled to match");
                    }
                }
                Err(e) => eprintln!("following namespace labels: {e:#}"),
            }
        }
    }
    // The outside client's namespace first (it is the mesh's), then the mesh.
    let result = result.map(drop);
    drop(mesh);
    let left = leftovers(&state);
    if result.is_ok() {
        println!(
            "\nCleaned up: processes stopped, network namespaces and capture rules removed, {} deleted.",
            state.display()
        );
        ensure!(left.is_empty(), "left behind: {}", left.join(", "));
        println!("Done in {:.1} s.", story.start.elapsed().as_secs_f64());
    } else if !left.is_empty() {
        eprintln!("left behind: {}", left.join(", "));
    }
    result
}

/// Registers the kept mesh for `ambientctl` (removed with the mesh); returns the file.
fn keep(mesh: &Mesh, prometheus: Option<String>) -> Result<std::path::PathBuf> {
    let kept = ca_ctl::kept::KeptMesh {
        pid: std::process::id(),
        started: ca_ctl::kept::process_start(std::process::id()).unwrap_or(0),
        ca_addr: std::net::SocketAddr::from((CA_IP, 15012)),
        ca_name: CA_IP.to_string(),
        ca_netns: mesh.underlay.name.clone(),
        state_dir: mesh.ca_state_dir().to_owned(),
        config_dir: mesh.objects_dir().to_owned(),
        nodes: mesh.nodes.iter().map(|n| (n.name.clone(), n.netns.name.clone())).collect(),
        prometheus,
        scrape_targets: Some(mesh.scrape_targets().dir().join("targets")),
    };
    let dir = kept.register().context("registering the kept mesh for ambientctl")?;
    e2e::topology::remove_on_signal(&dir);
    Ok(dir.join("mesh.json"))
}

/// Starts a real Prometheus on the mesh's scrape configuration, forwards this machine's
/// 127.0.0.1:9090 (or a free port when that is taken) to it, and checks what it will say: every
/// component scraped, and the canary split as PromQL sees it. Its URL here and the lines to print.
async fn prometheus(mesh: &mut Mesh) -> Result<(String, Vec<String>)> {
    let config = mesh.scrape_targets().config();
    let expected = 1 + mesh.nodes.len() + 2; // the CA, a ztunnel per node, the gateway, the waypoint
    let prometheus = mesh.start_prometheus()?;
    let up = prometheus.all_up(expected, Duration::from_secs(30)).await?;
    let split = prometheus.query(e2e::tutorial::SPLIT_PROMQL).await?;
    let target = prometheus.addr();
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:9090").await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let (local, _forward) = e2e::mesh::port_forward_from(listener, mesh.underlay.ns.clone(), target)?;
    let mut jobs: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &up {
        *jobs.entry(t.label("component")).or_default() += 1;
    }
    let jobs: Vec<String> = jobs.iter().map(|(component, n)| format!("{component} ×{n}")).collect();
    let mut split: Vec<String> = split
        .iter()
        .map(|s| format!("{} {}", s.labels.get("destination_workload").map_or("?", String::as_str), s.value))
        .collect();
    split.sort();
    Ok((
        format!("http://{local}"),
        vec![
            format!(
                "  Prometheus:    http://{local} ({} targets up: {}; config {})",
                up.len(),
                jobs.join(", "),
                config.display()
            ),
            format!("    the split:   {}", e2e::tutorial::SPLIT_PROMQL),
            format!("    answers now: {}", split.join(", ")),
        ],
    ))
}

/// Serves `ambientctl dashboard`'s page on this machine's 127.0.0.1:20001 (or a free port when
/// that is taken), reading the mesh's Prometheus (or, without one, its proxies) from inside the
/// mesh's network, and checks it draws the live graph: the gateway and the waypoint on their
/// paths. The line to print.
async fn dashboard(mesh: &Mesh, with_prometheus: bool) -> Result<String> {
    use ca_ctl::dashboard::{Figures, Options};
    let listener =
        std::net::TcpListener::bind("127.0.0.1:20001").or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let figures = if with_prometheus {
        Figures::Prometheus(format!("http://{}", e2e::prometheus::LISTEN))
    } else {
        Figures::Targets(mesh.scrape_targets().dir().join("targets"))
    };
    let options = Options { interval: Duration::from_secs(1), ..Options::new(figures) };
    let netns = mesh.underlay.name.clone();
    // Its own thread, in the mesh's network; the page's socket stays on this machine's.
    std::thread::Builder::new().name("dashboard".into()).spawn(move || {
        let served =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
                |rt| {
                    ca_ctl::dashboard::enter_netns(&netns)?;
                    rt.block_on(async {
                        ca_ctl::dashboard::serve(tokio::net::TcpListener::from_std(listener)?, options).await
                    })
                },
            );
        if let Err(e) = served {
            eprintln!("the dashboard stopped: {e:#}");
        }
    })?;
    let here = ztunnel::netns::NetNs::current()?;
    let wanted =
        ["unknown -> workload:istio-system/istio-ingressgateway", "workload:demo/client -> workload:demo/waypoint"];
    let deadline = Instant::now() + Duration::from_secs(30);
    let graph = loop {
        let answer = http_exchange(&here, "GET", addr, "/api/graph", &[]).await?;
        let graph: serde_json::Value = serde_json::from_str(&answer.data().unwrap_or_default())?;
        let edges: Vec<&str> =
            graph["edges"].as_array().into_iter().flatten().filter_map(|e| e["id"].as_str()).collect();
        if wanted.iter().all(|w| edges.contains(w)) {
            break graph;
        }
        ensure!(
            Instant::now() < deadline,
            "the dashboard's graph never showed the gateway's and the waypoint's traffic: {graph}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let count = |k: &str| graph[k].as_array().map_or(0, Vec::len);
    Ok(format!(
        "  Dashboard:     http://{addr} (the service graph, live: {} nodes, {} edges now, the waypoint and the gateway on their paths)",
        count("nodes"),
        count("edges")
    ))
}

/// How to run the `ambientctl` built next to this program: relative to the current directory
/// when it is below it (`./target/release/ambientctl`), else its full path.
fn ambientctl_path() -> String {
    let Ok(exe) = std::env::current_exe() else { return "ambientctl".into() };
    let ctl = exe.with_file_name("ambientctl");
    match std::env::current_dir().ok().and_then(|cwd| ctl.strip_prefix(cwd).ok().map(std::path::Path::to_owned)) {
        Some(relative) => format!("./{}", relative.display()),
        None => ctl.display().to_string(),
    }
}

/// What the demo made that still exists: its network namespaces and state directory.
fn leftovers(state: &std::path::Path) -> Vec<String> {
    let own = format!("{}{}-", e2e::topology::PREFIX, std::process::id());
    let mut left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&own)).collect()
        })
        .unwrap_or_default();
    if state.exists() {
        left.push(state.display().to_string());
    }
    left
}

/// What keeps traffic flowing when the mesh is kept: the tutorial's outside client (and the
/// gateway it calls) and demo/client (which calls hello through the waypoint).
struct Live {
    outside: e2e::topology::NamedNetns,
    gateway: SocketAddr,
    client: Arc<MeshPod>,
}

async fn walk(mesh: &mut Mesh, story: &mut Story, args: &Args) -> Result<Live> {
    let (client, server) = mutual_tls(mesh, story).await?;
    outside_the_mesh(mesh, story, &client, &server).await?;
    let (outside, gateway) = ingress(mesh, story, args).await?;
    waypoint(mesh, story, &client).await?;
    rotation(mesh, story, &client, &server).await?;
    Ok(Live { outside, gateway, client })
}

impl Live {
    /// Two requests a second from each client until the process ends: the tutorial's loop
    /// through the gateway, and demo/client → hello through the waypoint.
    fn keep_sending(&self) {
        let (ns, gateway) = (self.outside.ns.clone(), self.gateway);
        tokio::spawn(async move {
            loop {
                let _ = http_exchange_as(&ns, "xingren.upup", gateway, "/", &[]).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let ns = self.client.netns.ns.clone();
        tokio::spawn(async move {
            loop {
                let _ = http_exchange(&ns, "GET", SocketAddr::from((HELLO_VIP, 80)), "/", &[]).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// A label value from a Prometheus sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    line[start..].split('"').next()
}

/// The value of `wanted` on the first sample of `metric` that has all `needles`.
fn sample_label(metrics: &str, metric: &str, needles: &[&str], wanted: &str) -> Option<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with(metric) && needles.iter().all(|n| l.contains(n)))
        .find_map(|l| label(l, wanted).map(str::to_owned))
}

async fn connect_echo(from: &MeshPod, to: SocketAddr) -> Result<EchoClient> {
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match from.connect(to).await {
            Ok(stream) => match EchoClient::greet(stream).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made"))).with_context(|| format!("{} → {to}", from.key()))
}

async fn mutual_tls(mesh: &mut Mesh, story: &mut Story) -> Result<(Arc<MeshPod>, Arc<MeshPod>)> {
    story.step("Namespace demo joins the mesh: label istio.io/dataplane-mode=ambient");
    mesh.namespace("demo", true).await?;
    let client = mesh.pod(PodSpec::new("client", "demo", 1)).await?;
    let server = mesh.pod(PodSpec::new("server", "demo", 2)).await?;
    echo_server(server.listen(ECHO)?, "server");
    mesh.service("server", "demo", SERVER_VIP, ECHO, "server", ECHO)?;
    mesh.settle(&[], &[]).await?;
    story.say(format!(
        "pods: client on node-1 ({}), server on node-2 ({}), service server.demo at {SERVER_VIP}:{ECHO}",
        client.ip, server.ip
    ));
    story
        .say("both pods were enrolled live: capture rules in their network namespaces, handed to their node's ztunnel");

    let marker = format!("demo-marker-{}-plaintext-would-show-this", std::process::id());
    let sniffer = Sniffer::start(&mesh.underlay.ns)?;
    let mut echo = connect_echo(&client, SocketAddr::from((SERVER_VIP, ECHO))).await?;
    echo.round_trip(marker.as_bytes()).await?;
    let seen_as = echo.seen_as;
    drop(echo);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frames = sniffer.frames()?;
    story.say(format!(
        "client → server.demo:{ECHO}: echoed; the server app saw the client as {seen_as} (its own address)"
    ));
    ensure!(seen_as.ip() == std::net::IpAddr::V4(client.ip), "the server saw {seen_as}, not the client's address");

    let m1 = mesh.metrics(1).await?;
    let m2 = mesh.metrics(2).await?;
    let opened = "istio_tcp_connections_opened_total{";
    let server_id =
        sample_label(&m1, opened, &["reporter=\"source\"", "destination_workload=\"server\""], "destination_principal")
            .context("node-1's ztunnel has no record of the connection")?;
    let client_id =
        sample_label(&m2, opened, &["reporter=\"destination\"", "source_workload=\"client\""], "source_principal")
            .context("node-2's ztunnel has no record of the connection")?;
    story.say(format!("node-1's ztunnel verified the server's certificate:  {server_id}"));
    story.say(format!("node-2's ztunnel verified the client's certificate:  {client_id}"));
    ensure!(server_id == "spiffe://cluster.local/ns/demo/sa/server", "unexpected server identity {server_id}");
    ensure!(client_id == "spiffe://cluster.local/ns/demo/sa/client", "unexpected client identity {client_id}");

    let segments = tcp_segments(&frames);
    // Everything on the underlay crosses between nodes (or to the CA).
    let mut by_port: BTreeMap<u16, (usize, usize)> = BTreeMap::new();
    for s in &segments {
        let port = s.src.port().min(s.dst.port());
        let e = by_port.entry(port).or_default();
        e.0 += 1;
        e.1 += s.payload.len();
    }
    let leaked = segments.iter().any(|s| contains(&s.payload, marker.as_bytes()));
    let described: Vec<String> = by_port
        .iter()
        .map(|(port, (n, bytes))| {
            let what = match port {
                15008 => "HBONE, mutual TLS",
                15012 => "control plane, TLS",
                _ => "other",
            };
            format!("port {port} ({what}): {n} segments, {bytes} bytes")
        })
        .collect();
    story.say(format!(
        "on the wire between the nodes: {}",
        if described.is_empty() { "nothing captured".into() } else { described.join("; ") }
    ));
    ensure!(!leaked, "the marker crossed the underlay in plaintext");
    ensure!(by_port.contains_key(&15008), "no HBONE traffic was captured between the nodes");
    ensure!(
        by_port.keys().all(|p| *p == 15008 || *p == 15012),
        "traffic on other ports crossed the underlay: {described:?}"
    );
    story.say("the message's text never appeared on the wire: only TLS crossed between the nodes");
    Ok((client, server))
}

async fn outside_the_mesh(mesh: &mut Mesh, story: &mut Story, client: &MeshPod, server: &MeshPod) -> Result<()> {
    story.step("A pod outside the mesh: let in under PERMISSIVE, refused under STRICT");
    mesh.namespace("legacy", false).await?;
    let outsider = mesh.pod(PodSpec::new("outsider", "legacy", 1)).await?;
    mesh.settle(&[], &[]).await?;
    let mut echo = connect_echo(&outsider, server.addr(ECHO)).await?;
    echo.round_trip(b"hello from outside").await?;
    drop(echo);
    story.say(format!(
        "legacy/outsider (no ambient label) → server {}: answered; it arrived in plaintext on node-2's ztunnel (port 15006),",
        server.addr(ECHO)
    ));
    story.say("allowed because the mesh's default mTLS mode is PERMISSIVE");

    mesh.apply(
        "peerauthentication-demo-strict",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: demo\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    mesh.settle(&["demo/converted_peer_authentication_strict"], &[]).await?;
    let refused = match outsider.connect(server.addr(ECHO)).await {
        Err(_) => true,
        Ok(stream) => EchoClient::greet(stream).await.is_err(),
    };
    ensure!(refused, "STRICT let a plaintext client through");
    story.say(
        "PeerAuthentication demo/strict (mode STRICT) applied: the same connection is now refused by node-2's ztunnel",
    );
    let mut echo = connect_echo(client, server.addr(ECHO)).await?;
    echo.round_trip(b"still fine").await?;
    let denied = metric_sum(
        &mesh.metrics(2).await?,
        "istio_tcp_connections_closed_total{",
        &["reporter=\"destination\"", "response_flags=\"DENY\""],
    );
    story.say(format!(
        "the client in the mesh still gets through (mutual TLS); node-2 counts {denied} denied connection(s)"
    ));
    Ok(())
}

async fn ingress(mesh: &mut Mesh, story: &mut Story, args: &Args) -> Result<(e2e::topology::NamedNetns, SocketAddr)> {
    story.step("The tutorial, unedited: an outside client through the ingress gateway xingren-gateway");
    mesh.namespace("default", true).await?;
    for (name, version, node) in [("hello-latest", "latest", 2), ("hello-new", "new", 1)] {
        let pod = mesh.pod(PodSpec::new(name, "default", node).label("app", "hello").label("version", version)).await?;
        http_server(pod.listen(HTTP)?, name);
    }
    mesh.service("hello", "default", TUTORIAL_VIP, 80, "hello", HTTP)?;
    let gateway =
        mesh.ingress_gateway("istio-system", "istio-ingressgateway", 1, &[("istio", "ingressgateway")]).await?;
    story.say("deployed: service default/hello (pods hello-latest, hello-new; namespace default in the mesh) and");
    story.say(format!(
        "an ingress gateway pod istio-system/istio-ingressgateway (label istio=ingressgateway) on node-1 at {}",
        gateway.ip
    ));
    mesh.apply("tutorial", TUTORIAL_VERBATIM)?;
    let outside = mesh.outside_client(1)?;
    let gw = SocketAddr::from((gateway.ip, 80));
    let outside_ns = outside.ns.clone();
    // Requests the loop does not make (the burst, the header route): an HTTP client in the same
    // namespace, naming xingren.upup.
    let get = move |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let ns = outside_ns.clone();
        async move { http_exchange_as(&ns, "xingren.upup", gw, path, headers).await }
    };
    mesh.wait_until("the gateway to route xingren.upup", Duration::from_secs(30), || async {
        get("/", &[]).await.is_ok_and(|a| a.status == 200)
    })
    .await?;
    e2e::tutorial::point_host_at(&outside, gateway.ip)?;
    story.say("applied the tutorial's Gateway xingren-gateway, VirtualService hello-virtualservice and");
    story.say(
        "DestinationRule hello-destinationrule exactly as written; the gateway listens on port 80 for xingren.upup",
    );
    story.say(format!(
        "an outside client (10.10.0.201: not a node, not in the mesh) loops `wget -q -O - http://xingren.upup`, the name pointed at {} in its /etc/hosts", gateway.ip
    ));

    // The split.
    let total = args.requests;
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    for i in 1..=total {
        let page = e2e::tutorial::wget(&outside).await.with_context(|| format!("request {i} of the loop"))?;
        *served.entry(page.trim().to_owned()).or_default() += 1;
        if i % 20 == 0 || i == total {
            story.progress(format!("canary split: {i}/{total} requests sent"));
        }
    }
    let latest = served.get("hello-latest").copied().unwrap_or(0);
    let new = served.get("hello-new").copied().unwrap_or(0);
    story.done_progress(format!(
        "canary split over {total} requests: hello-latest {latest} ({:.0} %), hello-new {new} ({:.0} %) — weights 70/30",
        f64::from(latest) * 100.0 / f64::from(total),
        f64::from(new) * 100.0 / f64::from(total)
    ));
    ensure!(latest + new == total, "answers from unexpected pods: {served:?}");

    // The header route, with its injected delay cut by the timeout. Two lanes (the pool: one in
    // flight, one waiting).
    story.progress("header route: 30 requests with `version: new` ...");
    let ns = outside.ns.clone();
    let header = e2e::tutorial::header_route(2, 15, move || {
        let ns = ns.clone();
        async move { http_exchange_as(&ns, "xingren.upup", gw, "/", &[("version", "new")]).await }
    })
    .await?;
    story.done_progress(format!(
        "header route `version: new`: {} answered by hello-new, {} delayed by the injected 10 s fault and cut at the 5 s timeout (504) ({:.1} s)",
        header.to_new,
        header.timed_out,
        header.elapsed.as_secs_f64()
    ));
    ensure!(
        header.unexpected.is_empty(),
        "header-routed requests did not end as the tutorial says: {:?}",
        header.unexpected
    );

    // The circuit breaker.
    let statuses = e2e::tutorial::burst(20, move || get("/delay/300", &[])).await?;
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    story.say(format!(
        "20 concurrent requests against a pool of 1 connection + 1 waiting: {ok} served, {overflow} refused with 503 (overflow, flag UO)"
    ));
    ensure!(ok + overflow == 20 && overflow > 0, "unexpected burst answers: {statuses:?}");

    let m = mesh.waypoint_metrics(&gateway).await?;
    let counted = metric_sum(&m, "istio_requests_total{", &["destination_service=\"hello.default.svc.cluster.local\""]);
    story.say(format!("the gateway counted {counted} requests to hello (istio_requests_total, reporter=source)"));
    let identity = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";
    let seen = metric_sum(
        &mesh.metrics(2).await?,
        "istio_tcp_connections_opened_total{",
        &["reporter=\"destination\"", &format!("source_principal=\"{identity}\"")],
    );
    ensure!(seen > 0.0, "node-2's ztunnel saw no tunnel from the gateway");
    story.say(format!("into the mesh over HBONE as the gateway: node-2's ztunnel verified {identity}"));
    Ok((outside, gw))
}

async fn waypoint(mesh: &mut Mesh, story: &mut Story, client: &MeshPod) -> Result<()> {
    story.step("A waypoint for namespace demo: an L7 AuthorizationPolicy denies one caller");
    let hello = mesh.pod(PodSpec::new("hello", "demo", 2).label("app", "hello")).await?;
    http_server(hello.listen(HTTP)?, "hello");
    mesh.service("hello", "demo", HELLO_VIP, 80, "hello", HTTP)?;
    let waypoint = mesh.waypoint("demo", "waypoint", 1, WAYPOINT_VIP).await?;
    mesh.use_waypoint("demo", Some("waypoint"))?;
    let intruder = mesh.pod(PodSpec::new("intruder", "demo", 2)).await?;
    mesh.settle(&[], &[]).await?;
    story.say("deployed: Gateway demo/waypoint (class istio-waypoint), its Service and a waypoint process on node-1;");
    story.say("namespace demo labelled istio.io/use-waypoint=waypoint; service demo/hello; pods client and intruder");
    mesh.apply(
        "authz-demo-deny-intruder",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  namespace: demo\nspec:\n  targetRefs:\n    - {kind: Service, group: \"\", name: hello}\n  action: DENY\n  rules:\n    - from:\n        - source:\n            principals: [cluster.local/ns/demo/sa/intruder]\n",
    )?;
    let to = SocketAddr::from((HELLO_VIP, 80));
    mesh.wait_until("the policy to apply", Duration::from_secs(30), || async {
        http_exchange(&intruder.netns.ns, "GET", to, "/", &[]).await.is_ok_and(|a| a.status == 403)
    })
    .await?;
    let denied = http_exchange(&intruder.netns.ns, "GET", to, "/", &[]).await?;
    let allowed = http_exchange(&client.netns.ns, "GET", to, "/", &[]).await?;
    story.say(
        "policy demo/deny-intruder: DENY requests to service hello from principal cluster.local/ns/demo/sa/intruder",
    );
    story.say(format!("demo/intruder → hello: {} {}", denied.status, denied.body.trim()));
    story.say(format!("demo/client   → hello: {} (answered by {})", allowed.status, allowed.body.trim()));
    ensure!(denied.status == 403 && allowed.status == 200, "policy not enforced as written");
    story.say("the caller's identity comes from its TLS certificate, checked by the waypoint: a header cannot fake it");
    let m = mesh.waypoint_metrics(&waypoint).await?;
    let counted = metric_sum(&m, "istio_requests_total{", &["destination_service=\"hello.demo.svc.cluster.local\""]);
    let refused = metric_sum(&m, "istio_requests_total{", &["response_code=\"403\"", "response_flags=\"RBAC\""]);
    story.say(format!(
        "the waypoint counted {counted} requests to hello, {refused} refused by policy (reporter=waypoint)"
    ));
    Ok(())
}

fn short(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

async fn rotation(mesh: &mut Mesh, story: &mut Story, client: &Arc<MeshPod>, server: &MeshPod) -> Result<()> {
    story.step("Certificates rotated through the CA's API (intermediate, then root) under a live stream");
    let mut stream = connect_echo(client, server.addr(ECHO)).await?;
    let (trips, failed, stop) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let pump = {
        let (trips, failed, stop) = (trips.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if stream.round_trip(b"long-lived stream keeps flowing").await.is_err() {
                    failed.store(true, Ordering::SeqCst);
                    return;
                }
                trips.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let client_id = "spiffe://cluster.local/ns/demo/sa/client";
    let before = mesh.cert_chain(1, client_id).await?;
    story.say(format!(
        "a long-lived stream client → server is open; the client's certificate: signer {}…, root {}…",
        short(&before[0]),
        short(&before[before.len() - 1])
    ));

    let summary = |out: &str| out.lines().next().unwrap_or("").to_owned();
    story.say(format!(
        "$ ambientctl ca rotate-intermediate   → {}",
        summary(&mesh.ambientctl_ca(&["rotate-intermediate"])?)
    ));
    story.say(format!(
        "$ ambientctl ca rotate-root prepare    → {}",
        summary(&mesh.ambientctl_ca(&["rotate-root", "prepare"])?)
    ));
    // Every proxy must trust the new root before anything is signed under it.
    mesh.wait_until("every proxy to trust the new root", Duration::from_secs(20), || async {
        let mut all = true;
        for node in 1..=2 {
            let bundle = mesh.config_dump(node).await.map(|d| d["trust_bundle"].as_array().map_or(0, Vec::len));
            all &= bundle.is_ok_and(|n| n == 2);
        }
        all
    })
    .await?;
    story.say("  (both ztunnels now trust the old and the new root: the bundle came over xDS)");
    story.say(format!(
        "$ ambientctl ca rotate-root activate   → {}",
        summary(&mesh.ambientctl_ca(&["rotate-root", "activate"])?)
    ));

    // A pod that joins now gets a certificate under the new root, and talks to the server
    // (still on a certificate under the old root): both roots are trusted.
    let late = mesh.pod(PodSpec::new("late", "demo", 1)).await?;
    mesh.settle(&[], &[]).await?;
    let mut echo = connect_echo(&late, server.addr(ECHO)).await?;
    echo.round_trip(b"signed under the new root").await?;
    let after = mesh.cert_chain(1, "spiffe://cluster.local/ns/demo/sa/late").await?;
    story.say(format!(
        "new pod demo/late got a certificate: signer {}…, root {}… (the new ones), and reached the server,",
        short(&after[0]),
        short(&after[after.len() - 1])
    ));
    story.say("whose certificate is still under the old root: both roots stay trusted until `ambientctl ca rotate-root retire`");
    ensure!(
        after[0] != before[0] && after[after.len() - 1] != before[before.len() - 1],
        "the new pod's certificate is not under the new root"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    pump.await?;
    let trips = trips.load(Ordering::Relaxed);
    ensure!(!failed.load(Ordering::SeqCst), "the long-lived stream broke during the rotation");
    story.say(format!("the long-lived stream never stopped: {trips} round trips during the rotation, none failed"));
    Ok(())
}
