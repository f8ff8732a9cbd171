//! The Postgres half of the Tenant controller against a real server, as the
//! non-superuser admin role managed Postgres services give: provisioning,
//! idempotency, isolation between tenants, caps, suspend, delete, drift and
//! hostile names.

mod support;

use sqlx::{PgConnection, Row};
// The tenant helper (Postgres half of a reconcile, spec from the CRD's
// defaults) is shared with the other Postgres suites.
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::api::TenantState;
use tenant_operator::controller::tenant::plan;
use tenant_operator::controller::tenant::ConvergeError;
use tenant_operator::pg;

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    facts.require().expect("CREATEROLE + pg_signal_backend is enough");
    assert!(pg::harden_database(&db.admin, &facts).await.expect("harden").is_empty());
    db
}

async fn show(c: &mut PgConnection, setting: &str) -> String {
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
        .fetch_one(c)
        .await
        .unwrap()
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// Creates a table with one row in the tenant's schema, as its owner role
/// (what a migration does).
async fn seed_table(db: &TestDb, t: &Tenant, secret: &str) {
    let mut su = db.superuser().await;
    let schema = t.name.schema();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner}; CREATE TABLE {schema}.docs (id serial PRIMARY KEY, body text); INSERT INTO {schema}.docs (body) VALUES ('{secret}'); RESET ROLE;",
        owner = t.name.owner_role()
    )))
    .execute(&mut su)
    .await
    .expect("seed table as owner");
}

#[tokio::test]
async fn a_second_reconcile_issues_no_ddl_and_leaves_the_catalog_untouched() {
    let db = setup("idem").await;
    let mut t = Tenant::new(&unique("idem"));
    let first = t.converge(&db).await.unwrap();
    assert!(
        first.statements > 10,
        "first reconcile should provision, ran {}",
        first.statements
    );
    let xmin = |db: &TestDb, t: &Tenant| {
        let schema = t.name.schema();
        let pool = db.admin.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT xmin::text FROM pg_namespace WHERE nspname = $1")
                .bind(schema)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let before = xmin(&db, &t).await;
    let registry_before: String = sqlx::query_scalar("SELECT xmin::text FROM tenancy.tenants WHERE uid = $1")
        .bind(&t.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    for _ in 0..3 {
        let again = t.converge(&db).await.unwrap();
        assert_eq!(again.statements, 0, "an unchanged tenant ran {:?}", again.plan.actions);
        assert!(again.registry.is_none());
    }
    assert_eq!(before, xmin(&db, &t).await, "the schema row was rewritten");
    let registry_after: String = sqlx::query_scalar("SELECT xmin::text FROM tenancy.tenants WHERE uid = $1")
        .bind(&t.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(registry_before, registry_after, "the registry row was rewritten");
}

/// A tenant registered by a reconcile gets its ops login with the password
/// derived from the key salt its registry row got, in the same transaction:
/// the reconcile's confined sessions (the audit log's DDL) log straight in,
/// no login is refused and no password reset follows (each refusal cost a
/// server process in a provisioning burst; docs/scale.md).
#[tokio::test]
async fn a_new_tenants_ops_login_has_its_derived_password_from_the_start() {
    let db = setup("opspw").await;
    let mut t = Tenant::new(&unique("opspw"));
    let first = t.converge(&db).await.unwrap();
    let verifier = first
        .plan
        .actions
        .iter()
        .find_map(|a| match a {
            pg::tenant::DbAction::CreateOpsRole { verifier } => verifier.clone(),
            _ => None,
        })
        .expect("the ops role was created with a verifier");
    let stored = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
            .bind(t.name.ops_role())
            .fetch_one(&db.su)
            .await
            .unwrap()
    };
    // The verifier created with the role is still the one stored after the
    // audit log's confined sessions ran: none was refused and reset.
    assert_eq!(stored().await.as_deref(), Some(verifier.expose()));
    let salt = pg::registry::existing_key_salt(&db.admin, &t.uid)
        .await
        .unwrap()
        .expect("the registry row holds the salt");
    let login = pg::confined::OpsLogin::derive(
        &pg::Target::from_url(&db.admin_url).unwrap(),
        &t.name,
        &t.uid,
        &support::test_ring(),
        &salt,
    )
    .unwrap();
    // A login with no admin to repair it: the derived password is the one set.
    let mut c = pg::confined::connect_without_admin(&login)
        .await
        .expect("the derived password logs in");
    assert_eq!(support::current_user(&mut c).await, t.name.owner_role());
    assert_eq!(stored().await.as_deref(), Some(verifier.expose()));
    // A tenant whose registry row is there but whose ops role is not (dropped
    // by hand) gets the role back without a verifier: the salt the row holds
    // is not the one this reconcile would have made. Its first confined
    // session sets the password and logs in.
    c.close().await;
    let ops = pg::quote_ident(&t.name.ops_role()).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP OWNED BY {ops}; DROP ROLE {ops}")))
        .execute(&db.su)
        .await
        .unwrap();
    let again = t.converge(&db).await.unwrap();
    assert!(again
        .plan
        .actions
        .contains(&pg::tenant::DbAction::CreateOpsRole { verifier: None }));
    let mut c = pg::confined::connect(&db.admin, &login)
        .await
        .expect("set on first use");
    assert_eq!(support::current_user(&mut c).await, t.name.owner_role());
}

#[tokio::test]
async fn tenant_a_cannot_reach_tenant_b_by_any_path() {
    let db = setup("iso").await;
    let mut a = Tenant::new(&unique("a"));
    let mut b = Tenant::new(&unique("b"));
    a.converge(&db).await.unwrap();
    b.converge(&db).await.unwrap();
    seed_table(&db, &a, "a-data").await;
    seed_table(&db, &b, "b-secret").await;
    let (sa, sb) = (a.name.schema(), b.name.schema());
    let mut conn = a
        .app(&db)
        .await
        .expect("A's app role logs in with its Secret's password");

    // Its own data, unqualified: the search path is pinned to its schema.
    let own: String = sqlx::query_scalar("SELECT body FROM docs")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(own, "a-data");
    sqlx::query("INSERT INTO docs (body) VALUES ('more')")
        .execute(&mut conn)
        .await
        .expect("DML on its own tables");
    sqlx::query("UPDATE docs SET body = body")
        .execute(&mut conn)
        .await
        .expect("UPDATE on its own tables");
    sqlx::query("DELETE FROM docs WHERE body = 'more'")
        .execute(&mut conn)
        .await
        .expect("DELETE on its own tables");
    let path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(path, sa);

    // B's data, schema-qualified: permission errors, never rows.
    for sql in [
        format!("SELECT body FROM {sb}.docs"),
        format!("INSERT INTO {sb}.docs (body) VALUES ('x')"),
        format!("UPDATE {sb}.docs SET body = 'x'"),
        format!("DELETE FROM {sb}.docs"),
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut conn)
            .await
            .expect_err(&format!("A ran {sql} on B's schema"));
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    // B's schema on the search path: the query errors instead of leaking.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET search_path TO {sb}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let err = sqlx::query("SELECT body FROM docs")
        .fetch_all(&mut conn)
        .await
        .expect_err("A read B's rows through the search path");
    assert!(["42P01", "42501"].contains(&sqlstate(&err).as_str()), "{err}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET search_path TO {sb}, {sa}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar("SELECT body FROM docs")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(
        !rows.contains(&"b-secret".to_string()),
        "B's row leaked through the search path"
    );
    sqlx::query("RESET search_path").execute(&mut conn).await.unwrap();

    // Nothing in public, nothing new in its own schema.
    for sql in [
        "CREATE TABLE public.leak (x int)",
        "CREATE TABLE leak (x int)",
        "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'select 1'",
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    // No role switching to B or to its own owner.
    for role in [b.name.app_role(), b.name.owner_role(), a.name.owner_role()] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET ROLE {role}")))
            .execute(&mut conn)
            .await
            .expect_err(&role);
        assert_eq!(sqlstate(&err), "42501", "SET ROLE {role}: {err}");
    }
    // And the control schema is off limits.
    let err = sqlx::query("SELECT * FROM tenancy.tenants")
        .fetch_all(&mut conn)
        .await
        .expect_err("registry readable by a tenant");
    assert_eq!(sqlstate(&err), "42501");
}

#[tokio::test]
async fn caps_are_applied_on_the_app_role_and_follow_spec_changes() {
    let db = setup("caps").await;
    let mut t = Tenant::new(&unique("caps"));
    t.spec.database.connection_limit = 2;
    t.spec.database.statement_timeout = "1s".into();
    t.spec.database.work_mem = "8MB".into();
    t.converge(&db).await.unwrap();
    let mut c1 = t.app(&db).await.unwrap();
    assert_eq!(show(&mut c1, "statement_timeout").await, "1s");
    assert_eq!(show(&mut c1, "work_mem").await, "8MB");
    assert_eq!(show(&mut c1, "idle_in_transaction_session_timeout").await, "1min");
    let err = sqlx::query("SELECT pg_sleep(3)")
        .execute(&mut c1)
        .await
        .expect_err("statement_timeout not enforced");
    assert_eq!(sqlstate(&err), "57014");
    let _c2 = t.app(&db).await.unwrap();
    let err = t.app(&db).await.expect_err("third connection over a limit of 2");
    assert_eq!(sqlstate(&err), "53300", "{err}");

    t.spec.database.connection_limit = 3;
    t.spec.database.statement_timeout = "5min".into();
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["SetConnectionLimit", "SetRoleSetting"]);
    let mut c3 = t.app(&db).await.expect("limit raised to 3");
    assert_eq!(show(&mut c3, "statement_timeout").await, "5min");
    assert_eq!(t.converge(&db).await.unwrap().statements, 0);
}

#[tokio::test]
async fn suspend_locks_out_and_ends_sessions_and_resume_restores_login() {
    let db = setup("susp").await;
    let mut t = Tenant::new(&unique("susp"));
    t.converge(&db).await.unwrap();
    let mut open = t.app(&db).await.unwrap();
    sqlx::query("SELECT 1").execute(&mut open).await.unwrap();

    t.spec.state = TenantState::Suspended;
    let out = t.converge(&db).await.unwrap();
    assert!(out.plan.terminate_sessions);
    let err = t.app(&db).await.expect_err("a suspended tenant logged in");
    assert_eq!(sqlstate(&err), "28000", "{err}");
    assert!(
        sqlx::query("SELECT 1").execute(&mut open).await.is_err(),
        "a suspended tenant's session survived"
    );
    let state: String = sqlx::query_scalar("SELECT state FROM tenancy.tenants WHERE uid = $1")
        .bind(&t.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(state, "Suspended");
    assert_eq!(
        t.converge(&db).await.unwrap().statements,
        0,
        "suspended steady state is not quiet"
    );

    t.spec.state = TenantState::Active;
    t.converge(&db).await.unwrap();
    t.app(&db).await.expect("resumed tenant logs in");
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM tenancy.audit_log WHERE tenant_uid = $1 ORDER BY id")
            .bind(&t.uid)
            .fetch_all(&db.admin)
            .await
            .unwrap();
    assert_eq!(actions, ["Provisioned", "Suspended", "Resumed"]);
}

/// Sessions of `t`'s app role, seen by the superuser.
async fn app_sessions(db: &TestDb, t: &Tenant) -> i64 {
    let mut su = db.superuser().await;
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
        .bind(t.name.app_role())
        .fetch_one(&mut su)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_session_opened_between_the_check_and_the_suspend_commit_is_ended() {
    let db = setup("suspwin").await;
    let mut t = Tenant::new(&unique("swin"));
    t.converge(&db).await.unwrap();
    t.spec.state = TenantState::Suspended;
    // The reconcile reads the catalog: no session of the app role yet ...
    let desired = plan::desired_db(&t.name, &t.spec).unwrap();
    let catalog = pg::tenant::observe(&db.admin, &t.name).await.unwrap();
    assert_eq!(catalog.app_sessions, 0);
    // ... then the application logs in, before NOLOGIN commits.
    let mut late = t.app(&db).await.expect("login is still on");
    sqlx::query("SELECT 1").execute(&mut late).await.unwrap();
    tenant_operator::controller::tenant::converge_db(
        &db.admin,
        &support::test_ring(),
        &t.name,
        &t.uid,
        &desired,
        &catalog,
        t.password.as_deref(),
        "test",
    )
    .await
    .unwrap();
    // Ended after the commit, though the read saw no session.
    for _ in 0..50 {
        if app_sessions(&db, &t).await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        app_sessions(&db, &t).await,
        0,
        "the session opened in the window survived the suspend"
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut late).await.is_err(),
        "the late session still answers"
    );
    assert_eq!(
        sqlstate(&t.app(&db).await.expect_err("a suspended tenant logged in")),
        "28000"
    );
    // And at every later reconcile of the suspended tenant, any session left
    // (one that slipped in as the previous terminate ran) is ended too.
    let catalog = pg::tenant::observe(&db.admin, &t.name).await.unwrap();
    let again = tenant_operator::controller::tenant::converge_db(
        &db.admin,
        &support::test_ring(),
        &t.name,
        &t.uid,
        &desired,
        &catalog,
        t.password.as_deref(),
        "test",
    )
    .await
    .unwrap();
    assert!(again.plan.terminate_sessions && again.statements == 0);
}

/// Many Tenants created at once (as `kubectl apply -f` of a folder does):
/// every reconcile succeeds the first time. Concurrent `GRANT CONNECT ON
/// DATABASE` used to fail with "tuple concurrently updated" (XX000); it is
/// serialized on a `tenancy.locks` row, and the grants of reconciles running
/// at the same time are combined into one statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_tenants_provisioned_at_once_all_succeed_the_first_time() {
    let db = setup("conc").await;
    // The operator's own pool: its sessions resolve no name through the
    // search path (`pg_catalog` only, docs/scale.md), so everything the
    // provisioning runs as the admin must name its schema.
    let (pool, _) = pg::connect(&db.admin_url, 40).await.unwrap();
    let search_path: String = sqlx::query_scalar("SHOW search_path").fetch_one(&pool).await.unwrap();
    assert_eq!(search_path, "pg_catalog");
    // Its prepared statements are planned once per connection (docs/scale.md).
    let plans: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(plans, "force_generic_plan");
    let tenants: Vec<Tenant> = (0..40).map(|i| Tenant::new(&unique(&format!("c{i}")))).collect();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(tenants.len()));
    let runs = tenants.iter().map(|t| {
        let (pool, barrier) = (pool.clone(), barrier.clone());
        async move {
            let desired = plan::desired_db(&t.name, &t.spec).unwrap();
            let catalog = pg::tenant::observe(&pool, &t.name).await.unwrap();
            barrier.wait().await;
            tenant_operator::controller::tenant::converge_db(
                &pool,
                &support::test_ring(),
                &t.name,
                &t.uid,
                &desired,
                &catalog,
                None,
                "test",
            )
            .await
        }
    });
    let results = futures::future::join_all(runs).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 40 reconciles failed: {failed:?}",
        failed.len()
    );
    let connect: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = ANY($1) AND has_database_privilege(oid, current_database(), 'CONNECT')")
        .bind(tenants.iter().map(|t| t.name.app_role()).collect::<Vec<_>>())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(connect, 40);
    // Deleting them at once (DROP OWNED revokes CONNECT) races the same way.
    let drops = tenants
        .iter()
        .map(|t| pg::tenant::drop_tenant(&pool, &t.name, &t.uid, "test"));
    let failed: Vec<String> = futures::future::join_all(drops)
        .await
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "{} of 40 deletes failed: {failed:?}", failed.len());
}

/// The CONNECT grants of reconciles running at the same time are combined
/// (`pg::connect_grants`): every caller gets its logins granted, a caller
/// whose request breaks the combined statement fails alone (the batch is
/// run again one caller at a time), and a login that already has CONNECT
/// costs no statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connect_grants_are_combined_and_a_bad_request_fails_alone() {
    let db = setup("grants").await;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    let roles: Vec<String> = (0..24)
        .map(|i| unique(&format!("grant_{i}")).replace('-', "_"))
        .collect();
    for r in &roles {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE ROLE \"{r}\" NOLOGIN")))
            .execute(&db.admin)
            .await
            .unwrap();
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(30)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(roles.len() + 1));
    let mut callers: Vec<Vec<String>> = roles.iter().map(|r| vec![r.clone()]).collect();
    // Postgres refuses a NUL in a text parameter: the combined statement
    // that carries this request fails.
    callers.push(vec!["bad\0role".into()]);
    let runs = callers.iter().map(|logins| {
        let (pool, barrier, database) = (pool.clone(), barrier.clone(), database.clone());
        let logins = logins.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            pg::connect_grants::grant_connect(&pool, &database, logins).await
        })
    });
    let results: Vec<_> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let (bad, good) = results.split_last().unwrap();
    assert!(bad.is_err(), "the bad request was granted: {bad:?}");
    let failed: Vec<String> = good
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} good requests failed beside the bad one: {failed:?}",
        failed.len()
    );
    let connect: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1) AND has_database_privilege(oid, current_database(), 'CONNECT')",
    )
    .bind(&roles)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(connect, 24);
    // Granted already: nothing to run.
    let again = pg::connect_grants::grant_connect(&pool, &database, roles.clone())
        .await
        .unwrap();
    assert_eq!(again, 0);
    for r in &roles {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET lock_timeout = '10s'; REVOKE CONNECT ON DATABASE \"{database}\" FROM \"{r}\"; DROP ROLE \"{r}\""
        )))
        .execute(&db.admin)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn delete_leaves_nothing_of_a_and_does_not_touch_b() {
    let db = setup("del").await;
    let mut a = Tenant::new(&unique("a"));
    let mut b = Tenant::new(&unique("b"));
    a.converge(&db).await.unwrap();
    b.converge(&db).await.unwrap();
    seed_table(&db, &a, "a-data").await;
    seed_table(&db, &b, "b-data").await;
    // B's reconcile audits its new table (docs/audit.md); then B is converged.
    b.converge(&db).await.unwrap();
    let _a_session = a.app(&db).await.unwrap();

    let dropped = pg::tenant::drop_tenant(&db.admin, &a.name, &a.uid, "test")
        .await
        .unwrap();
    assert!(dropped > 0);
    let left = pg::tenant::leftovers(&db.admin, &a.name, &a.uid).await.unwrap();
    assert!(left.is_empty(), "tenant A left behind: {left:?}");
    let mut su = db.superuser().await;
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("{}%", a.name.schema()))
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(roles, 0, "roles of A survived");
    let owned: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relnamespace::regnamespace::text = $1")
        .bind(a.name.schema())
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(owned, 0, "relations of A survived");
    let named: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE tenant_name = $1")
        .bind(a.name.as_str())
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(named, 0, "the audit log still names A");
    assert_eq!(
        pg::tenant::drop_tenant(&db.admin, &a.name, &a.uid, "test")
            .await
            .unwrap(),
        0,
        "a second delete is a no-op"
    );

    let mut cb = b.app(&db).await.expect("B still logs in");
    let body: String = sqlx::query_scalar("SELECT body FROM docs")
        .fetch_one(&mut cb)
        .await
        .unwrap();
    assert_eq!(body, "b-data");
    assert_eq!(b.converge(&db).await.unwrap().statements, 0, "A's delete disturbed B");
}

#[tokio::test]
async fn hostile_names_get_their_own_distinct_objects() {
    let db = setup("names").await;
    let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let long = format!("{}{}", "x".repeat(40 - suffix.len()), suffix);
    let names = [
        format!("select-{suffix}"),
        format!("user-{suffix}"),
        format!("ab-c{suffix}"),
        format!("a-bc{suffix}"),
        long,
    ];
    let mut tenants: Vec<Tenant> = names.iter().map(|n| Tenant::new(n)).collect();
    for t in &mut tenants {
        t.converge(&db).await.unwrap_or_else(|e| panic!("{}: {e}", t.name));
    }
    for t in &tenants {
        let mut c = t.app(&db).await.unwrap();
        let user: String = sqlx::query_scalar("SELECT current_user::text")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(user, t.name.app_role());
    }
    // Reserved words as whole names: the identifier quoting is what makes
    // this work (`tenant_select` is not reserved, but the quoting is proven
    // on the raw keyword by the unit tests).
    let schemas: Vec<String> = sqlx::query_scalar("SELECT schema_name FROM tenancy.tenants ORDER BY 1")
        .fetch_all(&db.admin)
        .await
        .unwrap();
    assert_eq!(schemas.len(), 5);
}

#[tokio::test]
async fn drift_made_by_hand_is_repaired() {
    let db = setup("drift").await;
    let mut a = Tenant::new(&unique("a"));
    let mut b = Tenant::new(&unique("b"));
    a.converge(&db).await.unwrap();
    b.converge(&db).await.unwrap();
    seed_table(&db, &a, "a-data").await;
    let mut su = db.superuser().await;
    // Someone opens A's schema to B, makes B a member of A's owner, and drops
    // A's app role.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT USAGE ON SCHEMA {sa} TO {bapp}; GRANT SELECT ON ALL TABLES IN SCHEMA {sa} TO {bapp}; GRANT {aowner} TO {bapp}; GRANT USAGE ON SCHEMA {sa} TO PUBLIC;",
        sa = a.name.schema(),
        bapp = b.name.app_role(),
        aowner = a.name.owner_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut cb = b.app(&db).await.unwrap();
    let leaked: Result<String, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT body FROM {}.docs",
        a.name.schema()
    )))
    .fetch_one(&mut cb)
    .await;
    assert!(leaked.is_ok(), "the drift setup did not open A to B");
    drop(cb);

    let out = a.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|x| x.label()).collect();
    assert!(
        labels.contains(&"RevokeForeignSchemaGrant") && labels.contains(&"RevokeForeignMembership"),
        "{labels:?}"
    );
    let mut cb = b.app(&db).await.unwrap();
    let err = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
        "SELECT body FROM {}.docs",
        a.name.schema()
    )))
    .fetch_one(&mut cb)
    .await
    .expect_err("B still reads A after the repair");
    assert_eq!(sqlstate(&err), "42501");

    // A's app role dropped by hand comes back with the Secret's password.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP OWNED BY {app}; DROP ROLE {app}",
        app = a.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = a.converge(&db).await.unwrap();
    assert!(out.plan.actions.iter().any(|x| x.label() == "CreateAppRole"));
    let mut ca = a.app(&db).await.expect("recreated role takes the Secret's password");
    let body: String = sqlx::query_scalar("SELECT body FROM docs")
        .fetch_one(&mut ca)
        .await
        .unwrap();
    assert_eq!(body, "a-data");
    assert_eq!(a.converge(&db).await.unwrap().statements, 0);
}

#[tokio::test]
async fn objects_not_created_for_this_tenant_are_never_adopted() {
    let db = setup("conflict").await;
    let mut t = Tenant::new(&unique("squat"));
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {} LOGIN PASSWORD 'x'",
        t.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let err = t.converge(&db).await.expect_err("a hand-made role was adopted");
    assert!(
        matches!(err, ConvergeError::Plan(ref e) if e.reason() == "OwnershipConflict"),
        "{err}"
    );
    let schema: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
        .bind(t.name.schema())
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(schema, 0, "something was created despite the conflict");

    // A left-over of a deleted tenant of the same name is not handed to a new
    // tenant with another uid.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE {}", t.name.app_role())))
        .execute(&mut su)
        .await
        .unwrap();
    t.converge(&db).await.unwrap();
    let mut newcomer = Tenant::new(t.name.as_str());
    newcomer.uid = "another-uid".into();
    let err = newcomer
        .converge(&db)
        .await
        .expect_err("a new tenant adopted an old tenant's data");
    assert!(err.to_string().contains("refusing to adopt"), "{err}");
}

#[tokio::test]
async fn a_failure_part_way_leaves_the_tenant_as_it_was() {
    let db = setup("atomic").await;
    let t = Tenant::new(&unique("atomic"));
    // A plan whose last statement fails, standing in for a crash or a lost
    // connection between two steps: the whole transaction rolls back.
    let mut actions = plan::plan_db(
        &t.name,
        &t.uid,
        &plan::desired_db(&t.name, &t.spec).unwrap(),
        &Default::default(),
        None,
    )
    .unwrap()
    .actions;
    actions.push(pg::tenant::DbAction::SetSetting {
        name: "work_mem",
        value: "not-a-size".into(),
    });
    let err = pg::tenant::apply(&db.admin, &t.name, &t.uid, &actions, None)
        .await
        .expect_err("bad setting accepted");
    assert!(!err.is_transient(), "a bad value is not transient: {err}");
    let o = pg::tenant::observe(&db.admin, &t.name).await.unwrap();
    assert!(
        o.schema.is_none() && o.owner_role.is_none() && o.app_role.is_none(),
        "half-provisioned tenant left: {o:?}"
    );
}

#[tokio::test]
async fn postgres_unreachable_is_a_transient_error() {
    let err = pg::connect("postgresql://tenancy_admin:x@127.0.0.1:1/none", 2)
        .await
        .expect_err("connected to a closed port");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1:1"),
        "the message should say where: {err}"
    );
    let err = pg::connect("not a url", 2).await.expect_err("parsed garbage");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn the_control_schema_migrates_idempotently_and_public_is_closed() {
    let db = setup("control").await;
    pg::migrate_control_schema(&db.admin)
        .await
        .expect("second migration run");
    let mut su = db.superuser().await;
    let public_create: bool = sqlx::query_scalar("SELECT has_schema_privilege('public', 'public', 'CREATE') OR has_schema_privilege('public', 'public', 'USAGE')")
        .fetch_one(&mut su)
        .await
        .unwrap_or(false);
    assert!(!public_create);
    let row = sqlx::query(
        "SELECT count(*) AS n FROM pg_namespace n, aclexplode(n.nspacl) a WHERE n.nspname = 'public' AND a.grantee = 0",
    )
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>("n"), 0, "PUBLIC still has rights on schema public");
    let mig: String = sqlx::query_scalar("SELECT to_regclass('tenancy._sqlx_migrations')::text")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(
        mig, "tenancy._sqlx_migrations",
        "the migrator's table is not in the control schema"
    );
}

/// The roles of `t` the admin (the session's user on `db.admin`) is a
/// member of.
async fn admin_memberships(db: &TestDb, t: &Tenant) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT pg_get_userbyid(roleid)::text FROM pg_auth_members
          WHERE member = (SELECT oid FROM pg_roles WHERE rolname = current_user)
            AND pg_get_userbyid(roleid) = ANY ($1) ORDER BY 1",
    )
    .bind(vec![t.name.owner_role(), t.name.app_role(), t.name.ops_role()])
    .fetch_all(&db.admin)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_admin_is_a_member_of_no_tenant_role_between_transactions() {
    let db = setup("lend").await;
    let mut t = Tenant::new(&unique("lend"));
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels.first(), Some(&"CreateOwnerRole"));
    assert_eq!(labels[1], "GrantOwnerToAdmin", "{labels:?}");
    assert_eq!(labels.last(), Some(&"RevokeOwnerFromAdmin"), "{labels:?}");
    assert!(admin_memberships(&db, &t).await.is_empty());
    // Without it the admin cannot read the tenant's schema.
    let e = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}._tenancy_audit",
        t.name.schema()
    )))
    .fetch_all(&db.admin)
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");

    // What an earlier version left (a standing membership in the owner and
    // the app role) is revoked once; the next reconcile writes nothing.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT {} TO CURRENT_USER; GRANT {} TO CURRENT_USER",
        t.name.owner_role(),
        t.name.app_role()
    )))
    .execute(&db.admin)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["RevokeOwnerFromAdmin", "RevokeAppFromAdmin"]);
    assert!(admin_memberships(&db, &t).await.is_empty());
    assert_eq!(t.converge(&db).await.unwrap().statements, 0);

    // Repairs on the owner's schema borrow the membership and give it back.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "REVOKE USAGE ON SCHEMA {} FROM {}",
        t.name.schema(),
        t.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        ["GrantOwnerToAdmin", "GrantSchemaUsage", "RevokeOwnerFromAdmin"]
    );
    assert!(admin_memberships(&db, &t).await.is_empty());
    // The repair took: the app role reaches its schema again.
    sqlx::query("SELECT count(*) FROM _tenancy_audit")
        .execute(&mut t.app(&db).await.unwrap())
        .await
        .expect("USAGE on the schema granted back");
    assert_eq!(t.converge(&db).await.unwrap().statements, 0);

    // The delete needs it too (the schema is the owner's), within its own
    // transaction.
    pg::tenant::drop_tenant(&db.admin, &t.name, &t.uid, "test")
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = ANY ($1)")
        .bind(vec![t.name.owner_role(), t.name.app_role(), t.name.ops_role()])
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// A move's write fence against a session that holds a lock on one of the
/// tenant's tables and then waits for the table's catalog row (autovacuum's
/// `ANALYZE` of a table just filled does both; here a `GRANT` on the table
/// stands for it): the fence takes its locks before it revokes, so it waits
/// for that session instead of deadlocking with it, then fences. A fence that
/// revoked first held the row the session waits for (a deadlock, one of the
/// two cancelled: what failed a move's cutover in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_fence_waits_for_a_lock_holder_instead_of_deadlocking() {
    use std::time::{Duration, Instant};
    let db = setup("fencedl").await;
    let mut t = Tenant::new(&unique("fdl"));
    t.converge(&db).await.unwrap();
    seed_table(&db, &t, "row").await;
    let docs = format!("{}.docs", t.name.schema());
    let mut holder = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {docs} IN SHARE UPDATE EXCLUSIVE MODE"
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    let fence = tokio::spawn({
        let (pool, name) = (db.admin.clone(), t.name.clone());
        async move { pg::tenant::fence_writes(&pool, &name, Duration::from_secs(20)).await }
    });
    // The fence waits for its lock on the table ...
    let mut su = db.superuser().await;
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '{docs}'::regclass"
        )))
        .fetch_one(&mut su)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the fence never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... while the holder updates the table's catalog row, then commits.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT SELECT ON {docs} TO {}; COMMIT",
        t.name.ops_role()
    )))
    .execute(&mut holder)
    .await
    .expect("the lock holder goes on: no deadlock with the fence");
    fence.await.unwrap().expect("the fence, once the holder committed");
    let mut app = t.app(&db).await.expect("the app login (the fence leaves it)");
    let refused = sqlx::query("INSERT INTO docs (body) VALUES ('after the fence')")
        .execute(&mut app)
        .await
        .expect_err("a write after the fence");
    assert_eq!(sqlstate(&refused), "42501");
}
