//! The request size limit, enforced on the body before anything buffers
//! it, with the code gRPC specifies for an oversized message
//! (RESOURCE_EXHAUSTED; tonic's own limit answers OUT_OF_RANGE, which our
//! API reserves for `min_remaining`). A gRPC body is one length-prefixed
//! message; any other body (the HTTP/JSON face) is limited to the same
//! number of bytes.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// gRPC prefixes each message with 5 bytes (compressed flag, length).
const MESSAGE_PREFIX: usize = 5;

/// `request` with its body limited to one message of at most
/// `max_message` bytes (gRPC), or to `max_message` bytes (anything else).
/// Applied by the entry layer of every face
/// ([`super::guard::StreamTrackingLayer`]).
pub fn limited(request: http::Request<tonic::body::Body>, max_message: usize) -> http::Request<tonic::body::Body> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    request.map(|body| {
        let limited = LimitedBody {
            inner: body,
            remaining: if grpc {
                max_message + MESSAGE_PREFIX
            } else {
                max_message
            },
            limit: max_message,
            framed: grpc,
            prefix: [0; MESSAGE_PREFIX],
            prefix_len: 0,
        };
        // Boxed as tonic's body type expects, so that it adds no error
        // mapping layer of its own.
        tonic::body::Body::new(http_body_util::BodyExt::boxed_unsync(limited))
    })
}

/// A request body that fails with RESOURCE_EXHAUSTED as soon as the first
/// message declares a length over the limit, or the body grows past it.
struct LimitedBody {
    inner: tonic::body::Body,
    remaining: usize,
    limit: usize,
    /// A gRPC body: its first 5 bytes declare the message's length.
    framed: bool,
    /// The first message's prefix (`prefix_len` bytes of it so far).
    prefix: [u8; MESSAGE_PREFIX],
    prefix_len: usize,
}

impl LimitedBody {
    /// Whether `data` (the next bytes of the body) stays within the limit.
    fn admits(&mut self, data: &[u8]) -> bool {
        if data.len() > self.remaining {
            return false;
        }
        self.remaining -= data.len();
        if self.framed && self.prefix_len < MESSAGE_PREFIX {
            let take = (MESSAGE_PREFIX - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            if self.prefix_len == MESSAGE_PREFIX {
                let declared = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                return declared as usize <= self.limit;
            }
        }
        true
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(Some(data))) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
            && !self.admits(data)
        {
            let limit = self.limit;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "request message larger than {limit} bytes"
            )))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
