//! Fault injection: what the next token requests should suffer. Set with
//! `POST /__emulator/faults` (JSON, every field optional):
//!
//! | field | effect |
//! |---|---|
//! | `clear: true` | remove every fault first |
//! | `fail_next: N` | fail the next N token requests with `status` (default 503) |
//! | `status`, `retry_after`, `error` | the failure: status code, `Retry-After` seconds, OAuth error code (JSON body) |
//! | `delay_ms` | delay every token response (0 removes) |
//! | `malformed_next: N` | answer the next N with 200 and a body that is not JSON |
//! | `same_token_next: N` | answer the next N with the access token last issued |
//! | `refuse_all: true/false` | fail every token request with `status` until turned off |
//! | `rate_limit_per_second: N` | admit N token requests per second (fixed one-second windows), answer the rest 429 with `Retry-After` until the window ends (0 removes) |
//! | `echo_request: true/false` | failures quote the whole request (headers and body) in `error_description`, and in `WWW-Authenticate` for a 401, as misconfigured proxies and debug modes do |
//! | `revoke_current: true` | revoke the access token issued last: the API answers 401 for it from now on, before its expiry (a one-shot action, not a standing fault) |
//! | `revoke_token_id: "…"` | revoke the access token with this `token_id` (one environment's, when an emulator serves several), likewise |
//! | `api_delay_ms` | delay every API answer (`/v2/…`) by this long (0 removes) |

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::Shared;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    #[serde(default)]
    pub clear: bool,
    pub fail_next: Option<u32>,
    pub status: Option<u16>,
    pub retry_after: Option<u64>,
    pub error: Option<String>,
    pub delay_ms: Option<u64>,
    pub malformed_next: Option<u32>,
    pub same_token_next: Option<u32>,
    pub refuse_all: Option<bool>,
    pub echo_request: Option<bool>,
    /// Admit this many token requests per second (a fixed one-second
    /// window); answer the rest 429 with `Retry-After` until the window
    /// ends. 0 turns the limit off.
    pub rate_limit_per_second: Option<u32>,
    /// Revoke the access token issued last (applied once, by the handler).
    #[serde(default)]
    pub revoke_current: bool,
    /// Revoke the access token with this `token_id` (applied once).
    pub revoke_token_id: Option<String>,
    /// Delay every API answer by this many milliseconds (0 removes).
    pub api_delay_ms: Option<u64>,
}

/// The faults in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Faults {
    pub fail_next: u32,
    pub status: u16,
    pub retry_after: Option<u64>,
    pub error: Option<String>,
    pub delay_ms: u64,
    pub malformed_next: u32,
    pub same_token_next: u32,
    pub refuse_all: bool,
    pub echo_request: bool,
    pub rate_limit_per_second: Option<u32>,
    pub api_delay_ms: u64,
    /// The rate limit's current window: its start and the requests admitted.
    #[serde(skip)]
    window: Option<(Instant, u32)>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            fail_next: 0,
            status: 503,
            retry_after: None,
            error: None,
            delay_ms: 0,
            malformed_next: 0,
            same_token_next: 0,
            refuse_all: false,
            echo_request: false,
            rate_limit_per_second: None,
            api_delay_ms: 0,
            window: None,
        }
    }
}

/// What one token request gets instead of normal handling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Injected {
    Fail {
        status: u16,
        retry_after: Option<u64>,
        error: Option<String>,
        echo: bool,
    },
    Malformed,
    SameToken,
}

impl Faults {
    pub fn apply(&mut self, request: FaultRequest) {
        if request.clear {
            *self = Faults::default();
        }
        if let Some(n) = request.fail_next {
            self.fail_next = n;
        }
        if let Some(status) = request.status {
            self.status = status;
        }
        if request.retry_after.is_some() {
            self.retry_after = request.retry_after;
        }
        if request.error.is_some() {
            self.error = request.error;
        }
        if let Some(ms) = request.delay_ms {
            self.delay_ms = ms;
        }
        if let Some(n) = request.malformed_next {
            self.malformed_next = n;
        }
        if let Some(n) = request.same_token_next {
            self.same_token_next = n;
        }
        if let Some(on) = request.refuse_all {
            self.refuse_all = on;
        }
        if let Some(on) = request.echo_request {
            self.echo_request = on;
        }
        if let Some(ms) = request.api_delay_ms {
            self.api_delay_ms = ms;
        }
        if let Some(limit) = request.rate_limit_per_second {
            self.rate_limit_per_second = (limit > 0).then_some(limit);
            self.window = None;
        }
    }

    /// Whether the rate limit refuses a request arriving at `now`; if so,
    /// the seconds until its window ends (at least 1, as `Retry-After`).
    fn rate_limited(&mut self, now: Instant) -> Option<u64> {
        let limit = self.rate_limit_per_second?;
        let window = match self.window {
            Some((start, admitted)) if now < start + Duration::from_secs(1) => (start, admitted),
            _ => (now, 0),
        };
        if window.1 < limit {
            self.window = Some((window.0, window.1 + 1));
            return None;
        }
        self.window = Some(window);
        let left = (window.0 + Duration::from_secs(1)).saturating_duration_since(now);
        Some(left.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The delay and the fault (if any) for the next token request.
    pub(super) fn next(&mut self) -> (Duration, Option<Injected>) {
        let delay = Duration::from_millis(self.delay_ms);
        let fail = Injected::Fail {
            status: self.status,
            retry_after: self.retry_after,
            error: self.error.clone(),
            echo: self.echo_request,
        };
        let injected = if self.refuse_all {
            Some(fail)
        } else if let Some(retry_after) = self.rate_limited(Instant::now()) {
            Some(Injected::Fail {
                status: 429,
                retry_after: Some(retry_after),
                error: None,
                echo: false,
            })
        } else if self.fail_next > 0 {
            self.fail_next -= 1;
            Some(fail)
        } else if self.malformed_next > 0 {
            self.malformed_next -= 1;
            Some(Injected::Malformed)
        } else if self.same_token_next > 0 {
            self.same_token_next -= 1;
            Some(Injected::SameToken)
        } else {
            None
        };
        (delay, injected)
    }
}

pub(super) async fn set(
    State(shared): State<Arc<Shared>>,
    super::AnyJson(request): super::AnyJson<FaultRequest>,
) -> Json<Faults> {
    let mut inner = shared.lock();
    inner.apply_faults(request);
    tracing::info!(faults = ?inner.faults, "emulator faults set");
    Json(inner.faults.clone())
}

pub(super) async fn get(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(shared.lock().faults.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_consumed_in_order() {
        let mut f = Faults::default();
        f.apply(FaultRequest {
            fail_next: Some(1),
            status: Some(429),
            retry_after: Some(3),
            malformed_next: Some(1),
            same_token_next: Some(1),
            ..Default::default()
        });
        assert_eq!(
            f.next().1,
            Some(Injected::Fail {
                status: 429,
                retry_after: Some(3),
                error: None,
                echo: false,
            })
        );
        assert_eq!(f.next().1, Some(Injected::Malformed));
        assert_eq!(f.next().1, Some(Injected::SameToken));
        assert_eq!(f.next().1, None);
        f.apply(FaultRequest {
            refuse_all: Some(true),
            ..Default::default()
        });
        assert!(f.next().1.is_some() && f.next().1.is_some());
        f.apply(FaultRequest {
            clear: true,
            ..Default::default()
        });
        assert_eq!(f, Faults::default());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_admits_its_budget_per_second_then_answers_429() {
        let mut f = Faults::default();
        f.apply(FaultRequest {
            rate_limit_per_second: Some(3),
            ..Default::default()
        });
        let outcomes: Vec<_> = (0..5).map(|_| f.next().1).collect();
        assert_eq!(&outcomes[..3], &[None, None, None]);
        let limited = Some(Injected::Fail {
            status: 429,
            retry_after: Some(1),
            error: None,
            echo: false,
        });
        assert_eq!(&outcomes[3..], &[limited.clone(), limited]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(f.next().1, None, "a new window admits again");
        f.apply(FaultRequest {
            rate_limit_per_second: Some(0),
            ..Default::default()
        });
        assert!((0..10).all(|_| f.next().1.is_none()), "0 turns it off");
    }
}
