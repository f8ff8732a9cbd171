//! tenancy-client: an application's side of the tenant data path.
//!
//! One pool on the gateway login (`tenant-gateway-db`, made by
//! tenant-operator) serves every tenant: [`Gateway::begin`] opens a
//! transaction in which the session is the tenant's app role, with its
//! `search_path`, its caps and the audit actor and request id, all
//! transaction-local and sent in the same round trip as `BEGIN`
//! (docs/data-path.md has the exact SQL). When the transaction ends,
//! nothing of it stays on the connection, so a pooler in transaction mode
//! (PgBouncer) can hand the server connection to any other tenant next.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tenancy_client::Error> {
//! let gw = tenancy_client::Gateway::connect("postgresql://tenancy_gateway:pw@pgbouncer:6432/saas").await?;
//! let mut tx = gw.begin("acme", "alice@acme", "req-42").await?;
//! let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders").fetch_one(&mut *tx).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! With tenants on several Postgres servers (tenant-operator's Shards),
//! [`ShardedGateway`] holds one `Gateway` per shard and routes each tenant
//! to the shard that serves it, following a move without a restart.
//!
//! What it does not protect against: code holding the pool can run
//! `SET ROLE` to any Active tenant's app role itself (the gateway is a
//! member of all of them). This API never takes a role name, only a
//! validated tenant name, and [`Gateway::begin`] is the only way it opens a
//! transaction; the README's threat model says the rest.

mod sharded;

pub use sharded::ShardedGateway;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tenant_operator::crypto::{Keyring, Purpose, TenantSalt};
use tenant_operator::names::TenantName;
use tenant_operator::pg::gateway::{self as gw, Refusal};

pub use tenant_operator::names::NameError;
pub use tenant_operator::pg::gateway::BeginError;

/// Why a tenant transaction (or a secret) could not be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a valid tenant name: nothing was sent.
    #[error(transparent)]
    InvalidTenant(#[from] NameError),
    /// The actor or request id cannot be sent: nothing was sent.
    #[error(transparent)]
    InvalidValue(#[from] BeginError),
    /// No such tenant in this database (never provisioned, or deleted):
    /// the transaction was refused before any statement of yours ran.
    #[error("tenant {0} does not exist")]
    UnknownTenant(String),
    /// The tenant exists but is not Active (suspended, being deleted or not
    /// provisioned yet): refused before any statement of yours ran.
    #[error("tenant {0} is not active")]
    TenantNotActive(String),
    /// The Secret's data lacks a key or has a bad value.
    #[error("gateway Secret: {0}")]
    BadSecret(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Reading the tenant's uid and salt from the registry failed.
    #[error("reading the tenant registry: {0}")]
    Registry(#[from] tenant_operator::pg::PgError),
    /// A sealed secret could not be opened (wrong tenant, key, or name).
    #[error("opening a sealed secret: {0}")]
    Secret(#[from] tenant_operator::crypto::CryptoError),
}

/// How long the tenants' caps read from Postgres are used before they are
/// read again ([`Gateway::with_caps_ttl`]).
pub const DEFAULT_CAPS_TTL: Duration = Duration::from_secs(10);

/// A tenant missing from the caps just read (provisioned since, or with no
/// caps set) makes the next `begin` for it read them again, at most this
/// often.
const MISS_RELOAD: Duration = Duration::from_secs(1);

/// A pool on the gateway login.
#[derive(Clone, Debug)]
pub struct Gateway {
    pool: PgPool,
    caps: Arc<CapsCache>,
}

/// Every tenant's caps (its app role's copied settings), read for all
/// tenants in one query and kept for a TTL: a request never waits for a
/// catalog lookup of its own, and a cap changed by the operator reaches new
/// transactions within the TTL (the operator's watchdog enforces caps on
/// running statements whatever a session set).
#[derive(Debug)]
struct CapsCache {
    ttl: Duration,
    state: std::sync::RwLock<Caps>,
    /// Single flight: one reload at a time.
    reload: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Caps {
    loaded: Option<Instant>,
    by_role: HashMap<String, Vec<(String, String)>>,
}

impl Caps {
    /// The caps of `role` when they can be used as they are.
    fn fresh(&self, role: &str, ttl: Duration) -> Option<Vec<(String, String)>> {
        let age = self.loaded?.elapsed();
        match self.by_role.get(role) {
            Some(c) if age < ttl => Some(c.clone()),
            None if age < MISS_RELOAD.min(ttl) => Some(Vec::new()),
            _ => None,
        }
    }
}

impl CapsCache {
    fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            ttl,
            state: Default::default(),
            reload: Default::default(),
        })
    }

    async fn get(&self, pool: &PgPool, role: &str) -> Result<Vec<(String, String)>, Error> {
        if let Some(c) = self.state.read().expect("caps lock").fresh(role, self.ttl) {
            return Ok(c);
        }
        let _one = self.reload.lock().await;
        if let Some(c) = self.state.read().expect("caps lock").fresh(role, self.ttl) {
            return Ok(c);
        }
        self.load(pool).await?;
        Ok(self
            .state
            .read()
            .expect("caps lock")
            .by_role
            .get(role)
            .cloned()
            .unwrap_or_default())
    }

    async fn load(&self, pool: &PgPool) -> Result<(), Error> {
        // The simple protocol: one message, no prepared statement (behind
        // PgBouncer in transaction mode a statement prepared outside a
        // transaction may be gone, DISCARD ALL, before it runs).
        let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(gw::caps_sql()))
            .fetch_all(pool)
            .await?;
        let mut by_role: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for row in rows {
            let (role, name, value): (String, String, String) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            by_role.entry(role).or_default().push((name, value));
        }
        *self.state.write().expect("caps lock") = Caps {
            loaded: Some(Instant::now()),
            by_role,
        };
        Ok(())
    }
}

/// Connection options from the data of the `tenant-gateway-db` Secret
/// (keys `host`, `port`, `dbname`, `user`, `password`; `uri` is not needed).
pub fn options_from_secret(data: &BTreeMap<String, String>) -> Result<PgConnectOptions, Error> {
    let get = |k: &str| {
        data.get(k)
            .map(String::as_str)
            .ok_or_else(|| Error::BadSecret(format!("no key {k:?}")))
    };
    let port: u16 = get("port")?
        .parse()
        .map_err(|_| Error::BadSecret("port is not a number".into()))?;
    Ok(PgConnectOptions::new_without_pgpass()
        .host(get("host")?)
        .port(port)
        .database(get("dbname")?)
        .username(get("user")?)
        .password(get("password")?))
}

impl Gateway {
    /// A pool of at most 10 connections on the gateway `url` through a
    /// pooler in transaction mode (PgBouncer): sqlx's statement cache is
    /// off, since a named statement prepared in one transaction is not on
    /// the server connection the next one gets. The pooler must discard
    /// session state after each transaction (`server_reset_query = DISCARD
    /// ALL`, `server_reset_query_always = 1`): docs/data-path.md.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url.parse()?, PgPoolOptions::new().max_connections(10)).await
    }

    /// [`Gateway::connect`] with your own options (the statement cache is
    /// turned off).
    pub async fn connect_with(opts: PgConnectOptions, pool: PgPoolOptions) -> Result<Self, Error> {
        let opts = opts.statement_cache_capacity(0);
        let pool = pool.acquire_timeout(Duration::from_secs(10)).connect_with(opts).await?;
        Ok(Self::from_pool(pool))
    }

    /// A pool straight to Postgres (no pooler in between, or PgBouncer
    /// 1.21+ with `max_prepared_statements`): sqlx's statement cache stays
    /// on (with it off, sqlx would leave one prepared statement per query
    /// on a connection that nothing discards).
    pub async fn connect_direct(opts: PgConnectOptions, pool: PgPoolOptions) -> Result<Self, Error> {
        let pool = pool.acquire_timeout(Duration::from_secs(10)).connect_with(opts).await?;
        Ok(Self::from_pool(pool))
    }

    /// A pool you built (keep its statement cache off behind a pooler).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            caps: CapsCache::new(DEFAULT_CAPS_TTL),
        }
    }

    /// Reads the tenants' caps again after `ttl` instead of
    /// [`DEFAULT_CAPS_TTL`] (a cap changed on a Tenant reaches new
    /// transactions within it).
    pub fn with_caps_ttl(mut self, ttl: Duration) -> Self {
        self.caps = CapsCache::new(ttl);
        self
    }

    /// Reads every tenant's caps now (one query), e.g. after changing them.
    pub async fn refresh_caps(&self) -> Result<(), Error> {
        let _one = self.caps.reload.lock().await;
        self.caps.load(&self.pool).await
    }

    /// The pool itself. Anything run on it outside [`Gateway::begin`] runs
    /// as the gateway, which can read no table (and whose `search_path` is
    /// empty); it is here for health checks and benchmarks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Opens a transaction as `tenant`'s app role: one round trip (the
    /// message of [`tenant_operator::pg::gateway::begin_sql`], with the
    /// tenant's caps from the cache; a second one when the cache is read
    /// again, once per TTL for all tenants). `actor` and
    /// `request_id` (at most 200 bytes, no NUL) land in every audit entry
    /// the transaction writes. Unknown or inactive tenant: a typed error,
    /// and the transaction is rolled back before any statement of yours.
    pub async fn begin(
        &self,
        tenant: &str,
        actor: &str,
        request_id: &str,
    ) -> Result<Transaction<'static, Postgres>, Error> {
        let name = TenantName::parse(tenant)?;
        let caps = self.caps.get(&self.pool, &name.app_role()).await?;
        let sql = gw::begin_sql(&name, actor, request_id, &caps)?;
        match self.pool.begin_with(sqlx::AssertSqlSafe(sql)).await {
            Ok(tx) => Ok(tx),
            Err(e) => Err(classify(e, &name)),
        }
    }
}

fn classify(e: sqlx::Error, name: &TenantName) -> Error {
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
    match code.as_deref().and_then(gw::refusal) {
        Some(Refusal::UnknownTenant) => Error::UnknownTenant(name.to_string()),
        Some(Refusal::NotActive) => Error::TenantNotActive(name.to_string()),
        None => Error::Database(e),
    }
}

/// Opens one of a tenant's sealed secrets (an envelope from the tenant's
/// `tenant-<name>-sealed` Secret) with the same code as
/// `tenant-operator secrets open`. It needs the ROOT KEYS (whoever holds
/// them can open every tenant's secrets: this is operator-level trust, not
/// an application's) and the tenant's uid and HKDF salt from
/// `tenancy.tenants` (which the gateway may not read: see [`tenant_key_context`]).
pub fn open_secret(
    ring: &Keyring,
    tenant_uid: &str,
    salt: &TenantSalt,
    name: &str,
    envelope: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
    Ok(tenant_operator::crypto::open(
        ring,
        salt,
        tenant_uid,
        Purpose::Secrets,
        name,
        envelope,
    )?)
}

/// The tenant's uid and salt, read from the operator's registry through
/// `registry` (a pool of a role that may read `tenancy.tenants`: the
/// operator's admin, or a role granted SELECT on it; never the gateway).
/// None when the tenant is not in the registry.
pub async fn tenant_key_context(registry: &PgPool, tenant: &str) -> Result<Option<(String, TenantSalt)>, Error> {
    let name = TenantName::parse(tenant)?;
    let Some(uid) = tenant_operator::pg::registry::uid_of(registry, name.as_str()).await? else {
        return Ok(None);
    };
    let salt = tenant_operator::pg::registry::existing_key_salt(registry, &uid).await?;
    Ok(salt.map(|s| (uid, s)))
}
