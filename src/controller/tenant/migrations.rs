//! The migrations step of a Tenant reconcile: `status.schemaVersion` and the
//! `MigrationsApplied` condition, and a brand-new schema brought to the
//! latest version.
//!
//! Takes the Tenant's MigrationSet (watch cache, or the API server), its
//! recorded schema versions (`tenancy.schema_versions`), its failure record
//! and the root keys (for its ops login). A tenant with no
//! migration applied yet (just provisioned, or provisioned before its set
//! existed) gets every migration of the set at once, here, without waiting
//! for the rollout's canaries: it holds no data a migration could trip on.
//! A tenant already on some version is left to the MigrationSet controller
//! (canaries, `maxConcurrent`, pause on failure); this step only reports.
//! Side effects: that first migration run (on a confined session of the
//! tenant: DDL in its schema, rows in its version table; by the admin: rows
//! in `tenancy.schema_versions` and `tenancy.migration_failures`).

use std::sync::Arc;

use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use crate::api::{MigrationSet, Tenant};
use crate::controller::kit::conditions::Cond;
use crate::controller::migration_set::plan::migrations as checked_migrations;
use crate::controller::Context;
use crate::names::TenantName;
use crate::pg::confined::Confined;
use crate::pg::migrations::{find_mismatch, FailureRecord, SchemaVersions, SetRef, TenantOutcome, REASON_FAILED};
use crate::pg::PgError;

pub const CONDITION: &str = "MigrationsApplied";

/// What the step decides before touching Postgres. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Only report.
    Report,
    /// Apply every migration of the set (the schema has none yet).
    MigrateNew,
}

/// Decides whether this reconcile runs the migrations itself.
pub fn plan(set: Option<&MigrationSet>, versions: &SchemaVersions, failure: Option<&FailureRecord>) -> Step {
    let Some(set) = set else { return Step::Report };
    let Ok(migrations) = checked_migrations(&set.spec) else {
        return Step::Report;
    };
    if migrations.is_empty() || !versions.schema_exists || !versions.applied.is_empty() {
        return Step::Report;
    }
    // A first run that failed under this generation waits for a spec change,
    // as the rollout's failures do.
    let generation = set.metadata.generation.unwrap_or(0);
    let name = set.metadata.name.as_deref().unwrap_or_default();
    if failure.is_some_and(|f| f.migration_set == name && f.set_generation == generation) {
        return Step::Report;
    }
    Step::MigrateNew
}

/// `MigrationsApplied` and `schemaVersion` from what was observed. Pure.
pub fn condition(
    set_name: &str,
    set: Option<&MigrationSet>,
    versions: &SchemaVersions,
    failure: Option<&FailureRecord>,
) -> (Cond, i64) {
    let current = versions.current();
    let Some(set) = set else {
        return (
            Cond::new(
                CONDITION,
                false,
                "MigrationSetNotFound",
                format!("MigrationSet {set_name} does not exist; the schema stays at version {current} until it does"),
            ),
            current,
        );
    };
    let migrations = match checked_migrations(&set.spec) {
        Ok(m) => m,
        Err(e) => {
            return (
                Cond::new(
                    CONDITION,
                    false,
                    "InvalidMigrationSet",
                    format!("MigrationSet {set_name}: {e}"),
                ),
                current,
            )
        }
    };
    if let Some((_, what)) = find_mismatch(&versions.applied, &migrations) {
        return (Cond::new(CONDITION, false, "ChecksumMismatch", what), current);
    }
    if let Some(f) = failure.filter(|f| f.migration_set == set_name && f.reason == REASON_FAILED && f.version > current)
    {
        let code = f
            .sqlstate
            .as_deref()
            .map(|c| format!(" (SQLSTATE {c})"))
            .unwrap_or_default();
        let msg = format!(
            "version {} ({}) failed: {}{code}; the schema stays at version {current}",
            f.version, f.migration_name, f.error
        );
        return (Cond::new(CONDITION, false, "MigrationFailed", msg), current);
    }
    let latest = migrations.last().map(|m| m.version).unwrap_or(0);
    if current >= latest {
        let what = migrations.last().map(|m| format!(" ({})", m.name)).unwrap_or_default();
        (
            Cond::new(
                CONDITION,
                true,
                "UpToDate",
                format!("schema at version {current}{what}, the latest of MigrationSet {set_name}"),
            ),
            current,
        )
    } else {
        (rolling_out(current, latest, set_name), current)
    }
}

/// `MigrationsApplied` of a schema at `current` while its set rolls out
/// `latest`. [`followers_to_refresh`] reads its message.
fn rolling_out(current: i64, latest: i64, set_name: &str) -> Cond {
    Cond::new(
        CONDITION,
        false,
        "RollingOut",
        format!("schema at version {current} of {latest}; the MigrationSet {set_name} rollout applies the rest"),
    )
}

/// Whether `t` is a follower of `set` that a light reconcile may answer
/// (`super::triggers`): Ready, converged at its generation, not being
/// deleted, shown `UpToDate` (or `RollingOut`) at a version below the set's
/// latest, and not listed as failed. Gives the version shown. Pure.
fn behind_and_steady(t: &Tenant, set: &MigrationSet) -> Option<i64> {
    let set_name = set.metadata.name.as_deref()?;
    let status = t.status.as_ref()?;
    let set_status = set.status.as_ref()?;
    let latest = set_status.latest_version?;
    let shown = status.schema_version?;
    let tenant = t.metadata.name.as_deref()?;
    let steady = t.spec.database.migration_set == set_name && super::status::steady(t);
    let migrations = super::status::condition(Some(status), CONDITION)?;
    let behind = shown < latest
        && (migrations.reason == "UpToDate" || migrations.reason == "RollingOut")
        && !set_status.failed.iter().any(|f| f.tenant == tenant);
    (steady && behind).then_some(shown)
}

/// `t`'s status with `MigrationsApplied` as `cond` and `schemaVersion` as
/// `version`, nothing else changed; `None` when that is what it shows. Pure.
pub fn with_migrations(t: &Tenant, cond: &Cond, version: i64, now: &str) -> Option<crate::api::TenantStatus> {
    let status = t.status.as_ref()?;
    let mut next = super::status::replace_condition(status, cond, t.metadata.generation, now)?;
    next.schema_version = Some(version);
    (next != *status).then_some(next)
}

/// The light reconcile of a follower the set's watch brought back while
/// the set is `Progressing` (`super::triggers`): when [`behind_and_steady`],
/// its status with `MigrationsApplied` saying `RollingOut` from the version
/// it shows, and nothing else changed, without Postgres. `None` when any of
/// that does not hold (see [`settled_candidate`] for a set that settled).
/// Pure.
///
/// The version shown may be behind (the rollout may have migrated the
/// schema since): the set's `Complete` brings every follower back, and its
/// versions are read then.
pub fn rolling_out_status(t: &Tenant, set: &MigrationSet, now: &str) -> Option<crate::api::TenantStatus> {
    use crate::api::MigrationSetPhase;
    let set_name = set.metadata.name.as_deref()?;
    let set_status = set.status.as_ref()?;
    if set_status.phase != Some(MigrationSetPhase::Progressing) {
        return None;
    }
    let shown = behind_and_steady(t, set)?;
    let latest = set_status.latest_version?;
    with_migrations(t, &rolling_out(shown, latest, set_name), shown, now)
}

/// Whether the set's watch may leave `t` to a light reconcile: a
/// [`behind_and_steady`] follower of a set that is `Progressing`, or
/// [`settled_candidate`]. The reconcile decides again on what it finds
/// then (and goes full when there is nothing to change). Pure; builds no
/// status, as the set's watch asks it of every follower at each event.
pub fn light_candidate(t: &Tenant, set: &MigrationSet) -> bool {
    let progressing = set
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Some(crate::api::MigrationSetPhase::Progressing));
    (progressing && behind_and_steady(t, set).is_some()) || settled_candidate(t, set)
}

/// Whether the set's watch brought `t` back because the set settled
/// (`Complete`, at its generation) while `t` is [`behind_and_steady`]: the
/// light reconcile then reads the tenant's recorded versions and failure
/// (two indexed queries on the tenant's shard, not the full observation)
/// and rewrites `MigrationsApplied` and `schemaVersion` from them. Pure.
pub fn settled_candidate(t: &Tenant, set: &MigrationSet) -> bool {
    use crate::api::MigrationSetPhase;
    let Some(set_status) = set.status.as_ref() else {
        return false;
    };
    set_status.phase == Some(MigrationSetPhase::Complete)
        && set_status.observed_generation == set.metadata.generation
        && behind_and_steady(t, set).is_some()
}

/// [`settled_candidate`]'s status: `MigrationsApplied` and `schemaVersion`
/// from the tenant's recorded versions and failure on `pool`, as the full
/// reconcile computes them ([`condition`]).
pub async fn settled_status(
    pool: &sqlx::PgPool,
    t: &Tenant,
    name: &TenantName,
    set: &MigrationSet,
    now: &str,
) -> Result<Option<crate::api::TenantStatus>, PgError> {
    let versions = crate::pg::migrations::observe(pool, name).await?;
    let failure = crate::pg::migrations::failure_of(pool, name).await?;
    let set_name = set.metadata.name.as_deref().unwrap_or_default();
    let (cond, version) = condition(set_name, Some(set), &versions, failure.as_ref());
    Ok(with_migrations(t, &cond, version, now))
}

/// The followers of `ms` whose status may be behind it: not shown at its
/// latest version, not `MigrationsApplied=True`, or listed as failed. Pure.
///
/// While the set is `Progressing`, a follower that already says it is
/// `RollingOut` to the set's latest version is left alone: the rollout
/// moves the set's status after every few tenants, and bringing back every
/// follower still behind at each of those made a rollout of N tenants cost
/// about N reconciles per status write (3.4 full observations per tenant
/// in a 1,000-tenant rollout, docs/scale.md). Such a follower is brought
/// back when the set settles (`Complete` or `Paused`) or lists it as failed.
pub fn followers_to_refresh(ms: &MigrationSet, tenants: &[Arc<Tenant>]) -> Vec<ObjectRef<Tenant>> {
    let name = ms.metadata.name.as_deref().unwrap_or_default();
    let latest = ms.status.as_ref().and_then(|s| s.latest_version);
    let progressing = ms
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Some(crate::api::MigrationSetPhase::Progressing));
    // The `RollingOut` message of [`condition`] names the latest version.
    let to_latest = latest.map(|l| format!(" of {l};"));
    let rolling_out_to_latest = |t: &Tenant| {
        let Some(to_latest) = to_latest.as_deref() else {
            return false;
        };
        t.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION))
            .is_some_and(|c| c.reason == "RollingOut" && c.message.contains(to_latest))
    };
    let failed: Vec<&str> = ms
        .status
        .iter()
        .flat_map(|s| s.failed.iter().map(|f| f.tenant.as_str()))
        .collect();
    tenants
        .iter()
        .filter(|t| t.spec.database.migration_set == name)
        .filter(|t| {
            let status = t.status.as_ref();
            let applied = status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION))
                .is_some_and(|c| c.status == "True");
            let shown = status.and_then(|s| s.schema_version);
            let is_failed = failed.contains(&t.metadata.name.as_deref().unwrap_or_default());
            if progressing && !is_failed && rolling_out_to_latest(t) {
                return false;
            }
            latest.is_none() || shown != latest || !applied || is_failed
        })
        // By name only: the controller reads the Tenant from its cache (a
        // reference with the resourceVersion and uid is two strings more
        // per follower waiting in the queue).
        .filter_map(|t| t.metadata.name.as_deref().map(ObjectRef::new))
        .collect()
}

/// The Tenant's MigrationSet: from the watch cache when the controller
/// runs one, else from the API server.
async fn get_set(ctx: &Context, name: &str) -> Result<Option<Arc<MigrationSet>>, kube::Error> {
    if let Some(store) = ctx.migration_sets.get() {
        if tokio::time::timeout(std::time::Duration::from_secs(10), store.wait_until_ready())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            // Not in the cache may only mean not yet in it (its watch event
            // can come before the cache's): then ask the API server.
            if let Some(set) = store.get(&ObjectRef::new(name)) {
                return Ok(Some(set));
            }
        }
    }
    let api: Api<MigrationSet> = Api::all(ctx.client.clone());
    Ok(api.get_opt(name).await?.map(Arc::new))
}

/// Why the step could not report.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("reading MigrationSet {0}: {1}")]
    ReadSet(String, #[source] kube::Error),
    #[error("the operator has no root keys loaded: it cannot log in as the tenant's ops role")]
    NoRootKeys,
    #[error(transparent)]
    Database(#[from] PgError),
}

/// Observes, runs the first migrations of a new schema when planned, and
/// gives the condition and schema version.
pub async fn converge(
    ctx: &Context,
    pool: &sqlx::PgPool,
    t: &Tenant,
    name: &TenantName,
    session: Option<Confined>,
) -> Result<(Cond, i64), StepError> {
    let set_name = t.spec.database.migration_set.to_string();
    let set = get_set(ctx, &set_name)
        .await
        .map_err(|e| StepError::ReadSet(set_name.clone(), e))?;
    let ring = ctx.keys.current().ok_or(StepError::NoRootKeys)?;
    converge_pg_on(
        pool,
        &ring,
        name,
        &set_name,
        set.as_deref(),
        &ctx.settings.migration_timeouts,
        session,
    )
    .await
    .map_err(StepError::Database)
}

/// The Postgres half of [`converge`], for tests.
pub async fn converge_pg(
    pool: &sqlx::PgPool,
    ring: &crate::crypto::Keyring,
    name: &TenantName,
    set_name: &str,
    set: Option<&MigrationSet>,
    timeouts: &crate::pg::migrations::Timeouts,
) -> Result<(Cond, i64), PgError> {
    converge_pg_on(pool, ring, name, set_name, set, timeouts, None).await
}

/// [`converge_pg`], a first migration run using `session` (a confined
/// session of the tenant the reconcile opened already, acting as nobody)
/// instead of logging in again; closed when not used.
pub async fn converge_pg_on(
    pool: &sqlx::PgPool,
    ring: &crate::crypto::Keyring,
    name: &TenantName,
    set_name: &str,
    set: Option<&MigrationSet>,
    timeouts: &crate::pg::migrations::Timeouts,
    session: Option<Confined>,
) -> Result<(Cond, i64), PgError> {
    let mut session = session;
    let result = async {
        let mut versions = crate::pg::migrations::observe(pool, name).await?;
        let mut failure = crate::pg::migrations::failure_of(pool, name).await?;
        if let (Step::MigrateNew, Some(s)) = (plan(set, &versions, failure.as_ref()), set) {
            let migrations = checked_migrations(&s.spec).unwrap_or_default();
            let set_ref = SetRef {
                name: set_name.to_owned(),
                generation: s.metadata.generation.unwrap_or(0),
            };
            let outcome = match crate::pg::migrations::ops_login(pool, ring, name).await? {
                Some(login) => match session.take() {
                    Some(c) => {
                        crate::pg::migrations::migrate_new_tenant_on(pool, &login, c, &set_ref, &migrations, timeouts)
                            .await?
                    }
                    None => {
                        crate::pg::migrations::migrate_new_tenant(pool, &login, &set_ref, &migrations, timeouts)
                            .await?
                    }
                },
                None => TenantOutcome::NoSchema,
            };
        match &outcome {
            TenantOutcome::Migrated { to, applied, .. } => {
                tracing::info!(tenant = %name, version = to, applied = applied.len(), "brought the new schema to the latest version")
            }
            TenantOutcome::Failed { version, error, .. } => {
                tracing::warn!(tenant = %name, version, %error, "a migration of the new schema failed")
            }
            other => tracing::debug!(tenant = %name, outcome = ?other, "first migration run did nothing"),
        }
            versions = crate::pg::migrations::observe(pool, name).await?;
            failure = crate::pg::migrations::failure_of(pool, name).await?;
        }
        Ok(condition(set_name, set, &versions, failure.as_ref()))
    }
    .await;
    if let Some(c) = session {
        c.close().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Migration, MigrationSetSpec, RolloutSpec};
    use crate::pg::migrations::{checksum, Applied};

    fn set(gen: i64, sqls: &[&str]) -> MigrationSet {
        let mut s = MigrationSet::new(
            "default",
            MigrationSetSpec {
                migrations: sqls
                    .iter()
                    .enumerate()
                    .map(|(i, sql)| Migration {
                        version: i as i64 + 1,
                        name: format!("m{}", i + 1),
                        sql: sql.to_string(),
                        transactional: true,
                    })
                    .collect(),
                rollout: RolloutSpec::default(),
            },
        );
        s.metadata.generation = Some(gen);
        s
    }

    fn at(sqls: &[&str]) -> SchemaVersions {
        SchemaVersions {
            schema_exists: true,
            applied: sqls
                .iter()
                .enumerate()
                .map(|(i, sql)| Applied {
                    version: i as i64 + 1,
                    name: format!("m{}", i + 1).into(),
                    checksum: checksum(sql).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_follower_already_rolling_out_waits_for_the_set_to_settle() {
        use crate::api::{FailedTenant, MigrationSetPhase, MigrationSetStatus};
        let tenant = |name: &str, version: i64, reason: &str, message: &str| -> Arc<Tenant> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
                    "metadata": {"name": name},
                    "spec": {},
                    "status": {"schemaVersion": version, "conditions": [{
                        "type": CONDITION, "status": if reason == "UpToDate" { "True" } else { "False" },
                        "reason": reason, "message": message, "lastTransitionTime": "2026-12-02T00:00:00Z"}]}
                }))
                .unwrap(),
            )
        };
        let tenants = vec![
            tenant(
                "rolling",
                1,
                "RollingOut",
                "schema at version 1 of 3; the MigrationSet default rollout applies the rest",
            ),
            tenant("stale", 1, "UpToDate", "schema at version 1, the latest"),
            tenant(
                "older",
                1,
                "RollingOut",
                "schema at version 1 of 2; the MigrationSet default rollout applies the rest",
            ),
            tenant("done", 3, "UpToDate", "schema at version 3, the latest"),
        ];
        let mut s = set(3, &["a", "b", "c"]);
        let names = |s: &MigrationSet| -> Vec<String> {
            followers_to_refresh(s, &tenants).into_iter().map(|r| r.name).collect()
        };
        s.status = Some(MigrationSetStatus {
            phase: Some(MigrationSetPhase::Progressing),
            latest_version: Some(3),
            ..Default::default()
        });
        assert_eq!(names(&s), ["stale", "older"], "the one rolling out to 3 already knows");
        s.status.as_mut().unwrap().failed = vec![FailedTenant {
            tenant: "rolling".into(),
            version: 2,
            reason: REASON_FAILED.into(),
            error: "boom".into(),
        }];
        assert_eq!(names(&s), ["rolling", "stale", "older"], "a failed one is brought back");
        s.status.as_mut().unwrap().failed.clear();
        s.status.as_mut().unwrap().phase = Some(MigrationSetPhase::Complete);
        assert_eq!(
            names(&s),
            ["rolling", "stale", "older"],
            "all behind, once the set settles"
        );
    }

    #[test]
    fn a_steady_follower_behind_a_progressing_set_is_told_rolling_out_without_postgres() {
        use crate::api::{FailedTenant, MigrationSetPhase, MigrationSetStatus, TenantPhase};
        let base = || -> Tenant {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tenancy.dev/v1alpha1", "kind": "Tenant",
                "metadata": {"name": "acme", "generation": 4},
                "spec": {},
                "status": {"phase": "Active", "observedGeneration": 4, "schemaVersion": 1, "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Provisioned", "message": "ok",
                     "lastTransitionTime": "2026-12-01T00:00:00Z", "observedGeneration": 4},
                    {"type": CONDITION, "status": "True", "reason": "UpToDate",
                     "message": "schema at version 1 (a), the latest of MigrationSet default",
                     "lastTransitionTime": "2026-12-01T00:00:00Z", "observedGeneration": 4},
                    {"type": "SecretsSealed", "status": "True", "reason": "Sealed", "message": "0 secrets",
                     "lastTransitionTime": "2026-12-01T00:00:00Z", "observedGeneration": 4}]}
            }))
            .unwrap()
        };
        let mut s = set(2, &["a", "b"]);
        s.status = Some(MigrationSetStatus {
            phase: Some(MigrationSetPhase::Progressing),
            latest_version: Some(2),
            ..Default::default()
        });
        let t = base();
        let next = rolling_out_status(&t, &s, "2026-12-03T00:00:00Z").expect("light");
        let old = t.status.as_ref().unwrap();
        // Only MigrationsApplied changed, in place, and its message is the
        // full reconcile's (followers_to_refresh reads it).
        let (full, _) = condition("default", Some(&s), &at(&["a"]), None);
        let c = next.conditions.iter().find(|c| c.type_ == CONDITION).unwrap();
        assert_eq!(
            (
                c.status.as_str(),
                c.reason.as_str(),
                c.message.as_str(),
                c.last_transition_time.as_str()
            ),
            ("False", "RollingOut", full.message.as_str(), "2026-12-03T00:00:00Z")
        );
        assert_eq!(c.observed_generation, Some(4));
        let mut rest = next.clone();
        rest.conditions.retain(|c| c.type_ != CONDITION);
        let mut old_rest = old.clone();
        old_rest.conditions.retain(|c| c.type_ != CONDITION);
        assert_eq!(rest, old_rest);
        assert_eq!(
            next.conditions.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            ["Ready", CONDITION, "SecretsSealed"]
        );
        // Told already: nothing to write, so a full reconcile decides.
        let mut told = t.clone();
        told.status = Some(next);
        assert_eq!(rolling_out_status(&told, &s, "2026-12-03T00:00:01Z"), None);

        // Each of these needs the full reconcile.
        let mut changed = base();
        changed.metadata.generation = Some(5);
        let mut not_ready = base();
        not_ready.status.as_mut().unwrap().phase = Some(TenantPhase::Provisioning);
        let mut other_set = base();
        other_set.spec.database.migration_set = "other".into();
        let mut failed_cond = base();
        failed_cond.status.as_mut().unwrap().conditions[1].reason = "MigrationFailed".into();
        let mut deleting = base();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        let mut ahead = base();
        ahead.status.as_mut().unwrap().schema_version = Some(2);
        for (what, t) in [
            ("a spec not yet converged", changed),
            ("not Ready", not_ready),
            ("another set", other_set),
            ("a failure shown", failed_cond),
            ("being deleted", deleting),
            ("shown at the latest", ahead),
        ] {
            assert_eq!(rolling_out_status(&t, &s, "now"), None, "{what}");
            assert!(!light_candidate(&t, &s), "{what}");
        }
        assert!(light_candidate(&base(), &s));
        let mut listed = s.clone();
        listed.status.as_mut().unwrap().failed = vec![FailedTenant {
            tenant: "acme".into(),
            version: 2,
            reason: REASON_FAILED.into(),
            error: "boom".into(),
        }];
        let mut complete = s.clone();
        complete.status.as_mut().unwrap().phase = Some(MigrationSetPhase::Complete);
        for (what, s) in [
            ("listed as failed", listed.clone()),
            ("the set settled", complete.clone()),
        ] {
            assert_eq!(rolling_out_status(&base(), &s, "now"), None, "{what}");
        }

        // A set that settled at its generation: its followers behind are
        // candidates for the light reconcile that reads their versions.
        complete.status.as_mut().unwrap().observed_generation = complete.metadata.generation;
        assert!(settled_candidate(&base(), &complete));
        assert!(!settled_candidate(&base(), &s), "still progressing");
        assert!(!settled_candidate(&base(), &listed), "listed as failed");
        let mut stale = complete.clone();
        stale.status.as_mut().unwrap().observed_generation = Some(1);
        assert!(!settled_candidate(&base(), &stale), "a status of an older generation");
        let mut moving = base();
        moving.status.as_mut().unwrap().moving = Some(
            serde_json::from_value(serde_json::json!({
                "from": "default", "to": "s2", "phase": "Copying", "strategy": "logical", "startedAt": "2026-12-03T00:00:00Z"
            }))
            .expect("a MoveStatus"),
        );
        assert!(!settled_candidate(&moving, &complete), "moving between shards");
        // What it then writes: the full reconcile's condition and version.
        let (up, v) = condition("default", Some(&complete), &at(&["a", "b"]), None);
        let next = with_migrations(&base(), &up, v, "2026-12-03T00:00:02Z").expect("a change");
        assert_eq!(next.schema_version, Some(2));
        let c = next.conditions.iter().find(|c| c.type_ == CONDITION).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpToDate"));
        assert_eq!(
            c.last_transition_time, "2026-12-01T00:00:00Z",
            "True before, True now: the transition time holds"
        );
        let mut shown = base();
        shown.status = Some(next);
        assert_eq!(with_migrations(&shown, &up, v, "later"), None, "nothing to change");
    }

    #[test]
    fn a_missing_set_waits() {
        let (c, v) = condition("default", None, &at(&[]), None);
        assert_eq!((c.status, c.reason, v), (false, "MigrationSetNotFound", 0));
        assert_eq!(plan(None, &at(&[]), None), Step::Report);
    }

    #[test]
    fn only_a_schema_without_versions_is_migrated_here() {
        let s = set(1, &["a", "b"]);
        assert_eq!(plan(Some(&s), &at(&[]), None), Step::MigrateNew);
        assert_eq!(
            plan(Some(&s), &at(&["a"]), None),
            Step::Report,
            "a tenant on a version is the rollout's"
        );
        assert_eq!(
            plan(Some(&s), &SchemaVersions::default(), None),
            Step::Report,
            "no schema yet"
        );
    }

    #[test]
    fn up_to_date_behind_failed_and_edited() {
        let s = set(2, &["a", "b"]);
        let (c, v) = condition("default", Some(&s), &at(&["a", "b"]), None);
        assert_eq!((c.status, c.reason, v), (true, "UpToDate", 2));
        let (c, _) = condition("default", Some(&s), &at(&["a"]), None);
        assert_eq!((c.status, c.reason), (false, "RollingOut"));
        let f = FailureRecord {
            tenant: "x".into(),
            migration_set: "default".into(),
            set_generation: 2,
            version: 2,
            migration_name: "m2".into(),
            reason: REASON_FAILED.into(),
            error: "check constraint violated".into(),
            sqlstate: Some("23514".into()),
        };
        let (c, v) = condition("default", Some(&s), &at(&["a"]), Some(&f));
        assert_eq!((c.status, c.reason, v), (false, "MigrationFailed", 1));
        assert!(
            c.message
                .contains("version 2 (m2) failed: check constraint violated (SQLSTATE 23514)"),
            "{}",
            c.message
        );
        assert_eq!(
            plan(Some(&s), &at(&[]), Some(&f)),
            Step::Report,
            "a failed first run waits for a new generation"
        );
        let edited = set(3, &["a", "b edited"]);
        let (c, _) = condition("default", Some(&edited), &at(&["a", "b"]), None);
        assert_eq!((c.status, c.reason), (false, "ChecksumMismatch"));
    }
}
