//! Plan: the restore Job of a TenantRestore, and the TenantRestore's status
//! read from that Job. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, EnvFromSource, PodSpec, PodTemplateSpec, ResourceRequirements, SecretEnvSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{RestorePhase, TenantRestoreSpec, TenantRestoreStatus};
use crate::controller::tenant::apply::{MANAGED_BY, TENANT_LABEL};
use crate::controller::tenant::backup::{job_env, BackupSettings};
use crate::names::TenantName;

/// Label on the Job naming its TenantRestore (brings it back on Job events).
pub const RESTORE_LABEL: &str = "tenancy.dev/restore";

/// The Job of TenantRestore `name`.
pub fn job_name(restore: &str) -> String {
    format!("tenant-restore-{restore}")
}

/// The restore Job, or why it cannot be made (reason, message).
pub fn desired_job(
    restore: &str,
    spec: &TenantRestoreSpec,
    owner: OwnerReference,
    settings: &BackupSettings,
    namespace: &str,
    root_keys: &crate::keys::KeySource,
) -> Result<Job, String> {
    let TenantRestoreSpec { tenant, backup, point_in_time } = spec;
    let tenant = TenantName::parse(tenant).map_err(|e| format!("spec.tenant: {e}"))?;
    let mut args = vec!["restore".to_string(), "--tenant".into(), tenant.to_string(), "--backup".into(), backup.clone()];
    if backup != "latest" {
        crate::backup::check_id(backup).map_err(|e| format!("spec.backup: {e}"))?;
    }
    if let Some(t) = point_in_time {
        if backup != "latest" {
            return Err("spec.pointInTime goes with spec.backup: latest".into());
        }
        chrono::DateTime::parse_from_rfc3339(t).map_err(|e| format!("spec.pointInTime {t:?} is not an RFC 3339 time: {e}"))?;
        args.extend(["--point-in-time".to_string(), t.clone()]);
    }
    let (Some(image), Some(env_secret)) = (&settings.image, &settings.env_secret) else {
        return Err("the operator runs without --image or --backup-env-secret: restore Jobs cannot be created".into());
    };
    let labels = BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (TENANT_LABEL.to_string(), tenant.to_string()),
        (RESTORE_LABEL.to_string(), restore.to_string()),
    ]);
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(restore)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // A restore is not retried by itself: a failed one put the
            // original back; a person decides what to do next.
            backoff_limit: Some(0),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: settings.service_account.clone(),
                    // The downloaded (encrypted) dump waits here while it is
                    // checked; the image's root filesystem may be read-only.
                    volumes: Some(vec![Volume { name: "work".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }]),
                    containers: vec![Container {
                        name: "restore".into(),
                        image: Some(image.clone()),
                        args: Some(args),
                        env_from: Some(vec![EnvFromSource { secret_ref: Some(SecretEnvSource { name: env_secret.clone(), optional: Some(false) }), ..Default::default() }]),
                        env: Some({
                            let mut env = job_env(namespace, root_keys);
                            env.push(k8s_openapi::api::core::v1::EnvVar { name: "TMPDIR".into(), value: Some("/work".into()), ..Default::default() });
                            env
                        }),
                        volume_mounts: Some(vec![VolumeMount { name: "work".into(), mount_path: "/work".into(), ..Default::default() }]),
                        // The error, for status.error, from the log's tail.
                        termination_message_policy: Some("FallbackToLogsOnError".into()),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([("cpu".to_string(), Quantity("100m".into())), ("memory".to_string(), Quantity("64Mi".into()))])),
                            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The status a Job's state gives (`pod_error`: the failed pod's
/// termination message, if read). Keeps what `old` knew (backup id, bytes)
/// unless `found` says more.
pub fn status_from_job(old: Option<&TenantRestoreStatus>, job: &Job, pod_error: Option<String>, found: Option<(String, i64)>, generation: Option<i64>) -> TenantRestoreStatus {
    let st = job.status.clone().unwrap_or_default();
    let cond = |t: &str| st.conditions.iter().flatten().find(|c| c.type_ == t && c.status == "True").cloned();
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0.to_string());
    let start = time(&st.start_time).or_else(|| old.and_then(|o| o.start.clone()));
    let (phase, finish, error) = if let Some(c) = cond("Complete").or_else(|| cond("SuccessCriteriaMet")) {
        (RestorePhase::Succeeded, time(&st.completion_time).or_else(|| time(&c.last_transition_time)), None)
    } else if let Some(c) = cond("Failed") {
        let why = pod_error.or(c.message).or(c.reason).unwrap_or_else(|| "the restore Job failed".into());
        (RestorePhase::Failed, time(&c.last_transition_time), Some(why))
    } else if st.active.unwrap_or(0) > 0 || st.start_time.is_some() {
        (RestorePhase::Running, None, None)
    } else {
        (RestorePhase::Pending, None, None)
    };
    let (backup_id, bytes) = match (&phase, found) {
        (RestorePhase::Succeeded, Some((id, bytes))) => (Some(id), Some(bytes)),
        _ => (old.and_then(|o| o.backup_id.clone()), old.and_then(|o| o.bytes)),
    };
    TenantRestoreStatus { phase: Some(phase), job: job.metadata.name.clone(), start, finish, backup_id, bytes, error, observed_generation: generation }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    fn settings() -> BackupSettings {
        BackupSettings { image: Some("op:1".into()), env_secret: Some("env".into()), service_account: None, store: None }
    }

    fn keys() -> crate::keys::KeySource {
        crate::keys::KeySource { namespace: "ns".into(), secret: "rk".into(), kms: None }
    }

    fn spec(backup: &str, pit: Option<&str>) -> TenantRestoreSpec {
        TenantRestoreSpec { tenant: "acme".into(), backup: backup.into(), point_in_time: pit.map(Into::into) }
    }

    #[test]
    fn job_runs_the_restore_command() {
        let job = desired_job("r1", &spec("latest", Some("2026-11-26T03:00:00Z")), OwnerReference::default(), &settings(), "ns", &keys()).unwrap();
        let c = &job.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.args.as_ref().unwrap(), &["restore", "--tenant", "acme", "--backup", "latest", "--point-in-time", "2026-11-26T03:00:00Z"]);
        assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
        assert!(desired_job("r1", &spec("20261126T030000.000Z", Some("2026-11-26T03:00:00Z")), OwnerReference::default(), &settings(), "ns", &keys()).is_err());
        assert!(desired_job("r1", &spec("../x", None), OwnerReference::default(), &settings(), "ns", &keys()).is_err());
        assert!(desired_job("r1", &spec("latest", Some("yesterday")), OwnerReference::default(), &settings(), "ns", &keys()).is_err());
        assert!(desired_job("r1", &spec("latest", None), OwnerReference::default(), &BackupSettings::default(), "ns", &keys()).is_err());
    }

    #[test]
    fn status_follows_the_job() {
        let mut job = Job { metadata: ObjectMeta { name: Some("j".into()), ..Default::default() }, ..Default::default() };
        assert_eq!(status_from_job(None, &job, None, None, None).phase, Some(RestorePhase::Pending));
        job.status = Some(JobStatus { active: Some(1), ..Default::default() });
        assert_eq!(status_from_job(None, &job, None, None, None).phase, Some(RestorePhase::Running));
        let done = |t: &str, msg: Option<&str>| JobStatus {
            conditions: Some(vec![JobCondition { type_: t.into(), status: "True".into(), message: msg.map(Into::into), ..Default::default() }]),
            ..Default::default()
        };
        job.status = Some(done("Complete", None));
        let s = status_from_job(None, &job, None, Some(("id1".into(), 42)), None);
        assert_eq!((s.phase, s.backup_id.as_deref(), s.bytes), (Some(RestorePhase::Succeeded), Some("id1"), Some(42)));
        job.status = Some(done("Failed", Some("BackoffLimitExceeded")));
        let s = status_from_job(None, &job, Some("backup x is refused".into()), None, None);
        assert_eq!((s.phase, s.error.as_deref()), (Some(RestorePhase::Failed), Some("backup x is refused")));
    }
}
