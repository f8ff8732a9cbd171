//! The MigrationSet controller: rolls each set's migrations out across the
//! Tenants that follow it, and reports progress in the set's status.
//!
//! Takes MigrationSets from a watch and the Tenants from a watch cache of
//! its own (any Tenant change brings every set back: sets are few). Each
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
use futures::StreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use sqlx::PgPool;

use crate::api::{MigrationSet, MigrationSetPhase, MigrationSetSpec, Tenant};
use crate::controller::{Context, Stats};
use crate::names::TenantName;
use crate::pg::migrations::Timeouts;
use crate::pg::PgError;

/// Errors of one MigrationSet reconcile, named after the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the MigrationSet's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("building a patch: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("the Tenant watch cache is gone")]
    StoreGone,
    #[error(transparent)]
    Database(#[from] PgError),
}

impl Error {
    /// A fixed word for logs and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Error::PatchStatus(_) => "PatchStatus",
            Error::Serialize(_) => "Serialize",
            Error::StoreGone => "StoreGone",
            Error::Database(e) if e.is_transient() => "DatabaseUnavailable",
            Error::Database(_) => "DatabaseError",
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
    pub before: plan::Observed,
    pub after: plan::Observed,
}

impl Pass {
    /// Another pass should follow soon: tenants were deferred, busy,
    /// interrupted or not started.
    pub fn more(&self) -> bool {
        self.plan.deferred > 0 || self.report.retry_soon()
    }
}

/// Observe, plan, roll out, observe again.
pub async fn pass(pool: &PgPool, name: &str, generation: i64, spec: &MigrationSetSpec, followers: &[TenantName], timeouts: &Timeouts) -> Result<Pass, PgError> {
    let before = observe::observe(pool, name, followers).await?;
    let plan = plan::plan(name, generation, spec, &before);
    let report = apply::rollout(pool, &plan, timeouts).await;
    let after = if report.results.is_empty() { before.clone() } else { observe::observe(pool, name, followers).await? };
    Ok(Pass { plan, report, before, after })
}

/// Starts the MigrationSet controller and drives it until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let (store, writer) = reflector::store::<Tenant>();
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    let tenant_changes = reflector::reflector(writer, watcher(tenants, watcher::Config::default().any_semantic()).modify(|t| t.managed_fields_mut().clear()))
        .default_backoff()
        .touched_objects()
        .filter_map(|r| futures::future::ready(r.ok().map(|_| ())));
    let sets: Api<MigrationSet> = Api::all(ctx.client.clone());
    let sctx = Arc::new(SetContext { ctx: ctx.clone(), tenants: store });
    Controller::new(sets, watcher::Config::default().any_semantic())
        // Sets are few: any Tenant change (created, deleted, moved to another
        // set) re-runs every set; the debounce merges bursts.
        .reconcile_all_on(tenant_changes)
        .with_config(ControllerConfig::default().concurrency(4).debounce(Duration::from_secs(1)))
        // No signal handling of its own: the Tenant controller owns shutdown
        // (`controller::run`). A pass cut short by it loses only open
        // transactions, which Postgres rolls back.
        .run(reconcile, error_policy, sctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(set = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(ms: Arc<MigrationSet>, err: &Error, sctx: Arc<SetContext>) -> Action {
    let delay = sctx.ctx.backoff(&format!("migrationset/{}", ms.name_any()));
    tracing::warn!(set = %ms.name_any(), error = %err, kind = err.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile(ms: Arc<MigrationSet>, sctx: Arc<SetContext>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!("reconcile", controller = "migrationset", set = %ms.name_any());
    let result = tracing::Instrument::instrument(reconcile_set(ms, sctx.clone()), span).await;
    sctx.ctx.metrics.reconciled("migrationset", started.elapsed(), result.as_ref().err().map(Error::label));
    result
}

async fn reconcile_set(ms: Arc<MigrationSet>, sctx: Arc<SetContext>) -> Result<Action, Error> {
    let ctx = &sctx.ctx;
    Stats::add(&ctx.stats.reconciles, 1);
    sctx.tenants.wait_until_ready().await.map_err(|_| Error::StoreGone)?;
    let name = ms.name_any();
    let generation = ms.metadata.generation.unwrap_or(0);
    let followers = observe::followers(&sctx.tenants.state(), &name);
    let pass = pass(&ctx.pool, &name, generation, &ms.spec, &followers, &ctx.settings.migration_timeouts).await?;
    let migrated = pass.report.count(|o| matches!(o, apply::Outcome::Done(crate::pg::migrations::TenantOutcome::Migrated { applied, .. }) if !applied.is_empty()));
    if !pass.report.results.is_empty() {
        tracing::info!(set = %name, migrated, tenants = pass.report.results.len(), elapsed_ms = pass.report.elapsed.as_millis() as u64, "rollout pass");
    }
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let new = status::compute(ms.status.as_ref(), ms.metadata.generation, &ms.spec, &pass.plan, &pass.after, pass.more(), &now);
    let old_phase = ms.status.as_ref().and_then(|s| s.phase);
    let phase = new.phase;
    let message = new.conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.message.clone()).unwrap_or_default();
    apply::write_status(ctx, &ms, new).await?;
    ctx.reset_backoff(&format!("migrationset/{name}"));
    if old_phase != phase {
        if let Some(p) = phase {
            event(ctx, &ms, p, message).await;
        }
    }
    Ok(match phase {
        Some(MigrationSetPhase::Progressing) if pass.more() => Action::requeue(Duration::from_secs(1)),
        Some(MigrationSetPhase::Progressing) => Action::requeue(Duration::from_secs(5).min(ctx.settings.resync)),
        _ => Action::requeue(ctx.settings.resync),
    })
}

/// Publishes an Event on the set when its phase changes (best effort).
async fn event(ctx: &Context, ms: &MigrationSet, phase: MigrationSetPhase, message: String) {
    let reason = match phase {
        MigrationSetPhase::Complete => "RolledOut",
        MigrationSetPhase::Progressing => "RollingOut",
        MigrationSetPhase::Paused => "Paused",
    };
    let ev = Event {
        type_: if phase == MigrationSetPhase::Paused { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    match ctx.recorder.publish(&ev, &ms.object_ref(&())).await {
        Ok(()) => Stats::add(&ctx.stats.kube_writes, 1),
        Err(e) => tracing::warn!(set = %ms.name_any(), error = %e, "publishing an event failed"),
    }
}
