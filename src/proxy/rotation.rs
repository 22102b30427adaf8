//! When an API 401 may rotate the environment's token. A 401 is the API's
//! word that a token is bad, but a route can answer 401 for reasons of its
//! own (a scope, an account setting, a bug), whatever the token: if every
//! such 401 forced a refresh, one route or one caller could rotate every
//! caller's token as often as the engine allows.
//!
//! So the proxy learns from what a refresh achieved, per environment and
//! route (the path, whatever the method), within `proxy.fresh_token_age`
//! (30 s by default):
//! - a refresh whose new token was refused too on the same route
//!   (`REJECTED_AGAIN`) shows the route refuses whatever the token: the
//!   route is marked;
//! - where the request could not be sent again (`BODY_NOT_REPLAYABLE`),
//!   the route remembers the token its refresh produced, and a second 401
//!   on it for that very token marks it;
//! - a later 401 on a marked route passes through with
//!   `Flute-Broker-Not-Retried: TOKEN_FRESH` and forces no refresh.
//!
//! A revoked token is still replaced at its first 401 on any route, and the
//! request sent again: its new token works, so nothing is marked, however
//! often tokens are revoked (a rule by token age alone would fail every
//! call for a token revoked in its first seconds). One misbehaving route
//! forces at most one refresh per window, whatever the callers do; many
//! routes are bounded by the engine's `early_refresh_interval`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Routes remembered at most (a caller controls the paths; the map is
/// pruned of expired entries, then emptied, when it reaches this).
const MAX_ROUTES: usize = 1024;

/// What to do with an API 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Replace the token (coalesced) and send once more.
    Refresh,
    /// Pass the 401 through: the token was just shown not to be the cause.
    Fresh,
}

/// One environment's memory of recent forced refreshes.
#[derive(Debug)]
pub struct Rotations {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Per route (its path): the token its last refresh produced,
    /// when, and whether the route has shown it refuses any token.
    routes: HashMap<String, Route>,
}

#[derive(Debug)]
struct Route {
    token_id: String,
    at: Instant,
    refuses_any: bool,
}

impl Rotations {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An API 401 on `route` for the token `token_id`.
    pub fn on_unauthorized(&self, route: &str, token_id: &str, now: Instant) -> Verdict {
        let window = self.window;
        let within = |at: Instant| now.saturating_duration_since(at) < window;
        let mut state = self.state();
        let Some(seen) = state.routes.get_mut(route).filter(|r| within(r.at)) else {
            return Verdict::Refresh;
        };
        if seen.refuses_any {
            return Verdict::Fresh;
        }
        if seen.token_id == token_id {
            // This route's last refresh produced this token, and the route
            // refuses it too: the token is not the cause.
            seen.refuses_any = true;
            seen.at = now;
            return Verdict::Fresh;
        }
        Verdict::Refresh
    }

    /// A refresh forced by a 401 on `route` produced `token_id`, and the
    /// request could not be sent again with it to see whether it helps.
    pub fn not_replayed(&self, route: &str, token_id: &str, now: Instant) {
        let mut state = self.state();
        if state.routes.len() >= MAX_ROUTES && !state.routes.contains_key(route) {
            let window = self.window;
            state.routes.retain(|_, r| now.saturating_duration_since(r.at) < window);
            if state.routes.len() >= MAX_ROUTES {
                state.routes.clear();
            }
        }
        state.routes.insert(
            route.to_owned(),
            Route {
                token_id: token_id.to_owned(),
                at: now,
                refuses_any: false,
            },
        );
    }

    /// The token a refresh on `route` produced was refused there too.
    pub fn rejected_again(&self, route: &str, token_id: &str, now: Instant) {
        self.not_replayed(route, token_id, now);
        if let Some(seen) = self.state().routes.get_mut(route) {
            seen.refuses_any = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(30);

    #[test]
    fn a_revoked_token_is_replaced_every_time() {
        let rotations = Rotations::new(WINDOW);
        let now = Instant::now();
        // Each revocation: a 401 for the current token, a refresh, and the
        // request sent again and accepted: nothing is remembered.
        for (n, old) in ["a", "b", "c"].into_iter().enumerate() {
            let at = now + Duration::from_secs(n as u64);
            assert_eq!(rotations.on_unauthorized("/v2/x", old, at), Verdict::Refresh);
        }
        assert!(rotations.state().routes.is_empty());
    }

    #[test]
    fn a_route_refusing_the_new_token_too_stops_rotating() {
        let rotations = Rotations::new(WINDOW);
        let now = Instant::now();
        assert_eq!(rotations.on_unauthorized("/v2/bad", "a", now), Verdict::Refresh);
        rotations.rejected_again("/v2/bad", "b", now);
        let later = now + Duration::from_secs(1);
        // The same route with the new token: passed through.
        assert_eq!(rotations.on_unauthorized("/v2/bad", "b", later), Verdict::Fresh);
        // The route stays marked for the window, whatever the token.
        assert_eq!(rotations.on_unauthorized("/v2/bad", "c", later), Verdict::Fresh);
        // Another route, even with that token: a revocation is replaced.
        assert_eq!(rotations.on_unauthorized("/v2/other", "b", later), Verdict::Refresh);
        assert_eq!(rotations.on_unauthorized("/v2/ok", "c", later), Verdict::Refresh);
        // After the window, the mark is gone (one refresh per window at most).
        let after = now + WINDOW;
        assert_eq!(rotations.on_unauthorized("/v2/bad", "b", after), Verdict::Refresh);
    }

    #[test]
    fn a_second_401_on_a_route_for_the_token_its_refresh_produced_is_fresh() {
        // Bodies that cannot be sent again: no retry shows REJECTED_AGAIN;
        // the route's next 401 for its own refresh's token does.
        let rotations = Rotations::new(WINDOW);
        let now = Instant::now();
        assert_eq!(rotations.on_unauthorized("/v2/up", "a", now), Verdict::Refresh);
        rotations.not_replayed("/v2/up", "b", now);
        let later = now + Duration::from_secs(2);
        assert_eq!(rotations.on_unauthorized("/v2/up", "b", later), Verdict::Fresh);
        assert_eq!(rotations.on_unauthorized("/v2/elsewhere", "b", later), Verdict::Refresh);
        // Just under the window is within it; at the window it is not.
        let edge = later + WINDOW - Duration::from_nanos(1);
        assert_eq!(rotations.on_unauthorized("/v2/up", "x", edge), Verdict::Fresh);
        assert_eq!(
            rotations.on_unauthorized("/v2/up", "x", later + WINDOW),
            Verdict::Refresh
        );
    }

    #[test]
    fn the_route_memory_is_bounded() {
        let rotations = Rotations::new(WINDOW);
        let now = Instant::now();
        for n in 0..MAX_ROUTES + 10 {
            rotations.not_replayed(&format!("/v2/{n}"), "t", now);
        }
        assert!(rotations.state().routes.len() <= MAX_ROUTES);
        // Expired ones go first.
        let rotations = Rotations::new(WINDOW);
        for n in 0..MAX_ROUTES {
            rotations.not_replayed(&format!("/v2/{n}"), "t", now);
        }
        rotations.not_replayed("/v2/new", "t", now + WINDOW);
        assert_eq!(rotations.state().routes.len(), 1);
    }
}
