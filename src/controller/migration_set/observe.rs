//! Observe: the Tenants following a MigrationSet (from the watch cache) and
//! their schemas' migration state and failure records (from Postgres). No
//! writes.

use std::sync::Arc;

use kube::ResourceExt;
use sqlx::PgPool;

use super::plan::Observed;
use crate::api::Tenant;
use crate::names::TenantName;
use crate::pg::PgError;

/// The valid-named Tenants following `set` and not being deleted, sorted by
/// name. Pure.
pub fn followers(tenants: &[Arc<Tenant>], set: &str) -> Vec<TenantName> {
    let mut out: Vec<TenantName> = tenants
        .iter()
        .filter(|t| t.spec.database.migration_set == set && t.metadata.deletion_timestamp.is_none())
        .filter_map(|t| TenantName::parse(&t.name_any()).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `followers` grouped by the shard `shard_of` gives their Tenant (one not
/// placed yet: the default shard), each group sorted. Pure.
pub fn by_shard(
    tenants: &[Arc<Tenant>],
    followers: &[TenantName],
    shard_of: impl Fn(&Tenant) -> Option<String>,
) -> std::collections::BTreeMap<String, Vec<TenantName>> {
    let by_name: std::collections::HashMap<String, &Arc<Tenant>> = tenants.iter().map(|t| (t.name_any(), t)).collect();
    let mut out: std::collections::BTreeMap<String, Vec<TenantName>> = Default::default();
    for f in followers {
        let shard = by_name
            .get(f.as_str())
            .and_then(|t| shard_of(t))
            .unwrap_or_else(|| crate::api::DEFAULT_SHARD.to_string());
        out.entry(shard).or_default().push(f.clone());
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// Reads the followers' version tables and the set's failure records: a
/// few queries whatever the number of tenants.
pub async fn observe(pool: &PgPool, set: &str, followers: &[TenantName]) -> Result<Observed, PgError> {
    let versions = crate::pg::migrations::observe_many(pool, followers).await?;
    let failures = crate::pg::migrations::failures_of_set(pool, set).await?;
    Ok(Observed {
        followers: followers.to_vec(),
        versions,
        failures,
    })
}
