//! What the operator stamps on every object it writes: its field manager
//! and its labels. A leaf: it imports nothing of the controllers, so any
//! of them (and the CLI) may use it.

use std::collections::BTreeMap;

/// The field manager of every write the operator makes (Server-Side Apply
/// of the objects it owns and of the status of its custom resources).
pub const FIELD_MANAGER: &str = "tenant-operator";

/// The field manager of `status.usage` (the usage sampler's figures): a
/// manager of its own, so that the Tenant controller's status applies,
/// which leave `usage` out, never remove it.
pub const USAGE_FIELD_MANAGER: &str = "tenant-operator-usage";

/// The label on every object the operator owns.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tenant-operator");

/// The label naming the tenant an owned object belongs to.
pub const TENANT_LABEL: &str = "tenancy.dev/tenant";

/// The label selector of every object the operator owns.
pub fn managed_selector() -> String {
    format!("{}={}", MANAGED_BY.0, MANAGED_BY.1)
}

/// [`MANAGED_BY`] and `extra`.
pub fn managed(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    std::iter::once(MANAGED_BY)
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The labels of an object of `tenant`: [`MANAGED_BY`] and [`TENANT_LABEL`].
pub fn of_tenant(tenant: &str) -> BTreeMap<String, String> {
    managed(&[(TENANT_LABEL, tenant)])
}

/// Whether `have` carries every label of `want` (other labels, added by
/// other tools, do not matter).
pub fn carries(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_labels_name_the_operator_and_the_tenant() {
        let l = of_tenant("acme");
        assert_eq!(l.len(), 2);
        assert_eq!(l["app.kubernetes.io/managed-by"], "tenant-operator");
        assert_eq!(l["tenancy.dev/tenant"], "acme");
        assert_eq!(managed_selector(), "app.kubernetes.io/managed-by=tenant-operator");
    }

    #[test]
    fn labels_added_by_others_do_not_count_as_a_difference() {
        let want = managed(&[("tenancy.dev/ratelimit-config", "rl")]);
        let mut have = want.clone();
        have.insert("team".into(), "payments".into());
        assert!(carries(&have, &want));
        have.insert("tenancy.dev/ratelimit-config".into(), "other".into());
        assert!(!carries(&have, &want));
        assert!(!carries(&BTreeMap::new(), &want));
    }
}
