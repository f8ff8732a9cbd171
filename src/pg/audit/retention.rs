//! Retention: pruning the audit rows older than a cutoff while the chain
//! stays verifiable (an ANCHOR row at the cut, a PRUNE entry in the chain,
//! the cut recorded outside the schema), at most once a day when a reconcile
//! runs it ([`prune_due`]).
//!
//! Takes the admin pool, the root keys, a validated [`TenantName`], the
//! cutoff and the actor; gives a [`PruneOutcome`]. Side effects: writes
//! `tenancy.audit_heads` and `tenancy.audit_anchors` (admin), deletes and
//! appends audit rows on a confined session (as the owner).

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};

use super::consts::{AuditFns, AUDIT_TABLE, HEAD_TABLE};
use super::session::{open_confined, uid_for};
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::{query_err, quote_ident, PgError};

/// Whether a prune is due, and its cutoff: at most once a day. Pure.
pub fn prune_due(
    retention_days: Option<u32>,
    last_pruned: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let days = retention_days?;
    if last_pruned.is_some_and(|t| now - t < chrono::Duration::days(1)) {
        return None;
    }
    Some(now - chrono::Duration::days(days as i64))
}

/// What a prune did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneOutcome {
    /// Rows deleted (a previous anchor included).
    pub deleted: u64,
    /// The id of the new ANCHOR row (the last pruned row's id), if any.
    pub anchor: Option<i64>,
    pub statements: usize,
}

/// Deletes the audit rows older than `before` and keeps the rest
/// verifiable: an ANCHOR row takes the last pruned row's id, with
/// `prev_hash` and `hash` both that row's hash (the hash at the cut), so the
/// next row links to it; and a PRUNE row appended to the chain records the
/// cut (`row_pk`: through_id, cut_hash, rows), binding the anchor into the
/// chain. The cut is recorded in `tenancy.audit_heads` (admin) before the
/// rows go, so [`verify`] accepts an ANCHOR row only at or before a cut the
/// operator made; anchors before the cut are then forgotten. The rows are
/// deleted on a confined session, as the owner; appends wait meanwhile (the
/// head row is locked).
pub async fn prune(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    before: DateTime<Utc>,
    actor: &str,
) -> Result<PruneOutcome, PgError> {
    let uid = uid_for(pool, name).await?;
    let mut c = open_confined(pool, ring, name, &uid).await?;
    let out = prune_on(pool, &mut c, name, &uid, before, actor).await;
    c.close().await;
    out
}

pub(super) async fn prune_on(
    pool: &PgPool,
    conn: &mut PgConnection,
    name: &TenantName,
    uid: &str,
    before: DateTime<Utc>,
    actor: &str,
) -> Result<PruneOutcome, PgError> {
    let schema = quote_ident(&name.schema())?;
    let cut: Option<(i64, Vec<u8>, DateTime<Utc>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, hash, \"time\", operation FROM {schema}.{AUDIT_TABLE} WHERE \"time\" < $1 ORDER BY id DESC LIMIT 1"
    )))
    .bind(before)
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("finding the audit log's cut"))?;
    let mut out = PruneOutcome {
        deleted: 0,
        anchor: None,
        statements: 1,
    };
    if let Some((id, hash, time, _)) = cut.filter(|c| c.3 != "ANCHOR") {
        // The cut first, so that a crash between here and the delete
        // leaves a chain that still verifies (the cut row is still there).
        let recorded = sqlx::query("UPDATE tenancy.audit_heads SET cut_id = $2, cut_hash = $3 WHERE tenant_uid = $1")
            .bind(uid)
            .bind(id)
            .bind(&hash)
            .execute(pool)
            .await
            .map_err(query_err("recording the audit log's cut"))?
            .rows_affected();
        if recorded == 0 {
            return Err(PgError::Audit {
                tenant: name.to_string(),
                what: "its chain is not anchored yet (the next reconcile anchors it); not pruned".into(),
            });
        }
        let mut tx = Connection::begin(&mut *conn)
            .await
            .map_err(query_err("starting the prune"))?;
        sqlx::query("SELECT set_config('tenancy.audit_prune', 'on', true), set_config('tenancy.actor', $1, true), set_config('tenancy.request_id', '', true)")
            .bind(actor)
            .execute(&mut *tx)
            .await
            .map_err(query_err("marking the prune"))?;
        // Under the chain's lock: the cut row must still be there (another
        // prune may have cut further meanwhile).
        let still: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT (SELECT a.hash = $2 AND a.operation <> 'ANCHOR' FROM {schema}.{AUDIT_TABLE} a WHERE a.id = $1) FROM {schema}.{HEAD_TABLE} FOR UPDATE"
        )))
        .bind(id)
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("locking the audit chain"))?
        .flatten();
        out.statements += 3;
        if still == Some(true) {
            let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {schema}.{AUDIT_TABLE} WHERE id <= $1"
            )))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("pruning the audit log"))?
            .rows_affected();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {schema}.{AUDIT_TABLE} (id, \"time\", actor, actor_given, operation, row_pk, prev_hash, hash)
                 VALUES ($1, $2, $3, true, 'ANCHOR', jsonb_build_object('through_id', $1, 'before', $4::timestamptz, 'rows', $5::bigint), $6, $6)"
            )))
            .bind(id)
            .bind(time)
            .bind(actor)
            .bind(before)
            .bind(deleted as i64)
            .bind(&hash)
            .execute(&mut *tx)
            .await
            .map_err(query_err("writing the audit log's anchor"))?;
            let write = quote_ident(&AuditFns::of(name).write)?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {schema}.{write}('PRUNE', NULL, ARRAY[jsonb_build_object('through_id', $1::bigint, 'cut_hash', encode($2, 'hex'), 'rows', $3::bigint)], NULL)"
            )))
            .bind(id)
            .bind(&hash)
            .bind(deleted as i64)
            .execute(&mut *tx)
            .await
            .map_err(query_err("recording the prune in the chain"))?;
            out.statements += 3;
            out.deleted = deleted;
            out.anchor = Some(id);
        }
        tx.commit().await.map_err(query_err("committing the prune"))?;
        // Anchors before the cut cannot be checked any more.
        sqlx::query(
            "WITH gone AS (DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1 AND last_id < $2)
             UPDATE tenancy.audit_heads SET pruned_at = now() WHERE tenant_uid = $1",
        )
        .bind(uid)
        .bind(id)
        .execute(pool)
        .await
        .map_err(query_err("recording the prune"))?;
        out.statements += 1;
        return Ok(out);
    }
    sqlx::query("UPDATE tenancy.audit_heads SET pruned_at = now() WHERE tenant_uid = $1")
        .bind(uid)
        .execute(pool)
        .await
        .map_err(query_err("recording the prune time"))?;
    out.statements += 1;
    Ok(out)
}
