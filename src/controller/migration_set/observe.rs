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

/// Those of `followers` (sorted) whose Tenant is not Ready at its current
/// generation: still being provisioned, or held up. Sorted. Pure.
pub fn provisioning(tenants: &[Arc<Tenant>], followers: &[TenantName]) -> Vec<TenantName> {
    let mut out: Vec<TenantName> = tenants
        .iter()
        .filter(|t| !ready_at_generation(t))
        .filter_map(|t| TenantName::parse(&t.name_any()).ok())
        .filter(|n| followers.binary_search(n).is_ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn ready_at_generation(t: &Tenant) -> bool {
    t.status.as_ref().is_some_and(|s| {
        s.observed_generation.is_some() && s.observed_generation == t.metadata.generation && s.is_ready()
    })
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
        provisioning: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, generation: i64, status: serde_json::Value) -> Arc<Tenant> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"name": name, "generation": generation},
                "spec": {},
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn ready(status: &str, observed: i64) -> serde_json::Value {
        serde_json::json!({
            "observedGeneration": observed,
            "conditions": [{"type": "Ready", "status": status, "reason": "x", "message": "x",
                            "lastTransitionTime": "2026-12-04T00:00:00Z"}],
        })
    }

    #[test]
    fn provisioning_is_every_follower_not_ready_at_its_generation() {
        let tenants = vec![
            tenant("a", 1, ready("True", 1)),
            tenant("b", 1, serde_json::json!(null)),
            tenant("c", 2, ready("True", 1)),
            tenant("d", 1, ready("False", 1)),
            tenant("e", 1, serde_json::json!(null)),
        ];
        let followers: Vec<TenantName> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| TenantName::parse(n).unwrap())
            .collect();
        let names: Vec<String> = provisioning(&tenants, &followers)
            .iter()
            .map(|n| n.to_string())
            .collect();
        // e follows no set here.
        assert_eq!(names, vec!["b", "c", "d"]);
    }
}
