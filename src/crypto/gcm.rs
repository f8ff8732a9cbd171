//! AES-256-GCM with the sizes the sealed formats use: a 32-byte key, a
//! 12-byte nonce, a 16-byte tag kept apart from the ciphertext.
//!
//! Takes key, nonce and tag as fixed-size arrays (the formats' parsers
//! check the lengths), so nothing here can fail on a length; gives
//! encryption and decryption in place. No side effects.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;

use super::{NONCE_LEN, TAG_LEN};

/// One key's AES-256-GCM (its round keys are zeroized on drop).
pub(crate) struct Gcm(Aes256Gcm);

impl Gcm {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(key.into()))
    }

    /// Encrypts `buf` in place; gives the tag. Fails only when `buf` is
    /// longer than GCM allows (2^36 - 32 bytes).
    pub(crate) fn seal(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], aes_gcm::Error> {
        self.0
            .encrypt_inout_detached(nonce.into(), aad, buf.into())
            .map(Into::into)
    }

    /// Decrypts `buf` in place when `tag` authenticates it with `aad`;
    /// otherwise an error (and `buf` is left unspecified).
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), aes_gcm::Error> {
        self.0.decrypt_inout_detached(nonce.into(), aad, buf.into(), tag.into())
    }
}
