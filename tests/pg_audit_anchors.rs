//! The audit log against a tenant's own owner (what a MigrationSet can do),
//! with the non-superuser admin (docs/audit.md, "Anchors" and "Who runs
//! what"): the operator touches the tenant's audit relations only on the
//! tenant's confined session, so owner-written triggers, RLS policies and
//! views never run as the admin; the chain's head is anchored in
//! `tenancy.*` and HMAC'd anchors find a consistent rewrite, a head moved
//! back and a forged anchor; the anchor functions are the owner's alone;
//! a restore rebases the anchors; a delete leaves nothing.

mod support;

use sqlx::{Connection, PgConnection};
use support::tenant::Tenant;
use support::{test_ring, unique, TestDb};
use tenant_operator::crypto::Keyring;
use tenant_operator::pg;
use tenant_operator::pg::confined::{self, Confined, OpsLogin};

async fn setup(label: &str) -> TestDb {
    let db = TestDb::new(label).await;
    pg::migrate_control_schema(&db.admin).await.expect("control schema");
    let facts = pg::admin_facts(&db.admin).await.expect("facts");
    assert!(!facts.superuser, "tests must run as a non-superuser admin");
    db
}

fn sqlstate(e: &sqlx::Error) -> String {
    e.as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.to_string())
        .unwrap_or_else(|| format!("not a database error: {e}"))
}

/// A provisioned tenant with an audited table `docs`.
async fn tenant_with_docs(db: &TestDb, base: &str) -> Tenant {
    let mut t = Tenant::new(&unique(base));
    t.converge(db).await.expect("provision");
    let mut c = owner(db, &t).await;
    sqlx::raw_sql("CREATE TABLE docs (id serial PRIMARY KEY, body text)")
        .execute(&mut *c)
        .await
        .expect("create docs as the owner");
    c.close().await;
    t.converge(db).await.expect("audit docs");
    t
}

/// The tenant's confined session: its owner, as a migration runs.
async fn owner(db: &TestDb, t: &Tenant) -> Confined {
    confined::connect(&db.admin, &login(db, t, &test_ring()).await)
        .await
        .expect("confined session")
}

async fn login(db: &TestDb, t: &Tenant, ring: &Keyring) -> OpsLogin {
    let salt = pg::registry::existing_key_salt(&db.admin, &t.uid)
        .await
        .unwrap()
        .expect("salt");
    OpsLogin::derive(
        &pg::Target::from_url(&db.admin_url).unwrap(),
        &t.name,
        &t.uid,
        ring,
        &salt,
    )
    .unwrap()
}

async fn write(db: &TestDb, t: &Tenant, bodies: &[&str]) {
    let mut app = t.app(db).await.unwrap();
    for b in bodies {
        sqlx::query("INSERT INTO docs (body) VALUES ($1)")
            .bind(*b)
            .execute(&mut app)
            .await
            .unwrap();
    }
}

async fn verify(db: &TestDb, t: &Tenant) -> pg::audit::VerifyReport {
    pg::audit::verify(&db.admin, &test_ring(), &t.name)
        .await
        .expect("verify runs")
}

async fn broken(db: &TestDb, t: &Tenant) -> pg::audit::ChainBreak {
    verify(db, t)
        .await
        .first_break
        .expect("the chain should be found broken")
}

/// SQL, as the owner, that recomputes every hash of the chain from row
/// `from` on (after the owner has turned the guard off), the way an owner
/// who wants a consistent rewrite would.
fn rechain_sql(schema: &str) -> String {
    let content = pg::audit::content_sql(
        "r.\"time\"",
        "r.actor",
        "r.actor_given",
        "r.request_id",
        "r.operation",
        "r.table_name",
        "r.row_pk",
        "r.changed_columns",
    );
    format!(
        "DO $x$ DECLARE r record; v_prev bytea := decode(repeat('00', 32), 'hex'); v_hash bytea; BEGIN
           FOR r IN SELECT * FROM {schema}._tenancy_audit ORDER BY id LOOP
             v_hash := sha256(v_prev || {content});
             UPDATE {schema}._tenancy_audit SET prev_hash = v_prev, hash = v_hash WHERE id = r.id;
             v_prev := v_hash;
           END LOOP;
           UPDATE {schema}._tenancy_audit_head SET last_id = (SELECT max(id) FROM {schema}._tenancy_audit), hash = v_prev;
         END $x$"
    )
}

#[tokio::test]
async fn a_consistent_rewrite_by_the_owner_before_the_latest_anchor_is_found() {
    let db = setup("anc_rewrite").await;
    let t = tenant_with_docs(&db, "rw").await;
    write(&db, &t, &["a", "b", "c", "d"]).await;
    // The operator's periodic pass anchors the head.
    assert_eq!(pg::audit::anchor_heads(&db.admin, &test_ring(), None).await.unwrap(), 1);
    assert_eq!(
        pg::audit::anchor_heads(&db.admin, &test_ring(), None).await.unwrap(),
        0,
        "an idle tenant gets no anchor"
    );
    let ok = verify(&db, &t).await;
    assert_eq!(ok.first_break, None);
    assert_eq!(ok.anchors_checked, 1);

    // The owner (a MigrationSet) edits row 2, recomputes every later hash
    // and the in-schema head, then appends one entry so that the anchored
    // head in tenancy moves forward onto the rewritten chain.
    let schema = t.name.schema();
    let mut c = owner(&db, &t).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE _tenancy_audit DISABLE TRIGGER USER;
         UPDATE _tenancy_audit SET actor = 'someone-else' WHERE id = (SELECT min(id) + 1 FROM _tenancy_audit);
         {};
         ALTER TABLE _tenancy_audit ENABLE TRIGGER USER;",
        rechain_sql(&schema)
    )))
    .execute(&mut *c)
    .await
    .expect("the owner rewrites its chain");
    c.close().await;
    write(&db, &t, &["e"]).await;
    // Without the anchors the rewrite would pass: the chain, the in-schema
    // head and the anchored head all agree.
    let b = broken(&db, &t).await;
    assert!(b.what.contains("anchor #1"), "{}", b.what);
    assert!(b.what.contains("re-chained"), "{}", b.what);
}

#[tokio::test]
async fn the_anchored_head_moves_forward_only_and_a_cut_tail_is_found() {
    let db = setup("anc_back").await;
    let t = tenant_with_docs(&db, "bk").await;
    write(&db, &t, &["a", "b", "c"]).await;
    let schema = t.name.schema();
    let f = format!("tenancy_audit.{schema}");
    let mut c = owner(&db, &t).await;
    // Back to the first entry, or the same last entry with another hash.
    for sql in [
        format!("SELECT {f}(a.id, a.hash) FROM _tenancy_audit a ORDER BY a.id LIMIT 1"),
        format!("SELECT {f}(h.last_id, sha256(h.hash)) FROM _tenancy_audit_head h"),
        format!("SELECT {f}(0, decode(repeat('00', 32), 'hex'))"),
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *c)
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
        assert!(err.to_string().contains("cannot move back"), "{err}");
    }
    // The owner removes its last entry and sets its in-schema head back:
    // the head in tenancy still names the removed row.
    sqlx::raw_sql(
        "ALTER TABLE _tenancy_audit DISABLE TRIGGER USER;
         DELETE FROM _tenancy_audit WHERE id = (SELECT max(id) FROM _tenancy_audit);
         UPDATE _tenancy_audit_head SET (last_id, hash) = (SELECT id, hash FROM _tenancy_audit ORDER BY id DESC LIMIT 1);
         ALTER TABLE _tenancy_audit ENABLE TRIGGER USER;",
    )
    .execute(&mut *c)
    .await
    .expect("the owner cuts its tail");
    c.close().await;
    let b = broken(&db, &t).await;
    assert!(b.what.contains("anchored head"), "{}", b.what);
    assert!(b.what.contains("rows at the end"), "{}", b.what);
}

#[tokio::test]
async fn a_forged_or_removed_anchor_is_found() {
    let db = setup("anc_forge").await;
    let t = tenant_with_docs(&db, "fg").await;
    for body in ["a", "b", "c"] {
        write(&db, &t, &[body]).await;
        pg::audit::anchor_heads(&db.admin, &test_ring(), Some(&t.uid))
            .await
            .unwrap();
    }
    assert_eq!(verify(&db, &t).await.anchors_checked, 3);
    let mut su = db.superuser().await;
    // A superuser (or anyone who can write tenancy.*) adds an anchor
    // without the key.
    sqlx::query(
        "INSERT INTO tenancy.audit_anchors (tenant_uid, seq, last_id, hash, anchored_at, key_version, prev_mac, mac)
         SELECT tenant_uid, seq + 1, last_id, hash, now(), key_version, mac, sha256(mac) FROM tenancy.audit_anchors
          WHERE tenant_uid = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(&t.uid)
    .execute(&mut su)
    .await
    .unwrap();
    let b = broken(&db, &t).await;
    assert!(b.what.contains("does not verify"), "{}", b.what);
    // Removing anchors from the middle breaks their links.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DELETE FROM tenancy.audit_anchors WHERE tenant_uid = '{uid}' AND seq = (SELECT max(seq) FROM tenancy.audit_anchors WHERE tenant_uid = '{uid}');
         DELETE FROM tenancy.audit_anchors WHERE tenant_uid = '{uid}' AND seq = 2",
        uid = t.uid
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let b = broken(&db, &t).await;
    assert!(b.what.contains("does not follow"), "{}", b.what);
}

#[tokio::test]
async fn only_the_tenants_owner_may_call_its_anchor_function() {
    let db = setup("anc_rights").await;
    let a = tenant_with_docs(&db, "ra").await;
    let b = tenant_with_docs(&db, "rb").await;
    let (fa, fb) = (
        format!("tenancy_audit.{}", a.name.schema()),
        format!("tenancy_audit.{}", b.name.schema()),
    );
    let genesis = "decode(repeat('00', 32), 'hex')";
    let mut app = a.app(&db).await.unwrap();
    for f in [&fa, &fb] {
        let sql = format!("SELECT {f}(1000000, {genesis})");
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut app)
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&err), "42501", "the app role called {f}: {err}");
    }
    let mut c = owner(&db, &a).await;
    let sql = format!("SELECT {fb}(1000000, {genesis})");
    let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
        .execute(&mut *c)
        .await
        .expect_err(&sql);
    assert_eq!(sqlstate(&err), "42501", "a's owner called b's anchor function: {err}");
    // Nor may it write tenancy.audit_heads itself, or create in the anchor schema.
    for sql in [
        format!(
            "UPDATE tenancy.audit_heads SET last_id = 0 WHERE tenant_uid = '{}'",
            b.uid
        ),
        "CREATE FUNCTION tenancy_audit.x() RETURNS int LANGUAGE sql AS 'SELECT 1'".to_string(),
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut *c)
            .await
            .expect_err(&sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    c.close().await;
    assert_eq!(verify(&db, &b).await.first_break, None);
}

/// Owner-written objects that try, whenever they run, what only the admin
/// could: change a role, write the control schema, read another tenant.
async fn plant_hostile(db: &TestDb, a: &Tenant, b: &Tenant) {
    let facts = pg::admin_facts(&db.admin).await.unwrap();
    let mut c = owner(db, a).await;
    let sql = format!(
        // `_tenancy_*` tables are not audited: no recursion through the log.
        r#"CREATE TABLE _tenancy_ran (session_role text, at text);
           CREATE TABLE _tenancy_loot (v text);
           CREATE FUNCTION hostile(p_at text) RETURNS boolean LANGUAGE plpgsql AS $h$
           BEGIN
             BEGIN EXECUTE 'RESET ROLE'; EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN EXECUTE 'ALTER ROLE {app} CONNECTION LIMIT 77'; EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN EXECUTE 'ALTER ROLE {admin} CONNECTION LIMIT 77'; EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN INSERT INTO tenancy.audit_log (tenant_uid, action, actor) VALUES ('x', 'forged', 'hostile'); EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN INSERT INTO {a_schema}._tenancy_loot SELECT v FROM {b_schema}.secrets; EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN EXECUTE 'SET ROLE {owner}'; EXCEPTION WHEN OTHERS THEN NULL; END;
             BEGIN INSERT INTO {a_schema}._tenancy_ran VALUES (session_user, p_at); EXCEPTION WHEN OTHERS THEN NULL; END;
             RETURN true;
           END $h$;
           CREATE FUNCTION hostile_trigger() RETURNS trigger LANGUAGE plpgsql AS $h$ BEGIN PERFORM {a_schema}.hostile(TG_TABLE_NAME); RETURN NEW; END $h$;"#,
        app = a.name.app_role(),
        admin = facts.role,
        owner = a.name.owner_role(),
        a_schema = a.name.schema(),
        b_schema = b.name.schema(),
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *c)
        .await
        .expect("the owner plants its functions");
    c.close().await;
    let mut cb = owner(db, b).await;
    sqlx::raw_sql("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('b-only')")
        .execute(&mut *cb)
        .await
        .unwrap();
    cb.close().await;
}

/// Nothing the hostile objects tried happened, and they did run (never as
/// the admin).
async fn nothing_happened(db: &TestDb, a: &Tenant) {
    let mut su = db.superuser().await;
    let facts = pg::admin_facts(&db.admin).await.unwrap();
    let limits: Vec<i32> = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = ANY($1)")
        .bind(vec![a.name.app_role(), facts.role.clone()])
        .fetch_all(&mut su)
        .await
        .unwrap();
    assert!(!limits.contains(&77), "a role was altered: {limits:?}");
    let forged: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE action = 'forged'")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert_eq!(forged, 0, "the control schema was written");
    let schema = a.name.schema();
    let loot: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}._tenancy_loot"
    )))
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(loot, 0, "another tenant's rows were read");
    let sessions: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT DISTINCT session_role FROM {schema}._tenancy_ran"
    )))
    .fetch_all(&mut su)
    .await
    .unwrap();
    assert!(
        sessions.contains(&a.name.ops_role()),
        "the hostile objects never ran on the operator's session: {sessions:?}"
    );
    assert!(
        !sessions.contains(&facts.role),
        "the hostile objects ran as the admin: {sessions:?}"
    );
}

#[tokio::test]
async fn an_owner_trigger_on_the_head_or_an_rls_policy_on_the_log_never_runs_as_the_admin() {
    let db = setup("anc_hostile").await;
    let mut a = tenant_with_docs(&db, "ha").await;
    let b = tenant_with_docs(&db, "hb").await;
    plant_hostile(&db, &a, &b).await;
    let mut c = owner(&db, &a).await;
    sqlx::raw_sql(
        "CREATE TRIGGER hostile BEFORE UPDATE ON _tenancy_audit_head FOR EACH ROW EXECUTE FUNCTION hostile_trigger();
         ALTER TABLE _tenancy_audit ENABLE ROW LEVEL SECURITY;
         ALTER TABLE _tenancy_audit FORCE ROW LEVEL SECURITY;
         CREATE POLICY hostile ON _tenancy_audit USING (hostile('policy')) WITH CHECK (hostile('policy-check'));",
    )
    .execute(&mut *c)
    .await
    .expect("the owner plants a trigger and a policy");
    c.close().await;
    write(&db, &a, &["x", "y"]).await;
    // Everything the operator does on the audit log.
    a.spec.audit.retention_days = Some(30);
    a.converge(&db).await.expect("converge with retention");
    let p = pg::audit::prune(&db.admin, &test_ring(), &a.name, chrono::Utc::now(), "test")
        .await
        .expect("prune");
    assert!(p.deleted > 0);
    assert_eq!(verify(&db, &a).await.first_break, None);
    let mut out = Vec::new();
    let n = pg::audit::export(&db.admin, &test_ring(), &a.name, chrono::DateTime::UNIX_EPOCH, &mut out)
        .await
        .expect("export");
    assert!(n > 0);
    nothing_happened(&db, &a).await;
}

#[tokio::test]
async fn a_view_in_place_of_the_head_table_is_reported_and_never_read() {
    let db = setup("anc_view").await;
    let mut a = tenant_with_docs(&db, "va").await;
    let b = tenant_with_docs(&db, "vb").await;
    plant_hostile(&db, &a, &b).await;
    write(&db, &a, &["x"]).await;
    let mut c = owner(&db, &a).await;
    sqlx::raw_sql(
        "ALTER TABLE _tenancy_audit_head RENAME TO old_head;
         CREATE VIEW _tenancy_audit_head AS SELECT h.* FROM old_head h WHERE hostile('view');",
    )
    .execute(&mut *c)
    .await
    .expect("the owner replaces the head by a view");
    c.close().await;
    let err = a
        .converge(&db)
        .await
        .expect_err("a view in place of the head converged");
    assert!(
        err.to_string().contains("_tenancy_audit_head") && err.to_string().contains("not a table"),
        "{err}"
    );
    let err = pg::audit::verify(&db.admin, &test_ring(), &a.name)
        .await
        .expect_err("verified through a view");
    assert!(err.to_string().contains("not a table"), "{err}");
    let err = pg::audit::export(
        &db.admin,
        &test_ring(),
        &a.name,
        chrono::DateTime::UNIX_EPOCH,
        &mut Vec::new(),
    )
    .await
    .expect_err("exported");
    assert!(err.to_string().contains("not a table"), "{err}");
    let mut su = db.superuser().await;
    let ran: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}._tenancy_ran",
        a.name.schema()
    )))
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(ran, 0, "the view was read by the operator");
    let limits: Vec<i32> = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(a.name.app_role())
        .fetch_all(&mut su)
        .await
        .unwrap();
    assert!(!limits.contains(&77));
}

#[tokio::test]
async fn a_tenant_whose_chain_predates_anchoring_is_anchored_by_the_next_reconcile() {
    let db = setup("anc_upgrade").await;
    let mut t = tenant_with_docs(&db, "up").await;
    write(&db, &t, &["a", "b"]).await;
    // Back to the state before anchoring: no anchor function, no head or
    // anchors in tenancy, the old commit-time function (per entry, on the
    // audit table, as it was then).
    let schema = t.name.schema();
    let tail = pg::audit::AuditFns::of(&t.name).tail;
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP FUNCTION tenancy_audit.{schema}(bigint, bytea);
         DELETE FROM tenancy.audit_anchors WHERE tenant_uid = '{uid}'; DELETE FROM tenancy.audit_heads WHERE tenant_uid = '{uid}';
         CREATE OR REPLACE FUNCTION {schema}.{tail}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
         BEGIN
           IF NEW.id = (SELECT max(a.id) FROM {schema}._tenancy_audit a) THEN
             UPDATE {schema}._tenancy_audit_head SET last_id = NEW.id, hash = NEW.hash;
           END IF;
           RETURN NULL;
         END $f$;
         DROP TRIGGER _tenancy_audit_tail ON {schema}._tenancy_audit_pending;
         CREATE CONSTRAINT TRIGGER _tenancy_audit_tail AFTER INSERT ON {schema}._tenancy_audit DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION {schema}.{tail}();",
        uid = t.uid
    )))
    .execute(&mut su)
    .await
    .unwrap();
    write(&db, &t, &["c"]).await;
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.audit.actions.iter().map(|a| a.label()).collect();
    // The tail moves back to the pending table (once per transaction).
    assert_eq!(
        labels,
        [
            "ReplaceAuditFunctions",
            "GuardAuditTable",
            "AnchorFunction",
            "SeedAuditHead"
        ]
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "converged");
    write(&db, &t, &["d"]).await;
    let r = verify(&db, &t).await;
    assert_eq!(r.first_break, None);
    assert_eq!(r.rows, 4);
}

#[tokio::test]
async fn a_restore_rebases_the_anchors_onto_the_restored_chain() {
    let db = setup("anc_restore").await;
    let t = tenant_with_docs(&db, "rs").await;
    write(&db, &t, &["a", "b"]).await;
    let schema = t.name.schema();
    let kept: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT last_id FROM {schema}._tenancy_audit_head"
    )))
    .fetch_one(&db.su)
    .await
    .unwrap();
    write(&db, &t, &["c", "d"]).await;
    pg::audit::anchor_heads(&db.admin, &test_ring(), None).await.unwrap();
    // What a restore of an older backup leaves: the chain as it was at `kept`.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET session_replication_role = replica;
         DELETE FROM {schema}._tenancy_audit WHERE id > {kept};
         UPDATE {schema}._tenancy_audit_head SET (last_id, hash) = (SELECT id, hash FROM {schema}._tenancy_audit WHERE id = {kept});
         SELECT setval('{schema}._tenancy_audit_id_seq', {kept});
         RESET session_replication_role"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    assert!(broken(&db, &t).await.what.contains("rows at the end"));
    // The restored chain's commits are refused until the operator rebases.
    let mut app = t.app(&db).await.unwrap();
    let err = sqlx::query("INSERT INTO docs (body) VALUES ('early')")
        .execute(&mut app)
        .await
        .expect_err("a write moved the head back");
    assert!(err.to_string().contains("cannot move back"), "{err}");
    let out = pg::audit::rebase_after_restore(
        &db.admin,
        &test_ring(),
        &login(&db, &t, &test_ring()).await,
        "test",
        serde_json::json!({"backup": "b-1"}),
    )
    .await
    .expect("rebase");
    assert_eq!(out.to.0, kept);
    assert!(out.from.is_some_and(|f| f.0 > kept));
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM tenancy.audit_log WHERE tenant_uid = $1 AND action = 'AuditRebased' AND detail->'restore'->>'backup' = 'b-1'")
        .bind(&t.uid)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    let r = verify(&db, &t).await;
    assert_eq!(r.first_break, None);
    write(&db, &t, &["after"]).await;
    assert_eq!(verify(&db, &t).await.first_break, None);
}

#[tokio::test]
async fn deleting_a_tenant_removes_its_anchoring() {
    let db = setup("anc_delete").await;
    let t = tenant_with_docs(&db, "dl").await;
    write(&db, &t, &["a"]).await;
    pg::audit::anchor_heads(&db.admin, &test_ring(), None).await.unwrap();
    assert!(!pg::audit::leftovers(&db.admin, &t.name, &t.uid)
        .await
        .unwrap()
        .is_empty());
    pg::tenant::drop_tenant(&db.admin, &t.name, &t.uid, "test")
        .await
        .expect("drop");
    assert_eq!(
        pg::tenant::leftovers(&db.admin, &t.name, &t.uid).await.unwrap(),
        Vec::<String>::new()
    );
    let mut c = PgConnection::connect(&db.superuser_url).await.unwrap();
    let (f, h, a): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace WHERE s.nspname = 'tenancy_audit' AND p.proname = $1),
                (SELECT count(*) FROM tenancy.audit_heads WHERE tenant_uid = $2),
                (SELECT count(*) FROM tenancy.audit_anchors WHERE tenant_uid = $2)",
    )
    .bind(t.name.schema())
    .bind(&t.uid)
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!((f, h, a), (0, 0, 0));
}

/// What the anchor observation reports after each change to the tenant's
/// anchor function (made as the superuser in a transaction, rolled back
/// after): only the function as the operator makes it (its source,
/// SECURITY DEFINER, the anchor role as owner, the search_path, the
/// ownership comment, EXECUTE for the tenant's owner and nobody else, the
/// owner's USAGE on the schema) is current.
#[tokio::test]
async fn the_anchor_observation_reports_each_change_to_the_anchor_function() {
    let db = setup("anc_observe").await;
    let t = tenant_with_docs(&db, "ao").await;
    let f = format!("{}.{}(bigint, bytea)", pg::audit::ANCHOR_SCHEMA, t.name.schema());
    let owner = t.name.owner_role();
    let cases: Vec<(&str, String, bool)> = vec![
        ("nothing", "SELECT 1".into(), true),
        (
            "made SECURITY INVOKER",
            format!("ALTER FUNCTION {f} SECURITY INVOKER"),
            false,
        ),
        ("its search_path reset", format!("ALTER FUNCTION {f} RESET ALL"), false),
        (
            "its search_path changed",
            format!("ALTER FUNCTION {f} SET search_path = public"),
            false,
        ),
        (
            "given to another owner",
            format!("ALTER FUNCTION {f} OWNER TO postgres"),
            false,
        ),
        (
            "its comment changed",
            format!("COMMENT ON FUNCTION {f} IS 'someone else''s'"),
            false,
        ),
        ("its comment dropped", format!("COMMENT ON FUNCTION {f} IS NULL"), false),
        (
            "EXECUTE granted to PUBLIC",
            format!("GRANT EXECUTE ON FUNCTION {f} TO PUBLIC"),
            false,
        ),
        (
            "EXECUTE granted to another role",
            format!(
                "CREATE ROLE anc_other_{}; GRANT EXECUTE ON FUNCTION {f} TO anc_other_{}",
                t.uid.replace('-', "_"),
                t.uid.replace('-', "_")
            ),
            false,
        ),
        (
            "EXECUTE revoked from the owner",
            format!("REVOKE EXECUTE ON FUNCTION {f} FROM {owner}"),
            false,
        ),
        (
            "the owner's USAGE on the schema revoked",
            format!(
                "REVOKE USAGE ON SCHEMA {s} FROM PUBLIC; REVOKE USAGE ON SCHEMA {s} FROM {owner}",
                s = pg::audit::ANCHOR_SCHEMA
            ),
            false,
        ),
        ("renamed", format!("ALTER FUNCTION {f} RENAME TO other_name"), false),
        ("dropped", format!("DROP FUNCTION {f}"), false),
        (
            "the owner role dropped",
            format!("DROP OWNED BY {owner} CASCADE; DROP ROLE {owner}"),
            false,
        ),
    ];
    let mut su = db.superuser().await;
    for (what, sql, current) in cases {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("BEGIN; {sql}")))
            .execute(&mut su)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let state = pg::audit::observe_anchor(&mut su, &t.name, &t.uid)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        sqlx::raw_sql("ROLLBACK").execute(&mut su).await.unwrap();
        assert_eq!(state.function_current, current, "{what}");
        assert!(state.seeded, "{what}");
        assert!(
            state.role.starts_with(pg::audit::ANCHOR_ROLE_PREFIX),
            "{what}: {}",
            state.role
        );
        assert_eq!(
            pg::audit::plan_anchor(&pg::audit::AuditState::objects_present(vec![]), &state, &t.uid).is_empty(),
            current,
            "{what}"
        );
    }
}
