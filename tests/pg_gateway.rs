//! The gateway login against a real server, with the non-superuser admin:
//! created once, member of each Active tenant's app role and of nothing
//! else, no privilege of its own; tenant transactions through the
//! application library (tenancy-client), direct to Postgres (the pooler
//! suite is tests/pgbouncer.rs).

mod support;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenancy_client::{Error, Gateway};
use tenant_operator::api::TenantState;
use tenant_operator::pg;
use tenant_operator::pg::gateway::GatewayName;

pub async fn setup(label: &str) -> (TestDb, GatewayName, String) {
    support::gateway_db(label).await
}

async fn tenant(db: &TestDb, gw: &GatewayName, base: &str) -> Tenant {
    let mut t = Tenant::new(&unique(base));
    t.gateway = Some(gw.to_string());
    t.converge(db).await.expect("provision");
    t
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// Runs `sql` as the superuser, then the gateway's converge: its actions'
/// labels.
async fn tamper_and_repair(
    su: &mut PgConnection,
    db: &TestDb,
    gw: &GatewayName,
    password: &str,
    sql: String,
) -> Vec<&'static str> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *su)
        .await
        .expect("tamper");
    let out = pg::gateway::converge(&db.admin, gw, password, false)
        .await
        .expect("repair");
    out.actions.iter().map(|a| a.label()).collect()
}

async fn seed(db: &TestDb, t: &Tenant, value: &str) {
    // As the tenant's owner would through a migration: a table and a row.
    let mut su = db.superuser().await;
    let s = t.name.schema();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {o}; CREATE TABLE {s}.items (id serial PRIMARY KEY, v text); INSERT INTO {s}.items (v) VALUES ('{value}'); RESET ROLE;",
        o = t.name.owner_role()
    )))
    .execute(&mut su)
    .await
    .expect("seed");
    // The app role's grants on the new table come from the default privileges.
}

#[tokio::test]
async fn the_gateway_is_created_once_with_nothing_of_its_own() {
    let (db, gw, password) = setup("gw_create").await;
    // Converged: nothing written the second time.
    let again = pg::gateway::converge(&db.admin, &gw, &password, false)
        .await
        .expect("again");
    assert_eq!(again.statements, 0, "{:?}", again.actions);
    let (login, inherit, path): (bool, bool, Vec<String>) =
        sqlx::query_as("SELECT rolcanlogin, rolinherit, coalesce(rolconfig, '{}') FROM pg_roles WHERE rolname = $1")
            .bind(gw.as_str())
            .fetch_one(&db.admin)
            .await
            .unwrap();
    assert!(login && !inherit, "login {login} inherit {inherit}");
    assert_eq!(path, vec!["search_path=\"\"".to_string()]);
    // As the gateway, outside any tenant: no table resolves, none is readable.
    let t = tenant(&db, &gw, "gw-a").await;
    seed(&db, &t, "a-row").await;
    let mut c = PgConnection::connect(&db.url_as(gw.as_str(), &password))
        .await
        .expect("the gateway logs in");
    let e = sqlx::query("SELECT * FROM items").fetch_all(&mut c).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01", "{e}");
    let e = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {}.items", t.name.schema())))
        .fetch_all(&mut c)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = sqlx::query("SELECT * FROM tenancy.tenants")
        .fetch_all(&mut c)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // It may become the app role, and nothing else of the tenant.
    let e = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET ROLE {}", t.name.owner_role())))
        .execute(&mut c)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
}

#[tokio::test]
async fn membership_follows_the_lifecycle_and_drift_is_repaired() {
    let (db, gw, password) = setup("gw_life").await;
    let mut a = tenant(&db, &gw, "gw-a").await;
    seed(&db, &a, "a-row").await;
    let is_member = |role: String| {
        let pool = db.admin.clone();
        let gw = gw.to_string();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_auth_members WHERE roleid = to_regrole($1) AND member = to_regrole($2))")
                .bind(role)
                .bind(gw)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(is_member(a.name.app_role()).await);
    // The tenant's own drift repair keeps it: a second converge does nothing.
    let out = a.converge(&db).await.unwrap();
    assert!(out.plan.actions.is_empty(), "{:?}", out.plan.actions);
    // Revoked by hand: granted back.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("REVOKE {} FROM {gw}", a.name.app_role())))
        .execute(&db.admin)
        .await
        .unwrap();
    a.converge(&db).await.unwrap();
    assert!(is_member(a.name.app_role()).await);

    let gateway = Gateway::connect_direct(
        db.url_as(gw.as_str(), &password).parse().unwrap(),
        PgPoolOptions::new().max_connections(2),
    )
    .await
    .expect("library pool");
    let mut tx = gateway.begin(a.name.as_str(), "alice", "r-1").await.expect("begin");
    let v: String = sqlx::query_scalar("SELECT v FROM items")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(v, "a-row");
    tx.commit().await.unwrap();

    // Suspended: revoked, new transactions refused with a typed error.
    a.spec.state = TenantState::Suspended;
    a.converge(&db).await.unwrap();
    assert!(!is_member(a.name.app_role()).await);
    assert!(matches!(
        gateway.begin(a.name.as_str(), "alice", "r-2").await,
        Err(Error::TenantNotActive(_))
    ));
    a.spec.state = TenantState::Active;
    a.converge(&db).await.unwrap();
    gateway
        .begin(a.name.as_str(), "alice", "r-3")
        .await
        .expect("resumed")
        .rollback()
        .await
        .unwrap();

    // Anything else granted to the gateway, or the gateway granted to
    // someone, is revoked by its own converge; its attributes are put back.
    let b = tenant(&db, &gw, "gw-b").await;
    let mut su = db.superuser().await;
    let labels = tamper_and_repair(&mut su, &db, &gw, &password, format!(
        "GRANT {owner} TO {gw}; GRANT pg_read_all_data TO {gw}; GRANT SELECT ON tenancy.tenants TO {gw}; CREATE ROLE mallory_{db}; GRANT {gw} TO mallory_{db};
         CREATE TABLE {schema}.secrets (v text); ALTER TABLE {schema}.secrets OWNER TO {owner}; GRANT USAGE ON SCHEMA {schema} TO {gw}; GRANT SELECT ON {schema}.secrets TO {gw};
         ALTER ROLE {gw} INHERIT CREATEDB; ALTER ROLE {gw} RESET search_path;",
        owner = b.name.owner_role(),
        schema = b.name.schema(),
        db = db.name
    ))
    .await;
    assert!(
        labels.contains(&"RevokeForeignMembership")
            && labels.contains(&"RevokeGatewayMember")
            && labels.contains(&"RevokeForeignPrivileges"),
        "{labels:?}"
    );
    let again = pg::gateway::converge(&db.admin, &gw, &password, false)
        .await
        .expect("converged");
    assert!(again.actions.is_empty(), "{:?}", again.actions);
    // A privilege on the database beside its CONNECT (read from the
    // database's ACL entry by entry: exploding the whole ACL, two entries
    // per tenant, took 2.5 s at 10,000 tenants) is revoked too.
    let labels = tamper_and_repair(
        &mut su,
        &db,
        &gw,
        &password,
        format!("GRANT TEMPORARY ON DATABASE {} TO {gw}", db.name),
    )
    .await;
    assert!(labels.contains(&"RevokeForeignPrivileges"), "{labels:?}");
    let (temp, connect): (bool, bool) = sqlx::query_as(
        "SELECT has_database_privilege($1, current_database(), 'TEMPORARY'), has_database_privilege($1, current_database(), 'CONNECT')",
    )
    .bind(gw.as_str())
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!((temp, connect), (false, true), "TEMPORARY revoked, CONNECT kept");
    let member_of: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_userbyid(roleid)::text FROM pg_auth_members WHERE member = to_regrole($1) ORDER BY 1",
    )
    .bind(gw.as_str())
    .fetch_all(&db.admin)
    .await
    .unwrap();
    let mut expected = vec![a.name.app_role(), b.name.app_role()];
    expected.sort();
    assert_eq!(member_of, expected);
    let c = PgConnection::connect(&db.url_as(gw.as_str(), &password)).await;
    let mut c = c.expect("the gateway still logs in");
    let e = sqlx::query("SELECT * FROM tenancy.tenants")
        .fetch_all(&mut c)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    // The grants a tenant's owner made it (revoked as that owner, of which
    // the admin was a member for the converge's transaction only).
    let e = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM {}.secrets",
        b.name.schema()
    )))
    .fetch_all(&mut c)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let admin_member_of_owners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_auth_members WHERE member = (SELECT oid FROM pg_roles WHERE rolname = current_user)
            AND pg_get_userbyid(roleid) LIKE '%\\_owner'",
    )
    .fetch_one(&db.admin)
    .await
    .unwrap();
    assert_eq!(
        admin_member_of_owners, 0,
        "the admin kept a membership in a tenant's owner"
    );

    // Deleted: the role is gone, the library says so.
    pg::tenant::drop_tenant(&db.admin, &a.name, &a.uid, "test")
        .await
        .unwrap();
    assert!(matches!(
        gateway.begin(a.name.as_str(), "alice", "r-4").await,
        Err(Error::UnknownTenant(_))
    ));
}

#[tokio::test]
async fn a_tenant_transaction_carries_role_path_caps_and_audit_values() {
    let (db, gw, password) = setup("gw_tx").await;
    let mut a = Tenant::new(&unique("gw-caps"));
    a.gateway = Some(gw.to_string());
    a.spec.database.statement_timeout = "1500ms".into();
    a.spec.database.work_mem = "8MB".into();
    a.spec.database.idle_in_transaction_timeout = "7s".into();
    a.converge(&db).await.expect("provision");
    seed(&db, &a, "x").await;
    let gateway = Gateway::connect_direct(
        db.url_as(gw.as_str(), &password).parse().unwrap(),
        PgPoolOptions::new().max_connections(1),
    )
    .await
    .unwrap();
    let mut tx = gateway.begin(a.name.as_str(), "o'brien\\", "req-9").await.unwrap();
    let row: (String, String, String, String, String, String, String) = sqlx::query_as(
        "SELECT current_user::text, session_user::text, current_setting('search_path'), current_setting('statement_timeout'),
                current_setting('work_mem'), current_setting('idle_in_transaction_session_timeout'), current_setting('tenancy.actor')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(row.0, a.name.app_role());
    assert_eq!(row.1, gw.as_str());
    assert_eq!(row.2, a.name.schema());
    assert_eq!(
        (row.3.as_str(), row.4.as_str(), row.5.as_str()),
        ("1500ms", "8MB", "7s")
    );
    assert_eq!(row.6, "o'brien\\");
    // The cap holds: a statement past 1.5 s is cancelled.
    let e = sqlx::query("SELECT pg_sleep(3)").execute(&mut *tx).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57014");
    drop(tx);
    // Next transaction on the same (only) connection: nothing left.
    let mut c = gateway.pool().acquire().await.unwrap();
    let row: (String, String, String, String) =
        sqlx::query_as("SELECT current_user::text, current_setting('search_path'), current_setting('statement_timeout'), coalesce(current_setting('tenancy.actor', true), '')")
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(
        row,
        (gw.to_string(), "\"\"".to_string(), "0".to_string(), String::new())
    );
    drop(c);
    // Bad input is refused before anything is sent.
    assert!(matches!(
        gateway.begin("Not_A_Tenant", "a", "r").await,
        Err(Error::InvalidTenant(_))
    ));
    assert!(matches!(
        gateway.begin(a.name.as_str(), "a\0", "r").await,
        Err(Error::InvalidValue(_))
    ));
    let r = gateway.begin(&unique("nobody"), "a", "r").await;
    assert!(matches!(r, Err(Error::UnknownTenant(_))), "{r:?}");
}

#[tokio::test]
async fn caps_are_read_for_all_tenants_at_once_and_a_change_arrives_within_the_ttl() {
    let (db, gw, password) = setup("gw_capcache").await;
    let mut a = Tenant::new(&unique("gw-cc"));
    a.gateway = Some(gw.to_string());
    a.spec.database.statement_timeout = "1500ms".into();
    a.converge(&db).await.expect("provision");
    let gateway = Gateway::connect_direct(
        db.url_as(gw.as_str(), &password).parse().unwrap(),
        PgPoolOptions::new().max_connections(1),
    )
    .await
    .unwrap()
    .with_caps_ttl(std::time::Duration::from_millis(1500));
    async fn timeout_in(gateway: &Gateway, t: &Tenant) -> String {
        let mut tx = gateway.begin(t.name.as_str(), "a", "r").await.expect("begin");
        let v: String = sqlx::query_scalar("SELECT current_setting('statement_timeout')")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        v
    }
    assert_eq!(timeout_in(&gateway, &a).await, "1500ms");
    // Changed on the Tenant: new transactions keep the value read until
    // the cache period ends, then get the new one.
    a.spec.database.statement_timeout = "2500ms".into();
    a.converge(&db).await.expect("converge the new cap");
    assert_eq!(timeout_in(&gateway, &a).await, "1500ms", "read again before the TTL");
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    assert_eq!(timeout_in(&gateway, &a).await, "2500ms", "not read again after the TTL");
    // A tenant provisioned after the caps were read gets its own caps (a
    // miss reads again, at most once a second), never another tenant's.
    let mut b = Tenant::new(&unique("gw-cc"));
    b.gateway = Some(gw.to_string());
    b.spec.database.statement_timeout = "3500ms".into();
    b.converge(&db).await.expect("provision b");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(timeout_in(&gateway, &b).await, "3500ms");
    assert_eq!(timeout_in(&gateway, &a).await, "2500ms");
    // A cap the library did not copy cannot come from the catalog: the
    // query reads only the three copied settings of tenant app roles.
    let rows: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(pg::gateway::caps_sql()))
        .fetch_all(gateway.pool())
        .await
        .unwrap();
    assert!(
        rows.iter().all(|(role, name, _)| role.starts_with("tenant_")
            && role.ends_with("_app")
            && pg::gateway::COPIED_SETTINGS.contains(&name.as_str())),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(role, name, v)| role == &b.name.app_role() && name == "statement_timeout" && v == "3500ms"),
        "{rows:?}"
    );
    // A suspend is never cached: refused at once, with the caps still cached.
    a.spec.state = TenantState::Suspended;
    a.converge(&db).await.expect("suspend");
    assert!(matches!(
        gateway.begin(a.name.as_str(), "a", "r").await,
        Err(Error::TenantNotActive(_))
    ));
}
