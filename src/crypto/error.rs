//! The one error type of the crypto module. Messages name versions, lengths
//! and formats, never key material or plaintext.

use super::keyring::KeyVersion;

/// Everything that can go wrong in key handling, sealing and opening.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The keyring source held no root key versions at all.
    #[error("root keyring is empty: at least one key version (v1, v2, ...) is required")]
    NoKeys,
    /// A keyring entry's name is not `v<N>` (N from 1 to 4294967295, no leading zeros).
    #[error(
        "invalid root key version name {0:?}: expected `v<N>` with N a decimal number \
         from 1 to 4294967295 without leading zeros"
    )]
    BadVersionName(String),
    /// A root key is not exactly 32 bytes.
    #[error("root key {version} is {len} bytes long; every root key must be exactly 32 bytes")]
    BadKeyLength {
        /// The version whose key has the wrong length.
        version: KeyVersion,
        /// Its actual length.
        len: usize,
    },
    /// The keyring source does not say which version is active.
    #[error("the root keyring has no `active` entry naming the active key version")]
    ActiveNotSet,
    /// The version named active has no key in the keyring.
    #[error("the active root key version {0} is not in the keyring")]
    ActiveMissing(KeyVersion),
    /// A tenant salt is not exactly 32 bytes.
    #[error("tenant salt is {0} bytes long; it must be exactly 32 bytes")]
    BadSaltLength(usize),
    /// A tenant uid cannot be used in a derivation or an AAD.
    #[error("invalid tenant uid: {0}")]
    InvalidTenantUid(&'static str),
    /// An input is longer than the format allows.
    #[error("{what} is {len} bytes long, over the limit of {max} bytes")]
    TooLong {
        /// Which input.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The format version byte is not one this code knows.
    #[error("unsupported {kind} format version {version:#04x}")]
    UnsupportedFormat {
        /// `envelope` or `stream`.
        kind: &'static str,
        /// The byte found.
        version: u8,
    },
    /// The input is shorter than the smallest valid one.
    #[error("{kind} is truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// What was being parsed.
        kind: &'static str,
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// The data names a root key version that the keyring does not hold.
    #[error(
        "root key version {0} is not in the keyring (it may have been removed before \
         everything sealed under it was re-sealed)"
    )]
    UnknownKeyVersion(KeyVersion),
    /// The AES-GCM tag did not verify.
    #[error(
        "authentication failed: the data was modified, truncated, reordered or moved to \
         another tenant, name or purpose, or the wrong salt or key was used"
    )]
    Authentication,
    /// A stream does not start with the `TNBK` magic.
    #[error("not a tenant backup stream: bad magic bytes")]
    BadMagic,
    /// A stream header's chunk size is 0 or over the maximum.
    #[error("stream chunk size {0} is outside the allowed range 1..=67108864")]
    BadChunkSize(u32),
    /// A stream ended before its final chunk.
    #[error("stream ended before its final chunk: the stream was truncated")]
    StreamTruncated,
    /// A stream's chunk counter would overflow.
    #[error("stream is too long: the chunk counter is exhausted")]
    StreamTooLong,
    /// An earlier call on this stream failed; its output is incomplete.
    #[error("an earlier operation on this stream failed; the stream must be discarded")]
    StreamPoisoned,
    /// A tenant key handed over directly is for another purpose than the
    /// one it is used for.
    #[error("a tenant key for purpose {got} was given where one for {expected} is needed")]
    WrongKeyPurpose {
        /// The purpose needed.
        expected: super::Purpose,
        /// The key's purpose.
        got: super::Purpose,
    },
}

impl From<CryptoError> for std::io::Error {
    fn from(err: CryptoError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }
}
