//! Plain HTTP/1.1 GETs to the mesh's own endpoints (a ztunnel's admin API, Prometheus, the
//! proxies' metrics), bounded in time and size.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};

/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read (a proxy's metrics, a Prometheus query, a config dump).
const MAX_BODY: usize = 32 << 20;

/// `pairs` as a URL query string (`a=1&b=x%2Fy`).
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    q.finish()
}

/// GETs `path_and_query` from `authority` (`host:port`, plain HTTP/1.1).
pub async fn http_get(authority: &str, path_and_query: &str) -> Result<Bytes> {
    let exchange = async {
        let stream =
            tokio::net::TcpStream::connect(authority).await.with_context(|| format!("connecting to {authority}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path_and_query)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, concat!("ambientctl/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_owned();
            bail!("{status}: {text}");
        }
        anyhow::Ok(body)
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .with_context(|| format!("no answer within {TIMEOUT:?}"))?
        .with_context(|| format!("GET http://{authority}{}", path_and_query.split('?').next().unwrap_or("")))
}

/// Splits an `http://host:port[/prefix]` URL into its authority and path prefix.
pub fn http_url(url: &str) -> Result<(String, String)> {
    let uri: Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("{url}: only http:// is read ({other}:// is not; port-forward to the plain port)"),
        None => bail!("{url}: say http://HOST:PORT"),
    }
    let authority = uri.authority().with_context(|| format!("{url}: no host"))?;
    let authority = if authority.port().is_some() { authority.to_string() } else { format!("{authority}:80") };
    Ok((authority, uri.path().trim_end_matches('/').to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_plain_http() {
        assert_eq!(http_url("http://127.0.0.1:9090").unwrap(), ("127.0.0.1:9090".into(), String::new()));
        assert_eq!(http_url("http://prom/sub/").unwrap(), ("prom:80".into(), "/sub".into()));
        assert!(format!("{:#}", http_url("https://prom:9090").unwrap_err()).contains("only http://"));
        assert!(http_url("prom:9090").is_err());
    }
}
