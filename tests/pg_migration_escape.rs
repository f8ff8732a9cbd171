//! A MigrationSet's SQL reaches nothing outside its tenant, against a real
//! Postgres with the non-superuser admin: each way out of a tenant a
//! migration could try fails or is harmless (another tenant's data and
//! roles, `tenancy.*`, the roles' attributes, memberships and settings are
//! as before), objects it plants for the admin (functions, a trigger, an RLS
//! policy, a view in place of the version table) never run as the admin
//! through a rollout, a Tenant reconcile and the status reads, and a
//! session that ran user SQL never comes back into an admin pool. Also: no
//! advisory lock a tenant can take delays the operator.

mod support;

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::api::{Migration, MigrationSet, MigrationSetSpec, OnFailure, RolloutSpec};
use tenant_operator::controller::migration_set::apply::Outcome;
use tenant_operator::controller::migration_set::pass;
use tenant_operator::controller::tenant::migrations as tenant_migrations;
use tenant_operator::crypto::Keyring;
use tenant_operator::names::TenantName;
use tenant_operator::pg;
use tenant_operator::pg::migrations::{TenantOutcome, Timeouts};

const ADMIN: &str = "tenancy_admin";

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    pg::harden_database(&db.admin, &facts).await.expect("harden");
    db
}

/// The keyring the tenants were provisioned with (`support::tenant`): the
/// ops logins' passwords derive from it, so another one would make every
/// first login a password reset.
fn ring() -> Keyring {
    support::test_ring()
}

fn spec(migrations: Vec<Migration>) -> MigrationSetSpec {
    MigrationSetSpec {
        migrations,
        rollout: RolloutSpec {
            max_concurrent: 2,
            canary: 0,
            on_failure: OnFailure::Continue,
        },
    }
}

fn set_object(name: &str, generation: i64, spec: MigrationSetSpec) -> MigrationSet {
    let mut s = MigrationSet::new(name, spec);
    s.metadata.generation = Some(generation);
    s
}

/// Two tenants: A runs the hostile migrations, B holds data A must never
/// reach. `tenancy.canary` is writable by the admin alone (a function that
/// ran as the admin could write it); `<A>.calls` records who ran A's planted
/// functions.
async fn world(label: &str) -> (TestDb, Tenant, Tenant) {
    let db = setup(label).await;
    let mut a = Tenant::new(&unique("esc-a"));
    let mut b = Tenant::new(&unique("esc-b"));
    a.converge(&db).await.expect("provision a");
    b.converge(&db).await.expect("provision b");
    let mut su = db.superuser().await;
    let sql = format!(
        "CREATE TABLE tenancy.canary (tag text, who text); ALTER TABLE tenancy.canary OWNER TO {ADMIN};
         CREATE TABLE {bs}.secrets (id int PRIMARY KEY, v text); ALTER TABLE {bs}.secrets OWNER TO {bo}; INSERT INTO {bs}.secrets VALUES (1, 'b-only');
         CREATE TABLE {as_}.calls (tag text, usr text, sess text); ALTER TABLE {as_}.calls OWNER TO {ao};",
        bs = b.name.schema(),
        bo = b.name.owner_role(),
        as_ = a.name.schema(),
        ao = a.name.owner_role()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut su)
        .await
        .expect("seed");
    (db, a, b)
}

/// Everything outside tenant A that a migration of A must not change:
/// roles (attributes, memberships, settings), B's tables and data, the
/// control schema's tables and the operator's own rows about B, the
/// schemas, and `public`'s tables. Read as the superuser.
async fn outside(db: &TestDb, a: &TenantName, b: &TenantName) -> Vec<String> {
    let mut su = db.superuser().await;
    // Roles are the cluster's: other tests' tenants come and go meanwhile.
    let ours = [a, b]
        .iter()
        .flat_map(|t| [t.owner_role(), t.app_role(), t.ops_role()])
        .map(|r| format!("'{r}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Also made by other tests meanwhile: their admins (`adm_*`), gateways
    // (`gw_*`) and their databases' audit anchor roles.
    let role = |col: &str| {
        format!(
            "(({col}::text NOT LIKE 'tenant\\_%' AND {col}::text NOT LIKE 'adm\\_%' AND {col}::text NOT LIKE 'gw\\_%'
               AND ({col}::text NOT LIKE 'tenancy\\_anchor\\_%'
                    OR {col}::text = 'tenancy_anchor_' || (SELECT oid FROM pg_database WHERE datname = current_database())::text))
              OR {col}::text IN ({ours}))"
        )
    };
    let queries = [
        format!(
            "SELECT string_agg(format('%s super=%s inherit=%s createrole=%s createdb=%s login=%s repl=%s bypassrls=%s connlimit=%s until=%s',
                 rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil), E'\\n' ORDER BY rolname)
           FROM pg_roles WHERE {}",
            role("rolname")
        ),
        format!(
            "SELECT string_agg(format('%s in %s admin=%s', m.member::regrole, m.roleid::regrole, m.admin_option), E'\\n' ORDER BY 1) FROM pg_auth_members m WHERE {} AND {}",
            role("m.member::regrole"),
            role("m.roleid::regrole")
        ),
        format!("SELECT string_agg(format('%s/%s: %s', s.setrole::regrole, s.setdatabase, s.setconfig), E'\\n' ORDER BY 1) FROM pg_db_role_setting s WHERE {}", role("s.setrole::regrole")),
        format!("SELECT string_agg(format('%s %s', id, v), ',' ORDER BY id) FROM {}.secrets", b.schema()),
        format!(
            "SELECT string_agg(format('%s %s %s %s', c.relname, c.relkind, c.relacl, c.relrowsecurity), E'\\n' ORDER BY c.relname) FROM pg_class c WHERE c.relnamespace = '{}'::regnamespace",
            b.schema()
        ),
        "SELECT string_agg(format('%s %s', c.relname, c.relacl), E'\\n' ORDER BY c.relname) FROM pg_class c WHERE c.relnamespace IN ('tenancy'::regnamespace, 'public'::regnamespace)".into(),
        "SELECT string_agg(format('%s %s %s', nspname, nspowner::regrole, nspacl), E'\\n' ORDER BY nspname) FROM pg_namespace".into(),
        "SELECT string_agg(format('%s %s %s %s', uid, name, state, key_salt), E'\\n' ORDER BY uid) FROM tenancy.tenants".into(),
        format!("SELECT count(*)::text FROM tenancy.audit_log WHERE tenant_name IS DISTINCT FROM '{a}' OR actor NOT IN ('test', 'tenant-operator')"),
        format!("SELECT count(*)::text FROM tenancy.schema_versions v JOIN tenancy.tenants t ON t.uid = v.tenant_uid WHERE t.name <> '{a}'"),
        format!("SELECT count(*)::text FROM tenancy.migration_failures WHERE tenant_name <> '{a}'"),
        "SELECT count(*)::text FROM tenancy.canary".into(),
    ];
    let mut out = Vec::new();
    for q in queries {
        let v: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(q.clone()))
            .fetch_one(&mut su)
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        out.push(format!("{q}\n=> {}", v.unwrap_or_default()));
    }
    out
}

/// The operator's next login of the tenant (a confined session, closed).
async fn relogin(db: &TestDb, t: &TenantName) {
    let login = pg::migrations::ops_login(&db.admin, &ring(), t)
        .await
        .unwrap()
        .expect("registered");
    pg::confined::connect(&db.admin, &login)
        .await
        .expect("the operator logs in")
        .close()
        .await;
}

fn sqlstate_of(o: &Outcome) -> Option<String> {
    match o {
        Outcome::Done(TenantOutcome::Failed { sqlstate, .. }) => sqlstate.clone(),
        _ => None,
    }
}

/// Rolls `attempt` out to A as the next version of the set (a new
/// generation each time); keeps it in `applied` if it succeeded. Gives the
/// outcome.
async fn attempt(
    db: &TestDb,
    a: &TenantName,
    applied: &mut Vec<Migration>,
    generation: &mut i64,
    sql: &str,
    transactional: bool,
) -> Outcome {
    *generation += 1;
    let version = applied.last().map(|m| m.version).unwrap_or(0) + 1;
    let m = Migration {
        version,
        name: format!("attempt-{version}"),
        sql: sql.into(),
        transactional,
    };
    let mut list = applied.clone();
    list.push(m.clone());
    let p = pass(
        &db.admin,
        &ring(),
        "hostile",
        *generation,
        &spec(list),
        std::slice::from_ref(a),
        &Timeouts::default(),
    )
    .await
    .expect("pass");
    let outcome = p
        .report
        .results
        .into_iter()
        .next()
        .map(|(_, o)| o)
        .expect("A was planned");
    if matches!(outcome, Outcome::Done(TenantOutcome::Migrated { .. })) {
        applied.push(m);
    }
    outcome
}

#[tokio::test]
async fn no_migration_reaches_outside_its_tenant() {
    let (db, a, b) = world("esc_sql").await;
    let before = outside(&db, &a.name, &b.name).await;
    let (ao, ap, aops, bo, bapp) = (
        a.name.owner_role(),
        a.name.app_role(),
        a.name.ops_role(),
        b.name.owner_role(),
        b.name.app_role(),
    );
    let bs = b.name.schema();
    let mut applied = Vec::new();
    let mut generation = 0;
    // Each must fail (SQLSTATE 42501: not allowed) or do nothing outside A.
    let refused: Vec<(String, bool)> = vec![
        (format!("RESET ROLE; SELECT * FROM {bs}.secrets"), true),
        ("RESET ROLE; CREATE TABLE public.pwned (x int)".into(), true),
        (
            "RESET ROLE; INSERT INTO tenancy.canary VALUES ('reset-role', session_user)".into(),
            true,
        ),
        (
            format!("RESET ROLE; CREATE TABLE {}.t_as_ops (x int)", a.name.schema()),
            true,
        ),
        (format!("SET ROLE {bo}; DELETE FROM {bs}.secrets"), true),
        (format!("SET ROLE {bapp}"), true),
        (
            format!("SET ROLE {ADMIN}; INSERT INTO tenancy.canary VALUES ('set-role', current_user)"),
            true,
        ),
        (format!("SET SESSION AUTHORIZATION {ADMIN}"), true),
        (format!("SET SESSION AUTHORIZATION {bo}"), true),
        ("SET SESSION AUTHORIZATION postgres".into(), true),
        (
            "COMMIT; RESET ROLE; INSERT INTO tenancy.canary VALUES ('commit-reset', session_user)".into(),
            true,
        ),
        (
            "COMMIT; RESET ROLE; INSERT INTO tenancy.canary VALUES ('commit-reset', session_user)".into(),
            false,
        ),
        (
            format!("COMMIT; RESET ROLE; SET ROLE {bo}; DELETE FROM {bs}.secrets"),
            false,
        ),
        (format!("RESET ROLE; SET SESSION AUTHORIZATION {ADMIN}"), false),
        ("SELECT * FROM tenancy.tenants".into(), true),
        ("SELECT * FROM tenancy.schema_versions".into(), true),
        (
            "INSERT INTO tenancy.audit_log (tenant_uid, action, actor) VALUES ('x', 'forged', 'me')".into(),
            true,
        ),
        ("DELETE FROM tenancy.migration_failures".into(), true),
        ("UPDATE tenancy.locks SET key = key".into(), true),
        (
            format!(
                "INSERT INTO tenancy.schema_versions (tenant_uid, version, name, checksum) VALUES ('{}', 99, 'x', 'x')",
                b.uid
            ),
            true,
        ),
        (format!("ALTER ROLE {aops} SUPERUSER"), true),
        (format!("ALTER ROLE {aops} INHERIT"), true),
        (format!("RESET ROLE; ALTER ROLE {aops} CONNECTION LIMIT 100"), true),
        (format!("ALTER ROLE {ap} PASSWORD 'app-chosen'"), true),
        (format!("ALTER ROLE {ap} SET search_path = public"), true),
        (format!("ALTER ROLE {ADMIN} PASSWORD 'x'"), true),
        (format!("ALTER ROLE {ADMIN} NOCREATEROLE"), true),
        (format!("ALTER ROLE {bo} SET search_path = public"), true),
        (format!("GRANT {bo} TO {ao}"), true),
        (format!("GRANT {ao} TO {bapp}"), true),
        (format!("REVOKE {ao} FROM {aops}"), true),
        ("CREATE ROLE sneaky LOGIN PASSWORD 'x'".into(), true),
        ("CREATE SCHEMA elsewhere".into(), true),
        (format!("ALTER SCHEMA {bs} OWNER TO {ao}"), true),
    ];
    for (sql, transactional) in &refused {
        let out = attempt(&db, &a.name, &mut applied, &mut generation, sql, *transactional).await;
        assert_eq!(
            sqlstate_of(&out).as_deref(),
            Some("42501"),
            "{sql} (transactional: {transactional}): {out:?}"
        );
    }
    // Allowed by Postgres to any role for itself, and put back after the
    // run: the ops login's password (a migration that `RESET ROLE`s is the
    // ops login) and settings, the owner's settings.
    let harmless = [
        format!("RESET ROLE; ALTER ROLE {aops} PASSWORD 'chosen-by-migration'"),
        format!("RESET ROLE; ALTER ROLE {aops} SET statement_timeout = '1ms'"),
        format!(
            "RESET ROLE; ALTER ROLE {aops} IN DATABASE {} SET work_mem = '64kB'",
            db.name
        ),
        format!("ALTER ROLE {ao} SET search_path = public"),
        format!("ALTER ROLE {ao} PASSWORD 'owner-cannot-log-in'"),
    ];
    for sql in &harmless {
        let out = attempt(&db, &a.name, &mut applied, &mut generation, sql, false).await;
        assert!(
            matches!(out, Outcome::Done(TenantOutcome::Migrated { .. })),
            "{sql}: {out:?}"
        );
        // The operator's next login of the tenant finds its password refused and sets it again.
        relogin(&db, &a.name).await;
        assert!(
            PgConnection::connect(&db.url_as(&aops, "chosen-by-migration"))
                .await
                .is_err(),
            "{sql}: the password a migration chose for the ops login still logs in after the next login"
        );
    }
    // Below Postgres 16 the session user may grant itself (the ops login,
    // after a RESET ROLE): revoked when the run ends. From 16 on, refused.
    for transactional in [true, false] {
        let sql = format!("RESET ROLE; GRANT {aops} TO {bapp}");
        let out = attempt(&db, &a.name, &mut applied, &mut generation, &sql, transactional).await;
        assert!(
            matches!(out, Outcome::Done(TenantOutcome::Migrated { .. }))
                || sqlstate_of(&out).as_deref() == Some("42501"),
            "{sql}: {out:?}"
        );
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_auth_members WHERE roleid = (SELECT oid FROM pg_roles WHERE rolname = $1)",
        )
        .bind(&aops)
        .fetch_one(&db.admin)
        .await
        .unwrap();
        assert_eq!(members, 0, "{sql}: another role can still act as A's ops login");
    }
    // A migration that ends its own session right after choosing a password:
    // the run is interrupted (retried later), and the next login puts it back.
    let out = attempt(
        &db,
        &a.name,
        &mut applied,
        &mut generation,
        &format!("BEGIN; RESET ROLE; ALTER ROLE {aops} PASSWORD 'chosen-then-gone'; COMMIT; SELECT pg_terminate_backend(pg_backend_pid())"),
        false,
    )
    .await;
    assert!(matches!(out, Outcome::Error(_)), "{out:?}");
    relogin(&db, &a.name).await;
    assert!(
        PgConnection::connect(&db.url_as(&aops, "chosen-then-gone"))
            .await
            .is_err(),
        "the chosen password outlived an interrupted run"
    );
    // The same set rolls on afterwards, and the ops login still works.
    let out = attempt(
        &db,
        &a.name,
        &mut applied,
        &mut generation,
        "CREATE TABLE fine (x int)",
        true,
    )
    .await;
    assert!(matches!(out, Outcome::Done(TenantOutcome::Migrated { .. })), "{out:?}");

    let after = outside(&db, &a.name, &b.name).await;
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(x, y, "a migration of A changed something outside A");
    }
    // No table appeared anywhere but in A.
    let strays: Vec<String> = sqlx::query_scalar(
        "SELECT format('%s.%s', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname IN ('pwned', 't_as_ops', 'fine') AND n.nspname <> $1",
    )
    .bind(a.name.schema())
    .fetch_all(&mut db.superuser().await)
    .await
    .unwrap();
    assert!(strays.is_empty(), "{strays:?}");
}

/// Objects a migration plants for whoever reads or writes its version
/// table: functions (invoker and definer), a trigger and an RLS policy on
/// it, then a view in its place. Each call records who ran it, and as the
/// admin it would write `tenancy.canary`, take B's owner for A's, and make
/// A's ops login a CREATEROLE.
fn traps(a: &TenantName, b: &TenantName) -> Vec<Migration> {
    let body = format!(
        "BEGIN
           BEGIN INSERT INTO {a_s}.calls VALUES (tag, current_user, session_user); EXCEPTION WHEN others THEN NULL; END;
           BEGIN INSERT INTO tenancy.canary VALUES (tag, session_user); EXCEPTION WHEN others THEN NULL; END;
           BEGIN EXECUTE 'GRANT {bo} TO {ao}'; EXCEPTION WHEN others THEN NULL; END;
           BEGIN EXECUTE 'ALTER ROLE {aops} CREATEROLE'; EXCEPTION WHEN others THEN NULL; END;
           RETURN true;
         END",
        a_s = a.schema(),
        bo = b.owner_role(),
        ao = a.owner_role(),
        aops = a.ops_role()
    );
    let plant = format!(
        "CREATE FUNCTION evil_inv(tag text) RETURNS boolean LANGUAGE plpgsql AS $f${body}$f$;
         CREATE FUNCTION evil_def(tag text) RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER AS $f${body}$f$;
         CREATE FUNCTION evil_trg() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN PERFORM evil_inv('trigger'); PERFORM evil_def('trigger-definer'); RETURN NEW; END $f$;
         CREATE TRIGGER evil_trg BEFORE INSERT OR UPDATE OR DELETE ON _tenancy_migrations FOR EACH ROW EXECUTE FUNCTION evil_trg();
         ALTER TABLE _tenancy_migrations ENABLE ROW LEVEL SECURITY;
         ALTER TABLE _tenancy_migrations FORCE ROW LEVEL SECURITY;
         CREATE POLICY evil_pol ON _tenancy_migrations USING (evil_inv('policy') AND evil_def('policy-definer'));"
    );
    let view = "ALTER TABLE _tenancy_migrations RENAME TO real_versions;
                CREATE VIEW _tenancy_migrations AS SELECT * FROM real_versions WHERE evil_inv('view') AND evil_def('view-definer');";
    vec![
        Migration {
            version: 1,
            name: "base".into(),
            sql: "CREATE TABLE items (id int PRIMARY KEY)".into(),
            transactional: true,
        },
        Migration {
            version: 2,
            name: "plant".into(),
            sql: plant,
            transactional: true,
        },
        Migration {
            version: 3,
            name: "view".into(),
            sql: view.into(),
            transactional: true,
        },
    ]
}

#[tokio::test]
async fn objects_a_migration_plants_never_run_as_the_admin() {
    let (db, mut a, b) = world("esc_traps").await;
    let before = outside(&db, &a.name, &b.name).await;
    let mut migrations = traps(&a.name, &b.name);
    let followers = vec![a.name.clone()];
    let keys = ring();
    let mut generation = 1;
    // The rollout, twice (the second pass finds A up to date and re-reads).
    for _ in 0..2 {
        let p = pass(
            &db.admin,
            &keys,
            "traps",
            generation,
            &spec(migrations.clone()),
            &followers,
            &Timeouts::default(),
        )
        .await
        .unwrap();
        for (t, o) in &p.report.results {
            assert!(matches!(o, Outcome::Done(TenantOutcome::Migrated { .. })), "{t}: {o:?}");
        }
    }
    // A new version goes through the planted view, trigger and policy.
    migrations.push(Migration {
        version: 4,
        name: "more".into(),
        sql: "CREATE TABLE more_items (id int)".into(),
        transactional: false,
    });
    generation += 1;
    let p = pass(
        &db.admin,
        &keys,
        "traps",
        generation,
        &spec(migrations.clone()),
        &followers,
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(
            &p.report.results[0].1,
            Outcome::Done(TenantOutcome::Migrated { to: 4, .. })
        ),
        "{:?}",
        p.report.results
    );
    // A Tenant reconcile (its Postgres half: catalog, DDL, audit, the
    // migrations step) and every status read.
    a.converge(&db).await.expect("reconcile");
    let set = set_object("traps", generation, spec(migrations.clone()));
    let (cond, version) =
        tenant_migrations::converge_pg(&db.admin, &keys, &a.name, "traps", Some(&set), &Timeouts::default())
            .await
            .unwrap();
    assert_eq!((cond.status, version), (true, 4), "{}", cond.message);
    assert_eq!(pg::migrations::observe(&db.admin, &a.name).await.unwrap().current(), 4);
    pg::migrations::failures_of_set(&db.admin, "traps").await.unwrap();
    pg::migrations::failure_of(&db.admin, &a.name).await.unwrap();
    pg::tenant::observe(&db.admin, &a.name).await.unwrap();

    let mut su = db.superuser().await;
    let calls: Vec<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT tag, usr, sess FROM {}.calls ORDER BY 1, 2, 3",
        a.name.schema()
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert!(
        calls
            .iter()
            .any(|(tag, _, sess)| tag == "view" && *sess == a.name.ops_role()),
        "the traps never fired (the test proves nothing): {calls:?}"
    );
    assert!(calls.iter().any(|(tag, _, _)| tag == "trigger"), "{calls:?}");
    assert!(calls.iter().any(|(tag, _, _)| tag == "policy"), "{calls:?}");
    for (tag, usr, sess) in &calls {
        assert!(
            usr != ADMIN && sess != ADMIN,
            "{tag} ran as {usr} in a session of {sess}"
        );
        assert_eq!(sess, &a.name.ops_role(), "{tag} ran in a session of {sess}");
    }
    let after = outside(&db, &a.name, &b.name).await;
    for (x, y) in before.iter().zip(&after) {
        assert_eq!(x, y, "a planted object changed something outside A");
    }
}

#[tokio::test]
async fn a_session_that_ran_a_migration_never_comes_back_to_an_admin_pool() {
    let (db, a, _b) = world("esc_pool").await;
    let admin_defaults: Vec<(String, String, String, String, String)> = settings_of(&db.admin, 4).await;
    // The migration changes its session every way it can and records its
    // backend: a session-level SET (non-transactional) and, in the
    // transactional one, settings that would outlive a COMMIT.
    let migrations = vec![
        Migration { version: 1, name: "pids".into(), sql: "CREATE TABLE pids (pid int, sess text)".into(), transactional: true },
        Migration {
            version: 2,
            name: "dirty".into(),
            sql: format!(
                "SET search_path TO pg_catalog; SET jit = off; SET work_mem = '7777kB'; SET application_name = 'pwned'; SET ROLE {}; INSERT INTO {}.pids SELECT pg_backend_pid(), session_user",
                a.name.owner_role(),
                a.name.schema()
            ),
            transactional: false,
        },
        Migration {
            version: 3,
            name: "dirty-tx".into(),
            sql: format!(
                "COMMIT; SET ROLE {}; SET search_path TO pg_catalog; SET work_mem = '6666kB'; SET application_name = 'pwned-tx'; BEGIN; INSERT INTO {}.pids SELECT pg_backend_pid(), session_user",
                a.name.owner_role(),
                a.name.schema()
            ),
            transactional: true,
        },
    ];
    // The rollout pass, then the Tenant reconcile's step on a one-connection
    // admin pool (a session handed back would be the next one used).
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let one_before = settings_of(&one, 1).await;
    let p = pass(
        &db.admin,
        &ring(),
        "dirty",
        1,
        &spec(migrations[..2].to_vec()),
        std::slice::from_ref(&a.name),
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert!(
        matches!(
            &p.report.results[0].1,
            Outcome::Done(TenantOutcome::Migrated { to: 2, .. })
        ),
        "{:?}",
        p.report.results
    );
    // The third through one run on the one-connection pool (its login,
    // lock and records), then the Tenant reconcile's step on it.
    let login = pg::migrations::ops_login(&one, &ring(), &a.name)
        .await
        .unwrap()
        .expect("registered");
    let all: Vec<pg::migrations::MigrationSql> = migrations
        .iter()
        .map(|m| pg::migrations::MigrationSql::new(m.version, &m.name, &m.sql, m.transactional))
        .collect();
    let out = pg::migrations::migrate_tenant(
        &one,
        &login,
        &pg::migrations::SetRef {
            name: "dirty".into(),
            generation: 2,
        },
        &all,
        &Timeouts::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        TenantOutcome::Migrated {
            from: 2,
            to: 3,
            applied: vec![3]
        }
    );
    let set = set_object("dirty", 2, spec(migrations.clone()));
    let (cond, _) = tenant_migrations::converge_pg(&one, &ring(), &a.name, "dirty", Some(&set), &Timeouts::default())
        .await
        .unwrap();
    assert!(cond.status, "{}", cond.message);

    let mut su = db.superuser().await;
    let pids: Vec<(i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT pid, sess FROM {}.pids",
        a.name.schema()
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert_eq!(pids.len(), 2, "{pids:?}");
    for (_, sess) in &pids {
        assert_eq!(sess, &a.name.ops_role(), "a migration ran in a session of {sess}");
    }
    // The admin pools' sessions are as before, and none of them is one
    // that ran the migrations.
    assert_eq!(settings_of(&db.admin, 4).await, admin_defaults);
    assert_eq!(settings_of(&one, 1).await, one_before);
    for pool in [&db.admin, &one] {
        let admin_pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE usename = $1")
            .bind(ADMIN)
            .fetch_all(pool)
            .await
            .unwrap();
        for (pid, _) in &pids {
            assert!(
                !admin_pids.contains(pid),
                "backend {pid} that ran a migration is an admin session now"
            );
        }
    }
    // And the migrations' backends are gone.
    let start = Instant::now();
    loop {
        let alive: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
            .bind(pids.iter().map(|(p, _)| *p).collect::<Vec<_>>())
            .fetch_one(&mut su)
            .await
            .unwrap();
        if alive == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a session that ran a migration is still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each of `n` sessions of `pool` (held at once): user, search_path, jit,
/// work_mem, application_name.
async fn settings_of(pool: &PgPool, n: usize) -> Vec<(String, String, String, String, String)> {
    let mut conns = Vec::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = pool.acquire().await.unwrap();
        let row: (String, String, String, String, String) = sqlx::query_as(
            "SELECT current_user::text || '/' || session_user::text, current_setting('search_path'), current_setting('jit'), current_setting('work_mem'), current_setting('application_name') || '/' || current_setting('statement_timeout')",
        )
        .fetch_one(&mut *c)
        .await
        .unwrap();
        out.push(row);
        conns.push(c);
    }
    out.sort();
    out
}

/// sqlx's migrator lock key for a database: `0x3d32ad9e * crc32(name)`
/// (CRC-32/ISO-HDLC), as in sqlx-postgres.
fn sqlx_lock_key(db: &str) -> i64 {
    let mut crc: u32 = 0xffff_ffff;
    for byte in db.bytes() {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32ad9e * (!crc as i64)
}

#[tokio::test]
async fn advisory_locks_a_tenant_holds_delay_nothing_of_the_operators() {
    let db = setup("esc_locks").await;
    let mut a = Tenant::new(&unique("lock-a"));
    let mut b = Tenant::new(&unique("lock-b"));
    a.converge(&db).await.unwrap();
    b.converge(&db).await.unwrap();
    let v1 = vec![Migration {
        version: 1,
        name: "v1".into(),
        sql: "CREATE TABLE items (id int)".into(),
        transactional: true,
    }];
    pass(
        &db.admin,
        &ring(),
        "default",
        1,
        &spec(v1.clone()),
        &[a.name.clone(), b.name.clone()],
        &Timeouts::default(),
    )
    .await
    .unwrap();
    // Every key the operator used to lock on, held by A's app role in its
    // own session: the per-tenant migration and restore keys of both
    // tenants, the control schema's start-up key, sqlx's migrator key.
    let keys = |schema: &str| {
        format!("SELECT pg_advisory_lock(1952804449, hashtext('{schema}')), pg_advisory_lock(1952804466, hashtext('{schema}')), pg_advisory_lock_shared(1952804466, hashtext('{schema}'))")
    };
    let all = format!(
        "{}; {}; SELECT pg_advisory_lock(8387231245790312753); SELECT pg_advisory_lock({})",
        keys(&a.name.schema()),
        keys(&b.name.schema()),
        sqlx_lock_key(&db.name)
    );
    let mut app = a.app(&db).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(all.clone()))
        .execute(&mut app)
        .await
        .expect("the app role takes every advisory key");
    // And A's owner, in a migration that holds them while it runs (the
    // second tenant of the pass is B).
    let hold = Migration {
        version: 2,
        name: "hold".into(),
        sql: format!(
            "{}; SELECT pg_sleep(3)",
            all.replace("pg_advisory_lock", "pg_try_advisory_lock")
        ),
        transactional: false,
    };
    let mut v2 = v1.clone();
    v2.push(hold);
    let slow_a = {
        let (pool, name) = (db.admin.clone(), a.name.clone());
        let spec_a = spec(v2);
        tokio::spawn(async move { pass(&pool, &ring(), "slow", 2, &spec_a, &[name], &Timeouts::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = Instant::now();
    let other = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&db.admin_url)
        .await
        .unwrap();
    let bounded = tokio::time::timeout(Duration::from_secs(5), async {
        // A second replica starting.
        pg::migrate_control_schema(&other)
            .await
            .expect("control schema from a second replica");
        // A rollout of B.
        let mut v2b = v1.clone();
        v2b.push(Migration {
            version: 2,
            name: "v2".into(),
            sql: "ALTER TABLE items ADD COLUMN n int".into(),
            transactional: true,
        });
        let p = pass(
            &other,
            &ring(),
            "default",
            2,
            &spec(v2b.clone()),
            std::slice::from_ref(&b.name),
            &Timeouts::default(),
        )
        .await
        .unwrap();
        assert!(
            matches!(
                &p.report.results[0].1,
                Outcome::Done(TenantOutcome::Migrated { to: 2, .. })
            ),
            "{:?}",
            p.report.results
        );
        // A Tenant reconcile of each, with its migrations step.
        a.converge(&db).await.expect("reconcile a");
        b.converge(&db).await.expect("reconcile b");
        let set = set_object("default", 2, spec(v2b));
        let (cond, _) =
            tenant_migrations::converge_pg(&other, &ring(), &b.name, "default", Some(&set), &Timeouts::default())
                .await
                .unwrap();
        assert!(cond.status, "{}", cond.message);
    })
    .await;
    assert!(bounded.is_ok(), "the operator was stalled by a tenant's advisory locks");
    println!(
        "rollout, reconciles and a second replica's start-up took {:?} with every advisory key held",
        start.elapsed()
    );
    let p = slow_a.await.unwrap().unwrap();
    assert!(
        matches!(
            &p.report.results[0].1,
            Outcome::Done(TenantOutcome::Migrated { to: 2, .. })
        ),
        "{:?}",
        p.report.results
    );
    drop(app);
}
