//! SIP torture tests: every message of RFC 4475's archive and of RFC 5118 (IPv6) section 4
//! (tests/torture/*.dat, see tests/torture/INDEX.md) is sent to the real server over UDP and
//! over TCP, the answer is checked against what the RFC expects, and a well-formed OPTIONS
//! afterwards must still get a 200.
mod common;

use common::start_server;
use ivr311::config::FileConfig;
use ivr311::sip::message::{frame_stream, parse_datagram, Frame, Message};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// What a test accepts as the answer (the INDEX.md "accept" column).
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exactly 400.
    Bad,
    /// Any 4xx.
    Any4xx,
    /// 400, or any non-5xx final.
    Lenient,
    /// Any final that is neither 5xx nor 400.
    Normal,
    /// `Normal`, or 501.
    Normal501,
    /// One of these codes.
    Codes(&'static [u16]),
    /// No answer required; only the liveness OPTIONS counts.
    Survive,
}

use Expect::*;

const CASES: &[(&str, Expect)] = &[
    ("wsinv", Normal),
    ("intmeth", Normal501),
    ("esc01", Normal),
    ("escnull", Normal),
    ("esc02", Normal501),
    ("lwsdisp", Normal),
    ("longreq", Normal),
    ("dblreq", Normal),
    ("semiuri", Normal),
    ("transports", Normal),
    ("mpart01", Normal),
    ("unreason", Survive),
    ("noreason", Survive),
    ("badinv01", Bad),
    ("clerr", Bad),
    ("ncl", Any4xx),
    ("scalar02", Bad),
    ("scalarlg", Survive),
    ("quotbal", Lenient),
    ("ltgtruri", Lenient),
    ("lwsruri", Lenient),
    ("lwsstart", Lenient),
    ("trws", Lenient),
    ("escruri", Lenient),
    ("baddate", Lenient),
    ("regbadct", Lenient),
    ("badaspec", Lenient),
    ("baddn", Lenient),
    ("badvers", Codes(&[505])),
    ("mismatch01", Bad),
    ("mismatch02", Codes(&[501, 400])),
    ("bigcode", Survive),
    ("badbranch", Lenient),
    ("insuf", Bad),
    ("unkscm", Codes(&[416])),
    ("novelsc", Codes(&[416, 404])),
    ("unksm2", Lenient),
    ("bext01", Codes(&[420])),
    ("invut", Codes(&[415])),
    ("regaut01", Normal),
    ("multi01", Bad),
    ("mcl01", Any4xx),
    ("bcast", Survive),
    ("zeromf", Normal),
    ("cparam01", Normal),
    ("cparam02", Normal),
    ("regescrt", Normal),
    ("sdp01", Codes(&[406, 400])),
    ("inv2543", Normal),
    ("test", Survive),
];

/// The Content-Length-error messages: over TCP, framing is lost, so a 400 or a closed
/// connection (with or without an answer) is right.
const TCP_FRAMING: &[&str] = &["clerr", "ncl", "mcl01"];

/// Messages that never end on a stream: clerr and RFC 5118's ipv6-in-sdp promise more body
/// than they have, and baddn and RFC 5118's 4.10 pair have no blank line after their headers. A server can only wait for more bytes; when the client then
/// closes its side, the server must close too (and may send nothing).
const TCP_UNFINISHED: &[&str] = &[
    "clerr",
    "baddn",
    "ipv6-in-sdp",
    "ipv6-bug-abnf-3-colons",
    "ipv6-correct-abnf-2-colons",
];

/// How a copy of an RFC 5118 message is repaired (INDEX.md): its Content-Length set to the
/// length of its body, or the blank line that ends its headers added.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Repair {
    None,
    ContentLength,
    BlankLine,
}

/// RFC 5118 section 4, in order: the file, what its bytes should get over UDP (INDEX.md), and
/// whether a repaired copy is sent as well (which must be handled `Normal`ly).
const RFC5118: &[(&str, Expect, Repair)] = &[
    ("ipv6-good", Normal, Repair::None),
    ("ipv6-bad", Bad, Repair::None),
    ("port-ambiguous", Normal, Repair::None),
    ("port-unambiguous", Normal, Repair::None),
    ("via-received-param-with-delim", Normal, Repair::None),
    ("via-received-param-no-delim", Normal, Repair::None),
    ("ipv6-in-sdp", Bad, Repair::ContentLength),
    ("mult-ip-in-header", Normal, Repair::None),
    ("mult-ip-in-sdp", Normal, Repair::ContentLength),
    ("ipv4-mapped-ipv6", Normal, Repair::ContentLength),
    ("ipv6-bug-abnf-3-colons", Lenient, Repair::BlankLine),
    ("ipv6-correct-abnf-2-colons", Lenient, Repair::BlankLine),
];

fn repaired(bytes: &[u8], how: Repair) -> Vec<u8> {
    match how {
        Repair::None => bytes.to_vec(),
        Repair::BlankLine => [bytes, b"\r\n"].concat(),
        Repair::ContentLength => {
            let text = String::from_utf8(bytes.to_vec()).expect("RFC 5118 messages are text");
            let (head, body) = text.split_once("\r\n\r\n").expect("a header section");
            let head: Vec<String> = head
                .split("\r\n")
                .map(|l| {
                    if l.to_ascii_lowercase().starts_with("content-length:") {
                        format!("Content-Length: {}", body.len())
                    } else {
                        l.to_owned()
                    }
                })
                .collect();
            format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
        }
    }
}

fn dat(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/torture")
        .join(format!("{name}.dat"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One response from the server. Answers to broken requests echo broken headers (a Via with
/// no sent-by, a CSeq that overflows...), which our own parser rightly refuses; for those the
/// status line and headers are read raw.
#[derive(Debug)]
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
}

impl Answer {
    fn parse(buf: &[u8]) -> Option<Answer> {
        if let Ok(Message::Response(r)) = parse_datagram(buf, 1 << 20) {
            let headers = r
                .headers
                .iter()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            return Some(Answer {
                code: r.code,
                headers,
            });
        }
        let text = String::from_utf8_lossy(buf);
        let mut lines = text.split("\r\n");
        let code = lines
            .next()?
            .strip_prefix("SIP/2.0 ")?
            .get(..3)?
            .parse()
            .ok()?;
        let headers = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Some(Answer { code, headers })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn cseq_method(r: &Answer) -> String {
    r.header("CSeq")
        .and_then(|c| c.split_whitespace().nth(1))
        .unwrap_or("")
        .to_owned()
}

fn final_ok(e: Expect, code: u16) -> bool {
    match e {
        Bad => code == 400,
        Any4xx => (400..500).contains(&code),
        Lenient => code == 400 || (200..500).contains(&code) || code >= 600,
        Normal => code >= 200 && code != 400 && !(500..600).contains(&code),
        Normal501 => code == 501 || (code >= 200 && code != 400 && !(500..600).contains(&code)),
        Codes(cs) => cs.contains(&code),
        Survive => true,
    }
}

/// Judge the responses to one torture message. `closed` means a TCP connection was closed.
fn judge(name: &str, e: Expect, rs: &[Answer], closed: bool, tcp: bool) -> Result<(), String> {
    let finals: Vec<&Answer> = rs.iter().filter(|r| r.code >= 200).collect();
    // On a stream the INVITE after dblreq's REGISTER is simply the next message.
    if name == "dblreq" && !tcp {
        if rs.iter().any(|r| cseq_method(r) != "REGISTER") {
            return Err("answered the trailing INVITE".into());
        }
        let mut codes: Vec<u16> = finals.iter().map(|r| r.code).collect();
        codes.dedup();
        if codes.len() != 1 {
            return Err(format!("expected exactly one final, got {codes:?}"));
        }
    }
    if tcp && TCP_UNFINISHED.contains(&name) && rs.is_empty() && closed {
        return Ok(());
    }
    if tcp && TCP_FRAMING.contains(&name) {
        return if closed || finals.iter().any(|r| r.code == 400) {
            Ok(())
        } else {
            Err("neither 400 nor connection closed".into())
        };
    }
    if matches!(e, Survive) {
        return Ok(());
    }
    if name == "bext01" {
        if let Some(r) = finals.first() {
            // A UAS lists what Require asked for; Proxy-Require is for proxies.
            let u = r.header("Unsupported").unwrap_or("");
            let tags: Vec<&str> = u.split(',').map(str::trim).collect();
            if tags != ["nothingSupportsThis", "nothingSupportsThisEither"] {
                return Err(format!("420 with Unsupported: {u:?}"));
            }
        }
    }
    match finals.first() {
        Some(r) if final_ok(e, r.code) => Ok(()),
        Some(r) => Err(format!("wrong code {}", r.code)),
        // A valid INVITE may only have been answered provisionally so far.
        None if matches!(e, Normal | Normal501) && rs.iter().any(|r| r.code < 200) => Ok(()),
        None => Err("no answer".into()),
    }
}

fn got(rs: &[Answer], closed: bool) -> String {
    let mut codes: Vec<String> = rs.iter().map(|r| r.code.to_string()).collect();
    codes.dedup();
    let mut s = if codes.is_empty() {
        "-".to_owned()
    } else {
        codes.join(",")
    };
    if closed {
        s.push_str(" (closed)");
    }
    s
}

/// Parse the SIP responses in a datagram or a stream buffer (framed by Content-Length).
fn responses_in(mut buf: &[u8], out: &mut Vec<Answer>) {
    while !buf.is_empty() {
        let Ok(Frame::Complete(n)) = frame_stream(buf, 1 << 20) else {
            return;
        };
        out.extend(Answer::parse(&buf[..n]));
        buf = &buf[n..];
    }
}

async fn udp_exchange(sip: SocketAddr, bytes: &[u8]) -> Vec<Answer> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, sip).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut deadline = Instant::now() + Duration::from_millis(300);
    loop {
        let now = Instant::now();
        if now >= deadline {
            // Give a provisionally answered request a little longer to reach a final.
            if out.iter().any(|r: &Answer| r.code < 200) && !out.iter().any(|r| r.code >= 200) {
                deadline = now + Duration::from_millis(700);
                if out.len() < 10 {
                    continue;
                }
            }
            break;
        }
        match tokio::time::timeout(deadline - now, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                out.extend(Answer::parse(&buf[..n]));
            }
            _ => continue,
        }
    }
    out
}

async fn tcp_exchange(sip: SocketAddr, name: &str, bytes: &[u8]) -> (Vec<Answer>, bool) {
    let mut s = TcpStream::connect(sip).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut data = Vec::new();
    let mut closed = false;
    let mut deadline = Instant::now() + Duration::from_millis(300);
    let mut half_closed = false;
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if now >= deadline {
            // An unfinished message: say we are done sending; the server should close.
            if TCP_UNFINISHED.contains(&name) && data.is_empty() && !half_closed {
                half_closed = true;
                s.shutdown().await.unwrap();
                deadline = now + Duration::from_millis(3000);
                continue;
            }
            break;
        }
        match tokio::time::timeout(deadline - now, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
    }
    let mut out = Vec::new();
    responses_in(&data, &mut out);
    (out, closed)
}

/// A well-formed OPTIONS from a fresh socket must get a 200.
async fn alive(sip: SocketAddr, n: usize) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let opt = format!(
        "OPTIONS sip:311@{sip} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKalive{n}\r\nMax-Forwards: 70\r\n\
From: <sip:mon@{me}>;tag=m{n}\r\nTo: <sip:311@{sip}>\r\nCall-ID: alive{n}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    sock.send_to(opt.as_bytes(), sip).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match tokio::time::timeout(left, sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => {
                if let Ok(Message::Response(r)) = parse_datagram(&buf[..n], 65535) {
                    if r.code >= 200 {
                        return r.code == 200;
                    }
                }
            }
            _ => return false,
        }
    }
    false
}

/// The second of each pair that shares branch, sent-by and method with an earlier message
/// (INDEX.md): a server matching transactions by RFC 3261 §17.2.3 rightly takes it for a
/// retransmission of the first, so it is sent to a second server that has not seen the first.
const PAIR_SECONDS: &[&str] = &["cparam02", "regescrt", "novelsc"];

async fn run(tcp: bool) {
    let srv = start_server(FileConfig::default()).await;
    let srv2 = start_server(FileConfig::default()).await;
    let transport = if tcp { "TCP" } else { "UDP" };
    let mut failures = Vec::new();
    eprintln!("RFC 4475 torture over {transport}");
    eprintln!("{:<12} {:<22} {:<16} result", "file", "expected", "got");
    for (i, (name, expect)) in CASES.iter().enumerate() {
        let bytes = dat(name);
        let sip = if PAIR_SECONDS.contains(name) {
            srv2.sip_addr
        } else {
            srv.sip_addr
        };
        let (rs, closed) = if tcp {
            tcp_exchange(sip, name, &bytes).await
        } else {
            (udp_exchange(sip, &bytes).await, false)
        };
        let verdict = judge(name, *expect, &rs, closed, tcp);
        let live = alive(sip, i).await;
        let ok = verdict.is_ok() && live;
        let mut note = match &verdict {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("FAIL: {e}"),
        };
        if !live {
            note.push_str(" FAIL: liveness OPTIONS got no 200");
        }
        eprintln!(
            "{:<12} {:<22} {:<16} {note}",
            name,
            format!("{expect:?}"),
            got(&rs, closed)
        );
        if !ok {
            failures.push(format!("{name}: {note}"));
        }
    }
    srv.shutdown().await;
    srv2.shutdown().await;
    assert!(failures.is_empty(), "{transport} failures: {failures:#?}");
}

/// The RFC 3261 §17.2.3 server transaction a message would match: branch, sent-by, method.
fn transaction_key(bytes: &[u8]) -> Option<String> {
    match parse_datagram(bytes, 1 << 20) {
        Ok(Message::Request(r)) => {
            let v = r.top_via();
            Some(format!("{:?}|{}|{}", v.branch, v.sent_by(), r.method))
        }
        _ => None,
    }
}

/// RFC 5118: each message (and its repaired copy) goes to a server that has not seen its
/// transaction key, since several share branch, sent-by and method (a server rightly takes the
/// second for a retransmission of the first).
async fn run_rfc5118(tcp: bool) {
    let transport = if tcp { "TCP" } else { "UDP" };
    let mut failures = Vec::new();
    let mut passed = 0;
    let mut servers: Vec<(ivr311::server::RunningServer, Vec<String>)> = Vec::new();
    eprintln!("RFC 5118 torture over {transport}");
    eprintln!("{:<36} {:<12} {:<16} result", "file", "expected", "got");
    let mut n = 0;
    for (name, expect, repair) in RFC5118 {
        let raw = dat(name);
        let fixed = repaired(&raw, *repair);
        let key = transaction_key(&fixed);
        let mut sends = vec![(name.to_string(), *expect, raw)];
        if *repair != Repair::None {
            sends.push((format!("{name}+repaired"), Normal, fixed));
        }
        for (label, expect, bytes) in sends {
            n += 1;
            let i = match servers
                .iter()
                .position(|(_, seen)| key.as_ref().is_none_or(|k| !seen.contains(k)))
            {
                Some(i) => i,
                None => {
                    servers.push((start_server(FileConfig::default()).await, Vec::new()));
                    servers.len() - 1
                }
            };
            servers[i].1.extend(key.clone());
            let sip = servers[i].0.sip_addr;
            let (rs, closed) = if tcp {
                tcp_exchange(sip, &label, &bytes).await
            } else {
                (udp_exchange(sip, &bytes).await, false)
            };
            let verdict = judge(&label, expect, &rs, closed, tcp);
            let live = alive(sip, 1000 + n).await;
            let mut note = match &verdict {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("FAIL: {e}"),
            };
            if !live {
                note.push_str(" FAIL: liveness OPTIONS got no 200");
            }
            eprintln!(
                "{:<36} {:<12} {:<16} {note}",
                label,
                format!("{expect:?}"),
                got(&rs, closed)
            );
            if verdict.is_ok() && live {
                passed += 1;
            } else {
                failures.push(format!("{label}: {note}"));
            }
        }
    }
    eprintln!(
        "RFC 5118 over {transport}: {passed}/{n} passed ({} servers)",
        servers.len()
    );
    for (srv, _) in servers {
        srv.shutdown().await;
    }
    assert!(failures.is_empty(), "{transport} failures: {failures:#?}");
}

#[tokio::test]
async fn rfc5118_ipv6_torture_over_udp() {
    run_rfc5118(false).await;
}

#[tokio::test]
async fn rfc5118_ipv6_torture_over_tcp() {
    run_rfc5118(true).await;
}

#[tokio::test]
async fn rfc4475_torture_over_udp() {
    run(false).await;
}

#[tokio::test]
async fn rfc4475_torture_over_tcp() {
    run(true).await;
}

#[test]
fn torture_files_are_byte_exact() {
    use sha2::{Digest, Sha256};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/torture");
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    let mut n = 0;
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, file) = line.split_once("  ").unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, sum, "{file} changed");
        n += 1;
    }
    assert_eq!(n, 50 + 12);
    assert_eq!(CASES.len(), 50);
    assert_eq!(RFC5118.len(), 12);
    // The two lengths INDEX.md calls out.
    assert_eq!(dat("baddn").len(), 331);
    // RFC 5118 as the RFC prints it: CRLF lines, its own Content-Length values, and the
    // 4.10 pair with no blank line after the headers.
    for (name, _, _) in RFC5118 {
        let b = dat(name);
        assert!(
            !b.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "{name}: bare LF"
        );
    }
    assert!(String::from_utf8(dat("ipv6-in-sdp"))
        .unwrap()
        .contains("Content-Length: 268\r\n"));
    assert!(!dat("ipv6-bug-abnf-3-colons").ends_with(b"\r\n\r\n"));
    let fixed = String::from_utf8(repaired(&dat("ipv6-in-sdp"), Repair::ContentLength)).unwrap();
    assert!(fixed.contains("Content-Length: 251\r\n"), "{fixed}");
}
