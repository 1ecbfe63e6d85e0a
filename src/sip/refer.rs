//! REFER (RFC 3515) and Replaces (RFC 3891) at the edge: the `Refer-To` and `Referred-By` of a
//! REFER parsed into types once, and the `message/sipfrag` NOTIFY bodies and subscription
//! headers that report a transfer's progress back to the phone that asked for it.
//!
//! An attended transfer names the dialog to replace inside the `Refer-To` URI, as a URI header
//! whose value is escaped (RFC 3891 §6.1: `;` as `%3B`, `=` as `%3D`, `@` as `%40`):
//!
//! ```text
//! Refer-To: <sip:1002@192.0.2.1?Replaces=12345%40192.0.2.7%3Bto-tag%3Dab%3Bfrom-tag%3Dcd>
//! ```
//!
//! This module owns no state and sends nothing; the UA core passes a REFER up to the call
//! that owns the dialog, which decides.

use bytes::Bytes;

/// A parsed `Refer-To`: where to send the call, and the dialog to replace there, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferTo {
    /// The target URI, without its headers part (`?...`).
    pub uri: String,
    /// The `Replaces` header the URI carries (an attended transfer).
    pub replaces: Option<Replaces>,
}

impl ReferTo {
    /// The user part of the target (`sip:988@host` → `988`, `tel:911` → `911`).
    pub fn user(&self) -> Option<&str> {
        crate::sip::message::uri_user(&self.uri)
    }
}

/// A `Replaces` value (RFC 3891 §6.1): the Call-ID and the tags of the dialog to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaces {
    pub call_id: String,
    pub to_tag: String,
    pub from_tag: String,
    /// `early-only`: replace the dialog only if it is not confirmed yet.
    pub early_only: bool,
}

/// Why a REFER's `Refer-To` cannot be used (answered 400 with a Warning).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferError {
    /// The REFER has no `Refer-To` (RFC 3515 §2.4.1: exactly one is required).
    #[error("no Refer-To header")]
    Missing,
    /// More than one `Refer-To`.
    #[error("more than one Refer-To header")]
    Several,
    /// The value is not a name-addr or addr-spec.
    #[error("Refer-To is not a URI: {0}")]
    BadUri(String),
    /// A scheme other than `sip`, `sips` or `tel`.
    #[error("Refer-To scheme {0:?} is not sip, sips or tel")]
    Scheme(String),
    /// The `Replaces` URI header is not `call-id;to-tag=..;from-tag=..`.
    #[error("Replaces in Refer-To is malformed: {0}")]
    BadReplaces(String),
}

/// Read the `Refer-To` header values of a REFER (compact `r:` already expanded).
pub fn refer_to<'a>(mut values: impl Iterator<Item = &'a str>) -> Result<ReferTo, ReferError> {
    let value = values.next().ok_or(ReferError::Missing)?;
    if values.next().is_some() {
        return Err(ReferError::Several);
    }
    let na = crate::sip::message::NameAddr::parse(value).map_err(ReferError::BadUri)?;
    let (scheme, _) = na
        .uri
        .split_once(':')
        .ok_or_else(|| ReferError::BadUri(na.uri.clone()))?;
    if !["sip", "sips", "tel"]
        .iter()
        .any(|s| s.eq_ignore_ascii_case(scheme))
    {
        return Err(ReferError::Scheme(scheme.to_owned()));
    }
    let (uri, headers) = match na.uri.split_once('?') {
        Some((u, h)) => (u.to_owned(), Some(h)),
        None => (na.uri.clone(), None),
    };
    if crate::sip::message::uri_user(&uri).is_none()
        && crate::sip::message::uri_host_and_port(&uri).is_none()
    {
        return Err(ReferError::BadUri(uri));
    }
    let mut replaces = None;
    for h in headers.into_iter().flat_map(|h| h.split('&')) {
        let (name, value) = h.split_once('=').unwrap_or((h, ""));
        if name.trim().eq_ignore_ascii_case("replaces") {
            let value = unescape(value).map_err(ReferError::BadReplaces)?;
            replaces = Some(parse_replaces(&value).map_err(ReferError::BadReplaces)?);
        }
    }
    Ok(ReferTo { uri, replaces })
}

/// The URI of a `Referred-By` value, if it parses.
pub fn referred_by(value: &str) -> Option<String> {
    crate::sip::message::NameAddr::parse(value)
        .ok()
        .map(|na| na.uri)
}

/// A `Replaces` header value, unescaped: `call-id;to-tag=x;from-tag=y[;early-only]`.
pub fn parse_replaces(value: &str) -> Result<Replaces, String> {
    let mut parts = value.split(';');
    let call_id = parts.next().unwrap_or("").trim();
    if call_id.is_empty() || call_id.contains(char::is_whitespace) {
        return Err(format!("no Call-ID in {value:?}"));
    }
    let (mut to_tag, mut from_tag, mut early_only) = (None, None, false);
    for p in parts {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "to-tag" => to_tag = Some(v.trim().to_owned()),
            "from-tag" => from_tag = Some(v.trim().to_owned()),
            "early-only" => early_only = true,
            _ => {}
        }
    }
    match (to_tag, from_tag) {
        (Some(t), Some(f)) if !t.is_empty() && !f.is_empty() => Ok(Replaces {
            call_id: call_id.to_owned(),
            to_tag: t,
            from_tag: f,
            early_only,
        }),
        _ => Err(format!("to-tag and from-tag are required in {value:?}")),
    }
}

/// `%XX` escapes decoded (RFC 3261 §19.1.2), as UTF-8.
pub fn unescape(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape at {i} in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("not UTF-8: {s:?}"))
}

/// `s` escaped for a URI header value (RFC 3261's `hvalue`: unreserved and a few marks kept);
/// the tests build Refer-To values with it, as a phone does.
#[cfg(test)]
pub fn escape_header_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()[]/:+$".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The reason phrase we send with `code`.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        183 => "Session Progress",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        503 => "Service Unavailable",
        603 => "Decline",
        _ if code < 200 => "Progress",
        _ if code < 300 => "OK",
        _ => "Failed",
    }
}

/// The `message/sipfrag` body of a NOTIFY reporting `code` (RFC 3515 §2.4.5: the status
/// line alone).
pub fn sipfrag(code: u16) -> Bytes {
    Bytes::from(format!("SIP/2.0 {code} {}\r\n", reason_phrase(code)))
}

/// The headers of a NOTIFY of the implicit subscription a REFER created (RFC 3515 §2.4.4):
/// `Event: refer` (with `;id=<the REFER's CSeq>` when `id` is given: a REFER after the first
/// in its dialog, §2.4.6), and `Subscription-State` active for `expires` seconds while the
/// transfer goes on, terminated once `code` is final.
pub fn notify_headers(code: u16, expires: u64, id: Option<u32>) -> Vec<(String, String)> {
    let state = if code >= 200 {
        "terminated;reason=noresource".to_owned()
    } else {
        format!("active;expires={expires}")
    };
    vec![
        (
            "Event".to_owned(),
            id.map_or_else(|| "refer".to_owned(), |id| format!("refer;id={id}")),
        ),
        ("Subscription-State".to_owned(), state),
    ]
}

/// The status code of a `message/sipfrag` body (`SIP/2.0 200 OK` → 200), as the phone reads it.
#[cfg(test)]
pub fn sipfrag_code(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().next()?;
    let mut words = line.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("SIP/2.0") {
        return None;
    }
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3891 §7's example, as a transferor puts it in Refer-To (§6.1's escaping).
    #[test]
    fn an_attended_refer_to_carries_the_escaped_replaces_of_rfc_3891() {
        let r = refer_to(
            [
                "<sip:bob@biloxi.example.com?Replaces=425928%40bobster.example.org%3Bto-tag%3D7743%3Bfrom-tag%3D6472>",
            ]
            .into_iter(),
        )
        .unwrap();
        assert_eq!(r.uri, "sip:bob@biloxi.example.com");
        assert_eq!(r.user(), Some("bob"));
        assert_eq!(
            r.replaces,
            Some(Replaces {
                call_id: "425928@bobster.example.org".into(),
                to_tag: "7743".into(),
                from_tag: "6472".into(),
                early_only: false,
            })
        );
        // Header names are case-insensitive; other URI headers are ignored; early-only read.
        let r = refer_to(
            ["\"Desk\" <sip:1002@192.0.2.1;transport=tcp?Subject=x&replaces=a%3Bfrom-tag%3D1%3Bto-tag%3D2%3Bearly-only>"]
                .into_iter(),
        )
        .unwrap();
        assert_eq!(r.uri, "sip:1002@192.0.2.1;transport=tcp");
        let rep = r.replaces.unwrap();
        assert_eq!((rep.to_tag.as_str(), rep.from_tag.as_str()), ("2", "1"));
        assert!(rep.early_only);
    }

    #[test]
    fn a_blind_refer_to_is_a_plain_uri_in_any_of_its_forms() {
        for (v, uri) in [
            ("<sip:988@10.0.0.1>", "sip:988@10.0.0.1"),
            ("sip:911@psap.example.gov", "sip:911@psap.example.gov"),
            ("<tel:911>", "tel:911"),
            (
                "<sips:interpreter@example.org:5061>",
                "sips:interpreter@example.org:5061",
            ),
        ] {
            let r = refer_to([v].into_iter()).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert_eq!(r.uri, uri);
            assert_eq!(r.replaces, None);
        }
        assert_eq!(
            refer_to(["tel:911"].into_iter()).unwrap().user(),
            Some("911")
        );
    }

    #[test]
    fn malformed_refer_to_is_refused_with_the_reason() {
        assert_eq!(refer_to([].into_iter()), Err(ReferError::Missing));
        assert_eq!(
            refer_to(["<sip:a@b>", "<sip:c@d>"].into_iter()),
            Err(ReferError::Several)
        );
        assert!(matches!(
            refer_to(["<http://example.com/>"].into_iter()),
            Err(ReferError::Scheme(_))
        ));
        assert!(matches!(
            refer_to(["not a uri"].into_iter()),
            Err(ReferError::BadUri(_))
        ));
        assert!(matches!(
            refer_to(["<sip:a@b"].into_iter()),
            Err(ReferError::BadUri(_))
        ));
        for bad in [
            "<sip:a@b?Replaces=abc>",
            "<sip:a@b?Replaces=abc%3Bto-tag%3D1>",
            "<sip:a@b?Replaces=%3Bto-tag%3D1%3Bfrom-tag%3D2>",
            "<sip:a@b?Replaces=abc%3Bto-tag%3D1%3Bfrom-tag%3D%ZZ>",
        ] {
            assert!(
                matches!(refer_to([bad].into_iter()), Err(ReferError::BadReplaces(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn escaping_round_trips_a_replaces_value() {
        let v = "425928@bobster.example.org;to-tag=7743;from-tag=6472";
        let e = escape_header_value(v);
        assert_eq!(
            e,
            "425928%40bobster.example.org%3Bto-tag%3D7743%3Bfrom-tag%3D6472"
        );
        assert_eq!(unescape(&e).unwrap(), v);
        assert_eq!(
            parse_replaces(v).unwrap().call_id,
            "425928@bobster.example.org"
        );
    }

    #[test]
    fn sipfrag_bodies_and_subscription_state() {
        assert_eq!(&sipfrag(100)[..], b"SIP/2.0 100 Trying\r\n");
        assert_eq!(&sipfrag(200)[..], b"SIP/2.0 200 OK\r\n");
        assert_eq!(sipfrag_code(&sipfrag(486)), Some(486));
        assert_eq!(
            sipfrag_code(b"SIP/2.0 180 Ringing\r\nContent-Length: 0\r\n"),
            Some(180)
        );
        assert_eq!(sipfrag_code(b"garbage"), None);
        let h = notify_headers(100, 60, None);
        assert!(h.contains(&("Subscription-State".into(), "active;expires=60".into())));
        assert!(h.contains(&("Event".into(), "refer".into())));
        let h = notify_headers(503, 60, Some(7));
        assert!(h.contains(&("Event".into(), "refer;id=7".into())));
        assert!(h.contains(&(
            "Subscription-State".into(),
            "terminated;reason=noresource".into()
        )));
        assert_eq!(
            referred_by("<sip:1001@192.0.2.5>").as_deref(),
            Some("sip:1001@192.0.2.5")
        );
    }
}
