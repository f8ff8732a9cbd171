//! Report: the MigrationSet's status from what a pass observed afterwards.
//!
//! Pure. Counts tenants per version, lists the failed ones (bounded), keeps
//! `lastTransitionTime` while a condition's status holds and sets
//! `observedGeneration`, so an unchanged rollout gives an equal status and
//! no write.

use std::collections::BTreeMap;

use super::plan::{self, Blocked, Observed, RolloutPlan};
use crate::api::{FailedTenant, MigrationSetPhase, MigrationSetSpec, MigrationSetStatus, VersionCount};
use crate::controller::kit::conditions::{merge_conditions, Cond};
use crate::pg::migrations::{find_mismatch, REASON_CHECKSUM, REASON_FAILED};

/// Most failed tenants listed in the status (all are counted).
pub const MAX_FAILED: usize = 20;
/// Most characters of a Postgres error in the status.
pub const MAX_ERROR: usize = 500;

/// The progress on each shard (`shards`: name to its followers), when
/// followers live on more than the default shard; empty otherwise. Pure.
pub fn per_shard(
    shards: &BTreeMap<String, Vec<crate::names::TenantName>>,
    plan: &RolloutPlan,
    after: &Observed,
) -> Vec<crate::api::ShardProgress> {
    if shards.keys().all(|s| s == crate::api::DEFAULT_SHARD) {
        return Vec::new();
    }
    let latest = plan.latest();
    let failed = failed_tenants(plan, after);
    shards
        .iter()
        .map(|(shard, names)| {
            let at = names
                .iter()
                .filter(|n| {
                    after
                        .versions
                        .get(*n)
                        .is_some_and(|v| v.schema_exists && v.current() >= latest)
                })
                .count();
            let failed = names
                .iter()
                .filter(|n| failed.iter().any(|f| f.tenant == n.as_str()))
                .count();
            crate::api::ShardProgress {
                shard: shard.clone(),
                progress: format!("{at}/{}", names.len()),
                failed_count: failed as i64,
            }
        })
        .collect()
}

/// Every follower that failed: a checksum mismatch seen now, or a failure
/// record the tenant is still behind (under any generation: an older one is
/// retried, but until then it is what is known). Pure.
pub fn failed_tenants(plan: &RolloutPlan, after: &Observed) -> Vec<FailedTenant> {
    let mut failed: Vec<FailedTenant> = Vec::new();
    if plan
        .blocked
        .as_ref()
        .is_none_or(|b| !matches!(b, Blocked::InvalidSpec(_)))
    {
        for n in &after.followers {
            let Some(v) = after.versions.get(n) else { continue };
            if let Some((version, what)) = find_mismatch(&v.applied, &plan.migrations) {
                failed.push(FailedTenant {
                    tenant: n.to_string(),
                    version,
                    reason: REASON_CHECKSUM.into(),
                    error: truncate(&what),
                });
            } else if let Some(f) = after
                .failures
                .iter()
                .find(|f| f.tenant == n.as_str() && f.reason == REASON_FAILED && f.version > v.current())
            {
                let error = match &f.sqlstate {
                    Some(code) => format!("{} (SQLSTATE {code})", f.error),
                    None => f.error.clone(),
                };
                failed.push(FailedTenant {
                    tenant: n.to_string(),
                    version: f.version,
                    reason: REASON_FAILED.into(),
                    error: truncate(&error),
                });
            }
        }
    }
    failed
}

/// The status after a pass. `plan` is the pass's plan (for why it was
/// blocked), made from `spec`; `after` is observed once the pass finished; `more` says the
/// controller will run another pass (deferred or interrupted tenants).
pub fn compute(
    old: Option<&MigrationSetStatus>,
    generation: Option<i64>,
    spec: &MigrationSetSpec,
    plan: &RolloutPlan,
    after: &Observed,
    more: bool,
    now: &str,
) -> MigrationSetStatus {
    let latest = plan.latest();
    let mut versions: BTreeMap<i64, i64> = BTreeMap::new();
    let mut at_latest = 0usize;
    for n in &after.followers {
        match after.versions.get(n) {
            Some(v) if v.schema_exists => {
                *versions.entry(v.current()).or_default() += 1;
                if v.current() >= latest {
                    at_latest += 1;
                }
            }
            _ => {}
        }
    }

    let mut failed = failed_tenants(plan, after);
    let failed_count = failed.len() as i64;
    failed.truncate(MAX_FAILED);

    // Blocked now, judged on the state after the pass (a failure in this
    // pass pauses the set even though the plan was not blocked).
    let blocked = match &plan.blocked {
        Some(Blocked::InvalidSpec(m)) => Some(Blocked::InvalidSpec(m.clone())),
        _ => plan::plan(&plan.set.name, plan.set.generation, spec, after).blocked,
    };
    let behind = after.followers.len() - at_latest;
    let phase = match (&blocked, behind, failed_count) {
        (Some(_), _, _) => MigrationSetPhase::Paused,
        (None, 0, _) => MigrationSetPhase::Complete,
        // Only failed tenants are behind (onFailure: Continue): nothing
        // more happens until the spec changes.
        (None, b, f) if b as i64 == f && !more => MigrationSetPhase::Paused,
        _ => MigrationSetPhase::Progressing,
    };
    let (ready_reason, ready_msg) = match (&phase, &blocked) {
        (MigrationSetPhase::Complete, _) => ("RolledOut", format!("all {} tenant(s) at version {latest}", after.followers.len())),
        (MigrationSetPhase::Paused, Some(b)) => (b.reason(), b.message()),
        (MigrationSetPhase::Paused, None) => ("MigrationFailed", format!("{failed_count} tenant(s) failed and stay at their previous version; the others are at version {latest}")),
        _ => ("Progressing", format!("{at_latest} of {} tenant(s) at version {latest}", after.followers.len())),
    };
    let conds = [
        Cond::new(
            "Ready",
            phase == MigrationSetPhase::Complete,
            ready_reason,
            ready_msg.clone(),
        ),
        if phase == MigrationSetPhase::Paused {
            Cond::new("Paused", true, ready_reason, ready_msg)
        } else {
            Cond::new("Paused", false, "NotPaused", "")
        },
    ];
    MigrationSetStatus {
        phase: Some(phase),
        observed_generation: generation,
        latest_version: Some(latest),
        progress: Some(format!("{at_latest}/{}", after.followers.len())),
        versions: versions
            .into_iter()
            .map(|(version, tenants)| VersionCount { version, tenants })
            .collect(),
        failed_count,
        failed,
        shards: Vec::new(),
        conditions: merge_conditions(
            old.map(|s| s.conditions.as_slice()).unwrap_or_default(),
            &conds,
            generation,
            now,
        ),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_ERROR).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Migration, OnFailure, RolloutSpec};
    use crate::names::TenantName;
    use crate::pg::migrations::{checksum, Applied, FailureRecord, SchemaVersions};

    fn spec(on_failure: OnFailure) -> MigrationSetSpec {
        MigrationSetSpec {
            migrations: vec![Migration {
                version: 1,
                name: "m1".into(),
                sql: "a".into(),
                transactional: true,
            }],
            rollout: RolloutSpec {
                max_concurrent: 4,
                canary: 0,
                on_failure,
            },
        }
    }

    fn observed(n: usize, at_latest: usize, failed: usize) -> Observed {
        let names: Vec<TenantName> = (0..n)
            .map(|i| TenantName::parse(&format!("t{i:03}")).unwrap())
            .collect();
        let versions = names
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let applied = if i < at_latest {
                    vec![Applied {
                        version: 1,
                        name: "m1".into(),
                        checksum: checksum("a").into(),
                    }]
                } else {
                    vec![]
                };
                (
                    t.clone(),
                    SchemaVersions {
                        schema_exists: true,
                        applied,
                    },
                )
            })
            .collect();
        let failures = names[at_latest..at_latest + failed]
            .iter()
            .map(|t| FailureRecord {
                tenant: t.to_string(),
                migration_set: "default".into(),
                set_generation: 1,
                version: 1,
                migration_name: "m1".into(),
                reason: REASON_FAILED.into(),
                error: "x".repeat(2000),
                sqlstate: Some("23514".into()),
            })
            .collect();
        Observed {
            followers: names,
            versions,
            failures,
            provisioning: vec![],
        }
    }

    fn status(obs: &Observed, on_failure: OnFailure, more: bool) -> MigrationSetStatus {
        let s = spec(on_failure);
        let p = plan::plan("default", 1, &s, obs);
        compute(None, Some(1), &s, &p, obs, more, "t0")
    }

    #[test]
    fn phases_follow_the_tenants() {
        let st = status(&observed(3, 3, 0), OnFailure::Pause, false);
        assert_eq!(
            (st.phase, st.progress.as_deref()),
            (Some(MigrationSetPhase::Complete), Some("3/3"))
        );
        assert_eq!(st.versions, vec![VersionCount { version: 1, tenants: 3 }]);
        let st = status(&observed(3, 1, 0), OnFailure::Pause, true);
        assert_eq!(
            (st.phase, st.progress.as_deref()),
            (Some(MigrationSetPhase::Progressing), Some("1/3"))
        );
        let st = status(&observed(3, 1, 1), OnFailure::Pause, false);
        assert_eq!(st.phase, Some(MigrationSetPhase::Paused));
        let st = status(&observed(3, 2, 1), OnFailure::Continue, false);
        assert_eq!(
            st.phase,
            Some(MigrationSetPhase::Paused),
            "only failed tenants are behind: nothing more happens"
        );
        assert_eq!(
            st.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status.as_str()),
            Some("False")
        );
    }

    #[test]
    fn the_failed_list_is_bounded_and_errors_truncated() {
        let st = status(&observed(30, 0, 30), OnFailure::Continue, false);
        assert_eq!(st.failed_count, 30);
        assert_eq!(st.failed.len(), MAX_FAILED);
        assert!(st.failed.iter().all(|f| f.error.chars().count() <= MAX_ERROR));
    }

    #[test]
    fn an_unchanged_rollout_gives_an_equal_status() {
        let obs = observed(3, 1, 0);
        let s = spec(OnFailure::Pause);
        let p = plan::plan("default", 1, &s, &obs);
        let a = compute(None, Some(1), &s, &p, &obs, true, "t0");
        let b = compute(Some(&a), Some(1), &s, &p, &obs, true, "t9");
        assert_eq!(a, b, "a pass that changed nothing must not write the status");
    }
}
