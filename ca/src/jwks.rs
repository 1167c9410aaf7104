//! The keys of RequestAuthentication rules that name a `jwksUri`: fetched by the control plane
//! over HTTPS, cached, refreshed, and filled into the rules before they are served (as istiod
//! does), so waypoints need no route to the identity provider.
//!
//! - A URI is fetched when a rule first names it, then every `refresh`; a failed fetch is retried
//!   with backoff (1 s doubling, at most `refresh`).
//! - A failed refresh keeps the last keys that were fetched; the failure is logged and reported.
//! - Until keys have been fetched once, the rules naming the URI are served with an error, so
//!   waypoints refuse the tokens those rules check (a request without a token is unaffected).
//! - Only HTTPS, verified against the system's roots and any `extra_roots`; the answer must be a
//!   200 with a JWKS document of at most 1 MiB that holds a public key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use proto::api::ambient::waypoint::v1 as pb;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::objects::ConfigError;
use crate::translate::request_authn::jwks_uris;
use crate::validate;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// First retry after a failed fetch; doubles up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// How keys are fetched.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    /// How often keys are fetched again.
    pub refresh: Duration,
    /// Time allowed for one fetch (connect, TLS, answer).
    pub timeout: Duration,
    /// Roots trusted besides the system's (an identity provider with a private CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig { refresh: Duration::from_secs(20 * 60), timeout: Duration::from_secs(5), extra_roots: Vec::new() }
    }
}

#[derive(Debug, Default)]
struct Entry {
    /// The last keys fetched.
    keys: Option<Arc<str>>,
    /// Why the last fetch failed, if it did.
    error: Option<String>,
    /// When to fetch next (`None`: now).
    next: Option<Instant>,
    failures: u32,
}

/// The fetched keys, shared by the fetcher and the translation.
pub struct Jwks {
    config: JwksConfig,
    tls: tokio_rustls::TlsConnector,
    entries: Mutex<HashMap<String, Entry>>,
    /// The URIs the current rules need.
    wanted: watch::Sender<BTreeSet<String>>,
    /// Bumped when what [`Jwks::fill`] would produce changes.
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks").field("config", &self.config).field("wanted", &*self.wanted.borrow()).finish()
    }
}

/// Why the JWKS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// An extra root (`--jwks-ca-file`) is not a usable trust anchor.
    #[error("an extra JWKS root is not usable")]
    ExtraRoot(#[source] rustls::Error),
    /// rustls refused the client configuration.
    #[error("the JWKS client's TLS configuration")]
    Tls(#[source] rustls::Error),
}

impl Jwks {
    /// A fetcher trusting the system's roots and `config.extra_roots`.
    pub fn new(config: JwksConfig) -> Result<Arc<Jwks>, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        for cert in &config.extra_roots {
            roots.add(cert.clone()).map_err(ClientError::ExtraRoot)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(Jwks {
            config,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            entries: Mutex::default(),
            wanted: watch::Sender::new(BTreeSet::new()),
            changed: watch::Sender::new(0),
        }))
    }

    /// Notified when fetched keys (or fetch errors) change what the rules would be.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Fills in the keys of the rules that name a `jwksUri`, or marks them with why there are
    /// none (also returned as config errors); records which URIs are needed.
    pub fn fill(&self, rules: &mut BTreeMap<String, pb::RequestAuthn>) -> Vec<ConfigError> {
        let wanted = jwks_uris(rules);
        self.wanted.send_if_modified(|w| {
            let differs = *w != wanted;
            if differs {
                w.clone_from(&wanted);
            }
            differs
        });
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut errors = Vec::new();
        for (key, ra) in rules.iter_mut() {
            for (i, rule) in ra.jwt_rules.iter_mut().enumerate() {
                if !(rule.jwks.is_empty() && rule.error.is_empty() && !rule.jwks_uri.is_empty()) {
                    continue;
                }
                let entry = entries.get(&rule.jwks_uri);
                match entry.and_then(|e| e.keys.as_ref()) {
                    Some(keys) => rule.jwks = keys.to_string(),
                    None => {
                        rule.error = match entry.and_then(|e| e.error.as_ref()) {
                            Some(e) => format!("keys from {} could not be fetched: {e}", rule.jwks_uri),
                            None => format!("keys from {} are not fetched yet", rule.jwks_uri),
                        };
                        errors.push(ConfigError {
                            source: format!("RequestAuthentication {key}"),
                            message: format!("jwtRules[{i}]: {}", rule.error),
                        });
                    }
                }
            }
        }
        errors
    }

    /// Fetches what is wanted, when it is due, until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut wanted_rx = self.wanted.subscribe();
        tokio::pin!(stop);
        loop {
            let wanted = wanted_rx.borrow_and_update().clone();
            let now = Instant::now();
            let due: Vec<String> = {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries.retain(|uri, _| wanted.contains(uri));
                wanted
                    .iter()
                    .filter(|u| entries.get(*u).and_then(|e| e.next).is_none_or(|next| next <= now))
                    .cloned()
                    .collect()
            };
            let fetched = futures_util::future::join_all(due.iter().map(|uri| self.fetch(uri))).await;
            let mut changed = false;
            {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                for (uri, result) in due.iter().zip(fetched) {
                    let entry = entries.entry(uri.clone()).or_default();
                    let before = (entry.keys.clone(), entry.error.is_some() && entry.keys.is_none());
                    match result {
                        Ok(keys) => {
                            if entry.keys.as_deref() != Some(keys.as_str()) {
                                info!(uri = %uri, "JWKS fetched");
                            }
                            entry.keys = Some(Arc::from(keys));
                            entry.error = None;
                            entry.failures = 0;
                            entry.next = Some(Instant::now() + self.config.refresh);
                        }
                        Err(e) => {
                            let retry =
                                FIRST_RETRY.saturating_mul(1 << entry.failures.min(16)).min(self.config.refresh);
                            let e = proto::error_chain(&e);
                            warn!(uri = %uri, error = %e, retry_in_s = retry.as_secs_f64(),
                                keeping_last_keys = entry.keys.is_some(), "JWKS fetch failed");
                            entry.error = Some(e);
                            entry.failures += 1;
                            entry.next = Some(Instant::now() + retry);
                        }
                    }
                    changed |= before != (entry.keys.clone(), entry.error.is_some() && entry.keys.is_none());
                }
            }
            if changed {
                self.changed.send_modify(|n| *n += 1);
            }
            let next = {
                let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                entries.values().filter_map(|e| e.next).min()
            };
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => return,
                changed = wanted_rx.changed() => if changed.is_err() { return },
                () = sleep => {}
            }
        }
    }

    async fn fetch(&self, uri: &str) -> Result<String, FetchError> {
        tokio::time::timeout(self.config.timeout, self.fetch_once(uri))
            .await
            .map_err(|_| FetchError::Timeout(self.config.timeout))?
    }

    async fn fetch_once(&self, uri: &str) -> Result<String, FetchError> {
        let parsed = validate::jwks_uri(uri)?;
        let host = parsed.host().unwrap_or_default();
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = parsed.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(FetchError::Connect)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|source| FetchError::ServerName { host: host.to_owned(), source })?;
        let tls = self.tls.connect(name, tcp).await.map_err(FetchError::Tls)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(FetchError::Http)?;
        let conn = tokio::spawn(conn);
        let authority = parsed.authority().map(|a| a.as_str()).unwrap_or(host);
        let request = http::Request::get(parsed.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(FetchError::Request)?;
        let response = sender.send_request(request).await.map_err(FetchError::Http)?;
        let status = response.status();
        let body =
            Limited::new(response.into_body(), MAX_JWKS_BYTES).collect().await.map_err(FetchError::Body)?.to_bytes();
        conn.abort();
        if status != http::StatusCode::OK {
            return Err(FetchError::Status(status));
        }
        let text = String::from_utf8(body.to_vec()).map_err(|_| FetchError::NotUtf8)?;
        validate::jwks(&text).map_err(FetchError::Document)?;
        Ok(text)
    }
}

/// Why keys could not be fetched from a `jwksUri`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The URI is not one keys are fetched from.
    #[error(transparent)]
    Uri(#[from] validate::Invalid),
    /// The TCP connection failed.
    #[error("connect")]
    Connect(#[source] std::io::Error),
    /// The host is not a name TLS can verify.
    #[error("server name {host:?}")]
    ServerName {
        /// The host.
        host: String,
        /// Why.
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake failed.
    #[error("TLS")]
    Tls(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP")]
    Http(#[source] hyper::Error),
    /// The request could not be built.
    #[error("request")]
    Request(#[source] http::Error),
    /// The answer's body could not be read (or was too large).
    #[error("reading the answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The server answered something else than 200.
    #[error("answered {0}")]
    Status(http::StatusCode),
    /// The answer is not text.
    #[error("the answer is not UTF-8")]
    NotUtf8,
    /// The answer is not a usable JWKS document.
    #[error(transparent)]
    Document(validate::Invalid),
}
