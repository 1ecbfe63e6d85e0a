//! Integration: the shipped city menu (menus/311.yaml) over real SIP and RTP, with the real
//! ticket database. What a caller hears is recognised from the RTP payloads themselves.

mod common;

use common::dns::TestDns;
use common::*;
use hickory_proto::rr::RecordType;
use ivr311::config::FileConfig;
use ivr311::dispatch::emergency::EmergencyMethod;
use ivr311::dispatch::tickets::{Channel, NewTicket};
use ivr311::media::g711::Codec;
use std::time::Duration;

/// The audit rows once the latest one has an outcome other than `started` (it is written just
/// after the call ends).
async fn settled_audits(
    store: &ivr311::dispatch::tickets::TicketStore,
) -> Vec<ivr311::dispatch::tickets::EmergencyAuditRow> {
    for _ in 0..50 {
        let rows = store.emergency_audits(10).await.unwrap();
        if rows.first().is_some_and(|r| r.outcome != "started") {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.emergency_audits(10).await.unwrap()
}

fn digits(id: u64) -> Vec<String> {
    id.to_string()
        .chars()
        .map(|c| format!("digit_{c}"))
        .collect()
}

#[tokio::test]
async fn pothole_ticket_with_zip_and_recording_is_filed_then_read_back() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, not an emergency, streets, pothole, ZIP 94103.
    ua.keys("1111").await;
    ua.keys("94103").await;
    // "You entered 9 4 1 0 3. After the tone, describe..." then the beep: speak for a second,
    // then press pound.
    until_recording(&mut ua, &srv).await;
    ua.speak(50).await;
    ua.press('#').await;
    let heard = ua.listen(Duration::from_millis(10000)).await;

    let all = srv.tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "one ticket filed");
    let t = &all[0];
    assert_eq!(t.service_code, "pothole");
    assert_eq!(t.zipcode.as_deref(), Some("94103"));
    assert_eq!(t.phone.as_deref(), Some("+15550001111"));
    assert_eq!(t.channel, Channel::Phone);
    assert_eq!(t.language.as_deref(), Some("en"));
    assert_eq!(t.call_id.as_deref(), Some(ua.call_id.as_str()));
    let recording = t.recording.clone().expect("the description was recorded");
    assert!(
        recording.ends_with(".wav") && !recording.contains('/'),
        "{recording}"
    );
    assert_eq!(
        t.media_url, None,
        "a caller's recording is not public media"
    );

    // The number is read back digit by digit (after "your service request number is").
    let mut names: Vec<&str> = vec!["ticket_filed"];
    let ds = digits(t.service_request_id);
    let ds_ref: Vec<&str> = ds.iter().map(String::as_str).collect();
    names.extend(ds_ref.iter());
    let ear = PromptEar::new(
        "en",
        &[
            "ticket_filed",
            "digit_0",
            "digit_1",
            "digit_2",
            "digit_3",
            "digit_4",
            "digit_5",
            "digit_6",
            "digit_7",
            "digit_8",
            "digit_9",
        ],
        Codec::Pcmu,
    );
    let got = ear.playbacks(&heard);
    assert_eq!(
        got.first().map(String::as_str),
        Some("ticket_filed"),
        "{got:?}"
    );
    assert_eq!(
        &got[1..got.len().min(9)],
        &ds[..],
        "read back digit by digit: {got:?}"
    );
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn status_lookup_of_a_filed_ticket_and_of_a_missing_one() {
    let srv = start_server(FileConfig::default()).await;
    let t = srv
        .tickets
        .file(NewTicket {
            service_code: "graffiti".into(),
            service_name: "Graffiti".into(),
            channel: Channel::Web,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("116").await;
    ua.keys(&t.service_request_id.to_string()).await;
    let ear = PromptEar::new(
        "en",
        &["ticket_status_open", "updated_today", "ticket_not_found"],
        Codec::Pcmu,
    );
    // The filing date is spoken between the two (rendered meanwhile: up to
    // `speech.timeout_ms` on a loaded machine).
    let heard = ua
        .listen_until("the status and its update", Duration::from_secs(30), |h| {
            ear.playbacks(h).iter().any(|p| p == "updated_today")
        })
        .await;
    assert_eq!(
        ear.playbacks(&heard),
        vec!["ticket_status_open", "updated_today"]
    );
    // A number that does not exist.
    ua.keys("6").await;
    ua.keys("99999998").await;
    let heard = ua
        .listen_until("not found", Duration::from_secs(15), |h| {
            !ear.playbacks(h).is_empty()
        })
        .await;
    assert_eq!(ear.playbacks(&heard), vec!["ticket_not_found"]);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn spanish_callers_hear_spanish() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("21").await;
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let ear = PromptEar::new("es", &["main_menu"], Codec::Pcmu);
    assert_eq!(ear.playbacks(&heard), vec!["main_menu"]);
    ua.bye().await;
    srv.shutdown().await;
}

#[tokio::test]
async fn emergency_with_no_uri_announces_and_hangs_up_and_is_audited() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("19").await; // English, then 9 at screening
    let heard = ua.listen(Duration::from_millis(4000)).await;
    let ear = PromptEar::new("en", &["connecting_911", "emergency_announce"], Codec::Pcmu);
    let got = ear.playbacks(&heard);
    assert_eq!(
        got.first().map(String::as_str),
        Some("connecting_911"),
        "{got:?}"
    );
    let bye = ua.expect_request("BYE", Duration::from_secs(20)).await;
    assert_eq!(bye.call_id, ua.call_id);
    let audits = settled_audits(&srv.tickets).await;
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].call_id, ua.call_id);
    assert_eq!(audits[0].method, EmergencyMethod::Announce.as_str());
    assert!(
        audits[0].outcome.starts_with("announced"),
        "{}",
        audits[0].outcome
    );
    assert!(
        audits[0].menu_path.contains("screening:9"),
        "{}",
        audits[0].menu_path
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn emergency_by_refer_follows_the_notify_and_is_audited() {
    let mut file = FileConfig::default();
    file.emergency.method = Some(EmergencyMethod::Refer);
    file.emergency.uri = Some("sip:911@127.0.0.1:5999".into());
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, not an emergency, streets, downed power lines (an emergency entry).
    ua.keys("1115").await;
    let refer = ua.expect_request("REFER", Duration::from_secs(10)).await;
    assert_eq!(refer.header("Refer-To"), Some("<sip:911@127.0.0.1:5999>"));
    // The audit row exists before the transfer starts.
    let audits = srv.tickets.emergency_audits(10).await.unwrap();
    assert_eq!(audits.len(), 1);
    assert_eq!(
        audits[0].reason.as_deref(),
        Some("downed or sparking power lines")
    );
    // Our phone reports the transfer succeeded.
    let notify = ua.in_dialog(
        "NOTIFY",
        "Event: refer\r\nSubscription-State: terminated;reason=noresource\r\nContent-Type: message/sipfrag\r\n",
        "SIP/2.0 200 OK\r\n",
    );
    ua.send_raw(&notify).await;
    ua.expect_request("BYE", Duration::from_secs(5)).await;
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0].outcome.starts_with("connected via refer"),
        "{}",
        audits[0].outcome
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn caller_hanging_up_mid_recording_still_files_the_ticket() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94110").await;
    until_recording(&mut ua, &srv).await;
    ua.speak(40).await;
    ua.bye().await;
    let all = until("the ticket is filed", Duration::from_secs(10), async || {
        let t = srv.tickets.list(&Default::default()).await.unwrap();
        (!t.is_empty()).then_some(t)
    })
    .await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].zipcode.as_deref(), Some("94110"));
    assert!(all[0].recording.is_some(), "the partial recording is kept");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_ticket_being_recorded_when_the_server_stops_is_still_filed() {
    let mut file = FileConfig::default();
    file.limits.drain_seconds = 1;
    let srv = start_server(file).await;
    let tickets = srv.tickets.clone();
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94107").await;
    until_recording(&mut ua, &srv).await;
    ua.speak(40).await;
    // SIGTERM while the caller describes the pothole: the drain runs out, the caller hears
    // goodbye and is hung up, and what they gave is filed.
    let stop = tokio::spawn(srv.shutdown());
    ua.listen(Duration::from_millis(1500)).await;
    ua.expect_request("BYE", Duration::from_secs(10)).await;
    stop.await.unwrap();
    let all = tickets.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 1, "the ticket is not lost to the shutdown");
    assert_eq!(all[0].zipcode.as_deref(), Some("94107"));
}

/// A stand-in for the 911 trunk: answers one INVITE and exchanges RTP.
struct Trunk {
    sip: tokio::net::UdpSocket,
    rtp: tokio::net::UdpSocket,
}

impl Trunk {
    async fn new() -> Trunk {
        Trunk {
            sip: tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            rtp: tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    /// `n` PCMA packets of `byte`, 20 ms apart, to `to`.
    async fn send_rtp(&self, to: std::net::SocketAddr, byte: u8, n: usize) {
        let mut s = ivr311::media::rtp::RtpStream::new();
        let mut out = [0u8; 200];
        for _ in 0..n {
            let len = s.write(8, &[byte; 160], 160, &mut out);
            self.rtp.send_to(&out[..len], to).await.unwrap();
            // Paced as a phone sends, one packet each 20 ms: not a wait.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn recv(
        &self,
        timeout: Duration,
    ) -> Option<(ivr311::sip::message::Message, std::net::SocketAddr)> {
        let mut buf = vec![0u8; 65535];
        let (n, from) = tokio::time::timeout(timeout, self.sip.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some((
            ivr311::sip::message::parse_datagram(&buf[..n], 65536).unwrap(),
            from,
        ))
    }
}

/// A server that bridges 911 calls to `trunk`, a caller (PCMU) who has pressed 9 at the
/// screening menu, and the INVITE the 911 side got (and where from).
async fn caller_presses_911_with_a_bridge(trunk: &Trunk) -> Pressed911 {
    let uri = format!("sip:911@{}", trunk.sip.local_addr().unwrap());
    caller_presses_911_bridged_to(&uri, FileConfig::default(), trunk).await
}

type Pressed911 = (
    ivr311::server::RunningServer,
    TestUa,
    ivr311::sip::message::Request,
    std::net::SocketAddr,
);

/// [`caller_presses_911_with_a_bridge`] with the bridge to `uri` (which reaches `trunk`) and
/// the rest of the config from `file`.
async fn caller_presses_911_bridged_to(uri: &str, file: FileConfig, trunk: &Trunk) -> Pressed911 {
    caller_presses_911_on(serve_args(), uri, file, trunk).await
}

/// [`caller_presses_911_bridged_to`] on a server started with `args`; the caller dials its
/// port on 127.0.0.1.
async fn caller_presses_911_on(
    args: ivr311::config::ServeArgs,
    uri: &str,
    file: FileConfig,
    trunk: &Trunk,
) -> Pressed911 {
    caller_presses_911_from([127, 0, 0, 1].into(), None, args, uri, file, trunk).await
}

/// [`caller_presses_911_on`], the caller dialling the server's port on `dial_ip`. With
/// `asserted`, the caller comes through a trusted trunk (its address, `dial_ip`'s loopback,
/// in `trunks.allow`) that asserts that number in P-Asserted-Identity.
async fn caller_presses_911_from(
    dial_ip: std::net::IpAddr,
    asserted: Option<&str>,
    args: ivr311::config::ServeArgs,
    uri: &str,
    mut file: FileConfig,
    trunk: &Trunk,
) -> Pressed911 {
    file.emergency.method = Some(EmergencyMethod::Bridge);
    file.emergency.uri = Some(uri.to_owned());
    if asserted.is_some() {
        file.trunks.allow = vec![dial_ip.to_string().parse().unwrap()];
    }
    let srv = start_server_with(args, file).await;
    let dial = std::net::SocketAddr::new(dial_ip, srv.sip_addr.port());
    let pai = asserted
        .map(|n| format!("P-Asserted-Identity: <sip:{n}@{dial_ip}>\r\n"))
        .unwrap_or_default();
    let mut ua = TestUa::udp(dial).await;
    assert_eq!(ua.call_with("0 101", &pai).await.1.code, 200);
    ua.until_audio().await;
    ua.keys("19").await;
    let (msg, from) = trunk
        .recv(Duration::from_secs(10))
        .await
        .expect("INVITE to 911");
    let ivr311::sip::message::Message::Request(inv) = msg else {
        panic!("not a request")
    };
    (srv, ua, inv, from)
}

/// Whether this machine gives dual-stack `[::]` sockets (IPv4 and IPv6 on one port) and
/// has `::1`.
fn dual_stack() -> bool {
    std::net::UdpSocket::bind("[::]:0").is_ok()
        && std::net::UdpSocket::bind("[::1]:0").is_ok()
        && std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "0")
}

/// A server bound to `[::]` (dual-stack, so it serves IPv4 and IPv6 callers on one port) still
/// reaches a PSAP whose name has only an IPv4 address: the lookup takes either family there.
#[tokio::test]
async fn a_dual_stack_server_bridges_911_to_a_psap_name_with_only_an_ipv4_address() {
    if !dual_stack() {
        eprintln!("skipped: no dual-stack [::] socket on this machine");
        return;
    }
    let trunk = Trunk::new().await;
    let port = trunk.sip.local_addr().unwrap().port();
    let mut args = serve_args();
    args.sip = "[::]:0".parse().unwrap();
    let named = format!("sip:911@localhost:{port}");
    let (srv, mut ua, inv, from) =
        caller_presses_911_on(args, &named, FileConfig::default(), &trunk).await;
    assert_eq!(inv.uri, named);
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    srv.shutdown().await;
}

/// A caller over IPv6 on a dual-stack server, bridged to a PSAP reached over IPv4: the PSAP
/// is offered an IPv4 media address (it cannot send to the caller's IPv6 one), named in
/// P-Asserted-Identity too, and 911 and the caller hear each other.
#[tokio::test]
async fn a_caller_over_ipv6_is_bridged_to_an_ipv4_psap_with_ipv4_media() {
    if !dual_stack() {
        eprintln!("skipped: no dual-stack [::] socket on this machine");
        return;
    }
    let trunk = Trunk::new().await;
    let psap = trunk.sip.local_addr().unwrap();
    let mut args = serve_args();
    args.sip = "[::]:0".parse().unwrap();
    let uri = format!("sip:911@{psap}");
    let (srv, mut ua, inv, from) = caller_presses_911_from(
        "::1".parse().unwrap(),
        Some("+15550001111"),
        args,
        &uri,
        FileConfig::default(),
        &trunk,
    )
    .await;
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    assert_eq!(offer.addr.ip(), psap.ip(), "media offered to the PSAP");
    // The number the trunk asserted, with our address in the PSAP's family.
    let pai = inv.header("P-Asserted-Identity").unwrap();
    assert!(pai.contains("+15550001111"), "{pai}");
    assert!(pai.contains("@127.0.0.1"), "{pai}");
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    // The caller's audio reaches the PSAP over IPv4.
    caller_is_heard_by_the_psap(ua, &trunk).await;
    srv.shutdown().await;
}

/// PSAPs and carriers hand out host names. The bridge looks the name up for the call and
/// sends the INVITE there, with the name kept in the Request-URI; a name that does not
/// resolve fails the bridge at once and the caller hears the announcement instead.
#[tokio::test]
async fn emergency_bridge_to_a_psap_named_by_host_name_gets_through() {
    let trunk = Trunk::new().await;
    let port = trunk.sip.local_addr().unwrap().port();
    let named = format!("sip:911@localhost:{port}");
    let (srv, mut ua, inv, from) =
        caller_presses_911_bridged_to(&named, FileConfig::default(), &trunk).await;
    assert_eq!(inv.uri, format!("sip:911@localhost:{port}"));
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    srv.shutdown().await;

    // RFC 2606: .invalid never resolves.
    let mut file = FileConfig::default();
    file.emergency.method = Some(EmergencyMethod::Bridge);
    file.emergency.uri = Some("sip:911@no-such-psap.invalid".into());
    file.emergency.announce_repeats = 1;
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("19").await;
    let outcome = announced_then_hung_up(&mut ua, &srv).await;
    assert!(outcome.contains("no-such-psap.invalid"), "{outcome}");
    srv.shutdown().await;
}

/// The caller hears the dial-911 announcement (the 911 methods having failed) and is hung up;
/// returns the audit's outcome, which says so.
async fn announced_then_hung_up(ua: &mut TestUa, srv: &ivr311::server::RunningServer) -> String {
    // A bridge that gets no answer gives way after a few seconds (BRIDGE_FIRST_RESPONSE).
    let heard = ua
        .listen_for("en", "emergency_announce", Duration::from_secs(12))
        .await;
    let ear = PromptEar::new("en", &["emergency_announce"], Codec::Pcmu);
    assert!(
        ear.frames_heard(&heard) >= 10,
        "the caller is told to dial 911"
    );
    ua.expect_request("BYE", Duration::from_secs(20)).await;
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0].outcome.starts_with("announced"),
        "{}",
        audits[0].outcome
    );
    audits[0].outcome.clone()
}

/// A second route to 911 (another carrier, the PSAP's alternate) is tried when the first
/// fails, before the caller is told to dial 911 themselves.
#[tokio::test]
async fn emergency_bridge_takes_the_backup_route_when_the_first_fails() {
    let backup = Trunk::new().await;
    let backup_uri = format!("sip:911@{}", backup.sip.local_addr().unwrap());
    let mut file = FileConfig::default();
    file.emergency.backup_uris = vec![backup_uri.clone()];
    // The first route's name does not resolve (RFC 2606), so it fails at once.
    let (srv, mut ua, inv, from) =
        caller_presses_911_bridged_to("sip:911@first-route.invalid", file, &backup).await;
    assert_eq!(inv.uri, backup_uri);
    psap_answers_and_is_heard(&backup, &inv, from, &mut ua, &srv).await;
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0]
            .outcome
            .contains("after bridge to sip:911@first-route.invalid: answered 503"),
        "{}",
        audits[0].outcome
    );
    srv.shutdown().await;
}

/// A TCP route whose far end refuses the connection fails at once (not after a transaction
/// timeout), and the backup route takes the call.
#[tokio::test]
async fn a_tcp_route_that_refuses_the_connection_gives_way_to_the_backup() {
    let backup = Trunk::new().await;
    let backup_uri = format!("sip:911@{}", backup.sip.local_addr().unwrap());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let first = format!("sip:911@127.0.0.1:{closed};transport=tcp");
    let mut file = FileConfig::default();
    file.emergency.backup_uris = vec![backup_uri.clone()];
    let (srv, mut ua, inv, from) = caller_presses_911_bridged_to(&first, file, &backup).await;
    assert_eq!(inv.uri, backup_uri);
    psap_answers_and_is_heard(&backup, &inv, from, &mut ua, &srv).await;
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0].outcome.contains(&format!(
            "after bridge to {first}: answered 503 TCP to 127.0.0.1:{closed}"
        )),
        "{}",
        audits[0].outcome
    );
    srv.shutdown().await;
}

/// The name psap.test has two addresses, the first of them down.
const PSAP_HOSTS: &str = "127.0.0.2 psap.test\n127.0.0.1 psap.test\n";

/// `trunk` (on 127.0.0.1) and a socket on 127.0.0.2 at the same port: the two addresses of
/// [`PSAP_HOSTS`]' name, the second reached at the first's port.
async fn psap_with_two_addresses(trunk: &Trunk) -> (tokio::net::UdpSocket, String) {
    let port = trunk.sip.local_addr().unwrap().port();
    let first = tokio::net::UdpSocket::bind(("127.0.0.2", port))
        .await
        .expect("127.0.0.2 is loopback on Linux");
    (first, format!("sip:911@psap.test:{port}"))
}

/// The INVITE `socket` got, if any, within `within`.
async fn invite_at(
    socket: &tokio::net::UdpSocket,
    within: Duration,
) -> Option<(ivr311::sip::message::Request, std::net::SocketAddr)> {
    let mut buf = vec![0u8; 65535];
    let (n, from) = tokio::time::timeout(within, socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    match ivr311::sip::message::parse_datagram(&buf[..n], 65536).ok()? {
        ivr311::sip::message::Message::Request(r) if r.method.as_str() == "INVITE" => {
            Some((r, from))
        }
        _ => None,
    }
}

/// A PSAP named with two addresses, the first of them down: the 911 bridge calls the first,
/// hears nothing for a few seconds, and calls the second before anything else (RFC 3263
/// section 4.3); the caller is connected to 911, and the audit says which address was down.
/// The addresses are in the hosts file, as cities put their PSAPs' names there, and the hosts
/// file wins over what DNS says for the name (an address where nothing listens).
#[tokio::test]
async fn a_psap_name_whose_first_address_is_down_is_reached_at_the_next() {
    let dns = TestDns::start().await;
    dns.hosts_file(PSAP_HOSTS)
        .address("psap.test", [127, 0, 0, 3].into());
    let file = FileConfig {
        dns: dns.config(),
        ..Default::default()
    };
    let trunk = Trunk::new().await;
    let (down, uri) = psap_with_two_addresses(&trunk).await;
    let (srv, mut ua, inv, from) = caller_presses_911_bridged_to(&uri, file, &trunk).await;
    // The first address got the INVITE (and said nothing); the name stays in the Request-URI.
    let (first, _) = invite_at(&down, Duration::ZERO)
        .await
        .expect("the first address was called first");
    assert_eq!(first.uri, uri);
    assert_eq!(inv.uri, uri);
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    let audits = settled_audits(&srv.tickets).await;
    let port = trunk.sip.local_addr().unwrap().port();
    assert!(
        audits[0].outcome.contains(&format!(
            "after bridge to {uri} at 127.0.0.2:{port}: no answer in time"
        )),
        "{}",
        audits[0].outcome
    );
    srv.shutdown().await;
}

/// A PSAP published the way carriers publish their gateways: the URI names the domain
/// without a port, and its SRV record (`_sip._udp`) gives the gateway's host and port. The
/// bridge follows it (RFC 3263 section 4.2) and reaches the PSAP, the domain kept in the
/// Request-URI.
///
/// The server looks the name up once at start (to warn when it does not resolve) and keeps
/// the answers as long as their TTL says: the call asks DNS nothing more.
#[tokio::test]
async fn a_psap_published_by_srv_is_reached_at_the_host_and_port_of_its_record() {
    let trunk = Trunk::new().await;
    let port = trunk.sip.local_addr().unwrap().port();
    let dns = TestDns::start().await;
    dns.srv("_sip._udp.psap.test", "gw1.psap.test", port, 10, 50)
        .address("gw1.psap.test", [127, 0, 0, 1].into());
    let mut file = bridge_911_to("sip:911@psap.test");
    file.dns = dns.config();
    let srv = start_server(file).await;
    // The lookup at start has been answered.
    let start = tokio::time::Instant::now();
    while dns.asked("gw1.psap.test", RecordType::A) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no lookup at start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ua = caller_pressing(srv.sip_addr, "19").await;
    let (msg, from) = trunk
        .recv(Duration::from_secs(10))
        .await
        .expect("INVITE to 911");
    let ivr311::sip::message::Message::Request(inv) = msg else {
        panic!("not a request")
    };
    assert_eq!(inv.uri, "sip:911@psap.test");
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    assert_eq!(dns.asked("_sip._udp.psap.test", RecordType::SRV), 1);
    assert_eq!(dns.asked("gw1.psap.test", RecordType::A), 1);
    srv.shutdown().await;
}

/// A single SRV record whose target is "." says the domain offers no SIP service (RFC 2782):
/// the bridge does not try the name as a host, it goes on to the backup route at once, and the
/// audit says why.
#[tokio::test]
async fn a_psap_whose_srv_record_says_no_service_is_passed_over_for_the_backup_route() {
    let dns = TestDns::start().await;
    dns.srv("_sip._udp.psap.test", ".", 0, 0, 0)
        .address("psap.test", [127, 0, 0, 2].into());
    let not_a_psap = tokio::net::UdpSocket::bind("127.0.0.2:5060").await.ok();
    let backup = Trunk::new().await;
    let backup_uri = format!("sip:911@{}", backup.sip.local_addr().unwrap());
    let mut file = FileConfig {
        dns: dns.config(),
        ..Default::default()
    };
    file.emergency.backup_uris = vec![backup_uri.clone()];
    let (srv, mut ua, inv, from) =
        caller_presses_911_bridged_to("sip:911@psap.test", file, &backup).await;
    assert_eq!(inv.uri, backup_uri);
    psap_answers_and_is_heard(&backup, &inv, from, &mut ua, &srv).await;
    if let Some(s) = not_a_psap {
        let mut buf = [0u8; 2048];
        assert!(
            s.try_recv_from(&mut buf).is_err(),
            "the name was taken as a host"
        );
    }
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0]
            .outcome
            .contains("_sip._udp.psap.test says no SIP service there"),
        "{}",
        audits[0].outcome
    );
    srv.shutdown().await;
}

/// Over TCP the service is looked up as `_sip._tcp`: a PSAP that takes TCP only and publishes
/// its gateway that way gets the INVITE on a connection to the record's host and port (a
/// `_sip._udp` record for the same name, pointing elsewhere, is not used).
#[tokio::test]
async fn a_tcp_psap_published_by_srv_is_called_over_tcp_at_its_record() {
    let psap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = psap.local_addr().unwrap().port();
    let dns = TestDns::start().await;
    dns.srv("_sip._tcp.psap.test", "gw1.psap.test", port, 10, 50)
        .srv("_sip._udp.psap.test", "gw1.psap.test", 9, 10, 50)
        .address("gw1.psap.test", [127, 0, 0, 1].into());
    let uri = "sip:911@psap.test;transport=tcp";
    let mut file = bridge_911_to(uri);
    file.dns = dns.config();
    let srv = start_server(file).await;
    let _ua = caller_pressing(srv.sip_addr, "19").await;
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), psap.accept())
        .await
        .expect("a TCP connection to the SRV record's port")
        .unwrap();
    let mut buf = Vec::new();
    let Some(ivr311::sip::message::Message::Request(inv)) =
        read_tcp_message(&mut conn, &mut buf).await
    else {
        panic!("no INVITE")
    };
    assert_eq!(inv.method.as_str(), "INVITE");
    assert_eq!(inv.uri, uri);
    srv.shutdown().await;
}

/// One SIP message from a TCP connection (after `buf`'s leftovers), or `None` at its end.
async fn read_tcp_message(
    conn: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<ivr311::sip::message::Message> {
    use ivr311::sip::message::{frame_stream, parse_stream_message, Frame};
    use tokio::io::AsyncReadExt;
    loop {
        match frame_stream(buf, 65536).unwrap() {
            Frame::Complete(n) => {
                let msg = parse_stream_message(&buf[..n], 65536).unwrap();
                buf.drain(..n);
                return Some(msg);
            }
            Frame::KeepAlive(n) => {
                buf.drain(..n);
            }
            Frame::Incomplete => {
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
                    .await
                    .ok()?
                    .ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// A 911 route over TCP that closes the connection while the call goes on (a border's idle
/// timer): the BYE when the caller hangs up goes on a connection opened again, and the 911
/// side gets it, so its call taker is not left on a dead line.
#[tokio::test]
async fn the_bye_to_a_tcp_route_goes_on_a_new_connection_after_the_first_closed() {
    use ivr311::sip::message::{Message, ResponseBuilder};
    use tokio::io::AsyncWriteExt;
    let psap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = psap.local_addr().unwrap().port();
    let media = Trunk::new().await;
    let uri = format!("sip:911@127.0.0.1:{port};transport=tcp");
    let srv = start_server(bridge_911_to(&uri)).await;
    let mut ua = caller_pressing(srv.sip_addr, "19").await;

    let (mut first, _) = tokio::time::timeout(Duration::from_secs(10), psap.accept())
        .await
        .expect("a TCP connection for the INVITE")
        .unwrap();
    let mut buf = Vec::new();
    let Some(Message::Request(inv)) = read_tcp_message(&mut first, &mut buf).await else {
        panic!("no INVITE")
    };
    assert_eq!(inv.method.as_str(), "INVITE");
    let ok = ResponseBuilder::new(&inv, 200, "OK", Some("psap1"))
        .header(
            "Contact",
            format!("<sip:911@127.0.0.1:{port};transport=tcp>"),
        )
        .body("application/sdp", psap_sdp(&media))
        .build();
    first.write_all(&ok).await.unwrap();
    let Some(Message::Request(ack)) = read_tcp_message(&mut first, &mut buf).await else {
        panic!("no ACK")
    };
    assert_eq!(ack.method.as_str(), "ACK");
    drop(first);
    // Not a wait: the case under test is a connection the border closed a while before the
    // caller hangs up (the server has no gauge of open connections to wait on).
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(ua.bye().await.code, 200);
    let (mut again, _) = tokio::time::timeout(Duration::from_secs(5), psap.accept())
        .await
        .expect("the BYE opens a connection again")
        .unwrap();
    let mut buf = Vec::new();
    let Some(Message::Request(bye)) = read_tcp_message(&mut again, &mut buf).await else {
        panic!("no BYE")
    };
    assert_eq!(bye.method.as_str(), "BYE");
    assert_eq!(bye.header("Call-ID"), inv.header("Call-ID"));
    srv.shutdown().await;
}

#[tokio::test]
async fn emergency_bridge_through_a_trunk_that_asks_for_credentials_gets_through() {
    use ivr311::sip::message::{Message, ResponseBuilder};
    use md5::{Digest, Md5};
    let trunk = Trunk::new().await;
    let mut file = FileConfig::default();
    file.trunks.auth = ivr311::sip::registrar::Credentials {
        username: "city311".into(),
        password: "s3cret".into(),
        realm: Some("carrier".into()),
    }
    .into();
    let uri = format!("sip:911@{}", trunk.sip.local_addr().unwrap());
    let (srv, mut ua, inv, from) = caller_presses_911_bridged_to(&uri, file, &trunk).await;
    assert!(inv.header("Proxy-Authorization").is_none());
    // The carrier's trunk asks for credentials, as registration-based trunks do.
    let challenge = ResponseBuilder::new(&inv, 407, "Proxy Authentication Required", Some("t1"))
        .header(
            "Proxy-Authenticate",
            "Digest realm=\"carrier\", nonce=\"5f1e9a\", qop=\"auth\", algorithm=MD5, opaque=\"op\"",
        )
        .build();
    trunk.sip.send_to(&challenge, from).await.unwrap();
    // The 407 is ACKed and the INVITE sent again, as the same call, with the digest.
    let again = loop {
        match trunk.recv(Duration::from_secs(5)).await {
            Some((Message::Request(r), _)) if r.method.as_str() == "INVITE" => break r,
            Some(_) => continue,
            None => panic!("no INVITE with credentials"),
        }
    };
    assert_eq!(
        (again.call_id.as_str(), again.cseq),
        (inv.call_id.as_str(), inv.cseq + 1)
    );
    let auth = again.header("Proxy-Authorization").expect("credentials");
    let param = |k: &str| -> String {
        let at = auth
            .find(&format!("{k}="))
            .unwrap_or_else(|| panic!("{k} in {auth}"));
        let v = &auth[at + k.len() + 1..];
        match v.strip_prefix('"') {
            Some(q) => q[..q.find('"').unwrap()].to_owned(),
            None => v.split([',', ' ']).next().unwrap().to_owned(),
        }
    };
    let md5 = |s: String| format!("{:x}", Md5::digest(s.as_bytes()));
    assert_eq!(param("uri"), inv.uri);
    let ha1 = md5("city311:carrier:s3cret".into());
    let ha2 = md5(format!("INVITE:{}", inv.uri));
    let want = md5(format!(
        "{ha1}:5f1e9a:{}:{}:auth:{ha2}",
        param("nc"),
        param("cnonce")
    ));
    assert_eq!(param("response"), want, "the digest is right: {auth}");
    assert_eq!(param("opaque"), "op");
    // The PSAP answers: the caller is bridged and hears it.
    psap_answers_and_is_heard(&trunk, &again, from, &mut ua, &srv).await;
    srv.shutdown().await;
}

/// The 911 side answers `inv` (from `from`) and talks: the caller hears it, and the audit says
/// the bridge connected.
async fn psap_answers_and_is_heard(
    trunk: &Trunk,
    inv: &ivr311::sip::message::Request,
    from: std::net::SocketAddr,
    ua: &mut TestUa,
    srv: &ivr311::server::RunningServer,
) {
    let ok = ivr311::sip::message::ResponseBuilder::new(inv, 200, "OK", Some("psap1"))
        .header(
            "Contact",
            format!("<sip:911@{}>", trunk.sip.local_addr().unwrap()),
        )
        .body("application/sdp", psap_sdp(trunk))
        .build();
    trunk.sip.send_to(&ok, from).await.unwrap();
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    trunk.send_rtp(offer.addr, 0xd5, 20).await;
    let heard = ua.listen(Duration::from_millis(300)).await;
    assert!(heard.len() >= 10, "911 audio reached the caller");
    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0].outcome.starts_with("connected via bridge"),
        "{}",
        audits[0].outcome
    );
}

/// The bridged caller speaks for half a second: the PSAP gets it as PCMA (its answer's
/// codec). Returns the caller.
async fn caller_is_heard_by_the_psap(mut ua: TestUa, trunk: &Trunk) -> TestUa {
    let caller_side = tokio::spawn(async move {
        ua.speak(25).await;
        ua
    });
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(700), trunk.rtp.recv_from(&mut buf)).await
    {
        if ivr311::media::rtp::parse(&buf[..n]).is_ok_and(|p| p.payload_type == 8) {
            got += 1;
        }
    }
    let ua = caller_side.await.unwrap();
    assert!(got >= 15, "caller audio reached 911: {got} packets");
    ua
}

/// The 911 side's SDP: PCMA and telephone-event at its RTP socket.
fn psap_sdp(trunk: &Trunk) -> String {
    format!(
        "v=0\r\no=psap 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\n",
        trunk.rtp.local_addr().unwrap().port()
    )
}

/// Listen until "Connecting you to 911." (English) has played to its end; returns how many
/// of its frames were heard. The bridge's INVITE goes out while it plays.
async fn notice_heard(ua: &mut TestUa) -> usize {
    let ear = PromptEar::new("en", &["connecting_911"], Codec::Pcmu);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut frames = 0;
    loop {
        let n = ear.frames_heard(&ua.listen(Duration::from_millis(200)).await);
        if n == 0 && frames > 0 {
            return frames;
        }
        frames += n;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notice did not end"
        );
    }
}

/// How many of `heard` (PCMU payloads) are frames of the ringback tone.
fn ringback_frames(heard: &[Vec<u8>]) -> usize {
    let tone = ivr311::media::prompt::ringback();
    let frames: std::collections::HashSet<&[u8]> =
        tone.encoded(Codec::Pcmu)[..16000].chunks(160).collect();
    heard.iter().filter(|p| frames.contains(&p[..])).count()
}

#[tokio::test]
async fn emergency_by_bridge_carries_the_callers_number_and_media_both_ways() {
    let trunk = Trunk::new().await;
    // The 911 side is called with the caller's number, as the caller's trunk asserted it, in
    // From and P-Asserted-Identity.
    let uri = format!("sip:911@{}", trunk.sip.local_addr().unwrap());
    let (srv, mut ua, inv, from) = caller_presses_911_from(
        [127, 0, 0, 1].into(),
        Some("+15550001111"),
        serve_args(),
        &uri,
        FileConfig::default(),
        &trunk,
    )
    .await;
    assert_eq!(inv.method.as_str(), "INVITE");
    assert_eq!(inv.from.user(), Some("+15550001111"));
    assert!(inv
        .header("P-Asserted-Identity")
        .unwrap()
        .contains("+15550001111"));
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();
    let ringing =
        ivr311::sip::message::ResponseBuilder::new(&inv, 180, "Ringing", Some("psap1")).build();
    trunk.sip.send_to(&ringing, from).await.unwrap();
    // The INVITE went out while "Connecting you to 911." plays; it is heard to its end.
    assert!(notice_heard(&mut ua).await >= 40, "the notice was heard");
    // While 911 rings, the caller hears the line ringing (not silence).
    let heard = ua.listen(Duration::from_millis(1500)).await;
    let rings = ringback_frames(&heard);
    assert!(
        rings >= 50,
        "ringback frames heard while 911 rang: {rings} of {}",
        heard.len()
    );
    let answer = psap_sdp(&trunk);
    let ok = ivr311::sip::message::ResponseBuilder::new(&inv, 200, "OK", Some("psap1"))
        .header(
            "Contact",
            format!("<sip:911@{}>", trunk.sip.local_addr().unwrap()),
        )
        .body("application/sdp", answer)
        .build();
    trunk.sip.send_to(&ok, from).await.unwrap();
    let (ack, _) = trunk.recv(Duration::from_secs(5)).await.expect("ACK");
    assert!(
        matches!(ack, ivr311::sip::message::Message::Request(ref r) if r.method.as_str() == "ACK")
    );

    // Caller -> 911: the caller's PCMU arrives at the trunk as PCMA.
    let mut ua = caller_is_heard_by_the_psap(ua, &trunk).await;
    // 911 -> caller.
    trunk.send_rtp(offer.addr, 0xd5, 20).await;
    let heard = ua.listen(Duration::from_millis(300)).await;
    assert!(
        heard.len() >= 10,
        "911 audio reached the caller: {}",
        heard.len()
    );

    let audits = settled_audits(&srv.tickets).await;
    assert!(
        audits[0].outcome.starts_with("connected via bridge"),
        "{}",
        audits[0].outcome
    );

    // The 911 side hangs up: the caller gets BYE.
    let bye = format!(
        "BYE sip:ivr311@{srv} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKpsapbye\r\nMax-Forwards: 70\r\nFrom: {to};tag=psap1\r\nTo: {fr}\r\nCall-ID: {cid}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        srv = srv.sip_addr,
        me = trunk.sip.local_addr().unwrap(),
        to = inv.to.raw,
        fr = inv.from.raw,
        cid = inv.call_id
    );
    trunk
        .sip
        .send_to(bye.as_bytes(), srv.sip_addr)
        .await
        .unwrap();
    ua.expect_request("BYE", Duration::from_secs(5)).await;
    srv.shutdown().await;
}

#[tokio::test]
async fn emergency_bridge_relays_the_911_sides_early_media_and_falls_back_when_it_fails() {
    use ivr311::sip::message::ResponseBuilder;
    let trunk = Trunk::new().await;
    let (srv, mut ua, inv, from) = caller_presses_911_with_a_bridge(&trunk).await;
    let offer = ivr311::media::sdp::parse(&inv.body).unwrap();

    // 183 Session Progress with SDP: the 911 side may play its own audio before answering.
    // It comes while "Connecting you to 911." plays: the notice is heard to its end first.
    // Until the 911 side sends any audio, the caller then hears our ringback, not silence.
    let sdp = psap_sdp(&trunk);
    let progress = ResponseBuilder::new(&inv, 183, "Session Progress", Some("psap1"))
        .body("application/sdp", sdp)
        .build();
    trunk.sip.send_to(&progress, from).await.unwrap();
    assert!(notice_heard(&mut ua).await >= 40, "the notice was heard");
    ua.listen(Duration::from_millis(150)).await;
    let heard = ua.listen(Duration::from_millis(600)).await;
    let rings = ringback_frames(&heard);
    assert!(
        rings >= 20,
        "ringback while the 911 side's early media was silent: {rings} of {}",
        heard.len()
    );

    // Its announcement (PCMA) reaches the caller transcoded, with no ringback over it.
    let (heard, ()) = tokio::join!(
        ua.listen(Duration::from_millis(800)),
        trunk.send_rtp(offer.addr, 0x2a, 30)
    );
    let mut expect = [0u8; 160];
    Codec::transcode(Codec::Pcma, Codec::Pcmu, &[0x2a; 160], &mut expect);
    let relayed = heard.iter().filter(|p| p[..] == expect[..]).count();
    let first = heard
        .iter()
        .position(|p| p[..] == expect[..])
        .unwrap_or(heard.len());
    let rings = ringback_frames(&heard[first..]);
    assert!(
        relayed >= 20 && rings == 0,
        "early media relayed: {relayed}, ringback over it: {rings}, of {}",
        heard.len()
    );

    // The announcement stops and the 911 side still has not answered: after a short pause
    // (a gap in speech must not bring the tone back), the caller hears ringing again.
    let pause = ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(ringback_frames(&pause), 0, "ringback within the gap");
    let heard = ua.listen(Duration::from_millis(2000)).await;
    let rings = ringback_frames(&heard);
    assert!(
        rings >= 25,
        "ringback after the 911 side's early media stopped: {rings} of {}",
        heard.len()
    );

    // The 911 side then refuses (486): the caller is not left on dead air but told to hang
    // up and dial 911 (the last method), and the audit row says what failed.
    let busy = ResponseBuilder::new(&inv, 486, "Busy Here", Some("psap1")).build();
    trunk.sip.send_to(&busy, from).await.unwrap();
    let heard = ua.listen(Duration::from_millis(3000)).await;
    let ear = PromptEar::new("en", &["emergency_announce"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&heard).first().map(String::as_str),
        Some("emergency_announce")
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn locked_database_when_filing_gets_an_apology_and_nothing_half_written() {
    use sqlx::Connection;
    let args = serve_args();
    let db = args.db.clone();
    let srv = start_server_with(args, FileConfig::default()).await;
    // Another process holds the database.
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();

    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94107").await;
    ua.skip_description("en").await; // file at once
    let heard = ua.listen(Duration::from_millis(6000)).await;
    let ear = PromptEar::new(
        "en",
        &["db_error", "operator_unavailable", "ticket_filed"],
        Codec::Pcmu,
    );
    let got = ear.playbacks(&heard);
    assert_eq!(got.first().map(String::as_str), Some("db_error"), "{got:?}");
    assert!(
        !got.contains(&"ticket_filed".to_string()),
        "no number read for an unsaved ticket"
    );
    ua.expect_request("BYE", Duration::from_secs(15)).await;

    // The database comes back: nothing was half-written, and the next caller is served.
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    assert_eq!(
        srv.tickets.list(&Default::default()).await.unwrap().len(),
        0
    );
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1111").await;
    ua.keys("94107").await;
    ua.skip_description("en").await;
    ua.listen(Duration::from_millis(1500)).await;
    assert_eq!(
        srv.tickets.list(&Default::default()).await.unwrap().len(),
        1
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn gas_smell_in_the_streets_menu_goes_to_911() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("1116").await;
    ua.listen(Duration::from_millis(500)).await;
    let audits = srv.tickets.emergency_audits(10).await.unwrap();
    assert_eq!(audits.len(), 1);
    assert_eq!(audits[0].reason.as_deref(), Some("gas smell"));
    srv.shutdown().await;
}

/// A caller who follows the ZIP prompt to the letter ("Enter the 5-digit ZIP code of the
/// location, then press pound": `1 0 4 5 8 #`, RFC 4733 keys) hears the ZIP read back, is
/// recorded, and the ticket carries the recording, in English and in Spanish. The pound is the
/// ZIP's: it must not skip the description that follows.
#[tokio::test]
async fn the_zip_prompts_pound_does_not_skip_the_description_in_either_language() {
    for (language_key, lang) in [('1', "en"), ('2', "es")] {
        let recordings =
            std::env::temp_dir().join(format!("ivr311-rec-zip-{}", rand::random::<u64>()));
        let mut file = FileConfig::default();
        file.storage.recordings_dir = recordings.clone();
        let srv = start_server(file).await;
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ua.until_audio().await;
        // Language, not an emergency, streets, pothole; then the ZIP and pound, as told.
        ua.keys(&format!("{language_key}111")).await;
        ua.keys("10458#").await;
        let heard = until_recording(&mut ua, &srv).await;
        let ear = PromptEar::new(
            lang,
            &[
                "you_entered",
                "record_description",
                "digit_4",
                "digit_5",
                "digit_8",
            ],
            Codec::Pcmu,
        );
        let got = ear.playbacks(&heard);
        assert_eq!(
            got.first().map(String::as_str),
            Some("you_entered"),
            "{lang}: the ZIP is read back: {got:?}"
        );
        assert!(
            got.ends_with(&[
                "digit_4".into(),
                "digit_5".into(),
                "digit_8".into(),
                "record_description".into()
            ]),
            "{lang}: {got:?}"
        );
        ua.speak(50).await;
        ua.press('#').await;
        let mut filed = Vec::new();
        for _ in 0..100 {
            filed = srv.tickets.list(&Default::default()).await.unwrap();
            if !filed.is_empty() {
                break;
            }
            ua.listen(Duration::from_millis(100)).await;
        }
        assert_eq!(filed.len(), 1, "{lang}: one ticket");
        let t = &filed[0];
        assert_eq!(t.zipcode.as_deref(), Some("10458"), "{lang}");
        assert_eq!(t.language.as_deref(), Some(lang));
        let name = t
            .recording
            .as_deref()
            .unwrap_or_else(|| panic!("{lang}: the description was recorded"));
        assert_eq!(
            t.media_url, None,
            "{lang}: a caller's voice is never published"
        );
        let wav = hound::WavReader::open(recordings.join(name)).expect("the recording is there");
        assert!(
            wav.duration() >= 8000 / 2,
            "{lang}: at least half a second of the caller's voice: {} samples",
            wav.duration()
        );
        ua.bye().await;
        srv.shutdown().await;
        let _ = std::fs::remove_dir_all(&recordings);
    }
}

/// The pound after a full request number is the number's, not "back" in the main menu that
/// follows the status: the 911 audit's menu path (what an operator and the audit see of how
/// the caller got there) has no `main:#` in it.
#[tokio::test]
async fn the_pound_after_a_request_number_is_not_a_menu_key() {
    let mut file = FileConfig::default();
    file.emergency.announce_repeats = 1;
    let srv = start_server(file).await;
    let t = srv
        .tickets
        .file(NewTicket {
            service_code: "graffiti".into(),
            service_name: "Graffiti".into(),
            channel: Channel::Web,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("216").await; // Spanish, not an emergency, status
    ua.keys(&format!("{}#", t.service_request_id)).await;
    // The spoken filing date comes between the status and its update.
    let heard = ua
        .listen_for("es", "main_menu_short", Duration::from_secs(30))
        .await;
    let ear = PromptEar::new(
        "es",
        &["ticket_status_open", "updated_today", "main_menu_short"],
        Codec::Pcmu,
    );
    assert_eq!(
        ear.playbacks(&heard),
        vec!["ticket_status_open", "updated_today", "main_menu_short"]
    );
    ua.keys("9").await;
    ua.expect_request("BYE", Duration::from_secs(30)).await;
    let audits = settled_audits(&srv.tickets).await;
    assert_eq!(
        audits[0].menu_path,
        "language:2 > screening:1 > main:6 > main:9"
    );
    srv.shutdown().await;
}

/// How long after the 9 key the first SIP request toward 911 leaves, for each method and
/// language: a bridge's INVITE goes out at the key, while "connecting you to 911" plays; a
/// REFER (the caller's phone leaves the call) after that short notice. The audit row is
/// written first either way. Prints the figures for BENCHMARKS.md ("911: key to first
/// request"): `cargo test --test menu_calls key_to_911 -- --nocapture`.
#[tokio::test]
async fn key_to_911_request_bridge_at_once_refer_after_a_short_notice() {
    const RUNS: usize = 3;
    let mut lines = Vec::new();
    for method in [EmergencyMethod::Bridge, EmergencyMethod::Refer] {
        let trunk = Trunk::new().await;
        let mut file = FileConfig::default();
        file.emergency.method = Some(method);
        file.emergency.uri = Some(format!("sip:911@{}", trunk.sip.local_addr().unwrap()));
        let srv = start_server(file).await;
        for (language_key, lang) in [('1', "en"), ('2', "es")] {
            let mut took = Vec::new();
            for _ in 0..RUNS {
                let mut ua = TestUa::udp(srv.sip_addr).await;
                assert_eq!(ua.call("0 101").await.code, 200);
                ua.until_audio().await;
                ua.press(language_key).await;
                ua.listen_for(lang, "screening", Duration::from_secs(5))
                    .await;
                // The key: its first RFC 4733 packet, which is when the server hears it.
                let key = std::time::Instant::now();
                let at = match method {
                    EmergencyMethod::Bridge => {
                        // This call's INVITE (not a retransmission or CANCEL of the last).
                        let call_id = ua.call_id.clone();
                        let invite = async {
                            loop {
                                match trunk.recv(Duration::from_secs(15)).await {
                                    Some((ivr311::sip::message::Message::Request(r), _))
                                        if r.method.as_str() == "INVITE"
                                            && r.header("X-311-Call-ID") == Some(&call_id) =>
                                    {
                                        return std::time::Instant::now()
                                    }
                                    Some(_) => continue,
                                    None => panic!("{lang}: no INVITE toward 911"),
                                }
                            }
                        };
                        let (_, at) = tokio::join!(ua.press('9'), invite);
                        at
                    }
                    _ => {
                        ua.press('9').await;
                        let r = ua.expect_request("REFER", Duration::from_secs(15)).await;
                        assert!(r.header("Refer-To").unwrap().contains("911@"));
                        std::time::Instant::now()
                    }
                };
                // The audit row was written before the transfer started.
                let audits = srv.tickets.emergency_audits(1).await.unwrap();
                assert_eq!(audits[0].call_id, ua.call_id, "{lang}: the audit row");
                took.push(at - key);
                ua.bye().await;
            }
            took.sort();
            let worst = *took.last().unwrap();
            let limit = match method {
                // The audit write and the INVITE: no prompt in between.
                EmergencyMethod::Bridge => Duration::from_millis(500),
                // "Connecting you to 911." (2.0 s rendered in English, 1.9 s in Spanish).
                _ => Duration::from_millis(3000),
            };
            assert!(
                worst < limit,
                "{} {lang}: key to first request {took:?}, limit {limit:?}",
                method.as_str()
            );
            let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
            lines.push(format!(
                "| {} | {lang} | {} | {} | {} |",
                method.as_str(),
                ms(took[0]),
                ms(took[RUNS / 2]),
                ms(worst)
            ));
        }
        srv.shutdown().await;
    }
    println!("| method | language | min ms | median ms | max ms |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for l in lines {
        println!("{l}");
    }
}

/// The shipped menu's server with its schedules read at `wall` (e.g. "2026-12-08T01:00:00Z").
async fn shipped_menu_at(wall: &str) -> ivr311::server::RunningServer {
    let clock = ivr311::menu::schedule::WallClock::starting_at(wall.parse().unwrap());
    start_server_at(serve_args(), FileConfig::default(), clock).await
}

/// Monday 2026-12-07 at 20:00 in New York, after the call centre closed at 19:00: the
/// operator key gives the hours and a message to be called back instead of a queue nobody
/// staffs; the message becomes a `call_back` ticket with the caller's number.
#[tokio::test]
async fn after_hours_the_operator_key_gives_the_hours_and_takes_a_message() {
    let srv = shipped_menu_at("2026-12-08T01:00:00Z").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, not an emergency, the operator.
    ua.keys("110").await;
    let heard = ua
        .listen_for("en", "after_hours", Duration::from_secs(15))
        .await;
    let ear = PromptEar::new("en", &["after_hours", "operator_unavailable"], Codec::Pcmu);
    assert_eq!(
        ear.playbacks(&heard),
        vec!["after_hours".to_owned()],
        "the hours, not the queue"
    );
    // A message to be called back: no ZIP, straight to the recording.
    ua.keys("1").await;
    until_recording(&mut ua, &srv).await;
    ua.speak(50).await;
    ua.press('#').await;
    let filed = until(
        "the call_back ticket",
        Duration::from_secs(15),
        async || {
            let all = srv.tickets.list(&Default::default()).await.unwrap();
            (!all.is_empty()).then_some(all)
        },
    )
    .await;
    assert_eq!(filed.len(), 1);
    let t = &filed[0];
    assert_eq!(t.service_code, "call_back");
    assert_eq!(t.phone.as_deref(), Some("+15550001111"));
    assert!(t.recording.is_some(), "the message was recorded");
    ua.bye().await;
    srv.shutdown().await;
}

/// The same Monday at 10:00 (and the hour after the spring DST change, when 10:00 EDT is
/// 14:00Z): the operator key goes to the queue (none is configured here, so the caller is
/// offered a general request, as any caller asking for an operator is).
#[tokio::test]
async fn in_hours_the_operator_key_goes_to_the_queue() {
    for wall in ["2026-12-07T15:00:00Z", "2027-03-15T14:00:00Z"] {
        let srv = shipped_menu_at(wall).await;
        let mut ua = TestUa::udp(srv.sip_addr).await;
        assert_eq!(ua.call("0 101").await.code, 200);
        ua.until_audio().await;
        ua.keys("110").await;
        let heard = ua
            .listen_for("en", "offer_general_ticket", Duration::from_secs(15))
            .await;
        let ear = PromptEar::new("en", &["after_hours", "offer_general_ticket"], Codec::Pcmu);
        assert_eq!(
            ear.playbacks(&heard),
            vec!["offer_general_ticket".to_owned()],
            "{wall}"
        );
        ua.bye().await;
        srv.shutdown().await;
    }
}

/// Christmas Day 2026, a Friday, at noon: a holiday, so closed.
#[tokio::test]
async fn on_a_holiday_the_operator_key_gives_the_hours() {
    let srv = shipped_menu_at("2026-12-25T17:00:00Z").await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("110").await;
    let heard = ua
        .listen_for("en", "after_hours", Duration::from_secs(15))
        .await;
    let ear = PromptEar::new("en", &["after_hours"], Codec::Pcmu);
    assert!(ear.frames_heard(&heard) >= 10);
    ua.bye().await;
    srv.shutdown().await;
}

/// The 988 lifeline from the screening menu (key 8): bridged like 911 to the `transfers`
/// entry marked `crisis: true`, the audit row written first and naming the destination.
#[tokio::test]
async fn the_988_lifeline_is_reached_from_screening_and_audited() {
    let trunk = Trunk::new().await;
    // 911 goes to the same trunk: the request URI tells them apart.
    let mut file = bridge_911_to(&format!("sip:911@{}", trunk.sip.local_addr().unwrap()));
    file.transfers = ivr311::config::TransfersConfig(vec![ivr311::config::TransferLine {
        name: "lifeline".into(),
        number: "988".into(),
        uri: format!("sip:988@{}", trunk.sip.local_addr().unwrap()),
        headers: Default::default(),
        ring_timeout_seconds: 20,
        crisis: true,
    }]);
    let srv = start_server(file).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    // English, then 8 at the screening menu.
    ua.keys("18").await;
    let (msg, from) = trunk
        .recv(Duration::from_secs(10))
        .await
        .expect("INVITE to the lifeline");
    let ivr311::sip::message::Message::Request(inv) = msg else {
        panic!("not a request")
    };
    assert_eq!(inv.method.as_str(), "INVITE");
    assert!(inv.uri.starts_with("sip:988@"), "{}", inv.uri);
    // The audit row is there before the line answers, naming it.
    let started = srv.tickets.emergency_audits(10).await.unwrap();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].destination.as_deref(), Some("lifeline"));
    assert!(
        started[0].menu_path.ends_with("screening:8"),
        "{}",
        started[0].menu_path
    );
    // It answers and talks: the caller hears it, and the audit says connected.
    psap_answers_and_is_heard(&trunk, &inv, from, &mut ua, &srv).await;
    let audits = settled_audits(&srv.tickets).await;
    assert_eq!(audits.len(), 1, "one row: no 911 redirect besides");
    assert_eq!(audits[0].destination.as_deref(), Some("lifeline"));
    srv.shutdown().await;
}

/// Key 8 with no lifeline configured: the caller is told to dial 988 (audited, announced).
#[tokio::test]
async fn the_lifeline_key_with_no_line_configured_tells_the_caller_to_dial_988() {
    let srv = start_server(FileConfig::default()).await;
    let mut ua = TestUa::udp(srv.sip_addr).await;
    assert_eq!(ua.call("0 101").await.code, 200);
    ua.until_audio().await;
    ua.keys("18").await;
    let heard = ua
        .listen_for("en", "lifeline_unreachable", Duration::from_secs(15))
        .await;
    let ear = PromptEar::new(
        "en",
        &[
            "connecting_transfer",
            "lifeline_unreachable",
            "emergency_announce",
        ],
        Codec::Pcmu,
    );
    let got = ear.playbacks(&heard);
    assert_eq!(
        got.first().map(String::as_str),
        Some("connecting_transfer"),
        "{got:?}"
    );
    assert!(got.contains(&"lifeline_unreachable".to_owned()), "{got:?}");
    let audits = settled_audits(&srv.tickets).await;
    assert_eq!(audits[0].destination.as_deref(), Some("lifeline"));
    assert_eq!(audits[0].method, "announce");
    srv.shutdown().await;
}
