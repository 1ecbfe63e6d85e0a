//! SIP transactions (RFC 3261 §17, with the RFC 6026 "Accepted" states), sans-IO.
//!
//! Each transaction is a plain state machine: the UA core feeds it what arrived and the current
//! time (`now`), and it answers with [`Output`]s (bytes to transmit, a timeout to report, "I am
//! done"). It never reads a clock, owns no socket and spawns nothing; [`crate::sip::ua`] drives
//! every transaction from one tokio task and asks `ServerTransaction::next_deadline` /
//! `ClientTransaction::next_deadline` when to wake up next.
//!
//! Timers live in one table indexed by [`Timer`] (`Timers`), as RFC 3261 names them:
//!
//! | side | kind | timers |
//! | --- | --- | --- |
//! | server | INVITE | G (retransmit final response), H (give up waiting for ACK), I (absorb ACKs), L (RFC 6026: absorb INVITE retransmissions after a 2xx) |
//! | server | non-INVITE | J (absorb request retransmissions) |
//! | client | INVITE | A (retransmit INVITE), B (give up), D (absorb final response retransmissions), M (RFC 6026) |
//! | client | non-INVITE | E (retransmit), F (give up), K (absorb response retransmissions) |
//!
//! A deliberate choice: RFC 3261 §13.3.1.4 gives the retransmission of a 2xx to INVITE to the UA
//! core, and RFC 6026 keeps the server transaction alive in "Accepted" to absorb retransmitted
//! INVITEs. We let the server INVITE transaction do both in the Accepted state (timer G resends
//! the 2xx until the ACK arrives, timer L ends it), so that one table holds every SIP timer and
//! the UA core only has to report the ACK.
//!
//! Memory: a transaction over UDP lingers after its final response (timers I, J, L: up to
//! 32 s), which at 8 s calls is several ended calls' transactions per live call. While it
//! lingers it holds only its state, its timers and the bytes of the last response, and drops
//! even those once nothing can ask for them again: after the ACK of an INVITE's final response
//! (Confirmed, or Accepted and acked), a retransmitted INVITE is absorbed without an answer
//! (RFC 6026 §7.1: in Accepted the 2xx is resent only until the ACK) and retransmitted ACKs
//! need none. A non-INVITE transaction keeps its response for the whole of timer J: a
//! retransmitted BYE must get its 200 again.

use bytes::Bytes;
use std::time::{Duration, Instant};

/// RTT estimate (RFC 3261 §17.1.1.1).
pub const T1: Duration = Duration::from_millis(500);
/// Maximum retransmit interval for non-INVITE requests and INVITE responses.
pub const T2: Duration = Duration::from_secs(4);
/// Maximum duration a message remains in the network.
pub(crate) const T4: Duration = Duration::from_secs(5);

/// The named RFC 3261 / RFC 6026 timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    A,
    B,
    D,
    E,
    F,
    G,
    H,
    I,
    J,
    K,
    L,
    M,
}

const TIMER_COUNT: usize = 12;

impl Timer {
    const ALL: [Timer; TIMER_COUNT] = [
        Timer::A,
        Timer::B,
        Timer::D,
        Timer::E,
        Timer::F,
        Timer::G,
        Timer::H,
        Timer::I,
        Timer::J,
        Timer::K,
        Timer::L,
        Timer::M,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// One table of deadlines, indexed by timer name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Timers {
    at: [Option<Instant>; TIMER_COUNT],
}

impl Timers {
    pub(crate) fn set(&mut self, t: Timer, at: Instant) {
        self.at[t.index()] = Some(at);
    }

    pub(crate) fn clear(&mut self, t: Timer) {
        self.at[t.index()] = None;
    }

    #[cfg(test)]
    pub(crate) fn get(&self, t: Timer) -> Option<Instant> {
        self.at[t.index()]
    }

    /// The earliest armed deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.at.iter().flatten().min().copied()
    }

    /// Disarm and return the timers that have fired by `now`, earliest first.
    pub(crate) fn take_expired(&mut self, now: Instant) -> Vec<Timer> {
        let mut fired: Vec<(Instant, Timer)> = Timer::ALL
            .iter()
            .filter_map(|t| {
                self.at[t.index()]
                    .filter(|at| *at <= now)
                    .map(|at| (at, *t))
            })
            .collect();
        fired.sort_by_key(|(at, _)| *at);
        for (_, t) in &fired {
            self.clear(*t);
        }
        fired.into_iter().map(|(_, t)| t).collect()
    }
}

/// What a transaction asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the transaction's peer.
    Transmit(Bytes),
    /// Pass the response just given to `on_response` up to the transaction user.
    Deliver,
    /// The ACK for our 2xx arrived (server INVITE): the dialog is confirmed.
    Acked,
    /// The transaction timed out (timer B/F for clients, H or L without ACK for servers).
    Timeout(Timer),
    /// The transaction is over; the driver removes it.
    Terminated,
}

/// Server transaction states (RFC 3261 §17.2, RFC 6026 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Non-INVITE only: request received, nothing sent yet.
    Trying,
    Proceeding,
    /// A final (non-2xx for INVITE) response was sent.
    Completed,
    /// INVITE: the ACK for a non-2xx final arrived.
    Confirmed,
    /// INVITE: a 2xx was sent (RFC 6026).
    Accepted {
        acked: bool,
    },
    Terminated,
}

/// A server transaction, INVITE or non-INVITE.
#[derive(Debug, Clone)]
pub struct ServerTransaction {
    invite: bool,
    reliable: bool,
    state: ServerState,
    last_response: Option<Bytes>,
    /// Current retransmission interval of timer G.
    interval: Duration,
    timers: Timers,
}

impl ServerTransaction {
    /// A transaction for a new request. `reliable` is true on TCP.
    pub fn new(invite: bool, reliable: bool) -> Self {
        ServerTransaction {
            invite,
            reliable,
            state: if invite {
                ServerState::Proceeding
            } else {
                ServerState::Trying
            },
            last_response: None,
            interval: T1,
            timers: Timers::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> ServerState {
        self.state
    }

    /// The last response sent, if any.
    #[cfg(test)]
    pub(crate) fn last_response(&self) -> Option<&Bytes> {
        self.last_response.as_ref()
    }

    /// True once a final response has been sent.
    pub(crate) fn is_final(&self) -> bool {
        !matches!(self.state, ServerState::Trying | ServerState::Proceeding)
    }

    #[cfg(test)]
    pub(crate) fn is_terminated(&self) -> bool {
        self.state == ServerState::Terminated
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// The TU sends a response. Returns what to do; a response after the final one is refused
    /// (empty output).
    pub(crate) fn respond(&mut self, now: Instant, code: u16, bytes: Bytes) -> Vec<Output> {
        if self.is_final() {
            return Vec::new();
        }
        let mut out = vec![Output::Transmit(bytes.clone())];
        self.last_response = Some(bytes);
        if code < 200 {
            self.state = ServerState::Proceeding;
            return out;
        }
        if self.invite {
            if code < 300 {
                self.state = ServerState::Accepted { acked: false };
                self.interval = T1;
                self.timers.set(Timer::G, now + T1);
                self.timers.set(Timer::L, now + 64 * T1);
            } else {
                self.state = ServerState::Completed;
                if !self.reliable {
                    self.interval = T1;
                    self.timers.set(Timer::G, now + T1);
                }
                self.timers.set(Timer::H, now + 64 * T1);
            }
        } else {
            self.state = ServerState::Completed;
            if self.reliable {
                self.state = ServerState::Terminated;
                out.push(Output::Terminated);
            } else {
                self.timers.set(Timer::J, now + 64 * T1);
            }
        }
        out
    }

    /// The same request arrived again: resend the last response, if any (none once an INVITE's
    /// final response has been ACKed: the retransmission is absorbed).
    pub(crate) fn on_retransmission(&mut self) -> Vec<Output> {
        match (&self.state, &self.last_response) {
            (
                ServerState::Proceeding | ServerState::Completed | ServerState::Accepted { .. },
                Some(b),
            ) => vec![Output::Transmit(b.clone())],
            _ => Vec::new(),
        }
    }

    /// An ACK for this INVITE arrived (for a non-2xx: same branch; for a 2xx: matched by dialog).
    pub(crate) fn on_ack(&mut self, now: Instant) -> Vec<Output> {
        match self.state {
            ServerState::Completed if self.invite => {
                self.timers.clear(Timer::G);
                self.timers.clear(Timer::H);
                if self.reliable {
                    self.state = ServerState::Terminated;
                    return vec![Output::Terminated];
                }
                self.state = ServerState::Confirmed;
                // Timer I only absorbs ACKs: the response is never sent again.
                self.last_response = None;
                self.timers.set(Timer::I, now + T4);
                Vec::new()
            }
            ServerState::Accepted { acked: false } => {
                self.timers.clear(Timer::G);
                self.state = ServerState::Accepted { acked: true };
                // The ACK ends 2xx retransmission; INVITE retransmissions until timer L are
                // absorbed silently (RFC 6026 §7.1), so the 2xx is not needed any more.
                self.last_response = None;
                vec![Output::Acked]
            }
            _ => Vec::new(),
        }
    }

    /// Fire every timer due by `now`.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        for t in self.timers.take_expired(now) {
            match (t, self.state) {
                (Timer::G, ServerState::Completed | ServerState::Accepted { acked: false }) => {
                    if let Some(b) = &self.last_response {
                        out.push(Output::Transmit(b.clone()));
                    }
                    self.interval = (self.interval * 2).min(T2);
                    self.timers.set(Timer::G, now + self.interval);
                }
                (Timer::H, ServerState::Completed) => {
                    out.push(Output::Timeout(Timer::H));
                    self.terminate(&mut out);
                }
                (Timer::L, ServerState::Accepted { acked }) => {
                    if !acked {
                        out.push(Output::Timeout(Timer::L));
                    }
                    self.terminate(&mut out);
                }
                (Timer::I, ServerState::Confirmed) | (Timer::J, ServerState::Completed) => {
                    self.terminate(&mut out);
                }
                _ => {}
            }
        }
        out
    }

    fn terminate(&mut self, out: &mut Vec<Output>) {
        if self.state != ServerState::Terminated {
            self.state = ServerState::Terminated;
            self.timers = Timers::default();
            out.push(Output::Terminated);
        }
    }
}

/// Client transaction states (RFC 3261 §17.1, RFC 6026 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientState {
    /// INVITE sent, nothing heard (Trying for non-INVITE).
    Calling,
    Proceeding,
    Completed,
    /// INVITE: a 2xx arrived (RFC 6026); further 2xx are passed up for the TU to ACK again.
    Accepted,
    Terminated,
}

/// A client transaction, INVITE or non-INVITE.
#[derive(Debug, Clone)]
pub(crate) struct ClientTransaction {
    invite: bool,
    reliable: bool,
    state: ClientState,
    request: Bytes,
    ack: Option<Bytes>,
    interval: Duration,
    timers: Timers,
}

impl ClientTransaction {
    /// Start a transaction for `request`; the first output transmits it.
    pub(crate) fn new(
        now: Instant,
        invite: bool,
        reliable: bool,
        request: Bytes,
    ) -> (Self, Vec<Output>) {
        let mut timers = Timers::default();
        if invite {
            if !reliable {
                timers.set(Timer::A, now + T1);
            }
            timers.set(Timer::B, now + 64 * T1);
        } else {
            if !reliable {
                timers.set(Timer::E, now + T1);
            }
            timers.set(Timer::F, now + 64 * T1);
        }
        let out = vec![Output::Transmit(request.clone())];
        (
            ClientTransaction {
                invite,
                reliable,
                state: ClientState::Calling,
                request,
                ack: None,
                interval: T1,
                timers,
            },
            out,
        )
    }

    pub(crate) fn state(&self) -> ClientState {
        self.state
    }

    #[cfg(test)]
    pub(crate) fn is_terminated(&self) -> bool {
        self.state == ClientState::Terminated
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// A response for this transaction arrived. For a non-2xx final response to an INVITE the
    /// transaction must ACK it itself; `make_ack` builds that ACK (only called when needed).
    pub(crate) fn on_response(
        &mut self,
        now: Instant,
        code: u16,
        make_ack: impl FnOnce() -> Bytes,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        match self.state {
            ClientState::Calling | ClientState::Proceeding => {
                if code < 200 {
                    self.state = ClientState::Proceeding;
                    if self.invite {
                        self.timers.clear(Timer::A);
                    } else if !self.reliable {
                        // Keep retransmitting, but at T2 (§17.1.2.2).
                        self.interval = T2;
                    }
                    out.push(Output::Deliver);
                } else if self.invite && code < 300 {
                    self.state = ClientState::Accepted;
                    self.timers = Timers::default();
                    self.timers.set(Timer::M, now + 64 * T1);
                    out.push(Output::Deliver);
                } else if self.invite {
                    let ack = make_ack();
                    out.push(Output::Transmit(ack.clone()));
                    self.ack = Some(ack);
                    out.push(Output::Deliver);
                    self.timers = Timers::default();
                    if self.reliable {
                        self.state = ClientState::Terminated;
                        out.push(Output::Terminated);
                    } else {
                        self.state = ClientState::Completed;
                        self.timers.set(Timer::D, now + Duration::from_secs(32));
                    }
                } else {
                    out.push(Output::Deliver);
                    self.timers = Timers::default();
                    if self.reliable {
                        self.state = ClientState::Terminated;
                        out.push(Output::Terminated);
                    } else {
                        self.state = ClientState::Completed;
                        self.timers.set(Timer::K, now + T4);
                    }
                }
            }
            ClientState::Completed => {
                // A retransmitted final response: re-ACK (INVITE) or absorb.
                if let Some(ack) = &self.ack {
                    out.push(Output::Transmit(ack.clone()));
                }
            }
            ClientState::Accepted => {
                if (200..300).contains(&code) {
                    out.push(Output::Deliver);
                }
            }
            ClientState::Terminated => {}
        }
        out
    }

    /// Fire every timer due by `now`.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        for t in self.timers.take_expired(now) {
            match (t, self.state) {
                (Timer::A, ClientState::Calling) => {
                    out.push(Output::Transmit(self.request.clone()));
                    self.interval *= 2;
                    self.timers.set(Timer::A, now + self.interval);
                }
                (Timer::E, ClientState::Calling | ClientState::Proceeding) => {
                    out.push(Output::Transmit(self.request.clone()));
                    self.interval = if self.state == ClientState::Proceeding {
                        T2
                    } else {
                        (self.interval * 2).min(T2)
                    };
                    self.timers.set(Timer::E, now + self.interval);
                }
                // Timer B only matters before any response (§17.1.1.2): a phone that is
                // ringing may ring for as long as the TU lets it (the TU CANCELs).
                (Timer::B, ClientState::Calling)
                | (Timer::F, ClientState::Calling | ClientState::Proceeding) => {
                    out.push(Output::Timeout(t));
                    self.terminate(&mut out);
                }
                (Timer::D | Timer::K, ClientState::Completed)
                | (Timer::M, ClientState::Accepted) => {
                    self.terminate(&mut out);
                }
                _ => {}
            }
        }
        out
    }

    fn terminate(&mut self, out: &mut Vec<Output>) {
        if self.state != ClientState::Terminated {
            self.state = ClientState::Terminated;
            self.timers = Timers::default();
            out.push(Output::Terminated);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmits(out: &[Output]) -> usize {
        out.iter()
            .filter(|o| matches!(o, Output::Transmit(_)))
            .count()
    }

    /// Advance virtual time deadline by deadline until `until`, collecting outputs with times.
    fn run_server(
        tx: &mut ServerTransaction,
        start: Instant,
        until: Duration,
    ) -> Vec<(Duration, Output)> {
        let mut log = Vec::new();
        while let Some(at) = tx.next_deadline() {
            if at > start + until {
                break;
            }
            for o in tx.on_timeout(at) {
                log.push((at - start, o));
            }
        }
        log
    }

    fn run_client(
        tx: &mut ClientTransaction,
        start: Instant,
        until: Duration,
    ) -> Vec<(Duration, Output)> {
        let mut log = Vec::new();
        while let Some(at) = tx.next_deadline() {
            if at > start + until {
                break;
            }
            for o in tx.on_timeout(at) {
                log.push((at - start, o));
            }
        }
        log
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn invite_server_retransmits_2xx_until_ack_then_absorbs_until_l() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(true, false);
        assert_eq!(
            transmits(&tx.respond(t0, 100, Bytes::from_static(b"100"))),
            1
        );
        assert_eq!(
            transmits(&tx.respond(t0, 200, Bytes::from_static(b"200"))),
            1
        );
        // Retransmitted INVITE gets the 2xx again.
        assert_eq!(
            tx.on_retransmission(),
            vec![Output::Transmit(Bytes::from_static(b"200"))]
        );
        // Timer G: 0.5, 1.5, 3.5 s (intervals 0.5, 1, 2).
        let log = run_server(&mut tx, t0, ms(3600));
        let at: Vec<Duration> = log.iter().map(|(d, _)| *d).collect();
        assert_eq!(at, vec![ms(500), ms(1500), ms(3500)]);
        assert_eq!(tx.on_ack(t0 + ms(3600)), vec![Output::Acked]);
        // A second ACK is not reported again.
        assert!(tx.on_ack(t0 + ms(3700)).is_empty());
        // After the ACK, a retransmitted INVITE is absorbed (RFC 6026 §7.1) and the 2xx is
        // no longer held.
        assert!(tx.on_retransmission().is_empty());
        assert!(tx.last_response().is_none());
        // No more retransmissions; L ends it at 32 s without a timeout.
        let log = run_server(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(log, vec![(Duration::from_secs(32), Output::Terminated)]);
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_2xx_without_ack_times_out_at_64_t1() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(true, false);
        tx.respond(t0, 200, Bytes::from_static(b"200"));
        let log = run_server(&mut tx, t0, Duration::from_secs(60));
        let retrans: Vec<Duration> = log
            .iter()
            .filter(|(_, o)| matches!(o, Output::Transmit(_)))
            .map(|(d, _)| *d)
            .collect();
        // 0.5, 1.5, 3.5, 7.5, then every T2 (4 s) until 32 s.
        assert_eq!(
            &retrans[..5],
            &[ms(500), ms(1500), ms(3500), ms(7500), ms(11500)]
        );
        assert!(retrans.iter().all(|d| *d < Duration::from_secs(32)));
        assert!(log.contains(&(Duration::from_secs(32), Output::Timeout(Timer::L))));
        assert_eq!(log.last().map(|(_, o)| o.clone()), Some(Output::Terminated));
    }

    #[test]
    fn invite_server_non_2xx_g_h_i() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(true, false);
        tx.respond(t0, 487, Bytes::from_static(b"487"));
        assert_eq!(tx.state(), ServerState::Completed);
        // a second final is refused
        assert!(tx.respond(t0, 200, Bytes::from_static(b"200")).is_empty());
        let log = run_server(&mut tx, t0, ms(2000));
        assert_eq!(log.len(), 2); // G at 0.5 and 1.5
        assert!(tx.on_ack(t0 + ms(2000)).is_empty());
        assert_eq!(tx.state(), ServerState::Confirmed);
        assert!(tx.last_response().is_none());
        // Timer I (T4) absorbs ACK retransmissions, then terminates.
        let log = run_server(&mut tx, t0, Duration::from_secs(10));
        assert_eq!(log, vec![(ms(7000), Output::Terminated)]);
    }

    #[test]
    fn invite_server_no_ack_fires_h() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(true, false);
        tx.respond(t0, 486, Bytes::from_static(b"486"));
        let log = run_server(&mut tx, t0, Duration::from_secs(40));
        assert!(log.contains(&(Duration::from_secs(32), Output::Timeout(Timer::H))));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_server_over_tcp_does_not_retransmit_non_2xx() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(true, true);
        tx.respond(t0, 488, Bytes::from_static(b"488"));
        assert_eq!(tx.timers.get(Timer::G), None);
        assert_eq!(tx.on_ack(t0), vec![Output::Terminated]);
    }

    #[test]
    fn non_invite_server_j() {
        let t0 = Instant::now();
        let mut tx = ServerTransaction::new(false, false);
        assert!(tx.on_retransmission().is_empty()); // Trying: nothing to resend
        tx.respond(t0, 200, Bytes::from_static(b"200"));
        assert_eq!(tx.on_retransmission().len(), 1);
        let log = run_server(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(log, vec![(Duration::from_secs(32), Output::Terminated)]);
        // Over TCP it ends at once.
        let mut tx = ServerTransaction::new(false, true);
        assert_eq!(
            tx.respond(t0, 200, Bytes::from_static(b"200")).last(),
            Some(&Output::Terminated)
        );
    }

    #[test]
    fn invite_client_a_b() {
        let t0 = Instant::now();
        let (mut tx, out) = ClientTransaction::new(t0, true, false, Bytes::from_static(b"INVITE"));
        assert_eq!(transmits(&out), 1);
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        let retrans: Vec<Duration> = log
            .iter()
            .filter(|(_, o)| matches!(o, Output::Transmit(_)))
            .map(|(d, _)| *d)
            .collect();
        // A doubles without cap: 0.5, 1.5, 3.5, 7.5, 15.5, 31.5
        assert_eq!(
            retrans,
            vec![ms(500), ms(1500), ms(3500), ms(7500), ms(15500), ms(31500)]
        );
        assert!(log.contains(&(Duration::from_secs(32), Output::Timeout(Timer::B))));
        assert!(tx.is_terminated());
    }

    #[test]
    fn invite_client_non_2xx_acks_and_absorbs_with_d() {
        let t0 = Instant::now();
        let (mut tx, _) = ClientTransaction::new(t0, true, false, Bytes::from_static(b"INVITE"));
        assert_eq!(
            tx.on_response(t0 + ms(100), 180, || unreachable!()),
            vec![Output::Deliver]
        );
        assert_eq!(tx.timers.get(Timer::A), None);
        let out = tx.on_response(t0 + ms(200), 486, || Bytes::from_static(b"ACK"));
        assert_eq!(
            out,
            vec![
                Output::Transmit(Bytes::from_static(b"ACK")),
                Output::Deliver
            ]
        );
        // Retransmitted 486: ACK again, not delivered again.
        assert_eq!(
            tx.on_response(t0 + ms(300), 486, || unreachable!()),
            vec![Output::Transmit(Bytes::from_static(b"ACK"))]
        );
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(log, vec![(ms(32200), Output::Terminated)]);
    }

    #[test]
    fn invite_client_2xx_is_accepted_and_retransmitted_2xx_delivered() {
        let t0 = Instant::now();
        let (mut tx, _) = ClientTransaction::new(t0, true, false, Bytes::from_static(b"INVITE"));
        assert_eq!(
            tx.on_response(t0, 200, || unreachable!()),
            vec![Output::Deliver]
        );
        assert_eq!(
            tx.on_response(t0 + ms(500), 200, || unreachable!()),
            vec![Output::Deliver]
        );
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(log, vec![(Duration::from_secs(32), Output::Terminated)]);
    }

    #[test]
    fn non_invite_client_e_f_k() {
        let t0 = Instant::now();
        let (mut tx, _) = ClientTransaction::new(t0, false, false, Bytes::from_static(b"BYE"));
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        let retrans: Vec<Duration> = log
            .iter()
            .filter(|(_, o)| matches!(o, Output::Transmit(_)))
            .map(|(d, _)| *d)
            .collect();
        // E: 0.5, 1.5, 3.5, 7.5, 11.5, ... capped at T2
        assert_eq!(
            &retrans[..5],
            &[ms(500), ms(1500), ms(3500), ms(7500), ms(11500)]
        );
        assert!(log.contains(&(Duration::from_secs(32), Output::Timeout(Timer::F))));

        let (mut tx, _) = ClientTransaction::new(t0, false, false, Bytes::from_static(b"BYE"));
        assert_eq!(
            tx.on_response(t0 + ms(50), 200, || unreachable!()),
            vec![Output::Deliver]
        );
        assert!(tx
            .on_response(t0 + ms(60), 200, || unreachable!())
            .is_empty());
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(log, vec![(ms(5050), Output::Terminated)]);
    }

    #[test]
    fn non_invite_client_proceeding_retransmits_at_t2() {
        let t0 = Instant::now();
        let (mut tx, _) = ClientTransaction::new(t0, false, false, Bytes::from_static(b"REFER"));
        tx.on_response(t0 + ms(100), 100, || unreachable!());
        let log = run_client(&mut tx, t0, ms(9000));
        let retrans: Vec<Duration> = log.iter().map(|(d, _)| *d).collect();
        assert_eq!(retrans, vec![ms(500), ms(4500), ms(8500)]);
    }

    #[test]
    fn client_over_tcp_does_not_retransmit() {
        let t0 = Instant::now();
        let (mut tx, _) = ClientTransaction::new(t0, false, true, Bytes::from_static(b"BYE"));
        let log = run_client(&mut tx, t0, Duration::from_secs(40));
        assert_eq!(
            log,
            vec![
                (Duration::from_secs(32), Output::Timeout(Timer::F)),
                (Duration::from_secs(32), Output::Terminated)
            ]
        );
    }
}
