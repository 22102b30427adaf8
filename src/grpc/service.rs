//! The TokenBroker gRPC service: each call translated into the core's
//! ([`crate::broker::Core`]) and its answer (or [`BrokerError`], through
//! [`crate::rpc_status`]) back into the contract's messages; calls counted
//! by protocol, method and code.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::metrics::counter::Counter;
use tonic::{Request, Response, Status};

use crate::broker::{BrokerError, Core, WatchStream};
use crate::environment::Environment;
use crate::identity::Caller;
use crate::metrics::{GrpcLabels, Metrics};
use crate::rpc_status::code_label;
use crate::wire::pb::token_broker_server::TokenBroker;
use crate::wire::{self, duration_from_pb, pb};

/// The gRPC face's service: the core, and the counters of its answers.
#[derive(Clone)]
pub struct TokenBrokerService {
    core: Core,
    metrics: Arc<Metrics>,
    /// `grpc_requests{code="OK"}` per protocol and method.
    ok_counters: Arc<[[Counter; 4]; 2]>,
}

impl TokenBrokerService {
    pub fn new(core: Core) -> Self {
        let metrics = core.metrics().clone();
        Self {
            ok_counters: Arc::new([Protocol::Grpc, Protocol::Http].map(|protocol| {
                Rpc::ALL.map(|method| {
                    metrics
                        .grpc_requests
                        .get_or_create(&GrpcLabels {
                            protocol: protocol.label(),
                            method: method.name(),
                            code: code_label(tonic::Code::Ok),
                        })
                        .clone()
                })
            })),
            metrics,
            core,
        }
    }

    /// The core this face serves.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// How long this call may wait: the server's limit, or a little less
    /// than the caller's deadline so the caller gets our DEADLINE_EXCEEDED.
    fn wait_limit<T>(&self, request: &Request<T>) -> Duration {
        let client = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let request_wait = self.core.request_wait();
        match client {
            Some(d) => request_wait.min(d.saturating_sub((d / 10).min(Duration::from_millis(50)))),
            None => request_wait,
        }
    }

    fn finish<T>(&self, rpc: Rpc, result: Result<T, BrokerError>) -> Result<Response<T>, Status> {
        self.count(Protocol::Grpc, rpc, &result);
        result.map(Response::new).map_err(Status::from)
    }

    /// Counts one answered call by protocol, method and code. The OK
    /// counters are looked up once, at construction: the hot path does no
    /// label hashing.
    pub(crate) fn count<T>(&self, protocol: Protocol, rpc: Rpc, result: &Result<T, BrokerError>) {
        match result {
            Ok(_) => self.ok_counters[protocol as usize][rpc as usize].inc(),
            Err(error) => self
                .metrics
                .grpc_requests
                .get_or_create(&GrpcLabels {
                    protocol: protocol.label(),
                    method: rpc.name(),
                    code: code_label(crate::rpc_status::code(error)),
                })
                .inc(),
        };
    }
}

/// The environment a gRPC request names (the one place a `pb::Environment`
/// becomes an [`Environment`]).
fn requested(environment: i32) -> Result<Environment, BrokerError> {
    wire::environment_from_pb(environment).ok_or(BrokerError::UnspecifiedEnvironment)
}

/// The protocol a call came in by, a label of `grpc_requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Grpc = 0,
    Http = 1,
}

impl Protocol {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
        }
    }
}

/// The RPC a call is, whichever protocol carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rpc {
    GetToken = 0,
    WatchToken = 1,
    RefreshToken = 2,
    GetStatus = 3,
}

impl Rpc {
    const ALL: [Rpc; 4] = [Rpc::GetToken, Rpc::WatchToken, Rpc::RefreshToken, Rpc::GetStatus];

    fn name(self) -> &'static str {
        match self {
            Rpc::GetToken => "GetToken",
            Rpc::WatchToken => "WatchToken",
            Rpc::RefreshToken => "RefreshToken",
            Rpc::GetStatus => "GetStatus",
        }
    }
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n.checked_mul(3600)?),
        b'M' => Duration::from_secs(n.checked_mul(60)?),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A WatchToken stream as gRPC sends it.
type GrpcWatchStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::WatchTokenResponse, Status>> + Send>>;

fn grpc_stream(stream: WatchStream) -> GrpcWatchStream {
    Box::pin(stream.map(|update| update.map_err(Status::from)))
}

#[tonic::async_trait]
impl TokenBroker for TokenBrokerService {
    async fn get_token(&self, request: Request<pb::GetTokenRequest>) -> Result<Response<pb::GetTokenResponse>, Status> {
        let result = async {
            let message = request.get_ref();
            let caller = Caller::of(&request);
            let source = self.core.authorize(requested(message.environment)?, &caller)?;
            let min_remaining = message
                .min_remaining
                .as_ref()
                .map(|d| {
                    duration_from_pb(d).map_err(|message| BrokerError::InvalidArgument {
                        field: "min_remaining",
                        message,
                    })
                })
                .transpose()?;
            let served = self
                .core
                .get_token(source, &caller, min_remaining, || self.wait_limit(&request))
                .await?;
            Ok(pb::GetTokenResponse {
                token: Some(wire::pb_token(&served.token, served.at)),
            })
        }
        .await;
        self.finish(Rpc::GetToken, result)
    }

    type WatchTokenStream = GrpcWatchStream;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let result = requested(request.get_ref().environment).and_then(|env| {
            let caller = Caller::of(&request);
            let source = self.core.authorize(env, &caller)?;
            let held = crate::serve::guard::hold(request.extensions())?;
            Ok(grpc_stream(self.core.watch(source, &caller, held)))
        });
        self.finish(Rpc::WatchToken, result)
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let result = async {
            let message = request.get_ref();
            let caller = Caller::of(&request);
            let source = self.core.authorize(requested(message.environment)?, &caller)?;
            let token = self
                .core
                .refresh_token(
                    source,
                    &caller,
                    &message.rejected_token_id,
                    self.wait_limit(&request),
                    "RefreshToken",
                )
                .await?;
            Ok(pb::RefreshTokenResponse {
                token: Some(token.as_ref().into()),
            })
        }
        .await;
        self.finish(Rpc::RefreshToken, result)
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.finish(Rpc::GetStatus, Ok(self.core.status(&Caller::of(&request))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        // The multi-byte case was found by the fuzzer (it panicked).
        for bad in [
            "",
            "S",
            "5",
            "5x",
            "123456789S",
            "-1S",
            "+1S",
            "\u{e041}",
            "1\u{e041}",
            " 1S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
