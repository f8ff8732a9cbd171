//! What tenant DDL, migrations, moves and restores share, so none imports
//! another: the ownership marker, the name of a schema put aside by a
//! restore, the restore lock (the row `('restore', <uid>)` of
//! `tenancy.locks`) and the migration lock held by others than a migration
//! run ([`hold_migrations`]). A leaf of `pg`.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use super::{query_err, quote_literal, PgError};
use crate::names::TenantName;

/// The marker the operator writes on everything it creates for a tenant, so
/// it never adopts an object it did not create (another database's tenant
/// of the same name, a left-over of a deleted tenant, a hand-made role).
pub fn ownership_marker(uid: &str) -> String {
    format!("managed by tenancy.dev for tenant uid {uid}")
}

/// The `kind` of a tenant's migration lock row in `tenancy.locks` (its
/// key is the tenant's uid; made with the registry row).
pub const MIGRATION_LOCK_KIND: &str = "migrate";

/// The `kind` of the restore lock's row in `tenancy.locks`.
pub const LOCK_KIND: &str = "restore";

/// The name a restore moves the live schema to.
pub fn aside_schema(name: &TenantName) -> String {
    format!("{}$aside", name.schema())
}

/// Whether `e` is Postgres's "lock not available" (NOWAIT, lock_timeout).
fn is_lock_busy(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

/// Locks the tenant's restore row inside the caller's transaction
/// (`FOR UPDATE` when `exclusive`, else `FOR SHARE`), without waiting;
/// false when another transaction holds it in a conflicting mode. A false
/// leaves the transaction aborted: roll it back.
pub async fn lock_row(tx: &mut PgConnection, uid: &str, exclusive: bool) -> Result<bool, PgError> {
    sqlx::query("INSERT INTO tenancy.locks (kind, key) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(LOCK_KIND)
        .bind(uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("creating the restore lock's row"))?;
    let sql = if exclusive {
        "SELECT 1 FROM tenancy.locks WHERE kind = $1 AND key = $2 FOR UPDATE NOWAIT"
    } else {
        "SELECT 1 FROM tenancy.locks WHERE kind = $1 AND key = $2 FOR SHARE NOWAIT"
    };
    match sqlx::query(sql).bind(LOCK_KIND).bind(uid).execute(&mut *tx).await {
        Ok(_) => Ok(true),
        Err(e) if is_lock_busy(&e) => Ok(false),
        Err(e) => Err(PgError::Query {
            action: "taking the restore lock",
            source: e,
        }),
    }
}

/// Inside a transaction about to let the app role log in: holds the restore
/// lock shared until commit, so that no restore step can run in between,
/// and says false (do nothing) when a restore holds the lock or one is
/// under way (an aside schema of this tenant exists).
pub async fn guard_against_restore(tx: &mut PgConnection, name: &TenantName, uid: &str) -> Result<bool, PgError> {
    if !lock_row(tx, uid, false).await? {
        return Ok(false);
    }
    let aside: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1 AND obj_description(oid, 'pg_namespace') = $2)",
    )
    .bind(aside_schema(name))
    .bind(ownership_marker(uid))
    .fetch_one(&mut *tx)
    .await
    .map_err(query_err("checking for a restore under way"))?;
    Ok(!aside)
}

/// Takes the tenant's migration lock on `pool`'s server (the row migration
/// runs take `FOR UPDATE NOWAIT`) and holds it in the returned transaction:
/// no migration of the tenant runs there until it ends (one under way is
/// waited for, up to `wait`). A move's cutover holds it from before writes
/// stop to the commit, so no DDL can land on the source unseen; the
/// reconcile's audit step holds it while it creates audit objects, which a
/// migration run creates too when it finds them missing.
pub async fn hold_migrations(
    pool: &PgPool,
    uid: &str,
    wait: Duration,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, PgError> {
    let mut tx = pool.begin().await.map_err(query_err("taking the migration lock"))?;
    // One round trip (every new tenant's audit step takes it): the uid is
    // quoted, the wait is digits. The transaction only holds the lock (its
    // one write, the lock's row, is made again by whoever needs it next), so
    // its commit does not wait for the disk (`synchronous_commit` off): with
    // fsync on, that wait was one of the six a new tenant's provisioning
    // made (docs/scale.md).
    let uid = quote_literal(uid)?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{}ms';
         SET LOCAL synchronous_commit = off;
         INSERT INTO tenancy.locks (kind, key) VALUES ('{MIGRATION_LOCK_KIND}', {uid}) ON CONFLICT DO NOTHING;
         SELECT 1 FROM tenancy.locks WHERE kind = '{MIGRATION_LOCK_KIND}' AND key = {uid} FOR UPDATE",
        wait.as_millis()
    )))
    .execute(&mut *tx)
    .await
    .map_err(query_err("waiting for the tenant's migration to end"))?;
    Ok(tx)
}
