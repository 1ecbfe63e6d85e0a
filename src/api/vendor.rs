//! Third-party browser code embedded in the binary and served from it (no CDN, nothing fetched
//! at run time): JsSIP, the SIP over WebSocket library a browser operator's page uses, at
//! `GET /console/assets/jssip.min.js`. The file is `web/vendor/jssip/jssip.min.js`, the npm
//! registry's copy pinned by the lockfile beside it (`scripts/vendor-jssip.sh` reproduces and
//! checks it).

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// JsSIP as its authors built it (MIT; `web/vendor/jssip/LICENSE`).
pub const JSSIP: &[u8] = include_bytes!("../../web/vendor/jssip/jssip.min.js");

/// The file's entity tag: its length and a hash of its bytes, fixed at build time.
fn etag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(JSSIP);
        format!(
            "\"{}-{}\"",
            JSSIP.len(),
            d[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    })
}

pub(crate) async fn jssip(headers: HeaderMap) -> Response {
    let tag = etag();
    let cache = [
        (header::ETAG, HeaderValue::from_static(tag)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (
        cache,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/javascript; charset=utf-8"),
        )],
        JSSIP,
    )
        .into_response()
}
