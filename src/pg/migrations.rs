//! Tenant schema migrations: the version table in each tenant schema, the
//! per-tenant migration run, and the failure records in the control schema.
//!
//! Takes validated [`TenantName`]s (identifiers come only from them) and
//! the migrations of a MigrationSet; gives what each tenant has applied and
//! what a run did. Side effects: the migrations' own SQL, run in the tenant
//! schema as the tenant's owner role; rows in `<schema>._tenancy_migrations`
//! (created on first use, owned by the owner role) and in
//! `tenancy.migration_failures`; a session-level advisory lock per tenant
//! while it is migrated, so two operator instances never migrate one schema
//! at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Row};

use super::{query_err, quote_ident, PgError};
use crate::names::TenantName;

/// The version table, in every tenant schema that has run a migration.
pub const VERSION_TABLE: &str = "_tenancy_migrations";

/// First key of the per-tenant advisory lock (`'tena'`); the second is
/// `hashtext(<schema>)`. A hash collision only makes two tenants wait for
/// each other, never share a run.
const LOCK_NAMESPACE: i32 = 0x7465_6e61;

/// The most characters of a Postgres error kept in a failure record.
const MAX_ERROR: usize = 2000;

/// The SHA-256 of a migration's SQL, lower-case hex: what the version table
/// records, so an edited migration is recognised.
pub fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// One migration as a run executes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationSql {
    pub version: i64,
    pub name: String,
    pub sql: String,
    pub checksum: String,
    pub transactional: bool,
}

impl MigrationSql {
    pub fn new(version: i64, name: impl Into<String>, sql: impl Into<String>, transactional: bool) -> Self {
        let sql = sql.into();
        Self { version, name: name.into(), checksum: checksum(&sql), sql, transactional }
    }
}

/// A row of a tenant's version table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub name: String,
    pub checksum: String,
}

/// A tenant schema's migration state, as the catalog shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaVersions {
    /// Whether the tenant's schema exists (a tenant not yet provisioned, or
    /// being deleted, has none).
    pub schema_exists: bool,
    /// The version table's rows, lowest version first (empty without a table).
    pub applied: Vec<Applied>,
}

impl SchemaVersions {
    /// The highest applied version, 0 when none.
    pub fn current(&self) -> i64 {
        self.applied.iter().map(|a| a.version).max().unwrap_or(0)
    }
}

/// Per-statement limits of a migration run (`lock_timeout`,
/// `statement_timeout`); zero disables one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub lock: Duration,
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { lock: Duration::from_secs(10), statement: Duration::from_secs(15 * 60) }
    }
}

impl Timeouts {
    fn ms(d: Duration) -> String {
        format!("{}ms", d.as_millis().min(i32::MAX as u128))
    }
}

/// Which set (and which of its generations) a run works for; recorded with
/// a failure so a new generation can retry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetRef {
    pub name: String,
    pub generation: i64,
}

/// Why a tenant's last run did not bring it to the latest version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureRecord {
    pub tenant: String,
    pub migration_set: String,
    pub set_generation: i64,
    pub version: i64,
    pub migration_name: String,
    /// `MigrationFailed` or `ChecksumMismatch`.
    pub reason: String,
    pub error: String,
    pub sqlstate: Option<String>,
}

pub const REASON_FAILED: &str = "MigrationFailed";
pub const REASON_CHECKSUM: &str = "ChecksumMismatch";

/// What one tenant's run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantOutcome {
    /// Now at `to`; `applied` lists what this run applied (empty: it was
    /// already at the latest version).
    Migrated { from: i64, to: i64, applied: Vec<i64> },
    /// Another run (another operator instance) holds this tenant's lock;
    /// nothing was done.
    Busy,
    /// The schema does not exist; nothing was done.
    NoSchema,
    /// A recorded migration differs from the set (edited, removed, or a
    /// version added below the applied one): nothing was run.
    ChecksumMismatch { version: i64, detail: String },
    /// `version` failed; the schema stayed at `at`.
    Failed { at: i64, version: i64, error: String, sqlstate: Option<String> },
}

/// Schemas per `UNION ALL` query of [`observe_many`]. Postgres plans a
/// `UNION ALL` in time growing faster than its branches (500 branches cost
/// 3x as much per branch as 100; measured on Postgres 15), so the tables
/// are read a hundred at a time.
const OBSERVE_CHUNK: usize = 100;

/// Reads the migration state of many tenants in a few queries: one catalog
/// query, then one `UNION ALL` over the version tables per
/// [`OBSERVE_CHUNK`] schemas.
pub async fn observe_many(pool: &PgPool, names: &[TenantName]) -> Result<BTreeMap<TenantName, SchemaVersions>, PgError> {
    let mut out: BTreeMap<TenantName, SchemaVersions> = BTreeMap::new();
    if names.is_empty() {
        return Ok(out);
    }
    let schemas: Vec<String> = names.iter().map(TenantName::schema).collect();
    let rows: Vec<(String, bool)> = sqlx::query_as(
        "SELECT n.nspname::text, EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = $2 AND c.relkind = 'r')
           FROM pg_namespace n WHERE n.nspname = ANY($1)",
    )
    .bind(&schemas)
    .bind(VERSION_TABLE)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading which tenant schemas have a version table"))?;
    let by_schema: BTreeMap<String, &TenantName> = names.iter().map(|n| (n.schema(), n)).collect();
    let mut with_table = Vec::new();
    for (schema, has_table) in rows {
        if let Some(n) = by_schema.get(&schema) {
            out.insert((*n).clone(), SchemaVersions { schema_exists: true, applied: Vec::new() });
            if has_table {
                with_table.push((*n).clone());
            }
        }
    }
    for n in names {
        out.entry(n.clone()).or_default();
    }
    for chunk in with_table.chunks(OBSERVE_CHUNK) {
        let mut sql = String::new();
        for (i, n) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(" UNION ALL ");
            }
            // `i` is a loop counter, the schema a quoted validated name.
            sql.push_str(&format!("SELECT {i}::int, version, name, checksum FROM {}.{VERSION_TABLE}", quote_ident(&n.schema())?));
        }
        sql.push_str(" ORDER BY 1, 2");
        // Not kept as a prepared statement: the texts change with the set of
        // tenants, and would push the per-tenant statements out of the
        // connection's statement cache.
        let rows: Vec<(i32, i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .fetch_all(pool)
            .await
            .map_err(query_err("reading the tenants' version tables"))?;
        for (i, version, name, checksum) in rows {
            if let Some(n) = chunk.get(i as usize) {
                out.entry(n.clone()).or_default().applied.push(Applied { version, name, checksum });
            }
        }
    }
    Ok(out)
}

/// One tenant's migration state.
pub async fn observe(pool: &PgPool, name: &TenantName) -> Result<SchemaVersions, PgError> {
    let mut m = observe_many(pool, std::slice::from_ref(name)).await?;
    Ok(m.remove(name).unwrap_or_default())
}

/// The failure records of the tenants following `set`.
pub async fn failures_of_set(pool: &PgPool, set: &str) -> Result<Vec<FailureRecord>, PgError> {
    let rows: Vec<(String, String, i64, i64, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT tenant_name, migration_set, set_generation, version, migration_name, reason, error, sqlstate
           FROM tenancy.migration_failures WHERE migration_set = $1 ORDER BY tenant_name",
    )
    .bind(set)
    .fetch_all(pool)
    .await
    .map_err(query_err("reading the migration failures"))?;
    Ok(rows.into_iter().map(record_from).collect())
}

/// The failure record of one tenant, if any.
pub async fn failure_of(pool: &PgPool, tenant: &TenantName) -> Result<Option<FailureRecord>, PgError> {
    let row: Option<(String, String, i64, i64, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT tenant_name, migration_set, set_generation, version, migration_name, reason, error, sqlstate
           FROM tenancy.migration_failures WHERE tenant_name = $1",
    )
    .bind(tenant.as_str())
    .fetch_optional(pool)
    .await
    .map_err(query_err("reading the tenant's migration failure"))?;
    Ok(row.map(record_from))
}

fn record_from(r: (String, String, i64, i64, String, String, String, Option<String>)) -> FailureRecord {
    FailureRecord { tenant: r.0, migration_set: r.1, set_generation: r.2, version: r.3, migration_name: r.4, reason: r.5, error: r.6, sqlstate: r.7 }
}

/// Removes a tenant's failure record (on success, and with the tenant).
pub async fn clear_failure<'e, E: sqlx::PgExecutor<'e>>(exec: E, tenant: &str) -> Result<(), PgError> {
    sqlx::query("DELETE FROM tenancy.migration_failures WHERE tenant_name = $1")
        .bind(tenant)
        .execute(exec)
        .await
        .map_err(query_err("clearing the tenant's migration failure"))?;
    Ok(())
}

async fn record_failure(conn: &mut PgConnection, f: &FailureRecord) -> Result<(), PgError> {
    sqlx::query(
        "INSERT INTO tenancy.migration_failures (tenant_name, migration_set, set_generation, version, migration_name, reason, error, sqlstate)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_name) DO UPDATE SET migration_set = EXCLUDED.migration_set, set_generation = EXCLUDED.set_generation,
           version = EXCLUDED.version, migration_name = EXCLUDED.migration_name, reason = EXCLUDED.reason,
           error = EXCLUDED.error, sqlstate = EXCLUDED.sqlstate, failed_at = now()",
    )
    .bind(&f.tenant)
    .bind(&f.migration_set)
    .bind(f.set_generation)
    .bind(f.version)
    .bind(&f.migration_name)
    .bind(&f.reason)
    .bind(&f.error)
    .bind(&f.sqlstate)
    .execute(conn)
    .await
    .map_err(query_err("recording the migration failure"))?;
    Ok(())
}

/// Brings one tenant schema to the last of `migrations` (sorted by version),
/// each in its own transaction (or, for a non-transactional one, on this
/// session with the version recorded after it succeeded), under the
/// tenant's advisory lock. A migration's own error is an outcome (recorded
/// in `tenancy.migration_failures`); a lost connection is an `Err` (nothing
/// recorded: the next run retries).
///
/// Round trips in the common case (one pending transactional migration,
/// version table present): 6 — the lock; `BEGIN` with the settings and the
/// version read; the migration; the audit observation (2); then the audit
/// triggers, the version record, `COMMIT` and the lock's release in one
/// message. A rollout's cost beside the migration itself is mostly these
/// (`cargo bench --bench migrations`, docs/migrations.md).
pub async fn migrate_tenant(pool: &PgPool, name: &TenantName, set: &SetRef, migrations: &[MigrationSql], timeouts: &Timeouts) -> Result<TenantOutcome, PgError> {
    let mut conn: PoolConnection<Postgres> = pool.acquire().await.map_err(query_err("connecting to migrate a tenant"))?;
    let mut session = Session { conn: &mut conn, clean: false };
    let result = locked(session.conn, name, set, migrations, timeouts).await;
    session.clean = result.is_ok();
    result
}

/// Hands the connection back to the pool only after a run that ended
/// cleanly. A run cut short (an error, or its future dropped) may leave a
/// transaction open, the advisory lock held, or a role or search_path set
/// for the session: the connection is closed instead, and Postgres rolls
/// back and releases with it.
struct Session<'c> {
    conn: &'c mut PoolConnection<Postgres>,
    clean: bool,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

async fn locked(conn: &mut PgConnection, name: &TenantName, set: &SetRef, migrations: &[MigrationSql], timeouts: &Timeouts) -> Result<TenantOutcome, PgError> {
    let schema = name.schema();
    // One round trip: the schema, the lock, the version table. CASE, not
    // AND: Postgres does not promise to evaluate AND's operands in order, and
    // a lock taken for a missing schema would never be released.
    let (exists, got, has_table): (bool, bool, bool) = sqlx::query_as(
        "SELECT e, l, l AND to_regclass(format('%I.%I', $2::text, $3::text)) IS NOT NULL
           FROM (SELECT e, CASE WHEN e THEN pg_try_advisory_lock($1, hashtext($2)) ELSE false END AS l
                   FROM (SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $2) AS e) x) y",
    )
    .bind(LOCK_NAMESPACE)
    .bind(&schema)
    .bind(VERSION_TABLE)
    .fetch_one(&mut *conn)
    .await
    .map_err(query_err("taking the tenant's migration lock"))?;
    if !exists {
        return Ok(TenantOutcome::NoSchema);
    }
    if !got {
        return Ok(TenantOutcome::Busy);
    }
    if !has_table {
        create_version_table(conn, name).await?;
    }
    let (outcome, released) = run(conn, name, set, migrations, timeouts).await?;
    if !released {
        // Releasing the lock clears a success's old failure record in the
        // same round trip.
        let clear = matches!(outcome, TenantOutcome::Migrated { .. });
        sqlx::raw_sql(sqlx::AssertSqlSafe(release_sql(name, clear)?)).execute(&mut *conn).await.map_err(query_err("releasing the tenant's migration lock"))?;
    }
    Ok(outcome)
}

/// Releases the tenant's advisory lock and, with `clear`, removes its
/// failure record. Literals: the schema and tenant are validated names.
fn release_sql(name: &TenantName, clear: bool) -> Result<String, PgError> {
    let mut sql = format!("SELECT pg_advisory_unlock({LOCK_NAMESPACE}, hashtext({}))", super::quote_literal(&name.schema())?);
    if clear {
        sql.push_str(&format!(";\nDELETE FROM tenancy.migration_failures WHERE tenant_name = {}", super::quote_literal(name.as_str())?));
    }
    Ok(sql)
}

/// Connection-level failures: the run is retried, nothing is recorded.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") || c.starts_with("28")),
        _ => false,
    }
}

fn pg_error_parts(e: &sqlx::Error) -> (String, Option<String>) {
    match e {
        sqlx::Error::Database(db) => (db.message().chars().take(MAX_ERROR).collect(), db.code().map(|c| c.into_owned())),
        other => (other.to_string().chars().take(MAX_ERROR).collect(), None),
    }
}

async fn create_version_table(conn: &mut PgConnection, name: &TenantName) -> Result<(), PgError> {
    let schema = quote_ident(&name.schema())?;
    let owner = quote_ident(&name.owner_role())?;
    let app = quote_ident(&name.app_role())?;
    // Created as the owner role, so it belongs to it. The owner's default
    // privileges give the app role DML on it; the app keeps only SELECT (it
    // may read its schema version, not forge it).
    let sql = format!(
        "SET LOCAL ROLE {owner};
         CREATE TABLE IF NOT EXISTS {schema}.{VERSION_TABLE} (
             version     bigint PRIMARY KEY,
             name        text NOT NULL,
             checksum    text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now(),
             duration_ms bigint NOT NULL
         );
         REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {schema}.{VERSION_TABLE} FROM {app};"
    );
    let mut tx = conn.begin().await.map_err(query_err("starting the version table's transaction"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.map_err(query_err("creating the version table"))?;
    tx.commit().await.map_err(query_err("committing the version table"))?;
    Ok(())
}

/// `BEGIN` and the migration's settings in one round trip: the tenant's
/// owner role, its schema as `search_path`, the timeouts. Identifiers are
/// quoted validated names; the timeouts are digits and `ms`.
fn begin_sql(name: &TenantName, t: &Timeouts) -> Result<String, PgError> {
    Ok(format!(
        "BEGIN; SET LOCAL ROLE {}; SET LOCAL search_path TO {}; SET LOCAL lock_timeout = '{}'; SET LOCAL statement_timeout = '{}'",
        quote_ident(&name.owner_role())?,
        quote_ident(&name.schema())?,
        Timeouts::ms(t.lock),
        Timeouts::ms(t.statement)
    ))
}

/// What the recorded versions say about `migrations`: the first mismatch
/// (version, what differs), if any. Pure.
pub fn find_mismatch(applied: &[Applied], migrations: &[MigrationSql]) -> Option<(i64, String)> {
    let by_version: BTreeMap<i64, &MigrationSql> = migrations.iter().map(|m| (m.version, m)).collect();
    let current = applied.iter().map(|a| a.version).max().unwrap_or(0);
    let mut found: Vec<(i64, String)> = Vec::new();
    for a in applied {
        match by_version.get(&a.version) {
            None => found.push((a.version, format!("version {} ({}) is applied but no longer in the MigrationSet", a.version, a.name))),
            Some(m) if m.checksum != a.checksum => found.push((
                a.version,
                format!(
                    "version {} ({}) was applied with SQL checksum {} but the MigrationSet now has {}: applied migrations are immutable; restore its SQL and add a new version instead",
                    a.version,
                    m.name,
                    short(&a.checksum),
                    short(&m.checksum)
                ),
            )),
            Some(_) => {}
        }
    }
    for m in migrations {
        if m.version < current && !applied.iter().any(|a| a.version == m.version) {
            found.push((m.version, format!("version {} ({}) was added below the applied version {current}: add new migrations after the last one", m.version, m.name)));
        }
    }
    found.into_iter().min_by_key(|(v, _)| *v)
}

fn short(sum: &str) -> &str {
    &sum[..sum.len().min(12)]
}

/// The version table's rows, lowest version first, from the rows of a
/// simple-protocol query (text values).
fn applied_from(rows: &[PgRow]) -> Result<Vec<Applied>, sqlx::Error> {
    rows.iter().map(|r| Ok(Applied { version: r.try_get(0)?, name: r.try_get(1)?, checksum: r.try_get(2)? })).collect()
}

/// Runs the pending migrations; gives the outcome and whether the lock was
/// released on the way (with the last migration's commit).
async fn run(conn: &mut PgConnection, name: &TenantName, set: &SetRef, migrations: &[MigrationSql], timeouts: &Timeouts) -> Result<(TenantOutcome, bool), PgError> {
    let begin = begin_sql(name, timeouts)?;
    let table = version_table(name)?;
    // The first transaction reads the versions (under the lock, so no other
    // operator instance moves them meanwhile); it is the first migration's
    // transaction too when that one is transactional. An error here is not
    // a migration's: the run fails and the session is closed (`Session`).
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{begin};\nSELECT version, name, checksum FROM {table} ORDER BY version")))
        .fetch_all(&mut *conn)
        .await
        .map_err(query_err("reading the version table"))?;
    let applied = applied_from(&rows).map_err(query_err("decoding the version table"))?;
    let from = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if let Some((version, detail)) = find_mismatch(&applied, migrations) {
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.map_err(query_err("ending the version check"))?;
        let migration_name = migrations.iter().find(|m| m.version == version).map(|m| m.name.clone()).unwrap_or_default();
        let rec = FailureRecord {
            tenant: name.as_str().to_owned(),
            migration_set: set.name.clone(),
            set_generation: set.generation,
            version,
            migration_name,
            reason: REASON_CHECKSUM.into(),
            error: detail.clone(),
            sqlstate: None,
        };
        record_failure(conn, &rec).await?;
        return Ok((TenantOutcome::ChecksumMismatch { version, detail }, false));
    }
    let pending: Vec<&MigrationSql> = migrations.iter().filter(|m| m.version > from).collect();
    if pending.is_empty() {
        let sql = format!("COMMIT;\n{}", release_sql(name, true)?);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map_err(query_err("ending the version check"))?;
        return Ok((TenantOutcome::Migrated { from, to: from, applied: Vec::new() }, true));
    }
    let mut at = from;
    let mut done = Vec::new();
    let mut in_tx = true;
    let mut released = false;
    for (i, m) in pending.iter().enumerate() {
        let last = i + 1 == pending.len();
        let step = if m.transactional {
            // A later migration's transaction begins in the message that
            // carries its SQL (ours first, so nothing of the migration's can
            // change them).
            let prefix = if in_tx { String::new() } else { format!("{begin};\n") };
            let release = if last { Some(release_sql(name, true)?) } else { None };
            let step = apply_in_transaction(conn, name, m, &prefix, release).await?;
            in_tx = false;
            released = last && step.is_ok();
            step
        } else {
            if in_tx {
                sqlx::raw_sql("COMMIT").execute(&mut *conn).await.map_err(query_err("ending the version check"))?;
                in_tx = false;
            }
            apply_outside_transaction(conn, name, m, timeouts).await?
        };
        if let Some(failed) = settle(conn, name, set, m, step, &mut at, &mut done).await? {
            return Ok((failed, false));
        }
    }
    Ok((TenantOutcome::Migrated { from, to: at, applied: done }, released))
}

/// Books one migration's outcome: on success advances `at`; on the
/// migration's own error records it and gives the `Failed` outcome; a lost
/// connection is an `Err`.
async fn settle(
    conn: &mut PgConnection,
    name: &TenantName,
    set: &SetRef,
    m: &MigrationSql,
    step: Result<(), sqlx::Error>,
    at: &mut i64,
    done: &mut Vec<i64>,
) -> Result<Option<TenantOutcome>, PgError> {
    match step {
        Ok(()) => {
            *at = m.version;
            done.push(m.version);
            Ok(None)
        }
        Err(e) if is_connection_error(&e) => Err(PgError::Query { action: "running a migration", source: e }),
        Err(e) => {
            let (error, sqlstate) = pg_error_parts(&e);
            let rec = FailureRecord {
                tenant: name.as_str().to_owned(),
                migration_set: set.name.clone(),
                set_generation: set.generation,
                version: m.version,
                migration_name: m.name.clone(),
                reason: REASON_FAILED.into(),
                error: error.clone(),
                sqlstate: sqlstate.clone(),
            };
            record_failure(conn, &rec).await?;
            Ok(Some(TenantOutcome::Failed { at: *at, version: m.version, error, sqlstate }))
        }
    }
}

/// The tenant's version table, schema-qualified.
fn version_table(name: &TenantName) -> Result<String, PgError> {
    Ok(format!("{}.{VERSION_TABLE}", quote_ident(&name.schema())?))
}

/// The message that ends a migration's transaction (one begun as the
/// owner, after [`super::audit::statements_in_tx`]): the tenant's
/// search_path and the default plan cache mode back first (deferred
/// triggers of the migration's run at COMMIT and must see what the
/// migration saw), the `audit` statements, the version row, `COMMIT`, then
/// `release` if given. Values are literals: digits, and quoted strings
/// (standard_conforming_strings is checked at connect).
fn record_sql(name: &TenantName, m: &MigrationSql, audit: &[String], ms: i64, release: Option<&str>) -> Result<String, PgError> {
    let mut sql = format!("SET LOCAL search_path TO {};\nSET LOCAL plan_cache_mode TO DEFAULT", quote_ident(&name.schema())?);
    for stmt in audit {
        sql.push_str(";\n");
        sql.push_str(stmt);
    }
    sql.push_str(&format!(
        ";\nINSERT INTO {} (version, name, checksum, duration_ms) VALUES ({}, {}, {}, {ms});\nCOMMIT",
        version_table(name)?,
        m.version,
        super::quote_literal(&m.name)?,
        super::quote_literal(&m.checksum)?
    ));
    if let Some(release) = release {
        sql.push_str(";\n");
        sql.push_str(release);
    }
    Ok(sql)
}

/// Runs one migration in the transaction open on `conn` (or begun by
/// `prefix`), then in one message: the audit triggers of the tables it
/// created, its version record, `COMMIT`, and `release` (the lock's
/// release, after the last migration). The outer `Result` is a failure
/// around the migration (the connection); the inner one is the migration's
/// own outcome, rolled back.
async fn apply_in_transaction(conn: &mut PgConnection, name: &TenantName, m: &MigrationSql, prefix: &str, release: Option<String>) -> Result<Result<(), sqlx::Error>, PgError> {
    let result: Result<(), sqlx::Error> = async {
        let start = Instant::now();
        // The MigrationSet's SQL, by design: its author decides the schema.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{prefix}{}", m.sql))).execute(&mut *conn).await?;
        let ms = start.elapsed().as_millis() as i64;
        // Audit triggers on the tables it created, committed with them (docs/audit.md).
        let audit = super::audit::statements_in_tx(conn, name).await?;
        let sql = record_sql(name, m, &audit, ms, release.as_deref()).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(Ok(())),
        Err(e) if is_connection_error(&e) => Err(PgError::Query { action: "running a migration", source: e }),
        Err(e) => {
            // The migration's SQL, the audit DDL, the version record or a
            // deferred constraint at COMMIT failed: roll back (a no-op with a
            // warning when the failed COMMIT already did), so the session is
            // clean for the failure record.
            sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.map_err(query_err("rolling back a failed migration"))?;
            Ok(Err(e))
        }
    }
}


/// Runs a non-transactional migration on this session (role and
/// search_path set for the session, reset afterwards), then records its
/// version in a transaction of its own.
async fn apply_outside_transaction(conn: &mut PgConnection, name: &TenantName, m: &MigrationSql, t: &Timeouts) -> Result<Result<(), sqlx::Error>, PgError> {
    let owner = quote_ident(&name.owner_role())?;
    let schema = quote_ident(&name.schema())?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET ROLE {owner}; SET search_path TO {schema}")))
        .execute(&mut *conn)
        .await
        .map_err(query_err("setting the migration's role"))?;
    sqlx::query("SELECT set_config('lock_timeout', $1, false), set_config('statement_timeout', $2, false)")
        .bind(Timeouts::ms(t.lock))
        .bind(Timeouts::ms(t.statement))
        .execute(&mut *conn)
        .await
        .map_err(query_err("setting the migration's timeouts"))?;
    let start = Instant::now();
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql.clone())).execute(&mut *conn).await.map(|_| ());
    let ms = start.elapsed().as_millis() as i64;
    if let Err(e) = &result {
        if is_connection_error(e) {
            return Ok(result);
        }
    }
    sqlx::raw_sql("RESET ROLE; RESET search_path; RESET lock_timeout; RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .map_err(query_err("resetting the session after a migration"))?;
    if result.is_err() {
        return Ok(result);
    }
    // The version row in a transaction of its own, with the audit triggers
    // of tables the migration created, as in the transactional case. An
    // error here is not the migration's: the run fails and the session is
    // closed (`Session`), rolling it back.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("BEGIN; SET LOCAL ROLE {owner}")))
        .execute(&mut *conn)
        .await
        .map_err(query_err("starting the version record"))?;
    let audit = super::audit::statements_in_tx(conn, name).await.map_err(query_err("auditing the migration's tables"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(record_sql(name, m, &audit, ms, None)?))
        .execute(&mut *conn)
        .await
        .map_err(query_err("recording a non-transactional migration"))?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: i64, sql: &str) -> MigrationSql {
        MigrationSql::new(v, format!("m{v}"), sql, true)
    }

    fn a(v: i64, sql: &str) -> Applied {
        Applied { version: v, name: format!("m{v}"), checksum: checksum(sql) }
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(checksum(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(checksum("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn matching_history_has_no_mismatch() {
        let set = [m(1, "a"), m(2, "b"), m(3, "c")];
        assert_eq!(find_mismatch(&[], &set), None);
        assert_eq!(find_mismatch(&[a(1, "a"), a(2, "b")], &set), None);
    }

    #[test]
    fn an_edited_applied_migration_is_a_mismatch() {
        let set = [m(1, "a"), m(2, "b edited")];
        let (v, detail) = find_mismatch(&[a(1, "a"), a(2, "b")], &set).unwrap();
        assert_eq!(v, 2);
        assert!(detail.contains("immutable"), "{detail}");
    }

    #[test]
    fn a_removed_or_inserted_version_is_a_mismatch() {
        let (v, _) = find_mismatch(&[a(1, "a"), a(2, "b")], &[m(1, "a")]).unwrap();
        assert_eq!(v, 2);
        let (v, detail) = find_mismatch(&[a(1, "a"), a(3, "c")], &[m(1, "a"), m(2, "new"), m(3, "c")]).unwrap();
        assert_eq!(v, 2);
        assert!(detail.contains("below"), "{detail}");
    }
}
