//! The Tenant controller: observe, plan, apply, report.
//!
//! Takes Tenant objects from the watch; converges each tenant's schema,
//! roles, caps and connection Secret, and its lifecycle (suspend, delete
//! through the `tenancy.dev/cleanup` finalizer).
//!
//! A converge runs its steps in order (`converge_steps`: validate the spec,
//! finalizer, recover an interrupted restore, [`observe`], [`converge_db`]
//! with its [`plan`], the Secret, sealed secrets, [`migrations`], the backup
//! CronJob); each returns `Result<_, Stop>` and stops with `?`. What they
//! did goes to [`report::report`], pure, which decides the phase, the
//! conditions and the Events; the reconcile publishes those and writes the
//! status. A stop (a spec to fix, Postgres down, a restore running, a
//! Kubernetes error) ends the reconcile in one place, `stopped`, after the
//! Events of what the steps did so far. A delete (`cleanup_steps`) stops
//! the same way.

pub mod apply;
pub mod backup_jobs;
pub mod echoes;
pub mod gate;
pub mod migrations;
pub mod moving;
pub mod observe;
pub mod placement;
pub mod plan;
pub mod report;
pub mod resync;
pub mod schedule;
pub mod sealing;
pub mod status;
pub mod triggers;

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::api::{Tenant, TenantPhase};
use crate::controller::kit::{self, conditions::Cond, labels};
use crate::controller::Context;
use crate::names::TenantName;
use crate::pg::tenant::{DbAction, RegistryWrite};
use crate::pg::PgError;
use triggers::Light;

/// Errors of one Tenant reconcile, named after the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the tenant's Secret: {0}")]
    ReadSecret(#[source] kube::Error),
    #[error("writing the tenant's Secret: {0}")]
    WriteSecret(#[source] kube::Error),
    #[error("deleting the tenant's Secret: {0}")]
    DeleteSecret(#[source] kube::Error),
    #[error("writing the Tenant's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("updating the Tenant's finalizers: {0}")]
    PatchFinalizer(#[source] kube::Error),
    #[error("building a patch: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("the Tenant has no uid")]
    MissingUid,
    #[error(transparent)]
    Database(#[from] PgError),
    #[error("the tenant was dropped but Postgres still holds: {0}")]
    Leftovers(String),
    #[error("sealing the tenant's secrets: {0}")]
    Seal(#[source] crate::crypto::CryptoError),
    #[error("converging the tenant's backup CronJob: {0}")]
    Backup(#[source] kube::Error),
    #[error("deleting the tenant's backups from the store: {0}")]
    DeleteBackups(String),
    #[error("moving the tenant between shards: {0}")]
    Move(String),
}

impl kit::ReconcileError for Error {
    fn label(&self) -> &'static str {
        match self {
            Error::ReadSecret(_) => "ReadSecret",
            Error::WriteSecret(_) => "WriteSecret",
            Error::DeleteSecret(_) => "DeleteSecret",
            Error::PatchStatus(_) => "PatchStatus",
            Error::PatchFinalizer(_) => "PatchFinalizer",
            Error::Serialize(_) => "Serialize",
            Error::MissingUid => "MissingUid",
            Error::Database(e) if e.is_unreachable() => "DatabaseUnavailable",
            Error::Database(_) => "DatabaseError",
            Error::Leftovers(_) => "Leftovers",
            Error::Seal(_) => "SealSecret",
            Error::Backup(_) => "WriteCronJob",
            Error::DeleteBackups(_) => "DeleteBackups",
            Error::Move(_) => "Move",
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Starts the Tenant controller and drives it, and with it the operator's
/// one Tenant watch (`tenants`, whose store the other readers share), until
/// shutdown.
///
/// `rate_limits_reported`: Tenants the rate-limit writer brings back
/// because their `RateLimitsApplied` became stale (it wrote their limits).
pub async fn run(
    ctx: Arc<Context>,
    mut tenants: crate::controller::tenant_watch::TenantWatch,
    rate_limits_reported: impl futures::Stream<Item = ObjectRef<Tenant>> + Send + 'static,
) {
    // Secrets, by metadata only (names and labels, never data), in the
    // namespaces the operator may list: its own, for the tenants' own
    // Secrets (by label; deleted or edited by hand brings the tenant back),
    // and each source namespace, for the sources of sealed secrets (by the
    // index). The owner is cluster-scoped, so map by label rather than
    // `owns` (which looks owners up in the Secret's namespace). Opted-in
    // sources elsewhere cannot be watched (the operator may only `get`
    // them): they are re-read at every resync.
    let own_secrets: Api<PartialObjectMeta<Secret>> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let own_cfg = watcher::Config::default().labels(&labels::managed_selector());
    let source_watches: Vec<(Api<PartialObjectMeta<Secret>>, Arc<Context>)> = ctx
        .settings
        .secret_sources
        .namespaces
        .iter()
        .filter(|ns| ctx.settings.secret_sources.is_source_namespace(ns))
        .map(|ns| (Api::namespaced(ctx.client.clone(), ns), ctx.clone()))
        .collect();
    let (rotate_tx, rotate_rx) = futures::channel::mpsc::unbounded::<()>();
    let keys_ctx = ctx.clone();
    tokio::spawn(async move {
        watch_root_keys(keys_ctx.clone(), rotate_tx).await;
        keys_ctx.health.task_died("root-keys-watch");
    });
    // The tasks that feed the gate (`gate`) end with this function (dropped
    // or not).
    let mut feeds = tokio::task::JoinSet::new();
    // MigrationSets, one watch: a cache for the reconciles' lookups, and
    // from its events the followers of a set whose status moved on (a
    // rollout pass migrated some) or whose spec changed, when they are not
    // yet shown at its latest version, come back through the gate, by name
    // (at the start of a rollout every follower waits at once).
    let (set_store, set_writer) = kube::runtime::reflector::store::<crate::api::MigrationSet>();
    let _ = ctx.migration_sets.set(set_store);
    let sets: Api<crate::api::MigrationSet> = Api::all(ctx.client.clone());
    let set_cache = tenants.store();
    let set_marks = ctx.clone();
    feeds.spawn(async move {
        use kube::runtime::WatchStreamExt;
        let mut sets = std::pin::pin!(kube::runtime::reflector::reflector(
            set_writer,
            watcher(sets, watcher::Config::default().any_semantic()),
        )
        .default_backoff()
        .touched_objects());
        while let Some(ev) = sets.next().await {
            let ms: crate::api::MigrationSet = match ev {
                Ok(ms) => ms,
                Err(e) => {
                    tracing::warn!(error = %e, "watching MigrationSets failed; retrying");
                    continue;
                }
            };
            let refs = migrations::followers_to_refresh(&ms, &set_cache.state());
            let ms = Arc::new(ms);
            for r in &refs {
                let light = set_cache.get(r).is_some_and(|t| migrations::light_candidate(&t, &ms));
                tracing::debug!(tenant = %r.name, light, "brought back by its MigrationSet");
                if light {
                    set_marks.triggers.rolling_out(&r.name, ms.clone());
                } else {
                    set_marks.triggers.full(&r.name);
                }
                set_marks.gate.push(&r.name, gate::Lane::Bulk);
            }
        }
        set_marks.health.task_died("migration-set-watch");
    });
    let tenant_cache = tenants.store();
    let _ = ctx.metrics.tenant_store.set(tenants.store());
    let _ = ctx.metrics.tenant_gate.set(ctx.gate.clone());
    // Every source but the MigrationSet's own marks the Tenants it brings
    // back for a full reconcile (`triggers`); a Tenant not in the cache
    // (deleted) is not marked, and one deleted is forgotten.
    let marking = ctx.clone();
    let marks_store = tenants.store();
    let mark_full = move |name: &str| {
        if marks_store.get(&ObjectRef::new(name)).is_some() {
            marking.triggers.full(name);
        }
    };
    let mut deleted = tenants.listen(|ev| match ev {
        watcher::Event::Delete(t) => t.metadata.name.clone(),
        _ => None,
    });
    let forgetting = ctx.clone();
    tokio::spawn(async move {
        while let Some(name) = deleted.next().await {
            forgetting.triggers.forget(&name);
            forgetting.resyncs.forget(&name);
            forgetting.gate.forget(&name);
        }
    });
    // A shard that opens, closes or changes state, capacity or labels
    // brings back the tenants that are not Ready (waiting for a shard).
    let waiting_cache = tenants.store();
    let mark = mark_full.clone();
    let shard_gate = ctx.gate.clone();
    let mut shard_changes = ctx.shards.subscribe();
    feeds.spawn(async move {
        while let Some(()) = shard_changes.next().await {
            for t in waiting_cache.state().iter() {
                let Some(name) = t.metadata.name.as_deref() else {
                    continue;
                };
                if status::condition(t.status.as_ref(), "Ready").is_none_or(|c| c.status != "True") {
                    mark(name);
                    shard_gate.push(name, gate::Lane::Change);
                }
            }
        }
    });
    // The rate-limit writer's report asks for `RateLimitsApplied` only: a
    // light reconcile unless something else waits beside it.
    // Through the gate: in a provisioning burst it reports every new tenant.
    let rl_marking = ctx.clone();
    let rl_store = tenants.store();
    feeds.spawn(async move {
        let mut reported = std::pin::pin!(rate_limits_reported);
        while let Some(r) = reported.next().await {
            if rl_store.get(&r).is_some() {
                rl_marking.triggers.rate_limits(&r.name);
                rl_marking.gate.push(&r.name, gate::Lane::Change);
            }
        }
    });
    // A new root key (rotation) brings every Tenant back, each for a full
    // reconcile that re-seals it, through the gate.
    let rotating = ctx.clone();
    let rotate_cache = tenants.store();
    feeds.spawn(async move {
        let mut rotations = rotate_rx;
        while let Some(()) = rotations.next().await {
            let all = rotate_cache.state();
            let names = || all.iter().filter_map(|t| t.metadata.name.as_deref());
            rotating.triggers.full_all(names());
            names().for_each(|n| rotating.gate.push(n, gate::Lane::Bulk));
        }
    });
    // The echoes of this process's own writes that it acted on already
    // start no reconcile (`echoes`); every other Tenant event does.
    // They wait in the gate (`gate`), as a set's followers, the resyncs
    // and the shard changes do: the controller's queue holds a bounded
    // number of requests. This task drives the operator's Tenant watch.
    let own = ctx.clone();
    let own_secret_writes = ctx.clone();
    let tenant_events = tenants.into_stream();
    feeds.spawn(async move {
        let mut events = std::pin::pin!(tenant_events);
        while let Some(ev) = events.next().await {
            // Errors are logged by the watch, which backs off.
            let Ok(t) = ev else { continue };
            let Some(name) = t.metadata.name.as_deref() else {
                continue;
            };
            // Judged by kind, name and version: the event itself is not kept.
            if own.own_writes.is_echo_after_writes(echoes::key(&t)).await {
                continue;
            }
            own.triggers.full(name);
            own.gate.push(name, gate::Lane::Change);
        }
        own.health.task_died("tenant-watch");
    });
    // The tenants' own Secrets likewise: the echo of a Secret the reconcile
    // wrote (and went on from) starts none, once the write has returned (the
    // watch may bring its event first, as for Tenants).
    let own_secret_events = {
        use kube::runtime::WatchStreamExt;
        watcher(own_secrets, own_cfg).touched_objects().filter(move |ev| {
            let own = own_secret_writes.clone();
            let key = ev.as_ref().ok().and_then(echoes::key);
            async move { !own.own_writes.is_echo_after_writes(key).await }
        })
    };
    let mark_secret = mark_full.clone();
    let mark_job = mark_full.clone();
    // The controller's own trigger stream is empty: what it reconciles
    // comes from the gate and the other sources below.
    let mut controller = Controller::for_stream(
        futures::stream::pending::<Result<Tenant, watcher::Error>>(),
        tenant_cache,
    )
    .reconcile_on(gate::released(ctx.gate.clone()))
    .watches_stream(own_secret_events, move |s: PartialObjectMeta<Secret>| {
        let name = s.labels().get(labels::TENANT_LABEL)?;
        mark_secret(name);
        Some(ObjectRef::<Tenant>::new(name))
    })
    // A backup Job that ended brings its tenant back: the operator
    // records what the Job wrote to the store.
    .watches(
        Api::<k8s_openapi::api::batch::v1::Job>::namespaced(ctx.client.clone(), &ctx.settings.namespace),
        watcher::Config::default().labels(&labels::managed_selector()),
        move |j: k8s_openapi::api::batch::v1::Job| {
            let name = j.labels().get(labels::TENANT_LABEL)?;
            mark_job(name);
            Some(ObjectRef::<Tenant>::new(name))
        },
    );
    // The periodic resync: a reconcile that ended well waits for a
    // change, and its tenant comes back through the gate a period later.
    let resync_gate = ctx.gate.clone();
    let due = resync::due(ctx.resyncs.clone());
    feeds.spawn(async move {
        let mut due = std::pin::pin!(due);
        while let Some(name) = due.next().await {
            resync_gate.push(&name, gate::Lane::Bulk);
        }
    });
    for (api, index) in source_watches {
        let mark = mark_full.clone();
        controller = controller.watches(api, watcher::Config::default(), move |s: PartialObjectMeta<Secret>| {
            let tenants = index
                .sources
                .tenants_of(s.metadata.namespace.as_deref().unwrap_or_default(), &s.name_any());
            tenants
                .into_iter()
                .inspect(|n| mark(n))
                .map(|n| ObjectRef::<Tenant>::new(&n))
                .collect::<Vec<_>>()
        });
    }
    let done = ctx.gate.clone();
    let outcomes = controller
        .with_config(kit::queue(ctx.settings.concurrency, Duration::from_millis(200)))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .inspect(move |outcome| {
            use kube::runtime::controller::Error as E;
            let name = match outcome {
                Ok((r, _)) => Some(r.name.as_str()),
                Err(E::ReconcilerFailed(_, r) | E::ObjectNotFound(r)) => Some(r.name.as_str()),
                Err(_) => None,
            };
            if let Some(name) = name {
                done.done(name);
            }
        });
    kit::drain(CONTROLLER, outcomes).await;
    drop(feeds);
}

/// Reloads the root keys when their Secret changes; a keyring that drops a
/// version still in use is refused (the old one stays) and reported on the
/// tenants' `SecretsSealed` condition.
async fn watch_root_keys(ctx: Arc<Context>, rotate: futures::channel::mpsc::UnboundedSender<()>) {
    use kube::runtime::WatchStreamExt;
    let src = &ctx.settings.root_keys;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &src.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", src.secret));
    let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
    while let Some(event) = stream.next().await {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watching the root-keys Secret");
            continue;
        }
        let next = match crate::keys::load(&ctx.client, src).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "reloading the root keys failed; keeping the current ones");
                continue;
            }
        };
        // The versions in use on every open shard.
        let mut in_use = std::collections::BTreeSet::new();
        let mut unknown = false;
        for shard in ctx.shards.all() {
            match crate::pg::registry::key_versions_in_use(&shard.pool).await {
                Ok(v) => in_use.extend(v.into_iter().filter_map(|v| crate::crypto::KeyVersion::new(v).ok())),
                Err(e) => {
                    tracing::error!(shard = %shard.name, error = %e, "cannot check which key versions are in use; keeping the current keys");
                    unknown = true;
                    break;
                }
            }
        }
        if unknown {
            continue;
        }
        match ctx.keys.replace(next, &in_use) {
            Ok(true) => {
                tracing::info!(active = ?ctx.keys.current().map(|k| k.active_version().to_string()), "root keys changed: re-sealing every tenant");
                let _ = rotate.unbounded_send(());
            }
            Ok(false) => {}
            Err(msg) => {
                tracing::error!(%msg, "root keys refused");
                let _ = rotate.unbounded_send(());
            }
        }
    }
}

fn error_policy(t: Arc<Tenant>, err: &Error, ctx: Arc<Context>) -> Action {
    // The retry converges what the failed reconcile did not.
    ctx.triggers.full(&t.name_any());
    kit::error_policy(&ctx, CONTROLLER, &t.name_any(), err)
}

/// The controller's name in metrics, logs and backoff keys.
const CONTROLLER: &str = "tenant";

/// One reconcile of one Tenant.
pub async fn reconcile(t: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = t.name_any();
    // From here a change of this Tenant waits for a reconcile of its own
    // (`gate`); before, the gate merged it into this one, so the Tenant is
    // read from the cache again after this point (the controller read it
    // when it queued this task).
    ctx.gate.started(&name);
    let t = ctx
        .metrics
        .tenant_store
        .get()
        .and_then(|s| s.get(&ObjectRef::new(&name)))
        .unwrap_or(t);
    // Every log line of the reconcile carries the tenant's name (the JSON
    // logs include the current span's fields).
    let span = tracing::info_span!("reconcile", controller = CONTROLLER, tenant = %name);
    let light = ctx.triggers.take(&name);
    kit::reconcile(&ctx, CONTROLLER, &name, span, async {
        if t.metadata.deletion_timestamp.is_some() {
            cleanup(&t, &ctx).await
        } else if let Some((kind, status)) = match &light {
            Light::RollingOut(set) => light_status(&t, set, &ctx).await,
            Light::RateLimits => rate_limits_cond(&ctx, &t)
                .and_then(|c| status::with_rate_limits(&t, &c, &now()))
                .map(|s| ("rate_limits", s)),
            Light::Full => None,
        } {
            apply::write_status(&ctx, &t, status).await?;
            ctx.metrics.light_reconcile(kind);
            Ok(settled(&ctx, &name))
        } else {
            converge(&t, &ctx).await
        }
    })
    .await
}

/// The end of a reconcile that ended well: wait for a change, and come
/// back at the resync, a period from now ([`resync`]).
fn settled(ctx: &Context, name: &str) -> Action {
    ctx.resyncs.after(name, ctx.settings.resync);
    Action::await_change()
}

/// The light reconcile's status (`triggers`): `RollingOut` from the
/// caches while the set progresses, or, once it settled, the tenant's
/// recorded versions read on its shard. `None` (a full reconcile) when
/// neither applies, the shard is not open, or the read fails.
async fn light_status(
    t: &Tenant,
    set: &crate::api::MigrationSet,
    ctx: &Context,
) -> Option<(&'static str, crate::api::TenantStatus)> {
    if let Some(status) = migrations::rolling_out_status(t, set, &now()) {
        return Some(("rolling_out", status));
    }
    if !migrations::settled_candidate(t, set) {
        return None;
    }
    let name = TenantName::parse(&t.name_any()).ok()?;
    let shard = placement::shard_of(ctx, t)?;
    let pool = ctx.shards.get(&shard)?.pool.clone();
    match migrations::settled_status(&pool, t, &name, set, &now()).await {
        Ok(status) => status.map(|s| ("settled", s)),
        Err(e) => {
            tracing::debug!(error = %e, "the light reconcile could not read the versions; a full one runs");
            None
        }
    }
}

/// Writes a status built from `conds` and publishes an event when the Ready
/// condition's reason changes (so a steady state publishes nothing).
async fn write_report(
    ctx: &Context,
    t: &Tenant,
    phase: TenantPhase,
    schema: Option<String>,
    conds: &[Cond],
) -> Result<(), Error> {
    write_report_with(ctx, t, phase, schema, conds, status::Extra::default()).await
}

/// [`write_report`], also setting the status fields in `extra`.
async fn write_report_with(
    ctx: &Context,
    t: &Tenant,
    phase: TenantPhase,
    schema: Option<String>,
    conds: &[Cond],
    extra: status::Extra,
) -> Result<(), Error> {
    let new = status::next_status(
        t.status.as_ref(),
        phase,
        schema,
        t.metadata.generation,
        conds,
        &now(),
        extra,
    );
    let ready = conds
        .iter()
        .find(|c| c.type_ == "Ready" || c.type_ == "DeletionBlocked");
    let old_reason = ready
        .and_then(|c| status::condition(t.status.as_ref(), c.type_))
        .map(|c| c.reason.clone());
    apply::write_status(ctx, t, new).await?;
    if let Some(c) = ready {
        if old_reason.as_deref() != Some(c.reason) && (!c.status || c.type_ == "DeletionBlocked") {
            kit::event(ctx, t, true, c.reason, c.message.clone()).await;
        }
    }
    Ok(())
}

/// Reports a delete under way or stuck: phase Deleting, Ready false with
/// `reason`.
async fn report_deleting(
    ctx: &Context,
    t: &Tenant,
    schema: Option<String>,
    reason: &'static str,
    message: String,
) -> Result<(), Error> {
    let ready = Cond::new("Ready", false, reason, message);
    write_report(ctx, t, TenantPhase::Deleting, schema, &[ready]).await
}

/// `RateLimitsApplied`: True only once the rate-limit writer has put the
/// tenant's current limits into the ConfigMaps
/// ([`crate::controller::ratelimits::condition`]).
fn rate_limits_cond(ctx: &Context, t: &Tenant) -> Option<Cond> {
    let held = ctx.rate_limits.get();
    let old = status::condition(t.status.as_ref(), crate::controller::ratelimits::CONDITION);
    crate::controller::ratelimits::condition(
        &ctx.settings.ratelimit,
        &ctx.settings.namespace,
        t,
        held.as_deref(),
        old,
    )
}

/// Reports a failure a person must fix and waits for a change (or the
/// periodic resync, for conflicts that are fixed inside Postgres).
async fn fail(
    ctx: &Context,
    t: &Tenant,
    schema: Option<String>,
    reason: &'static str,
    message: String,
) -> Result<Action, Error> {
    tracing::warn!(tenant = %t.name_any(), reason, %message, "tenant cannot be converged");
    let mut conds = vec![
        Cond::new("Ready", false, reason, message.clone()),
        Cond::new("DatabaseReady", false, reason, message),
    ];
    conds.extend(rate_limits_cond(ctx, t));
    write_report(ctx, t, TenantPhase::Failed, schema, &conds).await?;
    Ok(settled(ctx, &t.name_any()))
}

/// The reason and message of a Postgres failure that will be retried:
/// `DatabaseUnavailable` only when Postgres could not be reached (or let the
/// operator in); any answer from Postgres is a `DatabaseError` with its
/// SQLSTATE.
pub fn retried_db_condition(err: &PgError, deleting: bool) -> (&'static str, String) {
    match (err.is_unreachable(), deleting) {
        (true, true) => (
            "DatabaseUnavailable",
            format!("waiting for Postgres to drop the tenant: {err}"),
        ),
        (true, false) => ("DatabaseUnavailable", format!("cannot reach Postgres: {err}")),
        (false, true) => (
            "DatabaseError",
            format!("dropping the tenant failed, retrying: {}", err.describe()),
        ),
        (false, false) => (
            "DatabaseError",
            format!("Postgres refused a step, retrying: {}", err.describe()),
        ),
    }
}

/// Reports a Postgres failure that may go away by itself (unreachable, a
/// lock or a concurrent update) and hands the error to the backoff.
async fn database_down(
    ctx: &Context,
    t: &Tenant,
    schema: Option<String>,
    err: PgError,
    deleting: bool,
) -> Result<Action, Error> {
    let (reason, message) = retried_db_condition(&err, deleting);
    let held = not_ready(ctx, t, reason, message, deleting, TenantPhase::Provisioning);
    // The status write is best effort: the error below is what matters.
    let _ = write_report(ctx, t, held.0, schema, &held.1).await;
    Err(Error::Database(err))
}

/// Reports a tenant waiting for its shard and comes back later (a shard
/// opening or changing brings it back sooner).
async fn waiting(
    ctx: &Context,
    t: &Tenant,
    schema: Option<String>,
    reason: &'static str,
    message: String,
    deleting: bool,
) -> Result<Action, Error> {
    tracing::info!(tenant = %t.name_any(), reason, %message, "tenant waits for its shard");
    let held = not_ready(ctx, t, reason, message, deleting, TenantPhase::Pending);
    write_report(ctx, t, held.0, schema, &held.1).await?;
    Ok(Action::requeue(ctx.settings.resync.min(Duration::from_secs(30))))
}

/// The phase and conditions of a tenant held up by something that may pass:
/// its phase kept when Active or Suspended (else `fresh`), `Ready` and
/// `DatabaseReady` false with `reason`.
fn not_ready(
    ctx: &Context,
    t: &Tenant,
    reason: &'static str,
    message: String,
    deleting: bool,
    fresh: TenantPhase,
) -> (TenantPhase, Vec<Cond>) {
    let phase = match t.status.as_ref().and_then(|s| s.phase) {
        _ if deleting => TenantPhase::Deleting,
        Some(p @ (TenantPhase::Active | TenantPhase::Suspended)) => p,
        _ => fresh,
    };
    let mut conds = vec![
        Cond::new("Ready", false, reason, message.clone()),
        Cond::new("DatabaseReady", false, reason, message),
    ];
    if !deleting {
        conds.extend(rate_limits_cond(ctx, t));
    }
    (phase, conds)
}

/// One converge of a live Tenant: runs [`converge_steps`], then publishes
/// and writes what [`report::report`] decides from their outcome. A step
/// that stops ends it through [`stopped`], after the Events of what the
/// steps did so far.
async fn converge(t: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let mut done = report::Done::default();
    let converged = match converge_steps(t, ctx, &mut done).await {
        Ok(c) => c,
        Err(stop) => {
            publish(ctx, t, report::events(&done)).await;
            return stopped(ctx, t, stop, false).await;
        }
    };
    let schema = Some(converged.outcome.done.names.schema.clone());
    let decided = report::report(converged.outcome);
    publish(ctx, t, decided.events).await;
    write_report_with(
        ctx,
        t,
        decided.phase,
        schema,
        &decided.conditions,
        status::Extra {
            key: converged.key,
            schema_version: decided.schema_version,
            last_backup: converged.last_backup,
        },
    )
    .await?;
    Ok(settled(ctx, &t.name_any()))
}

/// Why the steps of a reconcile stopped before their end; [`stopped`] turns
/// it into the reconcile's result.
#[derive(Debug)]
enum Stop {
    /// A failure a person must fix ([`fail`]): phase Failed, no retry
    /// before a change or the resync.
    Invalid { reason: &'static str, message: String },
    /// A Postgres failure that may go away by itself ([`database_down`]),
    /// handed to the backoff.
    Retry(PgError),
    /// Come back after this long, touching nothing (a restore is running).
    Requeue(Duration),
    /// The tenant has no open shard now (not placed yet, or its shard is
    /// not open): Ready false with `reason`, phase kept (Pending for a new
    /// tenant); a shard opening or changing brings it back.
    Waiting { reason: &'static str, message: String },
    /// A delete that cannot finish: Ready false with `reason` (phase
    /// Deleting), then `error` to the backoff.
    Stuck {
        reason: &'static str,
        message: String,
        error: Error,
    },
    /// Any other error, to the backoff as it is.
    Error(Error),
}

impl Stop {
    /// A Postgres failure of a step: retried when transient, else a
    /// `DatabaseError` with its SQLSTATE that waits for a change.
    fn database(e: PgError) -> Self {
        if e.is_transient() {
            Stop::Retry(e)
        } else {
            Stop::Invalid {
                reason: "DatabaseError",
                message: e.describe(),
            }
        }
    }
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Error(e)
    }
}

impl From<plan::PlanError> for Stop {
    fn from(e: plan::PlanError) -> Self {
        Stop::Invalid {
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl From<ConvergeError> for Stop {
    fn from(e: ConvergeError) -> Self {
        match e {
            ConvergeError::Plan(e) => e.into(),
            ConvergeError::Db(e) => Stop::database(e),
        }
    }
}

/// The one place a [`Stop`] becomes the reconcile's result: reported (on
/// the tenant's schema when its name is valid) and requeued, or handed to
/// the backoff. `deleting`: the stop is [`cleanup`]'s.
async fn stopped(ctx: &Context, t: &Tenant, stop: Stop, deleting: bool) -> Result<Action, Error> {
    let schema = TenantName::parse(&t.name_any()).ok().map(|n| n.schema());
    match stop {
        Stop::Invalid { reason, message } => fail(ctx, t, schema, reason, message).await,
        Stop::Retry(e) => database_down(ctx, t, schema, e, deleting).await,
        Stop::Requeue(after) => Ok(Action::requeue(after)),
        // Not on a shard (yet): the status names no schema it may not have.
        Stop::Waiting { reason, message } => {
            let schema = t.status.as_ref().and_then(|s| s.schema.clone());
            waiting(ctx, t, schema, reason, message, deleting).await
        }
        Stop::Stuck { reason, message, error } => {
            report_deleting(ctx, t, schema, reason, message).await?;
            Err(error)
        }
        Stop::Error(e) => Err(e),
    }
}

/// Publishes `events` on the Tenant, in order.
async fn publish(ctx: &Context, t: &Tenant, events: Vec<report::Event>) {
    for e in events {
        kit::event(ctx, t, e.warning, e.reason, e.note).await;
    }
}

/// What [`converge_steps`] gives besides the report's input: the status
/// fields no condition carries.
struct Converged {
    outcome: report::Outcome,
    /// The root key version and fingerprint of the sealed secrets.
    key: Option<(String, String)>,
    last_backup: Option<crate::api::tenant::LastBackup>,
}

/// The steps of a converge, in order, each stopping with a [`Stop`]: what
/// they did that Events tell goes into `done` as they run.
async fn converge_steps(t: &Tenant, ctx: &Context, done: &mut report::Done) -> Result<Converged, Stop> {
    let uid = t.uid().ok_or(Error::MissingUid)?;
    let name = TenantName::parse(&t.name_any()).map_err(|e| Stop::Invalid {
        reason: "InvalidName",
        message: e.to_string(),
    })?;
    done.names = report::Names::of(&name, &ctx.settings.namespace);
    let mut desired = plan::desired_db(&name, &t.spec)?;
    desired.gateway = ctx.gateway.get().cloned();
    // The finalizer goes on before anything exists outside Kubernetes, so a
    // delete can never skip cleanup.
    if !apply::has_finalizer(t) {
        apply::add_finalizer(ctx, t).await?;
    }
    // The shard: a new tenant is placed (and the choice recorded) before
    // anything of it is created.
    let resolved = match placement::resolve(ctx, t, &uid).await {
        Ok(r) => r,
        Err(placement::ResolveError::Record(e)) => return Err(Stop::Error(Error::PatchStatus(e))),
        Err(placement::ResolveError::Database(e)) => return Err(Stop::database(e)),
    };
    let shard = match resolved {
        placement::Placed::On(conn) => conn,
        placement::Placed::Unavailable(shard) => {
            return Err(Stop::Waiting {
                reason: "ShardUnavailable",
                message: format!("the tenant's shard {shard:?} is not open: see `kubectl get shard {shard}`"),
            })
        }
        placement::Placed::Waiting(e) => {
            return Err(Stop::Waiting {
                reason: e.reason(),
                message: e.to_string(),
            })
        }
    };
    // A move the spec asks for, or one under way.
    let after = moving::drive(ctx, t, &name, &uid, shard, &desired)
        .await
        .map_err(|e| match e {
            moving::MoveError::Db(e) if e.is_transient() => Stop::Retry(e),
            e => Stop::Error(Error::Move(e.to_string())),
        })?;
    let shard = after.shard;
    done.placed = after.placed;
    // A restore that was killed half-way left the schema aside: put it back
    // (or finish it) first; while a restore runs, leave the tenant alone.
    // Reads only when there is nothing to do.
    done.restore_recovered = match backup_jobs::recover_restore(ctx, &shard.pool, &name, &uid).await {
        Ok(crate::pg::backup_sql::AsideState::Clean) => None,
        Ok(crate::pg::backup_sql::AsideState::RestoreRunning) => return Err(Stop::Requeue(Duration::from_secs(10))),
        Ok(state) => Some(state),
        Err(e) => return Err(Stop::database(e)),
    };
    let observed = observe::observe(ctx, &shard.pool, &name).await.map_err(|e| match e {
        Error::Database(e) if e.is_transient() => Stop::Retry(e),
        e => Stop::Error(e),
    })?;
    let actor = plan::last_spec_manager(t);
    let secret_password = observed.secret_password();
    // The root keys: the ops login's password and the audit key derive
    // from them.
    let ring = ctx.keys.current().ok_or_else(|| Stop::Invalid {
        reason: "RootKeysUnavailable",
        message: "the root keys are not loaded".into(),
    })?;
    let DbOutcome {
        plan: mut db_plan,
        registry,
        audit,
        session,
        ..
    } = converge_db(
        &shard.pool,
        &ring,
        &name,
        &uid,
        &desired,
        &observed.catalog,
        secret_password.as_ref().map(|p| p.as_str()),
        &actor,
    )
    .await?;
    done.registry_action = registry.as_ref().map(|w| w.audit_action);
    done.db_actions = db_plan.actions.iter().map(|a| a.label()).collect();
    done.audit_steps = audit.actions.iter().map(|a| a.label()).collect();
    done.pruned = audit.pruned;
    let data = plan::secret_data(&name, &shard.endpoint, &db_plan.password);
    zeroize::Zeroize::zeroize(&mut db_plan.password);
    let written = apply::converge_secret(ctx, t, &name, observed.secret.as_ref(), data).await?;
    done.secret = Some(report::SecretWrite {
        written,
        existed: observed.secret.is_some(),
    });
    let sealed = apply::converge_sealed(ctx, &shard.pool, t, &name, &uid).await?;
    // After provisioning: a new schema gets the set's migrations here; one
    // already on a version is reported (the MigrationSet controller rolls
    // new versions out).
    let migrations = match migrations::converge(ctx, &shard.pool, t, &name, session).await {
        Ok(m) => Ok(m),
        Err(migrations::StepError::Database(e)) if e.is_transient() => return Err(Stop::Retry(e)),
        Err(e) => Err(e.to_string()),
    };
    let cronjob = backup_jobs::converge_cronjob(ctx, &shard, t, &name, &uid).await?;
    let last_backup = backup_jobs::last_backup(&shard.pool, &uid).await;
    Ok(Converged {
        outcome: report::Outcome {
            state: t.spec.state,
            done: std::mem::take(done),
            caps_not_applied: db_plan.caps_not_applied,
            read_auditing: audit.read_auditing,
            rate_limits: rate_limits_cond(ctx, t),
            sealed: sealed.cond,
            migrations,
            cronjob,
        },
        key: sealed.key,
        last_backup,
    })
}

/// Why [`converge_db`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error(transparent)]
    Db(#[from] PgError),
}

/// What [`converge_db`] did.
#[derive(Debug)]
pub struct DbOutcome {
    pub plan: plan::DbPlan,
    pub registry: Option<RegistryWrite>,
    /// SQL statements executed (DDL plus the registry write); 0 when the
    /// tenant was already converged.
    pub statements: usize,
    /// The audit log's convergence (tables, triggers, pgaudit, retention).
    pub audit: crate::pg::audit::AuditOutcome,
    /// The confined session the audit step opened, acting as nobody, for
    /// the reconcile's first migration run of a new schema (one login per
    /// new tenant); None when the audit log was converged already.
    pub session: Option<crate::pg::confined::Confined>,
}

/// The Postgres half of a reconcile: plan from the observed catalog, run the
/// plan in one transaction with the registry and audit writes, then end the
/// sessions of a suspended tenant. No Kubernetes calls, so Postgres tests
/// drive it directly.
#[allow(clippy::too_many_arguments)]
pub async fn converge_db(
    pool: &sqlx::PgPool,
    ring: &crate::crypto::Keyring,
    name: &TenantName,
    uid: &str,
    desired: &plan::DesiredDb,
    catalog: &crate::pg::tenant::CatalogState,
    secret_password: Option<&str>,
    actor: &str,
) -> Result<DbOutcome, ConvergeError> {
    let mut db_plan = plan::plan_db(name, uid, desired, catalog, secret_password)?;
    let state = if desired.login { "Active" } else { "Suspended" };
    let previous_state = catalog.registry.as_ref().map(|r| r.state.as_str());
    let audit_action = match previous_state {
        None => Some("Provisioned"),
        Some(p) if p == state => (!db_plan.actions.is_empty()).then_some("Converged"),
        Some(_) if desired.login => Some("Resumed"),
        Some(_) => Some("Suspended"),
    };
    let key_salt = crate::crypto::TenantSalt::generate();
    // A tenant registered by this transaction: its ops login is created
    // with the password derived from the salt its row gets, so the first
    // confined session logs straight in (no refused login and reset).
    if catalog.registry.is_none() {
        if let Some(DbAction::CreateOpsRole { verifier }) = db_plan
            .actions
            .iter_mut()
            .find(|a| matches!(a, DbAction::CreateOpsRole { .. }))
        {
            // A key that cannot derive leaves the role without a password:
            // the confined session's reset path reports the real error.
            *verifier = crate::crypto::login_password(ring, ring.active_version(), &key_salt, uid)
                .ok()
                .map(|p| crate::pg::scram::verifier_for_random_secret(&p).into());
        }
    }
    let registry = audit_action.map(|audit_action| RegistryWrite {
        uid: uid.to_owned(),
        state,
        audit_action,
        actor: actor.to_owned(),
        key_salt,
    });
    let statements = crate::pg::tenant::apply(pool, name, uid, &db_plan.actions, registry.as_ref()).await?;
    // Whenever the app role may not log in after the commit, end every
    // session it has: also one opened between the catalog read above and
    // the commit of NOLOGIN, which the read did not see.
    if db_plan.terminate_sessions {
        let n = crate::pg::tenant::terminate_sessions(pool, name).await?;
        if n > 0 {
            tracing::info!(tenant = %name, sessions = n, "terminated the suspended tenant's sessions");
        }
    }
    // The tables left unaudited: in the registry first (a migration's audit
    // check reads them there), then the triggers.
    let exclude: Vec<String> = desired.audit_exclude.iter().cloned().collect();
    let recorded = catalog.registry.as_ref().map(|r| r.audit_exclude.as_slice());
    let mut statements = statements;
    if recorded != Some(exclude.as_slice())
        && crate::pg::audit::record_exclusion(pool, name, uid, &exclude, actor).await?
    {
        statements += 1;
    }
    // The audit log: observed first, so a converged tenant runs nothing.
    let (audit, session) =
        crate::pg::audit::converge_keeping(pool, ring, name, uid, desired.audit_retention_days, &exclude).await?;
    let statements = statements + audit.statements;
    Ok(DbOutcome {
        plan: db_plan,
        registry,
        statements,
        audit,
        session,
    })
}

/// One reconcile of a Tenant being deleted: [`cleanup_steps`], a stop
/// ending through [`stopped`].
async fn cleanup(t: &Tenant, ctx: &Context) -> Result<Action, Error> {
    match cleanup_steps(t, ctx).await {
        Ok(action) => Ok(action),
        Err(stop) => stopped(ctx, t, stop, true).await,
    }
}

/// Drops what the tenant has outside Kubernetes, then lets the Tenant go.
async fn cleanup_steps(t: &Tenant, ctx: &Context) -> Result<Action, Stop> {
    if !apply::has_finalizer(t) {
        return Ok(Action::await_change());
    }
    let uid = t.uid().ok_or(Error::MissingUid)?;
    // Nothing was ever created for a name that does not validate.
    let Ok(name) = TenantName::parse(&t.name_any()) else {
        apply::remove_finalizer(ctx, t).await?;
        return Ok(Action::await_change());
    };
    let schema = Some(name.schema());
    if t.spec.deletion_protection {
        let msg = "spec.deletionProtection is true: nothing is dropped until it is set to false".to_string();
        write_report(
            ctx,
            t,
            TenantPhase::Deleting,
            schema,
            &[
                Cond::new("Ready", false, "Deleting", "the Tenant is being deleted"),
                Cond::new("DeletionBlocked", true, "DeletionProtection", msg),
            ],
        )
        .await?;
        return Ok(Action::await_change());
    }
    report_deleting(
        ctx,
        t,
        schema,
        "Deleting",
        "dropping the tenant's schema and roles".into(),
    )
    .await?;
    // A tenant never placed had nothing created (placement is recorded
    // before anything is); one whose shard is not open waits for it.
    let located = placement::locate(ctx, t, &uid).await.map_err(|e| match e {
        e if e.is_transient() => Stop::Retry(e),
        e => Stop::Error(Error::Database(e)),
    })?;
    let shard = match located {
        None => None,
        Some(s) => Some(ctx.shards.get(&s).ok_or_else(|| Stop::Waiting {
            reason: "ShardUnavailable",
            message: format!("waiting for shard {s:?} to drop the tenant: see `kubectl get shard {s}`"),
        })?),
    };
    let actor = plan::last_spec_manager(t);
    // A move left unfinished (a copy still to drop on its source or its
    // target, a shard having been unreachable): that copy and the move's
    // replication objects go too; the delete waits for that shard.
    if let Some(m) = t.status.as_ref().and_then(|s| s.moving.as_ref()) {
        for other in [&m.from, &m.to] {
            if shard.as_ref().is_some_and(|s| &s.name == other) {
                continue;
            }
            let conn = ctx.shards.get(other).ok_or_else(|| Stop::Waiting {
                reason: "ShardUnavailable",
                message: format!("waiting for shard {other:?} to drop the copy an unfinished move left there"),
            })?;
            crate::pg::replication::clear(&conn.pool, &uid)
                .await
                .map_err(Stop::database)?;
            drop_on(&conn, &name, &uid, &actor).await?;
        }
    }
    if let Some(shard) = &shard {
        crate::pg::replication::clear(&shard.pool, &uid)
            .await
            .map_err(Stop::database)?;
        drop_on(shard, &name, &uid, &actor).await?;
    }
    apply::delete_secrets(ctx, &name).await?;
    backup_jobs::delete_job_secret(ctx, &backup_jobs::job_secret_name(&name))
        .await
        .map_err(Error::DeleteSecret)?;
    // The tenant's backups (the salt that opens them went with the registry
    // row, so a copy kept elsewhere cannot be opened either).
    if let Some(cfg) = &ctx.settings.backup.store {
        let deleted = match crate::backup::Store::open(cfg) {
            Ok(store) => crate::backup::delete_all(&store, &uid).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(msg) = deleted {
            return Err(Stop::Stuck {
                reason: "DeleteIncomplete",
                message: format!("deleting the tenant's backups: {msg}"),
                error: Error::DeleteBackups(msg),
            });
        }
    }
    kit::event(
        ctx,
        t,
        false,
        "Deleted",
        format!(
            "dropped schema {}, roles, registry row with the key salt, Secrets and backups",
            name.schema()
        ),
    )
    .await;
    apply::remove_finalizer(ctx, t).await?;
    ctx.placements.forget(&uid);
    ctx.own_writes.forget(t);
    Ok(Action::await_change())
}

/// Drops the tenant from its shard and checks that nothing is left there.
async fn drop_on(
    shard: &crate::controller::shards::ShardConn,
    name: &TenantName,
    uid: &str,
    actor: &str,
) -> Result<(), Stop> {
    crate::pg::tenant::drop_tenant(&shard.pool, name, uid, actor)
        .await
        .map_err(|e| match e {
            e if e.is_transient() => Stop::Retry(e),
            e => Stop::Stuck {
                reason: "DeleteFailed",
                message: format!("cannot drop the tenant: {}", e.describe()),
                error: Error::Database(e),
            },
        })?;
    let left = crate::pg::tenant::leftovers(&shard.pool, name, uid)
        .await
        .map_err(Error::Database)?;
    if !left.is_empty() {
        let msg = left.join(", ");
        return Err(Stop::Stuck {
            reason: "DeleteIncomplete",
            message: format!("still present after drop: {msg}"),
            error: Error::Leftovers(msg),
        });
    }
    Ok(())
}
