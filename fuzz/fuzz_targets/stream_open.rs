//! Arbitrary bytes (raw, or as edits of a valid stream) pushed in arbitrary
//! splits into `StreamDecryptor` and read through `OpeningReader`: no panic,
//! only authenticated plaintext is released, and end of stream is reported
//! only for an intact stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tenant_operator_fuzz::stream_open(data);
});
