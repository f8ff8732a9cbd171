//! What the effectful parts share: the tenant's uid and key salt from the
//! registry, its confined session, the check that it has an audit log.
//!
//! Takes the admin pool, the root keys and a validated [`TenantName`];
//! gives a uid, a salt, a [`Confined`] session or an error. Side effects:
//! reads the registry and the catalogs; opens a connection as the tenant's
//! ops login (the caller closes it).

use sqlx::{PgConnection, PgPool};

use super::observe::observe;
use crate::crypto::{Keyring, TenantSalt};
use crate::names::TenantName;
use crate::pg::confined::{self, Confined, OpsLogin};
use crate::pg::PgError;

/// The tenant's HKDF salt (from the registry; made with the tenant).
pub(super) async fn salt_of(pool: &PgPool, name: &TenantName, uid: &str) -> Result<TenantSalt, PgError> {
    crate::pg::registry::existing_key_salt(pool, uid)
        .await?
        .ok_or_else(|| PgError::Audit {
            tenant: name.to_string(),
            what: "the tenant has no key salt in the registry (it is not provisioned)".into(),
        })
}

/// The uid of a tenant by name, from the registry.
pub(super) async fn uid_for(pool: &PgPool, name: &TenantName) -> Result<String, PgError> {
    crate::pg::registry::uid_of(pool, name.as_str())
        .await?
        .ok_or_else(|| PgError::Audit {
            tenant: name.to_string(),
            what: "the tenant is not in the registry".into(),
        })
}

/// A confined session of the tenant (its ops login, password derived from
/// the active root key), on the admin pool's server.
pub(super) async fn open_confined(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    uid: &str,
) -> Result<Confined, PgError> {
    let salt = salt_of(pool, name, uid).await?;
    confined_with(pool, ring, name, uid, &salt).await
}

/// [`open_confined`] with the tenant's key salt already read.
pub(super) async fn confined_with(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    uid: &str,
    salt: &TenantSalt,
) -> Result<Confined, PgError> {
    let login = OpsLogin::derive(&crate::pg::Target::of_pool(pool), name, uid, ring, salt).map_err(PgError::Keys)?;
    confined::connect(pool, &login).await
}

pub(super) fn misshapen(name: &TenantName, objects: &[String]) -> PgError {
    PgError::Audit {
        tenant: name.to_string(),
        what: format!(
            "{} in schema {} is not a table (the tenant's owner replaced it, e.g. by a view): the operator does not touch it; \
             the chain cannot be kept or verified until an administrator puts the table back (docs/audit.md)",
            objects.join(" and "),
            name.schema()
        ),
    }
}

/// Checks that the tenant has an audit log; gives whether it can be sealed
/// (its pending table and seal function are there: a tenant made by an
/// earlier version has them from its next reconcile).
pub(super) async fn require_audit(conn: &mut PgConnection, name: &TenantName) -> Result<bool, PgError> {
    let state = observe(conn, name, &[]).await?;
    if !state.misshapen.is_empty() {
        return Err(misshapen(name, &state.misshapen));
    }
    if !state.table || !state.head {
        return Err(PgError::Audit {
            tenant: name.to_string(),
            what: "it has no audit log (the tenant does not exist or was never reconciled)".into(),
        });
    }
    Ok(state.pending && state.functions_current)
}
