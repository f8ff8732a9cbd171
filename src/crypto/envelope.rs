//! Envelopes: small secrets sealed with AES-256-GCM under the tenant's
//! `secrets` (or other purpose) key.
//!
//! Layout: `0x01 | key version u32 BE | 12-byte random nonce | ciphertext | 16-byte tag`.
//! The AAD binds format version, key version, tenant uid, purpose and the
//! secret's name, so an envelope moved anywhere else fails to open.
//! Pure apart from the CSPRNG used for nonces.

use rand::RngCore;
use zeroize::Zeroizing;

use super::derive::{Purpose, TenantKey, TenantSalt};
use super::gcm::Gcm;
use super::keyring::{KeyVersion, Keyring};
use super::{put_len_prefixed, validate_tenant_uid, CryptoError, NONCE_LEN, TAG_LEN};

/// Format version byte of envelopes.
pub const ENVELOPE_FORMAT_V1: u8 = 0x01;
/// Bytes an envelope adds to its plaintext: version byte, key version, nonce, tag.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Longest secret name accepted.
pub const MAX_ENVELOPE_NAME_LEN: usize = 1024;
/// Largest plaintext accepted (envelopes are for small secrets; a Kubernetes
/// Secret holds at most 1 MiB anyway).
pub const MAX_ENVELOPE_PLAINTEXT_LEN: usize = 16 << 20;

const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
const AAD_DOMAIN: &[u8] = b"tenancy.dev/v1 envelope";

/// The AAD: `lp(domain) | format byte | key version u32 BE | lp(uid) | lp(purpose) | lp(name)`
/// where `lp(x)` = `u32 BE length || x`.
fn envelope_aad(version: KeyVersion, tenant_uid: &str, purpose: Purpose, name: &str) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(4 + AAD_DOMAIN.len() + 1 + 4 + 12 + tenant_uid.len() + purpose.as_str().len() + name.len());
    put_len_prefixed(&mut aad, AAD_DOMAIN);
    aad.push(ENVELOPE_FORMAT_V1);
    aad.extend_from_slice(&version.get().to_be_bytes());
    put_len_prefixed(&mut aad, tenant_uid.as_bytes());
    put_len_prefixed(&mut aad, purpose.as_str().as_bytes());
    put_len_prefixed(&mut aad, name.as_bytes());
    aad
}

fn check_name(name: &str) -> Result<(), CryptoError> {
    if name.len() > MAX_ENVELOPE_NAME_LEN {
        return Err(CryptoError::TooLong {
            what: "secret name",
            len: name.len(),
            max: MAX_ENVELOPE_NAME_LEN,
        });
    }
    Ok(())
}

fn cipher(key: &TenantKey) -> Gcm {
    Gcm::new(key.bytes())
}

/// Seals `plaintext` as the secret `name` of tenant `tenant_uid`, under the
/// keyring's active version, with a fresh random nonce.
pub fn seal(
    keyring: &Keyring,
    salt: &TenantSalt,
    tenant_uid: &str,
    purpose: Purpose,
    name: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    check_name(name)?;
    if plaintext.len() > MAX_ENVELOPE_PLAINTEXT_LEN {
        return Err(CryptoError::TooLong {
            what: "envelope plaintext",
            len: plaintext.len(),
            max: MAX_ENVELOPE_PLAINTEXT_LEN,
        });
    }
    let version = keyring.active_version();
    let key = keyring.derive_tenant_key(version, salt, tenant_uid, purpose)?;
    let aad = envelope_aad(version, tenant_uid, purpose, name);

    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);

    let mut out = Vec::with_capacity(ENVELOPE_OVERHEAD + plaintext.len());
    out.push(ENVELOPE_FORMAT_V1);
    out.extend_from_slice(&version.get().to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher(&key)
        .seal(&nonce, &aad, &mut out[HEADER_LEN..])
        .map_err(|_| CryptoError::TooLong {
            what: "envelope plaintext",
            len: plaintext.len(),
            max: MAX_ENVELOPE_PLAINTEXT_LEN,
        })?;
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Parses the fixed prefix: format byte, key version, minimum length.
fn parse_header(envelope: &[u8]) -> Result<KeyVersion, CryptoError> {
    let truncated = CryptoError::Truncated {
        kind: "envelope",
        len: envelope.len(),
        min: ENVELOPE_OVERHEAD,
    };
    let format = *envelope.first().ok_or(truncated.clone())?;
    if format != ENVELOPE_FORMAT_V1 {
        return Err(CryptoError::UnsupportedFormat {
            kind: "envelope",
            version: format,
        });
    }
    if envelope.len() < ENVELOPE_OVERHEAD {
        return Err(truncated);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&envelope[1..5]);
    Ok(KeyVersion::from_wire(u32::from_be_bytes(version)))
}

/// The root key version an envelope was sealed under, without opening it
/// (for rotation bookkeeping: re-seal when it differs from the active one).
pub fn envelope_key_version(envelope: &[u8]) -> Result<KeyVersion, CryptoError> {
    parse_header(envelope)
}

/// Opens an envelope sealed by [`seal`] with the same salt, tenant uid,
/// purpose and name, using whichever key version the envelope names.
pub fn open(
    keyring: &Keyring,
    salt: &TenantSalt,
    tenant_uid: &str,
    purpose: Purpose,
    name: &str,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    validate_tenant_uid(tenant_uid)?;
    check_name(name)?;
    let version = parse_header(envelope)?;
    let key = keyring.derive_tenant_key(version, salt, tenant_uid, purpose)?;
    let aad = envelope_aad(version, tenant_uid, purpose, name);

    let nonce: &[u8; NONCE_LEN] = envelope[5..HEADER_LEN]
        .try_into()
        .map_err(|_| CryptoError::Authentication)?;
    let body = &envelope[HEADER_LEN..];
    let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| CryptoError::Authentication)?;
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    cipher(&key)
        .open(nonce, &aad, &mut plaintext, tag)
        .map_err(|_| CryptoError::Authentication)?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::testutil::{keyring, salt};
    use proptest::prelude::*;

    const UID: &str = "4f1c2b3a-0000-4000-8000-00000000aaaa";
    const OTHER_UID: &str = "4f1c2b3a-0000-4000-8000-00000000bbbb";
    const NAME: &str = "erp-credentials";

    fn sealed(ring: &Keyring, plaintext: &[u8]) -> Vec<u8> {
        seal(ring, &salt(1), UID, Purpose::Secrets, NAME, plaintext).unwrap()
    }

    fn open_default(ring: &Keyring, env: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        open(ring, &salt(1), UID, Purpose::Secrets, NAME, env)
    }

    #[test]
    fn round_trip_and_layout() {
        let ring = keyring(&[1, 2], 2);
        for pt in [&b""[..], b"x", b"hunter2 correct horse battery staple"] {
            let env = sealed(&ring, pt);
            assert_eq!(env.len(), ENVELOPE_OVERHEAD + pt.len());
            assert_eq!(env[0], ENVELOPE_FORMAT_V1);
            assert_eq!(&env[1..5], &2u32.to_be_bytes());
            assert_eq!(envelope_key_version(&env).unwrap().get(), 2);
            assert_eq!(open_default(&ring, &env).unwrap().as_slice(), pt);
        }
    }

    #[test]
    fn nonces_are_fresh_per_seal() {
        let ring = keyring(&[1], 1);
        assert_ne!(sealed(&ring, b"same"), sealed(&ring, b"same"));
    }

    #[test]
    fn every_single_byte_flip_fails_to_open() {
        let ring = keyring(&[1, 2], 2);
        let env = sealed(&ring, b"the database password");
        for pos in 0..env.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = env.clone();
                bad[pos] ^= mask;
                let err = open_default(&ring, &bad).expect_err("a flipped envelope opened");
                match pos {
                    0 => assert!(matches!(err, CryptoError::UnsupportedFormat { .. }), "{err}"),
                    1..=4 => assert!(
                        matches!(err, CryptoError::UnknownKeyVersion(_) | CryptoError::Authentication),
                        "byte {pos}: {err}"
                    ),
                    _ => assert_eq!(err, CryptoError::Authentication, "byte {pos}"),
                }
            }
        }
    }

    #[test]
    fn moved_envelopes_fail_authentication() {
        let ring = keyring(&[1, 2], 2);
        let env = sealed(&ring, b"secret");
        let cases = [
            (
                "another tenant",
                open(&ring, &salt(1), OTHER_UID, Purpose::Secrets, NAME, &env),
            ),
            (
                "another name",
                open(&ring, &salt(1), UID, Purpose::Secrets, "other-name", &env),
            ),
            (
                "another purpose",
                open(&ring, &salt(1), UID, Purpose::Backup, NAME, &env),
            ),
            ("another salt", open(&ring, &salt(2), UID, Purpose::Secrets, NAME, &env)),
        ];
        for (what, result) in cases {
            assert_eq!(
                result.expect_err(&format!("envelope opened under {what}")),
                CryptoError::Authentication,
                "{what}"
            );
        }
    }

    #[test]
    fn relabelled_key_version_fails_authentication() {
        let ring = keyring(&[1, 2], 2);
        let mut env = sealed(&ring, b"secret");
        env[1..5].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(open_default(&ring, &env).unwrap_err(), CryptoError::Authentication);
    }

    #[test]
    fn unknown_version_format_and_truncation_are_reported() {
        let ring = keyring(&[1, 2], 2);
        let env = sealed(&ring, b"secret");
        let only_v1 = keyring(&[1], 1);
        assert_eq!(
            open_default(&only_v1, &env).unwrap_err(),
            CryptoError::UnknownKeyVersion(KeyVersion::new(2).unwrap())
        );
        let mut wrong_format = env.clone();
        wrong_format[0] = 0x02;
        assert_eq!(
            open_default(&ring, &wrong_format).unwrap_err(),
            CryptoError::UnsupportedFormat {
                kind: "envelope",
                version: 2
            }
        );
        assert!(envelope_key_version(&wrong_format).is_err());
        for len in 0..env.len() {
            let err = open_default(&ring, &env[..len]).expect_err("a truncated envelope opened");
            if len < ENVELOPE_OVERHEAD {
                assert!(matches!(err, CryptoError::Truncated { .. }), "len {len}: {err}");
            } else {
                assert_eq!(err, CryptoError::Authentication, "len {len}");
            }
        }
        let mut extended = env.clone();
        extended.push(0);
        assert_eq!(open_default(&ring, &extended).unwrap_err(), CryptoError::Authentication);
    }

    #[test]
    fn old_envelopes_still_open_after_rotation() {
        let v1_active = keyring(&[1], 1);
        let old = sealed(&v1_active, b"sealed under v1");
        let rotated = keyring(&[1, 2], 2);
        assert_eq!(open_default(&rotated, &old).unwrap().as_slice(), b"sealed under v1");
        let resealed = sealed(&rotated, b"sealed under v1");
        assert_eq!(envelope_key_version(&old).unwrap().get(), 1);
        assert_eq!(envelope_key_version(&resealed).unwrap().get(), 2);
    }

    #[test]
    fn long_names_are_rejected() {
        let ring = keyring(&[1], 1);
        let name = "n".repeat(MAX_ENVELOPE_NAME_LEN + 1);
        assert!(matches!(
            seal(&ring, &salt(1), UID, Purpose::Secrets, &name, b"x"),
            Err(CryptoError::TooLong { .. })
        ));
    }

    #[test]
    fn aad_fields_are_length_prefixed() {
        // "ab"+"c" and "a"+"bc" must not encode alike.
        let v = KeyVersion::new(1).unwrap();
        assert_ne!(
            envelope_aad(v, "ab", Purpose::Secrets, "c"),
            envelope_aad(v, "a", Purpose::Secrets, "bc")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn envelope_round_trips(
            plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
            name in "[a-z0-9.-]{0,40}",
            backup in any::<bool>(),
        ) {
            let ring = keyring(&[1, 2], 2);
            let purpose = if backup { Purpose::Backup } else { Purpose::Secrets };
            let env = seal(&ring, &salt(3), UID, purpose, &name, &plaintext).unwrap();
            let opened = open(&ring, &salt(3), UID, purpose, &name, &env).unwrap();
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        }
    }
}
