//! The TenantRestore controller: runs one restore Job per TenantRestore and
//! reports the Job's outcome in the TenantRestore's status.
//!
//! Takes TenantRestores from a watch, and their Jobs (by label) as triggers.
//! Writes: the Job (created once, never changed), the TenantRestore's status
//! (only when it changed) and Events. The restore itself (Postgres, store)
//! is the Job's `tenant-operator restore`; this controller touches neither.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use chrono::DateTime;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::api::{RestorePhase, TenantRestore, TenantRestoreStatus};
use crate::controller::{Context, Stats};

/// Errors of one TenantRestore reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading or creating the restore Job: {0}")]
    Job(#[source] kube::Error),
    #[error("writing the TenantRestore's status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("the TenantRestore has no uid")]
    MissingUid,
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Error::Job(_) => "WriteJob",
            Error::PatchStatus(_) => "PatchStatus",
            Error::MissingUid => "MissingUid",
        }
    }
}

/// Starts the controller and drives it until the process stops.
pub async fn run(ctx: Arc<Context>) {
    let restores: Api<TenantRestore> = Api::all(ctx.client.clone());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let cfg = watcher::Config::default().labels(plan::RESTORE_LABEL);
    Controller::new(restores, watcher::Config::default().any_semantic())
        // The owner is cluster-scoped: map Jobs back by label, not `owns`.
        .watches(jobs, cfg, |job: Job| job.labels().get(plan::RESTORE_LABEL).map(|n| ObjectRef::<TenantRestore>::new(n)))
        .with_config(ControllerConfig::default().concurrency(4).debounce(Duration::from_millis(200)))
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "tenantrestore reconcile failed");
            }
        })
        .await;
}

fn error_policy(r: Arc<TenantRestore>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("tenantrestore/{}", r.name_any());
    let delay = ctx.backoff(&key);
    tracing::warn!(restore = %r.name_any(), error = %err, kind = err.label(), retry_in = ?delay, "tenantrestore reconcile failed");
    Action::requeue(delay)
}

async fn event(ctx: &Context, r: &TenantRestore, warning: bool, reason: &str, note: String) {
    let ev = crate::controller::event_of(warning, reason, note);
    if ctx.recorder.publish(&ev, &r.object_ref(&())).await.is_ok() {
        Stats::add(&ctx.stats.kube_writes, 1);
    }
}

async fn write_status(ctx: &Context, r: &TenantRestore, status: TenantRestoreStatus) -> Result<bool, Error> {
    if r.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let api: Api<TenantRestore> = Api::all(ctx.client.clone());
    match api.patch_status(&r.name_any(), &PatchParams::default(), &Patch::Merge(&serde_json::json!({ "status": status }))).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
        Err(e) => return Err(Error::PatchStatus(e)),
    }
    Stats::add(&ctx.stats.kube_writes, 1);
    if let Some(phase) = status.phase.filter(|p| r.status.as_ref().and_then(|s| s.phase) != Some(*p)) {
        let tenant = &r.spec.tenant;
        match phase {
            RestorePhase::Succeeded => event(ctx, r, false, "Restored", format!("tenant {tenant} restored from backup {}", status.backup_id.as_deref().unwrap_or("?"))).await,
            RestorePhase::Failed => event(ctx, r, true, "RestoreFailed", status.error.clone().unwrap_or_default()).await,
            RestorePhase::Running => event(ctx, r, false, "RestoreStarted", format!("Job {} runs", status.job.as_deref().unwrap_or("?"))).await,
            RestorePhase::Pending => {}
        }
    }
    Ok(true)
}

/// One reconcile of one TenantRestore.
pub async fn reconcile(r: Arc<TenantRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = format!("tenantrestore/{}", r.name_any());
    let result = reconcile_inner(&r, &ctx).await;
    if result.is_ok() {
        ctx.reset_backoff(&key);
    }
    result
}

async fn reconcile_inner(r: &TenantRestore, ctx: &Context) -> Result<Action, Error> {
    if r.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let old = r.status.as_ref();
    if matches!(old.and_then(|s| s.phase), Some(RestorePhase::Succeeded | RestorePhase::Failed)) {
        return Ok(Action::await_change());
    }
    let name = r.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let job = match jobs.get_opt(&plan::job_name(&name)).await.map_err(Error::Job)? {
        Some(j) => j,
        None => {
            let owner = r.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
            match plan::desired_job(&name, &r.spec, owner, &ctx.settings.backup, &ctx.settings.namespace, &ctx.settings.root_keys) {
                Ok(job) => {
                    let created = jobs.create(&PostParams::default(), &job).await.map_err(Error::Job)?;
                    Stats::add(&ctx.stats.kube_writes, 1);
                    created
                }
                Err(why) => {
                    let status = TenantRestoreStatus { phase: Some(RestorePhase::Failed), error: Some(why), observed_generation: r.metadata.generation, ..Default::default() };
                    write_status(ctx, r, status).await?;
                    return Ok(Action::await_change());
                }
            }
        }
    };
    let failed = job.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Failed" && c.status == "True"));
    let pod_error = if failed { pod_error(ctx, &plan::job_name(&name)).await } else { None };
    let succeeded = job.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| (c.type_ == "Complete" || c.type_ == "SuccessCriteriaMet") && c.status == "True"));
    let found = if succeeded { restored_backup(ctx, r).await } else { None };
    let status = plan::status_from_job(old, &job, pod_error, found, r.metadata.generation);
    let done = matches!(status.phase, Some(RestorePhase::Succeeded | RestorePhase::Failed));
    write_status(ctx, r, status).await?;
    Ok(if done { Action::await_change() } else { Action::requeue(Duration::from_secs(30)) })
}

/// The termination message of the Job's failed pod (the log's tail).
async fn pod_error(ctx: &Context, job: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let list = pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await.ok()?;
    list.items.iter().find_map(|p| {
        p.status.as_ref()?.container_statuses.as_ref()?.iter().find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
    }).map(|m| m.trim().chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect())
}

/// Which backup the Job restored, from the backups table.
async fn restored_backup(ctx: &Context, r: &TenantRestore) -> Option<(String, i64)> {
    let uid = crate::pg::tenant::uid_of(&ctx.pool, &r.spec.tenant).await.ok()??;
    let id = (r.spec.backup != "latest").then_some(r.spec.backup.as_str());
    let before = r.spec.point_in_time.as_deref().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.to_utc());
    let row = crate::pg::backup::find_backup(&ctx.pool, &uid, id, before).await.ok()??;
    Some((row.id, row.bytes))
}
