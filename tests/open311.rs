//! Integration: the Open311 GeoReport v2 API of the real server (port 0), over real HTTP, in
//! JSON and XML. XML is parsed (roxmltree) and compared element by element, never as text.

mod common;

use common::*;
use ivr311::config::FileConfig;
use ivr311::dispatch::tickets::{Channel, NewTicket, Status, Ticket, TicketQuery, TicketStore};
use ivr311::menu::engine::{GENERAL_SERVICE, GENERAL_SERVICE_NAME};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BASE: &str = "/open311/v2";
const KEY: &str = "k1";
const JSON: &str = "application/json; charset=utf-8";
const XML: &str = "text/xml; charset=utf-8";
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        assert_eq!(self.header("content-type"), Some(JSON), "{}", self.body);
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn xml(&self) -> roxmltree::Document<'_> {
        assert_eq!(self.header("content-type"), Some(XML), "{}", self.body);
        assert!(
            self.body
                .starts_with("<?xml version=\"1.0\" encoding=\"utf-8\"?>"),
            "{}",
            self.body
        );
        roxmltree::Document::parse(&self.body)
            .unwrap_or_else(|e| panic!("not XML ({e}): {}", self.body))
    }
}

async fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = s.write_all(body).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP response head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk_bytes(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8(body).expect("UTF-8 body"),
    }
}

fn dechunk_bytes(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..pos]).unwrap_or("");
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        rest = &rest[pos + 2..];
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        rest = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    fetch(addr, "GET", &format!("{BASE}{path}"), &[], b"").await
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut f = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        f.append_pair(k, v);
    }
    f.finish()
}

async fn post(addr: SocketAddr, fmt: &str, pairs: &[(&str, &str)]) -> Resp {
    post_raw(addr, fmt, form(pairs).as_bytes()).await
}

async fn post_raw(addr: SocketAddr, fmt: &str, body: &[u8]) -> Resp {
    fetch(
        addr,
        "POST",
        &format!("{BASE}/requests.{fmt}"),
        &[("Content-Type", FORM)],
        body,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Reading responses

/// The text of `node`'s child element `name` (`""` for an empty element), if present.
fn child<'a>(node: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .map(|c| c.text().unwrap_or(""))
}

fn elements<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    node.children().filter(|c| c.has_tag_name(name)).collect()
}

/// Checks the spec's error array in either format: every error has `code` = the status
/// and a description. Returns the descriptions.
fn assert_error(r: &Resp, fmt: &str, status: u16) -> Vec<String> {
    assert_eq!(r.status, status, "{}", r.body);
    if fmt == "json" {
        let v = r.json();
        let errors = v.as_array().expect("an array of errors");
        assert!(!errors.is_empty());
        errors
            .iter()
            .map(|e| {
                assert_eq!(e["code"], u64::from(status), "{e}");
                let d = e["description"].as_str().expect("a description");
                assert!(!d.is_empty());
                d.to_owned()
            })
            .collect()
    } else {
        let doc = r.xml();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "errors");
        let errors = elements(root, "error");
        assert!(!errors.is_empty());
        errors
            .iter()
            .map(|e| {
                assert_eq!(child(*e, "code"), Some(status.to_string().as_str()));
                let d = child(*e, "description").expect("a description");
                assert!(!d.is_empty());
                d.to_owned()
            })
            .collect()
    }
}

/// The spec's request fields as strings (`None` for JSON null / an empty XML element), in
/// the JSON of one request object, and our `external_id` (the city CRM's number, once
/// forwarded) and `duplicates` (later callers added to it).
const REQUEST_FIELDS: &[&str] = &[
    "service_request_id",
    "status",
    "status_notes",
    "service_name",
    "service_code",
    "description",
    "agency_responsible",
    "service_notice",
    "requested_datetime",
    "updated_datetime",
    "expected_datetime",
    "address",
    "address_id",
    "zipcode",
    "lat",
    "long",
    "media_url",
    "external_id",
    "duplicates",
];

/// Fields nobody outside may see.
const PRIVATE_FIELDS: &[&str] = &[
    "phone",
    "email",
    "first_name",
    "last_name",
    "call_id",
    "channel",
    "language",
    "callback_requested",
];

type Fields = Vec<(String, Option<String>)>;

/// Coordinates compared as numbers (JSON may write `1.0` where XML writes `1`).
fn norm(field: &str, v: Option<String>) -> Option<String> {
    match field {
        "lat" | "long" => v.map(|s| s.parse::<f64>().expect("a number").to_string()),
        _ => v,
    }
}

fn json_fields(v: &Value) -> Fields {
    let obj = v.as_object().expect("a request object");
    for p in PRIVATE_FIELDS {
        assert!(!obj.contains_key(*p), "{p} must not be exposed: {v}");
    }
    assert_eq!(obj.len(), REQUEST_FIELDS.len(), "{v}");
    REQUEST_FIELDS
        .iter()
        .map(|f| {
            let val = match &v[*f] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                other => panic!("{f}: unexpected {other}"),
            };
            (f.to_string(), norm(f, val))
        })
        .collect()
}

fn xml_fields(node: roxmltree::Node) -> Fields {
    assert_eq!(node.tag_name().name(), "request");
    for p in PRIVATE_FIELDS {
        assert!(child(node, p).is_none(), "{p} must not be exposed");
    }
    assert_eq!(
        node.children().filter(|c| c.is_element()).count(),
        REQUEST_FIELDS.len()
    );
    REQUEST_FIELDS
        .iter()
        .map(|f| {
            let text = child(node, f).unwrap_or_else(|| panic!("no <{f}>"));
            let val = (!text.is_empty()).then(|| text.to_owned());
            (f.to_string(), norm(f, val))
        })
        .collect()
}

/// What a ticket should look like in the public API.
fn expected_fields(t: &Ticket) -> Fields {
    let iso = |t: OffsetDateTime| t.format(&Rfc3339).unwrap();
    let num = |x: Option<f64>| x.map(|x| x.to_string());
    // Only media a client posted (an http(s) URL) is public; never a caller's recording.
    let media = t.media_url.clone().filter(|m| m.starts_with("http"));
    let values = [
        Some(t.service_request_id.to_string()),
        Some(t.status.as_str().to_owned()),
        t.status_notes.clone(),
        Some(t.service_name.clone()),
        Some(t.service_code.clone()),
        t.description.clone(),
        t.agency_responsible.clone(),
        t.service_notice.clone(),
        Some(iso(t.requested_datetime)),
        Some(iso(t.updated_datetime)),
        t.expected_datetime.map(iso),
        t.address.clone(),
        t.address_id.clone(),
        t.zipcode.clone(),
        num(t.lat),
        num(t.long),
        media,
        t.external_id.clone(),
        // Nobody has been added to these requests.
        Some("0".to_owned()),
    ];
    REQUEST_FIELDS
        .iter()
        .map(|f| f.to_string())
        .zip(values)
        .map(|(f, v)| (f, v.filter(|s| !s.is_empty())))
        .collect()
}

/// `GET requests/{id}` in both formats must show exactly `t`'s public fields.
async fn assert_readable(addr: SocketAddr, t: &Ticket) {
    let want = expected_fields(t);
    let r = get(addr, &format!("/requests/{}.json", t.service_request_id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let arr = v.as_array().expect("an array");
    assert_eq!(arr.len(), 1);
    assert!(arr[0]["service_request_id"].is_string(), "id is a string");
    // JSON keeps empty strings as strings; compare with empties as absent like XML.
    let got: Fields = json_fields(&arr[0])
        .into_iter()
        .map(|(f, v)| (f, v.filter(|s| !s.is_empty())))
        .collect();
    assert_eq!(got, want);

    let r = get(addr, &format!("/requests/{}.xml", t.service_request_id)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.xml();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "service_requests");
    let reqs = elements(root, "request");
    assert_eq!(reqs.len(), 1);
    assert_eq!(xml_fields(reqs[0]), want);
}

/// Every ticket in the store.
async fn all_tickets(store: &TicketStore) -> Vec<Ticket> {
    store
        .list(&TicketQuery {
            limit: Some(1_000_000),
            ..TicketQuery::default()
        })
        .await
        .unwrap()
}

/// Posting open to [`KEY`], with no rate limit (tests of the limit set their own).
fn keyed() -> FileConfig {
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![KEY.into()];
    file.open311.post_rate_per_minute = 0;
    file
}

fn pothole_ticket() -> NewTicket {
    NewTicket {
        service_code: "pothole".into(),
        service_name: "Pothole".into(),
        zipcode: Some("94103".into()),
        channel: Channel::Phone,
        ..NewTicket::default()
    }
}

/// A valid pothole POST with `extra` pairs added (later pairs do not replace earlier ones:
/// the server takes the first non-empty value, so put overrides in `extra` only for new
/// names).
fn pothole_post<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("api_key", KEY),
        ("service_code", "pothole"),
        ("attribute[zipcode]", "94103"),
    ];
    v.extend_from_slice(extra);
    v
}

// ---------------------------------------------------------------------------------------------
// Discovery and services

#[tokio::test]
async fn discovery_in_json_and_xml() {
    let mut file = FileConfig::default();
    file.open311.public_url = Some("https://311.example.gov/".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;

    let v = get(a, "/discovery.json").await.json();
    for f in ["changeset", "contact", "key_service"] {
        assert!(!v[f].as_str().unwrap().is_empty(), "{f}");
    }
    let eps = v["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 1);
    let ep = &eps[0];
    assert_eq!(ep["specification"], "http://wiki.open311.org/GeoReport_v2");
    assert_eq!(ep["url"], "https://311.example.gov/open311/v2");
    assert_eq!(ep["type"], "production");
    assert_eq!(ep["changeset"], v["changeset"]);
    assert_eq!(
        ep["formats"],
        serde_json::json!(["text/xml", "application/json"])
    );

    let r = get(a, "/discovery.xml").await;
    assert_eq!(r.status, 200);
    let doc = r.xml();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "discovery");
    assert_eq!(child(root, "changeset"), v["changeset"].as_str());
    assert_eq!(child(root, "contact"), v["contact"].as_str());
    assert_eq!(child(root, "key_service"), v["key_service"].as_str());
    let endpoints = root
        .children()
        .find(|c| c.has_tag_name("endpoints"))
        .unwrap();
    let ep = elements(endpoints, "endpoint");
    assert_eq!(ep.len(), 1);
    assert_eq!(
        child(ep[0], "specification"),
        Some("http://wiki.open311.org/GeoReport_v2")
    );
    assert_eq!(
        child(ep[0], "url"),
        Some("https://311.example.gov/open311/v2")
    );
    assert_eq!(child(ep[0], "type"), Some("production"));
    let formats = ep[0]
        .children()
        .find(|c| c.has_tag_name("formats"))
        .unwrap();
    let formats: Vec<&str> = elements(formats, "format")
        .iter()
        .map(|f| f.text().unwrap())
        .collect();
    assert_eq!(formats, vec!["text/xml", "application/json"]);
    srv.shutdown().await;

    // Without public_url the endpoint is a path.
    let srv = start_server(FileConfig::default()).await;
    let v = get(srv.http_addr, "/discovery.json").await.json();
    assert_eq!(v["endpoints"][0]["url"], "/open311/v2");
    srv.shutdown().await;
}

#[tokio::test]
async fn services_list_every_ticket_of_the_menu_with_its_group_and_the_general_service() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    let v = get(a, "/services.json").await.json();
    let list = v.as_array().unwrap();

    let find = |code: &str| {
        list.iter()
            .find(|s| s["service_code"] == code)
            .unwrap_or_else(|| panic!("service {code} listed"))
    };
    let mut codes: Vec<&str> = list
        .iter()
        .map(|s| s["service_code"].as_str().unwrap())
        .collect();
    let n = codes.len();
    codes.sort();
    codes.dedup();
    assert_eq!(codes.len(), n, "codes are distinct");
    let mut want = vec![
        "abandoned_vehicle",
        "blocked_driveway",
        "bulky_item",
        "call_back",
        "dead_animal",
        "fallen_tree",
        "graffiti",
        "missed_pickup",
        "noise",
        "pothole",
        "stray_animal",
        "streetlight",
        GENERAL_SERVICE,
    ];
    want.sort();
    assert_eq!(codes, want);

    let p = find("pothole");
    assert_eq!(p["service_name"], "Pothole");
    assert_eq!(
        p["description"],
        "A pothole or sunken pavement in a city street, alley or bike lane."
    );
    assert_eq!(p["metadata"], true);
    assert_eq!(p["type"], "realtime");
    assert_eq!(p["keywords"], "pothole, street, pavement, road damage");
    assert_eq!(p["group"], "Streets and infrastructure");
    assert_eq!(find("streetlight")["service_name"], "Streetlight out");
    assert_eq!(find("fallen_tree")["group"], "Streets and infrastructure");
    assert_eq!(find("missed_pickup")["group"], "Trash and recycling");
    assert_eq!(find("noise")["group"], "Noise, parking and vehicles");
    assert_eq!(find("stray_animal")["group"], "Animal services");
    let g = find(GENERAL_SERVICE);
    assert_eq!(g["service_name"], GENERAL_SERVICE_NAME);
    assert_eq!(g["group"], "");
    assert_eq!(g["metadata"], true, "it collects the default ZIP code");
    assert_eq!(g["type"], "realtime");

    // The XML says the same, service by service, in the same order.
    let r = get(a, "/services.xml").await;
    assert_eq!(r.status, 200);
    let doc = r.xml();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "services");
    let services = elements(root, "service");
    assert_eq!(services.len(), list.len());
    for (x, j) in services.iter().zip(list) {
        for f in [
            "service_code",
            "service_name",
            "description",
            "type",
            "keywords",
            "group",
        ] {
            assert_eq!(child(*x, f), j[f].as_str(), "{f}");
        }
        let metadata = j["metadata"].as_bool().unwrap().to_string();
        assert_eq!(child(*x, "metadata"), Some(metadata.as_str()));
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn service_definition_lists_the_zipcode_attribute() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    for code in ["pothole", GENERAL_SERVICE] {
        let v = get(a, &format!("/services/{code}.json")).await.json();
        assert_eq!(v["service_code"], code);
        let attrs = v["attributes"].as_array().unwrap();
        assert_eq!(attrs.len(), 1);
        let z = &attrs[0];
        assert_eq!(z["variable"], true);
        assert_eq!(z["code"], "zipcode");
        assert_eq!(z["datatype"], "string");
        // Any other location will do on the web; the phone always asks for it.
        assert_eq!(z["required"], false);
        assert_eq!(z["datatype_description"], "5-digit ZIP code");
        assert_eq!(z["order"], 1);
        let d = z["description"].as_str().unwrap();
        assert!(
            d.contains("Required when the request gives no other location"),
            "{d}"
        );

        let r = get(a, &format!("/services/{code}.xml")).await;
        assert_eq!(r.status, 200);
        let doc = r.xml();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "service_definition");
        assert_eq!(child(root, "service_code"), Some(code));
        let attrs = root
            .children()
            .find(|c| c.has_tag_name("attributes"))
            .unwrap();
        let attrs = elements(attrs, "attribute");
        assert_eq!(attrs.len(), 1);
        let x = attrs[0];
        assert_eq!(child(x, "variable"), Some("true"));
        assert_eq!(child(x, "code"), Some("zipcode"));
        assert_eq!(child(x, "datatype"), Some("string"));
        assert_eq!(child(x, "required"), Some("false"));
        assert_eq!(child(x, "datatype_description"), Some("5-digit ZIP code"));
        assert_eq!(child(x, "order"), Some("1"));
        assert_eq!(child(x, "description"), z["description"].as_str());
    }
    for fmt in ["json", "xml"] {
        let r = get(a, &format!("/services/no_such_service.{fmt}")).await;
        assert_error(&r, fmt, 404);
    }
    let r = get(a, "/services/pothole.csv").await;
    assert_eq!(r.status, 404);
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// POST requests

#[tokio::test]
async fn post_files_a_web_ticket_that_reads_back_in_both_formats() {
    let mut file = keyed();
    file.open311.jurisdiction_id = Some("city.gov".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;

    let pairs = pothole_post(&[
        ("jurisdiction_id", "city.gov"),
        ("lat", "37.76524078"),
        ("long", "-122.4212043"),
        ("address_string", "1234 5th street"),
        ("address_id", "545483"),
        ("email", "smit333@sfgov.edu"),
        ("device_id", "tt222111"),
        ("account_id", "123456"),
        ("first_name", "john"),
        ("last_name", "smith"),
        ("phone", "111111111"),
        ("description", "A large sinkhole is destroying the street"),
        (
            "media_url",
            "http://farm3.static.flickr.com/2002/2212426634_5ed477a060.jpg",
        ),
        ("attribute[unknown_thing]", "ignored"),
    ]);
    let r = post(a, "json", &pairs).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    let id_text = arr[0]["service_request_id"]
        .as_str()
        .expect("service_request_id is a string");
    assert!(arr[0]["service_notice"].is_null());
    assert_eq!(arr[0]["account_id"], "123456");
    let id: u64 = id_text.parse().unwrap();

    let t = srv.tickets.get(id).await.unwrap().expect("stored");
    assert_eq!(t.channel, Channel::Web);
    assert_eq!(t.status, Status::Open);
    assert_eq!(t.service_code, "pothole");
    assert_eq!(t.service_name, "Pothole");
    assert_eq!(
        t.agency_responsible.as_deref(),
        Some("Public Works - Streets")
    );
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    assert_eq!(t.lat, Some(37.76524078));
    assert_eq!(t.long, Some(-122.4212043));
    assert_eq!(t.address.as_deref(), Some("1234 5th street"));
    assert_eq!(t.address_id.as_deref(), Some("545483"));
    assert_eq!(t.email.as_deref(), Some("smit333@sfgov.edu"));
    assert_eq!(t.first_name.as_deref(), Some("john"));
    assert_eq!(t.last_name.as_deref(), Some("smith"));
    assert_eq!(t.phone.as_deref(), Some("111111111"));
    assert_eq!(
        t.description.as_deref(),
        Some("A large sinkhole is destroying the street")
    );
    assert_eq!(
        t.media_url.as_deref(),
        Some("http://farm3.static.flickr.com/2002/2212426634_5ed477a060.jpg")
    );
    assert_eq!(t.call_id, None);
    assert_readable(a, &t).await;

    // The times carry a zone.
    let v = get(a, &format!("/requests/{id}.json")).await.json();
    let requested = v[0]["requested_datetime"].as_str().unwrap();
    assert!(requested.ends_with('Z') || requested.ends_with("+00:00"));
    let parsed = OffsetDateTime::parse(requested, &Rfc3339).unwrap();
    assert!((OffsetDateTime::now_utc() - parsed).whole_seconds().abs() < 60);

    // XML, with only an address and the general service.
    let r = post(
        a,
        "xml",
        &[
            ("api_key", KEY),
            ("service_code", GENERAL_SERVICE),
            ("address_string", "Main St & 3rd"),
            ("attribute[zipcode]", "94110"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.xml();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "service_requests");
    let reqs = elements(root, "request");
    assert_eq!(reqs.len(), 1);
    let id: u64 = child(reqs[0], "service_request_id")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(child(reqs[0], "service_notice"), Some(""));
    assert_eq!(child(reqs[0], "account_id"), Some(""));
    let t = srv.tickets.get(id).await.unwrap().unwrap();
    assert_eq!(t.channel, Channel::Web);
    assert_eq!(t.service_name, GENERAL_SERVICE_NAME);
    assert_eq!(t.zipcode.as_deref(), Some("94110"));
    assert_eq!(t.address.as_deref(), Some("Main St & 3rd"));
    assert_eq!(t.lat, None);
    assert_readable(a, &t).await;

    // An address_id alone is a location too; a jurisdiction is optional.
    let r = post(a, "json", &pothole_post(&[("address_id", "77")])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(all_tickets(&srv.tickets).await.len(), 3);
    srv.shutdown().await;
}

#[tokio::test]
async fn post_without_a_valid_api_key_is_403_and_writes_nothing() {
    let srv = start_server(keyed()).await;
    let a = srv.http_addr;
    let base = [
        ("service_code", "pothole"),
        ("address_string", "1 Main St"),
        ("attribute[zipcode]", "94103"),
    ];
    for fmt in ["json", "xml"] {
        // Missing, empty, wrong, a prefix of the right one, and in the query string only.
        let missing = post(a, fmt, &base).await;
        assert_error(&missing, fmt, 403);
        for key in ["", "wrong", "k", "k1 ", "K1"] {
            let mut pairs = vec![("api_key", key)];
            pairs.extend_from_slice(&base);
            let r = post(a, fmt, &pairs).await;
            assert_error(&r, fmt, 403);
        }
        let r = fetch(
            a,
            "POST",
            &format!("{BASE}/requests.{fmt}?api_key={KEY}"),
            &[("Content-Type", FORM)],
            form(&base).as_bytes(),
        )
        .await;
        assert_error(&r, fmt, 403);
    }
    assert!(all_tickets(&srv.tickets).await.is_empty());
    srv.shutdown().await;

    // No keys configured: posting is closed to everyone.
    let srv = start_server(FileConfig::default()).await;
    for fmt in ["json", "xml"] {
        let r = post(
            srv.http_addr,
            fmt,
            &pothole_post(&[("lat", "1"), ("long", "2")]),
        )
        .await;
        assert_error(&r, fmt, 403);
    }
    assert!(all_tickets(&srv.tickets).await.is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn invalid_posts_get_the_spec_errors_and_write_nothing() {
    let mut file = keyed();
    file.open311.jurisdiction_id = Some("city.gov".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;
    let long_description = "x".repeat(4001);
    let long_name = "n".repeat(101);
    let long_address = "a".repeat(501);
    let loc = ("address_string", "1 Main St");
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case> = vec![
        (
            "no service_code",
            vec![("api_key", KEY), loc, ("attribute[zipcode]", "94103")],
            400,
        ),
        (
            "empty service_code",
            vec![
                ("api_key", KEY),
                ("service_code", ""),
                loc,
                ("attribute[zipcode]", "94103"),
            ],
            400,
        ),
        (
            "unknown service_code",
            vec![
                ("api_key", KEY),
                ("service_code", "no_such_thing"),
                loc,
                ("attribute[zipcode]", "94103"),
            ],
            404,
        ),
        (
            "another jurisdiction",
            pothole_post(&[loc, ("jurisdiction_id", "elsewhere.gov")]),
            404,
        ),
        (
            "no location",
            vec![("api_key", KEY), ("service_code", "pothole")],
            400,
        ),
        (
            "empty location fields",
            vec![
                ("api_key", KEY),
                ("service_code", "pothole"),
                ("lat", ""),
                ("long", ""),
                ("address_string", ""),
                ("address_id", ""),
                ("attribute[zipcode]", ""),
            ],
            400,
        ),
        ("lat without long", pothole_post(&[("lat", "37.7")]), 400),
        (
            "lat out of range",
            pothole_post(&[("lat", "91"), ("long", "0")]),
            400,
        ),
        (
            "long out of range",
            pothole_post(&[("lat", "0"), ("long", "-180.5")]),
            400,
        ),
        (
            "lat not a number",
            pothole_post(&[("lat", "NaN"), ("long", "0")]),
            400,
        ),
        (
            "description of 4001 characters",
            pothole_post(&[loc, ("description", &long_description)]),
            400,
        ),
        (
            "media_url not http",
            pothole_post(&[loc, ("media_url", "javascript:alert(1)")]),
            400,
        ),
        (
            "an escape sequence in a name",
            pothole_post(&[loc, ("first_name", "\u{1b}]0;owned\u{7}Eve")]),
            400,
        ),
        (
            "a line break in a phone number",
            pothole_post(&[loc, ("phone", "555\r\n0100")]),
            400,
        ),
        (
            "a 101-character last name",
            pothole_post(&[loc, ("last_name", &long_name)]),
            400,
        ),
        (
            "a 501-character address",
            pothole_post(&[("address_string", &long_address)]),
            400,
        ),
        (
            "not an email address",
            pothole_post(&[loc, ("email", "nobody")]),
            400,
        ),
        (
            "zipcode too short",
            vec![
                ("api_key", KEY),
                ("service_code", "pothole"),
                loc,
                ("attribute[zipcode]", "941"),
            ],
            400,
        ),
        (
            "zipcode not digits",
            vec![
                ("api_key", KEY),
                ("service_code", "pothole"),
                loc,
                ("attribute[zipcode]", "9410a"),
            ],
            400,
        ),
    ];
    for fmt in ["json", "xml"] {
        for (what, pairs, status) in &cases {
            let r = post(a, fmt, pairs).await;
            let d = assert_error(&r, fmt, *status);
            assert!(!d.is_empty(), "{what}");
        }
        // Several problems are reported together.
        let r = post(
            a,
            fmt,
            &[
                ("api_key", KEY),
                ("service_code", "pothole"),
                ("description", &long_description),
                ("phone", "call me"),
            ],
        )
        .await;
        assert_eq!(assert_error(&r, fmt, 400).len(), 3, "{}", r.body);

        // A body over 64 KiB.
        let big = form(&pothole_post(&[loc, ("description", &"y".repeat(70_000))]));
        let r = post_raw(a, fmt, big.as_bytes()).await;
        assert_error(&r, fmt, 413);

        // Not a form.
        let r = fetch(
            a,
            "POST",
            &format!("{BASE}/requests.{fmt}"),
            &[("Content-Type", "application/json")],
            br#"{"api_key":"k1","service_code":"pothole"}"#,
        )
        .await;
        assert_error(&r, fmt, 400);
    }
    // Unknown formats, in a POST too.
    let r = post(a, "csv", &pothole_post(&[loc])).await;
    assert_eq!(r.status, 404);
    assert!(
        all_tickets(&srv.tickets).await.is_empty(),
        "nothing written"
    );

    // 4,000 characters (of any width) is fine, as is our own jurisdiction.
    let emoji = "🕳".repeat(4000);
    let r = post(
        a,
        "json",
        &pothole_post(&[
            loc,
            ("description", &emoji),
            ("jurisdiction_id", "city.gov"),
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let all = all_tickets(&srv.tickets).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].description.as_deref(), Some(emoji.as_str()));
    srv.shutdown().await;
}

#[tokio::test]
async fn hostile_and_unicode_text_round_trips_exactly() {
    let srv = start_server(keyed()).await;
    let a = srv.http_addr;
    let texts = [
        "'); DROP TABLE tickets;--",
        "\" OR 1=1; --",
        "Robert'); DELETE FROM emergency_redirects; --",
        "🚨🕳️🐀 👩🏽‍🚒",
        "Calle Ñandú 5, señora Muñoz, ¿cuándo? Árbol caído — pingüino",
        "<b>bold</b> &amp; <![CDATA[x]]> ]]> \"q\" 'a'",
        "line\nbreak\ttab \\ backslash % _ ?1 :name $1 + & = ;",
        "crlf\r\nline",
    ];
    let mut ids = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let fmt = if i % 2 == 0 { "json" } else { "xml" };
        // Line breaks and tabs are text in a description or an address, never in a
        // one-line field.
        let one_line = !text.chars().any(char::is_control);
        let mut pairs = vec![("description", *text), ("address_string", *text)];
        if one_line {
            pairs.extend([("address_id", *text), ("first_name", *text)]);
        }
        let r = post(a, fmt, &pothole_post(&pairs)).await;
        assert_eq!(r.status, 200, "{text:?}: {}", r.body);
        let id: u64 = if fmt == "json" {
            r.json()[0]["service_request_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        } else {
            let doc = r.xml();
            let req = elements(doc.root_element(), "request")[0];
            child(req, "service_request_id").unwrap().parse().unwrap()
        };
        let t = srv.tickets.get(id).await.unwrap().unwrap();
        assert_eq!(t.description.as_deref(), Some(*text));
        assert_eq!(t.address.as_deref(), Some(*text));
        let one_line_value = one_line.then_some(*text);
        assert_eq!(t.address_id.as_deref(), one_line_value);
        assert_eq!(t.first_name.as_deref(), one_line_value);
        assert_readable(a, &t).await;
        ids.push(id);
    }
    // The table is intact and every ticket is listed.
    let all = all_tickets(&srv.tickets).await;
    assert_eq!(all.len(), texts.len());
    let v = get(a, "/requests.json?service_code=pothole").await.json();
    assert_eq!(v.as_array().unwrap().len(), texts.len());
    let r = get(a, "/requests.xml?service_code=pothole").await;
    let doc = r.xml();
    let listed = elements(doc.root_element(), "request");
    assert_eq!(listed.len(), texts.len());
    for node in listed {
        let d = child(node, "description").unwrap();
        assert!(texts.contains(&d), "{d:?}");
    }

    // A NUL from some other source (PostgreSQL text cannot hold one; XML 1.0 cannot carry
    // one) is kept as U+FFFD by the store, on either database, and never breaks a document.
    let t = srv
        .tickets
        .file(NewTicket {
            description: Some("nul\0inside".into()),
            ..pothole_ticket()
        })
        .await
        .unwrap();
    let v = get(a, &format!("/requests/{}.json", t.service_request_id))
        .await
        .json();
    assert_eq!(v[0]["description"], "nul\u{FFFD}inside");
    let r = get(a, &format!("/requests/{}.xml", t.service_request_id)).await;
    let doc = r.xml();
    let req = elements(doc.root_element(), "request")[0];
    assert_eq!(child(req, "description"), Some("nul\u{FFFD}inside"));
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET requests

fn ids_json(v: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = v
        .as_array()
        .unwrap_or_else(|| panic!("an array: {v}"))
        .iter()
        .map(|r| r["service_request_id"].as_str().unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

fn ids_xml(r: &Resp) -> Vec<u64> {
    assert_eq!(r.status, 200, "{}", r.body);
    let doc = r.xml();
    assert_eq!(doc.root_element().tag_name().name(), "service_requests");
    let mut ids: Vec<u64> = elements(doc.root_element(), "request")
        .iter()
        .map(|n| child(*n, "service_request_id").unwrap().parse().unwrap())
        .collect();
    ids.sort();
    ids
}

/// The ids a query returns, checked to be the same in JSON and XML.
async fn query_ids(a: SocketAddr, query: &str) -> Vec<u64> {
    let r = get(a, &format!("/requests.json{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.body);
    let json = ids_json(&r.json());
    let xml = ids_xml(&get(a, &format!("/requests.xml{query}")).await);
    assert_eq!(json, xml, "{query}");
    json
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort();
    v
}

fn w3c(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

#[tokio::test]
async fn get_requests_filters_and_defaults() {
    let mut file = FileConfig::default();
    file.open311.jurisdiction_id = Some("city.gov".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;
    let store = &srv.tickets;

    let mut potholes = Vec::new();
    for _ in 0..3 {
        potholes.push(
            store
                .file(pothole_ticket())
                .await
                .unwrap()
                .service_request_id,
        );
    }
    let graffiti = store
        .file(NewTicket {
            service_code: "graffiti".into(),
            service_name: "Graffiti".into(),
            channel: Channel::Web,
            ..NewTicket::default()
        })
        .await
        .unwrap()
        .service_request_id;
    let closed = potholes[0];
    store
        .update_status(closed, Status::Closed, Some("Fixed."))
        .await
        .unwrap();
    let mut everything = potholes.clone();
    everything.push(graffiti);
    let everything = sorted(everything);

    assert_eq!(query_ids(a, "").await, everything);
    // Empty optional parameters are the same as none.
    assert_eq!(
        query_ids(
            a,
            "?status=&service_code=&start_date=&end_date=&service_request_id=&jurisdiction_id="
        )
        .await,
        everything
    );
    assert_eq!(query_ids(a, "?jurisdiction_id=city.gov").await, everything);

    // status
    let open: Vec<u64> = everything
        .iter()
        .copied()
        .filter(|i| *i != closed)
        .collect();
    assert_eq!(query_ids(a, "?status=open").await, open);
    assert_eq!(query_ids(a, "?status=closed").await, vec![closed]);
    assert_eq!(query_ids(a, "?status=open,closed").await, everything);
    assert_eq!(query_ids(a, "?status=closed&status=open").await, everything);

    // service_code
    assert_eq!(
        query_ids(a, "?service_code=pothole").await,
        sorted(potholes.clone())
    );
    assert_eq!(
        query_ids(a, "?service_code=pothole,graffiti").await,
        everything
    );
    assert_eq!(
        query_ids(a, "?service_code=graffiti&status=open").await,
        vec![graffiti]
    );
    assert!(query_ids(a, "?service_code=nothing").await.is_empty());

    // service_request_id overrides every other argument.
    assert_eq!(
        query_ids(
            a,
            &format!(
                "?service_request_id={closed},{graffiti}&status=open&service_code=noise\
                 &start_date=2000-01-01T00:00:00Z&end_date=2000-01-02T00:00:00Z"
            )
        )
        .await,
        sorted(vec![closed, graffiti])
    );
    assert!(query_ids(a, "?service_request_id=99999999")
        .await
        .is_empty());

    // Dates: around now, in the future, long ago; offsets other than Z.
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let q = format!("?start_date={}&end_date={}", w3c(now - day), w3c(now + day));
    assert_eq!(query_ids(a, &q).await, everything);
    let q = format!("?start_date={}", w3c(now + day));
    assert!(query_ids(a, &q).await.is_empty());
    let q = format!("?end_date={}", w3c(now - day));
    assert!(query_ids(a, &q).await.is_empty());
    let q = format!("?start_date={}", w3c(now - day * 89));
    assert_eq!(query_ids(a, &q).await, everything);
    // 2 hours ahead of UTC, written with an unencoded "+" (which arrives as a space).
    let ahead = (now - day).to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
    let q = format!("?start_date={}", w3c(ahead));
    assert!(q.contains('+'));
    assert_eq!(query_ids(a, &q).await, everything);
    let q = format!("?start_date={}", w3c(ahead).replace('+', "%2B"));
    assert_eq!(query_ids(a, &q).await, everything);
    // A span of exactly 90 days is allowed.
    let q = format!(
        "?start_date={}&end_date={}",
        w3c(now - day * 89),
        w3c(now + day)
    );
    assert_eq!(query_ids(a, &q).await, everything);

    // Errors, in both formats.
    let bad = [
        "?start_date=yesterday".to_string(),
        "?end_date=2026-01-01".to_string(),
        "?start_date=2026-01-01T00:00:00".to_string(),
        "?start_date=2026-13-01T00:00:00Z".to_string(),
        format!("?start_date={}&end_date={}", w3c(now - day * 91), w3c(now)),
        "?start_date=2026-01-01T00:00:00Z&end_date=2026-04-02T00:00:01Z".to_string(),
        "?start_date=2026-02-01T00:00:00Z&end_date=2026-01-01T00:00:00Z".to_string(),
        "?status=pending".to_string(),
        "?status=OPEN".to_string(),
        "?service_request_id=12345678,abc".to_string(),
    ];
    for q in &bad {
        for fmt in ["json", "xml"] {
            let r = get(a, &format!("/requests.{fmt}{q}")).await;
            assert_error(&r, fmt, 400);
        }
    }
    for fmt in ["json", "xml"] {
        let r = get(a, &format!("/requests.{fmt}?jurisdiction_id=elsewhere.gov")).await;
        assert_error(&r, fmt, 404);
        let r = get(a, &format!("/services.{fmt}?jurisdiction_id=elsewhere.gov")).await;
        assert_error(&r, fmt, 404);
    }

    // One request.
    let t = store.get(closed).await.unwrap().unwrap();
    assert_eq!(t.status_notes.as_deref(), Some("Fixed."));
    assert_readable(a, &t).await;
    for fmt in ["json", "xml"] {
        // 8 digits that were never filed (ids start at 10000000), not a number, too big.
        for id in ["00000001", "abc", "99999999999999999999999"] {
            let r = get(a, &format!("/requests/{id}.{fmt}")).await;
            assert_error(&r, fmt, 404);
        }
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_formats_and_methods_get_error_arrays() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    for path in [
        "/requests.csv",
        "/services.yaml",
        "/discovery.html",
        "/services",
        "/requests/12345678.csv",
    ] {
        let r = get(a, path).await;
        assert_error(&r, "xml", 404);
    }
    for path in ["/nothing.json", "/tokens/123.json", "/a/b/c.json"] {
        let r = get(a, path).await;
        assert_error(&r, "json", 404);
    }
    let r = get(a, "/nothing.xml").await;
    assert_error(&r, "xml", 404);

    let r = fetch(a, "DELETE", &format!("{BASE}/requests.json"), &[], b"").await;
    assert_error(&r, "json", 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
    let r = fetch(a, "POST", &format!("{BASE}/services.xml"), &[], b"").await;
    assert_error(&r, "xml", 405);
    let r = fetch(a, "PUT", &format!("{BASE}/services/pothole.json"), &[], b"").await;
    assert_error(&r, "json", 405);
    srv.shutdown().await;
}

#[tokio::test]
async fn at_most_1000_requests_are_returned_newest_first() {
    let srv = start_server(FileConfig::default()).await;
    let a = srv.http_addr;
    for _ in 0..1005 {
        srv.tickets.file(pothole_ticket()).await.unwrap();
    }
    let r = get(a, "/requests.json").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1000);
    let times: Vec<&str> = list
        .iter()
        .map(|r| r["requested_datetime"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    assert_eq!(
        ids_xml(&get(a, "/requests.xml?status=open").await).len(),
        1000
    );
    srv.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// A phone ticket, read over Open311

#[tokio::test]
async fn a_ticket_filed_by_phone_reads_back_through_open311() {
    let mut file = FileConfig::default();
    file.open311.public_url = Some("https://311.example.gov".into());
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, not an emergency, streets, pothole, ZIP 94103, then # during the recording
    // prompt: no description.
    ua.keys("1111").await;
    ua.keys("94103").await;
    ua.skip_description("en").await;

    let mut filed = Vec::new();
    for _ in 0..100 {
        filed = all_tickets(&srv.tickets).await;
        if !filed.is_empty() {
            break;
        }
        ua.listen(Duration::from_millis(100)).await;
    }
    assert_eq!(filed.len(), 1, "one ticket filed");
    let t = filed.remove(0);
    assert_eq!(t.channel, Channel::Phone);
    assert_eq!(t.service_code, "pothole");
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    assert_eq!(t.recording, None, "the recording was skipped");

    assert_readable(srv.http_addr, &t).await;
    let v = get(
        srv.http_addr,
        &format!("/requests/{}.json", t.service_request_id),
    )
    .await
    .json();
    let r = &v[0];
    assert_eq!(r["service_request_id"], t.service_request_id.to_string());
    assert_eq!(r["status"], "open");
    assert_eq!(r["service_code"], "pothole");
    assert_eq!(r["service_name"], "Pothole");
    assert_eq!(r["agency_responsible"], "Public Works - Streets");
    assert_eq!(r["zipcode"], "94103");
    assert!(r["lat"].is_null() && r["long"].is_null());
    assert!(r["media_url"].is_null());
    assert!(
        r.get("phone").is_none(),
        "the caller's number stays private"
    );
    // And it is in the default listing.
    let ids = query_ids(srv.http_addr, "?service_code=pothole").await;
    assert_eq!(ids, vec![t.service_request_id]);
    ua.bye().await;
    srv.shutdown().await;
}

/// A phone ticket's recording is the caller's voice: personal data, never in the public
/// API, whatever the configuration; `media_url` is only for media a client posted.
#[tokio::test]
async fn callers_recordings_are_never_published() {
    let mut file = keyed();
    file.open311.public_url = Some("https://311.example.gov/".into());
    let srv = start_server(file).await;
    let a = srv.http_addr;
    let recorded = srv
        .tickets
        .file(NewTicket {
            recording: Some("1700000000-0a1b2c3d.wav".into()),
            ..pothole_ticket()
        })
        .await
        .unwrap();
    // A row as an older build stored it (a relative recording path in media_url).
    let legacy = srv
        .tickets
        .file(NewTicket {
            media_url: Some("/recordings/1700000001-0a1b2c3e.wav".into()),
            ..pothole_ticket()
        })
        .await
        .unwrap();
    let posted = post(
        a,
        "json",
        &pothole_post(&[
            ("address_string", "1 Main St"),
            ("media_url", "https://example.org/pothole.jpg"),
        ]),
    )
    .await;
    assert_eq!(posted.status, 200, "{}", posted.body);
    let web_id = posted.json()[0]["service_request_id"]
        .as_str()
        .unwrap()
        .to_owned();

    for fmt in ["json", "xml"] {
        for path in [
            format!("/requests.{fmt}"),
            format!("/requests/{}.{fmt}", recorded.service_request_id),
            format!("/requests/{}.{fmt}", legacy.service_request_id),
        ] {
            let r = get(a, &path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            assert!(
                !r.body.contains(".wav") && !r.body.contains("recordings"),
                "{path} publishes a recording: {}",
                r.body
            );
        }
    }
    for t in [&recorded, &legacy] {
        let v = get(a, &format!("/requests/{}.json", t.service_request_id))
            .await
            .json();
        assert!(v[0]["media_url"].is_null(), "{v}");
    }
    // What a client posted is public, as posted.
    let v = get(a, &format!("/requests/{web_id}.json")).await.json();
    assert_eq!(v[0]["media_url"], "https://example.org/pothole.jpg");
    srv.shutdown().await;
}

/// What a city's app sends: a GPS position and the address it shows, no ZIP code. Accepted,
/// and the location is kept and read back; with no location at all the ZIP is asked for.
#[tokio::test]
async fn a_gps_report_from_a_city_app_is_filed_without_a_zip() {
    let srv = start_server(keyed()).await;
    let a = srv.http_addr;
    for fmt in ["json", "xml"] {
        let r = post(
            a,
            fmt,
            &[
                ("api_key", KEY),
                ("service_code", "pothole"),
                ("lat", "37.76524078"),
                ("long", "-122.4212043"),
                ("address_string", "1234 5th street"),
                ("description", "Deep pothole in the bike lane"),
            ],
        )
        .await;
        assert_eq!(r.status, 200, "{fmt}: {}", r.body);
        let id: u64 = if fmt == "json" {
            r.json()[0]["service_request_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        } else {
            let doc = r.xml();
            let req = elements(doc.root_element(), "request")[0];
            child(req, "service_request_id").unwrap().parse().unwrap()
        };
        let t = srv.tickets.get(id).await.unwrap().unwrap();
        assert_eq!(t.lat, Some(37.76524078));
        assert_eq!(t.long, Some(-122.4212043));
        assert_eq!(t.address.as_deref(), Some("1234 5th street"));
        assert_eq!(t.zipcode, None);
        assert_readable(a, &t).await;
        let v = get(a, &format!("/requests/{id}.json")).await.json();
        assert_eq!(v[0]["lat"], 37.76524078);
        assert_eq!(v[0]["long"], -122.4212043);
        assert_eq!(v[0]["address"], "1234 5th street");
    }
    // Lat/long alone, an address_id alone, a ZIP alone: each is a location.
    for loc in [
        vec![("lat", "37.7"), ("long", "-122.4")],
        vec![("address_id", "545483")],
        vec![("attribute[zipcode]", "94110")],
    ] {
        let mut pairs = vec![("api_key", KEY), ("service_code", "pothole")];
        pairs.extend(loc.iter().copied());
        let r = post(a, "json", &pairs).await;
        assert_eq!(r.status, 200, "{loc:?}: {}", r.body);
    }
    // Nothing that says where: the ZIP is asked for, with the other choices.
    let r = post(a, "json", &[("api_key", KEY), ("service_code", "pothole")]).await;
    let d = assert_error(&r, "json", 400);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].contains("lat and long")
            && d[0].contains("address_string")
            && d[0].contains("attribute[zipcode]"),
        "{d:?}"
    );
    assert_eq!(all_tickets(&srv.tickets).await.len(), 5);
    srv.shutdown().await;
}

/// Each API key may post a burst, then at its rate; past it 429 with Retry-After, and other
/// keys are not affected.
#[tokio::test]
async fn posts_are_rate_limited_per_api_key() {
    let mut file = FileConfig::default();
    file.open311.api_keys = vec![KEY.into(), "k2".into()];
    file.open311.post_rate_per_minute = 6;
    file.open311.post_burst = 3;
    let srv = start_server(file).await;
    let a = srv.http_addr;
    let loc = ("address_string", "1 Main St");
    for i in 0..3 {
        let r = post(a, "json", &pothole_post(&[loc])).await;
        assert_eq!(r.status, 200, "post {i}: {}", r.body);
    }
    for fmt in ["json", "xml"] {
        let r = post(a, fmt, &pothole_post(&[loc])).await;
        assert_error(&r, fmt, 429);
        let wait: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=10).contains(&wait), "{wait}");
    }
    let other = post(
        a,
        "json",
        &[("api_key", "k2"), ("service_code", "pothole"), loc],
    )
    .await;
    assert_eq!(other.status, 200, "{}", other.body);
    assert_eq!(all_tickets(&srv.tickets).await.len(), 4);
    srv.shutdown().await;
}

#[tokio::test]
async fn database_failures_are_500_with_the_error_array() {
    let srv = start_server(keyed()).await;
    let a = srv.http_addr;
    let t = srv.tickets.file(pothole_ticket()).await.unwrap();
    srv.tickets.close().await;
    for fmt in ["json", "xml"] {
        let r = get(a, &format!("/requests.{fmt}")).await;
        assert_error(&r, fmt, 500);
        let r = get(a, &format!("/requests/{}.{fmt}", t.service_request_id)).await;
        assert_error(&r, fmt, 500);
        let r = post(a, fmt, &pothole_post(&[("address_string", "1 Main St")])).await;
        assert_error(&r, fmt, 500);
        // What does not touch the database still works.
        assert_eq!(get(a, &format!("/services.{fmt}")).await.status, 200);
    }
    srv.shutdown().await;
}
