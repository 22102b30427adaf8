//! Serving stock gRPC clients on the Unix socket whatever `:authority`
//! they send.
//!
//! grpc-core (1.57 and later) sends the percent-encoded socket path as
//! `:authority`, grpc-java the raw path; the HTTP/2 server under tonic (h2)
//! rejects both as malformed and resets every stream. On a Unix socket the
//! authority means nothing, so [`UnixAuthority`] sits between the socket and
//! the server and rewrites the client's byte stream: the connection preface
//! and every frame pass through byte for byte, except header blocks
//! (HEADERS plus CONTINUATION frames), which are decoded with an HPACK
//! decoder that follows the client's dynamic table, get an invalid
//! `:authority` replaced by `localhost`, and are encoded again (HPACK
//! encoder state paired with the server's decoder) into a HEADERS frame and
//! as many CONTINUATION frames as the frame size needs. The
//! server-to-client direction is untouched. TCP connections never pass here.
//!
//! Hostile input cannot make it panic, hang or hold unbounded memory: at
//! most one frame and one header block are buffered, each bounded; input
//! it cannot follow (a bad preface, an oversized frame, a broken header
//! block) switches the connection to plain pass-through, where the server
//! reports the protocol error itself. A request with a header the server
//! will refuse anyway is reported (once per connection) so that the
//! operator sees more than the client's INTERNAL error.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE of the server (h2's default, never changed by
/// tonic); also the size rewritten header blocks are split at.
const MAX_FRAME_SIZE: usize = 16_384;
/// Largest header block (encoded, or decoded) followed; beyond it the
/// connection passes through unchanged and the server applies its limits.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The authority requests get when theirs is invalid.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

enum Phase {
    /// Matching the connection preface; the count of bytes matched.
    Preface(usize),
    Frames,
    /// Following the stream failed: every byte passes unchanged.
    PassThrough,
}

/// A header block being collected: HEADERS, then CONTINUATION frames until
/// END_HEADERS.
struct OpenBlock {
    stream_id: u32,
    end_stream: bool,
    /// The 5 priority bytes of a HEADERS frame with the PRIORITY flag.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for pass-through if the block cannot be followed.
    raw: Vec<u8>,
}

/// What the rewriter did with a header block, for the connection to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// An invalid `:authority` was replaced.
    AuthorityReplaced,
    /// A header the server rejects: the request will fail.
    Malformed(&'static str),
    /// The stream could not be followed; everything passes through from here.
    PassThrough(&'static str),
}

/// The sans-I/O rewriter of one connection's client-to-server bytes.
pub struct Rewriter {
    phase: Phase,
    /// An incomplete frame (at most a header and [`MAX_FRAME_SIZE`] bytes).
    pending: Vec<u8>,
    block: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    events: Vec<Event>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            phase: Phase::Preface(0),
            pending: Vec::new(),
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            events: Vec::new(),
        }
    }

    /// Consumes `input` and appends what the server should read to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.phase {
                Phase::PassThrough => {
                    out.extend_from_slice(input);
                    return;
                }
                Phase::Preface(matched) => {
                    let n = input.len().min(PREFACE.len() - matched);
                    if input[..n] != PREFACE[matched..matched + n] {
                        self.pass_through("not an HTTP/2 connection preface", out);
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.phase = if matched + n == PREFACE.len() {
                        Phase::Frames
                    } else {
                        Phase::Preface(matched + n)
                    };
                }
                Phase::Frames => {
                    // Take what completes the pending frame (or, with nothing
                    // pending, whole frames straight from the input).
                    if self.pending.is_empty() {
                        match frame_len(input) {
                            Some(len) if len > MAX_FRAME_SIZE => {
                                self.pass_through("a frame larger than the server accepts", out)
                            }
                            Some(len) if input.len() >= FRAME_HEADER_LEN + len => {
                                let (frame, rest) = input.split_at(FRAME_HEADER_LEN + len);
                                self.frame(frame, out);
                                input = rest;
                            }
                            _ => {
                                self.pending.extend_from_slice(input);
                                input = &[];
                            }
                        }
                        continue;
                    }
                    let need = match frame_len(&self.pending) {
                        Some(len) => FRAME_HEADER_LEN + len,
                        None => FRAME_HEADER_LEN,
                    };
                    let n = input.len().min(need - self.pending.len());
                    self.pending.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    match frame_len(&self.pending) {
                        Some(len) if len > MAX_FRAME_SIZE => {
                            self.pass_through("a frame larger than the server accepts", out)
                        }
                        Some(len) if self.pending.len() == FRAME_HEADER_LEN + len => {
                            let frame = std::mem::take(&mut self.pending);
                            self.frame(&frame, out);
                            if self.pending.capacity() == 0 {
                                self.pending = frame;
                                self.pending.clear();
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// What happened since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Whether the stream is still being followed (not passed through).
    pub fn is_following(&self) -> bool {
        !matches!(self.phase, Phase::PassThrough)
    }

    fn pass_through(&mut self, why: &'static str, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.append(&mut self.pending);
        self.pending = Vec::new();
        self.phase = Phase::PassThrough;
        self.events.push(Event::PassThrough(why));
    }

    /// One complete frame.
    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER_LEN..];
        match (&mut self.block, kind) {
            (None, HEADERS) => {
                let Some((priority, fragment)) = headers_fragment(flags, payload) else {
                    self.pass_through("a HEADERS frame with invalid padding", out);
                    return out.extend_from_slice(frame);
                };
                self.block = Some(OpenBlock {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    raw: frame.to_vec(),
                });
                if flags & END_HEADERS != 0 {
                    self.finish_block(out);
                }
            }
            (Some(block), CONTINUATION) if block.stream_id == stream_id => {
                if block.raw.len() + frame.len() > MAX_HEADER_BLOCK {
                    self.pass_through("a header block larger than followed", out);
                    return out.extend_from_slice(frame);
                }
                block.fragment.extend_from_slice(payload);
                block.raw.extend_from_slice(frame);
                if flags & END_HEADERS != 0 {
                    self.finish_block(out);
                }
            }
            (Some(_), _) => {
                self.pass_through("a header block interrupted by another frame", out);
                out.extend_from_slice(frame);
            }
            (None, CONTINUATION) => {
                self.pass_through("a CONTINUATION frame without a header block", out);
                out.extend_from_slice(frame);
            }
            (None, _) => out.extend_from_slice(frame),
        }
    }

    /// Decodes the collected block, repairs its authority and writes it again.
    fn finish_block(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else { return };
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let decoded = self
            .decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            });
        if decoded.is_err() || size > MAX_HEADER_BLOCK {
            self.block = Some(block);
            let why = if size > MAX_HEADER_BLOCK {
                "a header list larger than followed"
            } else {
                "a header block that does not decode"
            };
            return self.pass_through(why, out);
        }
        if repair_authority(&mut headers) {
            self.events.push(Event::AuthorityReplaced);
        }
        if let Some(reason) = malformed(&headers) {
            self.events.push(Event::Malformed(reason));
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + LOCAL_AUTHORITY.len());
        // Writing to a Vec cannot fail.
        let _ = self
            .encoder
            .encode_into(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())), &mut encoded);
        write_header_block(&block, &encoded, out);
    }
}

/// The payload length of the frame whose header starts `bytes`, once known.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    (bytes.len() >= FRAME_HEADER_LEN)
        .then(|| (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]))
}

/// A HEADERS payload without its padding: the priority bytes (if any) and
/// the header block fragment. `None` when the padding does not fit.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, after) = rest.split_first()?;
        padding = usize::from(pad);
        rest = after;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (bytes, after) = rest.split_first_chunk::<5>()?;
        priority = Some(*bytes);
        rest = after;
    }
    let end = rest.len().checked_sub(padding)?;
    Some((priority, &rest[..end]))
}

/// Replaces an `:authority` the server would refuse (empty, a path, a
/// percent-encoded path, a `unix:` URI) with `localhost`. True if it did.
fn repair_authority(headers: &mut [(Vec<u8>, Vec<u8>)]) -> bool {
    let Some((_, value)) = headers.iter_mut().find(|(name, _)| name == b":authority") else {
        return false;
    };
    if !value.is_empty() && http::uri::Authority::try_from(value.as_slice()).is_ok() {
        return false;
    }
    *value = LOCAL_AUTHORITY.to_vec();
    true
}

/// Why the server will refuse this header list, as far as HTTP/2 and h2's
/// checks go (RFC 9113 §8.2, §8.3).
fn malformed(headers: &[(Vec<u8>, Vec<u8>)]) -> Option<&'static str> {
    let mut regular_seen = false;
    for (name, value) in headers {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular_seen {
                return Some("a pseudo-header after a regular header");
            }
            if ![&b"method"[..], b"scheme", b"authority", b"path", b"protocol", b"status"].contains(&pseudo) {
                return Some("an unknown pseudo-header");
            }
            continue;
        }
        regular_seen = true;
        if name.is_empty() || name.iter().any(|b| b.is_ascii_uppercase()) {
            return Some("a header name that is empty or not lowercase");
        }
        if http::header::HeaderName::from_bytes(name).is_err() || http::HeaderValue::from_bytes(value).is_err() {
            return Some("a header name or value with invalid characters");
        }
        if [
            &b"connection"[..],
            b"keep-alive",
            b"proxy-connection",
            b"transfer-encoding",
            b"upgrade",
        ]
        .contains(&name.as_slice())
        {
            return Some("a connection-specific header");
        }
        if name == b"te" && value != b"trailers" {
            return Some("a TE header other than \"trailers\"");
        }
    }
    None
}

/// The re-encoded block as HEADERS plus CONTINUATION frames of at most
/// [`MAX_FRAME_SIZE`] bytes, keeping END_STREAM and the priority.
fn write_header_block(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first = encoded.len().min(MAX_FRAME_SIZE - priority_len);
    let (head, mut rest) = encoded.split_at(first);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    write_frame_header(out, priority_len + head.len(), HEADERS, flags, block.stream_id);
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME_SIZE);
        let (chunk, after) = rest.split_at(n);
        rest = after;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        write_frame_header(out, n, CONTINUATION, flags, block.stream_id);
        out.extend_from_slice(chunk);
    }
}

fn write_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// A Unix-socket connection whose client bytes pass through a [`Rewriter`].
pub struct UnixAuthority<IO> {
    io: IO,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server, from `consumed` on.
    out: Vec<u8>,
    consumed: usize,
    scratch: Box<[u8]>,
    warned: bool,
}

impl<IO> UnixAuthority<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            consumed: 0,
            scratch: vec![0; MAX_FRAME_SIZE + FRAME_HEADER_LEN].into_boxed_slice(),
            warned: false,
        }
    }

    fn report(&mut self) {
        for event in self.rewriter.take_events() {
            match event {
                Event::AuthorityReplaced => {}
                Event::Malformed(reason) if !self.warned => {
                    self.warned = true;
                    warn!(
                        reason,
                        "a request on the Unix socket has a header the server rejects; its client sees INTERNAL or PROTOCOL_ERROR"
                    );
                }
                Event::Malformed(_) => {}
                Event::PassThrough(reason) => debug!(reason, "Unix-socket connection passed through unchanged"),
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for UnixAuthority<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.consumed < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.consumed);
                buf.put_slice(&this.out[this.consumed..this.consumed + n]);
                this.consumed += n;
                if this.consumed == this.out.len() {
                    this.out.clear();
                    this.consumed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.rewriter.is_following() {
                // Nothing buffered and nothing to follow: read straight through.
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut scratch = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut scratch))?;
            if scratch.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.push(scratch.filled(), &mut this.out);
            this.report();
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for UnixAuthority<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for UnixAuthority<IO> {
    type ConnectInfo = IO::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// A Unix listener whose connections go through [`UnixAuthority`].
pub struct UnixAuthorityListener(pub tokio::net::UnixListener);

impl crate::connections::Accept for UnixAuthorityListener {
    type Io = UnixAuthority<tokio::net::UnixStream>;
    async fn accept(&self) -> io::Result<Self::Io> {
        self.0.accept().await.map(|(stream, _)| UnixAuthority::new(stream))
    }
}
