//! Host names in the URIs we send requests to: the 911 side (`emergency.uri`), the call-back
//! trunk (`callback.trunk_uri`) and the trunk's registrar (`trunks.register.registrar`).
//!
//! Carriers and PSAPs hand out names (`sip:911@psap.city.example.gov`), and a bridge to 911 that
//! only took IP literals failed at the worst moment: at the emergency call, falling back to
//! telling the caller to dial 911 themselves. A name is looked up for every INVITE (and every
//! REGISTER), through one [`Resolver`] built at start and shared, whose cache keeps answers for
//! as long as their TTL says: a changed DNS record takes effect when the old one expires,
//! without a restart.
//!
//! How, after RFC 3263 section 4 (`Resolver::resolve_all`):
//! - A name without a port is first looked up as a SIP service: the SRV records of
//!   `_sip._udp.<name>` (`_sip._tcp.` for `;transport=tcp`), ordered by priority and, within
//!   one, by a weighted random draw (RFC 2782: `srv_order`). Carriers publish their gateways
//!   this way, each with its port. A name without SRV records (most of them) is taken as a host
//!   at port 5060; a single record with the target "." says there is no SIP service there, and
//!   the request fails.
//! - Each host is looked up A/AAAA: first in the hosts file (`dns.hosts_file`, `/etc/hosts` by
//!   default, read again when it changes), whose entries for a name win over DNS, as with the
//!   system's resolver; then in DNS. IPv4 addresses come first, then IPv6.
//! - Of those addresses, the ones our SIP socket can reach ([`reaches`]: its own family, or
//!   either family when it is bound to `[::]`, dual-stack) are kept, in that order. A request
//!   goes to the first, and the 911 bridge, the call-back and the registration move on to the
//!   next when one is down (RFC 3263 section 4.3: no response, a transport error, or 503;
//!   `choose_untried` for the registration).
//!
//! DNS itself (the queries, the answers, the cache, `/etc/resolv.conf` or the name servers of
//! `dns.nameservers`) is hickory-resolver's; the order and the failover are ours. NAPTR records
//! are not consulted (the transport is UDP unless the URI says `;transport=tcp`). Lookups are
//! limited: the SRV query to `SRV_WITHIN` (a resolver that does not answer it is taken as "no
//! SRV records"), the address lookups after it to `RESOLVE_WITHIN` together, so a stalled
//! resolver fails the request within 3 s instead of holding a 911 caller.

use crate::sip::message::{uri_host_and_port, uri_host_port, uri_socket_addr, uri_transport};
use hickory_resolver::config::{
    LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Hosts, TokioResolver};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How long the address lookups of one request may take together before it fails.
pub(crate) const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// How long the SRV query may take before the name is taken as a plain host.
pub(crate) const SRV_WITHIN: Duration = Duration::from_secs(1);

/// `dns:` in the config: where names are looked up.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// The name servers to ask, in order: `IP` or `IP:port` (`[IPv6]:port`), port 53 unless
    /// given. Default: empty, for those of `/etc/resolv.conf` with its search domains and
    /// options (read at start), as the system's resolver does.
    pub nameservers: Vec<NameServer>,
    /// The hosts file whose entries win over DNS for a name's addresses. Default `/etc/hosts`.
    /// Read again when it changes; a file that cannot be read counts as empty.
    pub hosts_file: PathBuf,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            hosts_file: PathBuf::from("/etc/hosts"),
        }
    }
}

/// One of `dns.nameservers`: where a DNS server listens (UDP and TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

impl FromStr for NameServer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(NameServer(a));
        }
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(NameServer(SocketAddr::new(ip, 53))),
            Err(_) => Err(format!(
                "{s:?} is not a name server's address (IP or IP:port, e.g. 192.0.2.53 or \
                 [2001:db8::53]:53)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for NameServer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// hickory-resolver refused the configuration.
    #[error("cannot set up the DNS resolver: {0}")]
    Build(#[source] hickory_resolver::net::NetError),
}

/// Looks names up (see the module's docs). Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct Resolver {
    dns: TokioResolver,
    hosts: Arc<HostsFile>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("hosts_file", &self.hosts.path)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver as `cfg` says. Without `nameservers` it takes `/etc/resolv.conf`'s (and,
    /// where that has none or cannot be read, 127.0.0.1 as the system's resolver does).
    pub(crate) fn new(cfg: &DnsConfig) -> Result<Resolver, DnsError> {
        let (config, mut opts) = if cfg.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no name server from /etc/resolv.conf; asking 127.0.0.1");
                (
                    ResolverConfig::from_name_servers(vec![NameServerConfig::udp_and_tcp(
                        IpAddr::from([127, 0, 0, 1]),
                    )]),
                    ResolverOpts::default(),
                )
            })
        } else {
            let servers = cfg
                .nameservers
                .iter()
                .map(|NameServer(a)| {
                    let mut server = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut server.connections {
                        c.port = a.port();
                    }
                    server
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        // The hosts file is ours to read (below): hickory's would take a name's A records from
        // it and still ask DNS for its AAAA, waiting on a DNS server that may be down.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let dns = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(DnsError::Build)?;
        Ok(Resolver {
            dns,
            hosts: Arc::new(HostsFile::new(cfg.hosts_file.clone())),
        })
    }

    /// A resolver of the default [`DnsConfig`]: the system's configuration.
    pub(crate) fn system() -> Resolver {
        // Building fails only for DNS over TLS, HTTPS or QUIC, which this crate does not use.
        Resolver::new(&DnsConfig::default())
            .unwrap_or_else(|e| unreachable!("the system's DNS configuration is usable: {e}"))
    }

    /// The address to send to for `uri`: its IP literal as it is, or the first of its host
    /// name's addresses that `bound` can send to ([`Resolver::resolve_all`]).
    pub(crate) async fn resolve(&self, uri: &str, bound: SocketAddr) -> Result<SocketAddr, String> {
        Ok(self.resolve_all(uri, bound).await?[0])
    }

    /// Every address `uri` may be reached at, in the order to try them: its IP literal alone,
    /// or the addresses its name leads to (SRV targets first when the URI gives no port, see
    /// the module's docs) that [`reaches`] says `bound` can send to, each once. Never empty
    /// when `Ok`.
    pub(crate) async fn resolve_all(
        &self,
        uri: &str,
        bound: SocketAddr,
    ) -> Result<Vec<SocketAddr>, String> {
        if let Some(a) = uri_socket_addr(uri) {
            return Ok(vec![a]);
        }
        let (host, port) = uri_host_and_port(uri).ok_or_else(|| format!("no host in {uri:?}"))?;
        let name = match Name::from_str(host) {
            Ok(name) if valid_hostname(host) => name,
            _ => return Err(format!("{host:?} is not a host name")),
        };
        let hosts = match port {
            Some(p) => vec![(name, p)],
            None => {
                let tcp = uri_transport(uri).as_deref() == Some("tcp");
                match self.service_hosts(host, tcp).await {
                    Some(Ok(hosts)) => hosts,
                    Some(Err(why)) => return Err(why),
                    None => vec![(name, 5060)],
                }
            }
        };
        let within = tokio::time::Instant::now() + RESOLVE_WITHIN;
        let mut usable = Vec::new();
        let mut other_family = None;
        let mut failed = None;
        for (name, port) in &hosts {
            let shown = shown(name);
            let found = match tokio::time::timeout_at(within, self.addresses(name)).await {
                Err(_) => {
                    failed
                        .get_or_insert(format!("looking up {shown} took over {RESOLVE_WITHIN:?}"));
                    break;
                }
                Ok(Err(e)) => {
                    failed.get_or_insert(format!("cannot look up {shown}: {e}"));
                    continue;
                }
                Ok(Ok(found)) => found,
            };
            for ip in found {
                let a = SocketAddr::new(ip, *port);
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

    /// `name`'s addresses: its entries in the hosts file if it has any there, else its A and
    /// AAAA records; IPv4 first.
    async fn addresses(&self, name: &Name) -> Result<Vec<IpAddr>, hickory_resolver::net::NetError> {
        let listed = self.hosts.addresses(name).await;
        if !listed.is_empty() {
            return Ok(listed);
        }
        Ok(self.dns.lookup_ip(name.clone()).await?.iter().collect())
    }

    /// The hosts (and ports) `name`'s SIP service is offered at, from its SRV records in the
    /// order to try them; `None` when it has none (or the query failed or timed out: the name
    /// is then tried as a host), an error when the records say there is no such service
    /// (RFC 2782: a single target ".").
    async fn service_hosts(
        &self,
        name: &str,
        tcp: bool,
    ) -> Option<Result<Vec<(Name, u16)>, String>> {
        let service = format!("_sip._{}.{name}", if tcp { "tcp" } else { "udp" });
        let records = match tokio::time::timeout(SRV_WITHIN, self.dns.srv_lookup(service.as_str()))
            .await
        {
            Ok(Ok(found)) => found,
            Ok(Err(why)) => {
                tracing::debug!(%service, %why, "no SRV records; taken as a host");
                return None;
            }
            Err(_) => {
                tracing::warn!(%service, "SRV query unanswered within {SRV_WITHIN:?}; taken as a host");
                return None;
            }
        };
        let records: Vec<Srv> = records
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                hickory_resolver::proto::rr::RData::SRV(srv) => Some(Srv {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: srv.target.clone(),
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return None;
        }
        if records.len() == 1 && records[0].target.is_root() {
            return Some(Err(format!(
                "{service} says no SIP service there (SRV target \".\")"
            )));
        }
        let ordered = srv_order(records, &mut |n| rand::random::<u32>() % n);
        Some(Ok(ordered
            .into_iter()
            .filter(|r| !r.target.is_root())
            .map(|r| (r.target, r.port))
            .collect()))
    }
}

/// A name as it is written in a URI: without the trailing dot of a fully qualified one.
fn shown(name: &Name) -> String {
    let s = name.to_ascii();
    s.strip_suffix('.').map(str::to_owned).unwrap_or(s)
}

/// The hosts file, as last read.
struct HostsFile {
    path: PathBuf,
    read: Mutex<HostsRead>,
}

/// What the hosts file said when it was last read, and its modification time and length then
/// (`None`: there was no file to read, which is as good as an empty one).
struct HostsRead {
    stamp: Option<(SystemTime, u64)>,
    hosts: Arc<Hosts>,
}

impl HostsFile {
    fn new(path: PathBuf) -> HostsFile {
        HostsFile {
            path,
            read: Mutex::new(HostsRead {
                stamp: None,
                hosts: Arc::new(Hosts::default()),
            }),
        }
    }

    /// `name`'s addresses in the file, IPv4 first.
    async fn addresses(&self, name: &Name) -> Vec<IpAddr> {
        let hosts = self.current().await;
        [RecordType::A, RecordType::AAAA]
            .into_iter()
            .filter_map(|t| hosts.lookup_static_host(&Query::query(name.clone(), t)))
            .flat_map(|found| {
                found
                    .answers()
                    .iter()
                    .filter_map(|r| r.data.ip_addr())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The file's entries, read again if it changed since the last time.
    async fn current(&self) -> Arc<Hosts> {
        let stamp = tokio::fs::metadata(&self.path)
            .await
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        {
            let read = self.read.lock().unwrap_or_else(|p| p.into_inner());
            if read.stamp == stamp {
                return read.hosts.clone();
            }
        }
        let mut hosts = Hosts::default();
        match tokio::fs::read(&self.path).await {
            Ok(text) => {
                if let Err(e) = hosts.read_hosts_conf(&text[..]) {
                    tracing::warn!(path = %self.path.display(), error = %e, "hosts file unreadable; taken as empty");
                }
            }
            Err(e) => tracing::debug!(path = %self.path.display(), error = %e, "no hosts file"),
        }
        let hosts = Arc::new(hosts);
        *self.read.lock().unwrap_or_else(|p| p.into_inner()) = HostsRead {
            stamp,
            hosts: hosts.clone(),
        };
        hosts
    }
}

/// Whether `uri`'s host is a name (not an IP literal), i.e. needs [`Resolver::resolve`].
pub(crate) fn needs_lookup(uri: &str) -> bool {
    uri_socket_addr(uri).is_none() && uri_host_port(uri).is_some()
}

/// A host name as RFC 3261's `hostname` allows it: labels of letters, digits and hyphens.
pub(crate) fn valid_hostname(host: &str) -> bool {
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
/// address; where the system makes it IPv6-only, that send fails and says so. (A server on
/// `[::]` that took only the AAAA records of a name would send no INVITE to a PSAP with an A
/// record alone, and every 911 caller would hear the announcement instead.)
pub fn reaches(bound: SocketAddr, addr: SocketAddr) -> bool {
    addr.is_ipv4() == bound.is_ipv4() || (bound.is_ipv6() && bound.ip().is_unspecified())
}

/// One SRV record (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The host (the root name "." alone: no service).
    pub target: Name,
}

/// `records` in the order to try them (RFC 2782): lowest priority first; within a priority,
/// each next one drawn at random in proportion to its weight (those of weight 0 first, so
/// they are drawn only rarely, as the RFC asks). `draw(n)` is a random number below `n`.
pub(crate) fn srv_order(mut records: Vec<Srv>, draw: &mut dyn FnMut(u32) -> u32) -> Vec<Srv> {
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

/// Which of a name's addresses `all` (never empty) a repeated request goes to: the one it
/// went to last (`current`) while that keeps working, the next after it once it `failed`, and
/// the first when the last is not among them (the name moved, or nothing was sent yet). So a
/// trunk registration whose registrar's first address is down registers at the second on its
/// next attempt, and stays there.
pub(crate) fn choose(all: &[SocketAddr], current: Option<SocketAddr>, failed: bool) -> SocketAddr {
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
pub(crate) fn choose_untried(
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

    #[test]
    fn name_servers_are_an_address_with_port_53_unless_given() {
        let ns = |s: &str| s.parse::<NameServer>().map(|n| n.0);
        assert_eq!(ns("192.0.2.53"), Ok("192.0.2.53:53".parse().unwrap()));
        assert_eq!(ns("127.0.0.1:5353"), Ok("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(ns("2001:db8::53"), Ok("[2001:db8::53]:53".parse().unwrap()));
        assert_eq!(ns("[::1]:5353"), Ok("[::1]:5353".parse().unwrap()));
        assert!(ns("dns.example").unwrap_err().contains("dns.example"));
        let cfg: DnsConfig = serde_yaml::from_str("nameservers: [\"127.0.0.1:5353\"]").unwrap();
        assert_eq!(cfg.hosts_file, PathBuf::from("/etc/hosts"));
        let e = serde_yaml::from_str::<DnsConfig>("nameservers: [ns1]").unwrap_err();
        assert!(
            e.to_string().contains("\"ns1\" is not a name server"),
            "{e}"
        );
    }

    #[test]
    fn srv_records_are_tried_by_priority_then_by_weighted_draw() {
        let r = |priority, weight, target: &str| Srv {
            priority,
            weight,
            port: 5060,
            target: Name::from_ascii(target).unwrap(),
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
            ordered
                .into_iter()
                .map(|r| shown(&r.target))
                .collect::<Vec<_>>()
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

    /// A name in the hosts file is taken from there (no DNS server is asked: the one configured
    /// here is not listening), in our socket's family, and an edit to the file is seen at the
    /// next lookup.
    #[tokio::test]
    async fn hosts_file_names_are_looked_up_in_our_family_and_invalid_names_fail() {
        let hosts = std::env::temp_dir().join(format!("ivr311-hosts-{}", rand::random::<u64>()));
        std::fs::write(&hosts, "# PSAP\n127.0.0.1 psap.test\n::1 psap.test\n").unwrap();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let nowhere = closed.local_addr().unwrap();
        drop(closed);
        let r = Resolver::new(&DnsConfig {
            nameservers: vec![NameServer(nowhere)],
            hosts_file: hosts.clone(),
        })
        .unwrap();
        let v4: SocketAddr = "127.0.0.1:5060".parse().unwrap();
        let dual: SocketAddr = "[::]:5060".parse().unwrap();
        let v6_only: SocketAddr = "[::1]:5060".parse().unwrap();
        let all = |bound| {
            let r = r.clone();
            async move { r.resolve_all("sip:911@psap.test:5099", bound).await }
        };
        let (a4, a6) = (
            "127.0.0.1:5099".parse().unwrap(),
            "[::1]:5099".parse().unwrap(),
        );
        assert_eq!(all(v4).await.unwrap(), vec![a4]);
        // Bound to [::] (dual-stack), both families, IPv4 first; bound to [::1], IPv6 alone.
        assert_eq!(all(dual).await.unwrap(), vec![a4, a6]);
        assert_eq!(all(v6_only).await.unwrap(), vec![a6]);
        assert!(!reaches(v6_only, a4));
        assert!(!reaches(v4, a6));
        assert!(reaches(dual, a4));

        // The city moves its PSAP: the file is read again.
        std::fs::write(&hosts, "127.0.0.3 psap.test\n").unwrap();
        assert_eq!(
            all(v4).await.unwrap(),
            vec!["127.0.0.3:5099".parse::<std::net::SocketAddr>().unwrap()]
        );
        // Only an IPv4 address, for a server on IPv6 alone.
        let e = all(v6_only).await.unwrap_err();
        assert!(e.contains("not of our SIP socket's family"), "{e}");

        // Literals are taken as they are.
        let b = r.resolve("sip:192.0.2.7", v4).await.unwrap();
        assert_eq!(b, "192.0.2.7:5060".parse::<std::net::SocketAddr>().unwrap());
        // RFC 2606: .invalid never resolves.
        let e = r
            .resolve("sip:911@no-such-psap.invalid:5060", v4)
            .await
            .unwrap_err();
        assert!(e.contains("no-such-psap.invalid"), "{e}");
        let e = r.resolve("sip:911@bad_host.test", v4).await.unwrap_err();
        assert!(e.contains("not a host name"), "{e}");
        let _ = std::fs::remove_file(&hosts);
    }
}
