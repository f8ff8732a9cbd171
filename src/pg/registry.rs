//! The tenant registry's rows outside the DDL: the operator's record of its
//! actions (`tenancy.audit_log`), the per-tenant key salt and key version,
//! and look-ups by name. A leaf of `pg`: tenant DDL, the audit log, backups
//! and migrations all write here, and it imports none of them.
//!
//! Takes a tenant's uid (and name); gives rows as plain values. Side
//! effects: rows in `tenancy.audit_log` and `tenancy.tenants`.

use sqlx::PgPool;

use super::{query_err, PgError};

/// Records one thing the operator did to a tenant (provisioned, suspended,
/// restored, deleted, ...) as a row of `tenancy.audit_log`, the operator's
/// own record of its actions. Not the tenant's data audit log
/// ([`crate::pg::audit`], a hash chain inside the tenant's schema).
pub async fn record_event<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    uid: &str,
    name: Option<&str>,
    action: &str,
    actor: &str,
    detail: serde_json::Value,
) -> Result<(), PgError> {
    sqlx::query(
        "INSERT INTO tenancy.audit_log (tenant_uid, tenant_name, action, actor, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uid)
    .bind(name)
    .bind(action)
    .bind(actor)
    .bind(sqlx::types::Json(detail))
    .execute(exec)
    .await
    .map_err(query_err("writing the audit log"))?;
    Ok(())
}

/// The tenant's HKDF salt from the registry, made now if the row predates
/// salts. None when the tenant has no registry row.
pub async fn key_salt(pool: &PgPool, uid: &str) -> Result<Option<crate::crypto::TenantSalt>, PgError> {
    let salt: Option<Vec<u8>> = sqlx::query_scalar(
        "UPDATE tenancy.tenants SET key_salt = coalesce(key_salt, $2) WHERE uid = $1 RETURNING key_salt",
    )
    .bind(uid)
    .bind(crate::crypto::TenantSalt::generate().to_vec())
    .fetch_optional(pool)
    .await
    .map_err(query_err("reading the tenant's key salt"))?;
    salt.map(|s| crate::crypto::TenantSalt::from_bytes(&s))
        .transpose()
        .map_err(|_| PgError::MissingPrivilege {
            role: "registry".into(),
            what: "a 32-byte key salt".into(),
        })
}

/// The tenant's salt without creating one (for reading envelopes).
pub async fn existing_key_salt(pool: &PgPool, uid: &str) -> Result<Option<crate::crypto::TenantSalt>, PgError> {
    let salt: Option<Option<Vec<u8>>> = sqlx::query_scalar("SELECT key_salt FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the tenant's key salt"))?;
    Ok(salt
        .flatten()
        .and_then(|s| crate::crypto::TenantSalt::from_bytes(&s).ok()))
}

/// Records the root key version of the tenant's sealed data; writes only
/// when it changed.
pub async fn set_key_version(pool: &PgPool, uid: &str, version: Option<u32>) -> Result<(), PgError> {
    sqlx::query("UPDATE tenancy.tenants SET key_version = $2 WHERE uid = $1 AND key_version IS DISTINCT FROM $2")
        .bind(uid)
        .bind(version.map(|v| v as i32))
        .execute(pool)
        .await
        .map_err(query_err("recording the tenant's key version"))?;
    Ok(())
}

/// Root key versions some tenant's sealed data still uses.
pub async fn key_versions_in_use(pool: &PgPool) -> Result<Vec<u32>, PgError> {
    let v: Vec<i32> =
        sqlx::query_scalar("SELECT DISTINCT key_version FROM tenancy.tenants WHERE key_version IS NOT NULL ORDER BY 1")
            .fetch_all(pool)
            .await
            .map_err(query_err("reading the key versions in use"))?;
    Ok(v.into_iter().filter_map(|x| u32::try_from(x).ok()).collect())
}

/// The uid of the tenant called `name` in the registry.
pub async fn uid_of(pool: &PgPool, name: &str) -> Result<Option<String>, PgError> {
    sqlx::query_scalar("SELECT uid FROM tenancy.tenants WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the tenant registry"))
}

/// Whether anything of the tenant `uid` (schema `schema`) is in this
/// database: its registry row or its schema. Tells a tenant provisioned
/// before shards existed (on the operator's own database) from one never
/// provisioned.
pub async fn holds_tenant(pool: &PgPool, uid: &str, schema: &str) -> Result<bool, PgError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tenancy.tenants WHERE uid = $1)
             OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $2)",
    )
    .bind(uid)
    .bind(schema)
    .fetch_one(pool)
    .await
    .map_err(query_err("looking for the tenant in the registry"))
}

/// Copies tenant `uid`'s registry row (name, schema, key salt, key version,
/// audit exclusions) from `from` to `to`, state `Suspended` (a move's
/// target: its login stays off until the move commits). The same salt
/// makes the same keys on both. Idempotent; an error when `to` holds
/// another tenant of that name.
pub async fn copy_row(from: &PgPool, to: &PgPool, uid: &str) -> Result<(), PgError> {
    type Row = (String, String, Option<Vec<u8>>, Option<i32>, Vec<String>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT name, schema_name, key_salt, key_version, audit_exclude FROM tenancy.tenants WHERE uid = $1",
    )
    .bind(uid)
    .fetch_optional(from)
    .await
    .map_err(query_err("reading the tenant's registry row"))?;
    let Some((name, schema, salt, version, exclude)) = row else {
        return Err(PgError::NotRegistered(uid.to_owned()));
    };
    sqlx::query(
        "INSERT INTO tenancy.tenants (uid, name, schema_name, state, key_salt, key_version, audit_exclude)
         VALUES ($1, $2, $3, 'Suspended', $4, $5, $6)
         ON CONFLICT (uid) DO UPDATE SET key_salt = EXCLUDED.key_salt, key_version = EXCLUDED.key_version,
                                         audit_exclude = EXCLUDED.audit_exclude, updated_at = now()",
    )
    .bind(uid)
    .bind(&name)
    .bind(&schema)
    .bind(salt)
    .bind(version)
    .bind(&exclude)
    .execute(to)
    .await
    .map_err(query_err("copying the tenant's registry row"))?;
    record_event(
        to,
        uid,
        Some(&name),
        "MoveStarted",
        "tenant-operator (move)",
        serde_json::json!({}),
    )
    .await
}
