//! Known-answer tests for the primitives, run through the same crate APIs
//! the module uses (`hkdf::Hkdf<Sha256>`, `aes_gcm::Aes256Gcm` with
//! `encrypt_in_place_detached`/`decrypt_in_place_detached`).
//!
//! HKDF: RFC 5869 Appendix A, test cases 1-3 (SHA-256).
//! AES-256-GCM: "The Galois/Counter Mode of Operation" (McGrew & Viega),
//! Appendix B, test cases 13-16 (the 256-bit key cases).

use super::gcm::Gcm;
use super::{NONCE_LEN, TAG_LEN};
use hkdf::Hkdf;
use sha2::Sha256;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test vector hex")
}

fn range(from: u8, to_inclusive: u8) -> Vec<u8> {
    (from..=to_inclusive).collect()
}

fn check_hkdf(case: &str, ikm: &[u8], salt: &[u8], info: &[u8], prk: &str, okm: &str) {
    // RFC 5869: an absent salt is HashLen zero bytes; hkdf takes `None` for it.
    let salt = (!salt.is_empty()).then_some(salt);
    let (got_prk, hk) = Hkdf::<Sha256>::extract(salt, ikm);
    assert_eq!(hex::encode(got_prk), prk, "RFC 5869 {case}: PRK");
    let mut got = vec![0u8; okm.len() / 2];
    hk.expand(info, &mut got).expect("length within limit");
    assert_eq!(hex::encode(&got), okm, "RFC 5869 {case}: OKM");
}

#[test]
fn rfc5869_test_case_1() {
    check_hkdf(
        "A.1",
        &[0x0b; 22],
        &range(0x00, 0x0c),
        &range(0xf0, 0xf9),
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    );
}

#[test]
fn rfc5869_test_case_2() {
    check_hkdf(
        "A.2",
        &range(0x00, 0x4f),
        &range(0x60, 0xaf),
        &range(0xb0, 0xff),
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
         59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
         cc30c58179ec3e87c14c01d5c1f3434f1d87",
    );
}

#[test]
fn rfc5869_test_case_3() {
    check_hkdf(
        "A.3",
        &[0x0b; 22],
        &[],
        &[],
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    );
}

fn tag_bytes(tag: &str) -> [u8; TAG_LEN] {
    h(tag).try_into().expect("a 16-byte tag")
}

fn check_gcm(case: &str, key: &str, iv: &str, pt: &str, aad: &str, ct: &str, tag: &str) {
    let key: [u8; 32] = h(key).try_into().expect("a 32-byte key");
    let cipher = Gcm::new(&key);
    let iv: [u8; NONCE_LEN] = h(iv).try_into().expect("a 12-byte IV");
    let nonce = &iv;
    let aad = h(aad);

    let mut buf = h(pt);
    let got_tag = cipher.seal(nonce, &aad, &mut buf).expect("encrypt");
    assert_eq!(hex::encode(&buf), ct, "GCM {case}: ciphertext");
    assert_eq!(hex::encode(got_tag), tag, "GCM {case}: tag");

    cipher
        .open(nonce, &aad, &mut buf, &tag_bytes(tag))
        .expect("known-answer ciphertext must open");
    assert_eq!(hex::encode(&buf), pt, "GCM {case}: decrypted plaintext");

    let mut bad_tag = tag_bytes(tag);
    bad_tag[0] ^= 1;
    let mut ct_buf = h(ct);
    assert!(
        cipher.open(nonce, &aad, &mut ct_buf, &bad_tag).is_err(),
        "GCM {case}: a wrong tag was accepted"
    );
}

const K15: &str = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
const IV15: &str = "cafebabefacedbaddecaf888";
const P15: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                   1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
const C15: &str = "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                   8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015ad";

#[test]
fn gcm_spec_test_case_13() {
    check_gcm(
        "13",
        &"00".repeat(32),
        &"00".repeat(12),
        "",
        "",
        "",
        "530f8afbc74536b9a963b4f1c4cb738b",
    );
}

#[test]
fn gcm_spec_test_case_14() {
    check_gcm(
        "14",
        &"00".repeat(32),
        &"00".repeat(12),
        &"00".repeat(16),
        "",
        "cea7403d4d606b6e074ec5d3baf39d18",
        "d0d1c8a799996bf0265b98b5d48ab919",
    );
}

#[test]
fn gcm_spec_test_case_15() {
    check_gcm("15", K15, IV15, P15, "", C15, "b094dac5d93471bdec1a502270e3cc6c");
}

#[test]
fn gcm_spec_test_case_16() {
    // Same key and IV as 15, 60-byte plaintext, 20 bytes of AAD.
    check_gcm(
        "16",
        K15,
        IV15,
        &P15[..120],
        "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        &C15[..120],
        "76fc6ece0f4e1768cddf8853bb2d551b",
    );
}
