//! A token bucket per Open311 API key, sans-IO (time passed in): each key may post `burst`
//! requests at once, then `per_minute` a minute. The keys are the configured ones, so the
//! table never grows with traffic.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

/// Buckets for a fixed set of keys, by index.
#[derive(Debug)]
pub(crate) struct KeyLimiter {
    /// Tokens a second; 0 turns the limit off.
    rate: f64,
    burst: f64,
    buckets: Vec<Bucket>,
}

impl KeyLimiter {
    /// `keys` keys, each `burst` at once then `per_minute` a minute (0: no limit).
    pub(crate) fn new(keys: usize, per_minute: u32, burst: u32) -> KeyLimiter {
        let burst = f64::from(burst.max(1));
        KeyLimiter {
            rate: f64::from(per_minute) / 60.0,
            burst,
            buckets: vec![
                Bucket {
                    tokens: burst,
                    at: None
                };
                keys
            ],
        }
    }

    /// Takes one request of key `key` at `now`: `Ok`, or `Err(wait)` with how long until the
    /// next one would be allowed (for `Retry-After`).
    pub(crate) fn take(&mut self, key: usize, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate, self.burst);
        let Some(b) = self.buckets.get_mut(key) else {
            return Ok(());
        };
        if let Some(at) = b.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            b.tokens = (b.tokens + dt * rate).min(burst);
        }
        b.at = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let t0 = Instant::now();
        let mut l = KeyLimiter::new(2, 60, 3);
        for _ in 0..3 {
            assert!(l.take(0, t0).is_ok());
        }
        let wait = l.take(0, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // Another key has its own allowance.
        assert!(l.take(1, t0).is_ok());
        // One a second after the burst.
        assert!(l.take(0, t0 + Duration::from_millis(500)).is_err());
        assert!(l.take(0, t0 + Duration::from_millis(1000)).is_ok());
        assert!(l.take(0, t0 + Duration::from_millis(1100)).is_err());
        // A quiet key refills to its burst, no further.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.take(0, later).is_ok());
        }
        assert!(l.take(0, later).is_err());
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let t0 = Instant::now();
        let mut l = KeyLimiter::new(1, 0, 1);
        for _ in 0..1000 {
            assert!(l.take(0, t0).is_ok());
        }
    }
}
