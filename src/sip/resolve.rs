//! Host names in the URIs we send requests to: the 911 side (`emergency.uri`), the call-back
//! trunk (`callback.trunk_uri`) and the trunk's registrar (`trunks.register.registrar`).
//!
//! Carriers and PSAPs hand out names (`sip:911@psap.city.example.gov`), and a bridge to 911 that
//! only took IP literals failed at the worst moment: at the emergency call, falling back to
//! telling the caller to dial 911 themselves. A name is now looked up for every INVITE (and
//! every REGISTER), so a changed DNS record takes effect without a restart.
//!
//! How, after RFC 3263 section 4 ([`resolve_all`]):
//! - A name without a port is first looked up as a SIP service: the SRV records of
//!   `_sip._udp.<name>` (`_sip._tcp.` for `;transport=tcp`), through the system resolver's
//!   `res_query` ([`srv`]), ordered by priority and, within one, by a weighted random draw
//!   (RFC 2782: [`srv_order`]). Carriers publish their gateways this way, each with its port.
//!   A name without SRV records (most of them) is taken as a host at port 5060.
//! - Each host is looked up A/AAAA through the system resolver (`getaddrinfo`, which also
//!   reads `/etc/hosts`).
//! - Of those addresses, the ones our SIP socket can reach ([`reaches`]: its own family, or
//!   either family when it is bound to `[::]`, dual-stack) are kept, in that order. A request
//!   goes to the first, and the 911 bridge, the call-back and the registration move on to the
//!   next when one is down (RFC 3263 section 4.3: no response, a transport error, or 503).
//!
//! NAPTR records are not consulted (the transport is UDP unless the URI says
//! `;transport=tcp`). Lookups run off the async threads and are limited: the SRV query to
//! [`SRV_WITHIN`] (a resolver that does not answer it is taken as "no SRV records"), the
//! address lookups after it to [`RESOLVE_WITHIN`] together, so a stalled resolver fails the
//! request within 3 s instead of holding a 911 caller.

use crate::sip::message::{uri_host_and_port, uri_host_port, uri_socket_addr, uri_transport};
use std::net::SocketAddr;
use std::time::Duration;

/// How long the address lookups of one request may take together before it fails.
pub const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// How long the SRV query may take before the name is taken as a plain host.
pub const SRV_WITHIN: Duration = Duration::from_secs(1);

/// Whether `uri`'s host is a name (not an IP literal), i.e. needs [`resolve`].
pub fn needs_lookup(uri: &str) -> bool {
    uri_socket_addr(uri).is_none() && uri_host_port(uri).is_some()
}

/// A host name as RFC 3261's `hostname` allows it: labels of letters, digits and hyphens.
pub fn valid_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Whether our SIP socket, bound to `bound`, can send to `addr`: an address of its own family,
/// or either family when it is bound to the IPv6 wildcard. Such a socket is dual-stack (Linux's
/// default, `net.ipv6.bindv6only=0`), and the transport sends to an IPv4 peer at its mapped
/// address; where the system makes it IPv6-only, that send fails and says so. (Before this, a
/// server on `[::]` took only the AAAA records of a name, so a PSAP with an A record alone got
/// no INVITE and every 911 caller heard the announcement instead.)
pub fn reaches(bound: SocketAddr, addr: SocketAddr) -> bool {
    addr.is_ipv4() == bound.is_ipv4() || (bound.is_ipv6() && bound.ip().is_unspecified())
}

/// The address to send to for `uri`: its IP literal as it is, or the first of its host name's
/// addresses that `bound` can send to ([`resolve_all`]).
pub async fn resolve(uri: &str, bound: SocketAddr) -> Result<SocketAddr, String> {
    Ok(resolve_all(uri, bound).await?[0])
}

/// Every address `uri` may be reached at, in the order to try them: its IP literal alone, or
/// the addresses its name leads to (SRV targets first when the URI gives no port, see the
/// module's docs) that [`reaches`] says `bound` can send to, each once. Never empty when `Ok`.
pub async fn resolve_all(uri: &str, bound: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    if let Some(a) = uri_socket_addr(uri) {
        return Ok(vec![a]);
    }
    let (host, port) = uri_host_and_port(uri).ok_or_else(|| format!("no host in {uri:?}"))?;
    if !valid_hostname(host) {
        return Err(format!("{host:?} is not a host name"));
    }
    let hosts = match port {
        Some(p) => vec![(host.to_owned(), p)],
        None => match service_hosts(host, uri_transport(uri).as_deref() == Some("tcp")).await {
            Some(Ok(hosts)) => hosts,
            Some(Err(why)) => return Err(why),
            None => vec![(host.to_owned(), 5060)],
        },
    };
    let within = tokio::time::Instant::now() + RESOLVE_WITHIN;
    let mut usable = Vec::new();
    let mut other_family = None;
    let mut failed = None;
    for (name, port) in &hosts {
        let found = match tokio::time::timeout_at(within, tokio::net::lookup_host((&**name, *port)))
            .await
        {
            Err(_) => {
                failed.get_or_insert(format!("looking up {name} took over {RESOLVE_WITHIN:?}"));
                break;
            }
            Ok(Err(e)) => {
                failed.get_or_insert(format!("cannot look up {name}: {e}"));
                continue;
            }
            Ok(Ok(found)) => found,
        };
        for a in found {
            if !reaches(bound, a) {
                other_family.get_or_insert(a);
            } else if !usable.contains(&a) {
                usable.push(a);
            }
        }
    }
    if usable.is_empty() {
        return Err(match (failed, other_family) {
            (Some(why), _) => why,
            (None, Some(a)) => {
                format!("{host} has only {a} and the like, not of our SIP socket's family")
            }
            (None, None) => format!("{host} has no address"),
        });
    }
    Ok(usable)
}

/// The hosts (and ports) `name`'s SIP service is offered at, from its SRV records in the
/// order to try them; `None` when it has none (or the query failed or timed out: the name is
/// then tried as a host), an error when the records say there is no such service (RFC 2782:
/// a single target ".").
async fn service_hosts(name: &str, tcp: bool) -> Option<Result<Vec<(String, u16)>, String>> {
    let service = format!("_sip._{}.{name}", if tcp { "tcp" } else { "udp" });
    let query = service.clone();
    let records =
        tokio::time::timeout(SRV_WITHIN, tokio::task::spawn_blocking(move || srv(&query))).await;
    let records = match records {
        Ok(Ok(Ok(records))) => records,
        Ok(Ok(Err(why))) => {
            tracing::debug!(%service, %why, "no SRV records; taken as a host");
            return None;
        }
        Ok(Err(_)) | Err(_) => {
            tracing::warn!(%service, "SRV query unanswered within {SRV_WITHIN:?}; taken as a host");
            return None;
        }
    };
    if records.is_empty() {
        return None;
    }
    if records.len() == 1 && records[0].target == "." {
        return Some(Err(format!(
            "{service} says no SIP service there (SRV target \".\")"
        )));
    }
    let ordered = srv_order(records, &mut |n| rand::random::<u32>() % n);
    Some(Ok(ordered
        .into_iter()
        .filter(|r| r.target != ".")
        .map(|r| (r.target, r.port))
        .collect()))
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The host, without its trailing dot ("." alone: no service).
    pub target: String,
}

/// `records` in the order to try them (RFC 2782): lowest priority first; within a priority,
/// each next one drawn at random in proportion to its weight (those of weight 0 first, so
/// they are drawn only rarely, as the RFC asks). `draw(n)` is a random number below `n`.
pub fn srv_order(mut records: Vec<Srv>, draw: &mut dyn FnMut(u32) -> u32) -> Vec<Srv> {
    records.sort_by_key(|r| (r.priority, r.weight != 0));
    let mut out = Vec::with_capacity(records.len());
    while !records.is_empty() {
        let prio = records[0].priority;
        let mut group: Vec<Srv> = Vec::new();
        while records.first().is_some_and(|r| r.priority == prio) {
            group.push(records.remove(0));
        }
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let pick = if total == 0 || group.len() == 1 {
                0
            } else {
                let mut x = draw(total + 1);
                group
                    .iter()
                    .position(|r| {
                        let w = u32::from(r.weight);
                        if x <= w {
                            true
                        } else {
                            x -= w;
                            false
                        }
                    })
                    .unwrap_or(group.len() - 1)
            };
            out.push(group.remove(pick));
        }
    }
    out
}

/// The SRV records of `name`, asked of the system resolver (`res_query`, as configured in
/// `/etc/resolv.conf`); blocking. An error when it has none or the resolver fails.
pub fn srv(name: &str) -> Result<Vec<Srv>, String> {
    #[cfg(target_os = "linux")]
    {
        let cname = std::ffi::CString::new(name).map_err(|_| "NUL in name".to_owned())?;
        let mut answer = vec![0u8; 4096];
        // SAFETY: `cname` is a NUL-terminated string and `answer` a writable buffer of the
        // length passed; res_query writes at most that many bytes and returns how many.
        let n = unsafe {
            res_query(
                cname.as_ptr(),
                1,  // class IN
                33, // type SRV
                answer.as_mut_ptr(),
                answer.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(format!("no SRV records for {name}"));
        }
        answer.truncate((n as usize).min(answer.len()));
        parse_srv_answer(&answer)
    }
    #[cfg(not(target_os = "linux"))]
    Err(format!("SRV lookups are not done on this system ({name})"))
}

#[cfg(target_os = "linux")]
extern "C" {
    /// glibc (in libc itself since 2.34) and musl.
    fn res_query(
        dname: *const libc::c_char,
        class: libc::c_int,
        type_: libc::c_int,
        answer: *mut u8,
        anslen: libc::c_int,
    ) -> libc::c_int;
}

/// The SRV records in a DNS answer (RFC 1035 section 4.1; names may be compressed).
pub fn parse_srv_answer(msg: &[u8]) -> Result<Vec<Srv>, String> {
    let short = || "DNS answer cut short".to_owned();
    let u16_at = |i: usize| -> Result<u16, String> {
        Ok(u16::from_be_bytes([
            *msg.get(i).ok_or_else(short)?,
            *msg.get(i + 1).ok_or_else(short)?,
        ]))
    };
    let rcode = u16_at(2)? & 0xf;
    if rcode != 0 {
        return Err(format!("DNS answered rcode {rcode}"));
    }
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut i = 12;
    for _ in 0..questions {
        i = dns_name(msg, i)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        i = dns_name(msg, i)?.1;
        let (rtype, len) = (u16_at(i)?, usize::from(u16_at(i + 8)?));
        let data = i + 10;
        if data + len > msg.len() {
            return Err(short());
        }
        if rtype == 33 {
            let target = dns_name(msg, data + 6)?.0;
            out.push(Srv {
                priority: u16_at(data)?,
                weight: u16_at(data + 2)?,
                port: u16_at(data + 4)?,
                target: if target.is_empty() {
                    ".".into()
                } else {
                    target
                },
            });
        }
        i = data + len;
    }
    Ok(out)
}

/// The name at `at` in `msg` (following compression pointers) and where the data after it
/// starts.
fn dns_name(msg: &[u8], at: usize) -> Result<(String, usize), String> {
    let mut name = String::new();
    let (mut i, mut end, mut jumps) = (at, None, 0);
    loop {
        let len = *msg.get(i).ok_or("DNS name cut short")?;
        match len {
            0 => return Ok((name, end.unwrap_or(i + 1))),
            l if l & 0xc0 == 0xc0 => {
                let low = *msg.get(i + 1).ok_or("DNS name cut short")?;
                end.get_or_insert(i + 2);
                jumps += 1;
                if jumps > 32 {
                    return Err("DNS name loops".into());
                }
                i = usize::from(l & 0x3f) << 8 | usize::from(low);
            }
            l => {
                let label = msg
                    .get(i + 1..i + 1 + usize::from(l))
                    .ok_or("DNS name cut short")?;
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(&String::from_utf8_lossy(label));
                i += 1 + usize::from(l);
            }
        }
    }
}

/// Which of a name's addresses `all` (never empty) a repeated request goes to: the one it
/// went to last (`current`) while that keeps working, the next after it once it `failed`, and
/// the first when the last is not among them (the name moved, or nothing was sent yet). So a
/// trunk registration whose registrar's first address is down registers at the second on its
/// next attempt, and stays there.
pub fn choose(all: &[SocketAddr], current: Option<SocketAddr>, failed: bool) -> SocketAddr {
    match current.and_then(|c| all.iter().position(|a| *a == c)) {
        Some(i) if failed => all[(i + 1) % all.len()],
        Some(i) => all[i],
        None => all[0],
    }
}

/// [`choose`] for a request repeated after failures: once the last address `failed`, the next
/// is the first of `all` not in `tried` (the addresses that failed since the last success), and
/// only when every one of them has failed, the one after the last. A name's SRV records of equal
/// priority come in a new weighted draw at each lookup (RFC 2782), so "the address after the
/// one that failed" in the new order could be one that failed already, while another was never
/// tried.
pub fn choose_untried(
    all: &[SocketAddr],
    tried: &[SocketAddr],
    current: Option<SocketAddr>,
    failed: bool,
) -> SocketAddr {
    if failed {
        if let Some(a) = all.iter().find(|a| !tried.contains(a)) {
            return *a;
        }
    }
    choose(all, current, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_literals() {
        assert!(needs_lookup("sip:911@psap.example.gov"));
        assert!(needs_lookup("sip:carrier.example.net:5080;transport=udp"));
        assert!(!needs_lookup("sip:911@192.0.2.10:5060"));
        assert!(!needs_lookup("sip:[2001:db8::1]"));
        assert!(valid_hostname("psap.example.gov"));
        assert!(valid_hostname("localhost"));
        assert!(!valid_hostname("bad_host.example"));
        assert!(!valid_hostname("-x.example"));
        assert!(!valid_hostname("a..b"));
    }

    /// A DNS answer as a server sends it: the question, then SRV records whose owner names
    /// point back at the question (compression), one target written out and one compressed.
    fn srv_answer() -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0];
        for label in ["_sip", "_udp", "carrier", "test"] {
            m.push(label.len() as u8);
            m.extend(label.as_bytes());
        }
        m.extend([0, 0, 33, 0, 1]);
        let record = |m: &mut Vec<u8>, prio: u16, weight: u16, port: u16, target: &[u8]| {
            m.extend([0xc0, 12, 0, 33, 0, 1, 0, 0, 0x0e, 0x10]);
            m.extend(((6 + target.len()) as u16).to_be_bytes());
            m.extend(prio.to_be_bytes());
            m.extend(weight.to_be_bytes());
            m.extend(port.to_be_bytes());
            m.extend(target);
        };
        record(&mut m, 20, 0, 5080, b"\x03gw2\x07carrier\x04test\x00");
        // "gw1" then a pointer to "carrier.test" inside the question (offset 22).
        record(&mut m, 10, 60, 5070, b"\x03gw1\xc0\x16");
        // An A record in the answer section is skipped.
        m.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
        m
    }

    #[test]
    fn srv_records_are_read_from_a_dns_answer_with_compressed_names() {
        let got = parse_srv_answer(&srv_answer()).unwrap();
        assert_eq!(
            got,
            vec![
                Srv {
                    priority: 20,
                    weight: 0,
                    port: 5080,
                    target: "gw2.carrier.test".into()
                },
                Srv {
                    priority: 10,
                    weight: 60,
                    port: 5070,
                    target: "gw1.carrier.test".into()
                },
            ]
        );
        // Cut anywhere, the answer is refused, not misread.
        let full = srv_answer();
        for cut in 0..full.len() - 16 {
            assert!(parse_srv_answer(&full[..cut]).is_err(), "cut at {cut}");
        }
        // A name pointing at itself is refused.
        let mut looped = full.clone();
        looped[12] = 0xc0;
        looped[13] = 12;
        assert!(parse_srv_answer(&looped).is_err());
        // NXDOMAIN.
        let mut nx = full;
        nx[3] = 0x83;
        assert!(parse_srv_answer(&nx).unwrap_err().contains("rcode 3"));
    }

    #[test]
    fn srv_records_are_tried_by_priority_then_by_weighted_draw() {
        let r = |priority, weight, target: &str| Srv {
            priority,
            weight,
            port: 5060,
            target: target.into(),
        };
        let records = vec![
            r(20, 0, "backup"),
            r(10, 30, "b"),
            r(10, 70, "a"),
            r(10, 0, "z"),
        ];
        let order = |draws: &[u32]| {
            let mut draws = draws.iter().copied();
            let mut draw = |n: u32| {
                let x = draws.next().unwrap();
                assert!(x < n);
                x
            };
            let ordered = srv_order(records.clone(), &mut draw);
            ordered.into_iter().map(|r| r.target).collect::<Vec<_>>()
        };
        // Priority 10 first (weights 0, 30, 70 in the draw's order: z, b, a), backup last.
        // A draw of 50 (of 0..=100) lands in a's share (31..=100), then 10 in b's (1..=30).
        assert_eq!(order(&[50, 10]), ["a", "b", "z", "backup"]);
        // 0 falls to the weight-0 record first: rarely, as RFC 2782 means it.
        assert_eq!(order(&[0, 5]), ["z", "b", "a", "backup"]);
        assert_eq!(order(&[20, 40]), ["b", "a", "z", "backup"]);
    }

    #[test]
    fn a_repeated_request_stays_at_a_working_address_and_moves_on_from_a_failed_one() {
        let a: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:5060".parse().unwrap();
        let c: SocketAddr = "192.0.2.3:5060".parse().unwrap();
        let all = [a, b, c];
        assert_eq!(choose(&all, None, false), a);
        assert_eq!(choose(&all, None, true), a);
        assert_eq!(choose(&all, Some(b), false), b);
        assert_eq!(choose(&all, Some(b), true), c);
        assert_eq!(choose(&all, Some(c), true), a, "round again");
        let gone: SocketAddr = "198.51.100.1:5060".parse().unwrap();
        assert_eq!(choose(&all, Some(gone), true), a, "the name moved");
        assert_eq!(choose(&[a], Some(a), true), a);

        // A new draw of equal-priority SRV records put the failed `a` after `c`: the next is
        // `b`, which has not failed, not `a` again.
        let redrawn = [c, a, b];
        assert_eq!(choose(&redrawn, Some(c), true), a);
        assert_eq!(choose_untried(&redrawn, &[a, c], Some(c), true), b);
        // Every address failed: round again from the last.
        assert_eq!(choose_untried(&redrawn, &[a, b, c], Some(b), true), c);
        // Working: stay.
        assert_eq!(choose_untried(&redrawn, &[a], Some(c), false), c);
    }

    #[tokio::test]
    async fn localhost_is_looked_up_in_our_family_and_invalid_names_fail() {
        let v4: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let a = resolve("sip:911@localhost:5099", v4).await.unwrap();
        assert_eq!(a, "127.0.0.1:5099".parse().unwrap());
        // Literals are taken as they are.
        let b = resolve("sip:192.0.2.7", v4).await.unwrap();
        assert_eq!(b, "192.0.2.7:5060".parse().unwrap());
        // RFC 2606: .invalid never resolves.
        let e = resolve("sip:911@no-such-psap.invalid", v4)
            .await
            .unwrap_err();
        assert!(e.contains("no-such-psap.invalid"), "{e}");
        // Bound to [::] (dual-stack), a name with only an IPv4 address is reachable; bound to
        // [::1] alone, it is not.
        let dual: SocketAddr = "[::]:5060".parse().unwrap();
        let a = resolve("sip:911@localhost:5099", dual).await.unwrap();
        assert!(reaches(dual, a), "{a}");
        let v6_only: SocketAddr = "[::1]:5060".parse().unwrap();
        assert!(!reaches(v6_only, "127.0.0.1:5099".parse().unwrap()));
        assert!(!reaches(v4, "[::1]:5099".parse().unwrap()));
        assert!(reaches(v6_only, "[::1]:5099".parse().unwrap()));
    }
}
