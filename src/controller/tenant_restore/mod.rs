//! The TenantRestore controller: the admin's half of a restore, around one
//! restore Job per TenantRestore, and the TenantRestore's status.
//!
//! Takes TenantRestores from a watch, and their Jobs (by label) as triggers.
//! A new TenantRestore: the backup is resolved from the store's manifests
//! (the Job restores that id), the Job's Secret `tenant-restore-<name>` is
//! written (the tenant's ops login and the backup key of that backup's root
//! key version, nothing else), the tenant's schema is prepared
//! (`pg::backup_sql::prepare`: app role locked out, original aside, an empty
//! schema marked restoring), then the Job is created; it runs `pg_restore`
//! as the ops login. When the Job succeeded: `pg::backup_sql::finalize` (the
//! restored schema becomes the tenant's, the original is dropped, login
//! back, audit row `Restored`); when it failed: `pg::backup_sql::put_back`.
//! Either way the Job's Secret is deleted. Each step takes the tenant's
//! restore lock and is safe to repeat after a crash. Writes: the Secret,
//! the Job (created once, never changed), the TenantRestore's status (only
//! when it changed) and Events (on the TenantRestore, and `Restored` on
//! the Tenant).

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::api::{RestorePhase, TenantRestore, TenantRestoreStatus};
use crate::backup::Selector;
use crate::controller::kit::{self, events::tenant_ref};
use crate::controller::shards::ShardConn;
use crate::controller::tenant::backup_jobs::{job_credentials, job_secret_data, write_job_secret};
use crate::controller::Context;
use crate::crypto::KeyVersion;
use crate::names::TenantName;
use crate::pg::backup_sql as pgb;

/// Errors of one TenantRestore reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading or creating the restore Job: {0}")]
    Job(#[source] kube::Error),
    #[error("writing the TenantRestore's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("the TenantRestore has no uid")]
    MissingUid,
    #[error(transparent)]
    Database(#[from] crate::pg::PgError),
    #[error(transparent)]
    Secret(#[from] crate::controller::tenant::backup_jobs::JobSecretError),
    #[error("deleting the restore Job's Secret: {0}")]
    DeleteSecret(#[source] kube::Error),
    #[error("the operator holds no root keys yet")]
    NoKeys,
    #[error("{0}")]
    Waiting(String),
}

impl kit::ReconcileError for Error {
    fn label(&self) -> &'static str {
        match self {
            Error::Job(_) => "WriteJob",
            Error::PatchStatus(_) => "PatchStatus",
            Error::MissingUid => "MissingUid",
            Error::Database(_) => "Database",
            Error::Secret(_) => "WriteSecret",
            Error::DeleteSecret(_) => "DeleteSecret",
            Error::NoKeys => "NoKeys",
            Error::Waiting(_) => "Waiting",
        }
    }
}

/// Starts the controller and drives it until the process stops.
pub async fn run(ctx: Arc<Context>) {
    let restores: Api<TenantRestore> = Api::all(ctx.client.clone());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let cfg = watcher::Config::default().labels(plan::RESTORE_LABEL);
    let outcomes = Controller::new(restores, watcher::Config::default().any_semantic())
        // The owner is cluster-scoped: map Jobs back by label, not `owns`.
        .watches(jobs, cfg, |job: Job| {
            job.labels()
                .get(plan::RESTORE_LABEL)
                .map(|n| ObjectRef::<TenantRestore>::new(n))
        })
        .with_config(kit::queue(4, Duration::from_millis(200)))
        .run(reconcile, error_policy, ctx);
    kit::drain(CONTROLLER, outcomes).await;
}

/// The controller's name in metrics, logs and backoff keys.
const CONTROLLER: &str = "tenantrestore";

fn error_policy(r: Arc<TenantRestore>, err: &Error, ctx: Arc<Context>) -> Action {
    kit::error_policy(&ctx, CONTROLLER, &r.name_any(), err)
}

/// Writes the status when it changed, and publishes an Event when the phase
/// moved on.
async fn write_status(ctx: &Context, r: &TenantRestore, status: TenantRestoreStatus) -> Result<bool, Error> {
    if !kit::write_status(ctx, r, r.status.as_ref(), &status)
        .await
        .map_err(Error::PatchStatus)?
    {
        return Ok(false);
    }
    if let Some(phase) = status
        .phase
        .filter(|p| r.status.as_ref().and_then(|s| s.phase) != Some(*p))
    {
        let tenant = &r.spec.tenant;
        match phase {
            RestorePhase::Succeeded => {
                kit::event(
                    ctx,
                    r,
                    false,
                    "Restored",
                    format!(
                        "tenant {tenant} restored from backup {}",
                        status.backup_id.as_deref().unwrap_or("?")
                    ),
                )
                .await
            }
            RestorePhase::Failed => {
                kit::event(ctx, r, true, "RestoreFailed", status.error.clone().unwrap_or_default()).await
            }
            RestorePhase::Running => {
                kit::event(
                    ctx,
                    r,
                    false,
                    "RestoreStarted",
                    format!("Job {} runs", status.job.as_deref().unwrap_or("?")),
                )
                .await
            }
            RestorePhase::Pending => {}
        }
    }
    Ok(true)
}

/// One reconcile of one TenantRestore.
pub async fn reconcile(r: Arc<TenantRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = r.name_any();
    let span = tracing::info_span!("reconcile", controller = CONTROLLER, restore = %name);
    kit::reconcile(&ctx, CONTROLLER, &name, span, reconcile_inner(&r, &ctx)).await
}

fn failed(r: &TenantRestore, why: String) -> TenantRestoreStatus {
    let old = r.status.clone().unwrap_or_default();
    TenantRestoreStatus {
        phase: Some(RestorePhase::Failed),
        error: Some(why),
        observed_generation: r.metadata.generation,
        ..old
    }
}

async fn reconcile_inner(r: &TenantRestore, ctx: &Context) -> Result<Action, Error> {
    if r.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let old = r.status.as_ref();
    if matches!(
        old.and_then(|s| s.phase),
        Some(RestorePhase::Succeeded | RestorePhase::Failed)
    ) {
        return Ok(Action::await_change());
    }
    let name = r.name_any();
    let (tenant, selector) = match plan::selector(&r.spec) {
        Ok(v) => v,
        Err(why) => {
            write_status(ctx, r, failed(r, why)).await?;
            return Ok(Action::await_change());
        }
    };
    let by = pgb::by_tenant_restore(&name);
    let shard = shard_of(ctx, &tenant).await?;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let Some(job) = jobs.get_opt(&plan::job_name(&name)).await.map_err(Error::Job)? else {
        return start(ctx, &shard, r, &tenant, &selector, &by).await;
    };
    let conds = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let is = |t: &str| conds.iter().any(|c| c.type_ == t && c.status == "True");
    let (succeeded, job_failed) = (is("Complete") || is("SuccessCriteriaMet"), is("Failed"));
    if !succeeded && !job_failed {
        write_status(
            ctx,
            r,
            plan::status_from_job(old, &job, None, None, r.metadata.generation),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let Some(uid) = crate::pg::registry::uid_of(&shard.pool, tenant.as_str()).await? else {
        write_status(
            ctx,
            r,
            failed(r, format!("tenant {tenant} is no longer in the registry")),
        )
        .await?;
        return Ok(Action::await_change());
    };
    let mut status = plan::status_from_job(old, &job, None, None, r.metadata.generation);
    if succeeded {
        let backup_id = plan::job_backup_id(&job).unwrap_or_default();
        let detail = serde_json::json!({ "restore": name, "job": plan::job_name(&name), "bytes": status.bytes });
        let record = pgb::RestoreRecord {
            backup_id: backup_id.clone(),
            actor: by.clone(),
            detail,
        };
        // The restored audit chain is older than the anchored head: its
        // anchors are reset to it (recorded as AuditRebased) before the app
        // role may log in again (docs/audit.md, "After a restore").
        if pgb::awaiting_finalize(&shard.pool, &tenant, &uid, &by).await? {
            let ring = ctx
                .keys
                .current()
                .ok_or_else(|| Error::Waiting("the root keys are not loaded".into()))?;
            let salt = crate::pg::registry::existing_key_salt(&shard.pool, &uid)
                .await?
                .ok_or_else(|| Error::Waiting(format!("tenant {tenant} has no key salt")))?;
            let login = crate::pg::confined::OpsLogin::derive(&shard.target, &tenant, &uid, &ring, &salt)
                .map_err(|e| Error::Waiting(format!("deriving the ops login of tenant {tenant}: {e}")))?;
            crate::pg::audit::rebase_after_restore(
                &shard.pool,
                &ring,
                &login,
                &by,
                serde_json::json!({ "backup": backup_id, "restore": name }),
            )
            .await?;
        }
        match pgb::finalize(&shard.pool, &tenant, &uid, &by, true, &record).await? {
            pgb::Finalized::Done => {
                tenant_event(
                    ctx,
                    &tenant,
                    &uid,
                    false,
                    "Restored",
                    format!(
                        "schema {} restored from backup {backup_id} by TenantRestore {name}",
                        tenant.schema()
                    ),
                )
                .await
            }
            pgb::Finalized::Already => {}
            pgb::Finalized::Busy => {
                return Err(Error::Waiting(format!("the restore lock of tenant {tenant} is taken")))
            }
            pgb::Finalized::NotPrepared(why) => {
                status = failed(
                    r,
                    format!("the Job restored backup {backup_id} but the schema could not be finalized: {why}"),
                )
            }
        }
    } else {
        match pgb::put_back(&shard.pool, &tenant, &uid, true).await? {
            pgb::PutBack::Done | pgb::PutBack::Nothing => {}
            pgb::PutBack::Busy => return Err(Error::Waiting(format!("the restore lock of tenant {tenant} is taken"))),
        }
        let pod_error = pod_error(ctx, &plan::job_name(&name)).await;
        status = plan::status_from_job(old, &job, pod_error, None, r.metadata.generation);
        if let Some(e) = status.error.as_mut() {
            e.push_str(" (the original schema was put back)");
        }
    }
    crate::controller::tenant::backup_jobs::delete_job_secret(ctx, &plan::secret_name(&name))
        .await
        .map_err(Error::DeleteSecret)?;
    write_status(ctx, r, status).await?;
    Ok(Action::await_change())
}

/// A new TenantRestore: resolve the backup, write the Job's Secret, prepare
/// the schema, create the Job. Each step may be repeated after a crash.
async fn start(
    ctx: &Context,
    shard: &ShardConn,
    r: &TenantRestore,
    tenant: &TenantName,
    selector: &Selector,
    by: &str,
) -> Result<Action, Error> {
    let name = r.name_any();
    let fail = |why: String| failed(r, why);
    let settings = &ctx.settings.backup;
    let Some(store_cfg) = &settings.store else {
        write_status(
            ctx,
            r,
            fail("the operator runs without --backup-store: it cannot resolve the backup".into()),
        )
        .await?;
        return Ok(Action::await_change());
    };
    let Some(uid) = crate::pg::registry::uid_of(&shard.pool, tenant.as_str()).await? else {
        write_status(ctx, r, fail(format!("tenant {tenant} is not in the registry"))).await?;
        return Ok(Action::await_change());
    };
    let Some(salt) = crate::pg::registry::existing_key_salt(&shard.pool, &uid).await? else {
        write_status(ctx, r, fail(format!("tenant {tenant} has no key salt"))).await?;
        return Ok(Action::await_change());
    };
    let ring = ctx.keys.current().ok_or(Error::NoKeys)?;
    let held: Vec<KeyVersion> = ring.versions().collect();
    let resolved = match crate::backup::Store::open(store_cfg) {
        Ok(store) => crate::backup::resolve(&store, tenant, &uid, selector, &held).await,
        Err(e) => Err(e.into()),
    };
    let manifest = match resolved {
        Ok(m) => m,
        Err(e) => {
            write_status(ctx, r, fail(e.to_string())).await?;
            return Ok(Action::await_change());
        }
    };
    let owner = r.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let job = match plan::desired_job(
        &name,
        tenant,
        &manifest.id,
        owner.clone(),
        settings,
        &ctx.settings.namespace,
    ) {
        Ok(j) => j,
        Err(why) => {
            write_status(ctx, r, fail(why)).await?;
            return Ok(Action::await_change());
        }
    };
    let version = KeyVersion::new(manifest.key_version).map_err(|e| Error::Waiting(e.to_string()))?;
    let (password, keys) =
        job_credentials(&ring, &salt, &uid, &[version]).map_err(|e| Error::Waiting(e.to_string()))?;
    let data = job_secret_data(
        tenant,
        &uid,
        &shard.endpoint,
        Some(crate::backup::libpq_ssl_mode(&shard.target)),
        &password,
        &keys,
    );
    let labels = plan::job_labels(tenant, &name);
    write_job_secret(ctx, shard, &plan::secret_name(&name), owner, labels, tenant, &uid, data).await?;
    match pgb::prepare(&shard.pool, tenant, &uid, by, true).await? {
        pgb::Prepared::Done | pgb::Prepared::Already => {}
        pgb::Prepared::Busy => return Err(Error::Waiting(format!("the restore lock of tenant {tenant} is taken"))),
        pgb::Prepared::Unfinished => {
            return Err(Error::Waiting(format!(
                "another restore of tenant {tenant} is under way or was cut short (the Tenant's reconcile finishes it)"
            )))
        }
        pgb::Prepared::NoSchema => {
            crate::controller::tenant::backup_jobs::delete_job_secret(ctx, &plan::secret_name(&name))
                .await
                .map_err(Error::DeleteSecret)?;
            write_status(
                ctx,
                r,
                fail(format!("tenant {tenant} has no schema of its own to restore into")),
            )
            .await?;
            return Ok(Action::await_change());
        }
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let created = match kit::create(&jobs, &job).await {
        Ok(j) => j,
        Err(kube::Error::Api(s)) if s.code == 409 => jobs.get(&plan::job_name(&name)).await.map_err(Error::Job)?,
        Err(e) => return Err(Error::Job(e)),
    };
    let mut status = plan::status_from_job(r.status.as_ref(), &created, None, None, r.metadata.generation);
    status.backup_id = Some(manifest.id.clone());
    status.bytes = Some(manifest.bytes as i64);
    write_status(ctx, r, status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// An Event on the Tenant (cluster-scoped; its uid is the registry's).
/// The shard the restored tenant lives on (the Tenant's placement; a
/// Tenant that is gone: the default shard, where its registry row, if any,
/// says it is not there).
async fn shard_of(ctx: &Context, tenant: &TenantName) -> Result<Arc<ShardConn>, Error> {
    let t = ctx
        .metrics
        .tenant_store
        .get()
        .and_then(|s| s.get(&kube::runtime::reflector::ObjectRef::new(tenant.as_str())));
    // A move copies the schema as it is: a restore waits for its end (and
    // a move does not start while a restore runs).
    if let Some(m) = t
        .as_deref()
        .and_then(|t| t.status.as_ref())
        .and_then(|s| s.moving.as_ref())
    {
        return Err(Error::Waiting(format!(
            "tenant {tenant} is moving from shard {} to {}; the restore starts after the move",
            m.from, m.to
        )));
    }
    let Some(name) = t
        .as_deref()
        .and_then(|t| crate::controller::tenant::placement::shard_of(ctx, t))
    else {
        return Ok(ctx.shards.default_shard());
    };
    ctx.shards
        .get(&name)
        .ok_or_else(|| Error::Waiting(format!("the tenant's shard {name:?} is not open")))
}

async fn tenant_event(ctx: &Context, tenant: &TenantName, uid: &str, warning: bool, reason: &str, note: String) {
    kit::publish(ctx, &tenant_ref(tenant.as_str(), uid), warning, reason, note).await
}

/// The termination message of the Job's failed pod (the log's tail).
async fn pod_error(ctx: &Context, job: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .ok()?;
    list.items
        .iter()
        .find_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        })
        .map(|m| {
            m.trim()
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect()
        })
}
