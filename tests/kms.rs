//! KMS-wrapped root keys against a real KMS API: moto's server on loopback,
//! started by `scripts/with-moto.sh` (which `scripts/test.sh` wraps around
//! the test command) and found through `TEST_KMS_ENDPOINT`.
//!
//! Without `TEST_KMS_ENDPOINT` these tests print why and pass, except in CI
//! (`CI` set), where a missing server is a failure.

use std::collections::BTreeMap;
use std::io::Write;

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use tenant_operator::crypto::{self, generate_root_key, Keyring, Purpose, TenantSalt};
use tenant_operator::keys::kms::{self, KmsConfig, KmsError, ENCRYPTION_CONTEXT_KEY};
use zeroize::Zeroizing;

const UID: &str = "0b9e7f7c-2a51-4d4e-9b1f-3c2d1e0f9a8b";

/// The moto endpoint, or None (after saying so) when the tests should skip.
fn endpoint(test: &str) -> Option<String> {
    match std::env::var("TEST_KMS_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ => {
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            assert!(
                !ci,
                "TEST_KMS_ENDPOINT is not set but CI is: the KMS tests must run inside \
                 scripts/with-moto.sh (scripts/test.sh does this)"
            );
            // Straight to stderr, past the test harness's capture, so the
            // skip shows in a normal run.
            let _ = writeln!(
                std::io::stderr(),
                "skipping {test}: TEST_KMS_ENDPOINT is not set (run the tests through \
                 scripts/with-moto.sh, or `make test`)"
            );
            None
        }
    }
}

fn region() -> String {
    std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_owned())
}

fn config(endpoint: &str) -> KmsConfig {
    KmsConfig {
        endpoint: Some(endpoint.to_owned()),
        ..KmsConfig::new(region())
    }
}

/// A plain client for test set-up (CreateKey, DisableKey), independent of
/// the code under test.
fn admin(endpoint: &str) -> aws_sdk_kms::Client {
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region()))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    aws_sdk_kms::Client::from_conf(conf)
}

/// A fresh symmetric KMS key; returns its id.
async fn create_key(endpoint: &str, what: &str) -> String {
    let out = admin(endpoint)
        .create_key()
        .description(format!("tenant-operator test: {what}"))
        .send()
        .await
        .expect("CreateKey on the test KMS");
    out.key_metadata()
        .map(|m| m.key_id().to_owned())
        .expect("CreateKey returned key metadata")
}

fn assert_no_key_material(shown: &str, key: &[u8]) {
    let hex = hex::encode(key);
    for window in hex.as_bytes().chunks(8) {
        let w = std::str::from_utf8(window).unwrap();
        assert!(!shown.contains(w), "key bytes leaked into: {shown}");
    }
}

#[tokio::test]
async fn wrapped_keys_unwrap_into_a_keyring_that_seals_and_opens() {
    let Some(ep) = endpoint("wrapped_keys_unwrap_into_a_keyring_that_seals_and_opens") else {
        return;
    };
    let cfg = config(&ep);
    let key_id = create_key(&ep, "round trip").await;
    let v1 = generate_root_key();
    let v2 = generate_root_key();

    let mut wrapped = BTreeMap::new();
    for (version, key) in [("v1", &v1), ("v2", &v2)] {
        let blob = kms::wrap_key(&cfg, &key_id, version, key.as_slice())
            .await
            .unwrap_or_else(|e| panic!("wrapping {version}: {e}"));
        assert!(
            !blob.windows(8).any(|w| key.windows(8).any(|k| k == w)),
            "the wrapped blob of {version} contains plaintext key bytes"
        );
        wrapped.insert(version.to_owned(), blob);
    }
    // The Secret's `active` entry may be passed along; it is skipped.
    wrapped.insert("active".to_owned(), b"v2".to_vec());

    let unwrapped = kms::unwrap_keys(&cfg, &wrapped).await.expect("unwrap_keys");
    assert_eq!(
        unwrapped.keys().map(String::as_str).collect::<Vec<_>>(),
        ["v1", "v2"],
        "unwrap_keys should return exactly the version entries"
    );
    assert_eq!(unwrapped["v1"].as_slice(), v1.as_slice(), "v1 came back different");
    assert_eq!(unwrapped["v2"].as_slice(), v2.as_slice(), "v2 came back different");

    // Pinning the expected KMS key works too.
    let pinned = KmsConfig {
        key_id: Some(key_id.clone()),
        ..cfg.clone()
    };
    let again = kms::unwrap_keys(&pinned, &wrapped).await.expect("unwrap with key id");
    assert_eq!(again["v2"].as_slice(), v2.as_slice());

    // The unwrapped map feeds the keyring, which seals and opens.
    let entries: BTreeMap<String, Vec<u8>> = unwrapped.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
    let ring = Keyring::new(entries, "v2").expect("keyring from unwrapped keys");
    assert_eq!(ring.active_version().to_string(), "v2");
    let salt = TenantSalt::generate();
    let sealed = crypto::seal(&ring, &salt, UID, Purpose::Secrets, "db-password", b"hunter2").expect("seal");
    let opened: Zeroizing<Vec<u8>> =
        crypto::open(&ring, &salt, UID, Purpose::Secrets, "db-password", &sealed).expect("open");
    assert_eq!(opened.as_slice(), b"hunter2");

    // The same envelope opens with a keyring built straight from the raw keys.
    let raw: BTreeMap<String, Vec<u8>> = [("v1", v1.to_vec()), ("v2", v2.to_vec())]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let raw_ring = Keyring::new(raw, "v1").unwrap();
    let opened =
        crypto::open(&raw_ring, &salt, UID, Purpose::Secrets, "db-password", &sealed).expect("open with the raw keys");
    assert_eq!(opened.as_slice(), b"hunter2");
}

#[tokio::test]
async fn a_key_wrapped_for_v1_does_not_unwrap_as_v2() {
    let Some(ep) = endpoint("a_key_wrapped_for_v1_does_not_unwrap_as_v2") else {
        return;
    };
    let cfg = config(&ep);
    let key_id = create_key(&ep, "moved version").await;
    let v1 = generate_root_key();
    let blob = kms::wrap_key(&cfg, &key_id, "v1", v1.as_slice()).await.unwrap();

    let moved = BTreeMap::from([("v2".to_owned(), blob.clone())]);
    let err = kms::unwrap_keys(&cfg, &moved)
        .await
        .expect_err("a key wrapped for v1 unwrapped under the name v2");
    assert!(
        matches!(&err, KmsError::InvalidCiphertext { version } if version == "v2"),
        "expected InvalidCiphertext for v2, got: {err:?}"
    );
    let shown = err.to_string();
    eprintln!("moved version: {shown}");
    assert!(
        shown.contains("v2") && shown.contains(ENCRYPTION_CONTEXT_KEY),
        "the error should name the version and the encryption context: {shown}"
    );
    assert_no_key_material(&shown, v1.as_slice());

    // Kept under its own name it still unwraps, alongside the bad one it fails.
    let both = BTreeMap::from([("v1".to_owned(), blob.clone()), ("v2".to_owned(), blob)]);
    let err = kms::unwrap_keys(&cfg, &both).await.unwrap_err();
    assert!(
        matches!(&err, KmsError::InvalidCiphertext { version } if version == "v2"),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_ciphertext_fails_clearly() {
    let Some(ep) = endpoint("garbage_ciphertext_fails_clearly") else {
        return;
    };
    let cfg = config(&ep);
    let _ = create_key(&ep, "garbage").await;
    for garbage in [vec![0u8; 64], (0u8..=255).collect::<Vec<_>>(), b"not base64 !".to_vec()] {
        let wrapped = BTreeMap::from([("v3".to_owned(), garbage)]);
        let err = kms::unwrap_keys(&cfg, &wrapped).await.expect_err("garbage unwrapped");
        // AWS answers InvalidCiphertext; a blob that names no key it knows can
        // also come back as AccessDenied (moto does this for random bytes).
        assert!(
            matches!(
                &err,
                KmsError::InvalidCiphertext { version } | KmsError::AccessDenied { version, .. }
                    if version == "v3"
            ),
            "expected InvalidCiphertext or AccessDenied for v3, got: {err:?}"
        );
        assert!(err.to_string().contains("v3"), "{err}");
    }
    // A valid ciphertext with one byte flipped is refused the same way.
    let key_id = create_key(&ep, "flipped").await;
    let mut blob = kms::wrap_key(&cfg, &key_id, "v1", &[7u8; 32]).await.unwrap();
    let last = blob.len() - 1;
    blob[last] ^= 0x01;
    let err = kms::unwrap_keys(&cfg, &BTreeMap::from([("v1".to_owned(), blob)]))
        .await
        .unwrap_err();
    assert!(matches!(&err, KmsError::InvalidCiphertext { .. }), "{err:?}");
}

#[tokio::test]
async fn a_blob_from_another_kms_key_is_refused_when_the_key_is_pinned() {
    let Some(ep) = endpoint("a_blob_from_another_kms_key_is_refused_when_the_key_is_pinned") else {
        return;
    };
    let cfg = config(&ep);
    let ours = create_key(&ep, "pinned").await;
    let theirs = create_key(&ep, "foreign").await;
    let blob = kms::wrap_key(&cfg, &theirs, "v1", &[9u8; 32]).await.unwrap();
    let pinned = KmsConfig {
        key_id: Some(ours),
        ..cfg
    };
    let err = kms::unwrap_keys(&pinned, &BTreeMap::from([("v1".to_owned(), blob)]))
        .await
        .expect_err("a blob wrapped under another KMS key unwrapped with the key pinned");
    // AWS answers IncorrectKeyException (WrongKey); moto AccessDenied.
    assert!(
        matches!(
            &err,
            KmsError::WrongKey { version, .. } | KmsError::AccessDenied { version, .. }
                if version == "v1"
        ),
        "expected WrongKey or AccessDenied for v1, got: {err:?}"
    );
}

#[tokio::test]
async fn an_unknown_kms_key_is_reported() {
    let Some(ep) = endpoint("an_unknown_kms_key_is_reported") else {
        return;
    };
    let cfg = config(&ep);
    let err = kms::wrap_key(&cfg, "11111111-2222-3333-4444-555555555555", "v1", &[1u8; 32])
        .await
        .expect_err("wrapped under a key that does not exist");
    assert!(
        matches!(&err, KmsError::KeyUnusable { version, .. } if version == "v1"),
        "expected KeyUnusable (NotFound), got: {err:?}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_clearly() {
    // Needs only the credentials that with-moto exports, not moto itself.
    if endpoint("an_unreachable_endpoint_fails_clearly").is_none() {
        return;
    }
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let cfg = config(&dead);
    let started = std::time::Instant::now();
    let err = kms::unwrap_keys(&cfg, &BTreeMap::from([("v1".to_owned(), vec![1u8; 100])]))
        .await
        .expect_err("unwrapped through a dead endpoint");
    match &err {
        KmsError::Unreachable {
            op, version, endpoint, ..
        } => {
            assert_eq!(*op, "Decrypt");
            assert_eq!(version, "v1");
            assert_eq!(endpoint, &dead);
        }
        other => panic!("expected Unreachable, got: {other:?}"),
    }
    let shown = err.to_string();
    eprintln!("unreachable endpoint: {shown}");
    assert!(shown.contains(&dead) && shown.contains("v1"), "{shown}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "giving up on a dead endpoint took {:?}",
        started.elapsed()
    );
}
