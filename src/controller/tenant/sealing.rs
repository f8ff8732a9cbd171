//! Sealed secrets: the tenant's `spec.secrets`, read from their source
//! Secrets and sealed under the tenant's `secrets` key into
//! `tenant-<name>-sealed`.
//!
//! [`plan_sealed`] is pure (the only outside resource it uses is the CSPRNG
//! for nonces): it keeps every existing envelope that still opens to the
//! current plaintext under the active key, so an unchanged tenant re-seals
//! nothing and writes nothing. [`SourceIndex`] maps source Secrets back to
//! the tenants that read them, for the watch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use crate::api::tenant::TenantSecret;
use crate::crypto::{self, CryptoError, KeyVersion, Keyring, Purpose, TenantSalt};

/// The plaintext of one source, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Value(Vec<u8>),
    SecretMissing,
    KeyMissing,
}

/// The data the sealed Secret should hold, and what could not be sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealPlan {
    /// Secret name to envelope bytes.
    pub data: BTreeMap<String, Vec<u8>>,
    /// Whether `data` differs from the existing sealed Secret.
    pub changed: bool,
    /// One message per secret whose source could not be read (its previous
    /// envelope, if any, is kept so applications keep working).
    pub missing: Vec<String>,
    /// How many envelopes were (re-)sealed this time.
    pub sealed: usize,
}

/// Plans the sealed Secret's data from the spec, the sources and the
/// existing envelopes.
pub fn plan_sealed(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    spec: &[TenantSecret],
    sources: &BTreeMap<String, Source>,
    existing: &BTreeMap<String, Vec<u8>>,
) -> Result<SealPlan, CryptoError> {
    let active = ring.active_version();
    let mut data = BTreeMap::new();
    let mut missing = Vec::new();
    let mut sealed = 0;
    for s in spec {
        let old = existing.get(&s.name);
        match sources.get(&s.name).unwrap_or(&Source::SecretMissing) {
            Source::Value(plain) => {
                let keep = old.filter(|env| {
                    crypto::envelope_key_version(env).ok() == Some(active)
                        && crypto::open(ring, salt, uid, Purpose::Secrets, &s.name, env).is_ok_and(|p| p.as_slice() == plain.as_slice())
                });
                let env = match keep {
                    Some(env) => env.clone(),
                    None => {
                        sealed += 1;
                        crypto::seal(ring, salt, uid, Purpose::Secrets, &s.name, plain)?
                    }
                };
                data.insert(s.name.clone(), env);
            }
            why => {
                let r = &s.secret_ref;
                missing.push(match why {
                    Source::KeyMissing => format!("{}: Secret {}/{} has no key {:?}", s.name, r.namespace, r.name, r.key),
                    _ => format!("{}: Secret {}/{} not found", s.name, r.namespace, r.name),
                });
                if let Some(env) = old {
                    data.insert(s.name.clone(), env.clone());
                }
            }
        }
    }
    let changed = &data != existing;
    Ok(SealPlan { data, changed, missing, sealed })
}

/// Checks what the CRD schema also checks: entry names are unique and valid
/// data keys.
pub fn validate(spec: &[TenantSecret]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for s in spec {
        let ok = !s.name.is_empty() && s.name.len() <= 253 && s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !ok {
            return Err(format!("spec.secrets: {:?} is not a valid name (letters, digits, '-', '.', '_')", s.name));
        }
        if !seen.insert(&s.name) {
            return Err(format!("spec.secrets: the name {:?} is used twice", s.name));
        }
    }
    Ok(())
}

/// The key versions of envelopes, for the registry's bookkeeping.
pub fn versions_of(data: &BTreeMap<String, Vec<u8>>) -> BTreeSet<KeyVersion> {
    data.values().filter_map(|e| crypto::envelope_key_version(e).ok()).collect()
}

/// Source Secret (namespace, name) of each tenant's sealed secrets.
#[derive(Debug, Default)]
pub struct SourceIndex(Mutex<HashMap<String, BTreeSet<(String, String)>>>);

impl SourceIndex {
    pub fn set(&self, tenant: &str, spec: &[TenantSecret]) {
        let refs: BTreeSet<_> = spec.iter().map(|s| (s.secret_ref.namespace.clone(), s.secret_ref.name.clone())).collect();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if refs.is_empty() {
            map.remove(tenant);
        } else {
            map.insert(tenant.to_owned(), refs);
        }
    }

    /// Tenants that read the Secret `namespace/name`.
    pub fn tenants_of(&self, namespace: &str, name: &str) -> Vec<String> {
        let key = (namespace.to_owned(), name.to_owned());
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().filter(|(_, refs)| refs.contains(&key)).map(|(t, _)| t.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tenant::SecretKeyRef;

    fn ring(versions: &[u32], active: u32) -> Keyring {
        let map = versions.iter().map(|v| (format!("v{v}"), vec![*v as u8 + 7; 32])).collect();
        Keyring::new(map, &format!("v{active}")).unwrap()
    }

    fn entry(name: &str) -> TenantSecret {
        TenantSecret { name: name.into(), secret_ref: SecretKeyRef { namespace: "src".into(), name: format!("{name}-src"), key: "password".into() } }
    }

    fn sources(pairs: &[(&str, Source)]) -> BTreeMap<String, Source> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn unchanged_sources_reseal_nothing() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let spec = [entry("erp"), entry("sso")];
        let src = sources(&[("erp", Source::Value(b"p1".to_vec())), ("sso", Source::Value(b"p2".to_vec()))]);
        let first = plan_sealed(&r, &salt, "uid", &spec, &src, &BTreeMap::new()).unwrap();
        assert!(first.changed && first.sealed == 2);
        let second = plan_sealed(&r, &salt, "uid", &spec, &src, &first.data).unwrap();
        assert!(!second.changed, "an unchanged tenant was re-sealed");
        assert_eq!(second.sealed, 0);
    }

    #[test]
    fn a_changed_source_or_a_new_active_key_reseals() {
        let salt = TenantSalt::generate();
        let spec = [entry("erp")];
        let first = plan_sealed(&ring(&[1], 1), &salt, "uid", &spec, &sources(&[("erp", Source::Value(b"a".to_vec()))]), &BTreeMap::new()).unwrap();
        let changed = plan_sealed(&ring(&[1], 1), &salt, "uid", &spec, &sources(&[("erp", Source::Value(b"b".to_vec()))]), &first.data).unwrap();
        assert!(changed.changed);
        let rotated = plan_sealed(&ring(&[1, 2], 2), &salt, "uid", &spec, &sources(&[("erp", Source::Value(b"a".to_vec()))]), &first.data).unwrap();
        assert!(rotated.changed);
        assert_eq!(versions_of(&rotated.data), BTreeSet::from([KeyVersion::new(2).unwrap()]));
        let plain = crypto::open(&ring(&[1, 2], 2), &salt, "uid", Purpose::Secrets, "erp", &rotated.data["erp"]).unwrap();
        assert_eq!(plain.as_slice(), b"a");
    }

    #[test]
    fn a_missing_source_is_named_and_the_others_stay_sealed() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let spec = [entry("erp"), entry("sso")];
        let both = sources(&[("erp", Source::Value(b"p1".to_vec())), ("sso", Source::Value(b"p2".to_vec()))]);
        let first = plan_sealed(&r, &salt, "uid", &spec, &both, &BTreeMap::new()).unwrap();
        let one = sources(&[("erp", Source::Value(b"p1".to_vec())), ("sso", Source::SecretMissing)]);
        let p = plan_sealed(&r, &salt, "uid", &spec, &one, &first.data).unwrap();
        assert_eq!(p.missing, vec!["sso: Secret src/sso-src not found".to_string()]);
        assert!(!p.changed, "the previous envelope of the missing source should be kept");
        let fresh = plan_sealed(&r, &salt, "uid", &spec, &sources(&[("erp", Source::KeyMissing)]), &BTreeMap::new()).unwrap();
        assert!(fresh.data.is_empty());
        assert!(fresh.missing[0].contains("has no key \"password\""));
    }

    #[test]
    fn removed_entries_leave_the_sealed_secret() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let src = sources(&[("erp", Source::Value(b"p1".to_vec())), ("sso", Source::Value(b"p2".to_vec()))]);
        let first = plan_sealed(&r, &salt, "uid", &[entry("erp"), entry("sso")], &src, &BTreeMap::new()).unwrap();
        let p = plan_sealed(&r, &salt, "uid", &[entry("erp")], &src, &first.data).unwrap();
        assert!(p.changed);
        assert_eq!(p.data.keys().collect::<Vec<_>>(), ["erp"]);
    }

    #[test]
    fn an_envelope_copied_from_another_tenant_is_replaced_not_trusted() {
        let r = ring(&[1], 1);
        let (salt_a, salt_b) = (TenantSalt::generate(), TenantSalt::generate());
        let src = sources(&[("erp", Source::Value(b"p".to_vec()))]);
        let b = plan_sealed(&r, &salt_b, "uid-b", &[entry("erp")], &src, &BTreeMap::new()).unwrap();
        let a = plan_sealed(&r, &salt_a, "uid-a", &[entry("erp")], &src, &b.data).unwrap();
        assert!(a.changed && a.sealed == 1);
        assert!(crypto::open(&r, &salt_a, "uid-b", Purpose::Secrets, "erp", &a.data["erp"]).is_err());
    }

    #[test]
    fn duplicate_or_bad_names_are_refused() {
        assert!(validate(&[entry("a"), entry("a")]).unwrap_err().contains("twice"));
        assert!(validate(&[entry("a/b")]).is_err());
        assert!(validate(&[entry("a"), entry("b.c_d-e")]).is_ok());
    }

    #[test]
    fn the_index_maps_sources_back_to_tenants() {
        let idx = SourceIndex::default();
        idx.set("acme", &[entry("erp")]);
        idx.set("globex", &[entry("erp"), entry("sso")]);
        let mut t = idx.tenants_of("src", "erp-src");
        t.sort();
        assert_eq!(t, ["acme", "globex"]);
        idx.set("globex", &[]);
        assert_eq!(idx.tenants_of("src", "sso-src"), Vec::<String>::new());
    }
}
