//! The per-tenant audit log against a real Postgres (docs/audit.md): write
//! auditing with the actor and request id, tables created later by
//! migrations, append-only rights, the hash chain found broken by `audit
//! verify` after a superuser's edit, pgaudit read logging, export, retention
//! pruning, and a linear chain under concurrent writers.

mod support;

use std::process::Command;

use sqlx::{Connection, PgConnection, Row};
use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::pg;
use tenant_operator::pg::audit::{AuditRecord, ReadAuditing};
use tenant_operator::pg::migrations::{MigrationSql, SetRef, TenantOutcome, Timeouts};

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    db
}

/// A provisioned tenant with a table `docs` (created as its owner, as a
/// migration would) and a reconcile after it, so the table is audited.
async fn tenant_with_docs(db: &TestDb, base: &str) -> Tenant {
    let mut t = Tenant::new(&unique(base));
    t.converge(db).await.unwrap();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner}; CREATE TABLE {schema}.docs (id serial PRIMARY KEY, body text, n int); RESET ROLE;",
        owner = t.name.owner_role(),
        schema = t.name.schema()
    )))
    .execute(&mut su)
    .await
    .expect("create docs as the owner");
    let out = t.converge(db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        ["AuditTable"],
        "the reconcile after a new table should only add its triggers"
    );
    assert_eq!(
        t.converge(db).await.unwrap().statements,
        0,
        "a converged tenant ran audit DDL"
    );
    t
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

#[derive(Debug)]
struct Audit {
    id: i64,
    actor: String,
    given: bool,
    request: Option<String>,
    op: String,
    table: Option<String>,
    pk: Option<serde_json::Value>,
    changed: Option<Vec<String>>,
}

async fn audit_rows(db: &TestDb, t: &Tenant) -> Vec<Audit> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, actor, actor_given, request_id, operation, table_name, row_pk, changed_columns FROM {}._tenancy_audit ORDER BY id",
        t.name.schema()
    )))
    .fetch_all(&db.su)
    .await
    .unwrap();
    rows.iter()
        .map(|r| Audit {
            id: r.get("id"),
            actor: r.get("actor"),
            given: r.get("actor_given"),
            request: r.get("request_id"),
            op: r.get("operation"),
            table: r.get("table_name"),
            pk: r.get("row_pk"),
            changed: r.get("changed_columns"),
        })
        .collect()
}

/// The ids of the tenant's audit log, in order.
async fn audit_ids(db: &TestDb, t: &Tenant) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id FROM {}._tenancy_audit ORDER BY id",
        t.name.schema()
    )))
    .fetch_all(&db.su)
    .await
    .unwrap()
}

fn cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tenant-operator"))
        .args(args)
        .env("DATABASE_URL", &db.admin_url)
        .env("ROOT_KEYS_FILE", support::test_ring_file())
        .output()
        .expect("run tenant-operator")
}

async fn verified(db: &TestDb, t: &Tenant) -> pg::audit::VerifyReport {
    let r = pg::audit::verify(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap();
    assert_eq!(r.first_break, None, "the chain of {} is broken", t.name);
    r
}

#[tokio::test]
async fn insert_update_and_delete_are_audited_with_the_actor_and_request_id() {
    let db = setup("aud_writes").await;
    let t = tenant_with_docs(&db, "aw").await;
    let mut app = t.app(&db).await.unwrap();
    sqlx::raw_sql("SET tenancy.actor = 'alice'; SET tenancy.request_id = 'req-1'")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("INSERT INTO docs (body, n) VALUES ('a', 1), ('b', 2)")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("UPDATE docs SET body = 'a2' WHERE id = 1")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("DELETE FROM docs WHERE id = 2")
        .execute(&mut app)
        .await
        .unwrap();
    // Per request, in a transaction: SET LOCAL.
    sqlx::raw_sql("BEGIN; SET LOCAL tenancy.actor = 'bob'; SET LOCAL tenancy.request_id = 'req-2'; INSERT INTO docs (body) VALUES ('c'); COMMIT")
        .execute(&mut app)
        .await
        .unwrap();
    // No actor given: the session user, flagged.
    let mut bare = t.app(&db).await.unwrap();
    sqlx::query("UPDATE docs SET n = 7, body = 'z' WHERE id = 1")
        .execute(&mut bare)
        .await
        .unwrap();

    let rows = audit_rows(&db, &t).await;
    let summary: Vec<(&str, &str, bool, Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.op.as_str(),
                r.actor.as_str(),
                r.given,
                r.request.as_deref(),
                r.table.as_deref(),
            )
        })
        .collect();
    let app_role = t.name.app_role();
    assert_eq!(
        summary,
        [
            // One entry for the two-row INSERT statement.
            ("INSERT", "alice", true, Some("req-1"), Some("docs")),
            ("UPDATE", "alice", true, Some("req-1"), Some("docs")),
            ("DELETE", "alice", true, Some("req-1"), Some("docs")),
            ("INSERT", "bob", true, Some("req-2"), Some("docs")),
            ("UPDATE", app_role.as_str(), false, None, Some("docs")),
        ]
    );
    let pks: Vec<_> = rows.iter().map(|r| r.pk.clone().unwrap()).collect();
    assert_eq!(
        pks[..3],
        [
            serde_json::json!([{"id": 1}, {"id": 2}]),
            serde_json::json!([{"id": 1}]),
            serde_json::json!([{"id": 2}])
        ]
    );
    assert_eq!(rows[1].changed.as_deref(), Some(&["body".to_string()][..]));
    assert_eq!(
        rows[4].changed.as_deref(),
        Some(&["body".to_string(), "n".to_string()][..])
    );
    assert_eq!(rows[0].changed, None, "an insert has no changed columns");
    // TRUNCATE is one row for the statement.
    sqlx::query("TRUNCATE docs")
        .execute(&mut bare)
        .await
        .expect_err("the app role has no TRUNCATE right");
    let r = verified(&db, &t).await;
    assert_eq!(r.rows, 5);
}

#[tokio::test]
async fn a_large_statement_is_audited_in_bounded_entries_holding_every_key() {
    let db = setup("aud_chunks").await;
    let mut t = tenant_with_docs(&db, "ac").await;
    let mut app = t.app(&db).await.unwrap();
    let rows = 2 * pg::audit::CHUNK_ROWS + 5;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO docs (body, n) SELECT 'b' || g, g FROM generate_series(1, {rows}) g"
    )))
    .execute(&mut app)
    .await
    .unwrap();
    // A statement touching no row leaves no entry.
    sqlx::raw_sql("DELETE FROM docs WHERE false")
        .execute(&mut app)
        .await
        .unwrap();
    let audit = audit_rows(&db, &t).await;
    assert_eq!(audit.len(), 3, "ceil({rows} / {}) entries", pg::audit::CHUNK_ROWS);
    let mut ids = Vec::new();
    for (i, r) in audit.iter().enumerate() {
        assert_eq!(r.op, "INSERT");
        let keys = r.pk.as_ref().and_then(|v| v.as_array()).expect("a JSON array of keys");
        assert_eq!(keys.len(), if i < 2 { pg::audit::CHUNK_ROWS } else { 5 });
        ids.extend(keys.iter().map(|k| k["id"].as_i64().expect("an id")));
    }
    ids.sort_unstable();
    let db_ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT id::bigint FROM {}.docs ORDER BY id",
        t.name.schema()
    )))
    .fetch_all(&db.su)
    .await
    .unwrap();
    assert_eq!(ids, db_ids, "every inserted row's key is in exactly one entry");

    // A table without a primary key: each row counts as a null key.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {}; CREATE TABLE {}.nokey (v int); RESET ROLE",
        t.name.owner_role(),
        t.name.schema()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    t.converge(&db).await.unwrap();
    sqlx::raw_sql("INSERT INTO nokey SELECT g FROM generate_series(1, 3) g")
        .execute(&mut app)
        .await
        .unwrap();
    let last = audit_rows(&db, &t).await.pop().unwrap();
    assert_eq!((last.op.as_str(), last.table.as_deref()), ("INSERT", Some("nokey")));
    assert_eq!(last.pk, Some(serde_json::json!([null, null, null])));
    verified(&db, &t).await;
}

#[tokio::test]
async fn a_table_created_by_a_later_migration_is_audited_without_a_reconcile() {
    let db = setup("aud_mig").await;
    let mut t = Tenant::new(&unique("am"));
    t.converge(&db).await.unwrap();
    let set = SetRef {
        name: "default".into(),
        generation: 1,
    };
    let migrations = [
        MigrationSql::new(
            1,
            "orders",
            "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric)",
            true,
        ),
        MigrationSql::new(
            2,
            "lines",
            "CREATE TABLE lines (order_id bigint, sku text, PRIMARY KEY (order_id, sku))",
            false,
        ),
    ];
    let ring =
        tenant_operator::crypto::Keyring::new([("v1".to_string(), vec![7u8; 32])].into_iter().collect(), "v1").unwrap();
    let login = pg::migrations::ops_login(&db.admin, &ring, &t.name)
        .await
        .unwrap()
        .expect("registered");
    let out = pg::migrations::migrate_tenant(&db.admin, &login, &set, &migrations, &Timeouts::default())
        .await
        .unwrap();
    assert_eq!(
        out,
        TenantOutcome::Migrated {
            from: 0,
            to: 2,
            applied: vec![1, 2]
        }
    );
    let mut app = t.app(&db).await.unwrap();
    sqlx::raw_sql(
        "SET tenancy.actor = 'carol'; INSERT INTO orders VALUES (10, 5.5); INSERT INTO lines VALUES (10, 'sku-1')",
    )
    .execute(&mut app)
    .await
    .unwrap();
    let rows = audit_rows(&db, &t).await;
    let seen: Vec<(Option<&str>, &str, Option<serde_json::Value>)> = rows
        .iter()
        .map(|r| (r.table.as_deref(), r.actor.as_str(), r.pk.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("orders"), "carol", Some(serde_json::json!([{"id": 10}]))),
            (
                Some("lines"),
                "carol",
                Some(serde_json::json!([{"order_id": 10, "sku": "sku-1"}]))
            ),
        ]
    );
    // Their triggers carry the tables' keys, read in the migration's own
    // transaction.
    for (table, key) in [("orders", vec!["id"]), ("lines", vec!["order_id", "sku"])] {
        let idx = key_index(&db, &t, table).await;
        let want: Vec<&str> = [idx.as_str()].into_iter().chain(key).collect();
        assert_eq!(
            trigger_args(&db, &t, table, "_tenancy_audit_ins").await,
            want,
            "{table}"
        );
    }
    // The migrations left nothing for the reconcile to do.
    let again = t.converge(&db).await.unwrap();
    assert_eq!(
        again.statements, 0,
        "audit actions after the migration: {:?}",
        again.audit.actions
    );
    verified(&db, &t).await;
}

#[tokio::test]
async fn the_app_role_cannot_change_delete_truncate_or_forge_audit_rows() {
    let db = setup("aud_ro").await;
    let t = tenant_with_docs(&db, "ar").await;
    let write_fn = pg::audit::AuditFns::of(&t.name).write;
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('x')")
        .execute(&mut app)
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _tenancy_audit")
        .fetch_one(&mut app)
        .await
        .expect("the app may read its audit log");
    assert_eq!(n, 1);
    let forge = format!("SELECT {write_fn}('INSERT', 'docs', ARRAY['{{}}'::jsonb], NULL)");
    for sql in [
        "UPDATE _tenancy_audit SET actor = 'mallory'",
        "DELETE FROM _tenancy_audit",
        "TRUNCATE _tenancy_audit",
        "INSERT INTO _tenancy_audit (\"time\", actor, actor_given, operation, prev_hash, hash) VALUES (now(), 'x', true, 'INSERT', '\\x00', '\\x00')",
        "UPDATE _tenancy_audit_head SET hash = '\\x00'",
        "SELECT * FROM _tenancy_audit_head",
        forge.as_str(),
        "SELECT setval('_tenancy_audit_id_seq', 1)",
        "DROP TRIGGER _tenancy_audit_ins ON docs",
        "ALTER TABLE docs DISABLE TRIGGER ALL",
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut app).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    // Second line: even with rights (the owner, or a grant by mistake) the
    // guard trigger refuses changes.
    let mut su = db.superuser().await;
    let schema = t.name.schema();
    for sql in [
        format!("UPDATE {schema}._tenancy_audit SET actor = 'm'"),
        format!("DELETE FROM {schema}._tenancy_audit"),
        format!("TRUNCATE {schema}._tenancy_audit"),
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut su)
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    verified(&db, &t).await;
}

#[tokio::test]
async fn a_superuser_edit_or_removal_is_found_by_audit_verify() {
    let db = setup("aud_verify").await;
    let t = tenant_with_docs(&db, "av").await;
    let mut app = t.app(&db).await.unwrap();
    for i in 0..5 {
        sqlx::query("INSERT INTO docs (body) VALUES ($1)")
            .bind(format!("row {i}"))
            .execute(&mut app)
            .await
            .unwrap();
    }
    let ok = cli(&db, &["audit", "verify", "--tenant", t.name.as_str()]);
    assert!(
        ok.status.success(),
        "verify of an intact chain failed: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).starts_with("ok: 5 row(s)"),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let schema = t.name.schema();
    let ids = audit_ids(&db, &t).await;
    let mut su = db.superuser().await;
    // A superuser can get past the guard (replica mode skips triggers)...
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica; UPDATE {schema}._tenancy_audit SET actor = 'someone-else' WHERE id = {}; RESET session_replication_role",
        ids[2]
    )))
    .execute(&mut su)
    .await
    .unwrap();
    // ...but not past the chain.
    let out = cli(&db, &["audit", "verify", "--tenant", t.name.as_str()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "verify passed an edited chain: {stdout}");
    assert!(stdout.contains(&format!("BROKEN at row {}", ids[2])), "{stdout}");
    assert!(stdout.contains("edited"), "{stdout}");

    // Deleting the edited row instead: the next row's link is broken.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica; DELETE FROM {schema}._tenancy_audit WHERE id = {}; RESET session_replication_role",
        ids[2]
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let r = pg::audit::verify(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap();
    let b = r.first_break.expect("a removed row breaks the chain");
    assert_eq!(b.id, ids[3], "{}", b.what);
    // Removing the entries of the very last transaction (two statements,
    // two entries) is found through the head, which the commit moved to
    // the last entry.
    let t2 = tenant_with_docs(&db, "av2").await;
    let mut app2 = t2.app(&db).await.unwrap();
    for body in ["1", "2"] {
        sqlx::query("INSERT INTO docs (body) VALUES ($1)")
            .bind(body)
            .execute(&mut app2)
            .await
            .unwrap();
    }
    sqlx::raw_sql("BEGIN; INSERT INTO docs (body) VALUES ('3'); UPDATE docs SET body = '3b' WHERE body = '3'; COMMIT")
        .execute(&mut app2)
        .await
        .unwrap();
    let s2 = t2.name.schema();
    let (head_id, last_id): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT h.last_id, (SELECT max(id) FROM {s2}._tenancy_audit) FROM {s2}._tenancy_audit_head h"
    )))
    .fetch_one(&db.su)
    .await
    .unwrap();
    assert_eq!(head_id, last_id, "the commit moves the head to the last entry");
    verified(&db, &t2).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica; DELETE FROM {s2}._tenancy_audit WHERE id > {} ; RESET session_replication_role",
        last_id - 2
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let b = pg::audit::verify(&db.admin, &support::test_ring(), &t2.name)
        .await
        .unwrap()
        .first_break
        .expect("a removed tail breaks the chain");
    assert!(b.what.contains("rows at the end"), "{}", b.what);

    // An entry appended behind the triggers' back (replica mode: no
    // commit-time head update) is found as well.
    let t3 = tenant_with_docs(&db, "av3").await;
    let mut app3 = t3.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('x')")
        .execute(&mut app3)
        .await
        .unwrap();
    let s3 = t3.name.schema();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica;
         INSERT INTO {s3}._tenancy_audit (\"time\", actor, actor_given, operation, table_name, prev_hash, hash)
           SELECT now(), 'forger', true, 'INSERT', 'docs', hash, hash FROM {s3}._tenancy_audit ORDER BY id DESC LIMIT 1;
         RESET session_replication_role"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    assert!(
        pg::audit::verify(&db.admin, &support::test_ring(), &t3.name)
            .await
            .unwrap()
            .first_break
            .is_some(),
        "a forged entry verified"
    );
}

fn pgaudit_required() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[tokio::test]
async fn pgaudit_logs_a_select_by_the_app_role_with_its_role_name() {
    let db = setup("aud_pgaudit").await;
    let loaded: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log')")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    if !loaded {
        assert!(!pgaudit_required(), "CI is set but pgaudit is not loaded: scripts/setup.sh installs postgresql-<major>-pgaudit and scripts/with-postgres.sh loads it");
        eprintln!("SKIPPED: pgaudit is not loaded on this server (run scripts/setup.sh)");
        let mut t = Tenant::new(&unique("pga"));
        assert_eq!(
            t.converge(&db).await.unwrap().audit.read_auditing,
            ReadAuditing::NotInstalled
        );
        return;
    }
    let mut t = tenant_with_docs(&db, "pga").await;
    // The operator's admin is no superuser: read auditing degrades with a reason.
    let out = t.converge(&db).await.unwrap();
    assert_eq!(out.audit.read_auditing.reason(), "PgauditNeedsSuperuser");
    assert!(
        out.audit.read_auditing.message().contains(&t.name.app_role()),
        "{}",
        out.audit.read_auditing.message()
    );
    // An administrator grants it once, as a superuser.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER ROLE {} SET pgaudit.log = 'read, write'",
        t.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    assert_eq!(out.audit.read_auditing, ReadAuditing::On);
    assert_eq!(out.statements, 0);

    let marker = format!("marker_{:08x}", rand::random::<u32>());
    let mut app = t.app(&db).await.unwrap();
    let _: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT body FROM docs WHERE body = '{marker}'"
    )))
    .fetch_all(&mut app)
    .await
    .unwrap();
    let log = support::env("TEST_PG_LOG");
    let role = t.name.app_role();
    let mut found = None;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        found = text
            .lines()
            .find(|l| l.contains("AUDIT: SESSION") && l.contains(&marker))
            .map(str::to_owned);
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let line = found.unwrap_or_else(|| panic!("no pgaudit line for the app role's SELECT ({marker}) in {log}"));
    assert!(
        line.contains(&format!("{role}@")),
        "the pgaudit line does not carry the role name (log_line_prefix %u): {line}"
    );
    assert!(line.contains("READ,SELECT"), "{line}");
}

#[tokio::test]
async fn the_operator_sets_pgaudit_log_when_granted_the_parameter() {
    let (db, admin_role, admin_url) = TestDb::with_own_admin("aud_grant").await;
    let loaded: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log')")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    if !loaded {
        assert!(!pgaudit_required(), "CI is set but pgaudit is not loaded");
        eprintln!("SKIPPED: pgaudit is not loaded on this server");
        return;
    }
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT SET ON PARAMETER pgaudit.log TO {admin_role}"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await
        .unwrap();
    pg::migrate_control_schema(&pool).await.unwrap();
    let t = Tenant::new(&unique("pgg"));
    let desired = tenant_operator::controller::tenant::plan::desired_db(&t.name, &t.spec).unwrap();
    let catalog = pg::tenant::observe(&pool, &t.name).await.unwrap();
    let out = tenant_operator::controller::tenant::converge_db(
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
    .unwrap();
    assert_eq!(out.audit.read_auditing, ReadAuditing::On);
    assert!(
        out.audit.actions.iter().any(|a| a.label() == "SetPgauditLog"),
        "{:?}",
        out.audit.actions
    );
    let setting: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(setconfig) FROM pg_db_role_setting WHERE setrole = (SELECT oid FROM pg_roles WHERE rolname = $1)",
    )
    .bind(t.name.app_role())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(setting.contains(&"pgaudit.log=read, write".to_string()), "{setting:?}");
    let catalog = pg::tenant::observe(&pool, &t.name).await.unwrap();
    let again = tenant_operator::controller::tenant::converge_db(
        &pool,
        &support::test_ring(),
        &t.name,
        &t.uid,
        &desired,
        &catalog,
        Some(&out.plan.password),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        again.statements, 0,
        "{:?} {:?}",
        again.plan.actions, again.audit.actions
    );
    // Cleanup: the roles are cluster-wide.
    pg::tenant::drop_tenant(&pool, &t.name, &t.uid, "test").await.unwrap();
}

#[tokio::test]
async fn export_round_trips_as_json_lines() {
    let db = setup("aud_export").await;
    let t = tenant_with_docs(&db, "ae").await;
    let mut app = t.app(&db).await.unwrap();
    sqlx::raw_sql("SET tenancy.actor = 'dave'; SET tenancy.request_id = 'r\"quoted'; INSERT INTO docs (body) VALUES ('1'), ('2'); UPDATE docs SET body = 'x'")
        .execute(&mut app)
        .await
        .unwrap();
    let mid: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    sqlx::raw_sql("DELETE FROM docs").execute(&mut app).await.unwrap();

    let out = cli(
        &db,
        &[
            "audit",
            "export",
            "--tenant",
            t.name.as_str(),
            "--since",
            "2000-01-01T00:00:00Z",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<AuditRecord> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, actor, request_id, operation, encode(prev_hash, 'hex') AS prev, encode(hash, 'hex') AS hash, row_pk FROM {}._tenancy_audit ORDER BY id",
        t.name.schema()
    )))
    .fetch_all(&db.su)
    .await
    .unwrap();
    assert_eq!(records.len(), rows.len());
    // INSERT, UPDATE and DELETE of 2 rows each: one entry per statement.
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].operation, "UPDATE");
    assert_eq!(
        records[1].row_pk.as_ref().and_then(|k| k.as_array()).map(Vec::len),
        Some(2),
        "both keys in the UPDATE entry"
    );
    for (rec, row) in records.iter().zip(&rows) {
        assert_eq!(rec.id, row.get::<i64, _>("id"));
        assert_eq!(rec.hash, row.get::<String, _>("hash"));
        assert_eq!(rec.prev_hash, row.get::<String, _>("prev"));
        assert_eq!(rec.actor, row.get::<String, _>("actor"));
        assert_eq!(rec.request_id, row.get::<Option<String>, _>("request_id"));
        assert_eq!(rec.operation, row.get::<String, _>("operation"));
        assert_eq!(rec.row_pk, row.get::<Option<serde_json::Value>, _>("row_pk"));
        assert_eq!(rec.tenant, t.name.as_str());
        assert_eq!(rec.table.as_deref(), Some("docs"));
    }
    // The lines chain: each prev_hash is the line before's hash.
    for w in records.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
    }
    let later = cli(
        &db,
        &[
            "audit",
            "export",
            "--tenant",
            t.name.as_str(),
            "--since",
            &mid.to_rfc3339(),
        ],
    );
    let later: Vec<AuditRecord> = String::from_utf8(later.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        later.iter().map(|r| r.operation.as_str()).collect::<Vec<_>>(),
        ["DELETE"]
    );
    assert_eq!(later, records[2..]);
}

#[tokio::test]
async fn retention_pruning_leaves_a_verifiable_chain() {
    let db = setup("aud_prune").await;
    let mut t = tenant_with_docs(&db, "ap").await;
    let mut app = t.app(&db).await.unwrap();
    for i in 0..4 {
        sqlx::query("INSERT INTO docs (body) VALUES ($1)")
            .bind(i.to_string())
            .execute(&mut app)
            .await
            .unwrap();
    }
    let cut: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    for i in 0..3 {
        sqlx::query("UPDATE docs SET body = $1 WHERE id = 1")
            .bind(format!("u{i}"))
            .execute(&mut app)
            .await
            .unwrap();
    }
    let before = audit_rows(&db, &t).await;
    let p = pg::audit::prune(&db.admin, &support::test_ring(), &t.name, cut, "test")
        .await
        .unwrap();
    assert_eq!(p.deleted, 4);
    assert_eq!(p.anchor, Some(before[3].id));
    let r = verified(&db, &t).await;
    assert_eq!(r.anchor, Some(before[3].id));
    assert_eq!(r.rows, 1 + 3 + 1, "anchor, the 3 updates, the PRUNE record");
    let after = audit_rows(&db, &t).await;
    assert_eq!(after.first().map(|a| a.op.as_str()), Some("ANCHOR"));
    assert_eq!(
        after.last().map(|a| (a.op.as_str(), a.actor.as_str())),
        Some(("PRUNE", "test"))
    );
    // Writes go on after the prune, and a second prune cuts again.
    sqlx::query("DELETE FROM docs WHERE id = 4")
        .execute(&mut app)
        .await
        .unwrap();
    let cut2: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.admin)
        .await
        .unwrap();
    sqlx::query("DELETE FROM docs WHERE id = 3")
        .execute(&mut app)
        .await
        .unwrap();
    let p2 = pg::audit::prune(&db.admin, &support::test_ring(), &t.name, cut2, "test")
        .await
        .unwrap();
    assert_eq!(p2.deleted, 6, "old anchor, 3 updates, PRUNE, 1 delete");
    verified(&db, &t).await;

    // A forged anchor (hiding more rows) is not confirmed by the chain.
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica;
         UPDATE {schema}._tenancy_audit SET id = id - 1 WHERE operation = 'ANCHOR';
         RESET session_replication_role"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let b = pg::audit::verify(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap()
        .first_break
        .expect("a moved anchor is found");
    assert!(b.what.contains("ANCHOR"), "{}", b.what);

    // From the reconcile: due once (nothing old enough yet), then not again
    // within a day, so the tenant stays quiet.
    sqlx::query("UPDATE tenancy.audit_heads SET pruned_at = NULL WHERE tenant_uid = $1")
        .bind(&t.uid)
        .execute(&mut su)
        .await
        .unwrap();
    t.spec.audit.retention_days = Some(30);
    let out = t.converge(&db).await.unwrap();
    assert_eq!(out.audit.pruned, Some(0));
    let out = t.converge(&db).await.unwrap();
    assert_eq!(out.audit.pruned, None);
    assert_eq!(out.statements, 0);
}

#[tokio::test]
async fn concurrent_writers_keep_one_linear_chain() {
    let db = setup("aud_conc").await;
    let t = tenant_with_docs(&db, "ac").await;
    let mut tasks = Vec::new();
    for w in 0..6 {
        let mut conn = t.app(&db).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut retries = 0;
            while done < 15 {
                // Every other writer in REPEATABLE READ: its entries wait
                // for a READ COMMITTED commit (or the operator) to seal them;
                // the chain never forks and, the writers' rows being their
                // own, nothing of the audit log makes one retry (until
                // 2026-12-03 the head's lock gave them serialization
                // failures).
                let iso = if w % 2 == 0 { "READ COMMITTED" } else { "REPEATABLE READ" };
                let sql = format!(
                    "BEGIN ISOLATION LEVEL {iso}; SET LOCAL tenancy.actor = 'w{w}'; INSERT INTO docs (body, n) VALUES ('w{w}', {done}); UPDATE docs SET n = n + 1 WHERE body = 'w{w}'; COMMIT"
                );
                match sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await {
                    Ok(_) => done += 1,
                    Err(e) if ["40001", "40P01"].contains(&sqlstate(&e).as_str()) => {
                        retries += 1;
                        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut conn).await;
                    }
                    Err(e) => panic!("writer {w}: {e}"),
                }
            }
            retries
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 0, "a writer had to retry");
    }
    let r = verified(&db, &t).await;
    // Each transaction: 1 insert entry, 1 update entry (one per statement,
    // holding the keys of its writer's rows, 1..=15).
    let expected: u64 = 6 * (15 + 15);
    assert_eq!(r.rows, expected);
    let mut c = PgConnection::connect(&db.superuser_url).await.unwrap();
    let gaps: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM (SELECT prev_hash, lag(hash) OVER (ORDER BY id) AS before FROM {}._tenancy_audit) x WHERE before IS NOT NULL AND prev_hash <> before",
        t.name.schema()
    )))
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(gaps, 0);
}

/// Runs `sql` (one or more statements) on `conn`; panics with the error.
async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The number of entries waiting in the tenant's pending table.
async fn pending(db: &TestDb, t: &Tenant) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}._tenancy_audit_pending",
        t.name.schema()
    )))
    .fetch_one(&db.su)
    .await
    .unwrap()
}

/// A tenant's writers do not wait for one another: a transaction with an
/// audited write still open holds up no other writer of the tenant (until
/// 2026-12-03 the chain head's row lock, taken at a transaction's first
/// append, did until its commit). Each commit seals what it can see; the
/// open transaction's entry is sealed at its own commit, after the other's.
#[tokio::test]
async fn a_tenants_writers_do_not_wait_for_one_anothers_commit() {
    let db = setup("aud_nowait").await;
    let t = tenant_with_docs(&db, "nw").await;
    let mut first = t.app(&db).await.unwrap();
    let mut second = t.app(&db).await.unwrap();
    exec(
        &mut first,
        "BEGIN; SET LOCAL tenancy.actor = 'first'; INSERT INTO docs (body) VALUES ('first')",
    )
    .await;
    let write = sqlx::raw_sql(
        "BEGIN; SET LOCAL tenancy.actor = 'second'; INSERT INTO docs (body) VALUES ('second'); UPDATE docs SET n = 1; COMMIT",
    )
    .execute(&mut second);
    tokio::time::timeout(std::time::Duration::from_secs(5), write)
        .await
        .expect("the second writer waited for the first one's commit")
        .unwrap();
    let actors = |rows: Vec<Audit>| rows.into_iter().map(|a| (a.actor, a.op)).collect::<Vec<_>>();
    assert_eq!(
        actors(audit_rows(&db, &t).await),
        [
            ("second".to_owned(), "INSERT".to_owned()),
            ("second".into(), "UPDATE".into())
        ],
        "the second commit sealed its own entries"
    );
    // The open transaction's entry waits in the pending table, invisible
    // to others until it commits, and is sealed by that commit.
    exec(&mut first, "COMMIT").await;
    assert_eq!(pending(&db, &t).await, 0);
    assert_eq!(
        actors(audit_rows(&db, &t).await).last().unwrap(),
        &("first".to_owned(), "INSERT".to_owned())
    );
    assert_eq!(verified(&db, &t).await.rows, 3);
}

/// What no commit sealed: a commit whose seal found another one under way
/// (here the operator holding the head), and a REPEATABLE READ writer's
/// (its snapshot may predate the last seal). The entries wait in the
/// pending table, out of the chain; the operator's pass finds the tenant
/// by the statistics and seals them, and `audit verify` seals before it
/// walks. The app role cannot seal, read or clear the pending entries.
#[tokio::test]
async fn entries_no_commit_sealed_are_sealed_by_the_operators_pass_and_by_verify() {
    let db = setup("aud_pending").await;
    let t = tenant_with_docs(&db, "pe").await;
    let other = tenant_with_docs(&db, "pe-quiet").await;
    let schema = t.name.schema();
    let ring = support::test_ring();
    // A seal under way elsewhere: the head's row lock, held.
    let mut holder = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; SELECT 1 FROM {schema}._tenancy_audit_head FOR UPDATE"
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    let mut app = t.app(&db).await.unwrap();
    let write = sqlx::query("INSERT INTO docs (body) VALUES ('while held')").execute(&mut app);
    tokio::time::timeout(std::time::Duration::from_secs(5), write)
        .await
        .expect("a commit waited for a seal under way")
        .unwrap();
    exec(&mut holder, "ROLLBACK").await;
    assert_eq!(pending(&db, &t).await, 1);
    assert!(audit_rows(&db, &t).await.is_empty(), "sealed while the head was held");
    // The app role: no rights on the pending table or the seal function.
    let fns = pg::audit::AuditFns::of(&t.name);
    for sql in [
        "SELECT count(*) FROM _tenancy_audit_pending".to_owned(),
        "DELETE FROM _tenancy_audit_pending".to_owned(),
        "INSERT INTO _tenancy_audit_pending (\"time\", actor, actor_given, operation, seal) VALUES (now(), 'x', true, 'INSERT', true)".to_owned(),
        format!("SELECT {}(true)", fns.seal),
    ] {
        let e = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut app)
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
    }
    // The pass: the statistics name the tenant once the writer's are in
    // (a backend sends them when it ends); the quiet tenant is not visited.
    app.close().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let found = pg::audit::tenants_with_pending(&db.admin).await.unwrap();
        if found.iter().any(|(n, _)| n == t.name.as_str()) {
            assert!(!found.iter().any(|(n, _)| n == other.name.as_str()), "{found:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the statistics never showed the pending entry"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(pg::audit::seal_pending(&db.admin, &ring).await.unwrap(), 1);
    assert_eq!(pending(&db, &t).await, 0);
    assert_eq!(audit_rows(&db, &t).await.len(), 1);
    assert_eq!(verified(&db, &t).await.rows, 1);
    // A REPEATABLE READ writer leaves its entries to the next seal: here
    // `audit verify`'s, which runs first.
    let mut app = t.app(&db).await.unwrap();
    exec(
        &mut app,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; INSERT INTO docs (body) VALUES ('rr'); COMMIT",
    )
    .await;
    assert_eq!(pending(&db, &t).await, 1);
    assert_eq!(verified(&db, &t).await.rows, 2);
    assert_eq!(pending(&db, &t).await, 0);
    // A READ COMMITTED commit seals what waits before its own entries.
    exec(&mut app, "BEGIN ISOLATION LEVEL REPEATABLE READ; INSERT INTO docs (body) VALUES ('rr2'); COMMIT; INSERT INTO docs (body) VALUES ('rc')").await;
    assert_eq!(pending(&db, &t).await, 0);
    // In the chain in the order they were written: the held write, the two
    // REPEATABLE READ ones, the READ COMMITTED one.
    let keys: Vec<String> = audit_rows(&db, &t)
        .await
        .into_iter()
        .map(|a| a.pk.unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=4).map(|i| format!("[{{\"id\":{i}}}]")).collect();
    assert_eq!(keys, expected);
    assert_eq!(verified(&db, &t).await.rows, 4);
}

/// With a seal delay, a transaction that starts within it of the tenant's
/// last seal leaves its entries to a later seal; a value that is not a
/// number counts as no delay; the pass or verify seals what waits.
#[tokio::test]
async fn a_seal_delay_leaves_a_busy_tenants_entries_to_a_later_seal() {
    let db = setup("aud_delay").await;
    let t = tenant_with_docs(&db, "dl").await;
    let mut app = t.app(&db).await.unwrap();
    exec(&mut app, "SET tenancy.audit_seal_delay_ms = 600000").await;
    // No seal yet: the first commit seals.
    exec(&mut app, "INSERT INTO docs (body) VALUES ('a')").await;
    assert_eq!((audit_rows(&db, &t).await.len(), pending(&db, &t).await), (1, 0));
    // Within the delay: left to a later seal, several transactions' worth.
    for body in ["b", "c"] {
        sqlx::query("INSERT INTO docs (body) VALUES ($1)")
            .bind(body)
            .execute(&mut app)
            .await
            .unwrap();
    }
    assert_eq!((audit_rows(&db, &t).await.len(), pending(&db, &t).await), (1, 2));
    // Not a number: no delay; this commit seals what waits, then its own.
    exec(
        &mut app,
        "SET tenancy.audit_seal_delay_ms = '1; DROP TABLE docs'; INSERT INTO docs (body) VALUES ('d')",
    )
    .await;
    assert_eq!((audit_rows(&db, &t).await.len(), pending(&db, &t).await), (4, 0));
    exec(
        &mut app,
        "SET tenancy.audit_seal_delay_ms = 600000; INSERT INTO docs (body) VALUES ('e')",
    )
    .await;
    assert_eq!(pending(&db, &t).await, 1);
    assert_eq!(verified(&db, &t).await.rows, 5);
    // The chain's order is the order of the appends.
    let keys: Vec<String> = audit_rows(&db, &t)
        .await
        .into_iter()
        .map(|a| a.pk.unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..=5).map(|i| format!("[{{\"id\":{i}}}]")).collect();
    assert_eq!(keys, expected);
}

/// The xid (as text) `sql` returns on `conn`.
async fn xid_of(conn: &mut PgConnection, sql: &str) -> u64 {
    let s: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT ({sql})::text")))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    s.parse().unwrap()
}

/// Three counters of this transaction's statistics (`sql`).
async fn scans(conn: &mut PgConnection, sql: &str) -> (i64, i64, i64) {
    sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await
        .unwrap()
}

/// The seal reads the pending entries at or above the last seal's floor:
/// the oldest transaction id running when it sealed. A transaction that
/// appended before other commits sealed and commits after them without
/// sealing itself (REPEATABLE READ) is at or above it, and sealed by the
/// next commit, in the order of transaction ids. A floor beyond the sealing
/// transaction's own id (a head restored from a server further along) is
/// not used: the seal reads everything and sets a floor of this server.
#[tokio::test]
async fn the_seal_reads_from_the_last_seals_floor() {
    let db = setup("aud_floor").await;
    let t = tenant_with_docs(&db, "fl").await;
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    let floor_sql = format!("SELECT seal_floor FROM {schema}._tenancy_audit_head");
    let mut old = t.app(&db).await.unwrap();
    let mut app = t.app(&db).await.unwrap();
    exec(
        &mut old,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL tenancy.actor = 'old'; INSERT INTO docs (body) VALUES ('old')",
    )
    .await;
    let old_xid = xid_of(&mut old, "pg_current_xact_id()").await;
    for body in ["a", "b"] {
        exec(&mut app, &format!("INSERT INTO docs (body) VALUES ('{body}')")).await;
    }
    assert_eq!(audit_rows(&db, &t).await.len(), 2, "the later commits sealed");
    let f = xid_of(&mut su, &floor_sql).await;
    assert!(f <= old_xid, "floor {f} above a running transaction {old_xid}");
    exec(&mut old, "COMMIT").await;
    assert_eq!(pending(&db, &t).await, 1, "a REPEATABLE READ commit does not seal");
    exec(&mut app, "INSERT INTO docs (body) VALUES ('c')").await;
    assert_eq!(pending(&db, &t).await, 0);
    let actors: Vec<String> = audit_rows(&db, &t).await.into_iter().map(|a| a.actor).collect();
    assert_eq!(actors[2..], ["old".to_owned(), t.name.app_role()][..]);
    assert_eq!(verified(&db, &t).await.rows, 4);

    // A floor from elsewhere, far beyond this server's ids.
    exec(
        &mut su,
        &format!("UPDATE {schema}._tenancy_audit_head SET seal_floor = '9000000000000'"),
    )
    .await;
    exec(&mut app, "INSERT INTO docs (body) VALUES ('d')").await;
    assert_eq!(pending(&db, &t).await, 0, "a floor from elsewhere hid the entry");
    let here = xid_of(&mut su, "pg_current_xact_id()").await;
    let f = xid_of(&mut su, &floor_sql).await;
    assert!(f <= here, "{f} > {here}");
    assert_eq!(verified(&db, &t).await.rows, 5);
}

/// The seal reads the pending table through its (xid, pid) index even when
/// the table's statistics make a scan look cheaper (just vacuumed), and
/// reads none of the dead rows earlier seals left, though a snapshot held
/// elsewhere (as a backup's pg_dump holds one, without a transaction id)
/// keeps vacuum from removing them: a scan of the table read every one.
#[tokio::test]
async fn the_seal_reads_the_pending_table_through_its_index_and_not_its_dead_rows() {
    let db = setup("aud_floor_idx").await;
    let t = tenant_with_docs(&db, "fi").await;
    let schema = t.name.schema();
    let fns = pg::audit::AuditFns::of(&t.name);
    let mut su = db.superuser().await;
    let mut holder = db.superuser().await;
    exec(
        &mut holder,
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class",
    )
    .await;
    let mut app = t.app(&db).await.unwrap();
    exec(
        &mut app,
        "DO $$ BEGIN FOR i IN 1 .. 400 LOOP INSERT INTO docs (body) VALUES (i::text); COMMIT; END LOOP; END $$",
    )
    .await;
    assert_eq!(audit_rows(&db, &t).await.len(), 400);
    exec(&mut su, &format!("VACUUM {schema}._tenancy_audit_pending")).await;
    let pages: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT pg_relation_size('{schema}._tenancy_audit_pending') / 8192"
    )))
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert!(pages >= 5, "the dead rows were removed ({pages} pages)");
    assert_eq!(pending(&db, &t).await, 0);
    // The floor the last seal leaves when nothing else on the server is
    // writing (here other tests' transactions may be running, and would
    // hold it back: the floor is the oldest transaction id running): a
    // transaction id after every sealed one.
    let after = xid_of(&mut su, "pg_current_xact_id()").await;
    exec(
        &mut su,
        &format!("UPDATE {schema}._tenancy_audit_head SET seal_floor = '{after}'"),
    )
    .await;
    // As the owner, in one transaction: an entry, the seal, and what the
    // seal read of the pending table and of its index.
    exec(
        &mut su,
        &format!(
            "BEGIN; SET LOCAL ROLE {owner}; INSERT INTO {schema}.docs (body) VALUES ('owner')",
            owner = t.name.owner_role()
        ),
    )
    .await;
    let stats_sql = format!(
        "SELECT pg_stat_get_xact_numscans('{schema}._tenancy_audit_pending'::regclass),
                pg_stat_get_xact_numscans('{schema}._tenancy_audit_pending_xid'::regclass),
                pg_stat_get_xact_blocks_fetched('{schema}._tenancy_audit_pending'::regclass)"
    );
    let (_, _, blocks_before) = scans(&mut su, &stats_sql).await;
    let sealed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {schema}.{}(false)", fns.seal)))
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(sealed, 1);
    let (seq, idx, blocks) = scans(&mut su, &stats_sql).await;
    assert_eq!(seq, 0, "the seal scanned the pending table");
    assert!(idx >= 1, "the seal did not read the (xid, pid) index");
    assert!(
        blocks - blocks_before <= 4,
        "the seal read {} blocks of a {pages}-page pending table",
        blocks - blocks_before
    );
    let settings: (String, String) =
        sqlx::query_as("SELECT current_setting('enable_seqscan'), current_setting('plan_cache_mode')")
            .fetch_one(&mut su)
            .await
            .unwrap();
    assert_eq!(
        settings,
        ("on".to_owned(), "auto".to_owned()),
        "the seal left the planner's settings changed"
    );
    exec(&mut su, "COMMIT").await;
    exec(&mut holder, "COMMIT").await;
    assert_eq!(pending(&db, &t).await, 0);
    assert_eq!(verified(&db, &t).await.rows, 401);
}

/// A pending table made before the seal read by transaction id (2026-12-05):
/// no `xid` column, no index, no floor on the head, an entry waiting. The
/// next reconcile adds them (the waiting entry gets the id of the
/// transaction that adds the column); the next commit seals it and its own.
#[tokio::test]
async fn a_pending_table_made_before_reading_by_transaction_id_is_converged_and_its_entries_sealed() {
    let db = setup("aud_floor_up").await;
    let mut t = tenant_with_docs(&db, "fu").await;
    let schema = t.name.schema();
    let mut app = t.app(&db).await.unwrap();
    exec(&mut app, "INSERT INTO docs (body) VALUES ('before')").await;
    let mut su = db.superuser().await;
    exec(
        &mut su,
        &format!(
            "ALTER TABLE {schema}._tenancy_audit_pending DROP COLUMN xid;
             ALTER TABLE {schema}._tenancy_audit_head DROP COLUMN seal_floor;",
        ),
    )
    .await;
    // The entry waiting: a REPEATABLE READ commit leaves it pending (its
    // seal would fail on the dropped columns, as the old table's would not).
    exec(
        &mut su,
        &format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL ROLE {}; INSERT INTO {schema}.docs (body) VALUES ('waiting'); COMMIT",
            t.name.owner_role()
        ),
    )
    .await;
    assert_eq!(pending(&db, &t).await, 1);
    let mut conn = db.admin.acquire().await.unwrap();
    let state = pg::audit::observe(&mut conn, &t.name, &[]).await.unwrap();
    drop(conn);
    assert!(!state.pending && state.functions_current, "{state:?}");
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["CreateAuditTables"]);
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged");
    exec(&mut app, "INSERT INTO docs (body) VALUES ('after')").await;
    assert_eq!(pending(&db, &t).await, 0);
    assert_eq!(audit_rows(&db, &t).await.len(), 3);
    assert_eq!(verified(&db, &t).await.rows, 3);
}

/// A tenant converged by the version before sealing: no pending table and
/// no seal function, the commit-time trigger on the head. The next
/// reconcile creates the pending table and the seal, and moves the tail;
/// the chain goes on from its head and verifies, and the next reconcile
/// runs nothing.
#[tokio::test]
async fn a_tenant_made_before_sealing_is_converged_and_its_chain_goes_on() {
    let db = setup("aud_seal_up").await;
    let mut t = tenant_with_docs(&db, "su").await;
    let mut app = t.app(&db).await.unwrap();
    exec(&mut app, "INSERT INTO docs (body) VALUES ('before')").await;
    let schema = t.name.schema();
    let fns = pg::audit::AuditFns::of(&t.name);
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE {schema}._tenancy_audit_pending;
         DROP FUNCTION {schema}.{seal}(boolean);
         CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER UPDATE ON {schema}._tenancy_audit_head DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW WHEN (OLD.xid IS DISTINCT FROM NEW.xid) EXECUTE FUNCTION {schema}.{tail}();",
        seal = fns.seal,
        tail = fns.tail
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut conn = db.admin.acquire().await.unwrap();
    let state = pg::audit::observe(&mut conn, &t.name, &[]).await.unwrap();
    drop(conn);
    assert!(!state.pending && !state.functions_current && !state.guard, "{state:?}");
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        ["CreateAuditTables", "ReplaceAuditFunctions", "GuardAuditTable"]
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged");
    let tails: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT c.relname::text FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
          WHERE c.relnamespace = '{schema}'::regnamespace AND g.tgname = '_tenancy_audit_tail'"
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert_eq!(tails, ["_tenancy_audit_pending"]);
    exec(&mut app, "INSERT INTO docs (body) VALUES ('after')").await;
    assert_eq!(pending(&db, &t).await, 0);
    assert_eq!(verified(&db, &t).await.rows, 2);
}

#[tokio::test]
async fn a_disabled_or_dropped_audit_trigger_is_put_back_by_the_next_reconcile() {
    let db = setup("aud_repair").await;
    let mut t = tenant_with_docs(&db, "rp").await;
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {schema}.docs DISABLE TRIGGER _tenancy_audit_update; DROP TRIGGER _tenancy_audit_del ON {schema}.docs"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut conn = db.admin.acquire().await.unwrap();
    let state = pg::audit::observe(&mut conn, &t.name, &[]).await.unwrap();
    drop(conn);
    assert_eq!(state.untriggered, ["docs"]);
    assert_eq!(
        state.stale,
        ["docs"],
        "a table with some of the triggers has them replaced, not created next to them"
    );
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    assert_eq!(
        t.converge(&db).await.unwrap().statements,
        0,
        "the repaired tenant is converged"
    );
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('a')")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("UPDATE docs SET body = 'b'")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("DELETE FROM docs").execute(&mut app).await.unwrap();
    let ops: Vec<String> = audit_rows(&db, &t).await.into_iter().map(|a| a.op).collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "DELETE"], "every write is audited again");
    verified(&db, &t).await;
}

/// A migration run creates the audit objects it finds missing in its own
/// transaction, under the tenant's migration lock; the reconcile's audit
/// step creates them too. Two sessions creating the same table at once make
/// one fail on pg_type's unique index (a 1,000-tenant burst recorded it as a
/// failure of a new tenant's first migration, the rollout having reached
/// the tenant between its schema's commit and its audit objects'). So the
/// audit step, when it has DDL to run, waits for the lock and plans again
/// from what it then finds; a converged tenant takes no lock.
#[tokio::test]
async fn the_audit_step_waits_for_a_migration_run_holding_the_tenants_lock() {
    let db = setup("aud_mlock").await;
    let mut t = tenant_with_docs(&db, "ml").await;
    let wait = std::time::Duration::from_secs(5);
    // Converged: no lock taken, so a run holding it holds nothing up.
    let mut held = pg::locks::hold_migrations(&db.admin, &t.uid, wait).await.unwrap();
    // The lock's transaction writes nothing worth a wait for the disk.
    let sync: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *held)
        .await
        .unwrap();
    assert_eq!(sync, "off", "the lock holder's commit waits for the disk");
    let quiet = tokio::time::timeout(std::time::Duration::from_secs(3), t.converge(&db))
        .await
        .expect("a converged tenant's audit step waited for the migration lock")
        .unwrap();
    assert_eq!(quiet.statements, 0);
    held.rollback().await.unwrap();

    // A trigger gone: the audit step has DDL to run, and waits.
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER _tenancy_audit_ins ON {schema}.docs"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let held = pg::locks::hold_migrations(&db.admin, &t.uid, wait).await.unwrap();
    let name = t.name.clone();
    let out = {
        let converging = t.converge(&db);
        tokio::pin!(converging);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(1500), &mut converging)
                .await
                .is_err(),
            "the audit step ran its DDL while a migration run held the tenant's lock"
        );
        // What the run does meanwhile, as a migration's transaction does it
        // (the owner, the audit statements read in the transaction), the audit
        // step finds once it has the lock.
        let owner = pg::quote_ident(&name.owner_role()).unwrap();
        let mut tx = su.begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {owner}")))
            .execute(&mut *tx)
            .await
            .unwrap();
        let stmts = pg::audit::statements_in_tx(&mut tx, &name, &[]).await.unwrap();
        assert!(!stmts.is_empty(), "the run finds the trigger missing");
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmts.join(";\n")))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        held.commit().await.unwrap();
        converging.await.unwrap()
    };
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert!(
        labels.is_empty(),
        "planned again under the lock, nothing is left to do: {labels:?}"
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0);
    // And without a run under way, the step repairs what is missing.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER _tenancy_audit_ins ON {schema}.docs"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('a')")
        .execute(&mut app)
        .await
        .unwrap();
    assert_eq!(audit_rows(&db, &t).await.len(), 1, "the insert is audited");
    verified(&db, &t).await;
}

/// Until 2026-12-03 the audit functions had one name in every schema
/// (`_tenancy_audit_trigger`, ...), which made Postgres read every tenant's
/// functions to resolve one tenant's in DDL. A tenant left so (its
/// functions renamed back, triggers still calling them) is converged by its
/// next reconcile: the tenant's own functions, every trigger moved to them,
/// the old ones dropped; the chain goes on across the change and verifies,
/// and the next reconcile runs nothing. Inside a migration's transaction
/// the observation reports the earlier version's functions too.
#[tokio::test]
async fn functions_named_alike_in_every_schema_give_way_to_the_tenants_own() {
    let db = setup("aud_fn_names").await;
    let mut t = tenant_with_docs(&db, "fn-up").await;
    let schema = t.name.schema();
    let fns = pg::audit::AuditFns::of(&t.name);
    let mut su = db.superuser().await;
    let functions = || {
        let sql =
            format!("SELECT p.proname::text FROM pg_proc p WHERE p.pronamespace = '{schema}'::regnamespace ORDER BY 1");
        let pool = db.su.clone();
        async move {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        functions().await,
        [fns.guard.as_str(), &fns.seal, &fns.tail, &fns.trigger, &fns.write]
    );
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs (body) VALUES ('before')")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER FUNCTION {schema}.{w}(text, text, jsonb[], text[]) RENAME TO _tenancy_audit_write;
         ALTER FUNCTION {schema}.{tr}() RENAME TO _tenancy_audit_trigger;
         ALTER FUNCTION {schema}.{g}() RENAME TO _tenancy_audit_guard;
         ALTER FUNCTION {schema}.{ta}() RENAME TO _tenancy_audit_tail;",
        w = fns.write,
        tr = fns.trigger,
        g = fns.guard,
        ta = fns.tail
    )))
    .execute(&mut su)
    .await
    .unwrap();
    // The earlier version's layout still audits (the triggers call by oid).
    sqlx::query("INSERT INTO docs (body) VALUES ('old names')")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut su).await.unwrap();
    let state = pg::audit::observe_in_tx(&mut su, &t.name, &[]).await.unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut su).await.unwrap();
    assert!(
        state.legacy_functions && !state.functions_current && !state.guard,
        "{state:?}"
    );
    assert_eq!(state.stale, ["docs"]);

    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        [
            "ReplaceAuditFunctions",
            "GuardAuditTable",
            "AuditTable",
            "DropLegacyAuditFunctions"
        ]
    );
    assert_eq!(
        functions().await,
        [fns.guard.as_str(), &fns.seal, &fns.tail, &fns.trigger, &fns.write]
    );
    let called: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT p.proname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
          WHERE c.relnamespace = '{schema}'::regnamespace AND NOT t.tgisinternal ORDER BY 1"
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert_eq!(called, [fns.guard.as_str(), &fns.tail, &fns.trigger]);
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged");
    sqlx::query("UPDATE docs SET n = 1").execute(&mut app).await.unwrap();
    let ops: Vec<String> = audit_rows(&db, &t).await.into_iter().map(|a| a.op).collect();
    assert_eq!(ops, ["INSERT", "INSERT", "UPDATE"]);
    assert_eq!(verified(&db, &t).await.rows, 3);
}

/// What the observation reports after each change a migration could make
/// (made as the owner, in the transaction, with the in-transaction
/// settings; rolled back after): every field of the state, against the
/// converged state with exactly the change the case expects. The keys of
/// the tables it reports untriggered are read from `pg_index` here.
#[tokio::test]
async fn the_observation_reports_each_change_to_the_audit_objects() {
    // (A function written `_tenancy_audit_x(` below is the tenant's own,
    // `_tenancy_audit_x_<tenant>`: [`own_functions`]; quoted, it is the
    // name itself.)
    type Expect = fn(&mut pg::audit::AuditState);
    fn docs_stale(s: &mut pg::audit::AuditState) {
        s.untriggered = vec!["docs".into()];
        s.stale = vec!["docs".into()];
    }
    let db = setup("aud_light").await;
    let t = tenant_with_docs(&db, "lt").await;
    let cases: Vec<(&str, &str, Expect)> = vec![
        ("nothing", "SELECT 1", |_| {}),
        (
            "new tables",
            "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE ev (id int, at date) PARTITION BY RANGE (at);
             CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); CREATE VIEW v AS SELECT 1 AS x",
            |s| s.untriggered = vec!["ev".into(), "orders".into()],
        ),
        ("a table trigger disabled", "ALTER TABLE docs DISABLE TRIGGER _tenancy_audit_update", docs_stale),
        ("a table trigger dropped", "DROP TRIGGER _tenancy_audit_trunc ON docs", docs_stale),
        (
            "a table trigger pointed elsewhere",
            "CREATE FUNCTION other() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
             CREATE OR REPLACE TRIGGER _tenancy_audit_ins AFTER INSERT ON docs REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION other()",
            docs_stale,
        ),
        ("a table's key changed", "ALTER TABLE docs DROP CONSTRAINT docs_pkey, ADD PRIMARY KEY (id, n)", docs_stale),
        ("a column of a table's key renamed", "ALTER TABLE docs RENAME COLUMN id TO doc_id", docs_stale),
        ("a table's key dropped", "ALTER TABLE docs DROP CONSTRAINT docs_pkey", docs_stale),
        ("an overload of an audit function", "CREATE FUNCTION _tenancy_audit_trigger(x int) RETURNS int LANGUAGE sql AS 'SELECT 1'", |_| {}),
        (
            "an overload named like an earlier version's function",
            "CREATE FUNCTION \"_tenancy_audit_trigger\"(x int) RETURNS int LANGUAGE sql AS 'SELECT 1'",
            |_| {},
        ),
        (
            "an earlier version's function",
            "CREATE FUNCTION \"_tenancy_audit_trigger\"() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
            |s| s.legacy_functions = true,
        ),
        (
            "an earlier version's write function",
            "CREATE FUNCTION \"_tenancy_audit_write\"(text, text, jsonb[], text[]) RETURNS void LANGUAGE sql AS ''",
            |s| s.legacy_functions = true,
        ),
        (
            "a temporary view hiding a new table from the catalog",
            "CREATE TABLE hidden (id int); CREATE TEMP VIEW pg_class AS SELECT * FROM pg_catalog.pg_class WHERE relname <> 'hidden';
             ALTER TABLE _tenancy_audit DISABLE TRIGGER _tenancy_audit_guard",
            |s| {
                s.untriggered = vec!["hidden".into()];
                s.guard = false;
            },
        ),
        ("the audit table dropped", "DROP TABLE _tenancy_audit CASCADE", |s| {
            s.table = false;
            s.guard = false;
        }),
        ("the head table dropped", "DROP TABLE _tenancy_audit_head", |s| {
            s.head = false;
            s.pending = false;
        }),
        (
            "the head replaced by a view",
            "ALTER TABLE _tenancy_audit_head RENAME TO old_head; CREATE VIEW _tenancy_audit_head AS SELECT * FROM old_head",
            |s| {
                s.head = false;
                s.misshapen = vec!["_tenancy_audit_head".into()];
                s.untriggered = vec!["old_head".into()];
            },
        ),
        (
            "the pending table replaced by a view",
            "ALTER TABLE _tenancy_audit_pending RENAME TO old_pending; CREATE VIEW _tenancy_audit_pending AS SELECT * FROM old_pending",
            |s| {
                s.pending = false;
                s.guard = false;
                s.misshapen = vec!["_tenancy_audit_pending".into()];
                s.untriggered = vec!["old_pending".into()];
            },
        ),
        (
            "the trigger function replaced",
            "CREATE OR REPLACE FUNCTION _tenancy_audit_trigger() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$BEGIN RETURN NULL; END$$",
            |s| s.functions_current = false,
        ),
        ("the write function made SECURITY INVOKER", "ALTER FUNCTION _tenancy_audit_write(text, text, jsonb[], text[]) SECURITY INVOKER", |s| {
            s.functions_current = false
        }),
        ("a function's search_path reset", "ALTER FUNCTION _tenancy_audit_tail() RESET search_path", |s| s.functions_current = false),
        ("a function's search_path changed", "ALTER FUNCTION _tenancy_audit_trigger() SET search_path = public", |s| {
            s.functions_current = false
        }),
        ("a function given away", "RESET ROLE; ALTER FUNCTION _tenancy_audit_guard() OWNER TO postgres", |s| s.functions_current = false),
        ("a function renamed", "ALTER FUNCTION _tenancy_audit_guard() RENAME TO g2", |s| {
            s.functions_current = false;
            s.guard = false;
        }),
        ("the guard disabled", "ALTER TABLE _tenancy_audit DISABLE TRIGGER _tenancy_audit_guard", |s| s.guard = false),
        ("the guard renamed", "ALTER TRIGGER _tenancy_audit_guard ON _tenancy_audit RENAME TO g2", |s| s.guard = false),
        ("the tail disabled", "ALTER TABLE _tenancy_audit_pending DISABLE TRIGGER _tenancy_audit_tail", |s| s.guard = false),
        (
            "the tail not deferred",
            "DROP TRIGGER _tenancy_audit_tail ON _tenancy_audit_pending;
             CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER INSERT ON _tenancy_audit_pending NOT DEFERRABLE FOR EACH ROW EXECUTE FUNCTION _tenancy_audit_tail()",
            |s| s.guard = false,
        ),
        (
            "the tail back on the audit table (per entry, as before 2026-12)",
            "DROP TRIGGER _tenancy_audit_tail ON _tenancy_audit_pending;
             CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER INSERT ON _tenancy_audit DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION _tenancy_audit_tail()",
            |s| s.guard = false,
        ),
        (
            "the tail back on the head (holding its lock to commit, as until 2026-12-03)",
            "DROP TRIGGER _tenancy_audit_tail ON _tenancy_audit_pending;
             CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER UPDATE ON _tenancy_audit_head DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION _tenancy_audit_tail()",
            |s| s.guard = false,
        ),
        (
            "a second tail on the head beside the right one",
            "CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER UPDATE ON _tenancy_audit_head DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION _tenancy_audit_tail()",
            |s| s.guard = false,
        ),
        ("the pending table's guard disabled", "ALTER TABLE _tenancy_audit_pending DISABLE TRIGGER _tenancy_audit_guard", |s| s.guard = false),
        ("the pending table dropped", "DROP TABLE _tenancy_audit_pending", |s| {
            s.pending = false;
            s.guard = false;
        }),
        ("the pending table's transaction-id index dropped", "DROP INDEX _tenancy_audit_pending_xid", |s| s.pending = false),
        (
            "the transaction-id index's name taken by a table",
            "DROP INDEX _tenancy_audit_pending_xid; CREATE TABLE _tenancy_audit_pending_xid (x int)",
            |s| s.pending = false,
        ),
        ("the pending table's transaction ids dropped", "ALTER TABLE _tenancy_audit_pending DROP COLUMN xid", |s| s.pending = false),
        (
            "the pending table's transaction ids made bigint",
            "DROP INDEX _tenancy_audit_pending_xid; ALTER TABLE _tenancy_audit_pending ALTER COLUMN xid DROP DEFAULT, ALTER COLUMN xid TYPE bigint USING 0;
             CREATE INDEX _tenancy_audit_pending_xid ON _tenancy_audit_pending (xid, pid)",
            |s| s.pending = false,
        ),
        ("the head's seal floor dropped", "ALTER TABLE _tenancy_audit_head DROP COLUMN seal_floor", |s| s.pending = false),
        ("the seal function made SECURITY INVOKER", "ALTER FUNCTION _tenancy_audit_seal(boolean) SECURITY INVOKER", |s| {
            s.functions_current = false
        }),
    ];
    let mut su = db.superuser().await;
    for (what, sql, expect) in cases {
        let sql = own_functions(sql, &t.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; SET LOCAL ROLE {}; SET LOCAL search_path TO {}; {sql}",
            t.name.owner_role(),
            t.name.schema()
        )))
        .execute(&mut su)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let state = pg::audit::observe_in_tx(&mut su, &t.name, &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut expected = pg::audit::AuditState::objects_present(vec![]);
        expect(&mut expected);
        for table in &expected.untriggered {
            let key: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT k FROM (SELECT i.indexrelid::text AS k, 0::bigint AS o FROM pg_catalog.pg_index i
                                 WHERE i.indrelid = '{schema}.{table}'::pg_catalog.regclass AND i.indisprimary
                                UNION ALL
                                SELECT pg_catalog.pg_get_indexdef(i.indexrelid, n::int, false), n FROM pg_catalog.pg_index i,
                                       generate_series(1, i.indnkeyatts) n
                                 WHERE i.indrelid = '{schema}.{table}'::pg_catalog.regclass AND i.indisprimary) x ORDER BY o",
                schema = t.name.schema()
            )))
            .fetch_all(&mut su)
            .await
            .unwrap();
            expected.keys.insert(table.clone(), key);
        }
        sqlx::raw_sql("ROLLBACK").execute(&mut su).await.unwrap();
        assert_eq!(state, expected, "{what}");
        match what {
            "nothing" | "an overload of an audit function" | "an overload named like an earlier version's function" => {
                assert_eq!(pg::audit::plan(&state, None), vec![], "{what}")
            }
            _ => assert!(!pg::audit::plan(&state, None).is_empty(), "{what}: nothing to repair"),
        }
    }
}

/// A migration that disables, drops or replaces what the audit log is made
/// of has it all put back in its own transaction (before anything of the
/// tenant's can commit without it), with no reconcile in between: table
/// triggers, the trigger and write functions (source, SECURITY DEFINER,
/// search_path), the guard and tail triggers, the audit table itself; also
/// for a non-transactional migration.
#[tokio::test]
async fn a_migration_that_breaks_the_audit_log_has_it_put_back_in_its_own_transaction() {
    let db = setup("aud_mig_repair").await;
    let t = tenant_with_docs(&db, "mr").await;
    let login = pg::migrations::ops_login(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap()
        .expect("registered");
    let set = SetRef {
        name: "default".into(),
        generation: 1,
    };
    let steps = [
        ("ALTER TABLE docs DISABLE TRIGGER _tenancy_audit_update; DROP TRIGGER _tenancy_audit_del ON docs; CREATE TABLE notes (id int PRIMARY KEY, body text)", true),
        ("CREATE OR REPLACE FUNCTION _tenancy_audit_trigger() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$", true),
        (
            "ALTER TABLE _tenancy_audit_pending DISABLE TRIGGER _tenancy_audit_tail; ALTER FUNCTION _tenancy_audit_write(text, text, jsonb[], text[]) SECURITY INVOKER RESET search_path",
            true,
        ),
        ("ALTER TABLE _tenancy_audit DISABLE TRIGGER _tenancy_audit_guard", false),
        ("DROP TABLE _tenancy_audit CASCADE", true),
    ];
    let mut migrations = Vec::new();
    let mut app = t.app(&db).await.unwrap();
    for (i, (sql, transactional)) in steps.into_iter().enumerate() {
        let v = i as i64 + 1;
        let sql = own_functions(sql, &t.name);
        migrations.push(MigrationSql::new(v, format!("m{v}"), &sql, transactional));
        let out = pg::migrations::migrate_tenant(&db.admin, &login, &set, &migrations, &Timeouts::default())
            .await
            .unwrap();
        assert_eq!(
            out,
            TenantOutcome::Migrated {
                from: v - 1,
                to: v,
                applied: vec![v]
            },
            "{sql}"
        );
        let mut conn = db.admin.acquire().await.unwrap();
        let state = pg::audit::observe(&mut conn, &t.name, &[]).await.unwrap();
        drop(conn);
        assert_eq!(
            pg::audit::plan(&state, None),
            vec![],
            "after {sql:?} committed, the audit log is not whole: {state:?}"
        );
        if v < 5 {
            let before = audit_rows(&db, &t).await.len();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO docs (body) VALUES ('a'); UPDATE docs SET body = 'b'; DELETE FROM docs; INSERT INTO notes VALUES ({v}, 'n')")))
                .execute(&mut app)
                .await
                .unwrap_or_else(|e| panic!("after {sql:?}: {e}"));
            let ops: Vec<String> = audit_rows(&db, &t)
                .await
                .into_iter()
                .skip(before)
                .map(|a| a.op)
                .collect();
            assert_eq!(
                ops,
                ["INSERT", "UPDATE", "DELETE", "INSERT"],
                "after {sql:?}: every write is audited"
            );
            verified(&db, &t).await;
        }
    }
    // The log itself was dropped: an empty one is back, guarded, and the
    // chain's anchored head says rows went missing.
    assert!(audit_rows(&db, &t).await.is_empty());
    let r = pg::audit::verify(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap();
    assert!(r.first_break.is_some(), "{r:?}");
}

/// The operator creates its functions without compiling their bodies
/// (`check_function_bodies` off for those statements, docs/scale.md): each
/// installed body still compiles (the PL/pgSQL validator run on every one
/// of them with the checks on), and the setting is what it was afterwards,
/// on or off, inside the same transaction (a migration's goes on after its
/// audit statements).
#[tokio::test]
async fn functions_made_without_body_checks_compile_and_the_setting_is_given_back() {
    let db = setup("aud_bodies").await;
    let t = tenant_with_docs(&db, "bc").await;
    let mut su = db.superuser().await;
    let schema = t.name.schema();
    for before in ["on", "off"] {
        let mut tx = Connection::begin(&mut su).await.unwrap();
        exec(&mut tx, &format!("SET LOCAL check_function_bodies = {before}")).await;
        let sql = pg::audit::render(&pg::audit::AuditAction::ReplaceFunctions, &t.name)
            .unwrap()
            .join(";\n");
        exec(
            &mut tx,
            &format!("SET LOCAL ROLE {}; {sql}; RESET ROLE", t.name.owner_role()),
        )
        .await;
        let after: String = sqlx::query_scalar("SHOW check_function_bodies")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(after, before, "the setting after the audit functions");
        tx.commit().await.unwrap();
    }
    // Every function of the schema and the tenant's anchor function,
    // compiled now: a syntax error in a template fails here.
    exec(&mut su, "SET check_function_bodies = on").await;
    let checked: i64 = sqlx::query_scalar(
        "SELECT count(plpgsql_validator(p.oid)) FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
          WHERE l.lanname = 'plpgsql'
            AND (p.pronamespace = $1::regnamespace OR (p.pronamespace = 'tenancy_audit'::regnamespace AND p.proname = $1))",
    )
    .bind(&schema)
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert!(
        checked >= 6,
        "the five audit functions and the anchor function, got {checked}"
    );
    // And one the checks would have refused is refused by the validator
    // (the check above can fail).
    exec(&mut su, &format!("SET check_function_bodies = off; CREATE FUNCTION {schema}.broken() RETURNS int LANGUAGE plpgsql AS $$BEGIN RETURN (; END$$")).await;
    let e = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET check_function_bodies = on; SELECT plpgsql_validator('{schema}.broken()'::regprocedure)"
    )))
    .execute(&mut su)
    .await
    .expect_err("a body that does not compile");
    assert_eq!(sqlstate(&e), "42601", "{e}");
}

/// `audit verify` builds each entry's content itself from the columns
/// (`pg::audit::Content`); it must give exactly the bytes the server's
/// `content_sql` gives, for every kind of entry and for values that need
/// escaping: quotes, backslashes, control characters, newlines, non-ASCII,
/// an empty and a NULL request id, a table name with a quote and a space,
/// a composite key, changed columns with odd names, TRUNCATE (no key, no
/// columns), a statement of many rows, an ANCHOR and a PRUNE entry.
#[tokio::test]
async fn verify_builds_the_content_the_server_builds() {
    let db = setup("aud_content").await;
    let t = tenant_with_docs(&db, "ct").await;
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner}; SET search_path = {schema};
         CREATE TABLE \"we'ird tab\\le\" (a int, \"b \"\"q\"\"\" text, \"ünï\tcol\" text, PRIMARY KEY (a, \"b \"\"q\"\"\"));
         CREATE TABLE nokey (x int); RESET ROLE; RESET search_path;",
        owner = t.name.owner_role(),
        schema = t.name.schema()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut t = t;
    t.converge(&db).await.unwrap();
    let mut app = t.app(&db).await.unwrap();
    let actors = [
        "plain",
        "quote \" and backslash \\ and slash /",
        "ctl \u{1} \u{8} \u{c} \u{1f} tab\tnl\ncr\r",
        "ünïcødé ✓ 𝄞",
        "",
    ];
    for (i, actor) in actors.iter().enumerate() {
        let request = if i % 2 == 0 { Some(format!("req {actor}")) } else { None };
        let mut tx = sqlx::Connection::begin(&mut app).await.unwrap();
        sqlx::query("SELECT set_config('tenancy.actor', $1, true), set_config('tenancy.request_id', $2, true)")
            .bind(actor)
            .bind(request.unwrap_or_default())
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO docs (body, n) VALUES ('x', {i}), ('y\"', {i});
             UPDATE docs SET body = 'z\\\\', n = n + 1 WHERE n = {i};
             INSERT INTO \"we'ird tab\\le\" VALUES ({i}, 'k\"{i}\\\\', 'v');
             UPDATE \"we'ird tab\\le\" SET \"ünï\tcol\" = 'w' WHERE a = {i};
             INSERT INTO nokey SELECT g FROM generate_series(1, 3) g;
             DELETE FROM docs WHERE n > {i};"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {}; TRUNCATE {}.nokey; RESET ROLE",
        t.name.owner_role(),
        t.name.schema()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let before = same_content(&mut su, &t).await;
    assert_eq!(before, ["DELETE", "INSERT", "TRUNCATE", "UPDATE"]);
    verified(&db, &t).await;
    // A prune (ANCHOR and PRUNE entries): everything so far is old.
    pg::audit::anchor_heads(&db.admin, &support::test_ring(), None)
        .await
        .unwrap();
    let out = pg::audit::prune(&db.admin, &support::test_ring(), &t.name, chrono::Utc::now(), "tester")
        .await
        .unwrap();
    assert!(out.deleted > 0, "nothing was pruned");
    sqlx::query("INSERT INTO docs (body) VALUES ('after')")
        .execute(&mut app)
        .await
        .unwrap();
    let after = same_content(&mut su, &t).await;
    assert_eq!(after, ["ANCHOR", "INSERT", "PRUNE"]);
    let r = verified(&db, &t).await;
    assert_eq!(r.rows, 3, "the anchor row, the PRUNE and the INSERT entries walked");
}

/// Compares, for every entry of the tenant's log, the content the server
/// builds (`content_sql`) with the one `audit verify` builds; gives the
/// operations seen, sorted.
async fn same_content(su: &mut sqlx::PgConnection, t: &Tenant) -> Vec<String> {
    let content = pg::audit::content_sql(
        "a.\"time\"",
        "a.actor",
        "a.actor_given",
        "a.request_id",
        "a.operation",
        "a.table_name",
        "a.row_pk",
        "a.changed_columns",
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {}, a.operation, {content} AS server, EXTRACT(EPOCH FROM a.\"time\")::text AS epoch, a.actor, a.actor_given, a.request_id,
                a.table_name, a.row_pk::text AS pk, a.changed_columns FROM {}._tenancy_audit a ORDER BY a.id",
        pg::audit::time_columns_sql("a.\"time\""),
        t.name.schema()
    )))
    .fetch_all(&mut *su)
    .await
    .unwrap();
    let mut ops = std::collections::BTreeSet::new();
    for row in &rows {
        let operation: String = row.get("operation");
        let changed: Option<Vec<String>> = row.get("changed_columns");
        let mut mine = Vec::new();
        // The epoch as the walk renders it from the stored time.
        let mut epoch = String::new();
        pg::audit::epoch_from_row(row, 0, &mut epoch).unwrap();
        assert_eq!(epoch, row.get::<String, _>("epoch"), "{operation}: the epoch differs");
        pg::audit::Content {
            epoch: &epoch,
            actor: row.get("actor"),
            actor_given: row.get("actor_given"),
            request_id: row.get("request_id"),
            operation: &operation,
            table: row.get("table_name"),
            row_pk: row.get("pk"),
            changed: changed.as_deref(),
        }
        .write(&mut mine);
        let server: Vec<u8> = row.get("server");
        assert_eq!(
            String::from_utf8_lossy(&mine),
            String::from_utf8_lossy(&server),
            "{operation}: the content differs"
        );
        ops.insert(operation);
    }
    ops.into_iter().collect()
}

/// The epoch `audit verify` renders from an entry's stored time is the
/// server's `EXTRACT(EPOCH FROM time)::text` for any time the type holds:
/// before 1970 (negative, with and without a fraction), the first and
/// last microsecond of the range, the last years of the range (where the
/// server's epoch rounds, and the walk takes its text), `infinity` and
/// `-infinity`, and times written in other time zones.
#[tokio::test]
async fn the_epoch_verify_writes_is_the_servers() {
    let db = setup("aud_epoch").await;
    let times = [
        "2026-12-05 10:00:00+00",
        "2026-12-05 10:00:00.123456+05:30",
        "1970-01-01 00:00:00+00",
        "1970-01-01 00:00:00.000001+00",
        "1969-12-31 23:59:59.999999+00",
        "1969-12-31 23:59:59.5+00",
        "1969-12-31 23:59:59+00",
        "1960-01-01 00:00:00.000001+00",
        "2000-01-01 00:00:00+00",
        "1999-12-31 23:59:59.999999-12",
        "4714-11-24 00:00:00+00 BC",
        "4714-11-24 00:00:00.000001+00 BC",
        "199999-12-31 23:59:59.999999+00",
        "200000-01-01 00:00:00+00",
        "294246-06-01 00:00:00.5+00",
        "294276-12-31 23:59:59.999999+00",
        "294276-12-31 23:59:59.5+00",
        "infinity",
        "-infinity",
    ];
    let values = times
        .iter()
        .map(|t| format!("('{t}'::timestamptz)"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {}, EXTRACT(EPOCH FROM v.t)::text, v.t::text FROM (VALUES {values}) v(t)",
        pg::audit::time_columns_sql("v.t")
    )))
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(rows.len(), times.len());
    let mut rendered_here = 0;
    for row in &rows {
        let server: String = row.get(2);
        let mut mine = String::new();
        pg::audit::epoch_from_row(row, 0, &mut mine).unwrap();
        assert_eq!(mine, server, "the epoch of {}", row.get::<String, _>(3));
        if row.get::<Option<String>, _>(1).is_none() {
            rendered_here += 1;
        }
    }
    // All but the last years of the range and the infinities are rendered
    // by the walk itself.
    assert_eq!(rendered_here, times.len() - 6);
}

/// A chain of `SPLIT_WALK_ROWS` rows or more is read over two confined
/// sessions sharing one snapshot (even and odd ids), and the walk still
/// finds an edited entry in either half and a removed one; without a
/// second session (the ops role's connection limit reached) the walk
/// reads on one and gives the same answers.
#[tokio::test]
async fn a_long_chain_is_walked_on_two_sessions_and_a_break_in_either_half_is_found() {
    let db = setup("aud_split").await;
    let t = tenant_with_docs(&db, "sp").await;
    let mut app = t.app(&db).await.unwrap();
    // One entry per statement: a server-side loop of single-row INSERTs,
    // and a few statements of many rows (large keys' text) among them.
    let entries = pg::audit::SPLIT_WALK_ROWS + 17;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN
           FOR i IN 1..{entries} - 3 LOOP INSERT INTO docs (body, n) VALUES ('b', i); END LOOP;
           INSERT INTO docs (body, n) SELECT 'bulk', g FROM generate_series(1, 2500) g;
           UPDATE docs SET body = 'u' WHERE n <= 3000;
           DELETE FROM docs WHERE n = 5;
         END $$"
    )))
    .execute(&mut app)
    .await
    .unwrap();
    let schema = t.name.schema();
    let ids = audit_ids(&db, &t).await;
    assert_eq!(ids.len() as i64, entries);
    let r = verified(&db, &t).await;
    assert_eq!((r.rows, r.sessions), (entries as u64, 2), "a long chain, two sessions");

    // The ops role may log in once only: the walk reads on one session.
    let mut su = db.superuser().await;
    let one = verify_with_one_ops_login(&db, &mut su, &t).await;
    assert_eq!(one.first_break, None);
    assert_eq!((one.rows, one.sessions, &one.head), (r.rows, 1, &r.head));

    // A superuser's statement past the guard (replica mode skips triggers).
    async fn tamper(su: &mut PgConnection, sql: String) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET session_replication_role = replica; {sql}; RESET session_replication_role"
        )))
        .execute(su)
        .await
        .unwrap();
    }
    let broken_at = |r: pg::audit::VerifyReport| r.first_break.expect("a break").id;
    // An edit in the even half, then one in the odd half (each undone).
    for &id in ids
        .iter()
        .skip(4000)
        .filter(|&&i| i % 2 == 0)
        .take(1)
        .chain(ids.iter().skip(7000).filter(|&&i| i % 2 != 0).take(1))
    {
        let old: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT actor FROM {schema}._tenancy_audit WHERE id = {id}"
        )))
        .fetch_one(&mut su)
        .await
        .unwrap();
        tamper(
            &mut su,
            format!("UPDATE {schema}._tenancy_audit SET actor = 'someone-else' WHERE id = {id}"),
        )
        .await;
        assert_eq!(
            broken_at(on_two(&db, &t).await),
            id,
            "an edit of row {id}, two sessions"
        );
        let one = verify_with_one_ops_login(&db, &mut su, &t).await;
        assert_eq!(one.sessions, 1);
        assert_eq!(broken_at(one), id, "an edit of row {id}, one session");
        tamper(
            &mut su,
            format!(
                "UPDATE {schema}._tenancy_audit SET actor = '{}' WHERE id = {id}",
                old.replace('\'', "''")
            ),
        )
        .await;
    }
    verified(&db, &t).await;
    // A removed entry: the next one's link breaks.
    let gone = ids[5000];
    tamper(
        &mut su,
        format!("DELETE FROM {schema}._tenancy_audit WHERE id = {gone}"),
    )
    .await;
    assert_eq!(broken_at(on_two(&db, &t).await), ids[5001], "row {gone} removed");
}

/// `audit verify` of a long chain, which reads on two sessions.
async fn on_two(db: &TestDb, t: &Tenant) -> pg::audit::VerifyReport {
    let r = pg::audit::verify(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap();
    assert_eq!(r.sessions, 2, "the walk's sessions");
    r
}

/// `audit verify` with the tenant's ops role allowed one connection (so
/// the walk reads on one session); the limit is put back to 4 after.
/// A server process of an earlier walk may hold its slot a moment after
/// its client left: a refused first login is tried again.
async fn verify_with_one_ops_login(db: &TestDb, su: &mut PgConnection, t: &Tenant) -> pg::audit::VerifyReport {
    let limit = |n: i32| format!("ALTER ROLE {} CONNECTION LIMIT {n}", t.name.ops_role());
    sqlx::raw_sql(sqlx::AssertSqlSafe(limit(1)))
        .execute(&mut *su)
        .await
        .unwrap();
    let mut tries = 0;
    let r = loop {
        match pg::audit::verify(&db.admin, &support::test_ring(), &t.name).await {
            Ok(r) => break r,
            Err(e) if tries < 500 && e.to_string().contains("too many connections") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("verify: {e}"),
        }
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(limit(4)))
        .execute(&mut *su)
        .await
        .unwrap();
    r
}

/// An UPDATE appends one entry per statement (per 10,000 rows), holding
/// every updated row's key and the columns any of them changed; a table
/// still carrying the per-row UPDATE trigger of earlier versions gets the
/// statement trigger at the next reconcile, and the old one is dropped (no
/// entry twice).
#[tokio::test]
async fn an_update_appends_one_entry_per_statement_and_the_per_row_trigger_is_replaced() {
    let db = setup("aud_upd_stmt").await;
    let mut t = tenant_with_docs(&db, "us").await;
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    // The trigger layout of earlier versions on docs.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER _tenancy_audit_update ON {schema}.docs;
         CREATE TRIGGER _tenancy_audit_upd AFTER UPDATE ON {schema}.docs FOR EACH ROW EXECUTE FUNCTION {schema}.{}()",
        pg::audit::AuditFns::of(&t.name).trigger
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let mut app = t.app(&db).await.unwrap();
    sqlx::raw_sql("INSERT INTO docs (body, n) SELECT 'r' || g, g FROM generate_series(1, 3) g")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE docs SET n = n + 1 WHERE n <= 2")
        .execute(&mut app)
        .await
        .unwrap();
    let ops: Vec<String> = audit_rows(&db, &t).await.into_iter().map(|a| a.op).collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "UPDATE"], "the old trigger: an entry per row");
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    let triggers: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = '{schema}.docs'::regclass ORDER BY 1"
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert_eq!(
        triggers,
        [
            "_tenancy_audit_del",
            "_tenancy_audit_ins",
            "_tenancy_audit_trunc",
            "_tenancy_audit_update"
        ]
    );
    sqlx::raw_sql("UPDATE docs SET n = n * 10 WHERE id <= 2; UPDATE docs SET body = 'b' WHERE id = 3; UPDATE docs SET n = n WHERE id = 3; UPDATE docs SET n = 0 WHERE false")
        .execute(&mut app)
        .await
        .unwrap();
    let rows = audit_rows(&db, &t).await;
    let tail: Vec<_> = rows[3..]
        .iter()
        .map(|a| (a.op.as_str(), a.pk.clone(), a.changed.clone()))
        .collect();
    let cols = |c: &[&str]| Some(c.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(
        tail,
        [
            ("UPDATE", Some(serde_json::json!([{"id": 1}, {"id": 2}])), cols(&["n"])),
            ("UPDATE", Some(serde_json::json!([{"id": 3}])), cols(&["body"])),
            // A row updated to the same values: an entry, nothing changed.
            ("UPDATE", Some(serde_json::json!([{"id": 3}])), cols(&[])),
        ],
        "one entry per UPDATE statement; none for a statement that updated no row"
    );
    verified(&db, &t).await;
}

/// An UPDATE of many rows (at least the trigger's small-statement size)
/// is read with a query planned for it, one comparison per column and row:
/// it gives the same keys and changed columns as the cached query of a
/// small one, on a composite key, a `json` column (no equality operator),
/// numerics equal as jsonb, and columns named like the query's own.
#[tokio::test]
async fn a_large_update_records_what_a_small_one_would() {
    let db = setup("aud_upd_large").await;
    let mut t = Tenant::new(&unique("ul"));
    t.converge(&db).await.unwrap();
    let (schema, owner) = (t.name.schema(), t.name.owner_role());
    let mut su = db.superuser().await;
    let table = |name: &str, rows: usize| {
        format!(
            "CREATE TABLE {schema}.{name} (k int, tag text, n int, r text, j json, num numeric, \"we ird\" text,
                                           t int, o int, u int, c2 int, PRIMARY KEY (tag, k));
             INSERT INTO {schema}.{name} SELECT g, 't' || (g % 3), g, 'r', '{{\"a\": 1}}', 1.0, 'w', 1, 2, 3, 4 FROM generate_series(1, {rows}) g;"
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner}; {} {} RESET ROLE;",
        table("small", 3),
        table("large", 200)
    )))
    .execute(&mut su)
    .await
    .unwrap();
    t.converge(&db).await.unwrap();
    let mut app = t.app(&db).await.unwrap();
    let statements = [
        ("UPDATE {t} SET n = n + (k % 2)", vec!["n"]),
        ("UPDATE {t} SET j = j, \"we ird\" = \"we ird\", num = 1.00", vec![]),
        ("UPDATE {t} SET j = '{\"a\": 2}', r = r || 'x'", vec!["j", "r"]),
        ("UPDATE {t} SET \"we ird\" = 'v', tag = tag", vec!["we ird"]),
        // Columns named like the queries' own aliases and names.
        (
            "UPDATE {t} SET t = t + 1, o = o, u = u + 1, c2 = c2 + 1",
            vec!["c2", "t", "u"],
        ),
    ];
    for (sql, changed) in &statements {
        for (table, rows) in [("small", 3usize), ("large", 200)] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.replace("{t}", table)))
                .execute(&mut app)
                .await
                .unwrap();
            let last = audit_rows(&db, &t).await.pop().unwrap();
            assert_eq!((last.op.as_str(), last.table.as_deref()), ("UPDATE", Some(table)));
            assert_eq!(
                last.changed.as_deref(),
                Some(&changed.iter().map(|c| c.to_string()).collect::<Vec<_>>()[..]),
                "{sql} on {table}"
            );
            let keys = last.pk.as_ref().and_then(|v| v.as_array()).expect("keys").clone();
            assert_eq!(keys.len(), rows, "{sql} on {table}");
            let mut got: Vec<(i64, String)> = keys
                .iter()
                .map(|k| (k["k"].as_i64().unwrap(), k["tag"].as_str().unwrap().to_owned()))
                .collect();
            got.sort();
            let want: Vec<(i64, String)> = (1..=rows as i64).map(|g| (g, format!("t{}", g % 3))).collect();
            assert_eq!(got, want, "every updated row's key, {sql} on {table}");
        }
    }
    // INSERT and DELETE, small and large, on the same columns.
    for (table, rows) in [("small", 3i64), ("large", 200)] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (k, tag, t, o, u) SELECT g, 'new', 1, 2, 3 FROM generate_series(1, {rows}) g"
        )))
        .execute(&mut app)
        .await
        .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE tag = 'new'")))
            .execute(&mut app)
            .await
            .unwrap();
        let audit = audit_rows(&db, &t).await;
        for entry in &audit[audit.len() - 2..] {
            assert_eq!(entry.table.as_deref(), Some(table));
            let mut got: Vec<(i64, String)> = entry
                .pk
                .as_ref()
                .and_then(|v| v.as_array())
                .expect("keys")
                .iter()
                .map(|k| (k["k"].as_i64().expect("k"), k["tag"].as_str().expect("tag").to_owned()))
                .collect();
            got.sort();
            let want: Vec<(i64, String)> = (1..=rows).map(|g| (g, "new".to_owned())).collect();
            assert_eq!(got, want, "{} on {table}", entry.op);
        }
    }
    verified(&db, &t).await;
}

/// A tenant's columns may be named like the trigger function's own
/// variables (`v_keys`, `v_time`, ..., `found`): the function reads a
/// tenant's rows only through whole-row references and names its variables
/// first (`#variable_conflict use_variable`). Before that, a column named
/// `v_keys` made every INSERT and DELETE of a few rows on its table fail
/// ("column reference is ambiguous"). Statements of a few rows and of many,
/// of none, and a composite key whose columns carry such names: each
/// entry holds the keys it should, and the chain verifies.
#[tokio::test]
async fn columns_named_like_the_triggers_variables_are_audited() {
    let db = setup("aud_var_names").await;
    let mut t = Tenant::new(&unique("vn"));
    t.converge(&db).await.unwrap();
    let (schema, owner) = (t.name.schema(), t.name.owner_role());
    let names = [
        "v_time",
        "v_actor",
        "v_given",
        "v_request",
        "v_first",
        "v_queue",
        "v_delay",
        "v_recent",
        "v_i",
        "v_cols",
        "v_all",
        "v_pks",
        "v_new",
        "v_old",
        "v_changed",
        "v_diff",
        "v_olds",
        "v_news",
        "found",
        "k",
        "n",
        "s",
        "p",
    ];
    let columns: String = names.iter().map(|c| format!(", {c} int")).collect();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {owner};
         CREATE TABLE {schema}.odd (v_keys int, tg_op text{columns}, PRIMARY KEY (v_keys, tg_op));
         RESET ROLE;"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    t.converge(&db).await.unwrap();
    let mut app = t.app(&db).await.unwrap();
    let statements = [
        (
            "INSERT INTO odd (v_keys, tg_op, v_i) VALUES (1, 'a', 1), (2, 'b', 1)",
            "INSERT",
            2,
        ),
        (
            "INSERT INTO odd (v_keys, tg_op, v_i) SELECT g, 'many', 1 FROM generate_series(10, 109) g",
            "INSERT",
            100,
        ),
        ("INSERT INTO odd (v_keys, tg_op) SELECT 1, 'none' WHERE false", "", 0),
        ("UPDATE odd SET v_time = 5, found = 1 WHERE tg_op = 'a'", "UPDATE", 1),
        ("UPDATE odd SET v_changed = 2 WHERE tg_op = 'many'", "UPDATE", 100),
        ("DELETE FROM odd WHERE tg_op = 'b'", "DELETE", 1),
        ("DELETE FROM odd WHERE tg_op = 'many'", "DELETE", 100),
        ("DELETE FROM odd WHERE tg_op = 'none'", "", 0),
    ];
    for (sql, op, rows) in statements {
        let before = audit_rows(&db, &t).await.len();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut app)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let audit = audit_rows(&db, &t).await;
        if rows == 0 {
            assert_eq!(audit.len(), before, "{sql}: no row, no entry");
            continue;
        }
        assert_eq!(audit.len(), before + 1, "{sql}: one entry");
        let last = audit.last().unwrap();
        assert_eq!((last.op.as_str(), last.table.as_deref()), (op, Some("odd")), "{sql}");
        let keys = last.pk.as_ref().and_then(|v| v.as_array()).expect("keys");
        assert_eq!(keys.len(), rows, "{sql}");
        assert!(
            keys.iter()
                .all(|k| k["v_keys"].is_i64() && k["tg_op"].is_string() && k.as_object().unwrap().len() == 2),
            "{sql}: every key is the row's (v_keys, tg_op): {keys:?}"
        );
        if op == "UPDATE" {
            let want: &[&str] = if rows == 1 {
                &["found", "v_time"]
            } else {
                &["v_changed"]
            };
            assert_eq!(
                last.changed.as_deref(),
                Some(&want.iter().map(|c| c.to_string()).collect::<Vec<_>>()[..]),
                "{sql}"
            );
        }
    }
    verified(&db, &t).await;
}

/// `spec.audit.excludeTables`: a listed table loses its audit triggers at
/// the next reconcile (its writes leave no entry; the rest of the log
/// still verifies), the change is recorded with who made it, a migration's
/// in-transaction audit check leaves it untriggered (and triggers a new
/// table next to it), and taking it off the list audits it again.
#[tokio::test]
async fn an_excluded_table_is_not_audited_and_migrations_leave_it_so() {
    let db = setup("aud_exclude").await;
    let mut t = tenant_with_docs(&db, "ex").await;
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {}; CREATE TABLE {schema}.\"job queue\" (id bigserial PRIMARY KEY, payload text); RESET ROLE",
        t.name.owner_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    t.spec.audit.exclude_tables = vec!["job queue".into(), "not there yet".into()];
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, Vec::<&str>::new(), "the new excluded table gets no triggers");
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged");
    let events: Vec<(String, String, serde_json::Value)> = sqlx::query_as(
        "SELECT action, actor, detail FROM tenancy.audit_log WHERE tenant_uid = $1 AND action = 'AuditExclusionChanged'",
    )
    .bind(&t.uid)
    .fetch_all(&db.admin)
    .await
    .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1, "test");
    assert_eq!(events[0].2["to"], serde_json::json!(["job queue", "not there yet"]));

    let mut app = t.app(&db).await.unwrap();
    sqlx::raw_sql("INSERT INTO \"job queue\" (payload) VALUES ('a'); UPDATE \"job queue\" SET payload = 'b'; DELETE FROM \"job queue\"; INSERT INTO docs (body) VALUES ('kept')")
        .execute(&mut app)
        .await
        .unwrap();
    assert_eq!(
        audited_tables(&db, &t).await,
        ["docs"],
        "only the audited table's write"
    );

    // A migration: creates the excluded table's neighbour (audited in the
    // migration's transaction) and the table "not there yet" (excluded).
    let login = pg::migrations::ops_login(&db.admin, &support::test_ring(), &t.name)
        .await
        .unwrap()
        .expect("registered");
    assert_eq!(login.audit_exclude(), ["job queue", "not there yet"]);
    let set = SetRef {
        name: "default".into(),
        generation: 1,
    };
    let migrations = vec![MigrationSql::new(
        1,
        "m1".to_string(),
        "CREATE TABLE notes (id int PRIMARY KEY); CREATE TABLE \"not there yet\" (id int PRIMARY KEY)",
        true,
    )];
    pg::migrations::migrate_tenant(&db.admin, &login, &set, &migrations, &Timeouts::default())
        .await
        .unwrap();
    sqlx::raw_sql("INSERT INTO notes VALUES (1); INSERT INTO \"not there yet\" VALUES (1)")
        .execute(&mut app)
        .await
        .unwrap();
    assert_eq!(audited_tables(&db, &t).await, ["docs", "notes"]);
    assert_eq!(
        t.converge(&db).await.unwrap().statements,
        0,
        "the migration left it converged"
    );
    verified(&db, &t).await;

    // Off the list: audited again.
    t.spec.audit.exclude_tables = vec!["not there yet".into()];
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    sqlx::raw_sql("INSERT INTO \"job queue\" (payload) VALUES ('c')")
        .execute(&mut app)
        .await
        .unwrap();
    assert_eq!(audited_tables(&db, &t).await, ["docs", "notes", "job queue"]);
    verified(&db, &t).await;
}

async fn audited_tables(db: &TestDb, t: &Tenant) -> Vec<String> {
    audit_rows(db, t)
        .await
        .into_iter()
        .map(|a| a.table.unwrap_or_default())
        .collect()
}

/// `sql` with each audit function written by its base name and an opening
/// parenthesis (`_tenancy_audit_trigger(`) given the tenant's own name
/// (`_tenancy_audit_trigger_<tenant>(`); trigger names, never followed by
/// one, are left alone.
fn own_functions(sql: &str, name: &tenant_operator::names::TenantName) -> String {
    let fns = pg::audit::AuditFns::of(name);
    sql.replace("_tenancy_audit_write(", &format!("{}(", fns.write))
        .replace("_tenancy_audit_trigger(", &format!("{}(", fns.trigger))
        .replace("_tenancy_audit_guard(", &format!("{}(", fns.guard))
        .replace("_tenancy_audit_tail(", &format!("{}(", fns.tail))
        .replace("_tenancy_audit_seal(", &format!("{}(", fns.seal))
}

/// The arguments of the audit trigger `tg` of `table`: the key index's oid,
/// then the key's column names (`pg_trigger.tgargs`, NUL-terminated).
async fn trigger_args(db: &TestDb, t: &Tenant, table: &str, tg: &str) -> Vec<String> {
    let args: Vec<u8> = sqlx::query_scalar(
        "SELECT t.tgargs FROM pg_trigger t WHERE t.tgrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass AND t.tgname = $3",
    )
    .bind(t.name.schema())
    .bind(table)
    .bind(tg)
    .fetch_one(&db.su)
    .await
    .unwrap();
    args.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect()
}

/// A row of `orders` with new values at each call (rolled back).
const FRESH_ORDER: &str = "INSERT INTO orders SELECT n, 'w', n FROM (SELECT (1000 + random() * 1e9)::int AS n) s";

/// How many times one more audited `insert` on `conn` scans `pg_index` or
/// its index by table (the trigger function's catalog query for the key;
/// the checks of its arguments use the caches), in a transaction rolled back, after a
/// first `insert` warmed the session's caches.
async fn key_queries_of(conn: &mut PgConnection, insert: &str) -> i64 {
    let scans = "SELECT pg_stat_get_xact_numscans('pg_catalog.pg_index'::regclass)
                        + pg_stat_get_xact_numscans('pg_catalog.pg_index_indrelid_index'::regclass)";
    exec(conn, "BEGIN").await;
    exec(conn, insert).await;
    let before: i64 = sqlx::query_scalar(scans).fetch_one(&mut *conn).await.unwrap();
    exec(conn, insert).await;
    let after: i64 = sqlx::query_scalar(scans).fetch_one(&mut *conn).await.unwrap();
    exec(conn, "ROLLBACK").await;
    after - before
}

/// The keys of the tenant's last audit entry, on `orders`.
async fn last_keys(db: &TestDb, t: &Tenant) -> serde_json::Value {
    let last = audit_rows(db, t).await.pop().unwrap();
    assert_eq!(last.table.as_deref(), Some("orders"));
    last.pk.unwrap()
}

async fn key_index(db: &TestDb, t: &Tenant, table: &str) -> String {
    sqlx::query_scalar(
        "SELECT i.indexrelid::text FROM pg_index i WHERE i.indrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass AND i.indisprimary",
    )
    .bind(t.name.schema())
    .bind(table)
    .fetch_one(&db.su)
    .await
    .unwrap()
}

/// The triggers carry the table's primary key (its index and column names)
/// so that a statement does not query the catalog for it; an entry still
/// names the key the catalog has when the statement runs: after a rename or
/// a new key in the same transaction, with another replica identity, with
/// triggers of an earlier version (no arguments). The next reconcile gives
/// the triggers the current key.
#[tokio::test]
async fn an_entry_names_the_key_the_catalog_has_whatever_the_triggers_carry() {
    let db = setup("aud_key_args").await;
    let mut t = Tenant::new(&unique("ka"));
    t.converge(&db).await.unwrap();
    let (schema, owner) = (t.name.schema(), t.name.owner_role());
    let mut su = db.superuser().await;
    exec(
        &mut su,
        &format!(
            "SET ROLE {owner}; CREATE TABLE {schema}.orders (\"Order Id\" int, sku text, x int NOT NULL UNIQUE, PRIMARY KEY (\"Order Id\", sku)); RESET ROLE;"
        ),
    )
    .await;
    t.converge(&db).await.unwrap();
    let idx = key_index(&db, &t, "orders").await;
    for tg in [
        "_tenancy_audit_ins",
        "_tenancy_audit_update",
        "_tenancy_audit_del",
        "_tenancy_audit_trunc",
    ] {
        assert_eq!(
            trigger_args(&db, &t, "orders", tg).await,
            [idx.as_str(), "Order Id", "sku"],
            "{tg}"
        );
    }
    // The trigger function's own check of them holds for a quoted name: the
    // statement takes them, not the catalog query.
    let holds: bool = sqlx::query_scalar(
        "SELECT pg_get_replica_identity_index($1::regclass) = $2::oid
            AND pg_get_indexdef($2::oid, 1, false) = quote_ident('Order Id')
            AND pg_get_indexdef($2::oid, 2, false) = quote_ident('sku')",
    )
    .bind(format!("{schema}.orders"))
    .bind(&idx)
    .fetch_one(&db.su)
    .await
    .unwrap();
    assert!(holds);
    let mut app = t.app(&db).await.unwrap();
    // And it takes them: no catalog query for the key.
    assert_eq!(key_queries_of(&mut app, FRESH_ORDER).await, 0);
    exec(&mut app, "INSERT INTO orders VALUES (1, 'a', 10)").await;
    assert_eq!(
        last_keys(&db, &t).await,
        serde_json::json!([{"Order Id": 1, "sku": "a"}])
    );
    exec(&mut app, "UPDATE orders SET x = 11 WHERE sku = 'a'").await;
    assert_eq!(
        last_keys(&db, &t).await,
        serde_json::json!([{"Order Id": 1, "sku": "a"}])
    );

    // A migration renames a key column and writes in its own transaction,
    // before any reconcile: the triggers' names are stale.
    exec(
        &mut su,
        &format!(
            "BEGIN; SET LOCAL ROLE {owner}; ALTER TABLE {schema}.orders RENAME \"Order Id\" TO order_no;
             INSERT INTO {schema}.orders VALUES (2, 'b', 20); COMMIT;"
        ),
    )
    .await;
    // Stale arguments: the catalog query (the measure can see it).
    assert!(key_queries_of(&mut app, FRESH_ORDER).await >= 1);
    assert_eq!(
        last_keys(&db, &t).await,
        serde_json::json!([{"order_no": 2, "sku": "b"}])
    );
    // Another key, from columns that all existed, in one transaction.
    exec(
        &mut su,
        &format!(
            "BEGIN; SET LOCAL ROLE {owner}; ALTER TABLE {schema}.orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (x);
             INSERT INTO {schema}.orders VALUES (3, 'c', 30); COMMIT;"
        ),
    )
    .await;
    assert_eq!(last_keys(&db, &t).await, serde_json::json!([{"x": 30}]));
    exec(&mut app, "DELETE FROM orders WHERE x = 30").await;
    assert_eq!(last_keys(&db, &t).await, serde_json::json!([{"x": 30}]));
    // The next reconcile gives the triggers the new key.
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    let idx = key_index(&db, &t, "orders").await;
    assert_eq!(
        trigger_args(&db, &t, "orders", "_tenancy_audit_ins").await,
        [idx.as_str(), "x"]
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged: no DDL");
    // A replica identity other than the key: the catalog's key.
    exec(
        &mut su,
        &format!(
            "SET ROLE {owner}; ALTER TABLE {schema}.orders REPLICA IDENTITY USING INDEX orders_x_key; RESET ROLE;"
        ),
    )
    .await;
    exec(&mut app, "INSERT INTO orders VALUES (4, 'd', 40)").await;
    assert_eq!(last_keys(&db, &t).await, serde_json::json!([{"x": 40}]));
    exec(
        &mut su,
        &format!("SET ROLE {owner}; ALTER TABLE {schema}.orders REPLICA IDENTITY FULL; ALTER TABLE {schema}.orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (order_no, sku); RESET ROLE;"),
    )
    .await;
    exec(&mut app, "INSERT INTO orders VALUES (5, 'e', 50)").await;
    assert_eq!(
        last_keys(&db, &t).await,
        serde_json::json!([{"order_no": 5, "sku": "e"}])
    );

    // Triggers of an earlier version, without arguments: exact keys, and
    // the next reconcile replaces them.
    let f = format!("{schema}._tenancy_audit_trigger_{}", t.name.as_str().replace('-', "_"));
    exec(
        &mut su,
        &format!(
            "SET ROLE {owner}; DROP TRIGGER _tenancy_audit_ins ON {schema}.orders;
             CREATE TRIGGER _tenancy_audit_ins AFTER INSERT ON {schema}.orders REFERENCING NEW TABLE AS tenancy_new FOR EACH STATEMENT EXECUTE FUNCTION {f}(); RESET ROLE;"
        ),
    )
    .await;
    assert!(trigger_args(&db, &t, "orders", "_tenancy_audit_ins").await.is_empty());
    exec(&mut app, "INSERT INTO orders VALUES (6, 'f', 60)").await;
    assert_eq!(
        last_keys(&db, &t).await,
        serde_json::json!([{"order_no": 6, "sku": "f"}])
    );
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    assert_eq!(labels, ["AuditTable"]);
    let idx = key_index(&db, &t, "orders").await;
    assert_eq!(
        trigger_args(&db, &t, "orders", "_tenancy_audit_ins").await,
        [idx.as_str(), "order_no", "sku"]
    );
    // A key column whose name holds quotes and a backslash: the arguments
    // are quoted as literals, compared byte for byte, and taken.
    exec(
        &mut su,
        &format!(
            "SET ROLE {owner}; CREATE TABLE {schema}.q (\"it's \"\"x\"\" \\\" int, v int, PRIMARY KEY (\"it's \"\"x\"\" \\\")); RESET ROLE;"
        ),
    )
    .await;
    t.converge(&db).await.unwrap();
    let idx = key_index(&db, &t, "q").await;
    assert_eq!(
        trigger_args(&db, &t, "q", "_tenancy_audit_ins").await,
        [idx.as_str(), "it's \"x\" \\"]
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged: no DDL");
    exec(&mut app, "INSERT INTO q VALUES (7, 1)").await;
    let last = audit_rows(&db, &t).await.pop().unwrap();
    assert_eq!(last.table.as_deref(), Some("q"));
    assert_eq!(last.pk.unwrap(), serde_json::json!([{"it's \"x\" \\": 7}]));
    drop(app);
    verified(&db, &t).await;
}
