//! The audit log across a tenant's restore and deletion: re-anchoring the
//! restored chain ([`rebase_after_restore`]), forgetting a deleted
//! tenant's anchoring ([`forget_tenant`]) and listing what is left of it
//! ([`leftovers`]).
//!
//! Takes the admin pool (or the delete's transaction), the root keys, a
//! validated [`TenantName`] or ops login and the uid; gives what was done.
//! Side effects: reads the restored chain's head on a confined session;
//! writes `tenancy.audit_heads`, `tenancy.audit_anchors` and
//! `tenancy.audit_log`; drops the tenant's anchor function.

use chrono::Utc;
use hmac::Mac;
use sqlx::{PgConnection, PgPool};

use super::anchor::{audit_mac, make_anchor};
use super::consts::{ANCHOR_SCHEMA, AUDIT_TABLE, GENESIS, HEAD_TABLE};
use super::functions::anchor_fn;
use super::session::salt_of;
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::confined::{self, OpsLogin};
use crate::pg::{query_err, quote_ident, PgError};

/// What [`rebase_after_restore`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebaseOutcome {
    /// The anchored head before (row id, hex hash), if there was one.
    pub from: Option<(i64, String)>,
    /// The restored chain's head (row id, hex hash), now anchored.
    pub to: (i64, String),
    /// Anchors of the replaced chain that were forgotten.
    pub anchors_dropped: u64,
}

/// After a restore put a backup's schema (and so its audit chain, which is
/// older than the anchored head) in place of the tenant's: reads the
/// restored chain's head and ANCHOR row on a confined session, then, in one
/// admin transaction, resets the tenant's head in `tenancy.audit_heads` to
/// it (and its retention cut to the restored ANCHOR row), forgets the
/// anchors of the replaced chain, writes a first anchor of the restored
/// head, and records `AuditRebased` in `tenancy.audit_log` (from, to, and
/// `detail`, e.g. the backup's id). Call it after `pg_restore` committed and
/// before the app role may log in again: until then the restored chain's
/// commits are refused (their head would move back).
pub async fn rebase_after_restore(
    pool: &PgPool,
    ring: &Keyring,
    login: &OpsLogin,
    actor: &str,
    detail: serde_json::Value,
) -> Result<RebaseOutcome, PgError> {
    let name = login.tenant().clone();
    let uid = login.uid().to_owned();
    let salt = salt_of(pool, &name, &uid).await?;
    let schema = quote_ident(&name.schema())?;
    let mut c = confined::connect(pool, login).await?;
    #[allow(clippy::type_complexity)]
    let read: Result<(Option<(i64, Vec<u8>)>, Option<(i64, Vec<u8>)>), sqlx::Error> = async {
        let head: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT last_id, hash FROM {schema}.{HEAD_TABLE}"
        )))
        .fetch_optional(&mut *c)
        .await?;
        let anchor: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, hash FROM {schema}.{AUDIT_TABLE} WHERE operation = 'ANCHOR' ORDER BY id LIMIT 1"
        )))
        .fetch_optional(&mut *c)
        .await?;
        Ok((head, anchor))
    }
    .await;
    c.close().await;
    let (head, cut) = read.map_err(query_err("reading the restored audit chain's head"))?;
    let (last_id, hash) = head.unwrap_or((0, GENESIS.to_vec()));
    let mut tx = pool.begin().await.map_err(query_err("starting the audit rebase"))?;
    let before: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT last_id, hash FROM tenancy.audit_heads WHERE tenant_uid = $1 FOR UPDATE")
            .bind(&uid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_err("locking the anchored audit head"))?;
    let last_seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM tenancy.audit_anchors WHERE tenant_uid = $1")
        .bind(&uid)
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("reading the audit anchors"))?;
    let dropped = sqlx::query("DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1")
        .bind(&uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("forgetting the replaced chain's anchors"))?
        .rows_affected();
    sqlx::query(
        "INSERT INTO tenancy.audit_heads (tenant_uid, last_id, hash, moved_at, cut_id, cut_hash) VALUES ($1, $2, $3, now(), $4, $5)
         ON CONFLICT (tenant_uid) DO UPDATE SET last_id = excluded.last_id, hash = excluded.hash, moved_at = excluded.moved_at,
                                                cut_id = excluded.cut_id, cut_hash = excluded.cut_hash",
    )
    .bind(&uid)
    .bind(last_id)
    .bind(&hash)
    .bind(cut.as_ref().map(|c| c.0))
    .bind(cut.as_ref().map(|c| c.1.clone()))
    .execute(&mut *tx)
    .await
    .map_err(query_err("resetting the anchored audit head"))?;
    // The sequence goes on (a restored tenant's anchors never reuse a
    // number); the first anchor of the restored chain links to nothing.
    let mut first = make_anchor(ring, &salt, &uid, None, last_id, &hash, Utc::now())?;
    first.seq = last_seq.unwrap_or(0) + 1;
    let mut mac = audit_mac(ring, ring.active_version(), &salt, &uid)?;
    mac.update(&first.message(&uid));
    first.mac = mac.finalize().into_bytes().to_vec();
    sqlx::query(
        "INSERT INTO tenancy.audit_anchors (tenant_uid, seq, last_id, hash, anchored_at, key_version, prev_mac, mac) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
    )
    .bind(&uid)
    .bind(first.seq)
    .bind(first.last_id)
    .bind(&first.hash)
    .bind(first.anchored_at)
    .bind(first.key_version)
    .bind(&first.mac)
    .execute(&mut *tx)
    .await
    .map_err(query_err("anchoring the restored audit chain"))?;
    let from = before.map(|(id, h)| (id, hex::encode(h)));
    let to = (last_id, hex::encode(&hash));
    let record = serde_json::json!({
        "from": from.as_ref().map(|f| serde_json::json!({"last_id": f.0, "hash": f.1})),
        "to": {"last_id": to.0, "hash": to.1},
        "anchors_dropped": dropped,
        "restore": detail,
    });
    crate::pg::registry::record_event(&mut *tx, &uid, Some(name.as_str()), "AuditRebased", actor, record).await?;
    tx.commit().await.map_err(query_err("committing the audit rebase"))?;
    Ok(RebaseOutcome {
        from,
        to,
        anchors_dropped: dropped,
    })
}

/// The anchoring of a deleted tenant goes with it (inside the delete's
/// transaction): its anchor function (when it carries this tenant's
/// marker), its head and its anchors. Returns the statements run.
pub async fn forget_tenant(tx: &mut PgConnection, name: &TenantName, uid: &str) -> Result<usize, PgError> {
    let ours: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                         WHERE s.nspname = $1 AND p.proname = $2 AND obj_description(p.oid, 'pg_proc') = $3)",
    )
    .bind(ANCHOR_SCHEMA)
    .bind(name.schema())
    .bind(crate::pg::locks::ownership_marker(uid))
    .fetch_one(&mut *tx)
    .await
    .map_err(query_err("reading the tenant's anchor function"))?;
    let mut n = 2;
    if ours {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP FUNCTION IF EXISTS {}(bigint, bytea)",
            anchor_fn(name)?
        )))
        .execute(&mut *tx)
        .await
        .map_err(query_err("dropping the tenant's anchor function"))?;
        n += 1;
    }
    sqlx::query("WITH a AS (DELETE FROM tenancy.audit_anchors WHERE tenant_uid = $1) DELETE FROM tenancy.audit_heads WHERE tenant_uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("forgetting the tenant's audit anchors"))?;
    Ok(n)
}

/// What of a deleted tenant's anchoring is still there, in words.
pub async fn leftovers(pool: &PgPool, name: &TenantName, uid: &str) -> Result<Vec<String>, PgError> {
    let (function, head, anchors): (bool, bool, i64) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                         WHERE s.nspname = $1 AND p.proname = $2 AND obj_description(p.oid, 'pg_proc') = $3),
                EXISTS (SELECT 1 FROM tenancy.audit_heads WHERE tenant_uid = $4),
                (SELECT count(*) FROM tenancy.audit_anchors WHERE tenant_uid = $4)",
    )
    .bind(ANCHOR_SCHEMA)
    .bind(name.schema())
    .bind(crate::pg::locks::ownership_marker(uid))
    .bind(uid)
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the tenant's audit anchoring"))?;
    let mut left = Vec::new();
    if function {
        left.push(format!("function {ANCHOR_SCHEMA}.{}", name.schema()));
    }
    if head {
        left.push("audit head row".into());
    }
    if anchors > 0 {
        left.push(format!("{anchors} audit anchors"));
    }
    Ok(left)
}
