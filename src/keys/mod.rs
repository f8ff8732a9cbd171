//! Root keys: where they come from and how the running operator holds them.
//!
//! Takes the root-keys Secret (data keys `v1`, `v2`, ... and `active`), with
//! the key values either raw 32-byte keys or, with KMS wrapping, KMS
//! ciphertexts that [`kms::unwrap_keys`] turns back into keys. Gives a
//! [`Keyring`] and a [`KeyHolder`] that swaps in a new keyring when the
//! Secret changes (rotation), refusing one that drops a version still in use.
//! For disaster recovery without a cluster, [`load_file`] reads the same
//! content from a file (the Secret's manifest, or its keys map).
//! Side effects: reads the Secret (or the file); calls KMS when configured.

pub mod kms;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
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
    #[error("root-keys file {path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("root-keys file {path}: {why}")]
    BadFile { path: String, why: String },
    #[error("root-keys file {path}: {source}")]
    FileKeys {
        path: String,
        #[source]
        source: CryptoError,
    },
    #[error("root-keys file {path}: unwrapping with KMS failed: {source}")]
    FileKms {
        path: String,
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
        .map_err(|source| KeysError::Read {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?
        .ok_or_else(|| KeysError::Missing {
            namespace: namespace.clone(),
            name: name.clone(),
        })?;
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    if let Some(cfg) = &src.kms {
        data = unwrap(cfg, data).await.map_err(|source| KeysError::Kms {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    }
    Keyring::from_secret_data(data).map_err(|source| KeysError::Invalid {
        namespace,
        name,
        source,
    })
}

/// Unwraps the `vN` entries with KMS; `active` passes through.
async fn unwrap(
    cfg: &kms::KmsConfig,
    mut data: BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, kms::KmsError> {
    let active = data.remove("active");
    let unwrapped = kms::unwrap_keys(cfg, &data).await?;
    let mut out: BTreeMap<String, Vec<u8>> = unwrapped.into_iter().map(|(k, v)| (k, v.to_vec())).collect();
    if let Some(a) = active {
        out.insert("active".into(), a);
    }
    Ok(out)
}

/// Reads the root keys from a file instead of the cluster (disaster
/// recovery): the content of [`parse_keys_file`], unwrapped with KMS when
/// `kms` is set (a copy of a KMS-wrapped Secret).
pub async fn load_file(path: &Path, kms: Option<&kms::KmsConfig>) -> Result<Keyring, KeysError> {
    let shown = path.display().to_string();
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| KeysError::ReadFile {
        path: shown.clone(),
        source,
    })?);
    let mut data = parse_keys_file(&text).map_err(|why| KeysError::BadFile {
        path: shown.clone(),
        why,
    })?;
    if let Some(cfg) = kms {
        data = unwrap(cfg, data).await.map_err(|source| KeysError::FileKms {
            path: shown.clone(),
            source,
        })?;
    }
    Keyring::from_secret_data(data).map_err(|source| KeysError::FileKeys { path: shown, source })
}

/// The Secret's data (entry name to bytes) from the text of a root-keys
/// file, YAML or JSON, in one of two forms:
///
/// - the root-keys Secret's manifest, as `kubectl get secret -o yaml` (or
///   `-o json`) prints it or `tenant-operator keys new-secret` writes it:
///   `data` values are base64, `stringData` values plain text (and win, as
///   in Kubernetes); `kind`, when present, must be `Secret`;
/// - just the keys map: `vN: <base64 of the 32-byte key>` (as in the
///   Secret's `data`) and `active: vN` (plain, or base64 as in `data`).
///
/// Pure. Errors never echo key material.
pub fn parse_keys_file(text: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    if text.trim().is_empty() {
        return Err("the file is empty".into());
    }
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| format!("not YAML or JSON: {e}"))?;
    let serde_yaml::Value::Mapping(top) = doc else {
        return Err("expected the root-keys Secret manifest or a map of its keys (v1: <base64>, active: v1)".into());
    };
    let string_map = |v: &serde_yaml::Value, what: &str| -> Result<BTreeMap<String, String>, String> {
        match v {
            serde_yaml::Value::Null => Ok(BTreeMap::new()),
            serde_yaml::Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| match (k.as_str(), v.as_str()) {
                    (Some(k), Some(v)) => Ok((k.to_owned(), v.trim().to_owned())),
                    (Some(k), None) => Err(format!("{what}{k} is not a string")),
                    _ => Err(format!("{what} has a key that is not a string")),
                })
                .collect(),
            _ => Err(format!("{} is not a map", what.trim_end_matches('.'))),
        }
    };
    let decode = |name: &str, v: &str, what: &str| b64.decode(v).map_err(|_| format!("{what}{name} is not base64"));
    let is_manifest = ["kind", "apiVersion", "data", "stringData", "metadata"]
        .iter()
        .any(|k| top.contains_key(*k));
    let mut out = BTreeMap::new();
    if is_manifest {
        if let Some(kind) = top.get("kind") {
            if kind.as_str() != Some("Secret") {
                return Err(format!(
                    "kind is {}, not Secret",
                    serde_yaml::to_string(kind).unwrap_or_default().trim()
                ));
            }
        }
        let data = string_map(top.get("data").unwrap_or(&serde_yaml::Value::Null), "data.")?;
        let plain = string_map(top.get("stringData").unwrap_or(&serde_yaml::Value::Null), "stringData.")?;
        for (k, v) in data {
            out.insert(k.clone(), decode(&k, &v, "data.")?);
        }
        for (k, v) in plain {
            out.insert(k, v.into_bytes());
        }
    } else {
        for (k, v) in string_map(&serde_yaml::Value::Mapping(top), "")? {
            // A version name is never base64 of one: that starts with `d`.
            let value = if k == "active" && v.starts_with('v') {
                v.into_bytes()
            } else {
                decode(&k, &v, "")?
            };
            out.insert(k, value);
        }
    }
    if out.is_empty() {
        return Err("no keys in it (expected data.v1 ... and active)".into());
    }
    Ok(out)
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
        Self {
            ring: RwLock::new(Some(Arc::new(ring))),
            refused: RwLock::new(None),
        }
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
        let missing: Vec<String> = in_use
            .iter()
            .filter(|v| !next.contains(**v))
            .map(|v| v.to_string())
            .collect();
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
pub async fn new_wrapped_secret_yaml(
    namespace: &str,
    name: &str,
    cfg: &kms::KmsConfig,
    key_id: &str,
) -> Result<String, kms::KmsError> {
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
        assert_eq!(
            holder.current().unwrap().active_version().to_string(),
            "v2",
            "the refused keyring was installed"
        );
        assert!(holder.refused().is_some());
        assert_eq!(holder.replace(ring(&[1, 2, 3], 3), &in_use), Ok(true));
        assert!(holder.refused().is_none());
        assert_eq!(
            holder.replace(ring(&[1, 2, 3], 3), &in_use),
            Ok(false),
            "an identical keyring is not a change"
        );
    }

    #[test]
    fn keys_files_in_every_accepted_form_give_the_same_keyring() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let (k1, k2) = (b64(&[1u8; 32]), b64(&[2u8; 32]));
        let want = ring(&[1, 2], 2);
        let forms = [
            // kubectl get secret -o yaml
            format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: rk\n  namespace: ns\n  resourceVersion: \"7\"\ntype: Opaque\ndata:\n  active: {}\n  v1: {k1}\n  v2: {k2}\n", b64(b"v2")),
            // kubectl get secret -o json
            format!("{{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"data\":{{\"active\":\"{}\",\"v1\":\"{k1}\",\"v2\":\"{k2}\"}}}}", b64(b"v2")),
            // keys new-secret style: stringData wins
            format!("kind: Secret\ndata:\n  v1: {k1}\n  v2: {k2}\n  active: {}\nstringData:\n  active: v2\n", b64(b"v1")),
            // the keys map, active plain or base64
            format!("v1: {k1}\nv2: {k2}\nactive: v2\n"),
            format!("v1: {k1}\nv2: {k2}\nactive: {}\n", b64(b"v2")),
        ];
        for f in &forms {
            let got = Keyring::from_secret_data(parse_keys_file(f).unwrap_or_else(|e| panic!("{f}: {e}"))).unwrap();
            assert!(same_keys(&got, &want), "{f} gave another keyring");
        }
        let generated = Keyring::from_secret_data(parse_keys_file(&new_secret_yaml("ns", "rk")).unwrap()).unwrap();
        assert_eq!(generated.active_version().to_string(), "v1");
    }

    #[test]
    fn malformed_keys_files_are_refused_without_echoing_keys() {
        let secret_b64 = "c2VjcmV0LWtleS1ieXRlcy1uZXZlci1zaG93bi0xMjM0";
        for (text, says) in [
            ("", "empty"),
            ("- a\n- b\n", "expected the root-keys Secret"),
            ("{not: [closed", "not YAML"),
            ("kind: ConfigMap\ndata: {v1: abc}\n", "not Secret"),
            ("kind: Secret\ndata:\n  v1: '%%%'\n", "data.v1 is not base64"),
            ("kind: Secret\ndata: [1]\n", "data is not a map"),
            ("kind: Secret\n", "no keys"),
            ("v1: '***'\nactive: v1\n", "v1 is not base64"),
        ] {
            let err = parse_keys_file(text).expect_err(text);
            assert!(err.contains(says), "{text:?}: {err}");
        }
        // Well formed, but a key of the wrong length: the keyring says so.
        let short = format!("v1: {secret_b64}\nactive: v1\n");
        let err = Keyring::from_secret_data(parse_keys_file(&short).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("32 bytes") && !err.contains(secret_b64), "{err}");
    }

    #[test]
    fn new_secret_yaml_holds_a_fresh_32_byte_key() {
        use base64::Engine;
        let y = new_secret_yaml("ns", "keys");
        let line = y.lines().find(|l| l.trim_start().starts_with("v1:")).unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(line.split(':').nth(1).unwrap().trim())
            .unwrap();
        assert_eq!(key.len(), 32);
        assert_ne!(y, new_secret_yaml("ns", "keys"));
    }
}
