//! Shared helpers of the integration suites: a fresh database per test on
//! the PostgreSQL server that `scripts/with-postgres.sh` started.
#![allow(dead_code)]

pub mod e2e;
pub mod tenant;
pub mod tools;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

pub fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests through `make test` (scripts/with-postgres.sh starts Postgres and sets it)")
    })
}

/// A database of its own for one test, owned by the non-superuser admin role
/// the operator uses (CREATEROLE + pg_signal_backend).
pub struct TestDb {
    pub name: String,
    pub admin_url: String,
    pub superuser_url: String,
    pub admin: PgPool,
    /// A superuser pool (connected lazily), for the tests' own reads and
    /// writes in tenant schemas: the admin is a member of no tenant's owner
    /// outside the operator's transactions, so it cannot read them.
    pub su: PgPool,
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a database part");
    format!("{base}/{db}")
}

impl TestDb {
    pub async fn new(label: &str) -> TestDb {
        let superuser_url = env("TEST_PG_SUPERUSER_URL");
        let admin_url = env("TEST_PG_ADMIN_URL");
        let name = format!("t_{label}_{:08x}", rand::random::<u32>());
        let mut su = PgConnection::connect(&superuser_url).await.expect("superuser connects");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} OWNER tenancy_admin"
        )))
        .execute(&mut su)
        .await
        .expect("create test database");
        let admin_url = with_db(&admin_url, &name);
        let superuser_url = with_db(&superuser_url, &name);
        let admin = PgPoolOptions::new()
            .max_connections(4)
            .connect(&admin_url)
            .await
            .expect("admin connects");
        let su = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy(&superuser_url)
            .expect("superuser URL");
        TestDb {
            name,
            admin_url,
            superuser_url,
            admin,
            su,
        }
    }

    pub async fn superuser(&self) -> PgConnection {
        PgConnection::connect(&self.superuser_url)
            .await
            .expect("superuser connects")
    }

    /// A URL for `user` with `password` on this test's database.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        let port = env("TEST_PG_PORT");
        format!("postgresql://{user}:{password}@127.0.0.1:{port}/{}", self.name)
    }

    pub fn port(&self) -> u16 {
        env("TEST_PG_PORT").parse().expect("port")
    }
}

/// A tenant name unique across the whole test run (roles are cluster-wide,
/// so parallel tests in different databases must not share names).
/// The root keys the Postgres suites run with (one fixed key `v1`): the
/// ops logins' passwords and the audit keys derive from them.
pub fn test_ring() -> tenant_operator::crypto::Keyring {
    tenant_operator::crypto::Keyring::new(
        std::collections::BTreeMap::from([("v1".to_string(), vec![0x5a; 32])]),
        "v1",
    )
    .expect("test keyring")
}

/// [`test_ring`] as a root-keys file (`--root-keys-file`), written once
/// per test process.
pub fn test_ring_file() -> std::path::PathBuf {
    use base64::Engine;
    let path = std::env::temp_dir().join(format!("tenant-test-root-keys-{}.yaml", std::process::id()));
    if !path.exists() {
        let text = format!(
            "v1: {}\nactive: v1\n",
            base64::engine::general_purpose::STANDARD.encode([0x5a; 32])
        );
        std::fs::write(&path, text).expect("write the root-keys file");
    }
    path
}

pub fn unique(base: &str) -> String {
    format!("{base}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

impl TestDb {
    /// Like [`TestDb::new`], plus an admin role of this test's own
    /// (CREATEROLE and pg_signal_backend, owning the database), so a test can cut the
    /// operator off from Postgres without touching other tests.
    pub async fn with_own_admin(label: &str) -> (TestDb, String, String) {
        let db = TestDb::new(label).await;
        let role = format!("adm_{:08x}", rand::random::<u32>());
        let password = format!("pw{:016x}", rand::random::<u64>());
        let mut su = db.superuser().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {role} LOGIN CREATEROLE PASSWORD '{password}'; GRANT pg_signal_backend TO {role}; ALTER DATABASE {} OWNER TO {role};",
            db.name
        )))
        .execute(&mut su)
        .await
        .expect("create the test's admin role");
        let url = db.url_as(&role, &password);
        (db, role, url)
    }
}

/// A test database hardened as the operator's start-up hardens one, with
/// a gateway login converged in it: (database, gateway, its password).
pub async fn gateway_db(label: &str) -> (TestDb, tenant_operator::pg::gateway::GatewayName, String) {
    use tenant_operator::pg;
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    pg::harden_database(&db.admin, &facts).await.expect("harden");
    let gw = pg::gateway::GatewayName::parse(&format!("gw_{}", db.name)).expect("gateway name");
    let password = pg::scram::generate_password();
    let out = pg::gateway::converge(&db.admin, &gw, &password, true)
        .await
        .expect("gateway converges");
    assert!(out.statements > 0);
    (db, gw, password)
}

/// `sql` run as the tenant's `owner` by the non-superuser admin, as the
/// operator does: a member of the owner for this one transaction only
/// (`tenant_operator::pg::membership`). `sql` holds no transaction control.
pub fn as_owner(owner: &str, sql: &str) -> String {
    format!(
        "BEGIN; GRANT \"{owner}\" TO CURRENT_USER; SET LOCAL ROLE \"{owner}\";\n{sql};\nRESET ROLE; REVOKE \"{owner}\" FROM CURRENT_USER; COMMIT;"
    )
}

/// The session's `current_user`.
pub async fn current_user(c: &mut PgConnection) -> String {
    sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(c)
        .await
        .expect("current_user")
}
