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
    assert_eq!(labels, ["GrantExistingObjects"], "{labels:?}");
    let mut app = t.app(&db).await.unwrap();
    sqlx::query("INSERT INTO docs VALUES (1)").execute(&mut app).await.expect("DML on an ordinary table");
    for sql in ["INSERT INTO _tenancy_demo VALUES (1)", "UPDATE _tenancy_demo SET x = 2", "DELETE FROM _tenancy_demo", "TRUNCATE _tenancy_demo"] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut app).await.expect_err(sql);
        assert_eq!(err.as_database_error().and_then(|d| d.code()).as_deref(), Some("42501"), "{sql}: {err}");
    }
    assert_eq!(t.converge(&db).await.unwrap().statements, 0, "not converged after the repair");

    // A write right granted by hand on an internal table alone is found and revoked.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("GRANT INSERT ON {schema}._tenancy_demo TO {}", t.name.app_role()))).execute(&mut su).await.unwrap();
    let out = t.converge(&db).await.unwrap();
    assert_eq!(out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(), ["RevokeInternalWrites"]);
    assert!(sqlx::query("INSERT INTO _tenancy_demo VALUES (1)").execute(&mut app).await.is_err());
}

#[tokio::test]
async fn operator_instances_starting_at_once_all_prepare_the_control_schema() {
    let db = TestDb::new("ctlrace").await;
    let pools: Vec<sqlx::PgPool> = futures::future::join_all((0..6).map(|_| sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.admin_url)))
        .await
        .into_iter()
        .map(|p| p.expect("admin connects"))
        .collect();
    let results = futures::future::join_all(pools.iter().map(pg::migrate_control_schema)).await;
    for r in results {
        r.expect("a concurrent start failed to prepare the control schema");
    }
}
