//! Open311 GeoReport v2 as a client, sans-IO: the `POST requests` form for a ticket, and
//! reading the CRM's answers (a new request's number or token, a token resolved, requests'
//! status) into types. What to do with an HTTP answer ([`Verdict`]) is decided here too, for
//! the CRM and for webhooks alike.

use crate::dispatch::outbox::Ack;
use crate::dispatch::tickets::{Status, Ticket};
use serde::Deserialize;
use std::collections::BTreeMap;

/// The `POST requests` form (`application/x-www-form-urlencoded`) for ticket `t`:
/// `service_code` through `service_map` (our code when it has no entry), the location
/// (`lat`/`long`, `address_string`, `address_id`, the ZIP code as `attribute[zipcode]`), the
/// description and media, and the contact fields GeoReport defines (`email`, `first_name`,
/// `last_name`, `phone`). Never the caller's recording.
pub(crate) fn post_form(
    t: &Ticket,
    api_key: &str,
    jurisdiction_id: Option<&str>,
    service_map: &BTreeMap<String, String>,
) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    f.append_pair("api_key", api_key);
    if let Some(j) = jurisdiction_id {
        f.append_pair("jurisdiction_id", j);
    }
    let code = service_map
        .get(&t.service_code)
        .map_or(t.service_code.as_str(), String::as_str);
    f.append_pair("service_code", code);
    if let (Some(lat), Some(long)) = (t.lat, t.long) {
        f.append_pair("lat", &lat.to_string());
        f.append_pair("long", &long.to_string());
    }
    let pairs = [
        ("address_string", &t.address),
        ("address_id", &t.address_id),
        ("attribute[zipcode]", &t.zipcode),
        ("email", &t.email),
        ("first_name", &t.first_name),
        ("last_name", &t.last_name),
        ("phone", &t.phone),
        ("description", &t.description),
        ("media_url", &t.media_url),
    ];
    for (name, value) in pairs {
        // A number removed by retention or an erasure is not sent as one.
        let erased = name == "phone" && value.as_deref() == Some(crate::privacy::ERASED);
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty() && !erased) {
            f.append_pair(name, v);
        }
    }
    f.finish()
}

/// What to do with one delivery's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Delivered; for the CRM, how it acknowledged.
    Delivered(Option<Ack>),
    /// Try again later (down, slow, overloaded, 5xx).
    Retry(String),
    /// An answer we cannot read: try again, up to a limit.
    Garbage(String),
    /// Refused for good (a 4xx: wrong mapping, bad key): dead-letter at once.
    Refused(String),
}

/// A GeoReport error list: `[{"code": 400, "description": "..."}]`.
#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    description: Option<String>,
}

/// `[{"service_request_id": ..., "token": ...}]`; numbers or text.
#[derive(Deserialize)]
struct Created {
    #[serde(default)]
    service_request_id: Option<serde_json::Value>,
    #[serde(default)]
    token: Option<serde_json::Value>,
}

fn text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether an HTTP status says "try again later".
fn transient(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// The first error description in a GeoReport error body, or the body's start.
fn why(status: u16, body: &[u8]) -> String {
    let described = serde_json::from_slice::<Vec<ApiError>>(body)
        .ok()
        .and_then(|e| e.into_iter().find_map(|e| e.description));
    match described {
        Some(d) => format!("HTTP {status}: {}", clip(&d)),
        None => format!("HTTP {status}: {}", clip(&String::from_utf8_lossy(body))),
    }
}

/// At most 300 characters, for `last_error`.
fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// The CRM's answer to `POST requests`.
pub(crate) fn crm_verdict(status: u16, body: &[u8]) -> Verdict {
    if transient(status) {
        return Verdict::Retry(why(status, body));
    }
    if (400..500).contains(&status) {
        return Verdict::Refused(why(status, body));
    }
    if !(200..300).contains(&status) {
        return Verdict::Garbage(format!("unexpected HTTP {status}"));
    }
    let Ok(list) = serde_json::from_slice::<Vec<Created>>(body) else {
        return Verdict::Garbage(format!(
            "HTTP {status} but not a GeoReport answer: {}",
            clip(&String::from_utf8_lossy(body))
        ));
    };
    let first = list.first();
    if let Some(id) = first.and_then(|c| c.service_request_id.as_ref().and_then(text)) {
        return Verdict::Delivered(Some(Ack::Id(id)));
    }
    if let Some(token) = first.and_then(|c| c.token.as_ref().and_then(text)) {
        return Verdict::Delivered(Some(Ack::Token(token)));
    }
    Verdict::Garbage(format!(
        "HTTP {status} with neither service_request_id nor token: {}",
        clip(&String::from_utf8_lossy(body))
    ))
}

/// A webhook receiver's answer: 2xx delivered, 408/425/429/5xx retried, any other 4xx
/// refused, anything else retried as garbage.
pub(crate) fn webhook_verdict(status: u16, body: &[u8]) -> Verdict {
    if (200..300).contains(&status) {
        Verdict::Delivered(None)
    } else if transient(status) {
        Verdict::Retry(why(status, body))
    } else if (400..500).contains(&status) {
        Verdict::Refused(why(status, body))
    } else {
        Verdict::Garbage(format!("unexpected HTTP {status}"))
    }
}

/// One request in a `GET requests` answer, as far as we take it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CrmRequest {
    pub(crate) id: String,
    pub(crate) status: Status,
    pub(crate) status_notes: Option<String>,
    /// ISO 8601 UTC, whole seconds, as the store keeps it.
    pub(crate) expected: Option<String>,
}

#[derive(Deserialize)]
struct Listed {
    #[serde(default)]
    service_request_id: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    status_notes: Option<String>,
    #[serde(default)]
    expected_datetime: Option<String>,
}

/// A `GET requests` (or `GET requests/{id}`) answer: the requests in it with a number and a
/// status we know (`open`, `closed`); `None` if it is not a GeoReport list at all.
pub(crate) fn parse_requests(body: &[u8]) -> Option<Vec<CrmRequest>> {
    let list: Vec<Listed> = serde_json::from_slice(body).ok()?;
    Some(
        list.into_iter()
            .filter_map(|l| {
                let id = l.service_request_id.as_ref().and_then(text)?;
                let status = l.status?.trim().to_ascii_lowercase().parse().ok()?;
                let expected = l.expected_datetime.as_deref().and_then(normalise_datetime);
                Some(CrmRequest {
                    id,
                    status,
                    status_notes: l.status_notes.filter(|n| !n.trim().is_empty()),
                    expected,
                })
            })
            .collect(),
    )
}

/// A `GET tokens/{token}` answer: the number the token became, if it has one yet.
pub(crate) fn parse_token(body: &[u8]) -> Option<String> {
    let list: Vec<Created> = serde_json::from_slice(body).ok()?;
    list.first()?.service_request_id.as_ref().and_then(text)
}

/// An RFC 3339 datetime as the store writes it (UTC, whole seconds).
fn normalise_datetime(s: &str) -> Option<String> {
    use time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    let t = crate::dispatch::tickets::whole_second_utc(t);
    t.format(&Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        let now = time::macros::datetime!(2026-12-07 10:00:00 UTC);
        Ticket {
            service_request_id: 12_345_678,
            status: Status::Open,
            status_notes: None,
            service_name: "Pothole".into(),
            service_code: "pothole".into(),
            description: Some("deep one & wide".into()),
            agency_responsible: None,
            service_notice: None,
            requested_datetime: now,
            updated_datetime: now,
            expected_datetime: None,
            address: Some("1 Main St".into()),
            address_id: None,
            zipcode: Some("10001".into()),
            house_number: None,
            lat: Some(40.5),
            long: Some(-73.25),
            media_url: None,
            recording: Some("secret.wav".into()),
            phone: Some("+12125550100".into()),
            email: None,
            first_name: Some("Ana".into()),
            last_name: None,
            channel: crate::dispatch::tickets::Channel::Phone,
            language: Some("en".into()),
            call_id: Some("abc".into()),
            callback_requested: false,
            transfer: None,
            agent_id: None,
            external_id: None,
            duplicates: 0,
        }
    }

    #[test]
    fn the_form_maps_the_service_and_carries_location_and_contact() {
        let map = BTreeMap::from([("pothole".to_owned(), "4fd3b167e750846744000005".to_owned())]);
        let form = post_form(&ticket(), "k&y", Some("city.gov"), &map);
        let pairs: Vec<(String, String)> = form_urlencoded::parse(form.as_bytes())
            .into_owned()
            .collect();
        let get = |n: &str| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("api_key"), Some("k&y"));
        assert_eq!(get("jurisdiction_id"), Some("city.gov"));
        assert_eq!(get("service_code"), Some("4fd3b167e750846744000005"));
        assert_eq!(get("lat"), Some("40.5"));
        assert_eq!(get("long"), Some("-73.25"));
        assert_eq!(get("address_string"), Some("1 Main St"));
        assert_eq!(get("attribute[zipcode]"), Some("10001"));
        assert_eq!(get("description"), Some("deep one & wide"));
        assert_eq!(get("phone"), Some("+12125550100"));
        assert_eq!(get("first_name"), Some("Ana"));
        assert_eq!(get("email"), None);
        assert!(!form.contains("secret.wav"), "{form}");
        // Unmapped: our own code.
        let form = post_form(&ticket(), "k", None, &BTreeMap::new());
        assert!(form.contains("service_code=pothole"), "{form}");
        assert!(!form.contains("jurisdiction_id"), "{form}");
    }

    #[test]
    fn an_erased_number_is_not_sent() {
        let t = Ticket {
            phone: Some(crate::privacy::ERASED.into()),
            ..ticket()
        };
        let form = post_form(&t, "k", None, &BTreeMap::new());
        assert!(!form.contains("phone"), "{form}");
    }

    #[test]
    fn answers_are_judged() {
        assert_eq!(
            crm_verdict(
                200,
                br#"[{"service_request_id":"638344","service_notice":null}]"#
            ),
            Verdict::Delivered(Some(Ack::Id("638344".into())))
        );
        assert_eq!(
            crm_verdict(201, br#"[{"service_request_id":638344}]"#),
            Verdict::Delivered(Some(Ack::Id("638344".into())))
        );
        assert_eq!(
            crm_verdict(200, br#"[{"token":"12345"}]"#),
            Verdict::Delivered(Some(Ack::Token("12345".into())))
        );
        assert!(matches!(crm_verdict(503, b"busy"), Verdict::Retry(_)));
        assert!(matches!(crm_verdict(429, b""), Verdict::Retry(_)));
        match crm_verdict(
            404,
            br#"[{"code":404,"description":"service_code \"x\" not found"}]"#,
        ) {
            Verdict::Refused(why) => assert_eq!(why, "HTTP 404: service_code \"x\" not found"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            crm_verdict(200, b"<html>ok</html>"),
            Verdict::Garbage(_)
        ));
        assert!(matches!(crm_verdict(200, b"[{}]"), Verdict::Garbage(_)));
        assert!(matches!(crm_verdict(302, b""), Verdict::Garbage(_)));
        assert_eq!(webhook_verdict(204, b""), Verdict::Delivered(None));
        assert!(matches!(
            webhook_verdict(401, b"bad sig"),
            Verdict::Refused(_)
        ));
        assert!(matches!(webhook_verdict(502, b""), Verdict::Retry(_)));
    }

    #[test]
    fn listed_requests_are_read() {
        let body = br#"[
            {"service_request_id":"11","status":"closed","status_notes":"Filled by crew 7",
             "expected_datetime":"2026-12-09T08:00:00-05:00"},
            {"service_request_id":12,"status":"open","status_notes":null,"expected_datetime":null},
            {"service_request_id":"13","status":"weird"},
            {"status":"open"}
        ]"#;
        let got = parse_requests(body).unwrap();
        assert_eq!(
            got,
            vec![
                CrmRequest {
                    id: "11".into(),
                    status: Status::Closed,
                    status_notes: Some("Filled by crew 7".into()),
                    expected: Some("2026-12-09T13:00:00Z".into()),
                },
                CrmRequest {
                    id: "12".into(),
                    status: Status::Open,
                    status_notes: None,
                    expected: None,
                },
            ]
        );
        assert_eq!(parse_requests(b"{\"error\":1}"), None);
        assert_eq!(
            parse_token(br#"[{"service_request_id":"77","token":"t"}]"#),
            Some("77".into())
        );
        assert_eq!(parse_token(br#"[{"token":"t"}]"#), None);
    }
}
