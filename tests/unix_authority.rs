//! The Unix socket serves a request whatever `:authority` it carries, as
//! grpc-core (a percent-encoded path) and grpc-java (the raw path) send
//! them, and logs a request the server refuses for a malformed header. The
//! client here writes HTTP/2 frames by hand, as those clients put them on
//! the wire; the Python, Node and Go suites in `examples/` do the same with
//! the real libraries.

mod support;

use std::time::Duration;

use flute_token_broker::Environment;
use support::{LogCapture, start_broker_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A header block of literal fields without indexing (RFC 7541 §6.2.2).
fn literal_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// How the server ended stream 1.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Response headers and trailers, decoded.
    Answered(Vec<(Vec<u8>, Vec<u8>)>),
    Reset,
}

/// Sends one health Check on a new connection and reads until stream 1 ends.
async fn health_check(socket: &str, headers: &[(&str, &str)]) -> Outcome {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    let mut request = PREFACE.to_vec();
    request.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    request.extend(frame(0x1, 0x4, 1, &literal_block(headers))); // HEADERS, END_HEADERS
    request.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA: an empty message, END_STREAM
    conn.write_all(&request).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut answered = Vec::new();
    loop {
        let mut header = [0u8; 9];
        conn.read_exact(&mut header).await.expect("the server answers stream 1");
        let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await.unwrap();
        match (kind, stream) {
            (0x4, 0) if flags & 0x1 == 0 => {
                // The server may already have closed after its answer.
                let _ = conn.write_all(&frame(0x4, 0x1, 0, &[])).await;
            }
            (0x1, 1) => {
                answered.extend(decoder.decode(&payload).expect("the server's headers decode"));
                if flags & 0x1 != 0 {
                    return Outcome::Answered(answered);
                }
            }
            (0x3, 1) | (0x7, _) => return Outcome::Reset,
            _ => {}
        }
    }
}

fn header<'a>(headers: &'a [(Vec<u8>, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

#[tokio::test(flavor = "current_thread")]
async fn any_authority_is_served_on_the_unix_socket_and_a_refused_header_is_logged() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let broker = start_broker_with(&[Environment::Sandbox], Duration::from_secs(900), |_, _| {}).await;
    let socket = broker.unix.strip_prefix("unix:").unwrap().to_owned();
    let request = |authority: Option<&'static str>| {
        let mut headers = vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
        ];
        headers.extend(authority.map(|a| (":authority", a)));
        headers.extend([("content-type", "application/grpc"), ("te", "trailers")]);
        headers
    };

    for authority in [
        Some("tmp%2Fflute%2Fbroker.sock"), // grpc-core 1.57+
        Some("/run/flute/broker.sock"),    // grpc-java
        Some("unix:/run/flute/broker.sock"),
        Some(""),
        Some("localhost"),
        None,
    ] {
        let outcome = tokio::time::timeout(Duration::from_secs(10), health_check(&socket, &request(authority)))
            .await
            .expect("an answer");
        let Outcome::Answered(headers) = outcome else {
            panic!("{authority:?}: the stream was reset")
        };
        assert_eq!(header(&headers, ":status"), Some(&b"200"[..]), "{authority:?}");
        assert_eq!(
            header(&headers, "grpc-status"),
            Some(&b"0"[..]),
            "{authority:?}: {headers:?}"
        );
    }
    assert!(!logs.text().contains("WARN"), "{}", logs.text());

    // A header the server refuses: the request fails, and the log says why.
    let mut refused = request(Some("localhost"));
    refused.push(("X-Upper-Case", "1"));
    let outcome = tokio::time::timeout(Duration::from_secs(10), health_check(&socket, &refused))
        .await
        .expect("an answer");
    assert_eq!(outcome, Outcome::Reset);
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("a header name that is empty or not lowercase")),
        "{text}"
    );
}
