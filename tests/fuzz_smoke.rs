//! A quick, deterministic pass of the crypto fuzz targets under plain
//! `cargo test`: a few thousand random and mutated inputs through the same
//! bodies that `cargo fuzz` runs (`fuzz/src/lib.rs`, included here as a
//! module). The coverage-guided run is `make fuzz`.

#[path = "../fuzz/src/lib.rs"]
mod bodies;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Inputs per target; each runs in well under a millisecond.
const CASES: usize = 3000;

/// Random inputs: raw bytes (even mode byte) and edit lists (odd), of
/// lengths up to 400 bytes, plus the seed corpus.
fn inputs(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = bodies::seeds();
    while out.len() < CASES {
        let len = rng.random_range(0..400);
        let mut input = vec![0u8; len];
        rng.fill_bytes(&mut input);
        // Keep edit lists short so most mutants stay close to valid.
        if input.first().is_some_and(|m| m % 2 == 1) && rng.random_bool(0.7) {
            input.truncate(2 + 4 * rng.random_range(0..4));
        }
        out.push(input);
    }
    out
}

#[test]
fn envelope_open_survives_random_and_mutated_inputs() {
    for input in inputs(0xE1) {
        bodies::envelope_open(&input);
    }
}

#[test]
fn stream_open_survives_random_and_mutated_inputs() {
    for input in inputs(0x5E) {
        bodies::stream_open(&input);
    }
}

#[test]
fn untouched_fixtures_open_and_single_flips_do_not() {
    // The invariants above are only meaningful if intact inputs do open:
    // an edit-free input must take the success path without panicking.
    let fx = bodies::fixture();
    for pick in 0..fx.envelopes.len() as u8 {
        bodies::envelope_open(&[1, pick]);
    }
    bodies::stream_open(&[1, 0]);
    // Every single-byte xor of the stream, pushed in one split pattern.
    for pos in 0..fx.stream.len() as u16 {
        let [hi, lo] = pos.to_be_bytes();
        bodies::stream_open(&[1, 3, 0, hi, lo, 0x01]);
    }
}
