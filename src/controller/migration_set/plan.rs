//! Plan: from a MigrationSet's spec and what was observed, which tenants to
//! migrate now, in which stage, or why none. Pure and synchronous.
//!
//! Rules (docs/migrations.md says the same for people):
//! - versions must be strictly increasing, or nothing runs (`InvalidSpec`);
//! - a tenant whose recorded migrations differ from the spec (edited,
//!   removed, inserted below) blocks the whole set (`ChecksumMismatch`):
//!   nothing is re-run, nothing new starts;
//! - the canaries are the first `canary` provisioned followers by name; the
//!   others start only once every canary is at the latest version, and a
//!   canary's failure stops the rollout whatever `onFailure` says;
//! - with `Pause`, a failure recorded under the current generation stops new
//!   tenants; with `Continue`, only the failed tenant waits;
//! - a failure recorded under an older generation is retried: changing the
//!   spec is how a person resumes a paused set.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{MigrationSetSpec, OnFailure};
use crate::names::TenantName;
use crate::pg::migrations::{find_mismatch, FailureRecord, MigrationSql, SchemaVersions, SetRef, REASON_FAILED};

/// Most tenants planned for one pass, per `maxConcurrent`. What keeps a
/// pass short is [`super::apply::PASS_BUDGET`] (no tenant starts after it;
/// the status is written between passes, so `kubectl get migrationsets`
/// shows progress during a long rollout); this only bounds the plan. Every
/// pass reads all the followers' version tables (~0.1 to 0.3 s per 1,000
/// tenants), so a small bound would make a rollout pay that read once per
/// few hundred tenants: 1,000 tenants at the default `maxConcurrent` (4)
/// fit in one pass.
pub const PASS_FACTOR: usize = 1024;

/// The spec's migrations, checked: versions strictly increasing.
pub fn migrations(spec: &MigrationSetSpec) -> Result<Vec<MigrationSql>, String> {
    let MigrationSetSpec { migrations, rollout: _ } = spec;
    let mut out: Vec<MigrationSql> = Vec::with_capacity(migrations.len());
    for (i, m) in migrations.iter().enumerate() {
        let crate::api::Migration {
            version,
            name,
            sql,
            transactional,
        } = m;
        if *version < 1 {
            return Err(format!(
                "spec.migrations[{i}].version: {version} is not a positive integer"
            ));
        }
        if let Some(prev) = out.last() {
            if *version <= prev.version {
                return Err(format!("spec.migrations[{i}].version: {version} is not greater than the previous version {}: versions must be strictly increasing", prev.version));
            }
        }
        if sql.trim().is_empty() {
            return Err(format!("spec.migrations[{i}].sql is empty"));
        }
        out.push(MigrationSql::new(*version, name.clone(), sql.clone(), *transactional));
    }
    Ok(out)
}

/// What one pass starts from.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The valid-named Tenants following the set and not being deleted,
    /// sorted by name.
    pub followers: Vec<TenantName>,
    /// Their schemas' migration state.
    pub versions: BTreeMap<TenantName, SchemaVersions>,
    /// Failure records naming this set.
    pub failures: Vec<FailureRecord>,
    /// Followers whose Tenant is still being provisioned (not Ready yet),
    /// sorted: one with no migration applied is brought to the latest
    /// version by its own reconcile, so a pass leaves it alone unless it is
    /// a canary.
    pub provisioning: Vec<TenantName>,
}

/// Why a pass starts nobody.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    InvalidSpec(String),
    /// Tenants whose recorded migrations differ from the spec: (tenant, version, what).
    ChecksumMismatch(Vec<(TenantName, i64, String)>),
    /// A canary failed (under this generation).
    CanaryFailed(TenantName),
    /// `onFailure: Pause` and a tenant failed under this generation.
    Paused(TenantName),
}

impl Blocked {
    /// The condition reason: one of a fixed set of words.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocked::InvalidSpec(_) => "InvalidSpec",
            Blocked::ChecksumMismatch(_) => "ChecksumMismatch",
            Blocked::CanaryFailed(_) => "CanaryFailed",
            Blocked::Paused(_) => "MigrationFailed",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Blocked::InvalidSpec(m) => m.clone(),
            Blocked::ChecksumMismatch(v) => {
                let (t, _, what) = &v[0];
                format!("{} tenant(s) recorded migrations that differ from the spec; nothing runs until the spec matches again (first: tenant {t}: {what})", v.len())
            }
            Blocked::CanaryFailed(t) => format!("canary tenant {t} failed; no other tenant starts until the spec changes (fix the migration, or add a new version)"),
            Blocked::Paused(t) => format!("tenant {t} failed and onFailure is Pause; no further tenant starts until the spec changes"),
        }
    }
}

/// What one pass does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutPlan {
    pub set: SetRef,
    pub migrations: Vec<MigrationSql>,
    /// Canaries behind the latest version: run first.
    pub canaries: Vec<TenantName>,
    /// The others behind the latest version: run once every canary succeeded.
    pub rest: Vec<TenantName>,
    pub max_concurrent: usize,
    pub on_failure: OnFailure,
    pub blocked: Option<Blocked>,
    /// Tenants behind and runnable but left for a later pass.
    pub deferred: usize,
}

impl RolloutPlan {
    pub fn latest(&self) -> i64 {
        self.migrations.last().map(|m| m.version).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.canaries.is_empty() && self.rest.is_empty()
    }
}

/// The failures that still hold under `generation`: the tenant is still
/// behind the failed version. Name to record.
pub fn live_failures<'a>(obs: &'a Observed, set: &str, generation: i64) -> BTreeMap<&'a str, &'a FailureRecord> {
    obs.failures
        .iter()
        .filter(|f| f.migration_set == set && f.set_generation == generation && f.reason == REASON_FAILED)
        .filter(|f| {
            // Only followers count: a tenant that moved to another set, or
            // went, does not hold this one.
            let versions = TenantName::parse(&f.tenant).ok().and_then(|n| obs.versions.get(&n));
            versions.is_some_and(|v| f.version > v.current())
        })
        .map(|f| (f.tenant.as_str(), f))
        .collect()
}

/// The canaries: the first `canary` provisioned followers, by name.
pub fn canaries(obs: &Observed, canary: usize) -> Vec<TenantName> {
    obs.followers
        .iter()
        .filter(|n| obs.versions.get(*n).is_some_and(|v| v.schema_exists))
        .take(canary)
        .cloned()
        .collect()
}

pub fn plan(name: &str, generation: i64, spec: &MigrationSetSpec, obs: &Observed) -> RolloutPlan {
    let set = SetRef {
        name: name.to_owned(),
        generation,
    };
    let rollout = &spec.rollout;
    let max_concurrent = rollout.max_concurrent.clamp(1, 64) as usize;
    let mut out = RolloutPlan {
        set,
        migrations: Vec::new(),
        canaries: Vec::new(),
        rest: Vec::new(),
        max_concurrent,
        on_failure: rollout.on_failure,
        blocked: None,
        deferred: 0,
    };
    let migrations = match migrations(spec) {
        Ok(m) => m,
        Err(e) => {
            out.blocked = Some(Blocked::InvalidSpec(e));
            return out;
        }
    };
    out.migrations = migrations;
    let latest = out.latest();

    let mismatches: Vec<(TenantName, i64, String)> = obs
        .followers
        .iter()
        .filter_map(|n| {
            let v = obs.versions.get(n)?;
            find_mismatch(&v.applied, &out.migrations).map(|(version, what)| (n.clone(), version, what))
        })
        .collect();
    if !mismatches.is_empty() {
        out.blocked = Some(Blocked::ChecksumMismatch(mismatches));
        return out;
    }

    let failed = live_failures(obs, name, generation);
    let canaries = canaries(obs, rollout.canary as usize);
    if let Some(c) = canaries.iter().find(|c| failed.contains_key(c.as_str())) {
        out.blocked = Some(Blocked::CanaryFailed(c.clone()));
        return out;
    }
    if rollout.on_failure == OnFailure::Pause {
        if let Some(t) = failed.keys().find_map(|t| TenantName::parse(t).ok()) {
            out.blocked = Some(Blocked::Paused(t));
            return out;
        }
    }
    let behind = |n: &&TenantName| {
        obs.versions
            .get(*n)
            .is_some_and(|v| v.schema_exists && v.current() < latest)
            && !failed.contains_key(n.as_str())
    };
    let canary_set: BTreeSet<&TenantName> = canaries.iter().collect();
    out.canaries = canaries.iter().filter(behind).cloned().collect();
    // A new schema (no migration applied) of a Tenant still being
    // provisioned gets every migration from its own reconcile, right after
    // provisioning: a pass that ran it too would only find it busy (and run
    // again a second later, for as long as a burst of new tenants lasts) or
    // race it. A Tenant Ready at version 0 (its first run found the lock
    // taken) is the pass's again.
    let new_schema = |n: &&TenantName| {
        obs.versions.get(*n).is_some_and(|v| v.applied.is_empty()) && obs.provisioning.binary_search(n).is_ok()
    };
    let mut rest: Vec<TenantName> = obs
        .followers
        .iter()
        .filter(behind)
        .filter(|n| !canary_set.contains(n))
        .filter(|n| !new_schema(n))
        .cloned()
        .collect();
    let limit = max_concurrent * PASS_FACTOR;
    if rest.len() > limit {
        out.deferred = rest.len() - limit;
        rest.truncate(limit);
    }
    out.rest = rest;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Migration, RolloutSpec};
    use crate::pg::migrations::{checksum, Applied};

    fn n(s: &str) -> TenantName {
        TenantName::parse(s).unwrap()
    }

    fn spec(versions: &[(i64, &str)], canary: u32, on_failure: OnFailure) -> MigrationSetSpec {
        MigrationSetSpec {
            migrations: versions
                .iter()
                .map(|(v, sql)| Migration {
                    version: *v,
                    name: format!("m{v}"),
                    sql: sql.to_string(),
                    transactional: true,
                })
                .collect(),
            rollout: RolloutSpec {
                max_concurrent: 2,
                canary,
                on_failure,
            },
        }
    }

    fn at(v: &[(i64, &str)]) -> SchemaVersions {
        SchemaVersions {
            schema_exists: true,
            applied: v
                .iter()
                .map(|(v, sql)| Applied {
                    version: *v,
                    name: format!("m{v}").into(),
                    checksum: checksum(sql).into(),
                })
                .collect(),
        }
    }

    fn obs(tenants: &[(&str, SchemaVersions)]) -> Observed {
        Observed {
            followers: tenants.iter().map(|(t, _)| n(t)).collect(),
            versions: tenants.iter().map(|(t, v)| (n(t), v.clone())).collect(),
            failures: vec![],
            provisioning: vec![],
        }
    }

    fn failure(t: &str, version: i64, generation: i64) -> FailureRecord {
        FailureRecord {
            tenant: t.into(),
            migration_set: "default".into(),
            set_generation: generation,
            version,
            migration_name: format!("m{version}"),
            reason: REASON_FAILED.into(),
            error: "boom".into(),
            sqlstate: Some("23514".into()),
        }
    }

    #[test]
    fn versions_must_increase_strictly() {
        let s = spec(&[(1, "a"), (1, "b")], 1, OnFailure::Pause);
        let p = plan("default", 1, &s, &obs(&[]));
        assert!(
            matches!(p.blocked, Some(Blocked::InvalidSpec(ref m)) if m.contains("strictly increasing")),
            "{:?}",
            p.blocked
        );
    }

    #[test]
    fn canaries_first_then_the_rest() {
        let s = spec(&[(1, "a")], 1, OnFailure::Pause);
        let o = obs(&[("a", at(&[])), ("b", at(&[])), ("c", at(&[]))]);
        let p = plan("default", 1, &s, &o);
        assert_eq!(p.canaries, vec![n("a")]);
        assert_eq!(p.rest, vec![n("b"), n("c")]);
        let o = obs(&[("a", at(&[(1, "a")])), ("b", at(&[])), ("c", at(&[]))]);
        let p = plan("default", 1, &s, &o);
        assert!(p.canaries.is_empty());
        assert_eq!(p.rest, vec![n("b"), n("c")]);
    }

    #[test]
    fn a_new_schema_still_being_provisioned_is_left_to_its_own_reconcile() {
        let s = spec(&[(1, "a"), (2, "b")], 1, OnFailure::Pause);
        // a: the canary, new and provisioning; b: at version 1; c: new and
        // provisioning; d: new, its Tenant Ready (its first run found the
        // lock taken); e: at version 1 and provisioning (a spec change).
        let mut o = obs(&[
            ("a", at(&[])),
            ("b", at(&[(1, "a")])),
            ("c", at(&[])),
            ("d", at(&[])),
            ("e", at(&[(1, "a")])),
        ]);
        o.provisioning = vec![n("a"), n("c"), n("e")];
        let p = plan("default", 1, &s, &o);
        // A canary is run whatever its state: the others wait on it.
        assert_eq!(p.canaries, vec![n("a")]);
        assert_eq!(p.rest, vec![n("b"), n("d"), n("e")]);
        assert_eq!(p.deferred, 0);
        // Once Ready, it is the pass's like any other.
        o.provisioning.clear();
        assert_eq!(plan("default", 1, &s, &o).rest, vec![n("b"), n("c"), n("d"), n("e")]);
    }

    #[test]
    fn a_canary_failure_blocks_in_both_modes_and_a_new_generation_retries() {
        for mode in [OnFailure::Pause, OnFailure::Continue] {
            let s = spec(&[(1, "a")], 1, mode);
            let mut o = obs(&[("a", at(&[])), ("b", at(&[]))]);
            o.failures.push(failure("a", 1, 3));
            let p = plan("default", 3, &s, &o);
            assert_eq!(p.blocked, Some(Blocked::CanaryFailed(n("a"))));
            assert!(p.is_empty());
            let p = plan("default", 4, &s, &o);
            assert_eq!(p.blocked, None);
            assert_eq!(p.canaries, vec![n("a")]);
        }
    }

    #[test]
    fn pause_stops_everyone_continue_skips_only_the_failed_tenant() {
        let o = {
            let mut o = obs(&[("a", at(&[(1, "a")])), ("b", at(&[])), ("c", at(&[]))]);
            o.failures.push(failure("b", 1, 1));
            o
        };
        let p = plan("default", 1, &spec(&[(1, "a")], 1, OnFailure::Pause), &o);
        assert_eq!(p.blocked, Some(Blocked::Paused(n("b"))));
        let p = plan("default", 1, &spec(&[(1, "a")], 1, OnFailure::Continue), &o);
        assert_eq!(p.blocked, None);
        assert_eq!(p.rest, vec![n("c")]);
    }

    #[test]
    fn an_edited_migration_blocks_the_set() {
        let s = spec(&[(1, "a edited")], 0, OnFailure::Continue);
        let o = obs(&[("a", at(&[(1, "a")])), ("b", at(&[]))]);
        let p = plan("default", 1, &s, &o);
        assert!(matches!(p.blocked, Some(Blocked::ChecksumMismatch(ref v)) if v[0].0 == n("a")));
        assert!(p.is_empty());
    }

    #[test]
    fn a_stale_failure_does_not_block() {
        let mut o = obs(&[("a", at(&[(1, "a")])), ("b", at(&[]))]);
        o.failures.push(failure("a", 1, 1));
        let p = plan("default", 1, &spec(&[(1, "a")], 0, OnFailure::Pause), &o);
        assert_eq!(p.blocked, None, "a is at version 1 now: its failure record is stale");
        assert_eq!(p.rest, vec![n("b")]);
    }

    #[test]
    fn unprovisioned_followers_are_left_to_the_tenant_controller() {
        let o = obs(&[("a", SchemaVersions::default()), ("b", at(&[]))]);
        let p = plan("default", 1, &spec(&[(1, "a")], 1, OnFailure::Pause), &o);
        assert_eq!(p.canaries, vec![n("b")], "the canary is the first provisioned follower");
        assert!(p.rest.is_empty());
    }

    #[test]
    fn a_pass_is_bounded() {
        let total = 2 * PASS_FACTOR + 44;
        let names: Vec<String> = (0..total).map(|i| format!("t{i:05}")).collect();
        let o = obs(&names.iter().map(|t| (t.as_str(), at(&[]))).collect::<Vec<_>>());
        let p = plan("default", 1, &spec(&[(1, "a")], 0, OnFailure::Pause), &o);
        assert_eq!(p.rest.len(), 2 * PASS_FACTOR);
        assert_eq!(p.deferred, 44);
    }
}
