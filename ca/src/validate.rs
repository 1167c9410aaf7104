//! What an object must satisfy to be taken at all: the checks run when an object arrives from
//! its source (one that fails is refused and reported, its previous version kept) and that the
//! translation relies on. Shared by [`crate::objects`] and [`crate::translate`], depending on
//! neither.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use proto::duration::parse_millis as parse_duration;

use crate::k8s::{
    ClientTlsSettings, DestinationRuleSpec, GatewayServer, HTTPRouteSpec, IstioGatewaySpec, StringMatch, TrafficPolicy,
    VirtualServiceSpec,
};

/// Why an object cannot be taken as written: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The server protocols an Istio Gateway may declare (Istio's names, compared case-insensitively;
/// [`GatewayPort::protocol`](crate::k8s::GatewayPort::protocol) reads them), for messages.
pub const GATEWAY_PROTOCOLS: [&str; 6] = ["HTTP", "HTTPS", "HTTP2", "GRPC", "TLS", "TCP"];

/// Checks an Istio Gateway's servers: ports, protocols, hosts and TLS settings.
pub fn istio_gateway(spec: &IstioGatewaySpec) -> Result<(), Invalid> {
    if spec.servers.is_empty() {
        return Err(Invalid("spec.servers is empty".to_owned()));
    }
    for (i, server) in spec.servers.iter().enumerate() {
        gateway_server(server).map_err(|Invalid(why)| Invalid(format!("servers[{i}]: {why}")))?;
    }
    Ok(())
}

fn gateway_server(server: &GatewayServer) -> Result<(), Invalid> {
    let port = &server.port;
    if !(1..=65535).contains(&port.number) {
        return Err(Invalid(format!("port.number {} is out of range", port.number)));
    }
    let Some(protocol) = port.protocol() else {
        return Err(Invalid(format!(
            "port.protocol {:?} is not one of {}",
            port.protocol,
            GATEWAY_PROTOCOLS.join(", ")
        )));
    };
    let protocol = protocol.as_str_name();
    if server.hosts.is_empty() {
        return Err(Invalid("hosts is empty".to_owned()));
    }
    for host in &server.hosts {
        gateway_host(host).map_err(|why| Invalid(format!("hosts entry {host:?}: {why}")))?;
    }
    let tls = server.tls.as_ref();
    let mode = tls.and_then(|t| t.mode.as_deref()).map(str::to_ascii_uppercase);
    match (protocol, mode.as_deref()) {
        (_, None) if protocol == "HTTPS" || protocol == "TLS" => {
            Err(Invalid(format!("port.protocol {protocol} needs tls.mode")))
        }
        (_, None) => Ok(()),
        ("HTTPS", Some("PASSTHROUGH")) => {
            Err(Invalid("tls.mode PASSTHROUGH needs port.protocol TLS (HTTPS terminates)".to_owned()))
        }
        ("TLS", Some("PASSTHROUGH")) => Ok(()),
        ("HTTPS" | "TLS", Some(mode @ ("SIMPLE" | "MUTUAL"))) => {
            match tls.and_then(|t| t.credential_name.as_deref()).filter(|n| !n.is_empty()) {
                Some(_) => Ok(()),
                None => Err(Invalid(format!("tls.mode {mode} needs tls.credentialName (a Secret)"))),
            }
        }
        (_, Some(other @ ("SIMPLE" | "MUTUAL" | "PASSTHROUGH"))) => {
            Err(Invalid(format!("tls.mode {other} needs port.protocol HTTPS or TLS, not {protocol}")))
        }
        (_, Some(other)) => {
            Err(Invalid(format!("tls.mode {other} is not supported here (SIMPLE, MUTUAL or PASSTHROUGH)")))
        }
    }
}

/// A DNS label: 1-63 letters, digits and inner `-` (case is not significant in host names).
fn dns_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// `[namespace/]host`: namespace `*`, `.` or a name; host `*`, `*.<domain>` or a DNS name.
fn gateway_host(host: &str) -> Result<(), &'static str> {
    let (namespace, name) = crate::k8s::split_server_host(host);
    if !(namespace == "*" || namespace == "." || dns_label(namespace)) {
        return Err("the namespace part is not *, . or a namespace name");
    }
    let name = name.strip_prefix("*.").unwrap_or(name);
    if name == "*" || name.len() <= 253 && name.split('.').all(dns_label) {
        Ok(())
    } else {
        Err("not *, *.<domain> or a DNS name")
    }
}

/// Checks the fields of an HTTPRoute the translation relies on.
pub fn http_route(spec: &HTTPRouteSpec) -> Result<(), Invalid> {
    for rule in &spec.rules {
        if let Some(t) = &rule.timeouts {
            for d in t.request.iter().chain(&t.backend_request) {
                parse_duration(d).map_err(|e| Invalid(e.to_string()))?;
            }
        }
        if let Some(b) = rule.retry.as_ref().and_then(|r| r.backoff.as_ref()) {
            parse_duration(b).map_err(|e| Invalid(e.to_string()))?;
        }
        for m in &rule.matches {
            match m.path.as_ref().and_then(|p| p.kind.as_deref()) {
                None | Some("PathPrefix" | "Exact" | "RegularExpression") => {}
                Some(other) => {
                    return Err(Invalid(format!(
                        "path match type {other:?} is not Exact, PathPrefix or RegularExpression"
                    )));
                }
            }
            for h in m.headers.iter().chain(&m.query_params) {
                match h.kind.as_deref() {
                    None | Some("Exact" | "RegularExpression") => {}
                    Some(other) => {
                        return Err(Invalid(format!("match type {other:?} is not Exact or RegularExpression")));
                    }
                }
            }
        }
        for f in &rule.filters {
            match f.kind.as_str() {
                "RequestHeaderModifier" | "ResponseHeaderModifier" | "URLRewrite" => {}
                "RequestMirror" => f.request_mirror.as_ref().map_or(Ok(()), mirror)?,
                "RequestRedirect" => f.request_redirect.as_ref().map_or(Ok(()), redirect)?,
                other => return Err(Invalid(format!("filter type {other:?} is not supported"))),
            }
        }
        for b in &rule.backend_refs {
            if !matches!(b.target.kind.as_deref(), None | Some("Service")) {
                return Err(Invalid(format!(
                    "backendRef kind {:?} is not Service",
                    b.target.kind.as_deref().unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// Checks a `requestMirror`'s share: `percent` 0-100, or a `fraction` whose numerator is at most
/// its denominator (100 by default), which is positive.
fn mirror(v: &serde_json::Value) -> Result<(), Invalid> {
    if let Some(p) = v.get("percent")
        && p.as_u64().is_none_or(|p| p > 100)
    {
        return Err(Invalid(format!("requestMirror.percent {p} is not a whole number from 0 to 100")));
    }
    if let Some(f) = v.get("fraction") {
        let numerator = f.get("numerator").and_then(serde_json::Value::as_u64);
        let denominator = f.get("denominator").map_or(Some(100), serde_json::Value::as_u64);
        match (numerator, denominator) {
            (Some(n), Some(d)) if d > 0 && n <= d => {}
            _ => {
                return Err(Invalid(format!(
                    "requestMirror.fraction {f} needs a numerator from 0 to its denominator (positive, 100 by default)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a `requestRedirect`: a redirect status Gateway API defines (301 and 302 standard, 303,
/// 307 and 308 experimental), a port, a scheme the waypoint can send.
fn redirect(v: &serde_json::Value) -> Result<(), Invalid> {
    if let Some(code) = v.get("statusCode")
        && !matches!(code.as_u64(), Some(301 | 302 | 303 | 307 | 308))
    {
        return Err(Invalid(format!("requestRedirect.statusCode {code} is not 301, 302, 303, 307 or 308")));
    }
    if let Some(port) = v.get("port")
        && !matches!(port.as_u64(), Some(1..=65535))
    {
        return Err(Invalid(format!("requestRedirect.port {port} is not a port")));
    }
    if let Some(scheme) = v.get("scheme")
        && !matches!(scheme.as_str(), Some("http" | "https"))
    {
        return Err(Invalid(format!("requestRedirect.scheme {scheme} is not http or https")));
    }
    Ok(())
}

/// Checks a VirtualService's fields the translation relies on.
pub fn virtual_service(spec: &VirtualServiceSpec) -> Result<(), Invalid> {
    if spec.hosts.is_empty() {
        return Err(Invalid("spec.hosts is empty".to_owned()));
    }
    for (i, t) in spec.tls.iter().enumerate() {
        if t.matches.is_empty() {
            return Err(Invalid(format!("tls[{i}]: match is empty (each needs sniHosts)")));
        }
        if let Some(j) = t.matches.iter().position(|m| m.sni_hosts.is_empty()) {
            return Err(Invalid(format!("tls[{i}].match[{j}]: sniHosts is empty")));
        }
        if let Some(p) = t.matches.iter().filter_map(|m| m.port).find(|p| !(1..=65535).contains(p)) {
            return Err(Invalid(format!("tls[{i}]: port {p} is out of range")));
        }
        if t.route.is_empty() {
            return Err(Invalid(format!("tls[{i}]: route is empty")));
        }
        let total: u32 = t.route.iter().filter_map(|r| r.weight).sum();
        if total > 100 {
            return Err(Invalid(format!("tls[{i}]: route weights add up to {total}, more than 100")));
        }
    }
    for (i, h) in spec.http.iter().enumerate() {
        for d in h.timeout.iter().chain(h.retries.as_ref().and_then(|r| r.per_try_timeout.as_ref())) {
            parse_duration(d).map_err(|e| Invalid(format!("http[{i}]: {e}")))?;
        }
        if let Some(d) = h.fault.as_ref().and_then(|f| f.delay.as_ref()).and_then(|d| d.fixed_delay.as_ref()) {
            parse_duration(d).map_err(|e| Invalid(format!("http[{i}].fault.delay: {e}")))?;
        }
        if let Some(f) = &h.fault {
            let percentages = [
                ("delay", f.delay.as_ref().and_then(|d| d.percentage.as_ref())),
                ("abort", f.abort.as_ref().and_then(|a| a.percentage.as_ref())),
            ];
            for (what, p) in percentages {
                if let Some(p) = p.filter(|p| !(p.value.is_finite() && (0.0..=100.0).contains(&p.value))) {
                    return Err(Invalid(format!(
                        "http[{i}].fault.{what}.percentage {} is not between 0 and 100",
                        p.value
                    )));
                }
            }
            if let Some(status) = f.abort.as_ref().and_then(|a| a.http_status).filter(|s| !(200..=599).contains(s)) {
                return Err(Invalid(format!(
                    "http[{i}].fault.abort.httpStatus {status} is not an HTTP status (200-599)"
                )));
            }
        }
        if let Some(p) =
            h.mirror_percentage.as_ref().filter(|p| !(p.value.is_finite() && (0.0..=100.0).contains(&p.value)))
        {
            return Err(Invalid(format!("http[{i}].mirrorPercentage {} is not between 0 and 100", p.value)));
        }
        if let Some(p) = h.mirror_percent.filter(|p| *p > 100) {
            return Err(Invalid(format!("http[{i}].mirrorPercent {p} is more than 100")));
        }
        for m in &h.matches {
            for (what, sm) in m.uri.iter().map(|u| ("uri", u)).chain(m.method.iter().map(|u| ("method", u))) {
                one_of(sm, &format!("http[{i}].match.{what}"))?;
            }
            for (name, sm) in m.headers.iter().chain(&m.query_params) {
                one_of(sm, &format!("http[{i}].match[{name}]"))?;
            }
        }
        let total: u32 = h.route.iter().filter_map(|r| r.weight).sum();
        if total > 100 {
            return Err(Invalid(format!("http[{i}]: route weights add up to {total}, more than 100")));
        }
        if h.route.is_empty() && h.redirect.is_none() {
            return Err(Invalid(format!("http[{i}]: neither route nor redirect")));
        }
        if let Some(code) = h.redirect.as_ref().and_then(|r| r.get("redirectCode"))
            && !code.as_u64().is_some_and(|c| REDIRECT_CODES.contains(&c))
        {
            return Err(Invalid(format!("http[{i}].redirect.redirectCode {code} is not one of {REDIRECT_CODES:?}")));
        }
    }
    Ok(())
}

/// The redirect statuses a proxy can answer with (Envoy's set).
const REDIRECT_CODES: [u64; 5] = [301, 302, 303, 307, 308];

fn one_of(m: &StringMatch, what: &str) -> Result<(), Invalid> {
    let set = [&m.exact, &m.prefix, &m.regex].iter().filter(|v| v.is_some()).count();
    if set != 1 {
        return Err(Invalid(format!("{what}: exactly one of exact, prefix, regex must be set")));
    }
    if let Some(r) = &m.regex {
        regex_syntax::parse(r).map_err(|e| Invalid(format!("{what}: bad regex {r:?}: {e}")))?;
    }
    Ok(())
}

/// Checks a DestinationRule's fields the translation relies on.
pub fn destination_rule(spec: &DestinationRuleSpec) -> Result<(), Invalid> {
    if spec.host.is_empty() {
        return Err(Invalid("spec.host is empty".to_owned()));
    }
    if let Some(p) = &spec.traffic_policy {
        traffic_policy(p).map_err(|Invalid(why)| Invalid(format!("trafficPolicy.{why}")))?;
    }
    for s in &spec.subsets {
        if let Some(p) = &s.traffic_policy {
            traffic_policy(p).map_err(|Invalid(why)| Invalid(format!("subset {:?}: trafficPolicy.{why}", s.name)))?;
        }
    }
    let mut names: Vec<&str> = spec.subsets.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Invalid(format!("subset {:?} is defined twice", w[0])));
    }
    Ok(())
}

fn traffic_policy(p: &TrafficPolicy) -> Result<(), Invalid> {
    match p.load_balancer.as_ref().and_then(|l| l.simple.as_deref()) {
        None | Some("ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN" | "RANDOM" | "UNSPECIFIED" | "PASSTHROUGH") => {}
        Some(other) => return Err(Invalid(format!("loadBalancer.simple {other:?} is not supported"))),
    }
    if let Some(o) = &p.outlier_detection {
        for d in o.interval.iter().chain(&o.base_ejection_time) {
            parse_duration(d).map_err(|e| Invalid(format!("outlierDetection: {e}")))?;
        }
        if let Some(m) = o.max_ejection_percent.filter(|m| *m > 100) {
            return Err(Invalid(format!("outlierDetection.maxEjectionPercent {m} is more than 100")));
        }
    }
    if let Some(t) = &p.tls {
        client_tls(t).map_err(|Invalid(why)| Invalid(format!("tls.{why}")))?;
    }
    for (i, port) in p.port_level_settings.iter().enumerate() {
        let number = port.port.as_ref().and_then(|p| p.number).unwrap_or(0);
        if !(1..=65535).contains(&number) {
            return Err(Invalid(format!("portLevelSettings[{i}].port.number {number} is not a port")));
        }
        if let Some(t) = &port.tls {
            client_tls(t).map_err(|Invalid(why)| Invalid(format!("portLevelSettings[{i}].tls.{why}")))?;
        }
    }
    Ok(())
}

/// The TLS modes a DestinationRule may name (MUTUAL is accepted and refused at the proxy: see
/// [`crate::translate::istio`]).
fn client_tls(t: &ClientTlsSettings) -> Result<(), Invalid> {
    match t.mode.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("DISABLE" | "SIMPLE" | "MUTUAL" | "ISTIO_MUTUAL") => {}
        Some(_) => {
            return Err(Invalid(format!(
                "mode {:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
                t.mode.as_deref().unwrap_or_default()
            )));
        }
    }
    let fields = t.sni.iter().map(|n| ("sni", n)).chain(t.subject_alt_names.iter().map(|n| ("subjectAltNames", n)));
    for (field, name) in fields {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(Invalid(format!("{field}: {name:?} is not a DNS name or IP address")));
        }
    }
    Ok(())
}

/// A JWKS document with at least one key for an asymmetric algorithm. Symmetric (`oct`) keys are
/// never used: anyone who can verify with one can also sign.
pub fn jwks(text: &str) -> Result<(), Invalid> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| Invalid(format!("not a JWKS document: {e}")))?;
    let usable = set.keys.iter().filter(|k| !matches!(k.algorithm, AlgorithmParameters::OctetKey(_))).count();
    if usable == 0 {
        return Err(Invalid(format!("none of its {} keys is a public key (RSA, EC or OKP)", set.keys.len())));
    }
    Ok(())
}

/// `https://host[:port]/path`: keys are only fetched over TLS.
pub fn jwks_uri(uri: &str) -> Result<http::Uri, Invalid> {
    let parsed: http::Uri = uri.parse().map_err(|e| Invalid(format!("{uri:?} is not a URI: {e}")))?;
    if parsed.scheme_str() != Some("https") {
        return Err(Invalid(format!("{uri:?}: keys are fetched over HTTPS only")));
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(Invalid(format!("{uri:?} has no host")));
    }
    Ok(parsed)
}

/// A Secret read as a gateway credential: type `kubernetes.io/tls` with `tls.crt` and `tls.key`
/// (`ca.crt` optional) that parse as PEM certificates and a key. Nothing of its content is put in
/// the reason.
pub fn tls_secret(secret: &crate::k8s::Secret) -> Result<(), Invalid> {
    use crate::k8s;
    use rustls_pki_types::pem::PemObject;
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if kind != k8s::TLS_SECRET_TYPE {
        return Err(Invalid(format!(
            "type {kind:?}: only {:?} Secrets are read (gateway credentials)",
            k8s::TLS_SECRET_TYPE
        )));
    }
    let value = |key: &str| k8s::secret_value(secret, key).ok_or_else(|| Invalid(format!("{key} is missing")));
    let certs = |key: &str, pem: &[u8]| {
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Invalid(format!("{key} is not PEM certificates")))?;
        if certs.is_empty() {
            return Err(Invalid(format!("{key} holds no certificate")));
        }
        Ok(())
    };
    certs("tls.crt", &value("tls.crt")?)?;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(&value("tls.key")?)
        .map_err(|_| Invalid("tls.key is not a PEM private key".to_owned()))?;
    if let Some(ca) = k8s::secret_value(secret, "ca.crt") {
        certs("ca.crt", &ca)?;
    }
    Ok(())
}

/// A host name as a ServiceEntry may give it: DNS labels of letters, digits and `-`, dot-separated
/// (no wildcard: ambient needs one service per name).
fn dns_name(host: &str) -> Result<(), String> {
    if host.starts_with('*') {
        return Err(format!("host {host:?}: wildcard hosts are not supported (name each host)"));
    }
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(ok_label) {
        return Err(format!("host {host:?} is not a DNS name"));
    }
    Ok(())
}

/// A ServiceEntry address: an IP, or a CIDR of exactly one address (`/32`, `/128`).
pub fn service_entry_address(a: &str) -> Result<std::net::IpAddr, String> {
    let (ip, len) = match a.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (a, None),
    };
    let ip: std::net::IpAddr = ip.parse().map_err(|_| format!("address {a:?} is not an IP address"))?;
    let full = if ip.is_ipv4() { "32" } else { "128" };
    match len {
        None => Ok(ip),
        Some(l) if l == full => Ok(ip),
        Some(_) => Err(format!("address {a:?} is a range: only single addresses are supported")),
    }
}

/// Checks a ServiceEntry: hosts, addresses, ports, resolution and location, endpoints.
pub fn service_entry(spec: &crate::k8s::ServiceEntrySpec) -> Result<(), Invalid> {
    use crate::k8s::Resolution;
    if spec.hosts.is_empty() {
        return Err(Invalid("spec.hosts is empty".to_owned()));
    }
    for host in &spec.hosts {
        dns_name(host).map_err(Invalid)?;
    }
    for a in &spec.addresses {
        service_entry_address(a).map_err(Invalid)?;
    }
    if spec.ports.is_empty() {
        return Err(Invalid("spec.ports is empty".to_owned()));
    }
    for (i, p) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.number) {
            return Err(Invalid(format!("ports[{i}].number {} is out of range", p.number)));
        }
        if let Some(t) = p.target_port.filter(|t| !(1..=65535).contains(t)) {
            return Err(Invalid(format!("ports[{i}].targetPort {t} is out of range")));
        }
    }
    let resolution = spec.resolution().map_err(Invalid)?;
    spec.location().map_err(Invalid)?;
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        return Err(Invalid("workloadSelector and endpoints are exclusive".to_owned()));
    }
    for (i, e) in spec.endpoints.iter().enumerate() {
        let is_ip = e.address.parse::<std::net::IpAddr>().is_ok();
        match resolution {
            Resolution::Static if !is_ip => {
                return Err(Invalid(format!(
                    "endpoints[{i}].address {:?}: resolution STATIC needs IP addresses",
                    e.address
                )));
            }
            Resolution::Dns if !is_ip => {
                dns_name(&e.address).map_err(|why| Invalid(format!("endpoints[{i}]: {why}")))?;
            }
            Resolution::None => {
                return Err(Invalid(format!("endpoints[{i}]: resolution NONE takes no endpoints")));
            }
            _ => {}
        }
        if let Some((name, port)) = e.ports.iter().find(|(_, p)| !(1..=65535).contains(*p)) {
            return Err(Invalid(format!("endpoints[{i}].ports[{name}] {port} is out of range")));
        }
    }
    if resolution == Resolution::Static && spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        return Err(Invalid("resolution STATIC needs endpoints or a workloadSelector".to_owned()));
    }
    Ok(())
}

/// The mesh settings in the `istio` ConfigMap's `mesh` key (Istio's MeshConfig as YAML; fields
/// this mesh does not use are ignored). Another ConfigMap, or one without the key: the defaults.
pub fn mesh_settings(cm: &crate::k8s::ConfigMap) -> Result<crate::mesh::MeshSettings, Invalid> {
    use crate::mesh::{MeshSettings, OutboundTrafficPolicy};
    let (name, key) = crate::k8s::MESH_CONFIG_MAP;
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(key)).filter(|_| cm.metadata.name.as_deref() == Some(name))
    else {
        return Ok(MeshSettings::default());
    };
    let mesh: serde_json::Value =
        serde_norway::from_str(text).map_err(|e| Invalid(format!("data.{key} is not YAML: {e}")))?;
    let mode = match mesh.get("outboundTrafficPolicy").and_then(|p| p.get("mode")) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(m)) => Some(m.as_str()),
        Some(other) => return Err(Invalid(format!("data.{key}: outboundTrafficPolicy.mode {other} is not a string"))),
    };
    let outbound_traffic_policy = match mode {
        None | Some("ALLOW_ANY") => OutboundTrafficPolicy::AllowAny,
        Some("REGISTRY_ONLY") => OutboundTrafficPolicy::RegistryOnly,
        Some(m) => {
            return Err(Invalid(format!(
                "data.{key}: outboundTrafficPolicy.mode {m:?} is not ALLOW_ANY or REGISTRY_ONLY"
            )));
        }
    };
    Ok(MeshSettings { outbound_traffic_policy })
}

/// Checks a Telemetry: a sampling percentage from 0 to 100, targets with names.
pub fn telemetry(spec: &crate::k8s::TelemetrySpec) -> Result<(), Invalid> {
    for (i, t) in spec.tracing.iter().enumerate() {
        if let Some(p) = t.random_sampling_percentage.filter(|p| !(0.0..=100.0).contains(p)) {
            return Err(Invalid(format!("tracing[{i}].randomSamplingPercentage {p} is not between 0 and 100")));
        }
    }
    for (i, r) in spec.target_ref.iter().chain(&spec.target_refs).enumerate() {
        if r.name.is_empty() {
            return Err(Invalid(format!("targetRefs[{i}] has no name")));
        }
    }
    Ok(())
}

/// Checks a ConfigMap the mesh reads (the `istio` one: its mesh settings and extension providers
/// must parse).
pub fn mesh_config_map(cm: &crate::k8s::ConfigMap) -> Result<(), Invalid> {
    mesh_settings(cm)?;
    extension_providers(cm).map(|_| ())
}

/// An entry of the mesh config's `extensionProviders`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtensionProvider {
    /// `opentelemetry`: an OTLP/gRPC collector.
    OpenTelemetry {
        /// Its host name or address.
        service: String,
        /// Its port.
        port: u16,
    },
    /// Any other kind (`zipkin`, `envoyFileAccessLog`, ...), by its key: named, not used.
    Other(String),
}

/// The mesh config's `extensionProviders` by name (none when the ConfigMap is not the mesh's).
pub fn extension_providers(
    cm: &crate::k8s::ConfigMap,
) -> Result<std::collections::BTreeMap<String, ExtensionProvider>, Invalid> {
    let (name, key) = crate::k8s::MESH_CONFIG_MAP;
    let mut out = std::collections::BTreeMap::new();
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(key)).filter(|_| cm.metadata.name.as_deref() == Some(name))
    else {
        return Ok(out);
    };
    let mesh: serde_json::Value =
        serde_norway::from_str(text).map_err(|e| Invalid(format!("data.{key} is not YAML: {e}")))?;
    let list = match mesh.get("extensionProviders") {
        None | Some(serde_json::Value::Null) => return Ok(out),
        Some(serde_json::Value::Array(list)) => list,
        Some(_) => return Err(Invalid(format!("data.{key}: extensionProviders is not a list"))),
    };
    for (i, p) in list.iter().enumerate() {
        let at = |what: &str| Invalid(format!("data.{key}: extensionProviders[{i}]: {what}"));
        let provider_name =
            p.get("name").and_then(|n| n.as_str()).filter(|n| !n.is_empty()).ok_or_else(|| at("no name"))?;
        let kinds: Vec<&String> =
            p.as_object().map(|o| o.keys().filter(|k| *k != "name").collect()).unwrap_or_default();
        let [kind] = kinds.as_slice() else {
            return Err(at("needs exactly one provider kind besides its name"));
        };
        let provider = if kind.as_str() == "opentelemetry" {
            let otel = &p["opentelemetry"];
            let service = otel.get("service").and_then(|s| s.as_str()).filter(|s| !s.is_empty());
            let service = service.ok_or_else(|| at("opentelemetry.service is missing"))?;
            let port = otel.get("port").and_then(serde_json::Value::as_u64).and_then(|p| u16::try_from(p).ok());
            let port = port.filter(|p| *p != 0).ok_or_else(|| at("opentelemetry.port is not a port number"))?;
            ExtensionProvider::OpenTelemetry { service: service.to_owned(), port }
        } else {
            ExtensionProvider::Other((*kind).clone())
        };
        if out.insert(provider_name.to_owned(), provider).is_some() {
            return Err(at(&format!("a second provider named {provider_name:?}")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn extension_providers_are_read_and_bad_ones_refuse_the_mesh_config() {
        let cm = |providers: &str| crate::k8s::ConfigMap {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("istio".into()),
                ..Default::default()
            },
            data: Some([("mesh".to_owned(), format!("extensionProviders:\n{providers}"))].into()),
            ..Default::default()
        };
        let read = |providers: &str| extension_providers(&cm(providers)).map_err(|Invalid(w)| w);
        let ok = read("- {name: otel, opentelemetry: {service: collector.obs, port: 4317}}\n- {name: log, envoyFileAccessLog: {path: /dev/stdout}}").unwrap();
        assert_eq!(
            ok.into_iter().collect::<Vec<_>>(),
            [
                ("log".to_owned(), ExtensionProvider::Other("envoyFileAccessLog".into())),
                ("otel".to_owned(), ExtensionProvider::OpenTelemetry { service: "collector.obs".into(), port: 4317 }),
            ]
        );
        assert_eq!(
            read("- {opentelemetry: {service: a, port: 1}}"),
            Err("data.mesh: extensionProviders[0]: no name".into())
        );
        assert_eq!(
            read("- {name: o, opentelemetry: {service: a, port: 70000}}"),
            Err("data.mesh: extensionProviders[0]: opentelemetry.port is not a port number".into())
        );
        assert_eq!(
            read("- {name: o, opentelemetry: {port: 4317}}"),
            Err("data.mesh: extensionProviders[0]: opentelemetry.service is missing".into())
        );
        assert_eq!(
            read("- {name: o, opentelemetry: {service: a, port: 1}, zipkin: {service: b, port: 2}}"),
            Err("data.mesh: extensionProviders[0]: needs exactly one provider kind besides its name".into())
        );
        assert_eq!(
            read("- {name: o, zipkin: {service: b, port: 2}}\n- {name: o, zipkin: {service: c, port: 2}}"),
            Err("data.mesh: extensionProviders[1]: a second provider named \"o\"".into())
        );
        assert!(mesh_config_map(&cm("- {name: o, opentelemetry: {service: a}}")).is_err());
    }

    #[test]
    fn a_mirror_share_out_of_range_is_refused() {
        let vs = |share: &str| {
            let yaml = format!(
                "hosts: [hello]\nhttp:\n  - route: [{{destination: {{host: hello}}}}]\n    mirror: {{host: shadow}}\n{share}"
            );
            virtual_service(&serde_norway::from_str::<VirtualServiceSpec>(&yaml).unwrap()).map_err(|Invalid(w)| w)
        };
        assert_eq!(vs("    mirrorPercentage: {value: 12.5}"), Ok(()));
        assert_eq!(
            vs("    mirrorPercentage: {value: 101}"),
            Err("http[0].mirrorPercentage 101 is not between 0 and 100".into())
        );
        assert_eq!(vs("    mirrorPercent: 150"), Err("http[0].mirrorPercent 150 is more than 100".into()));
        let route = |mirror: &str| {
            let yaml = format!(
                "rules:\n- filters:\n  - type: RequestMirror\n    requestMirror: {{backendRef: {{name: shadow, port: 80}}, {mirror}}}"
            );
            http_route(&serde_norway::from_str::<HTTPRouteSpec>(&yaml).unwrap()).map_err(|Invalid(w)| w)
        };
        assert_eq!(route("percent: 50"), Ok(()));
        assert_eq!(route("fraction: {numerator: 1, denominator: 3}"), Ok(()));
        assert_eq!(route("percent: 120"), Err("requestMirror.percent 120 is not a whole number from 0 to 100".into()));
        assert!(
            route("fraction: {numerator: 4, denominator: 3}")
                .unwrap_err()
                .contains("numerator from 0 to its denominator")
        );
        assert!(route("fraction: {numerator: 0, denominator: 0}").is_err());
    }

    #[test]
    fn an_istio_gateway_server_says_what_is_wrong_with_it() {
        let check = |server: &str| {
            let yaml = format!("selector: {{istio: ingressgateway}}\nservers:\n- {server}");
            istio_gateway(&serde_norway::from_str::<IstioGatewaySpec>(&yaml).unwrap()).map_err(|Invalid(why)| why)
        };
        let http = "port: {number: 80, name: http, protocol: HTTP}";
        assert_eq!(check(&format!("{{{http}, hosts: [xingren.upup]}}")), Ok(()));
        assert_eq!(check(&format!("{{{http}, hosts: ['*', '*.upup', 'ns/a.b', './c']}}")), Ok(()));
        assert_eq!(check(&format!("{{{http}, hosts: []}}")), Err("servers[0]: hosts is empty".to_owned()));
        assert_eq!(
            check(&format!("{{{http}, hosts: ['a..b']}}")),
            Err("servers[0]: hosts entry \"a..b\": not *, *.<domain> or a DNS name".to_owned())
        );
        assert_eq!(
            check("{port: {number: 70000, protocol: HTTP}, hosts: [a]}"),
            Err("servers[0]: port.number 70000 is out of range".to_owned())
        );
        assert_eq!(
            check("{port: {number: 80, protocol: QUIC}, hosts: [a]}"),
            Err("servers[0]: port.protocol \"QUIC\" is not one of HTTP, HTTPS, HTTP2, GRPC, TLS, TCP".to_owned())
        );
        let https = "port: {number: 443, name: https, protocol: HTTPS}, hosts: [a.b]";
        assert_eq!(check(&format!("{{{https}}}")), Err("servers[0]: port.protocol HTTPS needs tls.mode".to_owned()));
        assert_eq!(
            check(&format!("{{{https}, tls: {{mode: SIMPLE}}}}")),
            Err("servers[0]: tls.mode SIMPLE needs tls.credentialName (a Secret)".to_owned())
        );
        assert_eq!(check(&format!("{{{https}, tls: {{mode: SIMPLE, credentialName: cert}}}}")), Ok(()));
        assert_eq!(
            check(&format!("{{{https}, tls: {{mode: ISTIO_MUTUAL}}}}")),
            Err("servers[0]: tls.mode ISTIO_MUTUAL is not supported here (SIMPLE, MUTUAL or PASSTHROUGH)".to_owned())
        );
        assert_eq!(check("{port: {number: 443, protocol: TLS}, hosts: [a.b], tls: {mode: PASSTHROUGH}}"), Ok(()));
        assert_eq!(check(&format!("{{{http}, hosts: [a.b], tls: {{httpsRedirect: true}}}}")), Ok(()));
        assert_eq!(istio_gateway(&IstioGatewaySpec::default()), Err(Invalid("spec.servers is empty".to_owned())));
    }

    #[test]
    fn values_that_could_crash_a_proxy_are_refused() {
        let vs = |fault: &str| {
            let yaml =
                format!("hosts: [hello]\nhttp:\n  - route:\n      - destination: {{host: hello}}\n    fault:\n{fault}");
            virtual_service(&serde_norway::from_str::<VirtualServiceSpec>(&yaml).unwrap())
        };
        let delay = |p: &str| vs(&format!("      delay: {{fixedDelay: 1s, percentage: {{value: {p}}}}}\n"));
        assert_eq!(delay("10"), Ok(()));
        for bad in [".nan", ".inf", "-.inf", "-1", "100.5", "1e300"] {
            let err = delay(bad).unwrap_err().0;
            assert!(err.contains("fault.delay.percentage") && err.contains("is not between 0 and 100"), "{bad}: {err}");
        }
        let abort = |status: &str| vs(&format!("      abort: {{httpStatus: {status}, percentage: {{value: 5}}}}\n"));
        assert_eq!(abort("503"), Ok(()));
        for bad in ["0", "99", "600", "4294967295"] {
            assert!(abort(bad).unwrap_err().0.contains("is not an HTTP status"), "{bad}");
        }
        let long = vs("      delay: {fixedDelay: 99999h, percentage: {value: 1}}\n").unwrap_err().0;
        assert!(long.contains("longer than a year"), "{long}");
        let dr = |yaml: &str| destination_rule(&serde_norway::from_str::<DestinationRuleSpec>(yaml).unwrap());
        let ejection = "host: hello\ntrafficPolicy:\n  outlierDetection: {maxEjectionPercent: 150}\n";
        assert!(dr(ejection).unwrap_err().0.contains("maxEjectionPercent 150 is more than 100"));
    }

    #[test]
    fn redirects_gateway_api_does_not_define_are_refused() {
        let route = |redirect: &str| {
            let yaml =
                format!("rules:\n  - filters:\n      - type: RequestRedirect\n        requestRedirect: {redirect}\n");
            http_route(&serde_norway::from_str::<HTTPRouteSpec>(&yaml).unwrap())
        };
        for ok in ["{}", "{statusCode: 301}", "{statusCode: 302, port: 8443, scheme: https}", "{statusCode: 308}"] {
            assert_eq!(route(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("{statusCode: 200}", "statusCode 200 is not 301, 302, 303, 307 or 308"),
            ("{statusCode: 999}", "statusCode 999"),
            ("{statusCode: \"301\"}", "statusCode \"301\""),
            ("{statusCode: -301}", "statusCode -301"),
            ("{port: 0}", "port 0 is not a port"),
            ("{port: 70000}", "port 70000"),
            ("{scheme: ftp}", "scheme \"ftp\" is not http or https"),
        ] {
            let err = route(bad).unwrap_err().0;
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn redirect_codes_are_envoys() {
        let vs = |code: &str| {
            let yaml = format!("hosts: [hello]\nhttp:\n  - redirect: {{uri: /x, redirectCode: {code}}}\n");
            virtual_service(&serde_norway::from_str::<VirtualServiceSpec>(&yaml).unwrap())
        };
        for good in ["301", "302", "303", "307", "308"] {
            assert_eq!(vs(good), Ok(()), "{good}");
        }
        for bad in ["200", "300", "304", "399", "\"308\"", "-1"] {
            assert!(vs(bad).unwrap_err().0.contains("redirectCode"), "{bad}");
        }
    }

    #[test]
    fn a_gateway_secret_must_be_tls_with_pem_certificates_and_key() {
        use k8s_openapi::ByteString;
        let cert = rcgen::generate_simple_self_signed(vec!["shop.example".to_owned()]).unwrap();
        let secret = |kind: &str, crt: &str, key: &str| crate::k8s::Secret {
            type_: Some(kind.to_owned()),
            data: Some(
                [("tls.crt".to_owned(), ByteString(crt.into())), ("tls.key".to_owned(), ByteString(key.into()))]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        };
        let (crt, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        assert_eq!(tls_secret(&secret("kubernetes.io/tls", &crt, &key)), Ok(()));
        let refused = |s: &crate::k8s::Secret| tls_secret(s).unwrap_err().0;
        assert!(refused(&secret("Opaque", &crt, &key)).contains("only \"kubernetes.io/tls\" Secrets"));
        assert_eq!(refused(&secret("kubernetes.io/tls", "garbage", &key)), "tls.crt holds no certificate");
        assert_eq!(refused(&secret("kubernetes.io/tls", &crt, "garbage")), "tls.key is not a PEM private key");
        // The reason never quotes the Secret's content.
        assert!(!refused(&secret("kubernetes.io/tls", &crt, "secret-value")).contains("secret-value"));
    }
}
