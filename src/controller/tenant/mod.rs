//! The Tenant controller: observe, plan, apply, report.
//!
//! Takes Tenant objects from the watch; converges each tenant's schema,
//! roles, caps and connection Secret, and its lifecycle (suspend, delete
//! through the `tenancy.dev/cleanup` finalizer).

pub mod apply;
pub mod observe;
pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::api::{Tenant, TenantPhase, TenantState};
use crate::controller::{Context, Stats};
use crate::names::TenantName;
use crate::pg::tenant::RegistryWrite;
use crate::pg::PgError;
use status::Cond;

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
}

impl Error {
    /// A fixed word for logs and metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Error::ReadSecret(_) => "ReadSecret",
            Error::WriteSecret(_) => "WriteSecret",
            Error::DeleteSecret(_) => "DeleteSecret",
            Error::PatchStatus(_) => "PatchStatus",
            Error::PatchFinalizer(_) => "PatchFinalizer",
            Error::Serialize(_) => "Serialize",
            Error::MissingUid => "MissingUid",
            Error::Database(e) if e.is_transient() => "DatabaseUnavailable",
            Error::Database(_) => "DatabaseError",
            Error::Leftovers(_) => "Leftovers",
        }
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Starts the Tenant controller and drives it until shutdown.
pub async fn run(ctx: Arc<Context>) {
    let tenants: Api<Tenant> = Api::all(ctx.client.clone());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let secret_cfg = watcher::Config::default().labels(&format!("{}={}", apply::MANAGED_BY.0, apply::MANAGED_BY.1));
    Controller::new(tenants, watcher::Config::default().any_semantic())
        // A Secret changed or deleted by hand brings its tenant back for
        // reconcile. The owner is cluster-scoped, so map by label rather
        // than `owns` (which looks owners up in the Secret's namespace).
        .watches(secrets, secret_cfg, |s: Secret| {
            s.labels().get(apply::TENANT_LABEL).map(|n| ObjectRef::<Tenant>::new(n)).into_iter().collect::<Vec<_>>()
        })
        .with_config(ControllerConfig::default().concurrency(ctx.settings.concurrency).debounce(Duration::from_millis(200)))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(tenant = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(t: Arc<Tenant>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&t.name_any());
    tracing::warn!(tenant = %t.name_any(), error = %err, kind = err.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One reconcile of one Tenant.
pub async fn reconcile(t: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action, Error> {
    Stats::add(&ctx.stats.reconciles, 1);
    let result = if t.metadata.deletion_timestamp.is_some() { cleanup(&t, &ctx).await } else { converge(&t, &ctx).await };
    if result.is_ok() {
        ctx.reset_backoff(&t.name_any());
    }
    result
}

/// Writes a status built from `conds` and publishes an event when the Ready
/// condition's reason changes (so a steady state publishes nothing).
async fn report(ctx: &Context, t: &Tenant, phase: TenantPhase, schema: Option<String>, conds: &[Cond]) -> Result<(), Error> {
    let new = status::next_status(t.status.as_ref(), phase, schema, t.metadata.generation, conds, &now());
    let ready = conds.iter().find(|c| c.type_ == "Ready" || c.type_ == "DeletionBlocked");
    let old_reason = ready.and_then(|c| status::condition(t.status.as_ref(), c.type_)).map(|c| c.reason.clone());
    apply::write_status(ctx, t, new).await?;
    if let Some(c) = ready {
        if old_reason.as_deref() != Some(c.reason) && !c.status || c.type_ == "DeletionBlocked" && old_reason.as_deref() != Some(c.reason) {
            apply::event(ctx, t, true, c.reason, c.message.clone()).await;
        }
    }
    Ok(())
}

/// Reports a failure a person must fix and waits for a change (or the
/// periodic resync, for conflicts that are fixed inside Postgres).
async fn fail(ctx: &Context, t: &Tenant, schema: Option<String>, reason: &'static str, message: String) -> Result<Action, Error> {
    tracing::warn!(tenant = %t.name_any(), reason, %message, "tenant cannot be converged");
    let conds = [Cond::new("Ready", false, reason, message.clone()), Cond::new("DatabaseReady", false, reason, message)];
    report(ctx, t, TenantPhase::Failed, schema, &conds).await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// Reports Postgres being unreachable and hands the error to the backoff.
async fn database_down(ctx: &Context, t: &Tenant, schema: Option<String>, err: PgError, deleting: bool) -> Result<Action, Error> {
    let message = if deleting {
        format!("waiting for Postgres to drop the tenant: {err}")
    } else {
        format!("cannot reach Postgres: {err}")
    };
    let phase = match t.status.as_ref().and_then(|s| s.phase) {
        _ if deleting => TenantPhase::Deleting,
        Some(p @ (TenantPhase::Active | TenantPhase::Suspended)) => p,
        _ => TenantPhase::Provisioning,
    };
    let conds = [Cond::new("Ready", false, "DatabaseUnavailable", message.clone()), Cond::new("DatabaseReady", false, "DatabaseUnavailable", message)];
    // The status write is best effort: the error below is what matters.
    let _ = report(ctx, t, phase, schema, &conds).await;
    Err(Error::Database(err))
}

async fn converge(t: &Tenant, ctx: &Context) -> Result<Action, Error> {
    let uid = t.uid().ok_or(Error::MissingUid)?;
    let name = match TenantName::parse(&t.name_any()) {
        Ok(n) => n,
        Err(e) => return fail(ctx, t, None, "InvalidName", e.to_string()).await,
    };
    let schema = Some(name.schema());
    let desired = match plan::desired_db(&name, &t.spec) {
        Ok(d) => d,
        Err(e) => return fail(ctx, t, schema, e.reason(), e.to_string()).await,
    };
    // The finalizer goes on before anything exists outside Kubernetes, so a
    // delete can never skip cleanup.
    if !apply::has_finalizer(t) {
        apply::add_finalizer(ctx, t).await?;
    }
    let observed = match observe::observe(ctx, &name).await {
        Ok(o) => o,
        Err(Error::Database(e)) if e.is_transient() => return database_down(ctx, t, schema, e, false).await,
        Err(e) => return Err(e),
    };
    let actor = plan::last_spec_manager(t);
    let outcome = match converge_db(&ctx.pool, &name, &uid, &desired, &observed.catalog, observed.secret_password().as_deref(), &actor).await {
        Ok(o) => o,
        Err(ConvergeError::Plan(e)) => return fail(ctx, t, schema, e.reason(), e.to_string()).await,
        Err(ConvergeError::Db(e)) if e.is_transient() => return database_down(ctx, t, schema, e, false).await,
        Err(ConvergeError::Db(e)) => return fail(ctx, t, schema, "DatabaseError", e.to_string()).await,
    };
    Stats::add(&ctx.stats.ddl_statements, outcome.statements as u64);
    let (db_plan, registry) = (outcome.plan, outcome.registry);
    let data = plan::secret_data(&name, &ctx.settings.endpoint, &db_plan.password);
    let secret_written = apply::converge_secret(ctx, t, &name, observed.secret.as_ref(), data).await?;

    if let Some(w) = &registry {
        let note = match w.audit_action {
            "Provisioned" => format!("created schema {} with roles {} and {}", name.schema(), name.owner_role(), name.app_role()),
            "Suspended" => "app role can no longer log in; its sessions were terminated".to_string(),
            "Resumed" => "app role can log in again".to_string(),
            _ => format!("converged drift: {}", db_plan.actions.iter().map(|a| a.label()).collect::<Vec<_>>().join(", ")),
        };
        apply::event(ctx, t, false, w.audit_action, note).await;
    } else if secret_written && observed.secret.is_some() {
        apply::event(ctx, t, false, "SecretRestored", format!("Secret {} rewritten", name.db_secret())).await;
    } else if secret_written {
        apply::event(ctx, t, false, "SecretCreated", format!("Secret {} written with new credentials", name.db_secret())).await;
    }

    let (phase, reason, message) = match t.spec.state {
        TenantState::Active => (TenantPhase::Active, "Provisioned", format!("schema {} is ready; credentials in Secret {}/{}", name.schema(), ctx.settings.namespace, name.db_secret())),
        TenantState::Suspended => (TenantPhase::Suspended, "Suspended", "the tenant is suspended: its app role cannot log in".to_string()),
    };
    let conds = [
        Cond::new("Ready", true, reason, message),
        Cond::new("DatabaseReady", true, "Converged", format!("schema, roles, privileges and caps match the spec")),
    ];
    report(ctx, t, phase, schema, &conds).await?;
    Ok(Action::requeue(ctx.settings.resync))
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
}

/// The Postgres half of a reconcile: plan from the observed catalog, run the
/// plan in one transaction with the registry and audit writes, then end the
/// sessions of a suspended tenant. No Kubernetes calls, so Postgres tests
/// drive it directly.
pub async fn converge_db(
    pool: &sqlx::PgPool,
    name: &TenantName,
    uid: &str,
    desired: &plan::DesiredDb,
    catalog: &crate::pg::tenant::CatalogState,
    secret_password: Option<&str>,
    actor: &str,
) -> Result<DbOutcome, ConvergeError> {
    let db_plan = plan::plan_db(name, uid, desired, catalog, secret_password)?;
    let state = if desired.login { "Active" } else { "Suspended" };
    let previous_state = catalog.registry.as_ref().map(|r| r.state.as_str());
    let audit_action = match previous_state {
        None => Some("Provisioned"),
        Some(p) if p == state => (!db_plan.actions.is_empty()).then_some("Converged"),
        Some(_) if desired.login => Some("Resumed"),
        Some(_) => Some("Suspended"),
    };
    let registry = audit_action.map(|audit_action| RegistryWrite { uid: uid.to_owned(), state, audit_action, actor: actor.to_owned() });
    let statements = crate::pg::tenant::apply(pool, name, uid, &db_plan.actions, registry.as_ref()).await?;
    if db_plan.terminate_sessions {
        let n = crate::pg::tenant::terminate_sessions(pool, name).await?;
        tracing::info!(tenant = %name, sessions = n, "terminated the suspended tenant's sessions");
    }
    Ok(DbOutcome { plan: db_plan, registry, statements })
}

async fn cleanup(t: &Tenant, ctx: &Context) -> Result<Action, Error> {
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
        report(ctx, t, TenantPhase::Deleting, schema, &[Cond::new("Ready", false, "Deleting", "the Tenant is being deleted"), Cond::new("DeletionBlocked", true, "DeletionProtection", msg)]).await?;
        return Ok(Action::await_change());
    }
    report(ctx, t, TenantPhase::Deleting, schema.clone(), &[Cond::new("Ready", false, "Deleting", "dropping the tenant's schema and roles")]).await?;
    let actor = plan::last_spec_manager(t);
    let dropped = match crate::pg::tenant::drop_tenant(&ctx.pool, &name, &uid, &actor).await {
        Ok(n) => n,
        Err(e) if e.is_transient() => return database_down(ctx, t, schema, e, true).await,
        Err(e) => {
            let msg = format!("cannot drop the tenant: {e}");
            report(ctx, t, TenantPhase::Deleting, schema, &[Cond::new("Ready", false, "DeleteFailed", msg)]).await?;
            return Err(Error::Database(e));
        }
    };
    Stats::add(&ctx.stats.ddl_statements, dropped as u64);
    apply::delete_secret(ctx, &name).await?;
    let left = crate::pg::tenant::leftovers(&ctx.pool, &name, &uid).await?;
    if !left.is_empty() {
        let msg = left.join(", ");
        report(ctx, t, TenantPhase::Deleting, schema, &[Cond::new("Ready", false, "DeleteIncomplete", format!("still present after drop: {msg}"))]).await?;
        return Err(Error::Leftovers(msg));
    }
    apply::event(ctx, t, false, "Deleted", format!("dropped schema {}, roles, registry row and Secret", name.schema())).await;
    apply::remove_finalizer(ctx, t).await?;
    Ok(Action::await_change())
}
