//! What every long-running binary of the mesh (`ca`, `ztunnel`, `waypoint`, `node-agent`) does
//! the same way: its async runtime, its logs (with a filter that can be changed while it runs,
//! through the admin endpoint's `/logging`), and the signals that begin its shutdown.

mod output;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{Method, StatusCode};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (colored on a terminal only).
    #[default]
    Text,
    /// One JSON object per event, its fields at the top level (`timestamp`, `level`, `target`,
    /// `message`, then the event's own: an access-log line's `method`, `response_code`, ...).
    Json,
}

/// A log format that is not `text` or `json`.
#[derive(Debug, thiserror::Error)]
#[error("unknown log format {0:?} (expected text, plain or json)")]
pub struct UnknownLogFormat(String);

impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // `plain` is Istio's name for it (ztunnel's LOG_FORMAT).
            "text" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(UnknownLogFormat(other.to_owned())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl fmt::Debug for LogControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogControl").field("filter", &self.filter()).finish()
    }
}

/// Why the log filter was not changed.
#[derive(Debug, thiserror::Error)]
pub enum LogFilterError {
    /// Not a filter in `RUST_LOG` syntax.
    #[error("invalid log filter {filter:?}")]
    Invalid {
        /// The filter given.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The subscriber is gone.
    #[error("changing the log filter")]
    Reload(#[from] reload::Error),
}

impl LogControl {
    /// The filter in force (`RUST_LOG` syntax).
    pub fn filter(&self) -> String {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the filter, e.g. with `debug` or `info,ztunnel::inbound=debug`.
    pub fn set(&self, filter: &str) -> Result<(), LogFilterError> {
        let parsed = EnvFilter::try_new(filter)
            .map_err(|source| LogFilterError::Invalid { filter: filter.to_owned(), source })?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        self.handle.reload(parsed)?;
        filter.clone_into(&mut current);
        drop(current);
        tracing::info!(filter, "log filter changed");
        Ok(())
    }
}

/// The process's logging, from [`init_logging`]. Keep it until `main` returns: dropping it waits
/// (up to a second) for the lines still queued to be written.
pub struct Logging {
    control: LogControl,
    output: Option<output::Output>,
}

impl Logging {
    /// Changes the filter while the process runs (the admin endpoint's `/logging`).
    pub fn control(&self) -> LogControl {
        self.control.clone()
    }
}

impl fmt::Debug for Logging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logging").field("control", &self.control).field("queued", &self.output.is_some()).finish()
    }
}

impl Drop for Logging {
    fn drop(&mut self) {
        if let Some(output) = &self.output {
            output.flush(FLUSH_AT_EXIT);
        }
    }
}

/// The log output [`init_logging`] installed, for [`log_lines_dropped`].
static INSTALLED: OnceLock<output::Output> = OnceLock::new();

/// Log lines this process dropped because its log output could not keep up (a stalled stderr
/// with more queued than the queue holds), since it started; 0 without [`init_logging`]. Each
/// binary exports it as `<component>_log_lines_dropped_total`
/// ([`crate::metrics::register_log_lines_dropped`]).
pub fn log_lines_dropped() -> u64 {
    INSTALLED.get().map_or(0, output::Output::dropped_total)
}

/// How long the end of `main`, or a panic, waits for queued log lines to be written.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Installs the process's log subscriber: the filter from `RUST_LOG` (`info` when unset or
/// invalid, which is logged), lines in `format` to stderr — written at once while stderr takes
/// them without blocking, else queued for a writer thread, so a stalled stderr never blocks a
/// thread that logs (see `output`). Call it once, first thing; a second call leaves the first
/// subscriber in place. A panic's message follows the lines logged before it.
pub fn init_logging(format: LogFormat) -> Logging {
    let from_env = std::env::var("RUST_LOG").ok();
    let (filter, rejected) = match from_env.as_deref().map(EnvFilter::try_new) {
        None => (EnvFilter::new("info"), None),
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (EnvFilter::new("info"), Some(e)),
    };
    let initial = if rejected.is_none() { from_env.unwrap_or_else(|| "info".to_owned()) } else { "info".to_owned() };
    let (filter, handle) = reload::Layer::new(filter);
    let control = LogControl { handle, current: Arc::new(Mutex::new(initial)) };
    let output = match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => output::Output::new(fd, output::QUEUE_LIMIT),
        Err(e) => {
            // No descriptor of its own for the output: log straight to stderr rather than not at all.
            if install(filter, format, std::io::stderr).is_ok() {
                tracing::warn!(error = %e, "duplicating stderr for the log output; logging directly to stderr");
            }
            return Logging { control, output: None };
        }
    };
    if install(filter, format, output.clone()).is_err() {
        tracing::warn!("a log subscriber was already installed; this one is not used");
        return Logging { control, output: None };
    }
    let _ = INSTALLED.set(output.clone());
    // Only now the subscriber is ours: until the thread runs, lines are written directly.
    if let Err(e) = output.start_writer() {
        tracing::warn!(error = %e, "starting the log writer thread; a stalled stderr will block the threads that log");
    }
    let queued = output.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        queued.flush(FLUSH_AT_EXIT);
        previous(info);
    }));
    if let Some(e) = rejected {
        tracing::warn!(error = %e, "RUST_LOG is not a valid filter; logging at info");
    }
    Logging { control, output: Some(output) }
}

fn install<W>(
    filter: reload::Layer<EnvFilter, Registry>,
    format: LogFormat,
    writer: W,
) -> Result<(), tracing_subscriber::util::TryInitError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let registry = tracing_subscriber::registry().with(filter);
    // Colors only on a terminal: escape codes in a log file cost time and confuse readers.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer)).try_init()
        }
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
    }
}

/// The admin endpoint `/logging`: `GET` answers the filter in force, `POST ?level=<filter>`
/// replaces it. `None` when the binary installed no control (an embedded proxy in a test).
pub fn logging_endpoint(control: Option<&LogControl>, method: &Method, query: Option<&str>) -> (StatusCode, String) {
    let Some(control) = control else {
        return (StatusCode::NOT_IMPLEMENTED, "log level control is not installed\n".to_owned());
    };
    if method == Method::POST {
        let level = query.into_iter().flat_map(|q| q.split('&')).find_map(|pair| pair.strip_prefix("level="));
        let Some(level) =
            level.map(|l| percent_encoding::percent_decode_str(&l.replace('+', " ")).decode_utf8_lossy().into_owned())
        else {
            return (StatusCode::BAD_REQUEST, "missing ?level=<filter>, e.g. level=debug\n".to_owned());
        };
        if let Err(e) = control.set(&level) {
            return (StatusCode::BAD_REQUEST, format!("{}\n", crate::error_chain(&e)));
        }
    } else if method != Method::GET {
        return (StatusCode::METHOD_NOT_ALLOWED, "GET or POST ?level=<filter>\n".to_owned());
    }
    (StatusCode::OK, format!("log filter: {}\n", control.filter()))
}

/// Installs the SIGTERM and SIGINT handlers now (a signal that arrives before the future is
/// awaited is not lost); the future resolves with the name of the first that arrives.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// The async runtime: one thread for `worker_threads` 1 (no handing work between threads), that
/// many for more, one per core for 0.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_filter_changes_at_run_time_and_a_bad_one_changes_nothing() {
        let control = init_logging(LogFormat::Text).control();
        let get = logging_endpoint(Some(&control), &Method::GET, None);
        assert_eq!(get.0, StatusCode::OK);
        let set = logging_endpoint(Some(&control), &Method::POST, Some("x=1&level=info%2Cproto%3A%3Axds%3Ddebug"));
        assert_eq!(set, (StatusCode::OK, "log filter: info,proto::xds=debug\n".to_owned()));
        let bad = logging_endpoint(Some(&control), &Method::POST, Some("level=info,[nope"));
        assert_eq!(bad.0, StatusCode::BAD_REQUEST);
        assert!(bad.1.starts_with("invalid log filter \"info,[nope\": "), "{}", bad.1);
        assert_eq!(control.filter(), "info,proto::xds=debug");
        assert_eq!(logging_endpoint(Some(&control), &Method::POST, None).0, StatusCode::BAD_REQUEST);
        assert_eq!(logging_endpoint(Some(&control), &Method::DELETE, None).0, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(logging_endpoint(None, &Method::GET, None).0, StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn log_formats_parse_and_print() {
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse::<LogFormat>().unwrap(), f);
        }
        assert_eq!("plain".parse::<LogFormat>().unwrap(), LogFormat::Text, "Istio's LOG_FORMAT value");
        assert_eq!(
            "yaml".parse::<LogFormat>().unwrap_err().to_string(),
            "unknown log format \"yaml\" (expected text, plain or json)"
        );
    }
}
