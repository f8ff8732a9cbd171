//! Test helpers: deterministic keys and keyrings, leak checks.

use std::collections::BTreeMap;

use super::{Keyring, TenantSalt};

/// A distinctive, deterministic 32-byte key for version `n`.
pub(crate) fn key_bytes(n: u32) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (i as u32 * 37 + n * 101 + 11) as u8;
    }
    key
}

/// A keyring holding `versions` (keys from [`key_bytes`]) with `active` active.
pub(crate) fn keyring(versions: &[u32], active: u32) -> Keyring {
    let entries: BTreeMap<String, Vec<u8>> = versions
        .iter()
        .map(|n| (format!("v{n}"), key_bytes(*n).to_vec()))
        .collect();
    Keyring::new(entries, &format!("v{active}")).expect("test keyring is valid")
}

/// A deterministic salt.
pub(crate) fn salt(seed: u8) -> TenantSalt {
    TenantSalt::from_bytes(&[seed; 32]).expect("32 bytes")
}

/// Fails when `shown` contains any 4-byte window of `key`, in lower- or
/// upper-case hex or in the decimal list form `Debug` gives byte slices.
pub(crate) fn assert_no_key_bytes(shown: &str, key: &[u8]) {
    for window in key.windows(4) {
        let hex_lower = hex::encode(window);
        let hex_upper = hex_lower.to_uppercase();
        let decimal = window.iter().map(u8::to_string).collect::<Vec<_>>().join(", ");
        for needle in [&hex_lower, &hex_upper, &decimal] {
            assert!(
                !shown.contains(needle.as_str()),
                "key bytes leaked as {needle:?} into: {shown}"
            );
        }
    }
}
