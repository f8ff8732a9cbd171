//! Root keyring: the versioned 32-byte root keys, one of them active.
//!
//! Takes the entries of a Kubernetes Secret (`v1`, `v2`, ..., `active`) or
//! already-parsed keys; gives lookups by version and non-secret fingerprints
//! for status and logs. Keys are zeroized on drop; `Debug` shows versions and
//! fingerprints only.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// Length of every root key in bytes.
pub const ROOT_KEY_LEN: usize = 32;

/// Domain separation for fingerprints, so a fingerprint is never equal to
/// any other hash of the key this project might compute.
const FINGERPRINT_DOMAIN: &[u8] = b"tenancy.dev/v1 root-key-fingerprint\0";

/// Name of the Secret data entry that names the active version.
const ACTIVE_ENTRY: &str = "active";

/// A root key version: `v<N>` in text, `N` (a `u32`, at least 1) on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion(u32);

impl KeyVersion {
    /// A version from its number; 0 is not a valid version.
    pub fn new(n: u32) -> Result<Self, CryptoError> {
        if n == 0 {
            return Err(CryptoError::BadVersionName("v0".to_owned()));
        }
        Ok(Self(n))
    }

    /// A version as read from a sealed format. Not validated: a version that
    /// no keyring holds (such as 0) surfaces as `UnknownKeyVersion`.
    pub(crate) const fn from_wire(n: u32) -> Self {
        Self(n)
    }

    /// The version number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl FromStr for KeyVersion {
    type Err = CryptoError;

    /// Parses `v<N>`: `v` then a decimal number from 1 to `u32::MAX` without
    /// leading zeros, so every version has exactly one text form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            // Bound what we echo back: the name may come from arbitrary input.
            let shown: String = s.chars().take(40).collect();
            CryptoError::BadVersionName(shown)
        };
        let digits = s.strip_prefix('v').ok_or_else(bad)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
            return Err(bad());
        }
        let n: u32 = digits.parse().map_err(|_| bad())?;
        Self::new(n).map_err(|_| bad())
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Debug for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A non-secret 8-byte identifier of a root key: the first 8 bytes of
/// SHA-256(`"tenancy.dev/v1 root-key-fingerprint\0"` || key). Shown as 16
/// lowercase hex characters; safe for status fields and logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint([u8; 8]);

impl KeyFingerprint {
    fn of(key: &[u8; ROOT_KEY_LEN]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(FINGERPRINT_DOMAIN);
        hasher.update(key);
        let digest = hasher.finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        Self(out)
    }

    /// The raw 8 bytes.
    pub const fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One root key. Lives in the keyring's map (on the heap), so moving the
/// keyring does not leave copies of the bytes behind.
struct RootKey {
    bytes: Zeroizing<[u8; ROOT_KEY_LEN]>,
    fingerprint: KeyFingerprint,
}

/// Generates a fresh random root key (for bootstrapping a keyring Secret or
/// adding the next version).
pub fn generate_root_key() -> Zeroizing<[u8; ROOT_KEY_LEN]> {
    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    rand::rng().fill_bytes(key.as_mut());
    key
}

/// The root keys by version, and which one is active (used for new sealing).
pub struct Keyring {
    keys: BTreeMap<KeyVersion, RootKey>,
    active: KeyVersion,
}

impl Keyring {
    /// Builds a keyring from version names (`v1`, `v2`, ...) mapped to raw key
    /// bytes, and the name of the active version.
    ///
    /// The input byte vectors are zeroized before returning, on success and on
    /// error alike. Errors: no keys, a bad version name, a key that is not 32
    /// bytes (naming its version), an active version that is malformed or absent.
    pub fn new(mut keys: BTreeMap<String, Vec<u8>>, active: &str) -> Result<Self, CryptoError> {
        let result = Self::build(&keys, active);
        for value in keys.values_mut() {
            value.zeroize();
        }
        keys.clear();
        result
    }

    /// Builds a keyring from the data of a Kubernetes Secret: entries `v1`,
    /// `v2`, ... hold the keys and the entry `active` holds the name of the
    /// active version (surrounding whitespace, such as a trailing newline from
    /// `--from-file`, is ignored). Any other entry name is an error. The input
    /// is zeroized as in [`Keyring::new`].
    pub fn from_secret_data(mut data: BTreeMap<String, Vec<u8>>) -> Result<Self, CryptoError> {
        let active = data.remove(ACTIVE_ENTRY);
        let active_name = active
            .as_deref()
            .map(|raw| String::from_utf8_lossy(raw).trim().to_owned());
        match active_name {
            Some(name) => Self::new(data, &name),
            None => {
                // Still wipe the key bytes we were handed.
                for value in data.values_mut() {
                    value.zeroize();
                }
                Err(CryptoError::ActiveNotSet)
            }
        }
    }

    /// Builds a keyring from already-typed keys (for example after a KMS
    /// unwrapped them). Later duplicates of a version replace earlier ones.
    pub fn from_keys(
        keys: impl IntoIterator<Item = (KeyVersion, Zeroizing<[u8; ROOT_KEY_LEN]>)>,
        active: KeyVersion,
    ) -> Result<Self, CryptoError> {
        let keys: BTreeMap<KeyVersion, RootKey> = keys
            .into_iter()
            .map(|(version, bytes)| {
                let fingerprint = KeyFingerprint::of(&bytes);
                (version, RootKey { bytes, fingerprint })
            })
            .collect();
        Self::check(keys, active)
    }

    fn build(keys: &BTreeMap<String, Vec<u8>>, active: &str) -> Result<Self, CryptoError> {
        let mut parsed = BTreeMap::new();
        for (name, bytes) in keys {
            let version: KeyVersion = name.parse()?;
            let array: [u8; ROOT_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| CryptoError::BadKeyLength {
                version,
                len: bytes.len(),
            })?;
            let bytes = Zeroizing::new(array);
            let fingerprint = KeyFingerprint::of(&bytes);
            parsed.insert(version, RootKey { bytes, fingerprint });
        }
        if parsed.is_empty() {
            return Err(CryptoError::NoKeys);
        }
        let active: KeyVersion = active.parse()?;
        Self::check(parsed, active)
    }

    fn check(keys: BTreeMap<KeyVersion, RootKey>, active: KeyVersion) -> Result<Self, CryptoError> {
        if keys.is_empty() {
            return Err(CryptoError::NoKeys);
        }
        if !keys.contains_key(&active) {
            return Err(CryptoError::ActiveMissing(active));
        }
        Ok(Self { keys, active })
    }

    /// The version used for all new sealing.
    pub fn active_version(&self) -> KeyVersion {
        self.active
    }

    /// Makes another held version the active one.
    pub fn set_active(&mut self, version: KeyVersion) -> Result<(), CryptoError> {
        if !self.keys.contains_key(&version) {
            return Err(CryptoError::ActiveMissing(version));
        }
        self.active = version;
        Ok(())
    }

    /// Every held version, ascending.
    pub fn versions(&self) -> impl Iterator<Item = KeyVersion> + '_ {
        self.keys.keys().copied()
    }

    /// Whether the keyring holds `version`.
    pub fn contains(&self, version: KeyVersion) -> bool {
        self.keys.contains_key(&version)
    }

    /// The fingerprint of `version`'s key, if held.
    pub fn fingerprint(&self, version: KeyVersion) -> Option<KeyFingerprint> {
        self.keys.get(&version).map(|k| k.fingerprint)
    }

    /// The fingerprint of the active key.
    pub fn active_fingerprint(&self) -> KeyFingerprint {
        // `check` guarantees the active version is present; fall back to a
        // fingerprint of nothing rather than panicking.
        self.fingerprint(self.active).unwrap_or(KeyFingerprint([0u8; 8]))
    }

    /// The raw key of `version`, for derivation inside this module only.
    pub(crate) fn root_key(&self, version: KeyVersion) -> Result<&[u8; ROOT_KEY_LEN], CryptoError> {
        self.keys
            .get(&version)
            .map(|k| &*k.bytes)
            .ok_or(CryptoError::UnknownKeyVersion(version))
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Fingerprints<'a>(&'a BTreeMap<KeyVersion, RootKey>);
        impl fmt::Debug for Fingerprints<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(v, k)| (v, k.fingerprint)))
                    .finish()
            }
        }
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("fingerprints", &Fingerprints(&self.keys))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testutil::{key_bytes, keyring};

    fn data(entries: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    #[test]
    fn version_text_form_round_trips_and_rejects_non_canonical_names() {
        for n in [1u32, 2, 10, 4_294_967_295] {
            let v = KeyVersion::new(n).unwrap();
            assert_eq!(v.to_string().parse::<KeyVersion>().unwrap(), v);
        }
        for bad in [
            "",
            "v",
            "v0",
            "v01",
            "1",
            "V1",
            "v-1",
            "v+1",
            "v1 ",
            "v4294967296",
            "key1",
            "v1a",
        ] {
            assert!(
                matches!(bad.parse::<KeyVersion>(), Err(CryptoError::BadVersionName(_))),
                "{bad:?} was accepted as a key version"
            );
        }
    }

    #[test]
    fn keyring_from_entries_accepts_valid_input() {
        let ring = Keyring::new(
            data(&[("v1", key_bytes(1).to_vec()), ("v2", key_bytes(2).to_vec())]),
            "v2",
        )
        .unwrap();
        assert_eq!(ring.active_version().get(), 2);
        assert_eq!(ring.versions().map(KeyVersion::get).collect::<Vec<_>>(), vec![1, 2]);
        assert_ne!(
            ring.fingerprint(KeyVersion::new(1).unwrap()),
            ring.fingerprint(KeyVersion::new(2).unwrap())
        );
        assert_eq!(ring.active_fingerprint().to_string().len(), 16);
    }

    #[test]
    fn keyring_errors_name_the_problem() {
        assert_eq!(Keyring::new(BTreeMap::new(), "v1").unwrap_err(), CryptoError::NoKeys);
        assert!(matches!(
            Keyring::new(data(&[("key1", key_bytes(1).to_vec())]), "v1").unwrap_err(),
            CryptoError::BadVersionName(n) if n == "key1"
        ));
        let short = Keyring::new(data(&[("v3", vec![7u8; 31])]), "v3").unwrap_err();
        assert_eq!(
            short,
            CryptoError::BadKeyLength {
                version: KeyVersion::new(3).unwrap(),
                len: 31
            }
        );
        assert!(
            short.to_string().contains("v3"),
            "error does not name the version: {short}"
        );
        assert!(matches!(
            Keyring::new(data(&[("v1", vec![7u8; 33])]), "v1").unwrap_err(),
            CryptoError::BadKeyLength { len: 33, .. }
        ));
        assert_eq!(
            Keyring::new(data(&[("v1", key_bytes(1).to_vec())]), "v2").unwrap_err(),
            CryptoError::ActiveMissing(KeyVersion::new(2).unwrap())
        );
        assert!(matches!(
            Keyring::new(data(&[("v1", key_bytes(1).to_vec())]), "two").unwrap_err(),
            CryptoError::BadVersionName(_)
        ));
    }

    #[test]
    fn keyring_from_secret_data_reads_active_entry() {
        let ring = Keyring::from_secret_data(data(&[
            ("v1", key_bytes(1).to_vec()),
            ("v2", key_bytes(2).to_vec()),
            ("active", b"v1\n".to_vec()),
        ]))
        .unwrap();
        assert_eq!(ring.active_version().get(), 1);
        assert_eq!(
            Keyring::from_secret_data(data(&[("v1", key_bytes(1).to_vec())])).unwrap_err(),
            CryptoError::ActiveNotSet
        );
    }

    #[test]
    fn set_active_requires_a_held_version() {
        let mut ring = keyring(&[1, 2], 1);
        ring.set_active(KeyVersion::new(2).unwrap()).unwrap();
        assert_eq!(ring.active_version().get(), 2);
        assert!(ring.set_active(KeyVersion::new(9).unwrap()).is_err());
    }

    #[test]
    fn keyring_debug_shows_versions_and_fingerprints_but_no_key_bytes() {
        let ring = keyring(&[1, 2], 2);
        let shown = format!("{ring:?} {ring:#?}");
        assert!(shown.contains("v1") && shown.contains("v2"), "{shown}");
        assert!(shown.contains(&ring.active_fingerprint().to_string()), "{shown}");
        for n in [1u32, 2] {
            crate::crypto::testutil::assert_no_key_bytes(&shown, &key_bytes(n));
        }
    }

    #[test]
    fn generated_root_keys_differ() {
        assert_ne!(*generate_root_key(), *generate_root_key());
    }
}
