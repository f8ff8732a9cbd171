//! SQL of per-tenant backups and restores: the backups table, the restore
//! lock, and the admin's steps around a restore (prepare, finalize, put
//! back, recover).
//!
//! Takes a validated [`TenantName`] (identifiers come only from it) and the
//! tenant's uid; gives the steps `crate::backup` and the TenantRestore
//! controller string together. Side effects: rows in `tenancy.backups`,
//! `tenancy.locks` and `tenancy.audit_log`; `ALTER SCHEMA ... RENAME`,
//! `CREATE SCHEMA`, `COMMENT ON SCHEMA`, `DROP SCHEMA` of the tenant's own
//! schemas; `ALTER ROLE` login of its app role; ended app sessions.
//!
//! A restore is three steps, and only the middle one runs what the dump
//! contains:
//!
//! 1. **prepare** (admin, one transaction): the app role loses its login,
//!    the live schema `tenant_x` is renamed to `tenant_x$aside` (a name no
//!    tenant's schema can have: tenant names have no `$`) keeping its
//!    ownership marker, and an empty `tenant_x` owned by the tenant's owner
//!    is created with the comment `restoring for tenant uid <uid> by <who>`;
//! 2. `pg_restore --single-transaction` as the tenant's ops login with
//!    `--role=<owner>`, into that schema (`crate::backup`);
//! 3. **finalize** (admin, one transaction): the restored schema gets the
//!    ownership marker, the aside schema is dropped, the app role its login
//!    back, and `tenancy.audit_log` a `Restored` row.
//!
//! Crash safety: until finalize commits, the live schema says "restoring";
//! whoever finds an aside schema with the tenant's marker while the restore
//! lock is free ([`recover_aside`]) drops a live schema still marked
//! restoring (whatever pg_restore did or did not commit into it) and renames
//! the aside one back. After finalize there is no aside schema.
//!
//! The restore lock is the row `('restore', <uid>)` of `tenancy.locks`,
//! locked `FOR UPDATE NOWAIT` by an admin transaction (the restore command
//! holds it on a session of its own for its whole run; the TenantRestore
//! controller takes it in each step's transaction). A reconcile that gives
//! the app role its login takes it `FOR SHARE NOWAIT` in its own transaction
//! ([`super::locks::guard_against_restore`]). No tenant role can touch `tenancy.*`, so no
//! tenant can take, hold or stall it (advisory locks, used before, any role
//! could).

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

pub use super::locks::{aside_schema, LOCK_KIND};
use super::locks::{lock_row, ownership_marker};
use super::membership::Borrowed;
use super::{query_err, quote_ident, quote_literal, PgError};
use crate::names::TenantName;

/// How long one admin step waits for a lock on the tenant's schemas (an app
/// session still finishing a statement) before it gives up.
const STEP_LOCK_TIMEOUT: &str = "10s";

/// Who runs a restore, as the restoring marker names it: the restore
/// command, or one TenantRestore (whose controller finishes it).
pub const BY_COMMAND: &str = "restore command";

/// The `by` of a TenantRestore's restore.
pub fn by_tenant_restore(restore: &str) -> String {
    format!("TenantRestore/{restore}")
}

/// The TenantRestore a restoring marker's `by` names, if it names one.
pub fn tenant_restore_of(by: &str) -> Option<&str> {
    by.strip_prefix("TenantRestore/")
}

/// The comment of a schema being restored, until finalize replaces it with
/// the ownership marker.
pub fn restoring_marker(uid: &str, by: &str) -> String {
    format!("restoring for tenant uid {uid} by {by}")
}

/// The `by` of a restoring marker of this tenant.
fn restoring_by<'a>(comment: &'a str, uid: &str) -> Option<&'a str> {
    comment
        .strip_prefix("restoring for tenant uid ")?
        .strip_prefix(uid)?
        .strip_prefix(" by ")
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
    sync_backups(pool, uid, std::slice::from_ref(row), &[]).await
}

/// Forgets backups that were pruned from the store.
pub async fn forget_backups(pool: &PgPool, uid: &str, ids: &[String]) -> Result<(), PgError> {
    sync_backups(pool, uid, &[], ids).await
}

/// The ids recorded for the tenant, sorted.
pub async fn backup_ids(pool: &PgPool, uid: &str) -> Result<Vec<String>, PgError> {
    sqlx::query_scalar("SELECT id FROM tenancy.backups WHERE tenant_uid = $1 ORDER BY id")
        .bind(uid)
        .fetch_all(pool)
        .await
        .map_err(query_err("reading the tenant's backups"))
}

/// Adds `add` (idempotent on the id) and removes `remove`, in one
/// transaction; nothing when both are empty.
pub async fn sync_backups(pool: &PgPool, uid: &str, add: &[BackupRow], remove: &[String]) -> Result<(), PgError> {
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(query_err("starting the backups' transaction"))?;
    for row in add {
        sqlx::query(
            "INSERT INTO tenancy.backups (tenant_uid, id, taken_at, bytes, key_version) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_uid, id) DO NOTHING",
        )
        .bind(uid)
        .bind(&row.id)
        .bind(row.taken_at)
        .bind(row.bytes)
        .bind(row.key_version)
        .execute(&mut *tx)
        .await
        .map_err(query_err("recording a backup"))?;
    }
    if !remove.is_empty() {
        sqlx::query("DELETE FROM tenancy.backups WHERE tenant_uid = $1 AND id = ANY($2)")
            .bind(uid)
            .bind(remove)
            .execute(&mut *tx)
            .await
            .map_err(query_err("forgetting pruned backups"))?;
    }
    tx.commit().await.map_err(query_err("committing the backups"))?;
    Ok(())
}

/// The newest recorded backup of the tenant.
pub async fn last_backup(pool: &PgPool, uid: &str) -> Result<Option<BackupRow>, PgError> {
    find_backup(pool, uid, None, None).await
}

/// The recorded backup `id`, or (None) the newest taken at or before
/// `before` (or the newest of all).
pub async fn find_backup(
    pool: &PgPool,
    uid: &str,
    id: Option<&str>,
    before: Option<chrono::DateTime<chrono::Utc>>,
) -> Result<Option<BackupRow>, PgError> {
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
    Ok(row.map(|(id, taken_at, bytes, key_version)| BackupRow {
        id,
        taken_at,
        bytes,
        key_version,
    }))
}

/// The registry row's state (`Active`/`Suspended`) of the tenant with `uid`.
pub async fn registry_state(pool: &PgPool, uid: &str) -> Result<Option<String>, PgError> {
    sqlx::query_scalar("SELECT state FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .fetch_optional(pool)
        .await
        .map_err(query_err("reading the tenant registry"))
}

/// The schema's migration version, read on a confined session (the ops
/// login acting as the owner, `search_path` = the tenant schema): None
/// without a version table or versions.
pub async fn schema_version(conn: &mut PgConnection) -> Result<Option<i64>, PgError> {
    let table = quote_ident(super::migrations::VERSION_TABLE)?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("looking for the version table"))?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(version) FROM {table}")))
        .fetch_one(&mut *conn)
        .await
        .map_err(query_err("reading the schema version"))
}

/// A session holding the tenant's restore lock (an open transaction with
/// its row locked `FOR UPDATE`); unlocks when released or dropped.
pub struct RestoreLock {
    conn: Option<PoolConnection<Postgres>>,
}

impl RestoreLock {
    /// Releases the lock and closes its session.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            // The session had its own settings: never back into the pool.
            let _ = sqlx::Connection::close(conn.detach()).await;
        }
    }
}

impl Drop for RestoreLock {
    fn drop(&mut self) {
        // Closing the session ends its transaction, and the lock with it.
        if let Some(conn) = self.conn.take() {
            drop(conn.detach());
        }
    }
}

/// Takes the tenant's restore lock for a whole restore, retrying for up to
/// `wait` while a reconcile holds it for a moment (shared, inside its
/// transaction); None when it is still taken then (another restore).
pub async fn restore_lock(pool: &PgPool, uid: &str, wait: std::time::Duration) -> Result<Option<RestoreLock>, PgError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(lock) = try_restore_lock(pool, uid).await? {
            return Ok(Some(lock));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Takes the tenant's restore lock without waiting; None when taken.
pub async fn try_restore_lock(pool: &PgPool, uid: &str) -> Result<Option<RestoreLock>, PgError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_err("connecting for the restore lock"))?;
    // A restore may take hours: its lock must not be ended as an idle
    // transaction by a server-wide setting.
    sqlx::raw_sql("SET idle_in_transaction_session_timeout = 0; BEGIN")
        .execute(&mut *conn)
        .await
        .map_err(query_err("starting the restore lock's transaction"))?;
    let got = lock_row(&mut conn, uid, true).await;
    match got {
        Ok(true) => Ok(Some(RestoreLock { conn: Some(conn) })),
        other => {
            let _ = sqlx::Connection::close(conn.detach()).await;
            other.map(|_| None)
        }
    }
}

/// The tenant's schema as a restore sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    /// No schema of that name.
    Absent,
    /// Carries this tenant's ownership marker: a normal or finalized schema.
    Ours,
    /// Marked as being restored, by this `by`.
    Restoring(String),
    /// Owned by the tenant's owner role but with another comment (what a
    /// dump's code may have written into it).
    OwnedOther,
    /// Someone else's: never touched.
    Foreign,
}

/// What a restore left, or what one under way looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub live: Live,
}

/// The state of the tenant's schemas, read in one catalog query.
async fn read_state(conn: &mut PgConnection, name: &TenantName, uid: &str) -> Result<(bool, Live), PgError> {
    let (aside, live, comment, owned): (bool, bool, Option<String>, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1 AND obj_description(oid, 'pg_namespace') = $3),
                l.oid IS NOT NULL,
                obj_description(l.oid, 'pg_namespace'),
                coalesce(pg_get_userbyid(l.nspowner)::text = $4, false)
           FROM (SELECT 1) x LEFT JOIN pg_namespace l ON l.nspname = $2",
    )
    .bind(aside_schema(name))
    .bind(name.schema())
    .bind(ownership_marker(uid))
    .bind(name.owner_role())
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("reading the tenant's schemas"))?;
    let live = match (live, comment) {
        (false, _) => Live::Absent,
        (true, Some(c)) if c == ownership_marker(uid) => Live::Ours,
        (true, Some(c)) if restoring_by(&c, uid).is_some() && owned => {
            Live::Restoring(restoring_by(&c, uid).unwrap_or_default().to_owned())
        }
        (true, _) if owned => Live::OwnedOther,
        (true, _) => Live::Foreign,
    };
    Ok((aside, live))
}

/// On a confined session (a restore Job's): whether the tenant's schemas
/// are as [`prepare`] leaves them (the original aside, an empty one marked
/// restoring); Err says what was found instead.
pub async fn check_prepared(
    conn: &mut PgConnection,
    name: &TenantName,
    uid: &str,
) -> Result<Result<(), String>, PgError> {
    Ok(match read_state(conn, name, uid).await? {
        (true, Live::Restoring(_)) => Ok(()),
        (aside, live) => Err(format!("aside schema present: {aside}, live schema: {live:?}")),
    })
}

/// Whether a restore of the tenant is under way or was cut short: None when
/// there is no aside schema with its marker (one catalog query, no lock,
/// no write), else what its live schema is.
pub async fn pending_restore(pool: &PgPool, name: &TenantName, uid: &str) -> Result<Option<Live>, PgError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_err("connecting to read the tenant's schemas"))?;
    let (aside, live) = read_state(&mut conn, name, uid).await?;
    Ok(aside.then_some(live))
}

/// What [`recover_aside`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsideState {
    /// No aside schema: nothing to do (one catalog read, nothing else).
    Clean,
    /// A restore is running (it holds the lock): leave the tenant alone.
    RestoreRunning,
    /// An interrupted restore had not been finalized: what it restored (if
    /// anything) was dropped and the original schema renamed back.
    PutBack,
    /// An interrupted restore had been finalized but the old schema not
    /// dropped (a restore of an older version of the operator): dropped now.
    DroppedOld,
}

/// A transaction for one admin step: `lock_timeout` bounded, the
/// restore lock taken when `take_lock` (the TenantRestore controller's
/// steps; the restore command holds it on a session of its own). None:
/// the lock is taken.
async fn step(
    pool: &PgPool,
    name: &TenantName,
    uid: &str,
    take_lock: bool,
) -> Result<Option<(sqlx::Transaction<'static, Postgres>, Borrowed)>, PgError> {
    let mut tx = pool.begin().await.map_err(query_err("starting a restore step"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{STEP_LOCK_TIMEOUT}'"
    )))
    .execute(&mut *tx)
    .await
    .map_err(query_err("bounding the restore step's lock waits"))?;
    if take_lock && !lock_row(&mut tx, uid, true).await? {
        let _ = tx.rollback().await;
        return Ok(None);
    }
    // The schemas are the owner's: the admin is its member for this step.
    let lent = super::membership::borrow(&mut tx, &name.owner_role()).await?;
    Ok(Some((tx, lent)))
}

/// Commits a step that changed something, the admin's membership given
/// back first.
async fn commit(
    mut tx: sqlx::Transaction<'static, Postgres>,
    lent: Borrowed,
    action: &'static str,
) -> Result<(), PgError> {
    lent.give_back(&mut tx).await?;
    tx.commit().await.map_err(query_err(action))
}

/// Ends a step that changed nothing: rolled back now, not when the
/// connection is next used (a dropped transaction keeps its row lock until
/// then).
async fn nothing<T>(tx: sqlx::Transaction<'static, Postgres>, value: T) -> Result<T, PgError> {
    tx.rollback().await.map_err(query_err("ending a restore step"))?;
    Ok(value)
}

async fn run(tx: &mut PgConnection, stmt: String, action: &'static str) -> Result<(), PgError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
        .execute(&mut *tx)
        .await
        .map_err(query_err(action))?;
    Ok(())
}

/// Finishes an interrupted restore of the tenant, if there is one: reads
/// only (one catalog query) when there is nothing to do; otherwise takes
/// the restore lock without waiting (RestoreRunning when it is taken).
/// Acts only on schemas that carry this tenant's markers or belong to its
/// owner role. Whether a restore whose lock is free is still under way (a
/// TenantRestore's Job) is the caller's to check first.
pub async fn recover_aside(pool: &PgPool, name: &TenantName, uid: &str) -> Result<AsideState, PgError> {
    if pending_restore(pool, name, uid).await?.is_none() {
        return Ok(AsideState::Clean);
    }
    recover(pool, name, uid, true).await
}

/// [`recover_aside`] for a caller that holds the restore lock.
pub async fn recover_aside_locked(pool: &PgPool, name: &TenantName, uid: &str) -> Result<AsideState, PgError> {
    recover(pool, name, uid, false).await
}

async fn recover(pool: &PgPool, name: &TenantName, uid: &str, take_lock: bool) -> Result<AsideState, PgError> {
    let Some((mut tx, lent)) = step(pool, name, uid, take_lock).await? else {
        return Ok(AsideState::RestoreRunning);
    };
    let (aside, live) = read_state(&mut tx, name, uid).await?;
    if !aside {
        return nothing(tx, AsideState::Clean).await;
    }
    let (aside_q, live_q) = (quote_ident(&aside_schema(name))?, quote_ident(&name.schema())?);
    let state = match live {
        Live::Ours => {
            run(
                &mut tx,
                format!("DROP SCHEMA {aside_q} CASCADE"),
                "dropping the schema a restore replaced",
            )
            .await?;
            AsideState::DroppedOld
        }
        Live::Absent | Live::Restoring(_) | Live::OwnedOther => {
            if !matches!(live, Live::Absent) {
                run(
                    &mut tx,
                    format!("DROP SCHEMA {live_q} CASCADE"),
                    "dropping an unfinished restore",
                )
                .await?;
            }
            run(
                &mut tx,
                format!("ALTER SCHEMA {aside_q} RENAME TO {live_q}"),
                "renaming the tenant's schema back",
            )
            .await?;
            AsideState::PutBack
        }
        Live::Foreign => {
            let _ = tx.rollback().await;
            return Err(foreign(name));
        }
    };
    commit(tx, lent, "committing the recovery").await?;
    Ok(state)
}

fn foreign(name: &TenantName) -> PgError {
    PgError::MissingPrivilege {
        role: "restore".into(),
        what: format!(
            "schema {} to belong to the tenant's owner role before a restore replaces it; it belongs to another role",
            name.schema()
        ),
    }
}

/// What [`prepare`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The live schema is aside, an empty one marked restoring in its place.
    Done,
    /// It already was, by the same `by` (a step repeated after a crash).
    Already,
    /// The restore lock is taken (`take_lock` only).
    Busy,
    /// An earlier restore is unfinished (by another `by`, or cut short):
    /// recover it first.
    Unfinished,
    /// The tenant has no schema of its own to restore into (not yet
    /// provisioned, or not ours).
    NoSchema,
}

/// Step 1 of a restore (admin, one transaction): takes the app role's
/// login, moves the live schema aside and creates an empty one owned by the
/// tenant's owner, marked restoring by `by`, with `USAGE` for the app role;
/// then ends the app role's sessions.
pub async fn prepare(
    pool: &PgPool,
    name: &TenantName,
    uid: &str,
    by: &str,
    take_lock: bool,
) -> Result<Prepared, PgError> {
    let Some((mut tx, lent)) = step(pool, name, uid, take_lock).await? else {
        return Ok(Prepared::Busy);
    };
    let (aside, live) = read_state(&mut tx, name, uid).await?;
    let prepared = match (aside, live) {
        (true, Live::Restoring(b)) if b == by => Prepared::Already,
        (true, _) => return nothing(tx, Prepared::Unfinished).await,
        (false, Live::Ours) => {
            let (live_q, aside_q) = (quote_ident(&name.schema())?, quote_ident(&aside_schema(name))?);
            let (owner, app) = (quote_ident(&name.owner_role())?, quote_ident(&name.app_role())?);
            let marker = quote_literal(&restoring_marker(uid, by))?;
            run(
                &mut tx,
                format!("ALTER ROLE {app} NOLOGIN"),
                "disabling the app role's login",
            )
            .await?;
            run(
                &mut tx,
                format!("ALTER SCHEMA {live_q} RENAME TO {aside_q}"),
                "moving the tenant's schema aside",
            )
            .await?;
            run(
                &mut tx,
                format!("CREATE SCHEMA {live_q} AUTHORIZATION {owner}"),
                "creating the schema to restore into",
            )
            .await?;
            run(
                &mut tx,
                format!("COMMENT ON SCHEMA {live_q} IS {marker}"),
                "marking the schema as being restored",
            )
            .await?;
            run(
                &mut tx,
                format!("GRANT USAGE ON SCHEMA {live_q} TO {app}"),
                "granting the app role its schema",
            )
            .await?;
            Prepared::Done
        }
        (false, _) => return nothing(tx, Prepared::NoSchema).await,
    };
    commit(tx, lent, "committing the restore's preparation").await?;
    super::tenant::terminate_sessions(pool, name).await?;
    Ok(prepared)
}

/// What [`finalize`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finalized {
    Done,
    /// It already was (a step repeated after a crash).
    Already,
    /// The restore lock is taken (`take_lock` only).
    Busy,
    /// The schemas are not as a restore by `by` leaves them (it was
    /// recovered, or never prepared): says what was found.
    NotPrepared(String),
}

/// What the audit log records of a restore.
#[derive(Clone, Debug)]
pub struct RestoreRecord {
    pub backup_id: String,
    pub actor: String,
    pub detail: serde_json::Value,
}

/// Step 3 of a restore (admin, one transaction): the restored schema gets
/// the tenant's ownership marker, the aside schema is dropped, the app role
/// gets its login back when the registry says Active, and the audit log a
/// `Restored` row.
pub async fn finalize(
    pool: &PgPool,
    name: &TenantName,
    uid: &str,
    by: &str,
    take_lock: bool,
    record: &RestoreRecord,
) -> Result<Finalized, PgError> {
    let Some((mut tx, lent)) = step(pool, name, uid, take_lock).await? else {
        return Ok(Finalized::Busy);
    };
    let (aside, live) = read_state(&mut tx, name, uid).await?;
    match (aside, &live) {
        (true, Live::Restoring(b)) if b == by => {}
        (false, Live::Ours) => {
            // Finalized before (its audit row says so), or put back.
            let logged: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM tenancy.audit_log WHERE tenant_uid = $1 AND action = 'Restored' AND detail->>'by' = $2 AND detail->>'backupId' = $3)",
            )
            .bind(uid)
            .bind(by)
            .bind(&record.backup_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(query_err("reading the audit log"))?;
            let found = if logged {
                Finalized::Already
            } else {
                Finalized::NotPrepared("the original schema is in place: the restore was put back".into())
            };
            return nothing(tx, found).await;
        }
        _ => {
            return nothing(
                tx,
                Finalized::NotPrepared(format!("aside schema: {aside}, live schema: {live:?}")),
            )
            .await
        }
    }
    let (live_q, aside_q) = (quote_ident(&name.schema())?, quote_ident(&aside_schema(name))?);
    let marker = quote_literal(&ownership_marker(uid))?;
    run(
        &mut tx,
        format!("COMMENT ON SCHEMA {live_q} IS {marker}"),
        "marking the restored schema as the tenant's",
    )
    .await?;
    run(
        &mut tx,
        format!("DROP SCHEMA {aside_q} CASCADE"),
        "dropping the schema a restore replaced",
    )
    .await?;
    // The operator's record of applied migrations described the replaced
    // schema: forget it, so the next reconcile re-reads the restored
    // schema's own version table (on its confined session) and brings it
    // to the MigrationSet's latest version.
    sqlx::query("DELETE FROM tenancy.schema_versions WHERE tenant_uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("forgetting the replaced schema's versions"))?;
    login_back(&mut tx, name, uid).await?;
    let mut detail = record.detail.clone();
    if let Some(d) = detail.as_object_mut() {
        d.insert("backupId".into(), record.backup_id.clone().into());
        d.insert("by".into(), by.into());
    }
    super::registry::record_event(&mut *tx, uid, Some(name.as_str()), "Restored", &record.actor, detail).await?;
    commit(tx, lent, "committing the restore").await?;
    Ok(Finalized::Done)
}

/// Whether a restore by `by` has put its schema in place and waits for
/// [`finalize`] (the original aside, the live one marked restoring by it).
pub async fn awaiting_finalize(pool: &PgPool, name: &TenantName, uid: &str, by: &str) -> Result<bool, PgError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(query_err("connecting to read the restore's state"))?;
    let (aside, live) = read_state(&mut conn, name, uid).await?;
    Ok(aside && matches!(live, Live::Restoring(b) if b == by))
}

/// Gives the app role its login back when the registry says Active.
async fn login_back(tx: &mut PgConnection, name: &TenantName, uid: &str) -> Result<bool, PgError> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM tenancy.tenants WHERE uid = $1")
        .bind(uid)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("reading the tenant registry"))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(name.app_role())
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err("reading the app role"))?;
    if state.as_deref() != Some("Active") || !exists {
        return Ok(false);
    }
    run(
        tx,
        format!("ALTER ROLE {} LOGIN", quote_ident(&name.app_role())?),
        "enabling the app role's login",
    )
    .await?;
    Ok(true)
}

/// What [`put_back`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutBack {
    /// The original schema is back (and the app role's login).
    Done,
    /// There was nothing aside (already put back, or never prepared).
    Nothing,
    /// The restore lock is taken (`take_lock` only).
    Busy,
}

/// After a failed restore (admin, one transaction): drops whatever the
/// restore left in the live schema (only one marked restoring, or owned by
/// the tenant's owner without its marker), renames the original back and
/// gives the app role its login back when the registry says Active.
pub async fn put_back(pool: &PgPool, name: &TenantName, uid: &str, take_lock: bool) -> Result<PutBack, PgError> {
    let Some((mut tx, lent)) = step(pool, name, uid, take_lock).await? else {
        return Ok(PutBack::Busy);
    };
    let (aside, live) = read_state(&mut tx, name, uid).await?;
    if !aside {
        return nothing(tx, PutBack::Nothing).await;
    }
    let (live_q, aside_q) = (quote_ident(&name.schema())?, quote_ident(&aside_schema(name))?);
    match live {
        Live::Absent => {}
        Live::Restoring(_) | Live::OwnedOther => {
            run(
                &mut tx,
                format!("DROP SCHEMA {live_q} CASCADE"),
                "dropping a failed restore",
            )
            .await?
        }
        // Finalized (never put back then) or someone else's.
        Live::Ours | Live::Foreign => {
            let _ = tx.rollback().await;
            return Err(foreign(name));
        }
    }
    run(
        &mut tx,
        format!("ALTER SCHEMA {aside_q} RENAME TO {live_q}"),
        "renaming the tenant's schema back",
    )
    .await?;
    login_back(&mut tx, name, uid).await?;
    commit(tx, lent, "committing the put-back").await?;
    Ok(PutBack::Done)
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

    #[test]
    fn restoring_markers_name_their_tenant_and_restorer() {
        let m = restoring_marker("u-1", &by_tenant_restore("r1"));
        assert_eq!(restoring_by(&m, "u-1"), Some("TenantRestore/r1"));
        assert_eq!(tenant_restore_of(restoring_by(&m, "u-1").unwrap()), Some("r1"));
        assert_eq!(restoring_by(&m, "u-2"), None, "another tenant's marker");
        assert_eq!(restoring_by(&m, "u"), None, "a uid prefix is not the uid");
        assert_eq!(restoring_by(&ownership_marker("u-1"), "u-1"), None);
        assert_eq!(tenant_restore_of(BY_COMMAND), None);
    }
}
