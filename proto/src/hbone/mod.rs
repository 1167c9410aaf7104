//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams over mutual TLS 1.3.
//!
//! - [`server`]: accepts TLS on 15008, validates each `CONNECT`, hands it to a [`server::Handler`].
//! - [`pool`]: the client side, a pool of multiplexed HTTP/2 connections keyed by source identity,
//!   destination and expected server identities.
//! - [`stream`]: one tunnel stream ([`H2Stream`]), usable as `AsyncRead + AsyncWrite`.
//! - [`copy`]: the bidirectional copy between a TCP stream and a tunnel stream.
//!
//! This module holds what both ends share: the wire-level header formats and HTTP/2 settings.

pub mod copy;
pub mod pool;
pub mod readahead;
pub mod server;
pub mod stream;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use copy::{CopyError, Transferred, copy_bidirectional};
pub use stream::H2Stream;

/// The HBONE port on every captured pod and waypoint.
pub const HBONE_PORT: u16 = 15008;
/// Ports of the mesh's own listeners; a tunnel may never target them (it would loop or reach admin).
pub const MESH_PORTS: &[u16] = &[15000, 15001, 15006, 15008, 15020, 15021];

/// Header carrying the original client address: `forwarded: for="<ip:port>"`.
pub const FORWARDED: &str = "forwarded";
/// W3C baggage header with the source workload's telemetry attributes.
pub const BAGGAGE: &str = "baggage";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// TCP keepalive on tunnel sockets: a peer that vanished (host gone, cable pulled) is detected in
/// about a minute instead of holding its connection and streams forever.
const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// Applies the tunnel socket options: no Nagle delay, TCP keepalive.
pub fn configure_socket(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// Most TLS records a tunnel connection holds encrypted and unsent (rustls' default is 64 KiB):
/// a busy stream's records then leave in one `writev` of up to 256 KiB instead of four, and the
/// kernel gets larger sends to segment. Nothing is held while the socket keeps up.
const TLS_SEND_BUFFER: usize = 256 * 1024;

/// Applies the tunnel's TLS options to a connection just handshaken, either side.
fn configure_tls<Data>(tls: &mut rustls::ConnectionCommon<Data>) {
    tls.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// Longest `:authority` accepted: a 253-byte hostname, `:` and a 5-digit port.
const MAX_AUTHORITY_LEN: usize = 259;

/// HTTP/2 settings for tunnel connections. Windows are large so one stream can fill a fast link:
/// with the default 64 KiB window a single stream is capped at window/RTT.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    /// Initial per-stream receive window.
    pub stream_window: u32,
    /// Initial connection-wide receive window.
    pub connection_window: u32,
    /// Largest DATA frame we accept.
    pub max_frame_size: u32,
    /// Most bytes buffered per stream for sending before back-pressure.
    pub max_send_buffer: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer: 1024 * 1024,
        }
    }
}

/// Where a `CONNECT` asks to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `ip:port`: the destination itself, resolved by the client.
    Addr(SocketAddr),
    /// `hostname:port`: a service by its hostname and *service* port, for the receiving proxy to
    /// resolve (Istio's cross-network path names the service, not an address it cannot reach).
    Service {
        /// The service's hostname, lowercase.
        host: String,
        /// The service port.
        port: u16,
    },
}

impl Target {
    /// The address, for an `ip:port` authority.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            Target::Addr(a) => Some(*a),
            Target::Service { .. } => None,
        }
    }

    /// The port asked for: the destination's, or the service port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Service { port, .. } => *port,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Service { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Self {
        Target::Addr(a)
    }
}

/// Why a `CONNECT` authority is unacceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    /// Longer than any `hostname:port`.
    #[error("authority is {0} bytes long; the longest accepted is {MAX_AUTHORITY_LEN}")]
    TooLong(usize),
    /// Neither `ip:port` / `[ipv6]:port` nor `hostname:port`.
    #[error("authority {0:?} is neither ip:port nor hostname:port")]
    Malformed(String),
    /// Port 0.
    #[error("authority {0:?} has port 0")]
    PortZero(String),
}

/// Parses a `CONNECT` authority: exactly `a.b.c.d:port`, `[v6]:port` or `hostname:port` (a DNS
/// name in lowercase letters, digits, `-` and `.`, whose last label is not all digits, so that
/// no malformed IPv4 address passes as a name), with a nonzero decimal port.
pub fn parse_target(authority: &str) -> Result<Target, AuthorityError> {
    if authority.len() > MAX_AUTHORITY_LEN {
        return Err(AuthorityError::TooLong(authority.len()));
    }
    let malformed = || AuthorityError::Malformed(authority.to_owned());
    let port_zero = || AuthorityError::PortZero(authority.to_owned());
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(port_zero());
        }
        // Neither a scope nor a flow label: the string we authorize is the string we dial.
        if let SocketAddr::V6(v6) = addr
            && (v6.scope_id() != 0 || v6.flowinfo() != 0)
        {
            return Err(malformed());
        }
        return Ok(Target::Addr(addr));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(malformed)?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let port: u16 = port.parse().map_err(|_| malformed())?;
    if !is_dns_name(host) {
        return Err(malformed());
    }
    if port == 0 {
        return Err(port_zero());
    }
    Ok(Target::Service { host: host.to_owned(), port })
}

/// A lowercase DNS name: labels of 1–63 letters, digits and inner `-`, at most 253 bytes, the
/// last label not all digits.
fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253
        && host.split('.').all(label_ok)
        && host.rsplit('.').next().is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// Formats the `forwarded` header value for a client address.
pub fn forwarded_for(addr: SocketAddr) -> String {
    // RFC 7239: a value with ':' (any ip:port) must be a quoted string; IPv6 is bracketed.
    format!("for=\"{addr}\"")
}

/// `forwarded: for="<ip:port>";host=<service hostname>`, as Istio's ztunnel sends it when the
/// client addressed a service (the receiving side reads the service from it for telemetry).
pub fn forwarded_for_service(addr: SocketAddr, service_hostname: Option<&str>) -> String {
    match service_hostname
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b','))
    {
        Some(host) => format!("{};host={host}", forwarded_for(addr)),
        None => forwarded_for(addr),
    }
}

/// The `host=` parameter of a `forwarded` header (first element), quoted or not.
pub fn parse_forwarded_host(value: &str) -> Option<String> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        let v = v.trim().trim_matches('"');
        (k.eq_ignore_ascii_case("host") && !v.is_empty() && v.is_ascii()).then(|| v.to_owned())
    })
}

/// Reads the client address from a `forwarded` header (first element, `for=` parameter).
///
/// Only for telemetry and logging: identity and authorization never come from headers.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        v.parse::<SocketAddr>()
            .map(|s| s.ip())
            .ok()
            .or_else(|| v.parse::<IpAddr>().ok())
            .or_else(|| v.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
    })
}

/// Telemetry attributes of the source workload, sent as W3C `baggage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// Workload kind and name, sent as `k8s.<kind>.name=<name>` (kind e.g. `deployment`, `pod`).
    pub workload: Option<(String, String)>,
    /// `service.name` (the canonical service).
    pub service_name: Option<String>,
    /// `service.version` (the canonical revision).
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

/// Characters a baggage value may carry unescaped: we only emit Kubernetes-style names, and drop
/// members whose values would need escaping rather than emit something a peer misparses.
fn baggage_safe(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl Baggage {
    /// What Istio's ztunnel says about a source workload: its cluster, namespace, controller,
    /// canonical service and revision, and locality.
    pub fn of_workload(w: &crate::state::Workload) -> Baggage {
        let some = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        Baggage {
            cluster: some(&w.cluster_id),
            namespace: some(&w.namespace),
            // Without a controller the pod itself is the workload.
            workload: match some(&w.workload_name) {
                Some(name) => Some((w.workload_type.to_owned(), name)),
                None => some(&w.name).map(|name| ("pod".to_owned(), name)),
            },
            service_name: some(&w.canonical_name),
            service_version: some(&w.canonical_revision),
            region: w.locality.as_ref().and_then(|(r, _)| some(r)),
            zone: w.locality.as_ref().and_then(|(_, z)| some(z)),
        }
    }

    /// Formats the header value.
    pub fn to_header(&self) -> String {
        let safe = |v: &Option<String>| v.clone().filter(|v| baggage_safe(v));
        let workload = self.workload.as_ref().filter(|(kind, name)| {
            baggage_safe(kind) && baggage_safe(name) && kind.bytes().all(|b| b.is_ascii_lowercase())
        });
        // Istio's ztunnel's order.
        let members: Vec<String> = [
            safe(&self.cluster).map(|v| format!("k8s.cluster.name={v}")),
            safe(&self.namespace).map(|v| format!("k8s.namespace.name={v}")),
            workload.map(|(kind, name)| format!("k8s.{kind}.name={name}")),
            safe(&self.service_name).map(|v| format!("service.name={v}")),
            safe(&self.service_version).map(|v| format!("service.version={v}")),
            safe(&self.region).map(|v| format!("cloud.region={v}")),
            safe(&self.zone).map(|v| format!("cloud.availability_zone={v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        members.join(",")
    }

    /// Parses a header value, ignoring members it does not know or cannot read.
    pub fn parse(value: &str) -> Baggage {
        let mut out = Baggage::default();
        for member in value.split(',') {
            // Properties after ';' are allowed by the spec and ignored here.
            let kv = member.split(';').next().unwrap_or_default();
            let Some((k, v)) = kv.split_once('=') else { continue };
            let (k, v) = (k.trim(), v.trim());
            if !baggage_safe(v) {
                continue;
            }
            match k {
                "k8s.cluster.name" => out.cluster = Some(v.to_owned()),
                "k8s.namespace.name" => out.namespace = Some(v.to_owned()),
                "service.name" => out.service_name = Some(v.to_owned()),
                "service.version" => out.service_version = Some(v.to_owned()),
                "cloud.region" => out.region = Some(v.to_owned()),
                "cloud.availability_zone" => out.zone = Some(v.to_owned()),
                _ => {
                    if let Some(kind) = k.strip_prefix("k8s.").and_then(|r| r.strip_suffix(".name"))
                        && !kind.is_empty()
                        && kind.bytes().all(|b| b.is_ascii_lowercase())
                    {
                        out.workload = Some((kind.to_owned(), v.to_owned()));
                    }
                }
            }
        }
        out
    }
}

/// A W3C trace context (`traceparent`, version 00).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zero.
    pub trace_id: u128,
    /// 8-byte parent span id, never zero.
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace with random ids.
    pub fn random(sampled: bool) -> TraceParent {
        let mut bytes = [0u8; 24];
        // aws-lc's RNG; failure here means the system RNG is broken, and a zero id is then
        // replaced below rather than propagated.
        let _ = crate::tls::provider().secure_random.fill(&mut bytes);
        let mut trace = [0u8; 16];
        trace.copy_from_slice(&bytes[..16]);
        let mut span = [0u8; 8];
        span.copy_from_slice(&bytes[16..]);
        TraceParent {
            trace_id: u128::from_be_bytes(trace).max(1),
            span_id: u64::from_be_bytes(span).max(1),
            flags: u8::from(sampled),
        }
    }

    /// The same trace with a new random span id (what a hop forwards).
    pub fn child(&self) -> TraceParent {
        TraceParent { span_id: TraceParent::random(false).span_id, ..*self }
    }

    /// Parses a header value; `None` for anything that is not a valid version-00 traceparent.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        // Version 00 has exactly four fields; "ff" is forbidden.
        if version != "00" || parts.next().is_some() || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
        Some(TraceParent { trace_id, span_id, flags: u8::from_str_radix(flags, 16).ok()? })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_port_and_hostname_authorities() {
        assert_eq!(parse_target("10.0.0.1:8080"), Ok(Target::Addr("10.0.0.1:8080".parse().unwrap())));
        assert_eq!(parse_target("[fd00::1]:80"), Ok(Target::Addr("[fd00::1]:80".parse().unwrap())));
        assert_eq!(
            parse_target("hello.demo.svc.cluster.local:8080"),
            Ok(Target::Service { host: "hello.demo.svc.cluster.local".into(), port: 8080 })
        );
        assert_eq!(parse_target("a-1.b:1"), Ok(Target::Service { host: "a-1.b".into(), port: 1 }));
        for bad in [
            "",
            ":80",
            "10.0.0.1",
            "10.0.0.1:",
            "10.0.0.1:65536",
            "10.0.0.1:-1",
            "example.com",
            "example.com:",
            "example.com:+80",
            "example.com:080080",
            "Example.com:80",
            "-example.com:80",
            "example-.com:80",
            "example..com:80",
            ".example.com:80",
            "example.com.:80",
            "exa_mple.com:80",
            "10.0.0.1:80/path",
            "user@10.0.0.1:80",
            "fd00::1:80",
            "[fd00::1%eth0]:80",
            " 10.0.0.1:80",
            "10.0.0.1:80 ",
            "010.0.0.1:80",
            "10.0.0.256:80",
            "1.2.3:80",
            "10.0.0.1:0x50",
            "\u{0}",
        ] {
            assert!(parse_target(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(parse_target("10.0.0.1:0"), Err(AuthorityError::PortZero("10.0.0.1:0".into())));
        assert_eq!(parse_target("a.b:0"), Err(AuthorityError::PortZero("a.b:0".into())));
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}:65535", "a".repeat(61));
        assert_eq!(longest.len(), MAX_AUTHORITY_LEN);
        assert!(parse_target(&longest).is_ok());
        assert!(parse_target(&format!("{}.b:80", "a".repeat(64))).is_err(), "a 64-byte label");
        let long = "1".repeat(MAX_AUTHORITY_LEN + 1);
        assert_eq!(parse_target(&long), Err(AuthorityError::TooLong(MAX_AUTHORITY_LEN + 1)));
    }

    #[test]
    fn forwarded_round_trips_v4_and_v6() {
        let v4: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let v6: SocketAddr = "[fd00::7]:4567".parse().unwrap();
        assert_eq!(forwarded_for(v4), "for=\"10.1.2.3:4567\"");
        assert_eq!(forwarded_for(v6), "for=\"[fd00::7]:4567\"");
        assert_eq!(parse_forwarded_for(&forwarded_for(v4)), Some(v4.ip()));
        assert_eq!(parse_forwarded_for(&forwarded_for(v6)), Some(v6.ip()));
        assert_eq!(parse_forwarded_for("proto=http;For=10.0.0.9, for=1.1.1.1"), Some("10.0.0.9".parse().unwrap()));
        assert_eq!(parse_forwarded_for("for=\"[fd00::1]\""), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }

    #[test]
    fn baggage_round_trips_and_drops_unsafe_values() {
        let b = Baggage {
            namespace: Some("default".into()),
            workload: Some(("deployment".into(), "sleep".into())),
            service_name: Some("sleep".into()),
            service_version: Some("v1".into()),
            ..Default::default()
        };
        let header = b.to_header();
        assert_eq!(
            header,
            "k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        assert_eq!(Baggage::parse(&header), b);
        // Every member Istio's ztunnel sends, in its order (istio/ztunnel src/baggage.rs).
        let full = Baggage {
            cluster: Some("Kubernetes".into()),
            region: Some("eu-west-1".into()),
            zone: Some("eu-west-1a".into()),
            ..b
        };
        let header = full.to_header();
        assert_eq!(
            header,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,\
             service.version=v1,cloud.region=eu-west-1,cloud.availability_zone=eu-west-1a"
        );
        assert_eq!(Baggage::parse(&header), full);
        let evil = Baggage { namespace: Some("a,b=c".into()), ..Default::default() };
        assert_eq!(evil.to_header(), "");
        assert_eq!(Baggage::parse("garbage,,=,k8s..name=x,service.name=a b"), Baggage::default());
    }

    #[test]
    fn forwarded_names_the_service_the_client_addressed() {
        let client: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let with = forwarded_for_service(client, Some("web.shop.svc.cluster.local"));
        assert_eq!(with, "for=\"10.1.2.3:4567\";host=web.shop.svc.cluster.local");
        assert_eq!(parse_forwarded_host(&with).as_deref(), Some("web.shop.svc.cluster.local"));
        assert_eq!(parse_forwarded_for(&with), Some(client.ip()));
        assert_eq!(forwarded_for_service(client, None), "for=\"10.1.2.3:4567\"");
        assert_eq!(forwarded_for_service(client, Some("a;for=1.1.1.1")), "for=\"10.1.2.3:4567\"", "no injection");
        assert_eq!(parse_forwarded_host("for=1.2.3.4;host=\"x.y\"").as_deref(), Some("x.y"));
        assert_eq!(parse_forwarded_host("for=1.2.3.4"), None);
    }

    #[test]
    fn traceparent_formats_parses_and_rejects_invalid() {
        let t = TraceParent::random(true);
        let s = t.to_string();
        assert_eq!(s.len(), 55);
        assert_eq!(TraceParent::parse(&s), Some(t));
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(TraceParent::parse(ok).unwrap().to_string(), ok);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "accepted {bad:?}");
        }
    }
}
