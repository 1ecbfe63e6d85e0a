//! Heartbeats: a loop that must keep running (a media clock thread, the SIP UA task) marks
//! each turn with [`Heartbeat::beat`], and the readiness check (`GET /health/ready`) reads how
//! long ago the last one was with [`Heartbeat::age`].
//!
//! A heartbeat is one atomic: beating never blocks, never allocates and never takes a lock, so
//! the media clock may beat on every pass. Time is passed in.
//!
//! Fault drills: [`Heartbeat::drill_stall`] asks the loop to stop for a while at its next turn
//! (the loop calls [`Heartbeat::take_stall`] and waits in place), so that monitoring can be
//! shown to notice a loop that stopped, the way `TicketStore::set_read_only` makes the
//! database refuse writes. Nothing else ever sets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a loop last turned.
#[derive(Debug)]
pub struct Heartbeat {
    /// Beats are stored as milliseconds since this instant.
    base: Instant,
    /// Milliseconds since `base` of the last beat.
    last_ms: AtomicU64,
    /// A stall asked for by [`Heartbeat::drill_stall`], in milliseconds; 0 for none.
    stall_ms: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that beat at `now` (a loop about to start counts as alive).
    pub(crate) fn new(now: Instant) -> Heartbeat {
        Heartbeat {
            base: now,
            last_ms: AtomicU64::new(0),
            stall_ms: AtomicU64::new(0),
        }
    }

    /// The loop turned at `now`.
    pub(crate) fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.base).as_millis();
        self.last_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long before `now` the loop last turned.
    pub(crate) fn age(&self, now: Instant) -> Duration {
        let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// Fault drill: ask the loop to stop for `d` at its next turn.
    pub(crate) fn drill_stall(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.stall_ms.store(ms, Ordering::Relaxed);
    }

    /// A stall asked for by [`Heartbeat::drill_stall`] (once): the loop waits this long in
    /// place, doing nothing else.
    pub(crate) fn take_stall(&self) -> Option<Duration> {
        match self.stall_ms.swap(0, Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_counts_from_the_last_beat() {
        let t0 = Instant::now();
        let h = Heartbeat::new(t0);
        assert_eq!(h.age(t0), Duration::ZERO);
        assert_eq!(h.age(t0 + Duration::from_secs(3)), Duration::from_secs(3));
        h.beat(t0 + Duration::from_secs(2));
        assert_eq!(h.age(t0 + Duration::from_secs(3)), Duration::from_secs(1));
        // A beat from a thread that read the clock a little earlier never moves it back.
        h.beat(t0 + Duration::from_secs(1));
        assert_eq!(h.age(t0 + Duration::from_secs(3)), Duration::from_secs(1));
        // Read before the last beat (another thread's clock): no age, not a panic.
        assert_eq!(h.age(t0), Duration::ZERO);
    }

    #[test]
    fn a_drill_stall_is_taken_once() {
        let h = Heartbeat::new(Instant::now());
        assert_eq!(h.take_stall(), None);
        h.drill_stall(Duration::from_millis(1500));
        assert_eq!(h.take_stall(), Some(Duration::from_millis(1500)));
        assert_eq!(h.take_stall(), None);
    }
}
