//! Anchoring: the operator's HMAC'd record of each tenant's chain head
//! outside the schema (`tenancy.audit_anchors`), under a key derived from
//! the root keys and never sent to the database; the once-per-database
//! set-up of the anchor role and schema.
//!
//! Takes the admin pool and the root keys (the MAC functions: the tenant's
//! salt and uid); gives anchors, their encoding ([`anchor_message`]), their
//! check ([`check_anchors`], pure but for the key derivation) and the
//! anchoring as `tenancy.*` holds it. Side effects: [`anchor_heads`] writes
//! `tenancy.audit_anchors`; [`prepare_anchoring`] creates the anchor role
//! and schema and grants them (admin, under a row lock on `tenancy.locks`).

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use sqlx::PgPool;

use super::chain::{ChainBreak, Checkpoint};
use super::consts::ANCHOR_DOMAIN;
use super::functions::prepare_anchoring_sql;
use crate::crypto::{KeyVersion, Keyring, Purpose, TenantSalt};
use crate::pg::{query_err, PgError};

/// Creates, once per database and idempotently, what anchoring needs: the
/// anchor role (NOLOGIN; the admin is a member so it can give it the
/// anchor functions) with the right to move heads in
/// `tenancy.audit_heads`, and the schema [`ANCHOR_SCHEMA`](super::consts::ANCHOR_SCHEMA). Called at start
/// after the control schema's migrations; serialized across operator
/// instances by a row lock on `tenancy.locks`.
pub async fn prepare_anchoring(pool: &PgPool) -> Result<(), PgError> {
    let mut tx = pool.begin().await.map_err(query_err("starting the anchoring set-up"))?;
    sqlx::raw_sql(
        "INSERT INTO tenancy.locks (kind, key) VALUES ('audit-anchoring', '') ON CONFLICT DO NOTHING;
         SELECT 1 FROM tenancy.locks WHERE kind = 'audit-anchoring' AND key = '' FOR UPDATE",
    )
    .execute(&mut *tx)
    .await
    .map_err(query_err("locking the anchoring set-up"))?;
    let sql = prepare_anchoring_sql()?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .map_err(query_err("preparing the audit anchoring"))?;
    tx.commit()
        .await
        .map_err(query_err("committing the anchoring set-up"))?;
    Ok(())
}

/// The canonical bytes an anchor's MAC covers: the domain
/// ([`ANCHOR_DOMAIN`]), then the tenant uid (u32 length, big-endian, then
/// its UTF-8), the anchor's sequence number, the chain row id (i64
/// big-endian each), the chain hash (u32 length, bytes), the anchoring time
/// (microseconds since the Unix epoch, i64 big-endian), the root key version
/// (u32 big-endian) and the previous anchor's MAC (one byte 0 when none;
/// else 1, u32 length, bytes). Every field has a fixed width or a length
/// prefix, so no two anchors share an encoding. Pure.
pub fn anchor_message(
    uid: &str,
    seq: i64,
    last_id: i64,
    hash: &[u8],
    anchored_at_micros: i64,
    key_version: u32,
    prev_mac: Option<&[u8]>,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(ANCHOR_DOMAIN.len() + uid.len() + hash.len() + 96);
    m.extend_from_slice(ANCHOR_DOMAIN);
    let field = |m: &mut Vec<u8>, b: &[u8]| {
        m.extend_from_slice(&(b.len() as u32).to_be_bytes());
        m.extend_from_slice(b);
    };
    field(&mut m, uid.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&last_id.to_be_bytes());
    field(&mut m, hash);
    m.extend_from_slice(&anchored_at_micros.to_be_bytes());
    m.extend_from_slice(&key_version.to_be_bytes());
    match prev_mac {
        None => m.push(0),
        Some(p) => {
            m.push(1);
            field(&mut m, p);
        }
    }
    m
}

/// The tenant's audit key under root key `version`: HKDF purpose `audit`.
/// Held by the operator only; never sent to the database.
pub(super) fn audit_mac(
    ring: &Keyring,
    version: KeyVersion,
    salt: &TenantSalt,
    uid: &str,
) -> Result<Hmac<Sha256>, PgError> {
    let key = ring
        .derive_tenant_key(version, salt, uid, Purpose::Audit)
        .map_err(PgError::Keys)?;
    // HMAC takes keys of any length: this cannot fail.
    <Hmac<Sha256> as KeyInit>::new_from_slice(key.bytes()).map_err(|_| {
        PgError::Keys(crate::crypto::CryptoError::TooLong {
            what: "the audit key",
            len: 32,
            max: 0,
        })
    })
}

/// One row of `tenancy.audit_anchors`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorRow {
    pub seq: i64,
    pub last_id: i64,
    pub hash: Vec<u8>,
    pub anchored_at: DateTime<Utc>,
    pub key_version: i32,
    pub prev_mac: Option<Vec<u8>>,
    pub mac: Vec<u8>,
}

impl AnchorRow {
    pub(super) fn message(&self, uid: &str) -> Vec<u8> {
        anchor_message(
            uid,
            self.seq,
            self.last_id,
            &self.hash,
            self.anchored_at.timestamp_micros(),
            self.key_version as u32,
            self.prev_mac.as_deref(),
        )
    }
}

/// A new anchor of (last_id, hash) after `prev` under the active root key.
pub fn make_anchor(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    prev: Option<(i64, &[u8])>,
    last_id: i64,
    hash: &[u8],
    now: DateTime<Utc>,
) -> Result<AnchorRow, PgError> {
    let version = ring.active_version();
    // Postgres keeps microseconds: the time the MAC covers is the stored one.
    let anchored_at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let mut row = AnchorRow {
        seq: prev.map_or(1, |p| p.0 + 1),
        last_id,
        hash: hash.to_vec(),
        anchored_at,
        key_version: version.get() as i32,
        prev_mac: prev.map(|p| p.1.to_vec()),
        mac: Vec::new(),
    };
    let mut mac = audit_mac(ring, version, salt, uid)?;
    mac.update(&row.message(uid));
    row.mac = mac.finalize().into_bytes().to_vec();
    Ok(row)
}

/// Checks the anchors of one tenant (ordered by seq): each MAC under its
/// root key version (constant-time), each linked to the one before. Gives
/// the checkpoints of those that verify, how many could not be checked (a
/// root key version no longer in the keyring), and the first that fails.
/// Pure but for the key derivation.
pub fn check_anchors(
    ring: &Keyring,
    salt: &TenantSalt,
    uid: &str,
    anchors: &[AnchorRow],
) -> (Vec<Checkpoint>, u64, Option<ChainBreak>) {
    let mut points = Vec::new();
    let mut unknown = 0;
    for (i, a) in anchors.iter().enumerate() {
        let what = format!(
            "anchor #{} of {} (tenancy.audit_anchors)",
            a.seq,
            a.anchored_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        if i > 0 && a.prev_mac.as_deref() != Some(anchors[i - 1].mac.as_slice()) {
            return (
                points,
                unknown,
                Some(ChainBreak {
                    id: a.last_id,
                    what: format!(
                        "{what} does not follow anchor #{}: an anchor was removed, inserted or edited",
                        anchors[i - 1].seq
                    ),
                }),
            );
        }
        let version = match u32::try_from(a.key_version).ok().and_then(|v| KeyVersion::new(v).ok()) {
            Some(v) if ring.contains(v) => v,
            _ => {
                unknown += 1;
                continue;
            }
        };
        let verified = audit_mac(ring, version, salt, uid).map(|mut m| {
            m.update(&a.message(uid));
            m.verify_slice(&a.mac).is_ok()
        });
        if !matches!(verified, Ok(true)) {
            return (
                points,
                unknown,
                Some(ChainBreak {
                    id: a.last_id,
                    what: format!("{what} does not verify (its MAC is wrong): it was forged or edited"),
                }),
            );
        }
        points.push(Checkpoint {
            id: a.last_id,
            hash: a.hash.clone(),
            what,
            is_anchor: true,
        });
    }
    (points, unknown, None)
}

/// Anchors every tenant (or only `uid`) whose head in `tenancy.audit_heads`
/// moved since its last anchor, or whose last anchor was made under another
/// root key than the active one: one query reads them, one statement
/// writes their anchors (admin, `tenancy.*` only). An idle tenant gets no
/// write. Returns how many anchors were written.
pub async fn anchor_heads(pool: &PgPool, ring: &Keyring, uid: Option<&str>) -> Result<usize, PgError> {
    #[allow(clippy::type_complexity)]
    let due: Vec<(String, i64, Vec<u8>, Option<Vec<u8>>, Option<i64>, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT h.tenant_uid, h.last_id, h.hash, t.key_salt, a.seq, a.mac
           FROM tenancy.audit_heads h
           JOIN tenancy.tenants t ON t.uid = h.tenant_uid
           LEFT JOIN LATERAL (SELECT x.seq, x.mac, x.last_id, x.hash, x.key_version FROM tenancy.audit_anchors x
                               WHERE x.tenant_uid = h.tenant_uid ORDER BY x.seq DESC LIMIT 1) a ON true
          WHERE ($1::text IS NULL OR h.tenant_uid = $1)
            AND (a.seq IS NULL OR a.last_id <> h.last_id OR a.hash <> h.hash OR a.key_version <> $2)",
    )
    .bind(uid)
    .bind(ring.active_version().get() as i32)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the audit heads to anchor"))?;
    let now = Utc::now();
    let mut rows: Vec<(String, AnchorRow)> = Vec::with_capacity(due.len());
    for (uid, last_id, hash, salt, seq, mac) in due {
        let Some(salt) = salt.and_then(|s| TenantSalt::from_bytes(&s).ok()) else {
            tracing::warn!(tenant_uid = %uid, "the tenant has no key salt: its audit head is not anchored");
            continue;
        };
        let prev = seq.zip(mac.as_deref());
        rows.push((uid.clone(), make_anchor(ring, &salt, &uid, prev, last_id, &hash, now)?));
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let written = sqlx::query(
        "INSERT INTO tenancy.audit_anchors (tenant_uid, seq, last_id, hash, anchored_at, key_version, prev_mac, mac)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[], $5::timestamptz[], $6::int[], $7::bytea[], $8::bytea[])
         ON CONFLICT DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.last_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.hash.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.anchored_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.key_version).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.prev_mac.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.mac.clone()).collect::<Vec<_>>())
    .execute(pool)
    .await
    .map_err(query_err("writing audit anchors"))?
    .rows_affected();
    Ok(written as usize)
}

/// The tenant's anchoring as `tenancy.*` holds it: the head (row id, hash),
/// the recorded retention cut, the anchors by seq.
#[allow(clippy::type_complexity)]
pub(super) async fn read_anchoring(
    pool: &PgPool,
    uid: &str,
) -> Result<(Option<(i64, Vec<u8>)>, Option<(i64, Vec<u8>)>, Vec<AnchorRow>), PgError> {
    let head: Option<(i64, Vec<u8>, Option<i64>, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT last_id, hash, cut_id, cut_hash FROM tenancy.audit_heads WHERE tenant_uid = $1")
            .bind(uid)
            .fetch_optional(pool)
            .await
            .map_err(query_err("reading the anchored audit head"))?;
    let anchors: Vec<(i64, i64, Vec<u8>, DateTime<Utc>, i32, Option<Vec<u8>>, Vec<u8>)> = sqlx::query_as(
        "SELECT seq, last_id, hash, anchored_at, key_version, prev_mac, mac FROM tenancy.audit_anchors WHERE tenant_uid = $1 ORDER BY seq",
    )
    .bind(uid)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the audit anchors"))?;
    let anchors = anchors
        .into_iter()
        .map(
            |(seq, last_id, hash, anchored_at, key_version, prev_mac, mac)| AnchorRow {
                seq,
                last_id,
                hash,
                anchored_at,
                key_version,
                prev_mac,
                mac,
            },
        )
        .collect();
    let cut = head.as_ref().and_then(|h| h.2.zip(h.3.clone()));
    Ok((head.map(|h| (h.0, h.1)), cut, anchors))
}
