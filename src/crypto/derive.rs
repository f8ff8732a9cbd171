//! Tenant key derivation: HKDF-SHA256 from a root key, the tenant's salt,
//! its uid, the purpose and the root key version.
//!
//! Takes a [`Keyring`], a [`TenantSalt`] and a uid; gives a [`TenantKey`]
//! (zeroized on drop, never printed). Pure apart from the CSPRNG used by
//! [`TenantSalt::generate`].

use std::fmt;
use std::str::FromStr;

use hkdf::Hkdf;
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keyring::{KeyVersion, Keyring};
use super::{validate_tenant_uid, CryptoError};

/// Length of a tenant salt in bytes.
pub const TENANT_SALT_LEN: usize = 32;

/// What a tenant key is used for. Distinct purposes never share a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purpose {
    /// Sealing the tenant's secrets (envelopes in `tenant-<name>-sealed`).
    Secrets,
    /// Encrypting the tenant's backups (the streaming format).
    Backup,
    /// The password of the tenant's ops login role (`tenant_<x>_ops`),
    /// derived, never stored ([`super::login_password`]).
    Login,
    /// Keying the anchors of the tenant's audit chain (HMAC-SHA256).
    Audit,
}

impl Purpose {
    /// Every purpose.
    pub const ALL: [Purpose; 4] = [Purpose::Secrets, Purpose::Backup, Purpose::Login, Purpose::Audit];

    /// The text form used in the HKDF info string and in AADs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Purpose::Secrets => "secrets",
            Purpose::Backup => "backup",
            Purpose::Login => "login",
            Purpose::Audit => "audit",
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Purpose {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "secrets" => Ok(Purpose::Secrets),
            "backup" => Ok(Purpose::Backup),
            "login" => Ok(Purpose::Login),
            "audit" => Ok(Purpose::Audit),
            other => Err(format!(
                "unknown key purpose {other:?}: expected secrets, backup, login or audit"
            )),
        }
    }
}

/// A tenant's 32-byte random salt, stored in the registry. Deleting every
/// copy of it is what crypto-shreds the tenant. Not key material by itself,
/// but kept out of logs all the same (`Debug` is redacted) and zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantSalt(Zeroizing<[u8; TENANT_SALT_LEN]>);

impl TenantSalt {
    /// A fresh salt from the operating system's CSPRNG (via `rand`'s thread RNG).
    pub fn generate() -> Self {
        let mut salt = Zeroizing::new([0u8; TENANT_SALT_LEN]);
        rand::rng().fill_bytes(salt.as_mut());
        Self(salt)
    }

    /// A salt read back from storage; must be exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let array: [u8; TENANT_SALT_LEN] = bytes.try_into().map_err(|_| CryptoError::BadSaltLength(bytes.len()))?;
        Ok(Self(Zeroizing::new(array)))
    }

    /// The bytes, for storing in the registry.
    pub fn as_bytes(&self) -> &[u8; TENANT_SALT_LEN] {
        &self.0
    }

    /// The bytes as a new vector (for database drivers that want owned data).
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl TryFrom<&[u8]> for TenantSalt {
    type Error = CryptoError;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        Self::from_bytes(bytes)
    }
}

impl fmt::Debug for TenantSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TenantSalt(<redacted>)")
    }
}

/// A derived 32-byte tenant key for one purpose under one root key version.
pub struct TenantKey {
    key: Zeroizing<[u8; 32]>,
    version: KeyVersion,
    purpose: Purpose,
}

impl Clone for TenantKey {
    fn clone(&self) -> Self {
        Self {
            key: Zeroizing::new(*self.key),
            version: self.version,
            purpose: self.purpose,
        }
    }
}

impl TenantKey {
    /// A tenant key handed over as bytes rather than derived here: what a
    /// backup or restore Job gets instead of the root keys (the operator
    /// derived it and wrote it into the Job's Secret). Must be 32 bytes.
    pub fn from_bytes(bytes: &[u8], version: KeyVersion, purpose: Purpose) -> Result<Self, CryptoError> {
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKeyLength {
            version,
            len: bytes.len(),
        })?;
        Ok(Self {
            key: Zeroizing::new(key),
            version,
            purpose,
        })
    }

    /// The key as 64 lower-case hex characters, for handing it to a Job
    /// (zeroized on drop).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.key.as_ref()))
    }

    /// The root key version it was derived from.
    pub fn version(&self) -> KeyVersion {
        self.version
    }

    /// Its purpose.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The key bytes; crate-internal so key material stays in this module's
    /// callers' reach only through the sealing APIs.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.key
    }
}

impl fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKey")
            .field("version", &self.version)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// The HKDF info string: `tenancy.dev/v1 tenant=<uid> purpose=<purpose> key=v<N>`.
///
/// Unambiguous because the uid has no spaces and the purpose and version
/// have fixed forms.
pub fn hkdf_info(tenant_uid: &str, purpose: Purpose, version: KeyVersion) -> String {
    format!("tenancy.dev/v1 tenant={tenant_uid} purpose={purpose} key={version}")
}

/// HKDF-SHA256(ikm = root key, salt = tenant salt, info) -> 32 bytes.
pub(crate) fn derive_from_root(
    root: &[u8; 32],
    version: KeyVersion,
    salt: &TenantSalt,
    tenant_uid: &str,
    purpose: Purpose,
) -> Result<TenantKey, CryptoError> {
    validate_tenant_uid(tenant_uid)?;
    let info = hkdf_info(tenant_uid, purpose, version);
    let hk = Hkdf::<Sha256>::new(Some(salt.as_bytes()), root);
    let mut key = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
    hk.expand(info.as_bytes(), key.as_mut())
        .map_err(|_| CryptoError::TooLong {
            what: "HKDF output",
            len: 32,
            max: 255 * 32,
        })?;
    Ok(TenantKey { key, version, purpose })
}

impl Keyring {
    /// Derives the tenant key for `purpose` under root key `version`.
    /// Errors with `UnknownKeyVersion` when the keyring lacks that version.
    pub fn derive_tenant_key(
        &self,
        version: KeyVersion,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
    ) -> Result<TenantKey, CryptoError> {
        derive_from_root(self.root_key(version)?, version, salt, tenant_uid, purpose)
    }

    /// Derives the tenant key for `purpose` under the active root key.
    pub fn derive_active_tenant_key(
        &self,
        salt: &TenantSalt,
        tenant_uid: &str,
        purpose: Purpose,
    ) -> Result<TenantKey, CryptoError> {
        self.derive_tenant_key(self.active_version(), salt, tenant_uid, purpose)
    }
}

/// The password of a tenant's ops login role (`tenant_<x>_ops`): the
/// tenant's `login` key under root key `version`, as 64 lower-case hex
/// characters (256 bits: no key stretching needed, no quoting in a URI).
/// Stored nowhere: whoever holds the root keys derives it again, and it
/// changes when the active root key does.
pub fn login_password(
    ring: &Keyring,
    version: KeyVersion,
    salt: &TenantSalt,
    tenant_uid: &str,
) -> Result<Zeroizing<String>, CryptoError> {
    let key = ring.derive_tenant_key(version, salt, tenant_uid, Purpose::Login)?;
    Ok(Zeroizing::new(hex::encode(key.bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testutil::{assert_no_key_bytes, key_bytes, keyring, salt};

    const UID: &str = "0b9e7f7c-2a51-4d4e-9b1f-3c2d1e0f9a8b";

    fn v(n: u32) -> KeyVersion {
        KeyVersion::new(n).unwrap()
    }

    #[test]
    fn a_key_handed_over_as_bytes_is_the_derived_key() {
        let ring = keyring(&[1], 1);
        let key = ring.derive_tenant_key(v(1), &salt(9), UID, Purpose::Backup).unwrap();
        let hex = key.to_hex();
        let back = TenantKey::from_bytes(&hex::decode(hex.as_str()).unwrap(), v(1), Purpose::Backup).unwrap();
        assert_eq!(back.bytes(), key.bytes());
        assert!(TenantKey::from_bytes(&[0u8; 31], v(1), Purpose::Backup).is_err());
        assert!(!format!("{back:?}").contains(&hex[..16]), "Debug shows key bytes");
    }

    #[test]
    fn info_string_has_the_documented_form() {
        assert_eq!(
            hkdf_info("abc-123", Purpose::Backup, v(7)),
            "tenancy.dev/v1 tenant=abc-123 purpose=backup key=v7"
        );
    }

    #[test]
    fn derivation_matches_a_direct_hkdf_computation() {
        let ring = keyring(&[1], 1);
        let key = ring.derive_tenant_key(v(1), &salt(9), UID, Purpose::Secrets).unwrap();
        let hk = Hkdf::<Sha256>::new(Some(&[9u8; 32]), &key_bytes(1));
        let mut expected = [0u8; 32];
        hk.expand(
            format!("tenancy.dev/v1 tenant={UID} purpose=secrets key=v1").as_bytes(),
            &mut expected,
        )
        .unwrap();
        assert_eq!(key.bytes(), &expected);
    }

    #[test]
    fn same_inputs_give_the_same_key() {
        let ring = keyring(&[1, 2], 2);
        let a = ring.derive_tenant_key(v(2), &salt(1), UID, Purpose::Backup).unwrap();
        let b = ring.derive_tenant_key(v(2), &salt(1), UID, Purpose::Backup).unwrap();
        assert_eq!(a.bytes(), b.bytes());
        let c = ring.derive_active_tenant_key(&salt(1), UID, Purpose::Backup).unwrap();
        assert_eq!(a.bytes(), c.bytes());
    }

    #[test]
    fn every_input_changes_the_key() {
        let ring = keyring(&[1, 2], 2);
        let base = ring.derive_tenant_key(v(1), &salt(1), UID, Purpose::Secrets).unwrap();
        let variants = [
            ("purpose", ring.derive_tenant_key(v(1), &salt(1), UID, Purpose::Backup)),
            (
                "tenant uid",
                ring.derive_tenant_key(v(1), &salt(1), "other-uid", Purpose::Secrets),
            ),
            ("salt", ring.derive_tenant_key(v(1), &salt(2), UID, Purpose::Secrets)),
            (
                "key version",
                ring.derive_tenant_key(v(2), &salt(1), UID, Purpose::Secrets),
            ),
        ];
        for (what, key) in variants {
            assert_ne!(
                base.bytes(),
                key.unwrap().bytes(),
                "changing the {what} kept the same key"
            );
        }
    }

    #[test]
    fn same_root_bytes_under_another_version_label_give_another_key() {
        // The version is in the info string, not only in the choice of root key.
        let root = key_bytes(1);
        let a = derive_from_root(&root, v(1), &salt(1), UID, Purpose::Secrets).unwrap();
        let b = derive_from_root(&root, v(2), &salt(1), UID, Purpose::Secrets).unwrap();
        assert_ne!(a.bytes(), b.bytes());
    }

    #[test]
    fn unknown_version_and_bad_uid_are_errors() {
        let ring = keyring(&[1], 1);
        assert_eq!(
            ring.derive_tenant_key(v(5), &salt(1), UID, Purpose::Secrets)
                .unwrap_err(),
            CryptoError::UnknownKeyVersion(v(5))
        );
        for bad in ["", "has space", "tab\t", "ü", &"x".repeat(129)] {
            assert!(
                matches!(
                    ring.derive_tenant_key(v(1), &salt(1), bad, Purpose::Secrets),
                    Err(CryptoError::InvalidTenantUid(_))
                ),
                "uid {bad:?} was accepted"
            );
        }
    }

    #[test]
    fn salt_length_is_checked_and_generation_is_random() {
        assert_eq!(
            TenantSalt::from_bytes(&[0u8; 31]).unwrap_err(),
            CryptoError::BadSaltLength(31)
        );
        assert_eq!(
            TenantSalt::from_bytes(&[0u8; 33]).unwrap_err(),
            CryptoError::BadSaltLength(33)
        );
        let s = TenantSalt::generate();
        assert_eq!(TenantSalt::from_bytes(&s.to_vec()).unwrap(), s);
        assert_ne!(TenantSalt::generate(), TenantSalt::generate());
    }

    #[test]
    fn tenant_key_and_salt_debug_show_no_secret_bytes() {
        let ring = keyring(&[1], 1);
        let key = ring.derive_tenant_key(v(1), &salt(0x5a), UID, Purpose::Backup).unwrap();
        let shown = format!("{key:?} {key:#?} {:?}", salt(0x5a));
        assert!(shown.contains("v1") && shown.contains("Backup"), "{shown}");
        assert_no_key_bytes(&shown, key.bytes());
        assert_no_key_bytes(&shown, &[0x5a; 32]);
    }

    #[test]
    fn login_passwords_differ_per_tenant_and_root_version_and_from_other_keys() {
        let ring = keyring(&[1, 2], 2);
        let a1 = login_password(&ring, v(1), &salt(1), UID).unwrap();
        let a2 = login_password(&ring, v(2), &salt(1), UID).unwrap();
        let b1 = login_password(&ring, v(1), &salt(2), UID).unwrap();
        assert_eq!(a1.len(), 64);
        assert!(a1.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(*a1, *a2);
        assert_ne!(*a1, *b1);
        assert_eq!(*a1, *login_password(&ring, v(1), &salt(1), UID).unwrap());
        let secrets = ring.derive_tenant_key(v(1), &salt(1), UID, Purpose::Secrets).unwrap();
        assert_ne!(*a1, hex::encode(secrets.bytes()));
    }

    #[test]
    fn purpose_text_round_trips() {
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>().unwrap(), p);
        }
        assert!("Backup".parse::<Purpose>().is_err());
    }
}
