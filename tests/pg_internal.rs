//! The operator's own tables inside a tenant schema (`_tenancy_*`) are never
//! writable by the tenant's app role, whatever schema-wide grant runs later.

mod support;

use support::tenant::Tenant;
use support::{unique, TestDb};
use tenant_operator::pg;

#[tokio::test]
async fn internal_tables_stay_read_only_for_the_app_role() {
    let db = TestDb::new("internal").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let mut t = Tenant::new(&unique("intern"));
    t.converge(&db).await.unwrap();
    let schema = t.name.schema();
    let mut su = db.superuser().await;
    // An internal table and an ordinary one appear (as a migration would
    // create them, owned by the owner role): the ordinary one needs grants.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET ROLE {o}; CREATE TABLE {schema}._tenancy_demo (x int); CREATE TABLE {schema}.docs (x int); RESET ROLE;
         GRANT ALL ON {schema}._tenancy_demo TO {a}; REVOKE ALL ON {schema}.docs FROM {a};",
        o = t.name.owner_role(),
        a = t.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    let labels: Vec<_> = out.plan.actions.iter().map(|a| a.label()).collect();
    assert_eq!(
        labels,
        ["GrantOwnerToAdmin", "GrantExistingObjects", "RevokeOwnerFromAdmin"],
        "{labels:?}"
    );
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs VALUES (1)")
        .execute(&mut app)
        .await
        .expect("DML on an ordinary table");
    for sql in [
        "INSERT INTO _tenancy_demo VALUES (1)",
        "UPDATE _tenancy_demo SET x = 2",
        "DELETE FROM _tenancy_demo",
        "TRUNCATE _tenancy_demo",
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut app)
            .await
            .expect_err(sql);
        assert_eq!(
            err.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("42501"),
            "{sql}: {err}"
        );
    }
    assert_eq!(
        t.converge(&db).await.unwrap().statements,
        0,
        "not converged after the repair"
    );

    // A write right granted by hand on an internal table alone is found and revoked.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT INSERT ON {schema}._tenancy_demo TO {}",
        t.name.app_role()
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    assert_eq!(
        out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(),
        ["GrantOwnerToAdmin", "RevokeInternalWrites", "RevokeOwnerFromAdmin"]
    );
    assert!(sqlx::query("INSERT INTO _tenancy_demo VALUES (1)")
        .execute(&mut app)
        .await
        .is_err());
}

#[tokio::test]
async fn operator_instances_starting_at_once_all_prepare_the_control_schema() {
    let db = TestDb::new("ctlrace").await;
    let pools: Vec<sqlx::PgPool> = futures::future::join_all((0..6).map(|_| {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&db.admin_url)
    }))
    .await
    .into_iter()
    .map(|p| p.expect("admin connects"))
    .collect();
    let results = futures::future::join_all(pools.iter().map(pg::migrate_control_schema)).await;
    for r in results {
        r.expect("a concurrent start failed to prepare the control schema");
    }
}

/// The catalog rows a start prepares (the control schema, the anchor
/// schema and role, the head table's grants), each as `xmin` (the
/// transaction that last wrote it): unchanged means not written.
async fn start_up_catalog_rows(db: &TestDb) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT 'schema ' || nspname::text, xmin::text FROM pg_namespace WHERE nspname IN ('tenancy', $1)
         UNION ALL SELECT 'table ' || relname::text, xmin::text FROM pg_class WHERE oid IN ('tenancy.audit_heads'::regclass, 'tenancy.locks'::regclass)
         UNION ALL SELECT 'role ' || rolname::text, xmin::text FROM pg_authid WHERE rolname = $2 || (SELECT oid FROM pg_database WHERE datname = current_database())::text
         UNION ALL SELECT 'member ' || m.member::regrole::text, m.xmin::text FROM pg_auth_members m
          WHERE m.roleid::regrole::text = $2 || (SELECT oid FROM pg_database WHERE datname = current_database())::text
         ORDER BY 1",
    )
    .bind(pg::audit::ANCHOR_SCHEMA)
    .bind(pg::audit::ANCHOR_ROLE_PREFIX)
    .fetch_all(&mut db.superuser().await)
    .await
    .unwrap()
}

/// A start on a prepared database rewrites none of the catalog rows it
/// prepares (it grants and revokes only what is missing or extra): an
/// unconditional `GRANT` or `REVOKE` rewrites the schema's ACL row, which
/// is what made instances starting at once fail with "tuple concurrently
/// updated". A right given to PUBLIC on the control schema is still taken
/// back.
#[tokio::test]
async fn a_start_on_a_prepared_database_rewrites_no_catalog_row() {
    let db = TestDb::new("ctlquiet").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let before = start_up_catalog_rows(&db).await;
    assert!(before.len() >= 5, "{before:?}");
    pg::migrate_control_schema(&db.admin).await.unwrap();
    assert_eq!(
        start_up_catalog_rows(&db).await,
        before,
        "a second start rewrote catalog rows"
    );
    let public_on_tenancy = "SELECT has_schema_privilege('public', 'tenancy', 'USAGE')";
    let mut su = db.superuser().await;
    sqlx::raw_sql("GRANT USAGE ON SCHEMA tenancy TO PUBLIC")
        .execute(&mut su)
        .await
        .unwrap();
    assert!(sqlx::query_scalar::<_, bool>(public_on_tenancy)
        .fetch_one(&mut su)
        .await
        .unwrap());
    pg::migrate_control_schema(&db.admin).await.unwrap();
    assert!(!sqlx::query_scalar::<_, bool>(public_on_tenancy)
        .fetch_one(&mut su)
        .await
        .unwrap());
}

/// Every `_tenancy_*` sequence of the tenant schema (as the superuser sees
/// them), and for each whether the app role could `nextval` or `setval` it.
async fn internal_sequences(db: &TestDb, t: &Tenant) -> Vec<(String, bool, bool)> {
    let seqs: Vec<String> = sqlx::query_scalar("SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences WHERE schemaname = $1 AND sequencename LIKE '\\_tenancy\\_%' ORDER BY 1")
        .bind(t.name.schema())
        .fetch_all(&mut db.superuser().await)
        .await
        .unwrap();
    let mut app = t.app(db).await.unwrap();
    let mut out = Vec::new();
    for s in seqs {
        let mut tried = Vec::new();
        for sql in [format!("SELECT nextval('{s}')"), format!("SELECT setval('{s}', 1)")] {
            // In a transaction rolled back, so a sequence the app could move stays put.
            let mut tx = sqlx::Connection::begin(&mut app).await.unwrap();
            let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(&mut *tx).await;
            if let Err(e) = &r {
                assert_eq!(
                    e.as_database_error().and_then(|d| d.code()).as_deref(),
                    Some("42501"),
                    "{sql}: {e}"
                );
            }
            tried.push(r.is_ok());
            drop(tx);
        }
        out.push((s, tried[0], tried[1]));
    }
    out
}

#[tokio::test]
async fn the_app_role_can_neither_advance_nor_set_an_internal_sequence() {
    let db = TestDb::new("intseq").await;
    pg::migrate_control_schema(&db.admin).await.unwrap();
    let mut t = Tenant::new(&unique("intseq"));
    t.converge(&db).await.unwrap();
    let schema = t.name.schema();
    let app = t.name.app_role();
    // A migration creates tables: the owner's default privileges give the
    // app their sequences (and the operator's own kind too, by name).
    let ring =
        tenant_operator::crypto::Keyring::new([("v1".to_string(), vec![5u8; 32])].into_iter().collect(), "v1").unwrap();
    let login = pg::migrations::ops_login(&db.admin, &ring, &t.name)
        .await
        .unwrap()
        .expect("registered");
    let set = pg::migrations::SetRef {
        name: "default".into(),
        generation: 1,
    };
    let v1 = pg::migrations::MigrationSql::new(
        1,
        "v1",
        "CREATE TABLE docs (id bigserial PRIMARY KEY); CREATE TABLE _tenancy_extra (id bigserial PRIMARY KEY)",
        true,
    );
    pg::migrations::migrate_tenant(&db.admin, &login, &set, &[v1], &pg::migrations::Timeouts::default())
        .await
        .unwrap();
    t.converge(&db).await.unwrap();
    let seqs = internal_sequences(&db, &t).await;
    assert!(seqs.len() >= 2, "the audit id and _tenancy_extra sequences: {seqs:?}");
    assert!(
        seqs.iter().all(|(_, next, set)| !next && !set),
        "after a migration and a reconcile: {seqs:?}"
    );
    let mut a = t.app(&db).await.unwrap();
    sqlx::raw_sql("SELECT nextval('docs_id_seq')")
        .execute(&mut a)
        .await
        .expect("the app uses its own tables' sequences");

    // Granted by hand: found and revoked by the next reconcile.
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {app}; GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {schema} TO {app}")))
        .execute(&mut su)
        .await
        .unwrap();
    assert!(
        internal_sequences(&db, &t)
            .await
            .iter()
            .all(|(_, next, set)| *next && *set),
        "the grant did not take"
    );
    let out = t.converge(&db).await.unwrap();
    assert_eq!(
        out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(),
        ["GrantOwnerToAdmin", "RevokeInternalWrites", "RevokeOwnerFromAdmin"]
    );
    let seqs = internal_sequences(&db, &t).await;
    assert!(
        seqs.iter().all(|(_, next, set)| !next && !set),
        "after the repair: {seqs:?}"
    );
    let callable: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace AND proname LIKE '\\_tenancy\\_%' AND has_function_privilege($2, oid, 'EXECUTE')")
        .bind(&schema)
        .bind(&app)
        .fetch_one(&db.admin)
        .await
        .unwrap();
    assert_eq!(
        callable, 0,
        "the app may still call the operator's functions in its schema"
    );
    assert_eq!(
        t.converge(&db).await.unwrap().statements,
        0,
        "not converged after the repair"
    );

    // A table without the app's grants makes the reconcile grant on every
    // object of the schema; the internal sequences stay closed.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "REVOKE ALL ON {schema}.docs FROM {app}; REVOKE ALL ON SEQUENCE {schema}.docs_id_seq FROM {app}"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let out = t.converge(&db).await.unwrap();
    assert_eq!(
        out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(),
        ["GrantOwnerToAdmin", "GrantExistingObjects", "RevokeOwnerFromAdmin"]
    );
    let (dml, seq): (bool, bool) = sqlx::query_as(
        "SELECT has_table_privilege($1, $2 || '.docs', 'SELECT, INSERT, UPDATE, DELETE'),
                has_sequence_privilege($1, $2 || '.docs_id_seq', 'USAGE, SELECT, UPDATE')",
    )
    .bind(&app)
    .bind(&schema)
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert!(
        dml && seq,
        "the app's grants on the table ({dml}) and its sequence ({seq}) are back"
    );
    let seqs = internal_sequences(&db, &t).await;
    assert!(
        seqs.iter().all(|(_, next, set)| !next && !set),
        "after GrantExistingObjects: {seqs:?}"
    );
    assert_eq!(t.converge(&db).await.unwrap().statements, 0);
}
