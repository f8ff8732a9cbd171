//! Sealing: moving the pending entries (appended by the triggers without a
//! lock) into the chain. Every committing writer under READ COMMITTED
//! seals at commit, unless another seal is under way; what no commit
//! sealed (the last writers of a burst whose seal found another one
//! running, REPEATABLE READ writers) is sealed here: by `audit verify` and
//! `audit export` before they read, and by the operator's periodic pass
//! ([`seal_pending`]) for every tenant that has pending entries.
//!
//! Takes the admin pool, the root keys, a validated [`TenantName`] or a
//! confined session; gives how many entries were sealed. Side effects:
//! reads the catalogs and the statistics (admin), runs the tenant's seal
//! function on its confined session (as the owner).

use sqlx::{PgConnection, PgPool};

use super::consts::{AuditFns, PENDING_TABLE};
use super::session::open_confined;
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::{query_err, quote_ident, PgError};

/// Seals the tenant's pending entries on its confined session, waiting for
/// a seal under way. Returns how many were sealed.
pub(super) async fn seal_on(conn: &mut PgConnection, name: &TenantName) -> Result<u64, PgError> {
    let schema = quote_ident(&name.schema())?;
    let seal = quote_ident(&AuditFns::of(name).seal)?;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {schema}.{seal}(true)")))
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("sealing the audit log's pending entries"))?;
    Ok(n.max(0) as u64)
}

/// Before a read of the whole log (`audit verify`, `audit export`): seals
/// what no commit sealed yet, when the tenant's log can be sealed (a tenant
/// made by an earlier version has no pending table until its next
/// reconcile).
pub(super) async fn seal_first(conn: &mut PgConnection, name: &TenantName, sealable: bool) -> Result<(), PgError> {
    if sealable {
        seal_on(conn, name).await?;
    }
    Ok(())
}

/// The tenants of this server whose pending table holds entries, by the
/// statistics' live-tuple count (one query for all tenants, catalogs and
/// statistics only; the count lags commits by up to a second or so, and is
/// lost with the statistics in a crash: such entries wait for the tenant's
/// next commit, or its next `audit verify`).
pub async fn tenants_with_pending(pool: &PgPool) -> Result<Vec<(String, String)>, PgError> {
    sqlx::query_as(
        "SELECT t.name, t.uid
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN tenancy.tenants t ON t.schema_name = n.nspname
          WHERE c.relname = $1 AND c.relkind = 'r' AND pg_catalog.pg_stat_get_live_tuples(c.oid) > 0
          ORDER BY t.name",
    )
    .bind(PENDING_TABLE)
    .fetch_all(pool)
    .await
    .map_err(query_err("finding the audit logs with pending entries"))
}

/// The operator's pass: seals the pending entries of every tenant that has
/// some ([`tenants_with_pending`]), each on its confined session. A tenant
/// that fails is logged and left to the next pass. Returns the entries
/// sealed.
pub async fn seal_pending(pool: &PgPool, ring: &Keyring) -> Result<u64, PgError> {
    let mut sealed = 0;
    for (tenant, uid) in tenants_with_pending(pool).await? {
        let Ok(name) = TenantName::parse(&tenant) else {
            continue;
        };
        let one = async {
            let mut c = open_confined(pool, ring, &name, &uid).await?;
            let n = seal_on(&mut c, &name).await;
            c.close().await;
            n
        };
        match one.await {
            Ok(n) => sealed += n,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "sealing the audit log's pending entries failed; retrying at the next pass")
            }
        }
    }
    Ok(sealed)
}
