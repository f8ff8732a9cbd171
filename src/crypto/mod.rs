//! Key derivation and authenticated encryption for tenant data.
//!
//! Takes: versioned 32-byte root keys (however the caller obtained them: a
//! Kubernetes Secret's data, or keys unwrapped by a KMS), a tenant's uid and
//! its 32-byte random salt from the registry.
//! Gives: per-tenant, per-purpose keys (HKDF-SHA256), small sealed
//! envelopes for secrets ([`seal`]/[`open`]), and a chunked streaming
//! format for backups ([`StreamEncryptor`], [`StreamDecryptor`],
//! [`SealingWriter`], [`OpeningReader`]).
//! Side effects: none. No files, network or environment; the only outside
//! resource used is the operating system's CSPRNG (through `rand`) for salts,
//! nonces and stream ids. Secret bytes are zeroized on drop and never appear
//! in `Debug` output or error messages.
//!
//! The byte layouts are specified in `docs/crypto-formats.md`; a change to
//! any of them needs a new format version byte, never an in-place edit.

mod derive;
mod envelope;
mod error;
mod gcm;
mod keyring;
mod stream;

#[cfg(test)]
mod kat;
#[cfg(test)]
pub(crate) mod testutil;

pub use derive::{hkdf_info, login_password, Purpose, TenantKey, TenantSalt, TENANT_SALT_LEN};
pub use envelope::{
    envelope_key_version, open, seal, ENVELOPE_FORMAT_V1, ENVELOPE_OVERHEAD, MAX_ENVELOPE_NAME_LEN,
    MAX_ENVELOPE_PLAINTEXT_LEN,
};
pub use error::CryptoError;
pub use keyring::{generate_root_key, KeyFingerprint, KeyVersion, Keyring, ROOT_KEY_LEN};
pub use stream::{
    stream_key_version, OpeningReader, SealingWriter, StreamDecryptor, StreamEncryptor, StreamHeader,
    DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, STREAM_FORMAT_V1, STREAM_HEADER_LEN, STREAM_MAGIC,
};

/// AES-256-GCM tag length in bytes.
pub const TAG_LEN: usize = 16;
/// AES-256-GCM nonce length in bytes.
pub const NONCE_LEN: usize = 12;

/// Longest tenant uid accepted (Kubernetes uids are 36-character UUIDs).
pub const MAX_TENANT_UID_LEN: usize = 128;

/// Checks a tenant uid before it goes into an HKDF info string or an AAD.
///
/// The uid is printable ASCII without spaces, so the info string
/// `... tenant=<uid> purpose=...` can be read back unambiguously.
pub(crate) fn validate_tenant_uid(uid: &str) -> Result<(), CryptoError> {
    if uid.is_empty() {
        return Err(CryptoError::InvalidTenantUid("it is empty"));
    }
    if uid.len() > MAX_TENANT_UID_LEN {
        return Err(CryptoError::InvalidTenantUid("it is longer than 128 bytes"));
    }
    if !uid.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(CryptoError::InvalidTenantUid(
            "it must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Appends `u32 BE length || bytes`: the one length-prefix encoding used in
/// every AAD, so that no two field sequences encode to the same bytes.
pub(crate) fn put_len_prefixed(out: &mut Vec<u8>, field: &[u8]) {
    // Callers bound every field far below u32::MAX; saturate rather than panic.
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}
