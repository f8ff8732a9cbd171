//! The only module that talks SQL.
//!
//! Takes the admin DSN, gives a connection pool, the control schema
//! (`tenancy`, migrated with sqlx's migrator), database hardening, and the
//! per-tenant statements in [`tenant`]. Side effects: DDL and DML on the
//! database the admin DSN names.

pub mod audit;
pub mod backup_sql;
pub mod confined;
pub mod connect_grants;
pub mod gateway;
pub mod locks;
pub mod membership;
pub mod migrations;
pub mod registry;
pub mod replication;
pub mod scram;
pub mod tenant;
pub mod usage;
pub mod watchdog;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Name of the operator's control schema.
pub const CONTROL_SCHEMA: &str = "tenancy";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Errors of the Postgres layer; each names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("the database URL is not valid: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot connect to Postgres at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the control schema failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("{action} failed: {source}")]
    Query {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("the admin role {role:?} lacks {what}; grant it (see README, 'Admin role')")]
    MissingPrivilege { role: String, what: String },
    #[error("{0}")]
    Replication(String),
    #[error("an identifier contains a NUL byte")]
    NulInIdentifier,
    #[error("a restore of tenant {0} is running; retrying when it is done")]
    RestoreRunning(String),
    #[error("tenant {0} has no ops login role of its own yet (it is created when the tenant is provisioned)")]
    NoOpsRole(String),
    #[error("deriving the ops login of tenant {tenant}: {source}")]
    OpsLogin {
        tenant: String,
        #[source]
        source: crate::crypto::CryptoError,
    },
    #[error("deriving the tenant's keys failed: {0}")]
    Keys(#[source] crate::crypto::CryptoError),
    #[error("the audit log of tenant {tenant}: {what}")]
    Audit { tenant: String, what: String },
    #[error("tenant {0} is not in this database's registry")]
    NotRegistered(String),
}

impl PgError {
    /// A failure that may go away by itself (network, restart, lock); as
    /// opposed to one a person must fix.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::RestoreRunning(_) | PgError::NoOpsRole(_) | PgError::Replication(_) => {
                true
            }
            PgError::Query { source, .. } => is_transient_sqlx(source),
            PgError::Migrate(_)
            | PgError::BadUrl(_)
            | PgError::MissingPrivilege { .. }
            | PgError::NulInIdentifier
            | PgError::OpsLogin { .. }
            | PgError::Keys(_)
            | PgError::Audit { .. }
            | PgError::NotRegistered(_) => false,
        }
    }
}

impl PgError {
    /// Postgres could not be reached, or would not let the operator in
    /// (network, TLS, pool exhausted or closed, connection ended, server
    /// shutting down or starting, too many connections, the admin's login
    /// refused): reported as `DatabaseUnavailable`. Any other failure is an
    /// answer from Postgres, reported as `DatabaseError` with its SQLSTATE
    /// (and retried when [`PgError::is_transient`]).
    pub fn is_unreachable(&self) -> bool {
        match self {
            PgError::Connect { .. } => true,
            PgError::Query { source, .. } => is_unreachable_sqlx(source),
            _ => false,
        }
    }

    /// The SQLSTATE of the Postgres error behind this one, if any.
    pub fn sqlstate(&self) -> Option<String> {
        let source = match self {
            PgError::Connect { source, .. } | PgError::Query { source, .. } | PgError::BadUrl(source) => source,
            _ => return None,
        };
        source
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
    }

    /// The error in words, with its SQLSTATE when Postgres gave one.
    pub fn describe(&self) -> String {
        match self.sqlstate() {
            Some(code) => format!("{self} (SQLSTATE {code})"),
            None => self.to_string(),
        }
    }
}

/// See [`PgError::is_unreachable`].
pub fn is_unreachable_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08: connection exception, 28: invalid authorization (the admin
            // cannot log in), 53300: too many connections, 57P01-57P03: admin
            // or crash shutdown, cannot connect now.
            c.starts_with("08") || c.starts_with("28") || c == "53300" || matches!(&*c, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// The lock that serializes changes to the database's ACL (`GRANT` or
/// `REVOKE ... ON DATABASE`, `DROP OWNED BY` a role with CONNECT): Postgres
/// updates the one `pg_database` row in place of the previous version, and
/// a second writer that waited for the first fails with `tuple concurrently
/// updated` (XX000) instead of applying its change. A row lock on
/// `tenancy.locks` (no tenant role can reach the table), held to commit,
/// with a lock timeout. Run inside the transaction that changes the ACL,
/// as late as possible (it is held until commit).
pub const LOCK_DATABASE_ACL: &str = "SET LOCAL lock_timeout = '10s';
INSERT INTO tenancy.locks (kind, key) VALUES ('database-acl', current_database()) ON CONFLICT (kind, key) DO NOTHING;
SELECT 1 FROM tenancy.locks WHERE kind = 'database-acl' AND key = current_database() FOR UPDATE";

/// Connection-level and concurrency errors are transient; privilege and
/// syntax errors are not. Everything [`is_unreachable_sqlx`] is transient
/// (28: the admin cannot log in, revoked or a password changed, is not the
/// tenant's fault and is fixed outside the operator, so it is retried with
/// backoff while the condition says why); so are these answers of Postgres:
/// 40 transaction rollback (serialization, deadlock), 53 insufficient
/// resources, 55P03 lock not available, 57P operator intervention, and
/// 23505 unique violation / XX000 "tuple concurrently updated" (two writers
/// raced on a catalog row; a retry sees the winner).
pub fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    is_unreachable_sqlx(e)
        || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|code| {
            code.starts_with("40")
                || code.starts_with("53")
                || code == "55P03"
                || code.starts_with("57P")
                || code == "23505"
                || code == "XX000"
        }))
}

pub(crate) fn query_err(action: &'static str) -> impl FnOnce(sqlx::Error) -> PgError {
    move |source| PgError::Query { action, source }
}

/// Runs `statements` one by one on `conn` (each a simple query: DDL whose
/// identifiers were quoted when it was rendered); a failure names `action`.
/// Gives how many ran.
pub(crate) async fn execute_all(
    conn: &mut sqlx::PgConnection,
    action: &'static str,
    statements: Vec<String>,
) -> Result<usize, PgError> {
    let n = statements.len();
    for stmt in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&mut *conn)
            .await
            .map_err(query_err(action))?;
    }
    Ok(n)
}

/// Quotes an identifier for Postgres: wraps it in double quotes and doubles
/// any double quote inside. Every dynamic identifier goes through here.
pub fn quote_ident(ident: &str) -> Result<String, PgError> {
    if ident.contains('\0') {
        return Err(PgError::NulInIdentifier);
    }
    Ok(format!("\"{}\"", ident.replace('"', "\"\"")))
}

/// Quotes a string literal (standard_conforming_strings on, checked at
/// connect): wraps it in single quotes and doubles any single quote. Only for
/// utility statements, which take no bind parameters (`ALTER ROLE ... SET`).
pub fn quote_literal(value: &str) -> Result<String, PgError> {
    if value.contains('\0') {
        return Err(PgError::NulInIdentifier);
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

/// Where the admin DSN points, for messages and for tenants' DSNs.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// The admin DSN's connection options (TLS, host, port, database), from
    /// which confined connections are made with another user and password
    /// ([`confined`]). Never printed. Shared: every ops login of a
    /// rollout pass holds its target (thousands at once).
    pub(crate) base: std::sync::Arc<PgConnectOptions>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// The TLS mode of the connection options.
    pub fn ssl_mode(&self) -> sqlx::postgres::PgSslMode {
        self.base.get_ssl_mode()
    }

    /// The target of a DSN, without connecting.
    pub fn from_url(url: &str) -> Result<Self, PgError> {
        let opts: PgConnectOptions = url.parse().map_err(PgError::BadUrl)?;
        Ok(Self::from_options(opts))
    }

    /// The target of an admin pool (its connection options).
    pub fn of_pool(pool: &PgPool) -> Self {
        Self::from_shared(pool.connect_options())
    }

    /// The target of connection options (e.g. `PgConnectOptions::new()`,
    /// which reads libpq's `PG*` environment variables).
    pub fn from_options(opts: PgConnectOptions) -> Self {
        Self::from_shared(std::sync::Arc::new(opts))
    }

    fn from_shared(opts: std::sync::Arc<PgConnectOptions>) -> Self {
        Target {
            host: opts.get_host().to_owned(),
            port: opts.get_port(),
            database: opts.get_database().unwrap_or(opts.get_username()).to_owned(),
            base: opts,
        }
    }
}

/// Pool options whose sessions plan each prepared statement once:
/// `SET plan_cache_mode = force_generic_plan` on every new connection. The
/// operator runs the same few prepared statements for every tenant on its
/// long-lived connections, and under the default mode Postgres planned
/// several of them anew at every call (a custom plan, its parameters folded
/// in, is always estimated cheaper than the generic one): in an idle resync
/// of 10,000 tenants the audit check's catalog query spent more time
/// planning than running (0.68 against 0.61 ms a call, docs/scale.md). A
/// session setting on the pool's own connections, not a start-up option:
/// a tenant's ops login, whose connect options derive from the pool's,
/// does not inherit it, so a tenant's migration and the audit functions it
/// sets off run under the server's (or role's) plan cache mode.
pub(crate) fn planned_once(options: PgPoolOptions) -> PgPoolOptions {
    options.after_connect(|conn, _| {
        Box::pin(async move {
            sqlx::query("SET plan_cache_mode = force_generic_plan")
                .execute(conn)
                .await?;
            Ok(())
        })
    })
}

/// Parses the admin DSN and opens a bounded pool; checks the server is
/// reachable and the settings quoting relies on.
pub async fn connect(url: &str, max_connections: u32) -> Result<(PgPool, Target), PgError> {
    let opts: PgConnectOptions = url.parse().map_err(PgError::BadUrl)?;
    // JIT off: the operator's statements are short catalog lookups whose
    // cost estimates grow with the number of tenants (pg_class has no index
    // on relnamespace alone), which past ~1,000 tenants made Postgres spend
    // ~60 ms compiling each one for a query that runs in 5 ms (measured by
    // `cargo bench --bench migrations`, docs/migrations.md).
    // client_min_messages: routine NOTICEs (`... does not exist, skipping`
    // of an idempotent DROP ... IF EXISTS) are not sent at all, instead of
    // one INFO log line each per tenant and reconcile; warnings still are.
    // search_path pg_catalog: every statement names its schema (`tenancy.`,
    // a tenant's, or the catalog), and resolving the default `"$user",
    // public` checks USAGE on `public`, which Postgres answers by computing
    // every role the admin inherits from: the admin is a member of two
    // roles per tenant, the closure is dropped at every role change, and on
    // PostgreSQL 15 building it is quadratic in their number (7.5 ms per
    // statement at 4,000 memberships, measured; docs/scale.md). `pg_catalog`
    // grants USAGE to PUBLIC: no closure.
    let opts = opts
        .application_name("tenant-operator")
        .options([
            ("jit", "off"),
            ("client_min_messages", "warning"),
            ("search_path", "pg_catalog"),
        ])
        .log_statements(tracing::log::LevelFilter::Trace);
    let target = Target::from_options(opts.clone());
    let pool = planned_once(PgPoolOptions::new())
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(5))
        .idle_timeout(Duration::from_secs(60))
        .test_before_acquire(true)
        .connect_lazy_with(opts.clone());
    // One direct connection up front so a wrong URL fails start-up with a
    // clear message instead of surfacing later as reconcile errors.
    let mut conn = connect_direct(&opts, &target).await?;
    let scs: String = sqlx::query_scalar("SHOW standard_conforming_strings")
        .fetch_one(&mut conn)
        .await
        .map_err(query_err("reading standard_conforming_strings"))?;
    if scs != "on" {
        return Err(PgError::MissingPrivilege {
            role: opts.get_username().to_owned(),
            what: "standard_conforming_strings = on".into(),
        });
    }
    let _ = conn.close().await;
    Ok((pool, target))
}

fn describe(t: &Target) -> String {
    format!("{}:{}/{}", t.host, t.port, t.database)
}

/// The start-up lock's row in `tenancy.locks` (kind, key).
const STARTUP_LOCK: (&str, &str) = ("startup", "control-schema");

/// How long a starting instance waits for another one's control schema
/// migrations.
const STARTUP_LOCK_TIMEOUT: &str = "5min";

/// The control schema and its lock table, idempotently: what the start-up
/// lock needs before the migrator has run (the same table as migration
/// `20261201000001_locks.sql`). It runs before the lock, so on a prepared
/// database it writes nothing: PUBLIC's rights on the schema are revoked
/// only when it has one (a new schema gives PUBLIC none), since a `REVOKE`
/// rewrites the schema's catalog row even when nothing changes, and a
/// rewrite racing another instance's grant under the lock fails with "tuple
/// concurrently updated".
const BOOTSTRAP_SQL: &str = "DO $tenancy_boot$
BEGIN
  CREATE SCHEMA IF NOT EXISTS tenancy;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
              WHERE n.nspname = 'tenancy' AND a.grantee = 0) THEN
    REVOKE ALL ON SCHEMA tenancy FROM PUBLIC;
  END IF;
  CREATE TABLE IF NOT EXISTS tenancy.locks (kind text NOT NULL, key text NOT NULL, PRIMARY KEY (kind, key));
END
$tenancy_boot$";

/// Two instances creating the same catalog object at once: one of them
/// fails on a catalog unique index (23505), or with "tuple concurrently
/// updated" (XX000) on the schema's ACL. Running again finds the object.
fn is_catalog_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("23505") | Some("XX000")))
}

/// How long to wait before running a start-up step again after `e`, at its
/// `attempt`-th try (1, 2, ...): a catalog race ([`is_catalog_race`]) is
/// run again up to 10 times, 20 ms more each time; anything else is not.
fn catalog_race_retry(attempt: u64, e: &sqlx::Error) -> Option<Duration> {
    (attempt < 10 && is_catalog_race(e)).then(|| Duration::from_millis(20 * attempt))
}

/// One connection outside the pool, given up after 10 s.
async fn connect_direct(opts: &PgConnectOptions, target: &Target) -> Result<sqlx::PgConnection, PgError> {
    tokio::time::timeout(Duration::from_secs(10), opts.connect())
        .await
        .map_err(|_| PgError::Connect {
            target: describe(target),
            source: sqlx::Error::PoolTimedOut,
        })?
        .map_err(|source| PgError::Connect {
            target: describe(target),
            source,
        })
}

/// Creates the control schema if needed and runs its migrations. Safe to run
/// from several operator replicas at once, and no tenant can stall it: the
/// replicas take turns on a row lock of `tenancy.locks` (a table closed to
/// PUBLIC), held on a connection of its own while the migrator, with its own
/// advisory lock (keyed on the database name, which any role could take)
/// turned off, runs on another.
pub async fn migrate_control_schema(pool: &PgPool) -> Result<(), PgError> {
    let opts = pool.connect_options().as_ref().clone();
    let target = Target::from_options(opts.clone());
    let mut lock = connect_direct(&opts, &target).await?;
    let result = migrate_locked(pool, &mut lock).await;
    // Ends the lock's transaction (rolled back with the connection if the
    // migrator failed).
    if result.is_ok() {
        sqlx::raw_sql("COMMIT")
            .execute(&mut lock)
            .await
            .map_err(query_err("releasing the start-up lock"))?;
    }
    let _ = lock.close().await;
    result
}

async fn migrate_locked(pool: &PgPool, lock: &mut sqlx::PgConnection) -> Result<(), PgError> {
    for attempt in 1.. {
        match sqlx::raw_sql(BOOTSTRAP_SQL).execute(&mut *lock).await {
            Ok(_) => break,
            Err(e) => match catalog_race_retry(attempt, &e) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(query_err("creating the control schema")(e)),
            },
        }
    }
    let sql = format!(
        "BEGIN; SET LOCAL lock_timeout = '{STARTUP_LOCK_TIMEOUT}';
         INSERT INTO tenancy.locks (kind, key) VALUES ('{kind}', '{key}') ON CONFLICT DO NOTHING;
         SELECT 1 FROM tenancy.locks WHERE kind = '{kind}' AND key = '{key}' FOR UPDATE",
        kind = STARTUP_LOCK.0,
        key = STARTUP_LOCK.1
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *lock)
        .await
        .map_err(query_err("taking the start-up lock"))?;
    let mut conn = pool.acquire().await.map_err(query_err("connecting to migrate"))?;
    // The migrator keeps its bookkeeping table in the first schema of the
    // search path; point it at the control schema, not `public`.
    sqlx::query("SET search_path TO tenancy")
        .execute(&mut *conn)
        .await
        .map_err(query_err("setting search_path"))?;
    let mut migrator = sqlx::migrate::Migrator::with_migrations(MIGRATOR.iter().cloned().collect());
    migrator.set_locking(false);
    let result = migrator.run(&mut *conn).await.map_err(PgError::Migrate);
    let _ = sqlx::query("RESET search_path").execute(&mut *conn).await;
    result?;
    drop(conn);
    // The audit anchor role and the anchor functions' schema. A grant it
    // must make (a new database) rewrites the control schema's ACL row, which
    // another instance's BOOTSTRAP_SQL (run before it takes the start-up
    // lock) may be rewriting at the same moment when PUBLIC had a right to
    // take back: "tuple concurrently updated", run again as the bootstrap is
    // (seen once in CI with six instances at once, when both rewrote the row
    // at every start).
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = audit::prepare_anchoring(pool).await;
        let wait = match &result {
            Err(PgError::Query { source, .. }) => catalog_race_retry(attempt, source),
            _ => None,
        };
        match wait {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return result,
        }
    }
}

/// What the admin role may do; checked at start so a missing privilege is
/// reported once, clearly, instead of failing every tenant.
#[derive(Clone, Debug)]
pub struct AdminFacts {
    pub role: String,
    pub superuser: bool,
    pub createrole: bool,
    pub signal_backend: bool,
    pub owns_database: bool,
}

pub async fn admin_facts(pool: &PgPool) -> Result<AdminFacts, PgError> {
    let row: (String, bool, bool, bool, bool) = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper, r.rolcreaterole,
                pg_has_role(current_user, 'pg_signal_backend', 'USAGE'),
                pg_has_role(current_user, d.datdba, 'USAGE')
           FROM pg_roles r, pg_database d
          WHERE r.rolname = current_user AND d.datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .map_err(query_err("reading the admin role's attributes"))?;
    Ok(AdminFacts {
        role: row.0,
        superuser: row.1,
        createrole: row.2,
        signal_backend: row.3,
        owns_database: row.4,
    })
}

impl AdminFacts {
    /// CREATEROLE and pg_signal_backend are what the operator needs; superuser
    /// is not (managed Postgres services do not give it).
    pub fn require(&self) -> Result<(), PgError> {
        if !self.superuser && !self.createrole {
            return Err(PgError::MissingPrivilege {
                role: self.role.clone(),
                what: "CREATEROLE".into(),
            });
        }
        if !self.superuser && !self.signal_backend {
            return Err(PgError::MissingPrivilege {
                role: self.role.clone(),
                what: "membership in pg_signal_backend".into(),
            });
        }
        Ok(())
    }
}

/// Connects as the admin of one database (the operator's own, or a
/// Shard's), checks what the admin may do, brings the control schema up to
/// date and hardens the database. Returns the warnings of what could not be
/// hardened.
///
/// It runs on a blocking thread of its own: the control schema's migrator
/// (`sqlx::migrate::Migrator::run`, generic over `Acquire<'_>`) makes a
/// future the compiler cannot prove `Send` for every lifetime, which a
/// controller's reconcile must be.
pub async fn open_admin(
    url: zeroize::Zeroizing<String>,
    max_connections: u32,
) -> Result<(PgPool, Target, AdminFacts, Vec<String>), PgError> {
    let handle = tokio::runtime::Handle::current();
    match tokio::task::spawn_blocking(move || handle.block_on(open_admin_here(&url, max_connections))).await {
        Ok(opened) => opened,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn open_admin_here(
    url: &str,
    max_connections: u32,
) -> Result<(PgPool, Target, AdminFacts, Vec<String>), PgError> {
    let (pool, target) = connect(url, max_connections).await?;
    let facts = admin_facts(&pool).await?;
    facts.require()?;
    migrate_control_schema(&pool).await?;
    let warnings = harden_database(&pool, &facts).await?;
    Ok((pool, target, facts, warnings))
}

/// Hardening for the schema-per-tenant model, done once at start. Returns
/// warnings for steps the admin role may not take (it does not own the
/// database); those are logged, not fatal.
pub async fn harden_database(pool: &PgPool, facts: &AdminFacts) -> Result<Vec<String>, PgError> {
    let mut warnings = Vec::new();
    if !facts.owns_database && !facts.superuser {
        warnings.push(format!(
            "the admin role {:?} does not own the database: cannot revoke PUBLIC's rights on it or on schema public; \
             do it once as the owner: REVOKE ALL ON DATABASE <db> FROM PUBLIC; REVOKE ALL ON SCHEMA public FROM PUBLIC",
            facts.role
        ));
        return Ok(warnings);
    }
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await
        .map_err(query_err("reading the database name"))?;
    let db = quote_ident(&db)?;
    // Each tenant's app role gets CONNECT explicitly; nobody else needs to
    // connect by default, create temporary tables, or use schema public.
    for stmt in [
        format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"),
        "REVOKE ALL ON SCHEMA public FROM PUBLIC".to_string(),
    ] {
        let needed: bool = if stmt.contains("SCHEMA public") {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a WHERE n.nspname = 'public' AND a.grantee = 0)")
        } else {
            // Entry by entry (`unnest`, then `aclexplode` of one): given the
            // whole ACL, `aclexplode` reads (detoasts) it again for every
            // row it returns, quadratic in its entries, two per tenant:
            // 2.5 s at 10,000 tenants, 15 ms this way (docs/scale.md).
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database d, unnest(coalesce(d.datacl, acldefault('d', d.datdba))) i, aclexplode(ARRAY[i]) a WHERE d.datname = current_database() AND a.grantee = 0)")
        }
        .fetch_one(pool)
        .await
        .map_err(query_err("reading PUBLIC's privileges"))?;
        if needed {
            let mut tx = pool.begin().await.map_err(query_err("starting a transaction"))?;
            if !stmt.contains("SCHEMA public") {
                sqlx::raw_sql(LOCK_DATABASE_ACL)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err("locking the database's ACL"))?;
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
                .execute(&mut *tx)
                .await
                .map_err(query_err("revoking PUBLIC's privileges"))?;
            tx.commit().await.map_err(query_err("committing the revoke"))?;
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_wraps_and_doubles_quotes() {
        assert_eq!(quote_ident("tenant_acme").unwrap(), "\"tenant_acme\"");
        assert_eq!(quote_ident("select").unwrap(), "\"select\"");
        assert_eq!(
            quote_ident("a\"; DROP SCHEMA x; --").unwrap(),
            "\"a\"\"; DROP SCHEMA x; --\""
        );
        assert_eq!(quote_ident("ünï").unwrap(), "\"ünï\"");
        assert!(quote_ident("a\0b").is_err());
    }

    #[test]
    fn only_connection_failures_count_as_unreachable() {
        let q = |source| PgError::Query {
            action: "granting CONNECT on the database",
            source,
        };
        let io = q(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert!(io.is_unreachable() && io.is_transient());
        assert!(q(sqlx::Error::PoolTimedOut).is_unreachable());
        assert!(PgError::Connect {
            target: "db:5432/x".into(),
            source: sqlx::Error::PoolClosed
        }
        .is_unreachable());
        // Not reaching Postgres at all: no SQLSTATE to show.
        assert_eq!(io.sqlstate(), None);
        assert!(!PgError::RestoreRunning("acme".into()).is_unreachable());
        assert!(!PgError::MissingPrivilege {
            role: "a".into(),
            what: "b".into()
        }
        .is_unreachable());
    }

    /// A Postgres error with a SQLSTATE, as the server would send it.
    #[derive(Debug)]
    struct Db(&'static str, &'static str);

    impl std::fmt::Display for Db {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.1)
        }
    }

    impl std::error::Error for Db {}

    impl sqlx::error::DatabaseError for Db {
        fn message(&self) -> &str {
            self.1
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn a_start_up_step_runs_again_on_a_catalog_race_only_and_at_most_ten_times() {
        let db = |code| sqlx::Error::Database(Box::new(Db(code, "x")));
        // A concurrent catalog write (XX000) or a catalog unique index (23505).
        assert_eq!(catalog_race_retry(1, &db("XX000")), Some(Duration::from_millis(20)));
        assert_eq!(catalog_race_retry(9, &db("23505")), Some(Duration::from_millis(180)));
        assert_eq!(catalog_race_retry(10, &db("XX000")), None);
        assert_eq!(catalog_race_retry(1, &db("42501")), None);
        assert_eq!(catalog_race_retry(1, &sqlx::Error::PoolTimedOut), None);
    }

    #[test]
    fn a_postgres_answer_is_an_error_with_its_sqlstate_not_an_unreachable_postgres() {
        let q = |code, msg| PgError::Query {
            action: "granting CONNECT on the database",
            source: sqlx::Error::Database(Box::new(Db(code, msg))),
        };
        // The concurrent GRANT CONNECT of issue 14: an error, retried.
        let race = q("XX000", "tuple concurrently updated");
        assert!(!race.is_unreachable() && race.is_transient());
        assert_eq!(race.sqlstate().as_deref(), Some("XX000"));
        assert!(
            race.describe().contains("tuple concurrently updated") && race.describe().ends_with("(SQLSTATE XX000)"),
            "{}",
            race.describe()
        );
        for (code, transient) in [
            ("40001", true),
            ("40P01", true),
            ("55P03", true),
            ("42501", false),
            ("42601", false),
            ("23514", false),
        ] {
            let e = q(code, "x");
            assert!(!e.is_unreachable(), "{code} counted as unreachable");
            assert_eq!(e.is_transient(), transient, "{code}");
        }
        for code in ["08006", "08001", "28000", "28P01", "53300", "57P01", "57P03"] {
            let e = q(code, "x");
            assert!(e.is_unreachable() && e.is_transient(), "{code}");
        }
    }

    #[test]
    fn quote_literal_doubles_single_quotes() {
        assert_eq!(quote_literal("30s").unwrap(), "'30s'");
        assert_eq!(quote_literal("x'; DROP ROLE y; --").unwrap(), "'x''; DROP ROLE y; --'");
        assert_eq!(quote_literal("back\\slash").unwrap(), "'back\\slash'");
        assert!(quote_literal("a\0").is_err());
    }
}
