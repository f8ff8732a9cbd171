//! Export: a tenant's audit rows as JSON lines ([`AuditRecord`]), for a
//! SIEM.
//!
//! Takes the admin pool, the root keys, a validated [`TenantName`], a start
//! time and a writer; gives how many rows were written. Side effects:
//! seals the pending entries and reads the chain on a confined session; writes to the caller's writer.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};

use super::consts::AUDIT_TABLE;
use super::seal::seal_first;
use super::session::{open_confined, require_audit, uid_for};
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::{query_err, quote_ident, PgError};

/// One audit row as exported (JSON lines, for a SIEM).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub tenant: String,
    pub id: i64,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub actor: String,
    pub actor_given: bool,
    pub request_id: Option<String>,
    pub operation: String,
    pub table: Option<String>,
    pub row_pk: Option<serde_json::Value>,
    pub changed_columns: Option<Vec<String>>,
    /// Lower-case hex.
    pub prev_hash: String,
    pub hash: String,
}

/// Streams the tenant's audit rows with `time >= since`, in id order, to
/// `out` as JSON lines (read on a confined session). Returns how many were
/// written.
pub async fn export<W: std::io::Write>(
    pool: &PgPool,
    ring: &Keyring,
    name: &TenantName,
    since: DateTime<Utc>,
    out: &mut W,
) -> Result<u64, PgError> {
    let uid = uid_for(pool, name).await?;
    let sealable = {
        let mut conn = pool
            .acquire()
            .await
            .map_err(query_err("connecting to export the audit log"))?;
        require_audit(&mut conn, name).await?
    };
    let mut c = open_confined(pool, ring, name, &uid).await?;
    // What no commit sealed yet goes into the chain first, so the export
    // holds every committed write.
    let n = match seal_first(&mut c, name, sealable).await {
        Ok(()) => export_on(&mut c, name, since, out).await,
        Err(e) => Err(e),
    };
    c.close().await;
    n
}

async fn export_on<W: std::io::Write>(
    conn: &mut PgConnection,
    name: &TenantName,
    since: DateTime<Utc>,
    out: &mut W,
) -> Result<u64, PgError> {
    let schema = quote_ident(&name.schema())?;
    let sql = format!(
        "SELECT id, \"time\", actor, actor_given, request_id, operation, table_name, row_pk, changed_columns, prev_hash, hash
           FROM {schema}.{AUDIT_TABLE} WHERE \"time\" >= $1 ORDER BY id"
    );
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(since).fetch(&mut *conn);
    let mut n = 0;
    while let Some(r) = rows.try_next().await.map_err(query_err("reading the audit log"))? {
        let decode = || -> Result<AuditRecord, sqlx::Error> {
            let time: DateTime<Utc> = r.try_get("time")?;
            Ok(AuditRecord {
                tenant: name.as_str().to_owned(),
                id: r.try_get("id")?,
                time: time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                actor: r.try_get("actor")?,
                actor_given: r.try_get("actor_given")?,
                request_id: r.try_get("request_id")?,
                operation: r.try_get("operation")?,
                table: r.try_get("table_name")?,
                row_pk: r.try_get("row_pk")?,
                changed_columns: r.try_get("changed_columns")?,
                prev_hash: hex::encode(r.try_get::<Vec<u8>, _>("prev_hash")?),
                hash: hex::encode(r.try_get::<Vec<u8>, _>("hash")?),
            })
        };
        let rec = decode().map_err(query_err("decoding an audit row"))?;
        let line = serde_json::to_string(&rec).map_err(|e| PgError::Audit {
            tenant: name.to_string(),
            what: format!("encoding an exported row: {e}"),
        })?;
        writeln!(out, "{line}").map_err(|e| PgError::Query {
            action: "writing the export",
            source: sqlx::Error::Io(e),
        })?;
        n += 1;
    }
    Ok(n)
}
