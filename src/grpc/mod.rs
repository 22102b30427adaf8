//! The API face of the broker: the TokenBroker gRPC service over the core
//! ([`crate::broker`]), health reporting, reflection, and the HTTP/JSON
//! read on the same routes ([`face`]). The messages are
//! [`crate::wire`]'s, errors become `tonic::Status` in
//! [`crate::rpc_status`]; how it is served (listeners, budgets, TLS) is
//! [`crate::serve`]'s.

pub mod codec;
pub mod health;
pub mod http;
pub(crate) mod service;

use tonic::service::Routes;

use crate::wire::pb;

pub use service::{TokenBrokerService, parse_grpc_timeout};

/// Largest request accepted (message or body), in bytes.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The API face: the TokenBroker service, health, and reflection in both
/// versions (v1, and v1alpha for the clients that speak only it:
/// grpcio-reflection, grpcurl before 1.9), with the HTTP/JSON read routed
/// by path on the same listeners; anything unknown is answered by protocol
/// (gRPC UNIMPLEMENTED, or HTTP 404).
pub fn face(
    service: TokenBrokerService,
    health_service: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) -> Result<crate::serve::Face, tonic_reflection::server::Error> {
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let grpc = Routes::new(health_service)
        .add_service(reflection_builder().build_v1()?)
        .add_service(reflection_builder().build_v1alpha()?)
        .add_service(
            pb::token_broker_server::TokenBrokerServer::new(service.clone())
                .max_decoding_message_size(2 * MAX_REQUEST_BYTES),
        );
    let router = grpc
        .into_axum_router()
        .merge(http::router(service))
        .fallback(http::fallback);
    Ok(crate::serve::Face {
        name: "grpc",
        routes: Routes::from(router),
        max_request_bytes: MAX_REQUEST_BYTES,
        http1_screen: Some(http::grpc_over_http1),
        tls_http1: false,
    })
}
