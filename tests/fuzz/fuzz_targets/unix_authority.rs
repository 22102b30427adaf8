//! The Unix-socket `:authority` adapter over arbitrary client byte streams
//! (after a valid preface, so the input reaches the frame parser), fed in
//! chunks whose size the first byte picks. Never a panic; what passes
//! through is never more than the input plus re-encoded header blocks.
#![no_main]

use flute_token_broker::serve::unix_authority::Rewriter;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, frames)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    rewriter.push(PREFACE, &mut out);
    for piece in frames.chunks(chunk) {
        rewriter.push(piece, &mut out);
    }
    let _ = rewriter.take_events();
    assert!(out.starts_with(PREFACE));
});
