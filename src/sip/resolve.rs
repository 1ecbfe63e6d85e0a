//! Host names in the URIs we send requests to: the 911 side (`emergency.uri`), the call-back
//! trunk (`callback.trunk_uri`) and the trunk's registrar (`trunks.register.registrar`).
//!
//! Carriers and PSAPs hand out names (`sip:911@psap.city.example.gov`), and a bridge to 911 that
//! only took IP literals failed at the worst moment: at the emergency call, falling back to
//! telling the caller to dial 911 themselves. A name is now looked up for every INVITE (and
//! every REGISTER), so a changed DNS record takes effect without a restart.
//!
//! The lookup is A/AAAA through the system resolver (`getaddrinfo`, which also reads
//! `/etc/hosts`), run off the async threads by tokio, and limited to [`RESOLVE_WITHIN`]: a
//! stalled resolver fails the request instead of holding a 911 caller. SRV and NAPTR
//! (RFC 3263) are not consulted, so give the port when it is not 5060, and `;transport=tcp`
//! when the target takes TCP only (otherwise UDP is used). Of the addresses a name has, those
//! our SIP socket can reach ([`reaches`]: its own family, or either family when it is bound to
//! `[::]`, dual-stack) are kept in the resolver's order ([`resolve_all`]); a request goes to the
//! first, and the 911 bridge tries the next when one is down (RFC 3263 section 4.3: no response,
//! a transport error, or 503), before it moves on to the backup routes.

use crate::sip::message::{uri_host_port, uri_socket_addr};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a lookup may take before the request fails.
pub const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

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
/// its host name's addresses that [`reaches`] says `bound` can send to, in the resolver's order
/// (RFC 6724's, which puts the likeliest first), each once. Never empty when `Ok`.
pub async fn resolve_all(uri: &str, bound: SocketAddr) -> Result<Vec<SocketAddr>, String> {
    if let Some(a) = uri_socket_addr(uri) {
        return Ok(vec![a]);
    }
    let (host, port) = uri_host_port(uri).ok_or_else(|| format!("no host in {uri:?}"))?;
    if !valid_hostname(host) {
        return Err(format!("{host:?} is not a host name"));
    }
    let found = tokio::time::timeout(RESOLVE_WITHIN, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| format!("looking up {host} took over {RESOLVE_WITHIN:?}"))?
        .map_err(|e| format!("cannot look up {host}: {e}"))?;
    let mut usable = Vec::new();
    let mut other_family = None;
    for a in found {
        if !reaches(bound, a) {
            other_family.get_or_insert(a);
        } else if !usable.contains(&a) {
            usable.push(a);
        }
    }
    if usable.is_empty() {
        return Err(match other_family {
            Some(a) => format!("{host} has only {a} and the like, not of our SIP socket's family"),
            None => format!("{host} has no address"),
        });
    }
    Ok(usable)
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
