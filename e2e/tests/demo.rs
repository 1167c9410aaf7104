//! The demo (the README's main command runs it) as a new user meets it:
//!
//! - the whole walk-through runs and exits 0, and nothing it made is left;
//! - interrupted with Ctrl-C (SIGINT to its process group, as a terminal sends it) at every step,
//!   it exits 130 and leaves no network namespace, capture rule, process or file behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// The host's own packet-filter and routing-policy state: none of it may change.
fn host_rules() -> String {
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run("nft", &["list", "ruleset"]) + &run("ip", &["rule"])
}

struct Demo {
    child: Child,
    lines: Receiver<String>,
    output: Vec<String>,
    tmp: Option<tempfile::TempDir>,
}

impl Drop for Demo {
    /// A test that failed half-way leaves no demo (and no mesh) running: Ctrl-C to the group.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            let _ = self.child.wait();
        }
    }
}

impl Demo {
    /// Starts the demo in its own process group, its temporary files under a directory of its own.
    fn start(args: &[&str]) -> Demo {
        let tmp = tempfile::Builder::new().prefix("demo-test-").tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
            .args(args)
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Demo { child, lines, output: Vec::new(), tmp: Some(tmp) }
    }

    /// Reads output until a line contains `marker`.
    fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(marker);
                    self.output.push(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {marker:?} within 120 s:\n{}", self.output.join("\n")),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the demo ended before {marker:?}:\n{}", self.output.join("\n"))
                }
            }
        }
    }

    /// Waits for the demo to exit; its exit code and the rest of its output.
    fn finish(mut self) -> (Option<i32>, String, tempfile::TempDir) {
        let status = self.child.wait().unwrap();
        self.output.extend(self.lines.iter());
        (status.code(), self.output.join("\n"), self.tmp.take().unwrap())
    }

    /// Ctrl-C in a terminal: SIGINT to the whole process group.
    fn interrupt(&self) {
        let group = format!("-{}", self.child.id());
        let status = Command::new("kill").args(["-INT", "--", &group]).status().unwrap();
        assert!(status.success(), "kill -INT {group}");
    }

    /// `kill <pid>`: SIGTERM to the demo process alone (its mesh processes must follow it).
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success(), "kill -TERM {pid}");
    }
}

/// Processes whose command line mentions `dir` (the mesh's processes all name files under it).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()))
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Network namespaces the demo with process id `pid` made.
fn namespaces_of(pid: u32) -> Vec<String> {
    let own = format!("{}{pid}-", e2e::topology::PREFIX);
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&own)).collect()
        })
        .unwrap_or_default()
}

/// Nothing the demo made is left: namespaces, processes, files.
fn assert_nothing_left(pid: u32, tmp: &Path, when: &str) {
    let left = || {
        let procs = processes_using(tmp);
        let netns = namespaces_of(pid);
        let files: Vec<PathBuf> = std::fs::read_dir(tmp).unwrap().flatten().map(|e| e.path()).collect();
        (procs, netns, files)
    };
    let gone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        proto::testing::eventually_blocking("nothing left", Duration::from_secs(10), || {
            let (procs, netns, files) = left();
            (procs.is_empty() && netns.is_empty() && files.is_empty()).then_some(())
        })
    }));
    if gone.is_err() {
        let (procs, netns, files) = left();
        panic!("{when}: left behind: processes {procs:?}, namespaces {netns:?}, files {files:?}");
    }
}

#[test]
fn the_walk_through_runs_to_the_end_and_leaves_nothing() {
    let rules = host_rules();
    let demo = Demo::start(&["--requests", "100"]);
    let pid = demo.child.id();
    let (code, output, tmp) = demo.finish();
    assert_eq!(code, Some(0), "the demo failed:\n{output}");
    for expected in [
        "[1/6] Starting the mesh",
        "[2/6] Namespace demo joins the mesh",
        "node-2's ztunnel verified the client's certificate:  spiffe://cluster.local/ns/demo/sa/client",
        "node-1's ztunnel verified the server's certificate:  spiffe://cluster.local/ns/demo/sa/server",
        "only TLS crossed between the nodes",
        "[3/6] A pod outside the mesh",
        "the same connection is now refused",
        "[4/6] The tutorial, unedited: an outside client through the ingress gateway xingren-gateway",
        "canary split over 100 requests: hello-latest",
        "20 concurrent requests against a pool of 1 connection + 1 waiting",
        "node-2's ztunnel verified spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway",
        "[5/6] A waypoint for namespace demo",
        "demo/intruder → hello: 403",
        "[6/6] Certificates rotated",
        "none failed",
        "Cleaned up",
    ] {
        assert!(output.contains(expected), "missing {expected:?} in:\n{output}");
    }
    assert_nothing_left(pid, tmp.path(), "after the walk-through");
    assert_eq!(host_rules(), rules, "the host's own rules changed");
}

#[test]
fn ctrl_c_at_any_step_leaves_nothing_behind() {
    let rules = host_rules();
    // Each step's first line, then a moment into the step.
    for step in 1..=6 {
        let mut demo = Demo::start(&["--requests", "100"]);
        let pid = demo.child.id();
        demo.wait_for(&format!("[{step}/6]"));
        // Under test: an interruption in the middle of the step's work.
        std::thread::sleep(Duration::from_millis(300));
        demo.interrupt();
        let (code, output, tmp) = demo.finish();
        assert_eq!(code, Some(130), "interrupted in step {step}, the demo exited with {code:?}:\n{output}");
        assert_nothing_left(pid, tmp.path(), &format!("interrupted in step {step}"));
        assert_eq!(host_rules(), rules, "the host's own rules changed (step {step})");
    }
}

#[test]
fn sigterm_to_the_demo_alone_leaves_nothing_behind() {
    let rules = host_rules();
    for step in [2, 4] {
        let mut demo = Demo::start(&["--requests", "100"]);
        let pid = demo.child.id();
        demo.wait_for(&format!("[{step}/6]"));
        demo.terminate();
        let (code, output, tmp) = demo.finish();
        assert_eq!(code, Some(130), "SIGTERM in step {step}: the demo exited with {code:?}:\n{output}");
        assert_nothing_left(pid, tmp.path(), &format!("SIGTERM in step {step}"));
        assert_eq!(host_rules(), rules, "the host's own rules changed (step {step})");
    }
}

/// The URL a line starts with.
fn url_of(line: &str) -> &str {
    line.split_whitespace().next().unwrap()
}

/// `--keep`: after the walk-through the mesh stays up, reachable the way the demo says (each
/// node's ztunnel admin from its namespace, the logs directory), until Ctrl-C removes it.
#[test]
fn keep_leaves_the_mesh_up_until_ctrl_c() {
    let rules = host_rules();
    let mut demo = Demo::start(&["--requests", "100", "--keep"]);
    let pid = demo.child.id();
    demo.wait_for("The mesh stays up until Ctrl-C");
    demo.wait_for("node-2: ip netns exec");
    demo.wait_for("ambientctl finds this mesh by itself");
    let said = |prefix: &str| -> String {
        let line =
            demo.output.iter().find(|l| l.trim_start().starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?}"));
        line.trim_start()[prefix.len()..].trim().to_owned()
    };
    let logs = std::path::PathBuf::from(said("logs:"));
    assert!(logs.join("ca.log").is_file(), "no CA log in {}", logs.display());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for node in ["node-1", "node-2"] {
        // `<node>: ip netns exec <namespace> curl -s 127.0.0.1:15000/config_dump`
        let command = said(&format!("{node}:"));
        let netns = command.split_whitespace().nth(3).unwrap().to_owned();
        assert!(command.ends_with("curl -s 127.0.0.1:15000/config_dump"), "{command}");
        let ns = ztunnel::netns::NetNs::open(&Path::new("/run/netns").join(&netns)).unwrap();
        let (status, body) =
            runtime.block_on(e2e::mesh::http_get(&ns, "127.0.0.1:15000".parse().unwrap(), "/config_dump")).unwrap();
        assert_eq!(status, 200, "{node}: {body}");
        let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(!dump["pods"].as_array().unwrap().is_empty(), "{node} serves no pod: {dump}");
    }
    // Prometheus, where it says: every component scraped, and the split as it printed it.
    let prometheus = said("Prometheus:");
    let url = url_of(&prometheus);
    assert!(prometheus.contains("(5 targets up: ca ×1, ingress-gateway ×1, waypoint ×1, ztunnel ×2;"), "{prometheus}");
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    let here = ztunnel::netns::NetNs::current().unwrap();
    // Prometheus' HTTP API at the printed address, from this machine's own network.
    let api = |path: &str| -> serde_json::Value {
        let answer = runtime.block_on(e2e::mesh::http_exchange(&here, "GET", addr, path, &[])).unwrap();
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        serde_json::from_str(&answer.data().unwrap()).unwrap()
    };
    let targets = api("/api/v1/targets?state=active");
    let mut scraped: Vec<String> = targets["data"]["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| format!("{} {} {}", t["labels"]["component"], t["labels"]["pod"], t["health"]))
        .collect();
    scraped.sort();
    assert_eq!(
        scraped,
        [
            r#""ca" "ca" "up""#,
            r#""ingress-gateway" "istio-ingressgateway" "up""#,
            r#""waypoint" "waypoint" "up""#,
            r#""ztunnel" "ztunnel-node-1" "up""#,
            r#""ztunnel" "ztunnel-node-2" "up""#,
        ],
        "{targets}"
    );
    assert_eq!(said("the split:"), e2e::tutorial::SPLIT_PROMQL);
    let said_split = said("answers now:");
    let query: String =
        form_urlencoded::Serializer::new(String::new()).append_pair("query", e2e::tutorial::SPLIT_PROMQL).finish();
    let answer = api(&format!("/api/v1/query?{query}"));
    let mut split: Vec<String> = answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!("{} {}", r["metric"]["destination_workload"].as_str().unwrap(), r["value"][1].as_str().unwrap())
        })
        .collect();
    split.sort();
    // What the demo printed, or more: its clients keep calling through the gateway.
    let printed: BTreeMap<&str, f64> =
        said_split.split(", ").filter_map(|p| p.split_once(' ')).map(|(w, n)| (w, n.parse().unwrap())).collect();
    let now: BTreeMap<&str, f64> =
        split.iter().filter_map(|p| p.split_once(' ')).map(|(w, n)| (w, n.parse().unwrap())).collect();
    assert_eq!(printed.keys().collect::<Vec<_>>(), now.keys().collect::<Vec<_>>(), "{answer}");
    assert!(printed.iter().all(|(w, n)| now[w] >= *n), "printed {printed:?}, now {now:?}");
    let served: f64 = split.iter().map(|s| s.split(' ').nth(1).unwrap().parse::<f64>().unwrap()).sum();
    assert!(served >= 100.0, "the loop alone sent 100: {split:?}");

    // The dashboard, where it says: the live graph, the gateway and the waypoint on their paths,
    // drawn by a real browser.
    let dashboard = said("Dashboard:");
    let url = dashboard.split_whitespace().next().unwrap().to_owned();
    assert!(dashboard.contains("the waypoint and the gateway on their paths"), "{dashboard}");
    let graph_at = |addr: std::net::SocketAddr| -> serde_json::Value {
        let answer = runtime.block_on(e2e::mesh::http_exchange(&here, "GET", addr, "/api/graph", &[])).unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        serde_json::from_str(&answer.data().unwrap()).unwrap()
    };
    let graph = graph_at(url.strip_prefix("http://").unwrap().parse().unwrap());
    let edges: Vec<&str> = graph["edges"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    for wanted in [
        "unknown -> workload:istio-system/istio-ingressgateway",
        "workload:istio-system/istio-ingressgateway -> service:hello.default.svc.cluster.local",
        "workload:demo/client -> workload:demo/waypoint",
        "workload:demo/waypoint -> service:hello.demo.svc.cluster.local",
    ] {
        assert!(edges.contains(&wanted), "no {wanted} in {graph:#}");
    }
    // "live: N nodes, M edges now": what the page showed when the demo checked it.
    let counts = dashboard.split("live: ").nth(1).unwrap();
    let counts: Vec<usize> = counts.split(&[' ', ','][..]).take(4).filter_map(|w| w.parse().ok()).collect();
    assert!(counts.len() == 2 && counts[0] >= 6 && counts[1] >= 4, "{dashboard}");
    if e2e::browser::binary().is_some() {
        let dom = runtime.block_on(e2e::browser::dom(&url)).unwrap();
        assert_eq!(e2e::browser::attribute(&dom, "data-state"), Some("live"), "{dom}");
        assert!(
            e2e::browser::attributes(&dom, "data-edge").contains(&"workload:demo/client -> workload:demo/waypoint")
        );
    }
    // `ambientctl dashboard` as printed (on a free port) finds the kept mesh's Prometheus itself.
    let command = said("the same page, served by ambientctl:");
    let command = command.strip_prefix("sudo ").unwrap();
    assert!(command.ends_with(" dashboard"), "{command}");
    let mut served = Command::new("sh")
        .args(["-c", &format!("exec {command} --listen 127.0.0.1:0")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(served.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let prometheus_url = url_of(&prometheus);
    assert!(first.contains(&format!("figures from Prometheus at {prometheus_url}")), "{first}");
    let own: std::net::SocketAddr =
        first.split_whitespace().nth(1).unwrap().strip_prefix("http://").unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while graph_at(own)["edges"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "ambientctl dashboard drew no edge: {}", graph_at(own));
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = served.kill();
    let _ = served.wait();

    // The `ambientctl` commands it prints, run exactly as printed (as root already, `sudo` is
    // dropped when this machine has none): they find the kept mesh without flags.
    demo.wait_for("(the last one enrolls namespace legacy's pod");
    let start = demo.output.iter().position(|l| l.starts_with("ambientctl finds this mesh by itself")).unwrap();
    let commands: Vec<String> =
        demo.output[start..].iter().filter_map(|l| l.trim_start().strip_prefix("sudo ")).map(str::to_owned).collect();
    assert_eq!(commands.len(), 3, "{commands:?}");
    let have_sudo = Command::new("sh").args(["-c", "command -v sudo"]).output().unwrap().status.success();
    let run = |command: &str| {
        let line = if have_sudo { format!("sudo {command}") } else { command.to_owned() };
        let out = Command::new("sh").args(["-c", &line]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{line}: {}{text}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let status = run(&commands[0]);
    assert!(commands[0].ends_with("ambientctl ca status"), "{commands:?}");
    assert!(status.contains("trust domain: cluster.local"), "{status}");
    assert!(status.contains(" UTC (in 364d") || status.contains(" UTC (in 365d"), "expiry as a date: {status}");
    let workloads = run(&commands[1]);
    assert!(commands[1].ends_with("ztunnel workloads --node node-1"), "{commands:?}");
    assert!(workloads.contains("PODS SERVED ON THIS NODE") && workloads.contains("demo/client"), "{workloads}");
    let enabled = run(&commands[2]);
    assert!(enabled.contains("namespace legacy: istio.io/dataplane-mode=ambient"), "{enabled}");
    demo.wait_for("namespace legacy: labels changed; its pods were enrolled");

    // Still up: it is kept, not torn down at the end.
    assert!(demo.child.try_wait().unwrap().is_none(), "the demo exited with --keep");
    demo.interrupt();
    let (code, output, tmp) = demo.finish();
    assert_eq!(code, Some(130), "Ctrl-C with --keep: the demo exited with {code:?}:\n{output}");
    assert!(!output.contains("demo failed"), "{output}");
    assert_nothing_left(pid, tmp.path(), "after --keep and Ctrl-C");
    assert!(!Path::new(ca_ctl::kept::REGISTRY).join(pid.to_string()).exists(), "the registration was left");
    assert_eq!(host_rules(), rules, "the host's own rules changed");
}
