//! `ambientctl`, the operator's everyday commands, in the spirit of `istioctl`:
//!
//! - [`admin`]: the CA's admin API (status, trust bundle, rotation, issued certificates);
//! - [`config`]: the objects that drive the mesh (namespace labels, waypoints), changed in a
//!   cluster through the API server or in the one-machine mesh's YAML directory;
//! - [`waypoint`]: the objects a namespace's waypoint is made of;
//! - [`inspect`]: what a node's ztunnel holds (workloads, certificates, connections);
//! - [`kept`]: how a one-machine mesh left running is found without flags;
//! - [`dashboard`]: the mesh in a web page (service graph, golden signals), live.

pub mod admin;
pub mod config;
pub mod dashboard;
pub mod fetch;
pub mod gateway;
pub mod inspect;
pub mod kept;
pub mod waypoint;

use std::time::{SystemTime, UNIX_EPOCH};

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables, dates and durations (for people).
    #[default]
    Table,
    /// JSON (for scripts; times are RFC 3339).
    Json,
    /// YAML (the same document as JSON).
    Yaml,
}

impl Output {
    /// Prints `doc` as JSON or YAML; false for [`Output::Table`] (the caller prints its table).
    #[allow(clippy::print_stdout)]
    pub fn document(self, doc: &serde_json::Value) -> anyhow::Result<bool> {
        match self {
            Output::Table => return Ok(false),
            Output::Json => println!("{}", serde_json::to_string_pretty(doc)?),
            Output::Yaml => print!("{}", serde_norway::to_string(doc)?),
        }
        Ok(true)
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A span of seconds, two units at most: `45s`, `12m3s`, `3h12m`, `364d23h`.
fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    if secs >= 86400 {
        format!("{}d{}h", secs / 86400, secs % 86400 / 3600)
    } else if secs >= 3600 {
        format!("{}h{}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// Prints `rows` under `header`, each column as wide as its widest cell.
#[allow(clippy::print_stdout)]
pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    for line in table(header, rows) {
        println!("{line}");
    }
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> Vec<String> {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    std::iter::once(line(*header)).chain(rows.iter().map(|r| line(r.each_ref().map(String::as_str)))).collect()
}

/// How far `unix` is from now: `in 3h12m`, `45s ago`.
pub fn distance(unix: i64) -> String {
    distance_from(unix, now_unix())
}

fn distance_from(unix: i64, now: i64) -> String {
    if unix >= now { format!("in {}", span(unix - now)) } else { format!("{} ago", span(now - unix)) }
}

/// How long ago `unix` was, without a sign: `3m12s` (an age).
pub fn age(unix: i64) -> String {
    span(now_unix() - unix)
}

/// `unix` in UTC as `(date, time)`: `("2027-12-01", "10:29:14")`.
fn utc(unix: i64) -> Option<(String, String)> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    let day = format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day());
    Some((day, format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())))
}

/// `unix` as a UTC date: `2027-12-01 10:29:14 UTC`.
pub fn date(unix: i64) -> String {
    utc(unix).map_or_else(|| format!("{unix} (Unix seconds)"), |(day, time)| format!("{day} {time} UTC"))
}

/// `unix` as a date and its distance from now: `2027-12-01 10:29:14 UTC (in 364d23h)`.
pub fn date_and_distance(unix: i64) -> String {
    format!("{} ({})", date(unix), distance(unix))
}

/// `unix` as an RFC 3339 timestamp, for machine output.
pub fn rfc3339(unix: i64) -> String {
    utc(unix).map_or_else(|| unix.to_string(), |(day, time)| format!("{day}T{time}Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_their_widest_cell() {
        let rows = [["a".to_owned(), "long value".to_owned()], ["longer key".to_owned(), "v".to_owned()]];
        assert_eq!(table(&["KEY", "VALUE"], &rows), ["KEY         VALUE", "a           long value", "longer key  v"]);
    }

    #[test]
    fn times_read_as_dates_and_distances() {
        assert_eq!(date(1_827_632_793), "2027-12-01 03:46:33 UTC");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(distance_from(100 + 31_535_940, 100), "in 364d23h");
        assert_eq!(distance_from(100, 100 + 45), "45s ago");
        assert_eq!(distance_from(100 + 3 * 3600 + 12 * 60 + 5, 100), "in 3h12m");
        assert_eq!(distance_from(100 + 725, 100), "in 12m5s");
        assert_eq!(date(i64::MAX), format!("{} (Unix seconds)", i64::MAX));
    }
}
