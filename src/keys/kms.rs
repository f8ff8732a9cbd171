//! Root keys stored wrapped by AWS KMS.
//!
//! Takes a [`KmsConfig`] (region, optional endpoint and key id) and the
//! wrapped entries of the root-keys Secret (`v1`, `v2`, ...: KMS ciphertext
//! blobs). Gives the unwrapped 32-byte keys ([`unwrap_keys`]), or, for the
//! operator's `keys` CLI, a new wrapped blob ([`wrap_key`]).
//! Side effects: one KMS `Decrypt` (or `Encrypt`) call per key, over HTTPS
//! (or plain HTTP to a local test endpoint); reads the standard credential
//! variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN` from the environment.
//!
//! Every call carries the encryption context
//! `{"tenancy.dev/root-key": "<version>"}`. KMS binds the context into the
//! ciphertext, so a wrapped key copied to another version name in the Secret
//! fails to unwrap rather than silently becoming that version.
//!
//! The client is built by hand from `aws-sdk-kms` (no `aws-config`): static
//! credentials from the environment only; TLS through rustls with `ring`.
//! Errors name the version and the kind of failure, never key material.
//! The format is documented in `docs/root-keys.md`.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_smithy_http_client::tls;
use zeroize::Zeroizing;

use crate::crypto::KeyVersion;

/// The encryption-context key every wrapped root key is bound to; its value
/// is the version name (`v1`, `v2`, ...).
pub const ENCRYPTION_CONTEXT_KEY: &str = "tenancy.dev/root-key";

/// The Secret entry naming the active version; never a wrapped key.
const ACTIVE_ENTRY: &str = "active";

/// A TCP connect that takes longer than this fails the attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One HTTP attempt (connect, request, response).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// One operation, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per operation (the first one and two retries, with backoff).
const MAX_ATTEMPTS: u32 = 3;

/// Where and how to reach KMS.
#[derive(Clone, Debug)]
pub struct KmsConfig {
    /// KMS endpoint URL (e.g. a local test server); None: the AWS default
    /// endpoint of the region.
    pub endpoint: Option<String>,
    /// AWS region.
    pub region: String,
    /// The KMS key (id, ARN or alias) expected to have wrapped the root keys.
    /// When set, `Decrypt` is asked to use this key only, so a ciphertext
    /// made under any other key is refused. Required by [`wrap_key`]'s caller
    /// anyway; recommended for unwrapping.
    pub key_id: Option<String>,
}

impl KmsConfig {
    /// A configuration for `region` with the default endpoint and no key id.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            endpoint: None,
            region: region.into(),
            key_id: None,
        }
    }
}

/// Why wrapping or unwrapping failed. Every variant about one key names its
/// version; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The configuration cannot be used (empty region, missing credentials).
    #[error("KMS is not configured: {0}")]
    Config(String),
    /// A Secret entry is not a version name.
    #[error("wrapped root-key entry {0:?} is not a version name: expected `v<N>` (and `active`)")]
    BadVersion(String),
    /// No answer from the endpoint: connection refused, DNS, TLS, timeout.
    #[error(
        "KMS {op} of root key {version}: endpoint {endpoint} is unreachable \
         (after {MAX_ATTEMPTS} attempts): {detail}"
    )]
    Unreachable {
        /// `Decrypt` or `Encrypt`.
        op: &'static str,
        /// The root key version concerned.
        version: String,
        /// The endpoint tried.
        endpoint: String,
        /// What failed (connection, timeout), without secrets.
        detail: String,
    },
    /// KMS refused the caller: no permission on the key, or credentials
    /// unknown, expired or badly signed.
    #[error(
        "KMS {op} of root key {version}: access denied ({code}{}{message}): check the \
         operator's AWS credentials and the key policy (it needs kms:{op} on the key); \
         for Decrypt this also means the stored value names a KMS key that does not \
         exist or is in another account or region",
        if message.is_empty() { "" } else { ": " }
    )]
    AccessDenied {
        /// `Decrypt` or `Encrypt`.
        op: &'static str,
        /// The root key version concerned.
        version: String,
        /// The KMS error code.
        code: String,
        /// KMS's message.
        message: String,
    },
    /// KMS could not decrypt the blob: it is not a KMS ciphertext, was
    /// altered, or was wrapped for another version (encryption context).
    #[error(
        "KMS Decrypt of root key {version}: invalid ciphertext: the stored value is not a \
         KMS ciphertext, was modified, or was wrapped for another version name than \
         {version} (the encryption context {ENCRYPTION_CONTEXT_KEY}={version} does not match)"
    )]
    InvalidCiphertext {
        /// The root key version concerned.
        version: String,
    },
    /// The blob was wrapped under another KMS key than the configured one.
    #[error(
        "KMS Decrypt of root key {version}: it was wrapped under another KMS key than the \
         configured one: {message}"
    )]
    WrongKey {
        /// The root key version concerned.
        version: String,
        /// KMS's message.
        message: String,
    },
    /// The KMS key cannot be used: not found, disabled, pending deletion,
    /// or not a symmetric encryption key.
    #[error("KMS {op} of root key {version}: the KMS key is unusable ({code}): {message}")]
    KeyUnusable {
        /// `Decrypt` or `Encrypt`.
        op: &'static str,
        /// The root key version concerned.
        version: String,
        /// The KMS error code.
        code: String,
        /// KMS's message.
        message: String,
    },
    /// Any other failure of the call.
    #[error("KMS {op} of root key {version} failed: {detail}")]
    Failed {
        /// `Decrypt` or `Encrypt`.
        op: &'static str,
        /// The root key version concerned.
        version: String,
        /// The error chain, without secrets.
        detail: String,
    },
    /// KMS answered without the expected output.
    #[error("KMS {op} of root key {version} returned no {what}")]
    EmptyResponse {
        /// `Decrypt` or `Encrypt`.
        op: &'static str,
        /// The root key version concerned.
        version: String,
        /// The missing field.
        what: &'static str,
    },
}

/// Decrypts each wrapped root key (`v1`, `v2`, ...) with KMS Decrypt, bound
/// to the encryption context `{"tenancy.dev/root-key": "<version>"}`.
///
/// An `active` entry, if passed, is skipped (it is not a key). Any other
/// entry that is not a version name is an error. Stops at the first key that
/// fails, naming it. The result feeds [`crate::crypto::Keyring::new`].
pub async fn unwrap_keys(
    cfg: &KmsConfig,
    wrapped: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Zeroizing<Vec<u8>>>, KmsError> {
    // Check every name before the first network call.
    for name in wrapped.keys().filter(|n| n.as_str() != ACTIVE_ENTRY) {
        check_version(name)?;
    }
    let mut out = BTreeMap::new();
    if wrapped.keys().all(|n| n.as_str() == ACTIVE_ENTRY) {
        return Ok(out);
    }
    let client = client(cfg)?;
    for (version, blob) in wrapped.iter().filter(|(n, _)| n.as_str() != ACTIVE_ENTRY) {
        let response = client
            .decrypt()
            .ciphertext_blob(Blob::new(blob.clone()))
            .encryption_context(ENCRYPTION_CONTEXT_KEY, version)
            .set_key_id(cfg.key_id.clone())
            .send()
            .await
            .map_err(|err| classify("Decrypt", version, cfg, err))?;
        let plaintext = response
            .plaintext
            .map(|blob| Zeroizing::new(blob.into_inner()))
            .ok_or_else(|| KmsError::EmptyResponse {
                op: "Decrypt",
                version: version.clone(),
                what: "plaintext",
            })?;
        out.insert(version.clone(), plaintext);
    }
    Ok(out)
}

/// Wraps one root key for the Secret: KMS Encrypt of `plaintext` under
/// `key_id` with the encryption context `{"tenancy.dev/root-key": version}`.
/// Returns the ciphertext blob to store (base64 in the Secret's `data`) as
/// the entry named `version`.
pub async fn wrap_key(cfg: &KmsConfig, key_id: &str, version: &str, plaintext: &[u8]) -> Result<Vec<u8>, KmsError> {
    check_version(version)?;
    let client = client(cfg)?;
    let response = client
        .encrypt()
        .key_id(key_id)
        .plaintext(Blob::new(plaintext.to_vec()))
        .encryption_context(ENCRYPTION_CONTEXT_KEY, version)
        .send()
        .await
        .map_err(|err| classify("Encrypt", version, cfg, err))?;
    response
        .ciphertext_blob
        .map(Blob::into_inner)
        .ok_or_else(|| KmsError::EmptyResponse {
            op: "Encrypt",
            version: version.to_owned(),
            what: "ciphertext",
        })
}

fn check_version(name: &str) -> Result<(), KmsError> {
    name.parse::<KeyVersion>()
        .map(|_| ())
        .map_err(|_| KmsError::BadVersion(name.chars().take(40).collect()))
}

/// Static credentials from the standard environment variables.
fn env_credentials() -> Result<Credentials, KmsError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let access = var("AWS_ACCESS_KEY_ID");
    let secret = var("AWS_SECRET_ACCESS_KEY");
    match (access, secret) {
        (Some(access), Some(secret)) => Ok(Credentials::new(
            access,
            secret,
            var("AWS_SESSION_TOKEN"),
            None,
            "environment",
        )),
        _ => Err(KmsError::Config(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set (with \
             AWS_SESSION_TOKEN for temporary credentials)"
                .to_owned(),
        )),
    }
}

fn client(cfg: &KmsConfig) -> Result<aws_sdk_kms::Client, KmsError> {
    if cfg.region.trim().is_empty() {
        return Err(KmsError::Config("the AWS region is empty".to_owned()));
    }
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let mut builder = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .credentials_provider(env_credentials()?)
        .http_client(http)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
    if let Some(endpoint) = &cfg.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    Ok(aws_sdk_kms::Client::from_conf(builder.build()))
}

fn endpoint_shown(cfg: &KmsConfig) -> String {
    cfg.endpoint
        .clone()
        .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", cfg.region))
}

/// An error and its sources, `outer: inner: ...`, skipping repeats.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Maps an SDK error to a [`KmsError`] that says which kind of failure it was.
fn classify<E, R>(op: &'static str, version: &str, cfg: &KmsConfig, err: SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let version = version.to_owned();
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    match &err {
        SdkError::DispatchFailure(failure) => {
            let detail = match failure.as_connector_error() {
                Some(connector) => error_chain(connector),
                None => DisplayErrorContext(&err).to_string(),
            };
            return KmsError::Unreachable {
                op,
                version,
                endpoint: endpoint_shown(cfg),
                detail,
            };
        }
        SdkError::TimeoutError(_) => {
            return KmsError::Unreachable {
                op,
                version,
                endpoint: endpoint_shown(cfg),
                detail: format!(
                    "no answer within the timeout (connect {}s, attempt {}s, operation {}s)",
                    CONNECT_TIMEOUT.as_secs(),
                    ATTEMPT_TIMEOUT.as_secs(),
                    OPERATION_TIMEOUT.as_secs()
                ),
            };
        }
        SdkError::ServiceError(_) => {}
        _ => {
            return KmsError::Failed {
                op,
                version,
                detail: DisplayErrorContext(&err).to_string(),
            };
        }
    }
    match code.as_str() {
        "InvalidCiphertextException" => KmsError::InvalidCiphertext { version },
        "IncorrectKeyException" => KmsError::WrongKey { version, message },
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "ExpiredTokenException"
        | "InvalidClientTokenId" => KmsError::AccessDenied {
            op,
            version,
            code,
            message,
        },
        "NotFoundException"
        | "DisabledException"
        | "KMSInvalidStateException"
        | "KeyUnavailableException"
        | "InvalidKeyUsageException" => KmsError::KeyUnusable {
            op,
            version,
            code,
            message,
        },
        _ => KmsError::Failed {
            op,
            version,
            detail: DisplayErrorContext(&err).to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_entry_names_are_refused_before_any_call() {
        let cfg = KmsConfig {
            endpoint: Some("http://127.0.0.1:9".to_owned()),
            ..KmsConfig::new("us-east-1")
        };
        let wrapped = BTreeMap::from([("key1".to_owned(), vec![1u8, 2, 3])]);
        let err = unwrap_keys(&cfg, &wrapped).await.unwrap_err();
        assert!(matches!(&err, KmsError::BadVersion(n) if n == "key1"), "{err}");
        let err = wrap_key(&cfg, "alias/x", "v01", &[0u8; 32]).await.unwrap_err();
        assert!(matches!(&err, KmsError::BadVersion(n) if n == "v01"), "{err}");
    }

    #[tokio::test]
    async fn only_an_active_entry_means_nothing_to_unwrap() {
        let cfg = KmsConfig::new("us-east-1");
        let wrapped = BTreeMap::from([("active".to_owned(), b"v1".to_vec())]);
        // No key entries: no call, no client, so no credentials needed.
        let out = unwrap_keys(&cfg, &wrapped).await.unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn errors_name_the_version_and_the_context() {
        let err = KmsError::InvalidCiphertext {
            version: "v2".to_owned(),
        };
        let shown = err.to_string();
        assert!(
            shown.contains("v2") && shown.contains(ENCRYPTION_CONTEXT_KEY),
            "{shown}"
        );
    }
}
