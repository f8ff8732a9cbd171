//! Plan: the restore Job of a TenantRestore, and the TenantRestore's status
//! read from that Job. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{RestorePhase, TenantRestoreSpec, TenantRestoreStatus};
use crate::backup::Selector;
use crate::controller::kit::labels;
use crate::controller::tenant::backup_jobs::{job_pod, BackupSettings};
use crate::names::TenantName;

/// Label on the Job naming its TenantRestore (brings it back on Job events).
pub const RESTORE_LABEL: &str = "tenancy.dev/restore";

/// The labels of a restore's Job and Secret: the operator's, the tenant's,
/// and [`RESTORE_LABEL`] naming the TenantRestore.
pub fn job_labels(tenant: &TenantName, restore: &str) -> BTreeMap<String, String> {
    labels::managed(&[(labels::TENANT_LABEL, tenant.as_str()), (RESTORE_LABEL, restore)])
}

/// The Job of TenantRestore `name`.
pub fn job_name(restore: &str) -> String {
    format!("tenant-restore-{restore}")
}

/// The Secret of TenantRestore `restore`'s Job (the tenant's ops login and
/// the one backup key the chosen backup needs).
pub fn secret_name(restore: &str) -> String {
    format!("tenant-restore-{restore}")
}

/// Which backup the spec asks for, or why the spec is wrong. Pure.
pub fn selector(spec: &TenantRestoreSpec) -> Result<(TenantName, Selector), String> {
    let TenantRestoreSpec {
        tenant,
        backup,
        point_in_time,
    } = spec;
    let tenant = TenantName::parse(tenant).map_err(|e| format!("spec.tenant: {e}"))?;
    let sel = match (backup.as_str(), point_in_time) {
        ("latest", None) => Selector::Latest,
        ("latest", Some(t)) => Selector::PointInTime(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| format!("spec.pointInTime {t:?} is not an RFC 3339 time: {e}"))?
                .to_utc(),
        ),
        (_, Some(_)) => return Err("spec.pointInTime goes with spec.backup: latest".into()),
        (id, None) => {
            crate::backup::check_id(id).map_err(|e| format!("spec.backup: {e}"))?;
            Selector::Id(id.to_owned())
        }
    };
    Ok((tenant, sel))
}

/// The restore Job of backup `backup_id` (resolved by the operator), or why
/// it cannot be made. Its environment: the store's Secret and the
/// restore's own ([`secret_name`]); no admin DSN, no root keys, no
/// Kubernetes API, a restricted securityContext.
pub fn desired_job(
    restore: &str,
    tenant: &TenantName,
    backup_id: &str,
    owner: OwnerReference,
    settings: &BackupSettings,
    namespace: &str,
) -> Result<Job, String> {
    crate::backup::check_id(backup_id).map_err(|e| e.to_string())?;
    let args = vec![
        "restore".to_string(),
        "--job".into(),
        "--tenant".into(),
        tenant.to_string(),
        "--backup".into(),
        backup_id.to_owned(),
    ];
    let (Some(image), Some(env_secret)) = (&settings.image, &settings.env_secret) else {
        return Err("the operator runs without --image or --backup-env-secret: restore Jobs cannot be created".into());
    };
    let labels = job_labels(tenant, restore);
    let container = Container {
        name: "restore".into(),
        image: Some(image.clone()),
        args: Some(args),
        // The error, for status.error, from the log's tail.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    // The downloaded (encrypted) dump waits in the work directory while it
    // is checked; the root filesystem is read-only.
    let pod = job_pod(&labels, settings, container, env_secret, &secret_name(restore), "/work");
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(restore)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // A restore is not retried by itself: the operator puts the
            // original back when it fails; a person decides what next.
            backoff_limit: Some(0),
            template: pod,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The backup id a restore Job was started with (its `--backup` argument).
pub fn job_backup_id(job: &Job) -> Option<String> {
    let args = job
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .args
        .as_ref()?;
    let i = args.iter().position(|a| a == "--backup")?;
    args.get(i + 1).cloned()
}

/// The status a Job's state gives (`pod_error`: the failed pod's
/// termination message, if read). Keeps what `old` knew (backup id, bytes)
/// unless `found` says more.
pub fn status_from_job(
    old: Option<&TenantRestoreStatus>,
    job: &Job,
    pod_error: Option<String>,
    found: Option<(String, i64)>,
    generation: Option<i64>,
) -> TenantRestoreStatus {
    let st = job.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        st.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
            .cloned()
    };
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0.to_string());
    let start = time(&st.start_time).or_else(|| old.and_then(|o| o.start.clone()));
    let (phase, finish, error) = if let Some(c) = cond("Complete").or_else(|| cond("SuccessCriteriaMet")) {
        (
            RestorePhase::Succeeded,
            time(&st.completion_time).or_else(|| time(&c.last_transition_time)),
            None,
        )
    } else if let Some(c) = cond("Failed") {
        let why = pod_error
            .or(c.message)
            .or(c.reason)
            .unwrap_or_else(|| "the restore Job failed".into());
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
    TenantRestoreStatus {
        phase: Some(phase),
        job: job.metadata.name.clone(),
        start,
        finish,
        backup_id,
        bytes,
        error,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    fn settings() -> BackupSettings {
        BackupSettings {
            image: Some("op:1".into()),
            env_secret: Some("env".into()),
            ..Default::default()
        }
    }

    fn spec(backup: &str, pit: Option<&str>) -> TenantRestoreSpec {
        TenantRestoreSpec {
            tenant: "acme".into(),
            backup: backup.into(),
            point_in_time: pit.map(Into::into),
        }
    }

    #[test]
    fn the_spec_names_one_backup() {
        let (t, sel) = selector(&spec("latest", Some("2026-11-26T03:00:00Z"))).unwrap();
        assert_eq!(t.as_str(), "acme");
        assert!(matches!(sel, Selector::PointInTime(_)));
        assert_eq!(
            selector(&spec("20261126T030000.000Z", None)).unwrap().1,
            Selector::Id("20261126T030000.000Z".into())
        );
        assert_eq!(selector(&spec("latest", None)).unwrap().1, Selector::Latest);
        assert!(selector(&spec("20261126T030000.000Z", Some("2026-11-26T03:00:00Z"))).is_err());
        assert!(selector(&spec("../x", None)).is_err());
        assert!(selector(&spec("latest", Some("yesterday"))).is_err());
    }

    #[test]
    fn the_job_restores_the_resolved_backup_with_only_the_tenants_credentials() {
        let t = TenantName::parse("acme").unwrap();
        let job = desired_job(
            "r1",
            &t,
            "20261126T030000.000Z",
            OwnerReference::default(),
            &settings(),
            "ns",
        )
        .unwrap();
        assert_eq!(job_backup_id(&job).as_deref(), Some("20261126T030000.000Z"));
        let pod = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap(),
            &[
                "restore",
                "--job",
                "--tenant",
                "acme",
                "--backup",
                "20261126T030000.000Z"
            ]
        );
        assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
        let from: Vec<&str> = c
            .env_from
            .iter()
            .flatten()
            .filter_map(|e| e.secret_ref.as_ref())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(from, ["env", "tenant-restore-r1"]);
        let json = serde_json::to_string(&job).unwrap();
        assert!(
            c.env
                .iter()
                .flatten()
                .any(|e| e.name == "DATABASE_URL" && e.value.as_deref() == Some("")),
            "an env Secret's DATABASE_URL would reach the pod"
        );
        for leak in ["ROOT_KEYS", "KMS", "postgres://", "postgresql://"] {
            assert!(!json.contains(leak), "the Job mentions {leak}: {json}");
        }
        assert_eq!(pod.automount_service_account_token, Some(false));
        let cs = c.security_context.as_ref().unwrap();
        assert_eq!(
            (
                cs.allow_privilege_escalation,
                cs.read_only_root_filesystem,
                cs.run_as_non_root
            ),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(c.env.as_ref().unwrap()[0].value.as_deref(), Some("/work"));
        assert!(desired_job("r1", &t, "../x", OwnerReference::default(), &settings(), "ns").is_err());
        assert!(desired_job(
            "r1",
            &t,
            "20261126T030000.000Z",
            OwnerReference::default(),
            &BackupSettings::default(),
            "ns"
        )
        .is_err());
    }

    #[test]
    fn status_follows_the_job() {
        let mut job = Job {
            metadata: ObjectMeta {
                name: Some("j".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            status_from_job(None, &job, None, None, None).phase,
            Some(RestorePhase::Pending)
        );
        job.status = Some(JobStatus {
            active: Some(1),
            ..Default::default()
        });
        assert_eq!(
            status_from_job(None, &job, None, None, None).phase,
            Some(RestorePhase::Running)
        );
        let done = |t: &str, msg: Option<&str>| JobStatus {
            conditions: Some(vec![JobCondition {
                type_: t.into(),
                status: "True".into(),
                message: msg.map(Into::into),
                ..Default::default()
            }]),
            ..Default::default()
        };
        job.status = Some(done("Complete", None));
        let s = status_from_job(None, &job, None, Some(("id1".into(), 42)), None);
        assert_eq!(
            (s.phase, s.backup_id.as_deref(), s.bytes),
            (Some(RestorePhase::Succeeded), Some("id1"), Some(42))
        );
        job.status = Some(done("Failed", Some("BackoffLimitExceeded")));
        let s = status_from_job(None, &job, Some("backup x is refused".into()), None, None);
        assert_eq!(
            (s.phase, s.error.as_deref()),
            (Some(RestorePhase::Failed), Some("backup x is refused"))
        );
    }
}
