//! Report: the Tenant's status and conditions from a reconcile's outcome.
//!
//! Pure. Keeps `lastTransitionTime` while a condition's status holds, sets
//! `observedGeneration` everywhere, and says whether anything changed so the
//! caller writes only then.

use crate::api::{Condition, TenantPhase, TenantStatus};
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
    let last_backup = extra.last_backup.or_else(|| old.and_then(|s| s.last_backup.clone()));
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
}
