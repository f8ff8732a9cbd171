//! Arbitrary bytes (raw, or as edits of a valid envelope) into
//! `crypto::open` and `envelope_key_version`: no panic, and nothing opens
//! unless it is byte for byte an envelope this process sealed.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tenant_operator_fuzz::envelope_open(data);
});
