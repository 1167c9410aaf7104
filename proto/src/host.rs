//! Host patterns as Istio writes them in Gateways, VirtualServices and ServiceEntries.

/// Whether the pattern (a name, `*.<domain>` or `*`) admits `host` (a name without port, both
/// lower case): `*.example.com` admits `a.example.com` and `a.b.example.com`, not `example.com`.
pub fn admits(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_admit_what_istio_admits() {
        assert!(admits("*", "anything.example"));
        assert!(admits("xingren.upup", "xingren.upup"));
        assert!(!admits("xingren.upup", "a.xingren.upup"));
        assert!(admits("*.upup", "xingren.upup"));
        assert!(admits("*.upup", "a.b.upup"));
        assert!(!admits("*.upup", "upup"));
        assert!(!admits("*.upup", "xupup"));
        assert!(!admits("*upup", "xupup"), "a wildcard is a whole label");
    }
}
