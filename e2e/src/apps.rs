//! Test applications that run inside pods.
//!
//! The HTTP server ([`http_server`]) answers every request with its name and what it received
//! (see there), and fails or stalls on request, for the waypoint's tests.
//!
//! The echo server first tells each client its own name and the address it sees the connection
//! coming from (`<name> peer <ip>:<port>\n`), then echoes everything back until the client closes.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The tutorial's Gateway `xingren-gateway`, VirtualService `hello-virtualservice` and
/// DestinationRule `hello-destinationrule`, exactly as the tutorial writes them (namespace
/// `default`; the same file the CA's golden test reads).
pub const TUTORIAL_VERBATIM: &str = include_str!("../../ca/tests/fixtures/tutorial/input/tutorial.yaml");

/// The VirtualService + DestinationRule users copy from tutorials (the waypoint issue's example),
/// in namespace `demo`: header `version: new` → subset `new` (10 % delayed 10 s, 5 s timeout),
/// the rest 70/30 over `latest`/`new`; a connection pool of one connection, one waiting request,
/// one request per connection.
pub const TUTORIAL: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: hello, namespace: demo}
spec:
  hosts: [hello]
  http:
  - match: [{headers: {version: {exact: new}}}]
    route: [{destination: {host: hello, subset: new}}]
    fault: {delay: {percentage: {value: 10}, fixedDelay: 10s}}
    timeout: 5s
  - route:
    - {destination: {host: hello, subset: latest}, weight: 70}
    - {destination: {host: hello, subset: new}, weight: 30}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: demo}
spec:
  host: hello
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
  subsets:
  - {name: latest, labels: {version: latest}}
  - {name: new, labels: {version: new}}
";

/// Serves the echo protocol as `name` on `listener` until the task is aborted.
pub fn echo_server(listener: TcpListener, name: &str) -> tokio::task::JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else { return };
            let greeting = format!("{name} peer {peer}\n");
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                if stream.write_all(greeting.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// The client side of the echo protocol.
#[derive(Debug)]
pub struct EchoClient {
    stream: BufReader<TcpStream>,
    /// The client address the server saw.
    pub seen_as: SocketAddr,
    /// The server's name.
    pub server: String,
}

impl EchoClient {
    /// Reads the server's greeting from a fresh connection.
    pub async fn greet(stream: TcpStream) -> Result<EchoClient> {
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_line(&mut line))
            .await
            .context("no greeting from the echo server within 10 s")??;
        if n == 0 {
            bail!("the connection was closed before the echo server's greeting");
        }
        let (server, seen_as) = line
            .trim()
            .split_once(" peer ")
            .and_then(|(name, a)| Some((name.to_owned(), a.parse().ok()?)))
            .with_context(|| format!("unexpected greeting {line:?}"))?;
        Ok(EchoClient { stream, seen_as, server })
    }

    /// Sends `data` and reads it back.
    pub async fn round_trip(&mut self, data: &[u8]) -> Result<()> {
        self.stream.get_mut().write_all(data).await?;
        let mut back = vec![0u8; data.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), self.stream.read_exact(&mut back))
            .await
            .context("echo timed out")??;
        if back != data {
            bail!("echo returned different bytes");
        }
        Ok(())
    }

    /// Whether the server closed the connection (reads EOF or an error within `wait`).
    pub async fn closed_within(&mut self, wait: std::time::Duration) -> bool {
        let mut one = [0u8; 1];
        matches!(tokio::time::timeout(wait, self.stream.read(&mut one)).await, Ok(Ok(0) | Err(_)))
    }
}

/// Serves HTTP/1.1 and HTTP/2 (cleartext) as `name` until the task is aborted. Every answer
/// carries `x-served-by: <name>`, `x-seen-method`, `x-seen-path` and `x-seen-traceparent` (the
/// request as it arrived) and the body `<name>\n`. Paths: `/status/<code>` answers that status; `/flaky` fails every
/// other request with 503 (per server); `/delay/<ms>` answers after that long; `/bytes/<n>`
/// answers `n` bytes (at most 1 MiB) instead of the name; `/slow-body/<ms>` answers headers at
/// once and the body `late body` after that long. The request body is read whole and its size
/// returned in `x-seen-body-bytes`; the `Upgrade`, `X-Forwarded-For` and
/// `X-Forwarded-Client-Cert` headers it got in `x-seen-upgrade`, `x-seen-xff` and `x-seen-xfcc`
/// (`-` when absent), the TCP peer's address in `x-seen-peer`, `Authorization` in `x-seen-authorization` (`-`), and each `x-jwt-*` and
/// `x-test-*` header as `x-seen-x-jwt-*`, `x-seen-x-test-*`. A request with `Upgrade: echo` is
/// answered 101 and the connection then echoes bytes. `/requests` answers `<n> <bytes>`: how many
/// other requests the server has had so far, and their body bytes in all.
pub fn http_server(listener: TcpListener, name: &str) -> tokio::task::JoinHandle<()> {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    use hyper::{Request, Response};

    type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
    let full = |b: Bytes| -> Body { Full::new(b).boxed() };

    let name: Arc<str> = Arc::from(name);
    let flaky = Arc::new(AtomicU64::new(0));
    let served = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else { return };
            let (name, flaky, served) = (name.clone(), flaky.clone(), served.clone());
            let peer = peer.ip().to_string();
            let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                let (name, flaky, served, peer) = (name.clone(), flaky.clone(), served.clone(), peer.clone());
                async move {
                    if req.uri().path() == "/requests" {
                        let (n, bytes) = (served.0.load(Ordering::SeqCst), served.1.load(Ordering::SeqCst));
                        return Ok(Response::new(full(Bytes::from(format!("{n} {bytes}\n")))));
                    }
                    // `Upgrade: echo`: switch protocols, then echo bytes until the client closes.
                    if req.headers().get(hyper::header::UPGRADE).is_some_and(|v| v == "echo") {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = on.await {
                                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = Response::new(full(Bytes::new()));
                        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("upgrade"));
                        resp.headers_mut()
                            .insert(hyper::header::UPGRADE, hyper::header::HeaderValue::from_static("echo"));
                        return Ok::<_, Infallible>(resp);
                    }
                    let path = req.uri().path().to_owned();
                    let mut status = 200;
                    if let Some(code) = path.strip_prefix("/status/") {
                        status = code.parse().unwrap_or(400);
                    } else if path == "/flaky" && flaky.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                        status = 503;
                    } else if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
                        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    }
                    let body = match path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) => full(Bytes::from(vec![b'x'; n.min(1 << 20)])),
                        None => match path.strip_prefix("/slow-body/").and_then(|m| m.parse().ok()) {
                            Some(ms) => Late::new(std::time::Duration::from_millis(ms)).boxed(),
                            None => full(Bytes::from(format!("{name}\n"))),
                        },
                    };
                    let (head, request_body) = req.into_parts();
                    let req = Request::from_parts(head, ());
                    let received = request_body.collect().await.map_or(0, |b| b.to_bytes().len());
                    served.1.fetch_add(received as u64, Ordering::SeqCst);
                    served.0.fetch_add(1, Ordering::SeqCst);
                    let received = received.to_string();
                    let mut resp = Response::new(body);
                    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
                    let headers = resp.headers_mut();
                    let trace = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    let seen = |h| req.headers().get(h).and_then(|v| v.to_str().ok()).unwrap_or("-");
                    let (upgrade, forwarded_for) = (seen("upgrade"), seen("x-forwarded-for"));
                    let client_cert = seen("x-forwarded-client-cert");
                    for (k, v) in [
                        ("x-seen-upgrade", upgrade),
                        ("x-seen-xff", forwarded_for),
                        ("x-seen-xfcc", client_cert),
                        ("x-served-by", &*name),
                        ("x-seen-method", req.method().as_str()),
                        ("x-seen-path", &path),
                        ("x-seen-traceparent", trace),
                        ("x-seen-body-bytes", &received),
                        ("x-seen-peer", &peer),
                    ] {
                        if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                            headers.insert(k, v);
                        }
                    }
                    // What request authentication left: the token header, and what it wrote.
                    let auth = req.headers().get(hyper::header::AUTHORIZATION).cloned();
                    headers
                        .insert("x-seen-authorization", auth.unwrap_or(hyper::header::HeaderValue::from_static("-")));
                    let echoed = |k: &hyper::header::HeaderName| {
                        k.as_str().starts_with("x-jwt-") || k.as_str().starts_with("x-test-")
                    };
                    for (k, v) in req.headers().iter().filter(|(k, _)| echoed(k)) {
                        if let Ok(k) = hyper::header::HeaderName::from_bytes(format!("x-seen-{k}").as_bytes()) {
                            headers.append(k, v.clone());
                        }
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    })
}

/// A body of `late body\n` that arrives after a delay (the headers go first).
#[derive(Debug)]
struct Late {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    sent: bool,
}

impl Late {
    fn new(delay: std::time::Duration) -> Self {
        Late { sleep: Box::pin(tokio::time::sleep(delay)), sent: false }
    }
}

impl hyper::body::Body for Late {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        if self.sent {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(hyper::body::Bytes::from_static(b"late body\n")))))
    }
}

/// Serves gRPC-shaped calls as `name` until the task is aborted: any request answers 200
/// `application/grpc` with one message, `<name> <path>` (the call as it arrived), and the
/// trailers `grpc-status: 0`, `grpc-message: ok` (gRPC over HTTP/2: trailers must make it back).
pub fn grpc_server(listener: TcpListener, name: &str) -> tokio::task::JoinHandle<()> {
    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::{Bytes, Frame};
    use hyper::{Request, Response};

    let name: std::sync::Arc<str> = std::sync::Arc::from(name);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let name = name.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let reply = grpc_frame(format!("{name} {}", req.uri().path()).as_bytes());
                async move {
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    trailers.insert("grpc-message", hyper::header::HeaderValue::from_static("ok"));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                        vec![Ok(Frame::data(Bytes::from(reply))), Ok(Frame::trailers(trailers))];
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    let mut resp = Response::new(body);
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
            });
        }
    })
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// A gRPC answer: HTTP status, the message(s) after their 5-byte prefixes, and the trailers.
#[derive(Debug)]
pub struct GrpcAnswer {
    /// HTTP status.
    pub status: u16,
    /// The first message, as text.
    pub message: String,
    /// `grpc-status` from the trailers, if any came.
    pub grpc_status: Option<String>,
}

/// Makes one gRPC call (HTTP/2 with prior knowledge, POST `path`, `application/grpc`) over
/// `stream`.
pub async fn grpc_call(stream: TcpStream, path: &str, message: &[u8]) -> Result<GrpcAnswer> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header(hyper::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(grpc_frame(message))))?;
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), sender.send_request(request))
        .await
        .context("gRPC call timed out")??;
    let status = response.status().as_u16();
    let collected = response.into_body().collect().await?;
    let grpc_status =
        collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = collected.to_bytes();
    let message = bytes.get(5..).map(|m| String::from_utf8_lossy(m).into_owned()).unwrap_or_default();
    Ok(GrpcAnswer { status, message, grpc_status })
}

/// Serves `document` (a JWKS) over HTTPS at any path, as an identity provider does, until the
/// task is aborted; `None` answers 503 (the provider is down). Returns the task and a count of
/// the requests served. Fails when the certificate and key do not make a TLS server.
pub fn jwks_server(
    listener: TcpListener,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    document: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> anyhow::Result<(tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::atomic::AtomicU64>)> {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use http_body_util::Full;
    use hyper::body::Bytes;

    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let served = Arc::new(AtomicU64::new(0));
    let count = served.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, document, served) = (acceptor.clone(), document.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    served.fetch_add(1, Ordering::Relaxed);
                    let current = document.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(current.clone().unwrap_or_default())));
                    if current.is_none() {
                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((task, count))
}

/// PEM text of one DER object labelled `label`.
pub fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// A `kubernetes.io/tls` Secret `namespace/name` (for the YAML directory) holding `chain`, `key`
/// and, when given, `ca` as `ca.crt`.
pub fn tls_secret(
    namespace: &str,
    name: &str,
    chain: &[rustls_pki_types::CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    ca: Option<&str>,
) -> String {
    let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
    let chain: String = chain.iter().map(|c| pem_of("CERTIFICATE", c)).collect();
    let mut yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&chain),
        indent(&pem_of("PRIVATE KEY", key.secret_der()))
    );
    if let Some(ca) = ca {
        yaml.push_str(&format!("  ca.crt: |\n{}", indent(ca)));
    }
    yaml
}

/// An app that speaks HTTPS itself with `chain`/`key`, one request per connection: answers every
/// request `200` with body `<name>\n` and headers saying what it got — `x-served-by` (its name),
/// `x-sni` (the handshake's server name), `x-host` (the `Host` header) and `x-path`.
pub fn https_app(
    listener: TcpListener,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    name: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let name: Arc<str> = Arc::from(name);
    Ok(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_owned();
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
                let host = text
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("host")))
                    .map(|(_, v)| v.trim().to_owned())
                    .unwrap_or_default();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nx-served-by: {name}\r\nx-sni: {sni}\r\nx-host: {host}\r\nx-path: {path}\r\nConnection: close\r\n\r\n{name}\n",
                    name.len() + 1
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    }))
}
