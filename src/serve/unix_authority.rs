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
//! `:authority` replaced by `localhost`, and are encoded again (as HPACK
//! literals that never touch the server's dynamic table) into a HEADERS
//! frame and as many CONTINUATION frames as the frame size needs. The
//! server-to-client direction is untouched. TCP connections never pass here.
//!
//! A connection is followed only while it needs it: when its first request
//! carries a valid authority (as HTTP/2 clients such as Go's, Rust's and
//! Node's do), the rest of the connection passes through untouched, at no
//! cost; a gRPC channel keeps one authority for all its calls.
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

use tokio::io::{AsyncRead, ReadBuf};
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
/// Why a connection passes through after its first request.
pub const FIRST_AUTHORITY_VALID: &str = "the first request's :authority is valid";
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
    /// Whether blocks are encoded again (from the first repair on).
    rewriting: bool,
    /// The decoded fields of the current block: (start, name length, value
    /// length) into `arena`, both reused from block to block.
    fields: Vec<(usize, usize, usize)>,
    arena: Vec<u8>,
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
            rewriting: false,
            fields: Vec::new(),
            arena: Vec::new(),
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

    /// Decodes the collected block (following the client's dynamic table).
    /// While no block has needed a repair, the block's frames pass through
    /// as received, so the server's table stays the client's. From the first
    /// repair on, every block is encoded again as literals that never refer
    /// to or add to the dynamic table (the server's no longer matches the
    /// client's): no table to search, about a tenth of an HPACK encoder's
    /// work for grpc-core's header blocks.
    fn finish_block(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else { return };
        let (arena, fields) = (&mut self.arena, &mut self.fields);
        arena.clear();
        fields.clear();
        let mut size = 0usize;
        let mut repair = false;
        let mut check = FieldCheck::default();
        let decoded = self
            .decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size > MAX_HEADER_BLOCK {
                    return;
                }
                if &*name == b":authority" && (value.is_empty() || http::uri::Authority::try_from(&*value).is_err()) {
                    repair = true;
                }
                check.field(&name, &value);
                let start = arena.len();
                arena.extend_from_slice(&name);
                arena.extend_from_slice(&value);
                fields.push((start, name.len(), value.len()));
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
        if let Some(reason) = check.problem {
            self.events.push(Event::Malformed(reason));
        }
        if !repair && !self.rewriting {
            // The first request's authority is valid: a channel keeps its
            // authority, so the rest of the connection needs nothing either
            // (HTTP/2 clients such as Go's, Rust's and Node's send
            // `localhost`) and passes through untouched.
            out.extend_from_slice(&block.raw);
            self.phase = Phase::PassThrough;
            return self.events.push(Event::PassThrough(FIRST_AUTHORITY_VALID));
        }
        if repair {
            self.events.push(Event::AuthorityReplaced);
        }
        self.rewriting = true;
        let arena = &self.arena;
        let headers = self.fields.iter().map(|&(start, name_len, value_len)| {
            let name = &arena[start..start + name_len];
            let value = &arena[start + name_len..start + name_len + value_len];
            if repair && name == b":authority" {
                (name, LOCAL_AUTHORITY)
            } else {
                (name, value)
            }
        });
        let mut encoded = Vec::with_capacity(self.arena.len() + 3 * self.fields.len());
        encode_literals(headers, &mut encoded);
        write_header_block(&block, &encoded, out);
    }
}

/// Header fields as HPACK "literal header field without indexing, new
/// name" representations (RFC 7541 §6.2.2), no Huffman coding: each field
/// stands alone, so the server's dynamic table is never read or changed.
fn encode_literals<'a>(headers: impl Iterator<Item = (&'a [u8], &'a [u8])>, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.push(0x00);
        for string in [name, value] {
            encode_integer(string.len(), 7, out);
            out.extend_from_slice(string);
        }
    }
}

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1), the prefix's
/// other bits zero (a string literal's H bit: not Huffman coded).
fn encode_integer(mut n: usize, prefix_bits: u32, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(n as u8);
        return;
    }
    out.push(max as u8);
    n -= max;
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
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

/// Why the server will refuse a header list, field by field, as far as
/// HTTP/2 and h2's checks go (RFC 9113 §8.2, §8.3).
#[derive(Default)]
struct FieldCheck {
    regular_seen: bool,
    problem: Option<&'static str>,
}

impl FieldCheck {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.problem.is_none() {
            self.problem = self.check(name, value);
        }
    }

    fn check(&mut self, name: &[u8], value: &[u8]) -> Option<&'static str> {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if self.regular_seen {
                return Some("a pseudo-header after a regular header");
            }
            if ![&b"method"[..], b"scheme", b"authority", b"path", b"protocol", b"status"].contains(&pseudo) {
                return Some("an unknown pseudo-header");
            }
            return None;
        }
        self.regular_seen = true;
        if name.is_empty() || name.iter().any(u8::is_ascii_uppercase) {
            return Some("a header name that is empty or not lowercase");
        }
        let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        let value_byte = |b: &u8| *b == b'\t' || (*b >= 0x20 && *b != 0x7f);
        if !name.iter().all(token) || !value.iter().all(value_byte) {
            return Some("a header name or value with invalid characters");
        }
        if [
            &b"connection"[..],
            b"keep-alive",
            b"proxy-connection",
            b"transfer-encoding",
            b"upgrade",
        ]
        .contains(&name)
        {
            return Some("a connection-specific header");
        }
        if name == b"te" && value != b"trailers" {
            return Some("a TE header other than \"trailers\"");
        }
        None
    }
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

super::guard::forward_writes!(UnixAuthority);

impl<IO: super::peer::Peered> super::peer::Peered for UnixAuthority<IO> {
    fn peer(&self) -> super::peer::Peer {
        self.io.peer()
    }
}

/// A Unix listener whose connections go through [`UnixAuthority`].
pub struct UnixAuthorityListener(pub tokio::net::UnixListener);

impl super::guard::Accept for UnixAuthorityListener {
    type Io = UnixAuthority<tokio::net::UnixStream>;
    async fn accept(&self) -> io::Result<Self::Io> {
        self.0.accept().await.map(|(stream, _)| UnixAuthority::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// RFC 7541 C.1.1 and C.1.2 (5-bit prefix), and a string longer than
    /// the 7-bit prefix holds.
    #[test]
    fn literals_decode_to_the_same_fields() {
        let mut out = Vec::new();
        encode_integer(10, 5, &mut out);
        assert_eq!(out, [0x0a]);
        out.clear();
        encode_integer(1337, 5, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        let long = vec![b'v'; 300];
        let fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":authority", b"localhost"),
            (b"x-long", &long),
            (b"empty", b""),
        ];
        let mut block = Vec::new();
        encode_literals(fields.iter().copied(), &mut block);
        let decoded = loona_hpack::Decoder::new().decode(&block).unwrap();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = fields.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        assert_eq!(decoded, expected);
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn request(authority: Option<&[u8]>, extra: usize) -> Headers {
        let mut h: Headers = vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (
                b":path".to_vec(),
                b"/flute.tokenbroker.v1.TokenBroker/GetToken".to_vec(),
            ),
        ];
        if let Some(a) = authority {
            h.push((b":authority".to_vec(), a.to_vec()));
        }
        h.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
        h.push((b"te".to_vec(), b"trailers".to_vec()));
        for i in 0..extra {
            h.push((format!("x-extra-{i}").into_bytes(), vec![b'v'; i * 97 % 3000]));
        }
        h
    }

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_header(&mut out, payload.len(), kind, flags, stream_id);
        out.extend_from_slice(payload);
        out
    }

    /// A client's HEADERS (+ CONTINUATION) frames for `headers`, split at
    /// random, with random padding and priority.
    fn client_block(
        rng: &mut StdRng,
        encoder: &mut loona_hpack::Encoder<'static>,
        stream_id: u32,
        headers: &Headers,
    ) -> Vec<u8> {
        let block = encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let first = rng.random_range(0..=block.len().min(1000));
        let (head, mut rest) = block.split_at(first);
        let mut payload = Vec::new();
        let mut flags = END_STREAM * u8::from(rng.random_bool(0.3));
        let padding = if rng.random_bool(0.5) {
            rng.random_range(0..=255u8)
        } else {
            0
        };
        if padding > 0 {
            flags |= PADDED;
            payload.push(padding);
        }
        if rng.random_bool(0.5) {
            flags |= PRIORITY;
            payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        }
        payload.extend_from_slice(head);
        payload.extend(std::iter::repeat_n(0u8, usize::from(padding)));
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let mut out = frame(HEADERS, flags, stream_id, &payload);
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(5000));
            let (chunk, after) = rest.split_at(n);
            rest = after;
            out.extend(frame(
                CONTINUATION,
                if rest.is_empty() { END_HEADERS } else { 0 },
                stream_id,
                chunk,
            ));
        }
        out
    }

    /// What the server sees: frames, with every header block decoded.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Block {
            stream_id: u32,
            end_stream: bool,
            headers: Headers,
        },
        Frame(Vec<u8>),
    }

    fn server_view(mut bytes: &[u8]) -> Vec<Seen> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut seen = Vec::new();
        let mut block: Option<(u32, bool, Vec<u8>)> = None;
        while !bytes.is_empty() {
            let len = frame_len(bytes).unwrap();
            assert!(len <= MAX_FRAME_SIZE, "frame of {len} bytes");
            let (f, rest) = bytes.split_at(FRAME_HEADER_LEN + len);
            bytes = rest;
            let (kind, flags, id) = (f[3], f[4], u32::from_be_bytes([f[5], f[6], f[7], f[8]]));
            match kind {
                HEADERS => {
                    let (_, fragment) = headers_fragment(flags, &f[9..]).unwrap();
                    block = Some((id, flags & END_STREAM != 0, fragment.to_vec()));
                }
                CONTINUATION => block.as_mut().unwrap().2.extend_from_slice(&f[9..]),
                _ => seen.push(Seen::Frame(f.to_vec())),
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                let (stream_id, end_stream, fragment) = block.take().unwrap();
                let headers = decoder.decode(&fragment).unwrap();
                seen.push(Seen::Block {
                    stream_id,
                    end_stream,
                    headers,
                });
            }
        }
        seen
    }

    fn rewrite_in_chunks(rng: &mut StdRng, input: &[u8]) -> (Vec<u8>, Vec<Event>) {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(20_000));
            rewriter.push(&rest[..n], &mut out);
            rest = &rest[n..];
        }
        (out, rewriter.take_events())
    }

    #[test]
    fn streams_come_out_identical_but_for_an_invalid_authority() {
        let authorities: [Option<&[u8]>; 6] = [
            Some(b"tmp%2Fbroker%2Fbroker.sock"),
            Some(b"/run/flute/broker.sock"),
            Some(b"unix:/run/flute/broker.sock"),
            Some(b""),
            Some(b"localhost:50051"),
            None,
        ];
        for seed in 0..200u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut encoder = loona_hpack::Encoder::new();
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])); // SETTINGS
            let mut expected = vec![Seen::Frame(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]))];
            let mut replaced = 0;
            // Followed from the first request on if that one needs a repair;
            // otherwise passed through untouched.
            let mut followed = None;
            for i in 0..rng.random_range(1..6u32) {
                let stream_id = 2 * i + 1;
                let authority = authorities[rng.random_range(0..authorities.len())];
                let headers = request(authority, rng.random_range(0..12));
                let block = client_block(&mut rng, &mut encoder, stream_id, &headers);
                let end_stream = block[4] & END_STREAM != 0;
                input.extend(block);
                let mut wanted = headers.clone();
                let invalid = authority.is_some_and(|a| a.is_empty() || http::uri::Authority::try_from(a).is_err());
                if *followed.get_or_insert(invalid) && invalid {
                    wanted.iter_mut().find(|(n, _)| n == b":authority").unwrap().1 = b"localhost".to_vec();
                    replaced += 1;
                }
                expected.push(Seen::Block {
                    stream_id,
                    end_stream,
                    headers: wanted,
                });
                let data = frame(0x0, END_STREAM, stream_id, &[0, 0, 0, 0, 2, 8, 1]);
                input.extend(&data);
                expected.push(Seen::Frame(data));
            }
            let ping = frame(0x6, 0, 0, &[7; 8]);
            input.extend(&ping);
            expected.push(Seen::Frame(ping));
            let (out, events) = rewrite_in_chunks(&mut rng, &input);
            assert_eq!(server_view(&out), expected, "seed {seed}");
            let count = events.iter().filter(|e| **e == Event::AuthorityReplaced).count();
            assert_eq!(count, replaced, "seed {seed}");
            let passed = events.contains(&Event::PassThrough(FIRST_AUTHORITY_VALID));
            assert_eq!(passed, followed == Some(false), "seed {seed}: {events:?}");
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::PassThrough(why) if *why != FIRST_AUTHORITY_VALID)),
                "seed {seed}: {events:?}"
            );
        }
    }

    #[test]
    fn a_large_block_is_split_at_the_frame_size() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut encoder = loona_hpack::Encoder::new();
        let mut headers = request(Some(b"tmp%2Fx.sock"), 0);
        headers.push((b"x-big".to_vec(), vec![b'b'; 40_000]));
        let mut input = PREFACE.to_vec();
        input.extend(client_block(&mut rng, &mut encoder, 1, &headers));
        let (out, _) = rewrite_in_chunks(&mut rng, &input);
        let Seen::Block { headers: got, .. } = &server_view(&out)[0] else {
            panic!()
        };
        assert_eq!(got.iter().find(|(n, _)| n == b":authority").unwrap().1, b"localhost");
        assert_eq!(got.last().unwrap().1.len(), 40_000);
    }

    #[test]
    fn headers_the_server_refuses_are_reported() {
        for (name, value, reason) in [
            (
                &b"Content-Type"[..],
                &b"x"[..],
                "a header name that is empty or not lowercase",
            ),
            (b"connection", b"close", "a connection-specific header"),
            (b"te", b"gzip", "a TE header other than \"trailers\""),
        ] {
            let mut headers = request(Some(b"localhost"), 0);
            headers.push((name.to_vec(), value.to_vec()));
            let block = loona_hpack::Encoder::new().encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, &block));
            let mut rewriter = Rewriter::new();
            rewriter.push(&input, &mut Vec::new());
            assert_eq!(rewriter.take_events()[0], Event::Malformed(reason));
        }
    }

    #[test]
    fn what_cannot_be_followed_passes_through_unchanged() {
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            [PREFACE, &frame(CONTINUATION, END_HEADERS, 1, b"abc")].concat(),
            [PREFACE, &frame(HEADERS, END_HEADERS | PADDED, 1, &[200, 1, 2])].concat(),
            [PREFACE, &frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff])].concat(),
            [PREFACE, &[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1][..], &[0; 100]].concat(),
            [PREFACE, &frame(HEADERS, 0, 1, &[0x82]), &frame(0x0, 0, 1, b"data")].concat(),
        ];
        for input in cases {
            let mut rewriter = Rewriter::new();
            let mut out = Vec::new();
            for chunk in input.chunks(5) {
                rewriter.push(chunk, &mut out);
            }
            assert_eq!(out, input);
            assert!(!rewriter.is_following());
        }
    }

    #[test]
    fn random_input_never_panics_and_buffers_at_most_one_frame_and_block() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..500 {
            let mut rewriter = Rewriter::new();
            let mut out = Vec::new();
            let mut input = PREFACE.to_vec();
            for _ in 0..rng.random_range(0..50) {
                let len = rng.random_range(0..300);
                let kind = [HEADERS, CONTINUATION, 0, 4, 6][rng.random_range(0..5)];
                let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                input.extend(frame(kind, rng.random(), rng.random_range(0..4), &payload));
            }
            for chunk in input.chunks(rng.random_range(1..64)) {
                rewriter.push(chunk, &mut out);
                assert!(rewriter.pending.len() <= FRAME_HEADER_LEN + MAX_FRAME_SIZE);
                assert!(rewriter.block.as_ref().is_none_or(|b| b.raw.len() <= MAX_HEADER_BLOCK));
            }
        }
    }
}
