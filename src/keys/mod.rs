//! Root keys: where they come from and how the running operator holds them.
//!
//! Takes the root-keys Secret (data keys `v1`, `v2`, ... and `active`), with
//! the key values either raw 32-byte keys or, with KMS wrapping, KMS
//! ciphertexts that [`kms::unwrap_keys`] turns back into keys. Gives a
//! [`Keyring`] and a [`KeyHolder`] that swaps in a new keyring when the
//! Secret changes (rotation), refusing one that drops a version still in use.
//! Side effects: reads the Secret; calls KMS when configured.

pub mod kms;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::crypto::{CryptoError, KeyVersion, Keyring};

/// Where the root keys live.
#[derive(Clone, Debug)]
pub struct KeySource {
    pub namespace: String,
    pub secret: String,
    /// Some: the Secret's key values are wrapped by KMS.
    pub kms: Option<kms::KmsConfig>,
}

/// Why the root keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading root-keys Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("root-keys Secret {namespace}/{name} does not exist: create it (`tenant-operator keys new-secret | kubectl apply -f -`)")]
    Missing { namespace: String, name: String },
    #[error("root-keys Secret {namespace}/{name}: {source}")]
    Invalid {
        namespace: String,
        name: String,
        #[source]
        source: CryptoError,
    },
    #[error("root-keys Secret {namespace}/{name}: unwrapping with KMS failed: {source}")]
    Kms {
        namespace: String,
        name: String,
        #[source]
        source: kms::KmsError,
    },
}

/// Reads and checks the root keys.
pub async fn load(client: &Client, src: &KeySource) -> Result<Keyring, KeysError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &src.namespace);
    let (namespace, name) = (src.namespace.clone(), src.secret.clone());
    let secret = api
        .get_opt(&src.secret)
        .await
        .map_err(|source| KeysError::Read { namespace: namespace.clone(), name: name.clone(), source })?
        .ok_or_else(|| KeysError::Missing { namespace: namespace.clone(), name: name.clone() })?;
    let mut data: BTreeMap<String, Vec<u8>> = secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    if let Some(cfg) = &src.kms {
        let active = data.remove("active");
        let unwrapped = kms::unwrap_keys(cfg, &data)
            .await
            .map_err(|source| KeysError::Kms { namespace: namespace.clone(), name: name.clone(), source })?;
        data = unwrapped.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
        if let Some(a) = active {
            data.insert("active".into(), a);
        }
    }
    Keyring::from_secret_data(data).map_err(|source| KeysError::Invalid { namespace, name, source })
}

/// The keyring in use, swapped on rotation.
#[derive(Default)]
pub struct KeyHolder {
    ring: RwLock<Option<Arc<Keyring>>>,
    /// Why the last reload was refused, for conditions.
    refused: RwLock<Option<String>>,
}

impl KeyHolder {
    pub fn new(ring: Keyring) -> Self {
        Self { ring: RwLock::new(Some(Arc::new(ring))), refused: RwLock::new(None) }
    }

    pub fn current(&self) -> Option<Arc<Keyring>> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why the last reload was refused, if it was.
    pub fn refused(&self) -> Option<String> {
        self.refused.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs `next` unless it lacks a version in `in_use` (envelopes or
    /// backups still need it). Returns whether the keyring changed.
    pub fn replace(&self, next: Keyring, in_use: &BTreeSet<KeyVersion>) -> Result<bool, String> {
        let missing: Vec<String> = in_use.iter().filter(|v| !next.contains(**v)).map(|v| v.to_string()).collect();
        if !missing.is_empty() {
            let msg = format!(
                "refused the new root keys: version(s) {} are missing but tenants' sealed data still uses them; \
                 put them back until rotation has re-sealed every tenant (see status.keyVersion)",
                missing.join(", ")
            );
            *self.refused.write().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
            return Err(msg);
        }
        *self.refused.write().unwrap_or_else(|p| p.into_inner()) = None;
        let mut slot = self.ring.write().unwrap_or_else(|p| p.into_inner());
        let changed = match slot.as_ref() {
            Some(old) => !same_keys(old, &next),
            None => true,
        };
        if changed {
            *slot = Some(Arc::new(next));
        }
        Ok(changed)
    }
}

/// Same versions, same active version, same key fingerprints.
fn same_keys(a: &Keyring, b: &Keyring) -> bool {
    a.active_version() == b.active_version()
        && a.versions().eq(b.versions())
        && a.versions().all(|v| a.fingerprint(v) == b.fingerprint(v))
}

/// A new root-keys Secret manifest with one random key `v1`, active.
pub fn new_secret_yaml(namespace: &str, name: &str) -> String {
    use base64::Engine;
    let key = crate::crypto::generate_root_key();
    let b64 = base64::engine::general_purpose::STANDARD.encode(key.as_slice());
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: Opaque\ndata:\n  v1: {b64}\nstringData:\n  active: v1\n"
    )
}

/// A new root-keys Secret manifest whose random key `v1` is wrapped by KMS
/// (the plaintext key never leaves this process).
pub async fn new_wrapped_secret_yaml(namespace: &str, name: &str, cfg: &kms::KmsConfig, key_id: &str) -> Result<String, kms::KmsError> {
    use base64::Engine;
    let key = crate::crypto::generate_root_key();
    let wrapped = kms::wrap_key(cfg, key_id, "v1", key.as_slice()).await?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(wrapped);
    Ok(format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  annotations:\n    tenancy.dev/wrapped-by: aws-kms\ntype: Opaque\ndata:\n  v1: {b64}\nstringData:\n  active: v1\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(versions: &[u32], active: u32) -> Keyring {
        let map = versions.iter().map(|v| (format!("v{v}"), vec![*v as u8; 32])).collect();
        Keyring::new(map, &format!("v{active}")).unwrap()
    }

    #[test]
    fn a_keyring_missing_a_version_in_use_is_refused() {
        let holder = KeyHolder::new(ring(&[1, 2], 2));
        let in_use = BTreeSet::from([KeyVersion::new(1).unwrap()]);
        let err = holder.replace(ring(&[2, 3], 3), &in_use).unwrap_err();
        assert!(err.contains("v1"), "{err}");
        assert_eq!(holder.current().unwrap().active_version().to_string(), "v2", "the refused keyring was installed");
        assert!(holder.refused().is_some());
        assert_eq!(holder.replace(ring(&[1, 2, 3], 3), &in_use), Ok(true));
        assert!(holder.refused().is_none());
        assert_eq!(holder.replace(ring(&[1, 2, 3], 3), &in_use), Ok(false), "an identical keyring is not a change");
    }

    #[test]
    fn new_secret_yaml_holds_a_fresh_32_byte_key() {
        use base64::Engine;
        let y = new_secret_yaml("ns", "keys");
        let line = y.lines().find(|l| l.trim_start().starts_with("v1:")).unwrap();
        let key = base64::engine::general_purpose::STANDARD.decode(line.split(':').nth(1).unwrap().trim()).unwrap();
        assert_eq!(key.len(), 32);
        assert_ne!(y, new_secret_yaml("ns", "keys"));
    }
}
