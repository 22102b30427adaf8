//! The handle readers and callers hold: the published [`Snapshot`]
//! borrowed without a lock, and the request path (an early refresh, a
//! replacement for a rejected token, a new API key) as messages to the
//! source's task.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Token;
use super::state::{KeyChange, KeyError, RefreshError, Snapshot, SourceState, SourceStats};
use super::supply::Need;
use crate::credentials::ApiKey;
use crate::environment::Environment;

pub(super) type Reply = oneshot::Sender<Result<Arc<Token>, RefreshError>>;

/// A message to the source's task.
pub(super) enum Command {
    /// `span`: the caller's (for traces; `Span::none()` when they are off).
    Refresh {
        need: Need,
        reply: Reply,
        span: tracing::Span,
    },
    ReplaceKey {
        key: ApiKey,
        reply: KeyReply,
    },
}

/// A cheap, cloneable handle to one TokenSource.
#[derive(Clone)]
pub struct TokenSourceHandle {
    environment: Environment,
    state: watch::Receiver<Snapshot>,
    commands: mpsc::Sender<Command>,
    stats: Arc<SourceStats>,
}

impl TokenSourceHandle {
    pub fn environment(&self) -> Environment {
        self.environment
    }

    /// The hot path: the current token if it may be handed out. No I/O,
    /// no lock a refresh holds (the watch value is replaced, never mutated
    /// in place), one Arc clone.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current_at(Instant::now())
    }

    /// [`TokenSourceHandle::current`] as of `now` (a caller that reads the
    /// clock once for the check and the answer).
    pub fn current_at(&self, now: Instant) -> Option<Arc<Token>> {
        self.state.borrow().servable(now).cloned()
    }

    /// Whether the source task is still running.
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// A receiver that sees every published change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.state.clone()
    }

    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// Waits until the first token request has finished (successfully or not).
    pub async fn started(&self) -> Snapshot {
        let mut rx = self.state.clone();
        let result = rx
            .wait_for(|s| s.state() != SourceState::Starting)
            .await
            .map(|s| s.clone());
        result.unwrap_or_default()
    }

    /// Waits until the source holds a servable token.
    pub async fn holding_token(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| s.servable(Instant::now()).is_some()).await;
    }

    /// A token with at least `remaining` left; refreshes early (coalesced,
    /// rate-limited) when the current one has less.
    pub async fn token_with_remaining(&self, remaining: Duration) -> Result<Arc<Token>, RefreshError> {
        if let Some(token) = self.current().filter(|t| t.remaining(Instant::now()) >= remaining) {
            return Ok(token);
        }
        self.request(Need::Remaining(remaining)).await
    }

    /// A token other than `rejected_token_id`, which the API answered 401 to.
    pub async fn replace_rejected(&self, rejected_token_id: &str) -> Result<Arc<Token>, RefreshError> {
        if let Some(token) = self.current().filter(|t| t.token_id != rejected_token_id) {
            return Ok(token);
        }
        self.request(Need::Replaces(rejected_token_id.to_owned())).await
    }

    async fn request(&self, need: Need) -> Result<Arc<Token>, RefreshError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Refresh {
                need,
                reply,
                span: tracing::Span::current(),
            })
            .await
            .map_err(|_| RefreshError::Stopped)?;
        answer.await.unwrap_or(Err(RefreshError::Stopped))
    }

    /// Offers a new API key. It is tried against the token endpoint first;
    /// only on success does it replace the current key (and the token).
    /// `Ok(false)`: the key is the one already in use.
    pub async fn replace_key(&self, key: ApiKey) -> Result<KeyChange, KeyError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ReplaceKey { key, reply })
            .await
            .map_err(|_| KeyError::Stopped)?;
        answer.await.unwrap_or(Err(KeyError::Stopped))
    }
}

pub(super) type KeyReply = oneshot::Sender<Result<KeyChange, KeyError>>;

impl TokenSourceHandle {
    pub(super) fn new(
        environment: Environment,
        state: watch::Receiver<Snapshot>,
        commands: mpsc::Sender<Command>,
        stats: Arc<SourceStats>,
    ) -> Self {
        Self {
            environment,
            state,
            commands,
            stats,
        }
    }
}
