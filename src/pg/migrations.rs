//! Tenant schema migrations: the per-tenant migration run, the record of
//! what each tenant applied, and the failure records, in the control schema.
//!
//! Takes validated [`TenantName`]s (identifiers come only from them), each
//! tenant's [`OpsLogin`] and the migrations of a MigrationSet; gives what
//! each tenant has applied and what a run did. Side effects: the
//! migrations' own SQL, run on a confined session of the tenant (session
//! user `tenant_<x>_ops`, acting as the tenant's owner; never the admin's,
//! closed after the run); rows in `<schema>._tenancy_migrations` (created on
//! first use by the owner, written on that session); rows in
//! `tenancy.schema_versions` and `tenancy.migration_failures` and the
//! tenant's row lock in `tenancy.locks` (`('migrate', <uid>)`), written and
//! held by the admin. The admin never reads nor writes a relation inside a
//! tenant schema: what a tenant applied is read from
//! `tenancy.schema_versions`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres, Row};

use super::confined::{self, Confined, OpsLogin};
use super::{query_err, quote_ident, quote_literal, PgError, Target};
use crate::crypto::{Keyring, TenantSalt};
use crate::names::TenantName;

/// The version table, in every tenant schema that has run a migration.
pub const VERSION_TABLE: &str = "_tenancy_migrations";

/// The kind of a migration run's row in `tenancy.locks` (its key is the
/// tenant's uid). Restores use `restore`.
pub const LOCK_KIND: &str = super::locks::MIGRATION_LOCK_KIND;

/// How long taking a tenant's migration lock may wait: only on another
/// run that is inserting the same lock row right now (a held lock is
/// refused at once, `NOWAIT`).
const LOCK_WAIT: &str = "2s";

/// The most characters of a Postgres error kept in a failure record.
const MAX_ERROR: usize = 2000;

/// The most characters of a name or checksum re-synced from a tenant's own
/// version table (which its owner may have written anything into).
const MAX_SYNCED: usize = 200;

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
        Self {
            version,
            name: name.into(),
            checksum: checksum(&sql),
            sql,
            transactional,
        }
    }
}

/// A recorded migration of a tenant. Its name and checksum are the same in
/// every follower of a set: a rollout pass holds them for all of them
/// (twice), so they are shared ([`Text`](crate::api::Text)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub name: crate::api::Text,
    pub checksum: crate::api::Text,
}

/// A tenant's migration state, as the control schema records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaVersions {
    /// Whether the tenant is registered and its schema exists (a tenant not
    /// yet provisioned, or being deleted, has none).
    pub schema_exists: bool,
    /// The recorded migrations, lowest version first.
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
        Self {
            lock: Duration::from_secs(10),
            statement: Duration::from_secs(15 * 60),
        }
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
    /// already at the latest version). `from` is the version the schema's
    /// own table showed at the start (when it differs from the recorded
    /// one, the record was re-synced).
    Migrated { from: i64, to: i64, applied: Vec<i64> },
    /// Another run (another operator instance) holds this tenant's lock;
    /// nothing was done.
    Busy,
    /// The schema does not exist (or the tenant is not registered); nothing
    /// was done.
    NoSchema,
    /// A recorded migration differs from the set (edited, removed, or a
    /// version added below the applied one): nothing was run.
    ChecksumMismatch { version: i64, detail: String },
    /// `version` failed; the schema stayed at `at`.
    Failed {
        at: i64,
        version: i64,
        error: String,
        sqlstate: Option<String>,
    },
}

/// From how many tenants [`observe_many`] reads whole tables (hash joins)
/// rather than looking each tenant up.
const MANY_TENANTS: usize = 256;

/// Reads the recorded migration state of many tenants in one query (of the
/// control schema and the catalog; nothing inside a tenant schema).
pub async fn observe_many(
    pool: &PgPool,
    names: &[TenantName],
) -> Result<BTreeMap<TenantName, SchemaVersions>, PgError> {
    observe_many_with(pool, names, names.len() > MANY_TENANTS).await
}

/// [`observe_many`] choosing the plan: `scan` reads every tenant of the
/// database (what it does for more than 256 names). Public for tests.
#[doc(hidden)]
pub async fn observe_many_with(
    pool: &PgPool,
    names: &[TenantName],
    scan: bool,
) -> Result<BTreeMap<TenantName, SchemaVersions>, PgError> {
    let mut out: BTreeMap<TenantName, SchemaVersions> =
        names.iter().map(|n| (n.clone(), SchemaVersions::default())).collect();
    if names.is_empty() {
        return Ok(out);
    }
    let list: Vec<&str> = names.iter().map(TenantName::as_str).collect();
    // A few tenants (a reconcile's one): index look-ups per named tenant
    // (the lateral subquery is kept from being pulled up by OFFSET 0), as the
    // generic plan of a plain join scanned every tenant's versions and every
    // schema name. Many (a rollout pass over a set's followers, again every
    // few seconds while they are being provisioned): every tenant of the
    // database in one hashed join, no parameter (a generic plan takes an
    // array parameter for 10 rows and looks each tenant up: 107 ms at 10,000
    // tenants against 20 ms), the others dropped and the order made here.
    let rows: Vec<(String, bool, Option<i64>, Option<String>, Option<String>)> = if !scan {
        sqlx::query_as(
            "SELECT t.name, (SELECT true FROM pg_namespace n WHERE n.nspname = t.schema_name LIMIT 1) IS NOT NULL,
                    v.version, v.name, v.checksum
               FROM tenancy.tenants t
               LEFT JOIN LATERAL (SELECT v.version, v.name, v.checksum FROM tenancy.schema_versions v
                                   WHERE v.tenant_uid = t.uid OFFSET 0) v ON true
              WHERE t.name = ANY($1) ORDER BY t.name, v.version",
        )
        .bind(&list)
        .fetch_all(pool)
        .await
    } else {
        sqlx::query_as(
            "SELECT t.name, n.nspname IS NOT NULL, v.version, v.name, v.checksum
               FROM tenancy.tenants t
               LEFT JOIN pg_catalog.pg_namespace n ON n.nspname::text = t.schema_name
               LEFT JOIN tenancy.schema_versions v ON v.tenant_uid = t.uid",
        )
        .fetch_all(pool)
        .await
    }
    .map_err(query_err("reading the tenants' schema versions"))?;
    let by_name: BTreeMap<&str, &TenantName> = names.iter().map(|n| (n.as_str(), n)).collect();
    for (tenant, exists, version, name, checksum) in rows {
        let Some(n) = by_name.get(tenant.as_str()) else {
            continue;
        };
        let entry = out.entry((*n).clone()).or_default();
        entry.schema_exists = exists;
        if let (Some(version), Some(name), Some(checksum)) = (version, name, checksum) {
            entry.applied.push(Applied {
                version,
                name: name.into(),
                checksum: checksum.into(),
            });
        }
    }
    for v in out.values_mut() {
        v.applied.sort_by_key(|a| a.version);
    }
    Ok(out)
}

/// One tenant's recorded migration state.
pub async fn observe(pool: &PgPool, name: &TenantName) -> Result<SchemaVersions, PgError> {
    let mut m = observe_many(pool, std::slice::from_ref(name)).await?;
    Ok(m.remove(name).unwrap_or_default())
}

/// The ops logins of `names` (those registered), in one query: uid and key
/// salt from `tenancy.tenants`, the password derived from `ring`'s active
/// root key, the server from `pool`'s options. A registry row older than
/// key salts gets its salt made here.
pub async fn ops_logins(
    pool: &PgPool,
    ring: &Keyring,
    names: &[TenantName],
) -> Result<BTreeMap<TenantName, OpsLogin>, PgError> {
    let mut out = BTreeMap::new();
    if names.is_empty() {
        return Ok(out);
    }
    let target = Target::of_pool(pool);
    let list: Vec<&str> = names.iter().map(TenantName::as_str).collect();
    let rows: Vec<(String, String, Option<Vec<u8>>, Vec<String>)> =
        sqlx::query_as("SELECT name, uid, key_salt, audit_exclude FROM tenancy.tenants WHERE name = ANY($1)")
            .bind(&list)
            .fetch_all(pool)
            .await
            .map_err(query_err("reading the tenants' registry rows"))?;
    let by_name: BTreeMap<&str, &TenantName> = names.iter().map(|n| (n.as_str(), n)).collect();
    for (tenant, uid, salt, exclude) in rows {
        let Some(n) = by_name.get(tenant.as_str()) else {
            continue;
        };
        let salt = match salt.and_then(|s| TenantSalt::from_bytes(&s).ok()) {
            Some(s) => s,
            None => match super::registry::key_salt(pool, &uid).await? {
                Some(s) => s,
                None => continue,
            },
        };
        let login = OpsLogin::derive(&target, n, &uid, ring, &salt).map_err(|source| PgError::OpsLogin {
            tenant: tenant.clone(),
            source,
        })?;
        out.insert((*n).clone(), login.with_audit_exclude(exclude));
    }
    Ok(out)
}

/// One tenant's ops login; None when it is not registered.
pub async fn ops_login(pool: &PgPool, ring: &Keyring, name: &TenantName) -> Result<Option<OpsLogin>, PgError> {
    Ok(ops_logins(pool, ring, std::slice::from_ref(name)).await?.remove(name))
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
    FailureRecord {
        tenant: r.0,
        migration_set: r.1,
        set_generation: r.2,
        version: r.3,
        migration_name: r.4,
        reason: r.5,
        error: r.6,
        sqlstate: r.7,
    }
}

/// Which pending migrations a run applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Every pending one.
    Pending,
    /// Only when the schema has applied none yet (a new tenant's first run);
    /// otherwise the record is re-synced and nothing runs.
    FirstRun,
}

/// Brings one tenant schema to the last of `migrations` (sorted by
/// version), on a confined session of the tenant (closed afterwards), under
/// the tenant's migration lock. Each migration runs in its own transaction
/// (or, for a non-transactional one, on the session, with the version
/// recorded after it succeeded). A migration's own error is an outcome
/// (recorded in `tenancy.migration_failures`); a lost connection is an
/// `Err` (nothing recorded: the next run retries and re-syncs).
///
/// Round trips in the common case (one pending transactional migration,
/// version table present), beside the login: 6 — the lock (admin); `BEGIN`
/// with the role, search_path and timeouts and the version read; the
/// migration; the audit observation (2); the audit triggers, the version
/// row and `COMMIT` in one message; then (admin) the control record, the
/// clearing of an old failure and `COMMIT`, which releases the lock. A
/// rollout's cost beside the migration itself is mostly these and the login
/// (`cargo bench --bench migrations`, docs/migrations.md).
pub async fn migrate_tenant(
    pool: &PgPool,
    login: &OpsLogin,
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
) -> Result<TenantOutcome, PgError> {
    run_tenant(pool, login, None, set, migrations, timeouts, Scope::Pending).await
}

/// [`migrate_tenant`] for a tenant whose record shows no migration: runs
/// them only if the schema's own table agrees (a record lost, or not yet
/// written by an older operator, is re-synced instead, and the rollout's
/// canaries keep deciding about the rest).
pub async fn migrate_new_tenant(
    pool: &PgPool,
    login: &OpsLogin,
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
) -> Result<TenantOutcome, PgError> {
    run_tenant(pool, login, None, set, migrations, timeouts, Scope::FirstRun).await
}

/// [`migrate_new_tenant`] on a confined session of the tenant already open
/// (logged in as its ops login and acting as nobody, as
/// [`confined::log_in`] gives it; the reconcile's audit step hands over its
/// own): no second login. The session is closed when the run ends.
pub async fn migrate_new_tenant_on(
    pool: &PgPool,
    login: &OpsLogin,
    session: Confined,
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
) -> Result<TenantOutcome, PgError> {
    run_tenant(pool, login, Some(session), set, migrations, timeouts, Scope::FirstRun).await
}

async fn run_tenant(
    pool: &PgPool,
    login: &OpsLogin,
    session: Option<Confined>,
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
    scope: Scope,
) -> Result<TenantOutcome, PgError> {
    // The login first, holding no admin connection: a password reset
    // borrows one from `pool` (which may be as small as the rollout's).
    let mut session = match session {
        Some(s) => s,
        None => confined::log_in(pool, login).await?,
    };
    let result = async {
        let mut conn: PoolConnection<Postgres> = pool
            .acquire()
            .await
            .map_err(query_err("connecting to lock a tenant's migrations"))?;
        let mut admin = Session {
            conn: &mut conn,
            clean: false,
        };
        let result = locked(admin.conn, &mut session, login, set, migrations, timeouts, scope).await;
        admin.clean = result.is_ok();
        result
    }
    .await;
    session.close().await;
    result
}

/// Hands the admin connection back to the pool only after a run that ended
/// cleanly. A run cut short (an error, or its future dropped) may leave its
/// transaction open with the lock held: the connection is closed instead,
/// and Postgres rolls back and releases with it.
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

/// What the lock's round trip found.
struct Locked {
    schema_exists: bool,
    has_table: bool,
    /// The control schema's record of the tenant.
    recorded: Vec<Applied>,
}

/// Takes the tenant's migration lock in an admin transaction left open (the
/// row, inserted if missing, `FOR UPDATE NOWAIT`), and reads whether the
/// schema and its version table exist and what is recorded, in one round
/// trip. None: another run holds the lock (the transaction is rolled
/// back). Literals: the uid and schema are quoted. The catalog is read by
/// name, not with `to_regclass`: the admin has no USAGE on the tenant's
/// schema (it is no standing member of the owner). The schema's oid comes
/// from `to_regnamespace` (a cache look-up, no ACL check), so `pg_class` is
/// probed once on its (name, namespace) index: a join with `pg_namespace`
/// by name was planned, while the catalogs' statistics still described a
/// few schemas (during a burst of new tenants, before autovacuum analyzes
/// them), as a scan of every tenant's `_tenancy_migrations` so far by
/// name, each probing `pg_namespace`: 1.4 to 2.0 ms a call at 1,000
/// tenants, 0.07 ms at 10,000 (docs/scale.md, stop 44).
///
/// The transaction commits without waiting for the disk
/// (`synchronous_commit` off): all it writes is the lock's row and, in
/// the run's last message ([`finish_sql`]), the control copy of the
/// tenant's versions and its failure record, which the next run re-syncs
/// from the tenant's own version table when they differ (that table is
/// written by the ops session's transaction, which commits synchronously
/// before this one). With fsync on, it was one of the two waits for the
/// disk per tenant of a rollout (docs/scale.md).
async fn take_lock(admin: &mut PgConnection, login: &OpsLogin) -> Result<Option<Locked>, PgError> {
    let uid = quote_literal(login.uid())?;
    let schema = quote_literal(&login.tenant().schema())?;
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{LOCK_WAIT}'; SET LOCAL synchronous_commit = off;
         INSERT INTO tenancy.locks (kind, key) VALUES ('{LOCK_KIND}', {uid}) ON CONFLICT DO NOTHING;
         SELECT pg_catalog.to_regnamespace({schema}) IS NOT NULL AS schema_exists,
                EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                         WHERE c.relname = '{VERSION_TABLE}' AND c.relnamespace = pg_catalog.to_regnamespace({schema})) AS has_table
           FROM tenancy.locks WHERE kind = '{LOCK_KIND}' AND key = {uid} FOR UPDATE OF locks NOWAIT;
         SELECT version, name, checksum FROM tenancy.schema_versions WHERE tenant_uid = {uid} ORDER BY version"
    );
    let rows = match sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *admin).await {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => {
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut *admin)
                .await
                .map_err(query_err("ending a refused migration lock"))?;
            return Ok(None);
        }
        Err(e) => return Err(query_err("taking the tenant's migration lock")(e)),
    };
    let decode = || -> Result<Locked, sqlx::Error> {
        let mut locked = Locked {
            schema_exists: false,
            has_table: false,
            recorded: Vec::new(),
        };
        for r in &rows {
            if r.columns().len() == 2 {
                locked.schema_exists = r.try_get(0)?;
                locked.has_table = r.try_get(1)?;
            } else {
                locked.recorded.push(Applied {
                    version: r.try_get(0)?,
                    name: r.try_get::<String, _>(1)?.into(),
                    checksum: r.try_get::<String, _>(2)?.into(),
                });
            }
        }
        Ok(locked)
    };
    Ok(Some(
        decode().map_err(query_err("decoding the tenant's migration lock"))?,
    ))
}

/// What the admin writes when the run ends, in the lock's transaction.
#[derive(Default)]
struct Record {
    /// The schema's own version table, when it differs from the record.
    sync: Option<Vec<Applied>>,
    /// Applied by this run, with their durations in ms.
    applied: Vec<(Applied, i64)>,
    /// The run's failure; or, with `clear`, the old failure goes.
    failure: Option<FailureRecord>,
    clear: bool,
    /// A migration's SQL ran: what it could change about the tenant's own
    /// roles is put back.
    user_sql_ran: bool,
}

async fn locked(
    admin: &mut PgConnection,
    session: &mut PgConnection,
    login: &OpsLogin,
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
    scope: Scope,
) -> Result<TenantOutcome, PgError> {
    let Some(lock) = take_lock(admin, login).await? else {
        return Ok(TenantOutcome::Busy);
    };
    if !lock.schema_exists {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *admin)
            .await
            .map_err(query_err("releasing the tenant's migration lock"))?;
        return Ok(TenantOutcome::NoSchema);
    }
    let mut record = Record::default();
    let outcome = match run(
        session,
        login.tenant(),
        login.audit_exclude(),
        set,
        migrations,
        timeouts,
        scope,
        &lock,
        &mut record,
    )
    .await
    {
        Ok(o) => o,
        Err(e) => {
            // Nothing is recorded (the next run re-syncs), but what the
            // migration may have done to the tenant's roles (a session it
            // ended itself, after setting the ops password) is put back.
            if record.user_sql_ran {
                let sql = format!("ROLLBACK;\n{}", roles_reset_sql(login)?);
                let reset = match sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *admin).await {
                    Ok(rows) => revoke_ops_members(admin, login, &rows).await,
                    Err(err) => Err(query_err("resetting the tenant's roles")(err)),
                };
                if let Err(reset) = reset {
                    tracing::warn!(tenant = %login.tenant(), error = %reset, "resetting the ops login after an interrupted migration failed");
                }
            }
            return Err(e);
        }
    };
    let sql = finish_sql(login, &lock.recorded, &record)?;
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *admin)
        .await
        .map_err(query_err("recording the tenant's migrations"))?;
    revoke_ops_members(admin, login, &rows).await?;
    Ok(outcome)
}

/// Revokes the ops login from the roles [`roles_reset_sql`] listed (`rows`:
/// every row of its message with a text first column). It has no members
/// of its own: a migration made them (below Postgres 16 a role may grant
/// itself when it is the session user, as the ops login is after a `RESET
/// ROLE`). The Tenant reconcile would revoke them too; this ends it with
/// the run.
async fn revoke_ops_members(admin: &mut PgConnection, login: &OpsLogin, rows: &[PgRow]) -> Result<(), PgError> {
    let members: Vec<String> = rows.iter().filter_map(|r| r.try_get::<String, _>(0).ok()).collect();
    if members.is_empty() {
        return Ok(());
    }
    tracing::warn!(tenant = %login.tenant(), ?members, "a migration made roles members of the tenant's ops login; revoking");
    let list = members
        .iter()
        .map(|m| quote_ident(m))
        .collect::<Result<Vec<_>, _>>()?
        .join(", ");
    let sql = format!("REVOKE {} FROM {list}", quote_ident(&login.user())?);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *admin)
        .await
        .map_err(query_err(
            "revoking the ops login from the roles a migration gave it to",
        ))?;
    Ok(())
}

/// The admin's last message of a run: the record re-synced and the newly
/// applied versions added (`tenancy.schema_versions`), the failure recorded
/// or cleared, `COMMIT` (which releases the lock). Values are literals:
/// digits, and quoted strings (standard_conforming_strings is checked at
/// connect; NULs, which no Postgres text holds, are dropped).
fn finish_sql(login: &OpsLogin, recorded: &[Applied], r: &Record) -> Result<String, PgError> {
    let lit = |s: &str| quote_literal(&s.replace('\0', ""));
    let uid = lit(login.uid())?;
    let mut sql = String::new();
    let mut rows: Vec<String> = Vec::new();
    if let Some(sync) = &r.sync {
        let keep: Vec<String> = sync
            .iter()
            .map(|a| a.version.to_string())
            .chain(r.applied.iter().map(|(a, _)| a.version.to_string()))
            .collect();
        if recorded.iter().any(|a| !keep.contains(&a.version.to_string())) {
            sql.push_str(&format!("DELETE FROM tenancy.schema_versions WHERE tenant_uid = {uid} AND NOT (version = ANY (ARRAY[{}]::bigint[]));\n", keep.join(", ")));
        }
        for a in sync.iter().filter(|a| !recorded.contains(a)) {
            let name: String = a.name.chars().take(MAX_SYNCED).collect();
            let sum: String = a.checksum.chars().take(MAX_SYNCED).collect();
            rows.push(format!("({uid}, {}, {}, {}, NULL)", a.version, lit(&name)?, lit(&sum)?));
        }
    }
    for (a, ms) in &r.applied {
        rows.push(format!(
            "({uid}, {}, {}, {}, {ms})",
            a.version,
            lit(&a.name)?,
            lit(&a.checksum)?
        ));
    }
    if !rows.is_empty() {
        sql.push_str(&format!(
            "INSERT INTO tenancy.schema_versions (tenant_uid, version, name, checksum, duration_ms) VALUES {}
             ON CONFLICT (tenant_uid, version) DO UPDATE SET name = EXCLUDED.name, checksum = EXCLUDED.checksum,
               duration_ms = EXCLUDED.duration_ms, recorded_at = now();\n",
            rows.join(", ")
        ));
    }
    if let Some(f) = &r.failure {
        let sqlstate = match &f.sqlstate {
            Some(s) => lit(s)?,
            None => "NULL".into(),
        };
        sql.push_str(&format!(
            "INSERT INTO tenancy.migration_failures (tenant_name, migration_set, set_generation, version, migration_name, reason, error, sqlstate)
             VALUES ({}, {}, {}, {}, {}, {}, {}, {sqlstate})
             ON CONFLICT (tenant_name) DO UPDATE SET migration_set = EXCLUDED.migration_set, set_generation = EXCLUDED.set_generation,
               version = EXCLUDED.version, migration_name = EXCLUDED.migration_name, reason = EXCLUDED.reason,
               error = EXCLUDED.error, sqlstate = EXCLUDED.sqlstate, failed_at = now();\n",
            lit(&f.tenant)?,
            lit(&f.migration_set)?,
            f.set_generation,
            f.version,
            lit(&f.migration_name)?,
            lit(&f.reason)?,
            lit(&f.error)?,
        ));
    } else if r.clear {
        sql.push_str(&format!(
            "DELETE FROM tenancy.migration_failures WHERE tenant_name = {};\n",
            lit(login.tenant().as_str())?
        ));
    }
    if r.user_sql_ran {
        sql.push_str(&roles_reset_sql(login)?);
    }
    sql.push_str("COMMIT");
    Ok(sql)
}

/// What a migration can change about roles, put back after it ran: a role
/// may set its own settings (Postgres lets every role do that to itself),
/// and, below Postgres 16, grant itself to others when it is the session
/// user (the members are listed by the last statement, for the caller to
/// revoke). Both the ops login and the owner lose any setting (`ALTER ROLE
/// [IN DATABASE] ... SET`), which would otherwise apply to the operator's
/// next sessions of the tenant; `RESET ALL` writes nothing when none is
/// set. The ops login's password, which it may also set itself, is not
/// rewritten here: every `pg_authid` write makes every session recompute
/// its role memberships, a cost per run a rollout of thousands of tenants should not pay. A
/// password a migration chose stops working at the operator's next login
/// of the tenant, which finds it refused and sets the derived one again;
/// until then it logs in as that tenant's owner at most. The owner's own
/// password is harmless: it cannot log in.
fn roles_reset_sql(login: &OpsLogin) -> Result<String, PgError> {
    let ops = quote_ident(&login.user())?;
    let owner = quote_ident(&login.tenant().owner_role())?;
    let db = quote_ident(&login.target().database)?;
    let name = quote_literal(&login.user())?;
    Ok(format!(
        "ALTER ROLE {ops} RESET ALL; ALTER ROLE {ops} IN DATABASE {db} RESET ALL;
         ALTER ROLE {owner} RESET ALL; ALTER ROLE {owner} IN DATABASE {db} RESET ALL;
         SELECT pg_get_userbyid(m.member)::text FROM pg_auth_members m WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = {name});\n"
    ))
}

/// Connection-level failures: the run is retried, nothing is recorded.
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c.starts_with("53") || c.starts_with("28")),
        _ => false,
    }
}

fn pg_error_parts(e: &sqlx::Error) -> (String, Option<String>) {
    match e {
        sqlx::Error::Database(db) => (
            db.message().chars().take(MAX_ERROR).collect(),
            db.code().map(|c| c.into_owned()),
        ),
        other => (other.to_string().chars().take(MAX_ERROR).collect(), None),
    }
}

/// The version table, created by the owner in the first migration's
/// transaction. The owner's default privileges give the app role DML on
/// it; the app keeps only SELECT (it may read its schema version, not
/// forge it). Identifiers are quoted validated names.
pub fn create_version_table_sql(name: &TenantName) -> Result<String, PgError> {
    let schema = quote_ident(&name.schema())?;
    let app = quote_ident(&name.app_role())?;
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {schema}.{VERSION_TABLE} (
             version     bigint PRIMARY KEY,
             name        text NOT NULL,
             checksum    text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now(),
             duration_ms bigint NOT NULL
         );
         REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE {schema}.{VERSION_TABLE} FROM {app};\n"
    ))
}

/// `BEGIN` and a migration transaction's settings in one message: the
/// tenant's owner role, its schema as `search_path`, the timeouts — all
/// `LOCAL`, so whatever an earlier migration did to the session is undone
/// for this one. Identifiers are quoted validated names; the timeouts are
/// digits and `ms`.
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
    let end = sum.char_indices().nth(12).map(|(i, _)| i).unwrap_or(sum.len());
    &sum[..end]
}

/// The version table's rows, lowest version first, from the rows of a
/// simple-protocol query (text values).
fn applied_from(rows: &[PgRow]) -> Result<Vec<Applied>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            Ok(Applied {
                version: r.try_get(0)?,
                name: r.try_get::<String, _>(1)?.into(),
                checksum: r.try_get::<String, _>(2)?.into(),
            })
        })
        .collect()
}

/// Runs the pending migrations on the confined session; gives the outcome
/// and fills `record` with what the admin is to write.
#[allow(clippy::too_many_arguments)]
async fn run(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
    set: &SetRef,
    migrations: &[MigrationSql],
    timeouts: &Timeouts,
    scope: Scope,
    lock: &Locked,
    record: &mut Record,
) -> Result<TenantOutcome, PgError> {
    let begin = begin_sql(name, timeouts)?;
    let table = version_table(name)?;
    let create = if lock.has_table {
        String::new()
    } else {
        create_version_table_sql(name)?
    };
    // The first transaction reads the versions (under the lock, so no other
    // operator instance moves them meanwhile); it is the first migration's
    // transaction too when that one is transactional, and creates the
    // version table with it on a tenant's first run. An error here is not a
    // migration's: the run fails and the session is closed.
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "{begin};\n{create}SELECT version, name, checksum FROM {table} ORDER BY version"
    )))
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err("reading the version table"))?;
    let applied = applied_from(&rows).map_err(query_err("decoding the version table"))?;
    if applied != lock.recorded {
        record.sync = Some(applied.clone());
    }
    let from = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if let Some((version, detail)) = find_mismatch(&applied, migrations) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *conn)
            .await
            .map_err(query_err("ending the version check"))?;
        let migration_name = migrations
            .iter()
            .find(|m| m.version == version)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        record.failure = Some(FailureRecord {
            tenant: name.as_str().to_owned(),
            migration_set: set.name.clone(),
            set_generation: set.generation,
            version,
            migration_name,
            reason: REASON_CHECKSUM.into(),
            error: detail.clone(),
            sqlstate: None,
        });
        return Ok(TenantOutcome::ChecksumMismatch { version, detail });
    }
    if scope == Scope::FirstRun && !applied.is_empty() {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *conn)
            .await
            .map_err(query_err("ending the version check"))?;
        return Ok(TenantOutcome::Migrated {
            from,
            to: from,
            applied: Vec::new(),
        });
    }
    let pending: Vec<&MigrationSql> = migrations.iter().filter(|m| m.version > from).collect();
    if pending.is_empty() {
        sqlx::raw_sql("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(query_err("ending the version check"))?;
        record.clear = true;
        return Ok(TenantOutcome::Migrated {
            from,
            to: from,
            applied: Vec::new(),
        });
    }
    let mut at = from;
    let mut in_tx = true;
    record.user_sql_ran = true;
    for m in pending {
        let step = if m.transactional {
            // A later migration's transaction begins in the message that
            // carries its SQL (ours first, so nothing of the migration's can
            // change them).
            let prefix = if in_tx { String::new() } else { format!("{begin};\n") };
            in_tx = false;
            apply_in_transaction(conn, name, exclude, m, &prefix).await?
        } else {
            let commit = if in_tx { "COMMIT;\n" } else { "" };
            in_tx = false;
            apply_outside_transaction(conn, name, exclude, m, commit, &begin, timeouts).await?
        };
        match step {
            Ok(ms) => {
                at = m.version;
                record.applied.push((
                    Applied {
                        version: m.version,
                        name: m.name.as_str().into(),
                        checksum: m.checksum.as_str().into(),
                    },
                    ms,
                ));
            }
            Err(e) => {
                let (error, sqlstate) = pg_error_parts(&e);
                record.failure = Some(FailureRecord {
                    tenant: name.as_str().to_owned(),
                    migration_set: set.name.clone(),
                    set_generation: set.generation,
                    version: m.version,
                    migration_name: m.name.clone(),
                    reason: REASON_FAILED.into(),
                    error: error.clone(),
                    sqlstate: sqlstate.clone(),
                });
                return Ok(TenantOutcome::Failed {
                    at,
                    version: m.version,
                    error,
                    sqlstate,
                });
            }
        }
    }
    record.clear = true;
    let done = record.applied.iter().map(|(a, _)| a.version).collect();
    Ok(TenantOutcome::Migrated {
        from,
        to: at,
        applied: done,
    })
}

/// The tenant's version table, schema-qualified.
fn version_table(name: &TenantName) -> Result<String, PgError> {
    Ok(format!("{}.{VERSION_TABLE}", quote_ident(&name.schema())?))
}

/// The message that ends a migration's transaction (after
/// [`super::audit::statements_in_tx`]): the owner role, the tenant's
/// search_path and the default plan cache mode back first (whatever the
/// migration set; deferred triggers of the migration's run at COMMIT and
/// must see what the migration saw), the `audit` statements, the version
/// row, `COMMIT`. Values are literals: digits, and quoted strings
/// (standard_conforming_strings is checked at connect).
fn record_sql(name: &TenantName, m: &MigrationSql, audit: &[String], ms: i64) -> Result<String, PgError> {
    let mut sql = format!(
        "SET LOCAL ROLE {};\nSET LOCAL search_path TO {};\nSET LOCAL plan_cache_mode TO DEFAULT",
        quote_ident(&name.owner_role())?,
        quote_ident(&name.schema())?
    );
    for stmt in audit {
        sql.push_str(";\n");
        sql.push_str(stmt);
    }
    sql.push_str(&format!(
        ";\nINSERT INTO {} (version, name, checksum, duration_ms) VALUES ({}, {}, {}, {ms});\nCOMMIT",
        version_table(name)?,
        m.version,
        quote_literal(&m.name)?,
        quote_literal(&m.checksum)?
    ));
    Ok(sql)
}

/// Runs one migration in the transaction open on `conn` (or begun by
/// `prefix`), then in one message: the audit triggers of the tables it
/// created, its version record and `COMMIT`. The outer `Result` is a
/// failure around the migration (the connection); the inner one is the
/// migration's own outcome (its duration in ms), rolled back on error.
async fn apply_in_transaction(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
    m: &MigrationSql,
    prefix: &str,
) -> Result<Result<i64, sqlx::Error>, PgError> {
    let result: Result<i64, sqlx::Error> = async {
        let start = Instant::now();
        // The MigrationSet's SQL, by design: its author decides the schema.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{prefix}{}", m.sql)))
            .execute(&mut *conn)
            .await?;
        let ms = start.elapsed().as_millis() as i64;
        // Audit triggers on the tables it created, committed with them (docs/audit.md).
        let audit = super::audit::statements_in_tx(conn, name, exclude).await?;
        let sql = record_sql(name, m, &audit, ms).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
        Ok(ms)
    }
    .await;
    match result {
        Ok(ms) => Ok(Ok(ms)),
        Err(e) if is_connection_error(&e) => Err(PgError::Query {
            action: "running a migration",
            source: e,
        }),
        Err(e) => {
            // The migration's SQL, the audit DDL, the version record or a
            // deferred constraint at COMMIT failed: roll back (a no-op with a
            // warning when the failed COMMIT already did).
            sqlx::raw_sql("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map_err(query_err("rolling back a failed migration"))?;
            Ok(Err(e))
        }
    }
}

/// Runs a non-transactional migration on the session (after `commit`, the
/// end of the version check's transaction when it is still open; role,
/// search_path and timeouts set for the session, which is closed after the
/// run), then records its version in a transaction of its own (`begin`).
async fn apply_outside_transaction(
    conn: &mut PgConnection,
    name: &TenantName,
    exclude: &[String],
    m: &MigrationSql,
    commit: &str,
    begin: &str,
    t: &Timeouts,
) -> Result<Result<i64, sqlx::Error>, PgError> {
    let setup = format!(
        "{commit}{}; SET lock_timeout = '{}'; SET statement_timeout = '{}'",
        confined::enter_sql(name)?,
        Timeouts::ms(t.lock),
        Timeouts::ms(t.statement)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(setup))
        .execute(&mut *conn)
        .await
        .map_err(query_err("setting the migration's role"))?;
    let start = Instant::now();
    // Alone in its message: a multi-statement message is one transaction.
    let result = sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql.clone()))
        .execute(&mut *conn)
        .await
        .map(|_| ());
    let ms = start.elapsed().as_millis() as i64;
    if let Err(e) = result {
        if is_connection_error(&e) {
            return Err(PgError::Query {
                action: "running a migration",
                source: e,
            });
        }
        return Ok(Err(e));
    }
    // The version row in a transaction of its own, with the audit triggers
    // of tables the migration created, as in the transactional case. An
    // error here is not the migration's: the run fails (the session is
    // closed, rolling it back).
    sqlx::raw_sql(sqlx::AssertSqlSafe(begin.to_owned()))
        .execute(&mut *conn)
        .await
        .map_err(query_err("starting the version record"))?;
    let audit = super::audit::statements_in_tx(conn, name, exclude)
        .await
        .map_err(query_err("auditing the migration's tables"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(record_sql(name, m, &audit, ms)?))
        .execute(&mut *conn)
        .await
        .map_err(query_err("recording a non-transactional migration"))?;
    Ok(Ok(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: i64, sql: &str) -> MigrationSql {
        MigrationSql::new(v, format!("m{v}"), sql, true)
    }

    fn a(v: i64, sql: &str) -> Applied {
        Applied {
            version: v,
            name: format!("m{v}").into(),
            checksum: checksum(sql).into(),
        }
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            checksum(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            checksum("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
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
