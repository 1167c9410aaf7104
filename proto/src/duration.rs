//! Durations as Kubernetes and Gateway API objects (and our command lines) write them.

/// The longest duration accepted: a year. Anything longer is a mistake, and proxies add durations
/// to clocks.
pub const MAX_MILLIS: u64 = 365 * 24 * 3_600_000;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not written as one.
    #[error("{0:?} is not a duration like 10s, 500ms or 1m30s")]
    Syntax(String),
    /// Longer than [`MAX_MILLIS`].
    #[error("{0:?} is longer than a year")]
    TooLong(String),
}

/// Parses a Gateway API duration (`1h`, `30s`, `500ms`, `1m30s`) into milliseconds, at most
/// [`MAX_MILLIS`].
pub fn parse_millis(s: &str) -> Result<u64, DurationError> {
    let bad = || DurationError::Syntax(s.to_owned());
    let mut total: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        total = total.saturating_add(n * unit_ms);
        if total > MAX_MILLIS {
            return Err(DurationError::TooLong(s.to_owned()));
        }
        rest = &rest[len..];
    }
    Ok(total)
}

/// [`parse_millis`] as a [`std::time::Duration`] (for command-line flags).
pub fn parse(s: &str) -> Result<std::time::Duration, DurationError> {
    parse_millis(s).map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_api_durations() {
        assert_eq!(parse_millis("10s"), Ok(10_000));
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("1h2m3s4ms"), Ok(3_723_004));
        assert_eq!(parse("1m30s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse_millis("8760h"), Ok(MAX_MILLIS));
        for bad in ["", "10", "s", "1.5s", "-1s", "10x", "123456s", "10 s", "1d", "8761h", "99999h99999h"] {
            assert!(parse_millis(bad).is_err(), "accepted {bad:?}");
        }
    }
}
