//! Scheduled backups of a tenant: the CronJob `tenant-<name>-backup` in the
//! operator namespace (plan: pure; apply: written only when it differs), the
//! `BackupScheduled` condition, and `status.lastBackup`.
//!
//! The CronJob runs the operator image's `tenant-operator backup --tenant
//! <name>` with its environment (DATABASE_URL, store credentials) from the
//! Secret named by `--backup-env-secret`; its Jobs may run at most
//! [`crate::backup::JOB_DEADLINE`]. Suspended while the tenant is
//! Suspended or `spec.backup.suspend`; deleted when `spec.backup` is removed.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements, SecretEnvSource};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use sha2::{Digest, Sha256};

use super::apply::{MANAGED_BY, TENANT_LABEL};
use super::status::Cond;
use super::Error;
use crate::api::tenant::BackupSpec;
use crate::api::{Tenant, TenantState};
use crate::controller::{Context, Stats};
use crate::names::TenantName;

/// Condition type reported for `spec.backup`.
pub const CONDITION: &str = "BackupScheduled";
/// Annotation with the hash of the CronJob's wanted content.
pub const SPEC_HASH_ANNOTATION: &str = "tenancy.dev/spec-hash";

/// How the operator runs backup Jobs (from its flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupSettings {
    /// The operator image the CronJob and restore Jobs run.
    pub image: Option<String>,
    /// Secret with DATABASE_URL, BACKUP_STORE and the store credentials,
    /// given to the Jobs as their environment.
    pub env_secret: Option<String>,
    /// Service account of the Jobs (must read the root-keys Secret and
    /// create Events, and patch Tenants).
    pub service_account: Option<String>,
    /// The store, for the delete finalizer (deletes `tenants/<uid>/`).
    pub store: Option<crate::backup::StoreConfig>,
}

/// The CronJob's name: `tenant-<name>-backup`. CronJob names may have at
/// most 52 characters; a longer one is cut and given a hash of the name.
pub fn cronjob_name(name: &TenantName) -> String {
    let full = format!("tenant-{name}-backup");
    if full.len() <= 52 {
        return full;
    }
    let hash = hex::encode(&Sha256::digest(name.as_str().as_bytes())[..4]);
    let cut = name.as_str()[..29].trim_end_matches('-');
    format!("tenant-{cut}-{hash}-backup")
}

/// Checks a five-field cron schedule (minute hour day-of-month month
/// day-of-week; numbers, `*`, ranges, lists, steps, and month and day
/// names).
pub fn check_schedule(s: &str) -> Result<(), String> {
    let fields: Vec<&str> = s.split_whitespace().collect();
    if fields.len() != 5 {
        return Err(format!("{s:?} has {} fields; a schedule has 5 (minute hour day-of-month month day-of-week)", fields.len()));
    }
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let specs: [(&str, u32, u32, &[&str], u32); 5] =
        [("minute", 0, 59, &[], 0), ("hour", 0, 23, &[], 0), ("day of month", 1, 31, &[], 0), ("month", 1, 12, &MONTHS, 1), ("day of week", 0, 7, &DAYS, 0)];
    for (field, (what, lo, hi, names, base)) in fields.iter().zip(specs) {
        let value = |v: &str| -> Result<u32, String> {
            if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(v)) {
                return Ok(i as u32 + base);
            }
            let n: u32 = v.parse().map_err(|_| format!("{what}: {v:?} is not a number"))?;
            if n < lo || n > hi {
                return Err(format!("{what}: {n} is not between {lo} and {hi}"));
            }
            Ok(n)
        };
        for item in field.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (item, None),
            };
            if let Some(step) = step {
                let n: u32 = step.parse().map_err(|_| format!("{what}: step {step:?} is not a number"))?;
                if n == 0 || n > hi {
                    return Err(format!("{what}: step {n} is out of range"));
                }
            }
            if range == "*" {
                continue;
            }
            match range.split_once('-') {
                Some((a, b)) => {
                    if value(a)? > value(b)? {
                        return Err(format!("{what}: range {range} runs backwards"));
                    }
                }
                None => {
                    value(range)?;
                }
            }
        }
    }
    Ok(())
}

/// The wanted CronJob, or why there is none. Pure.
pub fn desired_cronjob(
    name: &TenantName,
    owner: OwnerReference,
    state: TenantState,
    backup: &BackupSpec,
    settings: &BackupSettings,
    namespace: &str,
    root_keys: &crate::keys::KeySource,
) -> Result<CronJob, (&'static str, String)> {
    let BackupSpec { schedule, retention: _, suspend } = backup;
    // retention is read by the backup command from the Tenant itself.
    check_schedule(schedule).map_err(|m| ("InvalidSchedule", m))?;
    let (Some(image), Some(env_secret)) = (&settings.image, &settings.env_secret) else {
        return Err(("BackupNotConfigured", "the operator runs without --image or --backup-env-secret: backup Jobs cannot be created".into()));
    };
    let labels = BTreeMap::from([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()), (TENANT_LABEL.to_string(), name.to_string())]);
    let container = Container {
        name: "backup".into(),
        image: Some(image.clone()),
        args: Some(vec!["backup".into(), "--tenant".into(), name.to_string()]),
        env_from: Some(vec![EnvFromSource { secret_ref: Some(SecretEnvSource { name: env_secret.clone(), optional: Some(false) }), ..Default::default() }]),
        env: Some(job_env(namespace, root_keys)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_string(), Quantity("100m".into())), ("memory".to_string(), Quantity("64Mi".into()))])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut cj = CronJob {
        metadata: ObjectMeta {
            name: Some(cronjob_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(CronJobSpec {
            schedule: schedule.split_whitespace().collect::<Vec<_>>().join(" "),
            concurrency_policy: Some("Forbid".into()),
            suspend: Some(*suspend || state == TenantState::Suspended),
            starting_deadline_seconds: Some(3600),
            successful_jobs_history_limit: Some(3),
            failed_jobs_history_limit: Some(3),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels.clone()), ..Default::default() }),
                spec: Some(JobSpec {
                    backoff_limit: Some(2),
                    // Bounds a hung pg_dump (Forbid would hold back every
                    // later backup) and the age of a dump still uploading,
                    // which orphan pruning's grace must exceed.
                    active_deadline_seconds: Some(crate::backup::JOB_DEADLINE.as_secs() as i64),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                        spec: Some(PodSpec {
                            restart_policy: Some("Never".into()),
                            service_account_name: settings.service_account.clone(),
                            containers: vec![container],
                            ..Default::default()
                        }),
                    },
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let hash = hex::encode(Sha256::digest(serde_json::to_vec(&cj.spec).unwrap_or_default()));
    cj.metadata.annotations = Some(BTreeMap::from([(SPEC_HASH_ANNOTATION.to_string(), hash)]));
    Ok(cj)
}

/// What the backup and restore Jobs need besides the env Secret: where the
/// root keys are.
pub fn job_env(namespace: &str, root_keys: &crate::keys::KeySource) -> Vec<EnvVar> {
    let var = |n: &str, v: &str| EnvVar { name: n.into(), value: Some(v.into()), ..Default::default() };
    let mut env = vec![var("OPERATOR_NAMESPACE", namespace), var("ROOT_KEYS_SECRET", &root_keys.secret)];
    if let Some(kms) = &root_keys.kms {
        env.push(var("ROOT_KEYS_KMS", "true"));
        env.push(var("AWS_REGION", &kms.region));
        if let Some(e) = &kms.endpoint {
            env.push(var("KMS_ENDPOINT", e));
        }
        if let Some(k) = &kms.key_id {
            env.push(var("KMS_KEY_ID", k));
        }
    }
    env
}

/// Whether `existing` already is `desired` (same content hash and owner).
pub fn up_to_date(existing: &CronJob, desired: &CronJob) -> bool {
    let hash = |c: &CronJob| c.annotations().get(SPEC_HASH_ANNOTATION).cloned();
    let owner = |c: &CronJob| c.metadata.owner_references.clone().unwrap_or_default().into_iter().map(|o| o.uid).collect::<Vec<_>>();
    hash(existing).is_some() && hash(existing) == hash(desired) && owner(existing) == owner(desired)
}

/// Creates, replaces or deletes the tenant's CronJob; returns the
/// `BackupScheduled` condition (None without `spec.backup`).
pub async fn converge_cronjob(ctx: &Context, t: &Tenant, name: &TenantName) -> Result<Option<Cond>, Error> {
    let api: Api<CronJob> = Api::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let cj_name = cronjob_name(name);
    let existing = api.get_opt(&cj_name).await.map_err(Error::Backup)?;
    let Some(spec) = &t.spec.backup else {
        if existing.is_some() {
            match api.delete(&cj_name, &DeleteParams::background()).await {
                Ok(_) => Stats::add(&ctx.stats.kube_writes, 1),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Backup(e)),
            }
        }
        return Ok(None);
    };
    let owner = t.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let desired = match desired_cronjob(name, owner, t.spec.state, spec, &ctx.settings.backup, &ctx.settings.namespace, &ctx.settings.root_keys) {
        Ok(d) => d,
        Err((reason, message)) => return Ok(Some(Cond::new(CONDITION, false, reason, message))),
    };
    match existing {
        Some(e) if up_to_date(&e, &desired) => {}
        Some(e) => {
            let mut next = desired.clone();
            next.metadata.resource_version = e.metadata.resource_version.clone();
            api.replace(&cj_name, &PostParams::default(), &next).await.map_err(Error::Backup)?;
            Stats::add(&ctx.stats.kube_writes, 1);
        }
        None => {
            api.create(&PostParams::default(), &desired).await.map_err(Error::Backup)?;
            Stats::add(&ctx.stats.kube_writes, 1);
        }
    }
    let suspended = desired.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
    let message = format!("CronJob {}/{cj_name} runs `{}`{}", ctx.settings.namespace, spec.schedule, if suspended { " (suspended)" } else { "" });
    Ok(Some(Cond::new(CONDITION, true, if suspended { "Suspended" } else { "Scheduled" }, message)))
}

/// `status.lastBackup` from the backups table.
pub async fn last_backup(ctx: &Context, uid: &str) -> Option<crate::api::tenant::LastBackup> {
    match crate::pg::backup::last_backup(&ctx.pool, uid).await {
        Ok(row) => row.map(|r| crate::api::tenant::LastBackup {
            id: r.id,
            time: r.taken_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            bytes: r.bytes,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "reading the last backup");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BackupSettings {
        BackupSettings { image: Some("op:1".into()), env_secret: Some("backup-env".into()), service_account: Some("sa".into()), store: None }
    }

    fn keys() -> crate::keys::KeySource {
        crate::keys::KeySource { namespace: "ns".into(), secret: "rk".into(), kms: None }
    }

    fn owner() -> OwnerReference {
        OwnerReference { api_version: "tenancy.dev/v1alpha1".into(), kind: "Tenant".into(), name: "acme".into(), uid: "u-1".into(), controller: Some(true), ..Default::default() }
    }

    #[test]
    fn schedules_are_checked() {
        for ok in ["0 3 * * *", "*/15 * * * *", "0 0 1,15 * mon-fri", "5 4 * jan,jul 0", "0 22 * * 1-5", "0 0 * * 7"] {
            check_schedule(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "* * * *", "0 3 * * * *", "60 * * * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "*/0 * * * *", "5-1 * * * *", "@daily", "a b c d e"] {
            assert!(check_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cronjob_runs_the_backup_command_forbids_overlap_and_follows_suspension() {
        let n = TenantName::parse("acme").unwrap();
        let spec = BackupSpec { schedule: "0 3 * * *".into(), ..Default::default() };
        let cj = desired_cronjob(&n, owner(), TenantState::Active, &spec, &settings(), "ns", &keys()).unwrap();
        assert_eq!(cj.metadata.name.as_deref(), Some("tenant-acme-backup"));
        let s = cj.spec.as_ref().unwrap();
        assert_eq!(s.concurrency_policy.as_deref(), Some("Forbid"));
        assert_eq!(s.suspend, Some(false));
        let pod = s.job_template.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.args.as_ref().unwrap(), &["backup", "--tenant", "acme"]);
        assert!(c.resources.as_ref().unwrap().requests.is_some());
        assert_eq!(pod.service_account_name.as_deref(), Some("sa"));
        let deadline = s.job_template.spec.as_ref().unwrap().active_deadline_seconds;
        assert_eq!(deadline, Some(crate::backup::JOB_DEADLINE.as_secs() as i64));
        assert!(crate::backup::ORPHAN_GRACE.as_secs() as i64 > deadline.unwrap(), "orphan pruning could delete the dump of a Job still running");
        let suspended = desired_cronjob(&n, owner(), TenantState::Suspended, &spec, &settings(), "ns", &keys()).unwrap();
        assert_eq!(suspended.spec.as_ref().unwrap().suspend, Some(true));
        assert!(!up_to_date(&cj, &suspended), "a suspension must rewrite the CronJob");
        let again = desired_cronjob(&n, owner(), TenantState::Active, &spec, &settings(), "ns", &keys()).unwrap();
        assert!(up_to_date(&cj, &again), "an unchanged spec must not rewrite the CronJob");
        let by_spec = BackupSpec { suspend: true, ..spec.clone() };
        assert_eq!(desired_cronjob(&n, owner(), TenantState::Active, &by_spec, &settings(), "ns", &keys()).unwrap().spec.unwrap().suspend, Some(true));
        let err = desired_cronjob(&n, owner(), TenantState::Active, &spec, &BackupSettings::default(), "ns", &keys()).unwrap_err();
        assert_eq!(err.0, "BackupNotConfigured");
    }

    #[test]
    fn long_names_fit_the_cronjob_limit() {
        let n = TenantName::parse(&"a".repeat(40)).unwrap();
        let name = cronjob_name(&n);
        assert!(name.len() <= 52, "{name}");
        assert!(name.starts_with("tenant-") && name.ends_with("-backup"));
        assert_ne!(cronjob_name(&TenantName::parse(&format!("{}b", "a".repeat(39))).unwrap()), name);
    }
}
