//! The ops login and its confined sessions against a real server, with the
//! non-superuser admin: whatever SQL runs on a confined session can be at
//! most its own tenant's owner.

mod support;

use sqlx::{Connection, PgConnection};
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::crypto::{Keyring, TenantSalt};
use tenant_operator::pg;
use tenant_operator::pg::confined::{self, OpsLogin};

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    pg::harden_database(&db.admin, &facts).await.expect("harden");
    db
}

fn ring(active: u32) -> Keyring {
    let keys = (1..=active)
        .map(|v| (format!("v{v}"), vec![v as u8 * 3 + 1; 32]))
        .collect();
    Keyring::new(keys, &format!("v{active}")).expect("keyring")
}

fn login(db: &TestDb, t: &Tenant, ring: &Keyring, salt: &TenantSalt) -> OpsLogin {
    let target = pg::Target::from_url(&db.admin_url).expect("target");
    OpsLogin::derive(&target, &t.name, &t.uid, ring, salt).expect("derive")
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

async fn two_tenants(db: &TestDb) -> (Tenant, Tenant) {
    let mut a = Tenant::new(&unique("conf-a"));
    let mut b = Tenant::new(&unique("conf-b"));
    a.converge(db).await.expect("provision a");
    b.converge(db).await.expect("provision b");
    // B has data A must never see.
    let mut c = confined::connect(&db.admin, &login(db, &b, &ring(1), &TenantSalt::generate()))
        .await
        .expect("b's confined session");
    sqlx::raw_sql("CREATE TABLE secrets (id int PRIMARY KEY, v text); INSERT INTO secrets VALUES (1, 'b-only')")
        .execute(&mut *c)
        .await
        .expect("b seeds");
    c.close().await;
    (a, b)
}

#[tokio::test]
async fn a_confined_session_is_the_tenants_owner_in_its_schema() {
    let db = setup("conf_owner").await;
    let (a, _b) = two_tenants(&db).await;
    let mut c = confined::connect(&db.admin, &login(&db, &a, &ring(1), &TenantSalt::generate()))
        .await
        .expect("confined");
    let (session, current, path): (String, String, String) =
        sqlx::query_as("SELECT session_user::text, current_user::text, current_setting('search_path')")
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(session, a.name.ops_role());
    assert_eq!(current, a.name.owner_role());
    assert_eq!(path, a.name.schema());
    sqlx::raw_sql("CREATE TABLE orders (id int PRIMARY KEY)")
        .execute(&mut *c)
        .await
        .expect("the owner creates in its schema");
    let owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'orders' AND schemaname = $1")
            .bind(a.name.schema())
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(owner, a.name.owner_role(), "objects belong to the owner, not the login");
}

#[tokio::test]
async fn nothing_run_on_a_confined_session_gets_out_of_its_tenant() {
    let db = setup("conf_escape").await;
    let (a, b) = two_tenants(&db).await;
    let mut c = confined::connect(&db.admin, &login(&db, &a, &ring(1), &TenantSalt::generate()))
        .await
        .expect("confined");
    let b_table = format!("{}.secrets", b.name.schema());
    // Each attempt, as a migration would send it; each must fail.
    let attempts: Vec<(String, &str)> = vec![
        (format!("SET ROLE {}", b.name.owner_role()), "42501"),
        (format!("SET ROLE {}", b.name.app_role()), "42501"),
        ("SET ROLE tenancy_admin".into(), "42501"),
        ("SET SESSION AUTHORIZATION tenancy_admin".into(), "42501"),
        ("SET SESSION AUTHORIZATION postgres".into(), "42501"),
        (format!("SELECT * FROM {b_table}"), "42501"),
        ("SELECT * FROM tenancy.tenants".into(), "42501"),
        (
            "INSERT INTO tenancy.audit_log (tenant_uid, action, actor) VALUES ('x', 'forged', 'me')".into(),
            "42501",
        ),
        (format!("ALTER ROLE {} SUPERUSER", a.name.ops_role()), "42501"),
        (format!("ALTER ROLE {} LOGIN", b.name.owner_role()), "42501"),
        (
            format!("GRANT {} TO {}", b.name.owner_role(), a.name.ops_role()),
            "42501",
        ),
        ("CREATE ROLE sneaky LOGIN".into(), "42501"),
        ("CREATE SCHEMA elsewhere".into(), "42501"),
        ("CREATE TABLE public.leak (x int)".into(), "42501"),
    ];
    for (sql, code) in &attempts {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *c)
            .await
            .expect_err(sql);
        assert_eq!(&sqlstate(&err), code, "{sql}: {err}");
    }
    // RESET ROLE (also after a COMMIT): the session falls back to the ops
    // login itself, which inherits nothing.
    for prefix in ["", "BEGIN; COMMIT; "] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{prefix}RESET ROLE")))
            .execute(&mut *c)
            .await
            .expect("RESET ROLE is allowed");
        assert_eq!(support::current_user(&mut c).await, a.name.ops_role());
        for sql in [
            format!("SELECT * FROM {b_table}"),
            format!("CREATE TABLE {}.t2 (x int)", a.name.schema()),
            "SELECT * FROM tenancy.tenants".into(),
        ] {
            let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut *c)
                .await
                .expect_err(&sql);
            assert_eq!(sqlstate(&err), "42501", "{sql} after RESET ROLE: {err}");
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET ROLE {}", a.name.owner_role())))
            .execute(&mut *c)
            .await
            .expect("back to its own owner");
    }
    // The admin's catalog says the ops login has the one membership.
    let member_of: Vec<String> = sqlx::query_scalar("SELECT pg_get_userbyid(m.roleid)::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = $1")
        .bind(a.name.ops_role())
        .fetch_all(&db.admin)
        .await
        .unwrap();
    assert_eq!(member_of, vec![a.name.owner_role()]);
}

#[tokio::test]
async fn a_rotated_root_key_or_a_password_set_by_hand_is_repaired_on_the_next_login() {
    let db = setup("conf_rotate").await;
    let mut a = Tenant::new(&unique("conf-rot"));
    a.converge(&db).await.expect("provision");
    let salt = TenantSalt::generate();
    let v1 = login(&db, &a, &ring(1), &salt);
    confined::connect(&db.admin, &v1)
        .await
        .expect("first login sets the password")
        .close()
        .await;
    // Someone sets the password by hand: the derived one works again after
    // the operator's reset; the hand-set one stops working.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {} PASSWORD 'known-to-mallory'",
        a.name.ops_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    confined::connect(&db.admin, &v1)
        .await
        .expect("reset and retried")
        .close()
        .await;
    let url = db.url_as(&a.name.ops_role(), "known-to-mallory");
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "the hand-set password still logs in"
    );
    // A new active root key: a new password, set on first use.
    let v2 = login(&db, &a, &ring(2), &salt);
    assert_ne!(v1.password(), v2.password());
    confined::connect(&db.admin, &v2).await.expect("v2 login").close().await;
    assert!(
        PgConnection::connect(&db.url_as(&a.name.ops_role(), v1.password()))
            .await
            .is_err(),
        "the v1 password still logs in"
    );
    // The app role's own credentials cannot become the owner.
    let mut app = a.app(&db).await.expect("app session");
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET ROLE {}", a.name.ops_role())))
        .execute(&mut app)
        .await
        .expect_err("app became ops");
    assert_eq!(sqlstate(&err), "42501");
}

#[tokio::test]
async fn an_ops_role_the_operator_did_not_create_is_never_given_a_password() {
    let db = setup("conf_foreign").await;
    let mut a = Tenant::new(&unique("conf-for"));
    a.converge(&db).await.expect("provision");
    // The role is replaced by a hand-made one of the same name.
    let mut su = db.superuser().await;
    let ops = a.name.ops_role();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {ops}; DROP ROLE {ops}; CREATE ROLE {ops} LOGIN"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let err = confined::connect(&db.admin, &login(&db, &a, &ring(1), &TenantSalt::generate()))
        .await
        .expect_err("logged in as a foreign role");
    assert!(matches!(err, pg::PgError::NoOpsRole(_)), "{err}");
    // And the reconcile refuses to adopt it.
    assert!(a.converge(&db).await.is_err(), "a hand-made ops role was adopted");
}
