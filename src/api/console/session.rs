//! The console's server-side sessions and its log-in limiter, sans-IO: every call takes `now`.
//!
//! * [`Sessions`]: a bounded map from the SHA-256 of a session token (the cookie's value; the
//!   token itself is never kept) to the agent it logged in and its CSRF token. A session with
//!   no request and no open event stream for the idle time is gone; past the cap the least
//!   recently used session goes first, and each agent keeps at most
//!   [`SESSIONS_PER_AGENT`] (its oldest goes first).
//! * [`LoginLimiter`]: failed log-ins counted per agent id and per source address in a sliding
//!   window; at the limit, log-ins for that id, or from that address, are refused until the
//!   oldest failure leaves the window (even with the right password, so guessing cannot go on
//!   by waiting for one lucky answer). An attempt counts as a failure from the moment it
//!   begins until it succeeds, so attempts sent in parallel cannot outrun the limit.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sessions one agent may hold at once (a browser or two, a CRM integration).
pub const SESSIONS_PER_AGENT: usize = 4;
/// Event streams one session may hold open at once.
pub const STREAMS_PER_SESSION: u32 = 4;
/// Ids and addresses the limiter remembers at once.
const LIMITER_CAP: usize = 10_000;

type Key = [u8; 32];

fn key(token: &str) -> Key {
    Sha256::digest(token.as_bytes()).into()
}

/// 32 random bytes, as 64 hex digits.
fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One logged-in console.
#[derive(Debug, Clone)]
pub struct Session {
    pub agent: String,
    /// Sent back in `X-CSRF-Token` on every request that changes state.
    pub csrf: String,
    created: Instant,
    last_seen: Instant,
    streams: u32,
}

/// What [`Sessions::create`] hands the browser.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The cookie's value.
    pub token: String,
    pub csrf: String,
}

/// The console's sessions (see the module docs).
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<Key, Session>,
    max: usize,
    idle: Duration,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        Sessions {
            map: HashMap::new(),
            max: max.max(1),
            idle: idle.max(Duration::from_secs(1)),
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// A new session for `agent`.
    pub fn create(&mut self, now: Instant, agent: &str) -> NewSession {
        self.expire(now);
        let mine: Vec<(Key, Instant)> = self
            .map
            .iter()
            .filter(|(_, s)| s.agent == agent)
            .map(|(k, s)| (*k, s.created))
            .collect();
        if mine.len() >= SESSIONS_PER_AGENT {
            if let Some((k, _)) = mine.iter().min_by_key(|(_, t)| *t) {
                self.map.remove(k);
            }
        }
        while self.map.len() >= self.max {
            let Some(k) = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.map.remove(&k);
        }
        let new = NewSession {
            token: random_token(),
            csrf: random_token(),
        };
        self.map.insert(
            key(&new.token),
            Session {
                agent: agent.to_owned(),
                csrf: new.csrf.clone(),
                created: now,
                last_seen: now,
                streams: 0,
            },
        );
        new
    }

    /// The live session with this token, marked as used now.
    pub fn touch(&mut self, now: Instant, token: &str) -> Option<Session> {
        let k = key(token);
        let idle = self.idle;
        let s = self.map.get_mut(&k)?;
        if s.streams == 0 && now.saturating_duration_since(s.last_seen) > idle {
            self.map.remove(&k);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// End the session with this token (log-out).
    pub fn remove(&mut self, token: &str) -> Option<Session> {
        self.map.remove(&key(token))
    }

    /// An event stream opens on the session; `false` (refused) past
    /// [`STREAMS_PER_SESSION`] or for a session that is gone.
    pub fn stream_opened(&mut self, now: Instant, token: &str) -> bool {
        match self.map.get_mut(&key(token)) {
            Some(s) if s.streams < STREAMS_PER_SESSION => {
                s.streams += 1;
                s.last_seen = now;
                true
            }
            _ => false,
        }
    }

    /// An event stream of the session closed; it counts as a use now.
    pub fn stream_closed(&mut self, now: Instant, token: &str) {
        if let Some(s) = self.map.get_mut(&key(token)) {
            s.streams = s.streams.saturating_sub(1);
            s.last_seen = now;
        }
    }

    /// Forget sessions idle too long.
    pub fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        self.map
            .retain(|_, s| s.streams > 0 || now.saturating_duration_since(s.last_seen) <= idle);
    }
}

/// Failures of one id or address, oldest first.
#[derive(Debug, Default)]
struct Failures(VecDeque<Instant>);

impl Failures {
    fn prune(&mut self, now: Instant, window: Duration) {
        while self
            .0
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.0.pop_front();
        }
    }
}

/// Log-ins refused after repeated failures (see the module docs).
#[derive(Debug)]
pub struct LoginLimiter {
    by_id: HashMap<String, Failures>,
    by_ip: HashMap<IpAddr, Failures>,
    max: usize,
    window: Duration,
}

impl LoginLimiter {
    /// At most `max` failures per id and per address within `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        LoginLimiter {
            by_id: HashMap::new(),
            by_ip: HashMap::new(),
            max: usize::try_from(max.max(1)).unwrap_or(usize::MAX),
            window: window.max(Duration::from_secs(1)),
        }
    }

    /// A log-in attempt for `id` from `ip` begins: `Err(retry_after)` while log-ins for that
    /// id or from that address are refused; otherwise the attempt is counted as a failure
    /// at once (so attempts made in parallel cannot outrun the limit) until
    /// [`LoginLimiter::succeeded`] takes it back. `known` says whether `id` is an agent
    /// (unknown ids count only against the address, so nobody can fill the table with
    /// made-up ids).
    pub fn begin(
        &mut self,
        now: Instant,
        id: &str,
        known: bool,
        ip: IpAddr,
    ) -> Result<(), Duration> {
        let ip = ip.to_canonical();
        let (max, window) = (self.max, self.window);
        let wait = |f: Option<&mut Failures>| -> Option<Duration> {
            let f = f?;
            f.prune(now, window);
            if f.0.len() < max {
                return None;
            }
            // Open again when enough failures have left the window.
            let t = f.0.get(f.0.len() - max)?;
            Some(window.saturating_sub(now.saturating_duration_since(*t)))
        };
        let a = wait(self.by_id.get_mut(id));
        let b = wait(self.by_ip.get_mut(&ip));
        if let Some(d) = a.max(b) {
            return Err(d.max(Duration::from_secs(1)));
        }
        self.make_room(now);
        if known {
            self.by_id
                .entry(id.to_owned())
                .or_default()
                .0
                .push_back(now);
        }
        self.by_ip.entry(ip).or_default().0.push_back(now);
        Ok(())
    }

    /// The attempt [`LoginLimiter::begin`] counted at `at` succeeded: it is taken back, and
    /// the id's earlier failures are forgotten (the address's are not).
    pub fn succeeded(&mut self, at: Instant, id: &str, ip: IpAddr) {
        self.by_id.remove(id);
        if let Some(f) = self.by_ip.get_mut(&ip.to_canonical()) {
            if let Some(i) = f.0.iter().rposition(|t| *t == at) {
                f.0.remove(i);
            }
        }
    }

    fn make_room(&mut self, now: Instant) {
        let window = self.window;
        if self.by_id.len() + self.by_ip.len() < LIMITER_CAP {
            return;
        }
        self.by_id.retain(|_, f| {
            f.prune(now, window);
            !f.0.is_empty()
        });
        self.by_ip.retain(|_, f| {
            f.prune(now, window);
            !f.0.is_empty()
        });
        // Still full: forget the address whose last failure is oldest.
        while self.by_id.len() + self.by_ip.len() >= LIMITER_CAP {
            let Some(ip) = self
                .by_ip
                .iter()
                .min_by_key(|(_, f)| f.0.back().copied())
                .map(|(ip, _)| *ip)
            else {
                break;
            };
            self.by_ip.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_token_until_idle_or_removed() {
        let t0 = Instant::now();
        let mut s = Sessions::new(10, Duration::from_secs(60));
        let a = s.create(t0, "1001");
        assert_eq!(a.token.len(), 64);
        assert_ne!(a.token, a.csrf);
        let got = s.touch(t0 + Duration::from_secs(50), &a.token).unwrap();
        assert_eq!(
            (got.agent.as_str(), got.csrf.as_str()),
            ("1001", a.csrf.as_str())
        );
        assert!(s.touch(t0, "not-a-token").is_none());
        // Used at 50 s: alive until 110 s.
        assert!(s.touch(t0 + Duration::from_secs(105), &a.token).is_some());
        assert!(s.touch(t0 + Duration::from_secs(170), &a.token).is_none());
        let b = s.create(t0, "1001");
        assert!(s.remove(&b.token).is_some());
        assert!(s.touch(t0, &b.token).is_none());
    }

    #[test]
    fn an_open_event_stream_keeps_a_session_alive() {
        let t0 = Instant::now();
        let mut s = Sessions::new(10, Duration::from_secs(60));
        let a = s.create(t0, "1001");
        assert!(s.stream_opened(t0, &a.token));
        assert!(s.touch(t0 + Duration::from_secs(600), &a.token).is_some());
        s.stream_closed(t0 + Duration::from_secs(600), &a.token);
        assert!(s.touch(t0 + Duration::from_secs(700), &a.token).is_none());
        let b = s.create(t0, "1002");
        for _ in 0..STREAMS_PER_SESSION {
            assert!(s.stream_opened(t0, &b.token));
        }
        assert!(!s.stream_opened(t0, &b.token));
    }

    #[test]
    fn sessions_are_bounded_overall_and_per_agent() {
        let t0 = Instant::now();
        let mut s = Sessions::new(3, Duration::from_secs(600));
        let at = |n: u64| t0 + Duration::from_secs(n);
        let first = s.create(at(0), "a");
        let second = s.create(at(1), "b");
        let _ = s.create(at(2), "c");
        s.touch(at(3), &first.token);
        let _ = s.create(at(4), "d");
        assert_eq!(s.len(), 3);
        // The least recently used went.
        assert!(s.touch(at(5), &second.token).is_none());
        assert!(s.touch(at(5), &first.token).is_some());
        let mut one = Sessions::new(100, Duration::from_secs(600));
        let oldest = one.create(at(0), "a");
        for i in 1..=SESSIONS_PER_AGENT as u64 {
            one.create(at(i), "a");
        }
        assert_eq!(one.len(), SESSIONS_PER_AGENT);
        assert!(one.touch(at(10), &oldest.token).is_none());
    }

    #[test]
    fn log_ins_are_refused_per_id_and_per_address_after_repeated_failures() {
        let t0 = Instant::now();
        let at = |n: u64| t0 + Duration::from_secs(n);
        let mut l = LoginLimiter::new(3, Duration::from_secs(300));
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        // Three attempts begun (say, in parallel): a fourth is refused before any answer.
        for i in 0..3 {
            assert_eq!(l.begin(at(i), "1001", true, ip), Ok(()));
        }
        assert_eq!(
            l.begin(at(10), "1001", true, other),
            Err(Duration::from_secs(290))
        );
        // The address is spent for every id; another address may try another id.
        assert!(l.begin(at(10), "1002", true, ip).is_err());
        assert_eq!(l.begin(at(10), "1002", true, other), Ok(()));
        l.succeeded(at(10), "1002", other);
        // Open again once the first failure leaves the window.
        assert_eq!(l.begin(at(300), "1001", true, other), Ok(()));
        // Unknown ids count only against the address.
        let mut l = LoginLimiter::new(3, Duration::from_secs(300));
        for i in 0..3 {
            l.begin(at(i), &format!("nobody{i}"), false, other).unwrap();
        }
        assert!(l.begin(at(5), "1002", true, ip).is_ok());
        assert!(l.begin(at(5), "1002", true, other).is_err());
        // A success takes its attempt back and clears the id.
        let mut l = LoginLimiter::new(2, Duration::from_secs(300));
        l.begin(at(0), "1001", true, ip).unwrap();
        l.begin(at(1), "1001", true, ip).unwrap();
        l.succeeded(at(1), "1001", ip);
        assert_eq!(l.begin(at(2), "1001", true, other), Ok(()));
        // The address keeps its one failure (at 0): one more attempt, then it is spent.
        assert_eq!(l.begin(at(3), "1003", true, ip), Ok(()));
        assert_eq!(
            l.begin(at(4), "1004", true, ip),
            Err(Duration::from_secs(296))
        );
    }
}
