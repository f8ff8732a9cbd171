//! Report: the Tenant's status and conditions from a reconcile's outcome.
//!
//! Pure. Keeps `lastTransitionTime` while a condition's status holds, sets
//! `observedGeneration` everywhere, and says whether anything changed so the
//! caller writes only then.

use crate::api::{Condition, Tenant, TenantPhase, TenantStatus};
use crate::controller::kit::conditions::{merge_conditions, Cond};

/// Status fields a reconcile may not have looked at: `None` keeps what the
/// old status says.
#[derive(Clone, Debug, Default)]
pub struct Extra {
    /// Root key version and fingerprint of the sealed secrets.
    pub key: Option<(String, String)>,
    /// The schema's migration version (`status.schemaVersion`); None keeps
    /// what the old status says.
    pub schema_version: Option<i64>,
    /// The newest backup (`status.lastBackup`); None keeps the old one.
    pub last_backup: Option<crate::api::tenant::LastBackup>,
}

/// Merges `conds` into `old`'s conditions (a condition type not in `conds`
/// is dropped, e.g. `DeletionBlocked` once lifted) and sets phase, schema,
/// generation and the fields of `extra`.
pub fn next_status(
    old: Option<&TenantStatus>,
    phase: TenantPhase,
    schema: Option<String>,
    generation: Option<i64>,
    conds: &[Cond],
    now: &str,
    extra: Extra,
) -> TenantStatus {
    let old_conds = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = merge_conditions(old_conds, conds, generation, now);
    let (key_version, key_fingerprint) = match extra.key {
        Some((v, f)) => (Some(v), Some(f)),
        None => (
            old.and_then(|s| s.key_version.clone()),
            old.and_then(|s| s.key_fingerprint.clone()),
        ),
    };
    let schema_version = extra.schema_version.or_else(|| old.and_then(|s| s.schema_version));
    let last_backup = extra
        .last_backup
        .map(Box::new)
        .or_else(|| old.and_then(|s| s.last_backup.clone()));
    // The usage sampler's figures are its own (src/controller/usage.rs).
    let usage = old.and_then(|s| s.usage.clone());
    TenantStatus {
        phase: Some(phase),
        observed_generation: generation,
        schema,
        // Placement writes it (`placement`), with a field manager of its own.
        shard: old.and_then(|s| s.shard.clone()),
        moving: old.and_then(|s| s.moving.clone()),
        last_move: old.and_then(|s| s.last_move.clone()),
        key_version,
        key_fingerprint,
        schema_version,
        last_backup,
        conditions,
        usage,
    }
}

/// Whether a light reconcile (`super::triggers`) may change one condition
/// of `t` without a full one: not being deleted, its status written for its
/// current generation, `Active` or `Suspended`, not moving, `Ready` True.
/// Pure.
pub fn steady(t: &Tenant) -> bool {
    let Some(status) = t.status.as_ref() else {
        return false;
    };
    t.metadata.deletion_timestamp.is_none()
        && status.observed_generation == t.metadata.generation
        && matches!(status.phase, Some(TenantPhase::Active | TenantPhase::Suspended))
        && status.moving.is_none()
        && condition(Some(status), "Ready").is_some_and(|c| c.status == "True")
}

/// `status` with its condition of `cond`'s type merged from `cond` (as a
/// full reconcile merges it: the transition time moves only when the
/// condition's status does), nothing else changed; None when it has no
/// condition of that type. Pure.
pub fn replace_condition(
    status: &TenantStatus,
    cond: &Cond,
    generation: Option<i64>,
    now: &str,
) -> Option<TenantStatus> {
    let merged = merge_conditions(&status.conditions, std::slice::from_ref(cond), generation, now);
    let mut next = status.clone();
    let mut found = false;
    for c in next.conditions.iter_mut().filter(|c| c.type_ == cond.type_) {
        *c = merged[0].clone();
        found = true;
    }
    found.then_some(next)
}

/// The light reconcile the rate-limit writer asked for
/// (`super::triggers::Light::RateLimits`): `t`'s status with
/// `RateLimitsApplied` as `cond` says, nothing else changed (the same
/// status when it already says so: nothing to write), when `t` is
/// [`steady`] and already shows that condition. None (a full reconcile)
/// when either does not hold. Pure.
pub fn with_rate_limits(t: &Tenant, cond: &Cond, now: &str) -> Option<TenantStatus> {
    if !steady(t) {
        return None;
    }
    replace_condition(t.status.as_ref()?, cond, t.metadata.generation, now)
}

/// The condition of `type_` in a status, if any.
pub fn condition<'a>(status: Option<&'a TenantStatus>, type_: &str) -> Option<&'a Condition> {
    status.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_holds_while_status_holds() {
        let c1 = [Cond::new("Ready", true, "Provisioned", "ok")];
        let s1 = next_status(None, TenantPhase::Active, None, Some(1), &c1, "t1", Extra::default());
        let c2 = [Cond::new("Ready", true, "Provisioned", "still ok")];
        let s2 = next_status(
            Some(&s1),
            TenantPhase::Active,
            None,
            Some(2),
            &c2,
            "t2",
            Extra::default(),
        );
        assert_eq!(s2.conditions[0].last_transition_time, "t1");
        assert_eq!(s2.conditions[0].observed_generation, Some(2));
        let c3 = [Cond::new("Ready", false, "DatabaseUnavailable", "down")];
        let s3 = next_status(
            Some(&s2),
            TenantPhase::Active,
            None,
            Some(2),
            &c3,
            "t3",
            Extra::default(),
        );
        assert_eq!(s3.conditions[0].last_transition_time, "t3");
    }

    #[test]
    fn same_outcome_gives_an_equal_status() {
        let c = [
            Cond::new("Ready", true, "Provisioned", "ok"),
            Cond::new("DatabaseReady", true, "Converged", "ok"),
        ];
        let s1 = next_status(
            None,
            TenantPhase::Active,
            Some("tenant_a".into()),
            Some(3),
            &c,
            "t1",
            Extra::default(),
        );
        let s2 = next_status(
            Some(&s1),
            TenantPhase::Active,
            Some("tenant_a".into()),
            Some(3),
            &c,
            "t9",
            Extra::default(),
        );
        assert_eq!(s1, s2, "an unchanged outcome must not produce a status write");
    }

    /// A Tenant at generation 2 whose status says Ready and
    /// `RateLimitsApplied` Pending (the writer behind), at that generation.
    fn provisioned() -> Tenant {
        let mut t: Tenant = serde_json::from_value(serde_json::json!({
            "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": "acme", "generation": 2},
            "spec": {}
        }))
        .expect("a Tenant");
        let conds = [
            Cond::new("Ready", true, "Provisioned", "ok"),
            Cond::new("RateLimitsApplied", false, "Pending", "waiting"),
        ];
        t.status = Some(next_status(
            None,
            TenantPhase::Active,
            Some("tenant_acme".into()),
            Some(2),
            &conds,
            "t1",
            Extra::default(),
        ));
        t
    }

    #[test]
    fn the_rate_limit_writers_light_reconcile_changes_that_condition_only() {
        let rendered = Cond::new("RateLimitsApplied", true, "Rendered", "api 100/second rendered");
        let t = provisioned();
        let next = with_rate_limits(&t, &rendered, "t2").expect("steady: light");
        let old = t.status.as_ref().expect("status");
        let rl = condition(Some(&next), "RateLimitsApplied").expect("the condition");
        assert_eq!(
            (
                rl.status.as_str(),
                rl.reason.as_str(),
                rl.message.as_str(),
                rl.last_transition_time.as_str()
            ),
            ("True", "Rendered", "api 100/second rendered", "t2")
        );
        let others = |s: &TenantStatus| -> Vec<Condition> {
            s.conditions
                .iter()
                .filter(|c| c.type_ != "RateLimitsApplied")
                .cloned()
                .collect()
        };
        assert_eq!(others(&next), others(old), "every other condition as it was");
        assert_eq!(
            TenantStatus {
                conditions: vec![],
                ..next.clone()
            },
            TenantStatus {
                conditions: vec![],
                ..old.clone()
            },
            "every other field as it was"
        );
        // Already saying so: the same status, so nothing is written.
        let mut told = t.clone();
        told.status = Some(next.clone());
        assert_eq!(with_rate_limits(&told, &rendered, "t3"), Some(next));

        // Anything unsettled is left to a full reconcile.
        let mut newer = t.clone();
        newer.metadata.generation = Some(3);
        assert_eq!(
            with_rate_limits(&newer, &rendered, "t2"),
            None,
            "a spec not yet converged"
        );
        let mut deleting = t.clone();
        deleting.metadata.deletion_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-12-04T00:00:00Z")).expect("a time"));
        assert_eq!(with_rate_limits(&deleting, &rendered, "t2"), None, "being deleted");
        let mut failed = t.clone();
        failed.status.as_mut().expect("status").phase = Some(TenantPhase::Failed);
        assert_eq!(with_rate_limits(&failed, &rendered, "t2"), None, "failed");
        let mut not_ready = t.clone();
        not_ready.status.as_mut().expect("status").conditions[0].status = "False".into();
        assert_eq!(with_rate_limits(&not_ready, &rendered, "t2"), None, "not Ready");
        let mut unprovisioned = t.clone();
        unprovisioned.status = None;
        assert_eq!(with_rate_limits(&unprovisioned, &rendered, "t2"), None, "no status yet");
        let mut without = t.clone();
        without.status.as_mut().expect("status").conditions.truncate(1);
        assert_eq!(
            with_rate_limits(&without, &rendered, "t2"),
            None,
            "no RateLimitsApplied shown yet (rate limits newly configured)"
        );
    }
}
