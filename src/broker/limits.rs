//! Per-caller rate limits, so that one caller's loop is no denial of
//! service for the others: caller-forced refreshes (RefreshToken, a
//! `min_remaining` the current token does not meet, a proxied 401) per
//! minute, and proxied requests per second. Each caller (by the name its
//! rule gives it; `unnamed` and `anonymous` for the rest) has a token
//! bucket: it refills at the rate, holds at most a burst, and a request
//! finding it empty is told how long until the next one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One environment's limits (none: unlimited).
#[derive(Debug, Default)]
pub struct EnvironmentLimits {
    /// Caller-forced refreshes, per minute, with a burst of as many.
    pub refresh: Option<Limiter>,
    /// Proxied requests, per second, with a burst of twice as many.
    pub proxy: Option<Limiter>,
}

impl EnvironmentLimits {
    pub fn new(limits: crate::policy::RateLimits) -> Self {
        Self {
            refresh: limits
                .refresh_per_minute
                .map(|n| Limiter::new(n, Duration::from_secs(60), n)),
            proxy: limits
                .proxy_per_second
                .map(|n| Limiter::new(n, Duration::from_secs(1), n.saturating_mul(2))),
        }
    }
}

/// One kind of limit for one environment.
#[derive(Debug)]
pub struct Limiter {
    per_second: f64,
    burst: f64,
    /// By caller name: the configured names plus `unnamed` and `anonymous`,
    /// so the map is bounded by the configuration.
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    /// `count` per `per`, with a burst of `burst` (at least one).
    pub fn new(count: u32, per: Duration, burst: u32) -> Self {
        Self {
            per_second: f64::from(count) / per.as_secs_f64(),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one for `who`, or says how long until one is there.
    pub fn take(&self, who: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = match buckets.get_mut(who) {
            Some(bucket) => bucket,
            None => buckets.entry(who.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        if self.per_second <= 0.0 {
            return Err(Duration::from_secs(60));
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_caller() {
        let limiter = Limiter::new(6, Duration::from_secs(60), 6);
        let now = Instant::now();
        for n in 0..6 {
            assert_eq!(limiter.take("a", now), Ok(()), "take {n}");
        }
        let wait = limiter.take("a", now).unwrap_err();
        assert!((wait.as_secs_f64() - 10.0).abs() < 1e-6, "{wait:?}");
        // Another caller has a bucket of its own.
        assert_eq!(limiter.take("b", now), Ok(()));
        // One refills every 10 s, and never beyond the burst.
        assert_eq!(limiter.take("a", now + Duration::from_secs(11)), Ok(()));
        assert!(limiter.take("a", now + Duration::from_secs(15)).is_err());
        let later = now + Duration::from_secs(3600);
        for _ in 0..6 {
            assert_eq!(limiter.take("a", later), Ok(()));
        }
        assert!(limiter.take("a", later).is_err());
    }

    #[test]
    fn per_second_with_a_burst() {
        let limiter = Limiter::new(200, Duration::from_secs(1), 400);
        let now = Instant::now();
        for _ in 0..400 {
            limiter.take("a", now).unwrap();
        }
        let wait = limiter.take("a", now).unwrap_err();
        assert!((wait.as_secs_f64() - 0.005).abs() < 1e-9, "{wait:?}");
        assert_eq!(limiter.take("a", now + Duration::from_millis(6)), Ok(()));
    }
}
