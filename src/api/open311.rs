//! Open311 GeoReport v2 (the frozen spec at <http://wiki.open311.org/GeoReport_v2>), served
//! under `/open311/v2/` in XML (the spec's required format) and JSON.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `discovery.{xml,json}` | service discovery |
//! | GET | `services.{xml,json}` | one service per ticket the phone menu can file, plus `general` |
//! | GET | `services/{code}.{xml,json}` | the fields a service collects (e.g. the ZIP code) |
//! | POST | `requests.{xml,json}` | file a ticket (`channel: web`), needs an `api_key` |
//! | GET | `requests.{xml,json}` | search tickets (filters below) |
//! | GET | `requests/{id}.{xml,json}` | one ticket |
//!
//! Services come from the loaded menu, read on every request, so a menu reload shows at once.
//! Phone tickets and web tickets are the same records: a pothole reported by phone is read
//! back here like one posted by an app.
//!
//! # Choices where the spec leaves room
//!
//! * **Errors** are always the spec's array (`[{"code":400,"description":"..."}]`, XML
//!   `<errors><error>...`), the body `code` equal to the HTTP status: 403 for a missing or
//!   wrong `api_key` (also when no keys are configured: posting is then closed), 429 for a key
//!   over its posting rate (with `Retry-After`), 404 for
//!   anything that does not exist (unknown path or format extension, unknown `service_code`
//!   in a path or a POST, unknown request number, a `jurisdiction_id` that is not ours), 400
//!   for invalid input (every problem found is listed), 405 for a wrong method, 413 for a
//!   POST body over [`MAX_BODY_BYTES`], 500 when the database fails (logged).
//! * **jurisdiction_id** is optional (we serve one jurisdiction). When one is configured, a
//!   request naming a different one gets 404 "jurisdiction_id not found"; when none is
//!   configured any value is accepted.
//! * **Optional arguments** that are empty (`?status=&service_code=`) are treated as absent,
//!   as the spec requires.
//! * **Dates** (`start_date`, `end_date`) are W3C/RFC 3339 with a time zone (seconds may be
//!   left out). A space is read as `+`, since an unencoded `+05:00` in a query string arrives
//!   as a space. With neither date the last 90 days are searched; with one, the 90 days after
//!   `start_date` or before `end_date`. A span over 90 days, or an end before the start, is
//!   400. At most [`MAX_RESULTS`] requests are returned, newest first.
//! * `service_request_id` in `GET requests` (comma-separated) overrides every other filter.
//! * **Personal data** (phone, email, names, call ids) is stored but never returned.
//!   `device_id` is accepted and not stored; `account_id` is echoed in the POST response.
//! * `service_request_id` is a string in JSON (the store's numbers are 8 digits).
//! * **external_id** (an extension, null until set) is the city CRM's `service_request_id`
//!   for the ticket, once the outbox has forwarded it there (`forward.open311`, see
//!   [`crate::forward`]), so an app can look the request up in either system.
//! * **Location.** A POST needs one, as the spec says: `lat` and `long`, `address_string`,
//!   `address_id`, or the service's location attribute (`attribute[zipcode]`, the ZIP code the
//!   phone asks every caller for). The ZIP attribute is therefore `required: false` in the
//!   service definition, with a description saying it is needed when no other location is
//!   given. Everything given is kept and returned.
//! * Attributes (`attribute[zipcode]=94103`) are checked against the service definition:
//!   a required field missing or not matching the menu's digit rules is 400; `zipcode` fills
//!   the ticket's `zipcode`, `address` its `address_id` (as on the phone); unknown attribute
//!   codes are ignored.
//! * **Text fields** have a length limit each ([`MAX_DESCRIPTION_CHARS`] for `description`,
//!   less for the others) and may not hold control characters (line breaks and tabs are
//!   allowed in `description` and `address_string`); `phone` and `email` must look like one.
//! * **Rate.** Each API key may post `open311.post_burst` requests at once, then
//!   `open311.post_rate_per_minute` a minute; past it the answer is 429 with `Retry-After`.
//! * **API keys** are compared as SHA-256 digests in constant time, every configured key
//!   every time, so timing says nothing about a key's bytes or length.
//! * `media_url` in a POST must be an absolute `http(s)` URL, and only such media, posted by a
//!   client, is ever returned. A phone ticket's recording of the caller is personal data: it
//!   is never in this API (staff fetch it through the admin API).

use crate::api::ApiState;
use crate::dispatch::tickets::{
    Channel, NewTicket, PublicTicket, Status, StoreError, TicketQuery, MAX_FILTER_VALUES,
};
use crate::menu::engine::{GENERAL_SERVICE, GENERAL_SERVICE_NAME};
use crate::menu::schema::{Action, Collect, MenuFile, TicketAction, TicketSteps};
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::OnceLock;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};

/// Largest `POST requests` body accepted; larger ones get 413.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest `description`, in characters (the spec's limit).
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 4000;
/// Most requests one `GET requests` returns (the spec's default limit).
pub(crate) const MAX_RESULTS: u32 = 1000;
/// Widest `start_date`..`end_date` span, and the default search window.
pub(crate) const MAX_SPAN_DAYS: i64 = 90;
/// The `specification` token of this API in the discovery document.
pub(crate) const SPECIFICATION: &str = "http://wiki.open311.org/GeoReport_v2";
/// Where this router is mounted (for discovery's endpoint URL).
pub(crate) const BASE_PATH: &str = "/open311/v2";

const JSON_TYPE: &str = "application/json; charset=utf-8";
const XML_TYPE: &str = "text/xml; charset=utf-8";
const XML_DECLARATION: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>";
const GENERAL_DESCRIPTION: &str =
    "Any other non-emergency request for city services that is not listed separately.";

/// Routes under `/open311/v2`.
pub(crate) fn router() -> Router<ApiState> {
    Router::new()
        .route("/{file}", any(top_level))
        .route("/services/{file}", any(service_definition))
        .route("/requests/{file}", any(one_request))
        .fallback(fallback)
}

// ---------------------------------------------------------------------------------------------
// Formats and documents

/// The response format, from the resource's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Xml,
}

/// Splits `services.json` into `("services", Json)`. `Err` carries the name for a 404.
fn split_format(file: &str) -> Result<(&str, Format), ApiError> {
    let unknown = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown format: use .xml or .json".to_string(),
        )
    };
    let (name, ext) = file.rsplit_once('.').ok_or_else(unknown)?;
    if ext.eq_ignore_ascii_case("json") {
        Ok((name, Format::Json))
    } else if ext.eq_ignore_ascii_case("xml") {
        Ok((name, Format::Xml))
    } else {
        Err(unknown())
    }
}

/// A document, written as JSON or as XML from one description, so the two always agree
/// (the spec's JSON is a mapping of its XML). Text is borrowed where it can be (a ticket's
/// fields), so a list of 1,000 requests is written without copying them first.
#[derive(Debug, Clone, PartialEq)]
enum Node<'a> {
    /// A string; `None` is JSON `null` and an empty XML element.
    Text(Option<Cow<'a, str>>),
    /// A datetime, written in RFC 3339 in UTC; `None` (or a year RFC 3339 cannot carry) is
    /// `null` / empty.
    Time(Option<OffsetDateTime>),
    /// A number; `None` (or not finite) is `null` / empty.
    Num(Option<f64>),
    Int(u64),
    Bool(bool),
    /// A JSON array; in XML, one element named by the `&str` per item.
    List(&'static str, Vec<Node<'a>>),
    /// A JSON object; in XML, child elements in this order.
    Obj(Vec<(&'static str, Node<'a>)>),
}

fn text<'a>(s: impl Into<Cow<'a, str>>) -> Node<'a> {
    Node::Text(Some(s.into()))
}

fn opt_text(s: Option<&str>) -> Node<'_> {
    Node::Text(s.map(Cow::Borrowed))
}

impl Node<'_> {
    fn write_json(&self, out: &mut String) {
        match self {
            Node::Text(Some(s)) => json_string(s, out),
            Node::Text(None) => out.push_str("null"),
            Node::Time(t) => match t.and_then(Rfc3339Text::new) {
                Some(t) => {
                    // RFC 3339 text has nothing JSON escapes.
                    out.push('"');
                    out.push_str(t.as_str());
                    out.push('"');
                }
                None => out.push_str("null"),
            },
            // serde_json's shortest form that reads back as the same f64 (its `Number`
            // writes a float as `serde_json::to_string` does).
            Node::Num(Some(n)) => match serde_json::Number::from_f64(*n) {
                Some(n) => {
                    let _ = write!(out, "{n}");
                }
                None => out.push_str("null"),
            },
            Node::Num(None) => out.push_str("null"),
            Node::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Node::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Node::List(_, items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write_json(out);
                }
                out.push(']');
            }
            Node::Obj(fields) => {
                out.push('{');
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    json_string(key, out);
                    out.push(':');
                    value.write_json(out);
                }
                out.push('}');
            }
        }
    }

    fn write_xml(&self, name: &str, out: &mut String) {
        let open = |out: &mut String| {
            out.push('<');
            out.push_str(name);
            out.push('>');
        };
        let close = |out: &mut String| {
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        };
        let empty = |out: &mut String| {
            out.push('<');
            out.push_str(name);
            out.push_str("/>");
        };
        match self {
            Node::Text(None) | Node::Num(None) => empty(out),
            Node::Num(Some(n)) if !n.is_finite() => empty(out),
            Node::Text(Some(s)) => {
                open(out);
                xml_escape(s, out);
                close(out);
            }
            Node::Time(t) => match t.and_then(Rfc3339Text::new) {
                Some(t) => {
                    open(out);
                    out.push_str(t.as_str());
                    close(out);
                }
                None => empty(out),
            },
            Node::Num(Some(n)) => {
                open(out);
                let _ = write!(out, "{n}");
                close(out);
            }
            Node::Int(n) => {
                open(out);
                let _ = write!(out, "{n}");
                close(out);
            }
            Node::Bool(b) => {
                open(out);
                out.push_str(if *b { "true" } else { "false" });
                close(out);
            }
            Node::List(child, items) => {
                open(out);
                for item in items {
                    item.write_xml(child, out);
                }
                close(out);
            }
            Node::Obj(fields) => {
                open(out);
                for (key, value) in fields {
                    value.write_xml(key, out);
                }
                close(out);
            }
        }
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it (`"`, `\`, and the C0 controls:
/// `\n`, `\r`, `\t`, `\b`, `\f` short, the others `\u00XX`; everything else as is), straight
/// into `out`.
fn json_string(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` is a character boundary.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Escapes text for an XML 1.0 element. Characters XML 1.0 cannot carry at all (NUL and
/// most C0 controls, U+FFFE, U+FFFF) become U+FFFD; a carriage return is kept as `&#13;`
/// so parsers do not fold it into a newline.
fn xml_escape(s: &str, out: &mut String) {
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let replacement = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            '"' => "&quot;",
            '\'' => "&apos;",
            '\r' => "&#13;",
            '\t' | '\n' => continue,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => "\u{FFFD}",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        out.push_str(replacement);
        start = i + c.len_utf8();
    }
    out.push_str(&s[start..]);
}

/// A datetime as RFC 3339 text in UTC, as `time`'s `Rfc3339` writes it
/// (`2026-11-26T03:22:09Z`). The store keeps whole seconds in UTC, which are written here
/// digit by digit; anything else (fractions of a second) goes through the generic formatter.
enum Rfc3339Text {
    WholeSecond([u8; 20]),
    Other(String),
}

impl Rfc3339Text {
    /// `None` for a year RFC 3339 cannot carry (outside 0..=9999).
    fn new(t: OffsetDateTime) -> Option<Rfc3339Text> {
        let t = t.to_offset(UtcOffset::UTC);
        let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
        if t.nanosecond() != 0 {
            return t.format(&Rfc3339).ok().map(Rfc3339Text::Other);
        }
        let mut b = *b"0000-00-00T00:00:00Z";
        let mut put = |at: usize, digits: usize, mut n: u32| {
            for i in (at..at + digits).rev() {
                // `n % 10` is one digit.
                b[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, u32::from(u8::from(t.month())));
        put(8, 2, u32::from(t.day()));
        put(11, 2, u32::from(t.hour()));
        put(14, 2, u32::from(t.minute()));
        put(17, 2, u32::from(t.second()));
        Some(Rfc3339Text::WholeSecond(b))
    }

    fn as_str(&self) -> &str {
        match self {
            // Only ASCII digits and separators were written.
            Rfc3339Text::WholeSecond(b) => std::str::from_utf8(b).unwrap_or_default(),
            Rfc3339Text::Other(s) => s,
        }
    }
}

/// A response: `root` names the XML document element (JSON has no root).
fn document(format: Format, status: StatusCode, root: &str, node: &Node) -> Response {
    document_sized(format, status, root, node, 0)
}

/// [`document`], its body's buffer made `capacity` bytes at first.
fn document_sized(
    format: Format,
    status: StatusCode,
    root: &str,
    node: &Node,
    capacity: usize,
) -> Response {
    let mut body = String::with_capacity(capacity);
    let content_type = match format {
        Format::Json => {
            node.write_json(&mut body);
            JSON_TYPE
        }
        Format::Xml => {
            body.push_str(XML_DECLARATION);
            body.push('\n');
            node.write_xml(root, &mut body);
            body.push('\n');
            XML_TYPE
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Errors

/// One or more errors with one HTTP status, answered as the spec's error array.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    status: StatusCode,
    descriptions: Vec<String>,
    /// Seconds for a `Retry-After` header (429).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, description: String) -> Self {
        ApiError {
            status,
            descriptions: vec![description],
            retry_after: None,
        }
    }

    fn bad_request(description: String) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, description)
    }

    fn not_found(description: String) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, description)
    }

    fn store(op: &'static str, e: &StoreError) -> Self {
        tracing::error!(op, error = %e, "open311: ticket store failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the service request database is unavailable; try again later".to_string(),
        )
    }

    fn respond(&self, format: Format) -> Response {
        let code = u64::from(self.status.as_u16());
        let items = self
            .descriptions
            .iter()
            .map(|d| Node::Obj(vec![("code", Node::Int(code)), ("description", text(d))]))
            .collect();
        let mut r = document(format, self.status, "errors", &Node::List("error", items));
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// Collects the 400s of one request so they are reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, description: String) {
        self.0.push(description);
    }

    fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                descriptions: self.0,
                retry_after: None,
            })
        }
    }
}

fn method_not_allowed(format: Format, allow: &'static str) -> Response {
    let mut r = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here (allowed: {allow})"),
    )
    .respond(format);
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The format of a path's extension, for errors before the resource is known (XML, the
/// spec's required format, unless the path ends in `.json`).
fn guess_format(path: &str) -> Format {
    match path.rsplit_once('.') {
        Some((_, ext)) if ext.eq_ignore_ascii_case("json") => Format::Json,
        _ => Format::Xml,
    }
}

async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(format!("no such resource: {}", uri.path()))
        .respond(guess_format(uri.path()))
}

/// The `{file}` path segment and its format, or the error response (400 for an undecodable
/// segment, 404 for an unknown extension).
fn path_file(
    path: Result<Path<String>, PathRejection>,
    uri: &Uri,
) -> Result<(String, Format), Box<Response>> {
    let fail = |e: ApiError| Box::new(e.respond(guess_format(uri.path())));
    let Path(file) = path.map_err(|e| fail(ApiError::bad_request(format!("invalid path: {e}"))))?;
    let (name, format) = split_format(&file).map_err(fail)?;
    Ok((name.to_owned(), format))
}

// ---------------------------------------------------------------------------------------------
// Parameters

/// Decoded `name=value` pairs of a query string or form body, in order.
#[derive(Debug, Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(bytes: &[u8]) -> Params {
        Params(
            form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first non-empty value of `name` (an empty value counts as absent).
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated item of every `name` parameter, trimmed, empties dropped.
    fn list(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// `attribute[code]=value` pairs (non-empty values; the first per code).
    fn attributes(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for (k, v) in &self.0 {
            let Some(code) = k
                .strip_prefix("attribute[")
                .and_then(|rest| rest.strip_suffix(']'))
            else {
                continue;
            };
            if v.trim().is_empty() || out.iter().any(|(c, _)| *c == code) {
                continue;
            }
            out.push((code, v.as_str()));
        }
        out
    }
}

/// 404 when a `jurisdiction_id` is given, one is configured, and they differ.
fn check_jurisdiction(state: &ApiState, params: &Params) -> Result<(), ApiError> {
    let (Some(given), Some(ours)) = (
        params.get("jurisdiction_id"),
        state.open311.jurisdiction_id.as_deref(),
    ) else {
        return Ok(());
    };
    if given.trim() == ours {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "jurisdiction_id {given:?} not found"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Services (from the menu)

/// A ticket the menu can file, with the group of the menu it is in.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub(crate) action: TicketAction,
    pub(crate) group: String,
}

/// One service per distinct ticket action (by code, first one wins; both branches of a
/// `when`) in menu order (menus by id, entries by key, then `on_timeout`, `on_exhausted`),
/// then the defaults'
/// `on_exhausted`, then the general service if the menu does not define it.
pub(crate) fn services(file: &MenuFile) -> Vec<Service> {
    /// A ticket action, or the tickets of both branches of a `when` (open first).
    fn push(out: &mut Vec<Service>, action: &Action, group: Option<&String>) {
        match action {
            Action::Ticket(t) if !out.iter().any(|s| s.action.service == t.service) => {
                out.push(Service {
                    action: (**t).clone(),
                    group: group.cloned().unwrap_or_default(),
                });
            }
            Action::When(w) => {
                push(out, &w.open, group);
                push(out, &w.closed, group);
            }
            _ => {}
        }
    }
    let mut out: Vec<Service> = Vec::new();
    for menu in file.menus.values() {
        let group = menu.category.as_ref();
        for action in menu
            .entries
            .values()
            .chain(menu.on_timeout.iter())
            .chain(menu.on_exhausted.iter())
        {
            push(&mut out, action, group);
        }
    }
    push(&mut out, &file.defaults.on_exhausted, None);
    if !out.iter().any(|s| s.action.service == GENERAL_SERVICE) {
        out.push(Service {
            action: TicketAction {
                service: GENERAL_SERVICE.into(),
                name: GENERAL_SERVICE_NAME.into(),
                description: Some(GENERAL_DESCRIPTION.into()),
                agency: None,
                keywords: vec![],
                steps: None,
                house_number: false,
                duplicates: None,
            },
            group: String::new(),
        });
    }
    out
}

/// The temporary services of the emergency announcements active now (listed, defined and
/// accepted while they last).
fn temporary_services(state: &ApiState) -> Vec<Service> {
    let board = &state.announcements;
    (board.snapshot().services_at(board.now()).into_iter())
        .map(|(action, group)| Service { action, group })
        .collect()
}

pub(crate) fn find_service(file: &MenuFile, code: &str) -> Option<Service> {
    services(file)
        .into_iter()
        .find(|s| s.action.service == code)
}

/// The steps a ticket takes: its own, else the file's defaults.
fn steps<'a>(file: &'a MenuFile, action: &'a TicketAction) -> &'a TicketSteps {
    action.steps.as_ref().unwrap_or(&file.defaults.ticket)
}

fn service_node<'a>(file: &MenuFile, s: &'a Service) -> Node<'a> {
    let a = &s.action;
    Node::Obj(vec![
        ("service_code", text(&a.service)),
        ("service_name", text(&a.name)),
        (
            "description",
            text(a.description.clone().unwrap_or_default()),
        ),
        ("metadata", Node::Bool(!steps(file, a).collect.is_empty())),
        ("type", text("realtime")),
        ("keywords", text(a.keywords.join(", "))),
        ("group", text(&s.group)),
    ])
}

/// What a field is called to people.
fn field_label(field: &str) -> &str {
    match field {
        "zipcode" => "ZIP code",
        "address" => "address ID",
        other => other,
    }
}

fn datatype_description(c: &Collect) -> String {
    let label = field_label(&c.field);
    if c.min_digits == c.max_digits {
        format!("{}-digit {label}", c.max_digits)
    } else {
        format!("{label} of {} to {} digits", c.min_digits, c.max_digits)
    }
}

/// Said of a location attribute, which the phone always asks for but the web needs only when
/// nothing else locates the problem.
const LOCATION_ATTRIBUTE_RULE: &str =
    "Required when the request gives no other location (lat and long, address_string or \
     address_id).";

fn attribute_description(c: &Collect) -> String {
    match c.field.as_str() {
        "zipcode" => {
            format!("The ZIP code of the location of the problem. {LOCATION_ATTRIBUTE_RULE}")
        }
        "address" => format!(
            "The city's address ID of the location of the problem (from the city's address \
             register). {LOCATION_ATTRIBUTE_RULE}"
        ),
        other => format!("The {other} of the problem."),
    }
}

/// Whether a client must always send attribute `c` (a location attribute never: any other
/// location will do).
fn attribute_required(c: &Collect) -> bool {
    !c.optional && !is_location_field(&c.field)
}

fn definition_node<'a>(file: &'a MenuFile, s: &'a Service) -> Node<'a> {
    let attributes = steps(file, &s.action)
        .collect
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Node::Obj(vec![
                ("variable", Node::Bool(true)),
                ("code", text(&c.field)),
                ("datatype", text("string")),
                ("required", Node::Bool(attribute_required(c))),
                ("datatype_description", text(datatype_description(c))),
                ("order", Node::Int(i as u64 + 1)),
                ("description", text(attribute_description(c))),
            ])
        })
        .collect();
    Node::Obj(vec![
        ("service_code", text(&s.action.service)),
        ("attributes", Node::List("attribute", attributes)),
    ])
}

/// Checks a collected value as the phone would: digits only, the allowed length, the
/// pattern if any.
fn collect_value_ok(c: &Collect, value: &str) -> bool {
    let n = value.chars().count();
    if !value.chars().all(|ch| ch.is_ascii_digit()) || n < c.min_digits || n > c.max_digits {
        return false;
    }
    match &c.pattern {
        None => true,
        // The menu checker has compiled every pattern; one that fails here matches nothing.
        Some(p) => regex::Regex::new(p).is_ok_and(|re| re.is_match(value)),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests (tickets)

fn iso(t: OffsetDateTime) -> Option<String> {
    t.to_offset(UtcOffset::UTC).format(&Rfc3339).ok()
}

/// The public view of a ticket: the spec's fields, no personal data. `media_url` is only ever
/// media a client posted (an absolute http(s) URL); a caller's recording never appears.
fn request_node(t: &PublicTicket) -> Node<'_> {
    Node::Obj(vec![
        ("service_request_id", text(t.service_request_id.to_string())),
        ("status", text(t.status.as_str())),
        ("status_notes", opt_text(t.status_notes.as_deref())),
        ("service_name", text(t.service_name.as_str())),
        ("service_code", text(t.service_code.as_str())),
        ("description", opt_text(t.description.as_deref())),
        (
            "agency_responsible",
            opt_text(t.agency_responsible.as_deref()),
        ),
        ("service_notice", opt_text(t.service_notice.as_deref())),
        ("requested_datetime", Node::Time(Some(t.requested_datetime))),
        ("updated_datetime", Node::Time(Some(t.updated_datetime))),
        ("expected_datetime", Node::Time(t.expected_datetime)),
        ("address", opt_text(t.address.as_deref())),
        ("address_id", opt_text(t.address_id.as_deref())),
        ("zipcode", opt_text(t.zipcode.as_deref())),
        ("lat", Node::Num(t.lat)),
        ("long", Node::Num(t.long)),
        (
            "media_url",
            opt_text(t.media_url.as_deref().filter(|m| absolute_http_url(m))),
        ),
        // The city CRM's number for it, once forwarded (`forward.open311`); null before.
        ("external_id", opt_text(t.external_id.as_deref())),
        // Callers who reported the same problem later and were added to this request
        // instead of filing another (`duplicates` in the menu); 0 if none.
        ("duplicates", Node::Int(t.duplicates.into())),
    ])
}

/// About the JSON of one request in a list, to size the answer's buffer once.
const REQUEST_BYTES: usize = 640;

fn requests_document(format: Format, tickets: &[PublicTicket]) -> Response {
    let items = tickets.iter().map(request_node).collect();
    document_sized(
        format,
        StatusCode::OK,
        "service_requests",
        &Node::List("request", items),
        tickets.len() * REQUEST_BYTES,
    )
}

/// A W3C / RFC 3339 datetime with a time zone; seconds may be left out. A space is read as
/// the `+` of an offset that was not percent-encoded.
fn parse_datetime(raw: &str) -> Option<OffsetDateTime> {
    let s = raw.trim().replace(' ', "+");
    let s = if s.get(13..14) == Some(":") && s.len() > 16 && s.get(16..17) != Some(":") {
        // YYYY-MM-DDThh:mmTZD
        format!("{}:00{}", s.get(..16)?, s.get(16..)?)
    } else {
        s
    };
    let t = OffsetDateTime::parse(&s, &Rfc3339).ok()?;
    // The store keeps four-digit UTC years.
    let year = t.to_offset(UtcOffset::UTC).year();
    (0..=9999).contains(&year).then_some(t)
}

fn parse_id(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The store query for `GET requests`, or every 400 found.
fn requests_query(params: &Params, now: OffsetDateTime) -> Result<TicketQuery, ApiError> {
    let mut problems = Problems::default();
    let ids = params.list("service_request_id");
    if !ids.is_empty() {
        // It overrides every other argument.
        let mut parsed = Vec::new();
        for id in &ids {
            match parse_id(id) {
                Some(n) => parsed.push(n),
                None => problems.add(format!(
                    "service_request_id {id:?} is not a service request number"
                )),
            }
        }
        if ids.len() > MAX_FILTER_VALUES {
            problems.add(format!(
                "at most {MAX_FILTER_VALUES} service_request_id values per query"
            ));
        }
        problems.into_result()?;
        return Ok(TicketQuery {
            ids: parsed,
            limit: Some(MAX_RESULTS),
            ..TicketQuery::default()
        });
    }

    let codes: Vec<String> = params
        .list("service_code")
        .into_iter()
        .map(str::to_owned)
        .collect();
    if codes.len() > MAX_FILTER_VALUES {
        problems.add(format!(
            "at most {MAX_FILTER_VALUES} service_code values per query"
        ));
    }

    let mut open = false;
    let mut closed = false;
    for s in params.list("status") {
        match s.parse::<Status>() {
            Ok(Status::Open) => open = true,
            Ok(Status::Closed) => closed = true,
            Err(_) => problems.add(format!("status {s:?} is not open or closed")),
        }
    }
    let status = match (open, closed) {
        (true, false) => Some(Status::Open),
        (false, true) => Some(Status::Closed),
        _ => None,
    };

    let mut date = |name: &str| {
        let raw = params.get(name)?;
        let parsed = parse_datetime(raw);
        if parsed.is_none() {
            problems.add(format!(
                "{name} {raw:?} is not a W3C datetime with a time zone, e.g. 2010-01-01T00:00:00Z"
            ));
        }
        parsed
    };
    let start = date("start_date");
    let end = date("end_date");
    let span = Duration::days(MAX_SPAN_DAYS);
    let given_start = params.get("start_date").is_some();
    let given_end = params.get("end_date").is_some();
    let (start, end) = match (start, end) {
        (Some(s), Some(e)) => {
            if e < s {
                problems.add("end_date is before start_date".to_string());
            } else if e - s > span {
                problems.add(format!(
                    "start_date to end_date may not span more than {MAX_SPAN_DAYS} days"
                ));
            }
            (Some(s), Some(e))
        }
        (Some(s), None) if !given_end => (Some(s), s.checked_add(span)),
        (None, Some(e)) if !given_start => (e.checked_sub(span), Some(e)),
        (None, None) if !given_start && !given_end => (now.checked_sub(span), None),
        // A bad date was reported above.
        _ => (None, None),
    };
    problems.into_result()?;
    Ok(TicketQuery {
        ids: Vec::new(),
        service_codes: codes,
        status,
        start,
        end,
        limit: Some(MAX_RESULTS),
    })
}

/// The index of the configured key `given` is, if any. Every key is compared, each as a
/// digest in constant time ([`crate::api::same_secret`]), so the time taken says nothing about
/// which key, or how much of one, was right.
fn api_key_index(given: &str, keys: &[String]) -> Option<usize> {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| !k.is_empty())
        .fold(None, |found, (i, k)| {
            let same = crate::api::same_secret(given, k);
            found.or(same.then_some(i))
        })
}

fn absolute_http_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://"))
        && s.len() > "http://".len()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn owned(s: Option<&str>) -> Option<String> {
    s.map(str::to_owned)
}

/// Reads one of `lat`/`long`, adding a problem when it is not a number in range.
fn coordinate(params: &Params, name: &str, max: f64, problems: &mut Problems) -> Option<f64> {
    let raw = params.get(name)?;
    match raw.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v.abs() <= max => Some(v),
        _ => {
            problems.add(format!(
                "{name} {raw:?} is not a WGS84 coordinate between -{max} and {max}"
            ));
            None
        }
    }
}

/// Whether a text field may hold line breaks and tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lines {
    /// One line: no control character at all.
    One,
    /// Line breaks (CR, LF) and tabs allowed; no other control character.
    Many,
}

/// The free-text fields a `POST requests` may carry: the longest value of each, in
/// characters, and whether it may span lines. Control characters (an escape sequence, NUL,
/// DEL) are refused in all of them: they are nothing a resident types, and they would reach
/// staff terminals and other systems.
const TEXT_FIELDS: &[(&str, usize, Lines)] = &[
    ("description", MAX_DESCRIPTION_CHARS, Lines::Many),
    ("address_string", 500, Lines::Many),
    ("address_id", 100, Lines::One),
    ("email", 254, Lines::One),
    ("first_name", 100, Lines::One),
    ("last_name", 100, Lines::One),
    ("phone", 32, Lines::One),
    ("account_id", 100, Lines::One),
    ("device_id", 100, Lines::One),
    ("media_url", 2000, Lines::One),
];

/// Checks the text fields against [`TEXT_FIELDS`] and the forms of `phone` and `email`.
fn check_text_fields(params: &Params, problems: &mut Problems) {
    for &(name, max, lines) in TEXT_FIELDS {
        let Some(v) = params.get(name) else { continue };
        let n = v.chars().count();
        if n > max {
            problems.add(format!(
                "{name} is {n} characters; at most {max} are allowed"
            ));
        }
        let allowed = |c: char| lines == Lines::Many && matches!(c, '\n' | '\r' | '\t');
        if v.chars().any(|c| c.is_control() && !allowed(c)) {
            problems.add(format!("{name} contains control characters"));
        }
    }
    if let Some(p) = params.get("phone") {
        let ok_chars = p
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '(' | ')' | '.'));
        if !ok_chars || !p.chars().any(|c| c.is_ascii_digit()) {
            problems.add(format!(
                "phone {p:?} is not a phone number (digits, spaces and + - ( ) . only)"
            ));
        }
    }
    if let Some(e) = params.get("email") {
        let ok = e.split_once('@').is_some_and(|(user, domain)| {
            !user.is_empty() && !domain.is_empty() && !domain.contains('@')
        }) && !e.chars().any(char::is_whitespace);
        if !ok {
            problems.add(format!("email {e:?} is not an email address"));
        }
    }
}

/// Collected fields that say where the problem is (as the phone asks for them).
fn is_location_field(field: &str) -> bool {
    matches!(field, "zipcode" | "address")
}

/// The ticket a `POST requests` asks for (after the key and jurisdiction checks), or the
/// errors: 400 for missing or invalid input, 404 for an unknown service.
///
/// A location is required, as GeoReport v2 asks: `lat` and `long`, `address_string`,
/// `address_id`, or one of the service's location attributes (`attribute[zipcode]`, which the
/// phone asks every caller for). The ZIP code is therefore needed only when nothing else says
/// where the problem is.
///
/// `temporary`: the services of the announcements active now, taken as the menu's own.
fn new_ticket_with(
    file: &MenuFile,
    temporary: &[Service],
    params: &Params,
) -> Result<NewTicket, ApiError> {
    let Some(code) = params.get("service_code") else {
        return Err(ApiError::bad_request(
            "service_code was not provided".to_string(),
        ));
    };
    let found = find_service(file, code.trim()).or_else(|| {
        (temporary.iter())
            .find(|s| s.action.service == code.trim())
            .cloned()
    });
    let Some(service) = found else {
        return Err(ApiError::not_found(format!(
            "service_code {code:?} not found"
        )));
    };
    let mut problems = Problems::default();
    check_text_fields(params, &mut problems);

    let lat = coordinate(params, "lat", 90.0, &mut problems);
    let long = coordinate(params, "long", 180.0, &mut problems);
    let lat_given = params.get("lat").is_some();
    let long_given = params.get("long").is_some();
    if lat_given != long_given {
        problems.add("lat and long must be given together".to_string());
    }
    let address = params.get("address_string");
    let mut address_id = params.get("address_id").map(str::to_owned);
    let collect = &steps(file, &service.action).collect;
    let attributes = params.attributes();
    let attribute = |field: &str| {
        attributes
            .iter()
            .find(|(code, _)| *code == field)
            .map(|(_, v)| v.trim())
    };
    let location_attributes: Vec<&Collect> = collect
        .iter()
        .filter(|c| is_location_field(&c.field))
        .collect();
    let located = lat_given
        || long_given
        || address.is_some()
        || address_id.is_some()
        || location_attributes
            .iter()
            .any(|c| attribute(&c.field).is_some());
    if !located {
        let mut choices = "lat and long, address_string, address_id".to_string();
        for c in &location_attributes {
            let _ = write!(
                choices,
                ", or attribute[{}] ({})",
                c.field,
                datatype_description(c)
            );
        }
        problems.add(format!("a location is required: {choices}"));
    }

    let media_url = params.get("media_url");
    if let Some(m) = media_url {
        if !absolute_http_url(m) {
            problems.add(format!("media_url {m:?} is not an absolute http(s) URL"));
        }
    }

    let mut zipcode = None;
    for c in collect {
        match attribute(&c.field) {
            // A missing location attribute was reported above if nothing else located it.
            None if !c.optional && !is_location_field(&c.field) => problems.add(format!(
                "attribute[{}] is required: {}",
                c.field,
                datatype_description(c)
            )),
            None => {}
            Some(v) if !collect_value_ok(c, v) => problems.add(format!(
                "attribute[{}] {v:?} is not valid: {}",
                c.field,
                datatype_description(c)
            )),
            Some(v) => match c.field.as_str() {
                "zipcode" => zipcode = Some(v.to_owned()),
                "address" if address_id.is_none() => address_id = Some(v.to_owned()),
                _ => {}
            },
        }
    }
    problems.into_result()?;

    let a = service.action;
    Ok(NewTicket {
        service_code: a.service,
        service_name: a.name,
        description: owned(params.get("description")),
        agency_responsible: a.agency,
        service_notice: None,
        zipcode,
        house_number: None,
        address: owned(address),
        address_id,
        lat,
        long,
        phone: owned(params.get("phone")),
        email: owned(params.get("email")),
        first_name: owned(params.get("first_name")),
        last_name: owned(params.get("last_name")),
        media_url: owned(media_url),
        recording: None,
        channel: Channel::Web,
        language: None,
        call_id: None,
        callback_requested: false,
        agent_id: None,
    })
}

/// [`new_ticket_with`] without temporary services.
#[cfg(test)]
fn new_ticket(file: &MenuFile, params: &Params) -> Result<NewTicket, ApiError> {
    new_ticket_with(file, &[], params)
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// `/{name}.{format}`: discovery, services, requests.
async fn top_level(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (name, format) = match path_file(path, &uri) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let params = Params::parse(query.as_deref().unwrap_or("").as_bytes());
    let is_get = method == Method::GET || method == Method::HEAD;
    let result = match name.as_str() {
        "discovery" if is_get => Ok(discovery(&state, format).await),
        "services" if is_get => service_list(&state, &params, format),
        "requests" if is_get => list_requests(&state, &params, format).await,
        "requests" if method == Method::POST => post_request(&state, &headers, body, format).await,
        "discovery" | "services" => return method_not_allowed(format, "GET, HEAD"),
        "requests" => return method_not_allowed(format, "GET, HEAD, POST"),
        other => Err(ApiError::not_found(format!("no such resource: {other}"))),
    };
    result.unwrap_or_else(|e| e.respond(format))
}

/// `GET services/{code}.{format}`.
async fn service_definition(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let (code, format) = match path_file(path, &uri) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed(format, "GET, HEAD");
    }
    let params = Params::parse(query.as_deref().unwrap_or("").as_bytes());
    let result = check_jurisdiction(&state, &params).and_then(|()| {
        let menu = state.menu.get();
        let service = find_service(&menu.file, &code)
            .or_else(|| (temporary_services(&state).into_iter()).find(|s| s.action.service == code))
            .ok_or_else(|| ApiError::not_found(format!("service_code {code:?} not found")))?;
        Ok(document(
            format,
            StatusCode::OK,
            "service_definition",
            &definition_node(&menu.file, &service),
        ))
    });
    result.unwrap_or_else(|e| e.respond(format))
}

/// `GET requests/{id}.{format}`.
async fn one_request(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let (id, format) = match path_file(path, &uri) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed(format, "GET, HEAD");
    }
    let params = Params::parse(query.as_deref().unwrap_or("").as_bytes());
    if let Err(e) = check_jurisdiction(&state, &params) {
        return e.respond(format);
    }
    let not_found = || ApiError::not_found(format!("service_request_id {id:?} not found"));
    let Some(n) = parse_id(&id) else {
        return not_found().respond(format);
    };
    match state.tickets.get(n).await {
        Ok(Some(t)) => requests_document(format, &[PublicTicket::from(t)]),
        Ok(None) => not_found().respond(format),
        Err(e) => ApiError::store("get", &e).respond(format),
    }
}

/// When the menu file last changed (services and definitions come from it).
async fn changeset(state: &ApiState) -> String {
    static STARTED: OnceLock<OffsetDateTime> = OnceLock::new();
    let path = state.menu.get().path.clone();
    let modified = tokio::fs::metadata(&path)
        .await
        .and_then(|m| m.modified())
        .ok()
        .map(OffsetDateTime::from);
    let t = modified.unwrap_or_else(|| *STARTED.get_or_init(OffsetDateTime::now_utc));
    let t = t.to_offset(UtcOffset::UTC);
    iso(t - Duration::nanoseconds(i64::from(t.nanosecond()))).unwrap_or_default()
}

async fn discovery(state: &ApiState, format: Format) -> Response {
    let changeset = changeset(state).await;
    let url = match state.open311.public_url.as_deref() {
        Some(base) => format!("{}{BASE_PATH}", base.trim_end_matches('/')),
        None => BASE_PATH.to_string(),
    };
    let endpoint = Node::Obj(vec![
        ("specification", text(SPECIFICATION)),
        ("url", text(url)),
        ("changeset", text(&changeset)),
        ("type", text("production")),
        (
            "formats",
            Node::List("format", vec![text("text/xml"), text("application/json")]),
        ),
    ]);
    let doc = Node::Obj(vec![
        ("changeset", text(&changeset)),
        (
            "contact",
            text("Call 311 for non-emergency city services. In an emergency, dial 911."),
        ),
        (
            "key_service",
            text(
                "API keys for posting service requests are issued by the city's 311 \
                 administrators; reading services and requests needs no key.",
            ),
        ),
        ("endpoints", Node::List("endpoint", vec![endpoint])),
    ]);
    document(format, StatusCode::OK, "discovery", &doc)
}

fn service_list(state: &ApiState, params: &Params, format: Format) -> Result<Response, ApiError> {
    check_jurisdiction(state, params)?;
    let menu = state.menu.get();
    let mut list = services(&menu.file);
    for t in temporary_services(state) {
        if !list.iter().any(|s| s.action.service == t.action.service) {
            list.push(t);
        }
    }
    let items = list.iter().map(|s| service_node(&menu.file, s)).collect();
    Ok(document(
        format,
        StatusCode::OK,
        "services",
        &Node::List("service", items),
    ))
}

async fn list_requests(
    state: &ApiState,
    params: &Params,
    format: Format,
) -> Result<Response, ApiError> {
    check_jurisdiction(state, params)?;
    let query = requests_query(params, OffsetDateTime::now_utc())?;
    let tickets = state
        .tickets
        .list_public(&query)
        .await
        .map_err(|e| match e {
            StoreError::TooManyFilterValues { .. } => {
                ApiError::bad_request(format!("too many filter values: {e}"))
            }
            e => ApiError::store("list", &e),
        })?;
    Ok(requests_document(format, &tickets))
}

fn is_form(headers: &HeaderMap) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        // Clients that send no type get their body read as a form all the same.
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.split(';').next())
            .is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            }),
    }
}

async fn post_request(
    state: &ApiState,
    headers: &HeaderMap,
    body: Body,
    format: Format,
) -> Result<Response, ApiError> {
    if !is_form(headers) {
        return Err(ApiError::bad_request(
            "the body must be application/x-www-form-urlencoded".to_string(),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        })?;
    let params = Params::parse(&bytes);

    let keys = &state.open311.api_keys;
    let key = match params.get("api_key") {
        None => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "api_key was not provided".to_string(),
            ))
        }
        Some(k) => api_key_index(k, keys).ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid api_key received -- can't proceed with create_request".to_string(),
            )
        })?,
    };
    let allowed = state
        .open311_posts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take(key, std::time::Instant::now());
    if let Err(wait) = allowed {
        tracing::warn!(
            key_index = key,
            "open311: POST rate limit reached for an API key"
        );
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "this api_key may post {} requests a minute; try again later",
                state.open311.post_rate_per_minute
            ),
        );
        e.retry_after = Some(wait.as_secs().max(1));
        return Err(e);
    }
    check_jurisdiction(state, &params)?;
    let new = {
        let menu = state.menu.get();
        new_ticket_with(&menu.file, &temporary_services(state), &params)?
    };
    let ticket = state.tickets.file(new).await.map_err(|e| match e {
        StoreError::InvalidCoordinates { .. } => {
            ApiError::bad_request(format!("invalid location: {e}"))
        }
        e => ApiError::store("file", &e),
    })?;
    let response = Node::Obj(vec![
        (
            "service_request_id",
            text(ticket.service_request_id.to_string()),
        ),
        ("service_notice", opt_text(ticket.service_notice.as_deref())),
        ("account_id", opt_text(params.get("account_id"))),
    ]);
    Ok(document(
        format,
        StatusCode::OK,
        "service_requests",
        &Node::List("request", vec![response]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Params {
        Params::parse(q.as_bytes())
    }

    #[test]
    fn documents_agree_in_json_and_xml() {
        let doc = Node::List(
            "request",
            vec![Node::Obj(vec![
                ("id", text("12345678")),
                ("none", Node::Text(None)),
                ("lat", Node::Num(Some(37.5))),
                ("long", Node::Num(Some(f64::NAN))),
                ("ok", Node::Bool(true)),
                ("n", Node::Int(3)),
                ("s", text("<a & 'b'> \"c\"\r\n\u{0}é🚧")),
            ])],
        );
        let mut json = String::new();
        doc.write_json(&mut json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["id"], "12345678");
        assert!(v[0]["none"].is_null());
        assert_eq!(v[0]["lat"], 37.5);
        assert!(v[0]["long"].is_null());
        assert_eq!(v[0]["s"], "<a & 'b'> \"c\"\r\n\u{0}é🚧");
        let mut xml = String::new();
        doc.write_xml("service_requests", &mut xml);
        assert_eq!(
            xml,
            "<service_requests><request><id>12345678</id><none/><lat>37.5</lat><long/>\
             <ok>true</ok><n>3</n>\
             <s>&lt;a &amp; &apos;b&apos;&gt; &quot;c&quot;&#13;\n\u{FFFD}é🚧</s>\
             </request></service_requests>"
        );
    }

    /// Strings a client can post (or a CRM send back), JSON-escaped as serde_json does.
    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        let mut hostile: Vec<String> = [
            "",
            "plain text",
            "\"quoted\" and \\back\\slashed\\",
            "\\\"",
            "line\nbreak\r\ntab\tform\u{c}back\u{8}",
            "\u{0}\u{1}\u{1f}\u{7f}\u{80}\u{9f}",
            "line\u{2028}separator\u{2029}paragraph",
            "non-BMP 🚧 𝄞 \u{10FFFF}",
            "replacement \u{FFFD} \u{FFFE} \u{FFFF} \u{FEFF}",
            "é à ü ñ 中文 Ω",
            "</script><!-- & ' \" -->",
            "ends with a control\u{1b}",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        hostile.push((0u8..0x80).map(char::from).collect());
        hostile.push(hostile.concat());
        for s in &hostile {
            let mut out = String::from("x");
            json_string(s, &mut out);
            assert_eq!(out[1..], serde_json::to_string(s).unwrap(), "{s:?}");
            let text: Node = text(s.as_str());
            let mut doc = String::new();
            text.write_json(&mut doc);
            assert_eq!(serde_json::from_str::<String>(&doc).unwrap(), *s);
        }
    }

    /// The same strings in XML, against the escaping rules spelt out one character at a time.
    #[test]
    fn xml_text_is_escaped_character_by_character() {
        fn reference(s: &str) -> String {
            s.chars()
                .map(|c| match c {
                    '&' => "&amp;".to_string(),
                    '<' => "&lt;".to_string(),
                    '>' => "&gt;".to_string(),
                    '"' => "&quot;".to_string(),
                    '\'' => "&apos;".to_string(),
                    '\r' => "&#13;".to_string(),
                    '\t' | '\n' => c.to_string(),
                    c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                        '\u{FFFD}'.to_string()
                    }
                    c => c.to_string(),
                })
                .collect()
        }
        let mut hostile: Vec<String> = [
            "",
            "plain",
            "<a & 'b'> \"c\"",
            "&amp; is already escaped",
            "\r\n\t\u{0}\u{1f}\u{7f}",
            "\u{FFFE}\u{FFFF}\u{FFFD}\u{FEFF}",
            "line\u{2028}separator 🚧 𝄞 中文",
            "ends with <",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        hostile.push((0u8..0x80).map(char::from).collect());
        hostile.push(hostile.concat());
        for s in &hostile {
            let mut out = String::from("x");
            xml_escape(s, &mut out);
            assert_eq!(out[1..], reference(s), "{s:?}");
        }
    }

    #[test]
    fn numbers_are_written_as_serde_json_writes_them() {
        for n in [
            0.0,
            -0.0,
            37.5,
            40.712_776,
            -74.005_974,
            0.1 + 0.2,
            1e-7,
            123_456_789.0,
            1e21,
            f64::MIN_POSITIVE,
            f64::MAX,
            -90.0,
            180.0,
        ] {
            let mut out = String::new();
            Node::Num(Some(n)).write_json(&mut out);
            assert_eq!(out, serde_json::to_string(&n).unwrap(), "{n}");
        }
        for n in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut out = String::new();
            Node::Num(Some(n)).write_json(&mut out);
            assert_eq!(out, "null");
        }
    }

    /// Datetimes read as `time`'s RFC 3339 formatter writes them, in UTC.
    #[test]
    fn datetimes_are_written_as_rfc3339_in_utc() {
        use time::macros::datetime;
        let generic = |t: OffsetDateTime| t.to_offset(UtcOffset::UTC).format(&Rfc3339).ok();
        let mut times = vec![
            datetime!(2026-11-26 03:22:09 UTC),
            datetime!(2026-11-26 03:22:09.75 UTC),
            datetime!(2026-11-26 03:22:09.000_000_001 UTC),
            datetime!(2024-02-29 23:59:59 UTC),
            datetime!(2026-11-26 22:30:00 -05:00),
            datetime!(2026-01-01 00:30:00 +01:00),
            datetime!(0000-01-01 00:00:00 UTC),
            datetime!(0999-12-31 23:59:59 UTC),
            datetime!(9999-12-31 23:59:59 UTC),
        ];
        // Every day of a few years, at a second that moves through the day.
        let mut t = datetime!(1999-12-25 00:00:00 UTC);
        for i in 0..5 * 366 {
            times.push(t);
            t += Duration::seconds(86_400 + 3_607 * (i % 24) + i % 60);
        }
        for t in times {
            let fast = Rfc3339Text::new(t).map(|r| r.as_str().to_owned());
            assert_eq!(fast, generic(t), "{t}");
            let mut json = String::new();
            Node::Time(Some(t)).write_json(&mut json);
            assert_eq!(json, format!("\"{}\"", generic(t).unwrap()));
        }
        // Years RFC 3339 cannot carry are null, as the generic formatter fails on them.
        for t in [
            datetime!(-0001-12-31 23:59:59 UTC),
            datetime!(0000-01-01 00:30:00 +01:00),
        ] {
            assert!(Rfc3339Text::new(t).is_none(), "{t}");
            assert_eq!(generic(t), None);
            let mut json = String::new();
            Node::Time(Some(t)).write_json(&mut json);
            assert_eq!(json, "null");
            let mut xml = String::new();
            Node::Time(Some(t)).write_xml("t", &mut xml);
            assert_eq!(xml, "<t/>");
        }
        let mut xml = String::new();
        Node::Time(Some(datetime!(2026-11-26 03:22:09 UTC))).write_xml("t", &mut xml);
        Node::Time(None).write_xml("u", &mut xml);
        assert_eq!(xml, "<t>2026-11-26T03:22:09Z</t><u/>");
    }

    /// 1,000 requests as a generated store holds them (a closing note on most, coordinates
    /// on some).
    fn thousand_requests() -> Vec<PublicTicket> {
        let at = time::macros::datetime!(2026-11-26 03:22:09 UTC);
        (0..1000u64)
            .map(|i| PublicTicket {
                service_request_id: 12_345_678 + i,
                status: if i % 8 == 0 {
                    Status::Open
                } else {
                    Status::Closed
                },
                status_notes: (i % 8 != 0).then(|| "Repaired by the street crew.".into()),
                service_name: "Pothole".into(),
                service_code: "pothole".into(),
                description: Some(format!("A deep pothole in the right lane, report {i}")),
                agency_responsible: Some("Department of Transportation".into()),
                service_notice: None,
                requested_datetime: at - Duration::minutes(i as i64),
                updated_datetime: at,
                expected_datetime: (i % 3 == 0).then_some(at + Duration::days(7)),
                address: Some("1200, ZIP 94103".into()),
                address_id: None,
                zipcode: Some("94103".into()),
                lat: (i % 2 == 0).then_some(37.774_929 + i as f64 * 1e-6),
                long: (i % 2 == 0).then_some(-122.419_416),
                media_url: None,
                external_id: None,
                duplicates: u32::from(i % 5 == 0),
            })
            .collect()
    }

    /// What writing an answer of 1,000 requests costs, JSON and XML. A measurement, not an
    /// assertion: `cargo test --release --lib writing_1000_requests -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "measurement: run in a release build"]
    async fn writing_1000_requests() {
        let tickets = thousand_requests();
        for format in [Format::Json, Format::Xml] {
            let mut times = Vec::new();
            let mut bytes = 0;
            for _ in 0..300 {
                let t = std::time::Instant::now();
                let r = requests_document(format, &tickets);
                let body = axum::body::to_bytes(r.into_body(), usize::MAX)
                    .await
                    .unwrap();
                times.push(t.elapsed());
                bytes = body.len();
            }
            times.sort();
            let ms =
                |q: f64| times[((times.len() as f64 * q) as usize).min(299)].as_secs_f64() * 1e3;
            println!(
                "{format:?}: {bytes} bytes, p50 {:.2} ms, p99 {:.2} ms",
                ms(0.5),
                ms(0.99)
            );
        }
    }

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(
            split_format("services.json").unwrap(),
            ("services", Format::Json)
        );
        assert_eq!(split_format("12.XML").unwrap(), ("12", Format::Xml));
        assert_eq!(
            split_format("services.csv").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        assert!(split_format("services").is_err());
    }

    #[test]
    fn datetimes_need_a_zone() {
        let t = parse_datetime("2010-01-01T00:00:00Z").unwrap();
        assert_eq!(t.unix_timestamp(), 1_262_304_000);
        assert_eq!(
            parse_datetime("2010-01-01T05:00:00 05:00").unwrap(),
            parse_datetime("2010-01-01T00:00:00+00:00").unwrap()
        );
        assert_eq!(parse_datetime("2010-01-01T00:00Z").unwrap(), t);
        assert!(parse_datetime("2010-01-01T00:00:00").is_none());
        assert!(parse_datetime("2010-01-01").is_none());
        assert!(parse_datetime("yesterday").is_none());
        assert!(parse_datetime("é").is_none());
        assert!(parse_datetime("0000-01-01T00:00:00+01:00").is_none());
    }

    #[test]
    fn query_defaults_and_limits() {
        let now = parse_datetime("2026-06-01T00:00:00Z").unwrap();
        let q = requests_query(&params("status=&service_code="), now).unwrap();
        assert_eq!(q.start, now.checked_sub(Duration::days(90)));
        assert_eq!(q.end, None);
        assert_eq!(q.status, None);
        assert!(q.service_codes.is_empty());
        assert_eq!(q.limit, Some(MAX_RESULTS));

        let q = requests_query(&params("status=open,closed"), now).unwrap();
        assert_eq!(q.status, None);
        let q = requests_query(&params("status=closed&service_code=a,b"), now).unwrap();
        assert_eq!(q.status, Some(Status::Closed));
        assert_eq!(q.service_codes, vec!["a", "b"]);

        let q = requests_query(
            &params("service_request_id=12345678,%2087654321&status=bogus"),
            now,
        )
        .unwrap();
        assert_eq!(q.ids, vec![12345678, 87654321]);
        assert_eq!(q.start, None);

        let e = requests_query(
            &params("start_date=2026-01-01T00:00:00Z&end_date=2026-04-02T00:00:00Z"),
            now,
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = requests_query(&params("status=pending&start_date=x"), now).unwrap_err();
        assert_eq!(e.descriptions.len(), 2, "{e:?}");
        assert!(requests_query(&params("service_request_id=abc"), now).is_err());
    }

    #[test]
    fn api_keys_must_match_exactly() {
        let keys = vec!["k1".to_string(), String::new(), "other".to_string()];
        assert_eq!(api_key_index("k1", &keys), Some(0));
        assert_eq!(api_key_index("other", &keys), Some(2));
        assert_eq!(api_key_index("k", &keys), None);
        assert_eq!(api_key_index("k1 ", &keys), None);
        assert_eq!(api_key_index("", &keys), None);
        assert_eq!(api_key_index("k1", &[]), None);
    }

    fn pothole_menu() -> MenuFile {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("menus/311.yaml"),
        )
        .unwrap();
        serde_yaml::from_str(&text).unwrap()
    }

    #[test]
    fn any_location_will_do_and_the_zip_only_without_one() {
        let menu = pothole_menu();
        let base = "service_code=pothole";
        for loc in [
            "lat=37.76&long=-122.42",
            "address_string=1%20Main%20St",
            "address_id=545483",
            "attribute[zipcode]=94103",
        ] {
            let t = new_ticket(&menu, &params(&format!("{base}&{loc}")))
                .unwrap_or_else(|e| panic!("{loc}: {e:?}"));
            assert_eq!(t.channel, Channel::Web);
        }
        let e = new_ticket(&menu, &params(base)).unwrap_err();
        assert_eq!(e.descriptions.len(), 1, "{e:?}");
        assert!(
            e.descriptions[0].starts_with("a location is required")
                && e.descriptions[0].contains("attribute[zipcode]"),
            "{e:?}"
        );
        // A ZIP given with another location must still be a ZIP.
        let e = new_ticket(
            &menu,
            &params(&format!("{base}&lat=1&long=2&attribute[zipcode]=9410a")),
        )
        .unwrap_err();
        assert!(e.descriptions[0].contains("attribute[zipcode]"), "{e:?}");
    }

    #[test]
    fn text_fields_have_limits_and_no_control_characters() {
        let menu = pothole_menu();
        let ok = "service_code=pothole&lat=37.76&long=-122.42";
        let long = |n: usize| "a".repeat(n);
        for (field, max) in [
            ("address_string", 500),
            ("address_id", 100),
            ("first_name", 100),
            ("last_name", 100),
            ("account_id", 100),
            ("device_id", 100),
        ] {
            let at = format!("{ok}&{field}={}", long(max));
            assert!(new_ticket(&menu, &params(&at)).is_ok(), "{field} at {max}");
            let over = format!("{ok}&{field}={}", long(max + 1));
            let e = new_ticket(&menu, &params(&over)).unwrap_err();
            assert!(e.descriptions[0].starts_with(field), "{e:?}");
        }
        for (field, value) in [
            ("first_name", "Eve%1B%5B2J"),
            ("last_name", "a%0Ab"),
            ("address_id", "1%00"),
            ("phone", "555%1B]0;x%07"),
            ("description", "hi%1B%5B31m"),
            ("address_string", "x%7F"),
            ("email", "a@b%C2%9B"),
        ] {
            let e = new_ticket(&menu, &params(&format!("{ok}&{field}={value}"))).unwrap_err();
            assert!(
                e.descriptions
                    .iter()
                    .any(|d| d == &format!("{field} contains control characters")),
                "{field}: {e:?}"
            );
        }
        // Line breaks and tabs are text in a description or an address.
        let multi = format!("{ok}&description=a%0D%0Ab%09c&address_string=1%20Main%0AApt%202");
        assert!(new_ticket(&menu, &params(&multi)).is_ok());
        for bad in [
            "phone=call%20me",
            "phone=%2B%2B",
            "email=nobody",
            "email=a%20b@c",
        ] {
            assert!(
                new_ticket(&menu, &params(&format!("{ok}&{bad}"))).is_err(),
                "{bad}"
            );
        }
        let good = format!("{ok}&phone=%2B1%20(415)%20555-0100&email=a.b@city.gov");
        assert!(new_ticket(&menu, &params(&good)).is_ok());
    }

    #[test]
    fn media_urls() {
        assert!(absolute_http_url("https://example.org/a.jpg"));
        assert!(absolute_http_url("HTTP://example.org/a.jpg"));
        assert!(!absolute_http_url("javascript:alert(1)"));
        assert!(!absolute_http_url("/recordings/x.wav"));
        assert!(!absolute_http_url("http://"));
        assert!(!absolute_http_url("http://a b"));
    }
}
