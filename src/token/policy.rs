//! When to refresh and how long to wait after a failure: pure functions of
//! the token lifetime, the failure history and a jitter sample, so every rule
//! is tested with tables and no clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::out_of_range;
use crate::oauth::ErrorClass;

/// The refresh and retry rules (the `[refresh]` table). Defaults are
/// documented in the README.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshPolicy {
    /// Refresh at this fraction of the lifetime (default 0.75).
    #[serde(rename = "ratio")]
    pub refresh_ratio: f64,
    /// ± this fraction of the lifetime of random spread (default 0.05).
    #[serde(rename = "jitter")]
    pub jitter_ratio: f64,
    /// Refresh no later than this before expiry, when the lifetime allows (60 s).
    #[serde(with = "crate::duration::serde")]
    pub expiry_margin: Duration,
    /// Never hand out a token with less than this left (5 s, at most 10% of the lifetime).
    #[serde(with = "crate::duration::serde")]
    pub serve_margin: Duration,
    /// First retry delay ceiling after a transient failure (1 s).
    #[serde(with = "crate::duration::serde")]
    pub backoff_initial: Duration,
    /// Largest retry delay ceiling; also the retry interval for permanent failures (60 s).
    #[serde(with = "crate::duration::serde")]
    pub backoff_max: Duration,
    /// Largest `Retry-After` honoured (300 s).
    #[serde(with = "crate::duration::serde")]
    pub retry_after_max: Duration,
    /// At most one caller-requested early refresh per this interval (5 s).
    #[serde(with = "crate::duration::serde")]
    pub early_refresh_interval: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            refresh_ratio: 0.75,
            jitter_ratio: 0.05,
            expiry_margin: Duration::from_secs(60),
            serve_margin: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            retry_after_max: Duration::from_secs(300),
            early_refresh_interval: Duration::from_secs(5),
        }
    }
}

/// The smallest delay between two attempts, whatever the jitter draws.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);

impl RefreshPolicy {
    /// Delay from issue to the scheduled refresh. `sample` is uniform in [0, 1).
    ///
    /// `ratio × L ± jitter × L`, but never later than `L − expiry_margin`,
    /// unless that would be earlier than half the lifetime (short-lived tokens).
    pub fn refresh_after(&self, lifetime: Duration, sample: f64) -> Duration {
        let l = lifetime.as_secs_f64();
        let jittered = l * self.refresh_ratio + l * self.jitter_ratio * (2.0 * sample - 1.0);
        let latest = (l - self.expiry_margin.as_secs_f64()).max(l / 2.0);
        Duration::from_secs_f64(jittered.min(latest).clamp(0.0, l))
    }

    /// The serve margin that applies to a token of this lifetime.
    pub fn serve_margin_for(&self, lifetime: Duration) -> Duration {
        self.serve_margin.min(lifetime / 10)
    }

    /// Delay before the next attempt after the `failures`-th consecutive failure.
    ///
    /// Transient: full jitter over `min(max, initial × 2^(failures−1))`, at
    /// least the server's `Retry-After` (capped). Permanent: `backoff_max`.
    /// A rejected refresh token: at once.
    pub fn retry_after_failure(
        &self,
        class: ErrorClass,
        failures: u32,
        sample: f64,
        retry_after: Option<Duration>,
    ) -> Duration {
        let delay = match class {
            ErrorClass::InvalidGrant => return Duration::ZERO,
            ErrorClass::Permanent => self.backoff_max,
            ErrorClass::Transient => {
                let exponent = failures.saturating_sub(1).min(31);
                let ceiling = self.backoff_initial.saturating_mul(1 << exponent).min(self.backoff_max);
                ceiling.mul_f64(sample.clamp(0.0, 1.0)).max(MIN_RETRY_DELAY)
            }
        };
        match retry_after {
            Some(wait) => delay.max(wait.min(self.retry_after_max)),
            None => delay,
        }
    }

    /// Problems with the values, each starting with its key (`ratio must
    /// be between …`), for configuration validation.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(0.1..=0.95).contains(&self.refresh_ratio) {
            out.push(format!(
                "ratio must be between 0.1 and 0.95 (got {})",
                self.refresh_ratio
            ));
        }
        if !(0.0..=0.2).contains(&self.jitter_ratio) {
            out.push(format!("jitter must be between 0 and 0.2 (got {})", self.jitter_ratio));
        }
        if self.refresh_ratio + self.jitter_ratio >= 1.0 {
            out.push("ratio + jitter must stay below 1".into());
        }
        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            out.push("backoff_initial must be above zero and at most backoff_max".into());
        }
        const HOUR: Duration = Duration::from_secs(3600);
        for (key, value, max) in [
            ("backoff_max", self.backoff_max, HOUR),
            ("serve_margin", self.serve_margin, Duration::from_secs(300)),
            ("expiry_margin", self.expiry_margin, HOUR),
            ("retry_after_max", self.retry_after_max, HOUR),
            ("early_refresh_interval", self.early_refresh_interval, HOUR),
        ] {
            if let Some(problem) = out_of_range(value, Duration::ZERO, max) {
                out.push(format!("{key}: {problem}"));
            }
        }
        out
    }
}

/// Where jitter samples come from: random in production, fixed in tests.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Jitter {
    #[default]
    Random,
    /// Always this sample (0.5 means "no spread" for refresh scheduling).
    Fixed(f64),
}

impl Jitter {
    /// A sample uniform in [0, 1).
    pub fn sample(&self) -> f64 {
        match self {
            Jitter::Random => rand::random::<f64>(),
            Jitter::Fixed(x) => *x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn refresh_schedule_table() {
        let p = RefreshPolicy::default();
        // (lifetime, sample, expected refresh delay)
        let cases = [
            (900.0, 0.5, 675.0), // 75 %
            (900.0, 0.0, 630.0), // -5 %
            (900.0, 1.0, 720.0), // +5 %
            (3600.0, 0.5, 2700.0),
            (240.0, 1.0, 180.0), // +5 % would be 192 s: capped at expiry - 60 s
            (120.0, 0.5, 60.0),  // expiry - 60 s = half-life
            (100.0, 0.5, 50.0),  // short: half-life floor
            (30.0, 0.5, 15.0),
            (4.0, 0.5, 2.0),
            (1.0, 0.5, 0.5),
        ];
        for (lifetime, sample, expected) in cases {
            let got = p.refresh_after(secs(lifetime), sample);
            assert!(
                (got.as_secs_f64() - expected).abs() < 1e-6,
                "L={lifetime} s={sample}: {got:?} != {expected}"
            );
            assert!(got < secs(lifetime));
        }
    }

    #[test]
    fn serve_margin_scales_for_short_tokens() {
        let p = RefreshPolicy::default();
        assert_eq!(p.serve_margin_for(secs(900.0)), secs(5.0));
        assert_eq!(p.serve_margin_for(secs(30.0)), secs(3.0));
        assert_eq!(p.serve_margin_for(secs(1.0)), secs(0.1));
    }

    #[test]
    fn backoff_table() {
        use ErrorClass::*;
        let p = RefreshPolicy::default();
        // (class, failures, sample, retry_after, expected)
        let cases = [
            (Transient, 1, 1.0, None, 1.0),
            (Transient, 2, 1.0, None, 2.0),
            (Transient, 3, 1.0, None, 4.0),
            (Transient, 7, 1.0, None, 60.0),
            (Transient, 40, 1.0, None, 60.0),
            (Transient, 3, 0.5, None, 2.0),
            (Transient, 3, 0.0, None, 0.05),
            (Transient, 1, 0.5, Some(10.0), 10.0),
            (Transient, 1, 0.5, Some(9999.0), 300.0),
            (Transient, 8, 1.0, Some(2.0), 60.0),
            (Permanent, 1, 0.0, None, 60.0),
            (Permanent, 1, 0.0, Some(120.0), 120.0),
            (InvalidGrant, 1, 1.0, None, 0.0),
        ];
        for (class, failures, sample, retry_after, expected) in cases {
            let got = p.retry_after_failure(class, failures, sample, retry_after.map(secs));
            assert!(
                (got.as_secs_f64() - expected).abs() < 1e-6,
                "{class:?} n={failures} s={sample} ra={retry_after:?}: {got:?}"
            );
        }
    }

    #[test]
    fn validation_catches_bad_values() {
        assert!(RefreshPolicy::default().problems().is_empty());
        let bad = RefreshPolicy {
            refresh_ratio: 0.99,
            jitter_ratio: 0.5,
            backoff_initial: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(bad.problems().len(), 4, "{:?}", bad.problems());
    }

    /// Each bound is inclusive: the limit itself is accepted, one step past it is not.
    #[test]
    fn validation_bounds_are_inclusive() {
        let problems = |p: RefreshPolicy| p.problems();
        let hour = Duration::from_secs(3600);
        let step = Duration::from_millis(1);
        let accepted = [
            RefreshPolicy {
                backoff_initial: secs(30.0),
                backoff_max: secs(30.0),
                ..Default::default()
            },
            RefreshPolicy {
                backoff_max: hour,
                expiry_margin: hour,
                retry_after_max: hour,
                early_refresh_interval: hour,
                serve_margin: secs(300.0),
                ..Default::default()
            },
            RefreshPolicy {
                refresh_ratio: 0.1,
                jitter_ratio: 0.0,
                ..Default::default()
            },
            RefreshPolicy {
                refresh_ratio: 0.8,
                jitter_ratio: 0.19,
                ..Default::default()
            },
        ];
        for policy in accepted {
            assert!(
                problems(policy.clone()).is_empty(),
                "{policy:?}: {:?}",
                problems(policy.clone())
            );
        }
        let rejected = [
            (
                RefreshPolicy {
                    backoff_initial: secs(30.0) + step,
                    backoff_max: secs(30.0),
                    ..Default::default()
                },
                "backoff_initial must be above zero and at most backoff_max",
            ),
            (
                RefreshPolicy {
                    backoff_max: hour + step,
                    ..Default::default()
                },
                "backoff_max: ",
            ),
            (
                RefreshPolicy {
                    expiry_margin: hour + step,
                    ..Default::default()
                },
                "expiry_margin: ",
            ),
            (
                RefreshPolicy {
                    serve_margin: secs(300.0) + step,
                    ..Default::default()
                },
                "serve_margin: ",
            ),
            (
                RefreshPolicy {
                    refresh_ratio: 0.8,
                    jitter_ratio: 0.2,
                    ..Default::default()
                },
                "ratio + jitter must stay below 1",
            ),
            (
                RefreshPolicy {
                    refresh_ratio: 0.96,
                    jitter_ratio: 0.0,
                    ..Default::default()
                },
                "ratio must be between 0.1 and 0.95 (got 0.96)",
            ),
            (
                RefreshPolicy {
                    jitter_ratio: 0.21,
                    ..Default::default()
                },
                "jitter must be between 0 and 0.2 (got 0.21)",
            ),
        ];
        for (policy, needle) in rejected {
            let found = problems(policy.clone());
            assert!(
                found.len() == 1 && found[0].starts_with(needle),
                "{policy:?}: {found:?}"
            );
        }
    }
}
