//! Outbound HTTP/1.1 for the CRM and the webhooks: one request per connection (the outbox
//! sends a few requests a second at most), over TCP for `http://` and rustls (Mozilla's
//! roots, from `webpki-roots`) for `https://`, with one deadline over connect, TLS, request
//! and the whole answer, and a cap on the answer's size.

use axum::http::{header, HeaderValue, Method, Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The largest answer read; a longer one is [`HttpError::TooLarge`].
pub(crate) const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// The URL is not `http(s)://host[:port]/...`.
    #[error("not an http(s) URL: {0}")]
    BadUrl(String),
    /// No TCP connection (refused, unreachable, name not found).
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS with {authority} failed: {source}")]
    Tls {
        authority: String,
        source: std::io::Error,
    },
    /// No complete answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the answer was not HTTP.
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    /// The answer is longer than [`MAX_ANSWER_BYTES`].
    #[error("the answer is longer than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

/// An answer.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

/// The client: TLS settings and the deadline.
#[derive(Clone)]
pub(crate) struct Client {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Client {
    pub(crate) fn new(timeout: Duration) -> Client {
        let roots = rustls_roots();
        // ring, the crypto the tree already builds (the WebRTC stack uses it); rustls marks it
        // deprecated for lacking post-quantum key exchange, which the alternative (aws-lc-rs, a
        // C and assembly build) would bring. Classical ECDHE is what CRMs offer today.
        #[allow(deprecated)]
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth());
        let config = match config {
            Ok(c) => c,
            // ring supports the default versions; this cannot fail with it.
            Err(e) => unreachable!("rustls defaults with ring: {e}"),
        };
        Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
        }
    }

    /// Sends `method url` with `headers` and `body` (given a content type) and reads the
    /// answer, all within the deadline.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Answer, HttpError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, url, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout(self.timeout)),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Option<(&'static str, Vec<u8>)>,
    ) -> Result<Answer, HttpError> {
        let target = Target::parse(url)?;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| HttpError::Connect {
                authority: target.authority.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let mut req = Request::builder()
            .method(method)
            .uri(target.path_and_query.as_str())
            .header(header::HOST, target.authority.as_str())
            .header(header::CONNECTION, "close")
            .header(
                header::USER_AGENT,
                concat!("ivr311/", env!("CARGO_PKG_VERSION")),
            );
        for (name, value) in headers {
            let value =
                HeaderValue::from_str(value).map_err(|_| HttpError::BadUrl(url.to_owned()))?;
            req = req.header(*name, value);
        }
        let bytes = match body {
            Some((content_type, bytes)) => {
                req = req.header(header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|_| HttpError::BadUrl(url.to_owned()))?;
        if target.tls {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|_| HttpError::BadUrl(url.to_owned()))?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|source| HttpError::Tls {
                    authority: target.authority.clone(),
                    source,
                })?;
            exchange_on(stream, req).await
        } else {
            exchange_on(tcp, req).await
        }
    }
}

/// One request on a fresh connection, driving the connection while the answer is read.
async fn exchange_on<S>(stream: S, req: Request<Full<Bytes>>) -> Result<Answer, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let exchange = async move {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => HttpError::Http(*e),
                Err(_) => HttpError::TooLarge,
            })?
            .to_bytes();
        // With the sender gone the connection ends, and so does `conn` below.
        drop(sender);
        Ok::<_, HttpError>(Answer { status, body })
    };
    let (answer, _closed) = tokio::join!(exchange, conn);
    answer
}

fn rustls_roots() -> tokio_rustls::rustls::RootCertStore {
    tokio_rustls::rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    }
}

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host[:port]` as given, for `Host`.
    pub(crate) authority: String,
    pub(crate) path_and_query: String,
}

impl Target {
    /// `http://host[:port][/path][?query]` or `https://...`; IPv6 literals in brackets.
    pub(crate) fn parse(url: &str) -> Result<Target, HttpError> {
        let bad = || HttpError::BadUrl(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(bad());
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            tls,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path_and_query: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_into_targets() {
        let t = Target::parse("https://crm.example.gov/open311/v2/requests.json?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: true,
                host: "crm.example.gov".into(),
                port: 443,
                authority: "crm.example.gov".into(),
                path_and_query: "/open311/v2/requests.json?x=1".into(),
            }
        );
        let t = Target::parse("http://[::1]:8080").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 8080, false));
        assert_eq!(t.path_and_query, "/");
        for bad in ["ftp://x/", "crm.example.gov/x", "http://user:pw@host/", ""] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
