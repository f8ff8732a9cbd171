//! Bodies of the crypto fuzz targets, shared by the cargo-fuzz binaries in
//! `fuzz_targets/` and by the main crate's `tests/fuzz_smoke.rs` (which
//! includes this file as a module, so it may use only `tenant_operator`
//! and `std`).
//!
//! Each body takes arbitrary bytes and panics only when an invariant breaks:
//! - nothing opens unless it is, byte for byte, an envelope or stream this
//!   process sealed, and then it opens to exactly what was sealed;
//! - a stream reader releases only a prefix of the sealed plaintext (whole
//!   authenticated chunks) and reports the end only for an intact stream;
//! - no input makes the parsers or openers panic.
//!
//! Input layout: byte 0 picks the mode (even: the rest is the candidate
//! itself; odd: the rest is a list of edits applied to a valid envelope or
//! stream), byte 1 seeds the split sizes; see [`apply_edits`].

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::OnceLock;

use tenant_operator::crypto::{
    self, envelope_key_version, stream_key_version, Keyring, OpeningReader, Purpose, StreamDecryptor, StreamEncryptor,
    TenantSalt,
};

/// The tenant every fixture belongs to.
pub const UID: &str = "0b9e7f7c-2a51-4d4e-9b1f-3c2d1e0f9a8b";
/// The secret name every fixture envelope is sealed as.
pub const NAME: &str = "fuzz-secret";
/// Small chunks, so a short stream has several of them.
pub const STREAM_CHUNK: u32 = 64;
/// Most edits applied to one fixture.
const MAX_EDITS: usize = 64;

/// Keys, salt and the valid envelopes and stream of this process.
pub struct Fixture {
    /// v1 and v2, v2 active.
    pub ring: Keyring,
    /// The tenant's salt.
    pub salt: TenantSalt,
    /// Valid envelopes (under v1 and v2) and their plaintexts.
    pub envelopes: Vec<(Vec<u8>, Vec<u8>)>,
    /// A valid stream of several chunks, and its plaintext.
    pub stream: Vec<u8>,
    /// The plaintext sealed in `stream`.
    pub stream_plaintext: Vec<u8>,
}

fn root_keys() -> BTreeMap<String, Vec<u8>> {
    (1u8..=2)
        .map(|n| {
            let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(29) ^ (n * 101)).collect();
            (format!("v{n}"), key)
        })
        .collect()
}

/// The fixture, built once per process (nonces and stream ids are random,
/// so the valid bytes differ between runs; edits are relative to them).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let ring = Keyring::new(root_keys(), "v2").expect("fixture keyring");
        let old_ring = Keyring::new(root_keys(), "v1").expect("fixture keyring");
        let salt = TenantSalt::from_bytes(&[0x5a; 32]).expect("fixture salt");
        let mut envelopes = Vec::new();
        for (r, plaintext) in [
            (&ring, &b""[..]),
            (&ring, b"x"),
            (&ring, b"the database password"),
            (&old_ring, b"sealed under v1"),
        ] {
            let env = crypto::seal(r, &salt, UID, Purpose::Secrets, NAME, plaintext).expect("fixture envelope");
            envelopes.push((env, plaintext.to_vec()));
        }
        // 3 full chunks and a short last one.
        let stream_plaintext: Vec<u8> = (0..(3 * STREAM_CHUNK + 8)).map(|i| (i * 7 + 3) as u8).collect();
        let mut enc =
            StreamEncryptor::with_chunk_size(&ring, &salt, UID, Purpose::Backup, STREAM_CHUNK).expect("fixture stream");
        let mut stream = Vec::new();
        enc.push(&stream_plaintext, &mut stream).expect("fixture stream");
        enc.finish(&mut stream).expect("fixture stream");
        Fixture {
            ring,
            salt,
            envelopes,
            stream,
            stream_plaintext,
        }
    })
}

/// Applies edits to `base`: each group of 4 bytes `[op, pos hi, pos lo, value]`
/// xors, sets, inserts or removes one byte, or truncates, at `pos` (taken
/// modulo the current length + 1). A xor with 0 or a set to the same value
/// changes nothing, so edits can leave `base` intact.
pub fn apply_edits(base: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for edit in edits.chunks_exact(4).take(MAX_EDITS) {
        let pos = usize::from(u16::from_be_bytes([edit[1], edit[2]])) % (out.len() + 1);
        let value = edit[3];
        match edit[0] % 5 {
            0 if pos < out.len() => out[pos] ^= value,
            1 if pos < out.len() => out[pos] = value,
            2 => out.insert(pos, value),
            3 if pos < out.len() => {
                out.remove(pos);
            }
            4 => out.truncate(pos),
            _ => {}
        }
    }
    out
}

/// Split sizes for feeding a stream: a small generator seeded by one byte,
/// giving pieces of 1 to 100 bytes (and sometimes everything at once).
fn split_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    std::iter::repeat_with(move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        if state % 16 == 0 {
            usize::MAX
        } else {
            (state % 100) as usize + 1
        }
    })
}

/// The envelope target: `data` (raw or as edits of a fixture envelope) into
/// `crypto::open` and `envelope_key_version`.
pub fn envelope_open(data: &[u8]) {
    let fx = fixture();
    let candidate = match data.split_first() {
        None => Vec::new(),
        Some((mode, rest)) if mode % 2 == 0 => rest.to_vec(),
        Some((_, rest)) => {
            let (pick, edits) = rest.split_first().unwrap_or((&0, &[]));
            let base = &fx.envelopes[usize::from(*pick) % fx.envelopes.len()].0;
            apply_edits(base, edits)
        }
    };
    let version = envelope_key_version(&candidate);
    let known = fx.envelopes.iter().find(|(env, _)| *env == candidate);
    match crypto::open(&fx.ring, &fx.salt, UID, Purpose::Secrets, NAME, &candidate) {
        Ok(plaintext) => {
            let Some((_, sealed)) = known else {
                panic!("an envelope that was never sealed opened ({} bytes)", candidate.len());
            };
            assert_eq!(plaintext.as_slice(), sealed.as_slice(), "opened to other bytes");
            assert!(version.is_ok(), "opened, but its key version did not parse");
        }
        Err(err) => {
            assert!(known.is_none(), "a valid envelope failed to open: {err}");
        }
    }
    // Never under another name or purpose, valid or not.
    assert!(
        crypto::open(&fx.ring, &fx.salt, UID, Purpose::Secrets, "other", &candidate).is_err(),
        "an envelope opened under another name"
    );
    assert!(
        crypto::open(&fx.ring, &fx.salt, UID, Purpose::Backup, NAME, &candidate).is_err(),
        "an envelope opened under another purpose"
    );
}

/// A `Read` that hands out `data` in pieces of the given sizes.
struct Pieces<'a, I> {
    data: &'a [u8],
    sizes: I,
}

impl<I: Iterator<Item = usize>> Read for Pieces<'_, I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self.sizes.next().unwrap_or(usize::MAX);
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The stream target: `data` (raw or as edits of the fixture stream) pushed
/// in arbitrary splits into `StreamDecryptor`, and read through
/// `OpeningReader` with arbitrary short reads.
pub fn stream_open(data: &[u8]) {
    let fx = fixture();
    let (mode, seed, rest) = match data {
        [] => (0, 0, &[][..]),
        [mode] => (*mode, 0, &[][..]),
        [mode, seed, rest @ ..] => (*mode, *seed, rest),
    };
    let candidate = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        apply_edits(&fx.stream, rest)
    };
    let intact = candidate == fx.stream;
    let is_prefix = |out: &[u8]| fx.stream_plaintext.starts_with(out);
    let _ = stream_key_version(&candidate);

    // Push in splits.
    let mut dec = StreamDecryptor::new(&fx.ring, &fx.salt, UID, Purpose::Backup).expect("decryptor for a valid uid");
    let mut out = Vec::new();
    let mut rest = &candidate[..];
    let mut sizes = split_sizes(seed);
    let mut failed = None;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        if let Err(err) = dec.push(piece, &mut out) {
            failed = Some(err);
            break;
        }
        assert!(is_prefix(&out), "released plaintext that was never sealed");
    }
    let result = match failed {
        Some(err) => Err(err),
        None => dec.finish(&mut out),
    };
    assert!(is_prefix(&out), "released plaintext that was never sealed");
    match result {
        Ok(()) => {
            assert!(intact, "an altered stream opened to the end");
            assert_eq!(out, fx.stream_plaintext, "an intact stream opened to other bytes");
        }
        Err(err) => assert!(!intact, "the intact stream failed: {err}"),
    }

    // Through the reader, with short reads from below and small buffers above.
    let inner = Pieces {
        data: &candidate,
        sizes: split_sizes(seed.wrapping_add(1)),
    };
    let mut reader =
        OpeningReader::new(inner, &fx.ring, &fx.salt, UID, Purpose::Backup).expect("reader for a valid uid");
    let mut out = Vec::new();
    let mut buf = vec![0u8; usize::from(seed % 50) + 1];
    let end = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                assert!(is_prefix(&out), "the reader released plaintext that was never sealed");
            }
            Err(err) => break Err(err),
        }
    };
    match end {
        Ok(()) => {
            assert!(intact, "the reader reached the end of an altered stream");
            assert_eq!(out, fx.stream_plaintext, "the reader returned other bytes");
        }
        Err(err) => {
            assert!(!intact, "the reader failed on the intact stream: {err}");
            // After an error, the reader stays failed.
            assert!(reader.read(&mut buf).is_err(), "the reader recovered after an error");
        }
    }
}

/// Inputs that reach the interesting paths at once (a starting corpus):
/// every fixture unchanged, and a few single-byte edits.
pub fn seeds() -> Vec<Vec<u8>> {
    let fx = fixture();
    let mut out = Vec::new();
    for pick in 0..fx.envelopes.len() as u8 {
        out.push(vec![1, pick]);
        out.push(vec![1, pick, 0, 0, 5, 0x01]);
    }
    out.push(vec![1, 7]);
    out.push(vec![1, 7, 0, 0, 40, 0x80]);
    out.push(vec![1, 7, 4, 0, 93, 0]);
    out
}
