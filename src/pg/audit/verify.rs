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
use super::content::{epoch_text, Content};
use super::seal::seal_first;
use super::session::{confined_with, require_audit, salt_of, uid_for};
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
    // The salt is read once, for this login, the walk's second one and
    // the anchors' MACs.
    let salt = salt_of(pool, name, &uid).await?;
    let mut c = confined_with(pool, ring, name, &uid, &salt).await?;
    // What no commit sealed yet goes into the chain first (and so under
    // the anchor below).
    let verified = match seal_first(&mut c, name, sealable).await {
        Ok(()) => verify_on(&mut c, pool, ring, name, &uid, &salt).await,
        Err(e) => Err(e),
    };
    c.close().await;
    verified
}

/// A chain of at least this many rows (the anchored head's id less the
/// retention cut's) is read over two confined sessions sharing one
/// snapshot, each server process converting every other row's key to
/// text. `cargo bench --bench audit` (walk on two sessions against one,
/// alternating, medians of 5): 1.21x faster at 156,143 entries, 1.11x at
/// 72,066, and 0.88x to 0.97x at 24,022, where the second login and the
/// interleaving cost more than they give.
pub const SPLIT_WALK_ROWS: i64 = 50_000;

/// Anchors the head, reads the anchoring, walks the chain on `conn` (and
/// on a second confined session for a long chain).
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
    let from = cut.as_ref().map(|(id, _)| *id).unwrap_or(0);
    if let Some((id, hash)) = &cut {
        checkpoints.push(Checkpoint {
            id: *id,
            hash: hash.clone(),
            what: "the operator's retention cut (the ANCHOR row it recorded in tenancy.audit_heads)".into(),
            is_anchor: false,
        });
    }
    checkpoints.extend(anchored);
    // A second session only helps; without one (the ops role's connection
    // limit reached, say) the walk reads on one.
    let mut second = None;
    if head_id.saturating_sub(from) >= SPLIT_WALK_ROWS {
        match confined_with(pool, ring, name, uid, salt).await {
            Ok(c) => second = Some(c),
            Err(e) => tracing::debug!(tenant = %name, error = %e, "no second session for the walk; walking on one"),
        }
    }
    let walked = walk(
        conn,
        second.as_deref_mut(),
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
    .await;
    if let Some(c) = second {
        c.close().await;
    }
    let mut report = walked?;
    report.anchors_skipped += unknown;
    Ok(report)
}

/// The walk's query: every row of the log in id order, or (`half`) the
/// rows of even or of odd ids. `time` goes as it is stored
/// ([`epoch_text`] renders it); `row_pk` as its jsonb text, which is what
/// the hash covers. Every id falls in exactly one half (`<> 0` holds for a
/// negative odd id as well).
fn walk_sql(schema: &str, half: Option<bool>) -> String {
    let filter = match half {
        None => "",
        Some(true) => "WHERE a.id % 2 = 0",
        Some(false) => "WHERE a.id % 2 <> 0",
    };
    format!(
        "SELECT a.id, a.operation, a.prev_hash, a.hash, {}, a.actor, a.actor_given, a.request_id,
                a.table_name, a.row_pk::text, a.changed_columns FROM {schema}.{AUDIT_TABLE} a {filter} ORDER BY a.id",
        time_columns_sql("a.\"time\"")
    )
}

/// Two columns of the walk's query for the `timestamptz` expression
/// `time`: the time as stored (sent in binary: microseconds since 2000),
/// and `EXTRACT(EPOCH FROM time)::text` where the walk does not render
/// that itself ([`epoch_from_row`]): for `infinity` and `-infinity`, and
/// from the year 200000 on, below the end of the server's range, where
/// its epoch takes another, rounding path (no audit entry's time is ever
/// there; a forged one still verifies, or not, as on the server).
pub fn time_columns_sql(time: &str) -> String {
    format!(
        "{time}, CASE WHEN NOT pg_catalog.isfinite({time}) OR {time} >= '200000-01-01 00:00:00+00'::timestamptz \
         THEN EXTRACT(EPOCH FROM {time})::text END"
    )
}

/// The epoch text (`EXTRACT(EPOCH FROM time)::text`) of the two columns
/// [`time_columns_sql`] gives, at `at` and `at + 1` of `row` (a query of
/// the extended protocol, whose results come in binary), written into
/// `out` (cleared first).
pub fn epoch_from_row(row: &sqlx::postgres::PgRow, at: usize, out: &mut String) -> Result<(), sqlx::Error> {
    out.clear();
    if let Some(server) = row.try_get_unchecked::<Option<&str>, _>(at + 1)? {
        out.push_str(server);
        return Ok(());
    }
    let time = row.try_get_raw(at)?;
    let stored: Option<[u8; 8]> = match time.format() {
        sqlx::postgres::PgValueFormat::Binary => time.as_bytes().ok().and_then(|b| b.try_into().ok()),
        sqlx::postgres::PgValueFormat::Text => None,
    };
    let Some(stored) = stored else {
        return Err(sqlx::Error::Protocol(
            "an audit entry's time is not a binary timestamptz".into(),
        ));
    };
    let micros = i64::from_be_bytes(stored);
    epoch_text(micros, out);
    Ok(())
}

/// Opens the walk's transaction on `conn`: REPEATABLE READ, READ ONLY, in
/// id order from the index (a sort would carry every key's text, and a
/// filtered half is estimated at a few rows), and, given a snapshot, in
/// that one.
async fn begin_walk<'c>(
    conn: &'c mut PgConnection,
    snapshot: Option<&str>,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, sqlx::Error> {
    let mut tx = Connection::begin(conn).await?;
    let mut sql = String::from("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; ");
    if let Some(id) = snapshot {
        // pg_export_snapshot's identifiers are hex digits and dashes.
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(sqlx::Error::Protocol(format!(
                "an unexpected snapshot identifier {id:?}"
            )));
        }
        sql.push_str(&format!("SET TRANSACTION SNAPSHOT '{id}'; "));
    }
    sql.push_str("SET LOCAL enable_sort = off");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    Ok(tx)
}

/// Renders one row of the walk's query into a [`ChainRow`]: its content
/// in `content` (taken), the epoch formatted in `epoch` (scratch).
fn decode_row(row: &sqlx::postgres::PgRow, content: &mut Vec<u8>, epoch: &mut String) -> Result<ChainRow, sqlx::Error> {
    // The columns' types are the query's own: decoded without the
    // per-value type check (a third of the walk's time).
    let operation: String = row.try_get_unchecked(1)?;
    let pk: Option<&str> = row.try_get_unchecked(10)?;
    epoch_from_row(row, 4, epoch)?;
    Content {
        epoch,
        actor: row.try_get_unchecked(6)?,
        actor_given: row.try_get_unchecked(7)?,
        request_id: row.try_get_unchecked(8)?,
        operation: &operation,
        table: row.try_get_unchecked(9)?,
        row_pk: pk,
        changed: row.try_get_unchecked::<Option<Vec<String>>, _>(11)?.as_deref(),
    }
    .write(content);
    let row_pk = match (operation.as_str(), pk) {
        ("PRUNE", Some(pk)) => serde_json::from_str(pk).ok(),
        _ => None,
    };
    Ok(ChainRow {
        id: row.try_get_unchecked(0)?,
        operation,
        prev_hash: row.try_get_unchecked(2)?,
        hash: row.try_get_unchecked(3)?,
        content: std::mem::take(content),
        row_pk,
    })
}

/// The walk on a confined session, in one REPEATABLE READ snapshot; the
/// anchored head is read again (admin) once the snapshot is taken. With a
/// `second` session the snapshot is exported to it, each session reads
/// half the rows (even and odd ids) and the walk takes them in id order
/// from both: the two server processes convert at once, and neither holds
/// more than its socket's buffer ahead of the walk. If the second session
/// cannot join the snapshot the walk reads on the first alone.
#[allow(clippy::too_many_arguments)]
async fn walk(
    conn: &mut PgConnection,
    second: Option<&mut PgConnection>,
    name: &TenantName,
    mut anchored: Anchored,
    anchor_break: Option<ChainBreak>,
    pool: &PgPool,
    uid: &str,
) -> Result<VerifyReport, PgError> {
    let schema = quote_ident(&name.schema())?;
    let mut tx = begin_walk(conn, None)
        .await
        .map_err(query_err("starting the verification"))?;
    let mut tx2 = None;
    if let Some(c2) = second {
        // The export is the transaction's first query: it takes the snapshot.
        let snapshot: String = sqlx::query_scalar("SELECT pg_catalog.pg_export_snapshot()")
            .fetch_one(&mut *tx)
            .await
            .map_err(query_err("exporting the verification's snapshot"))?;
        match begin_walk(c2, Some(&snapshot)).await {
            Ok(t) => tx2 = Some(t),
            Err(e) => {
                tracing::debug!(tenant = %name, error = %e, "the second session cannot share the walk's snapshot; walking on one")
            }
        }
    }
    // The first query (without a second session) takes the snapshot.
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
    let read = |source| PgError::Query {
        action: "reading the audit log",
        source,
    };
    let decoded = |source| PgError::Query {
        action: "decoding the audit log",
        source,
    };
    let (mut content, mut epoch) = (Vec::new(), String::new());
    let mut take = |row: &sqlx::postgres::PgRow| -> Result<(), PgError> {
        let r = decode_row(row, &mut content, &mut epoch).map_err(&decoded)?;
        walker.push(&r);
        content = r.content;
        content.clear();
        Ok(())
    };
    match tx2.as_mut() {
        None => {
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(walk_sql(&schema, None))).fetch(&mut *tx);
            while let Some(row) = rows.try_next().await.map_err(&read)? {
                take(&row)?;
            }
        }
        Some(tx2) => {
            let mut even = sqlx::query(sqlx::AssertSqlSafe(walk_sql(&schema, Some(true)))).fetch(&mut *tx);
            let mut odd = sqlx::query(sqlx::AssertSqlSafe(walk_sql(&schema, Some(false)))).fetch(&mut **tx2);
            let (mut next_even, mut next_odd) = (
                even.try_next().await.map_err(&read)?,
                odd.try_next().await.map_err(&read)?,
            );
            let id = |r: &sqlx::postgres::PgRow| r.try_get_unchecked::<i64, _>(0).map_err(&decoded);
            loop {
                let even_first = match (&next_even, &next_odd) {
                    (Some(e), Some(o)) => id(e)? < id(o)?,
                    (e, _) => e.is_some(),
                };
                let row = if even_first { next_even.take() } else { next_odd.take() };
                // Both halves read to their end.
                let Some(row) = row else { break };
                take(&row)?;
                if even_first {
                    next_even = even.try_next().await.map_err(&read)?;
                } else {
                    next_odd = odd.try_next().await.map_err(&read)?;
                }
            }
        }
    }
    let sessions = if let Some(t) = tx2 {
        t.rollback().await.map_err(query_err("ending the verification"))?;
        2
    } else {
        1
    };
    tx.rollback().await.map_err(query_err("ending the verification"))?;
    Ok(VerifyReport {
        sessions,
        ..walker.finish()
    })
}
