//! The few Linux calls std does not offer: kernel receive timestamps (`SO_TIMESTAMPNS` read
//! with `recvmsg`, or for RTP with `recvmmsg`), epoll, a 1 ms timerfd, and the realtime clock
//! the kernel stamps with.
//!
//! Why kernel timestamps: the generator runs on the same two cores as the server, so the time
//! at which our thread gets to read a packet includes our own scheduling delay. The kernel
//! stamps each datagram when it is queued on our socket, which on loopback is the moment the
//! server's `sendto` ran; pacing and latency figures use that stamp.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Set an `int` socket option on `fd`.
fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points to a c_int of the size given; a bad fd is an error return.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CLOCK_REALTIME in ns (the clock `SO_TIMESTAMPNS` uses).
pub fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    timespec_ns(&ts)
}

// The casts are no-ops on 64-bit Linux, not on 32-bit targets.
#[allow(clippy::unnecessary_cast)]
fn timespec_ns(ts: &libc::timespec) -> i64 {
    ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
}

/// Ask the kernel to stamp every datagram received on `fd`.
pub fn enable_rx_timestamps(fd: RawFd) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// A receive buffer of `bytes` (capped by net.core.rmem_max), so a few seconds of our thread
/// waiting for a CPU lose nothing, and the kernel's count of datagrams dropped on the socket
/// (SO_RXQ_OVFL, read by [`recv_stamped_drops`]): losses on our side are then told apart from
/// packets the server never sent.
pub fn buffer_and_count_drops(fd: RawFd, bytes: usize) -> io::Result<()> {
    set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        bytes.min(i32::MAX as usize) as libc::c_int,
    )?;
    set_int(fd, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)
}

/// Receive buffer of each RTP socket: ~10 s of one 50 packets/s stream (a small datagram
/// takes about 1 KiB of buffer accounting on loopback).
pub const RTP_RCVBUF: usize = 512 * 1024;

/// Receive buffer of each SIP socket (capped by net.core.rmem_max): registration and call
/// bursts of a few thousand agents and callers.
pub const SIP_RCVBUF: usize = 4 * 1024 * 1024;

/// Room for the SCM_TIMESTAMPNS and SO_RXQ_OVFL control messages (aligned).
pub type CmsgBuf = [u64; 8];

/// Receive one datagram without blocking. Returns its length, the kernel receive time
/// (realtime ns, or 0 when the kernel gave none), and the socket's count of datagrams dropped
/// so far for want of buffer room (0 until the first drop, or without
/// [`buffer_and_count_drops`]).
pub fn recv_stamped_drops(
    fd: RawFd,
    buf: &mut [u8],
    cmsg: &mut CmsgBuf,
) -> io::Result<(usize, i64, u32)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; we point it at live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(cmsg) as _;
    // SAFETY: msg points at buffers that outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let (stamp, drops) = stamp_and_drops(&msg);
    Ok((n as usize, stamp, drops))
}

/// The receive stamp (0 if none) and drop count (0 if none) in a message the kernel filled.
fn stamp_and_drops(msg: &libc::msghdr) -> (i64, u32) {
    let mut stamp = 0i64;
    let mut drops = 0u32;
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                stamp = timespec_ns(&ts);
            } else if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                drops = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const u32);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    (stamp, drops)
}

/// Datagrams one [`RecvBatch::recv`] takes from a socket.
const RX_BATCH: usize = 8;
/// Largest RTP datagram read (ours are 172 bytes; anything longer is cut, and not ours).
const RX_MAX: usize = 2048;

/// Up to [`RX_BATCH`] datagrams from one socket in one `recvmmsg`, each with its kernel
/// receive stamp and the socket's drop count (as [`recv_stamped_drops`] gives for one).
///
/// Why the generator reads its RTP sockets in batches at each call's turn on the wheel
/// instead of sleeping on them in epoll: on loopback the kernel delivers a datagram in the
/// *sender's* system call, and if a thread sleeps on the receiving socket it wakes it there
/// too. A generator thread waiting in `epoll_wait` on thousands of RTP sockets made nearly
/// every packet the server sent pay that wake-up, about 9% of the server's samples at ~500
/// bridges (`sock_def_readable`), a cost a phone on another machine never charges the server.
/// With no waiter on an RTP socket the kernel only queues the datagram; its kernel stamp
/// still says when it arrived, so pacing and latency figures keep their precision, and a call
/// reacts to what it heard at its next 20 ms turn.
pub struct RecvBatch {
    bufs: Box<[[u8; RX_MAX]; RX_BATCH]>,
    cmsgs: [CmsgBuf; RX_BATCH],
    lens: [usize; RX_BATCH],
    stamps: [i64; RX_BATCH],
    drops: [u32; RX_BATCH],
}

impl RecvBatch {
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: Box::new([[0; RX_MAX]; RX_BATCH]),
            cmsgs: [[0; 8]; RX_BATCH],
            lens: [0; RX_BATCH],
            stamps: [0; RX_BATCH],
            drops: [0; RX_BATCH],
        }
    }

    /// Take what waits on `fd` (without blocking), up to [`RX_BATCH`] datagrams; how many.
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iovs: [libc::iovec; RX_BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr() as *mut libc::c_void,
            iov_len: RX_MAX,
        });
        // SAFETY: a zeroed mmsghdr is valid; each is pointed at its own live iovec and
        // control buffer below.
        let mut msgs: [libc::mmsghdr; RX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
        }
        // SAFETY: `msgs` and everything it points at outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                RX_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, m) in msgs[..n].iter().enumerate() {
            self.lens[i] = (m.msg_len as usize).min(RX_MAX);
            (self.stamps[i], self.drops[i]) = stamp_and_drops(&m.msg_hdr);
        }
        Ok(n)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`]: its bytes, receive stamp (0: none) and
    /// the socket's drop count.
    fn get(&self, i: usize) -> (&[u8], i64, u32) {
        (&self.bufs[i][..self.lens[i]], self.stamps[i], self.drops[i])
    }

    /// Read everything waiting on `fd`, a batch at a time, handing each datagram to `each`
    /// with its receive stamp (0: none) and the socket's drop count. Stops at the first
    /// error (nothing left, or an ICMP error a connected socket reports once).
    pub fn drain(&mut self, fd: RawFd, mut each: impl FnMut(&[u8], i64, u32)) {
        loop {
            let Ok(n) = self.recv(fd) else { return };
            for i in 0..n {
                let (pkt, stamp, drops) = self.get(i);
                each(pkt, stamp, drops);
            }
            if n < RX_BATCH {
                return;
            }
        }
    }
}

/// Events taken per `epoll_wait` by the generator's loops: a thread's epoll set holds only its
/// SIP socket and its 1 ms ticker (RTP sockets are read at their calls' turns: [`RecvBatch`]).
pub const EVENTS: usize = 4;

/// A level-triggered epoll set.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is ours and open.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watch `fd` for input; `token` comes back with its events. Closing the fd removes it.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid fds and event struct.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait up to `timeout_ms` (-1: forever); returns how many events were written.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: events is a valid writable array of the given length.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }
}

/// A monotonic timerfd firing every millisecond (the worker's tick).
pub struct Ticker {
    fd: OwnedFd,
}

impl Ticker {
    pub fn every_ms() -> io::Result<Ticker> {
        // SAFETY: plain syscalls on a fd we own.
        unsafe {
            let fd = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let ms = libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            };
            let spec = libc::itimerspec {
                it_interval: ms,
                it_value: ms,
            };
            if libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Ticker { fd })
        }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Clear the expirations (so level-triggered epoll stops reporting it).
    pub fn clear(&self) {
        let mut n = [0u8; 8];
        // SAFETY: reading 8 bytes into an 8-byte buffer.
        unsafe { libc::read(self.fd.as_raw_fd(), n.as_mut_ptr() as *mut libc::c_void, 8) };
    }
}

/// Set the calling thread's nice value (Linux: per thread). 0 leaves it alone.
pub fn nice_this_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: plain syscalls on our own thread id.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r < 0 {
        tracing::warn!(nice, error = %io::Error::last_os_error(), "cannot set the thread's nice value");
    }
}

/// Put the calling thread at real-time priority (Linux `SCHED_FIFO` 1, per thread): ahead of
/// every normal thread, behind the server's media clock.
pub fn realtime_this_thread() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "generator thread stays at normal priority (real-time refused)");
    }
}

/// Raise the open-files soft limit to the hard limit (one RTP socket per call).
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer, then the same struct back in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    #[allow(clippy::unnecessary_cast)]
    let n = r.rlim_cur as u64;
    n
}
