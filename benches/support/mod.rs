//! What several benches share (each includes this file with
//! `#[path = "support/mod.rs"] mod support;`; cargo does not take a folder
//! without `main.rs` for a bench): the root keyring the benches provision
//! and migrate under, and auditing the tables a bench has just created.

use sqlx::PgPool;
use tenant_operator::controller::tenant::{converge_db, plan};
use tenant_operator::names::TenantName;
use tenant_operator::pg;

/// One keyring for a whole bench: the ops login's password derives from
/// it, so provisioning and migrating under the same one logs in without a
/// password reset.
pub fn bench_ring() -> tenant_operator::crypto::Keyring {
    tenant_operator::crypto::Keyring::new(
        std::collections::BTreeMap::from([("v1".to_string(), vec![0x5a; 32])]),
        "v1",
    )
    .expect("keyring")
}

/// Converges a provisioned tenant again after the bench created tables in
/// its schema, as the Tenant controller's next reconcile would, and checks
/// they got their audit triggers.
#[allow(dead_code)] // not every bench creates tenant tables
pub async fn audit_new_tables(pool: &PgPool, name: &TenantName, uid: &str, desired: &plan::DesiredDb, password: &str) {
    let catalog = pg::tenant::observe(pool, name).await.expect("observe");
    let out = converge_db(
        pool,
        &bench_ring(),
        name,
        uid,
        desired,
        &catalog,
        Some(password),
        "bench",
    )
    .await
    .expect("audit the new tables");
    assert!(
        out.audit.actions.iter().any(|a| a.label() == "AuditTable"),
        "the tenant tables got no triggers: {:?}",
        out.audit.actions
    );
}

/// The floor's log table and trigger functions in `schema`: the least an
/// audit trigger that records who changed which rows can do (SECURITY
/// DEFINER with a fixed search_path, as the audit functions are, and one
/// INSERT of the statement's keys into a log table: no chain, no head, no
/// commit-time work). `one()` is a statement trigger (the keys of
/// `tenancy_new`), `row_one()` a row trigger; `key(row)` is the SQL of one
/// row's key (`row` is `n` in `one()`, `NEW` in `row_one()`).
#[allow(dead_code)] // not every bench measures the floor
pub fn floor_sql(schema: &str, key: impl Fn(&str) -> String) -> String {
    let actor = "coalesce(nullif(current_setting('tenancy.actor', true), ''), session_user)";
    let (statement_key, row_key) = (key("n"), key("NEW"));
    format!(
        "CREATE TABLE {schema}.log (id bigserial PRIMARY KEY, \"time\" timestamptz NOT NULL, actor text NOT NULL,
                                  operation text NOT NULL, table_name text NOT NULL, row_pk jsonb);
         CREATE FUNCTION {schema}.one() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
         BEGIN
           INSERT INTO {schema}.log (\"time\", actor, operation, table_name, row_pk)
           SELECT clock_timestamp(), {actor}, TG_OP, TG_TABLE_NAME, jsonb_agg({statement_key})
             FROM tenancy_new n;
           RETURN NULL;
         END $f$;
         CREATE FUNCTION {schema}.row_one() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
         BEGIN
           INSERT INTO {schema}.log (\"time\", actor, operation, table_name, row_pk)
           VALUES (clock_timestamp(), {actor}, TG_OP, TG_TABLE_NAME, jsonb_build_array({row_key}));
           RETURN NULL;
         END $f$;"
    )
}
