//! A small authoritative DNS server for tests: on 127.0.0.1 and a free UDP port, it answers A,
//! AAAA and SRV queries from the records a test gives it (NXDOMAIN for a name it has nothing
//! for, an empty answer for a name it has other records for), and counts the questions.
//!
//! A server under test is pointed at it with `dns.nameservers` ([`TestDns::config`]), so a PSAP
//! or carrier name with several addresses, or published by SRV, resolves the way it would from
//! a city's DNS, through the server's real resolver and its cache.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ivr311::sip::resolve::{DnsConfig, NameServer};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;

/// How long answers may be cached (the records do not change during a test).
const TTL: u32 = 300;

#[derive(Default)]
struct Zone {
    records: Vec<Record>,
    /// Every question asked, in order: (name without the final dot, type).
    asked: Vec<(String, RecordType)>,
}

/// The running server; it stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
    hosts: PathBuf,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    n.set_fqdn(true);
    n
}

impl TestDns {
    pub async fn start() -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let task = tokio::spawn(serve(socket, zone.clone()));
        let hosts = std::env::temp_dir().join(format!("ivr311-hosts-{}", rand::random::<u64>()));
        std::fs::write(&hosts, "").unwrap();
        TestDns {
            addr,
            zone,
            task,
            hosts,
        }
    }

    /// An A or AAAA record for `host` (records of one name are answered in the order added).
    pub fn address(&self, host: &str, ip: IpAddr) -> &Self {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        self.add(Record::from_rdata(name(host), TTL, data))
    }

    /// An SRV record: `service` (`_sip._udp.psap.test`) is offered at `target`:`port`.
    pub fn srv(&self, service: &str, target: &str, port: u16, priority: u16, weight: u16) -> &Self {
        let data = RData::SRV(SRV::new(priority, weight, port, name(target)));
        self.add(Record::from_rdata(name(service), TTL, data))
    }

    fn add(&self, record: Record) -> &Self {
        self.zone.lock().unwrap().records.push(record);
        self
    }

    /// The hosts file of [`TestDns::config`] (empty until written here).
    pub fn hosts_file(&self, text: &str) -> &Self {
        std::fs::write(&self.hosts, text).unwrap();
        self
    }

    /// How many times `name` was asked for with `rtype`.
    pub fn asked(&self, name: &str, rtype: RecordType) -> usize {
        let zone = self.zone.lock().unwrap();
        zone.asked
            .iter()
            .filter(|(n, t)| n.eq_ignore_ascii_case(name) && *t == rtype)
            .count()
    }

    /// `dns:` for a server that asks this one, with this test's own hosts file.
    pub fn config(&self) -> DnsConfig {
        DnsConfig {
            nameservers: vec![NameServer(self.addr)],
            hosts_file: self.hosts.clone(),
        }
    }
}

async fn serve(socket: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let reply = answer(&query, &mut zone.lock().unwrap());
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, from).await;
        }
    }
}

fn answer(query: &Message, zone: &mut Zone) -> Message {
    let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(query.queries.iter().cloned());
    for q in &query.queries {
        let shown = q.name().to_ascii();
        zone.asked
            .push((shown.trim_end_matches('.').to_owned(), q.query_type()));
        let of_name: Vec<&Record> = zone
            .records
            .iter()
            .filter(|r| r.name == *q.name())
            .collect();
        if of_name.is_empty() {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply.add_answers(
            of_name
                .into_iter()
                .filter(|r| r.record_type() == q.query_type())
                .cloned(),
        );
    }
    reply
}
