//! Sealed secrets: the tenant's `spec.secrets`, read from their source
//! Secrets and sealed under the tenant's `secrets` key into
//! `tenant-<name>-sealed`.
//!
//! [`plan_sealed`] is pure (the only outside resource it uses is the CSPRNG
//! for nonces): it keeps every existing envelope that still opens to the
//! current plaintext under the active key, so an unchanged tenant re-seals
//! nothing and writes nothing. [`SourceIndex`] maps source Secrets back to
//! the tenants that read them, for the watch.
//!
//! Which Secrets may be sources is [`decide`]d here too (pure): a Secret in
//! a namespace the operator is configured to read from
//! (`--secret-source-namespaces`), or one that opts in by naming the tenant
//! ([`SEAL_FOR`]); never one in the operator's own namespace. A Secret that
//! may not be used, whether it exists or not, gets one and the same message,
//! so a Tenant author learns nothing about Secrets it could not read itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use zeroize::Zeroizing;

use crate::api::tenant::TenantSecret;
use crate::crypto::{self, CryptoError, KeyVersion, Keyring, Purpose, TenantSalt};

/// The label (value: one tenant's name) or annotation (value: tenant names,
/// comma-separated) by which a Secret outside the source namespaces agrees
/// to be sealed for those tenants.
pub const SEAL_FOR: &str = "tenancy.dev/seal-for";

/// Where sealed-secret sources may come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// The operator's own namespace (its root keys, database Secret and
    /// tenants' Secrets): never a source, whatever else is configured.
    pub operator_namespace: String,
    /// Namespaces every Secret of which may be a source
    /// (`--secret-source-namespaces`).
    pub namespaces: BTreeSet<String>,
}

impl SourcePolicy {
    /// The policy from the operator namespace and the comma-separated list
    /// of `--secret-source-namespaces` (blanks ignored). The operator
    /// namespace is dropped from the list (it is never a source); the second
    /// value says whether it was there, for a warning.
    pub fn new(operator_namespace: &str, list: &str) -> (Self, bool) {
        let mut namespaces: BTreeSet<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let had_own = namespaces.remove(operator_namespace);
        (
            Self {
                operator_namespace: operator_namespace.to_owned(),
                namespaces,
            },
            had_own,
        )
    }

    /// Whether every Secret of `namespace` may be a source.
    pub fn is_source_namespace(&self, namespace: &str) -> bool {
        namespace != self.operator_namespace && self.namespaces.contains(namespace)
    }

    /// Whether no Secret of `namespace` can ever be a source, so it need
    /// not even be looked at.
    pub fn refuses_namespace(&self, namespace: &str) -> bool {
        namespace.is_empty() || namespace == self.operator_namespace
    }
}

/// Whether the Secret's metadata names `tenant` in its [`SEAL_FOR`] label or
/// annotation.
pub fn opted_in(meta: &ObjectMeta, tenant: &str) -> bool {
    let label = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(SEAL_FOR))
        .is_some_and(|v| v == tenant);
    let annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SEAL_FOR))
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tenant));
    label || annotation
}

/// What may be done with the source Secret `namespace`/... of `tenant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Read its data.
    Read,
    /// It does not exist, in a source namespace (where saying so reveals
    /// nothing the configuration did not already open).
    Missing,
    /// It may not be used, or it does not exist where that must not be told.
    NotAllowed,
}

/// The allow decision for one source Secret of `tenant`, from its metadata
/// (`None`: not found, or the operator may not read it: 404 and 403 are
/// the same here).
pub fn decide(policy: &SourcePolicy, tenant: &str, namespace: &str, meta: Option<&ObjectMeta>) -> Decision {
    if policy.refuses_namespace(namespace) {
        return Decision::NotAllowed;
    }
    let in_source_namespace = policy.is_source_namespace(namespace);
    match meta {
        // The object must be the one asked for (a namespace in the metadata
        // that differs is a confused server, not a source).
        Some(m) if m.namespace.as_deref().is_some_and(|ns| ns != namespace) => Decision::NotAllowed,
        Some(m) if in_source_namespace || opted_in(m, tenant) => Decision::Read,
        Some(_) => Decision::NotAllowed,
        None if in_source_namespace => Decision::Missing,
        None => Decision::NotAllowed,
    }
}

/// The one message for a source that may not be used: it depends on the
/// reference and the configuration only, never on the Secret.
pub fn not_allowed_message(policy: &SourcePolicy, tenant: &str, s: &TenantSecret) -> String {
    let r = &s.secret_ref;
    let namespaces = if policy.namespaces.is_empty() {
        "none configured".to_string()
    } else {
        policy.namespaces.iter().cloned().collect::<Vec<_>>().join(", ")
    };
    format!(
        "{}: Secret {}/{} is not an allowed source: a source must be in a namespace of --secret-source-namespaces ({namespaces}) \
         or carry the label {SEAL_FOR}={tenant} (or list {tenant} in the annotation {SEAL_FOR}) and be readable by the operator; \
         never in the operator's namespace {}",
        s.name, r.namespace, r.name, policy.operator_namespace
    )
}

/// The plaintext of one source, or why there is none.
#[derive(Clone, PartialEq, Eq)]
pub enum Source {
    /// The plaintext, wiped from memory when dropped.
    Value(Zeroizing<Vec<u8>>),
    SecretMissing,
    KeyMissing,
    /// The Secret may not be a source for this tenant (or does not exist
    /// where that must not be told).
    NotAllowed,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Value(v) => write!(f, "Value(<{} bytes redacted>)", v.len()),
            Source::SecretMissing => f.write_str("SecretMissing"),
            Source::KeyMissing => f.write_str("KeyMissing"),
            Source::NotAllowed => f.write_str("NotAllowed"),
        }
    }
}

impl Source {
    /// The plaintext of `key` in a Secret's data; every other value of the
    /// data is wiped, and so is the data of a Secret that is not used.
    pub fn take_key(data: Option<BTreeMap<String, k8s_openapi::ByteString>>, key: &str) -> Source {
        use zeroize::Zeroize;
        let mut data = data.unwrap_or_default();
        let value = data.remove(key).map(|v| Zeroizing::new(v.0));
        for v in data.values_mut() {
            v.0.zeroize();
        }
        match value {
            Some(v) => Source::Value(v),
            None => Source::KeyMissing,
        }
    }
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
    /// One message per secret whose source is not allowed (its previous
    /// envelope, if any, is dropped: the source's consent is withdrawn).
    pub not_allowed: Vec<String>,
    /// How many envelopes were (re-)sealed this time.
    pub sealed: usize,
}

/// Plans the sealed Secret's data from the spec, the sources and the
/// existing envelopes.
#[allow(clippy::too_many_arguments)]
pub fn plan_sealed(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    tenant: &str,
    policy: &SourcePolicy,
    spec: &[TenantSecret],
    sources: &BTreeMap<String, Source>,
    existing: &BTreeMap<String, Vec<u8>>,
) -> Result<SealPlan, CryptoError> {
    let active = ring.active_version();
    let mut data = BTreeMap::new();
    let mut missing = Vec::new();
    let mut not_allowed = Vec::new();
    let mut sealed = 0;
    for s in spec {
        let old = existing.get(&s.name);
        match sources.get(&s.name).unwrap_or(&Source::SecretMissing) {
            Source::Value(plain) => {
                let keep = old.filter(|env| {
                    crypto::envelope_key_version(env).ok() == Some(active)
                        && crypto::open(ring, salt, uid, Purpose::Secrets, &s.name, env)
                            .is_ok_and(|p| p.as_slice() == plain.as_slice())
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
            Source::NotAllowed => not_allowed.push(not_allowed_message(policy, tenant, s)),
            why => {
                let r = &s.secret_ref;
                missing.push(match why {
                    Source::KeyMissing => {
                        format!("{}: Secret {}/{} has no key {:?}", s.name, r.namespace, r.name, r.key)
                    }
                    _ => format!("{}: Secret {}/{} not found", s.name, r.namespace, r.name),
                });
                if let Some(env) = old {
                    data.insert(s.name.clone(), env.clone());
                }
            }
        }
    }
    let changed = &data != existing;
    Ok(SealPlan {
        data,
        changed,
        missing,
        not_allowed,
        sealed,
    })
}

/// Checks what the CRD schema also checks: entry names are unique and valid
/// data keys.
pub fn validate(spec: &[TenantSecret]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for s in spec {
        let ok = !s.name.is_empty()
            && s.name.len() <= 253
            && s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !ok {
            return Err(format!(
                "spec.secrets: {:?} is not a valid name (letters, digits, '-', '.', '_')",
                s.name
            ));
        }
        if !seen.insert(&s.name) {
            return Err(format!("spec.secrets: the name {:?} is used twice", s.name));
        }
    }
    Ok(())
}

/// The key versions of envelopes, for the registry's bookkeeping.
pub fn versions_of(data: &BTreeMap<String, Vec<u8>>) -> BTreeSet<KeyVersion> {
    data.values()
        .filter_map(|e| crypto::envelope_key_version(e).ok())
        .collect()
}

/// Source Secret (namespace, name) of each tenant's sealed secrets.
#[derive(Debug, Default)]
pub struct SourceIndex(Mutex<HashMap<String, BTreeSet<(String, String)>>>);

impl SourceIndex {
    pub fn set(&self, tenant: &str, spec: &[TenantSecret]) {
        let refs: BTreeSet<_> = spec
            .iter()
            .map(|s| (s.secret_ref.namespace.clone(), s.secret_ref.name.clone()))
            .collect();
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
        map.iter()
            .filter(|(_, refs)| refs.contains(&key))
            .map(|(t, _)| t.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tenant::SecretKeyRef;

    fn ring(versions: &[u32], active: u32) -> Keyring {
        let map = versions
            .iter()
            .map(|v| (format!("v{v}"), vec![*v as u8 + 7; 32]))
            .collect();
        Keyring::new(map, &format!("v{active}")).unwrap()
    }

    fn entry(name: &str) -> TenantSecret {
        TenantSecret {
            name: name.into(),
            secret_ref: SecretKeyRef {
                namespace: "src".into(),
                name: format!("{name}-src"),
                key: "password".into(),
            },
        }
    }

    fn val(v: &[u8]) -> Source {
        Source::Value(Zeroizing::new(v.to_vec()))
    }

    fn policy() -> SourcePolicy {
        SourcePolicy::new("tenant-system", "src").0
    }

    fn sources(pairs: &[(&str, Source)]) -> BTreeMap<String, Source> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn unchanged_sources_reseal_nothing() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let spec = [entry("erp"), entry("sso")];
        let src = sources(&[("erp", val(b"p1")), ("sso", val(b"p2"))]);
        let first = plan_sealed(&r, &salt, "uid", "acme", &policy(), &spec, &src, &BTreeMap::new()).unwrap();
        assert!(first.changed && first.sealed == 2);
        let second = plan_sealed(&r, &salt, "uid", "acme", &policy(), &spec, &src, &first.data).unwrap();
        assert!(!second.changed, "an unchanged tenant was re-sealed");
        assert_eq!(second.sealed, 0);
    }

    #[test]
    fn a_changed_source_or_a_new_active_key_reseals() {
        let salt = TenantSalt::generate();
        let spec = [entry("erp")];
        let first = plan_sealed(
            &ring(&[1], 1),
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", val(b"a"))]),
            &BTreeMap::new(),
        )
        .unwrap();
        let changed = plan_sealed(
            &ring(&[1], 1),
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", val(b"b"))]),
            &first.data,
        )
        .unwrap();
        assert!(changed.changed);
        let rotated = plan_sealed(
            &ring(&[1, 2], 2),
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", val(b"a"))]),
            &first.data,
        )
        .unwrap();
        assert!(rotated.changed);
        assert_eq!(
            versions_of(&rotated.data),
            BTreeSet::from([KeyVersion::new(2).unwrap()])
        );
        let plain = crypto::open(
            &ring(&[1, 2], 2),
            &salt,
            "uid",
            Purpose::Secrets,
            "erp",
            &rotated.data["erp"],
        )
        .unwrap();
        assert_eq!(plain.as_slice(), b"a");
    }

    #[test]
    fn a_missing_source_is_named_and_the_others_stay_sealed() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let spec = [entry("erp"), entry("sso")];
        let both = sources(&[("erp", val(b"p1")), ("sso", val(b"p2"))]);
        let first = plan_sealed(&r, &salt, "uid", "acme", &policy(), &spec, &both, &BTreeMap::new()).unwrap();
        let one = sources(&[("erp", val(b"p1")), ("sso", Source::SecretMissing)]);
        let p = plan_sealed(&r, &salt, "uid", "acme", &policy(), &spec, &one, &first.data).unwrap();
        assert_eq!(p.missing, vec!["sso: Secret src/sso-src not found".to_string()]);
        assert!(!p.changed, "the previous envelope of the missing source should be kept");
        let fresh = plan_sealed(
            &r,
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", Source::KeyMissing)]),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(fresh.data.is_empty());
        assert!(fresh.missing[0].contains("has no key \"password\""));
    }

    #[test]
    fn removed_entries_leave_the_sealed_secret() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let src = sources(&[("erp", val(b"p1")), ("sso", val(b"p2"))]);
        let first = plan_sealed(
            &r,
            &salt,
            "uid",
            "acme",
            &policy(),
            &[entry("erp"), entry("sso")],
            &src,
            &BTreeMap::new(),
        )
        .unwrap();
        let p = plan_sealed(&r, &salt, "uid", "acme", &policy(), &[entry("erp")], &src, &first.data).unwrap();
        assert!(p.changed);
        assert_eq!(p.data.keys().collect::<Vec<_>>(), ["erp"]);
    }

    #[test]
    fn an_envelope_copied_from_another_tenant_is_replaced_not_trusted() {
        let r = ring(&[1], 1);
        let (salt_a, salt_b) = (TenantSalt::generate(), TenantSalt::generate());
        let src = sources(&[("erp", val(b"p"))]);
        let b = plan_sealed(
            &r,
            &salt_b,
            "uid-b",
            "acme",
            &policy(),
            &[entry("erp")],
            &src,
            &BTreeMap::new(),
        )
        .unwrap();
        let a = plan_sealed(&r, &salt_a, "uid-a", "acme", &policy(), &[entry("erp")], &src, &b.data).unwrap();
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

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| Some(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: map(labels),
            annotations: map(annotations),
            ..ObjectMeta::default()
        }
    }

    fn entry_in(ns: &str, name: &str) -> TenantSecret {
        TenantSecret {
            name: "stolen".into(),
            secret_ref: SecretKeyRef {
                namespace: ns.into(),
                name: name.into(),
                key: "k".into(),
            },
        }
    }

    /// The condition message a Tenant author sees for one entry, given what
    /// the operator found (None: not found or forbidden).
    fn seen(p: &SourcePolicy, tenant: &str, e: &TenantSecret, found: Option<&ObjectMeta>) -> Vec<String> {
        let source = match decide(p, tenant, &e.secret_ref.namespace, found) {
            Decision::Read => val(b"plain"),
            Decision::Missing => Source::SecretMissing,
            Decision::NotAllowed => Source::NotAllowed,
        };
        let plan = plan_sealed(
            &ring(&[1], 1),
            &TenantSalt::generate(),
            "uid",
            tenant,
            p,
            std::slice::from_ref(e),
            &sources(&[("stolen", source)]),
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(plan.data.is_empty(), "something was sealed for a refused source");
        [plan.missing, plan.not_allowed].concat()
    }

    #[test]
    fn sources_outside_the_allowed_set_are_refused_with_one_message() {
        // The operator namespace is never a source, even when configured.
        let (p, had_own) = SourcePolicy::new("tenant-system", " src , tenant-system,,other ");
        assert!(had_own);
        assert_eq!(p.namespaces, BTreeSet::from(["src".to_string(), "other".to_string()]));
        let opted = |ns: &str, name: &str| meta(ns, name, &[(SEAL_FOR, "acme")], &[(SEAL_FOR, "acme")]);
        let hostile = [
            // The root keys and the operator's database Secret, even when
            // they carry the opt-in (anyone able to label them could also
            // read them; the operator never offers them).
            entry_in("tenant-system", "tenant-operator-root-keys"),
            entry_in("tenant-system", "tenant-operator-db"),
            entry_in("tenant-system", "tenant-globex-db"),
            // kube-system, not configured and not opted in.
            entry_in("kube-system", "bootstrap-token-abcdef"),
        ];
        for e in &hostile {
            let r = &e.secret_ref;
            let expected = vec![not_allowed_message(&p, "acme", e)];
            let exists = meta(&r.namespace, &r.name, &[], &[]);
            let labelled = opted(&r.namespace, &r.name);
            let for_other = meta(
                &r.namespace,
                &r.name,
                &[(SEAL_FOR, "globex")],
                &[(SEAL_FOR, "globex,initech")],
            );
            let found: [Option<&ObjectMeta>; 4] = [None, Some(&exists), Some(&for_other), Some(&labelled)];
            for f in found {
                let refused_anyway = r.namespace == "tenant-system";
                if f == Some(&labelled) && !refused_anyway {
                    continue;
                }
                assert_eq!(
                    seen(&p, "acme", e, f),
                    expected,
                    "{}/{} found as {f:?}",
                    r.namespace,
                    r.name
                );
            }
        }
        // Outside the source namespaces: missing, present, labelled for
        // another tenant (or for a tenant whose name merely contains this
        // one's) all read the same.
        let e = entry_in("acme-onboarding", "erp");
        let expected = vec![not_allowed_message(&p, "acme", &e)];
        for f in [
            None,
            Some(meta("acme-onboarding", "erp", &[], &[])),
            Some(meta("acme-onboarding", "erp", &[(SEAL_FOR, "globex")], &[])),
            Some(meta(
                "acme-onboarding",
                "erp",
                &[(SEAL_FOR, "acme-eu")],
                &[(SEAL_FOR, "acme-eu, xacme")],
            )),
            Some(meta(
                "acme-onboarding",
                "erp",
                &[("tenancy.dev/seal-for-acme", "true")],
                &[],
            )),
        ] {
            assert_eq!(seen(&p, "acme", &e, f.as_ref()), expected, "found as {f:?}");
        }
        assert!(!expected[0].contains("not found"));
        // A metadata answer for another namespace than the one asked is not
        // trusted.
        assert_eq!(
            decide(&p, "acme", "acme-onboarding", Some(&opted("src", "erp"))),
            Decision::NotAllowed
        );
        assert_eq!(decide(&p, "acme", "", Some(&opted("", "erp"))), Decision::NotAllowed);
    }

    #[test]
    fn opted_in_or_source_namespace_secrets_are_read() {
        let p = SourcePolicy::new("tenant-system", "src").0;
        let by_label = meta("acme-onboarding", "erp", &[(SEAL_FOR, "acme")], &[]);
        let by_annotation = meta("acme-onboarding", "erp", &[], &[(SEAL_FOR, "globex, acme")]);
        assert_eq!(decide(&p, "acme", "acme-onboarding", Some(&by_label)), Decision::Read);
        assert_eq!(
            decide(&p, "acme", "acme-onboarding", Some(&by_annotation)),
            Decision::Read
        );
        assert_eq!(
            decide(&p, "globex", "acme-onboarding", Some(&by_label)),
            Decision::NotAllowed
        );
        assert_eq!(
            decide(&p, "globex", "acme-onboarding", Some(&by_annotation)),
            Decision::Read
        );
        // In a source namespace every Secret is allowed, and a missing one is
        // reported as missing (the configuration opened that namespace).
        assert_eq!(
            decide(&p, "acme", "src", Some(&meta("src", "x", &[], &[]))),
            Decision::Read
        );
        assert_eq!(decide(&p, "acme", "src", None), Decision::Missing);
        let e = entry_in("src", "gone");
        assert_eq!(
            seen(&p, "acme", &e, None),
            vec!["stolen: Secret src/gone not found".to_string()]
        );
    }

    #[test]
    fn plaintext_never_shows_in_debug_and_other_values_are_wiped() {
        let v = val(b"hunter2-plaintext");
        assert!(!format!("{v:?}").contains("hunter2"), "{v:?}");
        assert!(!format!("{:?}", sources(&[("a", v)])).contains("hunter2"));
        let data = BTreeMap::from([
            ("password".to_string(), k8s_openapi::ByteString(b"hunter2".to_vec())),
            ("other".to_string(), k8s_openapi::ByteString(b"other-secret".to_vec())),
        ]);
        match Source::take_key(Some(data), "password") {
            Source::Value(p) => assert_eq!(p.as_slice(), b"hunter2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(Source::take_key(None, "password"), Source::KeyMissing);
    }

    #[test]
    fn a_source_no_longer_allowed_loses_its_envelope() {
        let (r, salt) = (ring(&[1], 1), TenantSalt::generate());
        let spec = [entry("erp")];
        let first = plan_sealed(
            &r,
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", val(b"p"))]),
            &BTreeMap::new(),
        )
        .unwrap();
        let p = plan_sealed(
            &r,
            &salt,
            "uid",
            "acme",
            &policy(),
            &spec,
            &sources(&[("erp", Source::NotAllowed)]),
            &first.data,
        )
        .unwrap();
        assert!(p.changed && p.data.is_empty());
        assert_eq!(p.not_allowed, vec![not_allowed_message(&policy(), "acme", &spec[0])]);
    }
}
