//! The MigrationSet controller: rolls each set's migrations out across the
//! Tenants that follow it, and reports progress in the set's status.
//!
//! Takes MigrationSets from a watch and the Tenants from the operator's one
//! Tenant cache (a change of a set's followers brings every set back: sets
//! are few). Each
//! reconcile is one pass: observe the followers' version tables, plan
//! (canaries, the rest, or why nobody), migrate with bounded parallelism,
//! observe again and write the status when it changed. It writes only the
//! MigrationSet's status and `tenancy.migration_failures`; each Tenant's
//! status (`schemaVersion`, `MigrationsApplied`) is the Tenant controller's,
//! which re-reads the version table when the set changes.

pub mod apply;
pub mod observe;
pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use sqlx::PgPool;

use crate::api::{MigrationSet, MigrationSetPhase, MigrationSetSpec, Tenant};
use crate::controller::kit;
use crate::controller::Context;
use crate::crypto::Keyring;
use crate::names::TenantName;
use crate::pg::migrations::Timeouts;
use crate::pg::PgError;

/// Errors of one MigrationSet reconcile, named after the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the MigrationSet's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("the Tenant watch cache is gone")]
    StoreGone,
    #[error("the operator has no root keys loaded: it cannot log in as the tenants' ops roles")]
    NoRootKeys,
    #[error(transparent)]
    Database(#[from] PgError),
    #[error("shard {0:?} of some followers is not open; the rollout waits for it")]
    ShardUnavailable(String),
}

impl kit::ReconcileError for Error {
    fn label(&self) -> &'static str {
        match self {
            Error::PatchStatus(_) => "PatchStatus",
            Error::StoreGone => "StoreGone",
            Error::NoRootKeys => "NoRootKeys",
            Error::Database(e) if e.is_unreachable() => "DatabaseUnavailable",
            Error::Database(_) => "DatabaseError",
            Error::ShardUnavailable(_) => "ShardUnavailable",
        }
    }
}

/// What the MigrationSet reconciles get.
pub struct SetContext {
    pub ctx: Arc<Context>,
    /// Every Tenant (managed fields stripped), to find a set's followers.
    pub tenants: Store<Tenant>,
}

/// One pass of the Postgres side: what was planned, what ran, and the state
/// afterwards. No Kubernetes calls, so Postgres tests drive it directly.
#[derive(Debug)]
pub struct Pass {
    pub plan: plan::RolloutPlan,
    pub report: apply::RolloutReport,
    pub after: plan::Observed,
}

impl Pass {
    /// Another pass should follow soon: tenants were deferred, busy,
    /// interrupted or not started.
    pub fn more(&self) -> bool {
        self.plan.deferred > 0 || self.report.retry_soon()
    }
}

/// The followers of a set on one shard.
pub struct Group<'a> {
    pub pool: &'a PgPool,
    pub followers: Vec<TenantName>,
}

/// [`pass_over`] for followers that all live on the shard of `pool`.
pub async fn pass(
    pool: &PgPool,
    ring: &Keyring,
    name: &str,
    generation: i64,
    spec: &MigrationSetSpec,
    followers: &[TenantName],
    timeouts: &Timeouts,
) -> Result<Pass, PgError> {
    let groups = [Group {
        pool,
        followers: followers.to_vec(),
    }];
    pass_over(&groups, &[], ring, name, generation, spec, timeouts).await
}

/// Observe every shard's followers, plan once for all of them (canaries
/// and failure policy over the whole set), roll out (logging in as each
/// planned tenant's ops role on its shard, with a password derived from
/// `ring`), observe again. `provisioning`: the followers whose Tenant is
/// not Ready yet, sorted ([`plan::Observed::provisioning`]).
pub async fn pass_over(
    groups: &[Group<'_>],
    provisioning: &[TenantName],
    ring: &Keyring,
    name: &str,
    generation: i64,
    spec: &MigrationSetSpec,
    timeouts: &Timeouts,
) -> Result<Pass, PgError> {
    let before = observe_all(groups, provisioning, name).await?;
    let plan = plan::plan(name, generation, spec, &before);
    let mut shards = Vec::with_capacity(groups.len());
    if !plan.is_empty() && plan.blocked.is_none() {
        for g in groups {
            let mut tenants: Vec<TenantName> = plan
                .canaries
                .iter()
                .chain(plan.rest.iter())
                .filter(|t| g.followers.binary_search(t).is_ok())
                .cloned()
                .collect();
            tenants.sort();
            shards.push(apply::Shard { pool: g.pool, tenants });
        }
    }
    let report = apply::rollout(&shards, ring, &plan, timeouts).await;
    // The state afterwards follows from the report, unless another instance
    // or a lost connection may have changed what is known: then read again
    // (re-reading a thousand version tables costs more than the pass).
    // `before` becomes `after` in place: at 10,000 followers each copy of
    // their recorded versions is about 1.6 MB.
    let after = match advance(before, &plan, &report) {
        Some(after) => after,
        None => observe_all(groups, provisioning, name).await?,
    };
    Ok(Pass { plan, report, after })
}

/// The followers' state on every shard, as one [`plan::Observed`].
/// `failures_of_set` records live beside the tenants they name, so each
/// shard's are kept for its own followers only.
async fn observe_all(groups: &[Group<'_>], provisioning: &[TenantName], name: &str) -> Result<plan::Observed, PgError> {
    let mut all = plan::Observed {
        provisioning: provisioning.to_vec(),
        ..Default::default()
    };
    for g in groups {
        let o = observe::observe(g.pool, name, &g.followers).await?;
        all.followers.extend(o.followers);
        all.versions.extend(o.versions);
        all.failures.extend(
            o.failures
                .into_iter()
                .filter(|f| TenantName::parse(&f.tenant).is_ok_and(|t| g.followers.binary_search(&t).is_ok())),
        );
    }
    all.followers.sort();
    all.failures.sort_by(|a, b| a.tenant.cmp(&b.tenant));
    Ok(all)
}

/// `before` with the outcomes of `report` applied; None when an outcome
/// leaves the tenant's state unknown (busy elsewhere, interrupted). Pure.
pub fn advance(
    before: plan::Observed,
    plan: &plan::RolloutPlan,
    report: &apply::RolloutReport,
) -> Option<plan::Observed> {
    use crate::pg::migrations::{Applied, FailureRecord, TenantOutcome, REASON_CHECKSUM, REASON_FAILED};
    let mut after = before;
    for (tenant, outcome) in &report.results {
        let record = |version: i64, reason: &str, error: &str, sqlstate: &Option<String>| FailureRecord {
            tenant: tenant.to_string(),
            migration_set: plan.set.name.clone(),
            set_generation: plan.set.generation,
            version,
            migration_name: plan
                .migrations
                .iter()
                .find(|m| m.version == version)
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            reason: reason.into(),
            error: error.into(),
            sqlstate: sqlstate.clone(),
        };
        let replace = |after: &mut plan::Observed, rec: Option<FailureRecord>| {
            after.failures.retain(|f| f.tenant != tenant.as_str());
            after.failures.extend(rec);
            after.failures.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        };
        match outcome {
            apply::Outcome::Skipped | apply::Outcome::Done(TenantOutcome::NoSchema) => {}
            apply::Outcome::Error(_) | apply::Outcome::Done(TenantOutcome::Busy) => return None,
            apply::Outcome::Done(TenantOutcome::Migrated { from, applied, .. }) => {
                let v = after.versions.entry(tenant.clone()).or_default();
                // The record was re-synced from the schema's own table: read it again.
                if *from != v.current() {
                    return None;
                }
                for m in plan.migrations.iter().filter(|m| applied.contains(&m.version)) {
                    v.applied.push(Applied {
                        version: m.version,
                        name: m.name.as_str().into(),
                        checksum: m.checksum.as_str().into(),
                    });
                }
                replace(&mut after, None);
            }
            apply::Outcome::Done(TenantOutcome::Failed {
                version,
                error,
                sqlstate,
                at,
            }) => {
                // Versions before the failed one may have been applied in this run.
                let v = after.versions.entry(tenant.clone()).or_default();
                let current = v.current();
                for m in plan
                    .migrations
                    .iter()
                    .filter(|m| m.version > current && m.version <= *at)
                {
                    v.applied.push(Applied {
                        version: m.version,
                        name: m.name.as_str().into(),
                        checksum: m.checksum.as_str().into(),
                    });
                }
                replace(&mut after, Some(record(*version, REASON_FAILED, error, sqlstate)));
            }
            apply::Outcome::Done(TenantOutcome::ChecksumMismatch { version, detail }) => {
                replace(&mut after, Some(record(*version, REASON_CHECKSUM, detail, &None)));
            }
        }
    }
    Some(after)
}

/// The controller's view of the operator's Tenant watch: its store, and a
/// signal each time some set's followers changed.
pub struct Followers {
    store: Store<Tenant>,
    changes: futures::channel::mpsc::UnboundedReceiver<()>,
}

/// Subscribes the controller to the Tenant watch (before it starts).
pub fn subscribe(watch: &mut crate::controller::tenant_watch::TenantWatch) -> Followers {
    // Only what changes a set's followers brings the sets back: a Tenant
    // created, deleted, or following another set. Status writes do not (a
    // rollout makes every follower write its status; re-triggering on each
    // kept the sets' reconciles debounced for as long as that burst lasted,
    // about 37 s at 1,000 tenants).
    let mut follows = FollowerIndex::default();
    let changes = watch.listen(move |ev| follows.changed(ev).then_some(()));
    Followers {
        store: watch.store(),
        changes,
    }
}

/// Starts the MigrationSet controller and drives it until shutdown.
pub async fn run(ctx: Arc<Context>, tenants: Followers) {
    let Followers {
        store,
        changes: tenant_changes,
    } = tenants;
    let sets: Api<MigrationSet> = Api::all(ctx.client.clone());
    let sctx = Arc::new(SetContext {
        ctx: ctx.clone(),
        tenants: store,
    });
    // A set's own status writes do not bring it back: only a change of its
    // generation (its spec) does; a deleted set (no finalizer) is gone, as
    // before, and the filter's cache is keyed by uid, so one made again
    // under the same name is seen. During a provisioning
    // burst every pass wrote the followers' new count, and the echo of
    // that write ran the pass again about once a second (136 passes in a
    // 155 s burst of 3,000 tenants). The cache still takes every event, so
    // the next pass reads the status it wrote; the pass comes back on its
    // own requeue (1 s or 5 s while Progressing) and on follower changes.
    let (cache, writer) = reflector::store();
    let set_events = watcher(sets, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let outcomes = Controller::for_stream(set_events, cache)
        // Sets are few: any Tenant change (created, deleted, moved to another
        // set) re-runs every set, at most once per FOLLOWERS_EVERY (a pass
        // reads every follower's versions: 31 ms at 10,000 tenants). A new
        // tenant's first migrations are its own reconcile's, so what waits
        // is the set's status and a tenant that moved to another set.
        .reconcile_all_on(kit::throttle(tenant_changes, FOLLOWERS_EVERY))
        .with_config(kit::queue(4, Duration::from_secs(1)))
        // No signal handling of its own: the Tenant controller owns shutdown
        // (`controller::run`). A pass cut short by it loses only open
        // transactions, which Postgres rolls back.
        .run(reconcile, error_policy, sctx);
    kit::drain(CONTROLLER, outcomes).await;
}

/// Which set each Tenant follows, as the watch last showed it: tells the
/// events that change some set's followers from those that do not.
#[derive(Default)]
struct FollowerIndex(std::collections::HashMap<String, String>);

impl FollowerIndex {
    /// Records `ev` and says whether it changed a set's followers.
    fn changed(&mut self, ev: &watcher::Event<Tenant>) -> bool {
        match ev {
            watcher::Event::Apply(t) | watcher::Event::InitApply(t) => {
                let set = if t.metadata.deletion_timestamp.is_some() {
                    String::new()
                } else {
                    t.spec.database.migration_set.to_string()
                };
                self.0.insert(t.name_any(), set.clone()).as_ref() != Some(&set)
            }
            watcher::Event::Delete(t) => self.0.remove(&t.name_any()).is_some(),
            watcher::Event::Init => false,
            // A relist ends: sets are reconciled once for it.
            watcher::Event::InitDone => true,
        }
    }
}

/// The controller's name in metrics, logs and backoff keys.
const CONTROLLER: &str = "migrationset";

/// The sets are re-run for changes of their followers at most this often
/// (a change of a set itself is seen at once).
pub const FOLLOWERS_EVERY: Duration = Duration::from_secs(5);

fn error_policy(ms: Arc<MigrationSet>, err: &Error, sctx: Arc<SetContext>) -> Action {
    kit::error_policy(&sctx.ctx, CONTROLLER, &ms.name_any(), err)
}

async fn reconcile(ms: Arc<MigrationSet>, sctx: Arc<SetContext>) -> Result<Action, Error> {
    let name = ms.name_any();
    let span = tracing::info_span!("reconcile", controller = CONTROLLER, set = %name);
    kit::reconcile(&sctx.ctx, CONTROLLER, &name, span, reconcile_set(ms, sctx.clone())).await
}

async fn reconcile_set(ms: Arc<MigrationSet>, sctx: Arc<SetContext>) -> Result<Action, Error> {
    let ctx = &sctx.ctx;
    sctx.tenants.wait_until_ready().await.map_err(|_| Error::StoreGone)?;
    let name = ms.name_any();
    let generation = ms.metadata.generation.unwrap_or(0);
    let tenants = sctx.tenants.state();
    let followers = observe::followers(&tenants, &name);
    let ring = ctx.keys.current().ok_or(Error::NoRootKeys)?;
    // Followers by shard (one not placed yet has nothing to migrate: it is
    // observed on the default shard, where it has no schema).
    let by_shard = observe::by_shard(&tenants, &followers, |t| {
        crate::controller::tenant::placement::shard_of(ctx, t)
    });
    let mut conns = Vec::with_capacity(by_shard.len());
    for (shard, names) in &by_shard {
        let conn = ctx
            .shards
            .get(shard)
            .ok_or_else(|| Error::ShardUnavailable(shard.clone()))?;
        conns.push((conn, names));
    }
    let provisioning = observe::provisioning(&tenants, &followers);
    let groups: Vec<Group<'_>> = conns
        .iter()
        .map(|(c, names)| Group {
            pool: &c.pool,
            followers: (*names).clone(),
        })
        .collect();
    let pass = pass_over(
        &groups,
        &provisioning,
        &ring,
        &name,
        generation,
        &ms.spec,
        &ctx.settings.migration_timeouts,
    )
    .await?;
    let migrated = pass.report.count(|o| matches!(o, apply::Outcome::Done(crate::pg::migrations::TenantOutcome::Migrated { applied, .. }) if !applied.is_empty()));
    if !pass.report.results.is_empty() {
        tracing::info!(set = %name, migrated, tenants = pass.report.results.len(), elapsed_ms = pass.report.elapsed.as_millis() as u64, "rollout pass");
    }
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut new = status::compute(
        ms.status.as_ref(),
        ms.metadata.generation,
        &ms.spec,
        &pass.plan,
        &pass.after,
        pass.more(),
        &now,
    );
    new.shards = status::per_shard(&by_shard, &pass.plan, &pass.after);
    let old_phase = ms.status.as_ref().and_then(|s| s.phase);
    let phase = new.phase;
    let message = new
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.to_string())
        .unwrap_or_default();
    kit::write_status(ctx, ms.as_ref(), ms.status.as_ref(), &new)
        .await
        .map_err(Error::PatchStatus)?;
    if old_phase != phase {
        if let Some(p) = phase {
            let (warning, reason) = phase_event(p);
            kit::event(ctx, ms.as_ref(), warning, reason, message).await;
        }
    }
    Ok(match phase {
        Some(MigrationSetPhase::Progressing) if pass.more() => Action::requeue(Duration::from_secs(1)),
        Some(MigrationSetPhase::Progressing) => Action::requeue(Duration::from_secs(5).min(ctx.settings.resync)),
        _ => Action::requeue(ctx.settings.resync),
    })
}

/// The Event of a set whose phase changed: whether it is a warning, and its
/// reason. Pure.
pub fn phase_event(phase: MigrationSetPhase) -> (bool, &'static str) {
    match phase {
        MigrationSetPhase::Complete => (false, "RolledOut"),
        MigrationSetPhase::Progressing => (false, "RollingOut"),
        MigrationSetPhase::Paused => (true, "Paused"),
    }
}

#[cfg(test)]
mod tests {
    use super::apply::{Outcome, RolloutReport};
    use super::*;
    use crate::api::{Migration, OnFailure, RolloutSpec};
    use crate::pg::migrations::{SchemaVersions, TenantOutcome, REASON_FAILED};

    #[test]
    fn only_changes_of_a_tenants_set_bring_the_sets_back() {
        let tenant = |name: &str, set: &str| {
            let mut t = Tenant::new(
                name,
                serde_json::from_value(serde_json::json!({"database": {"migrationSet": set}})).unwrap(),
            );
            t.status = Some(Default::default());
            t
        };
        let mut idx = FollowerIndex::default();
        assert!(
            idx.changed(&watcher::Event::Apply(tenant("a", "default"))),
            "a new tenant"
        );
        let mut status_only = tenant("a", "default");
        status_only.status.as_mut().unwrap().schema_version = Some(3);
        assert!(!idx.changed(&watcher::Event::Apply(status_only)), "a status write");
        assert!(
            idx.changed(&watcher::Event::Apply(tenant("a", "other"))),
            "moved to another set"
        );
        let mut deleting = tenant("a", "other");
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(idx.changed(&watcher::Event::Apply(deleting)), "being deleted");
        assert!(idx.changed(&watcher::Event::Delete(tenant("a", "other"))), "gone");
        assert!(
            !idx.changed(&watcher::Event::Delete(tenant("a", "other"))),
            "gone twice"
        );
        assert!(!idx.changed(&watcher::Event::Init));
        assert!(idx.changed(&watcher::Event::InitDone));
    }

    #[test]
    fn the_state_after_a_pass_follows_from_its_report() {
        let spec = MigrationSetSpec {
            migrations: (1..=2)
                .map(|v| Migration {
                    version: v,
                    name: format!("m{v}"),
                    sql: format!("sql {v}"),
                    transactional: true,
                })
                .collect(),
            rollout: RolloutSpec {
                max_concurrent: 2,
                canary: 0,
                on_failure: OnFailure::Continue,
            },
        };
        let names: Vec<TenantName> = ["a", "b", "c"].iter().map(|n| TenantName::parse(n).unwrap()).collect();
        let before = plan::Observed {
            followers: names.clone(),
            versions: names
                .iter()
                .map(|n| {
                    (
                        n.clone(),
                        SchemaVersions {
                            schema_exists: true,
                            applied: vec![],
                        },
                    )
                })
                .collect(),
            failures: vec![],
            provisioning: vec![],
        };
        let p = plan::plan("default", 1, &spec, &before);
        let report = RolloutReport {
            results: vec![
                (
                    names[0].clone(),
                    Outcome::Done(TenantOutcome::Migrated {
                        from: 0,
                        to: 2,
                        applied: vec![1, 2],
                    }),
                ),
                (
                    names[1].clone(),
                    Outcome::Done(TenantOutcome::Failed {
                        at: 1,
                        version: 2,
                        error: "boom".into(),
                        sqlstate: None,
                    }),
                ),
                (names[2].clone(), Outcome::Skipped),
            ],
            ..Default::default()
        };
        let after = advance(before.clone(), &p, &report).expect("known outcomes");
        assert_eq!(after.versions[&names[0]].current(), 2);
        assert_eq!(
            after.versions[&names[1]].current(),
            1,
            "the version before the failed one was applied"
        );
        assert_eq!(after.versions[&names[2]].current(), 0);
        assert_eq!(after.failures.len(), 1);
        assert_eq!(
            (
                after.failures[0].tenant.as_str(),
                after.failures[0].version,
                after.failures[0].reason.as_str()
            ),
            ("b", 2, REASON_FAILED)
        );
        let busy = RolloutReport {
            results: vec![(names[2].clone(), Outcome::Done(TenantOutcome::Busy))],
            ..Default::default()
        };
        assert!(
            advance(before.clone(), &p, &busy).is_none(),
            "a tenant busy elsewhere must be read again"
        );
        let resynced = RolloutReport {
            results: vec![(
                names[2].clone(),
                Outcome::Done(TenantOutcome::Migrated {
                    from: 2,
                    to: 2,
                    applied: vec![],
                }),
            )],
            ..Default::default()
        };
        assert!(
            advance(before.clone(), &p, &resynced).is_none(),
            "a run that found the schema ahead of its record re-synced it: read again"
        );
    }
}
