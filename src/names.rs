//! Tenant names and every identifier derived from them.
//!
//! Takes a Kubernetes object name, gives a validated [`TenantName`] and the
//! Postgres and Kubernetes names built from it. Pure; no I/O. These are the
//! only places identifiers come from, so SQL quoting never sees a name that
//! was not validated here first.

use std::fmt;

use crate::api::tenant::NAME_MAX_LEN;

/// A tenant name that passed validation: a DNS-1123 label of at most 40
/// characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantName(String);

/// Why a name is not a valid tenant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("tenant name is empty")]
    Empty,
    #[error("tenant name {0:?} is longer than {NAME_MAX_LEN} characters")]
    TooLong(String),
    #[error("tenant name {0:?} is not a DNS-1123 label: use lower-case letters, digits and '-', starting and ending with a letter or digit")]
    NotDnsLabel(String),
}

impl TenantName {
    /// Validates `name` the way the CRD's CEL rule does.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > NAME_MAX_LEN {
            return Err(NameError::TooLong(name.chars().take(64).collect()));
        }
        let bytes = name.as_bytes();
        let ok_inner = bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        let ok_ends = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !ok_inner || !ok_ends(bytes[0]) || !ok_ends(bytes[bytes.len() - 1]) {
            return Err(NameError::NotDnsLabel(name.chars().take(64).collect()));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `tenant_<name>` with dashes as underscores. Injective: a DNS label has
    /// no underscores, so two names never map to one schema.
    pub fn schema(&self) -> String {
        format!("tenant_{}", self.0.replace('-', "_"))
    }

    /// The NOLOGIN role that owns the schema and everything in it.
    pub fn owner_role(&self) -> String {
        format!("{}_owner", self.schema())
    }

    /// The LOGIN role the application uses; DML on its own schema only.
    pub fn app_role(&self) -> String {
        format!("{}_app", self.schema())
    }

    /// The LOGIN role (NOINHERIT, member of the owner role only) under which
    /// the operator, and the Jobs it starts for this tenant, run anything
    /// the tenant's owner controls: migrations, dumps, restores, reads of the
    /// tenant's own tables. Its password is derived from the root key
    /// ([`crate::crypto::login_password`]) and stored nowhere.
    pub fn ops_role(&self) -> String {
        format!("{}_ops", self.schema())
    }

    /// The Kubernetes Secret holding the app role's connection details.
    pub fn db_secret(&self) -> String {
        format!("tenant-{}-db", self.0)
    }

    /// The Kubernetes Secret holding the tenant's sealed secrets.
    pub fn sealed_secret(&self) -> String {
        format!("tenant-{}-sealed", self.0)
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels_up_to_40_characters() {
        for ok in ["a", "acme", "a-b", "0", "9lives", "select", "user", &"a".repeat(40)] {
            assert!(TenantName::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let long = "a".repeat(41);
        for bad in [
            "", "-a", "a-", "A", "a_b", "a.b", "a b", "é", "a;drop", "x\"y", "x'y", "tenant\0", &long,
        ] {
            assert!(TenantName::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn derived_names_fit_postgres_identifier_limit() {
        let n = TenantName::parse(&"z".repeat(40)).unwrap();
        for id in [n.schema(), n.owner_role(), n.app_role(), n.ops_role()] {
            assert!(id.len() <= 63, "{id} is longer than NAMEDATALEN-1");
        }
    }

    #[test]
    fn names_differing_only_in_dash_position_get_distinct_identifiers() {
        let a = TenantName::parse("ab-c").unwrap();
        let b = TenantName::parse("a-bc").unwrap();
        assert_ne!(a.schema(), b.schema());
        assert_ne!(a.app_role(), b.app_role());
        assert_ne!(a.owner_role(), b.owner_role());
        assert_ne!(a.ops_role(), b.ops_role());
    }

    #[test]
    fn no_tenant_role_can_equal_another_tenants_role() {
        // Role names end in _owner, _app or _ops, so a tenant called
        // `x-owner`, `x-app` or `x-ops` never gets a role of tenant `x`.
        let names: Vec<TenantName> = [
            "x",
            "x-owner",
            "x-app",
            "x-ops",
            "x-app-owner",
            "x-owner-app",
            "x-ops-app",
            "x-app-ops",
            "x-owner-ops",
        ]
        .iter()
        .map(|n| TenantName::parse(n).unwrap())
        .collect();
        let mut roles: Vec<String> = names
            .iter()
            .flat_map(|n| [n.owner_role(), n.app_role(), n.ops_role()])
            .collect();
        let before = roles.len();
        roles.sort();
        roles.dedup();
        assert_eq!(before, roles.len(), "two tenants share a role: {roles:?}");
    }
}
