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
