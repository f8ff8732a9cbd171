//! Verifying a tenant's chain ([`verify`]): anchor its head, check the
//! anchors' MACs, then walk the whole chain in one snapshot with
//! [`Walker`], against the in-schema head, the anchored head, the retention
//! cut and every kept anchor.
//!
//! Takes the admin pool, the root keys and a validated [`TenantName`];
//! gives a [`VerifyReport`]. Side effects: seals the pending entries
//! (confined session); may write one anchor (admin); reads the chain on a confined session (read-only transaction).

use futures::TryStreamExt;
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::anchor::{anchor_heads, check_anchors, read_anchoring};
use super::chain::{Anchored, ChainBreak, ChainRow, Checkpoint, VerifyReport, Walker};
use super::consts::{AUDIT_TABLE, HEAD_TABLE};
use super::content::Content;
use super::seal::seal_first;
use super::session::{open_confined, require_audit, salt_of, uid_for};
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::{query_err, quote_ident, PgError};

/// Verifies the tenant's chain: anchors its current head first (as the
/// periodic pass would), checks the anchors' MACs, then walks the whole
/// chain (streamed, in id order, one snapshot, on a confined session) and
/// checks it against the in-schema head, the anchored head and every kept
/// anchor. Reports the first break.
pub async fn verify(pool: &PgPool, ring: &Keyring, name: &TenantName) -> Result<VerifyReport, PgError> {
    let uid = uid_for(pool, name).await?;
    let sealable = {
        let mut conn = pool
            .acquire()
            .await
            .map_err(query_err("connecting to verify the audit log"))?;
        require_audit(&mut conn, name).await?
    };
    let salt = salt_of(pool, name, &uid).await?;
    let mut c = open_confined(pool, ring, name, &uid).await?;
    // What no commit sealed yet goes into the chain first (and so under
    // the anchor below).
    let verified = match seal_first(&mut c, name, sealable).await {
        Ok(()) => verify_on(&mut c, pool, ring, name, &uid, &salt).await,
        Err(e) => Err(e),
    };
    c.close().await;
    verified
}

/// Anchors the head, reads the anchoring, walks the chain on `conn`.
async fn verify_on(
    conn: &mut PgConnection,
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    uid: &str,
    salt: &crate::crypto::TenantSalt,
) -> Result<VerifyReport, PgError> {
    anchor_heads(pool, ring, Some(uid)).await?;
    // Read before the walk's snapshot: all of it was committed before it.
    let (head, cut, anchors) = read_anchoring(pool, uid).await?;
    let Some((head_id, head_hash)) = head else {
        return Err(PgError::Audit {
            tenant: name.to_string(),
            what: "its chain is not anchored yet (the next reconcile anchors it)".into(),
        });
    };
    let (anchored, unknown, anchor_break) = check_anchors(ring, salt, uid, &anchors);
    // The head and the cut first: at the same row, theirs is the message.
    let mut checkpoints = vec![Checkpoint {
        id: head_id,
        hash: head_hash,
        what: "the anchored head (tenancy.audit_heads)".into(),
        is_anchor: false,
    }];
    if let Some((id, hash)) = &cut {
        checkpoints.push(Checkpoint {
            id: *id,
            hash: hash.clone(),
            what: "the operator's retention cut (the ANCHOR row it recorded in tenancy.audit_heads)".into(),
            is_anchor: false,
        });
    }
    checkpoints.extend(anchored);
    let mut report = walk(
        conn,
        name,
        Anchored {
            checkpoints,
            cut,
            head_after: None,
        },
        anchor_break,
        pool,
        uid,
    )
    .await?;
    report.anchors_skipped += unknown;
    Ok(report)
}

/// The walk on a confined session, in one REPEATABLE READ snapshot; the
/// anchored head is read again (admin) once the snapshot is taken.
async fn walk(
    conn: &mut PgConnection,
    name: &TenantName,
    mut anchored: Anchored,
    anchor_break: Option<ChainBreak>,
    pool: &PgPool,
    uid: &str,
) -> Result<VerifyReport, PgError> {
    let schema = quote_ident(&name.schema())?;
    let mut tx = Connection::begin(&mut *conn)
        .await
        .map_err(query_err("starting the verification"))?;
    sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(query_err("starting the verification"))?;
    // The content is built here from the columns ([`Content`]), the same
    // bytes [`content_sql`] gives: the server only renders the epoch and
    // the key (jsonb text), and sends the key once. `row_pk` as a value
    // only where the walk reads it (PRUNE entries).
    let sql = format!(
        "SELECT a.id, a.operation, a.prev_hash, a.hash, EXTRACT(EPOCH FROM a.\"time\")::text, a.actor, a.actor_given, a.request_id,
                a.table_name, a.row_pk::text, a.changed_columns FROM {schema}.{AUDIT_TABLE} a ORDER BY a.id"
    );
    // The first query takes the snapshot.
    let head: Option<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT last_id, hash FROM {schema}.{HEAD_TABLE}"
    )))
    .fetch_optional(&mut *tx)
    .await
    .map_err(query_err("reading the audit chain head"))?;
    // Every commit in the snapshot moved the anchored head at or beyond its
    // last row: a row of the snapshot past it was appended without moving it.
    anchored.head_after = sqlx::query_scalar("SELECT last_id FROM tenancy.audit_heads WHERE tenant_uid = $1")
        .bind(uid)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the anchored audit head"))?;
    let mut walker = Walker::with_anchors(head, anchored);
    if let Some(b) = anchor_break {
        walker.broken(b);
    }
    {
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
        let mut content = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(query_err("reading the audit log"))? {
            // The columns' types are the query's own: decoded without the
            // per-value type check (a third of the walk's time).
            let mut decode = || -> Result<ChainRow, sqlx::Error> {
                let operation: String = row.try_get_unchecked(1)?;
                let pk: Option<&str> = row.try_get_unchecked(9)?;
                Content {
                    epoch: row.try_get_unchecked(4)?,
                    actor: row.try_get_unchecked(5)?,
                    actor_given: row.try_get_unchecked(6)?,
                    request_id: row.try_get_unchecked(7)?,
                    operation: &operation,
                    table: row.try_get_unchecked(8)?,
                    row_pk: pk,
                    changed: row.try_get_unchecked::<Option<Vec<String>>, _>(10)?.as_deref(),
                }
                .write(&mut content);
                let row_pk = match (operation.as_str(), pk) {
                    ("PRUNE", Some(pk)) => serde_json::from_str(pk).ok(),
                    _ => None,
                };
                Ok(ChainRow {
                    id: row.try_get_unchecked(0)?,
                    operation,
                    prev_hash: row.try_get_unchecked(2)?,
                    hash: row.try_get_unchecked(3)?,
                    content: std::mem::take(&mut content),
                    row_pk,
                })
            };
            let r = decode().map_err(query_err("decoding the audit log"))?;
            walker.push(&r);
            content = r.content;
            content.clear();
        }
    }
    tx.rollback().await.map_err(query_err("ending the verification"))?;
    Ok(walker.finish())
}
