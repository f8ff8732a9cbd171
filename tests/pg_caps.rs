//! `temp_file_limit` on a tenant's app role: superuser-only unless granted,
//! so the operator degrades to a condition without the grant, and with it
//! the cap holds under load.

mod support;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use support::{unique, TestDb};
use tenant_operator::controller::tenant::converge_db;
use tenant_operator::controller::tenant::plan::{self, Endpoint};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

#[tokio::test]
async fn temp_file_limit_needs_a_grant_and_then_caps_spilling_queries() {
    let (db, admin_role, admin_url) = TestDb::with_own_admin("tempcap").await;
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&admin_url)
        .await
        .unwrap();
    pg::migrate_control_schema(&admin).await.unwrap();
    let name = TenantName::parse(&unique("spill")).unwrap();
    let uid = format!("uid-{name}");
    let mut spec: tenant_operator::api::TenantSpec = serde_json::from_value(serde_json::json!({
        "database": {"tempFileLimit": "1MB", "workMem": "64kB", "statementTimeout": "0"}
    }))
    .unwrap();
    let desired = plan::desired_db(&name, &spec).unwrap();

    // Without the grant: everything else is applied, temp_file_limit is not,
    // and the plan says why.
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    assert!(!catalog.can_set_temp_file_limit);
    let out = converge_db(
        &admin,
        &support::test_ring(),
        &name,
        &uid,
        &desired,
        &catalog,
        None,
        "test",
    )
    .await
    .unwrap();
    assert!(
        out.plan
            .caps_not_applied
            .as_deref()
            .is_some_and(|m| m.contains("GRANT SET ON PARAMETER")),
        "{:?}",
        out.plan.caps_not_applied
    );
    let password = out.plan.password.clone();
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    assert!(!catalog
        .app_role
        .as_ref()
        .unwrap()
        .settings
        .contains_key("temp_file_limit"));
    let again = converge_db(
        &admin,
        &support::test_ring(),
        &name,
        &uid,
        &desired,
        &catalog,
        Some(&password),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(again.statements, 0, "the degraded state is not quiet");

    // With the grant (what a managed service's superuser-equivalent does once).
    let mut su = db.superuser().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "GRANT SET ON PARAMETER temp_file_limit TO {admin_role}"
    )))
    .execute(&mut su)
    .await
    .unwrap();
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    let out = converge_db(
        &admin,
        &support::test_ring(),
        &name,
        &uid,
        &desired,
        &catalog,
        Some(&password),
        "test",
    )
    .await
    .unwrap();
    assert!(out.plan.caps_not_applied.is_none());
    assert_eq!(
        out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(),
        ["SetRoleSetting"]
    );

    // Under load: a sort that spills past 1MB of temp files is cancelled.
    let e = Endpoint {
        host: "127.0.0.1".into(),
        port: db.port(),
        database: db.name.clone(),
    };
    let uri = plan::secret_data(&name, &e, &password)["uri"].clone();
    let mut app = PgConnection::connect(&uri).await.unwrap();
    let limit: String = sqlx::query_scalar("SHOW temp_file_limit")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(limit, "1MB");
    let err = sqlx::query("SELECT count(*) FROM (SELECT g FROM generate_series(1, 2000000) g ORDER BY random()) s")
        .execute(&mut app)
        .await
        .expect_err("a query spilling far past temp_file_limit ran");
    assert_eq!(
        err.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("53400"),
        "{err}"
    );
    sqlx::query("SELECT count(*) FROM generate_series(1, 1000)")
        .execute(&mut app)
        .await
        .expect("small queries still run");

    // Removed from the spec: reset to the server default.
    spec.database.temp_file_limit = None;
    let desired = plan::desired_db(&name, &spec).unwrap();
    let catalog = pg::tenant::observe(&admin, &name).await.unwrap();
    let out = converge_db(
        &admin,
        &support::test_ring(),
        &name,
        &uid,
        &desired,
        &catalog,
        Some(&password),
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        out.plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>(),
        ["ResetRoleSetting"]
    );
}
