//! The audit file's hash chain: each line is a JSON object whose last
//! member is `"hash"`, the SHA-256 (hex) of the previous record's hash
//! followed by this record's bytes without that member; each record also
//! names its sequence number (`seq`) and the previous hash (`prev`). The
//! first record ever has `prev` of 64 zeros; a file reopened after
//! logrotate moved the last one continues the chain, so
//! [`verify`] over the files in order finds a record edited, removed,
//! inserted or reordered, within a file or across files.

use sha2::{Digest, Sha256};

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_MEMBER: &str = ",\"hash\":\"";

/// The line for `body` (a JSON object, without `hash`, ending in `}`),
/// chained to `prev`, and its hash.
pub fn seal(prev: &str, body: &str) -> (String, String) {
    let hash = digest(prev, body);
    let open = body.strip_suffix('}').unwrap_or(body);
    (format!("{open}{HASH_MEMBER}{hash}\"}}"), hash)
}

fn digest(prev: &str, body: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev.as_bytes());
    hasher.update(body.as_bytes());
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What a verified chain ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub last_seq: Option<u64>,
    pub last_hash: String,
}

/// Where and why a chain breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct Broken {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// Checks the records of `files`, each `(name, text)`, in order, as one
/// chain. The first record may start anywhere (an older file may be gone:
/// its `prev` is taken as given), every later one must follow.
pub fn verify<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Verified, Broken> {
    let mut state: Option<(u64, String)> = None;
    let mut records = 0;
    for (file, text) in files {
        for (n, line) in text.lines().enumerate() {
            let broken = |reason: String| Broken {
                file: file.to_owned(),
                line: n + 1,
                reason,
            };
            let at = line
                .rfind(HASH_MEMBER)
                .ok_or_else(|| broken("no hash: not an audit record".into()))?;
            let hash = line[at + HASH_MEMBER.len()..]
                .strip_suffix("\"}")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| broken("the hash is not the record's last member".into()))?;
            let body = format!("{}}}", &line[..at]);
            let fields: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| broken(format!("not a JSON record: {e}")))?;
            let seq = fields["seq"].as_u64().ok_or_else(|| broken("no seq".into()))?;
            let prev = fields["prev"].as_str().ok_or_else(|| broken("no prev".into()))?;
            if let Some((last_seq, last_hash)) = &state {
                if seq != last_seq + 1 {
                    return Err(broken(format!(
                        "seq {seq} follows {last_seq}: a record was removed, inserted or reordered"
                    )));
                }
                if prev != last_hash {
                    return Err(broken(
                        "prev is not the previous record's hash: the chain is broken here".into(),
                    ));
                }
            } else if seq == 0 && prev != GENESIS {
                return Err(broken("the first record's prev is not the genesis hash".into()));
            }
            if digest(prev, &body) != hash {
                return Err(broken("the hash does not match the record: it was edited".into()));
            }
            state = Some((seq, hash.to_owned()));
            records += 1;
        }
    }
    let (last_seq, last_hash) = match state {
        Some((seq, hash)) => (Some(seq), hash),
        None => (None, GENESIS.to_owned()),
    };
    Ok(Verified {
        records,
        last_seq,
        last_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_owned();
        (0..n)
            .map(|seq| {
                let body = format!("{{\"seq\":{seq},\"prev\":\"{prev}\",\"kind\":\"test\",\"n\":{seq}}}");
                let (line, hash) = seal(&prev, &body);
                prev = hash;
                line
            })
            .collect()
    }

    fn text(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn an_intact_chain_verifies_across_files() {
        let lines = chain(5);
        let (a, b) = (text(&lines[..2]), text(&lines[2..]));
        let verified = verify([("a", a.as_str()), ("b", b.as_str())]).unwrap();
        assert_eq!(verified.records, 5);
        assert_eq!(verified.last_seq, Some(4));
        // A later file alone: its first prev is taken as given.
        assert_eq!(verify([("b", b.as_str())]).unwrap().records, 3);
        assert_eq!(verify([("empty", "")]).unwrap().last_hash, GENESIS);
    }

    #[test]
    fn an_edit_a_removal_a_reordering_are_found_and_placed() {
        let lines = chain(4);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":7");
        let err = verify([("f", text(&edited).as_str())]).unwrap_err();
        assert_eq!((err.line, err.reason.contains("edited")), (3, true), "{err}");

        let mut removed = lines.clone();
        removed.remove(1);
        let err = verify([("f", text(&removed).as_str())]).unwrap_err();
        assert_eq!(err.line, 2, "{err}");

        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        let err = verify([("f", text(&reordered).as_str())]).unwrap_err();
        assert_eq!(err.line, 2, "{err}");

        // Files given out of order, or one missing in between.
        let (a, b, c) = (text(&lines[..1]), text(&lines[1..2]), text(&lines[2..]));
        assert!(verify([("a", a.as_str()), ("c", c.as_str())]).is_err());
        assert!(verify([("b", b.as_str()), ("a", a.as_str())]).is_err());
        // A forged record with a recomputed hash still breaks the chain after it.
        let mut forged = lines.clone();
        let body = format!("{{\"seq\":1,\"prev\":\"{GENESIS}\",\"kind\":\"test\",\"n\":1}}");
        forged[1] = seal(GENESIS, &body).0;
        assert!(verify([("f", text(&forged).as_str())]).is_err());
        // Garbage lines are named.
        let err = verify([("f", "not json\n")]).unwrap_err();
        assert_eq!(err.to_string(), "f:1: no hash: not an audit record");
    }
}
