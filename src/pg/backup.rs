//! SQL of per-tenant backups and restores: the backups table, the restore
//! lock, and moving the live schema aside and back.
//!
//! Takes a validated [`TenantName`] (identifiers come only from it) and the
//! tenant's uid; gives the steps `crate::backup` strings together. Side
//! effects: rows in `tenancy.backups`, `ALTER SCHEMA ... RENAME`,
//! `DROP SCHEMA` of the tenant's own (marked) schemas, `ALTER ROLE` login,
//! and a session-level advisory lock while a restore runs.
//!
//! Crash safety: a restore renames `tenant_x` to `tenant_x$aside` (a name no
//! tenant's schema can have: tenant names have no `$`) and holds the restore
//! lock until it is done. Whoever finds an aside schema while the lock is free
//! finishes the job ([`recover_aside`]): the live schema exists only if
//! `pg_restore --single-transaction` committed (then the aside one is
//! dropped), otherwise the aside one is renamed back.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

use super::tenant::ownership_marker;
use super::{query_err, quote_ident, PgError};
use crate::names::TenantName;

/// First key of the restore lock (`pg_advisory_lock(int, int)`); the second
/// is `hashtext(<schema>)`.
const RESTORE_LOCK_CLASS: i32 = 0x7465_6e72; // "tenr"

/// The name a restore moves the live schema to.
pub fn aside_schema(name: &TenantName) -> String {
    format!("{}$aside", name.schema())
}

/// One row of `tenancy.backups`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRow {
    pub id: String,
    pub taken_at: chrono::DateTime<chrono::Utc>,
    pub bytes: i64,
    pub key_version: i32,
}

/// Records a finished backup (idempotent on the id).
pub async fn record_backup(pool: &PgPool, uid: &str, row: &BackupRow) -> Result<(), PgError> {
    sqlx::query(
        "INSERT INTO tenancy.backups (tenant_uid, id, taken_at, bytes, key_version) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_uid, id) DO NOTHING",
    )
    .bind(uid)
    .bind(&row.id)
    .bind(row.taken_at)
    .bind(row.bytes)
    .bind(row.key_version)
    .execute(pool)
    .await
    .map_err(query_err("recording the backup"))?;
    Ok(())
}

/// Forgets backups that were pruned from the store.
pub async fn forget_backups(pool: &PgPool, uid: &str, ids: &[String]) -> Result<(), PgError> {
    sqlx::query("DELETE FROM tenancy.backups WHERE tenant_uid = $1 AND id = ANY($2)")
        .bind(uid)
        .bind(ids)
        .execute(pool)
        .await
        .map_err(query_err("forgetting pruned backups"))?;
    Ok(())
}

/// The newest recorded backup of the tenant.
pub async fn last_backup(pool: &PgPool, uid: &str) -> Result<Option<BackupRow>, PgError> {
    let row: Option<(String, chrono::DateTime<chrono::Utc>, i64, i32)> = sqlx::query_as(
        "SELECT id, taken_at, bytes, key_version FROM tenancy.backups WHERE tenant_uid = $1 ORDER BY taken_at DESC, id DESC LIMIT 1",
    )
    .bind(uid)
    .fetch_optional(pool)
    .await
    .map_err(query_err("reading the last backup"))?;
    Ok(row.map(|(id, taken_at, bytes, key_version)| BackupRow { id, taken_at, bytes, key_version }))
}

/// The recorded backup `id`, or (None) the newest taken at or before
/// `before` (or the newest of all).
pub async fn find_backup(pool: &PgPool, uid: &str, id: Option<&str>, before: Option<chrono::DateTime<chrono::Utc>>) -> Result<Option<BackupRow>, PgError> {
    let row: Option<(String, chrono::DateTime<chrono::Utc>, i64, i32)> = sqlx::query_as(
        "SELECT id, taken_at, bytes, key_version FROM tenancy.backups
          WHERE tenant_uid = $1 AND ($2::text IS NULL OR id = $2) AND ($3::timestamptz IS NULL OR taken_at <= $3)
          ORDER BY taken_at DESC, id DESC LIMIT 1",
    )
    .bind(uid)
    .bind(id)
    .bind(before)
    .fetch_optional(pool)
    .await
    .map_err(query_err("reading the tenant's backups"))?;
    Ok(row.map(|(id, taken_at, bytes, key_version)| BackupRow { id, taken_at, bytes, key_version }))
}

/// The registry row's state (`Active`/`Suspended`) of the tenant with `uid`.
pub async fn registry_state(pool: &PgPool, uid: &str) -> Result<Option<String>, PgError> {
    sqlx::query_scalar("SELECT state FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the tenant registry"))
}

/// The tenant's schema version, from its migrations table when there is one.
pub async fn schema_version(pool: &PgPool, name: &TenantName) -> Result<Option<i64>, PgError> {
    let v = super::migrations::observe(pool, name).await?;
    Ok((v.schema_exists && !v.applied.is_empty()).then(|| v.current()))
}

/// A session holding the tenant's restore lock; unlocks when released.
pub struct RestoreLock {
    conn: Option<PoolConnection<Postgres>>,
    schema: String,
}

impl RestoreLock {
    /// Releases the lock (dropping without this closes the session, which
    /// releases it too).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))").bind(RESTORE_LOCK_CLASS).bind(&self.schema).execute(&mut *conn).await;
        }
    }
}

impl Drop for RestoreLock {
    fn drop(&mut self) {
        // A lock still held here (an early return, a panic): close the
        // session instead of returning it to the pool with the lock.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// Inside a transaction about to let the app role log in: holds the restore
/// lock shared until commit, so a restore cannot start in between, and says
/// false (do nothing) when a restore holds it.
pub async fn guard_against_restore(tx: &mut sqlx::PgConnection, name: &TenantName) -> Result<bool, PgError> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock_shared($1, hashtext($2))")
        .bind(RESTORE_LOCK_CLASS)
        .bind(name.schema())
        .fetch_one(tx)
        .await
        .map_err(query_err("checking for a running restore"))
}

/// Takes the tenant's restore lock for a restore, waiting up to `wait` for a
/// reconcile that holds it briefly (shared, inside its transaction); None
/// when another restore holds it.
pub async fn restore_lock(pool: &PgPool, name: &TenantName, wait: std::time::Duration) -> Result<Option<RestoreLock>, PgError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(lock) = try_restore_lock(pool, name).await? {
            return Ok(Some(lock));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Takes the tenant's restore lock without waiting; None when a restore
/// holds it.
pub async fn try_restore_lock(pool: &PgPool, name: &TenantName) -> Result<Option<RestoreLock>, PgError> {
    let mut conn = pool.acquire().await.map_err(query_err("connecting for the restore lock"))?;
    let schema = name.schema();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(RESTORE_LOCK_CLASS)
        .bind(&schema)
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("taking the restore lock"))?;
    Ok(got.then(|| RestoreLock { conn: Some(conn), schema }))
}

/// What [`recover_aside`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsideState {
    /// No aside schema: nothing to do (no statement was run besides reads).
    Clean,
    /// A restore is running (it holds the lock): leave the tenant alone.
    RestoreRunning,
    /// An interrupted restore had not committed: the original schema was
    /// renamed back.
    PutBack,
    /// An interrupted restore had committed: the old schema was dropped.
    DroppedOld,
}

async fn marker_of(pool: &PgPool, schema: &str) -> Result<Option<Option<String>>, PgError> {
    let row: Option<(Option<String>,)> = sqlx::query_as("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1")
        .bind(schema)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading a tenant schema"))?;
    Ok(row.map(|r| r.0))
}

/// Finishes an interrupted restore of the tenant, if there is one. Reads
/// only (one catalog query and the lock) when there is nothing to do; acts
/// only on schemas that carry this tenant's ownership marker.
pub async fn recover_aside(pool: &PgPool, name: &TenantName, uid: &str) -> Result<AsideState, PgError> {
    let Some(lock) = try_restore_lock(pool, name).await? else {
        return Ok(AsideState::RestoreRunning);
    };
    let result = recover_aside_locked(pool, name, uid).await;
    lock.release().await;
    result
}

/// [`recover_aside`] for a caller that holds the restore lock.
pub async fn recover_aside_locked(pool: &PgPool, name: &TenantName, uid: &str) -> Result<AsideState, PgError> {
    let marker = ownership_marker(uid);
    let aside = aside_schema(name);
    match marker_of(pool, &aside).await? {
        Some(Some(m)) if m == marker => {}
        // None, or someone else's: not ours to touch.
        _ => return Ok(AsideState::Clean),
    }
    let live = marker_of(pool, &name.schema()).await?;
    let (aside_q, live_q) = (quote_ident(&aside)?, quote_ident(&name.schema())?);
    if live.is_some() {
        exec(pool, format!("DROP SCHEMA {aside_q} CASCADE"), "dropping the schema a restore replaced").await?;
        Ok(AsideState::DroppedOld)
    } else {
        exec(pool, format!("ALTER SCHEMA {aside_q} RENAME TO {live_q}"), "renaming the tenant's schema back").await?;
        Ok(AsideState::PutBack)
    }
}

async fn exec(pool: &PgPool, stmt: String, action: &'static str) -> Result<(), PgError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(stmt)).execute(pool).await.map_err(query_err(action))?;
    Ok(())
}

/// Whether the tenant's live schema exists with this tenant's marker.
pub async fn live_schema_is_ours(pool: &PgPool, name: &TenantName, uid: &str) -> Result<bool, PgError> {
    Ok(matches!(marker_of(pool, &name.schema()).await?, Some(Some(m)) if m == ownership_marker(uid)))
}

/// Locks the app role out and ends its sessions (before a restore).
pub async fn lock_out_app(pool: &PgPool, name: &TenantName) -> Result<i64, PgError> {
    let app = quote_ident(&name.app_role())?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(name.app_role())
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the app role"))?;
    if !exists {
        return Ok(0);
    }
    exec(pool, format!("ALTER ROLE {app} NOLOGIN"), "disabling the app role's login").await?;
    super::tenant::terminate_sessions(pool, name).await
}

/// Gives the app role its login back when the registry says Active.
pub async fn restore_login(pool: &PgPool, name: &TenantName, uid: &str) -> Result<bool, PgError> {
    if registry_state(pool, uid).await?.as_deref() != Some("Active") {
        return Ok(false);
    }
    let app = quote_ident(&name.app_role())?;
    exec(pool, format!("ALTER ROLE {app} LOGIN"), "enabling the app role's login").await?;
    Ok(true)
}

/// Moves the live schema aside (the caller holds the restore lock).
pub async fn move_aside(pool: &PgPool, name: &TenantName) -> Result<(), PgError> {
    let (live, aside) = (quote_ident(&name.schema())?, quote_ident(&aside_schema(name))?);
    exec(pool, format!("ALTER SCHEMA {live} RENAME TO {aside}"), "moving the tenant's schema aside").await
}

/// After a failed restore: drops whatever live schema the restore left (only
/// one with this tenant's marker, or none at all) and renames the original
/// back.
pub async fn put_back(pool: &PgPool, name: &TenantName, uid: &str) -> Result<(), PgError> {
    let live = marker_of(pool, &name.schema()).await?;
    let (live_q, aside_q) = (quote_ident(&name.schema())?, quote_ident(&aside_schema(name))?);
    let mut tx = pool.begin().await.map_err(query_err("starting the put-back transaction"))?;
    if let Some(m) = live {
        if m.as_deref() != Some(ownership_marker(uid).as_str()) && m.is_some() {
            return Err(PgError::MissingPrivilege {
                role: "restore".into(),
                what: format!("schema {} to carry this tenant's marker before it is replaced", name.schema()),
            });
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {live_q} CASCADE"))).execute(&mut *tx).await.map_err(query_err("dropping a failed restore"))?;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER SCHEMA {aside_q} RENAME TO {live_q}")))
        .execute(&mut *tx)
        .await
        .map_err(query_err("renaming the tenant's schema back"))?;
    tx.commit().await.map_err(query_err("committing the put-back"))?;
    Ok(())
}

/// After a successful restore: drops the old schema.
pub async fn drop_aside(pool: &PgPool, name: &TenantName) -> Result<(), PgError> {
    let aside = quote_ident(&aside_schema(name))?;
    exec(pool, format!("DROP SCHEMA IF EXISTS {aside} CASCADE"), "dropping the schema a restore replaced").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aside_name_cannot_be_another_tenants_schema() {
        let n = TenantName::parse("acme").unwrap();
        assert_eq!(aside_schema(&n), "tenant_acme$aside");
        assert!(TenantName::parse("acme$aside").is_err());
        assert_eq!(quote_ident(&aside_schema(&n)).unwrap(), "\"tenant_acme$aside\"");
    }
}
