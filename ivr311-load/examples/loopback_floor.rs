//! What the packets of N bridged calls cost this machine with nothing else to do: the floor
//! under issue 7's bridge target (BENCHMARKS.md, "Bridged operator calls").
//!
//! A bridge is four UDP sockets on 127.0.0.1: the caller's phone, the relay's caller side, the
//! relay's leg side and the agent's phone, each `connect`ed to its peer. The phone threads send
//! one 172-byte packet (RTP header + 20 ms of G.711) from each phone of each bridge every 20 ms,
//! spread over the 20 ms in 1 ms groups, and read what reaches their phones; the relay threads
//! forward each packet to the other side. No RTP parsing, no timestamps, no pacing checks, no SIP:
//! only one `send` and one `recv` per packet per hop and an epoll set per thread asked without
//! waiting (nobody sleeps on a socket, so no sender pays a wake-up). Whatever ivr311 and
//! `ivr311-load` spend beyond this is theirs; this much is the machine's.
//!
//! ```text
//! cargo run --release -p ivr311-load --example loopback_floor -- [bridges=1500] [seconds=20] [threads per side=2] [uring=0]
//! ```
//!
//! With `uring` 1 every thread hands its sends and reads to the kernel in batches through
//! io_uring (one `io_uring_enter` for a millisecond's sends, one for the reads the epoll set
//! reported, one for the relayed sends) instead of a system call per packet: what the most
//! batching could save.
//!
//! It prints each side's CPU (from each thread's own CPU clock) and the packets each side moved,
//! so a run that could not keep up shows it as packets missing, not as a hidden stall.

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("loopback_floor needs Linux (epoll)");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::UdpSocket;
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// RTP header and one 20 ms G.711 frame.
    const PACKET: usize = 172;
    /// Sends of one phone are this far apart.
    const PTIME_MS: u64 = 20;
    /// The relay looks at its sockets this often (ivr311's `RELAY_HOLD`).
    const RELAY_HOLD: Duration = Duration::from_micros(500);
    /// Figures are taken over the run minus this warm-up.
    const WARM_UP: Duration = Duration::from_secs(3);

    struct Bridge {
        caller: UdpSocket,
        relay_caller: UdpSocket,
        relay_leg: UdpSocket,
        agent: UdpSocket,
    }

    fn pair() -> io::Result<(UdpSocket, UdpSocket)> {
        let a = UdpSocket::bind("127.0.0.1:0")?;
        let b = UdpSocket::bind("127.0.0.1:0")?;
        a.connect(b.local_addr()?)?;
        b.connect(a.local_addr()?)?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((a, b))
    }

    fn bridge() -> io::Result<Bridge> {
        let (caller, relay_caller) = pair()?;
        let (relay_leg, agent) = pair()?;
        Ok(Bridge {
            caller,
            relay_caller,
            relay_leg,
            agent,
        })
    }

    /// Raise the open-file limit to its hard limit (four sockets per bridge).
    fn raise_nofile() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for both calls.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = lim.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
    }

    /// An epoll set asked without waiting; each token is an index the owner chose.
    struct Ready {
        fd: RawFd,
        events: Vec<libc::epoll_event>,
    }

    impl Ready {
        fn new() -> io::Result<Self> {
            // SAFETY: plain system call.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Ready {
                fd,
                events: vec![libc::epoll_event { events: 0, u64: 0 }; 1024],
            })
        }

        fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: token,
            };
            // SAFETY: `ev` is valid for the call.
            if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }

        /// Tokens of the sockets with input now (level-triggered, no wait), at most
        /// `events.len()` of them: the rest are reported at the next call, so a saturated
        /// thread still comes back to its clock and its counters.
        fn poll(&mut self, mut each: impl FnMut(u64)) {
            // SAFETY: `events` has room for its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.fd,
                    self.events.as_mut_ptr(),
                    self.events.len() as i32,
                    0,
                )
            };
            for e in &self.events[..n.max(0) as usize] {
                each(e.u64);
            }
        }
    }

    /// Largest datagram read.
    const BUF: usize = 256;
    /// Operations in flight at once.
    const RING: usize = 1024;

    /// Batches of sends and reads in one `io_uring_enter` each.
    struct Uring {
        ring: io_uring::IoUring,
        ops: Vec<io_uring::squeue::Entry>,
        results: Vec<i32>,
        bufs: Vec<[u8; BUF]>,
    }

    impl Uring {
        fn new() -> io::Result<Self> {
            Ok(Uring {
                ring: io_uring::IoUring::new(RING as u32)?,
                ops: Vec::with_capacity(RING),
                results: vec![0; RING],
                bufs: vec![[0; BUF]; RING],
            })
        }

        /// Send `packet` on each of `fds` (connected sockets); how many went.
        fn send_each(&mut self, fds: &[RawFd], packet: &[u8]) -> io::Result<u64> {
            let mut sent = 0;
            for chunk in fds.chunks(RING) {
                self.ops.clear();
                for (i, &fd) in chunk.iter().enumerate() {
                    let op = io_uring::opcode::Send::new(
                        io_uring::types::Fd(fd),
                        packet.as_ptr(),
                        packet.len() as u32,
                    );
                    self.ops
                        .push(op.flags(libc::MSG_DONTWAIT).build().user_data(i as u64));
                }
                self.run()?;
                sent += self.results[..chunk.len()]
                    .iter()
                    .filter(|r| **r > 0)
                    .count() as u64;
            }
            Ok(sent)
        }

        /// Read one datagram from each of `fds` (at most [`RING`]) into `bufs[i]`; the
        /// lengths (or minus the errno) are in `results[i]`.
        fn recv_each(&mut self, fds: &[RawFd]) -> io::Result<()> {
            self.ops.clear();
            for (i, &fd) in fds.iter().enumerate() {
                let op = io_uring::opcode::Recv::new(
                    io_uring::types::Fd(fd),
                    self.bufs[i].as_mut_ptr(),
                    BUF as u32,
                );
                self.ops
                    .push(op.flags(libc::MSG_DONTWAIT).build().user_data(i as u64));
            }
            self.run()
        }

        /// Send `bufs[i][..lens[i]]` on `fds[i]` (at most [`RING`]); how many went.
        fn send_bufs(&mut self, fds: &[RawFd], lens: &[usize]) -> io::Result<u64> {
            self.ops.clear();
            for (i, &fd) in fds.iter().enumerate() {
                let op = io_uring::opcode::Send::new(
                    io_uring::types::Fd(fd),
                    self.bufs[i].as_ptr(),
                    lens[i] as u32,
                );
                self.ops
                    .push(op.flags(libc::MSG_DONTWAIT).build().user_data(i as u64));
            }
            self.run()?;
            Ok(self.results[..fds.len()].iter().filter(|r| **r > 0).count() as u64)
        }

        /// Submit `ops` and wait for all their completions. With `MSG_DONTWAIT` each one
        /// finishes within the call, so the buffers are free again when this returns.
        fn run(&mut self) -> io::Result<()> {
            let n = self.ops.len();
            if n == 0 {
                return Ok(());
            }
            {
                let mut sq = self.ring.submission();
                for op in &self.ops {
                    // SAFETY: the buffers stay put until every completion is reaped below.
                    unsafe { sq.push(op) }
                        .map_err(|_| io::Error::other("submission queue full"))?;
                }
            }
            let mut reaped = 0;
            while reaped < n {
                match self.ring.submit_and_wait(n - reaped) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                for c in self.ring.completion() {
                    self.results[c.user_data() as usize] = c.result();
                    reaped += 1;
                }
            }
            Ok(())
        }
    }

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is valid for the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn sleep_until(t: Instant) {
        let now = Instant::now();
        if t > now {
            std::thread::sleep(t - now);
        }
    }

    /// Counters of one side, taken after the warm-up.
    #[derive(Default)]
    struct Side {
        cpu_ns: AtomicU64,
        sent: AtomicU64,
        received: AtomicU64,
    }

    /// One thread's counts, from the end of the warm-up on.
    struct Tally {
        start: Instant,
        counting: bool,
        cpu0: Duration,
        sent: u64,
        received: u64,
    }

    impl Tally {
        fn new() -> Self {
            Tally {
                start: Instant::now(),
                counting: false,
                cpu0: Duration::ZERO,
                sent: 0,
                received: 0,
            }
        }

        /// Start counting afresh once the warm-up is over.
        fn warm_up(&mut self) {
            if !self.counting && self.start.elapsed() >= WARM_UP {
                (self.counting, self.sent, self.received) = (true, 0, 0);
                self.cpu0 = thread_cpu();
            }
        }

        /// Add this thread's counts to its side's.
        fn add_to(&self, side: &Side) {
            let cpu = (thread_cpu() - self.cpu0).as_nanos() as u64;
            side.cpu_ns.fetch_add(cpu, Ordering::Relaxed);
            side.sent.fetch_add(self.sent, Ordering::Relaxed);
            side.received.fetch_add(self.received, Ordering::Relaxed);
        }
    }

    /// Phones: send from both phones of each bridge every 20 ms (bridge i in 1 ms group
    /// i % 20), read whatever reached them once a millisecond.
    fn phones(
        bridges: &[Arc<Bridge>],
        stop: &AtomicBool,
        side: &Side,
        mut uring: Option<Uring>,
    ) -> io::Result<()> {
        let mut ready = Ready::new()?;
        let mut fds: Vec<RawFd> = Vec::new();
        for (i, b) in bridges.iter().enumerate() {
            ready.add(b.caller.as_raw_fd(), (i as u64) << 1)?;
            ready.add(b.agent.as_raw_fd(), (i as u64) << 1 | 1)?;
        }
        let packet = [0x80u8; PACKET];
        let mut buf = [0u8; 2048];
        let mut t = Tally::new();
        let mut ms = 0u64;
        while !stop.load(Ordering::Relaxed) {
            t.warm_up();
            let group = ms % PTIME_MS;
            let mine = bridges
                .iter()
                .skip(group as usize)
                .step_by(PTIME_MS as usize);
            if let Some(u) = &mut uring {
                fds.clear();
                fds.extend(mine.flat_map(|b| [b.caller.as_raw_fd(), b.agent.as_raw_fd()]));
                t.sent += u.send_each(&fds, &packet)?;
                fds.clear();
                ready.poll(|token| {
                    let b = &bridges[(token >> 1) as usize];
                    let s = if token & 1 == 0 { &b.caller } else { &b.agent };
                    fds.push(s.as_raw_fd());
                });
                u.recv_each(&fds)?;
                t.received += u.results[..fds.len()].iter().filter(|r| **r > 0).count() as u64;
                ms += 1;
                sleep_until(t.start + Duration::from_millis(ms));
                continue;
            }
            for b in mine {
                t.sent += (b.caller.send(&packet).is_ok() as u64)
                    + (b.agent.send(&packet).is_ok() as u64);
            }
            ready.poll(|token| {
                let b = &bridges[(token >> 1) as usize];
                let s = if token & 1 == 0 { &b.caller } else { &b.agent };
                // One read per report: a phone gets a packet per 20 ms and is asked every
                // 1 ms, and a second packet is reported again at the next poll. (Reading until
                // EAGAIN would add a failed system call per packet.)
                t.received += s.recv(&mut buf).is_ok() as u64;
            });
            ms += 1;
            sleep_until(t.start + Duration::from_millis(ms));
        }
        t.add_to(side);
        Ok(())
    }

    /// Relay: every `RELAY_HOLD`, forward what arrived on either side of each bridge.
    fn relay(
        bridges: &[Arc<Bridge>],
        stop: &AtomicBool,
        side: &Side,
        mut uring: Option<Uring>,
    ) -> io::Result<()> {
        let mut ready = Ready::new()?;
        let (mut from_fds, mut to_fds, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for (i, b) in bridges.iter().enumerate() {
            ready.add(b.relay_caller.as_raw_fd(), (i as u64) << 1)?;
            ready.add(b.relay_leg.as_raw_fd(), (i as u64) << 1 | 1)?;
        }
        let mut buf = [0u8; 2048];
        let mut t = Tally::new();
        let mut turn = 0u32;
        while !stop.load(Ordering::Relaxed) {
            t.warm_up();
            if let Some(u) = &mut uring {
                from_fds.clear();
                to_fds.clear();
                ready.poll(|token| {
                    let b = &bridges[(token >> 1) as usize];
                    let (from, to) = if token & 1 == 0 {
                        (&b.relay_caller, &b.relay_leg)
                    } else {
                        (&b.relay_leg, &b.relay_caller)
                    };
                    from_fds.push(from.as_raw_fd());
                    to_fds.push(to.as_raw_fd());
                });
                u.recv_each(&from_fds)?;
                // Forward what was read, each into the slot its read used.
                lens.clear();
                let mut k = 0;
                for i in 0..from_fds.len() {
                    let r = u.results[i];
                    if r > 0 {
                        t.received += 1;
                        u.bufs.swap(k, i);
                        to_fds[k] = to_fds[i];
                        lens.push(r as usize);
                        k += 1;
                    }
                }
                t.sent += u.send_bufs(&to_fds[..k], &lens)?;
                turn += 1;
                sleep_until(t.start + RELAY_HOLD * turn);
                continue;
            }
            ready.poll(|token| {
                let b = &bridges[(token >> 1) as usize];
                let (from, to) = if token & 1 == 0 {
                    (&b.relay_caller, &b.relay_leg)
                } else {
                    (&b.relay_leg, &b.relay_caller)
                };
                if let Ok(n) = from.recv(&mut buf) {
                    t.received += 1;
                    t.sent += to.send(&buf[..n]).is_ok() as u64;
                }
            });
            turn += 1;
            sleep_until(t.start + RELAY_HOLD * turn);
        }
        t.add_to(side);
        Ok(())
    }

    fn arg(i: usize, default: u64) -> u64 {
        std::env::args()
            .nth(i)
            .map(|a| a.parse().expect("arguments are numbers"))
            .unwrap_or(default)
    }

    pub fn main() {
        raise_nofile();
        if std::env::args().nth(1).as_deref() == Some("sipp") {
            return sipp();
        }
        let (n, seconds, threads) = (arg(1, 1500) as usize, arg(2, 20), arg(3, 2).max(1) as usize);
        let batched = arg(4, 0) == 1;
        let ring = || batched.then(|| Uring::new().expect("io_uring (kernel.io_uring_disabled?)"));
        let bridges: Vec<Arc<Bridge>> = (0..n)
            .map(|_| bridge().map(Arc::new))
            .collect::<io::Result<_>>()
            .expect("cannot open the sockets (open-file limit?)");
        let stop = Arc::new(AtomicBool::new(false));
        let (phone_side, relay_side) = (Arc::new(Side::default()), Arc::new(Side::default()));
        let mut handles = Vec::new();
        for t in 0..threads {
            let mine: Vec<Arc<Bridge>> = bridges.iter().skip(t).step_by(threads).cloned().collect();
            let (s, side) = (stop.clone(), phone_side.clone());
            let m = mine.clone();
            let u = ring();
            handles.push(std::thread::spawn(move || phones(&m, &s, &side, u)));
            let (s, side) = (stop.clone(), relay_side.clone());
            let u = ring();
            handles.push(std::thread::spawn(move || relay(&mine, &s, &side, u)));
        }
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("thread").expect("socket error");
        }
        let window = Duration::from_secs(seconds)
            .saturating_sub(WARM_UP)
            .as_secs_f64();
        let offered = n as f64 * 2.0 * (1000 / PTIME_MS) as f64;
        let show = |name: &str, s: &Side| {
            let cpu = s.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9 / window * 100.0;
            let sent = s.sent.load(Ordering::Relaxed) as f64 / window;
            let received = s.received.load(Ordering::Relaxed) as f64 / window;
            println!(
                "{name:6} CPU {cpu:5.1}% of one core  sent {sent:8.0}/s  received {received:8.0}/s  ({:.2} us of CPU per packet sent or received)",
                cpu / 100.0 * 1e6 / (sent + received)
            );
            cpu
        };
        println!(
            "{n} bridges, {threads} threads a side, {}, {:.0} s measured: {offered:.0} packets/s offered to the relay (both directions)",
            if batched { "io_uring batches" } else { "a system call per packet" },
            window
        );
        let total = show("phones", &phone_side) + show("relay", &relay_side);
        println!(
            "both   CPU {total:5.1}% of one core (the machine has {} cores)",
            std::thread::available_parallelism().map_or(0, |p| p.get())
        );
    }

    /// A raw `IPPROTO_UDP` socket bound to 127.0.0.1 and never read: what SIPp opens for each
    /// pcap it plays (`play_pcap_audio`). Needs CAP_NET_RAW.
    fn raw_socket() -> io::Result<RawFd> {
        // SAFETY: plain system calls on a descriptor we own; `sin` is a valid sockaddr_in.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(fd, &sin as *const _ as *const libc::sockaddr, len) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        }
    }

    /// `loopback_floor sipp [calls=800] [raw sockets=179] [seconds=20] [threads=2] [uring=0]`:
    /// what the prompts of the SIPp run cost to send with nothing else to do. Each call's socket
    /// sends 50 packets/s to one socket nobody reads (SIPp's `-mp` port), while `raw` raw
    /// sockets like SIPp's pcap player's are open; with `uring` 1, each millisecond's sends go
    /// in one `io_uring_enter`, as ivr311's media clock sends.
    fn sipp() {
        let (n, raws, seconds, threads) = (
            arg(2, 800) as usize,
            arg(3, 179),
            arg(4, 20),
            arg(5, 2).max(1) as usize,
        );
        let batched = arg(6, 0) == 1;
        let sink = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = sink.local_addr().expect("address");
        let calls: Vec<Arc<UdpSocket>> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.connect(to)?;
                s.set_nonblocking(true)?;
                Ok(Arc::new(s))
            })
            .collect::<io::Result<_>>()
            .expect("cannot open the sockets");
        let raw: Vec<RawFd> = match (0..raws).map(|_| raw_socket()).collect() {
            Ok(raw) => raw,
            Err(e) => {
                eprintln!(
                    "cannot open raw sockets ({e}): run as root or with CAP_NET_RAW, or ask for 0"
                );
                std::process::exit(1);
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let side = Arc::new(Side::default());
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<Arc<UdpSocket>> =
                    calls.iter().skip(t).step_by(threads).cloned().collect();
                let (stop, side) = (stop.clone(), side.clone());
                let mut uring = batched.then(|| Uring::new().expect("io_uring"));
                std::thread::spawn(move || {
                    let packet = [0x80u8; PACKET];
                    let mut fds: Vec<RawFd> = Vec::new();
                    let (mut t, mut ms) = (Tally::new(), 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        t.warm_up();
                        let group = mine
                            .iter()
                            .skip((ms % PTIME_MS) as usize)
                            .step_by(PTIME_MS as usize);
                        // The sink's queue is full: the kernel drops the packet there, as at
                        // SIPp's media port; the send itself succeeds.
                        if let Some(u) = &mut uring {
                            fds.clear();
                            fds.extend(group.map(|s| s.as_raw_fd()));
                            t.sent += u.send_each(&fds, &packet).expect("io_uring");
                        } else {
                            for s in group {
                                t.sent += s.send(&packet).is_ok() as u64;
                            }
                        }
                        ms += 1;
                        sleep_until(t.start + Duration::from_millis(ms));
                    }
                    t.add_to(&side);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().expect("thread");
        }
        let window = Duration::from_secs(seconds)
            .saturating_sub(WARM_UP)
            .as_secs_f64();
        let cpu = side.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9 / window * 100.0;
        let sent = side.sent.load(Ordering::Relaxed) as f64 / window;
        println!(
            "{n} calls' prompts, {} raw sockets open, {}: CPU {cpu:5.1}% of one core, sent {sent:6.0}/s ({:.2} us per packet)",
            raw.len(),
            if batched { "io_uring batches" } else { "a system call per packet" },
            cpu / 100.0 * 1e6 / sent
        );
        for fd in raw {
            // SAFETY: we opened it and nothing else uses it.
            unsafe { libc::close(fd) };
        }
    }
}
